/*
 * SIMD kernels of the compiled engine (C++17, included by the Cython
 * extensions compiled in C++ mode): the anti-diagonal loops of the DTW_Omega
 * forward and reverse passes, the Viterbi step over the S rows of one time
 * step, and the generic row max_Omega / H.u used by the Viterbi, DAG and CRF
 * engines (operators.pxd declares them for Cython).
 *
 * The operator maths (value, weights q, Hessian product; exp/log) is not
 * here: it is include/smx_ops.hpp, shared with the CUDA kernels. This file
 * holds the loops around it.
 *
 * Cells (i, j) on one anti-diagonal d = i + j depend only on the two previous
 * anti-diagonals, so the loop over a diagonal has independent iterations and
 * is vectorized by the compiler. The per-cell work (smx::max3 / smx::hvp3)
 * is branch-free and its exp/log are smx_ops.hpp's inline polynomials:
 * libm's exp/log do not vectorize without -ffast-math, which we cannot use.
 *
 * Types: every kernel is a template on the caller's float type T (float or
 * double) for theta, E and the stored weights q; R, ebar and the operator
 * arithmetic are double. Cython's fused `floating` picks the instantiation.
 *
 * ISA: a kernel is a struct K with an always-inline `run`; on x86-64 with
 * GCC or clang, smx::cpu::dispatch<K>(args) calls one of three
 * instantiations of K::run compiled under __attribute__((target(...))), for
 * AVX-512 (8 doubles a vector), AVX2 + FMA and the x86-64 baseline (SSE2),
 * chosen by init_isa() (called once at import, else lazily) with
 * __builtin_cpu_supports: one source text for all ISAs. We do not use
 * target_clones("arch=..."): its resolver tests the CPU *model*, which a
 * virtual machine may hide, and per-feature clones cannot ask for AVX-512
 * *and* FMA in one clone. With SMOOTHMAX_NATIVE=1 (-march=native defines
 * __AVX512F__ or __AVX2__), on other architectures (NEON on arm64) or
 * compilers, one version is built for whatever the compiler targets.
 */
#ifndef SMOOTHMAX_SIMD_H
#define SMOOTHMAX_SIMD_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <cmath>

/* vectors of up to 64 bytes (vec<T, W> below) in functions that are always inlined: no ABI */
#pragma GCC diagnostic ignored "-Wpsabi"
#include "include/smx_ops.hpp"

#define SM_INF (__builtin_inf())
#define SMX_R __restrict__

namespace smx {
namespace cpu {

/* sum of 8 lanes as a tree (latency 3 adds, not 8) */
SMX_HD double sum8(const double *a)
{
    return (((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7])));
}

/*
 * max of x[:n], with y (n doubles) as scratch: y[j] = max(x[j], y[j - 8]) is a
 * distance-8 recurrence that the loop vectorizer turns into vector max
 * instructions (a loop over 8 local accumulators is scalarized instead, and
 * compiled to scalar compares). -inf entries are fine; NaN is never fed.
 */
SMX_HD double rowmax(ptrdiff_t n, const double *SMX_R x, double *SMX_R y)
{
    ptrdiff_t j, n8 = n & ~(ptrdiff_t)7;
    double m = -SM_INF;
    if (n8 > 0) {
        for (j = 0; j < 8; ++j) y[j] = x[j];
        for (j = 8; j < n8; ++j) {
            double v = x[j], a = y[j - 8];
            y[j] = v > a ? v : a;
        }
        const double *t = y + n8 - 8;  /* a tree, not a chain of 8 dependent maxima */
        double m01 = t[0] > t[1] ? t[0] : t[1], m23 = t[2] > t[3] ? t[2] : t[3];
        double m45 = t[4] > t[5] ? t[4] : t[5], m67 = t[6] > t[7] ? t[6] : t[7];
        double m03 = m01 > m23 ? m01 : m23, m47 = m45 > m67 ? m45 : m67;
        m = m03 > m47 ? m03 : m47;
    }
    for (j = n8; j < n; ++j) m = x[j] > m ? x[j] : m;
    return m;
}

/*
 * A small vector abstraction for loops whose reductions the loop vectorizer
 * does not vectorize (a max or a sum over a row; it keeps them scalar without
 * -ffast-math): vec<T, W>::type is a GCC/Clang vector of W bytes, W the
 * register width of the dispatch's ISA (dispatch_w below: 64 for AVX-512, 32
 * for AVX2, 16 for SSE2 and NEON), and smx::exp_nonpos runs on it unchanged
 * (fp<> below). One width for every ISA does not do: 64-byte vectors compiled
 * for AVX2 (two registers each) spilled to the stack, and the Viterbi
 * negentropy rows ran 3-6x slower than with 32-byte ones (bench/results/
 * core_ops_vec_width.md, docs/engines.md). This file is GCC/Clang only already
 * (__builtin_inf, __restrict__).
 */
template <typename T, int N> struct vecn {  /* N lanes of T */
    typedef T type __attribute__((vector_size(N * sizeof(T))));
    typedef typename fp<T>::bits_t bits __attribute__((vector_size(N * sizeof(T))));
    enum { n = N };
};
template <typename T, int W> struct vec : vecn<T, W / (int)sizeof(T)> {};  /* W bytes */
}  // namespace cpu
/* fp<> of the vector types (smx::exp_nonpos on them): the widths a row's
 * vectors and its tail's halving vectors use */
#define SMX_FP_VEC(T, N) \
    template <> struct fp<cpu::vecn<T, N>::type> : fp<T> { typedef cpu::vecn<T, N>::bits bits_t; };
