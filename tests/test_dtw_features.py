"""DTW between features (``dtw_features``, ``dtw_features_grad``).

Oracle: the cost-matrix path, written here independently of the library's
feature code: the pairwise cost matrix by broadcasting, ``smoothmax.dtw_grad``
on it (the tiled cost-matrix engine, itself tested against brute-force
enumeration in test_dtw.py) and the chain rule
``grad_x[i] = Σ_j E[i, j] ∂C[i, j]/∂x_i`` by explicit sums over cells.
"""
import numpy as np
import pytest

import smoothmax as sm
from smoothmax.dtw import checkpoint_rows

REGS = ("negentropy", "l2", "hard")
COSTS = ("sqeuclidean", "euclidean", "cosine")


def _oracle_one(x, y, cost, reg, gamma, band):
    """value, grad_x, grad_y of one item (x (la, d), y (lb, d)) through the cost matrix."""
    diff = x[:, None, :] - y[None, :, :]                     # (la, lb, d)
    if cost == "cosine":
        nx = np.sqrt((x * x).sum(-1))
        ny = np.sqrt((y * y).sum(-1))
        dot = (x[:, None, :] * y[None, :, :]).sum(-1)
        C = 1.0 - dot / (nx[:, None] * ny[None, :])
        # ∂C/∂x_i = -(y_j/(|x||y|) - dot x_i/(|x|^3 |y|))
        dCx = -(y[None, :, :] / (nx[:, None, None] * ny[None, :, None])
                - dot[:, :, None] * x[:, None, :] / (nx[:, None, None] ** 3 * ny[None, :, None]))
        dCy = -(x[:, None, :] / (nx[:, None, None] * ny[None, :, None])
                - dot[:, :, None] * y[None, :, :] / (nx[:, None, None] * ny[None, :, None] ** 3))
    else:
        sq = (diff * diff).sum(-1)
        if cost == "sqeuclidean":
            C = sq
            dCx = 2.0 * diff
        else:
            C = np.sqrt(sq)
            safe = np.where(C > 0, C, 1.0)
            dCx = np.where(C[:, :, None] > 0, diff / safe[:, :, None], 0.0)
        dCy = -dCx
    value, E = sm.dtw_grad(C, reg=reg, gamma=gamma, band=band)
    gx = (E[:, :, None] * dCx).sum(1)
    gy = (E[:, :, None] * dCy).sum(0)
    return value, gx, gy


def _oracle(x, y, cost, reg, gamma, la, lb, band):
    B, NA, d = x.shape
    NB = y.shape[1]
    value = np.empty(B)
    gx = np.zeros((B, NA, d))
    gy = np.zeros((B, NB, d))
    for b in range(B):
        value[b], gx[b, :la[b]], gy[b, :lb[b]] = _oracle_one(x[b, :la[b]], y[b, :lb[b]], cost, reg, gamma, band)
    return value, gx, gy


def _case(seed, B=3, max_len=11, d=None):
    rng = np.random.default_rng(seed)
    NA, NB = (int(v) for v in rng.integers(1, max_len + 1, size=2))
    d = int(rng.integers(1, 5)) if d is None else d
    x = rng.normal(size=(B, NA, d))
    y = rng.normal(size=(B, NB, d))
    la = rng.integers(1, NA + 1, size=B)
    lb = rng.integers(1, NB + 1, size=B)
    band = None if seed % 3 == 0 else int(rng.integers(0, 4))
    return x, y, la, lb, band


@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("cost", COSTS)
@pytest.mark.parametrize("seed", range(6))
def test_matches_cost_matrix_path(reg, cost, seed):
    x, y, la, lb, band = _case(seed * 7 + 1)
    gamma = 0.3 + 0.2 * seed
    want = _oracle(x, y, cost, reg, gamma, la, lb, band)
    kw = dict(cost=cost, reg=reg, gamma=gamma, lengths=(la, lb), band=band)
    v = sm.dtw_features(x, y, **kw)
    got = sm.dtw_features_grad(x, y, **kw)
    np.testing.assert_allclose(v, want[0], rtol=1e-12, atol=1e-10)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("cost", COSTS)
def test_checkpointed_backward_equals_stored(reg, cost):
    x, y, la, lb, band = _case(5, B=2, max_len=40, d=3)
    kw = dict(cost=cost, reg=reg, gamma=0.5, lengths=(la, lb), band=band)
    stored = sm.dtw_features_grad(x, y, checkpoint=x.shape[1], **kw)
    for rows in (1, 2, 3, 7):
        got = sm.dtw_features_grad(x, y, checkpoint=rows, **kw)
        for g, w in zip(got, stored):
            np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12)


