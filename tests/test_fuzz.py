"""Fuzz suite (issue 16): every public function, random inputs, independent oracles.

Two halves:

* **Oracle fuzzing** (hypothesis, in this process): random shapes, batch
  dimensions, lengths, bands (huge ones included), γ in [1e-4, 1e4],
  magnitudes up to 1e6, ±inf masks, float32/float64, all three operators.
  Every batch item is compared with the scalar-loop DP and brute-force path
  enumeration of ``_oracles`` / ``test_dag`` (value, E, HVP, decoding), the
  losses with their definitions evaluated on the oracle's E, the samplers
  with the oracle's path probabilities, torch and JAX with NumPy. Where the
  dtype cannot resolve the answer (E of a problem whose rounding error
  ``eps·|θ|·steps`` is not small against γ; the hard path of a near tie) the
  comparison is skipped and only "no NaN, E in [0, 1]" is asserted.
* **Bad inputs** (``_fuzz_bad.py``), each function's cases in a child
  process, so that a crash or a hang fails that function's test and names
  its case, and the remaining cases still run.

Profiles: the default runs a few dozen cases per function (CI, under two
minutes on two cores); ``pytest --fuzz-long`` runs at least 1000 cases per
function, with a fresh seed (printed on failure; ``SMOOTHMAX_FUZZ_SEED``
replays it).
"""
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis not installed (test extra)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import smoothmax as sm  # noqa: E402
from smoothmax import losses  # noqa: E402

import _oracles as O  # noqa: E402
from _fuzz_bad import FUNCTIONS  # noqa: E402
from test_dag import dag_brute  # noqa: E402

LONG_CASES = 1000
TESTS = Path(__file__).resolve().parent
REGS = ("negentropy", "l2", "hard")


def run_hypothesis(fuzz_long, ci_cases, test, **strategies):
    """Run ``test`` over ``strategies`` for the profile's number of cases (checked)."""
    n = LONG_CASES if fuzz_long else ci_cases
    config = settings(max_examples=n, deadline=None, database=None, derandomize=not fuzz_long,
                      suppress_health_check=list(HealthCheck))
    calls = []

    def counted(**kw):
        calls.append(1)
        with np.errstate(invalid="ignore", over="ignore"):  # inf - inf in the oracles' comparisons
            test(**kw)

    config(given(**strategies)(counted))()
    assert len(calls) >= n, f"hypothesis ran {len(calls)} cases, fewer than the profile's {n}"


# ---------------------------------------------------------------------------
# common draws


gammas = st.floats(-4, 4).map(lambda e: float(10.0 ** e))
magnitudes = st.floats(-3, 6).map(lambda e: float(10.0 ** e))
dtypes = st.sampled_from([np.float32, np.float64])
regs = st.sampled_from(REGS)
batches = st.sampled_from([(), (2,), (1, 2)])
seeds = st.integers(0, 2**32 - 1)
bands = st.sampled_from([None, 0, 1, 2, 3, sys.maxsize, np.uint64(2**63 - 1)])


class Tol:
    """Rounding budget of one item: ``eps·|θ|·steps`` against γ."""

    def __init__(self, dtype, theta, steps, gamma, width):
        finite = np.abs(theta[np.isfinite(theta)])
        self.eps = float(np.finfo(dtype).eps)
        self.scale = (float(finite.max()) if finite.size else 0.0) * steps + gamma * steps * math.log(width + 1)
        self.value = 64 * self.eps * self.scale + 1e-300
        self.cond = self.eps * self.scale / gamma  # relative error of E

    def resolves(self, reg, scores=None, best=None):
        """True when the dtype resolves E: a well-conditioned smoothed problem,
        or a hard problem whose best path beats the others by more than rounding."""
        if reg != "hard":
            return self.cond < 1e-4
        others = np.sort(np.abs(np.asarray(scores, dtype=np.float64) - best))
        return len(others) < 2 or others[1] > 1e3 * self.eps * self.scale

    def E(self):
        return 1e3 * self.cond + 64 * self.eps


