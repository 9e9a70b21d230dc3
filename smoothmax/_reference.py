"""Reference engine: the DP_Ω passes of docs/spec.md §2-4 in plain array-API code.

This is the executable specification. It runs on any array-API namespace
(NumPy, array_api_strict, torch, JAX, CuPy), is vectorised over the batch and
over anti-diagonals (DTW) or states (Viterbi), and serves both as the engine
for array libraries without a compiled path and as a second oracle for the
compiled and GPU engines. Function names and signatures follow
``docs/engines.md``.

DTW layout. ``R`` is stored skewed: diagonal ``d = i + j`` (``0 <= d <= NA+NB``)
is a vector indexed by the row ``i`` (``0 <= i <= NA``). The three
predecessors of ``(i, j)`` are then plain shifts of the two previous
diagonals, so no scatter is needed:
up ``(i-1, j)`` is ``D[d-1][i-1]``, left ``(i, j-1)`` is ``D[d-1][i]`` and
diagonal ``(i-1, j-1)`` is ``D[d-2][i-1]``.
"""
from typing import Any

import numpy as np

from ._array_api import to_host
from .operators import REGS, hessian_product, max_value_grad


def _device(x):
    import array_api_compat as aac

    return aac.device(x)


def _shift_right(xp, v, fill):
    """``out[..., i] = v[..., i-1]``, ``out[..., 0] = fill``."""
    pad = xp.full(v.shape[:-1] + (1,), fill, dtype=v.dtype, device=_device(v))
    return xp.concat([pad, v[..., :-1]], axis=-1)


def _shift_left(xp, v):
    """``out[..., i] = v[..., i+1]``, ``out[..., -1] = 0``."""
    pad = xp.zeros(v.shape[:-1] + (1,), dtype=v.dtype, device=_device(v))
    return xp.concat([v[..., 1:], pad], axis=-1)


# ---------------------------------------------------------------------------
# DTW


def _dtw_layout(B, NA, NB, la, lb, band):
    """Host-side index maps and masks for the skewed layout."""
    ndiag = NA + NB + 1
    W = NA + 1
    d = np.arange(ndiag)[:, None]
    i = np.arange(W)[None, :]
    j = d - i
    inside = (i >= 1) & (j >= 1) & (i <= NA) & (j <= NB)
    gather = np.where(inside, (i - 1) * NB + (j - 1), NA * NB)  # NA*NB: a padding slot
    la_ = la[:, None, None]
    lb_ = lb[:, None, None]
    valid = inside[None] & (i[None] <= la_) & (j[None] <= lb_)
    if band >= 0:
        r = band
        ii, jj = i[None] - 1, j[None] - 1
        le = la_ <= lb_
        ok_le = (jj >= ii - r) & (jj <= ii + (lb_ - la_) + r)
        ok_gt = (ii >= jj - r) & (ii <= jj + (la_ - lb_) + r)
        valid &= np.where(le, ok_le, ok_gt)
    end = np.zeros((B, ndiag, W), dtype=bool)
    end[np.arange(B), la + lb, la] = True
    ii, jj = np.meshgrid(np.arange(NA), np.arange(NB), indexing="ij")
    unskew = ((ii + jj + 2) * W + ii + 1).reshape(-1)
    return ndiag, W, gather.reshape(-1), valid, end, unskew


def _skew(xp, x, gather, ndiag, W, fill):
    B = x.shape[0]
    flat = xp.reshape(x, (B, x.shape[1] * x.shape[2]))
    pad = xp.full((B, 1), fill, dtype=x.dtype, device=_device(x))
    flat = xp.concat([flat, pad], axis=1)
    idx = xp.asarray(gather, device=_device(x))
    return xp.reshape(xp.take(flat, idx, axis=1), (B, ndiag, W))


def _unskew(xp, diags, unskew, NA, NB):
    B = diags[0].shape[0]
    stacked = xp.reshape(xp.stack(diags, axis=1), (B, len(diags) * diags[0].shape[1]))
    idx = xp.asarray(unskew, device=_device(stacked))
    return xp.reshape(xp.take(stacked, idx, axis=1), (B, NA, NB))


