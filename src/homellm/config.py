"""Typed configuration: one dataclass per concern, named presets, and CLI flags derived from the fields.

    from homellm.config import preset
    model, train = preset("cpu")
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import json
import math
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from homellm.errors import HomeLLMError

# Special tokens every homellm tokenizer reserves: end of text separates documents; the ChatML pair frames
# chat turns (SFT, chat, serve); pad fills batches of unequal conversations.
EOT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [EOT, IM_START, IM_END, PAD]
# The chat format (ChatML) as Jinja, saved in tokenizer_config.json; homellm.chat.render produces the same ids.
ROLES = ("system", "user", "assistant")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '" + IM_START + "' + message['role'] + '\\n' + message['content'] + '" + IM_END + "' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + IM_START + "assistant\\n' }}{% endif %}"
)


def chat_template(system: str = "") -> str:
    """CHAT_TEMPLATE, after a default system prompt where there is one (an imported SmolLM's or Qwen's: their own
    templates start a conversation that has no system message with it)."""
    if not system:
        return CHAT_TEMPLATE
    # (a Jinja string literal: backslashes, quotes and line breaks escaped)
    text = system.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")
    return ("{% if not messages or messages[0]['role'] != 'system' %}"
            "{{ '" + IM_START + "system\\n" + text + IM_END + "\\n' }}{% endif %}" + CHAT_TEMPLATE)


@dataclass
class ModelConfig:
    family: str = "llama"  # gpt2: LayerNorm, learned positions, GELU MLP; llama: RMSNorm, RoPE, SwiGLU
    vocab_size: int = 0  # set from the tokenizer, padded up to a multiple of 64 for fast matmuls
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 0  # grouped-query attention: fewer key/value heads shrink the KV cache; 0 = n_head
    n_embd: int = 128
    intermediate_size: int = 0  # MLP width; 0 = 4*n_embd (gpt2) or 8/3*n_embd rounded up to 32 (llama)
    block_size: int = 256  # the context length the model is trained for
    dropout: float = 0.0  # helps small data, slows convergence on large data
    bias: bool = False  # biases in linear layers and norms (GPT-2 had them; they rarely help)
    tie_embeddings: bool = True  # share input and output embeddings: fewer parameters for small models
    rope_theta: float = 10000.0  # RoPE base; larger bases suit longer contexts
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.n_kv_head == 0:
            self.n_kv_head = self.n_head
        if self.intermediate_size == 0:
            if self.family == "gpt2":
                self.intermediate_size = 4 * self.n_embd
            else:
                self.intermediate_size = -(-(8 * self.n_embd // 3) // 32) * 32

    def validate(self, where: str = "", fix: str = "restore the file homellm wrote") -> None:
        """Flags that cannot make a model, named as typed; with `where` (a saved config's file and section), named
        as the fields there, with `fix`."""
        check_ranges(self, where, fix)  # first: --n-head 0 would divide by zero below

        def name(field: str) -> str:
            return field if where else f"--{field.replace('_', '-')}"

        fix = fix if where else "change one"
        head = f"{where}: " if where else ""
        if self.n_embd % self.n_head:
            raise HomeLLMError(f"{head}{name('n_embd')} {self.n_embd} is not divisible by {name('n_head')} "
                               f"{self.n_head}: {fix}")
        if self.n_head % self.n_kv_head:  # (each key/value head serves a whole group of query heads)
            *rest, last = [str(d) for d in range(1, self.n_head + 1) if self.n_head % d == 0]
            divisors = f"{', '.join(rest)} or {last}" if rest else last
            more = " (key/value heads are at most the query heads)" if self.n_kv_head > self.n_head else ""
            raise HomeLLMError(f"{head}{name('n_head')} {self.n_head} is not divisible by {name('n_kv_head')} "
                               f"{self.n_kv_head}{more}: " + (fix if where else f"use {name('n_kv_head')} "
                                                                                f"{divisors}, or another --n-head"))
        if self.family == "llama" and (size := self.n_embd // self.n_head) % 2:
            # (the next even head sizes, as n_embd for the same heads)
            near = " or ".join(f"{name('n_embd')} {self.n_head * s}" for s in (size - 1, size + 1) if s > 0)
            raise HomeLLMError(f"{head}RoPE needs an even head size, and {name('n_embd')} {self.n_embd} / "
                               f"{name('n_head')} {self.n_head} is {size}: "
                               + (fix if where else f"change one (e.g. {near})"))


TOKENIZER_FIELDS = ("tokenizer_kind", "tokenizer_vocab", "tokenizer_words", "tokenizer_max_chars")
# TrainConfig's fields that read raw --data (as prepare does; --val-input apart, checked on its own)
RAW_TEXT_FIELDS = (*TOKENIZER_FIELDS, "text_field", "encoding", "aozora", "val_fraction", "split")


@dataclass
class TrainConfig:
    data: list[str] = field(default_factory=list)  # prepared data, or text: .txt/.jsonl/.json, folders, globs, hf:NAME
    out: str = ""  # the run directory: config, tokenizer, checkpoints, metrics
    # (A fresh optimizer and schedule: the weights are the run's --init-checkpoint, the architecture and tokenizer its
    # own.)
    init: str = ""  # a trained run (yours, or imported) to go on pretraining on new text, instead of from scratch
    init_checkpoint: str = "best"  # which weights of --init: best, last, or a kept step-N
    tokenizer_kind: str = "bpe"  # when --data is raw text: bpe (byte-level BPE) or char
    tokenizer_vocab: int = 1024  # when --data is raw text: BPE vocabulary size
    tokenizer_words: list[str] = field(default_factory=list)  # raw text, char tokenizer: strings one token each
    text_field: str = "text"  # when --data is raw jsonl: the field holding the text
    encoding: str = "auto"  # when --data is raw .txt: auto (UTF-8 or Shift_JIS), cp932, euc-jp, gbk, big5, utf-16...
    aozora: bool = False  # when --data is raw text from Aozora Bunko: drop its ruby, notes and footer (as prepare)
    val_fraction: float = 0.1  # when --data is raw text: documents (or one document's tail) held out for validation
    val_input: list[str] = field(default_factory=list)  # when --data is raw text: val is this text instead (prepare's)
    split: str = "document"  # when --data is raw text: document, or position (the tokens' last part; see prepare)
    tokenizer_max_chars: int = 0  # when --data is raw text: train the tokenizer on at most N characters (0 = all)
    # (the fields above from tokenizer_kind apply to raw text only: RAW_TEXT_FIELDS, before the class)
    batch_size: int = 32  # sequences per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step: a larger batch without more memory
    lr: float = 1e-3  # peak learning rate (AdamW; Muon's matrices use muon_lr)
    min_lr_ratio: float = 0.1  # the learning rate decays to lr * min_lr_ratio
    warmup_steps: int = 100
    schedule: str = "cosine"  # cosine: warmup then cosine decay; wsd: warmup, stable, then linear decay
    decay_fraction: float = 0.2  # wsd: the final fraction of steps spent decaying
    weight_decay: float = 0.1  # applied to matrices only, never to norms, biases or embeddings' gains
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # clip the global gradient norm; 0 disables
    optimizer: str = "adamw"  # adamw, or muon: Muon for hidden matrices and AdamW for the rest
    muon_lr: float = 0.02
    max_steps: int = 1000  # 0 = none: the run ends by its time budget (the cpu preset's) or its epochs
    epochs: float = 0.0  # instead of --max-steps: read the training data this many times (sft: every row); 0 = off
    max_time: float = 0.0  # wall-clock budget in seconds for training; 0 = none. The schedule follows it
    session_time: float = 0.0  # stop this session after N s with `last` written, schedule unchanged: --resume goes on
    eval_every: int = 100  # evaluate val loss and bits per byte every N steps (and at the end); 0 = never: no best
    eval_batches: int = 20  # val batches per evaluation, each a global batch (batch_size x grad_accum x processes)
    sample_every: int = 0  # print a generated sample every N steps; 0 = only at the end
    sample_prompt: str = ""
    sample_stop: str = ""  # end each sample at this string (the quickstart's: `$`, where its answers end)
    log_every: int = 10
    checkpoint_every: int = 500  # write `last` every N steps (and at the end; 0 = only then); `best` follows val loss
    keep_every: int = 0  # also keep the weights every N steps as step-N/, to sample, compare or start from; 0 = off
    patience: int = 0  # early stopping: stop after N evaluations without a better val loss; 0 = never
    dtype: str = "auto"  # float32, bfloat16 (autocast), float16 (autocast + grad scaler); auto picks per device
    compile: bool = False  # torch.compile the model: slower start, faster steps
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps
    seed: int = 1337
    resume: bool = False  # continue the run in --out from its last valid checkpoint


@dataclass
class TokenizerConfig:
    input: list[str] = field(default_factory=list)  # .txt/.jsonl/.json files, folders, globs, hf:NAME[[:CONFIG]:SPLIT]
    out: str = ""
    kind: str = "bpe"  # bpe: byte-level BPE (lossless on any text); char: one token per character
    words: list[str] = field(default_factory=list)  # char only: strings that are one token each, e.g. \times
    vocab_size: int = 1024  # BPE only; special tokens included
    text_field: str = "text"
    encoding: str = "auto"  # text encoding of .txt inputs: auto detects utf-8 / cp932 (Shift_JIS)
    aozora: bool = False  # .txt inputs are Aozora Bunko files: drop ruby, ［＃…］ notes, header notes and footer,
    # and write gaiji notes, ／＼ and 〔accents〕 as the characters they stand for
    max_chars: int = 0  # train on at most this many characters (0 = all): BPE needs far less than a corpus
    from_file: str = ""  # instead of training: a tokenizer.json, a dir with one or GPT-2's encoder.json + vocab.bpe,
    # or hf:NAME (a model's tokenizer from the hub)


@dataclass
class EncodeConfig:
    """`homellm tokenizer encode`: the tokens a tokenizer (or a run's) writes a text as."""
    text: str = ""  # the text to split into tokens; - reads it from standard input


@dataclass
class PrepareConfig:
    input: list[str] = field(default_factory=list)  # .txt/.jsonl/.json files, folders, globs, hf:NAME[[:CONFIG]:SPLIT]
    tokenizer: str = ""  # a tokenizer dir (or a run dir holding one)
    out: str = ""
    text_field: str = "text"
    encoding: str = "auto"  # of .txt inputs: auto (UTF-8 or Shift_JIS), cp932, euc-jp, gbk, utf-16...; .jsonl is UTF-8
    aozora: bool = False  # .txt inputs are Aozora Bunko files: drop ruby, ［＃…］ notes, header notes and footer,
    # and write gaiji notes, ／＼ and 〔accents〕 as the characters they stand for
    val_fraction: float = 0.1  # documents (or, for a single document, its tail) held out for validation
    val_input: list[str] = field(default_factory=list)  # instead: val is this text whole, train all of --input
    # (your own val.txt, or a hub dataset's validation split: hf:roneneldan/TinyStories:validation)
    split: str = "document"  # document: each to val or train by a hash of its start (added text keeps its side),
    # or position: the tokens' last part, as nanoGPT (for a few documents of uneven length)
    shard_tokens: int = 100_000_000  # tokens per shard file
    max_docs: int = 0  # stop after this many documents (useful for hub datasets); 0 = all
    seed: int = 0  # which documents go to val


@dataclass
class SampleConfig:
    prompt: str = ""  # - reads it from standard input, less one final line break (--prompt - < prompt.txt)
    max_new_tokens: int = 200
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # nucleus sampling; 1 = off
    repetition_penalty: float = 1.0  # >1 discourages tokens already in the text; 1 = off
    stop: list[str] = field(default_factory=list)  # stop at any of these strings (a line break: bash's $'\n')
    num_beams: int = 1  # >1: beam search (deterministic; ignores temperature, top-k, top-p)
    seed: int = 0
    checkpoint: str = "best"  # best, last, or a kept step-N
    device: str = "auto"
    dtype: str = "auto"  # the weights': auto = bfloat16 on a recent CUDA GPU (float16 before Ampere), else float32


@dataclass
class GenerateConfig(SampleConfig):
    """`homellm generate`: one prompt, or prompts typed one after another."""
    interactive: bool = False  # a prompt loop: each line typed is continued; /temperature and the rest change settings
    num_samples: int = 1  # continuations of the one prompt, each with its own draw of the seed (as serve's n)


@dataclass
class ChatConfig(SampleConfig):
    """`homellm chat`: sampling settings (slash commands change them mid-chat) and the system prompt."""
    system: str = ""  # the system prompt: kept when old turns leave the context; /system changes it


@dataclass
class CompareConfig(SampleConfig):
    """`homellm compare`: the same prompts through two runs, side by side."""
    prompts: str = ""  # a .txt file (one prompt a line), a .jsonl file with a "prompt" field, or a .json array
    out: str = ""  # the Markdown report; default RUN_B/compare.md
    chat: bool | None = None  # wrap every prompt as a user message, or --no-chat: continue it raw; unset: by run
    # (chat runs, sft's and imported ChatML ones, are asked; pretrained ones continue the text)
    max_new_tokens: int = 100  # a table cell's worth
    temperature: float = 0.0  # greedy: differences come from the models, not from the dice


@dataclass
class EvalConfig:
    # arithmetic: exact match; chat-arithmetic: a chat model per phrasing; loss: on --data; exact: your own prompts
    task: str = "auto"  # auto (the quickstart's: its task, other runs: loss), arithmetic, chat-arithmetic, loss, exact
    n: int = 2000  # arithmetic: held-out problems to answer (chat-arithmetic: per phrasing; exact: the first N)
    seed: int = 1  # arithmetic: which held-out problems
    max_digits: int = 2  # arithmetic: 3 tests operands beyond the training range (100-999)
    data: str = ""  # loss: prepared data (the run's own), text, or chats .jsonl (replies); exact: prompt/answer .jsonl
    batches: int = 50  # loss: batches of random val windows to average; 0 = the whole val split once (raw text: 0)
    text_field: str = "text"  # loss on raw text: the .jsonl field that holds it
    encoding: str = "auto"  # loss on raw text: of .txt files (auto: UTF-8, or Shift_JIS detected)
    aozora: bool = False  # loss on raw text: drop Aozora Bunko's ruby, notes, header and footer
    batch_size: int = 256  # sequences evaluated at once (loss: at most 64 windows of a whole context, for memory)
    checkpoint: str = "best"  # best, last, or a kept step-N
    device: str = "auto"


@dataclass
class ExportConfig:
    out: str = ""  # hf: the folder to write (AutoModelForCausalLM.from_pretrained reads it); gguf: the .gguf file
    format: str = "hf"  # hf: a transformers model folder; gguf: one file for llama.cpp, Ollama, LM Studio
    checkpoint: str = "best"  # best, last, or a kept step-N
    dtype: str = "float32"  # the weights' type: float32, or float16 (and, for hf, bfloat16) for half the size


@dataclass
class ImportConfig:
    out: str = ""  # the run folder to write
    context: int = 0  # cut the model's context to N positions (Llama 3's 131,072 makes big RoPE tables); 0 = as trained


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class SFTConfig:
    init: str = ""  # the trained run to fine-tune (pretrained, or an earlier SFT)
    init_checkpoint: str = "best"  # which checkpoint of --init: best, last, or a kept step-N
    data: list[str] = field(default_factory=list)  # .jsonl/.json files, folders or hf:NAME: OpenAI, ShareGPT,
    # Alpaca or prompt/completion records
    max_conversations: int = 0  # read at most this many (0 = all): a sample of a large hub dataset
    val_fraction: float = 0.05  # conversations held out for the val loss
    pack: bool = True  # several whole conversations per row (fast); --no-pack pads one conversation per row
    overlong: str = "truncate"  # conversations longer than the context: truncate or skip (both are counted)
    skip_bad: bool = False  # skip malformed lines and conversations (counted) instead of stopping at the first
    lora_rank: int = 0  # > 0: train low-rank adapters of this rank instead of all weights (saved small)
    lora_alpha: float = 16.0  # LoRA scale alpha / rank
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))  # linear layers given adapters


