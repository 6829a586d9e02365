// dev/cuda/conv1d.cu — playground for the causal depthwise conv1d + SiLU kernels of the Mamba-2 mixer, in the
// style of llm.c's dev/cuda: numbered versions, each checked against the CPU reference (model/conv1d.h, float)
// and timed with cudaEvents (warm-up, then the median of repeats) at the 1B Mamba-2 shape: B = 8, T = 2048
// (B·T = 16384), C = d_ssm + 2·d_state = 4352 channels, K = 4, and at the 100m one (C = 2304). The check runs at
// B = 2, T = 1000 (not a multiple of the time tile), C = 1000: the CPU backward walks every channel over all rows,
// too slow at the timed size.
// Forward:
//   v1  one thread per output element (b, t, c), K loads each
//   v2  kernels/conv1d.cuh: one thread per (channel, run of 32 time steps) with a K-register sliding window,
//       so each input is loaded once (plus a K−1 halo); since session 14 the loads of 8 steps are issued together
//       (1B size, H200: 0.284 ms, 3.0 TB/s; v3 0.252 ms); since session 20 it writes only out (pre not saved)
//   v3  v2 with 4 channels per thread (float4 loads/stores; C % 4 == 0)
// Backward:
//   v1  one thread per element for dinp (K dpre values recomputed each); one thread per channel for dw/dbias,
//       serial over all B·T rows
//   v2  kernels/conv1d.cuh: sliding-window dinp (walking time backwards); dw/dbias in two passes: blocks of 32
//       channels × 8 row lanes of 64 rows each, a fixed-order tree over the lanes into per-split partials, then
//       the splits added in order (deterministic, no atomics). Its first version (one block per 8 channels × 64
//       lanes walking all rows, no second pass) took 0.61 ms for dw at the 1B size on an H200; this one 0.32 ms
//       there and 0.19 ms at the 100m width. Since session 20 both kernels recompute pre from a window of inputs
//       (dinp slides one beside its dpre window) instead of reading the forward's.
// Bandwidth = minimal bytes moved over the time. v1, v3: forward reads inp and writes pre and out; backward's dinp
// pass reads dout, pre and writes dinp, its dw pass reads dout, pre, inp. v2 (no pre): forward reads inp, writes out;
// dinp pass reads dout, inp, writes dinp; dw pass reads dout, inp.
//
// Build: make dev/cuda/conv1d      (nvcc with the Makefile's NVFLAGS → build/dev/conv1d)
// Run:   ./build/dev/conv1d [version]     (no argument: every version)
#include <algorithm>              // std::sort, std::max
#include <cmath>                  // std::fabs, std::isfinite
#include <cstdio>                 // std::printf, std::snprintf
#include <cstdlib>                // std::atoi
#include <vector>                 // std::vector
#include <cuda_runtime.h>         // cudaEvent_*, cudaMemset
#include "dev/cuda/common.cuh"   // median_ms, rel_err, poison: the playgrounds' shared harness
#include "kernels/common.cuh"     // cudaCheck, cudaCheckLast, ceil_div, DeviceBuffer, dev_silu, dev_silu_grad
#include "kernels/conv1d.cuh"     // v2: hl::gpu::conv1d_silu_forward / backward, conv1d_dispatch_k
#include "model/conv1d.h"         // the CPU reference

using hl::dev::median_ms;  // dev/cuda/common.cuh
using hl::dev::rel_err;
using hl::dev::poison;

using hl::gpu::ceil_div;
using hl::gpu::DeviceBuffer;
using hl::gpu::dev_silu;
using hl::gpu::dev_silu_grad;

