"""The quickstart's training step on 1 and on 2 PyTorch threads, alternated in one process, with the CPU idle and
then with one busy process (a Python loop) beside it: what training's giving threads up to other work buys.
Prints each round's ms per step and the median ratio 2 threads / 1 thread per condition.

    python bench/threads_under_load.py            # idle, then busy
"""
import statistics
import subprocess
import sys
import time

import torch

from homellm.config import preset, replace
from homellm.model import GPT
from homellm.train import make_optimizers, resolve_device, setup_env

model_cfg, train_cfg = preset("arithmetic")
model = GPT(replace(model_cfg, vocab_size=96))
optimizers = make_optimizers(model, train_cfg, resolve_device("cpu"), setup_env(train_cfg).ns_dtype)
x, y = torch.randint(0, 96, (train_cfg.batch_size, 48)), torch.randint(0, 96, (train_cfg.batch_size, 48))


def step() -> None:
    _, loss = model(x, y)
    loss.backward()
    for opt in optimizers:
        opt.step()
        opt.zero_grad(set_to_none=True)


def ms_per_step(threads: int, n: int = 4) -> float:
    torch.set_num_threads(threads)
    t = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - t) / n * 1000


for threads in (1, 2):  # warm-up
    ms_per_step(threads, 2)
for condition in ("idle", "busy"):
    loop = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if condition == "busy" else None
    try:
        ratios = []
        for _ in range(3):
            one, two = ms_per_step(1), ms_per_step(2)
            ratios.append(two / one)
            print(f"{condition}: 1 thread {one:.0f} ms/step, 2 threads {two:.0f} ms/step", flush=True)
        print(f"{condition}: 2 threads take {statistics.median(ratios):.2f}x the time of 1 (median of 3 rounds)")
    finally:
        if loop is not None:
            loop.kill()
