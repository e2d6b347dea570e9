"""Hugging Face interop: a run written as a transformers model folder, and a transformers model read into a run.

    homellm export runs/chat --out hf/chat   # AutoModelForCausalLM.from_pretrained("hf/chat"), or upload the folder
    homellm import hf/gpt2 --out runs/gpt2   # a GPT-2 or Llama folder (or hf:NAME) becomes a run to fine-tune

homellm's names were chosen for this: Llama's map is the identity under a `model.` prefix. GPT-2 keeps q, k and v
fused in one Conv1D whose weights are stored transposed, and it has no grouped-query attention, so a homellm gpt2
with fewer key/value heads is exported with each of them repeated for the query heads that share it (the same
function). tests/test_hf_parity.py checks both maps against transformers' own models, logit for logit.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from homellm.config import ModelConfig, TrainConfig, check_checkpoint_name, load_json, save_json, to_dict
from homellm.errors import HomeLLMError
from homellm.io import atomic_folder, say
from homellm.model import GPT
from homellm.tokenizer import Tokenizer, config_eos_ids

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---- the maps ----------------------------------------------------------------------------------------------------

def transformers_config(cfg: ModelConfig, tok: Tokenizer, dtype: str = "float32") -> dict[str, Any]:
    """The config.json transformers reads for this architecture."""
    ids = {"bos_token_id": tok.start_id, "eos_token_id": tok.eot_id, "pad_token_id": tok.pad_id}
    common = {"vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": 0.02,
              "torch_dtype": dtype, **ids}
    if cfg.family == "llama":
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg.n_embd,
                "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.n_layer,
                "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head,
                "head_dim": cfg.n_embd // cfg.n_head, "max_position_embeddings": cfg.block_size,
                "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "rope_scaling": None,
                "attention_bias": cfg.bias, "mlp_bias": cfg.bias, "hidden_act": "silu", "attention_dropout": 0.0,
                **common}
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_positions": cfg.block_size,
            "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": cfg.intermediate_size,
            "activation_function": "gelu_new", "layer_norm_epsilon": cfg.norm_eps, "scale_attn_weights": True,
            # the run's dropout where GPT-2's falls too (embeddings, attention, residuals), for training on there;
            # transformers' Llama has attention dropout alone, so no value there would train as homellm did
            "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout, **common}


def to_transformers(model: GPT) -> dict[str, torch.Tensor]:
    """homellm's state dict under transformers' names (a tied head stored once, as transformers saves it)."""
    c = model.cfg
    src = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    if c.family == "llama":
        sd = {(k if k == "lm_head.weight" else f"model.{k}"): v for k, v in src.items()}
    else:
        sd = _gpt2_names(c, src)
    if c.tie_embeddings:
        sd.pop("lm_head.weight")
    return {k: v.contiguous() for k, v in sd.items()}


def _gpt2_names(c: ModelConfig, src: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GPT-2 has biases everywhere (bias=False maps to zeros, which computes the same) and Conv1D layers, whose
    weights are (in, out): a Linear's transposed."""
    d, rep, hd = c.n_embd, c.n_head // c.n_kv_head, c.n_embd // c.n_head

    def w(name: str) -> torch.Tensor:
        return src[name + ".weight"].t()

    def b(name: str, n: int) -> torch.Tensor:
        return src.get(name + ".bias", torch.zeros(n))

    def kv(t: torch.Tensor) -> torch.Tensor:  # (n_kv_head * hd, ...) -> (n_head * hd, ...): each head `rep` times
        return t.reshape(c.n_kv_head, hd, *t.shape[1:]).repeat_interleave(rep, dim=0).flatten(0, 1)

    def kv_b(name: str) -> torch.Tensor:
        return kv(src[name + ".bias"]) if name + ".bias" in src else torch.zeros(d)

    sd = {"transformer.wte.weight": src["embed_tokens.weight"], "transformer.wpe.weight": src["embed_positions.weight"],
          "transformer.ln_f.weight": src["norm.weight"], "transformer.ln_f.bias": b("norm", d),
          "lm_head.weight": src["lm_head.weight"]}
    for i in range(c.n_layer):
        p, h, a = f"layers.{i}.", f"transformer.h.{i}.", f"layers.{i}.self_attn."
        sd |= {
            h + "ln_1.weight": src[p + "input_layernorm.weight"], h + "ln_1.bias": b(p + "input_layernorm", d),
            h + "ln_2.weight": src[p + "post_attention_layernorm.weight"],
            h + "ln_2.bias": b(p + "post_attention_layernorm", d),
            h + "attn.c_attn.weight": torch.cat([w(a + "q_proj"), kv(src[a + "k_proj.weight"]).t(),
                                                 kv(src[a + "v_proj.weight"]).t()], dim=1),
            h + "attn.c_attn.bias": torch.cat([b(a + "q_proj", d), kv_b(a + "k_proj"), kv_b(a + "v_proj")]),
            h + "attn.c_proj.weight": w(a + "o_proj"), h + "attn.c_proj.bias": b(a + "o_proj", d),
            h + "mlp.c_fc.weight": w(p + "mlp.up_proj"),
            h + "mlp.c_fc.bias": b(p + "mlp.up_proj", c.intermediate_size),
            h + "mlp.c_proj.weight": w(p + "mlp.down_proj"), h + "mlp.c_proj.bias": b(p + "mlp.down_proj", d),
        }
    return sd


