"""The general operator DP_Ω on a directed acyclic graph (docs/spec.md §2, paper §2).

Nodes ``0..N-1`` are numbered in topological order; node ``0`` is the start
and node ``N-1`` the end. The edges entering node ``i`` are the positions
``indptr[i]:indptr[i+1]`` of ``parents`` (compressed sparse rows of the
child-by-parent adjacency); ``parents[k] < i`` is the parent of edge ``k`` and
``weights[..., k]`` its weight (max convention: scores). Parallel edges are
allowed. ``v_0 = 0``, ``v_i = max_Ω_{k into i} (weights[k] + v_{parents[k]})``
and ``DP_Ω(weights) = v_{N-1}``; ``E = ∇DP_Ω`` is the expected edge
occupancy of the path distribution of docs/spec.md §2.
"""
import numpy as np

from ._array_api import dtype_name, to_host
from ._problem import checks_for, evaluate, make_problem
from ._typing import Array, Reg
from ._validation import (as_array, check_band, check_count, check_direction, check_float,
                          check_gamma, check_rank, check_reg, check_values)

__all__ = ["DAG", "dag", "dag_grad", "dag_hvp", "dag_path"]


def _int_vector(a, name):
    try:
        arr = np.asarray(to_host(a))
    except Exception:
        raise TypeError(f"{name} must be a 1-D integer array, got {type(a).__name__}") from None
    if arr.dtype.kind not in "iu":
        if arr.dtype.kind == "f" and arr.size and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
            pass
        elif arr.size == 0 and arr.dtype.kind == "f":
            pass
        else:
            raise TypeError(f"{name} must be a 1-D integer array, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D integer array, got shape {arr.shape}")
    return np.ascontiguousarray(arr, dtype=np.int64)


