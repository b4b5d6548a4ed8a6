// A small CPU emulation of the CUDA execution model, enough to run gsrq's
// kernels unchanged for testing on machines without a GPU: every thread of a
// block is a std::thread; __syncthreads is a block barrier; warp shuffles go
// through a per-warp buffer and barrier; shared memory is one buffer per kind
// (blocks run one after another); atomics are std::atomic_ref.
#pragma once
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <thread>
#include <utility>
#include <vector>

#include "cuda_bf16.h"
#include "cuda_fp16.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

using std::max;
using std::min;

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
    dim3() = default;
    dim3(unsigned a, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};

inline thread_local dim3 threadIdx;
inline dim3 blockIdx, blockDim, gridDim;

namespace emu {
struct Warp {
    explicit Warp(int n) : bar(n) {}
    std::barrier<> bar;
    alignas(8) unsigned char buf[32][8];
};
inline std::unique_ptr<std::barrier<>> block_bar;
inline std::vector<std::unique_ptr<Warp>> warps;
}  // namespace emu

inline void __syncthreads() { emu::block_bar->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::warps[threadIdx.x >> 5]->bar.arrive_and_wait(); }

template <typename T>
T __shfl_xor_sync(unsigned, T v, int offset) {
    static_assert(sizeof(T) <= 8, "shuffle of a large type");
    const int lane = threadIdx.x & 31;
    emu::Warp& w = *emu::warps[threadIdx.x >> 5];
    std::memcpy(w.buf[lane], &v, sizeof(T));
    w.bar.arrive_and_wait();
    T r;
    std::memcpy(&r, w.buf[lane ^ offset], sizeof(T));
    w.bar.arrive_and_wait();
    return r;
}

template <typename T>
T __ldg(const T* p) {
    return *p;
}

inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }

namespace emu {

template <typename... A, std::size_t... I>
void call(void (*k)(A...), void** params, std::index_sequence<I...>) {
    k(*static_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(params[I])...);
}

// Runs kernel k over the grid, one block at a time; params as for cuLaunchKernel.
template <typename... A>
void launch(void (*k)(A...), dim3 grid, dim3 block, void** params) {
    if (block.y != 1 || block.z != 1 || block.x % 32 != 0) throw std::runtime_error("emu: 1-D blocks of whole warps only");
    gridDim = grid;
    blockDim = block;
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                blockIdx = dim3(bx, by, bz);
                block_bar = std::make_unique<std::barrier<>>(block.x);
                warps.clear();
                for (unsigned w = 0; w < block.x / 32; ++w) warps.push_back(std::make_unique<Warp>(32));
                std::vector<std::thread> threads;
                threads.reserve(block.x);
                for (unsigned t = 0; t < block.x; ++t)
                    threads.emplace_back([=] {
                        threadIdx = dim3(t);
                        call(k, params, std::index_sequence_for<A...>{});
                    });
                for (auto& th : threads) th.join();
            }
}

}  // namespace emu

// Dynamic shared memory: one buffer per declared element type and namespace.
constexpr std::size_t kEmuSmem = 1 << 20;
#define GSRQ_EMU_EXPORT(name)                                                                                   \
    extern "C" void emu_##name(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned smem, void** params) { \
        if (smem > kEmuSmem) throw std::runtime_error("emu: dynamic shared memory too large");                    \
        emu::launch(name, dim3(gx, gy, gz), dim3(bx), params);                                                    \
    }
