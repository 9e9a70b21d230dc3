"""CRF layer benchmark: a training step (log-likelihood + backward) through the module.

What is timed, for each implementation, from emissions ``(B, T, S)`` already in
memory (``requires_grad``), tags ``(B, T)``, full-length sequences:
``llh = layer(emissions, tags).sum(); llh.backward()`` -- the forward and the
backward to the emissions and the three parameter tensors:

* ``smoothmax``: ``smoothmax.torch.CRF`` (factorised kernel, no (B, T, S, S));
* ``pytorch-crf``: ``torchcrf.CRF`` (the reference of the ratios);
* ``torch-struct``: ``torch_struct.LinearChainCRF`` on the edge potentials
  ``(B, T-1, S, S)`` built from the same emissions and parameters (start and
  end folded into the first and last edges), ``partition`` + autograd, and
  the tag score by gathers;
* ``smoothmax full``: the full-potential path, ``CRF.full_potentials`` (the
  ``(B, T, S, S)`` tensor) then ``smoothmax.viterbi`` (the path a user had to
  hand-write before the layer).

Each (implementation, S, dtype) runs in a fresh subprocess with
OMP/MKL/OpenBLAS threads set to 1 before any import, ``torch.set_num_threads(1)``
and the process pinned to one CPU. Timing: one warm-up call, then the median
of repeated calls (at least 2, up to 10 or about 3 s; 1 when a call exceeds
5 s). Memory: the peak resident set of the subprocess (``ru_maxrss``) minus
its resident set just before the first call, i.e. what the step itself
allocated at its peak (inputs, parameters and imports excluded). Every
subprocess runs under an address-space cap (``--mem-cap-gb``); a case that
exceeds it is reported as not run. Before a time is reported the
implementation's log-likelihood and emission gradient are compared with
pytorch-crf's on the same inputs (float64: 1e-8 relative; float32: 1e-3).

Usage::

    python bench/bench_crf.py            # B=32, T=128, S = 16, 64, 256, float32 and float64
    python bench/bench_crf.py --quick    # small smoke run
"""
import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # benchmark the working tree, with its in-place build
if HERE not in sys.path:
    sys.path.insert(0, HERE)

IMPLS = ("smoothmax", "pytorch-crf", "torch-struct", "smoothmax full")
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")


# ---------------------------------------------------------------------------
# one case, in a subprocess


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _score(em, tags, A, s, e):
    """The tag score of full-length sequences (for the torch-struct head)."""
    sc = em.gather(2, tags[:, :, None])[:, :, 0].sum(1)
    return sc + s[tags[:, 0]] + A[tags[:, :-1], tags[:, 1:]].sum(1) + e[tags[:, -1]]


def _layer(impl, S, dtype):
    import torch

    if impl == "pytorch-crf":
        import torchcrf

        return torchcrf.CRF(S, batch_first=True).to(dtype)
    import smoothmax.torch as smt

    crf = smt.CRF(S, batch_first=True).to(dtype)
    if impl == "smoothmax":
        return crf
    if impl == "smoothmax full":
        import smoothmax as sm

        def full(em, tags):
            theta, L = crf.full_potentials(em)
            return (_score(em, tags, crf.transitions, crf.start_transitions, crf.end_transitions)
                    - sm.viterbi(theta, lengths=L)).sum()

        full.module = crf
        return full
    from torch_struct import LinearChainCRF

    def struct(em, tags):
        A, s, e = crf.transitions, crf.start_transitions, crf.end_transitions
        edge = em[:, 1:, :, None] + A.t()[None, None]          # [b, n, to, from]
        first = edge[:, :1] + (s + em[:, 0])[:, None, None, :]
        last = edge[:, -1:] + e[None, None, :, None]
        if edge.shape[1] == 1:
            edge = first + e[None, None, :, None]
        else:
            edge = torch.cat([first, edge[:, 1:-1], last], dim=1)
        logZ = LinearChainCRF(edge).partition
        return (_score(em, tags, A, s, e) - logZ).sum()

    struct.module = crf
    return struct