@dataclass
class QuickstartConfig:
    out: str = "runs/quickstart"  # the run directory
    max_time: float = 600.0  # wall-clock seconds for the whole quickstart; training gets what data and eval leave
    # 0: 500,000 per 10 minutes (what 2 CPU cores train on in that time), at most 500,000 (every figure measured)
    problems: int = 0  # training problems to generate; 0 = in proportion to --max-time
    n: int = 2000  # held-out problems in the final evaluation
    seed: int = 0
    device: str = "auto"
    chat: bool = False  # add an SFT stage (a fifth of the training time) so the model can be chatted with
    chat_problems: int = 0  # --chat: conversations to fine-tune on; 0 = 50,000 per 10 minutes of --max-time
    resume: bool = False  # train the run in --out further, for --max-time more (its schedule stretches to the end)


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"  # loopback: only this machine can connect; 0.0.0.0 opens it to the network (set a key)
    port: int = 8000  # 0 picks a free port (printed at start)
    api_key: str = ""  # when set, requests must send `Authorization: Bearer KEY`; empty = no key needed
    max_batch: int = 32  # sequences decoded together in one batched step: each holds a KV-cache row of the context
    max_queue: int = 64  # sequences waiting for a free row; beyond that requests get 503 (at capacity)
    threads: int = 0  # CPU threads for the model's math; 0 = all cores but one, which is left to HTTP and streaming
    cors: list[str] = field(default_factory=list)  # web origins whose pages may call the API (https://app.example, *)
    checkpoint: str = "best"  # best, last, or a kept step-N
    device: str = "auto"
    dtype: str = "auto"  # the weights': auto = bfloat16 on a recent CUDA GPU (float16 before Ampere), else float32


