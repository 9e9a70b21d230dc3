"""Linear-chain CRF on factorised potentials: Vit_Ω without the (B, T, S, S) tensor.

The scores of a tag sequence ``y`` of length ``L`` are those of pytorch-crf::

    score(y) = start[y_0] + Σ_{t<L} emissions[t, y_t]
               + Σ_{1≤t<L} transitions[y_{t-1}, y_t] + end[y_{L-1}]

``transitions[j, i]`` is the score of the move from tag ``j`` to tag ``i``
(pytorch-crf's ``[from, to]`` layout; note that the full-potential
``theta[t, i, j]`` of :func:`smoothmax.viterbi` is ``[to, from]``). The
smoothed value is the recursion

    V_0(i) = start[i] + emissions[0, i]
    V_t(i) = emissions[t, i] + max_Ω_j (transitions[j, i] + V_{t-1}(j))
    value  = max_Ω_i (V_{L-1}(i) + end[i])

which for negentropy and γ = 1 is the CRF log-partition ``log Σ_y exp score(y)``,
for ``"hard"`` the best score, and for ``"l2"`` the sparse surrogate of the
paper. It equals :func:`smoothmax.viterbi` of
``theta[t, i, j] = emissions[t, i] + transitions[j, i]`` (plus ``end[i]`` at the
last step) with ``theta[0, i, 0] = start[i] + emissions[0, i]`` and
``theta[0, i, j > 0] = −inf`` (a fixed start state), except that with ``"l2"``
that construction adds ``−γ/2`` (the operator applied to one finite entry at
the first step); the gradients are the same. The engines never form
``theta``: memory is ``O(B·T·S + S²)`` (docs/crf.md).

The functions here take any array-API arrays and are not differentiable by
themselves; :class:`smoothmax.torch.CRF` and ``smoothmax.jax.crf_*`` add the
autodiff rules.
"""
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _dispatch
from ._array_api import device_kind, dtype_name
from ._typing import Array, Lengths, Reg
from ._validation import (as_array, check_float, check_gamma, check_lengths, check_reg,
                          check_values)
from .operators import REG_CODES

__all__ = ["crf_log_partition", "crf_grad", "crf_hvp", "crf_decode", "full_potentials"]


@dataclass(frozen=True, eq=False)
class CRFProblem:
    """A validated factorised problem: the batch is flat, ``lengths`` host int64 (B,)."""

    xp: Any
    backend: str
    device: str
    batch_shape: tuple
    lengths: Any
    reg: str
    gamma: float

    @property
    def reg_code(self):
        return REG_CODES[self.reg]


def _param(x, name, shape, like, xp, backend):
    if x is None:
        return xp.zeros(shape, dtype=like.dtype, device=_device(like))
    x, pxp, pbackend = as_array(x, name)
    if pbackend != backend:
        raise TypeError(f"{name} must be an array of the same library as emissions ({backend}), got {pbackend}")
    check_float(x, pxp, name)
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")
    check_values(x, xp, name, "+inf")
    return x


def _device(x):
    import array_api_compat as aac

    return aac.device(x)


def prepare(emissions, transitions, start, end, lengths, reg="negentropy", gamma=1.0):
    """Validate; returns ``(emissions (B, T, S), transitions, start, end, problem)``.

    ``emissions`` may have any number of leading batch dimensions; they are
    flattened (``problem.batch_shape`` keeps them). ``start``/``end`` default to
    zeros. Parameters keep their dtype (the engines compute in double and
    return gradients in the emissions' dtype).
    """
    emissions, xp, backend = as_array(emissions, "emissions")
    check_float(emissions, xp, "emissions")
    if emissions.ndim < 2:
        raise ValueError(
            f"emissions must have shape (..., T, S) with T, S >= 1, got shape {tuple(emissions.shape)}")
    T, S = (int(s) for s in emissions.shape[-2:])
    if T < 1 or S < 1:
        raise ValueError(f"emissions must have shape (..., T, S) with T, S >= 1, got shape {tuple(emissions.shape)}")
    check_values(emissions, xp, "emissions", "+inf")
    transitions = _param(transitions, "transitions", (S, S), emissions, xp, backend)
    start = _param(start, "start", (S,), emissions, xp, backend)
    end = _param(end, "end", (S,), emissions, xp, backend)
    batch_shape = tuple(emissions.shape[:-2])
    L = check_lengths(lengths, batch_shape, T)
    B = int(np.prod(batch_shape, dtype=np.int64))
    emissions = xp.reshape(emissions, (B, T, S))
    reg = check_reg(reg)
    problem = CRFProblem(xp, backend, device_kind(emissions, backend), batch_shape, L,
                         reg, check_gamma(gamma, dtype_name(xp, emissions.dtype), reg))
    return emissions, transitions, start, end, problem


