"""`homellm export` and `homellm import`: a run as a transformers model folder and back, checked through
transformers' own from_pretrained, generate and tokenizers (nothing downloaded: models are built from configs)."""

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import homellm
from homellm.checkpoint import load_model, save_checkpoint
from homellm.config import ModelConfig, TokenizerConfig, TrainConfig, replace, save_json, to_dict
from homellm.errors import HomeLLMError
from homellm.hf import export_run, import_model
from homellm.model import GPT
from homellm.tokenizer import Tokenizer, train_tokenizer

transformers = pytest.importorskip("transformers", reason="needs the dev extra: pip install -e '.[dev]'")

TEXT = ("ROMEO: But soft, what light through yonder window breaks?\n"
        "むかしむかし、ある山のふもとに小さな村がありました。\n滚滚长江东逝水，浪花淘尽英雄。 12 + 7 = 19\n")


def make_run(path: Path, family: str, sft: bool = False, **kw) -> Path:
    """A run folder as pretrain writes one, with every weight random (homellm's init would hide a misplaced norm
    or bias) and a BPE tokenizer of three scripts."""
    tok = train_tokenizer(TokenizerConfig(input=[str(text_file(path.parent))], out=str(path / "tokenizer"),
                                          vocab_size=400))
    torch.manual_seed(0)
    cfg = ModelConfig(family=family, vocab_size=-(-tok.vocab_size // 64) * 64, n_layer=2, n_head=4, n_embd=64,
                      block_size=48, **kw)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p)) if p.dim() == 1 else p.normal_(0.0, p.size(1) ** -0.5)
    config = {"model": to_dict(cfg), "train": to_dict(TrainConfig(out=str(path)))}
    if sft:
        config["sft"] = {"init": "base"}
    save_json(path / "config.json", config)
    save_checkpoint(path, "best", model, None, {"step": 7, "tokens": 700, "val_loss": 3.25})
    return path


def text_file(folder: Path) -> Path:
    path = folder / "text.txt"
    path.write_text(TEXT * 20, encoding="utf-8")
    return path


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """The command in-process (a fresh process per call costs seconds of imports): exit code, stdout, stderr."""
    from homellm.cli import main

    capsys.readouterr()
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def ids_of(text: str, tok: Tokenizer) -> torch.Tensor:
    return torch.tensor([tok.encode(text)])


# Both families, with and without grouped-query attention, tied embeddings and biases (test_gguf.py uses them too).
ARCHITECTURES = pytest.mark.parametrize(
    "family, kw", [("llama", dict(n_kv_head=2, rope_theta=500.0, norm_eps=1e-4)),
                   ("llama", dict(tie_embeddings=False, bias=True)), ("gpt2", dict(n_kv_head=2, bias=True)),
                   ("gpt2", dict(tie_embeddings=False, dropout=0.1))],
    ids=["llama-gqa", "llama-untied-bias", "gpt2-gqa-bias", "gpt2-untied-nobias"])


@ARCHITECTURES
def test_an_exported_run_loads_in_transformers_and_answers_as_homellm_does(tmp_path, family, kw, capsys):
    run = make_run(tmp_path / "run", family, **kw)
    code, stdout, _ = cli(capsys, "export", str(run), "--out", str(tmp_path / "hf"))
    step = json.loads((run / "best" / "checkpoint.json").read_text())["step"]
    assert stdout == f"transformers model written to {tmp_path / 'hf'} (from checkpoint best, step {step})\n"
    out = tmp_path / "hf"
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "generation_config.json",
                                                    "model.safetensors", "special_tokens_map.json",
                                                    "tokenizer.json", "tokenizer_config.json"]
    mask = os.umask(0)
    os.umask(mask)
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o666 & ~mask}  # safetensors alone made 0600
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    ours, tok = load_model(run), Tokenizer.load(run)
    if family == "gpt2":  # trained with dropout, it trains on with it in transformers (it was written as 0)
        assert hf.config.resid_pdrop == hf.config.embd_pdrop == hf.config.attn_pdrop == ours.cfg.dropout
    ids = ids_of(TEXT[:120], tok)[:, :48]
    assert hf_tok(TEXT[:120], add_special_tokens=False, return_tensors="pt").input_ids[:, :48].equal(ids)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids)[0], rtol=1e-5, atol=1e-5)
    # Greedy continuations through transformers' generate (its own KV cache) and homellm's are the same ids.
    # (Both over every id: homellm's commands keep to the tokenizer's ids and to valid UTF-8, which random weights
    # would otherwise leave, but generate_ids alone is plain argmax, as transformers' is.)
    from homellm.config import SampleConfig
    from homellm.generate import generate_ids

    theirs = hf.generate(ids[:, :10], max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    mine = list(generate_ids(ours, ids[0, :10].tolist(), SampleConfig(temperature=0.0, max_new_tokens=12)))
    assert theirs[0, 10:].tolist() == mine
    card = (out / "README.md").read_text()
    assert "step 7" in card and "val loss 3.2500" in card and f"{ours.num_params():,}" in card


def test_a_chat_run_exports_its_turn_end_and_halves_in_bfloat16(tmp_path):
    """A fine-tuned run ends its turns with <|im_end|>: transformers' generate must stop there, and the exported
    chat template must render what homellm trained on."""
    from homellm.chat import prompt_ids

    run = make_run(tmp_path / "run", "llama", sft=True)
    out = export_run(run, tmp_path / "hf", dtype="bfloat16")
    tok = Tokenizer.load(run)
    # (and at a new turn, where homellm stops too: a reply that skipped its <|im_end|> went on into the next turn)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [
        tok.im_end_id, tok.eot_id, tok.im_start_id]
    assert {v.dtype for v in load_file(str(out / "model.safetensors")).values()} == {torch.bfloat16}
    assert (out / "model.safetensors").stat().st_size < 0.6 * (run / "best" / "model.safetensors").stat().st_size
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    messages = [{"role": "user", "content": "12 + 7?"}]
    rendered = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert list(getattr(rendered, "input_ids", rendered)) == prompt_ids(tok, messages)
    # The model card's snippet runs as written (transformers 5 returns a BatchEncoding from apply_chat_template).
    snippet = (out / "README.md").read_text().split("```python\n")[1].split("```")[0]
    exec(snippet.replace(f'"{out.name}"', f'"{out}"'), {})
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16