# What each numeric or named field accepts, by field name across the config classes (a name means the same in
# every class that has it): a test and the end of the one-line error, "--top-p 1.5: must be between 0 and 1".
def _between(lo: float, hi: float, hi_open: bool = False) -> tuple[Callable[[Any], bool], str]:
    return ((lambda v: lo <= v < hi) if hi_open else (lambda v: lo <= v <= hi)), \
        f"must be at least {lo} and {'below' if hi_open else 'at most'} {hi}"


SEED_LIMIT = 2**63  # seeds reach numpy (no negatives) and torch (64 bits)
_POSITIVE = (lambda v: v > 0, "must be positive")
_NOT_NEGATIVE = (lambda v: v >= 0, "must be 0 or more")
_AT_LEAST_1 = (lambda v: v >= 1, "must be 1 or more")


def checkpoint_name_ok(name: str) -> bool:
    """best, last, or a step-N folder that `--keep-every` kept."""
    return name in ("best", "last") or re.fullmatch(r"step-\d+", name) is not None


_CHECKPOINT = (checkpoint_name_ok, "is unknown: use best, last or a kept step-N (see `homellm info RUN`)")


def check_checkpoint_name(name: str) -> None:
    """--checkpoint's value, for the verbs that take it as a plain argument (merge, export)."""
    if not checkpoint_name_ok(name):
        raise HomeLLMError(f"--checkpoint {name!r} {_CHECKPOINT[1]}")


