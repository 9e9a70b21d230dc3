"""A validated, flattened call of a structured operator, and its evaluation.

Public functions build a :class:`Problem` (validation happens here, once, at
the entry), then :func:`evaluate` routes it: torch tensors and JAX arrays go
through the autodiff rules of :mod:`smoothmax.torch` / :mod:`smoothmax.jax`
(which call the engines through :mod:`smoothmax._dispatch`), every other array
goes straight to its engine.
"""
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _dispatch
from ._array_api import device_kind
from .operators import REG_CODES


# Entries of ``Problem.aux`` that hold one value per batch item (host arrays of
# shape (B,), e.g. lengths), by structure; the others (a band, a graph's
# structure) are shared by the whole batch. Used where a batch is re-shaped
# (the JAX callbacks flatten vmapped dimensions into the batch).
PER_ITEM_AUX = {"dtw": (0, 1), "viterbi": (0,), "dag": ()}


@dataclass(frozen=True, eq=False)
class Problem:
    struct: str          # "dtw", "viterbi" or "dag"
    xp: Any              # the caller's namespace
    backend: str         # numpy, torch, jax, cupy, generic
    device: str          # cpu or cuda
    batch_shape: tuple   # leading dims of theta
    flat_shape: tuple    # (B, ...) shape given to engines
    aux: tuple           # structure-specific engine arguments (host int64 arrays, ints)
    reg: str
    gamma: float

    @property
    def reg_code(self):
        return REG_CODES[self.reg]


def make_problem(struct, theta, xp, backend, batch_ndim, aux, reg, gamma):
    batch_shape = tuple(theta.shape[:batch_ndim])
    B = int(np.prod(batch_shape, dtype=np.int64))
    flat_shape = (B,) + tuple(theta.shape[batch_ndim:])
    return Problem(struct, xp, backend, device_kind(theta, backend), batch_shape, flat_shape,
                   aux, reg, gamma)


def evaluate(problem, op, theta, Z=None):
    """Evaluate ``op`` on the unflattened ``theta``; returns outputs shaped for the caller.

    value -> value (batch_shape); grad -> (value, E); hvp -> Edot;
    decode -> (score, path) with ``path`` per the structure.
    """
    xp = problem.xp
    flat = xp.reshape(theta, problem.flat_shape)
    flatZ = None if Z is None else xp.reshape(Z, problem.flat_shape)
    if problem.backend == "torch":
        from . import torch as _framework
    elif problem.backend == "jax":
        from . import jax as _framework
    else:
        _framework = None
    if _framework is not None:
        out = _framework.apply(problem, op, flat, flatZ)
    else:
        out = _dispatch.run(problem, op, flat, flatZ)
        if op == "value":
            out = out[0]
        elif op == "hvp":
            out = out[2]
    return _unflatten(problem, op, out, theta.shape)


def _unflatten(problem, op, out, theta_shape):
    xp = problem.xp
    bs = problem.batch_shape
    if op == "value":
        return xp.reshape(out, bs)
    if op == "hvp":
        return xp.reshape(out, theta_shape)
    if op == "grad":
        value, E = out
        return xp.reshape(value, bs), xp.reshape(E, theta_shape)
    score, path = out
    return xp.reshape(score, bs), xp.reshape(path, bs + tuple(path.shape[1:]))


@dataclass(frozen=True, eq=False)
class FeatureProblem:
    """A validated call of DTW_Ω between features (``smoothmax.dtw_features``).

    ``x`` (B, NA, d) and ``y`` (B, NB, d) flat; ``la``/``lb`` host int64 (B,);
    ``band`` −1 for none; ``rows``: strip height of the compiled kernel for
    the gradient (rows of R between two checkpoints); ``progress``: a
    callable ``(rows_done)`` or None.
    """
    xp: Any
    backend: str
    device: str
    batch_shape: tuple
    NA: int
    NB: int
    d: int
    la: Any
    lb: Any
    band: int
    cost: str
    reg: str
    gamma: float
    rows: int
    progress: Any = None

    @property
    def reg_code(self):
        return REG_CODES[self.reg]
