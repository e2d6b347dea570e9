"""Tokenizers: byte-level BPE or one token per character, stored as Hugging Face `tokenizer.json` files.

    homellm tokenizer train --input ../shared/data/tinyshakespeare/input.txt --vocab-size 1024 --out runs/tok

Both kinds are Hugging Face `tokenizers` objects, so training and encoding run in parallel Rust and the saved
folder loads in `transformers.PreTrainedTokenizerFast`. Every tokenizer reserves the special tokens of
`homellm.config.SPECIAL_TOKENS`; a trained one gives them ids 0..3.
"""

from __future__ import annotations

import difflib
import functools
import json
import re
import shutil
import sys
import threading
import time
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from homellm.config import (
    CHAT_TEMPLATE,
    EOT,
    IM_END,
    IM_START,
    PAD,
    ROLES,
    SPECIAL_TOKENS,
    TokenizerConfig,
    chat_template,
    save_json,
)
from homellm.errors import HomeLLMError, typed
from homellm.io import KINDS, atomic_write, refuse_kinds, say, temp_file_of

UNK = "<|unk|>"  # char tokenizers only: stands for characters absent from the training text
_HF_MAX_LENGTH = int(1e30)  # what transformers writes when a tokenizer has no length limit of its own
# A char tokenizer turns characters it never saw into <|unk|>, which loses them: a few (a rare symbol) are noted,
# more than this share means the wrong tokenizer for the text, and the text is refused.
MAX_UNKNOWN_SHARE = 0.05
# What an imported tokenizer is tried on: case, runs of spaces, tabs, line breaks, accents, Japanese, Chinese and
# emoji, the things lossy tokenizers (WordPiece's lowercasing, NFKC, whitespace splitting) change.
ROUND_TRIP_PROBE = "Hello World!  Two spaces,\ttab.\nCafé naïve 1,234.5 日本語の文章です。中文文本。🙂 (x)"


