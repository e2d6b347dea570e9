"""The one training loop, for pretraining and fine-tuning, on CPU, one GPU, or many through torchrun.

Exact resume rests on one rule: the batch of step s is a pure function of (seed, s), drawn for the global
batch and sliced per rank. A resumed run, or a run on another number of processes with the same global batch,
sees the same tokens in the same order, so resuming needs only the step (plus optimizer and RNG state).
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.util
import inspect
import itertools
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from homellm.checkpoint import (
    check_new_run,
    check_not_merged,
    fault_point,
    find_checkpoint,
    finish_swap,
    holds_trained,
    is_sft,
    kept_steps,
    load_state,
    load_weights_into,
    read_config,
    read_weights,
    resume_point,
    save_checkpoint,
)
from homellm.config import (
    ModelConfig,
    TokenizerConfig,
    TrainConfig,
    check_ranges,
    load_json,
    replace,
    save_json,
    to_dict,
)
from homellm.data import input_bytes, open_split, read_meta, staged_note
from homellm.errors import HomeLLMError, typed
from homellm.io import BusyCores, notes_once, progress_bar, say, world_size
from homellm.model import GPT
from homellm.muon import Muon, ns_dtype
from homellm.tokenizer import Tokenizer, unfinished_save

# Fields that may change when resuming: they steer how long and how verbosely a run goes, not what it computes.
RESUMABLE_CHANGES = {"max_steps", "max_time", "session_time", "eval_every", "checkpoint_every", "keep_every",
                     "log_every", "sample_every", "sample_prompt", "sample_stop", "patience", "device", "resume",
                     "compile", "data", "aozora", "encoding", "val_fraction", "val_input", "split", "epochs", "out",
                     "dtype"}  # (the precision: a run goes on where its first GPU's is not native, or from the CPU)


class Batches(Protocol):
    """A source of training data: a step's batch, a part at a time, and fixed validation batches.

    A step's batch is batch_size x parts rows, drawn from the step alone; train_batch gives rows part * batch_size
    to (part + 1) * batch_size. The training loop splits it among the micro-batches of gradient accumulation and
    the processes (parts = grad_accum x world, part = micro x world + rank), so any split of the same global batch
    reads the same rows: a run may resume with half the --batch-size and twice the --grad-accum on a smaller GPU.
    Validation batches are split the same way, so the val set is the same too.
    A batch is (inputs, targets), or (inputs, targets, documents) for rows that pack several documents (see
    GPT.forward)."""

    token_bytes: np.ndarray

    def train_batch(self, step: int, batch_size: int, part: int, parts: int) -> tuple[torch.Tensor, ...]: ...

    def val_batch(self, index: int, batch_size: int, part: int, parts: int
                  ) -> tuple[torch.Tensor, ...] | None: ...


class TokenBatches:
    """Random windows of block_size + 1 tokens from memory-mapped shards (nanoGPT's sampling)."""

    masked = False  # every target is trained: a step's count of them is known without asking the other ranks

    def __init__(self, data_dir: str | Path, block_size: int, seed: int, token_bytes: np.ndarray):
        self.block_size, self.seed, self.token_bytes = block_size, seed, token_bytes
        self.data_dir = data_dir
        self.splits = {s: open_split(data_dir, s) for s in ("train", "val")}
        # Valid window starts per shard, cumulated, so a uniform draw over all of them maps to (shard, offset).
        # A shard of L tokens has L - block_size windows of block_size + 1 (the last one ends on its last token).
        self.starts = {s: np.cumsum([max(0, len(m) - block_size) for m in maps]) for s, maps in self.splits.items()}
        if not len(self.starts["train"]) or self.starts["train"][-1] == 0:
            n = sum(len(m) for m in self.splits["train"])
            raise HomeLLMError(f"{data_dir}: {n} training tokens cannot fill one window of {block_size + 1} (the "
                               "model's context, --block-size when training, and 1): add text, or train with a lower "
                               "one", everywhere=True)
        # Why val_batch gives nothing, when it does, in words that say what to do.
        val_tokens = sum(len(m) for m in self.splits["val"])
        self.no_val = "" if len(self.starts["val"]) and self.starts["val"][-1] else (
            f"{data_dir} has no validation tokens: give a --val-fraction above 0 where it is prepared (prepare, or "
            "pretrain from text)" if not val_tokens
            else f"{data_dir} has {val_tokens} validation tokens, too few for one window of {block_size + 1}: "
            "prepare it with a higher --val-fraction")

    def _windows(self, split: str, rng: np.random.Generator, n: int, keep: slice = slice(None)
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """n windows drawn from rng, of which the rows in `keep` are read: a process reads its own slice of the
        global batch, so the work per process stays the same however many there are."""
        starts = self.starts[split]
        picks = rng.integers(0, starts[-1], size=n)[keep]
        shard = np.searchsorted(starts, picks, side="right")
        offset = picks - np.concatenate([[0], starts])[shard]
        rows = np.stack([self.splits[split][s][o:o + self.block_size + 1] for s, o in zip(shard, offset)])
        if rows.size and (top := int(rows.max())) >= len(self.token_bytes):  # (an IndexError in the embedding)
            raise HomeLLMError(f"{self.data_dir}: its {split} shards hold token id {top:,}, beyond the tokenizer's "
                               f"{len(self.token_bytes):,} ids: they are damaged; run `homellm prepare` again")
        rows = torch.from_numpy(rows.astype(np.int64))
        return rows[:, :-1], rows[:, 1:]

    def train_batch(self, step: int, batch_size: int, part: int, parts: int) -> tuple[torch.Tensor, torch.Tensor]:
        # (The last 0 was a micro-batch's index, when each drew its own: kept, runs without accumulation draw the
        # same windows as they did.)
        rng = np.random.default_rng([self.seed, 0, step, 0])
        return self._windows("train", rng, batch_size * parts, slice(part * batch_size, (part + 1) * batch_size))

    def val_batch(self, index: int, batch_size: int, part: int, parts: int
                  ) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.no_val:
            return None
        rng = np.random.default_rng([self.seed, 1, index])  # the same val batches at every evaluation
        return self._windows("val", rng, batch_size * parts, slice(part * batch_size, (part + 1) * batch_size))


# ---- distributed, device, precision -------------------------------------------------------------------------

@dataclass
class Env:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    dtype: torch.dtype
    ns_dtype: torch.dtype = torch.bfloat16  # Muon's Newton-Schulz iteration's (muon.ns_dtype, agreed by all ranks)
    cannot_compile: str | None = None  # why --compile is not applied here (or on another rank), if it is not

    @property
    def main(self) -> bool:
        return self.rank == 0


# Signs of an NVIDIA GPU that a CPU-only PyTorch cannot see: the Linux driver's file, WSL2's CUDA library (WSL has
# no /proc/driver/nvidia), or the driver's nvidia-smi on the PATH (Windows).
_NVIDIA_DRIVER = Path("/proc/driver/nvidia/version")
_WSL_CUDA = Path("/usr/lib/wsl/lib/libcuda.so.1")
_noted: set[str] = set()  # notes said once a process: the quickstart resolves its device for training and evaluation


def _nvidia_gpu() -> bool:
    return _NVIDIA_DRIVER.exists() or _WSL_CUDA.exists() or shutil.which("nvidia-smi") is not None


def resolve_device(name: str) -> torch.device:
    """auto picks CUDA, then Apple's MPS, then the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
        if (name == "cpu" and torch.version.cuda is None and torch.version.hip is None and "cpu-only" not in _noted
                and _nvidia_gpu()):
            # `pip install torch==2.13.0` from a CPU index, or a CPU wheel pinned elsewhere: the GPU sits idle.
            _noted.add("cpu-only")
            say("note: this machine has an NVIDIA GPU, but this PyTorch is a CPU-only build, so homellm runs on the "
                "CPU: install PyTorch's CUDA build (pip install torch, or the command pytorch.org gives) to use it")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):  # meta, xla, ...: tensors homellm cannot train
        raise HomeLLMError(f"--device {name!r} is unknown: use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cpu" and device.index is not None:
        raise HomeLLMError(f"--device {name}: the CPU takes no index (all its cores are used): use --device cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HomeLLMError(f"--device {name}: this PyTorch sees no CUDA GPU: use --device cpu (or auto)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise HomeLLMError(f"--device {name}: there are {torch.cuda.device_count()} CUDA GPUs, numbered from 0")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise HomeLLMError(f"--device {name}: Apple's MPS is not available here: use --device cpu (or auto)")
    if device.type == "cuda":  # TF32 matmuls: fp32 work (inference, --dtype float32) on the tensor cores
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def native_bf16(device: torch.device) -> bool:
    """Whether the device computes in bfloat16 natively: CUDA from compute capability 8.0 (Ampere) on. torch's own
    check also counts emulation, which on a T4, V100 or RTX 20xx runs without the tensor cores and without fast
    attention kernels, several times slower than float16. Asked of `device` itself: torch's check asks the current
    GPU, which on a machine of mixed GPUs (generate --device cuda:1) is another one."""
    if device.type != "cuda":
        return False
    if torch.version.hip:  # AMD: ROCm's GPUs compute bfloat16 natively
        return True
    return torch.cuda.get_device_capability(device)[0] >= 8


def setup_env(cfg: TrainConfig, width: int = 0) -> Env:
    """Join torchrun's process group when launched by it; pick device and precision (to train a model `width`
    wide)."""
    world = world_size()
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(cfg.device)
    if world > 1 and dev.type == "mps":
        raise HomeLLMError("torchrun with Apple's MPS: its GPU cannot join a process group; train in one process, or "
                           "with --device cpu")
    if dev.type == "cuda":
        # Asked of the machine's count, not of this rank: local rank 0, the one that speaks, must stop too (it waited
        # for the others at the rendezvous, and the user saw only torchrun's exit code).
        procs, gpus = max(int(os.environ.get("LOCAL_WORLD_SIZE", "0")), local_rank + 1), torch.cuda.device_count()
        if world > 1 and procs > gpus:
            started = procs if "LOCAL_WORLD_SIZE" in os.environ else f"at least {procs}"  # (another launcher)
            raise HomeLLMError(f"torchrun started {started} processes on this machine, and they see {gpus} CUDA "
                               f"GPU{'s' * (gpus != 1)}: start at most that many per node (--nproc-per-node {gpus})")
        dev = torch.device("cuda", local_rank if world > 1 else (dev.index or 0))
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        # (a WORLD_SIZE left in the shell: torch's rendezvous raised a ValueError, shown as a traceback)
        if missing := [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]:
            raise HomeLLMError(f"WORLD_SIZE={world} is set, but {' and '.join(missing)} "
                               f"{'is' if len(missing) == 1 else 'are'} not: start the run with torchrun (`torchrun "
                               "--nproc-per-node N -m homellm ...`), or unset WORLD_SIZE to train in one process")
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    dtype, ns, cannot = pick_dtype(cfg.dtype, dev, train_width=width), ns_dtype(dev), None
    if cfg.compile:
        cannot = _cannot_compile(dev)
    if world > 1:
        dtype, ns, compiles = agreed(dtype, ns, cannot is None, dev)
        if not compiles and cannot is None:
            cannot = ("another process of this run cannot use it (its GPU is older than compute capability 7.0, or "
                      "it lacks Triton or a C++ compiler): all train alike")
    return Env(rank, world, local_rank, dev, dtype, ns, cannot)


_PRECISIONS = (torch.float32, torch.float16, torch.bfloat16)  # the earlier in this order, the more devices run it


def agreed(dtype: torch.dtype, ns: torch.dtype, compiles: bool, device: torch.device
           ) -> tuple[torch.dtype, torch.dtype, bool]:
    """The precision, Muon's iteration's precision and whether to compile, as every process of a run takes them.
    Their machines may differ (AMX on some CPUs only; an RTX 2080 Ti beside a 3090), and each chose for its own: DDP
    then averaged float16's scaled gradients with bfloat16's, and the replicas drifted apart unseen. bfloat16 only
    where all can (else float16 and its scaler beside float16, float32 beside float32); compile only if all can."""
    codes = torch.tensor([_PRECISIONS.index(dtype), _PRECISIONS.index(ns), int(compiles)], device=device)
    dist.all_reduce(codes, op=dist.ReduceOp.MIN)
    precision, iteration, compiles = codes.tolist()
    return _PRECISIONS[precision], _PRECISIONS[iteration], bool(compiles)


def bf16_cpu() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware: Intel's AMX (Xeons from Sapphire Rapids on) or
    AVX512-BF16 (AMD's Zen 4 and later, Intel's Cooper Lake). Measured on 2-core ones, a training step at 128 wide or
    more runs 1.16-1.42x as fast in bfloat16 autocast as in float32 (bench/README.md). Not where oneDNN is capped
    below those instructions (ONEDNN_MAX_CPU_ISA=AVX2, say: bfloat16 then runs emulated, a step 20x slower; caps
    named otherwise than *BF16* or *AMX*, such as AVX10_1_512, are taken as below them too); where the kernel does
    not let the process use AMX, AVX512-BF16 alone decides."""
    isa = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()
    amx_allowed = isa == "ALL" or "AMX" in isa
    # torch's probes are private: absent in another torch, the answer is no
    amx, enable, avx512 = (getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_init_amx",
                                                                       "_is_avx512_bf16_supported"))
    try:
        if amx_allowed and amx and amx() and (enable is None or enable()):
            return True
        return bool((amx_allowed or "BF16" in isa) and avx512 and avx512())
    except RuntimeError:
        return False


