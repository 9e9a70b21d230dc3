# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Compiled DTW_Ω engine (SPEC §4, docs/engines.md).

R[0, 0] = 0, R[i, 0] = R[0, j] = +inf and
R[i, j] = theta[i-1, j-1] + min_Ω(R[i-1, j], R[i, j-1], R[i-1, j-1]) with
min_Ω(r) = -max_Ω(-r) on all three predecessors everywhere.

Design: both kernels store the local weights q (3 per cell, order up, left,
diagonal) in the forward pass, so that the reverse pass
E[i, j] = Σ_children ebar_child·q_child[toward (i, j)] needs no exp, is
accurate in float32 and never meets ``inf - inf``.

* ``_dtw_diagonals`` (value, gradient, hard path) sweeps anti-diagonals
  d = i + j: the cells of one diagonal are independent, so the per-diagonal
  loops in ``simd.h`` are vectorized (branch-free operators, inline
  exp/log). R and ebar live in three rolling diagonal buffers of NA + 2
  doubles; q is stored diagonal by diagonal, compactly (only the cells of the
  problem and band), 3·la·lb values. The value alone stores no q.
* ``_dtw_rows`` (HVP) runs the passes row by row with the generic operators of
  ``operators.pxd``; it stores q and qdot and keeps rolling rows of R, Rdot.

Cells outside the Sakoe-Chiba band or past the lengths are +inf in R and
exactly 0 in q, E, Edot. All arithmetic is in double; theta, Z, E, Edot (and
the stored q) use the caller's dtype. The batch loop is a ``prange`` with a
per-thread workspace.
"""
from cython.parallel cimport prange, parallel
from libc.stdlib cimport malloc, free
from libc.math cimport INFINITY

import numpy as np

from cython cimport floating

from .operators cimport max_omega, max_omega_hvp, sm_init_isa, sm_isa_name


cdef extern from "simd.h" nogil:
    void sm_dtw_fwd_d(Py_ssize_t n, const double* theta, const double* up, const double* left, const double* dg,
                      double* out, double* qu, double* ql, double* qd,
                      int reg, double gamma)
    void sm_dtw_fwd_f(Py_ssize_t n, const double* theta, const double* up, const double* left, const double* dg,
                      double* out, float* qu, float* ql, float* qd,
                      int reg, double gamma)
    void sm_dtw_bwd_d(Py_ssize_t n, const double* eu, const double* el,
                      const double* ed, const double* qu, const double* ql,
                      const double* qd, double* out)
    void sm_dtw_bwd_f(Py_ssize_t n, const double* eu, const double* el,
                      const double* ed, const float* qu, const float* ql,
                      const float* qd, double* out)


sm_init_isa()


def _simd_isa():
    """Which build of the anti-diagonal kernels runs on this CPU (for benchmarks)."""
    return sm_isa_name().decode()


cdef enum:
    MODE_VALUE = 0
    MODE_GRAD = 1
    MODE_HVP = 2


cdef inline bint _in_band(Py_ssize_t i, Py_ssize_t j, Py_ssize_t n, Py_ssize_t m,
                          Py_ssize_t r) noexcept nogil:
    """0-based cell (i, j) of an n×m problem inside tslearn's Sakoe-Chiba mask."""
    if r < 0:
        return True
    if n <= m:
        return i - r <= j and j <= i + (m - n) + r
    return j - r <= i and i <= j + (n - m) + r


cdef inline Py_ssize_t _rows_work(Py_ssize_t NA, Py_ssize_t NB, int mode) noexcept nogil:
    """Doubles of workspace ``_dtw_rows`` needs for problems up to NA×NB."""
    return 8 * (NB + 2) + 12 + 3 * NA * NB * mode


