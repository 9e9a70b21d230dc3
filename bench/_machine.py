"""Describe the machine a benchmark ran on: CPU, cores, ISA, library versions, commit.

Used by ``bench_cpu.py`` to stamp every results file, so that a number can
always be traced to the hardware and the code that produced it.
"""
import importlib.metadata
import os
import platform
import subprocess
import sys
import time

_ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512dq", "avx512bw", "avx512vl",
              "avx512_fp16", "amx_tile")
_PACKAGES = ("smoothmax", "numpy", "cython", "torch", "jax", "jaxlib", "numba", "tslearn",
             "soft-dtw", "ott-jax", "pysdtw", "pytorch-crf", "torch-struct")


def _cpuinfo():
    model, flags, ident = None, set(), {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                key = key.strip()
                if key == "model name" and model is None:
                    model = val.strip()
                elif key == "flags" and not flags:
                    flags = set(val.split())
                elif key in ("vendor_id", "cpu family", "model", "stepping") and key not in ident:
                    ident[key] = val.strip()
    except OSError:
        pass
    if model is None or not flags:
        try:
            out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
            for line in out.splitlines():
                key, _, val = line.partition(":")
                if key.strip() == "Model name" and model is None:
                    model = val.strip()
                elif key.strip() == "Flags" and not flags:
                    flags = set(val.split())
        except (OSError, subprocess.SubprocessError):
            pass
    return model or platform.processor() or "unknown", flags, ident


def _cache_sizes():
    sizes = {}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return sizes
    for line in out.splitlines():
        key, _, val = line.partition(":")
        key = key.strip()
        if key.endswith("cache"):
            sizes[key.replace(" cache", "")] = val.strip()
    return sizes


def _version(pkg):
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args, root=None):
    here = root or os.path.dirname(os.path.abspath(__file__))
    try:
        return subprocess.run(["git", "-C", here, *args], capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def smoothmax_engine():
    """Which CPU engine smoothmax really runs for NumPy arrays: compiled or reference."""
    try:
        from smoothmax import _dispatch
    except ImportError as exc:
        return f"unavailable ({exc})"
    return "compiled" if _dispatch.compiled_available() else "reference (pure array fallback)"


def describe(root=None):
    """A JSON-serialisable description of the machine and the software versions.

    ``root``: the checkout whose commit is recorded (default: this one).
    """
    model, flags, ident = _cpuinfo()
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    dirty = _git("status", "--porcelain", "--untracked-files=no", root=root)
    return {
        "cpu": model,
        "cpu_id": ident,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "isa": [f for f in _ISA_FLAGS if f in flags],
        "caches": _cache_sizes(),
        "hypervisor": "hypervisor" in flags,
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": {p: _version(p) for p in _PACKAGES},
        "smoothmax_engine": smoothmax_engine(),
        "git_commit": _git("rev-parse", "HEAD", root=root),
        "git_dirty": bool(dirty),
        "loadavg_at_start": list(load) if load else None,
    }


def one_line(m):
    """A short human line: ``Intel Xeon ..., 2 cpus (avx2, avx512f), commit abc1234``."""
    isa = ", ".join(f for f in m["isa"] if f in ("avx2", "avx512f"))
    commit = (m["git_commit"] or "?")[:7] + ("+dirty" if m["git_dirty"] else "")
    return f"{m['cpu']}, {m['logical_cpus']} logical CPUs ({isa}), commit {commit}"


class BusyCore:
    """A co-tenant: a process spinning on one CPU (the last usable one) while the
    block runs (bench_core, bench_threads and bench_e2e use it)."""

    def __enter__(self):
        cpu = sorted(os.sched_getaffinity(0))[-1] if hasattr(os, "sched_getaffinity") else None
        code = ("import os\n" + (f"os.sched_setaffinity(0, {{{cpu}}})\n" if cpu is not None else "")
                + "x = 0\nwhile True:\n    x += 1\n")
        self.proc = subprocess.Popen([sys.executable, "-c", code])
        self.cpu = cpu
        time.sleep(0.2)  # let it start spinning
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()


if __name__ == "__main__":
    import json

    print(json.dumps(describe(), indent=2))
