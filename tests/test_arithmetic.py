"""The arithmetic task: exact answers, formatting rules, balanced categories, a leak-free held-out split."""

import hashlib
import itertools
import re
from collections import Counter
from fractions import Fraction

import pytest

from homellm.errors import HomeLLMError
from homellm.tasks.arithmetic import (
    CATEGORIES,
    UNDEFINED,
    Problem,
    answer,
    chars,
    completion,
    corpus_text,
    format_operand,
    format_table,
    generate,
    is_heldout,
    line,
    parse_completion,
    prompt,
    score,
)

INT = re.compile(r"-?(0|[1-9]\d*)")
DECIMAL = re.compile(r"-?(0|[1-9]\d*)\.\d*[1-9]")
FRACTION = re.compile(r"(-?)\\frac\{([1-9]\d*)\}\{([1-9]\d*)\}")
OPERAND = r"-?(?:0|[1-9]\d*)(?:\.\d*[1-9])?"
PROMPT = re.compile(rf"\$({OPERAND}) (\+|-|\\times|\\div) ({OPERAND}|\(-[^()]+\)) =")


@pytest.fixture(scope="module")
def sample() -> list[Problem]:
    return generate(2000, seed=0)


def exact_value(a: Fraction, op: str, b: Fraction) -> Fraction | None:
    return {"+": a + b, "-": a - b, r"\times": a * b, r"\div": a / b if b else None}[op]


def parse_answer(text: str) -> Fraction | None:
    """An answer string back to its value, asserting it is written in canonical form."""
    if text == UNDEFINED:
        return None
    if m := FRACTION.fullmatch(text):
        value = Fraction(int(m[2]), int(m[3]))
        assert value.denominator == int(m[3]) and value.denominator != 1, f"{text} not in lowest terms"
        d = value.denominator
        while d % 2 == 0:
            d //= 2
        while d % 5 == 0:
            d //= 5
        assert d != 1, f"{text} terminates, so it must be written as a decimal"
        return -value if m[1] else value
    assert INT.fullmatch(text) or DECIMAL.fullmatch(text), f"bad answer form {text!r}"
    assert Fraction(text) != 0 or text == "0", f"zero must be written 0, not {text!r}"
    return Fraction(text)


@pytest.mark.parametrize(
    "text",
    [
        r"$-5 - (-3) = -2$",
        r"$4 \times (-2.5) = -10$",
        r"$7 \div 3 = \frac{7}{3}$",
        r"$-7 \div 3 = -\frac{7}{3}$",
        r"$1 \div 0 = \text{undefined}$",
        r"$0.07 \times 0.03 = 0.0021$",
        r"$12 \times 7 = 84$",
        r"$7 \div 2 = 3.5$",
        r"$-1 \div 4 = -0.25$",
        r"$-3 + 3 = 0$",
        r"$0 \times (-5) = 0$",
    ],
)
def test_contract_examples(text: str) -> None:
    a, op, b = PROMPT.match(text).groups()
    p = Problem(a, op, b.strip("()"))
    assert line(p) == text
    assert prompt(p) + completion(p) == text
    assert completion(p) == text[len(prompt(p)) :]


def test_prompt_and_completion_split() -> None:
    p = Problem(12, r"\times", 7)
    assert prompt(p) == r"$12 \times 7 ="
    assert completion(p) == " 84$"
    assert Problem(Fraction(25, 2), "mul", "-2").op == r"\times"


def test_answers_exact_and_canonical() -> None:
    problems = generate(3000, seed=1) + generate(500, seed=2, max_digits=3)
    for p in problems:
        expected = exact_value(p.a, p.op, p.b)
        got = parse_answer(p.result)
        assert got == expected, line(p)
        assert p.result == answer(p.a, p.op, p.b)
        if expected is None:
            assert p.answer_kind == "undefined" and p.op == r"\div" and p.b == 0
        elif expected.denominator == 1:
            assert p.answer_kind == "int" and INT.fullmatch(p.result)
        elif "frac" in p.result:
            assert p.answer_kind == "fraction"
        else:
            assert p.answer_kind == "decimal"
            # Shortest: one place fewer would no longer be exact.
            places = len(p.result.split(".")[1])
            assert (expected * 10 ** (places - 1)).denominator != 1