SMX_FP_VEC(double, 8) SMX_FP_VEC(double, 4) SMX_FP_VEC(double, 2)
SMX_FP_VEC(float, 16) SMX_FP_VEC(float, 8) SMX_FP_VEC(float, 4) SMX_FP_VEC(float, 2)
#undef SMX_FP_VEC
namespace cpu {

/* max / sum of the N lanes of v, halving it (log2 N vector steps) */
struct LanesMax { template <class H> static SMX_HD H op(H a, H b) { return a > b ? a : b; } };
struct LanesSum { template <class H> static SMX_HD H op(H a, H b) { return a + b; } };
template <typename T, int N, class Op, typename V> SMX_HD T lanes_reduce(V v)
{
    if constexpr (N == 1) {
        return v[0];
    } else {
        typedef T H __attribute__((vector_size(N * sizeof(T) / 2)));
        H a, b;
        memcpy(&a, &v, sizeof a);
        memcpy(&b, (const char *)&v + sizeof a, sizeof b);
        return lanes_reduce<T, N / 2, Op>(Op::op(a, b));
    }
}
template <typename T, int N, typename V> SMX_HD T lanes_max(V v) { return lanes_reduce<T, N, LanesMax>(v); }
template <typename T, int N, typename V> SMX_HD T lanes_sum(V v) { return lanes_reduce<T, N, LanesSum>(v); }
template <typename V> SMX_HD V vload(const void *p) { V v; memcpy(&v, p, sizeof v); return v; }
template <typename V> SMX_HD void vstore(void *p, V v) { memcpy(p, &v, sizeof v); }

/*
 * DTW over the n cells of one diagonal (first cell i0, then i0+1, ...).
 * Forward:
 *   out[k] = theta[k] + min_Omega(up[k], left[k], dg[k]),
 *   min_Omega(r) = -max_Omega(-r), weights q = grad max_Omega(-r),
 * with up = R[i-1, j], left = R[i, j-1], dg = R[i-1, j-1]; when qu is not
 * NULL, two weights a cell are kept, qu[k] and ql[k] (qd: n values of
 * scratch): the third is qd = 1 - qu - ql (dtw_q_diag). Where qd is exactly 0
 * (sparsemax, the hard max, a +inf diagonal predecessor, an underflow), ql is
 * kept as 1 - qu rounded in T, so that dtw_q_diag gives exactly 0 again. All
 * three +inf: value +inf and the pair (0, 1); no path reaches such a cell, so
 * its ebar is exactly 0 and its pair never reaches E.
 * Reverse over one diagonal:
 *   out[k] = eu[k]*qu[k] + el[k]*ql[k] + ed[k]*dtw_q_diag(du[k], dl[k])
 * with eu = ebar(i+1, j), el = ebar(i, j+1), ed = ebar(i+1, j+1) and the
 * weights of those children toward (i, j) (du, dl: the stored pair of the
 * diagonal child). theta and E along a diagonal are
 * strided in memory (stride NB - 1, one row each): the caller copies theta
 * into / E out of contiguous diagonal buffers, eight diagonals at a time, so
 * that each row of theta / E is visited once per eight diagonals (strided
 * gathers and scatters in these loops cost a cache and TLB miss per cell).
 *
 * The HVP stores all three weights (and their three tangents): its reverse
 * pass reads each of them twice and is short of compute, not of memory.
 *
 * HVP (docs/spec.md §2), forward, per cell, with u the tangents Rdot of the
 * predecessors (up, left, diagonal):
 *   out = theta + min_Omega(r),  dout = z + <q, u>,  qdot = -H(-r) u;
 * reverse, per cell, with the children's ebar (e*) and ebar_dot (f*):
 *   out  = eu qu + el ql + ed qd,
 *   dout = fu qu + eu qdu + fl ql + el qdl + fd qd + ed qdd.
 * A q of 0 multiplies a finite tangent, so masked cells give exact zeros.
 */
/* The diagonal weight of a cell from its stored pair (smx::dtw_q_diag, the
 * rule the GPU kernels share), widened to the double of the reverse pass. */
template <typename T> SMX_HD double dtw_q_diag(T qu, T ql) { return (double)smx::dtw_q_diag(qu, ql); }

template <typename T, bool STORE>
struct DtwFwdLoop {
    template <int REG>
    static SMX_HD void run(ptrdiff_t n, const double *SMX_R theta, const double *SMX_R up,
                           const double *SMX_R left, const double *SMX_R dg, double *SMX_R out,
                           T *SMX_R qu, T *SMX_R ql, T *SMX_R qd, double gamma, double ig)
    {
        for (ptrdiff_t k = 0; k < n; ++k) {
            T qa, qb, qc;  /* the weights' arithmetic in T (smx::max3) */
            double v = smx::max3<double, REG, T>(-up[k], -left[k], -dg[k], gamma, ig, qa, qb, qc);
            out[k] = theta[k] - v;
            if (STORE) { qu[k] = qa; ql[k] = qb; qd[k] = qc; }
        }
        /* ql where qd is 0, in a loop of its own: a test of qc in the loop
         * above changes how the compiler contracts the value's products into
         * fused multiply-adds (measured: the value differed from the value
         * pass's in the last bit), and the value and gradient passes must
         * agree to the bit. Negentropy too: a +inf predecessor (a masked
         * cell) has weight exactly 0, and its E must be exactly 0 */
        if (STORE) {
#pragma GCC ivdep
            for (ptrdiff_t k = 0; k < n; ++k) ql[k] = smx::dtw_stored_left(qu[k], ql[k], qd[k]);
        }
    }
};

struct DtwFwd {
    template <typename T>
    static SMX_HD void run(ptrdiff_t n, const double *theta, const double *up, const double *left,
                           const double *dg, double *out, T *qu, T *ql, T *qd, int reg,
                           double gamma)
    {
        const double ig = 1.0 / gamma;
        if (qu != NULL)
            with_reg<DtwFwdLoop<T, true>>(reg, n, theta, up, left, dg, out, qu, ql, qd, gamma, ig);
        else
            with_reg<DtwFwdLoop<T, false>>(reg, n, theta, up, left, dg, out, qu, ql, qd, gamma, ig);
    }
};

struct DtwBwd {
    template <typename T>
    static SMX_HD void run(ptrdiff_t n, const double *SMX_R eu, const double *SMX_R el,
                           const double *SMX_R ed, const T *SMX_R qu, const T *SMX_R ql,
                           const T *SMX_R du, const T *SMX_R dl, double *SMX_R out)
    {
        for (ptrdiff_t k = 0; k < n; ++k)
            out[k] = eu[k] * (double)qu[k] + el[k] * (double)ql[k]
                     + ed[k] * dtw_q_diag(du[k], dl[k]);
    }
};

template <typename T>
struct DtwFwdHvpLoop {
    template <int REG>
    static SMX_HD void run(ptrdiff_t n, const double *SMX_R theta, const double *SMX_R z,
                           const double *SMX_R up, const double *SMX_R left,
                           const double *SMX_R dg, double *SMX_R out,
                           const double *SMX_R dup, const double *SMX_R dleft,
                           const double *SMX_R ddg, double *SMX_R dout,
                           T *SMX_R qu, T *SMX_R ql, T *SMX_R qd,
                           T *SMX_R qdu, T *SMX_R qdl, T *SMX_R qdd, double gamma, double ig)
    {
        for (ptrdiff_t k = 0; k < n; ++k) {
            double qa, qb, qc, ha, hb, hc;
            double v = smx::max3<double, REG>(-up[k], -left[k], -dg[k], gamma, ig, qa, qb, qc);
            out[k] = theta[k] - v;
            double rd = smx::hvp3<double, REG>(qa, qb, qc, dup[k], dleft[k], ddg[k], ig, ha, hb, hc);
            dout[k] = z[k] + rd;
            qu[k] = (T)qa; ql[k] = (T)qb; qd[k] = (T)qc;
            qdu[k] = (T)(-ha); qdl[k] = (T)(-hb); qdd[k] = (T)(-hc);  /* -H(-r) u for min_Omega */
        }
    }
};

struct DtwFwdHvp {
    template <typename T>
    static SMX_HD void run(ptrdiff_t n, const double *theta, const double *z, const double *up,
                           const double *left, const double *dg, double *out, const double *dup,
                           const double *dleft, const double *ddg, double *dout, T *qu, T *ql,
                           T *qd, T *qdu, T *qdl, T *qdd, int reg, double gamma)
    {
        with_reg<DtwFwdHvpLoop<T>>(reg, n, theta, z, up, left, dg, out, dup, dleft, ddg, dout,
                                   qu, ql, qd, qdu, qdl, qdd, gamma, 1.0 / gamma);
    }
};

struct DtwBwdHvp {
    template <typename T>
    static SMX_HD void run(ptrdiff_t n, const double *SMX_R eu, const double *SMX_R el,
                           const double *SMX_R ed, const double *SMX_R fu,
                           const double *SMX_R fl, const double *SMX_R fd,
                           const T *SMX_R qu, const T *SMX_R ql, const T *SMX_R qd,
                           const T *SMX_R qdu, const T *SMX_R qdl, const T *SMX_R qdd,
                           double *SMX_R out, double *SMX_R dout)
    {
        for (ptrdiff_t k = 0; k < n; ++k) {
            double a = (double)qu[k], b = (double)ql[k], c = (double)qd[k];
            out[k] = eu[k] * a + el[k] * b + ed[k] * c;
            dout[k] = fu[k] * a + eu[k] * (double)qdu[k] + fl[k] * b
                      + el[k] * (double)qdl[k] + fd[k] * c + ed[k] * (double)qdd[k];
        }
    }
};

/*
 * Negentropy max over a row: returns gamma*logsumexp(x/gamma), writes
 * softmax(x/gamma) to q. The max uses rowmax, the sum 8 partial accumulators,
 * so that the reductions vectorize without -ffast-math. All -inf: -inf and
 * q = 0. (The l2 and hard rows are smx::row_max of smx_ops.hpp: no
 * reduction there is worth vectorizing.)
 */
struct NegentropyRow {
    static SMX_HD double run(ptrdiff_t n, const double *SMX_R x, double *SMX_R q, double gamma)
    {
        double acc[8];
        ptrdiff_t k, l;
        double m = rowmax(n, x, q);  /* q is scratch until the weights */
        if (!(m > -SM_INF)) {
            for (k = 0; k < n; ++k) q[k] = 0.0;
            return -SM_INF;
        }
        const double ig = 1.0 / gamma;
        for (k = 0; k < n; ++k) q[k] = smx::exp_nonpos((x[k] - m) * ig);
        for (l = 0; l < 8; ++l) acc[l] = 0.0;
        for (k = 0; k + 8 <= n; k += 8)
            for (l = 0; l < 8; ++l) acc[l] += q[k + l];
        double s = 0.0;
        for (l = 0; l < 8; ++l) s += acc[l];
        for (; k < n; ++k) s += q[k];
        const double inv = 1.0 / s;  /* s >= 1: the max contributes exp(0) */
        for (k = 0; k < n; ++k) q[k] *= inv;
        return smx::value<double, NEGENTROPY>(m, s, gamma);
    }
};

/*
 * Viterbi: one step t of the forward pass over all S rows i,
 *   Vn[i] = max_Omega_j (th[i, j] + V[j]),  q_i = grad of that max.
 * Value (E == NULL): Vn only. Gradient (E != NULL, z == NULL): E[i, :] = q_i,
 * except for negentropy with inv != NULL: E[i, :] gets the unnormalized exp
 * and inv[i] = 1/s_i, the reverse step multiplies by it (one pass over the
 * block fewer). HVP (z != NULL): E[i, :] = q_i, u = z[i, :] + Vd,
 * Vdn[i] = <q_i, u>; inv unused. x is 4 S doubles of scratch. A row that is
 * all -inf gets -inf, q = 0, inv = 0 (and Vdn = 0). *bad is incremented by
 * the number of NaN or +inf scores met (the caller rejects the input: the
 * check rides on the one read of theta). Negentropy takes the logs of the S
 * rows in one vectorized loop after the rows.
 * Reverse step: E[i, j] = c_i E[i, j] with c_i = eb[i] inv[i] (eb[i] when
 * inv is NULL), nb[j] = sum_i E[i, j], and for the HVP (Ed != NULL) the
 * tangent qdot = H(q) u, u = z[i, :] + Vdp (smx::hvp, <q_i, u> = Vdt[i]) is
 * formed here from the stored q and the forward's Vdot of steps t - 1 (Vdp)
 * and t (Vdt), Ed[i, j] = ebd[i] q + eb[i] qdot, nbd[j] = sum_i Ed[i, j].
 */
/* x = row + V, a row of the step in double; NaN or +inf scores counted in
 * *bad */
template <typename T>
SMX_HD void vit_row(ptrdiff_t S, const T *SMX_R row, const double *SMX_R V, double *SMX_R x,
                    double *SMX_R bad)
{
    /* One loop over j, so that the loop vectorizer (not the SLP one) runs it
     * at the full double width for float scores too: in an 8-lane unrolled
     * body, float scores were widened in half-width vectors whose stores of
     * x then stalled the full-width loads of rowmax (store forwarding), and
     * float ran 1.5x slower than double at S = 16. The check reads the
     * score, not the sum (V can be +inf when gamma is near the largest float:
     * the caller's overflow rescue needs that value, not an error); an integer
     * count is a reduction the vectorizer may reorder. */
    ptrdiff_t j;
    long nbad = 0;
    for (j = 0; j < S; ++j) {
        double r = (double)row[j];
        x[j] = r + V[j];
        nbad += !(r < SM_INF);
    }
    *bad += (double)nbad;
}

/* A row's tail of fewer than 2N entries, from j: one vector of N lanes if N
 * are left, then N/2, ..., 1 (each remainder is a sum of distinct powers of
 * two). vit_max_tail: x = row + vs, its max into m, NaN / +inf scores counted
 * in nbad; vit_exps_tail: e = exp((x - m) ig), into erow (unless NULL) and
 * added to sum. All in T. */
template <typename T, int N>
SMX_HD void vit_max_tail(ptrdiff_t S, ptrdiff_t &j, const T *SMX_R row, const T *SMX_R vs,
                         T *SMX_R x, T &m, double &nbad)
{
    if constexpr (N == 1) {
        if (j < S) {
            nbad += !(row[j] < smx::inf<T>());
            x[j] = row[j] + vs[j];
            m = x[j] > m ? x[j] : m;
            ++j;
        }
    } else {
        if (j + N <= S) {
            typedef typename vecn<T, N>::type VH;
            const VH rv = vload<VH>(row + j);
            for (int l = 0; l < N; ++l) nbad += !(rv[l] < smx::inf<T>());
            const VH xv = rv + vload<VH>(vs + j);
            vstore(x + j, xv);
            const T mh = lanes_max<T, N>(xv);
            m = mh > m ? mh : m;
            j += N;
        }
        vit_max_tail<T, N / 2>(S, j, row, vs, x, m, nbad);
    }
}

template <typename T, int N>
SMX_HD void vit_exps_tail(ptrdiff_t S, ptrdiff_t &j, const T *SMX_R x, T m, T ig,
                          T *SMX_R erow, T &sum)
{
    if constexpr (N == 1) {
        if (j < S) {
            const T e = exp_nonpos((x[j] - m) * ig);
            if (erow != NULL) erow[j] = e;
            sum += e;
            ++j;
        }
    } else {
        if (j + N <= S) {
            typedef typename vecn<T, N>::type VH;
            const VH e = exp_nonpos((vload<VH>(x + j) - m) * ig);
            if (erow != NULL) vstore(erow + j, e);
            sum += lanes_sum<T, N>(e);
            j += N;
        }
        vit_exps_tail<T, N / 2>(S, j, x, m, ig, erow, sum);
    }
}

/* value and gradient (z == NULL), all in the caller's type T (float keeps
 * twice the lanes of double in every loop, with no conversions):
 *   the step's shift c = max_j V[j] (0 when V is all -inf) and
 *   vs = V - c in T, once for the S rows (for T narrower than double: in
 *   double, vs = V and c = 0); per row x = row + vs, its max m,
 *   the exps e = exp((x - m)/gamma) and their sum, the max and the sum
 *   reduced in vector steps, a row's tail in halving vectors (scalar tails
 *   ran S = 12 1.3x slower than the loops); msum[i] = c + m (in double),
 *   msum[S + i] = sum.
 * Shifting V by its max keeps the entries of x at the scale of the scores
 * (x <= max row), so float rounds x as it rounds the scores themselves; the
 * value c + m + gamma log(sum) is exact for the rounded x (log-sum-exp does
 * not depend on the shift). Until wave 2, x and m were in double and only the
 * exps in T: float32 ran 1.2-1.5x float64 at S = 16, the conversions and the
 * double-width max pass taking what the float exps saved. Returns the
 * NaN / +inf count. */
template <typename T, int W>
SMX_HD double vit_rows_negentropy(ptrdiff_t S, const T *SMX_R th, const double *SMX_R V,
                                  T *SMX_R E, double *SMX_R scratch, double *SMX_R msum,
                                  double gamma)
{
    typedef typename vec<T, W>::type VT;
    const int nt = vec<T, W>::n;
    const T inf = smx::inf<T>();
    const T ig = (T)(1.0 / gamma);
    T *SMX_R x = (T *)scratch;  /* S values of T */
    const T *SMX_R vs;
    double c = 0.0;
    if constexpr (sizeof(T) < sizeof(double)) {
        T *SMX_R v = (T *)(scratch + S);  /* S values of T */
        c = -SM_INF;
        for (ptrdiff_t j = 0; j < S; ++j) c = V[j] > c ? V[j] : c;
        c = c > -SM_INF ? c : 0.0;  /* V all -inf (no path yet): no shift. (V is finite
                                     * otherwise: float scores sum far below double's range) */
        for (ptrdiff_t j = 0; j < S; ++j) v[j] = (T)(V[j] - c);
        vs = v;
    } else {
        vs = V;  /* double needs no shift: x = row + V, so float64 results stay
                  * bit for bit what they were (the shift's cost at S = 8 measured
                  * 1.03-1.07x in float64, within this VM's spread) */
    }
    decltype(VT{} < T(0)) vok = {};  /* integer lanes */
    double nbad = 0.0;
    ptrdiff_t nvec = 0;               /* scores counted in vok */
    for (ptrdiff_t i = 0; i < S; ++i) {
        const T *SMX_R row = th + i * S;
        VT mx = VT{} - inf;
        ptrdiff_t j = 0;
        for (; j + nt <= S; j += nt) {
            const VT rv = vload<VT>(row + j);
            vok += rv < inf;  /* -1 in each lane of a score that is not NaN or +inf */
            const VT xv = rv + vload<VT>(vs + j);
            vstore(x + j, xv);
            mx = xv > mx ? xv : mx;
        }
        nvec += j;
        T m = j > 0 ? lanes_max<T, nt>(mx) : -inf;
        vit_max_tail<T, nt / 2>(S, j, row, vs, x, m, nbad);
        if (!(m > -inf)) {  /* a row of -inf: value -inf, q = 0 */
            msum[i] = -SM_INF;
            msum[S + i] = 1.0;
            if (E != NULL) for (j = 0; j < S; ++j) E[i * S + j] = (T)0;
            continue;
        }
        msum[i] = c + (double)m;
        T *SMX_R erow = E != NULL ? E + i * S : NULL;
        VT acc = VT{};
        for (j = 0; j + nt <= S; j += nt) {
            const VT e = exp_nonpos((vload<VT>(x + j) - m) * ig);
            if (erow != NULL) vstore(erow + j, e);
            acc += e;
        }
        T sum = j > 0 ? lanes_sum<T, nt>(acc) : T(0);
        vit_exps_tail<T, nt / 2>(S, j, x, m, ig, erow, sum);
        msum[S + i] = (double)sum;  /* >= 1: the max contributes exp(0) */
    }
    long long ok = 0;  /* the lanes' sum, in an integer: exact */
    for (int l = 0; l < nt; ++l) ok -= (long long)vok[l];
    return nbad + (double)(nvec - ok);
}

/* A row's weights into E and, with zrow, the tangent <q, zrow + Vd>:
 * erow[j] = q_j = ex[j] c (ex: the row's unnormalized exps with c = 1/sum, or
 * its weights with c = 1; ex may be erow itself). Returns the tangent (0
 * without zrow). */
template <typename T, typename X>
SMX_HD double vit_weights_row(ptrdiff_t S, const X *ex, double c, T *erow, const T *zrow,
                              const double *SMX_R Vd)
{
    ptrdiff_t j = 0;
    if (zrow == NULL) {
        for (; j < S; ++j) erow[j] = (T)((double)ex[j] * c);
        return 0.0;
    }
    double acc[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0}, vd = 0.0;
    for (; j + 8 <= S; j += 8)
        for (int l = 0; l < 8; ++l) {
            const double q = (double)ex[j + l] * c;
            erow[j + l] = (T)q;
            acc[l] += q * ((double)zrow[j + l] + Vd[j + l]);
        }
    for (; j < S; ++j) {
        const double q = (double)ex[j] * c;
        erow[j] = (T)q;
        vd += q * ((double)zrow[j] + Vd[j]);
    }
    return vd + sum8(acc);
}

template <typename T, int W>
SMX_HD void vit_fwd_negentropy(ptrdiff_t S, const T *SMX_R th, const T *SMX_R z,
                               const double *SMX_R V, const double *SMX_R Vd, double *SMX_R Vn,
                               double *SMX_R Vdn, T *SMX_R E, T *SMX_R Ed, double *SMX_R inv,
                               double *SMX_R x, double gamma, double *SMX_R bad)
{
    const double ig = 1.0 / gamma;
    double acc[8];
    double *SMX_R y = x + S;
    double *SMX_R msum = x + 2 * S;  /* row max, then row sum: 2 S */
    ptrdiff_t i, j, l;
    if constexpr (W > 0) {
        *bad += vit_rows_negentropy<T, W>(S, th, V, E, x, msum, gamma);
        if (z != NULL) for (i = 0; i < S; ++i) {
            /* the HVP: E holds the exps; the weights q = exp / sum into E,
             * Vdn[i] = <q_i, z[i, :] + Vd> (a row of -inf: E = 0, sum 1) */
            T *erow = E + i * S;
            Vdn[i] = vit_weights_row(S, erow, 1.0 / msum[S + i], erow, z + i * S, Vd);
            if (!(msum[i] > -SM_INF)) for (j = 0; j < S; ++j) Ed[i * S + j] = (T)0;
        }
    } else for (i = 0; i < S; ++i) {
        /* the HVP of rows shorter than a vector, and their value and gradient
         * (see vit_fwd) */
        vit_row(S, th + i * S, V, x, bad);
        double m = rowmax(S, x, y);
        msum[i] = m;
        if (!(m > -SM_INF)) {
            msum[S + i] = 1.0;
            if (E != NULL) for (j = 0; j < S; ++j) E[i * S + j] = (T)0;
            if (z != NULL) {
                Vdn[i] = 0.0;
                for (j = 0; j < S; ++j) Ed[i * S + j] = (T)0;
            }
            continue;
        }
        for (l = 0; l < 8; ++l) acc[l] = 0.0;
        for (j = 0; j + 8 <= S; j += 8)
            for (l = 0; l < 8; ++l) {
                double e = smx::exp_nonpos((x[j + l] - m) * ig);
                x[j + l] = e;
                acc[l] += e;
            }
        if (z == NULL) {  /* S < 8: the unnormalized exps, as the vector rows */
            for (; j < S; ++j) {
                double e = smx::exp_nonpos((x[j] - m) * ig);
                if (E != NULL) E[i * S + j] = (T)e;
                acc[0] += e;
            }
            msum[S + i] = sum8(acc);
            continue;
        }
        for (; j < S; ++j) {
            double e = smx::exp_nonpos((x[j] - m) * ig);
            x[j] = e;
            acc[0] += e;
        }
        double sum = sum8(acc);
        msum[S + i] = sum;  /* >= 1: the max contributes exp(0) */
        Vdn[i] = vit_weights_row(S, x, 1.0 / sum, E + i * S, z + i * S, Vd);
    }
    for (i = 0; i < S; ++i) {  /* m + gamma log(sum), -inf rows stay -inf */
        double m = msum[i], sum = msum[S + i];
        int fin = m > -SM_INF;
        Vn[i] = fin ? smx::value<double, NEGENTROPY>(m, sum, gamma) : -SM_INF;
        if (inv != NULL) inv[i] = fin ? 1.0 / sum : 0.0;
    }
}

/* max_Omega of one row x[:n] with l2 (sparsemax) and its weights q[:n], for
 * rows of at least one vector of doubles: smx::row_max<double, L2>'s steps
 * (the max, Michelot's passes over the support, the weights and the value)
 * with every sum over the row in vectors of W bytes (a scalar tail after the
 * whole vectors). In the loops these sums stay scalar (the vectorizer does
 * not reorder a float sum), and a Viterbi row of 16 took 8x the time of the
 * negentropy row. The Viterbi rows (VitFwdRows) and max_omega (the CRF, DAG
 * and Viterbi engines' rows) run it. */
template <int W> struct L2Row {
    static SMX_HD double run(ptrdiff_t n, const double *SMX_R x, double *SMX_R q, double gamma)
    {
        typedef typename vec<double, W>::type VD;
        const int nd = vec<double, W>::n;
        const ptrdiff_t nv = n - n % nd;  /* entries in whole vectors */
        const double ig = 1.0 / gamma;
        const VD zero = VD{}, one = zero + 1.0;
        ptrdiff_t j;
        VD mx = zero - SM_INF;
        for (j = 0; j < nv; j += nd) {
            const VD xv = vload<VD>(x + j);
            mx = xv > mx ? xv : mx;
        }
        double m = lanes_max<double, nd>(mx);
        for (; j < n; ++j) m = x[j] > m ? x[j] : m;
        if (!(m > -SM_INF)) {  /* a row of -inf: value -inf, q = 0 */
            for (j = 0; j < n; ++j) q[j] = 0.0;
            return m;
        }
        /* the support starts as the finite entries; every pass drops those
         * with y <= tau (the argmax, y = 0 > tau, stays) */
        VD sv = zero, cv = zero;
        for (j = 0; j < nv; j += nd) {
            const VD xv = vload<VD>(x + j);
            const auto in = xv > -SM_INF;
            sv += in ? (xv - m) * ig : zero;
            cv += in ? one : zero;
        }
        double sum = lanes_sum<double, nd>(sv), count = lanes_sum<double, nd>(cv), tau;
        for (; j < n; ++j) {
            const bool in = x[j] > -SM_INF;
            sum += in ? (x[j] - m) * ig : 0.0;
            count += in ? 1.0 : 0.0;
        }
        for (ptrdiff_t pass = 0;; ++pass) {
            tau = smx::sparsemax_tau(sum, count);
            VD s2 = zero, c2 = zero;
            for (j = 0; j < nv; j += nd) {
                const VD yv = (vload<VD>(x + j) - m) * ig;
                const auto in = yv > tau;
                s2 += in ? yv : zero;
                c2 += in ? one : zero;
            }
            double sum2 = lanes_sum<double, nd>(s2), count2 = lanes_sum<double, nd>(c2);
            for (; j < n; ++j) {
                const double y = (x[j] - m) * ig;
                sum2 += y > tau ? y : 0.0;
                count2 += y > tau ? 1.0 : 0.0;
            }
            if (count2 == count || pass > n) break;  /* n + 1 passes at most: never a hang */
            sum = sum2;
            count = count2;
        }
        VD acc = zero;
        const VD tv = zero + tau;
        for (j = 0; j < nv; j += nd) {  /* smx's weight and value term, on vectors */
            const VD yv = (vload<VD>(x + j) - m) * ig;
            const VD qv = smx::weight<VD, L2>(yv, tv);
            acc += smx::l2_term(yv, qv);
            vstore(q + j, qv);
        }
        double a = lanes_sum<double, nd>(acc);
        for (; j < n; ++j) {
            const double y = (x[j] - m) * ig;
            q[j] = smx::weight<double, L2>(y, tau);
            a += smx::l2_term(y, q[j]);
        }
        return smx::value<double, L2>(m, a, gamma);
    }
};

/* the rows of the other operators: l2 in L2Row<W> (W > 0), the rest in
 * smx::row_max (no reduction worth vectorizing) */
template <typename T, int W>
struct VitFwdRows {
    template <int REG>
    static SMX_HD void run(ptrdiff_t S, const T *SMX_R th, const T *SMX_R z,
                           const double *SMX_R V, const double *SMX_R Vd, double *SMX_R Vn,
                           double *SMX_R Vdn, T *SMX_R E, T *SMX_R Ed, double *SMX_R inv,
                           double *SMX_R x, double gamma, double *SMX_R bad)
    {
        if constexpr (REG == NEGENTROPY) {  /* the vectorized log-sum-exp above */
            vit_fwd_negentropy<T, W>(S, th, z, V, Vd, Vn, Vdn, E, Ed, inv, x, gamma, bad);
        } else {
            double *SMX_R q = x + S;
            for (ptrdiff_t i = 0; i < S; ++i) {
                vit_row(S, th + i * S, V, x, bad);
                if constexpr (REG == L2 && W > 0) Vn[i] = L2Row<W>::run(S, x, q, gamma);
                else Vn[i] = smx::row_max<double, REG>(x, q, S, gamma);
                if (E == NULL) continue;  /* the value alone */
                const double vd = vit_weights_row(S, q, 1.0, E + i * S,
                                                  z != NULL ? z + i * S : NULL, Vd);
                if (z != NULL) Vdn[i] = vd;
            }
        }
    }
};

/* W: the vector width in bytes of the negentropy and l2 rows
 * (vit_rows_negentropy, L2Row), 0 for the loops */
template <int W> struct VitFwd {
    template <typename T>
    static SMX_HD void run(ptrdiff_t S, const T *th, const T *z, const double *V, const double *Vd,
                           double *Vn, double *Vdn, T *E, T *Ed, double *inv, double *x,
                           int reg, double gamma, double *bad)
    {
        with_reg<VitFwdRows<T, W>>(reg, S, th, z, V, Vd, Vn, Vdn, E, Ed, inv, x, gamma, bad);
    }
};

template <typename T>
struct VitBwdHvp {
    template <int REG>
    static SMX_HD void run(ptrdiff_t S, const double *SMX_R eb, const double *SMX_R ebd,
                           double *SMX_R nb, double *SMX_R nbd, T *SMX_R E, T *SMX_R Ed,
                           const T *SMX_R z, const double *SMX_R Vdp, const double *SMX_R Vdt,
                           double gamma)
    {
        const double ig = 1.0 / gamma;
        ptrdiff_t i, j;
        for (j = 0; j < S; ++j) nbd[j] = 0.0;
        for (i = 0; i < S; ++i) {
            const double e_i = eb[i], f_i = ebd[i];
            T *SMX_R erow = E + i * S;
            T *SMX_R edrow = Ed + i * S;
            const T *SMX_R zrow = z + i * S;
            double su = 0.0, cnt = 0.0;
            if (smx::support_mean<REG>()) {
                for (j = 0; j < S; ++j) {
                    const bool in = (double)erow[j] > 0.0;
                    su += in ? (double)zrow[j] + Vdp[j] : 0.0;
                    cnt += in ? 1.0 : 0.0;
                }
            }
            const double stat = smx::hvp_stat<double, REG>(Vdt[i], su, cnt);  /* Vdt[i] = <q_i, u> */
    #pragma GCC ivdep
            for (j = 0; j < S; ++j) {
                double q = (double)erow[j];
                double qd = smx::hvp<double, REG>(q, (double)zrow[j] + Vdp[j], stat, ig);
                double ed = f_i * q + e_i * qd;
                double e = e_i * q;
                edrow[j] = (T)ed;
                erow[j] = (T)e;
                nbd[j] += ed;
                nb[j] += e;
            }
        }
    }
};

struct VitBwd {
    template <typename T>
    static SMX_HD void run(ptrdiff_t S, const double *SMX_R eb, const double *SMX_R ebd,
                           const double *SMX_R inv, double *SMX_R nb, double *SMX_R nbd,
                           T *SMX_R E, T *SMX_R Ed, const T *SMX_R z, const double *SMX_R Vdp,
                           const double *SMX_R Vdt, int reg, double gamma)
    {
        ptrdiff_t i, j, l;
        for (j = 0; j < S; ++j) nb[j] = 0.0;
        if (Ed != NULL) {
            with_reg<VitBwdHvp<T>>(reg, S, eb, ebd, nb, nbd, E, Ed, z, Vdp, Vdt, gamma);
            return;
        }
        for (i = 0; i < S; ++i) {
            const double c = inv != NULL ? eb[i] * inv[i] : eb[i];
            T *SMX_R erow = E + i * S;
            /* blocks of 8: written as one loop, GCC turned it around (i
             * inner, a scalar sum down each column) */
            for (j = 0; j + 8 <= S; j += 8)
                for (l = 0; l < 8; ++l) {
                    double e = c * (double)erow[j + l];
                    erow[j + l] = (T)e;
                    nb[j + l] += e;
                }
            for (; j < S; ++j) {
                double e = c * (double)erow[j];
                erow[j] = (T)e;
                nb[j] += e;
            }
        }
    }
};

/*
 * ISA dispatch: dispatch<K>(args...) runs K::run(args...) compiled for the
 * ISA chosen once by init_isa(): 0 baseline, 1 AVX2 + FMA, 2 AVX-512; -1
 * until init_isa() ran. Modules call init_isa() at import; dispatch also runs
 * it lazily (a benign race: every thread would store the same value).
 * dispatch_w<K>(args...) runs K<W>::run(args...), W the ISA's vector width in
 * bytes (vec_bytes()), for kernels written over vec<T, W>.
 */
static int isa_level = -1;

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__) && \
    !defined(__AVX512F__) && !defined(__AVX2__) && !defined(SMOOTHMAX_NO_MULTIVERSION)
