// dense_backward.cu: backward pass of a dense layer, given da = dL/da, float32.
//
// Computes (x (N, in), W (in, out), da (N, out), all row-major)
//   dz = da * f'(z)          (N, out)   never stored: computed inside the GEMM operand loads
//   dx = dz @ W^T            (N, in)    dense_dx_*: skipped for the first layer (launcher flag)
//   dW = x^T @ dz            (in, out)  dense_dw_*: written (=), not accumulated
//   db = sum_rows dz         (out,)     by the dW kernel (v1: its first row of blocks; v2: one
//                                       extra column of blocks)
//   f' reads what the forward pass saved (template parameter SRC, see activations.cuh): z
//   (float32 (N, out)), a (sigmoid, tanh), the relu / leaky_relu bit mask (uint32
//   (N, ceil(out / 32))), or nothing (identity). The CPU reference is
//   gpubp/backends/numpy_ref.py: dense_backward.
//
// Fused, and why
//   dz = da * f'(.) is formed while each slice of da goes from global to shared memory, in
//   both GEMMs: the unfused form writes dz (N*out floats) and reads it back twice, plus a
//   separate bias-gradient pass over it. db rides on the dW launch: in v1 the first row of
//   dW blocks sums the dz tiles it already holds; in v2 an extra column of blocks, running
//   beside the GEMM blocks, re-forms dz from da and z for its 128 columns and sums it (the
//   GEMM blocks have no registers to spare for it; see gemm_tile.cuh).
//
// Determinism: no atomics. Every sum has a fixed order set by the shapes alone:
//   dx, dW: fmaf over k ascending within a block (one block owns each output element);
//   dW with split-K (v2, when in x out has too few 128 x 128 tiles to fill the GPU): the batch
//     is cut into S chunks of a length fixed by (N, in, out); chunk s writes partial sums to
//     workspace slice s; splitk_reduce adds the slices for s ascending;
//   db: v1 one thread per column, rows ascending; v2 two threads per column sum the even and
//     the odd rows of the chunk ascending, then even + odd (and split-K slices as for dW).
//
// Versions
//   v1  dense_dx_v1 / dense_dw_v1<ACT, SRC>: simple shared-memory tiling, block 32 x 8
//       threads, 32 x 32 output tiles, K slices of 32, 4 outputs per thread, 4-byte bounds-
//       checked loads; dW over the whole batch in one block (no split), db by the first row of
//       blocks. Same summation order as v2 for dx and (split 1) dW.
//   v2  dense_dx_v2 / dense_dw_v2<ACT, SRC, VEC>: the 128 x 128 x 8 register-blocked,
//       double-buffered tiles of gemm_tile.cuh (256 threads, 8 x 8 outputs per thread); every
//       operand goes global -> shared by cp.async (sm_80+), 16-byte copies when VEC; the thread
//       that copied a slice's da and z / a / mask word turns them into dz on the way into the
//       operand buffer; split-K over the batch for dW with a deterministic second pass
//       (splitk_reduce); db by an extra column of blocks.
//
// Benchmark
//   gpubp kernels bench --shape N,in,out [--act relu] [--version 2] [--repeat 50]
//   checks dx on a sample of rows against a float64 reference first, then times the backward
//   pass (dW, db, dx) with CUDA events (warm-up, median) beside cuBLAS composed by hand
//   (x^T @ da, a column sum, da @ W^T; the activation backward left out, so a lower bound of
//   the unfused path); floor: 4*N*in*out FLOP / 67 TFLOP/s on an H100 SXM.
//
// Launch (gpubp/backends/cuda_fused.py: queue_backward)
//   v1: block (32, 8); dx grid (ceil(N / 32), ceil(in / 32)); dW grid (ceil(in / 32),
//       ceil(out / 32)); 8.4 KB static shared memory.
//   v2: block 256; dx grid (ceil(N / 128), ceil(in / 128)), 29.5 KB shared memory; dW grid
//       (ceil(in / 128) + 1, ceil(out / 128), S), the last column of blocks for db, 25.5 KB;
//       at most 128 registers (two blocks per SM). S = cuda_fused.split_plan(N, in, out): 1 when
//       in x out has >= 264 tiles of 128 x 128, else up to 64 chunks of >= 256 batch rows;
//       then splitk_reduce, block 256, over in*out + out elements.
#include "activations.cuh"
#include "gemm_tile.cuh"

