"""`homellm compare`: the same prompts through two runs, side by side, as a table on screen and a Markdown report.

    homellm compare runs/base runs/base-sft --prompts prompts.txt      # writes runs/base-sft/compare.md

Greedy by default, so the differences come from the models. A run whose config.json has an `sft` section gets
each prompt as a user message (ChatML), a pretrained run a raw continuation; --chat wraps prompts for both.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path
from typing import TextIO

from homellm.chat import prompt_ids
from homellm.checkpoint import load_for_generation, speaks_chatml
from homellm.config import CompareConfig
from homellm.data import jsonl_records
from homellm.errors import HomeLLMError
from homellm.generate import stream_ids
from homellm.io import atomic_write_text, check_overwrite, display_width, progress_bar, stamped
from homellm.model import GPT
from homellm.tokenizer import Tokenizer

PROMPTS_HELP = ('give a .txt file with one prompt a line, a .jsonl file with a "prompt" field per line, or a .json '
                'array of prompts')


def read_prompts(path: str | Path) -> list[str]:
    """The prompts of a .txt file (one a line, blank lines skipped), a .jsonl file ({"prompt": ...} a line) or a
    .json array (of strings, or of such objects); a .json file was read as lines of text."""
    if not str(path):
        raise HomeLLMError(f"--prompts is missing: {PROMPTS_HELP}")
    path = Path(path)
    if not path.is_file():
        raise HomeLLMError(f"{path}: {'a folder, not a file' if path.is_dir() else 'no such file'}: {PROMPTS_HELP}")
    prompts = []
    if path.suffix in (".jsonl", ".json"):
        for where, record in jsonl_records(path):
            if isinstance(record, HomeLLMError):
                raise record
            if isinstance(record, dict) and isinstance(record.get("prompt"), str):
                record = record["prompt"]
            if not isinstance(record, str):
                raise HomeLLMError(f'{where}: no string "prompt" field: write {{"prompt": "..."}}')
            prompts.append(record)
    else:
        try:
            # A byte-order mark some editors put first is no part of the first prompt (stripped after decoding, not
            # by utf-8-sig, so that an error's byte offset counts it). Bytes, not read_text: lines end at \n alone,
            # a \r before it from Windows dropped; read_text would also end one at a lone \r, and splitlines() at
            # U+2028, U+0085 and \f, which can be inside a prompt.
            text = path.read_bytes().decode("utf-8").removeprefix("\ufeff")
            prompts = [line.removesuffix("\r") for line in text.split("\n") if line.strip()]
        except UnicodeDecodeError as e:
            raise HomeLLMError(f"{path}: not UTF-8 (byte offset {e.start}): convert the file to UTF-8") from None
    if not prompts:
        raise HomeLLMError(f"{path}: no prompts in the file: {PROMPTS_HELP}")
    return prompts


def complete(run: str | Path, model: GPT, tok: Tokenizer, prompts: list[str], cfg: CompareConfig, chat: bool
             ) -> list[str]:
    """Each prompt's continuation (raw) or reply (chat) by the run's model, stop strings cut off."""
    out = []
    for p in progress_bar(prompts, desc=Path(run).name, unit="prompt"):
        # raw prompts honour special tokens, as `homellm generate` does; chat content is always plain text
        ids = prompt_ids(tok, [{"role": "user", "content": p}]) if chat else tok.encode_prompt(p)
        # a continuation cut off by max_new_tokens mid-character ends in U+FFFD: drop it
        out.append("".join(stream_ids(model, tok, ids, cfg)).rstrip("\ufffd"))
    return out


def md_cell(text: str) -> str:
    """Text that stays inside one Markdown table cell and shows as written: HTML escaped (a prompt's <b> is no bold),
    Markdown's marks escaped (`2*3*4` is no italics, LaTeX's `\\{` keeps its backslash, `$x$` is no math on GitHub),
    pipes escaped, line breaks as <br>."""
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")  # & first: the others add one
    text = re.sub(r"([\\`*_\[\]~$])", r"\\\1", text)  # (a backslash before any punctuation shows it as written)
    return text.replace("|", "\\|").replace("\r\n", "\n").replace("\r", "\n").replace("\n", "<br>")


def markdown(header: list[str], rows: list[list[str]], intro: str) -> str:
    lines = [intro, "", "| " + " | ".join(map(md_cell, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(md_cell, row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def wrap(text: str, width: int) -> list[str]:
    """Lines of at most `width` columns: break at the last space when there is one (English), anywhere else
    (Japanese has no spaces)."""
    lines = []
    for para in text.replace("\t", " ").replace("\r", "").split("\n"):
        line = ""
        for c in para:
            if display_width(line + c) > width:
                cut = line.rfind(" ")
                head, line = (line[:cut], line[cut + 1:]) if cut > 0 else (line, "")
                lines.append(head)
            line += c
        lines.append(line)
    return lines


def screen_table(header: list[str], rows: list[list[str]], widths: list[int]) -> str:
    """A table of wrapped cells, one rule between rows, for a terminal."""

    def fmt(cells: list[str]) -> list[str]:
        wrapped = [wrap(c, w) for c, w in zip(cells, widths)]
        height = max(map(len, wrapped))
        return [" | ".join(col[i] + " " * (w - display_width(col[i])) if i < len(col) else " " * w
                           for col, w in zip(wrapped, widths)).rstrip() for i in range(height)]

    rule = "-+-".join("-" * w for w in widths)
    lines = fmt(header)
    for row in rows:
        lines += [rule, *fmt(row)]
    return "\n".join(lines)


def compare(run_a: str | Path, run_b: str | Path, cfg: CompareConfig, out: TextIO = sys.stdout) -> Path:
    """Run cfg.prompts through both runs, print the table, write the Markdown report; its path."""
    prompts = read_prompts(cfg.prompts)
    runs = [Path(run_a), Path(run_b)]
    path = Path(cfg.out) if cfg.out else runs[1] / "compare.md"
    check_overwrite(path, "choose another --out")  # before the work, not after it
    modes = [speaks_chatml(r) if cfg.chat is None else cfg.chat for r in runs]
    # Both loaded before any generation: a run that cannot be used fails now, not after the other's prompts.
    loaded = [(load_for_generation(r, cfg), Tokenizer.load(r)) for r in runs]
    outputs = [complete(r, model, tok, prompts, cfg, chat) for r, (model, tok), chat in zip(runs, loaded, modes)]
    header = ["#", "prompt", *(f"{ab}: {r.name}" for ab, r in zip("AB", runs))]
    rows = [[str(i), p, a, b] for i, (p, a, b) in enumerate(zip(prompts, *outputs), 1)]
    # The checkpoints loaded (`best` falls back to `last` in a run not yet evaluated), and every setting that
    # shaped the text: beams ignore the temperature, and a penalty or stop string changes what is written.
    used = [model.loaded_from.name for model, _ in loaded]
    sampling = (f"beam search, {cfg.num_beams} beams" if cfg.num_beams > 1 else "greedy" if cfg.temperature == 0 else
                f"temperature {cfg.temperature}, top_k {cfg.top_k}, top_p {cfg.top_p}, seed {cfg.seed}")
    sampling += f", repetition penalty {cfg.repetition_penalty:g}" * (cfg.repetition_penalty != 1)
    sampling += f", stopping at {' or '.join(repr(s) for s in cfg.stop)}" * bool(cfg.stop)
    intro = "\n".join([
        "# homellm compare", "",
        *(f"- {ab}: `{r}` ({name} checkpoint), prompts {'as a user message' if chat else 'continued raw'}"
          for ab, r, name, chat in zip("AB", runs, used, modes)),
        f"- {len(prompts)} prompts from `{cfg.prompts}`, {sampling}, at most {cfg.max_new_tokens} new tokens",
    ])
    total = max(shutil.get_terminal_size((120, 24)).columns, 40) - 3 * (len(header) - 1)
    number = len(str(len(rows)))
    rest = total - number
    widths = [number, rest // 4, (rest - rest // 4) // 2, rest - rest // 4 - (rest - rest // 4) // 2]
    out.write(screen_table(header, rows, widths) + "\n")
    atomic_write_text(path, stamped(markdown(header, rows, intro)))
    out.write(f"written to {path}\n")
    return path
