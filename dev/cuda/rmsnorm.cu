// dev/cuda/rmsnorm.cu — playground for the RMSNorm kernels, in the style of llm.c's dev/cuda: numbered
// versions, each checked against the CPU reference (model/rmsnorm.h, float) and timed with cudaEvents
// (warm-up, then the median of repeats) at N = B·T = 16384 rows of C = 2048 (G = 1), and a grouped case
// (G = 16 groups of 128, the Mamba-2 gated norm shape). Checked at the timed size.
// Forward:
//   v1  one thread per (row, group), serial loop: lanes of a warp are Cg floats apart (uncoalesced)
//   v2  kernels/rmsnorm.cuh: one warp per (row, group), strided loops + shuffle reduction; for fp32 rows with
//       Cg % 4 == 0 and 1024 ≤ Cg ≤ 4096 it dispatches to v4's scheme instead (measured faster there)
//   v3  warp per (row, group) with float4 loads/stores (Cg % 4 == 0)
//   v4  one block of 256 threads per (row, group), float4, the row kept in registers between the two
//       passes (x read once from memory), block reduction through shared memory (Cg ≤ 4096)
// Backward (dinp, then dweight):
//   v1  one thread per (row, group) for dinp; one thread per column for dweight (serial over N)
//   v2  kernels/rmsnorm.cuh: warp per (row, group) for dinp; colsum (8 columns × 128 row lanes per block,
//       fixed-order tree) for dweight
//   v3  v2 with float4 loads/stores in the dinp kernel
// Bandwidth is reported as the minimal bytes each pass must move (forward: read x, write out; backward:
// read dout and x, write dinp, plus read dout and x again for dweight) over the time.
//
// Build: make dev/cuda/rmsnorm      (nvcc with the Makefile's NVFLAGS → build/dev/rmsnorm)
// Run:   ./build/dev/rmsnorm [version]     (no argument: every version)
#include <algorithm>              // std::sort, std::max
#include <cmath>                  // std::fabs, std::isfinite
#include <cstdio>                 // std::printf
#include <cstdlib>                // std::atoi
#include <vector>                 // std::vector
#include <cuda_runtime.h>         // cudaEvent_*, cudaMemset
#include "dev/cuda/common.cuh"   // median_ms, rel_err, poison: the playgrounds' shared harness
#include "kernels/common.cuh"     // cudaCheck, cudaCheckLast, ceil_div, DeviceBuffer, warp_sum, colsum (v2, v3)
#include "kernels/rmsnorm.cuh"    // v2: hl::gpu::rmsnorm_forward / rmsnorm_backward
#include "model/rmsnorm.h"        // the CPU reference

using hl::dev::median_ms;  // dev/cuda/common.cuh
using hl::dev::rel_err;
using hl::dev::poison;

using hl::gpu::ceil_div;
using hl::gpu::DeviceBuffer;

// ---------------------------------------------------------------------------------------------------------
// v1: one thread per (row, group)
// ---------------------------------------------------------------------------------------------------------
namespace v1 {

__global__ void forward_kernel(float* out, float* rstd, const float* inp, const float* weight, int N, int G, int Cg,
                               float eps) {
    const int r = blockIdx.x * blockDim.x + threadIdx.x;  // (n, g) = (r / G, r % G)
    if (r >= N * G) return;
    const float* x = inp + (size_t)r * Cg;
    float ss = 0.f;
    for (int c = 0; c < Cg; c++) ss += x[c] * x[c];
    const float s = 1.0f / sqrtf(ss / Cg + eps);
    rstd[r] = s;
    const float* w = weight + (size_t)(r % G) * Cg;
    for (int c = 0; c < Cg; c++) out[(size_t)r * Cg + c] = x[c] * s * w[c];
}

__global__ void dinp_kernel(float* dinp, const float* dout, const float* inp, const float* weight, const float* rstd,
                            int N, int G, int Cg) {
    const int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= N * G) return;
    const float* x = inp + (size_t)r * Cg;
    const float* dy = dout + (size_t)r * Cg;
    const float* w = weight + (size_t)(r % G) * Cg;
    const float s = rstd[r];
    float dot = 0.f;
    for (int c = 0; c < Cg; c++) dot += dy[c] * w[c] * x[c] * s;
    dot /= Cg;
    for (int c = 0; c < Cg; c++) dinp[(size_t)r * Cg + c] = s * (dy[c] * w[c] - x[c] * s * dot);
}

