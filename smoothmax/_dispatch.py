"""Pick the engine for a (backend, device) pair, once, and run flat problems on it.

Engines (``docs/engines.md``) take flat, C-contiguous arrays of their own
array library. This module converts the caller's arrays to the engine's,
without copies where the memory allows it (torch CPU tensors are viewed as
NumPy arrays; torch CUDA tensors as CuPy arrays through DLPack), calls the
engine and converts the results back to the caller's namespace and device.

The capability registry ``CAPABILITIES`` is the single source for the
engine choice of :func:`engine_for`, the capability table of the docs and the
backend fixtures of the tests. Nothing here imports a framework adapter.
"""
import functools
import importlib
from typing import NamedTuple

import numpy as np

from . import _extremes
from ._array_api import to_host

# backend, device -> the engine that runs them and what the caller's framework gets.
# ``engine`` is the one thing :func:`engine_for` reads: "compiled" (the Cython
# core on the host; the reference passes where the core is not built), "cuda"
# (the CUDA kernels through CuPy; the reference passes where CuPy or a device
# is missing) or "reference" (the pure array-API passes). A (backend, device)
# pair missing here raises instead of falling back. ``via`` says how a
# framework reaches the engine (docs only). "generic" is any other array-API
# library (tested with array_api_strict).
CAPABILITIES = {
    ("numpy", "cpu"): {"engine": "compiled", "autodiff": 0, "dtypes": ("float32", "float64")},
    ("generic", "cpu"): {"engine": "reference", "autodiff": 0, "dtypes": ("float32", "float64"),
                         "tested_with": "array_api_strict"},
    ("torch", "cpu"): {"engine": "compiled", "autodiff": 2, "dtypes": ("float32", "float64"),
                       "via": "torch.library custom ops"},
    ("torch", "cuda"): {"engine": "cuda", "autodiff": 2, "dtypes": ("float32", "float64"),
                        "via": "torch.library custom ops"},
    ("jax", "cpu"): {"engine": "compiled", "autodiff": 2, "dtypes": ("float32", "float64"),
                     "via": "XLA FFI custom call; a host callback where the handlers are not built"},
    ("jax", "cuda"): {"engine": "compiled", "autodiff": 2, "dtypes": ("float32", "float64"),
                      "via": "host callback; the CUDA kernels through an XLA FFI handler where CuPy "
                             "sees a GPU (smoothmax.jax.gpu_path())"},
    ("cupy", "cuda"): {"engine": "cuda", "autodiff": 0, "dtypes": ("float32", "float64")},
}


class Engine:
    """An engine module with the converters between the caller's arrays and its own."""

    def __init__(self, name, module, to_engine, from_engine, to_engine_int):
        self.name = name
        self.module = module
        self.to_engine = to_engine
        self.from_engine = from_engine
        self.to_engine_int = to_engine_int

    def __repr__(self):
        return f"Engine({self.name!r})"


@functools.lru_cache(maxsize=None)
def _compiled_module(struct):
    try:
        return importlib.import_module(f"smoothmax._core.{struct}")
    except ImportError:
        return None


class _Compiled:
    """Looks up ``{struct}_{op}`` in the compiled module of that structure."""

    def __getattr__(self, name):
        struct = name.split("_", 1)[0]
        mod = _compiled_module(struct)
        if mod is None or not hasattr(mod, name):
            from . import _reference

            return getattr(_reference, name)
        return getattr(mod, name)


def compiled_available():
    return _compiled_module("dtw") is not None and _compiled_module("viterbi") is not None


# The compiled passes that check their input's values themselves (NaN, forbidden
# infinities) when a call asks (Problem.engine_checks, passed on as check=True): theta,
# and Z for an HVP, item by item on the thread that computes the item. The compiled
# Viterbi passes also check theta on their one read, always.
ENGINE_CHECKED = frozenset({("dtw", "value"), ("dtw", "grad"), ("dtw", "hvp"), ("dtw", "path"),
                            ("viterbi", "hvp")})


