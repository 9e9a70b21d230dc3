"""Build the compiled CPU core (Cython in C++17 mode, fused float32/float64, OpenMP when available)."""
import os
import sys
import tempfile
import subprocess

import numpy as np
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def _has_openmp(compiler_cmd):
    """Compile a tiny OpenMP program to see whether the compiler supports it."""
    src = "#include <omp.h>\nint main(void){return omp_get_max_threads() > 0 ? 0 : 1;}\n"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "t.c")
        with open(path, "w") as f:
            f.write(src)
        try:
            res = subprocess.run(
                [compiler_cmd, "-fopenmp", path, "-o", os.path.join(tmp, "t")],
                capture_output=True,
            )
        except OSError:
            return False
        return res.returncode == 0


class BuildExt(build_ext):
    def build_extensions(self):
        cc = self.compiler.compiler[0] if hasattr(self.compiler, "compiler") else "cc"
        openmp = os.environ.get("SMOOTHMAX_OPENMP", "1") != "0" and _has_openmp(cc)
        if self.compiler.compiler_type == "msvc":
            args, link = ["/O2"] + (["/openmp"] if openmp else []), []
            cxx17 = ["/std:c++17"]
        else:
            args = ["-O3", "-fno-math-errno", "-fno-trapping-math"]
            cxx17 = ["-std=c++17"]
            if os.environ.get("SMOOTHMAX_NATIVE", "0") == "1":
                args.append("-march=native")
            link = []
            if openmp:
                args.append("-fopenmp")
                link.append("-fopenmp")
        for ext in self.extensions:
            std = cxx17 if ext.language == "c++" else []
            ext.extra_compile_args = args + std + ext.extra_compile_args
            ext.extra_link_args = link + ext.extra_link_args
        print(f"smoothmax: building with OpenMP={'on' if openmp else 'off'}", file=sys.stderr)
        super().build_extensions()

    def copy_extensions_to_source(self):
        # --inplace: remove the old module first, so that a process running it
        # keeps its (now unlinked) file instead of seeing it rewritten under it
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            try:
                inplace_file, _ = self._get_inplace_equivalent(build_py, ext)
            except AttributeError:  # a setuptools without this helper: copy over
                break
            if os.path.exists(inplace_file):
                os.unlink(inplace_file)
        super().copy_extensions_to_source()


def _xla_ffi_include():
    """The folder holding ``xla/ffi/api/c_api.h``, or None (then the FFI handlers are not built).

    ``SMOOTHMAX_XLA_FFI=0`` turns them off; ``SMOOTHMAX_XLA_FFI_INCLUDE`` names
    the folder (e.g. for an isolated build: ``python -c "import jax.ffi;
    print(jax.ffi.include_dir())"``); otherwise ``jax.ffi.include_dir()`` when
    JAX can be imported by the build.
    """
    if os.environ.get("SMOOTHMAX_XLA_FFI", "1") == "0":
        return None
    path = os.environ.get("SMOOTHMAX_XLA_FFI_INCLUDE")
    if not path:
        try:
            import jax.ffi

            path = jax.ffi.include_dir()
        except Exception:  # no JAX (or one without jax.ffi): NumPy-only build
            return None
    if not os.path.exists(os.path.join(path, "xla", "ffi", "api", "c_api.h")):
        print(f"smoothmax: no xla/ffi/api/c_api.h under {path}", file=sys.stderr)
        return None
    return path


def _extensions():
    from Cython.Build import cythonize

    names = ["pool", "dtw", "dtwf", "viterbi", "dag", "crf"]
    exts = [
        Extension(
            f"smoothmax._core.{name}",
            [f"smoothmax/_core/{name}.pyx"],
            # C++17: the operator templates of include/smx_ops.hpp (shared with
            # the CUDA kernels) and the kernel templates of simd.h
            language="c++",
            # rebuilt when these change, and shipped in the sdist (which
            # otherwise holds only the generated .cpp, not the .pyx cythonize needs)
            depends=[f"smoothmax/_core/{name}.pyx", "smoothmax/_core/simd.h",
                     "smoothmax/_core/include/smx_ops.hpp",
                     "smoothmax/_core/operators.pxd", "smoothmax/_core/crf_simd.h",
                     "smoothmax/_core/band.pxd", "smoothmax/_core/dtw_kernels.pxd",
                     "smoothmax/_core/costs.h", "smoothmax/_core/pool.h",
                     "smoothmax/_core/pool.pxd"],
            include_dirs=["smoothmax/_core", np.get_include()],
            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        )
        for name in names
    ]
    xla_include = _xla_ffi_include()
    if xla_include:
        # the XLA FFI handlers for jax.jit (optional: needs JAX's C headers)
        exts.append(Extension(
            "smoothmax._core.xla_ffi", ["smoothmax/_core/xla_ffi.pyx"],
            depends=["smoothmax/_core/xla_ffi.pyx"],
            include_dirs=[xla_include],
        ))
    print(f"smoothmax: XLA FFI handlers {'from ' + xla_include if xla_include else 'not built'}",
          file=sys.stderr)
    return cythonize(
        exts,
        compiler_directives={
            "language_level": 3,
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    )


setup(ext_modules=_extensions(), cmdclass={"build_ext": BuildExt})
