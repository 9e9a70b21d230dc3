"""Bad input (docs/spec.md §6): the exception type, a message naming the argument and
what was received, and inputs left untouched -- for every public function."""
import re
import warnings

import numpy as np
import pytest

import smoothmax as sm

DTW_FUNCS = {
    "dtw": lambda t, **kw: sm.dtw(t, **kw),
    "dtw_grad": lambda t, **kw: sm.dtw_grad(t, **kw),
    "dtw_hvp": lambda t, **kw: sm.dtw_hvp(t, np.ones(np.shape(t)), **kw),
}
DTW_ALL = dict(DTW_FUNCS, dtw_path=lambda t, **kw: sm.dtw_path(t, **{k: v for k, v in kw.items()
                                                                     if k in ("lengths", "band")}))
VIT_FUNCS = {
    "viterbi": lambda t, **kw: sm.viterbi(t, **kw),
    "viterbi_grad": lambda t, **kw: sm.viterbi_grad(t, **kw),
    "viterbi_hvp": lambda t, **kw: sm.viterbi_hvp(t, np.ones(np.shape(t)), **kw),
}
VIT_ALL = dict(VIT_FUNCS, viterbi_decode=lambda t, **kw: sm.viterbi_decode(
    t, **{k: v for k, v in kw.items() if k == "lengths"}))
SMOOTH = {"smooth_max": sm.smooth_max, "smooth_argmax": sm.smooth_argmax}


def check_raises(exc, fn, *must_mention):
    """``fn()`` raises ``exc`` and its message contains each of ``must_mention``."""
    with pytest.raises(exc) as info:
        fn()
    msg = str(info.value)
    for word in must_mention:
        assert re.search(re.escape(str(word)), msg), f"message {msg!r} does not mention {word!r}"
    return msg


def _dtw_theta():
    return np.arange(12, dtype=np.float64).reshape(3, 4) / 7


def _vit_theta():
    return np.arange(18, dtype=np.float64).reshape(2, 3, 3) / 7


# ---------------------------------------------------------------------------
# theta: rank, shape, dtype, values


