# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Compiled DTW_Ω engine (docs/spec.md §4, docs/engines.md).

R[0, 0] = 0, R[i, 0] = R[0, j] = +inf and
R[i, j] = theta[i-1, j-1] + min_Ω(R[i-1, j], R[i, j-1], R[i-1, j-1]) with
min_Ω(r) = -max_Ω(-r) on all three predecessors everywhere.

Design: the forward pass stores the local weights q (order up, left,
diagonal), so that the reverse pass
E[i, j] = Σ_children ebar_child·q_child[toward (i, j)] needs no exp, is
accurate in float32 and never meets ``inf - inf``. The gradient keeps two
of them a cell, q_up and q_left, and the reverse pass takes
q_diag = 1 - q_up - q_left (``dtw_q_diag`` in ``simd.h``, exact zeros kept);
the HVP keeps all three and their tangents qdot = -H(-r)·Rdot (6 per cell).

* ``_dtw_tiled`` (value, gradient, HVP, hard path) cuts a problem into tiles
  of TS×TS cells. Inside a tile (``_tile_fwd``, ``_tile_bwd``) the passes
  sweep anti-diagonals: the cells of one diagonal are independent, so the
  per-diagonal loops of ``simd.h`` are vectorized (branch-free operators,
  inline exp/log). R, Rdot, ebar, ebar_dot live in rolling diagonal buffers
  of TS + 2 doubles; theta/Z and E/Edot move between rows and diagonals
  eight diagonals at a time. Tiles talk through edge arrays: the last row
  and column of R (Rdot) in the forward pass, ready-made products
  ebar·q (and tangents) from the first row and column in the reverse pass.
  A tile depends only on its neighbours above and on the left (below and
  on the right in the reverse pass): when the batch is smaller than the
  thread count, the tiles of each problem run in parallel as a wavefront
  (``sm_wavefront`` in ``pool.h``, tiles of 64 to 256 cells a side, about
  eight per thread along the longer side); otherwise the threads share the
  batch (``pool.parallel_for``, docs/threads.md) and each problem is one
  tile up to 512×512 (tiles of 256 beyond).
  The tests check it against the reference engine (``smoothmax._reference``)
  and brute force, not against a second compiled DTW.

