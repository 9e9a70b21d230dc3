"""CPU benchmark of smoothmax against its peers: soft-DTW and linear-chain CRF.

What is timed (one call = value and gradient, from arrays already in memory):

* DTW value + gradient (soft-DTW, negentropy, gamma = 1) on a given cost
  matrix ``theta (B, NA, NB)``: smoothmax (``sm.dtw_grad``), tslearn
  (``tslearn.metrics.SoftDTW(D).compute()`` + ``.grad()``, one problem at a
  time), soft-dtw (``sdtw.SoftDTW(D)``, same), ott-jax (``costs.SoftDTW`` with
  a ground cost that returns the given matrix, ``jit(vmap(value_and_grad))``),
  pysdtw (its numba CPU ``Function`` on the cost matrix, torch autograd).
* Viterbi value + marginals (CRF log-partition and marginals) on
  ``theta (B, T, S, S)``: smoothmax (``sm.viterbi_grad``), torch-struct
  (``LinearChainCRF(theta).partition`` + autograd, the same potentials),
  a plain torch loop (logsumexp over T, autograd), pytorch-crf
  (``crf._compute_normalizer`` + autograd to the emissions, on its own
  emission/transition parametrisation of the same size).
* smoothmax with ``reg="l2"`` as an extra row (its ratio is to smoothmax
  negentropy).

Each (threads, implementation, dtype) runs in a fresh subprocess with
OMP/MKL/OpenBLAS/numba thread variables set before any import,
``torch.set_num_threads`` and the XLA single-thread flags; with one thread the
process is also pinned to one CPU. Every timing is the median of repeated
calls after a warm-up call. Before a number is reported, the implementation's
float64 output is compared with smoothmax's float64 output on the same input
(value within 1e-6 relative, gradient within 1e-4 absolute; smoothmax itself
against its pure array reference engine); a failed check withholds the ratio.

Usage::

    python bench/bench_cpu.py --quick            # tiny smoke run (a few minutes, mostly imports)
    python bench/bench_cpu.py                    # the full benchmark, writes
                                                 # bench/results/cpu.json and cpu.md
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # benchmark the working tree, with its in-place build
if HERE not in sys.path:
    sys.path.insert(0, HERE)

GAMMA = 1.0
SKIP_SECONDS = 60.0      # a single call longer than this is not repeated / not attempted
FEW_REPEATS_SECONDS = 10.0
VALUE_RTOL = 1e-6        # float64 agreement required before a number is reported
GRAD_ATOL = 1e-4
VALUE_RTOL_F32 = 1e-3    # float32 output against the float64 smoothmax output
GRAD_ATOL_F32 = 1e-2

FULL_CASES = {
    "dtw": [(32, 256, 256), (1, 1024, 1024), (1, 4096, 4096)],
    "viterbi": [(32, 128, 16), (32, 128, 64)],
    "dtw-hvp": [(32, 256, 256), (1, 1024, 1024)],
    "viterbi-hvp": [(32, 128, 16), (32, 128, 64)],
}
QUICK_CASES = {
    "dtw": [(4, 32, 32), (1, 96, 96)],
    "viterbi": [(4, 16, 4), (4, 16, 8)],
    "dtw-hvp": [(4, 32, 32)],
    "viterbi-hvp": [(4, 16, 4)],
}
STRUCTS = list(FULL_CASES)

IMPLS = {
    "dtw": ["smoothmax", "smoothmax-l2", "tslearn", "soft-dtw", "ott-jax", "pysdtw", "jax-scan"],
    "viterbi": ["smoothmax", "smoothmax-l2", "pytorch-crf", "torch-struct", "torch-loop",
                "jax-scan"],
    # value + gradient + HVP: smoothmax's custom passes against generic second-order autodiff
    "dtw-hvp": ["smoothmax", "ott-jax", "jax-scan"],
    "viterbi-hvp": ["smoothmax", "torch-struct", "torch-loop", "jax-scan"],
}
# implementations that compute in float64 only: their float32 row repeats the float64 timing
FLOAT64_ONLY = {"tslearn", "soft-dtw"}
# implementations that compile on their first call (the warm-up) for each shape
JIT_IMPLS = {"ott-jax", "jax-scan", "pysdtw"}


def case_name(struct, shape):
    return f"{struct} " + "x".join(str(s) for s in shape)


def cells(struct, shape):
    """The work unit: DP cells for DTW (B*NA*NB), edges for Viterbi (B*T*S*S)."""
    if struct.startswith("dtw"):
        B, NA, NB = shape
        return B * NA * NB
    B, T, S = shape
    return B * T * S * S


# ----------------------------------------------------------------------------- inputs

def make_inputs(struct, shape):
    """Deterministic float64 inputs of a case (NumPy)."""
    import numpy as np

    rng = np.random.default_rng(zlib.crc32(case_name(struct, shape).encode()))
    inp = _make_theta(rng, struct.split("-")[0], shape)
    if struct.endswith("hvp"):
        inp["Z"] = rng.standard_normal(inp["theta"].shape)  # the HVP direction
    return inp


def _make_theta(rng, struct, shape):
    import numpy as np

    if struct == "dtw":
        B, NA, NB = shape
        # squared Euclidean costs between random-walk series of dimension 2,
        # the cost matrix soft-DTW users feed (sdtw.distance.SquaredEuclidean)
        a = np.cumsum(rng.standard_normal((B, NA, 2)), axis=1) / np.sqrt(NA)
        b = np.cumsum(rng.standard_normal((B, NB, 2)), axis=1) / np.sqrt(NB)
        theta = np.empty((B, NA, NB))
        for k in range(B):
            theta[k] = ((a[k, :, None, :] - b[k, None, :, :]) ** 2).sum(-1)
        return {"theta": theta}
    B, T, S = shape
    theta = rng.standard_normal((B, T, S, S))
    # pytorch-crf parametrisation: emissions (T, B, S), transitions[from, to], start, end
    emissions = rng.standard_normal((T, B, S))
    trans = 0.5 * rng.standard_normal((S, S))
    start = 0.5 * rng.standard_normal(S)
    end = 0.5 * rng.standard_normal(S)
    # the same CRF as smoothmax potentials: theta[t, i, j] = trans[j, i] + emis[t, i];
    # step 0 starts from state 0 only (V_{-1} = 0 for all states, -inf masks the rest)
    theta_crf = trans.T[None, None, :, :] + emissions.transpose(1, 0, 2)[:, :, :, None]
    theta_crf = np.ascontiguousarray(np.broadcast_to(theta_crf, (B, T, S, S)))
    theta_crf[:, 0, :, :] = -np.inf
    theta_crf[:, 0, :, 0] = start[None, :] + emissions[0]
    theta_crf[:, T - 1, :, :] += end[None, :, None]
    return {"theta": theta, "emissions": emissions, "trans": trans, "start": start, "end": end,
            "theta_crf": theta_crf}


# ----------------------------------------------------------------------------- implementations
# setup(struct, inputs, dtype) -> (run, to_numpy, reference_key)
#   run():         the timed call, returns the raw outputs (synchronised)
#   to_numpy(out): {"value": (B,), "grad": array} as float64 NumPy
#   reference_key: which smoothmax float64 output to compare with ("theta" or "theta_crf_unary")


def _np_dtype(dtype):
    import numpy as np

    return {"float32": np.float32, "float64": np.float64}[dtype]


def _torch_dtype(dtype):
    import torch

    return {"float32": torch.float32, "float64": torch.float64}[dtype]


def setup_smoothmax(struct, inp, dtype, reg="negentropy"):
    import numpy as np

    import smoothmax as sm

    theta = np.ascontiguousarray(inp["theta"].astype(_np_dtype(dtype)))
    if struct.endswith("hvp"):
        Z = np.ascontiguousarray(inp["Z"].astype(_np_dtype(dtype)))
        hvp = sm.dtw_hvp if struct.startswith("dtw") else sm.viterbi_hvp

        def run_hvp():  # the engine runs value, E and Edot in one forward + one reverse pass
            return hvp(theta, Z, reg=reg, gamma=GAMMA)

        return run_hvp, lambda out: {"grad": np.asarray(out, np.float64)}, \
            ("self" if reg != "negentropy" else "theta")
    fn = sm.dtw_grad if struct == "dtw" else sm.viterbi_grad

    def run():
        return fn(theta, reg=reg, gamma=GAMMA)

    def to_numpy(out):
        return {"value": np.asarray(out[0], np.float64), "grad": np.asarray(out[1], np.float64)}

    return run, to_numpy, ("self" if reg != "negentropy" else "theta")


def setup_smoothmax_l2(struct, inp, dtype):
    return setup_smoothmax(struct, inp, dtype, reg="l2")


def setup_tslearn(struct, inp, dtype):
    import numpy as np
    from tslearn.metrics import SoftDTW

    theta = inp["theta"]  # float64 only

    def run():
        values, grads = np.empty(len(theta)), np.empty_like(theta)
        for k in range(len(theta)):
            s = SoftDTW(theta[k], gamma=GAMMA)
            values[k] = s.compute()
            grads[k] = s.grad()
        return values, grads

    return run, lambda out: {"value": out[0], "grad": out[1]}, "theta"


def setup_softdtw(struct, inp, dtype):
    import numpy as np
    from sdtw import SoftDTW

    theta = inp["theta"]  # float64 only (its Cython kernels are double)

    def run():
        values, grads = np.empty(len(theta)), np.empty_like(theta)
        for k in range(len(theta)):
            s = SoftDTW(theta[k], gamma=GAMMA)
            values[k] = s.compute()
            grads[k] = s.grad()
        return values, grads

    return run, lambda out: {"value": out[0], "grad": out[1]}, "theta"


def setup_ott(struct, inp, dtype):
    import jax
    import jax.numpy as jnp
    from ott.geometry import costs

    if dtype == "float64" and not jax.config.jax_enable_x64:
        raise RuntimeError("float64 needs JAX_ENABLE_X64=1")

    class GivenCost(costs.CostFn):
        """A ground cost that hands the given cost matrix to ott's soft-DTW recursion."""

        def __call__(self, x, y):
            raise NotImplementedError

        def all_pairs(self, x, y):
            return x

    NB = inp["theta"].shape[2]
    sdtw = costs.SoftDTW(gamma=GAMMA, ground_cost=GivenCost())
    dummy = jnp.zeros((NB, 1), dtype=_np_dtype(dtype))

    def value(c):
        return sdtw._soft_dtw(c, dummy)

    # reverse-over-reverse: ott's softmin is a custom_vjp, which refuses jvp
    return _jax_timed(struct, inp, dtype, lambda c, _: value(c), (), reverse_over_reverse=True)


