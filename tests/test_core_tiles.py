"""The compiled DTW engine's own machinery: its kept workspace, its output buffers.

The tiled wavefront itself (small tiles forced, the tiles of one problem on
several threads) is checked by the engine contract, ``tests/test_engine_contract.py``
(engine ``compiled-tiled``), against enumeration, finite differences and the
reference engine.
"""
import numpy as np
import pytest

import smoothmax as sm
from smoothmax import _reference

import _oracles as O

core = pytest.importorskip("smoothmax._core.dtw", reason="compiled core not built")


@pytest.fixture
def tile():
    """Force a tile size, and the threaded paths even for these small problems."""
    def set_tile(ts):
        core._set_tile(ts)

    core._set_small_work(0)
    yield set_tile
    core._set_tile(0)
    core._set_small_work(1 << 15)


def _problem(rng, B, NA, NB, dtype, masks):
    theta = rng.uniform(0.0, 2.0, size=(B, NA, NB))
    Z = rng.normal(size=(B, NA, NB))
    la = rng.integers(max(1, NA // 2), NA + 1, size=B).astype(np.int64)
    lb = rng.integers(max(1, NB // 2), NB + 1, size=B).astype(np.int64)
    if masks:
        mask = rng.random(theta.shape) < 0.1
        for b in range(B):  # keep a staircase along the straight line free: the end stays reachable
            mask[b, :la[b], :lb[b]] &= ~O.staircase(int(la[b]), int(lb[b]))
        theta[mask] = np.inf
    return theta.astype(dtype), Z.astype(dtype), la, lb


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_workspace_reuse_across_shapes(tile, dtype):
    """Calls of different shapes and modes in a row reuse one cached workspace."""
    rng = np.random.default_rng(5)
    tile(8)
    for B, NA, NB in [(1, 40, 40), (4, 9, 13), (1, 64, 17), (2, 5, 70)]:
        theta, Z, la, lb = _problem(rng, B, NA, NB, dtype, masks=True)
        v, E = core.dtw_grad(theta, la, lb, 3, 0, 1.0)
        v_ref, E_ref = _reference.dtw_grad(theta.astype(np.float64), la, lb, 3, 0, 1.0)
        assert np.isfinite(v_ref).all(), "degenerate case: an end cell is unreachable"
        tol = 1e-9 if dtype == np.float64 else 2e-4
        np.testing.assert_allclose(v, v_ref, rtol=tol, atol=tol)
        np.testing.assert_allclose(E, E_ref, rtol=tol, atol=tol)
        core.dtw_value(theta, la, lb, -1, 1, 0.5)


@pytest.mark.parametrize("reg", [0, 1, 2])
def test_small_tiles_band_masks_match_reference(tile, reg):
    """Many small tiles, a band and +inf masks: value, E and Edot as the reference engine's."""
    rng = np.random.default_rng(11)
    tile(8)
    theta, Z, la, lb = _problem(rng, 2, 50, 45, np.float64, masks=True)
    got = core._run(theta, Z, la, lb, 5, reg, 0.3, 2)
    ref = _reference.dtw_hvp(theta, Z, la, lb, 5, reg, 0.3)
    assert np.isfinite(ref[0]).all(), "degenerate case: an end cell is unreachable"
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("shape", [(3, 40, 45), (2, 1024, 1100)])  # malloc reuse; smoothmax._buffers
def test_dtw_outputs_rewritten_over_dirty_memory(shape):
    """Without band or lengths the DTW outputs are not zeroed first: every cell
    must be written (masked cells, unreachable items included)."""
    rng = np.random.default_rng(3)
    B, NA, NB = shape
    theta = rng.random(shape)
    theta[rng.random(shape) < 0.2] = np.inf
    for b in range(B):  # a free staircase path to the end cell...
        i = np.minimum(np.arange(NA + NB - 1), NA - 1)
        j = np.clip(np.arange(NA + NB - 1) - (NA - 1), 0, NB - 1)
        theta[b, i, j] = rng.random(i.shape)
    theta[B - 1, 0, 0] = np.inf  # ...but the last item cannot reach it
    Z = rng.standard_normal(shape)
    la, lb = np.full(B, NA), np.full(B, NB)
    _, E_ref, Ed_ref = _reference.dtw_hvp(theta, Z, la, lb, -1, 0, 1.0)
    for _ in range(2):
        for out in (sm.dtw_grad(theta)[1], sm.dtw_hvp(theta, Z)):
            out[...] = np.nan  # dirty, then free
        del out
        E = sm.dtw_grad(theta)[1]
        Ed = sm.dtw_hvp(theta, Z)
        assert np.all(E[B - 1] == 0) and np.all(Ed[B - 1] == 0)
        np.testing.assert_allclose(E, E_ref, atol=1e-10)
        np.testing.assert_allclose(Ed, Ed_ref, atol=1e-8)
        del E, Ed


@pytest.mark.parametrize("reg, gamma, tol", [(0, 1.0, 1e-6), (1, 1.0, 1e-6), (0, 0.05, 1e-5)])
def test_float32_gradient_close_to_float64(reg, gamma, tol):
    """float32 keeps R in double and forms the weights (exp/log) in float: E of
    a 1024² problem stays within 1e-6 of the float64 E on the same input at
    gamma = 1 (measured at 4096² too), within 1e-5 at gamma = 0.05
    (docs/engines.md, "float32")."""
    rng = np.random.default_rng(7)
    theta = rng.random((1, 1024, 1024)).astype(np.float32)
    ends = np.array([1024])
    v32, E32 = core.dtw_grad(theta, ends, ends, -1, reg, gamma)
    v64, E64 = core.dtw_grad(theta.astype(np.float64), ends, ends, -1, reg, gamma)
    assert E32.dtype == np.float32
    np.testing.assert_allclose(v32, v64, rtol=1e-6)
    assert np.max(np.abs(E32.astype(np.float64) - E64)) <= tol


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reg, gamma", [(1, 0.3), (1, 2.0), (2, 1.0), (0, 0.05)])
@pytest.mark.parametrize("ts", [8, 64])
def test_derived_diagonal_weight_keeps_exact_zeros(tile, dtype, reg, gamma, ts):
    """The gradient keeps two weights a cell (q_up, q_left) and the reverse
    pass derives q_diag = 1 - q_up - q_left (``simd.h``, ``dtw_q_diag``).
    Where the reference E is exactly 0 (off the sparsemax or hard support,
    masked and unreachable cells, past the lengths, outside the band), the
    compiled E is exactly 0 as well; E is never negative; and it stays close
    to the reference, with tiles of 8 and 64 cells."""
    rng = np.random.default_rng(11)
    tile(ts)
    for B, NA, NB, band in [(3, 30, 41, 6), (2, 70, 50, -1), (1, 129, 131, 20)]:
        theta, _, la, lb = _problem(rng, B, NA, NB, dtype, masks=True)
        v, E = core.dtw_grad(theta, la, lb, band, reg, gamma)
        v_ref, E_ref = _reference.dtw_grad(theta.astype(np.float64), la, lb, band, reg, gamma)
        assert np.isfinite(v_ref).all(), "degenerate case: an end cell is unreachable"
        if reg != 0:  # negentropy: exp underflows at thresholds of its own
            assert np.all(E[E_ref == 0] == 0), np.max(np.abs(E[E_ref == 0]))
        assert E.min() >= 0
        tol = 1e-9 if dtype == np.float64 else 2e-4
        np.testing.assert_allclose(E, E_ref, rtol=tol, atol=tol)
