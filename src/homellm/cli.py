"""The `homellm` command: a thin layer of argparse over the library. Flags come from the config dataclasses."""

from __future__ import annotations

import argparse
import codecs
import errno
import json
import os
import re
import sys
import tempfile
import time
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from homellm.config import (
    DEFAULT_PRESET,
    PRESET_USES,
    PRESETS,
    RAW_TEXT_FIELDS,
    SFT_TRAIN,
    TOKENIZER_FIELDS,
    ChatConfig,
    CompareConfig,
    EncodeConfig,
    EvalConfig,
    ExportConfig,
    GenerateConfig,
    ImportConfig,
    ModelConfig,
    PrepareConfig,
    QuickstartConfig,
    ServeConfig,
    SFTConfig,
    TokenizerConfig,
    TrainConfig,
    add_flags,
    check_ranges,
    pick,
    preset,
    replace,
)
from homellm.errors import HomeLLMError, typed
from homellm.io import KINDS, refuse_kinds, say, world_size


def build(cls: type, args: argparse.Namespace) -> Any:
    """The config the flags describe, its values checked: a bad one stops here with a one-line error."""
    cfg = cls(**pick(args, cls))
    check_ranges(cfg)
    if literal := [s for s in getattr(cfg, "stop", []) if "\\n" in s and "\n" not in s]:
        # The shell passes '\n' as a backslash and an n; llama.cpp and Python scripts read it as a line break
        say(f"note: --stop '{literal[0]}' is a backslash and an n, as the shell passed it, not a line break: write "
            "--stop $'\\n' for one (bash, zsh)")
    return cfg


def cmd_tokenizer(args: argparse.Namespace) -> None:
    from homellm.tokenizer import train_tokenizer

    cfg = build(TokenizerConfig, args)
    given = pick(args, TokenizerConfig)
    if cfg.from_file and (unused := [k for k in ("kind", "vocab_size", "max_chars", "text_field", "encoding", "aozora")
                                     if k in given]):
        # (as --input and --words are refused with it: a flag that looked set, and changed nothing)
        raise HomeLLMError(f"--{unused[0].replace('_', '-')} does not apply with --from-file, which takes a finished "
                           "tokenizer as it is: drop it")
    if cfg.kind == "char" and "vocab_size" in given:
        say(f"note: --vocab-size {cfg.vocab_size} applies to BPE only: a char tokenizer has an id per character")
    tok = train_tokenizer(cfg)
    print(f"tokenizer ({tok.kind}, {tok.vocab_size} ids) written to {cfg.out}")


def cmd_encode(args: argparse.Namespace) -> None:
    """The tokens of a text, one a line, and how many characters and bytes a token holds on average: how well a
    tokenizer fits a language (Japanese in a BPE trained on English takes a token per byte or two)."""
    from homellm.info import table
    from homellm.tokenizer import Tokenizer

    cfg = build(EncodeConfig, args)
    text = read_stdin("--text") if cfg.text == "-" else cfg.text
    if not text:
        raise HomeLLMError("--text is empty: give the text to split, or --text - to read it from standard input")
    tok = Tokenizer.load(args.tokenizer)
    if note := tok.unknown_note(text, allow_special=True):
        say(f"note: {note}")
    ids = tok.encode(text, allow_special=True)  # as generate reads a prompt: <|im_start|> typed is the token
    print(table([(str(i), str(t), tok.show(t)) for i, t in enumerate(ids)], ("#", "id", "token")))
    chars, size = len(text), len(text.encode("utf-8"))
    print(f"{len(ids):,} token{'s' * (len(ids) != 1)} for {chars:,} characters ({size:,} UTF-8 bytes): "
          f"{chars / max(len(ids), 1):.2f} characters and {size / max(len(ids), 1):.2f} bytes a token")


def _one_val(cfg: PrepareConfig | TrainConfig, given: dict[str, Any]) -> None:
    """--val-input and a typed --val-fraction both say what val is (the fraction's default is no choice)."""
    if cfg.val_input and "val_fraction" in given:
        raise HomeLLMError(f"--val-fraction {cfg.val_fraction} and --val-input both say what val is: give one "
                           "(--val-input holds out its own text whole)")


def cmd_prepare(args: argparse.Namespace) -> None:
    from homellm.data import prepare

    cfg = build(PrepareConfig, args)
    _one_val(cfg, pick(args, PrepareConfig))
    meta = prepare(cfg)
    print(f"{meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens ({meta['dtype']}) from "
          f"{meta['documents']:,} document{'s' * (meta['documents'] != 1)} written to {cfg.out}")