#define SM_ATTR_AVX512 __attribute__((target( \
    "avx512f,avx512dq,avx512vl,avx512bw,avx2,fma,prefer-vector-width=512")))
#define SM_ATTR_AVX2 __attribute__((target("avx2,fma")))

template <class K, class... A> SM_ATTR_AVX512 auto on_avx512(A... a) { return K::run(a...); }
template <class K, class... A> SM_ATTR_AVX2 auto on_avx2(A... a) { return K::run(a...); }
template <class K, class... A> auto on_base(A... a) { return K::run(a...); }

/* SMOOTHMAX_ISA=baseline|avx2 caps the level (the tests run each ISA's code
 * on one machine; a level the CPU lacks is never chosen); avx2-w64 runs the
 * AVX2 build with AVX-512's 64-byte vectors in dispatch_w, so that the
 * AVX-512 width's logic (8 doubles, 16 floats a vector) is tested on a CPU
 * without AVX-512 too (slow there: two registers a vector). */
static int wide64 = 0;
inline void init_isa()
{
    __builtin_cpu_init();
    int level;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw"))
        level = 2;
    else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        level = 1;
    else
        level = 0;
    const char *cap = getenv("SMOOTHMAX_ISA");
    if (cap != NULL && strcmp(cap, "baseline") == 0) level = 0;
    else if (cap != NULL && strcmp(cap, "avx2") == 0 && level > 1) level = 1;
    else if (cap != NULL && strcmp(cap, "avx2-w64") == 0 && level >= 1) {
        level = 1;
        wide64 = 1;
    }
    isa_level = level;
}

