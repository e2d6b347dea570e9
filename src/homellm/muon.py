"""Muon with its Newton-Schulz iterations batched over the matrices of one shape.

The update is torch.optim.Muon's with its defaults (Nesterov momentum 0.95, the quintic Newton-Schulz iteration in
bfloat16, the learning rate scaled by sqrt(max(1, rows / cols)), decoupled weight decay), so a run can switch
between the two (bit-identical on CPU, tested; on GPU batched kernels may round differently; on devices without
native bfloat16 the iteration runs in float32: ns_dtype). torch.optim.Muon
orthogonalises one matrix at a time: a small model's 28 matrices cost 28 x 15
small matmuls per step. Stacking the matrices of each shape makes that a few batched matmuls
(bench/optimizer_step_ab.py measures both).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # torch.optim.Muon's (and Keller Jordan's) quintic iteration


def ns_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 as torch.optim.Muon, where the device multiplies it natively (CUDA from Ampere on, a CPU with AMX or
    AVX512-BF16); float32 where it would be emulated: GPUs before Ampere (T4, V100: several times slower), Apple's
    MPS (bfloat16 needs macOS 14), and CPUs without those instructions, where a bfloat16 product of 128 x 512 by
    512 x 128 took 9.4 ms against float32's 0.19 (an AVX2-only AMD EPYC): the quickstart trained at 4,400 tokens/s
    with Muon against AdamW's 10,400."""
    from homellm.train import bf16_cpu, native_bf16  # (train imports this module)

    if native_bf16(device) or (device.type == "cpu" and bf16_cpu()):
        return torch.bfloat16
    return torch.float32


def orthogonalize(g: torch.Tensor, steps: int = 5, eps: float = 1e-7, dtype: torch.dtype = torch.bfloat16
                  ) -> torch.Tensor:
    """A batch (n, rows, cols) of matrices -> about their orthogonal factors U V^T (singular values near 1),
    iterated in `dtype` (ns_dtype of their device)."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype)
    tall = x.size(1) > x.size(2)
    if tall:  # iterate on the smaller Gram matrix
        x = x.mT
    x = x / x.flatten(1).norm(dim=1).clamp(min=eps)[:, None, None]  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


class Muon(torch.optim.Optimizer):
    """Momentum, orthogonalised: for 2-D hidden matrices only (embeddings, head and gains go to AdamW)."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 0.02, weight_decay: float = 0.0,
                 momentum: float = 0.95, ns_steps: int = 5, ns_dtype: torch.dtype | None = None):
        self.ns_dtype = ns_dtype  # None: its device's choice (a run of several GPUs gives the one they agree on)
        # torch.optim.Muon's group fields too, fixed at the values this class computes, so that it can load our state.
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, ns_steps=ns_steps,
                                      nesterov=True, ns_coefficients=NS_COEFFICIENTS, eps=1e-7, adjust_lr_fn=None))
        for group in self.param_groups:
            if any(p.dim() != 2 for p in group["params"]):
                raise ValueError("Muon takes 2-D matrices only")

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            # The state key is torch.optim.Muon's, so either one resumes the other's checkpoints.
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            bufs = [self.state[p]["momentum_buffer"] for p in params]
            torch._foreach_lerp_(bufs, grads, 1 - group["momentum"])
            updates = torch._foreach_lerp(grads, bufs, group["momentum"])  # Nesterov
            if group["weight_decay"]:
                torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
            by_shape: dict[torch.Size, list[int]] = {}
            for i, p in enumerate(params):
                by_shape.setdefault(p.shape, []).append(i)
            dtype = self.ns_dtype or ns_dtype(params[0].device)  # once a step: on CUDA it asks the driver
            for shape, index in by_shape.items():
                ortho = orthogonalize(torch.stack([updates[i] for i in index]), group["ns_steps"], dtype=dtype)
                scale = group["lr"] * math.sqrt(max(1.0, shape[0] / shape[1]))
                torch._foreach_add_([params[i] for i in index], list(ortho.to(params[index[0]].dtype).unbind()),
                                    alpha=-scale)
