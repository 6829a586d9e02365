// dev/cuda/ssd.cu — playground for the SSD scan, in the style of llm.c's dev/cuda: numbered versions, each
// checked against the CPU reference (model/ssd.h) and timed with cudaEvents (warm-up, median of repeats).
//   v1  naive: the recurrence itself. Forward: one thread per (b, h, p) walks t = 0..T−1 with its state row
//       S[p, :] (N floats) in registers, saving every step's state (B·H·T·P·N floats) for the backward.
//       Backward: one block per (b, h), one thread per p, walking t = T−1..0 with its row of dS in local
//       memory; dB, dC and ddt are summed over p with shared-memory atomics, then over the heads of a group.
//   v2  the chunked kernels of kernels/ssd.cuh (what we ship), with a per-kernel time breakdown.
//   v3  v2 with its block GEMMs on the tensor cores (bf16 operands, fp32 accumulation: a Bf16Scope and
//       ssd_tensor_cores(), which train_gpu sets under bf16); checked at a bf16 tolerance (5e-2), timed
//   v4  v3 as Mamba-2 runs it under bf16: x, B, C and dy in bf16 (the inputs rounded), y and the chunk states written
//       in bf16 (their local states in the backward's scratch); the same kernels moving half the bytes; checked and
//       timed as v3
// Correctness: every version against the CPU chunked form (float) at a reduced shape (B=1, T≤512, H≤4, the
// same P, N, G, Q), max-norm relative error max|g − c| / max|c| per tensor; at the full shape v1 and v2
// are compared with each other.
// Throughput: the paper's SSD FLOPs (DESIGN.md §2), fwd+bwd = 3·T·(9·d_ssm·N + 2·d_ssm) per sample with
// d_ssm = H·P; the forward is counted as a third of it.
//
// Compile (from the repo root):
//   make dev/cuda/ssd      (nvcc with the Makefile's NVFLAGS → build/dev/ssd)
// Run:   ./build/dev/ssd [version: 0 = all, 1, 2, 3, 4] [B T H P N G Q]
//        default shape: the paper's 350m Mamba layer, B=4 T=2048 H=24 P=128 N=128 G=1 Q=256
#include <algorithm>           // std::sort, std::min, std::max
#include <cmath>               // std::fabs
#include <cstdio>              // std::printf
#include <cstdlib>             // std::atoi
#include <functional>          // std::function for the breakdown table
#include <type_traits>         // std::is_same_v, std::remove_pointer_t: the breakdown on fp32 or bf16 tensors
#include <vector>              // std::vector host copies
#include <cuda_runtime.h>      // cudaEvent*, cudaMemGetInfo
#include "dev/cuda/common.cuh"   // median_ms, rel_err, poison: the playgrounds' shared harness
#include "kernels/common.cuh"  // DeviceBuffer, cudaCheck, cudaCheckLast, ceil_div
#include "kernels/ssd.cuh"     // v2: hl::gpu::ssd_chunked_forward/backward and the kernels inside
#include "model/common.h"      // Rng
#include "model/ssd.h"         // the CPU reference

using hl::dev::median_ms;  // dev/cuda/common.cuh
using hl::dev::rel_err;
using hl::dev::poison;

using hl::gpu::ceil_div;
using hl::gpu::DeviceBuffer;

// ---------------------------------------------------------------------------------------------
// v1: the naive sequential recurrence
// ---------------------------------------------------------------------------------------------

constexpr int V1_NMAX = 128;  // N ≤ 128 (the state row is a fixed-size array)

// One thread per (b, h, p) — p fastest, so a warp shares (b, h) and reads B_t, C_t as broadcasts — walks
// the T steps: S[p, :] = exp(dt·A)·S[p, :] + dt·x[p]·B_t;  y[p] = S[p, :]·C_t + D·x[p]. The loop over n is
// unrolled to V1_NMAX so the row stays in registers. states (B,H,T,P,N) is written when non-null.
__global__ void ssd_v1_forward_kernel(float* y, float* states, float* final_state, const float* x, const float* dt,
                                      const float* A, const float* Bm, const float* Cm, const float* D,
                                      const float* init_state, int B, int T, int H, int P, int G, int N) {
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= B * H * P) return;
    const int p = idx % P, bh = idx / P, b = bh / H, h = bh % H, g = h / (H / G);
    float s[V1_NMAX];