def test_long_checkpointed_against_oracle():
    """Several hundred cells a side, automatic and forced strips, both against the oracle."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(1, 300, 4))
    y = rng.normal(size=(1, 260, 4))
    want = _oracle(x, y, "sqeuclidean", "negentropy", 1.0, [300], [260], 20)
    for rows in (None, 17):
        got = sm.dtw_features_grad(x, y, band=20, checkpoint=rows)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-10)


def test_checkpoint_rows_from_sizes():
    assert checkpoint_rows(100, 100) == 100                 # small: stored backward
    h = checkpoint_rows(100_000, 100_000)
    assert 200 <= h <= 250                                   # about sqrt(NA / 2)
    extra = 8 * ((100_000 // h + 2) * 100_002 + 2 * h * 100_000)
    assert extra < 0.95 * 2 ** 30
    assert checkpoint_rows(100_000, 100_000, band=50) > h    # a band: fewer cells a row


def test_float32_close_to_float64():
    x, y, la, lb, band = _case(11)
    kw = dict(lengths=(la, lb), band=band, gamma=0.7)
    want = sm.dtw_features_grad(x, y, **kw)
    got = sm.dtw_features_grad(x.astype(np.float32), y.astype(np.float32), **kw)
    for g, w in zip(got, want):
        assert g.dtype == np.float32
        np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("cost", COSTS)
def test_float32_kernel_against_float64_oracle(reg, cost):
    """float32 features: the kernel's float32 weights (checkpointed and stored
    backward, bands, lengths) against the float64 oracle on the same rounded
    features, within float32 rounding (measured: at most 1e-6 relative)."""
    rng = np.random.default_rng(4)
    full = (rng.normal(size=(2, 30, 3)), rng.normal(size=(2, 25, 3)), [30, 30], [25, 25], None)
    for seed in range(4):
        x, y, la, lb, band = full if seed == 3 else _case(seed * 5 + 2, B=3, max_len=40, d=3)
        x32, y32 = x.astype(np.float32), y.astype(np.float32)
        want = _oracle(x32.astype(np.float64), y32.astype(np.float64), cost, reg, 0.5, la, lb, band)
        for rows in (None, 3):
            kw = dict(cost=cost, reg=reg, gamma=0.5, lengths=(la, lb), band=band, checkpoint=rows)
            got = sm.dtw_features_grad(x32, y32, **kw)
            value = sm.dtw_features(x32, y32, **kw)
            np.testing.assert_array_equal(value, got[0])  # the value pass is the gradient's forward
            for g, w in zip(got, want):
                assert g.dtype == np.float32
                np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_batch_shape_and_lengths_array():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 6, 2))
    y = rng.normal(size=(2, 3, 5, 2))
    lengths = np.stack([rng.integers(1, 7, size=(2, 3)), rng.integers(1, 6, size=(2, 3))], axis=-1)
    v, gx, gy = sm.dtw_features_grad(x, y, lengths=lengths)
    assert v.shape == (2, 3) and gx.shape == x.shape and gy.shape == y.shape
    flat = sm.dtw_features_grad(x.reshape(6, 6, 2), y.reshape(6, 5, 2),
                                lengths=(lengths[..., 0].ravel(), lengths[..., 1].ravel()))
    np.testing.assert_array_equal(v.ravel(), flat[0])
    np.testing.assert_array_equal(gx.reshape(6, 6, 2), flat[1])
    # past the lengths: exactly zero
    for idx in np.ndindex(2, 3):
        assert not gx[idx][lengths[idx][0]:].any() and not gy[idx][lengths[idx][1]:].any()


def test_degenerate_rows():
    """Equal rows (Euclidean cost 0) and zero rows (cosine): finite, as the oracle's convention."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1, 6, 3))
    y = x[:, ::-1].copy()
    y[0, 2] = x[0, 2]
    got = sm.dtw_features_grad(x, y, cost="euclidean")
    want = _oracle(x, y, "euclidean", "negentropy", 1.0, [6], [6], None)
    for g, w in zip(got, want):
        assert np.all(np.isfinite(g))
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-10)
    x[0, 1] = 0.0
    v, gx, gy = sm.dtw_features_grad(x, y, cost="cosine")
    assert np.all(np.isfinite(v)) and np.all(np.isfinite(gx)) and np.all(np.isfinite(gy))
    assert not gx[0, 1].any()


def test_inputs_not_modified():
    x, y, la, lb, band = _case(2)
    x0, y0 = x.copy(), y.copy()
    sm.dtw_features_grad(x, y, cost="cosine", lengths=(la, lb), band=band)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(y, y0)


