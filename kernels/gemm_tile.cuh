// gemm_tile.cuh: the shared machinery of the v2 dense kernels (dense_forward.cu, dense_backward.cu).
//
// One block computes a 128 x 128 tile C[m0:m0+128, n0:n0+128] of C = A @ B, A (M, K), B (K, N),
// all float32, accumulating in float32 registers:
//
//   256 threads as a 16 x 16 grid (ty = tid / 16, tx = tid % 16); each thread owns an 8 x 8
//   sub-tile: rows ty*4 + {0..3} and 64 + ty*4 + {0..3}, columns tx*4 + {0..3} and
//   64 + tx*4 + {0..3}. Splitting each thread's 8 rows / columns into two groups of 4, 64 apart,
//   lets a quarter warp read 32 consecutive floats of shared memory per float4 load (no bank
//   conflicts) and keeps each group of 4 columns contiguous for 16-byte global stores.
//
//   K is walked in slices of BK = 8. Each slice of A (128 x 8) and B (8 x 128) sits in shared
//   memory as [k][128 + 4] (k-major, both operands), two buffers each (double buffering): the
//   copies of slice t+1 are in flight while the block computes on slice t. One __syncthreads
//   per slice. The copies are cp.async (sm_80+): global -> shared without passing through
//   registers, so a thread's 128-register budget (__launch_bounds__(256, 2): 2 blocks, 16 warps
//   per SM) goes to the 64 accumulators and 12 fragments (A's 8 values of slice row k, then
//   B's 4 columns of one group at a time). (A register-staged prefetch, 8-12 more live
//   registers, made ptxas spill in the backward kernels, whose dz operand also needs the
//   temporaries of f': erff, expf; all 16 fragments at once made ptxas of NVRTC 13.0 or 13.5
//   spill a few loader registers in some dW kernels; loaders keep offsets formed once.)
//
//   Registers are checked, not hoped for: `gpubp kernels check` compiles every instantiation
//   for sm_80 and sm_90 and fails on any spill or stack frame; CI runs it under the oldest and
//   the newest NVRTC the project supports (13.0 and 13.5).
//
//   The accumulation order is fixed: acc = fmaf(a_k, b_k, acc) for k ascending, whatever the
//   launch; the zero padding of edge tiles adds exact zeros. The same inputs give the same bits.
//
// Operands are read through loader objects:
//   issue(k0, buf)   start the cp.async copies of slice k0..k0+BK-1 for buffer buf (0 or TILE)
//   finish(buf)      after cp.async.wait_all, before the barrier: turn what this thread copied
//                    into its final place in buffer buf (a transpose, or dz = da * f'(.)); a
//                    thread only touches its own elements here, so no barrier is needed between
//                    its copies and its finish.
// Kinds:
//   LoadOuter     element (k, c) at p[k*ld + c] (c contiguous): copied straight into [k][c]
//   LoadKMajor    element (r, k) at p[r*ld + k] (k contiguous): copied to a per-thread staging
//                 slot, transposed into [k][r] by finish
//   LoadDz        dz = da * f'(.) in either layout: raw da and z / a (or the mask word) are
//                 staged, finish forms dz (never a separate pass over memory)
// VEC = true: 16-byte copies and stores. The launcher picks it only when the two fast dimensions
// (in and out) are multiples of 4 and every pointer is 16-byte aligned; then a 4-float group is
// either wholly inside the matrix or wholly outside. VEC = false: 4-byte copies, each bounds
// checked, for any shape and alignment. Out-of-range elements are zero-filled by cp.async.
#pragma once

#include "activations.cuh"