def _check_unit(E, dtype):
    assert not np.isnan(E).any()
    assert E.min(initial=0) >= 0 and E.max(initial=0) <= 1 + 8 * np.finfo(dtype).eps


def _finite_theta(rng, shape, mag, dtype, mask_p, mask_value, positive=False):
    theta = rng.standard_normal(shape) * mag
    if positive:
        theta = np.abs(theta)
    theta[rng.random(shape) < mask_p] = mask_value
    return theta.astype(dtype)


def _compare_item(got, brute, tol, reg, dtype, Zb=None):
    """value, E (and HVP with ``Zb``) of one item against the oracle's."""
    v, E, Edot = got
    if not np.isfinite(brute["value"]):
        assert v == brute["value"] and np.all(E == 0)
        return
    assert abs(float(v) - brute["value"]) <= tol.value, (v, brute["value"], tol.value)
    _check_unit(E, dtype)
    if tol.resolves(reg, brute["scores"], brute["best"]):
        np.testing.assert_allclose(E, brute["E"], atol=tol.E(), rtol=0)
    if Edot is not None and reg != "hard" and dtype == np.float64 and tol.cond < 1e-8:
        ref = brute["Edot"]
        np.testing.assert_allclose(Edot, ref, rtol=0, atol=1e4 * tol.cond * (1 + np.abs(ref).max()) + 1e-12)
    if Edot is not None:
        assert not np.isnan(Edot).any()
        if reg == "hard":
            assert np.all(Edot == 0)


# ---------------------------------------------------------------------------
# DTW: dtw, dtw_grad, dtw_hvp, dtw_path


def _oracle_band(band, NA, NB):
    """The radius for the oracle's mask formula, whose int64 arithmetic would
    overflow for huge radii: any radius >= NA + NB gives the same (full) mask."""
    return None if band is None else min(int(band), NA + NB)


@st.composite
def dtw_cases(draw):
    rng = np.random.default_rng(draw(seeds))
    bs, NA, NB = draw(batches), draw(st.integers(1, 4)), draw(st.integers(1, 4))
    dtype = draw(dtypes)
    theta = _finite_theta(rng, bs + (NA, NB), draw(magnitudes), dtype, draw(st.sampled_from([0, 0, 0.2])),
                          np.inf, positive=draw(st.booleans()))
    lengths = None
    if draw(st.booleans()):
        lengths = (rng.integers(1, NA + 1, size=bs), rng.integers(1, NB + 1, size=bs))
    return theta, lengths, draw(bands), rng.standard_normal(theta.shape).astype(dtype)


def test_fuzz_dtw(fuzz_long):
    def check(case, reg, gamma):
        theta, lengths, band, Z = case
        kw = dict(reg=reg, gamma=gamma, lengths=lengths, band=band)
        v, E = sm.dtw_grad(theta, **kw)
        np.testing.assert_array_equal(sm.dtw(theta, **kw), v)
        Edot = sm.dtw_hvp(theta, Z, **kw)
        cost, Y = sm.dtw_path(theta, lengths=lengths, band=band)
        NA, NB = theta.shape[-2:]
        flat = [a.reshape((-1,) + a.shape[theta.ndim - 2:]) for a in (theta, E, Edot, Y, Z)]
        la = np.broadcast_to(NA if lengths is None else lengths[0], theta.shape[:-2]).reshape(-1)
        lb = np.broadcast_to(NB if lengths is None else lengths[1], theta.shape[:-2]).reshape(-1)
        for b, (th, Eb, Edb, Yb, Zb) in enumerate(zip(*flat)):
            brute = O.dtw_brute(th, reg, gamma, la[b], lb[b], _oracle_band(band, NA, NB), Z=Zb)
            tol = Tol(theta.dtype, th, la[b] + lb[b], gamma, 3)
            _compare_item((v.reshape(-1)[b], Eb, Edb), brute, tol, reg, theta.dtype)
            hard = dict(brute, value=brute["best"])
            if np.isfinite(brute["best"]) and Tol(theta.dtype, th, la[b] + lb[b], 1.0, 1).resolves(
                    "hard", brute["scores"], brute["best"]):
                np.testing.assert_array_equal(Yb, brute["Ybest"])
            assert abs(cost.reshape(-1)[b] - hard["value"]) <= tol.value or cost.reshape(-1)[b] == hard["value"]

    run_hypothesis(fuzz_long, 30, check, case=dtw_cases(), reg=regs, gamma=gammas)


