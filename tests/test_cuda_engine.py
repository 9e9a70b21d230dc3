"""The GPU engine (smoothmax._cuda): what the engine contract does not check.

The engine's results -- on a GPU and, through the CPU emulation of the
kernels, on any machine with a C++20 compiler -- are checked with every other
engine's by ``tests/test_engine_contract.py`` (enumeration, finite
differences, the reference engine; lengths, bands, masks, both dtypes, all
operators; outputs' namespace, dtype and device). Here:

* GPU (marker ``gpu``): 4096² and 8192² DTW problems finish without NaN.
  Skipped, with the reason, where CuPy or a CUDA device is missing.
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
