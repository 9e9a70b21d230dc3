/*
 * SIMD kernels of the compiled engine: the anti-diagonal loops of the DTW_Omega
 * forward and reverse passes, and the negentropy max over one row used by
 * operators.pxd (so by Viterbi, whose S x S step is S such rows).
 *
 * Cells (i, j) on one anti-diagonal d = i + j depend only on the two previous
 * anti-diagonals, so the loop over a diagonal has independent iterations and
 * is vectorized by the compiler. The per-cell work is branch-free (selects
 * only), and exp/log are written here, inline and branch-free, because libm's
 * exp/log do not vectorize without -ffast-math, which we cannot use: it
 * assumes no infinities, and +inf costs / -inf operator inputs are legal
 * masks here.
 *
 *   sm_exp_nonpos(x)  exp(x) for x <= 0 or x = -inf; results below e^-708
 *                     are flushed to 0 (no subnormals). Taylor degree 13 on
 *                     |r| <= ln2/2 after x = k ln2 + r: about 1 ulp.
 *   sm_log_pos(x)     log(x) for finite x > 0 normal (fdlibm/musl's method:
 *                     x = 2^k (1 + f), log(1+f) via s = f/(2+f), < 1 ulp).
 *
 * Both are exact on the special values we feed them: exp(0) = 1 and
 * exp(-inf) = 0, so a +inf predecessor gets weight exactly 0.
 *
 * ISA: on x86-64 with GCC or clang the kernels are compiled three times,
 * with __attribute__((target(...))), for AVX-512 (8 doubles a vector),
 * AVX2 + FMA and the x86-64 baseline (SSE2, 2 doubles a vector); sm_init_isa()
 * (called once at import, else lazily) picks one with __builtin_cpu_supports. We do not
 * use target_clones("arch=..."): its resolver tests the CPU *model*, which
 * a virtual machine may hide, and per-feature clones cannot ask for
 * AVX-512 *and* FMA in one clone. With SMOOTHMAX_NATIVE=1 (-march=native
 * defines __AVX512F__ or __AVX2__), on other architectures or compilers,
 * one version is built for whatever the compiler targets.
 *
 * Types: theta, E and the stored weights q use the caller's dtype T (float or
 * double, one macro-generated body per type); R, ebar and every operator
 * computation are double.
 */
#ifndef SMOOTHMAX_SIMD_H
#define SMOOTHMAX_SIMD_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define SM_INLINE static inline __attribute__((always_inline))
#define SM_INF (__builtin_inf())
/* sum of 8 lanes as a tree (latency 3 adds, not 8) */
#define SM_SUM8(a) ((((a)[0] + (a)[1]) + ((a)[2] + (a)[3])) + (((a)[4] + (a)[5]) + ((a)[6] + (a)[7])))

SM_INLINE double sm_asdouble(uint64_t u) { double d; memcpy(&d, &u, sizeof d); return d; }
SM_INLINE uint64_t sm_asuint(double d) { uint64_t u; memcpy(&u, &d, sizeof u); return u; }

SM_INLINE double sm_exp_nonpos(double x)
{
    const double shift = 0x1.8p52;  /* adding it rounds to an integer */
    const double ln2hi = 6.93147180369123816490e-01;  /* 32 trailing zero bits */
    const double ln2lo = 1.90821492927058770002e-10;
    double xc = x < -708.0 ? -708.0 : x;  /* also maps -inf */
    double t = xc * 1.44269504088896338700e+00 + shift;
    double k = t - shift;                   /* round(x / ln2), in [-1022, 0] */
    double r = (xc - k * ln2hi) - k * ln2lo;
    double p = 1.0 / 6227020800.0;
    p = p * r + 1.0 / 479001600.0;
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    uint64_t ki = sm_asuint(t) - sm_asuint(shift);  /* k as a two's complement int */
    double scale = sm_asdouble((ki + 1023) << 52);  /* 2^k, a normal number */
    double y = p * scale;
    return x < -708.0 ? 0.0 : y;
}

SM_INLINE double sm_log_pos(double x)
{
    const double ln2_hi = 6.93147180369123816490e-01;
    const double ln2_lo = 1.90821492927058770002e-10;
    const double Lg1 = 6.666666666666735130e-01, Lg2 = 3.999999999940941908e-01,
                 Lg3 = 2.857142874366239149e-01, Lg4 = 2.222219843214978396e-01,
                 Lg5 = 1.818357216161805012e-01, Lg6 = 1.531383769920937332e-01,
                 Lg7 = 1.479819860511658591e-01;
    uint64_t u = sm_asuint(x);
    uint64_t hx = (u >> 32) + (0x3ff00000 - 0x3fe6a09e);
    uint64_t e = hx >> 20;                                 /* k + 1023 */
    double dk = (sm_asdouble(0x4330000000000000ULL | e) - 0x1p52) - 1023.0;
    hx = (hx & 0x000fffff) + 0x3fe6a09e;                   /* 1 + f in [sqrt2/2, sqrt2] */
    double f = sm_asdouble((hx << 32) | (u & 0xffffffffULL)) - 1.0;
    double hfsq = 0.5 * f * f;
    double s = f / (2.0 + f);
    double z = s * s;
    double w = z * z;
    double t1 = w * (Lg2 + w * (Lg4 + w * Lg6));
    double t2 = z * (Lg1 + w * (Lg3 + w * (Lg5 + w * Lg7)));
    double R = t2 + t1;
    return s * (hfsq + R) + dk * ln2_lo - hfsq + f + dk * ln2_hi;
}