// ---------------------------------------------------------------------------------------------------------
// v1: naive
// ---------------------------------------------------------------------------------------------------------
namespace v1 {

__global__ void forward_kernel(float* out, float* pre, const float* inp, const float* w, const float* bias, int B,
                               int T, int C, int K) {
    const size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;  // (b, t, c), c fastest
    if (i >= (size_t)B * T * C) return;
    const int c = (int)(i % C), t = (int)((i / C) % T);
    float acc = bias[c];
    for (int k = 0; k < K; k++) {
        const int s = t - (K - 1) + k;
        if (s >= 0) acc += w[(size_t)c * K + k] * inp[i - (size_t)(t - s) * C];
    }
    pre[i] = acc;
    out[i] = dev_silu(acc);
}

__global__ void dinp_kernel(float* dinp, const float* dout, const float* pre, const float* w, int B, int T, int C,
                            int K) {
    const size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i >= (size_t)B * T * C) return;
    const int c = (int)(i % C), s = (int)((i / C) % T);
    float acc = 0.f;
    for (int k = 0; k < K; k++) {
        const int t = s + (K - 1) - k;
        if (t < T) {
            const size_t j = i + (size_t)(t - s) * C;
            acc += dout[j] * dev_silu_grad(pre[j]) * w[(size_t)c * K + k];
        }
    }
    dinp[i] = acc;
}

__global__ void dw_kernel(float* dw, float* dbias, const float* dout, const float* pre, const float* inp, int B,
                          int T, int C, int K) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float db = 0.f;
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            const size_t i = ((size_t)b * T + t) * C + c;
            const float d = dout[i] * dev_silu_grad(pre[i]);
            db += d;
            for (int k = 0; k < K; k++) {
                const int s = t - (K - 1) + k;
                if (s >= 0) dw[(size_t)c * K + k] += d * inp[i - (size_t)(t - s) * C];
            }
        }
    dbias[c] += db;
}

void forward(float* out, float* pre, const float* inp, const float* w, const float* bias, int B, int T, int C, int K) {
    const size_t n = (size_t)B * T * C;
    forward_kernel<<<(unsigned)((n + 255) / 256), 256>>>(out, pre, inp, w, bias, B, T, C, K);
    cudaCheckLast();
}
void backward(float* dinp, float* dw, float* dbias, const float* dout, const float* pre, const float* inp,
              const float* w, int B, int T, int C, int K) {
    const size_t n = (size_t)B * T * C;
    dinp_kernel<<<(unsigned)((n + 255) / 256), 256>>>(dinp, dout, pre, w, B, T, C, K);
    cudaCheckLast();
    dw_kernel<<<ceil_div(C, 128), 128>>>(dw, dbias, dout, pre, inp, B, T, C, K);
    cudaCheckLast();
}

}  // namespace v1

// ---------------------------------------------------------------------------------------------------------
// v3: v2's sliding window, 4 channels per thread with float4 (C % 4 == 0)
// ---------------------------------------------------------------------------------------------------------
namespace v3 {

template <int K>
__global__ void forward_kernel(float* out, float* pre, const float* inp, const float* w, const float* bias, int B,
                               int T, int C) {
    const int c4 = blockIdx.x * blockDim.x + threadIdx.x;  // channels 4·c4 … 4·c4 + 3
    const int C4 = C / 4;
    if (c4 >= C4) return;
    float wk[4][K], bc[4];
    for (int j = 0; j < 4; j++) {
        bc[j] = bias[4 * c4 + j];
#pragma unroll
        for (int k = 0; k < K; k++) wk[j][k] = w[(size_t)(4 * c4 + j) * K + k];
    }
    const int tiles = ceil_div(T, hl::gpu::CONV_TILE_T);
    const float4* x4 = reinterpret_cast<const float4*>(inp);
    float4* p4 = reinterpret_cast<float4*>(pre);
    float4* o4 = reinterpret_cast<float4*>(out);
    for (int bt = blockIdx.y; bt < B * tiles; bt += gridDim.y) {
        const int b = bt / tiles, t0 = (bt % tiles) * hl::gpu::CONV_TILE_T;
        const int t1 = min(t0 + hl::gpu::CONV_TILE_T, T);
        const size_t base = (size_t)b * T * C4 + c4;
        float4 win[K];
#pragma unroll
        for (int k = 0; k < K - 1; k++) {
            const int s = t0 - (K - 1) + k;
            win[k + 1] = s >= 0 ? x4[base + (size_t)s * C4] : make_float4(0.f, 0.f, 0.f, 0.f);
        }
        for (int t = t0; t < t1; t++) {
#pragma unroll
            for (int k = 0; k < K - 1; k++) win[k] = win[k + 1];
            win[K - 1] = x4[base + (size_t)t * C4];
            float4 a = make_float4(bc[0], bc[1], bc[2], bc[3]);
#pragma unroll
            for (int k = 0; k < K; k++) {
                a.x += wk[0][k] * win[k].x;
                a.y += wk[1][k] * win[k].y;
                a.z += wk[2][k] * win[k].z;
                a.w += wk[3][k] * win[k].w;
            }
            p4[base + (size_t)t * C4] = a;
            o4[base + (size_t)t * C4] = make_float4(dev_silu(a.x), dev_silu(a.y), dev_silu(a.z), dev_silu(a.w));
        }
    }
}

void forward(float* out, float* pre, const float* inp, const float* w, const float* bias, int B, int T, int C, int K) {
    const int tiles = ceil_div(T, hl::gpu::CONV_TILE_T);
    dim3 grid(ceil_div(C / 4, 128), (unsigned)std::min(B * tiles, 65535));
    hl::gpu::conv1d_dispatch_k(K, [&](auto kc) {
        forward_kernel<decltype(kc)::value><<<grid, 128>>>(out, pre, inp, w, bias, B, T, C);
        cudaCheckLast();
    });
}

}  // namespace v3