def check_unknown(unknown: int, total: int, examples: Iterable[str], unit: str, tokenizer: str, where: str,
                  fix: str | None = None) -> None:
    """Say that `unknown` of `total` tokens or characters of `where` are unknown to `tokenizer`, naming the first
    `examples`; refuse past the share above, saying `fix` (prepare and sft use it, so both hold text to the same
    rule)."""
    if not unknown:
        return
    shown = " ".join(list(examples)[:10])  # (the callers give the commonest first)
    # A WordPiece tokenizer loses whole words whose characters it knows alone: then there is no character to show.
    what = (f"{unknown:,} of {total:,} {unit} ({unknown / total:.1%}) are characters the tokenizer {tokenizer} does "
            f"not know, such as {shown!r}" if shown else
            f"{unknown:,} of {total:,} {unit} ({unknown / total:.1%}) are text the tokenizer {tokenizer} cannot write")
    if unknown / total > MAX_UNKNOWN_SHARE:
        fix = fix or "train a tokenizer on this text (`homellm tokenizer train --input ...`)"
        raise HomeLLMError(f"{where}: {what}; they would all become the unknown token: {fix}")
    say(f"note: {where}: {what}; they become the unknown token")


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the ids homellm needs. `hf` is the raw object, for anything else.

    Special-token strings inside text (say a story that quotes "<|im_start|>") are ordinary text unless
    `allow_special=True`: user text can never forge a chat turn or end a document early. `prepare` does not
    rely on this for TinyStories' `<|endoftext|>` separators: the document reader splits on them first and
    prepare appends the real end-of-text id after each document.
    """

    def __init__(self, hf: HFTokenizer, eos: str = EOT, bos: str | None = None, system: str = ""):
        """`eos` ends a document (`eot_id`); an imported model keeps its own (Llama's </s>), which it was trained to
        write. `bos`, where the model was trained with one before every text (Llama's <s>), starts each prompt and
        document (`bos_id`); homellm's own models have none. `system`: the system prompt a conversation without one
        starts with (an imported chat model's own default, as its template had it); "" for none."""
        # Never cut or padded: a hub tokenizer.json may carry truncation (sentence-transformers' 128 tokens) or
        # padding, and every prepared document was cut to it.
        hf.no_truncation()
        hf.no_padding()
        self.hf = hf = _own_template(hf, bos)
        # A second copy with special-token matching off: the Rust flag is per object, and flipping it per call
        # would race with the encoders of another thread.
        self._plain = HFTokenizer.from_str(hf.to_str())
        self._plain.encode_special_tokens = True
        ids = {s: hf.token_to_id(s) for s in SPECIAL_TOKENS}
        missing = [s for s, i in ids.items() if i is None]
        if missing:
            raise HomeLLMError(f"tokenizer lacks the special tokens {', '.join(missing)}: import it with "
                               "`homellm tokenizer train --from-file PATH --out DIR`, which adds them")
        self.im_start_id, self.im_end_id, self.pad_id = (ids[s] for s in (IM_START, IM_END, PAD))
        self.eos, self.bos, self.system = eos, bos, system
        for name, token in (("eos", eos), ("bos", bos)):
            if token is not None and hf.token_to_id(token) is None:
                raise HomeLLMError(f"tokenizer_config.json's {name}_token {token!r} is not in the tokenizer: restore "
                                   "the tokenizer folder (or import the model again)")
        self.eot_id = hf.token_to_id(eos)
        self.bos_id = None if bos is None else hf.token_to_id(bos)
        # One more than the largest id, not the count: imported tokenizers may leave holes, embeddings must not.
        self.vocab_size = max(hf.get_vocab(with_added_tokens=True).values()) + 1
        self._token_bytes: np.ndarray | None = None

    @property
    def padded_size(self) -> int:
        """The ids rounded up to a multiple of 64: a model's embedding rows (such matmuls run faster)."""
        return -(-self.vocab_size // 64) * 64

    @functools.cached_property
    def kind(self) -> str:
        """bpe, char (homellm's: a word-level model over single characters), or the model type of an imported
        tokenizer.json in lower case (wordlevel, wordpiece, unigram)."""
        spec = json.loads(self.hf.to_str())
        model = spec["model"]["type"]
        pattern = ((spec.get("pre_tokenizer") or {}).get("pattern") or {}).get("Regex", "")
        if model == "WordLevel" and pattern.endswith(r"[\s\S]"):  # any one character, after the --words
            return "char"
        return {"BPE": "bpe"}.get(model, model.lower())

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        return (self.hf if allow_special else self._plain).encode(text, add_special_tokens=False).ids

    def encode_offsets(self, text: str, plain: bool = False) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids with special tokens read (as text with `plain`, as `encode` does), and each one's span of characters
        in text."""
        encoding = (self._plain if plain else self.hf).encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    @functools.cached_property
    def cuts_at_lines(self) -> bool:
        """Whether text cut before a line break that follows a non-space character encodes as the whole does:
        byte-level BPE's and char tokenizers do; SentencePiece's add a "▁" at the start of each text they are given
        and may merge across line breaks ("!\n"). Probed, as a tokenizer.json's parts combine in many ways, and read
        off the vocabulary: a token that joins a line break to text (Llama 3's ".\n", Gemma's ":\n") merges across
        such a cut wherever its text comes (the probes catch only the merges they hold)."""
        probes = ("Hello, world.\nThe next line", "日本語です。\n次の行", "x\n\n  y z", "end!\nDe")
        if any(piece is not None and b"\n" in piece and piece.decode("utf-8", "replace").strip()  # (GPT-2: "\n\xa0")
               for piece in self._pieces):
            return False
        return all(self.encode(text) == self.encode(text[:cut]) + self.encode(text[cut:])
                   for text in probes for cut in [text.index("\n")])

    @functools.cached_property
    def unk_id(self) -> int | None:
        """The id text it cannot write becomes: <|unk|> in a char tokenizer, or an imported model's own unknown
        token (<unk>, [UNK]); None for byte-level BPE, which can write any text."""
        if (own := self.hf.token_to_id(UNK)) is not None:
            return own
        model = json.loads(self.hf.to_str())["model"]
        if isinstance(model.get("unk_token"), str):  # BPE, WordPiece
            return self.hf.token_to_id(model["unk_token"])
        return model.get("unk_id") if isinstance(model.get("unk_id"), int) else None  # Unigram

    @functools.cached_property
    def _special_pattern(self) -> re.Pattern | None:
        """The special tokens as text ("<|im_start|>", "<s>"), what `encode` with allow_special reads as them, as one
        pattern (an imported Llama 3 has 256: one search, not 256, per message); None where there are none."""
        special = [t.content for t in self.hf.get_added_tokens_decoder().values() if t.special]
        return re.compile("|".join(map(re.escape, special))) if special else None

    def holds_special(self, text: str) -> bool:
        """Whether text holds a special token's text, which `encode` with allow_special would read as it."""
        return self._special_pattern is not None and self._special_pattern.search(text) is not None

    def unknown_chars(self, text: str, allow_special: bool = False) -> set[str]:
        """The characters of text this tokenizer writes as unknown (kept whole, so --words never count); with
        allow_special, as `encode` reads special tokens: whole, so a char tokenizer's missing '<' and '|' in a
        prompt's <|endoftext|> are not named."""
        unk = self.unk_id
        if unk is None:
            return set()
        if allow_special and self._special_pattern is not None:
            text = self._special_pattern.sub("", text)
        if self.kind != "char":  # a word-level or WordPiece vocabulary: the words it has no token for, whole
            encoding = self._plain.encode(text, add_special_tokens=False)  # (each of whose letters it may know)
            return {text[a:b] for i, (a, b) in zip(encoding.ids, encoding.offsets) if i == unk}
        return {c for c in set(text) if unk in self.encode(c)}

    def fold(self, text: str) -> str:
        """What a person typed, each character this tokenizer cannot write replaced by its compatibility form
        (Unicode's NFKC) where it writes that: an input method's full-width １２×７ as 12×7, which a char model
        trained on ASCII digits read as unknowns. Text it writes is left as it is."""
        unknown = self.unknown_chars(text)
        if not unknown:
            return text

        def writes(piece: str) -> bool:
            return not self.unknown_chars(piece)

        if self.kind != "char":  # a word-level vocabulary's unknown words, whole
            for piece in unknown:
                if (plain := unicodedata.normalize("NFKC", piece)) != piece and writes(plain):
                    text = text.replace(piece, plain)
            return text
        out: list[str] = []
        i = 0
        while i < len(text):
            j = i
            while j < len(text) and text[j] in unknown:
                j += 1
            if j == i:
                out.append(text[i])
                i += 1
                continue
            run = text[i:j]  # unknown characters in a row, with the one before: a half-width ﾞ voices the ｶ before it
            if out and writes(plain := unicodedata.normalize("NFKC", out[-1] + run)):
                out[-1] = plain
            elif writes(plain := unicodedata.normalize("NFKC", run)):
                out.append(plain)
            else:
                out += [p if writes(p := unicodedata.normalize("NFKC", c)) else c for c in run]
            i = j
        return "".join(out)

    def unknown_note(self, text: str, allow_special: bool = False) -> str:
        """A note naming the characters of text the model will read as <|unk|>, or "" when there are none."""
        chars = sorted(self.unknown_chars(text, allow_special))
        if not chars:
            return ""
        shown = ", ".join(repr(c) for c in chars[:10]) + (f" and {len(chars) - 10} more" if len(chars) > 10 else "")
        unk = self.hf.id_to_token(self.unk_id)
        return f"this model's tokenizer cannot write {shown}: the model reads them as {unk}, so they mean nothing to it"

    def round_trip_note(self, text: str) -> str:
        """"" when decode(encode(text)) gives text back, else where it does not, as 'this' comes back as 'that'.
        Characters written as unknown are left out: `unknown_note` names those."""
        unknown = self.unknown_chars(text)
        text = "".join(c for c in text if c not in unknown)
        back = self.decode(self.encode(text))
        if back == text:
            return ""
        tag, i1, i2, j1, j2 = next(op for op in difflib.SequenceMatcher(None, text, back, autojunk=False).get_opcodes()
                                   if op[0] != "equal")
        # around the first difference, at most 40 characters of each side (it may be the whole text)
        start, end = max(0, i1 - 12), min(i2 + 12, i1 + 40)
        return (f"it does not give text back as written: {text[start:end]!r} comes back as "
                f"{back[max(0, j1 - (i1 - start)):min(j2 + 12, j1 + 40)]!r}")

    def encode_prompt(self, text: str) -> list[int]:
        return self.encode_prompts([text])[0]

    def encode_prompts(self, texts: list[str]) -> list[list[int]]:
        """Prompts' ids as the model reads them: special tokens honoured (chat markup), after the bos of a model
        trained with one; an empty prompt starts a fresh document. generate, serve and eval all read prompts so."""
        out = []
        for ids in self.encode_batch(texts, allow_special=True):
            if self.bos_id is not None and ids[:1] != [self.bos_id]:
                ids = [self.bos_id, *ids]
            out.append(ids or [self.start_id])
        return out

    @property
    def end_ids(self) -> frozenset[int]:
        """Where generation ends: end of text, a reply's end, and a new turn (a chat model that skips <|im_end|> and
        opens the next turn would otherwise go on writing the user's part)."""
        return frozenset((self.eot_id, self.im_end_id, self.im_start_id))

    @property
    def start_id(self) -> int:
        """What a text starts after: the bos of a model trained with one, else end of text (homellm's models read
        what follows it as a new document). Exports name it as the bos."""
        return self.eot_id if self.bos_id is None else self.bos_id

    def encode_batch(self, texts: list[str], allow_special: bool = False) -> list[list[int]]:
        """Encode many texts at once on all cores (Rust threads); special strings as in `encode`."""
        tok = self.hf if allow_special else self._plain
        return [e.ids for e in tok.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special)

    def stream(self, skip_special: bool = False, context: Sequence[int] = ()) -> StreamDecoder:
        """A StreamDecoder for the ids that follow `context` (the prompt's), which it does not print."""
        return StreamDecoder(self, skip_special, context)

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes each id adds to decoded text (`_pieces`), 0 for special and unknown tokens: bits per byte is
        sum(nats) / (ln 2 * token_bytes()[targets].sum()), comparable across tokenizers."""
        if self._token_bytes is None:
            out = np.array([0 if piece is None else len(piece) for piece in self._pieces], dtype=np.int64)
            if self.unk_id is not None:
                out[self.unk_id] = 0  # it stands for text it lost, as homellm's own <|unk|> does
            self._token_bytes = out
        return self._token_bytes

    @functools.cached_property
    def _pieces(self) -> list[bytes | None]:
        """The UTF-8 bytes each id writes into decoded text; None for special tokens and ids with no token.

        Exact for byte-level BPE (each character of a token stands for one byte), byte fallback (<0xE3>) and char
        tokenizers; for WordPiece and SentencePiece an approximation from the token strings (their spaces)."""
        spec = json.loads(self.hf.to_str())
        decoder = spec.get("decoder") or {}
        decoders_used = json.dumps(decoder)  # ASCII: "▁" appears as \u2581
        byte_level = "ByteLevel" in decoders_used
        prefix = decoder.get("prefix", "##") if decoder.get("type") == "WordPiece" else None
        # Only a model with byte fallback writes <0xE3> as a byte, and only SentencePiece's decoder turns its mark
        # into a space: a char tokenizer's "▁" is 3 bytes of text, and a --words entry "<0x41>" 6 (both counted 1).
        byte_fallback = bool((spec.get("model") or {}).get("byte_fallback")) or "ByteFallback" in decoders_used
        metaspace = "Metaspace" in decoders_used or "\\u2581" in decoders_used  # its Replace("▁", " ")
        to_byte = {c: b for b, c in _byte_alphabet().items()}
        added = self.hf.get_added_tokens_decoder()
        pieces: list[bytes | None] = [None] * self.vocab_size
        for token, i in self.hf.get_vocab(with_added_tokens=True).items():
            if byte_fallback and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
                pieces[i] = bytes([int(token[3:5], 16)])  # byte fallback, whether or not the file marks it special
            elif i in added:
                pieces[i] = None if added[i].special else token.encode()
            elif byte_level:
                pieces[i] = bytes(to_byte[c] for c in token)
            elif prefix is not None:  # WordPiece: "##ing" joins the word before; any other word follows a space
                pieces[i] = token[len(prefix):].encode() if token.startswith(prefix) else b" " + token.encode()
            elif metaspace:
                pieces[i] = token.replace("\u2581", " ").encode()  # SentencePiece's word-start mark
            else:
                pieces[i] = token.encode()
        return pieces

    def show(self, token_id: int) -> str:
        """One token as a person reads it: its text quoted (a space or line break in it visible), a special token
        as written, and a byte-level token holding part of a character as its bytes in hex, <e7 95>."""
        piece = self._pieces[token_id] if 0 <= token_id < len(self._pieces) else None
        if piece is None:
            return self.hf.id_to_token(token_id) or f"<id {token_id}>"
        try:
            return repr(piece.decode("utf-8"))
        except UnicodeDecodeError:
            return f"<{piece.hex(' ')}>"

    @functools.cached_property
    def special_ids(self) -> frozenset[int]:
        """Ids of the special tokens (the four of the chat format, <|unk|> of a char tokenizer, an import's own)."""
        return frozenset(i for i, t in self.hf.get_added_tokens_decoder().items() if t.special)

    @functools.cached_property
    def utf8_guard(self) -> Utf8Guard:
        """What keeps sampling to valid UTF-8 (see Utf8Guard) and to the tokenizer's ids: the model's vocabulary is
        padded past them (to a multiple of 64), and an untrained model samples those ids, which are no text."""
        return Utf8Guard(self._pieces)

    def same_as(self, other: Tokenizer) -> bool:
        """Whether both turn text into the same ids (the same vocabulary, merges and pre-processing)."""
        return self.hf.to_str() == other.hf.to_str()

    def save(self, out: str | Path, model_max_length: int | None = None) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json (Hugging Face layout).
        `model_max_length` is the context length, when a model is known (the trainer passes block_size)."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        text = self.hf.to_str(pretty=True)
        added = self.hf.get_added_tokens_decoder()
        unk = self.hf.id_to_token(self.unk_id) if self.unk_id is not None else None  # (an import's own: [UNK], <unk>)
        names = {"bos_token": self.bos or self.eos, "eos_token": self.eos, "pad_token": PAD, "unk_token": unk,
                 "additional_special_tokens": [IM_START, IM_END]}
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **names,
            # Read back by `load`; transformers' fast tokenizers add the bos by it (or by tokenizer.json's template).
            **({"add_bos_token": True} if self.bos else {}),
            "model_max_length": model_max_length or _HF_MAX_LENGTH,
            "clean_up_tokenization_spaces": False,  # it would alter decoded text; our round trips are exact
            # Hugging Face's apply_chat_template renders what homellm.chat does, bos included (it adds no special
            # tokens to a chat). A GGUF keeps the template without: llama.cpp adds the bos itself.
            "chat_template": "{{ bos_token }}" * bool(self.bos) + chat_template(self.system),
            **({"default_system_prompt": self.system} if self.system else {}),  # read back by `load`
            "added_tokens_decoder": {
                str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                         "single_word": t.single_word, "special": t.special}
                for i, t in sorted(added.items())
            },
        }
        save_json(out / "tokenizer_config.json", config)
        save_json(out / "special_tokens_map.json", {k: v for k, v in names.items() if v is not None})
        # Last: a folder is a tokenizer once it has tokenizer.json, so a write stopped halfway leaves none
        atomic_write(out / "tokenizer.json", lambda tmp: tmp.write_text(text, encoding="utf-8"))

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load from a tokenizer.json file, a folder holding one, or a run/data folder with a `tokenizer/` inside."""
        path = Path(path)
        for candidate in (path, path / "tokenizer.json", path / "tokenizer" / "tokenizer.json"):
            if candidate.is_file():
                hf = _read_hf(candidate, "train or import the tokenizer again")
                tok = cls(hf, *_saved_settings(candidate.parent))
                if candidate.parent != path:
                    _check_fits(tok, path)
                return tok
        if (path / "config.json").is_file():  # a run: only its own tokenizer gives its ids their meaning
            raise HomeLLMError(f"{path / 'tokenizer'} is missing: copy back the tokenizer/ folder of the data the run "
                               "was trained on (a newly trained tokenizer would give the model's ids other meanings)")
        if (path / "encoder.json").is_file() or path.name == "encoder.json":  # GPT-2's own files
            folder = path if path.is_dir() else path.parent
            raise HomeLLMError(f"{path}: GPT-2's encoder.json and vocab.bpe, not a tokenizer.json: make one from them "
                               f"with `homellm tokenizer train --from-file {typed(folder)} --out TOKENIZER`")
        raise HomeLLMError(f"{path}: no tokenizer.json there (nor in {path / 'tokenizer'}): "
                           "train one with `homellm tokenizer train`, or pass a run or data folder that holds one")


def _check_fits(tok: Tokenizer, run: Path) -> None:
    """A run's tokenizer must have no more ids than its model has rows: another one copied in (a bigger vocabulary)
    ended in an IndexError mid-generation, or an export of a model that cannot read its own tokenizer."""
    try:
        rows = json.loads((run / "config.json").read_bytes())["model"]["vocab_size"]
    except (OSError, ValueError, KeyError, TypeError):  # not a run (data folders hold a tokenizer/ too), or damaged:
        return  # the config's own reading says what is wrong with it
    if isinstance(rows, int) and 0 < rows < tok.vocab_size:
        raise HomeLLMError(f"{run / 'tokenizer'} has {tok.vocab_size:,} ids but the model {rows:,}: it is not the "
                           "run's own tokenizer; restore the tokenizer/ folder the run was trained with")


def _saved_settings(folder: Path) -> tuple[str, str | None, str]:
    """The eos and bos (None: the model reads text with nothing before it) that a folder's tokenizer_config.json
    names, as `save` writes them or as transformers does (a string, or {"content": ...}); <|endoftext|> and no bos
    where it names none. And the default system prompt `save` wrote there ("" for none)."""
    try:
        config = json.loads((folder / "tokenizer_config.json").read_bytes())
    except (OSError, ValueError):  # none (a bare tokenizer.json), or unreadable: homellm's own conventions
        return EOT, None, ""
    if not isinstance(config, dict):
        return EOT, None, ""

    def name(key: str) -> str | None:
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        return value if isinstance(value, str) and value else None

    system = config.get("default_system_prompt")
    return (name("eos_token") or EOT, name("bos_token") if config.get("add_bos_token") is True else None,
            system if isinstance(system, str) else "")


def _byte_alphabet() -> dict[int, str]:
    """Byte-level BPE's printable stand-in for each byte (GPT-2's table, which `tokenizers`' ByteLevel uses)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = (b for b in range(256) if b not in keep)
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + n) for n, b in enumerate(extra)}}


