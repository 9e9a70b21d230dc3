"""The smoothed max operators max_Ω (docs/spec.md §1): a registry shared by every engine.

Each operator maps a vector ``x`` to ``(value, q)`` with ``q = ∇max_Ω(x)`` a
probability vector, and offers the Hessian-vector product ``H(x)·z``:

* ``"negentropy"``: ``γ·logsumexp(x/γ)``, ``q = softmax(x/γ)``,
  ``H·z = (q⊙z − q·<q, z>)/γ``.
* ``"l2"``: ``<q, x> − (γ/2)‖q‖²``, ``q = sparsemax(x/γ)``,
  ``H·z = (s⊙z − s·Σ_{k∈S} z_k/|S|)/γ`` with ``s`` the indicator of ``supp(q)``.
* ``"hard"``: ``max(x)``, ``q`` one-hot at the first argmax, ``H = 0``.

The functions here are written once against the array API (``xp``); the
compiled and GPU engines implement the same formulas as inline C functions.
``−inf`` entries get gradient exactly ``0`` (Lemma 1 of the paper).
"""

from ._array_api import device_of as _device

REGS = ("negentropy", "l2", "hard")
REG_CODES = {name: code for code, name in enumerate(REGS)}


def _const(xp, value, x):
    """A 0-d array of ``x``'s dtype on ``x``'s device (CUDA tensors, array-API devices)."""
    return xp.asarray(value, dtype=x.dtype, device=_device(x))


def _finite_or(xp, x, fill):
    return xp.where(xp.isinf(x) & (x < 0), _const(xp, fill, x), x)


def max_value_grad(xp, x, reg, gamma):
    """max_Ω and its gradient along the last axis of ``x``.

    Parameters
    ----------
    xp : array namespace
    x : array, shape (..., D)
    reg : {"negentropy", "l2", "hard"}
    gamma : float

    Returns
    -------
    value : array, shape (...)
    q : array, shape (..., D), rows on the simplex (zero rows where all of x is −inf)
    """
    neg_inf = xp.isinf(x) & (x < 0)
    m = xp.max(x, axis=-1, keepdims=True)
    all_masked = xp.all(neg_inf, axis=-1, keepdims=True)
    m_safe = xp.where(all_masked, xp.zeros_like(m), m)
    if reg == "hard":
        D = x.shape[-1]
        idx = xp.argmax(x, axis=-1, keepdims=True)
        q = xp.astype(xp.arange(D, device=_device(x)) == idx, x.dtype)
        q = xp.where(all_masked, xp.zeros_like(q), q)
        return xp.squeeze(m, axis=-1), q
    if reg == "negentropy":
        z = (x - m_safe) / gamma
        z = xp.where(neg_inf, _const(xp, -xp.inf, x), z)
        ez = xp.exp(z)
        s = xp.sum(ez, axis=-1, keepdims=True)
        s_safe = xp.where(all_masked, xp.ones_like(s), s)
        q = ez / s_safe
        value = m_safe + gamma * xp.log(s_safe)
        value = xp.where(all_masked, m, value)
        return xp.squeeze(value, axis=-1), q
    if reg == "l2":
        q = _sparsemax(xp, (x - m_safe) / gamma, neg_inf)
        q = xp.where(all_masked, xp.zeros_like(q), q)
        xf = _finite_or(xp, x, 0.0)
        value = xp.sum(q * xf, axis=-1) - 0.5 * gamma * xp.sum(q * q, axis=-1)
        value = xp.where(xp.squeeze(all_masked, axis=-1), xp.squeeze(m, axis=-1), value)
        return value, q
    raise ValueError(f"reg must be one of {REGS}, got {reg!r}")


def _sparsemax(xp, z, neg_inf):
    """Euclidean projection of each row of ``z`` on the simplex (−inf entries get 0)."""
    D = z.shape[-1]
    # −inf entries are replaced by a value low enough to stay outside the support.
    low = xp.min(xp.where(neg_inf, xp.zeros_like(z), z), axis=-1, keepdims=True) - 2.0
    zf = xp.where(neg_inf, low, z)
    zs = -xp.sort(-zf, axis=-1)
    k = xp.astype(xp.arange(1, D + 1, device=_device(z)), z.dtype)
    cs = xp.cumulative_sum(zs, axis=-1)
    support = (1.0 + k * zs) > cs  # a prefix of the sorted entries
    ksup = xp.sum(xp.astype(support, z.dtype), axis=-1, keepdims=True)
    tau = (xp.sum(xp.where(support, zs, xp.zeros_like(zs)), axis=-1, keepdims=True) - 1.0) / ksup
    q = xp.clip(zf - tau, 0.0, None)
    return xp.where(neg_inf, xp.zeros_like(q), q)


def hessian_product(xp, q, z, reg, gamma):
    """H(x)·z given the gradient ``q = ∇max_Ω(x)``, along the last axis."""
    if reg == "hard":
        return xp.zeros_like(z)
    if reg == "negentropy":
        zq = xp.where(q > 0, z, xp.zeros_like(z))
        return (q * zq - q * xp.sum(q * zq, axis=-1, keepdims=True)) / gamma
    if reg == "l2":
        s = xp.astype(q > 0, z.dtype)
        zs = xp.where(q > 0, z, xp.zeros_like(z))
        n = xp.sum(s, axis=-1, keepdims=True)
        n = xp.where(n == 0, xp.ones_like(n), n)
        return (zs - s * xp.sum(zs, axis=-1, keepdims=True) / n) / gamma
    raise ValueError(f"reg must be one of {REGS}, got {reg!r}")
