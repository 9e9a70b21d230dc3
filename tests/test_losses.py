"""Structured losses (paper §4.1): brute-force oracles, gradients by FD and by the frameworks."""
import itertools
import math

import numpy as np
import pytest

import smoothmax as sm
from smoothmax import losses

from _oracles import dtw_paths, logsumexp


def seq_score(theta, tags, L=None, start=0):
    """<Y, θ> of a tag sequence with the virtual state ``start`` (0 for targets) before t = 0."""
    L = len(tags) if L is None else L
    prev = start
    s = 0.0
    for t in range(L):
        s += theta[t, tags[t], prev]
        prev = tags[t]
    return s


def all_seqs(T, S):
    return [list(y) for y in itertools.product(range(S), repeat=T)]


def fd_grad(f, x, eps=1e-6):
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[idx] = eps
        g[idx] = (f(x + e) - f(x - e)) / (2 * eps)
    return g


# ---------------------------------------------------------------------------
# Viterbi surrogate


def test_crf_loss_is_negative_log_likelihood(rng):
    T, S = 4, 3
    theta = rng.normal(size=(T, S, S))
    theta[0, :, 1:] = -np.inf  # textbook CRF: the first step has no predecessor
    tags = rng.integers(0, S, size=T)
    scores = np.array([seq_score(theta, y) for y in all_seqs(T, S)])
    nll = logsumexp(scores) - seq_score(theta, tags)
    loss = losses.viterbi_surrogate(theta, tags)
    np.testing.assert_allclose(loss, nll, rtol=1e-12)
    # γ ≠ 1: γ times the NLL of the Gibbs distribution at temperature γ
    nll_g = 0.5 * logsumexp(scores / 0.5) - seq_score(theta, tags)
    np.testing.assert_allclose(losses.viterbi_surrogate(theta, tags, gamma=0.5), nll_g, rtol=1e-12)


def test_crf_loss_unmasked_counts_the_virtual_state(rng):
    # without the mask, paths include the virtual state y_{-1}; the target takes y_{-1} = 0
    T, S = 3, 2
    theta = rng.normal(size=(T, S, S))
    tags = np.array([1, 0, 1])
    scores = [theta[0, y[1], y[0]] + sum(theta[t, y[t + 1], y[t]] for t in range(1, T))
              for y in itertools.product(range(S), repeat=T + 1)]
    np.testing.assert_allclose(losses.viterbi_surrogate(theta, tags),
                               logsumexp(scores) - seq_score(theta, tags), rtol=1e-12)


def test_perceptron_and_hinge_and_lengths(rng):
    T, S = 4, 3
    theta = rng.normal(size=(2, T, S, S))
    tags = rng.integers(0, S, size=(2, T))
    lengths = np.array([4, 2])
    tags[1, 2:] = -1
    perc = losses.viterbi_surrogate(theta, tags, reg="hard", lengths=lengths)
    hinge = losses.viterbi_surrogate(theta, tags, reg="hard", lengths=lengths, cost="hamming")
    for b in range(2):
        L = lengths[b]
        truth = seq_score(theta[b], tags[b], L)
        # the DP ranges over every virtual start state
        best = max(seq_score(theta[b], y, start=s) for y in all_seqs(L, S) for s in range(S))
        best_h = max(seq_score(theta[b], y, start=s) + sum(int(y[t] != tags[b, t]) for t in range(L))
                     for y in all_seqs(L, S) for s in range(S))
        np.testing.assert_allclose(perc[b], best - truth, rtol=1e-12)
        np.testing.assert_allclose(hinge[b], best_h - truth, rtol=1e-12)
        assert perc[b] >= 0 and hinge[b] >= perc[b]
    # a custom cost equal to the Hamming cost
    C = np.zeros_like(theta)
    for b in range(2):
        for t in range(lengths[b]):
            C[b, t] = (np.arange(S) != tags[b, t])[:, None]
    np.testing.assert_allclose(losses.viterbi_surrogate(theta, tags, reg="hard", lengths=lengths, cost=C), hinge)
    # the path tensor helper
    Y = losses.tags_to_path(theta, tags, lengths=lengths)
    assert Y.shape == theta.shape and Y[1, 2:].sum() == 0 and Y[0].sum() == 4 and Y[0, 0, tags[0, 0], 0] == 1