# ---------------------------------------------------------------------------
# Viterbi: viterbi, viterbi_grad, viterbi_hvp, viterbi_decode


@st.composite
def viterbi_cases(draw):
    rng = np.random.default_rng(draw(seeds))
    bs, T, S = draw(batches), draw(st.integers(1, 4)), draw(st.integers(1, 3))
    dtype = draw(dtypes)
    theta = _finite_theta(rng, bs + (T, S, S), draw(magnitudes), dtype, draw(st.sampled_from([0, 0, 0.3])),
                          -np.inf)
    lengths = rng.integers(1, T + 1, size=bs) if draw(st.booleans()) else None
    return theta, lengths, rng.standard_normal(theta.shape).astype(dtype)


def test_fuzz_viterbi(fuzz_long):
    def check(case, reg, gamma):
        theta, lengths, Z = case
        kw = dict(reg=reg, gamma=gamma, lengths=lengths)
        v, E = sm.viterbi_grad(theta, **kw)
        np.testing.assert_array_equal(sm.viterbi(theta, **kw), v)
        Edot = sm.viterbi_hvp(theta, Z, **kw)
        score, tags = sm.viterbi_decode(theta, lengths=lengths)
        T, S = theta.shape[-3:-1]
        L = np.broadcast_to(T if lengths is None else lengths, theta.shape[:-3]).reshape(-1)
        flat = [a.reshape((-1,) + a.shape[theta.ndim - 3:]) for a in (theta, E, Edot, Z)]
        for b, (th, Eb, Edb, Zb) in enumerate(zip(*flat)):
            brute = O.viterbi_brute(th, reg, gamma, L[b], Z=Zb)
            tol = Tol(theta.dtype, th, L[b] + 1, gamma, S)
            _compare_item((v.reshape(-1)[b], Eb, Edb), brute, tol, reg, theta.dtype)
            best = score.reshape(-1)[b]
            assert best == brute["best"] or abs(best - brute["best"]) <= tol.value
            if np.isfinite(brute["best"]) and Tol(theta.dtype, th, L[b] + 1, 1.0, 1).resolves(
                    "hard", brute["scores"], brute["best"]):
                np.testing.assert_array_equal(tags.reshape(-1, T)[b], brute["tags"])

    run_hypothesis(fuzz_long, 30, check, case=viterbi_cases(), reg=regs, gamma=gammas)


# ---------------------------------------------------------------------------
# DAG: DAG.from_edges, dag, dag_grad, dag_hvp, dag_path, dag_support


@st.composite
def dag_cases(draw):
    rng = np.random.default_rng(draw(seeds))
    N = draw(st.integers(2, 6))
    edges = [(int(p), i) for i in range(1, N) for p in rng.integers(0, i, size=int(rng.integers(0, 4)))]
    rng.shuffle(edges)
    graph, _ = sm.DAG.from_edges(edges, N)
    dtype = draw(dtypes)
    w = _finite_theta(rng, draw(batches) + (graph.n_edges,), draw(magnitudes), dtype,
                      draw(st.sampled_from([0, 0, 0.3])), -np.inf)
    return graph, w, rng.standard_normal(w.shape).astype(dtype)


