"""Tokenizer invariants: lossless round trips on Japanese, Chinese and any Unicode; GPT-2 ids; stable specials;
streaming decode that never prints half a character; byte counts for bits per byte; save/load."""

import json
import random
import re
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from conftest import SHARED, homellm
from homellm.config import CHAT_TEMPLATE, EOT, IM_END, IM_START, PAD, SPECIAL_TOKENS, PrepareConfig, TokenizerConfig
from homellm.data import prepare
from homellm.errors import HomeLLMError
from homellm.tokenizer import UNK, Tokenizer, import_tokenizer, train_tokenizer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def need(rel: str) -> Path:
    path = DATA / rel
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared offline corpora are not on this machine)")
    return path


def ja_text(n_docs: int = 3, chars: int = 4000) -> str:
    lines = need("ja_aozora/aozora_ja.jsonl").read_text(encoding="utf-8").splitlines()[:n_docs]
    return "\n".join(json.loads(line)["text"][:chars] for line in lines)


def zh_text(chars: int = 8000) -> str:
    with open(need("zh_classics/sanguo_yanyi.txt"), encoding="utf-8") as f:
        return f.read(chars)


def random_unicode(n: int, seed: int = 0) -> str:
    """Code points from every plane, emoji and combining marks included; no lone surrogates (not encodable)."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        c = rng.choice([rng.randrange(0x20, 0x7F), rng.randrange(0x80, 0x800), rng.randrange(0x800, 0x10000),
                        rng.randrange(0x1F300, 0x1FAFF), rng.randrange(0x10000, 0x110000), 0x0A, 0x0D, 0x00])
        if not 0xD800 <= c < 0xE000:
            out.append(chr(c))
    return "".join(out) + "👩‍👩‍👧 e\u0301 🇯🇵"


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> Tokenizer:
    """A small BPE trained on Japanese + Chinese + English slices: shared by the tests, trains in well under 1 s."""
    root = tmp_path_factory.mktemp("bpe")
    corpus = root / "corpus.txt"
    corpus.write_text(ja_text() + "\n" + zh_text() + "\nThe quick brown fox jumps over the lazy dog.\n",
                      encoding="utf-8")
    return train_tokenizer(TokenizerConfig(input=[str(corpus)], out=str(root / "tok"), vocab_size=500))


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> Tokenizer:
    return train_tokenizer(TokenizerConfig(from_file=str(need("gpt2_tokenizer")),
                                           out=str(tmp_path_factory.mktemp("gpt2"))))


def test_bpe_round_trip_is_lossless_on_japanese_chinese_and_any_unicode(bpe):
    assert bpe.vocab_size == 500
    for text in (ja_text(n_docs=5, chars=2000), zh_text(20000)[-3000:], random_unicode(3000), "", "\r\n\t  x"):
        ids = bpe.encode(text)
        assert bpe.decode(ids) == text
        assert max(ids, default=0) < bpe.vocab_size
    # the merges learned something: Japanese needs fewer tokens than its UTF-8 bytes
    ja = ja_text(n_docs=1, chars=2000)
    assert len(bpe.encode(ja)) < 0.7 * len(ja.encode())


def test_special_tokens_reserved_with_stable_ids(bpe, tmp_path):
    assert [bpe.eot_id, bpe.im_start_id, bpe.im_end_id, bpe.pad_id] == [0, 1, 2, 3]
    char = train_tokenizer(TokenizerConfig(input=[str(write(tmp_path / "a.txt", "abc"))], out=str(tmp_path / "c"),
                                           kind="char"))
    assert [char.eot_id, char.im_start_id, char.im_end_id, char.pad_id] == [0, 1, 2, 3]
    # a special string in plain text is just text; allow_special=True makes it the special token
    text = f"a{EOT}b{IM_START}"
    assert bpe.eot_id not in bpe.encode(text) and bpe.im_start_id not in bpe.encode(text)
    assert bpe.decode(bpe.encode(text)) == text
    assert bpe.encode(text, allow_special=True) == bpe.encode("a") + [0] + bpe.encode("b") + [1]
    assert bpe.encode_batch([text, "x"]) == [bpe.encode(text), bpe.encode("x")]
    assert bpe.decode([0, *bpe.encode("hi"), 2], skip_special=True) == "hi"
    assert bpe.decode([0]) == EOT


def test_char_tokenizer_words_are_one_token_each_and_round_trip(tmp_path):
    text = "$12 \\times 7 = -\\frac{7}{3}$ \\text{undefined} \\t 日本 #&~-"
    words = ["\\times", "\\frac{", "}{", "\\text{undefined}", "\\t"]  # \\t is inside \\times and \\text{...}
    tok = train_tokenizer(TokenizerConfig(input=[str(write(tmp_path / "a.txt", text))], out=str(tmp_path / "c"),
                                          kind="char", words=words))
    pieces = [tok.decode([i]) for i in tok.encode(text)]
    assert "".join(pieces) == text and pieces.count("\\times") == 1 and "\\text{undefined}" in pieces
    assert pieces.count("\\t") == 1  # only the one standing alone: the longer words win
    assert len(pieces) == len(text) - sum(len(w) - 1 for w in words)
    assert tok.token_bytes()[tok.encode(text)].sum() == len(text.encode())
    assert Tokenizer.load(tmp_path / "c").encode(text) == tok.encode(text)
    with pytest.raises(HomeLLMError, match="only a char tokenizer"):
        train_tokenizer(TokenizerConfig(input=[str(tmp_path / "a.txt")], out=str(tmp_path / "b"), words=["ab"]))
    for bad, why in (("", "special token"), (IM_START, "special token"), (f"x{UNK}", "special token"),
                     ("a\nb", "line break")):  # a word holding a special token would let plain text forge it
        with pytest.raises(HomeLLMError, match=why):
            train_tokenizer(TokenizerConfig(input=[str(tmp_path / "a.txt")], out=str(tmp_path / "b"), kind="char",
                                            words=[bad]))


def test_token_bytes_count_utf8_bytes(bpe, gpt2):
    for tok in (bpe, gpt2):
        tb = tok.token_bytes()
        assert tb.shape == (tok.vocab_size,)
        assert all(tb[tok.hf.token_to_id(s)] == 0 for s in SPECIAL_TOKENS)
        for text in (ja_text(n_docs=2, chars=1500), zh_text(1500), random_unicode(500, seed=1)):
            ids = tok.encode(text)
            assert tb[ids].sum() == len(text.encode("utf-8"))


def test_stream_decoder_prints_japanese_cleanly_token_by_token(bpe):
    text = ja_text(n_docs=2, chars=1500) + "🎉 done"
    ids = bpe.encode(text)
    # the test means something only if some token is part of a character
    assert any("\ufffd" in bpe.decode([i]) for i in ids)
    stream = bpe.stream()
    parts = [stream.push(i) for i in ids]
    parts.append(stream.flush())
    assert "".join(parts) == text
    assert not any("\ufffd" in p for p in parts)
    assert stream.flush() == ""
    # an invalid byte (a lone continuation byte, then text) is printed rather than held forever
    lone = bpe.hf.token_to_id(bytes_to_gpt2_char(0x80))
    out = [stream.push(i) for i in [lone, *bpe.encode("abcd")]]
    assert "".join(out) + stream.flush() == "\ufffdabcd"


def test_streamed_text_always_equals_the_whole_decode(bpe):
    """Random ids, half of them lone bytes >= 0x80: invalid bytes next to characters still incomplete (an earlier
    rule printed a pending U+FFFD after four tokens, and the text then differed from decode(ids))."""
    rng = random.Random(0)
    high = [bpe.hf.token_to_id(bytes_to_gpt2_char(b)) for b in range(0x80, 0x100)]
    for _ in range(300):
        ids = [rng.choice(high) if rng.random() < 0.5 else rng.randrange(bpe.vocab_size) for _ in range(30)]
        stream = bpe.stream()
        assert "".join(stream.push(i) for i in ids) + stream.flush() == bpe.decode(ids), ids


def bytes_to_gpt2_char(b: int) -> str:
    # GPT-2's byte-to-character map, for one byte: printable Latin-1 maps to itself, the rest to 256 + n
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    if b in printable:
        return chr(b)
    return chr(256 + [x for x in range(256) if x not in printable].index(b))


def test_save_load_round_trip(bpe, tmp_path):
    bpe.save(tmp_path / "tok", model_max_length=256)
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (config["eos_token"], config["pad_token"], config["model_max_length"]) == (EOT, PAD, 256)
    assert config["added_tokens_decoder"]["2"]["content"] == IM_END and config["added_tokens_decoder"]["2"]["special"]
    assert config["chat_template"] == CHAT_TEMPLATE  # what homellm.chat renders (tests/test_sft.py checks with jinja)
    assert json.loads((tmp_path / "tok" / "special_tokens_map.json").read_text())["bos_token"] == EOT
    text = ja_text(n_docs=1, chars=500) + f" {EOT} mixed ascii"
    # a tokenizer folder, a run folder holding tokenizer/, and the file itself all load
    run = tmp_path / "run"
    bpe.save(run / "tokenizer")
    for where in (tmp_path / "tok", run, tmp_path / "tok" / "tokenizer.json"):
        tok = Tokenizer.load(where)
        assert tok.encode(text) == bpe.encode(text)
        assert tok.encode(text, allow_special=True) == bpe.encode(text, allow_special=True)
        assert (tok.vocab_size, tok.eot_id, tok.kind) == (bpe.vocab_size, 0, "bpe")
    # `tokenizer train --from-file` takes a run (or prepared data) as prepare's --tokenizer does ("not found")
    assert import_tokenizer(run).same_as(bpe)


def test_load_errors_are_one_line(tmp_path):
    with pytest.raises(HomeLLMError, match="no tokenizer.json"):
        Tokenizer.load(tmp_path)
    for text, message in [("{not json", r"tokenizer.json: not JSON \(Expecting property name"),
                          ('{"a": 1}', r"tokenizer.json: JSON, but not a tokenizer.json \(it has no 'model' section\)"),
                          ('{"model": {"type": "BPE"}}', "tokenizer.json: not a valid tokenizer.json")]:
        bad = write(tmp_path / "tokenizer.json", text)
        with pytest.raises(HomeLLMError, match=message) as e:
            Tokenizer.load(bad)
        assert "\n" not in str(e.value)
        with pytest.raises(HomeLLMError, match=message + ".*give a Hugging Face tokenizer.json"):
            train_tokenizer(TokenizerConfig(from_file=str(bad), out=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_a_char_tokenizer_counts_every_characters_bytes(tmp_path):
    """SentencePiece's and byte fallback's rules were applied to char tokenizers too: "▁" counted 1 byte (it is 3),
    and a --words entry "<0x41>" 1 (it is 6), so meta.json's bytes and val bits per byte came out wrong."""
    text = "load ▁▂▃▅▇ spark <0x41>\n"
    src = write(tmp_path / "spark.txt", text)
    tok = train_tokenizer(TokenizerConfig(input=[str(src)], out=str(tmp_path / "c"), kind="char", words=["<0x41>"]))
    ids = tok.encode(text)
    assert tok.token_bytes()[ids].sum() == len(text.encode()) and tok.decode(ids) == text