@pytest.mark.parametrize("name", VIT_ALL)
@pytest.mark.parametrize("reg", ["negentropy", "l2", "hard"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_viterbi_bad_score_anywhere(name, reg, dtype, bad):
    """NaN / +inf is rejected wherever it sits: inside or past a length, any item,
    any operator (the compiled kernels check on their read of theta, the other
    engines in a separate pass)."""
    f = VIT_ALL[name]
    kw = {} if name == "viterbi_decode" else {"reg": reg}
    base = np.random.default_rng(0).standard_normal((3, 5, 4, 4)).astype(dtype)
    lengths = np.array([5, 2, 4])
    word = "NaN" if np.isnan(bad) else "+inf"
    for b, t, i, j in [(0, 0, 0, 0), (0, 4, 3, 3), (1, 1, 2, 1), (1, 3, 0, 2), (2, 4, 1, 1)]:
        t_ = base.copy()
        t_[b, t, i, j] = bad
        check_raises(ValueError, lambda: f(t_, lengths=lengths, **kw), "theta", word)


def test_viterbi_reused_output_blocks_are_rewritten():
    """Large results come from reused blocks (smoothmax._buffers): a block left
    dirty by an earlier call must not leak into E past the lengths or anywhere else."""
    from smoothmax import _buffers

    rng = np.random.default_rng(1)
    theta = rng.standard_normal((8, 64, 64, 64))  # 16 MiB: a reused block
    assert theta.nbytes >= _buffers.MIN_BYTES
    Z = rng.standard_normal(theta.shape)
    lengths = np.array([64, 3, 1, 40, 64, 7, 64, 2])
    small = [(theta[k:k + 1, :n], Z[k:k + 1, :n]) for k, n in enumerate(lengths)]
    for _ in range(2):
        full_E = sm.viterbi_grad(theta)[1]
        full_E[...] = np.nan  # dirty the block, then free it
        del full_E
        _, E = sm.viterbi_grad(theta, lengths=lengths)
        Ed = sm.viterbi_hvp(theta, Z, lengths=lengths)
        for k, n in enumerate(lengths):
            assert np.all(E[k, n:] == 0) and np.all(Ed[k, n:] == 0)
            np.testing.assert_allclose(E[k, :n], sm.viterbi_grad(small[k][0])[1][0], atol=1e-12)
            np.testing.assert_allclose(Ed[k, :n], sm.viterbi_hvp(*small[k])[0], atol=1e-12)
        del E, Ed


@pytest.mark.parametrize("name", DTW_ALL)
def test_dtw_theta(name):
    f = DTW_ALL[name]
    check_raises(ValueError, lambda: f(np.zeros(4)), "theta", "(4,)")
    check_raises(ValueError, lambda: f(np.zeros(())), "theta")
    check_raises(ValueError, lambda: f(np.zeros((3, 0))), "theta", "(3, 0)")
    check_raises(ValueError, lambda: f(np.zeros((0, 2, 2))[:, :0]), "theta")
    for dt in (np.int64, np.int32, np.bool_, np.complex128, np.float16):
        check_raises(TypeError, lambda: f(np.zeros((3, 4), dtype=dt)), "theta", np.dtype(dt).name)
    t = _dtw_theta()
    t[1, 2] = np.nan
    check_raises(ValueError, lambda: f(t), "theta", "NaN")
    t = _dtw_theta()
    t[0, 3] = -np.inf
    check_raises(ValueError, lambda: f(t), "theta", "-inf")


@pytest.mark.parametrize("name", VIT_ALL)
def test_viterbi_theta(name):
    f = VIT_ALL[name]
    check_raises(ValueError, lambda: f(np.zeros((3, 3))), "theta", "(3, 3)")
    check_raises(ValueError, lambda: f(np.zeros((2, 3, 4))), "theta", "(2, 3, 4)")
    check_raises(ValueError, lambda: f(np.zeros((0, 3, 3))), "theta")
    check_raises(ValueError, lambda: f(np.zeros((2, 0, 0))), "theta")
    for dt in (np.int64, np.uint8, np.bool_, np.complex64, np.float16):
        check_raises(TypeError, lambda: f(np.zeros((2, 3, 3), dtype=dt)), "theta", np.dtype(dt).name)
    t = _vit_theta()
    t[1, 2, 0] = np.nan
    check_raises(ValueError, lambda: f(t), "theta", "NaN")
    t = _vit_theta()
    t[0, 0, 0] = np.inf
    check_raises(ValueError, lambda: f(t), "theta", "+inf")


@pytest.mark.parametrize("name", SMOOTH)
def test_smooth_x_and_axis(name):
    f = SMOOTH[name]
    check_raises(ValueError, lambda: f(np.float64(1.0)), "x")
    check_raises(ValueError, lambda: f(np.zeros((2, 0))), "x", "(2, 0)")
    check_raises(TypeError, lambda: f(np.zeros(3, dtype=np.int64)), "x", "int64")
    check_raises(ValueError, lambda: f(np.array([1.0, np.nan])), "x", "NaN")
    check_raises(ValueError, lambda: f(np.array([1.0, np.inf])), "x", "+inf")
    check_raises(ValueError, lambda: f(np.zeros((2, 3)), axis=2), "axis", "2")
    check_raises(ValueError, lambda: f(np.zeros((2, 3)), axis=-3), "axis", "-3")
    check_raises(ValueError, lambda: f(np.zeros((2, 3)), axis=0.0), "axis")


# ---------------------------------------------------------------------------
# reg and gamma


ALL = {**{k: (v, _dtw_theta) for k, v in DTW_FUNCS.items()},
       **{k: (v, _vit_theta) for k, v in VIT_FUNCS.items()},
       **{k: (v, lambda: np.zeros(3)) for k, v in SMOOTH.items()}}


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("bad", ["entropy", "L2", "", None, 0, "negentropy "], ids=repr)
def test_unknown_reg(name, bad):
    f, theta = ALL[name]
    check_raises(ValueError, lambda: f(theta(), reg=bad), "reg", repr(bad))


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("bad", [0.0, -1.0, -1e-300, float("nan"), float("inf"), -float("inf"), None, {}],
                         ids=repr)
@pytest.mark.parametrize("reg", ["negentropy", "l2"])
def test_bad_gamma(name, bad, reg):
    f, theta = ALL[name]
    check_raises((ValueError, TypeError), lambda: f(theta(), reg=reg, gamma=bad), "gamma")


@pytest.mark.parametrize("name", ["dtw", "viterbi", "smooth_max"])
def test_gamma_message_names_received_value(name):
    f, theta = ALL[name]
    check_raises(ValueError, lambda: f(theta(), gamma=-2.5), "gamma", "-2.5")
    check_raises(ValueError, lambda: f(theta(), gamma=float("nan")), "gamma", "nan")


@pytest.mark.parametrize("bad", ["1.0", [1.0]], ids=repr)
@pytest.mark.parametrize("name", ["dtw", "viterbi", "smooth_max"])
def test_gamma_non_real_rejected(name, bad):
    """A string or a list is not a real number (docs/spec.md §6: gamma a positive finite real)."""
    f, theta = ALL[name]
    check_raises((TypeError, ValueError), lambda: f(theta(), gamma=bad), "gamma", repr(bad))


def test_good_gamma_forms():
    """numpy scalars and 0-d arrays are accepted as gamma."""
    t = _dtw_theta()
    ref = sm.dtw(t, gamma=0.5)
    assert sm.dtw(t, gamma=np.float32(0.5)) == ref
    assert sm.dtw(t, gamma=np.array(0.5)) == ref


# ---------------------------------------------------------------------------
# lengths and band


@pytest.mark.parametrize("name", VIT_ALL)
def test_viterbi_lengths(name):
    f = VIT_ALL[name]
    t = np.zeros((2, 3, 2, 2))
    check_raises(ValueError, lambda: f(t, lengths=[0, 3]), "lengths", "0", "[1, 3]")
    check_raises(ValueError, lambda: f(t, lengths=[3, 4]), "lengths", "4")
    check_raises(ValueError, lambda: f(t, lengths=[-1, 2]), "lengths", "-1")
    check_raises(ValueError, lambda: f(t, lengths=[1, 2, 3]), "lengths", "(3,)", "(2,)")
    check_raises(ValueError, lambda: f(t, lengths=np.ones((2, 2), dtype=int)), "lengths")
    check_raises((TypeError, ValueError), lambda: f(t, lengths=[1.5, 2]), "lengths")
    check_raises((TypeError, ValueError), lambda: f(t, lengths=np.array([1.0, np.nan])), "lengths")
    check_raises((TypeError, ValueError), lambda: f(t, lengths=["a", "b"]), "lengths")
    check_raises((TypeError, ValueError), lambda: f(t, lengths=[True, True]), "lengths")


@pytest.mark.parametrize("name", DTW_ALL)
def test_dtw_lengths_and_band(name):
    f = DTW_ALL[name]
    t = np.zeros((2, 3, 4))
    check_raises(ValueError, lambda: f(t, lengths=([0, 3], [4, 4])), "len_a", "0")
    check_raises(ValueError, lambda: f(t, lengths=([3, 3], [4, 5])), "len_b", "5")
    check_raises(ValueError, lambda: f(t, lengths=([4, 3], [4, 4])), "len_a", "4", "[1, 3]")
    check_raises(ValueError, lambda: f(t, lengths=(3, 4, 4)), "lengths", "3")
    check_raises(ValueError, lambda: f(t, lengths=np.ones((2, 3), dtype=int)), "lengths", "(2, 3)")
    check_raises(ValueError, lambda: f(t, lengths=([1, 2, 3], [1, 2, 3])), "len_a")
    check_raises((TypeError, ValueError), lambda: f(t, lengths=([1.5, 2], [1, 2])), "len_a")
    check_raises(ValueError, lambda: f(t, band=-1), "band", "-1")
    check_raises(TypeError, lambda: f(t, band=1.5), "band", "1.5")
    check_raises(TypeError, lambda: f(t, band=True), "band")
    check_raises(TypeError, lambda: f(t, band="2"), "band")


BEYOND_INT64 = [2**63, 2**64 + 5, 2**200, np.uint64(2**63), np.uint64(2**64 - 1),
                np.array(2**63, dtype=np.uint64)]


def _band_entry_points():
    """Every public function that takes a DTW band, on small valid inputs."""
    t = _dtw_theta()
    x, y = np.ones((2, 3, 2)), np.ones((2, 4, 2))
    points = {name: (lambda band, f=f: f(t, band=band)) for name, f in DTW_ALL.items()}
    points.update({
        "dtw_features": lambda band: sm.dtw_features(x, y, band=band),
        "dtw_features_grad": lambda band: sm.dtw_features_grad(x, y, band=band),
        "dtw_sample": lambda band: sm.dtw_sample(t, 2, band=band, seed=0),
        "losses.dtw_relaxed": lambda band: sm.losses.dtw_relaxed(t, sm.dtw_path(t)[1], band=band),
        "DAG.for_dtw": lambda band: sm.DAG.for_dtw(3, 4, band),
    })
    try:
        import torch
        import smoothmax.torch as smt
    except ImportError:
        return points
    points.update({
        "torch dtw": lambda band: sm.dtw(torch.as_tensor(t), band=band),
        "torch dtw_features": lambda band: sm.dtw_features(torch.as_tensor(x), torch.as_tensor(y),
                                                           band=band),
        "torch SoftDTW": lambda band: smt.SoftDTW(band=band)(torch.as_tensor(x), torch.as_tensor(y)),
    })
    return points


@pytest.mark.parametrize("band", BEYOND_INT64, ids=repr)
def test_band_beyond_int64_is_a_value_error(band):
    """issue 11: a radius no int64 holds is a ValueError naming band at every
    entry point (before: OverflowError from the feature kernel and SoftDTW)."""
    for name, f in _band_entry_points().items():
        check_raises(ValueError, lambda: f(band), "band", "2**63 - 1")


def test_band_at_int64_max_is_no_band_everywhere():
    """sys.maxsize (and a uint64 holding it) is the unbanded result at every entry
    point, the feature kernel included (before: +inf from dtw_features)."""
    for band in (2**63 - 1, np.uint64(2**63 - 1)):
        for name, f in _band_entry_points().items():
            got, ref = f(band), f(None)
            if name == "DAG.for_dtw":
                got, ref = got[0].indptr, ref[0].indptr
            for a, b in zip(np.atleast_1d(_as_np(got)), np.atleast_1d(_as_np(ref))):
                np.testing.assert_array_equal(_as_np(a), _as_np(b), err_msg=name)


def _as_np(a):
    if isinstance(a, tuple):
        return np.concatenate([np.ravel(_as_np(b)) for b in a])
    if hasattr(a, "detach"):
        return a.detach().numpy()
    return np.asarray(a)


# ---------------------------------------------------------------------------
# the HVP direction Z


@pytest.mark.parametrize("fn,theta", [(sm.dtw_hvp, _dtw_theta), (sm.viterbi_hvp, _vit_theta)],
                         ids=["dtw_hvp", "viterbi_hvp"])
def test_bad_Z(fn, theta):
    t = theta()
    check_raises(ValueError, lambda: fn(t, np.zeros(t.shape[:-1])), "Z", str(t.shape))
    check_raises(ValueError, lambda: fn(t, np.zeros((2,) + t.shape)), "Z")
    check_raises(TypeError, lambda: fn(t, np.zeros(t.shape, dtype=np.int64)), "Z", "int64")
    Z = np.zeros(t.shape)
    Z.flat[3] = np.nan
    check_raises(ValueError, lambda: fn(t, Z), "Z", "NaN")
    Z.flat[3] = np.inf
    check_raises(ValueError, lambda: fn(t, Z), "Z", "inf")
    Z.flat[3] = -np.inf
    check_raises(ValueError, lambda: fn(t, Z), "Z", "inf")
    torch = pytest.importorskip("torch", reason="torch not installed")
    check_raises(TypeError, lambda: fn(t, torch.zeros(t.shape, dtype=torch.float64)), "Z")


def test_Z_of_other_float_dtype_is_cast():
    t = _dtw_theta()
    Z = np.ones(t.shape, dtype=np.float32)
    out = sm.dtw_hvp(t, Z, reg="l2")
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, sm.dtw_hvp(t, Z.astype(np.float64), reg="l2"), rtol=1e-12)


@pytest.mark.parametrize("fn,theta", [(sm.dtw_hvp, _dtw_theta), (sm.viterbi_hvp, _vit_theta)],
                         ids=["dtw_hvp", "viterbi_hvp"])
def test_Z_of_other_dtype_bad_values_named(fn, theta):
    """A Z of another dtype than theta is checked before its cast (the engines
    check only a Z of theta's dtype): a NaN is reported as a NaN, an entry
    beyond float32 as an overflow of the cast."""
    t = theta().astype(np.float32)
    Z = np.zeros(t.shape)
    Z.flat[3] = np.nan
    check_raises(ValueError, lambda: fn(t, Z), "Z", "NaN")
    Z.flat[3] = 1e300
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        check_raises(ValueError, lambda: fn(t, Z), "Z", "overflow")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
def test_viterbi_bad_score_in_any_lane(dtype, bad):
    """The compiled Viterbi checks theta as it reads it, in vectors and their
    tails: a NaN or +inf at any column of a row (S across the vector widths
    and tail splits) is an error for the value and the gradient."""
    rng = np.random.default_rng(3)
    for S in (5, 7, 8, 9, 12, 14, 15, 16, 17, 23, 24, 31):
        theta = rng.normal(size=(2, 3, S, S)).astype(dtype)
        for col in range(S):
            t = theta.copy()
            t[1, 2, S - 1, col] = bad
            for fn in (sm.viterbi, sm.viterbi_grad):
                with pytest.raises(ValueError, match="theta"):
                    fn(t)


def _lib_converter(lib):
    """NumPy arrays as they are, or as torch CPU tensors sharing their memory."""
    if lib == "numpy":
        return lambda a: a
    torch = pytest.importorskip("torch")  # (in the test extras: the suite runs it)
    return torch.from_numpy


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("where,bad,word", [("theta", np.nan, "NaN"), ("theta", -np.inf, "-inf"),
                                            ("Z", np.nan, "NaN"), ("Z", np.inf, "inf"),
                                            ("Z", -np.inf, "inf")],
                         ids=["theta-nan", "theta-neginf", "Z-nan", "Z-posinf", "Z-neginf"])
@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_dtw_bad_value_anywhere(dtype, where, bad, word, lib):
    """The compiled DTW checks NumPy input and torch CPU tensors itself, item by
    item, on the thread that computes it: a NaN or forbidden infinity anywhere
    (any item, any position within the vectors of the check, past the
    lengths, outside the band; a batch split over threads or one problem's
    tiles shared by them) is the entry point's error, and +inf in theta stays
    a mask."""
    conv = _lib_converter(lib)
    rng = np.random.default_rng(5)
    sm.set_num_threads(2)
    try:
        # a batch on one thread (small), with lengths, with a band; a batch
        # split over two threads; one problem's tiles shared by two threads
        for shape, kw in [((3, 7, 9), {}),
                          ((3, 7, 9), {"lengths": (np.array([7, 3, 5]), np.array([9, 4, 2]))}),
                          ((2, 11, 13), {"band": 1}), ((4, 128, 128), {}), ((1, 600, 600), {})]:
            theta = rng.random(shape).astype(dtype)
            Z = rng.standard_normal(shape).astype(dtype)
            cells = [(b, i, j) for b in range(shape[0]) for i in range(shape[1]) for j in range(shape[2])]
            for k in rng.choice(len(cells), size=min(len(cells), 8), replace=False):
                t, z = theta.copy(), Z.copy()
                (t if where == "theta" else z)[cells[k]] = bad
                t, z = conv(t), conv(z)
                calls = [lambda: sm.dtw_hvp(t, z, **kw)]
                if where == "theta":
                    calls += [lambda: sm.dtw(t, **kw), lambda: sm.dtw_grad(t, **kw),
                              lambda: sm.dtw_path(t, **kw)]
                for call in calls:
                    check_raises(ValueError, call, where, word)
            t = theta.copy()
            t[:, 0, 0] = np.inf  # a mask, not an error
            assert np.all(np.asarray(sm.dtw_hvp(conv(t), conv(Z), **kw)) == 0)
    finally:
        sm.set_num_threads(None)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "posinf", "neginf"])
