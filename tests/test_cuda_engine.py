"""The GPU engine (smoothmax._cuda): what the engine contract does not check.

The engine's results -- on a GPU and, through the CPU emulation of the
kernels, on any machine with a C++20 compiler -- are checked with every other
engine's by ``tests/test_engine_contract.py`` (enumeration, finite
differences, the reference engine; lengths, bands, masks, both dtypes, all
operators; outputs' namespace, dtype and device). Here:

* GPU (marker ``gpu``): 4096² and 8192² DTW problems finish without NaN.
  Skipped, with the reason, where CuPy or a CUDA device is missing.
* Memory: the DTW gradient keeps two weights a cell (on the emulation).
* Packaging: ``import smoothmax._cuda`` works without CuPy; the nvcc compile
  check passes where nvcc exists (``slow``).
"""
import os
import subprocess
import sys

import pytest

from smoothmax._cuda import engine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cupy():
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed: no GPU engine")
    import smoothmax._cuda as smx_cuda

    if not smx_cuda.available():
        pytest.skip("CuPy found no CUDA device")
    return cupy


@pytest.mark.gpu
@pytest.mark.parametrize("n", [4096, 8192])
def test_gpu_long_dtw_no_nan(n):
    cupy = _cupy()
    rng = cupy.random.default_rng(0)
    theta = rng.random((1, n, n), dtype=cupy.float32)
    la = cupy.asarray([n], dtype=cupy.int64)
    v, E = engine.dtw_grad(theta, la, la, -1, 0, 1.0)
    assert bool(cupy.isfinite(v).all())
    assert not bool(cupy.isnan(E).any())
    assert float(E.min()) >= 0.0 and float(E.max()) <= 1.0 + 1e-3   # float32 rounding along 2n steps
    assert float(E[0, -1, -1]) == 1.0 and abs(float(E[0, 0, 0]) - 1.0) < 5e-3
    # every path visits every row: row sums of E are >= 1
    assert float(E[0].sum(axis=1).min()) >= 1.0 - 5e-3
    # float64 agrees on the value
    v64 = engine.dtw_value(theta.astype(cupy.float64), la, la, -1, 0, 1.0)
    assert abs(float(v[0]) - float(v64[0])) <= 1e-4 * abs(float(v64[0])) + 1e-2
    # banded, hard
    c, Y = engine.dtw_path(theta, la, la, 64)
    assert bool(cupy.isfinite(c).all()) and int(Y.sum()) >= n


# ---------------------------------------------------------------------------
# memory of the DTW gradient, on the kernels' CPU emulation


class _CountingBackend:
    """The emulated backend, recording the size of every array the engine allocates."""

    def __init__(self, be):
        import numpy as np

        self.be, self.sizes = be, []
        outer = self

        class _Xp:
            def __getattr__(self, name):
                fn = getattr(np, name)
                if name not in ("empty", "zeros", "full"):
                    return fn

                def alloc(shape, *a, **k):
                    out = fn(shape, *a, **k)
                    outer.sizes.append(out.nbytes)
                    return out
                return alloc
        self.xp = _Xp()

    def launch(self, *a, **k):
        return self.be.launch(*a, **k)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_dtw_grad_keeps_two_weights_a_cell(dtype):
    """The GPU engine's dtw_grad allocates E, the strip edges and two weights a
    cell (q_up, q_left; docs/gpu.md): at most 2.2 values a cell besides E at
    64 x 512 (the lane layout pads each strip by 31 steps), where three weights
    were 3.2; and its E is the CPU engine's."""
    import numpy as np

    from smoothmax import _reference as R
    from smoothmax._cuda import emulate

    if not emulate.available():
        pytest.skip("no C++20 compiler for the CUDA emulation")
    be = _CountingBackend(emulate.EmulatedBackend(max_resident=2))
    rng = np.random.default_rng(3)
    NA, NB = 64, 512
    theta = rng.random((1, NA, NB)).astype(dtype)
    la, lb = np.array([NA]), np.array([NB])
    v, E = engine.dtw_run(be, theta, None, la, lb, -1, 1, 1.0, 1)
    cell = NA * NB * np.dtype(dtype).itemsize
    kept = (sum(be.sizes) - E.nbytes) / cell
    assert kept <= 2.2, f"{kept:.2f} values kept a cell besides E"
    v_ref, E_ref = R.dtw_grad(theta.astype(np.float64), la, lb, -1, 1, 1.0)
    tol = 1e-9 if dtype == "float64" else 2e-4
    np.testing.assert_allclose(E, E_ref, rtol=tol, atol=tol)
    np.testing.assert_allclose(v, v_ref, rtol=tol)


# ---------------------------------------------------------------------------
# packaging


def test_import_without_cupy():
    code = ("import sys; sys.modules['cupy'] = None\n"
            "import smoothmax._cuda as c\n"
            "assert c.available() is False\n"
            "import smoothmax._cuda.engine, smoothmax._cuda._source\n")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
def test_nvcc_compile_check():
    import shutil

    if shutil.which("nvcc") is None and not os.path.exists("/usr/local/cuda/bin/nvcc"):
        pytest.skip("nvcc is not installed")
    if not any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++")):
        # nvcc compiles the host side with the system's C++ compiler (e.g. where
        # an installed wheel is tested without a compiler: docs/development.md)
        pytest.skip("nvcc needs a host C++ compiler (g++, c++ or clang++) on PATH")
    from smoothmax._cuda import compile_check

    assert compile_check.main([]) == 0
