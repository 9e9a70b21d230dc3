"""Checks of smoothmax.jax on two host devices, run by ``tests/test_jax_sharding.py``.

Run in a subprocess (``XLA_FLAGS=--xla_force_host_platform_device_count=2``
must be set before JAX starts) with JAX's defaults (float32, x64 off: the
lengths reach the engine as int32). Prints one JSON object: for each check,
what was observed (collectives in the compiled HLO, the batch sizes the
compiled engine received per call, agreement with the NumPy API or with the
same computation on one device); the test asserts on it.
"""
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

import smoothmax as sm
import smoothmax.jax as smj
from smoothmax import losses
from smoothmax._dispatch import compiled_available

CALLS = []


def _spy(module, name):
    real = getattr(module, name)

    def wrapper(theta, *args, **kw):
        CALLS.append([name, int(theta.shape[0])])
        return real(theta, *args, **kw)

    setattr(module, name, wrapper)


if compiled_available():  # the engine calls are counted on the compiled core's entry points
    from smoothmax._core import dtw as core_dtw
    from smoothmax._core import viterbi as core_viterbi

    for _mod, _struct in ((core_dtw, "dtw"), (core_viterbi, "viterbi")):
        for _op in ("value", "grad", "hvp"):
            _spy(_mod, f"{_struct}_{_op}")
    _spy(core_viterbi, "viterbi_decode")


def close(a, b, tol=2e-5):
    return bool(np.allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol))