def test_export_refuses_bad_input_in_one_line(tmp_path, capsys):
    run = make_run(tmp_path / "run", "llama")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    for args, message in [(["--out", str(tmp_path / "full")], "is not empty: choose a new folder"),
                          (["--out", str(tmp_path / "h"), "--dtype", "auto"], "--dtype 'auto' is unknown"),
                          # (it listed auto among the types to use)
                          (["--out", str(tmp_path / "h"), "--dtype", "int8"],
                           "--dtype 'int8' is unknown: use float32, bfloat16 or float16\n"),
                          ([], "--out is required")]:
        code, _, err = cli(capsys, "export", str(run), *args)
        assert code == 2 and message in err, err
    assert (tmp_path / "full" / "x").read_text() == "keep me" and not (tmp_path / "h").exists()


# ---- import -------------------------------------------------------------------------------------------------------

def hub_folder(tmp_path: Path, family: str, legacy: bool = False, ends: str = "", vocab: int = 0
               ) -> tuple[Path, object]:
    """A transformers model saved as the hub serves one, with a tokenizer that has only <|endoftext|>: homellm must
    add its chat and padding tokens, and grow the embeddings for them. With `ends`, a Llama's tokenizer with </s>
    (id 0) and <s> instead, which adds <s> before text: named as Llama 2's files name them ("llama2":
    tokenizer_config.json's add_bos_token and eos_token) or as Llama 3's ("llama3": tokenizer.json's template and
    config.json's eos_token_id only). `vocab`: the model's rows, where they are not the tokenizer's ids."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    folder = tmp_path / f"hub-{family}{ends}"
    folder.mkdir()
    raw = HFTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    special = ["</s>", "<s>"] if ends else ["<|endoftext|>"]
    raw.train_from_iterator([TEXT] * 20, trainers.BpeTrainer(vocab_size=300, special_tokens=special,
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if ends == "llama3":  # (a Llama 2 folder may say add_bos_token alone)
        raw.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", 1)])
    if ends:
        config = ({"add_bos_token": True, "bos_token": {"content": "<s>", "special": True}, "eos_token": "</s>"}
                  if ends == "llama2" else {"bos_token": "<s>"})
        (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                                  **config}))
    if legacy:  # no tokenizer.json: GPT-2's vocab.json + merges.txt, as the older uploads have
        raw.model.save(str(folder))
    else:
        raw.save(str(folder / "tokenizer.json"))
    vocab = vocab or raw.get_vocab_size()
    torch.manual_seed(1)
    if family == "gpt2":
        config = transformers.GPT2Config(vocab_size=vocab, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                         layer_norm_epsilon=1e-5, attn_implementation="eager")
    else:
        config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                          rope_theta=300.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                                          attn_implementation="eager", bos_token_id=1, eos_token_id=0 if ends else 2)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.3)
    if legacy:  # GPT-2 as OpenAI first put it on the hub: pytorch_model.bin, no `transformer.` prefix, mask buffers
        sd = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
        sd |= {f"h.{i}.attn.bias": torch.tril(torch.ones(1, 1, 64, 64)) for i in range(2)}
        torch.save(sd, folder / "pytorch_model.bin")
        config.save_pretrained(folder)
    else:
        hf.save_pretrained(folder)
    return folder, (hf, raw)


@pytest.mark.parametrize("family, legacy", [("gpt2", False), ("gpt2", True), ("llama", False)],
                         ids=["gpt2", "gpt2-legacy-bin", "llama"])
def test_an_imported_model_computes_what_transformers_does_and_goes_back_out(tmp_path, family, legacy, capsys):
    folder, (hf, raw) = hub_folder(tmp_path, family, legacy)
    code, stdout, _ = cli(capsys, "import", str(folder), "--out", str(tmp_path / "my run"))
    assert code == 0 and f"homellm sft --init '{tmp_path / 'my run'}'" in stdout  # quoted: pasted whole
    run = tmp_path / "run"
    (tmp_path / "my run").rename(run)
    model, tok = load_model(run), Tokenizer.load(run)
    vocab = hf.config.vocab_size
    assert model.cfg.vocab_size == 320 and tok.vocab_size == vocab + 3  # im_start, im_end, pad added; padded to 64
    assert tok.encode(TEXT) == raw.encode(TEXT).ids  # the model's own ids, from tokenizer.json or GPT-2's files
    ids = torch.randint(0, vocab, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = hf(ids).logits
        torch.testing.assert_close(model(ids)[0][..., :vocab], want, rtol=1e-5, atol=1e-5)
    # The new tokens start as a token drawn from the others' spread, each its own: as one mean row they tied, and
    # under LoRA (which trains neither matrix) <|im_end|>'s logit stayed the mean of the others': replies never ended.
    emb = model.embed_tokens.weight.detach()
    new = emb[[tok.im_start_id, tok.im_end_id, tok.pad_id]]
    assert torch.cdist(new, new).add(torch.eye(3) * 1e9).min() > 0.5 * emb[:vocab].std(0).norm()  # apart, as tokens are
    assert (new.mean(0) - emb[:vocab].mean(0)).abs().max() < 3 * emb[:vocab].std(0).max()  # drawn around their mean
    # generate runs on it, and the run goes back out to transformers computing the same.
    assert cli(capsys, "generate", str(run), "--prompt", "ROMEO:", "--max-new-tokens", "5")[0] == 0
    export_run(run, tmp_path / "back")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back", attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits[..., :vocab], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ends", ["llama2", "llama3"])
def test_an_imported_llama_ends_at_its_own_eos_and_reads_text_after_its_bos(tmp_path, ends, capsys, monkeypatch):
    """A Llama ends text with </s> and reads it after <s>. Imported with homellm's new <|endoftext|> as its end
    (untrained), generate never stopped, prompts lost their <s>, and an export told transformers the new ids."""
    from homellm.chat import prompt_ids, render
    from homellm.config import SampleConfig
    from homellm.generate import stream_text

    folder, (_, raw) = hub_folder(tmp_path, "llama", ends=ends)
    sd = load_file(str(folder / "model.safetensors"))
    sd["lm_head.weight"].zero_()  # every logit equal: greedy writes id 0, </s>
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    run = import_model(str(folder), tmp_path / "run")
    tok = Tokenizer.load(run)
    eos, bos = raw.token_to_id("</s>"), raw.token_to_id("<s>")
    assert (tok.eot_id, tok.bos_id, eos) == (eos, bos, 0)
    assert tok.encode_prompt("ROMEO:") == [bos, *raw.encode("ROMEO:", add_special_tokens=False).ids]
    stats: dict = {}
    text = "".join(stream_text(load_model(run), tok, "ROMEO:", SampleConfig(temperature=0, max_new_tokens=6),
                               stats))
    # It stops at once (before, it wrote </s> six times and went on).
    assert (text, stats["new_tokens"], stats["prompt_tokens"]) == ("", 0, len(tok.encode("ROMEO:")) + 1)
    assert render(tok, [{"role": "user", "content": "hi"}])[0][0] == bos  # a conversation starts after <s> too
    # Your own evaluation reads an answer up to the model's end: here nothing, then </s> (was scored '</s>').
    (tmp_path / "qa.jsonl").write_text(json.dumps({"prompt": "ROMEO:", "answer": ""}) + "\n")
    code, out, err = cli(capsys, "eval", str(run), "--task", "exact", "--data", str(tmp_path / "qa.jsonl"))
    assert code == 0 and json.loads((run / "eval_exact.json").read_text())["correct"] == 1, out + err
    import homellm.generate

    kept, original = [], homellm.generate.generate_ids
    monkeypatch.setattr(homellm.generate, "generate_ids", lambda *a: kept.append(a[-1]) or original(*a))
    list(stream_text(load_model(run), tok, "ROMEO: " * 40, SampleConfig(temperature=0, max_new_tokens=6)))
    assert kept == [1]  # a prompt longer than the context slides, and <s> stays at the start of every window
    # Text prepared with the run's tokenizer (to pretrain it further) is one document: <s> ... </s>.
    code, _, err = cli(capsys, "prepare", "--input", str(text_file(tmp_path)), "--tokenizer", str(run), "--out",
                       str(tmp_path / "data"), "--val-fraction", "0")
    assert code == 0, err
    tokens = np.fromfile(next((tmp_path / "data").glob("train_*.bin")), dtype="<u2").tolist()
    assert tokens[0] == bos and tokens[-1] == eos and tokens.count(bos) == tokens.count(eos) == 1
    # transformers is told the model's own ids, and its tokenizer puts <s> before text as homellm does.
    export_run(run, tmp_path / "back")
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (bos, eos)
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    assert auto("ROMEO:").input_ids == tok.encode_prompt("ROMEO:") and auto.eos_token_id == eos
    messages = [{"role": "user", "content": "12 + 7?"}]
    rendered = auto.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert list(getattr(rendered, "input_ids", rendered)) == prompt_ids(tok, messages)  # <s> first, once
    again = Tokenizer.load(import_model(str(tmp_path / "back"), tmp_path / "again"))
    assert (again.eot_id, again.bos_id) == (eos, bos)
    if importlib.util.find_spec("gguf"):  # and llama.cpp is told to put <s> before text
        from homellm.gguf_file import export_gguf, read_gguf

        meta, _ = read_gguf(export_gguf(run, tmp_path / "m.gguf"))
        assert [meta[f"tokenizer.ggml.{k}"] for k in ("bos_token_id", "eos_token_id", "add_bos_token")] == [
            bos, eos, True]


def test_an_imported_model_fine_tunes(tmp_path, capsys):
    """The point of importing (seed 004 fine-tuned GPT-2): sft --init on it trains and writes a chat run."""
    folder, _ = hub_folder(tmp_path, "gpt2")
    import_model(str(folder), tmp_path / "run", context=32)
    assert load_model(tmp_path / "run").embed_positions.weight.shape[0] == 32
    code, out, _ = cli(capsys, "info", str(tmp_path / "run"))  # where it came from, not training defaults
    assert code == 0 and f"imported from {folder}" in out and "training:" not in out
    files = sorted((tmp_path / "run").rglob("*"))
    code, _, err = cli(capsys, "pretrain", "--resume", "--out", str(tmp_path / "run"), "--data",
                       str(text_file(tmp_path)))
    assert code == 2 and "not pretrained here" in err and f"homellm sft --init {tmp_path / 'run'}" in err, err
    assert sorted((tmp_path / "run").rglob("*")) == files  # refused before any text was prepared
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"{a} + 1?"},
                                                      {"role": "assistant", "content": str(a + 1)}]}) + "\n"
                             for a in range(30)))
    code, _, err = cli(capsys, "sft", "--init", str(tmp_path / "run"), "--data", str(chats), "--out",
                       str(tmp_path / "chat"), "--max-steps", "3", "--batch-size", "4", "--eval-every", "0")
    assert code == 0 and (tmp_path / "chat" / "last").is_dir(), err


def test_pretrain_init_goes_on_pretraining_an_imported_model_on_new_text(tmp_path, capsys):
    """Seed 004's first try: GPT-2 trained further on raw text. `pretrain --init RUN` starts from RUN's weights,
    architecture and tokenizer (a shorter context allowed), with the preset's training settings."""
    folder, _ = hub_folder(tmp_path, "gpt2")
    run, cont = import_model(str(folder), tmp_path / "run"), tmp_path / "cont"
    text = str(text_file(tmp_path))
    # A warmup of 1,000 steps: the one step moves AdamW's weights by about lr / 1000 = 3e-6, so they stay the init's.
    common = ["--preset", "tiny", "--data", text, "--warmup-steps", "1000", "--eval-every", "0"]
    code, _, err = cli(capsys, "pretrain", "--init", str(run), "--out", str(cont), "--max-steps", "1",
                       "--block-size", "32", "--tokenizer-vocab", "500", *common)
    assert code == 0 and f"with {run}'s tokenizer" in err and "--tokenizer-vocab does not apply with --init" in err, err
    before, after = load_model(run), load_model(cont, "last")
    assert after.cfg == replace(before.cfg, block_size=32) and Tokenizer.load(cont).same_as(Tokenizer.load(run))
    for name, w in after.state_dict().items():
        torch.testing.assert_close(w, before.state_dict()[name][:32 if "positions" in name else None], atol=2e-5,
                                   rtol=0)
    assert json.loads((cont / "config.json").read_text())["train"]["init"] == str(run)
    assert f"pretrained further from {run}" in cli(capsys, "info", str(cont))[1]
    code, _, err = cli(capsys, "pretrain", "--resume", "--out", str(cont), "--max-steps", "2", "--data", text,
                       "--init", os.path.relpath(run))  # the same run, typed another way
    assert code == 0 and load_model(cont, "last").cfg.block_size == 32, err
    # A start from scratch that stopped after preparing its data, then an --init start in the same folder: the
    # text is read again with the --init run's tokenizer (the data folder was reused, with the wrong one).
    scratch = tmp_path / "scratch"
    assert cli(capsys, "pretrain", "--out", str(scratch), *common, "--vocab-size", "10")[0] == 2  # after preparing
    assert (scratch / "data" / "meta.json").is_file()
    code, _, err = cli(capsys, "pretrain", "--init", str(run), "--out", str(scratch), *common, "--max-steps", "1")
    assert code == 0 and Tokenizer.load(scratch).same_as(Tokenizer.load(run)), err
    for flags, message in [(["--n-layer", "3"], "another architecture than --n-layer 3 (it has 2): drop"),
                           (["--family", "llama"], "another architecture than --family llama (it has gpt2): drop"),
                           (["--block-size", "65"], "trained for 64 positions at most"),
                           (["--out", str(run)], "is the --init run")]:
        out = ["--out", str(tmp_path / "other")] if "--out" not in flags else []
        code, _, err = cli(capsys, "pretrain", "--init", str(run), *out, *flags, *common)
        assert code == 2 and message in err, err
    prepared = tmp_path / "mine"
    assert cli(capsys, "prepare", "--input", text, "--tokenizer", str(make_run(tmp_path / "own", "llama")), "--out",
               str(prepared))[0] == 0
    code, _, err = cli(capsys, "pretrain", "--init", str(run), "--out", str(tmp_path / "other"), "--data",
                       str(prepared), *common[:2])
    assert code == 2 and f"another tokenizer than {run} was trained with" in err, err
    code, _, err = cli(capsys, "pretrain", "--init", str(folder), "--out", str(tmp_path / "other"), *common)
    assert code == 2 and "is a Hugging Face model folder, not a homellm run: make it one with `homellm import" in err