/*
 * max of x[:n], with y (n doubles) as scratch: y[j] = max(x[j], y[j - 8]) is a
 * distance-8 recurrence that the loop vectorizer turns into vector max
 * instructions (a loop over 8 local accumulators is scalarized instead, and
 * compiled to scalar compares). -inf entries are fine; NaN is never fed.
 */
SM_INLINE double sm_rowmax(ptrdiff_t n, const double *restrict x, double *restrict y)
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
 * min_Omega of the three predecessors (a, b, c) = (up, left, diagonal) of R,
 * i.e. -max_Omega(-a, -b, -c); writes the weights q = grad max_Omega(-r).
 * All three +inf: value +inf, q = 0. ig = 1/gamma.
 */
SM_INLINE double sm_min3_negentropy(double a, double b, double c, double gamma, double ig,
                                    double *qa, double *qb, double *qc)
{
    double m = a < b ? a : b;
    m = m < c ? m : c;
    int fin = m < SM_INF;
    double ms = fin ? m : 0.0;         /* never inf - inf */
    double ea = sm_exp_nonpos((ms - a) * ig);
    double eb = sm_exp_nonpos((ms - b) * ig);
    double ec = sm_exp_nonpos((ms - c) * ig);
    double s = fin ? ea + eb + ec : 1.0;  /* in [1, 3] when finite */
    double inv = 1.0 / s;
    *qa = ea * inv;                    /* all 0 when !fin */
    *qb = eb * inv;
    *qc = ec * inv;
    return fin ? m - gamma * sm_log_pos(s) : SM_INF;
}

/*
 * Squared l2: q = sparsemax(y), y_k = (min r - r_k)/gamma <= 0, by a sorting
 * network on three values. On the support y_k = q_k + tau, so
 * <q, y> - |q|^2/2 = tau + |q|^2/2 and -inf entries never enter a product.
 */
SM_INLINE double sm_min3_l2(double a, double b, double c, double gamma, double ig,
                            double *qa, double *qb, double *qc)
{
    double m = a < b ? a : b;
    m = m < c ? m : c;
    int fin = m < SM_INF;
    double ms = fin ? m : 0.0;
    double ya = (ms - a) * ig, yb = (ms - b) * ig, yc = (ms - c) * ig;
    double hi = ya > yb ? ya : yb, lo = ya > yb ? yb : ya;
    double z1 = hi > yc ? hi : yc;
    double mid = hi > yc ? yc : hi;
    double z2 = lo > mid ? lo : mid;
    double z3 = lo > mid ? mid : lo;
    double tau = z1 - 1.0;
    tau = 1.0 + z2 > z1 ? 0.5 * (z1 + z2 - 1.0) : tau;
    tau = 1.0 + 2.0 * z3 > z1 + z2 ? (z1 + z2 + z3 - 1.0) * (1.0 / 3.0) : tau;
    double pa = ya - tau, pb = yb - tau, pc = yc - tau;
    pa = (fin && pa > 0.0) ? pa : 0.0;
    pb = (fin && pb > 0.0) ? pb : 0.0;
    pc = (fin && pc > 0.0) ? pc : 0.0;
    *qa = pa; *qb = pb; *qc = pc;
    double val = tau + 0.5 * (pa * pa + pb * pb + pc * pc);
    return fin ? m - gamma * val : SM_INF;
}

/* Hard min, one-hot first argmin in the order (up, left, diagonal). */
SM_INLINE double sm_min3_hard(double a, double b, double c, double gamma, double ig,
                              double *qa, double *qb, double *qc)
{
    (void)gamma; (void)ig;
    double m = a < b ? a : b;
    m = m < c ? m : c;
    int fin = m < SM_INF;
    int ia = fin && a == m;
    int ib = fin && !ia && b == m;
    int ic = fin && !ia && !ib;
    *qa = ia ? 1.0 : 0.0;
    *qb = ib ? 1.0 : 0.0;
    *qc = ic ? 1.0 : 0.0;
    return m;
}

