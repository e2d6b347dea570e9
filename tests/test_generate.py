"""Generation invariants on tiny CPU models: the cached loop equals a full recompute (past the context too),
sampling filters keep what they promise, beam search finds likelier text than greedy, and streamed text equals the
decoded ids cut at the stop string, with no half characters."""

import codecs
import copy
import dataclasses
import itertools

import pytest
import torch

from homellm.config import ModelConfig, SampleConfig, TokenizerConfig
from homellm.errors import HomeLLMError
from homellm.generate import (
    TextStream,
    beam_search,
    generate_ids,
    sample_next,
    seeded_generator,
    stream_ids,
    stream_text,
    window,
)
from homellm.model import GPT
from homellm.tokenizer import Tokenizer, train_tokenizer
from homellm.train import sample_text

FAMILIES = ["gpt2", "llama"]
GREEDY = SampleConfig(temperature=0.0, max_new_tokens=70)
# Our own text (no corpus needed): kana and kanji are 3 UTF-8 bytes, so a 300-token BPE splits many of them.
JA = ("むかしむかし、ある山のふもとに小さな村がありました。村には川が流れていて、春になると桜の花がたくさん咲きました。"
      "子どもたちは毎日川で遊び、夕方になると家に帰って晩ごはんを食べました。")
EN = "The quick brown fox jumps over the lazy dog. A small village sat at the foot of a mountain.\n"


def tiny(family: str, vocab: int = 64) -> GPT:
    # Untied: a random tied model's likeliest next token is the last one, and a run of one token tests little.
    torch.manual_seed(0)
    cfg = ModelConfig(family=family, vocab_size=vocab, n_layer=2, n_head=2, n_embd=32, block_size=32,
                      tie_embeddings=False)
    return GPT(cfg).eval()