def test_answer_edge_cases() -> None:
    assert answer("0.1", "+", "0.2") == "0.3"
    assert answer(5, "-", 5) == "0"
    assert answer(-3, r"\times", 0) == "0"
    assert answer(0, r"\div", -7) == "0"
    assert answer(0, r"\div", 0) == UNDEFINED
    assert answer("2.5", "div", "0.5") == "5"
    assert answer(1, r"\div", 3) == r"\frac{1}{3}"
    assert answer(-6, r"\div", -9) == r"\frac{2}{3}"
    assert answer(10, r"\div", -4) == "-2.5"
    with pytest.raises(HomeLLMError):
        answer(1, "%", 2)
    with pytest.raises(HomeLLMError):
        answer("abc", "+", 2)


def test_format_operand() -> None:
    assert format_operand(Fraction(25, 2)) == "12.5"
    assert format_operand("0.070") == "0.07"
    assert format_operand(-3) == "-3"
    assert format_operand(Fraction(-1, 4)) == "-0.25"
    with pytest.raises(HomeLLMError):
        format_operand(Fraction(1, 3))


def test_formatting_rules(sample: list[Problem]) -> None:
    for p in sample:
        text = prompt(p)
        m = PROMPT.fullmatch(text)
        assert m, text
        a, op, b = m.groups()
        assert op == {"add": "+", "sub": "-", "mul": r"\times", "div": r"\div"}[p.operator]
        assert (p.b < 0) == b.startswith("("), text
        assert Fraction(a) == p.a and Fraction(b.strip("()")) == p.b
        assert line(p) == f"{text} {p.result}$"
        assert "  " not in line(p)


def operand_ok(x: Fraction, max_digits: int) -> bool:
    text = format_operand(x).lstrip("-")
    whole, _, places = text.partition(".")
    significant = (whole + places).lstrip("0")
    return len(places) <= 2 and len(significant) <= 3 and len(whole) <= max_digits and abs(x) < 10**max_digits


def test_operand_constraints(sample: list[Problem]) -> None:
    operands = [x for p in sample for x in (p.a, p.b)]
    assert all(operand_ok(x, 2) for x in operands)
    ints = [x for x in operands if x.denominator == 1]
    assert {abs(x) for x in ints} == set(range(100))
    assert any(x < 0 for x in ints) and any(x < 0 and x.denominator != 1 for x in operands)
    assert any(x.denominator == 100 and abs(x) > 1 for x in operands)  # 3.75-like
    assert any(x.denominator == 10 and abs(x) > 10 for x in operands)  # 12.5-like
    assert any(x.denominator == 100 and abs(x) < 1 for x in operands)  # 0.75-like
    # 0.07-like operands are about 1 in 400 decimal operands, so look in a larger sample.
    assert any(abs(p.a) < Fraction(1, 10) and p.a.denominator == 100 for p in generate(10_000, seed=0))
    kinds = [p.kind for p in sample]
    assert 0.2 < kinds.count("decimal") / len(kinds) < 0.4


def test_every_category_combination_occurs(sample: list[Problem]) -> None:
    seen = {(p.operator, p.digits, p.signs) for p in sample}
    expected = set(
        itertools.product(["add", "sub", "mul", "div"], ["1-1", "1-2", "2-1", "2-2"], ["++", "+-", "-+", "--"])
    )
    assert seen == expected
    assert {(p.operator, p.kind) for p in sample} == set(
        itertools.product(["add", "sub", "mul", "div"], ["int", "decimal"])
    )
    assert {p.answer_kind for p in sample} == {"int", "decimal", "fraction", "undefined"}
    share = {k: sum(p.answer_kind == k for p in sample) / len(sample) for k in ("fraction", "undefined")}
    assert share["fraction"] > 0.02 and share["undefined"] > 0.01, share


def test_labels_derived_from_values() -> None:
    p = Problem("-0.07", r"\div", 12)
    assert (p.operator, p.digits, p.signs, p.kind, p.answer_kind) == ("div", "1-2", "-+", "decimal", "fraction")
    q = Problem(0, "-", -99)
    assert (q.digits, q.signs, q.kind, q.result) == ("1-2", "+-", "int", "99")


