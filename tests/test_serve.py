"""`homellm serve` against the official `openai` client: a tiny model that has memorised three conversations (one in
Japanese, one answering in LaTeX, one singing "la" for as long as it may) is served on a free port in this process.
Replies equal the library's own generation whether requests run alone or batched; errors come in OpenAI's shape; a
client that disconnects stops its generation; the web page streams, renders math and downloads Markdown."""

import html
import http.client
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from homellm.chat import prompt_ids, render
from homellm.checkpoint import is_sft, load_model
from homellm.config import ModelConfig, SampleConfig, ServeConfig, TokenizerConfig, TrainConfig
from homellm.errors import HomeLLMError
from homellm.generate import stream_text
from homellm.model import GPT, KVCache
from homellm.tokenizer import Tokenizer, train_tokenizer
from homellm.train import train

openai = pytest.importorskip("openai", reason="the serve tests need the dev extra: pip install -e '.[dev]'")
pytest.importorskip("fastapi", reason="the serve tests need the dev extra: pip install -e '.[dev]'")

from homellm.serve import lan_address, render_html, serve  # noqa: E402

JA = "むかしむかし、ある山のふもとに小さな村がありました。"
MATH = r"$\frac{7}{3}$"
LA = "la " * 150
CONVERSATIONS = [
    [{"role": "user", "content": "昔話をして"}, {"role": "assistant", "content": JA}],
    [{"role": "user", "content": "7/3?"}, {"role": "assistant", "content": MATH}],
    [{"role": "user", "content": "sing"}, {"role": "assistant", "content": LA}],
]
# The web page keeps history: its test asks 昔話をして after 7/3?, so that two-turn conversation is memorised too.
TRAINED = CONVERSATIONS + [CONVERSATIONS[1] + CONVERSATIONS[0]]
KEY = "sekrit"