def _dtw_forward(xp, theta, la, lb, band, reg, gamma, Z=None):
    B, NA, NB = theta.shape
    la, lb = to_host(la).astype(np.int64), to_host(lb).astype(np.int64)
    ndiag, W, gather, valid_h, end_h, unskew = _dtw_layout(B, NA, NB, la, lb, band)
    dev = _device(theta)
    dt = theta.dtype
    inf = float("inf")
    valid = xp.asarray(valid_h, device=dev)
    skew = _skew(xp, theta, gather, ndiag, W, inf)
    Zskew = None if Z is None else _skew(xp, Z, gather, ndiag, W, 0.0)
    first = np.full((B, W), inf)
    first[:, 0] = 0.0
    R = [xp.asarray(first, dtype=dt, device=dev)]
    Q = [None]
    Rdot = [xp.zeros((B, W), dtype=dt, device=dev)]
    Qdot = [None]
    inf_row = xp.full((B, W), inf, dtype=dt, device=dev)
    zero_row = xp.zeros((B, W), dtype=dt, device=dev)
    for d in range(1, ndiag):
        prev1 = R[d - 1]
        prev2 = R[d - 2] if d >= 2 else inf_row
        preds = xp.stack([_shift_right(xp, prev1, inf), prev1, _shift_right(xp, prev2, inf)], axis=-1)
        val, q = max_value_grad(xp, -preds, reg, gamma)
        v = valid[:, d, :]
        R.append(xp.where(v, skew[:, d, :] - val, inf_row))
        q = xp.where(v[..., None], q, xp.zeros_like(q))
        Q.append(q)
        if Zskew is not None:
            p1 = Rdot[d - 1]
            p2 = Rdot[d - 2] if d >= 2 else zero_row
            u = xp.stack([_shift_right(xp, p1, 0.0), p1, _shift_right(xp, p2, 0.0)], axis=-1)
            Rdot.append(xp.where(v, Zskew[:, d, :] + xp.sum(q * u, axis=-1), zero_row))
            Qdot.append(-hessian_product(xp, q, u, reg, gamma))
    end = xp.asarray(end_h, device=dev)
    Rs = xp.stack(R, axis=1)
    value = xp.sum(xp.where(end, Rs, xp.zeros_like(Rs)), axis=(1, 2))
    return value, R, Q, Qdot, end, unskew


def _dtw_backward(xp, value, Q, Qdot, end, NA, NB, unskew):
    ndiag = len(Q)
    B, W = Q[1].shape[:2]
    dt = Q[1].dtype
    dev = _device(Q[1])
    finite = xp.astype(xp.isfinite(value), dt)[:, None]
    zero_row = xp.zeros((B, W), dtype=dt, device=dev)
    ebar = [zero_row] * ndiag
    ebar_dot = [zero_row] * ndiag
    hvp = len(Qdot) == ndiag and ndiag > 1
    for d in range(ndiag - 1, 0, -1):
        acc = xp.astype(end[:, d, :], dt) * finite
        accd = zero_row
        if d + 1 < ndiag:
            q1, e1 = Q[d + 1], ebar[d + 1]
            acc = acc + _shift_left(xp, e1 * q1[..., 0]) + e1 * q1[..., 1]
            if hvp:
                qd1, ed1 = Qdot[d + 1], ebar_dot[d + 1]
                accd = accd + _shift_left(xp, ed1 * q1[..., 0] + e1 * qd1[..., 0])
                accd = accd + ed1 * q1[..., 1] + e1 * qd1[..., 1]
        if d + 2 < ndiag:
            q2, e2 = Q[d + 2], ebar[d + 2]
            acc = acc + _shift_left(xp, e2 * q2[..., 2])
            if hvp:
                accd = accd + _shift_left(xp, ebar_dot[d + 2] * q2[..., 2] + e2 * Qdot[d + 2][..., 2])
        ebar[d] = acc
        ebar_dot[d] = accd
    E = _unskew(xp, ebar, unskew, NA, NB)
    Edot = _unskew(xp, ebar_dot, unskew, NA, NB) if hvp else None
    return E, Edot


def dtw_value(theta, la, lb, band, reg, gamma):
    xp = _namespace(theta)
    return _dtw_forward(xp, theta, la, lb, band, REGS[reg], gamma)[0]


def dtw_grad(theta, la, lb, band, reg, gamma):
    xp = _namespace(theta)
    B, NA, NB = theta.shape
    value, R, Q, Qdot, end, unskew = _dtw_forward(xp, theta, la, lb, band, REGS[reg], gamma)
    if B == 0:
        return value, xp.zeros_like(theta)
    E, _ = _dtw_backward(xp, value, Q, Qdot, end, NA, NB, unskew)
    return value, E


