"""Structured and sparse attention through Vit_Ω (paper §5; Kim et al., 2017).

Each position ``t`` of a sequence is either attended (state 1) or not
(state 0). With per-position scores ``s_t`` (e.g. a bilinear form
``x_t M z`` of the encoder state ``x_t`` and the decoder state ``z``) and a
learned transition matrix ``A`` (``A[i, j]`` scores state ``i`` after state
``j``), the Viterbi potentials are::

    theta[t, 1, j] = s_t + A[1, j],    theta[t, 0, j] = A[0, j],

the state before ``t = 0`` being 0 (``theta[0, :, 1] = -inf``), and the
attention weights are the normalised marginals of state 1,
``w_t ∝ p_{θ,Ω}(y_t = 1) = Σ_j E[t, 1, j]`` with ``E = ∇Vit_Ω(θ)``. With
``reg="negentropy"`` this is the segmentation attention of Kim et al.; with
``reg="l2"`` the weights are sparse. Gradients flow through the
Hessian-vector product of Vit_Ω (docs/spec.md §2).

``structured_attention`` works with any array library (under JAX it is the
JAX function, usable under ``jax.grad``/``jax.jit`` as far as
``smoothmax.jax`` supports Vit_Ω). ``StructuredAttention``, a
``torch.nn.Module`` holding ``A`` as a parameter, is created on first access
so that importing this module never imports torch.
"""
import importlib.util
from typing import Any

import numpy as np

from ._array_api import device_of
from ._problem import checks_for
from ._typing import Array, Lengths, Reg
from ._validation import as_array, check_float, check_rank, is_traced
from .viterbi import viterbi_grad

__all__ = ["structured_attention", "StructuredAttention"]


def structured_attention(scores: Array, transition: Array, *, reg: Reg = "negentropy",
                         gamma: float = 1.0, lengths: Lengths = None) -> Array:
    """Attention weights from the marginals of a two-state chain (paper §5).

    Parameters
    ----------
    scores : array, shape (..., T)
        Per-position scores ``s_t`` (float32 or float64, any array library).
    transition : array, shape (2, 2) or (..., 2, 2)
        ``transition[i, j]`` scores state ``i`` after state ``j``;
        broadcast against the batch shape of ``scores``; same library.
    reg, gamma : as for :func:`smoothmax.viterbi`.
    lengths : None or int array of shape (...)
        Positions past a length get weight 0.

    Returns
    -------
    w : array, shape (..., T)
        Non-negative, summing to 1 over the positions; all 0 in the rare case
        where no position has a positive marginal (possible with ``"l2"``).

    Examples
    --------
    >>> import numpy as np
    >>> import smoothmax as sm
    >>> scores = np.array([0.0, 3.0, 2.5, -1.0, 0.0])
    >>> transition = np.array([[0.0, 0.0], [-2.0, 0.0]])  # entering the attended state costs 2
    >>> w = sm.attention.structured_attention(scores, transition, reg="l2")
    >>> w  # sparse: exact zeros after the high scores
    array([0.2, 0.4, 0.4, 0. , 0. ])
    >>> float(sm.attention.structured_attention(scores, transition).sum())
    1.0
    """
    scores, xp, backend = as_array(scores, "scores")
    check_float(scores, xp, "scores")
    check_rank(scores, 1, "scores", "(..., T)")
    transition, txp, tbackend = as_array(transition, "transition")
    if tbackend != backend:
        raise TypeError(f"transition must be an array of the same library as scores ({backend}), got {tbackend}")
    check_float(transition, txp, "transition")
    if transition.ndim < 2 or tuple(transition.shape[-2:]) != (2, 2):
        raise ValueError(f"transition must have shape (..., 2, 2), got {tuple(transition.shape)}")
    values = checks_for(backend)[0]  # (torch: checked inside its operators)
    values(scores, xp, "scores", "+inf")
    values(transition, txp, "transition", "+inf")
    if transition.dtype != scores.dtype:
        transition = xp.astype(transition, scores.dtype)
    T = int(scores.shape[-1])
    if T < 1:
        raise ValueError(f"scores must have T >= 1 positions, got shape {tuple(scores.shape)}")
    try:
        batch = np.broadcast_shapes(tuple(scores.shape[:-1]), tuple(transition.shape[:-2]))
    except ValueError:
        raise ValueError(f"transition's batch shape {tuple(transition.shape[:-2])} must broadcast to "
                         f"scores' {tuple(scores.shape[:-1])}") from None
    if batch != tuple(scores.shape[:-1]):
        scores = xp.broadcast_to(scores, batch + (T,))
    A = transition[..., None, :, :]                     # (..., 1, 2, 2)
    row0 = xp.broadcast_to(A[..., 0, :], batch + (T, 2))
    row1 = scores[..., :, None] + A[..., 1, :]          # (..., T, 2)
    theta = xp.stack([row0, xp.broadcast_to(row1, batch + (T, 2))], axis=-2)  # (..., T, 2, 2)
    first = np.zeros((T, 2, 2))
    first[0, :, 1] = -np.inf
    if backend == "numpy":
        first = first.astype(theta.dtype)
    else:
        try:
            first = xp.asarray(first, dtype=theta.dtype, device=device_of(theta))
        except TypeError:
            first = xp.asarray(first, dtype=theta.dtype)
    theta = theta + first
    _, E = viterbi_grad(theta, reg=reg, gamma=gamma, lengths=lengths)
    p1 = xp.sum(E[..., 1, :], axis=-1)                   # (..., T)
    total = xp.sum(p1, axis=-1, keepdims=True)
    safe = xp.where(total > 0, total, xp.ones_like(total))
    return p1 / safe


