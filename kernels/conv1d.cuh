// conv1d.cuh — GPU mirror of model/conv1d.h: the causal depthwise conv1d of the Mamba-2 mixer, with bias
// and a fused SiLU, forward and backward.
//   pre[t, c] = bias[c] + Σ_{k<K} w[c, k] · inp[t − (K−1) + k, c]      out = SiLU(pre)
// Recompute instead of store: unlike the CPU reference, the forward does not save pre. The backward kernels read the
// input anyway (the weight gradient) or can slide the same window over it (dinp), and K multiply-adds a value are
// cheaper than writing pre (B, T, C) in fp32 and reading it back twice: at the 100m Mamba-2 layer (C = 2304) that is
// 151 MB of memory a layer and about 0.45 GB of traffic a layer each step.
// Shapes: inp, out, dout, dinp (B, T, C)   w (C, K)   bias (C). inp and dinp may be C columns of wider rows,
// out and dout split by column into up to three tensors (ConvColumns): what Mamba-2 reads and writes in place.
// inp and out may be bf16 (IT, OT) and dinp bf16 (DT) under T = float: Mamba-2's in_proj output, its scan's x, B, C
// and in_proj's output gradient in bf16 runs.
//
// Mapping shared by the kernels: threads run along channels (consecutive threads, consecutive c: every
// warp access is one contiguous 128-byte row segment), and each thread walks a run of consecutive time
// steps of one channel keeping the last K values in registers (a sliding window), so each input is loaded
// once per thread instead of K times. K is a template parameter (dispatched at run time, 1…8) so the
// window is a register array.
// The weight/bias gradient is a reduction over all B·T rows: done without atomics, deterministic, in two
// passes through caller-owned scratch (see conv1d_silu_dw_part_kernel).
#pragma once
#include <algorithm>            // std::min
#include <type_traits>          // std::integral_constant
#include "kernels/common.cuh"   // cudaCheckLast, ceil_div, dev_silu, dev_silu_grad
#include "model/common.h"       // HL_CHECK