// one thread per column c: dweight[c] += Σ_n dout[n, c] · x[n, c] · rstd[n, c / Cg]
__global__ void dweight_kernel(float* dweight, const float* dout, const float* inp, const float* rstd, int N, int G,
                               int Cg) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    const int C = G * Cg;
    if (c >= C) return;
    float acc = 0.f;
    for (int n = 0; n < N; n++) acc += dout[(size_t)n * C + c] * inp[(size_t)n * C + c] * rstd[(size_t)n * G + c / Cg];
    dweight[c] += acc;
}

void forward(float* out, float* rstd, const float* inp, const float* weight, int N, int G, int Cg, float eps) {
    forward_kernel<<<ceil_div(N * G, 256), 256>>>(out, rstd, inp, weight, N, G, Cg, eps);
    cudaCheckLast();
}
void backward(float* dinp, float* dweight, const float* dout, const float* inp, const float* weight,
              const float* rstd, int N, int G, int Cg) {
    dinp_kernel<<<ceil_div(N * G, 256), 256>>>(dinp, dout, inp, weight, rstd, N, G, Cg);
    cudaCheckLast();
    dweight_kernel<<<ceil_div(G * Cg, 256), 256>>>(dweight, dout, inp, rstd, N, G, Cg);
    cudaCheckLast();
}

}  // namespace v1

// ---------------------------------------------------------------------------------------------------------
// v3: warp per (row, group) with float4 (needs Cg % 4 == 0: every group starts 16-byte aligned)
// ---------------------------------------------------------------------------------------------------------
namespace v3 {

__global__ void forward_kernel(float* out, float* rstd, const float* inp, const float* weight, int N, int G, int Cg,
                               float eps) {
    const int r = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (r >= N * G) return;
    const float4* x = reinterpret_cast<const float4*>(inp + (size_t)r * Cg);
    const float4* w = reinterpret_cast<const float4*>(weight + (size_t)(r % G) * Cg);
    float4* y = reinterpret_cast<float4*>(out + (size_t)r * Cg);
    const int C4 = Cg / 4;
    float ss = 0.f;
    for (int c = lane; c < C4; c += 32) {
        const float4 v = x[c];
        ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
    }
    ss = hl::gpu::warp_sum(ss);
    const float s = 1.0f / sqrtf(ss / Cg + eps);
    if (lane == 0) rstd[r] = s;
    for (int c = lane; c < C4; c += 32) {
        const float4 v = x[c], wv = w[c];
        y[c] = make_float4(v.x * s * wv.x, v.y * s * wv.y, v.z * s * wv.z, v.w * s * wv.w);
    }
}

__global__ void dinp_kernel(float* dinp, const float* dout, const float* inp, const float* weight, const float* rstd,
                            int N, int G, int Cg) {
    const int r = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (r >= N * G) return;
    const float4* x = reinterpret_cast<const float4*>(inp + (size_t)r * Cg);
    const float4* dy = reinterpret_cast<const float4*>(dout + (size_t)r * Cg);
    const float4* w = reinterpret_cast<const float4*>(weight + (size_t)(r % G) * Cg);
    float4* dx = reinterpret_cast<float4*>(dinp + (size_t)r * Cg);
    const int C4 = Cg / 4;
    const float s = rstd[r];
    float dot = 0.f;
    for (int c = lane; c < C4; c += 32) {
        const float4 a = dy[c], b = w[c], v = x[c];
        dot += (a.x * b.x * v.x + a.y * b.y * v.y + a.z * b.z * v.z + a.w * b.w * v.w) * s;
    }
    dot = hl::gpu::warp_sum(dot) / Cg;
    for (int c = lane; c < C4; c += 32) {
        const float4 a = dy[c], b = w[c], v = x[c];
        dx[c] = make_float4(s * (a.x * b.x - v.x * s * dot), s * (a.y * b.y - v.y * s * dot),
                            s * (a.z * b.z - v.z * s * dot), s * (a.w * b.w - v.w * s * dot));
    }
}

void forward(float* out, float* rstd, const float* inp, const float* weight, int N, int G, int Cg, float eps) {
    forward_kernel<<<ceil_div(N * G, 8), 256>>>(out, rstd, inp, weight, N, G, Cg, eps);
    cudaCheckLast();
}
void backward(float* dinp, float* dweight, const float* dout, const float* inp, const float* weight,
              const float* rstd, int N, int G, int Cg) {
    dinp_kernel<<<ceil_div(N * G, 8), 256>>>(dinp, dout, inp, weight, rstd, N, G, Cg);
    cudaCheckLast();
    hl::gpu::colsum(dweight, hl::gpu::RmsnormDweightTerm<float>{dout, inp, rstd, G, Cg}, N, G * Cg);
}

}  // namespace v3

