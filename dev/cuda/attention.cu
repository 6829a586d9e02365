// dev/cuda/attention.cu — playground for the causal GQA attention kernels, in the style of llm.c's dev/cuda:
// numbered versions, each checked against the CPU reference (model/attention.h, float) at a small shape and
// timed with cudaEvents (warm-up, then the median of repeats) at B=4, T=2048, H=16, Hkv=4, hd=64.
//   v1  naive: materialises the (B, H, T, T) scores; one thread per (b, h, t) row (forward and dq), one thread
//       per (b, g, s) key row (dk, dv)
//   v2  tiled online-softmax flash-style forward / backward: the kernels shipped in kernels/attention.cuh
//   v3  forward only: v2's algorithm with 128-row query tiles, 8 × 4 scores per thread, tiles stored transposed
//       so that every shared-memory read is a float4 (3 vector loads per 32 FMAs instead of 8 scalar per 16);
//       compile-time head dims (64 / 64 here)
//   v4  v2's entry points with bf16 operands in effect (a Bf16Scope, as train_gpu --precision bf16 runs them): the
//       tensor-core kernels of kernels/attention.cuh — wmma 16×16×16 bf16 tiles, fp32 softmax and accumulation;
//       checked at bf16 tolerances (out 2e-2, gradients 5e-2)
// FLOPs counted as the usual convention: forward 4·B·H·T²·hd / 2 (causal QKᵀ and PV), backward 2.5× forward.
// Last, v2 with a sliding window (W = 512, S = 64, the DESIGN.md baseline; and S = 0) against full attention at
// T = 1024 … 8192 with B·T = 16384 tokens: time per token grows linearly in T without the window, and stays flat
// with it (its kernels skip the masked tiles; the backward splits the sink key tiles, which every query sees,
// into chunks of query tiles, so that no block walks all T/64 of them).
//
// Build: make dev/cuda/attention      (nvcc with the Makefile's NVFLAGS → build/dev/attention)
// Run:   ./build/dev/attention [version]     (no argument: every version)
#include <algorithm>               // std::sort, std::max
#include <cmath>                   // std::fabs, std::isfinite, sqrtf
#include <cstdio>                  // std::printf
#include <cstdlib>                 // std::atoi
#include <vector>                  // std::vector
#include <cuda_runtime.h>          // cudaEvent_*, cudaMemset
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
    explicit Buffers(const Problem& p, bool naive)
        : q(p.nq()), k(p.nk()), v(p.nv()), dout(p.no()), out(p.no()), lse(p.nl()), D(p.nl()), dq(p.nq()),
          dk(p.nk()), dv(p.nv()), att(naive ? p.natt() : 0), ds(naive ? p.natt() : 0) {}
};

void run_forward(int version, Buffers& m, const Problem& p) {
    const float scale = 1.f / sqrtf((float)p.dqk);
    if (version == 1) {
        const int n = p.B * p.H * p.T;
        v1::forward_kernel<<<ceil_div(n, 128), 128>>>(m.out.ptr, m.lse.ptr, m.att.ptr, m.q.ptr, m.k.ptr, m.v.ptr,
                                                      p.B, p.T, p.H, p.Hkv, p.dqk, p.dv, scale);
        cudaCheckLast();
    } else if (version == 2 || version == 4) {
        const hl::gpu::Bf16Operands ops;  // (only whether bf16 operands are in effect matters here)
        const hl::gpu::Bf16Scope scope(version == 4 ? &ops : nullptr);
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
    } else {
        const hl::gpu::Bf16Operands ops;
        const hl::gpu::Bf16Scope scope(version == 4 ? &ops : nullptr);
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
    bool ok = true;
    for (int ver = 1; ver <= 4; ver++) {
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
        const double tf = ver == 4 ? 2e-2 : 1e-4, tb = ver == 4 ? 5e-2 : 1e-3;  // v4: bf16 operands
        const bool pass = eo <= tf && eq <= tb && ek <= tb && ev <= tb;
        ok = ok && pass;
        std::printf("  v%d: out %.2e  dq %.2e  dk %.2e  dv %.2e  %s\n", ver, eo, eq, ek, ev, pass ? "ok" : "MISMATCH");
    }

    // 2. timing
    const Problem bp{4, 2048, 16, 4, 64, 64};
    const double fwd_flops = 4.0 * bp.B * bp.H * (double)bp.T * bp.T * bp.dqk / 2, bwd_flops = 2.5 * fwd_flops;
    std::printf("timing B=%d T=%d H=%d Hkv=%d hd=%d (median of repeats; fwd %.1f GFLOP, fwd+bwd %.1f GFLOP):\n",
                bp.B, bp.T, bp.H, bp.Hkv, bp.dqk, fwd_flops * 1e-9, (fwd_flops + bwd_flops) * 1e-9);
    for (int ver = 1; ver <= 4; ver++) {
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
    return ok ? 0 : 1;
}
