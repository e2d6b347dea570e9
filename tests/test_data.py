"""Data preparation invariants: encodings and input formats read right, errors name file/line/byte, documents end
with end-of-text, splits match nanoGPT's, shards match meta.json, chunked reading changes nothing."""

import codecs
import importlib.util
import json
import os
import random
import re
import shutil
import socket
import sys
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from homellm import data
from homellm.config import EOT, PrepareConfig, TokenizerConfig
from homellm.data import iter_documents, jsonl_records, open_split, prepare, read_meta, staged_note
from homellm.errors import HomeLLMError
from homellm.tokenizer import Tokenizer, train_tokenizer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def need(rel: str) -> Path:
    path = DATA / rel
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared offline corpora are not on this machine)")
    return path


def docs(inputs: list[str], **kw) -> list[str]:
    """Whole documents from iter_documents, checking the piece protocol on the way."""
    out: list[str] = []
    current: list[str] = []
    for piece in iter_documents(inputs, **kw):
        assert piece.doc == len(out) and piece.text
        current.append(piece.text)
        if piece.end:
            out.append("".join(current))
            current = []
    assert not current
    return out


def char_tok(tmp_path: Path, *inputs: str, **kw) -> Path:
    out = tmp_path / "tok"
    shutil.rmtree(out, ignore_errors=True)  # a tokenizer is never trained over another
    train_tokenizer(TokenizerConfig(input=list(inputs), out=str(out), kind="char", **kw))
    return out


def tokens(out: Path, split: str) -> np.ndarray:
    shards = open_split(out, split)
    return np.concatenate(shards) if shards else np.zeros(0, np.uint16)


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))  # as written: no newline translation
    return path


def test_shift_jis_aozora_detected_or_named(tmp_path):
    path = str(need("ja_aozora/sjis/rashomon.txt"))
    expected = Path(path).read_bytes().decode("cp932").replace("\r\n", "\n")
    assert docs([path]) == [expected] == docs([path], encoding="cp932")
    assert "羅生門" in expected
    with pytest.raises(HomeLLMError, match=r"byte offset \d+ .*--encoding .*, or none: UTF-8 and Shift_JIS \(cp932\) "
                                           "are detected"):
        docs([path], encoding="utf-8")
    # Windows' extra characters (①, 髙) are not Shift_JIS's: cp932 is named, where the list named none like it
    extra = tmp_path / "extra.txt"
    extra.write_bytes("①②③ ～ 髙橋\n".encode("cp932"))
    with pytest.raises(HomeLLMError, match="is not valid shift_jis: pass --encoding cp932, Shift_JIS as Windows"):
        docs([str(extra)], encoding="shift_jis")
    assert docs([str(extra)], encoding="cp932") == ["①②③ ～ 髙橋\n"]
    # prepare reads it too, and its tokens decode back to the text
    for encoding in ("auto", "cp932"):
        tok = char_tok(tmp_path, path, encoding=encoding)
        prepare(PrepareConfig(input=[path], tokenizer=str(tok), out=str(tmp_path / encoding), encoding=encoding))
        t = Tokenizer.load(tmp_path / encoding)
        both = np.concatenate([tokens(tmp_path / encoding, "train"), tokens(tmp_path / encoding, "val")])
        assert t.decode(both.tolist()) == expected + EOT


def test_undecodable_byte_names_file_and_offset(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"abc\n" + "日本".encode() + b"\xff rest")
    with pytest.raises(HomeLLMError) as e:
        docs([str(bad)])
    assert str(bad) in str(e.value) and "0xff at byte offset 10" in str(e.value) and "--encoding" in str(e.value)
    assert docs([str(bad)], encoding="latin-1") == [bad.read_bytes().decode("latin-1")]
    bad.write_bytes(b"abc\n\xff")  # Python's cp932 would accept 0xff as a private-use character: auto must not
    with pytest.raises(HomeLLMError, match="0xff at byte offset 4"):
        docs([str(bad)])
    # Latin-1 French that also decodes as cp932 (each "é" and the "e" after it make a kanji) was read as Japanese.
    french = "Une idée née dans une pensée forte.\n"
    bad.write_bytes(french.encode("latin-1"))
    assert french.encode("latin-1").decode("cp932")  # the trap: it decodes
    with pytest.raises(HomeLLMError, match=r"not UTF-8 \(byte 0xe9 at byte offset 6\), and read as Shift_JIS it has "
                                           r"no kana, so it is not Japanese either: pass the --encoding"):
        docs([str(bad)])
    assert docs([str(bad)], encoding="latin-1") == [french]
    preface = "An English preface of some length.\n" * 2000  # 72,000 bytes of ASCII before the Shift_JIS starts
    bad.write_bytes(preface.encode() + "吾輩は猫である。名前はまだ無い。\n".encode("cp932"))
    assert docs([str(bad)]) == [preface + "吾輩は猫である。名前はまだ無い。\n"]
    with pytest.raises(HomeLLMError, match="--encoding 'klingon' is unknown"):
        docs([str(bad)], encoding="klingon")
    with pytest.raises(HomeLLMError, match="--encoding 'rot13' is not a text encoding"):
        docs([str(bad)], encoding="rot13")
    # Codecs that fail otherwise than on a byte were tracebacks: UnicodeError, not UnicodeDecodeError.
    with pytest.raises(HomeLLMError, match="--encoding 'undefined' is not a text encoding"):
        docs([str(bad)], encoding="undefined")
    # (audit) A file whose encoding changes partway: said where, as the encoding auto read before it (a Shift_JIS
    # start and a UTF-8 end failed "at byte offset 0", which read; a later block's failure told the user, who had
    # passed no --encoding, to pass none)
    ja = "吾輩は猫である。名前はまだ無い。\n"
    for head, block in ((ja * 10, 0), (ja * 20_000, data._CHUNK_BYTES)):  # in the first block, and in a later one
        start = head.encode("cp932")
        bad.write_bytes(start + (ja * 10).encode())
        with pytest.raises(HomeLLMError) as e:
            docs([str(bad)])
        assert str(e.value) == (f"{bad}: Shift_JIS (cp932) text up to byte offset {len(start)}, and UTF-8 from there: "
                                "save it in one encoding (UTF-8), or cut it in two files there (each file's encoding "
                                "is detected)") and len(start) > block
    # (review) UTF-8 that Shift_JIS reads hundreds of bytes of as kanji before failing: the seam found all the same
    start = (ja * 10).encode("cp932")
    bad.write_bytes(start + ("あ" * 200 + ja).encode())
    with pytest.raises(HomeLLMError, match=rf"Shift_JIS \(cp932\) text up to byte offset {len(start)}, and UTF-8"):
        docs([str(bad)])
    # ... and the other way round, in the first block as after it; and ISO-2022-JP named as itself
    for head in (ja * 10, ja * 20_000):
        bad.write_bytes(head.encode() + (ja * 10).encode("cp932"))
        with pytest.raises(HomeLLMError, match=rf"at byte offset {len(head.encode())} is not valid UTF-8, which the "
                                               "text before it is: the file changes its encoding there"):
            docs([str(bad)])
    bad.write_bytes((ja * 10).encode("iso2022_jp") + b"\n" + (ja * 10).encode())
    with pytest.raises(HomeLLMError, match=r"is not valid ISO-2022-JP, which the text before it is"):
        docs([str(bad)])
    bad.write_bytes(b"\xef\xbb\xbf" + (ja * 20_000).encode() + "吾輩".encode("cp932"))  # UTF-8, a BOM: then not
    with pytest.raises(HomeLLMError, match="is not valid UTF-8, which the text before it is: the file changes"):
        docs([str(bad)])
    with pytest.raises(HomeLLMError, match=r"is not valid utf-8: pass the --encoding it was written in \(e.g. cp1252, "
                                           r"euc-jp, gbk, big5, utf-16\), or none: UTF-8 and Shift_JIS \(cp932\) are "):
        docs([str(bad)], encoding="utf-8")  # (given: "or none" is a way out)
    bad.write_text("plain text\n")
    with pytest.raises(HomeLLMError, match=r"bad.txt: bytes near byte offset 0 are not valid utf-16 \(.*\): pass the "
                                           "--encoding the file was written in \\(utf-16-le or utf-16-be name"):
        docs([str(bad)], encoding="utf-16")
    with pytest.raises(HomeLLMError, match="bad.txt: bytes near byte offset 0 are not valid punycode"):
        docs([str(bad)], encoding="punycode")


def test_a_file_cut_inside_its_last_character_is_read_up_to_it(tmp_path, capsys):
    """`head -c` of a Chinese corpus ends partway through a character: it was refused as not UTF-8 or Shift_JIS."""
    cut = tmp_path / "cut.txt"
    text, ja = "话说天下大势，分久必合，合久必分。\n" * 3, "吾輩は猫である。名前はまだ無い。\n" * 3
    for encoding, flags in (("utf-8", {}), ("cp932", {"encoding": "cp932"}), ("utf-8", {"encoding": "utf-8"})):
        data = (ja if encoding == "cp932" else text).encode(encoding)
        data = data[:-5] if encoding == "utf-8" else data[:-4]  # past "。\n", into the character before it
        cut.write_bytes(data)
        whole = data.decode(encoding, errors="ignore")
        assert len(whole.encode(encoding)) < len(data)
        assert docs([str(cut)], **flags) == [whole]
        assert f"note: {cut} ends partway through a character (its last" in capsys.readouterr().err
    cut.write_bytes(text.encode()[:-4] + b"\xff")  # a bad byte at the end is still an error
    with pytest.raises(HomeLLMError, match="0xff at byte offset"):
        docs([str(cut)])


@pytest.mark.parametrize("encoding, bom", [("utf-16", b""), ("utf-16-be", codecs.BOM_UTF16_BE),
                                           ("utf-16-le", codecs.BOM_UTF16_LE), ("utf-32", b"")])
