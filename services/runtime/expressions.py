"""Safe arithmetic expressions for derived features (no ``eval`` of user text).

>>> Expression("log1p(a) + 2 * b").evaluate({"a": 0.0, "b": 1.5})
3.0
>>> sorted(Expression("a if a > b else b").names)
['a', 'b']
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable, Mapping

_BINARY: dict[type, Callable] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type, Callable] = {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Not: operator.not_}
_COMPARE: dict[type, Callable] = {
    ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
    ast.Eq: operator.eq, ast.NotEq: operator.ne,
}
FUNCTIONS: dict[str, Callable] = {
    "abs": abs, "min": min, "max": max, "log": math.log, "log1p": math.log1p, "exp": math.exp,
    "sqrt": math.sqrt, "float": float, "int": int,
}


class Expression:
    """A parsed expression over named values. Division by zero and domain errors raise
    ``ArithmeticError`` / ``ValueError`` at evaluation, which ingestion turns into a DLQ reason."""

    def __init__(self, source: str):
        self.source = source
        try:
            tree = ast.parse(source, mode="eval")
        except SyntaxError as exc:
            raise ValueError(f"cannot parse expression {source!r}: {exc.msg}") from None
        self.names: set[str] = set()
        self._check(tree.body)
        self._code = compile(tree, "<expr>", "eval")

    def _check(self, node: ast.AST) -> None:
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            self._check(node.left), self._check(node.right)
        elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            self._check(node.operand)
        elif isinstance(node, ast.BoolOp):
            for value in node.values:
                self._check(value)
        elif isinstance(node, ast.Compare) and all(type(op) in _COMPARE for op in node.ops):
            for value in [node.left, *node.comparators]:
                self._check(value)
        elif isinstance(node, ast.IfExp):
            self._check(node.test), self._check(node.body), self._check(node.orelse)
        elif isinstance(node, ast.Constant) and isinstance(node.value, int | float | bool):
            pass
        elif isinstance(node, ast.Name):
            if node.id in FUNCTIONS:
                raise ValueError(f"{node.id!r} is a function; call it")
            self.names.add(node.id)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in FUNCTIONS and not node.keywords):
            for arg in node.args:
                self._check(arg)
        else:
            raise ValueError(f"unsupported syntax in expression {self.source!r}: {ast.dump(node)[:60]}")

    def evaluate(self, values: Mapping[str, object]) -> object:
        # names were whitelisted at parse time; builtins are removed
        return eval(self._code, {"__builtins__": {}}, {**FUNCTIONS, **values})  # noqa: S307
