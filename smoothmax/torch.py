"""PyTorch autodiff for the structured operators, and ``torch.nn`` layers.

Design (the two-Function pattern of the paper's own code, written once for
every structure: ``problem.struct`` selects the engine functions)::

    value = DPValue(theta)   backward: g ↦ g·E,   E = DPGrad(theta)
    E     = DPGrad(theta)    backward: G ↦ DPHvp(theta, G) = ∇²DP_Ω(θ)·G
    Edot  = DPHvp(theta, Z)  backward: W ↦ DPHvp(theta, W) w.r.t. Z (the Hessian is
                             symmetric); w.r.t. theta it raises (third order)

so that ``autograd.grad(value, theta, create_graph=True)`` followed by a second
``autograd.grad`` runs the custom HVP pass of SPEC §2 (one forward and one
reverse pass over the DP), never autograd through the recursion: the graph
of one call is one custom node. ``DPValue.forward`` computes ``(value, E)`` in
one engine call when ``theta`` requires grad and keeps ``E`` for its backward,
so a first-order backward does not run the DP again.

Engines: CPU tensors go to the compiled core as zero-copy NumPy views; CUDA
tensors go to the GPU engine through DLPack (``smoothmax._dispatch``). Every
output has the input's dtype and device.
"""
import torch
from torch import nn

from . import _dispatch

__all__ = ["apply", "DPValue", "DPGrad", "DPHvp", "DTWFeatures", "SoftDTW", "Viterbi", "squared_euclidean"]

_THIRD_ORDER = (
    "third-order derivatives are not supported by smoothmax: the derivative of a "
    "Hessian-vector product with respect to theta was requested. Detach theta "
    "(theta.detach()) if you only need the derivative with respect to the direction."
)


class _Cached:
    """Carries an engine output into ``Function.apply`` without making it an autograd input."""

    __slots__ = ("tensor",)

    def __init__(self, tensor):
        self.tensor = tensor


def _detached(x):
    return x.detach()


def _batch_expand(g, like):
    """``g`` of shape (B,) as (B, 1, ..., 1) to broadcast against ``like`` (B, ...)."""
    return g.reshape(tuple(g.shape) + (1,) * (like.ndim - g.ndim))


class DPValue(torch.autograd.Function):
    """``theta (B, ...) -> DP_Ω(θ) (B,)``; backward ``g·E`` with ``E`` from :class:`DPGrad`."""

    @staticmethod
    def forward(ctx, theta, problem, cached_value=None, cached_E=None):
        if cached_value is None:
            value, E = _dispatch.run(problem, "grad", _detached(theta))
        else:
            value, E = cached_value.tensor, cached_E.tensor
        ctx.problem = problem
        ctx.save_for_backward(theta, E)
        return value

    @staticmethod
    def backward(ctx, g):
        theta, E = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True: E must itself be differentiable (its backward is the HVP).
            E = DPGrad.apply(theta, ctx.problem, _Cached(E))
        return _batch_expand(g, E) * E, None, None, None


class DPGrad(torch.autograd.Function):
    """``theta (B, ...) -> E = ∇DP_Ω(θ)``; backward ``G ↦ ∇²DP_Ω(θ)·G`` by the HVP pass."""

    @staticmethod
    def forward(ctx, theta, problem, cached_E=None):
        if cached_E is None:
            E = _dispatch.run(problem, "grad", _detached(theta))[1]
        else:
            # a new tensor object sharing storage (and the version counter) with the cache
            E = cached_E.tensor.detach()
        ctx.problem = problem
        ctx.save_for_backward(theta)
        return E

    @staticmethod
    def backward(ctx, G):
        (theta,) = ctx.saved_tensors
        return DPHvp.apply(theta, G, ctx.problem), None, None


class DPHvp(torch.autograd.Function):
    """``(theta, Z) -> ∇²DP_Ω(θ)·Z``: linear in ``Z``; not differentiable in ``theta``."""

    @staticmethod
    def forward(ctx, theta, Z, problem):
        ctx.problem = problem
        ctx.save_for_backward(theta)
        Z = _detached(Z)
        if Z.dtype != theta.dtype:
            Z = Z.to(theta.dtype)
        return _dispatch.run(problem, "hvp", _detached(theta), Z)[2]

    @staticmethod
    def backward(ctx, W):
        if ctx.needs_input_grad[0]:
            raise RuntimeError(_THIRD_ORDER)
        (theta,) = ctx.saved_tensors
        gZ = DPHvp.apply(theta, W, ctx.problem) if ctx.needs_input_grad[1] else None
        return None, gZ, None


