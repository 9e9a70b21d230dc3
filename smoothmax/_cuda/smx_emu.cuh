// Prelude for the CPU emulation build (plain C++20, one OS thread per CUDA
// thread; see smoothmax/_cuda/emulate.py). Used to test the kernels where no
// GPU exists; it emulates just what the kernels use: a 1-D grid of 1-D
// blocks whose size is a multiple of 32, __syncthreads, full-warp shuffles,
// dynamic shared memory, int atomics and acquire/release flags.
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstring>
#include <limits>
#include <thread>
#include <utility>
#include <vector>

typedef unsigned long long smx_size;
struct smx_dim3 { unsigned x = 1, y = 1, z = 1; };
inline thread_local smx_dim3 threadIdx, blockIdx, blockDim, gridDim;

struct smx_block_ctx {
    std::barrier<>* block_bar;
    std::vector<std::barrier<>*> warp_bar;
    unsigned char* smem;
    unsigned char* xchg;   // 32 lanes x 8 bytes per warp
};
inline thread_local smx_block_ctx* smx_ctx = nullptr;

#define SMX_GLOBAL
#define SMX_DEVICE inline
#define SMX_EXTERN_SHARED(T, name) T* name = (T*)smx_ctx->smem
#define __restrict__
inline void smx_syncthreads() { smx_ctx->block_bar->arrive_and_wait(); }

template <typename T> inline T smx_inf() { return std::numeric_limits<T>::infinity(); }

template <typename T> inline T smx_shfl_src(T v, int src_lane_or_neg)
{
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    unsigned char* slots = smx_ctx->xchg + (smx_size)warp * 32 * 8;
    std::memcpy(slots + lane * 8, &v, sizeof(T));
    smx_ctx->warp_bar[warp]->arrive_and_wait();
    T r = v;
    if (src_lane_or_neg >= 0 && src_lane_or_neg < 32) std::memcpy(&r, slots + src_lane_or_neg * 8, sizeof(T));
    smx_ctx->warp_bar[warp]->arrive_and_wait();
    return r;
}
template <typename T> inline T smx_shfl_up(T v, int d) { int l = threadIdx.x % 32; return smx_shfl_src(v, l - d >= 0 ? l - d : -1); }
template <typename T> inline T smx_shfl_down(T v, int d) { int l = threadIdx.x % 32; return smx_shfl_src(v, l + d < 32 ? l + d : -1); }
template <typename T> inline T smx_shfl_xor(T v, int d) { int l = threadIdx.x % 32; return smx_shfl_src(v, l ^ d); }
template <typename T> inline T smx_shfl_idx(T v, int src) { return smx_shfl_src(v, src); }

inline int smx_atomic_add_int(int* p, int v) { return std::atomic_ref<int>(*p).fetch_add(v); }
template <typename T> inline void smx_atomic_add(T* p, T v) { std::atomic_ref<T>(*p).fetch_add(v); }
inline int smx_ld_acquire(const int* p)
{
    int v = std::atomic_ref<int>(*const_cast<int*>(p)).load(std::memory_order_acquire);
    std::this_thread::yield();
    return v;
}
inline void smx_st_release(int* p, int v) { std::atomic_ref<int>(*p).store(v, std::memory_order_release); }
template <typename T> inline T smx_ldcg(const T* p) { return *p; }
#include <math.h>

// --- launching ------------------------------------------------------------
template <class... A, std::size_t... I>
inline void smx_emu_call_impl(void (*k)(A...), void** args, std::index_sequence<I...>)
{
    k(*static_cast<std::remove_reference_t<A>*>(args[I])...);
}
template <class... A>
inline void smx_emu_call(void (*k)(A...), void** args)
{
    smx_emu_call_impl(k, args, std::index_sequence_for<A...>{});
}

// Runs the grid with at most `maxconc` blocks resident at a time, started in
// blockIdx order (a GPU gives no order; the kernels must not rely on one).
template <class F>
inline void smx_emu_run_grid(F call, int grid, int block, int smem_bytes, int maxconc)
{
    std::atomic<int> next{0};
    auto worker = [&]() {
        for (;;) {
            const int bid = next.fetch_add(1);
            if (bid >= grid) return;
            const int nwarp = (block + 31) / 32;
            std::barrier<> bb(block);
            std::vector<std::barrier<>*> wb;
            for (int w = 0; w < nwarp; ++w) wb.push_back(new std::barrier<>(32));
            std::vector<unsigned char> smem(smem_bytes > 0 ? smem_bytes : 16, 0xFF);  // garbage
            std::vector<unsigned char> xchg((smx_size)nwarp * 32 * 8);
            smx_block_ctx ctx{&bb, wb, smem.data(), xchg.data()};
            std::vector<std::thread> th;
            for (int t = 0; t < block; ++t) {
                th.emplace_back([&, t]() {
                    smx_ctx = &ctx;
                    threadIdx.x = t; blockIdx.x = bid; blockDim.x = block; gridDim.x = grid;
                    call();
                    // a thread that returns early leaves the barriers: emulate by
                    // dropping out (the kernels only return uniformly per block).
                });
            }
            for (auto& x : th) x.join();
            for (auto* w : wb) delete w;
        }
    };
    std::vector<std::thread> workers;
    const int nw = maxconc < grid ? maxconc : grid;
    for (int w = 0; w < nw; ++w) workers.emplace_back(worker);
    for (auto& x : workers) x.join();
}
