"""smooth_max / smooth_argmax (docs/spec.md §1, paper Lemma 1) on every backend and dtype."""
import math

import numpy as np
import pytest

import smoothmax as sm

import _oracles as O
from conftest import ARRAY_BACKEND_PARAMS, backend_grid

GAMMAS = [0.1, 1.0, 7.5]


def _oracle_rows(x, reg, gamma):
    rows = x.reshape(-1, x.shape[-1])
    vals, qs = zip(*(O.op_value_grad(r, reg, gamma) for r in rows))
    return np.array(vals).reshape(x.shape[:-1]), np.array(qs).reshape(x.shape)


def test_value_and_argmax_match_oracle(array_backend, dtype, reg, rng):
    x = (rng.normal(size=(3, 4, 5)) * 2).astype(dtype.np)
    x[0, 0, 1] = -np.inf
    x[1, 2, :4] = -np.inf
    xb = array_backend.asarray(x)
    for gamma in GAMMAS:
        val_ref, q_ref = _oracle_rows(x.astype(np.float64), reg, gamma)
        val = array_backend.check(sm.smooth_max(xb, reg=reg, gamma=gamma), dtype.name, (3, 4))
        q = array_backend.check(sm.smooth_argmax(xb, reg=reg, gamma=gamma), dtype.name, (3, 4, 5))
        dtype.close(val, val_ref, scale=10, err_msg=f"gamma={gamma}")
        dtype.close(q, q_ref, err_msg=f"gamma={gamma}")
        assert not np.isnan(q).any() and not np.isnan(val).any()


@pytest.mark.parametrize("array_backend,axis", backend_grid([0, 1, -1, -3], [1], params=ARRAY_BACKEND_PARAMS),
                         indirect=["array_backend"])
def test_any_axis(array_backend, dtype, reg, axis, rng):
    x = rng.normal(size=(2, 3, 4)).astype(dtype.np)
    xm = np.moveaxis(x, axis, -1).astype(np.float64)
    val_ref, q_ref = _oracle_rows(xm, reg, 0.8)
    q_ref = np.moveaxis(q_ref, -1, axis)
    xb = array_backend.asarray(x)
    out_shape = tuple(s for k, s in enumerate(x.shape) if k != axis % 3)
    val = array_backend.check(sm.smooth_max(xb, reg=reg, gamma=0.8, axis=axis), dtype.name, out_shape)
    q = array_backend.check(sm.smooth_argmax(xb, reg=reg, gamma=0.8, axis=axis), dtype.name, x.shape)
    dtype.close(val, val_ref)
    dtype.close(q, q_ref)


def test_argmax_is_gradient_of_max(reg, rng):
    """Central finite differences of smooth_max (float64) equal smooth_argmax."""
    x = rng.normal(size=(6,))
    q = sm.smooth_argmax(x, reg=reg, gamma=0.6)
    eps = 1e-6
    fd = np.array([(sm.smooth_max(x + eps * e, reg=reg, gamma=0.6)
                    - sm.smooth_max(x - eps * e, reg=reg, gamma=0.6)) / (2 * eps) for e in np.eye(6)])
    np.testing.assert_allclose(fd, q, atol=1e-7)


@pytest.mark.parametrize("gamma", GAMMAS)
def test_lemma1_bounds_and_simplex(reg, gamma, rng):
    D = 7
    x = rng.normal(size=(200, D)) * rng.choice([0.01, 1, 100], size=(200, 1))
    v = sm.smooth_max(x, reg=reg, gamma=gamma)
    q = sm.smooth_argmax(x, reg=reg, gamma=gamma)
    lo, hi = O.lemma1_bounds(D, reg, gamma)
    m = x.max(axis=-1)
    tol = 1e-12 * (1 + np.abs(m))
    assert np.all(v >= m + lo - tol) and np.all(v <= m + hi + tol)
    assert np.all(q >= 0)
    np.testing.assert_allclose(q.sum(-1), 1.0, rtol=0, atol=1e-12)
    # value = <q, x> - Ω(q) at the maximiser q (definition (1) of the paper)
    if reg == "negentropy":
        omega = gamma * np.sum(np.where(q > 0, q * np.log(np.where(q > 0, q, 1)), 0), axis=-1)
    elif reg == "l2":
        omega = 0.5 * gamma * np.sum(q * q, axis=-1)
    else:
        omega = 0.0
    np.testing.assert_allclose(v, np.sum(q * x, axis=-1) - omega, rtol=1e-10, atol=1e-10)


def test_shift_permutation_monotone(reg, rng):
    x = rng.normal(size=(50, 6))
    g = 0.9
    v = sm.smooth_max(x, reg=reg, gamma=g)
    c = rng.normal(size=(50, 1)) * 10
    np.testing.assert_allclose(sm.smooth_max(x + c, reg=reg, gamma=g), v + c[:, 0], rtol=1e-12, atol=1e-11)
    np.testing.assert_allclose(sm.smooth_argmax(x + c, reg=reg, gamma=g),
                               sm.smooth_argmax(x, reg=reg, gamma=g), atol=1e-10)
    perm = rng.permutation(6)
    np.testing.assert_allclose(sm.smooth_max(x[:, perm], reg=reg, gamma=g), v, rtol=1e-12, atol=1e-12)
    if reg != "hard":  # hard breaks ties by position; no ties occur with continuous x
        np.testing.assert_allclose(sm.smooth_argmax(x[:, perm], reg=reg, gamma=g),
                                   sm.smooth_argmax(x, reg=reg, gamma=g)[:, perm], atol=1e-12)
    y = x + np.abs(rng.normal(size=x.shape))
    assert np.all(sm.smooth_max(y, reg=reg, gamma=g) >= v - 1e-12)


