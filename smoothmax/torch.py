"""PyTorch operators for the structured passes, their autodiff, and ``torch.nn`` layers.

Every structured pass is a ``torch.library.custom_op`` in the ``smoothmax``
namespace, one per structure and pass (``torch.ops.smoothmax.<struct>_<op>``,
struct in dtw, viterbi, dag; op in value, grad, hvp and decode (Viterbi) or
path (DTW, DAG)). Each has

* a fake (meta) implementation giving the output shapes and dtypes, so that
  ``torch.compile``, ``torch.export`` and meta tensors trace it as one node;
* the data checks inside the operator (NaN / ±inf in ``theta``, a non-finite
  direction ``Z``, lengths out of range), so that tracing never branches on
  data: an invalid input raises ``ValueError`` when the operator runs;
* a vmap rule (``torch.func.vmap``: the vmapped axis joins the flat batch);
* for value, grad and hvp, autograd (``register_autograd``), the chain of
  docs/spec.md §2 written once for every structure::

    value      = value(θ)           backward: g ↦ g·E, E from grad(θ)
    (value, E) = grad(θ)            backward: (g, G) ↦ g·E + hvp(θ, G)
    Edot       = hvp(θ, Z)          backward: W ↦ hvp(θ, W) w.r.t. Z (the Hessian is
                                    symmetric); w.r.t. θ it raises (third order)

so that ``autograd.grad(value, θ, create_graph=True)`` followed by a second
``autograd.grad`` runs the HVP pass (one forward and one reverse pass over the
DP), never autograd through the recursion. When ``θ`` requires grad,
:func:`apply` computes a value through ``grad`` (one engine call giving
``(value, E)``), whose saved ``E`` serves the backward; ``E`` being an output
of that node, its own derivative (second order) is the HVP branch.

Engines: CPU tensors go to the compiled core as zero-copy NumPy views; CUDA
tensors go to the GPU engine through DLPack (``smoothmax._dispatch``). Every
output has the input's dtype and device. Importing this module registers it
with the dispatcher (:func:`smoothmax._problem.register_adapter`) as the
adapter of torch tensors.
"""
import sys
from typing import Any, Callable, Optional

import types

import array_api_compat.torch as _compat
import numpy as np
import torch
from torch import nn

Tensor = torch.Tensor

from . import _dispatch, _validation
from ._array_api import register_array_type
from ._problem import PER_ITEM_FIELDS, STRUCT_FIELDS, Problem, _batch_size, register_adapter
from ._typing import Reg

__all__ = ["apply", "DTWFeatures", "SoftDTW", "Viterbi", "squared_euclidean"]


def _cumulative_sum(x, /, *, axis=None, dtype=None, include_initial=False):
    if axis is None or include_initial:
        return _compat.cumulative_sum(x, axis=axis, dtype=dtype, include_initial=include_initial)
    return torch.cumsum(x, dim=axis, dtype=dtype)


# The array namespace of torch tensors: array_api_compat's, with the wrappers
# that look the namespace up again on every call (through a cache that
# torch.compile warns about) replaced by the torch function.
_xp = types.SimpleNamespace(**{k: getattr(_compat, k) for k in dir(_compat) if not k.startswith("__")})
_xp.cumulative_sum = _cumulative_sum

_THIRD_ORDER = (
    "third-order derivatives are not supported by smoothmax: the derivative of a "
    "Hessian-vector product with respect to theta was requested. Detach theta "
    "(theta.detach()) if you only need the derivative with respect to the direction."
)

# the schema of each structure's own arguments (after theta, and Z for hvp)
_STRUCT_SCHEMA = {"dtw": "Tensor? len_a, Tensor? len_b, int band",
                  "viterbi": "Tensor? lengths",
                  "dag": "Tensor indptr, Tensor parents"}
# NaN and which infinity each structure rejects in theta (SPEC: costs / scores)
_FORBID = {"dtw": "-inf", "viterbi": "+inf", "dag": "+inf"}
_DECODE = {"dtw": "path", "viterbi": "decode", "dag": "path"}
_OPS: dict = {}  # (struct, op) -> torch.ops.smoothmax.<struct>_<op>
_IMPLS: dict = {}  # (struct, op) -> its real implementation, called directly by eager calls
_AUTOGRAD: dict = {}  # (struct, op) -> (setup_context, backward) registered for it


# ---------------------------------------------------------------------------
# the operators' real implementation: host checks, then the engine


_LENGTH_AXIS = {"len_a": (1, "lengths[0] (len_a)"), "len_b": (2, "lengths[1] (len_b)"),
                "lengths": (1, "lengths")}


