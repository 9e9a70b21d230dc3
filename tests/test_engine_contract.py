"""One engine contract (docs/engines.md), checked on every engine.

The engines take flat, C-contiguous ``(B, ...)`` arrays, int64 lengths,
``reg`` as an int code and ``band = -1`` for no band, and return new arrays
of the input's dtype. This suite runs the same checks on each of them:

==================  ==========================================  ==============================
engine              what runs                                    structures
==================  ==========================================  ==============================
``reference``       ``smoothmax._reference`` (array-API code)    DTW, Viterbi, DAG, CRF, features
``compiled``        ``smoothmax._core`` (Cython, OpenMP)          DTW, Viterbi, DAG, CRF, features
``compiled-tiled``  the same with tiles of 1×1 (tiny problems)    DTW
                    or 5×5 cells and the threaded path forced
                    (tile borders, band edges and lengths cross
                    tiles; one problem's tiles on several threads)
``emulated-cuda``   the CUDA kernel text compiled as C++ against  DTW, Viterbi, CRF, features
                    ``smx_emu.cuh`` (``smoothmax._cuda.emulate``),
                    launched by ``smoothmax._cuda.engine``'s own
                    code on NumPy arrays, 2 resident blocks
``cuda``            ``smoothmax._cuda.engine`` on CuPy arrays     DTW, Viterbi, CRF, features
==================  ==========================================  ==============================

An engine that cannot run here is skipped with its reason (no compiled core,
no C++20 compiler, no CuPy or no GPU); ``SMOOTHMAX_REQUIRE_COMPILED=1`` turns
a missing compiled core into a failure. ``test_structure_table_matches_the_engines``
keeps the table above true to the modules.

Oracles, independent of every engine (``tests/_oracles.py``: plain NumPy
scalar loops written from the mathematics):

* enumeration of every path of tiny instances (value, ``E = Σ p(Y)·Y``,
  ``Ė = Σ ṗ(Y)·Y``, the best path), with lengths, bands, masked cells,
  unreachable items, all three operators, float32 and float64 (a float32
  engine is held to the float32 tolerance against the float64 oracle);
* the CRF through its full potentials (the same enumeration), the features
  through the cost matrix written here and the chain rule by explicit sums;
* central finite differences of the value (→ ``E``) and of ``E`` (→ ``Ė``),
  and the symmetry of the Hessian, at sizes enumeration cannot reach;
* at those sizes, also agreement with the reference engine, itself held to
  the oracles above.

One tolerance table per dtype (``TOL``); values are compared relative to the
size of the path scores, ``Ė`` relative to ``1/γ``.
"""
import os
from types import SimpleNamespace

import numpy as np
import pytest

import _oracles as O

REGS = {"negentropy": 0, "l2": 1, "hard": 2}
DTYPES = [np.float32, np.float64]
TOL = {np.dtype(np.float64): dict(rtol=1e-9, atol=1e-9),
       np.dtype(np.float32): dict(rtol=3e-4, atol=3e-4)}
FD_EPS, FD_TOL = 1e-5, 1e-6  # central differences in float64: error ~ eps² · third derivative
# float32 against float64 after 512 steps (rounding accumulates along the DP)
F32_512 = dict(value_rtol=1e-4, E_atol=2e-3)
GAMMA = 0.7
COSTS = {"sqeuclidean": 0, "euclidean": 1, "cosine": 2}

STRUCTURES = {
    "reference": {"dtw", "viterbi", "dag", "crf", "features"},
    "compiled": {"dtw", "viterbi", "dag", "crf", "features"},
    "compiled-tiled": {"dtw"},
    "emulated-cuda": {"dtw", "viterbi", "crf", "features"},
    "cuda": {"dtw", "viterbi", "crf", "features"},
}


# ---------------------------------------------------------------------------
# engines: one object per engine with the functions of docs/engines.md


def _compiled_reason():
    from smoothmax._dispatch import compiled_available

    if compiled_available():
        return None
    if os.environ.get("SMOOTHMAX_REQUIRE_COMPILED") == "1":
        pytest.fail("SMOOTHMAX_REQUIRE_COMPILED=1 but smoothmax._core is not built")
    return "compiled core smoothmax._core not built"


def _merge(*mods):
    ns = SimpleNamespace()
    for m in mods:
        for k in dir(m):
            if k.startswith(("dtw_", "viterbi_", "dag_", "crf_")):
                setattr(ns, k, getattr(m, k))
    return ns


def _unit(X):
    n = np.linalg.norm(X, axis=-1, keepdims=True)
    return X / n, 1.0 / n


class Engine:
    """An engine's functions, how arrays go to it and come back, and its own checks."""

    def __init__(self, name, fns, features, to_dev=np.asarray, to_host=np.asarray,
                 native=lambda x: isinstance(x, np.ndarray), before=None, after=None):
        self.name, self.fns, self._features = name, fns, features
        self.to_dev, self._to_host, self.native = to_dev, to_host, native
        self.before, self.after = before, after

    def __repr__(self):
        return f"Engine({self.name})"

    def host(self, out):
        """NumPy copies of the outputs, each checked to be an array of the engine's namespace."""
        outs = out if isinstance(out, tuple) else (out,)
        for a in outs:
            assert self.native(a), f"{self.name}: output of type {type(a).__name__}"
        res = tuple(np.asarray(self._to_host(a)) for a in outs)
        return res if isinstance(out, tuple) else res[0]

    def call(self, fn, *args):
        """``fn`` of the engine on NumPy arguments (moved to the engine's device); NumPy results."""
        if self.before is not None:
            self.before(args[0])
        dev = tuple(self.to_dev(a) if isinstance(a, np.ndarray) else a for a in args)
        out = self.host(getattr(self.fns, fn)(*dev))
        if self.after is not None and args[0].size:
            self.after(fn)
        return out

    def features(self, X, Y, la, lb, band, cost, reg, gamma):
        """``(value, grad_x, grad_y)`` of DTW between features (float64)."""
        return self._features(X, Y, la, lb, band, cost, reg, gamma)


def _features_reference(X, Y, la, lb, band, cost, reg, gamma):
    from smoothmax import _reference as R

    C = R.pairwise_cost(np, X, Y, cost)
    v, E = R.dtw_grad(np.ascontiguousarray(C), la, lb, band, reg, gamma)
    gx, gy = R.cost_chain_rule(np, X, Y, E, cost)
    return v, gx, gy


