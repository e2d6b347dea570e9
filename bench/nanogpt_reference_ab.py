"""homellm's training step against a nanoGPT-style reference step written here, alternated in one process so the
machine's noise (its speed moves by half within an hour) hits both alike. nanoGPT itself is on no package
registry, so the 1.5x target's baseline (12,500 tok/s, measured once at another time) cannot be rerun beside us;
this reference does the same maths nanoGPT's CPU example does:

- GPT-2 blocks without biases, one fused q/k/v Linear, `scaled_dot_product_attention(is_causal=True)`;
- exact-erf GELU (`nn.GELU()`), tied embeddings, logits at every position, cross-entropy;
- AdamW with foreach kernels, weight decay on 2-D weights only, gradient clipping at 1.0.

homellm's step is the one `homellm pretrain` runs at that size: `GPT` and `make_optimizers` (fused AdamW), with
the tanh GELU of Hugging Face's GPT-2 (what its export must match); on a CPU with bfloat16 matrix instructions (AMX,
AVX512-BF16) also as pretrain's `--dtype auto` runs it there, in bfloat16 autocast (nanoGPT's CPU example runs float32).

    python bench/nanogpt_reference_ab.py            # prints median ms per step, tokens/s and the ratio
    python bench/nanogpt_reference_ab.py --compile  # adds both steps under torch.compile (`pretrain --compile`)

nanoGPT's CPU example turns compile off (`--compile=False`); the compiled reference shows what the same maths gains
from it, so that homellm compiled is also compared with like.
"""
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from homellm.config import ModelConfig, TrainConfig
from homellm.model import GPT
from homellm.train import make_optimizers, pick_dtype

N_LAYER, N_HEAD, N_EMBD, BLOCK, BATCH, VOCAB = 4, 4, 128, 64, 12, 72


class RefBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(N_EMBD, bias=False), nn.LayerNorm(N_EMBD, bias=False)
        self.c_attn = nn.Linear(N_EMBD, 3 * N_EMBD, bias=False)
        self.c_proj = nn.Linear(N_EMBD, N_EMBD, bias=False)
        self.fc, self.proj = nn.Linear(N_EMBD, 4 * N_EMBD, bias=False), nn.Linear(4 * N_EMBD, N_EMBD, bias=False)
        self.gelu = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, N_HEAD, C // N_HEAD).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).contiguous().view(B, T, C)
        x = x + self.c_proj(y)
        return x + self.proj(self.gelu(self.fc(self.ln_2(x))))


class RefGPT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(VOCAB, N_EMBD), nn.Embedding(BLOCK, N_EMBD)
        self.blocks = nn.ModuleList(RefBlock() for _ in range(N_LAYER))
        self.ln_f = nn.LayerNorm(N_EMBD, bias=False)
        self.lm_head = nn.Linear(N_EMBD, VOCAB, bias=False)
        self.lm_head.weight = self.wte.weight
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * N_LAYER) if name.endswith(("c_proj.weight", "proj.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1)))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, VOCAB), targets.view(-1))


def reference() -> tuple[nn.Module, list[torch.optim.Optimizer]]:
    torch.manual_seed(0)
    model = RefGPT()
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return model, [torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.99), foreach=True)]


def homellm() -> tuple[nn.Module, list[torch.optim.Optimizer]]:
    torch.manual_seed(0)
    cfg = ModelConfig(family="gpt2", vocab_size=VOCAB, n_layer=N_LAYER, n_head=N_HEAD, n_kv_head=N_HEAD,
                      n_embd=N_EMBD, block_size=BLOCK, bias=False, dropout=0.0)
    model = GPT(cfg)
    train_cfg = TrainConfig(optimizer="adamw", lr=1e-3, beta2=0.99, weight_decay=0.1)
    return model, make_optimizers(model, train_cfg, torch.device("cpu"))


def step(model: nn.Module, opts: list[torch.optim.Optimizer], x: torch.Tensor, y: torch.Tensor,
         bf16: bool = False) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(x, y)
    loss = out[1] if isinstance(out, tuple) else out
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    for opt in opts:
        opt.step()
        opt.zero_grad(set_to_none=True)


def main() -> None:
    x, y = torch.randint(0, VOCAB, (BATCH, BLOCK)), torch.randint(0, VOCAB, (BATCH, BLOCK))
    runs = {"nanoGPT-style reference": reference(), "homellm float32": homellm()}
    auto = pick_dtype("auto", torch.device("cpu"), train_width=N_EMBD) == torch.bfloat16  # what pretrain does here
    if auto:
        runs["homellm auto (bfloat16 autocast)"] = homellm()
    if "--compile" in sys.argv[1:]:
        for name, (model, opts) in [("nanoGPT-style reference, compiled", reference()),
                                    ("homellm auto (bfloat16 autocast), compiled" if auto else
                                     "homellm float32, compiled", homellm())]:
            runs[name] = (torch.compile(model), opts)
            t = time.perf_counter()
            for _ in range(3):  # compiled here, before the timing
                step(*runs[name], x, y, bf16="bfloat16" in name)
            print(f"{name}: compiled in {time.perf_counter() - t:.1f} s", flush=True)
    ms: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(45):  # 45 rounds of 10 steps each, alternated; the first 5 are warm-up
        for name, (model, opts) in runs.items():
            t = time.perf_counter()
            for _ in range(10):
                step(model, opts, x, y, bf16="bfloat16" in name)
            ms[name].append((time.perf_counter() - t) / 10 * 1000)
    first = next(iter(runs))
    for name in runs:
        ratio = statistics.median(a / b for a, b in zip(ms[first][5:], ms[name][5:]))
        median = statistics.median(ms[name][5:])
        print(f"{name}: median {median:.1f} ms/step = {BATCH * BLOCK / median * 1000:,.0f} tok/s, "
              f"{ratio:.3f}x the reference")


if __name__ == "__main__":
    main()