def _host_field(struct, field, value, theta):
    """A structure argument of an operator as the engine takes it (lengths checked).

    Lengths are None (full) or a (B,) integer tensor."""
    if field in PER_ITEM_FIELDS[struct]:
        axis, name = _LENGTH_AXIS[field]
        B = int(theta.shape[0])
        if value is None:
            return np.full(B, int(theta.shape[axis]), dtype=np.int64)
        host = value.detach().cpu().numpy()
        if host.shape != (B,):
            raise ValueError(f"{name} must have shape ({B},) (one per batch item), got {host.shape}")
        return _validation.check_lengths(host, (B,), int(theta.shape[axis]), name)
    if not isinstance(value, torch.Tensor):
        return value
    return np.ascontiguousarray(value.detach().cpu().numpy(), dtype=np.int64)


def _run(struct, op, theta, Z, fields, reg, gamma):
    # The compiled core checks host arrays itself, as for NumPy input (docs/engines.md,
    # "Conventions"; _dispatch.ENGINE_CHECKED). A serial host pass stays for the rest.
    compiled = theta.device.type == "cpu" and _dispatch.engine_for("torch", "cpu").name == "compiled"
    checked = _dispatch.engine_checked(struct, op, compiled)
    if not checked.theta:
        _validation.check_values(theta.detach().cpu().numpy() if theta.device.type == "cpu" else theta,
                                 np if theta.device.type == "cpu" else _xp, "theta", _FORBID[struct])
    if Z is not None and not (checked.Z and Z.dtype == theta.dtype):
        _validation.check_values(Z.detach().cpu().numpy() if Z.device.type == "cpu" else Z,
                                 np if Z.device.type == "cpu" else _xp, "Z", "inf")
    named = {f: _host_field(struct, f, v, theta) for f, v in zip(STRUCT_FIELDS[struct], fields)}
    shape = tuple(theta.shape)
    problem = Problem(struct, _xp, "torch", "cuda" if theta.device.type == "cuda" else "cpu", shape[:1],
                      shape, reg, gamma, **named, engine_checks=checked.asked)
    return _dispatch.run(problem, op, theta.detach(), None if Z is None else Z.detach())


def _real(struct, op):
    n = len(STRUCT_FIELDS[struct])

    def impl(theta, *args):
        Z = None
        if op == "hvp":
            Z, args = args[0], args[1:]
        fields, rest = args[:n], args[n:]
        reg, gamma = rest if rest else ("hard", 1.0)
        out = _run(struct, op, theta, Z, fields, reg, gamma)
        if op == "value":
            return out[0]
        if op == "hvp":
            return out[2]
        return tuple(out)

    return impl


def _fake(struct, op):
    def fake(theta, *args):
        B = theta.shape[0]
        value = theta.new_empty((B,))
        if op == "value":
            return value
        if op in ("grad", "path"):
            return value, theta.new_empty(theta.shape)
        if op == "hvp":
            return theta.new_empty(theta.shape)
        return value, theta.new_empty((B, theta.shape[1]), dtype=torch.int64)  # decode

    return fake


# ---------------------------------------------------------------------------
# autograd


def _batch_expand(g, like):
    """``g`` of shape (B,) as (B, 1, ..., 1) to broadcast against ``like`` (B, ...)."""
    return g.reshape(tuple(g.shape) + (1,) * (like.ndim - g.ndim))


def _autograd(struct, op):
    n_extra = len(STRUCT_FIELDS[struct]) + 2  # the structure's arguments, reg, gamma
    backward: Callable[..., Any]

    if op == "value":
        def setup(ctx, inputs, output):
            ctx.save_for_backward(inputs[0])
            ctx.extra = inputs[1:]

        def backward_value(ctx, g):
            (theta,) = ctx.saved_tensors
            E = _call(struct, "grad", theta, *ctx.extra)[1]
            return (_batch_expand(g, E) * E,) + (None,) * n_extra

        backward = backward_value

    elif op == "grad":
        def setup(ctx, inputs, output):
            ctx.set_materialize_grads(False)
            ctx.save_for_backward(inputs[0], output[1])
            ctx.extra = inputs[1:]

        def backward_grad(ctx, g, G):
            theta, E = ctx.saved_tensors
            out = None if g is None else _batch_expand(g, E) * E
            if G is not None:
                h = _call(struct, "hvp", theta, G.to(theta.dtype), *ctx.extra)
                out = h if out is None else out + h
            return (out,) + (None,) * n_extra

        backward = backward_grad

    else:  # hvp
        def setup(ctx, inputs, output):
            ctx.save_for_backward(inputs[0])
            ctx.extra = inputs[2:]

        def backward_hvp(ctx, W):
            needs = ctx.needs_input_grad[getattr(ctx, "offset", 0):]  # (see _EagerAutograd)
            if needs[0]:
                raise RuntimeError(_THIRD_ORDER)
            (theta,) = ctx.saved_tensors
            gZ = _call(struct, "hvp", theta, W, *ctx.extra) if needs[1] else None
            return (None, gZ) + (None,) * n_extra
        backward = backward_hvp

    return setup, backward


