"""JAX autodiff for the structured operators: custom rules over engine calls.

The engine call (``_engine``) runs the compiled CPU core:

* as an XLA FFI custom call (``smoothmax._core.xla_ffi``, optional at build
  time) for arrays on the CPU: no host callback, no copies; under ``jit`` a
  batch-sharded ``theta`` runs per shard (``custom_partitioning``), a vmapped
  call folds the vmapped axes into the batch (``custom_vmap``), and inside
  ``shard_map`` the call is per shard already;
* as an XLA FFI custom call on the CUDA platform for DTW and Viterbi arrays on
  a GPU when CuPy sees one: the handler runs the GPU engine's kernels on XLA's
  buffers and stream (no host round trip);
* otherwise through ``jax.pure_callback`` (``vmap_method="broadcast_all"``):
  no handlers built, ``SMOOTHMAX_JAX_FFI=0``, the DAG on a GPU, or no CuPy
  (a GPU array then makes a host round trip). ``cpu_path()`` and
  ``gpu_path()`` say which.

Three functions of ``theta`` are defined per call, once for every structure
(``problem.struct`` picks the engine functions)::

    value(θ)       custom_jvp, tangent <E(θ), dθ>            (E from grad(θ))
    grad(θ)        custom_jvp returning (value, E),
                   tangents (<E, dθ>, hvp(θ, dθ))
    hvp(θ, Z)      linear in Z and symmetric: its transpose is itself

``hvp`` must be transposable for reverse mode (``jax.grad`` of a function of
``jax.grad``), and an engine call is not. It is therefore written as
``jax.lax.custom_linear_solve(matvec, Z, solve=Z ↦ ∇²DP_Ω(θ)·Z,
symmetric=True)``: the primitive evaluates ``solve`` (our HVP engine call),
its JVP in ``Z`` is ``solve(dZ)`` and its transpose is ``solve`` again
(``symmetric``), which is exactly the algebra of a symmetric linear map.
``matvec`` is never evaluated; it closes over ``θ`` through a guard whose JVP
raises, so a third derivative (the derivative of an HVP with respect to θ)
raises ``NotImplementedError`` instead of being silently zero.

With these rules ``jax.jit``, ``jax.vmap``, ``jax.grad``, grad-of-grad,
``jax.jvp`` of ``jax.grad`` and ``jax.hessian`` all run the custom passes of
docs/spec.md §2 and never differentiate through the recursion.

Lengths and bands are host data fixed at trace time: under ``jax.jit`` they
must be concrete (Python ints, NumPy arrays, or closed-over values), not
traced arguments.
"""
import dataclasses
import functools
import importlib
import os
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P

from . import _dispatch
from ._array_api import device_kind
from ._problem import PER_ITEM_FIELDS, STRUCT_FIELDS, register_adapter
from ._typing import DTWLengths, Reg

__all__ = ["apply", "cpu_path", "gpu_path", "soft_dtw", "squared_euclidean"]

_THIRD_ORDER = (
    "third-order derivatives are not supported by smoothmax: the derivative of a "
    "Hessian-vector product with respect to theta was requested (wrap theta in "
    "jax.lax.stop_gradient if you only need the derivative with respect to the direction)."
)


# ---------------------------------------------------------------------------
# the engine call: XLA FFI custom calls (the compiled core; the CUDA kernels)


@functools.lru_cache(maxsize=None)
def _ffi_platforms():
    """Register the XLA FFI handlers once: ``{"cpu"}`` (and ``"cuda"`` when CuPy
    sees a GPU), or nothing when the optional handler module was not built."""
    try:
        xla_ffi = importlib.import_module("smoothmax._core.xla_ffi")
    except ImportError:
        return frozenset()
    if not hasattr(jax, "ffi"):  # a JAX older than its FFI module
        return frozenset()
    platforms = {"cpu"}
    for struct, capsule in xla_ffi.handlers("cpu").items():
        jax.ffi.register_ffi_target(f"smoothmax_{struct}", capsule, platform="cpu")
    from . import _cuda

    if _cuda.available():
        for struct, capsule in xla_ffi.handlers("cuda").items():
            jax.ffi.register_ffi_target(f"smoothmax_{struct}", capsule, platform="CUDA")
        platforms.add("cuda")
    return frozenset(platforms)


# structures with a CUDA handler (the GPU engine has no DAG kernels)
_CUDA_STRUCTS = ("dtw", "viterbi")


