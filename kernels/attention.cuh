// attention.cuh — causal grouped-query softmax attention on the GPU, mirroring the core of model/attention.h
// (attention_forward / attention_backward), as a fused flash-style pair that never stores the (T, T) matrix:
//   forward : one pass over the key/value tiles with an online softmax; saves the per-row log-sum-exp
//             lse (B, H, T) instead of the probabilities `att` the CPU saves;
//   backward: D = rowsum(dout ⊙ out) by a small kernel, then P is recomputed tile by tile from q, k and lse.
// Notation as in the CPU reference: query head h reads kv head g = h / (H / Hkv); scores s = q·k / √d_qk;
// P = softmax over the visible keys: s ≤ t, and with a sliding window W > 0 and sink S also t − s < W or
// s < S (hl::attn_visible, the same function on the device). Two sets of kernels:
//   fp32 : plain FMA tiles in shared memory, any head dims below (the element type T of q, k, v, out and their
//          gradients is a template parameter, every value is converted to float on load);
//   bf16 operands (train_gpu --precision bf16, (d_qk, d_v) ∈ {(64, 64), (128, 128), (64, 128)}): tensor-core kernels in
//          FlashAttention-2's register-resident form, fp32 softmax and accumulation (the tensor-core section): on
//          an H100/H200 (sm_90a) with warpgroup products (wgmma, kernels/wgmma.cuh), elsewhere with mma.sync.
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
#include <cstdint>              // uintptr_t: alignment tests
#include <type_traits>          // std::is_same_v, std::integral_constant: the tensor-core kernels
#include <cuda_runtime.h>       // cudaStream_t, cudaFuncSetAttribute, dim3
#include "kernels/common.cuh"   // cudaCheck, cudaCheckLast, ceil_div, accumulate
#include "kernels/mma.cuh"      // mma::tile_abt, tile_ab, to_a, load_rows_async: the tensor-core kernels
#include "kernels/matmul.cuh"   // matmul_forward/backward, bf16_operand: the mixer's projections (section 2); bf16,
                                //   current_bf16, round_bf16: whether the tensor-core kernels run, and their
                                //   staging (the tensor-core section above); bf16_only_shape (gpu_attn_acts)
#include "kernels/rope.cuh"     // rope_forward/backward on q and k (section 2 below)
#include "kernels/wgmma.cuh"    // wgmma::mma_ss, mma_rs, load_rows_async, available: the sm_90a kernels
#include "model/attention.h"    // attn_visible, attn_block, attention_window_check; AttnConfig, AttnParams
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

// acc[a][c] += Σ_{e<n} X[ty + 16a, e] · Y[tx + 16c, e]: this thread's TM × TN entries of X·Yᵀ (a row of X against
// a row of Y), both row-major in shared memory (row strides ldx, ldy). The fp32 kernels' every score-like product.
__device__ inline void rows_dot(float (&acc)[TM][TN], const float* X, int ldx, const float* Y, int ldy, int n, int ty,
                                int tx) {
#pragma unroll 4
    for (int e = 0; e < n; e++) {
        float xa[TM], yc[TN];
#pragma unroll
        for (int a = 0; a < TM; a++) xa[a] = X[(ty + 16 * a) * ldx + e];
#pragma unroll
        for (int c = 0; c < TN; c++) yc[c] = Y[(tx + 16 * c) * ldy + e];
#pragma unroll
        for (int a = 0; a < TM; a++)
#pragma unroll
            for (int c = 0; c < TN; c++) acc[a][c] = fmaf(xa[a], yc[c], acc[a][c]);
    }
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
// and head dims they are compiled for (attention_tc_dims); the backward's key kernel only without a sink split, and
// with one block per query head (see attention_backward_dkdv_tc_kernel). The same loops over the
// same 64-key tiles (visible_kv_tile) and the same lse, but each warp owns 16 rows of the block's (128 queries in
// the forward, 64 in dq, 64 keys in dk, dv), every tile product runs on the tensor cores (mma.sync m16n8k16 through
// kernels/mma.cuh), and FlashAttention-2's register-resident form: a warp's scores come out of the product in
// registers, the softmax (or P and dS in the backward) is computed there, row statistics by two shuffles among
// the 4 lanes that share a row, and the result is turned straight into the next product's A operand (mma::to_a).
// Each warp asks attn_block (model/attention.h) of its 16 rows against the streamed tile: skipped, unmasked or
// masked.
// q, k, v and dout are rounded to bf16 once per call, into staging the caller provides (attention_tc_stage_size:
// Bf16Operands::stage), unless the caller gives them in bf16 already (AttnBf16In: the mixer's q and k as their GEMMs
// and RoPE wrote them, dout as Wo's backward wrote it), and the kernels stream their tiles from there (or from
// those) with cp.async into two shared-memory buffers:
// the next tile's copies fly while the current one is multiplied (in session 5's version each block rounded the
// fp32 tiles itself, synchronously: 0.93 ms forward, 4.38 ms forward + backward at B=8, T=2048, H=16, Hkv=4, d=64
// on an H200). P and dS are rounded to bf16 before they multiply v, q or k. Scores, the online softmax, lse and
// every accumulation stay fp32. (The first tensor-core version, on nvcuda::wmma with its opaque fragments, passed
// every score through shared memory; it is v4 of dev/cuda/attention.cu.)
namespace attn_tc {
// Rows a block owns, 16 a warp: 128 queries in the forward (8 warps), 64 queries (dq) or 64 keys (dk, dv) in the
// backward (4 warps: 128 rows were slower there, measured); and the tile streamed past them, 64 keys (forward, dq)
// or 64 queries (dk, dv).
constexpr int WARPS = 8, THREADS = 32 * WARPS, BQ = 16 * WARPS;
constexpr int BWD_WARPS = 4, BWD_THREADS = 32 * BWD_WARPS, BKV = 16 * BWD_WARPS;
constexpr int BS = 64;
static_assert(BQ % attn::BC == 0 && BKV % attn::BC == 0 && BS == attn::BC,
              "key tiles stay aligned with the fp32 kernels' 64-key tiles");

// bf16 tile rows: D + 8 elements (see kernels/mma.cuh: conflict-free ldmatrix, 16-byte aligned rows)
template <int D> __host__ __device__ constexpr int ldh() { return D + 8; }

// Row statistics of a lane's two rows: over the 4 lanes holding the same row (lanes differing in bits 0, 1).
__device__ inline float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ inline float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}
// 2^x by the SFU's approximation alone (relative error ~2^-22, far below the bf16 rounding P gets next; −∞ gives 0):
// exp2f without --use_fast_math adds range handling around it, a few instructions per score.
__device__ inline float exp2_approx(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
// f-reduction of row half r (0: the lane's row g, 1: row g + 8) of a warp's accumulator tiles (16 × N) over this
// lane's 2·N/8 entries, as a tree: dependency chains of log2 length, not N/4 (f associative and commutative). The
// online softmax's row max and sum: 3% of the forward at B=8, T=2048 (H200), from shorter waits on fixed-latency
// results.
// t[0 .. W) = f(t[n], t[n + W]), then the same at W/2, …, 1. One level a template instance: every loop has a constant
// count, so t stays in registers (at N = 128 a single loop over the levels was left rolled, t in local memory).
template <int W, int M, typename F>
__device__ inline void reduce_levels(float (&t)[M], F f) {
#pragma unroll
    for (int n = 0; n < W; n++) t[n] = f(t[n], t[n + W]);
    if constexpr (W > 1) reduce_levels<W / 2>(t, f);
}
template <int N, typename F>
__device__ inline float row_reduce(const float (&acc)[N / 8][4], int r, F f) {
    float t[N / 8];
#pragma unroll
    for (int n = 0; n < N / 8; n++) t[n] = f(acc[n][2 * r], acc[n][2 * r + 1]);
    reduce_levels<N / 16>(t, f);
    return t[0];
}
// One online-softmax step of the tensor-core forwards on a warp's score tile s (16 × BS, unscaled, masked to −∞):
// each of the lane's two rows gets its running max m (log2 units) raised to the tile's, its running sum share l
// rescaled by alpha = 2^(m_old − m_new) and then increased by the tile's, and s becomes P = 2^(s·scale_log2 − m) in
// place. The caller rescales O by alpha. Row sums from the fp32 P (FlashAttention's choice; summing the bf16 values
// P·V uses took two more instructions a pair).
template <int BS>
__device__ __forceinline__ void online_softmax_step(float (&s)[BS / 8][4], float (&m)[2], float (&l)[2],
                                                    float (&alpha)[2], float scale_log2) {
    float mx[2], m_use[2];
#pragma unroll
    for (int r = 0; r < 2; r++) mx[r] = row_reduce<BS>(s, r, [](float a, float b) { return fmaxf(a, b); });
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const float m_new = fmaxf(m[r], quad_max(mx[r]) * scale_log2);  // the scale is positive
        m_use[r] = m_new == -INFINITY ? 0.f : m_new;  // nothing visible yet: p = 0, not NaN
        alpha[r] = exp2_approx(m[r] - m_use[r]);
        m[r] = m_new;
        l[r] *= alpha[r];
    }
#pragma unroll
    for (int n = 0; n < BS / 8; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) s[n][e] = exp2_approx(fmaf(s[n][e], scale_log2, -m_use[e / 2]));
#pragma unroll
    for (int r = 0; r < 2; r++) l[r] += row_reduce<BS>(s, r, [](float a, float b) { return a + b; });
}
}  // namespace attn_tc

// Forward (as attention_forward_kernel, but 128 query rows a block): per key tile, S = Q Kᵀ (16 × 64 per warp) in
// registers, the online softmax on them (each lane keeps its two rows' running max and its share of their sums,
// the 4 shares added at the end), then O += P V with P as the A operand and O (16 × d_v per warp) in registers
// throughout. A warp whose rows all precede the tile skips it. The key/value tiles are double-buffered: the next
// visible tile's copies are issued before the current one is multiplied.
template <int DK, int DV, typename O>
__global__ void __launch_bounds__(attn_tc::THREADS, DV == 64 ? 2 : 1)  // d_v 64: two blocks an SM
    attention_forward_tc_kernel(O* out, float* lse, const bf16* q, const bf16* k, const bf16* v, int T_, int H,
                                int Hkv, int window, int sink, float scale_log2) {
    using namespace attn;
    using namespace attn_tc;
    constexpr int LDK = ldh<DK>(), LDV = ldh<DV>();
    extern __shared__ __align__(128) unsigned char smem_tc[];
    bf16* sQ = reinterpret_cast<bf16*>(smem_tc);  // (BQ, LDK)
    bf16* sK = sQ + BQ * LDK;                     // (2, BS, LDK) two buffers
    bf16* sV = sK + 2 * BS * LDK;                 // (2, BS, LDV)

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * BQ, qw = q0 + warp * 16;  // the block's and the warp's rows
    const int b = blockIdx.y / H, h = blockIdx.y % H, g = h / (H / Hkv);
    const int i0 = qw + lane / 4;  // this lane's rows: i0 and i0 + 8

    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};  // running max (log2 units); this lane's share of Σ
    float o[DV / 8][4];                                         // unnormalised output, rows i0, i0 + 8
    mma::zero(o);

    const int kv_end = min(T_, q0 + BQ);  // the diagonal tile is always visible: at least one tile
    const int kv_first = visible_kv_tile(0, q0, window, sink);
    int kv0 = kv_first;
    uint32_t qf[DK / 16][4];  // the warp's 16 query rows as A fragments, from the first tile on
    mma::load_rows_async<DK>(sQ, LDK, q, b, q0, BQ, T_, H, h);
    mma::load_rows_async<DK>(sK, LDK, k, b, kv0, BS, T_, Hkv, g);
    mma::load_rows_async<DV>(sV, LDV, v, b, kv0, BS, T_, Hkv, g);
    mma::cp_async_commit();
    for (int buf = 0; kv0 < kv_end; buf ^= 1) {
        const int next = visible_kv_tile(kv0 + BS, q0, window, sink);
        if (next < kv_end) {  // into the other buffer, last read in the previous iteration (before its end sync)
            mma::load_rows_async<DK>(sK + (buf ^ 1) * BS * LDK, LDK, k, b, next, BS, T_, Hkv, g);
            mma::load_rows_async<DV>(sV + (buf ^ 1) * BS * LDV, LDV, v, b, next, BS, T_, Hkv, g);
        }
        mma::cp_async_commit();
        mma::cp_async_wait<1>();  // everything but the copies just issued
        __syncthreads();
        if (kv0 == kv_first) mma::load_a<DK>(qf, sQ + warp * 16 * LDK, LDK);  // (q arrived with the first tile)
        const bf16 *tK = sK + buf * BS * LDK, *tV = sV + buf * BS * LDV;
        const AttnBlock vis = attn_block(qw, qw + 16, kv0, kv0 + BS, T_, window, sink);
        if (vis != AttnBlock::NONE) {
            float s[BS / 8][4];  // s[n][e]: row i0 + 8·(e / 2), key kv0 + 8n + 2·(lane % 4) + e % 2 (unscaled)
            mma::zero(s);
            mma::tile_abt<DK, BS>(s, qf, tK, LDK);
            if (vis == AttnBlock::SOME)  // masks only where the tile needs them
#pragma unroll
                for (int n = 0; n < BS / 8; n++)
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        const int i = i0 + 8 * (e / 2), j = kv0 + 8 * n + 2 * (lane % 4) + e % 2;
                        if (!(j < T_ && attn_visible(i, j, window, sink))) s[n][e] = -INFINITY;
                    }
            float alpha[2];
            online_softmax_step<BS>(s, m, l, alpha, scale_log2);
            uint32_t p[BS / 16][4];
            mma::to_a<BS>(p, s);  // P rounded to bf16 as it multiplies V
#pragma unroll
            for (int n = 0; n < DV / 8; n++) {
                o[n][0] *= alpha[0], o[n][1] *= alpha[0];
                o[n][2] *= alpha[1], o[n][3] *= alpha[1];
            }
            mma::tile_ab<BS, DV>(o, p, tV, LDV);
        }
        __syncthreads();  // this buffer is refilled next iteration
        kv0 = next;
    }
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
        l[r] = quad_sum(l[r]);
        inv[r] = l[r] > 0.f ? 1.f / l[r] : 0.f;
        const int i = i0 + 8 * r;
        if (i < T_ && lane % 4 == 0) lse[((size_t)b * H + h) * T_ + i] = m[r] * LN2 + logf(l[r]);
    }
    mma::store_rows<DV>(out, o, inv, b, qw, T_, H, h);
}

