"""What training the chat tokens' rows costs a LoRA run: seconds per step and peak memory, with and without them.

    python bench/lora_token_rows.py [--vocab 32768] [--steps 7]

A llama of 4 layers, 512 wide, over a vocabulary large enough for the chunked loss, LoRA rank 8 on every
projection, batch 8 x 256 tokens, AdamW, float32 on CPU. "With rows" adds <|im_start|>'s and <|im_end|>'s embedding
and head rows (sft's LoraSpec.tokens): the head's weight is then the base's plus those rows, a copy per step, and
the chunked loss computes those rows' gradient alone (lm_head.grad_rows).

Time: both models in one process, their steps alternating, so other work on the machine slows both alike; the
median step after the first. Memory: each setting alone in a process of its own (peak RSS is per process).
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def models(vocab: int, tied: bool, settings: list[list[int]]) -> list:
    import torch

    from homellm.config import ModelConfig
    from homellm.lora import LoraSpec, attach_lora
    from homellm.model import GPT

    torch.manual_seed(0)
    torch.set_num_threads(2)
    out = []
    for tokens in settings:
        model = GPT(ModelConfig(family="llama", vocab_size=vocab, n_layer=4, n_head=8, n_kv_head=8, n_embd=512,
                                intermediate_size=1376, block_size=256, tie_embeddings=tied))
        lora = attach_lora(model, LoraSpec(rank=8, tokens=tokens))
        out.append((model, torch.optim.AdamW(lora.parameters(), lr=1e-3)))
    return out


def step(model, opt, x, y) -> float:
    start = time.perf_counter()
    _, loss = model(x, y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--memory-of", default="")
    a = ap.parse_args()
    x, y = torch.randint(0, a.vocab, (2, 8, 256), generator=torch.Generator().manual_seed(0))
    if a.memory_of:  # a child: one setting's peak RSS
        tokens, tied = json.loads(a.memory_of)
        [(model, opt)] = models(a.vocab, tied, [tokens])
        for _ in range(3):
            step(model, opt, x, y)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        return
    # Before this process holds any model: a child's peak RSS starts at its parent's (Linux carries it over fork).
    rss = {(tied, len(tokens)): float(subprocess.run(
        [sys.executable, __file__, "--vocab", str(a.vocab), "--memory-of", json.dumps([tokens, tied])],
        capture_output=True, text=True, check=True).stdout.split()[-1])
        for tied in (True, False) for tokens in ([], [1, 2])}
    print(f"vocabulary {a.vocab:,}; s/step: median of {a.steps - 1} steps after the first, alternating\n")
    print("| head | rows | s/step | peak RSS |\n|---|---|---|---|")
    for tied in (True, False):
        pair = models(a.vocab, tied, [[], [1, 2]])
        times: list[list[float]] = [[], []]
        for _ in range(a.steps):
            for i, (model, opt) in enumerate(pair):
                times[i].append(step(model, opt, x, y))
        medians = [statistics.median(t[1:]) for t in times]
        for i, tokens in enumerate([[], [1, 2]]):
            ratio = f" ({medians[1] / medians[0]:.2f}x)" if tokens else ""
            print(f"| {'tied' if tied else 'untied'} | {'chat tokens' if tokens else 'none'} | {medians[i]:.3f}{ratio} "
                  f"| {rss[tied, len(tokens)]:,.0f} MiB |")


if __name__ == "__main__":
    main()
