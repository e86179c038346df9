"""The equation metric (SVAMP, ASDiv) and accuracy; each answer kind's scoring is in dsbs_ray.answers.

Equations are model output, so they are parsed by a small recursive-descent parser over
exact rationals and never handed to Python's `eval`.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Callable, Sequence

MAX_EQUATION_CHARS = 512
MAX_DEPTH = 32
MAX_NUMBER_DIGITS = 32

_TOKEN = re.compile(r"\s*(?:(\d+(?:\.\d*)?|\.\d+)|([-+*/()]))")


def _tokenize(text: str) -> list[str] | None:
    tokens, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            return None
        number, op = m.groups()
        if number is not None and len(number) > MAX_NUMBER_DIGITS:
            return None
        tokens.append(number if number is not None else op)
        pos = m.end()
    return tokens


class _Reject(Exception):
    pass


class _Parser:
    """expr := term (('+'|'-') term)*; term := unary (('*'|'/') unary)*;
    unary := '-' unary | '+' unary | atom; atom := NUMBER | '(' expr ')'."""

    def __init__(self, tokens: list[str]):
        self.tokens, self.i, self.depth = tokens, 0, 0

    def peek(self) -> str | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self) -> str:
        tok = self.peek()
        if tok is None:
            raise _Reject("unexpected end")
        self.i += 1
        return tok

    def enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _Reject("too deep")

    def expr(self) -> Fraction:
        value = self.term()
        while self.peek() in ("+", "-"):
            value = value + self.term() if self.take() == "+" else value - self.term()
        return value

    def term(self) -> Fraction:
        value = self.unary()
        while self.peek() in ("*", "/"):
            op, rhs = self.take(), self.unary()
            if op == "*":
                value = value * rhs
            elif rhs == 0:
                raise _Reject("division by zero")
            else:
                value = value / rhs
        return value

    def unary(self) -> Fraction:
        if self.peek() in ("-", "+"):
            self.enter()
            sign = -1 if self.take() == "-" else 1
            value = sign * self.unary()
            self.depth -= 1
            return value
        return self.atom()

    def atom(self) -> Fraction:
        tok = self.take()
        if tok == "(":
            self.enter()
            value = self.expr()
            if self.take() != ")":
                raise _Reject("unbalanced parenthesis")
            self.depth -= 1
            return value
        if tok[0].isdigit() or tok[0] == ".":
            return Fraction(tok)
        raise _Reject(f"unexpected token {tok!r}")


def eval_equation(text: str) -> Fraction | None:
    """The exact value of an arithmetic expression, or None if it is not one we accept.

    Accepts decimal numbers, + - * /, parentheses and unary signs; rejects anything else,
    anything longer than MAX_EQUATION_CHARS or nested deeper than MAX_DEPTH, and division by zero.
    """
    if not isinstance(text, str) or len(text) > MAX_EQUATION_CHARS:
        return None
    tokens = _tokenize(text)
    if not tokens:
        return None
    parser = _Parser(tokens)
    try:
        value = parser.expr()
    except (_Reject, RecursionError):
        return None
    if parser.peek() is not None:
        return None
    return value


def equation_match(prediction: str, gold: str) -> bool:
    """True when both equations evaluate and have the same value."""
    pred_value, gold_value = eval_equation(prediction), eval_equation(gold)
    return pred_value is not None and gold_value is not None and pred_value == gold_value


def accuracy(predictions: Sequence[str], golds: Sequence[str], match: Callable[[str, str], bool]) -> float:
    """Fraction of predictions that match their gold label (match: a task's, Task.match)."""
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} gold labels")
    if not golds:
        return 0.0
    return sum(match(p, g) for p, g in zip(predictions, golds)) / len(golds)
