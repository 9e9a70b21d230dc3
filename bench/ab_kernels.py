"""Before/after timing of the compiled core's kernels: two builds of smoothmax, one machine.

Each build is a folder holding a built ``smoothmax`` package (e.g. a copy of
``smoothmax/`` from main after ``setup.py build_ext --inplace``, and one from
a branch). Every (build, repeat) runs in a fresh subprocess with
``OMP_NUM_THREADS`` set before any import; the builds alternate, and the
number kept is the minimum over repeats of the minimum of ``--calls`` calls
after a warm-up call, in ns per cell (DTW) or per edge (Viterbi, T·S² of
them). A call is timed by the CPU time of the process
(``time.process_time``), not the wall clock: on a machine shared with other
jobs a descheduled call would otherwise count the others' time (with one
thread the two agree on an idle machine; with more, CPU time sums the
threads, so compare builds at the same thread count only). The float32 accuracy of the "after" build (E against the float64 E on
the same input) is measured at ``--accuracy-size``.

    python bench/ab_kernels.py BEFORE_DIR AFTER_DIR --out bench/results/core_ops_a.md
"""
import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

CASES = [  # (function, shape, reg); value + gradient unless named otherwise
    ("dtw", (32, 256, 256), "negentropy"),
    ("dtw_grad", (32, 256, 256), "negentropy"),
    ("dtw_grad", (1, 1024, 1024), "negentropy"),
    ("dtw_grad", (32, 256, 256), "l2"),
    ("dtw_hvp", (2, 200, 200), "negentropy"),
    ("dtw_hvp", (1, 1024, 1024), "negentropy"),
    ("viterbi_grad", (64, 128, 8, 8), "negentropy"),
    ("viterbi_grad", (32, 128, 16, 16), "negentropy"),
    ("viterbi_grad", (8, 64, 64, 64), "negentropy"),
    ("viterbi_grad", (32, 128, 16, 16), "l2"),
    ("viterbi_grad", (8, 64, 64, 64), "l2"),
    ("viterbi_hvp", (32, 128, 16, 16), "negentropy"),
    ("viterbi_hvp", (32, 128, 16, 16), "l2"),
    # the CRF layer's engine: emissions (B, T, S) and transitions (S, S); per edge B·T·S²
    ("crf_grad", (32, 128, 16), "negentropy"),
    ("crf_grad", (32, 128, 16), "l2"),
    ("crf_grad", (32, 40, 9), "l2"),
    ("crf_grad", (8, 64, 64), "l2"),
    # DTW between features (the SoftDTW layer's default): x (B, NA, d), y (B, NB, d); per cell B·NA·NB
    ("dtw_features", (32, 128, 128, 8), "negentropy"),
    ("dtw_features_grad", (32, 128, 128, 8), "negentropy"),
    ("dtw_features_grad", (32, 128, 128, 8), "l2"),
    ("dtw_features_grad", (1, 1024, 1024, 8), "negentropy"),
]
DTYPES = ("float64", "float32")


def worker(folder, calls):
    """Time every case with the smoothmax found in ``folder``; JSON on stdout."""
    sys.path.insert(0, folder)
    import numpy as np
    import smoothmax as sm

    if not sm.__file__.startswith(os.path.abspath(folder)):
        raise RuntimeError(f"imported {sm.__file__}, not the build in {folder}")
    rng = np.random.default_rng(0)
    out = {}
    only = os.environ.get("SMOOTHMAX_AB_ONLY", "")
    for fn, shape, reg in CASES:
        if only and only not in f"{fn} {'x'.join(map(str, shape))} {reg}":
            continue
        for dt in DTYPES:
            theta = rng.standard_normal(shape).astype(dt)
            args = (theta, rng.standard_normal(shape).astype(dt)) if fn.endswith("hvp") else (theta,)
            f, cells = getattr(sm, fn, None), float(np.prod(shape))
            if fn.startswith("dtw_features"):
                B, NA, NB, d = shape
                args = (rng.standard_normal((B, NA, d)).astype(dt), rng.standard_normal((B, NB, d)).astype(dt))
                cells = float(B * NA * NB)
            if fn == "crf_grad":
                S = shape[-1]
                args, f, cells = (theta, rng.standard_normal((S, S)).astype(dt)), sm.crf.crf_grad, \
                    cells * S
            f(*args, reg=reg)
            best = float("inf")
            for _ in range(calls):
                t = time.process_time()
                f(*args, reg=reg)
                best = min(best, time.process_time() - t)
            out[f"{fn} {'x'.join(map(str, shape))} {reg} {dt}"] = best / cells * 1e9
    json.dump(out, sys.stdout)


