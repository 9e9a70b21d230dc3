"""DTW_Ω (docs/spec.md §4) against brute-force enumeration, finite differences and Prop. 2.

Every test that goes through ``backend`` runs on every installed backend and
checks namespace, dtype, shape and device of each output (``Backend.check``).
The oracles (``tests/_oracles.py``) enumerate every alignment of tiny
instances; ``E`` must equal ``Σ_Y p(Y)·Y`` with ``p(Y)`` the product of the
local ``q`` along ``Y``, and the HVP ``Σ_Y ṗ(Y)·Y`` (product rule).
"""
import math

import numpy as np
import pytest

import smoothmax as sm

import _oracles as O
from conftest import backend_grid

GAMMA = 0.7
SHAPES = [(1, 1), (1, 4), (4, 1), (2, 3), (3, 2), (3, 4), (4, 4)]


def _call_all(backend, dtype, theta, Z, reg, gamma, **kw):
    """Run the four public functions; check and return NumPy outputs."""
    tb, Zb = backend.asarray(theta), backend.asarray(Z)
    bs = theta.shape[:-2]
    out = {}
    out["value"] = backend.check(sm.dtw(tb, reg=reg, gamma=gamma, **kw), dtype.name, bs)
    v, E = sm.dtw_grad(tb, reg=reg, gamma=gamma, **kw)
    out["value_g"] = backend.check(v, dtype.name, bs)
    out["E"] = backend.check(E, dtype.name, theta.shape)
    out["Edot"] = backend.check(sm.dtw_hvp(tb, Zb, reg=reg, gamma=gamma, **kw), dtype.name, theta.shape)
    cost, Y = sm.dtw_path(tb, **kw)
    out["cost"] = backend.check(cost, dtype.name, bs)
    out["Y"] = backend.check(Y, dtype.name, theta.shape)
    return out


def _check_against_brute(out, oracles, dtype, reg, idx=()):
    o = oracles
    scale = 1 + np.abs(o["scores"]).max() if o["scores"] else 1
    dtype.close(out["value"][idx], o["value"], scale, "value vs scalar DP")
    dtype.close(out["value_g"][idx], o["value"], scale, "dtw_grad value")
    if reg == "negentropy":
        dtype.close(out["value"][idx], o["lse"], scale, "value vs -γ·logsumexp(-<Y,θ>/γ)")
    if reg == "hard":
        dtype.close(out["value"][idx], o["best"], scale, "hard value vs best path")
    dtype.close(out["E"][idx], o["E"], 1, "E vs Σ p(Y) Y")
    dtype.close(out["Edot"][idx], o["Edot"], 10 / GAMMA, "Edot vs Σ ṗ(Y) Y")
    if reg == "hard":
        assert np.all(out["Edot"][idx] == 0), "hard HVP must be exactly 0"
    dtype.close(out["cost"][idx], o["best"], scale, "dtw_path cost")
    np.testing.assert_array_equal(out["Y"][idx], o["Ybest"], err_msg="dtw_path alignment")


def test_oracle_self_consistency(rng):
    """The oracles agree with each other: DP vs enumeration, product rule vs Gibbs covariance."""
    theta, Z = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    o = O.dtw_brute(theta, "negentropy", GAMMA, Z=Z)
    assert abs(o["value"] - o["lse"]) < 1e-12
    assert abs(o["total"] - 1) < 1e-12
    p = np.exp(-np.array(o["scores"]) / GAMMA)
    np.testing.assert_allclose(o["probs"], p / p.sum(), atol=1e-14)  # Gibbs distribution
    np.testing.assert_allclose(o["Edot"], O.gibbs_hvp(o["scores"], o["Ys"], Z, GAMMA, sign=-1), atol=1e-13)
    assert len(O.dtw_paths(4, 4)) == 63  # Delannoy number D(3, 3)


@pytest.mark.parametrize("backend,shape", backend_grid(SHAPES, [(4, 1), (3, 4)], ids=lambda s: f"{s[0]}x{s[1]}"),
                         indirect=["backend"])
