"""The compiled engine's threads and kept memory (docs/threads.md).

What is observable without timings: the team a call plans (through the
pool's private probe), that it follows ``set_num_threads``,
``SMOOTHMAX_NUM_THREADS``, ``OMP_NUM_THREADS`` and ``threadpoolctl``, that
results do not depend on the thread count, that concurrent calls, forked
children and the co-tenant guard's one-thread fallback give the same
results, and the bytes the engine keeps between calls.
"""
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import smoothmax as sm
from smoothmax import _buffers

pool = pytest.importorskip("smoothmax._core.pool", reason="compiled core not built")
core_dtw = pytest.importorskip("smoothmax._core.dtw", reason="compiled core not built")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def threads():
    """Set the per-process thread count for one test, then restore the default."""
    yield sm.set_num_threads
    sm.set_num_threads(None)


def _planned(fn):
    fn()
    return pool._probe()["planned"]


def _big_dtw(B, N, seed=0):
    return np.random.default_rng(seed).random((B, N, N))


def test_set_num_threads_validation(threads):
    for bad in (0, -1):
        with pytest.raises(ValueError, match=r"n must be None or a positive integer, got " + str(bad)):
            sm.set_num_threads(bad)
    for bad in (1.5, "2", True, [2]):
        with pytest.raises(TypeError, match="n must be None or a positive integer"):
            sm.set_num_threads(bad)
    threads(np.int64(3))
    assert sm.get_num_threads() == 3


@pytest.mark.parametrize("n", [1, 2, 3])
def test_set_num_threads_is_the_team_of_a_large_batch(threads, n):
    threads(n)
    assert sm.get_num_threads() == n
    theta = _big_dtw(4, 128)  # 65536 cells: above the one-thread threshold
    assert _planned(lambda: sm.dtw_grad(theta)) == n
    L = np.random.default_rng(1).random((4, 64, 16, 16))
    assert _planned(lambda: sm.viterbi_grad(L)) == n
    x, y = np.random.default_rng(2).random((2, 4, 300, 3))
    assert _planned(lambda: sm.dtw_features_grad(x, y)) == min(n, 4)


def test_team_never_exceeds_the_work(threads):
    threads(3)
    assert _planned(lambda: sm.dtw_grad(_big_dtw(3, 128))) == 3
    threads(8)
    assert _planned(lambda: sm.dtw(_big_dtw(2, 20))) == 1            # small work: one thread
    assert _planned(lambda: sm.viterbi(np.zeros((64, 4, 3, 3)))) == 1
    assert _planned(lambda: sm.viterbi(np.zeros((3, 400, 8, 8)))) == 3  # at most one per item
    g, _ = sm.DAG.for_dtw(100, 100)
    assert _planned(lambda: sm.dag(np.zeros((2, g.n_edges)), g)) == 2
    assert _planned(lambda: sm.dag(np.zeros((2, 6)), sm.DAG.for_dtw(2, 2)[0])) == 1
    # one problem is shared by threads (a wavefront) only from 512² cells
    threads(2)
    assert _planned(lambda: sm.dtw_grad(_big_dtw(1, 400))) == 1
    assert _planned(lambda: sm.dtw_grad(_big_dtw(1, 520))) == 2
    assert _planned(lambda: sm.dtw_grad(_big_dtw(2, 400))) == 2      # a batch: one problem a thread
    threads(8)
    # a batch smaller than the team shares each problem's tiles: at most one thread per tile
    core_dtw._set_small_work(0)
    try:
        assert _planned(lambda: sm.dtw_grad(_big_dtw(1, 70))) == 4    # 2 x 2 tiles of 64
        assert _planned(lambda: sm.dtw_grad(_big_dtw(1, 40))) == 1    # one tile
    finally:
        core_dtw._set_small_work(1 << 15)


def test_default_follows_openmp_and_threadpoolctl(threads):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    sm.dtw(_big_dtw(1, 4))  # load the engine (and its OpenMP runtime) first
    threads(None)
    with threadpoolctl.threadpool_limits(1):
        assert sm.get_num_threads() == 1
        assert _planned(lambda: sm.dtw_grad(_big_dtw(4, 128))) == 1
    with threadpoolctl.threadpool_limits(3):
        assert sm.get_num_threads() == 3
        assert _planned(lambda: sm.dtw_grad(_big_dtw(4, 128))) == 3


def _child(code, **env):
    full = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    full.pop("SMOOTHMAX_NUM_THREADS", None)
    full.update(env)
    out = subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return out


