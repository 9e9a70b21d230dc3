"""Exact sampling from the path distribution p_{θ,Ω} (docs/spec.md §2, paper §2.3).

``Q`` (the local gradients ``q_i = ∇max_Ω(θ_i + v)``) is a Markov chain on
the graph: a random walk that starts at the end node and, at node ``i``, hops
to the parent of edge ``k`` with probability ``q[k]`` draws a path ``Y``
exactly from ``p_{θ,Ω}``, and ``E = ∇DP_Ω = E_p[Y]``.

The hop probabilities are recovered from the expected occupancy: the flow
through edge ``k`` entering node ``i`` is ``E[k] = ebar_i·q[k]`` and
``ebar_i = Σ_{k into i} E[k]``, so ``q[k] = E[k] / Σ_{k' into i} E[k']``
wherever the walk can be (``ebar_i > 0``). For Viterbi the dense ``E`` holds
these flows directly (``E[t, i, j]``); for DTW the dense ``E`` only holds
cell occupancies, so the grid is run as a DAG (:meth:`DAG.for_dtw`), whose
``E`` is per edge.

All sampling runs on the host, in float64, with a NumPy random generator:
arrays on a GPU are copied to the host once, and the samples are copied back
to the caller's namespace and device. Sampling is not differentiable and is
not traceable under ``jax.jit``.
"""
import numbers

import numpy as np

from ._array_api import to_host
from ._typing import Array, DTWLengths, Lengths, Reg, Seed
from ._validation import is_traced
from .dag import DAG, dag_grad
from .dag import _prepare as _dag_prepare
from .dtw import _prepare as _dtw_prepare
from .viterbi import _prepare as _viterbi_prepare
from .viterbi import viterbi_grad

__all__ = ["dag_sample", "viterbi_sample", "dtw_sample", "dag_support"]


def _check_n(n):
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
        raise ValueError(f"n must be a non-negative integer (the number of samples), got {n!r}")
    return int(n)


def _host64(x, name):
    if is_traced(x):
        raise TypeError(f"{name} must be a concrete array: sampling cannot run under jax.jit / tracing")
    return np.ascontiguousarray(to_host(x), dtype=np.float64)


def _back(y, problem, like):
    """``y`` (NumPy) as an array of the caller's namespace, on ``like``'s device."""
    xp = problem.xp
    if problem.backend == "numpy":
        return y
    import array_api_compat as aac

    try:
        return xp.asarray(y, device=aac.device(like))
    except TypeError:
        return xp.asarray(y)


def _segment_cumsum(E, indptr):
    """Within-segment cumulative sums of ``E (B, n_edges)`` along the edges entering each node,
    summed sequentially (no cancellation); ``totals[:, k]`` is the full segment sum."""
    B, n_edges = E.shape
    N = indptr.shape[0] - 1
    deg = np.diff(indptr)
    child = np.repeat(np.arange(N), deg)
    pos = np.arange(n_edges) - indptr[child]
    cq = np.array(E, dtype=np.float64, copy=True)
    maxdeg = int(deg.max()) if N else 0
    for off in range(1, maxdeg):
        k = np.nonzero(pos == off)[0]
        cq[:, k] += cq[:, k - 1]
    last = indptr[1:] - 1  # last edge of each node (invalid where deg == 0)
    totals = np.zeros((B, N))
    has = deg > 0
    totals[:, has] = cq[:, last[has]]
    return cq, totals


def _walk(E, indptr, parents, n, rng):
    """Random walks from the end node along ``q = E / segment sums``.

    Returns ``edges`` (steps, n, B) int64, the edge taken at each step or -1.
    Items whose end node is unreachable (zero flow into it) give no step; the value
    is not used for that, as it can be infinite by overflow while ``E`` is right.
    """
    B = E.shape[0]
    N = indptr.shape[0] - 1
    cq, totals = _segment_cumsum(E, indptr)
    W = n * B
    bidx = np.tile(np.arange(B), n)
    cur = np.full(W, N - 1, dtype=np.int64)
    alive = totals[bidx, N - 1] > 0
    cur[~alive] = 0
    steps = []
    deg = np.diff(indptr)
    while True:
        act = np.nonzero(cur > 0)[0]
        if act.size == 0:
            break
        node = cur[act]
        b = bidx[act]
        a = indptr[node]
        d = deg[node]
        thr = rng.random(act.size) * totals[b, node]
        chosen = np.full(act.size, -1, dtype=np.int64)
        for off in range(int(d.max()) if d.size else 0):
            cand = a + off
            ok = (chosen < 0) & (off < d)
            if not ok.any():
                break
            cand_safe = np.where(ok, cand, 0)
            hit = ok & (cq[b, cand_safe] > thr)
            chosen[hit] = cand[hit]
        # a node with zero total flow cannot be reached by an exact walk; guard anyway
        lost = chosen < 0
        if lost.any():
            chosen[lost] = np.where(d[lost] > 0, a[lost], -1)
        step = np.full(W, -1, dtype=np.int64)
        step[act] = chosen
        steps.append(step)
        nxt = np.where(chosen >= 0, parents[np.maximum(chosen, 0)], 0)
        cur[act] = nxt
    if not steps:
        return np.zeros((0, n, B), dtype=np.int64)
    return np.stack(steps).reshape(len(steps), n, B)


