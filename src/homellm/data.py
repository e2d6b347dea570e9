"""Raw text in, token shards out: read documents from files, folders, globs or the Hugging Face hub, tokenize them
in parallel and write flat binary shards the trainer memory-maps.

    homellm prepare --input ../shared/data/tinystories/train-first-2MiB.txt --tokenizer runs/tok --out data/ts

A prepared folder holds `train_00000.bin`, `val_00000.bin`, ... (little-endian uint16, or uint32 for vocabularies
over 65536), `meta.json` describing them, and `tokenizer/`, so it describes itself.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import itertools
import json
import os
import re
import shutil
import socket
import sys
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from tqdm import tqdm

from homellm.config import EOT, PrepareConfig, check_ranges, load_json, save_json
from homellm.errors import HomeLLMError, typed
from homellm.io import fsync_dir, progress_bar, refuse_kinds, say
from homellm.tokenizer import Tokenizer, check_unknown

_CHUNK_BYTES = 256 * 1024  # .txt files are read in blocks this size: memory stays flat on a file of any size
_WHOLE_CHARS = 64 * _CHUNK_BYTES  # a document's text held whole for a tokenizer that cannot be given it in pieces
_BATCH_CHARS = 4 * 1024 * 1024  # text handed to the parallel encoder at once: enough pieces to use every core
_ROUND_TRIP_CHARS = 2000  # of the first document, decoded back to tell a lossy tokenizer
_COPY_TOKENS = 16 * 1024 * 1024  # block size when moving tokens between shards for the positional split
_FOLDER_SUFFIXES = (".txt", ".jsonl")  # what a folder input contributes; a file named directly may be anything
TABLES = (".csv", ".tsv", ".parquet", ".arrow")  # datasets reads them (hf:FILE, hf:FOLDER); as text they are not


# Hiragana and katakana. Not half-width katakana: cp932 reads each byte 0xA6-0xDD as one, and in Latin-1 those are
# « » ° and the accented capitals, so French would pass; Shift_JIS in half-width kana alone takes --encoding cp932.
_KANA = re.compile("[\u3041-\u30ff]")
_PRIVATE_USE = re.compile("[\ue000-\uf8ff]")


def shift_jis_text(data: bytes) -> str | None:
    """Bytes that are not UTF-8 read as Shift_JIS (cp932), as a file is (_decoded_blocks); None where they are not
    Japanese text: no kana, or bytes cp932 has no character for."""
    try:
        text = data.decode("cp932")
    except UnicodeDecodeError:
        return None
    return text if _KANA.search(text) and not _PRIVATE_USE.search(text) else None


class Piece(NamedTuple):
    """Part of a document. Long documents (a 1 GB .txt file) arrive in several pieces, in order."""

    doc: int  # index of the document, counting from 0 over all inputs
    text: str
    end: bool  # the last piece of its document


# ---- reading documents -------------------------------------------------------------------------------------

def iter_documents(inputs: list[str], text_field: str = "text", encoding: str = "auto", max_docs: int = 0,
                   aozora: bool = False, meter: list[int] | None = None, lines: bool = True) -> Iterator[Piece]:
    """Stream documents as pieces, never holding a corpus whole.

    - `.txt`: one document per file, unless the file contains `<|endoftext|>`: then that separates documents
      (TinyStories' layout) and whitespace around each separator is dropped. UTF-8 (a BOM is skipped), or with
      encoding="auto" Shift_JIS (cp932) when the file is not UTF-8 and has kana.
    - `.jsonl`: one document per line, its `text_field` string; empty lines are skipped. Always UTF-8, as JSON Lines
      is by definition: `encoding` is for .txt files, so a folder may mix Shift_JIS texts with .jsonl. A `.json`
      named directly is read the same way, or as one JSON array of records.
    - In every kind, CRLF in the text becomes LF: a corpus from Windows and one from elsewhere train alike.
    - a folder: its .txt and .jsonl files, recursively, in sorted order; a glob: the files it matches.
    - `hf:NAME`, `hf:NAME:SPLIT` or `hf:NAME:CONFIG:SPLIT`: a Hugging Face dataset, streamed (needs `datasets`);
      NAME may be a local folder in the hub's layout, read by the same code. A row is a document, but in datasets
      of .txt files, whose rows are lines: those are read as a .txt file is.
    With aozora=True, .txt files lose Aozora Bunko's markup (`_aozora_text`). Empty documents are skipped. Pieces
    of a text are cut only before a line break that follows a non-space character, which byte-level BPE never merges
    across: tokenizing the pieces equals tokenizing the whole (without `lines`, for tokenizers that merge across them,
    a document is one piece up to 16 M characters). `meter[0]` counts the bytes of the files read so far
    (a progress bar's position: JSON's escapes or Shift_JIS make the text's size another), or of the text for hf:.
    """
    if encoding != "auto":
        names = "use auto, utf-8, cp932 (Shift_JIS), euc-jp, gbk, big5, utf-16, ..."
        try:
            codecs.lookup(encoding)
        except LookupError:
            raise HomeLLMError(f"--encoding {encoding!r} is unknown: {names}") from None
        try:  # rot13, hex, zlib are codecs too, but not of text; "undefined" is one that refuses all
            "text\n".encode(encoding).decode(encoding)
        except (LookupError, UnicodeError):
            raise HomeLLMError(f"--encoding {encoding!r} is not a text encoding: {names}") from None
    doc = 0
    sources = list(_expand(inputs))
    if aozora and (others := [source for kind, source in sources if kind != "txt"]):
        # (a .jsonl's text is its writer's to clean: its markup was kept, and meta.json said "aozora": true)
        say(f"note: --aozora cleans .txt files only: {others[0]}"
            + (f" and {len(others) - 1} more are read as they are" if len(others) > 1 else " is read as it is"))
    kinds = {kind for kind, _ in sources}
    if text_field != "text" and not kinds & {"jsonl", "hf"}:  # given, and read by nothing: say so, as for --aozora
        say(f"note: --text-field {text_field} applies to .jsonl and hf: inputs only: the .txt files are read whole")
    if encoding != "auto" and "txt" not in kinds:
        say(f"note: --encoding {encoding} applies to .txt files only: JSON Lines are UTF-8, and hf: datasets decode "
            "their own text")
    hinted: list[Path] = []  # the Aozora Bunko file --aozora was suggested for: one is enough
    for kind, source in sources:
        if kind == "hf":
            texts: Iterator[tuple[str, bool]] = _hf_docs(source, text_field, meter, lines)
        elif kind == "jsonl":
            texts = (piece for t in _jsonl_docs(Path(source), text_field, meter) for piece in _record_pieces(t, lines))
        else:
            blocks = _decoded_blocks(Path(source), encoding, meter)
            if not aozora and not hinted:
                blocks = _aozora_hint(Path(source), blocks, hinted)
            texts = _split_documents(_stable_pieces(_aozora_text(blocks) if aozora else blocks, lines))
        for text, end in texts:
            yield Piece(doc, text, end)
            if end:
                doc += 1
                if doc == max_docs:
                    return
    if doc == 0:
        raise HomeLLMError(f"no text in {' '.join(inputs)}: the inputs are empty"  # (a .txt has no field to name)
                           + (", or --text-field names an empty field" if kinds != {"txt"} else ""))


def _expand(inputs: list[str], quiet: bool = False, flag: str = "--input") -> list[tuple[str, str]]:
    """(kind, source) for every file or dataset the inputs name; kind is txt, jsonl or hf. `flag`: the option
    that named them, as the errors' fixes must write it (pretrain's is --data)."""
    if not inputs:
        raise HomeLLMError("no input given: pass .txt/.jsonl files, folders, globs or hf:NAME")
    out: list[tuple[str, str]] = []
    for spec in inputs:
        if spec.startswith("hf:"):
            out.append(("hf", spec))
            continue
        if Path(spec).exists():  # first: "Book [Vol 1].txt" is a file, though glob would read [...] as a pattern
            paths = [Path(spec)]
        elif glob.has_magic(spec):
            paths = [Path(p) for p in sorted(glob.glob(spec, recursive=True))]
            if not paths:
                raise HomeLLMError(f"{spec}: the pattern matches no file: check the path (quote it for the shell)")
            paths = _textful(spec, paths, quiet)
        elif Path(spec).is_symlink():
            raise HomeLLMError(f"{spec}: a link to {os.readlink(spec)}, which is not there: fix the link or give the "
                               "file itself")
        else:
            raise HomeLLMError(f"{spec}: no such file or folder: check the path")
        for path in paths:
            if path.is_symlink() and not path.exists():  # (a pattern matches links whose file is gone)
                raise HomeLLMError(f"{path}: a link to {os.readlink(path)}, which is not there: fix the link, or "
                                   "delete it")
            if path.is_dir():
                if made := _made_by_homellm(path):
                    fix = _MADE_FIX[made] if len(inputs) == 1 or made != "prepared data" else _MIXED_FIX
                    raise HomeLLMError(f"{path} is {made}, not text: {fix.format(path=typed(path))}")
                files = folder_files(path, _FOLDER_SUFFIXES, quiet)
                if not files and any(path.glob("*.bin")):  # half of nanoGPT's pair
                    raise HomeLLMError(f"{path}: nanoGPT's token files come in a pair, train.bin and val.bin: put both "
                                       "in the folder (nanoGPT's prepare.py writes them) and give the folder")
                if not files and (path / "tokenizer.json").is_file():
                    raise HomeLLMError(f"{path} is a tokenizer, not text: give the text (to prepare it with this "
                                       f"tokenizer: `homellm prepare --input TEXT --tokenizer {typed(path)} --out "
                                       "DATA`)")
                if not files:
                    raise HomeLLMError(f"{path}: the folder holds no .txt or .jsonl file: point at the files")
            elif path.suffix == ".bin" and path.name in ("train.bin", "val.bin"):  # token ids, not text
                raise HomeLLMError(f"{path}: nanoGPT's token ids, not text: give the folder that holds train.bin and "
                                   "val.bin (`homellm prepare --input FOLDER --tokenizer TOKENIZER --out DATA`)")
            elif path.suffix == ".bin" and (_SHARD.fullmatch(path.name) or _made_by_homellm(path.parent)
                                            == "prepared data"):
                # A shard of prepared data: its uint16 ids, read as text, looked like UTF-16 without a byte-order
                # mark, and the --encoding utf-16-le suggested then had eval report a loss on garbage.
                where = (typed(path.parent) if _made_by_homellm(path.parent) == "prepared data" else
                         "DIR, the folder `homellm prepare` wrote it in, with its meta.json")
                raise HomeLLMError(f"{path}: token ids (a shard of homellm's prepared data), not text: give the "
                                   f"prepared folder instead, as it is (--data {where}, to pretrain or eval)")
            elif not path.is_file():  # /dev/stdin, <(zcat x.gz): its first bytes went to the encoding's sniffing
                raise HomeLLMError(f"{path}: a pipe or device, not a file: homellm reads its input more than once "
                                   "(its start for the encoding, then the text; the tokenizer and the shards too): "
                                   "save the text to a file first (e.g. `zcat corpus.gz > corpus.txt`)")
            elif path.suffix.lower() in TABLES:  # read as text, a table's header, quoting and ids were trained on
                raise table_error(path, flag, " --text-field COLUMN")
            else:
                files = [path]
            # A .json named directly is JSON records too (an array, or lines as the hub's datasets often are).
            out += [("jsonl" if f.suffix.lower() in (".jsonl", ".json") else "txt", str(f)) for f in files]
    # A file named twice (`a.txt a.txt`, or a file and its folder) is read once: twice would repeat its text, and
    # put copies of the same documents on both sides of the train/val split.
    unique: dict[str, tuple[str, str]] = {}
    for kind, source in out:
        unique.setdefault(source if kind == "hf" else os.path.realpath(source), (kind, source))
    return list(unique.values())


def _text_folder(path: Path) -> bool:
    """Whether a folder is one a folder input reads text from: not homellm's (a run, prepared data), and holding
    .txt or .jsonl files. (An --out that a prepare or run made, or left unfinished when killed, holds none.)"""
    return path.is_dir() and _made_by_homellm(path) is None and bool(folder_files(path, _FOLDER_SUFFIXES, quiet=True))


def _textful(spec: str, paths: list[Path], quiet: bool) -> list[Path]:
    """A pattern's matches less the folders in them with no text to read (the --out of this very prepare or run,
    made before the inputs are read; runs; folders of other files), said in a note; all of them when none has
    text, for the error that names what they are. `'corpus/*' --out corpus/data` failed on the data folder."""
    skipped = [p for p in paths if p.is_dir() and not _text_folder(p)]
    if not skipped or len(skipped) == len(paths):
        return paths
    if not quiet:
        say(f"note: {spec}: skipping {len(skipped)} matched folder{'s' * (len(skipped) > 1)} with no .txt or .jsonl "
            f"file to read (or made by homellm): {', '.join(map(str, skipped[:3]))}{' ...' * (len(skipped) > 3)}")
    return [p for p in paths if p not in skipped]


def check_out_apart(inputs: Sequence[str], out: str | Path, flag: str = "--out") -> None:
    """Refuse an --out that is an input folder of text, or holds one: the shards (or the run) written among the text
    made the folder homellm's, whose text later runs then skip or refuse. An input file inside --out is left alone
    (the quickstart keeps its text in its run), and so is a folder without text (an --out a killed start left)."""
    where = os.path.realpath(out)
    for spec in inputs:
        if spec.startswith("hf:"):
            continue
        for path in ([Path(spec)] if Path(spec).exists() or not glob.has_magic(spec) else
                     [Path(p) for p in glob.glob(spec, recursive=True)]):
            real = os.path.realpath(path)
            inside = real == where or real.startswith(where.rstrip(os.sep) + os.sep)
            if inside and _text_folder(path):  # (a run or data given: their own errors; a textless one is skipped)
                raise HomeLLMError(f"{flag} {out} {'is' if real == where else 'holds'} the input folder {path}: what "
                                   "homellm writes there would sit among the text, and later runs would take the "
                                   f"folder for homellm's and skip its text: give {flag} a folder outside it")


_SHARD = re.compile(r"(train|val)_\d+\.bin")  # as ShardWriter names them
_MADE_FIX = {"a homellm run": "name the text files to train on (continue the run itself with `homellm pretrain "
                              "--resume --out {path}`)",
             "prepared data": "train on it with `homellm pretrain --data {path}`, as it is"}
# (review: two prepared folders given together were each told "train on it as it is", which they were)
_MIXED_FIX = ("prepared data trains alone, one folder with nothing beside it (`homellm pretrain --data {path}`): to "
              "train on more, prepare all the text into one folder (`homellm prepare --input TEXT... --tokenizer TOK "
              "--out DATA`)")


def table_error(path: Path, flag: str, more: str = "", formats: str = ".txt or .jsonl") -> HomeLLMError:
    """A .csv/.parquet/... table given where text or jsonl is read: Hugging Face datasets reads it, as hf:FILE."""
    return HomeLLMError(f"{path}: a {path.suffix.lower()[1:]} table: read it with Hugging Face datasets, `{flag} "
                        f"{typed(f'hf:{path}')}{more}` (pip install 'homellm[hf]'), or write it as {formats}")


def folder_files(folder: Path, suffixes: tuple[str, ...], quiet: bool = False) -> list[Path]:
    """The files with these suffixes under a folder, sorted, without hidden ones (or those in hidden folders) and
    without what homellm made there: a project folder holds its runs too, whose metrics.jsonl, checkpoint.json and
    prepared data are no corpus and no conversations."""
    inside = {m.parent for m in folder.rglob("*.json") if m.name in ("config.json", "meta.json")
              and _made_by_homellm(m.parent)}
    skip = sorted(m for m in inside if not inside & set(m.parents))  # a run's data/ goes with the run
    if skip and not quiet:
        say(f"note: {folder}: skipping {len(skip)} folder(s) homellm made (runs, prepared data): "
            f"{', '.join(map(str, skip[:3]))}{' ...' if len(skip) > 3 else ''}")
    found, other = [], Counter()
    for f in _walk(folder):
        if any(part.startswith(".") for part in f.relative_to(folder).parts) or any(s in f.parents for s in skip):
            continue
        if f.suffix.lower() in suffixes:
            found.append(f)
        elif not f.name.endswith("~"):  # (an editor's backup)
            other[f.suffix.lower() or "no suffix"] += 1
    if other and found and not quiet:  # (none found: the caller says so)
        say(f"note: {folder}: reading its {'/'.join(suffixes)} files only, not {sum(other.values())} other file(s) ("
            f"{', '.join(f'{n} {kind}' for kind, n in other.most_common(4))}{' ...' if len(other) > 4 else ''})")
    return sorted(found)


def _walk(folder: Path) -> Iterator[Path]:
    """The files under folder, following links to folders (a corpus linked in), each real folder once."""
    seen: set[str] = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a link back up the tree, or the same folder linked twice
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        for name in files:
            if os.path.isfile(os.path.join(root, name)):
                yield Path(root) / name


def _made_by_homellm(folder: Path) -> str | None:
    """What homellm wrote this folder as ("a homellm run", "prepared data"), or None for anything else."""
    if (folder / "config.json").is_file() and (folder / "metrics.jsonl").is_file():
        return "a homellm run"
    if (folder / "meta.json").is_file() and any(folder.glob("train_*.bin")):
        return "prepared data"
    return None


def input_bytes(inputs: list[str], flag: str = "--input") -> int | None:
    """Total size of the input files, for a progress bar's ETA; None when a hub dataset is among them. `flag`: the
    option that named them, for errors."""
    sources = _expand(inputs, quiet=True, flag=flag)  # the reading that follows notes what it skips
    if any(kind == "hf" for kind, _ in sources):
        return None
    return sum(os.path.getsize(s) for _, s in sources)


def _nul_bytes(head: bytes) -> str:
    """What NUL bytes at a file's start say: UTF-16 without a byte-order mark puts them at every other byte (its
    ASCII characters' high halves); anything else with NULs is a binary file (weights, an archive, a program)."""
    nul = [i % 2 for i, b in enumerate(head) if b == 0]
    order = "utf-16-le" if nul.count(1) > nul.count(0) else "utf-16-be"
    if (max(nul.count(0), nul.count(1)) >= 0.95 * len(nul) and len(nul) >= len(head) // 8
            and "\x00" not in _as_utf16(head, order)):  # (text has no NUL characters; binaries' tables of numbers do)
        return f"NUL bytes at every other byte, as UTF-16 without a byte-order mark has: pass --encoding {order}"
    # Japanese or Chinese text has too few NULs to count on, and on both sides (the ideographic space U+3000 and
    # 一 U+4E00 have a NUL low byte): it is UTF-16 where it is no UTF-8 (UTF-8 text that holds a few NULs is) and
    # reads as text in one byte order. An alphabet's has NULs only in its spaces and punctuation.
    try:
        head.decode("utf-8", errors="strict")
        utf8 = True
    except UnicodeDecodeError as e:
        utf8 = e.start >= len(head) - 3  # (a character cut at the head's end: UTF-8)
    if order := _utf16_order(head, cjk=not utf8):
        return f"NUL bytes among its characters, as UTF-16 without a byte-order mark has: pass --encoding {order}"
    return ("a binary file (NUL bytes among the first bytes), not text: give the text files (or pass --encoding "
            "utf-8 if it is text that holds NUL characters)")