# UTF-8's states between bytes: 0 between characters, else (bytes still due, the next byte's low, high bound).
_UTF8_STATES = [0, (1, 0x80, 0xBF), (2, 0xA0, 0xBF), (2, 0x80, 0xBF), (2, 0x80, 0x9F), (3, 0x90, 0xBF),
                (3, 0x80, 0xBF), (3, 0x80, 0x8F)]
_UTF8_INDEX = {s: i for i, s in enumerate(_UTF8_STATES)}


def _utf8_step(state: int, byte: int) -> int | None:
    """The state after one more byte, or None where the bytes stop being UTF-8 (RFC 3629's table)."""
    if state == 0:
        if byte < 0x80:
            return 0
        lead = [(0xC2, 0xDF, (1, 0x80, 0xBF)), (0xE0, 0xE0, (2, 0xA0, 0xBF)), (0xE1, 0xEC, (2, 0x80, 0xBF)),
                (0xED, 0xED, (2, 0x80, 0x9F)), (0xEE, 0xEF, (2, 0x80, 0xBF)), (0xF0, 0xF0, (3, 0x90, 0xBF)),
                (0xF1, 0xF3, (3, 0x80, 0xBF)), (0xF4, 0xF4, (3, 0x80, 0x8F))]
        return next((_UTF8_INDEX[s] for lo, hi, s in lead if lo <= byte <= hi), None)
    due, lo, hi = _UTF8_STATES[state]
    if not lo <= byte <= hi:
        return None
    return 0 if due == 1 else _UTF8_INDEX[(due - 1, 0x80, 0xBF)]