def test_fuzz_dag(fuzz_long):
    def check(case, reg, gamma):
        graph, w, Z = case
        kw = dict(reg=reg, gamma=gamma)
        v, E = sm.dag_grad(w, graph, **kw)
        np.testing.assert_array_equal(sm.dag(w, graph, **kw), v)
        Edot = sm.dag_hvp(w, Z, graph, **kw)
        best, Y = sm.dag_path(w, graph)
        B = math.prod(w.shape[:-1])
        flat = [a.reshape(B, graph.n_edges) for a in (w, E, Edot, Y, Z)]
        for b, (wb, Eb, Edb, Yb, Zb) in enumerate(zip(*flat)):
            brute = dag_brute(wb, graph.indptr, graph.parents, reg, gamma, Zb)
            tol = Tol(w.dtype, wb, graph.n_nodes, gamma, max(np.diff(graph.indptr).max(), 1))
            _compare_item((v.reshape(-1)[b], Eb, Edb), brute, tol, reg, w.dtype)
            assert best.reshape(-1)[b] == brute["best"] or abs(best.reshape(-1)[b] - brute["best"]) <= tol.value
            if np.isfinite(brute["best"]):
                assert Yb @ np.where(Yb > 0, wb, 0) == pytest.approx(best.reshape(-1)[b], abs=tol.value)
        if w.ndim == 1 and reg == "l2" and np.isfinite(v) and w.dtype == np.float64:
            paths, probs = sm.dag_support(w, graph, gamma=gamma)
            np.testing.assert_allclose(probs.sum(), 1, atol=1e-9)
            np.testing.assert_allclose(probs @ paths, E, atol=1e-9)

    run_hypothesis(fuzz_long, 30, check, case=dag_cases(), reg=regs, gamma=gammas)


# ---------------------------------------------------------------------------
# smooth_max / smooth_argmax against the per-vector oracle


@st.composite
def vector_cases(draw):
    rng = np.random.default_rng(draw(seeds))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)))
    x = _finite_theta(rng, shape, draw(magnitudes), draw(dtypes), draw(st.sampled_from([0, 0.5, 1.0])), -np.inf)
    return x, draw(st.integers(-len(shape), len(shape) - 1))


def test_fuzz_smooth(fuzz_long):
    def check(case, reg, gamma):
        x, axis = case
        v = sm.smooth_max(x, reg=reg, gamma=gamma, axis=np.int64(axis))
        q = sm.smooth_argmax(x, reg=reg, gamma=gamma, axis=axis)
        xm, vm, qm = np.moveaxis(x, axis, -1), v.reshape(-1), np.moveaxis(q, axis, -1).reshape(-1, x.shape[axis])
        for k, row in enumerate(xm.reshape(-1, x.shape[axis])):
            ref_v, ref_q = O.op_value_grad(row, reg, gamma)
            tol = Tol(x.dtype, row, 1, gamma, row.size)
            assert vm[k] == ref_v or abs(vm[k] - ref_v) <= tol.value
            _check_unit(qm[k], x.dtype)
            if np.isfinite(ref_v) and tol.resolves(reg, row[np.isfinite(row)], row.max()):
                np.testing.assert_allclose(qm[k], ref_q, atol=tol.E())

    run_hypothesis(fuzz_long, 40, check, case=vector_cases(), reg=regs, gamma=gammas)


# ---------------------------------------------------------------------------
# losses: definitions evaluated on the oracle's value and E