def resolve_train(args: argparse.Namespace) -> tuple[ModelConfig, TrainConfig]:
    """Preset (or, resuming, the run's saved config), then the flags the user typed on top."""
    from homellm.checkpoint import read_config

    out = getattr(args, "out", "")
    resumed = getattr(args, "resume", False) and out and (Path(out) / "config.json").is_file()
    if resumed and args.preset is not None:
        # Taken over the run's own config, it reset what the run was given (--patience, --eval-every) unsaid.
        raise HomeLLMError(f"--preset {args.preset} does not apply with --resume: {out} keeps its own config; give "
                           "only the flags to change")
    if resumed:
        model_cfg, train_cfg = read_config(out)
        source = f"run {out}"
    elif getattr(args, "init", ""):  # the architecture is the trained run's; training settings the preset's
        model_cfg, train_cfg = read_config(args.init)[0], preset(args.preset or DEFAULT_PRESET)[1]
        source = f"{args.preset or DEFAULT_PRESET} preset"
        from homellm.train import check_init_architecture

        # The flags as typed: once applied, --family would re-derive sizes nobody typed, and pretrain name those.
        check_init_architecture(args.init, pick(args, ModelConfig), model_cfg)
        if ignored := [f"--{k.replace('_', '-')}" for k in TOKENIZER_FIELDS if k in vars(args)]:
            say(f"note: {' '.join(ignored)} {'does' if len(ignored) == 1 else 'do'} not apply with --init: the text is "
                f"read with {args.init}'s own tokenizer")
        if "lr" not in vars(args) and not getattr(args, "resume", False):
            say(f"note: --lr {train_cfg.lr:g} is the {source}'s, for training from scratch: a trained model usually "
                "goes on better at a tenth of that or less (give --lr)")
    else:
        model_cfg, train_cfg = preset(args.preset or DEFAULT_PRESET)
        source = f"{args.preset or DEFAULT_PRESET} preset"
    flags = run_length(pick(args, TrainConfig))
    by = next((f for f in ("max_steps", "epochs") if flags.get(f, 0) > 0), None)
    preset_time = train_cfg.max_time
    time_off = by and "max_time" not in flags and preset_time > 0
    if time_off:
        flags["max_time"] = 0.0
    world = world_size()
    if world > 1 and train_cfg.grad_accum > 1 and "grad_accum" not in flags and source.endswith("preset"):
        # A preset's batch is global, as nanoGPT's: its accumulation is shared among torchrun's processes, or 4 GPUs
        # would train gpt2-124m on 4x its tokens per step, and 4x its tokens in all, on a rate tuned for the one.
        accum = max(1, round(train_cfg.grad_accum / world))
        size = flags.get("batch_size", train_cfg.batch_size)
        exact = "" if accum * world == train_cfg.grad_accum else (
            f" ({size * accum * world} sequences a step instead of {size * train_cfg.grad_accum}, as {world} does not "
            f"divide {train_cfg.grad_accum}: choose with --grad-accum{' and --batch-size' * (accum == 1)})")
        say(f"note: {world} processes share the {source}'s --grad-accum {train_cfg.grad_accum}: each accumulates "
            f"{accum}{exact}")
        train_cfg = replace(train_cfg, grad_accum=accum)
    model_cfg = replace(model_cfg, **pick(args, ModelConfig))
    train_cfg = replace(train_cfg, **flags)
    model_cfg.validate()
    check_ranges(train_cfg)
    if time_off:  # (after the checks: said before an error in another flag, it looked like the error's cause)
        # Asked for N steps, a user expects N steps, not the preset's time budget cutting them short unannounced.
        say(f"note: --{by.replace('_', '-')} {flags[by]} alone ends the run by steps: the {source}'s --max-time "
            f"{preset_time:g} is off (give --max-time too to keep a time budget)")
    say_unused(flags, pick(args, ModelConfig), model_cfg, train_cfg)
    return model_cfg, train_cfg


def say_unused(train: dict[str, Any], model: dict[str, Any], model_cfg: ModelConfig, train_cfg: TrainConfig) -> None:
    """A note for each flag typed that this setup never reads: it looked set, and trained nothing."""
    unused = [("muon_lr" in train and train_cfg.optimizer != "muon", "--muon-lr applies with --optimizer muon only"),
              ("decay_fraction" in train and train_cfg.schedule != "wsd",
               "--decay-fraction applies with --schedule wsd only"),
              ("tokenizer_vocab" in train and train_cfg.tokenizer_kind == "char",
               "--tokenizer-vocab applies to BPE only: a char tokenizer has an id per character"),
              ("rope_theta" in model and model_cfg.family != "llama",
               "--rope-theta applies to --family llama only: gpt2 learns its positions")]
    for given, note in unused:
        if given:
            say(f"note: {note}")


def run_length(flags: dict[str, Any]) -> dict[str, Any]:
    """The training flags typed, checked for one length of run: --max-steps typed on resuming a run that was set in
    epochs replaces them (the epochs would otherwise recompute the steps over it)."""
    if flags.get("max_steps", 0) > 0 and flags.get("epochs", 0) != 0:  # (-1 too: it was dropped without a word)
        raise HomeLLMError("--max-steps and --epochs both set the length of the run: give one of them")
    return {**flags, "epochs": 0.0} if flags.get("max_steps", 0) > 0 else flags


def cmd_pretrain(args: argparse.Namespace) -> None:
    from homellm.train import pretrain

    model_cfg, train_cfg = resolve_train(args)
    raw = [f"--{k.replace('_', '-')}" for k in RAW_TEXT_FIELDS if k in pick(args, TrainConfig)]
    data = train_cfg.data
    prepared = len(data) == 1 and (Path(data[0]) / "meta.json").is_file()
    if train_cfg.val_input and prepared:
        raise HomeLLMError(f"--val-input applies to raw text: {data[0]} is prepared data, with its own val split "
                           "(prepare the text with --val-input, or give --data the text itself)")
    _one_val(train_cfg, pick(args, TrainConfig))
    if raw and prepared:
        say(f"note: {' '.join(raw)} {'applies' if len(raw) == 1 else 'apply'} to raw text only: {data[0]} is "
            "prepared data, with its own tokenizer")
    _finished(pretrain(model_cfg, train_cfg))


