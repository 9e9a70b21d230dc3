"""Exact path sampling (docs/spec.md §2) and the l2 support listing (paper §4.2)."""
import collections
import itertools

import numpy as np
import pytest

import smoothmax as sm

from _oracles import sakoe_chiba, viterbi_brute
from test_dag import dag_brute, random_dag


def assert_mean_close(samples, expected, n, k=5.0, extra=1e-3):
    """CLT tolerance: each frequency within k standard errors of its probability."""
    samples = np.asarray(samples, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    se = np.sqrt(np.clip(expected * (1 - expected), 0, None) / n)
    err = np.abs(samples - expected)
    bad = err > k * se + extra
    assert not bad.any(), (f"{bad.sum()} frequencies off: max |mean - E| = {err.max():.4g}, "
                           f"at E = {expected[bad][:5]}, mean = {samples[bad][:5]}")


@pytest.mark.parametrize("reg", ["negentropy", "l2"])
def test_dag_sample_mean_and_path_frequencies(reg, rng):
    n = 20000
    graph, w = random_dag(rng, N=6, maxdeg=3, p_mask=0.1)
    while not np.isfinite(sm.dag(w, graph)):
        graph, w = random_dag(rng, N=6, maxdeg=3, p_mask=0.1)
    Y = sm.dag_sample(w, graph, n, reg=reg, gamma=0.7, seed=1)
    assert Y.shape == (n, graph.n_edges) and Y.dtype == np.float64
    _, E = sm.dag_grad(w, graph, reg=reg, gamma=0.7)
    assert_mean_close(Y.mean(0), E, n)
    # each sampled path is a path: one edge into the end, consistent parent chain
    ref = dag_brute(w, graph.indptr, graph.parents, reg, 0.7)
    # p(Y) = Π q along Y, with q from the oracle's own scalar DP
    qs = _oracle_q(w, graph, reg, 0.7)
    probs = {}
    for Yp in ref["Ys"]:
        key = tuple(np.flatnonzero(Yp))
        probs[key] = float(np.prod(qs[list(key)]))
    counts = collections.Counter(tuple(np.flatnonzero(y)) for y in Y)
    assert set(counts) <= {k for k, p in probs.items() if p > 0}
    keys = list(probs)
    freq = np.array([counts.get(k, 0) / n for k in keys])
    assert_mean_close(freq, np.array([probs[k] for k in keys]), n)
    if reg == "negentropy":  # Gibbs distribution
        gibbs = np.exp(ref["scores"] / 0.7 - ref["lse"] / 0.7)
        np.testing.assert_allclose([probs[tuple(np.flatnonzero(y))] for y in ref["Ys"]], gibbs, atol=1e-12)


def _oracle_q(w, graph, reg, gamma):
    from _oracles import op_value_grad

    N = graph.n_nodes
    v = np.zeros(N)
    q = np.zeros(graph.n_edges)
    for i in range(1, N):
        ks = list(range(graph.indptr[i], graph.indptr[i + 1]))
        if not ks:
            v[i] = -np.inf
            continue
        v[i], q[ks] = op_value_grad([w[k] + v[graph.parents[k]] for k in ks], reg, gamma)
    return q


def test_dag_sample_hard_is_best_path(rng):
    graph, w = random_dag(rng, N=7)
    Y = sm.dag_sample(w, graph, 5, reg="hard", seed=0)
    _, best = sm.dag_path(w, graph)
    assert np.all(Y == best)


def test_dag_sample_batch_unreachable_and_seed(rng):
    graph = sm.DAG([0, 0, 1, 3], [0, 1, 0])
    W = np.array([[[0.0, 1.0, 0.5], [0.0, -np.inf, -np.inf]]])  # (1, 2, 3); item 1 unreachable
    Y = sm.dag_sample(W, graph, 7, seed=3)
    assert Y.shape == (7, 1, 2, 3)
    assert np.all(Y[:, 0, 1] == 0)
    assert np.all(Y[:, 0, 0].sum(-1) >= 1)
    np.testing.assert_array_equal(Y, sm.dag_sample(W, graph, 7, seed=3))
    assert sm.dag_sample(W, graph, 0).shape == (0, 1, 2, 3)


@pytest.mark.parametrize("reg", ["negentropy", "l2"])
def test_viterbi_sample(reg, rng):
    n, T, S, gamma = 20000, 4, 3, 0.8
    theta = rng.normal(size=(2, T, S, S))
    lengths = np.array([4, 3])
    tags = sm.viterbi_sample(theta, n, reg=reg, gamma=gamma, lengths=lengths, seed=0)
    assert tags.shape == (n, 2, T) and tags.dtype == np.int64
    assert np.all(tags[:, 1, 3] == -1) and np.all(tags[:, :, :3] >= 0)
    _, E = sm.viterbi_grad(theta, reg=reg, gamma=gamma, lengths=lengths)
    for b in range(2):
        L = lengths[b]
        unary = np.stack([(tags[:, b, :L] == i).mean(0) for i in range(S)], axis=-1)
        assert_mean_close(unary, E[b, :L].sum(-1), n)
        pair = np.zeros((L, S, S))
        for t in range(1, L):
            np.add.at(pair[t], (tags[:, b, t], tags[:, b, t - 1]), 1.0 / n)
        assert_mean_close(pair[1:], E[b, 1:L], n)


def test_viterbi_sample_sequence_frequencies(rng):
    # Gibbs probabilities of tag sequences, the virtual state before t = 0 summed out
    n, T, S, gamma = 30000, 3, 2, 1.0
    theta = rng.normal(size=(T, S, S))
    ref = viterbi_brute(theta, "negentropy", gamma)
    p = np.exp(ref["scores"] / gamma - ref["lse"] / gamma)
    seqs = list(itertools.product(range(S), repeat=T + 1))
    marg = collections.defaultdict(float)
    for y, py in zip(seqs, p):
        marg[y[1:]] += py
    tags = sm.viterbi_sample(theta, n, seed=1)
    counts = collections.Counter(tuple(t) for t in tags.tolist())
    keys = list(marg)
    assert_mean_close([counts.get(k, 0) / n for k in keys], [marg[k] for k in keys], n)


def test_viterbi_sample_hard_and_masked(rng):
    theta = rng.normal(size=(5, 3, 3))
    tags = sm.viterbi_sample(theta, 4, reg="hard", seed=0)
    assert np.all(tags == sm.viterbi_decode(theta)[1])
    masked = np.full((2, 2, 2), -np.inf)
    assert np.all(sm.viterbi_sample(masked, 3, seed=0) == -1)


def _is_alignment(Y, la, lb, allowed):
    cells = np.argwhere(Y > 0)
    if len(cells) == 0:
        return False
    cells = sorted(map(tuple, cells))
    if cells[0] != (0, 0) or cells[-1] != (la - 1, lb - 1):
        return False
    for (a, b), (c, d) in zip(cells, cells[1:]):
        if (c - a, d - b) not in ((1, 0), (0, 1), (1, 1)):
            return False
    return all(allowed[c] for c in cells) and np.all(Y[la:] == 0) and np.all(Y[:, lb:] == 0)


@pytest.mark.parametrize("reg", ["negentropy", "l2"])
@pytest.mark.parametrize("band", [None, 1])
def test_dtw_sample(reg, band, rng):
    n, NA, NB, gamma = 20000, 4, 5, 0.5
    theta = rng.random((2, NA, NB))
    la, lb = np.array([4, 3]), np.array([5, 4])
    kw = dict(reg=reg, gamma=gamma, lengths=(la, lb), band=band)
    Y = sm.dtw_sample(theta, n, seed=0, **kw)
    assert Y.shape == (n, 2, NA, NB) and Y.dtype == np.float64
    _, E = sm.dtw_grad(theta, **kw)
    assert_mean_close(Y.mean(0), E, n)
    for b in range(2):
        allowed = np.ones((la[b], lb[b]), bool) if band is None else sakoe_chiba(la[b], lb[b], band)
        allowed[-1, -1] = True
        full = np.zeros((NA, NB), bool)
        full[:la[b], :lb[b]] = allowed
        for y in Y[:50, b]:
            assert _is_alignment(y, la[b], lb[b], full)


def test_dtw_sample_hard_and_float32(rng):
    theta = rng.random((3, 6)).astype(np.float32)
    Y = sm.dtw_sample(theta, 3, reg="hard", seed=0)
    assert Y.dtype == np.float32
    assert np.all(Y == sm.dtw_path(theta)[1])


def test_dag_support(rng):
    graph, cell = sm.DAG.for_dtw(4, 4)
    for trial in range(5):
        w = -rng.random(16)[cell]  # DTW costs on the grid DAG
        paths, probs = sm.dag_support(w, graph, reg="l2", gamma=0.3)
        _, E = sm.dag_grad(w, graph, reg="l2", gamma=0.3)
        np.testing.assert_allclose(probs.sum(), 1.0, rtol=1e-12)
        np.testing.assert_allclose(probs @ paths, E, atol=1e-12)
        assert np.all(probs > 0) and np.all(np.diff(probs) <= 0)
        ref = dag_brute(w, graph.indptr, graph.parents, "l2", 0.3)
        qs = _oracle_q(w, graph, "l2", 0.3)
        nonzero = sorted(tuple(np.flatnonzero(Y)) for Y in ref["Ys"] if np.prod(qs[np.flatnonzero(Y)]) > 0)
        assert sorted(tuple(np.flatnonzero(p)) for p in paths) == nonzero
    with pytest.raises(ValueError, match="max_paths"):
        sm.dag_support(w, graph, reg="negentropy", max_paths=10)
    with pytest.raises(ValueError, match="one problem"):
        sm.dag_support(np.stack([w, w]), graph)
    paths, probs = sm.dag_support(w, graph, reg="hard")
    assert paths.shape == (1, graph.n_edges) and probs[0] == 1.0


def test_sampling_backends(backend, dtype, rng):
    graph, w = random_dag(rng, N=5)
    theta_v = rng.normal(size=(2, 3, 2, 2)).astype(dtype.np)
    theta_d = rng.random((2, 3, 4)).astype(dtype.np)
    Y = sm.dag_sample(backend.asarray(w.astype(dtype.np)), graph, 4, seed=0)
    backend.check(Y, dtype.name, (4, graph.n_edges))
    tags = sm.viterbi_sample(backend.asarray(theta_v), 4, seed=0)
    backend.check(tags, "int64", (4, 2, 3))
    A = sm.dtw_sample(backend.asarray(theta_d), 4, seed=0, reg="l2")
    backend.check(A, dtype.name, (4, 2, 3, 4))
    paths, probs = sm.dag_support(backend.asarray(w.astype(dtype.np)), graph, reg="hard")
    backend.check(paths, dtype.name, (1, graph.n_edges))


def test_bad_sampling_input(rng):
    graph, w = random_dag(rng)
    with pytest.raises(ValueError, match="n must be a non-negative integer"):
        sm.dag_sample(w, graph, -1)
    with pytest.raises(ValueError, match="n must be a non-negative integer"):
        sm.viterbi_sample(np.zeros((2, 2, 2)), 2.5)
    with pytest.raises(ValueError, match="seed"):
        sm.dtw_sample(np.zeros((2, 2)), 2, seed="abc")
    with pytest.raises(ValueError, match="max_paths"):
        sm.dag_support(w, graph, max_paths=0)
    with pytest.raises(ValueError, match="theta must not contain NaN"):
        sm.dtw_sample(np.full((2, 2), np.nan), 2)