_TOKENIZER_KIND = (lambda v: v in ("bpe", "char"), "is unknown: use bpe or char")
RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    # model
    "family": (lambda v: v in ("gpt2", "llama"), "is unknown: use gpt2 or llama"),
    "n_layer": _AT_LEAST_1, "n_head": _AT_LEAST_1, "n_embd": _AT_LEAST_1, "vocab_size": _NOT_NEGATIVE,
    "n_kv_head": (lambda v: v >= 0, "must be 0 (as many as --n-head) or more"),
    "block_size": _AT_LEAST_1, "seed": _between(0, SEED_LIMIT, hi_open=True),
    "dropout": _between(0, 1, hi_open=True), "rope_theta": _POSITIVE, "norm_eps": _POSITIVE,
    "intermediate_size": _AT_LEAST_1,
    # training
    "lr": _POSITIVE, "muon_lr": _POSITIVE, "beta1": _between(0, 1, hi_open=True), "beta2": _between(0, 1, hi_open=True),
    "min_lr_ratio": _between(0, 1), "warmup_steps": _NOT_NEGATIVE, "decay_fraction": _between(0, 1),
    "weight_decay": _NOT_NEGATIVE, "grad_clip": _NOT_NEGATIVE, "max_time": _NOT_NEGATIVE, "eval_batches": _AT_LEAST_1,
    "session_time": _NOT_NEGATIVE, "keep_every": _NOT_NEGATIVE, "max_steps": _NOT_NEGATIVE,
    "tokenizer_vocab": _NOT_NEGATIVE,
    "sample_every": _NOT_NEGATIVE, "patience": _NOT_NEGATIVE, "grad_accum": _AT_LEAST_1, "log_every": _AT_LEAST_1,
    "checkpoint_every": _NOT_NEGATIVE, "eval_every": _NOT_NEGATIVE, "epochs": _NOT_NEGATIVE,
    "schedule": (lambda v: v in ("cosine", "wsd"), "is unknown: use cosine or wsd"),
    "optimizer": (lambda v: v in ("adamw", "muon"), "is unknown: use adamw or muon"),
    "split": (lambda v: v in ("document", "position"), "is unknown: use document or position"),
    "tokenizer_kind": _TOKENIZER_KIND, "kind": _TOKENIZER_KIND,
    "shard_tokens": (lambda v: v >= 1000, "must be 1,000 or more: each shard is a file (the default is 100,000,000)"),
    "dtype": (lambda v: v in ("auto", "float32", "bfloat16", "float16"), "is unknown: use auto, float32, bfloat16 or "
              "float16"),
    # (a rule for one config's field, before the field's own: an export writes one type, it picks none)
    "ExportConfig.dtype": (lambda v: v in ("float32", "bfloat16", "float16"), "is unknown: use float32, bfloat16 "
                           "or float16"),
    # sampling
    "max_new_tokens": _AT_LEAST_1, "temperature": _NOT_NEGATIVE, "top_k": _NOT_NEGATIVE, "top_p": _between(0, 1),
    "repetition_penalty": _POSITIVE, "num_beams": _AT_LEAST_1, "num_samples": _AT_LEAST_1, "checkpoint": _CHECKPOINT,
    "init_checkpoint": _CHECKPOINT,
    # fine-tuning, evaluation, serving
    "val_fraction": _between(0, 1, hi_open=True), "lora_rank": _NOT_NEGATIVE, "lora_alpha": _POSITIVE,
    "lora_dropout": _between(0, 1, hi_open=True), "batch_size": _AT_LEAST_1, "batches": _NOT_NEGATIVE,
    "port": _between(0, 65535), "max_batch": _AT_LEAST_1, "max_queue": _NOT_NEGATIVE, "threads": _between(0, 1024),
    "max_chars": _NOT_NEGATIVE, "max_docs": _NOT_NEGATIVE,
    "max_conversations": _NOT_NEGATIVE, "context": _NOT_NEGATIVE, "tokenizer_max_chars": _NOT_NEGATIVE,
    "format": (lambda v: v in ("hf", "gguf"), "is unknown: use hf or gguf"),
    "chat_problems": _NOT_NEGATIVE, "problems": _NOT_NEGATIVE,
    "EvalConfig.n": (lambda v: v >= 1, "must be 1 or more (problems, or lines, to score)"),
    "QuickstartConfig.n": (lambda v: v >= 1, "must be 1 or more (held-out problems to score)"),
    "max_digits": (lambda v: 1 <= v <= 9, "is out of range: use 1 to 9 (training uses 2; 3 tests beyond it)"),
}


