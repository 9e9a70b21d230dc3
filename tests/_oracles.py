"""Brute-force oracles for the reference test suite (docs/spec.md §7).

Everything here is written from the mathematics, in plain NumPy / itertools
scalar loops, and shares no code with ``smoothmax``:

* local operators ``max_Ω`` / ``∇max_Ω`` / ``H·z`` on one small vector
  (softmax by log-sum-exp, sparsemax by sorting, first argmax);
* a scalar DP (DTW and Viterbi) that records the local ``q`` of every node;
* enumeration of every path ``Y`` of tiny instances, with
  ``p(Y) = Π q`` along ``Y`` (the path distribution of Prop. 3), giving
  ``E = Σ_Y p(Y)·Y`` and, by the product rule with the local forward-mode
  derivatives ``q̇``, the HVP ``Ė = Σ_Y ṗ(Y)·Y``;
* the closed forms for negentropy: value ``γ·logsumexp(<Y,θ>/γ)`` (max
  convention) over all paths, and the Gibbs covariance for the HVP;
* the Sakoe–Chiba mask, written from tslearn's documented semantics;
* the same DP and enumeration on a general DAG (node 0 to node N-1).

Conventions are those of docs/spec.md §3-4: Viterbi has the virtual start state
``y_{-1}`` (``V_{-1} = 0`` for every state); DTW uses the operator on all
three predecessors everywhere (``+inf`` predecessors get weight 0).
"""
import itertools
import math

import numpy as np

NEG_INF = -math.inf
POS_INF = math.inf


# ---------------------------------------------------------------------------
# local operators on one vector (max convention)


def sparsemax(z):
    """Euclidean projection of the finite vector ``z`` on the simplex, by sorting."""
    z = [float(v) for v in z]
    zs = sorted(z, reverse=True)
    k_best, total = 0, 0.0
    running = 0.0
    for k, v in enumerate(zs, start=1):
        running += v
        if 1.0 + k * v > running:
            k_best, total = k, running
    tau = (total - 1.0) / k_best
    return np.array([max(v - tau, 0.0) for v in z])


def op_value_grad(x, reg, gamma):
    """``(max_Ω(x), ∇max_Ω(x))`` for a 1-d float64 vector; ``-inf`` entries get 0."""
    x = np.asarray(x, dtype=np.float64)
    finite = np.isfinite(x)
    assert not np.any(np.isnan(x)) and not np.any(x == POS_INF)
    q = np.zeros(len(x))
    if not finite.any():
        return NEG_INF, q
    xf = x[finite]
    if reg == "hard":
        k = int(np.flatnonzero(x == xf.max())[0])
        q[k] = 1.0
        return float(xf.max()), q
    if reg == "negentropy":
        m = xf.max()
        w = np.exp((xf - m) / gamma)
        s = w.sum()
        q[finite] = w / s
        return float(m + gamma * math.log(s)), q
    if reg == "l2":
        qf = sparsemax(xf / gamma)
        q[finite] = qf
        return float(qf @ xf - 0.5 * gamma * (qf @ qf)), q
    raise ValueError(reg)


def op_hvp(q, z, reg, gamma):
    """``H·z`` of max_Ω at the point whose gradient is ``q`` (docs/spec.md §1 table)."""
    q = np.asarray(q, dtype=np.float64)
    z = np.where(q > 0, np.asarray(z, dtype=np.float64), 0.0)
    if reg == "hard":
        return np.zeros_like(q)
    if reg == "negentropy":
        return (q * z - q * (q @ z)) / gamma
    if reg == "l2":
        s = (q > 0).astype(np.float64)
        if s.sum() == 0:
            return np.zeros_like(q)
        return (s * z - s * (s @ z) / s.sum()) / gamma
    raise ValueError(reg)


def lemma1_bounds(D, reg, gamma):
    """``(lo, hi)`` with ``max(x) + lo <= max_Ω(x) <= max(x) + hi`` (Lemma 1, D entries)."""
    if reg == "negentropy":
        return 0.0, gamma * math.log(D)
    if reg == "l2":
        return -gamma / 2.0, -gamma / (2.0 * D)
    return 0.0, 0.0


def logsumexp(v):
    v = np.asarray(v, dtype=np.float64)
    if v.size == 0 or not np.isfinite(v).any():
        return NEG_INF
    m = v[np.isfinite(v)].max()
    return float(m + math.log(np.exp(v - m).sum()))


# ---------------------------------------------------------------------------
# Sakoe-Chiba mask