# ---------------------------------------------------------------------------
# vmap: the vmapped axis joins the flat batch axis


def _vmap_rule(struct, op):
    per_item = {0} | ({1} if op == "hvp" else set())
    offset = 2 if op == "hvp" else 1
    per_item |= {offset + k for k, f in enumerate(STRUCT_FIELDS[struct]) if f in PER_ITEM_FIELDS[struct]}

    def rule(info, in_dims, *args):
        V = info.batch_size
        flat = list(args)
        for k, (a, d) in enumerate(zip(args, in_dims)):
            if not isinstance(a, torch.Tensor):
                continue
            if d is None:
                if k in per_item:
                    flat[k] = a.expand((V,) + tuple(a.shape)).reshape((-1,) + tuple(a.shape[1:]))
                continue
            if k not in per_item:
                raise ValueError(f"torch.func.vmap over a graph's structure is not supported ({struct}_{op})")
            a = a.movedim(d, 0)
            flat[k] = a.reshape((-1,) + tuple(a.shape[2:]))
        out = _OPS[struct, op](*flat)
        outs = out if isinstance(out, tuple) else (out,)
        outs = tuple(y.reshape((V, -1) + tuple(y.shape[1:])) for y in outs)
        if isinstance(out, tuple):
            return outs, (0,) * len(outs)
        return outs[0], 0

    return rule


def _define(struct, op):
    own = _STRUCT_SCHEMA[struct]
    if op in ("decode", "path"):
        args, ret = f"Tensor theta, {own}", "(Tensor, Tensor)"
    elif op == "hvp":
        args, ret = f"Tensor theta, Tensor Z, {own}, str reg, float gamma", "Tensor"
    else:
        args, ret = f"Tensor theta, {own}, str reg, float gamma", "Tensor" if op == "value" else "(Tensor, Tensor)"
    name = f"smoothmax::{struct}_{op}"
    custom = torch.library.custom_op(name, _real(struct, op), mutates_args=(), schema=f"({args}) -> {ret}")
    custom.register_fake(_fake(struct, op))
    if op in ("value", "grad", "hvp"):
        setup, backward = _autograd(struct, op)
        custom.register_autograd(backward, setup_context=setup)
    custom.register_vmap(_vmap_rule(struct, op))
    _OPS[struct, op] = getattr(torch.ops.smoothmax, f"{struct}_{op}").default
    _IMPLS[struct, op] = _real(struct, op)
    if op in ("value", "grad", "hvp"):
        _AUTOGRAD[struct, op] = setup, backward


class _EagerAutograd(torch.autograd.Function):
    """The autograd registered for an operator, entered without the dispatcher.

    Eager calls on plain tensors take this path (the same implementation,
    checks and backward as the operator; about 20 µs less per call than a
    trip through the dispatcher); traced calls (compile, export, transforms
    of torch.func, fake or meta tensors, dispatch modes) take the operator.
    ``apply(key, theta, Z, rest)``: ``Z`` the HVP direction (None otherwise),
    ``rest`` the operator's other arguments as one tuple (fewer arguments for
    ``Function.apply`` to inspect).
    """

    @staticmethod
    def forward(ctx, key, theta, Z, rest):
        # (the combined forward: a separate setup_context costs an inspect.signature per call)
        inputs = (theta, *rest) if Z is None else (theta, Z, *rest)
        output = _IMPLS[key](*inputs)
        ctx.key, ctx.offset = key, 1  # offset: the backward's inputs start after ``key``
        _AUTOGRAD[key][0](ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, *grads):
        out = _AUTOGRAD[ctx.key][1](ctx, *grads)
        if ctx.key[1] == "hvp":  # (theta, Z, *rest) -> (key, theta, Z, rest)
            return None, out[0], out[1], None
        return None, out[0], None, None


