"""Argument checks. Every error names the argument, the expected and the received value."""
import math
import numbers
import operator

import numpy as np

from ._array_api import dtype_name, is_float_dtype, namespace_of, to_host
from ._extremes import GAMMA_MIN
from ._values import check_values, is_traced  # noqa: F401  (re-exported: the entry points' checks)
from .operators import REGS


def check_reg(reg):
    if not isinstance(reg, str) or reg not in REGS:
        raise ValueError(f"reg must be one of {list(REGS)}, got {reg!r}")
    return reg


def check_gamma(gamma, dtype=None, reg=None):
    """A positive finite real: a Python/NumPy real scalar or a 0-d real array.

    With ``dtype`` (``"float32"``/``"float64"``, the input's) and a smoothed
    ``reg``, gamma must also be at least ``GAMMA_MIN[dtype]``.
    """
    value = None
    if type(gamma) is float:  # the common case first (isinstance on an ABC costs a call's microseconds)
        value = gamma
    elif isinstance(gamma, numbers.Real) and not isinstance(gamma, bool):
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
    if dtype in GAMMA_MIN and reg != "hard" and value < GAMMA_MIN[dtype]:
        raise ValueError(f"gamma must be in [{GAMMA_MIN[dtype]:g}, max float] for {dtype} input "
                         f"(1/gamma must be finite), got {gamma!r}")
    return value


def _as_index(v):
    """``v`` as a Python int if it is of an integer type (not a bool), else None."""
    if isinstance(v, bool):
        return None
    try:
        return operator.index(v)
    except TypeError:
        return None


def check_count(v, name, minimum):
    """A Python int >= ``minimum`` from any integer type."""
    n = _as_index(v)
    if n is None:
        raise TypeError(f"{name} must be an integer >= {minimum}, got {v!r}")
    if n < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {n}")
    return n


def check_axis(axis, ndim, name="axis"):
    """An integer (Python or NumPy) in ``[-ndim, ndim)``, returned as a Python int."""
    a = _as_index(axis)
    if a is None or not -ndim <= a < ndim:
        raise ValueError(f"{name} must be an int in [{-ndim}, {ndim - 1}], got {axis!r}")
    return a


def check_dense(x, name):
    """Reject sparse (and other non-strided) torch tensors, which no engine reads.

    Only a ``torch.layout`` is looked at: other libraries use the attribute
    name for other things (JAX >= 0.11 arrays and tracers carry a memory
    ``layout``, e.g. ``AutoLayout``, on every array).
    """
    layout = getattr(x, "layout", None)
    if type(layout).__module__ == "torch" and str(layout) != "torch.strided":
        raise TypeError(f"{name} must be a dense (strided) tensor, got a tensor with layout {layout} "
                        f"(convert it with .to_dense())")


def as_array(x, name):
    """Return ``(x, xp, backend)``; array-likes (lists, scalars) become NumPy arrays."""
    if type(x) is np.ndarray and x.dtype.isnative:  # the common case first: a call's fixed cost
        return x, *namespace_of(x)
    check_dense(x, name)
    if isinstance(x, np.ndarray):
        if isinstance(x, np.ma.MaskedArray):
            raise TypeError(f"{name} must be a plain array, got a numpy masked array (fill the masked "
                            f"entries with the mask value, e.g. {name}.filled(np.inf) for DTW costs)")
        x = np.asarray(x)  # np.matrix, memmap and other subclasses: the plain array
        if x.dtype.kind == "f" and not x.dtype.isnative:
            x = x.astype(x.dtype.newbyteorder("="))  # big-endian data: native byte order
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


def check_direction(Z, theta, xp, backend, values=None):
    """Validate the HVP direction ``Z`` against ``theta``; cast to theta's dtype.

    ``values`` replaces :func:`check_values` (a framework adapter that checks
    inside its operators).
    """
    Z, zxp, zbackend = as_array(Z, "Z")
    if zbackend != backend:
        raise TypeError(f"Z must be an array of the same library as theta ({backend}), got {zbackend}")
    check_float(Z, zxp, "Z")
    zdtype = Z.dtype
    if tuple(Z.shape) != tuple(theta.shape):
        raise ValueError(f"Z must have the shape of theta {tuple(theta.shape)}, got {tuple(Z.shape)}")
    (check_values if values is None else values)(Z, xp, "Z", "inf")
    if Z.dtype != theta.dtype:
        Z = xp.astype(Z, theta.dtype)
        try:
            check_values(Z, xp, "Z", "inf")
        except ValueError:
            raise ValueError(f"Z must be finite in theta's dtype {dtype_name(xp, theta.dtype)}, got entries "
                             f"that overflow when cast from {dtype_name(zxp, zdtype)}") from None
    return Z


def same_dtype(Z, theta):
    """``Z`` has theta's dtype: its engine may check it (``checked_by_engine``).
    A Z of another dtype is checked here before its cast, so that a NaN is
    reported as one, not as an overflow of the cast (``check_direction``)."""
    return getattr(Z, "dtype", None) == theta.dtype


def checked_by_engine(x, xp, name, forbid):
    """In place of :func:`check_values` for an array whose engine checks its
    values itself (the compiled DTW and Viterbi HVP on NumPy input:
    ``Problem.engine_checks``)."""


def as_int_host(v, name):
    """``v`` (an int, a list, an array of any library) as a host int64 NumPy array."""
    if is_traced(v):
        raise TypeError(f"{name} must be concrete integers (a NumPy array, a list or an int), got a traced "
                        f"JAX value: under jax.jit close over {name} (a NumPy array) or pass it as a "
                        f"static argument (a tuple)")
    if getattr(v, "requires_grad", False):
        raise TypeError(f"{name} must be integers and carry no gradient, got a tensor that requires grad "
                        f"(pass {name}.detach() or an integer tensor)")
    check_dense(v, name)
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
    B = math.prod(int(s) for s in batch_shape)  # not np.prod: a call's fixed cost (tiny problems)
    if lengths is None:
        a = np.empty(B, dtype=np.int64)  # (np.full: twice the time, a call's fixed cost)
        a.fill(maximum)
        return a
    a = as_int_host(lengths, name)
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


BAND_MAX = 2**63 - 1  # the kernels' radius is an int64


def check_band(band, sizes=None):
    """The Sakoe-Chiba radius as an int, ``-1`` for no band.

    Any integer type (Python, NumPy signed or unsigned, a 0-d integer array)
    up to ``2**63 - 1`` is accepted; a larger one is a ``ValueError`` (the
    radius is an int64 in every engine, and ``sys.maxsize`` already means no
    band). With ``sizes = (NA, NB)``, a radius ``>= max(NA, NB)`` allows
    every cell, so it is returned as ``-1`` (no band): the kernels then never
    see a radius near the int64 limit.
    """
    if band is None:
        return -1
    if getattr(band, "ndim", None) == 0 and getattr(getattr(band, "dtype", None), "kind", "x") in "iu":
        band = int(band)
    if isinstance(band, bool) or not isinstance(band, numbers.Integral):
        raise TypeError(f"band must be None or a non-negative integer, got {band!r}")
    band = int(band)
    if band < 0:
        raise ValueError(f"band must be None or a non-negative integer, got {band}")
    if band > BAND_MAX:
        raise ValueError(f"band must be at most 2**63 - 1 (an int64; any band >= max(NA, NB) "
                         f"already means no band), got {band}")
    if sizes is not None and band >= max(sizes):
        return -1
    return band