namespace hl::gpu {

constexpr int CONV_MAX_K = 8;
constexpr int CONV_TILE_T = 32;   // time steps per thread (forward, dinp): halo overhead (K−1)/32
constexpr int CONV_BLOCK = 128;   // threads along channels (forward, dinp)
constexpr int CONV_DW_CH = 32;    // channels per block of the weight-gradient pass (a warp's 128-byte segment)
constexpr int CONV_DW_LANES = 8;  // row lanes per block of it
constexpr int CONV_DW_ROWS = 64;  // consecutive rows a lane walks
// Time steps (rows) whose loads a thread issues together before it uses them. The loads do not depend on the
// sliding window, but the compiler cannot move them above the stores of earlier steps (it cannot tell the tensors
// apart), so one at a time a thread waited a memory latency a step. Intra at 350m (B·T 16384, 3328 and 1792
// channels, H200, ncu, mean over the step's 11 layers): forward 274 → 218 µs, dinp 384 → 314, dw 308 → 240.
constexpr int CONV_BATCH = 8;

// Where the conv's output (or the gradient arriving at it) lives: up to three column ranges of the C channels,
// range s holding channels [end[s−1], end[s]) (end[−1] = 0) in its own tensor of rows ld[s] apart. One range
// {p, C, C} is a dense (B, T, C) tensor; Mamba-2 writes its conv's output straight into its scan's x, B and C
// tensors this way (and reads their gradients back), with no split or concatenation pass. Each thread of the kernels
// owns one channel, so it resolves its range once.
template <typename P>
struct ConvColumns {
    P* p[3] = {nullptr, nullptr, nullptr};
    int end[3] = {0, 0, 0};
    int ld[3] = {0, 0, 0};
    ConvColumns() = default;
    ConvColumns(P* dense, int C) : p{dense, nullptr, nullptr}, end{C, C, C}, ld{C, C, C} {}
    ConvColumns(P* p0, int e0, int ld0, P* p1, int e1, int ld1, P* p2, int e2, int ld2)
        : p{p0, p1, p2}, end{e0, e1, e2}, ld{ld0, ld1, ld2} {}
    // channel c's column (its row 0) and row stride
    __device__ P* column(int c, int& stride) const {
        const int s = c < end[0] ? 0 : c < end[1] ? 1 : 2, c0 = s == 0 ? 0 : end[s - 1];
        stride = ld[s];
        return p[s] + (c - c0);
    }
};

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

// pre from a window win[k] = inp at time t − (K−1) + k: the same sum in the same order in every kernel, so the
// backward's recomputed pre is the forward's.
template <int K>
__device__ __forceinline__ float conv1d_pre(const float (&win)[K], const float (&wk)[K], float bc) {
    float acc = bc;
#pragma unroll
    for (int k = 0; k < K; k++) acc += wk[k] * win[k];
    return acc;
}

// Channel c's K weights and its bias, as floats.
template <int K, typename T>
__device__ __forceinline__ float conv1d_load_weights(float (&wk)[K], const T* w, const T* bias, int c) {
#pragma unroll
    for (int k = 0; k < K; k++) wk[k] = float(w[(size_t)c * K + k]);
    return float(bias[c]);
}

// grid: x over ceil(C / 128) channel blocks, y over (b, time tile of 32) pairs (grid-stride in y);
// block: 128 threads along channels. Thread (c, b, tile) slides a K-window over times t0 … t0+31.
template <int K, typename T, typename IT, typename OT>
__global__ void conv1d_silu_forward_kernel(ConvColumns<OT> out, const IT* inp, const T* w, const T* bias, int B, int T_,
                                           int C, int ld) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    int ldo;
    OT* oc = out.column(c, ldo);
    float wk[K];
    const float bc = conv1d_load_weights(wk, w, bias, c);
    const int tiles = ceil_div(T_, CONV_TILE_T);
    for (int bt = blockIdx.y; bt < B * tiles; bt += gridDim.y) {
        const int b = bt / tiles, t0 = (bt % tiles) * CONV_TILE_T;
        const int t1 = min(t0 + CONV_TILE_T, T_);
        const size_t in = (size_t)b * T_ * ld + c;    // (b, 0, c) in inp, whose rows are ld apart
        float win[K];  // win[k] = inp at time t − (K−1) + k; the K−1 older taps preloaded (0 before t = 0)
#pragma unroll
        for (int k = 0; k < K - 1; k++) {
            const int s = t0 - (K - 1) + k;  // win[k + 1] moves to win[k] at the first step
            win[k + 1] = s >= 0 ? float(inp[in + (size_t)s * ld]) : 0.0f;
        }
        for (int tb = t0; tb < t1; tb += CONV_BATCH) {
            float x[CONV_BATCH];
#pragma unroll
            for (int u = 0; u < CONV_BATCH; u++) x[u] = tb + u < t1 ? float(inp[in + (size_t)(tb + u) * ld]) : 0.0f;
#pragma unroll
            for (int u = 0; u < CONV_BATCH; u++) {
                const int t = tb + u;
                if (t >= t1) break;
#pragma unroll
                for (int k = 0; k < K - 1; k++) win[k] = win[k + 1];
                win[K - 1] = x[u];
                oc[((size_t)b * T_ + t) * ldo] = OT(dev_silu(conv1d_pre(win, wk, bc)));
            }
        }
    }
}

// out is written (nothing is saved: the backward recomputes pre). ld: the row stride of inp (0: C, dense rows); a
// larger one reads the C channels out of wider rows in place (Mamba-2's x, B, C columns of its in_proj output). out:
// a dense (B, T, C) tensor, or its columns split over up to three tensors (ConvColumns). inp and out: T, or bf16
// under T = float (Mamba-2's in_proj output and its scan's x, B, C in bf16 runs).
template <typename T, typename IT, typename OT>
void conv1d_silu_forward(const ConvColumns<OT>& out, const IT* inp, const T* w, const T* bias, int B, int T_, int C,
                         int K, cudaStream_t stream = 0, int ld = 0) {
    HL_CHECK(B > 0 && T_ > 0 && C > 0 && K > 0, "conv1d: bad sizes B=", B, " T=", T_, " C=", C, " K=", K,
             " (all must be positive)");
    if (ld == 0) ld = C;
    HL_CHECK(ld >= C, "conv1d: row stride ", ld, " below C = ", C);
    const int tiles = ceil_div(T_, CONV_TILE_T);
    dim3 grid(ceil_div(C, CONV_BLOCK), (unsigned)std::min(B * tiles, 65535));
    conv1d_dispatch_k(K, [&](auto kc) {
        conv1d_silu_forward_kernel<decltype(kc)::value><<<grid, CONV_BLOCK, 0, stream>>>(out, inp, w, bias, B, T_, C,
                                                                                       ld);
        cudaCheckLast();
    });
}
template <typename T>
void conv1d_silu_forward(T* out, const T* inp, const T* w, const T* bias, int B, int T_, int C, int K,
                         cudaStream_t stream = 0, int ld = 0) {
    conv1d_silu_forward(ConvColumns<T>(out, C), inp, w, bias, B, T_, C, K, stream, ld);
}