def _make_module():
    import torch

    class StructuredAttention(torch.nn.Module):
        """Structured (``"negentropy"``) or sparse structured (``"l2"``) attention (paper §5).

        Holds the 2 × 2 transition matrix as a parameter (initialised to 0).
        ``forward(scores, values=None, lengths=None)`` returns the weights
        ``w (..., T)``, or ``(context, w)`` with ``context = Σ_t w_t values[..., t, :]``
        when ``values (..., T, D)`` is given.
        """

        def __init__(self, reg: Reg = "negentropy", gamma: float = 1.0, *,
                     device: Any = None, dtype: Any = None) -> None:
            super().__init__()
            self.reg = reg
            self.gamma = gamma
            self.transition = torch.nn.Parameter(torch.zeros(2, 2, device=device, dtype=dtype))

        def forward(self, scores: Any, values: Any = None, lengths: Lengths = None) -> Any:
            w = structured_attention(scores, self.transition.to(scores.dtype), reg=self.reg,
                                     gamma=self.gamma, lengths=lengths)
            if values is None:
                return w
            return torch.einsum("...t,...td->...d", w, values), w

        def extra_repr(self) -> str:
            return f"reg={self.reg!r}, gamma={self.gamma}"

    StructuredAttention.__doc__ = (StructuredAttention.__doc__ or "") + _LAYER_EXAMPLES
    return StructuredAttention


# the layer's Examples: in its docstring, and run by ``pytest --doctest-modules``
# (through ``__test__``: the class only exists once torch is imported) when torch is installed
_LAYER_EXAMPLES = """
        Examples
        --------
        >>> import torch
        >>> from smoothmax.attention import StructuredAttention
        >>> att = StructuredAttention(reg="l2", dtype=torch.float64)
        >>> scores = torch.tensor([[0.0, 3.0, 2.5, -1.0]], dtype=torch.float64)
        >>> context, w = att(scores, values=torch.eye(4, dtype=torch.float64)[None])
        >>> w.shape, w.sum().item()
        (torch.Size([1, 4]), 1.0)
        >>> bool(torch.allclose(context, w))  # the identity values give back the weights
        True
        """
if importlib.util.find_spec("torch") is not None:
    __test__ = {"StructuredAttention": _LAYER_EXAMPLES}


def __getattr__(name: str) -> Any:
    if name == "StructuredAttention":
        cls = _make_module()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
