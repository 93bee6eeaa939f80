"""Offline converter: a float checkpoint in, a quantized checkpoint out (loads with no recalibration).

    python -m engine.quant.convert --model models/demo-target --method int4 --out /tmp/demo-int4
    python -m engine.quant.convert --model models/demo-target --method int4 --no-awq --out /tmp/demo-int4-rtn
    python -m engine.quant.convert --model models/demo-target --method int8 --out /tmp/demo-int8

The output folder holds model.safetensors (the quantized tensors), config.json
(the source's, plus `quantization_config` with the method, group size and
awq flag) and the tokenizer files. Serve it with the same quantization in
the config (serve_config.yaml: `quantization: int4`, or `{method: int4, awq:
false}` for an RTN one); a different one is refused with a ConfigError.

fp8 checkpoints can be written on any machine (no calibration is needed) but
only run on a GPU with fp8 support.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


from engine.config import QuantConfig
from engine.errors import ConfigError


def convert(
    model: str, out: str | Path, config: QuantConfig, device: str = "cpu", dtype: str = "bfloat16"
) -> Path:
    """Quantizes the float checkpoint `model` as `config` says and writes it to `out`."""
    from engine.model.loader import load_model, resolve_model_path
    from engine.quant.calibration import calibration_sequences
    from engine.quant.checkpoint import save_quantized
    from engine.quant.swap import quantize_model_
    from engine.tokenizer import load_tokenizer

    if config.method == "none":
        raise ConfigError("convert needs a quantization method: int8, int4 or fp8")
    path = resolve_model_path(model)
    hf_config = json.loads((path / "config.json").read_text())
    if "quantization_config" in hf_config:
        raise ConfigError(f"{path} is already quantized; convert its float checkpoint instead")
    loaded = load_model(str(path), dtype, device)
    calibration = None
    if config.method == "int4" and config.awq:
        calibration = calibration_sequences(load_tokenizer(path), loaded.arch.vocab_size)
    results = quantize_model_(loaded.model, config, calibration)
    if results:
        gain = sum(r.awq_error for r in results) / max(sum(r.rtn_error for r in results), 1e-30)
        print(f"awq: {len(results)} layers, output error {gain:.3f}x that of round-to-nearest", flush=True)
    torch_dtype = next(loaded.model.parameters()).dtype
    return save_quantized(loaded.model, hf_config, config, Path(out), torch_dtype, source=path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="float checkpoint folder (or hub id)")
    p.add_argument("--method", required=True, choices=["int8", "int4", "fp8"])
    p.add_argument("--group-size", type=int, default=128, help="int4 group size (power of two >= 16)")
    p.add_argument("--no-awq", action="store_true", help="int4: plain round-to-nearest, no activation-aware scales")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--device", default="cpu", help="where to quantize (cpu, cuda, auto)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="dtype of the float tensors written (norms, int4 scales)")
    args = p.parse_args(argv)
    config = QuantConfig(method=args.method, group_size=args.group_size, awq=not args.no_awq)
    t0 = time.perf_counter()
    try:
        out = convert(args.model, args.out, config, args.device, args.dtype)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"wrote {out} ({size / 2**20:.1f} MiB of tensors) in {time.perf_counter() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
