"""The norm folding of int4 models at one token (engine/model/fused_ops.py, fold_add_norm), through
the whole model: each residual add and RMSNorm in the int4 products either side, against the same
model with a kernel of their own.

On the CPU under the Triton interpreter: the layers are repacked for the tensor-core kernel, which
the interpreter runs; the batch-1 launches take one pinned config instead of the GPU's autotuning
(it times configs on the device), and the layers take the CPU's tensors for a GPU's (their one
device check). Every other line is the GPU's path.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from engine.config import QuantConfig  # noqa: E402
from engine.model.dense import forward_full_sequence  # noqa: E402
from engine.model.loader import load_model  # noqa: E402
from engine.quant.int4 import Int4Linear  # noqa: E402
from engine.quant.swap import quantize_model_  # noqa: E402
from tests.triton_interpreter import exact_bf16_dot, interpreted_module  # noqa: E402

triton = pytest.importorskip("triton")


class PinnedConfig:
    """Stands in for an autotuned launcher: every launch with one config (tiles as the GPU's)."""

    def __init__(self, mma, config: dict) -> None:
        self._mma, self._config = mma, config

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            n, k = args[15], args[16]  # the kernel's N and K
            even = self._mma._even(dict(self._config, N=n, K=k, GROUP=kwargs["GROUP"]))
            self._mma._int4_mma_kernel[grid(self._config)](*args, **kwargs, **self._config, EVEN=even, num_warps=4, num_stages=1)

        return launch


@pytest.fixture
def mma(monkeypatch):
    exact_bf16_dot(monkeypatch)
    module = interpreted_module("engine.quant.int4_mma", "_int4_mma_kernel")
    monkeypatch.setattr(module, "_int4_mma_tuned", PinnedConfig(module, {"BLOCK_N": 16, "STEP_GROUPS": 1, "SPLIT_K": 2}))
    monkeypatch.setattr(Int4Linear, "_mma_one_row", lambda self, x: self.mma and x.shape[0] == 1)
    return module


def int4_mma_model(checkpoint):
    model = load_model(str(checkpoint), "bfloat16", "cpu").model
    quantize_model_(model, QuantConfig(method="int4", group_size=64, awq=False))
    for module in model.modules():
        if isinstance(module, Int4Linear):
            module.to_mma_()
    return model


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2"])  # qwen2: qkv bias, tied embeddings
def counting(monkeypatch, calls: dict[str, int]) -> None:
    """Counts the folded products' calls into `calls`."""
    for name in ("forward_add_residual", "forward_normed"):
        method = getattr(Int4Linear, name)

        def counted(self, *args, _method=method, _name=name):
            calls[_name] += 1
            return _method(self, *args)

        monkeypatch.setattr(Int4Linear, name, counted)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2"])  # qwen2: qkv bias, tied embeddings
def test_folded_norms_give_the_unfolded_logits(mma, monkeypatch, tiny_checkpoint, preset):
    model = int4_mma_model(tiny_checkpoint(preset))
    calls = {"forward_add_residual": 0, "forward_normed": 0}
    counting(monkeypatch, calls)
    token = [7]
    unfolded = forward_full_sequence(model, token)  # a model's layers start unfolded; the engine sets them
    assert calls == {"forward_add_residual": 0, "forward_normed": 0}
    model.set_decode_folds(True)
    folded = forward_full_sequence(model, token)
    # o_proj of every layer and down_proj of all but the last end a fold; gate_up, and qkv past the
    # first layer, start one.
    layers = len(model.layers)
    assert calls == {"forward_add_residual": 2 * layers - 1, "forward_normed": 2 * layers - 1}
    assert torch.equal(folded.argmax(-1), unfolded.argmax(-1))
    # Roundings differ (bf16 activations), within a few ulps a layer.
    err = float((folded - unfolded).abs().max() / unfolded.abs().max())
    assert 0 < err < 0.03, err


def test_more_than_one_token_never_folds(mma, monkeypatch, tiny_checkpoint):
    model = int4_mma_model(tiny_checkpoint("tiny-llama"))
    calls = {"forward_add_residual": 0, "forward_normed": 0}
    counting(monkeypatch, calls)
    model.set_decode_folds(True)
    forward_full_sequence(model, [7, 8, 9])
    assert calls == {"forward_add_residual": 0, "forward_normed": 0}


def test_the_engine_config_sets_both_folds_on_every_layer(llama_ckpt, make_engine):
    for on in (False, True):
        model = make_engine(llama_ckpt, decode_folds=on).model
        assert all(layer.fold_norms is on and layer.fold_rope is on for layer in model.layers)