#pragma unroll
    for (int n = 0; n < V1_NMAX; n++) s[n] = (n < N && init_state) ? init_state[((size_t)bh * P + p) * N + n] : 0.f;
    const float Ah = A[h], Dh = D[h];
    for (int t = 0; t < T; t++) {
        const float dtt = dt[((size_t)b * T + t) * H + h];
        const float decay = expf(dtt * Ah);
        const size_t xi = (((size_t)b * T + t) * H + h) * P + p;
        const float xv = x[xi];
        const float* Bt = Bm + (((size_t)b * T + t) * G + g) * N;
        const float* Ct = Cm + (((size_t)b * T + t) * G + g) * N;
        float* st = states ? states + (((size_t)bh * T + t) * P + p) * N : nullptr;
        float acc = 0.f;
#pragma unroll
        for (int n = 0; n < V1_NMAX; n++) {
            if (n < N) {
                s[n] = decay * s[n] + dtt * xv * Bt[n];
                acc += s[n] * Ct[n];
                if (st) st[n] = s[n];
            }
        }
        y[xi] = acc + Dh * xv;
    }
    if (final_state)
#pragma unroll
        for (int n = 0; n < V1_NMAX; n++)
            if (n < N) final_state[((size_t)bh * P + p) * N + n] = s[n];
}

// One block of 128 threads per (b, h), thread p < P owns the row dS[p, :] (local memory) and walks t
// backwards, as ssd_sequential_backward does. The sums over p (dB_t, dC_t, ddt_t) go through shared
// memory atomics, thread p starting its n loop at n = p so that a warp's lanes hit different addresses.
// dB_h, dC_h (B,T,H,N) are per head; ssd_v1_reduce_kernel sums them over the heads of a group.
__global__ void __launch_bounds__(128) ssd_v1_backward_kernel(float* dx, float* ddt, float* dB_h, float* dC_h,
                                                              float* dA_bh, float* dD_bh, float* dinit_state,
                                                              const float* dy, const float* dfinal_state,
                                                              const float* states, const float* x, const float* dt,
                                                              const float* A, const float* Bm, const float* Cm,
                                                              const float* D, const float* init_state, int T, int H,
                                                              int P, int G, int N) {
    const int bh = blockIdx.x, b = bh / H, h = bh % H, g = h / (H / G), p = threadIdx.x;
    const bool active = p < P;
    __shared__ float sB[V1_NMAX], sC[V1_NMAX], sdB[V1_NMAX], sdC[V1_NMAX], sacc[3];
    float dS[V1_NMAX];
    for (int n = 0; n < N; n++) dS[n] = (active && dfinal_state) ? dfinal_state[((size_t)bh * P + p) * N + n] : 0.f;
    if (p < 3) sacc[p] = 0.f;
    const float Ah = A[h], Dh = D[h];
    float dA_acc = 0.f, dD_acc = 0.f;
    for (int t = T - 1; t >= 0; t--) {
        if (p < N) {
            sB[p] = Bm[(((size_t)b * T + t) * G + g) * N + p];
            sC[p] = Cm[(((size_t)b * T + t) * G + g) * N + p];
            sdB[p] = 0.f;
            sdC[p] = 0.f;
        }
        if (p == 0) sacc[0] = 0.f;
        __syncthreads();
        if (active) {
            const size_t xi = (((size_t)b * T + t) * H + h) * P + p;
            const float dyp = dy[xi], xp = x[xi], dtt = dt[((size_t)b * T + t) * H + h];
            const float decay = expf(dtt * Ah);
            const float* S = states + (((size_t)bh * T + t) * P + p) * N;
            const float* Sp = t > 0 ? states + (((size_t)bh * T + t - 1) * P + p) * N
                                    : (init_state ? init_state + ((size_t)bh * P + p) * N : nullptr);
            float dSB = 0.f, dSS = 0.f;
            for (int k = 0; k < N; k++) {
                const int n = (k + p) % N;
                dS[n] += dyp * sC[n];                   // y_t = S_t·C_t
                atomicAdd(&sdC[n], dyp * S[n]);
                dSB += dS[n] * sB[n];                   // S_t = decay·S_{t−1} + dt·x ⊗ B
                atomicAdd(&sdB[n], dtt * dS[n] * xp);
                if (Sp) dSS += dS[n] * Sp[n];
            }
            dx[xi] = Dh * dyp + dtt * dSB;
            const float da = decay * dSS;  // ∂L/∂a_t
            atomicAdd(&sacc[0], xp * dSB + Ah * da);
            dA_acc += dtt * da;
            dD_acc += dyp * xp;
            for (int n = 0; n < N; n++) dS[n] *= decay;
        }
        __syncthreads();
        if (p < N) {
            dB_h[(((size_t)b * T + t) * H + h) * N + p] = sdB[p];
            dC_h[(((size_t)b * T + t) * H + h) * N + p] = sdC[p];
        }
        if (p == 0) ddt[((size_t)b * T + t) * H + h] = sacc[0];
        __syncthreads();
    }
    if (active && dinit_state)
        for (int n = 0; n < N; n++) dinit_state[((size_t)bh * P + p) * N + n] = dS[n];
    if (active) {
        atomicAdd(&sacc[1], dA_acc);
        atomicAdd(&sacc[2], dD_acc);
    }
    __syncthreads();
    if (p == 0) {
        dA_bh[bh] = sacc[1];
        dD_bh[bh] = sacc[2];
    }
}