def naive_greedy(model: GPT, prompt: list[int], n: int, keep: int = 0) -> list[int]:
    """Full forward every step; the same window rule: past block_size tokens, keep the last block_size // 2
    (after the first `keep`, which stay)."""
    block = model.cfg.block_size
    ctx, out = prompt[:keep] + prompt[keep:][-(block - 1 - keep):], []
    with torch.no_grad():
        for _ in range(n):
            if len(ctx) > block:
                ctx = ctx[:keep] + ctx[keep:][-(block // 2 - keep):]
            token = int(model(torch.tensor([ctx]))[0][0, -1].argmax())
            out.append(token)
            ctx = ctx + [token]
    return out


def logprob(model: GPT, prompt: list[int], new: list[int]) -> float:
    with torch.no_grad():
        logp = model(torch.tensor([prompt + new]))[0][0].log_softmax(-1)
    return sum(logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(new))


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_with_cache_equals_full_recompute_past_the_context(family):
    model = tiny(family)
    prompt = torch.randint(0, 64, (5,), generator=torch.Generator().manual_seed(1)).tolist()
    out = list(generate_ids(model, prompt, GREEDY))
    assert len(out) == GREEDY.max_new_tokens  # 5 + 70 tokens: the window slides several times
    assert out == naive_greedy(model, prompt, GREEDY.max_new_tokens)
    long_prompt = torch.randint(0, 64, (45,), generator=torch.Generator().manual_seed(2)).tolist()
    assert list(generate_ids(model, long_prompt, GREEDY)) == naive_greedy(model, long_prompt, 70)


def test_a_short_reply_allocates_a_cache_for_itself_not_the_whole_context(monkeypatch):
    import homellm.generate as module

    sizes = []

    class Recorded(module.KVCache):
        def __init__(self, cfg, batch_size, max_len, *args):
            sizes.append((batch_size, max_len))
            super().__init__(cfg, batch_size, max_len, *args)

    monkeypatch.setattr(module, "KVCache", Recorded)
    model, prompt = tiny("llama"), [1, 2, 3, 4, 5]
    short = dataclasses.replace(GREEDY, max_new_tokens=4)
    assert list(generate_ids(model, prompt, short)) == naive_greedy(model, prompt, 4)
    assert beam_search(model, prompt, 3, 4) == beam_search(model, prompt, 3, 4)
    assert sizes == [(1, 9), (1, 9), (1, 9)]  # prompt + reply (the beams share one prefill, then are copied)
    sizes.clear()
    assert list(generate_ids(model, prompt, GREEDY)) == naive_greedy(model, prompt, 70)  # past the context: whole
    assert sizes[0] == (1, model.cfg.block_size)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_kept_prefix_stays_in_every_window(family):
    model = tiny(family)  # block_size 32: a slide keeps 16 tokens, of which the first 5 of the prompt
    windows: list[list[int]] = []  # the ids of every forward pass that starts a fresh cache
    def fresh_cache(module, args, kwargs):
        if kwargs.get("cache") is not None and kwargs["cache"].pos == 0:
            windows.append(args[0][0].tolist())

    model.register_forward_pre_hook(fresh_cache, with_kwargs=True)
    for prompt in (list(range(5, 12)), list(range(1, 50))):  # short, and longer than the context
        windows.clear()
        out = list(generate_ids(model, prompt, GREEDY, keep=5))
        assert len(windows) > 3 and all(w[:5] == prompt[:5] for w in windows)
        assert out == naive_greedy(model, prompt, GREEDY.max_new_tokens, keep=5)
        windows.clear()
        assert beam_search(model, prompt, 1, GREEDY.max_new_tokens, keep=5) == out
        assert len(windows) > 3 and all(w[:5] == prompt[:5] for w in windows)
    assert window(list(range(10)), 4, keep=2) == [0, 1, 8, 9]
    assert window(list(range(10)), 4, keep=3) == [6, 7, 8, 9]  # over half of the window: not kept
    assert window(list(range(3)), 4, keep=2) == [0, 1, 2]


def test_stops_before_a_stop_id_and_keeps_max_new_tokens():
    model = tiny("llama")
    out = list(generate_ids(model, [1, 2, 3], GREEDY))
    k = next(i for i, t in enumerate(out) if t not in out[:i] and i >= 3)  # first occurrence of its id
    assert list(generate_ids(model, [1, 2, 3], GREEDY, stop_ids={out[k]})) == out[:k]
    cfg = SampleConfig(temperature=1.0, max_new_tokens=7)
    assert len(list(generate_ids(model, [1], cfg, generator=torch.Generator().manual_seed(0)))) == 7
    assert list(generate_ids(model, [1], SampleConfig(max_new_tokens=0))) == []


def test_model_mode_is_restored_and_inference_mode_never_leaks_to_the_caller():
    model = tiny("gpt2").train()
    for _ in generate_ids(model, [1], SampleConfig(max_new_tokens=3)):
        assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()  # the caller may train between
    beam_search(model, [1], 2, 2)
    assert model.training


def sample(model: GPT, cfg: SampleConfig, seed: int) -> list[int]:
    return list(generate_ids(model, [1, 2, 3], cfg, generator=torch.Generator().manual_seed(seed)))


def test_sampling_is_seeded_and_filters_reduce_to_greedy():
    model = tiny("llama")
    cfg = SampleConfig(temperature=1.0, max_new_tokens=30)
    assert sample(model, cfg, 0) == sample(model, cfg, 0)
    assert sample(model, cfg, 0) != sample(model, cfg, 1)
    greedy = list(generate_ids(model, [1, 2, 3], SampleConfig(temperature=0.0, max_new_tokens=30)))
    assert sample(model, SampleConfig(temperature=1.0, top_k=1, max_new_tokens=30), 0) == greedy
    assert sample(model, SampleConfig(temperature=1.0, top_p=1e-6, max_new_tokens=30), 0) == greedy
    # Seeds 2**32 apart gave one text (torch's CPU generator keeps 32 bits of a seed); and a request's reply 1 of
    # seed s was reply 0 of seed s + 1. Hashed, seeds and replies draw independently.
    def first_draws(seed: int, stream: int = 0) -> list[float]:
        return torch.rand(8, generator=seeded_generator(seed, "cpu", stream)).tolist()

    assert first_draws(5) == first_draws(5) != first_draws(5 + 2**32) and first_draws(5, 1) != first_draws(6, 0)
    # A tiny temperature (OpenAI's range allows 1e-39) made logits of inf and NaN probabilities: now greedy.
    for temperature in (1e-39, 1e-300):
        assert sample(model, SampleConfig(temperature=temperature, max_new_tokens=30), 0) == greedy
    # A huge one (1e39 is inf in float32) over a masked id (the UTF-8 guard's, say) made NaN: now uniform.
    rows, allowed = torch.tensor([[0.0, 5.0, 9.0, 1.0]]).expand(3000, -1), torch.tensor([[True] * 3 + [False]])
    got = sample_next(rows, torch.zeros(3000, 0, dtype=torch.long), SampleConfig(temperature=1e39),
                      torch.Generator().manual_seed(0), allowed.expand(3000, -1))
    assert got.max() == 2 and got.bincount().min() > 900


def draws(logits: list[float], n: int = 4000, history: list[int] | None = None, **cfg) -> torch.Tensor:
    """n samples from one row of logits, as a (n,) tensor of ids."""
    rows = torch.tensor([logits]).expand(n, -1)
    hist = torch.tensor([history or []], dtype=torch.long).expand(n, -1)
    return sample_next(rows, hist, SampleConfig(**cfg), torch.Generator().manual_seed(0))


def test_top_k_and_top_p_keep_exactly_their_sets():
    logits = [0.1, 2.0, -1.0, 1.5, 1.9, 0.0]
    assert set(draws(logits, temperature=2.0, top_k=3).tolist()) == {1, 3, 4}
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.7 keeps the first two (0.5 < 0.7 <= 0.8)
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3]).log().tolist()
    assert set(draws(probs, temperature=1.0, top_p=0.7).tolist()) == {1, 3}
    assert set(draws(probs, temperature=1.0, top_p=0.0).tolist()) == {1}
    assert set(draws(probs, temperature=1.0).tolist()) == {0, 1, 2, 3}
    assert draws(logits, n=2, temperature=0.0).tolist() == [1, 1]