cdef double _dtw_rows(const floating* theta, const floating* Z,
                      floating* E, floating* Ed, Py_ssize_t NB,
                      Py_ssize_t la, Py_ssize_t lb, Py_ssize_t band,
                      int reg, double gamma, int mode, double* work) noexcept nogil:
    """One problem theta[:la, :lb] (row stride NB); returns R[la, lb].

    Fills E (mode >= 1) and Edot (mode 2) on [:la, :lb]; they must be zero on
    entry (the caller allocates them with zeros).
    """
    cdef Py_ssize_t W = lb + 2
    cdef double* R = work             # row i-1 of R
    cdef double* Rn = work + W        # row i
    cdef double* Rd = work + 2 * W    # Rdot, row i-1
    cdef double* Rdn = work + 3 * W
    cdef double* eb = work + 4 * W    # ebar, row i+1
    cdef double* ebn = work + 5 * W   # ebar, row i
    cdef double* ebd = work + 6 * W
    cdef double* ebdn = work + 7 * W
    cdef double* x = work + 8 * W
    cdef double* loc = x + 3
    cdef double* u = x + 6
    cdef double* h = x + 9
    cdef double* Q = x + 12           # 3 weights per cell (mode >= 1)
    cdef double* Qd = Q + 3 * la * lb  # their tangents (mode 2)
    cdef double* tmp
    cdef double mv, acc, e, ed, value
    cdef Py_ssize_t i, j, k, c, cu, cl, cd

    R[0] = 0.0
    Rd[0] = 0.0
    for j in range(1, lb + 1):
        R[j] = INFINITY
        Rd[j] = 0.0
    for i in range(1, la + 1):
        Rn[0] = INFINITY
        Rdn[0] = 0.0
        for j in range(1, lb + 1):
            k = 3 * ((i - 1) * lb + (j - 1))
            if not _in_band(i - 1, j - 1, la, lb, band):
                Rn[j] = INFINITY
                Rdn[j] = 0.0
                if mode >= MODE_GRAD:
                    Q[k] = 0.0; Q[k + 1] = 0.0; Q[k + 2] = 0.0
                if mode == MODE_HVP:
                    Qd[k] = 0.0; Qd[k + 1] = 0.0; Qd[k + 2] = 0.0
                continue
            x[0] = -R[j]
            x[1] = -Rn[j - 1]
            x[2] = -R[j - 1]
            mv = max_omega(x, loc, 3, reg, gamma)
            Rn[j] = theta[(i - 1) * NB + (j - 1)] - mv  # mv = -inf: unreachable, +inf
            if mode == MODE_VALUE:
                continue
            Q[k] = loc[0]; Q[k + 1] = loc[1]; Q[k + 2] = loc[2]
            if mode == MODE_HVP:
                u[0] = Rd[j]
                u[1] = Rdn[j - 1]
                u[2] = Rd[j - 1]
                acc = 0.0
                for c in range(3):
                    if loc[c] != 0.0:
                        acc += loc[c] * u[c]
                Rdn[j] = Z[(i - 1) * NB + (j - 1)] + acc
                max_omega_hvp(loc, u, h, 3, reg, gamma)  # qdot = -H(-r)·rdot
                Qd[k] = -h[0]; Qd[k + 1] = -h[1]; Qd[k + 2] = -h[2]
        tmp = R; R = Rn; Rn = tmp
        tmp = Rd; Rd = Rdn; Rdn = tmp
    value = R[lb]
    if mode == MODE_VALUE or value == INFINITY:
        return value  # unreachable end cell: E = 0

    # reverse pass, pull form: ebar(i, j) = ebar(i+1, j)·q_up(i+1, j)
    #   + ebar(i, j+1)·q_left(i, j+1) + ebar(i+1, j+1)·q_diag(i+1, j+1)
    for j in range(W):
        eb[j] = 0.0
        ebd[j] = 0.0
        ebn[j] = 0.0
        ebdn[j] = 0.0
    for i in range(la, 0, -1):
        for j in range(lb, 0, -1):
            if i == la and j == lb:
                ebn[j] = 1.0
                ebdn[j] = 0.0
                E[(i - 1) * NB + (j - 1)] = 1.0
                continue
            e = 0.0
            ed = 0.0
            if i < la:
                cu = 3 * (i * lb + (j - 1))
                e += eb[j] * Q[cu]
                if mode == MODE_HVP:
                    ed += ebd[j] * Q[cu] + eb[j] * Qd[cu]
            if j < lb:
                cl = 3 * ((i - 1) * lb + j) + 1
                e += ebn[j + 1] * Q[cl]
                if mode == MODE_HVP:
                    ed += ebdn[j + 1] * Q[cl] + ebn[j + 1] * Qd[cl]
            if i < la and j < lb:
                cd = 3 * (i * lb + j) + 2
                e += eb[j + 1] * Q[cd]
                if mode == MODE_HVP:
                    ed += ebd[j + 1] * Q[cd] + eb[j + 1] * Qd[cd]
            ebn[j] = e
            ebdn[j] = ed
            E[(i - 1) * NB + (j - 1)] = <floating> e
            if mode == MODE_HVP:
                Ed[(i - 1) * NB + (j - 1)] = <floating> ed
        tmp = eb; eb = ebn; ebn = tmp
        tmp = ebd; ebd = ebdn; ebdn = tmp
    return value