def _finished(summary: dict[str, Any] | None) -> None:
    """A training's summary, printed once under torchrun; a run stopped by Ctrl-C (with its checkpoint written)
    still exits as interrupted, for scripts."""
    if summary and os.environ.get("RANK", "0") == "0":
        print(json.dumps(summary, ensure_ascii=False))
    if summary and summary.get("stop") == "session_time":
        say(f"homellm: this session ended at step {summary['steps']} (--session-time); `--resume` continues from "
            "there, on the same schedule, each session stopping after the same --session-time (kept with the run; "
            "add --session-time 0 to train to the end)")
    if summary and summary.get("stop") == "interrupted":
        say(f"homellm: interrupted at step {summary['steps']}; `--resume` continues from there")
        raise SystemExit(130)


_CHATML_HEADER = re.compile(r"<\|im_start\|>[^\n<]*\n\Z")


def read_stdin(flag: str) -> str:
    """Standard input as text: UTF-8, as files are read, else in its own encoding (the locale's, or
    PYTHONIOENCODING's), or a line saying where it is neither. Python's own reading let bytes through as surrogates,
    which the tokenizer refused with a TypeError; and its encoding alone read a UTF-8 file piped in on Windows as
    cp1252 or cp932, where the same file given as a path was UTF-8."""
    if sys.stdin is None:  # closed (`<&-`)
        raise HomeLLMError(f"{flag} -: standard input is closed: pipe the text in, or give it as {flag} TEXT")
    data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
    encoding = getattr(sys.stdin, "encoding", None) or "utf-8"
    try:  # (the buffer skips the text layer's newline translation: a Windows pipe's CRLF is a line break too)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            try:
                text = data.decode(encoding)
            except UnicodeDecodeError:
                from homellm.data import shift_jis_text

                if (text := shift_jis_text(data)) is None:
                    raise
                say("note: standard input read as Shift_JIS (cp932), as prepare reads such files")
        # A byte-order mark (Notepad's UTF-8) is no part of the prompt: it fed the model three tokens of it. Nor is the
        # line break that ends a file or `echo`'s line (as `$(cat FILE)` and llama.cpp's --file drop it): `$12 \times
        # 7 =` then went on from a new line, where the task's answer never stands. Only one: more are the writer's
        # own; and a ChatML turn's header (`<|im_start|>assistant\n`) ends in its own.
        text = text.removeprefix("\ufeff").replace("\r\n", "\n")
        return text if _CHATML_HEADER.search(text) else text.removesuffix("\n")
    except UnicodeDecodeError as e:
        name = "utf-8" if codecs.lookup(encoding).name == "utf-8" else f"utf-8 or {encoding}"
        raise HomeLLMError(f"standard input is not {name} text (byte 0x{data[e.start]:02x} at byte offset "
                           f"{e.start}): convert it first (iconv -f ITS_ENCODING -t utf-8)") from None


def cmd_generate(args: argparse.Namespace) -> None:
    from homellm.checkpoint import load_for_generation, speaks_chatml
    from homellm.generate import check_beams, continuation_prompt, seeded_generator, stream_ids
    from homellm.repl import visible
    from homellm.tokenizer import Tokenizer

    cfg = build(GenerateConfig, args)
    if cfg.interactive and cfg.prompt == "-":
        raise HomeLLMError("--prompt - reads standard input, which --interactive reads prompts from: give the first "
                           "prompt as text, or type it")
    if cfg.num_samples > 1 and cfg.interactive:
        raise HomeLLMError("--num-samples is for one --prompt: --interactive continues each prompt once (type it "
                           "again for another text)")
    if cfg.num_samples > 1 and (cfg.temperature <= 0 or cfg.num_beams > 1):
        how = "--temperature 0 (greedy)" if cfg.temperature <= 0 else f"--num-beams {cfg.num_beams}"
        raise HomeLLMError(f"--num-samples {cfg.num_samples} with {how} writes one text {cfg.num_samples} times: "
                           "sample with a --temperature above 0 and one beam")
    if cfg.prompt == "-":  # a long or multi-line prompt, without the shell's quoting
        cfg = replace(cfg, prompt=read_stdin("--prompt"))
        if not cfg.prompt:  # (review: an empty file or redirect wrote from nothing, unsaid, as --prompt '' does)
            say("note: standard input was empty: the model writes a text from its start, as with --prompt ''")
    model = load_for_generation(args.run, cfg)
    tok = Tokenizer.load(args.run)
    check_beams(cfg, tok)
    if speaks_chatml(args.run) and "<|im_start|>" not in cfg.prompt:
        # (chat says the opposite of a pretrained run): a chat model's continuation of bare text is seldom an answer
        print(f"note: {args.run} is a chat model: `homellm chat {typed(args.run)}` talks to it; "
              "generate continues your text as written", file=sys.stderr)
    if cfg.interactive:
        from homellm.repl import Continuations, chat_loop, line_editing

        line_editing()
        # The first prompt is text as --prompt always is, not a command: "/" is doubled, as typed it would be.
        first = iter(["/" * cfg.prompt.startswith("/") + cfg.prompt] if cfg.prompt else [])
        chat_loop(model, tok, cfg, lambda prompt: next(first, None) or input(prompt), sys.stdout, Continuations)
        return
    prompt, ids, notes = continuation_prompt(tok, cfg.prompt, model.cfg.block_size)
    cfg, device = replace(cfg, prompt=prompt), next(model.parameters()).device
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    new_tokens, seconds, ended = 0, 0.0, 0
    for sample in range(cfg.num_samples):
        if sample:
            print("-" * 40)  # (nanoGPT's sample.py parts its samples so too)
        stats: dict = {}
        sys.stdout.write(cfg.prompt)
        sys.stdout.flush()
        try:  # sample i draws as serve's reply i of a request with this seed: --num-samples 1 is plain generate
            for piece in stream_ids(model, tok, ids, cfg, stats, generator=seeded_generator(cfg.seed, device, sample)):
                sys.stdout.write(visible(piece, sys.stdout))
                sys.stdout.flush()
        finally:
            sys.stdout.write("\n")
        new_tokens, seconds = new_tokens + stats["new_tokens"], seconds + stats["seconds"]
        ended += stats["ended"]
    samples = f"{cfg.num_samples} samples, " if cfg.num_samples > 1 else ""
    # (review: "[0 tokens ...]" with nothing after the prompt looked broken; the model had chosen end of text first)
    end = "the text" if cfg.num_samples == 1 else f"{ended} of the {cfg.num_samples} texts"
    why = f"; the model ended {end} (it chose an end token) before --max-new-tokens {cfg.max_new_tokens}" * bool(ended)
    print(f"[{samples}{new_tokens} token{'s' * (new_tokens != 1)} in {seconds:.2f} s, "
          f"{new_tokens / max(seconds, 1e-9):.1f} tokens/s{why}]", file=sys.stderr)


