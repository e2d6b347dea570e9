"""The training loss on whole logits against chunked_cross_entropy, at a large vocabulary: peak memory and time of a
training step (forward, backward, AdamW), each mode in its own process, alternated.

    python bench/chunked_loss.py [--vocab 50304] [--batch 8] [--block 256] [--rounds 3] [--steps 8]

The model is small (2 llama layers, 256 wide) so that the logits dominate, as they do for GPT-2's vocabulary at a
GPU's batch. Peak memory is the process's peak RSS (ru_maxrss), so it includes torch, the model and AdamW.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def child(mode: str, vocab: int, batch: int, block: int, steps: int) -> None:
    import torch

    import homellm.model as model_module
    from homellm.config import ModelConfig

    if mode == "whole":
        model_module.CHUNKED_LOSS_VOCAB = vocab + 1  # the path taken below it
    torch.manual_seed(0)
    model = model_module.GPT(ModelConfig(family="llama", vocab_size=vocab, n_layer=2, n_head=4, n_embd=256,
                                         block_size=block))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    idx, targets = torch.randint(0, vocab, (2, batch, block))
    times, losses = [], []
    for _ in range(steps + 2):
        t = time.perf_counter()
        _, loss = model(idx, targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        losses.append(loss.item())
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"mode": mode, "ms": statistics.median(times[2:]) * 1000, "peak_mib": peak_mib,
                      "loss_last": losses[-1]}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--block", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--child", default="")
    a = ap.parse_args()
    if a.child:
        child(a.child, a.vocab, a.batch, a.block, a.steps)
        return
    results: dict[str, list[dict]] = {"whole": [], "chunked": []}
    for r in range(a.rounds):
        for mode in (("whole", "chunked") if r % 2 == 0 else ("chunked", "whole")):
            out = subprocess.run([sys.executable, __file__, "--child", mode, "--vocab", str(a.vocab), "--batch",
                                  str(a.batch), "--block", str(a.block), "--steps", str(a.steps)],
                                 capture_output=True, text=True, check=True).stdout
            results[mode].append(json.loads(out))
            print(out.strip(), flush=True)
    logits_mib = a.batch * a.block * a.vocab * 4 / 2**20
    print(f"vocab {a.vocab}, {a.batch} x {a.block} tokens: one float32 copy of the logits is {logits_mib:.0f} MiB")
    for mode, rs in results.items():
        print(f"{mode:8s} peak RSS median {statistics.median(r['peak_mib'] for r in rs):7.0f} MiB, "
              f"step median {statistics.median(r['ms'] for r in rs):7.1f} ms, last loss {rs[-1]['loss_last']:.4f}")
    whole, chunked = (statistics.median(r["ms"] for r in results[mode]) for mode in ("whole", "chunked"))
    print(f"chunked speed vs whole: {whole / chunked:.2f}x")


if __name__ == "__main__":
    main()
