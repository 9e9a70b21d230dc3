/*
 * The compiled engine's threads (docs/threads.md): one process-wide pool of
 * worker threads, shared by every kernel module through smoothmax._core.pool.
 *
 * Why not OpenMP regions: an OpenMP region ends in a barrier that waits for
 * every thread of the team, and libgomp's threads spin (GOMP_SPINCOUNT) after
 * each region. With a core busy in another process, a call then waits for a
 * thread that is not running (measured: a 0.4 ms DTW value took 7 ms on two
 * threads), and spinning threads of two OpenMP runtimes (torch has its own)
 * fight over the cores. Here:
 *
 * - A call posts a job of n items and works on it itself (slot 0). Items are
 *   claimed one at a time from a counter, so a worker that wakes late finds
 *   fewer (or no) items left and never holds the call up: the caller waits
 *   only for items already claimed, that is for threads that are running.
 * - Idle workers spin for sm_spin_ns (back-to-back calls skip a futex
 *   wake-up), yielding the CPU to any other thread that wants it (torch's
 *   OpenMP workers between two small ops), then sleep on a futex (a
 *   condition variable off Linux): passive waiting, and no lock that a
 *   preempted thread could hold while others wait for it.
 * - A co-tenant guard: a job whose wall time is more than a bar times the
 *   CPU time its threads spent on it (sm_guard_bar, 0.7, for a batch: threads
 *   gave less than 1.4x, a thread waited for one that another process kept
 *   off its core; sm_guard_bar_wave, 0.87, for a wavefront), twice among
 *   the last 8 judged jobs, makes the next calls run on the calling thread
 *   alone for a while (50 ms, doubling up to 2 s while it keeps happening),
 *   then threads are tried again.
 * - One job at a time: a call made while the pool is busy (another Python
 *   thread) runs on its own thread; nothing nests.
 * - The thread count: smoothmax.set_num_threads(n) (or SMOOTHMAX_NUM_THREADS)
 *   when set, else OpenMP's limit (omp_get_max_threads: OMP_NUM_THREADS,
 *   threadpoolctl), 1 without OpenMP; the kernels lower it per call from the
 *   work (sm_team). Without pthreads (Windows builds) every job runs serially.
 *
 * Items of a job get a slot in [0, team): the worker (or the caller, 0) that
 * runs it, so kernels index per-thread workspaces by slot.
 */
#ifndef SMOOTHMAX_POOL_H
#define SMOOTHMAX_POOL_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#if (defined(__unix__) || defined(__APPLE__)) && (defined(__GNUC__) || defined(__clang__))
#define SM_POOL_THREADS 1
#include <pthread.h>
#include <sched.h>
#include <time.h>
#include <unistd.h>
#endif

typedef void (*sm_task_fn)(void *ctx, ptrdiff_t item, int slot);

#define SM_POOL_MAX 64
#define SM_TILE_SPIN_NS 20000      /* spin of a thread waiting for a tile's neighbours */
#define SM_GUARD_MIN_NS 200000     /* a job shorter than this is not judged */
/* The guard trips on SM_GUARD_STRIKES slow jobs among the last
   SM_GUARD_WINDOW judged ones, not on one: on the benchmark VM with no other
   process running, 0.5-1% of two-thread jobs at 2 x 200^2 were slow by the
   bar (the caller waited a few hundred us for a worker whose item took its
   usual CPU time: most likely the VM held that virtual CPU), and each sent the
   next 50 ms of calls (about 100 of them) to one thread, so that about half
   of a loop's calls ran there. Another process on a core makes 63-85% of
   the jobs slow, and two of eight come within a few calls. */
#define SM_GUARD_WINDOW 8
#define SM_GUARD_STRIKES 2
/* The guard's bars: a job trips it when its wall time is more than this x
   the CPU time its threads spent on it. A batch job (items independent) on a
   free machine gives 1.7-2x on two threads, so below 1.43x (0.7) a thread
   waited for one that was not running. A wavefront's CPU-relative speed-up
   is lower by construction (fill and drain, waits for neighbour tiles):
   1.3-1.75x on the free benchmark VM at 1024^2, so the batch bar tripped on
   many such calls and sent the next ones to one thread (in one probe, 14 of
   60 dtw_grad calls ran on two threads). It is judged against what one thread would take instead:
   the one-thread plan's larger tiles are up to 20% faster a cell
   (docs/threads.md), so 1/1.15 (0.87) */