def test_progress_callback():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 50, 2))
    y = rng.normal(size=(2, 40, 2))
    seen = []
    sm.dtw_features_grad(x, y, checkpoint=8, progress=lambda done, total: seen.append((done, total)))
    assert seen and all(t == 2 * 2 * 50 for _, t in seen)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen) and seen[-1][0] == 200

    torch = pytest.importorskip("torch")
    seen = []
    X = torch.tensor(x, requires_grad=True)
    sm.dtw_features(X, torch.tensor(y), progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (200, 200)  # the value of a tensor that requires grad runs the gradient kernel

    def boom(done, total):
        raise KeyboardInterrupt("stop")

    with pytest.raises(KeyboardInterrupt):
        sm.dtw_features(x, y, progress=boom)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(cost="cityblock"), ValueError, "cost must be one of"),
    (dict(reg="max"), ValueError, "reg must be one of"),
    (dict(gamma=0.0), ValueError, "gamma"),
    (dict(band=-1), ValueError, "band"),
    (dict(checkpoint=0), ValueError, "checkpoint"),
    (dict(progress="yes"), TypeError, "progress"),
    (dict(lengths=(7, 3)), ValueError, "len_a"),
])
def test_bad_arguments(kwargs, exc, match):
    x = np.zeros((2, 4, 3)) + 1.0
    y = np.ones((2, 5, 3))
    with pytest.raises(exc, match=match):
        sm.dtw_features(x, y, **kwargs)


