# cython: language_level=3
"""Smoothed max operators max_Ω for the compiled engine (docs/spec.md §1).

The maths is written once, in ``include/smx_ops.hpp`` (shared with the CUDA
kernels); ``simd.h`` runs it over rows. Declared here for ``viterbi.pyx``,
``dag.pyx`` and ``crf.pyx``:

* ``max_omega(x, q, n, reg, gamma)`` returns ``max_Ω(x[:n])`` and writes the
  gradient ``q = ∇max_Ω(x)`` (a probability vector) into ``q[:n]``;
* ``max_omega_hvp(q, z, out, n, reg, gamma)`` writes ``H·z`` into ``out[:n]``,
  ``H`` the Hessian of ``max_Ω`` at the point whose gradient is ``q``
  (for the three operators ``H`` is a function of ``q`` alone).

``reg``: 0 negentropy, 1 squared l2 (sparsemax), 2 hard (first argmax).
All arithmetic is in double whatever the caller's storage dtype. A module
using them calls ``sm_init_isa()`` at import (the negentropy row is chosen
per ISA: AVX-512, AVX2 + FMA or baseline).

``-inf`` entries get gradient exactly 0; an all ``-inf`` input has value
``-inf`` and gradient 0. Hessian-vector products are computed only on the
support of ``q``, so a masked entry never contributes.
"""


cdef extern from "simd.h" nogil:
    void sm_init_isa "smx::cpu::init_isa"()
    const char* sm_isa_name "smx::cpu::isa_name"()
    double max_omega "smx::cpu::max_omega"(const double* x, double* q, Py_ssize_t n,
                                            int reg, double gamma)
    void max_omega_hvp "smx::cpu::max_omega_hvp"(const double* q, const double* z, double* out,
                                                  Py_ssize_t n, int reg, double gamma)


cdef extern from "simd.h" namespace "smx::cpu" nogil:
    # Whether x[:n] holds NaN or -inf (any infinity with any_inf): the value
    # checks of smoothmax._values.check_values, vectorised (simd.h, BadValues)
    int bad_values[T](Py_ssize_t n, const T* x, int any_inf)


cdef enum:
    REG_NEGENTROPY = 0
    REG_L2 = 1
    REG_HARD = 2