def test_neg_inf_gets_zero_gradient(array_backend, dtype, reg):
    x = np.array([[0.5, -np.inf, 0.2, -np.inf],
                  [-np.inf, -np.inf, 3.0, -np.inf],
                  [-np.inf] * 4], dtype=dtype.np)
    xb = array_backend.asarray(x)
    val = array_backend.check(sm.smooth_max(xb, reg=reg, gamma=0.7), dtype.name, (3,))
    q = array_backend.check(sm.smooth_argmax(xb, reg=reg, gamma=0.7), dtype.name, (3, 4))
    assert not np.isnan(q).any() and not np.isnan(val).any()
    assert np.all(q[np.isinf(x)] == 0.0)
    np.testing.assert_array_equal(q[1], [0, 0, 1, 0])
    # one finite entry: max_Ω(x) = x - Ω(e_k); γ/2 for l2, 0 otherwise
    dtype.close(val[1], 3.0 - (0.35 if reg == "l2" else 0.0))
    assert val[2] == -np.inf
    ref, qref = O.op_value_grad(x[0].astype(np.float64), reg, 0.7)
    dtype.close(val[0], ref)
    dtype.close(q[0], qref)


def test_hard_first_argmax_on_ties(array_backend):
    x = array_backend.asarray(np.array([[1.0, 3.0, 3.0, 2.0], [5.0, 5.0, 5.0, 5.0]]))
    q = array_backend.check(sm.smooth_argmax(x, reg="hard"), "float64", (2, 4))
    np.testing.assert_array_equal(q, [[0, 1, 0, 0], [1, 0, 0, 0]])


def test_l2_is_sparse_and_negentropy_is_dense():
    x = np.array([0.0, 0.1, 5.0, -3.0])
    q = sm.smooth_argmax(x, reg="l2", gamma=1.0)
    np.testing.assert_allclose(q, [0, 0, 1, 0], atol=0)
    q = sm.smooth_argmax(x, reg="l2", gamma=10.0)
    np.testing.assert_allclose(q, O.sparsemax(x / 10.0), atol=1e-15)
    assert (q == 0).sum() == 1
    assert np.all(sm.smooth_argmax(x, reg="negentropy", gamma=1.0) > 0)


@pytest.mark.parametrize("gamma", [1e-4, 1e4])
def test_extreme_magnitudes(dtype, reg, gamma, rng):
    x = (rng.normal(size=(20, 5)) * 1e6).astype(dtype.np)
    v = sm.smooth_max(x, reg=reg, gamma=gamma)
    q = sm.smooth_argmax(x, reg=reg, gamma=gamma)
    assert v.dtype == dtype.np and q.dtype == dtype.np
    assert np.isfinite(v).all() and np.isfinite(q).all()
    lo, hi = O.lemma1_bounds(5, reg, gamma)
    m = x.astype(np.float64).max(-1)
    slack = 1e-5 * np.abs(m) + (1e-9 if dtype.name == "float64" else 1e-6) * gamma
    assert np.all(v >= m + lo - slack) and np.all(v <= m + hi + slack)
    np.testing.assert_allclose(q.sum(-1), 1, rtol=1e-5)


def test_gamma_to_zero_recovers_max(reg, rng):
    x = rng.normal(size=(30, 4))
    for g in [1e-2, 1e-4, 1e-7]:
        lo, hi = O.lemma1_bounds(4, reg, g)
        err = np.abs(sm.smooth_max(x, reg=reg, gamma=g) - x.max(-1))
        assert np.all(err <= max(abs(lo), abs(hi)) + 1e-12)
    q = sm.smooth_argmax(x, reg=reg, gamma=1e-7)
    np.testing.assert_allclose(q, np.eye(4)[x.argmax(-1)], atol=1e-8)


def test_inputs_not_modified(array_backend, reg):
    x = np.array([[0.5, -np.inf, 0.2], [1.0, 2.0, 3.0]])
    xb = array_backend.asarray(x)
    sm.smooth_max(xb, reg=reg)
    sm.smooth_argmax(xb, reg=reg, axis=0)
    np.testing.assert_array_equal(array_backend.to_numpy(xb), x)


def test_negentropy_closed_form():
    x = np.array([1.0, 2.0, 3.0])
    np.testing.assert_allclose(sm.smooth_max(x, gamma=2.0), 2 * math.log(np.exp(x / 2).sum()), rtol=1e-14)


def test_arrays_stay_on_the_callers_device(reg, rng):
    """No intermediate is made on a default device.

    array-api-strict's second device refuses to combine arrays of two devices,
    as torch does with a CUDA tensor and a CPU one; this is how the
    ``torch-cuda`` failures of l2 and hard (an ``arange`` without ``device=``)
    are caught on a CPU-only machine.
    """
    xps = pytest.importorskip("array_api_strict")
    dev = xps.Device("device1")
    x = (rng.normal(size=(3, 5)) * 2).astype(np.float64)
    x[0, 1] = -np.inf
    xd = xps.asarray(x, device=dev)
    val = sm.smooth_max(xd, reg=reg, gamma=0.7)
    q = sm.smooth_argmax(xd, reg=reg, gamma=0.7, axis=0)
    assert val.device == dev and q.device == dev
    cpu = xps.Device("CPU_DEVICE")
    val_ref, _ = _oracle_rows(x, reg, 0.7)
    _, q_ref = _oracle_rows(np.moveaxis(x, 0, -1), reg, 0.7)
    np.testing.assert_allclose(np.asarray(xps.asarray(val, device=cpu)), val_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.moveaxis(np.asarray(xps.asarray(q, device=cpu)), 0, -1), q_ref,
                               rtol=1e-12, atol=1e-12)
