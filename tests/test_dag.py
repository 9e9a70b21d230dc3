"""The general DAG operator DP_Ω (docs/spec.md §2): brute force, dense forms, FD, backends, bad input.

Each engine's DAG passes against enumeration: tests/test_engine_contract.py.
"""
import numpy as np
import pytest

import smoothmax as sm

from _oracles import dag_brute, logsumexp, sakoe_chiba

REGS = ("negentropy", "l2", "hard")


def random_dag(rng, N=None, maxdeg=3, p_mask=0.0):
    """A random DAG with parallel edges and, optionally, -inf edges."""
    N = N or int(rng.integers(3, 7))
    counts = [0, 0]
    parents = []
    for i in range(1, N):
        d = int(rng.integers(1, maxdeg + 1))
        parents.extend(int(p) for p in rng.integers(0, i, size=d))  # repeats = parallel edges
        counts.append(counts[-1] + d)
    graph = sm.DAG(counts, parents)
    w = rng.normal(size=graph.n_edges) * 1.5
    if p_mask:
        w[rng.random(graph.n_edges) < p_mask] = -np.inf
    return graph, w


# ---------------------------------------------------------------------------
# brute force


@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("gamma", [0.3, 1.0, 4.0])
def test_brute_force_random_dags(reg, gamma, rng):
    for trial in range(15):
        graph, w = random_dag(rng, p_mask=0.15 if trial % 2 else 0.0)
        Z = rng.normal(size=w.shape)
        ref = dag_brute(w, graph.indptr, graph.parents, reg, gamma, Z)
        value, E = sm.dag_grad(w, graph, reg=reg, gamma=gamma)
        Ed = sm.dag_hvp(w, Z, graph, reg=reg, gamma=gamma)
        assert not np.any(np.isnan(E)) and not np.any(np.isnan(Ed))
        np.testing.assert_allclose(value, ref["value"], rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(E, ref["E"], rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(Ed, ref["Edot"], rtol=1e-9, atol=1e-9)
        if reg == "negentropy":
            np.testing.assert_allclose(value, ref["lse"], rtol=1e-10, atol=1e-10)
        if reg == "hard":
            np.testing.assert_allclose(value, ref["best"], rtol=1e-12)
            score, Y = sm.dag_path(w, graph)
            np.testing.assert_allclose(score, ref["best"], rtol=1e-12)
            if np.isfinite(score):
                assert np.isclose(Y @ np.where(Y > 0, w, 0), ref["best"])
            else:
                assert np.all(Y == 0)
        if np.isfinite(value):
            assert np.all(E[w == -np.inf] == 0)
            # flow conservation: E sums to 1 on the edges entering the end node
            last = slice(graph.indptr[-2], graph.indptr[-1])
            np.testing.assert_allclose(E[last].sum(), 1.0, rtol=1e-12)


def test_parallel_edges_negentropy_is_logsumexp():
    # two nodes, three parallel edges: DP = γ·logsumexp(w/γ), E = softmax
    graph = sm.DAG([0, 0, 3], [0, 0, 0])
    w = np.array([0.3, -1.2, 2.0])
    v, E = sm.dag_grad(w, graph, gamma=0.7)
    np.testing.assert_allclose(v, 0.7 * logsumexp(w / 0.7))
    np.testing.assert_allclose(E, np.exp(w / 0.7) / np.exp(w / 0.7).sum())
    # l2 with one edge adds -γ/2 (the operator is applied everywhere)
    v1 = sm.dag(np.array([1.5]), sm.DAG([0, 0, 1], [0]), reg="l2", gamma=0.4)
    np.testing.assert_allclose(v1, 1.5 - 0.2)


# ---------------------------------------------------------------------------
# Viterbi and DTW written as DAGs (graphs built here, independently of DAG.for_*)


def viterbi_as_dag(theta, L):
    """Nodes: 0 start, 1 + t·S + i, end; S parallel start edges per first-step state."""
    T, S, _ = theta.shape
    edges, weights, index = [], [], []
    node = lambda t, i: 1 + t * S + i  # noqa: E731
    for t in range(L):
        for i in range(S):
            for j in range(S):
                edges.append((0 if t == 0 else node(t - 1, j), node(t, i)))
                weights.append(theta[t, i, j])
                index.append((t, i, j))
    end = 1 + L * S
    for i in range(S):
        edges.append((node(L - 1, i), end))
        weights.append(0.0)
        index.append(None)
    graph, order = sm.DAG.from_edges(edges, end + 1)
    return graph, np.asarray(weights)[order], [index[k] for k in order]


def dtw_as_dag(theta, la, lb, band):
    """Nodes: 0 start, 1 + i·lb + j for cell (i, j); weights are the negated costs."""
    allowed = np.ones((la, lb), bool) if band is None else sakoe_chiba(la, lb, band)
    allowed[la - 1, lb - 1] = True
    edges, weights, cells = [], [], []
    node = lambda i, j: 1 + i * lb + j  # noqa: E731
    for i in range(la):
        for j in range(lb):
            if not allowed[i, j]:
                continue
            preds = [0] if (i, j) == (0, 0) else [
                node(a, b) for a, b in ((i - 1, j), (i, j - 1), (i - 1, j - 1))
                if a >= 0 and b >= 0 and allowed[a, b]]
            for p in preds:
                edges.append((p, node(i, j)))
                weights.append(-theta[i, j])
                cells.append((i, j))
    graph, order = sm.DAG.from_edges(edges, la * lb + 1)
    return graph, np.asarray(weights)[order], [cells[k] for k in order]


@pytest.mark.parametrize("reg", REGS)
def test_viterbi_as_dag(reg, rng):
    T, S, gamma = 4, 3, 0.8
    theta = rng.normal(size=(3, T, S, S))
    theta[1, 2, 0, 1] = -np.inf
    lengths = np.array([4, 2, 1])
    Z = rng.normal(size=theta.shape)
    v, E = sm.viterbi_grad(theta, reg=reg, gamma=gamma, lengths=lengths)
    Ed = sm.viterbi_hvp(theta, Z, reg=reg, gamma=gamma, lengths=lengths)
    for b in range(3):
        L = int(lengths[b])
        graph, w, index = viterbi_as_dag(theta[b], L)
        zw = np.array([Z[b][ix] if ix is not None else 0.0 for ix in index])
        dv, dE = sm.dag_grad(w, graph, reg=reg, gamma=gamma)
        dEd = sm.dag_hvp(w, zw, graph, reg=reg, gamma=gamma)
        Ed_dense = np.zeros((T, S, S))
        E_dense = np.zeros((T, S, S))
        for k, ix in enumerate(index):
            if ix is not None:
                E_dense[ix] = dE[k]
                Ed_dense[ix] = dEd[k]
        np.testing.assert_allclose(dv, v[b], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(E_dense, E[b], atol=1e-12)
        np.testing.assert_allclose(Ed_dense, Ed[b], atol=1e-10)
        # the library's own builder gives the same graph
        g2, idx = sm.DAG.for_viterbi(L, S)
        w2 = np.where(idx >= 0, theta[b, :L].reshape(-1)[np.maximum(idx, 0)], 0.0)
        np.testing.assert_allclose(sm.dag(w2, g2, reg=reg, gamma=gamma), v[b], rtol=1e-12)


@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("band", [None, 0, 1])
def test_dtw_as_dag(reg, band, rng):
    NA, NB, gamma = 4, 5, 0.6
    theta = rng.random((3, NA, NB)) * 2
    theta[0, 1, 2] = np.inf
    la, lb = np.array([4, 3, 2]), np.array([5, 5, 3])
    Z = rng.normal(size=theta.shape)
    kw = dict(reg=reg, gamma=gamma, lengths=(la, lb), band=band)
    v, E = sm.dtw_grad(theta, **kw)
    Ed = sm.dtw_hvp(theta, Z, **kw)
    for b in range(3):
        graph, w, cells = dtw_as_dag(theta[b], la[b], lb[b], band)
        zw = np.array([Z[b][c] for c in cells])
        dv, dE = sm.dag_grad(w, graph, reg=reg, gamma=gamma)
        dEd = sm.dag_hvp(w, zw, graph, reg=reg, gamma=gamma)
        E_dense, Ed_dense = np.zeros((NA, NB)), np.zeros((NA, NB))
        for k, c in enumerate(cells):
            E_dense[c] += dE[k]
            Ed_dense[c] -= dEd[k]
        np.testing.assert_allclose(-dv, v[b], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(E_dense, E[b], atol=1e-12)
        # DTW(θ) = -DP(-Mθ) (M copies a cell's cost to its entering edges): ∇²DTW·Z = -Mᵀ ∇²DP (M Z)
        np.testing.assert_allclose(Ed_dense, Ed[b], atol=1e-10)
        g2, idx = sm.DAG.for_dtw(la[b], lb[b], band)
        w2 = -theta[b, :la[b], :lb[b]].reshape(-1)[idx]
        np.testing.assert_allclose(-sm.dag(w2, g2, reg=reg, gamma=gamma), v[b], rtol=1e-12)


# ---------------------------------------------------------------------------
# finite differences


@pytest.mark.parametrize("reg", ["negentropy", "l2"])
def test_finite_differences(reg, rng):
    graph, w = random_dag(rng, N=7, maxdeg=3)
    gamma, eps = 0.9, 1e-6
    Z = rng.normal(size=w.shape)
    v, E = sm.dag_grad(w, graph, reg=reg, gamma=gamma)
    fd = np.array([(sm.dag(w + eps * e, graph, reg=reg, gamma=gamma)
                    - sm.dag(w - eps * e, graph, reg=reg, gamma=gamma)) / (2 * eps)
                   for e in np.eye(len(w))])
    np.testing.assert_allclose(E, fd, atol=1e-6)
    Ed = sm.dag_hvp(w, Z, graph, reg=reg, gamma=gamma)
    fd_h = (sm.dag_grad(w + eps * Z, graph, reg=reg, gamma=gamma)[1]
            - sm.dag_grad(w - eps * Z, graph, reg=reg, gamma=gamma)[1]) / (2 * eps)
    np.testing.assert_allclose(Ed, fd_h, atol=1e-5)


# ---------------------------------------------------------------------------
# dtypes, backends (the engines themselves: tests/test_engine_contract.py)


def test_backends(backend, dtype, rng):
    graph, w = random_dag(rng, N=6)
    W = rng.normal(size=(2, 3, graph.n_edges)).astype(dtype.np)
    Z = rng.normal(size=W.shape).astype(dtype.np)
    ref_v, ref_E = sm.dag_grad(W.astype(np.float64), graph, reg="l2", gamma=0.7)
    ref_Ed = sm.dag_hvp(W.astype(np.float64), Z.astype(np.float64), graph, reg="l2", gamma=0.7)
    x, z = backend.asarray(W), backend.asarray(Z)
    v = backend.check(sm.dag(x, graph, reg="l2", gamma=0.7), dtype.name, (2, 3))
    v2, E = sm.dag_grad(x, graph, reg="l2", gamma=0.7)
    E = backend.check(E, dtype.name, W.shape)
    Ed = backend.check(sm.dag_hvp(x, z, graph, reg="l2", gamma=0.7), dtype.name, W.shape)
    s, Y = sm.dag_path(x, graph)
    backend.check(s, dtype.name, (2, 3))
    Y = backend.check(Y, dtype.name, W.shape)
    dtype.close(v, ref_v)
    dtype.close(E, ref_E)
    dtype.close(Ed, ref_Ed, scale=10)
    assert set(np.unique(Y)) <= {0.0, 1.0}


def test_torch_autodiff(rng):
    torch = pytest.importorskip("torch")
    pytest.importorskip("smoothmax.torch", reason="smoothmax.torch not available")
    graph, w = random_dag(rng, N=6)
    x = torch.tensor(rng.normal(size=(2, graph.n_edges)), requires_grad=True)
    for reg in ("negentropy", "l2"):
        assert torch.autograd.gradcheck(lambda t: sm.dag(t, graph, reg=reg, gamma=0.7), (x,))
        assert torch.autograd.gradgradcheck(lambda t: sm.dag(t, graph, reg=reg, gamma=0.7), (x,))


def test_jax_autodiff(rng):
    jax = pytest.importorskip("jax")
    pytest.importorskip("smoothmax.jax", reason="smoothmax.jax not available")
    import jax.numpy as jnp

    graph, w = random_dag(rng, N=6)
    W = rng.normal(size=(2, graph.n_edges))
    Z = rng.normal(size=W.shape)
    x = jnp.asarray(W)
    g = jax.grad(lambda t: sm.dag(t, graph, reg="negentropy").sum())(x)
    np.testing.assert_allclose(np.asarray(g), sm.dag_grad(W, graph)[1], atol=1e-10)
    hv = jax.grad(lambda t: jnp.sum(sm.dag_grad(t, graph)[1] * jnp.asarray(Z)))(x)
    np.testing.assert_allclose(np.asarray(hv), sm.dag_hvp(W, Z, graph), atol=1e-10)
    np.testing.assert_allclose(np.asarray(jax.jit(lambda t: sm.dag(t, graph))(x)), sm.dag(W, graph))


# ---------------------------------------------------------------------------
# edge cases and bad input


def test_unreachable_end_and_dead_nodes():
    # node 2 has no parent; the end (3) is reached only through node 2 -> unreachable
    graph = sm.DAG([0, 0, 1, 1, 2], [0, 2])
    for reg in REGS:
        v, E = sm.dag_grad(np.array([0.5, 1.0]), graph, reg=reg)
        assert v == -np.inf and np.all(E == 0)
        assert np.all(sm.dag_hvp(np.array([0.5, 1.0]), np.ones(2), graph, reg=reg) == 0)
    # all edges into the end masked
    graph = sm.DAG([0, 0, 1, 3], [0, 1, 0])
    v, E = sm.dag_grad(np.array([0.0, -np.inf, -np.inf]), graph)
    assert v == -np.inf and np.all(E == 0)
    s, Y = sm.dag_path(np.array([0.0, -np.inf, -np.inf]), graph)
    assert s == -np.inf and np.all(Y == 0)
    # a dead-end node (1 never reaches the end) gets E = 0
    graph = sm.DAG([0, 0, 1, 2], [0, 0])
    v, E = sm.dag_grad(np.array([3.0, 1.0]), graph)
    assert v == 1.0 and np.array_equal(E, [0.0, 1.0])


def test_empty_batch_and_large_values(rng):
    graph, w = random_dag(rng)
    v, E = sm.dag_grad(np.zeros((0, graph.n_edges)), graph)
    assert v.shape == (0,) and E.shape == (0, graph.n_edges)
    v, E = sm.dag_grad(w * 1e6, graph, reg="negentropy", gamma=1e-4)
    assert np.all(np.isfinite(E)) and np.isfinite(v)


def test_inputs_not_modified(rng):
    graph, w = random_dag(rng)
    w0 = w.copy()
    sm.dag_hvp(w, np.ones_like(w), graph)
    np.testing.assert_array_equal(w, w0)


@pytest.mark.parametrize("indptr, parents, match", [
    ([0, 0], [], "indptr"),
    ([1, 1, 2], [0], "indptr must start"),
    ([0, 1, 1], [0], "indptr must start"),
    ([0, 0, 2, 1], [0, 0], "non-decreasing"),
    ([0, 0, 1, 3], [0, 0], "len\\(parents\\)"),
    ([0, 0, 1, 2], [0, 2], "parents"),
    ([0, 0, 1, 2], [0, -1], "parents"),
    ([[0, 0, 1]], [0], "indptr"),
])
def test_bad_graph(indptr, parents, match):
    with pytest.raises(ValueError, match=match):
        sm.DAG(indptr, parents)


def test_bad_graph_dtype():
    with pytest.raises(TypeError, match="indptr"):
        sm.DAG([0.0, 0.0, 0.5], [0])
    with pytest.raises(TypeError, match="parents"):
        sm.DAG([0, 0, 1], ["a"])


def test_bad_weights():
    graph = sm.DAG([0, 0, 2], [0, 0])
    with pytest.raises(ValueError, match="weights must have graph.n_edges"):
        sm.dag(np.zeros(3), graph)
    with pytest.raises(ValueError, match="weights must not contain NaN"):
        sm.dag(np.array([0.0, np.nan]), graph)
    with pytest.raises(ValueError, match=r"weights must not contain \+inf"):
        sm.dag(np.array([0.0, np.inf]), graph)
    with pytest.raises(TypeError, match="weights must have a floating dtype"):
        sm.dag(np.zeros(2, dtype=np.complex64), graph)
    with pytest.raises(TypeError, match="graph must be a smoothmax.DAG"):
        sm.dag(np.zeros(2), ([0, 0, 2], [0, 0]))
    with pytest.raises(ValueError, match="reg"):
        sm.dag(np.zeros(2), graph, reg="softmax")
    with pytest.raises(ValueError, match="gamma"):
        sm.dag(np.zeros(2), graph, gamma=0.0)
    with pytest.raises(ValueError, match="Z must have the shape"):
        sm.dag_hvp(np.zeros(2), np.zeros(3), graph)
    with pytest.raises(ValueError, match="weights must have at least 1 dimensions"):
        sm.dag(np.float64(1.0), graph)


# ---------------------------------------------------------------------------
# property-based (docs/spec.md §6): no crash, no NaN, values within the Lemma 1 bounds summed over nodes

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), N=st.integers(2, 8), batch=st.integers(0, 3),
       log_gamma=st.floats(-4, 4), log_scale=st.floats(-3, 6), reg=st.sampled_from(REGS),
       dt=st.sampled_from(["float32", "float64"]), p_mask=st.sampled_from([0.0, 0.3]))
def test_property_random_dags(seed, N, batch, log_gamma, log_scale, reg, dt, p_mask):
    rng = np.random.default_rng(seed)
    graph, _ = random_dag(rng, N=N, maxdeg=3)
    gamma = 10.0 ** log_gamma
    W = (rng.normal(size=(batch, graph.n_edges)) * 10.0 ** log_scale).astype(dt)
    W[rng.random(W.shape) < p_mask] = -np.inf
    Z = rng.normal(size=W.shape).astype(dt)
    v, E = sm.dag_grad(W, graph, reg=reg, gamma=gamma)
    Ed = sm.dag_hvp(W, Z, graph, reg=reg, gamma=gamma)
    s, Y = sm.dag_path(W, graph)
    for x in (v, E, Ed, s, Y):
        assert x.dtype == np.dtype(dt) and not np.any(np.isnan(x))
    assert np.all((E >= -1e-6) & (E <= 1 + 1e-5))
    deg = np.diff(graph.indptr)[1:]
    lo = np.array([-gamma / 2 if (reg == "l2" and d) else 0.0 for d in deg]).sum()
    hi = np.array([gamma * np.log(d) if (reg == "negentropy" and d) else 0.0 for d in deg]).sum()
    finite = np.isfinite(s)
    np.testing.assert_array_equal(np.isfinite(v), finite)
    tol = 1e-4 * (np.abs(W[finite][np.isfinite(W[finite])]).sum() + abs(lo) + hi + 1) if dt == "float32" \
        else 1e-9 * (np.abs(W[np.isfinite(W)]).sum() + abs(lo) + hi + 1)
    d = v[finite].astype(np.float64) - s[finite].astype(np.float64)
    assert np.all(d >= lo - tol) and np.all(d <= hi + tol)
