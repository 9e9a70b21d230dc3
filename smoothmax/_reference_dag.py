"""Reference engine for the general DAG operator DP_Ω (docs/spec.md §2), array-API code.

The graph is given in compressed form (``docs/engines.md``, "DAG"): nodes
``0..N-1`` in topological order, node 0 the start and node ``N-1`` the end;
the edges entering node ``i`` are ``indptr[i]:indptr[i+1]`` and
``parents[k] < i`` is the parent of edge ``k``. Parallel edges are allowed.

The passes loop over nodes in Python (one vectorised step per node, over the
batch), so they cost ``O(N)`` Python iterations: an executable specification
and a second oracle, not a fast path. Node values are kept in Python lists of
``(B,)`` arrays, so no in-place update is needed (JAX arrays are immutable).
The reverse pass pushes ``e[k] = ebar[i]·q[k]`` into the parent of ``k``;
every child of a node comes after it, so a node's ``ebar`` is complete when
the reverse loop reaches it.
"""
import numpy as np

from ._array_api import to_host
from .operators import REGS, hessian_product, max_value_grad

__all__ = ["dag_value", "dag_grad", "dag_hvp", "dag_path"]


def _namespace(x):
    from ._array_api import array_namespace

    return array_namespace(x)


def _device(x):
    import array_api_compat as aac

    return aac.device(x)


def _forward(xp, weights, indptr, parents, reg, gamma, Z=None, need_q=True):
    """Node values ``v`` (list of (B,)), per-node ``q`` (list of (B, deg)) and tangents."""
    B = weights.shape[0]
    dt = weights.dtype
    dev = _device(weights)
    indptr = np.asarray(to_host(indptr), dtype=np.int64)
    parents = np.asarray(to_host(parents), dtype=np.int64)
    N = indptr.shape[0] - 1
    zero = xp.zeros((B,), dtype=dt, device=dev)
    ninf = xp.full((B,), -float("inf"), dtype=dt, device=dev)
    V = [zero] + [None] * (N - 1)
    Vd = [zero] + [None] * (N - 1)
    Q = [None] * N
    Qd = [None] * N
    for i in range(1, N):
        a, b = int(indptr[i]), int(indptr[i + 1])
        if a == b:  # no parent: unreachable
            V[i] = ninf
            Vd[i] = zero
            continue
        par = parents[a:b]
        x = weights[:, a:b] + xp.stack([V[p] for p in par], axis=1)
        val, q = max_value_grad(xp, x, reg, gamma)
        V[i] = val
        Q[i] = q
        if Z is not None:
            u = Z[:, a:b] + xp.stack([Vd[p] for p in par], axis=1)
            u = xp.where(q > 0, u, xp.zeros_like(u))
            Vd[i] = xp.sum(q * u, axis=1)
            Qd[i] = hessian_product(xp, q, u, reg, gamma)
    return V, Q, Qd, indptr, parents


def _backward(xp, weights, Q, Qd, indptr, parents, hvp):
    B, n_edges = weights.shape
    dt = weights.dtype
    dev = _device(weights)
    N = indptr.shape[0] - 1
    zero = xp.zeros((B,), dtype=dt, device=dev)
    ebar = [zero] * N
    ebard = [zero] * N
    ebar[N - 1] = xp.ones((B,), dtype=dt, device=dev)
    blocks = [None] * N
    dblocks = [None] * N
    for i in range(N - 1, 0, -1):
        a, b = int(indptr[i]), int(indptr[i + 1])
        if a == b:
            continue
        e = ebar[i][:, None] * Q[i]
        blocks[i] = e
        if hvp:
            ed = ebard[i][:, None] * Q[i] + ebar[i][:, None] * Qd[i]
            dblocks[i] = ed
        for k in range(a, b):
            p = int(parents[k])
            ebar[p] = ebar[p] + e[:, k - a]
            if hvp:
                ebard[p] = ebard[p] + ed[:, k - a]
    E = [blk for blk in blocks if blk is not None]
    E = xp.concat(E, axis=1) if E else xp.zeros((B, n_edges), dtype=dt, device=dev)
    Ed = None
    if hvp:
        Ed = [blk for blk in dblocks if blk is not None]
        Ed = xp.concat(Ed, axis=1) if Ed else xp.zeros((B, n_edges), dtype=dt, device=dev)
    return E, Ed


def dag_value(weights, indptr, parents, reg, gamma):
    """DP_Ω per batch item: ``weights (B, n_edges)``; ``-inf`` where the end is unreachable."""
    xp = _namespace(weights)
    V = _forward(xp, weights, indptr, parents, REGS[reg], gamma)[0]
    return V[-1]


def dag_grad(weights, indptr, parents, reg, gamma):
    """``(value (B,), E (B, n_edges))``, E the expected edge occupancy ∇DP_Ω."""
    xp = _namespace(weights)
    V, Q, Qd, ip, par = _forward(xp, weights, indptr, parents, REGS[reg], gamma)
    E, _ = _backward(xp, weights, Q, Qd, ip, par, False)
    return V[-1], E


def dag_hvp(weights, Z, indptr, parents, reg, gamma):
    """``(value, E, Edot)`` with ``Edot = ∇²DP_Ω(weights)·Z``."""
    xp = _namespace(weights)
    V, Q, Qd, ip, par = _forward(xp, weights, indptr, parents, REGS[reg], gamma, Z=Z)
    E, Ed = _backward(xp, weights, Q, Qd, ip, par, True)
    return V[-1], E, Ed


def dag_path(weights, indptr, parents):
    """``(score (B,), Y (B, n_edges))``: the best path (ties: first edge), 0/1 in weights' dtype."""
    return dag_grad(weights, indptr, parents, 2, 1.0)
