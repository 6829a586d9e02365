// conv1d.cuh — GPU mirror of model/conv1d.h: the causal depthwise conv1d of the Mamba-2 mixer, with bias
// and a fused SiLU, forward and backward.
//   pre[t, c] = bias[c] + Σ_{k<K} w[c, k] · inp[t − (K−1) + k, c]      out = SiLU(pre)
// Shapes: inp, pre, out, dout, dinp (B, T, C)   w (C, K)   bias (C).
//
// Mapping shared by the kernels: threads run along channels (consecutive threads, consecutive c: every
// warp access is one contiguous 128-byte row segment), and each thread walks a run of consecutive time
// steps of one channel keeping the last K values in registers (a sliding window), so each input is loaded
// once per thread instead of K times. K is a template parameter (dispatched at run time, 1…8) so the
// window is a register array.
// The weight/bias gradient is a reduction over all B·T rows: done without atomics, deterministic (see
// conv1d_silu_dw_kernel).
#pragma once
#include <algorithm>            // std::min
#include <type_traits>          // std::integral_constant
#include "kernels/common.cuh"   // cudaCheckLast, ceil_div, dev_silu, dev_silu_grad
#include "model/common.h"       // HL_CHECK

namespace hl::gpu {

constexpr int CONV_MAX_K = 8;
constexpr int CONV_TILE_T = 32;   // time steps per thread (forward, dinp): halo overhead (K−1)/32
constexpr int CONV_BLOCK = 128;   // threads along channels (forward, dinp)
constexpr int CONV_DW_TW = 8;     // channels per block of the weight-gradient kernel
constexpr int CONV_DW_LANES = 64; // row lanes per block of the weight-gradient kernel

// Calls f(std::integral_constant<int, K>{}) for the run-time K: instantiates each kernel for K = 1…8.
template <typename F>
void conv1d_dispatch_k(int K, F&& f) {
    switch (K) {
        case 1: f(std::integral_constant<int, 1>{}); break;
        case 2: f(std::integral_constant<int, 2>{}); break;
        case 3: f(std::integral_constant<int, 3>{}); break;
        case 4: f(std::integral_constant<int, 4>{}); break;
        case 5: f(std::integral_constant<int, 5>{}); break;
        case 6: f(std::integral_constant<int, 6>{}); break;
        case 7: f(std::integral_constant<int, 7>{}); break;
        case 8: f(std::integral_constant<int, 8>{}); break;
        default: HL_CHECK(false, "conv1d: kernel length K=", K, " not supported on the GPU (1..", CONV_MAX_K, ")");
    }
}

// grid: x over ceil(C / 128) channel blocks, y over (b, time tile of 32) pairs (grid-stride in y);
// block: 128 threads along channels. Thread (c, b, tile) slides a K-window over times t0 … t0+31.
template <int K, typename T>
__global__ void conv1d_silu_forward_kernel(T* out, T* pre, const T* inp, const T* w, const T* bias, int B, int T_,
                                           int C) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float wk[K];
#pragma unroll
    for (int k = 0; k < K; k++) wk[k] = float(w[(size_t)c * K + k]);
    const float bc = float(bias[c]);
    const int tiles = ceil_div(T_, CONV_TILE_T);
    for (int bt = blockIdx.y; bt < B * tiles; bt += gridDim.y) {
        const int b = bt / tiles, t0 = (bt % tiles) * CONV_TILE_T;
        const int t1 = min(t0 + CONV_TILE_T, T_);
        const size_t base = (size_t)b * T_ * C + c;  // (b, 0, c); time t at base + t·C
        float win[K];  // win[k] = inp at time t − (K−1) + k; the K−1 older taps preloaded (0 before t = 0)
#pragma unroll
        for (int k = 0; k < K - 1; k++) {
            const int s = t0 - (K - 1) + k;  // win[k + 1] moves to win[k] at the first step
            win[k + 1] = s >= 0 ? float(inp[base + (size_t)s * C]) : 0.0f;
        }
        for (int t = t0; t < t1; t++) {
#pragma unroll
            for (int k = 0; k < K - 1; k++) win[k] = win[k + 1];
            win[K - 1] = float(inp[base + (size_t)t * C]);
            float acc = bc;
#pragma unroll
            for (int k = 0; k < K; k++) acc += wk[k] * win[k];
            pre[base + (size_t)t * C] = T(acc);
            out[base + (size_t)t * C] = T(dev_silu(acc));
        }
    }
}