namespace gpubp {
namespace v2 {

inline constexpr int BM = 128;
inline constexpr int BN = 128;
inline constexpr int BK = 8;
inline constexpr int THREADS = 256;
inline constexpr int LDS = 128 + 4;  // shared row stride in floats: 528 bytes keeps float4 alignment
inline constexpr int TILE = BK * LDS;  // floats in one shared buffer of one operand

// Row of accumulator i (0..7) / first column of column group g (0, 1) inside the block tile.
__device__ __forceinline__ int acc_row(int i, int ty) { return (i >> 2) * 64 + ty * 4 + (i & 3); }
__device__ __forceinline__ int acc_col(int g, int tx) { return g * 64 + tx * 4; }

__device__ __forceinline__ float4 ld4(const float* p) { return __ldg(reinterpret_cast<const float4*>(p)); }
__device__ __forceinline__ void st4(float* p, float a, float b, float c, float d) {
    *reinterpret_cast<float4*>(p) = make_float4(a, b, c, d);
}

// --- cp.async ------------------------------------------------------------------------------------
#if defined(GPUBP_HOST_EMULATION)
// CPU emulation for tests (host_emulation.h): the copy completes at once, one legal schedule of
// cp.async; zero-fill as the hardware does.
inline void cp_async16(void* dst, const void* src, bool ok) {
    if (ok) std::memcpy(dst, src, 16); else std::memset(dst, 0, 16);
}
inline void cp_async4(void* dst, const void* src, bool ok) {
    if (ok) std::memcpy(dst, src, 4); else std::memset(dst, 0, 4);
}
inline void cp_async_commit() {}
inline void cp_async_wait_all() {}
#else
__device__ __forceinline__ unsigned smem_u32(const void* p) { return static_cast<unsigned>(__cvta_generic_to_shared(p)); }
// 16 bytes global -> shared; zero-filled without a global read when !ok. src 16-byte aligned.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool ok) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(ok ? 16 : 0)
                 : "memory");
}
// 4 bytes global -> shared; zero-filled when !ok.
__device__ __forceinline__ void cp_async4(void* dst, const void* src, bool ok) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(ok ? 4 : 0)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// This thread's copies have landed and are visible to it (others see them after a barrier).
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }
#endif

// Copies the 4 floats p[0..3] to dst[0..3]: one 16-byte copy (VEC: all 4 in or all out), else
// four bounds-checked 4-byte copies; `ok`: the row exists, n: how many of the 4 exist. A source
// that does not exist is replaced by `base` (a valid address, never read).
template <bool VEC>
__device__ __forceinline__ void copy4(float* dst, const float* p, const float* base, bool ok, int n) {
    if constexpr (VEC) {
        const bool in = ok && n > 0;
        cp_async16(dst, in ? p : base, in);
    } else {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const bool in = ok && i < n;
            cp_async4(dst + i, in ? p + i : base, in);
        }
    }
}

// --- outer-major operand: (k, c) at p[k*ld + c]. Thread t copies k row t/32, columns (t%32)*4. ----
template <bool VEC>
struct LoadOuter {
    const float* p;     // the matrix (a valid address for the copies that read nothing)
    const float* pc;    // p + this thread's column: element (k, c) is pc[k * ld]
    float* dst;         // this thread's 4 floats in buffer 0: S + kl * LDS + cl
    int ld, kend, kl, ncols;

    __device__ __forceinline__ LoadOuter(const float* p_, int ld_, int cols, int kend_, int col0, int tid, float* S_)
        : p(p_), ld(ld_), kl(tid >> 5) {
        const int cl = (tid & 31) * 4;
        const int c = col0 + cl;
        ncols = cols - c;
        pc = p_ + (ncols > 0 ? c : 0);
        dst = S_ + kl * LDS + cl;
        kend = kend_;
    }
    __device__ __forceinline__ void issue(int k0, int buf) {
        const int k = k0 + kl;
        const bool ok = k < kend;
        copy4<VEC>(dst + buf, pc + (long long)(ok ? k : 0) * ld, p, ok, ncols);
    }
    __device__ __forceinline__ void finish(int) const {}
};

// --- K-major operand: (r, k) at p[r*ld + k]. Thread t copies row t/2, k offset (t%2)*4, to its
// staging slot; finish writes them to [k][r]. --------------------------------------------------------
template <bool VEC>
struct LoadKMajor {
    const float* p;     // the matrix (a valid address for the copies that read nothing)
    const float* prow;  // this thread's row at its k offset: element (r, k0 + kk) is prow[k0]
    float* T;           // where finish writes in buffer 0: S + kk * LDS + rl
    float4* stage;      // this thread's slot
    int kleft;          // kend - kk: how many of the row's k from k0 exist is kleft - k0
    bool rok;

    __device__ __forceinline__ LoadKMajor(const float* p_, int ld_, int rows, int kend_, int row0, int tid, float* S_,
                                          float4* stage_)
        : p(p_), stage(stage_ + tid) {
        const int rl = tid >> 1, kk = (tid & 1) * 4;
        int r = row0 + rl;
        rok = r < rows;
        if (!rok) r = 0;
        prow = p_ + ((long long)r * ld_ + kk);
        T = S_ + kk * LDS + rl;
        kleft = kend_ - kk;
    }
    __device__ __forceinline__ void issue(int k0, int) {
        copy4<VEC>(reinterpret_cast<float*>(stage), prow + k0, p, rok, kleft - k0);
    }
    __device__ __forceinline__ void finish(int buf) const {
        const float4 v = *stage;
        float* t = T + buf;
        t[0] = v.x;
        t[LDS] = v.y;
        t[2 * LDS] = v.z;
        t[3 * LDS] = v.w;
    }
};