def setup_jax_scan(struct, inp, dtype):
    """A plain JAX recursion in ``lax.scan``: soft-DTW over anti-diagonals with a
    ``logsumexp`` softmin, or the CRF log-partition over time (Viterbi).

    For soft-DTW:

    The baseline a JAX user would write (like ott's recursion, but with a plain
    softmin so that forward-over-reverse works, and a large finite cost instead
    of ``inf`` at the borders so that no derivative sees ``inf - inf``).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    if dtype == "float64" and not jax.config.jax_enable_x64:
        raise RuntimeError("float64 needs JAX_ENABLE_X64=1")
    if struct.startswith("viterbi"):
        return _jax_timed(struct, inp, dtype, _jax_viterbi_value, ())
    B, n, m = inp["theta"].shape
    big = 1e10  # exp(-big / gamma) is exactly 0 in both dtypes
    ii = np.arange(n)[None, :]
    dd = np.arange(n + m - 1)[:, None]
    jj = dd - ii
    valid = (jj >= 0) & (jj < m)
    jjc = np.clip(jj, 0, m - 1)

    def softmin(x):
        return -GAMMA * jax.nn.logsumexp(-x / GAMMA, axis=-1)

    # the gather indices are arguments, not constants: XLA's constant folding of
    # million-entry index arrays takes seconds and corrupted the heap with 2 threads
    idx = (jnp.asarray(ii), jnp.asarray(jjc), jnp.asarray(valid))

    def value(c, idx):
        ii, jjc, valid = idx
        diags = jnp.where(valid, c[ii, jjc], big)      # diags[d, i] = c[i, d - i]
        edge = jnp.full((n + 1,), big, c.dtype)        # index k holds row i = k - 1
        two_ago, one_ago = edge.at[0].set(0.0), edge   # R[-1, -1] = 0, borders "inf"

        def body(carry, diag):
            p2, p1 = carry
            r = diag + softmin(jnp.stack([p1[:-1], p1[1:], p2[:-1]], axis=-1))
            return (p1, jnp.concatenate([edge[:1], r])), None

        (_, last), _ = jax.lax.scan(body, (two_ago, one_ago), diags)
        return last[n]

    return _jax_timed(struct, inp, dtype, value, idx)


def _jax_viterbi_value(theta, _):
    """A plain JAX CRF log-partition: ``lax.scan`` over time, ``logsumexp`` over states."""
    import jax
    import jax.numpy as jnp

    def body(V, th):
        return GAMMA * jax.nn.logsumexp((th + V[None, :]) / GAMMA, axis=-1), None

    V, _ = jax.lax.scan(body, jnp.zeros(theta.shape[-1], theta.dtype), theta)
    return GAMMA * jax.nn.logsumexp(V / GAMMA)


def _jax_timed(struct, inp, dtype, value, idx, reverse_over_reverse=False):
    """Jitted, batch-vmapped value + gradient (or + HVP) of ``value(c, idx)``.

    The HVP is forward-over-reverse (``jvp`` of ``grad``), or reverse-over-reverse
    for a value that cannot be differentiated forward (ott's custom_vjp softmin).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    theta = jnp.asarray(inp["theta"].astype(_np_dtype(dtype)))
    if struct.endswith("hvp"):
        def value_grad_hvp(c, z, idx):
            f = lambda c: value(c, idx)  # noqa: E731
            if reverse_over_reverse:
                E, vjp = jax.vjp(jax.grad(f), c)
                return f(c), E, vjp(z)[0]
            (v, E), (_, Edot) = jax.jvp(jax.value_and_grad(f), (c,), (z,))
            return v, E, Edot

        fn_hvp = jax.jit(jax.vmap(value_grad_hvp, in_axes=(0, 0, None)))
        Z = jnp.asarray(inp["Z"].astype(_np_dtype(dtype)))

        def run_hvp():
            out = fn_hvp(theta, Z, idx)
            jax.block_until_ready(out)
            return out

        return run_hvp, lambda out: {"value": np.asarray(out[0], np.float64),
                                     "grad": np.asarray(out[2], np.float64)}, "theta"
    fn = jax.jit(jax.vmap(jax.value_and_grad(value), in_axes=(0, None)))

    def run():
        out = fn(theta, idx)
        jax.block_until_ready(out)
        return out

    return run, lambda out: {"value": np.asarray(out[0], np.float64),
                             "grad": np.asarray(out[1], np.float64)}, "theta"


def setup_pysdtw(struct, inp, dtype):
    import numpy as np
    import torch
    from pysdtw.sdtw_cpu import SoftDTWcpu

    theta = torch.from_numpy(inp["theta"].astype(_np_dtype(dtype)))
    B, NA, NB = theta.shape
    lengths = torch.tensor([[NA, NB]] * B, dtype=torch.int64)

    def run():
        th = theta.detach().requires_grad_()
        value = SoftDTWcpu.apply(th, lengths, GAMMA, 0.0)
        (grad,) = torch.autograd.grad(value.sum(), th)
        return value.detach(), grad

    return run, lambda out: {"value": out[0].double().numpy(), "grad": out[1].double().numpy()}, \
        "theta"


def setup_torch_struct(struct, inp, dtype):
    import torch
    from torch_struct import LinearChainCRF

    theta = torch.from_numpy(inp["theta"]).to(_torch_dtype(dtype))
    if struct.endswith("hvp"):
        return _torch_hvp(lambda th: LinearChainCRF(th).partition, theta, inp, dtype)

    def run():
        th = theta.detach().requires_grad_()
        value = LinearChainCRF(th).partition
        (E,) = torch.autograd.grad(value.sum(), th)
        return value.detach(), E

    return run, lambda out: {"value": out[0].double().numpy(), "grad": out[1].double().numpy()}, \
        "theta"


def setup_torch_loop(struct, inp, dtype):
    import torch

    theta = torch.from_numpy(inp["theta"]).to(_torch_dtype(dtype))
    B, T, S, _ = theta.shape

    def log_partition(th):
        V = th.new_zeros((B, S))
        for t in range(T):
            V = torch.logsumexp(th[:, t] + V[:, None, :], dim=-1)
        return torch.logsumexp(V, dim=-1)

    if struct.endswith("hvp"):
        return _torch_hvp(log_partition, theta, inp, dtype)

    def run():
        th = theta.detach().requires_grad_()
        value = log_partition(th)
        (E,) = torch.autograd.grad(value.sum(), th)
        return value.detach(), E

    return run, lambda out: {"value": out[0].double().numpy(), "grad": out[1].double().numpy()}, \
        "theta"


def _torch_hvp(value_fn, theta, inp, dtype):
    """Value, E and the HVP by double backward (reverse-over-reverse) in torch."""
    import torch

    Z = torch.from_numpy(inp["Z"]).to(_torch_dtype(dtype))

    def run():
        th = theta.detach().requires_grad_()
        value = value_fn(th)
        (E,) = torch.autograd.grad(value.sum(), th, create_graph=True)
        (Edot,) = torch.autograd.grad((E * Z).sum(), th)
        return value.detach(), E.detach(), Edot

    return run, lambda out: {"value": out[0].double().numpy(), "grad": out[2].double().numpy()}, \
        "theta"


def setup_pytorch_crf(struct, inp, dtype):
    import torch
    from torchcrf import CRF

    T, B, S = inp["emissions"].shape
    tdt = _torch_dtype(dtype)
    crf = CRF(S).to(tdt)
    with torch.no_grad():
        crf.transitions.copy_(torch.from_numpy(inp["trans"]))
        crf.start_transitions.copy_(torch.from_numpy(inp["start"]))
        crf.end_transitions.copy_(torch.from_numpy(inp["end"]))
    emissions = torch.from_numpy(inp["emissions"]).to(tdt)
    mask = torch.ones((T, B), dtype=torch.bool)

    def run():
        em = emissions.detach().requires_grad_()
        value = crf._compute_normalizer(em, mask)
        (marg,) = torch.autograd.grad(value.sum(), em)  # unary marginals p(y_t = i), (T, B, S)
        return value.detach(), marg

    def to_numpy(out):
        return {"value": out[0].double().numpy(),
                "grad": out[1].double().numpy().transpose(1, 0, 2)}

    return run, to_numpy, "theta_crf_unary"


SETUPS = {
    "smoothmax": setup_smoothmax,
    "smoothmax-l2": setup_smoothmax_l2,
    "tslearn": setup_tslearn,
    "soft-dtw": setup_softdtw,
    "ott-jax": setup_ott,
    "pysdtw": setup_pysdtw,
    "jax-scan": setup_jax_scan,
    "pytorch-crf": setup_pytorch_crf,
    "torch-struct": setup_torch_struct,
    "torch-loop": setup_torch_loop,
}


# ----------------------------------------------------------------------------- checks

def _smoothmax_reference(struct, inp, key):
    """smoothmax float64 negentropy outputs used to check every peer (not timed)."""
    import numpy as np

    import smoothmax as sm

    base = struct.split("-")[0]
    if key == "theta" and struct.endswith("hvp"):
        vfn = sm.dtw if base == "dtw" else sm.viterbi
        hvp = sm.dtw_hvp if base == "dtw" else sm.viterbi_hvp
        return {"value": np.asarray(vfn(inp["theta"], reg="negentropy", gamma=GAMMA)),
                "grad": np.asarray(hvp(inp["theta"], inp["Z"], reg="negentropy", gamma=GAMMA))}
    if key == "theta":
        fn = sm.dtw_grad if base == "dtw" else sm.viterbi_grad
        v, E = fn(inp["theta"], reg="negentropy", gamma=GAMMA)
        return {"value": np.asarray(v), "grad": np.asarray(E)}
    v, E = sm.viterbi_grad(inp["theta_crf"], reg="negentropy", gamma=GAMMA)
    return {"value": np.asarray(v), "grad": np.asarray(E).sum(-1)}


def _spec_reference(struct, inp, reg, max_cells=1 << 20):
    """smoothmax's pure array reference engine (the executable spec) on the first item."""
    import numpy as np

    from smoothmax import _reference
    from smoothmax.operators import REG_CODES

    theta = inp["theta"][:1]
    if theta[0].size > max_cells:
        return None
    hvp = struct.endswith("hvp")
    if struct.startswith("dtw"):
        la = np.array([theta.shape[1]], np.int64)
        lb = np.array([theta.shape[2]], np.int64)
        if hvp:
            v, _, E = _reference.dtw_hvp(theta, inp["Z"][:1], la, lb, -1, REG_CODES[reg], GAMMA)
        else:
            v, E = _reference.dtw_grad(theta, la, lb, -1, REG_CODES[reg], GAMMA)
    else:
        lengths = np.array([theta.shape[1]], np.int64)
        if hvp:
            v, _, E = _reference.viterbi_hvp(theta, inp["Z"][:1], lengths, REG_CODES[reg], GAMMA)
        else:
            v, E = _reference.viterbi_grad(theta, lengths, REG_CODES[reg], GAMMA)
    out = {"grad": np.asarray(E, np.float64)}
    if not hvp:
        out["value"] = np.asarray(v, np.float64)
    return out


def compare(got, ref, dtype):
    import numpy as np

    n = ref["grad"].shape[0]
    gg = got["grad"][:n]
    value_err = 0.0
    if "value" in got and "value" in ref:
        with np.errstate(invalid="ignore", divide="ignore"):
            rel = (np.abs(got["value"][:n] - ref["value"])
                   / np.maximum(np.abs(ref["value"]), 1e-300))
        value_err = float(np.max(rel)) if rel.size else 0.0
    grad_err = float(np.max(np.abs(gg - ref["grad"]))) if gg.size else 0.0
    rtol, atol = (VALUE_RTOL, GRAD_ATOL) if dtype == "float64" else (VALUE_RTOL_F32, GRAD_ATOL_F32)
    ok = bool(np.isfinite(value_err) and np.isfinite(grad_err) and value_err <= rtol
              and grad_err <= atol)
    return {"value_rel_err": value_err, "grad_max_abs_err": grad_err, "value_rtol": rtol,
            "grad_atol": atol, "ok": ok}


# ----------------------------------------------------------------------------- worker

def _set_threads(threads):
    if threads == 1 and hasattr(os, "sched_setaffinity"):
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[-1]})
    try:
        import torch

        torch.set_num_threads(threads)
        torch.set_num_interop_threads(1)
    except (ImportError, RuntimeError):
        pass