class _FunctorchAutograd(torch.autograd.Function):
    """The same autograd for ``torch.func`` transforms, which need a separate
    ``setup_context`` (custom ops' own autograd does not support them); the
    forward calls the operator, so ``vmap`` uses the operator's vmap rule."""

    generate_vmap_rule = True

    @staticmethod
    def forward(key, *args):
        return _OPS[key](*args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.key, ctx.offset = inputs[0], 1
        _AUTOGRAD[ctx.key][0](ctx, inputs[1:], output)

    @staticmethod
    def backward(ctx, *grads):
        return (None,) + _AUTOGRAD[ctx.key][1](ctx, *grads)


def _plain_eager(theta):
    """True for an eager call on a plain tensor, with nothing tracing or intercepting it."""
    return (type(theta) is torch.Tensor and not torch.compiler.is_compiling()
            and theta.device.type != "meta"
            and torch._C._functorch.peek_interpreter_stack() is None
            and torch._C._len_torch_dispatch_stack() == 0
            and not torch._C._is_torch_function_mode_enabled())


def _call(struct, op, theta, *args):
    """``torch.ops.smoothmax.<struct>_<op>(theta, *args)``, without the dispatcher in eager mode."""
    if torch._C._functorch.peek_interpreter_stack() is not None and (struct, op) in _AUTOGRAD \
            and not torch.compiler.is_compiling():
        return _FunctorchAutograd.apply((struct, op), theta, *args)
    if not _plain_eager(theta):
        return _OPS[struct, op](theta, *args)
    if (struct, op) in _AUTOGRAD and torch.is_grad_enabled() and (
            theta.requires_grad or (op == "hvp" and args[0].requires_grad)):
        if op == "hvp":
            return _EagerAutograd.apply((struct, op), theta, args[0], args[1:])
        return _EagerAutograd.apply((struct, op), theta, None, args)
    return _IMPLS[struct, op](theta, *args)


for _struct in STRUCT_FIELDS:
    for _op in ("value", "grad", "hvp", _DECODE[_struct]):
        _define(_struct, _op)


# ---------------------------------------------------------------------------
# checks of the public functions' inputs that need data, as operators


def _check_tags_real(tags, lengths, S):
    T = int(tags.shape[-1]) if tags.ndim else 1
    host = tags.detach().cpu().numpy().reshape(-1, T)
    L = np.full(host.shape[0], T) if lengths is None else lengths.detach().cpu().numpy()
    valid = np.arange(host.shape[1])[None, :] < L[:, None]
    bad = valid & ((host < 0) | (host >= S))
    if bad.any():
        raise ValueError(f"tags must be integers in [0, {S}) before each length, got {int(host[bad][0])}")
    return tags.to(torch.int64, copy=True)


torch.library.custom_op("smoothmax::check_tags", _check_tags_real, mutates_args=(),
                        schema="(Tensor tags, Tensor? lengths, int S) -> Tensor")
torch.library.register_fake("smoothmax::check_tags")(
    lambda tags, lengths, S: tags.new_empty(tags.shape, dtype=torch.int64))


def _check_binary_real(Y, name):
    h = Y.detach().cpu().numpy()
    if h.size and not np.all((h == 0) | (h == 1)):
        raise ValueError(f"{name} must be a 0/1 alignment matrix, got values other than 0 and 1")
    return Y.clone()


_check_binary_op = torch.library.custom_op("smoothmax::check_binary", _check_binary_real, mutates_args=(),
                                           schema="(Tensor Y, str name) -> Tensor")
_check_binary_op.register_fake(lambda Y, name: torch.empty_like(Y))
_check_binary_op.register_autograd(lambda ctx, g: (g, None))


def check_tags(tags, lengths, S, shape):
    """Tags (..., T) as int64, checked in range before each length inside an operator."""
    if not isinstance(tags, torch.Tensor):
        raise TypeError(f"tags must be an integer array, got {type(tags).__name__}")
    if tags.dtype.is_floating_point or tags.dtype.is_complex or tags.dtype == torch.bool:
        raise TypeError(f"tags must be an integer array, got dtype {tags.dtype}")
    if tuple(tags.shape) != tuple(shape):
        raise ValueError(f"tags must have shape {tuple(shape)} (theta's batch shape + (T,)), "
                         f"got {tuple(tags.shape)}")
    return torch.ops.smoothmax.check_tags(tags, lengths, S)


def check_binary(Y, name):
    """``Y`` checked to hold only 0 and 1, inside an operator (differentiable: the identity)."""
    return torch.ops.smoothmax.check_binary(Y, name)


def check_values(x, xp, name, forbid):
    """The value checks run inside the operators (see the module docstring)."""


def check_lengths(lengths, batch_shape, maximum, name="lengths"):
    """``lengths`` broadcast to ``batch_shape`` as a flat int64 tensor (range checked in the ops).

    None (full lengths) stays None. Python ints, lists and NumPy arrays are
    checked here, on the host; tensors inside the operators.
    """
    if lengths is None:
        return None
    B = _batch_size(batch_shape)
    if not isinstance(lengths, torch.Tensor):
        return torch.tensor(_validation.check_lengths(lengths, batch_shape, maximum, name))
    _validation.check_dense(lengths, name)
    if lengths.requires_grad:
        raise TypeError(f"{name} must be integers and carry no gradient, got a tensor that requires grad "
                        f"(pass {name}.detach() or an integer tensor)")
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise TypeError(f"{name} must contain integers, got dtype {lengths.dtype}")
    if not _broadcastable(tuple(lengths.shape), tuple(batch_shape)):
        raise ValueError(f"{name} must have the batch shape {tuple(batch_shape)} (or broadcast to it), "
                         f"got shape {tuple(lengths.shape)}")
    return lengths.to(dtype=torch.int64).broadcast_to(batch_shape).reshape(B)


def _broadcastable(shape, target):
    if len(shape) > len(target):
        return False
    return all(s in (1, t) for s, t in zip(shape[::-1], target[::-1]))


# ---------------------------------------------------------------------------
# the adapter


def _op_args(problem):
    args = []
    for f in STRUCT_FIELDS[problem.struct]:
        v = getattr(problem, f)
        args.append(torch.from_numpy(v.copy()) if isinstance(v, np.ndarray) else v)
    return args


def apply(problem: Problem, op: str, theta: Tensor, Z: Optional[Tensor] = None) -> Any:
    """Run ``op`` of ``problem`` on flat tensors ``theta`` (and ``Z``), (B, ...).

    Returns ``value (B,)`` for ``"value"``, ``(value, E)`` for ``"grad"``,
    ``Edot`` for ``"hvp"``, ``(score, path)`` for ``"decode"``/``"path"``
    (not differentiable), by the operators ``torch.ops.smoothmax.*``.
    The public functions call it (through ``smoothmax._problem.evaluate``)
    for torch tensors; a user calls those.

    Examples
    --------
    >>> import torch
    >>> import smoothmax as sm
    >>> theta = torch.rand(2, 3, 4, dtype=torch.float64, requires_grad=True)
    >>> value = sm.dtw(theta)  # apply(problem, "value", theta) with the custom ops
    >>> (E,) = torch.autograd.grad(value.sum(), theta, create_graph=True)
    >>> bool(torch.allclose(E, sm.dtw_grad(theta.detach())[1]))
    True
    >>> Z = torch.rand(2, 3, 4, dtype=torch.float64)  # the second derivative is the HVP pass
    >>> (Edot,) = torch.autograd.grad(E, theta, grad_outputs=Z)
    >>> bool(torch.allclose(Edot, sm.dtw_hvp(theta.detach(), Z)))
    True
    """
    fields = _op_args(problem)
    struct = problem.struct
    if op in ("decode", "path"):
        return _call(struct, op, theta.detach(), *fields)
    args = (*fields, problem.reg, problem.gamma)
    if op == "value":
        if torch.is_grad_enabled() and theta.requires_grad:
            return _call(struct, "grad", theta, *args)[0]
        return _call(struct, "value", theta, *args)
    if op == "grad":
        return _call(struct, "grad", theta, *args)
    if op == "hvp":
        if Z is None:
            raise ValueError("Z (the direction) is required for op='hvp'")
        return _call(struct, "hvp", theta, Z.to(theta.dtype), *args)
    raise ValueError(f"op must be one of 'value', 'grad', 'hvp', 'decode', 'path', got {op!r}")


# ---------------------------------------------------------------------------
# Layers


def squared_euclidean(x: Tensor, y: Tensor) -> Tensor:
    """Pairwise squared Euclidean costs ``C[b, i, j] = ‖x[b, i] − y[b, j]‖²``.

    Parameters
    ----------
    x : Tensor, shape (B, N, d)
    y : Tensor, shape (B, M, d)

    Returns
    -------
    C : Tensor, shape (B, N, M), non-negative; differentiable (twice) in ``x`` and ``y``.

    Examples
    --------
    >>> import torch
    >>> from smoothmax.torch import squared_euclidean
    >>> x = torch.tensor([[[0.0, 0.0], [1.0, 1.0]]])
    >>> y = torch.tensor([[[1.0, 0.0]]])
    >>> squared_euclidean(x, y)
    tensor([[[1.],
             [1.]]])
    """
    xx = (x * x).sum(-1)[:, :, None]
    yy = (y * y).sum(-1)[:, None, :]
    return (xx + yy - 2.0 * torch.matmul(x, y.transpose(-1, -2))).clamp_min(0.0)


def _series(x, name):
    """``x`` as a (B, N, d) tensor; a 2-D input is never guessed (one pair or B univariate series?)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim == 2:
        raise ValueError(
            f"{name} must have shape (B, N, d), got the 2-D shape {tuple(x.shape)}: pass "
            f"{name}[None] for one multivariate series of length {x.shape[0]}, or "
            f"{name}[..., None] for a batch of {x.shape[0]} univariate series")
    if x.ndim != 3:
        raise ValueError(f"{name} must have shape (B, N, d), got shape {tuple(x.shape)}")
    return x


def _full_lengths(lengths, B, N):
    if lengths is None:
        return torch.full((B,), N, dtype=torch.int64)
    return lengths


class SoftDTW(nn.Module):
    """Soft-DTW loss between batches of time series (Cuturi & Blondel, 2017), DTW_Ω of docs/spec.md §4.

    ``loss(x, y) = DTW_Ω(C(x, y))`` with ``C`` a pairwise cost. Gradients
    flow to ``x`` and ``y`` (twice): built-in costs through
    :func:`smoothmax.dtw_features` (linear memory on the CPU), callables
    through the custom passes of :mod:`smoothmax.torch` on ``C``. ``gamma``
    comes first, as in tslearn's ``SoftDTWLossPyTorch`` and pysdtw's ``SoftDTW``.

    Parameters
    ----------
    gamma : float > 0
    reg : {"negentropy", "l2", "hard"}
        ``"negentropy"`` is soft-DTW, ``"l2"`` sparse DTW, ``"hard"`` classic DTW.
    band : None or int >= 0
        Sakoe-Chiba radius (as ``tslearn.metrics.sakoe_chiba_mask``).
    normalize : bool
        If True, return the soft-DTW divergence
        ``DTW(x, y) − (DTW(x, x) + DTW(y, y)) / 2`` (each self term with its
        own lengths), which is 0 for ``x = y``.
    cost : {"sqeuclidean", "euclidean", "cosine"} or callable, optional
        A built-in cost (default ``"sqeuclidean"``) runs
        :func:`smoothmax.dtw_features`: the cost matrix is never formed and
        memory is linear in the lengths (second derivatives recompute through
        the cost matrix). A callable ``(x (B, N, d), y (B, M, d)) -> (B, N, M)``
        builds the cost matrix with torch operations (e.g. :func:`squared_euclidean`).
    reduction : {"mean", "sum", "none"}
        Over the batch: a scalar for ``"mean"`` and ``"sum"``, shape (B,) for ``"none"``.

    Notes
    -----
    Shapes: ``x`` (B, N, d); ``y`` (B, M, d); ``x_lengths``, ``y_lengths`` (B,)
    ints, optional. A 2-D input raises: use ``x[None]`` for one multivariate
    pair and ``x[..., None]`` for a batch of univariate series.

    Examples
    --------
    >>> import torch
    >>> from smoothmax.torch import SoftDTW
    >>> x = torch.randn(4, 20, 3, dtype=torch.float64, requires_grad=True)
    >>> y = torch.randn(4, 30, 3, dtype=torch.float64)
    >>> loss = SoftDTW(0.1, normalize=True)
    >>> loss(x, y).backward()  # the mean over the batch; gradients flow to x
    >>> x.grad.shape
    torch.Size([4, 20, 3])
    >>> SoftDTW(0.1, reduction="none")(x, y).shape
    torch.Size([4])
    >>> loss(y, y).item()  # the divergence vanishes on identical series
    0.0
    """

    reg: Reg
    gamma: float
    band: Optional[int]
    normalize: bool
    cost: "str | Callable[[Tensor, Tensor], Tensor]"
    reduction: str

    def __init__(self, gamma: float = 1.0, *, reg: Reg = "negentropy", band: Optional[int] = None,
                 normalize: bool = False, cost: "str | Callable[[Tensor, Tensor], Tensor] | None" = None,
                 reduction: str = "mean") -> None:
        super().__init__()
        from ._validation import check_band, check_gamma, check_reg

        if isinstance(gamma, str):
            raise TypeError(f"gamma must be a positive finite real number, got {gamma!r} "
                            "(the signature is SoftDTW(gamma=1.0, *, reg=...): pass reg by name)")
        self.gamma = check_gamma(gamma)
        self.reg = check_reg(reg)
        self.band = None if band is None else check_band(band)
        self.normalize = bool(normalize)
        from .dtw import FEATURE_COSTS

        cost = "sqeuclidean" if cost is None else cost
        if isinstance(cost, str) and cost not in FEATURE_COSTS or not (isinstance(cost, str) or callable(cost)):
            raise ValueError(f"cost must be one of {list(FEATURE_COSTS)} or a callable, got {cost!r}")
        self.cost = cost
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be one of 'mean', 'sum', 'none', got {reduction!r}")
        self.reduction = reduction

    def extra_repr(self) -> str:
        return (f"gamma={self.gamma}, reg={self.reg!r}, band={self.band}, "
                f"normalize={self.normalize}, reduction={self.reduction!r}")

    def _dtw(self, a, b, la, lb):
        from .dtw import dtw

        lengths = None if la is None and lb is None else (
            _full_lengths(la, a.shape[0], a.shape[1]), _full_lengths(lb, b.shape[0], b.shape[1]))
        cost = self.cost
        if isinstance(cost, str):
            if not torch.compiler.is_compiling() and a.device.type != "meta":
                from .dtw import dtw_features

                return dtw_features(a, b, cost=cost, reg=self.reg, gamma=self.gamma, lengths=lengths,
                                    band=self.band)
            # Traced (torch.compile, torch.export) or meta: the same value through the cost matrix and
            # the dtw operators, which are graph nodes (the feature kernel is not an operator yet).
            from ._reference import pairwise_cost

            cost = squared_euclidean if cost == "sqeuclidean" else (lambda u, v: pairwise_cost(_xp, u, v, self.cost))
        return dtw(cost(a, b), reg=self.reg, gamma=self.gamma, lengths=lengths, band=self.band)

    def forward(self, x: Tensor, y: Tensor, x_lengths: Optional[Tensor] = None,
                y_lengths: Optional[Tensor] = None) -> Tensor:
        """DTW_Ω between ``x[b, :x_lengths[b]]`` and ``y[b, :y_lengths[b]]``, reduced over b."""
        x, y = _series(x, "x"), _series(y, "y")
        if x.shape[0] != y.shape[0] or x.shape[2] != y.shape[2]:
            raise ValueError(
                f"x and y must have shapes (B, N, d) and (B, M, d), got {tuple(x.shape)} and {tuple(y.shape)}")
        value = self._dtw(x, y, x_lengths, y_lengths)
        if self.normalize:
            value = value - 0.5 * (self._dtw(x, x, x_lengths, x_lengths)
                                   + self._dtw(y, y, y_lengths, y_lengths))
        if self.reduction == "mean":
            return value.mean()
        if self.reduction == "sum":
            return value.sum()
        return value


class Viterbi(nn.Module):
    """Smoothed Viterbi / linear-chain CRF layer, Vit_Ω of docs/spec.md §3.

    ``theta[b, t, i, j]`` scores state ``i`` at step ``t`` coming from state
    ``j`` at step ``t − 1`` (emission plus transition scores). With
    ``reg="negentropy"`` and ``gamma=1`` the value is the CRF log-partition
    and :meth:`marginals` are the CRF marginals.

    Parameters
    ----------
    reg : {"negentropy", "l2", "hard"}
    gamma : float > 0

    Notes
    -----
    Shapes: ``theta`` (B, T, S, S); ``lengths`` (B,) ints in 1..T, optional.

    Examples
    --------
    >>> import torch
    >>> from smoothmax.torch import Viterbi
    >>> crf = Viterbi()
    >>> theta = torch.randn(2, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    >>> lengths = torch.tensor([5, 3])
    >>> crf(theta, lengths).shape  # the log-partition per sequence
    torch.Size([2])
    >>> crf.marginals(theta, lengths).sum(-1)  # p(y_t = i) sums to 1, 0 past the length
    tensor([[1., 1., 1., 1., 1.],
            [1., 1., 1., 0., 0.]], dtype=torch.float64, grad_fn=<SumBackward1>)
    >>> score, tags = crf.decode(theta, lengths)
    >>> tags[1, 3:]
    tensor([-1, -1])
    """

    reg: Reg
    gamma: float

    def __init__(self, reg: Reg = "negentropy", gamma: float = 1.0) -> None:
        super().__init__()
        from ._validation import check_gamma, check_reg

        self.reg = check_reg(reg)
        self.gamma = check_gamma(gamma)

    def extra_repr(self) -> str:
        return f"reg={self.reg!r}, gamma={self.gamma}"

    def forward(self, theta: Tensor, lengths: Optional[Tensor] = None) -> Tensor:
        """Vit_Ω(θ): the log-partition for negentropy, γ = 1. Returns shape (B,)."""
        from .viterbi import viterbi

        return viterbi(theta, reg=self.reg, gamma=self.gamma, lengths=lengths)

    def marginals(self, theta: Tensor, lengths: Optional[Tensor] = None, pairwise: bool = False) -> Tensor:
        """Unary marginals ``p(y_t = i)`` (B, T, S), or pairwise ``E`` (B, T, S, S).

        Differentiable in ``theta`` (their backward is the HVP pass); zero
        past the lengths.
        """
        from .viterbi import viterbi_grad

        E = viterbi_grad(theta, reg=self.reg, gamma=self.gamma, lengths=lengths)[1]
        return E if pairwise else E.sum(-1)

    def decode(self, theta: Tensor, lengths: Optional[Tensor] = None) -> "tuple[Tensor, Tensor]":
        """Best score (B,) and tags (B, T) int64, ``-1`` past a length (not differentiable)."""
        from .viterbi import viterbi_decode

        return viterbi_decode(theta, lengths=lengths)


# ---------------------------------------------------------------------------
# DTW between features (smoothmax.dtw_features): the compiled linear-memory kernel


class _Cached:
    """Carries an engine output into ``Function.apply`` without making it an autograd input."""

    __slots__ = ("tensor",)

    def __init__(self, tensor):
        self.tensor = tensor

_FEATURE_GRAD_OUTPUT = (
    "the gradients returned by smoothmax.dtw_features_grad are not differentiable; for second "
    "derivatives use torch.autograd.grad(smoothmax.dtw_features(x, y), ..., create_graph=True)"
)


def _feature_kernel(fp, x, y, grad):
    value, gx, gy = _dispatch.run_features(fp, x.detach().cpu().numpy(), y.detach().cpu().numpy(), grad)
    wrap = torch.from_numpy
    return wrap(value), (None if gx is None else wrap(gx)), (None if gy is None else wrap(gy))


class DTWFeatures(torch.autograd.Function):
    """``(x (B, NA, d), y (B, NB, d)) -> DTW_Ω(C(x, y)) (B,)`` by the linear-memory kernel.

    The forward runs the gradient kernel and keeps ``grad_x``, ``grad_y``
    (O((NA + NB)·d)); the backward scales them. A backward with
    ``create_graph=True`` (second order) recomputes the value through the
    cost matrix and the custom DTW Functions above (quadratic memory), so
    Hessian-vector products are exact but not linear in memory.

    Examples
    --------
    >>> import torch
    >>> import smoothmax as sm
    >>> x = torch.randn(2, 30, 3, dtype=torch.float64, requires_grad=True)
    >>> y = torch.randn(2, 40, 3, dtype=torch.float64)
    >>> value = sm.dtw_features(x, y)  # DTWFeatures.apply(x, y, ...) on the CPU
    >>> (gx,) = torch.autograd.grad(value.sum(), x)
    >>> bool(torch.allclose(gx, sm.dtw_features_grad(x.detach(), y)[1]))
    True
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, y: Tensor, fp: Any, cached: Optional[_Cached] = None) -> Tensor:
        value, gx, gy = cached.tensor if cached is not None else _feature_kernel(fp, x, y, True)
        ctx.fp = fp
        ctx.save_for_backward(x, y, gx, gy)
        return value

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> "tuple[Optional[Tensor], Optional[Tensor], None, None]":
        x, y, gx, gy = ctx.saved_tensors
        fp = ctx.fp
        if torch.is_grad_enabled():
            from . import _reference
            from .dtw import dtw

            wrt = [t for t, need in zip((x, y), ctx.needs_input_grad[:2]) if need]
            C = _reference.pairwise_cost(fp.xp, x, y, fp.cost)
            value = dtw(C, reg=fp.reg, gamma=fp.gamma, lengths=(fp.la, fp.lb),
                        band=None if fp.band < 0 else fp.band)
            grads = iter(torch.autograd.grad(value, wrt, grad_outputs=g, create_graph=True))
            return (next(grads) if ctx.needs_input_grad[0] else None,
                    next(grads) if ctx.needs_input_grad[1] else None, None, None)
        gg = g[:, None, None]
        return (gg * gx if ctx.needs_input_grad[0] else None,
                gg * gy if ctx.needs_input_grad[1] else None, None, None)


class _NotDifferentiable(torch.autograd.Function):
    """Identity whose backward raises (outputs that must not be differentiated)."""

    @staticmethod
    def forward(ctx, t, anchor):
        return t

    @staticmethod
    def backward(ctx, g):
        raise RuntimeError(_FEATURE_GRAD_OUTPUT)


def apply_features(fp, x, y, grad):
    """``(value, grad_x, grad_y)`` (the gradients None unless ``grad``) of flat CPU tensors.

    ``value`` is differentiable in ``x`` and ``y`` when autograd records;
    ``grad_x``/``grad_y`` are not (their backward raises).
    """
    dtype = x.dtype
    recording = torch.is_grad_enabled() and (x.requires_grad or y.requires_grad)
    if not recording:
        value, gx, gy = _feature_kernel(fp, x, y, grad)
        return value.to(dtype), gx, gy
    out = _feature_kernel(fp, x, y, True)
    value = DTWFeatures.apply(x, y, fp, _Cached(out))
    if not grad:
        return value, None, None
    anchor = x if x.requires_grad else y
    return value, _NotDifferentiable.apply(out[1], anchor), _NotDifferentiable.apply(out[2], anchor)


from ._torch_crf import CRF  # noqa: E402  (the factorised CRF layer; docs/crf.md)

__all__ += ["CRF"]


register_array_type(torch.Tensor, _xp, "torch")
register_adapter("torch", sys.modules[__name__])