def cpu_path() -> str:
    """How JAX arrays on the CPU reach the compiled core: ``"ffi"`` or ``"pure_callback"``.

    ``"ffi"`` when the optional XLA FFI handlers (``smoothmax._core.xla_ffi``)
    were built and ``SMOOTHMAX_JAX_FFI`` is not ``0``; see ``docs/engines.md``.

    Returns
    -------
    path : {"ffi", "pure_callback"}

    Examples
    --------
    >>> from smoothmax.jax import cpu_path
    >>> cpu_path() in ("ffi", "pure_callback")
    True
    """
    return _path("cpu")


def gpu_path() -> str:
    """How JAX arrays on a GPU reach an engine: ``"ffi"`` or ``"pure_callback"``.

    ``"ffi"``: the CUDA kernels, on XLA's stream, for DTW and Viterbi;
    ``"pure_callback"``: a host round trip through the CPU core. ``"ffi"``
    needs the handlers built and CuPy seeing a GPU.

    Returns
    -------
    path : {"ffi", "pure_callback"}

    Examples
    --------
    >>> from smoothmax.jax import gpu_path
    >>> gpu_path() in ("ffi", "pure_callback")  # "pure_callback" without CuPy or a GPU
    True
    """
    return _path("cuda")


def _path(platform: str) -> str:
    if os.environ.get("SMOOTHMAX_JAX_FFI", "1") != "0" and platform in _ffi_platforms():
        return "ffi"
    return "pure_callback"


def _engine_operands(problem):
    """The structure's host arguments as FFI operands and attributes.

    Returns ``(items, shared, attrs)``: per-item integer arrays (``(B,)``,
    sharded with the batch), shared integer arrays (a graph's structure,
    replicated) and scalar attributes (the DTW band).
    """
    per_item = PER_ITEM_FIELDS[problem.struct]
    int_dtype = jax.dtypes.canonicalize_dtype(np.int64)  # int32 unless x64 is on
    items, shared, scalars = [], [], []
    for f in STRUCT_FIELDS[problem.struct]:
        a = getattr(problem, f)
        if not isinstance(a, np.ndarray):
            scalars.append(np.int64(a))
        elif f in per_item:
            items.append(np.asarray(a, dtype=int_dtype))
        else:
            shared.append(np.asarray(a, dtype=int_dtype))
    attrs = dict(zip(_SCALAR_ATTRS[problem.struct], scalars))
    attrs.update(reg=np.int32(problem.reg_code), gamma=np.float64(problem.gamma))
    return items, shared, attrs


_SCALAR_ATTRS = {"dtw": ("band",), "viterbi": (), "dag": ()}


def _batch_spec(mesh, arg):
    """The mesh axes ``arg``'s leading (batch) dimension is sharded over, if they divide it."""
    sharding = getattr(arg, "sharding", None)
    spec = getattr(sharding, "spec", None)
    if not isinstance(sharding, NamedSharding) or spec is None or len(spec) == 0 or spec[0] is None:
        return None
    axes = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
    size = int(np.prod([mesh.shape[a] for a in axes]))
    return spec[0] if arg.shape[0] % size == 0 else None


def _ffi_target(struct, op, out_specs, attrs):
    """``(*operands) -> results``: the FFI call itself; result shapes follow ``theta``'s batch."""
    target = f"smoothmax_{struct}"
    kw = dict(attrs, op=op)

    def call(*args):
        B = args[0].shape[0]
        specs = tuple(jax.ShapeDtypeStruct((B,) + s, d) for s, d in out_specs)
        return tuple(jax.ffi.ffi_call(target, specs, vmap_method="broadcast_all")(*args, **kw))

    return call


def _folding_vmap(fn, n_batched, refold):
    """``fn`` under ``custom_vmap``: a vmapped call folds the vmapped axis into the
    batch (one engine call for the whole broadcast batch). The first
    ``n_batched`` operands are per item, the others shared; ``refold(reps)``
    gives the function to call on a batch repeated ``reps`` times."""

    @jax.custom_batching.custom_vmap
    def run(*args):
        return fn(*args)

    @run.def_vmap
    def _fold_vmapped_axis(axis_size, in_batched, *args):
        folded = []
        for k, (a, batched) in enumerate(zip(args, in_batched)):
            if k < n_batched:
                a = a if batched else jnp.broadcast_to(a, (axis_size,) + a.shape)
                folded.append(a.reshape((-1,) + a.shape[2:]))
            else:  # shared operands are the same for every vmapped item
                folded.append(a[0] if batched else a)
        res = refold(axis_size)(*folded)
        return tuple(r.reshape((axis_size, -1) + r.shape[1:]) for r in res), tuple(True for _ in res)

    return run


