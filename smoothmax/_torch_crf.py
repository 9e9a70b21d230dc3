"""``smoothmax.torch.CRF``: pytorch-crf's layer on the factorised Vit_Ω kernel (part of
:mod:`smoothmax.torch`, which re-exports it; docs/crf.md).

Autodiff follows the two-Function pattern of :mod:`smoothmax.torch`, on the
four inputs ``(emissions (B, T, S), transitions, start, end)``::

    value = CRFValue(...)     backward g ↦ (g_b·∇_e value_b, Σ_b g_b·∇_A value_b, ...)
    grads = CRFGrad(..., g)   the above as a function; backward U ↦ the HVP pass
                              (Σ_b g_b·∇²value_b·U) and, for g, <∇value_b, U_b>
    hvp   = CRFHvp(...)       its backward raises (third order)

The shared gradients are summed over the batch inside the kernel with the
upstream weights ``g_b``. ``CRFValue.forward`` computes the gradients with
unit weights when an input requires grad; the backward reuses them when
``g`` is uniform (the ``"sum"``/``"mean"``/``"token_mean"`` reductions) and
runs the kernel again with weights ``g`` otherwise.
"""
from typing import Any, Optional

import torch
from torch import nn

from . import crf as _crf
from ._typing import Reg, Seed

Tensor = torch.Tensor

__all__ = ["CRF", "CRFValue", "CRFGrad", "CRFHvp"]

_THIRD_ORDER = (
    "third-order derivatives are not supported by smoothmax: the derivative of a "
    "CRF Hessian-vector product was requested."
)


def _host(g):
    return g.detach().to("cpu", torch.float64).numpy()


def _like(y, x):
    return y.to(dtype=x.dtype, device=x.device)


def _weighted(problem, inputs, g):
    """Gradients of ``Σ_b g_b value_b``: ``(g_b·ge_b, gA, gs, gend)``."""
    em, A, s, e = inputs
    _, ge, gA, gs, gen = _crf.run(problem, "grad", em, A, s, e, weights=_host(g))
    return (g.to(ge.dtype)[:, None, None] * ge,) + tuple(_like(y, x) for y, x in zip((gA, gs, gen), inputs[1:]))


class CRFValue(torch.autograd.Function):
    """``(emissions, transitions, start, end) -> value (B,)``."""

    @staticmethod
    def forward(ctx, emissions, transitions, start, end, problem):
        inputs = [x.detach() for x in (emissions, transitions, start, end)]
        ctx.problem = problem
        if not any(ctx.needs_input_grad[:4]):
            return _crf.run(problem, "value", *inputs)[0]
        value, ge, gA, gs, gen = _crf.run(problem, "grad", *inputs)
        ctx.save_for_backward(emissions, transitions, start, end, ge, gA, gs, gen)
        return value

    @staticmethod
    def backward(ctx, g):
        emissions, transitions, start, end, ge, gA, gs, gen = ctx.saved_tensors
        inputs = (emissions, transitions, start, end)
        if torch.is_grad_enabled():  # create_graph: gradients that differentiate (HVP)
            out = CRFGrad.apply(*inputs, g, ctx.problem)
        elif g.numel() == 0 or bool((g == g[0]).all()):
            c = g[0] if g.numel() else g.new_zeros(())
            out = (g.to(ge.dtype)[:, None, None] * ge,) + tuple(
                _like(c * y, x) for y, x in zip((gA, gs, gen), inputs[1:]))
        else:
            out = _weighted(ctx.problem, [x.detach() for x in inputs], g)
        return tuple(o if need else None for o, need in zip(out, ctx.needs_input_grad[:4])) + (None,)


class CRFGrad(torch.autograd.Function):
    """``(emissions, transitions, start, end, g) -> (g_b·∇_e value_b, Σ_b g_b ∇_A value_b, ...)``."""

    @staticmethod
    def forward(ctx, emissions, transitions, start, end, g, problem):
        ctx.problem = problem
        ctx.save_for_backward(emissions, transitions, start, end, g)
        return _weighted(problem, [x.detach() for x in (emissions, transitions, start, end)], g.detach())

    @staticmethod
    def backward(ctx, Ue, UA, Us, Uen):
        emissions, transitions, start, end, g = ctx.saved_tensors
        he, hA, hs, hen, vdot = CRFHvp.apply(emissions, transitions, start, end, Ue, UA, Us, Uen, g,
                                             ctx.problem)
        return he, hA, hs, hen, _like(vdot, g), None


