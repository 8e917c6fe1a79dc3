"""Derived features: one numba kernel runs the program that ``domain.yaml``'s formulas compiled to,
over the packed numeric vectors of one or many customers (never row-by-row Python)."""

from __future__ import annotations

import functools
import time

import numba
import numpy as np

from engine.features import (
    OP_ABS,
    OP_ADD,
    OP_BUCKET,
    OP_BUCKET_DOWN,
    OP_CLAMP,
    OP_CONST,
    OP_DERIVED,
    OP_DIV,
    OP_EXP,
    OP_LOG,
    OP_MAX,
    OP_MIN,
    OP_MUL,
    OP_NEG,
    OP_SAVE,
    OP_STORED,
    OP_SUB,
    FeatureSchema,
)

DAY_SECONDS = 86_400.0


@numba.njit(cache=True, nogil=True)
def run_program(ops: np.ndarray, args: np.ndarray, cuts: np.ndarray, depth: int, num: np.ndarray,
                today: float, out: np.ndarray) -> None:  # pragma: no cover  (compiled)
    """Fill ``out[i, :]`` with the derived features of ``num[i, :]``; ``today`` in days since 1970-01-01.
    ``cuts`` rows are cut-point lists padded with NaN (no comparison with NaN holds)."""
    stack = np.empty(depth + 1)
    for i in range(num.shape[0]):
        sp = 0
        for k in range(ops.shape[0]):
            op = ops[k]
            if op == OP_CONST:
                stack[sp] = args[k]
                sp += 1
            elif op == OP_STORED:
                stack[sp] = num[i, int(args[k])]
                sp += 1
            elif op == OP_DERIVED:
                stack[sp] = out[i, int(args[k])]
                sp += 1
            elif op == OP_SAVE:
                sp -= 1
                out[i, int(args[k])] = stack[sp]
            elif op == OP_NEG:
                stack[sp - 1] = -stack[sp - 1]
            elif op == OP_EXP:
                stack[sp - 1] = np.exp(stack[sp - 1])
            elif op == OP_LOG:
                x = stack[sp - 1]
                stack[sp - 1] = np.log(x) if x > 0.0 else 0.0
            elif op == OP_ABS:
                stack[sp - 1] = abs(stack[sp - 1])
            elif op == OP_BUCKET or op == OP_BUCKET_DOWN:
                x = stack[sp - 1]
                row = int(args[k])
                s = 1.0
                for c in cuts[row]:
                    if (op == OP_BUCKET and x >= c) or (op == OP_BUCKET_DOWN and x <= c):
                        s += 1.0
                stack[sp - 1] = s
            elif op == OP_CLAMP:
                sp -= 2
                stack[sp - 1] = min(max(stack[sp - 1], stack[sp]), stack[sp + 1])
            else:
                sp -= 1
                a, b = stack[sp - 1], stack[sp]
                if op == OP_ADD:
                    stack[sp - 1] = a + b
                elif op == OP_SUB:
                    stack[sp - 1] = a - b
                elif op == OP_MUL:
                    stack[sp - 1] = a * b
                elif op == OP_DIV:
                    stack[sp - 1] = a / b if b != 0.0 else 0.0
                elif op == OP_MIN:
                    stack[sp - 1] = min(a, b)
                elif op == OP_MAX:
                    stack[sp - 1] = max(a, b)
                else:  # OP_DAYS_SINCE: a is the date, b the fallback
                    stack[sp - 1] = b if np.isnan(a) else today - a


class Kernel:
    """A schema's program as arrays, ready for ``run_program``."""

    def __init__(self, schema: FeatureSchema) -> None:
        program = schema.program
        self.width = len(schema.derived)
        self.ops = np.array([op for op, _ in program.code], dtype=np.int64)
        self.args = np.array([arg for _, arg in program.code], dtype=np.float64)
        longest = max((len(c) for c in program.cuts), default=1)
        self.cuts = np.full((max(len(program.cuts), 1), longest), np.nan)
        for row, points in enumerate(program.cuts):
            self.cuts[row, : len(points)] = points
        self.depth = program.depth

    def __call__(self, num: np.ndarray, now: float | None = None) -> np.ndarray:
        """Derived features for one stored vector (1-D) or many (2-D), float64; ``now`` (epoch seconds,
        default the real clock) is the moment ``days_since`` counts to."""
        rows = np.atleast_2d(np.asarray(num, dtype=np.float64))
        out = np.zeros((rows.shape[0], self.width), dtype=np.float64)
        today = (time.time() if now is None else now) / DAY_SECONDS
        run_program(self.ops, self.args, self.cuts, self.depth, rows, today, out)
        return out[0] if np.ndim(num) == 1 else out


@functools.lru_cache(maxsize=16)
def kernel(schema: FeatureSchema) -> Kernel:
    """The kernel of ``schema`` (built once per schema object: a schema hashes by identity)."""
    return Kernel(schema)


def derive(num: np.ndarray, schema: FeatureSchema, now: float | None = None) -> np.ndarray:
    """Derived features of ``schema`` for one stored vector (1-D) or many (2-D); float64."""
    return kernel(schema)(num, now)