@functools.lru_cache(maxsize=512)
def _ffi_sharded(struct, op, n_batched, in_trailing, out_specs, attrs):
    """The engine call under ``jit``/``vmap`` outside ``shard_map``:
    ``(theta, [Z], *items, *shared) -> results``.

    ``in_trailing``: trailing (non-batch) ranks of the operands; ``out_specs``:
    ``((trailing shape, dtype), ...)`` of the results; ``attrs``: sorted
    ``(name, value)`` pairs. The FFI call is wrapped in ``custom_partitioning``:
    under ``jit`` with a batch-sharded ``theta`` every device runs it on its own
    shard (the per-item operands are sharded the same way, shared ones
    replicated), no gather; other dimensions are gathered (need replication).
    Cached by its arguments, so that eager calls reuse JAX's compiled calls.
    """
    call = _ffi_target(struct, op, out_specs, attrs)

    def shardings(mesh, arg_shapes):
        b = _batch_spec(mesh, arg_shapes[0])
        args = tuple(NamedSharding(mesh, P(b) if k < n_batched else P())
                     for k in range(len(arg_shapes)))
        return args, tuple(NamedSharding(mesh, P(b)) for _ in out_specs)

    def partition(mesh, arg_shapes, result_shape):
        args, results = shardings(mesh, arg_shapes)
        return mesh, call, results, args

    def infer(mesh, arg_shapes, result_shape):
        return shardings(mesh, arg_shapes)[1]

    # Shardy's rule: the batch factor b passes through; every other dimension
    # needs replication (the engine runs whole problems)
    def dims(prefix, n):
        return [f"{prefix}{k}" for k in range(n)]

    ins = [" ".join(["b"] + dims("t", r)) if k < n_batched else " ".join(dims(f"s{k}_", r))
           for k, r in enumerate(in_trailing)]
    outs = [" ".join(["b"] + dims(f"o{k}_", len(s))) for k, (s, _) in enumerate(out_specs)]
    rule = ", ".join(ins) + " -> " + ", ".join(outs)
    others = tuple(dict.fromkeys(f for part in ins + outs for f in part.split() if f != "b"))

    sharded = custom_partitioning(call)
    sharded.def_partition(partition=partition, infer_sharding_from_operands=infer,
                          sharding_rule=rule, need_replication_factors=others)
    run: Callable[..., Any] = _folding_vmap(sharded, n_batched, lambda reps: run)
    return run


@functools.lru_cache(maxsize=512)
def _ffi_local(struct, op, n_floats, n_items, out_specs, attrs, ints):
    """The engine call inside ``shard_map`` (already per shard): ``(theta, [Z]) -> results``.

    The integer arrays (``ints``: per-item ones first, ``n_items`` of them, as
    tuples) travel as attributes ``int0, int1, ...``: integer operands,
    constants invariant over the manual axes, would need casts that JAX's
    re-tracing of ``custom_linear_solve`` rejects under grad-of-grad.
    """
    kw = dict(attrs, **{f"int{k}": np.asarray(a, dtype=np.int64) for k, a in enumerate(ints)})
    call = _ffi_target(struct, op, out_specs, tuple(sorted(kw.items())))

    def refold(reps):
        tiled = tuple(tuple(np.tile(a, reps)) if k < n_items else a for k, a in enumerate(ints))
        return _ffi_local(struct, op, n_floats, n_items, out_specs, attrs, tiled)

    return _folding_vmap(call, n_floats, refold)


def _manual_axes():
    """True inside ``shard_map`` (the current abstract mesh has manual axes)."""
    get = getattr(jax.sharding, "get_abstract_mesh", None)
    return bool(get is not None and get().manual_axes)


