"""bench/sass_count.py: the int4 kernels compiled for sm_90 offline (no GPU), instructions counted.

This is also the check that the tensor-core kernel keeps its point after a Triton upgrade: if
Triton stopped keeping the loaded words in the dot's register layout (staging the dequantized
tile through shared memory instead) or ptxas stopped fusing the mask and the magic into one
LOP3, the count per weight would rise well above these bounds.

The compiles run in a fresh process: the interpreter tests of this session switch
TRITON_INTERPRET on, and kernels decorated under it cannot be compiled.
"""

from __future__ import annotations

import pytest

from bench import sass_count
from tests.triton_interpreter import fresh_process_json

pytestmark = pytest.mark.skipif(not sass_count.tools_available(), reason="no ptxas / cuobjdump in the triton wheel")

_COUNT = """
import json
from bench import sass_count
(mma,) = sass_count.mma_counts(configs=[(64, 8, 1, 4, 1)])
(matvec,) = sass_count.matvec_counts(configs=[(64, 256, 1, 4, 1)])
print(json.dumps({"mma": mma.__dict__, "matvec": matvec.__dict__}))
"""


def test_the_mma_kernel_issues_far_fewer_instructions_per_weight():
    counts = fresh_process_json(_COUNT)
    mma, matvec = counts["mma"], counts["matvec"]
    assert mma["top"].get("HGMMA", 0) > 0  # wgmma: the weights' tile stays in registers
    # 7 logic / shift instructions per 8 weights plus one wgmma per 8 (per thread) are the floor
    assert 1.0 < mma["per_weight"] < 2.0
    assert mma["per_weight"] < 0.5 * matvec["per_weight"]
    assert mma["top"]["LOP3"] <= 256 + 8  # one LOP3 per word and plane: 64 words x 4 planes per step


_DECODE = """
import json
from bench import sass_count
print(json.dumps({str(c): sass_count.decode_attention_usage(4, c) for c in (True, False)}))
"""


def test_the_decode_attention_kernel_spills_nothing_at_the_8b_batch_1_shape():
    # Compiled without the launch's divisibility (strides unknown to be multiples of 16) it took all
    # 255 registers and a spill stack: that count is not the launch's, this one is.
    usage = fresh_process_json(_DECODE)
    for combine_in_kernel in ("True", "False"):
        assert usage[combine_in_kernel]["STACK"] == 0
        assert usage[combine_in_kernel]["REG"] < 200