def test_utf16_and_utf32_files_read_whole_in_their_byte_order(tmp_path, monkeypatch, encoding, bom):
    monkeypatch.setattr(data, "_CHUNK_BYTES", 64)  # many blocks: the byte order must hold past the first
    text = "".join(f"line {i}: 日本語のテキスト\r\n" for i in range(40))
    path = tmp_path / "wide.txt"
    path.write_bytes(bom + text.encode(encoding))  # "utf-16" and "utf-32" write their own BOM
    want = [text.replace("\r\n", "\n")]
    assert docs([str(path)]) == want  # auto: the BOM names it
    assert docs([str(path)], encoding=encoding) == want
    no_bom = tmp_path / "nobom.txt"
    no_bom.write_bytes("plain text\n".encode("utf-16-le"))
    with pytest.raises(HomeLLMError, match="NUL bytes at every other byte, as UTF-16 without a byte-order mark has: "
                                           "pass --encoding utf-16-le"):
        docs([str(no_bom)])
    no_bom.write_bytes("plain text\n".encode("utf-16-be"))
    with pytest.raises(HomeLLMError, match="pass --encoding utf-16-be"):
        docs([str(no_bom)])
    # Japanese has NULs in its ASCII characters only: it was "a binary file", with --encoding utf-8 advised.
    novel = "吾輩は猫である。名前はまだ無い。\nどこで生れたかとんと見当がつかぬ。\n"
    no_bom.write_bytes(novel.encode("utf-16-le") * 20)
    with pytest.raises(HomeLLMError, match="pass --encoding utf-16-le"):
        docs([str(no_bom)])
    assert docs([str(no_bom)], encoding="utf-16-le")[0].startswith("吾輩は猫である。")
    # With the ideographic space that starts a Japanese paragraph, and 一, NULs fall on both sides (they have a NUL
    # low byte): it was "a binary file" again. Chinese likewise. An alphabet's letters have no NUL and no byte of
    # 0x80 and up (Cyrillic is U+04xx): only its spaces and punctuation hold NULs, and Russian or Greek was "a
    # binary file" too. A single-byte code page's letters are not UTF-16 (below).
    for order in ("utf-16-le", "utf-16-be"):
        for text in ("\u3000一、吾輩は猫である。名前はまだ無い。\n\u3000どこで生れたかとんと見当がつかぬ。\n",
                     "\u3000\u3000第一回　宴桃園豪傑三結義　斬黃巾英雄首立功\n話說天下大勢，分久必合，合久必分。\n",
                     "Все счастливые семьи похожи друг на друга, каждая несчастливая семья несчастлива по-своему.\n",
                     "Άνδρα μοι έννεπε, Μούσα, πολύτροπον, ος μάλα πολλά πλάγχθη.\n"):
            no_bom.write_bytes(text.encode(order) * 30)
            with pytest.raises(HomeLLMError, match=f"pass --encoding {order}$"):
                docs([str(no_bom)])
    no_bom.write_bytes("Все счастливые семьи похожи друг на друга.\0\n".encode("cp1251") * 30)
    with pytest.raises(HomeLLMError, match="a binary file"):
        docs([str(no_bom)])
    # ISO-2022-JP ("JIS"), 7-bit: it read as ASCII, escape bytes and all. Its escapes to kanji name it.
    jis = tmp_path / "jis.txt"
    jis.write_bytes(("吾輩は猫である。\nＡＢＣ and ascii\n" * 40).encode("iso2022_jp"))
    assert docs([str(jis)]) == [("吾輩は猫である。\nＡＢＣ and ascii\n" * 40)]
    noise = tmp_path / "noise.bin.txt"  # bytes that are no text, with NULs: still a binary file
    rng = random.Random(0)
    noise.write_bytes(bytes(rng.choice([0] * 64 + [*range(256)]) for _ in range(8192)))
    with pytest.raises(HomeLLMError, match="noise.bin.txt: a binary file"):
        docs([str(noise)])
    # A compiled Python module is mostly ASCII with some UTF-8: its pairs of bytes read as Chinese in UTF-16, and it
    # was named UTF-16 (72 .pyc files of a Python install were); its NUL characters (lengths, offsets) say binary.
    import html.entities
    import inspect
    import marshal

    code = compile(inspect.getsource(html.entities), "entities.py", "exec")
    pyc = write(tmp_path / "entities.txt", "")
    pyc.write_bytes(importlib.util.MAGIC_NUMBER + bytes(12) + marshal.dumps(code))
    monkeypatch.setattr(data, "_CHUNK_BYTES", 1 << 16)
    with pytest.raises(HomeLLMError, match="entities.txt: a binary file"):
        docs([str(pyc)])
    weights = tmp_path / "model.safetensors"  # given by mistake: it was "UTF-16 without a byte-order mark"
    weights.write_bytes(b"\x08\x01\x00\x00\x00\x00\x00\x00{\"w\": {\"dtype\": \"F32\"}}" + bytes(range(256)) * 4)
    with pytest.raises(HomeLLMError, match="model.safetensors: a binary file .*, not text: give the text files"):
        docs([str(weights)])
    nul = write(tmp_path / "nul.txt", "text with a NUL\0 character in it\n" * 4)  # text after all: it can be read
    with pytest.raises(HomeLLMError, match=r"or pass --encoding utf-8 if it is text that holds NUL characters"):
        docs([str(nul)])
    assert docs([str(nul)], encoding="utf-8") == [nul.read_text()]


def test_a_folder_reads_linked_folders_and_names_the_files_it_leaves(tmp_path, capsys, monkeypatch):
    """Inputs a prepare met on real corpora: a name with brackets was read as a glob pattern and refused; a corpus
    linked into a folder was skipped, as were other kinds of file, unsaid; a table was read as text."""
    (tmp_path / "lib").mkdir()
    book = write(tmp_path / "lib" / "Book [Vol 1].txt", "one\n")
    assert docs([str(book)]) == ["one\n"]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write(corpus / "b.txt", "two\n")
    (tmp_path / "lib" / "linked").symlink_to(corpus, target_is_directory=True)
    (corpus / "loop").symlink_to(tmp_path / "lib", target_is_directory=True)  # a link back up: read once
    write(tmp_path / "lib" / "notes.md", "# notes")
    write(tmp_path / "lib" / "c.json", "[]")
    capsys.readouterr()
    assert docs([str(tmp_path / "lib")]) == ["one\n", "two\n"]
    assert f"note: {tmp_path / 'lib'}: reading its .txt/.jsonl files only, not 2 other file(s) (1 .md, 1 .json)" in (
        capsys.readouterr().err)
    os.mkfifo(tmp_path / "pipe")  # (as /dev/stdin or <(zcat x.gz)): its first 4 KB were lost unsaid
    with pytest.raises(HomeLLMError, match=r"pipe: a pipe or device, not a file: .* save the text to a file first"):
        docs([str(tmp_path / "pipe")])
    # A table: read by datasets as the message writes it (it named the folder, and an absolute one as hf:.//tmp/x)
    (tmp_path / "tables").mkdir()
    table = write(tmp_path / "tables" / "t.csv", "id,text\n1,hello\n")
    (tmp_path / "gone.txt").symlink_to(tmp_path / "moved.txt")  # a link whose file is gone: "a pipe or device"
    for spec in (str(tmp_path / "gone.txt"), str(tmp_path / "g*.txt")):
        with pytest.raises(HomeLLMError, match=f"gone.txt: a link to {tmp_path / 'moved.txt'}, which is not there"):
            docs([spec])
    (tmp_path / "gone.txt").unlink()
    with pytest.raises(HomeLLMError) as e:
        docs([str(table)])
    assert str(e.value) == (f"{table}: a csv table: read it with Hugging Face datasets, `--input hf:{table} "
                            "--text-field COLUMN` (pip install 'homellm[hf]'), or write it as .txt or .jsonl")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(HomeLLMError, match=r"`--input hf:tables/t.csv --text-field COLUMN`"):
        docs(["tables/t.csv"])
    if importlib.util.find_spec("datasets"):
        assert docs([f"hf:{table}"]) == docs(["hf:tables/t.csv"]) == ["hello"]


