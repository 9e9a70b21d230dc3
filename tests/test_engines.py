"""The compiled engine (smoothmax._core) against the reference engine, directly.

Both follow ``docs/engines.md``: flat ``(B, ...)`` C-contiguous arrays, int64
lengths, ``reg`` as an int code, ``band = -1`` for no band. The reference
engine is itself checked against brute force in test_dtw/test_viterbi; here
the compiled one must match it on moderate sizes where enumeration is out of
reach, with masks, bands and lengths, in both dtypes.
"""
import numpy as np
import pytest

from smoothmax import _reference as ref

core_dtw = pytest.importorskip("smoothmax._core.dtw", reason="compiled engine smoothmax._core.dtw not built")
core_vit = pytest.importorskip("smoothmax._core.viterbi", reason="compiled engine smoothmax._core.viterbi not built")

REG_CODES = {"negentropy": 0, "l2": 1, "hard": 2}


def _tol(dtype):
    return dict(rtol=1e-10, atol=1e-10) if dtype == np.float64 else dict(rtol=2e-4, atol=2e-4)


def _assert_same(a, b, dtype, name, scale=1.0):
    assert a.dtype == dtype, f"{name}: dtype {a.dtype}"
    assert a.shape == b.shape, f"{name}: shape {a.shape} vs {b.shape}"
    t = _tol(dtype)
    np.testing.assert_allclose(a, b, rtol=t["rtol"], atol=t["atol"] * scale, err_msg=name)


def _dtw_problem(rng, dtype, B=3, NA=17, NB=23, masks=True):
    theta = (rng.normal(size=(B, NA, NB)) ** 2).astype(dtype)
    Z = rng.normal(size=theta.shape).astype(dtype)
    if masks:
        theta[0][rng.random(size=(NA, NB)) < 0.1] = np.inf
    la = rng.integers(1, NA + 1, size=B).astype(np.int64)
    lb = rng.integers(1, NB + 1, size=B).astype(np.int64)
    la[0], lb[0] = NA, NB
    return theta, Z, la, lb


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("reg", list(REG_CODES))
@pytest.mark.parametrize("band", [-1, 0, 3], ids=["noband", "band0", "band3"])
def test_dtw_compiled_matches_reference(reg, dtype, band, rng):
    theta, Z, la, lb = _dtw_problem(rng, dtype)
    keep = theta.copy(), Z.copy(), la.copy(), lb.copy()
    code = REG_CODES[reg]
    g = 0.6
    v1 = core_dtw.dtw_value(theta, la, lb, band, code, g)
    v2 = ref.dtw_value(theta, la, lb, band, code, g)
    np.testing.assert_array_equal(np.isinf(v1), np.isinf(v2))
    fin = np.isfinite(v2)
    assert fin.sum() >= 2  # the unmasked items at least: E is compared where it is not all 0
    _assert_same(v1[fin], v2[fin], dtype, "value", scale=100)
    (g1, E1), (g2, E2) = core_dtw.dtw_grad(theta, la, lb, band, code, g), ref.dtw_grad(theta, la, lb, band, code, g)
    _assert_same(E1, E2, dtype, "E")
    h1, h2 = core_dtw.dtw_hvp(theta, Z, la, lb, band, code, g), ref.dtw_hvp(theta, Z, la, lb, band, code, g)
    _assert_same(h1[1], h2[1], dtype, "hvp E")
    _assert_same(h1[2], h2[2], dtype, "Edot", scale=10 / g)
    assert not np.isnan(h1[2]).any()
    c1, Y1 = core_dtw.dtw_path(theta, la, lb, band)
    c2, Y2 = ref.dtw_path(theta, la, lb, band)
    np.testing.assert_array_equal(np.isinf(c1), np.isinf(c2))
    _assert_same(c1[np.isfinite(c2)], c2[np.isfinite(c2)], dtype, "path cost", scale=100)
    if dtype == np.float64:
        np.testing.assert_array_equal(Y1, Y2)
    for b in range(theta.shape[0]):  # exact zeros past the lengths and on +inf cells
        for out in (E1[b], h1[2][b], Y1[b]):
            assert np.all(out[la[b]:] == 0) and np.all(out[:, lb[b]:] == 0)
            assert np.all(out[np.isinf(theta[b])] == 0)
    for a, k in zip((theta, Z, la, lb), keep):
        np.testing.assert_array_equal(a, k)  # engines never write their inputs


