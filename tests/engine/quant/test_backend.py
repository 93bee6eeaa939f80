"""quantization.backend: what "auto", "triton" and "torch" do to a loaded model's int4 / fp8 layers.

tinygemm runs on CUDA only, so its repacking is replaced by a marker here; the
choice of which layers get it is what these tests check. The GPU check of the
kernels themselves is bench/quant.py's self-check.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.config import ConfigError, QuantConfig
from engine.quant.int4 import Int4Linear
from engine.quant.swap import AUTO_BACKEND, backend_summary, resolve_backend, set_backend_


class TwoLayers(nn.Module):
    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = Int4Linear.from_float(nn.Linear(256, 64, bias=False).to(dtype), 128)
        self.b = Int4Linear.from_float(nn.Linear(256, 64, bias=False).to(dtype), 128)


@pytest.fixture
def fake_tinygemm(monkeypatch):
    """Every layer counts as tinygemm-capable; converting only flips the flag."""

    def convert(self):
        self.tinygemm = True

    monkeypatch.setattr(Int4Linear, "tinygemm_supported", lambda self: True)
    monkeypatch.setattr(Int4Linear, "to_tinygemm_", convert)


def test_default_backend_is_auto():
    assert QuantConfig(method="int4").backend == "auto"
    with pytest.raises(ConfigError, match="auto"):
        QuantConfig(method="int4", backend="cuda")


def test_resolve_backend():
    assert resolve_backend("int4", "auto") == AUTO_BACKEND["int4"]
    assert resolve_backend("fp8", "auto") == AUTO_BACKEND["fp8"]
    assert resolve_backend("int4", "triton") == "triton"
    assert resolve_backend("int4", "torch") == "torch"


@pytest.mark.parametrize(
    "backend,dtype,tinygemm",
    [
        ("triton", torch.bfloat16, False),
        ("torch", torch.bfloat16, True),
        ("torch", torch.float32, True),  # asked for explicitly: obeyed, activations go through bf16
        ("auto", torch.bfloat16, AUTO_BACKEND["int4"] == "torch"),
        ("auto", torch.float32, False),  # auto never moves an fp32 / fp16 model to bf16 compute
    ],
)
def test_int4_layers_follow_the_backend(fake_tinygemm, backend, dtype, tinygemm):
    model = TwoLayers(dtype)
    set_backend_(model, backend)
    assert model.a.tinygemm is tinygemm and model.b.tinygemm is tinygemm
    assert backend_summary(model) == f"int4: {'torch' if tinygemm else 'triton'} 2"


def test_on_the_cpu_nothing_is_repacked():
    model = TwoLayers(torch.bfloat16)
    set_backend_(model, "torch")  # tinygemm_supported() is False off CUDA
    assert not model.a.tinygemm
    x = torch.randn(1, 256).to(torch.bfloat16)
    torch.testing.assert_close(model.a(x), model.a.forward_reference(x))


@pytest.fixture
def fake_mma_device(monkeypatch):
    """Every layer counts as runnable by the tensor-core kernel (a CUDA check); the repacking is real."""
    monkeypatch.setattr(Int4Linear, "mma_supported", lambda self: self.qweight is not None)


def test_triton_mma_backend_repacks_the_int4_layers(fake_mma_device):
    model = TwoLayers(torch.bfloat16)
    x = torch.randn(2, 256).to(torch.bfloat16)
    before = model.a(x)
    set_backend_(model, "triton-mma")
    assert model.a.mma and model.b.mma and not model.a.tinygemm
    assert backend_summary(model) == "int4: triton-mma 2"
    assert torch.equal(model.a(x), before)  # the CPU reference unpacks the repacked codes
    set_backend_(model, "triton-mma")  # a second call leaves repacked layers alone
    assert model.a.mma


def test_triton_mma_is_an_int4_backend():
    assert QuantConfig(method="int4", backend="triton-mma").backend == "triton-mma"
    assert resolve_backend("int4", "triton-mma") == "triton-mma"
    assert resolve_backend("fp8", "triton-mma") == "triton"  # the other methods keep our kernels
    assert resolve_backend("int8", "triton-mma") == "triton"


def test_on_the_cpu_the_mma_backend_repacks_nothing():
    model = TwoLayers(torch.bfloat16)
    set_backend_(model, "triton-mma")  # mma_supported() is False off CUDA
    assert not model.a.mma and backend_summary(model) == "int4: triton 2"