def cmd_chat(args: argparse.Namespace) -> None:
    from homellm.repl import chat

    chat(args.run, build(ChatConfig, args))


def cmd_compare(args: argparse.Namespace) -> None:
    from homellm.compare import compare

    compare(args.run_a, args.run_b, build(CompareConfig, args))


def cmd_serve(args: argparse.Namespace) -> None:
    from homellm.serve import serve

    serve(args.run, build(ServeConfig, args))


def cmd_info(args: argparse.Namespace) -> None:
    from homellm.info import describe

    print(describe(args.run))


def cmd_eval(args: argparse.Namespace) -> None:
    from homellm.eval import run_eval

    run_eval(args.run, build(EvalConfig, args))


def cmd_sft(args: argparse.Namespace) -> None:
    from homellm.sft import resolve_sft, sft

    train = {k: v for k, v in pick(args, TrainConfig).items()
             if k not in ("init", "init_checkpoint", "val_fraction")}  # SFTConfig's
    cfg, train_cfg = resolve_sft(pick(args, SFTConfig), run_length(train))
    say_unused(train, {}, ModelConfig(), train_cfg)
    _finished(sft(cfg, train_cfg))


def cmd_merge(args: argparse.Namespace) -> None:
    from homellm.sft import merge_run

    print(f"merged weights written to {merge_run(args.run, args.out, args.checkpoint)}")


def cmd_export(args: argparse.Namespace) -> None:
    from homellm.hf import export_run

    cfg = build(ExportConfig, args)
    if not cfg.out:
        raise HomeLLMError("--out is required: the folder to write the transformers model into (with --format "
                           "gguf, the .gguf file)")
    if "format" not in pick(args, ExportConfig) and _gguf_name(cfg.out):  # a transformers folder named x.gguf
        cfg = replace(cfg, format="gguf")
    elif cfg.format == "hf" and _gguf_name(cfg.out):  # (llama.cpp, given the folder, would fail far from here)
        raise HomeLLMError(f"--out {cfg.out} names a GGUF file, but --format hf writes a transformers folder: give "
                           "--format gguf, or name the folder otherwise")
    if cfg.format == "gguf":
        from homellm.gguf_file import export_gguf

        out = export_gguf(args.run, cfg.out, cfg.checkpoint, cfg.dtype)
        print(f"GGUF file written to {out} (from {_exported_step(args.run, cfg.checkpoint)})")
        return
    out = export_run(args.run, cfg.out, cfg.checkpoint, cfg.dtype)
    print(f"transformers model written to {out} (from {_exported_step(args.run, cfg.checkpoint)})")


def _exported_step(run: str, which: str) -> str:
    """The checkpoint export took, as its line says: a fine-tuned run's `best` may stand far behind its `last`."""
    from homellm.checkpoint import checkpoint_step, find_checkpoint

    folder = find_checkpoint(run, which, quiet=True)
    step = checkpoint_step(folder)
    return f"checkpoint {folder.name}" + (f", step {step:,}" if step is not None else "")


def _gguf_name(out: str | Path) -> bool:
    return str(out).lower().endswith(".gguf")


def cmd_import(args: argparse.Namespace) -> None:
    from homellm.hf import import_model

    cfg = build(ImportConfig, args)
    if not cfg.out:
        raise HomeLLMError("--out is required: the run folder to write")
    out = import_model(args.source, cfg.out, cfg.context)
    run = typed(out)  # commands to paste: a path with spaces stays one argument
    print(f"run written to {out}: try `homellm generate {run} --prompt TEXT`, or fine-tune it with "
          f"`homellm sft --init {run} --data CHATS.jsonl --out RUN`")