cdef enum:
    QPAD = 4  # zero padding around each stored-q segment


cdef inline Py_ssize_t _floor_half(Py_ssize_t a) noexcept nogil:
    return (a - (a & 1)) // 2


cdef inline void _diag_range(Py_ssize_t d, Py_ssize_t la, Py_ssize_t lb, Py_ssize_t r,
                             Py_ssize_t* lo, Py_ssize_t* hi) noexcept nogil:
    """Rows i (1-based) of the cells (i, d - i) of anti-diagonal d to compute.

    The cells of the problem, 1 <= i <= la, 1 <= d - i <= lb, intersected with
    the band (_in_band with i - 1, d - i - 1). Both ends are non-decreasing in
    d by steps of at most 1, which the buffer logic below relies on.
    """
    cdef Py_ssize_t a = max(1, d - lb), z = min(la, d - 1)
    if r >= 0:
        if la <= lb:  # -r <= d - 2i <= (lb - la) + r
            a = max(a, _floor_half(d - (lb - la) - r + 1))
            z = min(z, _floor_half(d + r))
        else:         # -r <= 2i - d <= (la - lb) + r
            a = max(a, _floor_half(d - r + 1))
            z = min(z, _floor_half(d + (la - lb) + r))
    lo[0] = a
    hi[0] = z


cdef inline Py_ssize_t _q_segment(Py_ssize_t NA, Py_ssize_t NB) noexcept nogil:
    """Length of one stored-q segment (q_up, q_left or q_diag) with its pads."""
    return NA * NB + NA + 4 * QPAD


cdef enum:
    BLOCK = 8  # diagonals of theta / E moved at a time between rows and diagonals


cdef void _gather_block(const floating* theta, Py_ssize_t NB, double* blk, Py_ssize_t W,
                        Py_ssize_t d0, Py_ssize_t d1, const Py_ssize_t* lo,
                        const Py_ssize_t* hi) noexcept nogil:
    """blk[(d - d0)·W + i] = theta[i - 1, d - i - 1] for the cells of diagonals d0..d1.

    Row by row, so each row of theta is read once (contiguously) per block.
    """
    cdef Py_ssize_t i, d
    cdef const floating* row
    for i in range(lo[d0], hi[d1] + 1):
        row = theta + (i - 1) * NB - 1
        for d in range(d0, d1 + 1):
            if lo[d] <= i <= hi[d]:
                blk[(d - d0) * W + i] = row[d - i]


