"""Smoothed dynamic time warping DTW_Ω (docs/spec.md §4).

``theta`` holds pairwise costs (min convention, as soft-DTW):
``R[0,0] = 0``, ``R[i,0] = R[0,j] = +inf``,
``R[i,j] = theta[i-1,j-1] + min_Ω(R[i-1,j], R[i,j-1], R[i-1,j-1])`` and
``DTW_Ω(θ) = R[NA, NB]``. With ``reg="negentropy"`` this is soft-DTW
(Cuturi & Blondel, 2017) on the cost matrix; ``E = ∇DTW_Ω(θ)`` is the
expected alignment.
"""
import math
from typing import Any

import numpy as np

from ._array_api import dtype_name, device_kind
from ._dispatch import engine_checked, engine_checks_values
from ._problem import FeatureProblem, checks_for, evaluate, make_problem
from ._typing import Array, DTWLengths, Reg
from ._validation import (as_array, as_int_host, check_band, check_direction, check_float, check_gamma,
                          check_lengths, check_rank, check_reg, check_values, checked_by_engine, same_dtype)

__all__ = ["dtw", "dtw_grad", "dtw_hvp", "dtw_path", "dtw_features", "dtw_features_grad", "FEATURE_COSTS"]

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


def _prepare(theta, reg, gamma, lengths, band, op=None, host_checks=False):
    """Validate and describe the problem.

    The data checks (values, lengths in range) are the host ones of
    :mod:`smoothmax._validation`, or those of the caller's framework adapter
    when it runs them inside its operators (PyTorch), unless ``host_checks``
    (callers that work on the host: sampling). ``op`` (the four public
    operators: the pass the call runs): with NumPy input and the compiled
    core, the thread that computes an item checks its theta (and Z) first
    (``smoothmax/_core/dtw.pyx``, ``_bad_item``; ``_dispatch.engine_checked``),
    so the host's serial pass over theta is skipped.
    """
    theta, xp, backend = as_array(theta, "theta")
    check_float(theta, xp, "theta")
    check_rank(theta, 2, "theta", "(..., NA, NB)")
    NA, NB = int(theta.shape[-2]), int(theta.shape[-1])
    if NA < 1 or NB < 1:
        raise ValueError(f"theta must have NA >= 1 and NB >= 1, got shape {tuple(theta.shape)}")
    reg = check_reg(reg)
    gamma = check_gamma(gamma, dtype_name(xp, theta.dtype), reg)
    band = check_band(band, (NA, NB))
    values, check_len = (check_values, check_lengths) if host_checks else checks_for(backend)
    checked = engine_checked("dtw", op, op is not None and engine_checks_values(backend))
    if not checked.theta:
        values(theta, xp, "theta", "-inf")
    batch_shape = tuple(theta.shape[:-2])
    la, lb = _pair_lengths(lengths, batch_shape, NA, NB, check_len)
    problem = make_problem("dtw", theta, xp, backend, theta.ndim - 2, reg, gamma,
                           len_a=la, len_b=lb, band=band, engine_checks=checked.asked)
    return theta, problem


def _pair_lengths(lengths, batch_shape, NA, NB, check_len=check_lengths):
    """``lengths`` (None, a pair, or an int array (..., 2)) as two flat int64 arrays, checked by
    ``check_len`` (host arrays by default; a framework adapter's checker keeps its tensors)."""
    if lengths is None:
        len_a = len_b = None
    elif isinstance(lengths, (tuple, list)):
        if len(lengths) != 2:
            raise ValueError(f"lengths must be a pair (len_a, len_b), got {len(lengths)} entries")
        len_a, len_b = lengths
    else:
        keep = check_len is not check_lengths and hasattr(lengths, "shape")
        arr = lengths if keep else as_int_host(lengths, "lengths")
        if arr.ndim < 1 or arr.shape[-1] != 2:
            raise ValueError(
                f"lengths must be a pair (len_a, len_b) or an array of shape (..., 2), got shape {tuple(arr.shape)}"
            )
        len_a, len_b = arr[..., 0], arr[..., 1]
    la = check_len(len_a, batch_shape, NA, "lengths[0] (len_a)")
    lb = check_len(len_b, batch_shape, NB, "lengths[1] (len_b)")
    return la, lb