def sakoe_chiba(n, m, r):
    """Allowed cells of an ``n × m`` alignment within radius ``r`` (tslearn semantics).

    The band is the radius-``r`` neighbourhood of the steepest diagonal
    stretched to the rectangle: for ``n <= m``, row ``i`` allows the columns
    ``i - r .. i + (m - n) + r``; for ``n > m`` the transpose.
    """
    mask = np.zeros((n, m), dtype=bool)
    for i in range(n):
        for j in range(m):
            if n <= m:
                mask[i, j] = i - r <= j <= i + (m - n) + r
            else:
                mask[i, j] = j - r <= i <= j + (n - m) + r
    return mask


# ---------------------------------------------------------------------------
# DTW (min convention): scalar DP, path enumeration


def dtw_allowed(theta, la=None, lb=None, band=None):
    """Boolean (NA, NB): cells inside the lengths, the band, with a finite cost."""
    NA, NB = theta.shape
    la = NA if la is None else la
    lb = NB if lb is None else lb
    ok = np.zeros((NA, NB), dtype=bool)
    ok[:la, :lb] = True
    if band is not None:
        ok[:la, :lb] &= sakoe_chiba(la, lb, band)
    ok &= np.isfinite(theta)
    return ok


def staircase(n, m):
    """Boolean (n, m): the cells of one alignment, the staircase along the straight line
    from (0, 0) to (n-1, m-1) (left moves within a row, then one step down)."""
    on = np.zeros((n, m), dtype=bool)
    cols = np.floor(np.arange(n) * (m - 1) / max(n - 1, 1) + 0.5).astype(int)
    prev = 0
    for i, j in enumerate(cols):
        on[i, prev:j + 1] = True
        prev = j
    return on


def dtw_paths(la, lb):
    """Every monotone alignment of (0,0) to (la-1, lb-1), as lists of cells."""
    out = []

    def rec(i, j, acc):
        acc = acc + [(i, j)]
        if (i, j) == (la - 1, lb - 1):
            out.append(acc)
            return
        if i + 1 < la:
            rec(i + 1, j, acc)
        if j + 1 < lb:
            rec(i, j + 1, acc)
        if i + 1 < la and j + 1 < lb:
            rec(i + 1, j + 1, acc)

    rec(0, 0, [])
    return out


def dtw_dp(theta, reg, gamma, la=None, lb=None, band=None, Z=None):
    """Scalar DTW DP. Returns ``(value, Rdot_end, q, qdot)``.

    ``q[(i, j)]`` (1-based R coordinates) is the probability vector over the
    predecessors (up, left, diagonal) of cell ``(i, j)``; ``qdot`` the local
    forward-mode derivatives along ``Z`` (min convention: ``q = ∇max_Ω(-r)``,
    ``q̇ = -H(-r)·u``).
    """
    theta = np.asarray(theta, dtype=np.float64)
    NA, NB = theta.shape
    la = NA if la is None else la
    lb = NB if lb is None else lb
    ok = dtw_allowed(theta, la, lb, band)
    Z = np.zeros_like(theta) if Z is None else np.asarray(Z, dtype=np.float64)
    R = np.full((la + 1, lb + 1), POS_INF)
    Rd = np.zeros((la + 1, lb + 1))
    R[0, 0] = 0.0
    q, qd = {}, {}
    for i in range(1, la + 1):
        for j in range(1, lb + 1):
            if not ok[i - 1, j - 1]:
                continue
            preds = [(i - 1, j), (i, j - 1), (i - 1, j - 1)]
            r = np.array([R[p] for p in preds])
            val, qq = op_value_grad(-r, reg, gamma)
            if val == NEG_INF:
                continue
            R[i, j] = theta[i - 1, j - 1] - val
            u = np.array([Rd[p] for p in preds])
            u = np.where(qq > 0, u, 0.0)
            Rd[i, j] = Z[i - 1, j - 1] + qq @ u
            q[(i, j)] = qq
            qd[(i, j)] = -op_hvp(qq, u, reg, gamma)
    return float(R[la, lb]), float(Rd[la, lb]), q, qd


