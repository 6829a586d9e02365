// mma.cuh — warp-level bf16 tensor-core products on register fragments: the PTX instructions mma.sync
// (m16n8k16, bf16 in, fp32 accumulate) and ldmatrix, the tile products the tensor-core attention
// (kernels/attention.cuh) and the SSD's tensor-core kernels (kernels/ssd.cuh) are written with, and the cp.async
// copies that stream the attention's tiles into shared memory. Unlike nvcuda::wmma, whose fragment layout is
// opaque, the layouts here are the documented ones, so a kernel can work on its accumulators in registers (a
// softmax, or the SSD's decay mask, row by row) and turn them into the next product's operand without a round trip
// through shared memory.
//
// Fragment layouts of mma.m16n8k16 (PTX ISA, "Matrix Fragments for mma.m16n8k16"), lane = 0..31, g = lane / 4,
// c = 2·(lane % 4):
//   accumulator C (16 × 8, fp32, 4 registers): c0, c1 at row g, columns c, c+1; c2, c3 at row g+8, same columns
//   A (16 × 16, bf16, 4 registers of 2):       a0 row g, k c..c+1;  a1 row g+8, k c..c+1;
//                                              a2 row g, k c+8..c+9; a3 row g+8, k c+8..c+9
//   B (16 × 8, bf16, 2 registers of 2):        b0 k c..c+1, column g;  b1 k c+8..c+9, column g
// So two neighbouring accumulator tiles (16 × 16) hold exactly an A fragment's elements: to_a below.
// ldmatrix.x4 loads four 8 × 8 bf16 matrices from shared memory, lanes 8m .. 8m+7 giving the row addresses of
// matrix m; lane l receives row l / 4, elements c, c+1 of each (or, with .trans, column l / 4, rows c, c+1).
//
// Shared-memory tiles are row-major bf16 with a row stride of (width + 8) elements: 16 bytes of padding, so the
// 8 rows an ldmatrix reads start in 8 different 16-byte bank groups (no conflicts), and every row start stays
// 16-byte aligned, as ldmatrix needs.
#pragma once
#include <cstdint>          // uint32_t
#include <cuda_bf16.h>      // __nv_bfloat16, __floats2bfloat162_rn

namespace hl::gpu::mma {

using bf16 = __nv_bfloat16;

__device__ inline uint32_t smem_addr(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }

// Four 8 × 8 matrices; `p` is this lane's row address (see the header).
__device__ inline void ldsm_x4(uint32_t (&r)[4], const bf16* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}
__device__ inline void ldsm_x4_trans(uint32_t (&r)[4], const bf16* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}

// c (16 × 8) += a (16 × 16) · b (16 × 8)
__device__ inline void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats rounded to bf16 in one register, the first in the low half (the lower column index).
__device__ inline uint32_t pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}
template <int N>
__device__ inline void zero(float (&acc)[N][4]) {
#pragma unroll
    for (int n = 0; n < N; n++) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
}

// A warp's 16 rows (K wide, row-major in shared memory, row stride lda) as K/16 A fragments: loaded once, a row
// block that multiplies many tiles (a block's own queries or keys) stays in registers.
template <int K>
__device__ inline void load_a(uint32_t (&a)[K / 16][4], const bf16* A, int lda) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int kk = 0; kk < K / 16; kk++)  // matrices: rows 0-7 | 8-15 at k 0-7, then the same at k 8-15
        ldsm_x4(a[kk], A + (lane % 16) * lda + 16 * kk + (lane / 16) * 8);
}

// acc (16 × N) += A (16 × K) · Bᵀ, with A as fragments (load_a) and B's N rows (each K wide) row-major in shared
// memory (row stride ldb): acc[n] is the accumulator tile of columns 8n .. 8n+7. K, N multiples of 16.
template <int K, int N>
__device__ inline void tile_abt(float (&acc)[N / 8][4], const uint32_t (&a)[K / 16][4], const bf16* B, int ldb) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int kk = 0; kk < K / 16; kk++) {
#pragma unroll
        for (int n = 0; n < N; n += 16) {
            uint32_t b[4];  // matrices: B rows n..n+7 at k 0-7 | k 8-15, then rows n+8..n+15 at k 0-7 | 8-15
            ldsm_x4(b, B + (n + lane % 8 + (lane / 16) * 8) * ldb + 16 * kk + ((lane / 8) % 2) * 8);
            mma_bf16(acc[n / 8], a[kk], b[0], b[1]);
            mma_bf16(acc[n / 8 + 1], a[kk], b[2], b[3]);
        }
    }
}

