"""The CUDA text of the factorised Viterbi (smx_crf.cu), executed by the CPU emulation
of the kernels (and on a GPU when CuPy has one), against the reference engine."""
import numpy as np
import pytest

from smoothmax import _reference as R
from smoothmax._cuda import emulate, engine


def _backend():
    if not emulate.available():
        pytest.skip("no C++20 compiler for the CUDA emulation")
    return emulate.EmulatedBackend(max_resident=2)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("S", [3, pytest.param(40, marks=pytest.mark.slow)])
def test_emulated_crf_kernels(dtype, S):
    be = _backend()
    rng = np.random.default_rng(S)
    B, T = 3, 5
    em, st, en = (rng.normal(size=sh).astype(dtype) for sh in ((B, T, S), (S,), (S,)))
    A = rng.normal(size=(S, S)).astype(dtype)
    A[1, :] = -np.inf  # a tag that cannot be left
    L = np.array([5, 2, 1])
    w = np.array([1.0, 2.0, 0.5])
    Z = tuple(rng.normal(size=x.shape).astype(dtype) for x in (em, A, st, en))
    tol = 2e-5 if dtype == np.float32 else 1e-12
    for reg in range(3):
        out = [engine.crf_run(be, em, A, st, en, L, w, reg, 0.7, mode, Z=Z) for mode in range(3)]
        ref = [(R.crf_value(em, A, st, en, L, reg, 0.7),), R.crf_grad(em, A, st, en, L, w, reg, 0.7),
               R.crf_hvp(em, A, st, en, *Z, L, w, reg, 0.7)]
        for a, b in zip([(out[0],)] + out[1:], ref):
            for x, y in zip(a, b):
                assert x.dtype == dtype
                np.testing.assert_allclose(x, y, rtol=tol, atol=tol)
    score, tags = engine.crf_decode_run(be, em, A, st, en, L)
    rs, rt = R.crf_decode(em, A, st, en, L)
    np.testing.assert_array_equal(tags, rt)
    np.testing.assert_allclose(score, rs, rtol=tol)
    assert {n for n, *_ in be.launches} >= {f"smx_crf<{'float' if dtype == np.float32 else 'double'},0,2>"}
