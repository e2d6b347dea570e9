"""`homellm export --format gguf`: the file is read back with the gguf package's reader, and a forward pass written
here in llama.cpp's conventions (adjacent-pair RoPE, fused GPT-2 q/k/v, (out, in) matrices) from the file's
tensors alone must give homellm's logits: a wrong head order, pair order or name would not."""

import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from homellm.checkpoint import load_model
from homellm.errors import HomeLLMError
from homellm.tokenizer import Tokenizer
from test_hf_interop import ARCHITECTURES, cli, make_run

gguf = pytest.importorskip("gguf", reason="needs the gguf extra: pip install -e '.[dev]'")
from homellm.gguf_file import export_gguf, read_gguf  # noqa: E402  (after the skip: it needs gguf)


def forward(meta: dict, t: dict, ids: torch.Tensor) -> torch.Tensor:
    """Logits from the GGUF file alone, computed as llama.cpp computes its llama and gpt2 architectures."""
    arch = meta["general.architecture"]
    w = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in t.items()}  # a copy: the reader maps the file
    d, heads = meta[f"{arch}.embedding_length"], meta[f"{arch}.attention.head_count"]
    kv_heads = meta.get(f"{arch}.attention.head_count_kv", heads)  # gpt2: each key/value head written per query head
    hd, T = d // heads, ids.shape[1]
    x = w["token_embd.weight"][ids]
    if arch == "gpt2":
        x = x + w["position_embd.weight"][:T]
        eps = meta["gpt2.attention.layer_norm_epsilon"]

        def norm(v, name):
            return F.layer_norm(v, (d,), w[name + ".weight"], w[name + ".bias"], eps)
    else:
        eps = meta["llama.attention.layer_norm_rms_epsilon"]

        def norm(v, name):
            return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps) * w[name + ".weight"]
        # llama.cpp's RoPE for llama: each adjacent pair (2i, 2i+1) of a head turns by pos * theta^(-2i/hd).
        theta = meta["llama.rope.freq_base"]
        angle = torch.arange(T)[:, None] * theta ** (-torch.arange(0, hd, 2) / hd)
        cos, sin = angle.cos(), angle.sin()

    def rope(v):  # (B, H, T, hd)
        a, b = v[..., 0::2], v[..., 1::2]
        return torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2)

    def lin(v, name):
        return v @ w[name + ".weight"].T + (w[name + ".bias"] if name + ".bias" in w else 0)

    for i in range(meta[f"{arch}.block_count"]):
        p = f"blk.{i}."
        h = norm(x, p + "attn_norm")
        if arch == "gpt2":
            q, k, v = lin(h, p + "attn_qkv").split(d, -1)
        else:
            q, k, v = lin(h, p + "attn_q"), lin(h, p + "attn_k"), lin(h, p + "attn_v")
        q = q.view(1, T, heads, hd).transpose(1, 2)
        # Grouped-query attention: query head j reads key/value head j // (heads / kv_heads), as in llama.cpp.
        k = k.view(1, T, kv_heads, hd).transpose(1, 2).repeat_interleave(heads // kv_heads, dim=1)
        v = v.view(1, T, kv_heads, hd).transpose(1, 2).repeat_interleave(heads // kv_heads, dim=1)
        if arch == "llama":
            q, k = rope(q), rope(k)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        x = x + lin((scores.softmax(-1) @ v).transpose(1, 2).reshape(1, T, d), p + "attn_output")
        h = norm(x, p + "ffn_norm")
        if arch == "gpt2":
            x = x + lin(F.gelu(lin(h, p + "ffn_up"), approximate="tanh"), p + "ffn_down")
        else:
            x = x + lin(F.silu(lin(h, p + "ffn_gate")) * lin(h, p + "ffn_up"), p + "ffn_down")
    return norm(x, "output_norm") @ w.get("output.weight", w["token_embd.weight"]).T


@ARCHITECTURES
def test_a_gguf_file_computes_homellms_logits_in_llama_cpps_conventions(tmp_path, family, kw, capsys):
    run = make_run(tmp_path / "run", family, **kw)
    code, stdout, err = cli(capsys, "export", str(run), "--format", "gguf", "--out", str(tmp_path / "m.gguf"))
    step = json.loads((run / "best" / "checkpoint.json").read_text())["step"]
    assert code == 0, err
    assert stdout == f"GGUF file written to {tmp_path / 'm.gguf'} (from checkpoint best, step {step})\n"
    meta, tensors = read_gguf(tmp_path / "m.gguf")
    model, tok = load_model(run), Tokenizer.load(run)
    ids = torch.tensor([tok.encode("ROMEO: But soft, むかしむかし 12 + 7 = 19")[:40]])
    with torch.no_grad():
        torch.testing.assert_close(forward(meta, tensors, ids), model(ids)[0], rtol=1e-4, atol=1e-4)
    # The vocabulary: the tokenizer's tokens by id, the padding ids past it named as llama.cpp names them.
    tokens = meta["tokenizer.ggml.tokens"]
    assert len(tokens) == model.cfg.vocab_size == len(tensors["token_embd.weight"])
    assert tokens[:tok.vocab_size] == [tok.hf.id_to_token(i) for i in range(tok.vocab_size)]
    assert tokens[tok.vocab_size:] == [f"[PAD{i}]" for i in range(tok.vocab_size, model.cfg.vocab_size)]
    merges = json.loads(tok.hf.to_str())["model"]["merges"]
    assert meta["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in merges]
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == ("gpt2", "gpt-2")
    assert (meta["tokenizer.ggml.eos_token_id"], meta["tokenizer.ggml.add_bos_token"]) == (tok.eot_id, False)
    types = meta["tokenizer.ggml.token_type"]
    assert types[tok.im_end_id] == gguf.TokenType.CONTROL and types[tok.encode("R")[0]] == gguf.TokenType.NORMAL
    assert "tokenizer.ggml.eot_token_id" not in meta  # a pretrained run: it ends text, not turns
    assert "tokenizer.chat_template" not in meta  # nor are prompts wrapped in turns for it (Ollama, llama-cli)
    if family == "llama":  # an added token that is not special: llama.cpp reads it whole only as USER_DEFINED
        from tokenizers import AddedToken

        assert tok.vocab_size < model.cfg.vocab_size  # room among the padding rows
        tok.hf.add_tokens([AddedToken("<think>", special=False, normalized=False)])
        tok.hf.save(str(run / "tokenizer" / "tokenizer.json"))
        assert cli(capsys, "export", str(run), "--format", "gguf", "--out", str(tmp_path / "t.gguf"))[0] == 0
        types = read_gguf(tmp_path / "t.gguf")[0]["tokenizer.ggml.token_type"]
        assert types[tok.vocab_size] == gguf.TokenType.USER_DEFINED  # (the new token's id)
        assert types[tok.im_end_id] == gguf.TokenType.CONTROL and types[tok.encode("R")[0]] == gguf.TokenType.NORMAL


def test_a_chat_run_in_float16_ends_turns_and_keeps_norms_in_float32(tmp_path):
    run = make_run(tmp_path / "run", "llama", sft=True)
    out = export_gguf(run, tmp_path / "chat.gguf", dtype="float16")
    meta, tensors = read_gguf(out)
    tok = Tokenizer.load(run)
    assert meta["tokenizer.ggml.eot_token_id"] == tok.im_end_id and "im_start" in meta["tokenizer.chat_template"]
    assert tensors["blk.0.attn_q.weight"].dtype == np.float16 and tensors["blk.0.attn_norm.weight"].dtype == np.float32
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    model = load_model(run)
    ids = torch.tensor([tok.encode("ROMEO: But soft")])
    with torch.no_grad():  # float16 weights: as close as their rounding allows
        torch.testing.assert_close(forward(meta, tensors, ids), model(ids)[0], rtol=2e-2, atol=2e-2)


# Llama 3's and Qwen2's pre-tokenizer regexes as their tokenizer.json files hold them (and llama.cpp's llama-vocab.cpp
# quotes them).
LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+")
QWEN2 = LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")


def split_then_byte_level(run, regex: str, ignore_merges: bool, **byte_level) -> None:
    """The run's tokenizer.json made to split as an imported Llama 3's does: Split(regex), then ByteLevel without
    its own (GPT-2's) regex. Its vocabulary and merges stay, so the model still reads every id."""
    path = run / "tokenizer" / "tokenizer.json"
    spec = json.loads(path.read_text(encoding="utf-8"))
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False, **byte_level}]}
    spec["model"]["ignore_merges"] = ignore_merges
    path.write_text(json.dumps(spec), encoding="utf-8")