Cells outside the Sakoe-Chiba band or past the lengths are +inf in R and
exactly 0 in q, E, Edot. All arithmetic is in double; theta, Z, E, Edot (and
the stored q, qdot) use the caller's dtype. The weight workspace comes from
``smoothmax._buffers.workspace`` (kept for the next call within its limit).
"""
from libc.stdlib cimport calloc, malloc, free
from libc.math cimport INFINITY

cdef extern from * nogil:
    # GCC/Clang's prefetch hint (rw: 0 read, 1 write; locality 3: keep in every cache level)
    void __builtin_prefetch(const void* addr, int rw, int locality)

import numpy as np

from .._buffers import pass_outputs as _pass_outputs, workspace as _workspace
from .._values import raise_found as _raise_found

from cython cimport floating

from .band cimport _diag_range
from .operators cimport bad_values, sm_init_isa, sm_isa_name


from .dtw_kernels cimport dtw_bwd, dtw_bwd_hvp, dtw_fwd, dtw_fwd_hvp, dtw_q_diag
from . cimport pool


sm_init_isa()


def _simd_isa():
    """Which build of the anti-diagonal kernels runs on this CPU (for benchmarks)."""
    return sm_isa_name().decode()


cdef enum:
    MODE_VALUE = 0
    MODE_GRAD = 1
    MODE_HVP = 2


cdef enum:
    QPAD = 4   # zero padding around each stored-q plane of a tile
    BLOCK = 8  # diagonals of theta / E moved at a time between rows and diagonals
    NEDGE = 4  # edge arrays of each kind (see _Grid): the HVP's; a gradient uses 2


ctypedef struct _Grid:
    # One problem cut into tiles of TS x TS cells (the last row/column of
    # tiles may be smaller). Tile (I, J) holds rows i0 = I·TS + 1 .. and
    # columns j0 = J·TS + 1 .. (1-based, as R). lo/hi: the rows of each global
    # anti-diagonal (_diag_range). Edge arrays, indexed by the global column j
    # ("h", NEDGE arrays of nTI + 1 rows of lb + 1) or row i ("v", NEDGE arrays
    # of nTJ + 1 rows of la + 1); h row I is the grid row between tile rows
    # I - 1 and I.
    #   forward: h[0]/v[0] R, h[1]/v[1] Rdot of the last row/column of a tile;
    #   reverse: contributions sent by a tile's first row to the row above,
    #     h[0] ebar·q_up and h[1] ebar·q_diag (at the parent's column), h[2]/h[3]
    #     their tangents; by its first column, v[0] ebar·q_left and v[1]
    #     ebar·q_diag (at the parent's row), v[2]/v[3] tangents.
    Py_ssize_t NB, la, lb, TS, nTI, nTJ, P, nplanes, hs, vs
    const Py_ssize_t* lo
    const Py_ssize_t* hi
    double* h
    double* v
    int reg, mode
    double gamma


cdef inline Py_ssize_t _ceil_div(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    return (a + b - 1) // b


cdef inline Py_ssize_t _tile_work(Py_ssize_t TS) noexcept nogil:
    """Doubles of per-thread workspace of a tile: 6 rolling diagonals, 2 blocks,
    a diagonal of scratch weights."""
    return (7 + 2 * BLOCK) * (TS + 2)


cdef inline Py_ssize_t _tile_iwork(Py_ssize_t TS) noexcept nogil:
    return 3 * (2 * TS + 4)


cdef inline Py_ssize_t _q_plane(Py_ssize_t TS) noexcept nogil:
    return TS * TS + 2 * QPAD


cdef inline int _nedge(int mode) noexcept nogil:
    """Edge arrays of each kind a mode uses: R, ebar·q_up (q_left), ebar·q_diag,
    and for the HVP the tangents of all three (h[1]/v[1] in the forward)."""
    return NEDGE if mode == MODE_HVP else 2


cdef inline Py_ssize_t _edge_work(Py_ssize_t NA, Py_ssize_t NB, Py_ssize_t TS,
                                  int mode) noexcept nogil:
    return _nedge(mode) * ((_ceil_div(NA, TS) + 1) * (NB + 1) + (_ceil_div(NB, TS) + 1) * (NA + 1))


cdef Py_ssize_t _tile_ranges(const _Grid* g, Py_ssize_t i0, Py_ssize_t th, Py_ssize_t j0,
                             Py_ssize_t tw, Py_ssize_t* tlo, Py_ssize_t* thi,
                             Py_ssize_t* toff) noexcept nogil:
    """Local rows [tlo, thi] (1-based in the tile) of the cells of local diagonal dl.

    Local cell (li, lj) is (i0 + li - 1, j0 + lj - 1), on global diagonal
    dl + i0 + j0 - 2. toff: offset of each diagonal's weights in a q plane.
    Diagonals past the tile get an empty range at row th + 1 (their weights
    point at the zero pad). Returns the number of cells.
    """
    cdef Py_ssize_t dl, d, a, z, total = 0
    for dl in range(2):
        tlo[dl] = 1
        thi[dl] = 0
        toff[dl] = 0
    for dl in range(2, th + tw + 1):
        d = dl + i0 + j0 - 2
        a = max(max(1, dl - tw), g.lo[d] - i0 + 1)
        z = min(min(th, dl - 1), g.hi[d] - i0 + 1)
        tlo[dl] = a
        thi[dl] = z
        toff[dl] = total
        if z >= a:
            total += z - a + 1
    for dl in range(th + tw + 1, th + tw + 3):
        tlo[dl] = th + 1
        thi[dl] = th
        toff[dl] = total
    return total


cdef void _gather(const floating* src, Py_ssize_t NB, double* blk, Py_ssize_t W,
                  Py_ssize_t dl0, Py_ssize_t dl1, const Py_ssize_t* tlo,
                  const Py_ssize_t* thi, Py_ssize_t i0, Py_ssize_t j0) noexcept nogil:
    """blk[(dl - dl0)·W + li] = src at local cell (li, dl - li), diagonals dl0..dl1.

    Row by row, so each row of the tile is read once (contiguously) per block.
    """
    cdef Py_ssize_t li, dl, a = tlo[dl0], z = thi[dl0], nd = dl1 - dl0 + 1
    cdef const floating* row
    cdef double* out
    for dl in range(dl0 + 1, dl1 + 1):  # rows on every diagonal of the block
        a = max(a, tlo[dl])
        z = min(z, thi[dl])
    for li in range(tlo[dl0], thi[dl1] + 1):
        row = src + (i0 + li - 2) * NB + (j0 - 2) + (dl0 - li)
        # the next block's part of this row: its rows are a row stride apart, on
        # other pages, where the hardware prefetchers do not follow
        __builtin_prefetch(row + 2 * BLOCK - 1, 0, 3)
        out = blk + li
        if a <= li <= z:  # on every diagonal of the block: no tests
            for dl in range(nd):
                out[dl * W] = row[dl]
        else:
            for dl in range(nd):
                if tlo[dl0 + dl] <= li <= thi[dl0 + dl]:
                    out[dl * W] = row[dl]


cdef void _scatter(floating* dst, Py_ssize_t NB, const double* blk, Py_ssize_t W,
                   Py_ssize_t dl0, Py_ssize_t dl1, const Py_ssize_t* tlo,
                   const Py_ssize_t* thi, Py_ssize_t i0, Py_ssize_t j0) noexcept nogil:
    """The inverse of ``_gather``."""
    cdef Py_ssize_t li, dl, a = tlo[dl0], z = thi[dl0], nd = dl1 - dl0 + 1
    cdef floating* row
    cdef const double* inp
    for dl in range(dl0 + 1, dl1 + 1):
        a = max(a, tlo[dl])
        z = min(z, thi[dl])
    for li in range(tlo[dl0], thi[dl1] + 1):
        row = dst + (i0 + li - 2) * NB + (j0 - 2) + (dl0 - li)
        # the next block this pass scatters is the one before (the reverse pass runs
        # backwards): as in _gather, its part of this row
        __builtin_prefetch(row - BLOCK, 1, 3)
        inp = blk + li
        if a <= li <= z:
            for dl in range(nd):
                row[dl] = <floating> inp[dl * W]
        else:
            for dl in range(nd):
                if tlo[dl0 + dl] <= li <= thi[dl0 + dl]:
                    row[dl] = <floating> inp[dl * W]


cdef void _tile_fwd(const _Grid* g, const floating* theta, const floating* Z,
                    floating* wq, Py_ssize_t I, Py_ssize_t J,
                    double* wd, Py_ssize_t* wi) noexcept nogil:
    """Forward pass over tile (I, J), anti-diagonal by anti-diagonal.

    Rolling diagonal buffers indexed by the local row li in 0..th + 1: entry
    0 of diagonal dl is the cell (0, dl) of the row above the tile (from the
    h edge), entry dl the cell (dl, 0) of the column on its left (v edge);
    everything not written for a diagonal is +inf in R and 0 in Rdot. The
    tile's last row and column go to the edges of the next tiles.
    """
    cdef Py_ssize_t TS = g.TS, W = TS + 2
    cdef Py_ssize_t i0 = I * TS + 1, j0 = J * TS + 1
    cdef Py_ssize_t th = min(TS, g.la - i0 + 1), tw = min(TS, g.lb - j0 + 1)
    cdef Py_ssize_t Dl = th + tw, dl, a, z, n, c, k, li, total, P = g.P
    cdef Py_ssize_t* tlo = wi
    cdef Py_ssize_t* thi = wi + (2 * TS + 4)
    cdef Py_ssize_t* toff = wi + 2 * (2 * TS + 4)
    cdef double* R[3]
    cdef double* Rd[3]
    cdef Py_ssize_t wlo[3]
    cdef Py_ssize_t whi[3]
    cdef double* blk = wd + 6 * W
    cdef double* blkz = blk + BLOCK * W
    cdef floating* qs = <floating*> (blkz + BLOCK * W)  # q_diag of one diagonal (dtw_fwd)
    cdef double* cur
    cdef double* curd
    cdef double* p1
    cdef double* p2
    cdef double* d1
    cdef double* d2
    cdef double* hR_in = g.h + I * (g.lb + 1)
    cdef double* hR_out = g.h + (I + 1) * (g.lb + 1)
    cdef double* hD_in = g.h + g.hs + I * (g.lb + 1)
    cdef double* hD_out = g.h + g.hs + (I + 1) * (g.lb + 1)
    cdef double* vR_in = g.v + J * (g.la + 1)
    cdef double* vR_out = g.v + (J + 1) * (g.la + 1)
    cdef double* vD_in = g.v + g.vs + J * (g.la + 1)
    cdef double* vD_out = g.v + g.vs + (J + 1) * (g.la + 1)
    cdef floating* q = NULL
    cdef floating* qp
    cdef bint hvp = g.mode == MODE_HVP
    cdef Py_ssize_t boff

    if th <= 0 or tw <= 0:
        return
    total = _tile_ranges(g, i0, th, j0, tw, tlo, thi, toff)
    if g.mode != MODE_VALUE:
        q = wq + (I * g.nTJ + J) * g.nplanes * P + QPAD
        for c in range(g.nplanes):  # finite pads: the reverse reads them times ebar = 0
            qp = q + c * P
            for k in range(-QPAD, 0):
                qp[k] = 0
            for k in range(total, total + QPAD):
                qp[k] = 0
    for c in range(3):
        R[c] = wd + c * W
        Rd[c] = wd + (3 + c) * W
        for k in range(W):
            R[c][k] = INFINITY
            Rd[c][k] = 0.0
    R[0][0] = hR_in[j0 - 1]   # corner (0, 0)
    R[1][0] = hR_in[j0]       # (0, 1)
    R[1][1] = vR_in[i0]       # (1, 0)
    if hvp:
        Rd[0][0] = hD_in[j0 - 1]
        Rd[1][0] = hD_in[j0]
        Rd[1][1] = vD_in[i0]
    wlo[0] = 0; whi[0] = 0
    wlo[1] = 0; whi[1] = 1
    wlo[2] = 1; whi[2] = 0
    for dl in range(2, Dl + 1):
        if (dl - 2) % BLOCK == 0:
            _gather(theta, g.NB, blk, W, dl, min(dl + BLOCK - 1, Dl), tlo, thi, i0, j0)
            if hvp:
                _gather(Z, g.NB, blkz, W, dl, min(dl + BLOCK - 1, Dl), tlo, thi, i0, j0)
        c = dl % 3
        cur = R[c]
        p1 = R[(dl - 1) % 3]
        p2 = R[(dl - 2) % 3]
        curd = Rd[c]
        d1 = Rd[(dl - 1) % 3]
        d2 = Rd[(dl - 2) % 3]
        for k in range(wlo[c], whi[c] + 1):  # forget diagonal dl - 3
            cur[k] = INFINITY
            curd[k] = 0.0
        a = tlo[dl]
        z = thi[dl]
        n = z - a + 1
        wlo[c] = W
        whi[c] = -1
        if n > 0:
            boff = ((dl - 2) % BLOCK) * W + a
            if hvp:
                qp = q + toff[dl]
                dtw_fwd_hvp(n, blk + boff, blkz + boff, p1 + a - 1, p1 + a, p2 + a - 1,
                            cur + a, d1 + a - 1, d1 + a, d2 + a - 1, curd + a,
                            qp, qp + P, qp + 2 * P, qp + 3 * P, qp + 4 * P, qp + 5 * P,
                            g.reg, g.gamma)
            elif q != NULL:
                qp = q + toff[dl]
                dtw_fwd(n, blk + boff, p1 + a - 1, p1 + a, p2 + a - 1, cur + a,
                        qp, qp + P, qs, g.reg, g.gamma)
            else:
                dtw_fwd(n, blk + boff, p1 + a - 1, p1 + a, p2 + a - 1, cur + a,
                        <floating*> NULL, <floating*> NULL, <floating*> NULL, g.reg, g.gamma)
            wlo[c] = a
            whi[c] = z
            if a <= th <= z:  # last row of the tile
                hR_out[j0 + dl - th - 1] = cur[th]
                if hvp:
                    hD_out[j0 + dl - th - 1] = curd[th]
            li = dl - tw
            if a <= li <= z:  # last column
                vR_out[i0 + li - 1] = cur[li]
                if hvp:
                    vD_out[i0 + li - 1] = curd[li]
        if dl <= tw:  # cell (0, dl) above the tile
            cur[0] = hR_in[j0 + dl - 1]
            if hvp:
                curd[0] = hD_in[j0 + dl - 1]
            wlo[c] = 0
            whi[c] = max(whi[c], 0)
        if dl <= th:  # cell (dl, 0) left of the tile
            cur[dl] = vR_in[i0 + dl - 1]
            if hvp:
                curd[dl] = vD_in[i0 + dl - 1]
            wlo[c] = min(wlo[c], dl)
            whi[c] = max(whi[c], dl)


cdef inline double _q_diag(const floating* qU, const floating* qL, const floating* qD,
                          Py_ssize_t pos) noexcept nogil:
    """The diagonal weight of the cell at ``pos`` of a tile's planes: stored
    (HVP, ``qD`` not NULL) or derived from the pair the gradient keeps."""
    if qD != NULL:
        return qD[pos]
    return dtw_q_diag(qU[pos], qL[pos])


cdef void _tile_bwd(const _Grid* g, floating* E, floating* Ed,
                    const floating* wq, Py_ssize_t I, Py_ssize_t J,
                    double* wd, Py_ssize_t* wi) noexcept nogil:
    """Reverse pass over tile (I, J), pull form, anti-diagonal by anti-diagonal.

    ebar(i, j) = ebar(i+1, j)·q_up(i+1, j) + ebar(i, j+1)·q_left(i, j+1)
    + ebar(i+1, j+1)·q_diag(i+1, j+1) (and its tangent). Children inside the
    tile come from the rolling buffers (0 where there is no cell); children
    in the tiles below / on the right arrive as ready-made products through
    the edges (their q lives in their own tile), added to the tile's last row
    and column. The first row and column send theirs to the tiles above and
    on the left.
    """
    cdef Py_ssize_t TS = g.TS, W = TS + 2
    cdef Py_ssize_t i0 = I * TS + 1, j0 = J * TS + 1
    cdef Py_ssize_t th = min(TS, g.la - i0 + 1), tw = min(TS, g.lb - j0 + 1)
    cdef Py_ssize_t Dl = th + tw, dl, a, z, n, c, k, li, i, j, total, P = g.P
    cdef Py_ssize_t offU, offL, offD, pos
    cdef Py_ssize_t* tlo = wi
    cdef Py_ssize_t* thi = wi + (2 * TS + 4)
    cdef Py_ssize_t* toff = wi + 2 * (2 * TS + 4)
    cdef double* eb[3]
    cdef double* fb[3]
    cdef Py_ssize_t wlo[3]
    cdef Py_ssize_t whi[3]
    cdef double* blk = wd + 6 * W
    cdef double* blkz = blk + BLOCK * W
    cdef double* cur
    cdef double* curd
    cdef double* p1
    cdef double* p2
    cdef double* f1
    cdef double* f2
    cdef Py_ssize_t L1 = g.lb + 1, L2 = g.la + 1
    # incoming (from the tiles below / right) and outgoing (to above / left)
    cdef double* hU_in = g.h + (I + 1) * L1
    cdef double* hG_in = g.h + g.hs + (I + 1) * L1
    cdef double* hUd_in = g.h + 2 * g.hs + (I + 1) * L1
    cdef double* hGd_in = g.h + 3 * g.hs + (I + 1) * L1
    cdef double* hU_out = g.h + I * L1
    cdef double* hG_out = g.h + g.hs + I * L1
    cdef double* hUd_out = g.h + 2 * g.hs + I * L1
    cdef double* hGd_out = g.h + 3 * g.hs + I * L1
    cdef double* vL_in = g.v + (J + 1) * L2
    cdef double* vG_in = g.v + g.vs + (J + 1) * L2
    cdef double* vLd_in = g.v + 2 * g.vs + (J + 1) * L2
    cdef double* vGd_in = g.v + 3 * g.vs + (J + 1) * L2
    cdef double* vL_out = g.v + J * L2
    cdef double* vG_out = g.v + g.vs + J * L2
    cdef double* vLd_out = g.v + 2 * g.vs + J * L2
    cdef double* vGd_out = g.v + 3 * g.vs + J * L2
    cdef const floating* qU
    cdef const floating* qL
    cdef const floating* qD
    cdef const floating* qdU = NULL
    cdef const floating* qdL = NULL
    cdef const floating* qdD = NULL
    cdef bint hvp = g.mode == MODE_HVP
    cdef bint last = i0 + th - 1 == g.la and j0 + tw - 1 == g.lb
    cdef double e, f

    if th <= 0 or tw <= 0:
        return
    total = _tile_ranges(g, i0, th, j0, tw, tlo, thi, toff)
    qU = wq + (I * g.nTJ + J) * g.nplanes * P + QPAD
    qL = qU + P
    qD = NULL
    if hvp:
        qD = qU + 2 * P
        qdU = qU + 3 * P
        qdL = qU + 4 * P
        qdD = qU + 5 * P
    for c in range(3):
        eb[c] = wd + c * W
        fb[c] = wd + (3 + c) * W
        for k in range(W):
            eb[c][k] = 0.0
            fb[c][k] = 0.0
        wlo[c] = 1
        whi[c] = 0
    for dl in range(Dl, 1, -1):
        c = dl % 3
        cur = eb[c]
        p1 = eb[(dl + 1) % 3]
        p2 = eb[(dl + 2) % 3]
        curd = fb[c]
        f1 = fb[(dl + 1) % 3]
        f2 = fb[(dl + 2) % 3]
        for k in range(wlo[c], whi[c] + 1):  # forget diagonal dl + 3
            cur[k] = 0.0
            curd[k] = 0.0
        a = tlo[dl]
        z = thi[dl]
        n = z - a + 1
        wlo[c] = a
        whi[c] = z
        if n > 0:
            # weights of (li+1, lj) [up], (li, lj+1) [left], (li+1, lj+1) [diag] toward (li, lj)
            offU = toff[dl + 1] + (a + 1 - tlo[dl + 1])
            offL = toff[dl + 1] + (a - tlo[dl + 1])
            offD = toff[dl + 2] + (a + 1 - tlo[dl + 2])
            if hvp:
                dtw_bwd_hvp(n, p1 + a + 1, p1 + a, p2 + a + 1, f1 + a + 1, f1 + a, f2 + a + 1,
                            qU + offU, qL + offL, qD + offD, qdU + offU, qdL + offL,
                            qdD + offD, cur + a, curd + a)
            else:
                dtw_bwd(n, p1 + a + 1, p1 + a, p2 + a + 1,
                        qU + offU, qL + offL, qU + offD, qL + offD, cur + a)
            if a <= th <= z:  # last row: children below the tile
                j = j0 + dl - th - 1
                cur[th] += hU_in[j] + hG_in[j]
                if hvp:
                    curd[th] += hUd_in[j] + hGd_in[j]
            li = dl - tw
            if a <= li <= z:  # last column: children right of the tile
                i = i0 + li - 1
                cur[li] += vL_in[i] + vG_in[i]
                if hvp:
                    curd[li] += vLd_in[i] + vGd_in[i]
            if last and dl == Dl:  # the end cell
                cur[th] = 1.0
                curd[th] = 0.0
            if a == 1:  # first row: send to the row above
                j = j0 + dl - 2
                pos = toff[dl]
                e = cur[1]
                hU_out[j] = e * qU[pos]
                hG_out[j - 1] = e * _q_diag(qU, qL, qD, pos)
                if hvp:
                    f = curd[1]
                    hUd_out[j] = f * qU[pos] + e * qdU[pos]
                    hGd_out[j - 1] = f * qD[pos] + e * qdD[pos]
            li = dl - 1
            if a <= li <= z:  # first column: send to the column on the left
                i = i0 + li - 1
                pos = toff[dl] + li - a
                e = cur[li]
                vL_out[i] = e * qL[pos]
                if hvp:
                    f = curd[li]
                    vLd_out[i] = f * qL[pos] + e * qdL[pos]
                if li >= 2:  # (1, 1) sends its diagonal share through the row edge
                    vG_out[i - 1] = e * _q_diag(qU, qL, qD, pos)
                    if hvp:
                        vGd_out[i - 1] = f * qD[pos] + e * qdD[pos]
            for k in range(a, z + 1):
                blk[((dl - 2) % BLOCK) * W + k] = cur[k]
            if hvp:
                for k in range(a, z + 1):
                    blkz[((dl - 2) % BLOCK) * W + k] = curd[k]
        if (dl - 2) % BLOCK == 0:
            _scatter(E, g.NB, blk, W, dl, min(dl + BLOCK - 1, Dl), tlo, thi, i0, j0)
            if hvp:
                _scatter(Ed, g.NB, blkz, W, dl, min(dl + BLOCK - 1, Dl), tlo, thi, i0, j0)


ctypedef struct _TileCtx:
    # what a tile task of sm_wavefront needs (arrays as void*: one struct for both dtypes)
    _Grid* g
    const void* theta
    const void* Z
    void* E
    void* Ed
    void* wq
    double** wds
    Py_ssize_t** wis


cdef void _fwd_task_d(void* ctx, Py_ssize_t I, Py_ssize_t J, int thread) noexcept nogil:
    cdef _TileCtx* c = <_TileCtx*> ctx
    _tile_fwd[double](c.g, <const double*> c.theta, <const double*> c.Z, <double*> c.wq,
                      I, J, c.wds[thread], c.wis[thread])


cdef void _fwd_task_f(void* ctx, Py_ssize_t I, Py_ssize_t J, int thread) noexcept nogil:
    cdef _TileCtx* c = <_TileCtx*> ctx
    _tile_fwd[float](c.g, <const float*> c.theta, <const float*> c.Z, <float*> c.wq,
                     I, J, c.wds[thread], c.wis[thread])


cdef void _bwd_task_d(void* ctx, Py_ssize_t I, Py_ssize_t J, int thread) noexcept nogil:
    cdef _TileCtx* c = <_TileCtx*> ctx
    _tile_bwd[double](c.g, <double*> c.E, <double*> c.Ed, <const double*> c.wq,
                      I, J, c.wds[thread], c.wis[thread])


cdef void _bwd_task_f(void* ctx, Py_ssize_t I, Py_ssize_t J, int thread) noexcept nogil:
    cdef _TileCtx* c = <_TileCtx*> ctx
    _tile_bwd[float](c.g, <float*> c.E, <float*> c.Ed, <const float*> c.wq,
                     I, J, c.wds[thread], c.wis[thread])


cdef double _dtw_tiled(const floating* theta, const floating* Z, floating* E, floating* Ed,
                       Py_ssize_t NB, Py_ssize_t la, Py_ssize_t lb, Py_ssize_t band,
                       int reg, double gamma, int mode, Py_ssize_t TS, int team,
                       Py_ssize_t* lohi, double* edges, floating* wq,
                       double** wds, Py_ssize_t** wis, int* done) noexcept nogil:
    """One problem theta[:la, :lb] (row stride NB) by tiles; returns R[la, lb].

    A tile needs only the tiles above, on the left and above-left in the
    forward pass (the mirror in the reverse), so tiles on one tile
    anti-diagonal are independent: with ``par`` the tiles go to
    ``pool.wavefront`` on ``team`` threads (a tile starts as soon as its
    neighbours are done), each thread on its own workspace wds/wis[slot]
    (``done``: one flag per tile); otherwise they run in order on
    wds/wis[0]. E (and Ed) must be zero on entry.
    """
    cdef _Grid g
    cdef Py_ssize_t d, k, I, nk, x
    cdef double value
    g.NB = NB
    g.la = la
    g.lb = lb
    g.TS = TS
    g.nTI = _ceil_div(la, TS)
    g.nTJ = _ceil_div(lb, TS)
    g.P = _q_plane(TS)
    g.nplanes = 6 if mode == MODE_HVP else 2
    g.hs = (g.nTI + 1) * (lb + 1)
    g.vs = (g.nTJ + 1) * (la + 1)
    g.h = edges
    g.v = edges + _nedge(mode) * g.hs
    g.lo = lohi
    g.hi = lohi + (la + lb + 3)
    g.reg = reg
    g.mode = mode
    g.gamma = gamma
    for d in range(2, la + lb + 1):
        _diag_range(d, la, lb, band, &lohi[d], &lohi[la + lb + 3 + d])
    for x in range(g.hs):
        g.h[x] = INFINITY
        g.h[g.hs + x] = 0.0
    for x in range(g.vs):
        g.v[x] = INFINITY
        g.v[g.vs + x] = 0.0
    g.h[0] = 0.0  # R[0, 0]
    cdef _TileCtx ctx
    ctx.g = &g
    ctx.theta = theta
    ctx.Z = Z
    ctx.E = E
    ctx.Ed = Ed
    ctx.wq = wq
    ctx.wds = wds
    ctx.wis = wis
    cdef bint par = team > 1 and g.nTI * g.nTJ > 1
    nk = g.nTI + g.nTJ - 1
    if par:
        if floating is double:
            pool.wavefront(g.nTI, g.nTJ, 0, _fwd_task_d, &ctx, done, team)
        else:
            pool.wavefront(g.nTI, g.nTJ, 0, _fwd_task_f, &ctx, done, team)
    else:
        for k in range(nk):
            for I in range(max(0, k - g.nTJ + 1), min(k, g.nTI - 1) + 1):
                _tile_fwd(&g, theta, Z, wq, I, k - I, wds[0], wis[0])
    value = g.h[g.nTI * (lb + 1) + lb]
    if mode == MODE_VALUE or value == INFINITY:
        return value  # unreachable end cell: E = 0
    for x in range(_nedge(mode) * g.hs):
        g.h[x] = 0.0
    for x in range(_nedge(mode) * g.vs):
        g.v[x] = 0.0
    if par:
        if floating is double:
            pool.wavefront(g.nTI, g.nTJ, 1, _bwd_task_d, &ctx, done, team)
        else:
            pool.wavefront(g.nTI, g.nTJ, 1, _bwd_task_f, &ctx, done, team)
    else:
        for k in range(nk - 1, -1, -1):
            for I in range(max(0, k - g.nTJ + 1), min(k, g.nTI - 1) + 1):
                _tile_bwd(&g, E, Ed, wq, I, k - I, wds[0], wis[0])
    return value


cdef enum:
    SEQ_TILE = 256
    PAR_TILE_MIN = 64


# Below this many cells a call runs on one thread (a parallel job costs a
# wake-up, ~10-50 µs, and a core may be busy elsewhere: docs/threads.md).
# Threads share one problem's tiles (a wavefront) only from 8·SMALL_WORK
# cells (512², in _plan): below, the tiles' hand-offs cost what the second
# thread gains (one 256² float32 gradient: 0.48 ms on two threads, 0.43 on
# one; 384² HVP: 2.60 against 2.47).
cdef Py_ssize_t SMALL_WORK = 1 << 15
_tile_override = [0]


def _set_small_work(Py_ssize_t cells):
    """Set the one-thread threshold (testing: 0 sends small problems to the threaded paths)."""
    global SMALL_WORK
    SMALL_WORK = cells


def _set_tile(Py_ssize_t ts):
    """Force the tile size (testing and tuning); 0 restores the automatic choice."""
    _tile_override[0] = ts


cdef Py_ssize_t _pick_tile(Py_ssize_t NA, Py_ssize_t NB, bint par, int nthreads,
                           Py_ssize_t override) noexcept nogil:
    """Tile side: a whole problem up to 2·SEQ_TILE, else SEQ_TILE, when each
    thread has its own problem; about 4 tiles per thread along the longer
    side (PAR_TILE_MIN to SEQ_TILE cells) when threads share one (8 made
    tiles of 64 at 1024² on two threads: 7.6 ms for a gradient against 6.4
    with 128, float32 5.9 against 4.6)."""
    cdef Py_ssize_t n = max(NA, NB), ts
    if override > 0:
        return override
    if not par:
        return n if n <= 2 * SEQ_TILE else SEQ_TILE
    ts = _ceil_div(n, 4 * nthreads)
    ts = ((ts + 7) // 8) * 8
    return max(PAR_TILE_MIN, min(SEQ_TILE, ts))


cdef inline Py_ssize_t _q_len(Py_ssize_t NA, Py_ssize_t NB, Py_ssize_t TS, int mode) noexcept nogil:
    """Stored weights (and tangents) of one problem, in values of the caller's dtype."""
    if mode == MODE_VALUE:
        return 0
    return _ceil_div(NA, TS) * _ceil_div(NB, TS) * (6 if mode == MODE_HVP else 2) * _q_plane(TS)