# What transformers' GPT2Config and LlamaConfig assume for the sizes a config.json leaves out (older uploads and
# hand-written configs rely on them).
SIZES = {"gpt2": {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12},
         "llama": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "max_position_embeddings": 2048}}


def read_hf_config(folder: Path) -> dict[str, Any]:
    """A model folder's config.json with transformers' defaults where it says nothing (a key left out, or null),
    checked before a size reaches a tensor: one line naming the file and the key, never a KeyError."""
    path = folder / "config.json"
    config = load_json(path)
    if not isinstance(config, dict):
        raise HomeLLMError(f"{path}: not a JSON object, so not a transformers config: download the model again")
    if "model" in config and "train" in config:  # a homellm run's own config
        raise HomeLLMError(f"{folder} is a homellm run already: use it as it is (generate, sft --init, pretrain "
                           "--init, export)")
    kind = config.get("model_type")
    if not isinstance(kind, str) or kind not in SIZES:
        raise HomeLLMError(f"{path}: model_type {kind!r} is not one homellm runs: it imports gpt2 and llama models "
                           "(GPT-2, rinna's Japanese GPT-2, TinyLlama, SmolLM, Llama 2 and 3 without rope scaling)")
    config = {**SIZES[kind], **{k: v for k, v in config.items() if v is not None}}
    for key in [*SIZES[kind], "n_inner", "num_key_value_heads", "head_dim"]:
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise HomeLLMError(f"{path}: {key} is {value!r}, not a positive whole number: download the model again")
    rope = config.get("rope_parameters") if isinstance(config.get("rope_parameters"), dict) else {}
    numbers = {k: config.get(k) for k in ("rope_theta", "rms_norm_eps", "layer_norm_epsilon")}
    for key, value in {**numbers, "rope_parameters.rope_theta": rope.get("rope_theta")}.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise HomeLLMError(f"{path}: {key} is {value!r}, not a positive number: download the model again")
    return config


def from_transformers(config: dict[str, Any], weights: dict[str, torch.Tensor], where: str
                      ) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """A transformers GPT-2 or Llama (config.json as `read_hf_config` gives it, and a state dict) as homellm's config
    and state dict, in float32."""
    return (_from_gpt2 if config["model_type"] == "gpt2" else _from_llama)(config, weights, where)


def _check_sizes(cfg: ModelConfig, where: str) -> None:
    """The sizes of config.json, as read into homellm's config, before any weight is mapped by them."""
    cfg.validate(f"{where}/config.json (as homellm names its sizes)", "download the model again")


def _need(where: str, ok: bool, what: str) -> None:
    if not ok:
        raise HomeLLMError(f"{where}: {what}, which homellm's model does not have: this model cannot be imported")