class CRFHvp(torch.autograd.Function):
    """``Σ_b g_b ∇²value_b·U_b`` in the parameters' layout, and ``<∇value_b, U_b>``."""

    @staticmethod
    def forward(ctx, emissions, transitions, start, end, Ue, UA, Us, Uen, g, problem):
        inputs = [x.detach() for x in (emissions, transitions, start, end)]
        Z = [u.detach().to(emissions.dtype) for u in (Ue, UA, Us, Uen)]
        em, A, s, e = inputs
        vdot, he, hA, hs, hen = _crf.run(problem, "hvp", em, A, s, e, Z=Z, weights=_host(g))
        return ((g.detach().to(he.dtype)[:, None, None] * he,)
                + tuple(_like(y, x) for y, x in zip((hA, hs, hen), inputs[1:])) + (vdot,))

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(_THIRD_ORDER)


def log_partition(emissions, transitions, start, end, lengths, reg, gamma):
    """Differentiable (twice) smoothed value per item, ``emissions (B, T, S)`` -> ``(B,)``."""
    em, A, s, e, problem = _crf.prepare(emissions, transitions, start, end, lengths, reg, gamma)
    return CRFValue.apply(em, A, s, e, problem)


class CRF(nn.Module):
    """Conditional random field with pytorch-crf's interface, on the factorised Vit_Ω kernel.

    A drop-in replacement for ``torchcrf.CRF``: same constructor, parameters
    (``start_transitions``, ``end_transitions``, ``transitions[from, to]``,
    initialised uniformly in ``[-0.1, 0.1]``), ``forward`` (the
    log-likelihood), ``decode`` and errors. The log-partition and its
    gradients come from one compiled kernel that never forms the
    ``(B, T, S, S)`` potentials; gradients are twice differentiable (the
    second order runs the HVP pass).

    Parameters
    ----------
    num_tags : int > 0
    batch_first : bool
        Inputs are ``(batch, seq, ...)`` if True, ``(seq, batch, ...)`` otherwise.
    reg : {"negentropy", "l2", "hard"}
        ``"negentropy"`` (with ``gamma=1``) is the exact CRF:
        ``forward = score(tags) − log Z``. ``"l2"`` is the paper's sparse
        surrogate: ``forward = score(tags) − Vit_ℓ2(θ)``, the negative of the
        loss ``Vit_ℓ2(θ) − <Y, θ>``; not a log-probability (it can be
        positive; see docs/crf.md).
        ``"hard"``: ``score(tags) − max_y score(y) ≤ 0``, the negative
        structured-perceptron loss.
    gamma : float > 0
        Smoothing strength (ignored by ``"hard"``).

    Notes
    -----
    Shapes: ``emissions`` (T, B, S), or (B, T, S) with ``batch_first``;
    ``tags``, ``mask`` (T, B), or (B, T). ``mask`` must be on at the first
    step and left-aligned (ones then zeros), as pytorch-crf assumes;
    ``lengths`` (B,) may be given instead.

    Examples
    --------
    >>> import torch
    >>> from smoothmax.torch import CRF
    >>> crf = CRF(3, batch_first=True).double()
    >>> emissions = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    >>> tags = torch.tensor([[0, 1, 2, 1, 0], [2, 2, 1, 0, 0]])
    >>> mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    >>> llh = crf(emissions, tags, mask)  # the summed log-likelihood, as pytorch-crf
    >>> llh.backward()  # gradients to the emissions and the three parameters
    >>> bool(llh < 0), crf.transitions.grad.shape
    (True, torch.Size([3, 3]))
    >>> [len(y) for y in crf.decode(emissions, mask)]
    [5, 3]
    >>> crf.marginals(emissions, mask).sum(-1)  # p(y_t = i) sums to 1, 0 past the length
    tensor([[1., 1., 1., 1., 1.],
            [1., 1., 1., 0., 0.]], dtype=torch.float64, grad_fn=<SumBackward1>)
    """

    num_tags: int
    batch_first: bool
    reg: Reg
    gamma: float

    def __init__(self, num_tags: int, batch_first: bool = False, *, reg: Reg = "negentropy",
                 gamma: float = 1.0) -> None:
        if num_tags <= 0:
            raise ValueError(f"invalid number of tags: {num_tags}")
        super().__init__()
        from ._validation import check_gamma, check_reg

        self.num_tags = num_tags
        self.batch_first = batch_first
        self.reg = check_reg(reg)
        self.gamma = check_gamma(gamma)
        self.start_transitions = nn.Parameter(torch.empty(num_tags))
        self.end_transitions = nn.Parameter(torch.empty(num_tags))
        self.transitions = nn.Parameter(torch.empty(num_tags, num_tags))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw the parameters uniformly from ``[-0.1, 0.1]`` (as pytorch-crf)."""
        nn.init.uniform_(self.start_transitions, -0.1, 0.1)
        nn.init.uniform_(self.end_transitions, -0.1, 0.1)
        nn.init.uniform_(self.transitions, -0.1, 0.1)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(num_tags={self.num_tags})"

    # -- inputs ---------------------------------------------------------------

    def _validate(self, emissions, tags=None, mask=None):
        """pytorch-crf's checks and messages, plus the left alignment of ``mask``."""
        if emissions.dim() != 3:
            raise ValueError(f"emissions must have dimension of 3, got {emissions.dim()}")
        if emissions.size(2) != self.num_tags:
            raise ValueError(
                f"expected last dimension of emissions is {self.num_tags}, got {emissions.size(2)}")
        if tags is not None and emissions.shape[:2] != tags.shape:
            raise ValueError(
                "the first two dimensions of emissions and tags must match, "
                f"got {tuple(emissions.shape[:2])} and {tuple(tags.shape)}")
        if mask is not None:
            if emissions.shape[:2] != mask.shape:
                raise ValueError(
                    "the first two dimensions of emissions and mask must match, "
                    f"got {tuple(emissions.shape[:2])} and {tuple(mask.shape)}")
            first = mask[:, 0] if self.batch_first else mask[0]
            if not first.all():
                raise ValueError("mask of the first timestep must all be on")

    def _batch_first(self, x):
        return x if (x is None or self.batch_first) else x.transpose(0, 1)

    def _lengths(self, emissions, mask, lengths):
        """Lengths (B,) from ``mask`` (B, T) (left-aligned) or ``lengths``; None if full."""
        if lengths is not None:
            if mask is not None:
                raise ValueError("give mask or lengths, not both")
            return lengths
        if mask is None:
            return None
        m = mask.bool()
        L = m.sum(1)
        left = torch.arange(m.shape[1], device=m.device)[None, :] < L[:, None]
        if not torch.equal(m, left):
            raise ValueError("mask must be left-aligned (ones, then zeros, along the sequence), "
                             "as pytorch-crf assumes; got a mask with a gap")
        return L.cpu()

    # -- pytorch-crf's surface ------------------------------------------------

    def forward(self, emissions: Tensor, tags: Tensor, mask: Optional[Tensor] = None, reduction: str = "sum",
                *, lengths: Optional[Tensor] = None) -> Tensor:
        """Log-likelihood of ``tags`` (for ``"negentropy"``, γ = 1; see the class notes).

        Parameters
        ----------
        emissions : Tensor, shape (T, B, S) or (B, T, S) with ``batch_first``
        tags : LongTensor, shape (T, B) or (B, T)
        mask : None or Tensor (bool/uint8), shape of ``tags``; first step on, left-aligned
        reduction : {"none", "sum", "mean", "token_mean"}
        lengths : None or int Tensor (B,), instead of ``mask``

        Returns
        -------
        Tensor, shape (B,) for ``"none"``, () otherwise.
        """
        self._validate(emissions, tags=tags, mask=mask)
        if reduction not in ("none", "sum", "mean", "token_mean"):
            raise ValueError(f"invalid reduction: {reduction}")
        em, tags, mask = (self._batch_first(x) for x in (emissions, tags, mask))
        L = self._lengths(em, mask, lengths)
        value = log_partition(em, self.transitions, self.start_transitions, self.end_transitions,
                              L, self.reg, self.gamma)
        steps = torch.arange(em.shape[1], device=em.device)[None, :]
        Lt = torch.full((em.shape[0],), em.shape[1], dtype=torch.int64, device=em.device) \
            if L is None else torch.as_tensor(L, dtype=torch.int64).to(em.device)
        on = steps < Lt[:, None]
        llh = self._score(em, tags, on, Lt) - value
        if reduction == "none":
            return llh
        if reduction == "sum":
            return llh.sum()
        if reduction == "mean":
            return llh.mean()
        return llh.sum() / on.to(llh.dtype).sum()

    def _score(self, em, tags, on, Lt):
        """``score(tags)`` (B,): start + emissions + transitions + end up to each length."""
        tags = torch.where(on, tags, torch.zeros_like(tags))
        onf = on.to(em.dtype)
        s = (em.gather(2, tags[:, :, None])[:, :, 0] * onf).sum(1)
        s = s + self.start_transitions[tags[:, 0]]
        s = s + (self.transitions[tags[:, :-1], tags[:, 1:]] * onf[:, 1:]).sum(1)
        last = tags.gather(1, (Lt - 1)[:, None])[:, 0]
        return s + self.end_transitions[last]

    def decode(self, emissions: Tensor, mask: Optional[Tensor] = None, *,
               lengths: Optional[Tensor] = None) -> "list[list[int]]":
        """The best tag sequences (hard Viterbi), as pytorch-crf: a list of lists of ints.

        Parameters
        ----------
        emissions : Tensor, shape (T, B, S) or (B, T, S) with ``batch_first``
        mask : None or Tensor, shape (T, B) or (B, T)
        lengths : None or int Tensor (B,), instead of ``mask``

        Returns
        -------
        list of B lists, each of its sequence's length.
        """
        self._validate(emissions, mask=mask)
        em, mask = self._batch_first(emissions), self._batch_first(mask)
        L = self._lengths(em, mask, lengths)
        with torch.no_grad():
            _, tags = _crf.crf_decode(em.detach(), self.transitions.detach().to(em.dtype),
                                      self.start_transitions.detach().to(em.dtype),
                                      self.end_transitions.detach().to(em.dtype), lengths=L)
        return [[int(t) for t in row if t >= 0] for row in tags.cpu().tolist()]

    # -- beyond pytorch-crf ---------------------------------------------------

    def full_potentials(self, emissions: Tensor, mask: Optional[Tensor] = None, *,
                        lengths: Optional[Tensor] = None) -> "tuple[Tensor, Any]":
        """The Vit_Ω potentials ``theta (B, T, S, S)`` of this CRF and the lengths (B,).

        ``theta[b, t, i, j] = emissions[b, t, i] + transitions[j, i]``, the
        start scores at ``t = 0`` through a fixed start state (``-inf`` for
        ``j > 0``) and the end scores added at each item's last step, so that
        :func:`smoothmax.viterbi` of it is this CRF's value (up to ``−γ/2``
        for ``"l2"``). Materialises S times the emissions; for the
        pairwise marginals and sampling.
        """
        self._validate(emissions, mask=mask)
        em, mask = self._batch_first(emissions), self._batch_first(mask)
        L = self._lengths(em, mask, lengths)
        return _crf.full_potentials(em, self.transitions, self.start_transitions,
                                    self.end_transitions, L)

    def marginals(self, emissions: Tensor, mask: Optional[Tensor] = None, *, lengths: Optional[Tensor] = None,
                  pairwise: bool = False) -> Any:
        """Unary marginals ``p(y_t = i)`` (B, T, S) (batch-first), or also the pairwise ones.

        For ``"l2"`` these are the sparse marginals (many exact zeros), for
        ``"hard"`` the one-hot best path. Differentiable (their backward is the
        HVP pass); zero past the lengths.

        Returns
        -------
        unary : Tensor (B, T, S)
        pairwise : Tensor (B, T, S, S), only with ``pairwise=True``:
            ``[b, t, i, j] = p(y_t = i, y_{t−1} = j)`` for ``t ≥ 1`` (zero at ``t = 0``).
        """
        self._validate(emissions, mask=mask)
        em, mask = self._batch_first(emissions), self._batch_first(mask)
        L = self._lengths(em, mask, lengths)
        em_, A, s, e, problem = _crf.prepare(em, self.transitions, self.start_transitions,
                                             self.end_transitions, L, self.reg, self.gamma)
        ones = torch.ones(em_.shape[0], dtype=em_.dtype, device=em_.device)
        if torch.is_grad_enabled() and any(x.requires_grad for x in (em_, A, s, e)):
            unary = CRFGrad.apply(em_, A, s, e, ones, problem)[0]
        else:
            unary = _crf.run(problem, "grad", em_.detach(), A.detach(), s.detach(), e.detach())[1]
        if not pairwise:
            return unary
        from .viterbi import viterbi_grad

        theta, Lf = self.full_potentials(emissions, mask, lengths=lengths)
        E = viterbi_grad(theta, reg=self.reg, gamma=self.gamma, lengths=Lf)[1]
        E = torch.cat([torch.zeros_like(E[:, :1]), E[:, 1:]], dim=1)
        return unary, E

    def sample(self, emissions: Tensor, mask: Optional[Tensor] = None, n: int = 1, *,
               lengths: Optional[Tensor] = None, seed: Seed = None) -> Tensor:
        """``n`` tag sequences drawn exactly from the CRF's distribution (``"negentropy"``:
        the Gibbs distribution; ``"l2"``: the sparse one).

        Returns
        -------
        LongTensor, shape (n, B, T), batch-first, ``-1`` past a length.
        """
        from .sampling import viterbi_sample

        theta, Lf = self.full_potentials(emissions, mask, lengths=lengths)
        return viterbi_sample(theta.detach(), n, reg=self.reg, gamma=self.gamma, lengths=Lf, seed=seed)
