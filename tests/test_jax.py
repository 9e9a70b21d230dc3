"""JAX transformations of smoothmax: one test per transformation the rules claim.

``jit``, ``vmap`` (nested), ``grad``, grad-of-grad (reverse over reverse),
``jvp`` of ``grad`` (forward over reverse), ``hessian``, against the NumPy
API results and finite differences (``jax.test_util.check_grads``), in
float32 and float64; third order raises; inputs are validated before tracing.
"""
import subprocess
import sys
import textwrap

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="JAX is not installed")
jax.config.update("jax_enable_x64", True)  # tests only; the library never sets it

import jax.numpy as jnp  # noqa: E402
from jax.test_util import check_grads  # noqa: E402

import smoothmax as sm  # noqa: E402
from smoothmax import jax as smj  # noqa: E402

REGS = ["negentropy", "l2"]

# name -> (theta shape, value, grad, hvp, keyword arguments)
CASES = {
    "dtw": ((2, 4, 5), sm.dtw, sm.dtw_grad, sm.dtw_hvp, dict(lengths=([4, 3], [5, 4]), band=2)),
    "viterbi": ((2, 4, 3, 3), sm.viterbi, sm.viterbi_grad, sm.viterbi_hvp, dict(lengths=[4, 2])),
}


def _case(name, reg, dtype=np.float64, seed=0):
    shape, value, grad, hvp, kw = CASES[name]
    rng = np.random.default_rng(seed)
    theta = (2.0 * rng.random(shape)).astype(dtype)
    Z = rng.standard_normal(shape).astype(dtype)
    kw = dict(kw, reg=reg, gamma=0.7)
    return theta, Z, value, grad, hvp, kw


def _tol(dtype):
    return dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("name", list(CASES))
def test_transformations_match_numpy(name, reg, dtype):
    theta, Z, value, grad, hvp, kw = _case(name, reg, dtype)
    v_np, E_np = grad(theta, **kw)
    H_np = hvp(theta, Z, **kw)
    t, z = jnp.asarray(theta), jnp.asarray(Z)
    f = lambda x: value(x, **kw).sum()  # noqa: E731
    tol = _tol(dtype)

    out = value(t, **kw)
    assert isinstance(out, jax.Array) and out.dtype == dtype and out.shape == theta.shape[:1]
    np.testing.assert_allclose(out, v_np, **tol)
    # jit
    np.testing.assert_allclose(jax.jit(lambda x: value(x, **kw))(t), v_np, **tol)
    # grad (and under jit)
    g = jax.grad(f)(t)
    assert g.dtype == dtype
    np.testing.assert_allclose(g, E_np, **tol)
    np.testing.assert_allclose(jax.jit(jax.grad(f))(t), E_np, **tol)
    # grad op outputs
    v2, E2 = grad(t, **kw)
    np.testing.assert_allclose(v2, v_np, **tol)
    np.testing.assert_allclose(E2, E_np, **tol)
    # jvp of grad (forward over reverse)
    _, h = jax.jvp(jax.grad(f), (t,), (z,))
    assert h.dtype == dtype
    np.testing.assert_allclose(h, H_np, **tol)
    # grad of grad (reverse over reverse)
    h2 = jax.grad(lambda x: jnp.sum(jax.grad(f)(x) * z))(t)
    np.testing.assert_allclose(h2, H_np, **tol)
    np.testing.assert_allclose(jax.jit(jax.grad(lambda x: jnp.sum(grad(x, **kw)[1] * z)))(t), H_np, **tol)
    # the hvp op
    np.testing.assert_allclose(hvp(t, z, **kw), H_np, **tol)