ctypedef struct _Plan:
    int team       # threads of the call
    bint par       # True: the problems in turn, the tiles of each on the team
    Py_ssize_t TS  # tile side
    Py_ssize_t nq  # stored weights of one problem


cdef _Plan _plan(Py_ssize_t B, Py_ssize_t NA, Py_ssize_t NB, int mode,
                 Py_ssize_t override) noexcept nogil:
    """Threads and tiles of a call. The team is never larger than the work
    can use: one thread below SMALL_WORK cells, at most B threads on a batch;
    a batch smaller than the thread count shares each problem's tiles instead
    (a wavefront, when the problem has 8·SMALL_WORK cells and more than one
    tile)."""
    cdef _Plan p
    cdef int n = pool.num_threads()
    p.par = B < n and <double> NA * NB >= 8.0 * SMALL_WORK
    if p.par:
        p.TS = _pick_tile(NA, NB, True, n, override)
        p.team = pool.team(_ceil_div(NA, p.TS) * _ceil_div(NB, p.TS), <double> B * NA * NB,
                           SMALL_WORK)
        p.par = p.team > 1  # one thread after all: the sequential tiles
    if not p.par:
        p.TS = _pick_tile(NA, NB, False, n, override)
        p.team = pool.team(B, <double> B * NA * NB, SMALL_WORK)
    p.nq = _q_len(NA, NB, p.TS, mode)
    return p