cdef void _scatter_block(floating* E, Py_ssize_t NB, const double* blk, Py_ssize_t W,
                         Py_ssize_t d0, Py_ssize_t d1, const Py_ssize_t* lo,
                         const Py_ssize_t* hi) noexcept nogil:
    """E[i - 1, d - i - 1] = blk[(d - d0)·W + i], the inverse of ``_gather_block``."""
    cdef Py_ssize_t i, d
    cdef floating* row
    for i in range(lo[d0], hi[d1] + 1):
        row = E + (i - 1) * NB - 1
        for d in range(d0, d1 + 1):
            if lo[d] <= i <= hi[d]:
                row[d - i] = <floating> blk[(d - d0) * W + i]


cdef inline Py_ssize_t _diag_work(Py_ssize_t NA) noexcept nogil:
    """Doubles of workspace for ``_dtw_diagonals`` (R/ebar buffers and a block)."""
    return (3 + BLOCK) * (NA + 2)


cdef double _dtw_diagonals(const floating* theta, floating* E, Py_ssize_t NA,
                           Py_ssize_t NB, Py_ssize_t la, Py_ssize_t lb,
                           Py_ssize_t band, int reg, double gamma,
                           double* wd, Py_ssize_t* wi, floating* wq) noexcept nogil:
    """Value of one problem by anti-diagonals; E too when ``wq`` is not NULL.

    wd: _diag_work(NA) doubles; wi: 3·(NA + NB + 3) ints; wq: 3·_q_segment
    values or NULL. E must be zero on entry. Buffer ``c`` of R (and later of
    ebar) holds diagonal d with d % 3 == c, indexed by the row i; outside the
    cells written for that diagonal it is +inf (0 for ebar), so reads one
    cell past the computed range see the border.
    """
    cdef Py_ssize_t W = NA + 2, D = la + lb, S = _q_segment(NA, NB)
    cdef Py_ssize_t d, i, i0, i1, n, c, d0, total = 0
    cdef Py_ssize_t* lo = wi
    cdef Py_ssize_t* hi = wi + (D + 3)
    cdef Py_ssize_t* off = wi + 2 * (D + 3)
    cdef Py_ssize_t wlo[3]
    cdef Py_ssize_t whi[3]
    cdef double* buf[3]
    cdef double* blk = wd + 3 * W
    cdef double* cur
    cdef double* p1
    cdef double* p2
    cdef floating* qU = NULL
    cdef floating* qL = NULL
    cdef floating* qD = NULL
    cdef floating* qd2
    cdef double value
    cdef bint grad = wq != NULL

    if grad:
        qU = wq + QPAD
        qL = wq + S + QPAD
        qD = wq + 2 * S + QPAD
    for d in range(2, D + 1):
        _diag_range(d, la, lb, band, &lo[d], &hi[d])
        off[d] = total
        total += max(0, hi[d] - lo[d] + 1)
    for c in range(3):
        buf[c] = wd + c * W
        for i in range(W):
            buf[c][i] = INFINITY
        wlo[c] = 1
        whi[c] = 0
    buf[0][0] = 0.0  # R[0, 0] on diagonal 0
    wlo[0] = 0
    whi[0] = 0
    for d in range(2, D + 1):
        if (d - 2) % BLOCK == 0:
            _gather_block(theta, NB, blk, W, d, min(d + BLOCK - 1, D), lo, hi)
        c = d % 3
        cur = buf[c]
        p1 = buf[(d - 1) % 3]
        p2 = buf[(d - 2) % 3]
        for i in range(wlo[c], whi[c] + 1):  # forget diagonal d - 3
            cur[i] = INFINITY
        i0 = lo[d]
        i1 = hi[d]
        n = i1 - i0 + 1
        if n <= 0:
            wlo[c] = 1
            whi[c] = 0
            continue
        if floating is double:
            sm_dtw_fwd_d(n, blk + ((d - 2) % BLOCK) * W + i0,
                         p1 + i0 - 1, p1 + i0, p2 + i0 - 1, cur + i0,
                         qU + off[d] if grad else NULL, qL + off[d] if grad else NULL,
                         qD + off[d] if grad else NULL, reg, gamma)
        else:
            sm_dtw_fwd_f(n, blk + ((d - 2) % BLOCK) * W + i0,
                         p1 + i0 - 1, p1 + i0, p2 + i0 - 1, cur + i0,
                         qU + off[d] if grad else NULL, qL + off[d] if grad else NULL,
                         qD + off[d] if grad else NULL, reg, gamma)
        wlo[c] = i0
        whi[c] = i1
    value = buf[D % 3][la]
    if not grad or value == INFINITY:
        return value  # unreachable end cell: E = 0

    # zero the pads: reads one cell past a diagonal's stored range land there
    for c in range(3):
        for i in range(-QPAD, 0):
            wq[c * S + QPAD + i] = 0
        for i in range(total, min(S - QPAD, total + NA + 2 * QPAD)):
            wq[c * S + QPAD + i] = 0
    # reverse pass, buffers now hold ebar
    for c in range(3):
        for i in range(W):
            buf[c][i] = 0.0
        wlo[c] = 1
        whi[c] = 0
    buf[D % 3][la] = 1.0
    wlo[D % 3] = la
    whi[D % 3] = la
    E[(la - 1) * NB + (lb - 1)] = 1.0
    for d in range(D - 1, 1, -1):
        c = d % 3
        cur = buf[c]
        p1 = buf[(d + 1) % 3]
        p2 = buf[(d + 2) % 3]
        for i in range(wlo[c], whi[c] + 1):  # forget diagonal d + 3
            cur[i] = 0.0
        i0 = lo[d]
        i1 = hi[d]
        n = i1 - i0 + 1
        wlo[c] = i0
        whi[c] = i1
        if n > 0:
            # weights of (i+1, j) [up], (i, j+1) [left], (i+1, j+1) [diag] toward (i, j)
            if d + 2 <= D:
                qd2 = qD + off[d + 2] + (i0 + 1 - lo[d + 2])
            else:
                qd2 = qD + total  # zero pad; ebar of diagonal D + 1 is 0 anyway
            if floating is double:
                sm_dtw_bwd_d(n, p1 + i0 + 1, p1 + i0, p2 + i0 + 1,
                             qU + off[d + 1] + (i0 + 1 - lo[d + 1]),
                             qL + off[d + 1] + (i0 - lo[d + 1]), qd2, cur + i0)
            else:
                sm_dtw_bwd_f(n, p1 + i0 + 1, p1 + i0, p2 + i0 + 1,
                             qU + off[d + 1] + (i0 + 1 - lo[d + 1]),
                             qL + off[d + 1] + (i0 - lo[d + 1]), qd2, cur + i0)
            for i in range(i0, i1 + 1):
                blk[((d - 2) % BLOCK) * W + i] = cur[i]
        if (d - 2) % BLOCK == 0:
            _scatter_block(E, NB, blk, W, d, min(d + BLOCK - 1, D - 1), lo, hi)
    return value


