# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Compiled DTW_Ω between features, in linear memory (docs/spec.md §4, docs/engines.md).

The cost matrix is never formed: the cost ``theta[i, j] = c(x_i, y_j)`` of a
cell is computed when the cell is visited, and the gradient with respect to
the features is accumulated in the reverse pass from the cell's expected
alignment ``E[i, j]``, which is never stored either:
``grad_x[i] = Σ_j E[i, j] ∂c/∂x_i``, ``grad_y[j] = Σ_i E[i, j] ∂c/∂y_j``.

Design: the problem is cut into horizontal strips of ``h`` rows. A strip is
swept anti-diagonal by anti-diagonal (at most ``h`` cells each, the rows of x
of the strip and a window of ``h`` rows of y stay in cache) with the
per-diagonal operator kernels of ``simd.h`` shared with ``dtw.pyx``
(``dtw_fwd`` / ``dtw_bwd``); strips talk through one row of R
(forward) and one row of ready-made products ebar·q (reverse):

* value: strips in order, two rows of R (O(NB) memory);
* gradient, checkpointed: a first forward keeps R on the row above every
  strip (``nS`` rows of NB + 1), then the strips are visited last to first:
  each is recomputed from its checkpoint row storing its weights q (2 per
  cell, q_up and q_left; the reverse pass derives q_diag, as ``dtw.pyx``;
  ``2·h·NB`` values) and swept backward. With ``h ≈ √(NA / 2)`` the extra
  memory is ``≈ 2·√(2·NA)·NB`` doubles, O((NA + NB)·√NA) instead of the
  ``4·NA·NB`` values of ``theta``, q and ``E``; the work is two forward
  passes and one reverse pass. ``h = NA`` (one strip) is the stored
  backward, one forward storing q and one reverse, the special case the
  tests compare the checkpointed one with.

Types: features, R, ebar and the gradients are float64. For float32 inputs
(``single``) the operator's weight arithmetic and the stored weights are
float32, as the cost-matrix engine's are for a float32 ``theta`` (``simd.h``):
twice the lanes for the exps, half the weight memory.

Costs (``COST_*``): the caller passes ``X``, ``Y`` as float64 and, for the
cosine cost, the rows already normalised (``xhat``; zero rows stay zero) so
that ``c = 1 − <xhat_i, yhat_j>``; the kernel accumulates
``Gx[i] = Σ_j E (yhat_j − s·xhat_i)`` (``s = <xhat_i, yhat_j>``) and the
caller multiplies by ``−1/‖x_i‖`` (0 for a zero row). For ``euclidean``, the
cost ``‖x_i − y_j‖`` has no derivative where it is 0: the cell contributes 0
there (the minimum-norm subgradient).

