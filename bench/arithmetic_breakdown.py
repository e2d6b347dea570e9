"""Where an arithmetic run's errors are: accuracy by operator crossed with what the operands and answer are.

    python bench/arithmetic_breakdown.py RUN [N]    # N held-out problems (default 2000, seed 1, as `homellm eval`)

`homellm eval` reports each category alone; this crosses them, to show which sub-skill limits a run:
operator x operand kind (int / decimal), operator x answer kind, and multiplication by the significant digits of
its operands with the decimal points removed (-6.4 x 7.9 is the 2 x 2-digit product 64 x 79).
"""
import sys
from collections import defaultdict
from fractions import Fraction

from homellm.checkpoint import load_model
from homellm.eval import greedy_complete, stop_ids
from homellm.tasks import arithmetic
from homellm.tokenizer import Tokenizer


def significant_digits(x: Fraction) -> int:
    """Digits of the operand written without sign, decimal point and leading zeros: 0.07 -> 1, 12.5 -> 3."""
    digits = arithmetic.format_operand(abs(x)).replace(".", "").lstrip("0")
    return max(len(digits), 1)


def table(title: str, rows: dict[str, dict[str, list[int]]]) -> None:
    cols = sorted({c for r in rows.values() for c in r})
    print(f"\n{title}\n| | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols))
    for name, r in rows.items():
        cells = [f"{100 * r[c][0] / r[c][1]:.1f} % of {r[c][1]}" if r[c][1] else "" for c in cols]
        print(f"| {name} | " + " | ".join(cells) + " |")


run, n = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 2000
tok = Tokenizer.load(run)
model = load_model(run, "best", "cpu")
problems = arithmetic.generate(n, 1, split="heldout")
completions = greedy_complete(model, tok, [arithmetic.prompt(p) for p in problems], 32, stop_ids(tok, "$\n"), 256)
by_kind: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
by_answer: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
mul_digits: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
for p, text in zip(problems, completions):
    ok = int(arithmetic.parse_completion(text) == p.result)
    for cell in (by_kind[p.operator][p.kind], by_answer[p.operator][p.answer_kind]):
        cell[0] += ok
        cell[1] += 1
    if p.operator == "mul":
        da, db = sorted((significant_digits(p.a), significant_digits(p.b)))
        cell = mul_digits[f"{da} x {db} digits"]["mul"]
        cell[0] += ok
        cell[1] += 1
print(f"{run}: {n} held-out problems (seed 1), greedy, checkpoint best")
table("operator x operand kind", dict(by_kind))
table("operator x answer kind", dict(by_answer))
table("multiplication by significant digits of the operands", dict(sorted(mul_digits.items())))
