"""Checkpoints and run directories.

A run directory describes itself:

    RUN/config.json        {"model": ModelConfig, "train": TrainConfig, ...} as resolved for this run
    RUN/tokenizer/         tokenizer.json, tokenizer_config.json, special_tokens_map.json
    RUN/last/, RUN/best/   model.safetensors (the unwrapped model), state.pt (optimizer, scaler, step, RNG,
                           data position), checkpoint.json (step, val loss, sha256 of both files)
    RUN/metrics.jsonl      one JSON object per log step
    RUN/base.safetensors   a LoRA run's hard link to its base's weights (see keep_base)

A checkpoint folder is written beside its final place and swapped in with renames, so a crash or a full disk
at any moment leaves the previous checkpoint whole: either RUN/NAME or, mid-swap, RUN/.NAME.old.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from homellm.config import ModelConfig, SampleConfig, ServeConfig, TrainConfig, from_dict, load_json, save_json
from homellm.errors import HomeLLMError, typed
from homellm.io import file_mode, fsync_dir, refuse_kinds, say
from homellm.model import GPT
from homellm.tokenizer import unfinished_save

WEIGHTS, STATE, INFO = "model.safetensors", "state.pt", "checkpoint.json"
BASE_WEIGHTS = "base.safetensors"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_sha256(folder: Path) -> str:
    """The checksum of a checkpoint's weights, as its record says: only for a folder find_checkpoint gave, which
    hashed the file and found it the same (hashing a 1B model's 4 GB again costs seconds)."""
    return load_json(folder / INFO)["sha256"][WEIGHTS]


def weights_of(model: GPT) -> dict[str, torch.Tensor]:
    """The state dict to save: contiguous CPU tensors, the tied output matrix stored once (as embed_tokens).
    With LoRA adapters attached, only the adapters (`lora.*`): the base weights live in the base run."""
    if hasattr(model, "lora"):
        sd = {f"lora.{k}": v for k, v in model.lora.state_dict().items()}
    else:
        sd = model.state_dict()
        if model.cfg.tie_embeddings:
            sd.pop("lm_head.weight")
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def load_weights_into(model: GPT, weights: dict[str, torch.Tensor], where: str, config: str = "the run's config.json",
                      fix: str = "restore config.json to what the run was trained with") -> None:
    """Load `weights` (read from `where`) into `model`, or name the first tensor that does not fit the model that
    `config` describes."""
    expected = set(weights_of(model))
    got = set(weights)
    if got != expected:
        missing, unexpected = sorted(expected - got), sorted(got - expected)
        raise HomeLLMError(f"{where}: weights do not fit {config} (missing {missing[:3]}, unexpected "
                           f"{unexpected[:3]}): {fix}")
    own = model.state_dict()
    for name, tensor in weights.items():
        if tensor.shape != own[name].shape:
            raise HomeLLMError(f"{where}: {name} has shape {tuple(tensor.shape)} but {config} makes "
                               f"{tuple(own[name].shape)}: {fix}")
    model.load_state_dict(weights, strict=False)


def save_checkpoint(run: Path, name: str, model: GPT, state: dict[str, Any] | None, info: dict[str, Any]) -> None:
    """Write RUN/NAME atomically: files into RUN/.NAME.tmp, fsync, then rename over the old folder."""
    run = Path(run)
    tmp, final = run / f".{name}.tmp", run / name
    _remove(tmp)
    tmp.mkdir(parents=True)
    files = [WEIGHTS]
    try:
        save_file(weights_of(model), str(tmp / WEIGHTS))
        fault_point("HOMELLM_FAULT_KILL_MID_CHECKPOINT", info.get("step"))
        if state is not None:
            torch.save(state, tmp / STATE)
            files.append(STATE)
        for f in files:
            os.chmod(tmp / f, file_mode())
            with open(tmp / f, "rb+") as fh:
                os.fsync(fh.fileno())
        save_json(tmp / INFO, {**info, "sha256": {f: sha256_file(tmp / f) for f in files}})
        fsync_dir(tmp)
    except BaseException as e:  # (a second Ctrl-C too)
        # Half written: left behind, it kept the disk full and the next --resume failed on it. torch and
        # safetensors say "unexpected pos" or "No space left" in their own words: the free space tells.
        free = shutil.disk_usage(run).free
        _remove(tmp)
        full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) or (
            isinstance(e, (RuntimeError, SafetensorError)) and free < 2**24)
        if not full:  # anything else is not the disk's: it keeps its own message (and a bug its traceback)
            raise
        raise HomeLLMError(f"{final}: cannot write the checkpoint (the disk is full; {free / 2**20:,.1f} MiB free): "
                           "make room, then --resume from the previous checkpoint, which is intact") from None
    fault_point("HOMELLM_FAULT_KILL_IN_CHECKPOINT", info.get("step"))
    finish_swap(tmp)


