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
//   - the tensor-core kernels' warp-level operations (mma.cuh: mma.sync m16n8k16 bf16 / f16 and
//     m16n8k8 tf32, ldmatrix.x4, the cvt roundings to bf16 / f16 / tf32) are emulated lane by lane
//     from the fragment layouts of the PTX ISA, at the end of this file;
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
// Per-thread slots of the warp-level matrix operations (mma.cuh): fragments and ldmatrix rows.
struct Lane {
    unsigned a[4];
    unsigned b[2];
    const void* p;
};
inline std::vector<Lane> lanes;

inline unsigned linear_tid() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }

// Runs body() as every thread of every block of the grid.
inline void launch(dim3 grid, dim3 block, const std::function<void()>& body) {
    const unsigned nt = block.x * block.y * block.z;
    gridDim = grid;
    blockDim = block;
    exchange.assign(nt, 0u);
    lanes.assign(nt, Lane{});
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

// ------------------------------------------------------------------------------------------------
// Tensor-core operations (kernels/mma.cuh), lane by lane.
// Conversions round as the PTX instructions do: cvt.rn.bf16.f32 / cvt.rn.f16.f32 to nearest, ties
// to even (f16: subnormals kept, overflow to infinity); cvt.rna.tf32.f32 to nearest, ties away from
// zero (13 low bits dropped). Widening conversions are exact.
// mma: each lane posts its fragment registers, the warp meets at a barrier, each lane gathers the
// 16 x K A and K x 8 B tiles from the posted registers through the documented layouts (g = lane / 4,
// t = lane % 4; see mma.cuh) and forms its own four D elements as c + sum_k a_k b_k, k ascending, one
// fmaf per term (the products of bf16 / f16 / tf32 values are exact in float32). The hardware's
// order and rounding inside one instruction may differ: the tests compare with a bound there.
// ------------------------------------------------------------------------------------------------
inline unsigned emu_bits(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float emu_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline float emu_bf16_to_f32(unsigned short h) { return emu_float(static_cast<unsigned>(h) << 16); }
inline float emu_f16_to_f32(unsigned short h) {
    const unsigned sign = (h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0x1fu) return emu_float(sign | 0x7f800000u | (m << 13));
    if (e == 0u) {
        const float v = static_cast<float>(m) * 5.9604644775390625e-8f;  // m * 2^-24, exact
        return sign ? -v : v;
    }
    return emu_float(sign | ((e + 112u) << 23) | (m << 13));
}
inline unsigned short emu_f32_to_bf16_rn(float f) {
    unsigned x = emu_bits(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<unsigned short>((x >> 16) | 0x40u);  // quiet NaN
    x += 0x7fffu + ((x >> 16) & 1u);
    return static_cast<unsigned short>(x >> 16);
}
inline unsigned short emu_f32_to_f16_rn(float f) {
    const unsigned x = emu_bits(f), sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return static_cast<unsigned short>(sign | 0x7e00u);  // NaN
    if (ax >= 0x477ff000u) return static_cast<unsigned short>(sign | 0x7c00u);  // >= 65520: infinity
    if (ax >= 0x38800000u) {  // a normal half (>= 2^-14): rebias, round 13 bits to even
        unsigned r = ax - 0x38000000u;
        r += 0xfffu + ((r >> 13) & 1u);
        return static_cast<unsigned short>(sign | (r >> 13));
    }
    if (ax < 0x33000000u) return static_cast<unsigned short>(sign);  // below 2^-25: zero
    const unsigned e = ax >> 23, m = (ax & 0x7fffffu) | 0x800000u, shift = 126u - e;  // q units of 2^-24
    unsigned q = m >> shift;
    const unsigned rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (q & 1u))) ++q;
    return static_cast<unsigned short>(sign | q);
}
inline unsigned emu_f32_to_tf32_rna(float f) {
    const unsigned x = emu_bits(f);
    if ((x & 0x7fffffffu) >= 0x7f800000u) return x;  // infinity, NaN
    return (x + 0x1000u) & 0xffffe000u;  // add half a tf32 ulp to the magnitude: ties away from zero
}

inline void emu_warp_sync() {
    const unsigned t = emu::linear_tid();
    emu::warp_barriers[t / 32]->arrive_and_wait();
}

// ldmatrix.sync.aligned.m8n8.x4.shared.b16: lane 8i + r names row r of matrix i; register i of
// lane l receives 32 bits at byte 4 (l % 4) of row l / 4 of matrix i.
inline void emu_ldmatrix_x4(unsigned (&r)[4], const void* row) {
    const unsigned t = emu::linear_tid(), base = t / 32 * 32, lane = t % 32;
    emu::lanes[t].p = row;
    emu_warp_sync();
    for (int i = 0; i < 4; ++i)
        std::memcpy(&r[i], static_cast<const char*>(emu::lanes[base + 8 * i + lane / 4].p) + 4 * (lane % 4), 4);
    emu_warp_sync();
}

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32, d = a @ b + d.
inline void emu_mma_16816(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2], bool bf16) {
    const unsigned t = emu::linear_tid(), base = t / 32 * 32, lane = t % 32;
    std::memcpy(emu::lanes[t].a, a, sizeof a);
    std::memcpy(emu::lanes[t].b, b, sizeof b);
    emu_warp_sync();
    auto val = [bf16](unsigned word, unsigned k) {
        const unsigned short h = static_cast<unsigned short>((k & 1u) ? word >> 16 : word & 0xffffu);
        return bf16 ? emu_bf16_to_f32(h) : emu_f16_to_f32(h);
    };
    auto A = [&](unsigned row, unsigned k) {  // lane 4 (row % 8) + (k % 8) / 2, register (row >= 8) + 2 (k >= 8)
        const emu::Lane& L = emu::lanes[base + 4 * (row % 8) + (k % 8) / 2];
        return val(L.a[(row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)], k);
    };
    auto B = [&](unsigned k, unsigned n) {  // lane 4 n + (k % 8) / 2, register k >= 8
        return val(emu::lanes[base + 4 * n + (k % 8) / 2].b[k >= 8 ? 1 : 0], k);
    };
    const unsigned g = lane / 4, tq = lane % 4;
    float out[4];
    for (unsigned r = 0; r < 4; ++r) {
        const unsigned row = g + 8 * (r / 2), col = 2 * tq + (r & 1);
        float acc = d[r];
        for (unsigned k = 0; k < 16; ++k) acc = fmaf(A(row, k), B(k, col), acc);
        out[r] = acc;
    }
    emu_warp_sync();
    for (int r = 0; r < 4; ++r) d[r] = out[r];
}

// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32, d = a @ b + d (the 13 low bits of each
// operand ignored).
inline void emu_mma_1688_tf32(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    const unsigned t = emu::linear_tid(), base = t / 32 * 32, lane = t % 32;
    std::memcpy(emu::lanes[t].a, a, sizeof a);
    std::memcpy(emu::lanes[t].b, b, sizeof b);
    emu_warp_sync();
    auto A = [&](unsigned row, unsigned k) {  // lane 4 (row % 8) + k % 4, register (row >= 8) + 2 (k >= 4)
        return emu_float(emu::lanes[base + 4 * (row % 8) + k % 4].a[(row >= 8 ? 1 : 0) + (k >= 4 ? 2 : 0)] & 0xffffe000u);
    };
    auto B = [&](unsigned k, unsigned n) {  // lane 4 n + k % 4, register k >= 4
        return emu_float(emu::lanes[base + 4 * n + k % 4].b[k >= 4 ? 1 : 0] & 0xffffe000u);
    };
    const unsigned g = lane / 4, tq = lane % 4;
    float out[4];
    for (unsigned r = 0; r < 4; ++r) {
        const unsigned row = g + 8 * (r / 2), col = 2 * tq + (r & 1);
        float acc = d[r];
        for (unsigned k = 0; k < 8; ++k) acc = fmaf(A(row, k), B(k, col), acc);
        out[r] = acc;
    }
    emu_warp_sync();
    for (int r = 0; r < 4; ++r) d[r] = out[r];
}
