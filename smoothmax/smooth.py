"""Public smoothed max / argmax over one axis of any array-API array.

These are written with array-API operations only, so they are differentiable
(and twice differentiable) natively in PyTorch and JAX.
"""
from ._array_api import dtype_name
from ._typing import Array, Reg
from ._validation import as_array, check_axis, check_float, check_gamma, check_reg, check_values
from .operators import max_value_grad

__all__ = ["smooth_max", "smooth_argmax"]


def _prepare(x, reg, gamma, axis):
    x, xp, _ = as_array(x, "x")
    check_float(x, xp, "x")
    reg = check_reg(reg)
    gamma = check_gamma(gamma, dtype_name(xp, x.dtype), reg)
    if x.ndim == 0:
        raise ValueError("x must have at least 1 dimension, got a scalar")
    axis = check_axis(axis, x.ndim)
    if x.shape[axis] == 0:
        raise ValueError(f"x must have a non-empty axis {axis}, got shape {tuple(x.shape)}")
    check_values(x, xp, "x", "+inf")
    return xp, xp.moveaxis(x, axis, -1), reg, gamma


_FLOAT32_MAX = 3.4028234663852886e38


def _max_value_grad(xp, x, reg, gamma):
    """:func:`max_value_grad`; a float32 ``x`` with a γ beyond float32's range
    (γ would round to inf, and ``inf·log 1`` is NaN) is computed in float64 and
    the results rounded back (a value beyond the range becomes ±inf)."""
    if x.dtype == xp.float32 and reg != "hard" and gamma > _FLOAT32_MAX:
        value, q = max_value_grad(xp, xp.astype(x, xp.float64), reg, gamma)
        return xp.astype(value, xp.float32), xp.astype(q, xp.float32)
    return max_value_grad(xp, x, reg, gamma)


def smooth_max(x: Array, *, reg: Reg = "negentropy", gamma: float = 1.0, axis: int = -1) -> Array:
    """``max_Ω(x) = max_{q ∈ simplex} <q, x> − γ·ω(q)`` along ``axis``.

    Parameters
    ----------
    x : array, shape (..., D, ...)
        Float32 or float64; ``-inf`` entries are allowed (they get weight 0).
    reg : {"negentropy", "l2", "hard"}
        ``γ·logsumexp(x/γ)``, the sparsemax value, or ``max(x)``.
    gamma : float > 0
    axis : int

    Returns
    -------
    value : array, the shape of ``x`` without ``axis``; ``-inf`` along a
        slice that is all ``-inf``.

    Examples
    --------
    >>> import numpy as np
    >>> import smoothmax as sm
    >>> x = np.array([1.0, 2.0, 3.0])
    >>> float(sm.smooth_max(x, reg="hard"))
    3.0
    >>> float(sm.smooth_max(x))  # log(e + e^2 + e^3)
    3.4076
    >>> float(sm.smooth_max(x, reg="l2"))  # sparsemax puts all the mass on 3: 3 - γ/2
    2.5
    >>> sm.smooth_max(np.array([[0.0, -np.inf], [1.0, 1.0]]), gamma=0.5)  # -inf is a mask
    array([0.     , 1.34657])
    """
    xp, x, reg, gamma = _prepare(x, reg, gamma, axis)
    return _max_value_grad(xp, x, reg, gamma)[0]


def smooth_argmax(x: Array, *, reg: Reg = "negentropy", gamma: float = 1.0, axis: int = -1) -> Array:
    """``∇max_Ω(x)``: softmax(x/γ), sparsemax(x/γ) or the one-hot first argmax, along ``axis``.

    Parameters
    ----------
    x, reg, gamma, axis : as for :func:`smooth_max`.

    Returns
    -------
    q : array, the shape of ``x``; non-negative, sums to 1 along ``axis``
        (up to rounding), except along a slice whose entries are all ``-inf``:
        there no entry can be chosen, ``q`` is 0 and :func:`smooth_max` is
        ``-inf`` (the convention of the DP engines, Lemma 1 of the paper).

    Examples
    --------
    >>> import numpy as np
    >>> import smoothmax as sm
    >>> x = np.array([1.0, 2.0, 3.0])
    >>> sm.smooth_argmax(x)  # softmax
    array([0.09003, 0.24473, 0.66524])
    >>> sm.smooth_argmax(x, reg="l2", gamma=2.0)  # sparsemax of x / 2: exact zeros
    array([0.  , 0.25, 0.75])
    >>> sm.smooth_argmax(x, reg="hard")
    array([0., 0., 1.])
    """
    xp, xm, reg, gamma = _prepare(x, reg, gamma, axis)
    q = _max_value_grad(xp, xm, reg, gamma)[1]
    return xp.moveaxis(q, -1, axis)
