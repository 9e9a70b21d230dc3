"""Argument checks. Every error names the argument, the expected and the received value."""
import math
import numbers

import numpy as np

from ._array_api import dtype_name, is_float_dtype, namespace_of, to_host
from .operators import REGS


def check_reg(reg):
    if not isinstance(reg, str) or reg not in REGS:
        raise ValueError(f"reg must be one of {list(REGS)}, got {reg!r}")
    return reg


def check_gamma(gamma):
    """A positive finite real: a Python/NumPy real scalar or a 0-d real array."""
    value = None
    if isinstance(gamma, numbers.Real) and not isinstance(gamma, bool):
        value = float(gamma)
    elif getattr(gamma, "ndim", None) == 0 and getattr(getattr(gamma, "dtype", None), "kind", "f") in "fiu":
        try:
            value = float(gamma)
        except Exception:
            value = None
    if value is None:
        raise TypeError(f"gamma must be a positive finite real number, got {gamma!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"gamma must be a positive finite real number, got {gamma!r}")
    return value


def as_array(x, name):
    """Return ``(x, xp, backend)``; array-likes (lists, scalars) become NumPy arrays."""
    try:
        xp, backend = namespace_of(x)
    except TypeError:
        try:
            x = np.asarray(x)
        except Exception:
            raise TypeError(f"{name} must be an array, got {type(x).__name__}") from None
        if x.dtype == object:
            raise TypeError(f"{name} must be a numeric array, got an object array")
        if x.dtype.kind in "iub":
            x = x.astype(np.float64)
        xp, backend = namespace_of(x)
    return x, xp, backend


def check_float(x, xp, name):
    if not is_float_dtype(xp, x.dtype):
        raise TypeError(
            f"{name} must have a floating dtype (float32 or float64), got {dtype_name(xp, x.dtype)}"
        )


def check_rank(x, min_ndim, name, what):
    if x.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimensions {what}, got shape {tuple(x.shape)}")


def is_traced(x):
    """True for JAX tracers, whose values cannot be inspected."""
    return type(x).__module__.startswith("jax") and "Tracer" in type(x).__name__


def check_values(x, xp, name, forbid):
    """Reject NaN, and ``+inf`` or ``-inf`` as ``forbid`` says (``"+inf"``, ``"-inf"``, ``"inf"``).

    One reduction per forbidden sign, with no temporary array: ``max`` and
    ``min`` propagate NaN (array API standard), so the maximum is NaN when any
    entry is NaN and ``+inf`` when any entry is ``+inf`` (likewise the minimum).
    """
    if is_traced(x):
        return
    if hasattr(x, "detach"):
        x = x.detach()
    if math.prod(x.shape) == 0:
        return
    if forbid == "inf" and isinstance(x, np.ndarray):
        # one pass instead of min and max: the sum of squares is finite only
        # if every entry is (an overflow just falls through to the exact test)
        flat = x.ravel()
        if math.isfinite(float(np.vdot(flat, flat))):
            return
    extremes = []
    if forbid in ("+inf", "inf"):
        extremes.append(("+inf", float(xp.max(x))))
    if forbid in ("-inf", "inf"):
        extremes.append(("-inf", float(xp.min(x))))
    if any(math.isnan(v) for _, v in extremes):
        raise ValueError(f"{name} must not contain NaN")
    for sign, v in extremes:
        if math.isinf(v) and (v > 0) == (sign == "+inf"):
            hint = {"+inf": " (scores are maximised; use -inf to forbid an entry)",
                    "-inf": " (costs are minimised; use +inf to forbid a cell)"}
            raise ValueError(f"{name} must not contain {sign}" + (hint[sign] if forbid == sign else ""))


def check_direction(Z, theta, xp, backend, values=None):
    """Validate the HVP direction ``Z`` against ``theta``; cast to theta's dtype.

    ``values`` replaces :func:`check_values` (a framework adapter that checks
    inside its operators).
    """
    Z, zxp, zbackend = as_array(Z, "Z")
    if zbackend != backend:
        raise TypeError(f"Z must be an array of the same library as theta ({backend}), got {zbackend}")
    check_float(Z, zxp, "Z")
    if tuple(Z.shape) != tuple(theta.shape):
        raise ValueError(f"Z must have the shape of theta {tuple(theta.shape)}, got {tuple(Z.shape)}")
    (check_values if values is None else values)(Z, xp, "Z", "inf")
    if Z.dtype != theta.dtype:
        Z = xp.astype(Z, theta.dtype)
    return Z


def _as_int_host(v, name):
    a = to_host(v) if not isinstance(v, numbers.Integral) else np.asarray(v)
    a = np.asarray(a)
    if a.dtype.kind not in "iu":
        if a.dtype.kind == "f" and a.size and np.all(np.isfinite(a)) and np.all(a == np.round(a)):
            pass
        elif a.dtype.kind == "b" or a.dtype.kind not in "f":
            raise TypeError(f"{name} must contain integers, got dtype {a.dtype}")
        else:
            raise TypeError(f"{name} must contain integers, got dtype {a.dtype} with non-integer values")
    return a.astype(np.int64)


def check_lengths(lengths, batch_shape, maximum, name="lengths"):
    """Broadcast ``lengths`` to ``batch_shape`` as a flat int64 host array in ``1..maximum``."""
    B = int(np.prod(batch_shape, dtype=np.int64))
    if lengths is None:
        return np.full(B, maximum, dtype=np.int64)
    a = _as_int_host(lengths, name)
    try:
        a = np.broadcast_to(a, batch_shape)
    except ValueError:
        raise ValueError(
            f"{name} must have the batch shape {tuple(batch_shape)} (or broadcast to it), got shape {a.shape}"
        ) from None
    if a.size and (a.min() < 1 or a.max() > maximum):
        bad = a[(a < 1) | (a > maximum)].flat[0]
        raise ValueError(f"{name} must be integers in [1, {maximum}], got {int(bad)}")
    return np.ascontiguousarray(a.reshape(B))


def check_band(band):
    if band is None:
        return -1
    if isinstance(band, bool) or not isinstance(band, numbers.Integral):
        raise TypeError(f"band must be None or a non-negative integer, got {band!r}")
    if band < 0:
        raise ValueError(f"band must be None or a non-negative integer, got {band}")
    return int(band)
