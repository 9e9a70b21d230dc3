"""End to end, as a user calls it: a training step through the torch layer and
``jax.jit``, on one and two threads, float32 and float64, first and warm calls.

Each case runs in its own fresh process (threads set before anything runs):

* ``torch-softdtw``: ``smoothmax.torch.SoftDTW`` loss between a linear map of
  32 series of 128 x 8 and 32 targets, backward, SGD step;
* ``torch-crf``: ``smoothmax.torch.CRF`` (pytorch-crf's interface) on a linear
  emission layer, 32 sentences of 64 tokens, 17 tags, backward, SGD step;
* ``jax-softdtw``: ``jax.jit(jax.value_and_grad)`` of ``smoothmax.jax.soft_dtw``
  on the same shapes;
* ``jax-crf``: ``jax.jit(jax.value_and_grad)`` of ``crf_log_likelihood``.

"threads" is the thread count of the whole process, as a user sets it:
``OMP_NUM_THREADS`` (smoothmax's pool and torch's OpenMP follow it) and
``torch.set_num_threads``; JAX's CPU client is not limited by it. First call:
the first step of the process (torch: after a one-step warm-up on another
shape; jax: compilation included). Warm: the median of the next 150 steps.

    python bench/bench_e2e.py [--quick]    # writes bench/results/e2e.{md,json}
    python bench/bench_e2e.py --split      # thread settings alternated in one process: e2e_split.*
    python bench/bench_e2e.py --split --cotenant   # the same beside a busy CPU: e2e_split_cotenant.*
"""
import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
CASES = ("torch-softdtw", "torch-crf", "jax-softdtw", "jax-crf")
B, N, D, T, S = 32, 128, 8, 64, 17


def _build(case, dtype):
    """The case's training step: ``(run, warm)``, ``run(*warm)`` a warm-up on another shape."""
    import numpy as np

    rng = np.random.default_rng(0)
    if case.startswith("torch"):
        import torch
        import smoothmax.torch as smt

        dt = getattr(torch, dtype)
        torch.manual_seed(0)
        if case == "torch-softdtw":
            lin = torch.nn.Linear(D, D).to(dt)
            loss_fn = smt.SoftDTW(gamma=0.1)
            x = torch.tensor(rng.normal(size=(B, N, D)), dtype=dt)
            y = torch.tensor(rng.normal(size=(B, N, D)), dtype=dt)
            params = list(lin.parameters())

            def step(x=x, y=y):
                loss = loss_fn(lin(x), y)
                loss.backward()
                return loss
            warm = (x[:2, :16], y[:2, :16])
        else:
            emit = torch.nn.Linear(D, S).to(dt)
            crf = smt.CRF(S, batch_first=True).to(dt)
            x = torch.tensor(rng.normal(size=(B, T, D)), dtype=dt)
            tags = torch.tensor(rng.integers(0, S, size=(B, T)))
            params = list(emit.parameters()) + list(crf.parameters())

            def step(x=x, tags=tags):
                loss = -crf(emit(x), tags).mean()
                loss.backward()
                return loss
            warm = (x[:2, :8], tags[:2, :8])
        opt = torch.optim.SGD(params, lr=1e-3)

        def run(*a):
            opt.zero_grad()
            out = step(*a)
            opt.step()
            return float(out.detach())
    else:
        import jax

        if dtype == "float64":
            jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp
        import smoothmax.jax as smj

        dt = getattr(jnp, dtype)
        if case == "jax-softdtw":
            W = jnp.asarray(rng.normal(size=(D, D)), dtype=dt)
            x = jnp.asarray(rng.normal(size=(B, N, D)), dtype=dt)
            y = jnp.asarray(rng.normal(size=(B, N, D)), dtype=dt)
            f = jax.jit(jax.value_and_grad(lambda W, x, y: smj.soft_dtw(x @ W, y, gamma=0.1).mean()))
            args = (W, x, y)
        else:
            W = jnp.asarray(rng.normal(size=(D, S)) * 0.1, dtype=dt)
            A = jnp.zeros((S, S), dtype=dt)
            x = jnp.asarray(rng.normal(size=(B, T, D)), dtype=dt)
            tags = jnp.asarray(rng.integers(0, S, size=(B, T)))
            f = jax.jit(jax.value_and_grad(
                lambda p, x, tags: -smj.crf_log_likelihood(x @ p[0], tags, p[1]).mean()))
            args = ((W, A), x, tags)
        warm = None

        def run(*a):
            v, g = f(*args)
            jax.block_until_ready(g)
            return float(v)
    return run, warm