def dtw_hvp(theta, Z, la, lb, band, reg, gamma):
    xp = _namespace(theta)
    B, NA, NB = theta.shape
    value, R, Q, Qdot, end, unskew = _dtw_forward(xp, theta, la, lb, band, REGS[reg], gamma, Z=Z)
    if B == 0:
        return value, xp.zeros_like(theta), xp.zeros_like(theta)
    E, Edot = _dtw_backward(xp, value, Q, Qdot, end, NA, NB, unskew)
    return value, E, Edot


def dtw_path(theta, la, lb, band):
    value, Y = dtw_grad(theta, la, lb, band, 2, 1.0)
    return value, Y


# ---------------------------------------------------------------------------
# Viterbi


def _viterbi_forward(xp, theta, lengths, reg, gamma, Z=None):
    B, T, S, _ = theta.shape
    dt = theta.dtype
    dev = _device(theta)
    L = xp.asarray(to_host(lengths).astype(np.int64), device=dev)
    V = xp.zeros((B, S), dtype=dt, device=dev)
    Vdot = xp.zeros((B, S), dtype=dt, device=dev)
    Q, Qdot = [], []
    for t in range(T):
        active = (L > t)[:, None]
        x = theta[:, t, :, :] + V[:, None, :]
        val, q = max_value_grad(xp, x, reg, gamma)
        q = xp.where(active[..., None], q, xp.zeros_like(q))
        Q.append(q)
        if Z is not None:
            u = Z[:, t, :, :] + Vdot[:, None, :]
            u = xp.where(q > 0, u, xp.zeros_like(u))
            Qdot.append(hessian_product(xp, q, u, reg, gamma))
            Vdot = xp.where(active, xp.sum(q * u, axis=-1), Vdot)
        V = xp.where(active, val, V)
    value, qf = max_value_grad(xp, V, reg, gamma)
    qfdot = None
    if Z is not None:
        qfdot = hessian_product(xp, qf, xp.where(qf > 0, Vdot, xp.zeros_like(Vdot)), reg, gamma)
    return value, Q, Qdot, qf, qfdot, L


def _viterbi_backward(xp, Q, Qdot, qf, qfdot, L, T):
    hvp = qfdot is not None
    ebar, ebar_dot = qf, qfdot
    E = [None] * T
    Ed = [None] * T
    for t in range(T - 1, -1, -1):
        active = (L > t)[:, None]
        e = ebar[:, :, None] * Q[t]
        E[t] = e
        new = xp.sum(e, axis=1)
        if hvp:
            ed = ebar_dot[:, :, None] * Q[t] + ebar[:, :, None] * Qdot[t]
            Ed[t] = ed
            ebar_dot = xp.where(active, xp.sum(ed, axis=1), ebar_dot)
        ebar = xp.where(active, new, ebar)
    Es = xp.stack(E, axis=1)
    return Es, (xp.stack(Ed, axis=1) if hvp else None)


def viterbi_value(theta, lengths, reg, gamma):
    xp = _namespace(theta)
    return _viterbi_forward(xp, theta, lengths, REGS[reg], gamma)[0]


def viterbi_grad(theta, lengths, reg, gamma):
    xp = _namespace(theta)
    value, Q, Qdot, qf, qfdot, L = _viterbi_forward(xp, theta, lengths, REGS[reg], gamma)
    E, _ = _viterbi_backward(xp, Q, Qdot, qf, qfdot, L, theta.shape[1])
    return value, E


def viterbi_hvp(theta, Z, lengths, reg, gamma):
    xp = _namespace(theta)
    value, Q, Qdot, qf, qfdot, L = _viterbi_forward(xp, theta, lengths, REGS[reg], gamma, Z=Z)
    E, Edot = _viterbi_backward(xp, Q, Qdot, qf, qfdot, L, theta.shape[1])
    return value, E, Edot


def viterbi_decode(theta, lengths):
    xp = _namespace(theta)
    value, E = viterbi_grad(theta, lengths, 2, 1.0)
    marg = xp.sum(E, axis=-1)  # (B, T, S), one-hot where t < length
    tags = xp.argmax(marg, axis=-1)
    has = xp.sum(marg, axis=-1) > 0
    tags = xp.where(has, xp.astype(tags, xp.int64), xp.full_like(xp.astype(tags, xp.int64), -1))
    return value, tags