def time_call(run, budget_s, jit=False):
    """A warm-up call, then the median of timed repeats.

    Returns ``(median, times, outputs, status)``. A timed call over
    ``FEW_REPEATS_SECONDS`` is not repeated. A warm-up over ``SKIP_SECONDS`` is
    the measurement itself unless the implementation compiles on its first call
    (``jit``), whose warm-up time says nothing about its run time.
    """
    t0 = time.perf_counter()
    out = run()
    first = time.perf_counter() - t0
    if first > SKIP_SECONDS and not jit:
        return first, [first], out, f"slow: one call > {SKIP_SECONDS:.0f} s, not repeated"
    times = []
    while True:
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
        if times[0] > FEW_REPEATS_SECONDS:
            break
        reps = int(max(3, min(25, budget_s / max(times[0], 1e-6))))
        if len(times) >= reps:
            break
    times.sort()
    status = "ok" if times[0] <= SKIP_SECONDS else (
        f"slow: one call > {SKIP_SECONDS:.0f} s, not repeated")
    return times[len(times) // 2], times, out, status


def worker(args):
    """Run a plan of (struct, implementation, cases) at one dtype and thread count.

    Prints one ``RESULT {json}`` line per entry as soon as it is measured.
    """
    _set_threads(args.threads)
    for struct, impl, cases in json.loads(args.plan):
        prev_ns = None
        for shape in cases:
            entry = measure(struct, shape, impl, args.dtype, args.threads, prev_ns, args)
            prev_ns = entry.get("ns_per_cell", prev_ns)
            print("RESULT " + json.dumps(entry), flush=True)


def measure(struct, shape, impl, dtype, threads, prev_ns, args):
    entry = {"case": case_name(struct, shape), "struct": struct, "shape": shape, "impl": impl,
             "dtype": dtype, "peer_dtype": dtype, "threads": threads,
             "cells": cells(struct, shape), "loadavg_before": os.getloadavg()[0]}
    n_cells = entry["cells"]
    # skip only when the smaller case predicts far more than the limit (ns/cell varies with size)
    if prev_ns is not None and prev_ns * n_cells * 1e-9 > 3 * SKIP_SECONDS:
        entry["status"] = (f"skipped: > {SKIP_SECONDS:.0f} s (predicted "
                           f"{prev_ns * n_cells * 1e-9:.0f} s from the smaller case)")
        return entry
    try:
        inp = make_inputs(struct, shape)
        run, to_numpy, ref_key = SETUPS[impl](struct, inp, dtype)
        seconds, times, out, status = time_call(run, args.budget, jit=impl in JIT_IMPLS)
        entry.update(seconds=seconds, times=times, ns_per_cell=seconds / n_cells * 1e9,
                     status=status)
        got = to_numpy(out)
        del out, run
        if not args.no_check:
            entry["check"] = check(struct, inp, impl, dtype, ref_key, got)
            if entry["check"]["ok"] is False:
                entry["status"] = "check failed"
    except Exception as exc:  # an unavailable or broken peer is a result, not a crash
        kind = "unavailable" if isinstance(exc, ImportError) else "error"
        entry["status"] = f"{kind}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return entry


def check(struct, inp, impl, dtype, ref_key, got):
    if ref_key == "self":  # smoothmax l2: against smoothmax's reference engine
        ref, against = _spec_reference(struct, inp, "l2"), "smoothmax._reference (item 0)"
    elif impl == "smoothmax" and dtype == "float64":
        ref, against = _spec_reference(struct, inp, "negentropy"), "smoothmax._reference (item 0)"
    else:
        ref, against = _smoothmax_reference(struct, inp, ref_key), "smoothmax float64"
    if ref is None:
        return {"ok": None, "note": "not checked at this size (the reference engine is too "
                "slow); the peers' checks cover smoothmax here"}
    return dict(compare(got, ref, dtype), against=against)


# ----------------------------------------------------------------------------- driver

def _env(threads, dtype):
    env = dict(os.environ)
    n = str(threads)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                "NUMBA_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS"):
        env[var] = n
    env["JAX_ENABLE_X64"] = "1" if dtype == "float64" else "0"
    env["JAX_PLATFORMS"] = "cpu"
    if threads == 1:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                            "intra_op_parallelism_threads=1").strip()
    env["PYTHONWARNINGS"] = "ignore"
    env["TQDM_DISABLE"] = "1"
    return env


