// mma.cuh: the tensor-core machinery of the tc1 dense kernels (dense_forward_tc.cu, dense_backward_tc.cu).
//
// Precisions (template parameter PREC; gpubp.backends.cuda_fused.table: PREC_*):
//   PREC_TF32  operands float32 in memory, rounded to TF32 by cvt.rna.tf32.f32 on the way into
//              shared memory; outputs (a, z, dx) float32. mma.sync.m16n8k8 .tf32.
//   PREC_BF16  operands and outputs bfloat16 in memory (16-bit storage); mma.sync.m16n8k16 .bf16.
//   PREC_FP16  operands and outputs float16 in memory; mma.sync.m16n8k16 .f16.
// Accumulators, bias, activation, dz, dW and db are float32 in every precision.
//
// 16-bit values are carried as their raw bits (unsigned short, `Half16`): the same 2-byte layout
// as __nv_bfloat16 / __half, without cuda_bf16.h / cuda_fp16.h, which an NVRTC install need not
// provide; conversions are single PTX instructions (below), each emulated bit for bit on the host.
//
// Rounding (what the hardware does, and what host_emulation.h does the same way):
//   to bf16 / fp16   cvt.rn: round to nearest, ties to even (the precision spec's R_g / R_s)
//   to tf32          cvt.rna: round to nearest, ties AWAY from zero. The spec's round_to(.,
//                    "tf32") is ties-to-even: the two differ only when the 13 dropped bits are
//                    exactly 1000...0, and then by one TF32 ulp. The tests' oracle rounds the
//                    way the kernel does (and checks that the two differ only on such ties).
//   from bf16/fp16   exact.
//
// Why mma.sync (and ldmatrix), not WMMA: the epilogues (bias per column, activation, the relu
// mask's bit per column, bounds per element) must know which output element each accumulator
// register holds. WMMA's fragment layout is unspecified (opaque, may differ between
// architectures), so WMMA would need an extra round trip through shared memory (store_matrix_sync)
// before every epilogue, and the host emulation could not follow what one lane holds. mma.sync's
// per-lane layouts are fixed by the PTX ISA ("Matrix Fragments for mma.m16n8k16 / m16n8k8"):
// with g = lane / 4 and t = lane % 4,
//   m16n8k16 (.bf16 / .f16): A (16 x 16, row): a0 = A[g][2t, 2t+1], a1 = A[g+8][2t, 2t+1],
//     a2 = A[g][2t+8, 2t+9], a3 = A[g+8][2t+8, 2t+9] (two 16-bit values per 32-bit register, the
//     lower index in the low half); B (16 x 8, col): b0 = B[2t, 2t+1][g], b1 = B[2t+8, 2t+9][g];
//   m16n8k8 (.tf32): a0 = A[g][t], a1 = A[g+8][t], a2 = A[g][t+4], a3 = A[g+8][t+4];
//     b0 = B[t][g], b1 = B[t+4][g];
//   C / D (16 x 8, f32) for both: c0, c1 = C[g][2t, 2t+1], c2, c3 = C[g+8][2t, 2t+1].
// ldmatrix.m8n8.x4.b16 loads four 8 x 8 16-bit matrices: lane 8i + r gives the address of row r
// of matrix i, and register i of lane l receives row l / 4, elements 2(l % 4), 2(l % 4) + 1 of
// matrix i: exactly the A / B fragment pieces above when both operands sit in shared memory
// k-contiguous ([m][k] and [n][k]), so no .trans is needed. TF32 (32-bit elements) fragments are
// read with plain 32-bit shared loads at the same coordinates.
//
// sm_80+ (cvt.rn.bf16.f32, cvt.rna.tf32.f32, mma .bf16 / .tf32). wgmma (sm_90a) is a later version.
#pragma once

