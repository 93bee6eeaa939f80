#!/usr/bin/env bash
# Train the bundled demo models end to end on one GPU, offline:
#   scripts/demo_models/run_all.sh [TARGET_SECONDS=240] [DRAFT_SECONDS=90]
# Needs (all in the working tree, nothing downloaded): the corpus built by
# build_corpus.py in .corpus/, the tokenizer in models/demo-tokenizer/.
# Writes models/demo-target and models/demo-draft (weights, tokenizer, cards).
# If $OUT is set, also leaves there: the log, evaluation.json, and both model
# folders as one tar split into 15 MiB parts (the device tool returns at most
# 8 files of 16 MiB); rebuild with: cat demo_models.tar.part-* | tar xf -
# Knobs for smoke runs: PYTHON, MODELS (output root), EXTRA (flags for train.py),
# EVAL_EXTRA (flags for evaluate.py). For the draft: DRAFT_PRESET (draft | draft2),
# DISTILL=1 (learn the freshly trained target's distribution, not the corpus's).
set -euo pipefail
TARGET_SECONDS=${1:-240}
DRAFT_SECONDS=${2:-90}
PY=${PYTHON:-python3}
MODELS=${MODELS:-models}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 TOKENIZERS_PARALLELISM=true
cd "$(dirname "$0")/../.."
LOG=${OUT:-$MODELS}/train_log.txt
mkdir -p "$MODELS" "$(dirname "$LOG")"

{
  date -u
  $PY -c 'import sys, torch, transformers, tokenizers; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available(), "transformers", transformers.__version__, "tokenizers", tokenizers.__version__)'
  $PY -m scripts.demo_models.train --preset target --time-budget "$TARGET_SECONDS" --out "$MODELS/demo-target" ${EXTRA:-}
  $PY -m scripts.demo_models.train --preset "${DRAFT_PRESET:-draft}" --time-budget "$DRAFT_SECONDS" --out "$MODELS/demo-draft" \
    ${DISTILL:+--distill-from "$MODELS/demo-target"} ${EXTRA:-}
  $PY -m scripts.demo_models.evaluate --target "$MODELS/demo-target" --draft "$MODELS/demo-draft" ${EVAL_EXTRA:-}
  du -sh "$MODELS/demo-target" "$MODELS/demo-draft"
  date -u
} 2>&1 | tee "$LOG"

if [ -n "${OUT:-}" ]; then
  cp "$MODELS/demo-target/evaluation.json" "$OUT/"
  tar cf - -C "$MODELS" demo-target demo-draft | split -b 15M -d - "$OUT/demo_models.tar.part-"
  ls -la "$OUT"
fi
