// smoothmax GPU engine: the smoothed max operators as inline device functions.
//
// Design. Every kernel is a template on the float type T (float or double)
// and on the operator code REG (0 negentropy, 1 l2/sparsemax, 2 hard), so the
// operator is resolved at compile time and there is one source per kernel,
// instantiated through CuPy name expressions ("smx_dtw_fwd<float,0,1>").
// The same source also compiles (a) with nvcc for sm_90 in
// `bench/gpu.sh --compile-only` and (b) as plain C++20 against the CPU
// emulation layer smx_emu.cuh (one OS thread per CUDA thread), which is how
// the kernels are tested on machines without a GPU.
//
// Portability macros (defined by the prelude, CUDA or emulation):
//   SMX_GLOBAL, SMX_DEVICE, SMX_EXTERN_SHARED(T, name), smx_syncthreads(),
//   smx_shfl_up / smx_shfl_down / smx_shfl_xor / smx_shfl_idx (full warp),
//   smx_atomic_add_int, smx_ld_acquire, smx_st_release, smx_ldcg.
//
// -inf safety: an input equal to -inf gets weight exactly 0; no expression
// ever evaluates inf - inf or 0 * inf (products with weights are guarded).

#define SMX_WARP 32

template <typename T> SMX_DEVICE T smx_exp(T x);
template <> SMX_DEVICE float smx_exp<float>(float x) { return expf(x); }
template <> SMX_DEVICE double smx_exp<double>(double x) { return exp(x); }
template <typename T> SMX_DEVICE T smx_log(T x);
template <> SMX_DEVICE float smx_log<float>(float x) { return logf(x); }
template <> SMX_DEVICE double smx_log<double>(double x) { return log(x); }

template <typename T> SMX_DEVICE T smx_max(T a, T b) { return a > b ? a : b; }
template <typename T> SMX_DEVICE T smx_min(T a, T b) { return a < b ? a : b; }
template <typename T> SMX_DEVICE bool smx_isfinite(T x) { return x < smx_inf<T>() && x > -smx_inf<T>(); }
// q * u, exactly 0 when the weight q is 0 (u may then be anything).
template <typename T> SMX_DEVICE T smx_wmul(T q, T u) { return q != T(0) ? q * u : T(0); }

// ---------------------------------------------------------------------------
// max_Ω over three entries (the DTW cell). x[k] may be -inf. Returns the value
// (-inf when every entry is -inf) and writes q = ∇max_Ω(x) (zeros then).
template <typename T, int REG>
SMX_DEVICE T smx_max3(T x0, T x1, T x2, T gamma, T inv_gamma, T& q0, T& q1, T& q2)
{
    const T ninf = -smx_inf<T>();
    T m = smx_max(x0, smx_max(x1, x2));
    q0 = T(0); q1 = T(0); q2 = T(0);
    if (!(m > ninf)) return ninf;
    if (REG == 2) {  // hard: first argmax in the order (x0, x1, x2)
        if (x0 >= x1 && x0 >= x2) q0 = T(1);
        else if (x1 >= x2) q1 = T(1);
        else q2 = T(1);
        return m;
    }
    // shifted, scaled entries: z = (x - m)/γ <= 0, max(z) = 0; -inf stays -inf
    T z0 = (x0 - m) * inv_gamma, z1 = (x1 - m) * inv_gamma, z2 = (x2 - m) * inv_gamma;
    if (REG == 0) {
        T e0 = smx_exp(z0), e1 = smx_exp(z1), e2 = smx_exp(z2);
        T s = e0 + e1 + e2;  // >= 1
        T inv = T(1) / s;
        q0 = e0 * inv; q1 = e1 * inv; q2 = e2 * inv;
        return m + gamma * smx_log(s);
    }
    // REG == 1: sparsemax of z. Sorted z: 0 = a >= b >= c (median/min, no arithmetic on -inf).
    T c = smx_min(z0, smx_min(z1, z2));
    T b = smx_max(smx_min(z0, z1), smx_min(smx_max(z0, z1), z2));
    T tau;
    if (b > T(-1)) {                                  // support >= 2
        if (T(1) + T(2) * c > b) tau = (b + c - T(1)) / T(3);   // support 3
        else tau = (b - T(1)) / T(2);
    } else {
        tau = T(-1);                                  // support 1
    }
    q0 = smx_max(z0 - tau, T(0)); q1 = smx_max(z1 - tau, T(0)); q2 = smx_max(z2 - tau, T(0));
    T v = T(0);
    if (q0 > T(0)) v += q0 * (z0 - T(0.5) * q0);
    if (q1 > T(0)) v += q1 * (z1 - T(0.5) * q1);
    if (q2 > T(0)) v += q2 * (z2 - T(0.5) * q2);
    return m + gamma * v;
}

// Hessian-vector product of max_Ω at the point whose gradient is q: H·u.
// (For l2 only supp(q) matters; for negentropy only q.) Entries with q = 0
// contribute nothing whatever u holds.
template <typename T, int REG>
SMX_DEVICE void smx_hvp3(T q0, T q1, T q2, T u0, T u1, T u2, T inv_gamma, T& h0, T& h1, T& h2)
{
    h0 = T(0); h1 = T(0); h2 = T(0);
    if (REG == 2) return;
    if (REG == 0) {
        T qu = smx_wmul(q0, u0) + smx_wmul(q1, u1) + smx_wmul(q2, u2);
        h0 = q0 != T(0) ? q0 * (u0 - qu) * inv_gamma : T(0);
        h1 = q1 != T(0) ? q1 * (u1 - qu) * inv_gamma : T(0);
        h2 = q2 != T(0) ? q2 * (u2 - qu) * inv_gamma : T(0);
        return;
    }
    int n = 0; T su = T(0);
    if (q0 > T(0)) { n++; su += u0; }
    if (q1 > T(0)) { n++; su += u1; }
    if (q2 > T(0)) { n++; su += u2; }
    if (n == 0) return;
    T mean = su / T(n);
    if (q0 > T(0)) h0 = (u0 - mean) * inv_gamma;
    if (q1 > T(0)) h1 = (u1 - mean) * inv_gamma;
    if (q2 > T(0)) h2 = (u2 - mean) * inv_gamma;
}