def dtw(
        theta: Array, *, reg: Reg = "negentropy", gamma: float = 1.0, lengths: DTWLengths = None,
        band: "int | None" = None) -> Array:
    """DTW_Ω(θ), the smoothed DTW value.
    {shared}
    Returns
    -------
    value : array, shape (...)
        ``+inf`` where the end cell cannot be reached (all paths forbidden);
        ``±inf`` also where the value is beyond the dtype's range (``E`` and
        the HVP are then still right, see ``docs/decisions.md``).

    Examples
    --------
    >>> import numpy as np
    >>> import smoothmax as sm
    >>> a, b = np.array([0.0, 2.0, 3.0]), np.array([0.0, 2.0, 3.0])
    >>> theta = np.abs(a[:, None] - b[None, :])  # costs of aligning a_i with b_j
    >>> float(sm.dtw(theta, reg="hard"))  # the diagonal costs nothing
    0.0
    >>> float(sm.dtw(theta))  # soft-DTW: below the hard value, by at most γ·log(#paths)
    -0.83729
    >>> sm.dtw(np.stack([theta, theta + 1.0]), reg="hard")  # a batch
    array([0., 3.])
    >>> float(sm.dtw(theta, reg="hard", lengths=(2, 3)))  # a[:2] against b: 0 + 0 + |2 - 3|
    1.0
    """
    theta, problem = _prepare(theta, reg, gamma, lengths, band, op="value")
    return evaluate(problem, "value", theta)


def dtw_grad(
        theta: Array, *, reg: Reg = "negentropy", gamma: float = 1.0, lengths: DTWLengths = None,
        band: "int | None" = None) -> "tuple[Array, Array]":
    """DTW_Ω(θ) and its gradient ``E``, the expected alignment.
    {shared}
    Returns
    -------
    value : array, shape (...)
    E : array, shape (..., NA, NB)
        Entries in [0, 1] (up to rounding: an entry can exceed 1 by a few
        ulps); exactly 0 on forbidden cells and past the lengths.

    Examples
    --------
    >>> import numpy as np
    >>> import smoothmax as sm
    >>> a, b = np.array([0.0, 2.0, 3.0]), np.array([0.0, 2.0, 3.0])
    >>> theta = np.abs(a[:, None] - b[None, :])  # costs of aligning a_i with b_j
    >>> value, E = sm.dtw_grad(theta, gamma=0.1)
    >>> E.round(3)  # the expected alignment: almost surely the diagonal
    array([[1., 0., 0.],
           [0., 1., 0.],
           [0., 0., 1.]])
    >>> value, E = sm.dtw_grad(theta, gamma=10.0)  # more smoothing spreads it
    >>> bool(E[0, 1] > 0.1), float(E[0, 0]), float(E[-1, -1])  # every path starts and ends in the corners
    (True, 1.0, 1.0)
    """
    theta, problem = _prepare(theta, reg, gamma, lengths, band, op="grad")
    return evaluate(problem, "grad", theta)


def dtw_hvp(
        theta: Array, Z: Array, *, reg: Reg = "negentropy", gamma: float = 1.0,
        lengths: DTWLengths = None, band: "int | None" = None) -> Array:
    """The Hessian-vector product ``∇²DTW_Ω(θ)·Z``, by one forward and one reverse pass.
    {shared}
    Z : array, shape (..., NA, NB)
        The direction (finite), cast to theta's dtype.

    Returns
    -------
    Edot : array, shape (..., NA, NB)

    Examples
    --------
    >>> import numpy as np
    >>> import smoothmax as sm
    >>> a, b = np.array([0.0, 2.0, 3.0]), np.array([0.0, 2.0, 3.0])
    >>> theta = np.abs(a[:, None] - b[None, :])  # costs of aligning a_i with b_j
    >>> Z = np.ones_like(theta)
    >>> Edot = sm.dtw_hvp(theta, Z)
    >>> eps = 1e-6  # the directional derivative of E, by central differences
    >>> fd = (sm.dtw_grad(theta + eps * Z)[1] - sm.dtw_grad(theta - eps * Z)[1]) / (2 * eps)
    >>> bool(np.allclose(Edot, fd, atol=1e-6))
    True
    """
    theta, problem = _prepare(theta, reg, gamma, lengths, band, op="hvp")
    values = checks_for(problem.backend)[0]
    if problem.engine_checks and same_dtype(Z, theta):
        values = checked_by_engine
    Z = check_direction(Z, theta, problem.xp, problem.backend, values)
    return evaluate(problem, "hvp", theta, Z)