def _vit_problem(rng, dtype, B=3, T=17, S=5):
    theta = rng.normal(size=(B, T, S, S)).astype(dtype)
    theta[0][rng.random(size=(T, S, S)) < 0.2] = -np.inf
    if S > 1:
        theta[1, :, 0, 1] = -np.inf
    Z = rng.normal(size=theta.shape).astype(dtype)
    L = rng.integers(1, T + 1, size=B).astype(np.int64)
    L[0] = T
    return theta, Z, L


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("reg", list(REG_CODES))
@pytest.mark.parametrize("S", [1, 5, 33])
def test_viterbi_compiled_matches_reference(reg, dtype, S, rng):
    theta, Z, L = _vit_problem(rng, dtype, S=S)
    keep = theta.copy(), Z.copy(), L.copy()
    code = REG_CODES[reg]
    g = 0.6
    v1, v2 = core_vit.viterbi_value(theta, L, code, g), ref.viterbi_value(theta, L, code, g)
    np.testing.assert_array_equal(np.isinf(v1), np.isinf(v2))
    fin = np.isfinite(v2)
    assert fin.sum() >= 2  # the unmasked items at least: E is compared where it is not all 0
    _assert_same(v1[fin], v2[fin], dtype, "value", scale=100)
    (_, E1), (_, E2) = core_vit.viterbi_grad(theta, L, code, g), ref.viterbi_grad(theta, L, code, g)
    _assert_same(E1, E2, dtype, "E")
    h1, h2 = core_vit.viterbi_hvp(theta, Z, L, code, g), ref.viterbi_hvp(theta, Z, L, code, g)
    _assert_same(h1[2], h2[2], dtype, "Edot", scale=10 / g)
    s1, t1 = core_vit.viterbi_decode(theta, L)
    s2, t2 = ref.viterbi_decode(theta, L)
    assert t1.dtype == np.int64
    _assert_same(s1[fin], s2[fin], dtype, "decode score", scale=100)
    if dtype == np.float64:
        np.testing.assert_array_equal(t1, t2)
    for b in range(theta.shape[0]):
        assert np.all(E1[b, L[b]:] == 0) and np.all(h1[2][b, L[b]:] == 0)
        assert np.all(t1[b, L[b]:] == -1)
        assert np.all(E1[b][np.isinf(theta[b])] == 0)
    for a, k in zip((theta, Z, L), keep):
        np.testing.assert_array_equal(a, k)


def test_empty_batch():
    th = np.zeros((0, 4, 5))
    la = lb = np.zeros(0, dtype=np.int64)
    assert core_dtw.dtw_value(th, la, lb, -1, 0, 1.0).shape == (0,)
    assert core_dtw.dtw_hvp(th, th, la, lb, -1, 1, 1.0)[2].shape == (0, 4, 5)
    tv = np.zeros((0, 3, 2, 2))
    assert core_vit.viterbi_grad(tv, np.zeros(0, dtype=np.int64), 0, 1.0)[1].shape == (0, 3, 2, 2)


def test_batch_items_are_independent(rng):
    """Batch-parallel kernels: each item equals its own single-item call."""
    theta, Z, la, lb = _dtw_problem(rng, np.float64, B=9, NA=12, NB=10)
    v, E = core_dtw.dtw_grad(theta, la, lb, 2, 0, 0.5)
    for b in range(9):
        vb, Eb = core_dtw.dtw_grad(theta[b:b + 1].copy(), la[b:b + 1].copy(), lb[b:b + 1].copy(), 2, 0, 0.5)
        np.testing.assert_array_equal(v[b:b + 1], vb)
        np.testing.assert_array_equal(E[b:b + 1], Eb)


@pytest.mark.parametrize("reg", list(REG_CODES))
def test_float32_agrees_with_float64_large(reg):
    """512 x 512 soft-DTW on real-valued squared distances: float32 stays close to float64."""
    rng = np.random.default_rng(0)
    a = np.cumsum(rng.normal(size=(2, 512)), axis=1) * 0.1
    b = np.cumsum(rng.normal(size=(2, 512)), axis=1) * 0.1
    theta = (a[:, :, None] - b[:, None, :]) ** 2
    la = lb = np.full(2, 512, dtype=np.int64)
    v64, E64 = core_dtw.dtw_grad(theta, la, lb, -1, REG_CODES[reg], 1.0)
    v32, E32 = core_dtw.dtw_grad(theta.astype(np.float32), la, lb, -1, REG_CODES[reg], 1.0)
    assert v32.dtype == np.float32 and E32.dtype == np.float32
    np.testing.assert_allclose(v32, v64, rtol=1e-4)
    if reg != "hard":  # hard alignments may flip on near-ties at float32 resolution
        np.testing.assert_allclose(E32, E64, atol=2e-3)
        assert np.abs(E32.sum((1, 2)) - E64.sum((1, 2))).max() < 1e-2 * E64.sum((1, 2)).max()
    tv = rng.normal(size=(2, 512, 16, 16))
    Lv = np.full(2, 512, dtype=np.int64)
    s64, Ev64 = core_vit.viterbi_grad(tv, Lv, REG_CODES[reg], 1.0)
    s32, Ev32 = core_vit.viterbi_grad(tv.astype(np.float32), Lv, REG_CODES[reg], 1.0)
    np.testing.assert_allclose(s32, s64, rtol=1e-4)
    if reg != "hard":
        np.testing.assert_allclose(Ev32, Ev64, atol=2e-3)
