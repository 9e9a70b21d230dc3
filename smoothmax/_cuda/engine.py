"""GPU engine: the functions of ``docs/engines.md`` on CuPy arrays.

Python owns validation-free bookkeeping here (the public layer validated the
arguments): it allocates outputs and scratch on the device of ``theta``,
casts every scalar to the exact C type of the kernel parameter, and launches
on CuPy's current stream (callers wrap torch's current stream around the
call). Kernels (``smx_*.cu``) are compiled once per (device, dtype) through
``cupy.RawModule`` with stable name expressions, so CuPy's disk cache hits.

The launch logic is written against a small *backend* (``xp`` plus
``launch``) so that the CPU emulation of the kernels (``emulate.py``, NumPy
arrays) runs exactly the same code path in the tests.

Memory (docs/gpu.md): value-only DTW needs ``B*ceil(NA/32)*NB`` values for
the strip edges; the gradient adds two local weights a cell (q_up, q_left),
``2*B*32*ceil(NA/32)*(NB+31)`` values (about 2*B*NA*NB); the HVP keeps all three
and their tangents qdot (about 6*B*NA*NB).
"""
import functools

import numpy as np

from . import _source

_WARP = 32
_VIT_MAX_WARPS = 8
_SMEM_LIMIT = 48 * 1024


def _np_dtype(dtype):
    dt = np.dtype(dtype)
    if dt not in (np.float32, np.float64):
        raise TypeError(f"theta: expected float32 or float64, got {dt}")
    return dt


def _ctype_scalar(dt, x):
    return dt.type(x)


class CupyBackend:
    """Launches on the current CuPy device and stream."""

    def __init__(self):
        import cupy

        self.xp = cupy

    def launch(self, dtype, name, grid, block, args, shared_mem=0):
        dev = self.xp.cuda.Device().id
        fn = _kernel(dev, np.dtype(dtype).name, name)
        fn((int(grid),), (int(block),), args, shared_mem=int(shared_mem))


@functools.lru_cache(maxsize=None)
def _module(device_id, dtype_name):
    import cupy

    with cupy.cuda.Device(device_id):
        return cupy.RawModule(
            code=_source.cuda_source(),
            options=("-std=c++17",),
            name_expressions=list(_source.name_expressions(dtype_name)),
        )


@functools.lru_cache(maxsize=None)
def _kernel(device_id, dtype_name, name):
    import cupy

    with cupy.cuda.Device(device_id):
        return _module(device_id, dtype_name).get_function(name)


@functools.lru_cache(maxsize=1)
def _cupy_backend():
    return CupyBackend()


def _ctype(dt):
    return _source.CTYPES[dt.name]


def _gamma(dt, reg, gamma):
    # the hard operator ignores gamma; keep 1/gamma finite in the kernels
    return dt.type(1.0 if int(reg) == 2 else float(gamma))


def _ints(xp, a):
    return xp.ascontiguousarray(xp.asarray(a), dtype=xp.int64)


# ---------------------------------------------------------------------------
# DTW


def _nstrips(NA):
    return (NA + _WARP - 1) // _WARP


def dtw_run(be, theta, Z, la, lb, band, reg, gamma, mode):
    """Forward (and backward for mode >= 1) DTW; mode 0 value, 1 grad, 2 hvp.

    Returns ``value`` for mode 0, ``(value, E)`` for mode 1 and
    ``(value, E, Edot)`` for mode 2.
    """
    xp = be.xp
    dt = _np_dtype(theta.dtype)
    theta = xp.ascontiguousarray(theta)
    B, NA, NB = (int(s) for s in theta.shape)
    value = xp.empty((B,), dtype=dt)
    if mode >= 1:
        E = xp.empty((B, NA, NB), dtype=dt)
    if mode == 2:
        Edot = xp.empty((B, NA, NB), dtype=dt)
    if B == 0 or NA == 0 or NB == 0:
        out = (value,) + ((E,) if mode >= 1 else ()) + ((Edot,) if mode == 2 else ())
        return out[0] if mode == 0 else out
    la = _ints(xp, la)
    lb = _ints(xp, lb)
    reg = int(reg)
    c = _ctype(dt)
    ns = _nstrips(NA)
    dummy = xp.empty((1,), dtype=dt)
    Z = xp.ascontiguousarray(Z) if mode == 2 else dummy
    edge = xp.empty((B * ns * NB,), dtype=dt)
    edged = xp.empty((B * ns * NB,), dtype=dt) if mode == 2 else dummy
    nsync = 1 + B * ns
    sync = xp.zeros((2 * nsync,), dtype=np.int32)
    # weights kept a cell: (q_up, q_left) for the gradient, all three for the HVP
    qsize = B * ns * (NB + 31) * (3 if mode == 2 else 2) * _WARP
    qbuf = xp.empty((qsize,), dtype=dt) if mode >= 1 else dummy
    qdbuf = xp.empty((qsize,), dtype=dt) if mode == 2 else dummy
    i32 = np.int32
    be.launch(dt, _source.dtw_fwd_name(c, reg, mode), B * ns, _WARP,
              (theta, Z, la, lb, i32(B), i32(NA), i32(NB), i32(band), _gamma(dt, reg, gamma),
               i32(ns), value, qbuf, qdbuf, edge, edged, sync[:nsync]))
    if mode == 0:
        return value
    Ed = Edot if mode == 2 else dummy
    be.launch(dt, _source.dtw_bwd_name(c, reg, mode), B * ns, _WARP,
              (la, lb, i32(B), i32(NA), i32(NB), i32(ns), value, qbuf, qdbuf, E, Ed,
               edge, edged, sync[nsync:]))
    if mode == 1:
        return value, E
    return value, E, Edot