def main():
    mesh = jax.make_mesh((2,), ("b",))
    batch = NamedSharding(mesh, P("b"))
    replicated = NamedSharding(mesh, P())
    rng = np.random.default_rng(0)
    out = {"devices": len(jax.devices()), "path": smj.cpu_path(), "x64": jax.config.jax_enable_x64,
           "compiled": compiled_available()}

    # 1. jit over a batch-sharded theta (B = 6: 3 per device), per-item lengths
    la, lb = np.array([7, 6, 5, 7, 3, 4]), np.array([5, 5, 4, 3, 5, 2])
    L = np.array([5, 4, 3, 2, 1, 5])
    dtw_kw = dict(lengths=(la, lb), band=2, gamma=0.5)
    vit_kw = dict(lengths=L, gamma=0.7)
    cases = {
        "dtw": (rng.random((6, 7, 5)).astype(np.float32), sm.dtw, sm.dtw_grad, sm.dtw_hvp, dtw_kw),
        "viterbi": (rng.standard_normal((6, 5, 3, 3)).astype(np.float32), sm.viterbi,
                    sm.viterbi_grad, sm.viterbi_hvp, vit_kw),
    }
    for name, (theta, value, grad, hvp, kw) in cases.items():
        Z = rng.standard_normal(theta.shape).astype(np.float32)
        v_np, E_np = grad(theta, **kw)
        H_np = hvp(theta, Z, **kw)
        ts, zs = jax.device_put(theta, batch), jax.device_put(Z, batch)

        def loss(t, _value=value, _kw=kw):
            return _value(t, **_kw).sum()

        f = jax.jit(jax.value_and_grad(loss))
        hlo = f.lower(ts).compile().as_text()
        CALLS.clear()
        v, g = f(ts)
        jax.block_until_ready(g)
        res = {"all_gather": "all-gather" in hlo, "grad_calls": list(CALLS),
               "value_ok": close(v, v_np.sum()), "grad_ok": close(g, E_np),
               "grad_spec": str(g.sharding.spec)}
        h_fn = jax.jit(lambda t, z, _loss=loss: jax.jvp(jax.grad(_loss), (t,), (z,))[1])
        res["hvp_all_gather"] = "all-gather" in h_fn.lower(ts, zs).compile().as_text()
        CALLS.clear()
        h = h_fn(ts, zs)
        jax.block_until_ready(h)
        res["hvp_calls"] = list(CALLS)
        res["hvp_ok"] = close(h, H_np)
        # the per-item values themselves, sharded (not only their sum)
        res["values_ok"] = close(jax.jit(lambda t, _v=value, _kw=kw: _v(t, **_kw))(ts), v_np)
        out[f"jit_{name}"] = res

    # Viterbi decoding (integer results) over the sharded batch
    theta = cases["viterbi"][0]
    CALLS.clear()
    score, tags = jax.jit(lambda t: sm.viterbi_decode(t, lengths=L))(jax.device_put(theta, batch))
    jax.block_until_ready(tags)
    calls = [c for c in CALLS if c[1] > 0]  # (an empty batch at trace time gives the output shapes)
    s_np, t_np = sm.viterbi_decode(theta, lengths=L)
    out["jit_decode"] = {"calls": calls, "ok": close(score, s_np) and bool(np.array_equal(tags, t_np)),
                         "tags_dtype": str(tags.dtype)}

    # 2. grad and grad-of-grad inside shard_map (defaults); lengths the same on each shard
    theta = rng.random((6, 7, 5)).astype(np.float32)
    Ls = (np.array([7, 5, 6]), np.array([5, 4, 5]))

    def dtw_loss(t):
        return sm.dtw(t, lengths=Ls, gamma=0.5).sum()

    def gg(t):
        return jax.grad(lambda x: jnp.sum(jax.grad(dtw_loss)(x) ** 2))(t)

    for name, body in (("grad", jax.grad(dtw_loss)), ("grad_of_grad", gg)):
        sm_fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("b"), out_specs=P("b")))
        CALLS.clear()
        got = np.asarray(sm_fn(jax.device_put(theta, batch)))
        calls = list(CALLS)
        ref = np.concatenate([np.asarray(jax.jit(body)(theta[:3])), np.asarray(jax.jit(body)(theta[3:]))])
        out[f"shard_map_{name}"] = {"ok": close(got, ref), "calls": calls}

    # 3. data-parallel training: a SoftDTW-loss model and a CRF-loss model, a few
    #    SGD steps on the same global batch, sharded over 2 devices and on one
    def train(loss, params, data, steps=3, lr=0.1, sharded=True):
        step = jax.jit(jax.value_and_grad(loss))
        if sharded:
            params = jax.device_put(params, replicated)
            data = tuple(jax.device_put(d, batch) for d in data)
        history = []
        for _ in range(steps):
            CALLS.clear()
            value, grads = step(params, *data)
            history.append((float(value), jax.tree.map(np.asarray, grads), list(CALLS)))
            params = jax.tree.map(lambda p, g_: p - lr * g_, params, grads)
        return history, jax.tree.map(np.asarray, params)

    def compare(name, loss, params, data):
        sharded, p_sharded = train(loss, params, data)
        single, p_single = train(loss, params, data, sharded=False)
        grads_ok = all(close(a[0], b[0]) and all(close(x, y) for x, y in
                                                  zip(jax.tree.leaves(a[1]), jax.tree.leaves(b[1])))
                       for a, b in zip(sharded, single))
        out[f"train_{name}"] = {
            "grads_ok": grads_ok,
            "params_ok": all(close(x, y) for x, y in zip(jax.tree.leaves(p_sharded), jax.tree.leaves(p_single))),
            "losses": [h[0] for h in sharded],
            "calls_sharded": sharded[0][2], "calls_single": single[0][2],
        }

    x = rng.standard_normal((8, 6, 2)).astype(np.float32)
    y = rng.standard_normal((8, 5, 2)).astype(np.float32)
    sdtw_params = {"W1": 0.5 * rng.standard_normal((2, 4)).astype(np.float32),
                   "W2": 0.5 * rng.standard_normal((4, 2)).astype(np.float32)}

    def sdtw_loss(p, xb, yb):
        pred = jnp.tanh(xb @ p["W1"]) @ p["W2"]
        return jnp.mean(smj.soft_dtw(pred, yb, gamma=0.5))

    compare("soft_dtw", sdtw_loss, sdtw_params, (x, y))

    # the same loss and batch through shard_map (docs/jax-sharding.md, approach 2)
    def global_loss(p, xb, yb):
        return jax.lax.pmean(sdtw_loss(p, xb, yb), "b")

    sm_step = jax.jit(jax.shard_map(jax.value_and_grad(global_loss), mesh=mesh,
                                    in_specs=(P(), P("b"), P("b")), out_specs=(P(), P())))
    CALLS.clear()
    v_sm, g_sm = sm_step(jax.device_put(sdtw_params, replicated), jax.device_put(x, batch),
                         jax.device_put(y, batch))
    v_1, g_1 = jax.jit(jax.value_and_grad(sdtw_loss))(sdtw_params, x, y)
    out["train_soft_dtw"]["shard_map_step_ok"] = close(v_sm, v_1) and all(
        close(g_sm[k], g_1[k]) for k in g_1)

    T, S = 5, 3
    feats = rng.standard_normal((8, T, 4)).astype(np.float32)
    tags = rng.integers(0, S, size=(8, T))
    lengths = np.array([5, 3, 4, 5, 2, 5, 1, 4])
    crf_params = {"W": 0.3 * rng.standard_normal((4, S)).astype(np.float32),
                  "A": 0.3 * rng.standard_normal((S, S)).astype(np.float32)}

    def crf_loss(p, fb, tb):
        theta = (fb @ p["W"])[..., :, None] + p["A"]
        return jnp.mean(losses.viterbi_surrogate(theta, tb, lengths=lengths))

    compare("crf", crf_loss, crf_params, (feats, tags))
    print(json.dumps(out))


if __name__ == "__main__":
    if "--xla_force_host_platform_device_count=2" not in os.environ.get("XLA_FLAGS", ""):
        sys.exit("run with XLA_FLAGS=--xla_force_host_platform_device_count=2")
    main()