/*
 * Forward over the n cells of one diagonal (first cell i0, then i0+1, ...):
 *   out[k] = theta[k] + min_Omega(up[k], left[k], dg[k])
 * with up = R[i-1, j], left = R[i, j-1], dg = R[i-1, j-1]; the weights go to
 * qu/ql/qd[k] when qu is not NULL.
 * Reverse over one diagonal:
 *   out[k] = eu[k]*qu[k] + el[k]*ql[k] + ed[k]*qd[k]
 * with eu = ebar(i+1, j), el = ebar(i, j+1), ed = ebar(i+1, j+1) and the
 * weights of those children toward (i, j). theta and E along a diagonal are
 * strided in memory (stride NB - 1, one row each): the caller copies theta
 * into / E out of contiguous diagonal buffers, eight diagonals at a time, so
 * that each row of theta / E is visited once per eight diagonals (strided
 * gathers and scatters in these loops cost a cache and TLB miss per cell).
 */
#define SM_FWD_LOOP(T, OP, STORE)                                              \
    for (ptrdiff_t k = 0; k < n; ++k) {                                        \
        double qa, qb, qc;                                                     \
        double v = OP(up[k], left[k], dg[k], gamma, ig, &qa, &qb, &qc);        \
        out[k] = theta[k] + v;                                                 \
        if (STORE) { qu[k] = (T)qa; ql[k] = (T)qb; qd[k] = (T)qc; }            \
    }

#define SM_DEFINE_DTW_KERNELS(T, SUF, ATTR)                                    \
ATTR static void sm_dtw_fwd_##SUF(                                             \
    ptrdiff_t n, const double *restrict theta,                                 \
    const double *restrict up, const double *restrict left,                    \
    const double *restrict dg, double *restrict out,                           \
    T *restrict qu, T *restrict ql, T *restrict qd, int reg, double gamma)     \
{                                                                              \
    const double ig = 1.0 / gamma;                                             \
    if (qu != NULL) {                                                          \
        if (reg == 0) { SM_FWD_LOOP(T, sm_min3_negentropy, 1) }                \
        else if (reg == 1) { SM_FWD_LOOP(T, sm_min3_l2, 1) }                   \
        else { SM_FWD_LOOP(T, sm_min3_hard, 1) }                               \
    } else {                                                                   \
        if (reg == 0) { SM_FWD_LOOP(T, sm_min3_negentropy, 0) }                \
        else if (reg == 1) { SM_FWD_LOOP(T, sm_min3_l2, 0) }                   \
        else { SM_FWD_LOOP(T, sm_min3_hard, 0) }                               \
    }                                                                          \
}                                                                              \
ATTR static void sm_dtw_bwd_##SUF(                                             \
    ptrdiff_t n, const double *restrict eu, const double *restrict el,         \
    const double *restrict ed, const T *restrict qu, const T *restrict ql,     \
    const T *restrict qd, double *restrict out)                                \
{                                                                              \
    for (ptrdiff_t k = 0; k < n; ++k)                                          \
        out[k] = eu[k] * (double)qu[k] + el[k] * (double)ql[k]                 \
                 + ed[k] * (double)qd[k];                                      \
}

/*
 * HVP (docs/spec.md §2) over one diagonal. Forward, per cell, with u the
 * tangents Rdot of the predecessors (up, left, diagonal):
 *   out = theta + min_Omega(r),  dout = z + <q, u>,
 *   qdot = -H(-r) u:  negentropy  -q (u - <q, u>) / gamma,
 *                     l2          -s (u - mean_S u) / gamma, s = [q > 0],
 *                     hard        0.
 * Reverse, per cell, with the children's ebar (e*) and ebar_dot (f*):
 *   out  = eu qu + el ql + ed qd,
 *   dout = fu qu + eu qdu + fl ql + el qdl + fd qd + ed qdd.
 * A q of 0 multiplies a finite tangent, so masked cells give exact zeros.
 */
#define SM_FWD_HVP_LOOP(T, OP, QDOT)                                           \
    for (ptrdiff_t k = 0; k < n; ++k) {                                        \
        double qa, qb, qc;                                                     \
        double v = OP(up[k], left[k], dg[k], gamma, ig, &qa, &qb, &qc);        \
        out[k] = theta[k] + v;                                                 \
        double ua = dup[k], ub = dleft[k], uc = ddg[k];                        \
        double rd = qa * ua + qb * ub + qc * uc;                               \
        dout[k] = z[k] + rd;                                                   \
        qu[k] = (T)qa; ql[k] = (T)qb; qd[k] = (T)qc;                           \
        QDOT(T)                                                                \
    }
#define SM_QDOT_NEGENTROPY(T)                                                     \
        qdu[k] = (T)(-qa * (ua - rd) * ig);                                    \
        qdl[k] = (T)(-qb * (ub - rd) * ig);                                    \
        qdd[k] = (T)(-qc * (uc - rd) * ig);
#define SM_QDOT_L2(T)                                                             \
        double sa = qa > 0.0 ? 1.0 : 0.0, sb = qb > 0.0 ? 1.0 : 0.0;           \
        double sc = qc > 0.0 ? 1.0 : 0.0, cnt = sa + sb + sc;                  \
        double mean = (sa * ua + sb * ub + sc * uc) / (cnt > 0.0 ? cnt : 1.0); \
        qdu[k] = (T)(-sa * (ua - mean) * ig);                                  \
        qdl[k] = (T)(-sb * (ub - mean) * ig);                                  \
        qdd[k] = (T)(-sc * (uc - mean) * ig);