// The first 1024-byte-aligned address at or after p in shared memory (the swizzled tiles need it: wgmma.cuh).
__device__ inline bf16* align1024(unsigned char* p) {
    return reinterpret_cast<bf16*>(p + ((1024 - (mma::smem_addr(p) & 1023)) & 1023));
}

// Forward on sm_90a (wgmma): the blocks, tiles and online softmax of attention_forward_tc_kernel, with its two
// products per key tile as warpgroup products (kernels/wgmma.cuh). Warps 0-3 and 4-7 are two warpgroups of 64 query
// rows; each computes S = Q Kᵀ (64 × 64) with Q and K both read by the tensor cores from swizzled shared memory, and
// O += P V with P from registers and V from shared memory. A warpgroup's accumulators are its 4 warps' mma.sync
// tiles, so the masking and softmax code is the same.
// The products run asynchronously, so the softmax of tile j overlaps the product P_{j-1} V_{j-1} of the tile before
// (FlashAttention-3's intra-warpgroup pipelining): per tile, issue S_j = Q K_jᵀ, then O += P_{j-1} V_{j-1}; wait for
// S_j, exponentiate it; wait for the product, rescale O, and only then pack P_j (the registers of P_{j-1} are the
// product's operand until it is done). So a tile's V is read one iteration after its K, and the key/value tiles
// have three buffers: tile j + 2 is loaded into tile j − 1's once every warpgroup is done with it.
// Every iteration issues both products, unconditionally: ptxas serialises asynchronous products whose accumulators
// merge from two paths. So the first iteration multiplies P = 0 by its own V tile, and a warpgroup whose rows all
// precede a tile (the block's last tile, for the first warpgroup) computes it fully masked: P = 0 and its running
// max and sum unchanged (adding 0 changes no value).
template <int DK, int DV, typename O>
__global__ void __launch_bounds__(attn_tc::THREADS, DV == 64 ? 2 : 1)  // d_v 64: two blocks an SM
    attention_forward_wgmma_kernel(O* out, float* lse, const bf16* q, const bf16* k, const bf16* v, int T_, int H,
                                   int Hkv, int window, int sink, float scale_log2) {
    using namespace attn;
    using namespace attn_tc;
    constexpr int STAGES = 3;
    extern __shared__ __align__(128) unsigned char smem_tc[];
    bf16* sQ = align1024(smem_tc);     // (BQ, DK) swizzled
    bf16* sK = sQ + BQ * DK;           // (STAGES, BS, DK)
    bf16* sV = sK + STAGES * BS * DK;  // (STAGES, BS, DV)

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, wg = warp / 4;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * BQ, qg = q0 + 64 * wg, qw = q0 + warp * 16;  // block, group, warp
    const int b = blockIdx.y / H, h = blockIdx.y % H, g = h / (H / Hkv);
    const int i0 = qw + lane / 4;  // this lane's rows: i0 and i0 + 8

    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};  // running max (log2 units); this lane's share of Σ
    float o[DV / 8][4];                                         // unnormalised output, rows i0, i0 + 8
    mma::zero(o);
    float s[BS / 8][4];  // s[n][e]: row i0 + 8·(e / 2), key kv + 8n + 2·(lane % 4) + e % 2 (unscaled)
    uint32_t p[BS / 16][4] = {};  // P of the previous tile (stage pend), multiplied by its V this iteration
    int pend = 0;

    // descriptors of this warpgroup's Q rows and of the first key and value buffers (a stage further on: + its size)
    const uint64_t dQ = wgmma::desc_k(sQ + 64 * wg * 64), dK = wgmma::desc_k(sK), dV = wgmma::desc_mn<BS>(sV);
    constexpr uint64_t K_STAGE = BS * DK * sizeof(bf16) / 16, V_STAGE = BS * DV * sizeof(bf16) / 16;
    const wgmma::TileLoader<DK, BS, attn_tc::THREADS> load_k(Hkv);
    const wgmma::TileLoader<DV, BS, attn_tc::THREADS> load_v(Hkv);
    auto load_kv = [&](int kv, int stage) {
        const size_t row = ((size_t)b * T_ + kv) * Hkv + g;
        load_k.load(sK + stage * BS * DK, k + row * DK, T_ - kv);
        load_v.load(sV + stage * BS * DV, v + row * DV, T_ - kv);
    };
    auto multiply_pending = [&] {  // O += P V_pend
#pragma unroll
        for (int kk = 0; kk < BS / 16; kk++) wgmma::mma_rs<DV, 1>(o, p[kk], dV + pend * V_STAGE + wgmma::mn_step(kk), 1);
        wgmma::commit();
    };
    const int kv_end = min(T_, q0 + BQ);
    int kv = visible_kv_tile(0, q0, window, sink);              // tile j (the diagonal one at least exists)
    int kv_ahead = visible_kv_tile(kv + BS, q0, window, sink);  // tile j + 1
    wgmma::TileLoader<DK, BQ, attn_tc::THREADS>(H).load(sQ, q + (((size_t)b * T_ + q0) * H + h) * DK, T_ - q0);
    load_kv(kv, 0);
    mma::cp_async_commit();
    if (kv_ahead < kv_end) load_kv(kv_ahead, 1);
    mma::cp_async_commit();
    for (int stage = 0; kv < kv_end; stage = stage == STAGES - 1 ? 0 : stage + 1) {
        mma::cp_async_wait<1>();  // tile j is in (j + 1 may still be in flight)
        wgmma::fence_smem();      // written by cp.async; the products read through the async proxy
        __syncthreads();
        wgmma::fence();
#pragma unroll
        for (int kk = 0; kk < DK / 16; kk++)
            wgmma::mma_ss<BS, 0>(s, dQ + wgmma::k_step<BQ>(kk), dK + stage * K_STAGE + wgmma::k_step<BS>(kk), kk > 0);
        wgmma::commit();
        multiply_pending();
        wgmma::wait<1>();  // S_j, not the product behind it
        wgmma::fence_operand(s);
        const AttnBlock vis = attn_block(qg, qg + 64, kv, kv + BS, T_, window, sink);
        if (vis != AttnBlock::ALL)  // masks only where the tile needs them (NONE: all of it)
#pragma unroll
            for (int n = 0; n < BS / 8; n++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int i = i0 + 8 * (e / 2), j = kv + 8 * n + 2 * (lane % 4) + e % 2;
                    if (vis == AttnBlock::NONE || !(j < T_ && attn_visible(i, j, window, sink))) s[n][e] = -INFINITY;
                }
        float alpha[2];
        online_softmax_step<BS>(s, m, l, alpha, scale_log2);
        wgmma::fence_operand(s);  // the softmax stays here, overlapping the product, not sunk behind its wait
        wgmma::wait<0>();  // O += P_{j-1} V_{j-1} is done: O and p are free
        wgmma::fence_operand(o);
#pragma unroll
        for (int n = 0; n < DV / 8; n++) {
            o[n][0] *= alpha[0], o[n][1] *= alpha[0];
            o[n][2] *= alpha[1], o[n][3] *= alpha[1];
        }
        mma::to_a<BS>(p, s);  // P rounded to bf16 as it multiplies V
        pend = stage;
        __syncthreads();  // every warpgroup is done with tile j − 1's buffers: tile j + 2 goes there
        const int kv_next = kv_ahead < kv_end ? visible_kv_tile(kv_ahead + BS, q0, window, sink) : kv_end;
        if (kv_next < kv_end) load_kv(kv_next, stage == 0 ? STAGES - 1 : stage - 1);
        mma::cp_async_commit();
        kv = kv_ahead;
        kv_ahead = kv_next;
    }
    wgmma::fence();
    multiply_pending();
    wgmma::wait<0>();
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
        l[r] = quad_sum(l[r]);
        inv[r] = l[r] > 0.f ? 1.f / l[r] : 0.f;
        const int i = i0 + 8 * r;
        if (i < T_ && lane % 4 == 0) lse[((size_t)b * H + h) * T_ + i] = m[r] * LN2 + logf(l[r]);
    }
    mma::store_rows<DV>(out, o, inv, b, qw, T_, H, h);
}

// Forward on sm_90a, warp-specialised (FlashAttention-3's form; causal without a window). Persistent: one block an
// SM, each taking the (query tile, b, h) work items blockIdx.x, + gridDim.x, ... in order, longest first. Three
// warpgroups: the first loads, the other two multiply. One thread of the first issues every tile's copy by TMA
// (wgmma::load_box) as soon as its buffer is free, running ahead across work items (the next item's Q and first
// key tiles arrive while the current one ends); the rest of that warpgroup exits. Each of the other two owns 64 of
// an item's 128 query rows and runs attention_forward_wgmma_kernel's loop over 128-key tiles (twice as wide: half
// the waits per score, products of N = 128). The sides meet only at mbarriers: a buffer is full when its bytes
// have landed, empty when the 8 multiplying warps have arrived (K as soon as Sⱼ is computed, V once P V has read
// it, an iteration later). No __syncthreads and no cp.async address arithmetic in the loop, and no proxy fence (the
// TMA writes through the proxy the products read by). The two multiplying warpgroups take turns issuing their
// products (two named barriers, "ping-pong"), so that one's softmax runs while the other's products keep the
// tensor cores busy.
namespace attn_ws {
constexpr int BQ = 128, BS = 128, STAGES = 2, THREADS = 3 * 128;
// the block's mbarriers after the tiles: q full, q empty (two each), then k full, k empty, v full, v empty (STAGES each)
constexpr int BARRIERS = 4 + 4 * STAGES;
}  // namespace attn_ws

#ifdef HL_WGMMA
// Named barrier `id` (1, 2: 0 is __syncthreads') between 256 threads: 128 wait on it, 128 arrive without waiting.
__device__ inline void named_sync(int id) { asm volatile("bar.sync %0, 256;\n" ::"r"(id) : "memory"); }
__device__ inline void named_arrive(int id) { asm volatile("bar.arrive %0, 256;\n" ::"r"(id) : "memory"); }
#else
__device__ inline void named_sync(int) {}
__device__ inline void named_arrive(int) {}
#endif

