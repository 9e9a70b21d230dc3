"""Namespace, device and dtype helpers over array-api-compat.

The public entry points resolve the namespace ``xp`` once and pass it down.
Nothing here imports a deep-learning framework: tensors are recognised by
array-api-compat's ``is_*_array`` helpers, which only look at the type.
"""
import numpy as np
import array_api_compat as aac


# NumPy >= 2.1 is an array-API namespace itself (array_api_compat.numpy wraps
# older NumPy). Using it directly spares every process's first call the
# import of array_api_compat.numpy (about 100 ms here: it walks NumPy's lazily
# loaded submodules, numpy.f2py and numpy.testing among them).
_NUMPY_IS_XP = np.lib.NumpyVersion(np.__version__) >= "2.1.0"


def array_namespace(x):
    """The array-API namespace of ``x`` (``numpy`` itself for NumPy >= 2.1 arrays)."""
    if _NUMPY_IS_XP and aac.is_numpy_array(x):
        return np
    return aac.array_namespace(x)


# (array type, namespace, backend) registered by framework adapters: checked
# first, by isinstance, which tracers such as torch.compile's follow without
# reading data or caches.
_REGISTERED: list = []


def register_array_type(cls, xp, backend):
    """Recognise arrays of type ``cls`` (and subclasses) as ``(xp, backend)``."""
    _REGISTERED.append((cls, xp, backend))


def namespace_of(x):
    """Return ``(xp, backend)``: the array namespace and a short backend name.

    ``backend`` is one of ``"numpy"``, ``"torch"``, ``"jax"``, ``"cupy"`` or
    ``"generic"`` (any other array-API library, e.g. array_api_strict).
    """
    if type(x) is np.ndarray and _NUMPY_IS_XP:  # the common case first: a call's fixed cost
        return np, "numpy"
    for cls, xp, backend in _REGISTERED:
        if isinstance(x, cls):
            return xp, backend
    if aac.is_numpy_array(x):
        return (np if _NUMPY_IS_XP else aac.array_namespace(x)), "numpy"
    if aac.is_torch_array(x):
        return aac.array_namespace(x), "torch"
    if aac.is_jax_array(x):
        return aac.array_namespace(x), "jax"
    if aac.is_cupy_array(x):
        return aac.array_namespace(x), "cupy"
    return aac.array_namespace(x), "generic"


def device_of(x):
    """The array-API device of ``x`` (registered array types first, see :func:`namespace_of`)."""
    for cls, _, _ in _REGISTERED:
        if isinstance(x, cls):
            return x.device
    return aac.device(x)


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


_NUMPY_FLOAT_NAMES = {np.dtype(np.float32): "float32", np.dtype(np.float64): "float64"}


def dtype_name(xp, dtype):
    if isinstance(dtype, np.dtype):
        name = _NUMPY_FLOAT_NAMES.get(dtype)  # a dict lookup: comparing with xp.float32 converts it
        if name is not None:
            return name
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