def test_repetition_penalty_lowers_repeated_tokens():
    logits = [2.0, 1.5, -1.0, -1.2]
    # CTRL: 2.0 / 2 = 1.0 < 1.5, and -1.0 * 2 = -2.0 < -1.2
    assert draws(logits, n=1, history=[0, 2, 0], temperature=0.0, repetition_penalty=2.0).tolist() == [1]
    plain = torch.bincount(draws(logits, temperature=1.0), minlength=4)
    penalised = torch.bincount(draws(logits, history=[0, 2], temperature=1.0, repetition_penalty=2.0), minlength=4)
    assert penalised[0] < plain[0] - 300 and penalised[2] < plain[2]
    assert penalised[1] > plain[1] and penalised[3] > plain[3]


@pytest.mark.parametrize("family", FAMILIES)
def test_beam_search_one_beam_is_greedy_and_more_beams_are_likelier(family):
    model = tiny(family)
    prompt = [5, 9, 12]
    greedy = list(generate_ids(model, prompt, SampleConfig(temperature=0.0, max_new_tokens=12)))
    assert beam_search(model, prompt, 1, 12) == greedy
    beams = beam_search(model, prompt, 4, 12)
    assert len(beams) == 12
    # likelier than greedy, not the greedy answer again (measured: 0.07 and 0.22 nats more)
    assert beams != greedy and logprob(model, prompt, beams) > logprob(model, prompt, greedy) + 0.02