// dBm, dCm (B,T,G,N) = Σ over the heads of the group of dB_h, dC_h; one thread per output element.
// Block 0 also adds the per-(b, h) dA, dD to the parameter gradients.
__global__ void ssd_v1_reduce_kernel(float* dBm, float* dCm, float* dA, float* dD, const float* dB_h, const float* dC_h,
                                     const float* dA_bh, const float* dD_bh, int B, int T, int H, int G, int N) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    const int hpg = H / G;
    if (i < (size_t)B * T * G * N) {
        const int n = i % N;
        const size_t bt = i / N / G;
        const int g = (i / N) % G;
        float sb = 0.f, sc = 0.f;
        for (int k = 0; k < hpg; k++) {
            sb += dB_h[(bt * H + g * hpg + k) * N + n];
            sc += dC_h[(bt * H + g * hpg + k) * N + n];
        }
        dBm[i] = sb;
        dCm[i] = sc;
    }
    if (blockIdx.x == 0 && threadIdx.x < (unsigned)H) {
        const int h = threadIdx.x;
        float sa = 0.f, sd = 0.f;
        for (int b = 0; b < B; b++) {
            sa += dA_bh[b * H + h];
            sd += dD_bh[b * H + h];
        }
        dA[h] += sa;
        dD[h] += sd;
    }
}

// ---------------------------------------------------------------------------------------------
// harness
// ---------------------------------------------------------------------------------------------

struct Shape {
    int B, T, H, P, N, G, Q;
};