def _ffi_call(problem, op, out_specs, theta, Z=None):
    """The FFI engine call of ``op`` on flat ``theta`` (and ``Z``): inside ``shard_map``
    per shard, an eager one-device call alone, otherwise partitioned over the batch."""
    items, shared, attrs = _engine_operands(problem)
    floats = [theta] + ([Z] if Z is not None else [])
    out_specs = tuple((tuple(s), np.dtype(d)) for s, d in out_specs)
    attrs = tuple(sorted(attrs.items()))
    if _manual_axes():
        fn = _ffi_local(problem.struct, op, len(floats), len(items), out_specs, attrs,
                        tuple(tuple(int(v) for v in a) for a in items + shared))
        # theta and Z vary alike (the FFI call needs equal types)
        axes = frozenset().union(*(_varying(a) for a in floats))
        return fn(*(_vary(a, axes) for a in floats))
    args = floats + items + shared
    n_batched = len(floats) + len(items)
    sharding = getattr(theta, "sharding", None)
    if not isinstance(theta, jax.core.Tracer) and (sharding is None or len(sharding.device_set) == 1):
        # an eager call on one device: the FFI call alone (less dispatch)
        return _ffi_target(problem.struct, op, out_specs, attrs)(*args)
    fn = _ffi_sharded(problem.struct, op, n_batched,
                      tuple(np.ndim(a) - (k < n_batched) for k, a in enumerate(args)),
                      out_specs, attrs)
    return fn(*args)


# ---------------------------------------------------------------------------
# the engine call otherwise: host callbacks (no FFI handler for the array's platform)


def _host_problem(problem, reps):
    """``problem`` for NumPy arrays on the host, its batch repeated ``reps`` times.

    Per-item fields (``PER_ITEM_FIELDS``: lengths) are tiled; the others
    (band, a graph's structure) are shared and kept.
    """
    return problem.repeat_batch(reps, xp=np, backend="numpy", device="cpu")


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
        fields = tuple((a.shape, a.dtype.str, a.tobytes()) if isinstance(a, np.ndarray) else a
                    for a in problem.engine_args)
        self._key = (problem.struct, op, self.picks, problem.reg, problem.gamma,
                     tuple(problem.flat_shape), fields)

    def __eq__(self, other):
        return isinstance(other, _HostCall) and self._key == other._key

    def __hash__(self):
        return hash(self._key)

    def __call__(self, *args):
        return _host_run(self.problem, self.op, self.picks, *args)


def _match_vma(x, like):
    """``x`` made varying over the manual mesh axes ``like`` varies over: inside
    ``shard_map`` the results of a callback (or of ``custom_partitioning``) are
    not, and the custom JVP rules need primal and tangent types to agree."""
    return _vary(x, _varying(like))


def _vary(x, axes):
    """``x`` made varying over the manual mesh ``axes`` (those it does not vary over yet)."""
    missing = tuple(sorted(axes - _varying(x)))
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def _varying(x):
    """The manual mesh axes ``x`` varies over (``mat.varying`` from JAX 0.10, ``vma`` before)."""
    if not hasattr(jax, "typeof"):  # a JAX without varying-axis types
        return frozenset()
    aval = jax.typeof(x)
    mat = getattr(aval, "mat", None)
    return frozenset(mat.varying if mat is not None else getattr(aval, "vma", ()))


def _callback(problem, op, picks, shapes, *args):
    specs = tuple(jax.ShapeDtypeStruct(s, d) for s, (_, d) in zip(shapes, picks))
    return jax.pure_callback(_HostCall(problem, op, picks), specs, *args,
                             vmap_method="broadcast_all")


_PICKS = {"value": (0,), "grad": (0, 1), "hvp": (2,)}


def _engine(problem, op, theta, Z=None, decode_spec=None):
    """One engine call on flat ``theta`` (B, ...): the results of ``op`` as a tuple.

    value -> (value,); grad -> (value, E); hvp -> (Edot,); decode/path ->
    the outputs described by ``decode_spec`` ``[(trailing shape, dtype), ...]``.
    """
    dtype = jnp.result_type(theta)
    trailing = tuple(problem.flat_shape[1:])
    if decode_spec is not None:
        out_specs = list(decode_spec)
        picks = list(range(len(decode_spec)))
    else:
        out_specs = [{0: ((), dtype), 1: (trailing, dtype), 2: (trailing, dtype)}[k] for k in _PICKS[op]]
        picks = list(_PICKS[op])
    B = problem.flat_shape[0]
    args = (theta,) if Z is None else (theta, Z)

    def ffi(*args):
        return _ffi_call(problem, op, out_specs, *args)

    def callback(*args):
        return _callback(problem, op, [(k, d) for k, (_, d) in zip(picks, out_specs)],
                         [(B,) + s for s, _ in out_specs], *args)

    paths = {"cpu": ffi if cpu_path() == "ffi" else callback,
             "cuda": ffi if gpu_path() == "ffi" and problem.struct in _CUDA_STRUCTS else callback}
    if isinstance(theta, jax.core.Tracer) and jax.default_backend() != "cpu":
        # traced on a machine with an accelerator: the platform is known at lowering only
        out = jax.lax.platform_dependent(*args, default=callback, **paths)
    else:
        # the device of the array in hand, not problem.device: a custom rule
        # (jax.grad outside jit) gets concrete arrays for a problem prepared from
        # tracers, whose device read as "cpu" -- a GPU DAG then took the CPU FFI
        # target and XLA found no CUDA handler for it
        out = paths.get(device_kind(theta, "jax"), callback)(*args)
    return tuple(_match_vma(y, theta) for y in out)


