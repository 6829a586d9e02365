// attention.cuh — causal grouped-query softmax attention on the GPU, mirroring the core of model/attention.h
// (attention_forward / attention_backward), as a fused flash-style pair that never stores the (T, T) matrix:
//   forward : one pass over the key/value tiles with an online softmax; saves the per-row log-sum-exp
//             lse (B, H, T) instead of the probabilities `att` the CPU saves;
//   backward: D = rowsum(dout ⊙ out) by a small kernel, then P is recomputed tile by tile from q, k and lse.
// Notation as in the CPU reference: query head h reads kv head g = h / (H / Hkv); scores s = q·k / √d_qk;
// P = softmax over the visible keys: s ≤ t, and with a sliding window W > 0 and sink S also t − s < W or
// s < S (hl::attn_visible, the same function on the device). fp32 arithmetic on plain FMA tiles in shared
// memory (tensor cores and bf16 are a later issue; the element type T of q, k, v, out and their gradients is a
// template parameter, every value is converted to float on load, so a bf16 instantiation needs no change here).
//
// Supported head dims (HL_CHECKed): 1 ≤ d_qk ≤ 128, 1 ≤ d_v ≤ 256 — every paper config (largest: the 3b
// intra-layer hybrid, d_qk 96, d_v 192) fits. Any B, T ≥ 1, any H a multiple of Hkv.
//
// Backward parallelisation (deterministic, no atomics): one kernel owns a key/value tile and loops over the
// query heads of its group and the query tiles at or below the diagonal, accumulating dk, dv in registers;
// a second kernel owns a query tile and loops over the key tiles, accumulating dq. Each writes its rows once.
// The price is recomputing P and dP in both (7 tile products instead of FlashAttention-2's 5 with atomics).
//
// Sliding window: every kernel visits only the tiles that hold a visible (query, key) pair, so the cost is
// linear in T for a fixed W and S (visible_kv_tile / query_tiles_end below); inside a visited tile the
// elements are masked by attn_visible. Every row sees itself (W ≥ 1), so no row is empty and lse is finite.
// The sink key tiles, seen by every query, are the exception to "one block per key tile" in the backward: their
// query tiles are split over several blocks whose partial dk, dv a small kernel sums (sink_split), so that no
// block's work grows with T; the backward's scratch grows by those partials (attention_backward_scratch_size).
#pragma once
#include <algorithm>            // std::min
#include <cmath>                // INFINITY
#include <type_traits>          // std::is_same_v: the tensor-core kernels take fp32 tensors only
#include <cuda_runtime.h>       // cudaStream_t, cudaFuncSetAttribute, dim3
#include <mma.h>                // nvcuda::wmma: the tensor-core kernels (the tensor-core section above)
#include "kernels/common.cuh"   // cudaCheck, cudaCheckLast, ceil_div, accumulate
#include "kernels/matmul.cuh"   // matmul_forward/backward: the mixer's projections (section 2 below); bf16,
                                //   current_bf16: whether the tensor-core kernels run (the tensor-core section above)
#include "kernels/rope.cuh"     // rope_forward/backward on q and k (section 2 below)
#include "model/attention.h"    // attn_visible, attention_window_check; AttnConfig, AttnParams (section 2)
#include "model/common.h"       // HL_CHECK, Arena

