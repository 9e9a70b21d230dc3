# cython: language_level=3
"""Smoothed max operators max_Ω for the compiled engine (docs/spec.md §1).

Small ``nogil`` inline functions shared by ``dtw.pyx`` and ``viterbi.pyx``:

* ``max_omega(x, q, n, reg, gamma)`` returns ``max_Ω(x[:n])`` and writes the
  gradient ``q = ∇max_Ω(x)`` (a probability vector) into ``q[:n]``;
* ``max_omega_hvp(q, z, out, n, reg, gamma)`` writes ``H·z`` into ``out[:n]``,
  ``H`` the Hessian of ``max_Ω`` at the point whose gradient is ``q``
  (for the three operators ``H`` is a function of ``q`` alone).

``reg``: 0 negentropy, 1 squared l2 (sparsemax), 2 hard (first argmax).
All arithmetic is in double whatever the caller's storage dtype. The
negentropy max is ``sm_negentropy_row`` of ``simd.h`` (vectorized exp with
runtime ISA dispatch; a module using it calls ``sm_init_isa()`` at import).

``-inf`` entries get gradient exactly 0; an all ``-inf`` input has value
``-inf`` and gradient 0: every ``x - max`` is taken only once the max is known
to be finite, so ``-inf - (-inf)`` never happens. Hessian-vector products are
computed only on the support of ``q``, so a masked entry never contributes.
"""
from libc.math cimport INFINITY


cdef extern from "simd.h" nogil:
    void sm_init_isa()
    const char* sm_isa_name()
    double sm_negentropy_row(Py_ssize_t n, const double* x, double* q, double gamma)


cdef enum:
    REG_NEGENTROPY = 0
    REG_L2 = 1
    REG_HARD = 2


cdef inline double _max_of(const double* x, Py_ssize_t n) noexcept nogil:
    cdef double m = -INFINITY
    cdef Py_ssize_t k
    for k in range(n):
        if x[k] > m:
            m = x[k]
    return m


cdef inline double _zero_grad(double* q, Py_ssize_t n) noexcept nogil:
    """All entries are -inf: value -inf, gradient 0."""
    cdef Py_ssize_t k
    for k in range(n):
        q[k] = 0.0
    return -INFINITY


cdef inline double negentropy_max(const double* x, double* q, Py_ssize_t n,
                                  double gamma) noexcept nogil:
    """γ·logsumexp(x/γ) and softmax(x/γ), max subtracted before exp."""
    return sm_negentropy_row(n, x, q, gamma)


cdef inline double l2_max(const double* x, double* q, Py_ssize_t n,
                          double gamma) noexcept nogil:
    """<q, x> - (γ/2)‖q‖², q = sparsemax(x/γ) (Michelot's exact algorithm).

    With y = (x - max)/γ, the support starts as the finite entries and every
    pass drops the entries with y_k <= τ = (Σ_S y - 1)/|S|; at most n passes,
    exact for any n (n is 3 for DTW, S for Viterbi). The argmax (y = 0 > τ)
    is never dropped, so the support is never empty.
    """
    cdef double m = _max_of(x, n)
    cdef double total, tau, y, val = 0.0
    cdef Py_ssize_t k, count
    cdef bint changed = True
    if m == -INFINITY:
        return _zero_grad(q, n)
    for k in range(n):
        q[k] = 1.0 if x[k] > -INFINITY else 0.0  # q doubles as the support flag
    tau = 0.0
    while changed:
        total = 0.0
        count = 0
        for k in range(n):
            if q[k] != 0.0:
                total += (x[k] - m) / gamma
                count += 1
        tau = (total - 1.0) / count
        changed = False
        for k in range(n):
            if q[k] != 0.0 and (x[k] - m) / gamma <= tau:
                q[k] = 0.0
                changed = True
    for k in range(n):
        if q[k] != 0.0:
            y = (x[k] - m) / gamma
            q[k] = y - tau
            val += q[k] * (y - 0.5 * q[k])
    return m + gamma * val


cdef inline double hard_max(const double* x, double* q, Py_ssize_t n) noexcept nogil:
    """max(x) and the one-hot vector of its first argmax."""
    cdef double m = -INFINITY
    cdef Py_ssize_t k, best = -1
    for k in range(n):
        q[k] = 0.0
        if x[k] > m:
            m = x[k]
            best = k
    if best >= 0:
        q[best] = 1.0
    return m


cdef inline double max_omega(const double* x, double* q, Py_ssize_t n,
                             int reg, double gamma) noexcept nogil:
    """max_Ω(x[:n]); writes ∇max_Ω(x) into q[:n]."""
    if reg == REG_NEGENTROPY:
        return negentropy_max(x, q, n, gamma)
    elif reg == REG_L2:
        return l2_max(x, q, n, gamma)
    return hard_max(x, q, n)


cdef inline void max_omega_hvp(const double* q, const double* z, double* out,
                               Py_ssize_t n, int reg, double gamma) noexcept nogil:
    """out = H·z with H the Hessian of max_Ω where its gradient is q.

    negentropy: (q⊙z - q<q, z>)/γ; l2: (s⊙z - s·mean_S(z))/γ with s the
    indicator of S = supp(q); hard: 0. Entries off the support get exactly 0
    and their z is never read into a sum.
    """
    cdef double acc = 0.0
    cdef Py_ssize_t k, count = 0
    if reg == REG_NEGENTROPY:
        for k in range(n):
            if q[k] != 0.0:
                acc += q[k] * z[k]
        for k in range(n):
            out[k] = q[k] * (z[k] - acc) / gamma if q[k] != 0.0 else 0.0
    elif reg == REG_L2:
        for k in range(n):
            if q[k] != 0.0:
                acc += z[k]
                count += 1
        if count > 0:
            acc /= count
        for k in range(n):
            out[k] = (z[k] - acc) / gamma if q[k] != 0.0 else 0.0
    else:
        for k in range(n):
            out[k] = 0.0
