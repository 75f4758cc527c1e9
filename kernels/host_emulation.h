// host_emulation.h: runs the kernels of this folder on the CPU, for tests on machines without a GPU.
//
// Not part of the GPU build (NVRTC never sees it). A test compiles a C++ file that includes this
// header, then dense_forward.cu and dense_backward.cu, with g++ -std=c++20 -pthread, and drives
// the kernels through the same Python launch code as on a GPU (gpubp/backends/cuda_fused.py:
// queue_forward / queue_backward). The emulation:
//   - runs the blocks of a grid one after another, each thread of a block as a std::thread;
//   - __syncthreads is a std::barrier over the block; warp shuffles and ballots exchange values
//     through a per-warp buffer between two barriers over the warp (32 threads);
//   - __shared__ variables are function statics (one block at a time, so one copy suffices);
//   - cp.async copies complete at once (gemm_tile.cuh, GPUBP_HOST_EMULATION), which is one legal
//     schedule of the asynchronous copy;
//   - float maths is the host libm's: close to, not bit-equal with, the CUDA device functions.
// It checks indexing, bounds, tiling, masks, split-K and the summation order; it cannot check
// timing-dependent behaviour of the real hardware (memory ordering, bank conflicts, speed).
#pragma once

#include <math.h>

#include <algorithm>
#include <barrier>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#define GPUBP_HOST_EMULATION 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
inline float4 make_float4(float a, float b, float c, float d) { return float4{a, b, c, d}; }

inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

namespace emu {
inline std::barrier<>* block_barrier = nullptr;
inline std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
inline std::vector<unsigned> exchange;

inline unsigned linear_tid() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }

// Runs body() as every thread of every block of the grid.
inline void launch(dim3 grid, dim3 block, const std::function<void()>& body) {
    const unsigned nt = block.x * block.y * block.z;
    gridDim = grid;
    blockDim = block;
    exchange.assign(nt, 0u);
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                std::barrier<> bar(nt);
                block_barrier = &bar;
                warp_barriers.clear();
                for (unsigned w = 0; w < (nt + 31) / 32; ++w)
                    warp_barriers.emplace_back(std::make_unique<std::barrier<>>(std::min(32u, nt - 32 * w)));
                std::vector<std::thread> threads;
                threads.reserve(nt);
                for (unsigned t = 0; t < nt; ++t) {
                    threads.emplace_back([&, t, bx, by, bz] {
                        threadIdx = dim3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
                        blockIdx = dim3{bx, by, bz};
                        body();
                    });
                }
                for (auto& th : threads) th.join();
                block_barrier = nullptr;
            }
}

// A kernel pointer and an array of pointers to its arguments (as cuLaunchKernel takes them).
template <class... P, std::size_t... I>
void call_with(void (*k)(P...), void** args, std::index_sequence<I...>, dim3 grid, dim3 block) {
    std::tuple<std::decay_t<P>...> values{*static_cast<std::decay_t<P>*>(args[I])...};
    launch(grid, block, [&] { std::apply(k, values); });
}

using Runner = std::function<void(dim3, dim3, void**)>;

template <class... P>
Runner make_runner(void (*k)(P...)) {
    return [k](dim3 grid, dim3 block, void** args) { call_with(k, args, std::index_sequence_for<P...>{}, grid, block); };
}
}  // namespace emu

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }

template <class T>
inline T __shfl_xor_sync(unsigned, T v, int lane_mask) {
    static_assert(sizeof(T) == 4, "32-bit values only");
    const unsigned t = emu::linear_tid(), w = t / 32, lane = t % 32;
    std::memcpy(&emu::exchange[t], &v, 4);
    emu::warp_barriers[w]->arrive_and_wait();
    T r;
    std::memcpy(&r, &emu::exchange[w * 32 + (lane ^ static_cast<unsigned>(lane_mask))], 4);
    emu::warp_barriers[w]->arrive_and_wait();
    return r;
}

inline unsigned __ballot_sync(unsigned, bool pred) {
    const unsigned t = emu::linear_tid(), w = t / 32;
    emu::exchange[t] = pred ? 1u : 0u;
    emu::warp_barriers[w]->arrive_and_wait();
    unsigned word = 0;
    for (unsigned l = 0; l < 32 && w * 32 + l < emu::exchange.size(); ++l) word |= emu::exchange[w * 32 + l] << l;
    emu::warp_barriers[w]->arrive_and_wait();
    return word;
}

template <class T>
inline T __ldg(const T* p) {
    return *p;
}
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