namespace hl::gpu {

// ---------------------------------------------------------------------------------------------------------
// Tiling shared by the three tile kernels
// ---------------------------------------------------------------------------------------------------------
// A block of 256 threads works on a (64 query rows) × (64 keys) tile of scores. Thread (ty, tx) = (tid / 16,
// tid % 16) owns the 4 × 4 entries at rows ty + 16·a and columns tx + 16·c (a, c < 4): the 16 threads sharing a
// row are 16 consecutive lanes of one warp, so row reductions (max, sum) are 4 shuffles, and the strided
// ownership makes the 16 lanes read 16 different shared-memory rows whose padded stride (odd) puts them in 16
// different banks. Head-dim vectors (out, dq, dk, dv rows) use the same row ownership and columns tx + 16·c.
namespace attn {
constexpr int BR = 64;         // query rows per tile
constexpr int BC = 64;         // keys per tile (BR == BC: the diagonal tile of a query tile is aligned with it)
constexpr int THREADS = 256;   // 16 × 16 threads
constexpr int TM = BR / 16;    // rows per thread
constexpr int TN = BC / 16;    // columns per thread
constexpr int MAX_DQK = 128;
constexpr int MAX_DV = 256;
constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;

// Odd row stride for shared tiles read by 16 lanes at 16 different rows: 16 distinct banks.
__host__ __device__ inline int padded(int d) { return d | 1; }

// Head-dim capacity of the per-thread accumulators, a compile-time bucket ≥ d (16 threads × d / 16 columns).
inline int bucket(int d) { return d <= 64 ? 64 : d <= 128 ? 128 : 256; }

// Opt in to more than 48 KiB of dynamic shared memory (a host-side setting of the kernel, not an allocation;
// cheap enough to repeat at every launch, which keeps it right for every template instantiation).
template <typename Kernel>
inline void allow_smem(Kernel kernel, size_t bytes) {
    if (bytes > 48 * 1024)
        cudaCheck(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
}

// Copies `rows` rows of width d from a (B, T, heads, d) tensor — rows r0 .. r0+rows−1 of head `head` in batch
// b — into shared memory with row stride ld, as float; rows ≥ T are zero (so they add nothing to any product).
// Consecutive threads take consecutive elements of a row: coalesced global reads.
template <typename T>
__device__ inline void load_tile(float* dst, int ld, const T* src, int b, int r0, int rows, int T_, int heads,
                                 int head, int d) {
    for (int idx = threadIdx.x; idx < rows * d; idx += blockDim.x) {
        const int r = idx / d, c = idx - r * d, t = r0 + r;
        dst[r * ld + c] = t < T_ ? float(src[(((size_t)b * T_ + t) * heads + head) * d + c]) : 0.f;
    }
}

// The key tiles a query tile [q0, q0 + BR) can see are those meeting [0, S) (the sink) or [q0 − W + 1, q0 + BR)
// (the window; everything below the diagonal when W = 0). visible_kv_tile(kv0, ...) is the first of them
// starting at or after kv0 (BC-aligned): kv0 itself while it meets the sink, else at least the tile holding
// q0 − W + 1. Tiles it jumps over end at or before q0 − W + 1, so every key j in them has i − j ≥ W for every
// row i ≥ q0, and starts at or after S: fully masked. Callers stop at the diagonal (kv0 < min(T, q0 + BR)).
__host__ __device__ inline int visible_kv_tile(int kv0, int q0, int window, int sink) {
    if (window <= 0 || kv0 < sink) return kv0;
    const int lo = q0 - window + 1 > 0 ? (q0 - window + 1) / BC * BC : 0;
    return kv0 > lo ? kv0 : lo;
}

// The end of the query tiles that can see key tile [kv0, kv0 + BC): from the diagonal tile q0 = kv0 (BR == BC)
// up to T when the tile meets the sink or there is no window, else up to the last query that sees its last
// key kv0 + BC − 1 through the window, kv0 + BC − 1 + W − 1: query tiles q0 < kv0 + BC + W − 1.
__host__ __device__ inline int query_tiles_end(int kv0, int T_, int window, int sink) {
    if (window <= 0 || kv0 < sink) return T_;
    const long long end = (long long)kv0 + BC + window - 1;
    return end < T_ ? (int)end : T_;
}

// The backward's sink split. A key tile meeting the sink is seen by every later query: one block walking all its
// T/64 query tiles would be a serial tail growing with T. So with a window, each sink key tile's query tiles
// are cut into chunks of SINK_CHUNK, one block per chunk writing partial dk, dv rows to scratch, and a second
// kernel sums the partials in a fixed order (deterministic). `tiles` sink key tiles, `splits` chunks each; no
// split ({0, 1}) when one chunk covers every query tile.
constexpr int SINK_CHUNK = 8;  // query tiles per block of a sink key tile: about a 512-wide window's share
struct SinkSplit {
    int tiles = 0, splits = 1;
};
inline SinkSplit sink_split(int T_, int window, int sink) {
    if (window <= 0 || sink <= 0) return {};
    const int n_tiles = (T_ + BC - 1) / BC, splits = (n_tiles + SINK_CHUNK - 1) / SINK_CHUNK;  // tile 0 has most
    if (splits <= 1) return {};
    return {(sink < T_ ? (sink + BC - 1) / BC : n_tiles), splits};
}

// Sum / max over the 16 lanes that share a row (lanes differing in their low 4 bits).
__device__ inline float row_sum16(float x) {
    for (int o = 8; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}
__device__ inline float row_max16(float x) {
    for (int o = 8; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}
}  // namespace attn

// ---------------------------------------------------------------------------------------------------------
// Tensor-core versions of the three tile kernels (bf16 operands, fp32 accumulation and softmax)
// ---------------------------------------------------------------------------------------------------------
// Used in place of the kernels above while a Bf16Scope is open (train_gpu --precision bf16: kernels/matmul.cuh)
// and d_qk = d_v = D ∈ {64, 128}; the backward's key kernel only without a sink split. The same tiles (64 query
// rows × 64 keys), the same loops over them (visible_kv_tile, query_tiles_end) and the same lse, but 4 warps a
// block, each owning 16 rows of the tile, and every tile product on the tensor cores through nvcuda::wmma
// (16×16×16 bf16 fragments, fp32 accumulators): q, k, v and dout are rounded to bf16 as they are loaded into
// shared memory, and so are the probabilities P and dS before they multiply v, q or k. Scores, the online
// softmax, lse and every accumulation stay fp32. A fragment's element-to-thread map is opaque, so values that need
// per-row work (the softmax, the rescaled forward output) go through shared memory between the products.
namespace attn_tc {
using namespace nvcuda;
constexpr int THREADS = 128;   // 4 warps × 16 rows = BR
constexpr int LDS = attn::BC + 4;  // float rows of scores (wmma: a multiple of 4 floats)
constexpr int LDP = attn::BC + 8;  // bf16 rows of probabilities (a multiple of 8 bf16)
using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major>;
using FragBcol = wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major>;
using FragBrow = wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major>;
using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

// bf16 tile rows: D + 8 elements (16 bytes of padding: a multiple of 8, and row starts 16 rows apart stay
// 32-byte aligned, as wmma wants)
template <int D> __host__ __device__ constexpr int ldh() { return D + 8; }

// rows r0 .. r0+rows−1 of head `head` of a (B, T, heads, D) tensor into shared memory as bf16 (row stride ld);
// rows ≥ T are zero
template <typename T, int D>
__device__ inline void load_bf16(bf16* dst, int ld, const T* src, int b, int r0, int rows, int T_, int heads,
                                 int head) {
    for (int idx = threadIdx.x; idx < rows * D; idx += blockDim.x) {
        const int r = idx / D, c = idx % D, t = r0 + r;
        dst[r * ld + c] = __float2bfloat16_rn(t < T_ ? float(src[(((size_t)b * T_ + t) * heads + head) * D + c]) : 0.f);
    }
}

// C (16, 64) = A (16, K) · Bᵀ, where B is (64, K): both row-major bf16 in shared memory; C float, row stride LDS
template <int K>
__device__ inline void mma_abt(float* C, const bf16* A, int lda, const bf16* B, int ldb) {
#pragma unroll
    for (int n = 0; n < attn::BC / 16; n++) {
        FragC c;
        wmma::fill_fragment(c, 0.f);
#pragma unroll
        for (int kk = 0; kk < K; kk += 16) {
            FragA a;
            FragBcol bt;  // column-major (K, 16) view of 16 rows of B: Bᵀ
            wmma::load_matrix_sync(a, A + kk, lda);
            wmma::load_matrix_sync(bt, B + n * 16 * ldb + kk, ldb);
            wmma::mma_sync(c, a, bt, c);
        }
        wmma::store_matrix_sync(C + n * 16, c, LDS, wmma::mem_row_major);
    }
}

// acc[n] (16, 16 columns n·16 …) += A (16, 64) · B (64, D): A row-major bf16 (row stride LDP), B row-major bf16
template <int D>
__device__ inline void mma_ab(FragC (&acc)[D / 16], const bf16* A, const bf16* B, int ldb) {
#pragma unroll
    for (int kk = 0; kk < attn::BC; kk += 16) {
        FragA a;
        wmma::load_matrix_sync(a, A + kk, LDP);
#pragma unroll
        for (int n = 0; n < D / 16; n++) {
            FragBrow bm;
            wmma::load_matrix_sync(bm, B + kk * ldb + n * 16, ldb);
            wmma::mma_sync(acc[n], a, bm, acc[n]);
        }
    }
}

// The softmax pass of one warp over its 16 rows of a (16, 64) float tile: lane → row lane % 16, half lane / 16
// (32 columns each). Column c of the lane's half is visited as (c + row + 16·half) mod 32: with a row stride of
// 4 mod 32 banks, the 32 lanes then hit 32 different banks.
__device__ inline int tile_col(int c, int row, int half) { return half * 32 + ((c + row + 16 * half) & 31); }

// 64 rows of D floats (row stride D + 4) from shared memory to a (B, T, heads, D) tensor, rows ≥ T skipped,
// each scaled by mul[row] (or by `scalar` when mul is null); coalesced (consecutive threads, consecutive columns)
template <typename T, int D>
__device__ inline void store_rows(T* dst, const float* src, const float* mul, float scalar, int b, int r0, int T_,
                                  int heads, int head) {
    for (int idx = threadIdx.x; idx < attn::BR * D; idx += blockDim.x) {
        const int r = idx / D, c = idx % D, t = r0 + r;
        if (t < T_)
            dst[(((size_t)b * T_ + t) * heads + head) * D + c] = T(src[r * (D + 4) + c] * (mul ? mul[r] : scalar));
    }
}
}  // namespace attn_tc

// Forward (as attention_forward_kernel): S = Q Kᵀ per key tile on the tensor cores into shared memory; the online
// softmax by two lanes a row writes P (bf16) and rescales the row's unnormalised output, which lives in shared
// memory (fp32) and is loaded into accumulators for O += P V and stored back.
template <typename T, int D>
__global__ void __launch_bounds__(attn_tc::THREADS)
    attention_forward_tc_kernel(T* out, float* lse, const T* q, const T* k, const T* v, int T_, int H, int Hkv,
                                int window, int sink, float scale_log2) {
    using namespace attn;
    using namespace attn_tc;
    constexpr int LDH = ldh<D>(), LDO = D + 4;
    extern __shared__ __align__(128) unsigned char smem_tc[];
    bf16* sQ = reinterpret_cast<bf16*>(smem_tc);  // (BR, LDH)
    bf16* sK = sQ + BR * LDH;                     // (BC, LDH)
    bf16* sV = sK + BC * LDH;                     // (BC, LDH)
    float* sS = reinterpret_cast<float*>(sV + BC * LDH);  // (BR, LDS) scores of the current tile
    bf16* sP = reinterpret_cast<bf16*>(sS + BR * LDS);    // (BR, LDP) its probabilities
    float* sO = reinterpret_cast<float*>(sP + BR * LDP);  // (BR, LDO) unnormalised output
    float* sInv = sO + BR * LDO;                          // (BR) 1 / l at the end

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, row = lane % 16, half = lane / 16;
    const int r_tile = warp * 16 + row;  // this lane's row in the tile
    const int q0 = (gridDim.x - 1 - blockIdx.x) * BR;
    const int b = blockIdx.y / H, h = blockIdx.y % H, g = h / (H / Hkv), i = q0 + r_tile;

    load_bf16<T, D>(sQ, LDH, q, b, q0, BR, T_, H, h);
    for (int idx = threadIdx.x; idx < BR * LDO; idx += blockDim.x) sO[idx] = 0.f;
    float m = -INFINITY, l = 0.f;  // the row's running max (log2 units) and sum; both lanes of a row keep them

    const int kv_end = min(T_, q0 + BR);
    for (int kv0 = visible_kv_tile(0, q0, window, sink); kv0 < kv_end;
         kv0 = visible_kv_tile(kv0 + BC, q0, window, sink)) {
        __syncthreads();  // the previous tile's sK, sV are no longer read (and sQ, sO are ready, first time)
        load_bf16<T, D>(sK, LDH, k, b, kv0, BC, T_, Hkv, g);
        load_bf16<T, D>(sV, LDH, v, b, kv0, BC, T_, Hkv, g);
        __syncthreads();

        float* S = sS + warp * 16 * LDS;
        mma_abt<D>(S, sQ + warp * 16 * LDH, LDH, sK, LDH);
        __syncwarp();
        float tmax = -INFINITY;
        for (int c = 0; c < 32; c++) {
            const int col = tile_col(c, row, half), j = kv0 + col;
            float& s = S[row * LDS + col];
            s = (attn_visible(i, j, window, sink) && j < T_) ? s * scale_log2 : -INFINITY;
            tmax = fmaxf(tmax, s);
        }
        const float m_new = fmaxf(m, fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 16)));
        const float m_use = m_new == -INFINITY ? 0.f : m_new;
        const float alpha = exp2f(m - m_use);
        float psum = 0.f;
        bf16* P = sP + warp * 16 * LDP;
        for (int c = 0; c < 32; c++) {
            const int col = tile_col(c, row, half);
            const bf16 p = __float2bfloat16_rn(exp2f(S[row * LDS + col] - m_use));
            P[row * LDP + col] = p;
            psum += __bfloat162float(p);  // the sum of what multiplies V
        }
        l = l * alpha + psum + __shfl_xor_sync(0xffffffffu, psum, 16);
        m = m_new;
        float* O = sO + warp * 16 * LDO;
        for (int c = 0; c < D / 2; c++) O[row * LDO + half * (D / 2) + ((c + row + 16 * half) % (D / 2))] *= alpha;
        __syncwarp();

        FragC acc[D / 16];
#pragma unroll
        for (int n = 0; n < D / 16; n++) wmma::load_matrix_sync(acc[n], O + n * 16, LDO, wmma::mem_row_major);
        mma_ab<D>(acc, P, sV, LDH);
#pragma unroll
        for (int n = 0; n < D / 16; n++) wmma::store_matrix_sync(O + n * 16, acc[n], LDO, wmma::mem_row_major);
    }
    if (half == 0) {
        sInv[r_tile] = l > 0.f ? 1.f / l : 0.f;
        if (i < T_) lse[((size_t)b * H + h) * T_ + i] = m * LN2 + logf(l);
    }
    __syncthreads();
    store_rows<T, D>(out, sO, sInv, 1.f, b, q0, T_, H, h);
}

// dk, dv (as attention_backward_dkdv_kernel, without the sink split): a block owns 64 keys (16 a warp) and loops
// over the query heads of its group and their query tiles from the diagonal on. Per query tile, on the tensor
// cores: Sᵀ = K Qᵀ and dPᵀ = V doutᵀ into shared memory, then Pᵀ = exp(Sᵀ/√d − lse) and dSᵀ = Pᵀ ⊙ (dPᵀ − D) (bf16),
// then dv += Pᵀ dout and dk += dSᵀ Q in fragments that stay in registers over the whole loop.
template <typename T, int D>
__global__ void __launch_bounds__(attn_tc::THREADS)
    attention_backward_dkdv_tc_kernel(T* dk, T* dv, const T* dout, const float* lse, const float* Dr, const T* q,
                                      const T* k, const T* v, int T_, int H, int Hkv, int window, int sink,
                                      float scale, float scale_log2) {
    using namespace attn;
    using namespace attn_tc;
    constexpr int LDH = ldh<D>(), LDO = D + 4;
    extern __shared__ __align__(128) unsigned char smem_tc[];
    bf16* sK = reinterpret_cast<bf16*>(smem_tc);  // (BC, LDH) this block's keys
    bf16* sV = sK + BC * LDH;                     // (BC, LDH) and values
    bf16* sQ = sV + BC * LDH;                     // (BR, LDH) current query tile
    bf16* sO = sQ + BR * LDH;                     // (BR, LDH) its dout rows
    float* sS = reinterpret_cast<float*>(sO + BR * LDH);  // (BC, LDS) Sᵀ
    float* sDP = sS + BC * LDS;                           // (BC, LDS) dPᵀ
    bf16* sP = reinterpret_cast<bf16*>(sDP + BC * LDS);   // (BC, LDP) Pᵀ
    bf16* sDS = sP + BC * LDP;                            // (BC, LDP) dSᵀ
    float* sL2 = reinterpret_cast<float*>(sDS + BC * LDP);  // (BR) lse · log2 e of the current query rows
    float* sD = sL2 + BR;                                   // (BR) D of the current query rows

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, row = lane % 16, half = lane / 16;
    const int kv0 = blockIdx.x * BC, j = kv0 + warp * 16 + row;  // this lane's key
    const int b = blockIdx.y / Hkv, g = blockIdx.y % Hkv, group = H / Hkv;

    load_bf16<T, D>(sK, LDH, k, b, kv0, BC, T_, Hkv, g);
    load_bf16<T, D>(sV, LDH, v, b, kv0, BC, T_, Hkv, g);
    FragC dk_acc[D / 16], dv_acc[D / 16];
#pragma unroll
    for (int n = 0; n < D / 16; n++) wmma::fill_fragment(dk_acc[n], 0.f), wmma::fill_fragment(dv_acc[n], 0.f);

    const int q_end = query_tiles_end(kv0, T_, window, sink);
    for (int h = g * group; h < (g + 1) * group; h++)
        for (int q0 = kv0; q0 < q_end; q0 += BR) {
            __syncthreads();  // the previous query tile is no longer read
            load_bf16<T, D>(sQ, LDH, q, b, q0, BR, T_, H, h);
            load_bf16<T, D>(sO, LDH, dout, b, q0, BR, T_, H, h);
            for (int r = threadIdx.x; r < BR; r += blockDim.x) {
                const int i = q0 + r;
                const size_t bhi = ((size_t)b * H + h) * T_ + i;
                sL2[r] = i < T_ ? lse[bhi] * LOG2E : 0.f;
                sD[r] = i < T_ ? Dr[bhi] : 0.f;
            }
            __syncthreads();

            float* S = sS + warp * 16 * LDS;
            float* DP = sDP + warp * 16 * LDS;
            mma_abt<D>(S, sK + warp * 16 * LDH, LDH, sQ, LDH);
            mma_abt<D>(DP, sV + warp * 16 * LDH, LDH, sO, LDH);
            __syncwarp();
            bf16* P = sP + warp * 16 * LDP;
            bf16* DS = sDS + warp * 16 * LDP;
            for (int c = 0; c < 32; c++) {
                const int col = tile_col(c, row, half), i = q0 + col;
                const bool vis = i < T_ && j < T_ && attn_visible(i, j, window, sink);
                const float p = vis ? exp2f(S[row * LDS + col] * scale_log2 - sL2[col]) : 0.f;
                P[row * LDP + col] = __float2bfloat16_rn(p);
                DS[row * LDP + col] = __float2bfloat16_rn(p * (DP[row * LDS + col] - sD[col]));
            }
            __syncwarp();
            mma_ab<D>(dv_acc, P, sO, LDH);
            mma_ab<D>(dk_acc, DS, sQ, LDH);
        }

    // the warps' rows through shared memory (sS and sDP, contiguous, hold 64 rows of D + 4 floats) to dv, then dk
    __syncthreads();
    float* F = sS;
#pragma unroll
    for (int n = 0; n < D / 16; n++)
        wmma::store_matrix_sync(F + warp * 16 * LDO + n * 16, dv_acc[n], LDO, wmma::mem_row_major);
    __syncthreads();
    store_rows<T, D>(dv, F, nullptr, 1.f, b, kv0, T_, Hkv, g);
    __syncthreads();
#pragma unroll
    for (int n = 0; n < D / 16; n++)
        wmma::store_matrix_sync(F + warp * 16 * LDO + n * 16, dk_acc[n], LDO, wmma::mem_row_major);
    __syncthreads();
    store_rows<T, D>(dk, F, nullptr, scale, b, kv0, T_, Hkv, g);
}

// dq (as attention_backward_dq_kernel): a block owns 64 queries (16 a warp) and loops over the visible key tiles:
// S = Q Kᵀ and dP = dout Vᵀ on the tensor cores, P and dS = P ⊙ (dP − D) per row, then dq += dS K in fragments.
template <typename T, int D>
__global__ void __launch_bounds__(attn_tc::THREADS)
    attention_backward_dq_tc_kernel(T* dq, const T* dout, const float* lse, const float* Dr, const T* q, const T* k,
                                    const T* v, int T_, int H, int Hkv, int window, int sink, float scale,
                                    float scale_log2) {
    using namespace attn;
    using namespace attn_tc;
    constexpr int LDH = ldh<D>(), LDO = D + 4;
    extern __shared__ __align__(128) unsigned char smem_tc[];
    bf16* sQ = reinterpret_cast<bf16*>(smem_tc);  // (BR, LDH) this block's queries
    bf16* sO = sQ + BR * LDH;                     // (BR, LDH) and dout rows
    bf16* sK = sO + BR * LDH;                     // (BC, LDH) current key tile
    bf16* sV = sK + BC * LDH;                     // (BC, LDH) and values
    float* sS = reinterpret_cast<float*>(sV + BC * LDH);  // (BR, LDS) S
    float* sDP = sS + BR * LDS;                           // (BR, LDS) dP
    bf16* sDS = reinterpret_cast<bf16*>(sDP + BR * LDS);  // (BR, LDP) dS

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, row = lane % 16, half = lane / 16;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * BR, i = q0 + warp * 16 + row;
    const int b = blockIdx.y / H, h = blockIdx.y % H, g = h / (H / Hkv);

    load_bf16<T, D>(sQ, LDH, q, b, q0, BR, T_, H, h);
    load_bf16<T, D>(sO, LDH, dout, b, q0, BR, T_, H, h);
    const size_t bhi = ((size_t)b * H + h) * T_ + i;
    const float L2 = i < T_ ? lse[bhi] * LOG2E : 0.f, Di = i < T_ ? Dr[bhi] : 0.f;
    FragC dq_acc[D / 16];
#pragma unroll
    for (int n = 0; n < D / 16; n++) wmma::fill_fragment(dq_acc[n], 0.f);

    const int kv_end = min(T_, q0 + BR);
    for (int kv0 = visible_kv_tile(0, q0, window, sink); kv0 < kv_end;
         kv0 = visible_kv_tile(kv0 + BC, q0, window, sink)) {
        __syncthreads();
        load_bf16<T, D>(sK, LDH, k, b, kv0, BC, T_, Hkv, g);
        load_bf16<T, D>(sV, LDH, v, b, kv0, BC, T_, Hkv, g);
        __syncthreads();

        float* S = sS + warp * 16 * LDS;
        float* DP = sDP + warp * 16 * LDS;
        mma_abt<D>(S, sQ + warp * 16 * LDH, LDH, sK, LDH);
        mma_abt<D>(DP, sO + warp * 16 * LDH, LDH, sV, LDH);
        __syncwarp();
        bf16* DS = sDS + warp * 16 * LDP;
        for (int c = 0; c < 32; c++) {
            const int col = tile_col(c, row, half), j = kv0 + col;
            const bool vis = i < T_ && j < T_ && attn_visible(i, j, window, sink);
            const float p = vis ? exp2f(S[row * LDS + col] * scale_log2 - L2) : 0.f;
            DS[row * LDP + col] = __float2bfloat16_rn(p * (DP[row * LDS + col] - Di));
        }
        __syncwarp();
        mma_ab<D>(dq_acc, DS, sK, LDH);
    }
    __syncthreads();
    float* F = sS;  // sS and sDP: 64 rows of D + 4 floats
#pragma unroll
    for (int n = 0; n < D / 16; n++)
        wmma::store_matrix_sync(F + warp * 16 * LDO + n * 16, dq_acc[n], LDO, wmma::mem_row_major);
    __syncthreads();
    store_rows<T, D>(dq, F, nullptr, scale, b, q0, T_, H, h);
}

// Whether the tensor-core kernels take this call: bf16 operands in effect (a Bf16Scope), fp32 tensors, and equal
// head dims of 64 or 128.
template <typename T>
inline bool attention_use_tc(int d_qk, int d_v) {
    return std::is_same_v<T, float> && current_bf16() != nullptr && d_qk == d_v && (d_qk == 64 || d_qk == 128);
}

// Shared memory of the three tensor-core kernels for head dim D.
inline size_t attention_tc_smem_forward(int D) {
    using namespace attn;
    return sizeof(bf16) * (size_t)(BR + 2 * BC) * (D + 8) + sizeof(float) * BR * attn_tc::LDS +
           sizeof(bf16) * BR * attn_tc::LDP + sizeof(float) * ((size_t)BR * (D + 4) + BR);
}
inline size_t attention_tc_smem_backward(int D) {  // both kernels (dkdv also needs its 2·BR floats of lse and D)
    using namespace attn;
    return sizeof(bf16) * (size_t)(2 * BR + 2 * BC) * (D + 8) + sizeof(float) * 2 * BR * attn_tc::LDS +
           sizeof(bf16) * 2 * BR * attn_tc::LDP + sizeof(float) * 2 * BR;
}

// ---------------------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------------------

// out (B, T, H, d_v), lse (B, H, T) ← q (B, T, H, d_qk), k (B, T, Hkv, d_qk), v (B, T, Hkv, d_v).
// Grid (ceil(T / 64), B·H): one block per 64-row query tile of one (b, h); 256 threads (see attn:: above).
// The block keeps its Q tile in shared memory and streams the key/value tiles 0 .. diagonal through shared
// memory (tiles entirely above the diagonal are skipped, and with a window those wholly outside it and the
// sink: visible_kv_tile), keeping per row the running max m, the running sum
// l of exp(s − m) and the unnormalised output acc (FlashAttention's online softmax), rescaled by exp(m_old −
// m_new) whenever the max grows. Scores are kept in log2 units (s·log2 e) so that exp is one exp2f.
// Blocks are issued last query tile first: the longest (most key tiles) start earliest, shortening the tail.
// DV_MAX ≥ d_v sizes the per-thread output accumulators (TM × DV_MAX/16 registers).
template <typename T, int DV_MAX>
__global__ void __launch_bounds__(attn::THREADS)
    attention_forward_kernel(T* out, float* lse, const T* q, const T* k, const T* v, int T_, int H, int Hkv,
                             int d_qk, int d_v, int window, int sink, float scale_log2) {
    using namespace attn;
    constexpr int CV = DV_MAX / 16;  // output columns per thread
    extern __shared__ float smem[];
    const int ldq = padded(d_qk);
    float* sQ = smem;            // (BR, ldq)  this block's queries
    float* sK = sQ + BR * ldq;   // (BC, ldq)  current key tile
    float* sV = sK + BC * ldq;   // (BC, d_v)  current value tile (read along rows: no padding needed)
    float* sP = sV + BC * d_v;   // (BR, BC+1) probabilities of the current tile, shared by a row's 16 threads

    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * BR;
    const int b = blockIdx.y / H, h = blockIdx.y % H, g = h / (H / Hkv);

    load_tile(sQ, ldq, q, b, q0, BR, T_, H, h, d_qk);

    float m[TM], l[TM], acc[TM][CV];
#pragma unroll
    for (int a = 0; a < TM; a++) {
        m[a] = -INFINITY;
        l[a] = 0.f;
#pragma unroll
        for (int c = 0; c < CV; c++) acc[a][c] = 0.f;
    }

    const int kv_end = min(T_, q0 + BR);  // keys past the tile's last row are in every row's future
    for (int kv0 = visible_kv_tile(0, q0, window, sink); kv0 < kv_end;
         kv0 = visible_kv_tile(kv0 + BC, q0, window, sink)) {
        __syncthreads();  // everyone is done with the previous sK, sV, sP (and sQ is loaded, first time)
        load_tile(sK, ldq, k, b, kv0, BC, T_, Hkv, g, d_qk);
        load_tile(sV, d_v, v, b, kv0, BC, T_, Hkv, g, d_v);
        __syncthreads();

        // s = Q Kᵀ on this thread's 4 × 4 entries
        float s[TM][TN] = {};
#pragma unroll 4
        for (int d = 0; d < d_qk; d++) {
            float qa[TM], kc[TN];
#pragma unroll
            for (int a = 0; a < TM; a++) qa[a] = sQ[(ty + 16 * a) * ldq + d];
#pragma unroll
            for (int c = 0; c < TN; c++) kc[c] = sK[(tx + 16 * c) * ldq + d];
#pragma unroll
            for (int a = 0; a < TM; a++)
#pragma unroll
                for (int c = 0; c < TN; c++) s[a][c] = fmaf(qa[a], kc[c], s[a][c]);
        }

        // causal (and window) mask, online softmax update, P to shared memory
#pragma unroll
        for (int a = 0; a < TM; a++) {
            const int i = q0 + ty + 16 * a;
            float tmax = -INFINITY;
#pragma unroll
            for (int c = 0; c < TN; c++) {
                const int j = kv0 + tx + 16 * c;
                s[a][c] = (attn_visible(i, j, window, sink) && j < T_) ? s[a][c] * scale_log2 : -INFINITY;
                tmax = fmaxf(tmax, s[a][c]);
            }
            const float m_new = fmaxf(m[a], row_max16(tmax));
            const float m_use = m_new == -INFINITY ? 0.f : m_new;  // a row with nothing visible yet: no NaN
            const float alpha = exp2f(m[a] - m_use);                // rescales the old sum and output
            float psum = 0.f;
#pragma unroll
            for (int c = 0; c < TN; c++) {
                const float p = exp2f(s[a][c] - m_use);  // masked: exp2(−inf) = 0
                psum += p;
                sP[(ty + 16 * a) * (BC + 1) + tx + 16 * c] = p;
            }
            l[a] = l[a] * alpha + row_sum16(psum);
            m[a] = m_new;
#pragma unroll
            for (int c = 0; c < CV; c++) acc[a][c] *= alpha;
        }
        __syncthreads();

        // acc += P V (value rows past T are zero in sV, and their P is 0)
        for (int j = 0; j < BC; j++) {
            float pa[TM], vc[CV];
#pragma unroll
            for (int a = 0; a < TM; a++) pa[a] = sP[(ty + 16 * a) * (BC + 1) + j];
#pragma unroll
            for (int c = 0; c < CV; c++) {
                const int e = tx + 16 * c;
                vc[c] = e < d_v ? sV[j * d_v + e] : 0.f;
            }
#pragma unroll
            for (int a = 0; a < TM; a++)
#pragma unroll
                for (int c = 0; c < CV; c++) acc[a][c] = fmaf(pa[a], vc[c], acc[a][c]);
        }
    }

    // normalise and write the rows of this tile that exist; lse in natural-log units
#pragma unroll
    for (int a = 0; a < TM; a++) {
        const int i = q0 + ty + 16 * a;
        if (i >= T_) continue;
        const float inv = l[a] > 0.f ? 1.f / l[a] : 0.f;
        T* o = out + (((size_t)b * T_ + i) * H + h) * d_v;
#pragma unroll
        for (int c = 0; c < CV; c++) {
            const int e = tx + 16 * c;
            if (e < d_v) o[e] = T(acc[a][c] * inv);
        }
        if (tx == 0) lse[((size_t)b * H + h) * T_ + i] = m[a] * LN2 + logf(l[a]);
    }
}

inline void attention_check_gpu(int B, int T_, int H, int Hkv, int d_qk, int d_v, int window, int sink) {
    HL_CHECK(B > 0 && T_ > 0 && H > 0 && Hkv > 0 && d_qk > 0 && d_v > 0, "attention (gpu): bad sizes B=", B,
             " T=", T_, " H=", H, " Hkv=", Hkv, " d_qk=", d_qk, " d_v=", d_v);
    HL_CHECK(H % Hkv == 0, "attention (gpu): n_heads (", H, ") must be a multiple of n_kv_heads (", Hkv, ")");
    HL_CHECK(d_qk <= attn::MAX_DQK && d_v <= attn::MAX_DV, "attention (gpu): head dims up to d_qk ",
             attn::MAX_DQK, ", d_v ", attn::MAX_DV, " are supported, got d_qk=", d_qk, " d_v=", d_v);
    HL_CHECK((long long)B * H <= 65535, "attention (gpu): B·H (", (long long)B * H,
             ") exceeds the grid's y limit 65535");
    attention_window_check(window, sink);
}

// out (B, T, H, d_v) and lse (B, H, T) are written; lse[b, h, t] = log Σ_{visible s} exp(q_t·k_s / √d_qk), what
// the backward needs to recompute the probabilities. window = 0: full causal; else window W, sink S.
template <typename T>
void attention_forward(T* out, float* lse, const T* q, const T* k, const T* v, int B, int T_, int H, int Hkv,
                       int d_qk, int d_v, int window = 0, int sink = 0, cudaStream_t stream = 0) {
    using namespace attn;
    attention_check_gpu(B, T_, H, Hkv, d_qk, d_v, window, sink);
    const float scale_log2 = LOG2E / sqrtf((float)d_qk);
    const dim3 grid(ceil_div(T_, BR), B * H);
    if (attention_use_tc<T>(d_qk, d_v)) {  // bf16 operands: the tensor-core kernel (the tensor-core section above)
        const size_t smem_tc = attention_tc_smem_forward(d_qk);
        auto launch_tc = [&](auto kernel) {
            allow_smem(kernel, smem_tc);
            kernel<<<grid, attn_tc::THREADS, smem_tc, stream>>>(out, lse, q, k, v, T_, H, Hkv, window, sink,
                                                                 scale_log2);
            cudaCheckLast();
        };
        if (d_qk == 64) launch_tc(attention_forward_tc_kernel<T, 64>);
        else launch_tc(attention_forward_tc_kernel<T, 128>);
        return;
    }
    const size_t smem = sizeof(float) * ((size_t)(BR + BC) * padded(d_qk) + (size_t)BC * d_v + BR * (BC + 1));
    auto launch = [&](auto kernel) {
        allow_smem(kernel, smem);
        kernel<<<grid, THREADS, smem, stream>>>(out, lse, q, k, v, T_, H, Hkv, d_qk, d_v, window, sink, scale_log2);
        cudaCheckLast();
    };
    switch (bucket(d_v)) {
        case 64: launch(attention_forward_kernel<T, 64>); break;
        case 128: launch(attention_forward_kernel<T, 128>); break;
        default: launch(attention_forward_kernel<T, 256>); break;
    }
}

// ---------------------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------------------

// D (B, H, T) = rowsum(dout ⊙ out) = Σ_s P[t, s] · dP[t, s], the softmax backward's per-row term.
// One warp per (b, t, h) row of d_v contiguous values (lanes stride the row, then a shuffle sum); 8 rows per
// 256-thread block. The rows are indexed in (B, T, H) order so that consecutive warps read consecutive memory.
template <typename T>
__global__ void attention_backward_D_kernel(float* D, const T* dout, const T* out, int B, int T_, int H, int d_v) {
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;  // (b·T + t)·H + h
    const int lane = threadIdx.x % 32;
    if (row >= B * T_ * H) return;  // whole warps leave together
    const T* o = out + (size_t)row * d_v;
    const T* go = dout + (size_t)row * d_v;
    float sum = 0.f;
    for (int e = lane; e < d_v; e += 32) sum = fmaf(float(go[e]), float(o[e]), sum);
    for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    if (lane == 0) {
        const int h = row % H, bt = row / H, t = bt % T_, b = bt / T_;
        D[((size_t)b * H + h) * T_ + t] = sum;
    }
}

// dk (B, T, Hkv, d_qk), dv (B, T, Hkv, d_v), written. Grid (ceil(T / 64), B·Hkv): one block per 64-key tile of
// one (b, kv head g); 256 threads. The block keeps its K and V tiles in shared memory and loops over the query
// heads h of group g and, for each, the query tiles at or below the diagonal (tiles above it see none of these
// keys; with a window, only those up to query_tiles_end). Per query tile it recomputes, transposed so that a
// thread's rows are keys j:
//   Sᵀ[j, i] = k_j · q_i,   Pᵀ[j, i] = exp(Sᵀ/√d_qk − lse_i)   (0 where j is invisible to i, or i ≥ T)
//   dPᵀ[j, i] = v_j · dout_i,   dSᵀ[j, i] = Pᵀ · (dPᵀ − D_i)
//   dv_j += Σ_i Pᵀ[j, i] dout_i,   dk_j += Σ_i dSᵀ[j, i] q_i / √d_qk
// with dk, dv accumulated in registers over the whole group — a deterministic sum over query heads.
// Pᵀ and then dSᵀ pass through one shared buffer so the 16 threads of a key row can read all 64 of its columns.
// Blocks are issued first key tile first: it has the most query tiles below it, so the longest start earliest.
// With a sink split (sink_split), the first split.tiles · split.splits blocks are the sink key tiles' chunks
// (block x: tile x / splits, chunk x % splits), writing their partial sums to partial (B, Hkv, tiles, splits, BC,
// d_qk + d_v) instead of dk, dv; the rest take the key tiles after the sink.
template <typename T, int DQK_MAX, int DV_MAX>
__global__ void __launch_bounds__(attn::THREADS)
    attention_backward_dkdv_kernel(T* dk, T* dv, const T* dout, const float* lse, const float* D, const T* q,
                                   const T* k, const T* v, float* partial, int T_, int H, int Hkv, int d_qk,
                                   int d_v, int window, int sink, attn::SinkSplit split, float scale,
                                   float scale_log2) {
    using namespace attn;
    constexpr int CK = DQK_MAX / 16, CV = DV_MAX / 16;
    extern __shared__ float smem[];
    const int ldq = padded(d_qk), ldv = padded(d_v);
    float* sK = smem;            // (BC, ldq) this block's keys
    float* sV = sK + BC * ldq;   // (BC, ldv) this block's values
    float* sQ = sV + BC * ldv;   // (BR, ldq) current query tile
    float* sO = sQ + BR * ldq;   // (BR, ldv) current dout tile
    float* sX = sO + BR * ldv;   // (BC, BR+1) Pᵀ, then dSᵀ
    float* sL = sX + BC * (BR + 1);  // (BR) lse · log2 e of the current query rows
    float* sD = sL + BR;             // (BR) D of the current query rows

    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    const int n_split = split.tiles * split.splits;  // blocks that are chunks of sink key tiles
    const bool chunk = (int)blockIdx.x < n_split;
    const int kt = chunk ? blockIdx.x / split.splits : split.tiles + (blockIdx.x - n_split);
    const int kv0 = kt * BC;  // first key tile first: it sees the most query tiles
    const int b = blockIdx.y / Hkv, g = blockIdx.y % Hkv, group = H / Hkv;

    load_tile(sK, ldq, k, b, kv0, BC, T_, Hkv, g, d_qk);
    load_tile(sV, ldv, v, b, kv0, BC, T_, Hkv, g, d_v);

    float acc_k[TM][CK], acc_v[TM][CV];
#pragma unroll
    for (int a = 0; a < TM; a++) {
#pragma unroll
        for (int c = 0; c < CK; c++) acc_k[a][c] = 0.f;
#pragma unroll
        for (int c = 0; c < CV; c++) acc_v[a][c] = 0.f;
    }

    // query tiles [q_begin, q_end): from the diagonal (BR == BC: the diagonal query tile starts at kv0), or this
    // chunk's share of them
    int q_begin = kv0, q_end = query_tiles_end(kv0, T_, window, sink);
    if (chunk) {
        q_begin = kv0 + (blockIdx.x % split.splits) * SINK_CHUNK * BR;
        q_end = min(q_end, q_begin + SINK_CHUNK * BR);  // may be empty: the chunk then writes zeros
    }
    for (int h = g * group; h < (g + 1) * group; h++) {
        for (int q0 = q_begin; q0 < q_end; q0 += BR) {
            __syncthreads();  // done with the previous sQ, sO, sX, sL, sD (and sK, sV loaded, first time)
            load_tile(sQ, ldq, q, b, q0, BR, T_, H, h, d_qk);
            load_tile(sO, ldv, dout, b, q0, BR, T_, H, h, d_v);
            for (int r = threadIdx.x; r < BR; r += blockDim.x) {
                const int i = q0 + r;
                const size_t bhi = ((size_t)b * H + h) * T_ + i;
                sL[r] = i < T_ ? lse[bhi] * LOG2E : 0.f;
                sD[r] = i < T_ ? D[bhi] : 0.f;
            }
            __syncthreads();

            // Sᵀ = K Qᵀ and dPᵀ = V doutᵀ on this thread's 4 × 4 entries (rows: keys, columns: queries)
            float st[TM][TN] = {}, dpt[TM][TN] = {};
#pragma unroll 4
            for (int d = 0; d < d_qk; d++) {
                float ka[TM], qc[TN];
#pragma unroll
                for (int a = 0; a < TM; a++) ka[a] = sK[(ty + 16 * a) * ldq + d];
#pragma unroll
                for (int c = 0; c < TN; c++) qc[c] = sQ[(tx + 16 * c) * ldq + d];
#pragma unroll
                for (int a = 0; a < TM; a++)
#pragma unroll
                    for (int c = 0; c < TN; c++) st[a][c] = fmaf(ka[a], qc[c], st[a][c]);
            }
#pragma unroll 4
            for (int e = 0; e < d_v; e++) {
                float va[TM], oc[TN];
#pragma unroll
                for (int a = 0; a < TM; a++) va[a] = sV[(ty + 16 * a) * ldv + e];
#pragma unroll
                for (int c = 0; c < TN; c++) oc[c] = sO[(tx + 16 * c) * ldv + e];
#pragma unroll
                for (int a = 0; a < TM; a++)
#pragma unroll
                    for (int c = 0; c < TN; c++) dpt[a][c] = fmaf(va[a], oc[c], dpt[a][c]);
            }

            // Pᵀ (recomputed from lse) to shared memory; dSᵀ·scale kept in st
#pragma unroll
            for (int a = 0; a < TM; a++) {
                const int j = kv0 + ty + 16 * a;
#pragma unroll
                for (int c = 0; c < TN; c++) {
                    const int r = tx + 16 * c, i = q0 + r;
                    const float p = (attn_visible(i, j, window, sink) && i < T_)
                                        ? exp2f(st[a][c] * scale_log2 - sL[r]) : 0.f;
                    sX[(ty + 16 * a) * (BR + 1) + r] = p;
                    st[a][c] = p * (dpt[a][c] - sD[r]) * scale;
                }
            }
            __syncthreads();

            // dv_j += Σ_i Pᵀ[j, i] dout_i
            for (int r = 0; r < BR; r++) {
                float pa[TM], oc[CV];
#pragma unroll
                for (int a = 0; a < TM; a++) pa[a] = sX[(ty + 16 * a) * (BR + 1) + r];
#pragma unroll
                for (int c = 0; c < CV; c++) {
                    const int e = tx + 16 * c;
                    oc[c] = e < d_v ? sO[r * ldv + e] : 0.f;
                }
#pragma unroll
                for (int a = 0; a < TM; a++)
#pragma unroll
                    for (int c = 0; c < CV; c++) acc_v[a][c] = fmaf(pa[a], oc[c], acc_v[a][c]);
            }
            __syncthreads();  // everyone has read Pᵀ before it is overwritten by dSᵀ
#pragma unroll
            for (int a = 0; a < TM; a++)
#pragma unroll
                for (int c = 0; c < TN; c++) sX[(ty + 16 * a) * (BR + 1) + tx + 16 * c] = st[a][c];
            __syncthreads();

            // dk_j += Σ_i dSᵀ[j, i] q_i / √d_qk  (the scale is already in dSᵀ)
            for (int r = 0; r < BR; r++) {
                float sa[TM], qc[CK];
#pragma unroll
                for (int a = 0; a < TM; a++) sa[a] = sX[(ty + 16 * a) * (BR + 1) + r];
#pragma unroll
                for (int c = 0; c < CK; c++) {
                    const int d = tx + 16 * c;
                    qc[c] = d < d_qk ? sQ[r * ldq + d] : 0.f;
                }
#pragma unroll
                for (int a = 0; a < TM; a++)
#pragma unroll
                    for (int c = 0; c < CK; c++) acc_k[a][c] = fmaf(sa[a], qc[c], acc_k[a][c]);
            }
        }
    }

    if (chunk) {  // this chunk's partial sums of all BC rows (summed into dk, dv by attention_sink_reduce_kernel)
        float* part = partial + ((size_t)b * Hkv + g) * n_split * BC * (d_qk + d_v) +
                      (size_t)blockIdx.x * BC * (d_qk + d_v);
#pragma unroll
        for (int a = 0; a < TM; a++) {
            float* row = part + (size_t)(ty + 16 * a) * (d_qk + d_v);
#pragma unroll
            for (int c = 0; c < CK; c++) {
                const int d = tx + 16 * c;
                if (d < d_qk) row[d] = acc_k[a][c];
            }
#pragma unroll
            for (int c = 0; c < CV; c++) {
                const int e = tx + 16 * c;
                if (e < d_v) row[d_qk + e] = acc_v[a][c];
            }
        }
        return;
    }
    // every key row of this tile is owned by this block alone: write (not add)
#pragma unroll
    for (int a = 0; a < TM; a++) {
        const int j = kv0 + ty + 16 * a;
        if (j >= T_) continue;
        T* dkj = dk + (((size_t)b * T_ + j) * Hkv + g) * d_qk;
        T* dvj = dv + (((size_t)b * T_ + j) * Hkv + g) * d_v;
#pragma unroll
        for (int c = 0; c < CK; c++) {
            const int d = tx + 16 * c;
            if (d < d_qk) dkj[d] = T(acc_k[a][c]);
        }
#pragma unroll
        for (int c = 0; c < CV; c++) {
            const int e = tx + 16 * c;
            if (e < d_v) dvj[e] = T(acc_v[a][c]);
        }
    }
}

// dk, dv rows of the sink key tiles (j < split.tiles · BC, j < T) = Σ over the chunks of their partial sums, in
// chunk order. One thread per (b, g, j, element of [dk_j, dv_j]).
template <typename T>
__global__ void attention_sink_reduce_kernel(T* dk, T* dv, const float* partial, int B, int T_, int Hkv, int d_qk,
                                             int d_v, attn::SinkSplit split) {
    const int width = d_qk + d_v, rows = min(T_, split.tiles * attn::BC);
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)B * Hkv * rows * width) return;
    const int e = idx % width, j = (idx / width) % rows, bg = idx / ((size_t)width * rows);  // bg = b·Hkv + g
    const int kt = j / attn::BC, r = j % attn::BC;
    const float* p = partial + ((size_t)bg * split.tiles + kt) * split.splits * attn::BC * width + (size_t)r * width + e;
    float sum = 0.f;
    for (int c = 0; c < split.splits; c++) sum += p[(size_t)c * attn::BC * width];
    const int b = bg / Hkv, g = bg % Hkv;
    if (e < d_qk) dk[(((size_t)b * T_ + j) * Hkv + g) * d_qk + e] = T(sum);
    else dv[(((size_t)b * T_ + j) * Hkv + g) * d_v + e - d_qk] = T(sum);
}