def test_char_tokenizer_round_trip_and_unknown_characters(tmp_path):
    text = "hello wörld\n日本語 🎉\r\n"
    src = write(tmp_path / "a.jsonl", json.dumps({"text": text}) + "\n")
    tok = train_tokenizer(TokenizerConfig(input=[str(src)], out=str(tmp_path / "c"), kind="char", vocab_size=5))
    # The reader turns CRLF into LF; the chat roles' letters are always there, so any char model can learn to chat.
    alphabet = sorted(set(text.replace("\r\n", "\n")) | set("systemuserassistant\n"))
    assert tok.kind == "char" and tok.vocab_size == len(SPECIAL_TOKENS) + 1 + len(alphabet)
    body = "".join(alphabet) * 3
    assert tok.encode(body) == [len(SPECIAL_TOKENS) + 1 + alphabet.index(c) for c in body]
    assert tok.decode(tok.encode(body)) == body
    assert tok.decode(tok.encode("hxz")) == f"h{UNK}{UNK}"  # char is lossless on the training alphabet only
    assert UNK not in tok.decode(tok.encode("system\nuser\nassistant\n"))
    assert tok.token_bytes()[tok.encode(body)].sum() == len(body.encode())
    loaded = Tokenizer.load(tmp_path / "c")
    assert loaded.encode(body + EOT) == tok.encode(body + EOT)
    assert json.loads((tmp_path / "c" / "tokenizer_config.json").read_text())["unk_token"] == UNK