// The same with A's 16 rows read from shared memory (row stride lda) one k step at a time: fewer live registers
// than holding all of A's fragments.
template <int K, int N>
__device__ inline void tile_abt(float (&acc)[N / 8][4], const bf16* A, int lda, const bf16* B, int ldb) {
#pragma unroll
    for (int kk = 0; kk < K; kk += 16) {
        uint32_t a[1][4];
        load_a<16>(a, A + kk, lda);
        tile_abt<16, N>(acc, a, B + kk, ldb);
    }
}

// acc (16 × N) += P (16 × K) · B, with P as A fragments in registers (p[kk] covers columns 16kk .. 16kk+15) and B
// (K × N) row-major in shared memory (row stride ldb), read transposed by ldmatrix.trans.
template <int K, int N>
__device__ inline void tile_ab(float (&acc)[N / 8][4], const uint32_t (&p)[K / 16][4], const bf16* B, int ldb) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int kk = 0; kk < K / 16; kk++) {
#pragma unroll
        for (int n = 0; n < N; n += 16) {
            uint32_t b[4];  // matrices: B rows 0-7 | 8-15 of this k step at columns n..n+7, then at n+8..n+15
            ldsm_x4_trans(b, B + (16 * kk + lane % 16) * ldb + n + (lane / 16) * 8);
            mma_bf16(acc[n / 8], p[kk], b[0], b[1]);
            mma_bf16(acc[n / 8 + 1], p[kk], b[2], b[3]);
        }
    }
}

// The same with A's 16 rows (K wide) read from shared memory (row stride lda) one k step at a time.
template <int K, int N>
__device__ inline void tile_ab(float (&acc)[N / 8][4], const bf16* A, int lda, const bf16* B, int ldb) {
#pragma unroll
    for (int kk = 0; kk < K; kk += 16) {
        uint32_t a[1][4];
        load_a<16>(a, A + kk, lda);
        tile_ab<16, N>(acc, a, B + kk * ldb, ldb);
    }
}

// The accumulator tiles (16 × K, fp32) as A fragments (bf16): tiles 2kk and 2kk+1 make fragment kk.
template <int K>
__device__ inline void to_a(uint32_t (&p)[K / 16][4], const float (&acc)[K / 8][4]) {
#pragma unroll
    for (int kk = 0; kk < K / 16; kk++) {
        p[kk][0] = pack_bf16(acc[2 * kk][0], acc[2 * kk][1]);
        p[kk][1] = pack_bf16(acc[2 * kk][2], acc[2 * kk][3]);
        p[kk][2] = pack_bf16(acc[2 * kk + 1][0], acc[2 * kk + 1][1]);
        p[kk][3] = pack_bf16(acc[2 * kk + 1][2], acc[2 * kk + 1][3]);
    }
}

// Asynchronous copies (cp.async, sm_80+): global → shared without passing through registers, so a block can issue
// the next tile's loads and compute on the current one while they fly. A thread's copies since its last commit
// form a group; wait<n> blocks until at most n of its groups are still in flight (then __syncthreads makes every
// thread's copies visible to the block). valid = false reads nothing and writes zeros (a row past T).
__device__ inline void cp_async16(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
                 "r"(valid ? 16 : 0));
}
__device__ inline void cp_async4(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
                 "r"(valid ? 4 : 0));
}
__device__ inline void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ inline void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// Starts copying rows r0 .. r0+rows−1 of head `head` of a (B, T, heads, D) bf16 tensor into shared memory (row
// stride ld), 16 bytes a copy, rows ≥ T zero; all threads of the block take part. The tensor must be 16-byte
// aligned (D is a multiple of 8, so every row then is). Complete after the commit, wait and __syncthreads.
template <int D>
__device__ inline void load_rows_async(bf16* dst, int ld, const bf16* src, int b, int r0, int rows, int T_,
                                       int heads, int head) {
    for (int idx = threadIdx.x; idx < rows * (D / 8); idx += blockDim.x) {
        const int r = idx / (D / 8), c = (idx % (D / 8)) * 8, t = r0 + r;
        const bool valid = t < T_;
        cp_async16(dst + r * ld + c, src + (valid ? (((size_t)b * T_ + t) * heads + head) * D + c : 0), valid);
    }
}
// The same for `n` consecutive floats src[0 .. n) (a row statistic of n query rows), entries ≥ valid_n zero.
__device__ inline void load_floats_async(float* dst, const float* src, int n, int valid_n) {
    for (int i = threadIdx.x; i < n; i += blockDim.x) cp_async4(dst + i, src + (i < valid_n ? i : 0), i < valid_n);
}