def dtw_brute(theta, reg, gamma, la=None, lb=None, band=None, Z=None):
    """Enumerate every alignment. Returns a dict with

    ``value`` (from the scalar DP), ``E = Σ p(Y) Y``, ``Edot = Σ ṗ(Y) Y``,
    ``total`` (Σ p(Y), 1 when reachable), ``scores``/``probs`` per path,
    ``best`` (hard DTW cost) and ``Ybest``, and for negentropy ``lse``:
    ``-γ·logsumexp(-<Y,θ>/γ)`` over the allowed paths.
    """
    theta = np.asarray(theta, dtype=np.float64)
    NA, NB = theta.shape
    la = NA if la is None else la
    lb = NB if lb is None else lb
    ok = dtw_allowed(theta, la, lb, band)
    value, _, q, qd = dtw_dp(theta, reg, gamma, la, lb, band, Z)
    E = np.zeros((NA, NB))
    Edot = np.zeros((NA, NB))
    scores, probs, Ys = [], [], []
    total = 0.0
    steps = {(-1, 0): 0, (0, -1): 1, (-1, -1): 2}  # up, left, diagonal
    for path in dtw_paths(la, lb):
        if not all(ok[c] for c in path):
            continue
        Y = np.zeros((NA, NB))
        for c in path:
            Y[c] = 1.0
        # edges: each cell hops to the previous cell of the path, (0,0) hops to R[0,0]
        factors, dfactors = [], []
        prev = None
        for c in path:
            i, j = c[0] + 1, c[1] + 1
            k = 2 if prev is None else steps[(prev[0] - c[0], prev[1] - c[1])]
            factors.append(q[(i, j)][k] if (i, j) in q else 0.0)
            dfactors.append(qd[(i, j)][k] if (i, j) in qd else 0.0)
            prev = c
        p = float(np.prod(factors))
        pdot = 0.0
        for k in range(len(factors)):
            pdot += dfactors[k] * float(np.prod(factors[:k] + factors[k + 1:]))
        E += p * Y
        Edot += pdot * Y
        total += p
        s = float((Y * np.where(Y > 0, theta, 0.0)).sum())
        scores.append(s)
        probs.append(p)
        Ys.append(Y)
    out = dict(value=value, E=E, Edot=Edot, total=total, scores=scores, probs=probs, Ys=Ys)
    if scores:
        k = int(np.argmin(scores))
        out["best"], out["Ybest"] = scores[k], Ys[k]
        out["lse"] = -gamma * logsumexp(-np.array(scores) / gamma)
        out["pathlen"] = (min(int(Y.sum()) for Y in Ys), max(int(Y.sum()) for Y in Ys))
    else:
        out["best"], out["Ybest"], out["lse"] = POS_INF, np.zeros((NA, NB)), POS_INF
    return out


# ---------------------------------------------------------------------------
# Viterbi (max convention): scalar DP, path enumeration


def viterbi_dp(theta, reg, gamma, L=None, Z=None):
    """Scalar Viterbi DP with the virtual start state ``y_{-1}`` (``V_{-1} = 0``).

    Returns ``(value, vdot, q, qd, qf, qfd)``: ``q[t][i]`` the distribution of
    ``y_{t-1}`` given ``y_t = i``, ``qf`` the one of ``y_{L-1}``; ``qd``/``qfd``
    their forward-mode derivatives along ``Z``.
    """
    theta = np.asarray(theta, dtype=np.float64)
    T, S, _ = theta.shape
    L = T if L is None else L
    Z = np.zeros_like(theta) if Z is None else np.asarray(Z, dtype=np.float64)
    V = np.zeros(S)
    Vd = np.zeros(S)
    q = np.zeros((L, S, S))
    qd = np.zeros((L, S, S))
    for t in range(L):
        Vn = np.empty(S)
        Vdn = np.empty(S)
        for i in range(S):
            val, qq = op_value_grad(theta[t, i] + V, reg, gamma)
            u = np.where(qq > 0, Z[t, i] + Vd, 0.0)
            Vn[i] = val
            Vdn[i] = qq @ u
            q[t, i] = qq
            qd[t, i] = op_hvp(qq, u, reg, gamma)
        V, Vd = Vn, Vdn
    value, qf = op_value_grad(V, reg, gamma)
    u = np.where(qf > 0, Vd, 0.0)
    return float(value), float(qf @ u), q, qd, qf, op_hvp(qf, u, reg, gamma)