class EngineChecks(NamedTuple):
    """What a compiled pass checks itself (``engine_checked``): ``theta`` and
    ``Z``, whether it checks that operand's values (NaN, forbidden
    infinities); ``asked``, whether the call must ask for it
    (``Problem.engine_checks``, the passes of ``ENGINE_CHECKED``)."""
    theta: bool
    Z: bool
    asked: bool


def engine_checked(struct, op, compiled):
    """What the compiled pass ``(struct, op)`` checks itself: theta (and an
    HVP's Z) for an ``ENGINE_CHECKED`` pass, which the call asks for, and the
    Viterbi's theta always; nothing when ``compiled`` is false (another engine
    runs the call). The one rule the NumPy entry points (``dtw._prepare``,
    ``viterbi._prepare``) and the torch operators (``torch._run``) follow to
    skip their host pass and to set ``Problem.engine_checks``."""
    asked = compiled and (struct, op) in ENGINE_CHECKED
    return EngineChecks(theta=asked or (compiled and struct == "viterbi"),
                        Z=asked and op == "hvp", asked=asked)


def engine_checks_values(backend):
    """Whether the engine of ``backend`` checks the values of its input itself
    (NaN, forbidden infinities): the compiled core on NumPy input, for the
    passes of ``ENGINE_CHECKED`` and the Viterbi's theta. The entry points
    then skip their host pass over the data. (The torch operators ask the
    same of CPU tensors inside their custom ops, ``smoothmax/torch.py``
    ``_run``: the entry points run under ``torch.compile``'s tracer, which
    does not step into ``engine_for``'s cache.)"""
    return backend == "numpy" and engine_for("numpy", "cpu").name == "compiled"


def _numpy_in(x):
    if type(x) is np.ndarray and x.flags.c_contiguous:  # a call's fixed cost: no conversion to make
        return x
    return np.ascontiguousarray(to_host(x))


_INT64 = np.dtype(np.int64)  # (a dtype: comparing with np.int64 converts it, each call)


def _int_host(a):
    if type(a) is np.ndarray and a.dtype == _INT64 and a.flags.c_contiguous:  # as above
        return a
    return np.ascontiguousarray(a, dtype=np.int64)


def _cuda_usable():
    try:
        from . import _cuda

        return _cuda.available()
    except Exception:
        return False


@functools.lru_cache(maxsize=None)
def engine_for(backend, device):
    """The engine for arrays of ``backend`` (numpy, torch, jax, cupy, generic) on ``device``.

    Read from :data:`CAPABILITIES`; a pair it does not list raises ``ValueError``.
    """
    cap = CAPABILITIES.get((backend, device))
    if cap is None:
        listed = ", ".join(f"{b}/{d}" for b, d in CAPABILITIES)
        raise ValueError(f"smoothmax has no engine for {backend} arrays on a {device} device; "
                         f"supported (library/device): {listed}")
    from . import _reference

    kind = cap["engine"]
    if kind == "compiled":
        def back(y, xp, like):
            return xp.asarray(y) if backend != "numpy" else y

        name = "compiled" if compiled_available() else "reference (compiled core not built)"
        return Engine(name, _Compiled(), _numpy_in, back, _int_host)
    if kind == "cuda" and _cuda_usable():
        from . import _cuda

        return Engine("cuda", _cuda.engine, _cuda.to_cupy, _cuda.from_cupy, _cuda.int_to_cupy)

    def same(y, xp, like):
        return y

    name = "reference" if kind == "reference" else "reference (CUDA engine unavailable)"
    return Engine(name, _reference, lambda x: x, same, _int_host)


@functools.lru_cache(maxsize=None)
def _engine_function(backend, device, struct, op):
    eng = engine_for(backend, device)
    fn = getattr(eng.module, f"{struct}_{op}", None)
    if fn is None:  # a structure this engine has no kernel for (the DAG on GPUs): reference passes
        from . import _reference

        fn = getattr(_reference, f"{struct}_{op}")
    return eng, fn


