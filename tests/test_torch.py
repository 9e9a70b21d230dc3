"""PyTorch autodiff of smoothmax: the custom Functions (value -> E -> HVP) and the layers.

Checks, in float64 with ``torch.autograd.gradcheck``/``gradgradcheck``, that
the first and second derivatives of every structure under every smooth
operator are right (with lengths and bands), that the graph of one call is
one custom node, that a third order raises, that the forward is not run
again in the backward, and the dtype/device of every output.
"""
import zlib

import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed")

import smoothmax as sm  # noqa: E402
from smoothmax import torch as smt  # noqa: E402
from torch.autograd import gradcheck, gradgradcheck  # noqa: E402

REGS = ["negentropy", "l2"]
F64 = torch.float64


def _rand(*shape, seed=0, dtype=F64, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.rand(*shape, generator=g, dtype=F64)).to(dtype)


def _randn(*shape, seed=1, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64).to(dtype)


# Each case: theta shape, the public value / grad / hvp functions with their keyword arguments.
CASES = {
    "dtw": ((2, 4, 5), dict(lengths=([4, 3], [5, 4]), band=2)),
    "dtw-nolengths": ((1, 3, 3), dict()),
    "viterbi": ((2, 4, 3, 3), dict(lengths=[4, 2])),
}


def _funcs(name):
    struct = name.split("-")[0]
    return {
        "dtw": (sm.dtw, sm.dtw_grad, sm.dtw_hvp),
        "viterbi": (sm.viterbi, sm.viterbi_grad, sm.viterbi_hvp),
    }[struct]


def _theta(name, requires_grad=True, dtype=F64):
    shape, kw = CASES[name]
    # random, so that no l2 (sparsemax) kink is within the finite-difference step
    theta = _rand(*shape, seed=zlib.crc32(name.encode()) % 1000, dtype=dtype, scale=2.0)
    return theta.requires_grad_(requires_grad), kw


# ---------------------------------------------------------------------------
# derivatives


@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("name", list(CASES))
def test_gradcheck_and_gradgradcheck_of_value(name, reg):
    theta, kw = _theta(name)
    value = _funcs(name)[0]

    def f(t):
        return value(t, reg=reg, gamma=0.7, **kw)

    assert gradcheck(f, (theta,))
    assert gradgradcheck(f, (theta,))


@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("name", list(CASES))
def test_gradcheck_of_expected_path(name, reg):
    """E from the grad op is differentiable: its Jacobian (the Hessian) matches finite differences."""
    theta, kw = _theta(name)
    grad = _funcs(name)[1]
    assert gradcheck(lambda t: grad(t, reg=reg, gamma=0.7, **kw), (theta,))


@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("name", ["dtw", "viterbi"])
def test_hvp_op_is_linear_in_Z_and_matches_double_backward(name, reg):
    theta, kw = _theta(name, requires_grad=False)
    value, _, hvp = _funcs(name)
    Z = _randn(*theta.shape).requires_grad_(True)
    assert gradcheck(lambda z: hvp(theta, z, reg=reg, gamma=0.7, **kw), (Z,), fast_mode=True)

    t = theta.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(value(t, reg=reg, gamma=0.7, **kw).sum(), t, create_graph=True)
    (h,) = torch.autograd.grad((g * Z.detach()).sum(), t)
    torch.testing.assert_close(h, hvp(theta, Z.detach(), reg=reg, gamma=0.7, **kw))


def test_grad_op_outputs_are_both_differentiable():
    theta, kw = _theta("dtw")
    v, E = sm.dtw_grad(theta, **kw)
    W = _randn(*theta.shape)
    (gv,) = torch.autograd.grad(v.sum(), theta, retain_graph=True)
    torch.testing.assert_close(gv, E.detach())
    (gE,) = torch.autograd.grad((E * W).sum(), theta)
    torch.testing.assert_close(gE, sm.dtw_hvp(theta.detach(), W, **kw))


