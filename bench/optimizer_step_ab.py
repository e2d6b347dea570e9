"""A/B of optimizer kernels, alternated in one process so machine noise hits both alike; prints each one's median
ms per training step and its speedup over the first (the median of per-round ratios).

    python bench/optimizer_step_ab.py foreach fused     # AdamW's CPU kernels at nanoGPT's shakespeare-char size
    python bench/optimizer_step_ab.py torch-muon muon   # torch.optim.Muon vs homellm.muon.Muon (batched
                                                        # Newton-Schulz), the `arithmetic` preset's model and batch
"""
import statistics
import sys
import time

import torch

from homellm.config import ModelConfig, preset, replace
from homellm.model import GPT
from homellm.train import make_optimizers

kinds = sys.argv[1:] or ["foreach", "fused"]
if any("muon" in k for k in kinds):
    cfg = replace(preset("arithmetic")[0], vocab_size=64)
    shape = (preset("arithmetic")[1].batch_size, 48)
else:
    cfg = ModelConfig(family="gpt2", vocab_size=72, n_layer=4, n_head=4, n_kv_head=4, n_embd=128, block_size=64,
                      bias=False, dropout=0.0)
    shape = (12, 64)
x, y = torch.randint(0, 60, shape), torch.randint(0, 60, shape)
reps = 10 if shape[0] < 50 else 3  # steps per timed window


def setup(kind: str) -> tuple[GPT, list[torch.optim.Optimizer]]:
    torch.manual_seed(0)
    model = GPT(cfg)
    if "muon" not in kind:
        return model, [torch.optim.AdamW(model.parameters(), lr=1e-3, **{kind: True})]
    muon, adam = make_optimizers(model, preset("arithmetic")[1], torch.device("cpu"))  # what training builds
    if kind == "torch-muon":
        muon = torch.optim.Muon(muon.param_groups[0]["params"], lr=muon.defaults["lr"],
                                weight_decay=muon.defaults["weight_decay"])
    return model, [muon, adam]


def step(model: GPT, opts: list[torch.optim.Optimizer]) -> None:
    _, loss = model(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    for opt in opts:
        opt.step()
        opt.zero_grad(set_to_none=True)


setups = {k: setup(k) for k in kinds}
ms: dict[str, list[float]] = {k: [] for k in kinds}
for _ in range(40):
    for k in kinds:
        t = time.perf_counter()
        for _ in range(reps):
            step(*setups[k])
        ms[k].append((time.perf_counter() - t) / reps * 1000)
for k in kinds:  # the first 5 rounds are warm-up
    ratio = statistics.median(a / b for a, b in zip(ms[kinds[0]][5:], ms[k][5:]))
    print(f"{k}: median {statistics.median(ms[k][5:]):.1f} ms/step, {ratio:.3f}x {kinds[0]}")