@pytest.mark.parametrize("gamma", [0.3, 1.0, 4.0])
def test_viterbi_surrogate_lower_bounds(gamma, rng):
    """Without a cost the loss is >= 0 for negentropy and hard, and >= -gamma(L+1)/2
    for l2, a bound an l2 loss does reach below 0 (confident, correct scores)."""
    T, S = 5, 4
    lengths = np.array([5, 3, 1, 5])
    tags = rng.integers(0, S, size=(4, T))
    theta = rng.normal(size=(4, T, S, S)) * 3
    sure = np.full((4, T, S, S), -10.0)
    for b in range(4):
        for t in range(T):
            sure[b, t, tags[b, t], :] = 10.0  # the target tag wins by a margin of 20
    for th in (theta, sure):
        for reg in ("negentropy", "hard"):
            assert np.all(losses.viterbi_surrogate(th, tags, reg=reg, gamma=gamma, lengths=lengths) >= -1e-9)
        l2 = losses.viterbi_surrogate(th, tags, reg="l2", gamma=gamma, lengths=lengths)
        assert np.all(l2 >= -gamma * (lengths + 1) / 2 - 1e-9)
    # one-hot q at the L - 1 later steps and the final max (-gamma/2 each), uniform q over
    # the S equal virtual start states at step 0 (-gamma/(2S)): below 0, near the bound
    l2 = losses.viterbi_surrogate(sure, tags, reg="l2", gamma=gamma, lengths=lengths)
    np.testing.assert_allclose(l2, -gamma * lengths / 2 - gamma / (2 * S), rtol=1e-9)


@pytest.mark.parametrize("reg", ["negentropy", "l2"])
@pytest.mark.parametrize("cost", [None, "hamming"])
def test_viterbi_surrogate_gradient_fd(reg, cost, rng):
    theta = rng.normal(size=(3, 3, 3))
    tags = rng.integers(0, 3, size=3)
    loss, g = losses.viterbi_surrogate(theta, tags, reg=reg, gamma=0.7, cost=cost, return_grad=True)
    np.testing.assert_allclose(loss, losses.viterbi_surrogate(theta, tags, reg=reg, gamma=0.7, cost=cost))
    fd = fd_grad(lambda t: losses.viterbi_surrogate(t, tags, reg=reg, gamma=0.7, cost=cost), theta)
    np.testing.assert_allclose(g, fd, atol=1e-6)


@pytest.mark.parametrize("reg, divergence", [("negentropy", "kl"), ("negentropy", "l2"), ("l2", "l2")])
def test_viterbi_relaxed(reg, divergence, rng):
    theta = rng.normal(size=(4, 3, 3))
    tags = rng.integers(0, 3, size=4)
    loss, g = losses.viterbi_relaxed(theta, tags, reg=reg, gamma=1.5, divergence=divergence,
                                     return_grad=True)
    M = sm.viterbi_grad(theta, reg=reg, gamma=1.5)[1].sum(-1)
    P = np.eye(3)[tags]
    expected = np.sum((M - P) ** 2) if divergence == "l2" else -np.sum(np.log(M[np.arange(4), tags]))
    np.testing.assert_allclose(loss, expected, rtol=1e-12)
    fd = fd_grad(lambda t: losses.viterbi_relaxed(t, tags, reg=reg, gamma=1.5, divergence=divergence), theta)
    np.testing.assert_allclose(g, fd, atol=1e-6)
    # default divergence follows the paper's pairing
    default = "kl" if reg == "negentropy" else "l2"
    if divergence == default:
        np.testing.assert_allclose(losses.viterbi_relaxed(theta, tags, reg=reg, gamma=1.5), loss)


# ---------------------------------------------------------------------------
# DTW


def area_cost_oracle(Y):
    NA, NB = Y.shape
    C = np.zeros((NA, NB))
    for a in range(NA):
        cols = np.flatnonzero(Y[a])
        if len(cols):
            for b in range(NB):
                C[a, b] = max(cols.min() - b, 0, b - cols.max())
    return C


def test_dtw_surrogate_brute_force(rng):
    NA, NB = 3, 4
    theta = rng.random((NA, NB))
    paths = dtw_paths(NA, NB)
    Ys = []
    for p in paths:
        Y = np.zeros((NA, NB))
        for c in p:
            Y[c] = 1
        Ys.append(Y)
    Yt = Ys[rng.integers(len(Ys))]
    C = area_cost_oracle(Yt)
    truth = np.sum(Yt * theta)
    costs = np.array([np.sum(Y * theta) for Y in Ys])
    areas = np.array([np.sum(Y * C) for Y in Ys])
    # hard + area: structured hinge, min convention
    hinge = losses.dtw_surrogate(theta, Yt, reg="hard", cost="area")
    np.testing.assert_allclose(hinge, truth - np.min(costs - areas), rtol=1e-12)
    assert hinge >= 0
    perc = losses.dtw_surrogate(theta, Yt, reg="hard", cost=None)
    np.testing.assert_allclose(perc, truth - costs.min(), rtol=1e-12)
    # negentropy, no cost: negative log-likelihood of the Gibbs distribution ∝ exp(-<Y, θ>)
    nll = losses.dtw_surrogate(theta, Yt, reg="negentropy", cost=None)
    np.testing.assert_allclose(nll, truth + logsumexp(-costs), rtol=1e-12)



