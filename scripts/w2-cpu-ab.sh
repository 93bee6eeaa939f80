#!/usr/bin/env bash
# W2's shape on a CPU machine: the Serve path against the engine driven directly, with a random
# 1-layer model (the demo tokenizer's vocabulary) so the engine steps fast enough for Serve's own
# costs to show. Two git revisions alternately, ROUNDS times each, one line per pass.
#   run: ROUNDS=4 bash scripts/w2-cpu-ab.sh REV_BEFORE REV_AFTER   (REQUESTS: per pass, default 2048)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$PWD/.venv/bin/python}
ROUNDS=${ROUNDS:-4}
REQUESTS=${REQUESTS:-2048}
WORK=${WORK:-/tmp/w2-cpu-ab}
mkdir -p "$WORK"
MODEL=$WORK/tiny-tok
if [ ! -f "$MODEL/config.json" ]; then
  "$PY" - "$MODEL" <<'PY'
import shutil, sys
from engine.model.presets import preset_config, save_hf_checkpoint
cfg = preset_config("tiny-llama")
cfg.update(vocab_size=4096, num_hidden_layers=1, bos_token_id=0, eos_token_id=0, max_position_embeddings=2048)
out = save_hf_checkpoint(cfg, sys.argv[1], dtype="bfloat16")
for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
    shutil.copy(f"models/demo-target/{name}", out / name)
PY
fi
for rev in "$@"; do
  [ -d "$WORK/$rev" ] || git worktree add -f "$WORK/$rev" "$rev" -q
done
for round in $(seq 1 "$ROUNDS"); do
  for rev in "$@"; do
    log=$WORK/$rev-$round.log
    (cd "$WORK/$rev" && PYTHONPATH=$WORK/$rev timeout 900 "$PY" bench/serve_throughput.py --model "$MODEL" \
      --concurrency 64 --requests-per-level "$REQUESTS" --output-len 128 --prompt-len 256 --no-compile-pass \
      --serve-set ingress_direct_http.port=18000 > "$log" 2>&1) || true
    echo "$rev round $round: $(grep -h '^W2:' "$log" | cut -d'(' -f1) | wait after router:" \
      "$(sed -n 's/.*+ \([0-9.]*\) after.*/\1/p' "$log") ms | $(grep -h 'c=64    proxy' "$log")"
  done
done
