"""smoothmax.jax natively in XLA programs: the FFI custom call, batch sharding,
``shard_map`` and data-parallel training over two host devices.

Two host devices need ``XLA_FLAGS=--xla_force_host_platform_device_count=2``
before JAX starts, so those checks run ``tests/jax_two_devices.py`` in a
subprocess (with JAX's defaults: float32, int32 lengths), once through the
FFI call and once through the host callback, and assert on what it observed: no all-gather in the compiled HLO, the batch sizes the compiled
engine received (3 + 3 for a batch of 6, never 6), agreement with the NumPy
API and with the same training steps on one device.

In this process (x64 on): the FFI path against the host-callback path and the
NumPy API for every structure and op, under ``jit`` and ``vmap``; errors of the
engine reach the caller with their message.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="JAX is not installed")
jax.config.update("jax_enable_x64", True)  # tests only

import jax.numpy as jnp  # noqa: E402

import smoothmax as sm  # noqa: E402
from smoothmax import jax as smj  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

try:
    from smoothmax._core import xla_ffi  # noqa: F401

    HAVE_FFI = True
except ImportError:
    HAVE_FFI = False


def test_ffi_built_when_required():
    """CI (``SMOOTHMAX_REQUIRE_XLA_FFI=1``) builds the handlers: their tests must run, not skip."""
    if os.environ.get("SMOOTHMAX_REQUIRE_XLA_FFI") == "1":
        assert HAVE_FFI, "SMOOTHMAX_REQUIRE_XLA_FFI=1 but smoothmax._core.xla_ffi is not built"
        assert smj.cpu_path() == "ffi"


needs_ffi = pytest.mark.skipif(not HAVE_FFI, reason="the XLA FFI handlers were not built "
                               "(smoothmax._core.xla_ffi: JAX's headers absent at build time)")


# ---------------------------------------------------------------------------
# two devices (subprocess)


def _run_two_devices(path):
    # the two devices are host devices: on a machine with a GPU, JAX's default
    # platform would otherwise be the one GPU
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               SMOOTHMAX_JAX_FFI="1" if path == "ffi" else "0")
    env.pop("JAX_ENABLE_X64", None)
    res = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "jax_two_devices.py")],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["devices"] == 2 and out["x64"] is False
    assert out["path"] == path
    out["remat_warnings"] = res.stderr.count("Involuntary full rematerialization")
    return out


_TWO_DEVICE_RUNS = {}


@pytest.fixture(scope="module", params=["ffi", "pure_callback"])
def any_path(request):
    """The two-device checks through the FFI call, then through the host callback."""
    if request.param == "ffi" and not HAVE_FFI:
        pytest.skip("the XLA FFI handlers were not built")
    if request.param not in _TWO_DEVICE_RUNS:
        _TWO_DEVICE_RUNS[request.param] = _run_two_devices(request.param)
    return _TWO_DEVICE_RUNS[request.param]


@pytest.fixture(scope="module")
def two_devices():
    """The two-device checks through the FFI call."""
    if "ffi" not in _TWO_DEVICE_RUNS:
        _TWO_DEVICE_RUNS["ffi"] = _run_two_devices("ffi")
    return _TWO_DEVICE_RUNS["ffi"]


def test_jit_over_batch_sharded_theta_through_the_callback_gathers(any_path):
    """The fallback is correct under sharding but gathers (docs/jax-sharding.md says so)."""
    for struct in ("dtw", "viterbi"):
        r = any_path[f"jit_{struct}"]
        assert r["value_ok"] and r["values_ok"] and r["grad_ok"] and r["hvp_ok"]
        if any_path["path"] == "pure_callback":
            # the gather is read off the compiled HLO; XLA's "[SPMD] Involuntary
            # full rematerialization" warning that goes with it is not printed by
            # every jaxlib (0.11.2 on a GPU machine printed none), so it is not asserted
            assert r["all_gather"]
            if any_path["compiled"]:
                assert r["grad_calls"] == [[f"{struct}_grad", 6]]
    assert any_path["jit_decode"]["ok"]


@needs_ffi
@pytest.mark.parametrize("struct", ["dtw", "viterbi"])
def test_jit_over_batch_sharded_theta_runs_per_shard(two_devices, struct):
    r = two_devices[f"jit_{struct}"]
    assert two_devices["path"] == "ffi"
    assert two_devices["remat_warnings"] == 0  # XLA's "[SPMD] Involuntary full rematerialization"
    # no gather, each device's engine call saw its own 3 items (per-item lengths sliced alike)
    assert not r["all_gather"] and not r["hvp_all_gather"]
    assert r["grad_calls"] == [[f"{struct}_grad", 3]] * 2
    assert r["hvp_calls"] == [[f"{struct}_hvp", 3]] * 2
    assert r["grad_spec"].startswith("P('b'")
    assert r["value_ok"] and r["values_ok"] and r["grad_ok"] and r["hvp_ok"]


@needs_ffi
def test_jit_decode_over_batch_sharded_theta(two_devices):
    r = two_devices["jit_decode"]
    assert r["ok"] and r["tags_dtype"] == "int32"  # x64 off: JAX's canonical integer type
    assert r["calls"] == [["viterbi_decode", 3]] * 2


@pytest.mark.parametrize("order", ["grad", "grad_of_grad"])
def test_grad_inside_shard_map(any_path, order):
    r = any_path[f"shard_map_{order}"]
    assert r["ok"]
    if any_path["compiled"]:
        assert {b for _, b in r["calls"]} == {3}


@pytest.mark.parametrize("model", ["soft_dtw", "crf"])
def test_data_parallel_training_matches_one_device(any_path, model):
    r = any_path[f"train_{model}"]
    assert r["grads_ok"] and r["params_ok"]
    if model == "soft_dtw":
        assert r["shard_map_step_ok"]
    assert r["losses"][-1] < r["losses"][0]  # it trains
    if any_path["path"] == "ffi":
        assert {b for _, b in r["calls_sharded"]} == {4} and len(r["calls_sharded"]) == 2
    if any_path["compiled"]:
        assert {b for _, b in r["calls_single"]} == {8}


# ---------------------------------------------------------------------------
# one device: the FFI call against the host callback and the NumPy API


def _cases(rng, dtype):
    graph, _ = sm.DAG.from_edges([(0, 1), (0, 2), (1, 2), (1, 3), (2, 3)], 4)
    return {
        "dtw": (rng.random((3, 5, 4)).astype(dtype), sm.dtw, sm.dtw_grad, sm.dtw_hvp,
                dict(lengths=([5, 4, 2], [4, 4, 3]), band=1, reg="l2", gamma=0.6),
                lambda t: sm.dtw_path(t, lengths=([5, 4, 2], [4, 4, 3]), band=1)),
        "viterbi": (rng.standard_normal((3, 4, 3, 3)).astype(dtype), sm.viterbi, sm.viterbi_grad,
                    sm.viterbi_hvp, dict(lengths=[4, 1, 3], gamma=0.8),
                    lambda t: sm.viterbi_decode(t, lengths=[4, 1, 3])),
        "dag": (rng.standard_normal((3, graph.n_edges)).astype(dtype),
                lambda w, **k: sm.dag(w, graph, **k), lambda w, **k: sm.dag_grad(w, graph, **k),
                lambda w, z, **k: sm.dag_hvp(w, z, graph, **k), dict(gamma=0.9),
                lambda w: sm.dag_path(w, graph)),
    }


def _run_all(theta, Z, value, grad, hvp, kw, decode):
    t, z = jnp.asarray(theta), jnp.asarray(Z)
    f = jax.jit(lambda x: value(x, **kw))
    g = jax.jit(jax.grad(lambda x: value(x, **kw).sum()))
    h = jax.jit(lambda x, d: jax.jvp(jax.grad(lambda y: value(y, **kw).sum()), (x,), (d,))[1])
    vm = jax.jit(jax.vmap(lambda x: grad(x, **kw)))
    return {
        "value": f(t), "grad": g(t), "hvp": h(t, z), "hvp_op": jax.jit(lambda x, d: hvp(x, d, **kw))(t, z),
        "vmap_value": vm(jnp.stack([t, 2 * t]))[0], "vmap_E": vm(jnp.stack([t, 2 * t]))[1],
        "decode": jax.jit(decode)(t),
    }


@needs_ffi
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("struct", ["dtw", "viterbi", "dag"])
def test_ffi_matches_callback_and_numpy(struct, dtype, monkeypatch):
    rng = np.random.default_rng(1)
    theta, value, grad, hvp, kw, decode = _cases(rng, dtype)[struct]
    Z = rng.standard_normal(theta.shape).astype(dtype)
    assert smj.cpu_path() == "ffi"
    ffi = _run_all(theta, Z, value, grad, hvp, kw, decode)
    monkeypatch.setenv("SMOOTHMAX_JAX_FFI", "0")
    assert smj.cpu_path() == "pure_callback"
    cb = _run_all(theta, Z, value, grad, hvp, kw, decode)
    v_np, E_np = grad(theta, **kw)
    v2, E2 = grad(2 * theta, **kw)
    ref = {"value": v_np, "grad": E_np, "hvp": hvp(theta, Z, **kw), "hvp_op": hvp(theta, Z, **kw),
           "vmap_value": np.stack([v_np, v2]), "vmap_E": np.stack([E_np, E2])}
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    for key, want in ref.items():
        assert ffi[key].dtype == dtype, key
        np.testing.assert_allclose(ffi[key], want, **tol, err_msg=key)
        np.testing.assert_allclose(cb[key], want, **tol, err_msg=key)
    for a, b, c in zip(ffi["decode"], cb["decode"], decode(theta)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, c)


@needs_ffi
def test_ffi_engine_error_reaches_the_caller():
    theta = np.zeros((2, 3, 2, 2))
    theta[1, 2, 0, 1] = np.nan  # found by the compiled Viterbi kernels inside the call
    # on the host: the compiled CPU kernels are the ones that check for NaN
    t = jax.device_put(theta, jax.devices("cpu")[0])
    with pytest.raises(Exception, match="NaN"):
        jax.block_until_ready(jax.jit(sm.viterbi)(t))


@needs_ffi
def test_ffi_eager_and_jit_leave_inputs_alone():
    rng = np.random.default_rng(2)
    theta = rng.random((2, 4, 4))
    t = jnp.asarray(theta)
    v, E = sm.dtw_grad(t)
    v2, E2 = jax.jit(sm.dtw_grad)(t)
    np.testing.assert_array_equal(np.asarray(t), theta)
    np.testing.assert_allclose(v, v2, rtol=1e-12)
    np.testing.assert_allclose(E, E2, rtol=1e-12)


@needs_ffi
def test_cuda_handler_body_on_the_kernel_emulation(rng):
    """The CUDA handler's body (``xla_ffi._execute`` with the GPU engine's functions,
    results copied into XLA's buffers) on the CPU emulation of the CUDA kernels,
    NumPy arrays standing in for CuPy ones: vmapped leading axes, int32 lengths
    as operands or as attributes (the ``shard_map`` form), against the NumPy API."""
    import types

    from smoothmax._core import xla_ffi
    from smoothmax._cuda import emulate, engine

    if not emulate.available():
        pytest.skip("no C++20 compiler for the CUDA kernel emulation")
    emu = emulate.EmulatedBackend()
    gpu = types.SimpleNamespace(
        dtw_grad=lambda t, la, lb, band, reg, g: engine.dtw_run(emu, t, None, la, lb, band, reg, g, 1),
        dtw_hvp=lambda t, z, la, lb, band, reg, g: engine.dtw_run(emu, t, z, la, lb, band, reg, g, 2),
        viterbi_value=lambda t, L, reg, g: engine.vit_run(emu, t, None, L, reg, g, 0),
        viterbi_decode=lambda t, L: engine.vit_decode_run(emu, t, L),
    )
    DTW, VITERBI = 0, 1
    theta = rng.random((2, 2, 5, 4))  # (vmapped, B, NA, NB)
    Z = rng.standard_normal(theta.shape)
    la, lb = np.array([[5, 3], [4, 5]], np.int32), np.array([[4, 4], [2, 3]], np.int32)
    kw = dict(lengths=(la, lb), band=1, gamma=0.7)
    attrs = {"reg": 0, "gamma": 0.7, "band": 1}
    v, E = np.empty((2, 2)), np.empty(theta.shape)
    xla_ffi._execute(DTW, [theta, la, lb], [v, E], dict(attrs, op="grad"), np, gpu)
    v_np, E_np = sm.dtw_grad(theta, **kw)
    np.testing.assert_allclose(v, v_np, rtol=1e-10)
    np.testing.assert_allclose(E, E_np, atol=1e-10)
    Ed = np.empty(theta.shape)
    xla_ffi._execute(DTW, [theta, Z], [Ed], dict(attrs, op="hvp", int0=la, int1=lb), np, gpu)
    np.testing.assert_allclose(Ed, sm.dtw_hvp(theta, Z, **kw), atol=1e-10)

    scores = rng.standard_normal((3, 4, 3, 3))
    L = np.array([4, 2, 1], np.int32)
    value, score, tags = np.empty(3), np.empty(3), np.empty((3, 4), np.int32)
    xla_ffi._execute(VITERBI, [scores, L], [value], {"op": "value", "reg": 1, "gamma": 0.5}, np, gpu)
    np.testing.assert_allclose(value, sm.viterbi(scores, lengths=L, reg="l2", gamma=0.5), rtol=1e-10)
    xla_ffi._execute(VITERBI, [scores, L], [score, tags], {"op": "decode"}, np, gpu)
    s_np, t_np = sm.viterbi_decode(scores, lengths=L)
    np.testing.assert_allclose(score, s_np, rtol=1e-12)
    np.testing.assert_array_equal(tags, t_np)
    with pytest.raises(ValueError, match="no viterbi op 'hvp'"):
        xla_ffi._execute(VITERBI, [scores, scores, L], [value], {"op": "hvp", "reg": 0, "gamma": 1.0}, np, gpu)
    # the GPU kernels do not check their input: the handler does, as the NumPy API
    # (found on an H200: a NaN reached them silently under jax.jit)
    for bad, name in ((np.nan, "NaN"), (np.inf, r"\+inf")):
        s2 = scores.copy()
        s2[1, 0, 2, 1] = bad
        with pytest.raises(ValueError, match=f"theta must not contain {name}"):
            xla_ffi._execute(VITERBI, [s2, L], [value], {"op": "value", "reg": 0, "gamma": 1.0}, np, gpu)
        with pytest.raises(ValueError, match=f"theta must not contain {name}"):
            xla_ffi._execute(VITERBI, [s2, L], [score, tags], {"op": "decode"}, np, gpu)
    t2 = theta.copy()
    t2[0, 1, 2, 2] = -np.inf
    with pytest.raises(ValueError, match="theta must not contain -inf"):
        xla_ffi._execute(DTW, [t2, la, lb], [v, E], dict(attrs, op="grad"), np, gpu)
    t2[0, 1, 2, 2] = np.inf  # a forbidden cell: allowed
    xla_ffi._execute(DTW, [t2, la, lb], [v, E], dict(attrs, op="grad"), np, gpu)
    Z2 = Z.copy()
    Z2[1, 0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="Z must not contain"):
        xla_ffi._execute(DTW, [theta, Z2], [Ed], dict(attrs, op="hvp", int0=la, int1=lb), np, gpu)


def _cuda_available():
    from smoothmax import _cuda

    return _cuda.available()


def _jax_gpu():
    try:
        return jax.devices("gpu")[0]
    except RuntimeError:
        return None


@pytest.mark.gpu
@needs_ffi
@pytest.mark.skipif(_jax_gpu() is None, reason="JAX sees no GPU")
@pytest.mark.skipif(not _cuda_available(), reason="CuPy sees no GPU (the CUDA handlers run the CuPy engine)")
@pytest.mark.parametrize("struct", ["dtw", "viterbi"])
def test_jax_gpu_arrays_run_the_cuda_kernels_in_place(struct, rng):
    """On a GPU: the CUDA handler, no host callback in the compiled program,
    results on the GPU equal to the NumPy API's (eager and under jit)."""
    assert smj.gpu_path() == "ffi", "the CUDA handlers are registered when CuPy sees a GPU"
    if struct == "dtw":
        theta, kw, grad = rng.random((4, 33, 40)), dict(lengths=([33, 20, 5, 33], [40, 40, 3, 30])), sm.dtw_grad
    else:
        theta, kw, grad = rng.standard_normal((4, 9, 5, 5)), dict(lengths=[9, 3, 1, 8]), sm.viterbi_grad
    t = jax.device_put(jnp.asarray(theta), _jax_gpu())
    v_np, E_np = grad(theta, **kw)
    f = jax.jit(lambda x: grad(x, **kw))
    text = f.lower(t).compile().as_text()
    assert f"smoothmax_{struct}" in text and "callback" not in text.lower()
    for v, E in (f(t), grad(t, **kw)):
        assert next(iter(E.devices())).platform == "gpu"
        np.testing.assert_allclose(np.asarray(v), v_np, rtol=1e-10)
        np.testing.assert_allclose(np.asarray(E), E_np, atol=1e-10)