def test_area_cost_one_cell_per_row():
    # paths with one cell per row: <C_Yt, Y> = Σ_a |col_Y(a) - col_Yt(a)|
    Yt = np.zeros((4, 3))
    Y = np.zeros((4, 3))
    for a, (bt, b) in enumerate([(0, 0), (1, 0), (2, 1), (2, 2)]):
        Yt[a, bt] = 1
        Y[a, b] = 1
    theta = np.zeros((4, 3))
    C = area_cost_oracle(Yt)
    assert np.sum(C * Y) == 2
    # with zero costs and reg="hard", the hinge is the largest area reachable
    best = max(np.sum(C * _cells(p, 4, 3)) for p in dtw_paths(4, 3))
    np.testing.assert_allclose(losses.dtw_surrogate(theta, Yt, reg="hard"), best)


def _cells(path, NA, NB):
    Y = np.zeros((NA, NB))
    for c in path:
        Y[c] = 1
    return Y


@pytest.mark.parametrize("reg", ["negentropy", "l2"])
@pytest.mark.parametrize("cost", [None, "area"])
def test_dtw_surrogate_gradient_fd(reg, cost, rng):
    theta = rng.random((2, 4, 3))
    Y = sm.dtw_path(rng.random((2, 4, 3)))[1]
    lengths = (np.array([4, 3]), np.array([3, 3]))
    Y[1] = 0
    Y[1, :3, :3] = sm.dtw_path(rng.random((3, 3)))[1]
    kw = dict(reg=reg, gamma=0.6, cost=cost, lengths=lengths)
    loss, g = losses.dtw_surrogate(theta, Y, return_grad=True, **kw)
    np.testing.assert_allclose(loss, losses.dtw_surrogate(theta, Y, **kw))
    fd = fd_grad(lambda t: losses.dtw_surrogate(t, Y, **kw).sum(), theta)
    np.testing.assert_allclose(g, fd, atol=1e-6)


@pytest.mark.parametrize("reg", ["negentropy", "l2"])
def test_dtw_relaxed(reg, rng):
    theta = rng.random((2, 4, 5))
    Y = np.zeros_like(theta)
    Y[0] = sm.dtw_path(rng.random((4, 5)))[1]
    Y[1, :3, :4] = sm.dtw_path(rng.random((3, 4)))[1]
    lengths = (np.array([4, 3]), np.array([5, 4]))
    kw = dict(reg=reg, gamma=0.4, lengths=lengths, band=2)
    loss, g = losses.dtw_relaxed(theta, Y, return_grad=True, **kw)
    E = sm.dtw_grad(theta, **kw)[1]
    for b in range(2):
        la, lb = lengths[0][b], lengths[1][b]
        Lmat = np.tril(np.ones((lb, lb)))
        D = (E[b, :la, :lb] - Y[b, :la, :lb]).T
        np.testing.assert_allclose(loss[b], np.sum((Lmat @ D) ** 2), rtol=1e-12)
    fd = fd_grad(lambda t: losses.dtw_relaxed(t, Y, **kw).sum(), theta)
    np.testing.assert_allclose(g, fd, atol=1e-6)
    # zero loss for the hard prediction of a hard target
    Yh = sm.dtw_path(theta[0])[1]
    assert losses.dtw_relaxed(theta[0], Yh, reg="hard") == 0


# ---------------------------------------------------------------------------
# frameworks


def _torch_cases(torch, rng):
    theta_v = torch.tensor(rng.normal(size=(2, 3, 3, 3)), requires_grad=True)
    tags = torch.tensor(rng.integers(0, 3, size=(2, 3)))
    theta_d = torch.tensor(rng.random((2, 3, 4)), requires_grad=True)
    Y = torch.tensor(sm.dtw_path(rng.random((2, 3, 4)))[1])
    return theta_v, tags, theta_d, Y


def test_losses_torch_gradcheck(rng):
    torch = pytest.importorskip("torch")
    pytest.importorskip("smoothmax.torch", reason="smoothmax.torch not available")
    theta_v, tags, theta_d, Y = _torch_cases(torch, rng)
    for reg in ("negentropy", "l2"):
        f = lambda t: losses.viterbi_surrogate(t, tags, reg=reg, cost="hamming")  # noqa: E731
        assert torch.autograd.gradcheck(f, (theta_v,))
        assert torch.autograd.gradgradcheck(f, (theta_v,))
        f = lambda t: losses.viterbi_relaxed(t, tags, reg=reg, divergence="l2")  # noqa: E731
        assert torch.autograd.gradcheck(f, (theta_v,))
        f = lambda t: losses.dtw_surrogate(t, Y, reg=reg, gamma=0.5)  # noqa: E731
        assert torch.autograd.gradcheck(f, (theta_d,))
        assert torch.autograd.gradgradcheck(f, (theta_d,))
        f = lambda t: losses.dtw_relaxed(t, Y, reg=reg, gamma=0.5)  # noqa: E731
        assert torch.autograd.gradcheck(f, (theta_d,))
    f = lambda t: losses.viterbi_relaxed(t, tags, divergence="kl")  # noqa: E731
    assert torch.autograd.gradcheck(f, (theta_v,))
    # the custom gradient agrees with autograd
    loss, g = losses.viterbi_relaxed(theta_v, tags, return_grad=True)
    (ga,) = torch.autograd.grad(losses.viterbi_relaxed(theta_v, tags).sum(), theta_v)
    torch.testing.assert_close(g, ga)