// ---------------------------------------------------------------------------------------------------------
// driver
// ---------------------------------------------------------------------------------------------------------

// One signature for every version: a forward that saves no pre ignores it; a backward reads pre (v1) or recomputes it
// from inp, w and bias (v2). passes: the tensors of B·T·C floats each moves (the bandwidth's bytes).
using Fwd = void (*)(float*, float*, const float*, const float*, const float*, int, int, int, int);
using Bwd = void (*)(float*, float*, float*, const float*, const float*, const float*, const float*, const float*, int,
                     int, int, int);
struct FV { int v; Fwd f; bool saves_pre; int passes; };
struct BV { int v; Bwd f; int passes; };
void v1_backward(float* dinp, float* dw, float* dbias, const float* dout, const float* pre, const float* inp,
                 const float* w, const float*, int B, int T, int C, int K) {
    v1::backward(dinp, dw, dbias, dout, pre, inp, w, B, T, C, K);
}
void v2_forward(float* out, float*, const float* inp, const float* w, const float* bias, int B, int T, int C, int K) {
    hl::gpu::conv1d_silu_forward(out, inp, w, bias, B, T, C, K);
}
void v2_backward(float* dinp, float* dw, float* dbias, const float* dout, const float*, const float* inp,
                 const float* w, const float* bias, int B, int T, int C, int K) {
    static DeviceBuffer<float> scratch;  // grown to the largest size asked for, outside the timed loops' first call
    const size_t n = hl::gpu::conv1d_backward_scratch_size(B, T, C, K);
    if (scratch.n < n) scratch.alloc(n);
    hl::gpu::conv1d_silu_backward(dinp, dw, dbias, dout, inp, w, bias, B, T, C, K, scratch.ptr);
}
const FV FWDS[] = {{1, v1::forward, true, 3}, {2, v2_forward, false, 2}, {3, v3::forward, true, 3}};
const BV BWDS[] = {{1, v1_backward, 6}, {2, v2_backward, 5}};

struct Problem {
    int B, T, C, K;
    size_t n() const { return (size_t)B * T * C; }
    std::vector<float> x, w, b, dout;
    DeviceBuffer<float> x_, w_, b_, dout_, out_, pre_, dinp_, dw_, db_;
    Problem(int B_, int T_, int C_, int K_) : B(B_), T(T_), C(C_), K(K_) {
        hl::Rng rng(11);
        x.resize(n()); w.resize((size_t)C * K); b.resize(C); dout.resize(n());
        rng.fill_normal(x.data(), x.size(), 1.0);
        rng.fill_normal(w.data(), w.size(), 0.5);
        rng.fill_normal(b.data(), b.size(), 0.5);
        rng.fill_normal(dout.data(), dout.size(), 1.0);
        x_.alloc(n()); w_.alloc(w.size()); b_.alloc(C); dout_.alloc(n());
        out_.alloc(n()); pre_.alloc(n()); dinp_.alloc(n()); dw_.alloc(w.size()); db_.alloc(C);
        x_.upload(x); w_.upload(w); b_.upload(b); dout_.upload(dout);
    }
    void poison() {
        for (auto* d : {&out_, &pre_, &dinp_}) cudaCheck(cudaMemset(d->ptr, 0xFF, d->n * sizeof(float)));
        dw_.zero();
        db_.zero();
    }
};

