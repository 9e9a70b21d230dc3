"""Smoothed dynamic time warping DTW_Ω (SPEC §4).

``theta`` holds pairwise costs (min convention, as soft-DTW):
``R[0,0] = 0``, ``R[i,0] = R[0,j] = +inf``,
``R[i,j] = theta[i-1,j-1] + min_Ω(R[i-1,j], R[i,j-1], R[i-1,j-1])`` and
``DTW_Ω(θ) = R[NA, NB]``. With ``reg="negentropy"`` this is soft-DTW
(Cuturi & Blondel, 2017) on the cost matrix; ``E = ∇DTW_Ω(θ)`` is the
expected alignment.
"""
import numpy as np

from ._problem import evaluate, make_problem
from ._validation import (as_array, check_band, check_direction, check_float, check_gamma,
                          check_lengths, check_rank, check_reg, check_values)

__all__ = ["dtw", "dtw_grad", "dtw_hvp", "dtw_path"]

_SHARED_DOC = """
    Parameters
    ----------
    theta : array, shape (..., NA, NB)
        Costs ``theta[..., i, j]`` of aligning ``a_i`` with ``b_j``; float32 or
        float64, any array-API library (NumPy, PyTorch, JAX, CuPy, ...).
        ``+inf`` forbids a cell; NaN and ``-inf`` are rejected.
    reg : {"negentropy", "l2", "hard"}
        The regulariser Ω: soft-DTW, sparse (sparsemax) DTW, or classic DTW.
    gamma : float > 0
        Smoothing strength (ignored by ``"hard"``).
    lengths : None, tuple (len_a, len_b) or int array of shape (..., 2)
        Per-item lengths (each broadcast to the batch shape ``...``); item
        ``b`` uses ``theta[b, :len_a[b], :len_b[b]]`` only.
    band : None or int >= 0
        Sakoe-Chiba radius; the allowed cells are those of
        ``tslearn.metrics.sakoe_chiba_mask(len_a, len_b, band)``.
"""


def _prepare(theta, reg, gamma, lengths, band, name="dtw"):
    theta, xp, backend = as_array(theta, "theta")
    check_float(theta, xp, "theta")
    check_rank(theta, 2, "theta", "(..., NA, NB)")
    NA, NB = int(theta.shape[-2]), int(theta.shape[-1])
    if NA < 1 or NB < 1:
        raise ValueError(f"theta must have NA >= 1 and NB >= 1, got shape {tuple(theta.shape)}")
    reg = check_reg(reg)
    gamma = check_gamma(gamma)
    band = check_band(band)
    check_values(theta, xp, "theta", "-inf")
    batch_shape = tuple(theta.shape[:-2])
    if lengths is None:
        la = check_lengths(None, batch_shape, NA)
        lb = check_lengths(None, batch_shape, NB)
    else:
        if isinstance(lengths, (tuple, list)):
            if len(lengths) != 2:
                raise ValueError(f"lengths must be a pair (len_a, len_b), got {len(lengths)} entries")
            len_a, len_b = lengths
        else:
            from ._array_api import to_host

            arr = np.asarray(to_host(lengths))
            if arr.ndim < 1 or arr.shape[-1] != 2:
                raise ValueError(
                    f"lengths must be a pair (len_a, len_b) or an array of shape (..., 2), got shape {arr.shape}"
                )
            len_a, len_b = arr[..., 0], arr[..., 1]
        la = check_lengths(len_a, batch_shape, NA, "lengths[0] (len_a)")
        lb = check_lengths(len_b, batch_shape, NB, "lengths[1] (len_b)")
    problem = make_problem("dtw", theta, xp, backend, theta.ndim - 2, (la, lb, band), reg, gamma)
    return theta, problem


def dtw(theta, *, reg="negentropy", gamma=1.0, lengths=None, band=None):
    """DTW_Ω(θ), the smoothed DTW value.
    {shared}
    Returns
    -------
    value : array, shape (...)
        ``+inf`` where the end cell cannot be reached (all paths forbidden).
    """
    theta, problem = _prepare(theta, reg, gamma, lengths, band)
    return evaluate(problem, "value", theta)


def dtw_grad(theta, *, reg="negentropy", gamma=1.0, lengths=None, band=None):
    """DTW_Ω(θ) and its gradient ``E``, the expected alignment.
    {shared}
    Returns
    -------
    value : array, shape (...)
    E : array, shape (..., NA, NB)
        Entries in [0, 1]; exactly 0 on forbidden cells and past the lengths.
    """
    theta, problem = _prepare(theta, reg, gamma, lengths, band)
    return evaluate(problem, "grad", theta)


def dtw_hvp(theta, Z, *, reg="negentropy", gamma=1.0, lengths=None, band=None):
    """The Hessian-vector product ``∇²DTW_Ω(θ)·Z``, by one forward and one reverse pass.
    {shared}
    Z : array, shape (..., NA, NB)
        The direction (finite), cast to theta's dtype.

    Returns
    -------
    Edot : array, shape (..., NA, NB)
    """
    theta, problem = _prepare(theta, reg, gamma, lengths, band)
    Z = check_direction(Z, theta, problem.xp, problem.backend)
    return evaluate(problem, "hvp", theta, Z)


def dtw_path(theta, *, lengths=None, band=None):
    """Hard DTW: the minimal cost and the optimal alignment.

    Parameters
    ----------
    theta, lengths, band : as for :func:`dtw`.

    Returns
    -------
    cost : array, shape (...)
    Y : array, shape (..., NA, NB)
        0/1 alignment matrix in theta's dtype (ties: first of up, left, diagonal).
    """
    theta, problem = _prepare(theta, "hard", 1.0, lengths, band)
    return evaluate(problem, "path", theta)


for _f in (dtw, dtw_grad, dtw_hvp):
    _f.__doc__ = _f.__doc__.replace("{shared}", _SHARED_DOC)
