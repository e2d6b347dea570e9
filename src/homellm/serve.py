"""`homellm serve`: an OpenAI-compatible HTTP API and a web chat page for a run, on FastAPI and uvicorn.

    homellm serve runs/my-model --port 8000      # then open http://127.0.0.1:8000/ or point an OpenAI client at /v1

Requests are decoded together (continuous batching): one scheduler thread owns the model and a KV cache with a row
per sequence; every step it prefills newly arrived prompts into free rows and advances every active row by one
token in a single batched forward pass, each row at its own position (KVCache.pos as a tensor). A sequence leaves
its row when it ends, when its client disconnects, or when the server stops, and a waiting one takes the row.
"""

import asyncio
import contextlib
import hmac
import html
import json
import math
import os
import re
import secrets
import signal
import socket
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from homellm.chat import check_messages, prompt_ids, to_markdown
from homellm.config import SEED_LIMIT, SampleConfig, ServeConfig, check_ranges
from homellm.errors import HomeLLMError
from homellm.generate import TextStream, _prefill, sample_next, seeded_generator
from homellm.model import GPT, KVCache
from homellm.tokenizer import Tokenizer

# (choice index, text, finish reason): text pieces carry no reason; the last event of a choice carries one.
Event = tuple[int, str, str | None]


# ---- the scheduler: continuous batching over one model ------------------------------------------------------

@dataclass(eq=False)
class Sequence:
    """One choice being generated: its prompt, its sampling, and where its text goes."""

    prompt: list[int]
    cfg: SampleConfig  # max_new_tokens, temperature, top_k, top_p, stop, seed
    seeded: bool  # the client gave a seed: sampled with its own generator, so the reply does not depend on the batch
    index: int  # the choice's index in the response
    events: "asyncio.Queue[Event | None]"  # the request's side reads its text here
    text: TextStream  # ids to text that holds back possible stop strings
    cancelled: bool = False  # set by the request's side: the client went away or the server is stopping
    tokens: list[int] = field(default_factory=list)  # generated ids (no stop id)
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    utf8: int = 0  # where the text stands in a UTF-8 character (Utf8Guard's state), set from the prompt
    draw: int = 0  # which of its prompt's n choices: a seeded one samples from (seed, draw), wherever the prompt is


def _deliver(outbox: list[tuple[asyncio.Queue, Event]]) -> None:
    for queue, event in outbox:
        queue.put_nowait(event)


class ServerBusy(Exception):
    """Every batch row is taken and the queue is full."""


# The batch's KV cache starts this small and doubles as the requests in flight need, up to --max-batch rows of the
# context: allocated whole, a model with a long context took gigabytes at the start (8,192 positions x 32 rows), for
# rows that rarely fill it. It shrinks again when four times too big (see Scheduler._fit).
FIRST_CACHE_POSITIONS = 256
FIRST_CACHE_ROWS = 4