namespace gpubp {

// dz at (n, o), one element (v1 kernels, v2 db blocks); the caller checks n < N and o < O.
template <int ACT, int SRC>
__device__ __forceinline__ float dz_at(const float* __restrict__ da, const float* __restrict__ s,
                                       const unsigned* __restrict__ mask, long long n, int o, int O, int words,
                                       float p0, float p1) {
    const float d = da[n * O + o];
    if constexpr (SRC == SAVED_MASK) {
        return act_dz_mask<ACT>(d, (mask[n * words + (o >> 5)] >> (o & 31)) & 1u, p0);
    } else if constexpr (SRC == SAVED_Z || SRC == SAVED_A) {
        return act_dz<ACT, SRC>(d, s[n * O + o], p0, p1);
    } else {
        return act_dz<ACT, SRC>(d, 0.0f, p0, p1);
    }
}

// ------------------------------------------------------------------------------------------------
// v1: simple tiled
// ------------------------------------------------------------------------------------------------

// dx (N, I) = dz (N, O) @ W^T.  Block (32, 8): rows n0 + ty + 8q, column i0 + tx.
template <int ACT, int SRC>
__global__ void __launch_bounds__(256) dense_dx_v1(const float* __restrict__ da, const float* __restrict__ s,
                                                   const unsigned* __restrict__ mask, const float* __restrict__ w,
                                                   float* __restrict__ dx, int N, int I, int O, float p0, float p1) {
    static_assert(SavedOk<ACT, SRC>::value, "activation / saved kind mismatch");
    constexpr int T = 32;
    __shared__ float dzs[T][T + 1];  // dzs[r][k] = dz[n0 + r, k0 + k]
    __shared__ float wts[T][T + 1];  // wts[k][c] = W[i0 + c, k0 + k]
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int n0 = blockIdx.x * T, i0 = blockIdx.y * T;
    const int words = (O + 31) >> 5;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    for (int k0 = 0; k0 < O; k0 += T) {
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const int r = ty + 8 * q;
            dzs[r][tx] = (n0 + r < N && k0 + tx < O) ? dz_at<ACT, SRC>(da, s, mask, n0 + r, k0 + tx, O, words, p0, p1) : 0.0f;
            wts[tx][r] = (i0 + r < I && k0 + tx < O) ? w[(long long)(i0 + r) * O + k0 + tx] : 0.0f;
        }
        __syncthreads();
#pragma unroll 8
        for (int k = 0; k < T; ++k) {
            const float wk = wts[k][tx];
#pragma unroll
            for (int q = 0; q < 4; ++q) acc[q] = fmaf(dzs[ty + 8 * q][k], wk, acc[q]);
        }
        __syncthreads();
    }
    const int col = i0 + tx;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        const int row = n0 + ty + 8 * q;
        if (row < N && col < I) dx[(long long)row * I + col] = acc[q];
    }
}