def test_fuzz_viterbi_losses(fuzz_long):
    def check(case, reg, gamma, divergence, seed):
        theta, lengths, _ = case
        rng = np.random.default_rng(seed)
        T, S = theta.shape[-3:-1]
        tags = rng.integers(0, S, size=theta.shape[:-2])
        L = np.broadcast_to(T if lengths is None else lengths, theta.shape[:-3]).reshape(-1)
        Y = losses.tags_to_path(theta, tags, lengths=lengths)
        sur, gs = losses.viterbi_surrogate(theta, tags, reg=reg, gamma=gamma, lengths=lengths, return_grad=True)
        rel, gr = losses.viterbi_relaxed(theta, tags, reg=reg, gamma=gamma, lengths=lengths,
                                         divergence=divergence, return_grad=True)
        for g, loss in ((gs, sur), (gr, rel)):
            assert np.all(np.isfinite(g)) and not np.isnan(loss).any()
            assert np.all(g.reshape(loss.size, -1)[~np.isfinite(loss.reshape(-1))] == 0)
        flat = [a.reshape((-1,) + a.shape[theta.ndim - 3:]) for a in (theta, Y)]
        for b, (th, Yb) in enumerate(zip(*flat)):
            brute = O.viterbi_brute(th, reg, gamma, L[b])
            tol = Tol(theta.dtype, th, L[b] + 1, gamma, S)
            score = float(np.sum(np.where(Yb > 0, th, 0), dtype=np.float64))
            ref = brute["value"] - score if np.isfinite(score) else math.inf
            got = float(sur.reshape(-1)[b])
            assert got == ref or abs(got - ref) <= 2 * tol.value
            if np.isfinite(brute["value"]) and tol.resolves(reg, brute["scores"], brute["best"]):
                M, P = brute["E"].sum(-1)[:L[b]], Yb.sum(-1)[:L[b]]
                dM = S * tol.E()  # a marginal sums S entries of E
                if divergence == "l2":
                    ref = float(((M - P) ** 2).sum())
                    assert abs(rel.reshape(-1)[b] - ref) <= 4 * L[b] * dM
                elif np.all(M[P > 0] > 1e3 * dM):
                    ref = -float(np.log(M[P > 0]).sum())
                    assert abs(rel.reshape(-1)[b] - ref) <= 4 * L[b] * dM / M[P > 0].min()

    run_hypothesis(fuzz_long, 25, check, case=viterbi_cases(), reg=regs, gamma=gammas,
                   divergence=st.sampled_from(["l2", "kl"]), seed=seeds)


def test_fuzz_dtw_losses(fuzz_long):
    def check(case, reg, gamma):
        theta, lengths, band, _ = case
        NA, NB = theta.shape[-2:]
        Y = sm.dtw_path(np.abs(np.flip(theta, -1)).astype(theta.dtype), lengths=lengths)[1]  # some alignment
        sur, gs = losses.dtw_surrogate(theta, Y, reg=reg, gamma=gamma, lengths=lengths, band=band, cost=None,
                                       return_grad=True)
        rel, gr = losses.dtw_relaxed(theta, Y, reg=reg, gamma=gamma, lengths=lengths, band=band,
                                     return_grad=True)
        assert np.all(np.isfinite(gr)) and np.all(np.isfinite(rel)) and np.all(rel >= 0)
        assert np.all(np.isfinite(gs)) and not np.isnan(sur).any()
        la = np.broadcast_to(NA if lengths is None else lengths[0], theta.shape[:-2]).reshape(-1)
        lb = np.broadcast_to(NB if lengths is None else lengths[1], theta.shape[:-2]).reshape(-1)
        flat = [a.reshape((-1, NA, NB)) for a in (theta, Y)]
        for b, (th, Yb) in enumerate(zip(*flat)):
            brute = O.dtw_brute(th, reg, gamma, la[b], lb[b], _oracle_band(band, NA, NB))
            tol = Tol(theta.dtype, th, la[b] + lb[b], gamma, 3)
            score = float(np.sum(np.where(Yb > 0, th, 0), dtype=np.float64))
            ref = score - brute["value"] if np.isfinite(score) else math.inf
            got = float(sur.reshape(-1)[b])
            assert got == ref or abs(got - ref) <= 2 * tol.value

    run_hypothesis(fuzz_long, 25, check, case=dtw_cases(), reg=regs, gamma=gammas)


# ---------------------------------------------------------------------------
# samplers: every sample is a path of positive probability under the oracle