class Scheduler:
    """Owns the model. One thread admits waiting sequences into free rows of a batched KV cache (prefilling each
    prompt on its own) and advances all active rows by one token per forward pass."""

    def __init__(self, model: GPT, tok: Tokenizer, max_batch: int, max_queue: int):
        self.model, self.tok = model, tok
        self.max_batch, self.max_queue = max_batch, max_queue
        self.device = next(model.parameters()).device
        self.stop_ids = tok.end_ids  # (a new turn ends a reply too, as in generate)
        self.active: list[Sequence] = []  # row i of the cache holds active[i]; only the thread changes this list
        self.waiting: deque[Sequence] = deque()
        self.cond = threading.Condition()
        self.stopping = False
        self.finished: dict[str, int] = {}  # finish reason -> count since start ("cancelled" included)
        self.peak = 0  # the most rows ever decoded in one step
        self.thread: threading.Thread | None = None
        self.outbox: list[tuple[asyncio.Queue, Event]] = []  # events of this step, handed to the loop in one call
        self.loop: asyncio.AbstractEventLoop | None = None

    # -- called from the server's side --
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.thread = threading.Thread(target=self._run, name="homellm-scheduler", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join()

    def submit(self, seqs: list[Sequence]) -> None:
        with self.cond:
            if len(self.active) + len(self.waiting) + len(seqs) > self.max_batch + self.max_queue:
                raise ServerBusy
            self.waiting.extend(seqs)
            self.cond.notify_all()

    def cancel(self, seqs: list[Sequence]) -> None:
        with self.cond:
            for s in seqs:
                s.cancelled = True
            self.cond.notify_all()

    def end_all(self) -> None:
        """The server is stopping: every request still generating or waiting gets its last event now ("shutdown"),
        and answers so, rather than its connection cut when the grace period runs out. On the event loop's thread."""
        with self.cond:
            ended = [s for s in [*self.active, *self.waiting] if s.finish_reason is None and not s.cancelled]
            for s in ended:
                s.cancelled = True  # the scheduler adds nothing more for it, and frees its row
            self.cond.notify_all()
        _deliver([(s.events, (s.index, "", "shutdown")) for s in ended])

    def busy(self) -> int:
        """Sequences generating or waiting to: 0 once every request has ended or been cancelled."""
        with self.cond:
            return len(self.active) + len(self.waiting)

    def wait_idle(self, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: not self.active and not self.waiting, timeout)

    # -- the scheduler thread --
    def _run(self) -> None:
        with torch.inference_mode():
            p = next(self.model.parameters())
            self.cache = KVCache(self.model.cfg, min(self.max_batch, FIRST_CACHE_ROWS),
                                 min(self.model.cfg.block_size, FIRST_CACHE_POSITIONS), p.device, p.dtype)
            self.lengths = torch.zeros(self.max_batch, dtype=torch.long, device=p.device)
            self.generator = torch.Generator(p.device).manual_seed(secrets.randbits(63))  # for unseeded requests
            while True:
                with self.cond:
                    self.cond.wait_for(lambda: self.active or self.waiting or self.stopping)
                    if self.stopping:
                        for s in [*self.active, *self.waiting]:
                            s.cancelled = True
                        self._reap()
                        self.waiting.clear()
                        self.cond.notify_all()
                        return
                    self._reap()
                    new = []
                    while self.waiting and len(self.active) < self.max_batch:
                        seq = self.waiting.popleft()
                        if not seq.cancelled:
                            self.active.append(seq)
                            new.append(seq)
                    self.peak = max(self.peak, len(self.active))
                    self.cond.notify_all()
                for seq in new:
                    try:
                        self._admit(seq)
                    except Exception:  # this request's prompt or settings: it fails alone
                        traceback.print_exc()
                        self._finish(seq, "", "error")
                try:
                    self._step()
                except Exception:  # a bug or out of memory: fail the requests in flight, keep serving
                    traceback.print_exc()
                    for s in self.active:
                        if s.finish_reason is None:
                            self._finish(s, "", "error")
                if self.outbox:  # one wake-up of the event loop per step, however many sequences advanced
                    self.loop.call_soon_threadsafe(_deliver, self.outbox)
                    self.outbox = []

    def _admit(self, seq: Sequence) -> None:
        """Prefill the prompt in a cache of its own, copy it into the sequence's row, and sample its first token."""
        row, n = self.active.index(seq), len(seq.prompt)
        cache, logits = _prefill(self.model, seq.prompt, room=0)  # copied into the batch's cache at once
        self._fit(len(self.active), n, shrink=False)  # (the other rows' lengths are not read here: never smaller)
        self.cache.k[:, row, :, :n] = cache.k[:, 0, :, :n]
        self.cache.v[:, row, :, :n] = cache.v[:, 0, :, :n]
        self.lengths[row] = n
        if seq.seeded:
            # A prompt's choices differ, reproducibly; a prompt samples alike alone and in a list of prompts.
            seq.generator = seeded_generator(seq.cfg.seed, self.device, seq.draw)
        seq.utf8 = self.tok.utf8_guard.state(seq.prompt)
        self._sample([seq], logits)

    def _step(self) -> None:
        """Feed every live row its last token at its own position and sample the next one."""
        with self.cond:
            self._reap()
        live = self.active
        if not live:
            return
        # Each row's length after this step, counted here: reading `lengths` back would make a GPU wait every step
        self._fit(len(live), max(len(s.prompt) + len(s.tokens) for s in live))
        ids = torch.tensor([[s.tokens[-1]] for s in live], device=self.device)
        self.cache.pos = self.lengths[:len(live)]  # a view: forward advances each row's length in place
        logits, _ = self.model(ids, cache=self.cache)
        self._sample(live, logits[:, -1])

    def _fit(self, rows: int, positions: int, shrink: bool = True) -> None:
        """Size the batch's cache for `rows` rows of `positions`, the rows in use kept. Each side doubles when short
        (up to --max-batch rows and the context) and, with `shrink`, halves down to twice the need when four times
        too big: memory follows the requests in flight. It stayed at its largest: one long request left every one of
        the 32 rows the context's length (1.4 GB for a 3M-parameter model with 4,096 positions, 25 GB for a 1.7B)."""
        def size(have: int, need: int, first: int, most: int) -> int:
            if need > have:
                return min(most, max(need, 2 * have))
            if shrink and have > first and have >= 4 * need:
                return min(have, max(first, 2 * need))
            return have

        old = self.cache
        have_rows, have_len = old.k.size(1), old.max_len
        new_rows = size(have_rows, rows, min(self.max_batch, FIRST_CACHE_ROWS), self.max_batch)
        block = self.model.cfg.block_size
        new_len = size(have_len, positions, min(block, FIRST_CACHE_POSITIONS), block)
        if (new_rows, new_len) == (have_rows, have_len):
            return
        k, v, device = old.k, old.v, old.k.device
        grows = new_rows * new_len > have_rows * have_len
        offload = grows and device.type == "cuda"
        if offload:  # off the GPU first: the old and the bigger cache together may not fit on it
            k, v = old.k, old.v = k.cpu(), v.cpu()  # (the GPU's copy is freed now, not after the bigger one is made)
        try:
            new = KVCache(self.model.cfg, new_rows, new_len, device, k.dtype)
        except BaseException:
            if offload:  # out of memory: the cache back as it was, on the GPU, so the server goes on serving
                old.k, old.v = k.to(device), v.to(device)
            raise
        r, n = min(have_rows, new_rows), min(have_len, new_len)
        new.k[:, :r, :, :n], new.v[:, :r, :, :n] = k[:, :r, :, :n], v[:, :r, :, :n]
        self.cache = new
        if not grows and device.type == "cuda":
            torch.cuda.empty_cache()  # the memory back to the GPU, for other programs, not only this process's pool

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """One sample_next call per group of rows sharing their settings; a seeded row samples alone, and so does
        one with a repetition penalty (its own ids so far)."""
        groups: dict[Any, list[int]] = {}
        for i, s in enumerate(seqs):
            key = ("seed", i) if s.seeded else ("penalty", i) if s.cfg.repetition_penalty != 1.0 else (
                (0.0,) if s.cfg.temperature == 0 else (s.cfg.temperature, s.cfg.top_k, s.cfg.top_p))
            groups.setdefault(key, []).append(i)
        no_history = torch.empty(0, 0, dtype=torch.long, device=self.device)
        guard = self.tok.utf8_guard
        for rows in groups.values():
            first = seqs[rows[0]]
            allowed = guard.mask([seqs[i].utf8 for i in rows], self.device, logits.size(-1))
            # A row with a repetition penalty samples alone, with its own ids so far (the prompt's too, as generate)
            history = no_history if first.cfg.repetition_penalty == 1.0 else torch.tensor(
                [first.prompt + first.tokens], device=self.device)
            try:
                ids = sample_next(logits[rows], history, first.cfg, first.generator or self.generator, allowed)
            except Exception:  # these rows' settings: they fail, and the rows sampled with others' go on
                traceback.print_exc()
                for i in rows:
                    self._finish(seqs[i], "", "error")
                continue
            for i, token in zip(rows, ids.tolist()):
                self._push(seqs[i], token)

    def _push(self, seq: Sequence, token: int) -> None:
        """Detokenize one new id: emit the text that cannot be part of a stop string; end at a stop or the limit."""
        if token in self.stop_ids:
            self._finish(seq, seq.text.flush(), "stop")
            return
        seq.tokens.append(token)
        seq.utf8 = self.tok.utf8_guard.state([token], seq.utf8)
        text = seq.text.push(token)
        if seq.text.stopped:
            self._finish(seq, text, "stop")
        elif len(seq.tokens) >= seq.cfg.max_new_tokens:
            text += seq.text.flush()
            self._finish(seq, text, "stop" if seq.text.stopped else "length")
        elif text:
            self.outbox.append((seq.events, (seq.index, text, None)))

    def _finish(self, seq: Sequence, text: str, reason: str) -> None:
        seq.finish_reason = reason
        if not seq.cancelled:
            self.outbox.append((seq.events, (seq.index, text, reason)))

    def _reap(self) -> None:
        """Free the rows of ended and cancelled sequences; the last row moves into the hole (held: self.cond)."""
        gone = sum(s.cancelled for s in self.waiting)
        if gone:
            self.waiting = deque(s for s in self.waiting if not s.cancelled)
            self.finished["cancelled"] = self.finished.get("cancelled", 0) + gone
        i = 0
        while i < len(self.active):
            s = self.active[i]
            if s.finish_reason is None and not s.cancelled:
                i += 1
                continue
            reason = "cancelled" if s.finish_reason is None else s.finish_reason
            self.finished[reason] = self.finished.get(reason, 0) + 1
            last = len(self.active) - 1
            if i != last:
                # A row the cache has: a sequence whose admission failed (its prefill, or the cache's growth for
                # it) never got one, and copying from past the cache's rows killed the scheduler's thread
                if last < self.cache.k.size(1):
                    n = int(self.lengths[last])
                    self.cache.k[:, i, :, :n] = self.cache.k[:, last, :, :n]
                    self.cache.v[:, i, :, :n] = self.cache.v[:, last, :, :n]
                    self.lengths[i] = n
                self.active[i] = self.active[last]
            self.active.pop()
        if not self.active:  # idle: the cache back to its first size, before anyone waiting for idle wakes
            self._fit(0, 0)
        self.cond.notify_all()


# ---- requests: OpenAI's shapes and errors -------------------------------------------------------------------

class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def dumps(obj: Any) -> str:
    """Compact JSON with characters as they are (no \\u escapes): Japanese stays readable in every chunk. But the
    characters other than \\n and \\r that Python's str.splitlines() breaks at are escaped: a client reading the
    stream with it (requests' iter_lines(decode_unicode=True)) cut a `data:` line inside the JSON there."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).translate(_LINE_BREAKS)


_LINE_BREAKS = {c: f"\\u{c:04x}" for c in (0x85, 0x2028, 0x2029)}  # (JSON escapes those below 0x20 itself)


def _number(body: dict[str, Any], name: str, kind: type, default: Any, lo: float | None = None,
            hi: float | None = None) -> Any:
    """body[name] checked for type and range; null or absent gives the default."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, (int, float) if kind is float else kind):
        what = {int: "an integer", float: "a number", bool: "a boolean", str: "a string"}[kind]
        raise ApiError(400, f"'{name}' must be {what}, got {dumps(value)[:50]}", name, "invalid_type")
    if isinstance(value, float) and not math.isfinite(value):  # JSON's NaN would poison every row of the batch
        raise ApiError(400, f"'{name}' must be a finite number, got {value}", name, "invalid_value")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise ApiError(400, f"'{name}' must be {bounds}, got {value}", name, "invalid_value")
    return value


# No prompt that fits a context comes near this; bigger bodies only cost memory and time to parse.
MAX_BODY_BYTES = 4 << 20

# Features of OpenAI's API that homellm does not have: refused unless left at their defaults, or at values that ask
# for nothing (clients and chat UIs send `tool_choice: "none"`, `tools: []` or `top_logprobs: 0` with every request).
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "tools": (None, []), "functions": (None, []), "tool_choice": (None, "none", "auto"), "logprobs": (False,),
    "top_logprobs": (None, 0), "echo": (False,), "suffix": (None,), "best_of": (1,), "frequency_penalty": (0,),
    "presence_penalty": (0,), "logit_bias": ({},), "response_format": ({"type": "text"},), "modalities": (["text"],),
    "audio": (None,), "prediction": (None,)}