// out and pre (saved for the backward) are written.
template <typename T>
void conv1d_silu_forward(T* out, T* pre, const T* inp, const T* w, const T* bias, int B, int T_, int C, int K,
                         cudaStream_t stream = 0) {
    HL_CHECK(B > 0 && T_ > 0 && C > 0 && K > 0, "conv1d: bad sizes B=", B, " T=", T_, " C=", C, " K=", K,
             " (all must be positive)");
    const int tiles = ceil_div(T_, CONV_TILE_T);
    dim3 grid(ceil_div(C, CONV_BLOCK), (unsigned)std::min(B * tiles, 65535));
    conv1d_dispatch_k(K, [&](auto kc) {
        conv1d_silu_forward_kernel<decltype(kc)::value><<<grid, CONV_BLOCK, 0, stream>>>(out, pre, inp, w, bias, B, T_, C);
        cudaCheckLast();
    });
}

// dpre = dout ⊙ SiLU'(pre), recomputed where read (no scratch), as the CPU.
template <typename T>
__device__ __forceinline__ float conv1d_dpre(const T* dout, const T* pre, size_t i) {
    return float(dout[i]) * dev_silu_grad(float(pre[i]));
}

// dinp[s, c] = Σ_k dpre[s + (K−1) − k, c] · w[c, k]: the gradient looks forward in time, so each thread
// walks its tile backwards (s = t1−1 … t0) with a window of the next K dpre values (preloaded past the
// tile's end, 0 past T). Same grid/block as the forward.
template <int K, typename T>
__global__ void conv1d_silu_dinp_kernel(T* dinp, const T* dout, const T* pre, const T* w, int B, int T_, int C) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float wk[K];
#pragma unroll
    for (int k = 0; k < K; k++) wk[k] = float(w[(size_t)c * K + k]);
    const int tiles = ceil_div(T_, CONV_TILE_T);
    for (int bt = blockIdx.y; bt < B * tiles; bt += gridDim.y) {
        const int b = bt / tiles, t0 = (bt % tiles) * CONV_TILE_T;
        const int t1 = min(t0 + CONV_TILE_T, T_);
        const size_t base = (size_t)b * T_ * C + c;
        float fut[K];  // fut[j] = dpre at time s + j
#pragma unroll
        for (int j = 1; j < K; j++) {
            const int t = t1 - 1 + j;  // fut[j − 1] moves to fut[j] at the first step (s = t1 − 1)
            fut[j - 1] = t < T_ ? conv1d_dpre(dout, pre, base + (size_t)t * C) : 0.0f;
        }
        for (int s = t1 - 1; s >= t0; s--) {
#pragma unroll
            for (int j = K - 1; j > 0; j--) fut[j] = fut[j - 1];
            fut[0] = conv1d_dpre(dout, pre, base + (size_t)s * C);
            float acc = 0.0f;
#pragma unroll
            for (int k = 0; k < K; k++) acc += fut[K - 1 - k] * wk[k];
            dinp[base + (size_t)s * C] = T(acc);
        }
    }
}