def run(problem, op, emissions, transitions, start, end, Z=None, weights=None):
    """Engine call on validated, flat arrays (see ``smoothmax._core.crf`` for the outputs).

    op ``"value"`` -> ``(value,)``; ``"grad"`` -> ``(value, g_emissions,
    g_transitions, g_start, g_end)``; ``"hvp"`` -> ``(vdot, h_emissions,
    h_transitions, h_start, h_end)``; ``"decode"`` -> ``(score, tags)``.
    ``weights`` (host float64 (B,), default ones) weight the batch sum of the
    shared gradients.
    """
    arrays = [emissions, transitions, start, end]
    extra = []
    if op == "hvp":
        arrays += list(Z)
    if op in ("grad", "hvp"):
        extra.append(None if weights is None else np.ascontiguousarray(weights, dtype=np.float64))
    if op != "decode":
        extra += [problem.reg_code, problem.gamma]
    return _dispatch.run_crf(problem.xp, problem.backend, problem.device, op, arrays,
                             problem.lengths, extra)


_SHARED = """
    Parameters
    ----------
    emissions : array, shape (..., T, S)
        Per-step tag scores, float32 or float64, any array-API library;
        ``-inf`` forbids a tag (NaN and ``+inf`` are rejected).
    transitions : array, shape (S, S)
        ``transitions[j, i]``: score of the move from tag ``j`` to tag ``i``.
    start, end : None or array, shape (S,)
        Scores of the first and last tag (default 0).
    lengths : None or int array, shape (...)
        Sequence lengths in ``1..T`` (steps past a length are ignored).
    reg : {"negentropy", "l2", "hard"}
    gamma : float > 0
"""


def _unflat(problem, y, tail=()):
    return problem.xp.reshape(y, problem.batch_shape + tuple(tail))


def crf_log_partition(emissions: Array, transitions: Array, start: Array = None, end: Array = None, *,
                      lengths: Lengths = None, reg: Reg = "negentropy", gamma: float = 1.0) -> Array:
    """The smoothed value: the CRF log-partition for negentropy and γ = 1.
    {shared}
    Returns
    -------
    value : array, shape (...)

    Examples
    --------
    >>> import numpy as np
    >>> import smoothmax as sm
    >>> rng = np.random.default_rng(0)
    >>> emissions = rng.normal(size=(2, 4, 3))  # (batch, T, S)
    >>> transitions = rng.normal(size=(3, 3))   # [from, to]
    >>> import itertools  # log Σ_y exp score(y) over the 3^4 tag sequences of the first item
    >>> score = lambda y: emissions[0, range(4), y].sum() + sum(transitions[a, b] for a, b in zip(y, y[1:]))
    >>> logZ = np.log(sum(np.exp(score(y)) for y in itertools.product(range(3), repeat=4)))
    >>> bool(np.isclose(sm.crf.crf_log_partition(emissions, transitions)[0], logZ))
    True
    """
    em, A, s, e, problem = prepare(emissions, transitions, start, end, lengths, reg, gamma)
    return _unflat(problem, run(problem, "value", em, A, s, e)[0])