// dq (B, T, H, d_qk), written. Grid (ceil(T / 64), B·H): one block per 64-row query tile of one (b, h), 256
// threads, the forward's mapping. The block keeps its Q and dout tiles (and lse, D of its rows) and streams the
// key/value tiles the forward visits (0 .. diagonal, less those visible_kv_tile skips), recomputing
//   S = Q Kᵀ,  P = exp(S/√d_qk − lse) (masked),  dP = dout Vᵀ,  dS = P ⊙ (dP − D),  dq_i += Σ_j dS[i, j] k_j / √d_qk
// with dq in registers. dS passes through shared memory so the 16 threads of a row can read all its columns.
template <typename T, int DQK_MAX>
__global__ void __launch_bounds__(attn::THREADS)
    attention_backward_dq_kernel(T* dq, const T* dout, const float* lse, const float* D, const T* q, const T* k,
                                 const T* v, int T_, int H, int Hkv, int d_qk, int d_v, int window, int sink,
                                 float scale, float scale_log2) {
    using namespace attn;
    constexpr int CK = DQK_MAX / 16;
    extern __shared__ float smem[];
    const int ldq = padded(d_qk), ldv = padded(d_v);
    float* sQ = smem;            // (BR, ldq) this block's queries
    float* sO = sQ + BR * ldq;   // (BR, ldv) this block's dout rows
    float* sK = sO + BR * ldv;   // (BC, ldq) current key tile
    float* sV = sK + BC * ldq;   // (BC, ldv) current value tile
    float* sS = sV + BC * ldv;   // (BR, BC+1) dS of the current tile

    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * BR;
    const int b = blockIdx.y / H, h = blockIdx.y % H, g = h / (H / Hkv);

    load_tile(sQ, ldq, q, b, q0, BR, T_, H, h, d_qk);
    load_tile(sO, ldv, dout, b, q0, BR, T_, H, h, d_v);
    float L2[TM], Di[TM], acc[TM][CK];
#pragma unroll
    for (int a = 0; a < TM; a++) {
        const int i = q0 + ty + 16 * a;
        const size_t bhi = ((size_t)b * H + h) * T_ + i;
        L2[a] = i < T_ ? lse[bhi] * LOG2E : 0.f;
        Di[a] = i < T_ ? D[bhi] : 0.f;
#pragma unroll
        for (int c = 0; c < CK; c++) acc[a][c] = 0.f;
    }

    const int kv_end = min(T_, q0 + BR);
    for (int kv0 = visible_kv_tile(0, q0, window, sink); kv0 < kv_end;
         kv0 = visible_kv_tile(kv0 + BC, q0, window, sink)) {
        __syncthreads();  // done with the previous sK, sV, sS (and sQ, sO loaded, first time)
        load_tile(sK, ldq, k, b, kv0, BC, T_, Hkv, g, d_qk);
        load_tile(sV, ldv, v, b, kv0, BC, T_, Hkv, g, d_v);
        __syncthreads();

        float s[TM][TN] = {}, dp[TM][TN] = {};
#pragma unroll 4
        for (int d = 0; d < d_qk; d++) {
            float qa[TM], kc[TN];
#pragma unroll
            for (int a = 0; a < TM; a++) qa[a] = sQ[(ty + 16 * a) * ldq + d];
#pragma unroll
            for (int c = 0; c < TN; c++) kc[c] = sK[(tx + 16 * c) * ldq + d];
#pragma unroll
            for (int a = 0; a < TM; a++)
#pragma unroll
                for (int c = 0; c < TN; c++) s[a][c] = fmaf(qa[a], kc[c], s[a][c]);
        }
#pragma unroll 4
        for (int e = 0; e < d_v; e++) {
            float oa[TM], vc[TN];
#pragma unroll
            for (int a = 0; a < TM; a++) oa[a] = sO[(ty + 16 * a) * ldv + e];
#pragma unroll
            for (int c = 0; c < TN; c++) vc[c] = sV[(tx + 16 * c) * ldv + e];
#pragma unroll
            for (int a = 0; a < TM; a++)
#pragma unroll
                for (int c = 0; c < TN; c++) dp[a][c] = fmaf(oa[a], vc[c], dp[a][c]);
        }
#pragma unroll
        for (int a = 0; a < TM; a++) {
            const int i = q0 + ty + 16 * a;
#pragma unroll
            for (int c = 0; c < TN; c++) {
                const int j = kv0 + tx + 16 * c;
                const float p = (attn_visible(i, j, window, sink) && i < T_)
                                    ? exp2f(s[a][c] * scale_log2 - L2[a]) : 0.f;
                sS[(ty + 16 * a) * (BC + 1) + tx + 16 * c] = p * (dp[a][c] - Di[a]) * scale;
            }
        }
        __syncthreads();

        // dq_i += Σ_j dS[i, j] k_j (key rows past T are zero in sK and have dS = 0)
        for (int j = 0; j < BC; j++) {
            float sa[TM], kc[CK];
#pragma unroll
            for (int a = 0; a < TM; a++) sa[a] = sS[(ty + 16 * a) * (BC + 1) + j];
#pragma unroll
            for (int c = 0; c < CK; c++) {
                const int d = tx + 16 * c;
                kc[c] = d < d_qk ? sK[j * ldq + d] : 0.f;
            }
#pragma unroll
            for (int a = 0; a < TM; a++)
#pragma unroll
                for (int c = 0; c < CK; c++) acc[a][c] = fmaf(sa[a], kc[c], acc[a][c]);
        }
    }

#pragma unroll
    for (int a = 0; a < TM; a++) {
        const int i = q0 + ty + 16 * a;
        if (i >= T_) continue;
        T* dqi = dq + (((size_t)b * T_ + i) * H + h) * d_qk;
#pragma unroll
        for (int c = 0; c < CK; c++) {
            const int d = tx + 16 * c;
            if (d < d_qk) dqi[d] = T(acc[a][c]);
        }
    }
}

