"""What keeping ``R`` and ``ebar`` in double buys a float32 DTW (docs/engines.md, "float32").

On ``bench_cpu``'s DTW input (1 x N x N, gamma = 1), the largest ``|E - E64|``
and the value's relative error against the compiled float64 gradient, for

* the compiled float32 gradient: ``theta``, ``E`` and the stored weights in
  float, ``R``, ``ebar`` and every running value in double;
* the reference engine on the same float32 ``theta``: every array, ``R`` and
  ``ebar`` included, in float32 (NumPy's float32 arithmetic, one
  anti-diagonal at a time). It stands for a kernel that would keep its
  running values in float.

The issue's accuracy bar is 1e-6 for ``E`` at 4096².

Usage::

    python bench/bench_f32_accuracy.py            # N = 512, 1024, 2048, 4096
    python bench/bench_f32_accuracy.py --sizes 256 512 --out /tmp/acc

writes ``f32_accuracy.json`` and ``f32_accuracy.md`` (default: bench/results).
The reference engine takes about 20 s and 2 GB at 4096².
"""
import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _machine  # noqa: E402
import bench_cpu  # noqa: E402


def measure(n):
    import numpy as np

    import smoothmax as sm
    from smoothmax import _reference

    theta = bench_cpu.make_inputs("dtw", (1, n, n))["theta"]
    v64, E64 = sm.dtw_grad(theta)
    v32, E32 = sm.dtw_grad(theta.astype(np.float32))
    t0 = time.perf_counter()
    la = np.array([n])
    vr, Er = _reference.dtw_grad(theta.astype(np.float32), la, la.copy(), -1, 0, 1.0)
    seconds = time.perf_counter() - t0
    vr, Er = float(np.asarray(vr)[0]), np.asarray(Er)
    rel = lambda v: abs(float(v) - float(v64[0])) / abs(float(v64[0]))  # noqa: E731
    return {"n": n, "value64": float(v64[0]),
            "compiled_e_err": float(np.abs(E32 - E64).max()), "compiled_value_rel": rel(v32[0]),
            "float_e_err": float(np.abs(Er - E64).max()), "float_value_rel": rel(vr),
            "reference_seconds": seconds}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    ap.add_argument("--out", default=os.path.join(HERE, "results", "f32_accuracy"),
                    help="path prefix of the .json and .md written")
    args = ap.parse_args(argv)
    machine = _machine.describe()
    rows = []
    for n in args.sizes:
        rows.append(measure(n))
        r = rows[-1]
        print(f"{n}: compiled float32 {r['compiled_e_err']:.2e}, all-float32 {r['float_e_err']:.2e}",
              flush=True)
    lines = ["# float32 DTW: running values in double against in float", "",
             f"Machine: {_machine.one_line(machine)}. `python bench/bench_f32_accuracy.py`.", "",
             "Largest |E − E64| and the value's relative error against the compiled float64 "
             "gradient, on `bench_cpu`'s DTW input (γ = 1). *Compiled*: the float32 kernel "
             "(R and ebar in double). *All float32*: the reference engine on the same float32 "
             "θ, every array in float32. The issue's bar for E at 4096² is 1e-6.", "",
             "| N | value | compiled: max abs E error | compiled: value rel. error "
             "| all float32: max abs E error | all float32: value rel. error |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['n']} | {r['value64']:.6g} | {r['compiled_e_err']:.2e} | "
                     f"{r['compiled_value_rel']:.1e} | {r['float_e_err']:.2e} | "
                     f"{r['float_value_rel']:.1e} |")
    with open(args.out + ".json", "w") as f:
        json.dump({"benchmark": "f32_accuracy", "machine": machine, "rows": rows}, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}.json and {args.out}.md")


if __name__ == "__main__":
    main()
