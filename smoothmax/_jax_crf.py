"""``smoothmax.jax.crf_*``: the factorised CRF as JAX functions (part of
:mod:`smoothmax.jax`, which re-exports them; docs/crf.md).

The log-partition is a ``jax.custom_vjp`` over host callbacks
(``jax.pure_callback`` with ``vmap_method="sequential"``, so that a
``vmap`` over any argument, transitions included, is exact): the forward
runs the value kernel, the backward the gradient kernel with the cotangent
as per-item weights (the shared gradients are summed over the batch inside
the kernel); that backward is itself a ``custom_vjp`` whose backward is the
HVP pass, so reverse-over-reverse second derivatives (``jax.grad`` of a
function of ``jax.grad``, ``jax.hessian`` through ``jacrev``) run the custom
passes. ``jit``, ``vmap`` and ``grad`` are supported; forward mode
(``jvp``, ``jacfwd``) and third derivatives are not (they raise).
Lengths are host data fixed at trace time (concrete under ``jit``).
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from . import crf as _crf
from ._typing import Array, Lengths, Reg

__all__ = ["crf_log_likelihood", "crf_log_partition", "crf_decode", "crf_marginals"]


def _host(problem):
    return dataclasses.replace(problem, xp=np, backend="numpy", device="cpu")


def _np(*arrays):
    return [np.ascontiguousarray(np.asarray(a)) for a in arrays]


def _log_partition_fn(problem, B, dtype):
    hp = _host(problem)

    def value_host(em, A, s, e):
        return np.asarray(_crf.run(hp, "value", *_np(em, A, s, e))[0], dtype=dtype)

    def grad_host(em, A, s, e, g):
        em, A, s, e, g = _np(em, A, s, e, g)
        _, ge, gA, gs, gen = _crf.run(hp, "grad", em, A, s, e, weights=g.astype(np.float64))
        return (np.asarray(g[:, None, None] * ge, dtype=em.dtype), gA.astype(A.dtype),
                gs.astype(s.dtype), gen.astype(e.dtype))

    def hvp_host(em, A, s, e, Ue, UA, Us, Uen, g):
        em, A, s, e, Ue, UA, Us, Uen, g = _np(em, A, s, e, Ue, UA, Us, Uen, g)
        Z = [z.astype(em.dtype) for z in (Ue, UA, Us, Uen)]
        vdot, he, hA, hs, hen = _crf.run(hp, "hvp", em, A, s, e, Z=Z, weights=g.astype(np.float64))
        return (np.asarray(g[:, None, None] * he, dtype=em.dtype), hA.astype(A.dtype),
                hs.astype(s.dtype), hen.astype(e.dtype), np.asarray(vdot, dtype=g.dtype))

    def spec(*xs):
        return tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in xs)

    @jax.custom_vjp
    def weighted_grads(em, A, s, e, g):
        """(g_b ∇_e value_b, Σ_b g_b ∇_A value_b, ...): the backward of log_z."""
        return jax.pure_callback(grad_host, spec(em, A, s, e), em, A, s, e, g,
                                 vmap_method="sequential")

    def wg_fwd(em, A, s, e, g):
        return weighted_grads(em, A, s, e, g), (em, A, s, e, g)

    def wg_bwd(res, U):
        # the HVP pass: Σ_b g_b ∇²value_b·U_b, and <∇value_b, U_b> for g
        em, A, s, e, g = res
        return jax.pure_callback(hvp_host, spec(em, A, s, e, g), *res[:4], *U, g,
                                 vmap_method="sequential")

    weighted_grads.defvjp(wg_fwd, wg_bwd)

    @jax.custom_vjp
    def log_z(em, A, s, e):
        return jax.pure_callback(value_host, jax.ShapeDtypeStruct((B,), dtype), em, A, s, e,
                                 vmap_method="sequential")

    def fwd(em, A, s, e):
        return log_z(em, A, s, e), (em, A, s, e)

    def bwd(res, g):
        return weighted_grads(*res, g)

    log_z.defvjp(fwd, bwd)
    return log_z


def _prepare(emissions, transitions, start, end, lengths, reg, gamma):
    emissions = jnp.asarray(emissions)
    transitions = jnp.asarray(transitions)
    S = emissions.shape[-1] if emissions.ndim else 0
    start = jnp.zeros((S,), emissions.dtype) if start is None else jnp.asarray(start)
    end = jnp.zeros((S,), emissions.dtype) if end is None else jnp.asarray(end)
    return _crf.prepare(emissions, transitions, start, end, lengths, reg, gamma)


def crf_log_partition(emissions: Array, transitions: Array, start: Array = None, end: Array = None, *,
                      lengths: Lengths = None, reg: Reg = "negentropy", gamma: float = 1.0) -> jax.Array:
    """The smoothed value (the CRF log-partition for negentropy, γ = 1), differentiable.

    Parameters
    ----------
    emissions : array, shape (..., T, S)
    transitions : array, shape (S, S), ``[from, to]``
    start, end : None or array, shape (S,)
    lengths : None or int array, shape (...) (concrete under ``jit``)
    reg : {"negentropy", "l2", "hard"}
    gamma : float > 0

    Returns
    -------
    value : array, shape (...)

    Examples
    --------
    >>> import jax
    >>> import jax.numpy as jnp
    >>> from smoothmax.jax import crf_log_likelihood, crf_log_partition, crf_marginals
    >>> emissions = jax.random.normal(jax.random.key(0), (2, 5, 3))  # (batch, T, S)
    >>> transitions = jnp.zeros((3, 3))
    >>> g = jax.grad(lambda em: crf_log_partition(em, transitions).sum())(emissions)
    >>> bool(jnp.allclose(g, crf_marginals(emissions, transitions), atol=1e-5))  # ∇ = the marginals
    True
    """
    em, A, s, e, problem = _prepare(emissions, transitions, start, end, lengths, reg, gamma)
    value = _log_partition_fn(problem, em.shape[0], em.dtype)(em, A, s, e)
    return jnp.reshape(value, problem.batch_shape)


def _score(emissions, tags, transitions, start, end, lengths):
    """``score(tags)`` (...,): start + emissions + transitions + end up to each length."""
    T = emissions.shape[-2]
    L = jnp.asarray(lengths).reshape(emissions.shape[:-2]) if lengths is not None else \
        jnp.full(emissions.shape[:-2], T)
    on = jnp.arange(T) < L[..., None]
    tags = jnp.where(on, tags, 0)
    s = jnp.sum(jnp.where(on, jnp.take_along_axis(emissions, tags[..., None], -1)[..., 0], 0.0), -1)
    s = s + start[tags[..., 0]]
    s = s + jnp.sum(jnp.where(on[..., 1:], transitions[tags[..., :-1], tags[..., 1:]], 0.0), -1)
    last = jnp.take_along_axis(tags, (L - 1)[..., None], -1)[..., 0]
    return s + end[last]


def crf_log_likelihood(emissions: Array, tags: Array, transitions: Array, start: Array = None,
                       end: Array = None, *, lengths: Lengths = None, reg: Reg = "negentropy",
                       gamma: float = 1.0) -> jax.Array:
    """``score(tags) − value``: the CRF log-likelihood for negentropy, γ = 1 (per sequence).

    Parameters
    ----------
    emissions : array, shape (..., T, S)
    tags : int array, shape (..., T) (entries past a length are ignored)
    transitions, start, end, lengths, reg, gamma : as for :func:`crf_log_partition`.

    Returns
    -------
    llh : array, shape (...); differentiable in emissions and the parameters
    (``jax.grad``), under ``jax.jit`` and ``jax.vmap``.

    Examples
    --------
    >>> import jax
    >>> import jax.numpy as jnp
    >>> from smoothmax.jax import crf_log_likelihood, crf_log_partition, crf_marginals
    >>> emissions = jax.random.normal(jax.random.key(0), (2, 5, 3))  # (batch, T, S)
    >>> transitions = jnp.zeros((3, 3))
    >>> tags = jnp.array([[0, 1, 2, 1, 0], [2, 2, 1, 0, 0]])
    >>> llh = jax.jit(lambda em, A: crf_log_likelihood(em, tags, A))(emissions, transitions)
    >>> bool((llh < 0).all())  # log-probabilities
    True
    >>> jax.grad(lambda A: crf_log_likelihood(emissions, tags, A).sum())(transitions).shape
    (3, 3)
    """
    em = jnp.asarray(emissions)
    S = em.shape[-1]
    A = jnp.asarray(transitions)
    s = jnp.zeros((S,), em.dtype) if start is None else jnp.asarray(start)
    e = jnp.zeros((S,), em.dtype) if end is None else jnp.asarray(end)
    tags = jnp.asarray(tags)
    if tags.shape != em.shape[:-1]:
        raise ValueError(f"tags must have shape {em.shape[:-1]} (emissions without the last axis), "
                         f"got {tags.shape}")
    value = crf_log_partition(em, A, s, e, lengths=lengths, reg=reg, gamma=gamma)
    return _score(em, tags, A, s, e, lengths) - value


def crf_marginals(emissions: Array, transitions: Array, start: Array = None, end: Array = None, *,
                  lengths: Lengths = None, reg: Reg = "negentropy", gamma: float = 1.0) -> jax.Array:
    """Unary marginals ``p(y_t = i)`` (the gradient of the value in the emissions).

    Sparse for ``"l2"``, one-hot for ``"hard"``; zero past the lengths. Not
    differentiable (inputs pass through ``stop_gradient``).

    Returns
    -------
    marginals : array, shape (..., T, S)

    Examples
    --------
    >>> import jax
    >>> import jax.numpy as jnp
    >>> from smoothmax.jax import crf_log_likelihood, crf_log_partition, crf_marginals
    >>> emissions = jax.random.normal(jax.random.key(0), (2, 5, 3))  # (batch, T, S)
    >>> transitions = jnp.zeros((3, 3))
    >>> crf_marginals(emissions, transitions, lengths=jnp.array([5, 3])).sum(-1).round(4)
    Array([[1., 1., 1., 1., 1.],
           [1., 1., 1., 0., 0.]], dtype=float32)
    """
    em, A, s, e, problem = _prepare(emissions, transitions, start, end, lengths, reg, gamma)
    hp = _host(problem)

    def host(em, A, s, e):
        return np.asarray(_crf.run(hp, "grad", *_np(em, A, s, e))[1], dtype=em.dtype)

    args = [jax.lax.stop_gradient(x) for x in (em, A, s, e)]
    out = jax.pure_callback(host, jax.ShapeDtypeStruct(em.shape, em.dtype), *args,
                            vmap_method="sequential")
    return jnp.reshape(out, problem.batch_shape + tuple(em.shape[1:]))


def crf_decode(emissions: Array, transitions: Array, start: Array = None, end: Array = None, *,
               lengths: Lengths = None) -> "tuple[jax.Array, jax.Array]":
    """Best tag sequences (hard Viterbi; ties: first argmax).

    Returns
    -------
    score : array, shape (...)
    tags : int array, shape (..., T) (int64 with x64 enabled, else int32), ``-1`` past a length.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from smoothmax.jax import crf_decode
    >>> emissions = jnp.zeros((1, 4, 3)).at[0, :, 2].set(1.0)  # tag 2 scores 1 at every step
    >>> score, tags = crf_decode(emissions, jnp.zeros((3, 3)), lengths=jnp.array([3]))
    >>> score, tags
    (Array([3.], dtype=float32), Array([[ 2,  2,  2, -1]], dtype=int32))
    """
    em, A, s, e, problem = _prepare(emissions, transitions, start, end, lengths, "hard", 1.0)
    hp = _host(problem)
    itype = jax.dtypes.canonicalize_dtype(np.int64)

    def host(em, A, s, e):
        score, tags = _crf.run(hp, "decode", *_np(em, A, s, e))
        return np.asarray(score, dtype=em.dtype), np.asarray(tags, dtype=itype)

    args = [jax.lax.stop_gradient(x) for x in (em, A, s, e)]
    score, tags = jax.pure_callback(
        host, (jax.ShapeDtypeStruct((em.shape[0],), em.dtype), jax.ShapeDtypeStruct(em.shape[:2], itype)),
        *args, vmap_method="sequential")
    return (jnp.reshape(score, problem.batch_shape),
            jnp.reshape(tags, problem.batch_shape + (em.shape[1],)))