# Below this width, bfloat16's casts cost more than its products save: a training step of a 32-wide model took
# 0.66-0.70x and of a 64-wide one 1.01-1.06x float32's time, of a 128-wide one 1.16-1.33x (bench/README.md).
BF16_MIN_WIDTH = 128


def pick_dtype(name: str, device: torch.device, train_width: int | None = None) -> torch.dtype:
    """--dtype on a device, to train a model `train_width` wide (None: to load weights for generation). auto:
    bfloat16 on a GPU that computes in it natively, float16 on an older GPU (training adds the grad scaler), float32
    elsewhere: on a CPU both halves are slower than float32, except that training a model of BF16_MIN_WIDTH or more
    on a CPU with bfloat16 matrix instructions (AMX, AVX512-BF16) is faster in bfloat16 autocast (1.16-1.42x a step
    at the cpu and arithmetic presets' sizes and nanoGPT's CPU example, measured). Generation there stays float32:
    bfloat16 weights decoded GPT-2 small's shape 1.14x as fast, but the cpu preset's model at 0.59x (with AMX)."""
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name == "auto":
        if device.type == "cuda":
            dtype = torch.bfloat16 if native_bf16(device) else torch.float16
        else:
            fast = device.type == "cpu" and (train_width or 0) >= BF16_MIN_WIDTH and bf16_cpu()
            dtype = torch.bfloat16 if fast else torch.float32
    elif name in dtypes:
        dtype = dtypes[name]
    else:
        raise HomeLLMError(f"--dtype {name!r} is unknown: use auto, float32, bfloat16 or float16")
    if dtype == torch.float16 and device.type == "cpu":
        say("note: --dtype float16 on the CPU is no faster than float32, and on most CPUs many times slower (12x "
            "for a training step, measured on a 2-core AMD CPU): use auto (float32, or bfloat16 for models 128 or "
            "more wide where the CPU has AMX or AVX512-BF16)")
    if dtype == torch.bfloat16 and device.type == "cpu" and not bf16_cpu():
        say("note: --dtype bfloat16 on a CPU without bfloat16 matrix instructions (AMX, AVX512-BF16) is emulated: a "
            "training step took 9x as long as float32 (measured on a 2-core AMD CPU): use auto (float32 here)")
    if dtype == torch.bfloat16 and device.type == "cuda" and not native_bf16(device):
        major, minor = torch.cuda.get_device_capability(device)
        raise HomeLLMError(f"--dtype bfloat16: {torch.cuda.get_device_name(device)} (compute capability "
                           f"{major}.{minor}) only emulates bfloat16, several times slower; Ampere (8.0) and later "
                           "have it: use --dtype float16 (or auto)")
    return dtype


def _cannot_compile(device: torch.device) -> str | None:
    """Why torch.compile would fail at the first step here, or None. Its GPU kernels are Triton's, which needs
    Linux (or WSL) and compute capability 7.0 (V100, T4, RTX 20xx) or later; on the CPU it builds C++."""
    if device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            return "Triton, which it writes GPU kernels in, is not installed (Linux only: pip install triton)"
        if (major := torch.cuda.get_device_capability(device)[0]) < 7:
            return f"Triton needs compute capability 7.0 or later, and this GPU has {major}.x"
    if device.type == "cpu" and not any(map(shutil.which, (os.environ.get("CXX", "g++"), "g++", "clang++"))):
        return "on the CPU it builds C++, and no compiler (g++ or clang++) was found"
    return None


def _autocast(env: Env) -> contextlib.AbstractContextManager:
    if env.dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(env.device.type, dtype=env.dtype)


# Dense (not sparse) bf16/fp16 tensor-core peaks, in FLOP/s, by device name, the more specific names first:
# "L4" must not match an L40S (3x faster), nor "H100" an H100 PCIe, nor "4090" a laptop's 4090.
# The H800 and A800 (China's export versions) compute as the H100 and A100 do.
_PEAK_FLOPS = ((r"Laptop|Mobile|Max-Q", None), (r"H[12]00 NVL", 835e12), (r"H[18]00 PCIe", 756e12),
               (r"H[128]00", 989e12), (r"A[18]00\b", 312e12), (r"L40S", 362e12), (r"L40\b", 181e12),
               (r"L4\b", 121e12), (r"A10\b", 125e12),
               (r"RTX 4090", 165e12), (r"RTX 3090 Ti", 80e12), (r"RTX 3090", 71e12), (r"V100-PCIE", 112e12),
               (r"V100", 125e12), (r"T4\b", 65e12))


def peak_flops(name: str) -> float | None:
    """The dense half-precision peak of a GPU by its name, for MFU; None for GPUs not in the table."""
    return next((flops for pattern, flops in _PEAK_FLOPS if re.search(pattern, name)), None)


def _peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The peak MFU is reported against: none in float32, whose own peak is 2x (TF32) to 8x (V100, T4) lower than
    the table's, so MFU against it would read that much too low."""
    if device.type != "cuda" or dtype == torch.float32:
        return None
    return peak_flops(torch.cuda.get_device_name(device))


# ---- optimizer and schedule ---------------------------------------------------------------------------------

def make_optimizers(model: GPT, cfg: TrainConfig, device: torch.device, ns: torch.dtype | None = None
                    ) -> list[torch.optim.Optimizer]:
    """AdamW with weight decay on matrices only; or Muon (its iteration in `ns`, else its device's choice) for the
    hidden matrices and AdamW for the rest."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    embeddings = {"embed_tokens.weight", "embed_positions.weight", "lm_head.weight", "lora.embed_rows",
                  "lora.head_rows"}
    # The fused kernel is one pass over all parameters on CUDA and on CPU too, where it measured 5 % faster
    # per training step than foreach at nanoGPT's shakespeare-char size (bench/README.md).
    fused = {"fused": True} if device.type in ("cuda", "cpu") else {"foreach": True}
    adam = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **fused)
    if cfg.optimizer == "adamw":
        decay = [p for n, p in params if p.dim() >= 2]
        rest = [p for n, p in params if p.dim() < 2]
        return [torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], **adam)]
    if cfg.optimizer == "muon":
        hidden = [p for n, p in params if p.dim() == 2 and n not in embeddings]
        # The embedding matrices stay with AdamW, decayed as they are under --optimizer adamw: one meaning of
        # --weight-decay (matrices) whichever optimizer is chosen.
        groups = [{"params": [p for n, p in params if n in embeddings], "weight_decay": cfg.weight_decay},
                  {"params": [p for n, p in params if p.dim() != 2], "weight_decay": 0.0}]
        if not cfg.weight_decay:  # one group, in the order runs written before the split resume with
            groups = [{"params": [p for n, p in params if p.dim() != 2 or n in embeddings], "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        muon = Muon(hidden, lr=cfg.muon_lr, weight_decay=cfg.weight_decay, ns_dtype=ns)
        # LoRA trains matrices only: then every parameter is Muon's and AdamW, which refuses an empty list, is left out.
        return [muon, torch.optim.AdamW(groups, **adam)] if groups else [muon]
    raise HomeLLMError(f"--optimizer {cfg.optimizer!r} is unknown: use adamw or muon")


def lr_factor(progress: float, step: int, cfg: TrainConfig, decay_start: float = 0.0) -> float:
    """Multiplier of the peak learning rate: linear warmup, then cosine (or warmup-stable-decay) to min_lr_ratio.

    The decay runs over the rest of the run, from `decay_start` (the progress at which warmup ended) to 1, as
    nanoGPT's (it - warmup) / (decay_iters - warmup): counted from 0, the rate fell from the peak straight to the
    curve's value at the warmup's share of the run (1.0 -> 0.87 after 50 warmup steps of 200)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    p = min(max((progress - decay_start) / max(1.0 - decay_start, 1e-9), 0.0), 1.0)
    lo = cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * p))
    if cfg.schedule == "wsd":
        start = 1 - cfg.decay_fraction
        return 1.0 if p < start else 1 - (1 - lo) * (p - start) / max(cfg.decay_fraction, 1e-9)
    raise HomeLLMError(f"--schedule {cfg.schedule!r} is unknown: use cosine or wsd")


