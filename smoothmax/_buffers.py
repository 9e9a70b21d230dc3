"""Reused output buffers and workspaces of the compiled engine.

A large NumPy result (``E``, ``Edot``: the shape of ``theta``) is a fresh
allocation on every call, and above glibc's largest mmap threshold (32 MiB)
every fresh allocation is new pages that the kernel zeroes on first touch:
about a third of a CRF gradient's time at 32 x 128 x 64 x 64 float64 went to
page clearing. Training loops call the engine again and again with one shape,
so the engine keeps the last few large blocks and hands one out again once
nothing refers to it any more. The kernels' large workspaces (the DTW
weights, the feature DTW's checkpoints) come from the same blocks
(``workspace``): one cache, one limit, one ``clear``.

A block is a uint8 NumPy array owned by this module; results are
``np.frombuffer`` views of it, so every array made from a result (views,
``torch.from_numpy``, DLPack exports) holds a reference to the block, and a
block is reused only when this module's references are the only ones left.
Blocks come back uninitialised: the kernels write every entry of a result
they are given (docs/engines.md) and every workspace entry they read.

New blocks are plain ``np.empty`` memory. Advising them for transparent huge
pages (``MADV_HUGEPAGE``) was tried and measured, one thread, float64, on
the benchmark VM: a first ``dtw_grad`` at 4096² got faster (0.60 s against
0.88 s), but warm calls on a reused huge-page workspace got slower (the same
``dtw_grad``: 338-473 ms against 281-333 ms on 4 KiB pages, and 288-328 ms
for commit 4098f52, before issue 11), and a result block that is new on every call
(every result kept) cost a Viterbi gradient at 32 x 128 x 64 x 64 112-138 ms
against 60 ms. Training loops are warm calls.

Blocks start at 256 KiB (``MIN_BYTES``), results and workspaces alike.
Below, malloc reuses its own memory. Above glibc's first mmap threshold
(128 KiB) it does not reliably: it serves the next allocation from a heap it
has trimmed after the last call, or from a new mapping, and either way the
pages are new. Measured on the benchmark VM: a float64 ``dtw_hvp`` at
2 x 200^2 (``E`` and ``Edot`` 640 KB each) took 280 page faults a call and
2.6-3.3 ms on one thread with ``np.empty`` results, and no page faults and
1.6 ms with kept blocks (its float32 twin, 320 KB results, never faulted).
(The threshold was 16 MiB for results and 1 MiB for workspaces before.)

``SMOOTHMAX_BUFFER_CACHE_MB`` (default 1024) caps the bytes kept, and at
most ``MAX_BLOCKS`` blocks are kept (the search for a free one is a loop in
Python); 0 turns reuse off. ``smoothmax.clear_cache()`` forgets every kept block.
"""
import math
import os
import sys
import threading

import numpy as np

MIN_BYTES = 1 << 18
MAX_BLOCKS = 64
DEFAULT_MB = 1024
_lock = threading.Lock()
_blocks: list = []  # least recently used first


def _limit():
    try:
        return max(0, int(os.environ.get("SMOOTHMAX_BUFFER_CACHE_MB", str(DEFAULT_MB)))) << 20
    except ValueError:
        return DEFAULT_MB << 20


def _fresh(nbytes):
    """A new uint8 block of ``nbytes`` (uninitialised)."""
    return np.empty(nbytes, np.uint8)


def empty(shape, dtype):
    """An uninitialised C-contiguous array, from a reused block when large
    (``MIN_BYTES`` and up)."""
    dtype = np.dtype(dtype)
    count = math.prod(shape)
    nbytes = count * dtype.itemsize
    if nbytes < MIN_BYTES:
        return np.empty(shape, dtype)  # before reading the environment: a small call's fixed cost
    limit = _limit()
    if nbytes > limit:
        return np.frombuffer(_fresh(nbytes), dtype, count=count).reshape(shape)
    with _lock:
        found = None
        for k in range(len(_blocks)):
            # free: the only references are _blocks and getrefcount's argument
            if nbytes <= _blocks[k].nbytes <= 2 * nbytes and sys.getrefcount(_blocks[k]) <= 2:
                found = _blocks.pop(k)
                break
        if found is None:
            held = nbytes + sum(b.nbytes for b in _blocks)
            # drop the least recently used first (one in use stays with its arrays)
            while _blocks and (held > limit or len(_blocks) >= MAX_BLOCKS):
                held -= _blocks.pop(0).nbytes
            found = _fresh(nbytes)
        _blocks.append(found)
    return np.frombuffer(found, dtype, count=count).reshape(shape)


def workspace(n, dtype):
    """A kernel's workspace of ``n`` entries of ``dtype`` (uninitialised), from
    the kept blocks from ``MIN_BYTES`` as results are. It is free for reuse
    once the caller drops it."""
    return empty((max(int(n), 0),), dtype)


def clear():
    """Forget every kept block (the memory goes back once results are gone)."""
    with _lock:
        _blocks.clear()


def held_bytes():
    """Bytes of the blocks kept now (in use or free)."""
    with _lock:
        return sum(b.nbytes for b in _blocks)


def pass_outputs(out, B, shape, dtype, mode, written, placeholder):
    """The ``(value (B,), E, Edot)`` arrays a compiled pass writes into.

    ``mode`` is 0 (value), 1 (gradient) or 2 (HVP): ``E`` exists from mode 1,
    ``Edot`` in mode 2; an absent one is an empty array of shape
    ``placeholder``. ``written``: the kernel writes every entry of ``E`` and
    ``Edot`` (otherwise they start at zero). ``out`` is ``None`` (new arrays,
    the large ones from reused blocks when ``written``) or the caller's
    ``(value, E, Edot)``, C-contiguous, of ``dtype``, ``E``/``Edot`` of
    ``shape`` or ``None`` where the mode has none (the XLA FFI handler passes
    XLA's result buffers this way).
    """
    absent = np.empty(placeholder, dtype)
    if out is None:
        alloc = empty if written else np.zeros
        return (np.empty(B, dtype), alloc(shape, dtype) if mode >= 1 else absent,
                alloc(shape, dtype) if mode == 2 else absent)
    value, E, Ed = out
    E = absent if E is None else E
    Ed = absent if Ed is None else Ed
    if not written:
        E[...] = 0
        Ed[...] = 0
    return value, E, Ed