def run_one(impl, B, T, S, dtype_name, seed=0):
    import resource

    import torch

    torch.set_num_threads(1)
    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(seed)
    layer = _layer(impl, S, dtype)
    module = getattr(layer, "module", layer)
    with torch.no_grad():
        for name in ("start_transitions", "end_transitions", "transitions"):
            p = getattr(module, name)
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype))
    em = torch.randn(B, T, S, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    tags = torch.randint(0, S, (B, T), generator=g)
    probe = torch.randn(B, T, S, generator=g, dtype=torch.float64)

    def step():
        em.grad = None
        for p in module.parameters():
            p.grad = None
        llh = layer(em, tags)
        llh.backward()
        return llh

    rss0 = _rss_bytes()
    t0 = time.perf_counter()
    llh = step()
    first = time.perf_counter() - t0
    check = {"llh": float(llh), "grad_probe": float((em.grad.double() * probe).sum()),
             "grad_A": float(module.transitions.grad.double().abs().sum())}
    times = []
    if first <= 5.0:
        budget = time.perf_counter() + 3.0
        while len(times) < 2 or (len(times) < 10 and time.perf_counter() < budget):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    else:
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    times.sort()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"impl": impl, "B": B, "T": T, "S": S, "dtype": dtype_name,
            "median_s": times[len(times) // 2], "repeats": len(times), "first_call_s": first,
            "peak_extra_mb": max(0.0, (peak - rss0) / 2**20), "check": check}


# ---------------------------------------------------------------------------
# driver


def _child(impl, B, T, S, dtype, cap_gb):
    env = dict(os.environ)
    for v in THREAD_VARS:
        env[v] = "1"
    code = (
        "import os, resource, sys, json\n"
        "os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
        f"resource.setrlimit(resource.RLIMIT_AS, ({int(cap_gb * 2**30)}, {int(cap_gb * 2**30)}))\n"
        f"sys.path.insert(0, {HERE!r})\n"
        "import bench_crf\n"
        f"r = bench_crf.run_one({impl!r}, {B}, {T}, {S}, {dtype!r})\n"
        "print('RESULT ' + json.dumps(r))\n")
    load = os.getloadavg()[0]
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            r = json.loads(line[len("RESULT "):])
            r["loadavg_before"] = load
            return r
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    reason = "out of the memory cap" if "MemoryError" in proc.stderr or "alloc" in proc.stderr.lower() \
        or proc.returncode in (-9, 137) else tail[0][:200]
    return {"impl": impl, "B": B, "T": T, "S": S, "dtype": dtype, "error": reason,
            "loadavg_before": load}


def _agrees(r, ref):
    if "error" in r or "error" in ref:
        return None
    tol = 1e-8 if r["dtype"] == "float64" else 1e-3
    ok = True
    for k in ("llh", "grad_probe", "grad_A"):
        a, b = r["check"][k], ref["check"][k]
        ok &= abs(a - b) <= tol * max(1.0, abs(b))
    return bool(ok)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--B", type=int, default=32)
    ap.add_argument("--T", type=int, default=128)
    ap.add_argument("--S", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    ap.add_argument("--impls", nargs="+", default=list(IMPLS))
    ap.add_argument("--mem-cap-gb", type=float, default=6.0)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "crf_1t"))
    ap.add_argument("--render", action="store_true", help="only rewrite OUT.md from OUT.json")
    args = ap.parse_args(argv)
    if args.render:
        with open(args.out + ".json") as f:
            res = json.load(f)
        with open(args.out + ".md", "w") as f:
            f.write(markdown(res))
        return
    if args.quick:
        args.B, args.T, args.S = 4, 16, [4, 8]
        args.out = os.path.join(HERE, "results", "crf_quick")
    import _machine

    machine = _machine.describe()
    rows = []
    for S in args.S:
        for dtype in args.dtypes:
            case = {}
            for impl in args.impls:
                r = _child(impl, args.B, args.T, S, dtype, args.mem_cap_gb)
                case[impl] = r
                shown = r.get("error") or f"{1e3 * r['median_s']:.1f} ms, {r['peak_extra_mb']:.0f} MB"
                print(f"S={S} {dtype} {impl}: {shown}", flush=True)
            ref = case.get("pytorch-crf")
            for impl, r in case.items():
                if ref is not None and impl != "pytorch-crf":
                    r["agrees_with_pytorch_crf"] = _agrees(r, ref)
                if ref is not None and "error" not in r and "error" not in ref:
                    r["speedup_vs_pytorch_crf"] = ref["median_s"] / r["median_s"]
                rows.append(r)
    res = {"machine": machine, "loadavg_at_end": list(os.getloadavg()), "rows": rows,
           "args": {k: v for k, v in vars(args).items() if k != "out"}}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(res, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(res))
    print(f"wrote {args.out}.md and .json")


def markdown(res):
    import _machine

    m = res["machine"]
    a = res["args"]
    lines = [
        f"# CRF layer: log-likelihood + backward, B={a['B']}, T={a['T']}, one thread", "",
        "`python bench/bench_crf.py` (docstring: what is timed). Times are medians of one run; "
        "ratios are pytorch-crf's time over the row's (higher is faster). Peak memory: the "
        "subprocess's peak resident set (`ru_maxrss`) minus its resident set before the first "
        "call. The machine is shared with other jobs (load averages below), so absolute times "
        "are noisy; the ratios come from the same run.", "",
        f"Machine: {_machine.one_line(m)}; smoothmax engine: {m['smoothmax_engine']}; load "
        f"average at start {m['loadavg_at_start'][0]:.2f}, at end {res['loadavg_at_end'][0]:.2f}.", "",
        "| S | dtype | implementation | time (ms) | × pytorch-crf | peak extra memory (MB) | agrees | load |",
        "|---:|---|---|---:|---:|---:|---|---:|",
    ]
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"| {r['S']} | {r['dtype']} | {r['impl']} | not run: {r['error']} | | | | "
                         f"{r['loadavg_before']:.2f} |")
            continue
        sp = r.get("speedup_vs_pytorch_crf")
        ag = r.get("agrees_with_pytorch_crf")
        lines.append(
            f"| {r['S']} | {r['dtype']} | {r['impl']} | {1e3 * r['median_s']:.1f} | "
            f"{'' if sp is None else f'{sp:.2f}'} | {r['peak_extra_mb']:.0f} | "
            f"{'reference' if r['impl'] == 'pytorch-crf' else ('yes' if ag else 'NO')} | "
            f"{r['loadavg_before']:.2f} |")
    lines += ["", "Summary (smoothmax's time against each peer's, same run):", ""]
    by = {}
    for r in res["rows"]:
        by.setdefault((r["S"], r["dtype"]), {})[r["impl"]] = r
    for (S, dt), case in by.items():
        sm = case.get("smoothmax")
        if sm is None or "error" in sm:
            continue
        parts = [f"{name} {case[name]['median_s'] / sm['median_s']:.1f}×"
                 for name in IMPLS[1:] if name in case and "error" not in case[name]]
        parts += [f"{name} not run" for name in IMPLS[1:] if name in case and "error" in case[name]]
        mem = [f"{name} {case[name]['peak_extra_mb']:.0f}"
               for name in IMPLS if name in case and "error" not in case[name]]
        lines.append(f"* S = {S}, {dt}: faster than {', '.join(parts)}; peak extra MB: {', '.join(mem)}.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