def _decode_spec(problem, op, dtype):
    """Trailing shapes and dtypes of the decode/path outputs, from an empty batch."""
    empty = dataclasses.replace(_host_problem(problem, 1), batch_shape=(0,),
                                flat_shape=(0,) + tuple(problem.flat_shape[1:]),
                                **{f: getattr(problem, f)[:0] for f in PER_ITEM_FIELDS[problem.struct]})
    out = _dispatch.run(empty, op, np.zeros(empty.flat_shape, dtype=dtype))
    return [(tuple(np.asarray(y).shape[1:]), jax.dtypes.canonicalize_dtype(np.asarray(y).dtype))
            for y in out]


# ---------------------------------------------------------------------------
# rules


def _rules(problem, dtype):
    shape = tuple(problem.flat_shape)
    axes = tuple(range(1, len(shape)))

    def value_cb(theta):
        return _engine(problem, "value", theta)[0]

    def grad_cb(theta):
        return _engine(problem, "grad", theta)

    def hvp_cb(theta, Z):
        return _engine(problem, "hvp", theta, Z)[0]

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


def apply(problem: Any, op: str, theta: jax.Array, Z: Any = None) -> Any:
    """Run ``op`` of ``problem`` on flat JAX arrays ``theta`` (and ``Z``), (B, ...).

    Returns ``value (B,)`` for ``"value"``, ``(value, E)`` for ``"grad"``,
    ``Edot`` for ``"hvp"`` and ``(score, path)`` for ``"decode"``/``"path"``
    (not differentiable: their inputs pass through ``stop_gradient``).
    Works on concrete arrays and under ``jit``/``vmap``/``grad``/``jvp``.
    The public functions call it (through ``smoothmax._problem.evaluate``)
    for JAX arrays; a user calls those.

    Parameters
    ----------
    problem : smoothmax._problem.Problem
        The validated problem (structure, operator, batch shape, lengths).
    op : {"value", "grad", "hvp", "decode", "path"}
    theta : jax.Array, shape (B, ...)
    Z : jax.Array, shape (B, ...), for ``"hvp"``

    Returns
    -------
    jax.Array or tuple of jax.Array

    Examples
    --------
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import smoothmax as sm
    >>> theta = jax.random.uniform(jax.random.key(0), (3, 4))
    >>> E = jax.grad(sm.dtw)(theta)  # sm.dtw calls apply(problem, "value", ...)
    >>> bool(jnp.allclose(E, sm.dtw_grad(theta)[1]))
    True
    >>> Z = jnp.ones_like(theta)  # the second derivative is the HVP pass
    >>> Edot = jax.jvp(jax.grad(sm.dtw), (theta,), (Z,))[1]
    >>> bool(jnp.allclose(Edot, sm.dtw_hvp(theta, Z), atol=1e-5))
    True
    """
    dtype = jnp.result_type(theta)
    if op in ("decode", "path"):
        theta = jax.lax.stop_gradient(theta)
        return _engine(problem, op, theta, decode_spec=_decode_spec(problem, op, dtype))
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


def squared_euclidean(x: jax.Array, y: jax.Array) -> jax.Array:
    """Pairwise squared Euclidean costs ``C[..., i, j] = ‖x[..., i, :] − y[..., j, :]‖²``.

    Parameters
    ----------
    x : array, shape (..., N, d)
    y : array, shape (..., M, d)

    Returns
    -------
    C : array, shape (..., N, M), non-negative.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from smoothmax.jax import squared_euclidean
    >>> squared_euclidean(jnp.array([[0.0, 0.0], [1.0, 1.0]]), jnp.array([[1.0, 0.0]]))
    Array([[1.],
           [1.]], dtype=float32)
    """
    xx = jnp.sum(x * x, axis=-1)[..., :, None]
    yy = jnp.sum(y * y, axis=-1)[..., None, :]
    return jnp.maximum(xx + yy - 2.0 * jnp.einsum("...id,...jd->...ij", x, y), 0.0)