def test_brute_force(backend, dtype, reg, shape, rng):
    theta = rng.normal(size=shape).astype(dtype.np)
    Z = rng.normal(size=shape).astype(dtype.np)
    out = _call_all(backend, dtype, theta, Z, reg, GAMMA)
    o = O.dtw_brute(theta.astype(np.float64), reg, GAMMA, Z=Z.astype(np.float64))
    _check_against_brute(out, o, dtype, reg)


def _length_grid():
    return [(la, lb) for la in range(1, 5) for lb in range(1, 5)]


@pytest.mark.parametrize("form", ["tuple", "array"])
def test_brute_force_lengths_batched(backend, dtype, reg, form, rng):
    """One batched call over every (len_a, len_b) in 1..4 x 1..4 of a 4x4 problem."""
    pairs = _length_grid()
    B = len(pairs)
    theta = rng.normal(size=(B, 4, 4)).astype(dtype.np)
    Z = rng.normal(size=(B, 4, 4)).astype(dtype.np)
    la = np.array([p[0] for p in pairs], dtype=np.int64)
    lb = np.array([p[1] for p in pairs], dtype=np.int64)
    if form == "tuple":
        lengths = (backend.asarray(la), backend.asarray(lb))
    else:
        lengths = backend.asarray(np.stack([la, lb], axis=-1))
    out = _call_all(backend, dtype, theta, Z, reg, GAMMA, lengths=lengths)
    for b, (na, nb) in enumerate(pairs):
        o = O.dtw_brute(theta[b].astype(np.float64), reg, GAMMA, na, nb, Z=Z[b].astype(np.float64))
        _check_against_brute(out, o, dtype, reg, idx=b)
        for key in ("E", "Edot", "Y"):  # exact zeros past the lengths
            assert np.all(out[key][b, na:, :] == 0) and np.all(out[key][b, :, nb:] == 0), key


def test_sakoe_chiba_oracle_matches_tslearn():
    tslearn_metrics = pytest.importorskip("tslearn.metrics", reason="tslearn not installed (bench extra)")
    for n in range(1, 7):
        for m in range(1, 7):
            for r in range(0, 6):
                np.testing.assert_array_equal(
                    O.sakoe_chiba(n, m, r), np.asarray(tslearn_metrics.sakoe_chiba_mask(n, m, r), dtype=bool),
                    err_msg=f"n={n} m={m} r={r}")


@pytest.mark.parametrize("backend,band", backend_grid([0, 1, 2], [1]), indirect=["backend"])
def test_brute_force_band_and_lengths(backend, dtype, reg, band, rng):
    pairs = _length_grid()
    B = len(pairs)
    theta = rng.normal(size=(B, 4, 4)).astype(dtype.np)
    Z = rng.normal(size=(B, 4, 4)).astype(dtype.np)
    la = np.array([p[0] for p in pairs])
    lb = np.array([p[1] for p in pairs])
    out = _call_all(backend, dtype, theta, Z, reg, GAMMA, lengths=(la, lb), band=band)
    for b, (na, nb) in enumerate(pairs):
        o = O.dtw_brute(theta[b].astype(np.float64), reg, GAMMA, na, nb, band=band, Z=Z[b].astype(np.float64))
        _check_against_brute(out, o, dtype, reg, idx=b)
        outside = ~O.dtw_allowed(theta[b], na, nb, band)
        for key in ("E", "Edot", "Y"):
            assert np.all(out[key][b][outside] == 0), f"{key} nonzero outside band (la={na}, lb={nb})"


def test_band_without_lengths_uses_full_shape(np_backend, reg, rng):
    """band with N != M: exactly the cells of the (NA, NB) Sakoe-Chiba mask are used."""
    theta = rng.normal(size=(3, 5))
    out = _call_all(np_backend, _F64, theta, rng.normal(size=(3, 5)), reg, GAMMA, band=1)
    o = O.dtw_brute(theta, reg, GAMMA, band=1, Z=None)
    _F64.close(out["value"], o["value"])
    _F64.close(out["E"], o["E"])