def check_ranges(cfg: Any, where: str = "", fix: str = "restore the file homellm wrote") -> None:
    """A one-line error naming the flag and its value for the first field of cfg outside RANGES; or, with `where`
    (a saved config's file and section), the field there, and `fix`."""
    for f in dataclasses.fields(cfg):
        rule = RANGES.get(f"{type(cfg).__name__}.{f.name}", RANGES.get(f.name))
        value = getattr(cfg, f.name)
        name = f"{where}: {f.name}" if where else f"--{f.name.replace('_', '-')}"
        then = f": {fix}" if where else ""
        if isinstance(value, float) and not math.isfinite(value):  # nan passes every comparison; inf most
            raise HomeLLMError(f"{name} {value!r}: must be a finite number{then}")
        if rule is not None and not rule[0](value):
            sep = " " if rule[1].startswith("is ") else ": "  # --lr -1.0: must be ... / --schedule 'x' is unknown
            raise HomeLLMError(f"{name} {value!r}{sep}{rule[1]}{then}")


# Presets: named instances. `tiny` is for tests; `cpu` is the best recipe we measured for a 2-core CPU in
# minutes (bench/README.md); `gpt2-124m` is GPT-2 small for a GPU.
PRESETS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "tiny": (
        dict(family="llama", n_layer=2, n_head=2, n_embd=32, block_size=32),
        dict(batch_size=8, max_steps=20, warmup_steps=2, eval_every=10, eval_batches=2, log_every=5,
             checkpoint_every=10, tokenizer_vocab=300, lr=3e-3),
    ),
    "cpu": (
        dict(family="llama", n_layer=4, n_head=4, n_embd=192, block_size=128),
        dict(batch_size=16, lr=2e-3, warmup_steps=50, max_steps=0, max_time=120.0, eval_every=250,
             eval_batches=20, tokenizer_vocab=1024, weight_decay=0.1, checkpoint_every=250),
    ),
    "arithmetic": (  # the quickstart's recipe for the built-in task (bench/README.md has its measurements)
        dict(family="llama", n_layer=4, n_head=4, n_embd=128, block_size=96),
        dict(batch_size=80, lr=3e-3, optimizer="muon", muon_lr=0.015, warmup_steps=100, max_steps=0, max_time=600.0,
             eval_every=500, eval_batches=8, weight_decay=0.0, checkpoint_every=1000, log_every=50,
             tokenizer_kind="char"),
    ),
    "gpt2-124m": (
        # (no vocab_size: the tokenizer's, padded to a multiple of 64 as homellm pads every vocabulary: GPT-2's
        # 50,257 ids make nanoGPT's 50,304; fixed here, a char tokenizer's 70 ids trained 50,304 rows)
        dict(family="gpt2", n_layer=12, n_head=12, n_embd=768, block_size=1024, bias=True),
        dict(batch_size=16, grad_accum=32, lr=6e-4, warmup_steps=700, max_steps=19_073, eval_every=250,
             eval_batches=5, tokenizer_vocab=50257, compile=True, checkpoint_every=1000),
    ),
}