#define SM_QDOT_HARD(T)                                                           \
        qdu[k] = (T)0; qdl[k] = (T)0; qdd[k] = (T)0;

#define SM_DEFINE_HVP_KERNELS(T, SUF, ATTR)                                    \
ATTR static void sm_dtw_fwd_hvp_##SUF(                                         \
    ptrdiff_t n, const double *restrict theta, const double *restrict z,       \
    const double *restrict up, const double *restrict left,                    \
    const double *restrict dg, double *restrict out,                           \
    const double *restrict dup, const double *restrict dleft,                  \
    const double *restrict ddg, double *restrict dout,                         \
    T *restrict qu, T *restrict ql, T *restrict qd,                            \
    T *restrict qdu, T *restrict qdl, T *restrict qdd, int reg, double gamma)  \
{                                                                              \
    const double ig = 1.0 / gamma;                                             \
    if (reg == 0) { SM_FWD_HVP_LOOP(T, sm_min3_negentropy, SM_QDOT_NEGENTROPY) } \
    else if (reg == 1) { SM_FWD_HVP_LOOP(T, sm_min3_l2, SM_QDOT_L2) }          \
    else { SM_FWD_HVP_LOOP(T, sm_min3_hard, SM_QDOT_HARD) }                    \
}                                                                              \
ATTR static void sm_dtw_bwd_hvp_##SUF(                                         \
    ptrdiff_t n, const double *restrict eu, const double *restrict el,         \
    const double *restrict ed, const double *restrict fu,                      \
    const double *restrict fl, const double *restrict fd,                      \
    const T *restrict qu, const T *restrict ql, const T *restrict qd,          \
    const T *restrict qdu, const T *restrict qdl, const T *restrict qdd,       \
    double *restrict out, double *restrict dout)                               \
{                                                                              \
    for (ptrdiff_t k = 0; k < n; ++k) {                                        \
        double a = (double)qu[k], b = (double)ql[k], c = (double)qd[k];        \
        out[k] = eu[k] * a + el[k] * b + ed[k] * c;                            \
        dout[k] = fu[k] * a + eu[k] * (double)qdu[k] + fl[k] * b               \
                  + el[k] * (double)qdl[k] + fd[k] * c + ed[k] * (double)qdd[k]; \
    }                                                                          \
}

/*
 * Negentropy max over a row: returns gamma*logsumexp(x/gamma), writes
 * softmax(x/gamma) to q. The max uses sm_rowmax, the sum 8 partial accumulators, so that the
 * reductions vectorize without -ffast-math. All -inf: -inf and q = 0.
 */
#define SM_DEFINE_ROW_KERNELS(SUF, ATTR)                                       \
ATTR static double sm_negentropy_row_##SUF(                                    \
    ptrdiff_t n, const double *restrict x, double *restrict q, double gamma)   \
{                                                                              \
    double acc[8];                                                             \
    ptrdiff_t k, l;                                                            \
    double m = sm_rowmax(n, x, q);  /* q is scratch until the weights */       \
    if (!(m > -SM_INF)) {                                                      \
        for (k = 0; k < n; ++k) q[k] = 0.0;                                    \
        return -SM_INF;                                                        \
    }                                                                          \
    const double ig = 1.0 / gamma;                                             \
    for (k = 0; k < n; ++k) q[k] = sm_exp_nonpos((x[k] - m) * ig);             \
    for (l = 0; l < 8; ++l) acc[l] = 0.0;                                      \
    for (k = 0; k + 8 <= n; k += 8)                                            \
        for (l = 0; l < 8; ++l) acc[l] += q[k + l];                            \
    double s = 0.0;                                                            \
    for (l = 0; l < 8; ++l) s += acc[l];                                       \
    for (; k < n; ++k) s += q[k];                                              \
    const double inv = 1.0 / s;  /* s >= 1: the max contributes exp(0) */      \
    for (k = 0; k < n; ++k) q[k] *= inv;                                       \
    return m + gamma * sm_log_pos(s);                                          \
}

