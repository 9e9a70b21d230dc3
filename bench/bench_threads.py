"""Threads, co-tenancy, cold calls and kept memory of the compiled engine (docs/threads.md).

Before/after on one machine in one run: every measurement runs in a fresh
subprocess that imports smoothmax from ``--before`` (e.g. a checkout of
main, with its in-place build) or from this working tree.

* grid: ns per cell (edge) of each case, minimum of ``--repeats`` calls after
  a warm-up, on 1 and 2 threads (``threadpoolctl.threadpool_limits``: the
  OpenMP limit both versions follow), float64 and float32; ``free`` and with
  a co-tenant (``_machine.BusyCore``: a busy loop on the last CPU, beside it);
* cold: a first ``dtw_grad`` at 4096² in a fresh process (after a tiny call
  that loads the engine) against the best of 3 warm calls, and the peak RSS;
* kept: the process's resident memory after one 3000² ``dtw_hvp`` whose
  results were dropped, and after ``smoothmax.clear_cache()`` (where it exists);
* crf: the CRF layer step (``smoothmax.torch.CRF``, B=32, T=128, S=16,
  float64, forward + backward) after a ``dtw_features_grad`` call, inside
  ``threadpool_limits(2)`` entered before the first smoothmax call, torch on
  1 and on 2 threads.

Usage::

    python bench/bench_threads.py --before /work/main --out bench/results/threads

writes ``threads.json`` and ``threads.md``. ``--split`` instead alternates 1 and
2 threads within one process per condition (this tree only; the comparison
of record for "two threads never slower", as the VM's speed moves between
processes): ``threads_split.{md,json}``. ``--wave-bar B`` alternates, on the
one-problem DTW cases (a wavefront of tiles on two threads), one thread, two
threads, and two threads with the co-tenant guard's wavefront bar set to B
(``threads_wavebar.{md,json}``; 0.7 is the batch bar, which wavefronts had
before). ``--guard-ab TREE`` times small batches on one and two threads in
fresh processes alternating between TREE's build and this one
(``threads_guard_ab.{md,json}``), for a change of the co-tenant guard.
``--ceiling`` measures what two threads could give at best on this machine:
two processes, each running the same call on one thread at the same time,
against one process alone, alternated with the pool's own two-thread calls
(``threads_ceiling.{md,json}``). ``--blas`` times the calls of a user
whose loop also calls NumPy's BLAS (a 256 x 64 by 64 x 256 product before
each call, as a cost matrix would be made): one and two threads alternated,
with that product before each call and without it, in a process with
NumPy's OpenBLAS as it comes, one with ``OPENBLAS_NUM_THREADS=1`` (what
``threadpool_limits(1, "blas")`` around the loop does) and one with
``OPENBLAS_THREAD_TIMEOUT=4`` (OpenBLAS's idle threads sleep at once instead
of spinning for about 0.1 s; ``threads_blas.{md,json}``). Run it on a machine at rest (``/work/quiet``
here); the load average at start and end is recorded.
"""
import argparse
import contextlib
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from _machine import BusyCore  # noqa: E402

GRID = [  # (name, function, shape)
    ("dtw_hvp", "dtw_hvp", (2, 200, 200)),
    ("dtw_hvp", "dtw_hvp", (1, 1024, 1024)),
    ("viterbi_hvp", "viterbi_hvp", (32, 128, 16, 16)),
    ("dtw_grad", "dtw_grad", (32, 256, 256)),
    ("dtw_grad", "dtw_grad", (2, 200, 200)),
    ("dtw_grad", "dtw_grad", (4, 128, 128)),
    ("dtw_grad", "dtw_grad", (1, 1024, 1024)),
    ("dtw_value", "dtw", (2, 200, 200)),
    ("dtw_value", "dtw", (1, 1024, 1024)),
    ("viterbi_grad", "viterbi_grad", (32, 128, 16, 16)),
    ("viterbi_grad", "viterbi_grad", (32, 128, 64, 64)),
    ("crf_grad", "crf_grad", (32, 128, 16)),
    ("dtw_features_grad", "dtw_features_grad", (2, 1000, 1000, 16)),
]

