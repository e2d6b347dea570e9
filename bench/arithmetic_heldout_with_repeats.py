"""A quickstart run scored on the held-out set as it was drawn before 2026-11-30 (repeats kept), beside the set as it
is now (distinct problems), so figures measured before and after the change compare.

    python bench/arithmetic_heldout_with_repeats.py RUN
"""
import random
import sys

from homellm import eval as evaluation
from homellm.config import EvalConfig
from homellm.tasks import arithmetic


def with_repeats(n: int, seed: int, split: str = "train", max_digits: int = 2, operator_weights=None) -> list:
    """generate() as it was: held-out problems drawn like training ones, a repeat kept."""
    rng, problems = random.Random(seed), []
    while len(problems) < n:
        p = arithmetic._sample(rng, max_digits, None)
        if arithmetic.is_heldout(p) == (split == "heldout"):
            problems.append(p)
    return problems


def main() -> None:
    run = sys.argv[1]
    distinct = arithmetic.generate
    for name, generate in (("distinct (now)", distinct), ("with repeats (before)", with_repeats)):
        arithmetic.generate = generate
        r = evaluation.eval_arithmetic(run, EvalConfig(n=2000, seed=1), quiet=True)
        ops = ", ".join(f"{k} {100 * v['accuracy']:.1f}" for k, v in r["by"]["operator"].items())
        print(f"{name}: {100 * r['accuracy']:.2f} % ({ops})")
    arithmetic.generate = distinct


if __name__ == "__main__":
    main()
