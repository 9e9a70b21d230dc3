"""Structured and sparse attention (paper §5) against brute-force marginals."""
import itertools
import subprocess
import sys

import numpy as np
import pytest

import smoothmax as sm
from smoothmax.attention import structured_attention

from _oracles import logsumexp


def brute_attention(scores, A, gamma):
    """w_t ∝ p(y_t = 1) under the Gibbs distribution of the two-state chain, y_{-1} = 0."""
    T = len(scores)
    seqs = list(itertools.product((0, 1), repeat=T))
    sc = []
    for y in seqs:
        prev, s = 0, 0.0
        for t in range(T):
            s += A[y[t], prev] + (scores[t] if y[t] == 1 else 0.0)
            prev = y[t]
        sc.append(s)
    sc = np.array(sc)
    p = np.exp(sc / gamma - logsumexp(sc / gamma))
    marg = np.array([sum(p[k] for k, y in enumerate(seqs) if y[t] == 1) for t in range(T)])
    return marg / marg.sum()


@pytest.mark.parametrize("gamma", [0.5, 1.0, 3.0])
def test_negentropy_matches_brute_force(gamma, rng):
    scores = rng.normal(size=(3, 5))
    A = rng.normal(size=(2, 2))
    w = structured_attention(scores, A, gamma=gamma)
    for b in range(3):
        np.testing.assert_allclose(w[b], brute_attention(scores[b], A, gamma), rtol=1e-10)


def test_l2_is_sparse_and_matches_marginals(rng):
    T = 8
    scores = 3 * rng.normal(size=T)
    A = np.array([[1.0, -1.0], [-1.0, 1.0]])
    w = structured_attention(scores, A, reg="l2", gamma=0.5)
    assert np.all(w >= 0) and np.isclose(w.sum(), 1.0)
    assert np.sum(w == 0) > 0
    # the same marginals through Vit_Ω on the potentials of paper §5
    theta = np.zeros((T, 2, 2))
    theta[:, 1, :] = scores[:, None] + A[1]
    theta[:, 0, :] = A[0]
    theta[0, :, 1] = -np.inf
    p1 = sm.viterbi_grad(theta, reg="l2", gamma=0.5)[1][:, 1, :].sum(-1)
    np.testing.assert_allclose(w, p1 / p1.sum(), rtol=1e-12)


def test_lengths_and_batched_transition(rng):
    scores = rng.normal(size=(2, 6))
    A = rng.normal(size=(2, 2, 2))
    w = structured_attention(scores, A, lengths=np.array([6, 3]))
    assert np.all(w[1, 3:] == 0)
    np.testing.assert_allclose(w.sum(-1), 1.0)
    np.testing.assert_allclose(w[1, :3], brute_attention(scores[1, :3], A[1], 1.0), rtol=1e-10)
    np.testing.assert_allclose(w[0], brute_attention(scores[0], A[0], 1.0), rtol=1e-10)


def test_attention_backends(backend, dtype, rng):
    scores = rng.normal(size=(2, 5)).astype(dtype.np)
    A = rng.normal(size=(2, 2)).astype(dtype.np)
    w = structured_attention(backend.asarray(scores), backend.asarray(A), reg="l2")
    w = backend.check(w, dtype.name, (2, 5))
    dtype.close(w, structured_attention(scores.astype(np.float64), A.astype(np.float64), reg="l2"))


def test_torch_module_and_gradcheck(rng):
    torch = pytest.importorskip("torch")
    pytest.importorskip("smoothmax.torch", reason="smoothmax.torch not available")
    from smoothmax.attention import StructuredAttention

    layer = StructuredAttention(reg="l2", gamma=0.5, dtype=torch.float64)
    assert isinstance(layer, torch.nn.Module)
    assert [n for n, _ in layer.named_parameters()] == ["transition"]
    scores = torch.tensor(rng.normal(size=(3, 6)), requires_grad=True)
    values = torch.tensor(rng.normal(size=(3, 6, 4)))
    context, w = layer(scores, values)
    assert context.shape == (3, 4) and w.shape == (3, 6)
    context.sum().backward()
    assert layer.transition.grad is not None and scores.grad is not None
    A = torch.tensor(rng.normal(size=(2, 2)), requires_grad=True)
    for reg in ("negentropy", "l2"):
        f = lambda s, a: structured_attention(s, a, reg=reg)  # noqa: E731
        assert torch.autograd.gradcheck(f, (scores, A))


def test_jax_function(rng):
    jax = pytest.importorskip("jax")
    pytest.importorskip("smoothmax.jax", reason="smoothmax.jax not available")
    import jax.numpy as jnp

    scores = rng.normal(size=(2, 5))
    A = rng.normal(size=(2, 2))
    c = rng.normal(size=(2, 5))

    def loss(s, a):
        return jnp.sum(structured_attention(s, a) * c)

    gs, ga = jax.grad(loss, argnums=(0, 1))(jnp.asarray(scores), jnp.asarray(A))
    eps = 1e-6
    fd = np.zeros_like(A)
    for idx in np.ndindex(A.shape):
        e = np.zeros_like(A)
        e[idx] = eps
        fd[idx] = (np.sum(structured_attention(scores, A + e) * c)
                   - np.sum(structured_attention(scores, A - e) * c)) / (2 * eps)
    np.testing.assert_allclose(np.asarray(ga), fd, atol=1e-6)
    w = jax.jit(lambda s, a: structured_attention(s, a))(jnp.asarray(scores), jnp.asarray(A))
    np.testing.assert_allclose(np.asarray(w), structured_attention(scores, A), rtol=1e-10)


def test_import_does_not_import_torch():
    code = "import sys, smoothmax, smoothmax.attention; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_bad_attention_input(rng):
    with pytest.raises(ValueError, match="transition must have shape"):
        structured_attention(np.zeros(3), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="scores must have at least 1"):
        structured_attention(np.float64(1.0), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="broadcast"):
        structured_attention(np.zeros((2, 3)), np.zeros((3, 2, 2)))
    with pytest.raises(TypeError, match="scores must have a floating dtype"):
        structured_attention(np.zeros(3, dtype=np.complex128), np.zeros((2, 2)))
    with pytest.raises(AttributeError):
        sm.attention.NotAThing  # noqa: B018