static double sm_guard_bar = 0.7;
static double sm_guard_bar_wave = 0.87;
#define SM_BACKOFF_MIN_NS 50000000LL
#define SM_BACKOFF_MAX_NS 2000000000LL

static int sm_setting = 0;          /* set_num_threads(n); 0: follow OpenMP */
static int sm_guard_on = 1;         /* the co-tenant guard (tests turn it off) */
/* idle spin of a worker, and of a waiting caller: 1 ms covers the Python work
   between two calls of a loop (a 2 x 200^2 dtw_hvp call spends 0.2-0.3 ms
   outside its kernel); with 200 us the worker slept between calls, woke
   0.06-1.3 ms late on the benchmark VM and tripped the co-tenant guard, and
   two threads gave 1.1-1.3x one thread there (1.4-1.9x with 1 ms, with the
   rule for woken jobs below; docs/threads.md) */
static long long sm_spin_ns = 1000000;
static int sm_spin_yield = 256;     /* spins before a spinning worker starts yielding (<0: never) */
static int sm_last_planned = 0;     /* probes: the team the last job asked for, */
static int sm_last_used = 0;        /* the team it ran with, */
static int sm_last_joined = 0;      /* and the threads that ran at least one item */
static long long sm_guard_trips = 0;
static long long sm_spawns = 0;     /* worker threads started, ever (the guard skips those jobs) */
static long long sm_last_lag = -1;   /* ns from posting the last job to worker 1 starting on it */
static int sm_last_woke = 0;        /* the last job was posted while a worker slept */
static long long sm_last_waited = 0; /* ns the caller waited for workers after its own items */
static double sm_last_bar = 0;      /* the guard's bar the last job was judged by */
static long long sm_last_parts[4];  /* ns: the caller's wall and CPU time on the last job, worker 1's */
static int sm_last_judged = 0;      /* the guard judged the last job */
static int sm_last_slow = 0;        /* ... and found it slow */

