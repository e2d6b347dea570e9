r"""Arithmetic in LaTeX: two operands, one of + - \times \div, and the exact answer the model must write.

A problem is one line such as `$12 \times 7 = 84$`; the model is given the prompt `$12 \times 7 =` and must
complete ` 84$`. Answers are exact: an integer, else the shortest terminating decimal, else a fraction in
lowest terms (`-\frac{7}{3}`), and division by zero is `\text{undefined}`.

    from homellm.tasks.arithmetic import generate, corpus_text, score, format_table
    train = generate(100_000, seed=0)                     # training lines: corpus_text(train)
    test = generate(1_000, seed=1, split="heldout")        # never seen in training, whatever the seeds
    print(format_table(score(test, completions)))          # completions: one model output per problem

Digits: an operand's digit count is the number of digits of its integer part, so 7, 0.07 and 3.75 are
1-digit and 12 and 12.5 are 2-digit. With at most 3 significant digits a 2-digit decimal has one decimal
place and a 3-digit operand (max_digits=3) is always an integer.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction

from homellm.errors import HomeLLMError, quoted

OPERATORS = {"add": "+", "sub": "-", "mul": r"\times", "div": r"\div"}  # label -> LaTeX symbol
SYMBOL_TO_OPERATOR = {symbol: name for name, symbol in OPERATORS.items()}
UNDEFINED = r"\text{undefined}"
CATEGORIES = ("operator", "digits", "signs", "kind", "answer_kind")  # the buckets score() reports
# The LaTeX pieces a character tokenizer can keep whole (TokenizerConfig.words): 15 % fewer tokens per line.
WORDS = (r"\times", r"\div", r"\frac{", "}{", UNDEFINED)

# Bucket display order in score(); labels not listed (digits such as "3-1") sort after, alphabetically.
_LABEL_ORDER = ["add", "sub", "mul", "div", "++", "+-", "-+", "--", "int", "decimal", "fraction", "undefined"]

# About 30% decimal problems: enough for the model to learn the decimal point and place values without
# starving the integer cases that make up most of the space.
_DECIMAL_SHARE = 0.3
# A zero divisor arises naturally in well under 1% of problems; forcing it in 30% of divisions whose
# divisor is a positive 1-digit integer lifts `\text{undefined}` to about 2%, enough to be learned.
_ZERO_DIVISOR_SHARE = 0.3
# Held-out share of the problem space in per mille. Membership hangs on a hash of the prompt text, so no
# seed, sample size or max_digits can ever leak a held-out problem into training.
_HELDOUT_PER_MILLE = 70
_MAX_SIGNIFICANT = 3
_MAX_PLACES = 2

# What parse_completion accepts as an answer at all: any number or fraction shape, canonical or not, so
# `84.0` counts as a wrong answer and only text that is no answer counts as malformed.
_ANSWER_SHAPE = re.compile(r"-?\d+(\.\d+)?|-?\\frac\{\d+\}\{\d+\}|\\text\{undefined\}")


def _exact(x: Fraction | int | str | Decimal | float) -> Fraction:
    """An operand as an exact Fraction; strings such as "12.5" are read exactly, floats by their repr."""
    if isinstance(x, bool):  # bool is an int subclass, and True as an operand is surely a mistake
        raise HomeLLMError(f"operand {x!r} is not a number; use an integer or a decimal such as 12.5")
    if type(x) is Fraction:  # the generator's own operands: no copy (it makes millions)
        return x
    if isinstance(x, (Fraction, int, Decimal)):
        return Fraction(x)
    if isinstance(x, float):
        return Fraction(repr(x))  # 0.1 means one tenth to a person, not the nearest binary float
    if isinstance(x, str):
        try:
            return Fraction(x.strip())
        except ValueError:
            pass
    raise HomeLLMError(f"operand {x!r} is not a number; use an integer or a decimal such as 12.5")


def _operator_name(op: str) -> str:
    if op in OPERATORS:
        return op
    if op in SYMBOL_TO_OPERATOR:
        return SYMBOL_TO_OPERATOR[op]
    raise HomeLLMError(f"unknown operator {op!r}; use one of + - \\times \\div (or add, sub, mul, div)")


def _decimal_places(x: Fraction) -> int | None:
    """Places of the shortest decimal that writes x exactly, or None when x does not terminate.

    A reduced fraction terminates iff its denominator is 2^i * 5^j, and then needs max(i, j) places.
    """
    d, twos, fives = x.denominator, 0, 0
    if d == 1:
        return 0
    while d % 2 == 0:
        d, twos = d // 2, twos + 1
    while d % 5 == 0:
        d, fives = d // 5, fives + 1
    return max(twos, fives) if d == 1 else None


def _decimal(x: Fraction, places: int) -> str:
    # Minimal places means the scaled integer never ends in 0, so there are no trailing zeros to strip.
    digits = str(abs(x.numerator) * 10**places // x.denominator)  # exact: x terminates within `places`
    if places:
        digits = digits.rjust(places + 1, "0")  # 21 with 4 places -> 00021 -> 0.0021
        digits = f"{digits[:-places]}.{digits[-places:]}"
    return f"-{digits}" if x.numerator < 0 else digits  # numerator: Fraction's own < is slow, and this is hot


def format_operand(x: Fraction | int | str | Decimal | float) -> str:
    """An operand as written in a problem: `12`, `-3`, `12.5`, `0.07` (never parenthesised here)."""
    value = _exact(x)
    places = _decimal_places(value)
    if places is None:
        raise HomeLLMError(f"operand {value} is not a terminating decimal; use an integer or a decimal like 12.5")
    return _decimal(value, places)


def _format_result(x: Fraction) -> str:
    places = _decimal_places(x)
    if places is not None:
        return _decimal(x, places)  # covers integers (0 places) and terminating decimals
    sign = "-" if x < 0 else ""
    return f"{sign}\\frac{{{abs(x.numerator)}}}{{{x.denominator}}}"  # Fraction is always in lowest terms


def answer(a: Fraction | int | str, op: str, b: Fraction | int | str) -> str:
    r"""The exact answer string: `8`, `3.5`, `0.0021`, `-\frac{7}{3}` or `\text{undefined}`; zero is `0`."""
    name, x, y = _operator_name(op), _exact(a), _exact(b)
    if name == "add":
        return _format_result(x + y)
    if name == "sub":
        return _format_result(x - y)
    if name == "mul":
        return _format_result(x * y)
    return UNDEFINED if y == 0 else _format_result(x / y)


def _digit_count(x: Fraction) -> int:
    return len(str(abs(x.numerator) // x.denominator))  # digits of the integer part; 0.07 counts as 1


def _answer_kind(result: str) -> str:
    if result == UNDEFINED:
        return "undefined"
    if "frac" in result:
        return "fraction"
    return "decimal" if "." in result else "int"


@dataclass
class Problem:
    r"""One problem; the labels after `b` are derived from a, op and b, so they can never disagree with them.

    Problem("12.5", r"\times", -2) or Problem(Fraction(25, 2), "mul", Fraction(-2)): strings and ints are
    read exactly into Fractions and an operator label is turned into its LaTeX symbol.
    """

    a: Fraction
    op: str  # LaTeX symbol: + - \times \div
    b: Fraction
    operator: str = field(init=False)  # add, sub, mul, div
    digits: str = field(init=False)  # integer-part digits of a and b: 1-1, 1-2, 2-1, 2-2 (3-x with max_digits=3)
    signs: str = field(init=False)  # ++, +-, -+, --; zero counts as +
    kind: str = field(init=False)  # int, or decimal when at least one operand is not an integer
    answer_kind: str = field(init=False)  # int, decimal, fraction, undefined
    result: str = field(init=False)  # the exact answer string the model must write
    prompt: str = field(init=False, repr=False, compare=False)  # `$12 \times 7 =`, written once: see prompt()

    def __post_init__(self) -> None:
        self.a, self.b = _exact(self.a), _exact(self.b)
        a, b = format_operand(self.a), format_operand(self.b)  # raise for an operand no decimal writes, such as 1/3
        self.operator = _operator_name(self.op)
        self.op = OPERATORS[self.operator]
        if self.b.numerator < 0:
            b = f"({b})"  # `5 - -3` reads as a typo; `5 - (-3)` is how people write it
        self.prompt = f"${a} {self.op} {b} ="
        self.digits = f"{_digit_count(self.a)}-{_digit_count(self.b)}"
        self.signs = ("-" if self.a.numerator < 0 else "+") + ("-" if self.b.numerator < 0 else "+")
        self.kind = "int" if self.a.denominator == 1 and self.b.denominator == 1 else "decimal"
        self.result = answer(self.a, self.op, self.b)
        self.answer_kind = _answer_kind(self.result)


def prompt(p: Problem) -> str:
    r"""What the model is given: `$12 \times 7 =`; a negative second operand is parenthesised."""
    return p.prompt


def completion(p: Problem) -> str:
    """What the model must write after the prompt: ` 84$`."""
    return f" {p.result}$"


def line(p: Problem) -> str:
    r"""The full problem line, `$12 \times 7 = 84$`: one line of training text."""
    return prompt(p) + completion(p)


def corpus_text(problems: Iterable[Problem]) -> str:
    """Training text: one problem line per line."""
    return "\n".join(line(p) for p in problems)


def chars() -> str:
    """Every character the task can produce, sorted: the whole alphabet a character tokenizer needs."""
    return "".join(sorted(set("0123456789$ .-+()=\\{}\n" + "timesdivfractextundefined")))


def is_heldout(p: Problem) -> bool:
    """Whether the problem belongs to the held-out split, decided by a hash of its prompt text alone.

    Except `0 \\div 0`, always in training: it is the one problem where two rules meet (0 divided by anything is 0;
    anything divided by 0 is undefined), so no other problem teaches which wins. Hashed into the held-out split, it
    was never trained, and, as 0 is each 1-digit dividend's equal, about a third of the held-out zero divisors."""
    if p.a == 0 and p.b == 0 and p.op == r"\div":
        return False
    digest = hashlib.sha1(prompt(p).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 1000 < _HELDOUT_PER_MILLE


def _operand(rng: random.Random, digits: int, negative: bool, decimal: bool) -> Fraction:
    # Decimal places must fit in 3 significant digits: 2 places for 1-digit (3.75), 1 for 2-digit (12.5),
    # none from 3 digits on. A 0 integer part is not significant, so 0.07 and 0.75 are fine.
    max_places = min(_MAX_PLACES, _MAX_SIGNIFICANT - digits)
    low = 10 ** (digits - 1) if digits > 1 else 0
    if not decimal or max_places < 1:
        whole = rng.randint(max(low, 1) if negative else low, 10**digits - 1)  # never -0
        return Fraction(-whole if negative else whole)
    whole = rng.randint(low, 10**digits - 1)
    places = rng.randint(1, max_places)
    tail = rng.randrange(10 ** (places - 1)) * 10 + rng.randint(1, 9)  # last place nonzero: 2.5, never 2.50
    value = whole + Fraction(tail, 10**places)
    return -value if negative else value


def _sample(rng: random.Random, max_digits: int, operator_weights: Sequence[float] | None = None) -> Problem:
    # Uniform over operator x digit combo x sign combo, so rare combinations (2-2 division of two negatives)
    # are as frequent as common ones; the decimal kind is drawn on top of that.
    if operator_weights is None:  # choice, not choices: it draws differently, and every seed keeps its problems
        name = rng.choice(list(OPERATORS))
    else:
        name = rng.choices(list(OPERATORS), weights=operator_weights)[0]
    da, db = rng.randint(1, max_digits), rng.randint(1, max_digits)
    na, nb = rng.random() < 0.5, rng.random() < 0.5
    decimal_a = decimal_b = False
    if rng.random() < _DECIMAL_SHARE:
        which = rng.randrange(3)  # a only, b only, or both
        decimal_a, decimal_b = which != 1, which != 0
    a = _operand(rng, da, na, decimal_a)
    if name == "div" and db == 1 and not nb and rng.random() < _ZERO_DIVISOR_SHARE:
        b = Fraction(0)  # only where 0 keeps the drawn labels: a 1-digit, non-negative divisor
    else:
        b = _operand(rng, db, nb, decimal_b)
    return Problem(a, OPERATORS[name], b)


def generate(n: int, seed: int, split: str = "train", max_digits: int = 2,
             operator_weights: dict[str, float] | None = None) -> list[Problem]:
    """n problems, the same for the same arguments; split "train" or "heldout" never share a problem, and the
    held-out ones are all different (training problems may repeat, as drawn).

    max_digits=3 adds operands of 100-999 (always integers) to test generalisation beyond training.
    operator_weights ({"mul": 2}: twice as many multiplications; unnamed operators weigh 1) tilts a training
    mix towards the skills that are slowest to learn; the default is uniform, as held-out problems are.
    """
    weights = None
    if operator_weights is not None:
        weights = [float(operator_weights.get(name, 1.0)) for name in OPERATORS]
        if set(operator_weights) - set(OPERATORS) or min(weights) < 0 or not any(weights):
            raise HomeLLMError(f"operator_weights={operator_weights}: use the names {', '.join(OPERATORS)} with "
                               "weights >= 0, not all 0")
    if split not in ("train", "heldout"):
        raise HomeLLMError(f"unknown split {split!r}; use 'train' or 'heldout'")
    if not 1 <= max_digits <= 9:
        raise HomeLLMError(f"max_digits={max_digits} is out of range; use 1 to 9 (training uses 2)")
    if n < 0:
        raise HomeLLMError(f"n={n} is negative; ask for 0 or more problems")
    rng = random.Random(seed)
    heldout = split == "heldout"
    problems: list[Problem] = []
    seen: set[str] = set()  # held-out problems are distinct: a test set of 2,000 asked `$-7 + (-4) =` 11 times
    while len(problems) < n:
        p = _sample(rng, max_digits, weights)
        if is_heldout(p) == heldout:  # rejection keeps the category balance of both splits
            if heldout:
                if (text := prompt(p)) in seen:
                    continue
                seen.add(text)
            problems.append(p)
    return problems


def parse_completion(text: str) -> str | None:
    """The answer a model wrote: ` 84$ anything` -> `84`; None unless the text starts exactly as the contract's
    completion does: one space, an answer, `$` (what follows, where decoding stops, is not read).

    Never raises: model output can be anything.
    """
    if not isinstance(text, str) or "$" not in text or not text.startswith(" "):
        return None
    head = text[1: text.index("$")]
    return head if _ANSWER_SHAPE.fullmatch(head) else None


def _label_key(label: str) -> tuple[int, str]:
    return (_LABEL_ORDER.index(label), "") if label in _LABEL_ORDER else (len(_LABEL_ORDER), label)


def score(problems: Sequence[Problem], completions: Sequence[str], max_failures: int = 10) -> dict:
    """Exact-match accuracy overall and per category bucket, with counts and the first few failures.

    Returns {"n", "correct", "accuracy", "malformed", "by": {category: {label: {"n", "correct", "accuracy"}}},
    "failures": [{"prompt", "expected", "got"}]}; accuracies are fractions in [0, 1], malformed outputs are
    wrong and "got" holds the raw completion.
    """
    if len(problems) != len(completions):
        raise HomeLLMError(
            f"score got {len(problems)} problems but {len(completions)} completions; pass one per problem"
        )
    buckets: dict[str, dict[str, dict]] = {c: {} for c in CATEGORIES}
    correct = malformed = 0
    wrong: list[dict] = []  # the first failures of each kind: well-formed wrong answers, and malformed outputs
    bad: list[dict] = []
    for p, text in zip(problems, completions):
        got = parse_completion(text)
        ok = got == p.result
        correct += ok
        malformed += got is None
        for c in CATEGORIES:
            bucket = buckets[c].setdefault(getattr(p, c), {"n": 0, "correct": 0})
            bucket["n"] += 1
            bucket["correct"] += ok
        if not ok and len(kind := bad if got is None else wrong) < max_failures:
            kind.append({"prompt": prompt(p), "expected": p.result, "got": text})
    by = {}
    for c, labels in buckets.items():
        by[c] = {}
        for label in sorted(labels, key=_label_key):
            b = labels[label]
            by[c][label] = {"n": b["n"], "correct": b["correct"], "accuracy": b["correct"] / b["n"]}
    # The sample keeps half its room for malformed outputs, which the first wrong answers could crowd out.
    keep_bad = min(len(bad), max(max_failures // 2, max_failures - len(wrong)))
    failures = wrong[:max_failures - keep_bad] + bad[:keep_bad]
    n = len(problems)
    return {
        "n": n,
        "correct": correct,
        "accuracy": correct / n if n else 0.0,
        "malformed": malformed,
        "by": by,
        "failures": failures,
    }


def format_table(result: dict) -> str:
    """A score() result as a plain-text table (category | n | correct | accuracy %) and its failures."""
    rows = [("category", "n", "correct", "accuracy"), ("overall", result["n"], result["correct"], result["accuracy"])]
    for c, labels in result["by"].items():
        rows.append((c, "", "", ""))
        rows += [(f"  {label}", b["n"], b["correct"], b["accuracy"]) for label, b in labels.items()]
    width = max(len(str(r[0])) for r in rows) + 2
    out = []
    for i, (name, n, ok, acc) in enumerate(rows):
        pct = f"{100 * acc:.1f} %" if isinstance(acc, float) else acc
        out.append(f"{name:<{width}}{n:>8}{ok:>9}{pct:>11}".rstrip())
        if i == 0:
            out.append("-" * len(out[0]))  # the header row is full width
    out.append(f"malformed outputs: {result['malformed']}")
    if result["failures"]:
        out.append(f"failures (first {len(result['failures'])}):")
        out += [f"  {f['prompt']}  expected {f['expected']}  got {quoted(f['got'])}" for f in result["failures"]]
    return "\n".join(out)


# ---- the task as chat: natural questions, the canonical LaTeX line as the answer ------------------------------

# Ways people ask, per phrasing and operator. {a} and {b} are plain operands (`-3`, `12.5`); the symbolic and
# Japanese forms parenthesise a negative second operand as the LaTeX does (`5-(-3)`).
PHRASINGS: dict[str, dict[str, list[str]]] = {
    "en": {"add": ["What is {a} plus {b}?", "What is {a} + {b}?", "Add {a} and {b}.", "Calculate {a} + {b}."],
           "sub": ["What is {a} minus {b}?", "What is {a} - {b}?", "Subtract {b} from {a}.", "Calculate {a} - {b}."],
           "mul": ["What is {a} times {b}?", "What is {a} multiplied by {b}?", "Multiply {a} by {b}.",
                   "Calculate {a} x {b}."],
           "div": ["What is {a} divided by {b}?", "What is {a} / {b}?", "Divide {a} by {b}.",
                   "Calculate {a} / {b}."]},
    "ja": {"add": ["{a}+{b}は？", "{a}たす{b}は？", "{a}と{b}を足すと？"],
           "sub": ["{a}-{b}は？", "{a}ひく{b}は？", "{a}から{b}を引くと？"],
           "mul": ["{a}×{b}は？", "{a}かける{b}は？", "{a}と{b}を掛けると？"],
           "div": ["{a}÷{b}は？", "{a}わる{b}は？", "{a}を{b}で割ると？"]},
    "symbols": {"add": ["{a}+{b}", "{a} + {b}", "{a}+{b}="], "sub": ["{a}-{b}", "{a} - {b}", "{a}-{b}="],
                "mul": ["{a}*{b}", "{a} * {b}", "{a}×{b}"], "div": ["{a}/{b}", "{a} / {b}", "{a}÷{b}"]},
}


def question(p: Problem, phrasing: str, rng: random.Random) -> str:
    """A user's question for the problem in one of PHRASINGS' forms, chosen by rng."""
    if phrasing not in PHRASINGS:
        raise HomeLLMError(f"unknown phrasing {phrasing!r}: use one of {', '.join(PHRASINGS)}")
    b = format_operand(p.b)
    if p.b < 0 and phrasing != "en":
        b = f"({b})"
    return rng.choice(PHRASINGS[phrasing][p.operator]).format(a=format_operand(p.a), b=b)


def conversations(problems: Iterable[Problem], seed: int) -> list[dict]:
    """Chat records ({"messages": [user, assistant]}) cycling through the phrasings; the reply is line(p)."""
    rng = random.Random(seed)
    names = list(PHRASINGS)
    return [{"messages": [{"role": "user", "content": question(p, names[i % len(names)], rng)},
                          {"role": "assistant", "content": line(p)}]} for i, p in enumerate(problems)]


def chat_chars() -> str:
    """The characters of every question form and of the chat roles: with chars(), a char tokenizer's alphabet."""
    text = "".join(t for forms in PHRASINGS.values() for ts in forms.values() for t in ts) + "systemuserassistant"
    return "".join(sorted(set(text.replace("{a}", "").replace("{b}", ""))))


def reply_completion(p: Problem, reply: str) -> str:
    """A chat reply in score()'s terms: the part after the prompt when the reply is the problem's line, else
    the reply marked so that it scores as malformed (a restated problem that differs is wrong, too)."""
    head = prompt(p)
    if reply.startswith(head) and reply.endswith("$"):
        return reply[len(head):]
    return "(not this problem's line) " + reply
