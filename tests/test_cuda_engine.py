"""The GPU engine (smoothmax._cuda) against the reference engine.

Three layers:

* GPU tests (marker ``gpu``): every engine function on CuPy arrays against
  ``smoothmax._reference`` on random problems (lengths, bands, masks, both
  dtypes, all operators), outputs' namespace/dtype/device, and 4096^2 and
  8192^2 DTW problems that finish without NaN. Skipped, with the reason,
  where CuPy or a CUDA device is missing.
* Emulation tests: the same kernel source compiled as C++20 against the CPU
  emulation layer (one OS thread per CUDA thread) and run through the very
  launch code of the engine on NumPy arrays. They need only a C++20
  compiler; the small smoke test always runs, the matrix is ``slow``.
* Packaging: ``import smoothmax._cuda`` works without CuPy; the nvcc compile
  check passes where nvcc exists (``slow``).
"""
import os
import subprocess
import sys

import numpy as np
import pytest

from smoothmax import _reference as ref
from smoothmax._cuda import emulate, engine

REGS = (0, 1, 2)
DTYPES = (np.float32, np.float64)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tol(dt):
    return (3e-4, 3e-3) if dt == np.float32 else (1e-9, 1e-8)


def assert_matches(name, got, want, dt, loose=False):
    got = np.asarray(got)
    want = np.asarray(want)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype} != {want.dtype}"
    assert not np.isnan(got).any(), f"{name}: NaN"
    fin = np.isfinite(want)
    np.testing.assert_array_equal(np.isfinite(got), fin, err_msg=f"{name}: finiteness")
    tol = _tol(dt)[1 if loose else 0]
    np.testing.assert_allclose(got[fin], want[fin], rtol=tol, atol=tol, err_msg=name)
    np.testing.assert_array_equal(got[~fin], want[~fin], err_msg=f"{name}: infinities")


def dtw_problem(rng, B, NA, NB, dt, mask=0.0, full=False):
    theta = (rng.random((B, NA, NB)) * 2).astype(dt)
    if mask:
        theta[rng.random(theta.shape) < mask] = np.inf
    Z = rng.standard_normal((B, NA, NB)).astype(dt)
    la = np.full(B, NA, dtype=np.int64) if full else rng.integers(1, NA + 1, size=B)
    lb = np.full(B, NB, dtype=np.int64) if full else rng.integers(1, NB + 1, size=B)
    la[0], lb[0] = NA, NB
    return theta, Z, la.astype(np.int64), lb.astype(np.int64)


def vit_problem(rng, B, T, S, dt, mask=0.0):
    theta = rng.standard_normal((B, T, S, S)).astype(dt)
    if mask:
        theta[rng.random(theta.shape) < mask] = -np.inf
    Z = rng.standard_normal((B, T, S, S)).astype(dt)
    lengths = rng.integers(1, T + 1, size=B).astype(np.int64)
    lengths[0] = T
    return theta, Z, lengths


# ---------------------------------------------------------------------------
# runners: the same checks on a GPU (CuPy) or on the emulation (NumPy)


def check_dtw(run, to_dev, to_host, theta, Z, la, lb, band, reg, gamma):
    dt = theta.dtype.type
    th, z, a, b = to_dev(theta), to_dev(Z), to_dev(la), to_dev(lb)
    vr, Er, Edr = ref.dtw_hvp(theta, Z, la, lb, band, reg, gamma)
    v = run("dtw_value", th, a, b, band, reg, gamma)
    assert_matches("dtw_value", to_host(v), vr, dt)
    v, E = run("dtw_grad", th, a, b, band, reg, gamma)
    assert_matches("dtw_grad value", to_host(v), vr, dt)
    assert_matches("dtw_grad E", to_host(E), Er, dt)
    v, E, Ed = run("dtw_hvp", th, z, a, b, band, reg, gamma)
    assert_matches("dtw_hvp value", to_host(v), vr, dt)
    assert_matches("dtw_hvp E", to_host(E), Er, dt)
    assert_matches("dtw_hvp Edot", to_host(Ed), Edr, dt, loose=True)
    if reg == 2:
        c, Y = run("dtw_path", th, a, b, band)
        cr, Yr = ref.dtw_path(theta, la, lb, band)
        assert_matches("dtw_path cost", to_host(c), cr, dt)
        np.testing.assert_array_equal(to_host(Y), Yr)


