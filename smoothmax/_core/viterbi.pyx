# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Compiled Vit_Ω engine (docs/spec.md §3, docs/engines.md).

Design: one kernel per batch item, ``_viterbi_one``, runs the forward pass
(V_t(i) = max_Ω_j(theta[t, i, j] + V_{t-1}(j)), V_{-1} = 0) and, for the
gradient, the reverse pass of docs/spec.md §2; the HVP adds the tangent forward pass
(Vdot, qdot) and the tangent reverse pass. The local gradients q_t(i, :) are
written straight into ``E`` during the forward pass and scaled in place by the
reverse pass (E[t, i, j] = ebar_t(i)·q_t(i, j)); likewise qdot goes into
``Edot``. So the only memory beyond the outputs is O(S) per thread.
One path for the three operators: the step kernels ``vit_fwd`` / ``vit_bwd``
of ``simd.h`` (templates on the dtype, the operator picked inside) run the
maths of ``include/smx_ops.hpp``.
Arithmetic is in double (a float32 value or gradient takes its exps in
float); only theta, Z, E, Edot use the caller's dtype.
The batch loop runs on the engine's thread pool (``pool.pxd``, docs/threads.md).
"""
from libc.stdlib cimport calloc, free
from libc.string cimport memset
from libc.math cimport INFINITY

import numpy as np

from .._buffers import pass_outputs as _pass_outputs
from .._values import raise_found as _raise_found

from cython cimport floating

from .operators cimport bad_values, max_omega, max_omega_hvp, sm_init_isa, REG_NEGENTROPY


from . cimport pool

# Below this many edges a call runs on one thread (docs/threads.md).
cdef double SMALL_WORK = 1 << 15


cdef extern from "simd.h" namespace "smx::cpu" nogil:
    void vit_fwd[T](Py_ssize_t S, const T* th, const T* z, const double* V, const double* Vd,
                    double* Vn, double* Vdn, T* E, T* Ed, double* inv, double* x, int reg,
                    double gamma, double* bad)
    void vit_bwd[T](Py_ssize_t S, const double* eb, const double* ebd, const double* inv,
                    double* nb, double* nbd, T* E, T* Ed, const T* z, const double* Vdp,
                    const double* Vdt, int reg, double gamma)


sm_init_isa()


cdef enum:
    MODE_VALUE = 0
    MODE_GRAD = 1
    MODE_HVP = 2


cdef inline Py_ssize_t _work_len(Py_ssize_t T, Py_ssize_t S) noexcept nogil:
    """Doubles of per-thread workspace of ``_viterbi_one``: 10 rows of S (the
    negentropy and l2 row kernels use x..x + 4S as scratch) and (T + 1)·S for ``inv``
    (gradient) or ``hist`` (HVP)."""
    return 10 * S + (T + 1) * S + 1


cdef double _viterbi_one(const floating* theta, const floating* Z,
                         floating* E, floating* Ed,
                         Py_ssize_t L, Py_ssize_t S, int reg, double gamma,
                         int mode, double* work, double* bad) noexcept nogil:
    """Value of one problem; fills E (and Edot) when mode asks for them.

    ``work`` holds _work_len(T, S) doubles. theta/Z/E/Ed point at a (T, S, S) block.
    ``bad[0]`` counts the NaN or +inf scores read (the input check rides on
    this one read of theta; the caller rejects the input).
    """
    cdef double* V = work            # V_{t-1}
    cdef double* Vn = work + S       # V_t
    cdef double* Vd = work + 2 * S   # Vdot_{t-1} (HVP: a row of ``hist``)
    cdef double* Vdn = work + 3 * S  # Vdot_t
    cdef double* x = work + 4 * S    # 4 S of kernel scratch
    cdef double* eb = work + 8 * S   # ebar_t, then ebar_{t-1} accumulated
    cdef double* ebd = work + 9 * S
    cdef double* inv = work + 10 * S  # 1/sum of each row (negentropy gradient), T·S
    cdef double* hist = inv           # or Vdot_{-1}..Vdot_{L-1} (HVP), (T + 1)·S
    cdef double* tmp
    cdef double value
    cdef Py_ssize_t t, j, SS = S * S
    cdef double* nb
    cdef double* nbd

    for j in range(S):
        V[j] = 0.0
    if mode == MODE_HVP:  # keep Vdot of every step in ``hist`` for the reverse pass
        for j in range(S):
            hist[j] = 0.0
    # forward, the S x S step vectorized over j (simd.h)
    for t in range(L):
        if mode == MODE_HVP:
            Vd = hist + t * S
            Vdn = hist + (t + 1) * S
        vit_fwd(S, theta + t * SS, Z + t * SS if mode == MODE_HVP else NULL,
                V, Vd, Vn, Vdn, E + t * SS if mode != MODE_VALUE else NULL,
                Ed + t * SS if mode == MODE_HVP else NULL,
                inv + t * S if (mode == MODE_GRAD and reg == REG_NEGENTROPY) else NULL,
                x, reg, gamma, bad)
        tmp = V; V = Vn; Vn = tmp
    value = max_omega(V, eb, S, reg, gamma)
    if mode == MODE_VALUE:
        return value
    if mode == MODE_HVP:
        max_omega_hvp(eb, hist + L * S, ebd, S, reg, gamma)
    # reverse: E[t, i, j] = ebar_t(i)·q_t(i, j); ebar_{t-1}(j) = Σ_i E[t, i, j]
    nb = Vn    # forward buffers are free now
    nbd = work + 3 * S
    for t in range(L - 1, -1, -1):
        vit_bwd(S, eb, ebd, inv + t * S if (mode == MODE_GRAD and reg == REG_NEGENTROPY) else NULL,
                nb, nbd, E + t * SS, Ed + t * SS if mode == MODE_HVP else NULL,
                Z + t * SS if mode == MODE_HVP else NULL,
                hist + t * S, hist + (t + 1) * S, reg, gamma)
        tmp = eb; eb = nb; nb = tmp
        tmp = ebd; ebd = nbd; nbd = tmp
    return value


ctypedef struct _BatchCtx:
    # one batch job (arrays as void*: one struct for both dtypes)
    const void* theta
    const void* Z
    void* E
    void* Ed
    void* value
    const long long* lengths
    signed char* failed
    double* work     # _work_len(T, S) doubles per slot
    Py_ssize_t T, S, lwork
    int reg, mode
    double gamma
    bint f64
    bint check_z     # the HVP's Z is checked here first (NaN, +-inf)


cdef void _batch_one(_BatchCtx* c, Py_ssize_t b, int slot, floating* tag) noexcept nogil:
    cdef Py_ssize_t T = c.T, S = c.S, k, L = c.lengths[b], blk = c.T * c.S * c.S
    cdef double nbad = 0.0
    cdef const floating* th = <const floating*> c.theta + b * blk
    cdef const floating* zp = <const floating*> c.Z + b * blk if c.mode == MODE_HVP else NULL
    cdef floating* ep = <floating*> c.E + b * blk if c.mode != MODE_VALUE else NULL
    cdef floating* edp = <floating*> c.Ed + b * blk if c.mode == MODE_HVP else NULL
    cdef const floating* tail
    if c.check_z and bad_values(blk, zp, 1):
        c.failed[b] = 3
        (<floating*> c.value)[b] = 0  # the call raises (_raise_found)
        return
    (<floating*> c.value)[b] = <floating> _viterbi_one(
        th, zp, ep, edp, L, S, c.reg, c.gamma, c.mode, c.work + slot * c.lwork, &nbad)
    tail = th + L * S * S  # steps past the length: checked, not used
    for k in range((T - L) * S * S):
        if not (tail[k] < INFINITY):
            nbad = nbad + 1.0
    if nbad > 0.0:
        c.failed[b] = 2
    # outputs come uninitialised (smoothmax._buffers): zero past the length
    if ep != NULL and L < T:
        memset(ep + L * S * S, 0, (T - L) * S * S * sizeof(floating))
    if edp != NULL and L < T:
        memset(edp + L * S * S, 0, (T - L) * S * S * sizeof(floating))


cdef void _batch_item(void* ctx, Py_ssize_t b, int slot) noexcept nogil:
    cdef _BatchCtx* c = <_BatchCtx*> ctx
    if c.f64:
        _batch_one(c, b, slot, <double*> NULL)
    else:
        _batch_one(c, b, slot, <float*> NULL)


cdef int _viterbi_batch(const floating[:, :, :, ::1] theta,
                        const floating[:, :, :, ::1] Z,
                        const long long[::1] lengths,
                        floating[::1] value,
                        floating[:, :, :, ::1] E, floating[:, :, :, ::1] Ed,
                        int reg, double gamma, int mode, bint check_z) noexcept:
    """The batch on the pool (docs/threads.md): one problem per item, one
    workspace per thread; one thread below SMALL_WORK edges. ``check_z``: the
    HVP's Z is checked first, item by item (NaN, ±inf; ``bad_values``), on
    the thread that computes it (the host's ``sum`` of Z was a serial pass
    before the job). Returns 0, 1 when the workspace could not be allocated
    (nothing ran), 2 when the kernels read NaN or +inf in theta, 3 when Z
    failed its check. The items' flags are C memory reduced
    here, not a NumPy array (a call's NumPy bookkeeping costs tens of µs on
    the benchmark VM, a few per cent of a 32 x 128 x 16^2 gradient)."""
    cdef Py_ssize_t B = theta.shape[0], T = theta.shape[1], S = theta.shape[2], b
    cdef int team = pool.team(B, <double> B * T * S * S, SMALL_WORK)
    cdef _BatchCtx c
    cdef int status = 0
    c.theta = &theta[0, 0, 0, 0]
    c.Z = &Z[0, 0, 0, 0] if mode == MODE_HVP else NULL
    c.E = &E[0, 0, 0, 0] if mode != MODE_VALUE else NULL
    c.Ed = &Ed[0, 0, 0, 0] if mode == MODE_HVP else NULL
    c.value = &value[0]
    c.lengths = &lengths[0]
    c.T = T
    c.S = S
    c.lwork = _work_len(T, S)
    c.reg = reg
    c.mode = mode
    c.gamma = gamma
    c.f64 = floating is double
    c.check_z = check_z and mode == MODE_HVP
    with nogil:
        c.failed = <signed char*> calloc(B, sizeof(signed char))
        if c.failed == NULL or pool.parallel_for_work(B, team, _batch_item, &c, &c.work,
                                                      &c.lwork) < 0:
            status = 1
        else:
            for b in range(B):
                if c.failed[b] > status:
                    status = c.failed[b]
        free(c.failed)
    return status


def _run(theta, Z, lengths, int reg, double gamma, int mode, out=None, bint check=False):
    """The passes of ``mode`` over the batch; ``out``: see ``smoothmax._buffers.pass_outputs``.

    theta is always checked (NaN, +inf) on the kernels' read of it; ``check``:
    the HVP's Z too (NaN, ±inf), past the lengths as well.
    """
    B = theta.shape[0]
    cdef int status = 0
    # every entry is written by the kernels (zero past each length)
    value, E, Ed = _pass_outputs(out, B, theta.shape, theta.dtype, mode, True, (0, 1, 1, 1))
    Zarr = Z if mode == MODE_HVP else E[:0]
    if B > 0 and theta.shape[1] > 0 and theta.shape[2] > 0:
        if theta.dtype == np.float64:
            status = _viterbi_batch[double](theta, Zarr, lengths, value, E, Ed, reg, gamma, mode,
                                            check)
        else:
            status = _viterbi_batch[float](theta, Zarr, lengths, value, E, Ed, reg, gamma, mode,
                                           check)
    if status == 1:
        raise MemoryError("smoothmax._core.viterbi: could not allocate the workspace")
    if status >= 2:
        _raise_found(theta, "+inf", Z if status == 3 else None)
    return value, E, Ed


def viterbi_value(theta, lengths, int reg, double gamma, out=None):
    """Vit_Ω(theta) per batch item: ``theta (B, T, S, S)``, ``lengths (B,)`` int64."""
    return _run(theta, None, lengths, reg, gamma, MODE_VALUE, out=out)[0]


def viterbi_grad(theta, lengths, int reg, double gamma, out=None):
    """``(value (B,), E (B, T, S, S))``, E = ∇Vit_Ω, zero past each length."""
    value, E, _ = _run(theta, None, lengths, reg, gamma, MODE_GRAD, out=out)
    return value, E


def viterbi_hvp(theta, Z, lengths, int reg, double gamma, out=None, bint check=False):
    """``(value, E, Edot)`` with Edot = ∇²Vit_Ω(theta)·Z (docs/spec.md §2); ``check``:
    Z's values are checked here (``_run``)."""
    return _run(theta, Z, lengths, reg, gamma, MODE_HVP, out=out, check=check)


