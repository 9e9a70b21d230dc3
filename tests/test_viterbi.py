"""Vit_Ω (docs/spec.md §3) against brute-force enumeration, finite differences and Prop. 2.

Paths include the virtual start state ``y_{-1}`` (``V_{-1} = 0`` for every
state, the authors' convention): a sequence of length ``L`` has ``S^(L+1)``
paths and ``L + 1`` smoothed-max nodes on each (one per step, one final).
"""
import math

import numpy as np
import pytest

import smoothmax as sm

import _oracles as O
from conftest import backend_grid

GAMMA = 0.7
SHAPES = [(1, 1), (4, 1), (1, 3), (2, 2), (3, 3), (4, 3), (4, 2)]


def _call_all(backend, dtype, theta, Z, reg, gamma, **kw):
    tb, Zb = backend.asarray(theta), backend.asarray(Z)
    bs = theta.shape[:-3]
    out = {}
    out["value"] = backend.check(sm.viterbi(tb, reg=reg, gamma=gamma, **kw), dtype.name, bs)
    v, E = sm.viterbi_grad(tb, reg=reg, gamma=gamma, **kw)
    out["value_g"] = backend.check(v, dtype.name, bs)
    out["E"] = backend.check(E, dtype.name, theta.shape)
    out["Edot"] = backend.check(sm.viterbi_hvp(tb, Zb, reg=reg, gamma=gamma, **kw), dtype.name, theta.shape)
    score, tags = sm.viterbi_decode(tb, **kw)
    out["score"] = backend.check(score, dtype.name, bs)
    out["tags"] = backend.check(tags, "int64", theta.shape[:-2])
    return out


def _check_against_brute(out, o, dtype, reg, idx=()):
    scale = 1 + np.abs(o["scores"][np.isfinite(o["scores"])]).max(initial=0)
    dtype.close(out["value"][idx], o["value"], scale, "value vs scalar DP")
    dtype.close(out["value_g"][idx], o["value"], scale, "viterbi_grad value")
    if reg == "negentropy":
        dtype.close(out["value"][idx], o["lse"], scale, "value vs γ·logsumexp(<Y,θ>/γ)")
    if reg == "hard":
        dtype.close(out["value"][idx], o["best"], scale, "hard value vs best path")
    dtype.close(out["E"][idx], o["E"], 1, "E vs Σ p(Y) Y")
    dtype.close(out["Edot"][idx], o["Edot"], 10 / GAMMA, "Edot vs Σ ṗ(Y) Y")
    if reg == "hard":
        assert np.all(out["Edot"][idx] == 0), "hard HVP must be exactly 0"
    dtype.close(out["score"][idx], o["best"], scale, "viterbi_decode score")
    if np.isfinite(o["best"]):
        np.testing.assert_array_equal(out["tags"][idx], o["tags"], err_msg="viterbi_decode tags")


def test_oracle_self_consistency(rng):
    theta, Z = rng.normal(size=(3, 3, 3)), rng.normal(size=(3, 3, 3))
    o = O.viterbi_brute(theta, "negentropy", GAMMA, Z=Z)
    assert abs(o["value"] - o["lse"]) < 1e-12
    assert abs(o["total"] - 1) < 1e-12
    assert len(o["scores"]) == 3 ** 4
    np.testing.assert_allclose(o["Edot"], O.gibbs_hvp(o["scores"], o["Ys"], Z, GAMMA, sign=1), atol=1e-13)


@pytest.mark.parametrize("backend,shape", backend_grid(SHAPES, [(4, 1), (4, 3)], ids=lambda s: f"T{s[0]}S{s[1]}"),
                         indirect=["backend"])
def test_brute_force(backend, dtype, reg, shape, rng):
    T, S = shape
    theta = rng.normal(size=(T, S, S)).astype(dtype.np)
    Z = rng.normal(size=(T, S, S)).astype(dtype.np)
    out = _call_all(backend, dtype, theta, Z, reg, GAMMA)
    o = O.viterbi_brute(theta.astype(np.float64), reg, GAMMA, Z=Z.astype(np.float64))
    _check_against_brute(out, o, dtype, reg)


