"""Long sequences: soft-DTW between features, time and peak memory.

Compares, on two random-walk feature sequences of N frames and d features
(float64, γ = 1, negentropy, one thread):

* ``features``: ``smoothmax.dtw_features`` / ``dtw_features_grad`` (linear
  memory, the cost of a cell computed when it is visited);
* ``cost-matrix``: the squared-Euclidean cost matrix by NumPy
  (``‖x‖² + ‖y‖² − 2·x·yᵀ``), ``smoothmax.dtw`` / ``dtw_grad`` on it and the
  chain rule ``2·(rowsum(E)·x − E·y)`` (two matrix products);
* ``tslearn``: ``tslearn.metrics.soft_dtw`` (value) and
  ``SoftDTW(SquaredEuclidean(x, y).compute())`` with ``jacobian_product``
  (gradient).

Each measurement runs in its own process: inputs are made, a small call
warms the code up (numba compilation for tslearn), the peak resident set is
reset (``/proc/self/clear_refs``), then one timed call; "peak MiB" is the
high-water resident set (VmHWM) minus the resident set just before the call,
so it counts everything the call allocates (NumPy arrays and the kernel's
own workspace) and not the inputs. Cases that cannot fit in the machine's
memory are skipped and said so; the 100k² case runs only for d = 16 (the
value pass alone takes minutes on one thread).

Usage: ``python bench/bench_long.py --out bench/results/long_cpu.json``
(writes the .json and a .md next to it).
"""
import argparse
import json
import os
import subprocess
import sys
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

SIZES = (1000, 10000, 100000)
DIMS = (1, 16, 64)
METHODS = ("features", "cost-matrix", "tslearn")
MEM_LIMIT = 16 * 2 ** 30   # bytes a case may need (24 GB machine, shared)


def _need_bytes(method, N, d):
    """Rough memory a case needs; None: it fits whatever N."""
    if method == "features":
        return 8 * 4 * N * d + 8 * 2 * int(np.sqrt(2 * N)) * N
    if method == "cost-matrix":
        return 8 * 5 * N * N   # theta, E, 2 weights a cell, the x·yᵀ temporary
    return 8 * 4 * N * N       # tslearn: D, R (padded), E, temporaries


def _skip_reason(method, N, d):
    need = _need_bytes(method, N, d)
    if need > MEM_LIMIT:
        return f"needs about {need / 2 ** 30:.0f} GiB"
    if N == 100000 and d != 16:
        return "100k² runs only for d = 16 (bench time)"
    if method == "tslearn" and N == 10000 and d != 16:
        return "tslearn at 10k² only for d = 16 (bench time)"
    return None


def _inputs(N, d, seed=0):
    rng = np.random.default_rng(seed)
    x = np.cumsum(rng.normal(size=(N, d)), axis=0) / np.sqrt(N)
    y = np.cumsum(rng.normal(size=(N, d)), axis=0) / np.sqrt(N)
    return x, y


def _call(method, grad, x, y):
    import smoothmax as sm

    if method == "features":
        if grad:
            v, gx, gy = sm.dtw_features_grad(x, y, progress=False)
            return float(v), gx
        return float(sm.dtw_features(x, y, progress=False)), None
    if method == "cost-matrix":
        C = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * (x @ y.T)
        np.maximum(C, 0.0, out=C)
        if not grad:
            return float(sm.dtw(C)), None
        v, E = sm.dtw_grad(C)
        del C
        gx = 2.0 * (E.sum(1)[:, None] * x - E @ y)
        gy = 2.0 * (E.sum(0)[:, None] * y - E.T @ x)
        return float(v), gx
    from tslearn.metrics import SoftDTW, SquaredEuclidean, soft_dtw

    if not grad:
        return float(soft_dtw(x, y, gamma=1.0)), None
    D = SquaredEuclidean(x, y)
    sdtw = SoftDTW(D.compute(), gamma=1.0)
    v = sdtw.compute()
    E = sdtw.grad()
    gx = D.jacobian_product(E)
    return float(v), gx