@dataclass
class Params:
    """What a completion request asks for, checked."""

    sample: SampleConfig
    seeded: bool
    n: int
    stream: bool
    include_usage: bool
    limit: str = "max_tokens"  # the field that gave the length limit: errors name it
    limit_given: bool = True  # False: the limit is /v1/completions' default (16), which the client never sent


def parse_params(body: dict[str, Any], max_tokens: int | None, max_n: int) -> Params:
    """Sampling fields shared by /v1/completions and /v1/chat/completions. max_tokens: the default limit (None:
    all the context the prompt leaves, which _fit_context fills in)."""
    for name, fine in _UNSUPPORTED.items():
        value = body.get(name)
        # By type too: 0 == False, and completions' `logprobs: 0` asks for logprobs (of the chosen token).
        if value is not None and not any(value == f and isinstance(value, bool) == isinstance(f, bool) for f in fine):
            raise ApiError(400, f"'{name}' is not supported by homellm: leave it out", name, "unsupported_parameter")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else [] if stop is None else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
        raise ApiError(400, "'stop' must be a string or a list of up to 4 strings", "stop", "invalid_type")
    # The newer name wins; no limit given (chat) means all the context the prompt leaves, 0 here.
    limit = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    seed = _number(body, "seed", int, None, 0, SEED_LIMIT - 1)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options", "invalid_type")
    if body.get("stream_options") is not None and body.get("stream") is not True:  # as OpenAI answers
        raise ApiError(400, "'stream_options' is only allowed with 'stream': true", "stream_options",
                       "invalid_value")
    sample = SampleConfig(max_new_tokens=_number(body, limit, int, max_tokens or 0, 1),
                          temperature=float(_number(body, "temperature", float, 1.0, 0, 2)),
                          top_p=float(_number(body, "top_p", float, 1.0, 0, 1)),
                          top_k=_number(body, "top_k", int, 0, 0),
                          repetition_penalty=float(_number(body, "repetition_penalty", float, 1.0, 1e-3, 1e3)),
                          stop=[s for s in stop if s], seed=seed or 0)
    return Params(sample, seed is not None, _number(body, "n", int, 1, 1, max_n),
                  _number(body, "stream", bool, False), _number(options, "include_usage", bool, False), limit,
                  body.get(limit) is not None)