def test_utf8_bom_and_crlf(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbfline one\r\nline two\r\n")
    assert docs([str(path)]) == ["line one\nline two\n"]


def test_jsonl_custom_field_and_errors(tmp_path, capsys):
    good = write(tmp_path / "a.jsonl", '{"body": "first", "id": 1}\n\n{"body": "second\\r\\nline"}\n{"body": ""}\n')
    assert docs([str(good)], text_field="body") == ["first", "second\nline"]
    # Flags that only the other kind of input reads were ignored unsaid.
    assert docs([str(good)], text_field="body", encoding="cp932") == ["first", "second\nline"]
    assert "note: --encoding cp932 applies to .txt files only" in capsys.readouterr().err
    assert docs([str(write(tmp_path / "t.txt", "plain\n"))], text_field="body") == ["plain\n"]
    assert "note: --text-field body applies to .jsonl and hf: inputs only" in capsys.readouterr().err
    with pytest.raises(HomeLLMError) as e:
        docs([str(good)])
    assert f"{good}:1: no field 'text'" in str(e.value) and "body" in str(e.value) and "--text-field" in str(e.value)
    # Conversations read as text: no --text-field reads them (messages is a list; Alpaca's text is three fields)
    chats = write(tmp_path / "chat.jsonl", '{"messages": [{"role": "user", "content": "hi"}]}\n')
    alpaca = write(tmp_path / "al.jsonl", '{"instruction": "add", "input": "1 2", "output": "3"}\n')
    for path, kind in ((chats, "messages"), (alpaca, "Alpaca instructions")):
        with pytest.raises(HomeLLMError, match=re.escape(f"these are {kind}, which `homellm sft --init RUN --data "
                                                         f"{path}` fine-tunes a trained run on")):
            docs([str(path)])
    bad = write(tmp_path / "b.jsonl", '{"text": "ok"}\n{"text": "ok"}\n{"text": "broken\n')
    with pytest.raises(HomeLLMError, match=rf"{bad}:3: not a JSON line .*: fix or delete the line$"):
        docs([str(bad)])
    # A closing brace missing: the column is the line's end (review: JSON's own counted the line break, "column 1")
    for text, column in (('{"text": "ok"\n', 14), ('{"text": "ok"\r\n', 14), ('{"text" "ok"}\n', 9)):
        bad = write(tmp_path / "b.jsonl", '{"text": "ok"}\n' + text + '{"text": "ok"}\n')
        with pytest.raises(HomeLLMError, match=rf"{bad}:2: not a JSON line \(not valid JSON: Expecting ['a-z:, ]+ "
                                               rf"at column {column}\): fix or delete the line$"):
            docs([str(bad)])
    # The same last line without its line break: a file cut short (a copy stopped partway), said so; inside a
    # character too (it was "not UTF-8 ... iconv -f cp932")
    for cut in (1, 2):
        short = tmp_path / "short.jsonl"
        short.write_bytes(('{"text": "ok"}\n{"text": "吾輩は猫である"}').encode()[:-2 - cut])
        with pytest.raises(HomeLLMError, match=rf"{short}:2: the file ends partway through a character of this line"):
            docs([str(short)])
    for end in ('{"text": "brok', '{"text": "broken"', '{"text": "broken",'):
        cut = write(tmp_path / "cut.jsonl", '{"text": "ok"}\n' + end)
        with pytest.raises(HomeLLMError, match=rf"{cut}:2: not a JSON line .*: the file ends partway through "
                                               "this line, as a file cut short does: delete the line, or get the "
                                               "whole file"):
            docs([str(cut)])
    with pytest.raises(HomeLLMError, match="is an int, not text: pass --text-field with the field that holds"):
        docs([str(write(tmp_path / "c.jsonl", '{"text": 5}\n'))])
    with pytest.raises(HomeLLMError, match=r"c.jsonl:3: field 'text' is a bool, not text: fix or delete the record \(2 "
                                           r"before it hold text in 'text'\)$"):  # (audit: not the field's fault)
        docs([str(write(tmp_path / "c.jsonl", '{"text": "a"}\n{"text": "b"}\n{"text": true}\n'))])
    with pytest.raises(HomeLLMError, match=r"the inputs are empty$"):  # (a .txt has no --text-field to blame)
        docs([str(write(tmp_path / "empty.txt", " \n"))])
    with pytest.raises(HomeLLMError, match=r"the inputs are empty, or --text-field names an empty field$"):
        docs([str(write(tmp_path / "empty.jsonl", '{"text": ""}\n'))])
    # JSON's "\ud800" escape is half of a UTF-16 pair: named, where no tokenizer could take it; a whole pair is text
    lone = write(tmp_path / "d.jsonl", '{"text": "ok \\ud83d\\ude00 pair"}\n{"text": null}\n{"text": "lone \\ud800"}\n')
    with pytest.raises(HomeLLMError) as e:
        docs([str(lone)])
    assert f"{lone}:3: field 'text' holds '\\ud800' at character 5, half of a UTF-16 pair" in str(e.value)
    assert docs([str(lone)], max_docs=1) == ["ok \U0001f600 pair"]


def test_folders_globs_and_missing_inputs(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path / "b.txt", "bee")
    write(tmp_path / "sub" / "a.jsonl", '{"text": "ay"}\n')
    write(tmp_path / "sub" / "skip.csv", "no")
    assert docs([str(tmp_path)]) == ["bee", "ay"]
    assert docs([str(tmp_path / "**" / "*.jsonl")]) == ["ay"]
    with pytest.raises(HomeLLMError, match="no such file"):
        docs([str(tmp_path / "nope.txt")])
    with pytest.raises(HomeLLMError, match="matches no file"):
        docs([str(tmp_path / "*.md")])
    with pytest.raises(HomeLLMError, match="no input"):
        docs([])
    with pytest.raises(HomeLLMError, match="no text"):
        docs([str(write(tmp_path / "blank.txt", "\n \n"))])
    more = [str(write(tmp_path / f"{c}.txt", c * 3)) for c in "cde"]
    assert docs([str(tmp_path / "b.txt"), *more], max_docs=3) == ["bee", "ccc", "ddd"]


def test_tinystories_separator_splits_documents(tmp_path):
    path = need("tinystories/train-first-2MiB.txt")
    raw = path.read_text(encoding="utf-8")
    stories = docs([str(path)])
    expected = [s.strip() for s in raw.split(EOT)]
    expected[-1] = raw.split(EOT)[-1].lstrip()  # the end of the file is kept as is
    assert stories == expected and len(stories) == raw.count(EOT) + 1
    assert not any(EOT in s for s in stories)
    # whitespace around separators goes, empty documents are skipped
    small = write(tmp_path / "s.txt", f"  one\n{EOT}\n\n{EOT}two  \n {EOT}\nthree\n")
    assert docs([str(small)]) == ["  one", "two", "three\n"]


def test_chunked_reading_changes_nothing(tmp_path, monkeypatch):
    """Tiny read blocks split documents into many pieces; the documents and the tokens must not change."""
    ts = str(need("tinystories/train-first-2MiB.txt"))
    ja = str(need("ja_aozora/sjis/jigokuhen_shinji.txt"))
    tok = Tokenizer.load(bpe_tok(tmp_path, ts, ja))
    whole = {p: docs([p]) for p in (ts, ja)}
    whole_ids = {p: [tok.encode(d) for d in whole[p]] for p in (ts, ja)}
    monkeypatch.setattr(data, "_CHUNK_BYTES", 997)  # an odd size, so cuts land inside multi-byte characters
    for p in (ts, ja):
        pieces = list(iter_documents([p]))
        assert sum(not piece.end for piece in pieces) > 20  # documents really were cut into pieces
        assert docs([p]) == whole[p]
        ids: list[list[int]] = [[] for _ in whole[p]]
        for piece in pieces:
            ids[piece.doc] += tok.encode(piece.text)
        assert ids == whole_ids[p]


def bpe_tok(tmp_path: Path, *inputs: str) -> Path:
    train_tokenizer(TokenizerConfig(input=list(inputs), out=str(tmp_path / "bpe"), vocab_size=400, max_chars=300_000))
    return tmp_path / "bpe"


def test_single_document_splits_like_nanogpt(tmp_path):
    path = str(need("tinyshakespeare/input.txt"))
    text = Path(path).read_text(encoding="utf-8")
    n = len(text)
    out = tmp_path / "shk"
    meta = prepare(PrepareConfig(input=[path], tokenizer=str(char_tok(tmp_path, path)), out=str(out),
                                 shard_tokens=300_000))
    tok = Tokenizer.load(out)
    train, val = tokens(out, "train"), tokens(out, "val")
    # nanoGPT: train = text[:int(n * 0.9)], val = text[int(n * 0.9):]; the end-of-text closes the document
    assert tok.decode(train.tolist()) == text[: int(n * 0.9)]
    assert tok.decode(val.tolist()) == text[int(n * 0.9):] + EOT
    assert meta["split"] == "position" and meta["documents"] == 1
    assert (meta["train_bytes"], meta["val_bytes"]) == (int(n * 0.9), n - int(n * 0.9))  # ASCII: 1 byte a char
    check_shards(out, meta, 300_000)


def test_a_long_jsonl_record_is_tokenized_in_pieces_to_the_same_ids(tmp_path, monkeypatch):
    """A record was tokenized whole: one of 8.1 M characters peaked at 1.98 GB (0.58 GB in pieces, as a .txt file
    is cut: bench/README.md). Cut at the same stable places, its ids are those of the whole text."""
    monkeypatch.setattr(data, "_CHUNK_BYTES", 256)
    text = "".join(f"第{i}章　吾輩は猫である。名前はまだ無い。\nthe cat sees the moon.\n" for i in range(300))
    path = write(tmp_path / "r.jsonl", json.dumps({"text": text}, ensure_ascii=False) + "\n{\"text\": \"short\"}\n")
    pieces = list(iter_documents([str(path)]))
    assert sum(p.doc == 0 for p in pieces) > 10 and docs([str(path)]) == [text, "short"]
    train_tokenizer(TokenizerConfig(input=[str(path)], out=str(tmp_path / "tok"), vocab_size=400))
    tok = Tokenizer.load(tmp_path / "tok")
    prepare(PrepareConfig(input=[str(path)], tokenizer=str(tmp_path / "tok"), out=str(tmp_path / "d"),
                          val_fraction=0.0))
    ids = np.concatenate([np.asarray(m) for m in open_split(tmp_path / "d", "train")]).tolist()
    assert ids == tok.encode(text) + [tok.eot_id] + tok.encode("short") + [tok.eot_id]


def test_a_split_by_position_deletes_no_file_it_still_maps(tmp_path, windows_deletes):
    """One document is split by position: its shards are rewritten and the old ones deleted, the last one while a
    view of its last block still mapped it (Windows refuses that: every prepare of one document failed there).
    eval's test of raw text runs under the same rule (its temporary folder held mapped shards)."""
    text = write(tmp_path / "one.txt", "the same long document. " * 3000)
    meta = prepare(PrepareConfig(input=[str(text)], tokenizer=str(char_tok(tmp_path, str(text))),
                                 out=str(tmp_path / "d"), shard_tokens=20_000))
    assert meta["train_tokens"] + meta["val_tokens"] == len(text.read_text()) + 1 and meta["val_tokens"] > 0
    assert not list((tmp_path / "d").glob(".old_*"))


def test_a_few_uneven_documents_are_noted_and_split_position_splits_by_tokens(tmp_path, capsys):
    """Each .txt file is one document: a folder of a long book and short stories put the book (90 % of the text) in
    val without a word, as --val-fraction counts documents. Now said, and --split position holds out the tokens'
    last tenth, across documents, as nanoGPT does. (A document's side is decided by its first 1,000 characters, not
    its first piece's: here "book N", cut at the last line break before the text's trailing space.)"""
    def where(text: str) -> bool:
        return data._is_val(0, text[:data._KEY_CHARS], 0.1)

    book = next(b for i in range(100) if where(b := f"book {i}\n" + "the long book goes on. " * 3000))
    stories = [s for i in range(200) if not where(s := f"story {i}: a short one.\n" * 20)][:20]
    (tmp_path / "books").mkdir()
    files = [write(tmp_path / "books" / f"{n:02}.txt", text) for n, text in enumerate([book, *stories])]
    tok = char_tok(tmp_path, *map(str, files))
    capsys.readouterr()
    # The book held out would be most of the text (review: 6 Aozora books, 86% in val, a note): split by position
    meta = prepare(PrepareConfig(input=[str(tmp_path / "books")], tokenizer=str(tok), out=str(tmp_path / "d")))
    assert meta["split"] == "position" and abs(meta["val_tokens"] / (meta["val_tokens"] + meta["train_tokens"])
                                               - 0.1) < 0.001
    t = Tokenizer.load(tmp_path / "d")  # every document kept: those trained on first, then the book (review: lost)
    whole = t.decode(tokens(tmp_path / "d", "train").tolist() + tokens(tmp_path / "d", "val").tolist())
    assert whole == EOT.join(stories) + EOT + book + EOT
    assert re.search(r"note: the 1 of 21 documents held out would hold 8\d% of the tokens, more than training: split "
                     "by position instead, the last 10% of the tokens held out", capsys.readouterr().err)
    # A shorter book held out: a third of the text, which still leaves most to train on, is said
    short = next(b for i in range(100) if where(b := f"book {i}\n" + "the long book goes on. " * 220))
    write(files[0], short)
    meta = prepare(PrepareConfig(input=[str(tmp_path / "books")], tokenizer=str(tok), out=str(tmp_path / "e")))
    share = meta["val_tokens"] / (meta["val_tokens"] + meta["train_tokens"])
    assert meta["split"] == "document" and meta["val_documents"] == 1 and 0.2 < share < 0.5
    assert (f"note: val holds {100 * share:.2g}% of the tokens, where --val-fraction 0.1 asks for about 10%: the "
            "split goes by document (1 of 21 held out), and they differ in length. --split position (prepare's, or "
            "pretrain's for raw text) holds out the last 10% of the tokens instead") in capsys.readouterr().err
    write(files[0], book)
    # A --val-fraction of a half or more asks val to outweigh training: its split by document stays (review)
    meta = prepare(PrepareConfig(input=[str(tmp_path / "books")], tokenizer=str(tok), out=str(tmp_path / "f"),
                                 val_fraction=0.6))
    assert meta["split"] == "document" and meta["val_tokens"] > meta["train_tokens"]
    meta = prepare(PrepareConfig(input=[str(tmp_path / "books")], tokenizer=str(tok), out=str(tmp_path / "p"),
                                 split="position"))
    t = Tokenizer.load(tmp_path / "p")
    whole = t.decode(tokens(tmp_path / "p", "train").tolist() + tokens(tmp_path / "p", "val").tolist())
    assert meta["split"] == "position" and whole == EOT.join([book, *stories]) + EOT
    assert abs(meta["val_tokens"] / (meta["val_tokens"] + meta["train_tokens"]) - 0.1) < 0.001
    assert "note: val holds" not in capsys.readouterr().err
    with pytest.raises(HomeLLMError, match=r"--split 'tokens' is unknown: use document or position"):
        prepare(PrepareConfig(input=[str(tmp_path / "books")], tokenizer=str(tok), out=str(tmp_path / "q"),
                              split="tokens"))
    with pytest.raises(HomeLLMError, match=r"--shard-tokens 5: must be 1,000 or more"):  # (the library took 5: review)
        prepare(PrepareConfig(input=[str(tmp_path / "books")], tokenizer=str(tok), out=str(tmp_path / "q"),
                              shard_tokens=5))


def test_documents_split_by_hash_end_with_eot_and_shards_match_meta(tmp_path):
    lines = [json.dumps({"text": f"story {i} " + "word " * (i % 7)}) for i in range(300)]
    src = write(tmp_path / "s.jsonl", "\n".join(lines) + "\n")
    tok = char_tok(tmp_path, str(src))
    meta = prepare(PrepareConfig(input=[str(src)], tokenizer=str(tok), out=str(tmp_path / "d"), shard_tokens=1000,
                                 val_fraction=0.2, seed=1))
    assert meta["split"] == "document" and meta["documents"] == 300 and 30 < meta["val_documents"] < 90
    t = Tokenizer.load(tmp_path / "d")
    stories = []
    for split in ("train", "val"):
        ids = tokens(tmp_path / "d", split)
        assert ids[-1] == t.eot_id  # every document ends with end-of-text
        stories += t.decode(ids.tolist()).split(EOT)[:-1]
    assert sorted(stories) == sorted(json.loads(line)["text"] for line in lines)
    assert meta["train_bytes"] + meta["val_bytes"] == sum(len(s.encode()) for s in stories)
    check_shards(tmp_path / "d", meta, 1000)
    # the split depends on the seed only
    again = prepare(PrepareConfig(input=[str(src)], tokenizer=str(tok), out=str(tmp_path / "e"), val_fraction=0.2,
                                  seed=1))
    assert again["val_documents"] == meta["val_documents"]
    assert np.array_equal(tokens(tmp_path / "e", "val"), tokens(tmp_path / "d", "val"))
    # Another prepare into the same --out at once: refused (the two replaced each other's staging folder, and the
    # first's clean-up deleted the other's finished data); the lock goes with the prepare that held it.
    held = data._lock(tmp_path / "e")
    with pytest.raises(HomeLLMError, match=r"--out .*e is being prepared by another process right now"):
        prepare(PrepareConfig(input=[str(src)], tokenizer=str(tok), out=str(tmp_path / "e"), seed=1))
    assert again == read_meta(tmp_path / "e")  # (its data untouched)
    held.close()
    prepare(PrepareConfig(input=[str(src)], tokenizer=str(tok), out=str(tmp_path / "e"), val_fraction=0.2, seed=1))
    assert not (tmp_path / "e" / data._LOCK).exists()
    # A corpus that grows (a relay's next session) keeps each document on its side: by index, a file added before
    # the others moved every document, and ones trained on became val ones.
    grown = write(tmp_path / "a.jsonl", "\n".join(json.dumps({"text": f"new story {i}"}) for i in range(40)) + "\n")
    prepare(PrepareConfig(input=[str(grown), str(src)], tokenizer=str(tok), out=str(tmp_path / "g"),
                          val_fraction=0.2, seed=1))
    sides = {}
    for out in ("d", "g"):
        for split in ("train", "val"):
            for story in t.decode(tokens(tmp_path / out, split).tolist()).split(EOT)[:-1]:
                sides.setdefault(story, set()).add(split)
    assert all(len(s) == 1 for s in sides.values()) and len(sides) == 340


def check_shards(out: Path, meta: dict, shard_tokens: int) -> None:
    assert read_meta(out) == meta
    for split in ("train", "val"):
        shards = meta["shards"][split]
        assert sum(s["tokens"] for s in shards) == meta[f"{split}_tokens"]
        assert all(0 < s["tokens"] <= shard_tokens for s in shards)
        for s in shards:
            assert (out / s["file"]).stat().st_size == s["tokens"] * np.dtype(meta["dtype"]).itemsize
    assert sorted(p.name for p in out.glob("*.bin")) == sorted(s["file"] for v in meta["shards"].values() for s in v)
    assert Tokenizer.load(out).vocab_size == meta["vocab_size"]


def test_dtype_follows_vocabulary_size(tmp_path):
    small = write(tmp_path / "small.txt", "abcabc")
    meta = prepare(PrepareConfig(input=[str(small)], tokenizer=str(char_tok(tmp_path, str(small))),
                                 out=str(tmp_path / "u16"), val_fraction=0.0))
    assert meta["dtype"] == "uint16" and meta["val_tokens"] == 0 and open_split(tmp_path / "u16", "val") == []
    # a char vocabulary of 70,000 characters needs uint32
    alphabet = "".join(chr(0x20000 + i) for i in range(70_000))
    big = write(tmp_path / "alphabet.txt", alphabet)
    tok = train_tokenizer(TokenizerConfig(input=[str(big)], out=str(tmp_path / "bigtok"), kind="char"))
    assert tok.vocab_size > 2**16
    text = write(tmp_path / "t.txt", alphabet[-5:])
    meta = prepare(PrepareConfig(input=[str(text)], tokenizer=str(tmp_path / "bigtok"), out=str(tmp_path / "u32")))
    ids = np.concatenate([tokens(tmp_path / "u32", "train"), tokens(tmp_path / "u32", "val")])
    assert meta["dtype"] == "uint32" and ids.dtype == np.uint32 and ids.max() > 2**16
    assert tok.decode(ids.tolist(), skip_special=True) == alphabet[-5:]


def test_hf_inputs_through_an_injected_datasets_module(tmp_path, monkeypatch):
    calls = []

    def load_dataset(name, config=None, split=None, streaming=False):
        calls.append((name, config, split, streaming))
        return iter([{"text": f"row {i}", "n": i} for i in range(10)])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    hosts = []
    for offline in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):  # (conftest sets them: no test may reach the hub)
        monkeypatch.delenv(offline)
    for proxy in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, port: hosts.append(host) or [])  # the hub resolves
    assert docs(["hf:someone/stories"], max_docs=3) == ["row 0", "row 1", "row 2"]
    assert hosts == ["huggingface.co"]
    assert docs(["hf:someone/stories:cfg:validation"])[-1] == "row 9"
    assert calls == [("someone/stories", None, "train", True), ("someone/stories", "cfg", "validation", True)]
    with pytest.raises(HomeLLMError, match="no field 'body'.*--text-field"):
        docs(["hf:x"], text_field="body")
    with pytest.raises(HomeLLMError, match=r"hf:x: row 0: field 'n' is an int, not text"):  # not skipped unsaid
        docs(["hf:x"], text_field="n")
    src = write(tmp_path / "a.txt", "row 0123456789")
    meta = prepare(PrepareConfig(input=["hf:x:test"], tokenizer=str(char_tok(tmp_path, str(src))),
                                 out=str(tmp_path / "d")))
    assert meta["documents"] == 10 and meta["inputs"] == ["hf:x:test"]
    # Offline: said at once (the hub's own retries took half a minute), and a mirror's name is the one looked up
    def unresolved(host, port):
        hosts.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", unresolved)
    monkeypatch.setenv("HF_ENDPOINT", "https://hf-mirror.com")
    calls.clear()
    with pytest.raises(HomeLLMError, match=r"^hf:x: cannot reach hf-mirror.com \(Name or service not known\): connect "
                                           r"to the network, or set HF_ENDPOINT to a mirror you can reach$"):
        docs(["hf:x"])
    assert calls == [] and hosts[-1] == "hf-mirror.com"
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")  # behind a proxy: the proxy resolves names
    assert docs(["hf:x"], max_docs=1) == ["row 0"]
    monkeypatch.delenv("HTTPS_PROXY")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub's offline mode (its cache) is not refused
    assert docs(["hf:x"], max_docs=1) == ["row 0"]
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(HomeLLMError, match=r"pip install 'homellm\[hf\]'"):
        docs(["hf:x"])