class Utf8Guard:
    """Keeps sampled text valid UTF-8. A byte-level model can sample a token that ends mid-character and then one
    that does not go on with it; the text then shows U+FFFD. For each state between bytes, `allowed` says which
    tokens keep the bytes valid and `after` where they lead; special tokens only come between characters."""

    def __init__(self, pieces: list[bytes | None]):
        V, S = len(pieces), len(_UTF8_STATES)
        self.allowed = np.zeros((S, V), dtype=bool)
        self.after = np.zeros((S, V), dtype=np.int8)
        for i, piece in enumerate(pieces):
            # Only a token starting with a continuation byte can go on from inside a character.
            for state in range(S) if piece and 0x80 <= piece[0] <= 0xBF else [0]:
                end: int | None = state
                for byte in piece or b"":
                    end = _utf8_step(end, byte)
                    if end is None:
                        break
                if end is not None:
                    self.allowed[state, i], self.after[state, i] = True, end
        self.needed = bool((self.after != 0).any())  # some token ends mid-character
        self.allowed[~self.allowed.any(axis=1)] = True  # a state no token can leave: allow all, never none
        self._masks: dict[Any, Any] = {}  # (device, width) -> the table as a torch tensor there

    def state(self, ids: Iterable[int], state: int = 0) -> int:
        """The state after ids; a token that breaks UTF-8 (a prompt of raw ids) starts afresh between characters."""
        for i in ids:
            state = int(self.after[state, i]) if self.allowed[state, i] else 0
        return state

    def mask(self, states: list[int], device: Any, width: int) -> Any:
        """(len(states), width) bool tensor: the tokens each row may sample next. `width` is the model's vocabulary,
        padded past the tokenizer's: ids beyond it are no token and never allowed."""
        import torch  # here, not at the top: the tokenizer verbs do not need torch

        if (device, width) not in self._masks:
            table = np.zeros((self.allowed.shape[0], width), dtype=bool)
            table[:, :self.allowed.shape[1]] = self.allowed
            self._masks[device, width] = torch.from_numpy(table).to(device)
        return self._masks[device, width][states]