def worker(method, grad, N, d):
    from _memory import cpu_seconds, fix_mmap_threshold, measured

    fix_mmap_threshold()
    x, y = _inputs(N, d)
    xs, ys = _inputs(50, d, seed=1)
    _call(method, grad, xs, ys)  # warm-up (imports, numba)
    cpu0 = cpu_seconds()
    (value, gx), seconds, peak, reset = measured(lambda: _call(method, grad, x, y))
    cpu = cpu_seconds() - cpu0
    print("RESULT " + json.dumps({"method": method, "grad": grad, "N": N, "d": d, "seconds": seconds,
                                  "cpu_seconds": cpu, "loadavg_after": list(os.getloadavg()), "peak_bytes": peak, "hwm_reset": reset, "value": value,
                                  "gx_norm": None if gx is None else float(np.linalg.norm(gx))}))


def _env():
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env[k] = "1"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(HERE, "results", "long_cpu.json"))
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    p.add_argument("--dims", type=int, nargs="+", default=list(DIMS))
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--grads", type=int, nargs="+", default=[0, 1], help="0: value, 1: value + gradient")
    p.add_argument("--update", action="store_true",
                   help="re-measure the selected entries of --out and keep the others")
    p.add_argument("--worker", nargs=4, metavar=("METHOD", "GRAD", "N", "D"))
    args = p.parse_args()
    if args.worker:
        m, g, n, d = args.worker
        worker(m, g == "1", int(n), int(d))
        return
    import _machine
    from tqdm import tqdm

    machine = _machine.describe()
    plan = [(N, d, m, bool(g)) for N in args.sizes for d in args.dims for m in args.methods for g in args.grads]
    old = None
    if args.update:
        with open(args.out) as f:
            old = json.load(f)
    entries = []
    for N, d, m, g in tqdm(plan, desc="bench_long"):
        e = {"method": m, "grad": g, "N": N, "d": d}
        reason = _skip_reason(m, N, d)
        if reason:
            entries.append(dict(e, status=f"skipped: {reason}"))
            continue
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", m, "1" if g else "0",
                               str(N), str(d)], capture_output=True, text=True, env=_env(), cwd=ROOT)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if not lines:
            entries.append(dict(e, status=f"error (exit {proc.returncode}): {proc.stderr[-500:]}"))
        else:
            entries.append(dict(json.loads(lines[0][7:]), status="ok"))
        tqdm.write(str(entries[-1])[:200])
    command = "python " + " ".join(["bench/bench_long.py"] + sys.argv[1:])
    if old is not None:  # the re-measured entries replace theirs; the machine of both runs is kept
        key = lambda e: (e["method"], e["grad"], e["N"], e["d"])  # noqa: E731
        new = {key(e): e for e in entries}
        entries = [new.pop(key(e), e) for e in old["entries"]] + list(new.values())
        machine = dict(old["machine"], update=machine)
        command = old["command"] + "; then " + command
    result = {"benchmark": "long", "command": command,
              "machine": machine, "loadavg_at_end": list(os.getloadavg()), "threads": 1,
              "dtype": "float64", "gamma": 1.0, "entries": entries}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(markdown(result))


def _fmt_bytes(b):
    return f"{b / 2 ** 20:.1f}" if b >= 2 ** 20 else f"{b / 2 ** 20:.2f}"


