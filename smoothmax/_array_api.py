"""Namespace, device and dtype helpers over array-api-compat.

The public entry points resolve the namespace ``xp`` once and pass it down.
Nothing here imports a deep-learning framework: tensors are recognised by
array-api-compat's ``is_*_array`` helpers, which only look at the type.
"""
import numpy as np
import array_api_compat as aac


def namespace_of(x):
    """Return ``(xp, backend)``: the array namespace and a short backend name.

    ``backend`` is one of ``"numpy"``, ``"torch"``, ``"jax"``, ``"cupy"`` or
    ``"generic"`` (any other array-API library, e.g. array_api_strict).
    """
    if aac.is_numpy_array(x):
        return aac.array_namespace(x), "numpy"
    if aac.is_torch_array(x):
        return aac.array_namespace(x), "torch"
    if aac.is_jax_array(x):
        return aac.array_namespace(x), "jax"
    if aac.is_cupy_array(x):
        return aac.array_namespace(x), "cupy"
    return aac.array_namespace(x), "generic"


def device_kind(x, backend):
    """``"cpu"`` or ``"cuda"`` for the device holding ``x``."""
    if backend == "numpy":
        return "cpu"
    if backend == "cupy":
        return "cuda"
    if backend == "torch":
        return "cuda" if x.device.type == "cuda" else "cpu"
    if backend == "jax":
        try:
            dev = next(iter(x.devices()))
            return "cuda" if dev.platform == "gpu" else "cpu"
        except Exception:  # tracers carry no device
            return "cpu"
    return "cpu"


def is_float_dtype(xp, dtype):
    return dtype == xp.float32 or dtype == xp.float64


def dtype_name(xp, dtype):
    if dtype == xp.float32:
        return "float32"
    if dtype == xp.float64:
        return "float64"
    return str(dtype)


def to_host(x):
    """A NumPy view (or copy, for device arrays) of ``x``; never modifies ``x``."""
    if isinstance(x, np.ndarray):
        return x
    if aac.is_torch_array(x):
        return x.detach().cpu().numpy()
    if aac.is_cupy_array(x):
        return x.get()
    return np.asarray(x)