/*
 * Viterbi, negentropy: one step t of the forward pass over all S rows i,
 *   Vn[i] = max_Omega_j (th[i, j] + V[j]) = m_i + gamma log s_i,
 *   q_i = exp((th[i, :] + V - m_i) / gamma) / s_i  (softmax).
 * Value (E == NULL): Vn only. Gradient (E != NULL, z == NULL): E[i, :] gets
 * the unnormalized exp and inv[i] = 1/s_i; the reverse step multiplies by it
 * (one pass over the block fewer). HVP (z != NULL): E[i, :] = q_i,
 * u = z[i, :] + Vd, Vdn[i] = <q_i, u>; inv unused. x is 4 S doubles of
 * scratch. A row that is all -inf gets -inf, q = 0, inv = 0 (and Vdn = 0).
 * *bad is incremented by the number of NaN or +inf scores met (the caller
 * rejects the input: the check rides on the one read of theta).
 * The logs of the S rows are taken in one vectorized loop after the rows.
 * Reverse step: E[i, j] = c_i E[i, j] with c_i = eb[i] inv[i] (eb[i] when
 * inv is NULL), nb[j] = sum_i E[i, j], and for the HVP (Ed != NULL) the
 * tangent qdot = H q u = q (z[i, j] + Vdp[j] - Vdt[i]) / gamma is formed here
 * from the stored q and the forward's Vdot of steps t - 1 (Vdp) and t (Vdt),
 * Ed[i, j] = ebd[i] q + eb[i] qdot, nbd[j] = sum_i Ed[i, j].
 */
