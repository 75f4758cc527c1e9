// dense_forward.cu: forward pass of a dense layer, a = f(x @ W + b), float32.
//
// Computes
//   x (N, in), W (in, out), b (out,), all row-major  ->  a (N, out) = f(z),  z = x @ W + b,
//   z_nj = sum_i x_ni W_ij + b_j, summed in float32 for i ascending (one fmaf per term).
//   Saved for the backward pass, chosen by the SAVE template parameter (see activations.cuh):
//     SAVED_NONE  a only: inference, and training with identity / sigmoid / tanh (whose f'
//                 is 1 or a function of a, and a is written anyway)
//     SAVED_Z     also z (N, out): elu, gelu, gelu_tanh, silu, softplus, and relu / leaky_relu
//                 when asked for z
//     SAVED_MASK  also the bits z > 0 as uint32 (N, ceil(out / 32)), bit j % 32 of word j / 32:
//                 relu / leaky_relu, 32 times less memory than z
//   The CPU reference is gpubp/backends/numpy_ref.py: dense_forward.
//
// Fused, and why
//   The GEMM, the bias add, the activation and the saving of z / mask are one kernel: z never
//   goes to memory unless the backward pass needs it, so inference writes N*out floats and
//   reads x and W once per tile; the unfused form (GEMM, bias, activation: 3 kernels) writes and
//   re-reads z twice. The epilogue works on the accumulators in registers. The activation is a
//   template parameter (ACT, the id of gpubp.activations.TABLE), so each instantiation carries
//   only its own activation code; the Python loader instantiates them through name_expressions.
//
// Versions
//   v1  dense_forward_v1<ACT, SAVE>: simple shared-memory tiling. Block 32 x 8 threads, tile
//       32 x 32 of a, K slices of 32; each thread computes 4 outputs (rows ty + 8i, column tx).
//       4-byte loads, every access bounds checked. The mask word of 32 columns is one warp
//       ballot. Kept as the readable version and as a cross-check: it adds the same terms in the
//       same order as v2, so z is the same in both (the tests check a of identity bit for bit).
//   v2  dense_forward_v2<ACT, SAVE, VEC>: 128 x 128 tiles, 256 threads, an 8 x 8 register block
//       per thread, K slices of 8 in double-buffered shared memory filled by cp.async (sm_80+:
//       the next slice is in flight during the FMAs of this one, without passing through
//       registers), 16-byte copies and stores when VEC (in % 4 == 0, out % 4 == 0, 16-byte
//       aligned pointers; the launcher decides), bounds-checked 4-byte ones otherwise. The mask
//       is built from per-thread nibbles OR-ed across 8 lanes with warp shuffles. See
//       gemm_tile.cuh. Limits: a 128 x 128 block tile wastes work when N or out is far below
//       128 (N = 1: one useful row in 128), and K is not split, so a GEMV-like shape runs on
//       ceil(out / 128) blocks.
//
// Benchmark
//   gpubp kernels bench --shape N,in,out [--act relu] [--version 2] [--repeat 50]
//   checks a and dx on a sample of rows against a float64 reference first, then times inference
//   and training forward with CUDA events (warm-up, median of repeats) beside cupy.matmul
//   (cuBLAS) + bias; the floor printed beside each figure is 2*N*in*out FLOP / 67 TFLOP/s (H100
//   SXM FP32 on CUDA cores).
//
// Launch (gpubp/backends/cuda_fused.py: queue_forward)
//   v1: block (32, 8), grid (ceil(N / 32), ceil(out / 32)), 8.4 KB static shared memory.
//   v2: block 256, grid (ceil(N / 128), ceil(out / 128)), 20.5 KB static shared memory, at most
//       128 registers (__launch_bounds__(256, 2): two blocks per SM).
#include "activations.cuh"
#include "gemm_tile.cuh"