@pytest.mark.parametrize("regex, ignore_merges, pre", [(LLAMA3, True, "llama-bpe"), (QWEN2, False, "qwen2")],
                         ids=["llama3", "qwen2"])
def test_the_gguf_names_the_pre_tokenizer_its_tokenizer_splits_with(tmp_path, regex, ignore_merges, pre):
    run = make_run(tmp_path / "run", "llama")
    gpt2 = Tokenizer.load(run)
    split_then_byte_level(run, regex, ignore_merges)
    tok = Tokenizer.load(run)
    # The two split text otherwise: Llama 3's and Qwen2's regex keep ':' with the line break after it, GPT-2's
    # does not, so a file that named GPT-2's had llama.cpp read "ROMEO:\n" in pieces the model never saw.
    assert [p for p, _ in tok.hf.pre_tokenizer.pre_tokenize_str("ROMEO:\n")] == ["ROMEO", ":Ċ"]
    assert [p for p, _ in gpt2.hf.pre_tokenizer.pre_tokenize_str("ROMEO:\n")] == ["ROMEO", ":", "Ċ"]
    meta, _ = read_gguf(export_gguf(run, tmp_path / "m.gguf"))
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == ("gpt2", pre)


def test_gguf_export_refuses_what_llama_cpp_cannot_read_in_one_line(tmp_path, capsys):
    from homellm.config import TokenizerConfig
    from homellm.tokenizer import train_tokenizer

    run = make_run(tmp_path / "run", "llama")
    (tmp_path / "taken.gguf").write_text("keep me")
    for args, message in [(["--out", str(tmp_path / "taken.gguf")], "exists: choose a new file name"),
                          (["--out", str(tmp_path / "b.gguf"), "--dtype", "bfloat16"], "float32 or float16"),
                          (["--out", str(tmp_path / "x"), "--format", "onnx"], "--format 'onnx' is unknown")]:
        code, _, err = cli(capsys, "export", str(run), "--format", "gguf", *args)
        assert code == 2 and message in err, err
    assert (tmp_path / "taken.gguf").read_text() == "keep me"
    # --out x.gguf without --format made a transformers folder of that name; an existing one is still kept.
    code, _, err = cli(capsys, "export", str(run), "--out", str(tmp_path / "taken.gguf"))
    assert code == 2 and "exists: choose a new file name" in err
    code, stdout, _ = cli(capsys, "export", str(run), "--out", str(tmp_path / "plain.gguf"))
    assert code == 0 and (tmp_path / "plain.gguf").is_file() and stdout.startswith("GGUF file written to")
    (tmp_path / "plain.gguf").unlink()
    code, _, err = cli(capsys, "export", str(run), "--format", "hf", "--out", str(tmp_path / "plain.gguf"))
    assert code == 2 and "names a GGUF file, but --format hf writes a transformers folder" in err  # (it wrote one)
    assert not (tmp_path / "plain.gguf").exists()
    # A char tokenizer has no llama.cpp counterpart.
    (tmp_path / "t.txt").write_text("abc\n")
    train_tokenizer(TokenizerConfig(input=[str(tmp_path / "t.txt")], out=str(tmp_path / "char"), kind="char"))
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (run / "tokenizer" / f).write_bytes((tmp_path / "char" / f).read_bytes())
    with pytest.raises(HomeLLMError, match=r"its tokenizer is char, not byte-level BPE: homellm writes GGUF for "
                                           r"byte-level BPE tokenizers only"):
        export_gguf(run, tmp_path / "c.gguf")
    # Llama 2's kind was called "not byte-level BPE (bpe)", and "a BPE tokenizer" asked for.
    spm = make_run(tmp_path / "spm", "llama")
    spec = json.loads((spm / "tokenizer" / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False}
    (spm / "tokenizer" / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(HomeLLMError, match=r"its tokenizer is SentencePiece-style BPE \(Metaspace, byte fallback\), "
                                           r"as Llama 2's: homellm writes GGUF for byte-level BPE tokenizers only"):
        export_gguf(spm, tmp_path / "s.gguf")
    # A tokenizer that changes text before it splits it (lower case here): llama.cpp does not
    lower = make_run(tmp_path / "lower", "llama")
    spec = json.loads((lower / "tokenizer" / "tokenizer.json").read_text())
    (lower / "tokenizer" / "tokenizer.json").write_text(json.dumps({**spec, "normalizer": {
        "type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "Lowercase"}]}}))
    with pytest.raises(HomeLLMError, match=r"its tokenizer changes text before it splits it \(Lowercase, in its "):
        export_gguf(lower, tmp_path / "l.gguf")
    assert not list(tmp_path.glob("*.gguf*"))[1:]  # only taken.gguf: nothing half-written


@pytest.mark.parametrize("regex, ignore_merges, byte_level, message", [
    (r"\p{N}| ?\p{L}+|\s+", False, {}, r"llama.cpp has no pre-tokenizer that splits text as its tokenizer's does "
                                        r"\(Split\(\{'Regex': .*\}\) \+ ByteLevel, in its tokenizer.json\)"),
    (LLAMA3, True, {"add_prefix_space": True}, "llama.cpp has no pre-tokenizer"),
    (LLAMA3, True, {"use_regex": True}, "llama.cpp has no pre-tokenizer"),  # GPT-2's regex after Llama 3's
    (LLAMA3, False, {}, r"llama.cpp's llama-bpe pre-tokenizer takes a word .* whole, where .*ignore_merges.: false"),
    (QWEN2, True, {}, r"llama.cpp's qwen2 pre-tokenizer merges every word"),
], ids=["unknown-regex", "prefix-space", "two-regexes", "llama3-merging", "qwen2-ignoring-merges"])
def test_a_tokenizer_llama_cpp_would_split_otherwise_is_refused_in_one_line(tmp_path, capsys, regex, ignore_merges,
                                                                             byte_level, message):
    run = make_run(tmp_path / "run", "llama")
    split_then_byte_level(run, regex, ignore_merges, **byte_level)
    code, _, err = cli(capsys, "export", str(run), "--format", "gguf", "--out", str(tmp_path / "m.gguf"))
    assert code == 2 and err.count("\n") == 1 and str(run) in err and re.search(message, err), err
    assert "Hugging Face folder" in err and not list(tmp_path.glob("*.gguf*"))
