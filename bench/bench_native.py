"""Native framework integration: graph breaks, compiled vs eager step time, per-call overhead.

Three measurements, on the CPU, written to ``bench/results/native_<tag>.md`` and ``.json``:

* **graph breaks**: ``torch._dynamo.explain`` on a forward with ``smoothmax.torch.SoftDTW``,
  ``smoothmax.torch.Viterbi``, ``smoothmax.losses.viterbi_surrogate`` (a CRF loss) and
  ``StructuredAttention`` (graphs, breaks, the first break reasons);
* **training step**: one step (forward, loss, backward, SGD update) of a small model with a
  SoftDTW loss and of a small CRF tagger (``viterbi_surrogate``), batch 16 and 64, eager and
  under ``torch.compile`` (inductor; ``fullgraph=True`` when ``--fullgraph``); median over
  rounds after warm-up (the warm-up also compiles);
* **per-call overhead**: ``dtw_grad`` (value and E) of a 1x2x2 and a 32x128x128 problem
  through NumPy and torch (no autograd), and torch value + backward; best of rounds. With
  ``--against DIR`` (a checkout of an earlier commit, its core built), the same
  measurement alternates between fresh processes importing this checkout and ``DIR``
  (10 each) and keeps each one's best: on a shared machine, a fair before/after ratio.

The JAX columns are measured by the JAX helper's script (not here).

Usage::

    python bench/bench_native.py --tag before   # writes bench/results/native_before.{md,json}
    python bench/bench_native.py --tag after --fullgraph --against /path/to/base/checkout
    python bench/bench_native.py --quick        # a smoke run, nothing written
"""
import argparse
import json
import os
import statistics
import sys
import time
import warnings

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
# this checkout's smoothmax, or the tree given to a --overhead-child process
_ROOT = (sys.argv[sys.argv.index("--overhead-child") + 1] if "--overhead-child" in sys.argv
         else os.path.dirname(_HERE))
sys.path.insert(0, _ROOT)
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import smoothmax as sm  # noqa: E402
from smoothmax import losses  # noqa: E402
from smoothmax.attention import StructuredAttention  # noqa: E402
from smoothmax.torch import SoftDTW, Viterbi  # noqa: E402

import _machine  # noqa: E402

torch.set_num_threads(1)


# ---------------------------------------------------------------------------
# models


class DTWModel(torch.nn.Module):
    """A linear map of the input series, soft-DTW loss to the target series."""

    def __init__(self, d=4):
        super().__init__()
        self.lin = torch.nn.Linear(d, d)
        self.loss = SoftDTW(gamma=0.1)

    def forward(self, x, y):
        return self.loss(self.lin(x), y).mean()


class CRFModel(torch.nn.Module):
    """A linear emission layer and a transition matrix; CRF loss (viterbi_surrogate)."""

    def __init__(self, d=8, S=5):
        super().__init__()
        self.emit = torch.nn.Linear(d, S)
        self.trans = torch.nn.Parameter(torch.zeros(S, S))

    def forward(self, x, tags):
        theta = self.emit(x)[..., :, None] + self.trans
        return losses.viterbi_surrogate(theta, tags).mean()


class ViterbiModel(torch.nn.Module):
    def __init__(self, d=8, S=5):
        super().__init__()
        self.emit = torch.nn.Linear(d, S)
        self.trans = torch.nn.Parameter(torch.zeros(S, S))
        self.vit = Viterbi()

    def forward(self, x):
        return self.vit(self.emit(x)[..., :, None] + self.trans).mean()


