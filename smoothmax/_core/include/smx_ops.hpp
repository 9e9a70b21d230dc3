// The smoothed max operators max_Ω of smoothmax (docs/spec.md §1), written once.
//
// Included by the compiled CPU core (simd.h, crf_simd.h, operators.pxd; Cython
// in C++ mode), the CUDA kernels (NVRTC through CuPy, nvcc in
// `bench/gpu.sh --compile-only`) and their CPU emulation (smoothmax/_cuda/).
// `smoothmax/operators.py` is the readable, executable specification of the
// same maths (the reference engine runs it); this header is what the
// compiled engines run.
//
// Every function is a template on the float type T and, where the operator
// matters, on its code REG (NEGENTROPY 0, L2 1, HARD 2; the codes of
// smoothmax.operators.REG_CODES), `__host__ __device__` under nvcc. They are
// branch-free (selects only) so that the CPU's anti-diagonal loops vectorize
// them; one text serves every ISA (simd.h compiles its loops once per ISA
// with target attributes) and the GPU.
//
// The pieces, for x a row of n entries (-inf allowed), m = max x,
// y = (x - m)/γ <= 0:
//   stat      negentropy Σ exp(y) (>= 1), l2 the sparsemax threshold τ
//   value     m + γ log stat | m + γ Σ_q>0 q (y - q/2) | m
//   weight    q = exp(y)/stat | max(y - τ, 0) | one-hot first argmax
//   hvp       (H·u)_k = q_k (u_k - <q, u>)/γ | [q_k > 0](u_k - mean_S u)/γ | 0
//             (hvp_stat: <q, u> or mean_S u, from sums over the row)
// max3 / hvp3 are the three-entry cell of DTW (sparsemax by a sorting
// network, closed form); row_max / row_hvp the generic sequential row
// (Viterbi, DAG, CRF on the CPU; the GPU reduces the same pieces over a warp).
//
// -inf entries get weight exactly 0 and an all -inf row has value -inf and
// q = 0: x - m is formed only once m is known finite, so -inf - (-inf) never
// happens. Directions u are finite (the engines give masked cells a zero
// tangent), so a weight of 0 gives an exact 0 in <q, u> and in H·u without
// a test.
#ifndef SMOOTHMAX_SMX_OPS_HPP
#define SMOOTHMAX_SMX_OPS_HPP

#if defined(__CUDACC__)
#define SMX_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__) || defined(__clang__)
#define SMX_HD inline __attribute__((always_inline))
#elif defined(_MSC_VER)
#define SMX_HD __forceinline
#else
#define SMX_HD inline
#endif

#if !defined(__CUDACC_RTC__)
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#endif