class DAG:
    """A directed acyclic graph in compressed (CSR-like) form.

    Parameters
    ----------
    indptr : int array, shape (N + 1,)
        ``indptr[0] = indptr[1] = 0`` (the start node 0 has no parent),
        non-decreasing, ``indptr[N] = n_edges``. The edges entering node
        ``i`` are ``indptr[i]:indptr[i+1]``. ``N >= 2``.
    parents : int array, shape (n_edges,)
        ``parents[k]`` is the parent of edge ``k``; for an edge entering node
        ``i``, ``0 <= parents[k] < i`` (topological order). Repeated parents
        (parallel edges) are allowed.

    A node other than 0 with no entering edge, or one from which the end node
    cannot be reached, is legal: it gets value ``-inf`` (resp. ``E = 0``).

    Attributes
    ----------
    indptr, parents : int64 NumPy arrays
        Read-only copies: each access returns a new copy, so that nothing a
        caller does to them reaches the arrays the kernels read.
    n_nodes, n_edges : int
    child : int64 array, shape (n_edges,), the node each edge enters (a read-only copy).

    A ``DAG`` is immutable: its attributes cannot be reassigned (an
    ``AttributeError``), and the arrays validated at construction are the
    ones every call uses.

    Examples
    --------
    >>> import smoothmax as sm
    >>> graph = sm.DAG(indptr=[0, 0, 1, 2, 4], parents=[0, 0, 1, 2])  # 0 -> 1, 0 -> 2, {1, 2} -> 3
    >>> graph
    DAG(n_nodes=4, n_edges=4)
    >>> graph.child
    array([1, 2, 3, 3])
    """

    __slots__ = ("_indptr", "_parents", "_child", "_n_nodes", "_n_edges")
    _indptr: np.ndarray
    _parents: np.ndarray
    _child: np.ndarray
    _n_nodes: int
    _n_edges: int

    def __init__(self, indptr: Array, parents: Array) -> None:
        indptr = _int_vector(indptr, "indptr")
        parents = _int_vector(parents, "parents")
        if indptr.shape[0] < 3:
            raise ValueError(f"indptr must have N + 1 >= 3 entries (N >= 2 nodes), got {indptr.shape[0]}")
        if indptr[0] != 0 or indptr[1] != 0:
            raise ValueError(
                f"indptr must start with [0, 0] (node 0 is the start and has no parent), got {indptr[:2].tolist()}"
            )
        steps = np.diff(indptr)
        if np.any(steps < 0):
            i = int(np.argmax(steps < 0))
            raise ValueError(f"indptr must be non-decreasing, got indptr[{i}] = {indptr[i]} "
                             f"> indptr[{i + 1}] = {indptr[i + 1]}")
        if indptr[-1] != parents.shape[0]:
            raise ValueError(f"indptr[-1] must equal len(parents) = {parents.shape[0]}, got {indptr[-1]}")
        N = indptr.shape[0] - 1
        child = np.repeat(np.arange(N, dtype=np.int64), steps)
        bad = (parents < 0) | (parents >= child)
        if np.any(bad):
            k = int(np.argmax(bad))
            raise ValueError(
                f"parents must satisfy 0 <= parents[k] < child node (topological order); "
                f"got parents[{k}] = {parents[k]} for an edge entering node {child[k]}"
            )
        for arr in (indptr, parents, child):
            arr.setflags(write=False)
        for attr, value in (("_indptr", indptr), ("_parents", parents), ("_child", child),
                            ("_n_nodes", N), ("_n_edges", int(parents.shape[0]))):
            object.__setattr__(self, attr, value)

    def __setattr__(self, name, value):
        raise AttributeError(f"DAG is immutable: cannot set {name!r} (build a new DAG instead)")

    def __delattr__(self, name):
        raise AttributeError(f"DAG is immutable: cannot delete {name!r}")

    def __reduce__(self):
        # pickle and copy rebuild (and so re-validate) the graph from its arrays
        return (DAG, (self._indptr, self._parents))

    @staticmethod
    def _copy(arr):
        out = arr.copy()
        out.setflags(write=False)
        return out

    @property
    def indptr(self) -> np.ndarray:
        return self._copy(self._indptr)

    @property
    def parents(self) -> np.ndarray:
        return self._copy(self._parents)

    @property
    def child(self) -> np.ndarray:
        return self._copy(self._child)

    @property
    def n_nodes(self) -> int:
        return self._n_nodes

    @property
    def n_edges(self) -> int:
        return self._n_edges

    @classmethod
    def from_edges(cls, edges: Array, n_nodes: int) -> "tuple[DAG, np.ndarray]":
        """Build a DAG from ``(parent, child)`` pairs; edge ``k`` of the result is
        the ``k``-th pair after a stable sort by child.

        Returns
        -------
        graph : DAG
        order : int64 array, the position in ``edges`` of each edge of ``graph``.

        Examples
        --------
        >>> import smoothmax as sm
        >>> graph, order = sm.DAG.from_edges([(1, 2), (0, 1), (0, 2)], n_nodes=3)
        >>> graph.parents, order  # the edges entering node 1, then those entering node 2
        (array([0, 1, 0]), array([1, 0, 2]))
        """
        n_nodes = check_count(n_nodes, "n_nodes", 2)
        try:
            e = np.asarray(edges)
        except Exception:
            raise TypeError(f"edges must be a sequence of (parent, child) integer pairs, "
                            f"got {type(edges).__name__}") from None
        if e.size == 0:
            e = np.zeros((0, 2), dtype=np.int64)
        if e.dtype.kind not in "iu":
            raise TypeError(f"edges must be (parent, child) integer pairs, got dtype {e.dtype}")
        if e.ndim != 2 or e.shape[1] != 2:
            raise ValueError(f"edges must have shape (n_edges, 2) (parent, child pairs), got shape {e.shape}")
        bad = (e < 0) | (e >= n_nodes)
        if np.any(bad):
            k = int(np.argmax(bad.any(axis=1)))
            raise ValueError(f"edges must hold node numbers in [0, {n_nodes}) (n_nodes = {n_nodes}), "
                             f"got edges[{k}] = {tuple(int(v) for v in e[k])}")
        back = e[:, 0] >= e[:, 1]
        if np.any(back):
            k = int(np.argmax(back))
            raise ValueError(f"edges must go from a lower to a higher node number (topological order), "
                             f"got edges[{k}] = {tuple(int(v) for v in e[k])}")
        e = e.astype(np.int64)
        order = np.argsort(e[:, 1], kind="stable")
        counts = np.bincount(e[:, 1], minlength=n_nodes)
        indptr = np.concatenate([[0], np.cumsum(counts)])
        return cls(indptr, e[order, 0]), order

    @classmethod
    def for_viterbi(cls, T: int, S: int) -> "tuple[DAG, np.ndarray]":
        """The Viterbi trellis of docs/spec.md §3 as a DAG.

        Node 0 is the start, node ``1 + t·S + i`` is state ``i`` at step ``t``
        and node ``1 + T·S`` the end. State ``(0, i)`` has ``S`` parallel
        edges from the start (``V_{-1}(j) = 0`` for every ``j``); ``(t, i)``
        has one edge from each ``(t-1, j)``; the end has one edge of weight 0
        from each ``(T-1, i)``, so ``DP_Ω = Vit_Ω``.

        Returns
        -------
        graph : DAG
        index : int64 array, shape (n_edges,)
            Edge ``k`` carries ``theta.reshape(-1)[index[k]]`` (flat index
            ``t·S·S + i·S + j``), or the weight 0 where ``index[k] = -1``.

        Examples
        --------
        >>> import numpy as np
        >>> import smoothmax as sm
        >>> theta = np.random.default_rng(0).normal(size=(3, 2, 2))
        >>> graph, index = sm.DAG.for_viterbi(3, 2)
        >>> weights = np.where(index >= 0, theta.reshape(-1)[index], 0.0)
        >>> bool(np.isclose(sm.dag(weights, graph), sm.viterbi(theta)))
        True
        """
        T, S = check_count(T, "T", 1), check_count(S, "S", 1)
        t, i, j = np.meshgrid(np.arange(T), np.arange(S), np.arange(S), indexing="ij")
        parent = np.where(t == 0, 0, 1 + (t - 1) * S + j).reshape(-1)
        index = np.arange(T * S * S, dtype=np.int64)
        parents = np.concatenate([parent, 1 + (T - 1) * S + np.arange(S)])
        index = np.concatenate([index, np.full(S, -1, dtype=np.int64)])
        indptr = np.concatenate([[0, 0], S * np.arange(1, T * S + 2)])
        return cls(indptr, parents), index

    @classmethod
    def for_dtw(cls, NA: int, NB: int, band: "int | None" = None) -> "tuple[DAG, np.ndarray]":
        """The DTW grid of docs/spec.md §4 as a DAG (weights are negated costs).

        Node 0 is the start, node ``1 + i·NB + j`` is cell ``(i, j)``; the end
        is cell ``(NA-1, NB-1)``. Cell ``(i, j)`` has edges from its
        predecessors up ``(i-1, j)``, left ``(i, j-1)`` and diagonal
        ``(i-1, j-1)``, in that order, those inside the grid and the band only
        (cell ``(0, 0)`` has one edge from the start); cells outside the
        Sakoe-Chiba band (``tslearn.metrics.sakoe_chiba_mask`` semantics, the
        end cell always allowed) have no edges. With weights
        ``-theta[cell]``, ``DP_Ω = -DTW_Ω(theta)`` and ``E`` summed per cell
        is the expected alignment.

        Returns
        -------
        graph : DAG
        index : int64 array, shape (n_edges,)
            Edge ``k`` enters cell ``index[k]`` (flat index ``i·NB + j``).

        Examples
        --------
        >>> import numpy as np
        >>> import smoothmax as sm
        >>> theta = np.random.default_rng(0).random((3, 4))
        >>> graph, index = sm.DAG.for_dtw(3, 4)
        >>> bool(np.isclose(-sm.dag(-theta.reshape(-1)[index], graph), sm.dtw(theta)))
        True
        """
        NA, NB = check_count(NA, "NA", 1), check_count(NB, "NB", 1)
        r = check_band(band, (NA, NB))
        ii, jj = np.meshgrid(np.arange(NA), np.arange(NB), indexing="ij")
        allowed = np.ones((NA, NB), dtype=bool)
        if r >= 0:
            if NA <= NB:
                allowed = (jj >= ii - r) & (jj <= ii + (NB - NA) + r)
            else:
                allowed = (ii >= jj - r) & (ii <= jj + (NA - NB) + r)
            allowed[NA - 1, NB - 1] = True
        counts = np.zeros(NA * NB + 1, dtype=np.int64)
        parents, index = [], []
        for i in range(NA):
            for j in range(NB):
                c = i * NB + j
                if not allowed[i, j]:
                    continue
                if i == 0 and j == 0:
                    preds = [0]
                else:
                    preds = [1 + pi * NB + pj for pi, pj in ((i - 1, j), (i, j - 1), (i - 1, j - 1))
                             if pi >= 0 and pj >= 0 and allowed[pi, pj]]
                parents.extend(preds)
                index.extend([c] * len(preds))
                counts[1 + c] = len(preds)
        indptr = np.concatenate([[0], np.cumsum(counts)])
        return cls(indptr, np.asarray(parents, dtype=np.int64)), np.asarray(index, dtype=np.int64)

    def __repr__(self) -> str:
        return f"DAG(n_nodes={self.n_nodes}, n_edges={self.n_edges})"