def test_hvp_op_is_not_differentiable_in_theta():
    theta, kw = _theta("dtw")
    Z = _randn(*theta.shape)
    out = sm.dtw_hvp(theta, Z, **kw)
    with pytest.raises(RuntimeError, match="third-order derivatives are not supported"):
        out.sum().backward()


@pytest.mark.parametrize("name", ["dtw", "viterbi"])
def test_third_order_raises(name):
    theta, kw = _theta(name)
    v = _funcs(name)[0](theta, **kw).sum()
    (g,) = torch.autograd.grad(v, theta, create_graph=True)
    (h,) = torch.autograd.grad((g * g).sum(), theta, create_graph=True)
    assert h.requires_grad
    with pytest.raises(RuntimeError, match="third-order derivatives are not supported"):
        torch.autograd.grad(h.sum(), theta)


# ---------------------------------------------------------------------------
# graph structure and cost


def _graph_nodes(t):
    seen, stack = [], [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or any(node is s for s in seen):
            continue
        seen.append(node)
        stack.extend(n for n, _ in node.next_functions)
    return [type(n).__name__ for n in seen]


@pytest.mark.parametrize("shape", [(2, 3, 4), (3, 30, 40)])
def test_graph_of_one_call_is_one_custom_node(shape):
    theta = _rand(*shape).requires_grad_(True)
    nodes = _graph_nodes(sm.dtw(theta))
    # eager calls enter the operator's autograd directly (_EagerAutograd), traced ones the op
    assert nodes.count("_EagerAutogradBackward") == 1, nodes
    assert len(nodes) <= 4, nodes  # flatten and unflatten views, the custom node, the leaf
    v, E = sm.dtw_grad(theta)
    # value and E are the two outputs of one node
    assert v.grad_fn.next_functions[0][0] is E.grad_fn.next_functions[0][0]
    assert type(v.grad_fn.next_functions[0][0]).__name__ == "_EagerAutogradBackward"


def test_backward_does_not_rerun_the_forward(engine_calls):
    calls = engine_calls
    theta, kw = _theta("viterbi")
    sm.viterbi(theta, **kw).sum().backward()
    assert calls == ["grad"]
    calls.clear()
    theta.grad = None
    (g,) = torch.autograd.grad(sm.viterbi(theta, **kw).sum(), theta, create_graph=True)
    (g * g).sum().backward()
    assert calls == ["grad", "hvp"]
    calls.clear()
    with torch.no_grad():
        sm.viterbi(theta, **kw)
    assert calls == ["value"]


# ---------------------------------------------------------------------------
# dtype, device, no-grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["dtw", "viterbi"])
def test_outputs_keep_dtype_and_device(name, dtype):
    theta, kw = _theta(name, dtype=dtype)
    value, grad, hvp = _funcs(name)
    Z = _randn(*theta.shape, dtype=dtype)
    v = value(theta, **kw)
    v2, E = grad(theta, **kw)
    H = hvp(theta, Z, **kw)
    (g,) = torch.autograd.grad(v.sum(), theta, create_graph=True)
    (h,) = torch.autograd.grad((g * Z).sum(), theta)
    for out in (v, v2, E, H, g, h):
        assert isinstance(out, torch.Tensor)
        assert out.dtype == dtype and out.device == theta.device
    assert v.shape == theta.shape[:1] and E.shape == theta.shape and H.shape == theta.shape
    ref = value(theta.detach().double(), **kw)
    torch.testing.assert_close(v.double(), ref, rtol=1e-5, atol=1e-5)


def test_no_graph_without_requires_grad():
    theta, kw = _theta("dtw", requires_grad=False)
    assert sm.dtw(theta, **kw).grad_fn is None
    v, E = sm.dtw_grad(theta, **kw)
    assert v.grad_fn is None and E.grad_fn is None
    t = theta.clone().requires_grad_(True)
    with torch.no_grad():
        assert sm.dtw(t, **kw).grad_fn is None


def test_decode_and_path_are_plain_tensors():
    theta, kw = _theta("viterbi")
    score, tags = sm.viterbi_decode(theta, lengths=kw["lengths"])
    assert score.grad_fn is None and tags.dtype == torch.int64
    assert tags.shape == theta.shape[:2] and (tags[1, 2:] == -1).all()
    theta, kw = _theta("dtw")
    cost, Y = sm.dtw_path(theta, **kw)
    assert cost.grad_fn is None and Y.dtype == theta.dtype


@pytest.mark.skipif(not hasattr(sm, "DAG"), reason="smoothmax.DAG is not exported yet")
@pytest.mark.parametrize("reg", REGS)
def test_dag_gradcheck_and_gradgradcheck(reg):
    graph, _ = sm.DAG.for_viterbi(3, 2)
    w = _rand(2, graph.n_edges, seed=3, scale=2.0).requires_grad_(True)
    f = lambda t: sm.dag(t, graph, reg=reg, gamma=0.7)  # noqa: E731
    assert gradcheck(f, (w,)) and gradgradcheck(f, (w,), fast_mode=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["dtw", "viterbi"])
def test_cuda_outputs_stay_on_device_and_gradgradcheck(name):
    theta, kw = _theta(name)
    theta = theta.detach().cuda().requires_grad_(True)
    value = _funcs(name)[0]
    v = value(theta, **kw)
    (g,) = torch.autograd.grad(v.sum(), theta, create_graph=True)
    assert v.device == theta.device and g.device == theta.device
    torch.testing.assert_close(v.cpu(), value(theta.detach().cpu(), **kw))
    assert gradgradcheck(lambda t: value(t, reg="negentropy", gamma=0.7, **kw), (theta,))


# ---------------------------------------------------------------------------
# layers


def _series(B, N, d, seed):
    return _randn(B, N, d, seed=seed)


def test_softdtw_matches_dtw_of_the_cost_and_backprops_to_inputs():
    x = _series(2, 5, 3, 0).requires_grad_(True)
    y = _series(2, 4, 3, 1).requires_grad_(True)
    loss = smt.SoftDTW(0.5, reduction="none")
    C = ((x[:, :, None, :] - y[:, None, :, :]) ** 2).sum(-1)
    torch.testing.assert_close(loss(x, y), sm.dtw(C, gamma=0.5))
    assert gradcheck(lambda a, b: loss(a, b), (x, y))
    assert gradgradcheck(lambda a, b: loss(a, b), (x, y), fast_mode=True)


def test_softdtw_lengths_band_and_custom_cost():
    x, y = _series(2, 5, 2, 2), _series(2, 6, 2, 3)
    xl, yl = torch.tensor([5, 3]), torch.tensor([4, 6])
    l1 = smt.SoftDTW(0.3, reg="l2", band=2, cost=lambda a, b: torch.cdist(a, b), reduction="none")
    out = l1(x, y, xl, yl)
    expect = sm.dtw(torch.cdist(x, y), reg="l2", gamma=0.3, band=2, lengths=(xl, yl))
    torch.testing.assert_close(out, expect)
    # one series truncated: equals the loss on the sliced series
    l2 = smt.SoftDTW(gamma=0.5, reduction="none")
    torch.testing.assert_close(l2(x, y, xl, yl)[1], l2(x[1:, :3], y[1:, :6])[0])


def test_softdtw_divergence_unequal_lengths():
    x, y = _series(2, 5, 2, 4), _series(2, 7, 2, 5)
    xl, yl = torch.tensor([5, 2]), torch.tensor([7, 4])
    div = smt.SoftDTW(1.0, normalize=True, reduction="none")
    plain = smt.SoftDTW(1.0, reduction="none")
    out = div(x, y, xl, yl)
    for b in range(2):
        xb, yb = x[b:b + 1, :xl[b]], y[b:b + 1, :yl[b]]
        expect = plain(xb, yb) - 0.5 * (plain(xb, xb) + plain(yb, yb))
        torch.testing.assert_close(out[b:b + 1], expect)
    torch.testing.assert_close(div(x, x, xl, xl), torch.zeros(2, dtype=F64))
    assert div(x, y).dtype == F64 and div(x.float(), y.float()).dtype == torch.float32


def test_softdtw_rejects_bad_shapes():
    with pytest.raises(ValueError, match="x and y"):
        smt.SoftDTW()(_series(2, 5, 2, 0), _series(3, 5, 2, 1))
    with pytest.raises(ValueError, match="gamma"):
        smt.SoftDTW(gamma=0.0)
    with pytest.raises(TypeError, match="pass reg by name"):
        smt.SoftDTW("l2")
    with pytest.raises(ValueError, match="reduction"):
        smt.SoftDTW(reduction="avg")
    # 2-D inputs are never guessed: the message says how to reshape
    x2 = _series(1, 10, 3, 0)[0]
    with pytest.raises(ValueError, match=r"x\[None\] for one multivariate series.*x\[\.\.\., None\]"):
        smt.SoftDTW(0.1)(x2, x2)


def test_softdtw_gamma_first_and_reductions():
    """tslearn / pysdtw habit: SoftDTW(0.1); reductions over the batch."""
    x, y = _series(3, 5, 2, 6), _series(3, 4, 2, 7)
    per_pair = smt.SoftDTW(0.1, reduction="none")(x, y)
    assert per_pair.shape == (3,)
    torch.testing.assert_close(per_pair, sm.dtw(torch.cdist(x, y) ** 2, gamma=0.1))
    torch.testing.assert_close(smt.SoftDTW(0.1)(x, y), per_pair.mean())
    torch.testing.assert_close(smt.SoftDTW(0.1, reduction="sum")(x, y), per_pair.sum())
    # one pair: x[None]; univariate batch: x[..., None]
    torch.testing.assert_close(smt.SoftDTW(0.1)(x[0][None], y[0][None]), per_pair[0])
    u = smt.SoftDTW(0.1, reduction="none")(x[..., 0][..., None], y[..., 0][..., None])
    torch.testing.assert_close(u, sm.dtw((x[..., 0][:, :, None] - y[..., 0][:, None, :]) ** 2, gamma=0.1))


def test_viterbi_layer():
    theta = _rand(3, 5, 4, 4, seed=7).requires_grad_(True)
    lengths = torch.tensor([5, 3, 1])
    crf = smt.Viterbi()
    logZ = crf(theta, lengths)
    torch.testing.assert_close(logZ, sm.viterbi(theta, lengths=lengths))
    marg = crf.marginals(theta, lengths)
    assert marg.shape == (3, 5, 4)
    mask = (torch.arange(5)[None, :] < lengths[:, None]).to(F64)
    torch.testing.assert_close(marg.sum(-1), mask)
    (g,) = torch.autograd.grad(logZ.sum(), theta, create_graph=True)
    torch.testing.assert_close(g.sum(-1), marg)
    marg.pow(2).sum().backward()  # marginals are differentiable (HVP pass)
    assert theta.grad is not None and torch.isfinite(theta.grad).all()
    score, tags = crf.decode(theta, lengths)
    assert tags.shape == (3, 5) and tags.dtype == torch.int64 and (tags[2, 1:] == -1).all()
    assert torch.allclose(score, smt.Viterbi(reg="hard")(theta.detach(), lengths))


def test_large_results_held_by_torch_are_not_reused():
    """A result block of smoothmax._buffers viewed by a torch tensor (and the
    tensor saved for backward) stays its own until the tensor is gone."""
    from smoothmax import _buffers

    g = torch.Generator().manual_seed(0)
    theta = torch.randn((8, 64, 64, 64), dtype=torch.float64, generator=g)  # 16 MiB results
    assert theta.numel() * 8 >= _buffers.MIN_BYTES
    _, E1 = sm.viterbi_grad(theta)
    keep = E1.clone()
    th = theta.clone().requires_grad_()
    v = sm.viterbi(th).sum()
    (E2,) = torch.autograd.grad(v, th, create_graph=True)  # E saved inside the graph
    for _ in range(3):
        sm.viterbi_grad(theta + 1.0)  # results dropped at once: their blocks may be reused
        sm.viterbi_hvp(theta, theta)
    assert torch.equal(E1, keep) and torch.equal(E2.detach(), keep)