# ---- the loop -----------------------------------------------------------------------------------------------

def _rng_state(device: torch.device) -> dict[str, Any]:
    """The generators a run draws from: the CPU's, and its accelerator's (dropout on the GPU draws there). Only the
    device trained on is touched: asking CUDA for its state on a CPU run would start a CUDA context per process."""
    state = {"torch": torch.get_rng_state(), "numpy": json.dumps(np.random.get_state()[1].tolist()),
             "python": json.dumps(random.getstate()[1])}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    elif "mps" in state and device.type == "mps":
        torch.mps.set_rng_state(state["mps"])


def _resume_rng(saved: list[dict[str, Any]], env: Env, seed: int, step: int) -> None:
    """Each rank's random streams (dropout) where the checkpoint left them. A rank the run did not have (resumed on
    more processes), or a GPU's stream a CPU run did not keep, starts one of its own from (seed, rank, step): rank
    0's state for all of them gave every rank the same dropout."""
    if env.rank < len(saved):
        _set_rng_state(saved[env.rank], env.device)
    else:
        torch.manual_seed(seed + env.rank + 7919 * step)
    if env.device.type == "cuda" and (env.rank >= len(saved) or "cuda" not in saved[env.rank]):
        torch.cuda.manual_seed(seed + env.rank + 7919 * step)


def _all_sum(values: list[float], env: Env) -> list[float]:
    if env.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return t.tolist()


def _trained_tokens(mine: int, env: Env) -> float | torch.Tensor:
    """The trained (not masked) targets of a step over all ranks, at least 1; a device tensor under DDP, so that
    reading it does not wait for the device."""
    if env.world == 1:
        return float(max(mine, 1))
    t = torch.tensor(float(mine), dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return t.clamp(min=1.0).float()


def _clock_group(env: Env) -> Any:
    """The process group the ranks agree on their clocks in every step: the host's own (gloo) where the default
    group is NCCL's, which would make each host wait for its GPU to drain every step, leaving it no queue of
    kernels to launch ahead. None: the default group (gloo already, or one process)."""
    return dist.new_group(backend="gloo") if env.world > 1 and env.device.type != "cpu" else None


def _one_clock(elapsed: float, cfg: TrainConfig, env: Env, stop: bool = False, group: Any = None, took: float = 0.0
               ) -> tuple[float, bool, float]:
    """Under a time budget every rank takes the slowest one's elapsed time: the learning rate follows it and the
    run stops by it, so the ranks must agree on it (each clock alone left one rank waiting in a collective).
    Likewise a Ctrl-C (`stop`): torchrun passes it to each rank, which may be a step apart when it lands, so the
    ranks stop after the step where any of them saw it; and the slowest rank's time for the step (`took`), by which
    they decide alike whether the next may be dropped halfway. One collective serves all three, in `group`
    (_clock_group)."""
    if env.world == 1:
        return elapsed, stop, took
    timed = cfg.max_time > 0 or cfg.session_time > 0
    t = torch.tensor([elapsed if timed else 0.0, float(stop), took], dtype=torch.float64,
                     device="cpu" if group is not None else env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    agreed, any_stop, slowest = t.tolist()
    return (agreed if timed else elapsed), any_stop > 0, slowest


def _documents(rest: list[torch.Tensor], env: Env) -> torch.Tensor | None:
    """The documents tensor of a batch that has one, on the device."""
    return rest[0].to(env.device, non_blocking=True) if rest else None


def loss_sums(env: Env) -> tuple[torch.Tensor, int, int]:
    """Empty sums for `add_loss`: nats, scored tokens, their bytes. The nats add up on the device, read once at the
    end (a read per batch made a GPU wait for each one), in float64 as Python's floats were (MPS has none)."""
    return torch.zeros((), dtype=torch.float32 if env.device.type == "mps" else torch.float64, device=env.device), 0, 0


def add_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, documents: list[torch.Tensor], env: Env,
             token_bytes: torch.Tensor, sums: tuple[torch.Tensor, int, int]) -> tuple[torch.Tensor, int, int]:
    """`sums` with one batch's loss added: the nats it scored, its scored targets (not -100) and their bytes."""
    with _autocast(env):
        _, loss = model(x.to(env.device), y.to(env.device), documents=_documents(documents, env))
    nats, tokens, nbytes = sums
    n = int((y != -100).sum())  # (y is still on the CPU: no wait)
    return (nats + loss.to(nats.dtype) * n, tokens + n,
            nbytes + int(token_bytes[y.clamp(min=0)][y != -100].sum()))


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: Batches, batch_size: int, batches: int, env: Env, grad_accum: int = 1
             ) -> dict[str, float] | None:
    """Val loss (nats per token) and bits per byte over the fixed val batches; None without val data. A val batch
    is a global batch, split among micro-batches and processes as training splits it: a run resumed with half the
    --batch-size and twice the --grad-accum scores the same rows (it scored half of them, and its best checkpoint
    and --patience compared losses of two val sets)."""
    was_training = model.training
    model.eval()
    nats, tokens, nbytes = loss_sums(env)
    token_bytes = torch.from_numpy(data.token_bytes)
    parts = grad_accum * env.world
    for i, micro in itertools.product(range(batches), range(grad_accum)):
        batch = data.val_batch(i, batch_size, micro * env.world + env.rank, parts)
        if batch is None:  # no val data at all, or (a finite val set, as in SFT) no more of it for this rank
            break
        x, y, *documents = batch
        nats, tokens, nbytes = add_loss(model, x, y, documents, env, token_bytes, (nats, tokens, nbytes))
    model.train(was_training)
    # Every rank sums, even one left without a batch: with fewer val rows than ranks x batch (SFT's few held-out
    # conversations) a rank that returned early left the others waiting in this collective for ever.
    nats, tokens, nbytes = _all_sum([nats.item(), tokens, nbytes], env)
    if not tokens:
        return None
    return {"val_loss": nats / tokens, "val_bpb": nats / math.log(2) / max(nbytes, 1)}


def check_resume(run: Path, model_cfg: ModelConfig, cfg: TrainConfig) -> None:
    """Refuse to resume with a config that computes something else than the saved run. The global batch is what
    counts (a step's rows are drawn for all its parts at once, see Batches): with another number of processes, or
    a GPU that fits fewer rows, --batch-size and --grad-accum may change so that it stays the same."""
    saved_model, saved_train = read_config(run)
    world = world_size()
    saved = load_json(run / "config.json")
    saved_world = saved.get("world")  # None: written before it was kept
    splits = ("batch_size", "grad_accum") if saved_world else ()  # checked below, as one product
    diffs = [f"{k}: run has {v!r}, asked {getattr(model_cfg, k)!r}" for k, v in to_dict(saved_model).items()
             if getattr(model_cfg, k) != v]
    diffs += [f"{k}: run has {v!r}, asked {getattr(cfg, k)!r}" for k, v in to_dict(saved_train).items()
              if k not in RESUMABLE_CHANGES and getattr(cfg, k) != v and k not in splits]
    was = saved_train.batch_size * saved_train.grad_accum * (saved_world or 1)

    def processes(n: int) -> str:
        return f"{n} process{'es' * (n != 1)}"

    def layout(batch: int, accum: int, n: int) -> str:
        return f"{batch} x {accum} micro-batches x {processes(n)}" if accum > 1 else f"{batch} x {processes(n)}"

    if saved_world and was != cfg.batch_size * cfg.grad_accum * world:
        per_process = was // world
        if was % world:  # the run's own layout is one that works
            fix = (f"--batch-size {saved_train.batch_size} --grad-accum {saved_train.grad_accum} on "
                   f"{processes(saved_world)} (or on a number of processes that divides {was})")
        else:  # the asked --batch-size if it fits (it is what fits the GPU's memory), else the asked --grad-accum
            batch = (cfg.batch_size if per_process % cfg.batch_size == 0 else per_process // cfg.grad_accum
                     if per_process % cfg.grad_accum == 0 else per_process)
            # Both flags, always: a typed one is kept by the next --resume too, so one left out would be refused again.
            fix = (f"--batch-size {batch} --grad-accum {per_process // batch} on {processes(world)}"
                   + f" (or another --batch-size and --grad-accum whose product is {per_process})" * (per_process > 1))
        saved, asked = (layout(saved_train.batch_size, saved_train.grad_accum, saved_world),
                        layout(cfg.batch_size, cfg.grad_accum, world))
        raise HomeLLMError(f"--resume: {run} trained on batches of {was} sequences ({saved}), and {asked} would draw "
                           f"other data and change the maths: resume with {fix}")
    if diffs:
        # A new rate or schedule on the weights trained so far is a new run started from them (--init), not a resume;
        # another shape is a new run from scratch. LoRA adapters are no weights to --init from: merged, they are.
        start = (f" from its weights: merge them (`homellm merge {typed(run)} --out MERGED --checkpoint last`) and "
                 "fine-tune with --init MERGED" if "lora" in saved else
                 f" from its weights with --init {typed(run)} --init-checkpoint last")
        raise HomeLLMError(f"--resume: {run}/config.json differs ({'; '.join(diffs)}): drop those flags (a resumed "
                           "run goes on with its own config), or train into a new --out"
                           + start * all(v == getattr(model_cfg, k) for k, v in to_dict(saved_model).items()
                                         if k not in INIT_CHANGES))  # (--init takes another dropout, a context)
    if saved_world and (saved_train.batch_size, saved_train.grad_accum, saved_world) != (
            cfg.batch_size, cfg.grad_accum, world):
        asked = layout(cfg.batch_size, cfg.grad_accum, world)
        say(f"note: --resume: the same batches of {was} sequences, split otherwise ({asked}, not "
            f"{layout(saved_train.batch_size, saved_train.grad_accum, saved_world)}): their sums add up in another "
            "order, so the run goes on as it would have to rounding, not bit for bit")


WARMUP_TIMED = 3  # steps timed, after the first, to tell whether a time budget's run gets past its warmup
SLOW_STEP_S = 5.0  # a step this slow may be dropped halfway by Ctrl-C (see `train`)


