// dev/cuda/attention.cu — playground for the causal GQA attention kernels, in the style of llm.c's dev/cuda:
// numbered versions, each checked against the CPU reference (model/attention.h, float) at a small shape and
// timed with cudaEvents (warm-up, then the median of repeats) at B=4, T=2048, H=16, Hkv=4, hd=64.
//   v1  naive: materialises the (B, H, T, T) scores; one thread per (b, h, t) row (forward and dq), one thread
//       per (b, g, s) key row (dk, dv)
//   v2  tiled online-softmax flash-style forward / backward: the kernels shipped in kernels/attention.cuh
//   v3  forward only: v2's algorithm with 128-row query tiles, 8 × 4 scores per thread, tiles stored transposed
//       so that every shared-memory read is a float4 (3 vector loads per 32 FMAs instead of 8 scalar per 16);
//       compile-time head dims (64 / 64 here)
//   v4  tensor cores through nvcuda::wmma (16×16×16 bf16 fragments, fp32 softmax and accumulation): every score
//       tile passes through shared memory, since a wmma fragment's layout is opaque (the first shipped version)
//   v5  v2's entry points with bf16 operands in effect (a Bf16Scope, as train_gpu --precision bf16 runs them): the
//       tensor-core kernels of kernels/attention.cuh — mma.sync m16n8k16 with the scores, softmax, P and dS kept
//       in registers (FlashAttention-2's form; kernels/mma.cuh), bf16 tiles streamed with cp.async from the
//       staging the Buffers own. v5 is whatever is shipped: at B=4, T=2048 it measured fwd 0.52 / fwd+bwd 2.55 ms
//       in session 5 (tiles rounded by each block, synchronously) and 0.26 / 1.06 ms in session 6 (the steps are
//       in the README, "Speed against PyTorch"; git history has each version)
//   v6  v5 with the sm_90a kernels where the device code has them (kernels/wgmma.cuh: warpgroup products, tiles
//       read by the tensor cores from 128-byte-swizzled shared memory): what train_gpu runs on an H100/H200. v5
//       switches them off (hl::gpu::attention_wgmma_on = false) to time the mma.sync kernels in the same run
//   v7  v6 with the warp-specialised forward (causal, no window): three warpgroups a block, one loading every tile by
//       TMA, two multiplying 64 query rows each against 128-key tiles, mbarriers between them (FlashAttention-3's
//       form). What train_gpu runs; v6 switches it off (hl::gpu::attention_ws_on = false)
//       v4 to v7 are checked at bf16 tolerances (out 2e-2, gradients 5e-2)
// FLOPs counted as the usual convention: forward 4·B·H·T²·hd / 2 (causal QKᵀ and PV), backward 2.5× forward.
// Then v2 with a sliding window (W = 512, S = 64, the DESIGN.md baseline; and S = 0) against full attention at
// T = 1024 … 8192 with B·T = 16384 tokens: time per token grows linearly in T without the window, and stays flat
// with it (its kernels skip the masked tiles; the backward splits the sink key tiles, which every query sees,
// into chunks of query tiles, so that no block walks all T/64 of them).
// Last, v2 and v7 over T = 1024 … 8192 at B·T = 16384 as `csv,` lines (bench/kernels.sh sets them beside SDPA).
//
// Build: make dev/cuda/attention      (nvcc with the Makefile's NVFLAGS → build/dev/attention)
// Run:   ./build/dev/attention [version]     (no argument: every version)
#include <algorithm>               // std::sort, std::max
#include <cmath>                   // std::fabs, std::isfinite, sqrtf
#include <cstdio>                  // std::printf
#include <cstdlib>                 // std::atoi
#include <vector>                  // std::vector
#include <cuda_runtime.h>          // cudaEvent_*, cudaMemset
#include <mma.h>                   // nvcuda::wmma: v4
#include "dev/cuda/common.cuh"   // median_ms, rel_err, poison: the playgrounds' shared harness
#include "kernels/attention.cuh"   // v2: hl::gpu::attention_forward / attention_backward
#include "kernels/common.cuh"      // cudaCheck, cudaCheckLast, ceil_div, DeviceBuffer
#include "model/attention.h"       // the CPU reference core

using hl::dev::median_ms;  // dev/cuda/common.cuh
using hl::dev::rel_err;
using hl::dev::poison;

using hl::gpu::ceil_div;
using hl::gpu::DeviceBuffer;