@pytest.mark.parametrize("family", FAMILIES)
def test_beam_search_with_every_continuation_kept_is_exact(family):
    """With vocab**2 beams, three steps see every 3-token continuation, so the likeliest must win; and the cache
    must follow each beam's own history, since beams are reordered every step."""
    model = tiny(family, vocab=8)
    with torch.no_grad():  # larger weights than at init: attention matters, so a stale history changes the answer
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.1)
    every = torch.cartesian_prod(*[torch.arange(8)] * 3)  # (512, 3)
    for prompt in ([3, 1, 4], [1, 5, 2], [6, 0, 2, 2]):
        idx = torch.cat([torch.tensor([prompt]).expand(512, -1), every], dim=1)
        with torch.no_grad():
            logp = model(idx)[0].log_softmax(-1)[:, len(prompt) - 1:-1]  # (512, 3, vocab)
        total = logp.gather(2, every[:, :, None]).sum(dim=(1, 2))
        assert beam_search(model, prompt, 64, 3) == every[total.argmax()].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_beam_search_slides_past_the_context_as_sampling_does_and_stops(family):
    model = tiny(family)  # block_size 32
    for prompt in ([1, 2, 3], list(range(30)), list(range(60))):  # a long prompt keeps its last 31 tokens
        greedy = list(generate_ids(model, prompt, SampleConfig(temperature=0.0, max_new_tokens=50)))
        assert beam_search(model, prompt, 1, 50) == greedy and len(greedy) == 50
        assert len(beam_search(model, prompt, 3, 50)) == 50
    assert beam_search(model, [1, 2], 3, 10, stop_ids=set(range(64))) == []
    out = beam_search(model, [1, 2], 3, 10, stop_ids={7, 8, 9})
    assert not {7, 8, 9} & set(out)


@pytest.mark.parametrize("family", FAMILIES)
def test_beam_search_ends_at_a_stop_string_as_at_a_stop_id(family):
    """A hypothesis whose text holds a stop string ends there, scored as one ending at a stop id (whose id is not
    returned). Here half or three quarters of the tokens hold one: reading only 2 x num_beams candidates left beams
    dead, and the search lost the likelier answer."""
    model = tiny(family)
    for share, length_penalty, prompt in itertools.product((2, 4), (1.0, 2.0), ([1, 2], [5, 9, 12], [63, 1])):
        holding = {i for i in range(64) if i % share}  # (2.0 favours long answers, which a dead beam lost)
        by_id = beam_search(model, prompt, 3, 10, stop_ids=holding, length_penalty=length_penalty)
        by_text = beam_search(model, prompt, 3, 10, ends=lambda ids, held=holding: ids[-1] in held,
                              length_penalty=length_penalty)
        assert by_text[:-1] == by_id and by_text[-1] in holding if len(by_text) > len(by_id) else by_text == by_id


# ---- streamed text ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    root = tmp_path_factory.mktemp("tok")
    corpus = root / "corpus.txt"
    corpus.write_text((JA + "\n" + EN) * 3, encoding="utf-8")
    return train_tokenizer(TokenizerConfig(input=[str(corpus)], out=str(root / "tok"), vocab_size=300))