// --- dz = da * f'(.) as an operand ------------------------------------------------------------------
// The 4 elements of thread t are dz[n, o..o+3] (o % 4 == 0, so their mask bits lie in one word):
//   KMAJOR (dx = dz @ W^T, dz is A: rows = batch, k = out index): n = row0 + t/2 (fixed),
//     o = k0 + (t%2)*4, written transposed to [(t%2)*4 + i][t/2]; the map of LoadKMajor.
//   outer  (dW = x^T @ dz, dz is B: k = batch row, columns = out index): n = k0 + t/32,
//     o = col0 + (t%32)*4 (fixed), written to [t/32][(t%32)*4 + i]; the map of LoadOuter.
// Raw da, z / a and the mask word are staged; finish forms dz. Zero-filled elements (outside the
// matrix) give dz = 0 for every activation with finite parameters, so edge tiles add zeros.

// Per-thread staging of the dz loaders: 4 da, 4 z / a, 1 mask word (9 KB per block).
struct DzStage {
    float4 d[THREADS];
    float4 s[THREADS];
    unsigned m[THREADS];
};

template <int ACT, int SRC, bool VEC, bool KMAJOR>
struct LoadDz {
    // The state is kept small (offsets formed once, per-slice work an add): the dW kernel's main
    // loop holds 64 accumulators, 16-32 fragments and two loaders in 128 registers, and ptxas
    // of NVRTC 13.0 spilled loader state there when it was kept as (n, o, O, words, tid, ...).
    const float* da;  // the matrices: valid addresses for the copies that read nothing
    const float* sv;
    const unsigned* mask;
    float* S;
    DzStage* st;
    long long e0;  // offset of this thread's element at k0 = 0: KMAJOR n * O + kk, else kl * O + o
    int w0;        // offset of its mask word at k0 = 0: KMAJOR n * words, else kl * words + o / 32
                   // (32-bit: the launcher refuses masks of 2^31 words or more)
    int O, words, lim, left, tid, shift;  // slice k0 exists while k0 < lim (lim < 0: never)
    float p0, p1;

    // KMAJOR: rows = N, row0 = the block's first batch row; else rows = the end of the block's
    // batch chunk, row0 = the block's first out column.
    __device__ __forceinline__ LoadDz(const float* da_, const float* sv_, const unsigned* mask_, int O_, int rows,
                                      int row0, int tid_, float p0_, float p1_, float* S_, DzStage* st_)
        : da(da_), sv(sv_), mask(mask_), S(S_), st(st_), O(O_), words((O_ + 31) >> 5), tid(tid_), p0(p0_), p1(p1_) {
        if constexpr (KMAJOR) {
            const int kk = (tid & 1) * 4;
            int n = row0 + (tid >> 1);
            const bool row_ok = n < rows;
            if (!row_ok) n = 0;
            e0 = (long long)n * O + kk;
            w0 = n * words;
            lim = row_ok ? O - kk : -1;  // then lim - k0 of the slice's 4 columns exist
            left = 0;
            shift = 0;
        } else {
            const int kl = tid >> 5;
            int o = row0 + (tid & 31) * 4;
            const bool col_ok = o < O;
            if (!col_ok) o = 0;
            e0 = (long long)kl * O + o;
            w0 = kl * words + (o >> 5);
            lim = col_ok ? rows - kl : -1;
            left = O - o;
            shift = o & 31;
        }
    }
    __device__ __forceinline__ void issue(int k0, int) {
        const bool ok = k0 < lim;
        long long e;
        int w, n4;
        if constexpr (KMAJOR) {
            e = e0 + k0;
            w = w0 + ((k0 + (tid & 1) * 4) >> 5);
            n4 = lim - k0;
            shift = (k0 + (tid & 1) * 4) & 31;  // read by the finish of this slice (issue t+1 comes after finish t)
        } else {
            e = e0 + (long long)k0 * O;
            w = w0 + k0 * words;
            n4 = left;
        }
        copy4<VEC>(reinterpret_cast<float*>(&st->d[tid]), ok ? da + e : da, da, ok, n4);
        if constexpr (SRC == SAVED_Z || SRC == SAVED_A) copy4<VEC>(reinterpret_cast<float*>(&st->s[tid]), ok ? sv + e : sv, sv, ok, n4);
        if constexpr (SRC == SAVED_MASK) cp_async4(&st->m[tid], ok ? mask + w : mask, ok);
    }
    __device__ __forceinline__ void finish(int buf) const {
        const float4 d4 = st->d[tid];
        const float d[4] = {d4.x, d4.y, d4.z, d4.w};
        float s[4] = {0.f, 0.f, 0.f, 0.f};
        if constexpr (SRC == SAVED_Z || SRC == SAVED_A) {
            const float4 s4 = st->s[tid];
            s[0] = s4.x; s[1] = s4.y; s[2] = s4.z; s[3] = s4.w;
        }
        unsigned bits = 0u;
        if constexpr (SRC == SAVED_MASK) bits = st->m[tid] >> shift;
        float dz[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            if constexpr (SRC == SAVED_MASK) {
                dz[i] = act_dz_mask<ACT>(d[i], (bits >> i) & 1u, p0);
            } else {
                dz[i] = act_dz<ACT, SRC>(d[i], s[i], p0, p1);
            }
        }
        if constexpr (KMAJOR) {
            float* T = S + buf + (tid & 1) * 4 * LDS + (tid >> 1);
            T[0] = dz[0];
            T[LDS] = dz[1];
            T[2 * LDS] = dz[2];
            T[3 * LDS] = dz[3];
        } else {
            st4(S + buf + (tid >> 5) * LDS + (tid & 31) * 4, dz[0], dz[1], dz[2], dz[3]);
        }
    }
};

