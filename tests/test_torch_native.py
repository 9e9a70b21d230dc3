"""smoothmax's torch operators under torch.compile, torch.export, torch.func and meta tensors.

Oracles: the same models run eagerly (whose passes the rest of the suite checks
against brute force and finite differences), explicit Python loops over the
batch for vmap, torch.autograd for torch.func.grad, and the number of engine
calls. Compile tests use tiny shapes; inductor needs a C compiler.
"""
import ast
import pathlib
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import smoothmax as sm  # noqa: E402
from smoothmax import _dispatch, losses  # noqa: E402
from smoothmax.attention import StructuredAttention  # noqa: E402
from smoothmax.torch import SoftDTW, Viterbi  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1] / "smoothmax"


# ---------------------------------------------------------------------------
# models: each returns a scalar loss from inputs that are plain tensors


class DTWModel(torch.nn.Module):
    def __init__(self, normalize=False):
        super().__init__()
        self.lin = torch.nn.Linear(3, 3, dtype=torch.float64)
        self.loss = SoftDTW(gamma=0.5, normalize=normalize)

    def forward(self, x, y, lx, ly):
        return self.loss(self.lin(x), y, lx, ly).sum()


class TaggerModel(torch.nn.Module):
    """Emissions + transitions; ``kind`` picks the head: a Viterbi value or one of the losses."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.emit = torch.nn.Linear(4, 3, dtype=torch.float64)
        self.trans = torch.nn.Parameter(0.1 * torch.arange(9, dtype=torch.float64).reshape(3, 3))
        self.vit = Viterbi()

    def forward(self, x, tags, lengths):
        theta = self.emit(x)[..., :, None] + self.trans
        if self.kind == "viterbi":
            return self.vit(theta, lengths).sum()
        if self.kind == "marginals":
            return (self.vit.marginals(theta, lengths) ** 2).sum()
        if self.kind == "surrogate":
            return losses.viterbi_surrogate(theta, tags, lengths=lengths, cost="hamming").sum()
        return losses.viterbi_relaxed(theta, tags, lengths=lengths).sum()


class AlignModel(torch.nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.lin = torch.nn.Linear(3, 3, dtype=torch.float64)

    def forward(self, x, y, Y):
        C = sm.torch.squared_euclidean(self.lin(x), y)
        if self.kind == "surrogate":
            return losses.dtw_surrogate(C, Y).sum()
        return losses.dtw_relaxed(C, Y).sum()


class AttentionModel(torch.nn.Module):
    def __init__(self, reg):
        super().__init__()
        self.score = torch.nn.Linear(4, 1, dtype=torch.float64)
        self.att = StructuredAttention(reg=reg, dtype=torch.float64)

    def forward(self, x, lengths):
        ctx, _ = self.att(self.score(x)[..., 0], x, lengths)
        return (ctx ** 2).sum()


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _alignment(B, N, M, g):
    """A random monotone 0/1 alignment per item (one staircase from (0, 0) to (N-1, M-1))."""
    Y = torch.zeros(B, N, M, dtype=torch.float64)
    for b in range(B):
        i = j = 0
        Y[b, 0, 0] = 1
        while (i, j) != (N - 1, M - 1):
            moves = [(di, dj) for di, dj in ((1, 0), (0, 1), (1, 1)) if i + di < N and j + dj < M]
            di, dj = moves[int(torch.randint(len(moves), (1,), generator=g))]
            i, j = i + di, j + dj
            Y[b, i, j] = 1
    return Y


CASES = {
    "SoftDTW": lambda g: (DTWModel(), (torch.randn(3, 5, 3, generator=g, dtype=torch.float64),
                                       torch.randn(3, 4, 3, generator=g, dtype=torch.float64),
                                       torch.tensor([5, 3, 4]), torch.tensor([4, 4, 2]))),
    "SoftDTW-normalize": lambda g: (DTWModel(True), (torch.randn(2, 4, 3, generator=g, dtype=torch.float64),
                                                     torch.randn(2, 5, 3, generator=g, dtype=torch.float64),
                                                     None, None)),
    "Viterbi": lambda g: (TaggerModel("viterbi"), _tagger_inputs(g)),
    "Viterbi.marginals": lambda g: (TaggerModel("marginals"), _tagger_inputs(g)),
    "viterbi_surrogate": lambda g: (TaggerModel("surrogate"), _tagger_inputs(g)),
    "viterbi_relaxed": lambda g: (TaggerModel("relaxed"), _tagger_inputs(g)),
    "dtw_surrogate": lambda g: (AlignModel("surrogate"), _align_inputs(g)),
    "dtw_relaxed": lambda g: (AlignModel("relaxed"), _align_inputs(g)),
    "StructuredAttention": lambda g: (AttentionModel("negentropy"), _attention_inputs(g)),
    "StructuredAttention-l2": lambda g: (AttentionModel("l2"), _attention_inputs(g)),
}


def _tagger_inputs(g):
    return (torch.randn(3, 6, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (3, 6), generator=g),
            torch.tensor([6, 2, 4]))


def _align_inputs(g):
    return (torch.randn(2, 4, 3, generator=g, dtype=torch.float64),
            torch.randn(2, 5, 3, generator=g, dtype=torch.float64), _alignment(2, 4, 5, g))


def _attention_inputs(g):
    return torch.randn(2, 5, 4, generator=g, dtype=torch.float64), torch.tensor([5, 3])


def _eager_reference(name):
    torch.manual_seed(0)
    model, args = CASES[name](_gen())
    loss = model(*args)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return model, args, loss.detach(), grads


@pytest.fixture(scope="module", autouse=True)
def _inductor_warmed_up():
    """Compile a trivial function once: torch's own one-time import warnings are not ours."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.compile(lambda x: x * 2, backend="inductor")(torch.ones(2))
    yield