cdef inline Py_ssize_t _qwork_len(_Plan p) noexcept nogil:
    """Length of the q workspace ``_dtw_batch`` takes under plan ``p``: one
    problem's worth per thread when threads share the batch, one when they
    share a problem. (The plan is made once per call and passed along: the
    team can change between two plans, with the thread setting or the pool's
    co-tenant guard.)"""
    return p.nq * (1 if p.par else p.team)


ctypedef struct _BatchCtx:
    # what one item of the batch job needs (arrays as void*: one struct for both dtypes)
    const void* theta
    const void* Z
    void* E
    void* Ed
    void* value
    const long long* la
    const long long* lb
    Py_ssize_t NA, NB, band, TS, nq, lwd, lwi, ledge, llohi
    int reg, mode
    double gamma
    bint f64
    void* qbase
    signed char* bad  # per item: failed the value checks; NULL: not checked here
    double* wd      # per slot: lwd doubles, lwi ints, ledge + ... (slot-strided)
    Py_ssize_t* wi
    double* edges
    Py_ssize_t* lohi


cdef bint _bad_item(_BatchCtx* c, Py_ssize_t b, floating* tag) noexcept nogil:
    """Item ``b``'s theta holds NaN or -inf, or its Z (HVP) NaN or an
    infinity: the value checks of ``smoothmax._values.check_values`` for a
    NumPy input, one vectorised pass each (``simd.h``, ``BadValues``). Run by
    the thread about to compute the item, it finds the data in cache for the
    passes; the host's NumPy reduction (``min`` of theta, ``sum`` of Z) was a
    serial pass of its own before the parallel job (40 µs each in a loop of
    2 x 200^2 float32 HVPs on the benchmark VM, 7% of a call on two threads).
    Entries past the lengths and outside the band are checked too, as the
    host checks do."""
    cdef Py_ssize_t cells = c.NA * c.NB
    return (bad_values(cells, <const floating*> c.theta + b * cells, 0) != 0
            or (c.mode == MODE_HVP
                and bad_values(cells, <const floating*> c.Z + b * cells, 1) != 0))