cdef void _dtw_batch(const floating[:, :, ::1] theta, const floating[:, :, ::1] Z,
                     const long long[::1] la, const long long[::1] lb,
                     Py_ssize_t band, int reg, double gamma, int mode, bint rows,
                     floating[::1] value, floating[:, :, ::1] E,
                     floating[:, :, ::1] Ed, signed char[::1] failed) noexcept:
    """Batch loop; ``rows`` picks ``_dtw_rows`` (always used for the HVP)."""
    cdef Py_ssize_t B = theta.shape[0], NA = theta.shape[1], NB = theta.shape[2]
    cdef Py_ssize_t b
    cdef double* wd = NULL
    cdef Py_ssize_t* wi = NULL
    cdef floating* wq = NULL
    cdef bint ok
    rows = rows or mode == MODE_HVP
    with nogil, parallel():
        if rows:
            wd = <double*> malloc(_rows_work(NA, NB, mode) * sizeof(double))
            wi = NULL
            wq = NULL
            ok = wd != NULL
        else:
            wd = <double*> malloc(_diag_work(NA) * sizeof(double))
            wi = <Py_ssize_t*> malloc(3 * (NA + NB + 3) * sizeof(Py_ssize_t))
            wq = NULL
            if mode == MODE_GRAD:
                wq = <floating*> malloc(3 * _q_segment(NA, NB) * sizeof(floating))
            ok = wd != NULL and wi != NULL and (wq != NULL or mode != MODE_GRAD)
        for b in prange(B, schedule="dynamic"):
            if not ok:
                failed[b] = 1
            elif rows:
                value[b] = <floating> _dtw_rows(
                    &theta[b, 0, 0], &Z[b, 0, 0] if mode == MODE_HVP else NULL,
                    &E[b, 0, 0] if mode != MODE_VALUE else NULL,
                    &Ed[b, 0, 0] if mode == MODE_HVP else NULL,
                    NB, la[b], lb[b], band, reg, gamma, mode, wd)
            else:
                value[b] = <floating> _dtw_diagonals(
                    &theta[b, 0, 0], &E[b, 0, 0] if mode != MODE_VALUE else NULL,
                    NA, NB, la[b], lb[b], band, reg, gamma, wd, wi, wq)
        free(wd)
        free(wi)
        free(wq)


