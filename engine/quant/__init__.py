"""Weight quantization as a converter plus a module swap, selected by config (QuantConfig).

    none   the float model as loaded
    int8   weight-only, symmetric, per output channel            (int8.py)
    int4   weight-only, asymmetric, groups of 128 input channels  (int4.py), with activation-aware
           scales searched on a calibration text (awq.py) or plain round-to-nearest (awq: false)
    fp8    e4m3 weights (per channel) and activations (per token), CUDA >= 8.9 only (fp8.py)

A float checkpoint is quantized at load time (`apply_quantization`);
`python -m engine.quant.convert` writes a quantized checkpoint once, which
then loads as it is (checkpoint.py) and must match the config's scheme.
On CUDA small batches run Triton kernels (kernels.py) that read the packed
weights; the CPU dequantizes and multiplies in torch (correct, not fast).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from engine.config import QuantConfig
from engine.errors import ConfigError

__all__ = ["apply_quantization", "quantized_weight_bytes"]


def apply_quantization(
    model: nn.Module,
    config: QuantConfig,
    *,
    checkpoint: QuantConfig | None = None,
    calibration_source: str | Path | None = None,
) -> list:
    """Makes `model` run as `config` asks. Returns the AWQ search results (empty unless int4 + awq).

    checkpoint: the scheme the loaded checkpoint was already quantized with
    (LoadedModel.quantization), or None for a float checkpoint. A quantized
    checkpoint is used as it is, and must agree with `config`: anything else
    (config "none" included) is a ConfigError.
    calibration_source: a folder with the tokenizer for the AWQ calibration text.
    """
    from engine.quant.checkpoint import check_matches
    from engine.quant.fp8 import check_fp8_device
    from engine.quant.swap import quantize_model_, set_backend_

    device = next(model.parameters()).device
    if checkpoint is not None:
        check_matches(checkpoint, config)
    if config.method == "none":
        return []
    if config.method == "fp8":
        check_fp8_device(device)
    results: list = []
    if checkpoint is None:
        calibration = None
        if config.method == "int4" and config.awq:
            calibration = _calibration(model, calibration_source)
        results = quantize_model_(model, config, calibration)
    set_backend_(model, config.backend)
    return results


def _calibration(model: nn.Module, source: str | Path | None) -> list[list[int]]:
    from engine.quant.calibration import calibration_sequences
    from engine.tokenizer import load_tokenizer

    try:
        tokenizer = load_tokenizer(source)
    except Exception as exc:  # a broken tokenizer folder: say so rather than calibrate on noise
        raise ConfigError(f"cannot load the tokenizer in {source} for AWQ calibration: {exc}") from exc
    return calibration_sequences(tokenizer, model.arch.vocab_size)


def quantized_weight_bytes(model: nn.Module) -> int:
    """Bytes of every persistent tensor of the model (what its checkpoint holds)."""
    from engine.quant.base import tensor_bytes

    return tensor_bytes(model)