def _exit_reason(code):
    reasons = {-9: "killed by SIGKILL (most likely the kernel OOM killer)",
               -6: "aborted (SIGABRT; glibc reported heap corruption)",
               -11: "crashed (SIGSEGV)"}
    return reasons.get(code, f"exited with {code}")


def add_ratios(entries):
    base = {(e["case"], e["dtype"], e["threads"]): e.get("seconds")
            for e in entries if e["impl"] == "smoothmax" and e.get("status") == "ok"}
    for e in entries:
        b = base.get((e["case"], e["dtype"], e["threads"]))
        ok = e.get("status", "").startswith(("ok", "slow")) and e.get("seconds")
        e["ratio"] = (e["seconds"] / b) if (ok and b) else None


def run_all(args):
    from tqdm import tqdm

    import _machine

    cases_by_struct = QUICK_CASES if args.quick else FULL_CASES
    structs = args.structs
    impls = args.impls
    jobs = []  # (threads, dtype, plan); plan = [(struct, impl, cases), ...]
    for threads in args.threads:
        for dtype in args.dtypes:
            plan = []
            for struct in structs:
                cases = [list(s) for s in cases_by_struct[struct]]
                for impl in IMPLS[struct]:
                    if impls and impl not in impls:
                        continue
                    if impl in FLOAT64_ONLY and dtype != "float64":
                        continue  # filled from the float64 run below
                    plan.append((struct, impl, cases))
            if args.isolate == "impl":
                jobs += [(threads, dtype, [p]) for p in plan]
            elif plan:
                jobs.append((threads, dtype, plan))
    machine = _machine.describe()
    total = sum(len(cases) for _, _, plan in jobs for _, _, cases in plan)
    entries = []
    bar = tqdm(total=total, desc="bench", unit="entry", dynamic_ncols=True)
    for threads, dtype, plan in jobs:
        names = ",".join(sorted({impl for _, impl, _ in plan}))
        bar.set_postfix_str(f"{names if len(plan) == 1 else 'all'} {dtype} t={threads}")
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--dtype", dtype,
               "--threads", str(threads), "--plan", json.dumps(plan),
               "--budget", str(args.budget)] + (["--no-check"] if args.no_check else [])
        got = set()
        with tempfile.TemporaryFile("w+") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True,
                                    env=_env(threads, dtype), cwd=ROOT)
            for line in proc.stdout:
                if not line.startswith("RESULT "):
                    continue
                e = json.loads(line[len("RESULT "):])
                entries.append(e)
                got.add((e["impl"], e["case"]))
                bar.update(1)
                if args.verbose:
                    tqdm.write(_short(e))
            proc.wait()
            err.seek(0)
            tail = err.read()[-1500:]
        for struct, impl, cases in plan:
            for shape in cases:
                if (impl, case_name(struct, shape)) in got:
                    continue
                entries.append({"case": case_name(struct, shape), "struct": struct,
                                "shape": shape, "impl": impl, "dtype": dtype,
                                "peer_dtype": dtype, "threads": threads,
                                "cells": cells(struct, shape),
                                "status": f"error: worker {_exit_reason(proc.returncode)}",
                                "stderr_tail": tail})
                bar.update(1)
    bar.close()
    # float64-only peers: their float32 rows repeat the float64 measurement
    for e in list(entries):
        if e["impl"] in FLOAT64_ONLY and "float32" in args.dtypes:
            entries.append(dict(e, dtype="float32", peer_dtype="float64",
                                note="computes in float64 only; float64 timing repeated"))
    add_ratios(entries)
    return {"benchmark": "cpu", "command": " ".join([os.path.basename(sys.executable)]
                                                     + sys.argv),
            "gamma": GAMMA, "quick": args.quick, "isolate": args.isolate,
            "definitions": {
                "seconds": "median wall time of one call (value + gradient) after a warm-up",
                "ns_per_cell": "seconds / cells * 1e9; cells = B*NA*NB (DTW), B*T*S*S (Viterbi)",
                "ratio": "seconds / seconds of smoothmax (negentropy) at the same case, dtype "
                         "and threads; > 1 means smoothmax is faster",
                "check": f"float64: value within {VALUE_RTOL:g} relative and gradient within "
                         f"{GRAD_ATOL:g} absolute of smoothmax float64; float32: within "
                         f"{VALUE_RTOL_F32:g} / {GRAD_ATOL_F32:g}",
            },
            "machine": machine,
            "loadavg_at_end": list(os.getloadavg()),
            "entries": entries}


