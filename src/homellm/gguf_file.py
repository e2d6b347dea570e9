"""GGUF export: a run as one .gguf file, which llama.cpp (and Ollama, LM Studio, ...) run.

    homellm export runs/chat --format gguf --out chat.gguf [--dtype float16]

llama.cpp's `llama` architecture is homellm's llama family, with one difference in convention: it rotates RoPE's
adjacent pairs of each head, where homellm (as Hugging Face) rotates its two halves, so the q and k rows of each
head are reordered to match (the same function). Its `gpt2` architecture is the gpt2 family, q, k and v fused as in
`homellm export`'s Hugging Face folder. The tokenizer goes in as llama.cpp's byte-level BPE under the name llama.cpp
gives its pre-tokenizer: GPT-2's, which is what `homellm tokenizer train` makes, or an imported Llama 3's or Qwen2's;
any other, and a char-level tokenizer, has no llama.cpp counterpart.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from homellm.config import chat_template
from homellm.errors import HomeLLMError
from homellm.io import atomic_write
from homellm.model import GPT
from homellm.tokenizer import Tokenizer

NUMPY_TYPES = {"float32": np.float32, "float16": np.float16}

# llama.cpp's tokenizer.ggml.pre for a tokenizer.json that splits text with a Split regex before ByteLevel, by that
# regex: the "original regex from tokenizer.json" that llama.cpp's src/llama-vocab.cpp records beside each pattern
# it rewrites for its own engine. Anything else would be split otherwise than the model's tokenizer split it.
SPLIT_PRE = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",  # Llama 3
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",  # Qwen2: one digit a token, not three
}
# The ones llama.cpp gives ignore_merges (a word that is one token in the vocabulary is taken whole, merges or not),
# which a tokenizer.json's BPE model says as "ignore_merges": true (Llama 3's does).
IGNORE_MERGES = {"llama-bpe"}
_HF_INSTEAD = "`homellm export` without --format gguf writes a Hugging Face folder, which keeps the tokenizer as it is"


def _pairs(t: torch.Tensor, heads: int) -> torch.Tensor:
    """q or k rows (weight or bias) of each head from rotate-half order (0..d/2-1 with d/2..d-1) into adjacent
    pairs (0 with d/2, 1 with d/2+1, ...), the order llama.cpp's RoPE rotates."""
    return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def gguf_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """The model's weights under llama.cpp's names, as (out, in) matrices (GGUF stores them that way round)."""
    c = model.cfg
    if c.family == "gpt2":
        from homellm.hf import to_transformers

        hf = to_transformers(model)  # its q, k and v fused (key/value heads repeated), as llama.cpp's gpt2 wants

        def get(name: str) -> torch.Tensor:  # Conv1D weights are (in, out)
            t = hf[f"transformer.{name}"]
            return t.t() if t.dim() == 2 and name.startswith("h.") else t

        out = {"token_embd.weight": get("wte.weight"), "position_embd.weight": get("wpe.weight"),
               "output_norm.weight": get("ln_f.weight"), "output_norm.bias": get("ln_f.bias")}
        names = {"attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj", "ffn_norm": "ln_2",
                 "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"}
        for i in range(c.n_layer):
            for ours, theirs in names.items():
                for kind in ("weight", "bias"):
                    out[f"blk.{i}.{ours}.{kind}"] = get(f"h.{i}.{theirs}.{kind}")
    else:
        sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        out = {"token_embd.weight": sd["embed_tokens.weight"], "output_norm.weight": sd["norm.weight"]}
        names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm":
                 "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
        for i in range(c.n_layer):
            for ours, theirs in names.items():
                for kind in ("weight", "bias"):
                    if (t := sd.get(f"layers.{i}.{ours}.{kind}")) is None:
                        continue
                    if theirs in ("attn_q", "attn_k"):
                        t = _pairs(t, c.n_head if theirs == "attn_q" else c.n_kv_head)
                    out[f"blk.{i}.{theirs}.{kind}"] = t
    if not c.tie_embeddings:  # tied: llama.cpp reads token_embd for the output too
        out["output.weight"] = model.lm_head.weight.detach().cpu()
    return out