ctypedef struct _DecodeCtx:
    const void* theta
    void* score
    const long long* lengths
    long long* tags
    int* bp
    signed char* bad
    double* buf      # lbuf doubles per slot (2·S, rounded to whole lines)
    Py_ssize_t lbuf
    Py_ssize_t T, S
    bint f64


cdef void _decode_one(_DecodeCtx* c, Py_ssize_t b, int slot, floating* tag) noexcept nogil:
    cdef Py_ssize_t T = c.T, S = c.S, t, i, j, k, best, L = c.lengths[b]
    cdef const floating* th = <const floating*> c.theta + b * T * S * S
    cdef long long* tags = c.tags + b * T
    cdef int* bp = c.bp + b * T * S
    cdef double* V = c.buf + slot * c.lbuf
    cdef double* Vn = V + S
    cdef double* tmp
    cdef double m, x
    for j in range(S):
        V[j] = 0.0
    for k in range(T * S * S):
        if not (th[k] < INFINITY):
            c.bad[b] = 1
            return
    for t in range(L):
        for i in range(S):
            best = 0
            m = th[(t * S + i) * S] + V[0]
            for j in range(1, S):
                x = th[(t * S + i) * S + j] + V[j]
                if x > m:
                    m = x
                    best = j
            Vn[i] = m
            bp[t * S + i] = <int> best
        tmp = V; V = Vn; Vn = tmp
    best = 0
    for i in range(1, S):
        if V[i] > V[best]:
            best = i
    (<floating*> c.score)[b] = <floating> V[best]
    if V[best] == -INFINITY:
        return  # no feasible path: no tags (-1), like DTW's all-zero Y
    for t in range(L - 1, -1, -1):
        tags[t] = best
        best = bp[t * S + best]
    for t in range(L, T):
        tags[t] = -1


