"""The chat format (ChatML): conversations to token ids with a mask of the tokens SFT trains on, and chat files.

    <|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\n12×7は？<|im_end|>\n<|im_start|>assistant\n...

Only assistant replies and their <|im_end|> are trained: the model learns to answer and to stop, never to
imitate the user. The same template is stored as Jinja in tokenizer_config.json (`chat_template`), so Hugging
Face's `apply_chat_template` renders the identical text.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Any

from homellm.config import (
    CHAT_TEMPLATE,  # noqa: F401 (part of this module's API)
    IM_END,
    IM_START,
    ROLES,
)
from homellm.data import (
    PROMPT_FIELDS,
    REPLY_FIELDS,
    TABLES,
    folder_files,
    hf_dataset,
    hf_records,
    jsonl_records,
    table_error,
)
from homellm.errors import HomeLLMError, typed
from homellm.tokenizer import Tokenizer

Message = dict[str, Any]  # role and content; "weight": 0 on an assistant message not trained on


def check_messages(messages: Any, where: str) -> list[Message]:
    """The messages as a list of {role, content} dicts, or a one-line error naming `where` (file:line)."""
    if not isinstance(messages, list):
        kind = type(messages).__name__ if messages is not None else "missing"
        raise HomeLLMError(f"{where}: 'messages' is {kind}, not a list of {{role, content}} messages")
    if not messages:
        raise HomeLLMError(f"{where}: the conversation is empty: give at least one message")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or "role" not in m:
            found = (f" (found: {', '.join(map(str, m)) or 'nothing'})" if isinstance(m, dict) and "content" not in m
                     else f" (it is {_json_kind(m['content'])})" if isinstance(m, dict) and "role" in m else "")
            raise HomeLLMError(f"{where}: message {i} needs a 'role' and a string 'content'{found}")
        role = "system" if m["role"] == "developer" else m["role"]  # OpenAI's newer name for the system prompt
        if role not in ROLES:
            raise HomeLLMError(f"{where}: message {i} has unknown role {m['role']!r}: use one of {', '.join(ROLES)}")
        out.append({"role": role, "content": m["content"]})
        # OpenAI's fine-tuning format: an assistant message of weight 0 is context, not trained on
        if "weight" in m:
            if role != "assistant" or m["weight"] not in (0, 1) or isinstance(m["weight"], bool):
                raise HomeLLMError(f"{where}: message {i} has weight {m['weight']!r}: only an assistant message takes "
                                   "one, 0 (not trained on) or 1")
            if m["weight"] == 0:
                out[-1]["weight"] = 0
    return out


def _json_kind(value: Any) -> str:
    """A JSON value's kind as the file writes it: null, a number, a list..."""
    return {type(None): "null", bool: "true or false", int: "a number", float: "a number", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)


def render(tok: Tokenizer, messages: list[Message], add_generation_prompt: bool = False
           ) -> tuple[list[int], list[bool]]:
    """Token ids of the conversation and, per id, whether SFT trains on it (assistant content and its end).

    The ids are those of Hugging Face's `apply_chat_template`: the text encoded at once, which the special tokens
    split into pieces encoded apart. (Each piece encoded on its own gave a SentencePiece tokenizer, Llama 2's or
    Mistral's, a "▁" at the start of every piece, so a reply began with a space and exports rendered other ids.)
    Special strings typed in a message stay text, so a user cannot forge a turn by typing "<|im_start|>": such a
    message's role line and content are encoded apart, as text."""
    if tok.system and (not messages or messages[0]["role"] != "system"):  # as an imported chat model's template did
        messages = [{"role": "system", "content": tok.system}, *messages]
    # (text, trained, as plain text): the text between and around the special tokens
    parts: list[tuple[str, bool, bool]] = []
    for m in messages:
        assistant = m["role"] == "assistant" and m.get("weight", 1) != 0
        plain = tok.holds_special(m["content"])
        parts += [(IM_START, False, False), (m["role"] + "\n", False, plain), (m["content"], assistant, plain),
                  (IM_END, assistant, False), ("\n", False, False)]
    if add_generation_prompt:
        parts += [(IM_START, False, False), ("assistant\n", False, False)]
    # A model trained with a bos before every text (an imported Llama's <s>) reads a conversation after it too.
    ids: list[int] = [] if tok.bos_id is None else [tok.bos_id]
    mask: list[bool] = [False] * len(ids)
    for plain, run in itertools.groupby(parts, key=lambda p: p[2]):
        run = list(run)
        chunk, offsets = tok.encode_offsets("".join(t for t, _, _ in run), plain)
        trained, at = [], 0  # the character spans trained on, in order
        for t, train, _ in run:
            if train:
                trained.append((at, at + len(t)))
            at += len(t)
        span = 0
        for start, stop in offsets:  # a token is trained where it overlaps a trained span, as transformers masks
            while span < len(trained) and trained[span][1] <= start:
                span += 1
            mask.append(span < len(trained) and start < trained[span][1] and stop > trained[span][0])
        ids += chunk
    return ids, mask


