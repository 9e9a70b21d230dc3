"""The factorised Viterbi (CRF) engines and ``smoothmax.torch.CRF``.

Oracles: enumeration of every tag sequence (small T, S), the full-potential
``viterbi_grad``/``viterbi_hvp`` path on the materialised potentials,
pytorch-crf, finite differences (float64), and the compiled engine against
the array-API reference engine.
"""
import itertools

import numpy as np
import pytest

import smoothmax as sm
from smoothmax import _reference as R
from smoothmax import crf as C
from smoothmax.operators import REG_CODES

torch = pytest.importorskip("torch")
import smoothmax.torch as smt  # noqa: E402

try:
    from smoothmax._core import crf as K
except ImportError:  # the compiled core is not built: the reference engine is tested alone
    K = None

REGS = ("negentropy", "l2", "hard")
GAMMA = 0.7


def _problem(rng, B, T, S, dtype=np.float64, scale=1.0, lengths=True):
    em = (scale * rng.normal(size=(B, T, S))).astype(dtype)
    A = (scale * rng.normal(size=(S, S))).astype(dtype)
    st = (scale * rng.normal(size=S)).astype(dtype)
    en = (scale * rng.normal(size=S)).astype(dtype)
    L = rng.integers(1, T + 1, size=B) if lengths else np.full(B, T)
    L[0] = T
    return em, A, st, en, L.astype(np.int64)


def _scores(em, A, st, en, L):
    """Every tag sequence of item b (length L[b]) and its score, by enumeration."""
    out = []
    for b in range(em.shape[0]):
        ys = list(itertools.product(range(em.shape[2]), repeat=int(L[b])))
        sc = []
        for y in ys:
            s = st[y[0]] + en[y[-1]] + sum(em[b, t, y[t]] for t in range(len(y)))
            s += sum(A[y[t - 1], y[t]] for t in range(1, len(y)))
            sc.append(s)
        out.append((ys, np.array(sc)))
    return out


def _brute(em, A, st, en, L, gamma=1.0):
    """log-partition (γ-scaled), best score, best path, unary and pairwise marginals."""
    B, T, S = em.shape
    res = []
    for (ys, sc) in _scores(em.astype(np.float64), A, st, en, L):
        m = sc.max()
        p = np.exp((sc - m) / gamma)
        Z = p.sum()
        p /= Z
        un = np.zeros((T, S))
        pw = np.zeros((T, S, S))  # [t, i, j] = p(y_t = i, y_{t-1} = j)
        for y, pr in zip(ys, p):
            for t, i in enumerate(y):
                un[t, i] += pr
                if t:
                    pw[t, i, y[t - 1]] += pr
        res.append(dict(value=m + gamma * np.log(Z), best=m, path=list(ys[int(np.argmax(sc))]),
                        unary=un, pairwise=pw))
    return res


# ---------------------------------------------------------------------------
# (each engine against enumeration, every operator: tests/test_engine_contract.py)
# engines against the full-potential Viterbi (a second, independent kernel)


def _full(em, A, st, en, L):
    theta, _ = C.full_potentials(em, A, st, en, L)
    return theta


@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_against_full_potentials(reg, dtype, rng):
    em, A, st, en, L = _problem(rng, 5, 6, 4, dtype)
    w = rng.uniform(0.5, 2.0, size=5)
    theta = _full(em, A, st, en, L)
    assert theta.shape == (5, 6, 4, 4)
    vf, Ef = sm.viterbi_grad(theta, reg=reg, gamma=GAMMA, lengths=L)
    value, ge, gA, gs, gen = C.crf_grad(em, A, st, en, lengths=L, reg=reg, gamma=GAMMA)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-10)
    shift = GAMMA / 2 if reg == "l2" else 0.0  # the operator on one entry at t = 0 (docs/crf.md)
    np.testing.assert_allclose(value - shift, vf, **tol)
    assert value.dtype == dtype and ge.dtype == dtype and gA.dtype == dtype
    np.testing.assert_allclose(ge, Ef.sum(-1), **tol)
    np.testing.assert_allclose(gA, Ef[:, 1:].sum((0, 1)).T, **tol)
    np.testing.assert_allclose(gs, Ef[:, 0, :, 0].sum(0), **tol)
    last = np.stack([Ef[b, L[b] - 1].sum(-1) for b in range(5)])
    np.testing.assert_allclose(gen, last.sum(0), **tol)
    # weighted batch sums (the upstream gradient of the torch layer)
    run = K if K is not None else R
    _, _, gAw, gsw, genw = run.crf_grad(em, A, st, en, L, w, REG_CODES[reg], GAMMA)
    np.testing.assert_allclose(gAw, np.einsum("b,btij->ji", w, Ef[:, 1:]), **tol)
    np.testing.assert_allclose(gsw, np.einsum("b,bi->i", w, Ef[:, 0, :, 0]), **tol)
    np.testing.assert_allclose(genw, np.einsum("b,bi->i", w, last), **tol)
    score, tags = C.crf_decode(em, A, st, en, lengths=L)
    sf, tf = sm.viterbi_decode(theta, lengths=L)
    np.testing.assert_allclose(score, sf, **tol)
    np.testing.assert_array_equal(tags, tf)