// Floats of attention_backward's scratch: D (B, H, T), then with a window, a sink and T > SINK_CHUNK·64 the sink key
// tiles' partial dk, dv (B, Hkv, tiles, splits, 64, d_qk + d_v) — a few times D at most for the paper's shapes.
inline size_t attention_backward_scratch_size(int B, int T_, int H, int Hkv, int d_qk, int d_v, int window = 0,
                                              int sink = 0) {
    const attn::SinkSplit split = attn::sink_split(T_, window, sink);
    return (size_t)B * H * T_ + (size_t)B * Hkv * split.tiles * split.splits * attn::BC * (d_qk + d_v);
}

// dq, dk, dv (shapes of q, k, v) are written — dk, dv summed over the query heads sharing each kv head.
// scratch (attention_backward_scratch_size floats) starts with D (B, H, T) = rowsum(dout ⊙ out). lse (B, H, T)
// and out are the forward's, made with the same window and sink.
template <typename T>
void attention_backward(T* dq, T* dk, T* dv, float* scratch, const T* dout, const T* out, const float* lse,
                        const T* q, const T* k, const T* v, int B, int T_, int H, int Hkv, int d_qk, int d_v,
                        int window = 0, int sink = 0, cudaStream_t stream = 0) {
    using namespace attn;
    attention_check_gpu(B, T_, H, Hkv, d_qk, d_v, window, sink);
    const float scale = 1.f / sqrtf((float)d_qk), scale_log2 = LOG2E * scale;

    const int rows = B * T_ * H, rows_per_block = THREADS / 32;
    float* scratch_D = scratch;
    attention_backward_D_kernel<<<ceil_div(rows, rows_per_block), THREADS, 0, stream>>>(scratch_D, dout, out, B, T_,
                                                                                         H, d_v);
    cudaCheckLast();

    const SinkSplit split = sink_split(T_, window, sink);
    if (attention_use_tc<T>(d_qk, d_v)) {  // bf16 operands: the tensor-core kernels (the tensor-core section above)
        const size_t smem_tc = attention_tc_smem_backward(d_qk);
        auto launch_tc = [&](auto kernel, dim3 grid, auto... args) {
            allow_smem(kernel, smem_tc);
            kernel<<<grid, attn_tc::THREADS, smem_tc, stream>>>(args...);
            cudaCheckLast();
        };
        const dim3 grid_kv(ceil_div(T_, BC), B * Hkv), grid_q(ceil_div(T_, BR), B * H);
        const bool d64 = d_qk == 64;
        if (split.tiles == 0)  // (the sink split stays with the kernel below)
            launch_tc(d64 ? attention_backward_dkdv_tc_kernel<T, 64> : attention_backward_dkdv_tc_kernel<T, 128>,
                      grid_kv, dk, dv, dout, lse, (const float*)scratch_D, q, k, v, T_, H, Hkv, window, sink, scale,
                      scale_log2);
        launch_tc(d64 ? attention_backward_dq_tc_kernel<T, 64> : attention_backward_dq_tc_kernel<T, 128>, grid_q, dq,
                  dout, lse, (const float*)scratch_D, q, k, v, T_, H, Hkv, window, sink, scale, scale_log2);
        if (split.tiles == 0) return;
        dq = nullptr;  // done: only dk, dv below
    }
    const size_t ldq = padded(d_qk), ldv = padded(d_v);
    const size_t smem_kv = sizeof(float) * ((BC + BR) * (ldq + ldv) + (size_t)BC * (BR + 1) + 2 * BR);
    // sink key tiles as split.splits chunks each, then the other key tiles one block each
    float* partial = scratch + (size_t)B * H * T_;
    const dim3 grid_kv(split.tiles * split.splits + ceil_div(T_, BC) - split.tiles, B * Hkv);
    auto launch_kv = [&](auto kernel) {
        allow_smem(kernel, smem_kv);
        kernel<<<grid_kv, THREADS, smem_kv, stream>>>(dk, dv, dout, lse, scratch_D, q, k, v, partial, T_, H, Hkv,
                                                      d_qk, d_v, window, sink, split, scale, scale_log2);
        cudaCheckLast();
    };
    const int bq = bucket(d_qk), bv = bucket(d_v);  // bq ∈ {64, 128} since d_qk ≤ 128
    if (bq == 64 && bv == 64) launch_kv(attention_backward_dkdv_kernel<T, 64, 64>);
    else if (bq == 64 && bv == 128) launch_kv(attention_backward_dkdv_kernel<T, 64, 128>);
    else if (bq == 64) launch_kv(attention_backward_dkdv_kernel<T, 64, 256>);
    else if (bv == 64) launch_kv(attention_backward_dkdv_kernel<T, 128, 64>);
    else if (bv == 128) launch_kv(attention_backward_dkdv_kernel<T, 128, 128>);
    else launch_kv(attention_backward_dkdv_kernel<T, 128, 256>);
    if (split.tiles > 0) {
        const size_t n = (size_t)B * Hkv * std::min(T_, split.tiles * BC) * (d_qk + d_v);
        attention_sink_reduce_kernel<<<(unsigned)((n + THREADS - 1) / THREADS), THREADS, 0, stream>>>(
            dk, dv, partial, B, T_, Hkv, d_qk, d_v, split);
        cudaCheckLast();
    }

    if (!dq) return;
    const size_t smem_q = sizeof(float) * ((BR + BC) * (ldq + ldv) + (size_t)BR * (BC + 1));
    const dim3 grid_q(ceil_div(T_, BR), B * H);
    auto launch_q = [&](auto kernel) {
        allow_smem(kernel, smem_q);
        kernel<<<grid_q, THREADS, smem_q, stream>>>(dq, dout, lse, scratch_D, q, k, v, T_, H, Hkv, d_qk, d_v, window,
                                                    sink, scale, scale_log2);
        cudaCheckLast();
    };
    if (bq == 64) launch_q(attention_backward_dq_kernel<T, 64>);
    else launch_q(attention_backward_dq_kernel<T, 128>);
}