// --- the main loop: acc += A[m0:, kbeg:kend] @ B[kbeg:kend, n0:] --------------------------------
// As, Bs: the 2 * TILE shared floats the loaders fill. ntiles is the same for every thread.
// Per slice t (buffer cur = t % 2):
//   wait for own copies | finish own elements into cur | barrier |
//   issue the copies of slice t+1 into the other buffer | FMAs on cur
// The other buffer was last read by the FMAs of slice t-1, which every thread finished before
// this slice's barrier; a staging slot is read (finish) before the barrier and refilled after it
// by the same thread.
template <class LA, class LB>
__device__ __forceinline__ void mainloop(LA& la, LB& lb, const float* As, const float* Bs, int kbeg, int kend,
                                         float (&acc)[8][8], int ty, int tx) {
    const int ntiles = (kend - kbeg + BK - 1) / BK;
    if (ntiles <= 0) return;
    la.issue(kbeg, 0);
    lb.issue(kbeg, 0);
    cp_async_commit();
    for (int t = 0; t < ntiles; ++t) {
        const int cur = (t & 1) * TILE;
        cp_async_wait_all();
        la.finish(cur);
        lb.finish(cur);
        __syncthreads();
        if (t + 1 < ntiles) {
            la.issue(kbeg + (t + 1) * BK, TILE - cur);
            lb.issue(kbeg + (t + 1) * BK, TILE - cur);
            cp_async_commit();
        }
        const float* A = As + cur;
        const float* B = Bs + cur;
#pragma unroll
        for (int k = 0; k < BK; ++k) {
            const float4 a0 = *reinterpret_cast<const float4*>(A + k * LDS + ty * 4);
            const float4 a1 = *reinterpret_cast<const float4*>(A + k * LDS + 64 + ty * 4);
            const float av[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
            // one column group of B at a time: 12 fragment registers, not 16
#pragma unroll
            for (int g = 0; g < 2; ++g) {
                const float4 b = *reinterpret_cast<const float4*>(B + k * LDS + 64 * g + tx * 4);
                const float bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
                for (int i = 0; i < 8; ++i) {
#pragma unroll
                    for (int j = 0; j < 4; ++j) acc[i][4 * g + j] = fmaf(av[i], bv[j], acc[i][4 * g + j]);
                }
            }
        }
    }
}

// Plain store of the 8 x 8 accumulators into C (rows x cols, row stride ld) at (row0, col0).
template <bool VEC>
__device__ __forceinline__ void store_acc(float* C, long long ld, int rows, int cols, int row0, int col0,
                                          const float (&acc)[8][8], int ty, int tx) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const int r = row0 + acc_row(i, ty);
        if (r >= rows) continue;
        float* crow = C + (long long)r * ld;
#pragma unroll
        for (int g = 0; g < 2; ++g) {
            const int c = col0 + acc_col(g, tx);
            if constexpr (VEC) {
                if (c < cols) st4(crow + c, acc[i][4 * g], acc[i][4 * g + 1], acc[i][4 * g + 2], acc[i][4 * g + 3]);
            } else {
#pragma unroll
                for (int j = 0; j < 4; ++j)
                    if (c + j < cols) crow[c + j] = acc[i][4 * g + j];
            }
        }
    }
}

}  // namespace v2
}  // namespace gpubp