def test_environment_variables():
    code = ("import smoothmax as sm, numpy as np; from smoothmax._core import pool; "
            "sm.dtw_grad(np.random.rand(4, 128, 128)); "
            "print(sm.get_num_threads(), pool._probe()['planned'])")
    assert _child(code, SMOOTHMAX_NUM_THREADS="3").stdout.split() == ["3", "3"]
    assert _child(code, OMP_NUM_THREADS="1").stdout.split() == ["1", "1"]
    # the smoothmax setting wins over OpenMP's
    assert _child(code, OMP_NUM_THREADS="1", SMOOTHMAX_NUM_THREADS="2").stdout.split() == ["2", "2"]
    out = _child(code, SMOOTHMAX_NUM_THREADS="many", OMP_NUM_THREADS="2")
    assert out.stdout.split() == ["2", "2"]
    assert "SMOOTHMAX_NUM_THREADS must be a positive integer, got 'many'" in out.stderr


def _all_passes(rng):
    """Value, gradient and HVP of every compiled structure, on work large enough to thread."""
    theta = rng.random((3, 150, 140))
    theta1 = rng.random((1, 700, 650))
    Z, Z1 = rng.standard_normal(theta.shape), rng.standard_normal(theta1.shape)
    L = rng.standard_normal((5, 40, 12, 12))
    ZL = rng.standard_normal(L.shape)
    g, _ = sm.DAG.for_dtw(60, 60)
    W = rng.random((6, g.n_edges))
    x, y = rng.random((2, 3, 200, 4))
    lens = (np.array([150, 90, 120]), np.array([140, 140, 70]))
    out = [sm.dtw_hvp(theta, Z, lengths=lens, band=40), sm.dtw_hvp(theta1, Z1),
           sm.dtw_grad(theta1.astype(np.float32)), sm.viterbi_hvp(L, ZL, lengths=[40, 7, 33, 1, 40]),
           sm.viterbi_decode(L), sm.dag_hvp(W, np.ones_like(W), g), sm.dtw_features_grad(x, y)]
    return [np.asarray(a) for o in out for a in (o if isinstance(o, tuple) else (o,))]


def test_results_do_not_depend_on_the_thread_count(threads):
    """Each item (and each tile) is computed by one thread with the same
    arithmetic whatever the team: bitwise equal results on 1, 2 and 3 threads
    (with the DTW tile side fixed: the automatic one depends on the team)."""
    core_dtw._set_tile(64)
    try:
        threads(1)
        want = _all_passes(np.random.default_rng(5))
        for n in (2, 3):
            threads(n)
            got = _all_passes(np.random.default_rng(5))
            for a, b in zip(got, want):
                np.testing.assert_array_equal(a, b)
    finally:
        core_dtw._set_tile(0)


def test_crf_parameter_gradients_summed_over_threads(threads):
    """The CRF sums its parameter gradients per thread: the same to rounding on any team."""
    rng = np.random.default_rng(6)
    em, A = rng.standard_normal((16, 30, 10)), rng.standard_normal((10, 10))
    st, en = rng.standard_normal(10), rng.standard_normal(10)
    res = []
    for n in (1, 2, 3):
        threads(n)
        res.append(sm.crf.crf_grad(em, A, st, en))
    for r in res[1:]:
        for a, b in zip(_flat(r), _flat(res[0])):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def _flat(r):
    return [np.asarray(a) for a in (r if isinstance(r, (tuple, list)) else (r,))]


def test_guard_fallback_plans_for_one_thread(threads):
    """With the co-tenant guard's one-thread fallback forced on, a call plans
    for one thread (a DTW wavefront's small parallel tiles run in order were
    slower than the one-thread tiles): its results are exactly those of a
    one-thread call, and close to the two-thread ones (other tiles, other
    order of the edge sums)."""
    args = (_big_dtw(1, 600), np.ones((1, 600, 600)))
    threads(1)
    one = sm.dtw_hvp(*args)
    threads(2)
    two = sm.dtw_hvp(*args)
    assert pool._probe()["planned"] == 2
    old = pool._set_guard(True)
    pool._force_backoff(10.0)
    try:
        got = sm.dtw_hvp(*args)
        assert pool._probe()["planned"] == 1 and pool._probe()["used"] == 1
    finally:
        pool._force_backoff(0.0)
        pool._set_guard(old)
    for a, b, c in zip(got, one, two):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(a, c, rtol=1e-12, atol=1e-12)


