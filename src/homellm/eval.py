"""`homellm eval`: measure a run. `--task arithmetic` scores exact answers to held-out problems;
`--task chat-arithmetic` scores a chat model's replies to the same problems asked in English, Japanese and symbols;
`--task loss` reports val loss and bits per byte on any prepared data folder; `--task exact --data FILE` scores
greedy answers to your own prompts."""

from __future__ import annotations

import glob
import json
import math
import random
import re
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from homellm.checkpoint import chat_model_beside, run_config_path
from homellm.config import IM_END, EvalConfig, load_json
from homellm.data import PROMPT_FIELDS, conversation_kind, first_record, nanogpt_folder
from homellm.errors import HomeLLMError, quoted, typed
from homellm.info import table
from homellm.io import atomic_write_text, progress_bar, say
from homellm.model import GPT, KVCache
from homellm.tokenizer import Tokenizer


def stop_ids(tok: Tokenizer, chars: str) -> torch.Tensor:
    """Ids whose text contains any of `chars`, plus end of text: generation of an answer ends at them."""
    ids = [i for i in range(tok.vocab_size) if any(c in tok.decode([i]) for c in chars)]
    return torch.tensor(sorted({*ids, tok.eot_id, tok.im_end_id}))


@torch.no_grad()
def greedy_complete(model: GPT, tok: Tokenizer, prompts: list[str] | list[list[int]], max_new_tokens: int,
                    stop: torch.Tensor, batch_size: int = 256, desc: str = "answer") -> list[str]:
    """Greedy completions of many prompts (texts, or token ids such as rendered chats), batched: prompts of equal
    token length share a batch, so no padding and no attention mask are needed, and each batch decodes with one
    KV cache until every row has stopped. A completion ends with its stop token's text."""
    from homellm.generate import window

    model.eval()
    device = next(model.parameters()).device
    if prompts and not isinstance(prompts[0], str):
        encoded = [list(p) for p in prompts]
    else:  # as generate reads a prompt: chat markup honoured, after the bos of a model trained with one
        encoded = tok.encode_prompts(prompts)
    # A prompt that fills the context keeps its last tokens (after the bos of a model trained with one), as
    # generate's does, with room to answer: it was left unanswered, and scored wrong (or right, against an empty
    # answer).
    block = model.cfg.block_size
    fits = block - min(max_new_tokens, block // 2)
    if long := sum(len(ids) >= block for ids in encoded):
        say(f"note: {long:,} prompt{'s fill' if long > 1 else ' fills'} the model's {block}-token context: only the "
            f"last {fits} tokens of each are read, to leave room for the answer")
        keep = int(tok.bos_id is not None)
        encoded = [window(ids, fits, keep * (ids[:1] == [tok.bos_id])) if len(ids) >= block else ids
                   for ids in encoded]
    guard = tok.utf8_guard if tok.utf8_guard.needed else None  # as generate: no token that breaks a character
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_length.setdefault(len(ids), []).append(i)
    out: list[list[int]] = [[] for _ in prompts]
    stop = stop.to(device)
    with progress_bar(total=len(prompts), desc=desc, unit="prompt") as bar:
        for length, rows in sorted(by_length.items()):
            if length == 0:
                bar.update(len(rows))
                continue  # nothing to condition on: the empty completion counts as wrong
            steps = min(max_new_tokens, block - length)
            for start in range(0, len(rows), batch_size):
                chunk = rows[start:start + batch_size]
                x = torch.tensor([encoded[i] for i in chunk], device=device)
                cache = KVCache(model.cfg, len(chunk), length + steps, device, next(model.parameters()).dtype)
                logits, _ = model(x, cache=cache)
                done = torch.zeros(len(chunk), dtype=torch.bool, device=device)
                generated = []
                states = [0 if guard is None else guard.state(encoded[i]) for i in chunk]
                for t in range(steps):
                    if guard is None:
                        nxt = logits[:, -1, :tok.vocab_size].argmax(-1)  # the padded ids past it are no token
                    else:
                        allowed = guard.mask(states, device, logits.size(-1))  # (the padded ids never)
                        nxt = logits[:, -1].masked_fill(~allowed, float("-inf")).argmax(-1)
                        states = [guard.state([n], st) for n, st in zip(nxt.tolist(), states)]
                    generated.append(torch.where(done, -1, nxt))
                    done |= torch.isin(nxt, stop)
                    if bool(done.all()) or t == steps - 1:
                        break
                    logits, _ = model(nxt[:, None], cache=cache)
                rows_ids = torch.stack(generated, 1).tolist()
                for i, ids in zip(chunk, rows_ids):
                    out[i] = [t for t in ids if t >= 0]
                bar.update(len(chunk))
    return [tok.decode(ids) for ids in out]


def _run_config(run: Path) -> dict[str, Any]:
    config = load_json(path := run_config_path(run))
    if not isinstance(config, dict):
        raise HomeLLMError(f"{path}: not a run's config (a JSON object): restore it, or train the run again")
    return config


def eval_arithmetic(run: str | Path, cfg: EvalConfig, model: GPT | None = None,
                    quiet: bool = False) -> dict[str, Any]:
    """Score greedy answers to cfg.n held-out problems; write RUN/eval_arithmetic[_Nd].json; return the score."""
    from homellm.checkpoint import load_model
    from homellm.tasks import arithmetic
    from homellm.train import resolve_device

    run = Path(run)
    if cfg.n <= 0:
        raise HomeLLMError(f"--n {cfg.n}: ask for at least 1 problem")
    config = _run_config(run)
    if config.get("task") != "arithmetic":
        if auto_task(run) == "chat-arithmetic":
            raise HomeLLMError(f"{run} is the quickstart's chat model, fine-tuned to answer the task's questions: "
                               f"`homellm eval {typed(run)} --task chat-arithmetic` scores it")
        fix = ("a chat model fine-tuned on the task is scored by `--task chat-arithmetic`" if "sft" in config else
               "train one with `homellm quickstart`; your own prompts and answers (a model of your own on the task's "
               "lines, say) are scored by `--task exact --data QA.jsonl`; or use `--task loss`")
        raise HomeLLMError(f"{run} was not trained by the quickstart on the arithmetic task (its config.json names no "
                           f"task): {fix}")
    tok = Tokenizer.load(run)
    if model is None:
        model = load_model(run, cfg.checkpoint, resolve_device(cfg.device))
    problems = arithmetic.generate(cfg.n, cfg.seed, split="heldout", max_digits=cfg.max_digits)
    completions = greedy_complete(model, tok, [arithmetic.prompt(p) for p in problems], 32, stop_ids(tok, "$\n"),
                                  cfg.batch_size, desc=f"eval {run.name}")
    result = arithmetic.score(problems, completions)
    result.update(task="arithmetic", seed=cfg.seed, max_digits=cfg.max_digits, checkpoint=_weights(model, cfg))
    suffix = "" if cfg.max_digits == 2 else f"_{cfg.max_digits}d"
    if not quiet:  # shown before it is saved: a run folder that cannot be written must not cost the result
        print(arithmetic.format_table(result))
    atomic_write_text(run / f"eval_arithmetic{suffix}.json", json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    if not quiet:
        print(f"written to {run / f'eval_arithmetic{suffix}.json'}")
    return result


def eval_loss(run: str | Path, cfg: EvalConfig) -> dict[str, Any]:
    """Val loss and bits per byte of a run on a prepared data folder's val split, or on every token of raw text
    (.txt, .jsonl, a folder of them, hf:NAME: tokenized with the run's tokenizer, aside); in RUN/eval_loss.json."""
    from homellm.checkpoint import load_model, read_config
    from homellm.config import TrainConfig
    from homellm.train import TokenBatches, evaluate, native_bf16, resolve_device, setup_env

    run = Path(run)
    config = _run_config(run)
    # Raw text (what pretrain --data takes too), scored whole: your own held-out text, across runs and tokenizers
    raw = bool(cfg.data) and not (Path(cfg.data) / "meta.json").is_file() and (
        cfg.data.startswith("hf:") or glob.has_magic(cfg.data) or Path(cfg.data).is_file() or Path(cfg.data).is_dir())
    if raw:
        data_dir = Path(cfg.data)
        if (data_dir / "config.json").is_file():
            raise HomeLLMError(f"--data {data_dir} is a run: omit --data to score {run}'s own data, or give text")
        if nanogpt_folder([cfg.data]):  # prepare takes such a pair as it is, checked against the tokenizer
            raise HomeLLMError(f"--data {data_dir}: nanoGPT's token files, without homellm's meta.json: `homellm "
                               f"prepare --input {typed(data_dir)} --tokenizer {typed(run)} --out DATA` takes them as "
                               "they are (no copy), then --data DATA")
        if list(data_dir.glob("train_*.bin")) or (data_dir / "tokenizer").is_dir():
            raise HomeLLMError(f"--data {data_dir}: token files without homellm's meta.json, not text: prepare the "
                               f"text with `homellm prepare --input TEXT --tokenizer {typed(run)} --out DATA`, then "
                               "--data DATA")
    elif cfg.data:
        data_dir = Path(cfg.data)
        if not data_dir.exists():
            raise HomeLLMError(f"--data {data_dir}: not found: pass a folder made by `homellm prepare`, or text files")
    else:  # the data it last trained on, else its own data/ (moved, copied, or saved relative to another cwd)
        from homellm.checkpoint import run_data

        saved = config.get("data_dir")
        found = run_data(run, saved)
        if found is None:
            what = (f"no longer finds the prepared data it was trained on ({saved})" if saved else
                    "was not trained on a prepared data folder (fine-tuned or merged runs are not)")
            chat = ", or a .jsonl of conversations to score its replies" if "sft" in config else ""
            raise HomeLLMError(f"{run} {what}: pass --data, a folder made by `homellm prepare --tokenizer "
                               f"{typed(run)}`{chat}")
        data_dir = found
    # A file of conversations (OpenAI's messages, ShareGPT, Alpaca): its replies scored, as sft's val loss is
    chats = raw and bool(conversation_kind(first_record(Path(cfg.data))))
    model_cfg, train_cfg = read_config(run)
    run_tok = Tokenizer.load(run)
    tok = run_tok if raw else Tokenizer.load(data_dir)
    if not tok.same_as(run_tok):
        raise HomeLLMError(f"--data {data_dir} was tokenized with another tokenizer than {run}: prepare it with "
                           f"`homellm prepare --tokenizer {typed(run)}`")
    if config.get("task") == "arithmetic":  # its val loss in metrics.jsonl scores the answers alone
        print(f"note: {run} trained on the arithmetic answers alone; this loss scores every token of the text, "
              "problems included, so it is far above the run's own val loss: `--task arithmetic` measures it",
              file=sys.stderr)
    # On a GPU, scored in the precision it trained in (as metrics.jsonl was), when this GPU has it natively; else,
    # and on the CPU (where float16 autocast is slower than float32), the device's own choice: float32 on a CPU, as
    # setup_env is given no model width (training on a CPU with AMX may have run in bfloat16).
    device = resolve_device(cfg.device)
    as_trained = device.type == "cuda" and (train_cfg.dtype != "bfloat16" or native_bf16(device))
    env = setup_env(TrainConfig(device=cfg.device, dtype=train_cfg.dtype if as_trained else "auto"))
    model = load_model(run, cfg.checkpoint, env.device)
    batch = min(cfg.batch_size, 64)  # windows of a whole context each: 64 keep the memory of one batch modest
    if chats:
        return _conversations_loss(run, cfg, model, tok, model_cfg.block_size, batch, env)
    if raw:
        from homellm.config import PrepareConfig
        from homellm.data import open_split, prepare

        with tempfile.TemporaryDirectory(prefix="homellm-eval-") as tmp:  # every token: all of it in "train"
            prepare(PrepareConfig(input=[cfg.data], tokenizer=str(run), out=tmp, val_fraction=0.0,
                                  text_field=cfg.text_field, encoding=cfg.encoding, aozora=cfg.aozora))
            print(f"evaluating all of {cfg.data} once, in windows of {model_cfg.block_size} tokens", file=sys.stderr)
            maps = list(open_split(Path(tmp), "train"))
            try:
                # The text's first token is scored too, read after what a document starts after (end of text, or a
                # model's bos), as each later document is read after the end of the one before
                if maps and maps[0][0] != tok.start_id:  # (a short copy of the start: the rest stays on disk)
                    k = min(len(maps[0]), model_cfg.block_size)
                    maps[:1] = [np.concatenate([np.asarray([tok.start_id], dtype=maps[0].dtype), maps[0][:k]]),
                                maps[0][k - 1:]]
                result = whole_split_loss(model, maps, model_cfg.block_size, batch, tok.token_bytes(), env)
            finally:
                maps.clear()  # before the folder goes, on an error too: Windows refuses to delete a mapped file
        assert result is not None  # prepare refuses empty text, and any text has the end of text to predict
        return _report_loss(run, {"task": "loss", "data": cfg.data, "checkpoint": _weights(model, cfg), "batches": 0,
                                  "batch_size": batch, **result}, of="")
    data = TokenBatches(data_dir, model_cfg.block_size, train_cfg.seed, tok.token_bytes())
    # Windows are drawn at random: past about one per block of val tokens they only repeat the same text (50
    # batches of 64 on a 4,000-token split read it 100 times over, for minutes).
    windows = math.ceil(sum(len(m) for m in data.splits["val"]) / model_cfg.block_size)
    batches = min(cfg.batches, max(1, math.ceil(windows / batch))) if cfg.batches else 0
    if batches:
        print(f"evaluating {batches} batch{'es' * (batches != 1)} of {batch} windows of {model_cfg.block_size} "
              f"tokens from {data_dir}'s val split", file=sys.stderr)
        result = evaluate(model, data, batch, batches, env)
    else:
        print(f"evaluating the whole val split of {data_dir} once, in windows of {model_cfg.block_size} tokens",
              file=sys.stderr)
        result = whole_split_loss(model, data.splits["val"], model_cfg.block_size, batch, tok.token_bytes(), env)
    if result is None:
        raise HomeLLMError(f"--data {data.no_val}")
    return _report_loss(run, {"task": "loss", "data": str(data_dir), "checkpoint": _weights(model, cfg),
                              "batches": batches, "batch_size": batch, **result})


def _conversations_loss(run: Path, cfg: EvalConfig, model: GPT, tok: Tokenizer, block: int, batch: int,
                        env: Any) -> dict[str, Any]:
    """Loss and bits per byte of the replies in a file of conversations, rendered and masked as sft trains them:
    a chat model's figure on conversations of your own, comparable with its sft val loss."""
    from homellm.chat import read_conversations, unique_conversations
    from homellm.checkpoint import speaks_chatml
    from homellm.config import SFTConfig
    from homellm.sft import ChatBatches
    from homellm.train import evaluate

    conversations = unique_conversations(read_conversations([cfg.data])[0])  # one copy of each, as sft trains
    if not speaks_chatml(run):
        say(f"note: {run} was not fine-tuned on conversations: it never saw their chat format, so this loss is far "
            "above a chat model's")
    data = ChatBatches(conversations, tok, block, 0, SFTConfig(), all_val=True)
    rows = len(data.rows["val"][0])
    cut = f"; {data.stats['truncated']} cut at the model's {block}-token context" if data.stats["truncated"] else ""
    print(f"evaluating the replies of {len(conversations):,} conversation{'s' * (len(conversations) != 1)} in "
          f"{cfg.data}, as sft's val loss scores them{cut}", file=sys.stderr)
    result = evaluate(model, data, batch, math.ceil(rows / batch), env)
    if result is None:
        raise HomeLLMError(f"--data {cfg.data}: no reply fits the model's {block}-token context to score")
    return _report_loss(run, {"task": "loss", "data": cfg.data, "checkpoint": _weights(model, cfg), "scored": "replies",
                              "conversations": len(conversations), **result}, of="reply ")


def _report_loss(run: Path, result: dict[str, Any], of: str = "val ") -> dict[str, Any]:
    """The table on screen (`of` the val split, or "" for raw text, all of which is scored) and eval_loss.json."""
    print(table([(f"{of}loss (nats/token)", f"{result['val_loss']:.4f}"),
                 (f"{of}bits per byte", f"{result['val_bpb']:.4f}")], ("metric", "value")))
    atomic_write_text(run / "eval_loss.json", json.dumps(result, indent=2) + "\n")
    return result


def whole_split_loss(model: GPT, maps: list[np.ndarray], block: int, batch: int, token_bytes: np.ndarray,
                     env: Any) -> dict[str, float] | None:
    """Val loss and bits per byte over every token of the split once: each shard cut into consecutive windows of
    `block` (a window's first token is read, not scored, as the next window's last target), so the figure is exact
    and repeatable, unlike --batches' random windows. None where the split is empty."""
    from homellm.train import add_loss, loss_sums

    # (start, length) of each window: a token predicted from the window's start, its targets the next `length`
    rows = [(m, i, min(block, len(m) - 1 - i)) for m in maps for i in range(0, max(len(m) - 1, 0), block)]
    sums = loss_sums(env)
    sizes = torch.from_numpy(token_bytes.astype(np.int64))
    with torch.no_grad(), progress_bar(total=len(rows), desc="val windows", unit="window") as bar:
        for first in range(0, len(rows), batch):
            chunk = rows[first:first + batch]
            x = torch.zeros(len(chunk), block, dtype=torch.long)
            y = torch.full((len(chunk), block), -100, dtype=torch.long)
            for r, (m, i, n) in enumerate(chunk):
                window = torch.from_numpy(np.asarray(m[i:i + n + 1], dtype=np.int64))
                x[r, :n], y[r, :n] = window[:-1], window[1:]
            sums = add_loss(model, x, y, [], env, sizes, sums)
            bar.update(len(chunk))
    nats, tokens, nbytes = sums[0].item(), sums[1], sums[2]
    if not tokens:
        return None
    return {"val_loss": nats / tokens, "val_bpb": nats / math.log(2) / max(nbytes, 1), "tokens": int(tokens)}


def eval_chat_arithmetic(run: str | Path, cfg: EvalConfig, model: GPT | None = None,
                         quiet: bool = False) -> dict[str, Any]:
    """Exact match of a chat model's replies to held-out problems asked in each phrasing (English, Japanese,
    symbols): the reply must be the problem's LaTeX line. Written to RUN/eval_chat_arithmetic.json."""
    from homellm.chat import prompt_ids
    from homellm.checkpoint import load_model
    from homellm.tasks import arithmetic
    from homellm.train import resolve_device

    run = Path(run)
    if cfg.n <= 0:
        raise HomeLLMError(f"--n {cfg.n}: ask for at least 1 problem per phrasing")
    if "sft" not in _run_config(run):
        if beside := chat_model_beside(run):
            raise HomeLLMError(f"{run} is the quickstart's base model; its chat model is {beside}: "
                               f"`homellm eval {typed(beside)} --task chat-arithmetic`")
        raise HomeLLMError(f"{run} is not a chat model (its config.json has no sft section): fine-tune one with "
                           "`homellm quickstart --chat` or `homellm sft`, or use --task arithmetic")
    tok = Tokenizer.load(run)
    if model is None:
        model = load_model(run, cfg.checkpoint, resolve_device(cfg.device))
    rng = random.Random(cfg.seed)
    result: dict[str, Any] = {"task": "chat-arithmetic", "seed": cfg.seed, "checkpoint": _weights(model, cfg),
                              "by_phrasing": {}}
    rows = []
    problems = arithmetic.generate(cfg.n, cfg.seed, split="heldout", max_digits=cfg.max_digits)
    for phrasing in arithmetic.PHRASINGS:
        questions = [arithmetic.question(p, phrasing, rng) for p in problems]
        prompts = [prompt_ids(tok, [{"role": "user", "content": q}]) for q in questions]
        replies = greedy_complete(model, tok, prompts, 40, stop_ids(tok, ""), cfg.batch_size,
                                  desc=f"chat {phrasing}")
        replies = [r.removesuffix(IM_END).removesuffix(tok.eos) for r in replies]
        scored = arithmetic.score(problems, [arithmetic.reply_completion(p, r) for p, r in zip(problems, replies)])
        result["by_phrasing"][phrasing] = {k: scored[k] for k in ("n", "correct", "accuracy", "by")}
        result["by_phrasing"][phrasing]["failures"] = [
            {"question": q, "expected": arithmetic.line(p), "got": r}
            for p, q, r in zip(problems, questions, replies) if r != arithmetic.line(p)][:5]
        rows.append((phrasing, scored["n"], scored["correct"], f"{100 * scored['accuracy']:.1f} %"))
    total = sum(r[1] for r in rows)
    result["accuracy"] = sum(r[2] for r in rows) / total
    if not quiet:
        print(table(rows + [("overall", total, sum(r[2] for r in rows), f"{100 * result['accuracy']:.1f} %")],
                    ("phrasing", "n", "correct", "accuracy")))
        for phrasing, r in result["by_phrasing"].items():
            for f in r["failures"][:2]:
                print(f"  {phrasing}: {quoted(f['question'])} -> {quoted(f['got'])} (expected {quoted(f['expected'])})")
    atomic_write_text(run / "eval_chat_arithmetic.json", json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return result


# The names sft reads a question and its answer by (homellm.chat), and "expected".
ANSWER_FIELDS = ("answer", "expected", "completion", "response", "output")


def read_qa(path: Path, limit: int) -> list[dict[str, str]]:
    """Prompt and answer pairs (an optional category, and a system prompt for chat runs) from a jsonl or JSON-array
    file, the first `limit`, read by the names sft reads: Alpaca's instruction with its input is the prompt."""
    from homellm.data import jsonl_records

    if not path.is_file():
        what = "a folder" if path.is_dir() else "no such file"
        raise HomeLLMError(f"--data {path}: {what}: give a .jsonl file of {{\"prompt\": ..., \"answer\": ...}}")
    pairs = []
    for where, record in jsonl_records(path):
        if isinstance(record, HomeLLMError):
            raise record
        if not isinstance(record, dict):
            raise HomeLLMError(f"{where}: not a JSON object: write {{\"prompt\": ..., \"answer\": ...}}")
        if len(pairs) == limit:  # one more than asked: say the rest are left out
            say(f"note: --data {path} holds more than --n {limit} records: the first {limit} are scored (raise --n "
                "for more)")
            break
        if isinstance(record.get("instruction"), str):  # Alpaca's: as sft asks it, the instruction, then the input
            prompt = "\n\n".join(v for v in (record["instruction"], record.get("input")) if isinstance(v, str) and v)
        else:
            prompt = next((record[k] for k in PROMPT_FIELDS if k in record), None)
        answer = next((record[k] for k in ANSWER_FIELDS if k in record), None)
        for name, value, names in (("prompt", prompt, PROMPT_FIELDS), ("answer", answer, ANSWER_FIELDS)):
            if value is None:
                raise HomeLLMError(f"{where}: no {name} (a string in {' or '.join(repr(n) for n in names)}): add it")
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):  # ("no answer" of one: review)
                field = next(k for k in names if k in record)
                raise HomeLLMError(f"{where}: {field!r} is {value!r}, not a string: write the {name} as text")
        system = record.get("system") or ""
        if not isinstance(system, str):
            raise HomeLLMError(f"{where}: 'system' is {system!r}, not a string")
        for name, value in (("prompt", prompt), ("answer", answer), ("system", system)):
            try:  # JSON's "\ud800" reads as half a character: the tokenizer failed on it with a TypeError
                str(value).encode("utf-8")
            except UnicodeEncodeError as e:
                raise HomeLLMError(f"{where}: the {name} holds {str(value)[e.start]!r} at character {e.start}, half of "
                                   "a UTF-16 pair, which is no character: fix the text, or drop the record") from None
        pairs.append({"prompt": str(prompt), "answer": str(answer), "category": str(record.get("category") or ""),
                      "system": system})
    if not pairs:
        raise HomeLLMError(f"--data {path}: no prompt and answer pairs in it: the file is empty")
    return pairs


def _weights(model: GPT, cfg: EvalConfig) -> str:
    """The checkpoint the model's weights came from, for a report: `best` asked of a run that has none yet is
    `last` (the report named `best`, review)."""
    folder = getattr(model, "loaded_from", None)
    return folder.name if folder is not None else cfg.checkpoint


def final_answer(text: str) -> str | None:
    """The final answer of a GSM8K-style solution, what follows its last "####" on that line: its number where it
    starts with one, as GSM8K's own scoring reads `#### (-?[0-9.,]+)` ("#### 800 cents" is 800, and a model that
    goes on past it is not wrong for that), thousands' commas dropped (GSM8K writes 1,000 and 1000 alike); None
    where there is none, or nothing after it."""
    if "####" not in text:
        return None
    after = text.rsplit("####", 1)[1].strip().split("\n")[0].strip()
    # (a model's "#### $12." is 12 too)
    if number := re.match(r"\$?(-?\$?[0-9.,]*[0-9](?:/[0-9]+)?)", after):  # (3/4 whole: not 3)
        return number[1].replace(",", "").replace("$", "")
    return after.removesuffix(".").strip() or None


def eval_exact(run: str | Path, cfg: EvalConfig, model: GPT | None = None) -> dict[str, Any]:
    """Exact match of greedy answers to your own prompts (seed 004 asked its model "1 + 1 ="): a pretrained run
    continues each prompt up to the end of the line, a chat run (sft) answers it as a user message up to the end
    of its turn; the answer, stripped of surrounding spaces, must equal the expected one. Per category when the
    records name one; written to RUN/eval_exact.json."""
    from homellm.chat import prompt_ids
    from homellm.checkpoint import load_model, speaks_chatml
    from homellm.train import resolve_device

    run = Path(run)
    if cfg.n <= 0:
        raise HomeLLMError(f"--n {cfg.n}: ask for at least 1 prompt")
    if not cfg.data:
        raise HomeLLMError("--task exact needs --data FILE: a .jsonl of {\"prompt\": ..., \"answer\": ...} lines")
    run_config_path(run)
    pairs = read_qa(Path(cfg.data), cfg.n)
    chat = speaks_chatml(run)
    if not chat and (bad := next((p for p in pairs if "\n" in p["answer"].strip()), None)):
        raise HomeLLMError(f"--data {cfg.data}: the answer {bad['answer']!r} spans lines, but a pretrained run's "
                           "answer ends at the line's end: give one-line answers (a chat run answers whole turns)")
    tok = Tokenizer.load(run)
    # As generate and chat read what is typed: full-width １２ as the 12 the model writes (a char model read them as
    # unknowns, and the expected ８ was one it could never write); what stays unknown is said.
    folded = [{**p, **{k: tok.fold(p[k]) for k in ("prompt", "answer", "system")}} for p in pairs]
    if changed := sum(f != p for f, p in zip(folded, pairs)):
        say(f"note: {changed:,} line{'s' * (changed != 1)} of {cfg.data} hold characters this model's tokenizer "
            "writes otherwise (full-width １２ as 12): asked and compared as it writes them, as generate reads them")
    pairs = folded
    if note := tok.unknown_note("".join(p["prompt"] + p["answer"] + p["system"] for p in pairs)):
        say(f"note: {note}")
    if model is None:
        model = load_model(run, cfg.checkpoint, resolve_device(cfg.device))
    # GSM8K's answers are worked solutions ending in "#### 72": the final answers are compared, as GSM8K is scored
    # (the whole solution, compared, scored about 0 for any model).
    finals = [final_answer(p["answer"]) is not None for p in pairs]
    final = any(finals)
    longest = max(len(tok.encode(p["answer"])) for p in pairs)
    if final:
        longest *= 2  # worked solutions: a model's own may be longer than the longest given, and end in ####
    prompts = [prompt_ids(tok, [{"role": "system", "content": p["system"]}] * bool(p["system"]) +
                          [{"role": "user", "content": p["prompt"]}]) for p in pairs] if chat else [
        p["prompt"] for p in pairs]
    got = greedy_complete(model, tok, prompts, longest + 8, stop_ids(tok, "" if chat else "\n"), cfg.batch_size,
                          desc=f"eval {run.name}")
    if chat:
        got = [g.removesuffix(IM_END).removesuffix(tok.eos) for g in got]
    else:  # (the model's own end of text: an imported Llama's </s>)
        got = [g.split("\n")[0].removesuffix(tok.eos) for g in got]
    if all(finals):
        say("note: every answer ends in GSM8K's '#### ANSWER': the final answers are compared, not the worked "
            "solutions")
    elif final:  # (review: one line without it turned every line's comparison to whole solutions, unsaid)
        first, others = pairs[finals.index(False)]["prompt"], finals.count(False)
        others = "the other is" if others == 1 else f"the {others:,} others are"
        say(f"note: {sum(finals):,} of the {len(pairs):,} answers end in GSM8K's '#### ANSWER', and are compared by "
            f"it; {others} compared whole (the first asks {first[:60]!r})")
    right = [final_answer(g) == final_answer(p["answer"]) if f else g.strip() == p["answer"].strip()
             for g, p, f in zip(got, pairs, finals)]
    by: dict[str, list[int]] = {}
    for p, ok in zip(pairs, right):
        by.setdefault(p["category"], [0, 0])
        by[p["category"]][0] += 1
        by[p["category"]][1] += ok
    result: dict[str, Any] = {
        "task": "exact", "data": str(cfg.data), "checkpoint": _weights(model, cfg), "chat": chat, "n": len(pairs),
        "compared": ("final answers (####)" if all(finals) else "final answers (####) where given, else whole answers"
                     if final else "whole answers"),
        "correct": sum(right), "accuracy": sum(right) / len(pairs),
        "by_category": {c: {"n": n, "correct": k, "accuracy": k / n} for c, (n, k) in by.items() if c},
        "failures": [{"prompt": p["prompt"], "expected": p["answer"], "got": g}
                     | ({"expected_final": final_answer(p["answer"]), "got_final": final_answer(g)} if f else {})
                     for p, g, ok, f in zip(pairs, got, right, finals) if not ok][:20]}
    named = any(by) and set(by) != {""}  # categories shown when the records name any; the rest as "(none)"
    rows = [(c or "(none)", n, k, f"{100 * k / n:.1f} %") for c, (n, k) in sorted(by.items()) if named]
    print(table(rows + [("overall", len(pairs), sum(right), f"{100 * result['accuracy']:.1f} %")],
                ("category", "n", "correct", "accuracy")))
    for f in result["failures"][:5]:  # GSM8K's: the final answers compared, not the whole solutions
        if "expected_final" in f:
            print(f"  {quoted(f['prompt'])} -> {f['got_final'] or 'no #### ANSWER'} (expected {f['expected_final']})")
        else:
            print(f"  {quoted(f['prompt'])} -> {quoted(f['got'].strip())} (expected {quoted(f['expected'].strip())})")
    atomic_write_text(run / "eval_exact.json", json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(f"written to {run / 'eval_exact.json'}")
    return result


def auto_task(run: str | Path) -> str:
    """--task auto's pick: the arithmetic task for a model trained on it (the quickstart's), chat-arithmetic for the
    chat model fine-tuned on its conversations (`quickstart --chat`), loss for every other run. Before, eval of any
    other run without --task said it was not trained on the arithmetic task."""
    config = _run_config(Path(run))
    if config.get("task") == "arithmetic":
        return "arithmetic"
    sft_data = config.get("sft", {}).get("data", [])
    if sft_data and all(Path(str(p)).parts[-2:] == ("task", "chat.jsonl") for p in sft_data):
        return "chat-arithmetic"
    return "loss"


def run_eval(run: str, cfg: EvalConfig) -> dict[str, Any]:
    if cfg.task == "auto":
        cfg = replace(cfg, task=auto_task(run))
        if cfg.task == "loss" and not cfg.data and "sft" in _run_config(Path(run)):  # (it has no data folder)
            raise HomeLLMError(f"{run} is a fine-tuned run: score it with `--task loss --data CHATS.jsonl` "
                               "(conversations it did not train on: their replies' loss) or `--task exact --data "
                               "QA.jsonl` (your prompts and answers); its own val loss is in `homellm info`")
        say(f"eval: --task {cfg.task} ({_AUTO_WHY[cfg.task]}; --task arithmetic, chat-arithmetic, loss or exact "
            "chooses)")
    if cfg.task == "arithmetic":
        return eval_arithmetic(run, cfg)
    if cfg.task == "chat-arithmetic":
        return eval_chat_arithmetic(run, cfg)
    if cfg.task == "loss":
        return eval_loss(run, cfg)
    if cfg.task == "exact":
        return eval_exact(run, cfg)
    raise HomeLLMError(f"--task {cfg.task!r} is unknown: use auto, arithmetic, chat-arithmetic, loss or exact")


_AUTO_WHY = {"arithmetic": "the run was trained on the arithmetic task",
             "chat-arithmetic": "the run is the quickstart's chat model", "loss": "the run's val loss"}