def _vocabulary(tok: Tokenizer, size: int, where: str) -> tuple[list[str], list[int], list[str]]:
    """Tokens (the padded ids named [PADn], as llama.cpp's own converter names them), their types, and merges."""
    import gguf

    spec = json.loads(tok.hf.to_str())
    model, pre = spec.get("model") or {}, json.dumps(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE" or '"ByteLevel"' not in pre:
        kind = ("SentencePiece-style BPE (Metaspace, byte fallback), as Llama 2's" if model.get("type") == "BPE"
                and ('"Metaspace"' in pre or model.get("byte_fallback")) else f"{tok.kind}, not byte-level BPE")
        raise HomeLLMError(f"{where}: its tokenizer is {kind}: homellm writes GGUF for byte-level BPE tokenizers "
                           "only (homellm's own, GPT-2's, Llama 3's); train one with `homellm tokenizer train` for a "
                           "run of your own, or use `homellm export` without --format gguf (transformers reads any "
                           "run)")
    added = {t.content: t.special for t in tok.hf.get_added_tokens_decoder().values()}
    tokens, types = [], []
    for i in range(size):
        text = tok.hf.id_to_token(i)
        tokens.append(text if text is not None else f"[PAD{i}]")
        # An added token that is not special is USER_DEFINED, as llama.cpp's converter writes it: llama.cpp then
        # reads it whole in text, as the tokenizer does; as NORMAL it split it into pieces the model never saw.
        types.append(gguf.TokenType.UNUSED if text is None else
                     gguf.TokenType.CONTROL if added.get(text) else
                     gguf.TokenType.USER_DEFINED if text in added else gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges


def pre_type(spec: dict, where: str) -> str:
    """The tokenizer.ggml.pre under which llama.cpp splits text as the byte-level BPE tokenizer.json `spec` does:
    "gpt-2" for ByteLevel's own regex (homellm's tokenizers, GPT-2's), or one of SPLIT_PRE's for a Split regex
    before ByteLevel; else a one-line error. (An exporter that wrote "gpt-2" for any of them had llama.cpp split an
    imported Llama 3's ':\\n', one token there, in two, ids the model never saw.)"""
    norm = spec.get("normalizer") or {}
    changes = [n.get("type") for n in ((norm.get("normalizers") or []) if norm.get("type") == "Sequence" else [norm])
               if n]
    # llama.cpp changes no text before splitting it (NFC, which Qwen2's tokenizer.json names, leaves almost all text
    # as it is, and llama.cpp's own converter drops it too)
    if unsaid := [str(k) for k in changes if k != "NFC"]:
        raise HomeLLMError(f"{where}: its tokenizer changes text before it splits it ({', '.join(unsaid)}, in its "
                           "tokenizer.json), which llama.cpp does not, so it would feed the model ids it never saw: "
                           + _HF_INSTEAD)
    pre = spec.get("pre_tokenizer") or {}
    steps = (pre.get("pretokenizers") or []) if pre.get("type") == "Sequence" else [pre] if pre else []
    kinds = [s.get("type") for s in steps]
    name = None
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):  # (older files leave use_regex out: true)
        name = "gpt-2"
    elif (kinds == ["Split", "ByteLevel"] and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert")
          and not steps[1].get("use_regex", True)):
        name = SPLIT_PRE.get((steps[0].get("pattern") or {}).get("Regex"))
    # llama.cpp puts no space before text, where ByteLevel's add_prefix_space would
    if name is None or any(s.get("add_prefix_space") for s in steps):
        shown = " + ".join(f"Split({s.get('pattern')})" if k == "Split" else str(k) for k, s in zip(kinds, steps))
        raise HomeLLMError(f"{where}: llama.cpp has no pre-tokenizer that splits text as its tokenizer's does "
                           f"({shown or 'none'}, in its tokenizer.json), so llama.cpp would split its text otherwise "
                           "than the model's tokenizer and feed the model ids it never saw: " + _HF_INSTEAD)
    if bool((spec.get("model") or {}).get("ignore_merges")) != (name in IGNORE_MERGES):
        how = ("takes a word that is one token of the vocabulary whole, where its tokenizer.json merges it "
               '("ignore_merges": false)' if name in IGNORE_MERGES else "merges every word, where its "
               'tokenizer.json takes a word that is one token of the vocabulary whole ("ignore_merges": true)')
        raise HomeLLMError(f"{where}: llama.cpp's {name} pre-tokenizer {how}, so some words would get other ids: "
                           + _HF_INSTEAD)
    return name


def export_gguf(run: str | Path, out: str | Path, checkpoint: str = "best", dtype: str = "float32") -> Path:
    """`homellm export --format gguf`: the run's model and tokenizer as one .gguf file, written whole or not at
    all. Matrices in float32 or float16; norms and biases stay float32, as llama.cpp expects."""
    from homellm.checkpoint import load_model, read_config, speaks_chatml

    try:
        import gguf  # optional: only this export needs it
    except ImportError:
        raise HomeLLMError("--format gguf needs the gguf package: pip install 'homellm[gguf]'") from None
    run, out = Path(run), Path(out)
    if dtype not in NUMPY_TYPES:
        raise HomeLLMError(f"--dtype {dtype!r}: a GGUF file is written in float32 or float16 (llama.cpp's own tools "
                           "quantize it further)")
    if out.is_dir() or out.exists():
        raise HomeLLMError(f"--out {out} exists: choose a new file name (such as {out.stem or 'model'}-2.gguf)")
    # The tokenizer first: a model of gigabytes is not read to be refused for it
    tok = Tokenizer.load(run)
    tokens, types, merges = _vocabulary(tok, read_config(run)[0].vocab_size, str(run))
    pre = pre_type(json.loads(tok.hf.to_str()), str(run))
    model = load_model(run, checkpoint)  # a LoRA run's adapters come merged into their base's weights
    c, chat = model.cfg, speaks_chatml(run)

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp), "llama" if c.family == "llama" else "gpt2")
        writer.add_name(run.name)
        writer.add_context_length(c.block_size)
        writer.add_embedding_length(c.n_embd)
        writer.add_block_count(c.n_layer)
        writer.add_feed_forward_length(c.intermediate_size)
        writer.add_head_count(c.n_head)
        if c.family == "llama":
            writer.add_head_count_kv(c.n_kv_head)
            writer.add_layer_norm_rms_eps(c.norm_eps)
            writer.add_rope_freq_base(c.rope_theta)
            writer.add_rope_dimension_count(c.n_embd // c.n_head)
        else:
            writer.add_layer_norm_eps(c.norm_eps)
        writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "float32" else gguf.LlamaFileType.MOSTLY_F16)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        writer.add_bos_token_id(tok.start_id)
        writer.add_eos_token_id(tok.eot_id)
        writer.add_pad_token_id(tok.pad_id)
        # homellm's models start text as it comes, with no token before it; an imported Llama 3 after its bos.
        writer.add_add_bos_token(tok.bos_id is not None)
        if chat:
            writer.add_chat_template(chat_template(tok.system))
            writer.add_eot_token_id(tok.im_end_id)  # a chat model's turn ends here: llama.cpp stops generating
        # A pretrained run's file has no template: Ollama then sends the prompt as written, and llama-cli continues
        # it, where with one they wrapped it in ChatML turns the model never saw (and it wrote on past them).
        for name, tensor in gguf_tensors(model).items():
            array = tensor.detach().float().numpy()
            writer.add_tensor(name, array.astype(NUMPY_TYPES[dtype]) if array.ndim == 2 else array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    atomic_write(out, write)
    return out


def read_gguf(path: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A GGUF file's metadata (scalars and strings, arrays as lists) and tensors (as numpy arrays in (out, in)
    order), read back with the gguf package's reader: what the tests compare."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    meta = {}
    for field in reader.fields.values():
        values = [field.parts[i] for i in field.data]
        if field.types and field.types[0] == gguf.GGUFValueType.STRING and len(field.types) == 1:
            meta[field.name] = bytes(values[0]).decode("utf-8")
        elif field.types and field.types[0] == gguf.GGUFValueType.ARRAY:
            meta[field.name] = [bytes(v).decode("utf-8") if field.types[-1] == gguf.GGUFValueType.STRING
                                else v.tolist()[0] for v in values]
        else:
            meta[field.name] = values[0].tolist()[0] if len(values) else None
    tensors = {t.name: np.asarray(t.data).reshape([int(d) for d in reversed(t.shape)]) for t in reader.tensors}
    return meta, tensors