def _utf16_order(head: bytes, cjk: bool) -> str | None:
    """The byte order in which `head` reads as UTF-16 text with few ASCII characters, or None. Either CJK: 95 % of
    its characters spaces or printable ones of the blocks text is written in (Latin, punctuation, kana, CJK, Hangul,
    full-width forms), and a tenth of its bytes at least 0x80 (kanji and half the kana have one; Hangul all). Random
    bytes spread over all 65,536 code units, about half of which land in those blocks; but pairs of ASCII bytes land
    in CJK too, and mostly-ASCII binaries (.pyc files) read as Chinese: they have few bytes of 0x80 and up. Or an
    alphabet (Cyrillic, Greek, Arabic, Hebrew, Thai...), whose letters are all of one block of 256 code points:
    95 % of the characters, printable, in that block and the ASCII one (spaces, digits, punctuation). Pairs of
    ASCII bytes or of a single-byte code page's letters spread over dozens of blocks. (An alphabet's UTF-16 can be
    valid UTF-8, all its bytes under 0x80: `cjk` is whether CJK is asked about, where it is no UTF-8.)"""
    cjk = cjk and sum(b >= 0x80 for b in head) >= len(head) // 10

    def texty(c: str) -> bool:
        o = ord(c)
        return (c.isspace() or c.isprintable()) and (o < 0x0530 or 0x2000 <= o < 0x3100 or 0x3400 <= o < 0xA000
                                                     or 0xAC00 <= o < 0xD7A4 or 0xFF00 <= o < 0xFFF0)

    def cjk_text(text: str) -> float:
        return sum(map(texty, text)) / len(text)

    def alphabet(text: str) -> float:
        blocks = Counter(ord(c) >> 8 for c in text if c.isspace() or c.isprintable())
        letters = max((n for block, n in blocks.items() if block), default=0)
        return (blocks[0] + letters) / len(text) if letters >= len(text) // 2 else 0.0

    # The alphabet's test first, the stricter: Greek read in the wrong byte order lands in Hangul, which is text too
    for share in [alphabet, cjk_text] if cjk else [alphabet]:
        shares = {}
        for order in ("utf-16-le", "utf-16-be"):
            text = _as_utf16(head, order)
            # Text has no NUL character; a binary's lengths and offsets (a .pyc's) give some
            shares[order] = 0.0 if "\x00" in text or not text else share(text)
        best = max(shares, key=shares.get)
        if shares[best] >= 0.95:
            return best
    return None


