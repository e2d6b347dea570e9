"""Supervised fine-tuning: a trained run plus conversations -> a chat model, with the one training loop.

    homellm sft --init runs/base --data chats.jsonl --out runs/chat [--lora-rank 8]

Conversations (OpenAI `messages`, ShareGPT or Alpaca jsonl) are rendered in the chat format; the loss covers assistant
replies only. Rows of block_size + 1 tokens hold one conversation each (padding) or as many whole ones as fit
(packing, the default: far fewer wasted positions on short chats). Packed conversations are separate documents
(GPT.forward's `documents`): each starts at position 0 and sees none of the others, as when it is chatted.
Held-out conversations give the val loss.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from homellm.chat import Message, prompt_ids, read_conversations, render, unique_conversations
from homellm.checkpoint import (
    BASE_WEIGHTS,
    WEIGHTS,
    check_new_run,
    check_not_merged,
    find_checkpoint,
    holds_trained,
    keep_base,
    load_weights_into,
    lora_base,
    moved_base,
    read_config,
    read_lora,
    read_weights,
    weights_sha256,
)
from homellm.config import (
    LORA_LR,
    LORA_TARGETS,
    SFT_TRAIN,
    SampleConfig,
    SFTConfig,
    TrainConfig,
    check_checkpoint_name,
    check_ranges,
    from_dict,
    load_json,
    replace,
    to_dict,
)
from homellm.errors import HomeLLMError, quoted, typed
from homellm.generate import stream_ids
from homellm.io import atomic_folder, say, world_size
from homellm.model import GPT
from homellm.tokenizer import Tokenizer, check_unknown


class ChatBatches:
    """Rows of rendered conversations with targets only on trained tokens; epochs in a seeded order."""

    def __init__(self, conversations: list[list[Message]], tok: Tokenizer, block_size: int, seed: int,
                 cfg: SFTConfig, all_val: bool = False):
        """all_val: every conversation is val, none trains (eval scores a file of them)."""
        self.seed, self.token_bytes = seed, tok.token_bytes()
        self._orders: dict[int, np.ndarray] = {}
        if cfg.overlong not in ("truncate", "skip"):
            raise HomeLLMError(f"--overlong {cfg.overlong!r} is unknown: use truncate or skip")
        order = np.random.default_rng(seed).permutation(len(conversations))
        n_val = int(round(cfg.val_fraction * len(conversations)))
        if all_val:
            n_val = len(conversations)
        elif cfg.val_fraction > 0 and len(conversations) >= 2:
            n_val = min(max(n_val, 1), len(conversations) - 1)  # at least one on each side
        else:
            n_val = 0
        self.stats = {"conversations": len(conversations), "val_conversations": n_val, "truncated": 0, "skipped": 0}
        val, train = order[:n_val], order[n_val:]
        self._skipped: set[int] = set()  # the conversations skipped as too long, by index
        self._truncatable = 0  # of them, those --overlong truncate would keep a reply of
        self.rows = {"train": self._rows(conversations, train, tok, block_size, cfg),
                     "val": self._rows(conversations, val, tok, block_size, cfg)}
        self.val_skipped = len(self._skipped.intersection(val.tolist()))
        # The training samples' question: a held-out conversation's first, so they show what the model answers
        # to something it has not trained on; not one skipped as too long, which would not fit either.
        self.question = next((m["content"] for i in [*val, *train] if i not in self._skipped
                              for m in conversations[i] if m["role"] == "user"), "")
        if not len(self.rows["train"][0]) and not all_val:
            # (--overlong truncate is advice only where it keeps a reply: one cut before it was refused again)
            fix = ("use --overlong truncate, which keeps the start of each" if self._truncatable else "each cut before "
                   "its first reply: use shorter conversations, or fine-tune a model with a longer context")
            raise HomeLLMError(f"no training conversation fits the model's {block_size}-token context "
                               f"({self.stats['skipped']} skipped as too long; {fix})")

    def _rows(self, conversations: list[list[Message]], which: np.ndarray, tok: Tokenizer, block_size: int,
              cfg: SFTConfig) -> tuple[torch.Tensor, ...]:
        """The rows of the conversations `which` indexes."""
        width = block_size + 1  # inputs are the first block_size, targets the last block_size
        rows: list[tuple[list[int], list[bool], list[int]]] = []
        ids: list[int] = []
        mask: list[bool] = []
        doc: list[int] = []  # which conversation of the row each token belongs to
        for i in which.tolist():
            c_ids, c_mask = render(tok, conversations[i])
            if len(c_ids) > width:
                c_ids, c_mask = c_ids[:width], c_mask[:width]
                if cfg.overlong == "skip" or not any(c_mask):  # cut before any reply: nothing left to learn
                    self.stats["skipped"] += 1
                    self._skipped.add(i)
                    self._truncatable += any(c_mask)
                    continue
                self.stats["truncated"] += 1
            if ids and (not cfg.pack or len(ids) + len(c_ids) > width):
                rows.append((ids, mask, doc))
                ids, mask, doc = [], [], []
            ids, mask, doc = ids + c_ids, mask + c_mask, doc + [doc[-1] + 1 if doc else 0] * len(c_ids)
        if ids:
            rows.append((ids, mask, doc))
        tokens = torch.full((len(rows), width), tok.pad_id, dtype=torch.long)
        targets = torch.full((len(rows), width), -100, dtype=torch.long)
        documents = torch.full((len(rows), width), -1, dtype=torch.long)  # padding: a document of its own
        for r, (ids, mask, doc) in enumerate(rows):
            tokens[r, :len(ids)] = torch.tensor(ids)
            targets[r, :len(ids)] = torch.where(torch.tensor(mask), torch.tensor(ids), -100)
            documents[r, :len(ids)] = torch.tensor(doc)
        if not cfg.pack:  # one conversation per row: plain causal attention, which keeps the fastest kernels
            return tokens[:, :-1], targets[:, 1:]
        return tokens[:, :-1], targets[:, 1:], documents[:, :-1]

    def train_batch(self, step: int, batch_size: int, part: int, parts: int) -> tuple[torch.Tensor, ...]:
        n = len(self.rows["train"][0])
        # This part's place in one stream of rows, so every row is seen once per epoch whatever the batch layout.
        first = (step * parts + part) * batch_size
        picks = [int(self._order(i // n)[i % n]) for i in range(first, first + batch_size)]
        return tuple(t[picks] for t in self.rows["train"])

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng([self.seed, 2, epoch]).permutation(len(self.rows["train"][0])),
                            **{e: o for e, o in self._orders.items() if e == epoch - 1}}
        return self._orders[epoch]

    def val_batch(self, index: int, batch_size: int, part: int, parts: int) -> tuple[torch.Tensor, ...] | None:
        start = (index * parts + part) * batch_size
        if start >= len(self.rows["val"][0]):
            return None
        return tuple(t[start:start + batch_size] for t in self.rows["val"])


# SFT fields that may change when resuming, like RESUMABLE_CHANGES: more or other conversations, not the method.
MANY_EPOCHS = 10  # more passes over the conversations than this, by --max-steps, are noted
SFT_RESUMABLE = {"init", "data", "skip_bad", "max_conversations"}


def _shown(text: str) -> str:
    """A system prompt as a note quotes it: 60 characters at most."""
    return text if len(text) <= 60 else text[:57] + "..."


def resolve_sft(sft_flags: dict[str, Any], train_flags: dict[str, Any]) -> tuple[SFTConfig, TrainConfig]:
    """SFT's defaults under the flags the user typed; resuming, the run's saved configs under them."""
    out = Path(train_flags.get("out", ""))
    if train_flags.get("resume") and (out / "config.json").is_file():
        saved = load_json(out / "config.json")
        if "sft" not in saved:
            raise HomeLLMError(f"{out} is not an SFT run (no sft section in config.json): resume it with "
                               f"`homellm pretrain --out {typed(out)} --resume`")
        cfg = replace(from_dict(SFTConfig, saved["sft"], f"{out}/config.json sft"), **sft_flags)
        return cfg, replace(read_config(out)[1], **train_flags)
    cfg = SFTConfig(**sft_flags)
    base = dict(SFT_TRAIN, lr=LORA_LR) if cfg.lora_rank > 0 else SFT_TRAIN
    return cfg, replace(TrainConfig(**base), **train_flags)


def sft(cfg: SFTConfig, train_cfg: TrainConfig, after_ctrl_c: str | None = None) -> dict[str, Any]:
    """`homellm sft`: fine-tune cfg.init on conversations into train_cfg.out (full weights or LoRA adapters);
    `after_ctrl_c` as in `train`."""
    from homellm.lora import LoraSpec, attach_lora, trainable_parameters
    from homellm.train import absolute_inputs, check_resume, steps_for_epochs, train

    check_ranges(cfg)
    check_ranges(train_cfg)
    if not cfg.init:
        if train_cfg.resume:  # a run stopped before it saved anything holds no --init to resume from
            raise HomeLLMError(f"--resume: {train_cfg.out} holds no fine-tuning run to continue (no config.json): "
                               "start it with --init RUN --data FILE")
        raise HomeLLMError("--init is required: the trained run to fine-tune")
    if not train_cfg.out:
        raise HomeLLMError("--out is required: the run folder to write")
    if not cfg.data:
        raise HomeLLMError("--data is required: .jsonl files of conversations, or hf:NAME")
    # Kept absolute, as pretrain's --data: resumed from another folder, a relative path read other files, or none.
    cfg = replace(cfg, data=absolute_inputs(cfg.data))
    init, out = Path(cfg.init), Path(train_cfg.out)
    if init.resolve() == out.resolve():
        raise HomeLLMError(f"--out {out} is the --init run: write the fine-tuned model to a new folder")
    if not train_cfg.resume:
        check_new_run(out)
    elif not (out / "config.json").is_file():  # stopped before it wrote anything to resume from
        raise HomeLLMError(f"--resume: {out} holds no fine-tuning run to continue (no config.json): start it again "
                           "without --resume")
    if train_cfg.resume:
        check_not_merged(out)
    saved = load_json(out / "config.json") if train_cfg.resume else {}
    # Resuming a full fine-tune reads its own `last`, model and tokenizer: the --init run is not needed any more,
    # and may have moved or gone. LoRA adapters need their base's weights: the base's own, or the run's link to them.
    own = bool(saved) and "lora" not in saved
    if saved and not own and (found := moved_base(out, init)) != init:
        init, cfg = found, replace(cfg, init=str(found))
    if train_cfg.resume:
        saved_sft = saved.get("sft", {})
        other_init = saved_sft.get("init") and Path(saved_sft["init"]).resolve() != init.resolve()
        if own:
            if other_init:
                say(f"note: a full fine-tune resumes from its own `last`: --init {init} is not read (the run began "
                    f"from {saved_sft['init']})")
            cfg = replace(cfg, init=saved_sft.get("init", cfg.init))  # what the run began from, whatever is there now
        elif other_init and Path(saved_sft["init"]).exists():
            raise HomeLLMError(f"--resume: --init {init} is not the run's init ({saved_sft['init']}): drop --init to "
                               "continue the run, or choose a new --out")
        elif other_init:  # the base moved: the adapters go on over it where its weights are the same (checked below)
            say(f"note: the run began from {saved_sft['init']}, which is gone: its adapters go on over {init}")
        diffs = [f"{k}: run has {v!r}, asked {getattr(cfg, k)!r}" for k, v in saved_sft.items()
                 if k not in SFT_RESUMABLE and hasattr(cfg, k) and getattr(cfg, k) != v]
        if diffs:
            raise HomeLLMError(f"--resume: {out}/config.json differs ({'; '.join(diffs)}): drop those flags, or "
                               "fine-tune into a new --out")
        was_data = absolute_inputs(saved_sft["data"]) if saved_sft.get("data") is not None else None
        if was_data == cfg.data and (gone := [d for d in cfg.data if not d.startswith("hf:") and not Path(d).exists()]):
            raise HomeLLMError(f"--resume: {gone[0]}, the conversations the run trained on, is not there: give --data "
                               "where they are now")
    source = out if saved else init  # resumed: the run's own config and tokenizer (a LoRA run's are its base's)
    model_cfg, _ = read_config(source)
    if not saved and "lora" in load_json(init / "config.json"):
        raise HomeLLMError(f"--init {init} is a LoRA run (adapters only): merge it first (`homellm merge "
                           f"{typed(init)} --out MERGED`) and fine-tune the merged run")
    was_lora = read_lora(out) if saved and not own else None
    # The weights to start from: none for a full fine-tune resumed (its own `last`); a LoRA run's base as it was
    # trained on (the base may have trained on since, or be gone: then the run's own link to its weights)
    weights = (None if own else lora_base(out, {**was_lora, "base": str(init)})[0] if was_lora
               else find_checkpoint(init, cfg.init_checkpoint) / WEIGHTS)
    if train_cfg.resume:
        check_resume(out, model_cfg, train_cfg)
    elif holds_trained(out):  # an imported or merged run has `best` alone
        raise HomeLLMError(f"{out} already holds a trained run: add --resume to continue it, or choose a new --out")
    tok = Tokenizer.load(source)
    conversations, bad = read_conversations(cfg.data, cfg.skip_bad, cfg.max_conversations)
    unique = unique_conversations(conversations)  # (--epochs repeats data on purpose)
    duplicates, conversations = len(conversations) - len(unique), unique
    # Typed with an input method, a Japanese user's data holds full-width ＋３＝ where the model (a char tokenizer of
    # ASCII digits) writes +3=: read as chat and generate read what is typed, not refused as unknown characters.
    folded = [[{**m, "content": tok.fold(m["content"])} for m in conv] for conv in conversations]
    if changed := sum(f != c for f, c in zip(folded, conversations)):
        say(f"note: {changed:,} conversation{'s' * (changed != 1)} hold characters {source}'s tokenizer writes "
            "otherwise (full-width ３ as 3): trained as it writes them, as chat reads what is typed")
    conversations = folded
    if tok.unk_id is not None:
        roles = sorted({"user", "assistant"} | {m["role"] for conv in conversations for m in conv})
        if cannot := [r for r in roles if tok.unk_id in tok.encode(r + "\n")]:
            # A char tokenizer learns only the characters of its text: a Chinese corpus has no Latin letters, and
            # every turn's header would read as unknowns, the user's and the assistant's alike.
            raise HomeLLMError(f"{source}'s tokenizer cannot write the chat role names ({', '.join(cannot)}): a char "
                               "tokenizer made before they were always included; train the tokenizer again (`homellm "
                               "tokenizer train --kind char`), then prepare and pretrain with it, or use a BPE one")
    data = ChatBatches(conversations, tok, model_cfg.block_size, train_cfg.seed, cfg)
    # Trained with one system prompt in every conversation, the model answers best after it: kept as the run's
    # default (the tokenizer's, as an imported chat model's own), so that chat, serve and eval start with it where
    # a conversation gives none, as the conversations trained did (chat began with none: another prompt).
    systems = {conv[0]["content"] if conv[0]["role"] == "system" else None for conv in conversations}
    if tok.system and (without := sum(conv[0]["role"] != "system" for conv in conversations)):
        # (rendered after it, as chat and serve ask a conversation that gives none: said, not silent)
        say(f"note: {without:,} conversation{'s' * (without != 1)} give no system prompt: they train after "
            f"{source}'s default, {_shown(tok.system)!r}, as chat asks; give them a system message of their own to "
            "train otherwise")
    if len(systems) == 1 and (system := systems.pop()) and system != tok.system:
        tok.system = system
        say(f"note: every conversation starts with the system prompt {_shown(system)!r}: the run keeps it as its "
            "default, which chat, serve and eval start with where a conversation gives none (--system replaces it)")
    rows = [data.rows[split][0] for split in ("train", "val")]
    if tok.unk_id is not None and (unknown := sum(int((r == tok.unk_id).sum()) for r in rows)):
        text = "".join(m["content"] for conv in conversations for m in conv)
        # Not "train a tokenizer on this text": the base's weights mean its own tokenizer's ids.
        counts = Counter(text)
        chars = sorted(tok.unknown_chars(text), key=lambda c: (-counts[c], c))  # the commonest first
        check_unknown(unknown, sum(int((r != tok.pad_id).sum()) for r in rows), chars, "tokens",
                      str(init), " ".join(cfg.data), fix="replace or drop them in the conversations, or pretrain the "
                      "base again with a tokenizer that knows them (a char tokenizer knows only its text's "
                      "characters, and those given with --words; a BPE one writes any text)")
    # What the held-out split is drawn from: the same conversations (a file moved, on another machine of a relay)
    # give the same split; others (new data, an edited file, another --max-conversations) draw it again.
    digest = hashlib.sha256()
    for conv in conversations:  # (one at a time: a dump of them all held the dataset twice over)
        digest.update(json.dumps(conv, ensure_ascii=False, sort_keys=True).encode() + b"\n")
    digest = digest.hexdigest()
    stats = {**data.stats, "bad_lines_skipped": bad, "duplicates_dropped": duplicates, "sha256": digest}
    if train_cfg.resume:
        was_stats = saved.get("sft_data") or {}
        reasons = []
        if was_data is not None and was_data != cfg.data:
            reasons.append(f"{' '.join(cfg.data)}, not the conversations the run began with "
                           f"({' '.join(saved_sft['data'])})")
        if saved_sft.get("max_conversations", cfg.max_conversations) != cfg.max_conversations:
            def first(n: int) -> str:
                return f"the first {n:,} conversations" if n else "all the conversations"

            reasons.append(f"{first(cfg.max_conversations)}, not {first(saved_sft['max_conversations'])} as the run "
                           "began")
        if "sha256" in was_stats:  # (runs before it: by names and limits alone)
            reasons = ([] if was_stats["sha256"] == digest else reasons or
                       [f"{' '.join(cfg.data)}, changed since the run began on it"])
        if reasons:
            say(f"note: resuming on {'; and on '.join(reasons)}; the held-out conversations are drawn again, so val "
                "loss is over others than before (perhaps some trained on)")
    n_rows = len(data.rows["train"][0])
    say(f"{stats['conversations']:,} conversation{'s' * (stats['conversations'] != 1)} "
        f"({stats['val_conversations']:,} held out), {n_rows:,} training row{'s' * (n_rows != 1)} of "
        f"{model_cfg.block_size} tokens"
        f"{', packed' if cfg.pack else ''}; {stats['truncated']} truncated, {stats['skipped']} skipped as too long, "
        f"{bad} bad lines skipped, {duplicates} duplicates dropped")
    if not stats["val_conversations"] and (train_cfg.eval_every or train_cfg.patience):
        say(f"note: no evaluation, so no `best` checkpoint: {stats['conversations']} conversation"
            f"{'s' * (stats['conversations'] != 1)} and --val-fraction {cfg.val_fraction:g} hold none out")
    elif not len(data.rows["val"][0]) and (train_cfg.eval_every or train_cfg.patience):
        say(f"note: no evaluation, so no `best` checkpoint: the {data.val_skipped} held-out conversation"
            f"{'s are' if data.val_skipped != 1 else ' is'} longer than the model's {model_cfg.block_size}-token "
            f"context and skipped{' (--overlong skip)' if cfg.overlong == 'skip' else ''}: raise --val-fraction, or "
            "add shorter conversations")
    lora_flags = (cfg.lora_alpha, cfg.lora_dropout, list(cfg.lora_targets))
    if not cfg.lora_rank and lora_flags != (SFTConfig.lora_alpha, SFTConfig.lora_dropout, list(LORA_TARGETS)):
        say("note: --lora-alpha, --lora-dropout and --lora-targets apply to LoRA only, with --lora-rank N: this run "
            "fine-tunes all weights")
    if (cut := stats["truncated"] + stats["skipped"]) > 0.2 * stats["conversations"]:
        # Cut conversations lose their later turns, replies included: a base with too short a context for this data.
        say(f"note: {cut:,} of {stats['conversations']:,} conversations ({cut / stats['conversations']:.0%}) are "
            f"longer than the model's {model_cfg.block_size}-token context and were cut or skipped: fine-tune a base "
            f"pretrained with a longer --block-size (e.g. {2 * model_cfg.block_size}) to keep them whole")
    per_step = train_cfg.batch_size * train_cfg.grad_accum * world_size()
    if train_cfg.epochs > 0:
        # Rows are read in a seeded order, each once per epoch (ChatBatches.train_batch), so an epoch is exact here.
        train_cfg = steps_for_epochs(train_cfg, n_rows, 1, "rows")
    elif (not train_cfg.resume and train_cfg.max_time <= 0 and n_rows  # (a time budget may end it long before)
          and (times := train_cfg.max_steps * per_step / n_rows) > MANY_EPOCHS):
        # The default 500 steps read 100 conversations 80 times: said, as a choice the user may not know they made
        say(f"note: --max-steps {train_cfg.max_steps:,} reads the {n_rows:,} training row{'s' * (n_rows != 1)} "
            f"{times:.0f} times over: a "
            "set this small is learnt by heart (`best` keeps the weights of the lowest val loss); --epochs 3 reads "
            f"it 3 times ({(three := math.ceil(3 * n_rows / per_step)):,} step{'s' * (three != 1)})")
    # The chat tokens' rows train with the adapters; a run resumed keeps those it began with (none, made before).
    tokens = saved["lora"]["spec"].get("tokens", []) if saved.get("lora") else [tok.im_start_id, tok.im_end_id]
    spec = LoraSpec(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, list(cfg.lora_targets), tokens)
    lora = None
    if cfg.lora_rank > 0:  # (resumed: the base's checkpoint it began over, whichever file holds it now)
        lora = {"base": str(init.resolve()), "spec": to_dict(spec),
                **({k: was_lora[k] for k in ("base_checkpoint", "base_sha256")} if was_lora else
                   {"base_checkpoint": weights.parent.name, "base_sha256": weights_sha256(weights.parent)})}
    kept = out / BASE_WEIGHTS
    # Linked once training starts (not in a run that failed its checks), from the base where the adapters go over its
    # own file: anew where the run's is missing (runs from before it), damaged, or a copy (`cp -r`).
    link = lora is not None and not (kept.is_file() and os.path.samefile(kept, weights))

    def init_model(model: torch.nn.Module) -> None:
        if link and int(os.environ.get("RANK") or 0) == 0:
            out.mkdir(parents=True, exist_ok=True)
            keep_base(out, weights)
        if weights is not None:  # (a full fine-tune resumed gets its weights from its own `last`)
            # (read here, not held from before: a model's worth of memory)
            load_weights_into(model, read_weights(weights.parent, weights.name), str(weights))
        if lora:
            attach_lora(model, spec, new=not train_cfg.resume)  # resumed: adapters as they were allowed then
            say(f"LoRA rank {spec.rank}: {trainable_parameters(model):,} trainable parameters of "
                f"{sum(p.numel() for p in model.parameters()):,}")

    extra: dict[str, Any] = {"sft": to_dict(replace(cfg, init=str(Path(cfg.init).resolve()))), "sft_data": stats}
    if lora:
        extra["lora"] = lora
    question = train_cfg.sample_prompt or data.question

    def sample(model: GPT) -> str:
        """A chat model's sample is a reply to a user's message (the prompt continued as text showed nothing)."""
        ids = prompt_ids(tok, [{"role": "user", "content": question}])
        # (as generate prints it: no half character where the 64 tokens end; LoRA's head with its trained rows
        # computed once, not at each token)
        with torch.nn.utils.parametrize.cached():
            reply = "".join(stream_ids(model, tok, ids, SampleConfig(max_new_tokens=64, temperature=0.0)))
        return f"{quoted(question)} -> {quoted(reply)}"

    summary = train(model_cfg, train_cfg, data, tok, init=init_model, extra_config=extra, sample=sample,
                    after_ctrl_c=after_ctrl_c)
    return {**summary, **stats}


def merge_run(run: str | Path, out: str | Path, which: str = "best") -> Path:
    """`homellm merge`: a LoRA run's adapters folded into its base weights, written as a standalone run."""
    from homellm.checkpoint import INFO, find_checkpoint, load_model, run_config_path, save_checkpoint
    from homellm.config import save_json

    run, out = Path(run), Path(out)
    check_checkpoint_name(which)  # (find_checkpoint would fall back to the other, with a note, and merge that)
    config = load_json(run_config_path(run, "a LoRA `homellm sft`"))
    if "lora" not in config:
        raise HomeLLMError(f"{run} is not a LoRA run (its config.json has no lora section): nothing to merge")
    if out.is_dir() and any(out.iterdir()):
        raise HomeLLMError(f"--out {out} is not empty: choose a new --out")
    model = load_model(run, which)
    source = find_checkpoint(run, which, quiet=True)  # the one load_model read (and said, falling back the same way)
    info = {k: v for k, v in load_json(source / INFO).items() if k != "sha256"}  # step, tokens, val loss: kept
    def write(stage: Path) -> None:
        save_json(stage / "config.json", {**{k: v for k, v in config.items() if k != "lora"},
                                          "merged_from": str(run)})
        Tokenizer.load(run).save(stage / "tokenizer", model_max_length=model.cfg.block_size)
        save_checkpoint(stage, "best", model, None, {**info, "merged_from": f"{run}/{source.name}"})

    atomic_folder(out, write, ".merging")
    return out
