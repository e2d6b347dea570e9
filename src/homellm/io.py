"""Atomic file writes: temp file in the same folder, fsync, rename. A crash or a full disk mid-write leaves
the previous file intact. And what goes to stderr: notes said once under torchrun, progress bars that read well
in a terminal and in a log."""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import math
import os
import re
import shutil
import sys
import tempfile
import time
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

from homellm.errors import HomeLLMError

# Windows cannot open a folder as a file (every checkpoint failed there with permission denied), and NTFS journals
# a rename itself: there is nothing to fsync there.
FOLDERS_OPEN = os.name != "nt"


# The file that makes a folder one of homellm's kinds. A verb writing into such a folder would replace its files (a
# run's tokenizer/, prepared data's tokenizer.json), leaving its token ids meaning other text.
KINDS = {"config.json": "a run", "meta.json": "prepared data", "tokenizer.json": "a tokenizer"}


def refuse_kinds(out: str | Path, names: Iterable[str]) -> None:
    """Refuse to write into `out` where it holds one of the kinds `names` marks (keys of KINDS)."""
    for name in names:
        if (Path(out) / name).is_file():
            raise HomeLLMError(f"--out {out} already holds {KINDS[name]} ({name}): choose a new --out"
                               + (f", or delete {Path(out) / name} first" if name == "tokenizer.json" else ""))


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (where folders can be opened: FOLDERS_OPEN)."""
    if not FOLDERS_OPEN:
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@functools.cache
def file_mode() -> int:
    """The mode a plain open() would give a new file here (0666 less the umask). mkstemp and safetensors make
    0600 files: a run should be as readable as any other file its owner makes."""
    mask = os.umask(0)  # the only way to read it is to set it: put it straight back
    os.umask(mask)
    return 0o666 & ~mask


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # (POSIX only: on Windows signal 0 is CTRL_C_EVENT)
    except ProcessLookupError:
        return False
    except OSError:  # another user's: alive
        pass
    return True


# atomic_write's temp files: .NAME.PID.RANDOM.tmp (mkstemp's random part has no dot; NAME may have some)
_TEMP = re.compile(r"\.(.+)\.(\d+)\.\w+\.tmp")


def temp_file_of(name: str) -> str | None:
    """The file an atomic_write temp file named `name` was writing, or None when it is not one."""
    return m[1] if (m := _TEMP.fullmatch(name)) else None


def _remove_stale_temp_files(path: Path) -> None:
    """Delete the temp files of earlier writes of `path` whose process is gone (killed mid-write: a GGUF export's
    is the model's whole size, hidden). Their names carry the writer's pid; a live writer's stays."""
    if os.name == "nt":
        return
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        m = _TEMP.fullmatch(tmp.name)
        if m and m[1] == path.name and int(m[2]) != os.getpid() and not _alive(int(m[2])):
            tmp.unlink(missing_ok=True)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)`, fsync the result and rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_files(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    except OSError as e:  # a read-only folder: the error named a hidden temp file no one asked for
        raise OSError(e.errno, e.strerror, str(path)) from None
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, file_mode())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_folder(out: Path, write: Callable[[Path], None], suffix: str = ".writing") -> None:
    """A new folder `out` (absent or empty) written whole or not at all: `write` fills a staging folder beside it,
    which is then renamed into place. A crash, a full disk or Ctrl-C never leaves half a run or model behind."""
    out = out.resolve()  # `--out .` has no name to stage beside
    stage = out.parent / f".{out.name}{suffix}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        write(stage)
        for f in stage.rglob("*"):  # safetensors writes 0600: an export is meant to be shared and uploaded
            if f.is_file():
                os.chmod(f, file_mode())
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if out.is_dir():
        out.rmdir()  # empty (the callers check first); renaming over a folder works on POSIX only
    os.replace(stage, out)


# The last line of a report or saved chat homellm writes: the checksum of what is above it, by which a later write
# tells its own file, unchanged, from one a person wrote or added notes to (a first line alone did not: notes added
# below a saved chat were lost to the next /save). An HTML comment: Markdown shows nothing of it.
_STAMP = re.compile(rb"<!-- written by homellm, sha256 ([0-9a-f]{64}) -->\n\Z")


def stamped(text: str) -> str:
    """Markdown with the stamp check_overwrite reads as its last line."""
    text += "" if text.endswith("\n") else "\n"
    return f"{text}<!-- written by homellm, sha256 {hashlib.sha256(text.encode()).hexdigest()} -->\n"


def check_overwrite(path: Path, fix: str) -> None:
    """Refuse to replace a file unless homellm wrote it (`stamped`) and nobody has changed it since: a /save or
    report written over someone's notes or data would lose them. An empty file, or none, is fine."""
    path = Path(path)
    if path.is_dir():
        raise HomeLLMError(f"{path} is a folder: {fix}")
    if path.exists() and (size := path.stat().st_size):  # an empty file holds nothing to lose
        with open(path, "rb") as f:  # the stamp from the end, then the body in chunks: --out may be a big corpus
            f.seek(max(0, size - 128))
            tail = f.read()
            stamp = _STAMP.search(tail)
            if stamp is not None:
                f.seek(0)
                digest = hashlib.sha256()
                left = size - (len(tail) - stamp.start())
                while left > 0 and (chunk := f.read(min(left, 1 << 20))):
                    digest.update(chunk)
                    left -= len(chunk)
        if stamp is None or digest.hexdigest().encode() != stamp[1]:
            raise HomeLLMError(f"{path} exists, and homellm did not write it or it was changed since: {fix}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


_said: set[str] | None = None  # within notes_once(): the notes said so far


def world_size() -> int:
    """The processes of this run: torchrun's WORLD_SIZE, else 1 (unset, empty or not a count: no torchrun). One
    reading for all: seven ways of parsing it disagreed, and an empty one was a ValueError's traceback in one."""
    value = os.environ.get("WORLD_SIZE", "")
    return int(value) if value.isascii() and value.isdigit() and int(value) > 0 else 1  # ("²" is a digit too)


def say(text: str) -> None:
    """A line on stderr, once under torchrun: every rank reaches the same notes, and rank 0 says them."""
    if _said is not None:
        if text in _said:
            return
        _said.add(text)
    if os.environ.get("RANK", "0") == "0":
        from tqdm import tqdm

        tqdm.write(text, file=sys.stderr)  # above a progress bar drawn there, not inside its line


@contextlib.contextmanager
def notes_once() -> Iterator[None]:
    """Within it, a note said once is not said again: pretrain from raw text reads the text twice (a tokenizer
    trained on it, then its shards), and what it notes about a file holds for both readings."""
    global _said
    outer, _said = _said, set() if _said is None else _said
    try:
        yield
    finally:
        _said = outer


class _LogLines:
    """A log's view of a progress bar: each redraw, which a terminal overwrites in place after a carriage return,
    as a line of its own; nothing for the bar's own clearing and closing."""

    def __init__(self, stream: TextIO):
        self.stream, self.last = stream, ""

    def write(self, text: str) -> int:
        if "\r" in text:
            frame = text.rsplit("\r", 1)[-1].rstrip(" ")
            if frame and frame != self.last:  # the bar redrawn as it was, after a line written above it: said already
                self.stream.write(frame + "\n")
                self.last = frame
        elif text != "\n":  # the closing line break: the last frame ended its line already
            self.stream.write(text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(iterable: Iterable | None = None, **kw: Any) -> Any:
    """tqdm on stderr. Where stderr is a log (`> log 2>&1`, nohup, CI) rather than a terminal, a plain line every
    30 s and at the end: redrawn frames there were hundreds of carriage-return-joined copies on one line."""
    from tqdm import tqdm

    if sys.stderr.isatty():
        return tqdm(iterable, file=sys.stderr, dynamic_ncols=True, **kw)
    return tqdm(iterable, file=_LogLines(sys.stderr), mininterval=30.0, ncols=100, **kw)


def display_width(text: str) -> int:
    """Terminal columns: East Asian wide characters (kana, kanji) take two, combining marks none."""
    return sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


class BusyCores:
    """Other work on the cores this process may run on (Linux's /proc/stat, less this process's own time), measured
    in windows while training, and the PyTorch threads that fit beside it. PyTorch's threads on a CPU wait for each
    other at every operation, so one core taken by another process slows every step of two threads several times
    over (README: 9.3 ms against 0.13 ms for a small matrix product with two busy processes on 2 cores; the
    quickstart's training step with one busy process on 2 cores: 550-940 ms on 1 thread, 1,280-4,080 on 2)."""

    window_s = 5.0  # the first window: enough ticks of /proc/stat's 10 ms to tell a busy core from a spare one
    later_s = 30.0  # the windows after it: the other work may stop (or start), but a change every 5 s is noise

    clock = staticmethod(time.monotonic)

    def __init__(self, threads: int) -> None:
        self.most = threads  # the threads the process had: what it goes back to once the other work stops
        self.start = _cpu_sample() if threads >= 2 and "OMP_NUM_THREADS" not in os.environ else None
        self.due = self.clock() + self.window_s  # (/proc/stat read once a window, not at every step)

    def threads(self, threads: int) -> tuple[int, str]:
        """The threads to run on from now, given `threads` now, and a note when that changes ("" otherwise). Fewer
        when others keep half a core or more busy and, with this process's threads, more than the cores are asked
        for; back up as the other work leaves room. OMP_NUM_THREADS, where set, is the user's choice: kept."""
        if self.start is None or self.clock() < self.due or (now := _cpu_sample()) is None:
            return threads, ""
        start, self.start, self.due = self.start, now, self.clock() + self.later_s
        others = max(0.0, (now[0] - start[0]) - (now[1] - start[1])) / (now[2] - start[2])
        cores = len(_cores())
        fit = max(1, min(self.most, math.floor(cores + 0.25 - others)))
        if others < 0.5:  # (a little other work: no reason to give up a thread)
            fit = max(fit, threads)
        if fit == threads:
            return threads, ""
        if fit < threads:
            return fit, (f"note: other work keeps about {others:.1f} of the {cores} cores busy: training goes on with "
                         f"{fit} PyTorch thread{'s' * (fit > 1)} instead of {threads}, which would wait for each other "
                         "at every step (2 to 7 times slower in such cases); OMP_NUM_THREADS=N in front of the "
                         "command fixes the number (sums differ in their last bits on other threads: a resumed run "
                         "matches an unbroken one bit for bit on the same ones)")
        return fit, (f"note: the other work now leaves room: training goes on with {fit} PyTorch threads")


def _cores() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def _cpu_sample() -> tuple[float, float, float] | None:
    """(CPU seconds this process's cores have been busy, this process's own CPU seconds, a wall clock); None where
    /proc/stat is not there to read (macOS, Windows)."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            lines = {line.split(maxsplit=1)[0]: line.split()[1:] for line in f if line.startswith("cpu")}
    except OSError:
        return None
    busy = 0
    for core in _cores():  # (a container's /proc/stat may list the host's every core: only ours count)
        ticks = [int(t) for t in lines.get(f"cpu{core}", [])]
        busy += sum(ticks[:3]) + sum(ticks[5:7])  # user, nice, system, irq, softirq: not idle, iowait or steal
    own = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system, time.monotonic()
