"""Value + gradient + Hessian-vector product: custom passes against generic autodiff, on the CPU.

One timed call computes ``DP_Ω(θ)``, ``∇DP_Ω(θ)`` and ``∇²DP_Ω(θ)·Z`` (negentropy,
γ = 1), from arrays already in memory:

* ``smoothmax engine``: one ``hvp`` call of the compiled engine (it returns
  value, E and Edot from one forward and one reverse pass, docs/spec.md §2);
* ``smoothmax torch``: ``sm.dtw``/``sm.viterbi`` on a tensor, then
  ``autograd.grad(create_graph=True)`` and a second ``autograd.grad`` -- what a
  torch user writes; the custom Functions run the grad and HVP passes;
* ``smoothmax jax``: ``jit(jvp(value_and_grad(f)))`` through the custom rules
  (host callbacks into the compiled engine);
* ``torch autograd``: the same recursion written with torch ops (DTW:
  vectorised over anti-diagonals; Viterbi: over states), double backward;
* ``jax fwd-over-rev``: the same recursion in ``lax.scan``,
  ``jit(jvp(value_and_grad(f)))``.

Every implementation's value, gradient and HVP are checked against the
engine's (float64) before its time is reported. Timings are medians over
interleaved rounds (each round times every implementation once), after a
warm-up call (which also compiles the jitted functions). Threads: one per
library by default (``--threads``), set before any import.

Usage::

    python bench/bench_hvp.py            # writes bench/results/hvp_cpu.json, prints a table
    python bench/bench_hvp.py --quick    # small sizes, a smoke run
"""
import argparse
import json
import os
import platform
import sys
import time


def _set_threads(n):
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_cpu_multi_thread_eigen={'true' if n > 1 else 'false'}"
                               f" intra_op_parallelism_threads={n}").strip()


BIG = 1e10  # stands for +inf in the autodiff baselines: exp(-BIG) underflows to 0, no inf - inf


# ---------------------------------------------------------------------------
# baselines: the same recursions with framework ops


def _dtw_skew_index(NA, NB):
    import numpy as np

    ndiag, W = NA + NB + 1, NA + 1
    d = np.arange(ndiag)[:, None]
    i = np.arange(W)[None, :]
    j = d - i
    inside = (i >= 1) & (j >= 1) & (i <= NA) & (j <= NB)
    gather = np.where(inside, (i - 1) * NB + (j - 1), NA * NB)
    return gather, inside


def torch_softdtw(theta, gamma=1.0):
    """Soft-DTW value with torch ops over anti-diagonals (autograd differentiates it)."""
    import torch

    B, NA, NB = theta.shape
    gather, inside = _dtw_skew_index(NA, NB)
    ndiag, W = gather.shape
    flat = torch.cat([theta.reshape(B, -1), theta.new_full((B, 1), BIG)], 1)
    skew = flat[:, torch.as_tensor(gather.reshape(-1))].reshape(B, ndiag, W)
    valid = torch.as_tensor(inside)
    big_row = theta.new_full((B, W), BIG)
    big_col = theta.new_full((B, 1), BIG)
    first = big_row.clone()
    first[:, 0] = 0.0
    prev2, prev1 = big_row, first
    for d in range(1, ndiag):
        up = torch.cat([big_col, prev1[:, :-1]], 1)
        diag = torch.cat([big_col, prev2[:, :-1]], 1)
        x = torch.stack([up, prev1, diag], -1)
        soft = -gamma * torch.logsumexp(-x / gamma, -1)
        cur = torch.where(valid[d], skew[:, d] + soft, big_row)
        prev2, prev1 = prev1, cur
    return prev1[:, NA]


def torch_viterbi(theta, gamma=1.0):
    import torch

    B, T, S, _ = theta.shape
    V = theta.new_zeros(B, S)
    for t in range(T):
        V = gamma * torch.logsumexp((theta[:, t] + V[:, None, :]) / gamma, -1)
    return gamma * torch.logsumexp(V / gamma, -1)