# a grid case's call and its cells (edges), in the children of GRID_CODE and SPLIT_CODE
CASE_CODE = r"""
import numpy as np
import smoothmax as sm
rng = np.random.default_rng(0)

def make(fn, shape, dt):
    if fn == "crf_grad":
        B, T, S = shape
        em, A = rng.standard_normal((B, T, S)).astype(dt), rng.standard_normal((S, S)).astype(dt)
        return (lambda: sm.crf.crf_grad(em, A)), B * T * S * S
    if fn == "dtw_features_grad":
        B, NA, NB, d = shape
        x, y = rng.random((B, NA, d)).astype(dt), rng.random((B, NB, d)).astype(dt)
        return (lambda: sm.dtw_features_grad(x, y)), B * NA * NB
    theta = rng.random(shape).astype(dt)
    Z = rng.standard_normal(shape).astype(dt)
    g = getattr(sm, fn)
    return ((lambda: g(theta, Z)) if fn.endswith("hvp") else (lambda: g(theta))), int(np.prod(shape))
"""

GRID_CODE = CASE_CODE + r"""
import json, sys, time
from threadpoolctl import threadpool_limits
cases, repeats = json.loads(sys.argv[1]), int(sys.argv[2])
out = []

def best(f):
    f()
    b = float("inf")
    for _ in range(repeats):
        t = time.perf_counter(); f(); b = min(b, time.perf_counter() - t)
    return b

for name, fn, shape in cases:
    for dt in ("float64", "float32"):
        f, cells = make(fn, shape, dt)
        for n in (1, 2):
            with threadpool_limits(n):
                out.append(dict(case=name, shape=list(shape), dtype=dt, threads=n,
                                ns=best(f) / cells * 1e9))
print(json.dumps(out))
"""

COLD_CODE = r"""
import json, resource, time
import numpy as np
import smoothmax as sm
N = 4096
theta = np.random.default_rng(0).random((1, N, N))
sm.dtw_grad(theta[:, :8, :8])  # load the engine: what follows is the first large call
t = time.perf_counter(); v, E = sm.dtw_grad(theta); cold = time.perf_counter() - t
del E
warm = float("inf")
for _ in range(3):
    t = time.perf_counter(); v, E = sm.dtw_grad(theta); warm = min(warm, time.perf_counter() - t)
    del E
print(json.dumps(dict(cold_s=cold, warm_s=warm,
                      peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)))
"""

KEPT_CODE = r"""
import gc, json, os
import numpy as np
import smoothmax as sm

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

theta = np.random.default_rng(0).random((1, 3000, 3000))
Z = np.ones_like(theta)
before = rss()
sm.dtw_hvp(theta, Z)  # the results are dropped at once
gc.collect()
after = rss()
cleared = None
if hasattr(sm, "clear_cache"):
    sm.clear_cache(); gc.collect(); cleared = rss() - before
print(json.dumps(dict(kept_mb=after - before, after_clear_mb=cleared)))
"""

CRF_CODE = r"""
import json, sys, time
import numpy as np, torch
from threadpoolctl import threadpool_limits
tn = int(sys.argv[1])
with threadpool_limits(2):
    import smoothmax as sm, smoothmax.torch as smt
    torch.set_num_threads(tn)
    x, y = np.random.default_rng(0).random((2, 2, 500, 16))
    sm.dtw_features_grad(x, y)
    crf = smt.CRF(16, batch_first=True).double()
    em = torch.randn(32, 128, 16, dtype=torch.float64, requires_grad=True)
    tags = torch.randint(0, 16, (32, 128))
    ts = []
    for _ in range(10):
        t = time.perf_counter(); crf(em, tags).sum().backward(); ts.append(time.perf_counter() - t)
print(json.dumps(dict(torch_threads=tn, min_ms=1e3 * min(ts), median_ms=1e3 * float(np.median(ts)))))
"""