// ---------------------------------------------------------------------------------------------------------
// 2. The attention mixer of block A and its reusable branch (mirrors section 2 of model/attention.h)
// ---------------------------------------------------------------------------------------------------------
// Same functions and arguments as the CPU's attn_branch_forward/backward and attn_mixer_forward/backward, on
// device pointers. Parameters are the CPU's AttnParams (attn_params on an Arena over a device buffer gives the
// same layout, so checkpoints are interchangeable). The activations differ from the CPU's AttnActs: the fused
// kernels above never store the (B, H, T, T) probabilities, they save lse (B, H, T) and need a D (B, H, T)
// scratch in the backward, hence GpuAttnActs. Every launch goes to `stream`; nothing is allocated.

// Saved activations and backward scratch of one attention mixer (or branch) for a (B, T) batch.
// T is the element type; the softmax statistics lse and D are fp32 whatever T is.
template <typename T>
struct GpuAttnActs {
    T* q = nullptr;          // (B, T, H, d_qk)   after Wq and RoPE
    T* k = nullptr;          // (B, T, Hkv, d_qk) after Wk and RoPE
    T* v = nullptr;          // (B, T, Hkv, d_v)  after Wv
    float* lse = nullptr;    // (B, H, T)         log-sum-exp of each query row's scores
    T* y = nullptr;          // (B, T, H·d_v)     core output = branch output
    // backward scratch
    T* dq = nullptr;         // (B, T, H, d_qk)
    T* dk = nullptr;         // (B, T, Hkv, d_qk)
    T* dv = nullptr;         // (B, T, Hkv, d_v)
    T* dy = nullptr;         // (B, T, H·d_v)     gradient of y (mixer backward only)
    T* dinp_part = nullptr;  // (B, T, D)         one projection's share of dinp, before it is added in
    float* D = nullptr;      // attention_backward's scratch: rowsum(dy ⊙ y) (B, H, T), then the sink split's
                             // partial sums (attention_backward_scratch_size)
};