def test_split_never_overlaps() -> None:
    train = {prompt(p) for seed in (0, 1, 2) for p in generate(3000, seed=seed)}
    heldout = {prompt(p) for seed in (0, 1, 2) for p in generate(300, seed=seed, split="heldout")}
    assert train and heldout and not train & heldout
    assert all(is_heldout(p) for p in generate(200, seed=5, split="heldout", max_digits=3))
    assert not any(is_heldout(p) for p in generate(1000, seed=5, max_digits=3))
    # 0 / 0 (where "0 over anything is 0" meets "anything over 0 is undefined") is trained, never held out.
    zero_by_zero = [p for p in generate(20_000, seed=0) if p.a == 0 and p.b == 0 and p.op == r"\div"]
    assert zero_by_zero and line(zero_by_zero[0]) == r"$0 \div 0 = \text{undefined}$"
    assert not any(p.a == 0 and p.b == 0 for p in generate(2_000, seed=0, split="heldout") if p.op == r"\div")


def test_deterministic_by_seed() -> None:
    assert [line(p) for p in generate(300, seed=7)] == [line(p) for p in generate(300, seed=7)]
    assert [line(p) for p in generate(300, seed=7)] != [line(p) for p in generate(300, seed=8)]
    assert generate(0, seed=0) == []


def test_problems_never_change() -> None:
    """Accuracies in bench/README.md compare because they were measured on these problems: the quickstart's first
    training lines and the evaluation's default held-out set (n 2000, seed 1) stay exactly as they are, whatever
    the code does. Changed twice, on purpose (2026-11-30): `0 \\div 0` moved into training, and the 15 held-out
    problems it was became the next ones drawn (see is_heldout); then held-out problems became distinct, a repeat
    being replaced by the next new problem drawn (the set had 1,633 different problems in 2,000)."""
    assert corpus_text(generate(3, seed=0)) == "$-48 \\div 5 = -9.6$\n$-9 - (-87) = 78$\n$70 - 8 = 62$"
    for n, seed, split, digest in [(2000, 1, "heldout", "bf0f3903cae50c0218fa1cea04c819bcb5dc49a3"),
                                   (5000, 0, "train", "42f02853c88e6bb1221c86244a4a6a1e6cfd42c4")]:
        assert hashlib.sha1(corpus_text(generate(n, seed, split=split)).encode()).hexdigest() == digest


def test_max_digits_three() -> None:
    problems = generate(1000, seed=3, max_digits=3)
    operands = [x for p in problems for x in (p.a, p.b)]
    assert all(operand_ok(x, 3) for x in operands)
    big = [x for x in operands if abs(x) >= 100]
    assert big and all(x.denominator == 1 and abs(x) <= 999 for x in big)
    assert {p.digits for p in problems} == {f"{i}-{j}" for i in (1, 2, 3) for j in (1, 2, 3)}


def test_operator_weights_tilt_the_mix_and_keep_the_split() -> None:
    tilted = generate(4000, seed=4, operator_weights={"mul": 3, "add": 0})
    counts = Counter(p.operator for p in tilted)
    assert counts["add"] == 0
    assert 2.5 < counts["mul"] / counts["sub"] < 3.5 and 0.8 < counts["div"] / counts["sub"] < 1.2
    assert not any(is_heldout(p) for p in tilted)
    assert Counter(p.operator for p in generate(4000, seed=4, operator_weights={"mul": 3})) != counts
    assert {p.operator for p in generate(200, seed=4, operator_weights={"add": 0, "sub": 0})} == {"mul", "div"}
    assert generate(50, seed=4, operator_weights={}) == generate(50, seed=4, operator_weights={"add": 1})