template <int DK, int DV, typename O>
__global__ void __launch_bounds__(attn_ws::THREADS, 1)
    attention_forward_ws_kernel(O* out, float* lse, const __grid_constant__ CUtensorMap tm_q,
                                const __grid_constant__ CUtensorMap tm_k, const __grid_constant__ CUtensorMap tm_v,
                                int B, int T_, int H, int Hkv, float scale_log2) {
    using namespace attn;
    using namespace attn_tc;
    constexpr int BQ = attn_ws::BQ, BS = attn_ws::BS, ST = attn_ws::STAGES;
    extern __shared__ __align__(128) unsigned char smem_tc[];
    bf16* sQ = align1024(smem_tc);  // (2, BQ, DK) swizzled: two buffers, the next item's arriving during this one
    bf16* sK = sQ + 2 * BQ * DK;    // (ST, BS, DK)
    bf16* sV = sK + ST * BS * DK;   // (ST, BS, DV)
    uint64_t* q_full = reinterpret_cast<uint64_t*>(sV + ST * BS * DV);
    uint64_t *q_empty = q_full + 2, *k_full = q_full + 4, *k_empty = k_full + ST, *v_full = k_empty + ST,
             *v_empty = v_full + ST;

    const int n_qt = ceil_div(T_, BQ), n_items = n_qt * B * H;
    auto item = [&](int w, int& q0, int& b, int& h) {  // work item w: the longest query tiles first
        q0 = (n_qt - 1 - w / (B * H)) * BQ;
        b = w % (B * H) / H, h = w % H;
    };
    const int wg = threadIdx.x / 128;
    if (threadIdx.x == 0) {
        for (int s = 0; s < 2; s++)  // empties: one arrival a multiplying warp
            wgmma::bar_init(q_full + s, 1), wgmma::bar_init(q_empty + s, 8);
        for (int s = 0; s < ST; s++) {
            wgmma::bar_init(k_full + s, 1), wgmma::bar_init(v_full + s, 1);
            wgmma::bar_init(k_empty + s, 8), wgmma::bar_init(v_empty + s, 8);
        }
        wgmma::bar_init_fence();
    }
    __syncthreads();
    if (wg == 0) {  // the loading warpgroup
        wgmma::regs_dec<24>();
        if (threadIdx.x == 0) {
            int tg = 0;  // key tiles loaded so far (over all items): buffer tg % ST, its use (tg / ST)
            for (int w = blockIdx.x, it = 0; w < n_items; w += gridDim.x, it++) {
                int q0, b, h;
                item(w, q0, b, h);
                const int g = h / (H / Hkv), n_tiles = ceil_div(min(T_, q0 + BQ), BS);
                const int qb = it % 2;
                wgmma::bar_wait(q_empty + qb, ((it / 2) & 1) ^ 1);
                wgmma::bar_expect(q_full + qb, BQ * DK * sizeof(bf16));
                for (int c = 0; c < DK; c += 64)
                    wgmma::load_box(sQ + qb * BQ * DK + BQ * c, &tm_q, q_full + qb, h * DK + c, q0, b);
                for (int t = 0; t < n_tiles; t++, tg++) {
                    const int s = tg % ST;
                    const uint32_t free_parity = ((tg / ST) & 1) ^ 1;
                    wgmma::bar_wait(k_empty + s, free_parity);
                    wgmma::bar_expect(k_full + s, BS * DK * sizeof(bf16));
                    for (int c = 0; c < DK; c += 64)
                        wgmma::load_box(sK + s * BS * DK + BS * c, &tm_k, k_full + s, g * DK + c, t * BS, b);
                    wgmma::bar_wait(v_empty + s, free_parity);
                    wgmma::bar_expect(v_full + s, BS * DV * sizeof(bf16));
                    for (int c = 0; c < DV; c += 64)
                        wgmma::load_box(sV + s * BS * DV + BS * c, &tm_v, v_full + s, g * DV + c, t * BS, b);
                }
            }
        }
        return;
    }
    wgmma::regs_inc<240>();
    const int cw = wg - 1, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
    const uint64_t dQ = wgmma::desc_k(sQ + 64 * cw * 64), dK = wgmma::desc_k(sK), dV = wgmma::desc_mn<BS>(sV);
    constexpr uint64_t Q_BUF = BQ * DK * sizeof(bf16) / 16, K_STAGE = BS * DK * sizeof(bf16) / 16,
                       V_STAGE = BS * DV * sizeof(bf16) / 16;
    float o[DV / 8][4];   // unnormalised output, rows i0, i0 + 8
    float s[BS / 8][4];   // s[n][e]: row i0 + 8·(e / 2), key kv + 8n + 2·(lane % 4) + e % 2 (unscaled)
    uint32_t p[BS / 16][4];  // P of the previous tile, multiplied by its V this iteration (0 at an item's first)
    if (cw == 1) named_arrive(1);  // the first warpgroup issues first
    int tg = 0;
    for (int w = blockIdx.x, it = 0; w < n_items; w += gridDim.x, it++) {
        int q0, b, h;
        item(w, q0, b, h);
        const int n_tiles = ceil_div(min(T_, q0 + BQ), BS);
        const bool last_item = w + (int)gridDim.x >= n_items;
        const int qg = q0 + 64 * cw, qw = qg + 16 * warp, i0 = qw + lane / 4;  // group's, warp's rows; i0, i0 + 8
        float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};  // running max (log2 units); this lane's share of Σ
        mma::zero(o);
#pragma unroll
        for (int kk = 0; kk < BS / 16; kk++) p[kk][0] = p[kk][1] = p[kk][2] = p[kk][3] = 0u;
        int pend = tg % ST;  // the buffer of the V that p multiplies (the item's first: P = 0 by V₀)
        const int qb = it % 2;
        wgmma::bar_wait(q_full + qb, (it / 2) & 1);
        for (int t = 0; t < n_tiles; t++, tg++) {
            const int st = tg % ST, kv = t * BS;
            const uint32_t parity = (tg / ST) & 1;
            wgmma::bar_wait(k_full + st, parity);
            wgmma::bar_wait(v_full + pend, ((t == 0 ? tg : tg - 1) / ST) & 1);
            named_sync(1 + cw);  // this warpgroup's turn to issue
            wgmma::fence();
#pragma unroll
            for (int kk = 0; kk < DK / 16; kk++)
                wgmma::mma_ss<BS, 0>(s, dQ + qb * Q_BUF + wgmma::k_step<BQ>(kk), dK + st * K_STAGE + wgmma::k_step<BS>(kk),
                                     kk > 0);
            wgmma::commit();
#pragma unroll
            for (int kk = 0; kk < BS / 16; kk++)
                wgmma::mma_rs<DV, 1>(o, p[kk], dV + pend * V_STAGE + wgmma::mn_step(kk), 1);
            wgmma::commit();
            if (!(cw == 1 && last_item && t == n_tiles - 1)) named_arrive(2 - cw);  // the other's turn
            wgmma::wait<1>();  // Sⱼ, not the product behind it: Kⱼ's buffer is free
            wgmma::fence_operand(s);
            if (lane == 0) wgmma::bar_arrive(k_empty + st);
            const AttnBlock vis = attn_block(qg, qg + 64, kv, kv + BS, T_, 0, 0);
            if (vis != AttnBlock::ALL)
#pragma unroll
                for (int n = 0; n < BS / 8; n++)
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        const int i = i0 + 8 * (e / 2), j = kv + 8 * n + 2 * (lane % 4) + e % 2;
                        if (vis == AttnBlock::NONE || !(j < T_ && j <= i)) s[n][e] = -INFINITY;
                    }
            float alpha[2];
            online_softmax_step<BS>(s, m, l, alpha, scale_log2);
            wgmma::fence_operand(s);
            wgmma::wait<0>();  // O += P_{j-1} V_{j-1} is done: O, p and V_{j-1}'s buffer are free
            wgmma::fence_operand(o);
            if (t > 0 && lane == 0) wgmma::bar_arrive(v_empty + pend);
#pragma unroll
            for (int n = 0; n < DV / 8; n++) {
                o[n][0] *= alpha[0], o[n][1] *= alpha[0];
                o[n][2] *= alpha[1], o[n][3] *= alpha[1];
            }
            mma::to_a<BS>(p, s);
            pend = st;
        }
        if (lane == 0) wgmma::bar_arrive(q_empty + qb);  // every S of the item is computed: Q's buffer is free
        wgmma::bar_wait(v_full + pend, ((tg - 1) / ST) & 1);
        wgmma::fence();
#pragma unroll
        for (int kk = 0; kk < BS / 16; kk++) wgmma::mma_rs<DV, 1>(o, p[kk], dV + pend * V_STAGE + wgmma::mn_step(kk), 1);
        wgmma::commit();
        wgmma::wait<0>();
        wgmma::fence_operand(o);
        if (lane == 0) wgmma::bar_arrive(v_empty + pend);
        float inv[2];
#pragma unroll
        for (int r = 0; r < 2; r++) {
            l[r] = quad_sum(l[r]);
            inv[r] = l[r] > 0.f ? 1.f / l[r] : 0.f;
            const int i = i0 + 8 * r;
            if (i < T_ && lane % 4 == 0) lse[((size_t)b * H + h) * T_ + i] = m[r] * LN2 + logf(l[r]);
        }
        mma::store_rows<DV>(out, o, inv, b, qw, T_, H, h);
    }
}

// dk, dv (as attention_backward_dkdv_kernel, without the sink split, and one block per query head): a block owns 64
// keys (16 a warp) of kv head g and one query head h of its group, and loops over h's 64-row query tiles from the
// diagonal on. Per half query tile (32 queries, which bounds the live registers): Sᵀ = K Qᵀ and dPᵀ = V doutᵀ in
// registers, Pᵀ = exp(Sᵀ/√d − lse) and dSᵀ = Pᵀ ⊙ (dPᵀ − D) there, then dv += Pᵀ dout and dk += dSᵀ Q into
// accumulators that stay in registers over the whole loop. A warp whose keys all follow the half tile's queries
// skips it. The query tiles (q, dout, lse, D) are double-buffered as in the forward.
// Why a block per query head, not per group as the fp32 kernel: a group's heads in one block made the first key
// tiles' blocks group × longer than the average (a causal triangle of work), and the launch's tail was theirs
// (dk, dv 1.22 ms of a 2.6 ms forward + backward at B=4, T=2048, H=16, Hkv=4 under ncu; 0.73 ms a block per
// head, plus 0.03 ms for the sum). With group > 1 each block
// writes its head's share, dk_part (B, T, H, d_qk) and dv_part (B, T, H, d_v), which attention_group_sum_kernel adds up per kv head
// in a fixed order (deterministic); with group = 1 it writes dk, dv themselves (heads = H = Hkv).
// Head dims 64: 4 blocks an SM (ptxas then spills 20 bytes; 5% faster than the 3 that 163 registers allowed,
// measured).
template <int DK, int DV>
__global__ void __launch_bounds__(attn_tc::BWD_THREADS, DK == 64 && DV == 64 ? 4 : 1)
    attention_backward_dkdv_tc_kernel(float* dk_part, float* dv_part, const bf16* dout, const float* lse,
                                      const float* Dr, const bf16* q, const bf16* k, const bf16* v, int T_, int H,
                                      int Hkv, int window, int sink, float scale, float scale_log2) {
    using namespace attn;
    using namespace attn_tc;
    constexpr int LDK = ldh<DK>(), LDV = ldh<DV>(), QH = BS / 2;
    constexpr int TILE = BS * (LDK + LDV) + BS * 2 * sizeof(float) / sizeof(bf16);
    extern __shared__ __align__(128) unsigned char smem_tc[];
    bf16* sK = reinterpret_cast<bf16*>(smem_tc);  // (BKV, LDK) this block's keys
    bf16* sV = sK + BKV * LDK;                    // (BKV, LDV) and values
    bf16* sTiles = sV + BKV * LDV;  // two buffers of TILE: q (BS, LDK), dout (BS, LDV), lse (BS), D (BS)

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int kv0 = blockIdx.x * BKV, jw = kv0 + warp * 16, j0 = jw + lane / 4;  // this lane's keys: j0, j0 + 8
    const int b = blockIdx.y / H, h = blockIdx.y % H, g = h / (H / Hkv);
    float dk_acc[DK / 8][4], dv_acc[DV / 8][4];
    mma::zero(dk_acc);
    mma::zero(dv_acc);

    // the queries that see a key of [kv0, kv0 + BKV): from the diagonal up to T, or with a window (and no sink key
    // here) up to the last query that sees key kv0 + BKV − 1 through the window
    const long long w_end = (long long)kv0 + BKV + window - 1;
    const int q_end = (window <= 0 || kv0 < sink || w_end >= T_) ? T_ : (int)w_end;
    auto load_tile = [&](bf16* t, int q0) {  // query rows q0 .. q0 + BS − 1 of head h
        const size_t row0 = ((size_t)b * H + h) * T_ + q0;
        mma::load_rows_async<DK>(t, LDK, q, b, q0, BS, T_, H, h);
        mma::load_rows_async<DV>(t + BS * LDK, LDV, dout, b, q0, BS, T_, H, h);
        float* stats = reinterpret_cast<float*>(t + BS * (LDK + LDV));
        mma::load_floats_async(stats, lse + row0, BS, T_ - q0);
        mma::load_floats_async(stats + BS, Dr + row0, BS, T_ - q0);
    };
    mma::load_rows_async<DK>(sK, LDK, k, b, kv0, BKV, T_, Hkv, g);
    mma::load_rows_async<DV>(sV, LDV, v, b, kv0, BKV, T_, Hkv, g);
    load_tile(sTiles, kv0);
    mma::cp_async_commit();
    for (int q0 = kv0, buf = 0; q0 < q_end; q0 += BS, buf ^= 1) {
        if (q0 + BS < q_end) load_tile(sTiles + (buf ^ 1) * TILE, q0 + BS);
        mma::cp_async_commit();
        mma::cp_async_wait<1>();
        __syncthreads();
        const bf16 *sQ = sTiles + buf * TILE, *sO = sQ + BS * LDK;
        const float* sL = reinterpret_cast<const float*>(sO + BS * LDV);  // lse of the tile's rows
        const float* sD = sL + BS;                                         // D of the tile's rows
#pragma unroll
        for (int qh = 0; qh < BS; qh += QH) {
            const AttnBlock vis = attn_block(q0 + qh, q0 + qh + QH, jw, jw + 16, T_, window, sink);
            if (vis == AttnBlock::NONE) continue;
            // st[n][e], dpt[n][e]: key j0 + 8·(e / 2), query q0 + qh + 8n + 2·(lane % 4) + e % 2
            float st[QH / 8][4], dpt[QH / 8][4];
            mma::zero(st);
            mma::zero(dpt);
            // the warp's keys and values read from shared memory for every product: kept in registers as A
            // fragments (as q in the forward) they cost occupancy (179 registers instead of 137 at D = 64) and the
            // kernel was slower (measured)
            mma::tile_abt<DK, QH>(st, sK + warp * 16 * LDK, LDK, sQ + qh * LDK, LDK);
            mma::tile_abt<DV, QH>(dpt, sV + warp * 16 * LDV, LDV, sO + qh * LDV, LDV);
#pragma unroll
            for (int n = 0; n < QH / 8; n++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int c = qh + 8 * n + 2 * (lane % 4) + e % 2, i = q0 + c, j = j0 + 8 * (e / 2);
                    float p = exp2_approx(fmaf(st[n][e], scale_log2, -sL[c] * LOG2E));
                    if (vis == AttnBlock::SOME && !(i < T_ && j < T_ && attn_visible(i, j, window, sink))) p = 0.f;
                    st[n][e] = p;
                    dpt[n][e] = p * (dpt[n][e] - sD[c]);
                }
            uint32_t pt[QH / 16][4], dst[QH / 16][4];
            mma::to_a<QH>(pt, st);
            mma::to_a<QH>(dst, dpt);
            mma::tile_ab<QH, DV>(dv_acc, pt, sO + qh * LDV, LDV);
            mma::tile_ab<QH, DK>(dk_acc, dst, sQ + qh * LDK, LDK);
        }
        __syncthreads();  // this buffer is refilled next iteration
    }
    const float one[2] = {1.f, 1.f}, sc[2] = {scale, scale};
    mma::store_rows<DV>(dv_part, dv_acc, one, b, jw, T_, H, h);
    mma::store_rows<DK>(dk_part, dk_acc, sc, b, jw, T_, H, h);
}

