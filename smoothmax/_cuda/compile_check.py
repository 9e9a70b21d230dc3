"""Compile every kernel instantiation with nvcc, without needing a GPU.

``python -m smoothmax._cuda.compile_check [--arch sm_90] [--keep DIR]``
writes the exact source the CuPy launcher compiles, plus a host table that
takes the address of every name expression (which forces each template
instantiation), and runs ``nvcc -arch=<arch> -c`` on it. Exit status 0 on
success, 1 on a compile error, 2 when nvcc is missing.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile

from . import _source


def instantiation_unit():
    names = _source.all_name_expressions()
    table = ",\n".join(f"    (const void*)&{n}" for n in names)
    return (
        _source.cuda_source()
        + "\n// ---- explicit instantiations (the launcher's name expressions)\n"
        + f"const void* smx_all_kernels[] = {{\n{table}\n}};\n"
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--keep", default=None, help="directory to keep the .cu and the object in")
    ap.add_argument("--nvcc", default=shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc")
    args = ap.parse_args(argv)
    if not os.path.exists(args.nvcc):
        print(f"compile_check: nvcc not found (looked for {args.nvcc!r})", file=sys.stderr)
        return 2
    workdir = args.keep or tempfile.mkdtemp(prefix="smx_cuda_")
    os.makedirs(workdir, exist_ok=True)
    cu = os.path.join(workdir, "smx_all.cu")
    with open(cu, "w", encoding="utf-8") as f:
        f.write(instantiation_unit())
    cmd = [args.nvcc, f"-arch={args.arch}", "-std=c++17", "-O3", "-Werror", "all-warnings",
           "-c", cu, "-o", os.path.join(workdir, "smx_all.o"), "-Xptxas", "-warn-spills"]
    cmd = [c for c in cmd if c != "all-warnings"]
    cmd.insert(cmd.index("-Werror") + 1, "all-warnings")
    n = len(_source.all_name_expressions())
    print(f"compile_check: {n} kernels, {' '.join(cmd)}")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    if proc.returncode != 0:
        print(f"compile_check: FAILED (nvcc exit {proc.returncode}); source in {cu}", file=sys.stderr)
        return 1
    print(f"compile_check: OK ({n} kernels for {args.arch})")
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
