#!/usr/bin/env bash
# homellm at nanoGPT's CPU example, identical model and batch: char-level tinyshakespeare, GPT-2 family without
# biases, 4 layers, 4 heads, 128 wide, block 64, batch 12, 2000 iterations, no dropout, lr 1e-3 warmup 100
# cosine to 1e-4, beta2 0.99, eval every 250 steps on 20 batches (as nanoGPT's config/train_shakespeare_char.py
# with its README's CPU flags). Run from the repository root with ../shared beside it.
# Extra flags pass through to pretrain (e.g. --dtype float32).
set -euo pipefail
OUT=${OUT:-/tmp/bench-nanogpt}
rm -rf "$OUT"
/usr/bin/time -f "wall %e s, peak RSS %M KB" homellm pretrain --data ../shared/data/tinyshakespeare/input.txt \
  --tokenizer-kind char --out "$OUT" --device cpu --family gpt2 --no-bias --n-layer 4 --n-head 4 --n-embd 128 \
  --block-size 64 --dropout 0 --batch-size 12 --max-steps 2000 --max-time 0 --lr 1e-3 --warmup-steps 100 \
  --min-lr-ratio 0.1 --beta2 0.99 --weight-decay 0.1 --eval-every 250 --eval-batches 20 --log-every 50 \
  --checkpoint-every 2000 --vocab-size 72 "$@"
python bench/summarize.py "$OUT"