inline const char *isa_name()
{
    return isa_level == 2 ? "avx512" : isa_level == 1 ? (wide64 ? "avx2+fma, 64-byte vectors" :
           "avx2+fma") : "baseline";
}

template <class K, class... A> inline auto dispatch(A... a)
{
    if (isa_level < 0) init_isa();
    switch (isa_level) {
    case 2: return on_avx512<K>(a...);
    case 1: return on_avx2<K>(a...);
    default: return on_base<K>(a...);
    }
}

inline int vec_bytes()
{
    if (isa_level < 0) init_isa();
    return isa_level == 2 || wide64 ? 64 : isa_level == 1 ? 32 : 16;
}

template <template <int> class K, class... A> inline auto dispatch_w(A... a)
{
    if (isa_level < 0) init_isa();
    switch (isa_level) {
    case 2: return on_avx512<K<64>>(a...);
    case 1: return wide64 ? on_avx2<K<64>>(a...) : on_avx2<K<32>>(a...);
    default: return on_base<K<16>>(a...);
    }
}
#else
inline void init_isa() { isa_level = 0; }
inline const char *isa_name()
{
#if defined(__AVX512F__)
    return "avx512 (compile time)";
#elif defined(__AVX2__)
    return "avx2 (compile time)";
#else
    return "compiler default";
#endif
}
template <class K, class... A> inline auto dispatch(A... a) { return K::run(a...); }
/* the width the compiler targets: -march=native's, or 16 bytes (SSE2, NEON) */
#if defined(__AVX512F__)
#define SMX_VEC_BYTES 64
#elif defined(__AVX2__)
#define SMX_VEC_BYTES 32
#else
#define SMX_VEC_BYTES 16
#endif
inline int vec_bytes() { return SMX_VEC_BYTES; }
template <template <int> class K, class... A> inline auto dispatch_w(A... a)
{ return K<SMX_VEC_BYTES>::run(a...); }
#endif