def crf_grad(emissions: Array, transitions: Array, start: Array = None, end: Array = None, *,
             lengths: Lengths = None, reg: Reg = "negentropy",
             gamma: float = 1.0) -> "tuple[Array, Array, Array, Array, Array]":
    """The value and its gradients; for negentropy, γ = 1, the CRF marginals.
    {shared}
    Returns
    -------
    value : array, shape (...)
    g_emissions : array, shape (..., T, S)
        The unary marginals ``p(y_t = i)``; zero past the lengths.
    g_transitions : array, shape (S, S)
        Summed over the batch: the expected number of moves ``j -> i`` at ``[j, i]``.
    g_start, g_end : array, shape (S,)
        Summed over the batch: ``p(y_0 = i)`` and ``p(y_{L-1} = i)``.

    Examples
    --------
    >>> import numpy as np
    >>> import smoothmax as sm
    >>> rng = np.random.default_rng(0)
    >>> emissions = rng.normal(size=(2, 4, 3))  # (batch, T, S)
    >>> transitions = rng.normal(size=(3, 3))   # [from, to]
    >>> value, g_em, g_A, g_start, g_end = sm.crf.crf_grad(emissions, transitions, lengths=np.array([4, 2]))
    >>> g_em.sum(-1)  # p(y_t = i) sums to 1 over the tags, 0 past the length
    array([[1., 1., 1., 1.],
           [1., 1., 0., 0.]])
    >>> float(g_A.sum())  # expected number of moves: 3 + 1
    4.0
    """
    em, A, s, e, problem = prepare(emissions, transitions, start, end, lengths, reg, gamma)
    value, ge, gA, gs, gen = run(problem, "grad", em, A, s, e)
    return _unflat(problem, value), _unflat(problem, ge, em.shape[1:]), gA, gs, gen


def crf_hvp(emissions: Array, transitions: Array, start: Array, end: Array, Z: "tuple[Array, ...]", *,
            lengths: Lengths = None, reg: Reg = "negentropy",
            gamma: float = 1.0) -> "tuple[Array, Array, Array, Array]":
    """Hessian-vector product of the batch sum of values, by one forward and one reverse pass.
    {shared}
    Z : tuple ``(Z_emissions (..., T, S), Z_transitions (S, S), Z_start (S,), Z_end (S,))``
        The direction (finite).

    Returns
    -------
    h_emissions, h_transitions, h_start, h_end
        ``∇²(Σ_b value_b)·Z`` in the layout of the parameters.

    Examples
    --------
    >>> import numpy as np
    >>> import smoothmax as sm
    >>> rng = np.random.default_rng(0)
    >>> emissions = rng.normal(size=(2, 4, 3))  # (batch, T, S)
    >>> transitions = rng.normal(size=(3, 3))   # [from, to]
    >>> start, end = np.zeros(3), np.zeros(3)
    >>> Z = (np.ones_like(emissions), np.zeros((3, 3)), np.zeros(3), np.zeros(3))
    >>> h_em = sm.crf.crf_hvp(emissions, transitions, start, end, Z)[0]
    >>> eps = 1e-6  # the directional derivative of the marginals, by central differences
    >>> g = lambda em: sm.crf.crf_grad(em, transitions, start, end)[1]
    >>> bool(np.allclose(h_em, (g(emissions + eps) - g(emissions - eps)) / (2 * eps), atol=1e-6))
    True
    """
    em, A, s, e, problem = prepare(emissions, transitions, start, end, lengths, reg, gamma)
    if not isinstance(Z, (tuple, list)) or len(Z) != 4:
        got = f"{len(Z)} entries" if isinstance(Z, (tuple, list)) else type(Z).__name__
        raise ValueError(f"Z must be a tuple of 4 arrays (emissions, transitions, start, end), got {got}")
    xp = problem.xp
    parts = []
    shapes = (problem.batch_shape + tuple(em.shape[1:]), A.shape, s.shape, e.shape)
    for z, shape, name in zip(Z, shapes, ("Z[0]", "Z[1]", "Z[2]", "Z[3]")):
        z, _, _ = as_array(z, name)
        if tuple(z.shape) != tuple(shape):
            raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(z.shape)}")
        check_values(z, xp, name, "inf")
        parts.append(xp.astype(z, em.dtype))
    parts[0] = xp.reshape(parts[0], em.shape)
    _, he, hA, hs, hen = run(problem, "hvp", em, A, s, e, Z=parts)
    return _unflat(problem, he, em.shape[1:]), hA, hs, hen


