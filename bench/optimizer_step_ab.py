"""A/B of AdamW's CPU kernels at nanoGPT's shakespeare-char size, alternated in one process so machine noise hits
both alike: `python bench/optimizer_step_ab.py foreach fused` prints each one's median ms per training step and
its speedup over the first (the median of per-round ratios)."""
import statistics
import sys
import time

import torch

from homellm.config import ModelConfig
from homellm.model import GPT

cfg = ModelConfig(family="gpt2", vocab_size=72, n_layer=4, n_head=4, n_kv_head=4, n_embd=128, block_size=64,
                  bias=False, dropout=0.0)
x, y = torch.randint(0, 65, (12, 64)), torch.randint(0, 65, (12, 64))


def setup(kind: str) -> tuple[GPT, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = GPT(cfg)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3, **{kind: True})


def step(model: GPT, opt: torch.optim.Optimizer) -> None:
    _, loss = model(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


kinds = sys.argv[1:] or ["foreach", "fused"]
setups = {k: setup(k) for k in kinds}
ms: dict[str, list[float]] = {k: [] for k in kinds}
for _ in range(40):
    for k in kinds:
        t = time.perf_counter()
        for _ in range(10):
            step(*setups[k])
        ms[k].append((time.perf_counter() - t) / 10 * 1000)
for k in kinds:  # the first 5 rounds are warm-up
    ratio = statistics.median(a / b for a, b in zip(ms[kinds[0]][5:], ms[k][5:]))
    print(f"{k}: median {statistics.median(ms[k][5:]):.1f} ms/step, {ratio:.3f}x {kinds[0]}")