Cells outside the Sakoe-Chiba band or past the lengths are +inf in R and
never visited. One thread per problem: the batch on the engine's thread pool
(``pool.pxd``, docs/threads.md; the
anti-diagonals of one strip are too short to share between threads without
a barrier per diagonal; see docs/decisions.md).
"""
from . cimport pool
from libc.stdlib cimport malloc, free
from libc.math cimport INFINITY
from cython cimport floating

import numpy as np

from .._buffers import workspace as _workspace

from .band cimport _diag_range
from .dtw_kernels cimport dtw_bwd, dtw_fwd, dtw_q_diag
from .operators cimport sm_init_isa


cdef extern from "costs.h" nogil:
    void sm_cost_diag(Py_ssize_t n, int cost, const double* x, const double* y, Py_ssize_t d,
                      double* out)
    void sm_cgrad_diag(Py_ssize_t n, int cost, const double* e, const double* x,
                       const double* y, Py_ssize_t d, double* gx, double* gy)


sm_init_isa()


cdef enum:
    COST_SQEUCLIDEAN = 0
    COST_EUCLIDEAN = 1
    COST_COSINE = 2
    QPAD = 4   # zero padding around each weight plane (reads one diagonal past a strip)


# Below this much work (B·NA·NB·(d + 1)) a call runs on one thread.
cdef double SMALL_WORK = 1 << 15

COSTS = {"sqeuclidean": COST_SQEUCLIDEAN, "euclidean": COST_EUCLIDEAN, "cosine": COST_COSINE}


ctypedef struct _Strip:
    # one problem: features, sizes, band, operator
    const double* X
    const double* Y
    Py_ssize_t d, la, lb, r
    int cost, reg
    double gamma


cdef Py_ssize_t _strip_ranges(const _Strip* p, Py_ssize_t i0, Py_ssize_t h,
                              Py_ssize_t* slo, Py_ssize_t* shi, Py_ssize_t* soff) noexcept nogil:
    """Local rows [slo[dl], shi[dl]] (1-based in the strip) of the cells of local
    diagonal dl = li + j, dl = 2 .. h + lb, and the offset of their weights in
    a q plane; dl = h + lb + 1, h + lb + 2 get an empty range (their weights
    point at the zero pad). Returns the number of cells."""
    cdef Py_ssize_t dl, a, z, total = 0, Dl = h + p.lb
    for dl in range(2):
        slo[dl] = 1
        shi[dl] = 0
        soff[dl] = 0
    for dl in range(2, Dl + 1):
        _diag_range(dl + i0 - 1, p.la, p.lb, p.r, &a, &z)
        a = max(max(a - i0 + 1, 1), dl - p.lb)
        z = min(min(z - i0 + 1, h), dl - 1)
        slo[dl] = a
        shi[dl] = z
        soff[dl] = total
        if z >= a:
            total += z - a + 1
    for dl in range(Dl + 1, Dl + 3):
        slo[dl] = h + 1
        shi[dl] = h
        soff[dl] = total
    return total


cdef inline Py_ssize_t _strip_work(Py_ssize_t h) noexcept nogil:
    """Doubles of workspace of a strip sweep: 3 rolling diagonals, a cost buffer
    and a diagonal of scratch weights."""
    return 5 * (h + 2)


cdef void _strip_fwd(const _Strip* p, Py_ssize_t i0, Py_ssize_t h, const double* Rin,
                     double* Rout, floating* q, Py_ssize_t P, double* wd,
                     const Py_ssize_t* slo, const Py_ssize_t* shi,
                     const Py_ssize_t* soff) noexcept nogil:
    """Forward over rows i0 .. i0 + h - 1 (1-based) from Rin = R[i0 - 1, 0 .. lb].

    Writes R[i0 + h - 1, 0 .. lb] into Rout (+inf off the computed cells) and,
    when q is not NULL, the weights into the planes q, q + P, q + 2P (up,
    left, diagonal; diagonal dl at offset soff[dl]). Rolling diagonal buffers
    are indexed by the local row 0 .. h + 1; entry 0 of diagonal dl is the
    cell (i0 - 1, dl) of Rin, every entry not written for a diagonal is +inf.
    """
    cdef Py_ssize_t W = h + 2, lb = p.lb, d = p.d, Dl = h + p.lb
    cdef Py_ssize_t dl, a, z, n, c, k, li
    cdef double* R[3]
    cdef Py_ssize_t wlo[3]
    cdef Py_ssize_t whi[3]
    cdef double* cb = wd + 3 * W
    cdef floating* qs = <floating*> (wd + 4 * W)  # q_diag of one diagonal (dtw_fwd)
    cdef double* cur
    cdef double* p1
    cdef double* p2
    for c in range(3):
        R[c] = wd + c * W
        for k in range(W):
            R[c][k] = INFINITY
        wlo[c] = 0
        whi[c] = -1
    for k in range(lb + 1):
        Rout[k] = INFINITY
    R[0][0] = Rin[0]
    wlo[0] = 0; whi[0] = 0
    if lb >= 1:
        R[1][0] = Rin[1]
    wlo[1] = 0; whi[1] = 0
    for dl in range(2, Dl + 1):
        c = dl % 3
        cur = R[c]
        p1 = R[(dl - 1) % 3]
        p2 = R[(dl - 2) % 3]
        for k in range(wlo[c], whi[c] + 1):  # forget diagonal dl - 3
            cur[k] = INFINITY
        a = slo[dl]
        z = shi[dl]
        n = z - a + 1
        wlo[c] = W
        whi[c] = -1
        if n > 0:
            # x row of local row a, y row of column dl - a; then +1 / -1 row per cell
            sm_cost_diag(n, p.cost, p.X + (i0 + a - 2) * d, p.Y + (dl - a - 1) * d, d, cb)
            if q != NULL:
                dtw_fwd(n, cb, p1 + a - 1, p1 + a, p2 + a - 1, cur + a,
                        q + soff[dl], q + P + soff[dl], qs, p.reg, p.gamma)
            else:
                dtw_fwd(n, cb, p1 + a - 1, p1 + a, p2 + a - 1, cur + a,
                        <floating*> NULL, <floating*> NULL, <floating*> NULL, p.reg, p.gamma)
            wlo[c] = a
            whi[c] = z
            if a <= h <= z:  # last row of the strip
                Rout[dl - h] = cur[h]
        if dl <= lb:  # cell (i0 - 1, dl) above the strip
            cur[0] = Rin[dl]
            wlo[c] = 0
            whi[c] = max(whi[c], 0)


cdef void _strip_bwd(const _Strip* p, Py_ssize_t i0, Py_ssize_t h, const double* Ein,
                     double* Eout, const floating* q, Py_ssize_t P, double* wd,
                     const Py_ssize_t* slo, const Py_ssize_t* shi, const Py_ssize_t* soff,
                     double* gx, double* gy) noexcept nogil:
    """Reverse over the strip of ``_strip_fwd`` (its weights in q), pull form.

    ebar(i, j) = ebar(i+1, j)·q_up(i+1, j) + ebar(i, j+1)·q_left(i, j+1)
    + ebar(i+1, j+1)·q_diag(i+1, j+1). The children in the row below the strip
    arrive as Ein[j] (their two products for column j, 0 for the last strip,
    whose cell (la, lb) gets ebar = 1); the first row sends its products to the
    row above through Eout (zeroed here). Each cell adds ebar·∇c to gx, gy.
    """
    cdef Py_ssize_t W = h + 2, lb = p.lb, d = p.d, Dl = h + p.lb
    cdef Py_ssize_t dl, a, z, n, c, k, li, j, pos
    cdef Py_ssize_t offU, offL, offD
    cdef double* eb[3]
    cdef Py_ssize_t wlo[3]
    cdef Py_ssize_t whi[3]
    cdef double* cur
    cdef double* p1
    cdef double* p2
    cdef const floating* qU = q
    cdef const floating* qL = q + P
    cdef bint last = i0 + h - 1 == p.la
    cdef double e
    for c in range(3):
        eb[c] = wd + c * W
        for k in range(W):
            eb[c][k] = 0.0
        wlo[c] = 1
        whi[c] = 0
    for k in range(lb + 2):
        Eout[k] = 0.0
    for dl in range(Dl, 1, -1):
        c = dl % 3
        cur = eb[c]
        p1 = eb[(dl + 1) % 3]
        p2 = eb[(dl + 2) % 3]
        for k in range(wlo[c], whi[c] + 1):  # forget diagonal dl + 3
            cur[k] = 0.0
        a = slo[dl]
        z = shi[dl]
        n = z - a + 1
        wlo[c] = a
        whi[c] = z
        if n <= 0:
            continue
        # weights of (li+1, j) [up], (li, j+1) [left], (li+1, j+1) [diag] toward (li, j)
        offU = soff[dl + 1] + (a + 1 - slo[dl + 1])
        offL = soff[dl + 1] + (a - slo[dl + 1])
        offD = soff[dl + 2] + (a + 1 - slo[dl + 2])
        dtw_bwd(n, p1 + a + 1, p1 + a, p2 + a + 1, qU + offU, qL + offL, qU + offD, qL + offD,
                cur + a)
        if a <= h <= z:  # last row: children below the strip
            cur[h] += Ein[dl - h]
        if last and dl == Dl:  # the end cell
            cur[h] = 1.0
        sm_cgrad_diag(n, p.cost, cur + a, p.X + (i0 + a - 2) * d, p.Y + (dl - a - 1) * d, d,
                      gx + (i0 + a - 2) * d, gy + (dl - a - 1) * d)
        if a == 1:  # first row: send to the row above
            j = dl - 1
            pos = soff[dl]
            e = cur[1]
            Eout[j] += e * qU[pos]
            Eout[j - 1] += e * dtw_q_diag(qU[pos], qL[pos])


cdef inline void _report(void* progress, Py_ssize_t rows) noexcept nogil:
    """Tell the caller's progress hook (a Python callable, or NULL) that ``rows``
    more rows are done; the hook does its own error handling."""
    if progress != NULL:
        with gil:
            (<object> progress)(rows)


cdef double _one(const _Strip* p, Py_ssize_t h, bint grad, double* gx, double* gy,
                 double* work, floating* qwork, Py_ssize_t* iwork, void* progress) noexcept nogil:
    """One problem; returns R[la, lb] and (grad) accumulates into gx, gy
    (la·d and lb·d doubles, zero on entry). ``work`` (doubles), ``qwork`` (the
    weight planes, ``floating``), ``iwork``: ``_work_len``, ``_q_len``."""
    cdef Py_ssize_t la = p.la, lb = p.lb, nS = (la + h - 1) // h, s, i0, hs, k, L = lb + 2
    cdef Py_ssize_t P = h * lb + 2 * QPAD  # a weight plane: the cells of a strip and pads
    cdef double* wd = work
    cdef double* rows = wd + _strip_work(h)      # value: 2 rows; grad: nS checkpoint rows + 1
    cdef floating* q
    cdef double* Ein
    cdef double* Eout
    cdef double* tmp
    cdef Py_ssize_t* slo = iwork
    cdef Py_ssize_t* shi = iwork + (h + lb + 3)
    cdef Py_ssize_t* soff = iwork + 2 * (h + lb + 3)
    cdef double value
    rows[0] = 0.0
    for k in range(1, lb + 1):
        rows[k] = INFINITY
    if not grad:
        for s in range(nS):
            i0 = s * h + 1
            hs = min(h, la - i0 + 1)
            _strip_ranges(p, i0, hs, slo, shi, soff)
            _strip_fwd(p, i0, hs, rows + (s % 2) * L, rows + ((s + 1) % 2) * L, <floating*> NULL,
                       0, wd, slo, shi, soff)
            _report(progress, hs)
        return rows[(nS % 2) * L + lb]
    # forward keeping the row above every strip (checkpoint s at rows + s·L);
    # one strip (the stored backward) needs no such pass: the reverse loop's
    # forward of the strip is the whole forward (it was run twice: a third of
    # a small problem's gradient)
    if nS > 1:
        for s in range(nS):
            i0 = s * h + 1
            hs = min(h, la - i0 + 1)
            _strip_ranges(p, i0, hs, slo, shi, soff)
            _strip_fwd(p, i0, hs, rows + s * L, rows + (s + 1) * L, <floating*> NULL, 0, wd,
                       slo, shi, soff)
            _report(progress, hs)
        value = rows[nS * L + lb]
        if value == INFINITY:
            return value  # unreachable end cell: E = 0, gradients 0
    Ein = rows + (nS + 1) * L
    Eout = Ein + L
    q = qwork + QPAD
    for k in range(L):
        Ein[k] = 0.0
    for k in range(-QPAD, 2 * P - QPAD):
        q[k] = 0.0
    for s in range(nS - 1, -1, -1):
        i0 = s * h + 1
        hs = min(h, la - i0 + 1)
        _strip_ranges(p, i0, hs, slo, shi, soff)
        _strip_fwd(p, i0, hs, rows + s * L, rows + nS * L, q, P, wd, slo, shi, soff)
        if nS == 1:  # the forward, reported as such
            _report(progress, hs)
            value = rows[L + lb]
            if value == INFINITY:
                return value
        _strip_bwd(p, i0, hs, Ein, Eout, q, P, wd, slo, shi, soff, gx, gy)
        tmp = Ein; Ein = Eout; Eout = tmp
        _report(progress, hs)
    return value


cdef inline Py_ssize_t _dbl_len(Py_ssize_t NA, Py_ssize_t NB, Py_ssize_t h, bint grad) noexcept nogil:
    """Doubles of a problem's workspace before its weight planes: the strip
    sweep's scratch, the rows of R (two, or the checkpoints) and, for the
    gradient, the two rows of products between strips."""
    cdef Py_ssize_t nS = (NA + h - 1) // h, L = NB + 2
    if not grad:
        return _strip_work(h) + 2 * L
    return _strip_work(h) + (nS + 1) * L + 2 * L


cdef inline Py_ssize_t _q_len(Py_ssize_t NB, Py_ssize_t h, bint grad) noexcept nogil:
    """Weights of a strip (gradient only): two planes of h·NB cells and pads,
    in the stored type."""
    return 2 * (h * NB + 2 * QPAD) + 2 * QPAD if grad else 0


cdef inline Py_ssize_t _work_len(Py_ssize_t NA, Py_ssize_t NB, Py_ssize_t h, bint grad,
                                 Py_ssize_t qsize) noexcept nogil:
    """Doubles of a problem's workspace, weights of ``qsize`` bytes each."""
    return _dbl_len(NA, NB, h, grad) + (_q_len(NB, h, grad) * qsize + 7) // 8


