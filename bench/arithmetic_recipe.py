"""Recipe experiments for the arithmetic quickstart: the same data, a fixed number of steps, different configs.

    python bench/arithmetic_recipe.py NAME STEPS '{"train": {"optimizer": "muon"}, "model": {"n_layer": 6}, "rows": 96}'

STEPS 0 with "train": {"max_steps": 0, "max_time": 300} trains for 300 s instead; "rows" is the training row length
in tokens (default 40); "packed": true makes each problem of a row its own document;
"mix": {"mul": 2} weights the operators of the training problems (built once per mix); "words": true makes the
LaTeX commands single tokens (arithmetic.WORDS).

Builds 500,000 training problems once in /tmp/expdata, trains the `arithmetic` preset with the changes into
/tmp/exp-NAME and prints one JSON line: seconds, accuracy on 2,000 held-out problems, per operator, final loss."""
import json
import shutil
import sys
import time
from pathlib import Path

from homellm.config import EvalConfig, preset, replace
from homellm.eval import eval_arithmetic
from homellm.quickstart import AnswerBatches, build_data
from homellm.tasks import arithmetic
from homellm.tokenizer import Tokenizer
from homellm.train import train

name, steps = sys.argv[1], int(sys.argv[2])
changes = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
mix = changes.get("mix")  # operator weights of the training problems, e.g. {"mul": 2}
words = arithmetic.WORDS if changes.get("words") else ()  # LaTeX commands as single tokens
data = Path("/tmp/expdata" + ("-" + "-".join(f"{k}{v}" for k, v in sorted(mix.items())) if mix else "")
            + ("-words" if words else ""))
if not (data / "data" / "meta.json").exists():
    build_data(data, 500_000, 0, operator_weights=mix, words=words)
tok = Tokenizer.load(data / "data_tokenizer")
m, t = preset("arithmetic")
m = replace(m, vocab_size=-(-tok.vocab_size // 64) * 64, **changes.get("model", {}))
out = Path(f"/tmp/exp-{name}")
shutil.rmtree(out, ignore_errors=True)
t = replace(t, **{"out": str(out), "max_steps": steps, "max_time": 0, "seed": 1337, "eval_every": 0,
                  **changes.get("train", {})})
t0 = time.time()
# Defaults are the quickstart's recipe before packing and words (rows of 40), so earlier figures reproduce.
rows = AnswerBatches(data / "data", tok, changes.get("rows", 40), t.seed, changes.get("packed", False))
s = train(m, t, rows, tok, extra_config={"task": "arithmetic"})
secs = time.time() - t0
r = eval_arithmetic(out, EvalConfig(n=2000, seed=1, checkpoint="last"), quiet=True)
metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
print(json.dumps({"name": name, "steps": steps, "changes": changes, "train_s": round(secs), "acc": r["accuracy"],
                  "by_op": {k: round(v["accuracy"], 3) for k, v in r["by"]["operator"].items()},
                  "final_loss": metrics[-1].get("train_loss"), "steps_done": s["steps"],
                  "tok_per_s": round(s["tokens"] / max(s["elapsed_s"], 1e-9))}))