// Two neighbouring outputs, fp32 or rounded to bf16 (one 4-byte store).
__device__ inline void store_pair(float* p, float x, float y) { p[0] = x, p[1] = y; }
__device__ inline void store_pair(bf16* p, float x, float y) { *reinterpret_cast<uint32_t*>(p) = pack_bf16(x, y); }

// The 16 rows of a warp's accumulator tiles (16 × N) to rows r0 .. r0+15 of head `head` of a (B·T, ld) fp32 (or
// bf16) tensor whose rows hold the heads' N columns side by side, row g scaled by mul[0] and row g+8 by mul[1]; rows ≥
// T skipped.
template <int N, typename O>
__device__ inline void store_rows_ld(O* dst, size_t ld, const float (&acc)[N / 8][4], const float (&mul)[2], int b,
                                     int r0, int T_, int head) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int half = 0; half < 2; half++) {
        const int t = r0 + lane / 4 + 8 * half;
        if (t >= T_) continue;
        O* row = dst + ((size_t)b * T_ + t) * ld + (size_t)head * N + 2 * (lane % 4);
#pragma unroll
        for (int n = 0; n < N / 8; n++) store_pair(row + 8 * n, acc[n][2 * half] * mul[half], acc[n][2 * half + 1] * mul[half]);
    }
}

// The same rows of a (B, T, heads, N) tensor (packed rows).
template <int N, typename O>
__device__ inline void store_rows(O* dst, const float (&acc)[N / 8][4], const float (&mul)[2], int b, int r0,
                                  int T_, int heads, int head) {
    store_rows_ld<N>(dst, (size_t)heads * N, acc, mul, b, r0, T_, head);
}

// store_rows_ld's rows, scaled by mul, turned back by RoPE (the rotation by −angle, "rotate half": column c pairs with
// c + N/2) and written in bf16: the attention backward's dq and dk, straight into the bf16 dout of the qkv GEMM.
// table: rope_table's (2, T, N/2) cosines, then sines. The same float products as rope_rotate_vec_kernel with sign −1
// on the fp32 gradient store_rows would write. A lane's accumulator columns are 8n + 2·(lane % 4) + {0, 1}: column c
// (n < N/16) and its partner c + N/2 (n + N/16) are in the same lane, so the turn takes no exchange.
template <int N>
__device__ inline void store_rows_unrope_bf16(bf16* dst, size_t ld, const float (&acc)[N / 8][4], float mul, int b,
                                              int r0, int T_, int head, const float* table) {
    constexpr int HALF = N / 2;
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int half = 0; half < 2; half++) {
        const int t = r0 + lane / 4 + 8 * half;
        if (t >= T_) continue;
        bf16* row = dst + ((size_t)b * T_ + t) * ld + (size_t)head * N;
        const float* cos_t = table + (size_t)t * HALF;          // (N/2)
        const float* sin_t = table + ((size_t)T_ + t) * HALF;  // (N/2)
#pragma unroll
        for (int n = 0; n < N / 16; n++) {
            const int c = 8 * n + 2 * (lane % 4);
            const float2 co = *reinterpret_cast<const float2*>(cos_t + c), si = *reinterpret_cast<const float2*>(sin_t + c);
            const float x1a = acc[n][2 * half] * mul, x1b = acc[n][2 * half + 1] * mul;
            const float x2a = acc[n + N / 16][2 * half] * mul, x2b = acc[n + N / 16][2 * half + 1] * mul;
            const float sa = -si.x, sb = -si.y;
            store_pair(row + c, x1a * co.x - x2a * sa, x1b * co.y - x2b * sb);
            store_pair(row + c + HALF, x2a * co.x + x1a * sa, x2b * co.y + x1b * sb);
        }
    }
}

}  // namespace hl::gpu::mma