struct Problem {  // inputs, outputs and gradients of one scan, on the device
    Shape s;
    size_t nx, ndt, nbc, ns, nst;
    DeviceBuffer<float> x, dt, A, Bm, Cm, D, init, dy, dfin;             // inputs
    DeviceBuffer<float> y, states, fin;                                   // forward outputs (v2: chunk states)
    DeviceBuffer<float> dx, ddt, dA, dBm, dCm, dD, dinit, scratch;        // gradients; v2 scratch
    DeviceBuffer<float> v1_states, v1_dBh, v1_dCh, v1_dAbh, v1_dDbh;      // v1 only
    DeviceBuffer<hl::gpu::bf16> x16, Bm16, Cm16, dy16, y16, states16;     // v4 only
    std::vector<float> hx, hdt, hA, hBm, hCm, hD, hinit, hdy, hdfin;
    explicit Problem(const Shape& sh, bool want_v1, bool want_v2) : s(sh) {
        nx = (size_t)s.B * s.T * s.H * s.P, ndt = (size_t)s.B * s.T * s.H, nbc = (size_t)s.B * s.T * s.G * s.N;
        ns = (size_t)s.B * s.H * s.P * s.N, nst = (size_t)s.B * s.H * hl::ssd_num_chunks(s.T, s.Q) * s.P * s.N;
        hl::Rng rng(42);
        auto fill = [&](std::vector<float>& v, size_t n, double lo, double hi, bool normal) {
            v.resize(n);
            if (normal) rng.fill_normal(v.data(), n, hi);
            else rng.fill_uniform(v.data(), n, lo, hi);
        };
        fill(hx, nx, 0, 1.0, true), fill(hdt, ndt, 0.001, 0.1, false), fill(hA, s.H, -2.0, -0.01, false);
        fill(hBm, nbc, 0, 0.3, true), fill(hCm, nbc, 0, 0.3, true), fill(hD, s.H, 0, 1.0, true);
        fill(hinit, ns, 0, 1.0, true), fill(hdy, nx, 0, 1.0, true), fill(hdfin, ns, 0, 1.0, true);
        auto up = [](DeviceBuffer<float>& d, const std::vector<float>& h) { d.alloc(h.size()); d.upload(h); };
        up(x, hx), up(dt, hdt), up(A, hA), up(Bm, hBm), up(Cm, hCm), up(D, hD), up(init, hinit), up(dy, hdy);
        up(dfin, hdfin);
        y.alloc(nx), fin.alloc(ns), dx.alloc(nx), ddt.alloc(ndt), dA.alloc(s.H), dBm.alloc(nbc), dCm.alloc(nbc);
        dD.alloc(s.H), dinit.alloc(ns);
        if (want_v2) {
            states.alloc(nst);
            scratch.alloc(hl::gpu::ssd_chunked_backward_scratch_size(s.B, s.T, s.H, s.P, s.G, s.N, s.Q));
        }
        if (want_v2) {  // v4's bf16 inputs (the same values rounded) and output
            auto up16 = [](DeviceBuffer<hl::gpu::bf16>& d, const std::vector<float>& h) {
                std::vector<hl::gpu::bf16> r(h.size());
                for (size_t i = 0; i < h.size(); i++) r[i] = __float2bfloat16_rn(h[i]);
                d.alloc(h.size());
                d.upload(r);
            };
            up16(x16, hx), up16(Bm16, hBm), up16(Cm16, hCm), up16(dy16, hdy);
            y16.alloc(nx), states16.alloc(nst);
        }
        if (want_v1) {
            v1_states.alloc((size_t)s.B * s.H * s.T * s.P * s.N);
            v1_dBh.alloc((size_t)s.B * s.T * s.H * s.N), v1_dCh.alloc((size_t)s.B * s.T * s.H * s.N);
            v1_dAbh.alloc((size_t)s.B * s.H), v1_dDbh.alloc((size_t)s.B * s.H);
        }
    }
    void zero_param_grads() { dA.zero(), dD.zero(); }
};

void forward(int version, Problem& p) {
    const Shape& s = p.s;
    if (version == 1) {
        const int n = s.B * s.H * s.P;
        ssd_v1_forward_kernel<<<ceil_div(n, 128), 128>>>(p.y.ptr, p.v1_states.ptr, p.fin.ptr, p.x.ptr, p.dt.ptr,
                                                         p.A.ptr, p.Bm.ptr, p.Cm.ptr, p.D.ptr, p.init.ptr, s.B, s.T,
                                                         s.H, s.P, s.G, s.N);
        cudaCheckLast();
    } else if (version == 4) {
        const hl::gpu::Bf16Operands ops;
        const hl::gpu::Bf16Scope scope(&ops);
        hl::gpu::ssd_detail::ssd_tensor_cores() = true;
        hl::gpu::ssd_chunked_forward(p.y16.ptr, p.states16.ptr, p.x16.ptr, p.dt.ptr, p.A.ptr, p.Bm16.ptr, p.Cm16.ptr,
                                     p.D.ptr, p.init.ptr, p.fin.ptr, s.B, s.T, s.H, s.P, s.G, s.N, s.Q, 0,
                                     p.scratch.ptr);
    } else {
        const hl::gpu::Bf16Operands ops;  // v3: (only whether bf16 operands are in effect matters here)
        const hl::gpu::Bf16Scope scope(version == 3 ? &ops : nullptr);
        hl::gpu::ssd_detail::ssd_tensor_cores() = version == 3;
        hl::gpu::ssd_chunked_forward(p.y.ptr, p.states.ptr, p.x.ptr, p.dt.ptr, p.A.ptr, p.Bm.ptr, p.Cm.ptr, p.D.ptr,
                                     p.init.ptr, p.fin.ptr, s.B, s.T, s.H, s.P, s.G, s.N, s.Q);
    }
}