/* Whether x[:n] holds NaN or -inf (any infinity with any_inf): the value
 * checks of smoothmax._values.check_values on a NumPy input, run by the
 * compiled DTW (dtw.pyx, _bad_values). Compares OR-ed into an integer, which
 * the compiler vectorises for AVX2 and AVX-512; for doubles not for the
 * baseline x86-64 (GCC 12 keeps a scalar loop there), hence the dispatch. */
struct BadValues {
    template <typename T>
    static int run(ptrdiff_t n, const T *SMX_R x, int any_inf)
    {
        int bad = 0;
        if (any_inf) {
            for (ptrdiff_t k = 0; k < n; ++k) bad |= !(std::fabs(x[k]) < (T)SM_INF);
        } else {
            for (ptrdiff_t k = 0; k < n; ++k) bad |= !(x[k] > -(T)SM_INF);
        }
        return bad;
    }
};

template <typename T>
inline int bad_values(ptrdiff_t n, const T *x, int any_inf) { return dispatch<BadValues>(n, x, any_inf); }

/* The entry points the Cython modules declare (dtw_kernels.pxd, operators.pxd,
 * viterbi.pyx): T is deduced from the caller's pointers. */
template <typename T>
inline void dtw_fwd(ptrdiff_t n, const double *theta, const double *up, const double *left,
                    const double *dg, double *out, T *qu, T *ql, T *qd, int reg, double gamma)
{ dispatch<DtwFwd>(n, theta, up, left, dg, out, qu, ql, qd, reg, gamma); }