def test_import_refuses_what_it_cannot_run_in_one_line(tmp_path, capsys):
    folder, _ = hub_folder(tmp_path, "llama")
    config = json.loads((folder / "config.json").read_text())
    cases = []
    no_mlp_size = {k: v for k, v in config.items() if k != "intermediate_size"}  # LlamaConfig's 11008 then
    for name, change in [("bert", {**config, "model_type": "bert"}),
                         ("scaled", {**config, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}),
                         ("gelu", config), ("list", [config]), ("text", {**config, "hidden_size": "64"}),
                         ("default", no_mlp_size), ("index", config), ("theta", {**config, "rope_theta": "1e4"}),
                         ("kinds", {**config, "model_type": ["llama"]}),  # a TypeError: unhashable type
                         ("ropep", {**config, "rope_theta": None, "rope_parameters": {"rope_theta": "abc"}}),
                         ("kv", {**config, "num_key_value_heads": 3})]:
        other = tmp_path / name
        other.mkdir()
        (other / "tokenizer.json").write_bytes((folder / "tokenizer.json").read_bytes())
        (other / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
        (other / "config.json").write_text(json.dumps(change))
        cases.append(other)
    sd = load_file(str(folder / "model.safetensors"))
    sd.pop("model.norm.weight")
    save_file(sd, str(cases[2] / "model.safetensors"), metadata={"format": "pt"})
    (cases[6] / "model.safetensors.index.json").write_text("[]")
    expect = ["model_type 'bert' is not one homellm runs", "RoPE scaling 'llama3'", "lack 'norm.weight'",
              "list/config.json: not a JSON object", "text/config.json: hidden_size is '64', not a positive whole",
              "default: layers.0.mlp.gate_proj.weight has shape (96, 64) but", "index.json: no weight_map object",
              "theta/config.json: rope_theta is '1e4', not a positive number",
              "kinds/config.json: model_type ['llama'] is not one homellm runs",
              "ropep/config.json: rope_parameters.rope_theta is 'abc', not a positive number",
              "kv/config.json (as homellm names its sizes): n_head 4 is not divisible by n_kv_head 3: download the "
              "model again"]
    proc = homellm("import", str(cases[0]), "--out", str(tmp_path / "r"), check=False)  # once as a user runs it
    assert proc.returncode == 2 and expect[0] in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    for source, message in zip(cases[1:], expect[1:]):
        code, _, err = cli(capsys, "import", str(source), "--out", str(tmp_path / "r"))
        assert code == 2 and message in err, err
    assert not (tmp_path / "r").exists()
    for f in ("tokenizer.json", "model.safetensors"):  # rinna's layout: a SentencePiece model, no tokenizer.json
        (cases[1] / f).rename(cases[1] / f.replace("tokenizer.json", "spiece.model"))
    (cases[1] / "config.json").write_text(json.dumps(config))
    with pytest.raises(HomeLLMError, match=r"SentencePiece \(spiece.model\) with no tokenizer.json: write one with"):
        import_model(str(cases[1]), tmp_path / "r")
    with pytest.raises(HomeLLMError, match="no config.json there"):
        import_model(str(tmp_path), tmp_path / "r")
    with pytest.raises(HomeLLMError, match="nothere: not found"):
        import_model(str(tmp_path / "nothere"), tmp_path / "r")
    with pytest.raises(HomeLLMError, match="is a homellm run already: use it as it is"):
        import_model(str(make_run(tmp_path / "own", "gpt2")), tmp_path / "r")
    with pytest.raises(HomeLLMError, match="trained for 64 positions at most"):
        import_model(str(folder), tmp_path / "r", context=65)
    assert not (tmp_path / "r").exists() and not (tmp_path / ".r.importing").exists()


def test_imported_chat_tokens_start_around_the_mean_wherever_they_land_and_a_foreign_tokenizer_is_refused(
        tmp_path):
    """A model with more rows than its tokenizer has ids (padded, as Pythia's) got homellm's chat tokens on its
    padding rows, which it never trained; a tokenizer with more ids than the model has rows was imported."""
    folder, _ = hub_folder(tmp_path, "llama", vocab=320)
    model, tok = load_model(import_model(str(folder), tmp_path / "run")), Tokenizer.load(tmp_path / "run")
    assert model.cfg.vocab_size == 320 and [tok.im_start_id, tok.im_end_id, tok.pad_id] == [300, 301, 302]
    source = load_file(str(folder / "model.safetensors"))
    again = load_model(import_model(str(folder), tmp_path / "again"))  # the same import, the same new rows
    for w, name in ((model.embed_tokens.weight, "model.embed_tokens.weight"), (model.lm_head.weight, "lm_head.weight")):
        trained = w[:300].detach()
        new = w[300:303].detach()
        assert (new.mean(0) - trained.mean(0)).abs().max() < 3 * trained.std(0).max()
        assert torch.cdist(new, new).add(torch.eye(3) * 1e9).min() > 0.5 * trained.std(0).norm()  # each its own
        torch.testing.assert_close(w[303:].detach(), source[name][303:])  # the padding rows the tokens skip
    torch.testing.assert_close(again.state_dict(), model.state_dict(), rtol=0, atol=0)
    small, _ = hub_folder(tmp_path, "gpt2", vocab=200)
    with pytest.raises(HomeLLMError, match=r"its tokenizer has 300 ids but the model 200 \(config.json's vocab_size"):
        import_model(str(small), tmp_path / "run2")


def test_hf_name_downloads_only_the_files_an_import_reads(tmp_path, monkeypatch):
    """hf:NAME goes through huggingface_hub's snapshot_download (injected here: no network in tests): safetensors
    and the small files first, and the .bin only for a model that has no safetensors."""
    import sys

    folder, _ = hub_folder(tmp_path, "gpt2", legacy=True)  # pytorch_model.bin only
    calls = []

    def snapshot_download(name, allow_patterns):
        calls.append((name, allow_patterns))
        return str(folder)

    monkeypatch.setitem(sys.modules, "huggingface_hub", type(sys)("huggingface_hub"))
    sys.modules["huggingface_hub"].snapshot_download = snapshot_download
    import_model("hf:someone/tiny-gpt2", tmp_path / "run")
    assert [name for name, _ in calls] == ["someone/tiny-gpt2"] * 2
    assert "*.safetensors" in calls[0][1] and "*.bin" not in calls[0][1] and "*.bin" in calls[1][1]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["imported_from"] == "hf:someone/tiny-gpt2"

    def offline(name, allow_patterns):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your connection.")

    sys.modules["huggingface_hub"].snapshot_download = offline
    with pytest.raises(HomeLLMError, match=r"^hf:x/y: cannot download \(We couldn't connect .*\): check the name"):
        import_model("hf:x/y", tmp_path / "run2")


def test_weights_are_read_safetensors_first_and_a_git_lfs_pointer_is_named(tmp_path):
    """A .bin index beside model.safetensors (its shards not downloaded) was read first and failed; a .bin that a
    clone without git-lfs left as a pointer raised pickle's traceback."""
    from homellm.hf import read_weights

    folder, _ = hub_folder(tmp_path, "gpt2")
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"x": "pytorch_model-1.bin"}}))
    assert "transformer.wte.weight" in read_weights(folder)
    (folder / "model.safetensors").unlink()
    # A shard the index names, not downloaded: said so (review: the git-lfs advice for a file not there)
    with pytest.raises(HomeLLMError, match=r"pytorch_model-1.bin: not there, though the model's index names it: "
                                           "download that file too"):
        read_weights(folder)
    (folder / "pytorch_model.bin.index.json").unlink()
    (folder / "pytorch_model.bin").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 9\n")
    with pytest.raises(HomeLLMError, match=r"pytorch_model.bin: cannot be read .*`git lfs pull`"):
        read_weights(folder)
    # Damaged bytes: torch's text advised loading them with weights_only=False, that is, running what they hold
    (folder / "pytorch_model.bin").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(HomeLLMError, match=r"pytorch_model.bin: cannot be read \(not PyTorch weights that load "
                                           r"without running code\): download the model again") as e:
        read_weights(folder)
    assert "False" not in str(e.value)