// g (B, T, Hkv, d) = the sum of its query heads' shares part (B, T, H, d), head by head in order (dk or dv).
// One thread per four consecutive output elements (d is a multiple of 4 for the tensor-core head dims, and the
// tensors are 16-byte aligned: float4 accesses; one element a thread read them at 1.8 TB/s).
template <typename Unused = void>
__global__ void attention_group_sum_kernel(float* g, const float* part, size_t n, int H, int Hkv, int d) {
    const int group = H / Hkv;
    for (size_t i4 = blockIdx.x * (size_t)blockDim.x + threadIdx.x; 4 * i4 < n; i4 += (size_t)gridDim.x * blockDim.x) {
        const size_t idx = 4 * i4, bt = idx / ((size_t)Hkv * d);
        const int kv = (int)(idx / d % Hkv), e = (int)(idx % d);
        const size_t first = (bt * H + (size_t)kv * group) * d + e;  // head kv·group, elements e .. e + 3
        float4 sum = ld4(part + first, 0);
        for (int r = 1; r < group; r++)
            sum = map4(sum, ld4(part + first + (size_t)r * d, 0), [](float a, float b) { return a + b; });
        st4(g, i4, sum);
    }
}

// dq (as attention_backward_dq_kernel): a block owns 64 queries (16 a warp) and loops over the visible key tiles,
// half a tile (32 keys) at a time: S = Q Kᵀ and dP = dout Vᵀ in registers,
// dS = P ⊙ (dP − D) there, then dq += dS K into accumulators that stay in registers. A warp whose rows all precede
// the half tile skips it. The key/value tiles are double-buffered as in the forward.
template <int DK, int DV>
__global__ void __launch_bounds__(attn_tc::BWD_THREADS)
    attention_backward_dq_tc_kernel(float* dq, const bf16* dout, const float* lse, const float* Dr, const bf16* q,
                                    const bf16* k, const bf16* v, int T_, int H, int Hkv, int window, int sink,
                                    float scale, float scale_log2) {
    using namespace attn;
    using namespace attn_tc;
    constexpr int LDK = ldh<DK>(), LDV = ldh<DV>(), KH = BS / 2;
    extern __shared__ __align__(128) unsigned char smem_tc[];
    bf16* sQ = reinterpret_cast<bf16*>(smem_tc);  // (BKV, LDK) this block's queries
    bf16* sO = sQ + BKV * LDK;                    // (BKV, LDV) and dout rows
    bf16* sK = sO + BKV * LDV;                    // (2, BS, LDK) two buffers of key tiles
    bf16* sV = sK + 2 * BS * LDK;                 // (2, BS, LDV) and value tiles

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * BKV, qw = q0 + warp * 16, i0 = qw + lane / 4;  // rows i0, i0 + 8
    const int b = blockIdx.y / H, h = blockIdx.y % H, g = h / (H / Hkv);

    float L2[2], Di[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int i = i0 + 8 * r;
        const size_t bhi = ((size_t)b * H + h) * T_ + i;
        L2[r] = i < T_ ? lse[bhi] * LOG2E : 0.f;
        Di[r] = i < T_ ? Dr[bhi] : 0.f;
    }
    float dq_acc[DK / 8][4];
    mma::zero(dq_acc);

    const int kv_end = min(T_, q0 + BKV);
    const int kv_first = visible_kv_tile(0, q0, window, sink);
    int kv0 = kv_first;
    uint32_t qf[DK / 16][4], of[DV / 16][4];  // the warp's 16 query and dout rows as A fragments, from the first tile on
    mma::load_rows_async<DK>(sQ, LDK, q, b, q0, BKV, T_, H, h);
    mma::load_rows_async<DV>(sO, LDV, dout, b, q0, BKV, T_, H, h);
    mma::load_rows_async<DK>(sK, LDK, k, b, kv0, BS, T_, Hkv, g);
    mma::load_rows_async<DV>(sV, LDV, v, b, kv0, BS, T_, Hkv, g);
    mma::cp_async_commit();
    for (int buf = 0; kv0 < kv_end; buf ^= 1) {
        const int next = visible_kv_tile(kv0 + BS, q0, window, sink);
        if (next < kv_end) {
            mma::load_rows_async<DK>(sK + (buf ^ 1) * BS * LDK, LDK, k, b, next, BS, T_, Hkv, g);
            mma::load_rows_async<DV>(sV + (buf ^ 1) * BS * LDV, LDV, v, b, next, BS, T_, Hkv, g);
        }
        mma::cp_async_commit();
        mma::cp_async_wait<1>();
        __syncthreads();
        if (kv0 == kv_first) {  // (q and dout arrived with the first tile)
            mma::load_a<DK>(qf, sQ + warp * 16 * LDK, LDK);
            mma::load_a<DV>(of, sO + warp * 16 * LDV, LDV);
        }
        const bf16 *tK = sK + buf * BS * LDK, *tV = sV + buf * BS * LDV;
#pragma unroll
        for (int kh = 0; kh < BS; kh += KH) {
            const AttnBlock vis = attn_block(qw, qw + 16, kv0 + kh, kv0 + kh + KH, T_, window, sink);
            if (vis == AttnBlock::NONE) continue;
            // s[n][e], dp[n][e]: row i0 + 8·(e / 2), key kv0 + kh + 8n + 2·(lane % 4) + e % 2
            float s[KH / 8][4], dp[KH / 8][4];
            mma::zero(s);
            mma::zero(dp);
            mma::tile_abt<DK, KH>(s, qf, tK + kh * LDK, LDK);
            mma::tile_abt<DV, KH>(dp, of, tV + kh * LDV, LDV);
#pragma unroll
            for (int n = 0; n < KH / 8; n++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int i = i0 + 8 * (e / 2), j = kv0 + kh + 8 * n + 2 * (lane % 4) + e % 2;
                    float p = exp2_approx(fmaf(s[n][e], scale_log2, -L2[e / 2]));
                    if (vis == AttnBlock::SOME && !(i < T_ && j < T_ && attn_visible(i, j, window, sink))) p = 0.f;
                    dp[n][e] = p * (dp[n][e] - Di[e / 2]);
                }
            uint32_t ds[KH / 16][4];
            mma::to_a<KH>(ds, dp);
            mma::tile_ab<KH, DK>(dq_acc, ds, tK + kh * LDK, LDK);
        }
        __syncthreads();  // this buffer is refilled next iteration
        kv0 = next;
    }
    const float sc[2] = {scale, scale};
    mma::store_rows<DK>(dq, dq_acc, sc, b, qw, T_, H, h);
}