// dw (C, K) += Σ_{b,t} dpre[t, c] · inp[t − (K−1) + k, c],   dbias (C) += Σ_{b,t} dpre[t, c]
// grid: ceil(C / 8) blocks; block: 8 channels × 64 row lanes (512 threads). The B·T rows are cut into 64
// contiguous ranges, one per lane; a lane walks its range with a K-window of inputs (reset to zeros where
// a sequence starts, since the conv is causal per sequence) and keeps K + 1 partial sums in registers.
// A warp spans 8 channels × 4 lanes: four 32-byte segments per load, each fully used. The lanes' partials
// are then added in a fixed tree order in shared memory: deterministic, no atomics.
template <int K, typename T>
__global__ void conv1d_silu_dw_kernel(T* dw, T* dbias, const T* dout, const T* pre, const T* inp, int B, int T_,
                                      int C) {
    __shared__ float part[K + 1][CONV_DW_LANES][CONV_DW_TW];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int c = blockIdx.x * CONV_DW_TW + tx;
    float acc[K + 1];
#pragma unroll
    for (int k = 0; k <= K; k++) acc[k] = 0.0f;
    if (c < C) {
        const long long N = (long long)B * T_;
        const long long per = (N + CONV_DW_LANES - 1) / CONV_DW_LANES;
        const long long n0 = ty * per, n1 = n0 + per < N ? n0 + per : N;
        float win[K];  // win[k] = inp at time t − (K−1) + k of the current row's sequence
        if (n0 < n1) {
            const int t = (int)(n0 % T_);
#pragma unroll
            for (int k = 0; k < K - 1; k++) {
                const int s = t - (K - 1) + k;  // win[k + 1] moves to win[k] at the first step
                win[k + 1] = s >= 0 ? float(inp[(size_t)(n0 - t + s) * C + c]) : 0.0f;
            }
        }
        int t = (int)(n0 % T_) - 1;  // time of row n, advanced incrementally (no 64-bit modulo per row)
        for (long long n = n0; n < n1; n++) {
            if (++t == T_) t = 0;
            if (t == 0) {
#pragma unroll
                for (int k = 0; k < K; k++) win[k] = 0.0f;  // a new sequence: nothing before it
            }
#pragma unroll
            for (int k = 0; k < K - 1; k++) win[k] = win[k + 1];
            const size_t i = (size_t)n * C + c;
            win[K - 1] = float(inp[i]);
            const float d = conv1d_dpre(dout, pre, i);
#pragma unroll
            for (int k = 0; k < K; k++) acc[k] += d * win[k];
            acc[K] += d;
        }
    }
#pragma unroll
    for (int k = 0; k <= K; k++) part[k][ty][tx] = acc[k];
    __syncthreads();
    for (int half = CONV_DW_LANES / 2; half > 0; half /= 2) {  // fixed tree order
        if (ty < half)
#pragma unroll
            for (int k = 0; k <= K; k++) part[k][ty][tx] += part[k][ty + half][tx];
        __syncthreads();
    }
    if (ty == 0 && c < C) {
#pragma unroll
        for (int k = 0; k < K; k++) dw[(size_t)c * K + k] = T(float(dw[(size_t)c * K + k]) + part[k][0][tx]);
        dbias[c] = T(float(dbias[c]) + part[K][0][tx]);
    }
}

// dinp is written; dw and dbias accumulate (+=).
template <typename T>
void conv1d_silu_backward(T* dinp, T* dw, T* dbias, const T* dout, const T* pre, const T* inp, const T* w, int B,
                          int T_, int C, int K, cudaStream_t stream = 0) {
    HL_CHECK(B > 0 && T_ > 0 && C > 0 && K > 0, "conv1d: bad sizes B=", B, " T=", T_, " C=", C, " K=", K,
             " (all must be positive)");
    const int tiles = ceil_div(T_, CONV_TILE_T);
    dim3 grid(ceil_div(C, CONV_BLOCK), (unsigned)std::min(B * tiles, 65535));
    dim3 dw_block(CONV_DW_TW, CONV_DW_LANES);
    conv1d_dispatch_k(K, [&](auto kc) {
        constexpr int KK = decltype(kc)::value;
        conv1d_silu_dinp_kernel<KK><<<grid, CONV_BLOCK, 0, stream>>>(dinp, dout, pre, w, B, T_, C);
        cudaCheckLast();
        conv1d_silu_dw_kernel<KK><<<ceil_div(C, CONV_DW_TW), dw_block, 0, stream>>>(dw, dbias, dout, pre, inp, B, T_, C);
        cudaCheckLast();
    });
}

}  // namespace hl::gpu
