"""Property-based tests (hypothesis, docs/spec.md §6): every public function over
shapes, lengths, bands, masks, γ in [1e-4, 1e4], magnitudes up to 1e6 and
both dtypes, on both engines (NumPy -> compiled, array_api_strict ->
reference): no crash, no NaN, values within the bounds of Lemma 1 summed
along the path (Prop. 2), expected paths in [0, 1] with their invariants.
"""
import math

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis not installed (test extra)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import smoothmax as sm  # noqa: E402

import _oracles as O  # noqa: E402

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                    derandomize=True)

regs = st.sampled_from(["negentropy", "l2", "hard"])
dtypes = st.sampled_from([np.float32, np.float64])
gammas = st.floats(-4, 4).map(lambda e: float(10.0 ** e))
magnitudes = st.floats(-3, 6).map(lambda e: float(10.0 ** e))
batch_shapes = st.sampled_from([(), (1,), (3,), (2, 2)])
engines = st.sampled_from(["numpy", "array_api_strict"])


def _to(engine, a):
    if engine == "numpy":
        return a
    import array_api_strict as xs

    return xs.asarray(a)


def _np(x):
    return np.asarray(x)


def _tol(dtype, scale):
    """Rounding slack for a sum of ``scale`` in magnitude."""
    return (2e-5 if dtype == np.float32 else 1e-11) * scale


# ---------------------------------------------------------------------------
# DTW


@st.composite
def dtw_problems(draw):
    bs = draw(batch_shapes)
    NA, NB = draw(st.integers(1, 10)), draw(st.integers(1, 10))
    dtype = draw(dtypes)
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    mag = draw(magnitudes)
    theta = rng.normal(size=bs + (NA, NB)) * mag
    if draw(st.booleans()):
        theta = np.abs(theta)  # distances
    if draw(st.booleans()):
        theta[rng.random(size=theta.shape) < draw(st.floats(0, 0.3))] = np.inf
    theta = theta.astype(dtype)
    band = draw(st.one_of(st.none(), st.integers(0, 4)))
    lengths = None
    if draw(st.booleans()):
        lengths = (rng.integers(1, NA + 1, size=bs), rng.integers(1, NB + 1, size=bs))
    return theta, band, lengths, rng.normal(size=theta.shape).astype(dtype)


@SETTINGS
@given(prob=dtw_problems(), reg=regs, gamma=gammas, engine=engines)
def test_dtw_properties(prob, reg, gamma, engine):
    theta, band, lengths, Z = prob
    dt = theta.dtype
    kw = dict(reg=reg, gamma=gamma, lengths=lengths, band=band)
    tb = _to(engine, theta)
    v = _np(sm.dtw(tb, **kw))
    v2, E = (_np(a) for a in sm.dtw_grad(tb, **kw))
    Edot = _np(sm.dtw_hvp(tb, _to(engine, Z), **kw))
    h, Y = (_np(a) for a in sm.dtw_path(tb, lengths=lengths, band=band))
    for a in (v, v2, E, Edot, h, Y):
        assert a.dtype == dt
        assert not np.isnan(a).any()
    assert v.shape == theta.shape[:-2] and E.shape == theta.shape
    np.testing.assert_array_equal(v, v2)
    assert np.all(np.isfinite(E)) and np.all(np.isfinite(Edot))
    assert np.all(E >= 0) and np.all(E <= 1 + _tol(dt, 10))
    assert set(np.unique(Y)) <= {0.0, 1.0}
    NA, NB = theta.shape[-2:]
    flat = theta.reshape(-1, NA, NB)
    la = np.broadcast_to(lengths[0], theta.shape[:-2]).reshape(-1) if lengths else np.full(len(flat), NA)
    lb = np.broadcast_to(lengths[1], theta.shape[:-2]).reshape(-1) if lengths else np.full(len(flat), NB)
    vf, hf, Ef, Edf, Yf = v.reshape(-1), h.reshape(-1), E.reshape(flat.shape), Edot.reshape(flat.shape), Y.reshape(flat.shape)
    for b in range(len(flat)):
        allowed = O.dtw_allowed(flat[b].astype(np.float64), la[b], lb[b], band)
        for a in (Ef[b], Edf[b], Yf[b]):
            assert np.all(a[~allowed] == 0)
        if not np.isfinite(hf[b]):
            assert vf[b] == np.inf and np.all(Ef[b] == 0) and np.all(Yf[b] == 0)
            continue
        # both ends of every path are visited
        assert abs(Ef[b, 0, 0] - 1) <= _tol(dt, 10) and abs(Ef[b, la[b] - 1, lb[b] - 1] - 1) <= _tol(dt, 10)
        assert Yf[b, 0, 0] == 1 and Yf[b, la[b] - 1, lb[b] - 1] == 1
        # hard cost is the cost of the returned alignment
        scale = np.abs(np.where(allowed, flat[b], 0)).astype(np.float64).sum()
        assert abs(hf[b] - np.sum(np.where(Yf[b] > 0, flat[b], 0), dtype=np.float64)) <= _tol(dt, scale) + 1e-30
        # Prop. 2: DTW_Ω - DTW in [-hi·K, -lo·K], K in [max(la, lb), la + lb - 1]
        lo, hi = O.lemma1_bounds(3, reg, gamma)
        kmin, kmax = max(la[b], lb[b]), la[b] + lb[b] - 1
        slack = _tol(dt, scale + gamma * kmax)
        assert vf[b] >= hf[b] + min(-hi * kmin, -hi * kmax) - slack
        assert vf[b] <= hf[b] + max(-lo * kmin, -lo * kmax) + slack
    if reg == "hard":
        assert np.all(Edot == 0)


# ---------------------------------------------------------------------------
# Viterbi