// dk, dv on sm_90a (wgmma): attention_backward_dkdv_tc_kernel's loops (a block is one warpgroup: 64 keys of kv head
// g), but a block takes the query tiles of every query head of g's group in turn, head by head, and sums dk, dv over
// them in its registers: it writes dk, dv (B, T, Hkv, ·) themselves (a fixed order: deterministic), where a block a
// query head wrote per-head shares for attention_group_sum_kernel (100m, GQA 4: 128 MB of fp32 shares written and
// read back, and the key tile loaded 4 times). Its four products per half query tile as warpgroup products:
// Sᵀ = K Qᵀ and dPᵀ = V doutᵀ with both operands in swizzled shared memory, then dv += Pᵀ dout and dk += dSᵀ Q with
// Pᵀ and dSᵀ from registers and the query tile's rows read MN-major. As in the forward, every product is issued for
// every half tile, a fully masked one too (P = 0: ptxas serialises asynchronous products behind branches), and P is
// exponentiated while dPᵀ is still being multiplied.
// dk16 (or null): dk and dv are written in bf16 instead, into the rows of ld16 elements at dk16 and dv16 (the qkv
// GEMM's dout), dk turned back by RoPE from its table rope (store_rows_unrope_bf16).
template <int DK, int DV>
__global__ void __launch_bounds__(attn_tc::BWD_THREADS, DK == 64 && DV == 64 ? 3 : 1)  // 4 spilled 256 bytes
    attention_backward_dkdv_wgmma_kernel(float* dk, float* dv, const bf16* dout, const float* lse,
                                         const float* Dr, const bf16* q, const bf16* k, const bf16* v, int T_, int H,
                                         int Hkv, int window, int sink, float scale, float scale_log2, bf16* dk16,
                                         bf16* dv16, size_t ld16, const float* rope) {
    using namespace attn;
    using namespace attn_tc;
    constexpr int QH = BS / 2;
    extern __shared__ __align__(128) unsigned char smem_tc[];
    bf16* sK = align1024(smem_tc);  // (BKV, DK) swizzled: this block's keys
    bf16* sV = sK + BKV * DK;       // (BKV, DV) and values
    bf16* sQ = sV + BKV * DV;       // (2, BS, DK) two buffers of query tiles
    bf16* sO = sQ + 2 * BS * DK;    // (2, BS, DV) and of dout tiles
    float* sStats = reinterpret_cast<float*>(sO + 2 * BS * DV);  // (2, 2, BS): each buffer's rows' lse, then D

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    // blockIdx.y: the key tile, blockIdx.x: (b, g) fastest, so that the longest blocks (the first key tiles, which
    // see every query tile after them) are launched first and the short ones fill the last wave
    const int kv0 = blockIdx.y * BKV, jw = kv0 + warp * 16, j0 = jw + lane / 4;  // this lane's keys: j0, j0 + 8
    const int b = blockIdx.x / Hkv, g = blockIdx.x % Hkv, group = H / Hkv;
    float dk_acc[DK / 8][4], dv_acc[DV / 8][4];
    mma::zero(dk_acc);
    mma::zero(dv_acc);
    float st[QH / 8][4], dpt[QH / 8][4];  // key j0 + 8·(e / 2), query q0 + qh + 8n + 2·(lane % 4) + e % 2

    const long long w_end = (long long)kv0 + BKV + window - 1;  // as the mma.sync kernel
    const int q_end = (window <= 0 || kv0 < sink || w_end >= T_) ? T_ : (int)w_end;
    const int n_q = ceil_div(q_end - kv0, BS), n_it = group * n_q;  // query tiles a head; iterations over the group
    const uint64_t dKa = wgmma::desc_k(sK), dVa = wgmma::desc_k(sV), dQk = wgmma::desc_k(sQ),
                   dOk = wgmma::desc_k(sO), dQm = wgmma::desc_mn<BS>(sQ), dOm = wgmma::desc_mn<BS>(sO);
    constexpr uint64_t Q_BUF = BS * DK * sizeof(bf16) / 16, O_BUF = BS * DV * sizeof(bf16) / 16;
    const wgmma::TileLoader<DK, BS, BWD_THREADS> load_q(H);
    const wgmma::TileLoader<DV, BS, BWD_THREADS> load_o(H);
    auto load_tile = [&](int buf, int it) {  // iteration it: query rows q0 .. q0 + BS − 1 of head h
        const int h = g * group + it / n_q, q0 = kv0 + it % n_q * BS;
        const size_t row = ((size_t)b * T_ + q0) * H + h, row0 = ((size_t)b * H + h) * T_ + q0;
        load_q.load(sQ + buf * BS * DK, q + row * DK, T_ - q0);
        load_o.load(sO + buf * BS * DV, dout + row * DV, T_ - q0);
        mma::load_floats_async(sStats + buf * 2 * BS, lse + row0, BS, T_ - q0);
        mma::load_floats_async(sStats + buf * 2 * BS + BS, Dr + row0, BS, T_ - q0);
    };
    const size_t row_kv = ((size_t)b * T_ + kv0) * Hkv + g;
    wgmma::TileLoader<DK, BKV, BWD_THREADS>(Hkv).load(sK, k + row_kv * DK, T_ - kv0);
    wgmma::TileLoader<DV, BKV, BWD_THREADS>(Hkv).load(sV, v + row_kv * DV, T_ - kv0);
    load_tile(0, 0);
    mma::cp_async_commit();
    for (int it = 0, buf = 0; it < n_it; it++, buf ^= 1) {
        const int q0 = kv0 + it % n_q * BS;
        if (it + 1 < n_it) load_tile(buf ^ 1, it + 1);
        mma::cp_async_commit();
        mma::cp_async_wait<1>();
        wgmma::fence_smem();
        __syncthreads();
        const float* sL = sStats + buf * 2 * BS;  // lse of the tile's rows
        const float* sD = sL + BS;                // D of the tile's rows
#pragma unroll
        for (int qh = 0; qh < BS; qh += QH) {
            const uint64_t qo = buf * Q_BUF + qh * 8, oo = buf * O_BUF + qh * 8;  // row qh: 128 bytes a row
            wgmma::fence();
#pragma unroll
            for (int kk = 0; kk < DK / 16; kk++)
                wgmma::mma_ss<QH, 0>(st, dKa + wgmma::k_step<BKV>(kk), dQk + qo + wgmma::k_step<BS>(kk), kk > 0);
            wgmma::commit();
#pragma unroll
            for (int kk = 0; kk < DV / 16; kk++)
                wgmma::mma_ss<QH, 0>(dpt, dVa + wgmma::k_step<BKV>(kk), dOk + oo + wgmma::k_step<BS>(kk), kk > 0);
            wgmma::commit();
            const AttnBlock vis = attn_block(q0 + qh, q0 + qh + QH, kv0, kv0 + BKV, T_, window, sink);
            wgmma::wait<1>();  // Sᵀ
            wgmma::fence_operand(st);
#pragma unroll
            for (int n = 0; n < QH / 8; n++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int c = qh + 8 * n + 2 * (lane % 4) + e % 2, i = q0 + c, j = j0 + 8 * (e / 2);
                    float p = exp2_approx(fmaf(st[n][e], scale_log2, -sL[c] * LOG2E));
                    if (vis != AttnBlock::ALL &&
                        (vis == AttnBlock::NONE || !(i < T_ && j < T_ && attn_visible(i, j, window, sink))))
                        p = 0.f;
                    st[n][e] = p;
                }
            wgmma::fence_operand(st);
            wgmma::wait<0>();  // dPᵀ
            wgmma::fence_operand(dpt);
#pragma unroll
            for (int n = 0; n < QH / 8; n++)
#pragma unroll
                for (int e = 0; e < 4; e++) dpt[n][e] = st[n][e] * (dpt[n][e] - sD[qh + 8 * n + 2 * (lane % 4) + e % 2]);
            uint32_t pt[QH / 16][4], dst[QH / 16][4];
            mma::to_a<QH>(pt, st);
            mma::to_a<QH>(dst, dpt);
            wgmma::fence();
#pragma unroll
            for (int kk = 0; kk < QH / 16; kk++) wgmma::mma_rs<DV, 1>(dv_acc, pt[kk], dOm + oo + wgmma::mn_step(kk), 1);
#pragma unroll
            for (int kk = 0; kk < QH / 16; kk++) wgmma::mma_rs<DK, 1>(dk_acc, dst[kk], dQm + qo + wgmma::mn_step(kk), 1);
            wgmma::commit();
            wgmma::wait<0>();  // pt, dst are free again
            wgmma::fence_operand(dv_acc);
            wgmma::fence_operand(dk_acc);
        }
        __syncthreads();  // this buffer is refilled next iteration
    }
    const float one[2] = {1.f, 1.f}, sc[2] = {scale, scale};
    if (dk16) {
        mma::store_rows_ld<DV>(dv16, ld16, dv_acc, one, b, jw, T_, g);
        mma::store_rows_unrope_bf16<DK>(dk16, ld16, dk_acc, scale, b, jw, T_, g, rope);
        return;
    }
    mma::store_rows<DV>(dv, dv_acc, one, b, jw, T_, Hkv, g);
    mma::store_rows<DK>(dk, dk_acc, sc, b, jw, T_, Hkv, g);
}

// dq on sm_90a (wgmma): attention_backward_dq_tc_kernel's blocks and loops (a block is one warpgroup: 64 queries),
// its three products per half key tile as warpgroup products: S = Q Kᵀ and dP = dout Vᵀ with the block's own q and
// dout rows and the streamed tiles all in swizzled shared memory, then dq += dS K with dS from registers and the key
// tile read MN-major. Every product issued for every half tile, as above. dq16 (or null): dq written in bf16
// instead, turned back by RoPE, as the dk, dv kernel's dk16.
template <int DK, int DV>
__global__ void __launch_bounds__(attn_tc::BWD_THREADS, DK == 64 && DV == 64 ? 4 : 1)
    attention_backward_dq_wgmma_kernel(float* dq, const bf16* dout, const float* lse, const float* Dr, const bf16* q,
                                       const bf16* k, const bf16* v, int T_, int H, int Hkv, int window, int sink,
                                       float scale, float scale_log2, bf16* dq16, size_t ld16, const float* rope) {
    using namespace attn;
    using namespace attn_tc;
    constexpr int KH = BS / 2;
    extern __shared__ __align__(128) unsigned char smem_tc[];
    bf16* sQ = align1024(smem_tc);  // (BKV, DK) swizzled: this block's queries
    bf16* sO = sQ + BKV * DK;       // (BKV, DV) and dout rows
    bf16* sK = sO + BKV * DV;       // (2, BS, DK) two buffers of key tiles
    bf16* sV = sK + 2 * BS * DK;    // (2, BS, DV) and value tiles

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    // blockIdx.y: the query tile, last first; blockIdx.x: (b, h) fastest: the longest blocks (the last query tiles,
    // which see every key tile before them) are launched first, the short ones fill the last wave
    const int q0 = (gridDim.y - 1 - blockIdx.y) * BKV, qw = q0 + warp * 16, i0 = qw + lane / 4;  // rows i0, i0 + 8
    const int b = blockIdx.x / H, h = blockIdx.x % H, g = h / (H / Hkv);
    float L2[2], Di[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int i = i0 + 8 * r;
        const size_t bhi = ((size_t)b * H + h) * T_ + i;
        L2[r] = i < T_ ? lse[bhi] * LOG2E : 0.f;
        Di[r] = i < T_ ? Dr[bhi] : 0.f;
    }
    float dq_acc[DK / 8][4];
    mma::zero(dq_acc);
    float s[KH / 8][4], dp[KH / 8][4];  // row i0 + 8·(e / 2), key kv0 + kh + 8n + 2·(lane % 4) + e % 2

    const uint64_t dQa = wgmma::desc_k(sQ), dOa = wgmma::desc_k(sO), dKk = wgmma::desc_k(sK),
                   dVk = wgmma::desc_k(sV), dKm = wgmma::desc_mn<BS>(sK);
    constexpr uint64_t K_BUF = BS * DK * sizeof(bf16) / 16, V_BUF = BS * DV * sizeof(bf16) / 16;
    const wgmma::TileLoader<DK, BS, BWD_THREADS> load_k(Hkv);
    const wgmma::TileLoader<DV, BS, BWD_THREADS> load_v(Hkv);
    auto load_kv = [&](int buf, int kv) {
        const size_t row = ((size_t)b * T_ + kv) * Hkv + g;
        load_k.load(sK + buf * BS * DK, k + row * DK, T_ - kv);
        load_v.load(sV + buf * BS * DV, v + row * DV, T_ - kv);
    };
    const int kv_end = min(T_, q0 + BKV);
    int kv0 = visible_kv_tile(0, q0, window, sink);
    const size_t row_q = ((size_t)b * T_ + q0) * H + h;
    wgmma::TileLoader<DK, BKV, BWD_THREADS>(H).load(sQ, q + row_q * DK, T_ - q0);
    wgmma::TileLoader<DV, BKV, BWD_THREADS>(H).load(sO, dout + row_q * DV, T_ - q0);
    load_kv(0, kv0);
    mma::cp_async_commit();
    for (int buf = 0; kv0 < kv_end; buf ^= 1) {
        const int next = visible_kv_tile(kv0 + BS, q0, window, sink);
        if (next < kv_end) load_kv(buf ^ 1, next);
        mma::cp_async_commit();
        mma::cp_async_wait<1>();
        wgmma::fence_smem();
        __syncthreads();
#pragma unroll
        for (int kh = 0; kh < BS; kh += KH) {
            const uint64_t ko = buf * K_BUF + kh * 8, vo = buf * V_BUF + kh * 8;  // key row kh: 128 bytes a row
            wgmma::fence();
#pragma unroll
            for (int kk = 0; kk < DK / 16; kk++)
                wgmma::mma_ss<KH, 0>(s, dQa + wgmma::k_step<BKV>(kk), dKk + ko + wgmma::k_step<BS>(kk), kk > 0);
            wgmma::commit();
#pragma unroll
            for (int kk = 0; kk < DV / 16; kk++)
                wgmma::mma_ss<KH, 0>(dp, dOa + wgmma::k_step<BKV>(kk), dVk + vo + wgmma::k_step<BS>(kk), kk > 0);
            wgmma::commit();
            const AttnBlock vis = attn_block(q0, q0 + BKV, kv0 + kh, kv0 + kh + KH, T_, window, sink);
            wgmma::wait<1>();  // S
            wgmma::fence_operand(s);
#pragma unroll
            for (int n = 0; n < KH / 8; n++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int i = i0 + 8 * (e / 2), j = kv0 + kh + 8 * n + 2 * (lane % 4) + e % 2;
                    float p = exp2_approx(fmaf(s[n][e], scale_log2, -L2[e / 2]));
                    if (vis != AttnBlock::ALL &&
                        (vis == AttnBlock::NONE || !(i < T_ && j < T_ && attn_visible(i, j, window, sink))))
                        p = 0.f;
                    s[n][e] = p;
                }
            wgmma::fence_operand(s);
            wgmma::wait<0>();  // dP
            wgmma::fence_operand(dp);
#pragma unroll
            for (int n = 0; n < KH / 8; n++)
#pragma unroll
                for (int e = 0; e < 4; e++) dp[n][e] = s[n][e] * (dp[n][e] - Di[e / 2]);
            uint32_t ds[KH / 16][4];
            mma::to_a<KH>(ds, dp);
            wgmma::fence();
#pragma unroll
            for (int kk = 0; kk < KH / 16; kk++) wgmma::mma_rs<DK, 1>(dq_acc, ds[kk], dKm + ko + wgmma::mn_step(kk), 1);
            wgmma::commit();
            wgmma::wait<0>();  // ds is free again
            wgmma::fence_operand(dq_acc);
        }
        __syncthreads();  // this buffer is refilled next iteration
        kv0 = next;
    }
    if (dq16) {
        mma::store_rows_unrope_bf16<DK>(dq16, ld16, dq_acc, scale, b, qw, T_, h, rope);
        return;
    }
    const float sc[2] = {scale, scale};
    mma::store_rows<DK>(dq, dq_acc, sc, b, qw, T_, H, h);
}

// The head dims the tensor-core kernels are compiled for: (d_qk, d_v) = (64, 64) and (128, 128), the models'
// attention heads, and (64, 128), the 100m and 350m intra-layer hybrids' heads.
inline bool attention_tc_dims(int d_qk, int d_v) {
    return (d_qk == 64 || d_qk == 128) && (d_v == 64 || d_v == 128) && d_qk <= d_v;
}
// f(DK, DV) with the compiled head dims as std::integral_constant (attention_tc_dims(d_qk, d_v) holds).
template <typename F>
inline void attention_tc_dispatch(int d_qk, int d_v, F f) {
    if (d_qk == 64 && d_v == 64) f(std::integral_constant<int, 64>{}, std::integral_constant<int, 64>{});
    else if (d_qk == 64) f(std::integral_constant<int, 64>{}, std::integral_constant<int, 128>{});
    else f(std::integral_constant<int, 128>{}, std::integral_constant<int, 128>{});
}
// Whether the tensor-core kernels take this call: bf16 operands in effect (a Bf16Scope), fp32 tensors, and head dims
// they are compiled for.
template <typename T>
inline bool attention_use_tc(int d_qk, int d_v) {
    return std::is_same_v<T, float> && current_bf16() != nullptr && attention_tc_dims(d_qk, d_v);
}

