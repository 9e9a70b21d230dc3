# cython: language_level=3
"""The per-anti-diagonal DTW kernels of ``simd.h`` (see its comments), shared by the
cost-matrix engine (``dtw.pyx``) and the feature engine (``dtwf.pyx``)."""


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
    void sm_dtw_fwd_hvp_d(Py_ssize_t n, const double* theta, const double* z, const double* up,
                          const double* left, const double* dg, double* out, const double* dup,
                          const double* dleft, const double* ddg, double* dout,
                          double* qu, double* ql, double* qd, double* qdu, double* qdl, double* qdd,
                          int reg, double gamma)
    void sm_dtw_fwd_hvp_f(Py_ssize_t n, const double* theta, const double* z, const double* up,
                          const double* left, const double* dg, double* out, const double* dup,
                          const double* dleft, const double* ddg, double* dout,
                          float* qu, float* ql, float* qd, float* qdu, float* qdl, float* qdd,
                          int reg, double gamma)
    void sm_dtw_bwd_hvp_d(Py_ssize_t n, const double* eu, const double* el, const double* ed,
                          const double* fu, const double* fl, const double* fd,
                          const double* qu, const double* ql, const double* qd,
                          const double* qdu, const double* qdl, const double* qdd,
                          double* out, double* dout)
    void sm_dtw_bwd_hvp_f(Py_ssize_t n, const double* eu, const double* el, const double* ed,
                          const double* fu, const double* fl, const double* fd,
                          const float* qu, const float* ql, const float* qd,
                          const float* qdu, const float* qdl, const float* qdd,
                          double* out, double* dout)
    int sm_max_threads()
    ctypedef void (*sm_tile_fn)(void* ctx, Py_ssize_t I, Py_ssize_t J, int thread) noexcept nogil
    void sm_wavefront(Py_ssize_t nI, Py_ssize_t nJ, int reverse, sm_tile_fn fn, void* ctx,
                      int* done)
