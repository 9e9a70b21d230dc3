# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Compiled DP_Ω engine on a general DAG (docs/spec.md §2, docs/engines.md "DAG").

Design: the graph is in compressed form, shared by the whole batch: the edges
entering node ``i`` are ``indptr[i]:indptr[i+1]`` with parents
``parents[k] < i``. One kernel per batch item, ``_dag_one``, runs the forward
pass ``v_i = max_Ω_k (w[k] + v[parents[k]])`` (``v_0 = 0``) in node order and,
for the gradient, the reverse pass in reverse node order, pushing
``e[k] = ebar_i·q[k]`` into ``ebar[parents[k]]`` (every child of a node comes
after it, so ``ebar`` of a node is complete when the loop reaches it). As in
``viterbi.pyx``, the local gradients ``q`` are written straight into ``E``
during the forward pass and scaled in place by the reverse pass; ``qdot``
goes into ``Edot``. The workspace is ``4·N + 4·maxdeg`` doubles per thread.
Arithmetic is in double; only weights, Z, E, Edot use the caller's dtype.
The batch loop runs on the engine's thread pool (``pool.pxd``, docs/threads.md).
"""
from . cimport pool
from libc.math cimport INFINITY

import numpy as np

from .._buffers import pass_outputs as _pass_outputs

from cython cimport floating

from .operators cimport max_omega, max_omega_hvp


cdef enum:
    MODE_VALUE = 0
    MODE_GRAD = 1
    MODE_HVP = 2

# Below this many nodes and edges (B·(N + n_edges)) a call runs on one thread.
cdef double SMALL_WORK = 1 << 15


cdef double _dag_one(const floating* w, const floating* Z,
                     floating* E, floating* Ed,
                     const long long* indptr, const long long* parents,
                     Py_ssize_t N, Py_ssize_t maxdeg, int reg, double gamma,
                     int mode, double* work) noexcept nogil:
    """Value of one problem; fills E (and Edot) when mode asks for them."""
    cdef double* v = work
    cdef double* vd = work + N
    cdef double* eb = work + 2 * N
    cdef double* ebd = work + 3 * N
    cdef double* x = work + 4 * N
    cdef double* q = x + maxdeg
    cdef double* u = q + maxdeg
    cdef double* qd = u + maxdeg
    cdef Py_ssize_t i, k, a, b, deg, p
    cdef double acc, e, ed, value

    v[0] = 0.0
    vd[0] = 0.0
    # forward, in topological order
    for i in range(1, N):
        a = indptr[i]
        b = indptr[i + 1]
        deg = b - a
        for k in range(deg):
            x[k] = w[a + k] + v[parents[a + k]]
        v[i] = max_omega(x, q, deg, reg, gamma)  # -inf and q = 0 when deg == 0
        if mode == MODE_VALUE:
            continue
        for k in range(deg):
            E[a + k] = <floating> q[k]
        if mode == MODE_HVP:
            acc = 0.0
            for k in range(deg):
                u[k] = Z[a + k] + vd[parents[a + k]]
                if q[k] != 0.0:
                    acc += q[k] * u[k]
            vd[i] = acc
            max_omega_hvp(q, u, qd, deg, reg, gamma)
            for k in range(deg):
                Ed[a + k] = <floating> qd[k]
    value = v[N - 1]
    if mode == MODE_VALUE:
        return value
    # reverse: e[k] = ebar_i·q[k], pushed into ebar[parents[k]]
    for i in range(N):
        eb[i] = 0.0
        ebd[i] = 0.0
    eb[N - 1] = 1.0
    for i in range(N - 1, 0, -1):
        a = indptr[i]
        b = indptr[i + 1]
        for k in range(a, b):
            p = parents[k]
            e = eb[i] * E[k]
            if mode == MODE_HVP:
                ed = ebd[i] * E[k] + eb[i] * Ed[k]
                Ed[k] = <floating> ed
                ebd[p] += ed
            E[k] = <floating> e
            eb[p] += e
    return value


ctypedef struct _BatchCtx:
    const void* w
    const void* Z
    void* E
    void* Ed
    void* value
    const long long* indptr
    const long long* parents
    double* work     # per slot: lwork doubles
    Py_ssize_t n_edges, N, maxdeg, lwork
    int reg, mode
    double gamma
    bint f64


cdef void _batch_one(_BatchCtx* c, Py_ssize_t b, int slot, floating* tag) noexcept nogil:
    cdef Py_ssize_t m = c.n_edges
    cdef bint any_edge = m > 0
    (<floating*> c.value)[b] = <floating> _dag_one(
        <const floating*> c.w + b * m if any_edge else NULL,
        <const floating*> c.Z + b * m if (c.mode == MODE_HVP and any_edge) else NULL,
        <floating*> c.E + b * m if (c.mode != MODE_VALUE and any_edge) else NULL,
        <floating*> c.Ed + b * m if (c.mode == MODE_HVP and any_edge) else NULL,
        c.indptr, c.parents, c.N, c.maxdeg, c.reg, c.gamma, c.mode, c.work + slot * c.lwork)


cdef void _batch_item(void* ctx, Py_ssize_t b, int slot) noexcept nogil:
    cdef _BatchCtx* c = <_BatchCtx*> ctx
    if c.f64:
        _batch_one(c, b, slot, <double*> NULL)
    else:
        _batch_one(c, b, slot, <float*> NULL)


cdef bint _dag_batch(const floating[:, ::1] w, const floating[:, ::1] Z,
                     const long long[::1] indptr, const long long[::1] parents,
                     floating[::1] value, floating[:, ::1] E, floating[:, ::1] Ed,
                     Py_ssize_t maxdeg, int reg, double gamma, int mode) noexcept nogil:
    """The batch on the pool (docs/threads.md): one graph per item, one
    workspace per thread; one thread below SMALL_WORK nodes and edges.
    Returns False when the workspace could not be allocated (nothing ran)."""
    cdef Py_ssize_t B = w.shape[0], n_edges = w.shape[1]
    cdef Py_ssize_t N = indptr.shape[0] - 1
    cdef int team = pool.team(B, <double> B * (N + n_edges), SMALL_WORK)
    cdef _BatchCtx c
    c.w = &w[0, 0] if n_edges > 0 else NULL
    c.Z = &Z[0, 0] if (mode == MODE_HVP and n_edges > 0) else NULL
    c.E = &E[0, 0] if (mode != MODE_VALUE and n_edges > 0) else NULL
    c.Ed = &Ed[0, 0] if (mode == MODE_HVP and n_edges > 0) else NULL
    c.value = &value[0]
    c.indptr = &indptr[0]
    c.parents = &parents[0]
    c.n_edges = n_edges
    c.N = N
    c.maxdeg = maxdeg
    c.lwork = 4 * N + 4 * maxdeg + 1
    c.reg = reg
    c.mode = mode
    c.gamma = gamma
    c.f64 = floating is double
    return pool.parallel_for_work(B, team, _batch_item, &c, &c.work, &c.lwork) >= 0


def _run(weights, Z, indptr, parents, int reg, double gamma, int mode, out=None):
    """The passes of ``mode`` over the batch; ``out``: see ``smoothmax._buffers.pass_outputs``."""
    B, n_edges = weights.shape
    N = indptr.shape[0] - 1
    value, E, Ed = _pass_outputs(out, B, weights.shape, weights.dtype, mode, False, (0, 1))
    Zarr = Z if mode == MODE_HVP else E[:0]
    cdef bint ok = True
    indptr = np.ascontiguousarray(indptr, dtype=np.int64)
    parents = np.ascontiguousarray(parents, dtype=np.int64)
    if parents.shape[0] == 0:
        parents = np.zeros(1, dtype=np.int64)  # a valid pointer; never read
    maxdeg = int(np.max(np.diff(indptr))) if N > 0 else 0
    if B > 0 and N > 0:
        if weights.dtype == np.float64:
            ok = _dag_batch[double](weights, Zarr, indptr, parents, value, E, Ed, maxdeg, reg,
                                    gamma, mode)
        else:
            ok = _dag_batch[float](weights, Zarr, indptr, parents, value, E, Ed, maxdeg, reg,
                                   gamma, mode)
    if not ok:
        raise MemoryError("smoothmax._core.dag: could not allocate the workspace")
    return value, E, Ed


def dag_value(weights, indptr, parents, int reg, double gamma, out=None):
    """DP_Ω per batch item: ``weights (B, n_edges)``, ``indptr (N+1,)``, ``parents (n_edges,)`` int64."""
    return _run(weights, None, indptr, parents, reg, gamma, MODE_VALUE, out=out)[0]


def dag_grad(weights, indptr, parents, int reg, double gamma, out=None):
    """``(value (B,), E (B, n_edges))``, E = ∇DP_Ω the expected edge occupancy."""
    value, E, _ = _run(weights, None, indptr, parents, reg, gamma, MODE_GRAD, out=out)
    return value, E


def dag_hvp(weights, Z, indptr, parents, int reg, double gamma, out=None):
    """``(value, E, Edot)`` with Edot = ∇²DP_Ω(weights)·Z (docs/spec.md §2)."""
    return _run(weights, Z, indptr, parents, reg, gamma, MODE_HVP, out=out)


def dag_path(weights, indptr, parents):
    """``(score (B,), Y (B, n_edges))``: the best path (ties: first edge), 0/1 in weights' dtype."""
    value, E, _ = _run(weights, None, indptr, parents, 2, 1.0, MODE_GRAD)
    return value, E