def soft_dtw(x: jax.Array, y: jax.Array, *, reg: Reg = "negentropy", gamma: float = 1.0,
             band: "int | None" = None, lengths: DTWLengths = None, normalize: bool = False,
             cost: "Callable[[jax.Array, jax.Array], jax.Array] | None" = None) -> jax.Array:
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

    Examples
    --------
    >>> import jax
    >>> import jax.numpy as jnp
    >>> from smoothmax.jax import soft_dtw
    >>> x = jax.random.normal(jax.random.key(0), (4, 20, 3))
    >>> y = jax.random.normal(jax.random.key(1), (4, 30, 3))
    >>> loss = jax.jit(lambda x, y: soft_dtw(x, y, gamma=0.1, normalize=True).mean())
    >>> g = jax.grad(loss)(x, y)  # gradients flow to x through the custom passes
    >>> g.shape
    (4, 20, 3)
    >>> float(jnp.abs(soft_dtw(y, y, normalize=True)).max())  # the divergence vanishes on identical series
    0.0
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


# ---------------------------------------------------------------------------
# DTW between features (smoothmax.dtw_features): the compiled linear-memory kernel

_FEATURE_SECOND_ORDER = (
    "second derivatives of smoothmax.dtw_features are not supported under JAX (its gradient "
    "kernel has no HVP pass); use smoothmax.jax.soft_dtw on a cost matrix for second order"
)


def _features_host(fp, grad, x, y):
    """Callback body: ``x (*vmapped, B, NA, d)``; lengths repeated over the vmapped items."""
    x, y = np.asarray(x), np.asarray(y)
    lead = x.shape[:x.ndim - 3]
    reps = int(np.prod(lead, dtype=np.int64))
    host = dataclasses.replace(fp, la=np.tile(fp.la, reps), lb=np.tile(fp.lb, reps))  # vmapped items
    value, gx, gy = _dispatch.run_features(host, x.reshape((-1,) + x.shape[-2:]),
                                           y.reshape((-1,) + y.shape[-2:]), grad)
    if not grad:
        return (value.reshape(x.shape[:-2]),)
    return value.reshape(x.shape[:-2]), gx.reshape(x.shape), gy.reshape(y.shape)


def _feature_rules(fp, dtype):
    B = len(fp.la)
    shapes = [jax.ShapeDtypeStruct((B,), dtype), jax.ShapeDtypeStruct((B, fp.NA, fp.d), dtype),
              jax.ShapeDtypeStruct((B, fp.NB, fp.d), dtype)]

    def value_cb(x, y):
        return jax.pure_callback(lambda a, b: _features_host(fp, False, a, b), shapes[:1], x, y,
                                 vmap_method="broadcast_all")[0]

    @jax.custom_jvp
    def grads(x, y):
        return tuple(jax.pure_callback(lambda a, b: _features_host(fp, True, a, b), shapes, x, y,
                                       vmap_method="broadcast_all"))

    @grads.defjvp
    def _grads_jvp(primals, tangents):
        raise NotImplementedError(_FEATURE_SECOND_ORDER)

    @jax.custom_jvp
    def value(x, y):
        return value_cb(x, y)

    @value.defjvp
    def _value_jvp(primals, tangents):
        (x, y), (dx, dy) = primals, tangents
        v, gx, gy = grads(x, y)
        return v, jnp.sum(gx * dx, axis=(1, 2)) + jnp.sum(gy * dy, axis=(1, 2))

    return value, grads


def apply_features(fp, x, y, grad):
    """``(value, grad_x, grad_y)`` of flat JAX arrays (the gradients None unless ``grad``).

    ``value`` has a JVP (so ``jax.grad``, ``jvp``, ``jit``, ``vmap`` work);
    differentiating the gradients (second order) raises ``NotImplementedError``.
    """
    dtype = jnp.result_type(x)
    value, grads = _feature_rules(fp, dtype)
    if not grad:
        return value(x, y), None, None
    return grads(x, y)


from ._jax_crf import crf_decode, crf_log_likelihood, crf_log_partition, crf_marginals  # noqa: E402,F401

__all__ += ["crf_log_likelihood", "crf_log_partition", "crf_decode", "crf_marginals"]


register_adapter("jax", sys.modules[__name__])