def _features_kernel(run):
    """The compiled / CUDA feature kernels take unit rows for the cosine cost and return
    the raw sums, which the caller scales by ``-1/‖row‖`` (docs/engines.md)."""
    def features(X, Y, la, lb, band, cost, reg, gamma):
        ix = iy = None
        if cost == "cosine":
            (X, ix), (Y, iy) = _unit(X), _unit(Y)
        v, gx, gy = run(np.ascontiguousarray(X), np.ascontiguousarray(Y), la, lb, band,
                        COSTS[cost], reg, gamma)
        if cost == "cosine":
            gx, gy = -gx * ix, -gy * iy
        return v, gx, gy
    return features


def _make_engine(name, monkeypatch):
    if name == "reference":
        from smoothmax import _reference as R

        return Engine(name, _merge(R), _features_reference)
    if name.startswith("compiled"):
        reason = _compiled_reason()
        if reason:
            pytest.skip(reason)
        from smoothmax._core import crf, dag, dtw, dtwf, viterbi

        before = None
        if name == "compiled-tiled":
            if not (hasattr(dtw, "_set_tile") and hasattr(dtw, "_set_small_work")):
                pytest.skip("smoothmax._core.dtw has no tile hooks (_set_tile, _set_small_work)")
            dtw._set_small_work(0)

            def before(theta):  # tiles of one cell on tiny problems, 5×5 (and a remainder) else
                dtw._set_tile(1 if theta.shape[1] <= 9 else 5)

        def run(X, Y, la, lb, band, cost, reg, gamma):  # strips of 2 rows: checkpoints used
            return dtwf._run(X, Y, la, lb, band, cost, reg, gamma, 2, True, None)

        return Engine(name, _merge(dtw, viterbi, dag, crf), _features_kernel(run), before=before)
    from smoothmax._cuda import engine as cuda_engine

    if name == "emulated-cuda":
        from smoothmax._cuda import emulate

        if not emulate.available():
            pytest.skip("no C++20 compiler for the CUDA emulation (smoothmax._cuda.emulate)")
        be = emulate.EmulatedBackend(max_resident=2)
        # the engine's own launch code, on the emulation: every engine function of
        # smoothmax._cuda.engine takes its backend from _cupy_backend()
        monkeypatch.setattr(cuda_engine, "_cupy_backend", lambda: be)

        def ran_kernels(fn):
            assert be.launches, f"{fn}: no kernel was launched"
            be.launches.clear()

        def run(X, Y, la, lb, band, cost, reg, gamma):
            return cuda_engine.dtwf_run(be, X, Y, la, lb, band, reg, gamma, cost, True, 1)

        return Engine(name, _merge(cuda_engine), _features_kernel(run), after=ran_kernels)
    assert name == "cuda"
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed: no CUDA engine")
    import smoothmax._cuda as smx_cuda

    if not smx_cuda.available():
        pytest.skip("CuPy found no CUDA device")
    device = cupy.cuda.Device().id

    def native(x):
        return isinstance(x, cupy.ndarray) and x.device.id == device

    def run(X, Y, la, lb, band, cost, reg, gamma):
        out = cuda_engine.dtwf_run(cuda_engine._cupy_backend(), cupy.asarray(X), cupy.asarray(Y),
                                   cupy.asarray(la), cupy.asarray(lb), band, reg, gamma, cost,
                                   True)
        return tuple(cupy.asnumpy(a) for a in out)

    return Engine(name, _merge(cuda_engine), _features_kernel(run), to_dev=cupy.asarray,
                  to_host=cupy.asnumpy, native=native)


@pytest.fixture
def engine(request, monkeypatch):
    eng = _make_engine(request.param, monkeypatch)
    yield eng
    if request.param == "compiled-tiled":
        from smoothmax._core import dtw

        dtw._set_tile(0)
        dtw._set_small_work(1 << 15)


def engines(struct, only=None):
    """The engines that implement ``struct`` (the CUDA one marked ``gpu``)."""
    return [pytest.param(n, id=n, marks=[pytest.mark.gpu] if n == "cuda" else [])
            for n in STRUCTURES if struct in STRUCTURES[n] and (only is None or n in only)]


def test_structure_table_matches_the_engines():
    """STRUCTURES lists exactly what each engine module provides."""
    from smoothmax import _reference as R
    from smoothmax._cuda import engine as cuda_engine

    def provided(mod):
        return {s for s in ("dtw", "viterbi", "dag", "crf")
                if all(hasattr(mod, f"{s}_{op}") for op in ("value", "grad", "hvp"))}

    assert provided(R) | {"features"} == STRUCTURES["reference"]
    assert provided(cuda_engine) | {"features"} == STRUCTURES["cuda"] == STRUCTURES["emulated-cuda"]
    if _compiled_reason() is None:
        from smoothmax._core import crf, dag, dtw, viterbi

        assert provided(_merge(dtw, viterbi, dag, crf)) | {"features"} == STRUCTURES["compiled"]


# ---------------------------------------------------------------------------
# comparisons


def _close(got, want, dtype, what, scale=1.0):
    """``got`` (engine, ``dtype``) against ``want`` (float64): no NaN, the same infinities,
    finite entries within ``TOL[dtype]`` (``atol`` times ``scale``)."""
    got = np.asarray(got)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    assert not np.isnan(got).any(), f"{what}: NaN"
    np.testing.assert_array_equal(got[np.isinf(want)], want[np.isinf(want)],
                                  err_msg=f"{what}: infinities")
    fin = np.isfinite(want)
    assert np.isfinite(got[fin]).all(), f"{what}: infinite where the oracle is finite"
    t = TOL[np.dtype(dtype)]
    np.testing.assert_allclose(got[fin].astype(np.float64), want[fin], rtol=t["rtol"],
                               atol=t["atol"] * scale, err_msg=what)


def _dtypes(outs, dtype, shapes, what):
    for a, shape in zip(outs, shapes):
        assert a.dtype == dtype, f"{what}: dtype {a.dtype}, expected {np.dtype(dtype)}"
        assert a.shape == shape, f"{what}: shape {a.shape}, expected {shape}"


def _unchanged(inputs, copies):
    for a, b in zip(inputs, copies):
        np.testing.assert_array_equal(a, b, err_msg="an engine wrote into its input")


def _against_oracle(o, b, dtype, struct, v, v_g, v_h, E, E_h, Ed):
    """Item ``b`` of the value, grad and hvp outputs against the enumeration ``o``; returns the
    scale of the path scores (values are compared relative to it)."""
    scores = np.asarray(o["scores"], dtype=np.float64)
    scale = 1 + float(np.abs(scores[np.isfinite(scores)]).max(initial=0.0))
    for name, got in (("value", v), (f"{struct}_grad value", v_g), (f"{struct}_hvp value", v_h)):
        _close(got[b], o["value"], dtype, f"item {b} {name}", scale)
    _close(E[b], o["E"], dtype, f"item {b} E")
    _close(E_h[b], o["E"], dtype, f"item {b} {struct}_hvp E")
    _close(Ed[b], o["Edot"], dtype, f"item {b} Edot", 10 / GAMMA)
    return scale


