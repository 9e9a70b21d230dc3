# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Compiled DTW_Ω engine (SPEC §4, docs/engines.md).

R[0, 0] = 0, R[i, 0] = R[0, j] = +inf and
R[i, j] = theta[i-1, j-1] + min_Ω(R[i-1, j], R[i, j-1], R[i-1, j-1]) with
min_Ω(r) = -max_Ω(-r) on all three predecessors everywhere.

Design: ``_dtw_rows`` runs the passes row by row with two rolling rows of R
(and of Rdot). For the gradient it stores the local weights q (3 per cell,
order up, left, diagonal) so that the reverse pass
E[i, j] = Σ_children ebar_child·q_child[toward (i, j)] needs no exp and never
meets ``inf - inf``; the HVP also stores qdot (SPEC §2). Cells outside the
Sakoe-Chiba band or past the lengths are +inf in R and exactly 0 in q, E, Edot.
All arithmetic is in double; theta, Z, E, Edot use the caller's dtype.
The batch loop is a ``prange`` with a per-thread workspace.
"""
from cython.parallel cimport prange, parallel
from libc.stdlib cimport malloc, free
from libc.math cimport INFINITY

import numpy as np

from cython cimport floating

from .operators cimport max_omega, max_omega_hvp


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


cdef void _dtw_batch(const floating[:, :, ::1] theta, const floating[:, :, ::1] Z,
                     const long long[::1] la, const long long[::1] lb,
                     Py_ssize_t band, int reg, double gamma, int mode,
                     floating[::1] value, floating[:, :, ::1] E,
                     floating[:, :, ::1] Ed, signed char[::1] failed) noexcept nogil:
    cdef Py_ssize_t B = theta.shape[0], NA = theta.shape[1], NB = theta.shape[2]
    cdef Py_ssize_t b
    cdef double* work
    cdef const floating* zp
    cdef floating* ep
    cdef floating* edp
    work = NULL
    with parallel():
        work = <double*> malloc(_rows_work(NA, NB, mode) * sizeof(double))
        for b in prange(B, schedule="dynamic"):
            if work == NULL:
                failed[b] = 1
                continue
            zp = &Z[b, 0, 0] if mode == MODE_HVP else NULL
            ep = &E[b, 0, 0] if mode != MODE_VALUE else NULL
            edp = &Ed[b, 0, 0] if mode == MODE_HVP else NULL
            value[b] = <floating> _dtw_rows(&theta[b, 0, 0], zp, ep, edp, NB,
                                            la[b], lb[b], band, reg, gamma, mode, work)
        free(work)


def _run(theta, Z, la, lb, Py_ssize_t band, int reg, double gamma, int mode):
    B, NA, NB = theta.shape
    value = np.empty(B, dtype=theta.dtype)
    empty = np.zeros((0, 1, 1), dtype=theta.dtype)
    E = np.zeros(theta.shape, dtype=theta.dtype) if mode != MODE_VALUE else empty
    Ed = np.zeros(theta.shape, dtype=theta.dtype) if mode == MODE_HVP else empty
    Zarr = Z if mode == MODE_HVP else empty
    failed = np.zeros(B, dtype=np.int8)
    if B > 0 and NA > 0 and NB > 0:
        if theta.dtype == np.float64:
            _dtw_batch[double](theta, Zarr, la, lb, band, reg, gamma, mode, value, E, Ed, failed)
        else:
            _dtw_batch[float](theta, Zarr, la, lb, band, reg, gamma, mode, value, E, Ed, failed)
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