def markdown(result):
    import _machine

    m = result["machine"]
    ok = {(e["method"], e["grad"], e["N"], e["d"]): e for e in result["entries"] if e["status"] == "ok"}
    lines = ["# Long sequences: soft-DTW between features", "",
             f"Machine: {_machine.one_line(m)}; shared with other jobs (two cores, five other "
             f"sessions): load average {m['loadavg_at_start']} at start, {result['loadavg_at_end']} at end"
             + (f"; re-measured entries: load {m['update']['loadavg_at_start']} at their start" if "update" in m
                else "") + ". Entries with a CPU time give it in brackets (user + system time of the "
             "process during the call; less sensitive to the other jobs than the wall time).", "",
             f"Command: `{result['command']}`", "",
             "One thread (OMP/BLAS/numba threads = 1), float64, negentropy, γ = 1, squared-Euclidean "
             "cost, two random walks of N frames and d features; one timed call per entry after a "
             "small warm-up, each in its own process. Peak = high-water resident set during the call "
             "minus the resident set just before it (inputs excluded; NumPy arrays and the kernel's "
             "workspace included). Ratios: the other method's time (memory) over the features "
             "method's, > 1: features is faster (smaller); where the features call stays under 1 MiB "
             "the memory ratio is given against 1 MiB (≥).", ""]
    for grad in (False, True):
        lines += [f"## {'Value + gradient w.r.t. x and y' if grad else 'Value'}", "",
                  "| N×N | d | features s | features peak MiB | cost-matrix s (ratio) | cost-matrix peak MiB (ratio) "
                  "| tslearn s (ratio) | tslearn peak MiB (ratio) |", "|---|---|---|---|---|---|---|---|"]
        for e in result["entries"]:
            if e["method"] != "features" or e["grad"] != grad:
                continue
            N, d = e["N"], e["d"]
            f = ok.get(("features", grad, N, d))
            if f is None:
                lines.append(f"| {N}² | {d} | {e['status']} | | | | | |")
                continue
            cpu = f" (cpu {f['cpu_seconds']:.3g})" if "cpu_seconds" in f else ""
            row = [f"{N}²", str(d), f"{f['seconds']:.3g}{cpu}", _fmt_bytes(f["peak_bytes"])]
            for m2 in ("cost-matrix", "tslearn"):
                o = ok.get((m2, grad, N, d))
                if o is None:
                    st = next((x["status"] for x in result["entries"]
                               if (x["method"], x["grad"], x["N"], x["d"]) == (m2, grad, N, d)), "not run")
                    row += [st, ""]
                else:
                    if f["peak_bytes"] >= 2 ** 20:
                        mem = f"{o['peak_bytes'] / f['peak_bytes']:.0f}×"
                    else:  # under a MiB: the high-water mark saw no growth worth a ratio
                        mem = f"≥ {o['peak_bytes'] / 2 ** 20:.0f}×"
                    row += [f"{o['seconds']:.3g} ({o['seconds'] / f['seconds']:.2f}×)",
                            f"{_fmt_bytes(o['peak_bytes'])} ({mem})"]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    vals = [(f, ok.get(("features", True, f["N"], f["d"]))) for f in ok.values()
            if f["method"] == "features" and not f["grad"]]
    lines += ["## Gradient time over value time (features)", "",
              "| N×N | d | value s | value + gradient s | ratio (wall) | ratio (CPU time) |",
              "|---|---|---|---|---|---|"]
    for f, g in sorted(((f, g) for f, g in vals if g), key=lambda t: (t[0]["N"], t[0]["d"])):
        cpu = (f"{g['cpu_seconds'] / f['cpu_seconds']:.2f}" if "cpu_seconds" in f and "cpu_seconds" in g
               else "—")
        lines.append(f"| {f['N']}² | {f['d']} | {f['seconds']:.3g} | {g['seconds']:.3g} | "
                     f"{g['seconds'] / f['seconds']:.2f} | {cpu} |")
    lines += ["", "Values agree across methods (relative difference of the value, max over cases): "
              f"{_agreement(ok):.1e}.", ""]
    return "\n".join(lines)


def _agreement(ok):
    worst = 0.0
    for (m, g, N, d), e in ok.items():
        f = ok.get(("features", g, N, d))
        if f is not None and m != "features":
            worst = max(worst, abs(e["value"] - f["value"]) / max(abs(f["value"]), 1e-300))
    return worst


if __name__ == "__main__":
    main()