static int sm_openmp_threads(void)
{
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

/* The thread count a call may use (before the work lowers it). */
static int sm_num_threads(void)
{
    int n = sm_setting > 0 ? sm_setting : sm_openmp_threads();
    if (n < 1) n = 1;
    return n > SM_POOL_MAX ? SM_POOL_MAX : n;
}

/* Threads for a job of `units` independent pieces and `work` elementary
 * operations (cells, edges): 1 below min_work, never more than units. */
static int sm_guard_backing_off(void);
static int sm_team(ptrdiff_t units, double work, double min_work)
{
    int n = sm_num_threads();
    /* while the co-tenant guard runs calls on one thread, plan for one thread
       (a DTW wavefront's tiles are sized for its team: its small parallel
       tiles run in order were slower than the one-thread tiles) */
    if (work < min_work || units < 2 || sm_guard_backing_off()) n = 1;
    else if ((ptrdiff_t)n > units) n = (int)units;
    sm_last_planned = n;
    return n;
}

#ifdef SM_POOL_THREADS

static inline void sm_cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static inline int64_t sm_now(clockid_t clk)
{
    struct timespec ts;
    clock_gettime(clk, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/*
 * Sleeping until a 32-bit word changes: a futex on Linux (no lock, so a
 * thread preempted while waking can never hold up another), elsewhere one
 * mutex and condition variable shared by every wait (waiters re-check).
 */
#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <limits.h>
static void sm_sleep_while(uint32_t *word, uint32_t value)
{
    syscall(SYS_futex, word, FUTEX_WAIT_PRIVATE, value, NULL, NULL, 0);
}
static void sm_wake_all(uint32_t *word)
{
    syscall(SYS_futex, word, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
}
static void sm_wait_reinit(void) {}
#else
static pthread_mutex_t sm_wait_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t sm_wait_cv = PTHREAD_COND_INITIALIZER;
static void sm_sleep_while(uint32_t *word, uint32_t value)
{
    pthread_mutex_lock(&sm_wait_mu);
    if (__atomic_load_n(word, __ATOMIC_SEQ_CST) == value)
        pthread_cond_wait(&sm_wait_cv, &sm_wait_mu);
    pthread_mutex_unlock(&sm_wait_mu);
}
static void sm_wake_all(uint32_t *word)
{
    (void)word;
    pthread_mutex_lock(&sm_wait_mu);
    pthread_cond_broadcast(&sm_wait_cv);
    pthread_mutex_unlock(&sm_wait_mu);
}
static void sm_wait_reinit(void)
{
    pthread_mutex_init(&sm_wait_mu, NULL);
    pthread_cond_init(&sm_wait_cv, NULL);
}
#endif

typedef struct {
    int64_t wall, cpu;                /* the thread's part of the last job */
    char pad[64 - 2 * sizeof(int64_t)];
} sm_slot_stat;

static struct {
    int sleepers;                     /* workers asleep (waiting for a job) */
    uint32_t fin_waiting;             /* the caller is asleep waiting for items */
    int nworkers;                     /* workers started (slots 1..nworkers) */
    int busy;                         /* a job is in flight */
    /* the job; written by the caller before it publishes gen */
    sm_task_fn fn;
    void *ctx;
    uint32_t n;
    int team;
    uint32_t gen;
    char pad0[64];
    uint64_t claim;                   /* gen << 32 | next item */
    char pad1[64];
    uint32_t done;                    /* items finished */
    int active;                       /* workers inside the job */
    char pad2[64];
    sm_slot_stat stat[SM_POOL_MAX];
    int64_t backoff_until, backoff;   /* co-tenant guard (monotonic ns) */
    unsigned slow_hist;               /* the last SM_GUARD_WINDOW judged jobs, 1 bit each: slow */
    pid_t pid;                        /* the process the workers belong to */
    int64_t posted, lag;              /* when the job was posted; worker 1's start - posted */
} sm_pool;

/* Claim and run items of job g until none is left; returns how many it ran. */
static ptrdiff_t sm_run_items(uint32_t g, int slot)
{
    ptrdiff_t ran = 0;
    uint32_t n = sm_pool.n;
    sm_task_fn fn = sm_pool.fn;
    void *ctx = sm_pool.ctx;
    for (;;) {
        uint64_t c = __atomic_load_n(&sm_pool.claim, __ATOMIC_ACQUIRE);
        for (;;) {
            if ((uint32_t)(c >> 32) != g || (uint32_t)c >= n) return ran;
            if (__atomic_compare_exchange_n(&sm_pool.claim, &c, c + 1, 1,
                                            __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
                break;
        }
        fn(ctx, (ptrdiff_t)(uint32_t)c, slot);
        ++ran;
        if (__atomic_add_fetch(&sm_pool.done, 1, __ATOMIC_SEQ_CST) == n
                && __atomic_load_n(&sm_pool.fin_waiting, __ATOMIC_SEQ_CST))
            sm_wake_all(&sm_pool.done);
    }
}

/* The job counter when each worker was started (written before
   pthread_create, which orders it before the worker's reads). A worker must
   not read the counter itself: its thread may begin running after the job
   that started it was posted, and would then wait for the next one. */
static uint32_t sm_start_gen[SM_POOL_MAX];

static void *sm_worker(void *arg)
{
    int slot = (int)(intptr_t)arg;
    uint32_t seen = sm_start_gen[slot], g;
    for (;;) {
        int64_t t0 = sm_now(CLOCK_MONOTONIC);
        int k = 0;
        for (;;) {               /* spin a little (yielding), then sleep */
            g = __atomic_load_n(&sm_pool.gen, __ATOMIC_ACQUIRE);
            if (g != seen) break;
            if (sm_spin_yield < 0 || k < sm_spin_yield) sm_cpu_relax();
            else sched_yield();  /* another thread wanting this CPU runs first */
            if (++k % 64 == 0 && sm_now(CLOCK_MONOTONIC) - t0 > sm_spin_ns) {
                __atomic_add_fetch(&sm_pool.sleepers, 1, __ATOMIC_SEQ_CST);
                while ((g = __atomic_load_n(&sm_pool.gen, __ATOMIC_SEQ_CST)) == seen)
                    sm_sleep_while(&sm_pool.gen, seen);
                __atomic_sub_fetch(&sm_pool.sleepers, 1, __ATOMIC_SEQ_CST);
                break;
            }
        }
        seen = g;
        if (slot >= __atomic_load_n(&sm_pool.team, __ATOMIC_ACQUIRE)) continue;
        __atomic_add_fetch(&sm_pool.active, 1, __ATOMIC_ACQ_REL);
        {
            int64_t w0 = sm_now(CLOCK_MONOTONIC), c0 = sm_now(CLOCK_THREAD_CPUTIME_ID);
            if (slot == 1) sm_pool.lag = w0 - sm_pool.posted;
            ptrdiff_t ran = sm_run_items(g, slot);
            sm_pool.stat[slot].wall = ran ? sm_now(CLOCK_MONOTONIC) - w0 : 0;
            sm_pool.stat[slot].cpu = ran ? sm_now(CLOCK_THREAD_CPUTIME_ID) - c0 : 0;
        }
        __atomic_sub_fetch(&sm_pool.active, 1, __ATOMIC_ACQ_REL);
    }
    return NULL;
}

/* Start workers up to slot want - 1 (after a fork the child has none). */
static int sm_start_workers(int want)
{
    pid_t pid = getpid();
    if (sm_pool.pid != pid) {     /* a forked child: the parent's workers are not here */
        sm_wait_reinit();
        sm_pool.sleepers = 0;
        sm_pool.fin_waiting = 0;
        sm_pool.nworkers = 0;
        sm_pool.active = 0;
        sm_pool.pid = pid;
    }
    while (sm_pool.nworkers < want - 1) {
        pthread_t t;
        pthread_attr_t attr;
        int ok;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        sm_start_gen[sm_pool.nworkers + 1] = sm_pool.gen;
        ok = pthread_create(&t, &attr, sm_worker, (void *)(intptr_t)(sm_pool.nworkers + 1)) == 0;
        pthread_attr_destroy(&attr);
        if (!ok) break;
        ++sm_pool.nworkers;
        ++sm_spawns;
    }
    return sm_pool.nworkers + 1;
}

static int sm_try_begin(void)
{
    int expected = 0;
    return __atomic_compare_exchange_n(&sm_pool.busy, &expected, 1, 0,
                                       __ATOMIC_ACQUIRE, __ATOMIC_RELAXED);
}
#endif /* SM_POOL_THREADS */

/* Whether the co-tenant guard runs calls on one thread now. */
static int sm_guard_backing_off(void)
{
#ifdef SM_POOL_THREADS
    return sm_guard_on && sm_now(CLOCK_MONOTONIC) < __atomic_load_n(&sm_pool.backoff_until, __ATOMIC_RELAXED);
#else
    return 0;
#endif
}

/* Tests: run calls on one thread for the next `ns` nanoseconds (0: stop). */
static void sm_force_backoff(long long ns)
{
#ifdef SM_POOL_THREADS
    __atomic_store_n(&sm_pool.backoff_until, ns > 0 ? sm_now(CLOCK_MONOTONIC) + ns : 0,
                     __ATOMIC_RELAXED);
    sm_pool.backoff = 0;
    sm_pool.slow_hist = 0;
#else
    (void)ns;
#endif
}

/*
 * fn(ctx, item, slot) for item in [0, n), on up to `team` threads (the
 * calling thread among them), judged by the co-tenant guard against `bar`.
 * Returns the team it ran with.
 */
static int sm_parallel_for_bar(ptrdiff_t n, int team, sm_task_fn fn, void *ctx, double bar)
{
    ptrdiff_t i;
#ifdef SM_POOL_THREADS
    if (team > SM_POOL_MAX) team = SM_POOL_MAX;
    if (team > 1 && n > 1 && n < (ptrdiff_t)UINT32_MAX && sm_guard_backing_off())
        team = 1;
    if (team > 1 && n > 1 && n < (ptrdiff_t)UINT32_MAX && sm_try_begin()) {
        int64_t w0, c0, t0, wall, cpu = 0;
        int s, k = 0, joined = 1, slow = 0;
        const long long spawns = sm_spawns;
        uint32_t g;
        team = sm_start_workers(team) < team ? sm_pool.nworkers + 1 : team;
        /* a job that started threads is not judged: a new thread's start
           (and its first touches of stack and workspace) says nothing about
           another process's load; without this rule, with the new worker
           joining its job, 1 in 5 fresh processes still tripped the guard
           on their first two-thread dtw_grad at 2 x 200^2 */
        const int spawned = sm_spawns != spawns;
        if (team > 1) {
            for (s = 0; s < team; ++s) sm_pool.stat[s].wall = sm_pool.stat[s].cpu = 0;
            g = sm_pool.gen + 1;
            sm_pool.fn = fn;
            sm_pool.ctx = ctx;
            sm_pool.n = (uint32_t)n;
            __atomic_store_n(&sm_pool.team, team, __ATOMIC_RELEASE);
            __atomic_store_n(&sm_pool.done, 0, __ATOMIC_RELEASE);
            __atomic_store_n(&sm_pool.claim, (uint64_t)g << 32, __ATOMIC_RELEASE);
            sm_pool.posted = sm_now(CLOCK_MONOTONIC);
            sm_pool.lag = -1;
            __atomic_store_n(&sm_pool.gen, g, __ATOMIC_SEQ_CST);
            const int woke = __atomic_load_n(&sm_pool.sleepers, __ATOMIC_SEQ_CST) > 0;
            if (woke)
                sm_wake_all(&sm_pool.gen);
            w0 = sm_now(CLOCK_MONOTONIC);
            c0 = sm_now(CLOCK_THREAD_CPUTIME_ID);
            sm_run_items(g, 0);
            sm_pool.stat[0].wall = sm_now(CLOCK_MONOTONIC) - w0;
            sm_pool.stat[0].cpu = sm_now(CLOCK_THREAD_CPUTIME_ID) - c0;
            /* wait for the items other threads hold, and for them to leave */
            t0 = sm_now(CLOCK_MONOTONIC);
            while (__atomic_load_n(&sm_pool.done, __ATOMIC_ACQUIRE) < (uint32_t)n
                   || __atomic_load_n(&sm_pool.active, __ATOMIC_ACQUIRE) > 0) {
                sm_cpu_relax();
                if (++k % 64 == 0 && sm_now(CLOCK_MONOTONIC) - t0 > sm_spin_ns) {
                    uint32_t d = __atomic_load_n(&sm_pool.done, __ATOMIC_SEQ_CST);
                    if (d < (uint32_t)n) {
                        __atomic_store_n(&sm_pool.fin_waiting, 1, __ATOMIC_SEQ_CST);
                        while ((d = __atomic_load_n(&sm_pool.done, __ATOMIC_SEQ_CST)) < (uint32_t)n)
                            sm_sleep_while(&sm_pool.done, d);
                        __atomic_store_n(&sm_pool.fin_waiting, 0, __ATOMIC_SEQ_CST);
                    } else {
                        sched_yield();   /* a worker between its last item and leaving */
                    }
                }
            }
            wall = sm_now(CLOCK_MONOTONIC) - w0;
            const int64_t waited = wall - sm_pool.stat[0].wall;
            for (s = 1; s < team; ++s) joined += sm_pool.stat[s].wall > 0;
            for (s = 0; s < team; ++s) cpu += sm_pool.stat[s].cpu;
            /* the job took about as long as its CPU time on one thread would have
               (or longer: a worker that woke too late to help took the CPU
               from the caller). A job posted while a worker slept is judged
               only if the caller then waited for a worker: waking a sleeping
               thread (a halted virtual CPU) took 0.06-1.3 ms on the benchmark
               VM with no other process about, the caller ran the items alone,
               and the trip sent the next 50 ms of calls to one thread (the
               first call after every pause of a loop) */
            const int judged = !spawned && wall > SM_GUARD_MIN_NS
                               && (!woke || waited > SM_GUARD_MIN_NS);
            slow = judged && wall > bar * cpu;
            if (judged)
                sm_pool.slow_hist = ((sm_pool.slow_hist << 1) | (unsigned)slow)
                                    & ((1u << SM_GUARD_WINDOW) - 1);
            if (slow && __builtin_popcount(sm_pool.slow_hist) >= SM_GUARD_STRIKES) {
                int64_t b = sm_pool.backoff ? 2 * sm_pool.backoff : SM_BACKOFF_MIN_NS;
                sm_pool.backoff = b > SM_BACKOFF_MAX_NS ? SM_BACKOFF_MAX_NS : b;
                __atomic_store_n(&sm_pool.backoff_until,
                                 sm_now(CLOCK_MONOTONIC) + sm_pool.backoff, __ATOMIC_RELAXED);
                ++sm_guard_trips;
                sm_pool.slow_hist = 0;
            } else if (joined > 1 && !slow) {
                /* threads paid (or the job was not judged): the next trip
                   backs off from 50 ms again. Resetting only after a window
                   of 8 good judged jobs kept loops whose Python or torch work
                   outlasts the worker's idle spin (most jobs woke it and went
                   unjudged) in backoffs doubled to seconds: a torch soft-DTW
                   step with smoothmax on two threads took 0.92-0.96 of its
                   one-thread time, 0.61 with this rule (bench_e2e --split) */
                sm_pool.backoff = 0;
            }
            sm_last_judged = judged;
            sm_last_slow = slow;
            sm_last_used = team;
            sm_last_joined = joined;
            sm_last_lag = sm_pool.lag;
            sm_last_woke = woke;
            sm_last_waited = waited;
            sm_last_bar = bar;
            sm_last_parts[0] = sm_pool.stat[0].wall;
            sm_last_parts[1] = sm_pool.stat[0].cpu;
            sm_last_parts[2] = sm_pool.stat[1].wall;
            sm_last_parts[3] = sm_pool.stat[1].cpu;
            __atomic_store_n(&sm_pool.busy, 0, __ATOMIC_RELEASE);
            return team;
        }
        __atomic_store_n(&sm_pool.busy, 0, __ATOMIC_RELEASE);
    }
#endif
    (void)bar;
    for (i = 0; i < n; ++i) fn(ctx, i, 0);
    sm_last_used = 1;
    sm_last_joined = 1;
    sm_last_judged = sm_last_slow = 0;
    return 1;
}

/* A job of independent items (a batch). */
static int sm_parallel_for(ptrdiff_t n, int team, sm_task_fn fn, void *ctx)
{
    return sm_parallel_for_bar(n, team, fn, ctx, sm_guard_bar);
}

/*
 * Workspaces on whole cache lines: a kernel's vector loads and stores of a
 * slot's scratch then do not straddle two lines by the luck of the heap
 * (malloc gives 16 bytes; a 64-byte AVX-512 access of a misaligned buffer
 * touches two lines, and a store that does cannot be forwarded to the load
 * that reads it back, as the Viterbi step does with its row of scratch).
 * sm_slot_len rounds a per-thread length in doubles up to whole lines.
 */
#define SM_LINE 64
static inline ptrdiff_t sm_slot_len(ptrdiff_t n)
{
    const ptrdiff_t per_line = SM_LINE / (ptrdiff_t)sizeof(double);
    return (n + per_line - 1) / per_line * per_line;
}
static inline void *sm_alloc_lines(size_t bytes)
{
    if (bytes == 0) bytes = 1;
#if defined(_MSC_VER)
    return _aligned_malloc(bytes, SM_LINE);
#else
    void *p = NULL;
    return posix_memalign(&p, SM_LINE, bytes) == 0 ? p : NULL;
#endif
}
static inline void sm_free_lines(void *p)
{
#if defined(_MSC_VER)
    _aligned_free(p);
#else
    free(p);
#endif
}

/*
 * sm_parallel_for with a workspace for each thread: *per_slot doubles, first
 * rounded up to whole cache lines (sm_slot_len, written back), so that slot s
 * uses *work + s * *per_slot, line-aligned. *work points at it while the job
 * runs and is freed after. Returns -1, running nothing, if it cannot be
 * allocated.
 */
static int sm_parallel_for_work(ptrdiff_t n, int team, sm_task_fn fn, void *ctx,
                                double **work, ptrdiff_t *per_slot)
{
    *per_slot = sm_slot_len(*per_slot);
    *work = (double *)sm_alloc_lines((size_t)team * (size_t)*per_slot * sizeof(double));
    if (*work == NULL) return -1;
    team = sm_parallel_for(n, team, fn, ctx);
    sm_free_lines(*work);
    *work = NULL;
    return team;
}

/*
 * Wavefront over an nI x nJ grid of tiles: fn(ctx, I, J, slot) for every
 * tile, each after its two neighbours toward the start, (I - 1, J) and
 * (I, J - 1) (toward the end when reverse), which covers the diagonal one.
 * Tiles are pool items in tile-anti-diagonal order: a tile is claimed only
 * after every tile before it, which are running or done, so waiting for its
 * neighbours never deadlocks. done: nI * nJ flags, zeroed here.
 */
typedef void (*sm_tile_fn)(void *ctx, ptrdiff_t I, ptrdiff_t J, int slot);

typedef struct {
    ptrdiff_t nI, nJ;
    int reverse;
    sm_tile_fn fn;
    void *ctx;
    int *done;
    int sleepers;                     /* threads asleep waiting for a tile */
    uint32_t finished;                /* tiles done (the word they sleep on) */
} sm_wave;

#ifdef SM_POOL_THREADS
static inline int sm_tile_ready(sm_wave *w, ptrdiff_t a, ptrdiff_t b)
{
    return (a < 0 || __atomic_load_n(&w->done[a], __ATOMIC_SEQ_CST))
        && (b < 0 || __atomic_load_n(&w->done[b], __ATOMIC_SEQ_CST));
}
#endif

static void sm_tile_of(ptrdiff_t k, ptrdiff_t nI, ptrdiff_t nJ, ptrdiff_t *I, ptrdiff_t *J)
{
    /* k-th tile in anti-diagonal order (diagonal by diagonal, I increasing) */
    ptrdiff_t d = 0, len;
    for (;;) {
        ptrdiff_t lo = d - nJ + 1 > 0 ? d - nJ + 1 : 0;
        ptrdiff_t hi = d < nI - 1 ? d : nI - 1;
        len = hi - lo + 1;
        if (k < len) { *I = lo + k; *J = d - *I; return; }
        k -= len;
        ++d;
    }
}

static void sm_wave_item(void *p, ptrdiff_t t, int slot)
{
    sm_wave *w = (sm_wave *)p;
    ptrdiff_t I, J, a = -1, b = -1, nI = w->nI, nJ = w->nJ;
    sm_tile_of(t, nI, nJ, &I, &J);
    if (w->reverse) { I = nI - 1 - I; J = nJ - 1 - J; }
    if (!w->reverse) {
        if (I > 0) a = (I - 1) * nJ + J;
        if (J > 0) b = I * nJ + J - 1;
    } else {
        if (I < nI - 1) a = (I + 1) * nJ + J;
        if (J < nJ - 1) b = I * nJ + J + 1;
    }
#ifdef SM_POOL_THREADS
    if (!sm_tile_ready(w, a, b)) {
        /* spin a little, then sleep until a tile finishes: a waiting thread
           must not take the CPU from the one it waits for (they may share a core) */
        int64_t t0 = sm_now(CLOCK_MONOTONIC);
        int k = 0;
        while (!sm_tile_ready(w, a, b)) {
            sm_cpu_relax();
            if (++k % 64 == 0 && sm_now(CLOCK_MONOTONIC) - t0 > SM_TILE_SPIN_NS) {
                __atomic_add_fetch(&w->sleepers, 1, __ATOMIC_SEQ_CST);
                for (;;) {
                    uint32_t f = __atomic_load_n(&w->finished, __ATOMIC_SEQ_CST);
                    if (sm_tile_ready(w, a, b)) break;
                    sm_sleep_while(&w->finished, f);
                }
                __atomic_sub_fetch(&w->sleepers, 1, __ATOMIC_SEQ_CST);
            }
        }
    }
    w->fn(w->ctx, I, J, slot);
    __atomic_store_n(&w->done[I * nJ + J], 1, __ATOMIC_SEQ_CST);
    __atomic_add_fetch(&w->finished, 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&w->sleepers, __ATOMIC_SEQ_CST) > 0)
        sm_wake_all(&w->finished);
#else
    (void)a; (void)b;
    w->fn(w->ctx, I, J, slot);
#endif
}

static int sm_wavefront(ptrdiff_t nI, ptrdiff_t nJ, int reverse, sm_tile_fn fn, void *ctx,
                        int *done, int team)
{
    sm_wave w;
    ptrdiff_t k;
    for (k = 0; k < nI * nJ; ++k) done[k] = 0;
    w.nI = nI; w.nJ = nJ; w.reverse = reverse; w.fn = fn; w.ctx = ctx; w.done = done;
    w.sleepers = 0;
    w.finished = 0;
    return sm_parallel_for_bar(nI * nJ, team, sm_wave_item, &w, sm_guard_bar_wave);
}

#endif /* SMOOTHMAX_POOL_H */
