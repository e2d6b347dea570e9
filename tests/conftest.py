"""Shared fixtures: a small corpus made here (no files from ../shared needed), its tokenizer and shards."""

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from homellm.config import PrepareConfig, TokenizerConfig
from homellm.data import prepare
from homellm.tokenizer import train_tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared"

# pytest-xdist's workers share the cores: one PyTorch thread each, in the processes they start too. Two threads each on
# 2 cores made the suite 6:11 against 3:05, OpenMP's threads waiting on each other (one test 152 s against 2 s).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

# Tests never reach the network: Hugging Face libraries read these before their first download.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"


def make_corpus(path: Path, n_lines: int = 3000, seed: int = 0) -> Path:
    """Sentences from a small grammar: learnable structure, so a tiny model's loss falls quickly."""
    rng = random.Random(seed)
    subjects = ["the cat", "a dog", "my friend", "the old king", "she", "he", "the river"]
    verbs = ["sees", "likes", "follows", "sings to", "waits for", "remembers"]
    objects = ["the moon", "a red bird", "the sea", "her brother", "the castle", "a small boat"]
    lines = [f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}." for _ in range(n_lines)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, corpus) -> Path:
    root = tmp_path_factory.mktemp("prepared")
    train_tokenizer(TokenizerConfig(input=[str(corpus)], out=str(root / "tok"), kind="char"))
    prepare(PrepareConfig(input=[str(corpus)], tokenizer=str(root / "tok"), out=str(root / "data")))
    return root / "data"


def homellm(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh process, as a user would."""
    proc = subprocess.run([sys.executable, "-m", "homellm", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"homellm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture
def windows_deletes(monkeypatch):
    """Deleting a file that is memory-mapped fails on Windows (WinError 32) and succeeds on Linux: here it fails as
    it would there, judged by this process's /proc/self/maps (Linux only; skipped elsewhere)."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("no /proc/self/maps to tell mapped files by")
    real = os.unlink

    def unlink(path, *, dir_fd=None):
        full = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}") if dir_fd is not None else "", os.fsdecode(path))
        full = os.path.abspath(full)
        if any(line.split(maxsplit=5)[5:] == [full] for line in maps.read_text().splitlines()):
            raise PermissionError(32, "The process cannot access the file because it is being used by another "
                                      "process (as Windows says of a mapped file)", full)
        return real(path, dir_fd=dir_fd)

    monkeypatch.setattr(os, "unlink", unlink)

