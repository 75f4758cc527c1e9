// tc_tile.cuh: operand loaders and the main loop of the tc1 tensor-core kernels
// (dense_forward_tc.cu, dense_backward_tc.cu); the warp-level parts are in mma.cuh.
//
// One block (128 threads, 4 warps as 2 x 2) computes a 64 x 64 tile C[r0:r0+64, c0:c0+64] of
// C = A @ B, each warp a 32 x 32 piece (2 x 4 mma tiles, 32 float accumulators per thread). K is
// walked in slices of BK = 32 elements. Both operands sit in shared memory k-contiguous:
// As[r][k] = A[r0 + r, k0 + k] and Bs[c][k] = B[k0 + k, c0 + c], so that the mma fragments (and
// ldmatrix's 8 x 8 pieces) are pairs of consecutive k (mma.cuh). Every element goes global ->
// registers -> shared memory, converted on the way: bf16 / fp16 as is, float32 -> tf32 by
// cvt.rna, dz = da f'(.) formed in float32 and rounded to the operand type. Elements outside the
// matrices are zeros (exact zeros in every sum).
//
// Loaders (G: the element's source, a functor returning the shared-memory type):
//   load_kcontig  the source is k-contiguous (row r, k): thread t fills row t / 2, 16 k of it
//   load_outer    the source is outer-contiguous (k, column c): thread t reads column t % 64 of
//                 k rows t / 64, + 2, ... (coalesced global reads), writes them transposed
// Main loop per slice: load both operands | barrier | mma over the slice | barrier. The loads
// of the next slice are not overlapped with the mma of this one (a later version: cp.async for
// the 16-bit operands that need no conversion, double buffers).
//
// The fp32 accumulation order inside one mma instruction is the hardware's (exact products,
// fp32 sums); across instructions k ascending. The host emulation adds each k in ascending order
// with one rounding per term.
#pragma once

#include "activations.cuh"
#include "mma.cuh"

namespace gpubp {
namespace tc {

template <int PREC, class G>
__device__ __forceinline__ void load_kcontig(typename Smem<PREC>::type* S, int rows, int row0, int k0, int kend,
                                             int tid, G get) {
    constexpr int LD = Smem<PREC>::LD;
    const int r = tid >> 1, kb = (tid & 1) * 16;
    const int row = row0 + r;
    typename Smem<PREC>::type* dst = S + r * LD + kb;
#pragma unroll 4
    for (int j = 0; j < 16; ++j) {
        const int k = k0 + kb + j;
        dst[j] = (row < rows && k < kend) ? get(row, k) : typename Smem<PREC>::type(0);
    }
}

template <int PREC, class G>
__device__ __forceinline__ void load_outer(typename Smem<PREC>::type* S, int cols, int col0, int k0, int kend,
                                           int tid, G get) {
    constexpr int LD = Smem<PREC>::LD;
    const int c = tid & 63, kb = tid >> 6;
    const int col = col0 + c;
    typename Smem<PREC>::type* dst = S + c * LD;
#pragma unroll 4
    for (int j = 0; j < BK / 2; ++j) {
        const int kl = kb + 2 * j;
        const int k = k0 + kl;
        dst[kl] = (col < cols && k < kend) ? get(k, col) : typename Smem<PREC>::type(0);
    }
}

template <int PREC>
__device__ __forceinline__ void zero_acc(float (&acc)[2][4][4]) {
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int nj = 0; nj < 4; ++nj)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[mi][nj][r] = 0.0f;
}

// acc += A[r0:, kbeg:kend] @ B[kbeg:kend, c0:] with the loaders fill_a(k0), fill_b(k0).
template <int PREC, class FA, class FB>
__device__ __forceinline__ void mainloop(const typename Smem<PREC>::type* As, const typename Smem<PREC>::type* Bs,
                                         int kbeg, int kend, FA fill_a, FB fill_b, float (&acc)[2][4][4]) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int wm = (warp >> 1) * 32, wn = (warp & 1) * 32;
    for (int k0 = kbeg; k0 < kend; k0 += BK) {
        fill_a(k0);
        fill_b(k0);
        __syncthreads();
        warp_mma_slice<PREC>(As, Bs, wm, wn, lane, acc);
        __syncthreads();
    }
}

}  // namespace tc
}  // namespace gpubp