def dtw_path(theta: Array, *, lengths: DTWLengths = None, band: "int | None" = None) -> "tuple[Array, Array]":
    """Hard DTW: the minimal cost and the optimal alignment.

    Parameters
    ----------
    theta, lengths, band : as for :func:`dtw`.

    Returns
    -------
    cost : array, shape (...)
    Y : array, shape (..., NA, NB)
        0/1 alignment matrix in theta's dtype (ties: first of up, left, diagonal).

    Examples
    --------
    >>> import numpy as np
    >>> import smoothmax as sm
    >>> a, b = np.array([0.0, 1.0, 1.0, 2.0]), np.array([0.0, 1.0, 2.0])
    >>> cost, Y = sm.dtw_path((a[:, None] - b[None, :]) ** 2)
    >>> float(cost)
    0.0
    >>> Y  # both 1.0 of a are aligned with the 1.0 of b
    array([[1., 0., 0.],
           [0., 1., 0.],
           [0., 1., 0.],
           [0., 0., 1.]])
    """
    theta, problem = _prepare(theta, "hard", 1.0, lengths, band, op="path")
    return evaluate(problem, "path", theta)


for _f in (dtw, dtw_grad, dtw_hvp):
    _f.__doc__ = (_f.__doc__ or "").replace("{shared}", _SHARED_DOC)


# ---------------------------------------------------------------------------
# DTW between features: the cost of a cell is computed when it is visited


FEATURE_COSTS = ("sqeuclidean", "euclidean", "cosine")

# the gradient stores its weights (3 doubles a cell) whole up to this size;
# above, it keeps a row of R every ``rows`` rows and recomputes between them
_STORED_BYTES = 64 << 20


def checkpoint_rows(NA, NB, band=None):
    """Rows of R between two checkpoints for the gradient of an NA×NB problem.

    The checkpointed gradient keeps ``ceil(NA / h)`` rows of R (NB + 1
    doubles each) and the weights of one strip of ``h`` rows (2·h·w doubles,
    ``w`` the cells of a row: NB, or the band's width); ``h = √(NA·NB / 2w)``
    minimises their sum, ``≈ 2·√(2·NA)·NB`` doubles without a band. Small
    problems (weights under 64 MiB) are one strip: the stored backward.
    """
    w = NB if band is None or band < 0 else min(NB, 2 * band + 1 + abs(NA - NB))
    if 16 * NA * w <= _STORED_BYTES:
        return NA
    return max(16, min(NA, math.ceil(math.sqrt(NA * (NB + 1) / (2.0 * w)))))