@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_viterbi_hvp_bad_Z_anywhere(dtype, bad, lib):
    """The compiled Viterbi HVP checks a NumPy Z (or a torch CPU tensor) itself,
    item by item, on the thread that computes it: NaN or an infinity anywhere
    (any item, past the lengths, a batch on one thread or split over two) is
    the entry point's error about Z."""
    conv = _lib_converter(lib)
    rng = np.random.default_rng(6)
    sm.set_num_threads(2)
    try:
        for shape, kw in [((3, 5, 4, 4), {}), ((3, 5, 4, 4), {"lengths": np.array([5, 2, 1])}),
                          ((8, 64, 8, 8), {})]:  # the last: split over two threads
            theta = rng.normal(size=shape).astype(dtype)
            Z = rng.normal(size=shape).astype(dtype)
            for k in rng.choice(Z.size, size=8, replace=False):
                z = Z.copy()
                z.flat[k] = bad
                check_raises(ValueError, lambda: sm.viterbi_hvp(conv(theta), conv(z), **kw), "Z",
                             "NaN" if np.isnan(bad) else "inf")
            t = theta.copy()
            t.flat[0] = np.nan  # theta is reported first, as the host checks do
            z = Z.copy()
            z.flat[-1] = bad
            check_raises(ValueError, lambda: sm.viterbi_hvp(conv(t), conv(z), **kw), "theta", "NaN")
    finally:
        sm.set_num_threads(None)