class StreamDecoder:
    """Turns ids into text one at a time for printing as a model generates. With byte-level BPE one character
    (say a Japanese one: 3 UTF-8 bytes) can span tokens, so a trailing U+FFFD is held back until what follows
    settles it. What it prints, joined, is exactly `decode(ids)`: text up to a whole character never changes
    as bytes are added. Only a short window of ids is decoded per token, so the cost stays flat."""

    def __init__(self, tok: Tokenizer, skip_special: bool = False, context: Sequence[int] = ()):
        self._tok, self._skip = tok, skip_special
        # The window: context ids already printed (some decoders, SentencePiece's, drop a leading space that
        # only the first token of a text may drop), then the ids since; `_done` characters of its text are out.
        # It starts with the end of the prompt, so the first new word keeps its space after it ("the" + "▁they").
        self._ids: list[int] = []
        self._done = 0
        context = [int(i) for i in context[-8:]]
        self._restart(context, tok.decode(context, skip_special))

    def push(self, token_id: int) -> str:
        if self._skip and token_id in self._tok.special_ids:  # no text, and a window of them alone never trims
            return ""
        self._ids.append(int(token_id))
        text = self._tok.decode(self._ids, self._skip)
        # Trailing U+FFFDs may be half a character: hold them. Invalid bytes followed by a real character print
        # with it; a run of them only at the very end waits for flush().
        settled = len(text.rstrip("\ufffd"))
        new = text[self._done:settled] if settled > self._done else ""
        self._done = max(self._done, settled)
        if settled == len(text):  # a clean end: start a new window from the shortest clean tail of ids
            self._restart(self._ids, text)
        return new

    def _restart(self, ids: list[int], text: str) -> None:
        """Make the window the shortest tail of `ids` (whose text is `text`, all printed) that decodes alone to
        exactly its part of the text: one byte token of a character (Llama's <0xE3>-style byte fallback) would
        turn every byte run after it into U+FFFDs. And not empty: after a skipped special token alone, or with no
        context, the next word would lose the space a SentencePiece decoder drops at a text's start."""
        for k in range(1, len(ids) + 1):
            tail = self._tok.decode(ids[-k:], self._skip)
            if tail and "\ufffd" not in tail and text.endswith(tail):
                self._ids, self._done = ids[-k:], len(tail)
                return

    def push_all(self, ids: Iterable[int]) -> str:
        """The text of all of `ids` after what came before, held-back characters included."""
        return "".join(self.push(i) for i in ids) + self.flush()

    def flush(self) -> str:
        """Whatever is held back (an incomplete character prints as U+FFFD), and a fresh start."""
        new = self._tok.decode(self._ids, self._skip)[self._done:]
        self._ids, self._done = [], 0
        return new


# ---- training and importing --------------------------------------------------------------------------------

def train_tokenizer(cfg: TokenizerConfig) -> Tokenizer:
    """Train (or import, with cfg.from_file) a tokenizer on cfg.input and save it to cfg.out."""
    if not cfg.out:
        raise HomeLLMError("--out is required: the folder to write the tokenizer to")
    out = Path(cfg.out)
    refuse_kinds(out, KINDS)
    theirs = [n for n in ("tokenizer_config.json", "special_tokens_map.json") if (out / n).exists()]
    if theirs and not (out / "tokenizer.json").exists() and not _own_leftovers(out):
        # written beside tokenizer.json (a folder with one the CLI refuses outright): these alone are someone else's
        raise HomeLLMError(f"--out {cfg.out} holds {' and '.join(theirs)} but no tokenizer.json: a tokenizer writes "
                           "its own there; choose a new --out, or delete them first")
    if cfg.words and (cfg.kind != "char" or cfg.from_file):
        raise HomeLLMError(f"--words {' '.join(cfg.words)}: only a char tokenizer trained here takes words "
                           "(use --kind char, without --from-file)")
    if cfg.from_file and cfg.input:  # the --input was ignored without a word: nothing is trained on it
        raise HomeLLMError(f"--from-file {cfg.from_file} takes a finished tokenizer, which no --input trains: drop "
                           "--input, or --from-file to train one on the input")
    if cfg.from_file:
        tok = import_tokenizer(cfg.from_file)
    elif cfg.kind == "bpe":
        tok = _train_bpe(_training_text(cfg), cfg.vocab_size, sampled=cfg.max_chars > 0)
    elif cfg.kind == "char":
        tok = _train_char(_training_text(cfg), cfg.words)
    else:
        raise HomeLLMError(f"--kind {cfg.kind!r} is unknown: use bpe or char")
    made = not Path(cfg.out).exists()
    try:
        tok.save(cfg.out)
    except BaseException:
        if made:  # a full disk: no half-written tokenizer folder left behind
            shutil.rmtree(cfg.out, ignore_errors=True)
        raise
    return tok


def _own_leftovers(out: Path) -> bool:
    """Whether the files beside a missing tokenizer.json are what `Tokenizer.save` writes before it, in its order (a
    save killed halfway): those may be written again; anyone else's may not."""
    def read(name: str) -> Any:
        try:
            return json.loads((out / name).read_bytes())
        except FileNotFoundError:
            return {"additional_special_tokens": [IM_START, IM_END]}  # the map is written second
        except (OSError, ValueError):
            return None

    config, names = read("tokenizer_config.json"), read("special_tokens_map.json")
    return (isinstance(config, dict) and str(config.get("chat_template")).endswith(CHAT_TEMPLATE)
            and isinstance(names, dict) and names.get("additional_special_tokens") == [IM_START, IM_END])


def unfinished_save(folder: Path) -> bool:
    """Whether `folder` holds only what a `Tokenizer.save` stopped before its tokenizer.json left there: nothing yet,
    its first files, or the temp files of its writes, and nothing else. The save may be done again there (the folder
    even deleted first)."""
    saved = ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json")
    if not folder.is_dir() or (folder / "tokenizer.json").exists():
        return False
    names = [p.name for p in folder.iterdir()]
    if not all(n in saved or temp_file_of(n) in saved for n in names):
        return False
    return not any(n in saved for n in names) or _own_leftovers(folder)


def _training_text(cfg: TokenizerConfig) -> Iterator[str]:
    # Imported here: data.py imports this module for `prepare`.
    from homellm.data import iter_documents

    if not cfg.input:
        raise HomeLLMError("--input is required: .txt/.jsonl files, folders, globs or hf:NAME to train on")
    left = cfg.max_chars or float("inf")
    seen = 0
    for piece in iter_documents(cfg.input, cfg.text_field, cfg.encoding, aozora=cfg.aozora):
        text = piece.text[: int(min(left, len(piece.text)))]
        left -= len(text)
        seen += len(text)
        yield text
        if left <= 0:
            break
    if not seen:
        raise HomeLLMError(f"no text to train on in {' '.join(cfg.input)}: the inputs are empty")


