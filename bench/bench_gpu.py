"""GPU benchmark of smoothmax (issue 4): DTW_Ω and Vit_Ω value + gradient.

Cases: soft-DTW value+grad on cost matrices 32x256^2, 32x1024^2, 1x4096^2;
Viterbi (CRF) value+marginals at B=32, T in {128, 512}, S=64; float32 and
float64. Peers, each skipped when not installed (or when it fails, with the
reason): pysdtw (CUDA soft-DTW), a jax.lax.scan anti-diagonal soft-DTW,
torch-struct LinearChainCRF and pytorch-crf. Timing: CUDA events on the
current stream after warm-up, median of repeats. The bandwidth column is
the traffic the engine must move (DTW grad: read theta, write+read the 2
local weights kept a cell, write E = 6 values per cell; Viterbi grad: read theta, write
q, read q and write E, read E for the column sums = 5 values per entry)
over the time, as a fraction of the card's peak DRAM bandwidth.

    python bench/bench_gpu.py [--json FILE] [--quick]
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

# JAX must not grab most of the GPU memory that CuPy and torch also use
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def _now():
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def timeit_cupy(fn, warmup=2, repeat=7, budget_s=8.0):
    import cupy

    for _ in range(warmup):
        fn()
    cupy.cuda.get_current_stream().synchronize()
    times = []
    t_start = time.perf_counter()
    for _ in range(repeat):
        a, b = cupy.cuda.Event(), cupy.cuda.Event()
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(cupy.cuda.get_elapsed_time(a, b))
        if time.perf_counter() - t_start > budget_s:
            break
    return statistics.median(times)


def timeit_torch(fn, warmup=2, repeat=7, budget_s=8.0):
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    t_start = time.perf_counter()
    for _ in range(repeat):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
        if time.perf_counter() - t_start > budget_s:
            break
    return statistics.median(times)


def timeit_sync(fn, sync, warmup=2, repeat=5, budget_s=8.0):
    for _ in range(warmup):
        sync(fn())
    times = []
    t_start = time.perf_counter()
    for _ in range(repeat):
        t = time.perf_counter()
        sync(fn())
        times.append((time.perf_counter() - t) * 1e3)
        if time.perf_counter() - t_start > budget_s:
            break
    return statistics.median(times)


def peak_bandwidth_gbs():
    import cupy

    p = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    clock_khz = p.get("memoryClockRate", 0)
    bus_bits = p.get("memoryBusWidth", 0)
    name = p["name"].decode() if isinstance(p["name"], bytes) else p["name"]
    if clock_khz and bus_bits:
        return 2.0 * clock_khz * 1e3 * bus_bits / 8 / 1e9, name
    return {"H100": 3350.0, "H200": 4800.0}.get(next((k for k in ("H100", "H200") if k in name), ""), 0.0), name


# ---------------------------------------------------------------------------
# DTW peers


def peer_pysdtw(theta_np, dtype):
    import torch

    if not hasattr(np, "row_stack"):
        # pysdtw 0.0.5 calls np.row_stack, which NumPy 2.4 removed; vstack is
        # the same function, so the peer is timed as its users would run it
        np.row_stack = np.vstack
    import pysdtw

    theta = torch.tensor(theta_np, device="cuda", requires_grad=True)
    dummy = torch.zeros(theta.shape[0], theta.shape[1], 1, device="cuda", dtype=theta.dtype)
    dummy_b = torch.zeros(theta.shape[0], theta.shape[2], 1, device="cuda", dtype=theta.dtype)
    sdtw = pysdtw.SoftDTW(gamma=1.0, dist_func=lambda x, y: theta, use_cuda=True)

    def run():
        theta.grad = None
        v = sdtw(dummy, dummy_b)
        v.sum().backward()
        return theta.grad

    return timeit_torch(run)


def peer_jax_scan(theta_np, dtype):
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    gpu = [d for d in jax.devices() if d.platform == "gpu"]
    if not gpu:
        raise RuntimeError("JAX sees no GPU")
    B, N, M = theta_np.shape

    def softmin3(a, b, c):
        m = jnp.minimum(jnp.minimum(a, b), c)
        m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
        s = jnp.exp(-(a - m_safe)) + jnp.exp(-(b - m_safe)) + jnp.exp(-(c - m_safe))
        return m_safe - jnp.log(s)

    def sdtw(theta):  # anti-diagonal scan, skewed layout (rows i = 0..N)
        inf = jnp.asarray(jnp.inf, theta.dtype)
        ii = jnp.arange(N + 1)
        D = N + M + 1

        def cost_diag(d):
            j = d - ii
            ok = (ii >= 1) & (j >= 1) & (j <= M)
            return jnp.where(ok[None], theta[:, jnp.clip(ii - 1, 0, N - 1), jnp.clip(j - 1, 0, M - 1)], inf), ok

        prev2 = jnp.full((B, N + 1), inf, theta.dtype).at[:, 0].set(0.0)   # diagonal 0: R[0,0] = 0
        prev1 = jnp.full((B, N + 1), inf, theta.dtype)                      # diagonal 1: borders

        def step(carry, d):
            p2, p1 = carry
            c, ok = cost_diag(d)
            up = jnp.concatenate([jnp.full((B, 1), inf, theta.dtype), p1[:, :-1]], axis=1)
            left = p1
            diag = jnp.concatenate([jnp.full((B, 1), inf, theta.dtype), p2[:, :-1]], axis=1)
            r = jnp.where(ok[None], c + softmin3(up, left, diag), inf)
            return (p1, r), None

        (_, last), _ = jax.lax.scan(step, (prev2, prev1), jnp.arange(2, D))
        return last[:, N]

    grad = jax.jit(jax.value_and_grad(lambda t: sdtw(t).sum()))
    theta = jax.device_put(jnp.asarray(theta_np), gpu[0])

    def run():
        return grad(theta)

    return timeit_sync(run, lambda out: jax.block_until_ready(out), repeat=3)


# ---------------------------------------------------------------------------
# Viterbi peers


def peer_torch_struct(theta_np, dtype):
    import torch
    import torch_struct

    pot = torch.tensor(theta_np, device="cuda", requires_grad=True)   # (B, T, S, S)

    def run():
        dist = torch_struct.LinearChainCRF(pot)
        return dist.partition, dist.marginals

    return timeit_torch(run)


def peer_pytorch_crf(theta_np, dtype):
    import torch
    from torchcrf import CRF

    B, T, S, _ = theta_np.shape
    tdt = torch.float32 if dtype == np.float32 else torch.float64
    crf = CRF(S, batch_first=True).to("cuda", dtype=tdt)
    em = torch.tensor(theta_np[:, :, :, 0], device="cuda", requires_grad=True)
    tags = torch.zeros(B, T, dtype=torch.long, device="cuda")

    def run():
        em.grad = None
        llh = crf(em, tags, reduction="sum")     # log-partition enters with -1
        (-llh).backward()                        # grad of the log-partition = marginals (+ const)
        return em.grad

    return timeit_torch(run)


# ---------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true", help="smaller repeat counts")
    ap.add_argument("--no-peers", action="store_true")
    args = ap.parse_args(argv)

    import cupy
    from smoothmax._cuda import engine

    peak, devname = peak_bandwidth_gbs()
    rows = []
    print(f"device: {devname}, peak DRAM bandwidth {peak:.0f} GB/s")
    rng = np.random.default_rng(0)

    def record(case, dtype, impl, ms, traffic_bytes=None, note=""):
        row = {"case": case, "dtype": np.dtype(dtype).name, "impl": impl, "ms": ms, "note": note}
        if ms is not None and traffic_bytes is not None:
            row["GB_per_s"] = traffic_bytes / (ms * 1e-3) / 1e9
            row["bw_fraction"] = row["GB_per_s"] / peak if peak else None
        rows.append(row)
        extra = f"  {row.get('bw_fraction', 0) * 100:5.1f}% of peak BW" if "bw_fraction" in row and row["bw_fraction"] else ""
        print(f"{case:<22} {row['dtype']:<8} {impl:<14} "
              f"{'' if ms is None else f'{ms:9.3f} ms'}{extra} {note}", flush=True)

    def try_peer(case, dtype, impl, fn, *a):
        if args.no_peers:
            return
        try:
            record(case, dtype, impl, fn(*a))
        except ImportError as e:
            record(case, dtype, impl, None, note=f"skipped: not installed ({e.name})")
        except Exception as e:  # a peer failing (e.g. pysdtw past 1024) is a result
            record(case, dtype, impl, None, note=f"failed: {type(e).__name__}: {str(e)[:120]}")

    dtw_cases = [(32, 256), (32, 1024), (1, 4096)]
    for dtype in (np.float32, np.float64):
        for B, N in dtw_cases:
            case = f"dtw_grad {B}x{N}^2"
            theta_np = rng.random((B, N, N)).astype(dtype)
            theta = cupy.asarray(theta_np)
            la = cupy.full((B,), N, dtype=cupy.int64)
            ms = timeit_cupy(lambda: engine.dtw_grad(theta, la, la, -1, 0, 1.0))
            record(case, dtype, "smoothmax", ms, traffic_bytes=6 * B * N * N * np.dtype(dtype).itemsize)
            msv = timeit_cupy(lambda: engine.dtw_value(theta, la, la, -1, 0, 1.0))
            record(case.replace("grad", "value"), dtype, "smoothmax", msv,
                   traffic_bytes=B * N * N * np.dtype(dtype).itemsize)
            try_peer(case, dtype, "pysdtw", peer_pysdtw, theta_np, dtype)
            if B * N * N <= 32 * 1024 * 1024:
                try_peer(case, dtype, "jax.lax.scan", peer_jax_scan, theta_np, dtype)
            del theta
        for T in (128, 512):
            B, S = 32, 64
            case = f"viterbi_grad B{B} T{T} S{S}"
            theta_np = rng.standard_normal((B, T, S, S)).astype(dtype)
            theta = cupy.asarray(theta_np)
            L = cupy.full((B,), T, dtype=cupy.int64)

            def vit():
                v, E = engine.viterbi_grad(theta, L, 0, 1.0)
                return v, E.sum(axis=-1)

            ms = timeit_cupy(vit)
            record(case, dtype, "smoothmax", ms, traffic_bytes=5 * B * T * S * S * np.dtype(dtype).itemsize)
            try_peer(case, dtype, "torch-struct", peer_torch_struct, theta_np, dtype)
            try_peer(case, dtype, "pytorch-crf", peer_pytorch_crf, theta_np, dtype)

    # ratios peer / smoothmax
    base = {(r["case"], r["dtype"]): r["ms"] for r in rows if r["impl"] == "smoothmax"}
    for r in rows:
        b = base.get((r["case"], r["dtype"]))
        if r["impl"] != "smoothmax" and r["ms"] and b:
            r["ratio_vs_smoothmax"] = r["ms"] / b
    print("\nratios (peer time / smoothmax time):")
    for r in rows:
        if "ratio_vs_smoothmax" in r:
            print(f"  {r['case']:<22} {r['dtype']:<8} {r['impl']:<14} x{r['ratio_vs_smoothmax']:.1f}")
    targets = {("dtw_grad 32x1024^2", "float32"): 0.7, ("dtw_grad 1x4096^2", "float32"): 3.0}
    for key, limit in targets.items():
        ms = base.get(key)
        if ms is not None:
            print(f"target {key[0]} {key[1]}: {ms:.3f} ms (target <= {limit} ms): "
                  f"{'MET' if ms <= limit else 'NOT MET'}")
    result = {
        "date": _now(), "device": devname, "peak_bandwidth_GBps": peak,
        "python": platform.python_version(), "cupy": cupy.__version__,
        "rows": rows,
        "targets_ms": {f"{k[0]} {k[1]}": v for k, v in targets.items()},
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