def _is_ids(value: Any) -> bool:
    """A non-empty list of token ids (JSON integers: true and 1.0 are not)."""
    return isinstance(value, list) and bool(value) and all(type(i) is int for i in value)


def _fit_context(prompts: list[list[int]], params: Params, block_size: int, prompt_field: str) -> None:
    """Refuse what the context cannot hold; a request without a limit gets all the context its prompt leaves."""
    longest, asked = max(len(p) for p in prompts), params.sample.max_new_tokens  # asked 0: no limit given
    if longest + max(asked, 1) > block_size:
        what = f"{longest} in the prompt" + (f" and {asked} for the completion" if asked else " and 1 to generate")
        fix = "shorten the prompt" if not asked or longest >= block_size else (
            f"shorten the prompt or lower {params.limit}" if params.limit_given else
            f"shorten the prompt, or give {params.limit} (its default here is {asked})")
        raise ApiError(400, f"this model's context is {block_size} tokens, but the request needs "
                            f"{longest + max(asked, 1)} ({what}): {fix}",
                       params.limit if asked and longest < block_size else prompt_field, "context_length_exceeded")
    params.sample.max_new_tokens = asked or block_size - longest


def note_unknown(tok: Tokenizer, text: str, allow_special: bool = False) -> None:
    """Tell the server's log when a request's text holds characters the tokenizer cannot write (a char
    tokenizer's unseen ones): the model reads them as unknown, which explains odd replies. The API has no place for
    a warning, and refusing would turn away text the model can still answer around."""
    if note := tok.unknown_note(text, allow_special):
        # One write with its newline: print's two writes, from the threads that read requests, ran lines together
        sys.stderr.write(f"note: a request: {note}\n")
        sys.stderr.flush()


def _content(message: Any) -> Any:
    """OpenAI's content parts [{"type": "text", "text": ...}] joined into one string; anything else as it is."""
    if isinstance(message, dict) and isinstance(message.get("content"), list):
        parts = message["content"]
        if all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in parts):
            return {**message, "content": "".join(p["text"] for p in parts)}
        kinds = sorted({str(p.get("type")) for p in parts if isinstance(p, dict) and p.get("type") != "text"})
        if kinds:
            raise HomeLLMError(f"content parts of type {', '.join(kinds)} are not supported: this model reads text "
                               "only, so send {\"type\": \"text\"} parts or a string")
    return message