def viterbi_brute(theta, reg, gamma, L=None, Z=None):
    """Enumerate every tag sequence ``(y_{-1}, y_0, ..., y_{L-1})``.

    Returns a dict with ``value`` (scalar DP), ``E``, ``Edot``, ``total``,
    ``best`` (hard Viterbi score), ``tags`` (its ``y_0..y_{L-1}``, -1 padded
    to T), and ``lse = γ·logsumexp(<Y,θ>/γ)``.
    """
    theta = np.asarray(theta, dtype=np.float64)
    T, S, _ = theta.shape
    L = T if L is None else L
    value, _, q, qd, qf, qfd = viterbi_dp(theta, reg, gamma, L, Z)
    E = np.zeros((T, S, S))
    Edot = np.zeros((T, S, S))
    scores, seqs, Ys = [], [], []
    total = 0.0
    for y in itertools.product(range(S), repeat=L + 1):  # y[0] is y_{-1}
        factors = [qf[y[L]]] + [q[t, y[t + 1], y[t]] for t in range(L)]
        dfactors = [qfd[y[L]]] + [qd[t, y[t + 1], y[t]] for t in range(L)]
        p = float(np.prod(factors))
        pdot = sum(dfactors[k] * float(np.prod(factors[:k] + factors[k + 1:]))
                   for k in range(len(factors)))
        Y = np.zeros((T, S, S))
        s = 0.0
        for t in range(L):
            Y[t, y[t + 1], y[t]] = 1.0
            s += theta[t, y[t + 1], y[t]]
        E += p * Y
        Edot += pdot * Y
        total += p
        scores.append(s)
        seqs.append(y)
        Ys.append(Y)
    scores = np.array(scores)
    k = int(np.argmax(scores))
    tags = -np.ones(T, dtype=np.int64)
    tags[:L] = seqs[k][1:]
    return dict(value=value, E=E, Edot=Edot, total=total, scores=scores, Ys=Ys,
                best=float(scores[k]), tags=tags, Ybest=Ys[k],
                lse=gamma * logsumexp(scores / gamma))


def gibbs_hvp(scores, Ys, Z, gamma, sign=1.0):
    """HVP of ``sign·γ·logsumexp(sign·<Y,θ>/γ)`` along ``Z``: ``sign·Cov(Y, <Y,Z>)/γ``.

    ``sign = +1`` for the max convention (Viterbi), ``-1`` for DTW costs.
    """
    s = sign * np.asarray(scores) / gamma
    w = np.exp(s - s.max())
    w /= w.sum()
    Ys = np.asarray(Ys)
    yz = np.array([(Y * Z).sum() for Y in Ys])
    EY = np.tensordot(w, Ys, axes=1)
    EYZ = np.tensordot(w * yz, Ys, axes=1)
    return sign * (EYZ - EY * (w @ yz)) / gamma


# ---------------------------------------------------------------------------
# general DAG (max convention): scalar DP, path enumeration


def dag_brute(w, indptr, parents, reg, gamma, Z=None):
    """Enumerate every path from node 0 to node N-1; ``p(Y) = Π q`` along it (Prop. 3)."""
    w = np.asarray(w, dtype=np.float64)
    Z = np.zeros_like(w) if Z is None else np.asarray(Z, dtype=np.float64)
    N = len(indptr) - 1
    v, vd = np.zeros(N), np.zeros(N)
    q, qd = np.zeros(len(w)), np.zeros(len(w))
    for i in range(1, N):
        ks = list(range(indptr[i], indptr[i + 1]))
        if not ks:
            v[i] = NEG_INF
            continue
        x = np.array([w[k] + v[parents[k]] for k in ks])
        v[i], qq = op_value_grad(x, reg, gamma)
        u = np.where(qq > 0, np.array([Z[k] + vd[parents[k]] for k in ks]), 0.0)
        vd[i] = qq @ u
        q[ks] = qq
        qd[ks] = op_hvp(qq, u, reg, gamma)

    def paths(i):
        if i == 0:
            yield ()
            return
        for k in range(indptr[i], indptr[i + 1]):
            for p in paths(parents[k]):
                yield p + (k,)

    E, Ed = np.zeros(len(w)), np.zeros(len(w))
    scores, Ys = [], []
    for path in paths(N - 1):
        f = [q[k] for k in path]
        df = [qd[k] for k in path]
        p = float(np.prod(f))
        pd = sum(df[a] * float(np.prod(f[:a] + f[a + 1:])) for a in range(len(f)))
        Y = np.zeros(len(w))
        Y[list(path)] = 1.0
        E += p * Y
        Ed += pd * Y
        scores.append(sum(w[k] for k in path))
        Ys.append(Y)
    scores = np.array(scores)
    best = int(np.argmax(scores)) if len(scores) else None
    return dict(value=v[N - 1], E=E, Edot=Ed, scores=scores, Ys=Ys,
                lse=gamma * logsumexp(scores / gamma) if len(scores) else NEG_INF,
                best=scores[best] if best is not None else NEG_INF)