# ---------------------------------------------------------------------------
# graph breaks, compile, export


@pytest.mark.parametrize("name", sorted(CASES))
def test_no_graph_break(name):
    torch._dynamo.reset()
    model, args = CASES[name](_gen())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ex = torch._dynamo.explain(model)(*args)
    assert ex.graph_break_count == 0, [str(r.reason)[:200] for r in ex.break_reasons]
    assert ex.graph_count == 1
    assert not caught, [str(w.message)[:200] for w in caught]


@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_compile_fullgraph_matches_eager(name, backend):
    model, args, loss_ref, grads_ref = _eager_reference(name)
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = torch.compile(model, backend=backend, fullgraph=True)
        for _ in range(2):  # the second call runs the cached graph
            loss = compiled(*args)
            grads = torch.autograd.grad(loss, list(model.parameters()))
            torch.testing.assert_close(loss.detach(), loss_ref)
            for g, r in zip(grads, grads_ref):
                torch.testing.assert_close(g, r)
    assert not caught, [str(w.message)[:200] for w in caught]


def test_first_call_may_be_a_compiled_one():
    """In a fresh process (torch imported first), the first smoothmax call traced by
    torch.compile(fullgraph=True) finds the operators registered."""
    import subprocess
    import sys

    code = ("import torch, smoothmax as sm\n"
            "f = torch.compile(lambda t: sm.dtw(t).sum(), fullgraph=True, backend='eager')\n"
            "t = torch.rand(2, 3, 4, dtype=torch.float64)\n"
            "assert torch.allclose(f(t), sm.dtw(t).sum())\n")
    env = dict(__import__("os").environ, PYTHONPATH=str(ROOT.parent))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]


def test_compiled_step_runs_one_engine_pass_per_call(engine_calls):
    """A compiled SoftDTW training step: one grad pass forward, no HVP pass in backward."""
    calls = engine_calls
    model, args = CASES["SoftDTW"](_gen())
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    compiled(*args).backward()
    calls.clear()
    compiled(*args).backward()
    assert calls == ["grad"]