def prompt_ids(tok: Tokenizer, messages: list[Message]) -> list[int]:
    """The ids to generate a reply from: the conversation so far and the assistant's header."""
    return render(tok, messages, add_generation_prompt=True)[0]


def to_markdown(messages: list[Message], title: str = "Conversation") -> str:
    """A conversation as Markdown, for /save in the terminal chat and the web page's download."""
    lines = [f"# {title}", ""]
    for m in messages:
        lines += [f"**{m['role']}**:", "", m["content"], ""]
    return "\n".join(lines)


# ShareGPT's speaker names (BELLE, Vicuna, LLaMA-Factory data), as OpenAI roles.
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}


def _conversation(record: Any, where: str) -> list[Message]:
    """One jsonl record, OpenAI-style {"messages": [...]}, ShareGPT-style {"conversations": [{"from", "value"}]},
    Alpaca-style {"instruction", "input", "output"}, or a pair such as {"question", "answer"} (PROMPT_FIELDS and
    REPLY_FIELDS; TRL's conversational {"prompt": [messages], "completion": [messages]} too)."""
    for key in ("conversations", "conversation"):
        # OpenAI's turns under ShareGPT's key (many Hugging Face conversions), or Firefly's (LMSYS-Chat, WildChat)
        turns = record.get(key) if isinstance(record, dict) else None
        if turns and isinstance(turns, list) and all(isinstance(t, dict) and "role" in t and "content" in t
                                                     for t in turns):
            return _conversation({**{k: v for k, v in record.items() if k != key}, "messages": turns}, where)
    prompt = next((k for k in PROMPT_FIELDS if k in record), None) if isinstance(record, dict) else None
    reply = next((k for k in REPLY_FIELDS if k in record), None) if isinstance(record, dict) else None
    system = (record.get("system") or "") if isinstance(record, dict) else ""  # (null: a dataset's empty column)
    if not isinstance(system, str):
        raise HomeLLMError(f"{where}: 'system' is {system!r}, not a string")
    head = [{"role": "system", "content": system}] if system else []  # the record's system prompt, as a message
    if isinstance(record, dict) and "messages" in record:
        messages = check_messages(record["messages"], where)
        if system and messages[0]["role"] == "system":
            raise HomeLLMError(f"{where}: a 'system' beside messages that start with one: give the system prompt once")
        messages = head + messages
    elif isinstance(record, dict) and isinstance(record.get("conversations"), list):
        turns = record["conversations"]
        if not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns):
            raise HomeLLMError(f"{where}: ShareGPT turns must be {{\"from\": ..., \"value\": \"text\"}} objects "
                               "(or {\"role\": ..., \"content\": \"text\"})")
        unknown = sorted({str(t.get("from")) for t in turns} - set(_SHAREGPT_ROLES))
        if unknown:
            raise HomeLLMError(f"{where}: ShareGPT speaker {unknown[0]!r} is unknown: use human or gpt (or "
                               f"{', '.join(k for k in _SHAREGPT_ROLES if k not in ('human', 'gpt'))})")
        messages = check_messages(head + [{"role": _SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in turns],
                                  where)
    elif isinstance(record, dict) and isinstance(record.get("conversation"), list):
        # Firefly's (and other Chinese datasets') {"conversation": [{"human": ..., "assistant": ...}, ...]}
        turns = record["conversation"]
        if not turns or not all(isinstance(t, dict) and isinstance(t.get("human"), str) and
                                isinstance(t.get("assistant"), str) for t in turns):
            raise HomeLLMError(f"{where}: 'conversation' must be a list of {{\"human\": \"text\", \"assistant\": "
                               "\"text\"}} turns")
        messages = head + [{"role": role, "content": t[speaker]} for t in turns
                           for role, speaker in (("user", "human"), ("assistant", "assistant"))]
    elif isinstance(record, dict) and ("instruction" in record or prompt) and reply:
        # Alpaca's instruction (GPTeacher's with "response"), its input after it; else the question alone.
        asked = ("instruction", "input") if "instruction" in record else (prompt,)
        answer = "output" if "output" in record else reply
        p, r = record[asked[0]], record[answer]
        if len(asked) == 1 and isinstance(p, list) and isinstance(r, list):  # TRL's conversational pairs
            messages = check_messages(head + p + r, where)
        else:
            values = [record.get(k, "") for k in asked]
            if not all(isinstance(v, str) for v in [*values, r]):
                raise HomeLLMError(f"{where}: {' and '.join(repr(k) for k in (*asked, answer) if k in record)} must "
                                   "be strings" + ("" if len(asked) > 1 else " (or both lists of messages)"))
            if not r.strip():  # (named as the record names it: it has no messages to count)
                raise HomeLLMError(f"{where}: {answer!r} is empty: training on it teaches the model to say nothing; "
                                   "fill it in or drop the line")
            user = "\n\n".join(v for v in values if v)
            messages = head + _history(record, where) + [{"role": "user", "content": user},
                                                         {"role": "assistant", "content": r}]
    elif isinstance(record, dict) and (prompt or "instruction" in record):
        raise HomeLLMError(f"{where}: {'instruction' if 'instruction' in record else prompt!r} without an answer: "
                           "give the reply as "
                           f"{' or '.join(repr(k) for k in REPLY_FIELDS)} (a string; null counts as none)")
    else:
        text = (" (this is plain text, which `homellm pretrain --data FILE` trains on: sft needs conversations)"
                if isinstance(record, dict) and isinstance(record.get("text"), str) else "")
        raise HomeLLMError(f"{where}: expected {{\"messages\": [...]}}, ShareGPT's {{\"conversations\": [...]}}, "
                           "Alpaca's {\"instruction\", \"input\", \"output\"} or a question and its answer "
                           f"({'/'.join(PROMPT_FIELDS)} with {'/'.join(REPLY_FIELDS)}){text}")
    return _check_training(messages, where)


def _history(record: dict[str, Any], where: str) -> list[Message]:
    """The turns before an Alpaca record's own, as LLaMA-Factory's (and many Chinese datasets') `history` gives
    them: [[question, answer], ...]. They were dropped unsaid, and the reply trained without what it answers."""
    history = record.get("history") or []
    if not isinstance(history, list) or not all(
            isinstance(pair, list | tuple) and len(pair) == 2 and all(isinstance(x, str) for x in pair)
            for pair in history):
        raise HomeLLMError(f"{where}: 'history' must be a list of [question, answer] pairs of strings")
    return [{"role": role, "content": text} for q, a in history for role, text in (("user", q), ("assistant", a))]


def _check_training(messages: list[Message], where: str) -> list[Message]:
    """The rules a conversation to train on keeps beyond `check_messages`: each is a likely data bug (a reply
    lost in conversion, roles swapped) that would teach the model something wrong without a word."""
    if not any(m["role"] == "assistant" for m in messages):
        raise HomeLLMError(f"{where}: the conversation has no assistant turn: nothing to learn from it")
    if all(m.get("weight") == 0 for m in messages if m["role"] == "assistant"):
        raise HomeLLMError(f"{where}: every assistant turn has weight 0: nothing to learn from it")
    for i, m in enumerate(messages):
        try:
            m["content"].encode("utf-8")
        except UnicodeEncodeError as e:  # JSON's "\ud800" escapes decode to lone surrogates, which are no text
            raise HomeLLMError(f"{where}: message {i} holds {m['content'][e.start]!r}, half of a UTF-16 pair, which "
                               "is no character: fix the text, or drop the line") from None
        if m["role"] == "system" and i > 0:
            raise HomeLLMError(f"{where}: message {i} is a system message: only the first message may be one")
        if m["role"] == "assistant" and not m["content"].strip():
            raise HomeLLMError(f"{where}: message {i} is an empty assistant reply: training on it teaches the "
                               "model to say nothing; fill it in or drop the line")
    first = messages[1] if messages[0]["role"] == "system" and len(messages) > 1 else messages[0]
    if first["role"] == "assistant":
        raise HomeLLMError(f"{where}: the conversation starts with the assistant, before any user message: "
                           "are the roles swapped? Begin with a user message")
    return messages


def unique_conversations(conversations: list[list[Message]]) -> list[list[Message]]:
    """One copy of each conversation, in first-seen order: merged datasets repeat many, and a copy on each side of
    sft's split made the val loss score text it had trained on."""
    return list({json.dumps(c, ensure_ascii=False, sort_keys=True): c for c in conversations}.values())


def read_conversations(paths: list[str], skip_bad: bool = False, limit: int = 0) -> tuple[list[list[Message]], int]:
    """The conversations in the jsonl files and hf:NAME datasets (the first `limit` of them, when above 0: a sample
    of a hub dataset of millions), and how many bad lines were skipped (skip_bad) instead of failing."""
    conversations: list[list[Message]] = []
    skipped = 0
    files: dict[str, Path | str] = {}  # by real path: a file named twice (or with its folder) is read once, as prepare
    for spec in paths:
        if spec.startswith("hf:"):
            files.setdefault(spec, spec)
            continue
        path = Path(spec)
        if path.is_dir():
            found = folder_files(path, (".jsonl", ".json"))
            if not found:
                tables = " (its tables are read as --data " + typed(f"hf:{path}") + ")" if any(
                    f.suffix.lower() in TABLES for f in path.iterdir()) else ""
                raise HomeLLMError(f"{path}: a folder with no .jsonl or .json file: give the conversation files"
                                   + tables)
        elif path.is_file():
            if path.suffix.lower() in TABLES:  # read as jsonl, its bytes were "not UTF-8 ... iconv -f cp932"
                raise table_error(path, "--data", formats=".jsonl")
            found = [path]
        else:
            raise HomeLLMError(f"{path}: no such file: give a .jsonl file of conversations, or hf:NAME")
        for f in found:
            files.setdefault(os.path.realpath(f), f)
    for path in files.values():
        if limit and len(conversations) >= limit:
            break  # before opening the next source: a hub dataset would load over the network for nothing
        records = jsonl_records(path) if isinstance(path, Path) else (
            (f"{path}: row {i}", row) for i, row in hf_records(path, hf_dataset(path)))
        for where, record in records:
            if limit and len(conversations) >= limit:
                break
            try:
                if isinstance(record, HomeLLMError):
                    raise record
                if isinstance(record, dict):
                    # A dataset gives every row every column, None where a row lacks it, and so does a table saved
                    # as jsonl (pandas writes null): dropped, so that a row is read as the record it came from (an
                    # Alpaca row among OpenAI ones has no "messages").
                    record = {k: v for k, v in record.items() if v is not None}
                conversations.append(_conversation(record, where))
            except HomeLLMError as e:
                if not skip_bad:
                    raise HomeLLMError(f"{e} (or pass --skip-bad to skip such lines)") from None
                skipped += 1
    if not conversations:
        raise HomeLLMError(f"no conversations in {' '.join(paths)}: the files are empty"
                           + (f" or all {skipped} lines were bad" if skipped else ""))
    return conversations, skipped
