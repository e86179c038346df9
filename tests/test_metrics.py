from fractions import Fraction

import pytest
from hypothesis import given, settings, strategies as st

from dsbs_ray.metrics import MAX_DEPTH, MAX_EQUATION_CHARS, accuracy, equation_match, eval_equation


@pytest.mark.parametrize(
    "text, value",
    [
        ("( 84.0 / 2.0 )", Fraction(42)),
        ("(10 - (3 + 6))", Fraction(1)),
        ("-3 * -(2 + .5)", Fraction(15, 2)),
        ("7 / 3 * 3", Fraction(7)),
        ("((1))", Fraction(1)),
        ("+4", Fraction(4)),
    ],
)
def test_known_values(text, value):
    assert eval_equation(text) == value


@pytest.mark.parametrize(
    "text",
    [
        "", " ", "()", "(1 + 2", "1 + 2)", "1 +", "* 2", "2 ** 3", "1 / 0", "(5 - 5) / (2 - 2)",
        "(34 + 40) and (62 - 17)", "__import__('os').system('true')", "x + 1", "1,000 + 1", "3 = 3",
        "1e9", "(" * (MAX_DEPTH + 1) + "1" + ")" * (MAX_DEPTH + 1), "-" * (MAX_DEPTH + 1) + "1",
        "1" * 40, "1+" * MAX_EQUATION_CHARS + "1", None, 42,
    ],
)
def test_rejected(text):
    assert eval_equation(text) is None


def test_equation_match_compares_values_not_strings():
    assert equation_match("(84 / 2)", "( 84.0 / 2.0 )")
    assert equation_match("(2 + 3) * 4", "( 4.0 * ( 3.0 + 2.0 ) )")
    assert not equation_match("(84 / 3)", "( 84.0 / 2.0 )")
    assert not equation_match("(1 / 0)", "(1 / 0)")  # division by zero scores wrong, even against itself
    assert not equation_match("", "")


def test_accuracy():
    assert accuracy(["a", "b", "c", "d"], ["a", "b", "x", "y"], str.__eq__) == 0.5
    assert accuracy(["(1+1)", "(2)"], ["2", "3"], equation_match) == 0.5
    with pytest.raises(ValueError):
        accuracy(["a"], ["a", "b"], str.__eq__)


# --- property tests: random expressions agree with exact rational arithmetic -------------------

# (text, exact value or None for a division by zero, nesting depth as the parser counts it)
numbers = st.one_of(
    st.integers(min_value=0, max_value=10**6).map(lambda n: (str(n), Fraction(n), 0)),
    st.decimals(min_value=0, max_value=10**4, places=3, allow_nan=False, allow_infinity=False).map(
        lambda d: (format(d, "f"), Fraction(d), 0)
    ),
)


def _apply(op, lv, rv):
    if lv is None or rv is None:
        return None
    if op == "+":
        return lv + rv
    if op == "-":
        return lv - rv
    if op == "*":
        return lv * rv
    return None if rv == 0 else lv / rv


def _combine(children):
    def build(op, left, right):
        (ls, lv, ld), (rs, rv, rd) = left, right
        return f"({ls} {op} {rs})", _apply(op, lv, rv), 1 + max(ld, rd)

    def negate(child):
        text, value, depth = child
        return f"-{text}", None if value is None else -value, depth + 1

    return st.one_of(children.map(negate), st.builds(build, st.sampled_from("+-*/"), children, children))


expressions = st.recursive(numbers, _combine, max_leaves=12)


@settings(max_examples=400, deadline=None)
@given(expressions)
def test_random_expressions_match_exact_arithmetic(expr):
    text, expected, depth = expr
    if depth > MAX_DEPTH:
        expected = None  # too deeply nested: rejected by design
    assert eval_equation(text) == expected  # otherwise None exactly when a division by zero occurs


@settings(max_examples=200, deadline=None)
@given(expressions, st.sampled_from([" ", "  ", "\t"]))
def test_whitespace_is_insignificant(expr, space):
    text, expected, depth = expr
    if depth <= MAX_DEPTH:
        assert eval_equation(text.replace(" ", space)) == expected


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_text_never_raises(text):
    value = eval_equation(text)
    assert value is None or isinstance(value, Fraction)
    if any(ch not in "0123456789.+-*/()" and not ch.isspace() for ch in text):  # (re's \s: Unicode whitespace)
        assert value is None


HOSTILE = st.sampled_from(
    ["__import__('os')", "open('/etc/passwd')", "lambda: 0", "[1]*10**9", "9**9**9", "exec", "1;2",
     "globals()", "(1).__class__", "'1'", "x", "1 if 1 else 2", "{}", "True"]
)


@settings(max_examples=200, deadline=None)
@given(expressions, HOSTILE)
def test_hostile_strings_are_rejected_not_run(expr, hostile):
    text, _, _ = expr
    assert eval_equation(f"{text} + {hostile}") is None
    assert eval_equation(f"{hostile}") is None