void backward(int version, Problem& p) {
    const Shape& s = p.s;
    if (version == 1) {
        ssd_v1_backward_kernel<<<s.B * s.H, 128>>>(p.dx.ptr, p.ddt.ptr, p.v1_dBh.ptr, p.v1_dCh.ptr, p.v1_dAbh.ptr,
                                                   p.v1_dDbh.ptr, p.dinit.ptr, p.dy.ptr, p.dfin.ptr, p.v1_states.ptr,
                                                   p.x.ptr, p.dt.ptr, p.A.ptr, p.Bm.ptr, p.Cm.ptr, p.D.ptr, p.init.ptr,
                                                   s.T, s.H, s.P, s.G, s.N);
        cudaCheckLast();
        const size_t n = (size_t)s.B * s.T * s.G * s.N;
        ssd_v1_reduce_kernel<<<(unsigned)std::max<size_t>(1, (n + 255) / 256), 256>>>(
            p.dBm.ptr, p.dCm.ptr, p.dA.ptr, p.dD.ptr, p.v1_dBh.ptr, p.v1_dCh.ptr, p.v1_dAbh.ptr, p.v1_dDbh.ptr, s.B,
            s.T, s.H, s.G, s.N);
        cudaCheckLast();
    } else if (version == 4) {
        const hl::gpu::Bf16Operands ops;
        const hl::gpu::Bf16Scope scope(&ops);
        hl::gpu::ssd_detail::ssd_tensor_cores() = true;
        hl::gpu::ssd_chunked_backward(p.dx.ptr, p.ddt.ptr, p.dA.ptr, p.dBm.ptr, p.dCm.ptr, p.dD.ptr, p.dinit.ptr,
                                      p.scratch.ptr, p.dy16.ptr, p.dfin.ptr, p.states16.ptr, p.x16.ptr, p.dt.ptr,
                                      p.A.ptr, p.Bm16.ptr, p.Cm16.ptr, p.D.ptr, s.B, s.T, s.H, s.P, s.G, s.N, s.Q);
    } else {
        const hl::gpu::Bf16Operands ops;
        const hl::gpu::Bf16Scope scope(version == 3 ? &ops : nullptr);
        hl::gpu::ssd_detail::ssd_tensor_cores() = version == 3;
        hl::gpu::ssd_chunked_backward(p.dx.ptr, p.ddt.ptr, p.dA.ptr, p.dBm.ptr, p.dCm.ptr, p.dD.ptr, p.dinit.ptr,
                                      p.scratch.ptr, p.dy.ptr, p.dfin.ptr, p.states.ptr, p.x.ptr, p.dt.ptr, p.A.ptr,
                                      p.Bm.ptr, p.Cm.ptr, p.D.ptr, s.B, s.T, s.H, s.P, s.G, s.N, s.Q);
    }
}

double max_rel_err(const std::vector<float>& g, const std::vector<float>& c) {  // max|g − c| / max|c|
    double num = 0, den = 0;
    for (size_t i = 0; i < c.size(); i++) {
        const double e = std::fabs(double(g[i]) - double(c[i]));
        if (!(e <= num)) num = e;
        den = std::max(den, std::fabs(double(c[i])));
    }
    return den > 0 ? num / den : num;
}

struct Outputs {
    std::vector<float> y, fin, dx, ddt, dA, dBm, dCm, dD, dinit;
};

Outputs run_once(int version, Problem& p) {
    p.zero_param_grads();
    forward(version, p);
    backward(version, p);
    cudaCheck(cudaDeviceSynchronize());
    std::vector<float> y = p.y.download();
    if (version == 4) {  // y in bf16
        const std::vector<hl::gpu::bf16> y16 = p.y16.download();
        for (size_t i = 0; i < y.size(); i++) y[i] = __bfloat162float(y16[i]);
    }
    return {y,                p.fin.download(), p.dx.download(), p.ddt.download(), p.dA.download(),
            p.dBm.download(), p.dCm.download(), p.dD.download(), p.dinit.download()};
}