def apply(problem, op, theta, Z=None):
    """Run ``op`` of ``problem`` on flat tensors ``theta`` (and ``Z``), (B, ...).

    Returns ``value (B,)`` for ``"value"``, ``(value, E)`` for ``"grad"``,
    ``Edot`` for ``"hvp"``, ``(score, path)`` for ``"decode"``/``"path"``
    (not differentiable). Outputs are differentiable as described in the
    module docstring when autograd records (``torch.is_grad_enabled()`` and an
    input requires grad); otherwise the engine is called directly.
    """
    recording = torch.is_grad_enabled()
    if op in ("decode", "path"):
        return _dispatch.run(problem, op, _detached(theta))
    if op == "value":
        if not (recording and theta.requires_grad):
            return _dispatch.run(problem, "value", _detached(theta))[0]
        return DPValue.apply(theta, problem)
    if op == "grad":
        value, E = _dispatch.run(problem, "grad", _detached(theta))
        if not (recording and theta.requires_grad):
            return value, E
        return (DPValue.apply(theta, problem, _Cached(value), _Cached(E)),
                DPGrad.apply(theta, problem, _Cached(E)))
    if op == "hvp":
        if not (recording and (theta.requires_grad or Z.requires_grad)):
            return _dispatch.run(problem, "hvp", _detached(theta), _detached(Z))[2]
        return DPHvp.apply(theta, Z, problem)
    raise ValueError(f"op must be one of 'value', 'grad', 'hvp', 'decode', 'path', got {op!r}")


# ---------------------------------------------------------------------------
# Layers


def squared_euclidean(x, y):
    """Pairwise squared Euclidean costs ``C[b, i, j] = ‖x[b, i] − y[b, j]‖²``.

    Parameters
    ----------
    x : Tensor, shape (B, N, d)
    y : Tensor, shape (B, M, d)

    Returns
    -------
    C : Tensor, shape (B, N, M), non-negative; differentiable (twice) in ``x`` and ``y``.
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
    """Soft-DTW loss between batches of time series (Cuturi & Blondel, 2017), DTW_Ω of SPEC §4.

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

    Shapes
    ------
    x : (B, N, d); y : (B, M, d); x_lengths, y_lengths : (B,) ints, optional.
    A 2-D input raises: use ``x[None]`` for one multivariate pair and
    ``x[..., None]`` for a batch of univariate series.

    Examples
    --------
    >>> loss = SoftDTW(0.1, normalize=True)
    >>> loss(x, y).backward()  # doctest: +SKIP
    """

    def __init__(self, gamma=1.0, *, reg="negentropy", band=None, normalize=False, cost=None,
                 reduction="mean"):
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

    def extra_repr(self):
        return (f"gamma={self.gamma}, reg={self.reg!r}, band={self.band}, "
                f"normalize={self.normalize}, reduction={self.reduction!r}")

    def _dtw(self, a, b, la, lb):
        from .dtw import dtw

        lengths = None if la is None and lb is None else (
            _full_lengths(la, a.shape[0], a.shape[1]), _full_lengths(lb, b.shape[0], b.shape[1]))
        if isinstance(self.cost, str):
            from .dtw import dtw_features

            return dtw_features(a, b, cost=self.cost, reg=self.reg, gamma=self.gamma, lengths=lengths,
                                band=self.band)
        return dtw(self.cost(a, b), reg=self.reg, gamma=self.gamma, lengths=lengths, band=self.band)

    def forward(self, x, y, x_lengths=None, y_lengths=None):
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
    """Smoothed Viterbi / linear-chain CRF layer, Vit_Ω of SPEC §3.

    ``theta[b, t, i, j]`` scores state ``i`` at step ``t`` coming from state
    ``j`` at step ``t − 1`` (emission plus transition scores). With
    ``reg="negentropy"`` and ``gamma=1`` the value is the CRF log-partition
    and :meth:`marginals` are the CRF marginals.

    Parameters
    ----------
    reg : {"negentropy", "l2", "hard"}
    gamma : float > 0

    Shapes
    ------
    theta : (B, T, S, S); lengths : (B,) ints in 1..T, optional.
    """

    def __init__(self, reg="negentropy", gamma=1.0):
        super().__init__()
        from ._validation import check_gamma, check_reg

        self.reg = check_reg(reg)
        self.gamma = check_gamma(gamma)

    def extra_repr(self):
        return f"reg={self.reg!r}, gamma={self.gamma}"

    def forward(self, theta, lengths=None):
        """Vit_Ω(θ): the log-partition for negentropy, γ = 1. Returns shape (B,)."""
        from .viterbi import viterbi

        return viterbi(theta, reg=self.reg, gamma=self.gamma, lengths=lengths)

    def marginals(self, theta, lengths=None, pairwise=False):
        """Unary marginals ``p(y_t = i)`` (B, T, S), or pairwise ``E`` (B, T, S, S).

        Differentiable in ``theta`` (their backward is the HVP pass); zero
        past the lengths.
        """
        from .viterbi import viterbi_grad

        E = viterbi_grad(theta, reg=self.reg, gamma=self.gamma, lengths=lengths)[1]
        return E if pairwise else E.sum(-1)

    def decode(self, theta, lengths=None):
        """Best score (B,) and tags (B, T) int64, ``-1`` past a length (not differentiable)."""
        from .viterbi import viterbi_decode

        return viterbi_decode(theta, lengths=lengths)


# ---------------------------------------------------------------------------
# DTW between features (smoothmax.dtw_features): the compiled linear-memory kernel

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
    """

    @staticmethod
    def forward(ctx, x, y, fp, cached=None):
        value, gx, gy = cached.tensor if cached is not None else _feature_kernel(fp, x, y, True)
        ctx.fp = fp
        ctx.save_for_backward(x, y, gx, gy)
        return value

    @staticmethod
    def backward(ctx, g):
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