def jax_softdtw(theta, gamma=1.0):
    """Soft-DTW value in ``lax.scan`` over anti-diagonals."""
    import jax
    import jax.numpy as jnp

    B, NA, NB = theta.shape
    gather, inside = _dtw_skew_index(NA, NB)
    ndiag, W = gather.shape
    flat = jnp.concatenate([theta.reshape(B, -1), jnp.full((B, 1), BIG, theta.dtype)], 1)
    skew = jnp.moveaxis(flat[:, gather.reshape(-1)].reshape(B, ndiag, W), 1, 0)
    big_row = jnp.full((B, W), BIG, theta.dtype)
    big_col = jnp.full((B, 1), BIG, theta.dtype)
    first = big_row.at[:, 0].set(0.0)

    def step(carry, xs):
        prev2, prev1 = carry
        s, v = xs
        up = jnp.concatenate([big_col, prev1[:, :-1]], 1)
        diag = jnp.concatenate([big_col, prev2[:, :-1]], 1)
        x = jnp.stack([up, prev1, diag], -1)
        soft = -gamma * jax.nn.logsumexp(-x / gamma, -1)
        cur = jnp.where(v, s + soft, big_row)
        return (prev1, cur), None

    (_, last), _ = jax.lax.scan(step, (big_row, first), (skew[1:], jnp.asarray(inside[1:])))
    return last[:, NA]


def jax_viterbi(theta, gamma=1.0):
    import jax
    import jax.numpy as jnp

    def step(V, th):
        return gamma * jax.nn.logsumexp((th + V[:, None, :]) / gamma, -1), None

    V, _ = jax.lax.scan(step, jnp.zeros(theta.shape[:1] + theta.shape[-1:], theta.dtype),
                        jnp.moveaxis(theta, 1, 0))
    return gamma * jax.nn.logsumexp(V / gamma, -1)


# ---------------------------------------------------------------------------
# the implementations: each returns a callable producing numpy (value, E, Edot)


def make_impls(struct, theta_np, Z_np):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    import smoothmax as sm
    from smoothmax import _dispatch
    from smoothmax._problem import make_problem

    value_fn = sm.dtw if struct == "dtw" else sm.viterbi
    torch_base = torch_softdtw if struct == "dtw" else torch_viterbi
    jax_base = jax_softdtw if struct == "dtw" else jax_viterbi

    # the engine directly (flat arrays already in the engine's layout)
    B = theta_np.shape[0]
    fields = (dict(len_a=np.full(B, theta_np.shape[1]), len_b=np.full(B, theta_np.shape[2]), band=-1)
              if struct == "dtw" else dict(lengths=np.full(B, theta_np.shape[1])))
    problem = make_problem(struct, theta_np, np, "numpy", 1, "negentropy", 1.0, **fields)

    def engine():
        return _dispatch.run(problem, "hvp", theta_np, Z_np)

    theta_t, Z_t = torch.from_numpy(theta_np), torch.from_numpy(Z_np)

    def torch_run(f):
        def call():
            t = theta_t.clone().requires_grad_(True)
            v = f(t)
            (g,) = torch.autograd.grad(v.sum(), t, create_graph=True)
            (h,) = torch.autograd.grad((g * Z_t).sum(), t)
            return v.detach(), g.detach(), h
        return call

    theta_j, Z_j = jnp.asarray(theta_np), jnp.asarray(Z_np)

    def jax_run(f):
        def vg(t):
            return jax.value_and_grad(lambda u: f(u).sum())(t)

        fn = jax.jit(lambda t, z: jax.jvp(vg, (t,), (z,)))

        def call():
            (v, g), (_, h) = fn(theta_j, Z_j)
            h.block_until_ready()
            return None, g, h  # the summed value: checked through E and Edot only
        return call

    return {
        "smoothmax engine": engine,
        "smoothmax torch": torch_run(lambda t: value_fn(t)),
        "smoothmax jax": jax_run(lambda t: value_fn(t)),
        "torch autograd": torch_run(torch_base),
        "jax fwd-over-rev": jax_run(jax_base),
    }


def _check(name, out, ref):
    import numpy as np

    v, g, h = (None if a is None else np.asarray(a) for a in out)
    rv, rg, rh = ref
    if v is not None and not np.allclose(v, rv, rtol=1e-6, atol=1e-6):
        return f"{name}: value differs by {np.abs(v - rv).max():.2e}"
    if not np.allclose(g, rg, rtol=1e-5, atol=1e-7):
        return f"{name}: gradient differs by {np.abs(g - rg).max():.2e}"
    if not np.allclose(h, rh, rtol=1e-5, atol=1e-6):
        return f"{name}: HVP differs by {np.abs(h - rh).max():.2e}"
    return None