// dinp[s, c] = Σ_k dpre[s + (K−1) − k, c] · w[c, k], dpre = dout ⊙ SiLU'(pre): the gradient looks forward in time,
// so each thread walks its tile backwards (s = t1−1 … t0) with a window of the next K dpre values (preloaded past the
// tile's end, 0 past T), and beside it the K inputs that make pre at s (win[k] = inp at s − (K−1) + k: each step
// shifts in the input K steps back). Same grid/block as the forward.
template <int K, typename T, typename DT, typename IT>
__global__ void conv1d_silu_dinp_kernel(DT* dinp, ConvColumns<const T> dout, const IT* inp, const T* w, const T* bias,
                                        int B, int T_, int C, int ld) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    int ldd;
    const T* dc = dout.column(c, ldd);
    float wk[K];
    const float bc = conv1d_load_weights(wk, w, bias, c);
    const int tiles = ceil_div(T_, CONV_TILE_T);
    for (int bt = blockIdx.y; bt < B * tiles; bt += gridDim.y) {
        const int b = bt / tiles, t0 = (bt % tiles) * CONV_TILE_T;
        const int t1 = min(t0 + CONV_TILE_T, T_);
        const size_t in = (size_t)b * T_ * ld + c;  // (b, 0, c) in inp and dinp, whose rows are ld apart
        auto x_at = [&](int t) { return t >= 0 ? float(inp[in + (size_t)t * ld]) : 0.0f; };
        float win[K];  // the window of the step at hand; first for t1 − 1 + j, the preloaded dpre's times
        float fut[K];  // fut[j] = dpre at time s + j
#pragma unroll
        for (int j = 1; j < K; j++) {
            const int t = t1 - 1 + j;  // fut[j − 1] moves to fut[j] at the first step (s = t1 − 1)
            fut[j - 1] = 0.0f;
            if (t < T_) {
#pragma unroll
                for (int k = 0; k < K; k++) win[k] = x_at(t - (K - 1) + k);
                fut[j - 1] = float(dc[((size_t)b * T_ + t) * ldd]) * dev_silu_grad(conv1d_pre(win, wk, bc));
            }
        }
#pragma unroll
        for (int k = 0; k < K; k++) win[k] = x_at(t1 - 1 - (K - 1) + k);  // pre's inputs at s = t1 − 1
        for (int sb = t1 - 1; sb >= t0; sb -= CONV_BATCH) {
            float dv[CONV_BATCH], xv[CONV_BATCH];  // dout at s = sb − u, and the input at s − K (the next window's)
#pragma unroll
            for (int u = 0; u < CONV_BATCH; u++) {
                const int s = sb - u;
                dv[u] = s >= t0 ? float(dc[((size_t)b * T_ + s) * ldd]) : 0.0f;
                xv[u] = s >= t0 ? x_at(s - K) : 0.0f;
            }
#pragma unroll
            for (int u = 0; u < CONV_BATCH; u++) {
                const int s = sb - u;
                if (s < t0) break;
#pragma unroll
                for (int j = K - 1; j > 0; j--) fut[j] = fut[j - 1];
                fut[0] = dv[u] * dev_silu_grad(conv1d_pre(win, wk, bc));
                float acc = 0.0f;
#pragma unroll
                for (int k = 0; k < K; k++) acc += fut[K - 1 - k] * wk[k];
                dinp[in + (size_t)s * ld] = DT(acc);
#pragma unroll
                for (int k = K - 1; k > 0; k--) win[k] = win[k - 1];
                win[0] = xv[u];
            }
        }
    }
}

