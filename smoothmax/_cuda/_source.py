"""The CUDA source of the GPU engine and the list of its kernel instantiations.

One place builds the source text (prelude + the operator header
``smoothmax/_core/include/smx_ops.hpp``, shared with the compiled CPU core,
+ DTW + Viterbi + CRF kernels) and
the name expressions (``smx_dtw_fwd<float,0,1>``...). Three consumers use it:
the CuPy launcher (``RawModule(code=..., name_expressions=...)``), the nvcc
compile check (``python -m smoothmax._cuda.compile_check``) and the CPU
emulation used by the tests on machines without a GPU
(``smoothmax._cuda.emulate``). The text is stable, so CuPy's disk cache hits.
"""
import functools
import os

from ..operators import REG_CODES as _REG_CODES

_HERE = os.path.dirname(os.path.abspath(__file__))
# the operators, written once for every engine (pasted in: NVRTC gets one text)
_OPS_HEADER = os.path.join(_HERE, os.pardir, "_core", "include", "smx_ops.hpp")
_BODY = ("smx_common.cuh", "smx_dtw.cu", "smx_dtwf.cu", "smx_viterbi.cu", "smx_crf.cu")

CTYPES = {"float32": "float", "float64": "double"}
REG_CODES = tuple(sorted(_REG_CODES.values()))  # every operator, one instantiation each


def _read(name):
    with open(os.path.join(_HERE, name), encoding="utf-8") as f:
        return f.read()


@functools.lru_cache(maxsize=None)
def body():
    """The device code shared by every build (operators and kernels)."""
    parts = [f"// ---- smoothmax/_core/include/smx_ops.hpp\n{_read(_OPS_HEADER)}"]
    parts += [f"// ---- {name}\n{_read(name)}" for name in _BODY]
    return "\n".join(parts)


@functools.lru_cache(maxsize=None)
def cuda_source():
    """The full source handed to NVRTC / nvcc."""
    return f"// ---- smx_prelude_cuda.cuh\n{_read('smx_prelude_cuda.cuh')}\n{body()}"


def emulation_source():
    """The full source for the C++20 CPU emulation build."""
    return f"// ---- smx_emu.cuh\n{_read('smx_emu.cuh')}\n{body()}"


def dtw_fwd_name(ctype, reg, mode):
    return f"smx_dtw_fwd<{ctype},{reg},{mode}>"


def dtw_bwd_name(ctype, reg, mode):
    return f"smx_dtw_bwd<{ctype},{reg},{mode}>"


def dtwf_fwd_name(ctype, reg, cost, mode):
    return f"smx_dtwf_fwd<{ctype},{reg},{cost},{mode}>"


def dtwf_bwd_name(ctype, reg, cost):
    return f"smx_dtwf_bwd<{ctype},{reg},{cost}>"


FEATURE_COST_CODES = (0, 1, 2)  # sqeuclidean, euclidean, cosine (smoothmax._core.dtwf.COSTS)


def vit_name(ctype, reg, mode):
    return f"smx_vit<{ctype},{reg},{mode}>"


def vit_decode_name(ctype):
    return f"smx_vit_decode<{ctype}>"


def crf_name(ctype, reg, mode):
    return f"smx_crf<{ctype},{reg},{mode}>"


def crf_decode_name(ctype):
    return f"smx_crf_decode<{ctype}>"


@functools.lru_cache(maxsize=None)
def name_expressions(dtype):
    """Every kernel instantiation for ``dtype`` ("float32" or "float64")."""
    c = CTYPES[dtype]
    names = []
    for reg in REG_CODES:
        for mode in (0, 1, 2):
            names.append(dtw_fwd_name(c, reg, mode))
        for mode in (1, 2):
            names.append(dtw_bwd_name(c, reg, mode))
        for cost in FEATURE_COST_CODES:
            names += [dtwf_fwd_name(c, reg, cost, 0), dtwf_fwd_name(c, reg, cost, 1),
                      dtwf_bwd_name(c, reg, cost)]
        for mode in (0, 1, 2):
            names.append(vit_name(c, reg, mode))
        for mode in (0, 1, 2):
            names.append(crf_name(c, reg, mode))
    names.append(vit_decode_name(c))
    names.append(crf_decode_name(c))
    return tuple(names)


def all_name_expressions():
    return name_expressions("float32") + name_expressions("float64")
