"""Smoothed Viterbi Vit_Ω (docs/spec.md §3): sequence labelling, a linear-chain CRF with negentropy.

``theta[..., t, i, j]`` scores state ``i`` at step ``t`` coming from state
``j`` at step ``t-1`` (max convention). ``V_{-1} = 0`` for every state,
``V_t(i) = max_Ω_j (theta[t, i, j] + V_{t-1}(j))`` and
``Vit_Ω(θ) = max_Ω_i V_{T-1}(i)``. With negentropy and γ = 1 the value is
the CRF log-partition and ``E = ∇Vit_Ω`` holds the pairwise marginals
``E[t, i, j] = p(y_t = i, y_{t-1} = j)``.
"""
from ._dispatch import engine_checked, engine_checks_values
from ._array_api import dtype_name
from ._problem import checks_for, evaluate, make_problem
from ._typing import Array, Lengths, Reg
from ._validation import (as_array, check_direction, check_float, check_gamma, check_lengths,
                          check_rank, check_reg, check_values, checked_by_engine, same_dtype)

__all__ = ["viterbi", "viterbi_grad", "viterbi_hvp", "viterbi_decode"]

_SHARED_DOC = """
    Parameters
    ----------
    theta : array, shape (..., T, S, S)
        Transition-emission scores; float32 or float64, any array-API library.
        ``-inf`` forbids a transition; NaN and ``+inf`` are rejected.
    reg : {"negentropy", "l2", "hard"}
        The regulariser Ω: CRF (softmax), sparse (sparsemax) or hard Viterbi.
    gamma : float > 0
        Smoothing strength (ignored by ``"hard"``).
    lengths : None or int array of shape (...)
        Per-item sequence lengths in ``1..T``; steps past a length are ignored.
"""


def _prepare(theta, reg, gamma, lengths, op=None, host_checks=False):
    """Validate and describe the problem.

    ``op`` (the four public operators: the pass the call runs): with NumPy
    input and the compiled core, the kernels reject NaN / +inf scores on
    their one read of theta, and the HVP checks Z (``_dispatch.engine_checked``),
    so the host's pass over them is skipped. The data checks are those of
    the caller's framework adapter when it runs them inside its operators
    (PyTorch), unless ``host_checks`` (callers working on the host).
    """
    theta, xp, backend = as_array(theta, "theta")
    check_float(theta, xp, "theta")
    check_rank(theta, 3, "theta", "(..., T, S, S)")
    T, S, S2 = (int(s) for s in theta.shape[-3:])
    if S != S2 or T < 1 or S < 1:
        raise ValueError(f"theta must have shape (..., T, S, S) with T, S >= 1, got {tuple(theta.shape)}")
    reg = check_reg(reg)
    gamma = check_gamma(gamma, dtype_name(xp, theta.dtype), reg)
    values, check_len = (check_values, check_lengths) if host_checks else checks_for(backend)
    checked = engine_checked("viterbi", op, op is not None and engine_checks_values(backend))
    if not checked.theta:
        values(theta, xp, "theta", "+inf")
    L = check_len(lengths, tuple(theta.shape[:-3]), T, "lengths")
    problem = make_problem("viterbi", theta, xp, backend, theta.ndim - 3, reg, gamma, lengths=L,
                           engine_checks=checked.asked)
    return theta, problem


def viterbi(
        theta: Array, *, reg: Reg = "negentropy", gamma: float = 1.0,
        lengths: Lengths = None) -> Array:
    """Vit_Ω(θ), the smoothed Viterbi value (the CRF log-partition for negentropy, γ = 1).
    {shared}
    Returns
    -------
    value : array, shape (...)

    Examples
    --------
    >>> import numpy as np
    >>> import smoothmax as sm
    >>> theta = np.random.default_rng(0).normal(size=(3, 2, 2))  # T = 3 steps, S = 2 states
    >>> import itertools  # every path (y_-1, y_0, y_1, y_2) and its score
    >>> paths = list(itertools.product(range(2), repeat=4))
    >>> scores = [sum(theta[t, y[t + 1], y[t]] for t in range(3)) for y in paths]
    >>> bool(np.isclose(sm.viterbi(theta), np.log(np.sum(np.exp(scores)))))  # log-partition
    True
    >>> bool(np.isclose(sm.viterbi(theta, reg="hard"), max(scores)))
    True
    >>> sm.viterbi(np.stack([theta, theta]), lengths=np.array([3, 1])).shape  # a batch
    (2,)
    """
    theta, problem = _prepare(theta, reg, gamma, lengths, op="value")
    return evaluate(problem, "value", theta)