// dW (I, O) = x^T @ dz over the whole batch, db (O,) = column sums of dz (blocks with
// blockIdx.x == 0, thread row ty == 0). Block (32, 8): dW rows i0 + ty + 8q, column o0 + tx.
template <int ACT, int SRC>
__global__ void __launch_bounds__(256) dense_dw_v1(const float* __restrict__ x, const float* __restrict__ da,
                                                   const float* __restrict__ s, const unsigned* __restrict__ mask,
                                                   float* __restrict__ dw, float* __restrict__ db, int N, int I, int O,
                                                   float p0, float p1) {
    static_assert(SavedOk<ACT, SRC>::value, "activation / saved kind mismatch");
    constexpr int T = 32;
    __shared__ float xts[T][T + 1];  // xts[c][k] = x[k0 + k, i0 + c]
    __shared__ float dzs[T][T + 1];  // dzs[k][c] = dz[k0 + k, o0 + c]
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int i0 = blockIdx.x * T, o0 = blockIdx.y * T;
    const int words = (O + 31) >> 5;
    const bool do_db = blockIdx.x == 0 && ty == 0;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    float dbacc = 0.0f;
    for (int k0 = 0; k0 < N; k0 += T) {
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const int kk = ty + 8 * q;
            xts[tx][kk] = (k0 + kk < N && i0 + tx < I) ? x[(long long)(k0 + kk) * I + i0 + tx] : 0.0f;
            dzs[kk][tx] = (k0 + kk < N && o0 + tx < O) ? dz_at<ACT, SRC>(da, s, mask, k0 + kk, o0 + tx, O, words, p0, p1) : 0.0f;
        }
        __syncthreads();
        if (do_db) {
            for (int k = 0; k < T; ++k) dbacc += dzs[k][tx];
        }
#pragma unroll 8
        for (int k = 0; k < T; ++k) {
            const float d = dzs[k][tx];
#pragma unroll
            for (int q = 0; q < 4; ++q) acc[q] = fmaf(xts[ty + 8 * q][k], d, acc[q]);
        }
        __syncthreads();
    }
    const int col = o0 + tx;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        const int row = i0 + ty + 8 * q;
        if (row < I && col < O) dw[(long long)row * O + col] = acc[q];
    }
    if (do_db && col < O) db[col] = dbacc;
}

// ------------------------------------------------------------------------------------------------
// v2: register-blocked, vectorised, double-buffered
// ------------------------------------------------------------------------------------------------

// dx (N, I) = dz (N, O) @ W^T. Grid (ceil(N / 128), ceil(I / 128)).
template <int ACT, int SRC, bool VEC>
__global__ void __launch_bounds__(v2::THREADS, 2) dense_dx_v2(const float* __restrict__ da,
                                                               const float* __restrict__ s,
                                                               const unsigned* __restrict__ mask,
                                                               const float* __restrict__ w, float* __restrict__ dx,
                                                               int N, int I, int O, float p0, float p1) {
    static_assert(SavedOk<ACT, SRC>::value, "activation / saved kind mismatch");
    using namespace v2;
    __shared__ __align__(16) float As[2 * TILE];  // dz slice, [k][n]
    __shared__ __align__(16) float Bs[2 * TILE];  // W^T slice, [k][i]
    __shared__ DzStage stage;                     // raw da, z / a, mask words in flight
    __shared__ float4 wstage[THREADS];            // W in flight
    const int tid = threadIdx.x, ty = tid >> 4, tx = tid & 15;
    const int n0 = blockIdx.x * BM, i0 = blockIdx.y * BN;
    float acc[8][8];
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;

    LoadDz<ACT, SRC, VEC, true> la(da, s, mask, O, N, n0, tid, p0, p1, As, &stage);  // dz (N, O): k = o
    LoadKMajor<VEC> lb(w, O, I, O, i0, tid, Bs, wstage);  // W (I, O) read as W^T: row i, k = o contiguous
    mainloop(la, lb, As, Bs, 0, O, acc, ty, tx);
    store_acc<VEC>(dx, I, N, I, n0, i0, acc, ty, tx);
}

