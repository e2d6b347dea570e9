#!/usr/bin/env bash
# Full fine-tuning versus LoRA on a GPT-2-small-sized model (12 layers, 768 wide, block 256) on CPU: trainable
# parameters, peak memory (max RSS) and seconds per step, 4 steps of batch 4 each. The base is a 1-step pretrain
# (the weights' values do not matter for memory); the data are the arithmetic task's chat conversations.
# Run from the repository root with ../shared beside it.
set -euo pipefail
T=${T:-/tmp/bench-sft}
rm -rf "$T" && mkdir -p "$T"
python - "$T/chat.jsonl" <<'PY'
import json, sys
from homellm.tasks import arithmetic
with open(sys.argv[1], "w", encoding="utf-8") as f:
    for r in arithmetic.conversations(arithmetic.generate(2000, seed=0), seed=0):
        f.write(json.dumps(r, ensure_ascii=False) + "\n")
PY
homellm pretrain --preset gpt2-124m --data ../shared/data/tinyshakespeare/input.txt --tokenizer-vocab 4096 \
  --vocab-size 4096 --block-size 256 --out "$T/base" --max-steps 1 --batch-size 1 --grad-accum 1 --eval-every 0 \
  --dtype float32 --no-compile --device cpu 2>/dev/null
COMMON=(--init "$T/base" --init-checkpoint last --data "$T/chat.jsonl" --max-steps 4 --batch-size 4 --eval-every 0
        --log-every 1 --dtype float32 --device cpu)
for mode in full lora; do
  extra=(); [ "$mode" = lora ] && extra=(--lora-rank 8)
  /usr/bin/time -f "$mode: wall %e s, peak RSS %M KB" homellm sft "${COMMON[@]}" "${extra[@]}" --out "$T/$mode" \
    2>&1 | grep -E "trainable|peak RSS|^\{" || true
  python -c "import json,sys; r=[json.loads(l) for l in open('$T/$mode/metrics.jsonl')]; \
print('$mode: s/step (steps 2-4):', round((r[-1]['elapsed_s']-r[0]['elapsed_s'])/(len(r)-1), 2))"
  du -sh "$T/$mode/last/model.safetensors"
done