@pytest.mark.parametrize("reg", REGS)
def test_hvp_against_full_potentials(reg, rng):
    """The factorised HVP is the full-potential HVP pulled back through the affine map."""
    em, A, st, en, L = _problem(rng, 4, 5, 3)
    Z = (rng.normal(size=em.shape), rng.normal(size=A.shape), rng.normal(size=3), rng.normal(size=3))
    # the linear part of the map (parameters -> theta): full_potentials without the -inf mask
    Zt = np.nan_to_num(_full(*Z, L), neginf=0.0)
    Zt[:, 0, :, 1:] = 0.0
    Ed = sm.viterbi_hvp(_full(em, A, st, en, L), Zt, reg=reg, gamma=GAMMA, lengths=L)
    he, hA, hs, hen = C.crf_hvp(em, A, st, en, Z, lengths=L, reg=reg, gamma=GAMMA)
    np.testing.assert_allclose(he, Ed.sum(-1), atol=1e-10)
    np.testing.assert_allclose(hA, Ed[:, 1:].sum((0, 1)).T, atol=1e-10)
    np.testing.assert_allclose(hs, Ed[:, 0, :, 0].sum(0), atol=1e-10)
    np.testing.assert_allclose(hen, sum(Ed[b, L[b] - 1].sum(-1) for b in range(4)), atol=1e-10)


# ---------------------------------------------------------------------------
# compiled against reference, finite differences


@pytest.mark.skipif(K is None, reason="compiled core not built")
@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("scale,gamma", [(1.0, 1.0), (1.0, 0.05), (300.0, 0.01), (1e4, 1.0)])
def test_compiled_matches_reference(reg, scale, gamma, rng):
    """Including scores whose factorised sums underflow (the log-domain rows)."""
    em, A, st, en, L = _problem(rng, 6, 7, 5, scale=scale)
    A[1, :] = -np.inf  # a tag that cannot be left
    A[:, 2] = -np.inf  # nor entered
    w = rng.uniform(0.5, 2.0, size=6)
    r = REG_CODES[reg]
    Z = (rng.normal(size=em.shape), rng.normal(size=A.shape), rng.normal(size=5), rng.normal(size=5))
    for name, args in (("value", (em, A, st, en, L, r, gamma)),
                       ("grad", (em, A, st, en, L, w, r, gamma)),
                       ("hvp", (em, A, st, en, *Z, L, w, r, gamma))):
        a = getattr(K, f"crf_{name}")(*args)
        b = getattr(R, f"crf_{name}")(*args)
        for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            assert np.all(np.isfinite(x)), name
            np.testing.assert_allclose(x, y, rtol=1e-9, atol=1e-9 * max(1.0, scale), err_msg=name)


@pytest.mark.parametrize("reg", ["negentropy", "l2"])
def test_finite_differences(reg, rng):
    em, A, st, en, L = _problem(rng, 3, 5, 4)
    w = np.array([1.0, 2.0, 0.5])
    Z = (rng.normal(size=em.shape), rng.normal(size=A.shape), rng.normal(size=4), rng.normal(size=4))
    r = REG_CODES[reg]
    run = K if K is not None else R
    eps = 1e-6

    def f(x):
        return (w * run.crf_value(em + x * Z[0], A + x * Z[1], st + x * Z[2], en + x * Z[3], L, r,
                                  GAMMA)).sum()

    def grads(x):
        g = run.crf_grad(em + x * Z[0], A + x * Z[1], st + x * Z[2], en + x * Z[3], L, w, r, GAMMA)
        return [w[:, None, None] * g[1]] + list(g[2:])

    g = grads(0.0)
    np.testing.assert_allclose((f(eps) - f(-eps)) / (2 * eps), sum((a * z).sum() for a, z in zip(g, Z)),
                               rtol=1e-6)
    vdot, he, hA, hs, hen = run.crf_hvp(em, A, st, en, *Z, L, w, r, GAMMA)
    fd = [(a - b) / (2 * eps) for a, b in zip(grads(eps), grads(-eps))]
    for x, y in zip(fd, [w[:, None, None] * he, hA, hs, hen]):
        np.testing.assert_allclose(x, y, atol=1e-6)
    for b in range(3):  # vdot[b] = <∇value_b, Z_b>, item b alone through one-hot weights
        _, ge, gA, gs, gen = run.crf_grad(em, A, st, en, L, np.eye(3)[b], r, GAMMA)
        expect = (ge[b] * Z[0][b]).sum() + (gA * Z[1]).sum() + (gs * Z[2]).sum() + (gen * Z[3]).sum()
        np.testing.assert_allclose(vdot[b], expect, rtol=1e-12)