// Shared memory of the tensor-core kernels: bf16 tiles (the owned rows, and two buffers of the streamed tiles: k and
// v in the forward and dq; q and dout in dk, dv, with their rows' lse and D, 2·BS floats a buffer).
inline size_t attention_tc_smem_forward(int d_qk, int d_v) {
    using namespace attn_tc;
    return sizeof(bf16) * ((size_t)(BQ + 2 * BS) * (d_qk + 8) + (size_t)2 * BS * (d_v + 8));
}
// The sm_90a kernels' swizzled tiles (no padding; three buffers of the streamed tiles), plus 1 KB to align them to
// 1024 bytes.
inline size_t attention_wgmma_smem_forward(int d_qk, int d_v) {
    using namespace attn_tc;
    return sizeof(bf16) * ((size_t)(BQ + 3 * BS) * d_qk + (size_t)3 * BS * d_v) + 1024;
}
// The warp-specialised forward's: two query tiles, STAGES buffers of key and value tiles, its mbarriers, 1 KB to align.
inline size_t attention_ws_smem_forward(int d_qk, int d_v) {
    using namespace attn_ws;
    return sizeof(bf16) * ((size_t)2 * BQ * d_qk + (size_t)STAGES * BS * (d_qk + d_v)) + 8 * BARRIERS + 1024;
}
// Whether the causal forward without a window takes the warp-specialised kernel (on where the wgmma kernels run;
// dev/cuda/attention.cu's v6 switches it off to time the kernel before it).
inline bool attention_ws_on = true;
// Whether the tensor-core paths take the sm_90a (wgmma) kernels: where the device code has them
// (wgmma::available). On by default; the tests and dev/cuda/attention.cu switch it off to run the mma.sync kernels
// on the same device.
inline bool attention_wgmma_on = true;
inline bool attention_use_wgmma() { return attention_wgmma_on && wgmma::available(); }
inline size_t attention_tc_smem_backward(int d_qk, int d_v) {  // both kernels
    using namespace attn_tc;
    return sizeof(bf16) * (size_t)(BKV + 2 * BS) * (d_qk + 8 + d_v + 8) + sizeof(float) * 4 * BS;
}
inline size_t attention_wgmma_smem_backward(int d_qk, int d_v) {  // both sm_90a kernels
    using namespace attn_tc;
    return sizeof(bf16) * (size_t)(BKV + 2 * BS) * (d_qk + d_v) + sizeof(float) * 4 * BS + 1024;
}