@pytest.mark.parametrize("scheme", ["llama2", "metaspace-first"])
def test_a_sentencepiece_tokenizer_renders_chat_as_apply_chat_template_does(tmp_path, scheme):
    """Llama 2 and Mistral write "▁" before text. Each piece of a conversation encoded on its own got one, so sft
    trained ids the exported template never renders, and replies streamed with a space in front."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

    from homellm.chat import prompt_ids, render
    from homellm.config import SPECIAL_TOKENS

    raw = HFTokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    if scheme == "llama2":  # a "▁" before the text and for each space (Llama 2's tokenizer.json)
        raw.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        raw.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    else:  # a "▁" before the first piece of the text only (newer Llama and Mistral files)
        raw.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        raw.decoder = decoders.Metaspace(prepend_scheme="first")
    # (as SentencePiece's, no piece holds a newline: trained on lines, with "\n" a character of its own)
    raw.train_from_iterator(TEXT.splitlines() * 20, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", *SPECIAL_TOKENS], initial_alphabet=["\n"]))
    tok = Tokenizer(raw, eos="</s>", bos="<s>")
    tok.save(tmp_path / "tok")
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "むかしむかし what light?"},
            {"role": "assistant", "content": "But soft"}, {"role": "user", "content": "12 + 7 ="}]
    for messages, gen in ((chat, True), (chat[:3], False)):
        rendered = auto.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True)
        assert render(tok, messages, gen)[0] == list(getattr(rendered, "input_ids", rendered))
    ids, mask = render(tok, chat[:3])
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "But soft<|im_end|>"
    context = prompt_ids(tok, chat[:2])
    assert ids[:len(context)] == context  # the reply is trained as it is asked for
    stream = tok.stream(context=context)
    assert "".join(stream.push(i) for i in ids[len(context):ids.index(tok.im_end_id, len(context))]) == "But soft"
    # A message that holds a special string has it as text, and only its own pieces encoded apart: the system
    # prompt before it (which chat keeps when the window slides) and the reply after it keep their ids.
    odd = [chat[0], {"role": "user", "content": "what </s> light?"}, chat[2]]
    odd_ids, odd_mask = render(tok, odd)
    assert tok.eot_id not in odd_ids  # (</s>, this tokenizer's end of text: here characters it cannot write)
    system = render(tok, chat[:1])[0]
    assert odd_ids[:len(system)] == system
    assert [i for i, m in zip(odd_ids, odd_mask) if m] == [i for i, m in zip(ids, mask) if m]


@pytest.mark.parametrize("post, bos", [("t5", None), ("bert", "[CLS]"), ("template-both-ends", "<s>"),
                                       ("bytelevel-offsets", "<s>")])
def test_a_saved_tokenizer_adds_to_a_text_only_what_homellm_adds(tmp_path, post, bos):
    """A T5-style template (`$A </s>`, as rinna's converted tokenizer has) or BERT's [CLS] $A [SEP] stayed in the
    saved tokenizer.json: transformers then ended every prompt with a document's end, unlike homellm's ids."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, processors, trainers

    from homellm.tokenizer import import_tokenizer

    raw = HFTokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace()
    raw.train_from_iterator(TEXT.splitlines() * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "[CLS]", "[SEP]"]))
    ids = {t: raw.token_to_id(t) for t in ("<s>", "</s>", "[CLS]", "[SEP]")}
    raw.post_processor = {
        "t5": processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", ids["</s>"])]),
        "bert": processors.BertProcessing(("[SEP]", ids["[SEP]"]), ("[CLS]", ids["[CLS]"])),
        "template-both-ends": processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[
            ("<s>", ids["<s>"]), ("</s>", ids["</s>"])]),
        # offsets only, with the bos named by add_bos_token: transformers added no bos, homellm did
        "bytelevel-offsets": processors.ByteLevel(trim_offsets=False)}[post]
    raw.save(str(tmp_path / "tokenizer.json"))
    if bos:  # (a template's first token is its bos; BERT's processor names none, so the config does)
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": bos, "add_bos_token": True}))
    tok = import_tokenizer(tmp_path)
    assert tok.bos == bos
    tok.save(tmp_path / "saved")
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "saved")
    text = "ROMEO: But soft"
    assert auto(text)["input_ids"] == ([tok.bos_id] if bos else []) + tok.encode(text)
    assert Tokenizer.load(tmp_path / "saved").hf.to_str() == tok.hf.to_str()
    if bos:  # a bos the tokenizer lacks is named in one line (the template's rewriting raised a TypeError first)
        config = json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())
        (tmp_path / "saved" / "tokenizer_config.json").write_text(json.dumps({**config, "bos_token": "<nope>"}))
        with pytest.raises(HomeLLMError, match="tokenizer_config.json's bos_token '<nope>' is not in the tokenizer"):
            Tokenizer.load(tmp_path / "saved")