def run(problem, op, theta, Z=None):
    """Run ``op`` (value, grad, hvp, decode) of ``problem`` on flat arrays of the caller.

    ``theta`` (and ``Z``) are the flat arrays in the caller's namespace
    (detached for autodiff frameworks); returns a tuple of arrays in that namespace.
    """
    eng, fn = _engine_function(problem.backend, problem.device, problem.struct, op)
    args = [eng.to_engine(theta)]
    if op == "hvp":
        args.append(eng.to_engine(Z))
    for a in problem.engine_args:
        args.append(eng.to_engine_int(a) if isinstance(a, np.ndarray) else a)
    if op not in ("decode", "path"):
        args.append(problem.reg_code)
        args.append(problem.gamma)
    # engine_checks: the compiled DTW (theta, Z) and Viterbi HVP (Z) check NumPy input's
    # values themselves, on the thread that computes each item (docs/engines.md)
    out = fn(*args, check=True) if problem.engine_checks else fn(*args)
    if not isinstance(out, tuple):
        out = (out,)
    out = _extremes.rescue_overflow(problem.struct, op, fn, args, out, problem.engine_args)  # beyond the dtype's range
    return tuple(eng.from_engine(y, problem.xp, theta) for y in out)


def run_crf(xp, backend, device, op, arrays, lengths, extra=()):
    """Run ``crf_{op}`` (the factorised Viterbi of ``smoothmax.crf``) on the engine of
    ``(backend, device)``.

    ``arrays`` are the caller's arrays (emissions, transitions, start, end and,
    for the HVP, the four parts of the direction); ``lengths`` a host int64
    array; ``extra`` the trailing engine arguments (weights, reg code, gamma).
    Engines without a CRF kernel (the GPU engine) run the reference passes.
    """
    eng = engine_for(backend, device)
    fn = getattr(eng.module, f"crf_{op}", None)
    if fn is None:
        from . import _reference

        fn = getattr(_reference, f"crf_{op}")
    engine_arrays = [eng.to_engine(a) for a in arrays]
    out = fn(*engine_arrays, lengths, *extra)
    if not isinstance(out, tuple):
        out = (out,)
    out = _extremes.rescue_crf_overflow(op, fn, engine_arrays, lengths, extra, out)  # beyond the range
    return tuple(eng.from_engine(y, xp, arrays[0]) for y in out)


def features_compiled(backend, device):
    """Whether DTW between features of (backend, device) runs on the compiled
    linear-memory kernel (otherwise: the cost-matrix path of ``_reference``)."""
    return backend in ("numpy", "torch", "jax") and device == "cpu" and _compiled_module("dtwf") is not None


def run_features(fp, x, y, grad):
    """The compiled DTW-on-features kernel on host arrays ``x (B, NA, d)``, ``y (B, NB, d)``.

    Returns NumPy ``(value (B,), grad_x, grad_y)`` in ``x``'s dtype (the
    gradients ``None`` unless ``grad``). Features are read as float64; for
    float32 the operator's weights are float32, as for a float32 cost matrix.
    For the cosine cost the rows are normalised here and the kernel's sums
    scaled by ``−1/‖row‖`` (see ``smoothmax/_core/dtwf.pyx``).
    """
    from . import _reference

    mod = _compiled_module("dtwf")
    dtype = x.dtype
    X = np.ascontiguousarray(x, dtype=np.float64)
    Y = np.ascontiguousarray(y, dtype=np.float64)
    if fp.cost == "cosine":
        X, ix = _reference._unit_rows(np, X)
        Y, iy = _reference._unit_rows(np, Y)
    if fp.progress is not None:
        fp.progress.expect(int(np.sum(fp.la)) * (2 if grad else 1))
    value, gx, gy = mod._run(X, Y, _int_host(fp.la), _int_host(fp.lb), fp.band, mod.COSTS[fp.cost],
                             fp.reg_code, fp.gamma, fp.rows, bool(grad), fp.progress,
                             dtype == np.float32)
    if not grad:
        return value.astype(dtype, copy=False), None, None
    if fp.cost == "cosine":
        gx *= -ix[..., None]
        gy *= -iy[..., None]
    return value.astype(dtype, copy=False), gx.astype(dtype, copy=False), gy.astype(dtype, copy=False)
