// dense_backward_tc.cu: backward pass of a dense layer on tensor cores, TF32 or BF16 / FP16 mixed precision.
//
// Computes (precision P = PREC, R_g / R_s as in dense_forward_tc.cu; x (N, in), W (in, out),
// da (N, out) and the saved z / a in P's storage type, row-major)
//   dz = da f'(saved)            float32 (N, out), never stored: formed in the operand loads
//   dx = R_s(R_g(dz) @ R_g(W)^T)  (N, in), storage type   dense_dx_tc1 (skipped for a first layer)
//   dW = R_g(x)^T @ R_g(dz)       (in, out), float32      dense_dw_tc1
//   db = sum_rows dz              (out,), float32 (from the unrounded dz)
//   with float32 accumulation (mma.sync). f' reads what the forward kernel saved: R_s(z),
//   R_s(a) (sigmoid, tanh), the relu / leaky_relu bit mask, or nothing (identity), as SRC says.
//
// Fused, and why
//   As in dense_backward.cu: dz = da f'(.) is formed while da (and z / a / the mask word) go
//   from global to shared memory, rounded to the operand type there, in both GEMMs; db rides on
//   the dW launch as one extra column of blocks summing the float32 dz of its 64 columns.
//
// Determinism: no atomics; the order of every sum is fixed by the shapes alone (mma k blocks
//   ascending; split-K slices added in slice order by splitk_reduce_tc; db: two row classes,
//   even + odd, per column).
//
// Versions
//   tc1  dense_dx_tc1 / dense_dw_tc1<PREC, ACT, SRC>: the 64 x 64 x 32 block tile of
//        tc_tile.cuh (4 warps of 32 x 32, m16n8k16 bf16 / fp16 via ldmatrix.x4, m16n8k8 tf32);
//        dz formed per element in the loaders; dW split over the batch (split_plan_tc) with a
//        deterministic second pass; db by an extra column of blocks. Same limits as the forward
//        tc1 (no load / mma overlap, no wgmma).
//
// Benchmark
//   Not measured yet (no GPU run so far); to be timed like dense_backward.cu's v2 beside cuBLAS
//   in the same precision; floor 4*N*in*out FLOP at the GPU's dense TF32 / BF16 peak.
//
// Launch (gpubp/backends/cuda_fused/plans_tc.py: queue_backward_tc)
//   block 128; dx grid (ceil(N / 64), ceil(in / 64)); dW grid (ceil(in / 64) + 1,
//   ceil(out / 64), S), the last column of blocks for db; then, when S > 1, splitk_reduce_tc
//   (block 256) over in*out + out elements. 10 KB (bf16 / fp16) or 18 KB (tf32) static shared
//   memory; __launch_bounds__(128, 4). sm_80 or newer.
#include "activations.cuh"
#include "mma.cuh"
#include "tc_tile.cuh"

namespace gpubp {

// dz at (n, o) in float32 from da and the saved value (storage type) or the mask word.
template <int PREC, int ACT, int SRC>
__device__ __forceinline__ float dz_tc(const typename Store<PREC>::type* __restrict__ da,
                                       const typename Store<PREC>::type* __restrict__ s,
                                       const unsigned* __restrict__ mask, long long n, int o, int O, int words,
                                       float p0, float p1) {
    const float d = tc::load_f32<PREC>(da[n * O + o]);
    if constexpr (SRC == SAVED_MASK) {
        return act_dz_mask<ACT>(d, (mask[n * words + (o >> 5)] >> (o & 31)) & 1u, p0);
    } else if constexpr (SRC == SAVED_Z || SRC == SAVED_A) {
        return act_dz<ACT, SRC>(d, tc::load_f32<PREC>(s[n * O + o]), p0, p1);
    } else {
        return act_dz<ACT, SRC>(d, 0.0f, p0, p1);
    }
}

// dx (N, I) = R_s(R_g(dz) @ R_g(W)^T). Grid (ceil(N / 64), ceil(I / 64)).
template <int PREC, int ACT, int SRC>
__global__ void __launch_bounds__(tc::THREADS, 4) dense_dx_tc1(const typename Store<PREC>::type* __restrict__ da,
                                                               const typename Store<PREC>::type* __restrict__ s,
                                                               const unsigned* __restrict__ mask,
                                                               const typename Store<PREC>::type* __restrict__ w,
                                                               typename Store<PREC>::type* __restrict__ dx, int N,
                                                               int I, int O, float p0, float p1) {
    static_assert(SavedOk<ACT, SRC>::value, "activation / saved kind mismatch");
    using namespace tc;
    typedef typename Smem<PREC>::type S;
    constexpr int LD = Smem<PREC>::LD;
    __shared__ __align__(16) S As[BM * LD];  // dz slice, [n][o]
    __shared__ __align__(16) S Bs[BN * LD];  // W slice, [i][o]
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = (warp >> 1) * 32, wn = (warp & 1) * 32;
    const int n0 = blockIdx.x * BM, i0 = blockIdx.y * BN;
    const int words = (O + 31) >> 5;
    float acc[2][4][4];
    zero_acc<PREC>(acc);
    auto fill_a = [&](int k0) {  // dz (N, O): row n, k = o contiguous
        load_kcontig<PREC>(As, N, n0, k0, O, tid, [&](int n, int o) {
            return operand_of_f32<PREC>(dz_tc<PREC, ACT, SRC>(da, s, mask, n, o, O, words, p0, p1));
        });
    };
    auto fill_b = [&](int k0) {  // W (I, O) read as W^T: row i, k = o contiguous
        load_kcontig<PREC>(Bs, I, i0, k0, O, tid, [&](int i, int o) { return operand_of<PREC>(w[(long long)i * O + o]); });
    };
    mainloop<PREC>(As, Bs, 0, O, fill_a, fill_b, acc);
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int nj = 0; nj < 4; ++nj)
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const int row = n0 + acc_row(wm, mi, r, lane), col = i0 + acc_col(wn, nj, r, lane);
                if (row < N && col < I) dx[(long long)row * I + col] = store_of<PREC>(acc[mi][nj][r]);
            }
}