def test_an_imported_chat_model_of_chatml_chats_and_another_template_is_said_not_kept(tmp_path, capsys):
    """Qwen's and SmolLM's instruct models chat in ChatML with their own <|im_start|> and <|im_end|>: imported, they
    were taken for pretrained-only models (chat and serve said so, eval asked them as text). A model's other
    template was replaced by ChatML without a word."""
    from homellm.checkpoint import speaks_chatml

    chatml = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    inst = "{% for m in messages %}{{ '[INST] ' + m['content'] + ' [/INST]' }}{% endfor %}"
    for name, template, file in (("chatml", chatml, "tokenizer_config.json"), ("inst", inst, "chat_template.jinja"),
                                 ("added", chatml, "chat_template.jinja")):
        (tmp_path / name).mkdir()
        folder, (_, raw) = hub_folder(tmp_path / name, "llama", vocab=320)
        if name != "added":  # (a ChatML template without its tokens in the vocabulary: never the model's own)
            raw.add_special_tokens(["<|im_start|>", "<|im_end|>"])  # the model's own: rows it has
        raw.save(str(folder / "tokenizer.json"))
        if file == "tokenizer_config.json":  # (an instruct model's text ends at <|im_end|>, as SmolLM2's)
            (folder / file).write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                   "chat_template": template, "eos_token": "<|im_end|>"}))
        else:
            (folder / file).write_text(template)
        capsys.readouterr()
        run = import_model(str(folder), tmp_path / name / "run")
        err = capsys.readouterr().err
        if name == "chatml":
            assert speaks_chatml(run) and "template" not in err
        else:
            assert not speaks_chatml(run)
            assert f"note: {folder}'s own chat template is not kept: homellm chats in ChatML" in err


