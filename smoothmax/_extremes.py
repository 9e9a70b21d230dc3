"""Results beyond the range of the dtype: recompute on a rescaled problem.

Every operator is positively homogeneous in ``(x, γ)``: for ``c > 0``,
``max_{γω}(x) = c·max_{(γ/c)ω}(x/c)`` (negentropy and l2; ``"hard"`` has no
γ). Through the recursion of SPEC §2 this gives, for DTW, Viterbi and the DAG,

    DP_γ(θ) = c·DP_{γ/c}(θ/c),   E_γ(θ) = E_{γ/c}(θ/c),
    ∇²DP_γ(θ)·Z = ∇²DP_{γ/c}(θ/c)·Z / c.

A DP value is a sum of up to ``steps`` scores and smoothing terms
``γ·log D``: with finite scores near the largest float (or γ near it) an
intermediate value overflows, and ``inf − inf`` then turns into NaN (or a
zero HVP) downstream. Every engine pass returns the DP value first, and that
value is finite whenever nothing overflowed and some path is allowed. So
:func:`rescue_overflow`, called by ``_dispatch.run`` on the engine's outputs,
(and by the XLA FFI handlers of ``smoothmax._core.xla_ffi``, which call the
compiled core without ``run``) looks at the ``(B,)`` values only; when one is ±inf or NaN it bounds the
path sums and, if they can overflow, reruns the engine on ``θ/c`` with
``γ/c`` for a power of two ``c`` (exact scaling) and scales the outputs back.
The value may then still be ±inf (the true value is beyond the dtype's range:
IEEE overflow), but ``E``, the HVP and the decoded path are right. A
non-finite value that cannot come from overflow (every path forbidden by
masks) is returned as it is. Because it works on the engine's concrete
arrays, it covers every caller: NumPy and CuPy, the torch Functions (first
and second order), JAX's FFI custom calls and host callbacks (so under
``jax.jit`` too).
"""
import math

import numpy as np

from ._array_api import dtype_name, namespace_of
from .operators import REG_CODES

# Smallest gamma accepted by the smoothed operators, per dtype of the input: below it
# 1/gamma overflows (the compiled kernels compute in float64 with ig = 1/gamma; the
# array-API operators of ``smooth_max`` compute in the input's dtype) and
# ``0 * inf`` would turn into NaN. "hard" ignores gamma and has no floor.
# (Here, beside the rescaling that must respect it; ``_validation`` checks it.)
GAMMA_MIN = {"float32": 1e-35, "float64": 1e-300}


def _max_abs_finite(t, xp):
    """The largest finite ``|θ|``, or an upper bound of it that is tight enough here.

    First one pass without temporaries, ``sqrt(Σ θ²)`` (a BLAS dot for NumPy):
    finite only if every entry is, and then a bound of the largest ``|θ|``
    far below any overflow (at most ``sqrt`` of the largest float). Only when
    it is not finite (masks, or entries near the float's limit) the exact
    masked maximum is taken.
    """
    if not math.prod(t.shape):
        return 0.0
    flat = xp.reshape(t, (-1,))
    with np.errstate(over="ignore", invalid="ignore"):
        ss = float(np.vdot(flat, flat)) if isinstance(flat, np.ndarray) else float(xp.vecdot(flat, flat))
    if math.isfinite(ss):
        return math.sqrt(ss)
    return float(xp.max(xp.where(xp.isfinite(t), xp.abs(t), xp.zeros_like(t))))


def _steps_and_width(struct, theta, aux):
    """The most operator applications along a path and the widest operator input."""
    if struct == "dtw":
        return int(theta.shape[-2]) + int(theta.shape[-1]), 3
    if struct == "viterbi":
        return int(theta.shape[-3]) + 1, int(theta.shape[-1])
    indptr = np.asarray(aux[0])  # the DAG's indptr
    return int(indptr.shape[0]), int(np.diff(indptr).max(initial=1))


def overflow_scale(struct, theta, gamma, aux=()):
    """The exponent ``k`` of ``c = 2**k`` that keeps every path sum of ``θ/c`` (with
    ``γ/c``; ``gamma`` None for "hard") in range, or ``None`` when the path sums of
    ``θ`` (an engine array of ``struct``, with the DAG's ``aux = (indptr, ...)``)
    cannot overflow."""
    xp = namespace_of(theta)[0]
    steps, width = _steps_and_width(struct, theta, aux)
    return _exponent(_max_abs_finite(theta, xp), steps, width, gamma, dtype_name(xp, theta.dtype))