cdef void _batch_one(_BatchCtx* c, Py_ssize_t b, int slot, floating* tag) noexcept nogil:
    cdef Py_ssize_t cells = c.NA * c.NB
    cdef double* wd = c.wd + slot * c.lwd
    cdef Py_ssize_t* wi = c.wi + slot * c.lwi
    if c.bad != NULL and _bad_item(c, b, tag):
        c.bad[b] = 1
        (<floating*> c.value)[b] = 0  # the call raises (_raise_found)
        return
    (<floating*> c.value)[b] = <floating> _dtw_tiled(
        <const floating*> c.theta + b * cells,
        <const floating*> c.Z + b * cells if c.mode == MODE_HVP else NULL,
        <floating*> c.E + b * cells if c.mode != MODE_VALUE else NULL,
        <floating*> c.Ed + b * cells if c.mode == MODE_HVP else NULL,
        c.NB, c.la[b], c.lb[b], c.band, c.reg, c.gamma, c.mode, c.TS, 1,
        c.lohi + slot * c.llohi, c.edges + slot * c.ledge,
        <floating*> c.qbase + slot * c.nq if c.nq > 0 else NULL, &wd, &wi, NULL)


cdef void _batch_item(void* ctx, Py_ssize_t b, int slot) noexcept nogil:
    cdef _BatchCtx* c = <_BatchCtx*> ctx
    if c.f64:
        _batch_one(c, b, slot, <double*> NULL)
    else:
        _batch_one(c, b, slot, <float*> NULL)


