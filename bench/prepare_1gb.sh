#!/usr/bin/env bash
# `homellm prepare` throughput and peak memory on a 1 GB corpus: the TinyStories sample repeated to 1 GB (made in
# $TMP, never in the repository), a byte-level BPE tokenizer of 8192 ids trained on the sample.
set -euo pipefail
TMP=${TMP:-/tmp/bench-prepare}
mkdir -p "$TMP"
if [ ! -f "$TMP/corpus.txt" ]; then
  python - "$TMP/corpus.txt" <<'PY'
import sys
sample = open("../shared/data/tinystories/train-first-2MiB.txt", encoding="utf-8").read()
with open(sys.argv[1], "w", encoding="utf-8") as f:
    written = 0
    while written < 1_000_000_000:
        f.write(sample)
        written += len(sample.encode("utf-8"))
PY
fi
rm -rf "$TMP/tok" "$TMP/data"
homellm tokenizer train --input ../shared/data/tinystories/train-first-2MiB.txt --vocab-size 8192 --out "$TMP/tok"
/usr/bin/time -f "wall %e s, peak RSS %M KB" homellm prepare --input "$TMP/corpus.txt" --tokenizer "$TMP/tok" \
  --out "$TMP/data"
ls -l "$TMP/corpus.txt"