def accuracy(folder, n):
    """float32 against float64 on the same input: value (relative) and E (absolute)."""
    sys.path.insert(0, folder)
    import numpy as np
    import smoothmax as sm

    rng = np.random.default_rng(0)
    theta = rng.random((1, n, n)).astype(np.float32)
    out = {}
    for gamma in (1.0, 0.1):
        v64, E64 = sm.dtw_grad(theta.astype(np.float64), gamma=gamma)
        v32, E32 = sm.dtw_grad(theta, gamma=gamma)
        out[f"dtw_grad 1x{n}x{n} gamma={gamma}"] = (
            float(abs(float(v32[0]) - v64[0]) / abs(v64[0])),
            float(np.max(np.abs(E32.astype(np.float64) - E64))))
        del E64, E32
    json.dump(out, sys.stdout)


def _run(mode, folder, arg, threads, only=""):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), SMOOTHMAX_AB_ONLY=only)
    res = subprocess.run([sys.executable, __file__, f"--{mode}", folder, "--arg", str(arg)],
                         capture_output=True, text=True, env=env, check=True)
    return json.loads(res.stdout)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", nargs="?")
    ap.add_argument("after", nargs="?")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--calls", type=int, default=15)
    ap.add_argument("--accuracy-size", type=int, default=4096)
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", default="", help="time only the cases whose name contains this "
                    "(e.g. 'viterbi_grad'; the accuracy check is skipped)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--accuracy", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--arg", type=int, default=5, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.arg)
    if args.accuracy:
        return accuracy(args.accuracy, args.arg)
    before, after = os.path.abspath(args.before), os.path.abspath(args.after)
    load0 = os.getloadavg()
    runs = {"before": [], "after": []}
    for _ in range(args.repeats):
        for name, folder in (("before", before), ("after", after)):
            runs[name].append(_run("worker", folder, args.calls, args.threads, args.only))
    acc = {} if args.only else {name: _run("accuracy", folder, args.accuracy_size, args.threads)
                                for name, folder in (("before", before), ("after", after))}
    load1 = os.getloadavg()
    best = {name: {k: min(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    from _machine import describe, one_line

    lines = [
        "# Compiled core kernels, before and after (issue 11, part A)",
        "",
        f"Machine: {one_line(describe())}.",
        f"`python bench/ab_kernels.py {args.before} {args.after}` with OMP_NUM_THREADS={args.threads}; "
        f"CPU time of the process, minimum over {args.repeats} alternating subprocess runs of the "
        f"minimum of {args.calls} calls{'; cases matching ' + repr(args.only) if args.only else ''}; "
        f"load average {load0[0]:.1f} before, {load1[0]:.1f} after the run.",
        "",
        "| case | before ns | after ns | after / before | f32 / f64 after |",
        "|---|---:|---:|---:|---:|",
    ]
    for k in best["before"]:
        b, a = best["before"][k], best["after"][k]
        f32 = ""
        if k.endswith("float32"):
            f32 = f"{a / best['after'][k[:-len('float32')] + 'float64']:.2f}"
        lines.append(f"| {k} | {b:.2f} | {a:.2f} | {a / b:.2f} | {f32} |")
    if acc:
        lines += ["", "float32 against float64 on the same input (value: relative, E: max absolute):",
                  "", "| case | before value | before E | after value | after E |",
                  "|---|---:|---:|---:|---:|"]
    for k in acc.get("before", {}):
        (bv, be), (av, ae) = acc["before"][k], acc["after"][k]
        lines.append(f"| {k} | {bv:.1e} | {be:.1e} | {av:.1e} | {ae:.1e} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
        with open(os.path.splitext(args.out)[0] + ".json", "w", encoding="utf-8") as f:
            json.dump({"runs": runs, "accuracy": acc, "load": [load0, load1]}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