namespace gpubp {

// ------------------------------------------------------------------------------------------------
// v1: simple tiled
// ------------------------------------------------------------------------------------------------
template <int ACT, int SAVE>
__global__ void __launch_bounds__(256) dense_forward_v1(const float* __restrict__ x, const float* __restrict__ w,
                                                        const float* __restrict__ b, float* __restrict__ a,
                                                        float* __restrict__ z, unsigned* __restrict__ mask, int N,
                                                        int K, int M, float p0, float p1) {
    static_assert(SAVE == SAVED_NONE || SAVE == SAVED_Z || (SAVE == SAVED_MASK && (ACT == ACT_RELU || ACT == ACT_LEAKY_RELU)),
                  "forward saves nothing, z, or (relu / leaky_relu) the mask");
    constexpr int T = 32;
    __shared__ float xs[T][T + 1];  // xs[r][k] = x[n0 + r, k0 + k]
    __shared__ float ws[T][T + 1];  // ws[k][c] = W[k0 + k, m0 + c]
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int n0 = blockIdx.x * T, m0 = blockIdx.y * T;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    for (int k0 = 0; k0 < K; k0 += T) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int r = ty + 8 * i;
            xs[r][tx] = (n0 + r < N && k0 + tx < K) ? x[(long long)(n0 + r) * K + k0 + tx] : 0.0f;
            ws[r][tx] = (k0 + r < K && m0 + tx < M) ? w[(long long)(k0 + r) * M + m0 + tx] : 0.0f;
        }
        __syncthreads();
#pragma unroll 8
        for (int k = 0; k < T; ++k) {
            const float wk = ws[k][tx];
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[i] = fmaf(xs[ty + 8 * i][k], wk, acc[i]);
        }
        __syncthreads();
    }
    const int col = m0 + tx;
    const bool cok = col < M;
    const float bias = cok ? b[col] : 0.0f;
    const int words = (M + 31) >> 5;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int row = n0 + ty + 8 * i;
        const float zv = acc[i] + bias;
        const float av = act_f<ACT>(zv, p0, p1);
        if (row < N && cok) {
            a[(long long)row * M + col] = av;
            if constexpr (SAVE == SAVED_Z) z[(long long)row * M + col] = zv;
        }
        if constexpr (SAVE == SAVED_MASK) {
            // A warp is one row of the tile: 32 consecutive columns m0..m0+31 = one mask word.
            const unsigned word = __ballot_sync(0xffffffffu, cok && zv > 0.0f);
            if (tx == 0 && row < N) mask[(long long)row * words + (m0 >> 5)] = word;
        }
    }
}