def train(model_cfg: ModelConfig, cfg: TrainConfig, data: Batches, tokenizer: Tokenizer,
          init: Callable[[GPT], None] | None = None, extra_config: dict[str, Any] | None = None,
          sample: Callable[[GPT], str] | None = None, after_ctrl_c: str | None = None) -> dict[str, Any]:
    """Train a model into the run directory cfg.out; return a summary (steps, tokens, val loss, bpb, seconds).

    `init` loads starting weights (fine-tuning) into a fresh model; `extra_config` is saved in config.json;
    `sample` shows what the model makes of a prompt (default: a greedy continuation of cfg.sample_prompt);
    `after_ctrl_c` is what the first Ctrl-C is said to lead to, after the current step (default: a checkpoint to
    --resume from)."""
    if sample is None:
        def sample(model: GPT) -> str:
            return repr(sample_text(model, tokenizer, cfg.sample_prompt, stop=cfg.sample_stop))
    check_ranges(cfg)
    env = setup_env(cfg, model_cfg.n_embd)
    run = Path(cfg.out)
    check_end(cfg)
    clock = _clock_group(env)
    torch.manual_seed(cfg.seed + env.rank)
    model = GPT(model_cfg)
    if init is not None:
        init(model)
    model.to(env.device)
    optimizers = make_optimizers(model, cfg, env.device, env.ns_dtype)
    scaler = torch.amp.GradScaler(env.device.type, enabled=env.dtype == torch.float16)
    step = tokens = 0
    elapsed = 0.0
    best_val, bad_evals = math.inf, 0
    sampled = -1  # the step whose sample was last shown
    warmup_at: tuple[int, float] | None = None  # (step, elapsed) where warmup ended: where the decay starts
    metrics_path = run / "metrics.jsonl"
    resumed_from = None
    resumed_val: dict[str, float] | None = None  # the val loss measured on the weights resumed from, if it was
    eval_room, eval_measured = 0.0, False  # the final evaluation's expected seconds, and whether measured (below)
    ends_note = ""  # a resume's new end, said when it trains
    if cfg.resume:
        folder = resumed_from = resume_point(run)
        load_weights_into(model, read_weights(folder), str(folder))
        state = load_state(folder)
        for opt, sd in zip(optimizers, state["optimizers"]):
            try:
                opt.load_state_dict(sd)
            except ValueError as e:  # parameter groups laid out otherwise, by another version of homellm
                raise HomeLLMError(f"{folder}: its optimizer state does not fit this homellm's {type(opt).__name__} "
                                   f"({e}): resume it with the version that wrote it, or start a new run from its "
                                   "weights") from None
        if state["scaler"] and scaler.is_enabled():  # a run resumed on a GPU of another precision has none
            scaler.load_state_dict(state["scaler"])
        step, tokens, elapsed = state["step"], state["tokens"], state["elapsed"]
        best_val, bad_evals = state["best_val"], state["bad_evals"]
        # The data the checkpoint trained on (its state keeps it: config.json takes the new data's at once, before
        # a session killed early writes any checkpoint); runs from before it was kept, config.json's.
        trained_on = state.get("data_meta") or _data_identity(load_json(run / "config.json"))
        now = _data_identity(extra_config or {})
        same_val = bool(trained_on and now) and now.get("split") == trained_on.get("split") == "inputs" and all(
            now.get(k) == trained_on.get(k) for k in ("val_inputs", "val_tokens", "val_bytes"))
        if same_val and now != trained_on:  # more training text, the same --val-input: its losses still compare
            say(f"note: the training text in {(extra_config or {}).get('data_dir')} changed ("
                f"{trained_on.get('train_tokens', 0):,} -> {now.get('train_tokens', 0):,} tokens); its val text "
                "(--val-input) is the same, so `best` goes on from the val loss before")
        elif trained_on and now and now != trained_on:
            # Other data (text added to a relay's corpus, other conversations for sft): its val loss compares with
            # none measured before, so `best` and --patience start again from its first evaluation (the old best
            # stood for good, and stopped the run early while the new val loss fell; sft's chat, eval and export
            # then read weights from before the new training).
            best_val, bad_evals = math.inf, 0
            again = "`best` and --patience start again from its first evaluation"
            if "sft_data" in (extra_config or {}):  # (sft has said what changed)
                say(f"note: its val loss compares with none before it: {again}")
            else:  # (a folder that changed, or another folder given with --resume: the message fits both)
                say(f"note: the data in {(extra_config or {}).get('data_dir')} is not what {run} last trained on "
                    f"({trained_on.get('train_tokens', 0):,} -> {now.get('train_tokens', 0):,} training tokens): "
                    f"training goes on with it, and its val loss compares with none before it: {again}"
                    + ({"position": "; the split is by position, so val may now hold text trained on before",
                        "document": "; the split was by position and is by document now, so val may now hold text "
                                    "trained on before"}.get(now.get("split"), "")
                       if trained_on.get("split") == "position" else ""))
        info = load_json(folder / "checkpoint.json")
        resumed_val = {k: info[k] for k in ("val_loss", "val_bpb") if k in info} or None
        # Else a run that stopped short of its budget for the final evaluation would go on past it.
        eval_room, eval_measured = state.get("final_eval", (eval_room, eval_measured))
        # Checkpoints from before it was kept decayed from the run's start, and go on that way.
        warmup_at = tuple(state["warmup_at"]) if state.get("warmup_at") else (0, 0.0) if step > cfg.warmup_steps \
            else None
        _resume_rng(state["rng"], env, cfg.seed, step)
        if folder.name.endswith(".tmp"):  # complete, its swap into place cut short by a kill: finish it
            if env.world > 1:
                dist.barrier()  # (every rank has read it)
            if env.main:
                finish_swap(folder)
            resumed_from = run / folder.name[1:].removesuffix(".tmp")  # on every rank: they decide alike below
        if env.main:
            _truncate_metrics(metrics_path, step)
            # Weights kept after this checkpoint are of steps the resumed run trains again, perhaps otherwise
            if later := [k for k in kept_steps(run) if int(k[5:]) > step]:
                for k in later:
                    shutil.rmtree(run / k)
                print(f"note: removed {', '.join(later)}, kept after {resumed_from.name}'s step {step}: the resumed "
                      "run trains those steps again", file=sys.stderr)
            print(f"resuming {run} from {resumed_from.name} at step {step}", file=sys.stderr)
            was = read_config(run)[1]
            if (was.max_steps, was.max_time) != (cfg.max_steps, cfg.max_time):  # said below, if it trains
                def end(c: TrainConfig) -> str:  # (a limit of 0, never set, read as one: "--max-steps 0")
                    # (runs set in epochs: "--max-steps 36" named a flag the user never gave, review)
                    steps = f"--epochs {c.epochs:g}, {c.max_steps:,} steps" if c.epochs > 0 else (
                        f"--max-steps {c.max_steps}")
                    limits = [steps] * (c.max_steps > 0) + [f"--max-time {c.max_time:g}"] * (c.max_time > 0)
                    return " or ".join(limits) or "no limit"

                ends_note = (f"note: the run now ends at {end(cfg)} (it was {end(was)}): the learning rate's decay "
                             "stretches to the new end, so the rate moves at once from where it was")
    elif env.main:
        metrics_path.unlink(missing_ok=True)
    # A resume that trains nothing (below) puts this back: the flags it was given never trained
    config_before = load_json(run / "config.json") if cfg.resume and env.main else None
    if cfg.resume and env.world > 1:
        dist.barrier()  # every rank has read config.json's data_meta above (older checkpoints') before it changes
    if env.main:
        save_json(run / "config.json", {"model": to_dict(model_cfg), "train": to_dict(cfg), "world": env.world,
                                        **(extra_config or {})})
        tokenizer.save(run / "tokenizer", model_max_length=model_cfg.block_size)

    if env.main:
        ends = " or ".join([f"at step {cfg.max_steps:,}"] * (cfg.max_steps > 0) + [f"after {cfg.max_time:.4g} s"] *
                           (cfg.max_time > 0))
        print(f"training {run}: {model_cfg.family} {model_cfg.n_layer} layer{'s' * (model_cfg.n_layer != 1)} x "
              f"{model_cfg.n_embd} wide, "
              f"{model.num_params():,} parameters, on {env.device} ({str(env.dtype).removeprefix('torch.')}"
              f"{' x ' + str(env.world) + ' processes' if env.world > 1 else ''}); it ends {ends}"
              f"{', whichever comes first' if cfg.max_steps > 0 and cfg.max_time > 0 else ''}"
              f"{f'; this session stops after {cfg.session_time:g} s' if cfg.session_time > 0 else ''}",
              file=sys.stderr)
    if cfg.max_steps > 0 and cfg.warmup_steps >= cfg.max_steps and not cfg.resume:  # (a time budget's steps are
        # unknown ahead) the rate would climb the whole run, never reach --lr, and never decay
        steps = f"{cfg.max_steps:,} step{'s' * (cfg.max_steps != 1)}"
        say(f"note: --warmup-steps {cfg.warmup_steps} is not shorter than the run ({steps}): the learning rate never "
            f"reaches --lr {cfg.lr:g}; give fewer warmup steps (a tenth of the run is usual)")
    raw = model
    if cfg.compile and (why := env.cannot_compile):  # (the gpt2-124m preset compiles)
        say(f"note: training without torch.compile: {why}")
    elif cfg.compile:
        model = torch.compile(model)
    ddp = env.world > 1
    if ddp:
        # The only buffers are RoPE's tables, computed alike on every rank: syncing them each forward is waste.
        # (torch 2.13 renamed the option and warns at the old name; earlier ones know only that.)
        ddp_args = inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
        no_sync = {"forward_sync_buffers" if "forward_sync_buffers" in ddp_args else "broadcast_buffers": False}
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[env.device.index]
                                                          if env.device.type == "cuda" else None, **no_sync)
    eval_model = raw if not cfg.compile else model.module if ddp else model
    peak = _peak_flops(env.device, env.dtype)
    flops_per_token = raw.flops_per_token()

    # The evaluation after the last step counts against --max-time too: the budget keeps room for it, as long as
    # the latest evaluation took, or before the first one a guess from the steps' pace (an evaluation batch is a
    # forward pass, about a third of a training micro-batch's work). Both come from the clock the ranks agree on.
    start_step, start_elapsed = step, elapsed  # where this session began
    after_first = 0.0  # the clock after this session's first step
    evaluates = cfg.eval_every > 0 and cfg.max_time > 0 and not getattr(data, "no_val", None)

    def progress(at: tuple[int, float] | None = None) -> float:
        """How far the run is towards its end (steps or time, whichever is further), now or at (step, elapsed)."""
        s, e = at or (step, elapsed)
        p = s / cfg.max_steps if cfg.max_steps > 0 else 0.0
        return max(p, e / max(cfg.max_time - eval_room, cfg.max_time / 2)) if cfg.max_time > 0 else p

    def checkpoint(name: str, info: dict[str, Any]) -> None:
        rng = _gather_rng(env)
        if env.main:
            state = {"optimizers": [o.state_dict() for o in optimizers], "scaler": scaler.state_dict(),
                     "step": step, "tokens": tokens, "elapsed": elapsed, "best_val": best_val,
                     "bad_evals": bad_evals, "rng": rng, "data_position": step,
                     "warmup_at": list(warmup_at) if warmup_at else None,
                     "final_eval": [eval_room, eval_measured], "data_meta": _data_identity(extra_config or {})}
            save_checkpoint(run, name, raw, state, {"step": step, "tokens": tokens, **info})

    # A time budget's bar counts its seconds, without a rate ("1.07s/s"); the steps and their rate are beside it.
    timed_bar = {} if cfg.max_time <= 0 else {
        "bar_format": "{l_bar}{bar}| {n_fmt}/{total_fmt} s [{elapsed}<{remaining}{postfix}]"}
    bar = progress_bar(total=cfg.max_steps if cfg.max_time <= 0 else int(cfg.max_time),
                       initial=step if cfg.max_time <= 0 else int(elapsed), unit="step" if cfg.max_time <= 0 else "s",
                       disable=not env.main, desc=f"train {run.name}", **timed_bar)
    # (one process on a CPU: processes of a run under torchrun are each other's other work)
    # (Not compiled: inductor's C++ kernels keep the threads they were compiled for, and its compile workers would
    # count as other work)
    busy = (BusyCores(torch.get_num_threads()) if env.main and env.device.type == "cpu" and env.world == 1
            and not cfg.compile else None)
    last_val: dict[str, float] | None = None
    val_step = None  # the step last_val was measured at: a session may end steps after its last evaluation
    stop_reason = "max_steps"
    def finished() -> bool:
        return progress() >= 1.0 or bool(cfg.patience and bad_evals >= cfg.patience)

    if cfg.max_time > 0 and progress((0, elapsed)) >= 1.0:  # (less the room kept for the final evaluation)
        stop_reason = "max_time"
    if finished():  # resumed after its end: nothing to do, and its final val loss to report again
        last_val, val_step = resumed_val, step  # (measured on the resumed weights)
        sampled = step  # (its sample was shown when it finished: the same weights, the same text again)
        if progress() < 1.0:
            stop_reason = f"early stop: no better val loss in {bad_evals} evaluations"
        if env.main and stop_reason == "max_time":  # the budget counts evaluations: it may be above --max-time
            # progress() ends the budget eval_room early (but at half of it at the latest): what trains again
            above = math.ceil(min(elapsed + eval_room, 2 * elapsed))
            bar.write(f"note: {run} has used {elapsed:.0f} s of its --max-time {cfg.max_time:g}: raise --max-time "
                      f"above {above} to train it further (evaluations count too, and the final one keeps about "
                      f"{eval_room:.0f} s of the budget)", file=sys.stderr)
        elif env.main and stop_reason == "max_steps" and step > cfg.max_steps:  # a lower --max-steps given now
            bar.write(f"note: {run} is at step {step}, past --max-steps {cfg.max_steps}: nothing to train; give "
                      f"--max-steps above {step} to train it further", file=sys.stderr)
        elif env.main and stop_reason == "max_steps" and cfg.max_time > 0:  # a time budget that is not the end
            bar.write(f"note: {run} had already finished at step {step}: its --max-steps {cfg.max_steps} ends it "
                      f"before its --max-time {cfg.max_time:g} does: raise --max-steps, or give --max-steps 0 to "
                      "end it by time alone", file=sys.stderr)
        elif env.main:
            bar.write(f"note: {run} had already finished at step {step} ({stop_reason}): raise --max-steps or "
                      "--max-time (or --patience) to train it further", file=sys.stderr)
        if resumed_from is not None and resumed_from != run / "last":  # killed while its final `last` was written
            checkpoint("last", {})
        if config_before is not None:
            save_json(run / "config.json", config_before)
    elif ends_note:
        print(ends_note, file=sys.stderr)
    model.train()
    t_log, tokens_log = time.perf_counter(), tokens
    masked = getattr(data, "masked", True)  # pretraining's windows train every target: no count to gather
    schedule_at = 0.0  # how far along its schedule the learning rate is
    # Ctrl-C finishes the step and writes `last`, so relay training loses nothing; a second one stops at once.
    # Under torchrun, which passes the signal on to every rank (and kills them 30 s later), the ranks agree on the step.
    # A slow step (the previous one took SLOW_STEP_S or more; a session's first, which may compile, is taken as slow)
    # of several micro-batches is dropped instead at the micro-batch the Ctrl-C lands in, and `last` written at the
    # step before: finishing it could outlast torchrun's 30 s (gpt2-124m's step of 32 micro-batches on a CPU takes
    # minutes), leaving no checkpoint at all. Its random state is put back, so --resume does that step again exactly.
    then = after_ctrl_c or "with a checkpoint to --resume from"
    slowest = math.inf
    with _Interrupt(bar, then, announce=env.main) as interrupt, _threads_kept(busy):
        # One running mark, read once a step (and after an evaluation): everything between two readings counts,
        # checkpoint writes and samples too. Timed from each step's start, they went uncounted in one process, but
        # counted under DDP (the other ranks waited for rank 0 in the next step), so a budget bought other steps.
        mark = time.perf_counter()
        while not finished():
            if warmup_at is None and step >= cfg.warmup_steps:
                warmup_at = (step, elapsed)
            # Never backwards: the room kept for the final evaluation shrinks when one runs faster than guessed, and
            # the rate must not climb back up its curve for it.
            schedule_at = max(schedule_at, progress())
            factor = lr_factor(schedule_at, step, cfg, progress(warmup_at))
            for opt in optimizers:
                for group in opt.param_groups:
                    group["lr"] = (cfg.muon_lr if isinstance(opt, Muon) else cfg.lr) * factor
            loss_sum = torch.zeros((), device=env.device)
            batches = [data.train_batch(step, cfg.batch_size, micro * env.world + env.rank, cfg.grad_accum * env.world)
                       for micro in range(cfg.grad_accum)]
            # The step's loss is the mean over all its trained tokens, on every rank and micro-batch: weighting
            # each micro-batch's mean equally would weigh a token by how few others share its micro-batch (SFT
            # masks all but the replies), and the gradient would change with --grad-accum or the process count.
            trained = [int((b[1] != -100).sum()) for b in batches]
            step_trained = _trained_tokens(sum(trained), env) if masked else float(sum(trained) * env.world)
            ends: list[float] = []  # when micro-batches ended (the first two of a session's first step)
            droppable = cfg.grad_accum > 1 and slowest >= SLOW_STEP_S
            if droppable:
                rng_before, tokens_before, dropped = _rng_state(env.device), tokens, False
            for micro, (x, y, *documents) in enumerate(batches):
                interrupt.droppable = droppable and micro < cfg.grad_accum - 1  # what a Ctrl-C now does, to say it
                x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
                sync = contextlib.nullcontext() if not ddp or micro == cfg.grad_accum - 1 else model.no_sync()
                with sync:
                    with _autocast(env):
                        _, loss = model(x, y, documents=_documents(documents, env))
                    # DDP averages the ranks' gradients: x world undoes that, as the weights are global already.
                    weight = trained[micro] * env.world / step_trained  # 1 / grad_accum when nothing is masked
                    scaler.scale(loss * weight).backward()
                loss_sum += loss.detach() * trained[micro]
                tokens += x.numel() * env.world  # rows may be shorter than the context (the quickstart's are)
                # The second micro-batch of a session's first step is timed: the first pays for compiling, if any
                if step == start_step and micro <= 1 and cfg.grad_accum > 1 and env.main:
                    ends.append(time.perf_counter())
                    if micro == 1:
                        _say_slow_steps(bar, ends[1] - ends[0], cfg, x.numel() * env.world, env.device, ddp)
                fault_point("HOMELLM_FAULT_SIGINT_AT_MICRO", f"{step}.{micro}", "SIGINT")
                if droppable and micro < cfg.grad_accum - 1 and _any_rank(interrupt.asked, env, clock):
                    dropped = True
                    break
            interrupt.droppable = False
            if droppable and dropped:
                for opt in optimizers:
                    opt.zero_grad(set_to_none=True)
                _set_rng_state(rng_before, env.device)
                tokens = tokens_before
                elapsed = _one_clock(elapsed + time.perf_counter() - mark, cfg, env, group=clock)[0]
                # `last` again at this step keeps the val loss measured on these weights, as written before
                kept = last_val if last_val is not None and val_step == step else resumed_val if (
                    step == start_step) else None
                checkpoint("last", kept or {})
                stop_reason = "interrupted"
                break
            if cfg.grad_clip > 0:
                for opt in optimizers:
                    scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip)
            for opt in optimizers:
                scaler.step(opt)
            scaler.update()
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            step += 1
            fault_point("HOMELLM_FAULT_SIGINT_AT_STEP", step, os.environ.get("HOMELLM_FAULT_SIGNAL", "SIGINT"))
            now = time.perf_counter()
            elapsed, asked, slowest = _one_clock(elapsed + now - mark, cfg, env, interrupt.asked, clock, now - mark)
            mark = now
            if evaluates and not eval_measured:
                eval_room = cfg.eval_batches * (elapsed - start_elapsed) / (step - start_step) / 3
            done = progress() >= 1.0
            if cfg.max_time > 0 and step - start_step in (1, 1 + WARMUP_TIMED) and step < cfg.warmup_steps:
                after_first = after_first or elapsed  # (the first step's time is compile's and warm-up's too)
                if step - start_step > 1 and env.main:
                    # A time budget's steps are known only now: a GPT-2 vocabulary on a CPU fitted 17 of 50
                    each = (elapsed - after_first) / WARMUP_TIMED
                    fits = step + (cfg.max_time - elapsed) / max(each, 1e-9)
                    fits = min(fits, cfg.max_steps) if cfg.max_steps > 0 else fits
                    if fits <= cfg.warmup_steps:
                        bar.write(f"note: at {each:.2g} s a step, --max-time {cfg.max_time:g} fits about {fits:.0f} "
                                  f"steps, not more than --warmup-steps {cfg.warmup_steps}: the learning rate never "
                                  f"reaches --lr {cfg.lr:g}, nor decays; give fewer warmup steps (a tenth of the run "
                                  f"is usual: --warmup-steps {max(1, round(fits) // 10)})", file=sys.stderr)
            # Stopped by Ctrl-C: `last` is written, but no log line or evaluation a run without the stop lacks.
            # A session's end (--session-time) stops as Ctrl-C does: `last` written, the schedule left as it is.
            session_over = cfg.session_time > 0 and elapsed - start_elapsed >= cfg.session_time
            halted = (asked or session_over) and not done
            bar.update(1 if cfg.max_time <= 0 else int(elapsed) - bar.n)
            if busy is not None:
                threads, note = busy.threads(torch.get_num_threads())
                if threads != torch.get_num_threads():
                    torch.set_num_threads(threads)
                    bar.write(note, file=sys.stderr)

            if step % cfg.log_every == 0 or done:
                loss_value = _all_sum([loss_sum.item()], env)[0] / max(float(step_trained), 1.0)
                now = time.perf_counter()
                rate = (tokens - tokens_log) / max(now - t_log, 1e-9)
                t_log, tokens_log = now, tokens
                record: dict[str, Any] = {"step": step, "tokens": tokens, "elapsed_s": round(elapsed, 3),
                                          "tok_per_s": round(rate, 1), "lr": cfg.lr * factor, "train_loss": loss_value}
                if peak:
                    record["mfu"] = round(flops_per_token * rate / (peak * env.world), 4)
                if scaler.is_enabled():  # float16: the scaler skips a step whose gradients overflow, and halves this
                    record["loss_scale"] = scaler.get_scale()
                if not math.isfinite(loss_value):
                    raise HomeLLMError(f"training diverged at step {step} (loss {loss_value}): lower --lr or raise "
                                       "--warmup-steps, then train again (or --resume from the last checkpoint)",
                                       everywhere=True)  # (the loss is averaged over the ranks)
                # Shown at the bar's next redraw (a terminal's tenth of a second; a log's 30 s): a redraw forced
                # here wrote a line to a log every log step.
                shown = {"step": step} if cfg.max_time > 0 else {}  # (a time budget's bar counts seconds)
                shown.update(loss=f"{loss_value:.3f}", tok_s=f"{rate:,.0f}")
                bar.set_postfix(shown, refresh=False, **({"mfu": f"{record['mfu']:.1%}"} if peak else {}))
            else:
                record = {}
            new_best = False
            if cfg.eval_every > 0 and (step % cfg.eval_every == 0 or done):
                last_val = evaluate(eval_model, data, cfg.batch_size, cfg.eval_batches, env, cfg.grad_accum)
                # The budget counts evaluation too (it is wall-clock), and one may spend the rest of it: then this step
                # is the last, with its checkpoint, rather than the loop ending without one.
                before, now = elapsed, time.perf_counter()
                elapsed = _one_clock(elapsed + now - mark, cfg, env, group=clock)[0]
                mark = now
                eval_room, eval_measured = elapsed - before, True
                done = done or progress() >= 1.0
                if last_val is not None:
                    val_step = step
                    record = record or {"step": step, "tokens": tokens, "elapsed_s": round(elapsed, 3)}
                    record.update(last_val)
                    if env.main:  # tqdm's write prints even where the bar is disabled: once, not per rank
                        bar.write(f"step {step}: val loss {last_val['val_loss']:.4f}, "
                                  f"{last_val['val_bpb']:.4f} bits/byte")
                    if last_val["val_loss"] < best_val:
                        best_val, bad_evals, new_best = last_val["val_loss"], 0, True
                    else:
                        bad_evals += 1
                        if cfg.patience and bad_evals >= cfg.patience:
                            stop_reason, done = f"early stop: no better val loss in {bad_evals} evaluations", True
            if record and env.main:
                with open(metrics_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
            if new_best:
                # After the step's metrics line: a run resumed from `best` (no `last` yet) starts after this step, and
                # would never write the line.
                checkpoint("best", last_val or {})
            if cfg.sample_every > 0 and step % cfg.sample_every == 0 and env.main:
                bar.write(f"sample: {sample(raw)}")
                sampled = step
            fault_point("HOMELLM_FAULT_KILL_AT_STEP", step)
            periodic = cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0
            measured = last_val if last_val is not None and "val_loss" in record else {}  # on these weights
            if periodic or done or halted:  # the val loss with it only when measured on these weights
                checkpoint("last", measured)
            kept = cfg.keep_every > 0 and step % cfg.keep_every == 0
            if kept and env.main:
                # A copy of these weights to come back to (sample, compare, export, --init from): no optimizer state
                save_checkpoint(run, f"step-{step}", raw, None, {"step": step, "tokens": tokens, **measured})
            if "val_loss" in record or periodic or kept:
                # tok_per_s measures training steps: evaluation and checkpoint writes do not count against it.
                t_log, tokens_log = time.perf_counter(), tokens
            if done or halted:
                if halted:
                    stop_reason = "interrupted" if asked else "session_time"
                elif cfg.max_time > 0 and not 0 < cfg.max_steps <= step and stop_reason == "max_steps":
                    stop_reason = "max_time"  # (it may stop short of the budget: room kept for the final evaluation)
                    bar.update(bar.total - bar.n)  # the budget is spent (what is left is the evaluation's): 100 %
                break
    bar.close()
    # (torchrun's kill may be seconds away; and the last step's sample, when it had one, was just shown)
    if env.main and not (ddp and stop_reason == "interrupted") and sampled != step:
        print(f"sample: {sample(raw)}", file=sys.stderr)
    if ddp:  # after rank 0's sample: the ranks leave together (one gone early aborted another at exit, 2 in 35 runs)
        dist.barrier()
    summary = {"run": str(run), "steps": step, "tokens": tokens, "elapsed_s": round(elapsed, 2),
               "stop": stop_reason, "best_val_loss": None if best_val == math.inf else best_val,
               **({**last_val, "val_step": val_step} if last_val else {})}
    return summary


def _say_slow_steps(bar: tqdm, one: float, cfg: TrainConfig, micro_tokens: int, device: torch.device,
                    ddp: bool = False) -> None:
    """Where a step of many micro-batches takes minutes (gpt2-124m's 32 on a CPU), say so after the second one (`one`
    its time), rather than leave a progress bar standing still that long. Under torchrun, a Ctrl-C is honoured after
    the micro-batch under way, and torchrun kills its ranks 30 s after passing it on (--shutdown-timeout)."""
    if ddp and one >= 10:
        bar.write(f"note: a micro-batch took {one:.0f} s, and Ctrl-C waits for the one under way, then writes `last`: "
                  "torchrun kills its ranks 30 s after a Ctrl-C, so give torchrun --shutdown-timeout "
                  f"{60 + 30 * math.ceil(2 * one / 30)} (before -m homellm) to keep that checkpoint", file=sys.stderr)
    each = one * cfg.grad_accum
    if each < 60:
        return
    hint = " (`--preset cpu` is sized to train in minutes on a CPU)" if device.type == "cpu" else ""
    bar.write(f"note: a step is {cfg.grad_accum} micro-batches of {micro_tokens:,} tokens, and one took {one:.1f} s: "
              f"about {each / 60:.0f} min a step here, the progress bar moving once a step{hint}", file=sys.stderr)


def _any_rank(asked: bool, env: Env, group: Any) -> bool:
    """Whether any rank has been asked to stop (each rank's own answer in one process)."""
    if env.world == 1:
        return asked
    t = torch.tensor([float(asked)], dtype=torch.float64, device="cpu" if group is not None else env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.item() > 0


@contextlib.contextmanager
def _threads_kept(busy: BusyCores | None) -> Iterator[None]:
    """The threads training gave up to other work are the caller's again after it, however it ends (a notebook that
    catches a diverged run and trains again would be left on one thread)."""
    try:
        yield
    finally:
        if busy is not None:
            torch.set_num_threads(busy.most)


class _Interrupt:
    """While entered, the first Ctrl-C (SIGINT) or SIGTERM only sets `asked`, which the loop honours after the current
    step; a second one raises KeyboardInterrupt as usual. SIGTERM is how a scheduler or a container stops a job
    (SLURM, `docker stop`, Kubernetes; torchrun passes it on): it killed training at once, losing every step since
    the last periodic checkpoint. Off (`asked` stays False) outside the main thread, where signal handlers cannot be
    set. `then` says what follows that step; `announce` is off on all ranks of torchrun but the first, which speaks
    for them."""

    signals = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, bar: tqdm, then: str, announce: bool = True):
        self.asked, self._bar, self._announce, self._then = False, bar, announce, then
        self._old: dict[int, Any] = {}
        self.droppable = False  # whether the step under way is dropped at the next micro-batch's end instead

    def __enter__(self) -> _Interrupt:
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in self.signals}
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.asked:
            raise KeyboardInterrupt
        self.asked = True
        if self._announce:
            when = ("after this micro-batch, dropping the unfinished step (--resume does it again)" if self.droppable
                    else "after this step")
            told = "" if signum == signal.SIGINT else "terminated (SIGTERM): "
            self._bar.write(f"{told}stopping {when}, {self._then} (Ctrl-C again stops at once)", file=sys.stderr)