ctypedef struct _BatchCtx:
    const double* X
    const double* Y
    const long long* la
    const long long* lb
    double* value
    double* gx
    double* gy
    double* work        # per slot: wlen doubles
    Py_ssize_t* iwork   # per slot: liwork
    void* hook
    Py_ssize_t NA, NB, d, band, h, wlen, wdbl, liwork
    int cost, reg
    double gamma
    bint grad, single


cdef double _item(const _BatchCtx* c, Py_ssize_t b, int slot, floating* qwork) noexcept nogil:
    """Batch item ``b`` on thread slot ``slot``; ``qwork``: its weight planes, after
    the slot's ``wdbl`` doubles of workspace, in the weights' type."""
    cdef _Strip p = _Strip(X=c.X + b * c.NA * c.d, Y=c.Y + b * c.NB * c.d, d=c.d, la=c.la[b],
                           lb=c.lb[b], r=c.band, cost=c.cost, reg=c.reg, gamma=c.gamma)
    return _one(&p, min(c.h, <Py_ssize_t> c.la[b]), c.grad,
                c.gx + b * c.NA * c.d if c.grad else NULL,
                c.gy + b * c.NB * c.d if c.grad else NULL,
                c.work + slot * c.wlen, qwork, c.iwork + slot * c.liwork, c.hook)


