"""Greedy decoding on the CPU with float32 weights against bfloat16 weights (100 new tokens after 59, KV cache),
alternated three times, best of each: `python bench/cpu_bf16_generation.py FAMILY LAYERS WIDTH VOCAB`, e.g.
`gpt2 12 768 50304` (GPT-2 small's shape) or `llama 4 192 1024` (the cpu preset's)."""
import sys
import time

import torch

from homellm.config import ModelConfig, SampleConfig
from homellm.generate import generate_ids
from homellm.model import GPT


def main() -> None:
    family, layers, width, vocab = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    torch.manual_seed(0)
    cfg = ModelConfig(family=family, vocab_size=vocab, n_layer=layers, n_head=width // 64, n_kv_head=width // 64,
                      n_embd=width, block_size=512)
    full = GPT(cfg).eval()
    half = GPT(cfg).eval()
    half.load_state_dict(full.state_dict())
    half.to(torch.bfloat16)
    sample = SampleConfig(temperature=0, max_new_tokens=100)
    rates: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    for _ in range(3):
        for name, model in (("float32", full), ("bfloat16", half)):
            start = time.perf_counter()
            with torch.no_grad():
                n = len(list(generate_ids(model, list(range(1, 60)), sample)))
            rates[name].append(n / (time.perf_counter() - start))
    for name, r in rates.items():
        print(f"{family} {layers} layers x {width} wide, vocabulary {vocab}, {name}: {max(r):.1f} tokens/s")


if __name__ == "__main__":
    main()