// dw (C, K) += Σ_{b,t} dpre[t, c] · inp[t − (K−1) + k, c],   dbias (C) += Σ_{b,t} dpre[t, c]
// A reduction over all B·T rows, in two passes, deterministic (no atomics):
//   1. conv1d_silu_dw_part_kernel: grid (ceil(C / 32), ceil(B·T / 512)), blocks of 32 channels × 8 row lanes. A
//      warp reads one 128-byte segment of a row per load; each lane walks 64 consecutive rows with a K-window of
//      inputs (zeros where a sequence starts: the conv is causal per sequence; pre is recomputed from it) and K + 1
//      sums in registers; the
//      block adds its 8 lanes in a fixed tree order into part (row split, K + 1, C).
//   2. conv1d_silu_dw_sum_kernel: one thread per (k, c) adds the row splits in order into dw, dbias.
// The first version had one block per 8 channels walking all rows (64 lanes of 256 rows each): too few threads at
// the 100m width, and a warp's loads were four 32-byte pieces. At the 1B width on an H200 (dev/cuda/conv1d.cu)
// it took 0.60 ms, this one 0.32 ms (0.19 ms at the 100m width).
template <int K, typename T, typename IT>
__global__ void __launch_bounds__(CONV_DW_CH * CONV_DW_LANES)
conv1d_silu_dw_part_kernel(float* part, ConvColumns<const T> dout, const IT* inp, const T* w, const T* bias, int B,
                           int T_, int C, int ld) {
    __shared__ float red[K + 1][CONV_DW_LANES][CONV_DW_CH];
    const int tx = threadIdx.x, ty = threadIdx.y, c = blockIdx.x * CONV_DW_CH + tx;
    const long long N = (long long)B * T_;
    const long long n0 = ((long long)blockIdx.y * CONV_DW_LANES + ty) * CONV_DW_ROWS;
    const long long n1 = n0 + CONV_DW_ROWS < N ? n0 + CONV_DW_ROWS : N;
    float acc[K + 1];
#pragma unroll
    for (int k = 0; k <= K; k++) acc[k] = 0.0f;
    if (c < C && n0 < n1) {
        int ldd;
        const T* dc = dout.column(c, ldd);
        float wk[K];
        const float bc = conv1d_load_weights(wk, w, bias, c);
        float win[K];  // win[k] = inp at time t − (K−1) + k of the current row's sequence
        int t = (int)(n0 % T_);
#pragma unroll
        for (int k = 0; k < K - 1; k++) {
            const int s = t - (K - 1) + k;  // win[k + 1] moves to win[k] at the first step
            win[k + 1] = s >= 0 ? float(inp[(size_t)(n0 - t + s) * ld + c]) : 0.0f;
        }
        t -= 1;  // time of row n, advanced incrementally (no 64-bit modulo per row)
        for (long long nb = n0; nb < n1; nb += CONV_BATCH) {
            float x[CONV_BATCH], dv[CONV_BATCH];
#pragma unroll
            for (int u = 0; u < CONV_BATCH; u++) {
                const long long n = nb + u;
                const bool in = n < n1;
                x[u] = in ? float(inp[(size_t)n * ld + c]) : 0.0f;
                dv[u] = in ? float(dc[(size_t)n * ldd]) : 0.0f;
            }
#pragma unroll
            for (int u = 0; u < CONV_BATCH; u++) {
                if (nb + u >= n1) break;
                if (++t == T_) t = 0;
                if (t == 0) {
#pragma unroll
                    for (int k = 0; k < K; k++) win[k] = 0.0f;  // a new sequence: nothing before it
                }
#pragma unroll
                for (int k = 0; k < K - 1; k++) win[k] = win[k + 1];
                win[K - 1] = x[u];
                const float d = dv[u] * dev_silu_grad(conv1d_pre(win, wk, bc));
#pragma unroll
                for (int k = 0; k < K; k++) acc[k] += d * win[k];
                acc[K] += d;
            }
        }
    }
#pragma unroll
    for (int k = 0; k <= K; k++) red[k][ty][tx] = acc[k];
    __syncthreads();
    for (int half = CONV_DW_LANES / 2; half > 0; half /= 2) {  // fixed tree order
        if (ty < half)
#pragma unroll
            for (int k = 0; k <= K; k++) red[k][ty][tx] += red[k][ty + half][tx];
        __syncthreads();
    }
    if (ty == 0 && c < C)
#pragma unroll
        for (int k = 0; k <= K; k++) part[((size_t)blockIdx.y * (K + 1) + k) * C + c] = red[k][0][tx];
}