def test_public_functions_shapes_and_errors(rng):
    em, A, st, en, L = _problem(rng, 6, 5, 3)
    em4 = em.reshape(2, 3, 5, 3)
    v = C.crf_log_partition(em4, A, st, en, lengths=L.reshape(2, 3))
    assert v.shape == (2, 3)
    np.testing.assert_allclose(v.reshape(-1), C.crf_log_partition(em, A, st, en, lengths=L))
    _, ge, *_ = C.crf_grad(em4, A)
    assert ge.shape == em4.shape
    with pytest.raises(ValueError, match="transitions must have shape"):
        C.crf_log_partition(em, A[:2])
    with pytest.raises(ValueError, match="emissions must not contain NaN"):
        C.crf_log_partition(np.full_like(em, np.nan), A)
    with pytest.raises(ValueError, match=r"transitions must not contain \+inf"):
        C.crf_log_partition(em, np.full_like(A, np.inf))
    with pytest.raises(TypeError, match="emissions must have a floating dtype"):
        C.crf_log_partition(em.astype(np.int32) > 0, A)
    with pytest.raises(ValueError, match="lengths must be integers in"):
        C.crf_log_partition(em, A, lengths=np.zeros(6, dtype=int))
    em0 = em.copy()
    C.crf_grad(em, A, st, en, lengths=L)
    np.testing.assert_array_equal(em, em0)  # inputs are not modified


# ---------------------------------------------------------------------------
# the torch layer against pytorch-crf


torchcrf = pytest.importorskip("torchcrf")


def _pair(S, batch_first, dtype, seed=0):
    torch.manual_seed(seed)
    ref = torchcrf.CRF(S, batch_first=batch_first).to(dtype)
    new = smt.CRF(S, batch_first=batch_first).to(dtype)
    with torch.no_grad():  # away from the [-0.1, 0.1] initialisation, so that errors show
        for p in ref.parameters():
            p.normal_()
    new.load_state_dict(ref.state_dict())
    return ref, new


@pytest.mark.filterwarnings("ignore:where received a uint8")
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "token_mean"])
@pytest.mark.parametrize("masked", [False, True])
def test_torch_crf_matches_pytorch_crf(batch_first, dtype, reduction, masked):
    B, T, S = 5, 7, 4
    ref, new = _pair(S, batch_first, dtype)
    g = torch.Generator().manual_seed(1)
    em = torch.randn(B, T, S, dtype=dtype, generator=g)
    tags = torch.randint(0, S, (B, T), generator=g)
    mask = None
    if masked:
        L = torch.tensor([7, 3, 1, 5, 7])
        mask = torch.arange(T)[None, :] < L[:, None]
    if not batch_first:
        em, tags = em.transpose(0, 1).contiguous(), tags.transpose(0, 1).contiguous()
        mask = None if mask is None else mask.transpose(0, 1).contiguous()
    e1, e2 = em.clone().requires_grad_(), em.clone().requires_grad_()
    a = ref(e1, tags, None if mask is None else mask.to(torch.uint8), reduction=reduction)
    b = new(e2, tags, mask, reduction=reduction)
    assert b.dtype == dtype and b.shape == a.shape
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(b, a, **tol)
    w = torch.randn(a.shape, dtype=dtype, generator=g)  # non-uniform upstream weights for "none"
    (a * w).sum().backward()
    (b * w).sum().backward()
    torch.testing.assert_close(e2.grad, e1.grad, **tol)
    for p, q in zip(ref.parameters(), new.parameters()):
        assert q.grad.dtype == dtype
        torch.testing.assert_close(q.grad, p.grad, **tol)
    dm = None if mask is None else mask.to(torch.uint8)
    assert new.decode(em, mask) == ref.decode(em, dm)


