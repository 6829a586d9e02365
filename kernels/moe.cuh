// moe.cuh — GPU mirror of model/moe.h: the mixture-of-experts FFN (DESIGN.md "Mixture of experts"), one shared
// SwiGLU expert plus the top-1 of E routed SwiGLU experts:
//   logits = x · Rᵀ (N, E),  score = σ(logits),  e(x) = argmax_e (score_e + bias_e)  (ties → lowest index),
//   g = score_{e(x)},  out = SwiGLU_shared(x) + g · SwiGLU_{e(x)}(x).
// The router gets its gradient only through g: dg = dout · SwiGLU_e(x), dlogit_e = dg · g · (1 − g).
//
// Routed experts run as dense GEMMs on grouped rows: tokens are sorted by expert into a permuted copy xp
// (row j holds token perm[j]; groups in expert order, ascending token order inside a group), so expert e's
// tokens are the contiguous rows offsets[e] .. offsets[e+1] and each expert is one cuBLAS call per projection.
// The grouping is deterministic (no atomics decide an order) and so is the whole backward (no float atomics:
// every element has one writer; parameter gradients go through cuBLAS with beta = 1).
//
// One host synchronisation per layer and step: the forward copies offsets to acts.offsets_host to know each
// expert's row range for the cuBLAS loop; the backward reuses those numbers.
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
#include "kernels/swiglu.cuh"   // swiglu_forward/backward, swiglu_gate_forward/backward_kernel
#include "model/common.h"       // Arena, HL_CHECK
#include "model/moe.h"          // MoEConfig, MoEParams, moe_check, moe_expert_config, moe_expert
#include "model/swiglu.h"       // SwiGLUConfig, SwiGLUActs, swiglu_acts