def test_concurrent_calls_from_python_threads(threads):
    """Two Python threads calling at once: one gets the pool, the other runs
    alone; both results are right."""
    threads(2)
    rng = np.random.default_rng(7)
    thetas = [rng.random((2, 300, 300)) for _ in range(4)]
    want = [sm.dtw_grad(t) for t in thetas]
    got = [None] * 4

    def run(k):
        for _ in range(3):
            got[k] = sm.dtw_grad(thetas[k])

    ts = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in ts)
    for g, w in zip(got, want):
        for a, b in zip(g, w):
            np.testing.assert_array_equal(a, b)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_forked_child_starts_its_own_workers(threads):
    """A child forked after the pool has run has none of its workers: it starts its own."""
    threads(2)
    theta = _big_dtw(2, 300)
    want = sm.dtw_grad(theta)[0]
    code = r"""
import os, sys, numpy as np, smoothmax as sm
from smoothmax._core import pool
sm.set_num_threads(2)
pool._set_guard(False)  # a slow first job (starting the workers) must not send the child to one thread
theta = np.random.default_rng(0).random((2, 300, 300))
want = sm.dtw_grad(theta)[0]
pid = os.fork()
if pid == 0:
    v = sm.dtw_grad(theta)[0]
    os._exit(0 if np.array_equal(v, want) and pool._probe()["used"] == 2 else 3)
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status))
"""
    assert _child(code).stdout.strip() == "0"
    assert want.shape == (2,)


# ---------------------------------------------------------------------------
# kept memory


def test_clear_cache_releases_the_kept_workspace(monkeypatch):
    monkeypatch.setenv("SMOOTHMAX_BUFFER_CACHE_MB", "1024")
    sm.clear_cache()
    assert _buffers.held_bytes() == 0
    theta = np.random.default_rng(8).random((1, 1200, 1200))  # weights: 2 x 11.5 MB float64
    v, E = sm.dtw_grad(theta)
    held = _buffers.held_bytes()
    assert held >= 2 * 1200 * 1200 * 8  # the weight workspace (and E) are kept
    del E
    sm.dtw_grad(theta)  # reuses them: nothing more is kept
    assert _buffers.held_bytes() == held
    sm.clear_cache()
    assert _buffers.held_bytes() == 0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gradient_keeps_two_weights_a_cell(monkeypatch, dtype):
    """Besides theta and E, a DTW gradient keeps two values a cell (q_up and
    q_left in the caller's dtype; q_diag is derived in the reverse pass), and
    a few edge arrays."""
    monkeypatch.setenv("SMOOTHMAX_BUFFER_CACHE_MB", "1024")
    sm.clear_cache()
    n = 1000
    theta = np.random.default_rng(3).random((1, n, n)).astype(dtype)
    _, E = sm.dtw_grad(theta)  # E is a kept block of its own (its size exactly)
    cells = n * n * np.dtype(dtype).itemsize
    assert 2 * cells <= _buffers.held_bytes() - E.nbytes <= 2.1 * cells
    sm.clear_cache()


def test_mid_sized_results_reuse_kept_blocks(monkeypatch):
    """Results from 256 KiB come from kept blocks: a float64 HVP at 2 x 200^2
    (640 KB results) in a loop that drops them faults in no new pages (with
    np.empty results: 280 page faults a call, glibc trimming and regrowing its
    heap), and a result still held is never handed out again."""
    import resource

    monkeypatch.setenv("SMOOTHMAX_BUFFER_CACHE_MB", "1024")
    sm.clear_cache()
    rng = np.random.default_rng(11)
    theta, Z = rng.random((2, 200, 200)), rng.standard_normal((2, 200, 200))
    other = theta + 1.0
    Ed = sm.dtw_hvp(theta, Z)
    keep = Ed.copy()
    assert _buffers.held_bytes() >= 2 * theta.nbytes  # E and Edot are kept blocks
    for _ in range(2):
        sm.dtw_hvp(other, Z)  # results dropped at once: their blocks are reused
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        sm.dtw_hvp(other, Z)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    assert faults < 5 * 20, f"{faults} page faults in 5 calls"
    np.testing.assert_array_equal(Ed, keep)  # the held result was not written into
    sm.clear_cache()


def test_kept_memory_is_bounded_by_the_cache_limit(monkeypatch):
    monkeypatch.setenv("SMOOTHMAX_BUFFER_CACHE_MB", "60")
    sm.clear_cache()
    rng = np.random.default_rng(9)
    for n in (900, 1100, 1300, 1500):  # weights 19-54 MB, E 6-18 MB
        sm.dtw_grad(rng.random((1, n, n)))
        assert _buffers.held_bytes() <= 60 << 20
    monkeypatch.setenv("SMOOTHMAX_BUFFER_CACHE_MB", "0")
    sm.clear_cache()
    sm.dtw_hvp(rng.random((1, 1000, 1000)), np.ones((1, 1000, 1000)))
    assert _buffers.held_bytes() == 0
    sm.clear_cache()