_SHARED_DOC = """
    Parameters
    ----------
    weights : array, shape (..., n_edges)
        Edge weights (scores, max convention) in the order of ``graph``;
        float32 or float64, any array-API library. ``-inf`` removes an edge;
        NaN and ``+inf`` are rejected.
    graph : DAG
    reg : {"negentropy", "l2", "hard"}
    gamma : float > 0
        Smoothing strength (ignored by ``"hard"``).
"""


def _prepare(weights, graph, reg, gamma):
    weights, xp, backend = as_array(weights, "weights")
    check_float(weights, xp, "weights")
    check_rank(weights, 1, "weights", "(..., n_edges)")
    if not isinstance(graph, DAG):
        raise TypeError(f"graph must be a smoothmax.DAG, got {type(graph).__name__}")
    if int(weights.shape[-1]) != graph.n_edges:
        raise ValueError(
            f"weights must have graph.n_edges = {graph.n_edges} entries on its last axis, "
            f"got shape {tuple(weights.shape)}"
        )
    reg = check_reg(reg)
    gamma = check_gamma(gamma, dtype_name(xp, weights.dtype), reg)
    checks_for(backend)[0](weights, xp, "weights", "+inf")
    problem = make_problem("dag", weights, xp, backend, weights.ndim - 1, reg, gamma,
                           indptr=graph._indptr, parents=graph._parents)
    return weights, problem


