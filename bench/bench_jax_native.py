"""How smoothmax runs inside JAX programs: per-call overhead under ``jax.jit``
and what a batch-sharded input does (issue 12, JAX part).

What is measured:

* **per-call time** of a jitted DTW value + gradient
  (``jax.jit(jax.value_and_grad(lambda t: sm.dtw(t).sum()))``, negentropy,
  γ = 1) at a tiny 1×2×2 and at 32×128×128, float32 and float64, against
  the same call on NumPy (``sm.dtw_grad``) and on torch CPU
  (``sm.dtw`` + ``backward``): the difference is the framework's overhead.
  Each time is the median of repeats after warm-up calls. The JAX path
  used (``pure_callback`` or the XLA FFI custom call) is recorded; with the
  FFI, the same jitted call through ``pure_callback``
  (``SMOOTHMAX_JAX_FFI=0``) is timed too, in the same process.
* **sharding** (a subprocess with two host devices,
  ``XLA_FLAGS=--xla_force_host_platform_device_count=2``): ``jax.jit`` of the
  same value + gradient over an (8, 16, 16) ``theta`` sharded over its batch
  by ``NamedSharding(mesh, P("b"))``: the collectives in the compiled HLO
  (all-gather, all-reduce, ...), the batch sizes the engine received per
  call, the output's sharding; then ``jax.grad`` and grad-of-grad inside
  ``jax.shard_map`` with its default settings (works, or the error).

Usage::

    python bench/bench_jax_native.py --label before    # writes bench/results/jax_native_before.{json,md}
    python bench/bench_jax_native.py --label after
    OMP_NUM_THREADS=1 python bench/bench_jax_native.py --label after_1t   # one compiled-core thread
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

CASES = [(1, 2, 2), (32, 128, 128)]
DTYPES = ["float32", "float64"]


def _median_time(fn, min_reps=20, budget_s=2.0):
    for _ in range(3):  # warm-up (compilation, caches)
        fn()
    times = []
    t_end = time.perf_counter() + budget_s
    while len(times) < min_reps or (time.perf_counter() < t_end and len(times) < 2000):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2], len(times)


def _interleaved(fns, rounds=6, budget_s=3.0):
    """Medians of ``fns`` timed in alternating rounds (each round ``budget_s / rounds``
    split between them); returns ``(medians, samples per function)``."""
    for fn in fns:
        for _ in range(3):
            fn()
    samples = [[] for _ in fns]
    per = budget_s / rounds / len(fns)
    for _ in range(rounds):
        for k, fn in enumerate(fns):
            t_end = time.perf_counter() + per
            n = 0
            while n < 3 or (time.perf_counter() < t_end and n < 500):
                t0 = time.perf_counter()
                fn()
                samples[k].append(time.perf_counter() - t0)
                n += 1
    medians = [sorted(x)[len(x) // 2] for x in samples]
    return medians, len(samples[0])


def _theta(shape, dtype):
    import numpy as np

    rng = np.random.default_rng(0)
    return rng.random(shape).astype(dtype)


def jax_path():
    """Which mechanism smoothmax.jax uses on the CPU under jit."""
    import smoothmax.jax as smj

    return getattr(smj, "cpu_path", lambda: "pure_callback")()


def time_calls():
    import jax
    import numpy as np
    import torch

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import smoothmax as sm

    rows = []
    for dtype in DTYPES:
        for shape in CASES:
            theta = _theta(shape, dtype)
            row = {"shape": list(shape), "dtype": dtype}

            row["numpy_s"], _ = _median_time(lambda: sm.dtw_grad(theta))

            t = torch.from_numpy(theta.copy())

            def torch_step():
                x = t.detach().requires_grad_(True)
                sm.dtw(x).sum().backward()
                return x.grad

            row["torch_s"], _ = _median_time(torch_step)

            tj = jnp.asarray(theta)
            f = jax.jit(jax.value_and_grad(lambda th: sm.dtw(th).sum()))

            def jax_step():
                return jax.block_until_ready(f(tj))

            if jax_path() == "ffi":
                # the same call through the host callback (traced with SMOOTHMAX_JAX_FFI=0),
                # the two timed in alternating rounds so that both see the same load
                os.environ["SMOOTHMAX_JAX_FFI"] = "0"
                f_cb = jax.jit(jax.value_and_grad(lambda th: sm.dtw(th).sum()))
                jax.block_until_ready(f_cb(tj))
                del os.environ["SMOOTHMAX_JAX_FFI"]
                (row["jax_jit_s"], row["jax_jit_callback_s"]), row["jax_reps"] = _interleaved(
                    [jax_step, lambda: jax.block_until_ready(f_cb(tj))])
            else:
                row["jax_jit_s"], row["jax_reps"] = _median_time(jax_step)
            v, g = f(tj)
            v_np, g_np = sm.dtw_grad(theta)
            tol = 1e-4 if dtype == "float32" else 1e-9
            row["jax_agrees_with_numpy"] = bool(
                np.allclose(float(v), float(v_np.sum()), rtol=tol)
                and np.allclose(np.asarray(g), g_np, atol=tol))
            rows.append(row)
            print(f"{dtype} {shape}: numpy {row['numpy_s'] * 1e6:.1f} us, torch "
                  f"{row['torch_s'] * 1e6:.1f} us, jax.jit {row['jax_jit_s'] * 1e6:.1f} us",
                  file=sys.stderr)
    return rows


# ---------------------------------------------------------------------------
# the sharding checks (run in a subprocess with two host devices)

_COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")


def sharding_child():
    import re

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    import smoothmax as sm
    from smoothmax import _dispatch

    seen = []
    real_run = _dispatch.run

    def spy(problem, op, *args, **kw):
        seen.append([op, list(problem.flat_shape)])
        return real_run(problem, op, *args, **kw)

    _dispatch.run = spy
    try:  # the XLA FFI handler calls the compiled module's entry points
        from smoothmax._core import dtw as core_dtw

        for op in ("value", "grad", "hvp"):
            real = getattr(core_dtw, f"dtw_{op}")

            def spy_core(theta, *args, _real=real, _op=op, **kw):
                seen.append([_op, list(theta.shape)])
                return _real(theta, *args, **kw)

            setattr(core_dtw, f"dtw_{op}", spy_core)
    except ImportError:
        pass
    out = {"devices": len(jax.devices()), "path": jax_path()}
    mesh = jax.make_mesh((2,), ("b",))
    sharding = NamedSharding(mesh, P("b"))
    theta_np = _theta((8, 16, 16), "float32")
    theta = jax.device_put(jnp.asarray(theta_np), sharding)

    f = jax.jit(jax.value_and_grad(lambda th: sm.dtw(th).sum()))
    hlo = f.lower(theta).compile().as_text()
    out["hlo_collectives"] = {c: len(re.findall(rf"\b{c}(?:-start)?\(", hlo)) for c in _COLLECTIVES}
    out["hlo_collectives"] = {k: v for k, v in out["hlo_collectives"].items() if v}
    seen.clear()
    v, g = f(theta)
    jax.block_until_ready(g)
    out["engine_calls_jit"] = list(seen)
    out["grad_sharding"] = str(g.sharding.spec) if hasattr(g.sharding, "spec") else str(g.sharding)
    v_ref, g_ref = sm.dtw_grad(theta_np)
    out["jit_agrees"] = bool(np.allclose(np.asarray(g), g_ref, atol=1e-5))
    out["jit_sharded_s"], _ = _median_time(lambda: jax.block_until_ready(f(theta)), budget_s=1.0)
    theta1 = jax.device_put(jnp.asarray(theta_np), jax.devices()[0])
    out["jit_one_device_s"], _ = _median_time(lambda: jax.block_until_ready(f(theta1)), budget_s=1.0)

    def loss(th):
        return sm.dtw(th).sum()

    tries = {
        "grad": lambda th: jax.grad(loss)(th),
        "grad_of_grad": lambda th: jax.grad(lambda x: jnp.sum(jax.grad(loss)(x) ** 2))(th),
    }
    for name, body in tries.items():
        fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("b"), out_specs=P("b")))
        seen.clear()
        try:
            r = np.asarray(jax.block_until_ready(fn(theta)))
            ref = np.asarray(jax.jit(body)(jnp.asarray(theta_np)))
            out[f"shard_map_{name}"] = "ok" if np.allclose(r, ref, atol=1e-4) else "WRONG VALUES"
            out[f"engine_calls_shard_map_{name}"] = list(seen)
        except Exception as exc:  # the failure is the measurement
            msg = f"{type(exc).__name__}: {exc}"
            out[f"shard_map_{name}"] = msg.splitlines()[0][:300]
    print(json.dumps(out))


def run_sharding():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    res = subprocess.run([sys.executable, os.path.abspath(__file__), "--sharding-child"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    if res.returncode != 0:
        return {"error": res.stderr[-2000:]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def to_markdown(res):
    m = res["machine"]
    from _machine import one_line

    lines = [f"# smoothmax inside JAX: per-call overhead and sharding ({res['label']})", "",
             f"Machine: {one_line(m)}; load average at start {m['loadavg_at_start']} "
             f"(shared machine: other jobs ran during the measurement). OpenMP threads: "
             f"{res.get('omp_threads') or 'default (all CPUs)'}. JAX path on the CPU: "
             f"`{res['jax_path']}`. Command: `{res['command']}`.", "",
             "## Per call: DTW value + gradient (negentropy, γ = 1), median of repeats", "",
             "| B×NA×NB | dtype | NumPy `dtw_grad` | torch `dtw` + backward | `jax.jit(value_and_grad)` "
             "| jit / NumPy | same jit through `pure_callback` | callback / FFI | JAX agrees with NumPy |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["calls"]:
        cb = r.get("jax_jit_callback_s")
        cb_time = "-" if cb is None else f"{cb * 1e6:.1f} µs"
        cb_ratio = "-" if cb is None else f"{cb / r['jax_jit_s']:.2f}"
        lines.append(
            f"| {'×'.join(map(str, r['shape']))} | {r['dtype']} | {r['numpy_s'] * 1e6:.1f} µs "
            f"| {r['torch_s'] * 1e6:.1f} µs | {r['jax_jit_s'] * 1e6:.1f} µs "
            f"| {r['jax_jit_s'] / r['numpy_s']:.2f} "
            f"| {cb_time} | {cb_ratio} | {r['jax_agrees_with_numpy']} |")
    s = res["sharding"]
    lines += ["", "## Batch sharding over 2 host devices (θ 8×16×16 float32, `P(\"b\")`)", ""]
    if "error" in s:
        lines.append("the child process failed:\n\n```\n" + s["error"] + "\n```")
    else:
        lines += [
            f"* collectives in the compiled HLO of `jit(value_and_grad)`: {s['hlo_collectives'] or 'none'}",
            f"* engine calls under `jit` (op, flat shape): {s['engine_calls_jit']}",
            f"* sharding of the gradient: `{s['grad_sharding']}`; values agree with NumPy: {s['jit_agrees']}",
            f"* time per jitted call: sharded {s['jit_sharded_s'] * 1e6:.0f} µs, one device "
            f"{s['jit_one_device_s'] * 1e6:.0f} µs (2 CPU cores shared by both devices)",
            f"* `jax.grad` inside `jax.shard_map` (defaults): {s['shard_map_grad']}",
            f"  (engine calls: {s.get('engine_calls_shard_map_grad', '-')})",
            f"* grad-of-grad inside `jax.shard_map` (defaults): {s['shard_map_grad_of_grad']}",
            f"  (engine calls: {s.get('engine_calls_shard_map_grad_of_grad', '-')})",
        ]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--label", default="after")
    p.add_argument("--sharding-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.sharding_child:
        sharding_child()
        return
    from _machine import describe

    omp = os.environ.get("OMP_NUM_THREADS")
    res = {"label": args.label, "machine": describe(), "jax_path": jax_path(), "omp_threads": omp,
           "command": ("" if omp is None else f"OMP_NUM_THREADS={omp} ")
           + "python bench/bench_jax_native.py --label " + args.label}
    res["calls"] = time_calls()
    res["sharding"] = run_sharding()
    out = os.path.join(HERE, "results", f"jax_native_{args.label}")
    with open(out + ".json", "w") as f:
        json.dump(res, f, indent=1)
    with open(out + ".md", "w") as f:
        f.write(to_markdown(res))
    print(to_markdown(res))


if __name__ == "__main__":
    main()