def _short(e):
    ns = f"{e['ns_per_cell']:.1f} ns/cell" if e.get("ns_per_cell") else ""
    return f"{e['case']:<22} {e['impl']:<13} {e['dtype']} t={e['threads']} {ns} {e['status']}"


def _fmt_cell(e):
    if e is None:
        return "–"
    status = e.get("status", "")
    if status.startswith("skipped"):
        return "skipped (> 60 s)"
    if status.startswith(("unavailable", "error")):
        return "n/a¹"
    if status == "check failed":
        return f"{e['ns_per_cell']:.3g} ✗²"
    txt = f"{e['ns_per_cell']:.3g}"
    if e["impl"] != "smoothmax" and e.get("ratio"):
        txt += f" ({e['ratio']:.2g}×)"
    if e.get("peer_dtype") != e["dtype"]:
        txt += "³"
    if status.startswith("slow"):
        txt += "⁴"
    return txt


def headline(entries):
    """Per case: smoothmax against the fastest peer whose output passed the check."""
    lines = ["## Against the fastest peer", "",
             "| case | dtype | threads | smoothmax ns/cell | fastest peer | its ns/cell | speed-up |",
             "|---|---|---|---|---|---|---|"]
    keys = list(dict.fromkeys((e["case"], e["dtype"], e["threads"]) for e in entries))
    keys.sort(key=lambda k: (k[2], k[1] != "float64"))
    for case, dtype, threads in keys:
        es = [e for e in entries if (e["case"], e["dtype"], e["threads"]) == (case, dtype, threads)]
        sm_ = [e for e in es if e["impl"] == "smoothmax" and e.get("status") == "ok"]
        peers = [e for e in es if not e["impl"].startswith("smoothmax") and e.get("ratio")]
        if not sm_ or not peers:
            continue
        best = min(peers, key=lambda e: e["seconds"])
        lines.append(f"| {case} | {dtype} | {threads} | {sm_[0]['ns_per_cell']:.3g} | "
                     f"{best['impl']} | {best['ns_per_cell']:.3g} | {best['ratio']:.2f}× |")
    return lines + [""]