def test_gpt2_files_give_gpt2_ids(gpt2, tmp_path):
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.encode(" the cat's") == [262, 3797, 338]
    assert gpt2.eot_id == 50256 and gpt2.encode(EOT, allow_special=True) == [50256]
    assert [gpt2.im_start_id, gpt2.im_end_id, gpt2.pad_id] == [50257, 50258, 50259]
    assert gpt2.vocab_size == 50260
    assert gpt2.cuts_at_lines  # (its "\n\xa0" joins a line break to whitespace only: prepare reads it in pieces)
    text = ja_text(n_docs=1, chars=300) + random_unicode(300)
    assert gpt2.decode(gpt2.encode(text)) == text
    # the saved tokenizer.json imports again without changes
    gpt2.save(tmp_path / "saved")
    again = train_tokenizer(TokenizerConfig(from_file=str(tmp_path / "saved" / "tokenizer.json"),
                                            out=str(tmp_path / "again")))
    assert again.encode(text) == gpt2.encode(text) and again.vocab_size == 50260
    # encoder.json given alone: its folder reads it with its merges (it was "give a Hugging Face tokenizer.json")
    encoder = need("gpt2_tokenizer") / "encoder.json"
    with pytest.raises(HomeLLMError, match=f"give its folder, {need('gpt2_tokenizer')}, where it is read with its "
                                           "merges$"):
        train_tokenizer(TokenizerConfig(from_file=str(encoder), out=str(tmp_path / "alone")))