// ---------------------------------------------------------------------------------------------------------
// v1: naive
// ---------------------------------------------------------------------------------------------------------
namespace v1 {

// One thread per (b, h, i) query row (i fastest, so a warp reads the same key at once): writes the row's
// scores, then probabilities, into att (B, H, T, T), then out_i = Σ_j P_ij v_j and lse_i.
__global__ void forward_kernel(float* out, float* lse, float* att, const float* q, const float* k, const float* v,
                               int B, int T, int H, int Hkv, int dqk, int dv, float scale) {
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= B * H * T) return;
    const int i = idx % T, h = (idx / T) % H, b = idx / (T * H), g = h / (H / Hkv);
    const float* qi = q + (((size_t)b * T + i) * H + h) * dqk;
    float* a = att + (((size_t)b * H + h) * T + i) * T;
    float mx = -INFINITY;
    for (int j = 0; j <= i; j++) {
        const float* kj = k + (((size_t)b * T + j) * Hkv + g) * dqk;
        float s = 0.f;
        for (int d = 0; d < dqk; d++) s += qi[d] * kj[d];
        a[j] = s * scale;
        mx = fmaxf(mx, a[j]);
    }
    float sum = 0.f;
    for (int j = 0; j <= i; j++) {
        a[j] = expf(a[j] - mx);
        sum += a[j];
    }
    for (int j = 0; j <= i; j++) a[j] /= sum;
    float* o = out + (((size_t)b * T + i) * H + h) * dv;
    for (int e = 0; e < dv; e++) {
        float acc = 0.f;
        for (int j = 0; j <= i; j++) acc += a[j] * v[(((size_t)b * T + j) * Hkv + g) * dv + e];
        o[e] = acc;
    }
    lse[((size_t)b * H + h) * T + i] = mx + logf(sum);
}

// One thread per (b, h, i) query row: dS_ij = P_ij (dout_i·v_j − D_i) / √d into ds (B, H, T, T), dq_i.
__global__ void backward_dq_kernel(float* dq, float* ds, const float* att, const float* dout, const float* out,
                                   const float* k, const float* v, int B, int T, int H, int Hkv, int dqk, int dv,
                                   float scale) {
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= B * H * T) return;
    const int i = idx % T, h = (idx / T) % H, b = idx / (T * H), g = h / (H / Hkv);
    const float* a = att + (((size_t)b * H + h) * T + i) * T;
    float* dsi = ds + (((size_t)b * H + h) * T + i) * T;
    const float* go = dout + (((size_t)b * T + i) * H + h) * dv;
    const float* o = out + (((size_t)b * T + i) * H + h) * dv;
    float D = 0.f;
    for (int e = 0; e < dv; e++) D += go[e] * o[e];
    for (int j = 0; j <= i; j++) {
        const float* vj = v + (((size_t)b * T + j) * Hkv + g) * dv;
        float dp = 0.f;
        for (int e = 0; e < dv; e++) dp += go[e] * vj[e];
        dsi[j] = a[j] * (dp - D) * scale;
    }
    float* dqi = dq + (((size_t)b * T + i) * H + h) * dqk;
    for (int d = 0; d < dqk; d++) {
        float acc = 0.f;
        for (int j = 0; j <= i; j++) acc += dsi[j] * k[(((size_t)b * T + j) * Hkv + g) * dqk + d];
        dqi[d] = acc;
    }
}

// One thread per (b, g, j) key row: dv_j = Σ_h Σ_{i ≥ j} P_ij dout_i, dk_j = Σ_h Σ_{i ≥ j} dS_ij q_i.
__global__ void backward_dkdv_kernel(float* dk, float* dvv, const float* att, const float* ds, const float* dout,
                                     const float* q, int B, int T, int H, int Hkv, int dqk, int dv) {
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= B * Hkv * T) return;
    const int j = idx % T, g = (idx / T) % Hkv, b = idx / (T * Hkv), group = H / Hkv;
    float* dkj = dk + (((size_t)b * T + j) * Hkv + g) * dqk;
    float* dvj = dvv + (((size_t)b * T + j) * Hkv + g) * dv;
    for (int d = 0; d < dqk; d++) dkj[d] = 0.f;
    for (int e = 0; e < dv; e++) dvj[e] = 0.f;
    for (int h = g * group; h < (g + 1) * group; h++)
        for (int i = j; i < T; i++) {
            const float p = att[(((size_t)b * H + h) * T + i) * T + j];
            const float s = ds[(((size_t)b * H + h) * T + i) * T + j];
            const float* go = dout + (((size_t)b * T + i) * H + h) * dv;
            const float* qi = q + (((size_t)b * T + i) * H + h) * dqk;
            for (int e = 0; e < dv; e++) dvj[e] += p * go[e];
            for (int d = 0; d < dqk; d++) dkj[d] += s * qi[d];
        }
}

}  // namespace v1

