"""A validated, flattened call of a structured operator, and its evaluation.

Public functions build a :class:`Problem` (validation happens at the entry),
then :func:`evaluate` routes it: arrays of a framework with a registered
adapter (PyTorch, JAX: their modules register themselves with
:func:`register_adapter` when imported) go through that adapter's autodiff
rules, every other array goes straight to its engine
(:mod:`smoothmax._dispatch`). This module imports no framework module: the
package's ``__init__`` registers loaders (:func:`register_adapter_loader`)
that import an adapter the first time an array of its framework arrives.

An adapter is any object with

* ``apply(problem, op, flat_theta, flat_Z)`` -> the outputs of ``op`` on the
  flat arrays (see :func:`evaluate`);
* optionally ``check_values(x, xp, name, forbid)`` and
  ``check_lengths(lengths, batch_shape, maximum, name)``, replacing the host
  checks of :mod:`smoothmax._validation` when the adapter runs them inside its
  operators (PyTorch: so that tracing never branches on data).
"""
from dataclasses import dataclass, replace
from operator import attrgetter
from typing import Any

import numpy as np

from . import _dispatch
from ._array_api import device_kind
from .operators import REG_CODES

# The structure-specific engine arguments, as named fields of Problem, in the
# order of the engines' signatures; those holding one entry per batch item
# (shape (B,): lengths), which follow the batch when it is re-shaped.
STRUCT_FIELDS = {"dtw": ("len_a", "len_b", "band"), "viterbi": ("lengths",),
                 "dag": ("indptr", "parents")}
PER_ITEM_FIELDS = {"dtw": ("len_a", "len_b"), "viterbi": ("lengths",), "dag": ()}
# tuple of the fields, by structure (the per-call path: one C call)
_GETTERS = {s: (lambda g: (lambda p: (g(p),)))(attrgetter(*f)) if len(f) == 1 else attrgetter(*f)
            for s, f in STRUCT_FIELDS.items()}


@dataclass(eq=False, slots=True)
class Problem:
    """One validated call.

    The structure's arguments are fields: ``len_a``, ``len_b`` (B,) and
    ``band`` (int, -1 for none) for DTW; ``lengths`` (B,) for Viterbi;
    ``indptr``, ``parents`` (the graph) for a DAG. Lengths are flat int64
    arrays: host NumPy arrays, or int64 tensors of the caller's framework
    when its adapter checks them inside its operators.
    """
    struct: str          # "dtw", "viterbi" or "dag"
    xp: Any              # the caller's namespace
    backend: str         # numpy, torch, jax, cupy, generic
    device: str          # cpu or cuda
    batch_shape: tuple   # leading dims of theta
    flat_shape: tuple    # (B, ...) shape given to engines
    reg: str
    gamma: float
    len_a: Any = None
    len_b: Any = None
    band: int = -1
    lengths: Any = None
    indptr: Any = None
    parents: Any = None
    engine_checks: bool = False  # the compiled engine checks the values itself (_dispatch.run)

    @property
    def reg_code(self):
        return REG_CODES[self.reg]

    @property
    def engine_args(self):
        """The structure's arguments in the order of the engine functions."""
        return _GETTERS[self.struct](self)

    def repeat_batch(self, reps, **changes):
        """This problem with its batch repeated ``reps`` times (per-item fields tiled)."""
        B = self.flat_shape[0]
        tiled: dict = {f: np.tile(getattr(self, f), reps) for f in PER_ITEM_FIELDS[self.struct]}
        return replace(self, batch_shape=(reps * B,), flat_shape=(reps * B,) + tuple(self.flat_shape[1:]),
                       **tiled, **changes)


def _batch_size(batch_shape):
    B = 1
    for s in batch_shape:  # (a loop: math.prod over a generator stops torch.compile's tracer)
        B *= int(s)
    return B


def make_problem(struct, theta, xp, backend, batch_ndim, reg, gamma, **fields):
    """A :class:`Problem` for ``theta`` whose first ``batch_ndim`` axes are the batch."""
    batch_shape = tuple(theta.shape[:batch_ndim])
    B = _batch_size(batch_shape)
    flat_shape = (B,) + tuple(theta.shape[batch_ndim:])
    return Problem(struct, xp, backend, device_kind(theta, backend), batch_shape, flat_shape,
                   reg, gamma, **fields)


# ---------------------------------------------------------------------------
# framework adapters

_ADAPTERS: dict = {}
_LOADERS: dict = {}


def register_adapter(backend, adapter):
    """Route the arrays of ``backend`` (e.g. ``"torch"``) through ``adapter`` (see the module doc)."""
    _ADAPTERS[backend] = adapter
    _CHECKS.clear()


def register_adapter_loader(backend, loader):
    """``loader()`` is called the first time an array of ``backend`` arrives; it must register."""
    _LOADERS[backend] = loader
    _CHECKS.clear()


def adapter_for(backend):
    """The adapter of ``backend``, loading it on first use; None for arrays without one."""
    adapter = _ADAPTERS.get(backend)
    if adapter is None and backend in _LOADERS:
        _LOADERS.pop(backend)()
        adapter = _ADAPTERS.get(backend)
    return adapter


_CHECKS: dict = {}  # backend -> checks_for(backend), once its adapter (if any) is loaded


def checks_for(backend):
    """``(check_values, check_lengths)`` for arrays of ``backend``: the adapter's or the host ones."""
    found = _CHECKS.get(backend)
    if found is not None:
        return found
    from . import _validation

    adapter = adapter_for(backend)
    found = (getattr(adapter, "check_values", _validation.check_values),
             getattr(adapter, "check_lengths", _validation.check_lengths))
    if backend not in _LOADERS:  # resolved: no adapter still to load for it
        _CHECKS[backend] = found
    return found


def evaluate(problem, op, theta, Z=None):
    """Evaluate ``op`` on the unflattened ``theta``; returns outputs shaped for the caller.

    value -> value (batch_shape); grad -> (value, E); hvp -> Edot;
    decode -> (score, path) with ``path`` per the structure.
    """
    flat = _reshape(problem.xp, theta, problem.flat_shape)
    flatZ = None if Z is None else _reshape(problem.xp, Z, problem.flat_shape)
    adapter = adapter_for(problem.backend)
    if adapter is not None:
        out = adapter.apply(problem, op, flat, flatZ)
    else:
        out = _dispatch.run(problem, op, flat, flatZ)
        if op == "value":
            out = out[0]
        elif op == "hvp":
            out = out[2]
    return _unflatten(problem, op, out, theta.shape)


def _reshape(xp, x, shape):
    # NumPy's method: xp.reshape (numpy.reshape) is a Python wrapper around it, a call's fixed cost
    return x.reshape(shape) if type(x) is np.ndarray else xp.reshape(x, shape)


def _unflatten(problem, op, out, theta_shape):
    xp = problem.xp
    bs = problem.batch_shape
    if op == "value":
        return _reshape(xp, out, bs)
    if op == "hvp":
        return _reshape(xp, out, theta_shape)
    if op == "grad":
        value, E = out
        return _reshape(xp, value, bs), _reshape(xp, E, theta_shape)
    score, path = out
    return _reshape(xp, score, bs), _reshape(xp, path, bs + tuple(path.shape[1:]))


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