def _rng(seed):
    try:
        return np.random.default_rng(seed)
    except (TypeError, ValueError):
        raise ValueError(f"seed must be None, an int or a numpy.random.Generator, got {seed!r}") from None


def dag_sample(weights: Array, graph: DAG, n: int, *, reg: Reg = "negentropy", gamma: float = 1.0,
               seed: Seed = None) -> Array:
    """Draw ``n`` paths exactly from ``p_{θ,Ω}`` on a DAG (docs/spec.md §2).

    Parameters
    ----------
    weights : array, shape (..., n_edges)
    graph : DAG
    n : int >= 0
        Number of samples.
    reg, gamma : as for :func:`smoothmax.dag`.
    seed : None, int or numpy.random.Generator
        Seeds the host NumPy generator.

    Returns
    -------
    Y : array, shape (n, ..., n_edges)
        0/1 edge indicators in weights' dtype, namespace and device; all 0 for
        an item whose end node is unreachable. ``Y.mean(0)`` converges to
        ``dag_grad(weights, graph)[1]``.

    Notes
    -----
    Runs on the host in float64 with NumPy's generator (a device-to-host copy
    for GPU arrays). For ``reg="negentropy"`` the samples follow the Gibbs
    distribution ``∝ exp(<Y, weights>/γ)``; for ``"hard"`` they are the best
    path.

    Examples
    --------
    >>> import numpy as np
    >>> import smoothmax as sm
    >>> graph, _ = sm.DAG.from_edges([(0, 1), (0, 2), (1, 3), (2, 3)], n_nodes=4)  # a diamond
    >>> weights = np.array([1.0, 2.0, 0.0, 0.0])  # paths 0-1-3 (score 1) and 0-2-3 (score 2)
    >>> Y = sm.dag_sample(weights, graph, 20000, seed=0)
    >>> Y.shape
    (20000, 4)
    >>> bool(np.allclose(Y.mean(0), sm.dag_grad(weights, graph)[1], atol=0.02))
    True
    """
    weights, problem = _dag_prepare(weights, graph, reg, gamma)
    n = _check_n(n)
    rng = _rng(seed)
    wh = _host64(weights, "weights").reshape(problem.flat_shape)
    _, E = dag_grad(wh, graph, reg=problem.reg, gamma=problem.gamma)
    B = wh.shape[0]
    steps = _walk(E, graph.indptr, graph.parents, n, rng)
    Y = np.zeros((n, B, graph.n_edges), dtype=_np_dtype(weights, problem))
    s, ni, bi = np.nonzero(steps >= 0)
    Y[ni, bi, steps[s, ni, bi]] = 1
    Y = Y.reshape((n,) + problem.batch_shape + (graph.n_edges,))
    return _back(Y, problem, weights)


def _np_dtype(x, problem):
    from ._array_api import dtype_name

    return np.dtype(dtype_name(problem.xp, x.dtype))


def _categorical(P, rng):
    """One draw per row of the non-negative ``P (W, S)``; -1 for an all-zero row."""
    cs = np.cumsum(P, axis=1)
    total = cs[:, -1]
    thr = rng.random(P.shape[0]) * total
    idx = np.argmax(cs > thr[:, None], axis=1)
    return np.where(total > 0, idx, -1)