template <int K, typename T>
__global__ void conv1d_silu_dw_sum_kernel(T* dw, T* dbias, const float* part, int splits, int C) {
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;  // k · C + c
    if (idx >= (K + 1) * C) return;
    const int k = idx / C, c = idx % C;
    float s = 0.0f;
    for (int r = 0; r < splits; r++) s += part[(size_t)r * (K + 1) * C + idx];
    T* dst = k < K ? dw + (size_t)c * K + k : dbias + c;
    *dst = T(float(*dst) + s);
}

// Row splits of the weight-gradient reduction, and the floats of scratch conv1d_silu_backward needs for them.
inline int conv1d_dw_splits(int B, int T_) {
    return (int)(((long long)B * T_ + CONV_DW_LANES * CONV_DW_ROWS - 1) / (CONV_DW_LANES * CONV_DW_ROWS));
}
inline size_t conv1d_backward_scratch_size(int B, int T_, int C, int K) {
    return (size_t)conv1d_dw_splits(B, T_) * (K + 1) * C;
}

// dinp is written; dw and dbias accumulate (+=). pre is recomputed from inp, w and bias. scratch:
// conv1d_backward_scratch_size(B, T, C, K) floats, caller-owned. ld: the row stride of inp and dinp (0: C), as in the
// forward; dout dense or split (ConvColumns). dinp may be bf16 under T = float (DT): Mamba-2 writes it straight into
// its in_proj GEMM's bf16 dout; and inp (IT), as in the forward.
template <typename T, typename DT, typename IT>
void conv1d_silu_backward(DT* dinp, T* dw, T* dbias, const ConvColumns<const T>& dout, const IT* inp, const T* w,
                          const T* bias, int B, int T_, int C, int K, float* scratch, cudaStream_t stream = 0,
                          int ld = 0) {
    HL_CHECK(B > 0 && T_ > 0 && C > 0 && K > 0, "conv1d: bad sizes B=", B, " T=", T_, " C=", C, " K=", K,
             " (all must be positive)");
    if (ld == 0) ld = C;
    HL_CHECK(ld >= C, "conv1d: row stride ", ld, " below C = ", C);
    HL_CHECK(scratch, "conv1d_silu_backward: scratch must hold conv1d_backward_scratch_size(...) floats");
    const int splits = conv1d_dw_splits(B, T_);
    HL_CHECK(splits <= 65535, "conv1d: B·T = ", (long long)B * T_, " rows is above the GPU's limit");
    const int tiles = ceil_div(T_, CONV_TILE_T);
    dim3 grid(ceil_div(C, CONV_BLOCK), (unsigned)std::min(B * tiles, 65535));
    conv1d_dispatch_k(K, [&](auto kc) {
        constexpr int KK = decltype(kc)::value;
        conv1d_silu_dinp_kernel<KK><<<grid, CONV_BLOCK, 0, stream>>>(dinp, dout, inp, w, bias, B, T_, C, ld);
        cudaCheckLast();
        conv1d_silu_dw_part_kernel<KK><<<dim3(ceil_div(C, CONV_DW_CH), splits), dim3(CONV_DW_CH, CONV_DW_LANES), 0,
                                         stream>>>(scratch, dout, inp, w, bias, B, T_, C, ld);
        cudaCheckLast();
        conv1d_silu_dw_sum_kernel<KK><<<ceil_div((KK + 1) * C, 256), 256, 0, stream>>>(dw, dbias, scratch, splits, C);
        cudaCheckLast();
    });
}
template <typename T>
void conv1d_silu_backward(T* dinp, T* dw, T* dbias, const T* dout, const T* inp, const T* w, const T* bias, int B,
                          int T_, int C, int K, float* scratch, cudaStream_t stream = 0, int ld = 0) {
    conv1d_silu_backward(dinp, dw, dbias, ConvColumns<const T>(dout, C), inp, w, bias, B, T_, C, K, scratch, stream,
                         ld);
}

}  // namespace hl::gpu
