# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Compiled factorised Vit_Ω engine: a linear-chain CRF that never forms (B, T, S, S).

The problem (docs/crf.md): ``emissions (B, T, S)``, ``transitions (S, S)``
with ``transitions[j, i]`` the score of the move j -> i (pytorch-crf's
``[from, to]``), ``start (S)``, ``end (S)``, ``lengths (B,)``::

    V_0(i) = start[i] + emissions[0, i]
    V_t(i) = emissions[t, i] + max_Ω_j (transitions[j, i] + V_{t-1}(j))
    value  = max_Ω_i (V_{L-1}(i) + end[i])

(``max_Ω(x + c) = max_Ω(x) + c`` takes the emission out of the max.) This is
Vit_Ω of docs/spec.md §3 on ``theta[t, i, j] = emissions[t, i] + transitions[j, i]``
with the start and end scores added at the first and last step, except that
the first step has no operator: with ``"l2"`` the full-potential form with a
fixed start state adds ``-γ/2``, a constant.

Design: one kernel per batch item on the thread pool (``pool.pxd``). The forward pass keeps
V_t (and Vdot_t for the HVP) for every step, ``T·S`` doubles a thread; the
reverse pass recomputes each step's local gradient ``q_t(i, :)`` from
``V_{t-1}`` instead of storing it, so memory beyond the outputs is
``O(T·S + S²)`` a thread, never ``O(T·S²)``. Gradients with respect to the
shared parameters (transitions, start, end) are summed over time and over
the batch with per-item weights ``w`` (the upstream gradient), in one
partial sum a thread, added up at the end. Every operator runs through
``operators.pxd`` (``max_omega``/``max_omega_hvp`` on the row
``x_j = transitions[j, i] + V_{t-1}(j)``). For the negentropy value and
gradient, ``crf_simd.h`` factorises the step through ``K = exp((A − c)/γ)``
(S exps and one S x S multiply-add a step instead of S² exps); a row whose
factorised sum could have lost a term to underflow is recomputed in the log
domain by ``max_omega``, so results do not depend on the scale of the scores.
Arithmetic is in double; emissions and their gradients use the caller's dtype.
"""
from libc.math cimport INFINITY, log

import numpy as np

from cython cimport floating

from .operators cimport max_omega, max_omega_hvp, sm_init_isa, REG_NEGENTROPY


from . cimport pool

# Below this many edges (B·T·S²) a call runs on one thread (docs/threads.md).
cdef double SMALL_WORK = 1 << 15


cdef extern from "crf_simd.h" nogil:
    double SM_CRF_TINY
    double sm_crf_fwd "smx::cpu::crf_fwd"(Py_ssize_t S, const double* K, const double* a,
                                          double* p, double* s, double* y, double gamma)
    void sm_crf_bwd "smx::cpu::crf_bwd"(Py_ssize_t S, const double* K, const double* p,
                                        const double* r, double* nb, double* G, double w)


sm_init_isa()


cdef enum:
    MODE_VALUE = 0
    MODE_GRAD = 1
    MODE_HVP = 2


cdef inline Py_ssize_t _work_len(Py_ssize_t T, Py_ssize_t S) noexcept nogil:
    """Doubles of per-thread workspace: the V history, the Vdot (HVP) or p
    (negentropy) history and the 1/s history (3 T S), 16 rows of S."""
    return 3 * T * S + 16 * S + 1


cdef inline void _row(const double* At, const double* V, Py_ssize_t i, Py_ssize_t S,
                      double* x) noexcept nogil:
    """x[j] = transitions[j, i] + V[j] (At is transitions.T)."""
    cdef Py_ssize_t j
    for j in range(S):
        x[j] = At[i * S + j] + V[j]


cdef double _crf_one(const floating* em, const floating* Ze,
                     const double* At, const double* ZAt, const double* K, const double* c,
                     const double* st, const double* en,
                     const double* Zs, const double* Zen,
                     Py_ssize_t L, Py_ssize_t S, int reg, double gamma, int mode, double w,
                     floating* ge, double* G, double* D, double* gs, double* gen,
                     double* vdot, double* work) noexcept nogil:
    """Value of one item; in MODE_GRAD its gradient, in MODE_HVP its HVP.

    ``ge`` (L, S) gets the per-item emission part (unweighted); ``D`` (the
    transitions.T layout), ``gs``, ``gen`` accumulate ``w`` times the shared
    parts; the negentropy fast path accumulates ``G`` instead of ``D`` (the
    caller forms ``K ⊙ G``). In MODE_HVP the outputs are the HVP (the Hessian
    times the direction ``Ze, ZAt, Zs, Zen``) and ``vdot[0]`` the directional
    derivative of the value.
    """
    cdef double* Vh = work                 # V_0 .. V_{L-1}
    cdef double* Vdh = work + L * S        # Vdot history (HVP)
    cdef double* P = Vdh                   # or p history (negentropy fast path)
    cdef double* Sinv = Vdh + L * S        # 1/s_t(i), 0 where the row is recomputed
    cdef double* x = Sinv + L * S          # 4 S of scratch
    cdef double* q = x + 4 * S
    cdef double* u = q + S
    cdef double* qd = u + S
    cdef double* eb = qd + S
    cdef double* ebd = eb + S
    cdef double* nb = ebd + S
    cdef double* nbd = nb + S
    cdef double* ssum = nbd + S
    cdef double* r = ssum + S
    cdef double* tmp
    cdef double value, acc, e, ed, m
    cdef Py_ssize_t t, i, j
    cdef double* V
    cdef double* Vn
    cdef double* Vd
    cdef double* Vdn
    cdef bint fast = reg == REG_NEGENTROPY and mode != MODE_HVP

    for i in range(S):
        Vh[i] = st[i] + em[i]
        if mode == MODE_HVP:
            Vdh[i] = Zs[i] + Ze[i]
    # forward
    for t in range(1, L):
        V = Vh + (t - 1) * S
        Vn = Vh + t * S
        if fast:
            m = sm_crf_fwd(S, K, V, P + t * S, ssum, x, gamma)
            for i in range(S):
                if ssum[i] >= SM_CRF_TINY and c[i] > -INFINITY:
                    Vn[i] = em[t * S + i] + c[i] + m + gamma * log(ssum[i])
                    Sinv[t * S + i] = 1.0 / ssum[i]
                else:  # a term may have underflowed (or the row is all -inf): log domain
                    _row(At, V, i, S, x)
                    Vn[i] = em[t * S + i] + max_omega(x, q, S, reg, gamma)
                    Sinv[t * S + i] = 0.0
            continue
        Vd = Vdh + (t - 1) * S
        Vdn = Vdh + t * S
        for i in range(S):
            _row(At, V, i, S, x)
            Vn[i] = em[t * S + i] + max_omega(x, q, S, reg, gamma)
            if mode == MODE_HVP:
                acc = Ze[t * S + i]
                for j in range(S):
                    if q[j] != 0.0:
                        acc = acc + q[j] * (ZAt[i * S + j] + Vd[j])
                Vdn[i] = acc
    # the end scores
    V = Vh + (L - 1) * S
    for i in range(S):
        x[i] = V[i] + en[i]
    value = max_omega(x, eb, S, reg, gamma)
    if mode == MODE_VALUE:
        return value
    if mode == MODE_HVP:
        Vd = Vdh + (L - 1) * S
        for i in range(S):
            u[i] = Vd[i] + Zen[i] if eb[i] != 0.0 else 0.0
        acc = 0.0
        for i in range(S):
            if eb[i] != 0.0:
                acc = acc + eb[i] * u[i]
        vdot[0] = acc
        max_omega_hvp(eb, u, ebd, S, reg, gamma)
        for i in range(S):
            gen[i] = gen[i] + w * ebd[i]
            ge[(L - 1) * S + i] = <floating> ebd[i]
    else:
        for i in range(S):
            gen[i] = gen[i] + w * eb[i]
            ge[(L - 1) * S + i] = <floating> eb[i]
    # reverse: e_t(i, j) = ebar_t(i) q_t(i, j), ebar_{t-1}(j) = Σ_i e_t(i, j)
    for t in range(L - 1, 0, -1):
        V = Vh + (t - 1) * S
        if fast:
            for i in range(S):
                r[i] = eb[i] * Sinv[t * S + i]
            sm_crf_bwd(S, K, P + t * S, r, nb, G, w)
            for i in range(S):  # the rows done in the log domain
                if Sinv[t * S + i] == 0.0 and eb[i] != 0.0:
                    _row(At, V, i, S, x)
                    max_omega(x, q, S, reg, gamma)
                    for j in range(S):
                        e = eb[i] * q[j]
                        D[i * S + j] = D[i * S + j] + w * e
                        nb[j] = nb[j] + e
        else:
            Vd = Vdh + (t - 1) * S
            for j in range(S):
                nb[j] = 0.0
                nbd[j] = 0.0
            for i in range(S):
                _row(At, V, i, S, x)
                max_omega(x, q, S, reg, gamma)
                if mode == MODE_HVP:
                    for j in range(S):
                        u[j] = ZAt[i * S + j] + Vd[j] if q[j] != 0.0 else 0.0
                    max_omega_hvp(q, u, qd, S, reg, gamma)
                    for j in range(S):
                        ed = ebd[i] * q[j] + eb[i] * qd[j]
                        D[i * S + j] = D[i * S + j] + w * ed
                        nbd[j] = nbd[j] + ed
                        nb[j] = nb[j] + eb[i] * q[j]
                else:
                    for j in range(S):
                        e = eb[i] * q[j]
                        D[i * S + j] = D[i * S + j] + w * e
                        nb[j] = nb[j] + e
        tmp = eb; eb = nb; nb = tmp
        tmp = ebd; ebd = nbd; nbd = tmp
        if mode == MODE_HVP:
            for j in range(S):
                ge[(t - 1) * S + j] = <floating> ebd[j]
        else:
            for j in range(S):
                ge[(t - 1) * S + j] = <floating> eb[j]
    for i in range(S):
        gs[i] = gs[i] + w * (ebd[i] if mode == MODE_HVP else eb[i])
    return value


ctypedef struct _BatchCtx:
    # one batch job (emissions-shaped arrays as void*: one struct for both dtypes)
    const void* em
    const void* Ze
    void* value
    void* vdot
    void* ge
    const double* At
    const double* ZAt
    const double* K
    const double* c
    const double* st
    const double* en
    const double* Zs
    const double* Zen
    const long long* lengths
    const double* weights
    double* part     # per slot: its sums (G (S²), D (S²), gs (S), gen (S))
    double* work     # per slot: _work_len(T, S) doubles
    Py_ssize_t T, S, lpart, lwork
    int reg, mode
    double gamma
    bint f64


cdef void _batch_one(_BatchCtx* c, Py_ssize_t b, int slot, floating* tag) noexcept nogil:
    cdef Py_ssize_t T = c.T, S = c.S, k, L = c.lengths[b]
    cdef double* pp = c.part + slot * c.lpart
    cdef const floating* zep = <const floating*> c.Ze + b * T * S if c.mode == MODE_HVP else NULL
    cdef floating* gep = <floating*> c.ge + b * T * S if c.mode != MODE_VALUE else NULL
    cdef double vd = 0.0
    (<floating*> c.value)[b] = <floating> _crf_one(
        <const floating*> c.em + b * T * S, zep, c.At, c.ZAt, c.K, c.c, c.st, c.en,
        c.Zs, c.Zen, L, S, c.reg, c.gamma, c.mode,
        c.weights[b] if c.mode != MODE_VALUE else 0.0,
        gep, pp, pp + S * S, pp + 2 * S * S, pp + 2 * S * S + S, &vd, c.work + slot * c.lwork)
    if c.mode == MODE_HVP:
        (<floating*> c.vdot)[b] = <floating> vd
    if gep != NULL:
        for k in range(L * S, T * S):
            gep[k] = 0


cdef void _batch_item(void* ctx, Py_ssize_t b, int slot) noexcept nogil:
    cdef _BatchCtx* c = <_BatchCtx*> ctx
    if c.f64:
        _batch_one(c, b, slot, <double*> NULL)
    else:
        _batch_one(c, b, slot, <float*> NULL)


cdef bint _crf_batch(const floating[:, :, ::1] em, const floating[:, :, ::1] Ze,
                     const double[:, ::1] At, const double[:, ::1] ZAt,
                     const double[:, ::1] K, const double[::1] c,
                     const double[::1] st, const double[::1] en,
                     const double[::1] Zs, const double[::1] Zen,
                     const long long[::1] lengths, const double[::1] weights,
                     floating[::1] value, floating[::1] vdot, floating[:, :, ::1] ge,
                     double[:, ::1] part, int nthreads,
                     int reg, double gamma, int mode) noexcept:
    """Every item of the batch on the pool (docs/threads.md); ``part[slot]``
    holds the sums of the items that thread ran ``(G (S²), D (S²), gs (S), gen (S))``.
    Returns False when the workspace could not be allocated (nothing ran)."""
    cdef Py_ssize_t B = em.shape[0], T = em.shape[1], S = em.shape[2]
    cdef _BatchCtx x
    x.em = &em[0, 0, 0]
    x.Ze = &Ze[0, 0, 0] if mode == MODE_HVP else NULL
    x.value = &value[0]
    x.vdot = &vdot[0] if mode == MODE_HVP else NULL
    x.ge = &ge[0, 0, 0] if mode != MODE_VALUE else NULL
    x.At = &At[0, 0]
    x.ZAt = &ZAt[0, 0] if mode == MODE_HVP else NULL
    x.K = &K[0, 0]
    x.c = &c[0]
    x.st = &st[0]
    x.en = &en[0]
    x.Zs = &Zs[0] if mode == MODE_HVP else NULL
    x.Zen = &Zen[0] if mode == MODE_HVP else NULL
    x.lengths = &lengths[0]
    x.weights = &weights[0]
    x.part = &part[0, 0]
    x.lpart = part.shape[1]
    x.T = T
    x.S = S
    x.lwork = _work_len(T, S)
    x.reg = reg
    x.mode = mode
    x.gamma = gamma
    x.f64 = floating is double
    cdef bint ok
    with nogil:
        ok = pool.parallel_for_work(B, nthreads, _batch_item, &x, &x.work, &x.lwork) >= 0
    return ok


def _threads(B, T, S):
    """Threads of a call over (B, T, S) (``pool.team``: one below SMALL_WORK edges, at most B)."""
    return pool.team(B, <double> B * T * S * S, SMALL_WORK)


def _double(a, shape):
    return np.ascontiguousarray(np.asarray(a, dtype=np.float64).reshape(shape))


def _run(emissions, transitions, start, end, lengths, weights, int reg, double gamma, int mode,
         Z=None):
    """Shared driver; arrays are C-contiguous NumPy (emissions float32/float64)."""
    B, T, S = emissions.shape
    dt = emissions.dtype
    At = _double(transitions, (S, S)).T.copy()
    st, en = _double(start, (S,)), _double(end, (S,))
    value = np.empty(B, dtype=dt)
    vdot = np.zeros(B if mode == MODE_HVP else 0, dtype=dt)
    ge = np.empty((B, T, S) if mode != MODE_VALUE else (0, 1, 1), dtype=dt)
    nthreads = _threads(B, T, S)
    part = np.zeros((nthreads, 2 * S * S + 2 * S), dtype=np.float64)
    K, c = _factor(At.T, gamma) if reg == REG_NEGENTROPY else (np.zeros((1, 1)), np.zeros(1))
    if mode == MODE_HVP:
        Ze, ZA, Zs, Zen = Z
        Ze = np.ascontiguousarray(Ze, dtype=dt)
        ZAt = _double(ZA, (S, S)).T.copy()
        Zs, Zen = _double(Zs, (S,)), _double(Zen, (S,))
    else:
        Ze = np.empty((0, 1, 1), dtype=dt)
        ZAt = np.empty((0, 1), dtype=np.float64)
        Zs = Zen = np.empty(0, dtype=np.float64)
    w = np.ones(B) if weights is None else _double(weights, (B,))
    cdef bint ok = True
    if B > 0 and S > 0:
        if dt == np.float64:
            ok = _crf_batch[double](emissions, Ze, At, ZAt, K, c, st, en, Zs, Zen, lengths, w, value,
                                    vdot, ge, part, nthreads, reg, gamma, mode)
        else:
            ok = _crf_batch[float](emissions, Ze, At, ZAt, K, c, st, en, Zs, Zen, lengths, w, value,
                                   vdot, ge, part, nthreads, reg, gamma, mode)
    if not ok:
        raise MemoryError("smoothmax._core.crf: could not allocate the workspace")
    tot = part.sum(0)
    gA = tot[S * S:2 * S * S].reshape(S, S).T  # back from transitions.T
    if reg == REG_NEGENTROPY and mode == MODE_GRAD:
        gA = gA + K * tot[:S * S].reshape(S, S)
    n = 2 * S * S
    return value, vdot, ge, gA.astype(dt), tot[n:n + S].astype(dt), tot[n + S:].astype(dt)


def _factor(A, double gamma):
    """``K[j, i] = exp((A[j, i] − c_i)/γ)``, ``c_i = max_j A[j, i]`` (0 in an all −inf column)."""
    c = A.max(axis=0)
    with np.errstate(invalid="ignore"):
        K = np.exp((A - c[None, :]) / gamma)
    K[:, ~(c > -np.inf)] = 0.0
    return np.ascontiguousarray(K), np.ascontiguousarray(c)


def crf_value(emissions, transitions, start, end, lengths, int reg, double gamma):
    """Log-partition (negentropy, γ = 1) per item: ``value (B,)``.

    emissions ``(B, T, S)``, transitions ``(S, S)`` ([from, to]), start, end
    ``(S,)``, lengths ``(B,)`` int64 in ``1..T``.
    """
    return _run(emissions, transitions, start, end, lengths, None, reg, gamma, MODE_VALUE)[0]


def crf_grad(emissions, transitions, start, end, lengths, weights, int reg, double gamma):
    """``(value (B,), g_emissions (B, T, S), g_transitions (S, S), g_start (S,), g_end (S,))``.

    ``g_emissions[b]`` is ∇ of item b's value (zero past its length); the
    shared gradients are ``Σ_b weights[b]·∇value_b`` (weights None: all 1).
    """
    value, _, ge, gA, gs, gen = _run(emissions, transitions, start, end, lengths, weights,
                                     reg, gamma, MODE_GRAD)
    return value, ge, gA, gs, gen


def crf_hvp(emissions, transitions, start, end, Ze, ZA, Zs, Zen, lengths, weights,
            int reg, double gamma):
    """``(vdot (B,), h_emissions (B, T, S), h_transitions, h_start, h_end)``.

    ``h = ∇²value_b·Z_b`` with ``Z_b = (Ze[b], ZA, Zs, Zen)``: per item for the
    emissions, ``Σ_b weights[b]·(...)`` for the shared parts; ``vdot[b] =
    <∇value_b, Z_b>``.
    """
    _, vdot, he, hA, hs, hen = _run(emissions, transitions, start, end, lengths, weights,
                                    reg, gamma, MODE_HVP, (Ze, ZA, Zs, Zen))
    return vdot, he, hA, hs, hen


ctypedef struct _DecodeCtx:
    const void* em
    const double* At
    const double* st
    const double* en
    const long long* lengths
    void* score
    long long* tags
    int* bp
    double* buf      # lbuf doubles per slot (2·S, rounded to whole lines)
    Py_ssize_t lbuf
    Py_ssize_t T, S
    bint f64


cdef void _decode_one(_DecodeCtx* c, Py_ssize_t b, int slot, floating* tag) noexcept nogil:
    cdef Py_ssize_t T = c.T, S = c.S, t, i, j, best, L = c.lengths[b]
    cdef const floating* em = <const floating*> c.em + b * T * S
    cdef const double* At = c.At
    cdef long long* tags = c.tags + b * T
    cdef int* bp = c.bp + b * T * S
    cdef double* V = c.buf + slot * c.lbuf
    cdef double* Vn = V + S
    cdef double* tmp
    cdef double m, x
    for i in range(S):
        V[i] = c.st[i] + em[i]
    for t in range(1, L):
        for i in range(S):
            best = 0
            m = At[i * S] + V[0]
            for j in range(1, S):
                x = At[i * S + j] + V[j]
                if x > m:
                    m = x
                    best = j
            Vn[i] = m + em[t * S + i]
            bp[t * S + i] = <int> best
        tmp = V; V = Vn; Vn = tmp
    best = 0
    for i in range(S):
        V[i] = V[i] + c.en[i]
    for i in range(1, S):
        if V[i] > V[best]:
            best = i
    (<floating*> c.score)[b] = <floating> V[best]
    if V[best] == -INFINITY:
        return
    for t in range(L - 1, 0, -1):
        tags[t] = best
        best = bp[t * S + best]
    tags[0] = best


cdef void _decode_item(void* ctx, Py_ssize_t b, int slot) noexcept nogil:
    cdef _DecodeCtx* c = <_DecodeCtx*> ctx
    if c.f64:
        _decode_one(c, b, slot, <double*> NULL)
    else:
        _decode_one(c, b, slot, <float*> NULL)


cdef void _decode_batch(const floating[:, :, ::1] em, const double[:, ::1] At,
                        const double[::1] st, const double[::1] en,
                        const long long[::1] lengths,
                        floating[::1] score, long long[:, ::1] tags,
                        int[:, :, ::1] bp, int nthreads) noexcept:
    """Hard Viterbi with back-pointers; first argmax on ties; -1 tags if infeasible."""
    cdef _DecodeCtx c
    c.em = &em[0, 0, 0]
    c.At = &At[0, 0]
    c.st = &st[0]
    c.en = &en[0]
    c.lengths = &lengths[0]
    c.score = &score[0]
    c.tags = &tags[0, 0]
    c.bp = &bp[0, 0, 0]
    c.T = em.shape[1]
    c.S = em.shape[2]
    c.lbuf = 2 * c.S
    c.f64 = floating is double
    with nogil:
        if pool.parallel_for_work(em.shape[0], nthreads, _decode_item, &c, &c.buf, &c.lbuf) < 0:
            tags[0, 0] = -2


def crf_decode(emissions, transitions, start, end, lengths):
    """``(score (B,), tags (B, T) int64)``: the best tag sequence, -1 past a length."""
    B, T, S = emissions.shape
    At = _double(transitions, (S, S)).T.copy()
    st, en = _double(start, (S,)), _double(end, (S,))
    score = np.empty(B, dtype=emissions.dtype)
    tags = np.full((B, T), -1, dtype=np.int64)
    bp = np.empty((B, T, S), dtype=np.intc)
    if B > 0 and S > 0:
        if emissions.dtype == np.float64:
            _decode_batch[double](emissions, At, st, en, lengths, score, tags, bp, _threads(B, T, S))
        else:
            _decode_batch[float](emissions, At, st, en, lengths, score, tags, bp, _threads(B, T, S))
        if (tags[:, 0] == -2).any():
            raise MemoryError("smoothmax._core.crf: could not allocate the workspace")
    return score, tags