def test_bad_input_errors(tmp_path):
    corpus = str(write(tmp_path / "a.txt", "some text"))
    with pytest.raises(HomeLLMError, match="--vocab-size 100 is too small"):
        train_tokenizer(TokenizerConfig(input=[corpus], out=str(tmp_path / "t"), vocab_size=100))
    empty = str(write(tmp_path / "empty.txt", " \n\n "))
    with pytest.raises(HomeLLMError, match="no text"):
        train_tokenizer(TokenizerConfig(input=[empty], out=str(tmp_path / "t")))
    # Called as a library too: a folder's own tokenizer_config.json is never written over
    (tmp_path / "notes").mkdir()
    notes = write(tmp_path / "notes" / "tokenizer_config.json", "my notes")
    with pytest.raises(HomeLLMError, match="holds tokenizer_config.json but no tokenizer.json"):
        train_tokenizer(TokenizerConfig(input=[corpus], out=str(notes.parent), kind="char"))
    assert notes.read_text() == "my notes"
    # ...but what a save killed before its tokenizer.json left there is its own, and a rerun writes it again
    killed = tmp_path / "killed"
    train_tokenizer(TokenizerConfig(input=[corpus], out=str(killed), kind="char"))
    for gone in (["tokenizer.json"], ["tokenizer.json", "special_tokens_map.json"]):
        for name in gone:
            (killed / name).unlink()
        again = train_tokenizer(TokenizerConfig(input=[corpus], out=str(killed), kind="char"))
        assert again.decode(again.encode("some text")) == "some text"
        assert (killed / "tokenizer.json").is_file()
    with pytest.raises(HomeLLMError, match="--kind"):
        train_tokenizer(TokenizerConfig(input=[corpus], out=str(tmp_path / "t"), kind="wordpiece"))
    with pytest.raises(HomeLLMError, match="nope: not found: give a tokenizer.json"):
        train_tokenizer(TokenizerConfig(from_file=str(tmp_path / "nope"), out=str(tmp_path / "t")))
    (tmp_path / "texts").mkdir()  # a folder that is there, without tokenizer files (review: "not found")
    with pytest.raises(HomeLLMError, match="texts: a folder without tokenizer files: give a tokenizer.json"):
        train_tokenizer(TokenizerConfig(from_file=str(tmp_path / "texts"), out=str(tmp_path / "t")))
    with pytest.raises(HomeLLMError, match="takes a finished tokenizer, which no --input trains"):
        train_tokenizer(TokenizerConfig(from_file=str(tmp_path / "nope"), input=[corpus], out=str(tmp_path / "t")))
    (tmp_path / "rinna").mkdir()
    spm = write(tmp_path / "rinna" / "spiece.model", "protobuf bytes")  # a hub folder with no tokenizer.json
    for given in (spm.parent, spm):
        with pytest.raises(HomeLLMError, match=r"spiece.model is a SentencePiece model, .*save_pretrained\('"
                           + str(spm.parent) + r"-hf'\)\", then give --from-file " + str(spm.parent) + "-hf"):
            train_tokenizer(TokenizerConfig(from_file=str(given), out=str(tmp_path / "t")))
    assert not (tmp_path / "t").exists()


def test_flags_an_import_or_a_char_tokenizer_never_reads_are_said(tmp_path, capsys):
    """`--from-file X --kind char --vocab-size 500` imported X's BPE as it is; --vocab-size with --kind char was
    dropped: unsaid, as --input and --words were before they were refused."""
    from homellm.cli import main

    corpus = str(write(tmp_path / "a.txt", "some text"))
    write(tmp_path / "tok.json", "{}")
    for flags in (["--kind", "char"], ["--vocab-size", "500"], ["--max-chars", "10"], ["--text-field", "body"]):
        assert main(["tokenizer", "train", "--from-file", str(tmp_path / "tok.json"), "--out", str(tmp_path / "t"),
                     *flags]) == 2
        assert f"{flags[0]} does not apply with --from-file" in capsys.readouterr().err
    assert main(["tokenizer", "train", "--input", corpus, "--kind", "char", "--vocab-size", "50", "--out",
                 str(tmp_path / "c")]) == 0
    assert "note: --vocab-size 50 applies to BPE only" in capsys.readouterr().err