def _child(case, dtype, threads, steps):
    if case.startswith("torch"):
        import torch

        torch.set_num_threads(threads)
    run, warm = _build(case, dtype)
    if warm is not None:
        run(*warm)
    t = time.perf_counter()
    run()
    first = time.perf_counter() - t
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    from smoothmax._core import pool

    return {"first_s": first, "warm_s": statistics.median(times), "min_s": min(times),
            "pool": pool._probe()}


SPLIT = ((1, 1), (2, 2), (1, 2), (2, 1))  # (torch threads, smoothmax threads); jax: smoothmax's only


def _child_split(case, dtype, rounds, per_round):
    """One process, the thread settings taken in turn, ``per_round`` steps each
    a round: per setting, the median step over all rounds.

    Alternating within one process compares the settings on the same memory
    layout and the same minutes of the VM (between fresh processes the same
    step differs by up to 1.5x, and within one minutes apart by 1.2x).
    """
    import smoothmax
    from smoothmax._core import pool

    torch = None
    if case.startswith("torch"):
        import torch
    run, warm = _build(case, dtype)
    if warm is not None:
        run(*warm)
    run()
    settings = SPLIT if torch is not None else ((None, 1), (None, 2))
    times = {s: [] for s in settings}
    trips = {s: 0 for s in settings}
    for _ in range(rounds):
        for s in settings:
            if torch is not None:
                torch.set_num_threads(s[0])
            smoothmax.set_num_threads(s[1])
            for _ in range(3):  # settle: the pool's workers, torch's team
                run()
            t0 = pool._probe()["guard_trips"]
            for _ in range(per_round):
                t = time.perf_counter()
                run()
                times[s].append(time.perf_counter() - t)
            trips[s] += pool._probe()["guard_trips"] - t0
    smoothmax.set_num_threads(None)
    return [{"torch_threads": s[0], "smoothmax_threads": s[1], "warm_s": statistics.median(times[s]),
             "steps": len(times[s]), "guard_trips": trips[s]} for s in settings]


def _run_split(case, dtype, rounds, per_round):
    return _in_child(f"_child_split({case!r}, {dtype!r}, {rounds}, {per_round})", threads=2,
                     timeout=1800)