@st.composite
def viterbi_problems(draw):
    bs = draw(batch_shapes)
    T, S = draw(st.integers(1, 8)), draw(st.integers(1, 6))
    dtype = draw(dtypes)
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    theta = rng.normal(size=bs + (T, S, S)) * draw(magnitudes)
    if draw(st.booleans()):
        theta[rng.random(size=theta.shape) < draw(st.floats(0, 0.6))] = -np.inf
    theta = theta.astype(dtype)
    lengths = rng.integers(1, T + 1, size=bs) if draw(st.booleans()) else None
    return theta, lengths, rng.normal(size=theta.shape).astype(dtype)


@SETTINGS
@given(prob=viterbi_problems(), reg=regs, gamma=gammas, engine=engines)
def test_viterbi_properties(prob, reg, gamma, engine):
    theta, lengths, Z = prob
    dt = theta.dtype
    kw = dict(reg=reg, gamma=gamma, lengths=lengths)
    tb = _to(engine, theta)
    v = _np(sm.viterbi(tb, **kw))
    _, E = (_np(a) for a in sm.viterbi_grad(tb, **kw))
    Edot = _np(sm.viterbi_hvp(tb, _to(engine, Z), **kw))
    h, tags = (_np(a) for a in sm.viterbi_decode(tb, lengths=lengths))
    for a in (v, E, Edot, h):
        assert a.dtype == dt and not np.isnan(a).any()
    assert tags.dtype == np.int64 and tags.shape == theta.shape[:-2]
    assert np.all(np.isfinite(E)) and np.all(np.isfinite(Edot))
    assert np.all(E >= 0) and np.all(E <= 1 + _tol(dt, 10))
    T, S = theta.shape[-3:-1]
    flat = theta.reshape(-1, T, S, S)
    L = np.broadcast_to(lengths, theta.shape[:-3]).reshape(-1) if lengths is not None else np.full(len(flat), T)
    vf, hf = v.reshape(-1), h.reshape(-1)
    Ef, Edf, tf = E.reshape(flat.shape), Edot.reshape(flat.shape), tags.reshape(-1, T)
    lo, hi = O.lemma1_bounds(S, reg, gamma)
    for b in range(len(flat)):
        assert np.all(Ef[b][np.isinf(flat[b])] == 0) and np.all(Ef[b, L[b]:] == 0) and np.all(Edf[b, L[b]:] == 0)
        assert np.all(tf[b, L[b]:] == -1)
        if not np.isfinite(hf[b]):
            assert vf[b] == -np.inf and np.all(Ef[b] == 0)
            continue
        sums = Ef[b, :L[b]].sum(axis=(1, 2))
        np.testing.assert_allclose(sums, 1, atol=_tol(dt, 100))
        np.testing.assert_allclose(Edf[b, :L[b]].sum(axis=(1, 2)), 0,
                                   atol=_tol(dt, 100 * (1 + np.abs(Z).max()) / min(gamma, 1)))
        # decoded tags are a feasible path whose score is the hard value
        y = tf[b, :L[b]]
        assert np.all((0 <= y) & (y < S))
        prev = np.concatenate([[None], y[:-1]])
        path_scores = [flat[b, t, y[t], :].max() if t == 0 else flat[b, t, y[t], prev[t]] for t in range(L[b])]
        scale = float(np.abs(np.asarray(path_scores, dtype=np.float64)).sum())
        assert abs(hf[b] - float(np.sum(np.asarray(path_scores, dtype=np.float64)))) <= _tol(dt, scale) + 1e-30
        # Prop. 2 with L + 1 operator nodes of D = S entries
        slack = _tol(dt, scale + float(np.abs(flat[b][np.isfinite(flat[b])]).max(initial=0)) * L[b]
                      + gamma * (L[b] + 1) * (1 + math.log(S)))
        assert vf[b] >= hf[b] + (L[b] + 1) * lo - slack
        assert vf[b] <= hf[b] + (L[b] + 1) * hi + slack
    if reg == "hard":
        assert np.all(Edot == 0)


# ---------------------------------------------------------------------------
# smooth_max / smooth_argmax


@st.composite
def vectors(draw):
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=3)))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    x = rng.normal(size=shape) * draw(magnitudes)
    if draw(st.booleans()):
        x[rng.random(size=shape) < 0.4] = -np.inf
    axis = draw(st.integers(-len(shape), len(shape) - 1))
    return x.astype(draw(dtypes)), axis


@SETTINGS
@given(xa=vectors(), reg=regs, gamma=gammas, engine=engines)
def test_smooth_max_properties(xa, reg, gamma, engine):
    x, axis = xa
    xb = _to(engine, x)
    v = _np(sm.smooth_max(xb, reg=reg, gamma=gamma, axis=axis))
    q = _np(sm.smooth_argmax(xb, reg=reg, gamma=gamma, axis=axis))
    assert v.dtype == x.dtype and q.dtype == x.dtype
    assert not np.isnan(v).any() and not np.isnan(q).any()
    assert q.shape == x.shape
    assert v.shape == tuple(n for k, n in enumerate(x.shape) if k != axis % x.ndim)
    m = np.max(x, axis=axis).astype(np.float64)
    D = x.shape[axis]
    lo, hi = O.lemma1_bounds(D, reg, gamma)
    fin = np.isfinite(m)
    assert np.all(v[~fin] == -np.inf)
    assert np.all(q[np.isinf(x)] == 0)
    slack = _tol(x.dtype, np.abs(m[fin]) + gamma)
    assert np.all(v[fin] >= m[fin] + lo - slack) and np.all(v[fin] <= m[fin] + hi + slack)
    s = np.sum(q, axis=axis)
    np.testing.assert_allclose(s[fin], 1, atol=_tol(x.dtype, 100))
    assert np.all(q >= 0)