def test_data_checks_run_inside_the_compiled_graph():
    """NaN costs and out-of-range lengths raise under compile, with the eager messages."""
    model, (x, y, lx, ly) = CASES["SoftDTW"](_gen())
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    compiled(x, y, lx, ly)
    bad = x.clone()
    bad[1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match="theta must not contain NaN"):
        compiled(bad, y, lx, ly)
    with pytest.raises(ValueError, match=r"lengths\[0\] \(len_a\) must be integers in \[1, 5\], got 6"):
        compiled(x, y, torch.tensor([5, 6, 1]), ly)
    with pytest.raises(ValueError, match=r"lengths\[1\] \(len_b\) must be integers in \[1, 4\], got 0"):
        compiled(x, y, lx, torch.tensor([1, 0, 1]))
    tagger, (xt, tags, lengths) = CASES["viterbi_surrogate"](_gen())
    compiled = torch.compile(tagger, backend="aot_eager", fullgraph=True)
    compiled(xt, tags, lengths)
    bad_tags = tags.clone()
    bad_tags[0, 3] = 7
    with pytest.raises(ValueError, match=r"tags must be integers in \[0, 3\) before each length, got 7"):
        compiled(xt, bad_tags, lengths)
    bad_tags[0, 3] = 0
    bad_tags[1, 4] = 9  # past the length 2 of item 1: ignored
    compiled(xt, bad_tags, lengths)


def test_export_softdtw_loss_model():
    model, args, loss_ref, _ = _eager_reference("SoftDTW")
    ep = torch.export.export(model, args)
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "smoothmax.dtw_grad.default" in targets or "smoothmax.dtw_value.default" in targets, targets
    torch.testing.assert_close(ep.module()(*args), loss_ref)
    g = _gen(5)
    other = (torch.randn(3, 5, 3, generator=g, dtype=torch.float64),
             torch.randn(3, 4, 3, generator=g, dtype=torch.float64), torch.tensor([2, 5, 1]),
             torch.tensor([4, 1, 3]))
    torch.testing.assert_close(ep.module()(*other), model(*other).detach())


class ViterbiHead(torch.nn.Module):
    """A tagger that returns the log-partition, the unary marginals and the best tags."""

    def __init__(self):
        super().__init__()
        self.emit = torch.nn.Linear(4, 3, dtype=torch.float64)
        self.trans = torch.nn.Parameter(torch.randn(3, 3, dtype=torch.float64, generator=_gen(3)))
        self.vit = Viterbi()

    def forward(self, x, lengths):
        theta = self.emit(x)[..., :, None] + self.trans
        score, tags = self.vit.decode(theta, lengths)
        return self.vit(theta, lengths), self.vit.marginals(theta, lengths), score, tags


def test_export_viterbi_head():
    torch.manual_seed(0)
    model = ViterbiHead()
    x, _, lengths = _tagger_inputs(_gen(1))
    with torch.no_grad():
        ref = model(x, lengths)
        ep = torch.export.export(model, (x, lengths))
        out = ep.module()(x, lengths)
    assert len(out) == len(ref)
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r)
    assert out[3].dtype == torch.int64 and (out[3][1, 2:] == -1).all()


# ---------------------------------------------------------------------------
# torch.func, meta tensors, the operators themselves


@pytest.mark.parametrize("name", ["dtw", "viterbi"])
def test_func_grad_and_grad_of_grad(name):
    g = _gen(2)
    theta = torch.randn(*((2, 4, 5) if name == "dtw" else (2, 4, 3, 3)), generator=g, dtype=torch.float64)
    f = getattr(sm, name)

    def loss(t):
        return (f(t) ** 2).sum()

    gr = torch.func.grad(loss)(theta)
    t = theta.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(loss(t), t, create_graph=True)
    torch.testing.assert_close(gr, ref.detach())
    # grad of (grad · W): the HVP pass, against autograd's double backward
    W = torch.randn(theta.shape, generator=g, dtype=torch.float64)
    hv = torch.func.grad(lambda u: (torch.func.grad(loss)(u) * W).sum())(theta)
    (ref2,) = torch.autograd.grad((ref * W).sum(), t)
    torch.testing.assert_close(hv, ref2)