SPLIT_CODE = CASE_CODE + r"""
import json, sys, time
from smoothmax._core import pool
cases, rounds, per = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
# settings taken in turn: (threads, the guard's wavefront bar, None: the default[, the
# user's work before each call: "blas", a NumPy product as a cost matrix would be made])
settings = json.loads(sys.argv[4])
bars = pool._set_guard_bars()
X, Y = rng.random((256, 64)), rng.random((64, 256))
before_call = {None: lambda: None, "blas": lambda: X @ Y}
out = []
for name, fn, shape in cases:
    for dt in ("float64", "float32"):
        f, cells = make(fn, shape, dt)
        times, trips = [[] for _ in settings], [0 for _ in settings]
        for _ in range(rounds):
            for k, (n, wave_bar, *pre) in enumerate(settings):
                user = before_call[pre[0] if pre else None]
                sm.set_num_threads(n)
                pool._set_guard_bars(bars[0], bars[1] if wave_bar is None else wave_bar)
                t_end = time.perf_counter() + 0.1
                user(); f()
                while time.perf_counter() < t_end:  # past a backoff the switch may have caused
                    user(); f()
                t0 = pool._probe()["guard_trips"]
                for _ in range(per):
                    user()
                    t = time.perf_counter(); f(); times[k].append(time.perf_counter() - t)
                trips[k] += pool._probe()["guard_trips"] - t0
        sm.set_num_threads(None)
        pool._set_guard_bars(*bars)
        ns = [float(np.median(t)) / cells * 1e9 for t in times]
        out.append(dict(case=name, shape=list(shape), dtype=dt, ns=ns, trips=trips, cells=cells))
print(json.dumps(out))
"""


# --blas: SPLIT_CODE with the user's BLAS call before each call in some settings
BLAS_CASES = [c for c in GRID if c[2] in ((1, 1024, 1024), (2, 200, 200), (32, 256, 256),
                                          (32, 128, 16, 16))]
BLAS_SETTINGS = [[n, None, pre] for pre in (None, "blas") for n in (1, 2)]  # SPLIT_CODE's
BLAS_PROCESSES = {"default": {}, "blas1": {"OPENBLAS_NUM_THREADS": "1"},
                  "timeout4": {"OPENBLAS_THREAD_TIMEOUT": "4"}}