def to_markdown(res):
    entries = res["entries"]
    m = res["machine"]
    import _machine

    lines = [f"# CPU benchmark{' (quick smoke run)' if res['quick'] else ''}", "",
             f"Machine: {_machine.one_line(m)}; smoothmax engine: {m['smoothmax_engine']}; "
             f"load average at start {m['loadavg_at_start'][0]:.2f}, at end "
             f"{res['loadavg_at_end'][0]:.2f}.", "",
             f"Command: `{res['command']}`", "",
             "Each cell: ns per cell (median of repeats after a warm-up) and, in brackets, the "
             "ratio peer time / smoothmax time at the same case, dtype and threads "
             "(> 1: smoothmax is faster; for smoothmax-l2 the ratio is to smoothmax negentropy). "
             "A cell is a DP cell `B·NA·NB` for DTW and an edge `B·T·S·S` for Viterbi.", ""]
    titles = {"dtw": "DTW value + gradient (soft-DTW, γ = 1, on the cost matrix)",
              "viterbi": "Viterbi value + marginals (CRF log-partition, γ = 1)",
              "dtw-hvp": "DTW value + gradient + Hessian-vector product (negentropy, γ = 1); "
                         "peers by second-order autodiff",
              "viterbi-hvp": "Viterbi value + marginals + Hessian-vector product (negentropy, "
                             "γ = 1); peers by double backward"}
    for struct in STRUCTS:
        es = [e for e in entries if e["struct"] == struct]
        if not es:
            continue
        impls = [i for i in IMPLS[struct] if any(e["impl"] == i for e in es)]
        lines += [f"## {titles[struct]}", "",
                  "| case | dtype | threads | " + " | ".join(impls) + " |",
                  "|---|---|---|" + "---|" * len(impls)]
        keys = []
        for e in es:
            k = (e["case"], e["dtype"], e["threads"])
            if k not in keys:
                keys.append(k)
        order = list(dict.fromkeys(e["case"] for e in es))  # cases in the order they ran
        keys.sort(key=lambda k: (k[2], order.index(k[0]), k[1] != "float64"))
        for k in keys:
            row = []
            for impl in impls:
                match = [e for e in es if (e["case"], e["dtype"], e["threads"]) == k
                         and e["impl"] == impl]
                row.append(_fmt_cell(match[0] if match else None))
            lines.append(f"| {k[0].split(' ', 1)[1]} | {k[1]} | {k[2]} | " + " | ".join(row) + " |")
        lines.append("")
    lines += headline(entries)
    notes = sorted({f"{e['impl']} ({e['case']}, {e['dtype']}, {e['threads']} thr): {e['status']}"
                    for e in entries if e.get("status", "ok") not in ("ok",)
                    and not e["status"].startswith("skipped")})
    lines += ["¹ not available or failed (below). ² output disagrees with smoothmax float64 "
              "beyond the tolerance: time shown, ratio withheld. ³ computes in float64 only: "
              "the float64 timing is repeated. ⁴ one call only (> 60 s).", ""]
    fails = [e for e in entries if e.get("check") and e["check"].get("ok") is False]
    checks = [e for e in entries if e.get("check") and e["check"].get("ok") is not None]
    lines.append(f"Correctness checks passed: {len(checks) - len(fails)} of {len(checks)}.")
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    if fails:
        lines += ["", "Failed checks:", ""]
        for e in fails:
            c = e["check"]
            lines.append(f"- {e['impl']} {e['case']} {e['dtype']}: value rel err "
                         f"{c['value_rel_err']:.2e}, gradient max abs err "
                         f"{c['grad_max_abs_err']:.2e} (against {c['against']})")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run in seconds")
    p.add_argument("--out", default=None,
                   help="results JSON (default bench/results/cpu.json; with --quick a file in "
                        "the temp dir); the markdown table goes next to it as .md")
    p.add_argument("--threads", type=int, nargs="+", default=None,
                   help="thread counts to run (default: 1 and all usable CPUs)")
    p.add_argument("--dtypes", nargs="+", default=["float64", "float32"],
                   choices=["float64", "float32"])
    p.add_argument("--structs", nargs="+", default=STRUCTS, choices=STRUCTS)
    p.add_argument("--impls", nargs="+", default=None, help="only these implementations")
    p.add_argument("--budget", type=float, default=2.0,
                   help="seconds of repeats per entry (at least 3 repeats, at most 25)")
    p.add_argument("--no-check", action="store_true", help="skip the correctness cross-check")
    p.add_argument("--verbose", "-v", action="store_true", help="print each entry as it comes")
    # internal: one implementation in a fresh process
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--isolate", choices=["impl", "config"], default=None,
                   help="a fresh process per implementation (default) or per thread count and "
                        "dtype (default with --quick: fewer imports)")
    p.add_argument("--dtype", help=argparse.SUPPRESS)
    p.add_argument("--plan", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        args.threads = args.threads[0]
        return worker(args)
    if args.threads is None:
        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        args.threads = sorted({1, n})
    if args.quick:
        args.budget = min(args.budget, 0.2)
    if args.isolate is None:
        args.isolate = "config" if args.quick else "impl"
    if args.out:
        out = args.out
    elif args.quick:  # a smoke run does not overwrite (or dirty) the committed results
        out = os.path.join(tempfile.gettempdir(), "smoothmax-bench-cpu-quick.json")
    else:
        out = os.path.join(HERE, "results", "cpu.json")
    res = run_all(args)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    md = to_markdown(res)
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write(md)
    print(md)
    print(f"wrote {out} and {os.path.splitext(out)[0]}.md")


if __name__ == "__main__":
    main()
