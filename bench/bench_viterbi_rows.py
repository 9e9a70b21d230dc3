"""Viterbi value and value + gradient over the number of tags S, two checkouts.

The compiled Viterbi step runs rows of at least one vector of doubles in
vector code and shorter rows in loops (``vit_fwd`` in ``_core/simd.h``); this
sweep times both sides of that switch, in float32 and float64, on one thread,
for two checkouts whose cores are built in place, and writes
``bench/results/viterbi_rows.md`` (+ ``.json``) with the machine named.

Each (checkout, S, dtype) runs in its own process (``OMP_NUM_THREADS=1``,
``smoothmax.set_num_threads(1)``), the checkouts alternating; the time is the
minimum of the calls after a warm-up call, over batch 32 × length 128 ×
S² edges, negentropy, γ = 1; ns per edge.

Usage::

    python bench/bench_viterbi_rows.py before=/path/to/old/checkout after=.
"""
import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _machine  # noqa: E402

SIZES = (2, 3, 4, 5, 7, 8, 12, 16, 24, 32, 64)
DTYPES = ("float64", "float32")

_WORKER = r"""
import json, sys, time
import numpy as np
import smoothmax as sm
S, dtype, calls = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
sm.set_num_threads(1)
theta = np.random.default_rng(0).standard_normal((32, 128, S, S)).astype(dtype)
def best(f):
    f()
    ts = []
    for _ in range(calls):
        t0 = time.perf_counter(); f(); ts.append(time.perf_counter() - t0)
    return min(ts)
value = best(lambda: sm.viterbi(theta, gamma=1.0))
grad = best(lambda: sm.viterbi_grad(theta, gamma=1.0))
print(json.dumps({"value_ns": value / theta.size * 1e9, "grad_ns": grad / theta.size * 1e9,
                  "module": sm.__file__}))
"""


def _run(root, S, dtype, calls):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.path.abspath(root))
    out = subprocess.run([sys.executable, "-c", _WORKER, str(S), dtype, str(calls)], env=env,
                         capture_output=True, text=True, check=True, cwd=os.path.abspath(root))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pair", nargs=2, metavar="TAG=ROOT", help="two checkouts, e.g. before=../old after=.")
    ap.add_argument("--calls", type=int, default=30, help="timed calls per case (minimum kept)")
    ap.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="the numbers of tags S")
    ap.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)
    roots = []
    for item in args.pair:
        tag, sep, root = item.partition("=")
        if not sep or not tag or not os.path.isdir(root):
            raise SystemExit(f"pair: expected TAG=DIR with an existing DIR, got {item!r}")
        roots.append((tag, root))
    machine = _machine.describe(root=roots[1][1])
    t0 = time.perf_counter()
    rows = []
    for S in args.sizes:
        for dtype in DTYPES:
            entry = {"S": S, "dtype": dtype}
            for tag, root in (roots if (S + len(rows)) % 2 == 0 else roots[::-1]):
                entry[tag] = _run(root, S, dtype, args.calls)
            rows.append(entry)
            (a, _), (b, _) = roots
            print(f"S={S:3d} {dtype}: value {entry[a]['value_ns']:.2f} -> {entry[b]['value_ns']:.2f}, "
                  f"value+grad {entry[a]['grad_ns']:.2f} -> {entry[b]['grad_ns']:.2f} ns/edge",
                  flush=True)
    (a, ra), (b, rb) = roots
    commits = {tag: (_machine._git("rev-parse", "--short", "HEAD", root=root) or "?")
               + ("+dirty" if _machine._git("status", "--porcelain", "--untracked-files=no",
                                            root=root) else "")
               for tag, root in roots}
    res = {"machine": machine, "roots": {a: ra, b: rb}, "commits": commits,
           "seconds": time.perf_counter() - t0, "rows": rows}
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "viterbi_rows.json"), "w") as f:
        json.dump(res, f, indent=1)
    lines = [f"# Viterbi over the number of tags: `{b}` against `{a}`", "",
             f"Machine: {_machine.one_line(machine)}; load average at start "
             f"{machine['loadavg_at_start'][0]:.2f}; {res['seconds']:.0f} s. "
             f"`{a}`: commit {commits[a]} (`{ra}`), `{b}`: commit {commits[b]} (`{rb}`).", "",
             "One thread, batch 32 × length 128 × S², negentropy, γ = 1; ns per edge, the "
             f"minimum of {args.calls} calls; ratio = {b} / {a} (< 1: {b} is faster).", "",
             f"| S | dtype | value {a} | value {b} | ratio | value+grad {a} | value+grad {b} | ratio |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        va, vb = r[a]["value_ns"], r[b]["value_ns"]
        ga, gb = r[a]["grad_ns"], r[b]["grad_ns"]
        lines.append(f"| {r['S']} | {r['dtype']} | {va:.2f} | {vb:.2f} | {vb / va:.2f} | "
                     f"{ga:.2f} | {gb:.2f} | {gb / ga:.2f} |")
    lines += ["", "float64 / float32 time of the value + gradient:", "",
              f"| S | {a} | {b} |", "|---:|---:|---:|"]
    by = {(r["S"], r["dtype"]): r for r in rows}
    for S in args.sizes:
        f64, f32 = by[S, "float64"], by[S, "float32"]
        lines.append(f"| {S} | {f64[a]['grad_ns'] / f32[a]['grad_ns']:.2f} | "
                     f"{f64[b]['grad_ns'] / f32[b]['grad_ns']:.2f} |")
    with open(os.path.join(args.out_dir, "viterbi_rows.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {os.path.join(args.out_dir, 'viterbi_rows.md')}")


if __name__ == "__main__":
    main()