def check_vit(run, to_dev, to_host, theta, Z, lengths, reg, gamma):
    dt = theta.dtype.type
    th, z, L = to_dev(theta), to_dev(Z), to_dev(lengths)
    vr, Er, Edr = ref.viterbi_hvp(theta, Z, lengths, reg, gamma)
    v = run("viterbi_value", th, L, reg, gamma)
    assert_matches("viterbi_value", to_host(v), vr, dt)
    v, E = run("viterbi_grad", th, L, reg, gamma)
    assert_matches("viterbi_grad value", to_host(v), vr, dt)
    assert_matches("viterbi_grad E", to_host(E), Er, dt)
    v, E, Ed = run("viterbi_hvp", th, z, L, reg, gamma)
    assert_matches("viterbi_hvp E", to_host(E), Er, dt)
    assert_matches("viterbi_hvp Edot", to_host(Ed), Edr, dt, loose=True)
    s, tags = run("viterbi_decode", th, L)
    sr, tr = ref.viterbi_decode(theta, lengths)
    assert_matches("viterbi_decode score", to_host(s), sr, dt)
    tags = to_host(tags)
    assert tags.dtype == np.int64
    np.testing.assert_array_equal(tags, np.asarray(tr))


# ---------------------------------------------------------------------------
# GPU


def _cupy():
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed: no GPU engine")
    import smoothmax._cuda as smx_cuda

    if not smx_cuda.available():
        pytest.skip("CuPy found no CUDA device")
    return cupy


def _gpu_run(name, *args):
    return getattr(engine, name)(*args)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("band", [-1, 0, 5])
