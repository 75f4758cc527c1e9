// dense_forward_tc.cu: forward pass of a dense layer on tensor cores, TF32 or BF16 / FP16 mixed precision.
//
// Computes (precision P = PREC: tf32, bf16 or fp16; R_g rounds to P's GEMM input type, R_s to
// its storage type: R_s = R_g for bf16 / fp16, the identity for tf32)
//   x (N, in), W (in, out) in P's storage type (float32 for tf32, 16-bit bits for bf16 / fp16),
//   b (out,) float32, all row-major  ->
//   z = R_g(x) @ R_g(W) + b   accumulated in float32 (mma.sync, fp32 accumulators)
//   a = f(z) in float32, written as R_s(a) (N, out)
//   Saved for the backward pass (SAVE, as in dense_forward.cu): nothing, R_s(z) (N, out), or the
//   relu / leaky_relu mask bits z > 0 (uint32 (N, ceil(out / 32)), bit j % 32 of word j / 32).
//   For tf32, R_g is cvt.rna.tf32.f32 (ties away from zero; mma.cuh says how that differs from
//   the spec's ties-to-even). The precision spec is gpubp/precision.py.
//
// Fused, and why
//   As in dense_forward.cu: the GEMM, the bias, the activation, the storage rounding and the
//   saving of z / the mask are one kernel; z stays in the fp32 accumulators. The epilogue knows
//   which element each accumulator register holds from mma.sync's documented fragment layout
//   (mma.cuh: why mma.sync and ldmatrix rather than WMMA, whose layout is opaque).
//
// Versions
//   tc1  dense_forward_tc1<PREC, ACT, SAVE>: block tile 64 x 64, 4 warps of 32 x 32 (2 x 4
//        mma tiles: m16n8k16 for bf16 / fp16 through ldmatrix.x4, m16n8k8 for tf32 through
//        32-bit shared loads), K slices of 32 staged through registers (conversion on the way),
//        bounds-checked element loads and stores (any shape, any alignment). The mask word of
//        a warp's 32 columns is OR-ed over the 4 lanes of a row group with warp shuffles.
//        Limits: loads are not overlapped with the mma (no cp.async / double buffering yet) and
//        are 2- or 4-byte; no wgmma on sm_90 yet. See tc_tile.cuh.
//
// Benchmark
//   Not measured yet (no GPU run so far). To be timed like dense_forward.cu's v2 (gpubp kernels
//   bench) beside cuBLAS in the same precision (cupy.matmul on float16 / TF32 with
//   CUPY_TF32=1); the floor is 2*N*in*out FLOP at the GPU's dense TF32 / BF16 peak.
//
// Launch (gpubp/backends/cuda_fused/plans_tc.py: queue_forward_tc)
//   block 128, grid (ceil(N / 64), ceil(out / 64)); static shared memory 10 KB (bf16 / fp16) or
//   18 KB (tf32); __launch_bounds__(128, 4). sm_80 or newer.
#include "activations.cuh"
#include "mma.cuh"
#include "tc_tile.cuh"

namespace gpubp {

template <int PREC, int ACT, int SAVE>
__global__ void __launch_bounds__(tc::THREADS, 4) dense_forward_tc1(const typename Store<PREC>::type* __restrict__ x,
                                                                    const typename Store<PREC>::type* __restrict__ w,
                                                                    const float* __restrict__ b,
                                                                    typename Store<PREC>::type* __restrict__ a,
                                                                    typename Store<PREC>::type* __restrict__ z,
                                                                    unsigned* __restrict__ mask, int N, int K, int M,
                                                                    float p0, float p1) {
    static_assert(SAVE == SAVED_NONE || SAVE == SAVED_Z || (SAVE == SAVED_MASK && (ACT == ACT_RELU || ACT == ACT_LEAKY_RELU)),
                  "forward saves nothing, z, or (relu / leaky_relu) the mask");
    using namespace tc;
    typedef typename Smem<PREC>::type S;
    constexpr int LD = Smem<PREC>::LD;
    __shared__ __align__(16) S As[BM * LD];  // x slice, [row][k]
    __shared__ __align__(16) S Bs[BN * LD];  // W slice, [col][k]
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = (warp >> 1) * 32, wn = (warp & 1) * 32;
    const int n0 = blockIdx.x * BM, m0 = blockIdx.y * BN;

    float acc[2][4][4];
    zero_acc<PREC>(acc);
    auto fill_a = [&](int k0) {  // x (N, K): row n, k contiguous
        load_kcontig<PREC>(As, N, n0, k0, K, tid, [&](int n, int k) { return operand_of<PREC>(x[(long long)n * K + k]); });
    };
    auto fill_b = [&](int k0) {  // W (K, M): k rows, columns contiguous
        load_outer<PREC>(Bs, M, m0, k0, K, tid, [&](int k, int c) { return operand_of<PREC>(w[(long long)k * M + c]); });
    };
    mainloop<PREC>(As, Bs, 0, K, fill_a, fill_b, acc);

    // Epilogue: register r of tile (mi, nj) is element (acc_row, acc_col) of the block tile.
    const int words = (M + 31) >> 5;
#pragma unroll
    for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {  // row group: registers 2h, 2h + 1
            const int row = n0 + acc_row(wm, mi, 2 * h, lane);
            const bool rok = row < N;
            unsigned bits = 0u;
#pragma unroll
            for (int nj = 0; nj < 4; ++nj) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int col = m0 + acc_col(wn, nj, e, lane);
                    const bool cok = col < M;
                    const float zv = acc[mi][nj][2 * h + e] + (cok ? __ldg(b + col) : 0.0f);
                    if (rok && cok) {
                        const long long off = (long long)row * M + col;
                        a[off] = store_of<PREC>(act_f<ACT>(zv, p0, p1));
                        if constexpr (SAVE == SAVED_Z) z[off] = store_of<PREC>(zv);
                    }
                    if constexpr (SAVE == SAVED_MASK) bits |= (cok && zv > 0.0f) ? (1u << (8 * nj + 2 * (lane & 3) + e)) : 0u;
                }
            }
            if constexpr (SAVE == SAVED_MASK) {
                // The warp's 32 columns m0 + wn .. + 31 are one mask word (m0 + wn is a multiple
                // of 32); the 4 lanes of a row group (lane % 4) hold its bits.
                bits |= __shfl_xor_sync(0xffffffffu, bits, 1);
                bits |= __shfl_xor_sync(0xffffffffu, bits, 2);
                if ((lane & 3) == 0 && rok && m0 + wn < M) mask[(long long)row * words + ((m0 + wn) >> 5)] = bits;
            }
        }
    }
}

}  // namespace gpubp
