"""Run the GPU kernels on the CPU, for tests on machines without a GPU.

The CUDA source is compiled as C++20 against ``smx_emu.cuh``, which maps a
CUDA thread to an OS thread (barriers for ``__syncthreads`` and warp
shuffles, ``std::atomic_ref`` for the flags). The engine's launch code
(``engine.dtw_run`` and friends) runs unchanged on NumPy arrays through
:class:`EmulatedBackend`. Slow -- use tiny problems -- but it executes the
very kernel text that CuPy compiles, including the inter-block pipeline of
the DTW kernels, with a bounded number of resident blocks.

Needs ``g++`` (or ``$CXX``) with C++20; :func:`available` says whether it built.
"""
import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile

import numpy as np

from . import _source


def _registry():
    names = _source.all_name_expressions()
    lines = []
    for k, n in enumerate(names):
        lines.append(f"static void smx_emu_k{k}(void** a, int g, int b, int s, int c) "
                     f"{{ smx_emu_run_grid([&]() {{ smx_emu_call(&{n}, a); }}, g, b, s, c); }}")
    table = ",\n".join(f'    {{"{n}", &smx_emu_k{k}}}' for k, n in enumerate(names))
    lines.append("struct smx_emu_entry { const char* name; void (*fn)(void**, int, int, int, int); };")
    lines.append(f"static const smx_emu_entry smx_emu_table[] = {{\n{table}\n}};")
    lines.append(
        'extern "C" int smx_emu_launch(const char* name, void** args, int grid, int block, '
        "int smem, int maxconc) {\n"
        "    for (const auto& e : smx_emu_table) {\n"
        "        if (std::strcmp(e.name, name) == 0) { e.fn(args, grid, block, smem, maxconc); return 0; }\n"
        "    }\n    return 1;\n}\n")
    return "\n".join(lines)


def emulation_unit():
    return _source.emulation_source() + "\n#include <cstring>\n" + _registry()


@functools.lru_cache(maxsize=1)
def _library():
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        raise RuntimeError("no C++ compiler for the CUDA emulation (set CXX)")
    src = emulation_unit()
    key = hashlib.sha256(src.encode()).hexdigest()[:16]
    cache = os.path.join(tempfile.gettempdir(), f"smx_emu_{os.getuid()}")
    os.makedirs(cache, exist_ok=True)
    so = os.path.join(cache, f"smx_emu_{key}.so")
    if not os.path.exists(so):
        cpp = os.path.join(cache, f"smx_emu_{key}.cpp")
        with open(cpp, "w", encoding="utf-8") as f:
            f.write(src)
        tmp = so + f".{os.getpid()}.tmp"
        cmd = [cxx, "-std=c++20", "-O1", "-g", "-shared", "-fPIC", "-pthread", cpp, "-o", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"emulation build failed:\n{' '.join(cmd)}\n{proc.stderr[-4000:]}")
        os.replace(tmp, so)
    lib = ctypes.CDLL(so)
    lib.smx_emu_launch.restype = ctypes.c_int
    lib.smx_emu_launch.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p),
                                   ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    return lib


def available():
    try:
        _library()
        return True
    except Exception:
        return False


_SCALARS: dict = {
    np.dtype(np.int32): ctypes.c_int32,
    np.dtype(np.int64): ctypes.c_int64,
    np.dtype(np.float32): ctypes.c_float,
    np.dtype(np.float64): ctypes.c_double,
}


class EmulatedBackend:
    """The engine's backend interface over NumPy arrays and the emulation library.

    ``max_resident`` bounds the number of blocks running at once (a GPU runs
    as many as fit; the DTW pipeline must be correct with any number >= 1).
    """

    xp = np

    def __init__(self, max_resident=4):
        self.max_resident = int(max_resident)
        self.launches = []

    def launch(self, dtype, name, grid, block, args, shared_mem=0):
        keep = []
        ptrs = (ctypes.c_void_p * len(args))()
        for k, a in enumerate(args):
            if isinstance(a, np.ndarray):
                if not (a.flags.c_contiguous or a.ndim <= 1):
                    raise ValueError(f"argument {k} of {name} is not contiguous")
                holder = ctypes.c_void_p(a.ctypes.data)
            elif isinstance(a, np.generic):
                holder = _SCALARS[a.dtype](a.item())
            else:
                raise TypeError(f"argument {k} of {name}: uncast {type(a).__name__} {a!r}")
            keep.append(holder)
            ptrs[k] = ctypes.cast(ctypes.pointer(holder), ctypes.c_void_p)
        self.launches.append((name, int(grid), int(block), int(shared_mem)))
        rc = _library().smx_emu_launch(name.encode(), ptrs, int(grid), int(block),
                                       int(shared_mem), self.max_resident)
        if rc != 0:
            raise KeyError(f"kernel {name} is not in the module")
