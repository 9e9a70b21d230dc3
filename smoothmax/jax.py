"""JAX autodiff for the structured operators: custom rules over host callbacks.

The engines run on the host (the compiled CPU core) through
``jax.pure_callback`` (``vmap_method="broadcast_all"``: a vmapped call is one
engine call over the broadcast batch). Three functions of ``theta`` are
defined per call, once for every structure (``problem.struct`` picks the
engine functions)::

    value(θ)       custom_jvp, tangent <E(θ), dθ>            (E from grad(θ))
    grad(θ)        custom_jvp returning (value, E),
                   tangents (<E, dθ>, hvp(θ, dθ))
    hvp(θ, Z)      linear in Z and symmetric: its transpose is itself

``hvp`` must be transposable for reverse mode (``jax.grad`` of a function of
``jax.grad``), and ``jax.pure_callback`` is not. It is therefore written as
``jax.lax.custom_linear_solve(matvec, Z, solve=Z ↦ ∇²DP_Ω(θ)·Z,
symmetric=True)``: the primitive evaluates ``solve`` (our HVP callback),
its JVP in ``Z`` is ``solve(dZ)`` and its transpose is ``solve`` again
(``symmetric``), which is exactly the algebra of a symmetric linear map.
``matvec`` is never evaluated; it closes over ``θ`` through a guard whose JVP
raises, so a third derivative (the derivative of an HVP with respect to θ)
raises ``NotImplementedError`` instead of being silently zero.

With these rules ``jax.jit``, ``jax.vmap``, ``jax.grad``, grad-of-grad,
``jax.jvp`` of ``jax.grad`` and ``jax.hessian`` all run the custom passes of
SPEC §2 and never differentiate through the recursion.

Lengths and bands are host data fixed at trace time: under ``jax.jit`` they
must be concrete (Python ints, NumPy arrays, or closed-over values), not
traced arguments.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from . import _dispatch
from ._problem import PER_ITEM_AUX

__all__ = ["apply", "soft_dtw", "squared_euclidean"]

_THIRD_ORDER = (
    "third-order derivatives are not supported by smoothmax: the derivative of a "
    "Hessian-vector product with respect to theta was requested (wrap theta in "
    "jax.lax.stop_gradient if you only need the derivative with respect to the direction)."
)


# ---------------------------------------------------------------------------
# host callbacks


def _host_problem(problem, reps):
    """``problem`` for NumPy arrays on the host, its batch repeated ``reps`` times.

    Per-item auxiliary arrays (``PER_ITEM_AUX``: lengths) are tiled; the
    others (band, a graph's structure) are shared and kept.
    """
    B = problem.flat_shape[0]
    aux = problem.aux
    if reps != 1:
        per_item = PER_ITEM_AUX[problem.struct]
        aux = tuple(np.tile(a, reps) if k in per_item else a for k, a in enumerate(aux))
    flat_shape = (reps * B,) + tuple(problem.flat_shape[1:])
    return dataclasses.replace(problem, xp=np, backend="numpy", device="cpu",
                               batch_shape=(reps * B,), flat_shape=flat_shape, aux=aux)


def _host_run(problem, op, picks, theta, Z=None):
    """The callback body: ``theta`` (and ``Z``) arrive as (*vmapped, B, ...)."""
    theta = np.asarray(theta)
    inner = len(problem.flat_shape)
    lead = theta.shape[:theta.ndim - inner]
    reps = int(np.prod(lead, dtype=np.int64))
    flat = np.ascontiguousarray(theta.reshape((reps * problem.flat_shape[0],) + theta.shape[len(lead) + 1:]))
    flatZ = None
    if Z is not None:
        flatZ = np.ascontiguousarray(np.asarray(Z, dtype=theta.dtype).reshape(flat.shape))
    out = _dispatch.run(_host_problem(problem, reps), op, flat, flatZ)
    res = []
    for k, dtype in picks:
        y = np.asarray(out[k])
        res.append(np.asarray(y.reshape(lead + (problem.flat_shape[0],) + y.shape[1:]), dtype=dtype))
    return tuple(res)


class _HostCall:
    """The callback of one (problem, op): equal for equal problems, so that eager
    calls with the same arguments hit JAX's compilation cache instead of
    compiling a new ``pure_callback`` every time."""

    def __init__(self, problem, op, picks):
        self.problem, self.op, self.picks = problem, op, tuple(picks)
        aux = tuple((a.shape, a.dtype.str, a.tobytes()) if isinstance(a, np.ndarray) else a
                    for a in problem.aux)
        self._key = (problem.struct, op, self.picks, problem.reg, problem.gamma,
                     tuple(problem.flat_shape), aux)

    def __eq__(self, other):
        return isinstance(other, _HostCall) and self._key == other._key

    def __hash__(self):
        return hash(self._key)

    def __call__(self, *args):
        return _host_run(self.problem, self.op, self.picks, *args)


def _callback(problem, op, picks, shapes, *args):
    specs = tuple(jax.ShapeDtypeStruct(s, d) for s, (_, d) in zip(shapes, picks))
    return jax.pure_callback(_HostCall(problem, op, picks), specs, *args,
                             vmap_method="broadcast_all")


def _decode_spec(problem, op, dtype):
    """Trailing shapes and dtypes of the decode/path outputs, from an empty batch."""
    empty = dataclasses.replace(_host_problem(problem, 1), batch_shape=(0,),
                                flat_shape=(0,) + tuple(problem.flat_shape[1:]),
                                aux=tuple(a[:0] if k in PER_ITEM_AUX[problem.struct] else a
                                          for k, a in enumerate(problem.aux)))
    out = _dispatch.run(empty, op, np.zeros(empty.flat_shape, dtype=dtype))
    return [(tuple(np.asarray(y).shape[1:]), jax.dtypes.canonicalize_dtype(np.asarray(y).dtype))
            for y in out]


# ---------------------------------------------------------------------------
# rules


def _rules(problem, dtype):
    B = problem.flat_shape[0]
    shape = tuple(problem.flat_shape)
    axes = tuple(range(1, len(shape)))

    def value_cb(theta):
        return _callback(problem, "value", [(0, dtype)], [(B,)], theta)[0]

    def grad_cb(theta):
        return _callback(problem, "grad", [(0, dtype), (1, dtype)], [(B,), shape], theta)

    def hvp_cb(theta, Z):
        return _callback(problem, "hvp", [(2, dtype)], [shape], theta, Z)[0]

    @jax.custom_jvp
    def third_order_guard(theta, x):
        return x

    @third_order_guard.defjvp
    def _guard_jvp(primals, tangents):
        raise NotImplementedError(_THIRD_ORDER)

    def hvp(theta, Z):
        # A symmetric linear map of Z: evaluated by `solve`, transposed into itself.
        return jax.lax.custom_linear_solve(
            lambda x: third_order_guard(theta, x), Z,
            solve=lambda _matvec, b: hvp_cb(theta, b), symmetric=True)

    @jax.custom_jvp
    def value_and_grad(theta):
        return grad_cb(theta)

    @value_and_grad.defjvp
    def _value_and_grad_jvp(primals, tangents):
        (theta,), (dtheta,) = primals, tangents
        value, E = value_and_grad(theta)
        return (value, E), (jnp.sum(E * dtheta, axis=axes), hvp(theta, dtheta))

    @jax.custom_jvp
    def value(theta):
        return value_cb(theta)

    @value.defjvp
    def _value_jvp(primals, tangents):
        (theta,), (dtheta,) = primals, tangents
        v, E = value_and_grad(theta)
        return v, jnp.sum(E * dtheta, axis=axes)

    return value, value_and_grad, hvp


def apply(problem, op, theta, Z=None):
    """Run ``op`` of ``problem`` on flat JAX arrays ``theta`` (and ``Z``), (B, ...).

    Returns ``value (B,)`` for ``"value"``, ``(value, E)`` for ``"grad"``,
    ``Edot`` for ``"hvp"`` and ``(score, path)`` for ``"decode"``/``"path"``
    (not differentiable: their inputs pass through ``stop_gradient``).
    Works on concrete arrays and under ``jit``/``vmap``/``grad``/``jvp``.
    """
    dtype = jnp.result_type(theta)
    if op in ("decode", "path"):
        theta = jax.lax.stop_gradient(theta)
        spec = _decode_spec(problem, op, dtype)
        picks = [(k, d) for k, (_, d) in enumerate(spec)]
        shapes = [(problem.flat_shape[0],) + s for s, _ in spec]
        return _callback(problem, op, picks, shapes, theta)
    value, value_and_grad, hvp = _rules(problem, dtype)
    if op == "value":
        return value(theta)
    if op == "grad":
        return value_and_grad(theta)
    if op == "hvp":
        return hvp(theta, jnp.asarray(Z, dtype=dtype))
    raise ValueError(f"op must be one of 'value', 'grad', 'hvp', 'decode', 'path', got {op!r}")


# ---------------------------------------------------------------------------
# conveniences


def squared_euclidean(x, y):
    """Pairwise squared Euclidean costs ``C[..., i, j] = ‖x[..., i, :] − y[..., j, :]‖²``.

    Parameters
    ----------
    x : array, shape (..., N, d)
    y : array, shape (..., M, d)

    Returns
    -------
    C : array, shape (..., N, M), non-negative.
    """
    xx = jnp.sum(x * x, axis=-1)[..., :, None]
    yy = jnp.sum(y * y, axis=-1)[..., None, :]
    return jnp.maximum(xx + yy - 2.0 * jnp.einsum("...id,...jd->...ij", x, y), 0.0)


def soft_dtw(x, y, *, reg="negentropy", gamma=1.0, band=None, lengths=None, normalize=False,
             cost=None):
    """Soft-DTW between time series ``x`` and ``y`` under a pairwise ``cost``.

    Parameters
    ----------
    x : array, shape (..., N, d)
    y : array, shape (..., M, d)
    reg, gamma, band : as for :func:`smoothmax.dtw`.
    lengths : None or pair ``(len_x, len_y)`` of ints / int arrays of shape (...)
        Must be concrete under ``jax.jit``.
    normalize : bool
        If True, the divergence ``DTW(x, y) − (DTW(x, x) + DTW(y, y)) / 2``,
        each self term with its own lengths.
    cost : callable ``(x, y) -> (..., N, M)``, default :func:`squared_euclidean`.

    Returns
    -------
    value : array, shape (...)
    """
    from .dtw import dtw

    cost = squared_euclidean if cost is None else cost
    x = jnp.asarray(x)
    y = jnp.asarray(y)
    if x.ndim < 2 or y.ndim < 2 or x.shape[-1] != y.shape[-1]:
        raise ValueError(f"x and y must have shapes (..., N, d) and (..., M, d), got {x.shape} and {y.shape}")

    def sdtw(a, b, la, lb):
        lens = None if la is None and lb is None else (
            a.shape[-2] if la is None else la, b.shape[-2] if lb is None else lb)
        return dtw(cost(a, b), reg=reg, gamma=gamma, lengths=lens, band=band)

    la, lb = (None, None) if lengths is None else lengths
    value = sdtw(x, y, la, lb)
    if not normalize:
        return value
    return value - 0.5 * (sdtw(x, x, la, la) + sdtw(y, y, lb, lb))