namespace smx {

enum { NEGENTROPY = 0, L2 = 1, HARD = 2 };
typedef decltype((char*)nullptr - (char*)nullptr) index_t;  // ptrdiff_t, also under NVRTC

template <typename T> SMX_HD T inf();
#if defined(__CUDA_ARCH__)
template <> SMX_HD double inf<double>() { return __longlong_as_double(0x7ff0000000000000LL); }
template <> SMX_HD float inf<float>() { return __int_as_float(0x7f800000); }
#else
template <> SMX_HD double inf<double>() { return __builtin_huge_val(); }
template <> SMX_HD float inf<float>() { return __builtin_huge_valf(); }
#endif

// with_reg<F>(reg, args...): F::run<REG>(args...) for the runtime code reg,
// the one place where a code becomes a template argument (the CPU core's
// kernels; the GPU instantiates each REG by name).
template <class F, class... A> SMX_HD auto with_reg(int reg, A... a)
{
    switch (reg) {
    case NEGENTROPY: return F::template run<NEGENTROPY>(a...);
    case L2: return F::template run<L2>(a...);
    default: return F::template run<HARD>(a...);
    }
}

template <typename T> SMX_HD T max2(T a, T b) { return a > b ? a : b; }
template <typename T> SMX_HD T min2(T a, T b) { return a < b ? a : b; }

#if !defined(__CUDA_ARCH__)
// Host exp/log, inline and branch-free: libm's do not vectorize without
// -ffast-math, which we cannot use (it assumes no infinities, and +inf costs /
// -inf operator inputs are legal masks here). One text for double and float
// (float: twice the lanes on the CPU), the constants in fp<T>.
template <typename T> struct fp;
template <> struct fp<double> {
    typedef uint64_t bits_t;
    static constexpr int mant = 52, bias = 1023;
    static constexpr double exp_lo = -708.0;      // e^-708: the last normal results
    static constexpr double shift = 0x1.8p52;     // adding it rounds to an integer
    static constexpr double log2e = 1.44269504088896338700e+00;
    static constexpr double ln2hi = 6.93147180369123816490e-01;  // 32 trailing zero bits
    static constexpr double ln2lo = 1.90821492927058770002e-10;
    static constexpr int exp_deg = 13;            // Taylor: truncation below 1e-17
    static constexpr double inv_fact[14] = {
        1.0, 1.0, 0.5, 1.0 / 6.0, 1.0 / 24.0, 1.0 / 120.0, 1.0 / 720.0, 1.0 / 5040.0,
        1.0 / 40320.0, 1.0 / 362880.0, 1.0 / 3628800.0, 1.0 / 39916800.0, 1.0 / 479001600.0,
        1.0 / 6227020800.0};
    // log: musl's log (fdlibm) constants; sqrt2_2 the bits of 1 + f's lower end
    static constexpr bits_t one = 0x3ff0000000000000ULL, sqrt2_2 = 0x3fe6a09e00000000ULL;
    static constexpr double log_ln2hi = 6.93147180369123816490e-01;
    static constexpr double log_ln2lo = 1.90821492927058770002e-10;
    static constexpr int log_n = 7;
    static constexpr double Lg[7] = {6.666666666666735130e-01, 3.999999999940941908e-01,
                                     2.857142874366239149e-01, 2.222219843214978396e-01,
                                     1.818357216161805012e-01, 1.531383769920937332e-01,
                                     1.479819860511658591e-01};
};
template <> struct fp<float> {
    typedef uint32_t bits_t;
    static constexpr int mant = 23, bias = 127;
    static constexpr float exp_lo = -87.0f;
    static constexpr float shift = 0x1.8p23f;
    static constexpr float log2e = 1.44269504088896341f;
    static constexpr float ln2hi = 6.93145751953125e-01f;  // 12 trailing zero bits
    static constexpr float ln2lo = 1.42860676533018704e-06f;
    static constexpr int exp_deg = 7;             // Taylor: truncation below 6e-9
    static constexpr float inv_fact[8] = {1.0f, 1.0f, 0.5f, 1.0f / 6.0f, 1.0f / 24.0f,
                                          1.0f / 120.0f, 1.0f / 720.0f, 1.0f / 5040.0f};
    static constexpr bits_t one = 0x3f800000u, sqrt2_2 = 0x3f3504f3u;  // musl's logf
    static constexpr float log_ln2hi = 6.9313812256e-01f, log_ln2lo = 9.0580006145e-06f;
    static constexpr int log_n = 4;
    static constexpr float Lg[4] = {0xaaaaaa.0p-24f, 0xccce13.0p-25f, 0x91e9ee.0p-25f,
                                    0xf89e26.0p-26f};
};
template <typename T> SMX_HD typename fp<T>::bits_t to_bits(T x)
{
    typename fp<T>::bits_t u; memcpy(&u, &x, sizeof u); return u;
}
template <typename T> SMX_HD T from_bits(typename fp<T>::bits_t u)
{
    T x; memcpy(&x, &u, sizeof x); return x;
}

// exp(x) for x <= 0 or x = -inf; results below e^exp_lo are flushed to 0 (no
// subnormals). Taylor series on |r| <= ln2/2 after x = k ln2 + r: about 1 ulp
// (double), 2 ulp (float). Exact on exp(0) = 1 and exp(-inf) = 0. T is a float
// type or a GCC/Clang vector of one (simd.h gives fp<> for those): constants
// enter through T{} + c, which broadcasts them to every lane.
template <typename T> SMX_HD T exp_nonpos(T x)
{
    typedef fp<T> F;
    const T xc = x < F::exp_lo ? T{} + F::exp_lo : x;  // also maps -inf
    const T t = xc * F::log2e + F::shift;
    const T k = t - F::shift;                   // round(x / ln2), a normal exponent
    const T r = (xc - k * F::ln2hi) - k * F::ln2lo;
    T p = T{} + F::inv_fact[F::exp_deg];
    for (int i = F::exp_deg - 1; i >= 0; --i) p = p * r + F::inv_fact[i];
    const typename F::bits_t ki = to_bits(t) - to_bits(F::shift);  // k, two's complement
    const T scale = from_bits<T>((ki + F::bias) << F::mant);       // 2^k
    return x < F::exp_lo ? T{} : p * scale;
}

// log(x) for finite normal x > 0 (fdlibm/musl's method: x = 2^k (1 + f) with
// 1 + f in [sqrt2/2, sqrt2], log(1 + f) via s = f/(2 + f); < 1 ulp).
template <typename T> SMX_HD T log_pos(T x)
{
    typedef fp<T> F;
    typedef typename F::bits_t B;
    B hx = to_bits(x) + (F::one - F::sqrt2_2);
    const B e = hx >> F::mant;                                  // k + bias
    const T two_mant = from_bits<T>(B(F::bias + F::mant) << F::mant);
    const T dk = (from_bits<T>(to_bits(two_mant) | e) - two_mant) - T(F::bias);
    hx = (hx & ((B(1) << F::mant) - 1)) + F::sqrt2_2;
    const T f = from_bits<T>(hx) - T(1);
    const T hfsq = T(0.5) * f * f;
    const T s = f / (T(2) + f), z = s * s, w = z * z;
    T t1 = F::Lg[F::log_n - 1 - (F::log_n % 2)], t2 = F::Lg[F::log_n - 1 - ((F::log_n + 1) % 2)];
    for (int i = F::log_n - 3 - (F::log_n % 2); i >= 1; i -= 2) t1 = F::Lg[i] + w * t1;
    for (int i = F::log_n - 3 - ((F::log_n + 1) % 2); i >= 0; i -= 2) t2 = F::Lg[i] + w * t2;
    const T R = z * t2 + w * t1;  // Σ Lg[i] z^(i+1)
    return s * (hfsq + R) + dk * F::log_ln2lo - hfsq + f + dk * F::log_ln2hi;
}
#else
SMX_HD double exp_nonpos(double x) { return ::exp(x); }
SMX_HD float exp_nonpos(float x) { return ::expf(x); }
SMX_HD double log_pos(double x) { return ::log(x); }
SMX_HD float log_pos(float x) { return ::logf(x); }
#endif

// ---------------------------------------------------------------------------
// The pieces of a row (see the top). y = (x - m)/γ with m = max x finite.

// the value from the row max m and the reduction: Σ exp(y) (negentropy),
// Σ_q>0 q (y - q/2) (l2), unused (hard)
// (acc may be of a narrower type U than m: its log is then taken in U)
template <typename T, int REG, typename U> SMX_HD T value(T m, U acc, T gamma)
{
    if (REG == NEGENTROPY) return m + gamma * T(log_pos(acc));
    if (REG == L2) return m + gamma * T(acc);
    return m;
}
// (l2_term and weight also run on GCC/Clang vectors, as exp_nonpos does: the
// CPU's vector rows call them; T{} is 0, and 0.5f converts exactly to T.)
// the l2 value's term of one entry, 0 off the support
template <typename T> SMX_HD T l2_term(T y, T q) { return q > T{} ? q * (y - q * 0.5f) : T{}; }
// weight of one entry: stat is 1/Σ exp(y) (negentropy) or τ (l2)
template <typename T, int REG> SMX_HD T weight(T y, T stat)
{
    if (REG == NEGENTROPY) return exp_nonpos(y) * stat;
    return max2(y - stat, T{});
}
// the sparsemax threshold of a candidate support: Σ_S y and |S|
template <typename T> SMX_HD T sparsemax_tau(T sum, T count) { return (sum - T(1)) / count; }
// the statistic hvp needs, from sums over the row: <q, u> (negentropy),
// mean_S u = Σ_{q>0} u / |{q > 0}| (l2); support_mean<REG>() says whether the
// caller must form the support sums at all
template <int REG> SMX_HD constexpr bool support_mean() { return REG == L2; }
template <typename T, int REG> SMX_HD T hvp_stat(T qu, T su, T cnt)
{
    return support_mean<REG>() ? su / (cnt > T(0) ? cnt : T(1)) : qu;
}
// (H·u)_k from q_k, u_k and hvp_stat
template <typename T, int REG> SMX_HD T hvp(T q, T u, T qu_or_mean, T inv_gamma)
{
    if (REG == NEGENTROPY) return q * (u - qu_or_mean) * inv_gamma;
    if (REG == L2) return q > T(0) ? (u - qu_or_mean) * inv_gamma : T(0);
    return T(0);
}

// ---------------------------------------------------------------------------
// max_Ω of three entries (the DTW cell, x = -(up, left, diagonal) for the min
// convention). Returns the value (-inf when all are -inf) and writes q. The
// max and the value are in T; the shifted entries y, their exp/log and the
// weights in U (float for a float32 problem on the CPU: twice the lanes; y is
// formed in T first, so U never sees the entries' magnitude).
template <typename T, int REG, typename U = T>
SMX_HD T max3(T a, T b, T c, T gamma, T inv_gamma, U& qa, U& qb, U& qc)
{
    const T m = max2(max2(a, b), c);
    const bool fin = m > -inf<T>();
    const T ms = fin ? m : T(0);  // never -inf - (-inf)
    const U ya = U((a - ms) * inv_gamma), yb = U((b - ms) * inv_gamma), yc = U((c - ms) * inv_gamma);
    if (REG == NEGENTROPY) {
        const U ea = exp_nonpos(ya), eb = exp_nonpos(yb), ec = exp_nonpos(yc);
        const U s = fin ? ea + eb + ec : U(1);  // in [1, 3] when finite
        const U inv = U(1) / s;
        qa = ea * inv; qb = eb * inv; qc = ec * inv;  // all 0 when !fin
        return fin ? value<T, NEGENTROPY>(m, s, gamma) : m;
    }
    if (REG == L2) {
        // sparsemax by a sorting network: z1 >= z2 >= z3
        const U hi = max2(ya, yb), lo = min2(ya, yb);
        const U z1 = max2(hi, yc), mid = min2(hi, yc);
        const U z2 = max2(lo, mid), z3 = min2(lo, mid);
        U tau = sparsemax_tau(z1, U(1));
        tau = U(1) + z2 > z1 ? sparsemax_tau(z1 + z2, U(2)) : tau;
        tau = U(1) + U(2) * z3 > z1 + z2 ? sparsemax_tau(z1 + z2 + z3, U(3)) : tau;
        const U pa = weight<U, L2>(ya, tau), pb = weight<U, L2>(yb, tau), pc = weight<U, L2>(yc, tau);
        qa = fin ? pa : U(0); qb = fin ? pb : U(0); qc = fin ? pc : U(0);
        const U acc = l2_term(ya, qa) + l2_term(yb, qb) + l2_term(yc, qc);
        return fin ? value<T, L2>(m, acc, gamma) : m;
    }
    // hard: one-hot first argmax in the order (a, b, c)
    const bool ia = fin && a == m;
    const bool ib = fin && !ia && b == m;
    const bool ic = fin && !ia && !ib;
    qa = ia ? U(1) : U(0); qb = ib ? U(1) : U(0); qc = ic ? U(1) : U(0);
    return m;
}

// The DTW gradient keeps two of a cell's three weights, (q_up, q_left), in
// the stored type T (the CPU core and the GPU kernels alike). The diagonal
// weight is q_diag = 1 - q_up - q_left rounded in T and never below 0 (a
// float q_diag under the rounding of q_up + q_left). Where q_diag is exactly
// 0 (sparsemax, the hard max, a +inf diagonal predecessor, an underflow), the
// stored q_left is 1 - q_up rounded in T, so that q_diag is exactly 0 again.
// A cell with no finite predecessor stores (0, 1): no path reaches it, its
// adjoint is exactly 0 and its pair never reaches E.
template <typename T> SMX_HD T dtw_stored_left(T q_up, T q_left, T q_diag)
{
    return q_diag == T(0) ? T(1) - q_up : q_left;
}
template <typename T> SMX_HD T dtw_q_diag(T q_up, T q_left)
{
    const T d = (T(1) - q_up) - q_left;
    return d > T(0) ? d : T(0);
}

// H·u for the three-entry cell where the gradient is q; returns <q, u>.
template <typename T, int REG>
SMX_HD T hvp3(T qa, T qb, T qc, T ua, T ub, T uc, T inv_gamma, T& ha, T& hb, T& hc)
{
    const T qu = qa * ua + qb * ub + qc * uc;
    T su = T(0), cnt = T(0);
    if (support_mean<REG>()) {
        cnt = (qa > T(0) ? T(1) : T(0)) + (qb > T(0) ? T(1) : T(0)) + (qc > T(0) ? T(1) : T(0));
        su = (qa > T(0) ? ua : T(0)) + (qb > T(0) ? ub : T(0)) + (qc > T(0) ? uc : T(0));
    }
    const T stat = hvp_stat<T, REG>(qu, su, cnt);
    ha = hvp<T, REG>(qa, ua, stat, inv_gamma);
    hb = hvp<T, REG>(qb, ub, stat, inv_gamma);
    hc = hvp<T, REG>(qc, uc, stat, inv_gamma);
    return qu;
}

// ---------------------------------------------------------------------------
// The generic sequential row of the l2 and hard operators: max_Ω(x[:n]), q
// written to q[:n]. (Negentropy rows are reduced by the engines' own vector
// loops over the same pieces: simd.h's NegentropyRow on the CPU, a warp sum
// in smx_viterbi.cu.)
template <typename T, int REG>
SMX_HD T row_max(const T* x, T* q, index_t n, T gamma)
{
    static_assert(REG == L2 || REG == HARD, "negentropy rows: see above");
    T m = -inf<T>();
    index_t k, best = -1;
    for (k = 0; k < n; ++k) {
        if (x[k] > m) { m = x[k]; best = k; }
    }
    if (!(m > -inf<T>())) {
        for (k = 0; k < n; ++k) q[k] = T(0);
        return m;
    }
    if (REG == HARD) {
        for (k = 0; k < n; ++k) q[k] = k == best ? T(1) : T(0);
        return m;
    }
    const T ig = T(1) / gamma;
    // l2, Michelot's exact algorithm: the support starts as the finite entries
    // and every pass drops those with y <= τ; the argmax (y = 0 > τ) stays.
    T tau = T(0), count = T(0), sum = T(0);
    for (k = 0; k < n; ++k) {
        const bool in = x[k] > -inf<T>();
        sum += in ? (x[k] - m) * ig : T(0);
        count += in ? T(1) : T(0);
    }
    for (;;) {
        tau = sparsemax_tau(sum, count);
        T sum2 = T(0), count2 = T(0);
        for (k = 0; k < n; ++k) {
            const T y = (x[k] - m) * ig;
            sum2 += y > tau ? y : T(0);
            count2 += y > tau ? T(1) : T(0);
        }
        if (count2 == count) break;
        sum = sum2; count = count2;
    }
    T acc = T(0);
    for (k = 0; k < n; ++k) {
        const T y = (x[k] - m) * ig;
        q[k] = x[k] > -inf<T>() ? weight<T, L2>(y, tau) : T(0);
        acc += l2_term(y, q[k]);
    }
    return value<T, L2>(m, acc, gamma);
}

// out[:n] = H·u[:n] where the gradient is q[:n]; returns <q, u>.
template <typename T, int REG>
SMX_HD T row_hvp(const T* q, const T* u, T* out, index_t n, T gamma)
{
    const T ig = T(1) / gamma;
    T qu = T(0), su = T(0), cnt = T(0);
    index_t k;
    for (k = 0; k < n; ++k) {
        qu += q[k] * u[k];
        su += q[k] > T(0) ? u[k] : T(0);
        cnt += q[k] > T(0) ? T(1) : T(0);
    }
    const T stat = hvp_stat<T, REG>(qu, su, cnt);
    for (k = 0; k < n; ++k) out[k] = hvp<T, REG>(q[k], u[k], stat, ig);
    return qu;
}

}  // namespace smx

#endif  // SMOOTHMAX_SMX_OPS_HPP