def dag(weights: Array, graph: DAG, *, reg: Reg = "negentropy", gamma: float = 1.0) -> Array:
    """DP_Ω(weights), the smoothed highest path score from node 0 to node N-1.
    {shared}
    Returns
    -------
    value : array, shape (...)
        ``-inf`` where no path reaches the end node. With ``"negentropy"``
        this is ``γ·log Σ_Y exp(<Y, weights>/γ)`` over all paths ``Y``.

    Examples
    --------
    >>> import numpy as np
    >>> import smoothmax as sm
    >>> graph, _ = sm.DAG.from_edges([(0, 1), (0, 2), (1, 3), (2, 3)], n_nodes=4)  # a diamond
    >>> weights = np.array([1.0, 2.0, 0.0, 0.0])  # paths 0-1-3 (score 1) and 0-2-3 (score 2)
    >>> float(sm.dag(weights, graph, reg="hard"))
    2.0
    >>> float(sm.dag(weights, graph))  # log(e^1 + e^2)
    2.31326
    """
    weights, problem = _prepare(weights, graph, reg, gamma)
    return evaluate(problem, "value", weights)


def dag_grad(weights: Array, graph: DAG, *, reg: Reg = "negentropy",
             gamma: float = 1.0) -> "tuple[Array, Array]":
    """DP_Ω(weights) and its gradient ``E``, the expected edge occupancy.
    {shared}
    Returns
    -------
    value : array, shape (...)
    E : array, shape (..., n_edges)
        ``E[k]`` is the probability that a path drawn from ``p_{θ,Ω}`` uses
        edge ``k`` (docs/spec.md §2); ``0`` on ``-inf`` edges and where the end is
        unreachable.

    Examples
    --------
    >>> import numpy as np
    >>> import smoothmax as sm
    >>> graph, _ = sm.DAG.from_edges([(0, 1), (0, 2), (1, 3), (2, 3)], n_nodes=4)  # a diamond
    >>> weights = np.array([1.0, 2.0, 0.0, 0.0])  # paths 0-1-3 (score 1) and 0-2-3 (score 2)
    >>> value, E = sm.dag_grad(weights, graph)
    >>> E  # the two paths have probabilities 1/(1+e) and e/(1+e)
    array([0.26894, 0.73106, 0.26894, 0.73106])
    """
    weights, problem = _prepare(weights, graph, reg, gamma)
    return evaluate(problem, "grad", weights)


