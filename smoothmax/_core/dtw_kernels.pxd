# cython: language_level=3
"""The per-anti-diagonal DTW kernels of ``simd.h`` (see its comments), shared by the
cost-matrix engine (``dtw.pyx``) and the feature engine (``dtwf.pyx``).

Templates on the stored weights' type ``T`` (float or double), deduced from
the pointers a fused ``floating`` function passes."""


cdef extern from "simd.h" namespace "smx::cpu" nogil:
    void dtw_fwd[T](Py_ssize_t n, const double* theta, const double* up, const double* left,
                    const double* dg, double* out, T* qu, T* ql, T* qd, int reg,
                    double gamma)
    void dtw_bwd[T](Py_ssize_t n, const double* eu, const double* el, const double* ed,
                    const T* qu, const T* ql, const T* du, const T* dl, double* out)
    double dtw_q_diag[T](T qu, T ql)
    void dtw_fwd_hvp[T](Py_ssize_t n, const double* theta, const double* z, const double* up,
                        const double* left, const double* dg, double* out, const double* dup,
                        const double* dleft, const double* ddg, double* dout,
                        T* qu, T* ql, T* qd, T* qdu, T* qdl, T* qdd, int reg, double gamma)
    void dtw_bwd_hvp[T](Py_ssize_t n, const double* eu, const double* el, const double* ed,
                        const double* fu, const double* fl, const double* fd,
                        const T* qu, const T* ql, const T* qd,
                        const T* qdu, const T* qdl, const T* qdd, double* out, double* dout)