def test_generate_rejects_bad_arguments() -> None:
    zero = dict.fromkeys(("add", "sub", "mul", "div"), 0)
    for kwargs in ({"split": "test"}, {"max_digits": 0}, {"n": -1}, {"operator_weights": {"pow": 2}},
                   {"operator_weights": {"mul": -1}}, {"operator_weights": zero}):
        with pytest.raises(HomeLLMError):
            generate(**{"n": 10, "seed": 0, **kwargs})


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        (" 84$", "84"),
        (" 84$ garbage $7 + 1 = 8$", "84"),
        ("84$", None),  # the contract's completion is ` 84$`: exactly one space first, none before the `$`
        ("  84$", None),
        (" 84 $", None),
        (r" -\frac{7}{3}$", r"-\frac{7}{3}"),
        (r" \text{undefined}$", UNDEFINED),
        (" 84.0$", "84.0"),
        ("", None),
        (" 84", None),
        (" $", None),
        (" abc$", None),
        (" 8\n4$", None),
        (" 8 4$", None),
        ("$$$", None),
        (None, None),
    ],
)
def test_parse_completion(text: str, parsed: str | None) -> None:
    assert parse_completion(text) == parsed


def test_score_right_wrong_malformed() -> None:
    problems = [Problem(12, r"\times", 7), Problem(7, r"\div", 3), Problem(1, r"\div", 0), Problem("0.5", "+", 1)]
    completions = [" 84$ extra", " 2.33$", "", r" \text{undefined}"]
    result = score(problems, completions)
    assert (result["n"], result["correct"], result["malformed"]) == (4, 1, 2)  # empty, and no closing $
    assert result["accuracy"] == 0.25
    assert result["by"]["operator"]["mul"] == {"n": 1, "correct": 1, "accuracy": 1.0}
    assert result["by"]["operator"]["div"] == {"n": 2, "correct": 0, "accuracy": 0.0}
    assert list(result["by"]["answer_kind"]) == ["int", "decimal", "fraction", "undefined"]
    assert set(result["by"]) == set(CATEGORIES)
    assert [f["got"] for f in result["failures"]] == [" 2.33$", "", r" \text{undefined}"]
    assert result["failures"][0] == {"prompt": r"$7 \div 3 =", "expected": r"\frac{7}{3}", "got": " 2.33$"}
    table = format_table(result)
    assert "overall" in table and "25.0 %" in table and "malformed outputs: 2" in table
    assert all(len(row) <= 120 for row in table.splitlines())
    # A failure shows what the model wrote: its LaTeX's backslashes single (repr doubled them), a line break visible
    shown = format_table(score([Problem(7, r"\div", 3)], [" -\\frac{7}{3}\n$"]))
    assert shown.endswith("  $7 \\div 3 =  expected \\frac{7}{3}  got ' -\\frac{7}{3}\\n$'")
    from homellm.errors import quoted  # (a tab as \t would read as \times; a terminal's escape codes not sent raw)

    assert quoted("\t\\times\x1b[31m") == "'\\x09\\times\\x1b[31m'"
    # The right value written otherwise than the contract is wrong: 84.0 and 7/2 are not ` 84$` and `\frac{7}{2}`
    # (a score by value would pass the rest); 7/2 is no answer's shape at all.
    other = score([Problem(12, r"\times", 7), Problem(7, r"\div", 2)], [" 84.0$", " 7/2$"])
    assert (other["correct"], other["malformed"]) == (0, 1)
    with pytest.raises(HomeLLMError):
        score(problems, completions[:2])
    # the sample of failures keeps room for malformed outputs after many wrong answers
    many = [Problem(12, r"\times", 7)] * 30
    result = score(many, [" 99$"] * 15 + ["garbage"] * 15)
    assert [f["got"] for f in result["failures"]] == [" 99$"] * 5 + ["garbage"] * 5
    assert [f["got"] for f in score(many[:12], [" 99$"] * 2 + ["x"] * 10)["failures"]] == [" 99$"] * 2 + ["x"] * 8


def test_score_perfect_and_empty(sample: list[Problem]) -> None:
    result = score(sample, [completion(p) for p in sample])
    assert result["accuracy"] == 1.0 and not result["failures"]
    assert all(b["accuracy"] == 1.0 for labels in result["by"].values() for b in labels.values())
    assert score([], [])["accuracy"] == 0.0
    assert "overall" in format_table(score([], []))


def test_corpus_text_and_chars(sample: list[Problem]) -> None:
    text = corpus_text(sample)
    assert text.splitlines() == [line(p) for p in sample]
    assert set(text) | {"\n"} <= set(chars())
    alphabet = chars()
    assert len(set(alphabet)) == len(alphabet)
    for token in (r"\times", r"\div", r"\frac", UNDEFINED):
        assert set(token) <= set(alphabet)