def finish_swap(tmp: Path) -> Path:
    """Put a complete RUN/.NAME.tmp in place of RUN/NAME (the end of save_checkpoint, or of one a kill cut short);
    returns RUN/NAME."""
    final, old = tmp.parent / tmp.name[1:].removesuffix(".tmp"), tmp.parent / f"{tmp.name.removesuffix('.tmp')}.old"
    if final.exists():
        _remove(old)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(tmp.parent)
    _remove(old)
    return final


def _remove(path: Path) -> None:
    """Delete a folder or a file (a `last` that something made a plain file) if there is one."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def fault_point(var: str, step: Any, signal_name: str = "SIGKILL") -> None:
    """Fault injection for the crash tests: send this process a signal (SIGKILL) at the step named by the variable;
    under torchrun only on rank HOMELLM_FAULT_RANK where that is set."""
    rank = os.environ.get("RANK", "0")
    if os.environ.get(var) and str(step) == os.environ[var] and os.environ.get("HOMELLM_FAULT_RANK", rank) == rank:
        import signal

        os.kill(os.getpid(), getattr(signal, signal_name))


def verify_checkpoint(folder: Path, need_state: bool, checksums: bool = True) -> dict[str, Any]:
    """checkpoint.json of a complete, uncorrupted checkpoint folder; HomeLLMError saying what is wrong. Without
    `checksums`, the files are only looked for (info's kept step-N folders: hashing them all took as long as reading
    every one)."""
    if not folder.is_dir():
        raise HomeLLMError(f"{folder}: {'not a folder' if folder.exists() else 'missing'}")
    info = load_json(folder / INFO)
    if not isinstance(info, dict) or not isinstance(info.get("step"), int) or not isinstance(info.get("sha256"), dict):
        raise HomeLLMError(f"{folder / INFO}: not a checkpoint record (it needs a whole-number step and checksums)")
    for key in ("tokens", "val_loss", "val_bpb"):  # shown by info: never a traceback there
        value = info.get(key, 0)
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not (number or (value is None and key != "tokens")):  # (no val loss measured: None)
            raise HomeLLMError(f"{folder / INFO}: {key} is {info[key]!r}, not a number: restore the file homellm wrote")
    files = [WEIGHTS, STATE] if need_state else [WEIGHTS]
    for f in files:
        if not (folder / f).is_file():
            raise HomeLLMError(f"{folder / f}: missing")
        if checksums and info.get("sha256", {}).get(f) != sha256_file(folder / f):
            raise HomeLLMError(f"{folder / f}: corrupt (checksum differs from checkpoint.json)")
    return info


def find_checkpoint(run: str | Path, prefer: str = "last", need_state: bool = False, quiet: bool = False) -> Path:
    """The checkpoint folder to use: `prefer` (best or last) when valid, else the newest valid one, saying so."""
    run = Path(run)
    if prefer.startswith("step-"):  # a kept copy (--keep-every) asked for by name: that one, no other
        try:
            verify_checkpoint(run / prefer, need_state)
        except HomeLLMError as e:
            kept = ", ".join(kept_steps(run)) or "none (pretrain and sft keep them with --keep-every N)"
            raise HomeLLMError(f"{e}: the run's kept steps: {kept}") from None
        return run / prefer
    try:  # the one asked for, valid: the others need no reading (hashing each is seconds for a 1B model)
        verify_checkpoint(run / prefer, need_state)
        return run / prefer
    except HomeLLMError as e:
        problems = [str(e)]  # (not read again below)
    names = [prefer, "best" if prefer == "last" else "last"]
    # A kill between save_checkpoint's two renames leaves the previous folder as .NAME.old and the new, complete
    # one as .NAME.tmp (complete when its checksums hold: checkpoint.json is written last).
    candidates = [run / n for n in names] + [run / f".{n}.{end}" for n in names for end in ("tmp", "old")]
    valid: list[tuple[int, Path]] = []
    for c in candidates[1:]:
        try:
            valid.append((int(verify_checkpoint(c, need_state)["step"]), c))
        except HomeLLMError as e:
            if c.exists() or not c.name.startswith("."):
                problems.append(str(e))
    written = any(_written(c) for c in candidates)
    if not written and (kept := kept_steps(run)):  # weights only: nothing to resume
        raise HomeLLMError(f"{run}: no checkpoint to {'resume' if need_state else 'load'} (`last`, `best`), only the "
                           f"weights --keep-every kept ({', '.join(kept)}): train on from one with `homellm pretrain "
                           f"--init {typed(run)} --init-checkpoint {kept[-1]} --data DATA --out NEW`, or load it with "
                           f"--checkpoint {kept[-1]}")
    if not written:  # stopped before its first checkpoint: nothing to fall back on
        fix = ("start it again without --resume (the same --out is fine), and a lower --checkpoint-every saves "
               "sooner" if need_state else "it has no weights yet: train it (or resume it) until it writes one")
        raise HomeLLMError(f"{run}: no checkpoint yet, the run stopped before its first: {fix}")
    if not valid:
        what = "resumable checkpoint" if need_state else "checkpoint"
        # Not "without --resume": that start is refused while the damaged last/ is there (it would be overwritten).
        raise HomeLLMError(f"{run}: no valid {what} ({'; '.join(problems)}): train again into a new --out")
    steps = {p: s for s, p in valid}
    chosen = run / prefer if run / prefer in steps else max(valid)[1]
    if chosen != run / prefer and not quiet:
        if prefer == "best" and not any((run / n).exists() for n in ("best", ".best.tmp", ".best.old")):
            # Not damage: `best` is written at an evaluation better than those before, and none has run yet.
            say(f"note: {run} has no `best` yet (it is written at an evaluation, which this run has not had); using "
                f"{chosen.name} (step {steps[chosen]})")
        else:
            say(f"note: {run / prefer} is not usable ({problems[0]}); using {chosen} (step {steps[chosen]})")
    return chosen


def resume_point(run: str | Path) -> Path:
    """The checkpoint to resume from: `last` (falling back as find_checkpoint does), or `best` where it is newer (a
    kill after a `best` and before the next `last`: the steps between were trained again); a complete .best.tmp
    counts as `best` (a kill between its two renames)."""
    run = Path(run)
    newest = find_checkpoint(run, "last", need_state=True)
    for best in (run / "best", run / ".best.tmp"):
        try:
            if verify_checkpoint(best, need_state=True)["step"] > load_json(newest / INFO)["step"]:
                newest = best
        except HomeLLMError:
            pass
    return newest


def run_config_path(run: str | Path, made_by: str = "`homellm pretrain`, `sft` or `quickstart`") -> Path:
    """RUN/config.json, or a one-line error that says what RUN is instead (missing, a file, data, a tokenizer)."""
    run = Path(run)
    path = run / "config.json"
    if path.is_file():
        return path
    if not run.exists():
        what = "not found"
    elif not run.is_dir():
        what = "a file, not a run folder"
    elif (run / "meta.json").is_file():
        what = f"prepared data, not a run (train on it: `homellm pretrain --data {typed(run)} --out RUN`)"
    elif (run / "tokenizer.json").is_file():
        what = "a tokenizer, not a run"
    elif (run / INFO).is_file() and (run.parent / "config.json").is_file():
        # (seed 002's inference script took a checkpoint file): every verb takes the run, and --checkpoint picks
        raise HomeLLMError(f"{run}: a checkpoint of the run {run.parent}: pass the run folder ({run.parent})"
                           + ("; verbs read its `best`, and `last` where they take --checkpoint last (sft: "
                              "--init-checkpoint last)" if run.name == "last" else ""))
    elif (run / "data_tokenizer" / "tokenizer.json").is_file() or unfinished_save(run / "data_tokenizer") or (
            run / "data" / ".preparing").is_dir():
        # `pretrain --data TEXT` and `quickstart` build these first, and write config.json only when training starts.
        again = f"`homellm quickstart --out {typed(run)}` again" if (run / "task").is_dir() else (
            "its `homellm pretrain --data ...` command again, without --resume")
        raise HomeLLMError(f"{run}: a run whose first start stopped while preparing its text, before training (no "
                           f"config.json yet): run {again} (it picks up what was prepared)")
    else:
        what = "not a homellm run (no config.json)"
    raise HomeLLMError(f"{run}: {what}: pass the --out folder of {made_by}")


def kept_steps(run: str | Path) -> list[str]:
    """The step-N folders `--keep-every` kept in a run, in step order."""
    found = [p.name for p in Path(run).glob("step-*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=lambda name: int(name[5:]))


def _written(path: Path) -> bool:
    """Whether a checkpoint folder holds what was written: a .NAME.tmp only once its checkpoint.json is there (written
    last; a kill before it left part of a checkpoint, which nothing can load and the next save replaces)."""
    return path.exists() and not (path.name.endswith(".tmp") and not (path / INFO).is_file())


def holds_trained(run: str | Path) -> bool:
    """Whether RUN holds weights a new start would replace: `best` alone too (what import and merge write, or a run
    whose `last` was deleted), and a checkpoint caught mid-swap."""
    return any(_written(Path(run) / n) for c in ("last", "best") for n in (c, f".{c}.tmp", f".{c}.old")) or bool(
        kept_steps(run))  # (--keep-every's step-N: a new start would mix its own with them, or replace them)


def check_new_run(out: str | Path) -> None:
    """Refuse a new run in a folder that is prepared data or a tokenizer, or where files a run writes (config.json,
    metrics.jsonl, tokenizer/, best/, last/) are someone else's: the run would replace them. Other files may stay (a
    log the shell opened there first, say); a folder an earlier start of this run left (its text prepared, its config
    written) is the run's own."""
    out = Path(out)
    if not out.is_dir():
        return
    refuse_kinds(out, ("meta.json", "tokenizer.json"))
    try:  # a run's: both sections, every field one of homellm's (another tool's may name a "model" too)
        ours = (out / "config.json").is_file() and bool(read_config(out))
    except HomeLLMError:
        ours = False
    theirs = [n for n in ("config.json", "metrics.jsonl", "tokenizer") if (out / n).exists()] if not ours else []
    if theirs:
        raise HomeLLMError(f"--out {out} holds {', '.join(theirs)}, which homellm did not write, where a run writes "
                           "its own: choose a new or empty --out")
    # Checkpoint folders without a run's config.json: not a run to --resume (as "already holds a trained run" said)
    if not ours and (kept := [n for n in ("best", "last") if (out / n).exists()]):
        raise HomeLLMError(f"--out {out} holds {' and '.join(kept)} but no run's config.json, where a run writes its "
                           "checkpoints: choose a new or empty --out")