def _split_main(args, machine_mod):
    """``--split``: whose threads make a step slower, torch's or smoothmax's (e2e_split.*)."""
    rounds, per = (2, 3) if args.quick else (args.rounds, 20)
    t0 = time.time()
    out = {}
    for case in CASES:
        for dtype in ("float64", "float32"):
            with machine_mod.BusyCore() if args.cotenant else contextlib.nullcontext():
                r = _run_split(case, dtype, rounds, per)
            out[(case, dtype)] = r
            print(case, dtype, r if "error" in r else
                  " | ".join(f"torch {x['torch_threads']} smoothmax {x['smoothmax_threads']}: "
                             f"{1e3 * x['warm_s']:.2f} ms" for x in r), flush=True)
    if args.quick:
        return 0
    machine = machine_mod.describe()
    lines = ["# End to end, thread settings alternated within one process", "",
             f"Machine: {machine_mod.one_line(machine)}; {time.time() - t0:.0f} s; "
             f"`python bench/bench_e2e.py --split --rounds {rounds}"
             f"{' --cotenant' if args.cotenant else ''}`. The cases of `e2e.md`; one "
             f"fresh process a case with `OMP_NUM_THREADS=2`, the settings taken in turn "
             f"({per} steps each, after 3 unmeasured ones, {rounds} rounds); warm = the median "
             "step of a setting over all rounds. Torch's threads: `torch.set_num_threads`; "
             "smoothmax's: `smoothmax.set_num_threads`. JAX: XLA's own pool is not limited, "
             "smoothmax's threads alternate."
             + (" **Co-tenant**: another process spins on the last CPU during each case "
                "(`_machine.BusyCore`)." if args.cotenant else ""), "",
             "| case | dtype | torch / smoothmax threads | warm ms | / 1-1 | guard trips |",
             "|---|---|---|---:|---:|---:|"]
    for (case, dtype), r in out.items():
        if "error" in r:
            lines.append(f"| {case} | {dtype} | {r['error']} ||||")
            continue
        base = r[0]["warm_s"]
        for x in r:
            tt = "-" if x["torch_threads"] is None else x["torch_threads"]
            lines.append(f"| {case} | {dtype} | {tt} / {x['smoothmax_threads']} | "
                         f"{1e3 * x['warm_s']:.2f} | {x['warm_s'] / base:.2f} | {x['guard_trips']} |")
    os.makedirs(args.out_dir, exist_ok=True)
    name = "e2e_split_cotenant" if args.cotenant else "e2e_split"
    with open(os.path.join(args.out_dir, name + ".md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out_dir, name + ".json"), "w") as f:
        json.dump({"machine": machine, "rounds": rounds, "per_round": per, "cotenant": args.cotenant,
                   "cases": [{"case": c, "dtype": d, "settings": r} for (c, d), r in out.items()]},
                  f, indent=1)
    print("\n".join(lines))
    return 0


def _in_child(call, threads, wait_policy=None, timeout=900):
    """``bench_e2e.<call>`` in a fresh process with ``OMP_NUM_THREADS=threads``: its JSON result."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads),
               PYTHONPATH=_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("SMOOTHMAX_NUM_THREADS", None)
    env.pop("OMP_WAIT_POLICY", None)
    if wait_policy:
        env["OMP_WAIT_POLICY"] = wait_policy
    code = (f"import json, sys; sys.path.insert(0, {_HERE!r}); import bench_e2e; "
            f"print(json.dumps(bench_e2e.{call}))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=timeout)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _run(case, dtype, threads, steps, wait_policy=None):
    return _in_child(f"_child({case!r}, {dtype!r}, {threads}, {steps})", threads, wait_policy)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="3 steps per case, nothing written")
    p.add_argument("--out-dir", default=os.path.join(_HERE, "results"))
    p.add_argument("--processes", type=int, default=3,
                   help="fresh processes per case, in rounds over all cases; the one with the "
                   "median warm time is kept (this VM's speed differs from process to process "
                   "by up to 1.5x, docs/engines.md; the fastest of three made one-thread "
                   "cases look faster than they mostly are); every process's figures are in "
                   "the JSON")
    p.add_argument("--split", action="store_true",
                   help="instead: one process a case, torch's and smoothmax's thread counts "
                   "alternated within it (e2e_split.{md,json})")
    p.add_argument("--rounds", type=int, default=15, help="--split: rounds over the settings")
    p.add_argument("--cotenant", action="store_true",
                   help="--split: another process keeps one core busy (e2e_split_cotenant.*)")
    args = p.parse_args()
    sys.path.insert(0, _HERE)
    import _machine

    if args.split:
        return _split_main(args, _machine)

    steps = 3 if args.quick else 150
    rows = []
    jobs = [(c, d, t) for c in CASES for d in ("float64", "float32") for t in (1, 2)]
    t0 = time.time()
    # torch's OpenMP threads spin after each of its parallel regions (libgomp's
    # default); with OMP_WAIT_POLICY=PASSIVE they sleep at once (docs/threads.md)
    jobs += [(c, d, 2, "PASSIVE") for c in CASES if c.startswith("torch") for d in ("float64", "float32")]
    rounds = 1 if args.quick else max(1, args.processes)
    runs = [[] for _ in jobs]
    for rnd in range(rounds):
        for k, (case, dtype, threads, *policy) in enumerate(jobs):
            r = _run(case, dtype, threads, steps, *policy)
            runs[k].append(r)
            print(f"[{rnd + 1}/{rounds}: {k + 1}/{len(jobs)}] {case} {dtype} {threads}t"
                  f"{' ' + policy[0] if policy else ''}: "
                  + (r["error"] if "error" in r else
                     f"first {1e3 * r['first_s']:.1f} ms, warm {1e3 * r['warm_s']:.2f} ms"),
                  flush=True)
    for (case, dtype, threads, *policy), rs in zip(jobs, runs):
        ok = [r for r in rs if "error" not in r]
        ok.sort(key=lambda r: r["warm_s"])
        r = dict(ok[(len(ok) - 1) // 2] if ok else rs[0])
        r.update(case=case, dtype=dtype, threads=threads, wait_policy=(policy or [None])[0],
                 process_warm_s=[r2.get("warm_s") for r2 in rs],
                 process_first_s=[r2.get("first_s") for r2 in rs])
        rows.append(r)
    machine = _machine.describe()
    if args.quick:
        return 0
    lines = ["# End to end: training steps through the torch layer and jax.jit", "",
             f"Machine: {_machine.one_line(machine)}; {time.time() - t0:.0f} s; "
             f"`python bench/bench_e2e.py`. B = {B}; soft-DTW {N}×{N}, d = {D}; CRF T = {T}, "
             f"S = {S}. Each case in a fresh process, {rounds} process(es) a case in rounds "
             "over all cases, the process with the median warm time kept (its first call "
             "shown with it; every process in the JSON); threads = `OMP_NUM_THREADS` and "
             "`torch.set_num_threads`; warm = median of 150 steps.", "",
             "| case | dtype | first 1t ms | warm 1t ms | first 2t ms | warm 2t ms | "
             "2t / 1t warm | float64 / float32 warm (1t) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    by = {(r["case"], r["dtype"], r["threads"]): r for r in rows if not r["wait_policy"]}
    for case in CASES:
        for dtype in ("float64", "float32"):
            one, two = by[(case, dtype, 1)], by[(case, dtype, 2)]
            if "error" in one or "error" in two:
                lines.append(f"| {case} | {dtype} | {one.get('error', two.get('error'))} |||||")
                continue
            r64 = by[(case, "float64", 1)]
            ratio = (f"{r64['warm_s'] / one['warm_s']:.2f}" if dtype == "float32"
                     and "error" not in r64 else "")
            lines.append(f"| {case} | {dtype} | {1e3 * one['first_s']:.1f} | "
                         f"{1e3 * one['warm_s']:.2f} | {1e3 * two['first_s']:.1f} | "
                         f"{1e3 * two['warm_s']:.2f} | {two['warm_s'] / one['warm_s']:.2f} | {ratio} |")
    lines += ["", "With `OMP_WAIT_POLICY=PASSIVE` (torch's OpenMP threads sleep after their "
              "parallel regions instead of spinning), two threads:", "",
              "| case | dtype | warm 2t ms | / warm 1t (default policy) | smoothmax team at the end |",
              "|---|---|---:|---:|---:|"]
    for r in rows:
        if r["wait_policy"] and "error" not in r:
            one = by[(r["case"], r["dtype"], 1)]
            lines.append(f"| {r['case']} | {r['dtype']} | {1e3 * r['warm_s']:.2f} | "
                         f"{r['warm_s'] / one['warm_s']:.2f} | {r['pool']['used']} |")
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "e2e.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out_dir, "e2e.json"), "w") as f:
        json.dump({"machine": machine, "rows": rows}, f, indent=1)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