cdef Py_ssize_t _dtw_batch(const floating[:, :, ::1] theta, const floating[:, :, ::1] Z,
                           const long long[::1] la, const long long[::1] lb,
                           Py_ssize_t band, int reg, double gamma, int mode,
                           floating[::1] value, floating[:, :, ::1] E,
                           floating[:, :, ::1] Ed, _Plan p, floating[::1] qwork,
                           bint check) noexcept:
    """Batch loop (``_plan``). Threads sharing the batch: ``pool.parallel_for``
    over the problems, each problem's tiles in order on its thread. Threads
    sharing a problem: the problems one after the other, each one's tiles a
    wavefront over the team. ``check``: each item's theta (and Z) first pass
    the value checks (``_bad_item``). Returns the number of items whose end
    cell is unreachable (value +inf), -1 when the workspace could not be
    allocated (nothing ran) or -2 when an item failed the value checks. The
    per-call bookkeeping is C here, not NumPy: a call outside its parallel job
    cost 130-150 µs at 2 x 200^2 (HVP), a tenth of the call on two threads,
    and a 2 x 8^2 call 55 µs."""
    cdef Py_ssize_t B = theta.shape[0], NA = theta.shape[1], NB = theta.shape[2]
    cdef Py_ssize_t b, t
    cdef int nthreads = p.team
    cdef floating* qbase = &qwork[0] if qwork.shape[0] > 0 else NULL
    cdef double* wd = NULL
    cdef _BatchCtx c
    cdef double** wds = NULL
    cdef Py_ssize_t** wis = NULL
    cdef int* done = NULL
    cdef bint ok
    cdef Py_ssize_t unreachable = 0
    # one workspace per slot: the team's threads when they share the batch,
    # the tile workspaces of the wavefront when they share a problem
    c.lwd = pool.slot_len(_tile_work(p.TS))  # whole cache lines a slot
    c.lwi = _tile_iwork(p.TS)
    c.ledge = pool.slot_len(_edge_work(NA, NB, p.TS, mode))
    c.llohi = 2 * (NA + NB + 3)
    c.theta = &theta[0, 0, 0]
    c.Z = &Z[0, 0, 0] if mode == MODE_HVP else NULL
    c.NA = NA
    c.NB = NB
    c.mode = mode
    cdef int nslots = 1 if p.par else nthreads
    with nogil:
        c.wd = <double*> pool.alloc_lines(nthreads * c.lwd * sizeof(double))
        c.wi = <Py_ssize_t*> malloc(nthreads * c.lwi * sizeof(Py_ssize_t))
        c.edges = <double*> pool.alloc_lines(nslots * c.ledge * sizeof(double))
        c.lohi = <Py_ssize_t*> malloc(nslots * c.llohi * sizeof(Py_ssize_t))
        c.bad = <signed char*> calloc(B, sizeof(signed char)) if check else NULL
        wds = <double**> malloc(nthreads * sizeof(double*))
        wis = <Py_ssize_t**> malloc(nthreads * sizeof(Py_ssize_t*))
        done = <int*> malloc(_ceil_div(NA, p.TS) * _ceil_div(NB, p.TS) * sizeof(int))
        ok = (c.wd != NULL and c.wi != NULL and c.edges != NULL and c.lohi != NULL
              and wds != NULL and wis != NULL and done != NULL and (qbase != NULL or p.nq == 0)
              and (c.bad != NULL or not check))
        if not ok:
            unreachable = -1
        elif p.par:
            for t in range(nthreads):
                wds[t] = c.wd + t * c.lwd
                wis[t] = c.wi + t * c.lwi
            for b in range(B):
                if check and _bad_item(&c, b, <floating*> NULL):
                    c.bad[b] = 1
                    break
                value[b] = <floating> _dtw_tiled(
                    &theta[b, 0, 0], &Z[b, 0, 0] if mode == MODE_HVP else NULL,
                    &E[b, 0, 0] if mode != MODE_VALUE else NULL,
                    &Ed[b, 0, 0] if mode == MODE_HVP else NULL,
                    NB, la[b], lb[b], band, reg, gamma, mode, p.TS, nthreads,
                    c.lohi, c.edges, qbase if p.nq > 0 else NULL, wds, wis, done)
        else:
            c.E = &E[0, 0, 0] if mode != MODE_VALUE else NULL
            c.Ed = &Ed[0, 0, 0] if mode == MODE_HVP else NULL
            c.value = &value[0]
            c.la = &la[0]
            c.lb = &lb[0]
            c.band = band
            c.TS = p.TS
            c.nq = p.nq
            c.reg = reg
            c.gamma = gamma
            c.f64 = floating is double
            c.qbase = qbase
            pool.parallel_for(B, nthreads, _batch_item, &c)
        pool.free_lines(c.wd)
        free(c.wi)
        pool.free_lines(c.edges)
        free(c.lohi)
        free(wds)
        free(wis)
        free(done)
        if ok and check:
            for b in range(B):
                if c.bad[b]:
                    unreachable = -2
        free(c.bad)
        if unreachable == 0:
            for b in range(B):
                unreachable += not (value[b] < INFINITY)
    return unreachable