@pytest.mark.parametrize("shape", [(3, 7, 5), (4, 70, 45), (2, 33, 130)])
def test_gpu_dtw_matches_reference(dtype, reg, band, shape):
    cupy = _cupy()
    rng = np.random.default_rng(hash((shape, band, reg)) % 2**32)
    theta, Z, la, lb = dtw_problem(rng, *shape, dtype, mask=0.02)
    check_dtw(_gpu_run, cupy.asarray, cupy.asnumpy, theta, Z, la, lb, band, reg, 0.5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("shape", [(3, 5, 3), (4, 20, 64), (2, 6, 300), (2, 4, 1)])
def test_gpu_viterbi_matches_reference(dtype, reg, shape):
    cupy = _cupy()
    rng = np.random.default_rng(hash((shape, reg)) % 2**32)
    theta, Z, lengths = vit_problem(rng, *shape, dtype, mask=0.1)
    check_vit(_gpu_run, cupy.asarray, cupy.asnumpy, theta, Z, lengths, reg, 0.7)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_masks_and_unreachable(dtype):
    cupy = _cupy()
    rng = np.random.default_rng(7)
    theta, Z, la, lb = dtw_problem(rng, 3, 40, 50, dtype)
    theta[1] = np.inf                       # end unreachable: value +inf, E = 0
    theta[2, :, 10] = np.inf                # a wall
    for reg in REGS:
        check_dtw(_gpu_run, cupy.asarray, cupy.asnumpy, theta, Z, la, lb, -1, reg, 1.0)
    vt, vZ, L = vit_problem(rng, 3, 6, 4, dtype)
    vt[1] = -np.inf
    for reg in REGS:
        check_vit(_gpu_run, cupy.asarray, cupy.asnumpy, vt, vZ, L, reg, 1.0)


@pytest.mark.gpu
def test_gpu_outputs_namespace_dtype_device():
    cupy = _cupy()
    rng = np.random.default_rng(0)
    for dt in DTYPES:
        theta, Z, la, lb = dtw_problem(rng, 2, 9, 8, dt)
        th = cupy.asarray(theta)
        v, E, Ed = engine.dtw_hvp(th, cupy.asarray(Z), cupy.asarray(la), cupy.asarray(lb), -1, 0, 1.0)
        for a in (v, E, Ed):
            assert isinstance(a, cupy.ndarray) and a.dtype == dt and a.device == th.device
        vt, vZ, L = vit_problem(rng, 2, 4, 3, dt)
        s, tags = engine.viterbi_decode(cupy.asarray(vt), cupy.asarray(L))
        assert isinstance(tags, cupy.ndarray) and tags.dtype == np.int64
    # inputs are not modified
    th0 = th.copy()
    engine.dtw_grad(th, cupy.asarray(la), cupy.asarray(lb), 2, 1, 0.3)
    assert bool((th == th0).all())
    # empty batch
    v = engine.dtw_value(cupy.zeros((0, 4, 5)), cupy.zeros(0, np.int64), cupy.zeros(0, np.int64), -1, 0, 1.0)
    assert v.shape == (0,)


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
# emulation (CPU)


def _emu_backend(max_resident):
    if not emulate.available():
        pytest.skip("no C++20 compiler for the CUDA emulation")
    return emulate.EmulatedBackend(max_resident=max_resident)


def _emu_runner(be):
    def run(name, *args):
        struct, op = name.split("_", 1)
        if struct == "dtw":
            if op == "path":
                theta, la, lb, band = args
                return engine.dtw_run(be, theta, None, la, lb, band, 2, 1.0, 1)
            mode = {"value": 0, "grad": 1, "hvp": 2}[op]
            if mode == 2:
                theta, Z, la, lb, band, reg, gamma = args
            else:
                (theta, la, lb, band, reg, gamma), Z = args, None
            return engine.dtw_run(be, theta, Z, la, lb, band, reg, gamma, mode)
        if op == "decode":
            return engine.vit_decode_run(be, *args)
        mode = {"value": 0, "grad": 1, "hvp": 2}[op]
        if mode == 2:
            theta, Z, L, reg, gamma = args
        else:
            (theta, L, reg, gamma), Z = args, None
        return engine.vit_run(be, theta, Z, L, reg, gamma, mode)

    return run


def _ident(x):
    return np.asarray(x)


def test_emulated_kernels_smoke():
    """The kernel text itself, executed on the CPU: a two-strip DTW and a Viterbi."""
    be = _emu_backend(max_resident=1)       # strictly one block at a time
    rng = np.random.default_rng(3)
    theta, Z, la, lb = dtw_problem(rng, 2, 40, 11, np.float64)
    check_dtw(_emu_runner(be), _ident, _ident, theta, Z, la, lb, -1, 0, 0.5)
    vt, vZ, L = vit_problem(rng, 2, 4, 5, np.float64, mask=0.1)
    check_vit(_emu_runner(be), _ident, _ident, vt, vZ, L, 1, 0.5)
    names = {n for n, *_ in be.launches}
    assert any(n.startswith("smx_dtw_bwd<double,0,2>") for n in names)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("band", [-1, 0, 3])
@pytest.mark.parametrize("max_resident", [1, 6])
def test_emulated_dtw_matrix(dtype, reg, band, max_resident):
    be = _emu_backend(max_resident)
    rng = np.random.default_rng(reg * 10 + band + 1)
    theta, Z, la, lb = dtw_problem(rng, 3, 70, 23, dtype, mask=0.02)
    check_dtw(_emu_runner(be), _ident, _ident, theta, Z, la, lb, band, reg, 0.4)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("shape", [(3, 6, 5), (2, 3, 40), (2, 4, 1)])
def test_emulated_viterbi_matrix(dtype, reg, shape):
    be = _emu_backend(2)
    rng = np.random.default_rng(reg + shape[2])
    theta, Z, L = vit_problem(rng, *shape, dtype, mask=0.15)
    if shape[0] > 2:
        theta[2] = -np.inf
    check_vit(_emu_runner(be), _ident, _ident, theta, Z, L, reg, 0.6)


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