# ---------------------------------------------------------------------------
# Factorised Viterbi (CRF): emissions (B, T, S), transitions (S, S) [from, to],
# start, end (S,). Same recursion as smoothmax/_core/crf.pyx (docs/crf.md):
# V_0 = start + emissions[0], V_t(i) = emissions[t, i] + max_Ω_j(transitions[j, i] + V_{t-1}(j)),
# value = max_Ω_i(V_{L-1}(i) + end[i]). Only V (and Vdot) are kept; the reverse
# pass recomputes each step's weights, so no (B, T, S, S) array is formed.


def _crf_step(xp, At, V, reg, gamma):
    """``max_Ω_j(At[i, j] + V[b, j])`` and its weights ``q (B, S, S)`` for one step."""
    return max_value_grad(xp, At[None, :, :] + V[:, None, :], reg, gamma)


def _crf_passes(emissions, transitions, start, end, lengths, weights, reg, gamma, Z=None,
                value_only=False):
    xp = _namespace(emissions)
    B, T, S = emissions.shape
    dt = emissions.dtype
    dev = _device(emissions)
    reg = REGS[reg]
    L = xp.asarray(to_host(lengths).astype(np.int64), device=dev)
    At = xp.permute_dims(xp.asarray(transitions, dtype=dt, device=dev), (1, 0))
    start = xp.asarray(start, dtype=dt, device=dev)
    end = xp.asarray(end, dtype=dt, device=dev)
    hvp = Z is not None
    if hvp:
        Ze, ZA, Zs, Zen = (xp.asarray(z, dtype=dt, device=dev) for z in Z)
        ZAt = xp.permute_dims(ZA, (1, 0))
    V = start[None, :] + emissions[:, 0, :]
    Vd: Any = (Zs[None, :] + Ze[:, 0, :]) if hvp else None
    hist, hist_d = [V], [Vd]
    for t in range(1, T):
        active = (L > t)[:, None]
        val, q = _crf_step(xp, At, V, reg, gamma)
        if hvp:
            u = xp.where(q > 0, ZAt[None, :, :] + Vd[:, None, :], xp.zeros_like(q))
            Vd = xp.where(active, Ze[:, t, :] + xp.sum(q * u, axis=-1), Vd)
        V = xp.where(active, emissions[:, t, :] + val, V)
        hist.append(V)
        hist_d.append(Vd)
    value, eb = max_value_grad(xp, V + end[None, :], reg, gamma)
    if value_only:
        return value
    w = xp.ones((B,), dtype=dt, device=dev) if weights is None else xp.asarray(
        to_host(weights), dtype=dt, device=dev)
    wcol = w[:, None]
    vdot: Any = None
    ebd: Any = None
    if hvp:
        u = xp.where(eb > 0, Vd + Zen[None, :], xp.zeros_like(Vd))
        vdot = xp.sum(eb * u, axis=-1)
        ebd = hessian_product(xp, eb, u, reg, gamma)
    g_end = xp.sum(wcol * (ebd if hvp else eb), axis=0)
    gAt = xp.zeros((S, S), dtype=dt, device=dev)
    ge = [None] * T
    zero = xp.zeros((B, S), dtype=dt, device=dev)
    for t in range(T - 1, 0, -1):
        active = (L > t)[:, None]
        ge[t] = xp.where(active, ebd if hvp else eb, zero)
        _, q = _crf_step(xp, At, hist[t - 1], reg, gamma)
        e = eb[:, :, None] * q
        if hvp:
            u = xp.where(q > 0, ZAt[None, :, :] + hist_d[t - 1][:, None, :], xp.zeros_like(q))
            ed = ebd[:, :, None] * q + eb[:, :, None] * hessian_product(xp, q, u, reg, gamma)
            gAt = gAt + xp.sum(xp.where(active[..., None], wcol[..., None] * ed, xp.zeros_like(ed)), axis=0)
            ebd = xp.where(active, xp.sum(ed, axis=1), ebd)
        else:
            gAt = gAt + xp.sum(xp.where(active[..., None], wcol[..., None] * e, xp.zeros_like(e)), axis=0)
        eb = xp.where(active, xp.sum(e, axis=1), eb)
    ge[0] = ebd if hvp else eb
    g_start = xp.sum(wcol * ge[0], axis=0)
    out = (xp.stack(ge, axis=1), xp.permute_dims(gAt, (1, 0)), g_start, g_end)
    return (vdot if hvp else value,) + out