def test_brute_force_lengths_batched(backend, dtype, reg, rng):
    """Batch shape (2, 4), lengths 1..4 as a backend int array; zeros and -1 past the lengths."""
    T, S = 4, 3
    theta = rng.normal(size=(2, 4, T, S, S)).astype(dtype.np)
    Z = rng.normal(size=theta.shape).astype(dtype.np)
    L = np.array([[1, 2, 3, 4], [4, 3, 2, 1]], dtype=np.int64)
    out = _call_all(backend, dtype, theta, Z, reg, GAMMA, lengths=backend.asarray(L))
    for i in range(2):
        for j in range(4):
            o = O.viterbi_brute(theta[i, j].astype(np.float64), reg, GAMMA, L[i, j], Z=Z[i, j].astype(np.float64))
            _check_against_brute(out, o, dtype, reg, idx=(i, j))
            for key in ("E", "Edot"):
                assert np.all(out[key][i, j, L[i, j]:] == 0), key
            assert np.all(out["tags"][i, j, L[i, j]:] == -1)


def test_neg_inf_masks(backend, dtype, reg, rng):
    """-inf scores are legal masks: a fixed start state, forbidden transitions, unreachable items."""
    B, T, S = 6, 3, 3
    theta = rng.normal(size=(B, T, S, S)).astype(dtype.np)
    Z = rng.normal(size=theta.shape).astype(dtype.np)
    theta[0, 0, :, 1:] = -np.inf  # start state 0
    theta[1, :, 0, 2] = -np.inf  # transition 2 -> 0 forbidden
    theta[1, :, 2, 1] = -np.inf
    theta[2, 1] = -np.inf  # step 1 entirely forbidden: no path
    theta[3, 2, 1:, :] = -np.inf  # last state forced to 0
    theta[4, 0, :, :] = -np.inf
    theta[4, 0, 1, 2] = 0.3  # a single allowed first edge
    theta[5][rng.random(size=(T, S, S)) < 0.5] = -np.inf
    out = _call_all(backend, dtype, theta, Z, reg, GAMMA)
    for key in ("value", "E", "Edot", "score"):
        assert not np.isnan(out[key]).any(), key
    for b in range(B):
        o = O.viterbi_brute(theta[b].astype(np.float64), reg, GAMMA, Z=Z[b].astype(np.float64))
        _check_against_brute(out, o, dtype, reg, idx=b)
        for key in ("E", "Edot"):
            assert np.all(out[key][b][np.isinf(theta[b])] == 0), key
    assert out["value"][2] == -np.inf and out["score"][2] == -np.inf
    assert np.all(out["E"][2] == 0)
    # no feasible path: no tags (-1), as past a length, like DTW's all-zero Y
    np.testing.assert_array_equal(out["tags"][2], -1, err_msg="tags of an infeasible problem")
    assert np.all(out["tags"][3, 2] == 0)


@pytest.mark.parametrize("T", [1, 4])
def test_single_state(T, rng):
    """S = 1: each of the T + 1 nodes has one entry; l2 subtracts γ/2 at each (max_l2(x) = x - γ/2)."""
    theta = rng.normal(size=(T, 1, 1))
    g = 0.3
    np.testing.assert_allclose(sm.viterbi(theta, reg="l2", gamma=g), theta.sum() - (T + 1) * g / 2, rtol=1e-13)
    np.testing.assert_allclose(sm.viterbi(theta, reg="negentropy", gamma=g), theta.sum(), rtol=1e-13)
    np.testing.assert_allclose(sm.viterbi(theta, reg="hard"), theta.sum(), rtol=1e-13)
    for reg in ("negentropy", "l2", "hard"):
        np.testing.assert_array_equal(sm.viterbi_grad(theta, reg=reg, gamma=g)[1], np.ones_like(theta))
        np.testing.assert_array_equal(sm.viterbi_hvp(theta, theta, reg=reg, gamma=g), np.zeros_like(theta))


@pytest.mark.parametrize("backend,batch_shape", backend_grid([(), (2, 3), (0,), (3, 0, 2)], [(2, 3), (3, 0, 2)]),
                         indirect=["backend"])
def test_batch_shapes(backend, dtype, reg, batch_shape, rng):
    shape = batch_shape + (3, 2, 2)
    theta = rng.normal(size=shape).astype(dtype.np)
    Z = rng.normal(size=shape).astype(dtype.np)
    out = _call_all(backend, dtype, theta, Z, reg, GAMMA)
    flat_t, flat_Z = theta.reshape(-1, 3, 2, 2), Z.reshape(-1, 3, 2, 2)
    for b in range(flat_t.shape[0]):
        idx = np.unravel_index(b, batch_shape)
        o = O.viterbi_brute(flat_t[b].astype(np.float64), reg, GAMMA, Z=flat_Z[b].astype(np.float64))
        _check_against_brute(out, o, dtype, reg, idx=idx)