def _failure(reason: str | None) -> ApiError | None:
    """The error a choice's last event stands for: its generation failed, or the server is stopping."""
    if reason == "error":
        return ApiError(500, "generation failed: see the server's log", None, None, "server_error")
    if reason == "shutdown":
        return ApiError(503, "the server is shutting down: this reply ends here; send it again once the server is "
                        "back", None, "server_shutting_down", "server_error")
    return None


# ---- rendering for the page ---------------------------------------------------------------------------------

# A span of math is at most 2,000 characters: unbounded, text of many openers that never close took time
# quadratic in its length (80 KB of "\\(" held the server 14 s).
_SPAN = "{1,2000}"
# Pandoc's rule for $...$: no space inside either $, and no digit right after the closing one, so prices
# ("$5と$10", "$5 and $6") stay text.
_MATH = re.compile(rf"\$\$(.{_SPAN}?)\$\$|\\\[(.{_SPAN}?)\\\]|\\\((.{_SPAN}?)\\\)|"
                   rf"(?<![\\$])\$(?!\s)([^$\n]{_SPAN}?)(?<![\s\\])\$(?!\d)", re.DOTALL)
_MATHML_NS = "http://www.w3.org/1998/Math/MathML"
# What the page may receive of latex2mathml's output: presentation MathML, its layout attributes, text. The
# converter copies \text{...} into <mtext> as it is, and <mtext> takes HTML inside: `\text{<img onerror=...>}`
# from a model or a user ran script in the page. So its output is parsed and rebuilt from these names alone.
_MATHML_TAGS = frozenset("math mrow mi mn mo ms mtext mspace msup msub msubsup mfrac msqrt mroot mstyle merror mpadded "
                         "mphantom mfenced menclose munder mover munderover mtable mtr mtd mlabeledtr mmultiscripts "
                         "mprescripts none semantics".split())
_MATHML_ATTRS = frozenset("display mathvariant stretchy fence separator lspace rspace width height depth linethickness "
                          "columnalign rowalign accent accentunder movablelimits displaystyle scriptlevel minsize "
                          "maxsize symmetric largeop form columnspacing rowspacing columnlines rowlines frame notation "
                          "open close separators mathsize mathcolor mathbackground bevelled numalign denomalign "
                          "align".split())