def run_case(struct, shape, dtype, rounds, min_time, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    if struct == "dtw":
        theta = rng.random(shape).astype(dtype)  # costs in [0, 1)
    else:
        theta = rng.standard_normal(shape).astype(dtype)
    Z = rng.standard_normal(shape).astype(dtype)
    impls = make_impls(struct, theta, Z)
    ref = [np.asarray(a) for a in impls["smoothmax engine"]()]
    status = {}
    for name, fn in impls.items():
        t0 = time.perf_counter()
        out = fn()  # warm-up (compiles the jitted functions)
        status[name] = {"warmup_s": time.perf_counter() - t0,
                        "error": _check(name, out, ref) if dtype == "float64" else None}
    times = {name: [] for name in impls}
    start = time.perf_counter()
    r = 0
    while r < rounds or (time.perf_counter() - start < min_time and r < 50):
        for name, fn in impls.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        r += 1
    base = float(np.median(times["smoothmax engine"]))
    res = {}
    for name in impls:
        med = float(np.median(times[name]))
        res[name] = {"median_s": med, "rounds": len(times[name]), "min_s": float(np.min(times[name])),
                     **status[name]}
    for name in impls:
        res[name]["time_over_engine"] = res[name]["median_s"] / base
    for ours in ("smoothmax engine", "smoothmax torch", "smoothmax jax"):
        res[ours]["speedup_vs_torch_autograd"] = res["torch autograd"]["median_s"] / res[ours]["median_s"]
        res[ours]["speedup_vs_jax_fwd_over_rev"] = res["jax fwd-over-rev"]["median_s"] / res[ours]["median_s"]
    return res


def machine(threads):
    import jax
    import numpy as np
    import torch

    info = {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "logical_cpus": os.cpu_count(),
        "threads_per_library": threads,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "jax": jax.__version__,
    }
    try:
        info["loadavg_1min_at_start"] = os.getloadavg()[0]
    except OSError:
        pass
    try:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from _machine import describe

        info["describe"] = describe()
    except Exception as exc:  # the shared helper is optional here
        info["describe"] = f"unavailable ({exc})"
    from smoothmax import _dispatch

    info["smoothmax_engine"] = "compiled" if _dispatch.compiled_available() else "reference"
    return info


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--min-time", type=float, default=2.0, help="seconds of timing per case, at least")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                 "results", "hvp_cpu.json"))
    args = p.parse_args(argv)
    _set_threads(args.threads)
    # benchmark the checkout this file lives in (an installed smoothmax would shadow it otherwise)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    import torch

    torch.set_num_threads(args.threads)
    import jax

    jax.config.update("jax_enable_x64", True)

    if args.quick:
        cases = [("dtw", (2, 16, 16)), ("viterbi", (4, 16, 4, 4))]
    else:
        cases = [("dtw", (8, 64, 64)), ("dtw", (8, 128, 128)), ("viterbi", (32, 64, 16, 16))]
    results = {"machine": machine(args.threads), "dtype": args.dtype, "reg": "negentropy", "gamma": 1.0,
               "command": " ".join([os.path.basename(sys.executable)] + sys.argv), "cases": []}
    for struct, shape in cases:
        res = run_case(struct, shape, args.dtype, args.rounds, args.min_time)
        results["cases"].append({"struct": struct, "shape": list(shape), "results": res})
        print(f"done {struct} {shape}", file=sys.stderr, flush=True)

    lines = ["| case | implementation | median (ms) | time ÷ smoothmax torch | check |",
             "|---|---|---:|---:|---|"]
    for case in results["cases"]:
        label = f"{case['struct']} {'x'.join(map(str, case['shape']))}"
        ours = case["results"]["smoothmax torch"]["median_s"]
        for name, r in case["results"].items():
            check = "ok" if r["error"] is None else r["error"]
            lines.append(f"| {label} | {name} | {1e3 * r['median_s']:.2f} | "
                         f"{r['median_s'] / ours:.1f}x | {check} |")
    table = "\n".join(lines)
    results["table_markdown"] = table
    try:
        results["machine"]["loadavg_1min_at_end"] = os.getloadavg()[0]
    except OSError:
        pass
    m = results["machine"]
    cpu = m["describe"].get("cpu") if isinstance(m["describe"], dict) else None
    print(f"\n{cpu or m['processor']}, {m['logical_cpus']} logical CPUs, "
          f"{args.threads} thread(s) per library, {args.dtype}, engine: {m['smoothmax_engine']}, "
          f"load average {m.get('loadavg_1min_at_start')} -> {m.get('loadavg_1min_at_end')}\n")
    print(table)
    if not args.quick:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
