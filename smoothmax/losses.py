"""Structured losses built on DP_Ω (paper §4.1), for any array backend.

Two families, for tag sequences (Vit_Ω) and for alignments (DTW_Ω):

* the convex surrogate ``l_{C,Ω}(Y; θ) = DP_Ω(θ + C_Y) − <Y, θ>`` (max
  convention, θ scores), with a cost linear in the prediction,
  ``C(Y, Y') = <C_Y, Y'>``: with ``reg="hard"`` and no cost it is the
  structured perceptron loss, with ``"hard"`` and a cost the structured hinge
  loss, with ``"negentropy"`` (γ = 1) and no cost the CRF negative
  log-likelihood ``−log p_θ(Y)``;
* the relaxed loss ``Δ(Y, ∇DP_Ω(θ))``, a divergence between the target and the
  expected path.

The losses are written with the public operators and array-API operations
only, so under PyTorch and JAX they are differentiable by the framework (the
surrogates twice, the relaxed losses once: their gradient already uses the
Hessian-vector product of DP_Ω). With ``return_grad=True`` every loss also
returns its gradient in ``θ`` computed by the custom passes (so NumPy and
CuPy users get gradients too): ``E(θ + C_Y) − Y`` for a Viterbi surrogate,
``∇²DP_Ω(θ)·∂Δ/∂E`` for a relaxed loss.

Conventions (``docs/dag.md`` derives them):

* Viterbi: ``tags[..., t]`` is the state at step ``t``. Vit_Ω starts from a
  virtual state before ``t = 0`` whose value is 0 for every state
  (docs/spec.md §3); the target path takes it to be state 0 (the paper's ``y_0 = 1``),
  so ``Y[0, tags[0], 0] = 1`` and ``Y[t, tags[t], tags[t−1]] = 1``. For the
  textbook CRF, whose first step has no predecessor, set
  ``theta[..., 0, :, 1:] = -inf`` (then the CRF loss is exactly
  ``−log p(tags)``). The Hamming cost adds ``1`` to the score of every wrong
  tag: ``C_Y[t, i, j] = [i ≠ tags[t]]``.
* DTW works with costs (min convention): with scores ``−θ`` the surrogate is
  ``l_{C,Ω}(Y; θ) = <Y, θ> − DTW_Ω(θ − C_Y)``, the cost *subtracted* from the
  cell costs of the wrong cells. The area cost
  ``C_Y[a, b]`` is the distance from column ``b`` to the columns that ``Y``
  aligns with row ``a``.
"""

import numpy as np

from ._array_api import device_of, to_host
from ._problem import adapter_for, checks_for
from ._typing import Array, DTWLengths, Lengths, Reg
from ._validation import as_array, check_dense, is_traced
from .dtw import _prepare as _dtw_prepare
from .dtw import dtw, dtw_grad, dtw_hvp
from .viterbi import _prepare as _viterbi_prepare
from .viterbi import viterbi, viterbi_grad, viterbi_hvp

__all__ = ["viterbi_surrogate", "viterbi_relaxed", "dtw_surrogate", "dtw_relaxed",
           "tags_to_path"]


def _const(arr, problem, like):
    """A host NumPy constant as an array of the caller's namespace, on ``like``'s device."""
    if problem.backend == "numpy":
        return arr
    try:
        return problem.xp.asarray(arr, device=device_of(like))
    except TypeError:
        return problem.xp.asarray(arr)


def _like(x, problem, like, name):
    """``x`` (an array of any library, or a list) as an array of the caller's namespace."""
    if is_traced(x):
        return x
    x, _, backend = as_array(x, name)
    if backend == problem.backend:
        return x
    return _const(np.asarray(to_host(x)), problem, like)


