"""GPU engine (CuPy RawKernels) and the converters the dispatcher uses.

Importing this package never imports CuPy: :func:`available` tries it
lazily, and :mod:`smoothmax._cuda.engine` imports it only when a kernel is
launched. Engine functions (``docs/engines.md``) live in :mod:`.engine`.

Routing: CuPy arrays are used as they are; torch CUDA tensors are viewed as
CuPy arrays through DLPack (no copy) and the results are handed back to the
caller's namespace the same way. Kernels run on CuPy's current stream; the
torch wrapper makes torch's current stream CuPy's for the call.
"""
import functools

from . import engine  # noqa: F401  (imports no GPU library)

__all__ = ["available", "engine", "to_cupy", "from_cupy", "int_to_cupy"]


@functools.lru_cache(maxsize=1)
def available():
    """True when CuPy imports and sees at least one CUDA device."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def to_cupy(x):
    """A C-contiguous CuPy view of a CuPy array or a CUDA tensor (DLPack, no copy if contiguous)."""
    import cupy

    if not isinstance(x, cupy.ndarray):
        x = cupy.from_dlpack(x)
    return cupy.ascontiguousarray(x)


def int_to_cupy(a):
    """int64 lengths (NumPy or device) on the current CuPy device."""
    import cupy

    return cupy.ascontiguousarray(cupy.asarray(a), dtype=cupy.int64)


def from_cupy(y, xp, like):
    """``y`` in the caller's namespace ``xp`` and on ``like``'s device (DLPack, no copy)."""
    import cupy

    if isinstance(like, cupy.ndarray):
        return y
    return xp.from_dlpack(y)
