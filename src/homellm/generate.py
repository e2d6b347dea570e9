"""Text generation: sampling (temperature, top-k, top-p, repetition penalty) or beam search over a KV cache, and
streamed text that never prints half a character or any part of a stop string.

    for piece in stream_text(model, tok, "Once upon a time", SampleConfig(max_new_tokens=100)):
        print(piece, end="", flush=True)
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import closing

import torch
import torch.nn.functional as F

from homellm.config import SPECIAL_TOKENS, SampleConfig
from homellm.errors import HomeLLMError
from homellm.model import GPT, KVCache
from homellm.tokenizer import Tokenizer, Utf8Guard


def seeded_generator(seed: int, device: torch.device | str, stream: int = 0) -> torch.Generator:
    """The generator for a seed (and stream: a reply's index among several): the two hashed together. torch's CPU
    generator keeps 32 bits of a seed, so seeds 2**32 apart gave one text; and seed + index for a request's several
    replies made reply 1 of seed s reply 0 of seed s + 1."""
    digest = hashlib.blake2b(f"{seed}/{stream}".encode(), digest_size=8).digest()
    return torch.Generator(device).manual_seed(int.from_bytes(digest, "big") >> 1)


def penalize(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty on logits (B, V) for the ids of each row's history (B, T): dividing a negative logit
    would raise it, so those are multiplied instead."""
    if penalty == 1.0 or not history.numel():
        return logits
    seen = logits.gather(1, history)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    # Kept finite: a tiny penalty (1e-45 is positive) made them inf, and the probabilities NaN.
    seen = seen.clamp(-torch.finfo(seen.dtype).max, torch.finfo(seen.dtype).max)
    return logits.scatter(1, history, seen)


def sample_next(logits: torch.Tensor, history: torch.Tensor, cfg: SampleConfig,
                generator: torch.Generator | None = None, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """logits (B, V) and the ids so far (B, T) -> the next id of each row (B,); `allowed` (B, V) bool, from
    Utf8Guard.mask, keeps the text valid UTF-8."""
    logits = penalize(logits.float(), history, cfg.repetition_penalty)
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    # Shifted so the largest is 0, and the temperature floored: a tiny one (1e-39 passes OpenAI's 0-2) made logits
    # of inf, then NaN probabilities, and the server's step failed every request sharing it. It samples as greedy.
    # And capped: one past float32's range (1e39) is inf, and a masked -inf over it NaN. 1e6 samples as uniformly.
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / min(max(cfg.temperature, 1e-6), 1e6)
    if 0 < cfg.top_k < logits.size(-1):
        kth = logits.topk(cfg.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token once the likelier ones already reach top_p (the smallest such set, as Hugging Face's); the
        # likeliest always stays, even at top_p 0.
        drop = probs.cumsum(dim=-1) - probs >= cfg.top_p
        drop[:, 0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def _prefill(model: GPT, ids: list[int], batch: int = 1, room: int | None = None) -> tuple[KVCache, torch.Tensor]:
    """A fresh cache holding `ids`, `batch` copies, with `room` positions more (default: up to the context), and the
    logits (batch, V) that follow them. Sized to what is asked: a cache of the whole context, allocated whole for
    each call, was hundreds of MB for a short reply of a model with a long one."""
    p = next(model.parameters())
    size = model.cfg.block_size if room is None else min(model.cfg.block_size, len(ids) + room)
    cache = KVCache(model.cfg, 1, size, p.device, p.dtype)
    logits, _ = model(torch.tensor([ids], device=p.device), cache=cache)
    if batch > 1:
        cache.reorder(torch.zeros(batch, dtype=torch.long, device=p.device))
    return cache, logits[:, -1].expand(batch, -1)


def window(ids: list[int], length: int, keep: int = 0) -> list[int]:
    """The last `length` ids, after the first `keep` (a chat's system prompt, which must not leave the context) when
    those take at most half of it; without them, simply the last `length`."""
    length = max(length, 1)
    if keep <= 0 or 2 * keep > length or len(ids) <= length:
        return ids[-length:]
    return ids[:keep] + ids[len(ids) - (length - keep):]


@torch.inference_mode()
def _extend(model: GPT, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Feed one new id per row, ids (B, 1) -> the next logits (B, V)."""
    logits, _ = model(ids, cache=cache)
    return logits[:, -1]


def generate_ids(model: GPT, prompt_ids: list[int], cfg: SampleConfig, stop_ids: Collection[int] = frozenset(),
                 generator: torch.Generator | None = None, guard: Utf8Guard | None = None, keep: int = 0
                 ) -> Iterator[int]:
    """Yield up to cfg.max_new_tokens ids after the prompt, ending before the first id in stop_ids; with a guard
    (the tokenizer's utf8_guard), only ids that keep the text valid UTF-8.

    A prompt longer than the context keeps its last block_size - 1 tokens. When the cache is full the window
    slides: the last block_size // 2 tokens are prefilled into a fresh cache, so generation can outrun the context.
    The first `keep` ids of the prompt (a chat's system prompt) stay at the start of every window, as llama.cpp's
    --keep does, when they take at most half of it.
    """
    if not prompt_ids:
        raise HomeLLMError("the prompt is empty: give at least one token (end of text starts a fresh document)")
    block = model.cfg.block_size
    tokens = window(list(prompt_ids), block - 1, keep)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # no dropout
    state = 0 if guard is None else guard.state(tokens)
    no_history = torch.empty(1, 0, dtype=torch.long, device=device)
    try:
        cache, logits = _prefill(model, tokens, room=cfg.max_new_tokens)  # (full only where it must slide)
        for i in range(cfg.max_new_tokens):
            if i:  # feed the previous token only now: the last one yielded needs no forward pass
                if cache.pos == block:
                    cache, logits = _prefill(model, window(tokens, block // 2, keep))
                else:
                    logits = _extend(model, torch.tensor([tokens[-1:]], device=device), cache)
            # The ids so far only matter to the repetition penalty: a tensor of them each step cost as much as the
            # step itself on long generations.
            # (the tokens in the window only, which the model reads: all of them made long generations quadratic)
            history = torch.tensor([tokens[-block:]], device=device) if cfg.repetition_penalty != 1.0 else no_history
            allowed = None if guard is None else guard.mask([state], device, logits.size(-1))
            token = int(sample_next(logits, history, cfg, generator, allowed))
            if token in stop_ids:
                return
            tokens.append(token)
            if guard is not None:
                state = guard.state([token], state)
            yield token
    finally:
        model.train(was_training)


@torch.inference_mode()
def beam_search(model: GPT, prompt_ids: list[int], num_beams: int, max_new_tokens: int,
                stop_ids: Collection[int] = frozenset(), length_penalty: float = 1.0,
                guard: Utf8Guard | None = None, repetition_penalty: float = 1.0, keep: int = 0,
                ends: Callable[[list[int]], bool] | None = None) -> list[int]:
    """The new ids (no prompt, no stop id) of the best hypothesis, scored sum(logprob) / length**length_penalty
    (above 1 favours longer ones). Deterministic. The context window slides as in `generate_ids`, so one beam is
    greedy decoding at any length; a guard keeps every beam valid UTF-8, and the repetition penalty applies to each
    beam's logits, as there. `keep` as there. `ends(ids)`: whether new ids hold a stop string; such a hypothesis
    ends there as one at a stop id does (its ids kept, the text to be cut at the stop)."""
    if not prompt_ids:
        raise HomeLLMError("the prompt is empty: give at least one token (end of text starts a fresh document)")
    block = model.cfg.block_size
    prompt = window(list(prompt_ids), block - 1, keep)
    steps = max_new_tokens
    if steps <= 0:
        return []
    device = next(model.parameters()).device
    stops = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    try:
        cache, logits = _prefill(model, prompt, num_beams, room=steps)
        # Only beam 0 is alive at first, or the first step would pick the same token num_beams times.
        scores = torch.full((num_beams,), float("-inf"), device=device)
        scores[0] = 0.0
        seqs = torch.empty(num_beams, 0, dtype=torch.long, device=device)
        states = [0 if guard is None else guard.state(prompt)] * num_beams  # each beam's place in a character
        finished: list[tuple[float, list[int]]] = []  # (normalised score, ids)
        for step in range(steps):
            if step and cache.pos == block:  # every beam has the same length: refill them all as one batch
                context = torch.cat([torch.tensor([prompt], device=device).expand(num_beams, -1), seqs], dim=1)
                cache = KVCache(model.cfg, num_beams, block, device, next(model.parameters()).dtype)
                cols = torch.tensor(window(list(range(context.size(1))), block // 2, keep), device=device)
                logits = model(context[:, cols], cache=cache)[0][:, -1]
            elif step:
                logits = _extend(model, seqs[:, -1:], cache)
            logits = logits.float()
            if repetition_penalty != 1.0:  # each beam's own history in the window: the prompt and its tokens so far
                history = torch.cat([torch.tensor([prompt], device=device).expand(num_beams, -1), seqs], dim=1)
                history = history[:, -block:]
                logits = penalize(logits, history, repetition_penalty)
            total = scores[:, None] + F.log_softmax(logits, dim=-1)  # (num_beams, V)
            if guard is not None:
                total = total.masked_fill(~guard.mask(states, device, total.size(-1)), float("-inf"))
            vocab, length = total.size(-1), (step + 1) ** length_penalty
            # A stop id among the num_beams best candidates ends a hypothesis; its logprob counts in the score.
            best, flat = total.flatten().topk(num_beams)
            finished += [(s / length, seqs[j // vocab].tolist()) for s, j in zip(best.tolist(), flat.tolist())
                         if j % vocab in stop_ids and s > float("-inf")]
            # The num_beams best candidates that are not stops go on.
            going = total.index_fill(1, stops, float("-inf")).flatten()
            if ends is None:
                scores, flat = going.topk(num_beams)
            else:  # (a stop string found once the search ended cut text never scored as ending there)
                scores, flat = _end_at_stop_strings(going, seqs, vocab, ends, best[-1].item(), length, finished)
            beam = flat // vocab
            seqs = torch.cat([seqs[beam], (flat % vocab)[:, None]], dim=1)  # (num_beams, step + 1)
            if guard is not None:
                states = [guard.state([t], states[b]) if score > float("-inf") else 0  # a dead beam's id is no token
                          for b, t, score in zip(beam.tolist(), seqs[:, -1].tolist(), scores.tolist())]
            cache.reorder(beam)
            if scores[0] == float("-inf"):
                break  # every continuation was a stop
            # Hugging Face's heuristic: stop once the best live beam, scored as if it ended now, loses to
            # num_beams finished ones (exact only for length_penalty 0, where scores can only fall).
            worst_kept = sorted(s for s, _ in finished)[-num_beams] if len(finished) >= num_beams else None
            if worst_kept is not None and scores[0].item() / length < worst_kept:
                break
        finished += [(s / seqs.size(1) ** length_penalty, seq) for s, seq in zip(scores.tolist(), seqs.tolist())
                     if s > float("-inf")]
        return max(finished, key=lambda h: h[0], default=(0.0, []))[1]
    finally:
        model.train(was_training)


def _end_at_stop_strings(going: torch.Tensor, seqs: torch.Tensor, vocab: int, ends: Callable[[list[int]], bool],
                         cutoff: float, length: float, finished: list[tuple[float, list[int]]]
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Of the candidates `going` (every beam's scores, flattened), the num_beams best whose text holds no stop
    string; one that holds one is a finished hypothesis where it is among the num_beams best of all (score at least
    `cutoff`), as a stop id is. Many tokens may hold a stop ("\n", ".\n", "\n\n"): candidates are read further down
    until num_beams are alive, or none is left (the rest then dead, -inf)."""
    beams = seqs.size(0)
    rows = seqs.tolist()  # (read from the device once a step, not once a candidate)
    alive: list[tuple[float, int]] = []
    for s, j in _best_first(going, 2 * beams):
        ids = rows[j // vocab] + [j % vocab]
        if not ends(ids):
            alive.append((s, j))
            if len(alive) == beams:
                break
        elif s >= cutoff:
            finished.append((s / length, ids))
    alive += [(float("-inf"), 0)] * (beams - len(alive))
    return (torch.tensor([s for s, _ in alive], device=going.device),
            torch.tensor([j for _, j in alive], device=going.device))


def _best_first(scores: torch.Tensor, first: int) -> Iterator[tuple[float, int]]:
    """(score, index) of a 1-d tensor's entries, best first, until the first -inf; read by topk in blocks growing
    from `first`, as a caller usually needs only a few."""
    done, k = 0, first
    while done < scores.numel():
        values, indices = scores.topk(min(k, scores.numel()))
        for s, j in zip(values.tolist()[done:], indices.tolist()[done:]):
            if s == float("-inf"):
                return
            yield s, j
        done, k = values.numel(), 4 * k


def _cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """Text before the first stop string, and whether there was one."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[:min(hits)], True) if hits else (text, False)


def _stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that begins some stop string: it may yet become one, so hold it."""
    longest = max((len(s) for s in stops), default=1) - 1
    for n in range(min(len(text), longest), 0, -1):
        if any(s.startswith(text[-n:]) for s in stops):
            return n
    return 0


class TextStream:
    """Generated ids in, printable text out: whole characters only, and never a stop string or what follows it.
    Text that may be the start of a stop string is held back until the next id settles it.

        text = TextStream(tok, ["\n\n"], prompt_ids)
        piece = text.push(token)      # "" while held; text.stopped once a stop string appeared
        tail = text.flush()           # at the end: what was held, minus any stop string
    """

    def __init__(self, tok: Tokenizer, stops: list[str], prompt: Sequence[int] = ()):
        self.decoder = tok.stream(skip_special=True, context=prompt)
        self.guarded = tok.utf8_guard.needed
        # A special token as a stop ("<|im_start|>") is one id, never seen as text: special tokens decode to "".
        special = {s: tok.hf.token_to_id(s) for s in stops if s in SPECIAL_TOKENS}
        self.stop_ids = {i for i in special.values() if i is not None}
        self.stops = [s for s in stops if s and s not in special]
        self.pending = ""  # decoded, not yet emitted
        self.stopped = False
        self._tok = tok

    def holds_stop(self, ids: list[int]) -> bool:
        """Whether the text of these new ids holds a stop string (beam search's test of a hypothesis, extended by one
        id at a time: only its last ids are decoded, enough for the longest stop even of 4-byte characters)."""
        n = 4 * max(map(len, self.stops), default=0) + 4  # (4 more: a space a decoder drops at a text's start)
        text = self._tok.decode(ids[-n:], skip_special=True)
        return any(stop in text for stop in self.stops)

    def push(self, token: int) -> str:
        if token in self.stop_ids:
            text = self.flush()
            self.stopped = True
            return text
        text, self.stopped = _cut_at_stop(self.pending + self.decoder.push(token), self.stops)
        ready = len(text) if self.stopped else len(text) - _stop_prefix_len(text, self.stops)
        self.pending = text[ready:]
        return text[:ready]

    def flush(self) -> str:
        text, self.stopped = _cut_at_stop(self.pending + self.decoder.flush(), self.stops)
        self.pending = ""
        # Guarded sampling leaves a U+FFFD only where max_new_tokens cut a character short: drop it.
        return text.rstrip("\ufffd") if self.guarded else text


def stream_text(model: GPT, tok: Tokenizer, prompt: str, cfg: SampleConfig,
                stats: dict[str, float] | None = None) -> Iterator[str]:
    """Yield the generated text piece by piece: never half a character, never a stop string or what follows it.

    Special tokens in the prompt are honoured (chat markup); generation ends at end of text, <|im_end|> or
    <|im_start|>. With cfg.num_beams > 1 the beam search result comes as one piece. `stats`, if given, is filled at
    the end with prompt_tokens, new_tokens, seconds and tok_per_s."""
    ids = tok.encode_prompt(prompt)
    yield from stream_ids(model, tok, ids, cfg, stats)


def check_beams(cfg: SampleConfig, tok: Tokenizer) -> None:
    """--num-beams no larger than the tokens to choose from (the CLI checks it before it prints anything)."""
    if cfg.num_beams > tok.vocab_size:
        raise HomeLLMError(f"--num-beams {cfg.num_beams} is more than the {tok.vocab_size} tokens the model can choose "
                           "from: use fewer beams (4 is common)")


def continuation_prompt(tok: Tokenizer, prompt: str, block: int) -> tuple[str, list[int], list[str]]:
    """A prompt to continue (generate's, one at a time or typed in turn) as the model reads it, full-width digits
    folded to its own; its ids; and notes on what the model cannot read of it: characters the tokenizer cannot
    write, and tokens beyond its context."""
    prompt = tok.fold(prompt)
    ids = tok.encode_prompt(prompt)
    notes = [note] if (note := tok.unknown_note(prompt, allow_special=True)) else []
    if len(ids) > block - 1:
        notes.append(f"the prompt is {len(ids)} tokens and the model's context {block}: it reads the last {block - 1}")
    return prompt, ids, notes


def stream_ids(model: GPT, tok: Tokenizer, ids: list[int], cfg: SampleConfig, stats: dict[str, float] | None = None,
               generator: torch.Generator | None = None, keep: int = 0) -> Iterator[str]:
    """stream_text for a prompt already in ids (a chat rendered by homellm.chat). `generator` carries the random
    state across calls (a chat's turns); by default a fresh one seeded with cfg.seed. The first `keep` ids stay in
    the context when the window slides (generate_ids)."""
    check_beams(cfg, tok)
    stream = TextStream(tok, cfg.stop, ids)
    if tok.bos_id is not None and ids[:1] == [tok.bos_id]:
        keep = max(keep, 1)  # a model trained after a bos reads every window after it too (llama.cpp keeps it)
    stop_ids = tok.end_ids | stream.stop_ids
    start, new, ended = time.perf_counter(), 0, False
    try:
        if cfg.num_beams > 1:
            out = beam_search(model, ids, cfg.num_beams, cfg.max_new_tokens, stop_ids, guard=tok.utf8_guard,
                              repetition_penalty=cfg.repetition_penalty, keep=keep,
                              ends=stream.holds_stop if stream.stops else None)
            new = len(out)
            text, cut = _cut_at_stop(stream.decoder.push_all(out), stream.stops)
            ended = not cut and new < cfg.max_new_tokens
            if stream.guarded:
                text = text.rstrip("\ufffd")  # a character max_new_tokens cut short
            if text:
                yield text
            return
        if generator is None:
            generator = seeded_generator(cfg.seed, next(model.parameters()).device)
        with closing(generate_ids(model, ids, cfg, stop_ids, generator, tok.utf8_guard, keep)) as gen:
            for token in gen:
                new += 1
                text = stream.push(token)
                if text:
                    yield text
                if stream.stopped:
                    return
        ended = new < cfg.max_new_tokens  # no stop string, nor the length: the model chose an end (or a --stop) token
        text = stream.flush()
        if text:
            yield text
    finally:
        if stats is not None:
            seconds = time.perf_counter() - start
            stats.update(prompt_tokens=len(ids), new_tokens=new, seconds=seconds, ended=ended,
                         tok_per_s=new / seconds if seconds > 0 else 0.0)