@pytest.mark.parametrize("bad,word", [(np.nan, "NaN"), (np.inf, "+inf")], ids=["nan", "posinf"])
@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_passes_the_engine_does_not_check_keep_a_host_check(bad, word, lib):
    """The DAG's compiled passes do not check their weights: the entry points
    and the torch operators must (``_dispatch.engine_checked`` claims no
    operand of theirs). A NaN or a +inf weight, in any item, is an error of
    the value, the gradient and the HVP, and so is one in the HVP's direction."""
    conv = _lib_converter(lib)
    g, _ = sm.DAG.for_dtw(6, 5)
    rng = np.random.default_rng(7)
    for b in range(3):
        W = rng.random((3, g.n_edges))
        W[b, rng.integers(g.n_edges)] = bad
        U = np.ones((3, g.n_edges))
        U[b, rng.integers(g.n_edges)] = bad
        W, W_ok, U, U_ok = conv(W), conv(np.ones((3, g.n_edges))), conv(U), conv(np.ones((3, g.n_edges)))
        for call in (lambda: sm.dag(W, g), lambda: sm.dag_grad(W, g), lambda: sm.dag_hvp(W, U_ok, g),
                     lambda: sm.dag_hvp(W_ok, U, g)):
            check_raises(ValueError, call, word)