def test_torch_crf_errors_match_pytorch_crf():
    ref, new = _pair(3, False, torch.float64)
    em = torch.randn(4, 2, 3, dtype=torch.float64)
    tags = torch.zeros(4, 2, dtype=torch.long)
    bad_calls = [
        lambda m: m(em[0], tags),
        lambda m: m(torch.randn(4, 2, 5, dtype=torch.float64), tags),
        lambda m: m(em, tags[:3]),
        lambda m: m(em, tags, torch.ones(3, 2, dtype=torch.uint8)),
        lambda m: m(em, tags, torch.tensor([[0, 1]] * 4, dtype=torch.uint8)),
        lambda m: m(em, tags, reduction="avg"),
        lambda m: m.decode(em[0]),
    ]
    for call in bad_calls:
        with pytest.raises(ValueError) as e_ref:
            call(ref)
        with pytest.raises(ValueError) as e_new:
            call(new)
        assert str(e_new.value) == str(e_ref.value)
    for cls in (torchcrf.CRF, smt.CRF):
        with pytest.raises(ValueError, match="invalid number of tags: 0"):
            cls(0)
    with pytest.raises(ValueError, match="left-aligned"):
        new(em, tags, torch.tensor([[1, 1], [0, 1], [1, 1], [1, 1]], dtype=torch.bool))
    assert repr(new) == repr(ref)
    assert [n for n, _ in new.named_parameters()] == [n for n, _ in ref.named_parameters()]


def test_torch_crf_lengths_instead_of_mask():
    _, new = _pair(4, True, torch.float64)
    em = torch.randn(3, 6, 4, dtype=torch.float64)
    tags = torch.randint(0, 4, (3, 6))
    L = torch.tensor([6, 2, 4])
    mask = torch.arange(6)[None, :] < L[:, None]
    torch.testing.assert_close(new(em, tags, lengths=L, reduction="none"),
                               new(em, tags, mask, reduction="none"))
    assert new.decode(em, lengths=L) == new.decode(em, mask)
    assert [len(t) for t in new.decode(em, mask)] == [6, 2, 4]


@pytest.mark.parametrize("reg", ["negentropy", "l2"])
def test_torch_crf_second_order(reg):
    """gradcheck and gradgradcheck (finite differences of the HVP pass), float64."""
    torch.manual_seed(0)
    S = 3
    new = smt.CRF(S, batch_first=True, reg=reg, gamma=0.8).double()
    em = torch.randn(2, 4, S, dtype=torch.float64, requires_grad=True)
    A = torch.randn(S, S, dtype=torch.float64, requires_grad=True)
    st = torch.randn(S, dtype=torch.float64, requires_grad=True)
    en = torch.randn(S, dtype=torch.float64, requires_grad=True)
    L = np.array([4, 2])

    def f(em, A, st, en):
        from smoothmax._torch_crf import log_partition

        return log_partition(em, A, st, en, L, reg, 0.8)

    assert torch.autograd.gradcheck(f, (em, A, st, en))
    assert torch.autograd.gradgradcheck(f, (em, A, st, en))
    # third order raises instead of returning zeros
    v = f(em, A, st, en).sum()
    g = torch.autograd.grad(v, (em, A), create_graph=True)
    h = torch.autograd.grad((g[0] ** 2).sum() + (g[1] ** 2).sum(), em, create_graph=True)[0]
    with pytest.raises(RuntimeError, match="third-order"):
        h.sum().backward()