// ------------------------------------------------------------------------------------------------
// v2: register-blocked, vectorised, double-buffered
// ------------------------------------------------------------------------------------------------
template <int ACT, int SAVE, bool VEC>
__global__ void __launch_bounds__(v2::THREADS, 2) dense_forward_v2(const float* __restrict__ x,
                                                                    const float* __restrict__ w,
                                                                    const float* __restrict__ b, float* __restrict__ a,
                                                                    float* __restrict__ z, unsigned* __restrict__ mask,
                                                                    int N, int K, int M, float p0, float p1) {
    static_assert(SAVE == SAVED_NONE || SAVE == SAVED_Z || (SAVE == SAVED_MASK && (ACT == ACT_RELU || ACT == ACT_LEAKY_RELU)),
                  "forward saves nothing, z, or (relu / leaky_relu) the mask");
    using namespace v2;
    __shared__ __align__(16) float As[2 * TILE];  // x slice, [k][row]
    __shared__ __align__(16) float Bs[2 * TILE];  // W slice, [k][col]
    __shared__ float4 xstage[THREADS];            // x in flight, one slot per thread
    const int tid = threadIdx.x, ty = tid >> 4, tx = tid & 15;
    const int n0 = blockIdx.x * BM, m0 = blockIdx.y * BN;

    float acc[8][8];
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;

    LoadKMajor<VEC> la(x, K, N, K, n0, tid, As, xstage);  // x (N, K): rows n, k contiguous
    LoadOuter<VEC> lb(w, M, M, K, m0, tid, Bs);           // W (K, M): k rows, columns contiguous
    mainloop(la, lb, As, Bs, 0, K, acc, ty, tx);

    // Epilogue: z = acc + b, a = f(z) in registers; write a, and z or the mask when SAVE asks.
    // Few live values besides the accumulators: per column group g the first column c0 + 64g
    // and how many of its 4 columns exist (left[g]); 64-bit row offsets are formed per row.
    const int c0 = m0 + tx * 4;
    const int left[2] = {M - c0, M - c0 - 64};
    // The bias goes into the accumulators one column group at a time (4 live registers).
#pragma unroll
    for (int g = 0; g < 2; ++g) {
        float bias[4];
        if constexpr (VEC) {
            float4 t = make_float4(0.f, 0.f, 0.f, 0.f);
            if (left[g] > 0) t = ld4(b + c0 + 64 * g);
            bias[0] = t.x; bias[1] = t.y; bias[2] = t.z; bias[3] = t.w;
        } else {
#pragma unroll
            for (int j = 0; j < 4; ++j) bias[j] = (j < left[g]) ? __ldg(b + c0 + 64 * g + j) : 0.0f;
        }
#pragma unroll
        for (int i = 0; i < 8; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[i][4 * g + j] += bias[j];
    }
    // Staged activation (STAGED: gelu). erff is two polynomials behind a branch; unrolled over 64
    // accumulators that is 64 branches beside 128 live registers, and ptxas of NVRTC 13.0 spilled
    // (the loader state of the main loop, 8-24 B). Instead, two rows at a time go to this thread's
    // own slots of the (now free) operand buffers, f runs over the 16 slots in a loop that is not
    // unrolled (one erff live at a time), and the stores read a back from the slots. A thread
    // touches only its own slots, so one barrier (all FMAs done with As / Bs) is enough.
    constexpr bool STAGED = ACT == ACT_GELU;
    if constexpr (STAGED) __syncthreads();
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        float* slots = ((i & 1) ? Bs : As) + tid;  // slot j (0..7) of row i: slots[j * THREADS]
        if constexpr (STAGED) {
            if ((i & 1) == 0) {  // rows i and i + 1: 16 values through the slots
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    As[j * THREADS + tid] = acc[i][j];
                    Bs[j * THREADS + tid] = acc[i + 1][j];
                }
#pragma unroll 1
                for (int q = 0; q < 16; ++q) {
                    float* s = ((q & 1) ? Bs : As) + (q >> 1) * THREADS + tid;
                    *s = act_f<ACT>(*s, p0, p1);
                }
            }
        }
        const int row = n0 + acc_row(i, ty);
        const bool rok = row < N;
        const long long roff = (long long)(rok ? row : 0) * M + c0;  // element (row, c0)
#pragma unroll
        for (int g = 0; g < 2; ++g) {
            float zv[4], av[4];
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                zv[j] = acc[i][4 * g + j];
                if constexpr (STAGED) {
                    av[j] = slots[(4 * g + j) * THREADS];
                } else {
                    av[j] = act_f<ACT>(zv[j], p0, p1);
                }
            }
            if (rok) {
                if constexpr (VEC) {
                    if (left[g] > 0) {
                        st4(a + roff + 64 * g, av[0], av[1], av[2], av[3]);
                        if constexpr (SAVE == SAVED_Z) st4(z + roff + 64 * g, zv[0], zv[1], zv[2], zv[3]);
                    }
                } else {
#pragma unroll
                    for (int j = 0; j < 4; ++j) {
                        if (j < left[g]) {
                            a[roff + 64 * g + j] = av[j];
                            if constexpr (SAVE == SAVED_Z) z[roff + 64 * g + j] = zv[j];
                        }
                    }
                }
            }
            if constexpr (SAVE == SAVED_MASK) {
                // This thread's 4 columns c..c+3 (c = c0 + 64g) are bits (c & 31)..+3 of word c / 32;
                // the 8 lanes tx & 7 = 0..7 (same ty, same tx / 8) hold the 32 columns of one word.
                const int c = c0 + 64 * g;
                unsigned nib = 0u;
#pragma unroll
                for (int j = 0; j < 4; ++j) nib |= (j < left[g] && zv[j] > 0.0f) ? (1u << j) : 0u;
                unsigned word = nib << (c & 31);
                word |= __shfl_xor_sync(0xffffffffu, word, 1);
                word |= __shfl_xor_sync(0xffffffffu, word, 2);
                word |= __shfl_xor_sync(0xffffffffu, word, 4);
                if ((tx & 7) == 0 && rok && left[g] > 0) mask[(long long)row * ((M + 31) >> 5) + (c >> 5)] = word;
            }
        }
    }
}

}  // namespace gpubp
