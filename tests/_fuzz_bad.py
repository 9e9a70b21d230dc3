"""Bad and edge inputs for every public function, run in a child process (issue 16).

A case is a valid call of one public function with one argument replaced by a
value drawn from that argument's pool. A *bad* value must raise ``ValueError``
or ``TypeError`` whose message names the argument; an *edge* value (a band
beyond the lengths, an array-like, a non-contiguous view, a huge finite
magnitude...) must be accepted and give results without NaN. Either way the
caller's arrays must be left as they were.

``python tests/_fuzz_bad.py FUNCTION SEED START STOP`` runs cases
``START..STOP-1`` and prints one JSON line per case: ``{"start": i, "case":
...}`` before the call (flushed, so that a crash names its case), then
``{"i": i, "ok": bool, "why": ...}``. ``tests/test_fuzz.py`` drives it and
restarts after a crash.
"""
import json
import sys

import numpy as np

BAD, EDGE = "bad", "edge"


def _nan_at(a, rng):
    a = np.array(a, copy=True)
    a.reshape(-1)[rng.integers(a.size)] = np.nan
    return a


def _inf_at(a, rng, sign):
    a = np.array(a, copy=True)
    a.reshape(-1)[rng.integers(a.size)] = sign * np.inf
    return a


def array_pool(name, a, rng, forbidden_inf, mask_inf):
    """Replacements for the float array argument ``name`` whose valid value is ``a``."""
    return [
        (BAD, lambda: np.arange(a.size).reshape(a.shape)),            # integer array
        (BAD, lambda: np.zeros(a.shape, dtype=bool)),
        (BAD, lambda: a.astype(np.complex128)),
        (BAD, lambda: a.astype(np.float16)),
        (BAD, lambda: np.array([object()] * a.size, dtype=object).reshape(a.shape)),
        (BAD, lambda: "theta"),
        (BAD, lambda: None),
        (BAD, lambda: [[1.0, 2.0], [3.0]]),                           # ragged
        (BAD, lambda: _nan_at(a, rng)),
        (BAD, lambda: _inf_at(a, rng, forbidden_inf)),
        (BAD, lambda: a.reshape(-1)[:0]),                              # empty, wrong rank
        (BAD, lambda: np.ma.array(a, mask=np.zeros(a.shape, bool))),   # masked array
        (EDGE, lambda: a.astype(a.dtype.newbyteorder(">"))),           # big-endian
        (EDGE, lambda: a.T.copy().T),                                  # Fortran order
        (EDGE, lambda: np.flip(a, axis=-1)),                           # negative strides
        (EDGE, lambda: a.tolist()),                                    # array-like
        (EDGE, lambda: (a * 0 + 1e300 * rng.random(a.shape)).astype(a.dtype) if a.dtype == np.float64
         else (3e38 * rng.random(a.shape)).astype(a.dtype)),            # huge finite magnitudes
        (EDGE, lambda: (a * 1e-310).astype(a.dtype)),                  # subnormal / zero
        (EDGE, lambda: np.full(a.shape, mask_inf, a.dtype)),           # everything masked
    ]


GAMMA_POOL = [(BAD, 0.0), (BAD, -1.0), (BAD, float("nan")), (BAD, float("inf")), (BAD, "1"), (BAD, None),
              (BAD, [1.0]), (BAD, 1 + 1j), (BAD, True), (BAD, np.array([1.0])), (BAD, 1e-310),
              (EDGE, np.float32(0.5)), (EDGE, np.array(2.0)), (EDGE, 3), (EDGE, 1e300), (EDGE, 1.7e308),
              (EDGE, 1e-4), (EDGE, 1e4)]
REG_POOL = [(BAD, "foo"), (BAD, None), (BAD, 1), (BAD, "NEGENTROPY"), (BAD, ["l2"])]
BAND_POOL = [(BAD, -1), (BAD, 1.5), (BAD, "2"), (BAD, True), (BAD, np.float64(2.0)), (BAD, [1]),
             (BAD, -(2**70)), (BAD, 2**63), (BAD, 2**70), (BAD, np.uint64(2**64 - 1)),
             (BAD, np.array(2**63, dtype=np.uint64)), (EDGE, 0), (EDGE, 1), (EDGE, sys.maxsize),
             (EDGE, np.uint64(2**63 - 1)), (EDGE, np.int8(3)), (EDGE, np.array(2**63 - 1, dtype=np.uint64))]