#define SM_DEFINE_VIT_KERNELS(T, SUF, ATTR)                                    \
ATTR static void sm_vit_fwd_##SUF(                                             \
    ptrdiff_t S, const T *restrict th, const T *restrict z,                    \
    const double *restrict V, const double *restrict Vd,                       \
    double *restrict Vn, double *restrict Vdn, T *restrict E,                  \
    T *restrict Ed, double *restrict inv, double *restrict x, double gamma,    \
    double *restrict bad)                                                      \
{                                                                              \
    const double ig = 1.0 / gamma;                                             \
    double acc[8];                                                             \
    double badl[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};                 \
    double *restrict y = x + S;                                                \
    double *restrict msum = x + 2 * S;  /* row max, then row sum: 2 S */       \
    ptrdiff_t i, j, l;                                                         \
    for (i = 0; i < S; ++i) {                                                  \
        const T *restrict row = th + i * S;                                    \
        /* NaN or +inf counted in 8 lanes kept across rows (no per-row     \
         * horizontal sum) */                                                  \
        for (j = 0; j + 8 <= S; j += 8)                                        \
            for (l = 0; l < 8; ++l) {                                          \
                x[j + l] = (double)row[j + l] + V[j + l];                      \
                badl[l] += (double)row[j + l] < SM_INF ? 0.0 : 1.0;            \
            }                                                                  \
        for (; j < S; ++j) {                                                   \
            x[j] = (double)row[j] + V[j];                                      \
            badl[0] += (double)row[j] < SM_INF ? 0.0 : 1.0;                    \
        }                                                                      \
        double m = sm_rowmax(S, x, y);                                         \
        msum[i] = m;                                                           \
        if (!(m > -SM_INF)) {                                                  \
            msum[S + i] = 1.0;                                                 \
            if (E != NULL) for (j = 0; j < S; ++j) E[i * S + j] = (T)0;        \
            if (z != NULL) {                                                   \
                Vdn[i] = 0.0;                                                  \
                for (j = 0; j < S; ++j) Ed[i * S + j] = (T)0;                  \
            }                                                                  \
            continue;                                                          \
        }                                                                      \
        for (l = 0; l < 8; ++l) acc[l] = 0.0;                                  \
        if (E != NULL && z == NULL && sizeof(T) == sizeof(double)) {           \
            T *restrict erow = E + i * S;                                      \
            for (j = 0; j + 8 <= S; j += 8)                                    \
                for (l = 0; l < 8; ++l) {                                      \
                    double e = sm_exp_nonpos((x[j + l] - m) * ig);             \
                    erow[j + l] = (T)e;                                        \
                    acc[l] += e;                                               \
                }                                                              \
            for (; j < S; ++j) {                                               \
                double e = sm_exp_nonpos((x[j] - m) * ig);                     \
                erow[j] = (T)e;                                                \
                acc[0] += e;                                                   \
            }                                                                  \
        } else {                                                               \
            for (j = 0; j + 8 <= S; j += 8)                                    \
                for (l = 0; l < 8; ++l) {                                      \
                    double e = sm_exp_nonpos((x[j + l] - m) * ig);             \
                    x[j + l] = e;                                              \
                    acc[l] += e;                                               \
                }                                                              \
            for (; j < S; ++j) {                                               \
                double e = sm_exp_nonpos((x[j] - m) * ig);                     \
                x[j] = e;                                                      \
                acc[0] += e;                                                   \
            }                                                                  \
            /* float E: a separate narrowing loop keeps the exp loop in full- \
             * width double vectors (fused, it ran 2-3x slower) */             \
            if (E != NULL && z == NULL)                                        \
                for (j = 0; j < S; ++j) E[i * S + j] = (T)x[j];                \
        }                                                                      \
        double sum;                                                            \
        sum = SM_SUM8(acc);                                                    \
        msum[S + i] = sum;  /* >= 1: the max contributes exp(0) */             \
        if (z == NULL) continue;                                               \
        const double inv_i = 1.0 / sum;                                        \
        T *restrict erow = E + i * S;                                          \
        const T *restrict zrow = z + i * S;                                    \
        for (l = 0; l < 8; ++l) acc[l] = 0.0;                                  \
        for (j = 0; j + 8 <= S; j += 8)                                        \
            for (l = 0; l < 8; ++l) {                                          \
                double q = x[j + l] * inv_i;                                   \
                erow[j + l] = (T)q;                                            \
                acc[l] += q * ((double)zrow[j + l] + Vd[j + l]);               \
            }                                                                  \
        double vd = 0.0;                                                       \
        for (; j < S; ++j) {                                                   \
            double q = x[j] * inv_i;                                           \
            erow[j] = (T)q;                                                    \
            vd += q * ((double)zrow[j] + Vd[j]);                               \
        }                                                                      \
        vd += SM_SUM8(acc);                                                    \
        Vdn[i] = vd;                                                           \
    }                                                                          \
    for (i = 0; i < S; ++i) {  /* m + gamma log(sum), -inf rows stay -inf */   \
        double m = msum[i], sum = msum[S + i];                                 \
        int fin = m > -SM_INF;                                                 \
        Vn[i] = fin ? m + gamma * sm_log_pos(sum) : -SM_INF;                   \
        if (inv != NULL) inv[i] = fin ? 1.0 / sum : 0.0;                       \
    }                                                                          \
    for (l = 0; l < 8; ++l) *bad += badl[l];                                   \
}                                                                              \
ATTR static void sm_vit_bwd_##SUF(                                             \
    ptrdiff_t S, const double *restrict eb, const double *restrict ebd,        \
    const double *restrict inv, double *restrict nb, double *restrict nbd,     \
    T *restrict E, T *restrict Ed, const T *restrict z,                        \
    const double *restrict Vdp, const double *restrict Vdt, double gamma)      \
{                                                                              \
    ptrdiff_t i, j, l;                                                         \
    for (j = 0; j < S; ++j) nb[j] = 0.0;                                       \
    if (Ed == NULL) {                                                          \
        for (i = 0; i < S; ++i) {                                              \
            const double c = inv != NULL ? eb[i] * inv[i] : eb[i];             \
            T *restrict erow = E + i * S;                                      \
            /* blocks of 8: written as one loop, GCC turned it around (i   \
             * inner, a scalar sum down each column) */                        \
            for (j = 0; j + 8 <= S; j += 8)                                    \
                for (l = 0; l < 8; ++l) {                                      \
                    double e = c * (double)erow[j + l];                        \
                    erow[j + l] = (T)e;                                        \
                    nb[j + l] += e;                                            \
                }                                                              \
            for (; j < S; ++j) {                                               \
                double e = c * (double)erow[j];                                \
                erow[j] = (T)e;                                                \
                nb[j] += e;                                                    \
            }                                                                  \
        }                                                                      \
        return;                                                                \
    }                                                                          \
    const double ig = 1.0 / gamma;                                             \
    for (j = 0; j < S; ++j) nbd[j] = 0.0;                                      \
    for (i = 0; i < S; ++i) {                                                  \
        const double e_i = eb[i], f_i = ebd[i], w = Vdt[i];                    \
        T *restrict erow = E + i * S;                                          \
        T *restrict edrow = Ed + i * S;                                        \
        const T *restrict zrow = z + i * S;                                    \
        _Pragma("GCC ivdep")                                                   \
        for (j = 0; j < S; ++j) {                                              \
            double q = (double)erow[j];                                        \
            double qd = q * (((double)zrow[j] + Vdp[j]) - w) * ig;             \
            double ed = f_i * q + e_i * qd;                                    \
            double e = e_i * q;                                                \
            edrow[j] = (T)ed;                                                  \
            erow[j] = (T)e;                                                    \
            nbd[j] += ed;                                                      \
            nb[j] += e;                                                        \
        }                                                                      \
    }                                                                          \
}

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__) && \
    !defined(__AVX512F__) && !defined(__AVX2__) && !defined(SMOOTHMAX_NO_MULTIVERSION)
#define SM_MULTIVERSION 1
#define SM_ATTR_AVX512 __attribute__((target( \
    "avx512f,avx512dq,avx512vl,avx512bw,avx2,fma,prefer-vector-width=512")))