# ---------------------------------------------------------------------------
# DTW between features (smx_dtwf.cu): segments of strips, linear memory


def dtwf_segment_strips(NA, NB):
    """Strips of 32 rows per segment, ``K``.

    The weights of a segment take ``64·K·(NB + 31)`` values (two a cell) and
    the checkpoint rows ``⌈ns/K⌉·NB`` (``ns = ⌈NA/32⌉`` strips), which balance
    at ``K = √(ns/64)``; four times that keeps more SMs busy (the strips of a
    segment run concurrently) for four times the weights. At least 1, at most
    all strips.
    """
    ns = _nstrips(NA)
    return max(1, min(ns, int(np.ceil(np.sqrt(ns / 64.0))) * 4))


def dtwf_run(be, X, Y, la, lb, band, reg, gamma, cost, grad, K=None):
    """DTW_Ω between features ``X (B, NA, d)``, ``Y (B, NB, d)``; ``cost`` code 0/1/2.

    Returns ``value`` or ``(value, Gx, Gy)`` (the raw kernel sums; for the
    cosine cost the caller normalises the rows first and scales the sums,
    as ``smoothmax._dispatch.run_features`` does for the CPU kernel). The
    forward runs segment by segment (``K`` strips of 32 rows each), keeping
    the R row above every segment; the gradient recomputes each segment from
    its row, storing its weights, and runs it backward: memory
    ``O(B·NB·(NA/(32K) + 64K))`` values instead of ``O(B·NA·NB)``.
    """
    xp = be.xp
    dt = _np_dtype(X.dtype)
    X = xp.ascontiguousarray(X)
    Y = xp.ascontiguousarray(Y)
    B, NA, d = (int(v) for v in X.shape)
    NB = int(Y.shape[1])
    value = xp.full((B,), np.inf, dtype=dt)
    ns = _nstrips(NA)
    K = dtwf_segment_strips(NA, NB) if K is None else max(1, min(int(K), ns))
    starts = list(range(0, ns, K))
    la = _ints(xp, la)
    lb = _ints(xp, lb)
    c = _ctype(dt)
    i32 = np.int32
    g = _gamma(dt, reg, gamma)
    dummy = xp.empty((1,), dtype=dt)
    ebuf = xp.empty((B * (K + 1) * NB,), dtype=dt)
    sync = xp.zeros((1 + B * (K + 1),), dtype=np.int32)

    def slots(nseg):
        """The edge buffer as (B, nseg + 1, NB), the layout the kernels index, and its sync."""
        return ebuf[:B * (nseg + 1) * NB].reshape(B, nseg + 1, NB), sync[:1 + B * (nseg + 1)]

    def forward(s0, mode, qbuf, row_in):
        nseg = min(K, ns - s0)
        ev, sv = slots(nseg)
        ev[:, 0, :] = row_in
        sv[...] = 0
        sv[1::nseg + 1] = NB  # slot 0 (the input) of every item is ready
        be.launch(dt, _source.dtwf_fwd_name(c, int(reg), int(cost), mode), B * nseg, _WARP,
                  (X, Y, la, lb, i32(B), i32(NA), i32(NB), i32(d), i32(band), g, i32(s0), i32(nseg),
                   value, qbuf, ev.reshape(-1), sv))
        return ev[:, nseg, :].copy()  # the row below the segment: the next one's input

    row = xp.full((B, NB), np.inf, dtype=dt)
    checkpoints = []
    for s0 in starts:
        checkpoints.append(row)
        row = forward(s0, 0, dummy, row)
    if not grad:
        return value
    gx = xp.zeros((B, NA, d), dtype=dt)
    gy = xp.zeros((B, NB, d), dtype=dt)
    qbuf = xp.empty((B * K * (NB + 31) * 2 * _WARP,), dtype=dt)  # (q_up, q_left) a cell
    carry = xp.zeros((B, NB), dtype=dt)
    for s0, row in reversed(list(zip(starts, checkpoints))):
        nseg = min(K, ns - s0)
        forward(s0, 1, qbuf, row)
        bv, sv = slots(nseg)
        bv[...] = 0
        bv[:, nseg, :] = carry  # products sent up by the segment below
        sv[...] = 0
        sv[1 + nseg::nseg + 1] = NB
        be.launch(dt, _source.dtwf_bwd_name(c, int(reg), int(cost)), B * nseg, _WARP,
                  (X, Y, la, lb, i32(B), i32(NA), i32(NB), i32(d), i32(s0), i32(nseg), value, qbuf,
                   gx, gy, bv.reshape(-1), sv))
        carry = bv[:, 0, :].copy()
    return value, gx, gy


