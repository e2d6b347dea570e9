r"""`homellm quickstart`: the whole pipeline on the built-in arithmetic task, from nothing to a measured model.

Stages: generate problems -> character tokenizer -> token shards -> train from scratch -> evaluate on held-out
problems -> print the accuracy table, sample answers and the next commands. Needs no files and no network.

Training reads the shards through `AnswerBatches`: every row starts at the beginning of a problem line (as a
prompt does at inference) and only the answer tokens (` 84$`) carry loss, so all the learning goes into what
is scored; the operands are random and cannot be predicted anyway.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from homellm.checkpoint import check_new_run, holds_trained
from homellm.config import ModelConfig, PrepareConfig, QuickstartConfig, TrainConfig, preset, replace
from homellm.data import open_split, prepare, read_meta
from homellm.errors import HomeLLMError, quoted, typed
from homellm.io import atomic_write_text, say
from homellm.tasks import arithmetic
from homellm.tokenizer import Tokenizer, unfinished_save

CHAT_SHARE = 0.2  # --chat: the part of the training time that fine-tunes for chat
CHAT_LR = 1e-3  # below pretraining's 3e-3: the model already writes the answers, SFT teaches the questions
# Training rows of 48 tokens, each problem line of a row its own document (positions from 0, attention inside
# the line), so every problem trains as it is asked at evaluation: alone, at the start. Rows of 40 without
# documents score the same after 1,200 steps (73.6 vs 74.0 %); the gain is that no token is wasted, whatever the
# row length. Chat replies come after other text, which such a model answers badly (26 % after two solved
# lines, against 73-75 % for rows of the whole context: bench/arithmetic_after_context.py), so --chat
# pretrains on rows of the whole context, without documents.
ROW_TOKENS = 48
PROBLEMS_PER_10_MIN = 500_000  # what 10 minutes of training on a 2-core CPU reads, about once each


class AnswerBatches:
    """Rows of block_size tokens (at most the model's context) starting at problem starts, with loss only on the
    answer tokens.

    `packed`: every problem line of a row is its own document (GPT.forward's `documents`), computed as if alone
    at the start of a row, which is how it is asked at evaluation; no token of the row is wasted."""

    def __init__(self, data_dir: str | Path, tok: Tokenizer, block_size: int, seed: int, packed: bool = False):
        self.block_size, self.seed, self.packed, self.token_bytes = block_size, seed, packed, tok.token_bytes()
        self.eot = tok.eot_id
        newline, equals = (tok.encode(c) for c in ("\n", "="))
        if len(newline) != 1 or len(equals) != 1:
            raise HomeLLMError(f"{data_dir}: the tokenizer must give '\\n' and '=' one token each: "
                               "use a char tokenizer")
        self.splits = {}
        for split in ("train", "val"):
            tokens = np.concatenate([np.asarray(m) for m in open_split(data_dir, split)]).astype(np.int64)
            self.splits[split] = self._index(tokens, newline[0], equals[0])
        if len(self.splits["train"][2]) == 0:
            raise HomeLLMError(f"{data_dir}: no problem line fits in --block-size {block_size}: add data")

    def _index(self, tokens: np.ndarray, newline: int, equals: int
               ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, torch.Tensor]:
        is_nl = tokens == newline
        line = np.cumsum(is_nl) - is_nl  # line number of each token; a newline ends its line
        starts = np.concatenate([[0], np.flatnonzero(is_nl) + 1])
        eq_before = np.cumsum(tokens == equals) - (tokens == equals)  # '=' strictly before each token
        line_base = eq_before[np.minimum(starts, len(tokens) - 1)]
        answer = (eq_before - line_base[line] > 0) & ~is_nl  # after the line's '=', up to its closing '$'
        # After the closing '$' comes end-of-text (where the text has its newline), so `generate` stops there: it
        # printed `84$$$$$$...`, as nothing after the answer was trained.
        targets = np.where(answer, tokens, np.where(is_nl, self.eot, -100))
        starts = starts[starts + self.block_size + 1 <= len(tokens)]
        return torch.from_numpy(tokens), torch.from_numpy(targets), starts, torch.from_numpy(line.astype(np.int32))

    def _rows(self, split: str, rng: np.random.Generator, n: int, keep: slice = slice(None)
              ) -> tuple[torch.Tensor, ...]:
        """n rows drawn from rng, of which those in `keep` are built."""
        tokens, targets, starts, line = self.splits[split]
        picks = torch.from_numpy(starts[rng.integers(0, len(starts), size=n)[keep]])
        index = picks[:, None] + torch.arange(self.block_size + 1)
        rows = (tokens[index[:, :-1]], targets[index[:, 1:]])
        return (*rows, line[index[:, :-1]]) if self.packed else rows

    def train_batch(self, step: int, batch_size: int, part: int, parts: int) -> tuple[torch.Tensor, ...]:
        return self._rows("train", np.random.default_rng([self.seed, 0, step, 0]), batch_size * parts,
                          slice(part * batch_size, (part + 1) * batch_size))

    def val_batch(self, index: int, batch_size: int, part: int, parts: int) -> tuple[torch.Tensor, ...] | None:
        if len(self.splits["val"][2]) == 0:
            return None
        return self._rows("val", np.random.default_rng([self.seed, 1, index]), batch_size * parts,
                          slice(part * batch_size, (part + 1) * batch_size))


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Decoding the quickstart's model on one thread: its small matrices gain nothing from two (1,000 problems:
    2.68 s vs 2.84 s on the idle 2-core machine), and with another job busy two threads contend (2.72 vs 4.37 s,
    and a 120 s quickstart took 221 s under heavier load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _stage(n: int, total: int, text: str) -> None:
    print(f"\n[{n}/{total}] {text}", file=sys.stderr, flush=True)


_LINE = re.compile(r"\$[^$\n]* = [^$\n]*\$")  # a problem line as the task writes it: `$12 \times 7 = 84$`


def _first_line(path: Path) -> str:
    try:
        with path.open("rb") as f:
            return f.readline(4096).decode("utf-8").rstrip("\n")
    except (OSError, UnicodeDecodeError):
        return ""


def _is_quickstarts(path: Path) -> bool:
    """Whether a file or folder where the quickstart writes holds what it writes there (an earlier start of the
    same run, stopped before training); anything else is the user's, which it must not replace."""
    if path.name == "train.txt":
        return bool(_LINE.fullmatch(_first_line(path)))
    if path.name == "alphabet.txt":
        return path.is_file() and path.read_bytes() == task_alphabet().encode("utf-8")
    if path.name == "chat.jsonl":
        try:
            record = json.loads(_first_line(path))
            return bool(_LINE.fullmatch(record["messages"][-1]["content"]))
        except (ValueError, TypeError, KeyError, IndexError):
            return False
    if path.name == "data_tokenizer":
        if unfinished_save(path):  # stopped while the tokenizer was written
            return True
        try:
            return Tokenizer.load(path).same_as(char_tokenizer())
        except HomeLLMError:
            return False
    # chat/: made once its base run is trained, which the quickstart refuses: an earlier start left none
    return path.is_dir() and not any(path.iterdir())


def _finish_chat_stage(run: Path) -> str:
    """For a --chat quickstart killed in its chat stage (the base run trained): how to finish that stage by hand, or
    "" where there is none to finish."""
    chat, data = run / "chat", run / "task" / "chat.jsonl"
    if (run / "quickstart.json").is_file():  # written at the end: the quickstart finished
        return ""
    if holds_trained(chat):
        return (f"its chat stage stopped: go on with `homellm sft --resume --out {typed(chat)}` and score it with "
                f"`homellm eval {typed(chat)} --task chat-arithmetic`; or ")
    if (run / "config.json").is_file() and data.is_file() and _is_quickstarts(data):
        return (f"its chat stage stopped before its first checkpoint: fine-tune it with `homellm sft --init "
                f"{typed(run)} --data {typed(data)} --out {typed(chat)}`; or ")
    return ""


def task_alphabet() -> str:
    """Every character the task can ever produce, not just the training problems', and those of its chat questions
    (for --chat or a later `homellm sft`)."""
    return arithmetic.chars() + arithmetic.chat_chars()


def char_tokenizer(words: Sequence[str] = arithmetic.WORDS) -> Tokenizer:
    """The quickstart's tokenizer: one id per character of the task, its LaTeX commands one id each."""
    from homellm.tokenizer import _train_char

    return _train_char(iter([task_alphabet()]), words)


def check_own_files(run: Path, chat: bool) -> None:
    """Refuse an --out where the quickstart would replace the user's own files (task/train.txt, say, or prepared
    data in data/)."""
    from homellm.train import foreign_data

    if foreign_data(run / "data", lambda meta: all(Path(str(p)).parts[-2:] == ("task", "train.txt")
                                                   for p in meta.get("inputs") or [None])):
        raise HomeLLMError(f"--out {run} holds prepared data in {run / 'data'} that the quickstart did not make, "
                           "where it prepares its own: choose a new --out")
    places = [run / "task" / "train.txt", run / "task" / "alphabet.txt", run / "data_tokenizer"]
    places += [run / "task" / "chat.jsonl", run / "chat"] if chat else []
    theirs = [str(p.relative_to(run)) for p in places if p.exists() and not _is_quickstarts(p)]
    if theirs:
        raise HomeLLMError(f"--out {run} holds {', '.join(theirs)}, which the quickstart did not write, where it "
                           "writes its own: choose a new --out")


def build_data(run: Path, problems: int, seed: int, stages: int = 5,
               operator_weights: dict[str, float] | None = None, words: Sequence[str] = ()
               ) -> tuple[Path, Tokenizer]:
    """Stages 1-3: training problems as text, a character tokenizer over the task's alphabet, token shards (into an
    --out that check_own_files passed)."""
    task = run / "task"
    task.mkdir(parents=True, exist_ok=True)
    _stage(1, stages, f"generating {problems:,} training problems (held-out problems never among them)")
    t0 = time.perf_counter()
    problem_list = arithmetic.generate(problems, seed, split="train", operator_weights=operator_weights)
    text = arithmetic.corpus_text(problem_list) + "\n"
    atomic_write_text(task / "train.txt", text)
    print(f"      {len(text) / 1e6:.1f} MB in {time.perf_counter() - t0:.1f} s; e.g. "
          f"{text.splitlines()[0]}  {text.splitlines()[1]}", file=sys.stderr)
    _stage(2, stages, "building a character tokenizer" + (" (LaTeX commands one token each)" if words else ""))
    atomic_write_text(task / "alphabet.txt", task_alphabet())  # what the tokenizer was made from, to read
    char_tokenizer(words).save(run / "data_tokenizer")
    tok = Tokenizer.load(run / "data_tokenizer")
    print(f"      {tok.vocab_size} ids", file=sys.stderr)
    _stage(3, stages, "preparing token shards")
    # One document of problems, the last 1 % of its tokens held out: split by position, as asked (not as a fallback)
    meta = prepare(PrepareConfig(input=[str(task / "train.txt")], tokenizer=str(run / "data_tokenizer"),
                                 out=str(run / "data"), val_fraction=0.01, split="position"))
    print(f"      {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens", file=sys.stderr)
    return run / "data", tok


def default_problems(max_time: float) -> int:
    """Training problems for a budget of `max_time` seconds: a short run reads few, and generating the full set
    would eat the time it has to train (500,000 take about 10 s on this 2-core CPU)."""
    return min(PROBLEMS_PER_10_MIN, max(1000, round(PROBLEMS_PER_10_MIN * max_time / 600)))


def short_warmup(steps: int, seconds: float) -> int:
    """A warmup a short budget gets past: a step per 5 s of it at most (the recipe's own from 500 s of training on,
    as measured). A 120 s quickstart fitted 92 steps, and a note told its user to give fewer --warmup-steps, a flag
    the quickstart does not take."""
    return min(steps, max(2, round(seconds / 5)))


def recipe(cfg: QuickstartConfig, seconds: float) -> tuple[ModelConfig, TrainConfig]:
    """The `arithmetic` preset, trained for `seconds`."""
    model_cfg, train_cfg = preset("arithmetic")
    train_cfg = replace(train_cfg, out=cfg.out, max_time=round(seconds, 1), max_steps=0, device=cfg.device,
                        seed=cfg.seed + 1337, sample_prompt=r"$12 \times 7 =", sample_stop="$",
                        warmup_steps=short_warmup(train_cfg.warmup_steps, seconds))
    return model_cfg, train_cfg


def quickstart(cfg: QuickstartConfig, started: float | None = None) -> dict[str, Any]:
    """Generate, tokenize, prepare, train, evaluate; return the evaluation result. The budget counts from `started`
    (a time.perf_counter()), the command's start: importing PyTorch before this took 2 s of a 30 s --max-time."""
    from homellm.config import EvalConfig
    from homellm.eval import eval_arithmetic, greedy_complete, stop_ids
    from homellm.train import train

    if cfg.max_time <= 0:
        raise HomeLLMError(f"--max-time {cfg.max_time}: give the training a positive number of seconds")
    if 0 < cfg.problems < 1000:
        raise HomeLLMError(f"--problems {cfg.problems}: generate at least 1000 training problems (0 = by --max-time)")
    if cfg.n <= 0:
        raise HomeLLMError(f"--n {cfg.n}: evaluate at least 1 problem")
    run = Path(cfg.out)
    t_start = time.perf_counter() if started is None else started
    # Answering 2000 problems took under 3 s on a 2-core CPU, and loading and the samples about 1 s: 3 % of the budget
    # covers them in 10 minutes, and 1 s and 1.5 ms a problem do in short budgets (1.2 s left --max-time 40 about
    # 2 s short). Twice that with the chat stage.
    reserve = max(1.0 + 0.0015 * cfg.n, 0.03 * cfg.max_time) * (2 if cfg.chat else 1)
    if cfg.resume:
        stages = 5
        summary, tok, chat_seconds = _train_further(cfg, run, t_start, reserve), Tokenizer.load(run), 0.0
    else:
        check_new_run(run)
        if holds_trained(run):  # an imported or merged run has `best` alone
            raise HomeLLMError(f"{run} already holds a trained run: {_finish_chat_stage(run) if cfg.chat else ''}"
                               f"evaluate it with `homellm eval {typed(run)}`, train it further with `homellm "
                               f"quickstart --out {typed(run)} --resume`, or pass a new --out")
        check_own_files(run, cfg.chat)
        _seconds_left(cfg, t_start, reserve)  # (a budget the evaluation fills, refused before the data is made)
        stages = 7 if cfg.chat else 5
        data_dir, tok = build_data(run, cfg.problems or default_problems(cfg.max_time), cfg.seed, stages,
                                   words=arithmetic.WORDS)
        seconds = _seconds_left(cfg, t_start, reserve, prepared=True)
        chat_seconds = CHAT_SHARE * seconds if cfg.chat else 0.0
        seconds -= chat_seconds
        model_cfg, train_cfg = recipe(cfg, seconds)
        model_cfg = replace(model_cfg, vocab_size=tok.padded_size)
        _stage(4, stages, f"training a {model_cfg.n_layer}-layer, {model_cfg.n_embd}-wide model from scratch for "
                  f"{seconds:.0f} s")
        batches = _answer_batches(data_dir, tok, model_cfg, train_cfg.seed, cfg.chat)
        meta = read_meta(data_dir)
        summary = train(model_cfg, train_cfg, batches, tok, extra_config={
            "task": "arithmetic", "data_dir": str(Path(data_dir).resolve()), "quickstart": {"chat": cfg.chat},
            "data_meta": {k: meta[k] for k in ("train_tokens", "val_tokens", "train_bytes", "val_bytes")}},
            after_ctrl_c="then the evaluation of the model as it is" + (", without the chat stage" if cfg.chat else ""))
    chatting = cfg.chat and summary["stop"] != "interrupted"
    _stage(5, stages, f"evaluating on {cfg.n:,} held-out problems")
    from homellm.checkpoint import load_model
    from homellm.train import resolve_device

    # The model as it is after a Ctrl-C, as said: `best` is from the last evaluation, maybe hundreds of steps back
    # (an audit's interrupted run was scored 0.55 % on step 42's weights, 2.4 % on its last, step 66's)
    which = "last" if summary["stop"] == "interrupted" else "best"
    model = load_model(run, which, resolve_device(cfg.device))
    t_eval = time.perf_counter()
    with _one_thread():
        result = eval_arithmetic(run, EvalConfig(n=cfg.n, seed=cfg.seed + 1, device=cfg.device, checkpoint=which),
                                 model=model, quiet=True)
    per_problem = (time.perf_counter() - t_eval) / cfg.n  # (the chat stage's evaluation is budgeted by it)
    with _one_thread():
        samples = arithmetic.generate(8, cfg.seed + 99, split="heldout")
        answers = greedy_complete(model, tok, [arithmetic.prompt(p) for p in samples], 32, stop_ids(tok, "$\n"),
                                  desc="samples")
    print("\n" + arithmetic.format_table({**result, "failures": []}))
    print("\nsample held-out problems:")
    for p, a in zip(samples, answers):
        mark = "ok" if arithmetic.parse_completion(a) == p.result else f"wrong, expected {p.result}"
        shown = a.split("\n")[0]
        print(f"  {arithmetic.prompt(p)}{shown}   ({mark})")
    if result["failures"]:
        print("some failures:")
        for f in result["failures"][:5]:
            print(f"  {f['prompt']}  expected {f['expected']}, got {quoted(f['got'])}")
    report: dict[str, Any] = {"summary": summary, "accuracy": result["accuracy"]}
    if chatting:
        report["chat"] = chat_stage(cfg, run, chat_seconds, t_start + cfg.max_time, per_problem)
    minutes = (time.perf_counter() - t_start) / 60
    stopped = [name for name, s in [("training", summary), ("fine-tuning", report.get("chat", {}).get("summary"))]
               if s and s["stop"] == "interrupted"]
    sessions = _earlier_sessions(run, report) if cfg.resume else []
    sessions.append({"minutes": round(minutes, 2), "step": summary["steps"], "accuracy": result["accuracy"]})
    in_all = sum(s["minutes"] for s in sessions)
    spent = (f"{minutes:.1f} min for this part" + (f", {in_all:.1f} in all over {len(sessions)} starts"
                                                    if len(sessions) > 1 else "")) if cfg.resume else \
        f"{minutes:.1f} min in all"
    print(f"\naccuracy {100 * result['accuracy']:.2f} % on {result['n']:,} held-out problems after "
          f"{summary['steps']:,} step{'s' * (summary['steps'] != 1)} ({spent}"
          f"{'; the ' + ' and '.join(stopped) + ' stopped early by Ctrl-C' if stopped else ''}). Next:")
    where = typed(run)
    if result["accuracy"] < 0.5 and not stopped:  # (a short budget: the table alone said nothing of why)
        print("  (few steps for this task: it takes some thousands, which the default --max-time 600 gives a 2-core "
              f"CPU, for about 72-85 %: train it further with `homellm quickstart --out {typed(run)} --resume "
              "--max-time 600`)")
    print(f"  homellm generate {where} --prompt '$12 \\times 7 =' --temperature 0")
    if result["accuracy"] >= 0.5:  # (beyond the training range: only worth a look once the range is learned)
        print(f"  homellm eval {where} --task arithmetic --max-digits 3     # operands beyond the training range")
    if chatting:
        print(f"  homellm chat {typed(run / 'chat')}     # ask: What is 12 times 7?  /  12×7は？  /  12*7")
    elif not cfg.resume:
        print(f"  homellm quickstart --chat --out {typed(str(run) + '-chat')}     # the same, plus a chat model")
    print(f"  homellm info {where}")
    # minutes: the whole run's, its starts added up; sessions: each start's minutes, and the step it ended at, and
    # its accuracy (a resumed run's report replaced the first, and its minutes were the last start's beside the
    # steps of all)
    report.update(minutes=round(in_all, 2), sessions=sessions)
    atomic_write_text(run / "quickstart.json", json.dumps(report, indent=2) + "\n")
    return {**result, "interrupted": stopped, "run": str(run), "chat": cfg.chat}


def _earlier_sessions(run: Path, report: dict[str, Any]) -> list[dict[str, Any]]:
    """The starts before this --resume, from the run's quickstart.json (a report from before it listed its starts
    is one); the chat stage's result is kept in `report`, as its model stays as it was."""
    try:
        before = json.loads((run / "quickstart.json").read_text(encoding="utf-8"))
        if "chat" in before:
            report.setdefault("chat", before["chat"])
        sessions = before.get("sessions") or [{"minutes": before["minutes"], "step": before["summary"]["steps"],
                                               "accuracy": before["accuracy"]}]
        return [{**s, "minutes": float(s["minutes"])} for s in sessions]
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return []  # (none, or not readable: only this start's figures are known)


def _answer_batches(data_dir: Path, tok: Tokenizer, model_cfg: ModelConfig, seed: int, chat: bool) -> AnswerBatches:
    """The quickstart's training rows: of the whole context with documents off for a --chat run (its replies come
    after the question), else packed rows of ROW_TOKENS."""
    return AnswerBatches(data_dir, tok, model_cfg.block_size if chat else ROW_TOKENS, seed, packed=not chat)


CHAT_EVAL_PER_PROBLEM = 6  # a chat question's time to answer against a plain prompt's (the whole line, not ` 84$`)


def _seconds_left(cfg: QuickstartConfig, t_start: float, reserve: float, prepared: bool = False) -> float:
    """The training's share of --max-time: what starting (and preparing) left, less the evaluation's `reserve`."""
    seconds = cfg.max_time - (time.perf_counter() - t_start) - reserve
    if seconds < 1:
        raise HomeLLMError(f"--max-time {cfg.max_time:.0f}: starting{' and preparing the data' * prepared} "
                           f"took {time.perf_counter() - t_start:.0f} s and {reserve:.0f} s are kept for the "
                           f"evaluation ({cfg.n:,} problems{', and the chat model' if cfg.chat else ''}), so no time "
                           "is left to train: raise --max-time"
                           + ("" if cfg.resume else ", or lower --problems or --n"))
    return seconds


def _train_further(cfg: QuickstartConfig, run: Path, t_start: float, reserve: float) -> dict[str, Any]:
    """quickstart --resume: the run trained for --max-time more (less starting and the evaluation), on its own
    problems and rows, from its `last` checkpoint; the learning rate's schedule stretches to the new end."""
    from homellm.checkpoint import find_checkpoint, load_state, read_config
    from homellm.config import load_json
    from homellm.train import train

    if cfg.chat:
        chats = typed(run / "task" / "chat.jsonl")
        raise HomeLLMError("--resume trains the quickstart's model further, not its chat stage: drop --chat (then "
                           f"fine-tune anew with `homellm sft --init {typed(run)} --data {chats} --out NEW_CHAT`)")
    for flag, value in (("--problems", cfg.problems), ("--chat-problems", cfg.chat_problems)):
        if value:  # (they size the data made at the start, which a resumed run keeps: silently ignored before)
            raise HomeLLMError(f"{flag} {value}: --resume trains on the problems the run was made with; drop {flag}, "
                               "or start a new run with another --out")
    saved = load_json(run / "config.json") if (run / "config.json").is_file() else None
    if not saved or saved.get("task") != "arithmetic":
        raise HomeLLMError(f"--resume: {run} is not a run of `homellm quickstart`: "
                           + ("start one without --resume" if saved is None else
                              f"continue it as it was made (`homellm pretrain --out {typed(run)} --resume`)"))
    state = load_state(find_checkpoint(run, "last", need_state=True, quiet=True))
    # (a chat.jsonl beside it tells --chat runs from before that was kept in the config)
    chat = saved.get("quickstart", {}).get("chat", (run / "task" / "chat.jsonl").is_file())
    model_cfg, was = read_config(run)
    if chat and holds_trained(run / "chat"):
        say(f"note: {run / 'chat'}, the chat model fine-tuned from this one, stays as it was: fine-tune the model "
            f"trained further anew with `homellm sft --init {typed(run)} --data {typed(run / 'task' / 'chat.jsonl')} "
            "--out NEW_CHAT`")
    seconds = _seconds_left(cfg, t_start, reserve)
    # The budget goes on from the time the run used (and the room its final evaluation keeps), not from the budget
    # it had: a run stopped early by Ctrl-C at 14 s of 81 trained 81 s more for --max-time 20 (review). Nor from the
    # budget where the run overran it (a loaded machine's first step): that overrun came out of the new seconds.
    used, room = state.get("elapsed", was.max_time), state.get("final_eval", (0.0, 0.0))[0]
    train_cfg = replace(was, out=str(run), resume=True, max_time=round(used + room + seconds, 1),
                        device=cfg.device)
    _stage(4, 5, f"training {run} further for {seconds:.0f} s (it trained {used:.0f} s)")
    data_dir = Path(saved["data_dir"])
    if not (data_dir / "meta.json").is_file():
        data_dir = run / "data"  # (the run moved, its data inside it)
    tok = Tokenizer.load(run)
    batches = _answer_batches(data_dir, tok, model_cfg, was.seed, chat)
    extra = {k: saved[k] for k in ("task", "data_meta") if k in saved}
    return train(model_cfg, train_cfg, batches, tok, extra_config={
        **extra, "data_dir": str(data_dir.resolve()), "quickstart": {"chat": chat}},
        after_ctrl_c="then the evaluation of the model as it is")


def chat_stage(cfg: QuickstartConfig, run: Path, seconds: float, deadline: float,
               per_problem: float) -> dict[str, Any]:
    """Stages 6-7: fine-tune the model on the task asked as questions (SFT), then score it per phrasing. It trains
    for `seconds` at most, less what writing and reading its conversations and scoring it take of the time left
    before `deadline` (a time.perf_counter()); `per_problem`, the plain evaluation's seconds a problem, sizes the
    scoring. Fixed sizes (50,000 conversations, 1,500 questions scored) took a 60 s --chat quickstart to 2.6 min."""
    from homellm.config import SFT_TRAIN, EvalConfig, SFTConfig
    from homellm.eval import eval_chat_arithmetic
    from homellm.sft import sft

    share = min(1.0, cfg.max_time / 600)  # (of the sizes measured for 10 minutes)
    n_chat = min(cfg.n, max(20, round(500 * share)))
    n_conversations = cfg.chat_problems or max(2000, round(50_000 * share))
    _stage(6, 7, f"fine-tuning it into a chat model on {n_conversations:,} conversations (questions in English, "
              "Japanese, symbols)")
    t_write = time.perf_counter()
    problems = arithmetic.generate(n_conversations, cfg.seed + 7, split="train")
    path = run / "task" / "chat.jsonl"
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                    for r in arithmetic.conversations(problems, cfg.seed)))
    # sft reads and renders them again (about the time they took to write), and the scoring comes after
    scoring = 3 * n_chat * per_problem * CHAT_EVAL_PER_PROBLEM
    seconds = max(1.0, min(seconds, deadline - time.perf_counter() - 2 * (time.perf_counter() - t_write) - scoring))
    # Muon, as in pretraining: at the same 107 s, 28.7 % of held-out questions right instead of AdamW's 10.8 %.
    train_cfg = replace(TrainConfig(**SFT_TRAIN), out=str(run / "chat"), max_steps=0, max_time=seconds,
                        optimizer="muon", lr=CHAT_LR, batch_size=32, eval_every=200, device=cfg.device, seed=cfg.seed,
                        warmup_steps=short_warmup(SFT_TRAIN["warmup_steps"], seconds))
    summary = sft(SFTConfig(init=str(run), data=[str(path)], val_fraction=0.02), train_cfg,
                  after_ctrl_c="then the evaluation of the chat model as it is")
    _stage(7, 7, f"evaluating the chat model on {n_chat:,} held-out problems in each phrasing")
    with _one_thread():
        result = eval_chat_arithmetic(run / "chat", EvalConfig(n=n_chat, seed=cfg.seed + 1, device=cfg.device))
    return {"summary": summary, "accuracy": result["accuracy"],
            "by_phrasing": {k: v["accuracy"] for k, v in result["by_phrasing"].items()}}