def test_inf_cost_masks(backend, dtype, reg, rng):
    """+inf costs are legal masks: enumeration over the remaining paths, exact zeros, no NaN."""
    B = 12
    theta = rng.normal(size=(B, 4, 3)).astype(dtype.np)
    Z = rng.normal(size=(B, 4, 3)).astype(dtype.np)
    for b in range(B):
        k = b % 4 + 1
        cells = rng.choice(12, size=k, replace=False)
        theta[b].flat[cells] = np.inf
    theta[0, 0, 0] = np.inf  # start forbidden: unreachable
    theta[1, 3, 2] = np.inf  # end forbidden: unreachable
    theta[2, 1, :] = np.inf  # a full row: unreachable
    out = _call_all(backend, dtype, theta, Z, reg, GAMMA)
    for key in ("value", "E", "Edot", "cost", "Y"):
        assert not np.isnan(out[key]).any(), key
    for b in range(B):
        o = O.dtw_brute(theta[b].astype(np.float64), reg, GAMMA, Z=Z[b].astype(np.float64))
        if not o["scores"]:
            assert out["value"][b] == np.inf and out["cost"][b] == np.inf
            for key in ("E", "Edot", "Y"):
                assert np.all(out[key][b] == 0), key
            continue
        _check_against_brute(out, o, dtype, reg, idx=b)
        for key in ("E", "Edot", "Y"):
            assert np.all(out[key][b][np.isinf(theta[b])] == 0), key
    assert out["value"][0] == np.inf and out["value"][1] == np.inf and out["value"][2] == np.inf


@pytest.mark.parametrize("NA,NB", [(1, 1), (1, 5), (5, 1)])
def test_single_predecessor_cells(NA, NB, rng):
    """With one finite predecessor, l2 adds γ/2 per cell; negentropy and hard add nothing."""
    theta = rng.normal(size=(NA, NB))
    g = 0.3
    K = NA * NB  # every cell is on the single path
    np.testing.assert_allclose(sm.dtw(theta, reg="l2", gamma=g), theta.sum() + K * g / 2, rtol=1e-13)
    np.testing.assert_allclose(sm.dtw(theta, reg="negentropy", gamma=g), theta.sum(), rtol=1e-13)
    np.testing.assert_allclose(sm.dtw(theta, reg="hard"), theta.sum(), rtol=1e-13)
    for reg in ("negentropy", "l2", "hard"):
        np.testing.assert_array_equal(sm.dtw_grad(theta, reg=reg, gamma=g)[1], np.ones((NA, NB)))
        np.testing.assert_array_equal(sm.dtw_hvp(theta, theta, reg=reg, gamma=g), np.zeros((NA, NB)))


@pytest.mark.parametrize("backend,batch_shape", backend_grid([(), (2, 3), (1, 2, 1), (0,), (2, 0)], [(), (1, 2, 1), (2, 0)]),
                         indirect=["backend"])
def test_batch_shapes(backend, dtype, reg, batch_shape, rng):
    """Leading dims of any rank, including none and size 0; each item equals its unbatched call."""
    shape = batch_shape + (3, 4)
    theta = rng.normal(size=shape).astype(dtype.np)
    Z = rng.normal(size=shape).astype(dtype.np)
    out = _call_all(backend, dtype, theta, Z, reg, GAMMA)
    flat_t = theta.reshape(-1, 3, 4)
    flat_Z = Z.reshape(-1, 3, 4)
    for b in range(flat_t.shape[0]):
        idx = np.unravel_index(b, batch_shape)
        o = O.dtw_brute(flat_t[b].astype(np.float64), reg, GAMMA, Z=flat_Z[b].astype(np.float64))
        _check_against_brute(out, o, dtype, reg, idx=idx)


