# cython: language_level=3
"""The Sakoe-Chiba band of the DTW engines (``dtw.pyx``, ``dtwf.pyx``).

Cell (i, j) (0-based) of an n×m problem is allowed iff it is inside
``tslearn.metrics.sakoe_chiba_mask(n, m, r)``; ``r < 0`` means no band.
"""


cdef inline bint _in_band(Py_ssize_t i, Py_ssize_t j, Py_ssize_t n, Py_ssize_t m,
                          Py_ssize_t r) noexcept nogil:
    """0-based cell (i, j) of an n×m problem inside tslearn's Sakoe-Chiba mask."""
    if r < 0:
        return True
    if n <= m:
        return i - r <= j and j <= i + (m - n) + r
    return j - r <= i and i <= j + (n - m) + r


cdef inline Py_ssize_t _floor_half(Py_ssize_t a) noexcept nogil:
    return (a - (a & 1)) // 2


cdef inline void _diag_range(Py_ssize_t d, Py_ssize_t la, Py_ssize_t lb, Py_ssize_t r,
                             Py_ssize_t* lo, Py_ssize_t* hi) noexcept nogil:
    """Rows i (1-based) of the cells (i, d - i) of anti-diagonal d to compute.

    The cells of the problem, 1 <= i <= la, 1 <= d - i <= lb, intersected with
    the band (_in_band with i - 1, d - i - 1). Both ends are non-decreasing in
    d by steps of at most 1, which the engines' rolling buffers rely on.
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