def is_sft(run: str | Path) -> bool:
    """Whether a run was fine-tuned on chats (its config.json has an sft section)."""
    path = Path(run) / "config.json"
    return path.is_file() and "sft" in load_json(path)  # no config.json: load_model says what is wrong


def check_not_merged(run: str | Path) -> None:
    """--resume of a merged run (written by `merge`) is refused: it holds weights alone, no optimizer state or
    adapters to go on from."""
    path = Path(run) / "config.json"
    if path.is_file() and load_json(path).get("merged_from"):
        raise HomeLLMError(f"--resume: {run} is a merged run (weights only, nothing to resume): fine-tune it further "
                           f"with `homellm sft --init {typed(run)} --data CHATS.jsonl --out NEW`")


def speaks_chatml(run: str | Path) -> bool:
    """Whether a run expects ChatML turns: fine-tuned on chats, or imported from a chat model of ChatML."""
    path = Path(run) / "config.json"
    return path.is_file() and ("sft" in (config := load_json(path)) or config.get("chat_format") == "chatml")


def chat_model_beside(run: str | Path) -> Path | None:
    """The fine-tuned model `quickstart --chat` puts in RUN/chat, where the base model in RUN was asked to chat."""
    chat = Path(run) / "chat"
    return chat if is_sft(chat) else None