def viterbi_grad(
        theta: Array, *, reg: Reg = "negentropy", gamma: float = 1.0,
        lengths: Lengths = None) -> "tuple[Array, Array]":
    """Vit_Ω(θ) and its gradient ``E``, the pairwise marginals.
    {shared}
    Returns
    -------
    value : array, shape (...)
    E : array, shape (..., T, S, S)
        ``E[t, i, j] = p(y_t = i, y_{t-1} = j)``; ``E.sum(-1)`` are the unary
        marginals; zero past the lengths.

    Examples
    --------
    >>> import numpy as np
    >>> import smoothmax as sm
    >>> theta = np.random.default_rng(0).normal(size=(3, 2, 2))  # T = 3 steps, S = 2 states
    >>> value, E = sm.viterbi_grad(theta)
    >>> E.sum(axis=(1, 2))  # one transition per step
    array([1., 1., 1.])
    >>> value, E = sm.viterbi_grad(np.stack([theta, theta]), lengths=np.array([3, 1]))
    >>> E[1].sum(axis=(1, 2))  # the second sequence ends after one step
    array([1., 0., 0.])
    """
    theta, problem = _prepare(theta, reg, gamma, lengths, op="grad")
    return evaluate(problem, "grad", theta)


def viterbi_hvp(
        theta: Array, Z: Array, *, reg: Reg = "negentropy", gamma: float = 1.0,
        lengths: Lengths = None) -> Array:
    """The Hessian-vector product ``∇²Vit_Ω(θ)·Z``, by one forward and one reverse pass.
    {shared}
    Z : array, shape (..., T, S, S)
        The direction (finite), cast to theta's dtype.

    Returns
    -------
    Edot : array, shape (..., T, S, S)

    Examples
    --------
    >>> import numpy as np
    >>> import smoothmax as sm
    >>> theta = np.random.default_rng(0).normal(size=(3, 2, 2))  # T = 3 steps, S = 2 states
    >>> Z = np.random.default_rng(1).normal(size=theta.shape)
    >>> eps = 1e-6  # the directional derivative of E, by central differences
    >>> fd = (sm.viterbi_grad(theta + eps * Z)[1] - sm.viterbi_grad(theta - eps * Z)[1]) / (2 * eps)
    >>> bool(np.allclose(sm.viterbi_hvp(theta, Z), fd, atol=1e-6))
    True
    """
    theta, problem = _prepare(theta, reg, gamma, lengths, op="hvp")
    values = checks_for(problem.backend)[0]
    if problem.engine_checks and same_dtype(Z, theta):
        values = checked_by_engine  # the compiled HVP checks Z on the thread of each item
    Z = check_direction(Z, theta, problem.xp, problem.backend, values)
    return evaluate(problem, "hvp", theta, Z)


def viterbi_decode(theta: Array, *, lengths: Lengths = None) -> "tuple[Array, Array]":
    """Hard Viterbi decoding: the best score and its tag sequence.

    Parameters
    ----------
    theta, lengths : as for :func:`viterbi`.

    Returns
    -------
    score : array, shape (...)
    tags : int64 array, shape (..., T)
        The best states (ties: first argmax); ``-1`` past a length.

    Examples
    --------
    >>> import numpy as np
    >>> import smoothmax as sm
    >>> theta = np.zeros((4, 3, 3))
    >>> theta[:, 2, :] = 1.0  # state 2 scores 1 at every step, from any state
    >>> score, tags = sm.viterbi_decode(np.stack([theta, theta]), lengths=np.array([4, 2]))
    >>> score
    array([4., 2.])
    >>> tags
    array([[ 2,  2,  2,  2],
           [ 2,  2, -1, -1]])
    """
    theta, problem = _prepare(theta, "hard", 1.0, lengths, op="decode")
    return evaluate(problem, "decode", theta)


for _f in (viterbi, viterbi_grad, viterbi_hvp):
    _f.__doc__ = (_f.__doc__ or "").replace("{shared}", _SHARED_DOC)
