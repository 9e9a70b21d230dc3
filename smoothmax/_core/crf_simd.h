/*
 * Negentropy kernels of the factorised Viterbi (CRF) engine, crf.pyx.
 *
 * With a shared transition matrix the step
 *   V_t(i) = e_t(i) + gamma log sum_j exp((A[j, i] + a_j) / gamma),  a = V_{t-1},
 * factorises as  gamma log sum_j K[j, i] p_j + c_i + M  with
 *   c_i = max_j A[j, i],  K[j, i] = exp((A[j, i] - c_i) / gamma)  (once per call),
 *   M = max_j a_j,        p_j = exp((a_j - M) / gamma)              (S exps a step),
 * so a step is S exps and one S x S multiply-add instead of S^2 exps. All of
 * K and p lie in [0, 1]; a term of sum_j K[j, i] p_j that underflows is below
 * 1e-307, so the sum is exact to double precision whenever it is above
 * SM_CRF_TINY; the caller recomputes the other rows in the log domain
 * (operators.pxd), so the result never depends on the scale of the scores.
 *
 * The weights are q_t(i, j) = K[j, i] p_j / s_i; the reverse step with
 * r_i = ebar_t(i) / s_i is
 *   ebar_{t-1}(j) = p_j sum_i K[j, i] r_i,   G[j, i] += w p_j r_i,
 * and the transition gradient is K (.) G at the end (G summed over the batch
 * and time): one S x S pass a step, no exp.
 *
 * Compiled per ISA like simd.h (whose exp, row max and dispatch it uses).
 */
#ifndef SMOOTHMAX_CRF_SIMD_H
#define SMOOTHMAX_CRF_SIMD_H

#include "simd.h"

#define SM_CRF_TINY 1e-280

namespace smx {
namespace cpu {

struct CrfFwd {
    static SMX_HD double run(ptrdiff_t S, const double *SMX_R K, const double *SMX_R a,
                             double *SMX_R p, double *SMX_R s, double *SMX_R y, double gamma)
    {
        ptrdiff_t i, j;
        double m = rowmax(S, a, y);
        for (i = 0; i < S; ++i) s[i] = 0.0;
        if (!(m > -SM_INF)) {
            for (j = 0; j < S; ++j) p[j] = 0.0;
            return m;
        }
        const double ig = 1.0 / gamma;
        for (j = 0; j < S; ++j) p[j] = smx::exp_nonpos((a[j] - m) * ig);
        for (j = 0; j < S; ++j) {
            const double pj = p[j];
            const double *SMX_R kr = K + j * S;
            if (pj == 0.0) continue;
            for (i = 0; i < S; ++i) s[i] += pj * kr[i];
        }
        return m;
    }
};

struct CrfBwd {
    static SMX_HD void run(ptrdiff_t S, const double *SMX_R K, const double *SMX_R p,
                           const double *SMX_R r, double *SMX_R nb, double *SMX_R G, double w)
    {
        ptrdiff_t i, j, l;
        double acc[8];
        for (j = 0; j < S; ++j) {
            const double pj = p[j], wp = w * p[j];
            const double *SMX_R kr = K + j * S;
            double *SMX_R gr = G + j * S;
            if (pj == 0.0) { nb[j] = 0.0; continue; }
            for (l = 0; l < 8; ++l) acc[l] = 0.0;
            for (i = 0; i + 8 <= S; i += 8)
                for (l = 0; l < 8; ++l) {
                    acc[l] += kr[i + l] * r[i + l];
                    gr[i + l] += wp * r[i + l];
                }
            double d = sum8(acc);
            for (; i < S; ++i) {
                d += kr[i] * r[i];
                gr[i] += wp * r[i];
            }
            nb[j] = pj * d;
        }
    }
};

inline double crf_fwd(ptrdiff_t S, const double *K, const double *a, double *p, double *s,
                      double *y, double gamma)
{ return dispatch<CrfFwd>(S, K, a, p, s, y, gamma); }

inline void crf_bwd(ptrdiff_t S, const double *K, const double *p, const double *r, double *nb,
                    double *G, double w)
{ dispatch<CrfBwd>(S, K, p, r, nb, G, w); }

}  // namespace cpu
}  // namespace smx

#endif
