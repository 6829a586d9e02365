// moe.cuh — GPU mirror of model/moe.h: the mixture-of-experts FFN (DESIGN.md "Mixture of experts"), one shared
// SwiGLU expert plus the top-1 of E routed SwiGLU experts:
//   logits = x · Rᵀ (N, E),  score = σ(logits),  e(x) = argmax_e (score_e + bias_e)  (ties → lowest index),
//   g = score_{e(x)},  out = SwiGLU_shared(x) + g · SwiGLU_{e(x)}(x).
// The router gets its gradient only through g: dg = dout · SwiGLU_e(x), dlogit_e = dg · g · (1 − g).
//
// Routed experts run as dense GEMMs on grouped rows: tokens are sorted by expert into a permuted copy xp
// (row j holds token perm[j]; groups in expert order, ascending token order inside a group), so expert e's
// tokens are the contiguous rows offsets[e] .. offsets[e+1]. Two ways to run the experts' GEMMs (MoEGemm):
//   cublas_loop (the default)  one cuBLAS call per expert and projection. One host synchronisation per layer and
//                              step: the forward copies offsets to acts.offsets_host to know each expert's row
//                              range; the backward reuses those numbers.
//   grouped                    one launch per projection of hand-written fp32 grouped GEMMs (moe_grouped_matmul,
//                              moe_grouped_dweight) that read the offsets from device memory: no host sync at all;
//                              acts.offsets_host is not written.
// The grouping is deterministic (no atomics decide an order) and so is the whole backward (no float atomics:
// every element has one writer; parameter gradients go through cuBLAS with beta = 1, or the grouped dW kernel's
// fixed-order sums).
//
// The host layouts of model/moe.h (MoEConfig, MoEParams, moe_params, moe_expert) are used as they are on device
// memory; GpuMoEActs is MoEActs plus the two tensors of the router's cuBLAS backward (dlogits, dx_router) and the
// host copy of the offsets. Unlike the CPU, which runs swiglu_forward/backward per expert, the GPU issues the
// experts' GEMMs per expert but each elementwise pass (SwiGLU gate, gather, scatter) once over all N rows.
#pragma once
#include <cstddef>              // size_t
#include <vector>               // std::vector for offsets_host
#include <cuda_runtime.h>       // cudaStream_t, cudaMemcpyAsync, cudaStreamSynchronize
#include "kernels/common.cuh"   // cudaCheck, cudaCheckLast, ceil_div, dev_sigmoid, warp_sum, elementwise_grid
#include "kernels/matmul.cuh"   // matmul_forward/backward (cuBLAS)
#include "kernels/swiglu.cuh"   // swiglu_forward/backward, swiglu_gate_forward/backward
#include "model/common.h"       // Arena, HL_CHECK
#include "model/moe.h"          // MoEConfig, MoEParams, moe_check, moe_expert_config, moe_expert
#include "model/swiglu.h"       // SwiGLUConfig, SwiGLUActs, swiglu_acts

namespace hl::gpu {

// The CPU's MoEActs (same fields, same layout, on device memory), plus what the GPU backward keeps apart and the
// host copy of the offsets.
template <typename T>
struct GpuMoEActs : MoEActs<T> {
    T* dlogits = nullptr;         // (N, E)   dgate · g · (1 − g) at the chosen expert, 0 elsewhere (token order)
    T* dx_router = nullptr;       // (N, D)   the router's input gradient, token order
    std::vector<int> offsets_host;  // (E+1)  host copy of offsets, written by each cublas_loop forward (sized here)
};

// Lays out GpuMoEActs (counting when the arenas have no base): moe_acts's tensors, then the GPU's two. fp32 for now.
inline GpuMoEActs<float> gpu_moe_acts(Arena<float>& a, Arena<int>& ia, const MoEConfig& c, int N) {
    GpuMoEActs<float> x;
    static_cast<MoEActs<float>&>(x) = moe_acts(a, ia, c, N);
    x.dlogits = a.take_scratch("dlogits", {N, c.n_experts});
    x.dx_router = a.take_scratch("dx_router", {N, c.d_model});
    x.offsets_host.assign(size_t(c.n_experts) + 1, 0);
    return x;
}

// ---------------------------------------------------------------------------------------------------
// kernels

// Routing, one thread per token: score = σ(logit), the expert with the largest score + bias (strict > while
// walking e upwards, so ties go to the lowest index), its score as the gate. bias may be null (all zero).
template <typename T>
__global__ void moe_route_kernel(T* gate, int* expert, const T* logits, const T* bias, int N, int E) {
    const int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N) return;
    const T* l = logits + (size_t)n * E;
    float best_score = dev_sigmoid(float(l[0]));
    float best = best_score + (bias ? float(bias[0]) : 0.0f);
    int best_e = 0;
    for (int e = 1; e < E; e++) {
        const float s = dev_sigmoid(float(l[e]));
        const float v = s + (bias ? float(bias[e]) : 0.0f);
        if (v > best) best = v, best_score = s, best_e = e;
    }
    gate[n] = T(best_score);
    expert[n] = best_e;
}

