"""Weight quantization as a module swap, chosen by config (filled in by the quantization work)."""

from __future__ import annotations

from torch import nn

from engine.config import QuantConfig
from engine.errors import ConfigError


def apply_quantization(model: nn.Module, config: QuantConfig) -> None:
    if config.method == "none":
        return
    raise ConfigError(f"quantization {config.method!r} is not available yet")