cdef void _batch_item(void* ctx, Py_ssize_t b, int slot) noexcept nogil:
    cdef _BatchCtx* c = <_BatchCtx*> ctx
    cdef double* q = c.work + slot * c.wlen + c.wdbl
    c.value[b] = _item(c, b, slot, <float*> q) if c.single else _item(c, b, slot, q)


def _run(const double[:, :, ::1] X, const double[:, :, ::1] Y,
         const long long[::1] la, const long long[::1] lb, Py_ssize_t band,
         int cost, int reg, double gamma, Py_ssize_t h, bint grad, object progress,
         bint single=False):
    """Values (B,) and, if ``grad``, the gradients (B, NA, d), (B, NB, d), float64.

    ``single``: float32 arithmetic for the operator's weights (smx::max3's
    ``U``) and float32 stored weights, as the cost-matrix engine does for
    float32 ``theta``; features, R, ebar and the gradients stay float64."""
    cdef Py_ssize_t B = X.shape[0], NA = X.shape[1], NB = Y.shape[1], d = X.shape[2]
    cdef Py_ssize_t b
    cdef int nthreads = pool.team(B, <double> B * NA * NB * (d + 1), SMALL_WORK)
    value_np = np.empty(B, dtype=np.float64)
    cdef Py_ssize_t Bg = B if grad else 0
    gx_np = np.zeros((Bg, NA, d), dtype=np.float64)
    gy_np = np.zeros((Bg, NB, d), dtype=np.float64)
    failed_np = np.zeros(B, dtype=np.int8)
    cdef double[::1] value = value_np
    cdef double[:, :, ::1] gx = gx_np
    cdef double[:, :, ::1] gy = gy_np
    cdef signed char[::1] failed = failed_np
    cdef double[::1] work_all
    cdef _BatchCtx c
    if B == 0 or NA == 0 or NB == 0:
        return value_np, gx_np, gy_np
    h = max(1, min(h, NA))
    # one workspace per thread, from smoothmax._buffers' kept blocks when
    # large (fresh pages cost a third of a 1000² gradient)
    c.wdbl = _dbl_len(NA, NB, h, grad)
    c.wlen = _work_len(NA, NB, h, grad, 4 if single else 8)
    work_np = _workspace(nthreads * c.wlen, np.float64)
    work_all = work_np
    c.X = &X[0, 0, 0]
    c.Y = &Y[0, 0, 0]
    c.la = &la[0]
    c.lb = &lb[0]
    c.value = &value[0]
    c.gx = &gx[0, 0, 0] if grad else NULL
    c.gy = &gy[0, 0, 0] if grad else NULL
    c.work = &work_all[0]
    c.hook = NULL if progress is None else <void*> progress
    c.NA = NA
    c.NB = NB
    c.d = d
    c.band = band
    c.h = h
    c.liwork = 3 * (h + NB + 3)
    c.cost = cost
    c.reg = reg
    c.gamma = gamma
    c.grad = grad
    c.single = single
    with nogil:
        c.iwork = <Py_ssize_t*> malloc(nthreads * c.liwork * sizeof(Py_ssize_t))
        if c.iwork == NULL:
            for b in range(B):
                failed[b] = 1
        else:
            pool.parallel_for(B, nthreads, _batch_item, &c)
        free(c.iwork)
    if failed_np.any():
        raise MemoryError("smoothmax._core.dtwf: could not allocate the workspace")
    return value_np, gx_np, gy_np