def _gather_rng(env: Env) -> list[dict[str, Any]]:
    """RNG state of every rank (dropout differs per rank), gathered on rank 0."""
    mine = _rng_state(env.device)
    if env.world == 1:
        return [mine]
    out: list[Any] = [None] * env.world
    dist.all_gather_object(out, mine)
    return out


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from: the resumed run writes them again."""
    if not path.exists():
        return
    lines = [(i, line) for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
             if line.strip()]
    keep = []
    for i, line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        row_step = row.get("step") if isinstance(row, dict) else None
        if not isinstance(row_step, int):
            if i == lines[-1][0]:  # a line cut short by a crash or a full disk: it was never a whole record
                print(f"note: {path}:{i} is an incomplete log line: dropped", file=sys.stderr)
                continue
            raise HomeLLMError(f"{path}:{i}: not a metrics record with a step: restore or delete that line")
        if row_step <= step:
            keep.append(line)
    from homellm.io import atomic_write_bytes

    atomic_write_bytes(path, "".join(line + "\n" for line in keep).encode())


def sample_text(model: GPT, tok: Tokenizer, prompt: str, max_new_tokens: int = 64, stop: str = "") -> str:
    """A short greedy continuation, for a look at what the model learned during training; cut after `stop`
    when given (a task model's answer ends there, and what follows was never trained)."""
    from homellm.config import SampleConfig
    from homellm.generate import stream_text

    cfg = SampleConfig(prompt=prompt, max_new_tokens=max_new_tokens, temperature=0.0)
    text = "".join(stream_text(model, tok, prompt, cfg))  # (generation restores the model's training mode)
    if stop and stop in text:
        text = text[:text.index(stop) + len(stop)]
    return prompt + text


# ---- pretraining: from a data folder or raw text ------------------------------------------------------------

def steps_for_epochs(cfg: TrainConfig, total: int, per_row: int, unit: str, how: str = "") -> TrainConfig:
    """cfg with the max_steps that read `total` training units (tokens, rows) cfg.epochs times, at batch_size x
    grad_accum rows of `per_row` units a step on every process; said once, under torchrun too."""
    per_step = cfg.batch_size * cfg.grad_accum * world_size() * per_row
    cfg = replace(cfg, max_steps=max(1, math.ceil(cfg.epochs * total / per_step)))
    steps = f"{cfg.max_steps:,} step{'s' * (cfg.max_steps != 1)} of {per_step:,} {unit}"
    read = cfg.max_steps * per_step / max(total, 1)
    units = f"{total:,} training {unit.removesuffix('s') if total == 1 else unit}"
    if read > 1.25 * cfg.epochs:  # whole steps hold more than the epochs ask (3 rows, 16 a step): say what is read
        rows = cfg.batch_size * cfg.grad_accum
        # (review: "0.0 times over" for 0.0135, and "one step holds more" said of 3 steps rounded up from 2.2)
        why = ("one step holds more than they ask" if cfg.max_steps == 1 else
               f"they ask for {cfg.epochs * total / per_step:.2g} steps, and steps are whole")
        times = f"{read:,.0f}" if read >= 100 else f"{read:.3g}"  # (not 1.02e+03)
        say(f"--epochs {cfg.epochs:g}: {steps} read the {units} {times} times over{how}, not "
            f"{cfg.epochs:g}: {why} (a smaller --batch-size comes closer: now {rows} rows a step)")
    else:
        say(f"--epochs {cfg.epochs:g}: {steps} read the {units} "
            f"{'once' if cfg.epochs == 1 else f'{cfg.epochs:g} times over'}{how}")
    return cfg


def foreign_data(data_dir: Path, own: Callable[[dict[str, Any]], bool]) -> bool:
    """Whether a run's data folder holds prepared data of someone else's (`homellm prepare --out RUN/data`), which
    the run would prepare its own over: its meta.json reads, and fails the `own` test. A damaged meta.json is left
    to prepare, which replaces its own."""
    try:
        meta = json.loads((data_dir / "meta.json").read_bytes())
    except (OSError, ValueError):
        return False
    if not isinstance(meta, dict):
        return False
    return not own(meta)


def _made_by_run(meta: dict[str, Any], run: Path) -> bool:
    """Whether RUN/data's meta.json is a run's own from raw text: it says so (pretrain_inputs) since 2026-11-30;
    before, its tokenizer was the one the run trained in RUN/data_tokenizer, or the run itself (a resume)."""
    tokenizer = meta.get("tokenizer")
    source = Path(str(tokenizer.get("source") or "")) if isinstance(tokenizer, dict) else Path()
    return "pretrain_inputs" in meta or source.name in ("data_tokenizer", run.resolve().name)


def absolute_inputs(inputs: list[str]) -> list[str]:
    """--data as absolute paths (a glob made absolute, pattern and all; hf: names as given, a local folder or file
    named so made absolute: kept relative, a resumed run read it from wherever it was started)."""
    from homellm.data import hf_spec_parts

    def absolute(d: str) -> str:
        if not d.startswith("hf:"):
            return os.path.abspath(d)
        name, *rest = hf_spec_parts(d)
        return ":".join([f"hf:{os.path.abspath(name)}", *rest]) if Path(name).exists() else d

    return [absolute(d) for d in inputs]


def prepare_inputs(cfg: TrainConfig) -> Path:
    """The prepared data folder for cfg.data: itself, or RUN/data built from raw text (tokenizer trained first)."""
    with notes_once():  # (the tokenizer's reading and the shards' note the same things about the same files)
        return _prepare_inputs(cfg)


def _prepare_inputs(cfg: TrainConfig) -> Path:
    from homellm.config import PrepareConfig
    from homellm.data import check_out_apart, nanogpt_folder, prepare
    from homellm.tokenizer import train_tokenizer

    if not cfg.data:
        raise HomeLLMError("--data is required: a folder from `homellm prepare`, or .txt/.jsonl files to train on")
    if len(cfg.data) == 1 and ((Path(cfg.data[0]) / "meta.json").is_file() or (Path(cfg.data[0]) / ".preparing"
                                                                              ).is_dir()):
        read_meta(cfg.data[0])  # (a prepare killed while swapping the new data in: it says so)
        return Path(cfg.data[0])
    if nanogpt_folder(cfg.data):  # token ids, not text: a tokenizer trained here could not read them
        raise HomeLLMError(f"--data {cfg.data[0]} holds nanoGPT's train.bin and val.bin, ids of the tokenizer they "
                           f"were made with: adopt them with `homellm prepare --input {typed(cfg.data[0])} --tokenizer "
                           "GPT2_TOKENIZER --out DATA` (GPT-2's encoder.json + vocab.bpe), then --data DATA")
    run = Path(cfg.out)
    data_dir = run / "data"
    check_out_apart([*cfg.data, *cfg.val_input], run)
    try:
        size = input_bytes(list(cfg.data), "--data")
        if cfg.val_input and size is not None:  # (text added to the val files is a change too)
            size = None if (val_size := input_bytes(list(cfg.val_input), "--val-input")) is None else size + val_size
    except HomeLLMError as e:
        if not cfg.resume:
            raise
        if not ((data_dir / "meta.json").is_file() and "pretrain_inputs" in read_meta(data_dir)):
            # (a run moved to another machine, its data left behind)
            raise HomeLLMError(f"{e}; to resume {run}, pass --data where its data is now: the text itself, or a "
                               f"folder made by `homellm prepare --tokenizer {typed(run)}`") from None
        # A relay run goes on where its text is not (another machine, the corpus moved): its shards are here.
        say(f"note: {e}; resuming on the shards {run} prepared from it, in {data_dir} (give --data where the text "
            "is now to read it again)")
        return data_dir
    # Reused only when made from the same inputs the same way, by an earlier start of this run.
    # The inputs' total size tells text added to a corpus since (a relay run whose corpus grows); modification times
    # would not do, as a relay's every session on a fresh machine copies the corpus anew.
    settings = {"inputs": list(cfg.data), **({"val_inputs": list(cfg.val_input)} if cfg.val_input else {}),
                "text_field": cfg.text_field, "tokenizer_kind": cfg.tokenizer_kind,
                "tokenizer_vocab": cfg.tokenizer_vocab, "tokenizer_words": list(cfg.tokenizer_words),
                "aozora": cfg.aozora, "encoding": cfg.encoding, "val_fraction": cfg.val_fraction, "split": cfg.split,
                "tokenizer_max_chars": cfg.tokenizer_max_chars,
                "bytes": size,
                # whose tokenizer reads the text: the --init run's, or one trained here ("")
                "tokenizer": cfg.init}
    if foreign_data(data_dir, lambda meta: _made_by_run(meta, run)):  # (--resume too: a run trained on it)
        raise HomeLLMError(f"--out {run} holds prepared data in {data_dir} that this run did not make, where a run "
                           f"from raw text prepares its own over it: train on it with `--data {typed(data_dir)}`, or "
                           f"move it out of {run} first")
    if (data_dir / "meta.json").is_file() and (made := read_meta(data_dir).get("pretrain_inputs")):
        # Runs made before inputs were kept absolute saved them as typed: relative to where they ran, as now; before
        # --encoding, they read text as auto does; and they did not save the size.
        was = {"encoding": "auto", "bytes": settings["bytes"], "tokenizer": "", "tokenizer_words": [],
               "val_fraction": 0.1, "split": "document", "tokenizer_max_chars": 0, **made,
               "inputs": absolute_inputs(made.get("inputs", []))}
        if was == settings:
            return data_dir
        if cfg.resume and was["bytes"] != settings["bytes"]:
            print(f"note: {' '.join([*cfg.data, *cfg.val_input])} changed since {data_dir} was prepared "
                  f"({was['bytes']:,} bytes then, "
                  f"{settings['bytes']:,} now): preparing it again", file=sys.stderr)
    if cfg.resume or cfg.init:  # text for a trained run: its weights mean its own tokenizer's ids, so that one reads it
        tok_dir = run if cfg.resume else Path(cfg.init)
        print(f"tokenizing {' '.join(cfg.data)} with {tok_dir}'s tokenizer", file=sys.stderr)
    else:
        tok_dir = run / "data_tokenizer"
        if cfg.tokenizer_words and cfg.tokenizer_kind != "char":
            raise HomeLLMError(f"--tokenizer-words {' '.join(cfg.tokenizer_words)}: only a char tokenizer takes words: "
                               "add --tokenizer-kind char")
        # Where the folder is there already beside no data of this run's own, trained aside first: an earlier start
        # of this run (stopped before preparing) left the same tokenizer (training is deterministic), anything else
        # is the user's, which must not be replaced.
        ours = (data_dir / "meta.json").is_file() and _made_by_run(read_meta(data_dir), run)
        there = tok_dir.exists() and not unfinished_save(tok_dir) and not ours
        out = run / ".data_tokenizer.tmp" if there else tok_dir
        shutil.rmtree(out, ignore_errors=True)
        print(f"training a {cfg.tokenizer_kind} tokenizer on {' '.join(cfg.data)}", file=sys.stderr)
        try:
            train_tokenizer(TokenizerConfig(input=list(cfg.data), out=str(out), kind=cfg.tokenizer_kind,
                                            vocab_size=cfg.tokenizer_vocab, words=list(cfg.tokenizer_words),
                                            text_field=cfg.text_field, max_chars=cfg.tokenizer_max_chars,
                                            encoding=cfg.encoding, aozora=cfg.aozora))
        except HomeLLMError as e:  # `tokenizer train` names its own flags; here they are pretrain's
            raise HomeLLMError(str(e).replace("--vocab-size", "--tokenizer-vocab").replace("--kind", "--tokenizer-kind")
                               .replace("--words", "--tokenizer-words").replace("--max-chars", "--tokenizer-max-chars")
                               ) from None
        if there:
            try:
                same = Tokenizer.load(tok_dir).same_as(Tokenizer.load(out))
            except HomeLLMError:
                same = False
            shutil.rmtree(out)
            if not same:
                raise HomeLLMError(f"--out {run} holds {tok_dir.name}/ with other files than the tokenizer this run "
                                   "trains there: choose a new --out")
    # (with a trained run's tokenizer, prepare says that another tokenizer is no fix for text it cannot write)
    prepare(PrepareConfig(input=list(cfg.data), tokenizer=str(tok_dir), out=str(data_dir),
                          text_field=cfg.text_field, encoding=cfg.encoding, aozora=cfg.aozora,
                          val_fraction=cfg.val_fraction, split=cfg.split, val_input=list(cfg.val_input)),
            extra_meta={"pretrain_inputs": settings})
    return data_dir


def _data_identity(config: dict[str, Any]) -> dict[str, Any] | None:
    """What a run trains on, to tell other data on resume: pretraining's data_meta (tokens, documents, split), or
    sft's conversation counts and checksum."""
    return config.get("data_meta") or config.get("sft_data")


def check_end(cfg: TrainConfig) -> None:
    """A run needs an end: steps, a time budget, or epochs (which become steps once the data is known)."""
    if cfg.max_steps <= 0 and cfg.max_time <= 0 and cfg.epochs <= 0:
        raise HomeLLMError("--max-steps, --max-time or --epochs must be positive: training needs an end")


def pretrain(model_cfg: ModelConfig, cfg: TrainConfig) -> dict[str, Any]:
    """`homellm pretrain`: prepare the data if needed, then train from scratch (or resume) into cfg.out."""
    if not cfg.out:
        raise HomeLLMError("--out is required: the run folder to write")
    # What the flags alone decide, said before any text is read: preparing a corpus may take hours.
    check_end(cfg)
    resolve_device(cfg.device)
    run = Path(cfg.out)
    if not cfg.resume and os.environ.get("RANK", "0") == "0":  # (the others would see what rank 0 began writing)
        check_new_run(run)
    # Kept absolute in the run's config: a --resume or eval from another folder must find the same text, not a
    # folder of the same name there.
    cfg = replace(cfg, data=absolute_inputs(cfg.data), val_input=absolute_inputs(cfg.val_input),
                  init=cfg.init and os.path.abspath(cfg.init))
    start = None if cfg.resume else _init_weights(cfg, model_cfg)  # checked before anything is written
    if cfg.resume:
        if not run.exists():  # a typo, or a drive not mounted (Colab's): not a first session to start anew
            raise HomeLLMError(f"--resume: {run} does not exist: check the path (a relay's first session starts "
                               "without --resume)")
        if run.is_dir() and not any(run.iterdir()):  # a relay's first session: nothing yet
            raise HomeLLMError(f"--resume: {run} holds no run yet: start it without --resume (later sessions add "
                               "--resume to continue it)")
        check_not_merged(run)
        if is_sft(run):
            raise HomeLLMError(f"{run} is a fine-tuned run: continue it with `homellm sft --resume --out {typed(run)}`")
        saved_model, _ = read_config(run)
        saved = load_json(run / "config.json")
        if "imported_from" in saved:  # its weights came trained: there is no pretraining of it to continue
            raise HomeLLMError(f"{run} was imported ({saved['imported_from']}), not pretrained here, so there is no "
                               f"pretraining to resume: go on pretraining it on your text with `homellm pretrain "
                               f"--init {typed(run)} --data TEXT --out RUN`, or fine-tune it with `homellm sft --init "
                               f"{typed(run)} --data CHATS.jsonl --out RUN`")
        if saved.get("task") == "arithmetic":
            raise HomeLLMError(f"{run} was trained by `homellm quickstart` on the arithmetic task's answers only, "
                               "which `pretrain --resume` would not continue the same way: continue it with "
                               f"`homellm quickstart --out {typed(run)} --resume --max-time SECONDS`, or fine-tune "
                               "it with `homellm sft`")
        if model_cfg.vocab_size == 0:
            model_cfg = replace(model_cfg, vocab_size=saved_model.vocab_size)
        check_resume(run, model_cfg, cfg)
        find_checkpoint(run, "last", need_state=True, quiet=True)  # none yet: said before any text is prepared
    elif os.environ.get("RANK", "0") == "0" and holds_trained(run):
        raise HomeLLMError(f"{run} already holds a trained run: add --resume to continue it, or choose a new --out")
    if world_size() > 1 and not dist.is_initialized():
        setup_env(cfg)  # join the group before rank 0 prepares data, so the others can wait for it
    # Preparing raw text can take hours, past the 10 minutes after which NCCL's watchdog kills a rank waiting in a
    # collective (gloo's 30): the others wait for rank 0 in a gloo group of their own, with a day's patience.
    waiting = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=1)) if dist.is_initialized() else None
    if waiting is not None and dist.get_rank() != 0:
        try:
            dist.barrier(group=waiting)
        except RuntimeError:  # rank 0 stopped, and printed why: one line here too, not a traceback
            raise HomeLLMError("rank 0 stopped while preparing the data: see its error") from None
        data_dir = prepare_inputs(cfg)
    else:
        data_dir = prepare_inputs(cfg)
        if waiting is not None:
            dist.barrier(group=waiting)
    if waiting is not None:
        dist.destroy_process_group(waiting)
    tok = Tokenizer.load(data_dir)
    trained = run if cfg.resume else Path(cfg.init) if cfg.init else None
    if trained is not None:
        own = Tokenizer.load(trained)
        # The same ids, and the same ends: documents prepared with other ones end where the model never learned to
        if not tok.same_as(own) or (tok.eot_id, tok.bos_id) != (own.eot_id, own.bos_id):
            raise HomeLLMError(f"--data {data_dir} was prepared with another tokenizer than {trained} was trained "
                               f"with: its ids would mean other text to the model; prepare the text with `homellm "
                               f"prepare --tokenizer {typed(trained)}`, or pass the text files themselves as --data")
        tok = own
    if model_cfg.vocab_size == 0:
        model_cfg = replace(model_cfg, vocab_size=tok.padded_size)
    elif model_cfg.vocab_size < tok.vocab_size:
        raise HomeLLMError(f"--vocab-size {model_cfg.vocab_size} is smaller than the tokenizer's {tok.vocab_size}: "
                           "drop --vocab-size")
    elif model_cfg.vocab_size > tok.padded_size and trained is None:
        # --vocab-size is the model's rows, not the tokenizer's tokens: 8,000 rows over a 300-id tokenizer made a
        # model three times its size, unsaid.
        say(f"note: --vocab-size {model_cfg.vocab_size:,} gives the model {model_cfg.vocab_size - tok.vocab_size:,} "
            f"embedding rows more than the tokenizer's {tok.vocab_size:,} ids, which never train: drop it (the "
            f"model then takes {tok.padded_size:,}), or give --tokenizer-vocab {model_cfg.vocab_size} for a tokenizer "
            "of that many tokens trained from the text")
    meta = read_meta(data_dir)
    if note := staged_note(data_dir):
        say(f"note: {note}")
    kept = ("train_tokens", "val_tokens", "train_bytes", "val_bytes", "documents", "split", "val_inputs")
    if cfg.epochs > 0:
        # Windows are drawn at random (nanoGPT's sampling): an epoch is as many tokens as the split holds, read in
        # random windows, not one pass over each window.
        cfg = steps_for_epochs(cfg, meta["train_tokens"], model_cfg.block_size, "tokens", " (in random windows)")
    data = TokenBatches(data_dir, model_cfg.block_size, cfg.seed, tok.token_bytes())
    if data.no_val and (cfg.eval_every or cfg.patience):
        say(f"note: no evaluation, so no `best` checkpoint{' and no early stopping' if cfg.patience else ''}: "
            f"{data.no_val}")
    elif cfg.patience and not cfg.eval_every:
        say(f"note: --patience {cfg.patience} counts evaluations, and --eval-every 0 makes none: no early stopping "
            "(and no `best` checkpoint)")
    return train(model_cfg, cfg, data, tok, init=start, extra_config={"data_dir": str(data_dir.resolve()),
                                                                      "data_meta": {k: meta[k] for k in kept
                                                                                    if k in meta}})