// Lays out GpuAttnActs in an arena (counting when the arena has no base), as attn_acts does on the CPU.
// fp32 for now: element tensors and statistics come out of one float arena (the bf16 path will need a
// second arena for the fp32 statistics).
inline GpuAttnActs<float> gpu_attn_acts(Arena<float>& a, const AttnConfig& c, int B, int T_) {
    attn_config_check(c);
    HL_CHECK(B > 0 && T_ > 0, "attention activations (gpu): bad sizes B=", B, " T=", T_);
    const int D = c.d_model, H = c.n_heads, Hkv = c.n_kv_heads;
    GpuAttnActs<float> s;
    s.q = a.take("q", {B, T_, H, c.d_qk});
    s.k = a.take("k", {B, T_, Hkv, c.d_qk});
    s.v = a.take("v", {B, T_, Hkv, c.d_v});
    s.lse = a.take("lse", {B, H, T_});
    s.y = a.take("y", {B, T_, H * c.d_v});
    s.dq = a.take("dq", {B, T_, H, c.d_qk});
    s.dk = a.take("dk", {B, T_, Hkv, c.d_qk});
    s.dv = a.take("dv", {B, T_, Hkv, c.d_v});
    s.dy = a.take("dy", {B, T_, H * c.d_v});
    s.dinp_part = a.take("dinp_part", {B, T_, D});
    s.D = a.take("D", {(int)attention_backward_scratch_size(B, T_, H, Hkv, c.d_qk, c.d_v, c.window, c.sink)});
    return s;
}

