"""`homellm info RUN`: what a run is, as tables: architecture, parameters per module, data, checkpoints."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from homellm.checkpoint import BASE_WEIGHTS, kept_steps, read_config, read_lora, run_data, verify_checkpoint
from homellm.config import load_json
from homellm.errors import HomeLLMError
from homellm.io import display_width
from homellm.model import GPT


def table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    """A plain-text table with aligned columns (numbers right-aligned)."""
    cells = [header, *rows]
    # In terminal columns: a category named in Japanese takes two per character
    widths = [max(display_width(str(r[i])) for r in cells) for i in range(len(header))]

    def fmt(row: tuple[str, ...]) -> str:
        pads = [" " * (w - display_width(str(c))) for c, w in zip(row, widths)]
        return "  ".join(pad + str(c) if str(c).replace(",", "").replace(".", "").lstrip("-").isdigit()
                         else str(c) + pad for c, pad in zip(row, pads)).rstrip()

    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *map(fmt, rows)])


def parameter_groups(model: GPT) -> list[tuple[str, int]]:
    """Parameters per module kind, each tensor counted once (tied embeddings once)."""
    groups: dict[str, int] = defaultdict(int)
    for name, p in model.named_parameters():  # named_parameters skips the tied duplicate
        parts = name.split(".")
        key = f"layers.*.{'.'.join(parts[2:-1])}" if parts[0] == "layers" else ".".join(parts[:-1])
        groups[key] += p.numel()
    return list(groups.items())


def loss_plot(records: list[dict], width: int = 64, height: int = 10) -> str:
    """The run's loss against its steps as text: train loss `·` at each log step, val loss `o` (over it) at each
    evaluation; "" with fewer than two points. A terminal shows it where the run is, without a plotting library."""
    train = [(r["step"], r["train_loss"]) for r in records if isinstance(r.get("train_loss"), int | float)]
    val = [(r["step"], r["val_loss"]) for r in records if isinstance(r.get("val_loss"), int | float)]
    points = [(s, v) for s, v in train + val if isinstance(s, int) and math.isfinite(v)]
    if len(points) < 2:
        return ""
    first, last = min(s for s, _ in points), max(s for s, _ in points)
    lo, hi = min(v for _, v in points), max(v for _, v in points)
    grid = [[" "] * width for _ in range(height)]
    for mark, series in (("·", train), ("o", val)):
        for step, value in series:
            if isinstance(step, int) and math.isfinite(value):
                col = round((step - first) / max(last - first, 1) * (width - 1))
                row = round((hi - value) / (hi - lo) * (height - 1)) if hi > lo else height - 1
                grid[row][col] = mark
    # Enough digits that the two ends differ: a narrow range (10.81 to 10.84) read "10.8" at both.
    digits = next((d for d in range(3, 10) if f"{hi:.{d}g}" != f"{lo:.{d}g}"), 3)
    labels = [f"{hi:.{digits}g}" if i == 0 else f"{lo:.{digits}g}" if i == height - 1 else "" for i in range(height)]
    pad = max(map(len, labels))
    lines = [f"{label:>{pad}} |{''.join(row)}".rstrip() for label, row in zip(labels, grid)]
    steps = f"step {first:,}"
    lines += [f"{'':>{pad}} +{'-' * width}", f"{'':>{pad}}  {steps}{f'{last:,}':>{width - len(steps)}}"]
    return "\n".join(["loss (· train, o val)", *lines])


def read_metrics(run: Path) -> list[dict]:
    """metrics.jsonl's records; a line cut short (a kill mid-write) or not an object is skipped."""
    records = []
    try:
        lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _tokenizer(run: Path, rows: int) -> str:
    """The tokenizer's kind and ids, and what of the model's rows are padding (to a multiple of 64): "vocabulary 320"
    alone read as the tokenizer's size for a BPE of 300."""
    from homellm.tokenizer import Tokenizer

    try:
        tok = Tokenizer.load(run)
    except HomeLLMError as e:  # (the rest of the report stands without it)
        return f"unreadable ({e})"
    padding = rows - tok.vocab_size
    return f"{tok.kind}, {tok.vocab_size:,} ids" + (f" (+{padding} rows of padding)" if padding > 0 else "")