def _check_derivatives(engine, struct, theta, args, reg, rng):
    """``<E, U>`` and ``Ė(U)`` against central differences of the engine's own value and
    ``E`` along a random ``U`` (float64), and ``<Ė(U), V> = <Ė(V), U>`` (the Hessian is
    symmetric). ``args``: the arguments after θ (or after θ and Z) but ``reg, gamma``."""
    code = REGS[reg]
    fin = np.isfinite(theta)
    U, V = (np.where(fin, rng.normal(size=theta.shape), 0.0) for _ in range(2))
    axes = tuple(range(1, theta.ndim))
    _, E = engine.call(f"{struct}_grad", theta, *args, code, GAMMA)
    _, _, EdU = engine.call(f"{struct}_hvp", theta, U, *args, code, GAMMA)
    _, _, EdV = engine.call(f"{struct}_hvp", theta, V, *args, code, GAMMA)
    vp, Ep = engine.call(f"{struct}_grad", theta + FD_EPS * U, *args, code, GAMMA)
    vm, Em = engine.call(f"{struct}_grad", theta - FD_EPS * U, *args, code, GAMMA)
    ok = np.isfinite(vp) & np.isfinite(vm)
    assert ok.sum() >= 2, "the case needs at least two items with a path"
    np.testing.assert_allclose((vp[ok] - vm[ok]) / (2 * FD_EPS), (E * U).sum(axes)[ok],
                               rtol=FD_TOL, atol=FD_TOL)
    np.testing.assert_allclose((Ep - Em) / (2 * FD_EPS), EdU, atol=100 * FD_TOL)
    np.testing.assert_allclose((EdU * V).sum(axes), (EdV * U).sum(axes),
                               **TOL[np.dtype(np.float64)])


# ---------------------------------------------------------------------------
# DTW


def _dtw_case(rng, dtype):
    """Five 4×4 items: full, shorter, a row or column of one, a masked cell, and one whose
    end is unreachable; NaN past the lengths (never read)."""
    B, NA, NB = 5, 4, 4
    theta = rng.uniform(0.1, 2.0, size=(B, NA, NB))
    Z = rng.normal(size=(B, NA, NB))
    la = np.array([4, 3, 1, 4, 2], dtype=np.int64)
    lb = np.array([4, 4, 3, 2, 2], dtype=np.int64)
    theta[3, 2, 0] = np.inf                 # a masked cell on some paths
    theta[4, 0, 1] = theta[4, 1, 0] = np.inf  # end reachable only by the diagonal
    theta[4, 1, 1] = np.inf                 # ...which is masked too: unreachable
    for b in range(B):
        theta[b, la[b]:, :] = np.nan
        theta[b, :, lb[b]:] = np.nan
    return theta.astype(dtype), Z.astype(dtype), la, lb


