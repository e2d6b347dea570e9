"""Model invariants on tiny CPU models."""

import math

import pytest
import torch
import torch.nn.functional as F

from homellm.config import ModelConfig
from homellm.model import GPT, KVCache

FAMILIES = ["gpt2", "llama"]


def tiny(family: str, **kw) -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig(family=family, vocab_size=96, n_layer=2, n_head=4, n_embd=32, block_size=32, **kw)
    return GPT(cfg).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_initial_loss_is_near_uniform(family):
    model = tiny(family)
    g = torch.Generator().manual_seed(1)
    idx, targets = torch.randint(0, 96, (2, 4, 32), generator=g)
    _, loss = model(idx, targets)
    assert abs(loss.item() - math.log(96)) < 0.03  # (measured 0.009-0.014; 2.5x the init's std gave 0.04-0.1)


@pytest.mark.parametrize("family", FAMILIES)
def test_future_tokens_never_change_past_logits(family):
    model = tiny(family, n_kv_head=2) if family == "llama" else tiny(family)
    idx = torch.randint(0, 96, (2, 20))
    changed = idx.clone()
    changed[:, 12:] = torch.randint(0, 96, (2, 8))
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_matches_full_forward(family):
    model = tiny(family, n_kv_head=1) if family == "llama" else tiny(family)
    idx = torch.randint(0, 96, (3, 24))
    full, _ = model(idx)
    cache = KVCache(model.cfg, 3, 32, "cpu")
    parts = [model(idx[:, :10], cache=cache)[0]]  # prefill
    parts.append(model(idx[:, 10:15], cache=cache)[0])  # several tokens after a prefix
    for t in range(15, 24):  # one at a time
        parts.append(model(idx[:, t:t + 1], cache=cache)[0])
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-4)
    assert cache.pos == 24


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_documents_compute_as_if_each_were_alone(family):
    model = tiny(family, n_kv_head=2) if family == "llama" else tiny(family)
    g = torch.Generator().manual_seed(3)
    lengths = [[7, 12, 5, 8], [32], [1, 30, 1]]  # a row may hold one document, and documents of one token
    rows, documents = torch.randint(0, 96, (3, 32), generator=g), torch.zeros(3, 32, dtype=torch.long)
    for r, row in enumerate(lengths):
        documents[r] = torch.repeat_interleave(torch.arange(len(row)) + 10 * r, torch.tensor(row))
    packed, _ = model(rows, documents=documents)
    for r, row in enumerate(lengths):
        start = 0
        for n in row:
            alone, _ = model(rows[r:r + 1, start:start + n])
            torch.testing.assert_close(packed[r:r + 1, start:start + n], alone, atol=1e-5, rtol=1e-4)
            start += n
    # The same rows without document numbers are one sequence each: later documents see earlier ones.
    assert not torch.allclose(model(rows)[0][0, 7:], packed[0, 7:])


@pytest.mark.parametrize("family", FAMILIES)
def test_overfits_one_batch(family):
    model = tiny(family).train()
    idx = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