def test_bad_arrays():
    x = np.ones((2, 4, 3))
    with pytest.raises(ValueError, match="same batch shape and d"):
        sm.dtw_features(x, np.ones((2, 5, 2)))
    with pytest.raises(ValueError, match="same batch shape and d"):
        sm.dtw_features(x, np.ones((3, 5, 3)))
    with pytest.raises(TypeError, match="same dtype"):
        sm.dtw_features(x, np.ones((2, 5, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        sm.dtw_features(np.ones(4), np.ones(5))
    with pytest.raises(ValueError, match="NA, NB >= 1"):
        sm.dtw_features(np.ones((0, 3)), np.ones((5, 3)))
    bad = x.copy()
    bad[0, 1, 2] = np.nan
    with pytest.raises(ValueError, match="x must not contain NaN"):
        sm.dtw_features(bad, np.ones((2, 5, 3)))
    bad[0, 1, 2] = np.inf
    with pytest.raises(ValueError, match="y must not contain"):
        sm.dtw_features(np.ones((2, 5, 3)), bad)
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="same library"):
        sm.dtw_features(x, torch.ones(2, 5, 3, dtype=torch.float64))


def test_backends(backend):
    """Every backend: namespace, dtype, shape and values of the NumPy engine."""
    x, y, la, lb, band = _case(4, B=2, max_len=7)
    kw = dict(cost="sqeuclidean", lengths=(la, lb), band=band, gamma=0.8)
    want = sm.dtw_features_grad(x, y, **kw)
    for name in ("float32", "float64"):
        got = sm.dtw_features_grad(backend.asarray(x.astype(name)), backend.asarray(y.astype(name)), **kw)
        for g, w in zip(got, want):
            backend.check(g, name, w.shape)
            np.testing.assert_allclose(backend.to_numpy(g), w, rtol=1e-4 if name == "float32" else 1e-10,
                                       atol=1e-4 if name == "float32" else 1e-10)
        v = sm.dtw_features(backend.asarray(x.astype(name)), backend.asarray(y.astype(name)), **kw)
        backend.check(v, name, want[0].shape)


def test_torch_autograd():
    torch = pytest.importorskip("torch")
    x, y, la, lb, band = _case(8, B=2, max_len=6, d=2)
    X = torch.tensor(x, requires_grad=True)
    Y = torch.tensor(y, requires_grad=True)
    for cost in COSTS:
        def f(a, b):
            return sm.dtw_features(a, b, cost=cost, gamma=0.6, lengths=(la, lb), band=band)

        assert torch.autograd.gradcheck(f, (X, Y))
        assert torch.autograd.gradgradcheck(f, (X, Y))  # second order: the cost-matrix path
    value = sm.dtw_features(X, Y, lengths=(la, lb), band=band).sum()
    gx, gy = torch.autograd.grad(value, (X, Y))
    want = _oracle(x, y, "sqeuclidean", "negentropy", 1.0, la, lb, band)
    np.testing.assert_allclose(gx.numpy(), want[1], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(gy.numpy(), want[2], rtol=1e-10, atol=1e-10)
    _, gx, _ = sm.dtw_features_grad(X, Y)
    with pytest.raises(RuntimeError, match="not differentiable"):
        gx.sum().backward()


def test_jax_rules():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    x, y, la, lb, band = _case(9, B=2, max_len=6, d=2)
    want = _oracle(x, y, "cosine", "l2", 0.5, la, lb, band)

    def f(a, b):
        return sm.dtw_features(a, b, cost="cosine", reg="l2", gamma=0.5, lengths=(la, lb), band=band).sum()

    gx, gy = jax.jit(jax.grad(f, argnums=(0, 1)))(jnp.asarray(x), jnp.asarray(y))
    np.testing.assert_allclose(np.asarray(gx), want[1], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(np.asarray(gy), want[2], rtol=1e-10, atol=1e-10)
    vm = jax.vmap(lambda a, b: sm.dtw_features(a, b, cost="cosine", reg="l2", gamma=0.5,
                                                lengths=(la, lb), band=band))
    np.testing.assert_allclose(np.asarray(vm(jnp.stack([jnp.asarray(x)] * 2), jnp.stack([jnp.asarray(y)] * 2))),
                               np.stack([want[0]] * 2), rtol=1e-10)
    with pytest.raises(NotImplementedError, match="second derivatives"):
        jax.grad(lambda a: jax.grad(f)(a, jnp.asarray(y)).sum())(jnp.asarray(x))


def test_torch_softdtw_builtin_costs_use_features():
    """SoftDTW's built-in costs (the feature path) equal a callable cost (the cost-matrix path)."""
    torch = pytest.importorskip("torch")
    import smoothmax.torch as smt

    x, y, la, lb, _ = _case(12, B=3, max_len=9, d=2)
    la, lb = torch.tensor(la), torch.tensor(lb)
    for name, fn in (("sqeuclidean", smt.squared_euclidean), ("euclidean", lambda a, b: torch.cdist(a, b))):
        outs = []
        for cost in (name, fn):
            X = torch.tensor(x, requires_grad=True)
            Y = torch.tensor(y, requires_grad=True)
            loss = smt.SoftDTW(gamma=0.4, band=3, normalize=True, cost=cost)(X, Y, la, lb)
            gx, gy = torch.autograd.grad(loss.sum(), (X, Y))
            outs.append((loss.detach(), gx, gy))
        for a, b in zip(*outs):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="cost must be one of"):
        smt.SoftDTW(cost="manhattan")


@pytest.mark.parametrize("cost", COSTS)
@pytest.mark.parametrize("max_resident", [1, 3])
def test_cuda_kernels_emulated(cost, max_resident):
    """The CUDA text of the feature kernels (smx_dtwf.cu), executed by the CPU emulation of
    smoothmax._cuda, against the oracle: segments of one and two strips, lengths, a band."""
    from smoothmax._cuda import emulate, engine

    if not emulate.available():
        pytest.skip("no C++20 compiler for the CUDA emulation")
    be = emulate.EmulatedBackend(max_resident=max_resident)
    rng = np.random.default_rng(21)
    x = rng.normal(size=(2, 70, 3))
    y = rng.normal(size=(2, 9, 3))
    la, lb = np.array([70, 41]), np.array([9, 6])
    code = ("sqeuclidean", "euclidean", "cosine").index(cost)
    X, Y = x, y
    if cost == "cosine":
        X = x / np.linalg.norm(x, axis=2, keepdims=True)
        Y = y / np.linalg.norm(y, axis=2, keepdims=True)
    for reg, band in (("negentropy", None), ("l2", 4), ("hard", None)):
        want = _oracle(x, y, cost, reg, 0.6, la, lb, band)
        for K in (1, 2):
            rc = ("negentropy", "l2", "hard").index(reg)
            b = -1 if band is None else band
            value, gx, gy = engine.dtwf_run(be, X, Y, la, lb, b, rc, 0.6, code, True, K)
            if cost == "cosine":
                gx = -gx / np.linalg.norm(x, axis=2, keepdims=True)
                gy = -gy / np.linalg.norm(y, axis=2, keepdims=True)
            np.testing.assert_allclose(value, want[0], rtol=1e-12)
            np.testing.assert_allclose(engine.dtwf_run(be, X, Y, la, lb, b, rc, 0.6, code, False, K),
                                       want[0], rtol=1e-12)
            np.testing.assert_allclose(gx, want[1], rtol=1e-10, atol=1e-10)
            np.testing.assert_allclose(gy, want[2], rtol=1e-10, atol=1e-10)


def test_reused_workspace_is_rewritten(monkeypatch):
    """The kernel's workspace comes from a kept block (smoothmax._buffers, every
    size here): dirty the kept blocks (NaN bytes) and check the results."""
    from smoothmax import _buffers

    monkeypatch.setattr(_buffers, "MIN_BYTES", 0)
    sm.clear_cache()
    x, y, la, lb, band = _case(13, B=2, max_len=30, d=3)
    kw = dict(lengths=(la, lb), band=band, gamma=0.4)
    want = _oracle(x, y, "sqeuclidean", "negentropy", 0.4, la, lb, band)
    for rows in (None, 3, None):
        for block in _buffers._blocks:
            block[...] = 0xFF  # NaN in float64
        got = sm.dtw_features_grad(x, y, checkpoint=rows, **kw)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-10)
    assert _buffers._blocks, "the workspace did not come from a kept block"
    sm.clear_cache()