# What each is, for --help
PRESET_USES = {"tiny": "tests", "cpu": "a 2-core CPU in minutes", "arithmetic": "the quickstart's task",
               "gpt2-124m": "GPT-2 small on GPUs"}

DEFAULT_PRESET = "cpu"  # what `pretrain` uses without --preset (a fresh start; --resume keeps the run's own)

# Training defaults for fine-tuning, below any flag the user gives: a small learning rate (the model already
# knows the language), no weight decay, frequent evaluation. LoRA's adapters start at zero and need more.
SFT_TRAIN = dict(lr=3e-4, warmup_steps=20, max_steps=500, eval_every=100, eval_batches=10, weight_decay=0.0,
                 checkpoint_every=250, batch_size=16, log_every=10)
LORA_LR = 1e-3


def preset(name: str) -> tuple[ModelConfig, TrainConfig]:
    if name not in PRESETS:
        raise HomeLLMError(f"--preset {name!r} is unknown: choose one of {', '.join(PRESETS)}")
    m, t = PRESETS[name]
    return ModelConfig(**m), TrainConfig(**t)


# ---- CLI flags derived from dataclass fields -------------------------------------------------------------

def _field_type(cls: type, f: dataclasses.Field) -> Any:
    return typing.get_type_hints(cls)[f.name]