cdef void _decode_item(void* ctx, Py_ssize_t b, int slot) noexcept nogil:
    cdef _DecodeCtx* c = <_DecodeCtx*> ctx
    if c.f64:
        _decode_one(c, b, slot, <double*> NULL)
    else:
        _decode_one(c, b, slot, <float*> NULL)


cdef void _decode_batch(const floating[:, :, :, ::1] theta,
                        const long long[::1] lengths,
                        floating[::1] score, long long[:, ::1] tags,
                        int[:, :, ::1] bp, signed char[::1] bad) noexcept:
    """Hard Viterbi with back-pointers; first argmax on ties; -1 tags if infeasible.

    ``bad[b]`` is set when item b has a NaN or +inf score (checked on this read).
    """
    cdef Py_ssize_t B = theta.shape[0], T = theta.shape[1], S = theta.shape[2]
    cdef int team = pool.team(B, <double> B * T * S * S, SMALL_WORK)
    cdef _DecodeCtx c
    c.theta = &theta[0, 0, 0, 0]
    c.score = &score[0]
    c.lengths = &lengths[0]
    c.tags = &tags[0, 0]
    c.bp = &bp[0, 0, 0]
    c.bad = &bad[0]
    c.T = T
    c.S = S
    c.lbuf = 2 * S
    c.f64 = floating is double
    with nogil:
        if pool.parallel_for_work(B, team, _decode_item, &c, &c.buf, &c.lbuf) < 0:
            tags[0, 0] = -2


def viterbi_decode(theta, lengths):
    """``(score (B,), tags (B, T) int64)``: the best tag sequence, first argmax on ties.

    Tags are -1 past a length, and everywhere when no path is feasible
    (score -inf).
    """
    B, T, S = theta.shape[0], theta.shape[1], theta.shape[2]
    score = np.empty(B, dtype=theta.dtype)
    tags = np.full((B, T), -1, dtype=np.int64)
    bp = np.empty((B, T, S), dtype=np.intc)
    bad = np.zeros(B, dtype=np.int8)
    if B > 0 and T > 0 and S > 0:
        if theta.dtype == np.float64:
            _decode_batch[double](theta, lengths, score, tags, bp, bad)
        else:
            _decode_batch[float](theta, lengths, score, tags, bp, bad)
        if (tags[:, 0] == -2).any():
            raise MemoryError("smoothmax._core.viterbi: could not allocate the workspace")
        if bad.any():
            _raise_found(theta, "+inf")
    return score, tags