# ---------------------------------------------------------------------------
# Viterbi


def _vit_block(S):
    return _WARP * max(1, min(_VIT_MAX_WARPS, S))


def _vit_scratch(xp, dt, B, S):
    """Shared memory bytes, scratch array and its flag for 8*S values per block."""
    nbytes = 8 * S * dt.itemsize
    if nbytes <= _SMEM_LIMIT:
        return nbytes, xp.empty((1,), dtype=dt), np.int32(0)
    return 0, xp.empty((B * 8 * S,), dtype=dt), np.int32(1)


def vit_run(be, theta, Z, lengths, reg, gamma, mode):
    xp = be.xp
    dt = _np_dtype(theta.dtype)
    theta = xp.ascontiguousarray(theta)
    B, T, S, S2 = (int(s) for s in theta.shape)
    value = xp.empty((B,), dtype=dt)
    E = xp.empty((B, T, S, S), dtype=dt) if mode >= 1 else None
    Edot = xp.empty((B, T, S, S), dtype=dt) if mode == 2 else None
    if B == 0 or T == 0 or S == 0:
        out = tuple(a for a in (value, E, Edot) if a is not None)
        return out[0] if mode == 0 else out
    lengths = _ints(xp, lengths)
    reg = int(reg)
    dummy = xp.empty((1,), dtype=dt)
    smem, work, use_work = _vit_scratch(xp, dt, B, S)
    i32 = np.int32
    be.launch(dt, _source.vit_name(_ctype(dt), reg, mode), B, _vit_block(S),
              (theta, xp.ascontiguousarray(Z) if mode == 2 else dummy, lengths,
               i32(B), i32(T), i32(S), _gamma(dt, reg, gamma), value,
               E if mode >= 1 else dummy, Edot if mode == 2 else dummy, work, use_work),
              shared_mem=smem)
    if mode == 0:
        return value
    if mode == 1:
        return value, E
    return value, E, Edot


def vit_decode_run(be, theta, lengths):
    xp = be.xp
    dt = _np_dtype(theta.dtype)
    theta = xp.ascontiguousarray(theta)
    B, T, S, _ = (int(s) for s in theta.shape)
    score = xp.empty((B,), dtype=dt)
    tags = xp.empty((B, T), dtype=np.int64)
    if B == 0 or T == 0 or S == 0:
        return score, tags
    lengths = _ints(xp, lengths)
    bp = xp.empty((B * T * S,), dtype=np.int32)
    smem, work, use_work = _vit_scratch(xp, dt, B, S)
    i32 = np.int32
    be.launch(dt, _source.vit_decode_name(_ctype(dt)), B, _vit_block(S),
              (theta, lengths, i32(B), i32(T), i32(S), score, tags, bp, work, use_work),
              shared_mem=smem)
    return score, tags


# ---------------------------------------------------------------------------
# The engine functions (docs/engines.md), on CuPy arrays


def dtw_value(theta, la, lb, band, reg, gamma):
    return dtw_run(_cupy_backend(), theta, None, la, lb, band, reg, gamma, 0)


def dtw_grad(theta, la, lb, band, reg, gamma):
    return dtw_run(_cupy_backend(), theta, None, la, lb, band, reg, gamma, 1)


def dtw_hvp(theta, Z, la, lb, band, reg, gamma):
    return dtw_run(_cupy_backend(), theta, Z, la, lb, band, reg, gamma, 2)


def dtw_path(theta, la, lb, band):
    return dtw_run(_cupy_backend(), theta, None, la, lb, band, 2, 1.0, 1)


def viterbi_value(theta, lengths, reg, gamma):
    return vit_run(_cupy_backend(), theta, None, lengths, reg, gamma, 0)


def viterbi_grad(theta, lengths, reg, gamma):
    return vit_run(_cupy_backend(), theta, None, lengths, reg, gamma, 1)