cdef bint _full_lengths(const long long[::1] l, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t b
    for b in range(l.shape[0]):
        if l[b] != n:
            return False
    return True


# The stored weights need 3 (gradient) or 6 (HVP) values per cell; for a
# large problem the time to fault in fresh pages is comparable to the passes
# themselves, so the workspace comes from smoothmax._buffers, which keeps it
# (within the cache limit, with the result blocks) for the next call.


def _run(theta, Z, la, lb, Py_ssize_t band, int reg, double gamma, int mode, out=None,
         bint check=False):
    """The passes of ``mode`` over the batch; ``out``: see ``smoothmax._buffers.pass_outputs``.

    ``check``: theta (and Z) are checked for NaN and forbidden infinities here,
    past the lengths too (``_bad_item``), with the errors of
    ``smoothmax._values.check_values``; without it (the engine contract)
    entries past the lengths are never read and may be anything.
    """
    B, NA, NB = theta.shape
    cdef const long long[::1] la_v = la
    cdef const long long[::1] lb_v = lb
    cdef Py_ssize_t unreachable = 0
    # Without a band and at full lengths the kernels write every cell of E
    # (Edot) of an item whose end cell is reachable, so the outputs need no
    # zeroing pass (a memset of the whole output was 5% of a 1024^2 gradient)
    # and large ones may come from reused blocks (smoothmax._buffers);
    # unreachable items are zeroed below.
    written = band < 0 and _full_lengths(la_v, NA) and _full_lengths(lb_v, NB)
    value, E, Ed = _pass_outputs(out, B, theta.shape, theta.dtype, mode, written, (0, 1, 1))
    Zarr = Z if mode == MODE_HVP else E[:0]
    cdef _Plan p
    if B > 0 and NA > 0 and NB > 0:
        p = _plan(B, NA, NB, mode, _tile_override[0])
        qwork = _workspace(_qwork_len(p), theta.dtype)
        if theta.dtype == np.float64:
            unreachable = _dtw_batch[double](theta, Zarr, la_v, lb_v, band, reg, gamma, mode,
                                             value, E, Ed, p, qwork, check)
        else:
            unreachable = _dtw_batch[float](theta, Zarr, la_v, lb_v, band, reg, gamma, mode,
                                            value, E, Ed, p, qwork, check)
        del qwork  # free for the next call (smoothmax._buffers)
    if unreachable == -1:
        raise MemoryError("smoothmax._core.dtw: could not allocate the workspace")
    if unreachable == -2:
        _raise_found(theta, "-inf", Z if mode == MODE_HVP else None)
    if written and mode != MODE_VALUE and unreachable > 0:
        unreached = ~(value < np.inf)
        E[unreached] = 0
        if mode == MODE_HVP:
            Ed[unreached] = 0
    return value, E, Ed


def dtw_value(theta, la, lb, Py_ssize_t band, int reg, double gamma, out=None,
              bint check=False):
    """DTW_Ω per batch item: ``theta (B, NA, NB)``, ``la, lb (B,)`` int64.

    ``out``, here and in ``dtw_grad``/``dtw_hvp``: optional ``(value, E, Edot)``
    to write into (``smoothmax._buffers.pass_outputs``); ``check``, here and in
    the others: check the values of theta (and Z) first (``_run``)."""
    return _run(theta, None, la, lb, band, reg, gamma, MODE_VALUE, out=out, check=check)[0]


def dtw_grad(theta, la, lb, Py_ssize_t band, int reg, double gamma, out=None,
             bint check=False):
    """``(value (B,), E (B, NA, NB))``, E = ∇DTW_Ω (the expected alignment)."""
    value, E, _ = _run(theta, None, la, lb, band, reg, gamma, MODE_GRAD, out=out, check=check)
    return value, E


def dtw_hvp(theta, Z, la, lb, Py_ssize_t band, int reg, double gamma, out=None,
            bint check=False):
    """``(value, E, Edot)`` with Edot = ∇²DTW_Ω(theta)·Z (docs/spec.md §2)."""
    return _run(theta, Z, la, lb, band, reg, gamma, MODE_HVP, out=out, check=check)


def dtw_path(theta, la, lb, Py_ssize_t band, bint check=False):
    """``(cost (B,), Y (B, NA, NB))``: hard DTW, Y the 0/1 optimal alignment.

    The hard operator's gradient is the one-hot first argmin (up, left,
    diagonal), so Y is the gradient of hard DTW and cost its value.
    """
    value, Y, _ = _run(theta, None, la, lb, band, 2, 1.0, MODE_GRAD, check=check)
    return value, Y