def pretrained_only_note(run: str | Path, verb: str, what: str) -> str:
    """chat's and serve's note on a model never fine-tuned on conversations (`what` it does then), naming the chat
    model beside it where there is one; "" for a chat model."""
    if speaks_chatml(run):
        return ""
    beside = chat_model_beside(run)
    return (f"note: {run} was pretrained only, not fine-tuned on conversations (`homellm sft`): {what}"
            + (f"; its chat model is {beside}: `homellm {verb} {typed(beside)}`" if beside else ""))


def read_config(run: str | Path) -> tuple[ModelConfig, TrainConfig]:
    path = run_config_path(run)
    cfg = load_json(path)
    if isinstance(cfg, dict) and "model_type" in cfg:  # a transformers model folder (GPT-2, Llama from the hub)
        raise HomeLLMError(f"{run} is a Hugging Face model folder, not a homellm run: make it one with `homellm import "
                           f"{typed(run)} --out RUN`, then use RUN")
    for section in ("model", "train"):
        if not isinstance(cfg, dict) or not isinstance(cfg.get(section), dict):
            raise HomeLLMError(f"{path}: no {section!r} section: restore the file the run wrote, or train again")
    return from_dict(ModelConfig, cfg["model"], f"{path} model"), from_dict(TrainConfig, cfg["train"], f"{path} train")


