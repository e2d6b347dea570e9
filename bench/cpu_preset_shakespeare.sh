#!/usr/bin/env bash
# The `cpu` preset on tinyshakespeare (its default 120 s training budget, evaluation included), from raw text.
# Target: val bits per byte <= 2.4 (aim 2.2) within 130 s of training. Run from the repository root.
# Extra flags pass through to pretrain (e.g. --dtype float32).
set -euo pipefail
OUT=${OUT:-/tmp/bench-cpu-preset}
rm -rf "$OUT"
/usr/bin/time -f "wall %e s, peak RSS %M KB" homellm pretrain --preset cpu \
  --data ../shared/data/tinyshakespeare/input.txt --out "$OUT" --device cpu "$@"
python bench/summarize.py "$OUT"
