// crossentropy.cuh — GPU mirror of model/crossentropy.h: fused softmax + cross-entropy over the
// vocabulary (probs saved), and its backward.
//
// Targets are not range-checked on the device the way the CPU version throws (the caller checks the host
// copy of the batch); a row with an out-of-range target gets a NaN loss and never reads out of bounds.
// losses and dlosses are fp32 on every path; logits, probs, dlogits take the element type.
#pragma once
#include <cfloat>               // FLT_MAX
#include "kernels/common.cuh"   // cudaCheckLast, ceil_div, warp_sum, warp_max
#include "model/common.h"       // HL_CHECK

namespace hl::gpu {

constexpr int CE_BLOCK = 256;

// Merge two online-softmax states (max m, Σ exp(z − m) s) into the first. An empty state is (−inf, 0).
__device__ __forceinline__ void ce_merge(float& m, float& s, float m2, float s2) {
    if (s2 == 0.0f) return;  // nothing on the other side (also avoids −inf − −inf)
    if (s == 0.0f) { m = m2; s = s2; return; }
    const float M = fmaxf(m, m2);
    s = s * expf(m - M) + s2 * expf(m2 - M);
    m = M;
}

// losses (N), probs (N, V) from logits (N, V) and targets (N).
// grid: N blocks (one per row), block: 256 threads striding over the V logits (coalesced).
// Pass 1: each thread keeps an online (max, sum of exp) over its logits — one read of the row instead of
// two (max, then sum) — and the block merges the 256 states (warp shuffles, then 8 warps in shared memory).
// Pass 2: probs = exp(z − max) / sum, written. The loss is log(sum) − (z[target] − max), as the CPU.
template <typename T>
__global__ void crossentropy_forward_kernel(float* losses, T* probs, const T* logits, const int* targets, int V) {
    __shared__ float sm[CE_BLOCK / 32], ss[CE_BLOCK / 32];
    const int n = blockIdx.x, tid = threadIdx.x, lane = tid % 32, wid = tid / 32;
    const T* z = logits + (size_t)n * V;  // (V)
    T* p = probs + (size_t)n * V;         // (V)
    float m = -FLT_MAX, s = 0.0f;
    for (int v = tid; v < V; v += CE_BLOCK) {
        const float x = float(z[v]);
        if (x > m) {
            s = s * expf(m - x) + 1.0f;
            m = x;
        } else {
            s += expf(x - m);
        }
    }
    for (int off = 16; off > 0; off /= 2) {  // fixed butterfly order: deterministic
        const float m2 = __shfl_xor_sync(0xffffffffu, m, off), s2 = __shfl_xor_sync(0xffffffffu, s, off);
        ce_merge(m, s, m2, s2);
    }
    if (lane == 0) { sm[wid] = m; ss[wid] = s; }
    __syncthreads();
    m = sm[0];
    s = ss[0];
    for (int k = 1; k < CE_BLOCK / 32; k++) ce_merge(m, s, sm[k], ss[k]);  // every thread, same order
    const float inv = 1.0f / s;
    for (int v = tid; v < V; v += CE_BLOCK) p[v] = T(expf(float(z[v]) - m) * inv);
    if (tid == 0) {
        const int t = targets[n];
        losses[n] = (t >= 0 && t < V) ? logf(s) - (float(z[t]) - m) : __int_as_float(0x7fc00000);  // NaN: bad id
    }
}

// The same for short rows (V ≤ 32·CE_WARP_K: the byte vocabulary), a warp per row, 8 rows a block: each lane holds
// its ≤ CE_WARP_K logits in registers, so the max and the sum are plain passes over them and two warp reductions
// (fixed butterfly order: deterministic), with no online rescaling and no barrier. A block per row of 256 took 76 µs
// for N = 16384, V = 256 on an H200, most of it in the per-block reductions, not in its 33 MB of traffic.
constexpr int CE_WARP_K = 8;

template <typename T>
__global__ void crossentropy_forward_warp_kernel(float* losses, T* probs, const T* logits, const int* targets, int N,
                                                 int V) {
    const int n = blockIdx.x * (CE_BLOCK / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (n >= N) return;  // whole warps leave together
    const T* z = logits + (size_t)n * V;  // (V)
    T* p = probs + (size_t)n * V;         // (V)
    float x[CE_WARP_K];
    float m = -FLT_MAX;
#pragma unroll
    for (int k = 0; k < CE_WARP_K; k++) {
        const int v = lane + 32 * k;
        x[k] = v < V ? float(z[v]) : -FLT_MAX;
        m = fmaxf(m, x[k]);
    }
    m = warp_max(m);
    float s = 0.0f;
#pragma unroll
    for (int k = 0; k < CE_WARP_K; k++) {
        x[k] = lane + 32 * k < V ? expf(x[k] - m) : 0.0f;
        s += x[k];
    }
    s = warp_sum(s);
    const float inv = 1.0f / s;
#pragma unroll
    for (int k = 0; k < CE_WARP_K; k++)
        if (lane + 32 * k < V) p[lane + 32 * k] = T(x[k] * inv);
    if (lane == 0) {
        const int t = targets[n];
        losses[n] = (t >= 0 && t < V) ? logf(s) - (float(z[t]) - m) : __int_as_float(0x7fc00000);  // NaN: bad id
    }
}

template <typename T>
void crossentropy_forward(float* losses, T* probs, const T* logits, const int* targets, int N, int V,
                          cudaStream_t stream = 0) {
    HL_CHECK(N >= 0 && V > 0, "crossentropy: bad sizes N=", N, " V=", V);
    if (N == 0) return;
    if (V <= 32 * CE_WARP_K)
        crossentropy_forward_warp_kernel<<<ceil_div(N, CE_BLOCK / 32), CE_BLOCK, 0, stream>>>(losses, probs, logits,
                                                                                              targets, N, V);
    else
        crossentropy_forward_kernel<<<N, CE_BLOCK, 0, stream>>>(losses, probs, logits, targets, V);
    cudaCheckLast();
}

// dlogits (N, V), written: (probs − onehot(target)) · dlosses. grid: N blocks, block: 256 threads striding
// over the row (a pure stream: one read of probs, one write).
template <typename T>
__global__ void crossentropy_backward_kernel(T* dlogits, const float* dlosses, const T* probs, const int* targets,
                                             int V) {
    const int n = blockIdx.x;
    const float dl = dlosses[n];
    const int t = targets[n];
    const T* p = probs + (size_t)n * V;  // (V)
    T* dz = dlogits + (size_t)n * V;     // (V)
    for (int v = threadIdx.x; v < V; v += blockDim.x) {
        float g = float(p[v]) * dl;
        if (v == t) g -= dl;
        dz[v] = T(g);
    }
}

template <typename T>
void crossentropy_backward(T* dlogits, const float* dlosses, const T* probs, const int* targets, int N, int V,
                           cudaStream_t stream = 0) {
    HL_CHECK(N >= 0 && V > 0, "crossentropy: bad sizes N=", N, " V=", V);
    if (N == 0) return;
    crossentropy_backward_kernel<<<N, CE_BLOCK, 0, stream>>>(dlogits, dlosses, probs, targets, V);
    cudaCheckLast();
}

}  // namespace hl::gpu