// ---------------------------------------------------------------------------------------------------------
// v3: forward with 8 × 4 scores per thread and float4 shared-memory reads (head dims fixed at compile time)
// ---------------------------------------------------------------------------------------------------------
namespace v3 {
constexpr int BR = 128, BC = 64, THREADS = 256;
constexpr int LDR = BR + 4, LDC = BC + 4;  // +4 keeps rows 16-byte aligned and staggers banks
constexpr float LOG2E = 1.4426950408889634f, LN2 = 0.6931471805599453f;

__device__ inline float row_max16(float x) {
    for (int o = 8; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}
__device__ inline float row_sum16(float x) {
    for (int o = 8; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

// Grid (ceil(T / 128), B·H), 256 threads; thread (ty, tx) = (tid / 16, tid % 16) owns query rows ty·8 .. +7 and
// keys tx·4 .. +3 of the 128 × 64 score tile, and output columns tx·4 .. +3 (DV = 64). Q and K are stored
// transposed (d-major), P transposed (key-major), so a thread's 8 rows / 4 columns at one d are two / one float4.
template <int DQK, int DV>
__global__ void __launch_bounds__(THREADS, 2)
    forward_kernel(float* out, float* lse, const float* q, const float* k, const float* v, int T_, int H, int Hkv,
                   float scale_log2) {
    static_assert(DV == 64 && DQK % 4 == 0, "v3 is written for d_v = 64 (16 threads × 4 columns)");
    extern __shared__ __align__(16) float smem[];
    float* sQt = smem;              // (DQK, LDR)
    float* sKt = sQt + DQK * LDR;   // (DQK, LDC)
    float* sV = sKt + DQK * LDC;    // (BC, DV)
    float* sPt = sV + BC * DV;      // (BC, LDR)
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * BR;
    const int b = blockIdx.y / H, h = blockIdx.y % H, g = h / (H / Hkv);

    for (int idx = tid; idx < BR * DQK; idx += THREADS) {
        const int r = idx / DQK, d = idx % DQK, t = q0 + r;
        sQt[d * LDR + r] = t < T_ ? q[(((size_t)b * T_ + t) * H + h) * DQK + d] : 0.f;
    }
    float m[8], l[8], acc[8][4];
#pragma unroll
    for (int a = 0; a < 8; a++) {
        m[a] = -INFINITY;
        l[a] = 0.f;
#pragma unroll
        for (int c = 0; c < 4; c++) acc[a][c] = 0.f;
    }
    const int kv_end = min(T_, q0 + BR);
    for (int kv0 = 0; kv0 < kv_end; kv0 += BC) {
        __syncthreads();
        for (int idx = tid; idx < BC * DQK; idx += THREADS) {
            const int j = idx / DQK, d = idx % DQK, t = kv0 + j;
            sKt[d * LDC + j] = t < T_ ? k[(((size_t)b * T_ + t) * Hkv + g) * DQK + d] : 0.f;
        }
        for (int idx = tid; idx < BC * DV; idx += THREADS) {
            const int j = idx / DV, e = idx % DV, t = kv0 + j;
            sV[j * DV + e] = t < T_ ? v[(((size_t)b * T_ + t) * Hkv + g) * DV + e] : 0.f;
        }
        __syncthreads();

        float s[8][4] = {};
#pragma unroll 8
        for (int d = 0; d < DQK; d++) {
            const float4 qa0 = *reinterpret_cast<const float4*>(&sQt[d * LDR + ty * 8]);
            const float4 qa1 = *reinterpret_cast<const float4*>(&sQt[d * LDR + ty * 8 + 4]);
            const float4 kb = *reinterpret_cast<const float4*>(&sKt[d * LDC + tx * 4]);
            const float qa[8] = {qa0.x, qa0.y, qa0.z, qa0.w, qa1.x, qa1.y, qa1.z, qa1.w};
            const float kc[4] = {kb.x, kb.y, kb.z, kb.w};
#pragma unroll
            for (int a = 0; a < 8; a++)
#pragma unroll
                for (int c = 0; c < 4; c++) s[a][c] = fmaf(qa[a], kc[c], s[a][c]);
        }
#pragma unroll
        for (int a = 0; a < 8; a++) {
            const int i = q0 + ty * 8 + a;
            float tmax = -INFINITY;
#pragma unroll
            for (int c = 0; c < 4; c++) {
                const int j = kv0 + tx * 4 + c;
                s[a][c] = (j <= i && j < T_) ? s[a][c] * scale_log2 : -INFINITY;
                tmax = fmaxf(tmax, s[a][c]);
            }
            const float m_new = fmaxf(m[a], row_max16(tmax));
            const float m_use = m_new == -INFINITY ? 0.f : m_new;
            const float alpha = exp2f(m[a] - m_use);
            float psum = 0.f;
#pragma unroll
            for (int c = 0; c < 4; c++) {
                const float p = exp2f(s[a][c] - m_use);
                psum += p;
                sPt[(tx * 4 + c) * LDR + ty * 8 + a] = p;
            }
            l[a] = l[a] * alpha + row_sum16(psum);
            m[a] = m_new;
#pragma unroll
            for (int c = 0; c < 4; c++) acc[a][c] *= alpha;
        }
        __syncthreads();
#pragma unroll 8
        for (int j = 0; j < BC; j++) {
            const float4 pa0 = *reinterpret_cast<const float4*>(&sPt[j * LDR + ty * 8]);
            const float4 pa1 = *reinterpret_cast<const float4*>(&sPt[j * LDR + ty * 8 + 4]);
            const float4 vb = *reinterpret_cast<const float4*>(&sV[j * DV + tx * 4]);
            const float pa[8] = {pa0.x, pa0.y, pa0.z, pa0.w, pa1.x, pa1.y, pa1.z, pa1.w};
            const float vc[4] = {vb.x, vb.y, vb.z, vb.w};
#pragma unroll
            for (int a = 0; a < 8; a++)
#pragma unroll
                for (int c = 0; c < 4; c++) acc[a][c] = fmaf(pa[a], vc[c], acc[a][c]);
        }
    }
#pragma unroll
    for (int a = 0; a < 8; a++) {
        const int i = q0 + ty * 8 + a;
        if (i >= T_) continue;
        const float inv = l[a] > 0.f ? 1.f / l[a] : 0.f;
        float4 o = make_float4(acc[a][0] * inv, acc[a][1] * inv, acc[a][2] * inv, acc[a][3] * inv);
        *reinterpret_cast<float4*>(&out[(((size_t)b * T_ + i) * H + h) * DV + tx * 4]) = o;
        if (tx == 0) lse[((size_t)b * H + h) * T_ + i] = m[a] * LN2 + logf(l[a]);
    }
}

void forward(float* out, float* lse, const float* q, const float* k, const float* v, int B, int T, int H, int Hkv) {
    constexpr int D = 64;
    const size_t smem = sizeof(float) * (D * LDR + D * LDC + BC * D + BC * LDR);
    cudaCheck(cudaFuncSetAttribute(forward_kernel<D, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    forward_kernel<D, D><<<dim3(ceil_div(T, BR), B * H), THREADS, smem>>>(out, lse, q, k, v, T, H, Hkv,
                                                                          LOG2E / sqrtf((float)D));
    cudaCheckLast();
}

}  // namespace v3

// ---------------------------------------------------------------------------------------------------------
// v4: the first tensor-core kernels, on nvcuda::wmma (16×16×16 bf16 fragments, fp32 accumulators)
// ---------------------------------------------------------------------------------------------------------
// The same tiles and loops as v2. A wmma fragment's element-to-thread map is opaque, so every tile of scores
// goes through shared memory for the per-row work (the softmax, P and dS) and comes back as a fragment; the
// forward's output accumulator lives in shared memory and is loaded and stored around each P·V product. Shipped
// for one session, then replaced by v5's mma.sync kernels (kernels/attention.cuh). No sink split here (W = 0).
namespace v4 {
using namespace hl;
using namespace hl::gpu;
using hl::gpu::bf16;
namespace wmma_tc {
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
}  // namespace wmma_tc

// Forward (as attention_forward_kernel): S = Q Kᵀ per key tile on the tensor cores into shared memory; the online
// softmax by two lanes a row writes P (bf16) and rescales the row's unnormalised output, which lives in shared
// memory (fp32) and is loaded into accumulators for O += P V and stored back.
template <typename T, int D>
__global__ void __launch_bounds__(wmma_tc::THREADS)
    attention_forward_tc_kernel(T* out, float* lse, const T* q, const T* k, const T* v, int T_, int H, int Hkv,
                                int window, int sink, float scale_log2) {
    using namespace attn;
    using namespace wmma_tc;
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
__global__ void __launch_bounds__(wmma_tc::THREADS)
    attention_backward_dkdv_tc_kernel(T* dk, T* dv, const T* dout, const float* lse, const float* Dr, const T* q,
                                      const T* k, const T* v, int T_, int H, int Hkv, int window, int sink,
                                      float scale, float scale_log2) {
    using namespace attn;
    using namespace wmma_tc;
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
__global__ void __launch_bounds__(wmma_tc::THREADS)
    attention_backward_dq_tc_kernel(T* dq, const T* dout, const float* lse, const float* Dr, const T* q, const T* k,
                                    const T* v, int T_, int H, int Hkv, int window, int sink, float scale,
                                    float scale_log2) {
    using namespace attn;
    using namespace wmma_tc;
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

// Shared memory of the three tensor-core kernels for head dim D.
inline size_t attention_tc_smem_forward(int D) {
    using namespace attn;
    return sizeof(bf16) * (size_t)(BR + 2 * BC) * (D + 8) + sizeof(float) * BR * wmma_tc::LDS +
           sizeof(bf16) * BR * wmma_tc::LDP + sizeof(float) * ((size_t)BR * (D + 4) + BR);
}
inline size_t attention_tc_smem_backward(int D) {  // both kernels (dkdv also needs its 2·BR floats of lse and D)
    using namespace attn;
    return sizeof(bf16) * (size_t)(2 * BR + 2 * BC) * (D + 8) + sizeof(float) * 2 * BR * wmma_tc::LDS +
           sizeof(bf16) * 2 * BR * wmma_tc::LDP + sizeof(float) * 2 * BR;
}

void forward(float* out, float* lse, const float* q, const float* k, const float* v, int B, int T, int H, int Hkv,
             int D) {
    const size_t smem = attention_tc_smem_forward(D);
    const dim3 grid(ceil_div(T, attn::BR), B * H);
    const float scale_log2 = attn::LOG2E / sqrtf((float)D);
    auto launch = [&](auto kernel) {
        hl::gpu::allow_smem(kernel, smem);
        kernel<<<grid, wmma_tc::THREADS, smem>>>(out, lse, q, k, v, T, H, Hkv, 0, 0, scale_log2);
        cudaCheckLast();
    };
    if (D == 64) launch(attention_forward_tc_kernel<float, 64>);
    else launch(attention_forward_tc_kernel<float, 128>);
}

// D (the softmax backward's row term) by the shipped kernel, then v4's dk, dv and dq kernels.
void backward(float* dq, float* dk, float* dv, float* Dr, const float* dout, const float* out, const float* lse,
              const float* q, const float* k, const float* v, int B, int T, int H, int Hkv, int D) {
    const int rows = B * T * H, per_block = attn::THREADS / 32;
    attention_backward_D_kernel<<<ceil_div(rows, per_block), attn::THREADS>>>(Dr, nullptr, dout, out, B, T, H, D,
                                                                               D % 2 == 0);
    cudaCheckLast();
    const size_t smem = attention_tc_smem_backward(D);
    const float scale = 1.f / sqrtf((float)D), scale_log2 = attn::LOG2E * scale;
    auto launch = [&](auto kernel, dim3 grid, auto... args) {
        hl::gpu::allow_smem(kernel, smem);
        kernel<<<grid, wmma_tc::THREADS, smem>>>(args...);
        cudaCheckLast();
    };
    const dim3 grid_kv(ceil_div(T, attn::BC), B * Hkv), grid_q(ceil_div(T, attn::BR), B * H);
    const bool d64 = D == 64;
    launch(d64 ? attention_backward_dkdv_tc_kernel<float, 64> : attention_backward_dkdv_tc_kernel<float, 128>, grid_kv,
           dk, dv, dout, lse, (const float*)Dr, q, k, v, T, H, Hkv, 0, 0, scale, scale_log2);
    launch(d64 ? attention_backward_dq_tc_kernel<float, 64> : attention_backward_dq_tc_kernel<float, 128>, grid_q, dq,
           dout, lse, (const float*)Dr, q, k, v, T, H, Hkv, 0, 0, scale, scale_log2);
}
}  // namespace v4


// ---------------------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------------------

struct Problem {
    int B, T, H, Hkv, dqk, dv;
    size_t nq() const { return (size_t)B * T * H * dqk; }
    size_t nk() const { return (size_t)B * T * Hkv * dqk; }
    size_t nv() const { return (size_t)B * T * Hkv * dv; }
    size_t no() const { return (size_t)B * T * H * dv; }
    size_t nl() const { return (size_t)B * H * T; }
    size_t natt() const { return (size_t)B * H * T * T; }
};

struct Buffers {
    DeviceBuffer<float> q, k, v, dout, out, lse, D, dq, dk, dv, att, ds;  // att, ds: v1 only
    DeviceBuffer<__nv_bfloat16> stage;  // v5 to v7: the bf16 copies of q, k, v, dout (hl::gpu::attention_tc_stage_size)
    hl::gpu::Bf16Operands ops;          // v5 to v7: bf16 operands in effect, with that staging
    explicit Buffers(const Problem& p, bool naive)
        : q(p.nq()), k(p.nk()), v(p.nv()), dout(p.no()), out(p.no()), lse(p.nl()), D(p.nl()), dq(p.nq()),
          dk(p.nk()), dv(p.nv()), att(naive ? p.natt() : 0), ds(naive ? p.natt() : 0),
          stage(hl::gpu::attention_tc_stage_size(p.B, p.T, p.H, p.Hkv, p.dqk, p.dv)) {
        ops.stage = stage.ptr, ops.stage_n = stage.n;
    }
};

void run_forward(int version, Buffers& m, const Problem& p) {
    const float scale = 1.f / sqrtf((float)p.dqk);
    if (version == 1) {
        const int n = p.B * p.H * p.T;
        v1::forward_kernel<<<ceil_div(n, 128), 128>>>(m.out.ptr, m.lse.ptr, m.att.ptr, m.q.ptr, m.k.ptr, m.v.ptr,
                                                      p.B, p.T, p.H, p.Hkv, p.dqk, p.dv, scale);
        cudaCheckLast();
    } else if (version == 4) {
        v4::forward(m.out.ptr, m.lse.ptr, m.q.ptr, m.k.ptr, m.v.ptr, p.B, p.T, p.H, p.Hkv, p.dqk);
    } else if (version == 2 || version >= 5) {
        const hl::gpu::Bf16Scope scope(version >= 5 ? &m.ops : nullptr);
        hl::gpu::attention_wgmma_on = version >= 6;
        hl::gpu::attention_ws_on = version == 7;
        hl::gpu::attention_forward(m.out.ptr, m.lse.ptr, m.q.ptr, m.k.ptr, m.v.ptr, p.B, p.T, p.H, p.Hkv, p.dqk,
                                   p.dv);
    } else {
        v3::forward(m.out.ptr, m.lse.ptr, m.q.ptr, m.k.ptr, m.v.ptr, p.B, p.T, p.H, p.Hkv);
    }
}

// v3 has no backward of its own: it reuses v2's (which only needs out and lse)
void run_backward(int version, Buffers& m, const Problem& p) {
    const float scale = 1.f / sqrtf((float)p.dqk);
    if (version == 1) {
        const int n = p.B * p.H * p.T, nkv = p.B * p.Hkv * p.T;
        v1::backward_dq_kernel<<<ceil_div(n, 128), 128>>>(m.dq.ptr, m.ds.ptr, m.att.ptr, m.dout.ptr, m.out.ptr,
                                                          m.k.ptr, m.v.ptr, p.B, p.T, p.H, p.Hkv, p.dqk, p.dv, scale);
        cudaCheckLast();
        v1::backward_dkdv_kernel<<<ceil_div(nkv, 128), 128>>>(m.dk.ptr, m.dv.ptr, m.att.ptr, m.ds.ptr, m.dout.ptr,
                                                              m.q.ptr, p.B, p.T, p.H, p.Hkv, p.dqk, p.dv);
        cudaCheckLast();
    } else if (version == 4) {
        v4::backward(m.dq.ptr, m.dk.ptr, m.dv.ptr, m.D.ptr, m.dout.ptr, m.out.ptr, m.lse.ptr, m.q.ptr, m.k.ptr,
                     m.v.ptr, p.B, p.T, p.H, p.Hkv, p.dqk);
    } else {
        const hl::gpu::Bf16Scope scope(version >= 5 ? &m.ops : nullptr);
        hl::gpu::attention_wgmma_on = version >= 6;
        hl::gpu::attention_backward(m.dq.ptr, m.dk.ptr, m.dv.ptr, m.D.ptr, m.dout.ptr, m.out.ptr, m.lse.ptr, m.q.ptr,
                                    m.k.ptr, m.v.ptr, p.B, p.T, p.H, p.Hkv, p.dqk, p.dv);
    }
}

int main(int argc, char** argv) {
    const int only = argc > 1 ? std::atoi(argv[1]) : 0;
    auto wanted = [&](int ver) { return only == 0 || only == ver; };

    // 1. correctness against the CPU at a small shape (T not a multiple of any tile size)
    const Problem sp{2, 259, 4, 2, 64, 64};
    hl::Rng rng(1);
    std::vector<float> q(sp.nq()), k(sp.nk()), v(sp.nv()), dout(sp.no());
    rng.fill_normal(q.data(), q.size(), 1.0);
    rng.fill_normal(k.data(), k.size(), 1.0);
    rng.fill_normal(v.data(), v.size(), 1.0);
    rng.fill_normal(dout.data(), dout.size(), 1.0);
    std::vector<float> out(sp.no()), att(sp.natt()), dq(sp.nq()), dk(sp.nk()), dvv(sp.nv());
    hl::attention_forward(out.data(), att.data(), q.data(), k.data(), v.data(), sp.B, sp.T, sp.H, sp.Hkv, sp.dqk,
                          sp.dv);
    hl::attention_backward(dq.data(), dk.data(), dvv.data(), dout.data(), att.data(), q.data(), k.data(), v.data(),
                           sp.B, sp.T, sp.H, sp.Hkv, sp.dqk, sp.dv);
    std::printf("check vs CPU (B=%d T=%d H=%d Hkv=%d d_qk=%d d_v=%d), rel err = max|g-c| / max|c|:\n", sp.B, sp.T,
                sp.H, sp.Hkv, sp.dqk, sp.dv);
    if (wanted(6) || wanted(7)) std::printf("  (v6, v7: the sm_90a kernels %s on this device)\n", hl::gpu::wgmma::available() ? "run" : "do not run");
    bool ok = true;
    for (int ver = 1; ver <= 7; ver++) {
        if (!wanted(ver)) continue;
        Buffers m(sp, ver == 1);
        m.q.upload(q);
        m.k.upload(k);
        m.v.upload(v);
        m.dout.upload(dout);
        for (auto* buf : {&m.out, &m.dq, &m.dk, &m.dv}) cudaCheck(cudaMemset(buf->ptr, 0xFF, buf->n * sizeof(float)));
        run_forward(ver, m, sp);
        run_backward(ver, m, sp);
        cudaCheck(cudaDeviceSynchronize());
        const double eo = rel_err(m.out.download(), out), eq = rel_err(m.dq.download(), dq),
                     ek = rel_err(m.dk.download(), dk), ev = rel_err(m.dv.download(), dvv);
        const double tf = ver >= 4 ? 2e-2 : 1e-4, tb = ver >= 4 ? 5e-2 : 1e-3;  // v4 to v7: bf16 operands
        const bool pass = eo <= tf && eq <= tb && ek <= tb && ev <= tb;
        ok = ok && pass;
        std::printf("  v%d: out %.2e  dq %.2e  dk %.2e  dv %.2e  %s\n", ver, eo, eq, ek, ev, pass ? "ok" : "MISMATCH");
    }

    // 2. timing
    const Problem bp{4, 2048, 16, 4, 64, 64};
    const double fwd_flops = 4.0 * bp.B * bp.H * (double)bp.T * bp.T * bp.dqk / 2, bwd_flops = 2.5 * fwd_flops;
    std::printf("timing B=%d T=%d H=%d Hkv=%d hd=%d (median of repeats; fwd %.1f GFLOP, fwd+bwd %.1f GFLOP):\n",
                bp.B, bp.T, bp.H, bp.Hkv, bp.dqk, fwd_flops * 1e-9, (fwd_flops + bwd_flops) * 1e-9);
    for (int ver = 1; ver <= 7; ver++) {
        if (!wanted(ver)) continue;
        Buffers m(bp, ver == 1);
        hl::Rng r2(2);
        for (auto* buf : {&m.q, &m.k, &m.v, &m.dout}) {
            std::vector<float> h(buf->n);
            r2.fill_normal(h.data(), h.size(), 1.0);
            buf->upload(h);
        }
        const int warm = ver == 1 ? 1 : 3, reps = ver == 1 ? 3 : 20;
        const float t_f = median_ms([&] { run_forward(ver, m, bp); }, warm, reps);
        const float t_fb = median_ms([&] { run_forward(ver, m, bp); run_backward(ver, m, bp); }, warm, reps);
        std::printf("  v%d: fwd %8.3f ms %6.2f TFLOP/s | fwd+bwd %8.3f ms %6.2f TFLOP/s%s\n", ver, t_f,
                    fwd_flops / (t_f * 1e-3) * 1e-12, t_fb, (fwd_flops + bwd_flops) / (t_fb * 1e-3) * 1e-12,
                    ver == 3 ? "  (bwd = v2's)" : "");
    }

    // 3. sliding window vs full attention, v2 (the shipped kernels), B·T fixed; W=512 S=0 shows the sink's cost
    if (wanted(2)) {
        const int tokens = 16384;
        const int variants[][2] = {{0, 0}, {512, 64}, {512, 0}};  // (W, S); W = 0 is full attention
        std::printf("v2 full vs sliding window, B·T=%d H=16 Hkv=4 hd=64 (ms/token = median / B·T):\n", tokens);
        std::printf("  %5s %3s %4s %3s | %8s %10s | %8s %10s\n", "T", "B", "W", "S", "fwd ms", "ms/token",
                    "f+b ms", "ms/token");
        for (int T : {1024, 2048, 4096, 8192}) {
            const Problem p{tokens / T, T, 16, 4, 64, 64};
            Buffers m(p, false);
            m.D.alloc(hl::gpu::attention_backward_scratch_size(p.B, p.T, p.H, p.Hkv, p.dqk, p.dv, 512, 64));
            hl::Rng r3(3);
            for (auto* buf : {&m.q, &m.k, &m.v, &m.dout}) {
                std::vector<float> h(buf->n);
                r3.fill_normal(h.data(), h.size(), 1.0);
                buf->upload(h);
            }
            for (auto& ws : variants) {
                const int W = ws[0], S = ws[1];
                auto fwd = [&] {
                    hl::gpu::attention_forward(m.out.ptr, m.lse.ptr, m.q.ptr, m.k.ptr, m.v.ptr, p.B, p.T, p.H, p.Hkv,
                                               p.dqk, p.dv, W, S);
                };
                auto bwd = [&] {
                    hl::gpu::attention_backward(m.dq.ptr, m.dk.ptr, m.dv.ptr, m.D.ptr, m.dout.ptr, m.out.ptr,
                                                m.lse.ptr, m.q.ptr, m.k.ptr, m.v.ptr, p.B, p.T, p.H, p.Hkv, p.dqk,
                                                p.dv, W, S);
                };
                const float t_f = median_ms(fwd, 3, 11), t_fb = median_ms([&] { fwd(); bwd(); }, 3, 11);
                std::printf("  %5d %3d %4d %3d | %8.3f %10.2e | %8.3f %10.2e\n", T, p.B, W, S, t_f, t_f / tokens,
                            t_fb, t_fb / tokens);
            }
        }
    }
    // 4. the shipped kernels over T at B·T = 16384 (the models' 100m/350m head dim), fp32 (v2) and bf16 operands (v7),
    // as `csv,` lines that bench/kernels.sh puts beside PyTorch's SDPA on the same shapes (dev/bench_kernels.py)
    if (wanted(2) || wanted(7)) {
        std::printf("csv,kernel,impl,B,T,H,Hkv,hd,fwd_ms,fwd_bwd_ms,fwd_tflops,fwd_bwd_tflops\n");
        for (int T : {1024, 2048, 4096, 8192}) {
            const Problem p{16384 / T, T, 16, 4, 64, 64};
            Buffers m(p, false);
            hl::Rng r4(4);
            for (auto* buf : {&m.q, &m.k, &m.v, &m.dout}) {
                std::vector<float> h(buf->n);
                r4.fill_normal(h.data(), h.size(), 1.0);
                buf->upload(h);
            }
            const double f = 4.0 * p.B * p.H * (double)p.T * p.T * p.dqk / 2, fb = 3.5 * f;
            for (int ver : {2, 7}) {
                if (!wanted(ver)) continue;
                const float t_f = median_ms([&] { run_forward(ver, m, p); }, 3, 11);
                const float t_fb = median_ms([&] { run_forward(ver, m, p); run_backward(ver, m, p); }, 3, 11);
                std::printf("csv,attention,hybridlm %s,%d,%d,%d,%d,%d,%.4f,%.4f,%.2f,%.2f\n",
                            ver == 2 ? "fp32" : "bf16", p.B, p.T, p.H, p.Hkv, p.dqk, t_f, t_fb, f / (t_f * 1e-3) * 1e-12,
                            fb / (t_fb * 1e-3) * 1e-12);
            }
        }
    }
    return ok ? 0 : 1;
}
