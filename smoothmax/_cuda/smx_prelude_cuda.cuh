// Prelude for the CUDA build (NVRTC through CuPy, or nvcc for the compile check).
typedef unsigned long long smx_size;
#define SMX_GLOBAL __global__
#define SMX_DEVICE __device__ __forceinline__
#define SMX_EXTERN_SHARED(T, name) extern __shared__ __align__(16) T name[]
#define smx_syncthreads() __syncthreads()

template <typename T> SMX_DEVICE T smx_inf();
template <> SMX_DEVICE float smx_inf<float>() { return __int_as_float(0x7f800000); }
template <> SMX_DEVICE double smx_inf<double>() { return __longlong_as_double(0x7ff0000000000000LL); }

template <typename T> SMX_DEVICE T smx_shfl_up(T v, int d) { return __shfl_up_sync(0xffffffffu, v, d); }
template <typename T> SMX_DEVICE T smx_shfl_down(T v, int d) { return __shfl_down_sync(0xffffffffu, v, d); }
template <typename T> SMX_DEVICE T smx_shfl_xor(T v, int d) { return __shfl_xor_sync(0xffffffffu, v, d); }
template <typename T> SMX_DEVICE T smx_shfl_idx(T v, int src) { return __shfl_sync(0xffffffffu, v, src); }

SMX_DEVICE int smx_atomic_add_int(int* p, int v) { return atomicAdd(p, v); }
// float / double atomic add (double: sm_60+)
template <typename T> SMX_DEVICE void smx_atomic_add(T* p, T v) { atomicAdd(p, v); }
// acquire/release at GPU scope (PTX memory model, sm_70+)
SMX_DEVICE int smx_ld_acquire(const int* p)
{
    int v;
    asm volatile("ld.acquire.gpu.s32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}
SMX_DEVICE void smx_st_release(int* p, int v)
{
    asm volatile("st.release.gpu.s32 [%0], %1;" : : "l"(p), "r"(v) : "memory");
}
// loads of data published by another block: cached in L2 only
template <typename T> SMX_DEVICE T smx_ldcg(const T* p) { return __ldcg(p); }
