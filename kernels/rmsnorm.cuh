// rmsnorm.cuh — GPU mirror of model/rmsnorm.h: RMSNorm over groups of Cg channels (G = 1: the plain
// norm; G > 1: the per-group / per-head norms), forward and backward.
//
// Mapping: one warp per (row, group). A group is Cg ≤ a few thousand contiguous floats, so 32 lanes
// striding over it read coalesced 128-byte lines, and the sum of squares (forward) or the dot product
// (backward) is one warp shuffle reduction: no shared memory, no __syncthreads. The weight gradient is a
// reduction over rows, done separately by colsum (kernels/common.cuh): deterministic, no atomics.
// Wide fp32 groups (1024 ≤ Cg ≤ 4096, Cg % 4 == 0, 16-byte aligned: the block norms of every model size)
// take a second forward path instead: one block per (row, group) holding the row in registers as float4,
// so x is read from memory once, not twice (measured in dev/cuda/rmsnorm.cu at N = 16384, Cg = 2048 on an
// H100: 0.099 ms vs 0.166 ms for the warp kernel; at Cg = 128 the warp kernel is the faster one).
// rstd stays fp32 on every path (it is a statistic, as in every mixed-precision norm).
#pragma once
#include <climits>               // INT_MAX
#include <type_traits>           // std::is_same_v, std::integral_constant, std::remove_pointer_t
#include <cuda_bf16.h>           // __nv_bfloat16, __floats2bfloat162_rn: out16
#include "kernels/common.cuh"    // cudaCheckLast, ceil_div, warp_sum, colsum, ld4, map4, vec4_aligned
#include "kernels/matmul.cuh"    // round_bf16: dinp16 off the wide-row path
#include "model/common.h"        // HL_CHECK