def _from_gpt2(config: dict[str, Any], weights: dict[str, torch.Tensor], where: str
               ) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    act = config.get("activation_function", "gelu_new")
    _need(where, act in ("gelu_new", "gelu_pytorch_tanh"), f"activation_function {act!r}")
    _need(where, config.get("scale_attn_weights", True), "attention scores not scaled by 1/sqrt(head size)")
    _need(where, not config.get("scale_attn_by_inverse_layer_idx", False), "scale_attn_by_inverse_layer_idx")
    d, n_head = config["n_embd"], config["n_head"]
    cfg = ModelConfig(family="gpt2", vocab_size=config["vocab_size"], n_layer=config["n_layer"], n_head=n_head,
                      n_embd=d, intermediate_size=config.get("n_inner") or 4 * d, block_size=config["n_positions"],
                      bias=True, tie_embeddings=config.get("tie_word_embeddings", True),
                      norm_eps=config.get("layer_norm_epsilon", 1e-5))
    _check_sizes(cfg, where)
    # The hub's first GPT-2 files name tensors without the `transformer.` prefix, and keep the causal mask.
    src = {k.removeprefix("transformer."): v for k, v in weights.items()
           if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    get = _getter(src, where)
    sd = {"embed_tokens.weight": get("wte.weight"), "embed_positions.weight": get("wpe.weight"),
          "norm.weight": get("ln_f.weight"), "norm.bias": get("ln_f.bias")}
    for i in range(cfg.n_layer):
        h, p = f"h.{i}.", f"layers.{i}."
        q, k, v = get(h + "attn.c_attn.weight").t().chunk(3, dim=0)
        qb, kb, vb = get(h + "attn.c_attn.bias").chunk(3)
        sd |= {
            p + "input_layernorm.weight": get(h + "ln_1.weight"), p + "input_layernorm.bias": get(h + "ln_1.bias"),
            p + "post_attention_layernorm.weight": get(h + "ln_2.weight"),
            p + "post_attention_layernorm.bias": get(h + "ln_2.bias"),
            p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k, p + "self_attn.v_proj.weight": v,
            p + "self_attn.q_proj.bias": qb, p + "self_attn.k_proj.bias": kb, p + "self_attn.v_proj.bias": vb,
            p + "self_attn.o_proj.weight": get(h + "attn.c_proj.weight").t(),
            p + "self_attn.o_proj.bias": get(h + "attn.c_proj.bias"),
            p + "mlp.up_proj.weight": get(h + "mlp.c_fc.weight").t(), p + "mlp.up_proj.bias": get(h + "mlp.c_fc.bias"),
            p + "mlp.down_proj.weight": get(h + "mlp.c_proj.weight").t(),
            p + "mlp.down_proj.bias": get(h + "mlp.c_proj.bias"),
        }
    sd["lm_head.weight"] = sd["embed_tokens.weight"] if cfg.tie_embeddings else get("lm_head.weight")
    return cfg, sd


def _from_llama(config: dict[str, Any], weights: dict[str, torch.Tensor], where: str
                ) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    act = config.get("hidden_act", "silu")
    _need(where, act == "silu", f"hidden_act {act!r}")
    # transformers 5 writes RoPE's settings as rope_parameters; 4.x as rope_theta and rope_scaling.
    ropes = [r for r in (config.get("rope_parameters"), config.get("rope_scaling")) if isinstance(r, dict)]
    for rope in ropes:
        kind = rope.get("rope_type", rope.get("type", "default"))
        _need(where, kind == "default", f"RoPE scaling {kind!r}")
    theta = config.get("rope_theta") or next((r["rope_theta"] for r in ropes if r.get("rope_theta")), 10000.0)
    d, n_head = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or d // n_head
    _need(where, head_dim * n_head == d, f"head_dim {head_dim} x {n_head} heads unlike hidden_size {d}")
    bias, mlp_bias = config.get("attention_bias", False), config.get("mlp_bias", False)
    _need(where, bias == mlp_bias, "biases in attention but not in the MLP (or the other way)")
    cfg = ModelConfig(family="llama", vocab_size=config["vocab_size"], n_layer=config["num_hidden_layers"],
                      n_head=n_head, n_kv_head=config.get("num_key_value_heads") or n_head, n_embd=d,
                      intermediate_size=config["intermediate_size"],
                      block_size=config.get("max_position_embeddings", 2048), bias=bias,
                      tie_embeddings=config.get("tie_word_embeddings", False), rope_theta=float(theta),
                      norm_eps=config.get("rms_norm_eps", 1e-6))
    _check_sizes(cfg, where)
    get = _getter({k.removeprefix("model."): v for k, v in weights.items() if not k.endswith("rotary_emb.inv_freq")},
                  where)
    with torch.device("meta"):  # the names only: Llama's are homellm's own under `model.`
        names = [k for k in GPT(cfg).state_dict() if k != "lm_head.weight"]
    sd = {k: get(k) for k in names}
    sd["lm_head.weight"] = sd["embed_tokens.weight"] if cfg.tie_embeddings else get("lm_head.weight")
    return cfg, sd


def _getter(src: dict[str, torch.Tensor], where: str):
    def get(name: str) -> torch.Tensor:
        if name not in src:
            raise HomeLLMError(f"{where}: the weights lack {name!r}, which config.json's architecture needs: "
                               "download the model again")
        return src[name].float()
    return get


def _source_end_ids(folder: Path, tok: Tokenizer) -> set[int]:
    """The ids a transformers model ends its text at: generation_config.json's and config.json's eos_token_id (an id
    or a list of them), and the tokenizer's own end of text (tokenizer_config.json's eos_token)."""
    return {tok.eot_id, *config_eos_ids(folder / "generation_config.json"), *config_eos_ids(folder / "config.json")}


# ---- export ------------------------------------------------------------------------------------------------------

def export_run(run: str | Path, out: str | Path, checkpoint: str = "best", dtype: str = "float32") -> Path:
    """`homellm export`: the run's model as a transformers folder (config.json, model.safetensors, the tokenizer
    with its chat template, generation_config.json and a model card), written whole or not at all."""
    from homellm.checkpoint import INFO, load_model, speaks_chatml

    run, out = Path(run), Path(out)
    check_checkpoint_name(checkpoint)
    if dtype not in DTYPES:
        raise HomeLLMError(f"--dtype {dtype!r} is unknown: use {', '.join(DTYPES)}")
    _check_empty(out)
    model = load_model(run, checkpoint)  # a LoRA run's adapters come merged into their base's weights
    info = load_json(model.loaded_from / INFO)  # (the card describes the weights exported, not a newer `last`)
    tok = Tokenizer.load(run)
    weights = {k: v.to(DTYPES[dtype]).contiguous() for k, v in to_transformers(model).items()}
    chat = speaks_chatml(run)
    ids = {"bos_token_id": tok.start_id, "pad_token_id": tok.pad_id,
           # A chat model ends its turn with <|im_end|>: generate() stops there, as homellm's chat does, and at a
           # new turn's <|im_start|> (a reply that skips its <|im_end|>) too.
           # (once each: an imported instruct model's end of text may be its <|im_end|>)
           "eos_token_id": list(dict.fromkeys([tok.im_end_id, tok.eot_id, tok.im_start_id])) if chat else tok.eot_id}

    def write(stage: Path) -> None:
        # transformers refuses safetensors without {"format": "pt"}: it tells save_pretrained's files by it.
        save_file(weights, str(stage / "model.safetensors"), metadata={"format": "pt"})
        save_json(stage / "config.json", {**transformers_config(model.cfg, tok, dtype), **ids})
        save_json(stage / "generation_config.json", ids)
        tok.save(stage, model_max_length=model.cfg.block_size)
        (stage / "README.md").write_text(_model_card(run, out, model, info, chat), encoding="utf-8")

    atomic_folder(out, write, ".exporting")
    return out


def _model_card(run: Path, out: Path, model: GPT, info: dict[str, Any], chat: bool) -> str:
    c = model.cfg
    val = f", val loss {info['val_loss']:.4f}" if info.get("val_loss") is not None else ""
    use = ('messages = [{"role": "user", "content": "Hello"}]\n'
           'inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, '
           'return_tensors="pt")\n'
           'out = model.generate(**inputs, max_new_tokens=64)[0][inputs["input_ids"].shape[1]:]\n'
           'print(tok.decode(out, skip_special_tokens=True))'
           if chat else
           'ids = tok("Once upon a time", return_tensors="pt").input_ids\n'
           'print(tok.decode(model.generate(ids, max_new_tokens=64, do_sample=True)[0]))')
    return (f"---\nlibrary_name: transformers\ntags: [homellm]\n---\n\n# {out.name}\n\n"
            f"A {'chat ' if chat else ''}language model built with homellm ({run.name}, checkpoint at step "
            f"{info.get('step', 0):,}, {info.get('tokens', 0):,} tokens{val}).\n\n"
            f"| | |\n|---|---|\n| architecture | {'Llama' if c.family == 'llama' else 'GPT-2'} |\n"
            f"| parameters | {model.num_params():,} |\n| layers / heads / width | {c.n_layer} / {c.n_head} / "
            f"{c.n_embd} |\n| context | {c.block_size} tokens |\n| vocabulary | {c.vocab_size} |\n\n"
            f"```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'tok = AutoTokenizer.from_pretrained("{out.name}")\n'
            f'model = AutoModelForCausalLM.from_pretrained("{out.name}")\n{use}\n```\n')


# ---- import ------------------------------------------------------------------------------------------------------

def import_model(source: str, out: str | Path, context: int = 0) -> Path:
    """`homellm import`: a transformers GPT-2 or Llama (a folder as save_pretrained writes it, or hf:NAME from the
    hub) as a homellm run, ready for `sft --init`, generate, chat and serve. The tokenizer gains homellm's chat and
    padding tokens where it lacks them; their embeddings start as rows drawn around the others' (each its own: see
    below), and fine-tuning teaches them."""
    from homellm.checkpoint import load_weights_into, save_checkpoint
    from homellm.tokenizer import imported_tokenizer

    out = Path(out)
    _check_empty(out)
    folder = hub_download(source) if source.startswith("hf:") else Path(source)
    if not folder.exists():
        raise HomeLLMError(f"{source}: not found: give a transformers model folder (as save_pretrained writes it) or "
                           "hf:NAME")
    if not (folder / "config.json").is_file():
        raise HomeLLMError(f"{source}: no config.json there: give a transformers model folder (as save_pretrained "
                           "writes it) or hf:NAME")
    config = read_hf_config(folder)
    # The tokenizer before the weights: a model of gigabytes is not read to be refused for a missing file.
    spm = sorted(folder.glob("*.model"))
    if not any((folder / f).is_file() for f in ("tokenizer.json", "vocab.json", "encoder.json")):
        if spm:  # rinna's Japanese GPT-2 ships a SentencePiece model alone: transformers converts it
            raise HomeLLMError(f"{source}: its tokenizer is SentencePiece ({spm[0].name}) with no tokenizer.json: "
                               "write one with transformers (pip install transformers sentencepiece protobuf): "
                               f"python -c \"from transformers import AutoTokenizer; AutoTokenizer.from_pretrained("
                               f"'{folder}').save_pretrained('{folder}')\", then import it again")
        raise HomeLLMError(f"{source}: no tokenizer there (tokenizer.json, or GPT-2's vocab.json + merges.txt): "
                           "download the model's tokenizer files too")
    tok, added = imported_tokenizer(folder)
    template = source_chat_template(folder)
    # A chat model of ChatML with its own <|im_start|> and <|im_end|> (SmolLM's and Qwen's instruct models) chats as
    # homellm's fine-tuned runs do; any other template is not kept, and the model learns ChatML with `sft`. A chat
    # model ends its text at <|im_end|>: a base model with a ChatML template (Qwen's base models, and every homellm
    # export, whose tokenizer carries the template) ends at its end of text, and came back as a chat model.
    chatml = ("<|im_start|>" in template and tok.im_start_id not in added and tok.im_end_id not in added
              and tok.im_end_id in _source_end_ids(folder, tok))
    # (A ChatML template is homellm's own, kept whether the model learned it or not; one whose tokens had to be
    # added was never the model's.)
    if chatml and (system := template_system(template)):
        tok.system = system  # chat and serve start a conversation without a system message with it, as transformers
        say(f"note: {source}'s chat template gives a conversation without a system message its own: {system!r}; kept "
            "(chat, serve, sft and export use it; a system message replaces it)")
    if template and ("<|im_start|>" not in template or tok.im_start_id in added or tok.im_end_id in added):
        say(f"note: {source}'s own chat template is not kept: homellm chats in ChatML (<|im_start|>user ... "
            "<|im_end|>), which this model has not learned: fine-tune it on conversations with `homellm sft` before "
            "chatting")
    cfg, sd = from_transformers(config, read_weights(folder), str(folder))
    # Ids the model has rows for, trained or padding; the tokenizer's own ids must all be among them.
    known = 1 + max((i for i in tok.hf.get_vocab(with_added_tokens=True).values() if i not in added), default=-1)
    if known > cfg.vocab_size:
        raise HomeLLMError(f"{source}: its tokenizer has {known:,} ids but the model {cfg.vocab_size:,} (config.json's "
                           "vocab_size): the tokenizer is not this model's: download the model's own")
    if added:  # homellm's chat and padding tokens: new rows, or padding rows the model never trained
        grown = max(cfg.vocab_size, tok.padded_size)
        for name in {"embed_tokens.weight", "lm_head.weight"}:
            w = sd[name]
            w = torch.cat([w, w.new_zeros(grown - len(w), w.shape[1])])
            # Each its own row, drawn around the others' mean with their spread: as one mean row, the new tokens tied
            # and <|im_end|>'s logit was the mean of the others' for good under LoRA (which trains neither matrix),
            # so a LoRA-tuned reply never ended. Seeded: the same import gives the same weights (and a tied head the
            # same rows as its embedding).
            trained = w[:known].float()
            noise = torch.randn(len(added), w.shape[1], generator=torch.Generator().manual_seed(0))
            w[added] = (trained.mean(0) + trained.std(0) * noise).to(w.dtype)
            sd[name] = w
        cfg.vocab_size = grown
    if context:
        if context > cfg.block_size:
            raise HomeLLMError(f"--context {context}: the model was trained for {cfg.block_size} positions at "
                               f"most: give {cfg.block_size} or fewer")
        cfg.block_size = context  # Llama 3's 131,072 would make RoPE tables and caches that size
        if "embed_positions.weight" in sd:
            sd["embed_positions.weight"] = sd["embed_positions.weight"][:context]
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight")
    model = GPT(cfg)
    load_weights_into(model, sd, str(folder), str(folder / "config.json"),
                      "the weights are not the model config.json describes: download the model again")

    def write(stage: Path) -> None:
        save_json(stage / "config.json", {"model": to_dict(cfg), "train": to_dict(TrainConfig(out=str(out))),
                                          "imported_from": source, **({"chat_format": "chatml"} if chatml else {})})
        tok.save(stage / "tokenizer", model_max_length=cfg.block_size)
        save_checkpoint(stage, "best", model, None, {"step": 0, "tokens": 0, "imported_from": source})

    atomic_folder(out, write, ".importing")
    return out


# A system turn written as a literal in a ChatML template: its text without quotes, braces or a backslash other than
# an escape (a line break is written \n in Qwen's, as itself in SmolLM's)
_LITERAL_SYSTEM = re.compile(r"<\|im_start\|>system(?:\\n|\n)((?:\\.|[^'\\{}])*?)<\|im_end\|>")


def template_system(template: str) -> str:
    """The system prompt a ChatML template writes where the conversation has none, "" for none: SmolLM2's "You are a
    helpful AI assistant named SmolLM, trained by Hugging Face", Qwen2.5's "You are Qwen, created by Alibaba Cloud.
    You are a helpful assistant.". The model was fine-tuned with it: without it, its replies are another model's."""
    for m in _LITERAL_SYSTEM.finditer(template):
        if m[1].strip():
            return re.sub(r"\\(.)", lambda e: {"n": "\n", "t": "\t"}.get(e[1], e[1]), m[1])
    return ""


def source_chat_template(folder: Path) -> str:
    """A transformers folder's chat template ("" for none): chat_template.jinja, chat_template.json, or
    tokenizer_config.json's chat_template (a string, or named templates, of which the default)."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8", errors="replace")
    for name in ("chat_template.json", "tokenizer_config.json"):
        try:
            template = load_json(folder / name).get("chat_template") if (folder / name).is_file() else None
        except (HomeLLMError, AttributeError):  # unreadable or not an object: the tokenizer import judges that file
            continue
        if isinstance(template, list):
            template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") ==
                             "default"), None)
        if isinstance(template, str):
            return template
    return ""


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """A transformers folder's tensors: model.safetensors, pytorch_model.bin, or the shards their index names."""
    # Safetensors first, sharded or not: an hf: download fetches those only, and a .bin index may lie beside them.
    files: list[str] = []
    for name in ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                 "pytorch_model.bin"):
        if (folder / name).is_file():
            index = load_json(folder / name) if name.endswith(".json") else {"weight_map": {"": name}}
            mapping = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(mapping, dict):
                raise HomeLLMError(f"{folder / name}: no weight_map object: download the model again")
            files = sorted(set(mapping.values()))
            break
    if not files:
        raise HomeLLMError(f"{folder}: no model.safetensors or pytorch_model.bin: download the model's weights too")
    weights: dict[str, torch.Tensor] = {}
    for name in files:
        path = folder / name
        if not path.is_file():  # (it got the damaged-download advice, git-lfs included: review)
            raise HomeLLMError(f"{path}: not there, though the model's index names it: download that file too")
        try:
            if name.endswith(".safetensors"):
                weights |= load_file(str(path))
            else:  # weights_only: a pickle from the internet must not run code
                with warnings.catch_warnings():  # torch's own warning about the file, before the error below
                    warnings.simplefilter("ignore")
                    weights |= torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # safetensors', torch's and pickle's own errors: a truncated file, a Git LFS pointer
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            if "weights_only" in str(e):  # torch's text advises loading it unsafely, which a damaged file must not get
                reason = "not PyTorch weights that load without running code"
            raise HomeLLMError(f"{path}: cannot be read ({reason}): download the model again (a clone made without "
                               "git-lfs holds pointers, not weights: `git lfs pull`)") from None
    return weights


