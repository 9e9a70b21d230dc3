"""What the input checks cost: a public call against the same call straight to the engine.

For each operator (value, grad, HVP) at the sizes of ``bench_cpu.py``, one
timed NumPy call of the public function (``sm.dtw_grad`` ...: argument
checks, the NaN/inf pass over theta where there is one, the overflow checks
of ``smoothmax/_extremes.py``, the engine) against the engine call alone on
the prepared problem (the engine function ``smoothmax._dispatch.run`` calls,
without the conversions and the overflow check of ``run``), and the overflow
check itself (``_extremes.rescue_overflow`` on the engine's finite outputs:
what every engine pass pays for the rescaling of issue 16). The best time
of interleaved rounds after a warm-up call (on a shared machine a kernel's
time is bimodal, and the median mixes the two modes); one thread.

Usage::

    python bench/bench_checks.py           # writes bench/results/checks_cpu.json and .md
    python bench/bench_checks.py --quick   # small sizes, a smoke run
"""
import argparse
import json
import os
import sys
import time

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import smoothmax as sm  # noqa: E402
from smoothmax import _dispatch, _extremes  # noqa: E402
from smoothmax.dtw import _prepare as _dtw_prepare  # noqa: E402
from smoothmax.viterbi import _prepare as _viterbi_prepare  # noqa: E402

from _machine import describe, one_line  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _cases(quick):
    rng = np.random.default_rng(0)
    dtw_shape = (4, 64, 64) if quick else (32, 256, 256)
    vit_shape = (4, 32, 8, 8) if quick else (32, 128, 16, 16)
    return [("dtw", dtw_shape, rng.random(dtw_shape), {"value": sm.dtw, "grad": sm.dtw_grad, "hvp": sm.dtw_hvp},
             lambda t: _dtw_prepare(t, "negentropy", 1.0, None, None)[1]),
            ("viterbi", vit_shape, rng.standard_normal(vit_shape),
             {"value": sm.viterbi, "grad": sm.viterbi_grad, "hvp": sm.viterbi_hvp},
             lambda t: _viterbi_prepare(t, "negentropy", 1.0, None)[1])]


def _best_times(fns, rounds):
    times = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: min(v) for k, v in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    machine = describe()
    rows = []
    for struct, shape, base, public, prepare in _cases(args.quick):
        for dtype in (np.float64, np.float32):
            theta = base.astype(dtype)
            Z = np.random.default_rng(1).standard_normal(shape).astype(dtype)
            problem = prepare(theta)
            flat = theta.reshape(problem.flat_shape)
            flatZ = Z.reshape(problem.flat_shape)
            for op in ("value", "grad", "hvp"):
                f = public[op]
                kernel = getattr(_dispatch.engine_for("numpy", "cpu").module, f"{struct}_{op}")
                engine_args = ([flat, flatZ] if op == "hvp" else [flat]) + list(problem.aux) + [
                    problem.reg_code, problem.gamma]
                out = kernel(*engine_args)
                out = out if isinstance(out, tuple) else (out,)
                fns = {"public": (lambda f=f: f(theta, Z)) if op == "hvp" else (lambda f=f: f(theta)),
                       "engine": lambda kernel=kernel, a=engine_args: kernel(*a),
                       "check": lambda op=op, kernel=kernel, a=engine_args, out=out: _extremes.rescue_overflow(
                           problem, op, kernel, a, out)}
                t = _best_times(fns, args.rounds)
                row = {"struct": struct, "shape": list(shape), "dtype": np.dtype(dtype).name, "op": op,
                       "public_s": t["public"], "engine_s": t["engine"],
                       "ratio_public_to_engine": t["public"] / t["engine"], "overflow_check_s": t["check"]}
                rows.append(row)
                print(f"{struct} {shape} {row['dtype']} {op}: public {t['public'] * 1e3:.2f} ms, engine "
                      f"{t['engine'] * 1e3:.2f} ms, ratio {row['ratio_public_to_engine']:.3f}, overflow check "
                      f"{t['check'] * 1e6:.1f} us", flush=True)
    try:
        load_end = list(os.getloadavg())
    except OSError:
        load_end = None
    out = {"machine": machine, "loadavg_at_end": load_end, "quick": args.quick, "rounds": args.rounds,
           "rows": rows}
    name = "checks_cpu_quick" if args.quick else "checks_cpu"
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, name + ".json"), "w") as f:
        json.dump(out, f, indent=2)
    lines = ["# Cost of the input checks (public call / engine call), one thread", "",
             f"Machine: {one_line(machine)}; load average at start "
             f"{machine['loadavg_at_start']}, at end {load_end} (a shared machine: the ratios are "
             f"from one run, best of {args.rounds} interleaved rounds).", "",
             "| structure | shape | dtype | op | public ms | engine ms | ratio | overflow check µs |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['struct']} | {'×'.join(map(str, r['shape']))} | {r['dtype']} | {r['op']} | "
                     f"{r['public_s'] * 1e3:.2f} | {r['engine_s'] * 1e3:.2f} | "
                     f"{r['ratio_public_to_engine']:.3f} | {r['overflow_check_s'] * 1e6:.1f} |")
    with open(os.path.join(RESULTS, name + ".md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