// worst error over the tensors; prints each
double report(const char* what, const Outputs& g, const Outputs& c) {
    const char* names[] = {"y", "final", "dx", "ddt", "dA", "dBm", "dCm", "dD", "dinit"};
    const std::vector<float>* gs[] = {&g.y, &g.fin, &g.dx, &g.ddt, &g.dA, &g.dBm, &g.dCm, &g.dD, &g.dinit};
    const std::vector<float>* cs[] = {&c.y, &c.fin, &c.dx, &c.ddt, &c.dA, &c.dBm, &c.dCm, &c.dD, &c.dinit};
    double worst = 0;
    std::printf("  %-28s", what);
    for (int i = 0; i < 9; i++) {
        const double e = max_rel_err(*gs[i], *cs[i]);
        std::printf(" %s %.1e", names[i], e);
        if (!(e <= worst)) worst = e;
    }
    std::printf("\n");
    return worst;
}

Outputs cpu_reference(const Problem& p) {
    const Shape& s = p.s;
    Outputs o;
    o.y.assign(p.nx, 0.f), o.fin.assign(p.ns, 0.f);
    std::vector<float> st((size_t)s.B * s.H * hl::ssd_num_chunks(s.T, s.Q) * s.P * s.N);
    hl::ssd_chunked_forward(o.y.data(), st.data(), p.hx.data(), p.hdt.data(), p.hA.data(), p.hBm.data(), p.hCm.data(),
                            p.hD.data(), p.hinit.data(), o.fin.data(), s.B, s.T, s.H, s.P, s.G, s.N, s.Q);
    o.dx.assign(p.nx, 0.f), o.ddt.assign(p.ndt, 0.f), o.dA.assign(s.H, 0.f), o.dBm.assign(p.nbc, 0.f);
    o.dCm.assign(p.nbc, 0.f), o.dD.assign(s.H, 0.f), o.dinit.assign(p.ns, 0.f);
    std::vector<float> scratch(hl::ssd_backward_scratch_size(s.B, s.H, s.P, s.N));
    hl::ssd_chunked_backward(o.dx.data(), o.ddt.data(), o.dA.data(), o.dBm.data(), o.dCm.data(), o.dD.data(),
                             o.dinit.data(), scratch.data(), p.hdy.data(), p.hdfin.data(), st.data(), p.hx.data(),
                             p.hdt.data(), p.hA.data(), p.hBm.data(), p.hCm.data(), p.hD.data(), s.B, s.T, s.H, s.P,
                             s.G, s.N, s.Q);
    return o;
}