def test_losses_jax_grad(rng):
    jax = pytest.importorskip("jax")
    pytest.importorskip("smoothmax.jax", reason="smoothmax.jax not available")
    import jax.numpy as jnp

    theta_v = rng.normal(size=(2, 3, 3, 3))
    tags = rng.integers(0, 3, size=(2, 3))
    theta_d = rng.random((2, 3, 4))
    Y = sm.dtw_path(rng.random((2, 3, 4)))[1]
    cases = [
        (lambda t: losses.viterbi_surrogate(t, tags, cost="hamming"), theta_v),
        (lambda t: losses.viterbi_relaxed(t, tags), theta_v),
        (lambda t: losses.dtw_surrogate(t, Y, reg="l2", gamma=0.5), theta_d),
        (lambda t: losses.dtw_relaxed(t, Y, gamma=0.5), theta_d),
    ]
    for f, x in cases:
        g = jax.grad(lambda t: jnp.sum(f(t)))(jnp.asarray(x))
        fd = fd_grad(lambda t: float(np.sum(f(t))), x)
        np.testing.assert_allclose(np.asarray(g), fd, atol=1e-6)
    # jit of a surrogate
    f = jax.jit(lambda t: losses.viterbi_surrogate(t, tags))
    np.testing.assert_allclose(np.asarray(f(jnp.asarray(theta_v))), losses.viterbi_surrogate(theta_v, tags))


def test_losses_backends(backend, dtype, rng):
    theta_v = rng.normal(size=(2, 3, 3, 3)).astype(dtype.np)
    tags = rng.integers(0, 3, size=(2, 3))
    theta_d = rng.random((2, 3, 4)).astype(dtype.np)
    Y = sm.dtw_path(rng.random((2, 3, 4)))[1].astype(dtype.np)
    tv, td = backend.asarray(theta_v), backend.asarray(theta_d)
    out = losses.viterbi_surrogate(tv, backend.asarray(tags), cost="hamming")
    dtype.close(backend.check(out, dtype.name, (2,)), losses.viterbi_surrogate(theta_v, tags, cost="hamming"))
    out = losses.viterbi_relaxed(tv, tags)  # tags as NumPy are accepted too
    dtype.close(backend.check(out, dtype.name, (2,)), losses.viterbi_relaxed(theta_v, tags), scale=10)
    out = losses.dtw_surrogate(td, backend.asarray(Y))
    dtype.close(backend.check(out, dtype.name, (2,)), losses.dtw_surrogate(theta_d, Y), scale=10)
    out, g = losses.dtw_relaxed(td, backend.asarray(Y), return_grad=True)
    backend.check(out, dtype.name, (2,))
    backend.check(g, dtype.name, (2, 3, 4))


# ---------------------------------------------------------------------------
# bad input


def test_bad_loss_input(rng):
    theta = rng.normal(size=(3, 2, 2))
    with pytest.raises(ValueError, match="tags must have shape"):
        losses.viterbi_surrogate(theta, np.zeros(4, dtype=int))
    with pytest.raises(ValueError, match="tags must be integers in"):
        losses.viterbi_surrogate(theta, np.array([0, 2, 1]))
    with pytest.raises(TypeError, match="tags must be an integer array"):
        losses.viterbi_surrogate(theta, np.array([0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="cost must be"):
        losses.viterbi_surrogate(theta, np.array([0, 1, 1]), cost="area")
    with pytest.raises(ValueError, match="divergence"):
        losses.viterbi_relaxed(theta, np.array([0, 1, 1]), divergence="js")
    c = rng.random((3, 3))
    with pytest.raises(ValueError, match="Y must be a 0/1"):
        losses.dtw_surrogate(c, np.full((3, 3), 0.5))
    with pytest.raises(ValueError, match="Y must have theta's shape"):
        losses.dtw_relaxed(c, np.eye(2))
    with pytest.raises(ValueError, match="cost must be"):
        losses.dtw_surrogate(c, np.eye(3), cost="hamming")
    with pytest.raises(ValueError, match="cost must be None, a name or an array"):
        losses.dtw_surrogate(c, np.eye(3), cost=np.zeros(2))