class AttentionModel(torch.nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.score = torch.nn.Linear(d, 1)
        self.att = StructuredAttention()

    def forward(self, x):
        ctx, _ = self.att(self.score(x)[..., 0], x)
        return ctx.sum()


def dtw_batch(B, N=32, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, N, d, generator=g), torch.randn(B, N, d, generator=g)


def crf_batch(B, T=20, d=8, S=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, d, generator=g), torch.randint(0, S, (B, T), generator=g)


# ---------------------------------------------------------------------------
# measurements


def graph_breaks():
    torch.manual_seed(0)
    cases = {
        "SoftDTW": (DTWModel(), dtw_batch(4)),
        "Viterbi": (ViterbiModel(), crf_batch(4)[:1]),
        "viterbi_surrogate": (CRFModel(), crf_batch(4)),
        "StructuredAttention": (AttentionModel(), crf_batch(4)[:1]),
    }
    out = {}
    for name, (model, args) in cases.items():
        torch._dynamo.reset()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ex = torch._dynamo.explain(model)(*args)
        reasons = []
        for r in ex.break_reasons:
            line = str(getattr(r, "reason", r)).strip().splitlines()[0][:120]
            if line not in reasons:
                reasons.append(line)
        out[name] = {"graphs": ex.graph_count, "breaks": ex.graph_break_count,
                     "warnings": len(caught), "reasons": reasons[:4]}
        print(f"  {name}: {ex.graph_count} graphs, {ex.graph_break_count} breaks, "
              f"{len(caught)} warnings", flush=True)
    return out


def _median_step(step, args, rounds, warm):
    for _ in range(warm):
        step(*args)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        step(*args)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def train_steps(batches, rounds, fullgraph):
    out = {}
    for name, make, data in (("SoftDTW", DTWModel, dtw_batch), ("CRF", CRFModel, crf_batch)):
        for B in batches:
            args = data(B)
            row = {}
            for mode in ("eager", "compiled"):
                torch.manual_seed(0)
                model = make()
                opt = torch.optim.SGD(model.parameters(), lr=1e-3)
                fwd = model
                if mode == "compiled":
                    torch._dynamo.reset()
                    fwd = torch.compile(model, fullgraph=fullgraph)

                def step(*a, fwd=fwd, opt=opt):
                    opt.zero_grad()
                    loss = fwd(*a)
                    loss.backward()
                    opt.step()
                    return loss

                t0 = time.perf_counter()
                step(*args)
                first = time.perf_counter() - t0
                row[mode] = _median_step(step, args, rounds, warm=2)
                row[mode + "_first_call_s"] = first
            row["ratio"] = row["compiled"] / row["eager"]
            out[f"{name} B={B}"] = row
            print(f"  {name} B={B}: eager {row['eager'] * 1e3:.3f} ms, compiled "
                  f"{row['compiled'] * 1e3:.3f} ms (x{row['ratio']:.2f}), first compiled call "
                  f"{row['compiled_first_call_s']:.1f} s", flush=True)
    return out


def _best(fn, rounds, inner):
    fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t0) / inner)
    return best


def overhead(rounds):
    out = {}
    rng = np.random.default_rng(0)
    for shape, inner in (((1, 2, 2), 2000), ((32, 128, 128), 5)):
        th = rng.random(shape)
        tt = torch.from_numpy(th.copy())
        tg = tt.clone().requires_grad_(True)

        def autograd_step():
            sm.dtw(tg).sum().backward()

        row = {
            "numpy dtw_grad": _best(lambda: sm.dtw_grad(th), rounds, inner),
            "torch dtw_grad": _best(lambda: sm.dtw_grad(tt), rounds, inner),
            "torch dtw + backward": _best(autograd_step, rounds, inner),
        }
        key = "x".join(map(str, shape))
        out[key] = row
        print("  " + key + ": " + ", ".join(f"{k} {v * 1e6:.1f} us" for k, v in row.items()),
              flush=True)
    return out