def test_batch_lengths_broadcast(np_backend, reg, rng):
    """Per-item lengths of shape (..., 2) over a rank-2 batch, and scalar lengths broadcast."""
    theta = rng.normal(size=(2, 3, 4, 4))
    lengths = rng.integers(1, 5, size=(2, 3, 2))
    v, E = sm.dtw_grad(theta, reg=reg, gamma=GAMMA, lengths=lengths)
    for i in range(2):
        for j in range(3):
            o = O.dtw_brute(theta[i, j], reg, GAMMA, *lengths[i, j])
            _F64.close(v[i, j], o["value"])
            _F64.close(E[i, j], o["E"])
    v2 = sm.dtw(theta, reg=reg, gamma=GAMMA, lengths=(3, 2))
    np.testing.assert_allclose(v2, sm.dtw(theta[..., :3, :2], reg=reg, gamma=GAMMA), rtol=1e-13)


class _F64Tol:
    name = "float64"
    np = np.dtype("float64")

    @staticmethod
    def close(actual, expected, scale=1.0, err_msg=""):
        np.testing.assert_allclose(np.asarray(actual, float), np.asarray(expected, float),
                                   rtol=1e-10, atol=1e-10 * scale, err_msg=err_msg)


_F64 = _F64Tol()


# ---------------------------------------------------------------------------
# finite differences on sizes beyond enumeration


@pytest.mark.parametrize("kw", [{}, {"band": 2}, {"lengths": ([7, 4], [9, 5])}], ids=["full", "band", "lengths"])
@pytest.mark.parametrize("reg_fd", ["negentropy", "l2", "hard"])
def test_finite_differences(reg_fd, kw, rng):
    theta = rng.normal(size=(2, 7, 9))
    Z = rng.normal(size=theta.shape)
    eps = 1e-6
    v, E = sm.dtw_grad(theta, reg=reg_fd, gamma=GAMMA, **kw)
    vp = sm.dtw(theta + eps * Z, reg=reg_fd, gamma=GAMMA, **kw)
    vm = sm.dtw(theta - eps * Z, reg=reg_fd, gamma=GAMMA, **kw)
    np.testing.assert_allclose((vp - vm) / (2 * eps), np.sum(E * Z, axis=(-2, -1)), rtol=1e-6, atol=1e-7)
    Edot = sm.dtw_hvp(theta, Z, reg=reg_fd, gamma=GAMMA, **kw)
    if reg_fd == "hard":
        assert np.all(Edot == 0)
        return
    Ep = sm.dtw_grad(theta + eps * Z, reg=reg_fd, gamma=GAMMA, **kw)[1]
    Em = sm.dtw_grad(theta - eps * Z, reg=reg_fd, gamma=GAMMA, **kw)[1]
    np.testing.assert_allclose((Ep - Em) / (2 * eps), Edot, atol=1e-6)
    assert np.abs(Edot).max() > 1e-3  # the check is not vacuous


def test_hessian_symmetric_negative_semidefinite(reg, rng):
    """DTW_Ω is concave in θ (min convention): <Z, H Z> <= 0, and <Z1, H Z2> = <Z2, H Z1>."""
    theta = rng.normal(size=(3, 6, 5))
    Z1, Z2 = rng.normal(size=theta.shape), rng.normal(size=theta.shape)
    H1 = sm.dtw_hvp(theta, Z1, reg=reg, gamma=GAMMA)
    H2 = sm.dtw_hvp(theta, Z2, reg=reg, gamma=GAMMA)
    np.testing.assert_allclose(np.sum(Z2 * H1, axis=(1, 2)), np.sum(Z1 * H2, axis=(1, 2)), rtol=1e-9, atol=1e-12)
    assert np.all(np.sum(Z1 * H1, axis=(1, 2)) <= 1e-12)


# ---------------------------------------------------------------------------
# Prop. 2 and the γ -> 0 limit


