"""Summarize a run's metrics.jsonl for bench/README.md: steps, wall-clock, median tokens/s, last val figures.

    python bench/summarize.py RUN [RUN...]
"""

import json
import statistics
import sys
from pathlib import Path


def summarize(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = [r["tok_per_s"] for r in rows[1:] if "tok_per_s" in r]  # the first log step includes warm-up
    evals = [r for r in rows if "val_loss" in r]
    return {"run": str(run), "steps": rows[-1]["step"], "train_s": rows[-1]["elapsed_s"],
            "median_tok_per_s": round(statistics.median(rates)) if rates else None,
            "val_loss": round(evals[-1]["val_loss"], 4) if evals else None,
            "val_bpb": round(evals[-1]["val_bpb"], 4) if evals else None,
            "best_val_bpb": round(min(r["val_bpb"] for r in evals), 4) if evals else None}


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(json.dumps(summarize(Path(arg))))