def describe(run: str | Path) -> str:
    run = Path(run)
    mcfg, tcfg = read_config(run)
    model = GPT(mcfg)
    arch = [
        ("family", mcfg.family), ("layers", str(mcfg.n_layer)), ("heads (query / key-value)",
                                                                  f"{mcfg.n_head} / {mcfg.n_kv_head}"),
        ("width", str(mcfg.n_embd)), ("head size", str(mcfg.n_embd // mcfg.n_head)),
        ("MLP width", str(mcfg.intermediate_size)), ("context (block size)", str(mcfg.block_size)),
        ("vocabulary", str(mcfg.vocab_size)), ("tokenizer", _tokenizer(run, mcfg.vocab_size)),
        ("positions", "learned" if mcfg.family == "gpt2" else f"RoPE (theta {mcfg.rope_theta:g})"),
        ("norm", "LayerNorm" if mcfg.family == "gpt2" else "RMSNorm"),
        ("MLP", "GELU" if mcfg.family == "gpt2" else "SwiGLU"), ("tied embeddings", str(mcfg.tie_embeddings)),
        ("dropout", str(mcfg.dropout)),
    ]
    total = model.num_params()
    params = [(k, f"{n:,}", f"{100 * n / total:.1f}%") for k, n in parameter_groups(model)]
    params += [("total", f"{total:,}", "100.0%"),
               ("non-embedding (output layer counted)", f"{model.num_params(embeddings=False):,}", ""),
               ("training FLOPs per token", f"{model.flops_per_token():,}", "")]
    out = [f"run {run}", "", table(arch, ("architecture", "")), "", table(params, ("parameters", "count", "share"))]
    ckpts = []
    for name in ("last", "best", *kept_steps(run)):  # (step-N: kept by --keep-every, weights only)
        if not (run / name).exists():
            continue
        try:  # the weights' checksum too: a checkpoint that would not load must not look fine here
            kept = name.startswith("step-")  # checked when loaded: a run may keep many
            info = verify_checkpoint(run / name, need_state=False, checksums=not kept)
            state = "kept (checked when loaded)" if kept else "ok"
        except HomeLLMError as e:
            ckpts.append((name, "-", "-", "-", "-", f"not usable: {e}"))
            continue
        val = info.get("val_loss")
        ckpts.append((name, f"{info['step']:,}", f"{info.get('tokens', 0):,}",
                      f"{val:.4f}" if val is not None else "-",
                      f"{info['val_bpb']:.4f}" if info.get("val_bpb") is not None else "-", state))
    headers = ("checkpoint", "step", "tokens", "val loss", "val bits/byte", "state")
    out += ["", table(ckpts, headers) if ckpts else "checkpoints: none yet (train the run to write them)"]
    if plot := loss_plot(read_metrics(run)):
        out += ["", plot]
    cfg = load_json(run / "config.json")
    if "data_meta" in cfg:
        m = cfg["data_meta"]
        # Runs trained on a task's own batches (the quickstart) record tokens only, not documents or the split.
        split = (f"val: {' '.join(m.get('val_inputs', []))}" if m.get("split") == "inputs"
                 else f"split by {m.get('split', '?')}")
        docs = f" from {m['documents']:,} document{'s' * (m['documents'] != 1)} ({split})" if "documents" in m else ""
        where = run_data(run, cfg.get("data_dir")) or cfg.get("data_dir")
        out += ["", f"data {where}: {m['train_tokens']:,} train / {m['val_tokens']:,} val tokens{docs}"]
    if "imported_from" in cfg:  # trained elsewhere: its saved training settings are defaults nothing ran with
        out += [f"imported from {cfg['imported_from']} (`homellm import`): trained elsewhere"]
    else:
        out += [f"training: {tcfg.optimizer}, lr {tcfg.lr:g}, batch {tcfg.batch_size} x {tcfg.grad_accum} "
                f"accumulation, schedule {tcfg.schedule}, seed {tcfg.seed}"
                f"{f'; pretrained further from {tcfg.init}' if tcfg.init else ''}"]
        # Where a relay stands: what ends the run, and each session (not of a merged run: nothing resumes it, and
        # the limits were its LoRA run's)
        ends = [f"--max-steps {tcfg.max_steps:,}"] * (tcfg.max_steps > 0) + [f"--max-time {tcfg.max_time:g}"] * (
            tcfg.max_time > 0)
        if "merged_from" not in cfg:
            out += [f"ends at {' or '.join(ends) or 'nothing set'}{', whichever comes first' * (len(ends) > 1)}"
                    + (f"; sessions of --session-time {tcfg.session_time:g}" if tcfg.session_time > 0 else "")]
    if "sft" in cfg:  # what a fine-tuned run began from, and on what
        d = cfg.get("sft_data", {})
        # What the data lost too: a run whose conversations were nearly all too long trained on almost nothing.
        lost = [f"{d[k]:,} {what}" for k, what in (("truncated", "truncated"), ("skipped", "skipped as too long"),
                                                   ("bad_lines_skipped", "bad lines skipped"),
                                                   ("duplicates_dropped", "duplicates dropped"))
                if isinstance(d.get(k), int) and d[k] > 0]
        out += [f"fine-tuned from {cfg['sft'].get('init')} on {' '.join(cfg['sft'].get('data', []))}: "
                f"{d.get('conversations', 0):,} conversations ({d.get('val_conversations', 0):,} held out"
                f"{'; ' * bool(lost)}{', '.join(lost)})"]
    if lora := read_lora(run):  # its files hold the adapters only: every verb merges them into this base
        spec = lora.get("spec", {})
        out += [f"LoRA adapters (rank {spec.get('rank')}, alpha {spec.get('alpha')}, on "
                f"{', '.join(spec.get('targets', []))}) over {lora.get('base')}/{lora.get('base_checkpoint')}"
                f"{' (the run keeps its weights too: base.safetensors)' * (run / BASE_WEIGHTS).is_file()}: "
                "the parameter counts above are the merged model's"]
    if "merged_from" in cfg:
        out += [f"merged from the LoRA run {cfg['merged_from']}"]
    return "\n".join(out)