def test_max_chars_caps_training_text(tmp_path):
    corpus = write(tmp_path / "a.txt", "bc" * 100 + "xqz")
    tok = train_tokenizer(TokenizerConfig(input=[str(corpus)], out=str(tmp_path / "c"), kind="char", max_chars=50))
    roles = len(set("systemuserassistant\n"))  # always in a char vocabulary
    assert tok.vocab_size == len(SPECIAL_TOKENS) + 1 + 2 + roles  # x, q, z lie past the cap
    assert tok.encode("x")[0] == tok.unk_id and tok.unk_id not in tok.encode("bc")


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def byte_fallback_tokenizer(tmp_path) -> Tokenizer:
    """A Llama-style tokenizer: SentencePiece's ▁ for spaces, and characters outside the vocabulary written as
    their UTF-8 bytes, one <0xNN> token each."""
    from tokenizers import normalizers

    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": b + 1 for b in range(256)}}
    for piece in ["▁", "a", "b", "c", "▁a", "日"]:
        vocab[piece] = len(vocab)
    hf = HFTokenizer(models.BPE(vocab, [], unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    hf.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    hf.save(str(tmp_path / "llama.json"))
    return import_tokenizer(tmp_path / "llama.json")


def test_streamed_text_equals_the_decode_with_byte_fallback(tmp_path):
    tok = byte_fallback_tokenizer(tmp_path)
    text = "a 日本語のテキスト abc ＡＢＣ 鬱蒼 cab"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and len(ids) > len(text)  # mostly byte tokens
    stream = tok.stream()
    assert "".join(stream.push(i) for i in ids) + stream.flush() == text


def test_an_imported_tokenizers_own_unknown_token_is_counted(tmp_path):
    """A SentencePiece-style BPE without byte fallback writes what it lacks as its own <unk>: prepare counts those
    tokens, and refuses text that is mostly unknown, as it does for homellm's char tokenizers."""
    vocab = {"<unk>": 0, "▁": 1, **{c: i + 2 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")}}
    hf = HFTokenizer(models.BPE(vocab, [], unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Metaspace()
    hf.decoder = decoders.Metaspace()
    hf.save(str(tmp_path / "sp.json"))
    tok = import_tokenizer(tmp_path / "sp.json")
    assert tok.unk_id == 0 and tok.unknown_chars("ab 日本 c") == {"日", "本"}
    assert "cannot write '日', '本': the model reads them as <unk>" in tok.unknown_note("ab 日本 c")
    tok.save(tmp_path / "tok")
    (tmp_path / "ja.txt").write_text("日本語の文章です。" * 50 + "\n", encoding="utf-8")
    with pytest.raises(HomeLLMError, match=r"ja.txt: .* tokens \(.*%\) are characters the tokenizer"):
        prepare(PrepareConfig(input=[str(tmp_path / "ja.txt")], tokenizer=str(tmp_path / "tok"),
                              out=str(tmp_path / "d")))


def test_an_imported_tokenizer_never_cuts_nor_pads_and_keeps_its_unknown_token(bpe, tmp_path):
    """A hub tokenizer.json may carry truncation (sentence-transformers' 128) or padding: imported with it, every
    document prepared was cut to its length. And tokenizer_config.json named no unknown token for an import's own
    [UNK], so transformers read unknown words as None."""
    hf = HFTokenizer.from_str(bpe.hf.to_str())
    hf.enable_truncation(4)
    hf.enable_padding(length=64)
    hf.save(str(tmp_path / "cut.json"))
    text = "the quick brown fox jumps over the lazy dog " * 4
    for tok in (import_tokenizer(tmp_path / "cut.json"), Tokenizer(HFTokenizer.from_file(str(tmp_path / "cut.json")))):
        assert tok.encode(text) == bpe.encode(text)
        assert tok.encode_batch(["a b", text]) == bpe.encode_batch(["a b", text])
    wordpiece = import_tokenizer(wordpiece_tokenizer(tmp_path))
    wordpiece.save(tmp_path / "wp")
    assert json.loads((tmp_path / "wp" / "tokenizer_config.json").read_text())["unk_token"] == "[UNK]"
    with pytest.raises(HomeLLMError, match=r"--vocab-size 5,000,000,000 is beyond any use"):
        train_tokenizer(TokenizerConfig(input=[str(tmp_path / "wp.json")], out=str(tmp_path / "x"),
                                        vocab_size=5_000_000_000))


def test_an_imported_vocabulary_with_holes_gets_its_special_tokens_past_its_ids(tmp_path):
    """The library numbers the tokens it adds from the vocabulary's count: with holes in the ids, <|endoftext|> took
    the 4 of "b" and "a b" decoded as 'a<|im_start|><|endoftext|>'."""
    hf = HFTokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 4, " ": 5}, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Split(" ", "isolated")
    hf.save(str(tmp_path / "holes.json"))
    tok = import_tokenizer(tmp_path / "holes.json")
    assert tok.encode("a b") == [1, 5, 4] and [tok.hf.id_to_token(i) for i in (1, 5, 4)] == ["a", " ", "b"]
    assert sorted(tok.hf.token_to_id(s) for s in SPECIAL_TOKENS) == [6, 7, 8, 9]
    assert tok.kind == "wordlevel"  # whole words: it was called "char", homellm's one-character tokenizer
    # What it cannot write is a word it has no token for, not each letter ("a b ab": "ab" was not named, and
    # generate named the letters of words it knew).
    assert tok.unknown_chars("a b ab") == {"ab"} and tok.unknown_chars("a b") == set()
    assert tok.fold("a ｂ") == "a b"  # an input method's full-width letter, read as the word it knows


def wordpiece_tokenizer(tmp_path) -> Path:
    """A BERT-style WordPiece: it lowercases, strips accents and splits off punctuation, so text does not come
    back as written."""
    from tokenizers import normalizers

    vocab = {"[UNK]": 0, **{c: i + 1 for i, c in enumerate(dict.fromkeys("abcdefghijklmnopqrstuvwxyz!,.()"))}}
    for word in ["hello", "world", "##s", "##llo"]:
        vocab[word] = len(vocab)
    hf = HFTokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    hf.normalizer = normalizers.BertNormalizer(lowercase=True)
    hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    hf.decoder = decoders.WordPiece()
    hf.save(str(tmp_path / "wp.json"))
    return tmp_path / "wp.json"


def test_a_lossy_imported_tokenizer_is_named_on_import_and_in_prepare(tmp_path, capsys):
    tok = import_tokenizer(wordpiece_tokenizer(tmp_path))
    err = capsys.readouterr().err
    assert "wp.json: it does not give text back as written: 'Hello World! ' comes back as 'hello world! '" in err
    # Its [UNK]s are named apart from the changes: the words it has no pieces for, as written ('Two' and 'Café'
    # too, whose letters it knows: each letter was named, and those words were not).
    assert "cannot write '1', '234', '5', 'Café', 'Two'" in err
    tok.save(tmp_path / "tok")
    (tmp_path / "a.txt").write_text("Worlds hello\n" * 20, encoding="utf-8")
    prepare(PrepareConfig(input=[str(tmp_path / "a.txt")], tokenizer=str(tmp_path / "tok"), out=str(tmp_path / "d")))
    notes = [line for line in capsys.readouterr().err.splitlines() if "does not give text back" in line]
    assert len(notes) == 1 and "'Worlds hello" in notes[0] and "'worlds hello" in notes[0]
    # Words it cannot write, though it knows each of their characters, are counted all the same.
    (tmp_path / "b.txt").write_text("the world\n" * 20, encoding="utf-8")
    with pytest.raises(HomeLLMError, match=r"b.txt: 20 of 40 tokens \(50.0%\) are text the tokenizer .* cannot write"):
        prepare(PrepareConfig(input=[str(tmp_path / "b.txt")], tokenizer=str(tmp_path / "tok"),
                              out=str(tmp_path / "e")))
    # Bits per byte counts what each token adds to the text: a word follows a space, "##s" joins the one before,
    # and [UNK] stands for bytes it lost.
    tb = tok.token_bytes()
    assert [tb[tok.hf.token_to_id(t)] for t in ("hello", "##llo", "##s", "[UNK]")] == [6, 3, 1, 0]


def test_a_tokenizer_that_gives_no_text_back_is_refused_on_import(tmp_path):
    """A vocabulary lost in a conversion: import took it with a note, and training on it failed later with "too
    little text (1 tokens)", blaming the text; the note quoted 2,000 characters of it."""
    hf = HFTokenizer(models.BPE(vocab={}, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.save(str(tmp_path / "empty.json"))
    with pytest.raises(HomeLLMError, match=r"empty.json: its tokenizer gives no text back \('Hello World!'\.\.\. comes "
                                           r"back as ''\): its tokenizer.json is damaged or empty"):
        import_tokenizer(tmp_path / "empty.json")
    hf.add_special_tokens(SPECIAL_TOKENS)
    note = Tokenizer(hf, EOT, None).round_trip_note("x" * 2000)
    assert note == "it does not give text back as written: " + repr("x" * 40) + " comes back as ''"


@pytest.mark.parametrize("kind", ["bpe", "gpt2", "byte-fallback"])
def test_lossless_tokenizers_get_no_round_trip_note(kind, bpe, gpt2, tmp_path, capsys):
    tok = {"bpe": bpe, "gpt2": gpt2}.get(kind) or byte_fallback_tokenizer(tmp_path)
    assert "does not give text back" not in capsys.readouterr().err
    for text in (ja_text(n_docs=1, chars=2000), zh_text(2000), random_unicode(300, seed=2)):
        assert tok.round_trip_note(text) == ""


def test_byte_fallback_tokens_count_one_byte_even_when_marked_special(tmp_path):
    plain = byte_fallback_tokenizer(tmp_path)
    spec = json.loads(plain.hf.to_str())
    flags = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
    spec["added_tokens"] += [{"id": plain.hf.token_to_id(f"<0x{b:02X}>"), "content": f"<0x{b:02X}>", **flags}
                             for b in range(256)]  # as some Llama tokenizer.json files have them
    (tmp_path / "special.json").write_text(json.dumps(spec), encoding="utf-8")
    tok = import_tokenizer(tmp_path / "special.json")
    assert tok.hf.get_added_tokens_decoder()[tok.hf.token_to_id("<0x8B>")].special
    assert (tok.token_bytes() == plain.token_bytes()).all() and tok.token_bytes()[tok.hf.token_to_id("<0x8B>")] == 1
    text = "a 日本語 abc ＡＢＣ"
    assert tok.token_bytes()[tok.encode(text)].sum() == len(text.encode()) + 1  # and the ▁ put before the text


def test_a_vocabulary_the_text_cannot_fill_is_said(tmp_path):
    """--vocab-size 100000 on a small text gave a few hundred ids without a word, and the trainer's progress left
    blank lines in the command's output."""
    corpus = write(tmp_path / "a.txt", "the cat sees the moon. " * 50)
    proc = homellm("tokenizer", "train", "--input", str(corpus), "--vocab-size", "100000", "--out",
                   str(tmp_path / "t"))
    ids = Tokenizer.load(tmp_path / "t").vocab_size
    assert ids < 400 and f"note: the text gives {ids:,} tokens, not the 100,000 asked" in proc.stderr
    assert proc.stdout == f"tokenizer (bpe, {ids} ids) written to {tmp_path / 't'}\n"


def test_a_vocabulary_too_small_for_the_texts_characters_is_said(tmp_path, capsys):
    """1,024 tokens on Chinese classics made 1.04 tokens a character, worse than a char tokenizer, unsaid."""
    # 600 different CJK characters, each repeated so that merges exist: more than half of 512 tokens
    text = "".join(chr(0x4E00 + i) * 3 + "。" for i in range(600))
    corpus = write(tmp_path / "zh.txt", text * 3)
    train_tokenizer(TokenizerConfig(input=[str(corpus)], out=str(tmp_path / "t"), vocab_size=512))
    assert re.search(r"note: \d+% of the text's characters stay split into bytes, several tokens each, as its 601 "
                     r"different characters are many for 512 tokens: .* a larger --vocab-size \(8,000, say",
                     capsys.readouterr().err)
    train_tokenizer(TokenizerConfig(input=[str(corpus)], out=str(tmp_path / "t2"), vocab_size=2000))
    assert "different characters" not in capsys.readouterr().err
    # Real Chinese: 3,778 different characters in 200,000, more than half of 2,000 tokens, but the common ones whole
    # (7 % of the text split): nothing to say (it said to use 8,000 tokens to one that had them)
    sanguo = SHARED / "data" / "zh_classics" / "sanguo_yanyi.txt"
    if not sanguo.is_file():
        pytest.skip(f"{sanguo} is absent (the shared offline corpora are not on this machine)")
    write(tmp_path / "zh2.txt", sanguo.read_text(encoding="utf-8")[:200_000])
    for vocab, said in ((2000, False), (1024, True)):  # (at 1,024: 1.11 tokens a character, more than a char's)
        train_tokenizer(TokenizerConfig(input=[str(tmp_path / "zh2.txt")], out=str(tmp_path / f"z{vocab}"),
                                        vocab_size=vocab))
        assert ("different characters" in capsys.readouterr().err) == said, vocab


def test_bpe_training_cuts_long_runs_without_spaces_and_nothing_else():
    """A 1 MB line of letters kept BPE training busy for hours (the trainer's time grows with the square of a word's
    length): such runs are cut at 1,000 characters; text with shorter runs, the normal case, trains as it was."""
    from homellm.tokenizer import bounded_runs

    prose = "the cat sees the moon.\n吾輩は猫である。名前はまだ無い。\n" * 100
    assert list(bounded_runs(prose)) == [prose] and list(bounded_runs("")) == [""]
    run = "ab" * 1_250
    pieces = list(bounded_runs(f"start {run} end"))
    assert "".join(pieces) == f"start {run} end" and [len(p) for p in pieces] == [1006, 1000, 504]
    assert [len(p) for p in bounded_runs("x" * 2000)] == [1000, 1000]
    # Every piece ends at 1,000 characters of a run, counted from the run's start, or at the text's end; runs of
    # any length, between every kind of space (the ideographic one too), checked against that rule cut by cut.
    rng = random.Random(0)
    for _ in range(300):
        text = "".join("あ" * rng.choice([1, 999, 1000, 1001, 2000, 2500]) + rng.choice([" ", "\n", "\u3000", "\t\t"])
                       for _ in range(rng.randint(0, 4)))[:rng.randint(0, 6000)]
        pieces = list(bounded_runs(text))
        assert "".join(pieces) == text and not any(re.search(r"\S{1001}", p) for p in pieces)
        assert all(len(re.search(r"\S*$", p).group()) == 1000 for p in pieces[:-1])  # cut only there


def test_bpe_training_says_it_is_at_work_and_stops_at_ctrl_c_without_waiting(tmp_path, monkeypatch):
    """The trainer runs in Rust, which sees no Ctrl-C until it returns: a Ctrl-C waited out the whole training (20 s
    on 24 MB of Japanese, 19 minutes on 300 MB). It trains in a thread of its own now, and the main thread, waiting,
    takes the Ctrl-C while the trainer is still merging; one that comes while the text is read ends the text
    first (a process that ended with the thread in the trainer's reading aborted). Away from a terminal (the
    trainer's progress bars show on one only), a line every HEARTBEAT_S says how far it is."""
    import signal
    import threading

    import homellm.tokenizer as module

    heard, lines = threading.Event(), []
    monkeypatch.setattr(module, "say", lambda line: lines.append(line) or heard.set())
    monkeypatch.setattr(module, "HEARTBEAT_S", 0.01)
    monkeypatch.setattr(module, "_progress_shown", lambda: False)  # (under `pytest -s` on a terminal too)
    real, main = module._training_text, threading.main_thread().ident

    def ctrl_c() -> None:
        threading.Thread(target=signal.pthread_kill, args=(main, signal.SIGINT)).start()

    def text_then_ctrl_c(cfg):
        yield from real(cfg)
        assert heard.wait(60)  # a line said it was reading, while it read
        ctrl_c()  # as merging starts

    def ctrl_c_while_reading(cfg):
        yield from real(cfg)
        ctrl_c()
        while True:  # text for ever: only the Ctrl-C ends the reading
            yield "more words to read "

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9))) for _ in range(60_000)]
    (tmp_path / "words.txt").write_text(" ".join(words), encoding="utf-8")
    cfg = TokenizerConfig(input=[str(tmp_path / "words.txt")], out=str(tmp_path / "tok"), vocab_size=4000)
    monkeypatch.setattr(module, "_training_text", text_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        train_tokenizer(cfg)
    merging = [t for t in threading.enumerate() if t.name == "homellm-bpe"]
    assert merging and merging[0].is_alive()  # still merging: the Ctrl-C did not wait for it
    assert re.fullmatch(r"training the tokenizer: [\d,]+ characters read, 0 min so far", lines[0])
    assert not (tmp_path / "tok").exists()
    monkeypatch.setattr(module, "_training_text", ctrl_c_while_reading)
    with pytest.raises(KeyboardInterrupt):
        train_tokenizer(cfg)
    reading = [t for t in threading.enumerate() if t.name == "homellm-bpe" and t is not merging[0]]
    reading[0].join(60)
    assert not reading[0].is_alive()  # its text ended at the Ctrl-C: it read no more, and merged what it had
    assert not (tmp_path / "tok").exists()


def test_a_large_text_for_bpe_gets_a_note_on_memory_and_sampling(tmp_path, monkeypatch, capsys):
    """300 MB of Japanese took 7 GB and 19 minutes to train BPE on, without a word: past LARGE_TEXT_CHARS a note says
    so and how to sample, once; a text already sampled (--max-chars) gets none."""
    import homellm.tokenizer as module

    monkeypatch.setattr(module, "LARGE_TEXT_CHARS", 1000)
    path = tmp_path / "t.txt"
    path.write_text("吾輩は猫である。名前はまだ無い。\n" * 300, encoding="utf-8")
    for max_chars, notes in ((0, 1), (5000, 0)):
        capsys.readouterr()
        train_tokenizer(TokenizerConfig(input=[str(path)], out=str(tmp_path / f"tok{max_chars}"), vocab_size=300,
                                        max_chars=max_chars))
        err = capsys.readouterr().err
        assert err.count("note: over 0 M characters to train the tokenizer on") == notes, err
        assert notes == 0 or "--max-chars 50000000 (pretrain: --tokenizer-max-chars)" in err


def test_encode_shows_each_token_and_the_characters_a_token_holds(tmp_path, data_dir, capsys, monkeypatch):
    """`tokenizer encode` lists a text's tokens, part of a character as its bytes, and characters per token, for a
    tokenizer folder or a run's or data folder's."""
    import io
    import sys

    from homellm.cli import main

    folder = tmp_path / "tok"
    train_tokenizer(TokenizerConfig(input=[str(write(tmp_path / "en.txt", "the cat sat on the mat. " * 50))],
                                    out=str(folder), vocab_size=300))
    text = "the cat 猫\n<|im_start|>"
    assert main(["tokenizer", "encode", str(folder), "--text", text]) == 0
    out, err = capsys.readouterr()
    rows = [line.split(None, 2) for line in out.splitlines()[2:-1]]
    tok = Tokenizer.load(folder)
    assert [int(r[1]) for r in rows] == tok.encode(text, allow_special=True)
    # each row is its token: text quoted, a special token as written, bytes of a character cut apart in hex
    shown = [r[2] for r in rows]
    assert shown[-1] == "<|im_start|>" and shown[-2] == "'\\n'" and "'the'" in shown
    cat = "".join(s[1:-1] for s in shown if s.startswith("<") and s != "<|im_start|>").replace(" ", "")
    assert bytes.fromhex(cat) == "猫".encode()
    assert out.splitlines()[-1] == (f"{len(rows)} tokens for {len(text)} characters ({len(text.encode())} UTF-8 "
                                    f"bytes): {len(text) / len(rows):.2f} characters and "
                                    f"{len(text.encode()) / len(rows):.2f} bytes a token")
    assert main(["tokenizer", "encode", str(data_dir), "--text", "the"]) == 0  # a data (or run) folder's own
    assert " tokens for 3 characters (3 UTF-8 bytes)" in capsys.readouterr().out.splitlines()[-1]
    monkeypatch.setattr(sys, "stdin", io.StringIO("the cat\n"))
    assert main(["tokenizer", "encode", str(folder), "--text", "-"]) == 0
    assert "for 7 characters" in capsys.readouterr().out  # (less echo's final line break, as generate reads it)
    assert main(["tokenizer", "encode", str(folder), "--text", ""]) == 2
    assert "--text is empty: give the text to split" in capsys.readouterr().err
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "encoder.json").write_text("{}")
    assert main(["tokenizer", "encode", str(tmp_path / "gpt2"), "--text", "x"]) == 2
    assert "make one from them with `homellm tokenizer train --from-file" in capsys.readouterr().err


def test_bpe_writes_the_chat_role_names_as_one_token_each(bpe):
    """A BPE of Japanese and Chinese text split `assistant` into 9 tokens and `user` into 4: some 20 tokens of every
    exchange's context went to the turn headers."""
    assert [len(bpe.encode(word)) for word in ("user", "assistant", "system")] == [1, 1, 1]
    assert len(bpe.encode("<|im_start|>assistant\n", allow_special=True)) == 3