// db over batch rows [kbeg, kend) for columns o0 .. o0 + 63: thread t sums column o0 + t % 64
// over the rows kbeg + t / 64, + 2, ... ascending; then the two classes are added, class 0 first.
template <int PREC, int ACT, int SRC>
__device__ __forceinline__ void db_block_tc(const typename Store<PREC>::type* __restrict__ da,
                                            const typename Store<PREC>::type* __restrict__ s,
                                            const unsigned* __restrict__ mask, float* __restrict__ db, int kbeg,
                                            int kend, int o0, int O, float p0, float p1, float* red) {
    const int tid = threadIdx.x, col = o0 + (tid & 63), half = tid >> 6;
    const int words = (O + 31) >> 5;
    float sum = 0.0f;
    if (col < O) {
        for (int k = kbeg + half; k < kend; k += 2) sum += dz_tc<PREC, ACT, SRC>(da, s, mask, k, col, O, words, p0, p1);
    }
    if (half == 1) red[tid & 63] = sum;
    __syncthreads();
    if (half == 0 && col < O) db[col] = sum + red[tid];
}

// dW (I, O) = R_g(x)^T @ R_g(dz) over batch rows [z*kchunk, min(N, (z+1)*kchunk)), z = blockIdx.z,
// written to dw + z*split_stride; db (those rows) to db + z*split_stride (as dense_dw_v2).
// Grid (ceil(I / 64) + 1, ceil(O / 64), S): the last column of blocks computes db alone.
template <int PREC, int ACT, int SRC>
__global__ void __launch_bounds__(tc::THREADS, 4) dense_dw_tc1(const typename Store<PREC>::type* __restrict__ x,
                                                               const typename Store<PREC>::type* __restrict__ da,
                                                               const typename Store<PREC>::type* __restrict__ s,
                                                               const unsigned* __restrict__ mask,
                                                               float* __restrict__ dw, float* __restrict__ db,
                                                               long long split_stride, int kchunk, int N, int I,
                                                               int O, float p0, float p1) {
    static_assert(SavedOk<ACT, SRC>::value, "activation / saved kind mismatch");
    using namespace tc;
    typedef typename Smem<PREC>::type S;
    constexpr int LD = Smem<PREC>::LD;
    __shared__ __align__(16) S As[BM * LD];  // x^T slice, [i][n]
    __shared__ __align__(16) S Bs[BN * LD];  // dz^T slice, [o][n]
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = (warp >> 1) * 32, wn = (warp & 1) * 32;
    const int o0 = blockIdx.y * BN;
    const int kbeg = blockIdx.z * kchunk;
    const int kend = min(N, kbeg + kchunk);
    if (blockIdx.x == gridDim.x - 1) {  // the same for the whole block
        db_block_tc<PREC, ACT, SRC>(da, s, mask, db + blockIdx.z * split_stride, kbeg, kend, o0, O, p0, p1,
                                    reinterpret_cast<float*>(As));
        return;
    }
    const int i0 = blockIdx.x * BM;
    const int words = (O + 31) >> 5;
    float acc[2][4][4];
    zero_acc<PREC>(acc);
    auto fill_a = [&](int k0) {  // x (N, I): k = batch row, columns i contiguous
        load_outer<PREC>(As, I, i0, k0, kend, tid, [&](int n, int i) { return operand_of<PREC>(x[(long long)n * I + i]); });
    };
    auto fill_b = [&](int k0) {  // dz (N, O): k = batch row, columns o contiguous
        load_outer<PREC>(Bs, O, o0, k0, kend, tid, [&](int n, int o) {
            return operand_of_f32<PREC>(dz_tc<PREC, ACT, SRC>(da, s, mask, n, o, O, words, p0, p1));
        });
    };
    mainloop<PREC>(As, Bs, kbeg, kend, fill_a, fill_b, acc);
    float* out = dw + blockIdx.z * split_stride;
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int nj = 0; nj < 4; ++nj)
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const int row = i0 + acc_row(wm, mi, r, lane), col = o0 + acc_col(wn, nj, r, lane);
                if (row < I && col < O) out[(long long)row * O + col] = acc[mi][nj][r];
            }
}

// out[i] = sum_{s = 0..S-1} ws[s*stride + i] for s ascending; out is dw for i < len_w, db after.
__global__ void __launch_bounds__(256) splitk_reduce_tc(const float* __restrict__ ws, int S, long long stride,
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