def viterbi_sample(theta: Array, n: int, *, reg: Reg = "negentropy", gamma: float = 1.0,
                   lengths: Lengths = None, seed: Seed = None) -> Array:
    """Draw ``n`` tag sequences exactly from ``p_{θ,Ω}`` of Vit_Ω (docs/spec.md §3).

    The walk starts from the end: ``y_{L-1} ~ Σ_j E[L-1, :, j]`` and, going
    back, ``y_{t-1} ~ E[t, y_t, :] / Σ_j E[t, y_t, j]`` (the conditional hop
    probabilities ``q_t(y_t, ·)``). The virtual state before ``t = 0`` is
    marginalised out.

    Parameters
    ----------
    theta : array, shape (..., T, S, S)
    n : int >= 0
    reg, gamma, lengths : as for :func:`smoothmax.viterbi`.
    seed : None, int or numpy.random.Generator

    Returns
    -------
    tags : int64 array, shape (n, ..., T)
        In theta's namespace and device; ``-1`` past a length, and everywhere
        for an item with no finite path. The empirical frequencies of
        ``(y_t, y_{t-1})`` converge to ``E[t]`` (``t >= 1``) and those of
        ``y_t`` to ``E[t].sum(-1)``.

    Notes
    -----
    Runs on the host in float64 with NumPy's generator (a device-to-host copy
    for GPU arrays).

    Examples
    --------
    >>> import numpy as np
    >>> import smoothmax as sm
    >>> theta = np.random.default_rng(0).normal(size=(5, 3, 3))
    >>> tags = sm.viterbi_sample(theta, 20000, seed=0)
    >>> tags.shape
    (20000, 5)
    >>> freq = np.stack([(tags == i).mean(0) for i in range(3)], axis=-1)  # (T, S)
    >>> bool(np.allclose(freq, sm.viterbi_grad(theta)[1].sum(-1), atol=0.02))  # the unary marginals
    True
    """
    theta, problem = _viterbi_prepare(theta, reg, gamma, lengths, host_checks=True)
    n = _check_n(n)
    rng = _rng(seed)
    L = problem.lengths
    th = _host64(theta, "theta").reshape(problem.flat_shape)
    B, T, S, _ = th.shape
    _, E = viterbi_grad(th, reg=problem.reg, gamma=problem.gamma, lengths=L)
    W = n * B
    bidx = np.tile(np.arange(B), n)
    Lw = L[bidx]
    tags = np.full((W, T), -1, dtype=np.int64)
    for t in range(T - 1, -1, -1):
        start = np.nonzero(Lw - 1 == t)[0]
        if start.size:
            P = E[bidx[start], t].sum(axis=-1)
            tags[start, t] = _categorical(P, rng)
        inner = np.nonzero((t < Lw - 1))[0]
        if inner.size:
            nxt = tags[inner, t + 1]
            okay = nxt >= 0
            sel = inner[okay]
            P = E[bidx[sel], t + 1, nxt[okay], :]
            tags[sel, t] = _categorical(P, rng)
    # an item without a finite path: -1 everywhere
    tags[np.any(tags[:, :1] < 0, axis=1)] = -1
    tags = tags.reshape((n,) + problem.batch_shape + (T,))
    return _back(tags, problem, theta)


def _dtw_groups(la, lb):
    keys: dict = {}
    for b, key in enumerate(zip(la.tolist(), lb.tolist())):
        keys.setdefault(key, []).append(b)
    return keys