// ---------------------------------------------------------------------------------------------------------
// v4: block (256 threads) per (row, group), float4, row held in registers (Cg ≤ 256·4·V4_MAX = 4096)
// ---------------------------------------------------------------------------------------------------------
namespace v4 {

constexpr int V4_MAX = 4;  // float4s per thread

__global__ void forward_kernel(float* out, float* rstd, const float* inp, const float* weight, int N, int G, int Cg,
                               float eps) {
    __shared__ float part[8];
    const int r = blockIdx.x, tid = threadIdx.x;
    const float4* x = reinterpret_cast<const float4*>(inp + (size_t)r * Cg);
    const float4* w = reinterpret_cast<const float4*>(weight + (size_t)(r % G) * Cg);
    float4* y = reinterpret_cast<float4*>(out + (size_t)r * Cg);
    const int C4 = Cg / 4;
    float4 v[V4_MAX];
    float ss = 0.f;
#pragma unroll
    for (int q = 0; q < V4_MAX; q++) {
        const int c = tid + q * 256;
        v[q] = c < C4 ? x[c] : make_float4(0.f, 0.f, 0.f, 0.f);
        ss += v[q].x * v[q].x + v[q].y * v[q].y + v[q].z * v[q].z + v[q].w * v[q].w;
    }
    ss = hl::gpu::warp_sum(ss);
    if (tid % 32 == 0) part[tid / 32] = ss;
    __syncthreads();
    float tot = 0.f;
    for (int k = 0; k < 8; k++) tot += part[k];
    const float s = 1.0f / sqrtf(tot / Cg + eps);
    if (tid == 0) rstd[r] = s;
#pragma unroll
    for (int q = 0; q < V4_MAX; q++) {
        const int c = tid + q * 256;
        if (c < C4) {
            const float4 wv = w[c];
            y[c] = make_float4(v[q].x * s * wv.x, v[q].y * s * wv.y, v[q].z * s * wv.z, v[q].w * s * wv.w);
        }
    }
}

void forward(float* out, float* rstd, const float* inp, const float* weight, int N, int G, int Cg, float eps) {
    forward_kernel<<<N * G, 256>>>(out, rstd, inp, weight, N, G, Cg, eps);
    cudaCheckLast();
}

}  // namespace v4

// ---------------------------------------------------------------------------------------------------------
// driver
// ---------------------------------------------------------------------------------------------------------