def load_model(run: str | Path, which: str = "best", device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> GPT:
    """The model of a run directory, from checkpoint `which` (falling back as find_checkpoint does), in eval mode, on
    `device` in `dtype` (default: as saved, float32).

    A LoRA run holds adapters only: they are loaded onto its base run's model and merged into the weights."""
    model_cfg, _ = read_config(run)
    folder = find_checkpoint(run, which)
    lora = read_lora(run)
    model = base_for_lora(run, lora) if lora else GPT(model_cfg)
    load_weights_into(model, read_weights(folder), str(folder / WEIGHTS))
    if lora:
        from homellm.lora import merge_lora

        merge_lora(model)
    model.loaded_from = folder  # (which checkpoint `which` came to, for reports: not looked for and hashed again)
    # Cast before the move: moved first, a GPU held the float32 model whole (twice bfloat16's bytes) on the way
    return (model if dtype is None else model.to(dtype)).to(device).eval()


def checkpoint_step(folder: Path) -> int | None:
    """The step a checkpoint folder holds, by its checkpoint.json; None where that does not say."""
    try:
        step = load_json(folder / INFO).get("step")
    except (HomeLLMError, AttributeError):
        return None
    return step if isinstance(step, int) else None


def loaded_checkpoint(model: GPT) -> str:
    """Which checkpoint a model from load_model is, for a header: "best (step 50)". A fine-tuned run's `best` can
    stand far behind its `last` (a few held-out conversations), and replies differed with no word of which it was."""
    folder = getattr(model, "loaded_from", None)
    if folder is None:
        return ""
    step = checkpoint_step(folder)
    return folder.name.removesuffix(".tmp") + (f" (step {step:,})" if step is not None else "")


def load_for_generation(run: str | Path, cfg: SampleConfig | ServeConfig) -> GPT:
    """The model to generate with, on cfg.device in cfg.dtype: a GPU reads half the bytes per token in bfloat16 or
    float16, and decoding is bound by those reads. Sampling upcasts the logits."""
    from homellm.train import pick_dtype, resolve_device

    device = resolve_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    return load_model(run, cfg.checkpoint, device, dtype)


def read_weights(folder: Path, name: str = WEIGHTS) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint folder's weights file, or a one-line error."""
    try:
        return load_file(str(folder / name))
    except (SafetensorError, OSError) as e:
        raise HomeLLMError(f"{folder / name}: cannot be read ({e}): train the run again") from None


def moved_base(run: str | Path, base: str | Path) -> Path:
    """Where LoRA adapters' base run is: `base`, or, where it is gone, the folder of its name beside the adapters
    (the runs folder copied to another machine or path, as it was). The base's weights checksum, checked by the
    callers, tells whether it is the same base."""
    base, here = Path(base), Path(run).resolve()
    beside = here.parent / base.name
    # (runs/tiny's adapters in sft/tiny are not their own base)
    if (base / "config.json").is_file() or not (beside / "config.json").is_file() or beside == here:
        return base
    say(f"note: {run}'s base run {base} is not there: using {beside} beside it (its weights are checked)")
    return beside


def run_data(run: Path, saved: str | None) -> Path | None:
    """Where a run's prepared data is: the data_dir it last trained on, unless that is gone, or is another run's own
    data/ (a copied run's config.json names the original's) while this run has its own; else its own data/."""
    own = run / "data"
    if saved and (Path(saved) / "meta.json").is_file():
        other = Path(saved).name == "data" and (Path(saved).parent / "config.json").is_file() and \
            Path(saved).parent.resolve() != run.resolve()
        if not (other and (own / "meta.json").is_file()):
            return Path(saved)
    return own if (own / "meta.json").is_file() else None


def read_lora(run: str | Path) -> dict[str, Any] | None:
    """A LoRA run's `lora` section (its base run, that run's checkpoint and checksum, the adapters' spec), checked;
    None for a run of full weights."""
    from homellm.lora import LoraSpec

    path = Path(run) / "config.json"
    lora = load_json(path).get("lora")
    if lora is None:
        return None
    if not isinstance(lora, dict):
        raise HomeLLMError(f"{path}: lora is {lora!r}, not an object: restore the file homellm wrote")
    fields = {"base": str, "base_checkpoint": str, "base_sha256": str, "spec": dict}
    for key, kind in fields.items():
        value = lora.get(key)
        if not isinstance(value, kind):
            raise HomeLLMError(f"{path} lora: {key} is {'missing' if value is None else repr(value)}, not "
                               f"{'an object' if kind is dict else 'text'}: restore the file homellm wrote")
    from_dict(LoraSpec, lora["spec"], f"{path} lora spec")
    return lora


def keep_base(run: Path, weights: Path) -> None:
    """Hard-link the base checkpoint's weights into a LoRA run. While the base stays as it was, the two names share
    one file, at no cost; when the base trains on (a relay's next session replaces its `best` and `last`, each
    written anew) or is deleted, the run still holds the weights its adapters fit. Where the file system makes no
    hard link (another drive), the adapters need the base unchanged, as before."""
    tmp = run / f".{BASE_WEIGHTS}.tmp"
    try:  # (a link of an earlier start of this run, over another base, is replaced in one rename)
        tmp.unlink(missing_ok=True)
        os.link(weights, tmp)
        os.replace(tmp, run / BASE_WEIGHTS)
    except OSError as e:
        say(f"note: no hard link of {weights} in {run} ({e.strerror}): the adapters need those weights "
            "unchanged; merge them (`homellm merge`) before that base trains on")


def lora_base(run: str | Path, lora: dict[str, Any]) -> tuple[Path, ModelConfig]:
    """The weights file a LoRA run's adapters go over, and its model config: the base run's checkpoint where it is
    still the one they were trained on, else the run's own link to it (keep_base)."""
    run = Path(run)
    base = moved_base(run, lora["base"])
    fix = ""
    if not (base / "config.json").is_file():
        why = note = f"{run} holds LoRA adapters for the base run {base}, which is gone"
        fix = "restore it (merged weights, kept with `homellm merge RUN --out NEW`, need no base)"
    else:
        try:
            folder = find_checkpoint(base, lora["base_checkpoint"], quiet=True)
        except HomeLLMError as e:  # its kept step deleted, its checkpoints gone: the run's own link may hold them
            why, note = str(e), f"{base / lora['base_checkpoint']} is missing or damaged"
        else:
            if weights_sha256(folder) == lora["base_sha256"]:
                return folder / WEIGHTS, read_config(base)[0]
            why = note = f"{folder / WEIGHTS} changed since {run}'s adapters were trained on it"
            fix = "the adapters only fit the weights they were trained with; train them again"
    kept = run / BASE_WEIGHTS
    if kept.is_file():
        if sha256_file(kept) == lora["base_sha256"]:
            # (the run's config.json holds the base's model config: the adapters were trained on that model)
            say(f"note: {note}: the adapters go over the base weights the run kept ({kept})")
            return kept, read_config(run)[0]
        why += f"; and {kept}, the run's own copy of them, is damaged or replaced (its checksum differs)"
    raise HomeLLMError(f"{why}: {fix}" if fix else why)


def base_for_lora(run: str | Path, lora: dict[str, Any]) -> GPT:
    """The base model a LoRA run was trained on, checked unchanged, with fresh adapters attached."""
    from homellm.lora import LoraSpec, attach_lora

    weights, model_cfg = lora_base(run, lora)
    model = GPT(model_cfg)  # (not load_model, which would find and hash the same weights again)
    load_weights_into(model, read_weights(weights.parent, weights.name), str(weights))
    attach_lora(model, LoraSpec(**lora["spec"]), new=False)
    return model


def load_state(folder: Path) -> dict[str, Any]:
    return torch.load(folder / STATE, map_location="cpu", weights_only=True)