def dag_hvp(weights: Array, Z: Array, graph: DAG, *, reg: Reg = "negentropy",
            gamma: float = 1.0) -> Array:
    """The Hessian-vector product ``∇²DP_Ω(weights)·Z``, by one forward and one reverse pass.
    {shared}
    Z : array, shape (..., n_edges)
        The direction (finite), cast to weights' dtype.

    Returns
    -------
    Edot : array, shape (..., n_edges)

    Examples
    --------
    >>> import numpy as np
    >>> import smoothmax as sm
    >>> graph, _ = sm.DAG.from_edges([(0, 1), (0, 2), (1, 3), (2, 3)], n_nodes=4)  # a diamond
    >>> weights = np.array([1.0, 2.0, 0.0, 0.0])  # paths 0-1-3 (score 1) and 0-2-3 (score 2)
    >>> Z = np.array([1.0, 0.0, 0.0, 0.0])
    >>> eps = 1e-6  # the directional derivative of E, by central differences
    >>> fd = (sm.dag_grad(weights + eps * Z, graph)[1] - sm.dag_grad(weights - eps * Z, graph)[1]) / (2 * eps)
    >>> bool(np.allclose(sm.dag_hvp(weights, Z, graph), fd, atol=1e-6))
    True
    """
    weights, problem = _prepare(weights, graph, reg, gamma)
    Z = check_direction(Z, weights, problem.xp, problem.backend, checks_for(problem.backend)[0])
    return evaluate(problem, "hvp", weights, Z)


def dag_path(weights: Array, graph: DAG) -> "tuple[Array, Array]":
    """The highest-scoring path (hard DP).

    Parameters
    ----------
    weights, graph : as for :func:`dag`.

    Returns
    -------
    score : array, shape (...)
        ``-inf`` where no path reaches the end node.
    Y : array, shape (..., n_edges)
        0/1 edge indicator of the best path in weights' dtype (ties: the first
        entering edge in ``graph`` order); all 0 where no path exists.

    Examples
    --------
    >>> import numpy as np
    >>> import smoothmax as sm
    >>> graph, _ = sm.DAG.from_edges([(0, 1), (0, 2), (1, 3), (2, 3)], n_nodes=4)  # a diamond
    >>> weights = np.array([1.0, 2.0, 0.0, 0.0])  # paths 0-1-3 (score 1) and 0-2-3 (score 2)
    >>> sm.dag_path(weights, graph)
    (array(2.), array([0., 1., 0., 1.]))
    """
    weights, problem = _prepare(weights, graph, "hard", 1.0)
    return evaluate(problem, "path", weights)


for _f in (dag, dag_grad, dag_hvp):
    _f.__doc__ = (_f.__doc__ or "").replace("{shared}", _SHARED_DOC)
