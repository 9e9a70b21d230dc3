"""Value checks of an input array: NaN and forbidden infinities.

Below the entry points' argument checks (``_validation`` re-exports them),
so that an engine's own entry can run them too: the XLA CUDA handler
(``_core/xla_ffi.pyx``) checks the arrays XLA hands it before the GPU
kernels, which do not check their input.
"""
import math

import numpy as np


def is_traced(x):
    """True for JAX tracers, whose values cannot be inspected."""
    return type(x).__module__.startswith("jax") and "Tracer" in type(x).__name__


def raise_found(theta, forbid, Z=None):
    """Raise the :func:`check_values` error for NumPy input a compiled engine
    found bad while computing: ``theta`` (``forbid`` its forbidden infinity)
    first, as the entry points check it, then the HVP's direction ``Z``."""
    check_values(theta, np, "theta", forbid)
    if Z is not None:
        check_values(Z, np, "Z", "inf")
    raise AssertionError("the engine's value checks and check_values disagree")


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
        # one pass instead of min and max: the sum is finite only if every
        # entry is (inf - inf is NaN; an overflow just falls through to the
        # exact test). Not np.vdot: a BLAS dot wakes OpenBLAS's threads, which
        # then spin on the cores the engine's own threads are about to use
        # (two-thread HVPs ran no faster than one: docs/threads.md)
        with np.errstate(over="ignore", invalid="ignore"):
            total = float(np.sum(x))
        if math.isfinite(total):
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