def test_val_input_is_the_val_split_whole_and_input_all_train(tmp_path, monkeypatch, capsys):
    """--val-input: val is that text, every document of it, and train all of --input (a hub dataset's own
    validation split, whose published losses are measured on it; or the user's own val.txt)."""
    from homellm.cli import main

    train = write(tmp_path / "train.jsonl", "".join(f'{{"text": "train story {i}"}}\n' for i in range(30)))
    val = write(tmp_path / "val.jsonl", "".join(f'{{"text": "val tale {i}"}}\n' for i in range(4)))
    tok = char_tok(tmp_path, str(train), str(val))
    meta = prepare(PrepareConfig(input=[str(train)], val_input=[str(val)], tokenizer=str(tok), out=str(tmp_path / "d")))
    assert (meta["split"], meta["documents"], meta["val_documents"]) == ("inputs", 34, 4)
    assert meta["val_inputs"] == [str(val)]
    tokenizer = Tokenizer.load(tok)
    for split, texts in (("train", [f"train story {i}" for i in range(30)]),
                         ("val", [f"val tale {i}" for i in range(4)])):
        (shard,) = open_split(tmp_path / "d", split)
        assert tokenizer.decode(shard.tolist()) == "".join(t + EOT for t in texts)
    assert main(["pretrain", "--preset", "tiny", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "run"),
                 "--max-steps", "1", "--block-size", "8", "--eval-every", "0"]) == 0
    assert main(["info", str(tmp_path / "run")]) == 0
    assert f"from 34 documents (val: {val})" in capsys.readouterr().out
    # A hub dataset's two splits, streamed one after the other
    calls = []

    def load_dataset(name, config=None, split=None, streaming=False):
        calls.append(split)
        return iter([{"text": f"{split} row {i}"} for i in range(3 if split == "validation" else 12)])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, port: [])
    for offline in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(offline)
    tok = char_tok(tmp_path, str(write(tmp_path / "abc.txt", "abcdefghijklmnopqrstuvwxyz 0123456789")))
    meta = prepare(PrepareConfig(input=["hf:a/b"], val_input=["hf:a/b:validation"], tokenizer=str(tok),
                                 out=str(tmp_path / "h")))
    assert calls == ["train", "validation"] and (meta["documents"], meta["val_documents"]) == (15, 3)
    # What contradicts it, or leaves val empty, is one line
    for argv, message in ((["--split", "position"], "--split position and --val-input both say what val is"),
                          (["--val-fraction", "0.2"], "--val-fraction 0.2 and --val-input both say what val is")):
        assert main(["prepare", "--input", str(train), "--val-input", str(val), "--tokenizer", str(tok), "--out",
                     str(tmp_path / "e"), *argv]) == 2
        assert message in capsys.readouterr().err
    # The val text among the training text (named twice, or in a folder given): val scored what trained, unsaid
    for inputs in ([str(train), str(val)], [str(tmp_path)]):
        with pytest.raises(HomeLLMError, match=re.escape(f"--val-input {val} is among the text trained on too")):
            prepare(PrepareConfig(input=inputs, val_input=[str(val)], tokenizer=str(tok), out=str(tmp_path / "o")))
    write(tmp_path / "empty.jsonl", "\n")
    with pytest.raises(HomeLLMError, match="empty.jsonl"):
        prepare(PrepareConfig(input=[str(train)], val_input=[str(tmp_path / "empty.jsonl")], tokenizer=str(tok),
                              out=str(tmp_path / "e")))