# ---------------------------------------------------------------------------
# on every backend: the same errors, inputs untouched


def test_backend_errors_and_inputs_untouched(backend):
    t = np.arange(12, dtype=np.float64).reshape(3, 4) / 7
    t[0, 0] = np.nan
    tb = backend.asarray(t)
    check_raises(ValueError, lambda: sm.dtw(tb), "theta", "NaN")
    check_raises(ValueError, lambda: sm.dtw_grad(backend.asarray(np.zeros(3))), "theta")
    check_raises(TypeError, lambda: sm.dtw(backend.asarray(np.zeros((3, 4), dtype=np.int64))), "theta")
    v = np.zeros((2, 3, 3))
    v[1, 1, 1] = np.inf
    check_raises(ValueError, lambda: sm.viterbi(backend.asarray(v)), "theta", "+inf")
    good = backend.asarray(np.zeros((2, 3, 3)))
    check_raises(ValueError, lambda: sm.viterbi_hvp(good, backend.asarray(np.zeros((2, 3, 2)))), "Z")
    check_raises(ValueError, lambda: sm.viterbi(good, lengths=backend.asarray(np.array([3]))), "lengths")
    check_raises(ValueError, lambda: sm.viterbi(good, gamma=0.0), "gamma")
    check_raises(ValueError, lambda: sm.smooth_max(good, reg="max"), "reg")
    check_raises(TypeError, lambda: sm.smooth_argmax(backend.asarray(np.zeros(3, dtype=np.int32))), "x")
    np.testing.assert_array_equal(backend.to_numpy(tb), t)