namespace hl::gpu {

constexpr int RMSNORM_BLOCK = 256;  // 8 warps = 8 (row, group) pairs per block

// out (N, G·Cg) = inp / rms(inp over each group) · weight (G·Cg) [weight may be null]; rstd (N, G) saved.
// grid: ceil(N·G / 8) blocks of 256 threads; warp w of the grid handles (n, g) = (w / G, w % G), which is
// also its index into rstd (N, G). res, sum (add_rmsnorm_forward; else null): the input is inp + res, written to sum;
// res of type R (T, or bf16 when its producer wrote it so).
template <typename T, typename O, typename R>
__global__ void rmsnorm_forward_kernel(O* out, float* rstd, const T* inp, const R* res, T* sum, const T* weight, int N,
                                       int G, int Cg, float eps) {
    const int w = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (w >= N * G) return;  // whole warps leave together: the shuffles below see all 32 lanes
    const int g = w % G;
    const size_t base = (size_t)w * Cg;  // = n·G·Cg + g·Cg: rows of G groups are contiguous
    const T* x = inp + base;             // (Cg)
    const R* xr = res ? res + base : nullptr;
    auto in = [&](int c) { return xr ? float(T(float(x[c]) + float(xr[c]))) : float(x[c]); };  // as gpu::add's sum
    float ss = 0.0f;
    for (int c = lane; c < Cg; c += 32) {
        const float v = in(c);
        if (sum) sum[base + c] = T(v);
        ss += v * v;
    }
    ss = warp_sum(ss);
    const float r = 1.0f / sqrtf(ss / Cg + eps);  // as the CPU: 1/sqrt, not the approximate rsqrtf
    if (lane == 0) rstd[w] = r;
    O* y = out + base;                                       // (Cg)
    const T* wt = weight ? weight + (size_t)g * Cg : nullptr;  // (Cg)
    for (int c = lane; c < Cg; c += 32) y[c] = O(in(c) * r * (wt ? float(wt[c]) : 1.0f));
}

// The wide-row forward (fp32): one block of 256 threads per (row, group) = blockIdx.x; thread i holds the
// float4s i, i + 256, ... of the row (V ≤ RMSNORM_ROW_V4 of them, so Cg ≤ 4096) in registers from the
// sum of squares to the output. Block reduction: warp shuffles, then the 8 warp sums in shared memory, added
// in a fixed order by every thread.
constexpr int RMSNORM_ROW_V4 = 4;

// The sum of v over the RMSNORM_BLOCK threads, returned to every thread: warp shuffles, then the warp sums through
// part (RMSNORM_BLOCK / 32 floats of shared memory) added in a fixed order (deterministic).
__device__ __forceinline__ float rmsnorm_block_sum(float v, float* part) {
    v = warp_sum(v);
    if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = v;
    __syncthreads();
    float tot = 0.0f;
    for (int k = 0; k < RMSNORM_BLOCK / 32; k++) tot += part[k];
    return tot;
}

// Whether a norm over groups of Cg channels takes the wide-row kernels (fp32 rows held in registers).
inline bool rmsnorm_wide_row(int Cg) { return Cg % 4 == 0 && Cg >= 1024 && Cg <= 4 * RMSNORM_BLOCK * RMSNORM_ROW_V4; }

// Calls f(std::integral_constant<int, V>{}) for the V = 1 … RMSNORM_ROW_V4 float4s a thread holds of a wide row of
// Cg channels: the wide-row kernels are templated on it so that a row takes only the registers it needs (a
// 1024-wide row one float4 an array, not four; fewer registers, more blocks an SM).
template <typename F>
void rmsnorm_row_dispatch(int Cg, F&& f) {
    switch (ceil_div(Cg / 4, RMSNORM_BLOCK)) {
        case 1: f(std::integral_constant<int, 1>{}); break;
        case 2: f(std::integral_constant<int, 2>{}); break;
        case 3: f(std::integral_constant<int, 3>{}); break;
        default: f(std::integral_constant<int, RMSNORM_ROW_V4>{}); break;
    }
}

// The wide-row forwards' tail (this file's and mamba2.cuh's fused gated norm): from the block's sum of squares ss,
// the row's 1/rms, saved to *rstd, then out = v · rstd · weight (weight null: 1) from the float4s v the thread holds.
template <int V, typename O>
__device__ __forceinline__ void rmsnorm_row_output(O* out, float* rstd, const float4 (&v)[V], float ss,
                                                   const float* wt, int Cg, float eps, float* part) {
    const float s = 1.0f / sqrtf(rmsnorm_block_sum(ss, part) / Cg + eps);
    if (threadIdx.x == 0) *rstd = s;
#pragma unroll
    for (int q = 0; q < V; q++) {
        const int c = threadIdx.x + q * RMSNORM_BLOCK;
        if (c < Cg / 4) {
            const float4 w4 = wt ? ld4(wt, c) : make_float4(1.0f, 1.0f, 1.0f, 1.0f);
            st4(out, c, make_float4(v[q].x * s * w4.x, v[q].y * s * w4.y, v[q].z * s * w4.z, v[q].w * s * w4.w));
        }
    }
}

template <int V, typename O, typename R>
__global__ void rmsnorm_forward_row_kernel(O* out, float* rstd, const float* inp, const R* res, float* sum,
                                           const float* weight, int G, int Cg, float eps) {
    __shared__ float part[RMSNORM_BLOCK / 32];
    const int r = blockIdx.x, tid = threadIdx.x, C4 = Cg / 4;
    const float* x = inp + (size_t)r * Cg;                              // (Cg)
    const float* wt = weight ? weight + (size_t)(r % G) * Cg : nullptr;  // (Cg)
    float4 v[V];
    float ss = 0.0f;
#pragma unroll
    for (int q = 0; q < V; q++) {
        const int c = tid + q * RMSNORM_BLOCK;
        v[q] = c < C4 ? ld4(x, c) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (res && c < C4) {  // add_rmsnorm_forward: the input is x + res, kept in sum
            const float4 b = ld4(res + (size_t)r * Cg, c);
            v[q] = make_float4(v[q].x + b.x, v[q].y + b.y, v[q].z + b.z, v[q].w + b.w);
            st4(sum + (size_t)r * Cg, c, v[q]);
        }
        ss += v[q].x * v[q].x + v[q].y * v[q].y + v[q].z * v[q].z + v[q].w * v[q].w;
    }
    rmsnorm_row_output(out + (size_t)r * Cg, rstd + r, v, ss, wt, Cg, eps, part);
}

// The launch of both forwards: the wide-row kernel where it fits, else the warp kernel. res, sum: see
// add_rmsnorm_forward (null for rmsnorm_forward).
template <typename T, typename R>
void rmsnorm_forward_launch(T* out, float* rstd, const T* inp, const R* res, T* sum, const T* weight, int N, int G,
                            int Cg, float eps, cudaStream_t stream, __nv_bfloat16* out16) {
    HL_CHECK(N >= 0 && G > 0 && Cg > 0, "rmsnorm: bad sizes N=", N, " G=", G, " Cg=", Cg);
    HL_CHECK((long long)N * G < INT_MAX, "rmsnorm: N·G too large");
    if (N == 0) return;
    auto launch = [&](auto* o) {
        if constexpr (std::is_same_v<T, float>) {
            if (rmsnorm_wide_row(Cg) && vec4_aligned(o, inp, res, sum, weight)) {
                rmsnorm_row_dispatch(Cg, [&](auto v) {
                    rmsnorm_forward_row_kernel<decltype(v)::value>
                        <<<N * G, RMSNORM_BLOCK, 0, stream>>>(o, rstd, inp, res, sum, weight, G, Cg, eps);
                });
                cudaCheckLast();
                return;
            }
        }
        const int warps_per_block = RMSNORM_BLOCK / 32;
        rmsnorm_forward_kernel<<<ceil_div(N * G, warps_per_block), RMSNORM_BLOCK, 0, stream>>>(o, rstd, inp, res, sum,
                                                                                             weight, N, G, Cg, eps);
        cudaCheckLast();
    };
    if (out16) launch(out16);
    else launch(out);
}

// out16: under bf16 operands, for a norm whose output is only a matmul operand (the block's FFN input): the output
// is written there in bf16 instead of to out (kernels/matmul.cuh's bf16_view), rounded once here, not by each GEMM.
template <typename T>
void rmsnorm_forward(T* out, float* rstd, const T* inp, const T* weight, int N, int G, int Cg, float eps,
                     cudaStream_t stream = 0, __nv_bfloat16* out16 = nullptr) {
    rmsnorm_forward_launch(out, rstd, inp, (const T*)nullptr, (T*)nullptr, weight, N, G, Cg, eps, stream, out16);
}

// The block's residual add and second norm in one pass: sum (N, D) = x + res, written (saved: the norm's input for
// its backward), and out = RMSNorm(sum) · weight, rstd as rmsnorm_forward (out16 too). The same values, bit for bit,
// as gpu::add then rmsnorm_forward, without reading sum back (one (N, D) read less).
// res16: under bf16 operands, res in bf16 (a branch output its GEMM wrote so, as autocast keeps it: half the bytes
// read here and written there); then res is not read. The sum is still taken in fp32, into the fp32 residual stream.
template <typename T>
void add_rmsnorm_forward(T* sum, T* out, float* rstd, const T* x, const T* res, const T* weight, int N, int D,
                         float eps, cudaStream_t stream = 0, __nv_bfloat16* out16 = nullptr,
                         const __nv_bfloat16* res16 = nullptr) {
    HL_CHECK(sum && (res || res16), "add_rmsnorm_forward: sum and res must be given");
    if (res16) rmsnorm_forward_launch(out, rstd, x, res16, sum, weight, N, 1, D, eps, stream, out16);
    else rmsnorm_forward_launch(out, rstd, x, res, sum, weight, N, 1, D, eps, stream, out16);
}

// dinp (N, G·Cg), written. Same mapping as the forward: one warp per (n, g). With x̂ = x·rstd, d = dout ⊙ w:
//   dinp = rstd · (d − x̂ · mean(d ⊙ x̂))  [+ residual, when given]
// residual: a gradient to add in the same pass (the block's residual stream: dh = norm2ᵀ(dn) + dy without a separate
// accumulate pass over (N, D), which read and wrote dh once more); it may be dinp itself. dout of type DT (T, or bf16
// when its producer wrote it so).
template <typename T, typename DT>
__global__ void rmsnorm_backward_dinp_kernel(T* dinp, const DT* dout, const T* inp, const T* weight,
                                             const float* rstd, const T* residual, int N, int G, int Cg) {
    const int w = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (w >= N * G) return;
    const int g = w % G;
    const size_t base = (size_t)w * Cg;
    const T* x = inp + base;                                   // (Cg)
    const DT* dy = dout + base;                                // (Cg)
    const T* wt = weight ? weight + (size_t)g * Cg : nullptr;  // (Cg)
    const float r = rstd[w];
    float dot = 0.0f;  // Σ d ⊙ x̂
    for (int c = lane; c < Cg; c += 32) dot += float(dy[c]) * (wt ? float(wt[c]) : 1.0f) * float(x[c]) * r;
    dot = warp_sum(dot) / Cg;
    T* dx = dinp + base;                                     // (Cg)
    const T* res = residual ? residual + base : nullptr;     // (Cg)
    for (int c = lane; c < Cg; c += 32) {
        const float d = r * (float(dy[c]) * (wt ? float(wt[c]) : 1.0f) - float(x[c]) * r * dot);
        dx[c] = T(res ? d + float(res[c]) : d);
    }
}

// The wide-row backward (fp32, the same rows as rmsnorm_forward_row_kernel): blocks of 256 threads, x, dout and
// weight held in registers as float4 between the dot product and dinp, so each is read from memory once (the warp
// kernel reads them twice, the second time from cache at best). At the 100m width (Cg = 1024, N = 16384) on an H200
// the warp kernel ran at about 2 TB/s (0.10 ms).
// grid (ceil(N / R), G): block (b, g) takes group g of rows b·R … b·R + R − 1 in turn. DW (R = RMSNORM_DW_ROWS):
// it also keeps its threads' share of Σ_rows dout ⊙ x̂ (weight's gradient) in registers and writes it to dw_part row
// b (ceil(N / R), G·Cg), which a column sum over those few rows finishes: the column sum over all N rows read dout
// and x once more (51 µs of the 61 µs this kernel takes at 100m, H200). Without DW, R = 1.
constexpr int RMSNORM_DW_ROWS = 16;

template <int V, bool DW, typename DT>
__global__ void rmsnorm_backward_dinp_row_kernel(float* dinp, __nv_bfloat16* dinp16, float* dw_part, const DT* dout,
                                                 const float* inp, const float* weight, const float* rstd,
                                                 const float* residual, int N, int G, int Cg) {
    __shared__ float part[RMSNORM_BLOCK / 32];
    constexpr int R = DW ? RMSNORM_DW_ROWS : 1;
    const int tid = threadIdx.x, C4 = Cg / 4, grp = blockIdx.y;
    const float* wt = weight ? weight + (size_t)grp * Cg : nullptr;  // (Cg)
    float4 dw[V];  // DW: this block's Σ dout ⊙ x̂
#pragma unroll
    for (int q = 0; q < V; q++) dw[q] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    const int n1 = min(N, (blockIdx.x + 1) * R);
    for (int n = blockIdx.x * R; n < n1; n++) {
        const size_t r = (size_t)n * G + grp, base = r * Cg;
        const float s = rstd[r];
        float4 x[V], d[V];  // x̂ and d = dout ⊙ w
        float dot = 0.0f;
#pragma unroll
        for (int q = 0; q < V; q++) {
            const int c = tid + q * RMSNORM_BLOCK;
            x[q] = d[q] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            if (c < C4) {
                const float4 w4 = wt ? ld4(wt, c) : make_float4(1.0f, 1.0f, 1.0f, 1.0f), go = ld4(dout + base, c);
                x[q] = map4(ld4(inp + base, c), w4, [s](float a, float) { return a * s; });
                d[q] = map4(go, w4, [](float a, float b) { return a * b; });
                if constexpr (DW)
                    dw[q] = map4(dw[q], map4(go, x[q], [](float a, float b) { return a * b; }),
                                 [](float a, float b) { return a + b; });
            }
            dot += d[q].x * x[q].x + d[q].y * x[q].y + d[q].z * x[q].z + d[q].w * x[q].w;
        }
        const float mean = rmsnorm_block_sum(dot, part) / Cg;
        if constexpr (DW) __syncthreads();  // every thread has read part before the next row writes it
#pragma unroll
        for (int q = 0; q < V; q++) {
            const int c = tid + q * RMSNORM_BLOCK;
            if (c < C4) {
                float4 g = map4(d[q], x[q], [s, mean](float dv, float xv) { return s * (dv - xv * mean); });
                if (residual) g = map4(g, ld4(residual + base, c), [](float a, float b) { return a + b; });
                st4(dinp + base, c, g);
                if (dinp16) st4(dinp16 + base, c, g);
            }
        }
    }
    if constexpr (DW) {
        float* pr = dw_part + (size_t)blockIdx.x * G * Cg + (size_t)grp * Cg;  // (Cg)
#pragma unroll
        for (int q = 0; q < V; q++) {
            const int c = tid + q * RMSNORM_BLOCK;
            if (c < C4) st4(pr, c, dw[q]);
        }
    }
}

// The scratch rmsnorm_backward's fused weight gradient needs (dw_part): floats.
inline size_t rmsnorm_dweight_part_size(int N, int G, int Cg) {
    return (size_t)ceil_div(N, RMSNORM_DW_ROWS) * G * Cg;
}

// f(n, c) = dout[n, c] · x̂[n, c], the summand of dweight[c]
template <typename T, typename DT = T>
struct RmsnormDweightTerm {
    const DT* dout;
    const T* inp;
    const float* rstd;
    int G, Cg;
    __device__ float operator()(int n, int c) const {
        const size_t i = (size_t)n * G * Cg + c;
        return float(dout[i]) * float(inp[i]) * rstd[(size_t)n * G + c / Cg];
    }
};

// dinp is written, dweight (G·Cg) accumulates (may be null). dw_part: scratch of rmsnorm_dweight_part_size floats
// (16-byte aligned), or null; with it, where the wide-row kernel runs, dweight comes from that kernel's per-block
// partial sums (a different order of the same sum: deterministic, and within rounding of the CPU's).
// dinp16: under bf16 operands, dinp rounded to bf16 is written there too (N·G·Cg elements, its own buffer), for a
// GEMM that takes dinp as its dout (the residual stream's gradient into W2's and the mixer's output projection's
// backward), so that GEMM does not round it in a pass of its own (wide rows: in the same kernel).
// dout16: under bf16 operands, dout in bf16 (an input gradient its GEMM wrote so, as autocast keeps it: half the
// bytes read here and written there); then dout is not read.
template <typename T>
void rmsnorm_backward(T* dinp, T* dweight, const T* dout, const T* inp, const T* weight, const float* rstd, int N,
                      int G, int Cg, cudaStream_t stream = 0, const T* residual = nullptr, float* dw_part = nullptr,
                      __nv_bfloat16* dinp16 = nullptr, const __nv_bfloat16* dout16 = nullptr) {
    HL_CHECK(N >= 0 && G > 0 && Cg > 0, "rmsnorm: bad sizes N=", N, " G=", G, " Cg=", Cg);
    HL_CHECK((long long)N * G < INT_MAX, "rmsnorm: N·G too large");
    HL_CHECK(!(dinp16 || dout16) || (std::is_same_v<T, float>), "rmsnorm: a bf16 dinp16 or dout16 beside non-fp32 "
             "storage");
    if (N == 0) return;
    auto run = [&](const auto* dy) {
        using DT = std::remove_cv_t<std::remove_pointer_t<decltype(dy)>>;
        bool row = false, fused = false;  // the wide-row kernel, on the rows the wide-row forward takes
        if constexpr (std::is_same_v<T, float>) {
            row = rmsnorm_wide_row(Cg) && vec4_aligned(dinp, inp, weight, residual, dinp16) && vec4_aligned(dy);
            fused = row && dweight && dw_part && vec4_aligned(dw_part);
            if (row)
                rmsnorm_row_dispatch(Cg, [&](auto v) {
                    constexpr int V = decltype(v)::value;
                    if (fused)
                        rmsnorm_backward_dinp_row_kernel<V, true><<<dim3(ceil_div(N, RMSNORM_DW_ROWS), G),
                                                                    RMSNORM_BLOCK, 0, stream>>>(
                            dinp, dinp16, dw_part, dy, inp, weight, rstd, residual, N, G, Cg);
                    else
                        rmsnorm_backward_dinp_row_kernel<V, false><<<dim3(N, G), RMSNORM_BLOCK, 0, stream>>>(
                            dinp, dinp16, nullptr, dy, inp, weight, rstd, residual, N, G, Cg);
                });
        }
        if (!row) {
            const int warps_per_block = RMSNORM_BLOCK / 32;
            rmsnorm_backward_dinp_kernel<<<ceil_div(N * G, warps_per_block), RMSNORM_BLOCK, 0, stream>>>(
                dinp, dy, inp, weight, rstd, residual, N, G, Cg);
            if constexpr (std::is_same_v<T, float>)
                if (dinp16) round_bf16(dinp16, dinp, (size_t)N * G * Cg, stream);
        }
        cudaCheckLast();
        if (fused) colsum(dweight, RowsTerm<float>{dw_part, G * Cg}, ceil_div(N, RMSNORM_DW_ROWS), G * Cg, stream);
        else if (dweight) colsum(dweight, RmsnormDweightTerm<T, DT>{dy, inp, rstd, G, Cg}, N, G * Cg, stream);
    };
    if constexpr (std::is_same_v<T, float>)
        if (dout16) return run(dout16);
    run(dout);
}

}  // namespace hl::gpu