def _as_utf16(head: bytes, order: str) -> str:
    return head[:len(head) // 2 * 2].decode(order, errors="replace")


def _head(path: Path, start: int = 0, size: int = 1 << 16) -> bytes:
    """Bytes of a file from `start` (its first non-ASCII byte): enough text to tell its language by, whatever block
    size reads it and however long an ASCII preface it has."""
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(size)


# What a codec says of a character whose bytes stop at the end of the data: cut by a block's end, or by the file's.
_CUT_SHORT = ("unexpected end of data", "incomplete multibyte sequence")


def _decode(data: bytes, encoding: str, final: bool) -> tuple[str, int]:
    """Decode `data`, leaving a character cut by the block boundary to the next block: (text, bytes used). At the
    file's end (`final`) such a character is one cut with the file (`head -c` of a big corpus): left unused."""
    try:
        return data.decode(encoding), len(data)
    except UnicodeDecodeError as e:
        # No character is longer than 4 bytes: an error earlier is a real one, and so is a bad byte at the end.
        if e.start < len(data) - 3 or final and e.reason not in _CUT_SHORT:
            raise
        return data[: e.start].decode(encoding), e.start


def _wide_blocks(path: Path, encoding: str, meter: list[int] | None = None) -> Iterator[str]:
    """The text of a file in an encoding where a line break is not the byte 0x0A (UTF-16, UTF-32), in blocks.
    One incremental decoder reads the whole file, so the byte order its BOM gave holds to the end."""
    decoder = codecs.getincrementaldecoder(encoding)()
    held, offset = "", 0  # a CR at a block's end waits: its LF may start the next block
    with open(path, "rb") as f:
        while True:
            data = f.read(_CHUNK_BYTES)
            if meter is not None:
                meter[0] += len(data)
            try:
                text = held + decoder.decode(data, final=not data)
            except UnicodeError as e:  # (UTF-16 without a byte-order mark fails as a UnicodeError alone)
                reason = e.reason if isinstance(e, UnicodeDecodeError) else str(e)
                order = (f" ({encoding}-le or {encoding}-be name the byte order of a file without a byte-order mark)"
                         if codecs.lookup(encoding).name in ("utf-16", "utf-32") else "")
                raise HomeLLMError(f"{path}: bytes near byte offset {offset + getattr(e, 'start', 0)} are not valid "
                                   f"{encoding} ({reason}): pass the --encoding the file was written in{order}, or "
                                   "fix the file") from None
            if offset == 0 and text.startswith("\ufeff"):
                text = text[1:]  # utf-16-le/-be keep a byte-order mark as a character: it is none
            offset += len(data)
            held = text[-1:] if text.endswith("\r") and data else ""
            text = text[: len(text) - len(held)]
            if text:
                yield text.replace("\r\n", "\n")
            if not data:
                return


# A byte-order mark names UTF-16 or UTF-32 (UTF-32's little-endian mark begins with UTF-16's, so it comes first).
_UTF16_32_BOMS = [(codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF16_LE, "utf-16"),
                  (codecs.BOM_UTF16_BE, "utf-16")]


_TEXT_FIRST = "save its text as a .txt file first"
_NOT_TEXT = ((b"%PDF", "a PDF document", f"{_TEXT_FIRST} (e.g. `pdftotext FILE.pdf FILE.txt`)"),
             (b"\x89PNG", "a PNG image", "give text files"), (b"\xff\xd8\xff", "a JPEG image", "give text files"),
             (b"GIF8", "a GIF image", "give text files"))
_ZIPPED_DOCUMENTS = {".docx": "a Word document", ".odt": "an OpenDocument text", ".epub": "an EPUB book",
                     ".xlsx": "an Excel workbook", ".pptx": "a PowerPoint deck"}


def refuse_archive(path: Path, head: bytes) -> None:
    """A zip or gzip file (or a document or image) given as text says so: its bytes would read as garbled text, or
    as not UTF-8, and the advice was to pass an --encoding."""
    if head.startswith(b"PK\x03\x04") and path.suffix.lower() in _ZIPPED_DOCUMENTS:  # zips of XML
        raise HomeLLMError(f"{path}: {_ZIPPED_DOCUMENTS[path.suffix.lower()]}, not text: {_TEXT_FIRST}")
    for magic, kind, fix in ((b"PK\x03\x04", "a zip archive", "unzip it and give the file inside"),
                             (b"\x1f\x8b", "gzip-compressed", "decompress it with gunzip"), *_NOT_TEXT):
        if head.startswith(magic):  # Aozora Bunko's files come zipped
            raise HomeLLMError(f"{path}: {kind}, not text: {fix}")


_ENCODING_NAMES = {"utf-8": "UTF-8", "cp932": "Shift_JIS (cp932)", "iso2022_jp_2": "ISO-2022-JP"}


def _failure(data: bytes, encoding: str) -> UnicodeDecodeError:
    """Where bytes known not to decode fail to."""
    try:
        data.decode(encoding)
    except UnicodeDecodeError as e:
        return e
    raise AssertionError(f"{encoding} reads these bytes")  # pragma: no cover - only called after a failure


def _utf8_start(data: bytes, failed: int) -> int | None:
    """Where UTF-8 text begins in Shift_JIS text that failed to decode at `failed`: Shift_JIS reads some UTF-8 bytes
    as kanji before one fails, so the start is the earliest byte from which the text up to 4,096 bytes past
    `failed` reads as UTF-8 (searched for from 256 bytes before it), at its first character that is not ASCII.
    None where the bytes there are not UTF-8."""
    def reads(start: int) -> bool:
        try:
            codecs.getincrementaldecoder("utf-8")().decode(data[start:failed + 4096], final=False)
        except UnicodeDecodeError:
            return False
        return True

    start = next((q for q in range(max(0, failed - 256), failed + 1) if reads(q)), None)
    if start is None:
        return None
    # (Shift_JIS may have read more than 256 bytes of UTF-8 as kanji: back a character of 1 to 4 bytes at a time)
    while (back := next((q for q in range(start - 1, max(-1, start - 5), -1) if reads(q)), None)) is not None:
        start = back
    while start < len(data) and data[start] < 0x80:  # (a line break or a space both encodings share)
        start += 1
    return start if not data[start:failed + 4096].isascii() else None


_JIS_ESCAPE = re.compile(rb"\x1b(?:\$[@B]|\$\(D|\(J)")


def _decoded_blocks(path: Path, encoding: str, meter: list[int] | None = None) -> Iterator[str]:
    """The text of a file in blocks, each ending at a line break where one is near. CRLF becomes LF."""
    chosen = None if encoding == "auto" else encoding  # auto decides on the first block that is not ASCII
    trying = None  # auto's Shift_JIS, on the block it is tried on
    with open(path, "rb") as f:
        head = f.read(4)
    refuse_archive(path, head)
    if chosen is None:
        chosen = next((name for bom, name in _UTF16_32_BOMS if head.startswith(bom)), None)
    if chosen is not None and "\n".encode(chosen) != b"\n":
        yield from _wide_blocks(path, chosen, meter)
        return
    with open(path, "rb") as f:
        offset = 0  # file offset of data[0], for error messages
        data = f.read(_CHUNK_BYTES)
        if data.startswith(codecs.BOM_UTF8):
            data, offset = data[3:], 3
            chosen = chosen or "utf-8"
        if meter is not None:
            meter[0] += offset
        if chosen is None and b"\x00" in data[:4096]:
            raise HomeLLMError(f"{path}: {_nul_bytes(data[:4096])}")
        if chosen is None and _JIS_ESCAPE.search(data[:4096]):
            # ISO-2022-JP ("JIS"; old Japanese mail and text) is 7-bit: it read as ASCII, escapes and all, and the
            # model trained on '\x1b$B8cGZ$OG-...'. Its escapes to kanji are unmistakable.
            chosen = "iso2022_jp_2"
        while data:
            more = f.read(_CHUNK_BYTES)
            final = not more
            # Cut after the last line break (never inside a CRLF); with none, cut anywhere but between CR and LF.
            cut = len(data) if final else (data.rfind(b"\n") + 1 or len(data) - data.endswith(b"\r"))
            try:
                if chosen is None:
                    try:
                        text, used = _decode(data[:cut], "utf-8", final)
                        if not data[:used].isascii():
                            chosen = "utf-8"
                    except UnicodeDecodeError as e:
                        # Aozora Bunko and much older Japanese text is Shift_JIS; Microsoft's cp932 is the superset
                        # Windows wrote. Shift_JIS fails UTF-8 at its first non-ASCII byte; UTF-8 with a corrupt
                        # byte fails later and must be reported, not read as mojibake.
                        if not data[: e.start].isascii():
                            raise
                        trying = "cp932"
                        text, used = _decode(data[:cut], "cp932", final)
                        if _PRIVATE_USE.search(text):  # Python's cp932 turns stray bytes (0xA0, 0xFD-0xFF) into these
                            trying = None  # (the UTF-8 error is the one to report)
                            raise e from None
                        if not _KANA.search(_head(path, offset + e.start).decode("cp932", errors="ignore")):
                            # Latin-1 French or Spanish often decodes as cp932 too (an accented byte and the letter
                            # after it make a kanji), into kanji without one kana: Japanese prose always has kana.
                            raise HomeLLMError(
                                f"{path}: not UTF-8 (byte 0x{data[e.start]:02x} at byte offset {offset + e.start}), "
                                "and read as Shift_JIS it has no kana, so it is not Japanese either: pass the "
                                "--encoding it was written in (e.g. latin-1 or cp1252 for Western European text, gbk, "
                                "big5; --encoding cp932 if it is Shift_JIS after all)") from None
                        chosen = "cp932"
                else:
                    text, used = _decode(data[:cut], chosen, final)
            except UnicodeDecodeError:
                # The text before the bad byte read as auto's choice (Shift_JIS tried on this block, or the encoding
                # earlier blocks were): the file is not that throughout. "Pass --encoding, or none" was said to a
                # user who had passed none, and a Shift_JIS start with a UTF-8 end failed "at byte 0", which read.
                detected = None
                if encoding == "auto":  # (on the first block that is not ASCII, what was tried on it)
                    guess = chosen or trying or "utf-8"
                    e = _failure(data[:cut], guess)
                    detected = guess if chosen or not data[:e.start].isascii() else None
                if detected:
                    name = _ENCODING_NAMES.get(codecs.lookup(detected).name, detected)
                    if detected == "cp932" and (seam := _utf8_start(data[:cut], e.start)) is not None:
                        raise HomeLLMError(f"{path}: Shift_JIS (cp932) text up to byte offset {offset + seam}, and "
                                           "UTF-8 from there: save it in one encoding (UTF-8), or cut it in two files "
                                           "there (each file's encoding is detected)") from None
                    raise HomeLLMError(f"{path}: byte 0x{data[e.start]:02x} at byte offset {offset + e.start} is not "
                                       f"valid {name}, which the text before it is: the file changes its encoding "
                                       "there, or is damaged there: save it in one encoding (UTF-8), or pass the "
                                       "--encoding of the whole file") from None
                enc = chosen or "utf-8"
                e = _failure(data[:cut], enc)  # the UTF-8 error under auto: the likelier intent
                name = "UTF-8 or Shift_JIS (cp932)" if chosen is None else enc
                if codecs.lookup(enc).name in ("shift_jis", "shift_jis_2004", "shift_jisx0213"):
                    fix = "--encoding cp932, Shift_JIS as Windows writes it, with its extra characters"  # (①, ～, 髙)
                else:
                    fix = "the --encoding it was written in (e.g. cp1252, euc-jp, gbk, big5, utf-16)" + (
                        ", or none: UTF-8 and Shift_JIS (cp932) are detected" * (chosen is not None))
                raise HomeLLMError(f"{path}: byte 0x{data[e.start]:02x} at byte offset {offset + e.start} is not "
                                   f"valid {name}: pass {fix}, or fix the file") from None
            except UnicodeError as e:  # a codec that fails otherwise than on a byte (punycode)
                raise HomeLLMError(f"{path}: cannot be read as {chosen} ({e}): pass the --encoding the file was "
                                   "written in") from None
            if meter is not None:
                meter[0] += used
            if text:
                yield text.replace("\r\n", "\n")
            if final and used < len(data):
                say(f"note: {path} ends partway through a character (its last {len(data) - used} bytes): they are "
                    "left out (a file cut by size, as `head -c` cuts, ends so)")
                return
            data, offset = data[used:] + more, offset + used


# ruby, editor's notes (which may quote a gaiji note: ［＃「※［＃…］」は縦中横］), the ruby start mark
_AOZORA_MARKUP = r"《[^》\n]*》|［＃(?:※［＃[^］\n]*］|[^］\n])*］|｜"
_AOZORA_HEADER_LINES = 60  # the notation block comes right after the title and author, if at all
_AOZORA_NOTES_LINES = 200  # a real notation block is far shorter: past this, the dashed line opened no such block
# A character Shift_JIS lacks: ※ and a note giving its JIS X 0213 plane-row-cell (第3水準1-86-62) or code point.
_AOZORA_GAIJI = r"※［＃[^］\n]*?(?:U\+([0-9A-Fa-f]{4,6})|(\d)-(\d{1,2})-(\d{1,2}))[^］\n]*］"
# One pass, gaiji notes first: a note may name 《, 》 or ｜ themselves (始め二重山括弧、1-1-52), which Aozora writes so
# that they are text; a second pass took them for ruby and dropped them with the words between.
_AOZORA_MARKS = re.compile(f"{_AOZORA_GAIJI}|{_AOZORA_MARKUP}")
# Older texts write the くの字点 (a kana repeat mark two lines tall) as ／＼, and voiced as ／″＼
_AOZORA_KUNOJITEN = {"／″＼": "〴〵", "／＼": "〳〵"}
# Accents are written out between 〔〕 (アクセント分解): e' for é, ae& for æ; a literal 〔 is a gaiji note instead.
_AOZORA_LATIN = re.compile(r"〔([\x20-\x7e]+)〕")
_ACCENT_MARKS = {"`": "\u0300", "'": "\u0301", "^": "\u0302", "~": "\u0303", ":": "\u0308", "&": "\u030a",
                 "_": "\u0304", ",": "\u0327"}
_ACCENT_LETTERS = {"AE&": "Æ", "ae&": "æ", "OE&": "Œ", "oe&": "œ", "s&": "ß", "O/": "Ø", "o/": "ø", "D/": "Đ",
                   "d/": "đ", "L/": "Ł", "l/": "ł", "!@": "¡", "?@": "¿"}
# (the ring on A and U alone, the cedilla on C, S and T alone: as Aozora's own table has them)
_ACCENT = re.compile("|".join(map(re.escape, _ACCENT_LETTERS)) + r"|[A-Za-z][`'^~:_]|[AaUu]&|[CcSsTt],")


def _gaiji(m: re.Match) -> str:
    """The character an Aozora gaiji note names (euc_jis_2004 is JIS X 0213 laid out in bytes); else the ※ that
    marks the unknown character, the note dropped."""
    if m[1]:
        return chr(int(m[1], 16))
    plane, row, cell = int(m[2]), int(m[3]), int(m[4])
    if plane not in (1, 2) or not (1 <= row <= 94 and 1 <= cell <= 94):  # a malformed note
        return "※"
    raw = bytes([0xA0 + row, 0xA0 + cell]) if plane == 1 else bytes([0x8F, 0xA0 + row, 0xA0 + cell])
    try:
        return raw.decode("euc_jis_2004")
    except UnicodeDecodeError:  # a code JIS X 0213 leaves empty
        return "※"


def _accented(m: re.Match) -> str:
    """〔...〕's Latin text with its accents put on (a letter and its sign, composed where Unicode has the letter)."""
    def letter(a: re.Match) -> str:
        if a[0] in _ACCENT_LETTERS:
            return _ACCENT_LETTERS[a[0]]
        composed = unicodedata.normalize("NFC", a[0][0] + _ACCENT_MARKS[a[0][1]])
        return composed if len(composed) == 1 else a[0]  # no such letter: the signs are text

    return _ACCENT.sub(letter, m[1])


# Aozora Bunko's own markup: its block explaining the signs, a note ［＃…］, ruby after ｜ or kanji 《かな》
_AOZORA_SIGNS = re.compile("【テキスト中に現れる記号について】|［＃[^］\n]*］|[｜\u4e00-\u9fff]《[\u3041-\u30ff]+》")


def _aozora_hint(path: Path, blocks: Iterator[str], hinted: list[Path]) -> Iterator[str]:
    """The blocks of a .txt file, with a note where its first shows Aozora Bunko's markup in three places or more:
    read without --aozora, the model learns ruby and editors' notes as text (the eval of a folder of Aozora files
    scored them too, without a word)."""
    for i, block in enumerate(blocks):
        if i == 0 and len(_AOZORA_SIGNS.findall(block, 0, 1 << 16)) >= 3:
            hinted.append(path)
            say(f"note: {path} is marked up as Aozora Bunko's files are (ruby 《》, ［＃］ notes): --aozora drops the "
                "markup, its header and its footer, which are otherwise read as text")
        yield block


def _aozora_line(line: str, accents: bool) -> str:
    line = _AOZORA_MARKS.sub(lambda m: _gaiji(m) if m[0].startswith("※") and (m[1] or m[2]) else "", line)
    for written, mark in _AOZORA_KUNOJITEN.items():
        line = line.replace(written, mark)
    return _AOZORA_LATIN.sub(_accented, line) if accents and "〔" in line else line


def _aozora_text(blocks: Iterable[str]) -> Iterator[str]:
    """Aozora Bunko text as read: ruby 《かな》 and its ｜ mark, ［＃…］ notes (a character's made it), the block
    explaining those signs (between two dashed lines near the top) and the 底本 (source edition) footer are
    dropped; the くの字点 written out, and accented Latin letters where the block says 〔〕 holds them, are put
    back; lines kept whole."""
    line_no, state = 0, "top"  # top -> notes (between the dashed lines) -> body -> footer
    blank: list[str] = []  # blank lines wait for the next line of text: those before the footer go with it
    notes: list[str] = []  # the notation block's lines, kept until it closes: a dashed line may open none
    accents = False  # whether the notation block says 〔〕 holds Latin text with its accents written out

    def step(line: str) -> list[str]:
        """The lines a line of the text gives, as the state stands (and moves)."""
        nonlocal state, notes, accents
        bare = line.strip()
        if state == "footer":
            return []
        if re.fullmatch(r"-{10,}", bare) and (state == "notes" or state == "top" and line_no <= _AOZORA_HEADER_LINES):
            accents = state == "notes" and any("〔〕" in n for n in notes)
            state, notes = "notes" if state == "top" else "body", []
            return []
        if state == "notes":
            notes.append(line)
            return text_again() if len(notes) > _AOZORA_NOTES_LINES else []  # no notation block after all
        if bare.startswith("底本："):
            state = "footer"
            return []
        line = _aozora_line(line, accents)
        if not line.strip():
            blank.append(line)
            return []
        out = [*blank, line]
        blank.clear()
        return out

    def text_again() -> list[str]:
        """A notation block that was none (too long, or never closed): its lines are text, read as such."""
        nonlocal state, notes
        state, lines, notes = "body", notes, []
        return [out for line in lines for out in step(line)]

    for block in _lines_whole(blocks):
        out = []
        for line in block.splitlines(keepends=True):
            line_no += 1
            out += step(line)
        if out:
            yield "".join(out)
    if state == "notes" and (out := text_again()):
        yield "".join(out)


def _lines_whole(blocks: Iterable[str]) -> Iterator[str]:
    """The same text, re-cut so that every block ends at a line break (but the last): a regex sees whole lines."""
    carry = ""
    for block in blocks:
        text = carry + block
        cut = text.rfind("\n") + 1
        if not cut and len(text) > 4 * _CHUNK_BYTES:
            cut = len(text)  # one enormous line: held whole, it grew memory with the file and time with its square
        carry = text[cut:]
        if cut:
            yield text[:cut]
    if carry:
        yield carry


def _stable_cut(buf: str) -> int:
    """An index to cut `buf` at without changing its tokenization, or 0: before a line break that follows a
    non-space character. Byte-level BPE's regex ends every pre-token that holds a non-space character at the
    next whitespace, and the whole whitespace run (from the line break on) stays together in the second half."""
    i = buf.rfind("\n")
    while i > 0:
        if not buf[i - 1].isspace():
            return i
        i = buf.rfind("\n", 0, i)
    return 0


def _stable_pieces(blocks: Iterable[str], lines: bool = True) -> Iterator[str]:
    """Regroup decoded blocks into pieces cut at stable places (see _stable_cut). Without `lines` (a tokenizer whose
    tokens change at such a cut: SentencePiece's add a "▁" at the start of each text, and merge across line breaks),
    a document stays whole up to _WHOLE_CHARS, and only one longer than that is cut, at a line break: the text held
    is cut before its last `<|endoftext|>` where it has one, so that no shorter document is cut."""
    buf = ""
    for block in blocks:
        buf += block
        cut = 0
        if lines:
            cut = _stable_cut(buf)
        elif len(buf) > _WHOLE_CHARS:
            cut = max(buf.rfind(EOT), 0) or _stable_cut(buf)
        if not cut and len(buf) > (4 * _CHUNK_BYTES if lines else _WHOLE_CHARS):
            # No line break in sight (one enormous line): cut anyway, but never inside a separator. The tokens at
            # this seam may differ from an uncut run, a few tokens in megabytes.
            cut = len(buf) - len(EOT)
            sep = buf.rfind(EOT, 0, cut + len(EOT) - 1)
            if sep > cut - len(EOT):
                cut = sep
        if cut:
            yield buf[:cut]
            buf = buf[cut:]
    if buf:
        yield buf


def _split_documents(pieces: Iterable[str]) -> Iterator[tuple[str, bool]]:
    """Split a text stream at `<|endoftext|>` into (piece, ends_document). Whitespace next to a separator is
    dropped and empty documents are skipped; all other text is kept verbatim."""
    pending = ""  # yielded one step late, so the last piece of a document can carry end=True
    held = ""  # whitespace at the current end of the document: dropped if a separator follows
    started = False  # the current document has non-whitespace text
    after_sep = False  # the current document follows a separator: its leading whitespace goes
    for text in pieces:
        for i, part in enumerate(text.split(EOT)):
            if i:  # a separator ends the current document
                if started:
                    yield pending, True
                pending, held, started, after_sep = "", "", False, True
            if after_sep and not started:
                part = part.lstrip()
            body = part.rstrip()
            if body:
                if pending:
                    yield pending, False
                pending, held, started = held + body, part[len(body):], True
            else:
                held += part
    if started:
        yield pending + held, True


def jsonl_records(path: Path, meter: list[int] | None = None) -> Iterator[tuple[str, Any]]:
    """("FILE:LINE", parsed object) for each non-blank line; a line that is not UTF-8 JSON comes as a HomeLLMError
    in place of the object, so a caller may raise it or skip the line and go on.

    A file that is one JSON array instead (Alpaca's alpaca_data.json, many .json exports) gives ("FILE[i]", item)
    for its items: it is read whole, as an array cannot be streamed."""
    with open(path, "rb") as f:
        start = f.read(4096)
    refuse_archive(path, start)
    start = start.lstrip(codecs.BOM_UTF8).lstrip()
    if start.startswith(b"["):
        try:
            items = json.loads(Path(path).read_bytes().decode("utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            # Raised, not yielded: --skip-bad skips a bad line, and this is the whole file.
            where = f"{path}:{getattr(e, 'lineno', 1)}"
            raise HomeLLMError(f"{where}: a file that starts as a JSON array, but is not valid UTF-8 JSON ({e}): fix "
                               "it, or write it as JSON Lines (.jsonl), one object a line") from None
        if isinstance(items, list):
            if meter is not None:
                meter[0] += os.path.getsize(path)
            yield from ((f"{path}[{i}]", item) for i, item in enumerate(items))
            return
    with open(path, "rb") as f:
        offset = 0
        for n, raw in enumerate(f, 1):
            where = f"{path}:{n}"
            start, offset = offset, offset + len(raw)
            if meter is not None:
                meter[0] += len(raw)
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")  # a BOM some editors put first is no record
            except UnicodeDecodeError as e:
                if not raw.endswith(b"\n") and e.start >= len(raw) - 3 and e.reason == "unexpected end of data":
                    # The last line, ending partway through a character: a file cut short (Japanese text, whose
                    # characters are 3 bytes, is most often cut so), not one in another encoding
                    yield where, HomeLLMError(f"{where}: the file ends partway through a character of this line, as "
                                              "a file cut short does: delete the line, or get the whole file")
                    continue
                # JSON Lines is UTF-8 by definition; --encoding is for .txt. Windows tools write UTF-16 with a BOM.
                found = next((name for bom, name in _UTF16_32_BOMS if raw.startswith(bom)), None) if n == 1 else None
                what = f"{found}, by its byte-order mark" if found else f"byte offset {start + e.start}"
                yield where, HomeLLMError(f"{where}: not UTF-8 ({what}): .jsonl files must be UTF-8 (--encoding "
                                          f"applies to .txt only): convert it, e.g. `iconv -f {found or 'cp932'} -t "
                                          "utf-8 FILE`")
                if found:
                    return
                continue
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                msg = e.msg.removesuffix(" at")  # "Invalid control character at" + " at column 23"
                if n == 1 and line.strip() == "{":  # pretty-printed: an object over several lines
                    yield where, HomeLLMError(f"{path}: a JSON object written over several lines: write one record a "
                                              "line (JSON Lines), or a JSON array of records")
                    return
                # The last line, without its line break, and failing at its end: a file cut short (a download or a
                # copy stopped partway, `head -c`), not a malformed record
                cut = not raw.endswith(b"\n") and (e.msg.startswith("Unterminated") or e.pos >= len(line.rstrip()) - 1)
                # (at the line's end, JSON counts the line break read and says column 1 of a next line)
                column = min(e.pos, len(line.rstrip("\r\n"))) + 1
                yield where, HomeLLMError(f"{where}: not a JSON line (not valid JSON: {msg} at column {column})"
                                          + (": the file ends partway through this line, as a file cut short does: "
                                             "delete the line, or get the whole file" if cut else
                                             ": fix or delete the line"))


def _jsonl_docs(path: Path, field: str, meter: list[int] | None = None) -> Iterator[str]:
    had = 0  # records before that held the field: then this one is a bad line, not the wrong --text-field
    for where, obj in jsonl_records(path, meter):
        if isinstance(obj, HomeLLMError):
            raise obj
        if not isinstance(obj, dict) or field not in obj:
            fields = ", ".join(obj) if isinstance(obj, dict) else f"{_a(obj)}, not an object"
            fix = (f"fix or delete the line ({had:,} line(s) before it hold {field!r})" if had else
                   _conversations_fix(obj, path) or "pass --text-field with the field that holds the text")
            raise HomeLLMError(f"{where}: no field {field!r} (found: {fields}): {fix}")
        had += 1
        if text := _text(obj[field], where, field, had - 1):
            yield text


# A question and its answer under other names: GSM8K's question/answer, TRL's prompt/completion, query/response.
PROMPT_FIELDS, REPLY_FIELDS = ("prompt", "question", "query", "input"), ("completion", "response", "answer", "output")


def conversation_kind(record: Any) -> str:
    """What kind of conversation a record is (OpenAI's messages, ShareGPT, Alpaca, a question and its answer), ""
    for none: sft reads them, eval's loss scores their replies, and no --text-field reads them as text."""
    if not isinstance(record, dict):
        return ""
    kinds = (("messages", "messages"), ("conversations", "ShareGPT conversations"), ("conversation", "conversations"),
             ("instruction", "Alpaca instructions"), ("completion", "prompt/completion pairs"))
    if kind := next((kind for key, kind in kinds if key in record), ""):
        return kind
    # (GSM8K's question/answer too, which sft trains on: eval's loss read it as text and asked for --text-field)
    prompt, reply = (next((k for k in names if k in record), None) for names in (PROMPT_FIELDS, REPLY_FIELDS))
    return f"{prompt}/{reply} pairs" if prompt and reply else ""


def first_record(path: Path) -> Any:
    """A .jsonl or .json file's first record, None where it has none or is not one."""
    if path.suffix.lower() not in (".jsonl", ".json") or not path.is_file():
        return None
    with closing(jsonl_records(path)) as records:
        return next((record for _, record in records), None)


def _conversations_fix(record: Any, source: str | Path) -> str:
    """For a record of conversations read as text: what reads them."""
    if kind := conversation_kind(record):
        return (f"these are {kind}, which `homellm sft --init RUN --data {typed(str(source))}` fine-tunes a trained "
                "run on, and `homellm eval RUN --task loss --data FILE` scores; pretraining and tokenizers read plain "
                "text (a .txt, or one field of text: --text-field NAME)")
    return ""


def _record_pieces(text: str, lines: bool) -> Iterator[tuple[str, bool]]:
    """One record's text as (piece, ends_document), cut where a .txt file's would be when it is long: tokenized
    whole, a record of 16.8 M characters took 4.3 GB, against 0.9 GB as a .txt file."""
    if len(text) <= _CHUNK_BYTES:
        yield text, True
        return
    pieces = _stable_pieces((text[i:i + _CHUNK_BYTES] for i in range(0, len(text), _CHUNK_BYTES)), lines)
    last = next(pieces)
    for piece in pieces:
        yield last, False
        last = piece
    yield last, True


def _a(value: Any) -> str:
    """A value's JSON kind with its article: "an int", "a list"."""
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _text(text: Any, where: str, field: str, before: int = 0) -> str:
    """A record's text field, checked: text (None counts as empty), and no lone surrogate, which JSON's "\ud800"
    escape decodes to and which no encoder can take. `before`: records before it that held the field (then this
    one is a bad record, not the wrong field)."""
    if text is None:
        return ""
    if not isinstance(text, str):
        fix = (f"fix or delete the record ({before:,} before it hold text in {field!r})" if before else
               "pass --text-field with the field that holds the text")
        raise HomeLLMError(f"{where}: field {field!r} is {_a(text)}, not text: {fix}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise HomeLLMError(f"{where}: field {field!r} holds {text[e.start]!r} at character {e.start}, half of a "
                           "UTF-16 pair, which is no character: fix the text, or drop the record") from None
    return text.replace("\r\n", "\n") if text.strip() else ""


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]


def hf_dataset(spec: str) -> Iterable[dict[str, Any]]:
    """The rows of a Hugging Face dataset named hf:NAME, hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT, streamed; read
    them through hf_records, which names a failure while reading."""
    try:
        import datasets  # optional: only hub inputs need it
    except ImportError:
        raise HomeLLMError(f"{spec}: reading Hugging Face datasets needs the datasets package: "
                           "pip install 'homellm[hf]'") from None
    parts = hf_spec_parts(spec)
    if not parts[0] or len(parts) > 3:
        raise HomeLLMError(f"{spec}: write hf:NAME, hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT")
    name, config, split = parts[0], (parts[1] if len(parts) == 3 else None), (parts[-1] if len(parts) > 1 else "train")
    _check_hub_reachable(spec, name)
    local = Path(name)
    try:
        if local.is_file():  # one table or jsonl file: datasets takes a folder or a name, and found no data in a file
            suffix = local.suffix.lower()
            if suffix not in _BUILDERS:
                raise HomeLLMError(f"{spec}: a {suffix or 'suffix-less'} file: hf: reads {', '.join(_BUILDERS)} "
                                   "files, folders of them, and hub datasets; give .txt files as --input FILE")
            if len(parts) > 1:
                raise HomeLLMError(f"{spec}: a file is one split: write hf:{name}")
            return datasets.load_dataset(_BUILDERS[suffix], data_files=str(local), split="train", streaming=True,
                                         **({"delimiter": "\t"} if suffix == ".tsv" else {}))
        if (local / "dataset_info.json").is_file() or (local / "dataset_dict.json").is_file():
            # A folder Dataset.save_to_disk wrote: arrow files memory-mapped, read as they are needed
            saved = datasets.load_from_disk(str(local))
            if isinstance(saved, datasets.DatasetDict):
                if split not in saved:
                    raise HomeLLMError(f"{spec}: no split {split!r}: it has {', '.join(saved)}")
                saved = saved[split]
            elif len(parts) > 1:
                raise HomeLLMError(f"{spec}: a saved dataset of one split: write hf:{name}")
            return saved
        # streaming: rows arrive as they download; nothing is cached whole, so the corpus may exceed the disk
        return datasets.load_dataset(name, config, split=split, streaming=True)
    except HomeLLMError:
        raise
    except Exception as e:
        raise HomeLLMError(f"{spec}: cannot load the dataset ({_first_line(e)}): check the name, split and "
                           "network") from None


# datasets' builder for a file named in hf:FILE, by suffix
_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".tsv": "csv", ".arrow": "arrow", ".jsonl": "json", ".json": "json"}


def hf_spec_parts(spec: str) -> list[str]:
    """hf:NAME, hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT as [NAME, ...]. A local NAME may hold colons (Windows' C:\\data,
    a folder run:2): the longest start of it that is on disk is NAME; split at every colon, it was a hub name."""
    parts = spec[3:].split(":")
    for k in range(len(parts), 1, -1):
        if Path(":".join(parts[:k])).exists():
            return [":".join(parts[:k]), *parts[k:]]
    return parts


def _check_hub_reachable(spec: str, name: str) -> None:
    """Without a network, loading a hub dataset retried for half a minute, printing a warning each time, before
    failing: where the hub's name does not resolve, say so at once. (A local folder, or the hub's offline mode,
    needs no network.)"""
    from urllib.parse import urlparse
    from urllib.request import getproxies

    offline = any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")
                  for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    proxied = bool({"https", "all"} & set(getproxies()))  # behind a proxy, only the proxy need resolve here
    if offline or proxied or Path(name).exists():
        return
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except socket.gaierror as e:
        raise HomeLLMError(f"{spec}: cannot reach {host} ({e.strerror or e}): connect to the network, or set "
                           "HF_ENDPOINT to a mirror you can reach") from None


def hf_records(spec: str, rows: Iterable[dict[str, Any]]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(index, row) of a dataset's rows; a failure while reading is one line naming the row."""
    rows = iter(rows)
    for i in itertools.count():
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as e:  # a dropped connection, or files datasets cannot decode, show up only while reading
            raise HomeLLMError(f"{spec}: reading row {i} failed ({_first_line(e)}): check the network, or the "
                               "dataset's files") from None
        yield i, row


def _hf_docs(spec: str, field: str, meter: list[int] | None = None, lines: bool = True
             ) -> Iterator[tuple[str, bool]]:
    """(text, ends_document) from a Hugging Face dataset: a document per row, but for datasets of .txt files."""
    rows = hf_dataset(spec)
    if getattr(getattr(rows, "info", None), "builder_name", None) == "text":
        # datasets reads .txt files a row per line. A document per row put end-of-text between every two lines:
        # the lines are read as homellm reads a .txt file instead (one document, unless <|endoftext|> separates).
        texts = _split_documents(_stable_pieces(_blocks(_hf_rows(spec, field, rows, lines=True)), lines))
    else:
        texts = ((text, True) for text in _hf_rows(spec, field, rows))
    for text, end in texts:
        if meter is not None:  # the size of the text: a stream's own size is not known
            meter[0] += len(text.encode())
        yield text, end


def _hf_rows(spec: str, field: str, rows: Iterable[dict[str, Any]], lines: bool = False) -> Iterator[str]:
    """Each row's text (a line and its line break, with lines=True), rows without text skipped."""
    for i, row in hf_records(spec, rows):
        if field not in row:
            raise HomeLLMError(f"{spec}: row {i} has no field {field!r} (found: {', '.join(row)}): "
                               + (_conversations_fix(row, spec) or "pass --text-field with the field that holds "
                                  "the text"))
        if lines:
            yield row[field] + "\n"
        elif text := _text(row[field], f"{spec}: row {i}", field):
            yield text


def _blocks(texts: Iterable[str]) -> Iterator[str]:
    """Short texts (lines) joined into blocks of about _CHUNK_BYTES characters, as a .txt file is read."""
    block: list[str] = []
    size = 0
    for text in texts:
        block.append(text)
        size += len(text)
        if size >= _CHUNK_BYTES:
            yield "".join(block)
            block, size = [], 0
    if block:
        yield "".join(block)


# ---- writing shards ----------------------------------------------------------------------------------------

class _ShardWriter:
    """Appends tokens to `{split}_00000.bin`, `{split}_00001.bin`, ... of at most `shard_tokens` each."""

    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int, token_bytes: np.ndarray):
        self.out, self.split, self.dtype, self.shard_tokens = out, split, dtype, shard_tokens
        self.token_bytes = token_bytes
        self.shards: list[dict[str, Any]] = []
        self.tokens = 0
        self.bytes = 0  # UTF-8 bytes the tokens decode to: the denominator of bits per byte
        self._file: Any = None
        self._room = 0

    def write(self, ids: np.ndarray) -> None:
        self.tokens += len(ids)
        self.bytes += int(self.token_bytes[ids].sum())
        while len(ids):
            if not self._room:
                self._open_next()
            n = min(self._room, len(ids))
            self._file.write(ids[:n].astype(self.dtype, copy=False).tobytes())
            self.shards[-1]["tokens"] += n
            self._room -= n
            ids = ids[n:]

    def _open_next(self) -> None:
        self.close()
        name = f"{self.split}_{len(self.shards):05d}.bin"
        self._file = open(self.out / name, "wb")
        self.shards.append({"file": name, "tokens": 0})
        self._room = self.shard_tokens

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())  # on disk before meta.json claims it
            self._file.close()
            self._file = None