#define SM_ATTR_AVX2 __attribute__((target("avx2,fma")))
SM_DEFINE_DTW_KERNELS(double, d_avx512, SM_ATTR_AVX512)
SM_DEFINE_DTW_KERNELS(float, f_avx512, SM_ATTR_AVX512)
SM_DEFINE_DTW_KERNELS(double, d_avx2, SM_ATTR_AVX2)
SM_DEFINE_DTW_KERNELS(float, f_avx2, SM_ATTR_AVX2)
SM_DEFINE_DTW_KERNELS(double, d_base, )
SM_DEFINE_DTW_KERNELS(float, f_base, )
SM_DEFINE_HVP_KERNELS(double, d_avx512, SM_ATTR_AVX512)
SM_DEFINE_HVP_KERNELS(float, f_avx512, SM_ATTR_AVX512)
SM_DEFINE_HVP_KERNELS(double, d_avx2, SM_ATTR_AVX2)
SM_DEFINE_HVP_KERNELS(float, f_avx2, SM_ATTR_AVX2)
SM_DEFINE_HVP_KERNELS(double, d_base, )
SM_DEFINE_HVP_KERNELS(float, f_base, )
SM_DEFINE_VIT_KERNELS(double, d_avx512, SM_ATTR_AVX512)
SM_DEFINE_VIT_KERNELS(float, f_avx512, SM_ATTR_AVX512)
SM_DEFINE_VIT_KERNELS(double, d_avx2, SM_ATTR_AVX2)
SM_DEFINE_VIT_KERNELS(float, f_avx2, SM_ATTR_AVX2)
SM_DEFINE_VIT_KERNELS(double, d_base, )
SM_DEFINE_VIT_KERNELS(float, f_base, )
SM_DEFINE_ROW_KERNELS(avx512, SM_ATTR_AVX512)
SM_DEFINE_ROW_KERNELS(avx2, SM_ATTR_AVX2)
SM_DEFINE_ROW_KERNELS(base, )

/* 0 baseline, 1 AVX2 + FMA, 2 AVX-512; -1 until sm_init_isa() ran. Modules
 * call sm_init_isa() at import; the kernels also run it lazily (a benign
 * race: every thread would store the same value). */
static int sm_isa_level = -1;

static void sm_init_isa(void)
{
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw"))
        sm_isa_level = 2;
    else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        sm_isa_level = 1;
    else
        sm_isa_level = 0;
}

static const char *sm_isa_name(void)
{
    return sm_isa_level == 2 ? "avx512" : sm_isa_level == 1 ? "avx2+fma" : "baseline";
}

#define SM_DISPATCH(NAME, SUF, ARGS)                                           \
    if (sm_isa_level < 0) sm_init_isa();                                       \
    switch (sm_isa_level) {                                                    \
    case 2: NAME##_##SUF##_avx512 ARGS; break;                                 \
    case 1: NAME##_##SUF##_avx2 ARGS; break;                                   \
    default: NAME##_##SUF##_base ARGS;                                         \
    }
#define SM_DEFINE_DISPATCH(T, SUF)                                             \
static void sm_dtw_fwd_##SUF(                                                  \
    ptrdiff_t n, const double *theta, const double *up,                        \
    const double *left, const double *dg, double *out, T *qu, T *ql, T *qd,    \
    int reg, double gamma)                                                     \
{ SM_DISPATCH(sm_dtw_fwd, SUF, (n, theta, up, left, dg, out, qu, ql, qd, reg, gamma)) } \
static void sm_dtw_bwd_##SUF(                                                  \
    ptrdiff_t n, const double *eu, const double *el, const double *ed,         \
    const T *qu, const T *ql, const T *qd, double *out)                        \
{ SM_DISPATCH(sm_dtw_bwd, SUF, (n, eu, el, ed, qu, ql, qd, out)) }             \
static void sm_dtw_fwd_hvp_##SUF(                                              \
    ptrdiff_t n, const double *theta, const double *z, const double *up,       \
    const double *left, const double *dg, double *out, const double *dup,      \
    const double *dleft, const double *ddg, double *dout, T *qu, T *ql, T *qd, \
    T *qdu, T *qdl, T *qdd, int reg, double gamma)                             \
{ SM_DISPATCH(sm_dtw_fwd_hvp, SUF, (n, theta, z, up, left, dg, out, dup, dleft, ddg, \
                                   dout, qu, ql, qd, qdu, qdl, qdd, reg, gamma)) } \
static void sm_dtw_bwd_hvp_##SUF(                                              \
    ptrdiff_t n, const double *eu, const double *el, const double *ed,         \
    const double *fu, const double *fl, const double *fd, const T *qu,         \
    const T *ql, const T *qd, const T *qdu, const T *qdl, const T *qdd,        \
    double *out, double *dout)                                                 \
{ SM_DISPATCH(sm_dtw_bwd_hvp, SUF, (n, eu, el, ed, fu, fl, fd, qu, ql, qd, qdu, qdl, \
                                   qdd, out, dout)) }                       \
static void sm_vit_fwd_##SUF(                                                  \
    ptrdiff_t S, const T *th, const T *z, const double *V, const double *Vd,   \
    double *Vn, double *Vdn, T *E, T *Ed, double *inv, double *x, double gamma, \
    double *bad)                                                               \
{ SM_DISPATCH(sm_vit_fwd, SUF, (S, th, z, V, Vd, Vn, Vdn, E, Ed, inv, x, gamma, bad)) } \
static void sm_vit_bwd_##SUF(                                                  \
    ptrdiff_t S, const double *eb, const double *ebd, const double *inv,       \
    double *nb, double *nbd, T *E, T *Ed, const T *z, const double *Vdp,       \
    const double *Vdt, double gamma)                                           \
{ SM_DISPATCH(sm_vit_bwd, SUF, (S, eb, ebd, inv, nb, nbd, E, Ed, z, Vdp, Vdt, gamma)) }