__device__ __forceinline__ int warp_sum_int(int v) {
    for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

// Stable grouping, one block per expert e (grid E). The block first counts the tokens routed below e: that is
// the exclusive scan of the per-expert counts at e, i.e. offsets[e] (offsets[E] = N: every token has one
// expert). Then it walks the tokens in chunks of BLOCK, and a block-wide prefix sum of the "routed to e" flags
// (warp ballots + per-warp totals) gives each such token its row, so rows keep ascending token order. Integer
// counting only: the result does not depend on scheduling.
constexpr int MOE_GROUP_BLOCK = 256;

template <typename Unused = void>  // a template, so that every file including this header may define it
__global__ void __launch_bounds__(MOE_GROUP_BLOCK) moe_group_kernel(int* offsets, int* perm, const int* expert, int N,
                                                                     int E) {
    constexpr int NW = MOE_GROUP_BLOCK / 32;
    __shared__ int warp_part[NW];
    __shared__ int s_start;
    const int e = blockIdx.x, lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    // offsets[e] = #{n : expert[n] < e}
    int below = 0;
    for (int n = threadIdx.x; n < N; n += MOE_GROUP_BLOCK) below += expert[n] < e ? 1 : 0;
    below = warp_sum_int(below);
    if (lane == 0) warp_part[warp] = below;
    __syncthreads();
    if (threadIdx.x == 0) {
        int s = 0;
        for (int w = 0; w < NW; w++) s += warp_part[w];
        s_start = s;
        offsets[e] = s;
        if (e == E - 1) offsets[E] = N;
    }
    __syncthreads();
    int base = s_start;
    // placement; every thread runs the same number of iterations (full-warp ballots, block barriers)
    for (int n0 = 0; n0 < N; n0 += MOE_GROUP_BLOCK) {
        const int n = n0 + threadIdx.x;
        const bool mine = n < N && expert[n] == e;
        const unsigned ballot = __ballot_sync(0xffffffffu, mine);
        __syncthreads();  // the previous chunk's reads of warp_part are done
        if (lane == 0) warp_part[warp] = __popc(ballot);
        __syncthreads();
        int before = 0, total = 0;
        for (int w = 0; w < NW; w++) {
            const int c = warp_part[w];
            before += w < warp ? c : 0;
            total += c;
        }
        if (mine) perm[base + before + __popc(ballot & ((1u << lane) - 1u))] = n;
        base += total;
    }
}

// xp (N, D): row j = inp row perm[j]. Grid-stride over elements, consecutive threads along D (coalesced).
template <typename T>
__global__ void moe_gather_kernel(T* xp, const T* inp, const int* perm, int D, size_t total) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const size_t j = i / D, d = i % D;
        xp[i] = inp[(size_t)perm[j] * D + d];
    }
}

// out[t] = shared_out[t] + gate[t] · yp[j] for t = perm[j]: a scatter, one writer per element (perm is a
// permutation). Grid-stride over the permuted elements.
template <typename T>
__global__ void moe_combine_kernel(T* out, const T* shared_out, const T* gate, const T* yp, const int* perm, int D,
                                   size_t total) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const size_t j = i / D, d = i % D;
        const size_t t = (size_t)perm[j];
        out[t * D + d] = T(float(shared_out[t * D + d]) + float(gate[t]) * float(yp[i]));
    }
}