@pytest.mark.parametrize("name", ["dtw", "viterbi"])
def test_func_vmap_matches_a_loop(name):
    g = _gen(4)
    shape = (3, 2, 4, 5) if name == "dtw" else (3, 2, 4, 3, 3)
    theta = torch.randn(shape, generator=g, dtype=torch.float64)
    Z = torch.randn(shape, generator=g, dtype=torch.float64)
    if name == "dtw":
        lengths = (torch.tensor([4, 2]), torch.tensor([3, 5]))
        kw = dict(lengths=lengths)
    else:
        kw = dict(lengths=torch.tensor([4, 2]))
    f, f_grad, f_hvp = getattr(sm, name), getattr(sm, name + "_grad"), getattr(sm, name + "_hvp")
    dec = sm.dtw_path if name == "dtw" else sm.viterbi_decode
    torch.testing.assert_close(torch.func.vmap(lambda t: f(t, **kw))(theta),
                               torch.stack([f(t, **kw) for t in theta]))
    vv, vE = torch.func.vmap(lambda t: f_grad(t, **kw))(theta)
    torch.testing.assert_close(vE, torch.stack([f_grad(t, **kw)[1] for t in theta]))
    torch.testing.assert_close(torch.func.vmap(lambda t, z: f_hvp(t, z, **kw))(theta, Z),
                               torch.stack([f_hvp(t, z, **kw) for t, z in zip(theta, Z)]))
    s, p = torch.func.vmap(lambda t: dec(t, **kw))(theta)
    for k, t in enumerate(theta):
        torch.testing.assert_close(p[k], dec(t, **kw)[1])
    # per-example gradients: vmap of grad
    pe = torch.func.vmap(torch.func.grad(lambda t: f(t, **kw).sum()))(theta)
    torch.testing.assert_close(pe, vE)


def test_meta_tensors():
    theta = torch.empty(2, 7, 5, 6, device="meta", dtype=torch.float32)
    v, E = sm.dtw_grad(theta)
    assert v.device.type == "meta" and v.shape == (2, 7) and v.dtype == torch.float32
    assert E.shape == theta.shape and E.device.type == "meta"
    assert sm.dtw_hvp(theta, torch.empty_like(theta)).shape == theta.shape
    vt = torch.empty(3, 4, 2, 2, device="meta", dtype=torch.float64)
    score, tags = sm.viterbi_decode(vt, lengths=torch.tensor([4, 1, 2], device="meta"))
    assert score.shape == (3,) and tags.shape == (3, 4) and tags.dtype == torch.int64
    loss = SoftDTW(reduction="none")(torch.empty(2, 5, 3, device="meta"), torch.empty(2, 4, 3, device="meta"))
    assert loss.shape == (2,) and loss.device.type == "meta"
    t = torch.empty(2, 5, 4, device="meta", requires_grad=True)
    sm.dtw(t).sum().backward()
    assert t.grad.shape == t.shape and t.grad.device.type == "meta"