def _write(base, res, lines):
    """``base``.json (the measurements) and ``base``.md (the table), printed too."""
    os.makedirs(os.path.dirname(base), exist_ok=True)
    with open(base + ".json", "w") as f:
        json.dump(res, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def _alternated(a, cases, settings):
    """SPLIT_CODE's settings taken in turn on ``cases``, one process free and one with a
    co-tenant; the machine and the load average around them."""
    from _machine import describe

    res = {"machine": describe(), "load_start": os.getloadavg(), "t0": time.time(),
           "rounds": a.rounds, "per_round": 3, "settings": settings}
    for cond in ("free", "cotenant"):
        res[cond] = _run(ROOT, SPLIT_CODE, json.dumps(cases), str(a.rounds), "3",
                         json.dumps(settings), cotenant=cond == "cotenant")
    _ended(res, res.pop("t0"))
    return res


def _ended(res, t0):
    """Stamp a run's end: the load average and the seconds since ``t0``."""
    res["load_end"] = os.getloadavg()
    res["seconds"] = time.time() - t0


def _machine_line(res):
    from _machine import one_line

    return (f"Machine: {one_line(res['machine'])}; {res['seconds']:.0f} s; load average "
            f"{res['load_start'][0]:.2f} → {res['load_end'][0]:.2f}; ")


def _split(a):
    """``--split``: 1 and 2 threads alternated within one process, free and with a co-tenant."""
    res = _alternated(a, GRID, [[1, None], [2, None]])
    lines = ["# Threads: one and two alternated within one process", "",
             _machine_line(res) + f"`python bench/bench_threads.py --split --rounds {a.rounds}`. "
             "One process per "
             "condition; for each case, `smoothmax.set_num_threads` 1 and 2 in turn, warm-up "
             "calls for 0.1 s (the first two-thread call after one-thread calls wakes a sleeping "
             "worker and may trip the co-tenant guard, whose 50 ms at one thread would cover the "
             f"timed calls) and 3 timed calls each, {a.rounds} rounds; ns per cell (edge) from the "
             "median call of each setting. Co-tenant: another process spins on the last CPU "
             "(`_machine.BusyCore`).", "",
             "| case | dtype | free: 1t ns | 2t ns | 1t / 2t | co-tenant: 1t ns | 2t ns | 2t / 1t | "
             "guard trips (2t, co-tenant) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for fr, co in zip(res["free"], res["cotenant"]):
        shape = "×".join(str(x) for x in fr["shape"])
        (f1, f2), (c1, c2) = fr["ns"], co["ns"]
        lines.append(f"| {fr['case']} {shape} | {fr['dtype']} | {f1:.2f} | {f2:.2f} | "
                     f"{f1 / f2:.2f} | {c1:.2f} | {c2:.2f} | {c2 / c1:.2f} | {co['trips'][1]} |")
    _write(a.out + "_split", res, lines)


def _wave_bar(a):
    """``--wave-bar B``: the one-problem (wavefront) cases of the grid, alternating one
    thread, two threads with the guard's default wavefront bar, and two with bar B."""
    cases = [c for c in GRID if c[2][0] == 1 and c[1].startswith("dtw") and "features" not in c[1]]
    res = _alternated(a, cases, [[1, None], [2, None], [2, a.wave_bar]])
    lines = ["# Threads: the co-tenant guard's bar for a wavefront", "",
             _machine_line(res) + f"`python bench/bench_threads.py --wave-bar {a.wave_bar} "
             f"--rounds {a.rounds}`. One "
             "process per condition; for each case, in turn: one thread, two threads with the "
             "default bar for a wavefront, two threads with the wavefront judged against "
             f"{a.wave_bar} (a job trips the guard when its wall time exceeds the bar times its "
             "threads' CPU time); warm-up calls for 0.1 s and 3 timed calls each, "
             f"{a.rounds} rounds; the ratio of the median one-thread call to the median call of "
             "each two-thread setting, and the guard's trips during the timed calls. Co-tenant: "
             "another process spins on the last CPU (`_machine.BusyCore`).", "",
             f"| case | dtype | condition | 1t ms | 1t / 2t, default bar | 1t / 2t, bar {a.wave_bar} "
             "| trips, default | trips, bar |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for cond in ("free", "cotenant"):
        for r in res[cond]:
            shape = "×".join(str(x) for x in r["shape"])
            cells = 1
            for x in r["shape"]:
                cells *= x
            lines.append(f"| {r['case']} {shape} | {r['dtype']} | {cond} | "
                         f"{r['ns'][0] * cells * 1e-6:.2f} | {r['ns'][0] / r['ns'][1]:.2f} | "
                         f"{r['ns'][0] / r['ns'][2]:.2f} | {r['trips'][1]} | {r['trips'][2]} |")
    _write(a.out + "_wavebar", res, lines)


GUARD_CASES = [("dtw_hvp", (2, 200, 200), "float64"), ("dtw_hvp", (2, 200, 200), "float32"),
               ("dtw", (2, 200, 200), "float32"), ("dtw_grad", (2, 200, 200), "float64")]

# one process of --guard-ab: per case, 1 then 2 threads, back-to-back calls for 0.3 s each
GUARD_CODE = r"""
import json, sys, time
import numpy as np
import smoothmax as sm
from smoothmax._core import pool
rng = np.random.default_rng(0)
out = []
for fn, shape, dt in json.loads(sys.argv[1]):
    th = rng.standard_normal(shape).astype(dt); z = rng.standard_normal(shape).astype(dt)
    f = getattr(sm, fn); args = (th, z) if fn.endswith("hvp") else (th,)
    r = {}
    for n in (1, 2):
        sm.set_num_threads(n); f(*args); t0 = pool._probe()["guard_trips"]; ts = []; on2 = 0
        t_end = time.perf_counter() + 0.3
        while time.perf_counter() < t_end:
            t = time.perf_counter(); f(*args); ts.append(time.perf_counter() - t)
            on2 += pool._probe()["used"] == 2
        r[n] = dict(median=float(np.median(ts)), on2=on2 / len(ts),
                    trips=pool._probe()["guard_trips"] - t0)
    out.append(dict(case=fn, shape=list(shape), dtype=dt, one=r[1], two=r[2]))
print(json.dumps(out))
"""


def _guard_ab(a):
    """``--guard-ab TREE``: the co-tenant guard of another tree against this one's on small
    batches, fresh processes alternating between the trees (``--rounds`` each)."""
    import numpy as np
    from _machine import describe

    t0 = time.time()
    trees = {"before": os.path.abspath(a.guard_ab), "after": ROOT}
    res = {"machine": describe(), "load_start": os.getloadavg(), "trees": trees, "rounds": []}
    for r in range(a.rounds):
        for tag in (["before", "after"] if r % 2 == 0 else ["after", "before"]):
            res["rounds"].append(dict(tree=tag, cases=_run(trees[tag], GUARD_CODE,
                                                           json.dumps(GUARD_CASES))))
    _ended(res, t0)
    lines = ["# Threads: the co-tenant guard, two trees on small batches", "",
             _machine_line(res) + f"before: `{trees['before']}`, "
             f"after: `{trees['after']}`; `python bench/bench_threads.py --guard-ab <before> "
             f"--rounds {a.rounds}`. Fresh processes, alternating between the trees, "
             f"{a.rounds} each; in each, for each case, back-to-back calls for 0.3 s on one "
             "thread, then on two. Per tree: the median over processes of 1t / 2t (each the "
             "ratio of the median calls), the fraction of two-thread calls whose job ran on "
             "two threads, and the guard's trips.", "",
             "| case | dtype | before: 1t / 2t | on 2 | trips | after: 1t / 2t | on 2 | trips |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for i, (fn, shape, dt) in enumerate(GUARD_CASES):
        cells = []
        for tag in ("before", "after"):
            rows = [rd["cases"][i] for rd in res["rounds"] if rd["tree"] == tag]
            cells += [f"{np.median([x['one']['median'] / x['two']['median'] for x in rows]):.2f}",
                      f"{np.mean([x['two']['on2'] for x in rows]):.2f}",
                      str(sum(x["two"]["trips"] for x in rows))]
        lines.append(f"| {fn} {'×'.join(map(str, shape))} | {dt} | " + " | ".join(cells) + " |")
    _write(a.out + "_guard_ab", res, lines)

# one worker of --ceiling: reads commands (case, dtype, threads, seconds) from stdin, answers
# each with the call times of back-to-back calls for that long (after 0.1 s of warm-up)
CEILING_CODE = CASE_CODE + r"""
import json, sys, time
made = {}
print("ready", flush=True)
for line in sys.stdin:
    name, fn, shape, dt, n, seconds = json.loads(line)
    key = (fn, tuple(shape), dt)
    if key not in made:
        made.clear()  # one case's arrays at a time
        made[key] = make(fn, tuple(shape), dt)
    f, cells = made[key]
    sm.set_num_threads(n)
    t_end = time.perf_counter() + 0.1
    f()
    while time.perf_counter() < t_end:
        f()
    ts = []
    t_end = time.perf_counter() + seconds
    while len(ts) < 3 or time.perf_counter() < t_end:
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    print(json.dumps(dict(median=float(np.median(ts)), calls=len(ts), cells=cells)), flush=True)
"""


class _Worker:
    """A child process running CEILING_CODE on this tree."""

    def __init__(self):
        env = dict(os.environ, PYTHONPATH=ROOT)
        for k in ("OMP_NUM_THREADS", "SMOOTHMAX_NUM_THREADS"):
            env.pop(k, None)
        self.p = subprocess.Popen([sys.executable, "-c", CEILING_CODE], env=env, cwd=ROOT,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if self.p.stdout.readline().strip() != "ready":
            raise RuntimeError("a --ceiling worker did not start")

    def send(self, *cmd):
        self.p.stdin.write(json.dumps(cmd) + "\n")
        self.p.stdin.flush()

    def answer(self):
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError("a --ceiling worker died")
        return json.loads(line)

    def close(self):
        self.p.stdin.close()
        self.p.wait(timeout=60)


def _ceiling(a):
    """``--ceiling``: per case, in turn: one process alone on one thread (t1), two processes
    at once on one thread each (tA, tB: the best two threads could do, with nothing shared
    but the machine), and the first process alone on two threads of the pool (t2)."""
    import numpy as np
    from _machine import describe

    t0 = time.time()
    res = {"machine": describe(), "load_start": os.getloadavg(), "rounds": a.rounds,
           "seconds_per_setting": a.seconds, "cases": []}
    wa, wb = _Worker(), _Worker()
    try:
        for name, fn, shape in GRID:
            for dt in ("float64", "float32"):
                rows = []
                for _ in range(a.rounds):
                    wa.send(name, fn, shape, dt, 1, a.seconds)
                    one = wa.answer()
                    wa.send(name, fn, shape, dt, 1, a.seconds)
                    wb.send(name, fn, shape, dt, 1, a.seconds)
                    pa, pb = wa.answer(), wb.answer()
                    wa.send(name, fn, shape, dt, 2, a.seconds)
                    two = wa.answer()
                    rows.append(dict(t1=one["median"], tA=pa["median"], tB=pb["median"],
                                     t2=two["median"]))
                ceil = [r["t1"] / r["tA"] + r["t1"] / r["tB"] for r in rows]
                got = [r["t1"] / r["t2"] for r in rows]
                res["cases"].append(dict(case=name, shape=list(shape), dtype=dt, rounds=rows,
                                         ceiling=float(np.median(ceil)),
                                         speedup=float(np.median(got)),
                                         of_ceiling=float(np.median(np.divide(got, ceil)))))
                print(name, shape, dt, f"ceiling {res['cases'][-1]['ceiling']:.2f}",
                      f"2 threads {res['cases'][-1]['speedup']:.2f}", file=sys.stderr)
    finally:
        wa.close()
        wb.close()
    _ended(res, t0)
    lines = ["# Threads: the pool's two threads against two processes", "",
             _machine_line(res) + f"`python bench/bench_threads.py --ceiling --rounds {a.rounds} "
             f"--seconds {a.seconds}`. Two worker processes of this tree; for each case, "
             f"{a.rounds} rounds of: the first alone on one thread (t1), both at once on one "
             "thread each (tA, tB), the first alone on two threads (t2); each setting 0.1 s of "
             f"warm-up, then back-to-back calls for {a.seconds} s, its median call. The "
             "ceiling t1/tA + t1/tB is what two threads give when they share nothing but the "
             "machine: the CPUs' unequal speeds, the caches, memory bandwidth and other "
             "tenants. Medians over the rounds.", "",
             "| case | dtype | 1t ms | two processes: ceiling | two threads: 1t / 2t | "
             "two threads / ceiling |",
             "|---|---|---:|---:|---:|---:|"]
    for c in res["cases"]:
        t1 = float(np.median([r["t1"] for r in c["rounds"]]))
        lines.append(f"| {c['case']} {'×'.join(map(str, c['shape']))} | {c['dtype']} | "
                     f"{t1 * 1e3:.2f} | {c['ceiling']:.2f} | {c['speedup']:.2f} | "
                     f"{c['of_ceiling']:.2f} |")
    _write(a.out + "_ceiling", res, lines)


def _blas(a):
    """``--blas``: SPLIT_CODE with BLAS_SETTINGS in one process for each environment of
    BLAS_PROCESSES."""
    from _machine import describe

    t0 = time.time()
    res = {"machine": describe(), "load_start": os.getloadavg(), "rounds": a.rounds, "per_round": 3,
           "settings": BLAS_SETTINGS, "processes": BLAS_PROCESSES}
    args = (json.dumps(BLAS_CASES), str(a.rounds), "3", json.dumps(BLAS_SETTINGS))
    for name, env in BLAS_PROCESSES.items():
        res[name] = _run(ROOT, SPLIT_CODE, *args, env=env)
    _ended(res, t0)
    lines = ["# Threads beside NumPy's BLAS", "",
             _machine_line(res) + f"`python bench/bench_threads.py --blas --rounds {a.rounds}`. "
             "A user's loop: a NumPy product of 256×64 by 64×256 before each call, as a cost "
             "matrix would be made, then the call; only the call is timed. In one process, "
             "`smoothmax.set_num_threads` 1 and 2, with and without the product, taken in turn "
             f"(0.1 s of warm-up, then 3 timed calls, {a.rounds} rounds; the median call, ms). "
             "One process with NumPy's OpenBLAS as it comes (two threads here), one with "
             "`OPENBLAS_NUM_THREADS=1` (as `threadpoolctl.threadpool_limits(1, \"blas\")` "
             "around the loop), one with `OPENBLAS_THREAD_TIMEOUT=4` (OpenBLAS's idle threads "
             "sleep at once instead of spinning for about 2^28 cycles). Speed-up = 1t / 2t; "
             "trips: the co-tenant guard's, over the timed two-thread calls.", "",
             "| case | dtype | no product: 1t ms | speed-up | product: 1t ms | speed-up | trips | "
             "product, `OPENBLAS_NUM_THREADS=1`: speed-up | trips | product, "
             "`OPENBLAS_THREAD_TIMEOUT=4`: speed-up | trips |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for d, o, t in zip(res["default"], res["blas1"], res["timeout4"]):
        (n1, n2, b1, b2), ms = d["ns"], d["cells"] * 1e-6  # ns per cell -> ms a call
        lines.append(f"| {d['case']} {'×'.join(map(str, d['shape']))} | {d['dtype']} | "
                     f"{n1 * ms:.2f} | {n1 / n2:.2f} | {b1 * ms:.2f} | {b1 / b2:.2f} | "
                     f"{d['trips'][3]} | {o['ns'][2] / o['ns'][3]:.2f} | {o['trips'][3]} | "
                     f"{t['ns'][2] / t['ns'][3]:.2f} | {t['trips'][3]} |")
    _write(a.out + "_blas", res, lines)


def _run(tree, code, *args, cotenant=False, env=None):
    extra, env = env or {}, dict(os.environ, PYTHONPATH=tree)
    for k in ("OMP_NUM_THREADS", "SMOOTHMAX_NUM_THREADS", "OPENBLAS_THREAD_TIMEOUT",
              "OPENBLAS_NUM_THREADS"):
        env.pop(k, None)
    env.update(extra)
    with BusyCore() if cotenant else contextlib.nullcontext():
        res = subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=tree,
                             capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
        raise RuntimeError(f"{tree}: {res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _fmt(x, nd=2):
    return "–" if x is None else f"{x:.{nd}f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", help="tree (with its build) to compare with (required without --split)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "threads"))
    ap.add_argument("--parts", nargs="+", default=["grid", "cold", "kept", "crf"])
    ap.add_argument("--split", action="store_true",
                    help="instead: this tree only, 1 and 2 threads alternated within one process "
                    "(free and co-tenant): <out>_split.{md,json}")
    ap.add_argument("--rounds", type=int, default=8, help="--split: rounds over the two settings")
    ap.add_argument("--wave-bar", type=float, default=None,
                    help="instead: the one-problem DTW cases, alternating 1 thread, 2 threads and 2 "
                    "threads with the guard's wavefront bar set to this value: <out>_wavebar.{md,json}")
    ap.add_argument("--guard-ab", metavar="TREE", default=None,
                    help="instead: small batches, fresh processes alternating between TREE's "
                    "build and this one (the co-tenant guard's rules): <out>_guard_ab.{md,json}")
    ap.add_argument("--ceiling", action="store_true",
                    help="instead: two processes on one thread each against the pool's two "
                    "threads, alternated: <out>_ceiling.{md,json}")
    ap.add_argument("--blas", action="store_true",
                    help="instead: calls after a NumPy BLAS product, one and two threads "
                    "alternated: <out>_blas.{md,json}")
    ap.add_argument("--seconds", type=float, default=0.4,
                    help="--ceiling: seconds of timed calls per setting")
    a = ap.parse_args(argv)
    if a.blas:
        return _blas(a)
    if a.ceiling:
        return _ceiling(a)
    if a.guard_ab is not None:
        return _guard_ab(a)
    if a.wave_bar is not None:
        return _wave_bar(a)
    if a.split:
        return _split(a)
    if not a.before:
        ap.error("--before is required (or --split)")
    from _machine import describe

    trees = {"before": os.path.abspath(a.before), "after": ROOT}
    load0 = os.getloadavg()
    res = {"machine": describe(), "load_start": load0, "trees": trees}
    if "grid" in a.parts:
        for cond in ("free", "cotenant"):
            for tag, tree in trees.items():
                res[f"grid_{cond}_{tag}"] = _run(tree, GRID_CODE, json.dumps(GRID), str(a.repeats),
                                                 cotenant=cond == "cotenant")
    if "cold" in a.parts:
        for tag, tree in trees.items():
            res[f"cold_{tag}"] = [_run(tree, COLD_CODE) for _ in range(2)]
    if "kept" in a.parts:
        for tag, tree in trees.items():
            res[f"kept_{tag}"] = _run(tree, KEPT_CODE)
    if "crf" in a.parts:
        for tag, tree in trees.items():
            res[f"crf_{tag}"] = [_run(tree, CRF_CODE, str(tn), cotenant=c) for c in (False, True)
                                 for tn in (1, 2)]
    res["load_end"] = os.getloadavg()
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out + ".json", "w") as f:
        json.dump(res, f, indent=1)
    with open(a.out + ".md", "w") as f:
        f.write(_markdown(res, a))
    print(open(a.out + ".md").read())


def _section(title, columns, rows):
    if not rows:
        return []
    return ([f"## {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            + ["| " + " | ".join(r) + " |" for r in rows] + [""])


def _markdown(res, a):
    from _machine import one_line

    m = res["machine"]
    lines = ["# Threads, co-tenancy, cold calls, kept memory (docs/threads.md)", "",
             f"Machine: {one_line(m)}; load average at start {res['load_start'][0]:.2f}, "
             f"at end {res['load_end'][0]:.2f}.", "",
             f"Command: `python bench/bench_threads.py --before {a.before} --repeats {a.repeats}`; "
             f"before = `{res['trees']['before']}`, after = this tree.", ""]
    if "grid_free_before" in res:
        lines += ["## Grid: ns per cell (edge), minimum of the repeats; 2t/1t = two threads over one", "",
                  "| case | dtype | before 1t | before 2t | before 2t/1t | after 1t | after 2t | "
                  "after 2t/1t | co-tenant before 2t/1t | co-tenant after 2t/1t | after 1t / before 1t |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]

        def table(key):
            t = {}
            for r in res[key]:
                t[(r["case"], tuple(r["shape"]), r["dtype"], r["threads"])] = r["ns"]
            return t
        fb, fa = table("grid_free_before"), table("grid_free_after")
        cb, ca = table("grid_cotenant_before"), table("grid_cotenant_after")
        for (case, shape, dt, n) in fb:
            if n != 1:
                continue
            k1, k2 = (case, shape, dt, 1), (case, shape, dt, 2)
            lines.append(f"| {case} {'x'.join(map(str, shape))} | {dt} | {fb[k1]:.2f} | {fb[k2]:.2f} | "
                         f"{fb[k2] / fb[k1]:.2f} | {fa[k1]:.2f} | {fa[k2]:.2f} | {fa[k2] / fa[k1]:.2f} | "
                         f"{cb[k2] / cb[k1]:.2f} | {ca[k2] / ca[k1]:.2f} | {fa[k1] / fb[k1]:.2f} |")
        lines.append("")
    cold = [(tag, f"{r['cold_s']:.3f}", f"{r['warm_s']:.3f}", f"{r['cold_s'] / r['warm_s']:.2f}",
             f"{r['peak_rss_mb']:.0f}") for tag in ("before", "after") for r in res.get(f"cold_{tag}", [])]
    lines += _section("Cold first call: dtw_grad 1x4096x4096 float64, fresh process",
                      ("tree", "cold (s)", "warm (s)", "cold / warm", "peak RSS (MB)"), cold)
    kept = [(tag, f"{res[f'kept_{tag}']['kept_mb']:.0f}", _fmt(res[f"kept_{tag}"]["after_clear_mb"], 0))
            for tag in ("before", "after") if f"kept_{tag}" in res]
    lines += _section("Kept memory after one 3000² dtw_hvp (results dropped)",
                      ("tree", "resident MB kept", "after clear_cache()"), kept)
    crf = [(tag, "yes" if c else "no", str(r["torch_threads"]), f"{r['min_ms']:.1f}", f"{r['median_ms']:.1f}")
           for tag in ("before", "after")
           for r, c in zip(res.get(f"crf_{tag}", []), (False, False, True, True))]
    lines += _section("CRF layer step (B=32, T=128, S=16, float64) after dtw_features_grad, "
                      "inside threadpool_limits(2)",
                      ("tree", "co-tenant", "torch threads", "min (ms)", "median (ms)"), crf)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
