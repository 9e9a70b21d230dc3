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
The batch loop is a ``prange`` (OpenMP when the build has it).
"""
from cython.parallel cimport prange, parallel
from libc.stdlib cimport malloc, free
from libc.string cimport memset
from libc.math cimport INFINITY

import numpy as np

from .._buffers import pass_outputs as _pass_outputs

from cython cimport floating

from .operators cimport max_omega, max_omega_hvp, sm_init_isa, REG_NEGENTROPY


cdef extern from "simd.h" nogil:
    int sm_max_threads()

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
    negentropy kernel uses x..x + 4S as scratch) and (T + 1)·S for ``inv``
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


cdef void _viterbi_batch(const floating[:, :, :, ::1] theta,
                         const floating[:, :, :, ::1] Z,
                         const long long[::1] lengths,
                         floating[::1] value,
                         floating[:, :, :, ::1] E, floating[:, :, :, ::1] Ed,
                         int reg, double gamma, int mode,
                         signed char[::1] failed) noexcept:
    cdef Py_ssize_t B = theta.shape[0], T = theta.shape[1], S = theta.shape[2]
    cdef Py_ssize_t b, k, L, blk = T * S * S
    cdef double nbad
    cdef const floating* tail
    cdef double* work
    cdef const floating* zp
    cdef floating* ep
    cdef floating* edp
    work = NULL
    with nogil, parallel(num_threads=1 if B * T * S * S < (1 << 15) else sm_max_threads()):
        work = <double*> malloc(_work_len(T, S) * sizeof(double))
        for b in prange(B, schedule="dynamic"):
            if work == NULL:
                failed[b] = 1
                continue
            zp = &Z[b, 0, 0, 0] if mode == MODE_HVP else NULL
            ep = &E[b, 0, 0, 0] if mode != MODE_VALUE else NULL
            edp = &Ed[b, 0, 0, 0] if mode == MODE_HVP else NULL
            L = lengths[b]
            nbad = 0.0
            value[b] = <floating> _viterbi_one(
                &theta[b, 0, 0, 0], zp, ep, edp, L, S,
                reg, gamma, mode, work, &nbad)
            tail = &theta[b, 0, 0, 0] + L * S * S  # steps past the length: checked, not used
            for k in range((T - L) * S * S):
                if not (tail[k] < INFINITY):
                    nbad = nbad + 1.0
            if nbad > 0.0:
                failed[b] = 2
            # outputs come uninitialised (smoothmax._buffers): zero past the length
            if ep != NULL and L < T:
                memset(ep + L * S * S, 0, (T - L) * S * S * sizeof(floating))
            if edp != NULL and L < T:
                memset(edp + L * S * S, 0, (T - L) * S * S * sizeof(floating))
        free(work)


def _run(theta, Z, lengths, int reg, double gamma, int mode, out=None):
    """The passes of ``mode`` over the batch; ``out``: see ``smoothmax._buffers.pass_outputs``."""
    B = theta.shape[0]
    # every entry is written by the kernels (zero past each length)
    value, E, Ed = _pass_outputs(out, B, theta.shape, theta.dtype, mode, True, (0, 1, 1, 1))
    Zarr = Z if mode == MODE_HVP else E[:0]
    failed = np.zeros(B, dtype=np.int8)
    if B > 0 and theta.shape[1] > 0 and theta.shape[2] > 0:
        if theta.dtype == np.float64:
            _viterbi_batch[double](theta, Zarr, lengths, value, E, Ed, reg, gamma, mode, failed)
        else:
            _viterbi_batch[float](theta, Zarr, lengths, value, E, Ed, reg, gamma, mode, failed)
    if (failed == 1).any():
        raise MemoryError("smoothmax._core.viterbi: could not allocate the workspace")
    if failed.any():
        _reject(theta)
    return value, E, Ed


def _reject(theta):
    """Raise the validation error for scores the kernels found NaN or +inf (the
    messages of ``smoothmax._validation.check_values``; engines import nothing above them)."""
    if np.isnan(theta).any():
        raise ValueError("theta must not contain NaN")
    if np.isposinf(theta).any():
        raise ValueError("theta must not contain +inf (scores are maximised; use -inf to forbid an entry)")
    raise ValueError("theta must not contain NaN or +inf")


def viterbi_value(theta, lengths, int reg, double gamma, out=None):
    """Vit_Ω(theta) per batch item: ``theta (B, T, S, S)``, ``lengths (B,)`` int64."""
    return _run(theta, None, lengths, reg, gamma, MODE_VALUE, out=out)[0]


def viterbi_grad(theta, lengths, int reg, double gamma, out=None):
    """``(value (B,), E (B, T, S, S))``, E = ∇Vit_Ω, zero past each length."""
    value, E, _ = _run(theta, None, lengths, reg, gamma, MODE_GRAD, out=out)
    return value, E


def viterbi_hvp(theta, Z, lengths, int reg, double gamma, out=None):
    """``(value, E, Edot)`` with Edot = ∇²Vit_Ω(theta)·Z (docs/spec.md §2)."""
    return _run(theta, Z, lengths, reg, gamma, MODE_HVP, out=out)


cdef void _decode_batch(const floating[:, :, :, ::1] theta,
                        const long long[::1] lengths,
                        floating[::1] score, long long[:, ::1] tags,
                        int[:, :, ::1] bp, signed char[::1] bad) noexcept:
    """Hard Viterbi with back-pointers; first argmax on ties; -1 tags if infeasible.

    ``bad[b]`` is set when item b has a NaN or +inf score (checked on this read).
    """
    cdef Py_ssize_t B = theta.shape[0], T = theta.shape[1], S = theta.shape[2]
    cdef Py_ssize_t b, t, i, j, L, best
    cdef double* buf
    cdef double* V
    cdef double* Vn
    cdef double* tmp
    cdef double m, x
    buf = NULL
    with nogil, parallel(num_threads=1 if B * T * S * S < (1 << 15) else sm_max_threads()):
        buf = <double*> malloc(2 * S * sizeof(double) + 1)
        for b in prange(B, schedule="dynamic"):
            if buf == NULL:
                tags[b, 0] = -2
                continue
            L = lengths[b]
            V = buf
            Vn = buf + S
            for j in range(S):
                V[j] = 0.0
            for t in range(T):
                for i in range(S):
                    for j in range(S):
                        if not (theta[b, t, i, j] < INFINITY):
                            bad[b] = 1
            if bad[b]:
                continue
            for t in range(L):
                for i in range(S):
                    best = 0
                    m = theta[b, t, i, 0] + V[0]
                    for j in range(1, S):
                        x = theta[b, t, i, j] + V[j]
                        if x > m:
                            m = x
                            best = j
                    Vn[i] = m
                    bp[b, t, i] = <int> best
                tmp = V; V = Vn; Vn = tmp
            best = 0
            for i in range(1, S):
                if V[i] > V[best]:
                    best = i
            score[b] = <floating> V[best]
            if V[best] == -INFINITY:
                continue  # no feasible path: no tags (-1), like DTW's all-zero Y
            for t in range(L - 1, -1, -1):
                tags[b, t] = best
                best = bp[b, t, best]
            for t in range(L, T):
                tags[b, t] = -1
        free(buf)


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
            _reject(theta)
    return score, tags
