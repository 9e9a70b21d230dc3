"""Before/after benchmark of smoothmax's compiled CPU core (issue 11, "One core").

One run times one checkout of smoothmax (``--root``, default this one) on one
machine and writes ``bench/results/core_<tag>.json`` and ``.md``:

* **warm** calls: every case of ``bench_cpu.py`` (its case list, imported,
  smoothmax negentropy, γ = 1: DTW value + gradient, Viterbi value +
  marginals, and the two HVPs) plus the issue's thread grid (``dtw_hvp``
  2×200², ``dtw_hvp`` 1×1024², ``viterbi_hvp`` 32×128×16², ``dtw_grad``
  32×256²), float32 and float64, on 1 and on 2 threads. Each (dtype, threads)
  runs in a fresh process with ``OMP_NUM_THREADS`` set before any import and
  ``threadpoolctl.threadpool_limits`` around the calls; the time of a case is
  the **minimum** of at least 5 calls after a warm-up call (the median is kept
  too).
* **co-tenant**: the same cases on 2 threads while another process spins on
  one CPU (a busy loop pinned to the last usable CPU, same priority).
* **cold** first calls, each case in its own fresh process (default thread
  count): one tiny call of the same function first (imports, dispatch
  caches), then the first call at the case's size (fresh pages for outputs
  and workspace), then warm calls in the same process. The first call's peak
  resident growth (``_memory.measured``) minus its outputs, over
  ``cells × itemsize``, is the number of values the call stores per cell
  besides θ and its outputs; the resident growth left after the outputs are
  freed is the workspace the library keeps, and again after
  ``smoothmax.clear_cache()`` where the checkout has it. A 1×3000² ``dtw_hvp``
  (the issue's kept-workspace example) is run cold only.

An **accuracy** entry compares DTW 1×4096² value and ``E`` in float32 with
float64 on the same input.

Every timed output is summarised (sum of the values, sum of ``|E|`` or
``|Ė|``) so that ``--compare`` can check that two checkouts computed the same
numbers.

``--root DIR`` imports smoothmax from another checkout (its core built in
place): the workers run with ``PYTHONPATH=DIR`` first on ``sys.path`` and
record the ``smoothmax`` they imported; the commit recorded is ``DIR``'s.

``--pair BEFORE=DIR AFTER=DIR`` times two checkouts in one run, each job
(a worker process) run for both, in alternating order, so that a change of
load on a shared machine falls on both alike; it writes both result files
and the comparison.

``--processes N`` runs every warm and co-tenant job in N worker processes
(alternating between the checkouts) and keeps, per case, the process with
the smallest time: on a VM where one process can run the same kernel 1.3x
slower than another (docs/engines.md), one process per case decides a
before/after ratio by the draw of processes; the minimum over several is
what the kernel does. Every process's time is kept in ``process_seconds``.

``--compare BEFORE AFTER`` reads ``core_BEFORE.json`` and ``core_AFTER.json``
and writes ``core_compare.md`` (+ ``.json``): the ratio after / before of every
entry (flagged where after is more than 5% slower), the outputs' agreement,
and the issue's criteria checked on each run.

Usage::

    python bench/bench_core.py --quick                      # smoke run (< 1 min), temp dir
    python bench/bench_core.py --tag before --root /work/wt-before
    python bench/bench_core.py --tag after
    python bench/bench_core.py --compare before after       # core_compare.md
    python bench/bench_core.py --pair before=/work/wt-before after=.   # both, interleaved
    python bench/bench_core.py --pair before=/work/wt-before after=. --processes 3
"""
import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import _machine  # noqa: E402
import bench_cpu  # noqa: E402  (the case list, the inputs and the timed smoothmax calls)

GAMMA = bench_cpu.GAMMA
# the grid of one thread against two (batch or size where the work splits)
THREAD_GRID = [("dtw-hvp", (2, 200, 200)), ("dtw-hvp", (1, 1024, 1024)),
               ("viterbi-hvp", (32, 128, 16)), ("dtw", (32, 256, 256))]