def viterbi_hvp(theta, Z, lengths, reg, gamma):
    return vit_run(_cupy_backend(), theta, Z, lengths, reg, gamma, 2)


def viterbi_decode(theta, lengths):
    return vit_decode_run(_cupy_backend(), theta, lengths)


# ---------------------------------------------------------------------------
# Factorised Viterbi (CRF): smx_crf.cu; the functions of smoothmax._core.crf


def crf_run(be, emissions, transitions, start, end, lengths, weights, reg, gamma, mode, Z=None):
    """mode 0: ``value``; 1: ``(value, ge, gA, gs, gen)``; 2: ``(vdot, he, hA, hs, hen)``.

    Scratch: ``B·(2·T·S + 2·S² + 5·S)`` values (V and Vdot histories, one
    step's weights), never ``(B, T, S, S)``.
    """
    xp = be.xp
    dt = _np_dtype(emissions.dtype)
    em = xp.ascontiguousarray(emissions)
    B, T, S = (int(s) for s in em.shape)

    def cast(a, shape):
        return xp.ascontiguousarray(xp.asarray(a, dtype=dt).reshape(shape))

    At = xp.ascontiguousarray(cast(transitions, (S, S)).T)
    st, en = cast(start, (S,)), cast(end, (S,))
    value = xp.empty((B,), dtype=dt)
    vdot = xp.empty((B,), dtype=dt)
    ge = xp.empty((B, T, S), dtype=dt)
    part = xp.zeros((B, S * S + 2 * S), dtype=dt)
    if B > 0 and T > 0 and S > 0:
        dummy = xp.empty((1,), dtype=dt)
        if mode == 2:
            Ze = cast(Z[0], (B, T, S))
            ZAt = xp.ascontiguousarray(cast(Z[1], (S, S)).T)
            Zs, Zen = cast(Z[2], (S,)), cast(Z[3], (S,))
        else:
            Ze = ZAt = Zs = Zen = dummy
        w = xp.ones((B,), dtype=dt) if weights is None else cast(weights, (B,))
        work = xp.empty((B * (2 * T * S + 2 * S * S + 5 * S),), dtype=dt)
        i32 = np.int32
        be.launch(dt, _source.crf_name(_ctype(dt), int(reg), mode), B, _vit_block(S),
                  (em, Ze, At, ZAt, st, en, Zs, Zen, _ints(xp, lengths), w, i32(B), i32(T), i32(S),
                   _gamma(dt, reg, gamma), value, vdot, ge, part, work))
    if mode == 0:
        return value
    tot = part.sum(axis=0)
    gA = xp.ascontiguousarray(tot[:S * S].reshape(S, S).T)
    return (vdot if mode == 2 else value, ge, gA, tot[S * S:S * S + S], tot[S * S + S:])


def crf_decode_run(be, emissions, transitions, start, end, lengths):
    xp = be.xp
    dt = _np_dtype(emissions.dtype)
    em = xp.ascontiguousarray(emissions)
    B, T, S = (int(s) for s in em.shape)
    score = xp.empty((B,), dtype=dt)
    tags = xp.empty((B, T), dtype=np.int64)
    if B == 0 or T == 0 or S == 0:
        return score, tags
    At = xp.ascontiguousarray(xp.asarray(transitions, dtype=dt).T)
    st = xp.ascontiguousarray(xp.asarray(start, dtype=dt))
    en = xp.ascontiguousarray(xp.asarray(end, dtype=dt))
    bp = xp.empty((B * T * S,), dtype=np.int32)
    work = xp.empty((B * 3 * S,), dtype=dt)
    i32 = np.int32
    be.launch(dt, _source.crf_decode_name(_ctype(dt)), B, _vit_block(S),
              (em, At, st, en, _ints(xp, lengths), i32(B), i32(T), i32(S), score, tags, bp, work))
    return score, tags


def crf_value(emissions, transitions, start, end, lengths, reg, gamma):
    return crf_run(_cupy_backend(), emissions, transitions, start, end, lengths, None, reg, gamma, 0)


def crf_grad(emissions, transitions, start, end, lengths, weights, reg, gamma):
    return crf_run(_cupy_backend(), emissions, transitions, start, end, lengths, weights, reg,
                   gamma, 1)


def crf_hvp(emissions, transitions, start, end, Ze, ZA, Zs, Zen, lengths, weights, reg, gamma):
    return crf_run(_cupy_backend(), emissions, transitions, start, end, lengths, weights, reg,
                   gamma, 2, Z=(Ze, ZA, Zs, Zen))


def crf_decode(emissions, transitions, start, end, lengths):
    return crf_decode_run(_cupy_backend(), emissions, transitions, start, end, lengths)