@pytest.fixture(scope="module")
def story(tok) -> tuple[GPT, str, str]:
    """A tiny model overfit on one Japanese sentence and its end of text: (model, prompt, the rest of it)."""
    prompt, rest = JA[:6], JA[6:26]
    ids = tok.encode(prompt) + tok.encode(rest) + [tok.eot_id]
    assert len(ids) <= 64
    torch.manual_seed(0)
    model = GPT(ModelConfig(family="llama", vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32, block_size=64))
    x = torch.tensor([ids])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(200):
        _, loss = model(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    return model.eval(), prompt, rest


def test_japanese_streams_whole_characters_and_stops_at_end_of_text(tok, story):
    model, prompt, rest = story
    # the test means something only if some generated token is part of a character
    assert any("\ufffd" in tok.decode([i]) for i in tok.encode(rest))
    stats: dict = {}
    pieces = list(stream_text(model, tok, prompt, SampleConfig(temperature=0.0, max_new_tokens=100), stats))
    assert "".join(pieces) == rest
    assert len(pieces) > 1 and all(p and "\ufffd" not in p for p in pieces)
    assert stats["new_tokens"] == len(tok.encode(rest)) and stats["prompt_tokens"] == len(tok.encode(prompt))
    assert stats["tok_per_s"] > 0 and stats["ended"]  # by the model's end of text, before max_new_tokens
    cut = SampleConfig(temperature=0.0, max_new_tokens=len(tok.encode(rest)))
    assert "".join(stream_text(model, tok, prompt, cut, stats)) == rest and not stats["ended"]  # by the length
    beam = list(stream_text(model, tok, prompt, SampleConfig(num_beams=3, max_new_tokens=100), stats))
    assert beam == [rest] and stats["ended"]


def test_generate_says_when_the_model_ended_the_text(tok, story, monkeypatch, capsys):
    """"[0 tokens in 0.01 s, 0.0 tokens/s]" after the prompt, and nothing else, looked like a broken model: the model
    had chosen end of text first (review). Now the line says so; a text cut by --max-new-tokens is not ended."""
    import homellm.checkpoint
    import homellm.tokenizer
    from homellm.cli import main

    model, prompt, rest = story
    monkeypatch.setattr(homellm.checkpoint, "load_for_generation", lambda run, cfg: model)
    monkeypatch.setattr(homellm.tokenizer.Tokenizer, "load", classmethod(lambda cls, run: tok))
    monkeypatch.setattr(homellm.checkpoint, "speaks_chatml", lambda run: False)
    n = len(tok.encode(rest))
    for argv, said in ((["--max-new-tokens", "100"], "; the model ended the text (it chose an end token) before "
                                                       "--max-new-tokens 100]"),
                       (["--max-new-tokens", str(n)], " tokens/s]"),
                       (["--max-new-tokens", "100", "--num-samples", "2", "--temperature", "0.01"],
                        "; the model ended 2 of the 2 texts (it chose an end token) before --max-new-tokens 100]")):
        assert main(["generate", "RUN", "--prompt", prompt, *argv]) == 0
        out, err = capsys.readouterr()
        assert rest in out and err.startswith(f"[{'2 samples, ' * ('2' in argv)}") and err.endswith(said + "\n"), err


def test_bfloat16_weights_and_cache_generate_the_memorised_text(tok, story):
    """The weights as a GPU loads them for generation (bfloat16, and the KV cache with them): the overfit
    continuation comes out whole, greedy and by beam search, and a half-written character is still never shown."""
    model, prompt, rest = story
    half = copy.deepcopy(model).to(torch.bfloat16)
    pieces = list(stream_text(half, tok, prompt, SampleConfig(temperature=0.0, max_new_tokens=100)))
    assert "".join(pieces) == rest and all("\ufffd" not in p for p in pieces)
    assert "".join(stream_text(half, tok, prompt, SampleConfig(num_beams=3, max_new_tokens=100))) == rest
    sampled = "".join(stream_text(half, tok, prompt, SampleConfig(temperature=1.0, top_p=0.9, seed=3,
                                                                  max_new_tokens=40)))
    assert "\ufffd" not in sampled


@pytest.mark.parametrize("stop", [["川"], ["川が流"], ["川で泳", "花が"], ["川で泳"], ["山の"], ["村が", "ふも"]])
@pytest.mark.parametrize("num_beams", [1, 2])
def test_stop_strings_cut_the_text_and_never_show(tok, story, stop, num_beams):
    model, prompt, rest = story
    cfg = SampleConfig(temperature=0.0, max_new_tokens=100, stop=stop, num_beams=num_beams)
    out = "".join(stream_text(model, tok, prompt, cfg))
    hits = [rest.find(s) for s in stop if s in rest]
    assert out == rest[:min(hits, default=len(rest))]  # "川で泳" never occurs: its held-back "川で" is released
    assert not any(s in out for s in stop)
    # Beam search ends a hypothesis at a stop string, as sampling does: it searched to the end of the text (or
    # --max-new-tokens) and only then cut it, text that was never scored as ending there.
    stats: dict = {}
    list(stream_text(model, tok, prompt, cfg, stats))
    whole = len(tok.encode(rest))  # up to the end of text's id, which is not counted
    assert stats["new_tokens"] < whole if hits else stats["new_tokens"] == whole


def test_training_samples_end_after_their_stop_string(tok, story):
    model, prompt, rest = story
    assert sample_text(model, tok, prompt) == prompt + rest
    assert sample_text(model, tok, prompt, stop="村") == prompt + rest[:rest.index("村") + 1]
    assert sample_text(model, tok, prompt, stop="$") == prompt + rest  # never generated: nothing to cut


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_sampled_text_is_always_valid_utf8(tok, temperature):
    """An untrained byte-level model samples tokens that end mid-character and others that do not go on with them:
    unguarded, the text is full of U+FFFD; the tokenizer's Utf8Guard keeps every sample valid UTF-8."""
    model = tiny("gpt2", vocab=tok.vocab_size)
    guard = tok.utf8_guard
    assert guard is not None
    broken = 0
    for seed in range(8):
        cfg = SampleConfig(temperature=temperature, max_new_tokens=40, seed=seed)
        prompt = tok.encode(f"日本語 {seed}")
        for use in (None, guard):
            ids = list(generate_ids(model, prompt, cfg, {tok.eot_id}, torch.Generator().manual_seed(seed), use))
            if use is None:
                broken += "\ufffd" in tok.decode(ids)
                continue
            # Valid UTF-8 throughout (this raises otherwise), but for a last character max_new_tokens cut short.
            codecs.getincrementaldecoder("utf-8")().decode(b"".join(token_bytes(tok, i) for i in ids), final=False)
            streamed = "".join(stream_ids(model, tok, prompt, cfg))
            assert "\ufffd" not in tok.decode(ids).rstrip("\ufffd") and "\ufffd" not in streamed  # (cut dropped)
            if temperature == 0:  # beam search keeps to the same rule: one beam is guarded greedy decoding
                assert beam_search(model, prompt, 1, 40, {tok.eot_id}, guard=guard) == ids
                beams = beam_search(model, prompt, 3, 40, {tok.eot_id}, guard=guard)
                codecs.getincrementaldecoder("utf-8")().decode(b"".join(token_bytes(tok, i) for i in beams))
    assert broken  # the unguarded samples were not


def token_bytes(tok: Tokenizer, i: int) -> bytes:
    """The bytes a byte-level BPE token writes (special tokens write none)."""
    from homellm.tokenizer import _byte_alphabet

    back = {c: b for b, c in _byte_alphabet().items()}
    token = tok.hf.id_to_token(i)
    special = (tok.eot_id, tok.im_start_id, tok.im_end_id, tok.pad_id)
    return b"" if token is None or i in special else bytes(back[c] for c in token)


def test_stream_equals_decoded_ids_cut_at_stop_on_random_text(tok):
    """An untrained model samples arbitrary tokens: the pieces still add up to the decoded ids, cut at the stop."""
    model = tiny("gpt2", vocab=tok.vocab_size)
    cfg = SampleConfig(temperature=1.0, max_new_tokens=60, seed=3)
    prompt = "<|im_start|>user\nhello<|im_end|>"
    ids = list(generate_ids(model, tok.encode(prompt, allow_special=True), cfg, {tok.eot_id, tok.im_end_id},
                            seeded_generator(cfg.seed, "cpu"), tok.utf8_guard))
    full = tok.decode(ids, skip_special=True)
    assert len(full) > 10
    pieces = list(stream_text(model, tok, prompt, cfg))
    assert "".join(pieces) == full and len(pieces) > 1
    stop = full[len(full) // 2:len(full) // 2 + 2]
    cut = "".join(stream_text(model, tok, prompt, SampleConfig(temperature=1.0, max_new_tokens=60, seed=3,
                                                                stop=[stop])))
    assert cut == full[:full.find(stop)] and stop not in cut


def test_a_special_token_as_a_stop_ends_the_text(tok):
    """Special tokens decode to nothing, so as text they could never match: "<|im_start|>" stops as its id."""
    ids = tok.encode("hello there<|im_start|>user\nmore", allow_special=True)
    stream = TextStream(tok, ["<|im_start|>"])
    text = "".join(stream.push(i) for i in ids if not stream.stopped)
    assert stream.stopped and text + stream.flush() == "hello there"
    plain = TextStream(tok, [])
    assert "".join(plain.push(i) for i in ids) + plain.flush() == "hello thereuser\nmore"


def test_a_sentencepiece_style_decoder_keeps_the_space_before_the_first_new_word(tmp_path):
    """Llama's decoder strips the space a text's first token starts with ("▁they" alone is "they"): streamed or
    beam-searched, the first new word lost its space after the prompt ("...is thethey"). The stream now starts
    with the end of the prompt as context, so the new text is exactly decode(prompt + new) after decode(prompt)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from homellm.tokenizer import import_tokenizer

    hf = HFTokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Metaspace()
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    hf.train_from_iterator([EN * 20], trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>"]))
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = import_tokenizer(tmp_path / "tokenizer.json")
    model = tiny("llama", vocab=tok.vocab_size + 8)
    prompt = "The quick brown fox"
    ids = tok.encode(prompt)
    stops, spaced = {tok.eot_id, tok.im_end_id, tok.im_start_id}, 0
    for cfg in [SampleConfig(temperature=1.0, max_new_tokens=12, seed=seed) for seed in range(12)] + [
            SampleConfig(num_beams=2, max_new_tokens=12)]:
        new = (beam_search(model, ids, 2, 12, stops, guard=tok.utf8_guard) if cfg.num_beams > 1 else
               list(generate_ids(model, ids, cfg, stops, seeded_generator(cfg.seed, "cpu"), tok.utf8_guard)))
        whole = tok.decode(ids + new, skip_special=True)
        assert whole.startswith(prompt)
        assert "".join(stream_ids(model, tok, ids, cfg)) == whole[len(prompt):]
        spaced += whole[len(prompt):].startswith(" ")
    assert spaced  # some replies began a new word: the case the old stream got wrong


def test_the_padded_ids_past_the_tokenizer_are_never_chosen(tmp_path):
    """The model's vocabulary is padded to a multiple of 64. Tokenizers whose tokens are whole characters (char,
    most imported ones) had no guard, so an untrained model sampled those ids, which are no text; greedy evaluation
    could pick them too."""
    corpus = tmp_path / "text.txt"
    corpus.write_text(EN * 3, encoding="utf-8")
    tok = train_tokenizer(TokenizerConfig(input=[str(corpus)], out=str(tmp_path / "char"), kind="char"))
    assert not tok.utf8_guard.needed  # whole characters: the case that had no guard at all
    model = tiny("gpt2", vocab=tok.vocab_size + 40)
    with torch.no_grad():  # make the padded ids the likeliest, so the test cannot pass by chance
        model.lm_head.weight[tok.vocab_size:] = model.lm_head.weight[:40] * 4
    cfg = SampleConfig(temperature=1.0, max_new_tokens=200, seed=0)
    prompt = tok.encode(EN)
    ids = list(generate_ids(model, prompt, cfg, set(), seeded_generator(0, "cpu"), tok.utf8_guard))
    assert len(ids) == 200 and max(ids) < tok.vocab_size
    assert max(beam_search(model, prompt, 3, 20, set(), guard=tok.utf8_guard)) < tok.vocab_size
    from homellm.eval import greedy_complete

    expected = prompt[-21:]
    with torch.no_grad():
        for _ in range(10):
            expected.append(int(model(torch.tensor([expected]))[0][0, -1, :tok.vocab_size].argmax()))
    assert greedy_complete(model, tok, [prompt[-21:]], 10, torch.tensor([-1])) == [tok.decode(expected[21:])]


def test_sampling_edge_values_stay_finite_and_exact():
    # A tiny repetition penalty (positive, so allowed) made the repeated logit inf and the probabilities NaN.
    assert set(draws([1.0, 3.0, 2.0], history=[0], temperature=1.0, repetition_penalty=1e-45).tolist()) == {0}
    # Top-p keeps the smallest set whose mass reaches it: 0.5 is reached by the first token alone.
    probs = torch.tensor([0.5, 0.25, 0.25]).log().tolist()
    assert set(draws(probs, temperature=1.0, top_p=0.5).tolist()) == {0}


def test_more_beams_than_tokens_is_refused(tok):
    model = tiny("gpt2", vocab=tok.vocab_size)
    with pytest.raises(HomeLLMError, match=r"--num-beams 100000 is more than the \d+ tokens"):
        list(stream_ids(model, tok, tok.encode(EN), SampleConfig(num_beams=100_000)))


def test_a_new_turn_ends_a_reply(tok):
    """A chat model that skips <|im_end|> and opens the next turn (<|im_start|>user...) went on writing the user's
    part into its reply."""
    model = tiny("gpt2", vocab=tok.vocab_size)
    forward = model.forward

    def opens_a_turn(*args, **kwargs):
        logits, loss = forward(*args, **kwargs)
        logits[..., tok.im_start_id] = 1e4  # always the likeliest
        return logits, loss

    model.forward = opens_a_turn
    stats: dict = {}
    assert list(stream_ids(model, tok, tok.encode(EN), SampleConfig(temperature=0.0), stats)) == []
    assert stats["new_tokens"] == 0


def test_a_run_of_special_tokens_keeps_the_stream_window_small(tok):
    """Skipped special tokens decode to nothing: a window of them alone never trimmed, and each push decoded every
    tail of it (400 <|pad|> took 0.6 s, growing with the cube)."""
    stream = tok.stream(skip_special=True, context=tok.encode(EN))
    assert "".join(stream.push(tok.pad_id) for _ in range(400)) == ""
    assert stream.push(tok.encode(" the")[0]) == " the"[:len(tok.decode(tok.encode(" the")[:1]))]
    assert len(stream._ids) <= 8


@pytest.mark.parametrize("family", FAMILIES)
def test_beam_search_applies_the_repetition_penalty_as_sampling_does(family):
    """Beam search ignored --repetition-penalty. With it, one beam is still greedy decoding, penalty included, past
    the context too."""
    model = tiny(family)
    prompt = [5, 9, 12]
    penalised = SampleConfig(temperature=0.0, max_new_tokens=40, repetition_penalty=3.0)
    greedy = list(generate_ids(model, prompt, penalised))
    assert greedy != list(generate_ids(model, prompt, SampleConfig(temperature=0.0, max_new_tokens=40)))
    assert beam_search(model, prompt, 1, 40, repetition_penalty=3.0) == greedy
    assert beam_search(model, prompt, 3, 40, repetition_penalty=3.0) != beam_search(model, prompt, 3, 40)


def test_the_repetition_penalty_reads_the_window_not_all_that_was_written(monkeypatch):
    """It read every token so far, each step: a long generation grew quadratic (58.7 s against 12.8 s for 20,000
    tokens). It reads what the model reads, the last block_size tokens."""
    from homellm import generate

    widths, real = [], generate.penalize
    monkeypatch.setattr(generate, "penalize", lambda logits, history, penalty: widths.append(history.shape[1]) or
                        real(logits, history, penalty))
    model = tiny("llama")  # a 32-token context
    list(generate_ids(model, [5, 9, 12], SampleConfig(temperature=0.0, max_new_tokens=100, repetition_penalty=1.5)))
    assert max(widths) == 32 and len(widths) == 100
    widths.clear()
    beam_search(model, [5, 9, 12], 2, 100, repetition_penalty=1.5)
    assert max(widths) == 32