# What `pretrain --init` may set otherwise than the trained run: not what its weights are.
INIT_CHANGES = {"block_size", "dropout"}


def check_init_architecture(init: str | Path, asked: dict[str, Any], saved: ModelConfig) -> None:
    """Refuse model fields in `asked` that differ from the --init run's (`saved`), bar INIT_CHANGES."""
    if diffs := [f"--{k.replace('_', '-')} {v} (it has {getattr(saved, k)})" for k, v in asked.items()
                 if k not in INIT_CHANGES and v != getattr(saved, k)]:
        raise HomeLLMError(f"--init {init}: its weights are of another architecture than {'; '.join(diffs)}: drop "
                           "those flags (the architecture is the trained run's; --block-size may be shorter)")


def _init_weights(cfg: TrainConfig, model_cfg: ModelConfig) -> Callable[[GPT], None] | None:
    """For `pretrain --init RUN`: checks that model_cfg is RUN's architecture (a shorter context or another dropout
    aside), and returns what loads RUN's weights (--init-checkpoint: best, last or a kept step-N) into the new
    model; None without --init."""
    if not cfg.init:
        if cfg.init_checkpoint != "best":  # (silently ignored, it trained from scratch)
            raise HomeLLMError(f"--init-checkpoint {cfg.init_checkpoint} names weights of an --init run: add "
                               "--init RUN")
        return None
    init, run = Path(cfg.init), Path(cfg.out)
    if init.resolve() == run.resolve():
        raise HomeLLMError(f"--out {run} is the --init run: write the new run to a new folder (or `--resume --out "
                           f"{typed(run)}`)")
    saved, _ = read_config(init)
    if "lora" in load_json(init / "config.json"):
        raise HomeLLMError(f"--init {init} is a LoRA run (adapters only): merge it first (`homellm merge "
                           f"{typed(init)} --out MERGED`), then --init MERGED")
    check_init_architecture(init, to_dict(model_cfg), saved)
    if model_cfg.block_size > saved.block_size:
        raise HomeLLMError(f"--block-size {model_cfg.block_size}: --init {init} was trained for {saved.block_size} "
                           f"positions at most: give {saved.block_size} or fewer")
    folder = find_checkpoint(init, cfg.init_checkpoint)

    def load(model: GPT) -> None:
        weights = read_weights(folder)
        if "embed_positions.weight" in weights:  # GPT-2's learned positions: the first block_size of them
            weights["embed_positions.weight"] = weights["embed_positions.weight"][:model_cfg.block_size]
        load_weights_into(model, weights, str(folder))

    return load