def test_failed_calls_leave_inputs_untouched():
    t = _vit_theta()
    t[0, 0, 1] = -np.inf
    keep = t.copy()
    L = np.array([5])
    with pytest.raises(ValueError):
        sm.viterbi_grad(t, lengths=L)
    Z = np.full(t.shape, np.nan)
    with pytest.raises(ValueError):
        sm.viterbi_hvp(t, Z)
    np.testing.assert_array_equal(t, keep)
    np.testing.assert_array_equal(L, [5])
    assert np.isnan(Z).all()


def test_array_likes_are_accepted():
    """Nested lists are array-likes (float64); lists of ints count as integer-valued floats."""
    v = sm.dtw([[0.0, 1.0], [1.0, 0.0]], reg="hard")
    assert isinstance(v, np.ndarray) and v.dtype == np.float64
    assert v == 0.0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_Z_check_huge_finite_accepted_and_each_non_finite_rejected(dtype):
    """The Z check sums the entries first (one pass, no BLAS); huge finite
    directions overflow that sum and must still be accepted, without an
    overflow warning, and each non-finite kind be named."""
    big = np.finfo(dtype).max / 2
    t = np.zeros((2, 3, 3), dtype)
    Z = np.full(t.shape, big, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isfinite(sm.viterbi_hvp(t, Z)).all()
    for bad, word in [(np.nan, "NaN"), (np.inf, "+inf"), (-np.inf, "-inf")]:
        Zb = Z.copy()
        Zb[1, 2, 0] = bad
        check_raises(ValueError, lambda: sm.viterbi_hvp(t, Zb), "Z", word)


def test_sparse_torch_tensor_is_a_type_error_naming_the_argument():
    torch = pytest.importorskip("torch")
    theta = torch.rand(1, 3, 4).to_sparse()
    with pytest.raises(TypeError, match=r"theta must be a dense \(strided\).*sparse_coo"):
        sm.dtw(theta)


class _WithLayout(np.ndarray):
    """An array carrying a non-torch ``layout`` attribute, as JAX >= 0.11 arrays
    and tracers do (``AutoLayout``): not a sparse tensor."""

    layout = "AutoLayout"


def test_a_layout_attribute_of_another_library_is_not_a_torch_layout():
    theta = np.random.default_rng(0).random((1, 3, 4))
    assert sm.dtw(theta.view(_WithLayout)) == pytest.approx(sm.dtw(theta))



def test_checks_follow_adapters_registered_later(monkeypatch):
    """The entry points look up a backend's checks once (``_problem.checks_for``
    keeps them: a call's fixed cost); an adapter, or an adapter's loader,
    registered after a first call of that backend must still replace the host
    checks."""
    from smoothmax import _problem, _validation

    monkeypatch.setattr(_problem, "_ADAPTERS", dict(_problem._ADAPTERS))
    monkeypatch.setattr(_problem, "_LOADERS", dict(_problem._LOADERS))
    monkeypatch.setattr(_problem, "_CHECKS", {})
    host = (_validation.check_values, _validation.check_lengths)

    def own_values(x, xp, name, forbid):
        raise AssertionError("not called here")

    class Adapter:
        check_values = staticmethod(own_values)

    assert _problem.checks_for("later") == host
    assert _problem.checks_for("later") == host  # kept
    _problem.register_adapter("later", Adapter())
    assert _problem.checks_for("later") == (own_values, _validation.check_lengths)

    assert _problem.checks_for("loaded") == host
    _problem.register_adapter_loader("loaded", lambda: _problem.register_adapter("loaded", Adapter()))
    assert _problem.checks_for("loaded")[0] is own_values