QUICK_THREAD_GRID = [("dtw-hvp", (2, 40, 40)), ("dtw", (4, 32, 32))]
# run cold only: the kept-workspace example of the issue
MEMORY_CASES = [("dtw-hvp", (1, 3000, 3000))]
QUICK_MEMORY_CASES = [("dtw-hvp", (1, 300, 300))]
COLD_CRITERION_CASE = ("dtw", (1, 4096, 4096))
# float32 against float64 on the same input (the issue: E at 4096² within 1e-6)
ACCURACY_CASE, QUICK_ACCURACY_CASE = ("dtw", (1, 4096, 4096)), ("dtw", (1, 96, 96))
MAX_F32_E_ERR = 1e-6
MIN_REPEATS = 5
MAX_REPEATS = 30
SLOWER_FLAG = 1.05        # after / before above this is flagged
# the criteria
MAX_TWO_OVER_ONE = 1.0    # 2 threads never slower than 1
MIN_SPLIT_SPEEDUP = 1.7   # where the work splits (batch >= 2 or one problem >= 1024^2)
MAX_COTENANT = 1.5        # co-tenant time / one-thread time
MIN_F32_SPEEDUP = 1.6     # float64 time / float32 time, DTW value+grad and Viterbi S >= 16
MAX_COLD_OVER_WARM = 1.5  # at 4096^2
MAX_STORED_PER_CELL = 2.0  # DTW gradient: values kept per cell besides theta and E
DEFAULT_KEPT_BYTES = 512 << 20  # memory kept after a call: the result buffers' cap, when the
                                # checkout does not say (smoothmax._buffers._limit())
MAX_KEPT_AFTER_CLEAR = 16 << 20  # after smoothmax.clear_cache(): allocator slack only


def all_cases(quick):
    """Every (struct, shape) of bench_cpu.py, then the thread grid's others, in order."""
    base = bench_cpu.QUICK_CASES if quick else bench_cpu.FULL_CASES
    out = [(s, tuple(sh)) for s in bench_cpu.STRUCTS for sh in base[s]]
    for c in (QUICK_THREAD_GRID if quick else THREAD_GRID):
        if c not in out:
            out.append(c)
    return out


def key(e):
    return (e["scenario"], e["case"], e["dtype"], e["threads"])


# ----------------------------------------------------------------------------- worker

def _import_target(root):
    """Put ``root`` first on ``sys.path`` (no other checkout's smoothmax) and import it."""
    root = os.path.abspath(root)
    if root != ROOT:  # bench_cpu put this checkout first
        sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != ROOT]
    sys.path.insert(0, root)
    import smoothmax

    where = os.path.abspath(smoothmax.__file__)
    if not where.startswith(root + os.sep):
        raise RuntimeError(f"imported smoothmax from {where}, not from {root}")
    for mod in ("dtw", "viterbi"):  # load the OpenMP runtime before threadpoolctl looks
        __import__(f"smoothmax._core.{mod}")
    return smoothmax


def _limits(threads):
    """threadpoolctl's limit around the calls, and the thread counts the libraries report:
    OpenMP's, and ``smoothmax.get_num_threads()`` where the checkout has it."""
    from threadpoolctl import threadpool_info, threadpool_limits

    import smoothmax

    lim = threadpool_limits(limits=threads)
    omp = [i["num_threads"] for i in threadpool_info() if i.get("user_api") == "openmp"]
    if hasattr(smoothmax, "get_num_threads"):
        omp.append(smoothmax.get_num_threads())
    return lim, omp


def _summary(out):
    """Sums that identify the numbers a call returned (compared between checkouts)."""
    import numpy as np

    s = {}
    if "value" in out:
        v = out["value"]
        s["value_sum"] = float(np.sum(v[np.isfinite(v)]))
    s["grad_abs_sum"] = float(np.abs(out["grad"]).sum())
    return s


def _out_bytes(out):
    arrays = out if isinstance(out, tuple) else (out,)
    return int(sum(getattr(a, "nbytes", 0) for a in arrays))


