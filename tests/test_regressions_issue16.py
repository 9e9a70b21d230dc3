"""Regression tests for issue 16: each case the broad attack found, against an oracle.

Oracles are independent of the code under test: the unbanded call (for bands
beyond the lengths), brute-force enumeration in ``_oracles`` on a problem
rescaled by the exact identity ``DP_γ(θ) = c·DP_{γ/c}(θ/c)`` (for extreme γ
and θ), finite differences (loss gradients), and a fresh interpreter for
anything that used to crash the process.
"""
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import smoothmax as sm
from smoothmax import losses

from _oracles import dtw_brute, viterbi_brute
from test_losses import fd_grad

jax = pytest.importorskip("jax")
jnp = jax.numpy
torch = pytest.importorskip("torch")


def run_isolated(code):
    """Run ``code`` in a fresh interpreter; return (returncode, output)."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120)
    return proc.returncode, proc.stdout + proc.stderr


# ---------------------------------------------------------------------------
# the DAG is immutable: no reassigned array reaches a kernel


def test_dag_reassigned_parents_does_not_crash():
    """The reproduction of the issue, in its own process: it used to end in SIGSEGV."""
    rc, out = run_isolated("""
        import numpy as np, smoothmax as sm
        g, _ = sm.DAG.for_dtw(4, 4)
        try:
            g.parents = np.full(g.n_edges, 10**9)
        except AttributeError as e:
            print("refused:", e)
        print("value", float(sm.dag(np.zeros(g.n_edges), g)))
    """)
    assert rc == 0, out
    assert "refused:" in out and "parents" in out


@pytest.mark.parametrize("attr", ["indptr", "parents", "child", "n_nodes", "n_edges"])
def test_dag_attributes_cannot_be_reassigned_or_deleted(attr):
    g, _ = sm.DAG.for_dtw(3, 3)
    with pytest.raises(AttributeError, match=attr):
        setattr(g, attr, np.zeros(3, dtype=np.int64))
    with pytest.raises(AttributeError, match=attr):
        delattr(g, attr)


def test_dag_arrays_are_read_only_copies():
    """Writing into what the attributes return (even after unlocking it) changes nothing."""
    g, index = sm.DAG.for_dtw(4, 4)
    w = -np.random.default_rng(0).random(g.n_edges)
    before = sm.dag_grad(w, g)
    for name in ("indptr", "parents"):
        arr = getattr(g, name)
        with pytest.raises(ValueError):
            arr[0] = 7
        arr.setflags(write=True)  # a copy: allowed, and harmless
        arr[:] = 10**9
    after = sm.dag_grad(w, g)
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_array_equal(before[1], after[1])
    assert g.parents.max() < g.n_nodes


def test_dag_pickles_and_copies():
    """Immutability must not break pickling or copying (DataLoader workers, deepcopy of a model)."""
    import copy
    import pickle

    g, _ = sm.DAG.for_dtw(3, 4, 1)
    w = -np.random.default_rng(1).random(g.n_edges)
    for h in (pickle.loads(pickle.dumps(g)), copy.copy(g), copy.deepcopy(g)):
        assert isinstance(h, sm.DAG) and h.n_edges == g.n_edges
        np.testing.assert_array_equal(h.parents, g.parents)
        np.testing.assert_array_equal(sm.dag(w, h), sm.dag(w, g))


# ---------------------------------------------------------------------------
# bands beyond the lengths are no band, for every integer type and size


HUGE_BANDS = [sys.maxsize, 2**63 - 1 - 9, np.int64(2**62), np.uint64(2**63 - 1),
              np.array(2**63 - 1, dtype=np.uint64), 9, 5]


@pytest.mark.parametrize("band", HUGE_BANDS, ids=repr)
@pytest.mark.parametrize("reg", ["negentropy", "l2", "hard"])
def test_band_beyond_lengths_is_no_band(band, reg):
    """band >= max(NA, NB) = 5 allows every cell: the unbanded results, exactly
    (the issue: +inf and E = 0 for sys.maxsize, OverflowError from 2**63)."""
    rng = np.random.default_rng(3)
    theta = rng.random((2, 4, 5))
    Z = rng.standard_normal(theta.shape)
    L = (np.array([4, 2]), np.array([5, 3]))
    for kw in ({}, {"lengths": L}):
        ref_v, ref_E = sm.dtw_grad(theta, reg=reg, **kw)
        v, E = sm.dtw_grad(theta, reg=reg, band=band, **kw)
        np.testing.assert_array_equal(v, ref_v)
        np.testing.assert_array_equal(E, ref_E)
        np.testing.assert_array_equal(sm.dtw(theta, reg=reg, band=band, **kw), ref_v)
        np.testing.assert_array_equal(sm.dtw_hvp(theta, Z, reg=reg, band=band, **kw),
                                      sm.dtw_hvp(theta, Z, reg=reg, **kw))
        for a, b in zip(sm.dtw_path(theta, band=band, **kw), sm.dtw_path(theta, **kw)):
            np.testing.assert_array_equal(a, b)
    # against the brute-force oracle without a band
    brute = dtw_brute(theta[0], reg, 1.0)
    np.testing.assert_allclose(sm.dtw_grad(theta[0], reg=reg, band=band)[1], brute["E"], atol=1e-10)


@pytest.mark.parametrize("band", [sys.maxsize, np.uint64(2**63 - 1)], ids=repr)
def test_huge_band_in_dag_sampling_and_losses(band):
    rng = np.random.default_rng(4)
    theta = rng.random((3, 4))
    g, index = sm.DAG.for_dtw(3, 4, band)
    g0, index0 = sm.DAG.for_dtw(3, 4)
    np.testing.assert_array_equal(g.indptr, g0.indptr)
    np.testing.assert_array_equal(g.parents, g0.parents)
    Y = sm.dtw_sample(theta, 50, band=band, seed=0)
    assert Y.shape == (50, 3, 4) and np.all(Y.sum(axis=(1, 2)) >= 4)  # every sample is a path
    np.testing.assert_array_equal(Y, sm.dtw_sample(theta, 50, seed=0))
    target = sm.dtw_path(theta)[1]
    a = losses.dtw_relaxed(theta, target, band=band, return_grad=True)
    b = losses.dtw_relaxed(theta, target, return_grad=True)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_negative_band_rejected_everywhere():
    for fn in (lambda: sm.DAG.for_dtw(4, 4, -1), lambda: sm.dtw(np.ones((4, 4)), band=-1),
               lambda: sm.DAG.for_dtw(4, 4, np.int64(-3))):
        with pytest.raises(ValueError, match="band"):
            fn()
    with pytest.raises(TypeError, match="band"):
        sm.DAG.for_dtw(4, 4, 1.5)


# ---------------------------------------------------------------------------
# gamma at its edges


@pytest.mark.parametrize("fn", ["dtw", "viterbi", "dag", "smooth_max"])
@pytest.mark.parametrize("dtype,gamma", [(np.float64, 5e-309), (np.float64, 1e-305),
                                         (np.float32, 1e-36), (np.float32, 1e-300)])
def test_gamma_below_floor_is_a_clear_error(fn, dtype, gamma):
    args = {"dtw": (np.ones((3, 3), dtype),), "viterbi": (np.ones((2, 2, 2), dtype),),
            "dag": (np.ones(sm.DAG.for_dtw(2, 2)[0].n_edges, dtype), sm.DAG.for_dtw(2, 2)[0]),
            "smooth_max": (np.ones(3, dtype),)}[fn]
    with pytest.raises(ValueError, match=r"gamma must be in \[1e-(300|35)"):
        getattr(sm, fn)(*args, gamma=gamma)
    getattr(sm, fn)(*args, gamma=gamma, reg="hard")  # hard ignores gamma


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reg", ["negentropy", "l2"])
def test_gamma_at_floor_recovers_the_hard_path(dtype, reg):
    """At the smallest accepted γ the expected path is the hard path (the
    issue: NaN gradients below ~5.6e-309); no NaN in value, E or HVP."""
    from smoothmax._validation import GAMMA_MIN

    gamma = GAMMA_MIN[np.dtype(dtype).name]
    rng = np.random.default_rng(5)
    theta = rng.random((4, 5)).astype(dtype)
    v, E = sm.dtw_grad(theta, reg=reg, gamma=gamma)
    brute = dtw_brute(theta.astype(np.float64), "hard", 1.0)
    np.testing.assert_allclose(v, brute["best"], rtol=1e-5)
    np.testing.assert_array_equal(E, brute["Ybest"])
    assert np.all(np.isfinite(sm.dtw_hvp(theta, np.zeros_like(theta), reg=reg, gamma=gamma)))
    th = rng.standard_normal((3, 3, 3)).astype(dtype)
    v, E = sm.viterbi_grad(th, reg=reg, gamma=gamma)
    vb = viterbi_brute(th.astype(np.float64), "hard", 1.0)
    np.testing.assert_allclose(v, vb["best"], rtol=1e-5)
    np.testing.assert_array_equal(E, vb["Ybest"])
    q = sm.smooth_argmax(np.array([0.0, 1.0, 1.0 - 1e-3], dtype), reg=reg, gamma=gamma)
    np.testing.assert_array_equal(q, [0, 1, 0])


@pytest.mark.parametrize("reg", ["negentropy", "l2"])
@pytest.mark.parametrize("gamma", [1e300, 1e307, 1.7e308])
def test_huge_gamma_gives_the_rescaled_answer(reg, gamma):
    """E(θ, γ) = E(θ/c, γ/c): compared with brute force on the rescaled problem
    (the issue: NaN E near γ = 1e308). The value overflows to -inf/+inf only
    when it is beyond the float range."""
    rng = np.random.default_rng(6)
    theta = rng.random((3, 4))
    c = 2.0 ** 1000
    brute = dtw_brute(theta / c, reg, gamma / c)
    v, E = sm.dtw_grad(theta, reg=reg, gamma=gamma)
    np.testing.assert_allclose(E, brute["E"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(v, brute["value"] * c, rtol=1e-9)  # inf == inf when it overflows
    th = rng.standard_normal((3, 2, 2))
    vb = viterbi_brute(th / c, reg, gamma / c)
    v, E = sm.viterbi_grad(th, reg=reg, gamma=gamma)
    np.testing.assert_allclose(E, vb["E"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(v, vb["value"] * c, rtol=1e-9)
    Z = rng.standard_normal(th.shape)
    vb = viterbi_brute(th / c, reg, gamma / c, Z=Z)
    # the HVP scales as 1/γ: compare γ·HVP, of order 1
    np.testing.assert_allclose(sm.viterbi_hvp(th, Z, reg=reg, gamma=gamma) * gamma, vb["Edot"] / c * gamma,
                               rtol=1e-6, atol=1e-9)
    Zd = rng.standard_normal(theta.shape)
    db = dtw_brute(theta / c, reg, gamma / c, Z=Zd)
    np.testing.assert_allclose(sm.dtw_hvp(theta, Zd, reg=reg, gamma=gamma) * gamma, db["Edot"] / c * gamma,
                               rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------------------
# magnitudes near the largest float


@pytest.mark.parametrize("dtype,big", [(np.float64, 1e308), (np.float64, -1.5e308), (np.float32, 3e38)])
@pytest.mark.parametrize("reg", ["negentropy", "l2", "hard"])
def test_huge_theta_gives_the_right_answer(dtype, big, reg):
    """Finite θ near the largest float, score gaps ~1e307 ≫ γ: E is the hard path
    (brute force on θ/c, hard has no γ), the HVP is 0, the value has the sign of
    the rescaled value (±inf where beyond the range). The issue: NaN Viterbi
    marginals, DTW (inf, E = 0)."""
    rng = np.random.default_rng(7)
    c = 2.0 ** 100
    th = (big * (0.5 + 0.5 * rng.random((3, 2, 2)))).astype(dtype)
    Z = rng.standard_normal(th.shape).astype(dtype)
    vb = viterbi_brute(th.astype(np.float64) / c, "hard", 1.0)
    v, E = sm.viterbi_grad(th, reg=reg)
    np.testing.assert_array_equal(E, vb["Ybest"])
    assert np.sign(v) == np.sign(vb["best"]) and (np.isinf(v) or np.isclose(v, vb["best"] * c, rtol=1e-5))
    np.testing.assert_array_equal(sm.viterbi_hvp(th, Z, reg=reg), np.zeros_like(th))
    np.testing.assert_array_equal(sm.viterbi_decode(th)[1], vb["tags"])
    if big > 0:  # DTW costs: finite, positive, near the largest float
        cost = th.reshape(3, 4)
        db = dtw_brute(cost.astype(np.float64) / c, "hard", 1.0)
        v, E = sm.dtw_grad(cost, reg=reg)
        np.testing.assert_array_equal(E, db["Ybest"])
        assert v > 0
        np.testing.assert_array_equal(sm.dtw_path(cost)[1], db["Ybest"])
        np.testing.assert_array_equal(sm.dtw_hvp(cost, Z.reshape(3, 4), reg=reg), np.zeros((3, 4)))


@pytest.mark.parametrize("engine", ["numpy", "array_api_strict"])
@pytest.mark.parametrize("reg", ["negentropy", "l2"])
@pytest.mark.parametrize("dtype,big", [(np.float64, 1e308), (np.float32, 3e38)])
def test_constant_huge_theta_of_the_issue(reg, dtype, big, engine):
    """θ = 1e308 everywhere (the issue's case), on the compiled and the reference
    engine. Viterbi: every path has T edges, so E is that of θ = 0 (brute force);
    DTW: the diagonal has the fewest cells and wins by ~1e308 ≫ γ, so E is the
    hard path of a constant cost."""
    to = (lambda a: a) if engine == "numpy" else pytest.importorskip("array_api_strict").asarray
    v, E = sm.viterbi_grad(to(np.full((3, 2, 2), big, dtype)), reg=reg)
    tol = 1e-12 if dtype == np.float64 else 1e-6
    np.testing.assert_allclose(np.asarray(E), viterbi_brute(np.zeros((3, 2, 2)), reg, 1.0)["E"], atol=tol)
    assert float(v) == np.inf
    v, E = sm.dtw_grad(to(np.full((3, 3), big, dtype)), reg=reg)
    np.testing.assert_array_equal(np.asarray(E), dtw_brute(np.ones((3, 3)), "hard", 1.0)["Ybest"])
    assert float(v) == np.inf


def test_genuinely_unreachable_stays_inf_with_zero_E():
    """The rescaling must not touch an infinite value that comes from masks."""
    theta = np.ones((3, 3))
    theta[1, :] = np.inf
    v, E = sm.dtw_grad(theta)
    assert v == np.inf and np.all(E == 0)
    th = np.zeros((2, 2, 2))
    th[1] = -np.inf
    v, E = sm.viterbi_grad(th)
    assert v == -np.inf and np.all(E == 0)


def test_theta_too_large_for_gamma_is_a_clear_error():
    """θ/γ beyond what any rescaling can represent: a ValueError naming both."""
    with pytest.raises(ValueError, match="theta.*gamma"):
        sm.viterbi_grad(np.full((4, 2, 2), 1.7e308), gamma=1e-300)


# ---------------------------------------------------------------------------
# the relaxed loss: a finite gradient wherever the loss is finite


@pytest.mark.parametrize("reg", ["negentropy", "l2", "hard"])
@pytest.mark.parametrize("divergence", ["kl", "l2"])
def test_relaxed_loss_gradient_defined_and_equal_in_every_framework(reg, divergence):
    """The issue: ValueError 'Z must not contain -inf' with return_grad, NaN from
    torch backward / jax.grad, when a target tag has marginal 0."""
    rng = np.random.default_rng(8)
    for scale in (10.0, 0.3):
        theta = scale * rng.standard_normal((2, 4, 3, 3))
        tags = np.array([[0, 1, 2, 0], [2, 2, 1, 0]])
        L = np.array([4, 3])
        loss, grad = losses.viterbi_relaxed(theta, tags, reg=reg, divergence=divergence, lengths=L,
                                            return_grad=True)
        assert np.all(np.isfinite(grad))
        infinite = ~np.isfinite(loss)
        assert np.all(loss[infinite] == np.inf)
        assert np.all(grad[infinite] == 0)
        t = torch.tensor(theta, requires_grad=True)
        lt = losses.viterbi_relaxed(t, torch.tensor(tags), reg=reg, divergence=divergence,
                                    lengths=torch.tensor(L))
        lt.sum().backward()
        np.testing.assert_allclose(t.grad.numpy(), grad, rtol=1e-9, atol=1e-12)
        gj = jax.grad(lambda x: losses.viterbi_relaxed(x, jnp.asarray(tags), reg=reg, divergence=divergence,
                                                       lengths=L).sum())(jnp.asarray(theta))
        np.testing.assert_allclose(np.asarray(gj), grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("reg,divergence", [("negentropy", "kl"), ("negentropy", "l2"), ("l2", "l2")])
def test_relaxed_loss_gradient_matches_finite_differences(reg, divergence):
    """Where the loss is differentiable (negentropy everywhere; l2 at a point with
    a stable support), the returned gradient is the derivative."""
    rng = np.random.default_rng(9)
    theta = rng.standard_normal((4, 3, 3))
    tags = np.array([1, 0, 2, 2])
    f = lambda x: float(losses.viterbi_relaxed(x, tags, reg=reg, divergence=divergence))  # noqa: E731
    _, grad = losses.viterbi_relaxed(theta, tags, reg=reg, divergence=divergence, return_grad=True)
    np.testing.assert_allclose(grad, fd_grad(f, theta), rtol=1e-5, atol=1e-7)


def test_relaxed_kl_with_l2_zero_marginal_is_inf_with_zero_gradient():
    theta = np.zeros((2, 2, 2))
    theta[:, 1, :] = 5.0  # tag 1 everywhere gets all the l2 mass; tag 0 marginal 0
    loss, grad = losses.viterbi_relaxed(theta, [0, 0], reg="l2", divergence="kl", return_grad=True)
    assert loss == np.inf and np.all(grad == 0)
    loss, grad = losses.viterbi_relaxed(theta, [1, 1], reg="l2", divergence="kl", return_grad=True)
    assert loss == 0 and np.all(np.isfinite(grad))


# ---------------------------------------------------------------------------
# errors that name the argument


def test_from_edges_errors_name_edges():
    with pytest.raises(ValueError, match=r"edges.*\(0, -1\)"):
        sm.DAG.from_edges([(0, -1)], 3)
    with pytest.raises(ValueError, match="edges.*n_nodes = 3"):
        sm.DAG.from_edges([(0, 1), (1, 3)], 3)
    with pytest.raises(ValueError, match="edges.*shape"):
        sm.DAG.from_edges([(0, 1, 2)], 3)
    with pytest.raises(TypeError, match="edges"):
        sm.DAG.from_edges([(0.5, 1)], 3)
    with pytest.raises(ValueError, match="n_nodes"):
        sm.DAG.from_edges([(0, 1)], 1)
    with pytest.raises(TypeError, match="n_nodes"):
        sm.DAG.from_edges([(0, 1)], 2.0)


@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_torch_sparse_tensors_rejected_by_name(layout):
    dense = torch.rand(3, 4, dtype=torch.float64)
    sp = dense.to_sparse() if layout == "coo" else dense.to_sparse_csr()
    with pytest.raises(TypeError, match="theta must be a dense"):
        sm.dtw(sp)
    with pytest.raises(TypeError, match="Z must be a dense"):
        sm.dtw_hvp(dense, sp)
    with pytest.raises(TypeError, match="x must be a dense"):
        sm.smooth_max(sp)
    with pytest.raises(TypeError, match="lengths must be a dense"):
        sm.viterbi(torch.rand(2, 3, 2, 2), lengths=torch.tensor([1, 2]).to_sparse())


def test_traced_lengths_under_jit_named():
    for call in (lambda x, L: sm.viterbi(x, lengths=L), lambda x, L: sm.dtw(x[..., 0, :, :], lengths=(L, L))):
        with pytest.raises(TypeError, match=r"lengths.*traced"):
            jax.jit(call)(jnp.ones((2, 3, 3, 3)), jnp.array([1, 2]))


def test_lengths_requiring_grad_rejected():
    L = torch.tensor([1.0, 2.0], requires_grad=True)
    with pytest.raises(TypeError, match="lengths.*requires grad"):
        sm.viterbi(torch.rand(2, 3, 2, 2), lengths=L)
    with pytest.raises(TypeError, match="lengths.*requires grad"):
        sm.dtw(torch.rand(2, 3, 3), lengths=(L, L))


@pytest.mark.parametrize("axis", [np.int64(0), np.int32(-2), np.uint8(1)])
def test_numpy_integer_axis_accepted(axis):
    x = np.random.default_rng(10).standard_normal((3, 4))
    np.testing.assert_array_equal(sm.smooth_max(x, axis=axis), sm.smooth_max(x, axis=int(axis)))
    np.testing.assert_array_equal(sm.smooth_argmax(x, axis=axis), sm.smooth_argmax(x, axis=int(axis)))
    with pytest.raises(ValueError, match="axis"):
        sm.smooth_max(x, axis=np.bool_(True))


@pytest.mark.parametrize("reg", ["negentropy", "l2", "hard"])
def test_all_minus_inf_slice_documented_behaviour(reg):
    """Documented: q = 0 and value -inf along an all -inf slice; other slices sum to 1."""
    x = np.array([[-np.inf] * 3, [0.0, 1.0, -np.inf]])
    q = sm.smooth_argmax(x, reg=reg)
    v = sm.smooth_max(x, reg=reg)
    assert np.all(q[0] == 0) and v[0] == -np.inf
    assert abs(q[1].sum() - 1) < 1e-12 and np.isfinite(v[1])
    assert "-inf" in sm.smooth_argmax.__doc__


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_E_within_unit_interval_up_to_rounding(dtype):
    """The docs say [0, 1] up to a few ulps; check the bound on cases that used to exceed 1."""
    rng = np.random.default_rng(11)
    eps = np.finfo(dtype).eps
    for _ in range(20):
        theta = (rng.standard_normal((4, 6, 6)) * 30).astype(dtype)
        E = sm.dtw_grad(theta, gamma=0.01)[1]
        assert E.min() >= 0 and E.max() <= 1 + 8 * eps
        E = sm.viterbi_grad(theta.reshape(4, 4, 3, 3), gamma=0.01)[1]
        assert E.min() >= 0 and E.max() <= 1 + 8 * eps
    assert "exceed 1 by a few" in sm.dtw_grad.__doc__


def test_rescaling_reaches_torch_autograd_and_jax_transformations():
    """The rescaling sits where every framework meets the engines: torch first and
    second order, jax.grad and jax.jit give the oracle's answers on θ = 1e308
    (the issue: NaN marginals) and γ = 1.7e308."""
    theta = np.full((3, 2, 2), 1e308)
    uniform = viterbi_brute(np.zeros((3, 2, 2)), "negentropy", 1.0)["E"]
    jax.config.update("jax_enable_x64", True)
    g = jax.grad(lambda x: sm.viterbi(x))(jnp.asarray(theta))
    np.testing.assert_allclose(np.asarray(g), uniform, atol=1e-12)
    v, E = jax.jit(lambda x: sm.dtw_grad(x))(jnp.full((3, 3), 1e308))
    assert float(v) == np.inf
    np.testing.assert_array_equal(np.asarray(E), dtw_brute(np.ones((3, 3)), "hard", 1.0)["Ybest"])
    t = torch.tensor(theta, requires_grad=True)
    sm.viterbi(t).backward()
    np.testing.assert_allclose(t.grad.numpy(), uniform, atol=1e-12)
    rng = np.random.default_rng(12)
    th, Z = rng.standard_normal((3, 2, 2)), rng.standard_normal((3, 2, 2))
    gamma, c = 1.7e308, 2.0 ** 1000
    t = torch.tensor(th, requires_grad=True)
    (grad,) = torch.autograd.grad(sm.viterbi(t, gamma=gamma), t, create_graph=True)
    (hvp,) = torch.autograd.grad((grad * torch.tensor(Z)).sum(), t)
    vb = viterbi_brute(th / c, "negentropy", gamma / c, Z=Z)
    np.testing.assert_allclose(grad.detach().numpy(), vb["E"], atol=1e-12)
    np.testing.assert_allclose(hvp.numpy() * gamma, vb["Edot"] / c * gamma, rtol=1e-6, atol=1e-9)


def test_numpy_array_flavours(tmp_path):
    """Found while fuzzing: big-endian data, np.matrix and masked arrays."""
    th = np.random.default_rng(13).random((3, 4))
    ref = sm.dtw_grad(th)
    mm = np.memmap(tmp_path / "theta", dtype=np.float64, mode="w+", shape=th.shape)
    mm[:] = th
    for flavour in (th.astype(">f8"), np.matrix(th), mm):
        v, E = sm.dtw_grad(flavour)
        assert type(E) is np.ndarray and E.dtype == np.float64
        np.testing.assert_array_equal(v, ref[0])
        np.testing.assert_array_equal(E, ref[1])
    with pytest.raises(TypeError, match="theta must be a plain array.*masked"):
        sm.dtw(np.ma.array(th, mask=th > 0.5))


@pytest.mark.parametrize("case", ["gamma", "emissions", "transitions"])
def test_crf_extremes(case):
    """The factorised CRF (smoothmax.crf, merged after the issue): a gamma below the
    floor is refused; a huge gamma or huge scores give the emission gradients of the
    full-potential Viterbi path (a different kernel), without NaN."""
    from smoothmax import crf

    rng = np.random.default_rng(14)
    em, tr = rng.standard_normal((2, 4, 3)), rng.standard_normal((3, 3))
    with pytest.raises(ValueError, match="gamma must be in"):
        crf.crf_grad(em, tr, gamma=1e-310)
    gamma = 1.7e308 if case == "gamma" else 1.0
    if case == "emissions":
        em = 1e308 * (0.5 + 0.5 * rng.random(em.shape))
    if case == "transitions":
        tr = 1e308 * (0.5 + 0.5 * rng.random(tr.shape))
    out = crf.crf_grad(em, tr, gamma=gamma)
    assert all(not np.isnan(np.asarray(a)).any() for a in out)
    theta, _ = crf.full_potentials(em, tr, np.zeros(3), np.zeros(3))
    E = sm.viterbi_grad(theta, gamma=gamma)[1]
    np.testing.assert_allclose(out[1], E.sum(-1), atol=1e-9)


def test_crf_hvp_array_likes_and_bad_direction():
    """Found by the fuzz suite: crf_hvp read the shape of the raw emissions (a list
    failed with AttributeError) and took any object as Z."""
    from smoothmax import crf

    rng = np.random.default_rng(15)
    em, tr = rng.standard_normal((2, 4, 3)), rng.standard_normal((3, 3))
    Z = [rng.standard_normal(em.shape), rng.standard_normal((3, 3)), np.ones(3), np.ones(3)]
    ref = crf.crf_hvp(em, tr, np.zeros(3), np.zeros(3), Z)
    got = crf.crf_hvp(em.tolist(), tr, np.zeros(3), np.zeros(3), Z)
    for a, b in zip(got, ref):
        np.testing.assert_array_equal(a, b)
    for bad in (None, Z[:3], np.ones(4)):
        with pytest.raises(ValueError, match="Z must be a tuple of 4 arrays"):
            crf.crf_hvp(em, tr, np.zeros(3), np.zeros(3), bad)
