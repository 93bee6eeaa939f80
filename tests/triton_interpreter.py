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