int main(int argc, char** argv) {
    const int only = argc > 1 ? std::atoi(argv[1]) : 0;
    constexpr int K = 4;
    // correctness at the check size, against the CPU
    {
        Problem p(2, 1000, 1000, K);
        std::printf("conv1d check B=%d T=%d C=%d K=%d\n", p.B, p.T, p.C, p.K);
        std::vector<float> out(p.n()), pre(p.n()), dinp(p.n()), dw(p.w.size(), 0.f), db(p.C, 0.f);
        hl::conv1d_silu_forward(out.data(), pre.data(), p.x.data(), p.w.data(), p.b.data(), p.B, p.T, p.C, K);
        hl::conv1d_silu_backward(dinp.data(), dw.data(), db.data(), p.dout.data(), pre.data(), p.x.data(),
                                 p.w.data(), p.B, p.T, p.C, K);
        DeviceBuffer<float> pre_cpu(p.n());
        pre_cpu.upload(pre);
        for (const FV& fv : FWDS) {
            if (only && fv.v != only) continue;
            p.poison();
            fv.f(p.out_.ptr, p.pre_.ptr, p.x_.ptr, p.w_.ptr, p.b_.ptr, p.B, p.T, p.C, K);
            const double e1 = rel_err(p.out_.download(), out), e2 = fv.saves_pre ? rel_err(p.pre_.download(), pre) : 0;
            char pe[24] = "(not saved)";
            if (fv.saves_pre) std::snprintf(pe, sizeof pe, "%.1e", e2);
            std::printf("  forward  v%d: rel err out %.1e pre %s %s\n", fv.v, e1, pe,
                        e1 <= 1e-4 && e2 <= 1e-4 ? "ok" : "MISMATCH");
        }
        for (const BV& bv : BWDS) {
            if (only && bv.v != only) continue;
            p.poison();
            bv.f(p.dinp_.ptr, p.dw_.ptr, p.db_.ptr, p.dout_.ptr, pre_cpu.ptr, p.x_.ptr, p.w_.ptr, p.b_.ptr, p.B, p.T,
                 p.C, K);
            const double e1 = rel_err(p.dinp_.download(), dinp), e2 = rel_err(p.dw_.download(), dw),
                         e3 = rel_err(p.db_.download(), db);
            std::printf("  backward v%d: rel err dinp %.1e dw %.1e dbias %.1e %s\n", bv.v, e1, e2, e3,
                        e1 <= 1e-3 && e2 <= 1e-3 && e3 <= 1e-3 ? "ok" : "MISMATCH");
        }
    }
    // timing at the 1B Mamba-2 shape, then at the 100m one (conv_dim = 2048 + 2·128)
    for (const int C : {4352, 2304}) {
        Problem p(8, 2048, C, K);
        std::printf("conv1d timing B=%d T=%d C=%d K=%d\n", p.B, p.T, p.C, p.K);
        const double bytes = (double)p.n() * sizeof(float);
        p.poison();
        v1::forward(p.out_.ptr, p.pre_.ptr, p.x_.ptr, p.w_.ptr, p.b_.ptr, p.B, p.T, p.C, K);  // pre for v1's backward
        for (const FV& fv : FWDS) {
            if (only && fv.v != only) continue;
            const float ms = median_ms([&] { fv.f(p.out_.ptr, p.pre_.ptr, p.x_.ptr, p.w_.ptr, p.b_.ptr, p.B, p.T, p.C, K); });
            std::printf("  forward  v%d: %8.4f ms %7.0f GB/s\n", fv.v, ms, fv.passes * bytes / ms / 1e6);
        }
        for (const BV& bv : BWDS) {
            if (only && bv.v != only) continue;
            const float ms = median_ms([&] {
                bv.f(p.dinp_.ptr, p.dw_.ptr, p.db_.ptr, p.dout_.ptr, p.pre_.ptr, p.x_.ptr, p.w_.ptr, p.b_.ptr, p.B, p.T,
                     p.C, K);
            });
            std::printf("  backward v%d: %8.4f ms %7.0f GB/s\n", bv.v, ms, bv.passes * bytes / ms / 1e6);
        }
        if (!only || only == 2) {  // v2's two kernels on their own
            const int tiles = ceil_div(p.T, hl::gpu::CONV_TILE_T);
            dim3 grid(ceil_div(p.C, hl::gpu::CONV_BLOCK), (unsigned)std::min(p.B * tiles, 65535));
            const int splits = hl::gpu::conv1d_dw_splits(p.B, p.T);
            DeviceBuffer<float> scratch(hl::gpu::conv1d_backward_scratch_size(p.B, p.T, p.C, K));
            const hl::gpu::ConvColumns<const float> dout(p.dout_.ptr, p.C);  // dense
            const float ms1 = median_ms([&] {
                hl::gpu::conv1d_silu_dinp_kernel<K><<<grid, hl::gpu::CONV_BLOCK>>>(p.dinp_.ptr, dout, p.x_.ptr,
                                                                                   p.w_.ptr, p.b_.ptr, p.B, p.T, p.C,
                                                                                   p.C);
                cudaCheckLast();
            });
            const float ms2 = median_ms([&] {
                hl::gpu::conv1d_silu_dw_part_kernel<K>
                    <<<dim3(ceil_div(p.C, hl::gpu::CONV_DW_CH), splits), dim3(hl::gpu::CONV_DW_CH, hl::gpu::CONV_DW_LANES)>>>(
                        scratch.ptr, dout, p.x_.ptr, p.w_.ptr, p.b_.ptr, p.B, p.T, p.C, p.C);
                hl::gpu::conv1d_silu_dw_sum_kernel<K><<<ceil_div((K + 1) * p.C, 256), 256>>>(p.dw_.ptr, p.db_.ptr,
                                                                                          scratch.ptr, splits, p.C);
                cudaCheckLast();
            });
            std::printf("    v2 parts: dinp %.4f ms (%.0f GB/s), dw+dbias %.4f ms (%.0f GB/s)\n", ms1,
                        3 * bytes / ms1 / 1e6, ms2, 2 * bytes / ms2 / 1e6);
        }
        // the shipped kernels must also agree with v1 at this size (v1 was checked against the CPU above)
        if (!only) {
            p.poison();
            v1::forward(p.out_.ptr, p.pre_.ptr, p.x_.ptr, p.w_.ptr, p.b_.ptr, p.B, p.T, p.C, K);
            auto out1 = p.out_.download();
            v1::backward(p.dinp_.ptr, p.dw_.ptr, p.db_.ptr, p.dout_.ptr, p.pre_.ptr, p.x_.ptr, p.w_.ptr, p.B, p.T, p.C, K);
            auto dinp1 = p.dinp_.download(), dw1 = p.dw_.download(), db1 = p.db_.download();
            p.poison();
            hl::gpu::conv1d_silu_forward(p.out_.ptr, p.x_.ptr, p.w_.ptr, p.b_.ptr, p.B, p.T, p.C, K);
            v2_backward(p.dinp_.ptr, p.dw_.ptr, p.db_.ptr, p.dout_.ptr, nullptr, p.x_.ptr, p.w_.ptr, p.b_.ptr, p.B, p.T,
                        p.C, K);
            std::printf("  v2 vs v1 at the timed size: out %.1e dinp %.1e dw %.1e dbias %.1e\n",
                        rel_err(p.out_.download(), out1), rel_err(p.dinp_.download(), dinp1),
                        rel_err(p.dw_.download(), dw1), rel_err(p.db_.download(), db1));
        }
    }
    return 0;
}