namespace gpubp {

enum Precision : int { PREC_TF32 = 0, PREC_BF16 = 1, PREC_FP16 = 2 };

typedef unsigned short Half16;  // raw bits of a bfloat16 or a float16

// Storage type of x, W, a, z, da, saved values and dx in memory, per precision.
template <int PREC>
struct Store {
    typedef Half16 type;
};
template <>
struct Store<PREC_TF32> {
    typedef float type;
};

#if defined(GPUBP_HOST_EMULATION)
// host_emulation.h provides: emu_bf16_to_f32, emu_f16_to_f32, emu_f32_to_bf16_rn, emu_f32_to_f16_rn,
// emu_f32_to_tf32_rna, emu_ldmatrix_x4, emu_mma_16816 (bf16 / f16), emu_mma_1688_tf32.
__device__ __forceinline__ float bf16_to_f32(Half16 h) { return emu_bf16_to_f32(h); }
__device__ __forceinline__ float f16_to_f32(Half16 h) { return emu_f16_to_f32(h); }
__device__ __forceinline__ Half16 f32_to_bf16(float f) { return emu_f32_to_bf16_rn(f); }
__device__ __forceinline__ Half16 f32_to_f16(float f) { return emu_f32_to_f16_rn(f); }
__device__ __forceinline__ unsigned f32_to_tf32(float f) { return emu_f32_to_tf32_rna(f); }
__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* row) { emu_ldmatrix_x4(r, row); }
template <int PREC>
__device__ __forceinline__ void mma_tile(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    if constexpr (PREC == PREC_TF32) {
        emu_mma_1688_tf32(d, a, b);
    } else {
        emu_mma_16816(d, a, b, PREC == PREC_BF16);
    }
}
#else
__device__ __forceinline__ float bf16_to_f32(Half16 h) { return __uint_as_float(static_cast<unsigned>(h) << 16); }
__device__ __forceinline__ float f16_to_f32(Half16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ Half16 f32_to_bf16(float f) {
    Half16 h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
__device__ __forceinline__ Half16 f32_to_f16(float f) {
    Half16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
__device__ __forceinline__ unsigned f32_to_tf32(float f) {
    unsigned r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(f));
    return r;
}
// Four 8 x 8 b16 matrices from shared memory; `row`: this lane's row address (16-byte aligned).
__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* row) {
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(row));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
}
// d += A @ B for one 16 x 8 tile: m16n8k16 (bf16 / f16) or m16n8k8 (tf32), f32 accumulators.
template <int PREC>
__device__ __forceinline__ void mma_tile(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    if constexpr (PREC == PREC_TF32) {
        asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                     "{%8, %9}, {%0, %1, %2, %3};\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    } else if constexpr (PREC == PREC_BF16) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                     "{%8, %9}, {%0, %1, %2, %3};\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    } else {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                     "{%8, %9}, {%0, %1, %2, %3};\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
}
#endif

namespace tc {

// Block tile 64 x 64, 4 warps (2 x 2), warp tile 32 x 32 = 2 (m16) x 4 (n8) mma tiles, 32 float
// accumulators per thread. K slices of BK elements in shared memory, both operands k-contiguous.
inline constexpr int BM = 64;
inline constexpr int BN = 64;
inline constexpr int BK = 32;
inline constexpr int THREADS = 128;

// Shared element type (16-bit bits, or the tf32 pattern in 32 bits) and the padded row stride:
// 16-bit rows 32 + 8 elements (80 B: 16-byte aligned rows for ldmatrix, and the 8 rows of one
// 8 x 8 matrix fall on distinct bank groups); tf32 rows 32 + 4 words (144 B).
template <int PREC>
struct Smem {
    typedef Half16 type;
    static constexpr int LD = BK + 8;
};
template <>
struct Smem<PREC_TF32> {
    typedef unsigned type;
    static constexpr int LD = BK + 4;
};

// Storage value -> float32 (exact).
template <int PREC>
__device__ __forceinline__ float load_f32(const typename Store<PREC>::type v) {
    if constexpr (PREC == PREC_TF32) {
        return v;
    } else if constexpr (PREC == PREC_BF16) {
        return bf16_to_f32(v);
    } else {
        return f16_to_f32(v);
    }
}
// float32 -> storage (R_s: bf16 / fp16 round to nearest even; tf32 stores float32 unchanged).
template <int PREC>
__device__ __forceinline__ typename Store<PREC>::type store_of(float f) {
    if constexpr (PREC == PREC_TF32) {
        return f;
    } else if constexpr (PREC == PREC_BF16) {
        return f32_to_bf16(f);
    } else {
        return f32_to_f16(f);
    }
}
// A storage value as a shared-memory GEMM operand (16-bit: as is; tf32: cvt.rna).
template <int PREC>
__device__ __forceinline__ typename Smem<PREC>::type operand_of(const typename Store<PREC>::type v) {
    if constexpr (PREC == PREC_TF32) {
        return f32_to_tf32(v);
    } else {
        return v;
    }
}
// A float32 value (dz) as a shared-memory GEMM operand: R_g (bf16 / fp16 RNE, tf32 cvt.rna).
template <int PREC>
__device__ __forceinline__ typename Smem<PREC>::type operand_of_f32(float f) {
    if constexpr (PREC == PREC_TF32) {
        return f32_to_tf32(f);
    } else if constexpr (PREC == PREC_BF16) {
        return f32_to_bf16(f);
    } else {
        return f32_to_f16(f);
    }
}

// acc[mi][nj][r] += As[wm + ., k] @ Bs[wn + ., k]^T over one shared K slice (BK elements).
// As: [BM][LD] (row m, k contiguous); Bs: [BN][LD] (column n, k contiguous). warp tile at
// (wm, wn) inside the block tile; lane = threadIdx.x % 32.
template <int PREC>
__device__ __forceinline__ void warp_mma_slice(const typename Smem<PREC>::type* As,
                                               const typename Smem<PREC>::type* Bs, int wm, int wn, int lane,
                                               float (&acc)[2][4][4]) {
    constexpr int LD = Smem<PREC>::LD;
    if constexpr (PREC == PREC_TF32) {
        const int g = lane >> 2, t = lane & 3;
#pragma unroll
        for (int kk = 0; kk < BK; kk += 8) {
            unsigned a[2][4], b[4][2];
#pragma unroll
            for (int mi = 0; mi < 2; ++mi) {
                const unsigned* p = As + (wm + 16 * mi + g) * LD + kk + t;
                a[mi][0] = p[0];
                a[mi][1] = p[8 * LD];
                a[mi][2] = p[4];
                a[mi][3] = p[8 * LD + 4];
            }
#pragma unroll
            for (int nj = 0; nj < 4; ++nj) {
                const unsigned* p = Bs + (wn + 8 * nj + g) * LD + kk + t;
                b[nj][0] = p[0];
                b[nj][1] = p[4];
            }
#pragma unroll
            for (int mi = 0; mi < 2; ++mi)
#pragma unroll
                for (int nj = 0; nj < 4; ++nj) mma_tile<PREC>(acc[mi][nj], a[mi], b[nj]);
        }
    } else {
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
            unsigned a[2][4], b[4][2];
#pragma unroll
            for (int mi = 0; mi < 2; ++mi)  // matrices: rows 0-7 / 8-15 x k 0-7 / 8-15 -> a0..a3
                ldmatrix_x4(a[mi], As + (wm + 16 * mi + (lane & 15)) * LD + kk + (lane >> 4) * 8);
#pragma unroll
            for (int np = 0; np < 2; ++np) {  // two n8 tiles: (n 0-7, k 0-7 / 8-15), (n 8-15, ...)
                unsigned r[4];
                ldmatrix_x4(r, Bs + (wn + 16 * np + (lane & 7) + ((lane >> 4) << 3)) * LD + kk + ((lane >> 3) & 1) * 8);
                b[2 * np][0] = r[0];
                b[2 * np][1] = r[1];
                b[2 * np + 1][0] = r[2];
                b[2 * np + 1][1] = r[3];
            }
#pragma unroll
            for (int mi = 0; mi < 2; ++mi)
#pragma unroll
                for (int nj = 0; nj < 4; ++nj) mma_tile<PREC>(acc[mi][nj], a[mi], b[nj]);
        }
    }
}

// Row / column (inside the block tile) of accumulator register r of tile (mi, nj), lane l.
__device__ __forceinline__ int acc_row(int wm, int mi, int r, int lane) { return wm + 16 * mi + (lane >> 2) + 8 * (r >> 1); }
__device__ __forceinline__ int acc_col(int wn, int nj, int r, int lane) { return wn + 8 * nj + 2 * (lane & 3) + (r & 1); }

}  // namespace tc
}  // namespace gpubp