N_POOL = [(BAD, -1), (BAD, 1.5), (BAD, "3"), (BAD, None), (BAD, True), (EDGE, 0), (EDGE, np.int64(3))]
SEED_POOL = [(BAD, "s"), (BAD, -1), (BAD, 1.5), (EDGE, None), (EDGE, 7), (EDGE, np.random.default_rng(1))]
AXIS_POOL = [(BAD, 5), (BAD, -5), (BAD, 1.5), (BAD, "0"), (BAD, None), (BAD, True), (EDGE, np.int64(0)),
             (EDGE, np.uint8(0)), (EDGE, -1)]


def length_pool(T, B):
    return [(BAD, 0), (BAD, -1), (BAD, T + 1), (BAD, 2**70), (BAD, np.uint64(2**64 - 1)), (BAD, 1.5),
            (BAD, float("nan")), (BAD, "a"), (BAD, np.ones(B + 1, dtype=np.int64)), (BAD, [True] * B),
            (EDGE, T), (EDGE, np.int8(1)), (EDGE, [T] * B), (EDGE, np.full(B, float(T)))]


def dtw_length_pool(NA, NB, B):
    return [(BAD, (0, NB)), (BAD, (NA, NB + 1)), (BAD, (NA, NB, 1)), (BAD, np.ones((B, 3), np.int64)),
            (BAD, (1.5, NB)), (BAD, (NA, -(2**70))), (BAD, "ab"),
            (EDGE, (NA, NB)), (EDGE, np.tile([NA, NB], (B, 1))), (EDGE, (1, 1)), (EDGE, (np.int64(NA), NB))]


def z_pool(a, rng):
    return [(BAD, np.ones(a.shape[:-1] + (a.shape[-1] + 1,))), (BAD, _nan_at(np.ones(a.shape), rng)),
            (BAD, _inf_at(np.ones(a.shape), rng, 1)), (BAD, np.ones(a.shape, dtype=np.int64)), (BAD, "Z"),
            (EDGE, np.ones(a.shape, dtype=np.float32)), (EDGE, np.full(a.shape, 1e30)),
            (EDGE if a.dtype == np.float64 else BAD, np.full(a.shape, 1e300))]  # overflows float32


# ---------------------------------------------------------------------------
# the functions: a valid call and the pools of its arguments


def _problem(rng):
    import smoothmax as sm

    dtype = rng.choice([np.float32, np.float64])
    B = int(rng.integers(1, 3))
    NA, NB = int(rng.integers(1, 5)), int(rng.integers(1, 5))
    T, S = int(rng.integers(1, 5)), int(rng.integers(1, 4))
    graph, _ = sm.DAG.for_dtw(int(rng.integers(1, 4)), int(rng.integers(1, 4)))
    return dict(
        dtype=dtype, B=B, NA=NA, NB=NB, T=T, S=S, graph=graph,
        cost=np.abs(rng.standard_normal((B, NA, NB))).astype(dtype),
        scores=rng.standard_normal((B, T, S, S)).astype(dtype),
        weights=rng.standard_normal((B, graph.n_edges)).astype(dtype),
        reg=str(rng.choice(["negentropy", "l2", "hard"])),
    )


def _dp_spec(name, hard, theta, p, rng, pools):
    """A dtw*/viterbi* operator on ``theta``: reg and gamma unless it is the hard decoder
    ``hard``, a direction ``Z`` for the HVP."""
    import smoothmax as sm

    f = getattr(sm, name)
    args = dict(theta=theta)
    if name != hard:
        args.update(reg=p["reg"], gamma=0.7)
        pools.update(reg=REG_POOL, gamma=GAMMA_POOL)
    if name.endswith("_hvp"):
        args["Z"] = np.ones_like(theta)
        pools["Z"] = z_pool(theta, rng)
        return (lambda theta, Z, **kw: f(theta, Z, **kw)), args, pools
    return f, args, pools