@pytest.mark.parametrize("engine", engines("dtw"), indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("reg", list(REGS))
@pytest.mark.parametrize("band", [-1, 0, 1], ids=["noband", "band0", "band1"])
def test_dtw_against_enumeration(engine, dtype, reg, band, rng):
    theta, Z, la, lb = _dtw_case(rng, dtype)
    keep = [a.copy() for a in (theta, Z, la, lb)]
    code = REGS[reg]
    v = engine.call("dtw_value", theta, la, lb, band, code, GAMMA)
    v_g, E = engine.call("dtw_grad", theta, la, lb, band, code, GAMMA)
    v_h, E_h, Ed = engine.call("dtw_hvp", theta, Z, la, lb, band, code, GAMMA)
    cost, Y = engine.call("dtw_path", theta, la, lb, band)
    B = theta.shape[0]
    _dtypes((v, v_g, v_h, E, E_h, Ed, cost, Y), dtype, [(B,)] * 3 + [theta.shape] * 3
            + [(B,), theta.shape], "dtw")
    _unchanged((theta, Z, la, lb), keep)
    th64, Z64 = theta.astype(np.float64), Z.astype(np.float64)
    reachable = 0
    for b in range(B):
        o = O.dtw_brute(th64[b], reg, GAMMA, la[b], lb[b], None if band < 0 else band, Z64[b])
        scale = _against_oracle(o, b, dtype, "dtw", v, v_g, v_h, E, E_h, Ed)
        _close(cost[b], o["best"], dtype, f"item {b} path cost", scale)
        np.testing.assert_array_equal(Y[b], o["Ybest"], err_msg=f"item {b} path")
        allowed = O.dtw_allowed(th64[b], la[b], lb[b], None if band < 0 else band)
        for name, out in (("E", E), ("Edot", Ed), ("Y", Y)):  # exact zeros where masked
            assert np.all(out[b][~allowed] == 0), f"item {b} {name}: nonzero outside the cells"
        if reg == "hard":
            assert np.all(Ed[b] == 0), "the hard HVP is exactly 0"
        reachable += np.isfinite(o["value"])
    assert 1 <= reachable < B  # the case has reachable and unreachable items


def _dtw_moderate(rng, dtype, B=3, NA=37, NB=45):
    theta = rng.uniform(0.0, 2.0, size=(B, NA, NB))
    la = np.array([NA, (3 * NA) // 4, NA // 2][:B], dtype=np.int64)
    lb = np.array([NB, NB - 3, NB // 3][:B], dtype=np.int64)
    mask = rng.random(theta.shape) < 0.08
    for b in range(B):  # keep a staircase to the end free: the end stays reachable
        mask[b, :la[b], :lb[b]] &= ~O.staircase(int(la[b]), int(lb[b]))
    theta[mask] = np.inf
    return theta.astype(dtype), rng.normal(size=theta.shape).astype(dtype), la, lb


@pytest.mark.parametrize("engine", engines("dtw"), indirect=True)
@pytest.mark.parametrize("reg", ["negentropy", "l2"])
@pytest.mark.parametrize("band", [-1, 4], ids=["noband", "band4"])
def test_dtw_finite_differences(engine, reg, band, rng):
    """37×45 with lengths, masks and bands."""
    theta, _, la, lb = _dtw_moderate(rng, np.float64)
    _check_derivatives(engine, "dtw", theta, (la, lb, band), reg, rng)


@pytest.mark.parametrize("engine", engines("dtw", only={"compiled", "compiled-tiled",
                                                          "emulated-cuda", "cuda"}),
                         indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("reg", list(REGS))
@pytest.mark.parametrize("band", [-1, 0, 4], ids=["noband", "band0", "band4"])
def test_dtw_against_reference(engine, dtype, reg, band, rng):
    """Sizes enumeration cannot reach (two strips of 32 rows, many tiles): the reference
    engine, held to the oracles above, in float64."""
    from smoothmax import _reference as R

    theta, Z, la, lb = _dtw_moderate(rng, dtype)
    code = REGS[reg]
    got = engine.call("dtw_hvp", theta, Z, la, lb, band, code, GAMMA)
    want = R.dtw_hvp(theta.astype(np.float64), Z.astype(np.float64), la, lb, band, code, GAMMA)
    assert np.isfinite(want[0]).all()
    _close(got[0], want[0], dtype, "value", scale=1 + float(np.abs(want[0]).max()))
    _close(got[1], want[1], dtype, "E")
    _close(got[2], want[2], dtype, "Edot", scale=10 / GAMMA)
    _close(engine.call("dtw_value", theta, la, lb, band, code, GAMMA), want[0], dtype,
           "dtw_value", scale=1 + float(np.abs(want[0]).max()))
    one = engine.call("dtw_hvp", theta[:1].copy(), Z[:1].copy(), la[:1].copy(), lb[:1].copy(),
                      band, code, GAMMA)  # one problem: its tiles on several threads
    for k in range(3):
        np.testing.assert_array_equal(one[k], got[k][:1])
    c, Y = engine.call("dtw_path", theta, la, lb, band)
    c_ref, Y_ref = R.dtw_path(theta.astype(np.float64), la, lb, band)
    _close(c, c_ref, dtype, "path cost", scale=1 + float(np.abs(c_ref).max()))
    if dtype == np.float64:
        np.testing.assert_array_equal(Y, Y_ref)


@pytest.mark.parametrize("engine", engines("dtw", only={"compiled", "compiled-tiled",
                                                          "emulated-cuda", "cuda"}),
                         indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("reg", list(REGS))
@pytest.mark.parametrize("band", [-1, 4], ids=["noband", "band4"])
def test_dtw_grad_two_weights_keep_exact_zeros(engine, dtype, reg, band, rng):
    """The gradient keeps two weights a cell, (q_up, q_left), and its reverse pass
    derives q_diag = 1 - q_up - q_left (``smx::dtw_q_diag``) on the CPU and the GPU
    alike. Where the reference E is exactly 0 (off the l2 or hard support, masked
    and unreachable cells, past the lengths, outside the band) the engine's E is
    exactly 0 too, E is never negative, and E is the reference's; two strips of 32
    rows."""
    from smoothmax import _reference as R

    theta, _, la, lb = _dtw_moderate(rng, dtype)
    code = REGS[reg]
    v, E = engine.call("dtw_grad", theta, la, lb, band, code, GAMMA)
    v_ref, E_ref = R.dtw_grad(theta.astype(np.float64), la, lb, band, code, GAMMA)
    assert np.isfinite(v_ref).all(), "degenerate case: an end cell is unreachable"
    _close(v, v_ref, dtype, "value", scale=1 + float(np.abs(v_ref).max()))
    _close(E, E_ref, dtype, "E")
    assert E.min() >= 0
    # negentropy: its exp underflows at thresholds of its own, but masked cells and
    # cells past the lengths are exact zeros for every operator
    zero = (E_ref == 0) if reg != "negentropy" else np.isinf(theta)
    assert np.all(E[zero] == 0), f"{reg}: E is not exactly 0 where the reference's is"
    for b in range(len(la)):
        assert np.all(E[b, la[b]:] == 0) and np.all(E[b, :, lb[b]:] == 0)


# ---------------------------------------------------------------------------
# Viterbi


def _viterbi_case(rng, dtype, S):
    B, T = 4, 3
    theta = rng.normal(size=(B, T, S, S))
    Z = rng.normal(size=(B, T, S, S))
    L = np.array([3, 1, 2, 3], dtype=np.int64)
    theta[2][rng.random(size=(T, S, S)) < 0.3] = -np.inf  # masked edges
    theta[2, 0, 0, 0] = 0.5                               # (item 2 stays reachable)
    theta[3] = -np.inf                                    # no path at all
    return theta.astype(dtype), Z.astype(dtype), L


@pytest.mark.parametrize("engine", engines("viterbi"), indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("reg", list(REGS))
@pytest.mark.parametrize("S", [1, 3])
def test_viterbi_against_enumeration(engine, dtype, reg, S, rng):
    theta, Z, L = _viterbi_case(rng, dtype, S)
    keep = [a.copy() for a in (theta, Z, L)]
    code = REGS[reg]
    v = engine.call("viterbi_value", theta, L, code, GAMMA)
    v_g, E = engine.call("viterbi_grad", theta, L, code, GAMMA)
    v_h, E_h, Ed = engine.call("viterbi_hvp", theta, Z, L, code, GAMMA)
    score, tags = engine.call("viterbi_decode", theta, L)
    B, T = theta.shape[:2]
    _dtypes((v, v_g, v_h, E, E_h, Ed, score), dtype, [(B,)] * 3 + [theta.shape] * 3 + [(B,)],
            "viterbi")
    assert tags.dtype == np.int64 and tags.shape == (B, T)
    _unchanged((theta, Z, L), keep)
    th64, Z64 = theta.astype(np.float64), Z.astype(np.float64)
    for b in range(B):
        o = O.viterbi_brute(th64[b], reg, GAMMA, int(L[b]), Z64[b])
        scale = _against_oracle(o, b, dtype, "viterbi", v, v_g, v_h, E, E_h, Ed)
        assert np.all(E[b][np.isinf(th64[b])] == 0) and np.all(E[b, L[b]:] == 0)
        assert np.all(Ed[b][np.isinf(th64[b])] == 0) and np.all(Ed[b, L[b]:] == 0)
        if reg == "hard":
            assert np.all(Ed[b] == 0), "the hard HVP is exactly 0"
        if np.isfinite(o["value"]):
            _close(score[b], o["best"], dtype, f"item {b} decode score", scale)
            np.testing.assert_array_equal(tags[b], o["tags"], err_msg=f"item {b} tags")
        else:  # no path: -inf, E = 0 and tags -1 at every step
            assert score[b] == -np.inf and np.all(tags[b] == -1) and np.all(E[b] == 0)


def _viterbi_moderate(rng, dtype, S, B=3, T=17):
    theta = rng.normal(size=(B, T, S, S))
    theta[0][rng.random(size=(T, S, S)) < 0.2] = -np.inf
    theta[0, :, :, 0] = rng.normal(size=(T, S))  # state 0 can always be left: reachable
    L = np.array([T, (T + 1) // 2, 1][:B], dtype=np.int64)
    return theta.astype(dtype), rng.normal(size=theta.shape).astype(dtype), L


@pytest.mark.parametrize("engine", engines("viterbi"), indirect=True)
@pytest.mark.parametrize("reg", ["negentropy", "l2"])
def test_viterbi_finite_differences(engine, reg, rng):
    T = 6 if engine.name == "emulated-cuda" else 17  # the emulation is slow
    theta, _, L = _viterbi_moderate(rng, np.float64, S=6, T=T)
    _check_derivatives(engine, "viterbi", theta, (L,), reg, rng)


def _viterbi_against_reference(engine, dtype, reg, S, T, rng):
    from smoothmax import _reference as R

    theta, Z, L = _viterbi_moderate(rng, dtype, S, T=T)
    code = REGS[reg]
    got = engine.call("viterbi_hvp", theta, Z, L, code, GAMMA)
    want = R.viterbi_hvp(theta.astype(np.float64), Z.astype(np.float64), L, code, GAMMA)
    scale = 1 + float(np.abs(want[0]).max())
    _close(got[0], want[0], dtype, "value", scale)
    _close(got[1], want[1], dtype, "E")
    _close(got[2], want[2], dtype, "Edot", scale=10 / GAMMA)
    s, tags = engine.call("viterbi_decode", theta, L)
    s_ref, tags_ref = R.viterbi_decode(theta.astype(np.float64), L)
    _close(s, s_ref, dtype, "decode score", scale)
    if dtype == np.float64:
        np.testing.assert_array_equal(tags, tags_ref)


@pytest.mark.parametrize("engine", engines("viterbi", only={"compiled", "emulated-cuda", "cuda"}),
                         indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("reg", list(REGS))
@pytest.mark.parametrize("S", [5, 33])
def test_viterbi_against_reference(engine, dtype, reg, S, rng):
    """S = 33: more states than a warp or a SIMD vector holds."""
    T = 17 if engine.name != "emulated-cuda" else (8 if S < 32 else 4)  # the emulation is slow
    _viterbi_against_reference(engine, dtype, reg, S, T, rng)


@pytest.mark.parametrize("engine", engines("viterbi", only={"compiled", "cuda"}), indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("reg", list(REGS))
def test_viterbi_wide_against_reference(engine, dtype, reg, rng):
    """S = 300: more states than a CUDA block has threads (too slow for the emulation)."""
    _viterbi_against_reference(engine, dtype, reg, 300, 4, rng)


@pytest.mark.parametrize("engine", engines("viterbi", only={"compiled", "cuda"}), indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("reg", ["negentropy", "l2"])
def test_viterbi_value_grad_every_row_width(engine, dtype, reg, rng):
    """S = 1..40 with negentropy and l2, value, gradient and HVP: the CPU core
    splits a row of at least one vector of doubles into vectors of the ISA's
    width (2, 4 or 8 doubles, twice as many floats) and a tail of halving
    vectors, and runs shorter rows in loops; every split is met here, masked
    edges included
    (``test_viterbi_rows_at_every_isa_width`` runs it at the other widths)."""
    from smoothmax import _reference as R

    code = REGS[reg]
    for S in range(1, 41):
        theta, Z, L = _viterbi_moderate(rng, dtype, S, T=4)
        v = engine.call("viterbi_value", theta, L, code, GAMMA)
        v_g, E = engine.call("viterbi_grad", theta, L, code, GAMMA)
        want_v, want_E = R.viterbi_grad(theta.astype(np.float64), L, code, GAMMA)
        scale = 1 + float(np.abs(want_v).max())
        _close(v, want_v, dtype, f"S={S} value", scale)
        _close(v_g, want_v, dtype, f"S={S} value (grad)", scale)
        _close(E, want_E, dtype, f"S={S} E")
        # the HVP's forward step runs the l2 rows in vector code too
        got = engine.call("viterbi_hvp", theta, Z, L, code, GAMMA)
        want = R.viterbi_hvp(theta.astype(np.float64), Z.astype(np.float64), L, code, GAMMA)
        _close(got[0], want[0], dtype, f"S={S} value (hvp)", scale)
        _close(got[1], want[1], dtype, f"S={S} E (hvp)")
        _close(got[2], want[2], dtype, f"S={S} Edot", scale=10 / GAMMA)


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx2-w64"])
def test_viterbi_rows_at_every_isa_width(isa):
    """The CPU core compiles its kernels once per x86 ISA, the Viterbi rows at
    that ISA's vector width (simd.h ``dispatch_w``: 16 bytes baseline, 32 AVX2,
    64 AVX-512); ``SMOOTHMAX_ISA`` caps the dispatch, so that the widths below
    this CPU's own run here too, and ``avx2-w64`` runs AVX-512's width in the
    AVX2 build (its logic tested without AVX-512): the row-width and reference
    tests (and the CRF engine's, whose l2 rows run the same ``L2Row``) in a
    subprocess at each, which reports the ISA it ran."""
    import subprocess
    import sys

    if _compiled_reason() is not None:
        pytest.skip(_compiled_reason())
    from smoothmax._core import dtw as core

    native = core._simd_isa()
    if native not in ("avx512", "avx2+fma", "baseline"):
        pytest.skip(f"one ISA built ({native}): nothing to cap")
    if isa.startswith("avx2") and native == "baseline":
        pytest.skip("this CPU has no AVX2 + FMA")
    env = dict(os.environ, SMOOTHMAX_ISA=isa)
    name = subprocess.run(
        [sys.executable, "-c", "from smoothmax._core import dtw; print(dtw._simd_isa())"],
        env=env, capture_output=True, text=True, timeout=120).stdout.strip()
    assert name == {"baseline": "baseline", "avx2": "avx2+fma",
                    "avx2-w64": "avx2+fma, 64-byte vectors"}[isa]
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "compiled",
         f"{__file__}::test_viterbi_value_grad_every_row_width",
         f"{__file__}::test_viterbi_against_reference",
         f"{__file__}::test_crf_against_reference"],
        env=env, capture_output=True, text=True, timeout=900, cwd=os.path.dirname(__file__))
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and " failed" not in run.stdout


# ---------------------------------------------------------------------------
# DAG


def _dag_case(rng, dtype, N=7, B=4):
    """A random DAG with parallel edges and a node without parents; masked edges."""
    counts, parents = [0, 0], []
    for i in range(1, N):
        d = 0 if i == 2 else int(rng.integers(1, 4))  # node 2 cannot be reached
        parents.extend(int(p) for p in rng.integers(0, i, size=d))
        if i == N - 1:  # an edge from the start: the end node is reachable
            parents.append(0)
            d += 1
        counts.append(counts[-1] + d)
    indptr = np.array(counts, dtype=np.int64)
    parents = np.array(parents, dtype=np.int64)
    n = len(parents)
    w = rng.normal(size=(B, n)) * 1.5
    w[1][rng.random(n) < 0.3] = -np.inf
    w[B - 1, indptr[N - 1]:] = -np.inf  # the last item cannot reach the end node
    return w.astype(dtype), rng.normal(size=(B, n)).astype(dtype), indptr, parents


@pytest.mark.parametrize("engine", engines("dag"), indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("reg", list(REGS))
def test_dag_against_enumeration(engine, dtype, reg, rng):
    w, Z, indptr, parents = _dag_case(rng, dtype)
    keep = [a.copy() for a in (w, Z, indptr, parents)]
    code = REGS[reg]
    v = engine.call("dag_value", w, indptr, parents, code, GAMMA)
    v_g, E = engine.call("dag_grad", w, indptr, parents, code, GAMMA)
    v_h, E_h, Ed = engine.call("dag_hvp", w, Z, indptr, parents, code, GAMMA)
    score, Y = engine.call("dag_path", w, indptr, parents)
    B = w.shape[0]
    _dtypes((v, v_g, v_h, E, E_h, Ed, score, Y), dtype, [(B,)] * 3 + [w.shape] * 3
            + [(B,), w.shape], "dag")
    _unchanged((w, Z, indptr, parents), keep)
    w64, Z64 = w.astype(np.float64), Z.astype(np.float64)
    for b in range(B):
        o = O.dag_brute(w64[b], indptr, parents, reg, GAMMA, Z64[b])
        scale = _against_oracle(o, b, dtype, "dag", v, v_g, v_h, E, E_h, Ed)
        assert np.all(E[b][np.isinf(w64[b])] == 0) and np.all(Ed[b][np.isinf(w64[b])] == 0)
        _close(score[b], o["best"], dtype, f"item {b} path score", scale)
        if np.isfinite(o["best"]):
            best = o["Ys"][int(np.argmax(o["scores"]))]
            np.testing.assert_array_equal(Y[b], best, err_msg=f"item {b} best path")
        else:
            assert np.all(Y[b] == 0) and np.all(E[b] == 0)
    assert not np.isfinite(v[B - 1]) and np.isfinite(v[0])


@pytest.mark.parametrize("engine", engines("dag"), indirect=True)
@pytest.mark.parametrize("reg", ["negentropy", "l2"])
def test_dag_finite_differences(engine, reg, rng):
    w, _, indptr, parents = _dag_case(rng, np.float64, N=40, B=3)
    _check_derivatives(engine, "dag", w, (indptr, parents), reg, rng)


# ---------------------------------------------------------------------------
# CRF (factorised Viterbi): oracle through the full potentials


def _crf_case(rng, dtype, B=3, T=3, S=3):
    em = rng.normal(size=(B, T, S))
    A = rng.normal(size=(S, S))
    if S > 1:
        A[1, :] = -np.inf  # a tag that cannot be left
    st, en = rng.normal(size=S), rng.normal(size=S)
    L = np.array([T, 1, 2][:B], dtype=np.int64)
    w = np.array([1.0, 2.0, 0.5][:B])
    Z = (rng.normal(size=em.shape), rng.normal(size=A.shape), rng.normal(size=S),
         rng.normal(size=S))
    return ([a.astype(dtype) for a in (em, A, st, en)], L, w,
            tuple(z.astype(dtype) for z in Z))


def _full_potentials(em, A, st, en, L, mask=True):
    """``theta[b, t, i, j]`` (docs/crf.md): ``A[j, i] + em[t, i]``; step 0 from state 0 only,
    ``start[i] + em[0, i]``; ``end`` added at step ``L - 1``. ``mask=False``: the linear part
    (0 where the potentials are masked)."""
    B, T, S = em.shape
    theta = A.T[None, None, :, :] + em[:, :, :, None]
    theta = np.array(np.broadcast_to(theta, (B, T, S, S)))
    theta[:, 0] = -np.inf
    theta[:, 0, :, 0] = st[None, :] + em[:, 0, :]
    for b in range(B):
        theta[b, L[b] - 1] += en[:, None]
    return theta if mask else np.where(np.isfinite(theta), theta, 0.0)


@pytest.mark.parametrize("engine", engines("crf"), indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("reg", list(REGS))
@pytest.mark.parametrize("S", [1, 3])
def test_crf_against_enumeration(engine, dtype, reg, S, rng):
    (em, A, st, en), L, w, Z = _crf_case(rng, dtype, S=S)
    keep = [a.copy() for a in (em, A, st, en, L, w)]
    code = REGS[reg]
    v = engine.call("crf_value", em, A, st, en, L, code, GAMMA)
    v_g, g_em, g_A, g_st, g_en = engine.call("crf_grad", em, A, st, en, L, w, code, GAMMA)
    vdot, h_em, h_A, h_st, h_en = engine.call("crf_hvp", em, A, st, en, *Z, L, w, code, GAMMA)
    score, tags = engine.call("crf_decode", em, A, st, en, L)
    B, T, S = em.shape
    _dtypes((v, v_g, g_em, g_A, g_st, g_en, vdot, h_em, h_A, h_st, h_en, score), dtype,
            [(B,), (B,), em.shape, A.shape, (S,), (S,), (B,), em.shape, A.shape, (S,), (S,),
             (B,)], "crf")
    _unchanged((em, A, st, en, L, w), keep)
    f64 = [a.astype(np.float64) for a in (em, A, st, en)]
    theta = _full_potentials(*f64, L)
    Zt = _full_potentials(*(z.astype(np.float64) for z in Z), L, mask=False)
    Zt[np.isinf(theta)] = 0.0
    shift = GAMMA / 2 if reg == "l2" else 0.0  # the full form's operator over one entry at t = 0
    want = {k: np.zeros(s) for k, s in (("g_A", (S, S)), ("g_st", S), ("g_en", S),
                                         ("h_A", (S, S)), ("h_st", S), ("h_en", S))}
    for b in range(B):
        o = O.viterbi_brute(theta[b], reg, GAMMA, int(L[b]), Zt[b])
        scale = 1 + float(np.abs(o["scores"][np.isfinite(o["scores"])]).max())
        _close(v[b], o["value"] + shift, dtype, f"item {b} value", scale)
        _close(v_g[b], o["value"] + shift, dtype, f"item {b} crf_grad value", scale)
        _close(g_em[b], o["E"].sum(-1), dtype, f"item {b} grad emissions")
        _close(vdot[b], (o["E"] * Zt[b]).sum(), dtype, f"item {b} vdot", 10)
        _close(h_em[b], o["Edot"].sum(-1), dtype, f"item {b} hvp emissions", 10 / GAMMA)
        _close(score[b], o["best"], dtype, f"item {b} decode score", scale)
        np.testing.assert_array_equal(tags[b], o["tags"], err_msg=f"item {b} tags")
        for g, src in (("g", o["E"]), ("h", o["Edot"])):  # shared parts: Σ_b w_b ∇value_b
            want[f"{g}_A"] += w[b] * src[1:L[b]].sum(0).T
            want[f"{g}_st"] += w[b] * src[0, :, 0]
            want[f"{g}_en"] += w[b] * src[L[b] - 1].sum(-1)
    for name, got in (("g_A", g_A), ("g_st", g_st), ("g_en", g_en)):
        _close(got, want[name], dtype, name, w.sum())
    for name, got in (("h_A", h_A), ("h_st", h_st), ("h_en", h_en)):
        _close(got, want[name], dtype, name, w.sum() * 10 / GAMMA)


@pytest.mark.parametrize("engine", engines("crf", only={"compiled", "emulated-cuda", "cuda"}),
                         indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("reg", list(REGS))
@pytest.mark.parametrize("S", [11, 33])
def test_crf_against_reference(engine, dtype, reg, S, rng):
    """S = 33 (more tags than a warp) and 11 (l2 rows of whole vectors and a
    tail on the CPU: ``L2Row``), T = 3; the reference engine in float64."""
    from smoothmax import _reference as R

    (em, A, st, en), L, w, Z = _crf_case(rng, dtype, B=2, T=3, S=S)
    code = REGS[reg]
    f64 = [a.astype(np.float64) for a in (em, A, st, en)]
    Z64 = [z.astype(np.float64) for z in Z]
    for fn, args, args64 in (
            ("crf_grad", (em, A, st, en, L, w, code, GAMMA), (*f64, L, w, code, GAMMA)),
            ("crf_hvp", (em, A, st, en, *Z, L, w, code, GAMMA), (*f64, *Z64, L, w, code, GAMMA))):
        got, want = engine.call(fn, *args), getattr(R, fn)(*args64)
        for k, (g, r) in enumerate(zip(got, want)):
            _close(g, r, dtype, f"{fn} output {k}", 10 * (1 + float(np.abs(r).max())))
    s, tags = engine.call("crf_decode", em, A, st, en, L)
    s_ref, tags_ref = R.crf_decode(*f64, L)
    _close(s, s_ref, dtype, "decode score", 1 + float(np.abs(s_ref).max()))
    if dtype == np.float64:
        np.testing.assert_array_equal(tags, tags_ref)


# ---------------------------------------------------------------------------
# DTW between features (float64): the cost matrix and its chain rule written here


def _cost_and_derivatives(x, y, cost):
    """``C (n, m)``, ``∂C/∂x (n, m, d)``, ``∂C/∂y (n, m, d)`` by explicit formulas."""
    diff = x[:, None, :] - y[None, :, :]
    if cost == "cosine":
        nx, ny = np.linalg.norm(x, axis=1), np.linalg.norm(y, axis=1)
        dot = x @ y.T
        C = 1 - dot / np.outer(nx, ny)
        dCx = -(y[None] / (nx[:, None, None] * ny[None, :, None])
                - dot[:, :, None] * x[:, None] / (nx[:, None, None] ** 3 * ny[None, :, None]))
        dCy = -(x[:, None] / (nx[:, None, None] * ny[None, :, None])
                - dot[:, :, None] * y[None] / (nx[:, None, None] * ny[None, :, None] ** 3))
        return C, dCx, dCy
    sq = (diff ** 2).sum(-1)
    if cost == "sqeuclidean":
        return sq, 2 * diff, -2 * diff
    C = np.sqrt(sq)
    return C, diff / C[:, :, None], -diff / C[:, :, None]


@pytest.mark.parametrize("engine", engines("features"), indirect=True)
@pytest.mark.parametrize("cost", list(COSTS))
@pytest.mark.parametrize("reg", list(REGS))
def test_features_against_enumeration(engine, cost, reg, rng):
    B, NA, NB, d = 3, 5, 4, 2
    X, Y = rng.normal(size=(B, NA, d)), rng.normal(size=(B, NB, d))
    la, lb = np.array([5, 3, 1], dtype=np.int64), np.array([4, 4, 2], dtype=np.int64)
    band = 1
    keep = [a.copy() for a in (X, Y, la, lb)]
    v, gx, gy = engine.features(X, Y, la, lb, band, cost, REGS[reg], GAMMA)
    _unchanged((X, Y, la, lb), keep)
    assert gx.shape == X.shape and gy.shape == Y.shape
    for b in range(B):
        n, m = int(la[b]), int(lb[b])
        C, dCx, dCy = _cost_and_derivatives(X[b, :n], Y[b, :m], cost)
        o = O.dtw_brute(C, reg, GAMMA, band=band)
        _close(v[b], o["value"], np.float64, f"item {b} value", 1 + max(o["scores"]))
        _close(gx[b, :n], (o["E"][:, :, None] * dCx).sum(1), np.float64, f"item {b} grad_x")
        _close(gy[b, :m], (o["E"][:, :, None] * dCy).sum(0), np.float64, f"item {b} grad_y")
        assert np.all(gx[b, n:] == 0) and np.all(gy[b, m:] == 0)


# ---------------------------------------------------------------------------
# conventions shared by every engine


@pytest.mark.parametrize("engine", engines("dtw"), indirect=True)
def test_dtw_ties_and_batch_items(engine, rng):
    """Integer costs (many ties): hard paths and E break ties as the reference does
    (up, left, diagonal), exactly; each item equals its own one-item call; B = 0."""
    from smoothmax import _reference as R

    theta = rng.integers(0, 3, size=(6, 9, 7)).astype(np.float64)
    la = np.array([9, 4, 9, 1, 6, 9], dtype=np.int64)
    lb = np.array([7, 7, 2, 5, 6, 7], dtype=np.int64)
    c, Y = engine.call("dtw_path", theta, la, lb, 2)
    c_ref, Y_ref = R.dtw_path(theta, la, lb, 2)
    np.testing.assert_array_equal(c, c_ref)
    np.testing.assert_array_equal(Y, Y_ref)
    v, E = engine.call("dtw_grad", theta, la, lb, -1, REGS["negentropy"], 0.5)
    for b in (0, 3, 5):
        one = (theta[b:b + 1].copy(), la[b:b + 1].copy(), lb[b:b + 1].copy())
        vb, Eb = engine.call("dtw_grad", *one, -1, REGS["negentropy"], 0.5)
        np.testing.assert_array_equal(v[b:b + 1], vb)
        np.testing.assert_array_equal(E[b:b + 1], Eb)
    empty = np.zeros((0, 4, 5))
    no = np.zeros(0, dtype=np.int64)
    assert engine.call("dtw_value", empty, no, no, -1, 0, 1.0).shape == (0,)
    assert engine.call("dtw_hvp", empty, empty, no, no, -1, 1, 1.0)[2].shape == (0, 4, 5)


@pytest.mark.parametrize("engine", engines("viterbi"), indirect=True)
def test_viterbi_ties_and_empty_batch(engine):
    """All-equal scores: decode takes the first argmax (tags 0); B = 0."""
    theta = np.zeros((2, 5, 3, 3))
    L = np.array([5, 2], dtype=np.int64)
    s, tags = engine.call("viterbi_decode", theta, L)
    np.testing.assert_array_equal(tags, [[0, 0, 0, 0, 0], [0, 0, -1, -1, -1]])
    np.testing.assert_array_equal(s, [0.0, 0.0])
    v, E = engine.call("viterbi_grad", theta, L, REGS["negentropy"], 1.0)
    _close(v, [6 * np.log(3), 3 * np.log(3)], np.float64, "value")  # γ·log(3^(L+1))
    _close(E.sum((2, 3))[0], np.ones(5), np.float64, "E sums per step")
    empty = np.zeros((0, 3, 2, 2))
    assert engine.call("viterbi_grad", empty, np.zeros(0, dtype=np.int64), 0, 1.0)[1].shape == \
        (0, 3, 2, 2)


@pytest.mark.parametrize("engine", engines("dtw", only={"reference", "compiled", "cuda"}),
                         indirect=True)
@pytest.mark.parametrize("reg", list(REGS))
def test_float32_close_to_float64_at_512(engine, reg):
    """512² DTW on squared distances and 512×16² Viterbi: float32 stays close to float64."""
    rng = np.random.default_rng(0)
    a = np.cumsum(rng.normal(size=(2, 512)), axis=1) * 0.1
    b = np.cumsum(rng.normal(size=(2, 512)), axis=1) * 0.1
    theta = (a[:, :, None] - b[:, None, :]) ** 2
    la = lb = np.full(2, 512, dtype=np.int64)
    v64, E64 = engine.call("dtw_grad", theta, la, lb, -1, REGS[reg], 1.0)
    v32, E32 = engine.call("dtw_grad", theta.astype(np.float32), la, lb, -1, REGS[reg], 1.0)
    assert v32.dtype == np.float32 and E32.dtype == np.float32
    np.testing.assert_allclose(v32, v64, rtol=F32_512["value_rtol"])
    if reg != "hard":  # hard alignments may flip on near-ties at float32 resolution
        np.testing.assert_allclose(E32, E64, atol=F32_512["E_atol"])
        assert np.abs(E32.sum((1, 2)) - E64.sum((1, 2))).max() < 1e-2 * E64.sum((1, 2)).max()
    tv = rng.normal(size=(2, 512, 16, 16))
    Lv = np.full(2, 512, dtype=np.int64)
    s64, Ev64 = engine.call("viterbi_grad", tv, Lv, REGS[reg], 1.0)
    s32, Ev32 = engine.call("viterbi_grad", tv.astype(np.float32), Lv, REGS[reg], 1.0)
    np.testing.assert_allclose(s32, s64, rtol=F32_512["value_rtol"])
    if reg != "hard":
        np.testing.assert_allclose(Ev32, Ev64, atol=F32_512["E_atol"])


@pytest.mark.parametrize("engine", engines("dtw", only={"emulated-cuda"}), indirect=True)
@pytest.mark.parametrize("max_resident", [1, 6])
def test_dtw_emulated_any_resident_blocks(engine, max_resident, rng):
    """The DTW kernels hand strips of 32 rows from block to block: correct with one block
    resident at a time (no block may wait for one that has not started) and with many."""
    from smoothmax import _reference as R
    from smoothmax._cuda import engine as cuda_engine

    be = cuda_engine._cupy_backend()
    be.max_resident = max_resident
    theta, Z, la, lb = _dtw_moderate(rng, np.float64, NA=70, NB=23)
    for reg, band in (("negentropy", -1), ("l2", 3), ("hard", -1)):
        got = engine.call("dtw_hvp", theta, Z, la, lb, band, REGS[reg], 0.4)
        want = R.dtw_hvp(theta, Z, la, lb, band, REGS[reg], 0.4)
        _close(got[0], want[0], np.float64, f"{reg} value", 1 + float(np.abs(want[0]).max()))
        _close(got[1], want[1], np.float64, f"{reg} E")
        _close(got[2], want[2], np.float64, f"{reg} Edot", 10 / 0.4)


@pytest.mark.parametrize("engine", engines("dtw", only={"compiled"}), indirect=True)
def test_outputs_are_new_arrays(engine, rng):
    """Results of 16 MiB (the size from which the compiled engine hands out kept blocks) share
    no memory with the inputs or with a result still held, and stay as they were."""
    la, lb = np.array([1024]), np.array([2048])
    t1, t2 = rng.random((2, 1, 1024, 2048))
    v1, E1 = engine.call("dtw_grad", t1, la, lb, -1, 0, 1.0)
    kept = E1.copy()
    v2, E2 = engine.call("dtw_grad", t2, la, lb, -1, 0, 1.0)
    assert not np.shares_memory(E1, E2) and not np.shares_memory(E2, t2)
    np.testing.assert_array_equal(E1, kept)
    del E1, E2
    _, E3 = engine.call("dtw_grad", t1, la, lb, -1, 0, 1.0)  # may reuse a freed block
    np.testing.assert_array_equal(E3, kept)
    L = np.array([128])
    s1, s2 = rng.normal(size=(2, 1, 128, 128, 128))
    _, F1 = engine.call("viterbi_grad", s1, L, 0, 1.0)
    kept = F1.copy()
    _, F2 = engine.call("viterbi_grad", s2, L, 0, 1.0)
    assert not np.shares_memory(F1, F2) and not np.shares_memory(F2, s2)
    np.testing.assert_array_equal(F1, kept)