def test_reused_dirty_workspace_is_rewritten(monkeypatch):
    """Workspaces come from kept blocks uninitialised: fill every kept block
    with NaN bytes, then check that DTW results are unchanged (the feature
    kernel: tests/test_dtw_features.py::test_reused_workspace_is_rewritten)."""
    monkeypatch.setattr(_buffers, "MIN_BYTES", 0)
    sm.clear_cache()
    rng = np.random.default_rng(10)
    theta, Z = rng.random((3, 70, 60)), rng.standard_normal((3, 70, 60))
    runs = [lambda: sm.dtw_hvp(theta, Z, band=20), lambda: sm.dtw_grad(theta[:1])]
    for run in runs:
        want = [np.array(a) for a in run()]
        for _ in range(2):
            for block in _buffers._blocks:
                block[...] = 0xFF  # NaN in float32 and float64
            got = run()
            for a, b in zip(got, want):
                np.testing.assert_array_equal(a, b)
    sm.clear_cache()


def test_the_job_that_starts_the_workers_is_not_judged_by_the_guard():
    """A new worker's start (tens of ms on a VM) made the first parallel job
    of a process look like a busy core to the co-tenant guard, and the next
    calls ran on one thread for 50 ms. Nothing else runs in the child before
    its first two-thread job."""
    code = ("import numpy as np, smoothmax as sm; from smoothmax._core import pool; "
            "pool._set_guard(True); sm.set_num_threads(2); "
            "sm.dtw_grad(np.random.default_rng(0).random((2, 200, 200))); "
            "p = pool._probe(); print(p['used'], p['guard_trips'])")
    assert _child(code).stdout.split() == ["2", "0"]


def test_probe_tells_a_job_that_woke_a_sleeping_worker():
    """Idle workers spin for a while and then sleep: a job posted after a
    pause wakes them (probe ``woke``; the guard judges it only if the caller
    then waited for a worker), a job right after another finds them spinning.
    Each is tried a few times: on a loaded machine the caller itself may be
    held off its CPU for longer than the spin between two calls."""
    code = ("import time, numpy as np, smoothmax as sm; from smoothmax._core import pool; "
            "sm.set_num_threads(2); theta = np.random.default_rng(0).random((2, 200, 200)); "
            "sm.dtw_grad(theta); after_pause, back_to_back = [], []\n"
            "for _ in range(3):\n"
            "    time.sleep(0.1); sm.dtw_grad(theta); after_pause.append(pool._probe()['woke'])\n"
            "    for _ in range(5):\n"
            "        sm.dtw_grad(theta); back_to_back.append(pool._probe()['woke'])\n"
            "print(any(after_pause), not all(back_to_back))")
    assert _child(code).stdout.split() == ["True", "True"]


def test_a_wavefront_is_judged_by_its_own_bar():
    """The co-tenant guard judges a DTW wavefront (one large problem's tiles
    shared by the threads) against its own bar, lower than a batch's: its
    fill, drain and waits for neighbour tiles made the batch bar trip on many
    two-thread calls at 1024² on a free machine. With one bar that no job can
    meet and the other that no job can miss, only the calls of the first kind
    trip the guard (the guard trips on its second slow judgement). Calls are
    made until two jobs were judged: a job that woke a sleeping worker goes
    unjudged unless the caller then waited for it, and a 1024² call's own
    Python work often outlasts the worker's idle spin."""
    code = (
        "import numpy as np, smoothmax as sm; from smoothmax._core import pool\n"
        "sm.set_num_threads(2); pool._set_guard(False)\n"
        "wave = np.random.default_rng(0).random((1, 1024, 1024))\n"
        "batch = np.random.default_rng(1).random((4, 200, 200))\n"
        "sm.dtw(wave); sm.dtw(batch)\n"
        "pool._set_guard(True)\n"
        "for bars in ((1e9, 1e-9), (1e-9, 1e9)):\n"
        "    pool._set_guard_bars(*bars)\n"
        "    for theta in (wave, batch):\n"
        "        pool._force_backoff(0); t0 = pool._probe()['guard_trips']; judged = []\n"
        "        for _ in range(60):\n"
        "            sm.dtw(theta); p = pool._probe()\n"
        "            if p['used'] == 2 and p['judged']: judged.append(p['bar'])\n"
        "            if len(judged) == 2: break\n"
        "        print(pool._probe()['guard_trips'] > t0, judged)\n")
    got = _child(code).stdout.splitlines()
    # bars (batch, wave) = (never missed, never met): the wavefront trips, the batch does not
    assert got == ["True [1e-09, 1e-09]", "False [1000000000.0, 1000000000.0]",
                   "False [1000000000.0, 1000000000.0]", "True [1e-09, 1e-09]"]


