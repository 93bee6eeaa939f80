"""Shared by the Triton kernel tests, which run on the CPU under TRITON_INTERPRET=1.

Each such test module sets the variable at its very top (Triton reads it when
a kernel is decorated); this checks it took effect. numpy is pinned below 2.4
in pyproject.toml because triton 3.6's interpreter breaks on 2.4 (triton-lang/triton#9171).
"""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest


def interpreted_module(name: str, kernel: str) -> ModuleType:
    """Imports `name`; skips the test if its `kernel` was compiled before the interpreter was switched on."""
    from triton.runtime import interpreter

    module = importlib.import_module(name)
    if not isinstance(getattr(module, kernel), interpreter.InterpretedFunction):
        pytest.skip(f"{name} was imported before TRITON_INTERPRET=1 was set")
    return module


def exact_bf16_dot(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lets the interpreter's tl.dot take bf16 operands (tensor cores do; numpy has no bf16).

    The interpreter holds bf16 tensors as their uint16 bits and multiplies with np.matmul, which
    would multiply the bit patterns as integers. This widens such operands to fp32 first: exact,
    as on the GPU, where bf16 products are exact and summed in fp32."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    create_dot = interpreter.InterpreterBuilder.create_dot

    def widened(handle):
        if handle.dtype.scalar != tl.bfloat16:
            return handle
        bits = handle.data.astype(np.uint32) << 16
        return interpreter.TensorHandle(bits.view(np.float32), tl.float32)

    def dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return create_dot(self, widened(a), widened(b), d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", dot)


def fresh_process_json(code: str) -> dict:
    """Runs `code` in a fresh Python without TRITON_INTERPRET (kernels decorated under the
    interpreter cannot be compiled for a GPU) from the repo root; its last stdout line as JSON."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
