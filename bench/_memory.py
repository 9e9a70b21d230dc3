"""Peak memory of one call: the growth of the resident set's high-water mark (Linux).

Used by ``bench_long.py`` and ``examples/long_alignment.py``. glibc's
dynamic mmap threshold is fixed first (large blocks always mmapped, and
given back when freed), so memory freed earlier in the process is not
silently reused and hidden from the measurement.
"""
import ctypes
import resource
import time


def fix_mmap_threshold():
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _vm(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def cpu_seconds():
    """User + system CPU time of this process so far (less sensitive than wall time to other
    jobs on a shared machine)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measured(fn):
    """``(fn(), seconds, peak_bytes, reset)``: wall time and the high-water resident set during
    the call minus the resident set just before it; ``reset`` says whether the mark could be
    reset first (``/proc/self/clear_refs``; otherwise the peak may include earlier memory)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    base = _vm("VmRSS")
    t = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t
    return out, seconds, max(0, _vm("VmHWM") - base), reset
