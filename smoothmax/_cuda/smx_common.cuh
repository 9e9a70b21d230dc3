// smoothmax GPU engine: what the kernels share besides the operators.
//
// The smoothed max operators (value, weights q, H·u, exp/log) are not here:
// they are smoothmax/_core/include/smx_ops.hpp, the header the compiled CPU
// core includes too, pasted ahead of this file by _source.py (NVRTC gets one
// text, no include path): smx::max3<T, REG> / smx::hvp3 for the DTW cell,
// smx::weight, smx::value, smx::hvp, smx::sparsemax_tau for a warp's row.
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
// ever evaluates inf - inf or 0 * inf (a masked cell's tangent is 0, never
// its +inf value, so products with weights are finite).

#define SMX_WARP 32

template <typename T> SMX_DEVICE bool smx_isfinite(T x) { return x < smx_inf<T>() && x > -smx_inf<T>(); }

// The end of hard decoding (Viterbi and the CRF): the tags of sequence b,
// tags[b, :] (TT entries), from its best last tag amax and the back-pointers
// bp (B, TT, S) int32; -1 past the length L, and everywhere when amax < 0
// (every path -inf). One thread runs it.
SMX_DEVICE void smx_backtrack(long long* tags, const int* bp, int b, int TT, int L, int S, int amax)
{
    long long* tg = tags + (smx_size)b * TT;
    for (int t = L; t < TT; ++t) tg[t] = -1;
    if (amax < 0) {
        for (int t = 0; t < L; ++t) tg[t] = -1;
        return;
    }
    int k = amax;
    for (int t = L - 1; t >= 0; --t) {
        tg[t] = k;
        if (t > 0) k = bp[((smx_size)b * TT + t) * S + k];
    }
}