def _batch_mask(problem, L, T, like):
    """``t < L`` as a boolean array (..., T) in the caller's namespace.

    ``L`` (B,) is a host array, or an integer array of the caller's framework
    (None for full lengths) when its adapter checks lengths inside its
    operators (the mask is computed in that framework, so that tracing never
    reads it).
    """
    if isinstance(L, np.ndarray):
        m = np.arange(T)[None, :] < L[:, None]
        return _const(m.reshape(problem.batch_shape + (T,)), problem, like)
    xp = problem.xp
    if L is None:  # full lengths (a framework adapter keeps None)
        return xp.ones(problem.batch_shape + (T,), dtype=xp.bool, device=device_of(like))
    m = xp.arange(T, device=device_of(L))[None, :] < L[:, None]
    return xp.reshape(_const(m, problem, like), problem.batch_shape + (T,))


def _tags(theta, tags, problem):
    """Validated tags as an integer array of theta's namespace, shape (..., T)."""
    xp = problem.xp
    T, S = int(theta.shape[-3]), int(theta.shape[-2])
    L = problem.lengths
    in_op = getattr(adapter_for(problem.backend), "check_tags", None)
    if in_op is not None and not isinstance(tags, (list, tuple, np.ndarray)):
        return in_op(tags, L, S, problem.batch_shape + (T,))
    if not is_traced(tags):
        check_dense(tags, "tags")
        host = np.asarray(to_host(tags)) if not isinstance(tags, (list, tuple)) else np.asarray(tags)
        if host.dtype.kind not in "iu":
            raise TypeError(f"tags must be an integer array, got dtype {host.dtype}")
        if tuple(host.shape) != problem.batch_shape + (T,):
            raise ValueError(f"tags must have shape {problem.batch_shape + (T,)} (theta's batch shape + (T,)), "
                             f"got {tuple(host.shape)}")
        Lh = np.full(host.size // T if T else 0, T) if L is None else np.asarray(to_host(L))
        valid = np.arange(T)[None, :] < Lh[:, None]
        flat = host.reshape(-1, T)
        bad = valid & ((flat < 0) | (flat >= S))
        if bad.any():
            raise ValueError(f"tags must be integers in [0, {S}) before each length, got {int(flat[bad][0])}")
        return _const(host.astype(np.int64), problem, theta)
    return tags


def _shaped(L, batch_shape):
    """Flat lengths (B,) back to the batch shape; None (full lengths) stays None."""
    return None if L is None else L.reshape(batch_shape)


def _onehot_tags(xp, tags, S, mask, dtype, dev):
    ar = xp.arange(S, device=dev)
    cur = xp.astype(tags[..., None] == ar, dtype)
    return cur * xp.astype(mask[..., None], dtype)


def tags_to_path(theta: Array, tags: Array, *, lengths: Lengths = None) -> Array:
    """The binary path tensor ``Y`` (..., T, S, S) of a tag sequence (docs/spec.md §3 layout).

    ``Y[t, tags[t], tags[t-1]] = 1`` for ``1 <= t < L`` and
    ``Y[0, tags[0], 0] = 1`` (the virtual state before ``t = 0`` is state 0);
    zero past a length. ``theta`` only gives the shape, namespace and dtype.

    Parameters
    ----------
    theta : array, shape (..., T, S, S)
    tags : int array, shape (..., T)
    lengths : None or int array of shape (...)

    Returns
    -------
    Y : array, shape (..., T, S, S), theta's dtype and namespace.

    Examples
    --------
    >>> import numpy as np
    >>> import smoothmax as sm
    >>> Y = sm.losses.tags_to_path(np.zeros((3, 2, 2)), np.array([1, 0, 1]))
    >>> [tuple(int(k) for k in idx) for idx in np.argwhere(Y)]  # (t, tags[t], tags[t-1])
    [(0, 1, 0), (1, 0, 1), (2, 1, 0)]
    """
    theta, problem = _viterbi_prepare(theta, "hard", 1.0, lengths)
    return _path_tensor(theta, _tags(theta, tags, problem), problem)[0]


def _path_tensor(theta, tags, problem):
    xp = problem.xp
    T, S = int(theta.shape[-3]), int(theta.shape[-2])
    mask = _batch_mask(problem, problem.lengths, T, theta)
    dev = device_of(theta)
    cur = _onehot_tags(xp, tags, S, mask, theta.dtype, dev)  # (..., T, S)
    first = xp.astype(xp.arange(S, device=dev) == 0, theta.dtype)
    first = xp.broadcast_to(first, cur.shape[:-2] + (1, S))
    prev = xp.concat([first, cur[..., :-1, :]], axis=-2)
    Y = cur[..., :, :, None] * prev[..., :, None, :]
    return Y, cur, mask


def _inner(xp, Y, theta, ndim):
    """<Y, theta> over the last ``ndim`` axes, ignoring theta where Y = 0 (theta may hold ±inf)."""
    return xp.sum(Y * xp.where(Y > 0, theta, xp.zeros_like(theta)), axis=tuple(range(-ndim, 0)))


def _surrogate_loss(xp, value, score, sign, grad=None):
    """``sign·(value − score)``, and ``+inf`` with gradient 0 where the target path is
    forbidden (its score ``<Y, θ>`` is infinite: it crosses a masked entry) instead
    of ``inf − inf``; the same under autodiff (``where`` sends no gradient to the
    unselected branch, and the infinite score never enters an arithmetic operation)."""
    infeasible = xp.isinf(score)
    finite_score = xp.where(infeasible, xp.zeros_like(score), score)
    loss = sign * (value - finite_score)
    loss = xp.where(infeasible, xp.full_like(loss, float("inf")), loss)
    if grad is None:
        return loss
    keep = xp.reshape(xp.astype(~infeasible, grad.dtype), tuple(score.shape) + (1,) * (grad.ndim - score.ndim))
    return loss, grad * keep


def _cost_array(cost, theta, problem, name="cost"):
    xp = problem.xp
    C = _like(cost, problem, theta, name)
    if tuple(C.shape) != tuple(theta.shape):
        raise ValueError(f"{name} must be None, a name or an array of theta's shape {tuple(theta.shape)}, "
                         f"got shape {tuple(C.shape)}")
    if C.dtype != theta.dtype:
        C = xp.astype(C, theta.dtype)
    checks_for(problem.backend)[0](C, xp, name, "inf")  # (torch: inside its operators)
    return C


def viterbi_surrogate(theta: Array, tags: Array, *, reg: Reg = "negentropy", gamma: float = 1.0,
                      lengths: Lengths = None, cost: "str | Array | None" = None,
                      return_grad: bool = False) -> "Array | tuple[Array, Array]":
    """The surrogate loss ``l_{C,Ω}(Y; θ) = Vit_Ω(θ + C_Y) − <Y, θ>`` (paper §4.1).

    ``reg="negentropy"``, ``cost=None``: the CRF negative log-likelihood
    (times γ, for γ ≠ 1); ``reg="hard"``, ``cost=None``: the structured
    perceptron; ``reg="hard"``, ``cost="hamming"``: the structured hinge
    (SVM) loss. Convex in θ. When ``C_Y`` vanishes on ``Y`` it is ≥ 0 for
    negentropy and hard, and ≥ −γ(L + 1)/2 for l2 (L the length: the l2
    ``max_Ω`` is only bounded below by ``max − γ/2``, at each of the L + 1
    maxima of the recursion), so an l2 training loss can be negative.

    Parameters
    ----------
    theta : array, shape (..., T, S, S)
        Scores, as for :func:`smoothmax.viterbi`.
    tags : int array, shape (..., T)
        Target states (any value past a length). See the module docstring for
        the state before ``t = 0``.
    reg, gamma, lengths : as for :func:`smoothmax.viterbi`.
    cost : None, "hamming" or array of theta's shape
        ``C_Y``: none, ``C_Y[t, i, j] = [i ≠ tags[t]]`` (the Hamming distance
        between tag sequences is ``<C_Y, Y'>``), or a custom linear cost.
    return_grad : bool
        Also return ``∂l/∂θ = E(θ + C_Y) − Y``, computed by the DP passes.

    Where the target path crosses a ``-inf`` score the loss is ``+inf`` and
    its gradient 0 (in every framework).

    Returns
    -------
    loss : array, shape (...)
    grad : array, shape (..., T, S, S), if ``return_grad``.

    Examples
    --------
    >>> import numpy as np
    >>> import smoothmax as sm
    >>> theta = np.random.default_rng(0).normal(size=(4, 3, 3))  # T = 4, S = 3
    >>> _, best = sm.viterbi_decode(theta)
    >>> float(sm.losses.viterbi_surrogate(theta, best, reg="hard"))  # perceptron: 0 at the best path
    0.0
    >>> Y = sm.losses.tags_to_path(theta, best)
    >>> nll = sm.losses.viterbi_surrogate(theta, best)  # CRF: log Z - <Y, theta> = -log p(best)
    >>> bool(np.isclose(nll, sm.viterbi(theta) - np.sum(Y * theta)))
    True
    >>> loss, grad = sm.losses.viterbi_surrogate(theta, best, return_grad=True)
    >>> bool(np.allclose(grad, sm.viterbi_grad(theta)[1] - Y))  # E - Y
    True
    """
    theta, problem = _viterbi_prepare(theta, reg, gamma, lengths)
    xp = problem.xp
    tags = _tags(theta, tags, problem)
    Y, cur, mask = _path_tensor(theta, tags, problem)
    if cost is None or (isinstance(cost, str) and cost == "none"):
        aug = theta
    elif isinstance(cost, str):
        if cost != "hamming":
            raise ValueError(f"cost must be None, 'none', 'hamming' or an array, got {cost!r}")
        C = (xp.astype(mask, theta.dtype)[..., None] - cur)[..., None]  # (..., T, S, 1)
        aug = theta + C
    else:
        aug = theta + _cost_array(cost, theta, problem)
    kw = dict(reg=reg, gamma=gamma, lengths=_shaped(problem.lengths, problem.batch_shape))
    score = _inner(xp, Y, theta, 3)
    if return_grad:
        value, E = viterbi_grad(aug, **kw)
        return _surrogate_loss(xp, value, score, 1.0, E - Y)
    return _surrogate_loss(xp, viterbi(aug, **kw), score, 1.0)


_DIVERGENCES = ("l2", "kl")


def _check_divergence(divergence, reg):
    if divergence is None:
        return "kl" if reg == "negentropy" else "l2"
    if divergence not in _DIVERGENCES:
        raise ValueError(f"divergence must be None, 'l2' or 'kl', got {divergence!r}")
    return divergence


def viterbi_relaxed(theta: Array, tags: Array, *, reg: Reg = "negentropy", gamma: float = 1.0,
                    lengths: Lengths = None, divergence: "str | None" = None,
                    return_grad: bool = False) -> "Array | tuple[Array, Array]":
    """The relaxed loss ``Δ(Y, ∇Vit_Ω(θ))`` on tag marginals (paper §4.1-4.2).

    With ``M[t] = E[t].sum(-1)`` the predicted marginals and ``P[t]`` the
    one-hot target, summed over ``t`` below the length:

    * ``divergence="l2"``: ``Σ_t ‖M[t] − P[t]‖²``;
    * ``divergence="kl"``: ``Σ_t KL(P[t] ‖ M[t]) = −Σ_t log M[t, tags[t]]``
      (``+inf`` where a target tag has probability 0, e.g. with ``"l2"``, or
      a marginal that underflows to 0 with negentropy).

    ``divergence=None`` picks ``"kl"`` for negentropy and ``"l2"`` otherwise,
    the pairs of the paper. Not convex; differentiable once in the caller's
    framework (its gradient is a Hessian-vector product of Vit_Ω).

    Gradient (the same with ``return_grad``, torch autograd and ``jax.grad``):
    ``∇²Vit_Ω(θ)·(∂Δ/∂E)``, finite wherever the loss is finite. With
    negentropy the marginals are smooth and this is the gradient. With
    ``"l2"`` they are piecewise smooth (each sparsemax is affine while its
    support is fixed): the HVP uses the support of the computed ``q``, i.e.
    the derivative of the piece whose support is ``supp(q)``, a one-sided
    derivative on the boundaries between pieces. With ``"hard"`` they are
    piecewise constant and the gradient is ``0`` (the derivative almost
    everywhere). An item whose KL loss is ``+inf`` gets gradient ``0``.

    Parameters
    ----------
    theta, tags, reg, gamma, lengths : as for :func:`viterbi_surrogate`.
    divergence : None, "l2" or "kl"
    return_grad : bool
        Also return ``∂Δ/∂θ = ∇²Vit_Ω(θ)·(∂Δ/∂E)``.

    Returns
    -------
    loss : array, shape (...)
    grad : array, shape (..., T, S, S), if ``return_grad``.

    Examples
    --------
    >>> import numpy as np
    >>> import smoothmax as sm
    >>> theta = np.random.default_rng(0).normal(size=(4, 3, 3))  # T = 4, S = 3
    >>> tags = np.array([0, 2, 2, 1])
    >>> M = sm.viterbi_grad(theta)[1].sum(-1)  # the tag marginals, (T, S)
    >>> bool(np.isclose(sm.losses.viterbi_relaxed(theta, tags), -np.log(M[np.arange(4), tags]).sum()))
    True
    """
    theta, problem = _viterbi_prepare(theta, reg, gamma, lengths)
    xp = problem.xp
    divergence = _check_divergence(divergence, reg)
    tags = _tags(theta, tags, problem)
    _, P, mask = _path_tensor(theta, tags, problem)
    kw = dict(reg=reg, gamma=gamma, lengths=_shaped(problem.lengths, problem.batch_shape))
    _, E = viterbi_grad(theta, **kw)
    M = xp.sum(E, axis=-1)
    if divergence == "l2":
        D = M - P
        loss = xp.sum(D * D, axis=(-2, -1))
        dM = 2.0 * D
    else:
        # KL(P || M) = -log M[t, tags[t]] summed over t: +inf where a target tag has
        # marginal 0 (always possible with "l2"/"hard", on underflow with negentropy).
        # The log is taken of M only where it is positive, so no inf * 0 reaches a
        # gradient; an item with an infinite loss gets gradient 0, in every framework.
        live = (P > 0) & (M > 0)
        Msafe = xp.where(live, M, xp.ones_like(M))
        infinite = xp.any((P > 0) & ~live, axis=(-2, -1))
        finite_part = -xp.sum(P * xp.log(Msafe), axis=(-2, -1))
        loss = xp.where(infinite, xp.full_like(finite_part, float("inf")), finite_part)
        keep = xp.astype(~infinite, M.dtype)[..., None, None]
        dM = xp.where(live, -P / Msafe, xp.zeros_like(M)) * keep
    if not return_grad:
        return loss
    Z = xp.broadcast_to(dM[..., None], theta.shape)
    return loss, viterbi_hvp(theta, Z, **kw)


def _alignment(theta, Y, problem, name="Y"):
    xp = problem.xp
    Y = _like(Y, problem, theta, name)
    if tuple(Y.shape) != tuple(theta.shape):
        raise ValueError(f"{name} must have theta's shape {tuple(theta.shape)}, got {tuple(Y.shape)}")
    in_op = getattr(adapter_for(problem.backend), "check_binary", None)
    if in_op is not None:
        Y = in_op(Y, name)
    elif not is_traced(Y):
        h = np.asarray(to_host(Y))
        if h.size and not np.all((h == 0) | (h == 1)):
            raise ValueError(f"{name} must be a 0/1 alignment matrix, got values other than 0 and 1")
    if Y.dtype != theta.dtype:
        Y = xp.astype(Y, theta.dtype)
    return Y


def _area_cost(xp, Y):
    """``C[a, b]`` = distance from column ``b`` to the columns aligned with row ``a`` in ``Y``."""
    NB = int(Y.shape[-1])
    col = xp.astype(xp.arange(NB, device=device_of(Y)), Y.dtype)
    big = float(NB)
    on = Y > 0
    first = xp.min(xp.where(on, col, xp.full_like(Y, big)), axis=-1, keepdims=True)
    last = xp.max(xp.where(on, col, xp.full_like(Y, -1.0)), axis=-1, keepdims=True)
    zero = xp.zeros_like(Y)
    C = xp.maximum(xp.maximum(first - col, col - last), zero)
    has = xp.any(on, axis=-1, keepdims=True)
    return xp.where(has, C, zero)


def _dtw_kw(problem):
    bs = problem.batch_shape
    return dict(reg=problem.reg, gamma=problem.gamma,
                lengths=(None if problem.len_a is None and problem.len_b is None else
                         (_shaped(problem.len_a, bs), _shaped(problem.len_b, bs))),
                band=None if problem.band < 0 else problem.band)


def dtw_surrogate(theta: Array, Y: Array, *, reg: Reg = "negentropy", gamma: float = 1.0,
                  cost: "str | Array | None" = "area", lengths: DTWLengths = None,
                  band: "int | None" = None, return_grad: bool = False) -> "Array | tuple[Array, Array]":
    """The surrogate loss for alignments, in DTW's cost convention (paper §4.1).

    With scores ``−θ``, ``l_{C,Ω}(Y; θ) = DP_Ω(−θ + C_Y) − <Y, −θ>``, that is
    ``<Y, θ> − DTW_Ω(θ − C_Y)``: the cost of the target alignment minus the
    smoothed minimal cost after lowering the cost of the cells far from the
    target. Convex in θ; ``≥ 0`` for ``reg="hard"`` when ``C_Y`` vanishes on
    ``Y``; ``reg="hard"``, ``cost=None`` is the structured perceptron,
    ``"hard"`` with a cost the structured hinge, negentropy (γ = 1) without
    cost the soft-DTW negative log-likelihood ``−log p_θ(Y)``.

    Parameters
    ----------
    theta : array, shape (..., NA, NB)
        Costs, as for :func:`smoothmax.dtw`.
    Y : array, shape (..., NA, NB)
        Target 0/1 alignment matrices (zero past the lengths).
    reg, gamma, lengths, band : as for :func:`smoothmax.dtw`.
    cost : None, "area" or array of theta's shape
        ``C_Y``: none; ``C_Y[a, b]`` the distance from column ``b`` to the
        columns ``Y`` aligns with row ``a`` (``<C_Y, Y'>`` sums, over the
        cells of ``Y'``, their horizontal distance to ``Y``: the area between
        the two paths when both have one cell per row); or a custom linear
        cost.
    return_grad : bool
        Also return ``∂l/∂θ = Y − E(θ − C_Y)``.

    Where the target alignment crosses a ``+inf`` cost the loss is ``+inf``
    and its gradient 0 (in every framework).

    Returns
    -------
    loss : array, shape (...)
    grad : array, shape (..., NA, NB), if ``return_grad``.

    Examples
    --------
    >>> import numpy as np
    >>> import smoothmax as sm
    >>> a, b = np.array([0.0, 1.0, 1.0, 2.0]), np.array([0.0, 1.0, 2.0])
    >>> theta = (a[:, None] - b[None, :]) ** 2
    >>> _, Y = sm.dtw_path(theta)  # the target: the best alignment
    >>> float(sm.losses.dtw_surrogate(theta, Y, reg="hard"))  # no alignment beats the target
    0.0
    >>> nll = sm.losses.dtw_surrogate(theta, Y, cost=None)  # -log p(Y) under soft-DTW
    >>> bool(np.isclose(nll, np.sum(Y * theta) - sm.dtw(theta)))
    True
    """
    theta, problem = _dtw_prepare(theta, reg, gamma, lengths, band)
    xp = problem.xp
    Y = _alignment(theta, Y, problem)
    if cost is None or (isinstance(cost, str) and cost == "none"):
        aug = theta
    elif isinstance(cost, str):
        if cost != "area":
            raise ValueError(f"cost must be None, 'none', 'area' or an array, got {cost!r}")
        aug = theta - _area_cost(xp, Y)
    else:
        aug = theta - _cost_array(cost, theta, problem)
    kw = _dtw_kw(problem)
    score = _inner(xp, Y, theta, 2)
    if return_grad:
        value, E = dtw_grad(aug, **kw)
        return _surrogate_loss(xp, value, score, -1.0, Y - E)
    return _surrogate_loss(xp, dtw(aug, **kw), score, -1.0)


def dtw_relaxed(theta: Array, Y: Array, *, reg: Reg = "negentropy", gamma: float = 1.0,
                lengths: DTWLengths = None, band: "int | None" = None,
                return_grad: bool = False) -> "Array | tuple[Array, Array]":
    """The relaxed area loss ``‖L (E − Y)^T‖_F²``, ``E = ∇DTW_Ω(θ)`` (paper §4.3).

    ``L`` is the lower-triangular matrix of ones, so ``L (E − Y)^T`` holds
    the cumulative sums of ``E − Y`` along each row (over columns ``b``);
    for binary alignments with one cell per row this is the area between the
    paths. With lengths, the columns past ``len_b`` are left out.

    Parameters
    ----------
    theta, Y, reg, gamma, lengths, band : as for :func:`dtw_surrogate`.
    return_grad : bool
        Also return ``∂Δ/∂θ = ∇²DTW_Ω(θ)·(∂Δ/∂E)``.

    Returns
    -------
    loss : array, shape (...)
    grad : array, shape (..., NA, NB), if ``return_grad``.

    Examples
    --------
    >>> import numpy as np
    >>> import smoothmax as sm
    >>> a, b = np.array([0.0, 1.0, 1.0, 2.0]), np.array([0.0, 1.0, 2.0])
    >>> theta = (a[:, None] - b[None, :]) ** 2
    >>> _, Y = sm.dtw_path(theta)  # the target: the best alignment
    >>> E = sm.dtw_grad(theta, gamma=0.1)[1]
    >>> loss = sm.losses.dtw_relaxed(theta, Y, gamma=0.1)  # ‖cumsum(E - Y, axis=-1)‖²
    >>> bool(np.isclose(loss, np.sum(np.cumsum(E - Y, axis=-1) ** 2)))
    True
    >>> bool(loss < 1e-6)  # little smoothing: E is almost the target
    True
    """
    theta, problem = _dtw_prepare(theta, reg, gamma, lengths, band)
    xp = problem.xp
    Y = _alignment(theta, Y, problem)
    kw = _dtw_kw(problem)
    _, E = dtw_grad(theta, **kw)
    NB = int(theta.shape[-1])
    colmask = xp.reshape(_batch_mask(problem, problem.len_b, NB, theta), problem.batch_shape + (1, NB))
    colmask = xp.astype(colmask, theta.dtype)
    D = xp.cumulative_sum(E - Y, axis=-1) * colmask
    loss = xp.sum(D * D, axis=(-2, -1))
    if not return_grad:
        return loss
    G = 2.0 * D
    # dΔ/dE[a, b] = Σ_{j >= b} G[a, j]: a reversed cumulative sum
    Z = xp.flip(xp.cumulative_sum(xp.flip(G, axis=-1), axis=-1), axis=-1)
    return loss, dtw_hvp(theta, Z, **kw)