def _exponent(m, steps, width, gamma, dtype):
    """``k`` for path sums of ``steps`` terms of magnitude ``m`` (and ``γ·log width``)."""
    log2_terms = [math.log2(m)] if m > 0 else []
    if gamma is not None:
        log2_terms.append(math.log2(gamma) + math.log2(math.log(max(width, 2)) + 0.5))
    if not log2_terms:
        return None
    log2_bound = max(log2_terms) + 1 + math.log2(steps + 1)
    log2_max = math.log2(float(np.finfo(dtype).max))
    if log2_bound < log2_max - 2:
        return None
    k = math.ceil(log2_bound - log2_max + 8)
    if gamma is not None and math.ldexp(gamma, -k) < GAMMA_MIN[dtype]:
        raise ValueError(
            f"theta's magnitude (max |theta| = {m:g} over {steps} steps) is too large for "
            f"gamma = {gamma:g}: theta / gamma must stay below about "
            f"{float(np.finfo(dtype).max) / GAMMA_MIN[dtype]:g} for {dtype} input")
    return k


def rescue_crf_overflow(op, fn, arrays, lengths, extra, out):
    """:func:`rescue_overflow` for the factorised CRF passes (``smoothmax.crf``).

    ``arrays``: the engine arrays (emissions (B, T, S), transitions, start,
    end, then the HVP's four direction parts), ``extra``: the trailing engine
    arguments (reg code and gamma last except for ``decode``). The four score
    arrays scale together; ``out[0]`` is the value (the score for decode,
    ``<∇value, Z>`` for the HVP, which the scaling leaves unchanged) and the
    HVP's other outputs scale as ``1/c``.
    """
    if _finite(out[0]):
        return out
    smoothed = op != "decode" and extra[-2] != REG_CODES["hard"]
    gamma = extra[-1] if smoothed else None
    xp = namespace_of(arrays[0])[0]
    T, S = int(arrays[0].shape[-2]), int(arrays[0].shape[-1])
    m = max(_max_abs_finite(a, xp) for a in arrays[:4])
    k = _exponent(m, T + 2, S, gamma, dtype_name(xp, arrays[0].dtype))
    if k is None:
        return out
    extra = list(extra)
    if smoothed:
        extra[-1] = math.ldexp(extra[-1], -k)
    new = fn(*[_times_pow2(a, -k) for a in arrays[:4]], *arrays[4:], lengths, *extra)
    new = list(new) if isinstance(new, tuple) else [new]
    if op == "hvp":
        new[1:] = [_times_pow2(h, -k) for h in new[1:]]
    else:
        new[0] = _times_pow2(new[0], k)
    return tuple(new)


def _finite(value):
    if isinstance(value, np.ndarray):  # the compiled engine: skip the namespace lookup
        if value.size <= 64:
            # a short list is quicker than a ufunc and a reduction, above all right after a
            # kernel has evicted the interpreter's data (2 x 200^2 gradients in a loop: 8 µs
            # against 27)
            return all(map(math.isfinite, value.ravel().tolist()))
        return bool(np.isfinite(value).all())
    xp = namespace_of(value)[0]
    return bool(xp.all(xp.isfinite(value)))


def rescue_overflow(struct, op, fn, args, out, aux=(), into=None):
    """The outputs ``out`` of the engine pass ``fn(*args)`` (value first), or those of
    the same pass on the rescaled problem where the value overflowed (see the module).

    ``args`` are the engine's arguments: theta first; for every op but the hard
    ``decode``/``path``, the reg code and gamma last. For ``hvp`` the last
    output is the HVP. ``aux``: the structure's integer arrays (the DAG's
    indptr first). ``into``: the ``out=`` tuple a compiled pass wrote ``out``
    into (the XLA handler's buffers), rewritten in place.
    """
    if _finite(out[0]):
        return out
    smoothed = op not in ("decode", "path") and args[-2] != REG_CODES["hard"]
    gamma = args[-1] if smoothed else None
    k = overflow_scale(struct, args[0], gamma, aux)
    if k is None:
        return out
    args = [_times_pow2(args[0], -k)] + list(args[1:])
    if smoothed:
        args[-1] = math.ldexp(args[-1], -k)
    if into is None:
        new = fn(*args)
        new = list(new) if isinstance(new, tuple) else [new]
    else:
        fn(*args, out=into)
        new = list(into)
    new[0] = _times_pow2(new[0], k)
    if op == "hvp":
        new[-1] = _times_pow2(new[-1], -k)
    if into is not None:
        into[0][...] = new[0]
        if op == "hvp":
            into[-1][...] = new[-1]
        return into
    return tuple(new)


def _times_pow2(x, k):
    """``x * 2**k`` in x's library and dtype, by factors that float32 represents
    (so ±inf stays ±inf, never ``inf * 0``); overflow to ±inf and underflow to
    0 are the IEEE answers here, not warnings."""
    with np.errstate(over="ignore", under="ignore"):
        while k:
            step = max(-100, min(100, k))
            x = x * (2.0 ** step)
            k -= step
        if isinstance(x, np.generic):
            x = np.asarray(x)
    return x