def test_lengths_broadcast_and_list(reg, rng):
    theta = rng.normal(size=(2, 3, 4, 2, 2))
    v = sm.viterbi(theta, reg=reg, gamma=GAMMA, lengths=2)
    np.testing.assert_allclose(v, sm.viterbi(theta[..., :2, :, :], reg=reg, gamma=GAMMA), rtol=1e-13)
    v = sm.viterbi(theta, reg=reg, gamma=GAMMA, lengths=[[1, 2, 3], [4, 4, 1]])
    for i, row in enumerate([[1, 2, 3], [4, 4, 1]]):
        for j, L in enumerate(row):
            np.testing.assert_allclose(v[i, j], O.viterbi_dp(theta[i, j], reg, GAMMA, L)[0], rtol=1e-12)


# ---------------------------------------------------------------------------
# finite differences on sizes beyond enumeration


@pytest.mark.parametrize("lengths", [None, [7, 3, 1]], ids=["full", "lengths"])
@pytest.mark.parametrize("reg_fd", ["negentropy", "l2", "hard"])
def test_finite_differences(reg_fd, lengths, rng):
    theta = rng.normal(size=(3, 7, 5, 5))
    theta[0, 2, 1, :] = -np.inf
    Z = rng.normal(size=theta.shape)
    eps = 1e-6
    kw = dict(reg=reg_fd, gamma=GAMMA, lengths=lengths)
    v, E = sm.viterbi_grad(theta, **kw)
    fd = (sm.viterbi(theta + eps * Z, **kw) - sm.viterbi(theta - eps * Z, **kw)) / (2 * eps)
    np.testing.assert_allclose(fd, np.sum(np.where(E > 0, E * Z, 0), axis=(1, 2, 3)), rtol=1e-6, atol=1e-7)
    Edot = sm.viterbi_hvp(theta, Z, **kw)
    if reg_fd == "hard":
        assert np.all(Edot == 0)
        return
    Ep = sm.viterbi_grad(theta + eps * Z, **kw)[1]
    Em = sm.viterbi_grad(theta - eps * Z, **kw)[1]
    np.testing.assert_allclose((Ep - Em) / (2 * eps), Edot, atol=1e-6)
    assert np.abs(Edot).max() > 1e-3


def test_hessian_symmetric_positive_semidefinite(reg, rng):
    theta = rng.normal(size=(3, 6, 4, 4))
    Z1, Z2 = rng.normal(size=theta.shape), rng.normal(size=theta.shape)
    H1 = sm.viterbi_hvp(theta, Z1, reg=reg, gamma=GAMMA)
    H2 = sm.viterbi_hvp(theta, Z2, reg=reg, gamma=GAMMA)
    ax = (1, 2, 3)
    np.testing.assert_allclose(np.sum(Z2 * H1, axis=ax), np.sum(Z1 * H2, axis=ax), rtol=1e-9, atol=1e-12)
    assert np.all(np.sum(Z1 * H1, axis=ax) >= -1e-12)


def test_marginals_are_distributions(reg, rng):
    theta = rng.normal(size=(4, 6, 3, 3))
    L = np.array([6, 5, 2, 1])
    E = sm.viterbi_grad(theta, reg=reg, gamma=GAMMA, lengths=L)[1]
    assert np.all(E >= 0) and np.all(E <= 1 + 1e-12)
    sums = E.sum(axis=(2, 3))
    for b in range(4):
        np.testing.assert_allclose(sums[b, :L[b]], 1, atol=1e-12)
        # consistency of pairwise marginals: Σ_j E[t, i, j] = Σ_k E[t+1, k, i]
        unary = E[b].sum(-1)
        np.testing.assert_allclose(unary[:L[b] - 1], E[b, 1:L[b]].sum(1), atol=1e-12)


# ---------------------------------------------------------------------------
# Prop. 2 and the γ -> 0 limit