def hub_download(spec: str, weights: bool = True) -> Path:
    """hf:NAME from the Hugging Face hub, the files an import reads only (safetensors, else the .bin); without
    `weights`, the tokenizer's and config files alone."""
    try:
        from huggingface_hub import snapshot_download  # optional: comes with datasets and transformers
    except ImportError:
        raise HomeLLMError(f"{spec}: downloading from the Hugging Face hub needs huggingface_hub: pip install "
                           "'homellm[hf]'") from None
    name = spec[3:]
    try:
        small = ["*.json", "*.model", "*.txt", "*.jinja"]  # (chat_template.jinja: newer uploads keep it apart)
        folder = Path(snapshot_download(name, allow_patterns=small + ["*.safetensors"] * weights))
        if weights and not any(folder.glob("*.safetensors")):
            folder = Path(snapshot_download(name, allow_patterns=small + ["*.bin"]))
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise HomeLLMError(f"{spec}: cannot download ({reason}): check the name and the network (a gated model "
                           "needs `hf auth login`, or `huggingface-cli login` with an older huggingface_hub)") from None
    return folder


def _check_empty(out: Path) -> None:
    if out.is_file() or (out.is_dir() and any(out.iterdir())):
        raise HomeLLMError(f"--out {out} is not empty: choose a new folder (or delete that one first)")