def _safe_mathml(markup: str) -> str | None:
    """latex2mathml's output rebuilt from allowed tags and attributes only; None when it holds anything else."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(markup)
    except ET.ParseError:
        return None
    for el in root.iter():
        el.tag = el.tag.removeprefix("{" + _MATHML_NS + "}")
        if el.tag not in _MATHML_TAGS or any(name not in _MATHML_ATTRS for name in el.attrib if name != "xmlns"):
            return None
    root.set("xmlns", _MATHML_NS)
    return ET.tostring(root, encoding="unicode")  # text and attribute values escaped anew


def render_html(text: str) -> str:
    """Text as HTML with its LaTeX ($...$, $$...$$, \\(...\\), \\[...\\]) as MathML, which browsers draw natively:
    no script and no network. Everything else is escaped; LaTeX that does not convert stays as written, and so
    does LaTeX whose MathML would hold anything but presentation markup (HTML inside \\text{}, a link)."""
    from latex2mathml.converter import convert

    out, at = [], 0
    for m in _MATH.finditer(text):
        out.append(html.escape(text[at:m.start()]))
        block = m.group(1) is not None or m.group(2) is not None
        latex = next(g for g in m.groups() if g is not None)
        try:
            mathml = _safe_mathml(convert(latex.strip(), display="block" if block else "inline"))
        except Exception:  # latex2mathml raises many types for input it cannot parse
            mathml = None
        out.append(mathml if mathml is not None else html.escape(m.group(0)))
        at = m.end()
    out.append(html.escape(text[at:]))
    return "".join(out)


def page() -> str:
    return (resources.files("homellm") / "static" / "chat.html").read_text(encoding="utf-8")


# ---- the app ------------------------------------------------------------------------------------------------

def _require_server_packages() -> None:
    try:
        import fastapi  # noqa: F401
        import latex2mathml  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise HomeLLMError(f"serving needs {e.name}: pip install 'homellm[serve]'") from None


def create_app(run: str | Path, cfg: ServeConfig) -> Any:
    """The FastAPI app serving `run`; its scheduler thread starts and stops with the app (app.state.scheduler)."""
    _require_server_packages()
    if cfg.api_key and not (cfg.api_key.isascii() and cfg.api_key.isprintable() and cfg.api_key.strip() == cfg.api_key):
        # An HTTP header carries bytes that servers read as Latin-1, and clients send ASCII: no request could match.
        raise HomeLLMError("--api-key: use printable ASCII without spaces at its ends (letters, digits, punctuation), "
                           "as HTTP headers carry; e.g. --api-key \"$(openssl rand -hex 16)\"")
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException

    from homellm.checkpoint import load_for_generation

    check_ranges(cfg)  # (the command line's were checked; a library caller's are here)
    model = load_for_generation(run, cfg)
    tok = Tokenizer.load(run)
    name = Path(run).resolve().name
    created = int(Path(run, "config.json").stat().st_mtime)
    block = model.cfg.block_size
    scheduler = Scheduler(model, tok, cfg.max_batch, cfg.max_queue)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            scheduler.stop()

    app = FastAPI(title="homellm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler = scheduler
    if cfg.cors:  # a web app served from elsewhere (another port counts) may call the API only if named here
        from fastapi.middleware.cors import CORSMiddleware

        origins = [o.rstrip("/") for item in cfg.cors for o in item.split(",") if o.strip()]
        if bad := [o for o in origins if o != "*" and not re.fullmatch(r"https?://[^/\s]+", o)]:
            raise HomeLLMError(f"--cors {bad[0]}: give origins as scheme://host[:port] (http://localhost:5173), or *")
        # Any request header: the official openai JS client sends its own X-Stainless-* ones with every request,
        # and a preflight that named one was refused. Retry-After and x-should-retry are read by clients.
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"], allow_headers=["*"],
                           expose_headers=["Retry-After", "x-should-retry"], max_age=600)

    GET = ["GET", "HEAD"]  # HEAD too, as `curl -I` and uptime checkers send: the headers of GET, no body

    def json_response(obj: Any, status: int = 200) -> Response:
        return Response(dumps(obj), status, media_type="application/json")

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> Response:
        response = json_response(e.body(), e.status)
        if e.code == "server_shutting_down":  # the openai clients retry a 503 unless told: into a closed port
            response.headers["x-should-retry"] = "false"
        elif e.status == 503:  # at capacity: clients that honour it (the openai one does) wait a moment, then retry
            response.headers["Retry-After"] = "1"
        return response

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> Response:
        message = f"{request.method} {request.url.path}: no such endpoint" if e.status_code == 404 else str(e.detail)
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        response = json_response(ApiError(e.status_code, message, None, code).body(), e.status_code)
        response.headers.update(e.headers or {})  # a 405's Allow: the methods the path takes (RFC 9110)
        return response

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception) -> Response:
        return json_response(ApiError(500, f"internal error: {type(e).__name__}", kind="server_error").body(), 500)

    def authorize(request: Request) -> None:
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        # The scheme's name is case-insensitive (RFC 9110: `bearer` is `Bearer`); the key is compared in full.
        if cfg.api_key and not (scheme.lower() == "bearer" and hmac.compare_digest(key.strip().encode(),
                                                                                 cfg.api_key.encode())):
            raise ApiError(401, "missing or wrong API key: send the header `Authorization: Bearer KEY` with the "
                                "server's --api-key", None, "invalid_api_key")

    async def read_body(request: Request) -> dict[str, Any]:
        authorize(request)
        chunks, size = [], 0
        async for chunk in request.stream():  # past the limit the rest is read and dropped, so the client hears why
            size += len(chunk)
            if size <= MAX_BODY_BYTES:
                chunks.append(chunk)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body is over {MAX_BODY_BYTES >> 20} MiB: no prompt that long fits a "
                           "model's context", None, "request_too_large")
        raw = b"".join(chunks)
        try:
            body = json.loads(raw)
        # (RecursionError: nesting 100,000 deep; ValueError: JSONDecodeError, or an integer of over 4,300 digits)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e}): send a JSON object", None,
                           "invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object", None, "invalid_json")
        for key, value in body.items():  # JSON may escape a lone surrogate ("\ud800"), which is no text at all
            try:
                json.dumps(value, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:
                raise ApiError(400, f"'{key}' holds a lone surrogate escape (such as \\ud800), which is not text: "
                               "send valid Unicode", key, "invalid_value") from None
        return body

    def check_model(body: dict[str, Any]) -> None:
        model_id = body.get("model", name)  # left out: the one model served (llama.cpp's server asks for none)
        if not isinstance(model_id, str):
            raise ApiError(400, f"'model' must be a string: this server has {name!r}", "model", "invalid_type")
        if model_id != name:
            raise ApiError(404, f"the model {model_id!r} does not exist: this server has {name!r}", "model",
                           "model_not_found")

    async def generate(request: Request, prompts: list[list[int]], params: Params, chat: bool) -> Response:
        """Queue every (prompt, choice) as a sequence and answer as one JSON object or as Server-Sent Events."""
        _fit_context(prompts, params, block, "messages" if chat else "prompt")
        queue: asyncio.Queue[Event | None] = asyncio.Queue()
        seqs = [Sequence(prompt, params.sample, params.seeded, i * params.n + j, queue,
                         TextStream(tok, params.sample.stop, prompt), draw=j)
                for i, prompt in enumerate(prompts) for j in range(params.n)]
        try:
            scheduler.submit(seqs)
        except ServerBusy:
            raise ApiError(503, "the server is at capacity: retry in a moment", None, "server_overloaded",
                           "server_error") from None

        async def on_disconnect() -> None:  # the client went away: stop its generation now
            while (await request.receive())["type"] != "http.disconnect":
                pass
            scheduler.cancel(seqs)
            queue.put_nowait(None)

        async def events() -> AsyncIterator[Event]:
            watcher = asyncio.ensure_future(on_disconnect())
            try:
                left = len(seqs)
                while left:
                    event = await queue.get()
                    if event is None:
                        return
                    left -= event[2] is not None
                    yield event
            finally:
                watcher.cancel()
                scheduler.cancel(seqs)  # no-op for ended ones; ends the rest when this request is abandoned

        ident = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        head = {"id": ident, "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": name}

        def usage() -> dict[str, int]:
            done = sum(len(s.tokens) for s in seqs)
            given = sum(len(p) for p in prompts)
            return {"prompt_tokens": given, "completion_tokens": done, "total_tokens": given + done}

        if not params.stream:
            texts: dict[int, list[str]] = {s.index: [] for s in seqs}
            reasons: dict[int, str] = {}
            async for index, text, reason in events():
                if (error := _failure(reason)) is not None:  # the other choices' text would be thrown away
                    scheduler.cancel(seqs)
                    raise error
                texts[index].append(text)
                if reason:
                    reasons[index] = reason
            if chat:
                choices = [{"index": i, "message": {"role": "assistant", "content": "".join(t)}, "logprobs": None,
                            "finish_reason": reasons.get(i)} for i, t in texts.items()]
            else:
                choices = [{"index": i, "text": "".join(t), "logprobs": None, "finish_reason": reasons.get(i)}
                           for i, t in texts.items()]
            return json_response({**head, "choices": choices, "usage": usage()})

        head["object"] += ".chunk" if chat else ""
        extra = {"usage": None} if params.include_usage else {}

        def chunk(index: int, text: str | None, reason: str | None, role: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
                choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
            else:
                choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": reason}
            return f"data: {dumps({**head, 'choices': [choice], **extra})}\n\n"

        async def sse() -> AsyncIterator[str]:
            if chat:
                for s in seqs:
                    yield chunk(s.index, None, None, role=True)
            async for index, text, reason in events():
                if (error := _failure(reason)) is not None:
                    yield f"data: {dumps(error.body())}\n\n"
                    continue
                if text:
                    yield chunk(index, text, None)
                if reason:
                    yield chunk(index, None, reason)
            if params.include_usage:
                yield f"data: {dumps({**head, 'choices': [], 'usage': usage()})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache",
                                                                                 "X-Accel-Buffering": "no"})

    @app.api_route("/health", methods=GET)
    async def health() -> Response:
        return json_response({"status": "ok", "model": name, "active_generations": scheduler.busy()})

    @app.api_route("/v1/models", methods=GET)
    async def models(request: Request) -> Response:
        authorize(request)
        return json_response({"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "homellm", "context_length": block}]})

    @app.api_route("/v1/models/{model_id}", methods=GET)
    async def model_info(request: Request, model_id: str) -> Response:
        authorize(request)
        check_model({"model": model_id})
        return json_response({"id": name, "object": "model", "created": created, "owned_by": "homellm",
                              "context_length": block})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await read_body(request)
        check_model(body)
        prompt = body.get("prompt")
        # Token ids too, as OpenAI's API takes them (a list of ids, or a list of such lists): what evaluation
        # harnesses send, having tokenized with the model's own tokenizer.
        texts = [prompt] if isinstance(prompt, str) or _is_ids(prompt) else prompt
        ids = isinstance(texts, list) and bool(texts) and all(_is_ids(t) for t in texts)
        if not isinstance(texts, list) or not texts or not (ids or all(isinstance(t, str) for t in texts)):
            raise ApiError(400, "'prompt' must be a string, a list of strings, a list of token ids or a list of "
                                "such lists", "prompt", "invalid_type")
        if ids and (bad := next((i for t in texts for i in t if not 0 <= i < tok.vocab_size), None)) is not None:
            raise ApiError(400, f"'prompt' holds token id {bad}: this model's ids are 0 to {tok.vocab_size - 1}",
                           "prompt", "invalid_value")
        params = parse_params(body, 16, cfg.max_batch)
        if len(texts) * params.n > cfg.max_batch:
            raise ApiError(400, f"{len(texts)} prompts x n={params.n} exceed --max-batch {cfg.max_batch}",
                           "n" if params.n > 1 else "prompt", "invalid_value")
        # Special tokens in a raw prompt are honoured, as in `homellm generate`; "" starts a fresh document.
        # Tokenized off the event loop: a long prompt would hold every other request (the health check too).
        def encode() -> list[list[int]]:
            if ids:
                return texts
            folded = [tok.fold(t) for t in texts]  # an input method's full-width digits as the digits, say
            note_unknown(tok, "".join(folded), allow_special=True)
            return [tok.encode_prompt(t) for t in folded]

        return await generate(request, await asyncio.to_thread(encode), params, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await read_body(request)
        check_model(body)
        raw = body.get("messages")
        try:
            messages = check_messages([_content(m) for m in raw] if isinstance(raw, list) else raw, "request body")
        except HomeLLMError as e:
            raise ApiError(400, str(e), "messages", "invalid_value") from None
        params = parse_params(body, None, cfg.max_batch)

        def encode() -> list[int]:
            folded = [{**m, "content": tok.fold(m["content"])} for m in messages]
            note_unknown(tok, "".join(m["content"] for m in folded))
            return prompt_ids(tok, folded)

        return await generate(request, [await asyncio.to_thread(encode)], params, chat=True)

    @app.api_route("/", methods=GET, response_class=HTMLResponse)
    async def index() -> Response:
        return HTMLResponse(page())

    @app.post("/render")
    async def render(request: Request) -> Response:
        body = await read_body(request)
        if not isinstance(body.get("text"), str):
            raise ApiError(400, "'text' must be a string", "text", "invalid_type")
        # In a thread: long text must not hold the event loop, and every other request and stream with it.
        return json_response({"html": await asyncio.to_thread(render_html, body["text"])})

    @app.post("/markdown")
    async def markdown(request: Request) -> Response:
        body = await read_body(request)
        try:
            messages = check_messages(body.get("messages"), "request body")
        except HomeLLMError as e:
            raise ApiError(400, str(e), "messages", "invalid_value") from None
        return Response(to_markdown(messages, f"Conversation with {name}"), media_type="text/markdown; charset=utf-8",
                        headers={"Content-Disposition": 'attachment; filename="conversation.md"'})

    return app


# ---- the server ---------------------------------------------------------------------------------------------

def lan_address() -> str | None:
    """This machine's IPv4 address on its network (the one its default route leaves by), or None offline.
    Connecting a UDP socket picks the route and sends nothing; 192.0.2.1 is a documentation address, never reached."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))
            address = s.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def usable_cpus() -> int:
    """The cores this process may run on: its affinity on Linux; macOS and Windows have no such call (serve
    failed there with an AttributeError), and all their cores count."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def device_memory(device: torch.device) -> int | None:
    """Bytes of memory on `device`: the GPU's, or this machine's (None where the system does not say)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # (Windows has no sysconf)
        return None