def viterbi_bounds(hard, reg, gamma, S, L):
    """Vit_Ω - LP in (L + 1)·[lo, hi] (Lemma 1 with D = S at each of the L + 1 nodes)."""
    lo, hi = O.lemma1_bounds(S, reg, gamma)
    return hard + (L + 1) * lo, hard + (L + 1) * hi


@pytest.mark.parametrize("gamma", [0.01, 1.0, 10.0])
def test_prop2_bounds(reg, gamma, rng):
    theta = rng.normal(size=(20, 9, 4, 4)) * rng.choice([0.1, 1, 10], size=(20, 1, 1, 1))
    L = rng.integers(1, 10, size=20)
    v = sm.viterbi(theta, reg=reg, gamma=gamma, lengths=L)
    h = sm.viterbi(theta, reg="hard", lengths=L)
    lo, hi = viterbi_bounds(h, reg, gamma, 4, L)
    tol = 1e-10 * (1 + np.abs(h))
    assert np.all(v >= lo - tol) and np.all(v <= hi + tol)
    # and the hard value is the best path of the enumeration
    t = theta[0, :3, :3, :3]
    assert abs(sm.viterbi(t, reg="hard") - O.viterbi_brute(t, "hard", 1.0)["best"]) < 1e-10


def test_prop2_convex_along_lines(reg, rng):
    theta = rng.normal(size=(4, 5, 3, 3))
    theta[:, 1, 0, :] = -np.inf
    Z = rng.normal(size=theta.shape)
    ts = np.linspace(-2, 2, 41)
    f = np.stack([sm.viterbi(theta + t * Z, reg=reg, gamma=GAMMA) for t in ts])
    second = f[:-2] - 2 * f[1:-1] + f[2:]
    assert np.all(second >= -1e-10 * (1 + np.abs(f[1:-1])))
    if reg == "negentropy":
        assert np.all(second > 0)


def test_gamma_to_zero_recovers_hard(backend, reg, rng):
    theta = rng.normal(size=(3, 6, 4, 4))
    tb = backend.asarray(theta)
    score, tags = (backend.to_numpy(a) for a in sm.viterbi_decode(tb))
    v, E = (backend.to_numpy(a) for a in sm.viterbi_grad(tb, reg=reg, gamma=1e-5))
    np.testing.assert_allclose(v, score, atol=1e-5 * 7 * math.log(4) + 1e-12)
    np.testing.assert_array_equal(E.sum(-1).argmax(-1), tags)
    np.testing.assert_allclose(E.max(axis=(-2, -1)), 1, atol=1e-6)


def test_hard_ties_first_argmax():
    score, tags = sm.viterbi_decode(np.zeros((3, 2, 2)))
    np.testing.assert_array_equal(tags, [0, 0, 0])
    E = sm.viterbi_grad(np.zeros((2, 2, 2)), reg="hard")[1]
    np.testing.assert_array_equal(E, [[[1, 0], [0, 0]], [[1, 0], [0, 0]]])


def test_crf_semantics_gamma_one(rng):
    """negentropy, γ = 1: the CRF log-partition with p(y) ∝ exp(score); E holds p(y_t=i, y_{t-1}=j)."""
    theta = rng.normal(size=(3, 2, 2))
    v, E = sm.viterbi_grad(theta, reg="negentropy", gamma=1.0)
    o = O.viterbi_brute(theta, "hard", 1.0)
    p = np.exp(o["scores"] - v)
    assert abs(p.sum() - 1) < 1e-12
    np.testing.assert_allclose(E, np.tensordot(p, np.asarray(o["Ys"]), axes=1), atol=1e-13)


def test_inputs_not_modified(backend, reg, rng):
    theta = rng.normal(size=(2, 3, 2, 2))
    theta[0, 1, 0, 1] = -np.inf
    Z = rng.normal(size=theta.shape)
    L = np.array([3, 2])
    tb, Zb = backend.asarray(theta), backend.asarray(Z)
    sm.viterbi(tb, reg=reg, lengths=L)
    sm.viterbi_grad(tb, reg=reg)
    sm.viterbi_hvp(tb, Zb, reg=reg, lengths=L)
    sm.viterbi_decode(tb, lengths=L)
    np.testing.assert_array_equal(backend.to_numpy(tb), theta)
    np.testing.assert_array_equal(backend.to_numpy(Zb), Z)
    np.testing.assert_array_equal(L, [3, 2])