def test_guard_bars_are_checked_and_restored():
    """The tuning hook refuses a bar that is not a positive number, names it,
    changes nothing then, and leaves a bar it is not given as it is."""
    before = pool._set_guard_bars()
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="wave bar"):
            pool._set_guard_bars(wave=bad)
        assert pool._set_guard_bars() == before
    try:
        assert pool._set_guard_bars(batch=0.5) == before
        assert pool._set_guard_bars() == (0.5, before[1])
    finally:
        pool._set_guard_bars(*before)


def test_one_slow_job_does_not_trip_the_guard():
    """The co-tenant guard backs off on the second slow job among the last 8
    it judged, not on the first: on a VM with nothing else running, 0.5-1% of
    two-thread jobs at 2 × 200² came out slow (a virtual CPU held for a few
    hundred µs), and each trip sent the next 50 ms of calls to one thread.
    With a bar that no job can meet, every judged job is slow: the first
    leaves the guard alone, the second trips it."""
    code = (
        "import numpy as np, smoothmax as sm; from smoothmax._core import pool\n"
        "sm.set_num_threads(2); pool._set_guard(False)\n"
        "batch = np.random.default_rng(1).random((4, 200, 200)); sm.dtw(batch)\n"
        "pool._set_guard(True); pool._set_guard_bars(1e-9, 1e-9); pool._force_backoff(0)\n"
        "seen = []\n"
        "for _ in range(40):\n"
        "    t0 = pool._probe()['guard_trips']; sm.dtw(batch); p = pool._probe()\n"
        "    if p['used'] == 2 and p['judged']: seen.append((p['slow'], p['guard_trips'] - t0))\n"
        "    if len(seen) == 2: break\n"
        "print(seen)\n")
    assert _child(code).stdout.strip() == "[(True, 0), (True, 1)]"


def test_the_job_that_starts_the_workers_runs_on_them():
    """A worker started by a job joins that job. It used to read the job
    counter when its thread began running, after the job was posted, and
    then waited for the next one: the first parallel call of every process
    ran on one thread (a cold first call about twice a warm one)."""
    code = ("import numpy as np, smoothmax as sm; from smoothmax._core import pool; "
            "pool._set_guard(False); sm.set_num_threads(2); "
            "sm.dtw_grad(np.random.default_rng(0).random((8, 300, 300))); "
            "p = pool._probe(); print(p['used'], p['joined'])")
    assert _child(code).stdout.split() == ["2", "2"]


def test_input_checks_call_no_blas(monkeypatch):
    """The checks of theta and Z must not call a BLAS routine: OpenBLAS's
    threads then spin for a while on the cores the engine's threads are about
    to use (np.vdot in the finiteness check made two-thread HVPs no faster
    than one-thread ones)."""
    def no_blas(*a, **k):
        raise AssertionError("a BLAS routine was called")

    for name in ("dot", "vdot", "inner", "matmul", "tensordot", "einsum"):
        monkeypatch.setattr(np, name, no_blas)
    rng = np.random.default_rng(0)
    theta = rng.random((2, 30, 30))
    sm.dtw_hvp(theta, rng.normal(size=theta.shape))
    th = rng.normal(size=(2, 5, 4, 4))
    sm.viterbi_hvp(th, rng.normal(size=th.shape))


def test_numpy_calls_do_not_import_the_compat_namespace():
    """NumPy >= 2.1 is its own array-API namespace: a NumPy call must not pay
    for importing array_api_compat.numpy (about 100 ms on a first call: it
    walks NumPy's lazy submodules)."""
    if np.lib.NumpyVersion(np.__version__) < "2.1.0":
        pytest.skip("NumPy < 2.1 goes through array_api_compat.numpy")
    code = ("import sys, numpy as np, smoothmax as sm; rng = np.random.default_rng(0); "
            "sm.dtw_hvp(rng.random((2, 5, 5)), rng.random((2, 5, 5))); "
            "sm.viterbi_grad(rng.random((2, 3, 4, 4))); sm.smooth_max(rng.random(4), reg='l2'); "
            "print('array_api_compat.numpy' in sys.modules)")
    assert _child(code).stdout.split() == ["False"]