@needs_ffi
def test_jax_export_with_the_custom_call_check_disabled():
    theta = np.random.default_rng(3).random((2, 4, 3))
    f = jax.jit(jax.grad(lambda t: sm.dtw(t, gamma=0.5).sum()))
    check = jax.export.DisabledSafetyCheck.custom_call("smoothmax_dtw")
    exported = jax.export.export(f, disabled_checks=[check])(jnp.asarray(theta))
    assert "smoothmax_dtw" in exported.mlir_module()
    np.testing.assert_allclose(exported.call(jnp.asarray(theta)), sm.dtw_grad(theta, gamma=0.5)[1],
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("struct", ["dtw", "viterbi", "dag"])
def test_compiled_engine_out_arrays_over_dirty_memory(struct, rng):
    """``out=`` (how the FFI handler hands XLA's buffers to the core): results written
    whole into NaN-filled arrays, zeros where masked, equal to the allocating call."""
    core = pytest.importorskip(f"smoothmax._core.{struct}", reason="compiled core not built")
    B = 3
    if struct == "dtw":
        theta = rng.random((B, 5, 4))
        fixed = (np.array([5, 3, 2]), np.array([4, 4, 1]), 1)
    elif struct == "viterbi":
        theta = rng.standard_normal((B, 4, 3, 3))
        fixed = (np.array([4, 2, 1]),)
    else:
        graph, _ = sm.DAG.from_edges([(0, 1), (0, 2), (1, 2), (1, 3), (2, 3)], 4)
        theta = rng.standard_normal((B, graph.n_edges))
        fixed = (graph.indptr, graph.parents)
    Z = rng.standard_normal(theta.shape)
    for op, args in (("value", (theta,)), ("grad", (theta,)), ("hvp", (theta, Z))):
        fn = getattr(core, f"{struct}_{op}")
        want = fn(*args, *fixed, 0, 0.8)
        want = want if isinstance(want, tuple) else (want,)
        out = (np.full(B, np.nan), np.full(theta.shape, np.nan) if op != "value" else None,
               np.full(theta.shape, np.nan) if op == "hvp" else None)
        got = fn(*args, *fixed, 0, 0.8, out=out)
        got = got if isinstance(got, tuple) else (got,)
        for g, w, o in zip(got, want, out):
            assert o is None or g is o  # written in place
            np.testing.assert_array_equal(g, w)