SM_DEFINE_DISPATCH(double, d)
SM_DEFINE_DISPATCH(float, f)
static double sm_negentropy_row(ptrdiff_t n, const double *x, double *q, double gamma)
{
    if (sm_isa_level < 0) sm_init_isa();
    switch (sm_isa_level) {
    case 2: return sm_negentropy_row_avx512(n, x, q, gamma);
    case 1: return sm_negentropy_row_avx2(n, x, q, gamma);
    default: return sm_negentropy_row_base(n, x, q, gamma);
    }
}

#else
SM_DEFINE_DTW_KERNELS(double, d, )
SM_DEFINE_DTW_KERNELS(float, f, )
SM_DEFINE_HVP_KERNELS(double, d, )
SM_DEFINE_HVP_KERNELS(float, f, )
SM_DEFINE_VIT_KERNELS(double, d, )
SM_DEFINE_VIT_KERNELS(float, f, )
SM_DEFINE_ROW_KERNELS(any, )
#define sm_negentropy_row sm_negentropy_row_any
static void sm_init_isa(void) {}
static const char *sm_isa_name(void)
{
#if defined(__AVX512F__)
    return "avx512 (compile time)";
#elif defined(__AVX2__)
    return "avx2 (compile time)";
#else
    return "compiler default";
#endif
}
#endif

/* Threads an OpenMP parallel region would use (1 in a build without OpenMP). */
#ifdef _OPENMP
#include <omp.h>
static int sm_max_threads(void) { return omp_get_max_threads(); }
#else
static int sm_max_threads(void) { return 1; }
#endif

/*
 * Wavefront over an nI x nJ grid of tiles: fn(ctx, I, J, thread) for every
 * tile, each after its two neighbours toward the start, (I - 1, J) and
 * (I, J - 1) (toward the end, (I + 1, J) and (I, J + 1), when reverse), which
 * covers the diagonal one. One OpenMP region, no barrier: threads claim tiles
 * in tile-anti-diagonal order from an atomic counter and wait (yielding)
 * until the tile's neighbours are marked done. A tile waits only on tiles
 * claimed before it, which are running, so it never deadlocks. done: nI * nJ
 * flags, zeroed here. Without OpenMP (or without GCC/clang atomics) the
 * tiles run in order on one thread.
 */
#if defined(_OPENMP) && (defined(__GNUC__) || defined(__clang__))
#define SM_WAVEFRONT_THREADS 1
#if defined(__unix__) || defined(__APPLE__)
#include <sched.h>
#define SM_YIELD() sched_yield()
#else
#define SM_YIELD() ((void)0)
#endif
#endif
typedef void (*sm_tile_fn)(void *ctx, ptrdiff_t I, ptrdiff_t J, int thread);

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

static void sm_wavefront(ptrdiff_t nI, ptrdiff_t nJ, int reverse, sm_tile_fn fn,
                         void *ctx, int *done)
{
    ptrdiff_t n = nI * nJ, k;
    for (k = 0; k < n; ++k) done[k] = 0;
#ifdef SM_WAVEFRONT_THREADS
    ptrdiff_t next = 0;
    #pragma omp parallel
    {
        int thread = omp_get_thread_num();
        for (;;) {
            ptrdiff_t t = __atomic_fetch_add(&next, 1, __ATOMIC_RELAXED);
            ptrdiff_t I, J, a = -1, b = -1;
            if (t >= n) break;
            sm_tile_of(t, nI, nJ, &I, &J);
            if (reverse) { I = nI - 1 - I; J = nJ - 1 - J; }
            if (!reverse) {
                if (I > 0) a = (I - 1) * nJ + J;
                if (J > 0) b = I * nJ + J - 1;
            } else {
                if (I < nI - 1) a = (I + 1) * nJ + J;
                if (J < nJ - 1) b = I * nJ + J + 1;
            }
            while ((a >= 0 && !__atomic_load_n(&done[a], __ATOMIC_ACQUIRE)) ||
                   (b >= 0 && !__atomic_load_n(&done[b], __ATOMIC_ACQUIRE)))
                SM_YIELD();
            fn(ctx, I, J, thread);
            __atomic_store_n(&done[I * nJ + J], 1, __ATOMIC_RELEASE);
        }
    }
#else
    ptrdiff_t I, J;
    for (k = 0; k < n; ++k) {
        sm_tile_of(k, nI, nJ, &I, &J);
        if (reverse) { I = nI - 1 - I; J = nJ - 1 - J; }
        fn(ctx, I, J, 0);
    }
#endif
}

#endif /* SMOOTHMAX_SIMD_H */