def spec(name, rng):
    """``(call, args, pools)`` for public function ``name``: ``call(**args)``, pools by argument."""
    import smoothmax as sm
    from smoothmax import attention, losses

    p = _problem(rng)
    B, NA, NB, T, S = p["B"], p["NA"], p["NB"], p["T"], p["S"]
    common = dict(reg=REG_POOL, gamma=GAMMA_POOL)
    if name in ("dtw", "dtw_grad", "dtw_hvp", "dtw_path"):
        return _dp_spec(name, "dtw_path", p["cost"], p, rng, dict(
            theta=array_pool("theta", p["cost"], rng, -1, np.inf), lengths=dtw_length_pool(NA, NB, B),
            band=BAND_POOL))
    if name in ("viterbi", "viterbi_grad", "viterbi_hvp", "viterbi_decode"):
        return _dp_spec(name, "viterbi_decode", p["scores"], p, rng, dict(
            theta=array_pool("theta", p["scores"], rng, 1, -np.inf), lengths=length_pool(T, B)))
    if name in ("dag", "dag_grad", "dag_hvp", "dag_path", "dag_sample", "dag_support"):
        w = p["weights"][0] if name == "dag_support" else p["weights"]
        args = dict(weights=w, graph=p["graph"])
        pools = dict(weights=array_pool("weights", w, rng, 1, -np.inf),
                     graph=[(BAD, None), (BAD, "graph"), (BAD, (p["graph"].indptr, p["graph"].parents))])
        if name != "dag_path":
            args.update(reg=p["reg"], gamma=0.7)
            pools.update(common)
        if name == "dag_hvp":
            args["Z"] = np.ones_like(w)
            pools["Z"] = z_pool(w, rng)
            return (lambda weights, Z, graph, **kw: sm.dag_hvp(weights, Z, graph, **kw)), args, pools
        if name == "dag_sample":
            args.update(n=3, seed=0)
            pools.update(n=N_POOL, seed=SEED_POOL)
            return (lambda weights, graph, n, **kw: sm.dag_sample(weights, graph, n, **kw)), args, pools
        if name == "dag_support":
            args.update(max_paths=1000)
            pools.update(max_paths=[(BAD, 0), (BAD, -1), (BAD, 1.5), (EDGE, 10**6)])
        return getattr(sm, name), args, pools
    if name in ("smooth_max", "smooth_argmax"):
        x = p["scores"][0, 0]
        return getattr(sm, name), dict(x=x, reg=p["reg"], gamma=0.7, axis=-1), dict(
            x=array_pool("x", x, rng, 1, -np.inf), axis=AXIS_POOL, **common)
    if name in ("viterbi_sample", "viterbi_surrogate", "viterbi_relaxed", "tags_to_path"):
        tags = rng.integers(0, S, size=(B, T))
        args = dict(theta=p["scores"], tags=tags)
        pools = dict(theta=array_pool("theta", p["scores"], rng, 1, -np.inf), lengths=length_pool(T, B),
                     tags=[(BAD, tags + 0.5), (BAD, tags + S), (BAD, tags[..., :-1] if T > 1 else tags[:, :0]),
                           (BAD, "tags"), (EDGE, tags.tolist())])
        if name == "viterbi_sample":
            args = dict(theta=p["scores"], n=3, reg=p["reg"], gamma=0.7, seed=0)
            pools.pop("tags")
            pools.update(common, n=N_POOL, seed=SEED_POOL)
            return (lambda theta, n, **kw: sm.viterbi_sample(theta, n, **kw)), args, pools
        if name == "tags_to_path":
            return (lambda theta, tags, **kw: losses.tags_to_path(theta, tags, **kw)), args, pools
        args.update(reg=p["reg"], gamma=0.7, return_grad=True)
        pools.update(common)
        if name == "viterbi_surrogate":
            pools["cost"] = [(BAD, "foo"), (BAD, np.ones((1, 2))), (EDGE, "hamming"), (EDGE, None)]
        else:
            pools["divergence"] = [(BAD, "foo"), (BAD, 3), (EDGE, "kl"), (EDGE, "l2"), (EDGE, None)]
        return getattr(losses, name), args, pools
    if name in ("dtw_sample", "dtw_surrogate", "dtw_relaxed"):
        Y = np.zeros((B, NA, NB), dtype=p["dtype"])
        Y[:, np.arange(max(NA, NB)) * NA // max(NA, NB), np.arange(max(NA, NB)) * NB // max(NA, NB)] = 1
        args = dict(theta=p["cost"], reg=p["reg"], gamma=0.7)
        pools = dict(theta=array_pool("theta", p["cost"], rng, -1, np.inf), band=BAND_POOL, **common)
        if name == "dtw_sample":
            args.update(n=3, seed=0)
            pools.update(n=N_POOL, seed=SEED_POOL)
            return (lambda theta, n, **kw: sm.dtw_sample(theta, n, **kw)), args, pools
        args.update(Y=Y, return_grad=True)
        pools["Y"] = [(BAD, Y * 2), (BAD, Y[..., :1, :1] if NA * NB > 1 else Y[:, :0]), (BAD, "Y"),
                      (EDGE, Y.astype(np.float64))]
        return getattr(losses, name), args, pools
    if name == "structured_attention":
        s = p["scores"][:, :, 0, 0]
        args = dict(scores=s, transition=np.zeros((2, 2), p["dtype"]), reg=p["reg"], gamma=0.7)
        pools = dict(scores=array_pool("scores", s, rng, 1, -np.inf), **common,
                     transition=[(BAD, np.zeros((3, 3))), (BAD, "t"), (BAD, np.zeros((2, 2), np.int64)),
                                 (EDGE, np.zeros((B, 2, 2)))])
        return attention.structured_attention, args, pools
    if name.startswith("crf_"):
        from smoothmax import crf

        em = p["scores"][:, :, 0, :]  # (B, T, S)
        tr = p["scores"][0, 0]
        args = dict(emissions=em, transitions=tr)
        pools = dict(emissions=array_pool("emissions", em, rng, 1, -np.inf), lengths=length_pool(T, B),
                     transitions=[(BAD, np.zeros((S + 1, S))), (BAD, "t"), (BAD, np.zeros((S, S), np.int64)),
                                  (BAD, _nan_at(tr, rng)), (EDGE, np.full((S, S), -np.inf, tr.dtype))],
                     start=[(BAD, np.zeros(S + 1)), (BAD, _inf_at(np.zeros(S), rng, 1)), (EDGE, None)])
        if name != "crf_decode":
            args.update(reg=p["reg"], gamma=0.7)
            pools.update(common)
        if name == "crf_hvp":
            Z = [np.ones_like(em), np.ones_like(tr), np.ones(S), np.ones(S)]
            args.update(start=np.zeros(S), end=np.zeros(S), Z=Z)
            pools["Z"] = [(BAD, Z[:3]), (BAD, None), (BAD, [np.ones(em.shape[:-1] + (S + 1,))] + Z[1:]),
                          (BAD, [_nan_at(Z[0], rng)] + Z[1:]), (EDGE, tuple(z.tolist() for z in Z))]
            return (lambda emissions, transitions, start, end, Z, **kw: crf.crf_hvp(
                emissions, transitions, start, end, Z, **kw)), args, pools
        return getattr(crf, name), args, pools
    if name.startswith("DAG"):
        g = p["graph"]
        if name == "DAG":
            args = dict(indptr=g.indptr, parents=g.parents)
            pools = dict(
                indptr=[(BAD, g.indptr[::-1]), (BAD, g.indptr + 1), (BAD, g.indptr[:2]), (BAD, g.indptr * 0.5),
                        (BAD, g.indptr.astype(np.uint64) + np.uint64(2**63)), (BAD, "i"), (BAD, g.indptr[None])],
                parents=[(BAD, g.parents + 10**9), (BAD, -g.parents - 1), (BAD, g.parents[:-1]),
                         (BAD, g.parents.astype(np.uint64) + np.uint64(2**63)), (BAD, g.parents + 0.5),
                         (EDGE, g.parents.astype(np.float64)), (EDGE, g.parents.tolist())])
            return sm.DAG, args, pools
        if name == "DAG.from_edges":
            edges = np.stack([g.parents, g.child], axis=1)
            args = dict(edges=edges, n_nodes=g.n_nodes)
            pools = dict(edges=[(BAD, edges - 10), (BAD, edges + 10**9), (BAD, edges[:, :1]), (BAD, edges + 0.5),
                                (BAD, "e"), (BAD, edges[:, ::-1] if len(edges) else np.array([[1, 0]])),
                                (EDGE, edges.tolist())],
                         n_nodes=[(BAD, 1), (BAD, -3), (BAD, 2.5), (BAD, "3"), (BAD, 1), (EDGE, g.n_nodes + 3)])
            return sm.DAG.from_edges, args, pools
        if name == "DAG.for_viterbi":
            return sm.DAG.for_viterbi, dict(T=T, S=S), dict(
                T=[(BAD, 0), (BAD, -1), (BAD, 1.5), (BAD, "3"), (EDGE, np.int64(2))],
                S=[(BAD, 0), (BAD, None), (BAD, 2.0), (EDGE, np.uint8(2))])
        return sm.DAG.for_dtw, dict(NA=NA, NB=NB), dict(
            NA=[(BAD, 0), (BAD, -1), (BAD, 1.5), (BAD, "3")], NB=[(BAD, 0), (BAD, None), (EDGE, np.int16(2))],
            band=BAND_POOL)
    raise KeyError(name)


FUNCTIONS = ["dtw", "dtw_grad", "dtw_hvp", "dtw_path", "viterbi", "viterbi_grad", "viterbi_hvp",
             "viterbi_decode", "dag", "dag_grad", "dag_hvp", "dag_path", "dag_sample", "dag_support",
             "smooth_max", "smooth_argmax", "viterbi_sample", "dtw_sample", "tags_to_path",
             "viterbi_surrogate", "viterbi_relaxed", "dtw_surrogate", "dtw_relaxed",
             "structured_attention", "DAG", "DAG.from_edges", "DAG.for_viterbi", "DAG.for_dtw",
             "crf_log_partition", "crf_grad", "crf_hvp", "crf_decode"]


def make_case(name, seed, i):
    """Case ``i`` of function ``name``: ``(call, args, arg, kind, description)``."""
    rng = np.random.default_rng([seed, i, sum(map(ord, name))])
    call, args, pools = spec(name, rng)
    arg = sorted(pools)[int(rng.integers(len(pools)))]
    kind, value = pools[arg][int(rng.integers(len(pools[arg])))]
    value = value() if callable(value) and not isinstance(value, np.random.Generator) else value
    if arg == "gamma" and args.get("reg") == "hard" and isinstance(value, float) and 0 < value < 1e-300:
        kind = EDGE  # "hard" ignores gamma: any positive finite value
    args = dict(args, **{arg: value})
    desc = f"{name}({arg}={_short(value)}) [{kind}; other args: " + ", ".join(
        f"{k}={_short(v)}" for k, v in args.items() if k != arg) + "]"
    return call, args, arg, kind, desc


def _short(v):
    if isinstance(v, np.ndarray):
        return f"array(shape={v.shape}, dtype={v.dtype}, {np.array2string(v.reshape(-1)[:6], precision=3)})"
    r = repr(v)
    return r if len(r) < 80 else r[:77] + "..."


def _no_nan(out):
    items = out if isinstance(out, tuple) else (out,)
    for a in items:
        a = np.asarray(getattr(a, "indptr", a))
        if a.dtype.kind in "fc" and np.isnan(a).any():
            return False
    return True


def _snapshot(args):
    return {k: v.copy() for k, v in args.items() if isinstance(v, np.ndarray)}


def _unchanged(args, snap):
    return all(np.array_equal(args[k], v, equal_nan=v.dtype.kind in "fc") for k, v in snap.items())


def run_case(name, seed, i):
    call, args, arg, kind, desc = make_case(name, seed, i)
    print(json.dumps({"start": i, "case": desc}), flush=True)
    snap = _snapshot(args)
    why = None
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            out = call(**args)
    except (ValueError, TypeError) as exc:
        if kind == EDGE:
            why = f"edge input refused: {type(exc).__name__}: {exc}"
        elif arg.split(".")[0] not in str(exc) and not (arg == "Y" and "alignment" in str(exc)):
            why = f"message does not name {arg!r}: {type(exc).__name__}: {exc}"
    except Exception as exc:  # any other exception type is a failure, reported with the case
        why = f"unexpected {type(exc).__name__}: {exc}"
    else:
        if kind == BAD:
            why = "bad input accepted"
        elif not _no_nan(out):
            why = "NaN in the result"
    if why is None and not _unchanged(args, snap):
        why = "an input array was modified"
    print(json.dumps({"i": i, "ok": why is None, "why": why, "case": desc}), flush=True)


if __name__ == "__main__":
    name, seed, start, stop = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    for i in range(start, stop):
        run_case(name, seed, i)