def test_hf_inputs_stream_through_the_real_datasets_package(tmp_path):
    """The hub's loading code itself, offline: a local folder in the hub's layout streams as a dataset would."""
    pytest.importorskip("datasets", reason="the hf extra (datasets) is not installed")
    gsm8k = need("gsm8k")
    direct = docs([str(gsm8k / "train.jsonl")], text_field="question", max_docs=40)
    assert docs([f"hf:{gsm8k}"], text_field="question", max_docs=40) == direct and len(direct) == 40
    assert docs([f"hf:{gsm8k}:train"], text_field="answer", max_docs=2)[1].startswith("Weng earns")
    with pytest.raises(HomeLLMError, match=r"no field 'text' \(found: question, answer\).*--text-field"):
        docs([f"hf:{gsm8k}"])
    # Errors that appear only while rows stream (a dropped connection, a file that is not UTF-8) are one line too.
    latin1 = tmp_path / "latin1"
    latin1.mkdir()
    (latin1 / "a.txt").write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    with pytest.raises(HomeLLMError, match=r"latin1: reading row 0 failed \(.*utf-8.*\): check the network"):
        docs([f"hf:{latin1}"])
    # datasets reads .txt files a row per line: they are read as homellm reads a .txt file, not a document a line
    texts = tmp_path / "texts"
    texts.mkdir()
    story = "First line.\n\n  Second paragraph, indented.\nLast line.\n"
    (texts / "train.txt").write_text(story + f"{EOT}\n" + story, encoding="utf-8")
    assert docs([f"hf:{texts}"]) == docs([str(texts / "train.txt")]) == [story.rstrip(), story]


def test_hf_inputs_read_one_local_table_file_and_saved_datasets(tmp_path, monkeypatch):
    """hf:FILE for one .parquet/.csv/.tsv/.jsonl file (datasets found no data in a file, only in its folder), and a
    folder that Dataset.save_to_disk wrote (datasets told a homellm user to call load_from_disk)."""
    datasets = pytest.importorskip("datasets", reason="the hf extra (datasets) is not installed")
    rows = {"id": [1, 2, 3], "text": ["一つ目", "second row", "third"]}
    table = datasets.Dataset.from_dict(rows)
    table.to_parquet(str(tmp_path / "t.parquet"))
    table.to_csv(str(tmp_path / "t.tsv"), sep="\t", index=False)
    table.to_json(str(tmp_path / "t.jsonl"), force_ascii=False)
    for name in ("t.parquet", "t.tsv", "t.jsonl"):
        assert docs([f"hf:{tmp_path / name}"]) == rows["text"], name
    table.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": table, "test": table.select([2])}).save_to_disk(str(tmp_path / "splits"))
    assert docs([f"hf:{tmp_path / 'saved'}"]) == docs([f"hf:{tmp_path / 'splits'}"]) == rows["text"]
    assert docs([f"hf:{tmp_path / 'splits'}:test"]) == ["third"]
    # A path with colons (Windows' C:\\..., a folder run:2) was cut at them, and read as a hub name
    (tmp_path / "run:2").mkdir()
    table.to_parquet(str(tmp_path / "run:2" / "train.parquet"))
    colons = tmp_path / "run:2"
    assert docs([f"hf:{colons / 'train.parquet'}"]) == docs([f"hf:{colons}:train"]) == rows["text"]
    monkeypatch.chdir(tmp_path)  # a relative one, kept in a run's config, is made absolute: a resume elsewhere reads it
    from homellm.train import absolute_inputs

    assert absolute_inputs(["hf:run:2:train", "hf:someone/data:train", "t.jsonl"]) == [
        f"hf:{tmp_path / 'run:2'}:train", "hf:someone/data:train", str(tmp_path / "t.jsonl")]
    for spec, error in ((f"hf:{tmp_path / 'splits'}:dev", "no split 'dev': it has train, test"),
                        (f"hf:{tmp_path / 'saved'}:test", "a saved dataset of one split: write hf:"),
                        (f"hf:{tmp_path / 't.parquet'}:test", "a file is one split: write hf:"),
                        (f"hf:{write(tmp_path / 'a.txt', 'x')}", "a .txt file: hf: reads .parquet, .csv")):
        with pytest.raises(HomeLLMError, match=re.escape(error)):
            docs([spec])


def test_failed_prepare_keeps_earlier_data_and_readers_explain(tmp_path):
    good = write(tmp_path / "a.jsonl", '{"text": "hello"}\n{"text": "world"}\n')
    tok = str(char_tok(tmp_path, str(good)))
    out = tmp_path / "d"
    prepare(PrepareConfig(input=[str(good)], tokenizer=tok, out=str(out)))
    before = {f.relative_to(out): f.read_bytes() for f in out.rglob("*") if f.is_file()}
    bad = write(tmp_path / "b.jsonl", '{"text": "hello"}\nnot json\n')
    for inputs, message in [([str(bad)], "b.jsonl:2"), ([str(tmp_path / "none.txt")], "no such file"),
                            ([str(tmp_path / "*.none")], "matches no file")]:
        with pytest.raises(HomeLLMError, match=message):
            prepare(PrepareConfig(input=inputs, tokenizer=tok, out=str(out)))
        assert {f.relative_to(out): f.read_bytes() for f in out.rglob("*") if f.is_file()} == before
    # A prepare killed mid-way (SIGKILL: no clean-up) leaves its staging folder: named, then cleared by the next.
    (out / ".preparing").mkdir()
    (out / ".preparing" / "train_00000.bin").write_bytes(b"\0" * 2**20)
    assert staged_note(out) == (f"{out / '.preparing'} holds 1.0 MiB from a prepare into {out} that was interrupted "
                                "or is running: training reads the complete data beside it; delete the folder once no "
                                "prepare runs")
    (out / "meta.json").unlink()
    with pytest.raises(HomeLLMError, match=r"no meta.json \(a prepare into it was interrupted or is running\)\): run "
                                           "`homellm prepare"):
        read_meta(out)
    prepare(PrepareConfig(input=[str(good)], tokenizer=tok, out=str(out)))
    assert not (out / ".preparing").exists() and staged_note(out) == ""
    (out / "train_00000.bin").write_bytes(b"\0")
    with pytest.raises(HomeLLMError, match="train_00000.bin: missing or not"):
        open_split(out, "train")
    with pytest.raises(HomeLLMError, match="--tokenizer is required"):
        prepare(PrepareConfig(input=[str(good)], out=str(out)))