def _special_tokens() -> list[AddedToken]:
    # normalized=False: specials match the raw text; special=True: decode(skip_special=True) drops them.
    return [AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS]


def _byte_level(tok: HFTokenizer) -> HFTokenizer:
    # GPT-2's pre-tokenizer: split with GPT-2's regex, then map each byte to a printable character. No prefix
    # space, so decode(encode(text)) == text exactly.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)  # offsets only, as in Hugging Face's gpt2
    return tok


# A whole run of 1,000 or more: anchored at the run's start, so a search costs the text's length once. Unanchored,
# `\S{1000}` scanned forward from every character of a shorter run to its end (Japanese and Chinese text, runs of
# hundreds of characters without a space, went at 0.5-1 M characters a second against English's 42 M).
_LONG_RUN = re.compile(r"(?<!\S)\S{1000,}")
_RUN_CUT = 1000


def bounded_runs(text: str) -> Iterator[str]:
    """`text` in pieces, cut inside any run of 1,000 characters without a space. The BPE trainer's time grows faster
    than the square of a word's length: 100 KB of letters as one word took 5.1 s, 200 KB 30 s, and a 1 MB line was
    still training after 10 minutes; in pieces, 1 MB takes under a second (bench/README.md). Text of shorter runs
    comes whole, so its tokenizer is the same; a cut costs a long run one pair's count."""
    start = 0
    for m in _LONG_RUN.finditer(text):
        for cut in range(m.start() + _RUN_CUT, m.end() + 1, _RUN_CUT):
            yield text[start:cut]
            start = cut
    if start < len(text) or not start:
        yield text[start:]


MAX_VOCAB = 1 << 21  # 2,097,152: past every released tokenizer (the largest, Gemma's, has 262,144)


# Away from a terminal, where the trainer shows no progress, a line this often says it is at work
HEARTBEAT_S = 60.0
LARGE_TEXT_CHARS = 100_000_000


def _train_watched(train: Callable[[], None], read: list, stop: threading.Event) -> None:
    """Run `train` in a thread of its own and wait for it here. The trainer runs in Rust, which sees no Ctrl-C until
    it returns: a Ctrl-C waited out the whole training (19 minutes on 300 MB of Japanese). Waiting here, the main
    thread takes it at once, and ends the text (the iterator reads `stop`) before it ends the process: one ending with
    that thread reading, in Python called from the trainer, aborted ("FATAL: exception not rethrown"). Merging is the
    trainer's own, and the thread ends with the process there. `read`: [characters read, all read]."""
    done, failed = threading.Event(), []

    def work() -> None:
        try:
            train()
        except BaseException as e:  # (bad input met while reading, raised by the text's iterator)
            failed.append(e)
        finally:
            done.set()

    threading.Thread(target=work, name="homellm-bpe", daemon=True).start()
    start = said = time.monotonic()
    try:
        # Short waits: on Windows a Ctrl-C is seen only when a wait ends (before Python 3.14)
        while not done.wait(0.25):
            if time.monotonic() - said >= HEARTBEAT_S and not _progress_shown():
                said = time.monotonic()
                say(f"training the tokenizer: {read[0]:,} characters read" + (", merging" if read[1] else "")
                    + f", {(said - start) / 60:.0f} min so far")
    except KeyboardInterrupt:
        stop.set()
        end = time.monotonic() + 30
        while not read[1] and not done.wait(0.05) and time.monotonic() < end:
            pass  # the text ends at its next piece
        raise
    if failed:
        raise failed[0]


def _progress_shown() -> bool:
    """Whether the trainer draws its own progress bars (on a terminal only)."""
    return sys.stdout.isatty()


_ROLES_TEXT = "user\nassistant\nsystem\n"  # as a chat turn's header has them, after <|im_start|>