template <typename T>
inline void dtw_bwd(ptrdiff_t n, const double *eu, const double *el, const double *ed,
                    const T *qu, const T *ql, const T *du, const T *dl, double *out)
{ dispatch<DtwBwd>(n, eu, el, ed, qu, ql, du, dl, out); }

template <typename T>
inline void dtw_fwd_hvp(ptrdiff_t n, const double *theta, const double *z, const double *up,
                        const double *left, const double *dg, double *out, const double *dup,
                        const double *dleft, const double *ddg, double *dout, T *qu, T *ql,
                        T *qd, T *qdu, T *qdl, T *qdd, int reg, double gamma)
{
    dispatch<DtwFwdHvp>(n, theta, z, up, left, dg, out, dup, dleft, ddg, dout, qu, ql, qd,
                        qdu, qdl, qdd, reg, gamma);
}

template <typename T>
inline void dtw_bwd_hvp(ptrdiff_t n, const double *eu, const double *el, const double *ed,
                        const double *fu, const double *fl, const double *fd, const T *qu,
                        const T *ql, const T *qd, const T *qdu, const T *qdl, const T *qdd,
                        double *out, double *dout)
{ dispatch<DtwBwdHvp>(n, eu, el, ed, fu, fl, fd, qu, ql, qd, qdu, qdl, qdd, out, dout); }