def crf_value(emissions, transitions, start, end, lengths, reg, gamma):
    return _crf_passes(emissions, transitions, start, end, lengths, None, reg, gamma,
                       value_only=True)


def crf_grad(emissions, transitions, start, end, lengths, weights, reg, gamma):
    return _crf_passes(emissions, transitions, start, end, lengths, weights, reg, gamma)


def crf_hvp(emissions, transitions, start, end, Ze, ZA, Zs, Zen, lengths, weights, reg, gamma):
    return _crf_passes(emissions, transitions, start, end, lengths, weights, reg, gamma,
                       Z=(Ze, ZA, Zs, Zen))


def crf_decode(emissions, transitions, start, end, lengths):
    xp = _namespace(emissions)
    value, ge = crf_grad(emissions, transitions, start, end, lengths, None, 2, 1.0)[:2]
    tags = xp.astype(xp.argmax(ge, axis=-1), xp.int64)  # one-hot rows where t < length
    has = xp.sum(ge, axis=-1) > 0
    return value, xp.where(has, tags, xp.full_like(tags, -1))


def _namespace(x):
    from ._array_api import array_namespace

    return array_namespace(x)

from ._reference_dag import dag_grad, dag_hvp, dag_path, dag_value  # noqa: E402,F401  (the "dag" structure)


# ---------------------------------------------------------------------------
# DTW between features through the cost matrix (quadratic memory): the
# engine of the namespaces without the compiled feature kernel, and the
# readable definition of the costs and their chain rule.


def pairwise_cost(xp, x, y, cost):
    """``C[..., i, j] = c(x[..., i, :], y[..., j, :])``, shape (..., NA, NB).

    sqeuclidean ``‖x_i − y_j‖²``, euclidean ``‖x_i − y_j‖``, cosine
    ``1 − <x_i, y_j>/(‖x_i‖‖y_j‖)`` (a zero row counts as orthogonal to all).
    """
    if cost == "cosine":
        xh, yh = _unit_rows(xp, x)[0], _unit_rows(xp, y)[0]
        return 1.0 - xp.matmul(xh, xp.matrix_transpose(yh))
    diff = x[..., :, None, :] - y[..., None, :, :]
    C = xp.sum(diff * diff, axis=-1)
    return xp.sqrt(C) if cost == "euclidean" else C


def _unit_rows(xp, x):
    """Rows of ``x`` scaled to norm 1, and 1/‖row‖ (both 0 for a zero row)."""
    n = xp.sqrt(xp.sum(x * x, axis=-1))
    inv = xp.where(n > 0, 1.0 / xp.where(n > 0, n, 1.0), 0.0)
    return x * inv[..., None], inv


def cost_chain_rule(xp, x, y, E, cost):
    """``(grad_x, grad_y)`` of ``<E, C(x, y)>`` for a fixed weight matrix ``E`` (..., NA, NB).

    For the Euclidean cost the cells where ``x_i = y_j`` contribute 0.
    """
    Et = xp.matrix_transpose(E)
    if cost == "cosine":
        xh, ix = _unit_rows(xp, x)
        yh, iy = _unit_rows(xp, y)
        ES = E * xp.matmul(xh, xp.matrix_transpose(yh))
        gx = -(xp.matmul(E, yh) - xp.sum(ES, axis=-1)[..., None] * xh) * ix[..., None]
        gy = -(xp.matmul(Et, xh) - xp.sum(ES, axis=-2)[..., None] * yh) * iy[..., None]
        return gx, gy
    if cost == "euclidean":
        C = pairwise_cost(xp, x, y, "sqeuclidean")
        pos = C > 0
        W = xp.where(pos, E / xp.sqrt(xp.where(pos, C, 1.0)), 0.0)
    else:
        W = 2.0 * E
    Wt = xp.matrix_transpose(W)
    gx = xp.sum(W, axis=-1)[..., None] * x - xp.matmul(W, y)
    gy = xp.sum(Wt, axis=-1)[..., None] * y - xp.matmul(Wt, x)
    return gx, gy