# SmolLM2-Instruct's template as it ships (its default system turn in a literal with line breaks as themselves),
# and Qwen2.5-Instruct's way of writing one (\n escapes, after a tools branch that opens a system turn too)
SMOL_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                 "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                 "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                 "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                 "{% endif %}")
QWEN_SYSTEM = (r"{%- if tools %}{{- '<|im_start|>system\n' }}{%- if messages[0]['role'] == 'system' %}{{- "
               r"messages[0]['content'] }}{%- else %}{{- 'You are Qwen, created by Alibaba Cloud. You are a helpful "
               r"assistant.' }}{%- endif %}{%- else %}{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>"
               r"system\n' + messages[0]['content'] + '<|im_end|>\n' }}{%- else %}{{- '<|im_start|>system\nYou are "
               r"Qwen, created by Alibaba Cloud. It\'s a \\ test.<|im_end|>\n' }}{%- endif %}{%- endif %}")


def test_an_imported_chat_models_default_system_prompt_is_kept_and_exported(tmp_path, capsys):
    """SmolLM2's and Qwen2.5's templates start a conversation that has no system message with their own, as the
    models were fine-tuned; homellm rendered none, so chat and serve asked another prompt than transformers does."""
    from homellm.chat import prompt_ids
    from homellm.hf import template_system

    transformers = pytest.importorskip("transformers")
    assert template_system(QWEN_SYSTEM) == "You are Qwen, created by Alibaba Cloud. It's a \\ test."
    assert template_system(SMOL_TEMPLATE) == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    folder, (_, raw) = hub_folder(tmp_path, "llama", vocab=320)
    raw.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    raw.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": SMOL_TEMPLATE, "eos_token": "<|im_end|>"}))
    run = import_model(str(folder), tmp_path / "run")
    assert "note: " + str(folder) + "'s chat template gives a conversation without a system message its own: 'You " \
           "are a helpful AI assistant named SmolLM" in capsys.readouterr().err
    tok = Tokenizer.load(run)
    source = transformers.AutoTokenizer.from_pretrained(folder)
    exported = transformers.AutoTokenizer.from_pretrained(export_run(run, tmp_path / "hf"))
    for messages in ([{"role": "user", "content": "hi there"}],
                     [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"}]):
        ids = prompt_ids(tok, messages)
        for hf_tok in (source, exported):  # the model's own template, and the export's
            assert ids == list(hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                          return_dict=True)["input_ids"])
    assert tok.decode(prompt_ids(tok, [{"role": "user", "content": "hi"}])).startswith(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_exports_come_back_by_import_as_what_they_were_chat_or_not(tmp_path):
    """Every export's tokenizer carries the ChatML template, and its vocabulary <|im_start|> and <|im_end|>: a
    pretrained run exported and imported came back a chat model (compare and eval then asked it as a chat). A chat
    model ends its text at <|im_end|> (the chat export's eos list, SmolLM's and Qwen's instruct models); a model
    whose ends do not include it is not one, ChatML template or not (Qwen's base models)."""
    from homellm.checkpoint import speaks_chatml

    for sft in (False, True):
        run = make_run(tmp_path / f"run{sft}", "llama", sft=sft)
        back = import_model(str(export_run(run, tmp_path / f"hf{sft}")), tmp_path / f"again{sft}")
        assert speaks_chatml(back) == speaks_chatml(run) == sft