def dtw_bounds(hard, reg, gamma, kmin, kmax):
    """DTW_Ω - DTW_hard in [-hi·K, -lo·K] (Lemma 1 per cell, D = 3), K the path length."""
    lo, hi = O.lemma1_bounds(3, reg, gamma)
    return hard + min(-hi * kmin, -hi * kmax), hard + max(-lo * kmin, -lo * kmax)


@pytest.mark.parametrize("gamma", [0.01, 1.0, 10.0])
def test_prop2_bounds(reg, gamma, rng):
    theta = rng.normal(size=(20, 6, 8)) * rng.choice([0.1, 1, 10], size=(20, 1, 1))
    v = sm.dtw(theta, reg=reg, gamma=gamma)
    h = sm.dtw(theta, reg="hard")
    lo, hi = dtw_bounds(h, reg, gamma, 8, 6 + 8 - 1)
    tol = 1e-10 * (1 + np.abs(h))
    assert np.all(v >= lo - tol) and np.all(v <= hi + tol)
    # brute-force small case: bounds with the exact path lengths, and DP_Ω <= LP_Ω (paper §2.2)
    for b in range(5):
        t = theta[b, :3, :4]
        o = O.dtw_brute(t, reg, gamma)
        lo, hi = dtw_bounds(o["best"], reg, gamma, *o["pathlen"])
        val = sm.dtw(t, reg=reg, gamma=gamma)
        assert lo - 1e-10 <= val <= hi + 1e-10


def test_prop2_concave_along_lines(reg, rng):
    theta = rng.normal(size=(4, 5, 6))
    Z = rng.normal(size=theta.shape)
    ts = np.linspace(-2, 2, 41)
    f = np.stack([sm.dtw(theta + t * Z, reg=reg, gamma=GAMMA) for t in ts])
    second = f[:-2] - 2 * f[1:-1] + f[2:]
    assert np.all(second <= 1e-10 * (1 + np.abs(f[1:-1])))
    if reg == "negentropy":
        assert np.all(second < 0)  # strictly concave: the check has teeth


def test_gamma_to_zero_recovers_hard(backend, reg, rng):
    theta = rng.normal(size=(3, 5, 6))
    tb = backend.asarray(theta)
    cost, Y = sm.dtw_path(tb)
    cost, Y = backend.to_numpy(cost), backend.to_numpy(Y)
    v, E = sm.dtw_grad(tb, reg=reg, gamma=1e-5)
    v, E = backend.to_numpy(v), backend.to_numpy(E)
    np.testing.assert_allclose(v, cost, atol=1e-5 * 3 * math.log(3) * 11)
    np.testing.assert_allclose(E, Y, atol=1e-6)
    assert set(np.unique(Y)) <= {0.0, 1.0}


def test_hard_ties_first_of_up_left_diagonal():
    """Equal costs everywhere: ties go to up, then left, then diagonal (docs/engines.md)."""
    cost, Y = sm.dtw_path(np.zeros((3, 3)))
    # from the end cell (2,2), walking back: up first -> (1,2), (0,2), then left -> (0,1), (0,0)
    np.testing.assert_array_equal(Y, [[1, 1, 1], [0, 0, 1], [0, 0, 1]])
    assert cost == 0


def test_inputs_not_modified(backend, reg, rng):
    theta = rng.normal(size=(2, 3, 4))
    theta[0, 1, 1] = np.inf
    Z = rng.normal(size=theta.shape)
    tb, Zb = backend.asarray(theta), backend.asarray(Z)
    la = np.array([3, 2])
    lengths = (la, np.array([4, 3]))
    sm.dtw(tb, reg=reg, lengths=lengths)
    sm.dtw_grad(tb, reg=reg, band=1)
    sm.dtw_hvp(tb, Zb, reg=reg)
    sm.dtw_path(tb)
    np.testing.assert_array_equal(backend.to_numpy(tb), theta)
    np.testing.assert_array_equal(backend.to_numpy(Zb), Z)
    np.testing.assert_array_equal(la, [3, 2])