def test_one_enormous_line_is_cut_without_breaking_separators(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_CHUNK_BYTES", 61)  # no line break at all: the reader must cut mid-line
    text = f" {EOT} ".join(f"story {i} " + "日本語 " * (i % 30) for i in range(60))
    path = write(tmp_path / "line.txt", text)
    parts = text.split(EOT)
    assert docs([str(path)]) == [s.strip() for s in parts[:-1]] + [parts[-1].lstrip()]  # the file's end is verbatim
    assert len(list(iter_documents([str(path)]))) > 60
    # --aozora's reader regroups the text by whole lines: one enormous line is passed on in bounded pieces too (it
    # was held whole: 1.7 GB of memory for a 10 MB line)
    blocks = [text[i:i + 61] for i in range(0, len(text), 61)]
    pieces = list(data._lines_whole(blocks))
    assert "".join(pieces) == text and len(pieces) > 10 and max(map(len, pieces)) <= 5 * 61


def test_characters_a_char_tokenizer_never_saw_are_counted_and_mostly_unknown_text_is_refused(tmp_path, capsys):
    english = tmp_path / "en.txt"
    english.write_text("the cat sat on the mat\n" * 50, encoding="utf-8")
    tok = tmp_path / "tok"
    train_tokenizer(TokenizerConfig(input=[str(english)], out=str(tok), kind="char"))
    mixed = tmp_path / "mixed.txt"
    mixed.write_text("the cat sat on the mat é\n" * 50, encoding="utf-8")
    meta = prepare(PrepareConfig(input=[str(mixed)], tokenizer=str(tok), out=str(tmp_path / "d1")))
    assert meta["unknown_tokens"] == 50
    err = capsys.readouterr().err
    assert f"note: {mixed}: 50 of " in err and "such as 'é'" in err
    japanese = tmp_path / "ja.txt"
    japanese.write_text("日本語のテキストです。\n", encoding="utf-8")
    with pytest.raises(HomeLLMError, match=r"ja.txt: 11 of 12 tokens \(91.7%\) are characters .* such as '。"):
        prepare(PrepareConfig(input=[str(japanese)], tokenizer=str(tok), out=str(tmp_path / "d2")))
    assert not (tmp_path / "d2" / "meta.json").exists()
    # The commonest are named first (by code point, Greek letters hid the Chinese that made up most of a text)
    greek = tmp_path / "greek.txt"
    greek.write_text("the cat é\n" + "the cat sat on the mat the cat sat on the mat ΩΩ\n" * 30, encoding="utf-8")
    prepare(PrepareConfig(input=[str(greek)], tokenizer=str(tok), out=str(tmp_path / "d3")))
    assert "such as 'Ω é'" in capsys.readouterr().err


def test_a_file_named_twice_is_read_once(tmp_path):
    (tmp_path / "texts").mkdir()
    path = write(tmp_path / "texts" / "a.txt", "one story\n")
    write(tmp_path / "texts" / "b.txt", "another\n")
    assert docs([str(path), str(path), str(tmp_path / "texts"), str(tmp_path / "texts" / "*.txt")]) == [
        "one story\n", "another\n"]


def test_a_jsonl_byte_order_mark_and_upper_case_suffixes_are_read(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.JSONL").write_bytes(codecs.BOM_UTF8 + b'{"text": "first"}\n{"text": "second"}\n')
    write(tmp_path / "in" / "b.TXT", "third")
    assert docs([str(tmp_path / "in")]) == ["first", "second", "third"]


def test_jsonl_is_utf8_whatever_the_encoding_of_the_text_files_beside_it(tmp_path):
    """--encoding is for .txt: a folder of Shift_JIS texts with a UTF-8 .jsonl reads both; a .jsonl in another
    encoding is named, UTF-16 by its byte-order mark (as Windows PowerShell writes it)."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_bytes("吾輩は猫である。".encode("cp932"))
    write(tmp_path / "in" / "b.jsonl", '{"text": "名前はまだ無い。"}\n')
    assert docs([str(tmp_path / "in")], encoding="cp932") == ["吾輩は猫である。", "名前はまだ無い。"]
    (tmp_path / "sjis.jsonl").write_bytes('{"text": "吾輩は猫である。"}\n'.encode("cp932"))
    with pytest.raises(HomeLLMError, match=r"sjis.jsonl:1: not UTF-8 \(byte offset 10\): .jsonl files must be UTF-8 "
                                           r"\(--encoding applies to .txt only\): convert it"):
        docs([str(tmp_path / "sjis.jsonl")], encoding="cp932")
    (tmp_path / "wide.jsonl").write_bytes('{"text": "a"}\n{"text": "b"}\n'.encode("utf-16"))
    with pytest.raises(HomeLLMError, match=r"wide.jsonl:1: not UTF-8 \(utf-16, by its byte-order mark\)"):
        docs([str(tmp_path / "wide.jsonl")])


def test_a_validation_share_above_half_is_pointed_out(tmp_path, capsys):
    """--val-fraction 0.9 read as the training share would train on a tenth of the text."""
    text = write(tmp_path / "a.txt", "one two three four five six seven eight nine ten\n" * 20)
    tok = char_tok(tmp_path, str(text))
    for fraction, said in ((0.1, False), (0.5, False), (0.9, "holds out 90% of the text for validation and trains on "
                                                            "10%; it is the validation share")):
        prepare(PrepareConfig(input=[str(text)], tokenizer=str(tok), out=str(tmp_path / "d"), val_fraction=fraction))
        err = capsys.readouterr().err
        assert (said in err) if said else "--val-fraction" not in err


def test_folders_homellm_made_are_not_read_as_text(tmp_path, capsys):
    """A run's metrics.jsonl is no corpus: a run or prepared data given as input is named with what to do instead,
    and the runs inside a project folder are skipped with a note."""
    run, data = tmp_path / "proj" / "runs" / "r", tmp_path / "d"
    run.mkdir(parents=True)
    write(run / "config.json", "{}")
    write(run / "metrics.jsonl", '{"step": 1, "train_loss": 3.0}\n')
    (run / "data").mkdir()  # its prepared data, inside it: skipped with it, not counted again
    write(run / "data" / "meta.json", "{}")
    (run / "data" / "train_00000.bin").write_bytes(b"\0\0")
    write(run / "data" / "notes.txt", "not text to train on")
    write(tmp_path / "proj" / "story.txt", "Once upon a time.")
    with pytest.raises(HomeLLMError, match=rf"^{run} is a homellm run, not text: name the text files to train on \("
                                           rf"continue the run itself with `homellm pretrain --resume --out {run}`\)"):
        docs([str(run)])
    assert docs([str(tmp_path / "proj")]) == ["Once upon a time."]
    assert f"note: {tmp_path / 'proj'}: skipping 1 folder(s) homellm made (runs, prepared data): {run}" in (
        capsys.readouterr().err)
    text = write(tmp_path / "a.txt", "some text to prepare\n" * 10)
    prepare(PrepareConfig(input=[str(text)], tokenizer=str(char_tok(tmp_path, str(text))), out=str(data)))
    with pytest.raises(HomeLLMError, match=rf"^{data} is prepared data, not text: train on it with `homellm pretrain "
                                           rf"--data {data}`, as it is"):
        docs([str(data)])
    with pytest.raises(HomeLLMError, match=rf"^{data} is prepared data, not text: prepared data trains alone, one "
                                           rf"folder with nothing beside it \(`homellm pretrain --data {data}`\): to "
                                           "train on more, prepare all the text into one folder"):
        docs([str(text), str(data)])  # (review: "train on it as it is" was what the user had done)


def test_an_out_among_the_inputs_is_skipped_by_a_glob_and_an_out_over_them_refused(tmp_path, capsys):
    """(audit) `prepare --input 'books/*' --out books/data` failed on the data folder it had just made; an --out that
    was the text's folder took it for homellm's, whose text every later run skipped or refused."""
    from homellm.cli import main

    books = tmp_path / "books"
    books.mkdir()
    write(books / "a.txt", "the first book\n" * 20)
    write(books / "b.txt", "the second book\n" * 20)
    (books / "drafts").mkdir()  # an empty folder the pattern matches too
    tok = char_tok(tmp_path, str(books / "a.txt"), str(books / "b.txt"))
    for _ in range(2):  # made, then prepared again: the data folder is homellm's by then
        meta = prepare(PrepareConfig(input=[str(books / "*")], tokenizer=str(tok), out=str(books / "data")))
        assert meta["documents"] == 2
    assert f"note: {books / '*'}: skipping 2 matched folders with no .txt or .jsonl file to read (or made by homellm)" \
        in capsys.readouterr().err
    with pytest.raises(HomeLLMError, match="the folder holds no .txt or .jsonl file"):
        docs([str(books / "dr*")])  # (nothing else matched: the error names what it is)
    # (review) what a killed start leaves in its --out (an unfinished prepare, a run's tokenizer) is no input folder
    (books / "data2" / ".preparing").mkdir(parents=True)
    (books / "run" / "data_tokenizer").mkdir(parents=True)
    write(books / "run" / "data_tokenizer" / "tokenizer.json", "{}")
    data.check_out_apart([str(books / "*")], books / "data2")
    data.check_out_apart([str(books / "*")], books / "run")
    shutil.rmtree(books / "data2"), shutil.rmtree(books / "run")
    for inputs, out, verb in (([books], books, "is"), ([books], tmp_path, "holds"), ([books / "*.txt", tmp_path / "x"],
                                                                                     tmp_path / "x", "is")):
        (tmp_path / "x").mkdir(exist_ok=True)
        write(tmp_path / "x" / "c.txt", "a third book\n")
        with pytest.raises(HomeLLMError, match=f"^--out {out} {verb} the input folder "):
            prepare(PrepareConfig(input=[str(i) for i in inputs], tokenizer=str(tok), out=str(out)))
    assert sorted(p.name for p in books.iterdir()) == ["a.txt", "b.txt", "data", "drafts"]
    # pretrain from raw text: its run may not be the text's folder either, and a table's fix names --data
    assert main(["pretrain", "--preset", "tiny", "--data", str(books), "--out", str(books), "--max-steps", "1"]) == 2
    assert f"--out {books} is the input folder {books}: what homellm writes there" in capsys.readouterr().err
    write(tmp_path / "t.csv", "a,b\n1,hello\n")
    assert main(["pretrain", "--preset", "tiny", "--data", str(tmp_path / "t.csv"), "--out", str(tmp_path / "r")]) == 2
    assert f"`--data hf:{tmp_path / 't.csv'} --text-field COLUMN`" in capsys.readouterr().err


def test_a_zipped_or_gzipped_file_is_named_as_such(tmp_path):
    """Aozora Bunko's downloads are zip files: they used to be read as UTF-16 'with NUL bytes'."""
    import gzip
    import zipfile

    with zipfile.ZipFile(tmp_path / "rashomon.zip", "w") as z:
        z.writestr("rashomon.txt", "羅生門".encode("cp932"))
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(b"some text"))
    # (audit) Documents and images named as text were told to pass the --encoding they were written in
    (tmp_path / "paper.pdf").write_bytes(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj")
    (tmp_path / "scan.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with zipfile.ZipFile(tmp_path / "essay.docx", "w") as z:
        z.writestr("word/document.xml", "<w:document/>")
    for name, message in (("rashomon.zip", "a zip archive, not text: unzip it"), ("a.txt.gz", "gzip-compressed"),
                          ("paper.pdf", "a PDF document, not text: save its text as a .txt file first \\(e.g. "
                                        "`pdftotext FILE.pdf FILE.txt`\\)$"),
                          ("scan.png", "a PNG image, not text: give text files$"),
                          ("essay.docx", "a Word document, not text: save its text as a .txt file first$")):
        with pytest.raises(HomeLLMError, match=f"{name}: {message}"):
            docs([str(tmp_path / name)])
    # JSON Lines too (conversations for sft): it said "not UTF-8 ... convert it with iconv"
    (tmp_path / "chats.jsonl.gz").write_bytes(gzip.compress(b'{"messages": []}\n'))
    with pytest.raises(HomeLLMError, match="chats.jsonl.gz: gzip-compressed, not text: decompress it with gunzip"):
        next(jsonl_records(tmp_path / "chats.jsonl.gz"))


AOZORA = """羅生門
芥川龍之介

-------------------------------------------------------
【テキスト中に現れる記号について】

《》：ルビ
（例）下人《げにん》
-------------------------------------------------------

　ある日の暮方《くれがた》の事である。一人の｜下人《げにん》が、羅生門の下で雨やみを待っていた。
［＃３字下げ］一［＃「一」は中見出し］
　広い門の下には、この男のほかに誰もいない。


底本：「芥川龍之介全集1」ちくま文庫、筑摩書房
入力：j.utsumi
"""


def test_aozora_markup_is_dropped_on_request(tmp_path, monkeypatch):
    """Ruby, its ｜ mark, ［＃…］ notes, the notation block and the 底本 footer are Aozora's, not the author's."""
    monkeypatch.setattr(data, "_CHUNK_BYTES", 37)  # lines cut across blocks must be cleaned whole
    path = tmp_path / "rashomon.txt"
    path.write_bytes(AOZORA.replace("\n", "\r\n").encode("cp932"))
    assert docs([str(path)], aozora=True) == [
        "羅生門\n芥川龍之介\n\n\n　ある日の暮方の事である。一人の下人が、羅生門の下で雨やみを待っていた。\n一\n"
        "　広い門の下には、この男のほかに誰もいない。\n"]
    assert docs([str(path)]) == [AOZORA]  # and kept as they are without --aozora


def test_aozora_text_escaped_as_notes_stays_and_written_out_marks_are_put_back(tmp_path):
    """A literal 《》 or ｜ is written as a gaiji note (it was turned into 《 》, then dropped as ruby with the title
    between); older texts write the くの字点 as ／＼, and accents between 〔〕 where the notation block says so."""
    dashes = "-" * 20
    notation = f"{dashes}\n【テキスト中に現れる記号について】\n〔〕：アクセント分解された欧文をかこむ\n{dashes}\n"
    body = ("彼は※［＃始め二重山括弧、1-1-52］吶喊※［＃終わり二重山括弧、1-1-53］という本《ほん》を読んだ。\n"
            "記号※［＃縦線、1-1-35］はそのまま。とう／＼こそ／″＼\n"
            "※［＃ローマ数字1、1-13-21］［＃「※［＃ローマ数字1、1-13-21］」は縦中横］章\n"
            "〔Quid aliud est mulier nisi amicitiae& inimica, cafe' Franc,ois〕と〔u&〕\n")
    path = tmp_path / "kanji.txt"
    path.write_bytes(("題\n" + notation + body).encode("cp932"))
    assert docs([str(path)], aozora=True) == [
        "題\n彼は《吶喊》という本を読んだ。\n記号｜はそのまま。とう〳〵こそ〴〵\nⅠ章\n"
        "Quid aliud est mulier nisi amicitiæ inimica, café Françoisとů\n"]
    # 〔〕 in a work whose notation block does not say so is the author's: kept as written
    path.write_bytes(("題\n" + body).encode("cp932"))
    assert docs([str(path)], aozora=True)[0].endswith(
        "〔Quid aliud est mulier nisi amicitiae& inimica, cafe' Franc,ois〕と〔u&〕\n")


def test_an_aozora_notation_block_that_never_closes_near_the_top_loses_no_text(tmp_path):
    """The closing dashed line counted only within the first 60 lines: a longer block, or a dashed line in the
    text of a file without one, dropped the whole work without a word."""
    notes = "".join(f"（例）記号{i}《き》\n" for i in range(70))
    long_block = tmp_path / "long.txt"
    long_block.write_bytes(f"題\n作者\n{'-' * 20}\n{notes}{'-' * 20}\n本文《ほんぶん》です。\n".encode("cp932"))
    assert docs([str(long_block)], aozora=True) == ["題\n作者\n本文です。\n"]
    dashes = tmp_path / "dashes.txt"
    footer = "\n\n底本：「本」\n入力：誰か\n"
    dashes.write_bytes(f"題\n作者\n\n本文です。\n{'-' * 12}\n続き《つづき》です。{footer}".encode("cp932"))
    assert docs([str(dashes)], aozora=True) == ["題\n作者\n\n本文です。\n続きです。\n"]  # (its footer dropped too)
    many = "".join(f"{i}行目\n" for i in range(250))
    dashes.write_bytes(f"題\n{'-' * 12}\n{many}{footer}".encode("cp932"))
    assert "".join(docs([str(dashes)], aozora=True)) == f"題\n{many}"


def test_aozora_on_other_than_txt_files_is_said(tmp_path, capsys):
    (tmp_path / "r.jsonl").write_text(json.dumps({"text": "吾輩《わがはい》は猫"}, ensure_ascii=False) + "\n")
    assert docs([str(tmp_path / "r.jsonl")], aozora=True) == ["吾輩《わがはい》は猫"]
    assert f"note: --aozora cleans .txt files only: {tmp_path / 'r.jsonl'} is read as it is" in capsys.readouterr().err


def test_aozora_markup_read_without_aozora_is_said_once(tmp_path, capsys):
    """An Aozora Bunko original read without --aozora trained (and eval scored) its ruby and notes as text."""
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text("吾輩《わがはい》は猫である。［＃「猫」に傍点］\n｜名前《なまえ》はまだ無い。\n",
                                     encoding="utf-8")
    zh = write(tmp_path / "zh.txt", "《三國演義》第一回。［注］話說天下大勢，分久必合。\n" * 5)  # titles, no kana
    assert len(docs([str(tmp_path / "a.txt"), str(tmp_path / "b.txt"), str(zh)])) == 3
    assert capsys.readouterr().err == (f"note: {tmp_path / 'a.txt'} is marked up as Aozora Bunko's files are (ruby "
                                       "《》, ［＃］ notes): --aozora drops the markup, its header and its footer, "
                                       "which are otherwise read as text\n")
    docs([str(tmp_path / "a.txt")], aozora=True)
    docs([str(zh)])
    assert capsys.readouterr().err == ""


def test_aozora_originals_lose_every_mark(tmp_path):
    text = "".join(docs([str(need("ja_aozora/sjis"))], aozora=True))
    assert not any(mark in text for mark in ("《", "》", "｜", "［＃", "底本：", "【テキスト中に現れる記号について】"))
    assert text.startswith("或阿呆の一生\n芥川龍之介") and len(text) > 300_000
    # Characters Shift_JIS lacks are written ※［＃「言＋墟のつくり」、第4水準2-88-74］: the note names the character
    # (JIS X 0213 plane-row-cell, or U+XXXX), which took the place of a bare ※ that lost it.
    assert "譃" in text and "餅菓子の饀" in text and "※" not in text


def test_aozora_gaiji_notes_become_their_characters(tmp_path):
    path = tmp_path / "gaiji.txt"
    path.write_bytes("鳥が※［＃「言＋墟のつくり」、第4水準2-88-74］と※［＃「てへん＋劣」、U+6318、123-4］、"
                     "※［＃小書き片仮名ヒ、1-6-84］、※［＃「口＋世」、ページ数-行数］、※［＃「某」、1-99-1］\n"
                     .encode("cp932"))
    assert docs([str(path)], aozora=True) == ["鳥が譃と挘、ㇶ、※、※\n"]  # a malformed code stays unknown
    # Half-width katakana are not taken as kana: cp932 reads Latin-1's « » ° and accented capitals as them.
    latin = tmp_path / "latin.txt"
    latin.write_bytes("Il dit « Bonjour, ça va » et très élégant, 20 °C.\n".encode("latin-1"))
    with pytest.raises(HomeLLMError, match="read as Shift_JIS it has no kana"):
        docs([str(latin)])


def test_a_json_file_is_read_as_records_not_as_text(tmp_path):
    """A .json array was prepared as plain text: its brackets, quotes and field names were trained on."""
    array = tmp_path / "stories.json"
    array.write_text(json.dumps([{"text": "Hello world."}, {"text": "Second story."}], indent=1), encoding="utf-8")
    lines = tmp_path / "lines.json"  # JSON Lines under a .json name, as hub datasets often are
    lines.write_text('{"text": "One."}\n{"text": "Two."}\n', encoding="utf-8")
    assert docs([str(array)]) == ["Hello world.", "Second story."] and docs([str(lines)]) == ["One.", "Two."]
    array.write_text('[{"text": "fine"}, {"body": "no text field"}]', encoding="utf-8")
    # A record without the field after some with it is a bad line: --text-field was advised, which no field fixes
    with pytest.raises(HomeLLMError, match=r"stories.json\[1\]: no field 'text' \(found: body\): fix or delete the "
                                           r"line \(1 line\(s\) before it hold 'text'\)"):
        docs([str(array)])
    array.write_text('[{"text": "cut short"', encoding="utf-8")
    with pytest.raises(HomeLLMError, match=r"stories.json:1: a file that starts as a JSON array, but is not valid"):
        docs([str(array)])
    one = write(tmp_path / "one.json", json.dumps({"text": "one object"}, indent=2))  # not "fix or delete line 1"
    with pytest.raises(HomeLLMError, match=r"one.json: a JSON object written over several lines: write one record a"):
        docs([str(one)])


def test_a_failed_prepare_leaves_no_empty_out_folder(tmp_path):
    """`prepare --out NEW` without input (or with bad input) left NEW behind, empty."""
    src = tmp_path / "a.txt"
    src.write_text("some text\n", encoding="utf-8")
    tok = char_tok(tmp_path, str(src))
    for inputs in ([], [str(tmp_path / "missing.txt")]):
        with pytest.raises(HomeLLMError):
            prepare(PrepareConfig(input=inputs, tokenizer=str(tok), out=str(tmp_path / "new")))
        assert not (tmp_path / "new").exists()


def test_preparing_over_prepared_data_says_it_replaces_it(tmp_path, capsys):
    src = tmp_path / "a.txt"
    src.write_text("some text\n" * 50, encoding="utf-8")
    tok = char_tok(tmp_path, str(src))
    cfg = PrepareConfig(input=[str(src)], tokenizer=str(tok), out=str(tmp_path / "data"))
    prepare(cfg)
    assert "replaced" not in capsys.readouterr().err
    prepare(cfg)
    assert f"note: {tmp_path / 'data'} holds prepared data (" in capsys.readouterr().err
    # a folder whose tokenizer/ or shards no meta.json vouches for is someone else's: refused, nothing removed
    (tmp_path / "mine" / "tokenizer").mkdir(parents=True)
    (tmp_path / "mine" / "tokenizer" / "NOTES.md").write_text("keep")
    with pytest.raises(HomeLLMError, match=r"holds tokenizer/ but no meta.json of `homellm prepare`"):
        prepare(replace(cfg, out=str(tmp_path / "mine")))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "meta.json").write_text('{"name": "my notes"}')
    with pytest.raises(HomeLLMError, match=r"holds a meta.json that `homellm prepare` did not write: choose another"):
        prepare(replace(cfg, out=str(tmp_path / "other")))
    assert (tmp_path / "mine" / "tokenizer" / "NOTES.md").read_text() == "keep"
    assert (tmp_path / "other" / "meta.json").read_text() == '{"name": "my notes"}'


def test_the_progress_meter_counts_the_files_bytes_whatever_their_encoding(tmp_path, monkeypatch):
    """prepare's bar counted the text's UTF-8 bytes against the files' size: JSON's \\u escapes ended it near
    half-way, Shift_JIS ran it past its total."""
    monkeypatch.setattr(data, "_CHUNK_BYTES", 64)  # many blocks
    ja = "むかしむかし、ある山のふもとに小さな村がありました。\r\n" * 20
    files = [write(tmp_path / "sjis.txt", ja, encoding="cp932"), write(tmp_path / "bom.txt", "\ufeff" + ja),
             write(tmp_path / "utf16.txt", ja, encoding="utf-16"),
             write(tmp_path / "esc.jsonl", "".join(json.dumps({"text": line}) + "\n" for line in ja.split("\r\n"))),
             write(tmp_path / "array.json", json.dumps([{"text": ja}, {"text": "two"}]))]
    for f in files:
        meter = [0]
        assert list(iter_documents([str(f)], meter=meter))
        assert meter[0] == f.stat().st_size, f.name


def test_nanogpt_bin_files_are_used_in_place(tmp_path, corpus, capsys):
    """A nanoGPT user has train.bin and val.bin already (its prepare.py: GPT-2 ids as raw uint16, each document
    ended by <|endoftext|>; OpenWebText's are 17 GB): prepare adopts them without tokenizing or copying."""
    from homellm.cli import main
    from homellm.train import TokenBatches

    tok = train_tokenizer(TokenizerConfig(input=[str(corpus)], out=str(tmp_path / "tok"), vocab_size=300))
    lines = corpus.read_text().splitlines()
    nano = tmp_path / "openwebtext"
    nano.mkdir()
    arrays = {}
    for split, docs_ in (("train", lines[:200]), ("val", lines[200:220])):  # as nanoGPT's prepare.py writes them
        ids = [i for d in docs_ for i in [*tok.encode(d), tok.eot_id]]
        arrays[split] = np.array(ids, dtype=np.uint16)
        arrays[split].tofile(nano / f"{split}.bin")
    meta = prepare(PrepareConfig(input=[str(nano)], tokenizer=str(tmp_path / "tok"), out=str(tmp_path / "data")))
    err = capsys.readouterr().err
    assert "using nanoGPT's" in err and f"The text starts {lines[0][:40]!r}"[:-1] in err
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["meta.json", "tokenizer"]  # nothing copied
    assert (meta["documents"], meta["val_documents"], meta["split"]) == (220, 20, "nanogpt")
    assert meta["train_bytes"] == sum(len(d.encode()) for d in lines[:200])  # end-of-text counts no byte
    for split in ("train", "val"):
        (shard,) = open_split(tmp_path / "data", split)
        assert np.array_equal(shard, arrays[split])
    data_ = TokenBatches(tmp_path / "data", 16, 0, tok.token_bytes())
    assert data_.train_batch(0, 4, 0, 1)[0].shape == (4, 16)
    assert main(["pretrain", "--preset", "tiny", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"),
                 "--max-steps", "2", "--block-size", "16"]) == 0
    nano.rename(tmp_path / "moved")  # the files it reads where they were: moved, said so
    with pytest.raises(HomeLLMError, match=re.escape(f"as meta.json says ({tmp_path / 'data'} reads nanoGPT's files "
                                                     "where they were prepared from: put them back there, or prepare "
                                                     "their new place)")):
        open_split(tmp_path / "data", "train")
    (tmp_path / "moved").rename(nano)
    (tmp_path / "moved").mkdir()
    # nanoGPT's shakespeare (GPT-2 BPE) is one text in each file, with no end-of-text: a document each, not none
    for split in ("train", "val"):
        np.array(tok.encode(" ".join(lines[:5])), dtype=np.uint16).tofile(tmp_path / "moved" / f"{split}.bin")
    meta = prepare(PrepareConfig(input=[str(tmp_path / "moved")], tokenizer=str(tmp_path / "tok"),
                                 out=str(tmp_path / "d1")))
    assert (meta["documents"], meta["val_documents"]) == (2, 1)
    # What is not nanoGPT's BPE data, or not these ids, is refused in one line; pretrain points to prepare.
    capsys.readouterr()
    assert main(["pretrain", "--data", str(nano), "--out", str(tmp_path / "r2"), "--max-steps", "1"]) == 2
    assert "holds nanoGPT's train.bin and val.bin" in capsys.readouterr().err
    np.array([5, 400], dtype=np.uint16).tofile(nano / "val.bin")
    with pytest.raises(HomeLLMError, match=r"val.bin: id 400 is past --tokenizer .*'s 300 ids"):
        prepare(PrepareConfig(input=[str(nano)], tokenizer=str(tmp_path / "tok"), out=str(tmp_path / "d2")))
    (nano / "val.bin").write_bytes(b"\x01\x00\x02")
    with pytest.raises(HomeLLMError, match="3 bytes, not a whole number of uint16 ids"):
        prepare(PrepareConfig(input=[str(nano)], tokenizer=str(tmp_path / "tok"), out=str(tmp_path / "d2")))
    (nano / "meta.pkl").write_bytes(b"")
    with pytest.raises(HomeLLMError, match="nanoGPT's character-level data"):
        prepare(PrepareConfig(input=[str(nano)], tokenizer=str(tmp_path / "tok"), out=str(tmp_path / "d2")))
    # Half the pair, or a .bin named instead of its folder (was: no .txt there; a guess at UTF-16).
    (nano / "meta.pkl").unlink()
    with pytest.raises(HomeLLMError, match=r"train.bin: nanoGPT's token ids, not text: give the folder"):
        prepare(PrepareConfig(input=[str(nano / "train.bin")], tokenizer=str(tmp_path / "tok"),
                              out=str(tmp_path / "d2")))
    (nano / "val.bin").unlink()
    with pytest.raises(HomeLLMError, match=r"come in a pair, train.bin and val.bin: put both"):
        prepare(PrepareConfig(input=[str(nano)], tokenizer=str(tmp_path / "tok"), out=str(tmp_path / "d2")))
    assert not (tmp_path / "d2").exists()


def test_a_damaged_meta_json_is_named_before_training(tmp_path, data_dir, corpus):
    """A meta.json edited or damaged: KeyError 'shards', TypeErrors, and a float64 dtype read as other byte counts."""
    good = json.loads((data_dir / "meta.json").read_text())
    bad = tmp_path / "data"
    for change, said in [({"shards": None}, "shards is missing or not"),
                         ({"shards": {"train": "x", "val": []}}, "shards is missing or not"),
                         ({"shards": {"train": [5], "val": []}}, "shards.train[0] is 5, not"),
                         ({"shards": {"train": [{"file": "a.bin", "tokens": "many"}], "val": []}},
                          "shards.train[0] is {'file': 'a.bin', 'tokens': 'many'}, not"),
                         ({"dtype": "float64"}, "dtype is 'float64', not uint16 or uint32"),
                         ({"vocab_size": "300"}, "vocab_size is '300', not a count")]:
        shutil.rmtree(bad, ignore_errors=True)
        shutil.copytree(data_dir, bad)
        (bad / "meta.json").write_text(json.dumps({**good, **change}))
        with pytest.raises(HomeLLMError, match=re.escape(f"{bad / 'meta.json'}: {said}")):
            read_meta(bad)
    # What the error says to do works: prepare replaces a damaged meta.json of its own (it was refused as not its).
    prepare(PrepareConfig(input=[str(corpus)], tokenizer=str(data_dir), out=str(bad)))
    assert read_meta(bad)["train_tokens"] > 0
    # The counts training only records (a meta.json of an older prepare, or edited): a KeyError's traceback before
    meta = json.loads((bad / "meta.json").read_text())
    (bad / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k not in ("documents", "split",
                                                                                          "train_bytes")}))
    from homellm.cli import main

    assert main(["pretrain", "--data", str(bad), "--out", str(tmp_path / "run"), "--preset", "tiny", "--max-steps",
                 "1", "--eval-every", "0"]) == 0