// Branch: acts.y (B, T, H·d_v) = Attn(RoPE(Wq·inp), RoPE(Wk·inp), Wv·inp); no output projection.
// inp (B, T, D) is the normed residual stream. acts.q, k, v, lse, y are written (saved for the backward).
template <typename T>
void attn_branch_forward(GpuAttnActs<T>& acts, const T* inp, const AttnParams<T>& p, const AttnConfig& c, int B,
                         int T_, cudaStream_t stream = 0) {
    attn_config_check(c);
    const int N = B * T_, D = c.d_model, H = c.n_heads, Hkv = c.n_kv_heads;
    gpu::matmul_forward(acts.q, inp, p.wq, (const T*)nullptr, N, D, H * c.d_qk, stream);
    gpu::matmul_forward(acts.k, inp, p.wk, (const T*)nullptr, N, D, Hkv * c.d_qk, stream);
    gpu::matmul_forward(acts.v, inp, p.wv, (const T*)nullptr, N, D, Hkv * c.d_v, stream);
    // positions enter only through q and k: rotated in place, the rotated versions are what is saved
    gpu::rope_forward(acts.q, acts.q, B, T_, H, c.d_qk, c.rope_theta, 0, stream);
    gpu::rope_forward(acts.k, acts.k, B, T_, Hkv, c.d_qk, c.rope_theta, 0, stream);
    gpu::attention_forward(acts.y, acts.lse, acts.q, acts.k, acts.v, B, T_, H, Hkv, c.d_qk, c.d_v, c.window, c.sink,
                           stream);
}