def test_torch_crf_marginals_and_sample():
    torch.manual_seed(0)
    S, T = 3, 4
    new = smt.CRF(S, batch_first=True).double()
    with torch.no_grad():
        for p in new.parameters():
            p.normal_()
    em = torch.randn(2, T, S, dtype=torch.float64)
    L = np.array([4, 3])
    bf = _brute(em.numpy(), new.transitions.detach().numpy(), new.start_transitions.detach().numpy(),
                new.end_transitions.detach().numpy(), L)
    un, pw = new.marginals(em, lengths=torch.tensor(L), pairwise=True)
    for b in range(2):
        np.testing.assert_allclose(un[b].detach().numpy(), bf[b]["unary"], atol=1e-12)
        np.testing.assert_allclose(pw[b].detach().numpy(), bf[b]["pairwise"], atol=1e-12)
    # differentiable unary marginals: d/d emissions of sum(marginals * c) by finite differences
    emr = em.clone().requires_grad_()
    c = torch.randn(2, T, S, dtype=torch.float64)
    (new.marginals(emr, lengths=torch.tensor(L)) * c).sum().backward()
    d = torch.randn_like(em)
    eps = 1e-6
    fd = ((new.marginals(em + eps * d, lengths=torch.tensor(L)) * c).sum()
          - (new.marginals(em - eps * d, lengths=torch.tensor(L)) * c).sum()) / (2 * eps)
    torch.testing.assert_close((emr.grad * d).sum(), fd, rtol=1e-6, atol=1e-8)
    # l2: sparse marginals with exact zeros that agree with the full-potential path
    l2 = smt.CRF(S, batch_first=True, reg="l2", gamma=0.5).double()
    l2.load_state_dict(new.state_dict())
    u2 = l2.marginals(3 * em)
    theta, Lf = l2.full_potentials(3 * em)
    E = sm.viterbi_grad(theta, reg="l2", gamma=0.5, lengths=Lf)[1]
    torch.testing.assert_close(u2, E.sum(-1))
    assert (u2 == 0).any()
    # samples: shape, -1 past the length, frequencies near the marginals
    ys = new.sample(em, lengths=torch.tensor(L), n=4000, seed=0)
    assert ys.shape == (4000, 2, T) and (ys[:, 1, 3] == -1).all()
    freq = torch.stack([(ys[:, 0] == i).double().mean(0) for i in range(S)], -1)
    np.testing.assert_allclose(freq.numpy(), bf[0]["unary"], atol=0.04)


def test_torch_crf_hard_and_l2_forward():
    """"hard": score(tags) − best score ≤ 0, 0 at the decoded path; "l2": the full-potential surrogate."""
    torch.manual_seed(0)
    hard = smt.CRF(4, batch_first=True, reg="hard").double()
    em = torch.randn(3, 5, 4, dtype=torch.float64)
    best = torch.tensor(hard.decode(em))
    assert (hard(em, torch.randint(0, 4, (3, 5)), reduction="none") <= 1e-12).all()
    torch.testing.assert_close(hard(em, best, reduction="none"), torch.zeros(3, dtype=torch.float64))
    l2 = smt.CRF(4, batch_first=True, reg="l2", gamma=0.3).double()
    tags = torch.randint(0, 4, (3, 5))
    theta, Lf = l2.full_potentials(em)
    Y = torch.zeros_like(theta)
    for b in range(3):
        Y[b, 0, tags[b, 0], 0] = 1
        for t in range(1, 5):
            Y[b, t, tags[b, t], tags[b, t - 1]] = 1
    surrogate = sm.viterbi(theta, reg="l2", gamma=0.3) - (Y * theta.nan_to_num(neginf=0)).sum((1, 2, 3))
    torch.testing.assert_close(-l2(em, tags, reduction="none"), surrogate + 0.15)


@pytest.mark.parametrize("engine", ["compiled", "reference"])
def test_engines_never_form_the_full_potentials(engine, rng):
    """Peak NumPy allocation of a gradient / HVP call stays far below one (B, T, S, S) array."""
    import tracemalloc

    if engine == "compiled" and K is None:
        pytest.skip("compiled core not built")
    E = K if engine == "compiled" else R
    B, T, S = 4, 64, 64
    em, A, st, en, L = _problem(rng, B, T, S)
    Z = (rng.normal(size=em.shape), rng.normal(size=A.shape), rng.normal(size=S), rng.normal(size=S))
    full = B * T * S * S * 8
    E.crf_grad(em, A, st, en, L, None, 0, 1.0)  # first call: lazy imports allocate too
    for reg in (0, 1):
        tracemalloc.start()
        E.crf_grad(em, A, st, en, L, None, reg, 1.0)
        E.crf_hvp(em, A, st, en, *Z, L, None, reg, 1.0)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < full / 2, (reg, peak, full)


def test_array_api_strict_runs_the_reference_engine(rng):
    xs = pytest.importorskip("array_api_strict")
    em, A, st, en, L = _problem(rng, 3, 5, 4)
    ref = C.crf_grad(em, A, st, en, lengths=L, reg="l2", gamma=GAMMA)
    for dt, tol in ((xs.float64, 1e-12), (xs.float32, 1e-5)):
        args = [xs.asarray(a, dtype=dt) for a in (em, A, st, en)]
        out = C.crf_grad(*args, lengths=L, reg="l2", gamma=GAMMA)
        for o, r in zip(out, ref):
            assert type(o).__module__.startswith("array_api_strict") and o.dtype == dt
            np.testing.assert_allclose(np.asarray(o), r, atol=tol)
        _, tags = C.crf_decode(*args, lengths=L)
        np.testing.assert_array_equal(np.asarray(tags), C.crf_decode(em, A, st, en, lengths=L)[1])