def test_fuzz_samplers(fuzz_long):
    def check(vcase, dcase, reg, gamma):
        theta, lengths, _ = vcase
        T, S = theta.shape[-3:-1]
        tags = sm.viterbi_sample(theta, 4, reg=reg, gamma=gamma, lengths=lengths, seed=1)
        L = np.broadcast_to(T if lengths is None else lengths, theta.shape[:-3]).reshape(-1)
        for b, th in enumerate(theta.reshape(-1, T, S, S)):
            brute = O.viterbi_brute(th, reg, gamma, L[b])
            for y in tags.reshape(4, -1, T)[:, b]:
                if not np.isfinite(brute["value"]):
                    assert np.all(y == -1)
                    continue
                assert np.all(y[L[b]:] == -1) and np.all((0 <= y[:L[b]]) & (y[:L[b]] < S))
                # some virtual start state gives the sequence a positive probability
                seq_E = [brute["E"][t, y[t], y[t - 1]] if t else brute["E"][0, y[0]].sum() for t in range(L[b])]
                assert min(seq_E) > 0
        graph, w, _ = dcase
        Y = sm.dag_sample(w, graph, 3, reg=reg, gamma=gamma, seed=2)
        B = math.prod(w.shape[:-1])
        for b, wb in enumerate(w.reshape(B, graph.n_edges)):
            brute = dag_brute(wb, graph.indptr, graph.parents, reg, gamma)
            for y in Y.reshape(3, B, graph.n_edges)[:, b]:
                if not np.isfinite(brute["value"]) or not np.any(brute["E"] > 0):
                    assert np.all(y == 0)
                else:
                    assert np.all(brute["E"][y > 0] > 0)
                    assert any(np.array_equal(y, Yp) for Yp in brute["Ys"])

    run_hypothesis(fuzz_long, 20, check, vcase=viterbi_cases(), dcase=dag_cases(), reg=regs, gamma=gammas)


def test_fuzz_dtw_sampler_and_attention(fuzz_long):
    def check(case, reg, gamma):
        theta, lengths, band, _ = case
        Y = sm.dtw_sample(theta, 3, reg=reg, gamma=gamma, lengths=lengths, band=band, seed=3)
        NA, NB = theta.shape[-2:]
        _, E = sm.dtw_grad(theta, reg=reg, gamma=gamma, lengths=lengths, band=band)
        assert set(np.unique(Y)) <= {0, 1}
        Ef = E.reshape(-1, NA, NB)
        for y in Y.reshape(3, -1, NA, NB):
            for b in range(len(Ef)):
                if Ef[b].max() > 0:
                    assert y[b, 0, 0] == 1 and np.all(Ef[b][y[b] > 0] > 0)
        scores = theta.reshape(-1, NB)
        w = sm.attention.structured_attention(np.where(np.isinf(scores), -np.inf, scores), np.zeros((2, 2)),
                                              reg=reg, gamma=gamma)
        assert not np.isnan(w).any() and np.all(w >= 0)
        s = w.sum(-1)
        assert np.all((np.abs(s - 1) < 1e-4) | (s == 0))

    run_hypothesis(fuzz_long, 20, check, case=dtw_cases(), reg=regs, gamma=gammas)


# ---------------------------------------------------------------------------
# frameworks: torch and JAX give NumPy's answers, gradients included


def test_fuzz_frameworks(fuzz_long):
    torch = pytest.importorskip("torch")
    jax = pytest.importorskip("jax")
    jnp = jax.numpy

    def check(vcase, dcase, reg, gamma):
        theta, lengths, Z = vcase
        if theta.dtype == np.float64 and not jax.config.jax_enable_x64:
            return
        ref_v, ref_E = sm.viterbi_grad(theta, reg=reg, gamma=gamma, lengths=lengths)
        ref_H = sm.viterbi_hvp(theta, Z, reg=reg, gamma=gamma, lengths=lengths)
        t = torch.tensor(theta, requires_grad=True)
        v = sm.viterbi(t, reg=reg, gamma=gamma, lengths=lengths)
        (g,) = torch.autograd.grad(v.sum(), t, create_graph=True)
        np.testing.assert_array_equal(v.detach().numpy(), ref_v)
        np.testing.assert_array_equal(g.detach().numpy(), ref_E)
        if reg != "hard" and np.all(np.isfinite(ref_v)):
            (h,) = torch.autograd.grad((g * torch.tensor(Z)).sum(), t)
            assert np.array_equal(h.numpy(), ref_H) or np.allclose(h.numpy(), ref_H, rtol=1e-5, atol=1e-6)
        # on the host: the exact comparison is of one engine behind two frameworks
        # (JAX's default device on a GPU machine is the GPU, with its own rounding)
        tj = jax.device_put(theta, jax.devices("cpu")[0])
        gj = jax.grad(lambda x: sm.viterbi(x, reg=reg, gamma=gamma, lengths=lengths).sum())(tj)
        # XLA on the CPU flushes subnormals to zero in the cotangent product
        np.testing.assert_allclose(np.asarray(gj), ref_E, rtol=0, atol=float(np.finfo(theta.dtype).tiny))
        theta_d, lengths_d, band, _ = dcase
        ref = sm.dtw_grad(theta_d, reg=reg, gamma=gamma, lengths=lengths_d, band=band)
        t = torch.tensor(theta_d, requires_grad=True)
        v = sm.dtw(t, reg=reg, gamma=gamma, lengths=lengths_d, band=band)
        v.sum().backward()
        np.testing.assert_array_equal(v.detach().numpy(), ref[0])
        np.testing.assert_array_equal(t.grad.numpy(), ref[1])

    run_hypothesis(fuzz_long, 15, check, vcase=viterbi_cases(), dcase=dtw_cases(), reg=regs, gamma=gammas)


