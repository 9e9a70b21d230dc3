# cython: language_level=3
"""The compiled engine's threads: one pool per process (``pool.h``, docs/threads.md).

The kernel modules cimport ``team``, ``parallel_for`` and ``wavefront`` from
here, so that every module runs on the same workers and obeys one setting.
"""

cdef extern from "pool.h" nogil:
    ctypedef void (*c_task_fn "sm_task_fn")(void* ctx, Py_ssize_t item, int slot) noexcept nogil
    ctypedef void (*c_tile_fn "sm_tile_fn")(void* ctx, Py_ssize_t I, Py_ssize_t J, int slot) noexcept nogil
    int sm_team(Py_ssize_t units, double work, double min_work)
    int sm_num_threads()
    int sm_openmp_threads()
    int sm_parallel_for(Py_ssize_t n, int team, c_task_fn fn, void* ctx)
    Py_ssize_t sm_slot_len(Py_ssize_t n)
    void* sm_alloc_lines(size_t nbytes)
    void sm_free_lines(void* p)
    int sm_parallel_for_work(Py_ssize_t n, int team, c_task_fn fn, void* ctx, double** work,
                             Py_ssize_t* per_slot)
    int sm_wavefront(Py_ssize_t nI, Py_ssize_t nJ, int reverse, c_tile_fn fn, void* ctx,
                     int* done, int team)
    int sm_setting
    int sm_guard_on
    long long sm_spin_ns
    int sm_spin_yield
    int sm_last_planned
    int sm_last_used
    int sm_last_joined
    long long sm_guard_trips
    long long sm_last_lag
    int sm_last_woke
    long long sm_last_waited
    double sm_last_bar
    long long sm_last_parts[4]
    int sm_last_judged
    int sm_last_slow
    double sm_guard_bar
    double sm_guard_bar_wave
    int SM_POOL_MAX
    void sm_force_backoff(long long ns)


cdef int team(Py_ssize_t units, double work, double min_work) noexcept nogil:
    return sm_team(units, work, min_work)


cdef int num_threads() noexcept nogil:
    return sm_num_threads()


cdef int parallel_for(Py_ssize_t n, int nthreads, sm_task_fn fn, void* ctx) noexcept nogil:
    return sm_parallel_for(n, nthreads, <c_task_fn> fn, ctx)


cdef Py_ssize_t slot_len(Py_ssize_t n) noexcept nogil:
    return sm_slot_len(n)


cdef void* alloc_lines(size_t nbytes) noexcept nogil:
    return sm_alloc_lines(nbytes)


cdef void free_lines(void* p) noexcept nogil:
    sm_free_lines(p)


cdef int parallel_for_work(Py_ssize_t n, int nthreads, sm_task_fn fn, void* ctx, double** work,
                           Py_ssize_t* per_slot) noexcept nogil:
    return sm_parallel_for_work(n, nthreads, <c_task_fn> fn, ctx, work, per_slot)


cdef int wavefront(Py_ssize_t nI, Py_ssize_t nJ, int reverse, sm_tile_fn fn, void* ctx,
                   int* done, int nthreads) noexcept nogil:
    return sm_wavefront(nI, nJ, reverse, <c_tile_fn> fn, ctx, done, nthreads)


MAX_THREADS = SM_POOL_MAX


def env_setting():
    """``SMOOTHMAX_NUM_THREADS`` as a setting (0 when unset); a value that is
    not a positive integer is ignored with a warning."""
    import os
    import warnings
    raw = os.environ.get("SMOOTHMAX_NUM_THREADS", "").strip()
    if not raw:
        return 0
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        warnings.warn(f"SMOOTHMAX_NUM_THREADS must be a positive integer, got {raw!r}; ignored",
                      RuntimeWarning, stacklevel=2)
        return 0
    return min(n, SM_POOL_MAX)


def set_setting(int n):
    """The per-process thread count (0: follow OpenMP's limit). Validated by the caller."""
    global sm_setting
    sm_setting = n


def get_setting():
    return sm_setting


def get_num_threads():
    """Threads a call may use now (the setting, else OpenMP's limit)."""
    return sm_num_threads()


def openmp_threads():
    return sm_openmp_threads()


def _set_guard(bint on):
    """Turn the co-tenant guard on or off (tests); returns the previous state."""
    global sm_guard_on
    old = bool(sm_guard_on)
    sm_guard_on = on
    return old


def _set_spin(long long ns, int yield_after):
    """Tuning: the idle spin (ns) and the spins before a worker yields (-1: never)."""
    global sm_spin_ns, sm_spin_yield
    sm_spin_ns = ns
    sm_spin_yield = yield_after


def _set_guard_bars(batch=None, wave=None):
    """Tuning: the co-tenant guard's bars, for a batch job and for a
    wavefront (a job trips the guard when its wall time exceeds the bar times
    its threads' CPU time; None leaves one as it is); returns the previous
    pair (with no argument: the current one)."""
    global sm_guard_bar, sm_guard_bar_wave
    for name, bar in (("batch", batch), ("wave", wave)):
        if bar is not None and not 0 < bar < float("inf"):
            raise ValueError(f"the guard's {name} bar must be a positive number, got {bar!r}")
    old = (sm_guard_bar, sm_guard_bar_wave)
    if batch is not None:
        sm_guard_bar = batch
    if wave is not None:
        sm_guard_bar_wave = wave
    return old


def _force_backoff(double seconds):
    """Tests: calls run on one thread for ``seconds`` (as after a co-tenant trip); 0 stops it."""
    sm_force_backoff(<long long> (seconds * 1e9))


def _probe():
    """The last parallel job of this process: the team it planned (from the
    setting and the work), the team it ran with (after the co-tenant guard),
    the threads that ran at least one item, how often the guard tripped, and
    how long worker 1 took to start on it (µs; -1: it did not), whether a
    worker was asleep when it was posted, how long the caller waited for
    the workers after its own items (µs), and the guard's bar it was judged
    by (``sm_guard_bar`` for a batch, ``sm_guard_bar_wave`` for a wavefront
    of tiles), the wall and CPU time (µs) of the caller's part of it and of
    worker 1's, whether the guard judged it and found it slow (it trips on
    the second slow job among the last 8 judged)."""
    return {"planned": sm_last_planned, "used": sm_last_used, "joined": sm_last_joined,
            "guard_trips": sm_guard_trips, "lag_us": sm_last_lag / 1e3,
            "woke": bool(sm_last_woke), "waited_us": sm_last_waited / 1e3,
            "bar": sm_last_bar,
            "caller_us": (sm_last_parts[0] / 1e3, sm_last_parts[1] / 1e3),
            "worker_us": (sm_last_parts[2] / 1e3, sm_last_parts[3] / 1e3),
            "judged": bool(sm_last_judged), "slow": bool(sm_last_slow)}


set_setting(env_setting())