// One warp per permuted row j (token t = perm[j], expert e): dgate[t] = dout[t] · yp[j] (lane-strided dot, fixed
// butterfly sum), dyp[j] = g · dout[t], and the router row dlogits[t, :] = 0 except dgate · g · (1 − g) at e.
template <typename T>
__global__ void moe_dgate_kernel(T* dgate, T* dlogits, T* dyp, const T* dout, const T* yp, const T* gate,
                                 const int* expert, const int* perm, int N, int D, int E) {
    const int j = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (j >= N) return;  // whole warps leave together: j is uniform within a warp
    const size_t t = (size_t)perm[j];
    const float g = float(gate[t]);
    const T* dt = dout + t * D;
    const T* y = yp + (size_t)j * D;
    T* dy = dyp + (size_t)j * D;
    float dot = 0.0f;
    for (int d = lane; d < D; d += 32) {
        const float go = float(dt[d]);
        dot += go * float(y[d]);
        dy[d] = T(g * go);
    }
    dot = warp_sum(dot);
    if (lane == 0) dgate[t] = T(dot);
    const int e = expert[t];
    for (int k = lane; k < E; k += 32) dlogits[t * E + k] = T(k == e ? dot * g * (1.0f - g) : 0.0f);
}

// dinp[t] += dxp[j] + scratch_dxp[j] + dx_router[t] for t = perm[j] (one writer per element). scratch_dxp may be
// null: the grouped path sums both input-gradient paths into dxp.
template <typename T>
__global__ void moe_scatter_dinp_kernel(T* dinp, const T* dxp, const T* scratch_dxp, const T* dx_router,
                                        const int* perm, int D, size_t total) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const size_t j = i / D, d = i % D;
        const size_t ti = (size_t)perm[j] * D + d;
        const float w3_path = scratch_dxp ? float(scratch_dxp[i]) : 0.0f;
        dinp[ti] = T(float(dinp[ti]) + (float(dxp[i]) + w3_path) + float(dx_router[ti]));
    }
}

// bias_e += rate · sign(N/E − load_e), N = offsets[E] − offsets[0], load_e = offsets[e+1] − offsets[e]; the sign
// from integers, N − E·load_e, and the same float add as the CPU (so the result is bit-identical).
template <typename T>
__global__ void moe_update_bias_kernel(T* bias, const int* offsets, int E, double rate) {
    const long long N = offsets[E] - offsets[0];
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        const long long diff = N - (long long)E * (offsets[e + 1] - offsets[e]);
        if (diff > 0) bias[e] += T(rate);
        if (diff < 0) bias[e] -= T(rate);
    }
}

// ---------------------------------------------------------------------------------------------------
// grouped GEMMs: every expert's matmul in one launch, the groups read from the device offsets (no host sync)
//
// Both kernels compute 128×128 output tiles, 256 threads each holding an 8×8 block of accumulators (rows
// ty·4 + {0..3} and 64 + ty·4 + {0..3}, columns likewise with tx: float4 reads of shared memory, a warp's B reads
// contiguous), over the reduction in steps of 8 staged through shared memory, the next step's global loads issued
// before the current step's FMAs (register prefetch). Sizes need not be multiples of anything: out-of-range
// operand elements load as 0 and out-of-range outputs are not written. fp32 accumulation, one writer per output
// element and a fixed summation order: deterministic.

constexpr int GG_TILE = 128;     // output tile edge (rows and columns)
constexpr int GG_HALF = GG_TILE / 2;
constexpr int GG_BK = 8;         // reduction step
constexpr int GG_PAD = 4;        // shared rows of 132 floats: conflict-free transposed stores, float4-aligned rows
constexpr int GG_THREADS = 256;  // 16 × 16 threads, 8 × 8 outputs each
constexpr int GG_LOADS = GG_TILE * GG_BK / GG_THREADS;  // operand elements per thread and step (4)
static_assert(GG_LOADS * GG_THREADS == GG_TILE * GG_BK, "tile loads must split evenly over the threads");

// One operand's step: element (o, red) for o in [0, GG_TILE) of the tile's output index and red in [red0, red0 + 8)
// of the reduction, at p[o · ld + red] when RED_CONTIG (contiguous along the reduction, e.g. x · Wᵀ's rows), else
// at p[red · ld + o]. Consecutive threads take consecutive addresses either way; o ≥ o_limit or red ≥ red_limit
// give 0.
template <bool RED_CONTIG, typename T>
__device__ __forceinline__ void gg_load(float (&r)[GG_LOADS], const T* p, int ld, int o_limit, int red0,
                                        int red_limit) {
#pragma unroll
    for (int i = 0; i < GG_LOADS; i++) {
        const int idx = threadIdx.x + i * GG_THREADS;
        const int o = RED_CONTIG ? idx / GG_BK : idx % GG_TILE;
        const int red = red0 + (RED_CONTIG ? idx % GG_BK : idx / GG_TILE);
        const size_t at = RED_CONTIG ? (size_t)o * ld + red : (size_t)red * ld + o;
        r[i] = (o < o_limit && red < red_limit) ? float(p[at]) : 0.0f;
    }
}