template <typename T>
inline void vit_fwd(ptrdiff_t S, const T *th, const T *z, const double *V, const double *Vd,
                    double *Vn, double *Vdn, T *E, T *Ed, double *inv, double *x, int reg,
                    double gamma, double *bad)
{
    /* Two instantiations, each its own ISA-dispatched function: rows of at
     * least one vector of doubles in vector code of the ISA's width, for
     * negentropy (vit_rows_negentropy) and l2 (L2Row); the rest
     * (shorter rows, the hard max: the width does not matter to it) in loops
     * (VitFwd<0>).
     * In one function, the short rows ran 1.2-1.5x slower than alone (S = 3). */
    if ((reg == NEGENTROPY || reg == L2) &&
        S * (ptrdiff_t)sizeof(double) >= vec_bytes())
        dispatch_w<VitFwd>(S, th, z, V, Vd, Vn, Vdn, E, Ed, inv, x, reg, gamma, bad);
    else
        dispatch<VitFwd<0>>(S, th, z, V, Vd, Vn, Vdn, E, Ed, inv, x, reg, gamma, bad);
}

template <typename T>
inline void vit_bwd(ptrdiff_t S, const double *eb, const double *ebd, const double *inv,
                    double *nb, double *nbd, T *E, T *Ed, const T *z, const double *Vdp,
                    const double *Vdt, int reg, double gamma)
{ dispatch<VitBwd>(S, eb, ebd, inv, nb, nbd, E, Ed, z, Vdp, Vdt, reg, gamma); }