def _overhead_in_process(root, rounds):
    import subprocess

    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--overhead-child", root,
                          "--rounds", str(rounds)], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def overhead_against(other, rounds, repeats=5):
    """Best per-call times of this checkout and of ``other``, from alternating fresh processes."""
    import subprocess

    mine = os.path.dirname(_HERE)
    best = {}
    for _ in range(repeats):
        for label, root in (("this", mine), ("base", other)):
            res = _overhead_in_process(root, rounds)
            for shape, row in res.items():
                for k, v in row.items():
                    key = (label, shape, k)
                    best[key] = min(best.get(key, float("inf")), v)
    commit = subprocess.run(["git", "-C", other, "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    out = {"base_dir": other, "base_commit": commit, "repeats": repeats, "rows": {}}
    for (label, shape, k), v in best.items():
        out["rows"].setdefault(shape, {}).setdefault(k, {})[label] = v
    for shape, row in out["rows"].items():
        print("  " + shape + ": " + ", ".join(
            f"{k} {v['base'] * 1e6:.1f} -> {v['this'] * 1e6:.1f} us" for k, v in row.items()), flush=True)
    return out


def write(tag, res):
    base = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"native_{tag}")
    with open(base + ".json", "w") as f:
        json.dump(res, f, indent=2)
    m = res["machine"]
    lines = [f"# Native framework integration ({tag})", "",
             f"Machine: {_machine.one_line(m)}; torch {m['versions']['torch']}; one thread.",
             f"Load average at start {m['loadavg_at_start']}, at end {res['loadavg_at_end']}"
             + (" (other jobs ran at the same time)." if m["loadavg_at_start"][0] > 0.5 else "."),
             f"Command: `{res['command']}`", "",
             "## Graph breaks (`torch._dynamo.explain` of one forward)", "",
             "| model | graphs | graph breaks | warnings | first break reasons |",
             "|---|---|---|---|---|"]
    for k, v in res["graph_breaks"].items():
        lines.append(f"| {k} | {v['graphs']} | {v['breaks']} | {v['warnings']} | "
                     f"{'; '.join(v['reasons']).replace('|', '/') or '-'} |")
    lines += ["", f"## Training step (forward + backward + SGD), inductor, "
              f"fullgraph={res['fullgraph']}, median of {res['rounds']} steps", "",
              "| model | eager (ms) | compiled (ms) | compiled / eager | first compiled call (s) |",
              "|---|---|---|---|---|"]
    for k, v in res["train"].items():
        lines.append(f"| {k} | {v['eager'] * 1e3:.3f} | {v['compiled'] * 1e3:.3f} | "
                     f"{v['ratio']:.2f} | {v['compiled_first_call_s']:.1f} |")
    lines += ["", "The first compiled call includes the compilation; the later rows reuse inductor's "
              "caches (the same small kernels), hence their short first calls. The DP runs in the "
              "compiled core in both columns (inductor calls the smoothmax operators as extern "
              "kernels): compiling fuses and speeds up the torch code around it.",
              "", "## Per-call time of value + gradient (best of rounds, µs)", "",
              "| shape | " + " | ".join(next(iter(res["overhead"].values()))) + " |",
              "|---|" + "---|" * len(next(iter(res["overhead"].values())))]
    for k, v in res["overhead"].items():
        lines.append(f"| {k} | " + " | ".join(f"{t * 1e6:.1f}" for t in v.values()) + " |")
    if "overhead_against" in res:
        oa = res["overhead_against"]
        lines += ["", f"## Per-call time, before (`{oa['base_commit'][:7]}`) and after, alternating "
                  f"fresh processes ({oa['repeats']} each, best, µs)", "",
                  "| shape | call | before | after | after / before |", "|---|---|---|---|---|"]
        for shape, row in oa["rows"].items():
            for k, v in row.items():
                lines.append(f"| {shape} | {k} | {v['base'] * 1e6:.1f} | {v['this'] * 1e6:.1f} | "
                             f"{v['this'] / v['base']:.2f} |")
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("wrote", base + ".md")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tag", default=None)
    p.add_argument("--fullgraph", action="store_true")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--against", default=None, help="a checkout to compare the per-call times with")
    p.add_argument("--overhead-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--rounds", type=int, default=7, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.overhead_child:
        import contextlib

        with contextlib.redirect_stdout(sys.stderr):
            assert os.path.dirname(os.path.dirname(os.path.abspath(sm.__file__))) == os.path.abspath(_ROOT), sm.__file__
            res = overhead(a.rounds)
        print(json.dumps(res))
        return
    machine = _machine.describe()
    rounds = 3 if a.quick else 20
    print("graph breaks:", flush=True)
    res = {"machine": machine, "command": " ".join(["python"] + sys.argv),
           "fullgraph": a.fullgraph, "rounds": rounds}
    res["graph_breaks"] = graph_breaks()
    print("training steps:", flush=True)
    res["train"] = train_steps((16,) if a.quick else (16, 64), rounds, a.fullgraph)
    print("per-call overhead:", flush=True)
    res["overhead"] = overhead(3 if a.quick else 7)
    if a.against:
        print(f"per-call overhead against {a.against}:", flush=True)
        res["overhead_against"] = overhead_against(a.against, 3 if a.quick else 7, 2 if a.quick else 10)
    res["loadavg_at_end"] = list(os.getloadavg())
    if a.tag and not a.quick:
        write(a.tag, res)


if __name__ == "__main__":
    main()