def test_fully_masked_targets_give_zero_loss_not_nan():
    model = tiny("llama").train()
    idx = torch.randint(0, 96, (2, 8))
    _, loss = model(idx, torch.full_like(idx, -100))
    loss.backward()
    assert loss.item() == 0.0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_masked_targets_are_ignored():
    model = tiny("llama")
    idx = torch.randint(0, 96, (1, 8))
    targets = idx.clone()
    targets[:, :4] = -100
    logits, loss = model(idx, targets)
    expected = torch.nn.functional.cross_entropy(logits[0, 4:], idx[0, 4:])
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("tied", [True, False])
def test_a_large_vocabulary_trains_on_the_chunked_loss_as_on_whole_logits(tied, monkeypatch):
    """From CHUNKED_LOSS_VOCAB ids on, the loss never holds a batch's logits: its value and every gradient equal
    F.cross_entropy on the whole logits; masked targets count for nothing, in several chunks and in no-grad
    evaluation alike."""
    import homellm.model as model_module

    torch.manual_seed(0)
    cfg = ModelConfig(family="llama", vocab_size=model_module.CHUNKED_LOSS_VOCAB, n_layer=1, n_head=2, n_embd=16,
                      block_size=32, tie_embeddings=tied)
    model = GPT(cfg)
    idx = torch.randint(0, cfg.vocab_size, (3, 32))
    targets = torch.randint(0, cfg.vocab_size, (3, 32))
    targets[0, :10] = -100
    monkeypatch.setattr(model_module, "_chunk_rows", lambda vocab: 7)  # 96 rows in 14 chunks, the last short
    logits, loss = model(idx, targets)
    assert logits is None
    loss.backward()
    chunked = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    whole = F.cross_entropy(model(idx)[0].flatten(0, 1), targets.flatten(), ignore_index=-100)
    whole.backward()
    torch.testing.assert_close(loss, whole)
    for n, p in model.named_parameters():
        torch.testing.assert_close(chunked[n], p.grad, msg=n)
    with torch.no_grad():
        torch.testing.assert_close(model(idx, targets)[1], whole)
    model.requires_grad_(False)
    model.lm_head.weight.requires_grad_(True)  # a frozen body (LoRA freezes the head instead): x needs no gradient
    _, loss = model(idx, targets)
    loss.backward()
    assert model.lm_head.weight.grad is not None
    if not tied:  # LoRA's case: the head frozen, the body trained
        model.requires_grad_(True)
        model.lm_head.weight.requires_grad_(False)
        model.zero_grad()
        model(idx, targets)[1].backward()
        assert model.lm_head.weight.grad is None and model.norm.weight.grad is not None


def test_the_chunked_loss_under_bfloat16_autocast_matches_whole_logits():
    import homellm.model as model_module

    torch.manual_seed(0)
    model = GPT(ModelConfig(family="gpt2", vocab_size=model_module.CHUNKED_LOSS_VOCAB, n_layer=1, n_head=2,
                            n_embd=16, block_size=16))
    idx, targets = torch.randint(0, model.cfg.vocab_size, (2, 2, 16))
    grads = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, chunked = model(idx, targets)
        assert logits is None  # the chunks ran
        chunked.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        model.zero_grad()
        whole = F.cross_entropy(model(idx)[0].flatten(0, 1).float(), targets.flatten())
        whole.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(chunked, whole, atol=2e-3, rtol=2e-3)
    assert all(a.dtype == torch.float32 for a in grads[0])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=5e-2)


def test_the_chunked_loss_gradient_stays_finite_in_float16():
    """Under float16 autocast (auto on a T4 or V100) a chunk summed thousands of rows' gradients in a float16 matmul:
    past 65,504 the head's gradient was inf at any loss scale, so the grad scaler skipped every step from then on.
    Here 8,192 rows of one target with a feature of 10 sum to -81,920 before the mean."""
    from homellm.model import CHUNKED_LOSS_VOCAB, chunked_cross_entropy

    torch.manual_seed(0)
    n, vocab = 8192, CHUNKED_LOSS_VOCAB
    x = torch.randn(n, 16)
    x[:, 0] = 10.0
    weight = (torch.randn(vocab, 16) * 0.02).requires_grad_()
    targets = torch.full((n,), 5)
    with torch.autocast("cpu", dtype=torch.float16):
        (chunked_cross_entropy(x, weight, targets) / n).backward()
    got = weight.grad.clone()
    weight.grad = None
    F.cross_entropy(x @ weight.t(), targets).backward()  # float32, whole logits
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, weight.grad, atol=1e-2, rtol=1e-2)


