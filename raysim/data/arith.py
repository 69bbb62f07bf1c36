"""``data.source: synthetic:arith``: generated arithmetic prompt/response pairs for ``causal_lm``.

Each example is a prompt such as ``"7*8="`` and the result as the response (``"6"`` with
``modulo: 10``; ``"56"`` with ``modulo: null``). Operators are drawn uniformly from
``data.arith.operators`` (a list: repeating an operator makes it more frequent), both operands
uniformly from ``0..max_operand``. With a modulo the response is Python's ``result % modulo``, always in
``0..modulo-1`` (also for ``-``); without one it is the exact result (negative for ``3-7``).

The ``operator`` column (and the labels, one per distinct operator in sorted order) lets
``data.partition: {scheme: by_column, column: operator}`` give each client its own operator and keeps
the global test split stratified by operator. Everything is drawn from the stream
``default_rng([seed, SYNTHETIC])``.
"""

from __future__ import annotations

import numpy as np

from raysim.data.raw import RawData
from raysim.schema import ArithConfig
from raysim.seeds import SYNTHETIC


def make_arith(cfg: ArithConfig, seed: int) -> RawData:
    """``cfg.num_examples`` arithmetic prompts, their results and their ``operator`` column."""
    rng = np.random.default_rng([seed, SYNTHETIC])
    n = cfg.num_examples
    drawn = np.asarray(cfg.operators)[rng.integers(0, len(cfg.operators), size=n)]
    a = rng.integers(0, cfg.max_operand + 1, size=n)
    b = rng.integers(0, cfg.max_operand + 1, size=n)
    triples = list(zip(a.tolist(), drawn.tolist(), b.tolist()))
    prompts = [f"{x}{op}{y}=" for x, op, y in triples]
    responses = [str(arith_result(op, x, y, cfg.modulo)) for x, op, y in triples]
    names = sorted(set(cfg.operators))
    labels = np.searchsorted(np.asarray(names), drawn).astype(np.int64)
    return RawData(labels=labels, label_names=names, prompts=prompts, responses=responses,
                   columns={"operator": drawn.astype(str)})


def arith_result(op: str, a: int, b: int, modulo: int | None) -> int:
    """``a op b`` (``op`` in ``+ - *``), reduced with Python's ``%`` when ``modulo`` is set."""
    if op == "+":
        value = a + b
    elif op == "-":
        value = a - b
    elif op == "*":
        value = a * b
    else:
        raise ValueError(f"unknown operator {op!r}; allowed: + - *")
    return value if modulo is None else value % modulo
