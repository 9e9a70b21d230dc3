/*
 * Pairwise costs between feature rows for the DTW-on-features engine
 * (dtwf.pyx), one anti-diagonal of cells at a time.
 *
 * A diagonal of n cells pairs the rows x_0, x_1, ... (stride d) with the rows
 * y_0, y_{-1}, ... (stride -d): cell k is (x + k*d, y - k*d).
 *   sm_cost_diag:  out[k] = c(x_k, y_k)
 *   sm_cgrad_diag: gx_k += e[k] * dc/dx, gy_k += e[k] * dc/dy
 * Costs: 0 squared Euclidean sum (x - y)^2; 1 Euclidean |x - y| (gradient 0
 * where x = y); 2 cosine 1 - <x, y> on rows already normalised by the caller
 * (gradient: the raw sums e*(y - s*x), e*(x - s*y), s = <x, y>, which the
 * caller scales by -1/|x_i|, -1/|y_j|).
 *
 * The d-loops carry "omp simd" reductions (compiled with -fopenmp; ignored
 * otherwise) and, on x86-64 GCC/Clang without an -march, AVX2 clones picked
 * at load time, as simd.h does for the operators. Rows are read as double.
 */
#ifndef SMOOTHMAX_COSTS_H
#define SMOOTHMAX_COSTS_H

#include <stddef.h>

#define SM_RESTRICT __restrict__  /* C and C++ (GCC, clang) */

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__) && \
    !defined(__AVX2__) && !defined(SMOOTHMAX_NO_MULTIVERSION)
#define SM_FEAT_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define SM_FEAT_CLONES
#endif

static inline double sm_feat_dot(const double *SM_RESTRICT x, const double *SM_RESTRICT y, ptrdiff_t d)
{
    double acc = 0.0;
#pragma omp simd reduction(+:acc)
    for (ptrdiff_t k = 0; k < d; ++k) acc += x[k] * y[k];
    return acc;
}

static inline double sm_feat_sqdist(const double *SM_RESTRICT x, const double *SM_RESTRICT y, ptrdiff_t d)
{
    double acc = 0.0;
#pragma omp simd reduction(+:acc)
    for (ptrdiff_t k = 0; k < d; ++k) {
        double t = x[k] - y[k];
        acc += t * t;
    }
    return acc;
}

SM_FEAT_CLONES
static void sm_cost_diag(ptrdiff_t n, int cost, const double *x, const double *y, ptrdiff_t d,
                         double *SM_RESTRICT out)
{
    for (ptrdiff_t k = 0; k < n; ++k) {
        const double *xk = x + k * d, *yk = y - k * d;
        if (cost == 2) out[k] = 1.0 - sm_feat_dot(xk, yk, d);
        else {
            double s = sm_feat_sqdist(xk, yk, d);
            out[k] = cost == 1 ? __builtin_sqrt(s) : s;
        }
    }
}

SM_FEAT_CLONES
static void sm_cgrad_diag(ptrdiff_t n, int cost, const double *SM_RESTRICT e, const double *x,
                          const double *y, ptrdiff_t d, double *gx, double *gy)
{
    for (ptrdiff_t k = 0; k < n; ++k) {
        double ek = e[k];
        if (ek == 0.0) continue;
        const double *SM_RESTRICT xk = x + k * d, *SM_RESTRICT yk = y - k * d;
        double *SM_RESTRICT gxk = gx + k * d, *SM_RESTRICT gyk = gy - k * d;
        if (cost == 2) {
            double s = sm_feat_dot(xk, yk, d);
#pragma omp simd
            for (ptrdiff_t m = 0; m < d; ++m) {
                gxk[m] += ek * (yk[m] - s * xk[m]);
                gyk[m] += ek * (xk[m] - s * yk[m]);
            }
            continue;
        }
        double w = 2.0 * ek;
        if (cost == 1) {
            double s = sm_feat_sqdist(xk, yk, d);
            if (!(s > 0.0)) continue;
            w = ek / __builtin_sqrt(s);
        }
#pragma omp simd
        for (ptrdiff_t m = 0; m < d; ++m) {
            double t = w * (xk[m] - yk[m]);
            gxk[m] += t;
            gyk[m] -= t;
        }
    }
}

#endif