// v2's (or, with tc, v3's; with b16 too, v4's) kernels one by one (the launch sequence of kernels/ssd.cuh, each timed
// alone). (Named for v2, it times v3 and v4 as well: the same launchers, with Dims::tc set, on the bf16 tensors.)
void v2_breakdown(Problem& p, int reps, bool tc, bool b16 = false) {
    using namespace hl::gpu::ssd_detail;
    const Shape& s = p.s;
    Dims d = ssd_dims("dev", s.B, s.T, s.H, s.P, s.G, s.N, s.Q);
    d.tc = tc;  // (the kernels read only this; no Bf16Scope needed)
    const BwdScratch sc = bwd_scratch(p.scratch.ptr, d);
    const int hps = ssd_heads_per_slice(d.hpg());
    const dim3 gp(sc.nsplit, s.B * s.H);
    struct Item {
        const char* name;
        std::function<void()> f;
    };
    // x, Bm, Cm, dy, y, states: fp32 (v2, v3) or bf16 (v4, whose local states go to the scratch's first region, as
    // ssd_chunked_forward puts them)
    auto items_on = [&](auto* x, auto* Bm, auto* Cm, auto* dy, auto* y, auto* st) {
        using ST = std::remove_pointer_t<decltype(st)>;
        float* local = std::is_same_v<ST, float> ? p.states.ptr : sc.slots;
        return std::vector<Item>{
            {"fwd 1 chunk_state", [=, &p] { launch_chunk_state<false>(local, p.fin.ptr, x, p.dt.ptr, p.A.ptr, Bm, d, 0); }},
            {"fwd 2 state_pass", [=, &p] { ssd_state_pass_kernel<float, ST, float><<<gp, NT>>>(st, local, p.fin.ptr, p.init.ptr, p.dt.ptr, p.A.ptr, d); }},
            {"fwd 3 chunk_output", [=, &p] { launch_chunk_output(y, st, x, p.dt.ptr, p.A.ptr, Bm, Cm, p.D.ptr, d, 0); }},
            {"bwd 1 chunk_state(dy,C)", [=, &p] { launch_chunk_state<true>(sc.slots, p.dinit.ptr, dy, p.dt.ptr, p.A.ptr, Cm, d, 0); }},
            {"bwd 2 state_pass_bwd", [=, &p] { ssd_state_pass_bwd_kernel<float, ST><<<gp, NT>>>(sc.slots, p.dinit.ptr, sc.dot_part, p.dfin.ptr, st, p.dt.ptr, p.A.ptr, d); }},
            {"bwd 3 dx", [=, &p] { launch_bwd_dx(p.dx.ptr, p.ddt.ptr, sc.v_state, dy, sc.slots, x, p.dt.ptr, p.A.ptr, Bm, Cm, p.D.ptr, d, 0); }},
            {"bwd 4 dB", [=, &p] { launch_bwd_dB(p.dBm.ptr, sc.dB_part, dy, sc.slots, x, p.dt.ptr, p.A.ptr, Cm, d, hps, 0); }},
            {"bwd 5 dC", [=, &p] { launch_bwd_dC(p.dCm.ptr, sc.dC_part, sc.cdot, dy, st, x, p.dt.ptr, p.A.ptr, Bm, Cm, d, hps, 0); }},
            {"bwd 6 sum_slices x2", [=, &p] {
                 const size_t n = (size_t)s.B * s.T * s.G * s.N;
                 if (sc.nslices > 1) {
                     ssd_sum_slices_kernel<float><<<4096, NT>>>(p.dBm.ptr, sc.dB_part, n, sc.nslices);
                     ssd_sum_slices_kernel<float><<<4096, NT>>>(p.dCm.ptr, sc.dC_part, n, sc.nslices);
                 }
             }},
            {"bwd 7 finalize", [=, &p] { ssd_bwd_finalize_kernel<float><<<dim3(d.nchunks, s.B * s.H), NT>>>(p.ddt.ptr, sc.dA_part, sc.dD_part, sc.cdot, sc.v_state, sc.dot_part, sc.nparts, dy, x, p.dt.ptr, p.A.ptr, d); }},
            {"bwd 8 head_grads", [=, &p] { ssd_head_grads_kernel<float><<<ceil_div(s.H, NT), NT>>>(p.dA.ptr, p.dD.ptr, sc.dA_part, sc.dD_part, d); }},
        };
    };
    const std::vector<Item> items = b16 ? items_on(p.x16.ptr, p.Bm16.ptr, p.Cm16.ptr, p.dy16.ptr, p.y16.ptr, p.states16.ptr)
                                        : items_on(p.x.ptr, p.Bm.ptr, p.Cm.ptr, p.dy.ptr, p.y.ptr, p.states.ptr);
    for (auto& it : items) {
        const float ms = median_ms([&] { it.f(); cudaCheckLast(); }, 2, reps);
        std::printf("    %-26s %8.3f ms\n", it.name, ms);
    }
}