namespace hl::gpu {

template <typename T>
struct GpuMoEActs {
    SwiGLUActs<T> shared{};       // the shared expert's activations and backward workspace
    T* shared_out = nullptr;      // (N, D)   SwiGLU_shared(x)
    T* logits = nullptr;          // (N, E)   router logits
    T* gate = nullptr;            // (N)      g = σ(logit of the chosen expert)
    int* expert = nullptr;        // (N)      chosen expert per token
    int* offsets = nullptr;       // (E+1)    expert e owns permuted rows offsets[e] .. offsets[e+1]
    int* perm = nullptr;          // (N)      permuted row j holds token perm[j] (stable within an expert)
    T* xp = nullptr;              // (N, D)   x[perm]: routed experts' input, grouped by expert
    T* h1 = nullptr;              // (N, F)   permuted rows: W1_e · xp
    T* h3 = nullptr;              // (N, F)   W3_e · xp
    T* h = nullptr;               // (N, F)   SiLU(h1) ⊙ h3
    T* yp = nullptr;              // (N, D)   SwiGLU_e(xp), permuted rows
    // backward scratch
    T* dyp = nullptr;             // (N, D)   g · dout, permuted rows
    T* dh1 = nullptr;             // (N, F)
    T* dh3 = nullptr;             // (N, F)
    T* dh = nullptr;              // (N, F)
    T* dxp = nullptr;             // (N, D)   W1 path of the routed experts' input gradient, permuted rows
    T* scratch_dxp = nullptr;     // (N, D)   W3 path
    T* dgate = nullptr;           // (N)      dL/dg = dout · SwiGLU_e(x)
    T* dlogits = nullptr;         // (N, E)   dgate · g · (1 − g) at the chosen expert, 0 elsewhere (token order)
    T* dx_router = nullptr;       // (N, D)   the router's input gradient, token order
    std::vector<int> offsets_host;  // (E+1)  host copy of offsets, written by each forward (sized here)
};

// Lays out GpuMoEActs (counting when the arenas have no base): element tensors in a, the index tensors (expert,
// offsets, perm) in ia. fp32 for now.
inline GpuMoEActs<float> gpu_moe_acts(Arena<float>& a, Arena<int>& ia, const MoEConfig& c, int N) {
    moe_check(c);
    HL_CHECK(N > 0, "moe: need N > 0 rows for activations, got ", N);
    const int D = c.d_model, F = c.d_ff, E = c.n_experts;
    GpuMoEActs<float> x;
    {
        Arena<float>::Scope s(a, "shared.");
        x.shared = swiglu_acts(a, moe_expert_config(c), N);
    }
    x.shared_out = a.take("shared_out", {N, D});
    x.logits = a.take("logits", {N, E});
    x.gate = a.take("gate", {N});
    x.expert = ia.take("expert", {N});
    x.offsets = ia.take("offsets", {E + 1});
    x.perm = ia.take("perm", {N});
    x.xp = a.take("xp", {N, D});
    x.h1 = a.take("h1", {N, F});
    x.h3 = a.take("h3", {N, F});
    x.h = a.take("h", {N, F});
    x.yp = a.take("yp", {N, D});
    x.dyp = a.take("dyp", {N, D});
    x.dh1 = a.take("dh1", {N, F});
    x.dh3 = a.take("dh3", {N, F});
    x.dh = a.take("dh", {N, F});
    x.dxp = a.take("dxp", {N, D});
    x.scratch_dxp = a.take("scratch_dxp", {N, D});
    x.dgate = a.take("dgate", {N});
    x.dlogits = a.take("dlogits", {N, E});
    x.dx_router = a.take("dx_router", {N, D});
    x.offsets_host.assign(size_t(E) + 1, 0);
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

// dinp[t] += dxp[j] + scratch_dxp[j] + dx_router[t] for t = perm[j] (one writer per element).
template <typename T>
__global__ void moe_scatter_dinp_kernel(T* dinp, const T* dxp, const T* scratch_dxp, const T* dx_router,
                                        const int* perm, int D, size_t total) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const size_t j = i / D, d = i % D;
        const size_t ti = (size_t)perm[j] * D + d;
        dinp[ti] = T(float(dinp[ti]) + (float(dxp[i]) + float(scratch_dxp[i])) + float(dx_router[ti]));
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
// host functions

// out (N, D) = SwiGLU_shared(inp) + g · SwiGLU_{e(inp)}(inp); acts hold what the backward needs. bias (E) is a
// device pointer or null (no balancing bias). Synchronises the stream once (offsets → acts.offsets_host).
template <typename T>
void moe_forward(T* out, GpuMoEActs<T>& acts, const T* inp, const MoEParams<T>& p, const T* bias, const MoEConfig& c,
                 int N, cudaStream_t stream = 0) {
    moe_check(c);
    HL_CHECK(N >= 0, "moe: bad row count N=", N);
    if (N == 0) return;
    const int D = c.d_model, F = c.d_ff, E = c.n_experts;
    HL_CHECK(acts.offsets_host.size() == size_t(E) + 1, "moe: acts laid out for another expert count");
    const SwiGLUConfig scfg = moe_expert_config(c);
    const size_t ND = (size_t)N * D, NF = (size_t)N * F;
    // shared expert
    swiglu_forward(acts.shared_out, acts.shared, inp, p.shared, scfg, N, stream);
    // router and routing
    matmul_forward(acts.logits, inp, p.router, (const T*)nullptr, N, D, E, stream);  // (N, E)
    moe_route_kernel<<<ceil_div(N, 256), 256, 0, stream>>>(acts.gate, acts.expert, acts.logits, bias, N, E);
    cudaCheckLast();
    moe_group_kernel<><<<E, MOE_GROUP_BLOCK, 0, stream>>>(acts.offsets, acts.perm, acts.expert, N, E);
    cudaCheckLast();
    moe_gather_kernel<<<elementwise_grid(ND, 256), 256, 0, stream>>>(acts.xp, inp, acts.perm, D, ND);
    cudaCheckLast();
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
    swiglu_gate_forward_kernel<<<elementwise_grid(NF, 256), 256, 0, stream>>>(acts.h, acts.h1, acts.h3, NF);
    cudaCheckLast();
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

// dinp (N, D) is written; dp.* accumulate (+=). Uses acts.offsets_host from the forward (no sync). Saved
// activations are only read, so the backward may be run again on the same acts.
template <typename T>
void moe_backward(T* dinp, MoEParams<T>& dp, const T* dout, GpuMoEActs<T>& acts, const T* inp, const MoEParams<T>& p,
                  const MoEConfig& c, int N, cudaStream_t stream = 0) {
    moe_check(c);
    HL_CHECK(N >= 0, "moe: bad row count N=", N);
    if (N == 0) return;
    const int D = c.d_model, F = c.d_ff, E = c.n_experts;
    HL_CHECK(acts.offsets_host.size() == size_t(E) + 1, "moe: acts laid out for another expert count");
    const SwiGLUConfig scfg = moe_expert_config(c);
    const size_t ND = (size_t)N * D, NF = (size_t)N * F;
    const int* off = acts.offsets_host.data();
    // shared expert: writes dinp
    swiglu_backward(dinp, dp.shared, dout, acts.shared, inp, p.shared, scfg, N, stream);
    // gate: dgate, dyp = g · dout (permuted rows), dlogits (token order); then the router as a plain matmul
    constexpr int WARPS = 8;
    moe_dgate_kernel<<<ceil_div(N, WARPS), WARPS * 32, 0, stream>>>(acts.dgate, acts.dlogits, acts.dyp, dout, acts.yp,
                                                                    acts.gate, acts.expert, acts.perm, N, D, E);
    cudaCheckLast();
    matmul_backward(acts.dx_router, dp.router, (T*)nullptr, acts.dlogits, inp, p.router, N, D, E, stream);
    // routed experts, expert by expert on their rows (empty experts skipped: their gradients get nothing), as
    // swiglu_backward does for one expert; the gate's backward runs once over all N rows in between
    for (int e = 0; e < E; e++) {
        const size_t r0 = off[e];
        const int rows = off[e + 1] - off[e];
        if (rows == 0) continue;
        matmul_backward(acts.dh + r0 * F, moe_expert(dp, c, e).w2, (T*)nullptr, acts.dyp + r0 * D, acts.h + r0 * F,
                        moe_expert(p, c, e).w2, rows, F, D, stream);  // dh = dyp · W2, dW2 += dypᵀ · h
    }
    swiglu_gate_backward_kernel<<<elementwise_grid(NF, 256), 256, 0, stream>>>(acts.dh1, acts.dh3, acts.dh, acts.h1,
                                                                               acts.h3, NF);
    cudaCheckLast();
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