struct RowMax {
    template <int REG>
    static double run(const double *x, double *q, ptrdiff_t n, double gamma)
    {
        if constexpr (REG == NEGENTROPY) return dispatch<NegentropyRow>(n, x, q, gamma);
        else if constexpr (REG == L2) {
            if (n * (ptrdiff_t)sizeof(double) >= vec_bytes())
                return dispatch_w<L2Row>(n, x, q, gamma);
            return smx::row_max<double, L2>(x, q, n, gamma);
        } else return smx::row_max<double, REG>(x, q, n, gamma);
    }
};
struct RowHvp {
    template <int REG>
    static void run(const double *q, const double *z, double *out, ptrdiff_t n, double gamma)
    { smx::row_hvp<double, REG>(q, z, out, n, gamma); }
};

/* max_Omega(x[:n]) and q = its gradient; reg 0 negentropy, 1 l2, 2 hard. */
inline double max_omega(const double *x, double *q, ptrdiff_t n, int reg, double gamma)
{ return with_reg<RowMax>(reg, x, q, n, gamma); }

/* out[:n] = H.z[:n], H the Hessian of max_Omega where its gradient is q. */
inline void max_omega_hvp(const double *q, const double *z, double *out, ptrdiff_t n, int reg,
                          double gamma)
{ with_reg<RowHvp>(reg, q, z, out, n, gamma); }

}  // namespace cpu
}  // namespace smx

#endif /* SMOOTHMAX_SIMD_H */