@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("name", list(CASES))
def test_vmap_and_nested_vmap(name, reg):
    theta, Z, value, grad, hvp, kw = _case(name, reg)
    stack = np.stack([theta, 2.0 * theta, theta + 0.5])  # (3, B, ...)
    expect_v = np.stack([value(s, **kw) for s in stack])
    expect_E = np.stack([grad(s, **kw)[1] for s in stack])
    expect_H = np.stack([hvp(s, Z, **kw) for s in stack])
    f = lambda x: value(x, **kw).sum()  # noqa: E731
    np.testing.assert_allclose(jax.vmap(lambda x: value(x, **kw))(stack), expect_v, rtol=1e-12)
    np.testing.assert_allclose(jax.vmap(jax.grad(f))(stack), expect_E, rtol=1e-12, atol=1e-12)
    hv = jax.vmap(lambda x: jax.jvp(jax.grad(f), (x,), (jnp.asarray(Z),))[1])(stack)
    np.testing.assert_allclose(hv, expect_H, rtol=1e-10, atol=1e-10)
    # nested vmap, under jit: lengths are tiled over the flattened vmapped batch
    nested = jnp.stack([stack, stack[::-1]])  # (2, 3, B, ...)
    out = jax.jit(jax.vmap(jax.vmap(lambda x: value(x, **kw))))(nested)
    np.testing.assert_allclose(out, np.stack([expect_v, expect_v[::-1]]), rtol=1e-12)
    # vmap over the direction only (theta unbatched): hvp against a basis
    basis = jnp.eye(theta.size).reshape((theta.size,) + theta.shape)[:5]
    cols = jax.vmap(lambda d: hvp(jnp.asarray(theta), d, **kw))(basis)
    np.testing.assert_allclose(cols, np.stack([hvp(theta, np.asarray(d), **kw) for d in basis]),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("name", list(CASES))
def test_hessian_is_symmetric_and_matches_hvp(name, reg):
    theta, Z, value, grad, hvp, kw = _case(name, reg)
    t = jnp.asarray(theta)
    Hm = jax.hessian(lambda x: value(x, **kw).sum())(t)
    n = theta.size
    Hm = np.asarray(Hm).reshape(n, n)
    np.testing.assert_allclose(Hm, Hm.T, atol=1e-12)
    np.testing.assert_allclose(Hm @ Z.reshape(-1), hvp(theta, Z, **kw).reshape(-1), atol=1e-10)
    Hr = jax.jacrev(jax.jacrev(lambda x: value(x, **kw).sum()))(t)  # reverse over reverse
    np.testing.assert_allclose(np.asarray(Hr).reshape(n, n), Hm, atol=1e-12)


@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("name", list(CASES))
def test_finite_differences_to_second_order(name, reg):
    theta, Z, value, grad, hvp, kw = _case(name, reg, seed=3)
    f = lambda x: value(x, **kw)  # noqa: E731
    check_grads(f, (jnp.asarray(theta),), order=2, modes=("fwd", "rev"), eps=1e-5, atol=1e-5, rtol=1e-5)


def test_hvp_op_is_linear_in_Z_and_third_order_raises():
    theta, Z, value, grad, hvp, kw = _case("dtw", "negentropy")
    t, z = jnp.asarray(theta), jnp.asarray(Z)
    H = hvp(theta, Z, **kw)
    # d/dZ <hvp(theta, Z), W> = hvp(theta, W) (symmetric Hessian); forward mode too
    # atol: entries that cancel to ~1e-16 differ in rounding when JAX's arrays run
    # on the CUDA engine and H on the CPU one
    tol = dict(rtol=1e-10, atol=1e-13 * float(np.abs(H).max()))
    np.testing.assert_allclose(jax.grad(lambda u: jnp.sum(hvp(t, u, **kw) * z))(z), H, **tol)
    np.testing.assert_allclose(jax.jvp(lambda u: hvp(t, u, **kw), (z,), (z,))[1], H, **tol)
    with pytest.raises(NotImplementedError, match="third-order derivatives are not supported"):
        jax.grad(lambda x: jnp.sum(hvp(x, z, **kw)))(t)
    with pytest.raises(NotImplementedError, match="third-order derivatives are not supported"):
        jax.jacfwd(jax.hessian(lambda x: value(x, **kw).sum()))(t)
    with pytest.raises(NotImplementedError, match="third-order derivatives are not supported"):
        jax.grad(lambda x: jnp.sum(jax.grad(lambda y: jnp.sum(jax.grad(
            lambda w: value(w, **kw).sum())(y) * z))(x)))(t)


def test_decode_and_path_under_jit():
    theta, *_ = _case("viterbi", "negentropy")
    score, tags = jax.jit(lambda x: sm.viterbi_decode(x, lengths=[4, 2]))(jnp.asarray(theta))
    s_np, t_np = sm.viterbi_decode(theta, lengths=[4, 2])
    np.testing.assert_allclose(score, s_np)
    np.testing.assert_array_equal(tags, t_np)
    assert jnp.issubdtype(tags.dtype, jnp.integer) and tags.shape == theta.shape[:2]
    theta, *_ = _case("dtw", "negentropy")
    cost, Y = jax.vmap(lambda x: sm.dtw_path(x, band=1))(jnp.asarray(theta)[None])
    c_np, Y_np = sm.dtw_path(theta, band=1)
    np.testing.assert_allclose(cost[0], c_np)
    np.testing.assert_array_equal(Y[0], Y_np)


def test_validation_happens_before_tracing():
    theta, *_ = _case("dtw", "negentropy")
    bad = jnp.asarray(theta).at[0, 0, 0].set(jnp.nan)
    with pytest.raises(ValueError, match="NaN"):
        sm.dtw(bad)
    with pytest.raises(ValueError, match="gamma"):
        jax.jit(lambda x: sm.dtw(x, gamma=-1.0))(jnp.asarray(theta))
    with pytest.raises(ValueError, match="lengths"):
        jax.jit(lambda x: sm.dtw(x, lengths=([9, 1], [1, 1])))(jnp.asarray(theta))


@pytest.mark.skipif(not hasattr(sm, "DAG"), reason="smoothmax.DAG is not exported yet")
def test_dag_transformations():
    graph, _ = sm.DAG.for_viterbi(3, 2)
    rng = np.random.default_rng(5)
    w = rng.random((2, graph.n_edges))
    Z = rng.standard_normal(w.shape)
    f = lambda x: sm.dag(x, graph).sum()  # noqa: E731
    np.testing.assert_allclose(jax.grad(f)(jnp.asarray(w)), sm.dag_grad(w, graph)[1], rtol=1e-12)
    h = jax.jvp(jax.grad(f), (jnp.asarray(w),), (jnp.asarray(Z),))[1]
    np.testing.assert_allclose(h, sm.dag_hvp(w, Z, graph), rtol=1e-10, atol=1e-12)
    out = jax.vmap(lambda x: sm.dag(x, graph))(jnp.stack([w, w]))
    np.testing.assert_allclose(out, np.stack([sm.dag(w, graph)] * 2), rtol=1e-12)


def test_soft_dtw_convenience():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, 5, 3)))
    y = jnp.asarray(rng.standard_normal((2, 4, 3)))
    C = np.sum((np.asarray(x)[:, :, None] - np.asarray(y)[:, None]) ** 2, -1)
    np.testing.assert_allclose(smj.soft_dtw(x, y, gamma=0.5), sm.dtw(C, gamma=0.5), rtol=1e-10)
    div = jax.jit(lambda a, b: smj.soft_dtw(a, b, normalize=True, lengths=([5, 3], [4, 2])))
    np.testing.assert_allclose(smj.soft_dtw(x, x, normalize=True), 0.0, atol=1e-12)
    # divergence with lengths equals the one on the truncated series
    full = smj.soft_dtw(x[1:, :3], y[1:, :2], normalize=True)
    np.testing.assert_allclose(div(x, y)[1], full[0], rtol=1e-10)
    gx = jax.grad(lambda a: smj.soft_dtw(a, y, normalize=True).sum())(x)
    assert gx.shape == x.shape and bool(jnp.all(jnp.isfinite(gx)))
    # gradient w.r.t. the series (through the cost) against a central difference
    d = jnp.asarray(rng.standard_normal(x.shape))
    f = lambda a: smj.soft_dtw(a, y, gamma=0.5).sum()  # noqa: E731
    fd = (f(x + 1e-6 * d) - f(x - 1e-6 * d)) / 2e-6
    np.testing.assert_allclose(jnp.sum(jax.grad(f)(x) * d), fd, rtol=1e-6)


def test_float32_without_x64():
    """The library never enables x64: float32 works on a default JAX configuration."""
    code = textwrap.dedent("""
        import jax, jax.numpy as jnp, numpy as np, smoothmax as sm
        assert not jax.config.jax_enable_x64
        t = jnp.asarray(np.random.default_rng(0).random((2, 4, 3, 3)), dtype=jnp.float32)
        f = lambda x: sm.viterbi(x, lengths=[4, 2]).sum()
        g = jax.jit(jax.grad(f))(t)
        h = jax.jvp(jax.grad(f), (t,), (t,))[1]
        s, tags = jax.jit(lambda x: sm.viterbi_decode(x, lengths=[4, 2]))(t)
        assert g.dtype == h.dtype == s.dtype == jnp.float32, (g.dtype, h.dtype, s.dtype)
        assert tags.dtype == jnp.int32 and int(tags[1, 3]) == -1
        np.testing.assert_allclose(g, sm.viterbi_grad(np.asarray(t), lengths=[4, 2])[1], rtol=1e-5)
        print("ok")
    """)
    import os

    env = dict(os.environ)
    env.pop("JAX_ENABLE_X64", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]), timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]