def _timed(run, budget):
    """Min and median of at least MIN_REPEATS calls (at most MAX_REPEATS within ``budget`` s)."""
    times = []
    t_end = time.perf_counter() + budget
    while len(times) < MIN_REPEATS or (len(times) < MAX_REPEATS and time.perf_counter() < t_end):
        t0 = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - t0)
        del out  # a training loop lets the last result go before the next call
    times.sort()
    return times[0], times[len(times) // 2], times


def _guard_trips():
    """The co-tenant guard's trips so far in this process (None: a build without
    the thread pool, e.g. before issue 11)."""
    try:
        from smoothmax._core import pool
    except ImportError:
        return None
    return pool._probe().get("guard_trips")


def _entry(scenario, struct, shape, dtype, threads):
    return {"scenario": scenario, "struct": struct, "shape": list(shape),
            "case": bench_cpu.case_name(struct, shape), "dtype": dtype, "threads": threads,
            "cells": bench_cpu.cells(struct, shape), "loadavg_before": os.getloadavg()[0]}


def worker_warm(args):
    _import_target(args.root)
    lim, omp = _limits(args.threads)
    with lim:
        for struct, shape in json.loads(args.cases):
            e = _entry(args.scenario, struct, shape, args.dtype, args.threads)
            e["omp_threads"] = omp
            try:
                inp = bench_cpu.make_inputs(struct, tuple(shape))
                run, to_numpy, _ = bench_cpu.setup_smoothmax(struct, inp, args.dtype)
                trips = _guard_trips()
                out = run()  # warm-up
                e["summary"] = _summary(to_numpy(out))
                del out
                e["seconds"], e["median"], e["times"] = _timed(run, args.budget)
                if trips is not None:  # trips during this case (each: 50 ms to 2 s on one thread)
                    e["guard_trips"] = _guard_trips() - trips
                e["ns_per_cell"] = e["seconds"] / e["cells"] * 1e9
                e["status"] = "ok"
            except Exception as exc:  # a failing case is a result, not a crash of the run
                e["status"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            print("RESULT " + json.dumps(e), flush=True)


def worker_cold(args):
    import _memory

    _memory.fix_mmap_threshold()
    sm = _import_target(args.root)
    struct, shape = json.loads(args.cases)[0]
    shape = tuple(shape)
    e = _entry("cold", struct, shape, args.dtype, args.threads)
    lim, e["omp_threads"] = _limits(args.threads)
    with lim:
        try:
            tiny = (1, 8, 8) if struct.startswith("dtw") else (1, 4, shape[2])
            run, _, _ = bench_cpu.setup_smoothmax(struct, bench_cpu.make_inputs(struct, tiny),
                                                  args.dtype)
            run()  # imports and caches of the call path, not the memory of this size
            del run
            inp = bench_cpu.make_inputs(struct, shape)
            run, to_numpy, _ = bench_cpu.setup_smoothmax(struct, inp, args.dtype)
            del inp
            gc.collect()
            rss0 = _memory._vm("VmRSS")
            out, e["first_seconds"], e["first_peak_bytes"], e["peak_reset"] = \
                _memory.measured(run)
            e["out_bytes"] = _out_bytes(out)
            e["summary"] = _summary(to_numpy(out))
            del out
            gc.collect()
            e["retained_bytes"] = _memory._vm("VmRSS") - rss0
            e["seconds"], e["median"], e["times"] = _timed(run, args.budget)
            e["ns_per_cell"] = e["seconds"] / e["cells"] * 1e9
            e["cold_over_warm"] = e["first_seconds"] / e["seconds"]
            out, _, e["warm_peak_bytes"], _ = _memory.measured(run)
            del out
            gc.collect()
            itemsize = 4 if args.dtype == "float32" else 8
            e["stored_values_per_cell"] = ((e["first_peak_bytes"] - e["out_bytes"])
                                           / (e["cells"] * itemsize))
            if hasattr(sm, "clear_cache"):
                sm.clear_cache()
                gc.collect()
                e["retained_after_clear_bytes"] = _memory._vm("VmRSS") - rss0
            e["status"] = "ok"
        except Exception as exc:
            e["status"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    print("RESULT " + json.dumps(e), flush=True)


def worker_accuracy(args):
    """DTW value + E in float32 and in float64 on the same input: the float32 error."""
    import numpy as np

    _import_target(args.root)
    struct, shape = json.loads(args.cases)[0]
    e = _entry("accuracy", struct, shape, "float32", args.threads)
    lim, e["omp_threads"] = _limits(args.threads)
    with lim:
        inp = bench_cpu.make_inputs(struct, tuple(shape))
        out = {}
        for dt in ("float64", "float32"):
            run, to_numpy, _ = bench_cpu.setup_smoothmax(struct, inp, dt)
            out[dt] = to_numpy(run())
        v64, v32 = out["float64"]["value"], out["float32"]["value"]
        e["e_max_abs_err"] = float(np.abs(out["float32"]["grad"] - out["float64"]["grad"]).max())
        e["value_max_rel_err"] = float((np.abs(v32 - v64) / np.abs(v64)).max())
        e["status"] = "ok"
    print("RESULT " + json.dumps(e), flush=True)


def worker_describe(args):
    sm = _import_target(args.root)
    m = _machine.describe(root=args.root)
    m["smoothmax_file"] = sm.__file__
    try:
        from smoothmax._core import dtw as core_dtw

        m["simd_isa"] = core_dtw._simd_isa()
    except (ImportError, AttributeError):
        m["simd_isa"] = None
    m["has_clear_cache"] = hasattr(sm, "clear_cache")
    try:
        from smoothmax import _buffers

        m["kept_bytes_limit"] = int(_buffers._limit())
    except (ImportError, AttributeError):
        m["kept_bytes_limit"] = None
    print("RESULT " + json.dumps(m), flush=True)


# ----------------------------------------------------------------------------- driver

def _env(root, threads):
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env.pop("SMOOTHMAX_NUM_THREADS", None)  # the thread count follows OMP_NUM_THREADS here
    env["PYTHONPATH"] = os.path.abspath(root) + (
        os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONWARNINGS"] = "ignore"
    return env


def _worker(args, root, kind, dtype, threads, cases, scenario="warm"):
    """Run one worker process on the checkout ``root``; its RESULT lines, or one error entry
    per case."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--root", root,
           "--dtype", dtype, "--threads", str(threads), "--scenario", scenario,
           "--cases", json.dumps(cases), "--budget", str(args.budget)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(root, threads),
                          cwd=HERE)
    got = [json.loads(line[7:]) for line in proc.stdout.splitlines()
           if line.startswith("RESULT ")]
    if proc.returncode != 0 and kind != "describe":
        seen = {(e["struct"], tuple(e["shape"])) for e in got}
        for struct, shape in cases:
            if (struct, tuple(shape)) not in seen:
                e = _entry(kind if kind in ("cold", "accuracy") else scenario, struct, shape,
                           dtype, threads)
                e["status"] = f"error: worker exited with {proc.returncode}"
                e["stderr_tail"] = proc.stderr[-1500:]
                got.append(e)
    elif proc.returncode != 0:
        raise RuntimeError(f"worker failed:\n{proc.stderr[-3000:]}")
    return got


def _run_job(args, root, job, plain):
    scenario, dtype, threads = job[:3]
    if scenario == "warm":
        return _worker(args, root, "warm", dtype, threads, plain)
    if scenario == "cotenant":
        with _machine.BusyCore() as busy:
            got = _worker(args, root, "warm", dtype, threads, plain, scenario="cotenant")
        for e in got:
            e["busy_cpu"] = busy.cpu
        return got
    return _worker(args, root, scenario, dtype, threads, [job[3]])


def run_all(args, runs):
    """Every job on every ``(tag, root)`` of ``runs``; with two runs the jobs alternate
    between them (ABBA...), so that a change of load on a shared machine hits both alike."""
    cases = all_cases(args.quick)
    plain = [list(c) for c in cases]
    cold = plain + [list(c) for c in (QUICK_MEMORY_CASES if args.quick else MEMORY_CASES)]
    nmax = max(args.threads)
    jobs = [("warm", d, t) for d in args.dtypes for t in args.threads]
    jobs += [("cotenant", d, nmax) for d in args.dtypes]
    jobs += [("cold", d, nmax, c) for d in args.dtypes for c in cold]
    if {"float32", "float64"} <= set(args.dtypes):
        jobs.append(("accuracy", "float32", nmax,
                     list(QUICK_ACCURACY_CASE if args.quick else ACCURACY_CASE)))
    machines = {tag: _worker(args, root, "describe", "float64", nmax, [])[0]
                for tag, root in runs}
    entries = {tag: [] for tag, _ in runs}
    t_start = time.time()
    turn = 0
    for k, job in enumerate(jobs):
        scenario, dtype, threads = job[:3]
        print(f"[{k + 1}/{len(jobs)}] {scenario} {dtype} {threads} thread(s)"
              + (f" {bench_cpu.case_name(*job[3])}" if len(job) > 3 else ""),
              flush=True)
        for _ in range(args.processes if scenario in ("warm", "cotenant") else 1):
            for tag, root in (runs if turn % 2 == 0 else runs[::-1]):
                entries[tag] += _run_job(args, root, job, plain)
            turn += 1
    return [_result(args, tag, root, machines[tag], best_of_processes(entries[tag]),
                    time.time() - t_start, runs)
            for tag, root in runs]


def best_of_processes(entries):
    """One entry per (scenario, case, dtype, threads): the process with the smallest
    time (entries that failed only where no process succeeded); ``process_seconds``
    lists every process's time, in the order run."""
    best, order = {}, []
    for e in entries:
        k = (e["scenario"], e["case"], e["dtype"], e["threads"])
        if k not in best:
            best[k] = dict(e, process_seconds=[])
            order.append(k)
        b = best[k]
        if e.get("status") == "ok" and e.get("seconds") is not None:
            b["process_seconds"].append(e["seconds"])
            if b.get("status") != "ok" or e["seconds"] < b["seconds"]:
                best[k] = dict(e, process_seconds=b["process_seconds"])
    return [best[k] for k in order]


def _result(args, tag, root, machine, entries, wall, runs):
    return {"benchmark": "core", "tag": tag, "root": os.path.abspath(root),
            "interleaved_with": [t for t, _ in runs if t != tag],
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
            "quick": args.quick, "threads": args.threads, "gamma": GAMMA,
            "processes": args.processes, "wall_seconds": wall,
            "definitions": {
                "seconds": f"minimum of at least {MIN_REPEATS} calls after a warm-up call"
                           + (f", the fastest of {args.processes} worker processes (warm and "
                              "co-tenant)" if args.processes > 1 else ""),
                "ns_per_cell": "seconds / cells * 1e9; cells = B*NA*NB (DTW), B*T*S*S (Viterbi)",
                "cotenant": "2 threads while a busy loop spins on one CPU",
                "first_seconds": "the first call at this size in a fresh process (after one "
                                 "tiny call of the same function)",
                "stored_values_per_cell": "(peak resident growth of the first call - output "
                                          "bytes) / (cells * itemsize)",
                "retained_bytes": "resident growth left after the outputs are freed",
            },
            "machine": machine, "loadavg_at_end": list(os.getloadavg()), "entries": entries}


# ----------------------------------------------------------------------------- reports

def _fmt(x, digits=3):
    return "–" if x is None else f"{x:.{digits}g}"


def _mb(b):
    return "–" if b is None else f"{b / 2**20:.0f}"


def _index(entries):
    return {key(e): e for e in entries if e.get("status") == "ok"}


def _sec(idx, scenario, case, dtype, threads):
    e = idx.get((scenario, case, dtype, threads))
    return e["seconds"] if e else None


def _ratio(a, b):
    return a / b if a is not None and b else None


def criteria(res):
    """The issue's criteria on one run: a list of (criterion, case, value, limit, passed)."""
    idx = _index(res["entries"])
    t1, t2 = min(res["threads"]), max(res["threads"])
    cases = list(dict.fromkeys((e["case"], e["struct"], tuple(e["shape"]))
                               for e in res["entries"] if e["scenario"] == "warm"))
    dtypes = list(dict.fromkeys(e["dtype"] for e in res["entries"]))
    rows = []
    for case, struct, shape in cases:
        for dt in dtypes:
            one, two = _sec(idx, "warm", case, dt, t1), _sec(idx, "warm", case, dt, t2)
            co = _sec(idx, "cotenant", case, dt, t2)
            r = _ratio(two, one)
            rows.append((f"{t2} threads / {t1} thread ≤ {MAX_TWO_OVER_ONE:g}", f"{case} {dt}", r,
                         MAX_TWO_OVER_ONE, None if r is None else r <= MAX_TWO_OVER_ONE))
            splits = shape[0] >= 2 or (struct.startswith("dtw") and shape[1] * shape[2] >= 1024**2)
            if splits:
                s = _ratio(one, two)
                rows.append((f"speed-up {t1}→{t2} threads ≥ {MIN_SPLIT_SPEEDUP:g} (work splits)",
                             f"{case} {dt}", s, MIN_SPLIT_SPEEDUP,
                             None if s is None else s >= MIN_SPLIT_SPEEDUP))
            c = _ratio(co, one)
            rows.append((f"co-tenant / {t1} thread ≤ {MAX_COTENANT:g}", f"{case} {dt}", c,
                         MAX_COTENANT, None if c is None else c <= MAX_COTENANT))
        if struct == "dtw" or (struct == "viterbi" and shape[2] >= 16):
            for th in res["threads"]:
                f = _ratio(_sec(idx, "warm", case, "float64", th),
                           _sec(idx, "warm", case, "float32", th))
                rows.append((f"float64 / float32 time ≥ {MIN_F32_SPEEDUP:g}",
                             f"{case} {th} thr", f, MIN_F32_SPEEDUP,
                             None if f is None else f >= MIN_F32_SPEEDUP))
    for e in res["entries"]:
        if e["scenario"] == "accuracy" and e.get("status") == "ok":
            rows.append((f"float32 E within {MAX_F32_E_ERR:g} of float64 (max abs)",
                         e["case"], e["e_max_abs_err"], MAX_F32_E_ERR,
                         e["e_max_abs_err"] <= MAX_F32_E_ERR))
        if e["scenario"] != "cold" or e.get("status") != "ok":
            continue
        kept, cap = e["retained_bytes"], res["machine"].get("kept_bytes_limit") or \
            DEFAULT_KEPT_BYTES
        rows.append((f"memory kept after a call ≤ the result buffers' cap, {cap >> 20} MiB",
                     f"{e['case']} {e['dtype']}", kept / 2**20, cap >> 20, kept <= cap))
        cleared = e.get("retained_after_clear_bytes")
        rows.append((f"kept after clear_cache() ≤ {MAX_KEPT_AFTER_CLEAR >> 20} MiB",
                     f"{e['case']} {e['dtype']}", None if cleared is None else cleared / 2**20,
                     MAX_KEPT_AFTER_CLEAR >> 20,
                     None if cleared is None else cleared <= MAX_KEPT_AFTER_CLEAR))
        if (e["struct"], tuple(e["shape"])) == COLD_CRITERION_CASE or (
                res["quick"] and e["struct"] == "dtw" and e is _largest_cold(res, e["dtype"])):
            r = e["cold_over_warm"]
            rows.append((f"cold first call / warm ≤ {MAX_COLD_OVER_WARM:g}",
                         f"{e['case']} {e['dtype']}", r, MAX_COLD_OVER_WARM,
                         r <= MAX_COLD_OVER_WARM))
            v = e["stored_values_per_cell"]
            rows.append((f"DTW gradient: values stored per cell besides θ, E ≤ "
                         f"{MAX_STORED_PER_CELL:g}", f"{e['case']} {e['dtype']}", v,
                         MAX_STORED_PER_CELL, v <= MAX_STORED_PER_CELL + 0.05))
    return rows


def _largest_cold(res, dtype):
    es = [e for e in res["entries"] if e["scenario"] == "cold" and e["struct"] == "dtw"
          and e["dtype"] == dtype and e.get("status") == "ok"]
    return max(es, key=lambda e: e["cells"]) if es else None


def _criteria_lines(rows):
    lines = ["| criterion | case | value | passed |", "|---|---|---:|---|"]
    for name, case, value, _, ok in rows:
        mark = "–" if ok is None else ("yes" if ok else "**no**")
        lines.append(f"| {name} | {case} | {_fmt(value)} | {mark} |")
    fails = sum(1 for r in rows if r[4] is False)
    return lines + ["", f"{len(rows) - fails} of {len(rows)} checks passed "
                        f"({sum(1 for r in rows if r[4] is None)} without a number)."]


def _header(res):
    m = res["machine"]
    return [f"Machine: {_machine.one_line(m)}; SIMD {m.get('simd_isa')}; smoothmax from "
            f"`{res['root']}` ({m['smoothmax_engine']}); load average at start "
            f"{m['loadavg_at_start'][0]:.2f}, at end {res['loadavg_at_end'][0]:.2f}; "
            f"{res['wall_seconds']:.0f} s.", "", f"Command: `{res['command']}`", ""]


def to_markdown(res):
    idx = _index(res["entries"])
    t1, t2 = min(res["threads"]), max(res["threads"])
    lines = [f"# Core benchmark `{res['tag']}`{' (quick smoke run)' if res['quick'] else ''}",
             ""] + _header(res)
    lines += ["Warm calls: ns per cell (a DTW cell, a Viterbi edge), the minimum of at least "
              f"{MIN_REPEATS} calls after a warm-up. Co-tenant: {t2} threads while a busy loop "
              "spins on one CPU.", "",
              f"| case | dtype | {t1} thread | {t2} threads | speed-up | co-tenant | "
              f"co-tenant / {t1} thread |", "|---|---|---:|---:|---:|---:|---:|"]
    warm = list(dict.fromkeys((e["case"], e["dtype"]) for e in res["entries"]
                              if e["scenario"] == "warm"))
    for case, dt in warm:
        one, two = _sec(idx, "warm", case, dt, t1), _sec(idx, "warm", case, dt, t2)
        co = _sec(idx, "cotenant", case, dt, t2)
        ns = lambda s: None if s is None else s / idx[("warm", case, dt, t1)]["cells"] * 1e9  # noqa: E731
        lines.append(f"| {case} | {dt} | {_fmt(ns(one))} | {_fmt(ns(two))} | "
                     f"{_fmt(_ratio(one, two))}× | {_fmt(ns(co))} | {_fmt(_ratio(co, one))} |")
    lines += ["", "Cold first calls, each case in a fresh process on "
              f"{t2} threads (MB = 2²⁰ bytes):", "",
              "| case | dtype | first call s | warm s | cold / warm | peak MB first | "
              "peak MB warm | outputs MB | stored values / cell | kept MB | kept MB after "
              "clear_cache |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for e in res["entries"]:
        if e["scenario"] != "cold":
            continue
        if e.get("status") != "ok":
            lines.append(f"| {e['case']} | {e['dtype']} | {e.get('status')} |" + " |" * 8)
            continue
        lines.append(f"| {e['case']} | {e['dtype']} | {e['first_seconds']:.3g} | "
                     f"{e['seconds']:.3g} | {e['cold_over_warm']:.2f} | "
                     f"{_mb(e['first_peak_bytes'])} | {_mb(e['warm_peak_bytes'])} | "
                     f"{_mb(e['out_bytes'])} | {e['stored_values_per_cell']:.2f} | "
                     f"{_mb(e['retained_bytes'])} | {_mb(e.get('retained_after_clear_bytes'))} |")
    for e in res["entries"]:
        if e["scenario"] == "accuracy" and e.get("status") == "ok":
            lines += ["", f"float32 against float64, {e['case']} value + E: E within "
                      f"{e['e_max_abs_err']:.3g} (max abs), value within "
                      f"{e['value_max_rel_err']:.3g} (relative)."]
    errors = [e for e in res["entries"] if e.get("status") != "ok"]
    lines += ["", "## The issue's criteria on this run", ""] + _criteria_lines(criteria(res))
    if errors:
        lines += ["", "Errors:", ""] + [f"- {e['scenario']} {e['case']} {e['dtype']} "
                                        f"{e['threads']} thr: {e['status']}" for e in errors]
    return "\n".join(lines) + "\n"


def _agree(a, b, dtype):
    rtol = bench_cpu.VALUE_RTOL if dtype == "float64" else bench_cpu.VALUE_RTOL_F32
    sa, sb = a.get("summary") or {}, b.get("summary") or {}
    for k in set(sa) & set(sb):
        if abs(sa[k] - sb[k]) > rtol * max(abs(sb[k]), 1e-300):
            return False
    return bool(set(sa) & set(sb))


def compare(before, after):
    bi, ai = _index(before["entries"]), _index(after["entries"])
    rows = []
    for k, b in bi.items():
        if "seconds" not in b:
            continue
        a = ai.get(k)
        if a is None:
            rows.append((k, b, None, None, None))
            continue
        rows.append((k, b, a, a["seconds"] / b["seconds"], _agree(a, b, k[2])))
    return rows


def compare_markdown(before, after, rows):
    slower = [r for r in rows if r[3] is not None and r[3] > SLOWER_FLAG]
    differ = [r for r in rows if r[4] is False]
    lines = [f"# Core benchmark: `{after['tag']}` against `{before['tag']}`", "",
             f"Before: commit {(before['machine']['git_commit'] or '?')[:7]} from "
             f"`{before['root']}`, load average {before['machine']['loadavg_at_start'][0]:.2f} → "
             f"{before['loadavg_at_end'][0]:.2f}.",
             f"After: commit {(after['machine']['git_commit'] or '?')[:7]} from "
             f"`{after['root']}`, load average {after['machine']['loadavg_at_start'][0]:.2f} → "
             f"{after['loadavg_at_end'][0]:.2f}.",
             ("Timed in one run (`--pair`), the jobs alternating between the two checkouts."
              if before["tag"] in after.get("interleaved_with", []) else
              "Timed in two runs (`--tag`), one after the other."), ""] + _header(after)[:1] + ["",
             f"Ratio = after seconds / before seconds (< 1: after is faster); **flagged** where "
             f"after is more than {100 * (SLOWER_FLAG - 1):.0f}% slower. "
             "Outputs agree: the sums of values and of |E| (or |Ė|) within "
             f"{bench_cpu.VALUE_RTOL:g} (float64) / {bench_cpu.VALUE_RTOL_F32:g} (float32) "
             "relative.", "",
             f"{len(slower)} of {len(rows)} entries slower by more than "
             f"{100 * (SLOWER_FLAG - 1):.0f}%; {len(differ)} with outputs that differ.", "",
             "| scenario | case | dtype | threads | before ms | after ms | after / before | "
             "outputs agree |", "|---|---|---|---:|---:|---:|---:|---|"]
    for k, b, a, r, ok in rows:
        flag = f"**{r:.3f}**" if r is not None and r > SLOWER_FLAG else _fmt(r, 3)
        after_ms = "–" if a is None else f"{a['seconds'] * 1e3:.4g}"
        agree = "–" if ok is None else ("yes" if ok else "**no**")
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | {b['seconds'] * 1e3:.4g} | "
                     f"{after_ms} | {flag} | {agree} |")
    lines += _grid_lines(before, after)
    cold = [(k, b, a) for k, b, a, _, _ in rows if k[0] == "cold" and a is not None]
    if cold:
        lines += ["", "Cold first calls and memory (MB = 2²⁰ bytes):", "",
                  "| case | dtype | first call s before → after | cold / warm before → after | "
                  "peak MB first before → after | stored values / cell before → after | "
                  "kept MB before → after | after clear_cache |",
                  "|---|---|---|---|---|---|---|---:|"]
        for k, b, a in cold:
            lines.append(f"| {k[1]} | {k[2]} | {b['first_seconds']:.3g} → {a['first_seconds']:.3g}"
                         f" | {b['cold_over_warm']:.2f} → {a['cold_over_warm']:.2f} | "
                         f"{_mb(b['first_peak_bytes'])} → {_mb(a['first_peak_bytes'])} | "
                         f"{b['stored_values_per_cell']:.2f} → {a['stored_values_per_cell']:.2f} | "
                         f"{_mb(b['retained_bytes'])} → {_mb(a['retained_bytes'])} | "
                         f"{_mb(a.get('retained_after_clear_bytes'))} |")
    for res in (after, before):
        lines += ["", f"## The issue's criteria on `{res['tag']}`", ""]
        lines += _criteria_lines(criteria(res))
    return "\n".join(lines) + "\n"


def _grid_lines(before, after):
    """The issue's thread grid as its table: ns per cell on 1 and 2 threads and co-tenant."""
    t1, t2 = min(after["threads"]), max(after["threads"])
    bi, ai = _index(before["entries"]), _index(after["entries"])
    grid = QUICK_THREAD_GRID if after["quick"] else THREAD_GRID
    lines = ["", "The issue's thread grid, ns per cell (a DTW cell, a Viterbi edge), before → after:",
             "", f"| case | dtype | {t1} thread | {t2} threads | co-tenant ({t2} threads, one CPU "
             "busy) |", "|---|---|---|---|---|"]
    for struct, shape in grid:
        case = bench_cpu.case_name(struct, shape)
        n = bench_cpu.cells(struct, shape)
        for dt in ("float64", "float32"):
            cells = []
            for scenario, th in (("warm", t1), ("warm", t2), ("cotenant", t2)):
                b, a = (_sec(i, scenario, case, dt, th) for i in (bi, ai))
                cells.append(f"{_fmt(b and b / n * 1e9)} → {_fmt(a and a / n * 1e9)}")
            lines.append(f"| {case} | {dt} | " + " | ".join(cells) + " |")
    return lines


def _compare_json(runs, rows):
    return {"before": runs[0]["tag"], "after": runs[1]["tag"],
            "rows": [{"key": list(k), "before_seconds": b["seconds"],
                      "after_seconds": a["seconds"] if a else None, "ratio": r,
                      "outputs_agree": ok} for k, b, a, r, ok in rows],
            "criteria": {r["tag"]: [list(c) for c in criteria(r)] for r in runs}}


def _write(path, res, md):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.splitext(path)[0] + ".md", "w") as f:
        f.write(md)
    print(md)
    print(f"wrote {path} and {os.path.splitext(path)[0]}.md")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tag", default="after", help="names the result files core_<tag>.json/.md")
    p.add_argument("--root", default=ROOT,
                   help="the checkout whose smoothmax is timed (its core built in place)")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes, a smoke run of under a minute (written to the temp dir)")
    p.add_argument("--out-dir", default=None,
                   help="where core_<tag>.* go (default bench/results; with --quick the temp dir)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                   help="the two thread counts compared (default 1 2)")
    p.add_argument("--dtypes", nargs="+", default=["float64", "float32"],
                   choices=["float64", "float32"])
    p.add_argument("--budget", type=float, default=2.0,
                   help=f"seconds of repeats per case (at least {MIN_REPEATS} calls)")
    p.add_argument("--pair", nargs=2, metavar=("BEFORE=ROOT", "AFTER=ROOT"),
                   help="time two checkouts in one run, their jobs alternating, and compare "
                        "them (writes core_BEFORE.*, core_AFTER.* and core_compare.*)")
    p.add_argument("--processes", type=int, default=1,
                   help="worker processes per warm / co-tenant job; per case the fastest "
                        "process is kept (default 1)")
    p.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"),
                   help="compare two runs' tags; writes core_compare.json/.md")
    p.add_argument("--worker", choices=["warm", "cold", "accuracy", "describe"],
                   help=argparse.SUPPRESS)
    p.add_argument("--dtype", help=argparse.SUPPRESS)
    p.add_argument("--scenario", default="warm", help=argparse.SUPPRESS)
    p.add_argument("--cases", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    out_dir = args.out_dir or (os.path.join(tempfile.gettempdir(), "smoothmax-bench-core")
                               if args.quick else os.path.join(HERE, "results"))
    if args.worker:
        args.threads = args.threads[0]
        return {"warm": worker_warm, "cold": worker_cold, "accuracy": worker_accuracy,
                "describe": worker_describe}[args.worker](args)
    args.threads = sorted(args.threads)
    if len(args.threads) != 2:
        p.error("--threads takes two thread counts, e.g. 1 2")
    if args.compare:
        runs = []
        for tag in args.compare:
            with open(os.path.join(out_dir, f"core_{tag}.json")) as f:
                runs.append(json.load(f))
        rows = compare(*runs)
        _write(os.path.join(out_dir, "core_compare.json"), _compare_json(runs, rows),
               compare_markdown(*runs, rows))
        return
    if args.quick:
        args.budget = min(args.budget, 0.1)
    if args.pair:
        runs = [tuple(p.split("=", 1)) for p in args.pair]
        if any(len(r) != 2 for r in runs) or runs[0][0] == runs[1][0]:
            p.error("--pair takes TAG=ROOT TAG=ROOT with two different tags")
    else:
        runs = [(args.tag, args.root)]
    # roots as the caller means them (the workers run in bench/)
    runs = [(tag, os.path.abspath(root)) for tag, root in runs]
    results = run_all(args, runs)
    for res in results:
        _write(os.path.join(out_dir, f"core_{res['tag']}.json"), res, to_markdown(res))
    if len(results) == 2:
        rows = compare(*results)
        _write(os.path.join(out_dir, "core_compare.json"), _compare_json(results, rows),
               compare_markdown(*results, rows))


if __name__ == "__main__":
    main()