// bf16 values of staging the tensor-core kernels need (Bf16Operands::stage, owned by the caller; 0 where the
// fp32 kernels run): q, k, v and dout are rounded into it once per call, so that every tile the kernels stream is
// already bf16 and 16-byte rows, copied asynchronously (cp.async), and is not re-rounded by every block that
// reads it; with GQA (H > Hkv) it also holds the mma.sync backward's per-query-head dk, dv shares (fp32, two bf16
// slots each), unless shares is false: the wgmma dk, dv kernel sums a kv head's group in its registers and takes
// none (a model sizes its staging for the family it runs, attention_use_wgmma(): 134 MB less at 100m, B 8, T 2048).
// Rewritten by every call: one buffer serves all the layers of a model.
inline size_t attention_tc_stage_size(int B, int T_, int H, int Hkv, int d_qk, int d_v, bool shares = true) {
    if (!attention_tc_dims(d_qk, d_v)) return 0;
    const size_t n = (size_t)B * T_;
    return n * (H + Hkv) * (d_qk + d_v)                                 // q, k, v, dout
           + (shares && H > Hkv ? 2 * n * H * (d_qk + d_v) : 0);        // dk_part, dv_part (B, T, H, d_qk | d_v) floats
}
inline bf16* attention_tc_stage(size_t need) {
    const Bf16Operands* ops = current_bf16();
    HL_CHECK(ops->stage != nullptr && need <= ops->stage_n, "attention (bf16 operands): ", need,
             " bf16 values of staging needed (attention_tc_stage_size), Bf16Operands::stage holds ", ops->stage_n);
    HL_CHECK(reinterpret_cast<uintptr_t>(ops->stage) % 16 == 0, "attention (bf16 operands): staging not 16-byte aligned");
    return ops->stage;
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
        rows_dot(s, sQ, ldq, sK, ldq, d_qk, ty, tx);

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

// Inputs of the tensor-core kernels that the caller already holds in bf16 (their producers wrote them so): they are
// read as given, and not rounded into the staging. Null fields are taken from the fp32 arguments as before. Only
// where every kernel of the call is a tensor-core one (attention_bf16_inputs: the sink split's dk, dv kernel reads
// fp32 q, k and dout).
struct AttnBf16In {
    const bf16* q = nullptr;     // (B, T, H, d_qk)
    const bf16* k = nullptr;     // (B, T, Hkv, d_qk)
    const bf16* dout = nullptr;  // (B, T, H, d_v)  backward only
    const bf16* v = nullptr;     // (B, T, Hkv, d_v)
};

// The backward's gradients in bf16, for a caller whose only use of them is as one GEMM's dout (the attention branch
// under bf16 operands, wq, wk, wv packed): dq, dk, dv (B·T rows of ld elements, at their columns of the qkv GEMM's
// dout), dq and dk turned back by RoPE (rope: rope_table's, of this T and d_qk, position 0 first).
struct AttnGrad16 {
    bf16* dq = nullptr;
    bf16* dk = nullptr;
    bf16* dv = nullptr;
    size_t ld = 0;
    const float* rope = nullptr;
};

// Whether attention_forward/backward at these sizes take AttnBf16In: the tensor-core kernels do every product.
template <typename T>
bool attention_bf16_inputs(int T_, int d_qk, int d_v, int window, int sink) {
    return attention_use_tc<T>(d_qk, d_v) && attn::sink_split(T_, window, sink).tiles == 0;
}

// out (B, T, H, d_v) and lse (B, H, T) are written; lse[b, h, t] = log Σ_{visible s} exp(q_t·k_s / √d_qk), what
// the backward needs to recompute the probabilities. window = 0: full causal; else window W, sink S.
template <typename T>
void attention_forward(T* out, float* lse, const T* q, const T* k, const T* v, int B, int T_, int H, int Hkv,
                       int d_qk, int d_v, int window = 0, int sink = 0, cudaStream_t stream = 0, bf16* out16 = nullptr,
                       AttnBf16In in16 = {}) {
    using namespace attn;
    attention_check_gpu(B, T_, H, Hkv, d_qk, d_v, window, sink);
    HL_CHECK(out16 == nullptr || attention_use_tc<T>(d_qk, d_v),
             "attention: a bf16 output (out16) needs the tensor-core kernels (bf16 operands, compiled head dims)");
    HL_CHECK((in16.q == nullptr && in16.k == nullptr && in16.v == nullptr) ||
                 attention_bf16_inputs<T>(T_, d_qk, d_v, window, sink),
             "attention: bf16 inputs (in16) need the tensor-core kernels for every product");
    const float scale_log2 = LOG2E / sqrtf((float)d_qk);
    const dim3 grid(ceil_div(T_, BR), B * H);
    if constexpr (std::is_same_v<T, float>) {
        if (attention_use_tc<T>(d_qk, d_v)) {  // bf16 operands: the tensor-core kernel (the tensor-core section)
            const size_t nq = (size_t)B * T_ * H * d_qk, nk = (size_t)B * T_ * Hkv * d_qk,
                         nv = (size_t)B * T_ * Hkv * d_v;
            bf16* q16 = attention_tc_stage(nq + nk + nv);
            bf16 *k16 = q16 + nq, *v16 = k16 + nk;
            if (in16.q) q16 = const_cast<bf16*>(in16.q);  // (only read from here on)
            else round_bf16(q16, q, nq, stream);
            if (in16.k) k16 = const_cast<bf16*>(in16.k);
            else round_bf16(k16, k, nk, stream);
            if (in16.v) v16 = const_cast<bf16*>(in16.v);
            else round_bf16(v16, v, nv, stream);
            size_t smem_tc = attention_tc_smem_forward(d_qk, d_v);
            const dim3 grid_tc(ceil_div(T_, attn_tc::BQ), B * H);
            attention_tc_dispatch(d_qk, d_v, [&](auto dk_, auto dv_) {
                auto launch_tc = [&](auto kernel, auto* o) {
                    allow_smem(kernel, smem_tc);
                    kernel<<<grid_tc, attn_tc::THREADS, smem_tc, stream>>>(o, lse, q16, k16, v16, T_, H, Hkv, window,
                                                                            sink, scale_log2);
                    cudaCheckLast();
                };
                constexpr int DK = decltype(dk_)::value, DV = decltype(dv_)::value;
                if (attention_use_wgmma() && attention_ws_on && window == 0) {
                    const CUtensorMap tq = wgmma::tensor_map_rows(q16, B, T_, H, DK, attn_ws::BQ),
                                      tk = wgmma::tensor_map_rows(k16, B, T_, Hkv, DK, attn_ws::BS),
                                      tv = wgmma::tensor_map_rows(v16, B, T_, Hkv, DV, attn_ws::BS);
                    const size_t smem_ws = attention_ws_smem_forward(d_qk, d_v);
                    const int items = ceil_div(T_, attn_ws::BQ) * B * H;  // persistent: one block an SM
                    auto launch_ws = [&](auto kernel, auto* o) {
                        allow_smem(kernel, smem_ws);
                        kernel<<<std::min(items, sm_count()), attn_ws::THREADS, smem_ws, stream>>>(
                            o, lse, tq, tk, tv, B, T_, H, Hkv, scale_log2);
                        cudaCheckLast();
                    };
                    if (out16) launch_ws(attention_forward_ws_kernel<DK, DV, bf16>, out16);
                    else launch_ws(attention_forward_ws_kernel<DK, DV, float>, out);
                } else if (attention_use_wgmma()) {
                    smem_tc = attention_wgmma_smem_forward(d_qk, d_v);
                    if (out16) launch_tc(attention_forward_wgmma_kernel<DK, DV, bf16>, out16);
                    else launch_tc(attention_forward_wgmma_kernel<DK, DV, float>, out);
                } else if (out16) launch_tc(attention_forward_tc_kernel<DK, DV, bf16>, out16);
                else launch_tc(attention_forward_tc_kernel<DK, DV, float>, out);
            });
            return;
        }
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
// dout16, when given, receives dout rounded to bf16 (the tensor-core kernels' copy, made in the same pass). pairs:
// lanes take two consecutive elements at a time (float2 / bf16x2 accesses).
template <typename T, typename O>
__global__ void attention_backward_D_kernel(float* D, bf16* dout16, const T* dout, const O* out, int B, int T_, int H,
                                            int d_v, bool pairs) {
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;  // (b·T + t)·H + h
    const int lane = threadIdx.x % 32;
    if (row >= B * T_ * H) return;  // whole warps leave together
    const O* o = out + (size_t)row * d_v;
    const T* go = dout + (size_t)row * d_v;
    float sum = 0.f;
    if (pairs) {  // two elements a lane per access (one 4-byte access a lane left the kernel at 1.6 TB/s)
        for (int e = 2 * lane; e < d_v; e += 64) {
            const float2 g = ld2(go + e), v = ld2(o + e);
            sum = fmaf(g.y, v.y, fmaf(g.x, v.x, sum));
            if (dout16)
                *reinterpret_cast<__nv_bfloat162*>(dout16 + (size_t)row * d_v + e) = __floats2bfloat162_rn(g.x, g.y);
        }
    } else {
        for (int e = lane; e < d_v; e += 32) {
            sum = fmaf(float(go[e]), float(o[e]), sum);
            if (dout16) dout16[(size_t)row * d_v + e] = __float2bfloat16_rn(float(go[e]));
        }
    }
    for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    if (lane == 0) {
        const int h = row % H, bt = row / H, t = bt % T_, b = bt / T_;
        D[((size_t)b * H + h) * T_ + t] = sum;
    }
}

// D as above, from dout and out both in bf16 (the tensor-core path given its dout in bf16, AttnBf16In), d_v = 8·LANES:
// each lane reads 8 elements (16 bytes) of each, a row takes LANES lanes and a warp 32 / LANES rows, so that every
// lane has a full 16-byte load of each tensor in flight (a warp a row, with a 4-byte load a lane, waited out the
// memory latency once a row: 65 µs at 100M, B 8, T 2048, H200). The lanes of a row sum by shuffles.
template <int LANES>
__global__ void attention_backward_D16_kernel(float* D, const bf16* dout, const bf16* out, int B, int T_, int H) {
    static_assert(32 % LANES == 0, "a row's lanes within one warp");
    const int row = (int)((blockIdx.x * (size_t)blockDim.x + threadIdx.x) / LANES), sub = threadIdx.x % LANES;
    const bool valid = row < B * T_ * H;  // every lane joins the shuffles below
    float sum = 0.f;
    if (valid) {
        const uint4 g = reinterpret_cast<const uint4*>(dout + (size_t)row * 8 * LANES)[sub];
        const uint4 o = reinterpret_cast<const uint4*>(out + (size_t)row * 8 * LANES)[sub];
        const __nv_bfloat162 *g2 = reinterpret_cast<const __nv_bfloat162*>(&g),
                             *o2 = reinterpret_cast<const __nv_bfloat162*>(&o);
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const float2 a = __bfloat1622float2(g2[e]), b = __bfloat1622float2(o2[e]);
            sum = fmaf(a.y, b.y, fmaf(a.x, b.x, sum));
        }
    }
#pragma unroll
    for (int off = LANES / 2; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    if (valid && sub == 0) {
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
            rows_dot(st, sK, ldq, sQ, ldq, d_qk, ty, tx);
            rows_dot(dpt, sV, ldv, sO, ldv, d_v, ty, tx);

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
        rows_dot(s, sQ, ldq, sK, ldq, d_qk, ty, tx);
        rows_dot(dp, sO, ldv, sV, ldv, d_v, ty, tx);
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
// g16 (or empty): where the warpgroup kernels take every product (sm_90a, no sink split), they write the gradients
// there instead (AttnGrad16), and true is returned; else false, and dq, dk, dv are written as above (the caller turns
// and rounds them). At 100m that spares dq, dk and dv in fp32 written and read back, and three launches (45 µs a layer).
template <typename T>
bool attention_backward(T* dq, T* dk, T* dv, float* scratch, const T* dout, const T* out, const float* lse,
                        const T* q, const T* k, const T* v, int B, int T_, int H, int Hkv, int d_qk, int d_v,
                        int window = 0, int sink = 0, cudaStream_t stream = 0, const bf16* out16 = nullptr,
                        AttnBf16In in16 = {}, const AttnGrad16& g16 = {}) {
    using namespace attn;
    attention_check_gpu(B, T_, H, Hkv, d_qk, d_v, window, sink);
    HL_CHECK((in16.q == nullptr && in16.k == nullptr && in16.v == nullptr && in16.dout == nullptr) ||
                 attention_bf16_inputs<T>(T_, d_qk, d_v, window, sink),
             "attention: bf16 inputs (in16) need the tensor-core kernels for every product");
    const float scale = 1.f / sqrtf((float)d_qk), scale_log2 = LOG2E * scale;

    const int rows = B * T_ * H, rows_per_block = THREADS / 32;
    float* scratch_D = scratch;
    // under the tensor-core kernels, q, k, v and dout in bf16 (the staging; dout by the D kernel's pass)
    const bool tc = attention_use_tc<T>(d_qk, d_v);
    const size_t nq = (size_t)B * T_ * H * d_qk, nk = (size_t)B * T_ * Hkv * d_qk, nv = (size_t)B * T_ * Hkv * d_v,
                 no = (size_t)B * T_ * H * d_v;
    bf16 *q16 = nullptr, *k16 = nullptr, *v16 = nullptr, *dout16 = nullptr;
    // the mma.sync dk, dv kernel's per-query-head shares (dk, dv themselves when H = Hkv, and for the wgmma kernel,
    // which sums the group in registers)
    float *dk_part = dk, *dv_part = dv;
    const bool wg = tc && attention_use_wgmma();
    if (tc) {
        q16 = attention_tc_stage(attention_tc_stage_size(B, T_, H, Hkv, d_qk, d_v, /*shares=*/!wg));
        k16 = q16 + nq, v16 = k16 + nk, dout16 = v16 + nv;
        if (H > Hkv && !wg) {  // after the bf16 tensors: 16-byte aligned, as every size here is a multiple of 64
            dk_part = reinterpret_cast<float*>(dout16 + no);
            dv_part = dk_part + nq;
        }
    }
    HL_CHECK(out16 == nullptr || tc, "attention: a bf16 output (out16) needs the tensor-core kernels");
    auto launch_D = [&](auto* go, bf16* go16, auto* o) {
        // pairs: float2 / bf16x2 accesses, where d_v is even and every tensor 8-byte aligned (4 for bf16)
        const bool pairs = std::is_same_v<T, float> && d_v % 2 == 0 && vec2_aligned(go, o, go16);
        attention_backward_D_kernel<<<ceil_div(rows, rows_per_block), THREADS, 0, stream>>>(scratch_D, go16, go, o,
                                                                                             B, T_, H, d_v, pairs);
        cudaCheckLast();
    };
    // D from the bf16 output the forward wrote (as FlashAttention's, whose output is bf16), and from dout in bf16
    // when the caller gives it so (then nothing is staged)
    const bool d16 = in16.dout && out16 && (d_v == 64 || d_v == 128) &&
                     reinterpret_cast<uintptr_t>(in16.dout) % 16 == 0 && reinterpret_cast<uintptr_t>(out16) % 16 == 0;
    if (d16) {
        auto launch_D16 = [&](auto kernel, int lanes) {
            kernel<<<ceil_div(rows, THREADS / lanes), THREADS, 0, stream>>>(scratch_D, in16.dout, out16, B, T_, H);
            cudaCheckLast();
        };
        if (d_v == 64) launch_D16(attention_backward_D16_kernel<8>, 8);
        else launch_D16(attention_backward_D16_kernel<16>, 16);
    } else if (in16.dout && out16) launch_D(in16.dout, (bf16*)nullptr, out16);
    else if (in16.dout) launch_D(in16.dout, (bf16*)nullptr, out);
    else if (out16) launch_D(dout, dout16, out16);
    else launch_D(dout, dout16, out);

    const SinkSplit split = sink_split(T_, window, sink);
    // which products the tensor-core kernels take (the tensor-core section): both under bf16 operands, except the
    // sink split's dk, dv, which stay with the fp32 kernel
    bool tc_dq = false, tc_dkdv = false, wrote16 = false;
    if constexpr (std::is_same_v<T, float>) {
        if (tc) {
            if (in16.q) q16 = const_cast<bf16*>(in16.q);  // (only read from here on)
            else round_bf16(q16, q, nq, stream);
            if (in16.k) k16 = const_cast<bf16*>(in16.k);
            else round_bf16(k16, k, nk, stream);
            if (in16.v) v16 = const_cast<bf16*>(in16.v);
            else round_bf16(v16, v, nv, stream);
            if (in16.dout) dout16 = const_cast<bf16*>(in16.dout);
            tc_dq = true;
            tc_dkdv = split.tiles == 0;
            auto launch_tc = [&](auto kernel, dim3 grid, int threads, size_t smem, auto... args) {
                allow_smem(kernel, smem);
                kernel<<<grid, threads, smem, stream>>>(args...);
                cudaCheckLast();
            };
            // dq: a block per query head; dk, dv: likewise with mma.sync, per kv head (the group in turn) with wgmma.
            // The wgmma kernels take the tile from blockIdx.y, the heads from x (longest blocks first)
            const int tiles = ceil_div(T_, attn_tc::BKV);
            const dim3 grid_q = wg ? dim3(B * H, tiles) : dim3(tiles, B * H),
                       grid_kv = wg ? dim3(B * Hkv, tiles) : dim3(tiles, B * H);
            const size_t smem_tc = wg ? attention_wgmma_smem_backward(d_qk, d_v) : attention_tc_smem_backward(d_qk, d_v);
            const bf16 *cq = q16, *ck = k16, *cv = v16, *cdout = dout16;
            const float* cD = scratch_D;
            wrote16 = wg && tc_dkdv && g16.dq != nullptr;
            HL_CHECK(!wrote16 || (g16.dk && g16.dv && g16.rope && d_qk % 2 == 0), "attention: incomplete AttnGrad16");
            bf16 *dq16 = wrote16 ? g16.dq : nullptr, *dk16 = wrote16 ? g16.dk : nullptr;
            attention_tc_dispatch(d_qk, d_v, [&](auto dk_, auto dv_) {
                constexpr int DK = decltype(dk_)::value, DV = decltype(dv_)::value;
                if (wg) {
                    if (tc_dkdv)
                        launch_tc(attention_backward_dkdv_wgmma_kernel<DK, DV>, grid_kv, attn_tc::BWD_THREADS, smem_tc,
                                  dk_part, dv_part, cdout, lse, cD, cq, ck, cv, T_, H, Hkv, window, sink, scale,
                                  scale_log2, dk16, g16.dv, g16.ld, g16.rope);
                    launch_tc(attention_backward_dq_wgmma_kernel<DK, DV>, grid_q, attn_tc::BWD_THREADS, smem_tc, dq,
                              cdout, lse, cD, cq, ck, cv, T_, H, Hkv, window, sink, scale, scale_log2, dq16, g16.ld,
                              g16.rope);
                    return;
                }
                if (tc_dkdv)
                    launch_tc(attention_backward_dkdv_tc_kernel<DK, DV>, grid_kv, attn_tc::BWD_THREADS, smem_tc,
                              dk_part, dv_part, cdout, lse, cD, cq, ck, cv, T_, H, Hkv, window, sink, scale,
                              scale_log2);
                launch_tc(attention_backward_dq_tc_kernel<DK, DV>, grid_q, attn_tc::BWD_THREADS, smem_tc, dq, cdout,
                          lse, cD, cq, ck, cv, T_, H, Hkv, window, sink, scale, scale_log2);
            });
            if (tc_dkdv && H > Hkv && !wg) {  // each kv head's dk, dv: the sum of its query heads' shares
                HL_CHECK(vec4_aligned(dk, dv, (const float*)dk_part, (const float*)dv_part),
                         "attention (gpu): dk, dv must be 16-byte aligned");
                attention_group_sum_kernel<><<<elementwise_grid(nk / 4, 256), 256, 0, stream>>>(dk, dk_part, nk, H,
                                                                                             Hkv, d_qk);
                cudaCheckLast();
                attention_group_sum_kernel<><<<elementwise_grid(nv / 4, 256), 256, 0, stream>>>(dv, dv_part, nv, H,
                                                                                             Hkv, d_v);
                cudaCheckLast();
            }
        }
    }
    const size_t ldq = padded(d_qk), ldv = padded(d_v);
    const int bq = bucket(d_qk), bv = bucket(d_v);  // bq ∈ {64, 128} since d_qk ≤ 128
    if (!tc_dkdv) {
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
    }
    if (!tc_dq) {
        const size_t smem_q = sizeof(float) * ((BR + BC) * (ldq + ldv) + (size_t)BR * (BC + 1));
        const dim3 grid_q(ceil_div(T_, BR), B * H);
        auto launch_q = [&](auto kernel) {
            allow_smem(kernel, smem_q);
            kernel<<<grid_q, THREADS, smem_q, stream>>>(dq, dout, lse, scratch_D, q, k, v, T_, H, Hkv, d_qk, d_v,
                                                        window, sink, scale, scale_log2);
            cudaCheckLast();
        };
        if (bq == 64) launch_q(attention_backward_dq_kernel<T, 64>);
        else launch_q(attention_backward_dq_kernel<T, 128>);
    }
    return wrote16;
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
    float* D = nullptr;      // attention_backward's scratch: rowsum(dy ⊙ y) (B, H, T), then the sink split's
                             // partial sums (attention_backward_scratch_size)
    float* rope = nullptr;   // (2, T, d_qk/2)    RoPE's cosines and sines (rope_table), made by the forward
    bool v_fp32 = false;     // another consumer reads v in fp32 (the intra-layer block's shared values)
};

// Lays out GpuAttnActs in an arena (counting when the arena has no base), as attn_acts does on the CPU: element
// tensors and fp32 statistics from one float arena. mixer: the A block's mixer (else the intra-layer block's branch,
// whose y the fusion reads in fp32); v_fp32: see the field. Under a Bf16Scope (lay out under the scope the layer will
// run in) q, k, v and the mixer's y take half the floats where they are held only in bf16 (attn_qk16, attn_y16).
inline GpuAttnActs<float> gpu_attn_acts(Arena<float>& a, const AttnConfig& c, int B, int T_, bool mixer = true,
                                        bool v_fp32 = false) {
    attn_config_check(c);
    HL_CHECK(B > 0 && T_ > 0, "attention activations (gpu): bad sizes B=", B, " T=", T_);
    const int H = c.n_heads, Hkv = c.n_kv_heads;
    const bool qkv16 = attention_bf16_inputs<float>(T_, c.d_qk, c.d_v, c.window, c.sink);
    GpuAttnActs<float> s;
    s.v_fp32 = v_fp32;
    s.q = a.take("q", bf16_only_shape({B, T_, H, c.d_qk}, qkv16));
    s.k = a.take("k", bf16_only_shape({B, T_, Hkv, c.d_qk}, qkv16));
    s.v = a.take("v", bf16_only_shape({B, T_, Hkv, c.d_v}, qkv16 && !v_fp32));
    s.lse = a.take("lse", {B, H, T_});
    s.y = a.take("y", bf16_only_shape({B, T_, H * c.d_v}, mixer && attention_use_tc<float>(c.d_qk, c.d_v)));
    s.dq = a.take_scratch("dq", {B, T_, H, c.d_qk});
    s.dk = a.take_scratch("dk", {B, T_, Hkv, c.d_qk});
    s.dv = a.take_scratch("dv", {B, T_, Hkv, c.d_v});
    s.dy = a.take_scratch("dy", {B, T_, H * c.d_v});
    s.D = a.take_scratch("D", {(int)attention_backward_scratch_size(B, T_, H, Hkv, c.d_qk, c.d_v, c.window, c.sink)});
    s.rope = a.take("rope", {2, T_, c.d_qk / 2});
    return s;
}

// Under bf16 operands with the tensor-core kernels, the branch output y feeds only Wo (and the backward's D, which
// reads it in bf16 too): the forward kernel writes it in bf16 into acts.y (bf16_view; a bf16 layout sizes it so),
// rounded once. Null otherwise (fp32 y: the fp32 kernels, or no Bf16Scope).
template <typename T>
bf16* attn_y16(GpuAttnActs<T>& acts, const AttnConfig& c) {
    return attention_use_tc<T>(c.d_qk, c.d_v) ? bf16_view(acts.y) : nullptr;
}

// Likewise q, k and v, where the tensor-core kernels do every product (attention_bf16_inputs): only those kernels
// read them, so their GEMMs write them in bf16 (into acts.q, acts.k and acts.v: bf16_view), RoPE rotates q and k
// there in place, and the kernels read them as they are (no staging copy, in the forward or the backward). v stays
// fp32 where another consumer reads it so (acts.v_fp32). Null fields otherwise.
template <typename T>
AttnBf16In attn_qk16(GpuAttnActs<T>& acts, const AttnConfig& c, int T_) {
    if (!attention_bf16_inputs<T>(T_, c.d_qk, c.d_v, c.window, c.sink)) return {};
    return {bf16_view(acts.q), bf16_view(acts.k), nullptr, acts.v_fp32 ? nullptr : bf16_view(acts.v)};
}

// Branch: acts.y (B, T, H·d_v) = Attn(RoPE(Wq·inp), RoPE(Wk·inp), Wv·inp); no output projection.
// inp (B, T, D) is the normed residual stream. acts.q, k, v, lse, y are written (saved for the backward).
template <typename T>
void attn_branch_forward(GpuAttnActs<T>& acts, const T* inp, const AttnParams<T>& p, const AttnConfig& c, int B,
                         int T_, cudaStream_t stream = 0, const bf16* inp16 = nullptr, bf16* y16 = nullptr) {
    attn_config_check(c);
    const int N = B * T_, D = c.d_model, H = c.n_heads, Hkv = c.n_kv_heads;
    if (!inp16) inp16 = gpu::bf16_operand(inp, size_t(N) * D, stream);  // (bf16 runs: rounded once for all three)
    const AttnBf16In qk16 = attn_qk16(acts, c, T_);
    bf16 *q16 = const_cast<bf16*>(qk16.q), *k16 = const_cast<bf16*>(qk16.k), *v16 = const_cast<bf16*>(qk16.v);
    gpu::matmul_forward(acts.q, inp, p.wq, (const T*)nullptr, N, D, H * c.d_qk, stream, inp16, q16);
    gpu::matmul_forward(acts.k, inp, p.wk, (const T*)nullptr, N, D, Hkv * c.d_qk, stream, inp16, k16);
    gpu::matmul_forward(acts.v, inp, p.wv, (const T*)nullptr, N, D, Hkv * c.d_v, stream, inp16, v16);
    // positions enter only through q and k: rotated in place, the rotated versions are what is saved; the angles'
    // cosines and sines once, for these two rotations and the backward's
    gpu::rope_table(acts.rope, T_, c.d_qk, c.rope_theta, 0, stream);
    if (q16) {
        gpu::rope_forward(q16, q16, B, T_, H, c.d_qk, c.rope_theta, 0, stream, acts.rope);
        gpu::rope_forward(k16, k16, B, T_, Hkv, c.d_qk, c.rope_theta, 0, stream, acts.rope);
    } else {
        gpu::rope_forward(acts.q, acts.q, B, T_, H, c.d_qk, c.rope_theta, 0, stream, acts.rope);
        gpu::rope_forward(acts.k, acts.k, B, T_, Hkv, c.d_qk, c.rope_theta, 0, stream, acts.rope);
    }
    gpu::attention_forward(acts.y, acts.lse, acts.q, acts.k, acts.v, B, T_, H, Hkv, c.d_qk, c.d_v, c.window, c.sink,
                           stream, y16, qk16);
}

// dy (B, T, H·d_v): gradient of acts.y (dy16: the same in bf16, when its producer wrote it so; then dy is not read).
// dv_extra (B, T, Hkv·d_v) or null: gradient reaching v from another consumer (value sharing in the intra-layer
// hybrid), added before the Wv backward.
// dinp (B, T, D) is written; dp.* accumulate (a null dp field skips that gradient).
// dinp16 (bf16 runs; or null): dinp's bf16 view, offered for where dinp comes out of one GEMM (wq, wk, wv packed):
// then it is written there in bf16 instead, as autocast keeps it, and dinp16 is returned; else null (dinp in fp32).
// Uses acts.dq, dk, dv and D as scratch.
template <typename T>
const bf16* attn_branch_backward(T* dinp, AttnParams<T>& dp, const T* dy, const T* dv_extra, GpuAttnActs<T>& acts,
                                 const T* inp, const AttnParams<T>& p, const AttnConfig& c, int B, int T_,
                                 cudaStream_t stream = 0, const bf16* inp16 = nullptr, const bf16* y16 = nullptr,
                                 const bf16* dy16 = nullptr, bf16* dinp16 = nullptr) {
    attn_config_check(c);
    const int N = B * T_, D = c.d_model, H = c.n_heads, Hkv = c.n_kv_heads;
    AttnBf16In in16 = attn_qk16(acts, c, T_);
    in16.dout = dy16;
    // Under bf16 operands, with wq, wk, wv stored one after another (and their gradients likewise, as model_params
    // lays them out), the three projections are one (H·d_qk + Hkv·(d_qk + d_v), D) weight: dq, dk, dv are written
    // side by side into one bf16 dout d16, and two GEMMs (input and weight gradient) replace six, with no beta = 1
    // passes over dinp (100m: 3 × 2 GEMMs of 71, 58, 49, 20, 48 and 20 µs, and their split-K reductions). The
    // attention's own kernels write them there where they can (AttnGrad16: not with a gradient for v to add first)
    const int Wq = H * c.d_qk, Wk = Hkv * c.d_qk, Wv = Hkv * c.d_v, Wqkv = Wq + Wk + Wv;
    const Bf16Operands* ops = std::is_same_v<T, float> ? current_bf16() : nullptr;
    const size_t WD = size_t(D);
    const bool packed = p.wk == p.wq + Wq * WD && p.wv == p.wk + Wk * WD &&
                        (dp.wq ? dp.wk == dp.wq + Wq * WD && dp.wv == dp.wk + Wk * WD : !dp.wk && !dp.wv);
    bf16* d16 = ops && packed && size_t(N) * Wqkv <= ops->scratch_n ? gpu::bf16_dout_scratch<T>(size_t(N) * Wqkv)
                                                                      : nullptr;
    AttnGrad16 g16;
    if (d16 && !dv_extra) g16 = {d16, d16 + Wq, d16 + Wq + Wk, size_t(Wqkv), acts.rope};
    const bool wrote16 = gpu::attention_backward(acts.dq, acts.dk, acts.dv, acts.D, dy, acts.y, acts.lse, acts.q,
                                                 acts.k, acts.v, B, T_, H, Hkv, c.d_qk, c.d_v, c.window, c.sink,
                                                 stream, y16, in16, g16);
    if (dv_extra) gpu::accumulate(acts.dv, dv_extra, (size_t)N * Hkv * c.d_v, stream);
    // inp feeds three projections: the first input gradient goes straight into dinp, the other two are added to
    // it by their GEMMs (beta = 1: the CPU's order of the sum, without its dinp_part pass)
    if (!inp16) inp16 = gpu::bf16_operand(inp, size_t(N) * D, stream);
    // undo the rotations: then dq, dk are gradients of the projections' outputs. Under bf16 operands each is
    // rotated straight into its GEMM's bf16 dout (bf16_dout_scratch), just before that GEMM
    auto q_k_backward = [&](T* d, int heads, T* dw, const T* w, bool accumulate_dinp) {
        bf16* r16 = gpu::bf16_dout_scratch<T>((size_t)N * heads * c.d_qk);
        if (r16) gpu::rope_backward(r16, d, B, T_, heads, c.d_qk, c.rope_theta, 0, stream, 0, acts.rope);
        else gpu::rope_backward(d, d, B, T_, heads, c.d_qk, c.rope_theta, 0, stream, 0, acts.rope);
        gpu::matmul_backward(dinp, dw, (T*)nullptr, d, inp, w, N, D, heads * c.d_qk, stream, accumulate_dinp, inp16,
                             r16);
    };
    if (d16) {
        if (!wrote16) {
            gpu::rope_backward(d16, acts.dq, B, T_, H, c.d_qk, c.rope_theta, 0, stream, size_t(Wqkv), acts.rope);
            gpu::rope_backward(d16 + Wq, acts.dk, B, T_, Hkv, c.d_qk, c.rope_theta, 0, stream, size_t(Wqkv),
                               acts.rope);
            gpu::round_bf16_rows(d16 + Wq + Wk, size_t(Wqkv), reinterpret_cast<const float*>(acts.dv), size_t(N), Wv,
                                 stream);
        }
        gpu::matmul_backward(dinp, dp.wq, (T*)nullptr, (const T*)nullptr, inp, p.wq, N, D, Wqkv, stream, false,
                             inp16, d16, dinp16);
        return dinp16;
    }
    q_k_backward(acts.dq, H, dp.wq, p.wq, false);
    q_k_backward(acts.dk, Hkv, dp.wk, p.wk, true);
    gpu::matmul_backward(dinp, dp.wv, (T*)nullptr, acts.dv, inp, p.wv, N, D, Hkv * c.d_v, stream, true, inp16);
    return nullptr;
}

// Full mixer: out (B, T, D) = Wo · branch(inp). out16 (bf16 runs; or null): out's bf16 view, where Wo's GEMM writes
// it instead (its one reader, the block's next norm, adds it into the residual stream); returned.
template <typename T>
const bf16* attn_mixer_forward(T* out, GpuAttnActs<T>& acts, const T* inp, const AttnParams<T>& p,
                               const AttnConfig& c, int B, int T_, cudaStream_t stream = 0,
                               const bf16* inp16 = nullptr, bf16* out16 = nullptr) {
    HL_CHECK(p.wo != nullptr, "attention mixer (gpu): no output projection (params were made with with_wo = false)");
    bf16* y16 = attn_y16(acts, c);
    gpu::attn_branch_forward(acts, inp, p, c, B, T_, stream, inp16, y16);
    gpu::matmul_forward(out, acts.y, p.wo, (const T*)nullptr, B * T_, c.n_heads * c.d_v, c.d_model, stream, y16,
                        out16);
    return out16;
}

// dinp (B, T, D) written; dp.* accumulate. Uses acts.dy as the gradient of the branch output. dout16: dout in bf16
// from its producer (the block's norm backward), for Wo's GEMM (matmul_backward's dout16), or null. dinp16 and the
// value returned: as attn_branch_backward's.
template <typename T>
const bf16* attn_mixer_backward(T* dinp, AttnParams<T>& dp, const T* dout, GpuAttnActs<T>& acts, const T* inp,
                                const AttnParams<T>& p, const AttnConfig& c, int B, int T_, cudaStream_t stream = 0,
                                const bf16* inp16 = nullptr, const bf16* dout16 = nullptr, bf16* dinp16 = nullptr) {
    HL_CHECK(p.wo != nullptr, "attention mixer (gpu): no output projection (params were made with with_wo = false)");
    const bf16* y16 = attn_y16(acts, c);
    // dy feeds only the attention backward: written in bf16 where that takes it so (attn_qk16's condition)
    bf16* dy16 = attn_qk16(acts, c, T_).q ? bf16_view(acts.dy) : nullptr;
    gpu::matmul_backward(acts.dy, dp.wo, (T*)nullptr, dout, acts.y, p.wo, B * T_, c.n_heads * c.d_v, c.d_model,
                         stream, false, y16, dout16, dy16);
    return gpu::attn_branch_backward(dinp, dp, acts.dy, (const T*)nullptr, acts, inp, p, c, B, T_, stream, inp16, y16,
                                     dy16, dinp16);
}

}  // namespace hl::gpu