_KEY_CHARS = 1000  # of a document's start, which decides its side of the split


def _is_val(seed: int, start: str, val_fraction: float) -> bool:
    # A hash of (seed, the document's start), not a random stream nor its index: a document keeps its side whatever
    # the batching, and whatever comes before it. By index, a file added to a relay's growing corpus moved every
    # later document, and documents trained on became val ones (copies, too, now go to one side together).
    h = hashlib.blake2b(f"{seed}:{start}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") < val_fraction * 2**64


def prepare(cfg: PrepareConfig, extra_meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Tokenize cfg.input into shards in cfg.out and return the meta.json it writes (with `extra_meta` added).

    Each document ends with the end-of-text id. Documents go to val by a hash of (seed, the document's start)
    against val_fraction. One document (tinyshakespeare), or a split that leaves a side empty, is split by position
    instead: the last val_fraction of the tokens before the final end-of-text is val, as nanoGPT does; with a
    char tokenizer (without --words) the val text is exactly nanoGPT's text[int(n * 0.9):].
    """
    if not cfg.out:
        raise HomeLLMError("--out is required: the folder to write the prepared data to")
    refuse_kinds(cfg.out, ("config.json", "tokenizer.json"))  # (prepared data again over prepared data: allowed)
    if not cfg.tokenizer:
        raise HomeLLMError("--tokenizer is required: a tokenizer folder (train one with `homellm tokenizer train`)")
    check_ranges(cfg)  # (the command line's were checked; a library caller's are here, by the same rules)
    if cfg.val_input and cfg.split == "position":
        raise HomeLLMError("--split position and --val-input both say what val is: give one (--val-input holds out "
                           "its own text whole)")
    if cfg.val_input and nanogpt_folder(cfg.input):
        raise HomeLLMError(f"--val-input with nanoGPT's {cfg.input[0]}: its val.bin is the val text, used as it is; "
                           "drop --val-input")
    if cfg.val_input:
        check_val_apart(cfg.input, cfg.val_input)
    if cfg.val_fraction > 0.5 and not cfg.val_input:  # read as the training share, a slip: it trains on the less
        held, kept = (f"{round(100 * f, 6):g}%" for f in (cfg.val_fraction, 1 - cfg.val_fraction))
        print(f"note: --val-fraction {cfg.val_fraction} holds out {held} of the text for validation and trains on "
              f"{kept}; it is the validation share (the default is 0.1)", file=sys.stderr)
    check_out_apart([*cfg.input, *cfg.val_input], cfg.out)
    tok = Tokenizer.load(cfg.tokenizer)
    final = Path(cfg.out)
    # Everything is written into a staging folder first and replaces earlier data in --out only once it is complete,
    # so bad input or a crash halfway never loses data prepared before (at the cost of room for both meanwhile).
    out = final / ".preparing"
    made = not final.exists()
    final.mkdir(parents=True, exist_ok=True)
    lock = _lock(final)
    try:
        return _prepare_staged(cfg, tok, final, out, made, extra_meta)
    finally:
        if lock is not None:
            (final / _LOCK).unlink(missing_ok=True)
            lock.close()


_LOCK = ".prepare.lock"


def _lock(folder: Path) -> Any:
    """This process's exclusive lock on a prepare's --out, None where the system has none (Windows): two prepares
    into one --out replaced each other's staging folder, and the first's clean-up deleted the other's finished data.
    The system drops it when the process ends, however it ends."""
    try:
        import fcntl
    except ImportError:
        return None
    f = open(folder / _LOCK, "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise HomeLLMError(f"--out {folder} is being prepared by another process right now: wait for it to end, or "
                           "prepare into another --out") from None
    return f


def _prepare_staged(cfg: PrepareConfig, tok: Tokenizer, final: Path, out: Path, made: bool,
                    extra_meta: dict[str, Any] | None) -> dict[str, Any]:
    """prepare's work, under its lock: the text into the staging folder `out`, then swapped into `final`."""
    if (final / "meta.json").is_file():
        try:
            old = load_json(final / "meta.json")
        except HomeLLMError:
            old = None
        if not isinstance(old, dict) or old.get("format") != "homellm-tokens-v1":
            raise HomeLLMError(f"--out {final} holds a meta.json that `homellm prepare` did not write: choose another "
                               "--out")
        # Ours, if damaged since (read_meta's errors send here): replaced all the same.
        count = old.get("train_tokens")
        print(f"note: {final} holds prepared data{f' ({count:,} training tokens)' if isinstance(count, int) else ''}: "
              "it is replaced once the new data is complete (Ctrl-C now keeps it)", file=sys.stderr)
    elif not out.is_dir() and (theirs := [p.name + "/" * p.is_dir() for p in (
            final / "tokenizer", *final.glob("train_*.bin"), *final.glob("val_*.bin")) if p.exists()]):
        # Replaced at the end only when prepare's own: a meta.json says so, or the staging folder of a prepare that
        # was killed while it swapped them in (it removes meta.json first). Without either, they may be anyone's.
        raise HomeLLMError(f"--out {final} holds {theirs[0]} but no meta.json of `homellm prepare`, so they may not be "
                           "its own: prepare into another --out (or delete them, if an interrupted prepare left them)")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    nanogpt = nanogpt_folder(cfg.input)
    unknown_fix = None  # a run's tokenizer (its weights read these ids): another one is no fix for unknown text
    if (Path(cfg.tokenizer) / "config.json").is_file():
        unknown_fix = (f"replace or drop those characters in the text, or train a new run with a tokenizer that "
                       f"knows them ({cfg.tokenizer}'s tokenizer is the one its weights read)")
    try:
        meta = {**(_adopt_nanogpt(nanogpt, out, cfg, tok) if nanogpt else _prepare_into(out, cfg, tok, unknown_fix)),
                **(extra_meta or {})}
        save_json(out / "meta.json", meta)  # here first: a meta.json that cannot be written fails before the swap
    except BaseException:
        shutil.rmtree(final if made else out, ignore_errors=True)  # a folder this call made goes too: no empty --out
        raise
    # The old meta.json would vouch for shards about to go: it goes first, and the new one is written last.
    (final / "meta.json").unlink(missing_ok=True)
    for old in [*final.glob("train_*.bin"), *final.glob("val_*.bin")]:
        old.unlink()
    shutil.rmtree(final / "tokenizer", ignore_errors=True)
    for f in sorted(out.iterdir(), key=lambda f: f.name == "meta.json"):  # meta.json last: it vouches for the rest
        os.replace(f, final / f.name)
    out.rmdir()
    fsync_dir(final)
    return meta


def check_val_apart(inputs: list[str], val_inputs: list[str]) -> None:
    """--val-input's text is none of --input's: a file named in both (or in a folder or glob of --input) was trained
    on and scored as val, unsaid."""
    def sources(specs: list[str]) -> dict[str, str]:
        return {(s if kind == "hf" else os.path.realpath(s)): s for kind, s in _expand(specs, quiet=True)}

    train = sources(inputs)
    if both := [name for key, name in sources(val_inputs).items() if key in train]:
        raise HomeLLMError(f"--val-input {both[0]} is among the text trained on too (--input, pretrain's --data): "
                           "val would be text trained on; keep it out of those (another folder, a narrower glob)")


def nanogpt_folder(inputs: list[str]) -> Path | None:
    """The folder of nanoGPT's prepared tokens (train.bin and val.bin, raw uint16) when it is the one input."""
    if len(inputs) != 1 or inputs[0].startswith("hf:"):
        return None
    folder = Path(inputs[0])
    return folder if (folder / "train.bin").is_file() and (folder / "val.bin").is_file() else None


def _adopt_nanogpt(folder: Path, out: Path, cfg: PrepareConfig, tok: Tokenizer) -> dict[str, Any]:
    """nanoGPT's train.bin and val.bin (its prepare.py's: GPT-2 ids as raw uint16, documents ended by
    <|endoftext|>) used in place: homellm's shards are the same raw little-endian ids, so meta.json points at them
    and nothing is copied or tokenized again (OpenWebText's are 17 GB). The ids are checked to fit the tokenizer,
    and the start of the text shown, which tells a mismatched tokenizer at a glance."""
    if (folder / "meta.pkl").is_file():
        # shakespeare_char: ids of its own character table, which homellm's char tokenizer numbers otherwise.
        raise HomeLLMError(f"--input {folder}: nanoGPT's character-level data (meta.pkl holds its own character "
                           "ids): prepare the text itself instead, e.g. --input input.txt with a tokenizer from "
                           "`homellm tokenizer train --kind char`")
    if tok.vocab_size > 2**16:
        raise HomeLLMError(f"--tokenizer {cfg.tokenizer} has {tok.vocab_size:,} ids, but nanoGPT's .bin files hold "
                           "uint16 ids: use the tokenizer they were made with (GPT-2's)")
    dtype = np.dtype("<u2")
    token_bytes = tok.token_bytes()
    meta_shards: dict[str, list[dict[str, Any]]] = {}
    counts = {}
    for split in ("train", "val"):
        path = (folder / f"{split}.bin").resolve()
        if path.stat().st_size % 2:
            raise HomeLLMError(f"{path}: {path.stat().st_size:,} bytes, not a whole number of uint16 ids: is it "
                               "nanoGPT's prepared data? run its prepare.py again")
        ids = np.memmap(path, dtype=dtype, mode="r")
        n_bytes = docs = top = 0
        for start in range(0, len(ids), 1 << 24):  # a chunk at a time: memory stays flat for 9B tokens
            chunk = np.asarray(ids[start:start + (1 << 24)])
            top = max(top, int(chunk.max()))
            if top >= tok.vocab_size:
                raise HomeLLMError(f"{path}: id {top} is past --tokenizer {cfg.tokenizer}'s {tok.vocab_size:,} ids: "
                                   "these ids come from another tokenizer; give the one they were made with")
            n_bytes += int(token_bytes[chunk].sum())
            docs += int((chunk == tok.eot_id).sum())
        # A text after the last <|endoftext|> is a document too: nanoGPT's shakespeare (GPT-2 BPE) has none at
        # all, and was counted as 0 documents.
        docs += bool(len(ids)) and int(ids[-1]) != tok.eot_id
        meta_shards[split] = [{"file": str(path), "tokens": len(ids)}] if len(ids) else []
        counts[split] = (len(ids), n_bytes, docs)
    if not counts["train"][0]:
        raise HomeLLMError(f"{folder / 'train.bin'} is empty: run nanoGPT's prepare.py again")
    start = tok.decode(np.asarray(np.memmap(folder / "train.bin", dtype=dtype, mode="r")[:40]).tolist())
    say(f"note: using nanoGPT's {folder / 'train.bin'} ({counts['train'][0]:,} tokens) and val.bin "
        f"({counts['val'][0]:,}) where they are, without copying: keep them there. The text starts {start[:80]!r}: "
        "if that is not text, --tokenizer is not the one they were made with")
    tok.save(out / "tokenizer")
    return {
        "format": "homellm-tokens-v1", "dtype": "uint16", "vocab_size": tok.vocab_size, "eot_id": tok.eot_id,
        "tokenizer": {"dir": "tokenizer", "kind": tok.kind, "source": str(cfg.tokenizer)},
        "shards": meta_shards, "train_tokens": counts["train"][0], "val_tokens": counts["val"][0],
        "train_bytes": counts["train"][1], "val_bytes": counts["val"][1],
        "documents": counts["train"][2] + counts["val"][2], "unknown_tokens": 0, "val_documents": counts["val"][2],
        "split": "nanogpt", "inputs": list(cfg.input), "text_field": cfg.text_field, "encoding": cfg.encoding,
        "aozora": cfg.aozora, "val_fraction": cfg.val_fraction, "seed": cfg.seed,
    }


def _prepare_into(out: Path, cfg: PrepareConfig, tok: Tokenizer, unknown_fix: str | None = None) -> dict[str, Any]:
    """prepare's work: shards and tokenizer/ written into `out`; returns the meta.json to write beside them.
    `unknown_fix` is what to do about text the tokenizer cannot write, where it is not training another."""
    dtype = np.dtype("<u2") if tok.vocab_size <= 2**16 else np.dtype("<u4")  # little-endian on any machine
    writers = {s: _ShardWriter(out, s, dtype, cfg.shard_tokens, tok.token_bytes()) for s in ("train", "val")}
    docs = val_docs = tokens = unknown = 0
    unk_id = tok.unk_id
    unknown_chars: Counter[str] = Counter()  # how often, in the first pieces that have any: the commonest are named
    unknown_char: dict[str, bool] = {}  # each character looked up once (per piece, prepare ran 4x slower)
    eot = np.array([tok.eot_id], dtype=np.uint32)
    # A model trained with a bos before every document (an imported Llama's <s>) goes on learning that way.
    bos = None if tok.bos_id is None else np.array([tok.bos_id], dtype=np.uint32)
    fresh = True  # whether the next piece starts a document
    # The document the pieces are in, the start of its text (its first _KEY_CHARS characters decide its side), its
    # side once they do, and its tokens until then. Its first piece may be shorter: where a file's reading was cut
    # in blocks, which text before it moves (a key of the first piece alone moved documents of a grown file).
    at_doc, key, at_side, held = -1, "", None, []

    def flush(batch: list[Piece], side: str | None) -> None:
        """Tokenize and write a batch; `side` puts every document on one side (--val-input), else each one's start
        decides."""
        nonlocal docs, val_docs, tokens, unknown, fresh, at_doc, key, at_side, held
        if not tokens and (note := tok.round_trip_note(batch[0].text[:_ROUND_TRIP_CHARS])):
            # An imported WordPiece lowercases, an NFKC one turns full-width letters half-width: say so once.
            tqdm.write(f"note: {cfg.tokenizer}: {note} in {' '.join(cfg.input)}; the model will learn and write "
                       "text that way (a tokenizer trained by `homellm tokenizer train` gives any text back)",
                       file=sys.stderr)  # above the progress bar, not inside its line
        parts: dict[str, list[np.ndarray]] = {"train": [], "val": []}
        for piece, ids in zip(batch, tok.encode_batch([p.text for p in batch])):
            if piece.doc != at_doc:
                at_doc, key, at_side, held = piece.doc, "", side, []
            array = np.asarray(ids, dtype=np.uint32)
            tokens += len(array)
            if unk_id is not None and (n := int((array == unk_id).sum())):
                unknown += n
                if unknown_chars.total() < 10_000:
                    for c, k in Counter(piece.text).items():
                        if c not in unknown_char:
                            unknown_char[c] = bool(tok.unknown_chars(c))
                        if unknown_char[c]:
                            unknown_chars[c] += k
            chunk = [bos, array] if bos is not None and fresh else [array]
            if piece.end:
                chunk.append(eot)
            fresh = piece.end
            if at_side is None:
                key += piece.text[:_KEY_CHARS - len(key)]
                held += chunk
                if len(key) < _KEY_CHARS and not piece.end:
                    continue
                val = cfg.split == "document" and _is_val(cfg.seed, key, cfg.val_fraction)
                at_side, chunk, held = "val" if val else "train", held, []
            parts[at_side] += chunk
            if piece.end:
                docs += 1
                val_docs += at_side == "val"
        for side, arrays in parts.items():
            if arrays:
                writers[side].write(np.concatenate(arrays))
        bar.update(read[0] - bar.n)  # the bytes of the files read, as the bar's total counts them

    read = [0]
    # With --val-input, --input is all train and the val inputs all val: read one after the other.
    sources = [(cfg.input, "train"), (cfg.val_input, "val")] if cfg.val_input else [(cfg.input, None)]
    sizes = [input_bytes(inputs) for inputs, _ in sources]
    with progress_bar(total=None if None in sizes else sum(sizes), unit="B", unit_scale=True, unit_divisor=1024,
                      desc="prepare") as bar:
        for inputs, side in sources:
            batch: list[Piece] = []
            size = 0
            at_doc = -1  # (each source counts its documents from 0)
            for piece in iter_documents(inputs, cfg.text_field, cfg.encoding, cfg.max_docs, cfg.aozora, read,
                                        tok.cuts_at_lines):
                batch.append(piece)
                size += len(piece.text)
                if size >= _BATCH_CHARS:
                    flush(batch, side)
                    batch, size = [], 0
            if batch:
                flush(batch, side)
    for w in writers.values():
        w.close()
    commonest = sorted(unknown_chars, key=lambda c: (-unknown_chars[c], c))
    check_unknown(unknown, tokens, commonest, "tokens", cfg.tokenizer, " ".join([*cfg.input, *cfg.val_input]),
                  fix=unknown_fix)

    split = "document"
    if cfg.val_input:
        split = "inputs"
        if not writers["val"].tokens:
            raise HomeLLMError(f"--val-input {' '.join(cfg.val_input)}: no text in it to hold out: give the files "
                               "(or hub split) of your validation text")
    elif cfg.val_fraction > 0 and (docs == 1 or not writers["val"].tokens or not writers["train"].tokens
                                   or outweighed(writers["val"].tokens, writers["train"].tokens, cfg.val_fraction)):
        split = "position"
        if cfg.split == "document":  # (it was said nowhere but in `info`)
            why = {1: "one document", 2: "both documents fell on one side"}.get(docs, f"all {docs} documents fell "
                                                                                   "on one side")
            sides = "(several documents keep their sides)"
            if writers["val"].tokens and writers["train"].tokens:  # (review: 6 books, 1 held out, 86% of the text)
                share = writers["val"].tokens / (writers["val"].tokens + writers["train"].tokens)
                why = (f"the {val_docs:,} of {docs:,} documents held out would hold {share:.0%} of the tokens, more "
                       "than training")
                sides = "or, where the documents then fall more evenly, splits by document again"
            say(f"note: {why}: split by position instead, the last {cfg.val_fraction:.0%} of the tokens held out; "
                f"text added later moves that cut {sides}")
        writers = _split_by_position(out, writers, cfg, dtype, tok.token_bytes())
    elif cfg.val_fraction > 0:
        _say_uneven_split(writers["val"].tokens, writers["val"].tokens + writers["train"].tokens, val_docs, docs,
                          cfg.val_fraction)
    if not writers["train"].tokens:
        raise HomeLLMError(f"{' '.join(cfg.input)}: too little text ({writers['val'].tokens} tokens) to train on: "
                           "add text or lower --val-fraction")
    tok.save(out / "tokenizer")
    meta = {
        "format": "homellm-tokens-v1",
        "dtype": dtype.name,  # uint16 or uint32, always little-endian
        "vocab_size": tok.vocab_size,
        "eot_id": tok.eot_id,
        "tokenizer": {"dir": "tokenizer", "kind": tok.kind, "source": str(cfg.tokenizer)},
        "shards": {s: w.shards for s, w in writers.items()},
        "train_tokens": writers["train"].tokens,
        "val_tokens": writers["val"].tokens,
        "train_bytes": writers["train"].bytes,
        "val_bytes": writers["val"].bytes,
        "documents": docs,
        "unknown_tokens": unknown,  # characters a char tokenizer never saw, written as <|unk|>
        "val_documents": val_docs if split != "position" else None,
        "split": split,  # document, position, or inputs (val is --val-input)
        "inputs": list(cfg.input),
        **({"val_inputs": list(cfg.val_input)} if cfg.val_input else {}),
        "text_field": cfg.text_field,
        "encoding": cfg.encoding,
        "aozora": cfg.aozora,
        "val_fraction": cfg.val_fraction,
        "seed": cfg.seed,
    }
    return meta


def _say_uneven_split(val_tokens: int, tokens: int, val_docs: int, docs: int, fraction: float) -> None:
    """--val-fraction counts documents: where a few long ones fall on one side (a folder of books, each file one
    document), val may hold most of the text, or next to none of it. Say so, and what splits by tokens."""
    share = val_tokens / tokens
    if fraction / 4 < share < max(2 * fraction, fraction + 0.1):
        return
    held, asked = (f"{100 * x:.2g}%" for x in (share, fraction))  # (a --val-fraction of 0.002 is 0.2%, not 0%)
    print(f"note: val holds {held} of the tokens, where --val-fraction {fraction:g} asks for about {asked}: the "
          f"split goes by document ({val_docs:,} of {docs:,} held out), and they differ in length. --split position "
          f"(prepare's, or pretrain's for raw text) holds out the last {asked} of the tokens instead", file=sys.stderr)


def outweighed(val_tokens: int, train_tokens: int, fraction: float) -> bool:
    """Whether documents held out by a split by document outweigh the training text, beyond what was asked: a
    --val-fraction of a half or more asks for that, and keeps its split."""
    return val_tokens / (val_tokens + train_tokens) > max(0.5, 2 * fraction)


def _split_by_position(out: Path, writers: dict[str, _ShardWriter], cfg: PrepareConfig, dtype: np.dtype,
                       token_bytes: np.ndarray) -> dict[str, _ShardWriter]:
    """Rewrite the shards so the first tokens are train and the rest val: the documents split by document to train
    first, then those held out, each side in corpus order (one side, where everything fell there). The shards are
    streamed block by block, so memory stays flat and disk grows by one shard at most."""
    total = writers["train"].tokens + writers["val"].tokens
    # Leave out the final end-of-text so a single document splits exactly like nanoGPT's text[:int(n * 0.9)].
    n_train = int((total - 1) * (1 - cfg.val_fraction))
    old = []
    for shard in writers["train"].shards + writers["val"].shards:  # (both: held-out documents were lost, review)
        tmp = out / f".old_{shard['file']}"
        os.replace(out / shard["file"], tmp)
        old.append(tmp)
    new = {s: _ShardWriter(out, s, dtype, cfg.shard_tokens, token_bytes) for s in ("train", "val")}
    seen = 0
    for path in old:
        tokens = np.memmap(path, dtype=dtype, mode="r")
        for start in range(0, len(tokens), _COPY_TOKENS):
            # A copy: a view kept the file mapped past `del tokens`, and Windows refuses to delete a mapped file
            block = np.array(tokens[start:start + _COPY_TOKENS])
            k = max(0, min(len(block), n_train - seen))
            new["train"].write(block[:k])
            new["val"].write(block[k:])
            seen += len(block)
        del tokens
        path.unlink()
    for w in new.values():
        w.close()
    return new


# ---- reading prepared data ---------------------------------------------------------------------------------

def read_meta(data_dir: str | Path) -> dict[str, Any]:
    """meta.json of a prepared data folder."""
    path = Path(data_dir) / "meta.json"
    # What an interrupted prepare leaves (a kill mid-way; its own errors clean up): gone at the next prepare there.
    staged = Path(data_dir) / ".preparing"
    if not path.is_file():
        why = " (a prepare into it was interrupted or is running)" if staged.is_dir() else ""
        raise HomeLLMError(f"{data_dir}: not a prepared data folder (no meta.json{why}): run `homellm prepare --input "
                           f"... --tokenizer ... --out {typed(data_dir)}`")
    meta = load_json(path)
    if not isinstance(meta, dict) or meta.get("format") != "homellm-tokens-v1":
        raise HomeLLMError(f"{path}: not written by `homellm prepare`: run `homellm prepare` again")
    if problem := _meta_problem(meta):  # edited or damaged: a KeyError or TypeError in training otherwise
        raise HomeLLMError(f"{path}: {problem}: run `homellm prepare` again")
    return meta


def _meta_problem(meta: dict[str, Any]) -> str | None:
    """What in a meta.json is not as `prepare` writes it, or None."""
    def count(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if meta.get("dtype") not in ("uint16", "uint32"):
        return f"dtype is {meta.get('dtype')!r}, not uint16 or uint32"
    for key in ("vocab_size", "eot_id", "train_tokens", "val_tokens"):
        if not count(meta.get(key)):
            return f"{key} is {meta.get(key)!r}, not a count"
    shards = meta.get("shards")
    if not isinstance(shards, dict) or not all(isinstance(shards.get(s), list) for s in ("train", "val")):
        return "shards is missing or not {\"train\": [...], \"val\": [...]}"
    for split in ("train", "val"):
        for i, shard in enumerate(shards[split]):
            file = shard.get("file") if isinstance(shard, dict) else None
            if not (isinstance(file, str) and file and count(shard.get("tokens"))):  # (nanoGPT's .bin: a path)
                return f"shards.{split}[{i}] is {shard!r}, not {{\"file\": NAME, \"tokens\": COUNT}}"
    return None


def staged_note(data_dir: str | Path) -> str:
    """A note on what an interrupted prepare left in data_dir (its staging folder and size), or ""."""
    staged = Path(data_dir) / ".preparing"
    if not staged.is_dir():
        return ""
    size = sum(f.stat().st_size for f in staged.rglob("*") if f.is_file())
    return (f"{staged} holds {size / 2**20:,.1f} MiB from a prepare into {data_dir} that was interrupted or is "
            "running: training reads the complete data beside it; delete the folder once no prepare runs")


def open_split(data_dir: str | Path, split: str) -> list[np.ndarray]:
    """The shards of `split` (train or val) as read-only memory maps, in order; empty list for an empty split."""
    if split not in ("train", "val"):
        raise HomeLLMError(f"split {split!r} is unknown: use train or val")
    meta = read_meta(data_dir)
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    maps = []
    for shard in meta["shards"][split]:
        path = Path(data_dir) / shard["file"]
        expected = shard["tokens"] * dtype.itemsize
        if not path.is_file() or path.stat().st_size != expected:
            # nanoGPT's files are used where they were (_adopt_nanogpt): moved, they are missing from there
            where = (f" ({data_dir} reads nanoGPT's files where they were prepared from: put them back there, or "
                     "prepare their new place)" if meta.get("split") == "nanogpt" else "")
            raise HomeLLMError(f"{path}: missing or not {expected} bytes as meta.json says{where}: run `homellm "
                               "prepare` again")
        maps.append(np.memmap(path, dtype=dtype, mode="r"))
    return maps