def test_parameter_count_and_tying():
    tied = tiny("gpt2")
    untied = tiny("gpt2", tie_embeddings=False)
    assert untied.num_params() - tied.num_params() == 96 * 32
    assert tied.lm_head.weight is tied.embed_tokens.weight
    # Non-embedding count: 2 layers * (4 d^2 attention + 8 d^2 MLP + norms) + final norm + lm_head.
    d = 32
    per_layer = 4 * d * d + 8 * d * d + 2 * d  # two LayerNorms with gains only (bias=False)
    assert tied.num_params(embeddings=False) == 2 * per_layer + d + 96 * d
    assert tied.flops_per_token() == 6 * tied.num_params(embeddings=False) + 12 * 2 * 32 * 32
    # LoRA's frozen base: 4 FLOPs per weight (no weight gradient), so MFU is not overstated by half
    tied.requires_grad_(False)
    assert tied.flops_per_token() == 4 * tied.num_params(embeddings=False) + 12 * 2 * 32 * 32
    untied.requires_grad_(False)
    untied.layers[0].mlp.up_proj.weight.requires_grad_(True)
    assert untied.flops_per_token() == (4 * untied.num_params(embeddings=False) + 12 * 2 * 32 * 32
                                        + 2 * untied.layers[0].mlp.up_proj.weight.numel())


def test_grouped_query_attention_shrinks_kv_projections():
    full = tiny("llama")
    gqa = tiny("llama", n_kv_head=1)
    assert gqa.layers[0].self_attn.k_proj.weight.shape == (8, 32)
    assert full.num_params() > gqa.num_params()


def test_repeated_key_value_heads_give_what_grouped_ones_do(monkeypatch):
    """Where a CUDA kernel cannot take grouped heads (a mask: packed documents, serve's rows), they are repeated;
    forced here on the CPU, logits and gradients are those of the grouped kernel, with a mask and without."""
    import homellm.model as module

    model = tiny("llama", n_kv_head=2).train()
    idx = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(3))
    documents = torch.tensor([[0] * 6 + [1] * 10, [0] * 16])
    results = []
    for takes_groups in (True, False):
        monkeypatch.setattr(module, "_kernel_takes_groups", lambda q, mask, said=takes_groups: said)
        model.zero_grad()
        out = [model(idx)[0], model(idx, documents=documents)[0]]
        sum(o.square().mean() for o in out).backward()
        results.append((out, model.layers[0].self_attn.k_proj.weight.grad.clone()))
    for a, b in zip(results[0][0], results[1][0]):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(results[0][1], results[1][1])


def test_too_long_sequence_is_refused():
    model = tiny("gpt2")
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_rope_matches_rotate_half_reference():
    """The rotate-half convention of Hugging Face's Llama, written out independently."""
    from homellm.model import apply_rope, rope_tables

    cfg = ModelConfig(family="llama", vocab_size=8, n_head=1, n_embd=4, block_size=3)
    cos, sin = rope_tables(cfg, 3)
    x = torch.tensor([[[[1.0, 2.0, 3.0, 4.0]] * 3]])
    out = apply_rope(x, cos, sin)
    p, inv = 2, [1.0, 1.0 / 100.0]  # position 2, inv_freq for head_dim 4 and theta 1e4
    a0, a1 = p * inv[0], p * inv[1]
    ref = [1 * math.cos(a0) - 3 * math.sin(a0), 2 * math.cos(a1) - 4 * math.sin(a1),
           3 * math.cos(a0) + 1 * math.sin(a0), 4 * math.cos(a1) + 2 * math.sin(a1)]
    torch.testing.assert_close(out[0, 0, 2], torch.tensor(ref))


@pytest.mark.parametrize("family", FAMILIES)
def test_cpu_bfloat16_autocast_keeps_attention_in_float32(family, monkeypatch):
    """The CPU's bfloat16 attention kernels run their backward pass about ten times slower than float32's: under
    the CPU's autocast the matrix products run in bfloat16 and attention alone in float32, with a loss and
    gradients close to float32's."""
    model = tiny(family, n_kv_head=2) if family == "llama" else tiny(family)
    model.train()
    idx, targets = torch.randint(0, 96, (2, 2, 24), generator=torch.Generator().manual_seed(3))
    _, reference = model(idx, targets)
    reference.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    seen, attend = [], F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((q.dtype, k.dtype, v.dtype))
        return attend(q, k, v, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(idx, targets)
    loss.backward()
    assert logits.dtype == torch.bfloat16  # the head's product ran in bfloat16
    assert seen == [(torch.float32,) * 3] * 2  # one attention per layer, in float32
    assert abs(loss.item() - reference.item()) < 0.02
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], atol=0.05 * want[n].abs().max().item(), rtol=0.1, msg=n)