def _prepare_features(x, y, cost, reg, gamma, lengths, band, checkpoint, progress):
    from ._progress import check_progress, check_rows

    x, xp, backend = as_array(x, "x")
    y, _, ybackend = as_array(y, "y")
    if ybackend != backend:
        raise TypeError(f"x and y must be arrays of the same library, got {backend} and {ybackend}")
    check_float(x, xp, "x")
    check_float(y, xp, "y")
    if x.dtype != y.dtype:
        raise TypeError(f"x and y must have the same dtype, got {dtype_name(xp, x.dtype)} and "
                        f"{dtype_name(xp, y.dtype)}")
    check_rank(x, 2, "x", "(..., NA, d)")
    check_rank(y, 2, "y", "(..., NB, d)")
    if tuple(x.shape[:-2]) != tuple(y.shape[:-2]) or x.shape[-1] != y.shape[-1]:
        raise ValueError(f"x and y must have shapes (..., NA, d) and (..., NB, d) with the same batch "
                         f"shape and d, got {tuple(x.shape)} and {tuple(y.shape)}")
    NA, NB, d = int(x.shape[-2]), int(y.shape[-2]), int(x.shape[-1])
    if NA < 1 or NB < 1 or d < 1:
        raise ValueError(f"x and y must have NA, NB >= 1 frames of d >= 1 features, got shapes "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    if not isinstance(cost, str) or cost not in FEATURE_COSTS:
        raise ValueError(f"cost must be one of {list(FEATURE_COSTS)}, got {cost!r}")
    reg = check_reg(reg)
    gamma = check_gamma(gamma)
    band = check_band(band, (NA, NB))
    rows = check_rows(checkpoint)
    progress = check_progress(progress)
    check_values(x, xp, "x", "inf")
    check_values(y, xp, "y", "inf")
    batch_shape = tuple(x.shape[:-2])
    la, lb = _pair_lengths(lengths, batch_shape, NA, NB)
    if rows is None:
        rows = checkpoint_rows(NA, NB, band)
    fp = FeatureProblem(xp, backend, device_kind(x, backend), batch_shape, NA, NB, d, la, lb,
                        band, cost, reg, gamma, rows, progress)
    B = int(np.prod(batch_shape, dtype=np.int64))
    return xp.reshape(x, (B, NA, d)), xp.reshape(y, (B, NB, d)), fp


def evaluate_features(fp, x, y, grad):
    """Route flat ``x (B, NA, d)``, ``y (B, NB, d)`` to an engine; outputs in the caller's namespace.

    Compiled kernel: NumPy directly, torch and JAX through their autodiff
    rules (:mod:`smoothmax.torch`, :mod:`smoothmax.jax`); other namespaces
    and devices: the cost matrix ``C`` (quadratic memory), ``dtw_grad(C)``
    and the chain rule, in the caller's namespace.
    """
    from . import _dispatch, _reference

    if not _dispatch.features_compiled(fp.backend, fp.device):
        C = _reference.pairwise_cost(fp.xp, x, y, fp.cost)
        kw = dict(reg=fp.reg, gamma=fp.gamma, lengths=(fp.la, fp.lb), band=None if fp.band < 0 else fp.band)
        if not grad:
            return dtw(C, **kw), None, None
        value, E = dtw_grad(C, **kw)
        return (value,) + tuple(_reference.cost_chain_rule(fp.xp, x, y, E, fp.cost))
    _framework: Any = None
    if fp.backend == "torch":
        from . import torch as _framework
    elif fp.backend == "jax":
        from . import jax as _framework
    else:
        return _dispatch.run_features(fp, x, y, grad)
    return _framework.apply_features(fp, x, y, grad)


def _with_progress(fp, x, y, grad):
    """Run with the progress hook of ``fp`` (bar or callback) around the kernel."""
    from ._progress import Progress

    B = len(fp.la)
    cells = float(np.sum(fp.la.astype(np.float64) * fp.lb)) * (3 if grad else 1)
    total = int(np.sum(fp.la)) * (2 if grad else 1)
    bar = Progress(fp.progress, total, cells, "dtw_features" + (" (gradient)" if grad else ""))
    import dataclasses

    run = dataclasses.replace(fp, progress=bar if bar.active and B > 0 else None)
    try:
        out = evaluate_features(run, x, y, grad)
    finally:
        bar.close()
    return out


_FEATURES_DOC = """
    Parameters
    ----------
    x : array, shape (..., NA, d)
    y : array, shape (..., NB, d)
        Feature sequences (same library, float dtype and batch shape ``...``);
        NaN and infinities are rejected.
    cost : {"sqeuclidean", "euclidean", "cosine"}
        The cost of cell (i, j): ``‖x_i − y_j‖²``, ``‖x_i − y_j‖`` (its
        gradient is taken as 0 where ``x_i = y_j``) or
        ``1 − <x_i, y_j>/(‖x_i‖‖y_j‖)`` (a zero row costs 1 against every
        row and gets gradient 0).
    reg : {"negentropy", "l2", "hard"}
    gamma : float > 0
    lengths : None, tuple (len_a, len_b) or int array of shape (..., 2)
        Per-item lengths: item ``b`` aligns ``x[b, :len_a[b]]`` with
        ``y[b, :len_b[b]]``.
    band : None or int >= 0
        Sakoe-Chiba radius (as :func:`dtw`).
    checkpoint : None or int >= 1
        Gradient only: rows of the DP between two stored rows of R (the
        weights of that many rows are kept at a time). None picks
        :func:`checkpoint_rows` (the stored backward for small problems,
        about ``√(NA/2)`` rows otherwise).
    progress : None, bool or callable ``(done, total)``
        Progress of the compiled kernel in rows of the DP: a ``tqdm`` bar
        (when installed) for large calls that run longer than 3 s (None), always
        (True), never (False), or a callback.

    The compiled CPU kernel (NumPy, torch and JAX arrays on the CPU) never
    forms the NA×NB cost matrix: a cell's cost is computed when the cell is
    visited and the value needs O(NB) memory; other libraries and devices
    run ``dtw_grad`` on the cost matrix (quadratic memory).
"""


def dtw_features(x: Array, y: Array, *, cost: str = "sqeuclidean", reg: Reg = "negentropy",
                 gamma: float = 1.0, lengths: DTWLengths = None, band: "int | None" = None,
                 checkpoint: "int | None" = None, progress: Any = None) -> Array:
    """DTW_Ω(C(x, y)) between two feature sequences, without forming ``C``.
    {shared}
    Returns
    -------
    value : array, shape (...)
        ``+inf`` where the end cell cannot be reached. Differentiable in
        ``x`` and ``y`` under torch and JAX (first order in linear memory;
        torch's second order runs the cost-matrix path).

    Examples
    --------
    >>> import numpy as np
    >>> import smoothmax as sm
    >>> rng = np.random.default_rng(0)
    >>> x, y = rng.normal(size=(2, 50, 3)), rng.normal(size=(2, 60, 3))  # (batch, N, d)
    >>> C = ((x[:, :, None, :] - y[:, None, :, :]) ** 2).sum(-1)  # the matrix it never forms
    >>> bool(np.allclose(sm.dtw_features(x, y), sm.dtw(C)))
    True
    """
    x, y, fp = _prepare_features(x, y, cost, reg, gamma, lengths, band, checkpoint, progress)
    value = _with_progress(fp, x, y, False)[0]
    return fp.xp.reshape(value, fp.batch_shape)


def dtw_features_grad(x: Array, y: Array, *, cost: str = "sqeuclidean", reg: Reg = "negentropy",
                      gamma: float = 1.0, lengths: DTWLengths = None, band: "int | None" = None,
                      checkpoint: "int | None" = None,
                      progress: Any = None) -> "tuple[Array, Array, Array]":
    """DTW_Ω(C(x, y)) and its gradients with respect to the features, in linear memory.

    ``grad_x[i] = Σ_j E[i, j] ∂C[i, j]/∂x_i`` (and likewise ``grad_y``) with
    ``E`` the expected alignment; neither ``C`` nor ``E`` is formed. Extra
    memory with the automatic ``checkpoint``: about ``2·√(3·NA)·NB`` doubles
    per problem (0.9 GB for 100,000 × 100,000), time about 2.5× the value.
    {shared}
    Returns
    -------
    value : array, shape (...)
    grad_x : array, shape (..., NA, d)
    grad_y : array, shape (..., NB, d)
        Zero past the lengths, and everywhere for an item whose end cell
        cannot be reached.

    Examples
    --------
    >>> import numpy as np
    >>> import smoothmax as sm
    >>> rng = np.random.default_rng(0)
    >>> x, y = rng.normal(size=(50, 3)), rng.normal(size=(60, 3))
    >>> value, gx, gy = sm.dtw_features_grad(x, y, checkpoint=8)  # 8 DP rows per stored row of R
    >>> _, E = sm.dtw_grad(((x[:, None] - y[None]) ** 2).sum(-1))  # the same through E
    >>> bool(np.allclose(gx, 2 * (E.sum(1)[:, None] * x - E @ y)))  # Σ_j E_ij ∂‖x_i − y_j‖²/∂x_i
    True
    """
    x, y, fp = _prepare_features(x, y, cost, reg, gamma, lengths, band, checkpoint, progress)
    value, gx, gy = _with_progress(fp, x, y, True)
    xp = fp.xp
    return (xp.reshape(value, fp.batch_shape), xp.reshape(gx, fp.batch_shape + (fp.NA, fp.d)),
            xp.reshape(gy, fp.batch_shape + (fp.NB, fp.d)))


for _g in (dtw_features, dtw_features_grad):
    _g.__doc__ = (_g.__doc__ or "").replace("{shared}", _FEATURES_DOC)
