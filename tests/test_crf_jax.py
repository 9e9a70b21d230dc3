"""``smoothmax.jax.crf_*`` under ``jit``, ``vmap`` and ``grad``, against enumeration,
pytorch-crf and finite differences (``jax.test_util.check_grads``, reverse mode)."""
import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="JAX is not installed")
jax.config.update("jax_enable_x64", True)  # tests only; the library never sets it

import jax.numpy as jnp  # noqa: E402
from jax.test_util import check_grads  # noqa: E402

from smoothmax import jax as smj  # noqa: E402

from test_crf import _brute  # noqa: E402

T, S = 4, 3
L = np.array([4, 2, 3])


def _inputs(dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    em = rng.normal(size=(3, T, S)).astype(dtype)
    A, s, e = (rng.normal(size=sh).astype(dtype) for sh in ((S, S), (S,), (S,)))
    tags = rng.integers(0, S, size=(3, T))
    return em, A, s, e, tags


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_values_against_enumeration_under_jit(dtype):
    em, A, s, e, tags = _inputs(dtype)
    bf = _brute(em.astype(np.float64), A.astype(np.float64), s.astype(np.float64), e.astype(np.float64), L)
    llh = jax.jit(lambda em, A, s, e: smj.crf_log_likelihood(em, tags, A, s, e, lengths=L))(em, A, s, e)
    assert llh.dtype == dtype and llh.shape == (3,)
    scores = []
    for b in range(3):
        y = tags[b, :L[b]]
        sc = s[y[0]] + e[y[-1]] + sum(em[b, t, y[t]] for t in range(L[b])) + sum(
            A[y[t - 1], y[t]] for t in range(1, L[b]))
        scores.append(sc - bf[b]["value"])
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(llh, scores, rtol=tol, atol=tol)
    marg = jax.jit(lambda em: smj.crf_marginals(em, A, s, e, lengths=L))(em)
    for b in range(3):
        np.testing.assert_allclose(marg[b], bf[b]["unary"], atol=10 * tol)
    score, path = smj.crf_decode(em, A, s, e, lengths=L)
    for b in range(3):
        assert np.asarray(path[b, :L[b]]).tolist() == bf[b]["path"]
        assert (np.asarray(path[b, L[b]:]) == -1).all()
        np.testing.assert_allclose(score[b], bf[b]["best"], rtol=tol, atol=tol)


@pytest.mark.parametrize("reg", ["negentropy", "l2", "hard"])
def test_grad_finite_differences(reg):
    em, A, s, e, tags = _inputs()
    w = jnp.array([1.0, -2.0, 0.5])  # non-uniform cotangents

    def f(em, A, s, e):
        return jnp.sum(w * smj.crf_log_likelihood(em, tags, A, s, e, lengths=L, reg=reg, gamma=0.8))

    check_grads(f, (em, A, s, e), order=1, modes=["rev"], atol=1e-5, rtol=1e-5)
    check_grads(jax.jit(f), (em, A, s, e), order=1, modes=["rev"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("reg", ["negentropy", "l2"])
def test_second_order_reverse_over_reverse(reg):
    """grad of a function of grad: the HVP pass, against finite differences of the gradient."""
    em, A, s, e, tags = _inputs()
    w = jnp.array([1.0, -2.0, 0.5])

    def f(em, A, s, e):
        return jnp.sum(w * smj.crf_log_partition(em, A, s, e, lengths=L, reg=reg, gamma=0.8))

    check_grads(f, (em, A, s, e), order=2, modes=["rev"], atol=1e-5, rtol=1e-5)
    g = jax.grad(lambda em: jnp.sum(jax.grad(f)(em, A, s, e) ** 2))
    assert g(em).shape == em.shape
    with pytest.raises(Exception):  # third order: the HVP callback has no derivative
        jax.grad(lambda em: jnp.sum(g(em)))(em)


def test_grad_matches_pytorch_crf():
    torch = pytest.importorskip("torch")
    torchcrf = pytest.importorskip("torchcrf")
    em, A, s, e, tags = _inputs()
    ref = torchcrf.CRF(S, batch_first=True).double()
    with torch.no_grad():
        ref.transitions.copy_(torch.tensor(A))
        ref.start_transitions.copy_(torch.tensor(s))
        ref.end_transitions.copy_(torch.tensor(e))
    emt = torch.tensor(em, requires_grad=True)
    mask = (torch.arange(T)[None] < torch.tensor(L)[:, None]).to(torch.uint8)
    ref(emt, torch.tensor(tags), mask, reduction="sum").backward()
    g = jax.grad(lambda em, A, s, e: smj.crf_log_likelihood(em, tags, A, s, e, lengths=L).sum(),
                 argnums=(0, 1, 2, 3))(em, A, s, e)
    for x, y in zip(g, (emt.grad, ref.transitions.grad, ref.start_transitions.grad, ref.end_transitions.grad)):
        np.testing.assert_allclose(x, y.numpy(), atol=1e-12)


def test_vmap_over_emissions_and_transitions():
    em, A, s, e, tags = _inputs()
    As = jnp.stack([A, 0.5 * A, -A])
    out = jax.vmap(lambda A: smj.crf_log_partition(em, A, s, e, lengths=L))(As)
    for k in range(3):
        np.testing.assert_allclose(out[k], smj.crf_log_partition(em, As[k], s, e, lengths=L), rtol=1e-12)
    ems = jnp.stack([em, 2 * em])
    g = jax.vmap(jax.grad(lambda em: smj.crf_log_partition(em, A, s, e, lengths=L).sum()))(ems)
    for k in range(2):
        np.testing.assert_allclose(g[k], smj.crf_marginals(ems[k], A, s, e, lengths=L), atol=1e-12)


def test_errors():
    em, A, s, e, tags = _inputs()
    with pytest.raises(ValueError, match="transitions must have shape"):
        smj.crf_log_partition(em, A[:2], s, e)
    with pytest.raises(ValueError, match="tags must have shape"):
        smj.crf_log_likelihood(em, tags[:, :2], A, s, e)