// dy (B, T, H·d_v): gradient of acts.y. dv_extra (B, T, Hkv·d_v) or null: gradient reaching v from another
// consumer (value sharing in the intra-layer hybrid), added before the Wv backward.
// dinp (B, T, D) is written; dp.* accumulate (a null dp field skips that gradient).
// Uses acts.dq, dk, dv, D and dinp_part as scratch.
template <typename T>
void attn_branch_backward(T* dinp, AttnParams<T>& dp, const T* dy, const T* dv_extra, GpuAttnActs<T>& acts,
                          const T* inp, const AttnParams<T>& p, const AttnConfig& c, int B, int T_,
                          cudaStream_t stream = 0) {
    attn_config_check(c);
    const int N = B * T_, D = c.d_model, H = c.n_heads, Hkv = c.n_kv_heads;
    gpu::attention_backward(acts.dq, acts.dk, acts.dv, acts.D, dy, acts.y, acts.lse, acts.q, acts.k, acts.v, B, T_,
                            H, Hkv, c.d_qk, c.d_v, c.window, c.sink, stream);
    if (dv_extra) gpu::accumulate(acts.dv, dv_extra, (size_t)N * Hkv * c.d_v, stream);
    // undo the rotations: now dq, dk are gradients of the projections' outputs
    gpu::rope_backward(acts.dq, acts.dq, B, T_, H, c.d_qk, c.rope_theta, 0, stream);
    gpu::rope_backward(acts.dk, acts.dk, B, T_, Hkv, c.d_qk, c.rope_theta, 0, stream);
    // inp feeds three projections: the first input gradient goes straight into dinp, the other two pass
    // through dinp_part and are added (the CPU's order, so the sums round alike)
    const size_t nx = (size_t)N * D;
    gpu::matmul_backward(dinp, dp.wq, (T*)nullptr, acts.dq, inp, p.wq, N, D, H * c.d_qk, stream);
    gpu::matmul_backward(acts.dinp_part, dp.wk, (T*)nullptr, acts.dk, inp, p.wk, N, D, Hkv * c.d_qk, stream);
    gpu::accumulate(dinp, acts.dinp_part, nx, stream);
    gpu::matmul_backward(acts.dinp_part, dp.wv, (T*)nullptr, acts.dv, inp, p.wv, N, D, Hkv * c.d_v, stream);
    gpu::accumulate(dinp, acts.dinp_part, nx, stream);
}

// Full mixer: out (B, T, D) = Wo · branch(inp).
template <typename T>
void attn_mixer_forward(T* out, GpuAttnActs<T>& acts, const T* inp, const AttnParams<T>& p, const AttnConfig& c,
                        int B, int T_, cudaStream_t stream = 0) {
    HL_CHECK(p.wo != nullptr, "attention mixer (gpu): no output projection (params were made with with_wo = false)");
    gpu::attn_branch_forward(acts, inp, p, c, B, T_, stream);
    gpu::matmul_forward(out, acts.y, p.wo, (const T*)nullptr, B * T_, c.n_heads * c.d_v, c.d_model, stream);
}

// dinp (B, T, D) written; dp.* accumulate. Uses acts.dy as the gradient of the branch output.
template <typename T>
void attn_mixer_backward(T* dinp, AttnParams<T>& dp, const T* dout, GpuAttnActs<T>& acts, const T* inp,
                         const AttnParams<T>& p, const AttnConfig& c, int B, int T_, cudaStream_t stream = 0) {
    HL_CHECK(p.wo != nullptr, "attention mixer (gpu): no output projection (params were made with with_wo = false)");
    gpu::matmul_backward(acts.dy, dp.wo, (T*)nullptr, dout, acts.y, p.wo, B * T_, c.n_heads * c.d_v, c.d_model,
                         stream);
    gpu::attn_branch_backward(dinp, dp, acts.dy, (const T*)nullptr, acts, inp, p, c, B, T_, stream);
}

}  // namespace hl::gpu