def test_opcheck():
    """torch.library.opcheck: schema, fake and autograd registrations agree with the real ops."""
    g = _gen(6)
    theta = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    Z = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    la, lb = torch.tensor([3, 2]), torch.tensor([4, 1])
    ops = torch.ops.smoothmax
    tests = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(ops.dtw_grad, (theta.requires_grad_(True), la, lb, -1, "negentropy", 1.0),
                          test_utils=tests)
    torch.library.opcheck(ops.dtw_value, (theta, None, lb, 1, "l2", 0.5), test_utils=tests)
    torch.library.opcheck(ops.dtw_hvp, (theta, Z.requires_grad_(True), la, lb, -1, "negentropy", 1.0),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(ops.dtw_path, (theta.detach(), la, lb, -1), test_utils=tests)
    vt = torch.randn(2, 3, 2, 2, generator=g, dtype=torch.float32)
    torch.library.opcheck(ops.viterbi_grad, (vt.requires_grad_(True), torch.tensor([3, 1]), "negentropy", 1.0),
                          test_utils=tests)
    torch.library.opcheck(ops.viterbi_decode, (vt.detach(), None), test_utils=tests)
    graph = sm.DAG.for_dtw(3, 3)[0]
    w = torch.randn(2, graph.n_edges, generator=g, dtype=torch.float64)
    torch.library.opcheck(ops.dag_grad, (w.requires_grad_(True), torch.tensor(graph.indptr),
                                         torch.tensor(graph.parents), "negentropy", 1.0), test_utils=tests)


def test_operator_path_and_eager_path_agree():
    """The dispatcher route (used while tracing) and the direct eager route give the same results."""
    from smoothmax import torch as smt

    g = _gen(7)
    theta = torch.randn(3, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    G = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    la, lb = torch.tensor([5, 2, 3]), torch.tensor([4, 4, 1])
    args = (la, lb, 1, "negentropy", 0.7)
    outs = []
    for route in ("op", "eager"):
        call = smt._OPS["dtw", "grad"] if route == "op" else (lambda *a: smt._call("dtw", "grad", *a))
        v, E = call(theta, *args)
        (gE,) = torch.autograd.grad((E * G).sum(), theta, retain_graph=True)
        (g,) = torch.autograd.grad(v.sum(), theta, create_graph=True)
        (h,) = torch.autograd.grad((g * G).sum(), theta)
        outs.append((v, E, gE, g, h))
    torch.testing.assert_close(outs[0][2], outs[0][4])  # both are the HVP with G
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b)


def test_third_order_raises_through_the_operator():
    theta = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    v, E = torch.ops.smoothmax.dtw_grad(theta, None, None, -1, "negentropy", 1.0)
    (g,) = torch.autograd.grad((E ** 2).sum(), theta, create_graph=True)
    with pytest.raises(RuntimeError, match="third-order derivatives are not supported"):
        torch.autograd.grad(g.sum(), theta)


# ---------------------------------------------------------------------------
# layering


def _imports(path):
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            found.append(("." * node.level) + (node.module or ""))
            found.extend(("." * node.level) + a.name for a in node.names if node.module is None)
        elif isinstance(node, ast.Import):
            found.extend(a.name for a in node.names)
    return found


def test_dispatch_layer_imports_no_framework_adapter():
    for name in ("_problem.py", "_dispatch.py", "_array_api.py", "_validation.py"):
        mods = _imports(ROOT / name)
        bad = [m for m in mods if m.split(".")[-1] in ("torch", "jax") or m.startswith(("torch", "jax"))]
        assert not bad, (name, bad)


def test_engines_import_nothing_from_the_layers_above():
    above = {"_problem", "_dispatch", "_validation", "dtw", "viterbi", "dag", "losses", "sampling",
             "attention", "torch", "jax", "smooth", "crf"}
    engines = [ROOT / "_reference.py", ROOT / "_reference_dag.py", *sorted((ROOT / "_core").glob("*.pyx")),
               *sorted((ROOT / "_cuda").glob("*.py"))]
    for path in engines:
        text = path.read_text()
        mods = _imports(path) if path.suffix == ".py" else [
            line.split()[1] for line in text.splitlines()
            if line.strip().startswith(("from ", "import ")) and len(line.split()) > 1]
        package_level = 1 if path.parent == ROOT else 2  # the dots that name the smoothmax package
        bad = [m for m in mods
               if (len(m) - len(m.lstrip(".")) == package_level or m.startswith("smoothmax."))
               and m.lstrip(".").replace("smoothmax.", "", 1).split(".")[0] in above]
        assert not bad, (path.name, bad)


def test_unlisted_backend_raises():
    with pytest.raises(ValueError, match="no engine for cupy arrays on a cpu device"):
        _dispatch.engine_for("cupy", "cpu")
    assert _dispatch.engine_for("generic", "cpu").name == "reference"
    assert _dispatch.engine_for("torch", "cpu").name.startswith(("compiled", "reference"))


def test_engine_choice_reads_the_capability_table(monkeypatch):
    """Changing CAPABILITIES changes the engine: the table is the one source."""
    _dispatch.engine_for.cache_clear()
    _dispatch._engine_function.cache_clear()
    monkeypatch.setitem(_dispatch.CAPABILITIES, ("numpy", "cpu"),
                        dict(_dispatch.CAPABILITIES["numpy", "cpu"], engine="reference"))
    try:
        assert _dispatch.engine_for("numpy", "cpu").name == "reference"
        theta = np.random.default_rng(0).random((2, 3, 4))
        v = sm.dtw(theta)
        from smoothmax import _reference

        np.testing.assert_allclose(v, _reference.dtw_value(theta, np.full(2, 3), np.full(2, 4), -1, 0, 1.0))
    finally:
        monkeypatch.undo()
        _dispatch.engine_for.cache_clear()
        _dispatch._engine_function.cache_clear()
    assert _dispatch.engine_for("numpy", "cpu").name == (
        "compiled" if _dispatch.compiled_available() else "reference (compiled core not built)")