class Memorise:
    """Batches for homellm.train.train: every batch is the TRAINED conversations, only the replies trained."""

    def __init__(self, tok: Tokenizer):
        self.token_bytes = tok.token_bytes()
        rows = [render(tok, c) for c in TRAINED]
        n = max(len(ids) for ids, _ in rows)
        self.x = torch.full((len(rows), n - 1), tok.pad_id)
        self.y = torch.full((len(rows), n - 1), -100)
        for i, (ids, mask) in enumerate(rows):
            self.x[i, :len(ids) - 1] = torch.tensor(ids[:-1])
            self.y[i, :len(ids) - 1] = torch.tensor([t if m else -100 for t, m in zip(ids[1:], mask[1:])])
        self.y[2, len(rows[2][0]) - 3] = -100  # "sing" never learns to end: it goes on for as long as it is let

    def train_batch(self, step, batch_size, part, parts):
        return self.x, self.y

    def val_batch(self, index, batch_size, rank, world):
        return (self.x, self.y) if index == 0 else None


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve")
    text = root / "text.txt"
    text.write_text("\n".join(m["content"] for c in CONVERSATIONS for m in c) + "\nthe cat sees the moon.\n",
                    encoding="utf-8")
    tok = train_tokenizer(TokenizerConfig(input=[str(text)], out=str(root / "tok"), vocab_size=300))
    model_cfg = ModelConfig(n_layer=2, n_head=2, n_embd=64, block_size=512, vocab_size=-(-tok.vocab_size // 64) * 64)
    cfg = TrainConfig(out=str(root / "run"), batch_size=len(TRAINED), lr=1e-2, warmup_steps=5, max_steps=150,
                      eval_every=150, eval_batches=1, log_every=150, checkpoint_every=150, weight_decay=0.0,
                      device="cpu")
    # Memorised replies drive squared gradients into denormal floats, which the CPU computes ~100x slower: flush them
    # to zero, on one thread since the flag is per thread (the batch is tiny anyway).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    try:
        train(model_cfg, cfg, Memorise(tok), tok)
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)
    return root / "run"


class Server:
    """A server on a free port in a thread of this process; `url` is known once the port is bound, and requests
    made from then on wait in the listen queue until the app is up: no polling, no sleeps."""

    def __init__(self, run: Path, cfg: ServeConfig):
        cfg.threads = torch.get_num_threads()  # serve() sets it for the whole process: keep this one's as it is
        box: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=serve, args=(run, cfg, lambda url, srv: box.put((url, srv))),
                                       daemon=True)
        self.thread.start()
        self.url, self.uvicorn = box.get(timeout=120)
        self.scheduler = self.uvicorn.config.app.state.scheduler
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key=cfg.api_key or "none", max_retries=0,
                                    timeout=60)

    def close(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(timeout=60)
        assert not self.thread.is_alive()


@pytest.fixture(scope="module")
def server(run):
    s = Server(run, ServeConfig(port=0, max_batch=8))
    yield s
    s.close()


def post(url: str, body: bytes | dict, key: str | None = None) -> tuple[int, dict]:
    """A raw POST (for bodies the openai client would never send): status and JSON answer."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def greedy(run: Path, messages: list[dict] | None = None, prompt: str = "", n: int = 60, stop=(),
           penalty: float = 1.0) -> str:
    """What the library itself generates: the reference every served reply must equal."""
    tok = Tokenizer.load(run)
    text = tok.decode(prompt_ids(tok, messages)) if messages else prompt
    cfg = SampleConfig(temperature=0, max_new_tokens=n, stop=list(stop), repetition_penalty=penalty)
    return "".join(stream_text(load_model(run), tok, text, cfg))


def test_models_health_and_a_completion_equal_to_the_library(run, server):
    assert [m.id for m in server.client.models.list().data] == [run.name]
    with urllib.request.urlopen(server.url + "/health") as r:
        assert json.loads(r.read()) == {"status": "ok", "model": run.name, "active_generations": 0}
    out = server.client.completions.create(model=run.name, prompt="the cat", max_tokens=30, temperature=0)
    assert out.choices[0].text == greedy(run, prompt="the cat", n=30)
    assert out.usage.prompt_tokens == len(Tokenizer.load(run).encode("the cat"))
    assert out.usage.completion_tokens + out.usage.prompt_tokens == out.usage.total_tokens


def test_completions_take_token_ids_as_prompts(run, server):
    """OpenAI's API takes a prompt as token ids, one list or a list of lists (evaluation harnesses send them): they
    were refused. Ids answer as their text does; an id outside the vocabulary is refused, naming it."""
    tok = Tokenizer.load(run)
    ids = tok.encode_prompt("the cat")
    out = server.client.completions.create(model=run.name, prompt=ids, max_tokens=20, temperature=0)
    assert out.choices[0].text == greedy(run, prompt="the cat", n=20)
    assert out.usage.prompt_tokens == len(ids)
    out = server.client.completions.create(model=run.name, prompt=[ids, tok.encode_prompt("7/3?")], max_tokens=20,
                                           temperature=0)
    assert [c.text for c in out.choices] == [greedy(run, prompt=p, n=20) for p in ("the cat", "7/3?")]
    for bad, code in ([], "invalid_type"), ([1, "a"], "invalid_type"), ([[1], []], "invalid_type"), (
            [1, True], "invalid_type"), ([1, tok.vocab_size], "invalid_value"), ([[2], [-1]], "invalid_value"):
        status, answer = post(server.url + "/v1/completions", {"model": run.name, "prompt": bad})
        assert (status, answer["error"]["param"], answer["error"]["code"]) == (400, "prompt", code), bad
    assert f"holds token id {tok.vocab_size}: this model's ids are 0 to {tok.vocab_size - 1}" in post(
        server.url + "/v1/completions", {"model": run.name, "prompt": [1, tok.vocab_size]})[1]["error"]["message"]


def test_chat_replies_equal_the_library_alone_and_batched(run, server):
    """Four choices in one request are admitted together, so they are decoded as one batch (peak rows >= 4)."""
    for conversation in CONVERSATIONS:
        messages = conversation[:1]
        out = server.client.chat.completions.create(model=run.name, messages=messages, temperature=0, n=4,
                                                    max_tokens=60)
        want = greedy(run, messages)
        assert [c.message.content for c in out.choices] == [want] * 4
        assert out.choices[0].finish_reason == ("length" if conversation[1]["content"] == LA else "stop")
    assert CONVERSATIONS[0][1]["content"] == greedy(run, CONVERSATIONS[0][:1])  # the model did memorise
    assert server.scheduler.peak >= 4
    # Eight clients at once, each its own conversation and length: each gets exactly its solo reply.
    jobs = [(CONVERSATIONS[i % 3][:1], 10 + 7 * i) for i in range(8)]
    assert ask_at_once(server, run, jobs) == {i: greedy(run, m, n=n) for i, (m, n) in enumerate(jobs)}


def test_repetition_penalty_as_the_library_applies_it_alone_and_batched(run, server):
    """An extension, as top_k (generate and chat have it): it was ignored, every reply as without it. A row with a
    penalty samples alone, with its own ids so far, so replies equal the library's next to rows without one."""
    sing, math = CONVERSATIONS[2][:1], CONVERSATIONS[1][:1]
    penalised = greedy(run, sing, n=40, penalty=20.0)
    assert penalised != greedy(run, sing, n=40)  # (the penalty changes this reply: the check below can fail)
    out = server.client.chat.completions.create(model=run.name, messages=sing, temperature=0, max_tokens=40,
                                                extra_body={"repetition_penalty": 20.0})
    assert out.choices[0].message.content == penalised
    replies: dict[int, str] = {}

    def ask(i: int, messages: list[dict], penalty: float) -> None:
        replies[i] = server.client.chat.completions.create(
            model=run.name, messages=messages, temperature=0, max_tokens=40,
            extra_body={"repetition_penalty": penalty}).choices[0].message.content

    jobs = [(sing, 20.0), (sing, 1.0), (math, 3.0), (sing, 20.0)]
    threads = [threading.Thread(target=ask, args=(i, *job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert replies == {i: greedy(run, m, n=40, penalty=p) for i, (m, p) in enumerate(jobs)}
    for bad in (0, -1, "1.2"):
        status, answer = post(server.url + "/v1/chat/completions",
                              {"model": run.name, "messages": sing, "repetition_penalty": bad})
        assert (status, answer["error"]["param"]) == (400, "repetition_penalty"), bad


def ask_at_once(server: Server, run: Path, jobs: list[tuple[list[dict], int]]) -> dict[int, str]:
    """Each (messages, max_tokens) asked greedily by a client of its own, all at once: the replies by job."""
    replies: dict[int, str] = {}

    def ask(i: int) -> None:
        replies[i] = server.client.chat.completions.create(model=run.name, messages=jobs[i][0], temperature=0,
                                                           max_tokens=jobs[i][1]).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return replies


def test_the_batchs_cache_follows_the_requests_in_flight_and_replies_stay_the_same(run, monkeypatch):
    """It was allocated for the whole context at the start (gigabytes for a long-context model); later it grew every
    row to the longest request's length and stayed so: one long request left all --max-batch rows that long. Here it
    starts at one row of 4 positions: a long reply alone grows its positions only, four replies at once its rows, and
    each time the server is idle again it is back at its first size."""
    import homellm.serve as module

    made: list[tuple[int, int]] = []  # (rows, positions) of every cache the scheduler makes

    class Recorded(KVCache):
        def __init__(self, cfg, rows, positions, *args, **kwargs):
            made.append((rows, positions))
            super().__init__(cfg, rows, positions, *args, **kwargs)

    monkeypatch.setattr(module, "KVCache", Recorded)
    monkeypatch.setattr(module, "FIRST_CACHE_POSITIONS", 4)
    monkeypatch.setattr(module, "FIRST_CACHE_ROWS", 1, raising=False)
    s = Server(run, ServeConfig(port=0, max_batch=4))
    try:
        sing = CONVERSATIONS[2][:1]
        assert ask_at_once(s, run, [(sing, 200)]) == {0: greedy(run, sing, n=200)}
        assert s.scheduler.wait_idle(60)
        assert max(r for r, _ in made) == 1 and 200 < max(n for _, n in made) <= 512
        assert (s.scheduler.cache.k.size(1), s.scheduler.cache.max_len) == (1, 4)
        made.clear()
        out = s.client.chat.completions.create(model=run.name, messages=CONVERSATIONS[0][:1], temperature=0, n=4,
                                               max_tokens=60)  # four choices, admitted together
        assert [c.message.content for c in out.choices] == [greedy(run, CONVERSATIONS[0][:1])] * 4
        assert s.scheduler.wait_idle(60)
        assert max(r for r, _ in made) == 4 and 4 < max(n for _, n in made) < 512
        assert (s.scheduler.cache.k.size(1), s.scheduler.cache.max_len) == (1, 4)
    finally:
        s.close()


def test_memory_running_out_as_the_cache_grows_fails_that_request_and_the_server_goes_on(run, monkeypatch):
    """The cache is made bigger mid-generation; where that runs out of memory, the request in flight fails (500),
    and the next one is served from the cache as it was. (On a GPU the old cache waits on the CPU while the bigger
    one is made: it went back only on success, so after one failure every request failed; untested here, no GPU.)"""
    import homellm.serve as module

    class Tight(KVCache):
        def __init__(self, cfg, rows, positions, *args, **kwargs):
            if positions > 64:
                raise torch.OutOfMemoryError("out of memory (a test)")
            super().__init__(cfg, rows, positions, *args, **kwargs)

    monkeypatch.setattr(module, "KVCache", Tight)
    monkeypatch.setattr(module, "FIRST_CACHE_POSITIONS", 4)
    s = Server(run, ServeConfig(port=0, max_batch=4))
    try:
        with pytest.raises(openai.InternalServerError):
            s.client.chat.completions.create(model=run.name, messages=CONVERSATIONS[2][:1], temperature=0,
                                             max_tokens=200)
        messages = CONVERSATIONS[1][:1]
        assert ask_at_once(s, run, [(messages, 20)] * 2) == {i: greedy(run, messages, n=20) for i in range(2)}
    finally:
        s.close()


def test_failed_admissions_fail_alone_and_the_server_goes_on(run, monkeypatch):
    """Two choices (n=2) whose prompt fails to prefill, next to a reply in flight: they never got rows of the cache,
    and freeing them copied from past its rows: the scheduler's thread died, every request in flight failed, and every
    later one waited for ever. Now those two fail (500), and the others are answered as the library answers them."""
    import homellm.serve as module

    bad = Tokenizer.load(run).encode_prompt("the cat")
    prefill = module._prefill
    monkeypatch.setattr(module, "_prefill", lambda model, ids, *a, **k: (_ for _ in ()).throw(
        RuntimeError("a failing prefill (a test)")) if ids == bad else prefill(model, ids, *a, **k))
    monkeypatch.setattr(module, "FIRST_CACHE_ROWS", 1)
    s = Server(run, ServeConfig(port=0, max_batch=4))
    try:
        sing = CONVERSATIONS[2][:1]
        stream = s.client.chat.completions.create(model=run.name, messages=sing, temperature=0, max_tokens=120,
                                                  stream=True)
        first = next(c for c in stream if c.choices and c.choices[0].delta.content)  # in flight now
        with pytest.raises(openai.InternalServerError):
            s.client.completions.create(model=run.name, prompt="the cat", n=2, max_tokens=5, temperature=0)
        rest = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert first.choices[0].delta.content + rest == greedy(run, sing, n=120)
        math = CONVERSATIONS[1][:1]
        assert ask_at_once(s, run, [(math, 20)] * 2) == {i: greedy(run, math, n=20) for i in range(2)}
    finally:
        s.close()


def test_a_note_at_start_when_max_batch_requests_at_the_full_context_would_fill_memory():
    from homellm.serve import cache_note

    model = GPT(ModelConfig(n_layer=4, n_head=8, n_kv_head=2, n_embd=256, block_size=4096, vocab_size=128))
    row = 2 * 4 * 2 * 32 * 4096 * 4  # keys and values, float32: 8 MiB a request at the full context
    assert cache_note(model, 32, 64 * row) is None  # 32 rows: half of the memory exactly
    note = cache_note(model, 32, 63 * row)
    assert "32 requests at the full context (4,096 tokens) would take 0.2 GiB" in note and "--max-batch 31" in note
    assert cache_note(model, 32, None) is None
    assert cache_note(model, 32, row).endswith("even one request at the full context takes 0.0 GiB: long "
                                                "conversations will run out of memory")


def test_bfloat16_weights_serve_the_memorised_replies_alone_and_batched(run):
    """--dtype bfloat16 (a GPU's default for serving): the weights and the batched per-row KV cache in bfloat16
    still give every memorised reply, in a batch of four as alone."""
    s = Server(run, ServeConfig(port=0, max_batch=8, dtype="bfloat16"))
    try:
        assert {p.dtype for p in s.scheduler.model.parameters()} == {torch.bfloat16}
        for conversation in CONVERSATIONS[:2]:
            out = s.client.chat.completions.create(model=run.name, messages=conversation[:1], temperature=0, n=4,
                                                   max_tokens=60)
            assert [c.message.content for c in out.choices] == [conversation[1]["content"]] * 4
        assert s.scheduler.cache.k.dtype == torch.bfloat16 and s.scheduler.peak >= 4
    finally:
        s.close()


def test_streaming_japanese_with_usage_never_splits_a_character(run, server):
    tok = Tokenizer.load(run)
    assert any("\ufffd" in tok.decode([i]) for i in tok.encode(JA))  # some tokens hold part of a character
    messages = CONVERSATIONS[0][:1]
    stream = server.client.chat.completions.create(model=run.name, messages=messages, temperature=0, stream=True,
                                                   stream_options={"include_usage": True})
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == JA and len(pieces) > 1
    assert all("\ufffd" not in p for p in pieces)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == len(prompt_ids(tok, messages))
    assert chunks[-1].usage.completion_tokens == len(tok.encode(JA))
    # On the wire: UTF-8 as it is (no \u escapes), `data: ` lines, and [DONE] at the end.
    req = urllib.request.Request(server.url + "/v1/chat/completions", json.dumps(
        {"model": run.name, "messages": messages, "temperature": 0, "stream": True}).encode())
    with urllib.request.urlopen(req) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["X-Accel-Buffering"] == "no"  # nginx in front passes each chunk on at once
        raw = r.read()
    assert all(ch.encode() in raw for ch in JA)  # every character whole, in some chunk
    assert b"\\u" not in raw and raw.rstrip().endswith(b"data: [DONE]")


def test_stop_strings_end_the_reply_before_them_streamed_or_not(run, server):
    messages = CONVERSATIONS[0][:1]
    for stop in (["小さな"], ["村が", "ふもと"], "、"):
        want = greedy(run, messages, stop=[stop] if isinstance(stop, str) else stop)
        assert want == JA[:min(JA.find(s) for s in ([stop] if isinstance(stop, str) else stop))]
        out = server.client.chat.completions.create(model=run.name, messages=messages, temperature=0, stop=stop)
        assert out.choices[0].message.content == want and out.choices[0].finish_reason == "stop"
        stream = server.client.completions.create(model=run.name, prompt=Tokenizer.load(run).decode(
            prompt_ids(Tokenizer.load(run), messages)), temperature=0, stop=stop, stream=True, max_tokens=60)
        assert "".join(c.choices[0].text for c in stream) == want


def test_sampling_is_reproducible_with_a_seed_alone_or_beside_others(run, server):
    # Hot enough that the draws differ (at 1.5 with top_p 0.95 the memorised " la la la" came every time, and
    # which draw a choice got never showed)
    ask = dict(model=run.name, prompt="the", max_tokens=20, temperature=2.0, top_p=1.0, seed=7)
    alone = server.client.completions.create(**ask).choices[0].text
    with_others = server.client.completions.create(**{**ask, "n": 3}).choices  # choice j: seed 7 hashed with j
    assert with_others[0].text == alone
    # A prompt samples alike alone and second in a list of prompts (its draws were keyed by its place in the list).
    listed = server.client.completions.create(**{**ask, "prompt": ["a", "the"], "n": 3}).choices
    assert len({c.text for c in with_others}) == 3  # (the draws differ: which one a choice gets shows)
    assert [c.text for c in listed[3:]] == [c.text for c in with_others]


def test_a_request_that_fails_to_sample_fails_alone(run, server, monkeypatch):
    """A sampling error (a temperature of 1e-39 made NaN probabilities) used to fail every request in the step."""
    import homellm.serve as serve_module

    real = serve_module.sample_next

    def fragile(logits, history, cfg, *args):
        if cfg.temperature == 1.25:
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return real(logits, history, cfg, *args)

    monkeypatch.setattr(serve_module, "sample_next", fragile)
    stream = server.client.completions.create(model=run.name, prompt="the cat", max_tokens=40, temperature=0,
                                              stream=True)
    pieces = iter(stream)
    first = next(pieces).choices[0].text  # in flight while the other fails
    status, answer = post(server.url + "/v1/completions", {"model": run.name, "prompt": "the", "max_tokens": 5,
                                                           "temperature": 1.25})
    assert status == 500 and answer["error"]["type"] == "server_error"
    rest = [c.choices[0] for c in pieces if c.choices]
    assert first + "".join(c.text for c in rest) == greedy(run, prompt="the cat", n=40)
    assert rest[-1].finish_reason in ("stop", "length")
    # A request's other choices stop with it: the answer is a 500, and their text would be thrown away.
    steps = []

    def counting(logits, history, cfg, *args):
        steps.append(1)
        return fragile(logits, history, cfg, *args)

    monkeypatch.setattr(serve_module, "sample_next", counting)
    real_prefill = serve_module._prefill
    monkeypatch.setattr(serve_module, "_prefill", lambda model, ids: (_ for _ in ()).throw(MemoryError("long prompt"))
                        if len(ids) > 3 else real_prefill(model, ids))
    status, _ = post(server.url + "/v1/completions", {"model": run.name, "prompt": ["the", "the cat sat on the mat"],
                                                      "max_tokens": 400, "temperature": 0})
    assert status == 500 and len(steps) < 200, len(steps)  # it generated all 400 before


def test_bad_requests_get_openai_shaped_errors(run, server):
    url = server.url + "/v1/chat/completions"
    ok = {"model": run.name, "messages": [{"role": "user", "content": "hi"}]}
    cases = [
        (b"{not json", 400, None, "invalid_json"),
        (b"[1, 2]", 400, None, "invalid_json"),
        (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, None, "invalid_json"),  # a RecursionError: 500
        (b'{"seed": 1' + b"0" * 5000 + b"}", 400, None, "invalid_json"),  # over Python's 4,300 digits: a 500
        ({**ok, "temperature": "hot"}, 400, "temperature", "invalid_type"),
        ({**ok, "max_tokens": 2.5}, 400, "max_tokens", "invalid_type"),
        ({**ok, "stream": "yes"}, 400, "stream", "invalid_type"),
        ({**ok, "temperature": 2.5}, 400, "temperature", "invalid_value"),
        ({**ok, "top_p": 1.5}, 400, "top_p", "invalid_value"),
        ({**ok, "top_k": -1}, 400, "top_k", "invalid_value"),
        ({**ok, "temperature": float("nan")}, 400, "temperature", "invalid_value"),  # JSON's NaN
        ({**ok, "top_p": float("nan")}, 400, "top_p", "invalid_value"),
        ({**ok, "seed": 10**23}, 400, "seed", "invalid_value"),
        ({**ok, "seed": -1}, 400, "seed", "invalid_value"),
        ({**ok, "n": 0}, 400, "n", "invalid_value"),
        ({**ok, "stop": [1]}, 400, "stop", "invalid_type"),
        ({**ok, "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages", "invalid_value"),
        ({**ok, "messages": []}, 400, "messages", "invalid_value"),
        ({**ok, "logprobs": True}, 400, "logprobs", "unsupported_parameter"),
        ({**ok, "response_format": {"type": "json_object"}}, 400, "response_format", "unsupported_parameter"),
        ({**ok, "modalities": ["audio"]}, 400, "modalities", "unsupported_parameter"),
        ({**ok, "stream_options": {"include_usage": True}}, 400, "stream_options", "invalid_value"),
        ({**ok, "max_tokens": 600}, 400, "max_tokens", "context_length_exceeded"),
        ({**ok, "max_completion_tokens": 600}, 400, "max_completion_tokens", "context_length_exceeded"),
        ({**ok, "messages": [{"role": "user", "content": "la " * 600}]}, 400, "messages", "context_length_exceeded"),
        ({**ok, "model": "gpt-4"}, 404, "model", "model_not_found"),
        (json.dumps({**ok, "messages": [{"role": "user", "content": "hi\ud800"}]}).encode(), 400, "messages",
         "invalid_value"),  # a lone surrogate escape
        (json.dumps({**ok, "pad": "x" * (5 << 20)}).encode(), 413, None, "request_too_large"),
        ({**ok, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"},
                                                          {"type": "image_url", "image_url": {"url": "x"}}]}]},
         400, "messages", "invalid_value"),
        ({**ok, "model": 5}, 400, "model", "invalid_type"),
    ]
    for body, status, param, code in cases:
        got, answer = post(url, body)
        assert (got, answer["error"]["param"], answer["error"]["code"]) == (status, param, code), body
        assert set(answer["error"]) == {"message", "type", "param", "code"} and answer["error"]["message"]
    # completions' `logprobs: 0` asks for the chosen token's logprob (0 == False let it pass, ignored); the default
    # values of the refused fields and OpenAI's `developer` role (its newer name for system) are fine.
    completion = {"model": run.name, "prompt": "hi", "max_tokens": 2}
    assert post(server.url + "/v1/completions", {**completion, "logprobs": 0})[1]["error"]["param"] == "logprobs"
    assert post(server.url + "/v1/completions", {**completion, "logprobs": None, "echo": False})[0] == 200
    for many, param in ({"prompt": ["a"] * 9}, "prompt"), ({"prompt": ["a", "b"], "n": 5}, "n"):  # over --max-batch 8
        assert post(server.url + "/v1/completions", {**completion, **many})[1]["error"]["param"] == param
    developer = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    # Values that ask for nothing, which chat UIs and SDKs send with every request, pass; asking for the feature not.
    # (a request without "model", as llama.cpp's server takes one, is for the model served)
    assert post(url, {k: v for k, v in {**ok, "max_tokens": 2}.items() if k != "model"})[0] == 200
    for fine in ({"response_format": {"type": "text"}, "max_tokens": 2}, {"messages": developer, "max_tokens": 2},
                 {"tool_choice": "none", "tools": [], "top_logprobs": 0, "max_tokens": 2},
                 {"tool_choice": "auto", "max_tokens": 2}):
        assert post(url, {**ok, **fine})[0] == 200, fine
    for refused, param in (({"tool_choice": "required"}, "tool_choice"), ({"top_logprobs": 2}, "top_logprobs"),
                           ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools")):
        assert post(url, {**ok, **refused})[1]["error"]["param"] == param, refused
    assert post(url, {**ok, "messages": "hi"})[1]["error"]["message"] == (
        "request body: 'messages' is str, not a list of {role, content} messages")
    image = [{"type": "image_url", "image_url": {"url": "x"}}]
    assert "content parts of type image_url are not supported: this model reads text only" in post(
        url, {**ok, "messages": [{"role": "user", "content": image}]})[1]["error"]["message"]
    status, answer = post(server.url + "/v1/nothing", ok)
    assert status == 404 and answer["error"]["code"] == "not_found"
    # A wrong method names the right ones; HEAD, as uptime checkers send, answers what GET does without a body.
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(url, timeout=60)
    assert e.value.code == 405 and e.value.headers["Allow"] == "POST"
    assert json.loads(e.value.read())["error"]["code"] == "method_not_allowed"
    for path in ("/health", "/v1/models", "/"):
        with urllib.request.urlopen(urllib.request.Request(server.url + path, method="HEAD"), timeout=60) as r:
            assert r.status == 200 and r.read() == b"" and int(r.headers["Content-Length"]) > 0
    # The official client raises its typed errors, carrying our codes.
    with pytest.raises(openai.BadRequestError) as e:
        server.client.completions.create(model=run.name, prompt="x" * 600, max_tokens=10)
    assert (e.value.code, e.value.param) == ("context_length_exceeded", "prompt")
    n = len(Tokenizer.load(run).encode("x" * 600))
    assert f"the request needs {n + 10} ({n} in the prompt and 10 for the completion)" in e.value.message
    assert e.value.message.endswith(": shorten the prompt")  # (a smaller max_tokens would not do)
    # A prompt that leaves less than completions' default 16: the fix names that default, which the client never sent
    tok = Tokenizer.load(run)
    near = next(p for k in range(600) for j in range(4) if 500 <= len(tok.encode(p := "x" * j + "la " * k)) < 512)
    for extra, fix in ({}, "shorten the prompt, or give max_tokens (its default here is 16)"), (
            {"max_tokens": 16}, "shorten the prompt or lower max_tokens"):
        status, answer = post(server.url + "/v1/completions", {"model": run.name, "prompt": near, **extra})
        assert (status, answer["error"]["param"]) == (400, "max_tokens")
        assert answer["error"]["message"].endswith(fix), answer
    with pytest.raises(openai.NotFoundError):
        server.client.completions.create(model="nope", prompt="x")
    assert server.scheduler.busy() == 0


def test_api_key_and_capacity(run):
    """With a key, requests without it get 401; with one batch row and no queue, a second request gets 503."""
    s = Server(run, ServeConfig(port=0, api_key=KEY, max_batch=1, max_queue=0))
    try:
        keyless = openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as e:
            keyless.models.list()
        assert e.value.code == "invalid_api_key"
        assert post(s.url + "/v1/completions", {"model": run.name, "prompt": "x"})[0] == 401
        # The scheme's name is case-insensitive (RFC 9110); the key is not.
        for header, status in ((f"bearer {KEY}", 200), (f"BEARER {KEY}", 200), (f"Bearer {KEY.upper()}x", 401)):
            request = urllib.request.Request(s.url + "/v1/models", headers={"Authorization": header})
            try:
                with urllib.request.urlopen(request, timeout=60) as r:
                    assert r.status == status
            except urllib.error.HTTPError as e:
                assert e.code == status, header
        stream = s.client.chat.completions.create(model=run.name, messages=CONVERSATIONS[2][:1], max_tokens=400,
                                                  temperature=0, stream=True)
        next(iter(stream))  # the one row is taken for as long as this stream runs
        with pytest.raises(openai.APIStatusError) as e:
            s.client.completions.create(model=run.name, prompt="x", max_tokens=5)
        assert e.value.status_code == 503 and e.value.code == "server_overloaded"
        assert e.value.response.headers["retry-after"] == "1"
        stream.close()
        assert s.scheduler.wait_idle(30)
        assert s.client.completions.create(model=run.name, prompt="x", max_tokens=5).choices[0].text is not None
    finally:
        s.close()


def test_a_client_that_disconnects_mid_stream_stops_its_generation(run, server):
    before = dict(server.scheduler.finished)
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    body = {"model": run.name, "messages": CONVERSATIONS[2][:1], "max_tokens": 480, "temperature": 0, "stream": True}
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: ")  # the stream has started
    conn.sock.shutdown(2)
    conn.close()
    assert server.scheduler.wait_idle(30)  # the generation was dropped, not left running for nobody
    assert server.scheduler.finished.get("cancelled", 0) == before.get("cancelled", 0) + 1
    assert server.scheduler.finished.get("length", 0) == before.get("length", 0)  # it did not run to its end
    with urllib.request.urlopen(server.url + "/health") as r:
        assert json.loads(r.read())["active_generations"] == 0
    assert server.client.completions.create(model=run.name, prompt="la", max_tokens=5).usage.completion_tokens >= 1


def test_render_html_turns_latex_into_mathml_and_escapes_the_rest():
    out = render_html(r"<b>x</b> is $\frac{7}{3}$, costs $5 and $6, and $$x^2$$")
    assert out.startswith("&lt;b&gt;x&lt;/b&gt; is <math") and "<mfrac>" in out
    assert "costs $5 and $6" in out and out.count("<math") == 2 and 'display="block"' in out
    assert render_html(r"broken $\frac{$ stays") == r"broken $\frac{$ stays"
    assert render_html("値段は$5と$10です") == "値段は$5と$10です"  # prices: no space before the second $
    assert render_html("$5 \\times 2 = 10$, done").startswith("<math")
    # latex2mathml copies \text{...} into <mtext> as it is, where HTML is live: `innerHTML` ran a model's script
    for attack in (r"$\text{<img/src=x/onerror=alert(1)>}$", r"$\text{<img src='x' onerror='alert(1)'/>}$",
                   r"$\href{javascript:alert(1)}{x}$"):
        out = render_html(attack)
        assert out == html.escape(attack)  # shown as written, nothing live
    assert '<mtext>if\xa0x\xa0&gt;\xa00</mtext>' in render_html(r"$\text{if x > 0}$")  # text escaped anew
    assert 'mathcolor="red"' in render_html(r"$\color{red}{x}$")
    # a span of math is bounded: text of many openers that never close took quadratic time, and held the server
    long = "\\(" + "x" * 2500 + "\\)"
    assert render_html(long) == long and render_html(r"\(x\)").startswith("<math")


def test_markdown_download(run, server):
    messages = [{"role": "user", "content": "7/3?"}, {"role": "assistant", "content": MATH}]
    req = urllib.request.Request(server.url + "/markdown", json.dumps({"messages": messages}).encode())
    with urllib.request.urlopen(req) as r:
        assert "attachment" in r.headers["content-disposition"]
        text = r.read().decode()
    assert "**user**:" in text and MATH in text


@pytest.mark.parametrize("autocast", [False, True])
def test_serve_per_row_cache_equals_one_sequence_at_a_time(autocast):
    """The batched decoding the server does (rows at their own lengths) gives each row's own logits, also under the
    CPU's bfloat16 autocast with a float32 cache (its new keys are bfloat16 there)."""
    for family in ("gpt2", "llama"):
        torch.manual_seed(0)
        model = GPT(ModelConfig(family=family, vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                                block_size=32, tie_embeddings=False)).eval()
        prompts = [torch.randint(0, 64, (n,)).tolist() for n in (3, 9, 5)]
        steps = torch.randint(0, 64, (3, 6))
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            want = [model(torch.tensor([p + steps[i].tolist()]))[0][0, len(p):] for i, p in enumerate(prompts)]
            cache = KVCache(model.cfg, 4, 32, "cpu")
            lengths = torch.zeros(4, dtype=torch.long)
            for i, p in enumerate(prompts):
                one = KVCache(model.cfg, 1, 32, "cpu")
                model(torch.tensor([p]), cache=one)
                cache.k[:, i, :, :len(p)], cache.v[:, i, :, :len(p)] = one.k[:, 0, :, :len(p)], one.v[:, 0, :, :len(p)]
                lengths[i] = len(p)
            got = []
            for t in range(6):
                cache.pos = lengths[:3]
                got.append(model(steps[:, t:t + 1], cache=cache)[0][:, 0])
        assert lengths[:3].tolist() == [len(p) + 6 for p in prompts]
        for i in range(3):
            torch.testing.assert_close(torch.stack([g[i] for g in got]), want[i], atol=5e-3 if autocast else 1e-5,
                                       rtol=1e-2 if autocast else 1e-4)


@pytest.mark.parametrize("host, key", [("127.0.0.1", "k"), ("0.0.0.0", "k"), ("0.0.0.0", "")])
def test_cli_serves_on_a_free_port_logs_requests_and_stops_on_sigterm(run, host, key):
    proc = subprocess.Popen([sys.executable, "-m", "homellm", "serve", str(run), "--port", "0", "--host", host,
                             *(["--api-key", key] if key else [])], text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        first = proc.stdout.readline()
        # Every address and no key: said, as the README asks for one. A pretrained-only run: said, as chat says.
        # (Read here, line by line: communicate() below reads the pipe itself, past what readline buffered.)
        said = [host == "0.0.0.0" and not key, not is_sft(run)]
        notes = "".join(proc.stdout.readline() for _ in range(sum(said)))
        assert ("anyone on the network can use it; set one with --api-key" in notes) == said[0]
        assert ("was pretrained only, not fine-tuned on conversations" in notes) == said[1]
        url = first.split(" at ")[1].split()[0]
        # Listening on every address prints an address a browser can open, and says the rest.
        assert url.startswith("http://127.0.0.1:")
        lan = lan_address()  # None on a machine with no network route: then the banner says so in words
        assert ("other machines" in first) == (host == "0.0.0.0")
        assert (host == "0.0.0.0" and lan is not None) == (f"http://{lan}:{url.rsplit(':', 1)[1]}" in first)
        with urllib.request.urlopen(url + "/health") as r:
            assert r.status == 200
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0]
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    assert [line for line in out.splitlines() if "GET /health" in line][0].endswith("200 OK")
    assert "Application shutdown complete" in out


def test_an_api_key_no_header_can_carry_is_refused(run):
    for key in ("clé-ключ", " padded ", "tab\there"):
        with pytest.raises(HomeLLMError, match="--api-key: use printable ASCII"):
            serve(run, ServeConfig(port=0, api_key=key))


def test_a_port_in_use_is_named_with_the_reason_once(run):
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(HomeLLMError) as caught:
            serve(run, ServeConfig(port=port))
    assert str(caught.value) == (f"cannot listen on 127.0.0.1:{port} (Address already in use): choose another --port "
                                 "(0 picks a free one) or --host")


def test_a_requests_note_is_written_whole(monkeypatch, tmp_path):
    """Requests are read on several threads: a note written in two parts (print's text, then its newline) ran into
    another's line in the log."""
    import io

    from homellm.serve import note_unknown

    (tmp_path / "t.txt").write_text("abc\n", encoding="utf-8")
    tok = train_tokenizer(TokenizerConfig(input=[str(tmp_path / "t.txt")], out=str(tmp_path / "tok"), kind="char"))
    writes: list[str] = []
    err = io.StringIO()
    monkeypatch.setattr(err, "write", writes.append)
    monkeypatch.setattr(sys, "stderr", err)
    note_unknown(tok, "a 猫")
    assert writes == [f"note: a request: {tok.unknown_note('a 猫')}\n"]


def test_missing_server_packages_give_one_line_error(run, monkeypatch):
    monkeypatch.setitem(sys.modules, "fastapi", None)
    with pytest.raises(HomeLLMError, match=r"pip install 'homellm\[serve\]'"):
        serve(run, ServeConfig(port=0))


def find_or_install_chromium() -> str:
    """Debian's chromium, installed here with apt when missing and allowed (root, apt-get present; about 10 s
    measured): playwright's own browser download needs a network beyond the package registries. Else skip."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("no chromium to drive and no root apt-get to install it: apt-get install chromium")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]):
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
        except subprocess.TimeoutExpired:
            pytest.skip(f"installing chromium timed out ({' '.join(cmd)})")
        if done.returncode != 0:
            pytest.skip(f"could not install chromium ({' '.join(cmd)}: {done.stderr.strip()[-200:]})")
    found = shutil.which("chromium")
    if not found:
        pytest.skip("apt-get installed chromium but it is not on PATH")
    return found


def test_web_page_streams_renders_math_shows_japanese_and_downloads_markdown(run, server):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright (dev extra)")
    chromium = find_or_install_chromium()
    expect = sync_api.expect
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(accept_downloads=True)
            page.goto(server.url + "/")
            expect(page.locator("#model")).to_have_text(run.name)
            page.click("#toggle-settings")
            page.fill("#temperature", "0")
            for question, answer in (("7/3?", MATH), ("昔話をして", JA)):
                page.fill("#input", question)
                page.press("#input", "Enter")
                reply = page.locator(".msg.assistant").last
                expect(reply).to_have_attribute("data-done", "1")
                expect(reply).to_have_attribute("data-rendered", "1")
                assert int(reply.get_attribute("data-chunks")) > 1  # it came in pieces, as they were generated
                if answer == MATH:
                    assert reply.locator("math mfrac").count() == 1  # drawn as math, not shown as LaTeX
                    assert reply.locator("math mfrac mn").all_text_contents() == ["7", "3"]
                else:
                    assert reply.inner_text() == JA
            with page.expect_download() as download:
                page.click("#download")
            markdown = Path(download.value.path()).read_text(encoding="utf-8")
            assert [line for line in markdown.splitlines() if line] == [
                f"# Conversation with {run.name}", "**user**:", "7/3?", "**assistant**:", MATH,
                "**user**:", "昔話をして", "**assistant**:", JA]
            # A reply stopped by its length says so (it looked finished); an emptied field is left out of the
            # request, so the server's default applies (it was sent as 0: a cleared Temperature meant greedy).
            page.click("#new")
            page.fill("#max_tokens", "20")
            page.fill("#input", "sing")  # (the memorised reply never ends)
            page.press("#input", "Enter")
            expect(page.locator(".msg.assistant").last).to_have_attribute("data-done", "1")
            expect(page.locator(".msg").last).to_have_text(
                "Cut off at Max tokens (20): raise it in Settings for longer replies.")
            page.click("#new")
            page.fill("#temperature", "")
            with page.expect_request(lambda r: r.url.endswith("/v1/chat/completions")) as request:
                page.fill("#input", "sing")
                page.press("#input", "Enter")
            sent = json.loads(request.value.post_data)
            assert "temperature" not in sent and (sent["max_tokens"], sent["top_p"]) == (20, 1)
            expect(page.locator(".msg.assistant").last).to_have_attribute("data-done", "1")
        finally:
            browser.close()


def test_readme_serve_examples_run_against_the_server(run, server, capsys):
    """The README's curl lines and Python example, pointed at this server and model, work as written."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Serve")[1].split("\n## ")[0]
    blocks = section.split("```")

    def adapt(code: str) -> str:
        return code.replace("http://127.0.0.1:8000", server.url).replace('"my-chat"', json.dumps(run.name))

    python = next(b for b in blocks if b.startswith("python\n"))
    exec(compile(adapt(python.removeprefix("python\n")), "README.md", "exec"), {})
    assert "completion tokens]" in capsys.readouterr().out
    curl = next(b for b in blocks if "curl " in b)
    if shutil.which("curl"):
        for command in adapt(curl.removeprefix("bash\n")).replace("\\\n", " ").strip().splitlines():
            out = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60).stdout
            assert '"choices"' in out and ("data: [DONE]" in out) == ('"stream": true' in command)


def test_prompts_are_tokenized_off_the_event_loop(run, server, monkeypatch):
    """A long prompt tokenized on the loop would hold every other request, the health check too."""
    import asyncio

    on_loop = []

    def spy(encode):
        def spied(self, *args, **kwargs):
            try:
                asyncio.get_running_loop()
                on_loop.append(True)
            except RuntimeError:  # no loop runs in this thread: a worker's
                on_loop.append(False)
            return encode(self, *args, **kwargs)
        return spied

    for name in ("encode", "encode_batch", "encode_offsets"):
        monkeypatch.setattr(Tokenizer, name, spy(getattr(Tokenizer, name)))
    server.client.completions.create(model=run.name, prompt="the cat", max_tokens=2, temperature=0)
    server.client.chat.completions.create(model=run.name, messages=CONVERSATIONS[0][:1], max_tokens=2, temperature=0)
    assert on_loop and not any(on_loop)


def test_text_the_tokenizer_cannot_write_is_noted_in_the_log(run, server, monkeypatch, capsys, tmp_path):
    """A char tokenizer reads unseen characters as <|unk|>: the server's log says so, per request, as generate and
    chat do on the terminal (the fixture's byte-level BPE writes anything, so a char tokenizer judges here)."""
    (tmp_path / "t.txt").write_text("abc def\n", encoding="utf-8")
    char = train_tokenizer(TokenizerConfig(input=[str(tmp_path / "t.txt")], out=str(tmp_path / "tok"), kind="char"))
    judge = Tokenizer.unknown_note
    monkeypatch.setattr(Tokenizer, "unknown_note", lambda self, text, special=False: judge(char, text, special))
    capsys.readouterr()
    # (A raw prompt's special tokens are read whole: their '<' and '|' are not characters the model misses.)
    server.client.completions.create(model=run.name, prompt="a cab<|endoftext|>", max_tokens=2, temperature=0)
    assert "note: a request" not in capsys.readouterr().err
    server.client.completions.create(model=run.name, prompt="the cat", max_tokens=2, temperature=0)
    assert "note: a request: this model's tokenizer cannot write 'h': the model reads them as <|unk|>" in \
        capsys.readouterr().err
    server.client.chat.completions.create(model=run.name, messages=[{"role": "user", "content": "bad 猫"}],
                                          max_tokens=2, temperature=0)
    assert "cannot write '猫'" in capsys.readouterr().err


def test_stream_lines_hold_no_character_that_splitlines_breaks_at():
    """Streamed JSON keeps characters as they are, but U+2028, U+2029 and U+0085 are line breaks to Python's
    str.splitlines(), with which requests' iter_lines(decode_unicode=True) cut a `data:` line in two."""
    from homellm.serve import dumps

    text = "一\u2028二\u2029三\x85四\x0b五\x1c六\n七"
    line = "data: " + dumps({"choices": [{"delta": {"content": text}}]})
    assert len(line.splitlines()) == 1 and "一" in line
    assert json.loads(line.removeprefix("data: "))["choices"][0]["delta"]["content"] == text


def test_the_cores_to_serve_with_are_counted_on_macos_and_windows_too(monkeypatch):
    """os.sched_getaffinity is Linux's: `homellm serve` failed with an AttributeError on a Mac."""
    from homellm.serve import usable_cpus

    assert usable_cpus() == len(os.sched_getaffinity(0))
    monkeypatch.delattr(os, "sched_getaffinity")
    assert usable_cpus() == (os.cpu_count() or 1)


@pytest.mark.skipif(shutil.which("node") is None, reason="the page's script test needs node")
def test_new_chat_during_a_reply_starts_clean():
    """"New chat" mid-reply: the old reply's clean-up pushed its partial text into the new chat's turns, and the
    first message there went to the model after it. Run with node against a stub DOM and a streaming fetch."""
    page = Path(__file__).resolve().parents[1] / "src" / "homellm" / "static" / "chat.html"
    harness = Path(__file__).with_name("chat_page_new_chat.js")
    done = subprocess.run(["node", str(harness), str(page)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [[{"role": "user", "content": "first question"}],
                                       [{"role": "user", "content": "second question (new chat)"}]]
    # Stopped before any text: an empty assistant turn stayed, sent with every later message; now the question
    # leaves the turns and goes back into the box.
    done = subprocess.run(["node", str(harness), str(page), "stop"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"sent": [[{"role": "user", "content": "stopped at once"}],
                                                [{"role": "user", "content": "next question"}]],
                                       "back": "stopped at once"}
    # A reply that ends with no text is the model's answer, kept as one (only a Stop takes the question back).
    done = subprocess.run(["node", str(harness), str(page), "empty"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)[1] == [{"role": "user", "content": "first question"},
                                          {"role": "assistant", "content": ""},
                                          {"role": "user", "content": "next question"}]
    # The note that older turns left the context went below the reply it explains; it goes before the question.
    done = subprocess.run(["node", str(harness), str(page), "overflow"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert [kind for kind, _ in json.loads(done.stdout)] == ["msg user", "msg assistant streaming", "msg note",
                                                             "msg user", "msg assistant streaming"]


def test_a_stop_signal_ends_replies_in_progress_with_an_answer(run, monkeypatch):
    """SIGINT/SIGTERM while replies were generating: after uvicorn's 3 s of grace their connections were cut (the
    openai client raised a connection error) and a non-streaming request got a plain-text 500."""
    srv = Server(run, ServeConfig(port=0, max_batch=4))
    gate, stepping = threading.Event(), threading.Event()
    real_step = srv.scheduler._step

    def held_step() -> None:  # the replies stay in progress until the test lets them go
        stepping.set()
        gate.wait(60)
        real_step()

    monkeypatch.setattr(srv.scheduler, "_step", held_step)
    results: dict[str, object] = {}

    def ask(kind: str) -> None:
        try:
            if kind == "stream":
                for _ in srv.client.chat.completions.create(model=run.name, stream=True, max_tokens=30,
                                                            messages=[{"role": "user", "content": "hi"}]):
                    pass
            else:
                srv.client.completions.create(model=run.name, prompt="the", max_tokens=30)
            results[kind] = "finished"
        except openai.APIError as e:
            results[kind] = e

    threads = [threading.Thread(target=ask, args=(k,)) for k in ("stream", "plain")]
    for t in threads:
        t.start()
    assert stepping.wait(60)
    while srv.scheduler.busy() < 2:  # both admitted (the scheduler notifies on every change)
        with srv.scheduler.cond:
            srv.scheduler.cond.wait(1)
    srv.uvicorn.handle_exit(signal.SIGTERM, None)
    for t in threads:
        t.join(60)
    gate.set()
    srv.thread.join(60)
    assert not srv.thread.is_alive()
    assert isinstance(results["plain"], openai.APIStatusError) and results["plain"].status_code == 503
    # The openai clients retry a 503 (into the closed port, then "Connection error") unless told not to.
    assert results["plain"].response.headers.get("x-should-retry") == "false"
    assert "retry-after" not in results["plain"].response.headers
    assert "the server is shutting down" in str(results["plain"])
    assert isinstance(results["stream"], openai.APIError) and "the server is shutting down" in str(results["stream"])


def test_cors_lets_named_origins_call_the_api(run):
    """A web app on another origin (a dev server on another port) could not call the API: preflights got 405."""
    with pytest.raises(HomeLLMError, match="--cors localhost:5173: give origins as scheme://host"):
        serve(run, ServeConfig(port=0, cors=["localhost:5173"]))
    srv = Server(run, ServeConfig(port=0, max_batch=2, cors=["http://localhost:5173"]))
    try:
        def preflight(origin: str) -> tuple[int, str | None]:
            request = urllib.request.Request(srv.url + "/v1/chat/completions", method="OPTIONS", headers={
                "Origin": origin, "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type,x-stainless-os,x-stainless-lang"})
            try:
                with urllib.request.urlopen(request, timeout=60) as r:
                    return r.status, r.headers.get("access-control-allow-origin")
            except urllib.error.HTTPError as e:
                return e.code, e.headers.get("access-control-allow-origin")

        assert preflight("http://localhost:5173") == (200, "http://localhost:5173")
        assert preflight("http://elsewhere.example")[1] is None
        request = urllib.request.Request(srv.url + "/v1/models", headers={"Origin": "http://localhost:5173"})
        with urllib.request.urlopen(request, timeout=60) as r:
            assert r.headers["access-control-allow-origin"] == "http://localhost:5173"
            assert r.headers["access-control-expose-headers"].lower() == "retry-after, x-should-retry"
    finally:
        srv.close()
