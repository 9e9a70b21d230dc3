"""Fixtures shared by the whole suite: one suite for every backend and dtype.

The ``backend`` fixture is parametrized over the (library, device) pairs of
``smoothmax._dispatch.CAPABILITIES`` -- the same registry the docs use -- so
a backend added there is tested here. A backend whose library is not
installed, whose device is absent, or whose framework module
(``smoothmax.torch`` / ``smoothmax.jax``) is not importable yet is *skipped
with a reason* (``pytest -ra`` lists them), never silently dropped.

Each :class:`Backend` converts NumPy arrays to the backend (dtype preserved)
and back, and asserts that a result has the right namespace, dtype, shape and
device (``Backend.check``).
"""
import importlib
import os
import zlib

import numpy as np
import pytest

from smoothmax._dispatch import CAPABILITIES

try:  # float64 on JAX; must happen before any JAX array is created
    import jax

    jax.config.update("jax_enable_x64", True)
except ImportError:  # pragma: no cover - JAX not installed
    jax = None


# ---------------------------------------------------------------------------
# backends


class Backend:
    """A (library, device) pair: conversions and result checks."""

    def __init__(self, library, device):
        self.library = library
        self.device = device
        self.name = f"{library}-{device}"
        self._mod = importlib.import_module(
            {"numpy": "numpy", "array_api_strict": "array_api_strict", "torch": "torch",
             "jax": "jax.numpy", "cupy": "cupy"}[library])

    def __repr__(self):
        return f"Backend({self.name})"

    @property
    def namespace_name(self):
        return self.library

    # conversions ---------------------------------------------------------
    def dtype(self, name):
        """The backend's dtype object for ``"float32"``, ``"float64"``, ``"int64"``..."""
        return getattr(self._mod, name)

    def asarray(self, a):
        """A backend array equal to the NumPy array ``a``, with the same dtype, on ``device``."""
        a = np.asarray(a)
        m = self._mod
        if self.library == "numpy":
            return a.copy()
        if self.library == "array_api_strict":
            return m.asarray(a, dtype=getattr(m, a.dtype.name))
        if self.library == "torch":
            return m.asarray(a.copy(), dtype=getattr(m, a.dtype.name), device=self.device)
        if self.library == "jax":
            dev = jax.devices("cpu" if self.device == "cpu" else "gpu")[0]
            return jax.device_put(m.asarray(a, dtype=a.dtype), dev)
        if self.library == "cupy":
            return m.asarray(a)
        raise AssertionError(self.library)

    def to_numpy(self, x):
        if self.library == "numpy":
            return np.asarray(x)
        if self.library == "torch":
            return x.detach().cpu().numpy()
        if self.library == "cupy":
            return x.get()
        return np.asarray(x)

    # checks ----------------------------------------------------------------
    def is_native(self, x):
        """True when ``x`` is an array of this library (not a NumPy array or a scalar)."""
        if self.library == "numpy":
            return isinstance(x, np.ndarray)
        if self.library == "array_api_strict":
            import array_api_strict as xs

            return isinstance(x, xs._array_object.Array)  # noqa: SLF001
        if self.library == "torch":
            return isinstance(x, self._mod.Tensor)
        if self.library == "jax":
            return isinstance(x, jax.Array)
        if self.library == "cupy":
            return isinstance(x, self._mod.ndarray)
        raise AssertionError(self.library)

    def device_of(self, x):
        if self.library in ("numpy", "array_api_strict"):
            return "cpu"
        if self.library == "cupy":
            return "cuda"
        if self.library == "torch":
            return x.device.type
        if self.library == "jax":
            platform = next(iter(x.devices())).platform
            return "cuda" if platform == "gpu" else platform
        raise AssertionError(self.library)

    def check(self, x, dtype, shape):
        """Assert that ``x`` is a native array of dtype ``dtype`` (a name), shape and device."""
        assert self.is_native(x), f"{self.name}: expected a {self.library} array, got {type(x)}"
        assert x.dtype == self.dtype(dtype), f"{self.name}: dtype {x.dtype}, expected {dtype}"
        assert tuple(x.shape) == tuple(shape), f"{self.name}: shape {tuple(x.shape)}, expected {tuple(shape)}"
        assert self.device_of(x) == self.device, f"{self.name}: device {self.device_of(x)}, expected {self.device}"
        return self.to_numpy(x)


def _cuda_present(library):
    try:
        if library == "torch":
            import torch

            return torch.cuda.is_available()
        if library == "cupy":
            import cupy

            return cupy.cuda.runtime.getDeviceCount() > 0
        if library == "jax":
            return bool(jax.devices("gpu"))
    except Exception:
        return False
    return False


def _skip_reason(library, device):
    mod = {"jax": "jax"}.get(library, library)
    try:
        importlib.import_module(mod)
    except ImportError:
        return f"{library} is not installed"
    except Exception as exc:  # a broken install is reported, not hidden
        return f"{library} fails to import: {exc!r}"
    if device == "cuda" and not _cuda_present(library):
        return f"{library}: no CUDA device"
    return None


def _backend_params():
    params = []
    for (backend, device), cap in CAPABILITIES.items():
        library = cap.get("tested_with", backend)  # "generic": any other array-API library
        reason = _skip_reason(library, device)
        marks = [pytest.mark.skip(reason=f"backend {library}-{device}: {reason}")] if reason else []
        if device == "cuda":
            marks.append(pytest.mark.gpu)
        params.append(pytest.param((library, device), id=f"{library}-{device}", marks=marks))
    return params