def test_a_tokenizer_folder_given_as_text_is_named(tmp_path):
    """`pretrain --data TOKENIZER` said "the folder holds no .txt or .jsonl file"."""
    tok = char_tok(tmp_path, str(write(tmp_path / "a.txt", "some text\n")))
    with pytest.raises(HomeLLMError, match=r"tok is a tokenizer, not text: give the text \(to prepare it with this "
                                           r"tokenizer: `homellm prepare --input TEXT --tokenizer .*tok --out DATA`\)"):
        prepare(PrepareConfig(input=[str(tok)], tokenizer=str(tok), out=str(tmp_path / "d")))


def test_sentencepiece_style_tokenizers_read_each_document_whole(tmp_path):
    """prepare cut a .txt file into pieces before line breaks, which byte-level BPE never merges across. A
    SentencePiece-style tokenizer (Metaspace, or Llama 2's prepended "▁") adds a "▁" at the start of each text and
    merges across line breaks ("!\\n"): every 256 KB, a token the whole text never has. Such a tokenizer now reads a
    document whole (up to 16 M characters), and its shards hold what encoding the whole gives."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

    from homellm.tokenizer import import_tokenizer

    rng = np.random.default_rng(0)
    words = ["the", "king", "queen", "of", "night", "day!", "come", "hence", "now,"]
    lines = (f"{rng.choice(['ROMEO:', 'JULIET:'])}\n{' '.join(rng.choice(words, 8))}" for _ in range(12_000))
    text = "\n".join(lines) + "\n"  # about 800 KB: several blocks
    (tmp_path / "plays.txt").write_text(text, encoding="utf-8")
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>"] + [f"<0x{i:02X}>" for i in range(256)])
    llama2 = HFTokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    llama2.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    llama2.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                        decoders.Strip(" ", 1, 0)])
    metaspace = HFTokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    metaspace.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    metaspace.decoder = decoders.Metaspace(prepend_scheme="first")
    # Gemma's layout (no "▁" prepended): only its vocabulary tells that it merges across line breaks (review)
    gemma = HFTokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    gemma.normalizer = normalizers.Replace(" ", "▁")
    gemma.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    for name, hf in (("llama2", llama2), ("metaspace", metaspace), ("gemma", gemma)):
        hf.train_from_iterator([text[:20_000]], trainer)
        hf.save(str(tmp_path / f"{name}.json"))
        tok = import_tokenizer(tmp_path / f"{name}.json")
        assert not tok.cuts_at_lines
        tok.save(tmp_path / name)
        prepare(PrepareConfig(input=[str(tmp_path / "plays.txt")], tokenizer=str(tmp_path / name),
                              out=str(tmp_path / f"d-{name}"), val_fraction=0))
        assert open_split(tmp_path / f"d-{name}", "train")[0].tolist() == tok.encode(text) + [tok.eot_id], name
    bpe = train_tokenizer(TokenizerConfig(input=[str(tmp_path / "plays.txt")], out=str(tmp_path / "bpe"),
                                          vocab_size=300))
    char = train_tokenizer(TokenizerConfig(input=[str(tmp_path / "plays.txt")], out=str(tmp_path / "char"),
                                           kind="char"))
    assert bpe.cuts_at_lines and char.cuts_at_lines  # (they still read in pieces: memory stays flat)


def test_documents_read_whole_are_cut_between_documents(tmp_path, monkeypatch):
    """Past the text held whole, the cut was at the last line break, wherever it fell: a short document across it
    was cut in two (review). It is now cut before the last <|endoftext|>."""
    monkeypatch.setattr(data, "_CHUNK_BYTES", 30)
    monkeypatch.setattr(data, "_WHOLE_CHARS", 100)
    texts = [f"doc {i} line one\nline two of doc {i}" for i in range(8)]
    (tmp_path / "stories.txt").write_text(EOT.join(texts), encoding="utf-8")
    pieces = list(iter_documents([str(tmp_path / "stories.txt")], lines=False))
    assert [(p.text, p.end) for p in pieces] == [(t, True) for t in texts]
