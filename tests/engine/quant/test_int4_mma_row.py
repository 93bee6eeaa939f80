"""The one-row int4 kernel (engine/quant/int4_mma.py, _int4_mma_row_kernel) against the dequantized reference, under the Triton interpreter."""
import os
os.environ["TRITON_INTERPRET"] = "1"
import pytest, torch
from tests.engine.quant.test_int4_mma import layer, check, mma  # noqa

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(384, 40, 128), (768, 72, 64), (1024, 16, 256), (2048, 64, 128), (1792, 64, 128), (256, 24, 32)])
@pytest.mark.parametrize("cfg", [
    {"BLOCK_N": 16, "STEP_GROUPS": 4, "COLUMNS": 16, "SPLIT_K": 1},
    {"BLOCK_N": 32, "STEP_GROUPS": 2, "COLUMNS": 16, "SPLIT_K": 2},
    {"BLOCK_N": 16, "STEP_GROUPS": 4, "COLUMNS": 16, "SPLIT_K": 3},
    {"BLOCK_N": 16, "STEP_GROUPS": 4, "COLUMNS": 32, "SPLIT_K": 1},

])
def test_row(mma, dtype, shape, cfg):
    k, n, g = shape
    if cfg and not mma._row_fits(cfg["STEP_GROUPS"], cfg["COLUMNS"], cfg["SPLIT_K"], g, k // g):
        pytest.skip("does not fit")
    q = layer(k, n, g, dtype, bias=True)
    x = torch.randn(1, k).to(dtype)
    ws = mma.MmaWorkspace.for_rows(n, x.device)
    words = mma.pack_mma(q.qweight, g)
    y = mma.int4_mma_matmul(x, words, q.scales, q.zeros, q.bias, g, ws, cfg)
    ref = x.float() @ q.dequantize(torch.float32).t() + q.bias.float()
    check(y, ref)
    assert int(ws.counters.abs().sum()) == 0