# ---------------------------------------------------------------------------
# bad inputs, each function's cases in a child process


def _seed(fuzz_long):
    env = os.environ.get("SMOOTHMAX_FUZZ_SEED")
    if env is not None:
        return int(env)
    return int(time.time()) % 2**31 if fuzz_long else 0


def run_bad_cases(name, seed, n, timeout=600):
    """Run cases ``0..n-1`` of ``name`` in child processes; return the failures.

    A child that crashes or hangs is reported with the case it had started,
    and a new child carries on with the next case.
    """
    root = Path(sm.__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), str(TESTS), os.environ.get("PYTHONPATH", "")]))
    failures, start = [], 0
    while start < n:
        cmd = [sys.executable, str(TESTS / "_fuzz_bad.py"), name, str(seed), str(start), str(n)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
            out, err, rc = proc.stdout, proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            err, rc = f"timed out after {timeout} s", "hang"
        started, done = None, start
        for line in out.splitlines():
            rec = json.loads(line)
            if "start" in rec:
                started = rec
            else:
                done = rec["i"] + 1
                if not rec["ok"]:
                    failures.append(f"case {rec['i']}: {rec['why']}\n      {rec['case']}")
        if rc == 0:
            break
        if started is not None and started["start"] >= done:
            failures.append(f"case {started['start']}: the child died ({rc}): {started['case']}\n"
                            f"      {err.strip()[-1500:]}")
            start = started["start"] + 1
        else:
            failures.append(f"the child failed outside a case ({rc}): {err.strip()[-1500:]}")
            break
    return failures


@pytest.mark.parametrize("name", FUNCTIONS)
def test_fuzz_bad_inputs(name, fuzz_long):
    seed = _seed(fuzz_long)
    failures = run_bad_cases(name, seed, LONG_CASES if fuzz_long else 40)
    assert not failures, (f"{len(failures)} bad-input failures for {name} (SMOOTHMAX_FUZZ_SEED={seed}):\n  "
                          + "\n  ".join(failures[:20]))


def test_fuzz_driver_reports_a_crash_and_carries_on(tmp_path, monkeypatch):
    """The driver itself: a case that kills its child fails with that case named,
    and the cases after it still run."""
    script = tmp_path / "_fuzz_bad.py"
    script.write_text(
        "import json, os, sys\n"
        "name, seed, start, stop = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])\n"
        "for i in range(start, stop):\n"
        "    print(json.dumps({'start': i, 'case': f'case-{i}'}), flush=True)\n"
        "    if i == 2:\n"
        "        os.abort()\n"
        "    print(json.dumps({'i': i, 'ok': i != 4, 'why': 'wrong', 'case': f'case-{i}'}), flush=True)\n")
    monkeypatch.setattr(sys.modules[__name__], "TESTS", tmp_path)
    failures = run_bad_cases("x", 0, 6)
    assert len(failures) == 2
    assert failures[0].startswith("case 2: the child died") and "case-2" in failures[0]
    assert failures[1].startswith("case 4: wrong")