def _train_bpe(texts: Iterator[str], vocab_size: int, sampled: bool = False) -> Tokenizer:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size > MAX_VOCAB:  # the trainer reserves memory by it: 5e9 was a Rust crash asking for 283 GB
        raise HomeLLMError(f"--vocab-size {vocab_size:,} is beyond any use (GPT-2 has 50,257 ids, Llama 3 128,256): "
                           f"give at most {MAX_VOCAB:,}")
    if vocab_size < len(alphabet) + len(SPECIAL_TOKENS):
        raise HomeLLMError(f"--vocab-size {vocab_size} is too small: byte-level BPE needs at least "
                           f"{len(alphabet) + len(SPECIAL_TOKENS)} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    tok = _byte_level(HFTokenizer(models.BPE()))
    # The full 256-byte alphabet, seen in training or not: any text, in any script, round-trips losslessly.
    # The trainer's progress goes to stdout, and away from a terminal it is only blank lines in the output.
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=_special_tokens(), initial_alphabet=alphabet,
                                  show_progress=_progress_shown())
    chars: Counter[str] = Counter()
    read = [0, False]  # characters read, and whether all are (the heartbeat's, from another thread)
    stop = threading.Event()

    def counted(texts: Iterator[str]) -> Iterator[str]:
        for text in texts:
            if stop.is_set():  # Ctrl-C: the text ends here (an error raised here came out after the merging only)
                break
            chars.update(text)
            if read[0] < LARGE_TEXT_CHARS <= read[0] + len(text) and not sampled:
                say(f"note: over {LARGE_TEXT_CHARS // 10**6} M characters to train the tokenizer on, and more to come: "
                    "BPE training holds every different word in memory, and Japanese or Chinese, written without "
                    "spaces, has many (300 MB of it took 7 GB and 19 minutes): a sample trains as well, --max-chars "
                    "50000000 (pretrain: --tokenizer-max-chars)")
            read[0] += len(text)
            yield from bounded_runs(text)
        # The chat format's role names, one token each: a tokenizer of Chinese or Japanese text split `assistant`
        # into 9 tokens, `user` 4, `system` 6, some 20 of every exchange's context. Counted once per 1,000
        # characters of text (1,000 times at least), they are merged early (the zh_classics at 2,000 and 8,000
        # tokens: all three one token each, the text's own tokens 0.2 % and 0.01 % more; tinyshakespeare at 512:
        # 0.5 % more).
        if not stop.is_set():
            for i in range(0, count := max(1000, read[0] // 1000), 1000):
                yield _ROLES_TEXT * min(1000, count - i)
        read[1] = True

    _train_watched(lambda: tok.train_from_iterator(counted(texts), trainer), read, stop)
    if (got := tok.get_vocab_size()) < vocab_size:  # merging stops when no pair of tokens repeats
        print(f"note: the text gives {got:,} tokens, not the {vocab_size:,} asked: every pair that repeats is merged "
              "already; more text would give more", file=sys.stderr)
    elif len(chars) > vocab_size // 2:
        # Chinese or Japanese text: many of its characters may stay split into their 3 UTF-8 bytes, so a token
        # holds less than a character (1.04 tokens a character on Chinese classics at 1,024). Measured, by how
        # often they occur: at 8,000 the same text splits 1.3 % of them, and a note said the opposite.
        split = sum(n for c, n in chars.items() if len(tok.encode(c, add_special_tokens=False).ids) > 1)
        if split > 0.1 * chars.total():  # (on 200,000 characters of Chinese: 18.5 % at 1,024 tokens, 7.2 % at 2,000)
            print(f"note: {split / chars.total():.0%} of the text's characters stay split into bytes, several tokens "
                  f"each, as its {len(chars):,} different characters are many for {vocab_size:,} tokens: Chinese or "
                  f"Japanese text wants a larger --vocab-size ({max(8000, 2 * vocab_size):,}, say; --tokenizer-vocab "
                  "in pretrain), or a char tokenizer", file=sys.stderr)
    return Tokenizer(tok)


def _train_char(texts: Iterator[str], words: Sequence[str] = ()) -> Tokenizer:
    """One token per character, ids in code-point order after the specials (nanoGPT's char model), then one
    per word: a string such as `\\times` that is always one token, which shortens every sequence that has it.
    Lossless only on the training alphabet (plus the letters of the chat roles): other characters become <|unk|>.
    --vocab-size does not apply."""
    for w in words:
        if not w or any(special in w for special in [*SPECIAL_TOKENS, UNK]):
            raise HomeLLMError(f"--words {w!r}: a word must be non-empty and hold no special token such as {EOT}: "
                               "plain text must never encode to one")
        if "\n" in w:
            raise HomeLLMError(f"--words {w!r}: a word cannot hold a line break (`prepare` may cut text there)")
    # The chat format's role names and line break, whatever the text: a char model of a Chinese corpus could
    # otherwise never be fine-tuned into a chat model (every turn's header would read as unknowns).
    chars: set[str] = set("".join(ROLES) + "\n")
    for text in texts:
        chars.update(text)
    vocab = {s: i for i, s in enumerate([*SPECIAL_TOKENS, UNK])}
    for c in [*sorted(chars), *words]:
        vocab.setdefault(c, len(vocab))
    tok = HFTokenizer(models.WordLevel(vocab, unk_token=UNK))
    # Every character alone, except the words, longest first so that a word inside a longer one never wins.
    # Ties by text: by length alone, equal lengths (\\times, \\frac{) came in set order, which string hashing
    # changes per process, so two quickstarts wrote different tokenizer.json for the same ids.
    pieces = [re.escape(w) for w in sorted(set(words), key=lambda w: (-len(w), w))] + [r"[\s\S]"]
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("|".join(pieces)), behavior="isolated")
    tok.decoder = decoders.Fuse()  # join the characters back without separators
    tok.add_special_tokens([*_special_tokens(), AddedToken(UNK, special=True, normalized=False)])
    return Tokenizer(tok)


def _read_hf(file: Path, fix: str) -> HFTokenizer:
    """A Hugging Face tokenizer from its tokenizer.json, or a one-line error that tells a file that is not JSON from
    JSON that is not a tokenizer (the Rust side reports both as a parse error at some line and column)."""
    try:
        spec = json.loads(file.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HomeLLMError(f"{file}: not JSON ({e}): {fix}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
        raise HomeLLMError(f"{file}: JSON, but not a tokenizer.json (it has no 'model' section): {fix}")
    try:
        return HFTokenizer.from_file(str(file))
    except Exception as e:  # the Rust side raises plain Exceptions with multi-line messages
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise HomeLLMError(f"{file}: not a valid tokenizer.json ({reason}): {fix}") from None


def import_tokenizer(path: str | Path) -> Tokenizer:
    """An existing tokenizer.json (file, or a folder holding one), or GPT-2's encoder.json + vocab.bpe, with the
    special tokens it lacks added after its vocabulary. GPT-2's own `<|endoftext|>` (50256) is kept, and a model
    folder's own end and start of text (Llama's </s> and <s>, see `_source_ends`) are what `eot_id` and `bos_id`
    are."""
    return imported_tokenizer(path)[0]


def imported_tokenizer(path: str | Path) -> tuple[Tokenizer, list[int]]:
    """`import_tokenizer`, and the ids of the special tokens it added: a model imported with it has no trained
    rows for them."""
    if str(path).startswith("hf:"):  # a model's tokenizer by its hub name (seed 001: rinna/japanese-gpt2-small)
        from homellm.hf import hub_download

        path = hub_download(str(path), weights=False)
    path = Path(path)
    if path.is_dir() and not (path / "tokenizer.json").is_file() and (path / "tokenizer" / "tokenizer.json").is_file():
        path = path / "tokenizer"  # a run or prepared data: its own tokenizer, as prepare's --tokenizer reads it
    # GPT-2's files as OpenAI released them, or as the hub names them (vocab.json + merges.txt) where a model
    # folder has no tokenizer.json.
    pair = next(((path / v, path / m) for v, m in (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt"))
                 if path.is_dir() and (path / v).is_file() and (path / m).is_file()), None)
    if pair is not None and not (path / "tokenizer.json").is_file():
        try:
            bpe = models.BPE.from_file(str(pair[0]), str(pair[1]))
        except Exception as e:
            raise HomeLLMError(f"{path}: cannot read {pair[0].name} + {pair[1].name} ({str(e).splitlines()[0]}): "
                               "restore the files") from None
        hf = _byte_level(HFTokenizer(bpe))
    else:
        file = path / "tokenizer.json" if path.is_dir() else path
        spm = None  # a SentencePiece model, named or the only tokenizer in a folder
        if path.suffix == ".model" and path.is_file():
            spm = path
        elif path.is_dir() and not file.is_file():
            spm = next(iter(sorted(path.glob("*.model"))), None)
        if spm is not None:
            # Models from the hub that ship only this (rinna's, T5's) convert once with transformers, which knows
            # each family's conventions (byte fallback, the leading space); homellm then imports the result.
            folder = spm.parent
            needs = "" if (folder / "tokenizer_config.json").is_file() else (
                f" (in the model's folder as downloaded: {folder} lacks the tokenizer_config.json that names its kind)")
            raise HomeLLMError(f"--from-file {path}: {spm.name} is a SentencePiece model, which homellm imports once "
                               f"it is a tokenizer.json: convert it with transformers{needs} (pip install transformers "
                               f"sentencepiece protobuf): python -c \"from transformers import AutoTokenizer; "
                               f"AutoTokenizer.from_pretrained('{folder}').save_pretrained('{folder}-hf')\", then "
                               f"give --from-file {folder}-hf")
        if not file.is_file():
            what = "a folder without tokenizer files" if path.is_dir() else "not found"  # (it said not found of both)
            raise HomeLLMError(f"--from-file {path}: {what}: give a tokenizer.json, or a folder with "
                               "tokenizer.json (a run or prepared data folder too) or with GPT-2's encoder.json + "
                               "vocab.bpe")
        # GPT-2's own files are a pair, read together from their folder (its encoder.json alone is a vocabulary)
        pair = file.name in ("encoder.json", "vocab.json") and any(
            (file.parent / n).is_file() for n in ("vocab.bpe", "merges.txt"))
        hf = _read_hf(file, f"give its folder, {file.parent}, where it is read with its merges" if pair else
                      "give a Hugging Face tokenizer.json")
    eos, bos = _source_ends(path if path.is_dir() else path.parent, hf)
    # A token already in the vocabulary keeps its id (GPT-2's <|endoftext|>) and becomes special; the others are
    # appended after the largest id.
    before = hf.get_vocab(with_added_tokens=True)
    # (a bos named by tokenizer_config.json's add_bos_token alone is written into tokenizer.json by Tokenizer)
    missing = [s for s in SPECIAL_TOKENS if s not in before]
    if missing and before and (top := max(before.values())) >= len(before):
        # The library numbers tokens it adds from the vocabulary's count: where its ids have holes, that is an id
        # in use (a WordLevel of ids 0, 1, 4, 5 gave <|endoftext|> the 4 of "b"). Written into the vocabulary past
        # its largest id first, they keep those ids.
        spec = json.loads(hf.to_str())
        if isinstance(spec["model"].get("vocab"), dict):  # (BPE, WordPiece, WordLevel: a Unigram's ids have no holes)
            spec["model"]["vocab"].update({token: top + 1 + k for k, token in enumerate(missing)})
            hf = HFTokenizer.from_str(json.dumps(spec))
    hf.add_special_tokens(_special_tokens())
    if clash := [s for s in missing if hf.token_to_id(s) in set(before.values())]:
        raise HomeLLMError(f"{path}: its ids leave no room for {clash[0]} (it would take an id in use): save the "
                           "tokenizer again from its source with its ids in order")
    tok = Tokenizer(hf, eos, bos)
    added = sorted(hf.token_to_id(s) for s in missing)
    if note := tok.unknown_note(ROUND_TRIP_PROBE):
        print(f"note: {path}: {note}", file=sys.stderr)
    if note := tok.round_trip_note(ROUND_TRIP_PROBE):
        if not tok.decode(tok.encode(ROUND_TRIP_PROBE)).strip():  # nothing at all: no model could write with it
            raise HomeLLMError(f"{path}: its tokenizer gives no text back ({ROUND_TRIP_PROBE[:12]!r}... "
                               "comes back as ''): its tokenizer.json is damaged or empty (a vocabulary lost in a "
                               "conversion?): save the tokenizer again from its source")
        print(f"note: {path}: {note}; a model trained with it writes text that way", file=sys.stderr)
    return tok, added


def _own_template(hf: HFTokenizer, bos: str | None) -> HFTokenizer:
    """hf, adding to a text what homellm adds: its bos in front, or nothing. A T5-style template (`$A </s>`, as
    rinna's converted tokenizer has) or BERT's `[CLS] $A [SEP]` made the exported tokenizer end every prompt that
    transformers encoded with a document's end, where homellm's own ids have none."""
    if bos is not None and hf.token_to_id(bos) is None:
        return hf  # (Tokenizer names the missing bos in one line)
    spec = json.loads(hf.to_str())
    post = spec.get("post_processor")
    steps = (post.get("processors") or [] if post.get("type") == "Sequence" else [post]) if post else []
    want = ([("SpecialToken", bos)] if bos is not None else []) + [("Sequence", "A")]
    templates = [[(kind, value["id"]) for item in p.get("single") or [] for kind, value in item.items()]
                 for p in steps if p.get("type") == "TemplateProcessing"]
    if all(p.get("type") in ("ByteLevel", "TemplateProcessing") for p in steps) and all(
            t == want for t in templates) and (templates or bos is None):
        return hf  # (ByteLevel's steps set offsets only)
    kept = [p for p in steps if p.get("type") == "ByteLevel"]
    if bos is not None:
        template = HFTokenizer(models.BPE())
        template.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                                special_tokens=[(bos, hf.token_to_id(bos))])
        kept.append(json.loads(template.to_str())["post_processor"])
    spec["post_processor"] = None if not kept else kept[0] if len(kept) == 1 else {"type": "Sequence",
                                                                                   "processors": kept}
    return HFTokenizer.from_str(json.dumps(spec))


def config_eos_ids(path: Path) -> list[int]:
    """A transformers config's eos_token_id (config.json's, generation_config.json's): one id or a list of them; []
    where the file or the field is missing."""
    try:
        value = json.loads(path.read_bytes()).get("eos_token_id")
    except (OSError, ValueError, AttributeError):
        return []
    return [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, int)]


def _source_ends(folder: Path, hf: HFTokenizer) -> tuple[str, str | None]:
    """An imported tokenizer's own end and start of text, which its model was trained with: eos from
    tokenizer_config.json (else config.json's eos_token_id), bos where the tokenizer adds one (tokenizer.json's
    template, as Llama 3's, or add_bos_token, as Llama 2's and TinyLlama's). Where it names none, or names a token
    it does not have: homellm's <|endoftext|> and no bos, as for a model trained from scratch."""
    eos, bos, _ = _saved_settings(folder)
    if eos == EOT:
        ids = config_eos_ids(folder / "config.json")
        # A special token only: a config's default id (LlamaConfig's 2) may be a byte of another tokenizer.
        special = {i: t.content for i, t in hf.get_added_tokens_decoder().items() if t.special}
        eos = special.get(ids[0], EOT) if ids else EOT
    if bos is None:
        post = json.loads(hf.to_str()).get("post_processor") or {}
        for proc in post.get("processors", [post]):
            first = (proc.get("single") or [{}])[0] if proc.get("type") == "TemplateProcessing" else {}
            if "SpecialToken" in first:
                bos = first["SpecialToken"]["id"]
    known = hf.get_vocab(with_added_tokens=True)
    return (eos if eos in known or eos == EOT else EOT), (bos if bos in known else None)