int main(int argc, char** argv) {
    const int version = argc > 1 ? std::atoi(argv[1]) : 0;
    Shape s{4, 2048, 24, 128, 128, 1, 256};
    if (argc > 8) s = {std::atoi(argv[2]), std::atoi(argv[3]), std::atoi(argv[4]), std::atoi(argv[5]),
                       std::atoi(argv[6]), std::atoi(argv[7]), std::atoi(argv[8])};
    const bool v1 = version == 0 || version == 1, v2 = version == 0 || version == 2, v3 = version == 0 || version == 3;
    const bool v4 = version == 0 || version == 4;
    HL_CHECK(s.N <= V1_NMAX && s.P <= 128, "dev/ssd: P and N must be <= 128");
    cudaDeviceProp prop;
    cudaCheck(cudaGetDeviceProperties(&prop, 0));
    std::printf("device: %s (%d SMs)\n", prop.name, prop.multiProcessorCount);

    // 1. correctness against the CPU at a reduced shape
    Shape r{1, std::min(s.T, 512), std::min(s.H, 4), s.P, s.N, 1, s.Q};
    if (s.G > 1 && r.H % s.G == 0) r.G = s.G;
    std::printf("check vs CPU chunked (float) at B=%d T=%d H=%d P=%d N=%d G=%d Q=%d, max-norm rel err:\n", r.B, r.T,
                r.H, r.P, r.N, r.G, r.Q);
    {
        Problem pr(r, v1, v2 || v3 || v4);
        const Outputs c = cpu_reference(pr);
        const char* names[] = {"", "v1 naive", "v2 chunked", "v3 chunked, tensor cores", "v4 v3 on bf16 tensors"};
        for (int v = 1; v <= 4; v++) {
            if ((v == 1 && !v1) || (v == 2 && !v2) || (v == 3 && !v3) || (v == 4 && !v4)) continue;
            const double e = report(names[v], run_once(v, pr), c);
            const double tol = v >= 3 ? 5e-2 : 1e-3;  // v3, v4: bf16 operands
            std::printf("  -> %s (tol %.0e)\n", e <= tol ? "ok" : "MISMATCH", tol);
        }
    }

    // 2. the full shape: v1 and v2 against each other, then the timings
    const size_t v1_bytes = (size_t)s.B * s.H * s.T * s.P * s.N * sizeof(float);
    size_t free_b = 0, total_b = 0;
    cudaCheck(cudaMemGetInfo(&free_b, &total_b));
    const bool v1_fits = v1 && v1_bytes + (size_t)(2u << 30) < free_b;
    if (v1 && !v1_fits) std::printf("v1 skipped at the full shape: its per-step states need %.1f GB\n", v1_bytes / 1e9);
    std::printf("full shape B=%d T=%d H=%d P=%d N=%d G=%d Q=%d (d_ssm=%d)\n", s.B, s.T, s.H, s.P, s.N, s.G, s.Q,
                s.H * s.P);
    Problem p(s, v1_fits, v2 || v3 || v4);
    if (v1_fits && v2) report("v1 vs v2 (max-norm rel)", run_once(1, p), run_once(2, p));

    const double d_ssm = (double)s.H * s.P;
    const double flops_fb = (double)s.B * 3.0 * s.T * (9.0 * d_ssm * s.N + 2.0 * d_ssm);  // paper, fwd+bwd
    const double flops_f = flops_fb / 3.0;
    std::printf("timings (median of repeats; TFLOP/s from the paper's count: fwd+bwd %.1f GFLOP, fwd a third):\n",
                flops_fb / 1e9);
    for (int v = 1; v <= 4; v++) {
        if ((v == 1 && !v1_fits) || (v == 2 && !v2) || (v == 3 && !v3) || (v == 4 && !v4)) continue;
        const int reps = v == 1 ? 3 : 20;
        const float f = median_ms([&] { forward(v, p); }, 1, reps);
        const float fb = median_ms([&] { forward(v, p); backward(v, p); }, 1, reps);
        std::printf("  v%d %-8s fwd %9.3f ms (%6.2f TFLOP/s)   fwd+bwd %9.3f ms (%6.2f TFLOP/s)\n", v,
                    v == 1 ? "naive" : v == 2 ? "chunked" : v == 3 ? "tc" : "tc bf16", f, flops_f / f / 1e9, fb, flops_fb / fb / 1e9);
        if (v >= 3)  // v4: on bf16 x, B, C, dy, writing y and the states in bf16, as Mamba-2 and the Triton kernel run
            std::printf("csv,ssd,hybridlm bf16 tensor cores%s,%d,%d,%d,%d,%d,%d,%d,%.4f,%.4f,%.2f,%.2f\n",
                        v == 4 ? " bf16 tensors" : "", s.B, s.T, s.H, s.P, s.N, s.G, s.Q, f, fb, flops_f / f / 1e9,
                        flops_fb / fb / 1e9);
        if (v == 2) {
            // the line bench/kernels.sh sets beside mamba_ssm's Triton kernel on the same shape (dev/bench_kernels.py)
            std::printf("csv,kernel,impl,B,T,H,P,N,G,Q,fwd_ms,fwd_bwd_ms,fwd_tflops,fwd_bwd_tflops\n");
            std::printf("csv,ssd,hybridlm fp32,%d,%d,%d,%d,%d,%d,%d,%.4f,%.4f,%.2f,%.2f\n", s.B, s.T, s.H, s.P, s.N,
                        s.G, s.Q, f, fb, flops_f / f / 1e9, flops_fb / fb / 1e9);
        }
        if (v >= 2) v2_breakdown(p, reps, v >= 3, v == 4);
    }
    return 0;
}