def dtw_sample(theta: Array, n: int, *, reg: Reg = "negentropy", gamma: float = 1.0,
               lengths: DTWLengths = None, band: "int | None" = None, seed: Seed = None) -> Array:
    """Draw ``n`` alignments exactly from ``p_{θ,Ω}`` of DTW_Ω (docs/spec.md §4).

    The dense expected alignment holds cell occupancies only, not the flows
    along the three moves, so each distinct ``(len_a, len_b)`` is run as a DAG
    (:meth:`DAG.for_dtw`, weights the negated costs, the same operator: its
    ``E`` per edge gives the hop probabilities exactly) and walked back from
    the end cell.

    Parameters
    ----------
    theta : array, shape (..., NA, NB)
    n : int >= 0
    reg, gamma, lengths, band : as for :func:`smoothmax.dtw`.
    seed : None, int or numpy.random.Generator

    Returns
    -------
    Y : array, shape (n, ..., NA, NB)
        0/1 alignment matrices in theta's dtype, namespace and device; all 0
        for an item whose end cell is unreachable. ``Y.mean(0)`` converges to
        ``dtw_grad(theta)[1]``.

    Notes
    -----
    Runs on the host in float64 with NumPy's generator (a device-to-host copy
    for GPU arrays).

    Examples
    --------
    >>> import numpy as np
    >>> import smoothmax as sm
    >>> theta = np.random.default_rng(0).random((4, 5))
    >>> Y = sm.dtw_sample(theta, 20000, seed=0)
    >>> Y.shape
    (20000, 4, 5)
    >>> bool(np.allclose(Y.mean(0), sm.dtw_grad(theta)[1], atol=0.02))
    True
    """
    theta, problem = _dtw_prepare(theta, reg, gamma, lengths, band, host_checks=True)
    n = _check_n(n)
    rng = _rng(seed)
    la, lb, band_i = problem.len_a, problem.len_b, problem.band
    th = _host64(theta, "theta").reshape(problem.flat_shape)
    B, NA, NB = th.shape
    Y = np.zeros((n, B, NA, NB), dtype=_np_dtype(theta, problem))
    for (a, b), items in _dtw_groups(la, lb).items():
        graph, index = DAG.for_dtw(a, b, None if band_i < 0 else band_i)
        items = np.asarray(items)
        w = -th[items][:, :a, :b].reshape(len(items), a * b)[:, index]
        _, E = dag_grad(w, graph, reg=problem.reg, gamma=problem.gamma)
        steps = _walk(E, graph.indptr, graph.parents, n, rng)
        s, ni, bi = np.nonzero(steps >= 0)
        cell = index[steps[s, ni, bi]]
        Y[ni, items[bi], cell // b, cell % b] = 1
    Y = Y.reshape((n,) + problem.batch_shape + (NA, NB))
    return _back(Y, problem, theta)


def dag_support(weights: Array, graph: DAG, *, reg: Reg = "l2", gamma: float = 1.0,
                max_paths: int = 1000) -> "tuple[Array, Array]":
    """Every path of non-zero probability under ``p_{θ,Ω}``, with its probability (paper §4.2).

    With ``reg="l2"`` the distribution is typically sparse, so its support can
    be listed; with ``"negentropy"`` every finite path has a positive
    probability and the listing is only practical on tiny graphs.

    Parameters
    ----------
    weights : array, shape (n_edges,)
        One problem (loop over a batch yourself).
    graph : DAG
    reg, gamma : as for :func:`smoothmax.dag`.
    max_paths : int
        Raise ``ValueError`` if the support holds more paths than this.

    Returns
    -------
    paths : array, shape (K, n_edges)
        0/1 edge indicators in weights' dtype, namespace and device, by
        decreasing probability (K = 0 if the end node is unreachable).
    probs : array, shape (K,)
        Their probabilities (the product of ``q`` along the path); they sum
        to 1 and ``probs @ paths = E``.

    Examples
    --------
    >>> import numpy as np
    >>> import smoothmax as sm
    >>> graph, _ = sm.DAG.from_edges([(0, 1), (0, 2), (1, 3), (2, 3)], n_nodes=4)  # a diamond
    >>> weights = np.array([1.0, 2.0, 0.0, 0.0])  # paths 0-1-3 (score 1) and 0-2-3 (score 2)
    >>> sm.dag_support(weights, graph, gamma=1.0)  # sparsemax keeps the best path only
    (array([[0., 1., 0., 1.]]), array([1.]))
    >>> paths, probs = sm.dag_support(weights, graph, gamma=4.0)  # more smoothing: both paths
    >>> paths, probs
    (array([[0., 1., 0., 1.],
           [1., 0., 1., 0.]]), array([0.625, 0.375]))
    """
    weights, problem = _dag_prepare(weights, graph, reg, gamma)
    if weights.ndim != 1:
        raise ValueError(f"weights must have shape (n_edges,) (one problem), got {tuple(weights.shape)}")
    if isinstance(max_paths, bool) or not isinstance(max_paths, numbers.Integral) or max_paths < 1:
        raise ValueError(f"max_paths must be a positive integer, got {max_paths!r}")
    wh = _host64(weights, "weights")[None]
    _, E = dag_grad(wh, graph, reg=problem.reg, gamma=problem.gamma)
    E = E[0]
    indptr, parents = graph.indptr, graph.parents
    N = graph.n_nodes
    dt = _np_dtype(weights, problem)
    found = []
    if np.any(E > 0):  # the end is reachable (the value may be infinite by overflow)
        cq, totals = _segment_cumsum(E[None], indptr)
        totals = totals[0]
        # depth-first search from the end node along edges with q > 0
        stack = [(N - 1, 1.0, ())]
        while stack:
            node, prob, edges = stack.pop()
            if node == 0:
                found.append((prob, edges))
                if len(found) > max_paths:
                    raise ValueError(
                        f"more than max_paths = {max_paths} paths have a non-zero probability; "
                        f"raise max_paths, lower gamma or use reg='l2'"
                    )
                continue
            tot = totals[node]
            if tot <= 0:
                continue
            for k in range(indptr[node], indptr[node + 1]):
                if E[k] > 0:
                    stack.append((int(parents[k]), prob * (E[k] / tot), edges + (k,)))
    found.sort(key=lambda pe: -pe[0])
    paths = np.zeros((len(found), graph.n_edges), dtype=dt)
    probs = np.array([p for p, _ in found], dtype=dt)
    for r, (_, edges) in enumerate(found):
        paths[r, list(edges)] = 1
    return _back(paths, problem, weights), _back(probs, problem, weights)