// dW (I, O) = x^T @ dz over batch rows [z*kchunk, min(N, (z+1)*kchunk)), z = blockIdx.z, written
// to dw + z*split_stride, and db = the column sums of those dz rows, written to db + z*split_stride.
// With one chunk (gridDim.z == 1, split_stride 0) dw and db are the results; otherwise they point
// into the workspace that splitk_reduce folds.
// Grid (ceil(I / 128) + 1, ceil(O / 128), S): the last column of blocks computes db alone
// (db_block), the others the GEMM. db in a block of its own keeps its state out of the GEMM's
// registers (128 per thread, all taken); it re-forms dz from da and z / a / mask, one more read
// of them next to the ceil(I / 128) reads the GEMM blocks make.
template <int ACT, int SRC>
__device__ __forceinline__ void db_block(const float* __restrict__ da, const float* __restrict__ s,
                                         const unsigned* __restrict__ mask, float* __restrict__ db, int kbeg, int kend,
                                         int o0, int O, float p0, float p1, float* red) {
    // Thread t sums column o0 + t % 128 over the rows kbeg + t / 128, + 2, + 4, ... (ascending);
    // then the two row classes are added, class 0 first.
    const int tid = threadIdx.x, col = o0 + (tid & 127), half = tid >> 7;
    const int words = (O + 31) >> 5;
    float sum = 0.0f;
    if (col < O) {
#pragma unroll 4
        for (int k = kbeg + half; k < kend; k += 2) sum += dz_at<ACT, SRC>(da, s, mask, k, col, O, words, p0, p1);
    }
    if (half == 1) red[tid & 127] = sum;
    __syncthreads();
    if (half == 0 && col < O) db[col] = sum + red[tid];
}

template <int ACT, int SRC, bool VEC>
__global__ void __launch_bounds__(v2::THREADS, 2) dense_dw_v2(const float* __restrict__ x,
                                                               const float* __restrict__ da,
                                                               const float* __restrict__ s,
                                                               const unsigned* __restrict__ mask,
                                                               float* __restrict__ dw, float* __restrict__ db,
                                                               long long split_stride, int kchunk, int N, int I,
                                                               int O, float p0, float p1) {
    static_assert(SavedOk<ACT, SRC>::value, "activation / saved kind mismatch");
    using namespace v2;
    __shared__ __align__(16) float As[2 * TILE];  // x^T slice, [k][i]
    __shared__ __align__(16) float Bs[2 * TILE];  // dz slice, [k][o]
    __shared__ DzStage stage;                     // raw da, z / a, mask words in flight
    const int tid = threadIdx.x, ty = tid >> 4, tx = tid & 15;
    const int o0 = blockIdx.y * BN;
    const int kbeg = blockIdx.z * kchunk;
    const int kend = min(N, kbeg + kchunk);
    if (blockIdx.x == gridDim.x - 1) {  // the same for the whole block
        db_block<ACT, SRC>(da, s, mask, db + blockIdx.z * split_stride, kbeg, kend, o0, O, p0, p1, As);
        return;
    }
    const int i0 = blockIdx.x * BM;
    float acc[8][8];
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;

    LoadOuter<VEC> la(x, I, I, kend, i0, tid, As);  // x (N, I): k = batch row, columns i contiguous
    LoadDz<ACT, SRC, VEC, false> lb(da, s, mask, O, kend, o0, tid, p0, p1, Bs, &stage);
    mainloop(la, lb, As, Bs, kbeg, kend, acc, ty, tx);
    store_acc<VEC>(dw + blockIdx.z * split_stride, O, I, O, i0, o0, acc, ty, tx);
}

// out[i] = sum_{s = 0..S-1} ws[s*stride + i] for s ascending; out is dw for i < len_w, db after.
__global__ void __launch_bounds__(256) splitk_reduce(const float* __restrict__ ws, int S, long long stride,
                                                     long long len_w, float* __restrict__ dw, float* __restrict__ db) {
    const long long step = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < stride; i += step) {
        float sum = 0.0f;
        for (int sl = 0; sl < S; ++sl) sum += ws[sl * stride + i];
        if (i < len_w) {
            dw[i] = sum;
        } else {
            db[i - len_w] = sum;
        }
    }
}

}  // namespace gpubp