def crf_decode(emissions: Array, transitions: Array, start: Array = None, end: Array = None, *,
               lengths: Lengths = None) -> "tuple[Array, Array]":
    """Best tag sequences (hard Viterbi; ties: first argmax).

    Parameters
    ----------
    emissions, transitions, start, end, lengths : as for :func:`crf_log_partition`.

    Returns
    -------
    score : array, shape (...)
    tags : int64 array, shape (..., T), ``-1`` past a length.

    Examples
    --------
    >>> import numpy as np
    >>> import smoothmax as sm
    >>> emissions = np.zeros((1, 4, 3))
    >>> emissions[0, :, 2] = 1.0  # tag 2 scores 1 at every step
    >>> sm.crf.crf_decode(emissions, np.zeros((3, 3)), lengths=np.array([3]))
    (array([3.]), array([[ 2,  2,  2, -1]]))
    """
    em, A, s, e, problem = prepare(emissions, transitions, start, end, lengths, "hard", 1.0)
    score, tags = run(problem, "decode", em, A, s, e)
    return _unflat(problem, score), _unflat(problem, tags, (em.shape[1],))


def full_potentials(emissions: Array, transitions: Array, start: Array, end: Array,
                    lengths: Lengths = None) -> "tuple[Array, np.ndarray]":
    """The full Vit_Ω potentials of a factorised CRF (this materialises S times the emissions).

    Parameters
    ----------
    emissions : array, shape (B, T, S)
    transitions, start, end, lengths : as for :func:`crf_log_partition`.

    Returns
    -------
    theta : array, shape (B, T, S, S)
        ``theta[b, t, i, j] = emissions[b, t, i] + transitions[j, i]`` for
        ``t ≥ 1``; ``theta[b, 0, i, 0] = emissions[b, 0, i] + start[i]`` and
        ``−inf`` for ``j > 0`` (a fixed start state); ``end[i]`` added at each
        item's last step. :func:`smoothmax.viterbi` of it equals
        :func:`crf_log_partition` (minus ``γ/2`` for ``"l2"``).
    lengths : int64 NumPy array, shape (B,)

    Examples
    --------
    >>> import numpy as np
    >>> import smoothmax as sm
    >>> rng = np.random.default_rng(0)
    >>> emissions = rng.normal(size=(2, 4, 3))  # (batch, T, S)
    >>> transitions = rng.normal(size=(3, 3))   # [from, to]
    >>> theta, L = sm.crf.full_potentials(emissions, transitions, np.zeros(3), np.zeros(3))
    >>> theta.shape, L
    ((2, 4, 3, 3), array([4, 4]))
    >>> bool(np.allclose(sm.viterbi(theta), sm.crf.crf_log_partition(emissions, transitions)))
    True
    """
    emissions, A, s, e, problem = prepare(emissions, transitions, start, end, lengths)
    xp = problem.xp
    dev = _device(emissions)
    B, T, S = emissions.shape
    dt = emissions.dtype
    At = xp.permute_dims(xp.astype(A, dt), (1, 0))
    s, e = xp.astype(s, dt), xp.astype(e, dt)
    rest = emissions[:, 1:, :, None] + At[None, None, :, :]
    first = emissions[:, 0, :, None] + s[None, :, None]
    j0 = xp.asarray(np.arange(S) == 0, device=dev)
    first = xp.where(j0[None, None, :], first, xp.full_like(first, -np.inf))
    theta = xp.concat([first[:, None], rest], axis=1)
    last = xp.asarray(np.arange(T)[None, :] == (problem.lengths[:, None] - 1), device=dev)
    theta = theta + xp.where(last[:, :, None, None], e[None, None, :, None],
                             xp.zeros((1, 1, S, 1), dtype=dt, device=dev))
    return theta, problem.lengths


for _f in (crf_log_partition, crf_grad, crf_hvp):
    _f.__doc__ = (_f.__doc__ or "").replace("{shared}", _SHARED)