def _run(theta, Z, la, lb, Py_ssize_t band, int reg, double gamma, int mode,
         bint rows=False):
    B, NA, NB = theta.shape
    value = np.empty(B, dtype=theta.dtype)
    empty = np.zeros((0, 1, 1), dtype=theta.dtype)
    E = np.zeros(theta.shape, dtype=theta.dtype) if mode != MODE_VALUE else empty
    Ed = np.zeros(theta.shape, dtype=theta.dtype) if mode == MODE_HVP else empty
    Zarr = Z if mode == MODE_HVP else empty
    failed = np.zeros(B, dtype=np.int8)
    if B > 0 and NA > 0 and NB > 0:
        if theta.dtype == np.float64:
            _dtw_batch[double](theta, Zarr, la, lb, band, reg, gamma, mode, rows,
                               value, E, Ed, failed)
        else:
            _dtw_batch[float](theta, Zarr, la, lb, band, reg, gamma, mode, rows,
                              value, E, Ed, failed)
    if failed.any():
        raise MemoryError("smoothmax._core.dtw: could not allocate the workspace")
    return value, E, Ed


def dtw_value(theta, la, lb, Py_ssize_t band, int reg, double gamma):
    """DTW_Ω per batch item: ``theta (B, NA, NB)``, ``la, lb (B,)`` int64."""
    return _run(theta, None, la, lb, band, reg, gamma, MODE_VALUE)[0]


def dtw_grad(theta, la, lb, Py_ssize_t band, int reg, double gamma):
    """``(value (B,), E (B, NA, NB))``, E = ∇DTW_Ω (the expected alignment)."""
    value, E, _ = _run(theta, None, la, lb, band, reg, gamma, MODE_GRAD)
    return value, E


def dtw_hvp(theta, Z, la, lb, Py_ssize_t band, int reg, double gamma):
    """``(value, E, Edot)`` with Edot = ∇²DTW_Ω(theta)·Z (SPEC §2)."""
    return _run(theta, Z, la, lb, band, reg, gamma, MODE_HVP)


def dtw_path(theta, la, lb, Py_ssize_t band):
    """``(cost (B,), Y (B, NA, NB))``: hard DTW, Y the 0/1 optimal alignment.

    The hard operator's gradient is the one-hot first argmin (up, left,
    diagonal), so Y is the gradient of hard DTW and cost its value.
    """
    value, Y, _ = _run(theta, None, la, lb, band, 2, 1.0, MODE_GRAD)
    return value, Y