@functools.cache
def _field_comments(cls: type) -> dict[str, str]:
    """The `# comment` after each field in the class source: the one place a field is explained, so --help
    shows the same words as the code."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # bases first: a subclass that redefines a field has the last word
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        # A comment line that ends in a comma goes on in the comment line right under it
        comments.update({m[1]: " ".join(part.strip() for part in re.split(r"\n[ \t]*#", m[2]))
                         for m in re.finditer(r"^[ \t]+(\w+):[^#\n]*#((?:.*,\n[ \t]*#)*.*)$", source, re.MULTILINE)})
    return comments


def add_flags(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = (),
              defaults: dict[str, Any] | None = None) -> None:
    """Add one `--kebab-case` flag per field of `cls`. Defaults are suppressed, so the namespace holds only
    what the user typed and presets can fill in the rest. `defaults` are the values the verb fills in over the
    class's own (a preset's, fine-tuning's): --help shows what a run gets, not what the class says."""
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp = _field_type(cls, f)
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        default = (defaults or {}).get(f.name, default)
        comment = _field_comments(cls).get(f.name, "")
        help_text = f"{comment} (default: {default!r})".strip().replace("%", "%%")
        if tp in (bool, bool | None):  # (None: neither flag given, the verb decides)
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=help_text)
        elif typing.get_origin(tp) is list:  # "extend": `--input a --input b` is both, as `--input a b` is
            parser.add_argument(flag, nargs="+", action="extend", type=typing.get_args(tp)[0],
                                default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(flag, type=tp, default=argparse.SUPPRESS, help=help_text)


def pick(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The flags the user gave that belong to `cls`."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names}


def replace(cfg: Any, **changes: Any) -> Any:
    """dataclasses.replace that re-derives defaults (n_kv_head, intermediate_size) when their source changes."""
    if isinstance(cfg, ModelConfig):
        base = dataclasses.asdict(cfg)
        if "n_head" in changes and "n_kv_head" not in changes and base["n_kv_head"] == base["n_head"]:
            base["n_kv_head"] = 0
        if ("n_embd" in changes or "family" in changes) and "intermediate_size" not in changes:
            base["intermediate_size"] = 0
        base.update(changes)
        return ModelConfig(**base)
    return dataclasses.replace(cfg, **changes)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


# What a field of each type may hold in a saved config (JSON has no tuples, and writes 3.0 as 3.0 but 3e2 as 300.0).
_JSON_TYPES: dict[Any, tuple[Callable[[Any], bool], str]] = {
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "a whole number"),
    float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    str: (lambda v: isinstance(v, str), "a string"), bool: (lambda v: isinstance(v, bool), "true or false"),
    list[str]: (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings"),
}


def from_dict(cls: type, d: dict[str, Any], where: str = "config") -> Any:
    """A config from a saved dict (a run's config.json section), each field checked for its type and range: a file
    edited by hand, or damaged, gets one line naming the field rather than a traceback deep in the model."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise HomeLLMError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}: remove them")
    hints = typing.get_type_hints(cls)
    for key, value in d.items():
        fits, kind = _JSON_TYPES.get(hints[key], (lambda v: True, ""))
        if not fits(value):
            raise HomeLLMError(f"{where}: {key} is {value!r}, not {kind}: restore the file homellm wrote")
    if cls is TrainConfig:
        # Taken before they had a range, a negative meaning what 0 does (no limit in steps; a char tokenizer's
        # unused vocabulary): such runs still load (review)
        d = {**d, **{k: 0 for k in ("max_steps", "tokenizer_vocab") if isinstance(d.get(k), int) and d[k] < 0}}
    cfg = cls(**d)
    check_ranges(cfg, where)
    if isinstance(cfg, ModelConfig):
        cfg.validate(where)
    return cfg


def save_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temp file, fsync, rename) so a crash never leaves half a file."""
    from homellm.io import atomic_write_bytes

    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode())


def load_json(path: Path) -> Any:
    path = Path(path)
    if not path.exists():
        raise HomeLLMError(f"{path}: not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HomeLLMError(f"{path}: not valid JSON ({e}): restore or delete the file") from None