void run_case(int N, int G, int Cg, int only) {
    const int C = G * Cg;
    const size_t NC = (size_t)N * C;
    const float eps = 1e-5f;
    std::printf("rmsnorm N=%d G=%d Cg=%d\n", N, G, Cg);
    hl::Rng rng(7);
    std::vector<float> x(NC), w(C), dout(NC);
    rng.fill_normal(x.data(), NC, 1.0);
    rng.fill_normal(w.data(), C, 0.3);
    for (float& v : w) v += 1.0f;
    rng.fill_normal(dout.data(), NC, 1.0);
    std::vector<float> out(NC), rstd((size_t)N * G), dinp(NC), dw(C, 0.f);
    hl::rmsnorm_forward(out.data(), rstd.data(), x.data(), w.data(), N, G, Cg, eps);
    hl::rmsnorm_backward(dinp.data(), dw.data(), dout.data(), x.data(), w.data(), rstd.data(), N, G, Cg);

    DeviceBuffer<float> x_(NC), w_(C), dout_(NC), out_(NC), rstd_((size_t)N * G), dinp_(NC), dw_(C);
    x_.upload(x); w_.upload(w); dout_.upload(dout);
    const double fwd_bytes = 2.0 * NC * sizeof(float), bwd_bytes = 5.0 * NC * sizeof(float);

    using Fwd = void (*)(float*, float*, const float*, const float*, int, int, int, float);
    using Bwd = void (*)(float*, float*, const float*, const float*, const float*, const float*, int, int, int);
    struct FV { int v; Fwd f; };
    struct BV { int v; Bwd f; };
    const bool vec = Cg % 4 == 0;
    std::vector<FV> fwds = {{1, v1::forward},
                            {2, [](float* o, float* r, const float* x, const float* w, int N_, int G_, int Cg_, float e) {
                                 hl::gpu::rmsnorm_forward(o, r, x, w, N_, G_, Cg_, e);
                             }}};
    if (vec) fwds.push_back({3, v3::forward});
    if (vec && Cg <= 4096) fwds.push_back({4, v4::forward});
    std::vector<BV> bwds = {{1, v1::backward},
                            {2, [](float* dx, float* dw, const float* dy, const float* x, const float* w, const float* r,
                                   int N_, int G_, int Cg_) { hl::gpu::rmsnorm_backward(dx, dw, dy, x, w, r, N_, G_, Cg_); }}};
    if (vec) bwds.push_back({3, v3::backward});

    for (const FV& fv : fwds) {
        if (only && fv.v != only) continue;
        cudaCheck(cudaMemset(out_.ptr, 0xFF, NC * sizeof(float)));  // NaN: unwritten outputs fail the check
        cudaCheck(cudaMemset(rstd_.ptr, 0xFF, rstd_.n * sizeof(float)));
        fv.f(out_.ptr, rstd_.ptr, x_.ptr, w_.ptr, N, G, Cg, eps);
        const double e1 = rel_err(out_.download(), out), e2 = rel_err(rstd_.download(), rstd);
        const float ms = median_ms([&] { fv.f(out_.ptr, rstd_.ptr, x_.ptr, w_.ptr, N, G, Cg, eps); });
        std::printf("  forward  v%d: %8.4f ms %7.0f GB/s   rel err out %.1e rstd %.1e %s\n", fv.v, ms,
                    fwd_bytes / ms / 1e6, e1, e2, (e1 <= 1e-4 && e2 <= 1e-4) ? "ok" : "MISMATCH");
    }
    // the backward reads the CPU's rstd, so each version is checked on its own
    DeviceBuffer<float> rstd_cpu(rstd.size());
    rstd_cpu.upload(rstd);
    for (const BV& bv : bwds) {
        if (only && bv.v != only) continue;
        cudaCheck(cudaMemset(dinp_.ptr, 0xFF, NC * sizeof(float)));
        dw_.zero();
        bv.f(dinp_.ptr, dw_.ptr, dout_.ptr, x_.ptr, w_.ptr, rstd_cpu.ptr, N, G, Cg);
        const double e1 = rel_err(dinp_.download(), dinp), e2 = rel_err(dw_.download(), dw);
        const float ms = median_ms([&] { bv.f(dinp_.ptr, dw_.ptr, dout_.ptr, x_.ptr, w_.ptr, rstd_cpu.ptr, N, G, Cg); });
        std::printf("  backward v%d: %8.4f ms %7.0f GB/s   rel err dinp %.1e dweight %.1e %s\n", bv.v, ms,
                    bwd_bytes / ms / 1e6, e1, e2, (e1 <= 1e-3 && e2 <= 1e-3) ? "ok" : "MISMATCH");
    }
    if (!only || only == 2) {  // v2's two kernels on their own
        const float ms1 = median_ms([&] {
            hl::gpu::rmsnorm_backward(dinp_.ptr, (float*)nullptr, dout_.ptr, x_.ptr, w_.ptr, rstd_cpu.ptr, N, G, Cg);
        });
        const float ms2 = median_ms([&] {
            hl::gpu::colsum(dw_.ptr, hl::gpu::RmsnormDweightTerm<float>{dout_.ptr, x_.ptr, rstd_cpu.ptr, G, Cg}, N, C);
        });
        std::printf("    v2 parts: dinp %.4f ms (%.0f GB/s), dweight colsum %.4f ms (%.0f GB/s)\n", ms1,
                    3.0 * NC * sizeof(float) / ms1 / 1e6, ms2, 2.0 * NC * sizeof(float) / ms2 / 1e6);
    }
}

int main(int argc, char** argv) {
    const int only = argc > 1 ? std::atoi(argv[1]) : 0;
    run_case(16384, 1, 2048, only);  // the block norms of a 1B model at B·T = 16384
    run_case(16384, 16, 128, only);  // grouped: per-head norm shape
    return 0;
}
