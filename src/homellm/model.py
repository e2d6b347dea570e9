"""The model: one decoder-only Transformer, two families chosen by config.

gpt2:  LayerNorm, learned positions, GELU MLP (GPT-2).
llama: RMSNorm, rotary positions (Hugging Face's rotate-half convention), grouped-query attention, SwiGLU MLP.

Module names follow Hugging Face's Llama (embed_tokens, layers.N.self_attn.q_proj, ..., norm, lm_head), so an
export is a plain name map. The model is pure: the KV cache is an argument of forward, and torch.compile, DDP
and autocast are applied from outside.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from homellm.config import ModelConfig


class KVCache:
    """Keys and values of every layer for incremental decoding, preallocated for `max_len` positions.

    `pos` is the number of positions already cached; forward writes the new ones after it and advances it.
    A server batching requests of different lengths sets `pos` to a tensor (B,) of per-row lengths instead; each
    forward then takes one new token per row, written at that row's own position (homellm.serve), and sets `end`,
    the longest row's length after it, which every layer's keys are cut to."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device: torch.device | str,
                 dtype: torch.dtype = torch.float32):
        head_dim = cfg.n_embd // cfg.n_head
        shape = (cfg.n_layer, batch_size, cfg.n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.pos: int | torch.Tensor = 0
        self.end = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(self.pos, torch.Tensor):  # per-row lengths: row b's one new position goes at pos[b]
            B, end = k.size(0), self.end
            if end > self.max_len:
                raise ValueError(f"KV cache holds {self.max_len} positions; {end} requested")
            rows = torch.arange(B, device=k.device)
            # Indexed writes do not cast as slice writes do (new keys are bfloat16 under autocast, the cache may not be)
            self.k[layer, rows, :, self.pos] = k[:, :, 0].to(self.k.dtype)
            self.v[layer, rows, :, self.pos] = v[:, :, 0].to(self.v.dtype)
            return self.k[layer, :B, :, :end], self.v[layer, :B, :, :end]
        end = self.pos + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} requested")
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep the batch rows in `index` (beam search reorders its beams every step)."""
        self.k = self.k[:, index]
        self.v = self.v[:, index]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.family == "llama":
        return RMSNorm(cfg.n_embd, cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


def rope_tables(cfg: ModelConfig, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (length, head_dim), laid out as Hugging Face's Llama does (two halves repeated)."""
    head_dim = cfg.n_embd // cfg.n_head
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.size(-1) // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head = cfg.n_head, cfg.n_kv_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.dropout = cfg.dropout
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * self.head_dim, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * self.head_dim, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * self.head_dim, bias=cfg.bias)
        self.o_proj = nn.Linear(cfg.n_head * self.head_dim, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: KVCache | None, documents_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        past = 0
        if cache is not None:
            past = cache.pos
            k, v = cache.update(self.layer, k, v)
        if documents_mask is not None:  # packed rows: causal within each document (GPT.forward builds it)
            mask, causal = documents_mask, False
        elif isinstance(past, torch.Tensor):  # rows of different lengths: row b sees its first past[b] + 1 keys
            mask = (torch.arange(k.size(2), device=x.device) <= past[:, None])[:, None, None, :]  # (B, 1, 1, L)
            causal = False
        elif past == 0:
            mask, causal = None, T > 1
        elif T == 1:
            mask, causal = None, False  # one new token may attend to everything cached
        else:  # several new tokens after a cached prefix: causal, shifted by the prefix length
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            causal = False
        # The CPU's attention kernels in bfloat16 run their backward pass about ten times slower than in float32
        # (measured: 0.93 against 0.09 s in 10 steps of the quickstart's model), more than the matrix products win
        # in it (bench/README.md), so under the CPU's autocast attention alone stays in float32.
        upcast = q.device.type == "cpu" and torch.is_autocast_enabled("cpu")
        if upcast:
            q, k, v = q.float(), k.float(), v.float()
        grouped = self.n_kv_head != self.n_head
        if grouped and not _kernel_takes_groups(q, mask):
            k, v = (t.repeat_interleave(self.n_head // self.n_kv_head, dim=1) for t in (k, v))
            grouped = False
        with torch.autocast("cpu", enabled=False) if upcast else contextlib.nullcontext():
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                               dropout_p=self.dropout if self.training else 0.0, enable_gqa=grouped)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


def _kernel_takes_groups(q: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether the attention kernel torch picks takes grouped key/value heads as they are. On CUDA only flash
    attention does, and it takes no mask (packed documents, serve's rows), no float32 and no GPU before Ampere; the
    memory-efficient kernel takes those but not groups, so grouped heads fell to the math kernel, which keeps every
    score for the backward pass (T x T per head: out of memory at long contexts). Repeating the key/value heads
    keeps the memory-efficient kernel. (The CPU's kernels take groups.)"""
    if q.device.type != "cuda":
        return True
    return mask is None and q.dtype != torch.float32 and torch.cuda.get_device_capability(q.device) >= (8, 0)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu = cfg.family == "llama"
        if self.swiglu:
            self.gate_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=cfg.bias)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = make_norm(cfg)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: KVCache | None, documents_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.dropout(self.self_attn(self.input_layernorm(x), rope, cache, documents_mask))
        return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))


# From this vocabulary size on, the training loss never holds the logits of a whole batch: GPT-2's 50,257 ids at
# batch 16 x 1,024 are 3.3 GB in float32, and cross-entropy keeps a copy and its gradient besides. Below it, the
# chunks' Python loop costs more than the memory it saves (bench/README.md).
CHUNKED_LOSS_VOCAB = 8192


def _chunk_rows(vocab: int) -> int:
    return max(1, 2**26 // vocab)  # 64M logits (256 MB in float32) at a time: smaller chunks ran slower on a CPU


def _chunk_loss(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The summed loss of rows x (n, d) against targets (-100 skipped), and their log-probabilities (n, V)."""
    logits = (x @ weight.t()).float()
    logprobs = logits.sub_(logits.logsumexp(dim=-1, keepdim=True))  # in place: one chunk-sized tensor, not two
    picked = logprobs.gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    return -(picked * (targets != -100)).sum(), logprobs


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of x @ weight.T, with both gradients computed chunk by chunk in the forward pass (the
    gradient of the logits is softmax minus one-hot, known there): no chunk's logits outlive it, and nothing is
    computed twice. The backward pass only scales the saved gradients."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                grad_rows: torch.Tensor | None) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        grad_x = torch.empty_like(x) if x.requires_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if weight.requires_grad else None
        rows = _chunk_rows(weight.size(0))
        for start in range(0, x.size(0), rows):
            xs, ts = x[start:start + rows], targets[start:start + rows]
            loss, logprobs = _chunk_loss(xs, weight, ts)
            total += loss
            grad = logprobs.exp_()  # softmax, in place of the log-probabilities
            grad[torch.arange(ts.size(0), device=x.device), ts.clamp(min=0)] -= 1
            grad = grad.mul_((ts != -100)[:, None]).to(xs.dtype)
            if grad_x is not None:
                grad_x[start:start + rows] = grad @ weight
            if grad_w is not None:
                # Each row adds up to |x| here, so a float16 sum over thousands of rows could pass 65,504 and turn
                # inf, which the grad scaler, applied only in backward, could never bring down: the rows are
                # summed divided by their count, bounded by the largest |x|, then multiplied back in float32.
                if grad_rows is None:
                    grad_w += (grad.t() @ (xs / xs.size(0))).float() * xs.size(0)
                else:  # only these rows' gradient is wanted: a matmul of their size, not the vocabulary's
                    grad_w[grad_rows] += (grad[:, grad_rows].t() @ (xs / xs.size(0))).float() * xs.size(0)
        ctx.save_for_backward(grad_x, grad_w)
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_x, grad_w = ctx.saved_tensors
        return (None if grad_x is None else grad_x * grad_total.to(grad_x.dtype),
                None if grad_w is None else grad_w * grad_total, None, None)


def chunked_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          grad_rows: torch.Tensor | None = None) -> torch.Tensor:
    """The summed cross-entropy of the logits x (n, d) @ weight.T (V, d) against targets (n,), -100 skipped, equal
    to F.cross_entropy's up to rounding, holding the logits of at most 64M (n, V) entries at a time however large
    n * V is: one float32 chunk of 256 MB, and its half-precision copy under autocast. `grad_rows`: the only rows of
    weight whose gradient is used (the others' is left 0), where weight is a frozen one plus a few trained rows."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(x, weight, targets, grad_rows)
    rows = _chunk_rows(weight.size(0))
    return sum(_chunk_loss(x[s:s + rows], weight, targets[s:s + rows])[0] for s in range(0, x.size(0), rows))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        if cfg.family == "gpt2":
            self.embed_positions = nn.Embedding(cfg.block_size, cfg.n_embd)
        else:
            cos, sin = rope_tables(cfg, cfg.block_size)
            # Not saved in checkpoints: derived from the config.
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """All initialisation in one place: GPT-2's normal(0.02), with the projections that write into the
        residual stream scaled by 1/sqrt(2 * n_layer) so its variance does not grow with depth."""
        std = 0.02
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() == 1:  # norm gains
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.cfg.n_layer))
            else:
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None,
                documents: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """idx (B, T) token ids -> logits (B, T, vocab) and, given targets (-100 = not trained), the mean loss.

        Given targets with a vocabulary of CHUNKED_LOSS_VOCAB ids or more, the logits are None: the loss is
        computed a chunk of rows at a time, without them (chunked_cross_entropy), unless a hook adapts the head.

        With a cache, idx holds only the new tokens; their positions start at cache.pos (per row when it is a
        tensor: then T is 1). `documents` (B, T) packs several documents in a row: a run of equal numbers is one
        document, whose positions restart at 0 and whose attention stays inside it, so each document is computed
        as if it were alone at the start of a row."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        per_row = isinstance(start, torch.Tensor)
        if per_row:
            assert T == 1, "a cache with per-row lengths takes one new token per row"
        assert documents is None or cache is None, "packed documents are for training, without a cache"
        end = int(start.max()) + 1 if per_row else start + T
        if per_row:
            # Read once here for every layer: int() of a device tensor waits for the GPU, once per layer if each
            # layer read it for itself.
            cache.end = end
        if end > self.cfg.block_size:
            raise ValueError(f"sequence of {end} tokens exceeds block_size {self.cfg.block_size}")
        x = self.embed_tokens(idx)
        rope, documents_mask = None, None
        if documents is not None:
            steps = torch.arange(T, device=idx.device)
            first = torch.ones_like(documents, dtype=torch.bool)
            first[:, 1:] = documents[:, 1:] != documents[:, :-1]
            positions = steps - torch.where(first, steps, 0).cummax(dim=1).values  # (B, T): 0 at each start
            run = first.cumsum(dim=1)  # a number that comes back later in the row starts a new document too
            documents_mask = ((run[:, :, None] == run[:, None, :]) & (steps[:, None] >= steps))[:, None]
        elif per_row:
            positions = start[:, None]  # (B, 1): each row's own position
        else:
            positions = torch.arange(start, end, device=idx.device)  # (T,)
        if self.cfg.family == "gpt2":
            x = x + self.embed_positions(positions)  # broadcasts over rows when positions is (T,)
        elif positions.dim() == 2:  # (B, 1, T, head_dim): per-row positions, broadcast over heads
            rope = tuple(t[positions][:, None].to(x.dtype) for t in (self.rope_cos, self.rope_sin))
        else:  # (T, head_dim): slices of the tables, no copy in training
            rope = (self.rope_cos[start:end].to(x.dtype), self.rope_sin[start:end].to(x.dtype))
        x = self.dropout(x)
        for block in self.layers:
            x = block(x, rope, cache, documents_mask)
        if cache is not None:
            cache.pos += T
        x = self.norm(x)
        if targets is None:
            return self.lm_head(x), None
        # Sum over trained tokens divided by their count (at least 1), so a batch with every target masked
        # (possible in SFT) gives loss 0 instead of NaN.
        flat = targets.reshape(-1)
        count = (flat != -100).sum().clamp(min=1)
        # A forward hook on the head (a LoRA adapter there) changes its output, which the chunks never compute.
        # `lm_head.grad_rows`, where set (LoRA's trained token rows), are the only rows of its weight that train.
        if self.cfg.vocab_size >= CHUNKED_LOSS_VOCAB and not self.lm_head._forward_hooks:
            return None, chunked_cross_entropy(x.reshape(-1, x.size(-1)), self.lm_head.weight, flat,
                                               getattr(self.lm_head, "grad_rows", None)) / count
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), flat, ignore_index=-100,
                               reduction="sum")
        return logits, loss / count

    def num_params(self, embeddings: bool = True) -> int:
        """Parameters counted once (tied weights are one tensor). Without embeddings: the count FLOPs scale with."""
        n = sum(p.numel() for p in self.parameters())
        if not embeddings:
            n -= self.embed_tokens.weight.numel()
            if self.cfg.family == "gpt2":
                n -= self.embed_positions.weight.numel()
            if self.cfg.tie_embeddings:
                n += self.lm_head.weight.numel()  # the output projection is still a matmul per token
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward), as PaLM counts them: 6 per weight (2 forward, 2 for its
        input's gradient, 2 for its own) and attention's 12 * L * d * T. A frozen weight (LoRA's base) has no
        gradient of its own: 4."""
        T = seq_len or self.cfg.block_size
        embeddings = {id(self.embed_tokens.weight)} | (
            {id(self.embed_positions.weight)} if self.cfg.family == "gpt2" else set())
        frozen = sum(p.numel() for p in self.parameters() if not p.requires_grad and id(p) not in embeddings)
        if self.cfg.tie_embeddings and not self.lm_head.weight.requires_grad:
            frozen += self.lm_head.weight.numel()  # the head's matmul, on the embedding's weight
        return 6 * self.num_params(embeddings=False) - 2 * frozen + 12 * self.cfg.n_layer * self.cfg.n_embd * T
