"""Workflow parameters: values that a preset derives from a few named numbers.

A workflow may declare top-level ``parameters`` (``{diameter_um: 8}``) and write any step
parameter as an arithmetic expression of them, a string that starts with ``=``::

    parameters: {diameter_um: 8}
    steps:
      - {name: smooth, function: gaussian, parameters: {sigma_um: "=0.05 * diameter_um"}}

Expressions are evaluated when the workflow is loaded, before the step parameters are
checked, so an expression that gives a bad value is reported like a bad literal. Only
numbers, the declared names, ``+ - * / // % **``, parentheses and ``min``/``max``/``abs``
are allowed: nothing else of Python is reachable.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["evaluate", "is_expression", "substitute"]

_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.USub: operator.neg, ast.UAdd: operator.pos}
_FUNCTIONS: dict[str, Callable[..., Any]] = {"min": min, "max": max, "abs": abs}


def is_expression(value: Any) -> bool:
    """Whether ``value`` is an expression: a string starting with ``=``."""
    return isinstance(value, str) and value.startswith("=")


def evaluate(text: str, names: Mapping[str, float]) -> float | int:
    """The value of the expression ``text`` (with or without its leading ``=``).

    Parameters
    ----------
    text : str
        E.g. ``"=0.25 * diameter_um"``.
    names : mapping of str to number
        The workflow's parameters.

    Returns
    -------
    float or int
        An int only when every operand is an int and no division makes a float.

    Raises
    ------
    ValueError
        Naming the expression and what is wrong (syntax, an unknown name, a construct
        that is not arithmetic, a non-finite result).
    """
    body = text[1:] if text.startswith("=") else text
    try:
        tree = ast.parse(body.strip(), mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"expression {text!r} is not valid arithmetic ({exc.msg})") from None

    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float) \
                and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in names:
                known = ", ".join(names) or "none declared"
                raise ValueError(f"expression {text!r} uses {node.id!r}, which is no "
                                 f"workflow parameter (parameters: {known})")
            return names[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            return _BINARY[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](ev(node.operand))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id in _FUNCTIONS and not node.keywords and node.args:
            return _FUNCTIONS[node.func.id](*(ev(a) for a in node.args))
        raise ValueError(f"expression {text!r}: only numbers, workflow parameters, "
                         "+ - * / // % **, parentheses and min/max/abs are allowed")

    try:
        value = ev(tree)
    except (ZeroDivisionError, OverflowError) as exc:
        raise ValueError(f"expression {text!r} cannot be evaluated ({exc})") from None
    if not math.isfinite(value):
        raise ValueError(f"expression {text!r} is not a finite number")
    return value


def substitute(value: Any, names: Mapping[str, float]) -> Any:
    """``value`` with every expression in it (also inside lists) evaluated."""
    if is_expression(value):
        return evaluate(value, names)
    if isinstance(value, list | tuple):
        return [substitute(v, names) for v in value]
    return value
