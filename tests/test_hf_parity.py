"""Parity with Hugging Face transformers: the same weights give the same logits, and a tokenizer folder gives the
same ids.

Each homellm family is rebuilt as its transformers counterpart (llama -> LlamaForCausalLM, gpt2 ->
GPT2LMHeadModel) from a config object, so nothing is downloaded; the state dict is mapped by name, loaded
strictly, and fp32 logits of both models are compared in eval mode.

HF runs with attn_implementation="eager": its attention is then plain matmul + softmax with its own causal mask
and repeat_kv for grouped-query attention, an implementation independent of homellm's
F.scaled_dot_product_attention(is_causal=..., enable_gqa=...). Comparing against HF's SDPA path would only
compare SDPA with itself.
"""

import re
import shutil
from pathlib import Path

import pytest
import torch

from homellm.config import ModelConfig
from homellm.model import GPT

transformers = pytest.importorskip("transformers", reason="needs the dev extra: pip install -e '.[dev]'")

VOCAB, BLOCK = 100, 32


def tiny(family: str, **kw) -> GPT:
    """A tiny homellm model with every parameter random and activations of order 1. homellm's init (norm gains 1,
    biases 0, matrices N(0, 0.02)) would hide a norm or bias mapped to the wrong place, and keep the MLP's inputs
    so near 0 that GELU's tanh and erf forms agree within the tolerance."""
    torch.manual_seed(0)
    cfg = ModelConfig(family=family, vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=64, block_size=BLOCK, **kw)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))  # norm gains around 1, biases around 0
            else:
                p.normal_(0.0, p.size(1) ** -0.5)
    return model.eval()


def to_hf(model: GPT):
    """transformers' model for homellm's config, with homellm's weights under transformers' names (homellm.hf's
    maps, which `homellm export` writes), loaded strictly."""
    from homellm.hf import to_transformers, transformers_config

    # no tokenizer here: the ids are not compared
    tok = type("Ids", (), {"eot_id": None, "start_id": None, "pad_id": None})()
    config = transformers.AutoConfig.for_model(**transformers_config(model.cfg, tok), attn_implementation="eager")
    hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    sd = to_transformers(model)
    if model.cfg.tie_embeddings:  # stored once, as transformers stores it; its own load ties them
        sd["lm_head.weight"] = model.lm_head.weight.detach()
    hf.load_state_dict(sd, strict=True)
    return hf.eval()


def assert_same_logits(model: GPT, hf) -> None:
    ids = torch.randint(0, VOCAB, (3, BLOCK), generator=torch.Generator().manual_seed(1))  # every position
    with torch.no_grad():
        ours, _ = model(ids)
        theirs = hf(ids).logits
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # Also a prefix: positions and the causal mask must not depend on the length.
    with torch.no_grad():
        torch.testing.assert_close(model(ids[:, :7])[0], hf(ids[:, :7]).logits, rtol=1e-5, atol=1e-5)


def assert_tying(model: GPT, hf) -> None:
    tied = hf.get_output_embeddings().weight is hf.get_input_embeddings().weight
    assert tied == model.cfg.tie_embeddings


# Non-default eps and theta, so a setting HF ignored (or took from its own defaults) shows.
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("n_kv_head", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_llama_matches_transformers(tie, n_kv_head, bias):
    model = tiny("llama", n_kv_head=n_kv_head, tie_embeddings=tie, bias=bias, norm_eps=1e-4, rope_theta=500.0)
    hf = to_hf(model)
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert_tying(model, hf)
    assert_same_logits(model, hf)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("n_kv_head", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_gpt2_matches_transformers(tie, n_kv_head, bias):
    model = tiny("gpt2", n_kv_head=n_kv_head, tie_embeddings=tie, bias=bias, norm_eps=1e-4)
    hf = to_hf(model)
    assert type(hf).__name__ == "GPT2LMHeadModel"
    assert_tying(model, hf)
    assert_same_logits(model, hf)


# ---- tokenizers: the folder homellm writes loads in transformers and gives the same ids -----------------------

def corpus_text() -> str:
    """Our own text in three scripts (no corpus needed), with the chat and end-of-text tokens inside."""
    return ("ROMEO: But soft, what light through yonder window breaks?\n"
            "むかしむかし、ある山のふもとに小さな村がありました。\n滚滚长江东逝水，浪花淘尽英雄。\n"
            "<|im_start|>user\n7 x 8?<|im_end|>\n<|endoftext|> 👩‍👩‍👧 e\u0301\n")


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_a_tokenizer_folder_loads_in_transformers_with_the_same_ids(kind, tmp_path):
    from homellm.config import SPECIAL_TOKENS, TokenizerConfig
    from homellm.tokenizer import train_tokenizer

    (tmp_path / "text.txt").write_text(corpus_text() * 5, encoding="utf-8")
    ours = train_tokenizer(TokenizerConfig(input=[str(tmp_path / "text.txt")], out=str(tmp_path / "tok"), kind=kind,
                                           vocab_size=400))
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    text = corpus_text()
    assert theirs(text, add_special_tokens=False)["input_ids"] == ours.encode(text, allow_special=True)
    assert theirs.decode(ours.encode(text, allow_special=True)) == text  # (not only the same: the text itself)
    assert ours.decode(ours.encode(text)) == text  # Japanese, Chinese, emoji, combining marks: without ../shared
    assert {t: theirs.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS} == \
        {t: ours.encode(t, allow_special=True)[0] for t in SPECIAL_TOKENS}
    assert theirs.eos_token_id == ours.eot_id and theirs.pad_token_id == ours.pad_id


def test_gpt2_files_give_the_ids_of_transformers_gpt2_tokenizer(tmp_path):
    from homellm.config import TokenizerConfig
    from homellm.tokenizer import train_tokenizer

    files = Path(__file__).resolve().parents[2] / "shared" / "data" / "gpt2_tokenizer"
    shakespeare = files.parent / "tinyshakespeare" / "input.txt"
    if not files.is_dir() or not shakespeare.is_file():
        pytest.skip(f"{files.parent} is absent (the shared offline corpora are not on this machine)")
    ours = train_tokenizer(TokenizerConfig(from_file=str(files), out=str(tmp_path / "tok")))
    # Under the names transformers looks for in a folder (its 4.x and 5.x constructors differ in argument names).
    (tmp_path / "hf").mkdir()
    shutil.copy(files / "encoder.json", tmp_path / "hf" / "vocab.json")
    shutil.copy(files / "vocab.bpe", tmp_path / "hf" / "merges.txt")
    theirs = transformers.GPT2TokenizerFast.from_pretrained(str(tmp_path / "hf"))
    # GPT-2's own <|endoftext|> is one id in both; the chat tokens are homellm's additions, unknown to GPT-2's files.
    text = shakespeare.read_text(encoding="utf-8")[:20000] + re.sub(r"<\|im_(start|end)\|>", "", corpus_text())
    assert ours.encode(text, allow_special=True) == theirs(text)["input_ids"]