BACKEND_PARAMS = _backend_params()
ARRAY_BACKEND_PARAMS = BACKEND_PARAMS  # smooth_max/argmax: the same backends


# Backends whose per-call overhead is high (JAX dispatches every call through
# host callbacks and eager op compilation): long parameter grids run on a
# subset there, the full grid on the others (see ``backend_grid``).
LIGHT_LIBRARIES = ("jax",)


def backend_grid(values, light_values, ids=str, params=None):
    """Parameters for ``@pytest.mark.parametrize("backend,<name>", ..., indirect=["backend"])``.

    Every backend is paired with every entry of ``values``, except those of
    ``LIGHT_LIBRARIES``, paired with ``light_values`` only. Skip marks of the
    backend (not installed, no device) are kept.
    """
    out = []
    for p in (BACKEND_PARAMS if params is None else params):
        library = p.values[0][0]
        for v in (light_values if library in LIGHT_LIBRARIES else values):
            out.append(pytest.param(p.values[0], v, id=f"{p.id}-{ids(v)}", marks=p.marks))
    return out


@pytest.fixture(params=BACKEND_PARAMS)
def backend(request):
    """Every backend of CAPABILITIES, for the structured (DP) functions."""
    return Backend(*request.param)


@pytest.fixture(params=ARRAY_BACKEND_PARAMS)
def array_backend(request):
    """Every backend of CAPABILITIES, for the pure array-API functions (smooth_max/argmax).

    These need no framework module (``smoothmax.torch``/``smoothmax.jax``).
    """
    return Backend(*request.param)


@pytest.fixture
def np_backend():
    """The NumPy backend alone (for tests about the mathematics, not the plumbing)."""
    return Backend("numpy", "cpu")


# ---------------------------------------------------------------------------
# dtypes and tolerances


class DType:
    def __init__(self, name, rtol, atol):
        self.name = name
        self.np = np.dtype(name)
        self.rtol = rtol
        self.atol = atol

    def __repr__(self):
        return self.name

    def close(self, actual, expected, scale=1.0, err_msg=""):
        """``assert_allclose`` with this dtype's tolerance; inf must match inf."""
        np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64),
                                   rtol=self.rtol, atol=self.atol * scale, err_msg=err_msg)


FLOAT64 = DType("float64", rtol=1e-10, atol=1e-10)
FLOAT32 = DType("float32", rtol=1e-4, atol=1e-4)


@pytest.fixture(params=[FLOAT32, FLOAT64], ids=["float32", "float64"])
def dtype(request):
    return request.param


REGS = ("negentropy", "l2", "hard")


@pytest.fixture(params=REGS)
def reg(request):
    return request.param


@pytest.fixture
def rng(request):
    """A generator seeded from the test id, so every test is reproducible alone."""
    seed = zlib.crc32(request.node.nodeid.encode())
    return np.random.default_rng(seed)


def pytest_addoption(parser):
    parser.addoption("--fuzz-long", action="store_true", default=False,
                     help="fuzz suite (tests/test_fuzz.py): at least 1000 cases per function, a fresh seed")


@pytest.fixture
def fuzz_long(request):
    """True under ``--fuzz-long`` (the long fuzz profile), False for the fast CI profile."""
    return request.config.getoption("--fuzz-long")


def pytest_configure(config):
    """With SMOOTHMAX_REQUIRE_COMPILED=1 (CI), a missing compiled core is an error, not skips."""
    if os.environ.get("SMOOTHMAX_REQUIRE_COMPILED") == "1":
        from smoothmax._dispatch import compiled_available

        if not compiled_available():
            raise pytest.UsageError(
                "SMOOTHMAX_REQUIRE_COMPILED=1 but smoothmax._core is not built "
                "(is the source tree shadowing the installed package? use pip install -e .)"
            )


def pytest_report_header(config):
    lines = []
    for p in BACKEND_PARAMS:
        skip = [m for m in p.marks if m.name == "skip"]
        lines.append(f"  {p.id}: " + (skip[0].kwargs["reason"] if skip else "tested"))
    try:
        from smoothmax._dispatch import compiled_available

        lines.append(f"  compiled engine (smoothmax._core): {'built' if compiled_available() else 'absent, reference engine used'}")
    except Exception as exc:  # pragma: no cover
        lines.append(f"  compiled engine: {exc!r}")
    return ["smoothmax backends:"] + lines


@pytest.fixture
def engine_calls(monkeypatch):
    """The ops (value, grad, hvp, ...) of every engine call made during the test, in order."""
    from smoothmax import _dispatch

    calls = []
    real = _dispatch.run

    def counting(problem, op, theta, Z=None):
        calls.append(op)
        return real(problem, op, theta, Z)

    monkeypatch.setattr(_dispatch, "run", counting)
    return calls


# ---------------------------------------------------------------------------
# threads


@pytest.fixture(autouse=True, scope="session")
def _threads_deterministic():
    """The compiled engine's co-tenant guard off for the suite: on a busy
    machine it would send calls to one thread at times, and the threaded
    paths (wavefront, shared batch) must run whenever a test asks for them.
    ``tests/test_threads.py`` tests the guard itself."""
    try:
        from smoothmax._core import pool
    except ImportError:  # no compiled engine
        yield
        return
    old = pool._set_guard(False)
    yield
    pool._set_guard(old)