// ... and into shared memory as s[red][o] (the same index mapping as gg_load).
template <bool RED_CONTIG>
__device__ __forceinline__ void gg_store(float (*s)[GG_TILE + GG_PAD], const float (&r)[GG_LOADS]) {
#pragma unroll
    for (int i = 0; i < GG_LOADS; i++) {
        const int idx = threadIdx.x + i * GG_THREADS;
        const int o = RED_CONTIG ? idx / GG_BK : idx % GG_TILE;
        const int red = RED_CONTIG ? idx % GG_BK : idx / GG_TILE;
        s[red][o] = r[i];
    }
}

// acc[i][j] = Σ_red a(row i, red) · b(col j, red) over red in [0, red_count), for this thread's 8 × 8 outputs
// (gg_row(i), gg_col(j)) of the tile; a holds a_limit valid tile rows, b b_limit valid tile columns (layouts as
// gg_load). Every thread of the block must call it (it has barriers); red_count must be the same for all.
template <bool A_RED_CONTIG, bool B_RED_CONTIG, typename T>
__device__ __forceinline__ void gg_tile(float (&acc)[8][8], const T* a, int lda, int a_limit, const T* b, int ldb,
                                        int b_limit, int red_count) {
    __shared__ __align__(16) float As[GG_BK][GG_TILE + GG_PAD];
    __shared__ __align__(16) float Bs[GG_BK][GG_TILE + GG_PAD];
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    float ra[GG_LOADS], rb[GG_LOADS];
    gg_load<A_RED_CONTIG>(ra, a, lda, a_limit, 0, red_count);
    gg_load<B_RED_CONTIG>(rb, b, ldb, b_limit, 0, red_count);
    gg_store<A_RED_CONTIG>(As, ra);
    gg_store<B_RED_CONTIG>(Bs, rb);
    __syncthreads();
    for (int red0 = 0; red0 < red_count; red0 += GG_BK) {
        const bool more = red0 + GG_BK < red_count;  // the same for the whole block
        if (more) {  // the next step's global loads, in flight during the FMAs below
            gg_load<A_RED_CONTIG>(ra, a, lda, a_limit, red0 + GG_BK, red_count);
            gg_load<B_RED_CONTIG>(rb, b, ldb, b_limit, red0 + GG_BK, red_count);
        }
#pragma unroll
        for (int k = 0; k < GG_BK; k++) {
            const float4 a0 = *reinterpret_cast<const float4*>(&As[k][ty * 4]);
            const float4 a1 = *reinterpret_cast<const float4*>(&As[k][GG_HALF + ty * 4]);
            const float4 b0 = *reinterpret_cast<const float4*>(&Bs[k][tx * 4]);
            const float4 b1 = *reinterpret_cast<const float4*>(&Bs[k][GG_HALF + tx * 4]);
            const float av[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
            const float bv[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
            for (int i = 0; i < 8; i++)
#pragma unroll
                for (int j = 0; j < 8; j++) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
        }
        __syncthreads();  // everyone is done reading this step's tiles
        if (more) {
            gg_store<A_RED_CONTIG>(As, ra);
            gg_store<B_RED_CONTIG>(Bs, rb);
        }
        __syncthreads();  // the next step's tiles are in place
    }
}

// the tile row of accumulator row i (ty = threadIdx.x / 16), the tile column of accumulator column j (tx)
__device__ __forceinline__ int gg_row(int i) { return (i / 4) * GG_HALF + (int(threadIdx.x) / 16) * 4 + i % 4; }
__device__ __forceinline__ int gg_col(int j) { return (j / 4) * GG_HALF + (int(threadIdx.x) % 16) * 4 + j % 4; }

// Row-grouped GEMM: for every group e, the rows r in [offsets[e], offsets[e+1]) of out (·, OC) get
//   out[r] = inp[r] · W_eᵀ,  W_e (OC, C)   when TRANSPOSE_W (stacked weight (E, OC, C): the forward's x · Wᵀ)
//   out[r] = inp[r] · W_e,   W_e (C, OC)   otherwise        (stacked weight (E, C, OC): the input gradient dy · W)
// (+= instead of = when accumulate). blockIdx.x enumerates the (group, row tile) pairs in group order — group e
// has ceil(count_e / 128) tiles — and blockIdx.y the column tiles; a block past the last pair has no work and
// leaves at once (all its threads read the same offsets, so the whole block leaves, before any barrier). Rows
// outside every group are not touched.
template <bool TRANSPOSE_W, typename T>
__global__ void __launch_bounds__(GG_THREADS) moe_grouped_matmul_kernel(T* out, const T* inp, const T* weight,
                                                                        const int* offsets, int C, int OC, int E,
                                                                        bool accumulate) {
    int tile = blockIdx.x, e = 0;
    for (; e < E; e++) {  // which group's which row tile is this block's
        const int count = offsets[e + 1] - offsets[e];
        const int tiles = count > 0 ? ceil_div(count, GG_TILE) : 0;
        if (tile < tiles) break;
        tile -= tiles;
    }
    if (e == E) return;  // uniform: past the last tile
    const int r0 = offsets[e] + tile * GG_TILE;       // the tile's first row
    const int rows = min(GG_TILE, offsets[e + 1] - r0);  // its rows inside group e, ≥ 1
    const int n0 = blockIdx.y * GG_TILE;              // its first output column
    const T* a = inp + (size_t)r0 * C;                // (rows, C), row-major: contiguous along the reduction
    const T* w = weight + (size_t)e * OC * C;
    // B(col n, red k) = W_e[n, k] at w[n·C + k] (TRANSPOSE_W) or W_e[k, n] at w[k·OC + n]
    const T* b = TRANSPOSE_W ? w + (size_t)n0 * C : w + n0;
    float acc[8][8] = {};
    gg_tile<true, TRANSPOSE_W>(acc, a, C, rows, b, TRANSPOSE_W ? C : OC, OC - n0, C);
#pragma unroll
    for (int i = 0; i < 8; i++) {
        const int row = gg_row(i);
        if (row >= rows) continue;
        T* o = out + (size_t)(r0 + row) * OC;
#pragma unroll
        for (int j = 0; j < 8; j++) {
            const int col = n0 + gg_col(j);
            if (col < OC) o[col] = T(accumulate ? float(o[col]) + acc[i][j] : acc[i][j]);
        }
    }
}

// Weight gradient per group: dW_e (OC, C) += Σ_{r in [offsets[e], offsets[e+1])} dout[r]ᵀ · inp[r], i.e.
// dW_e += dout_eᵀ · inp_e with dout (·, OC), inp (·, C). Grid (column tiles of C, row tiles of OC, E); each block
// walks its group's rows in steps of 8, in row order. An empty group's blocks leave at once (uniformly): its
// gradient is left exactly as it was.
template <typename T>
__global__ void __launch_bounds__(GG_THREADS) moe_grouped_dweight_kernel(T* dweight, const T* dout, const T* inp,
                                                                         const int* offsets, int C, int OC) {
    const int e = blockIdx.z;
    const int g0 = offsets[e], count = offsets[e + 1] - g0;
    if (count <= 0) return;  // uniform: nothing to add
    const int m0 = blockIdx.y * GG_TILE, k0 = blockIdx.x * GG_TILE;
    float acc[8][8] = {};
    // A(row m, red r) = dout[g0 + r, m0 + m], B(col k, red r) = inp[g0 + r, k0 + k]: both contiguous along the
    // output index
    gg_tile<false, false>(acc, dout + (size_t)g0 * OC + m0, OC, OC - m0, inp + (size_t)g0 * C + k0, C, C - k0, count);
    T* dw = dweight + (size_t)e * OC * C;
#pragma unroll
    for (int i = 0; i < 8; i++) {
        const int m = m0 + gg_row(i);
        if (m >= OC) continue;
        T* d = dw + (size_t)m * C;
#pragma unroll
        for (int j = 0; j < 8; j++) {
            const int k = k0 + gg_col(j);
            if (k < C) d[k] = T(float(d[k]) + acc[i][j]);
        }
    }
}

// The host sides. offsets (E+1) is device memory, ascending, with offsets[E] − offsets[0] ≤ N: N bounds the rows,
// which sizes the grid (Σ_e ceil(count_e / 128) ≤ ceil(N / 128) + E row tiles). No synchronisation.

// out (N, OC) rows of group e = inp (N, C) rows · W_eᵀ (TRANSPOSE_W, weight (E, OC, C)) or · W_e (weight
// (E, C, OC)); written, or added to when accumulate.
template <bool TRANSPOSE_W, typename T>
void moe_grouped_matmul(T* out, const T* inp, const T* weight, const int* offsets, int N, int C, int OC, int E,
                        bool accumulate, cudaStream_t stream = 0) {
    HL_CHECK(N >= 0 && C > 0 && OC > 0 && E > 0, "moe_grouped_matmul: bad sizes N=", N, " C=", C, " OC=", OC,
             " E=", E);
    HL_CHECK(ceil_div(OC, GG_TILE) <= 65535, "moe_grouped_matmul: OC=", OC, " too large for the grid");
    if (N == 0) return;
    const dim3 grid(unsigned(ceil_div(N, GG_TILE) + E), unsigned(ceil_div(OC, GG_TILE)));
    moe_grouped_matmul_kernel<TRANSPOSE_W><<<grid, GG_THREADS, 0, stream>>>(out, inp, weight, offsets, C, OC, E,
                                                                           accumulate);
    cudaCheckLast();
}

// dweight (E, OC, C) += per group e: dout (N, OC) rowsᵀ · inp (N, C) rows.
template <typename T>
void moe_grouped_dweight(T* dweight, const T* dout, const T* inp, const int* offsets, int N, int C, int OC, int E,
                         cudaStream_t stream = 0) {
    HL_CHECK(N >= 0 && C > 0 && OC > 0 && E > 0, "moe_grouped_dweight: bad sizes N=", N, " C=", C, " OC=", OC,
             " E=", E);
    HL_CHECK(ceil_div(OC, GG_TILE) <= 65535 && E <= 65535, "moe_grouped_dweight: OC=", OC, " or E=", E,
             " too large for the grid");
    if (N == 0) return;
    const dim3 grid(unsigned(ceil_div(C, GG_TILE)), unsigned(ceil_div(OC, GG_TILE)), unsigned(E));
    moe_grouped_dweight_kernel<<<grid, GG_THREADS, 0, stream>>>(dweight, dout, inp, offsets, C, OC);
    cudaCheckLast();
}

// ---------------------------------------------------------------------------------------------------
// host functions

// How the routed experts' GEMMs run:
//   cublas_loop  one cuBLAS call per expert and projection, on the row ranges of the host copy of the offsets:
//                one host sync per forward (the copy into acts.offsets_host), which the backward reuses
//   grouped      moe_grouped_matmul / moe_grouped_dweight, one launch per projection, reading the device offsets:
//                no host sync in the forward or the backward, and acts.offsets_host is NOT written (it keeps
//                whatever it held: the load statistics read from it must come from elsewhere on this path)
// The forward and the backward of one step must use the same one (the cuBLAS backward needs the forward's host
// offsets).
enum class MoEGemm { cublas_loop, grouped };

// out (N, D) = SwiGLU_shared(inp) + g · SwiGLU_{e(inp)}(inp); acts hold what the backward needs. bias (E) is a
// device pointer or null (no balancing bias). With MoEGemm::cublas_loop, synchronises the stream once (offsets →
// acts.offsets_host); with MoEGemm::grouped, never (and acts.offsets_host is left as it was).
template <typename T>
void moe_forward(T* out, GpuMoEActs<T>& acts, const T* inp, const MoEParams<T>& p, const T* bias, const MoEConfig& c,
                 int N, cudaStream_t stream = 0, MoEGemm gemm = MoEGemm::cublas_loop) {
    moe_check(c);
    HL_CHECK(N >= 0, "moe: bad row count N=", N);
    if (N == 0) return;
    const int D = c.d_model, F = c.d_ff, E = c.n_experts;
    HL_CHECK(acts.offsets_host.size() == size_t(E) + 1, "moe: acts laid out for another expert count");
    const SwiGLUConfig scfg = moe_expert_config(c);
    const size_t ND = (size_t)N * D, NF = (size_t)N * F;
    // shared expert
    swiglu_forward(acts.shared_out, acts.shared, inp, p.shared, scfg, N, stream);
    // router and routing; the router's matmul stays fp32 under bf16 operands (kernels/matmul.cuh): its logits pick
    // the experts, and rounding them could flip a near-tie between two
    {
        const Bf16Scope fp32_router(nullptr);
        matmul_forward(acts.logits, inp, p.router, (const T*)nullptr, N, D, E, stream);  // (N, E)
    }
    moe_route_kernel<<<ceil_div(N, 256), 256, 0, stream>>>(acts.gate, acts.expert, acts.logits, bias, N, E);
    cudaCheckLast();
    moe_group_kernel<><<<E, MOE_GROUP_BLOCK, 0, stream>>>(acts.offsets, acts.perm, acts.expert, N, E);
    cudaCheckLast();
    moe_gather_kernel<<<elementwise_grid(ND, 256), 256, 0, stream>>>(acts.xp, inp, acts.perm, D, ND);
    cudaCheckLast();
    if (gemm == MoEGemm::grouped) {  // the experts' row ranges stay on the device
        moe_grouped_matmul<true>(acts.h1, acts.xp, p.w1, acts.offsets, N, D, F, E, false, stream);  // xp · W1_eᵀ
        moe_grouped_matmul<true>(acts.h3, acts.xp, p.w3, acts.offsets, N, D, F, E, false, stream);  // xp · W3_eᵀ
        swiglu_gate_forward(acts.h, acts.h1, acts.h3, NF, stream);
        moe_grouped_matmul<true>(acts.yp, acts.h, p.w2, acts.offsets, N, F, D, E, false, stream);  // h · W2_eᵀ
        moe_combine_kernel<<<elementwise_grid(ND, 256), 256, 0, stream>>>(out, acts.shared_out, acts.gate, acts.yp,
                                                                          acts.perm, D, ND);
        cudaCheckLast();
        return;
    }
    // THE host sync of the MoE layer: the cuBLAS loop needs each expert's row range on the host. The backward
    // reuses acts.offsets_host (no second sync).
    int* off = acts.offsets_host.data();
    cudaCheck(cudaMemcpyAsync(off, acts.offsets, (size_t(E) + 1) * sizeof(int), cudaMemcpyDeviceToHost, stream));
    cudaCheck(cudaStreamSynchronize(stream));
    // routed experts: expert e on its rows [r0, r0 + rows) of the permuted tensors; empty experts are skipped
    for (int e = 0; e < E; e++) {
        const size_t r0 = off[e];
        const int rows = off[e + 1] - off[e];
        if (rows == 0) continue;
        const SwiGLUParams<T> w = moe_expert(p, c, e);
        matmul_forward(acts.h1 + r0 * F, acts.xp + r0 * D, w.w1, (const T*)nullptr, rows, D, F, stream);
        matmul_forward(acts.h3 + r0 * F, acts.xp + r0 * D, w.w3, (const T*)nullptr, rows, D, F, stream);
    }
    // the SwiGLU gate once over all N rows (every row belongs to one expert, so all of h1, h3 are written)
    swiglu_gate_forward(acts.h, acts.h1, acts.h3, NF, stream);
    for (int e = 0; e < E; e++) {
        const size_t r0 = off[e];
        const int rows = off[e + 1] - off[e];
        if (rows == 0) continue;
        matmul_forward(acts.yp + r0 * D, acts.h + r0 * F, moe_expert(p, c, e).w2, (const T*)nullptr, rows, F, D,
                       stream);
    }
    moe_combine_kernel<<<elementwise_grid(ND, 256), 256, 0, stream>>>(out, acts.shared_out, acts.gate, acts.yp,
                                                                      acts.perm, D, ND);
    cudaCheckLast();
}

// dinp (N, D) is written; dp.* accumulate (+=). No sync: MoEGemm::cublas_loop uses acts.offsets_host from a
// cublas_loop forward, MoEGemm::grouped the device offsets. Saved activations are only read, so the backward may
// be run again on the same acts.
template <typename T>
void moe_backward(T* dinp, MoEParams<T>& dp, const T* dout, GpuMoEActs<T>& acts, const T* inp, const MoEParams<T>& p,
                  const MoEConfig& c, int N, cudaStream_t stream = 0, MoEGemm gemm = MoEGemm::cublas_loop) {
    moe_check(c);
    HL_CHECK(N >= 0, "moe: bad row count N=", N);
    if (N == 0) return;
    const int D = c.d_model, F = c.d_ff, E = c.n_experts;
    HL_CHECK(acts.offsets_host.size() == size_t(E) + 1, "moe: acts laid out for another expert count");
    const SwiGLUConfig scfg = moe_expert_config(c);
    const size_t ND = (size_t)N * D, NF = (size_t)N * F;
    const int* off = acts.offsets_host.data();
    // a grouped forward leaves offsets_host alone: catch a cuBLAS backward without its cuBLAS forward (a stale
    // copy from an earlier cuBLAS forward is the caller's to avoid)
    HL_CHECK(gemm == MoEGemm::grouped || off[E] - off[0] == N,
             "moe: the cublas_loop backward needs the host offsets of a cublas_loop forward of these N=", N, " rows");
    // shared expert: writes dinp
    swiglu_backward(dinp, dp.shared, dout, acts.shared, inp, p.shared, scfg, N, stream);
    // gate: dgate, dyp = g · dout (permuted rows), dlogits (token order); then the router as a plain matmul
    constexpr int WARPS = 8;
    moe_dgate_kernel<<<ceil_div(N, WARPS), WARPS * 32, 0, stream>>>(acts.dgate, acts.dlogits, acts.dyp, dout, acts.yp,
                                                                    acts.gate, acts.expert, acts.perm, N, D, E);
    cudaCheckLast();
    {
        const Bf16Scope fp32_router(nullptr);  // as in the forward
        matmul_backward(acts.dx_router, dp.router, (T*)nullptr, acts.dlogits, inp, p.router, N, D, E, stream);
    }
    if (gemm == MoEGemm::grouped) {  // the same steps, one launch each, rows grouped by the device offsets
        moe_grouped_matmul<false>(acts.dh, acts.dyp, p.w2, acts.offsets, N, D, F, E, false, stream);  // dyp · W2_e
        moe_grouped_dweight(dp.w2, acts.dyp, acts.h, acts.offsets, N, F, D, E, stream);  // dW2_e += dyp_eᵀ · h_e
        swiglu_gate_backward(acts.dh1, acts.dh3, acts.dh, acts.h1, acts.h3, NF, stream);
        moe_grouped_matmul<false>(acts.dxp, acts.dh1, p.w1, acts.offsets, N, F, D, E, false, stream);  // dh1 · W1_e
        moe_grouped_matmul<false>(acts.dxp, acts.dh3, p.w3, acts.offsets, N, F, D, E, true, stream);   // + dh3 · W3_e
        moe_grouped_dweight(dp.w1, acts.dh1, acts.xp, acts.offsets, N, D, F, E, stream);  // dW1_e += dh1_eᵀ · xp_e
        moe_grouped_dweight(dp.w3, acts.dh3, acts.xp, acts.offsets, N, D, F, E, stream);  // dW3_e += dh3_eᵀ · xp_e
        // both paths are in dxp already: no scratch_dxp term
        moe_scatter_dinp_kernel<<<elementwise_grid(ND, 256), 256, 0, stream>>>(dinp, acts.dxp, (const T*)nullptr,
                                                                               acts.dx_router, acts.perm, D, ND);
        cudaCheckLast();
        return;
    }
    // routed experts, expert by expert on their rows (empty experts skipped: their gradients get nothing), as
    // swiglu_backward does for one expert; the gate's backward runs once over all N rows in between
    for (int e = 0; e < E; e++) {
        const size_t r0 = off[e];
        const int rows = off[e + 1] - off[e];
        if (rows == 0) continue;
        matmul_backward(acts.dh + r0 * F, moe_expert(dp, c, e).w2, (T*)nullptr, acts.dyp + r0 * D, acts.h + r0 * F,
                        moe_expert(p, c, e).w2, rows, F, D, stream);  // dh = dyp · W2, dW2 += dypᵀ · h
    }
    swiglu_gate_backward(acts.dh1, acts.dh3, acts.dh, acts.h1, acts.h3, NF, stream);
    for (int e = 0; e < E; e++) {
        const size_t r0 = off[e];
        const int rows = off[e + 1] - off[e];
        if (rows == 0) continue;
        const SwiGLUParams<T> w = moe_expert(p, c, e), dw = moe_expert(dp, c, e);
        matmul_backward(acts.dxp + r0 * D, dw.w1, (T*)nullptr, acts.dh1 + r0 * F, acts.xp + r0 * D, w.w1, rows, D, F,
                        stream);  // W1 path
        matmul_backward(acts.scratch_dxp + r0 * D, dw.w3, (T*)nullptr, acts.dh3 + r0 * F, acts.xp + r0 * D, w.w3, rows,
                        D, F, stream);  // W3 path
    }
    // back to token order, with the router's part
    moe_scatter_dinp_kernel<<<elementwise_grid(ND, 256), 256, 0, stream>>>(dinp, acts.dxp, acts.scratch_dxp,
                                                                           acts.dx_router, acts.perm, D, ND);
    cudaCheckLast();
}

// bias (E, device) += rate · sign(N/E − count_e), the counts read from the device offsets of the last forward;
// one tiny kernel, no host sync.
template <typename T>
void moe_update_bias(T* bias, const int* offsets, int E, double rate, cudaStream_t stream = 0) {
    HL_CHECK(E > 0, "moe: bad expert count E=", E);
    moe_update_bias_kernel<<<1, 32, 0, stream>>>(bias, offsets, E, rate);
    cudaCheckLast();
}

}  // namespace hl::gpu