def cmd_quickstart(args: argparse.Namespace) -> None:
    started = time.perf_counter()  # --max-time is the command's: importing PyTorch counts too
    from homellm.quickstart import quickstart

    result = quickstart(build(QuickstartConfig, args), started)
    if result["interrupted"]:  # evaluated as it was, but not the whole run: scripts see an interrupted one
        further = (f"`homellm quickstart --out {typed(result['run'])} --resume --max-time SECONDS` trains it further"
                   if result["interrupted"] == ["training"] and not result["chat"] else "for the whole run, run the "
                   "quickstart again with a new --out")  # (--resume trains the model further, not a chat stage)
        say(f"homellm: interrupted: the {' and '.join(result['interrupted'])} stopped early (Ctrl-C), and the "
            f"figures above are for the model as it was then; {further}")
        raise SystemExit(130)


def run_verb(sub: argparse._SubParsersAction, name: str, help_text: str, func: Callable[[argparse.Namespace], None],
             cls: type | None = None, skip: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    """A verb that takes a run directory, with flags from `cls`: most verbs after training are this."""
    p = sub.add_parser(name, help=help_text)
    p.add_argument("run", help="the run directory")
    if cls is not None:
        add_flags(p, cls, skip=skip)
    p.set_defaults(func=func)
    return p


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors in one line: its usage block, dozens of lines for pretrain, buried the error. And
    without abbreviations: nanoGPT's --min-lr 6e-5 was taken as --min-lr-ratio, --vocab as --vocab-size, unsaid."""

    argv: list[str] = []  # what main parses, for errors that depend on it

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        if re.search(r"arguments are required: .*\brun\b", message):
            if any(a.startswith("--model=") for a in _Parser.argv):  # seed 002's `--model=RUN` (review)
                message += f": --model is not needed: the run folder comes first, without a flag: `{self.prog} RUN ...`"
            else:  # `--stop 。 RUN`: the run became a stop string
                message += (" (the run folder first: a flag that takes several values, as --stop and --input do, "
                            "takes a folder after it as one more of them)")
        if m := re.fullmatch(r"argument --([\w-]+)/--no-\1: ignored explicit argument '\w+'", message):
            message += f": a switch takes no value: --{m[1]} turns it on, --no-{m[1]} off"  # nanoGPT's --compile=False
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="homellm", description="Build your own language model, end to end.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("tokenizer", help="train (or import) a tokenizer")
    tsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = tsub.add_parser("train", help="train a byte-level BPE or char tokenizer, or import one (--from-file)")
    add_flags(p, TokenizerConfig)
    p.set_defaults(func=cmd_tokenizer)
    p = tsub.add_parser("encode", help="the tokens a text is written as, and characters per token")
    p.add_argument("tokenizer", help="a tokenizer folder or tokenizer.json, or a run or data folder (its tokenizer)")
    add_flags(p, EncodeConfig)
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("prepare", help="tokenize text into token shards for training")
    add_flags(p, PrepareConfig)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("pretrain", help="train a model from scratch (or --resume)",
                       description="Train a model. Flags override the preset; --data takes a prepared folder or "
                                   "raw .txt/.jsonl inputs (tokenizer and shards are then built inside --out). "
                                   f"The defaults shown are the {DEFAULT_PRESET} preset's; another --preset sets its "
                                   "own, and --resume keeps the run's.")
    p.add_argument("--preset", default=None, help="; ".join(f"{name}: {PRESET_USES[name]}" for name in PRESETS)
                   + f" (default: {DEFAULT_PRESET})")
    model_defaults, train_defaults = PRESETS[DEFAULT_PRESET]
    add_flags(p, ModelConfig, defaults=model_defaults)
    add_flags(p, TrainConfig, defaults=train_defaults)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("sft", help="fine-tune a trained run on conversations (full weights or LoRA)",
                       description="Supervised fine-tuning: --init RUN plus .jsonl conversations into --out. "
                                   "Training flags default to fine-tuning values (lr 3e-4, or 1e-3 with LoRA; 500 "
                                   "steps).")
    add_flags(p, SFTConfig)
    add_flags(p, TrainConfig, skip=("data", "init", "init_checkpoint", "val_input", *RAW_TEXT_FIELDS),
              defaults=SFT_TRAIN)
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("merge", help="fold a LoRA run's adapters into full weights, as a standalone run")
    p.add_argument("run", help="the LoRA run directory")
    p.add_argument("--out", required=True, help="the new run directory")
    p.add_argument("--checkpoint", default="best", help="best, last, or a kept step-N (default: best)")
    p.set_defaults(func=cmd_merge)

    run_verb(sub, "generate", "continue a prompt with a trained model (or prompts typed in turn: --interactive)",
             cmd_generate, GenerateConfig)

    run_verb(sub, "chat", "chat with a run in the terminal (slash commands change settings; /help)", cmd_chat,
             ChatConfig, skip=("prompt",))

    p = sub.add_parser("compare", help="the same prompts through two runs, side by side (table and Markdown)")
    p.add_argument("run_a", help="the first run directory (say, the pretrained model)")
    p.add_argument("run_b", help="the second run directory (say, its SFT); the report goes here by default")
    add_flags(p, CompareConfig, skip=("prompt",))
    p.set_defaults(func=cmd_compare)

    run_verb(sub, "eval", "measure a run: arithmetic accuracy (raw or chat), your own prompts and answers (exact), "
             "or val loss and bits per byte", cmd_eval, EvalConfig)

    p = sub.add_parser("quickstart", help="the whole pipeline on the built-in arithmetic task, in minutes on a CPU")
    add_flags(p, QuickstartConfig)
    p.set_defaults(func=cmd_quickstart)

    run_verb(sub, "serve", "an OpenAI-compatible API and a web chat page for a run (needs homellm[serve])",
             cmd_serve, ServeConfig)

    run_verb(sub, "info", "architecture, parameter counts and checkpoints of a run", cmd_info)

    run_verb(sub, "export", "write a run as a Hugging Face transformers model folder, or a GGUF file for llama.cpp",
             cmd_export, ExportConfig)

    p = sub.add_parser("import", help="a Hugging Face GPT-2 or Llama model as a run (to fine-tune, chat, serve)")
    p.add_argument("source", help="a transformers model folder (as save_pretrained writes it), or hf:NAME")
    add_flags(p, ImportConfig)
    p.set_defaults(func=cmd_import)
    return parser


def check_out(args: argparse.Namespace) -> None:
    """--out names a folder to write in every verb but compare, where it is the report file; say so before any work
    rather than fail at the first write, and never write the report over its own prompts."""
    if not getattr(args, "out", ""):
        return
    out = Path(args.out)
    ancestor = next((p for p in out.parents if p.exists()), Path("."))  # parents end at "." or "/" (or none: ".")
    if not ancestor.is_dir():
        raise HomeLLMError(f"--out {out}: {ancestor} is a file, so nothing can be written under it: choose another "
                           "--out")
    if args.func is cmd_compare:
        try:  # the report is written after all the generation: find out now whether it can be
            tempfile.TemporaryFile(dir=ancestor).close()
        except OSError as e:
            raise HomeLLMError(f"--out {out}: cannot write in {ancestor} ({e.strerror}): choose another --out"
                               ) from None
        if out.is_dir():
            raise HomeLLMError(f"--out {out} is a folder: give the report's file path, such as {out / 'compare.md'}")
        if out.exists() and args.prompts and out.resolve() == Path(args.prompts).resolve():
            raise HomeLLMError(f"--out {out} is the --prompts file: choose another --out")
    elif out.exists() and not out.is_dir() and not (getattr(args, "format", None) == "gguf" or (
            args.func is cmd_export and getattr(args, "format", None) is None and _gguf_name(out))):  # (a file)
        raise HomeLLMError(f"--out {out} is a file: give a folder path")
    if args.func is cmd_merge:  # (the other verbs' library functions refuse where they must not write)
        refuse_kinds(out, KINDS)


def check_utf8(argv: list[str]) -> None:
    """Arguments are text written into configs, metadata and prompts as UTF-8. A file name in another encoding
    (Shift_JIS names from an unzipped Aozora archive, say) reaches Python as undecodable bytes: say so up front."""
    for arg in argv:
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            shown = arg.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            raise HomeLLMError(f"argument '{shown}' is not valid UTF-8 (a file name in Shift_JIS?): rename the file "
                               "to UTF-8, e.g. `convmv -f sjis -t utf8 --notest FILE`, or type the text as UTF-8"
                               ) from None


# Names other tools use for what homellm calls otherwise (nanoGPT's iterations, --num_epochs, --max_tokens).
_OTHER_NAMES = {"--max-iters": ("--max-steps",), "--iters": ("--max-steps",),
                "--n-epochs": ("--epochs", "--max-steps"), "--num-epochs": ("--epochs", "--max-steps"),
                "--max-tokens": ("--max-new-tokens",), "--learning-rate": ("--lr",), "--min-lr": ("--min-lr-ratio",),
                "--gradient-accumulation-steps": ("--grad-accum",), "--eval-interval": ("--eval-every",),
                "--eval-iters": ("--eval-batches",), "--log-interval": ("--log-every",), "--out-dir": ("--out",),
                "--save-every": ("--checkpoint-every",), "--init-from": ("--resume", "--init"),
                "--input": ("--data",),
                # names from the hand-written training scripts homellm replaces (max_lr, output_dir, eval_freq, ...)
                "--max-lr": ("--lr",), "--output-dir": ("--out",), "--eval-freq": ("--eval-every",),
                "--print-sample-iter": ("--sample-every",), "--warmup-iters": ("--warmup-steps",),
                # transformers' and llama.cpp's names for the same things
                **dict.fromkeys(("--n-positions", "--context-length", "--max-seq-len", "--seq-len",
                                 "--max-position-embeddings", "--ctx-size"), ("--block-size",)),
                **dict.fromkeys(("--hidden-size", "--d-model", "--embedding-size", "--n-embed", "--dim"),
                                ("--n-embd",)),
                **dict.fromkeys(("--num-attention-heads", "--n-heads"), ("--n-head",)),
                **dict.fromkeys(("--num-hidden-layers", "--n-layers", "--depth"), ("--n-layer",)),
                **dict.fromkeys(("--num-key-value-heads", "--n-kv-heads"), ("--n-kv-head",)),
                "--temp": ("--temperature",), "--repeat-penalty": ("--repetition-penalty",), "--start": ("--prompt",)}
# Flags of another verb: pretrain trains its own tokenizer on raw text, and takes prepared data for any other
_ELSEWHERE = {("pretrain", "--tokenizer"): "prepare's: `homellm prepare --input TEXT --tokenizer DIR --out DATA`, "
                                           "then `homellm pretrain --data DATA`"}
# nanoGPT's flags with no counterpart, for the reason why (a flag of its own would only restate the run's end)
_NOT_NEEDED = {"--lr-decay-iters": "the learning rate decays over the whole run, to --max-steps (or --max-time)",
               "--decay-lr": "the learning rate always decays (--schedule cosine or wsd); --min-lr-ratio 1 keeps it "
                             "flat"}
_HOW = {"--max-steps": " (homellm counts optimizer steps, not epochs)",
        "--min-lr-ratio": " (a fraction of --lr: nanoGPT's min_lr / learning_rate)",
        "--resume": " (init_from=resume; --init RUN starts from another run's weights)",
        "--prompts": " FILE, a file of them (a .txt: one prompt a line)"}


def _unknown_flags(parser: argparse.ArgumentParser, args: argparse.Namespace, unknown: list[str],
                   argv: list[str]) -> str:
    """'unrecognized arguments' with the flag meant: --max_new_tokens is --max-new-tokens, --iters is --max-steps."""
    import difflib

    verb = parser._subparsers._group_actions[0].choices[args.command]  # type: ignore[union-attr]
    if getattr(args, "action", None):  # `tokenizer train`
        verb = verb._subparsers._group_actions[0].choices[args.action]  # type: ignore[union-attr]
    known = [o for a in verb._actions for o in a.option_strings if o.startswith("--")]
    switches = {o for a in verb._actions if isinstance(a, argparse.BooleanOptionalAction) for o in a.option_strings}
    # nanoGPT's `--compile=False`: here a switch, named to turn it on and with no- to turn it off. Each value is
    # paired with the switch before it, in order (another flag's own "False", as --text-field's, is its value).
    after_switch = [(argv[i - 1], a) for i, a in enumerate(argv)
                    if i and a.lower() in ("true", "false") and argv[i - 1] in switches]
    hints = []
    for arg in unknown:
        if pair := next((p for p in after_switch if p[1] == arg), None):
            after_switch.remove(pair)
            flag = pair[0]
            base = flag.removeprefix("--no-").removeprefix("--")
            on = (arg.lower() == "true") == (flag == f"--{base}")
            hints.append(f"{flag} {arg} is --{'' if on else 'no-'}{base} (a switch takes no value)")
            continue
        # A Japanese or Chinese input method types －－ (full-width), autocorrect turns -- into a dash: read as --
        ascii_arg = re.sub(r"^[\u2013\u2014]{1,2}(?=\w)", "--", unicodedata.normalize("NFKC", arg))
        name = ascii_arg.split("=")[0].replace("_", "-").lower()
        if not ascii_arg.startswith("--"):
            continue
        shown = re.split("[=\uff1d]", arg)[0]  # the flag as typed, without its value (after = or a full-width ＝)
        if (args.command, name) in _ELSEWHERE:
            hints.append(f"{shown} is {_ELSEWHERE[args.command, name]}")
            continue
        if name in _NOT_NEEDED or (name == "--model" and "run" in vars(args)):
            why = _NOT_NEEDED.get(name) or f"the run folder comes first, without a flag: `{verb.prog} RUN ...`"
            hints.append(f"{shown} is not needed: {why}")
            continue
        meant = next((m for m in _OTHER_NAMES.get(name, ()) if m in known), None)
        # (a near miss only: at 0.75, --save-every was --sample-every and --input --init)
        meant = meant or (name if name in known else next(iter(difflib.get_close_matches(name, known, 1, 0.85)), None))
        if meant:
            hints.append(f"{shown} is {meant}{_HOW.get(meant, '')}")
    return (f"{verb.prog}: unrecognized arguments: {' '.join(unknown)}"
            + (f": {'; '.join(dict.fromkeys(hints))}" if hints else f": see `{verb.prog} --help`"))


_OS_FIXES = {errno.ENOSPC: "the disk is full: make room, or write to another disk",
             errno.EACCES: "permission denied: check the permissions, or choose another path",
             errno.EPERM: "not permitted here: choose another path",
             errno.EROFS: "a read-only file system: choose a path on a writable one",
             errno.EDQUOT: "over the disk quota: make room, or write elsewhere"}


def _group() -> Any:
    """torch.distributed when this process has joined a torchrun group (without importing torch), else None."""
    dist = sys.modules.get("torch.distributed")
    return dist if dist is not None and dist.is_available() and dist.is_initialized() else None


def _under_torchrun() -> bool:
    return world_size() > 1  # (a stray LOCAL_RANK alone is no torchrun)


def _error_message(e: BaseException) -> str | None:
    """The one line for an error that is the input's or the machine's (a full disk, a file without permission,
    memory too small for the model); None for anything else, which is a bug and keeps its traceback."""
    if isinstance(e, HomeLLMError):
        return str(e)
    if ((dist := _group()) is not None and dist.get_world_size() > 1
            and re.search(r"gloo|nccl|connection (closed|reset) by peer", str(e), re.IGNORECASE)):
        # Another rank stopped on an error it has said (a damaged file that rank 0 alone reads, a full disk where it
        # alone writes), and this one's next collective found its connection gone: that is no bug of this rank's.
        # (one killed by a signal has no error to show: torchrun's summary below names how it ended)
        return "another process of the run stopped (its error, if it had one, is above), so this one stops too"
    if isinstance(e, OSError) and e.errno is not None:
        where = f"{e.filename}: " if e.filename else ""
        return f"{where}{_OS_FIXES.get(e.errno, e.strerror or str(e))}"
    text = str(e)
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or "can't allocate memory" in text:
        size = re.search(r"tried to allocate (\d+) bytes", text)  # the CPU allocator's words
        cuda = re.search(r"[Tt]ried to allocate ([\d.]+ \w+)", text)
        asked = f"{int(size[1]) / 2**30:,.1f} GiB" if size else cuda[1] if cuda else None
        return (f"out of memory{f' ({asked} more was asked)' if asked else ''}: lower --batch-size (raise "
                "--grad-accum to keep the batch), --block-size, or the model (--n-layer, --n-embd)")
    return None


def _said_by_local_rank_0() -> bool:
    """Under torchrun, an error before the ranks connect (a flag, a missing file) is the same on every rank of a
    machine, and its first rank says it: the others keep quiet rather than repeat it per process. Another machine's
    first rank still speaks, as its files may differ; errors after connecting may be a rank's own, so all speak."""
    return _under_torchrun() and os.environ.get("LOCAL_RANK", "0") != "0" and _group() is None


def _leave_process_group() -> None:
    """After a torchrun verb's success: torch warns at exit about a group left standing (NCCL's resources)."""
    if (dist := _group()) is not None:
        dist.barrier()  # every rank done with the group before any tears it down
        dist.destroy_process_group()


def utf8_output(*streams: Any) -> None:
    """Text out as UTF-8 whatever the locale says: Windows writes a redirected stdout in cp1252, which cannot hold
    Japanese or Chinese, and every print of such text failed with a traceback. A terminal that is not UTF-8 (rare:
    Windows' console takes Unicode whatever its code page) shows what it cannot draw as "?". An encoding asked for
    with PYTHONIOENCODING is kept (whoever reads the output said what they decode), with "?" for what it cannot hold
    unless it names its own error handler (cp932:strict): a Chinese reply in cp932 ended in a traceback."""
    asked = os.environ.get("PYTHONIOENCODING", "")
    for stream in streams:
        if not hasattr(stream, "reconfigure") or codecs.lookup(stream.encoding or "ascii").name == "utf-8":
            continue
        if asked:
            if ":" not in asked:
                stream.reconfigure(errors="replace")
        elif stream.isatty():
            stream.reconfigure(errors="replace")
        else:
            stream.reconfigure(encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    utf8_output(sys.stdout, sys.stderr)
    if argv[:1] == ["tokenizer"] and len(argv) > 1 and argv[1].startswith("--") and argv[1] != "--help":
        # argparse would say "argument ACTION: invalid choice: 'corpus.txt'", naming the wrong word.
        print("homellm: error: `homellm tokenizer` takes its action first: `homellm tokenizer train --input ... "
              "--out DIR`", file=sys.stderr)
        return 2
    try:  # (a Ctrl-C while the verbs' modules load: torchrun passes it on at once, and every rank gave a traceback)
        parser, _Parser.argv = build_parser(), argv
        args, unknown = parser.parse_known_args(argv)
    except KeyboardInterrupt:
        return _interrupted()
    if unknown:
        print(f"homellm: error: {_unknown_flags(parser, args, unknown, argv)}", file=sys.stderr)
        return 2
    try:
        check_utf8(argv)
        check_out(args)
        if _under_torchrun() and args.func not in (cmd_pretrain, cmd_sft):
            # Each process would run the whole verb: the same output N times, files written N times at once.
            raise HomeLLMError(f"`homellm {args.command}` runs in one process: run it without torchrun (only "
                               "pretrain and sft train across processes)")
        args.func(args)
        _leave_process_group()
    except BrokenPipeError:  # `homellm generate ... | head` closed its end: nothing left to say, to no one
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit would fail again
        return 141
    except (HomeLLMError, OSError, MemoryError, RuntimeError) as e:
        message = _error_message(e)
        if message is None:  # a bug, not the user's input or machine: the traceback is for us
            raise
        if _said_by_local_rank_0() or (getattr(e, "everywhere", False) and os.environ.get("RANK", "0") != "0"):
            return 2
        # Under torchrun every rank may report: name the others, and write each line whole so none interleave.
        rank = os.environ.get("RANK", "0")
        sys.stderr.write(f"homellm: error{f' (rank {rank})' if rank != '0' else ''}: {message}\n")
        sys.stderr.flush()
        return 2
    except KeyboardInterrupt:
        return _interrupted()
    return 0


def _interrupted() -> int:
    say("\nhomellm: interrupted")  # torchrun passes Ctrl-C to every rank: said once
    return 130


if __name__ == "__main__":
    sys.exit(main())