def cache_note(model: GPT, max_batch: int, memory: int | None) -> str | None:
    """A note when --max-batch requests at the full context would fill more than half of `memory` with KV cache.
    The cache grows only as requests need, so this is the worst case, which a server of long chats does reach."""
    cfg, item = model.cfg, next(model.parameters()).element_size()
    row = 2 * cfg.n_layer * cfg.n_kv_head * (cfg.n_embd // cfg.n_head) * cfg.block_size * item  # keys and values
    if not memory or max_batch * row <= memory / 2:
        return None
    fits = int(memory / 2 // row)
    fix = (f"--max-batch {fits} keeps the worst case within half" if fits else "even one request at the full context "
           f"takes {row / 2**30:,.1f} GiB: long conversations will run out of memory")
    return (f"note: {max_batch} requests at the full context ({cfg.block_size:,} tokens) would take "
            f"{max_batch * row / 2**30:,.1f} GiB of KV cache, over half of the {memory / 2**30:,.1f} GiB here; it "
            f"grows only as requests need it, but {fix}")


def serve(run: str | Path, cfg: ServeConfig, ready: Callable[[str, Any], None] | None = None) -> None:
    """Serve until SIGINT or SIGTERM (or until `server.should_exit` is set). `ready(url, server)` is called once the
    port is bound: connections made from then on wait in the listen queue until the app is up."""
    _require_server_packages()
    import uvicorn

    from homellm.checkpoint import pretrained_only_note

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            super().handle_exit(sig, frame)
            # Not here, in the signal handler, which may have interrupted code holding the scheduler's lock.
            scheduler = app.state.scheduler
            if scheduler.loop is not None:
                scheduler.loop.call_soon_threadsafe(scheduler.end_all)

        @contextlib.contextmanager
        def capture_signals(self) -> Any:
            """SIGINT/SIGTERM end the serve loop and `serve` returns (uvicorn would re-raise them afterwards)."""
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            old = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, handler in old.items():
                    signal.signal(s, handler)

    # Process-wide, hence here and not in create_app: the model's threads must not starve the event loop's.
    torch.set_num_threads(cfg.threads or max(1, usable_cpus() - 1))
    app = create_app(run, cfg)
    family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
    try:
        sock = socket.create_server((cfg.host, cfg.port), family=family)
    except OSError as e:
        # (the OS's reason alone: create_server's strerror adds "while attempting to bind on address" to it; and
        # Windows' errno is Winsock's, which os.strerror does not know)
        reason = str(e.strerror or e).split(" (while attempting")[0]
        raise HomeLLMError(f"cannot listen on {cfg.host}:{cfg.port} ({reason}): choose another --port "
                           "(0 picks a free one) or --host") from None
    host, port = sock.getsockname()[:2]
    # 0.0.0.0 and :: are where it listens (every address), not where a browser can go: this machine's own is.
    shown = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    url = f"http://{f'[{shown}]' if family == socket.AF_INET6 else shown}:{port}"
    lan = lan_address() if host == "0.0.0.0" else None
    everywhere = ("" if shown == host else f"; other machines on the network: http://{lan}:{port}" if lan else
                  "; it listens on every address: other machines reach it by this one's")
    server = Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=3))
    print(f"homellm: serving {Path(run).resolve().name} at {url} (chat page: {url}/, OpenAI API: {url}/v1)"
          f"{everywhere}; Ctrl-C stops", flush=True)
    if shown != host and not cfg.api_key:  # anyone who can reach this machine may use its model (and its CPU)
        print("note: every address and no --api-key: anyone on the network can use it; set one with --api-key "
              "(e.g. --api-key \"$(openssl rand -hex 16)\")", file=sys.stderr, flush=True)
    # As chat says: the chat page and /v1/chat/completions will not get answers
    if note := pretrained_only_note(run, "serve", "chat replies may not answer; /v1/completions continues text"):
        print(note, file=sys.stderr, flush=True)
    model = app.state.scheduler.model
    if note := cache_note(model, cfg.max_batch, device_memory(next(model.parameters()).device)):
        print(note, file=sys.stderr, flush=True)
    if ready is not None:
        ready(url, server)
    with sock:
        server.run(sockets=[sock])
