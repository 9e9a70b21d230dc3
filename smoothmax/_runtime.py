"""Process-wide settings of the compiled CPU engine: its threads and its kept memory.

See docs/threads.md. The compiled engine runs its batch loops and DTW
wavefronts on one pool of threads per process (``smoothmax/_core/pool.h``);
the thread count a call may use is, in order:

1. ``set_num_threads(n)`` when called with an ``n``;
2. the environment variable ``SMOOTHMAX_NUM_THREADS`` (read when the engine loads);
3. OpenMP's limit for the calling thread: ``OMP_NUM_THREADS``,
   ``threadpoolctl.threadpool_limits``, else the CPUs the process may use
   (1 in a build without OpenMP).

Each call then uses no more threads than its work can keep busy (one for
small work, at most one per batch item or tile), and runs on the calling
thread alone for a while when another process holds a core it was given.
"""
import importlib
import numbers
from types import ModuleType
from typing import Optional

from . import _buffers


def _pool() -> Optional[ModuleType]:
    try:
        return importlib.import_module("smoothmax._core.pool")
    except ImportError:  # no compiled engine: nothing runs threads
        return None


def set_num_threads(n: Optional[int]) -> None:
    """Set how many threads the compiled CPU engine may use in this process.

    Parameters
    ----------
    n : int >= 1 or None
        The most threads a call may use (a call uses fewer when its work is
        small: docs/threads.md). ``None`` returns to the default: the
        ``SMOOTHMAX_NUM_THREADS`` environment variable when set, else
        OpenMP's limit (``OMP_NUM_THREADS``, ``threadpoolctl``).

    Returns
    -------
    None

    Examples
    --------
    >>> import smoothmax
    >>> smoothmax.set_num_threads(1)
    >>> smoothmax.get_num_threads()
    1
    >>> smoothmax.set_num_threads(None)
    """
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, numbers.Integral):
            raise TypeError(f"n must be None or a positive integer, got {n!r}")
        n = int(n)
        if n < 1:
            raise ValueError(f"n must be None or a positive integer, got {n}")
    pool = _pool()
    if pool is not None:
        pool.set_setting(pool.env_setting() if n is None else min(n, pool.MAX_THREADS))


def get_num_threads() -> int:
    """The most threads a call of the compiled CPU engine may use now.

    Returns
    -------
    int
        ``set_num_threads``'s value when set, else ``SMOOTHMAX_NUM_THREADS``,
        else OpenMP's limit for the calling thread (``OMP_NUM_THREADS``,
        ``threadpoolctl``); 1 without the compiled engine.

    Examples
    --------
    >>> import smoothmax
    >>> smoothmax.get_num_threads() >= 1
    True
    """
    pool = _pool()
    return 1 if pool is None else int(pool.get_num_threads())


def clear_cache() -> None:
    """Release the memory the compiled engine keeps between calls.

    Large results and workspaces (256 KiB and up: DTW weights, feature-DTW
    checkpoints, ``E``/``Edot`` blocks) are kept for the next call of the
    same size, up to ``SMOOTHMAX_BUFFER_CACHE_MB`` (default 1024) in all.
    This forgets every kept block; the memory returns to the system once no
    result refers to it.

    Returns
    -------
    None

    Examples
    --------
    >>> import numpy as np, smoothmax
    >>> _ = smoothmax.dtw_grad(np.random.rand(1, 2100, 2100))
    >>> smoothmax.clear_cache()
    """
    _buffers.clear()
