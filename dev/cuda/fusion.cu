// dev/cuda/fusion.cu — playground for the intra-layer fusion before its projection(s) (model/intra.h's
// intra_fuse_forward up to acts.f): per-head RMSNorm of each branch (norm=group), the scales, the sign of
// op=diff on the attention side, then the join (out=joint: f = s2 + a3 or [s2; a3]) or, for out=sep, a3 and s2
// as they go to their own projections. In the style of llm.c's dev/cuda: numbered versions, each checked
// against the CPU reference (hl::intra_fuse_forward run in float on the host with a 1-wide projection, so
// its acts.f / a3 / s2 / a1 / s1 / rstd are exactly the CPU's) and timed with cudaEvents (warm-up, then the
// median of repeats) at the paper's 350M intra shape: N = B·T = 16384 rows, attention 12 heads × d_v 128,
// Mamba 12 heads × P 128, for the recipes final-like (diff, out=joint), concat, hymba (scale=vector, add) and
// final itself (out=sep). Odd small shapes (heads of the two branches not aligned, d_v not a multiple of 4,
// scale=scalar, norm=none) are checked too, untimed.
//   v1  the launches intra_fuse_forward used to make: gpu::rmsnorm_forward on each branch, intra_scale_kernel
//       on each, then a join kernel (copied here: kernels/intra.cuh no longer has it) — 5 launches, a and s go
//       through memory about 11 times their size
//   v2  kernels/intra.cuh's intra_fuse_norm_join_kernel with scalar accesses (V = 1): one block per row;
//       phase 1 a warp per head computes rstd, phase 2 the threads write a1, s1 and f (or a3, s2) in one sweep
//   v3  the same kernel with float4 accesses (V = 4): what intra_fuse_forward launches when d_v and P are
//       multiples of 4 and the pointers 16-byte aligned
//   v4  v3 with the row staged in shared memory by phase 1 (phase 2 reads shared memory, not L1/L2): tests
//       whether v3's re-read of a and s costs anything
// v2–v4 are timed at several block sizes. Bandwidth: the bytes floor (read a and s once; write f — or a3 and
// s2 — plus a1, s1 and rstd) over the time. Also printed: the cuBLAS fp32 projection that follows, for scale.
// Tolerance: fp32 max-norm relative error max|g − c| / max|c| ≤ 1e-5 on every output.
// Measured on an H100 (80GB HBM3), N = 16384, ms (GB/s of the floor), best block size:
//                 v1            v2 (256)      v3 (256)      v4 (128/256)   projection (cuBLAS fp32)
//   final-like   0.437 (1155)  0.201 (2509)  0.186 (2716)  0.183 (2761)   1.53
//   concat       0.498 (1215)  0.242 (2498)  0.222 (2730)  0.216 (2809)   3.02
//   hymba        0.453 (1115)  0.203 (2491)  0.188 (2692)  0.184 (2743)   1.53
//   final (sep)  0.319 (1897)  0.240 (2524)  0.220 (2749)  0.216 (2809)   3.16
// Errors ≤ 3.4e-7 everywhere. v3 at 256 threads is what kernels/intra.cuh ships (INTRA_FUSE_BLOCK); v4's
// shared-memory staging is within 2% of it, so the re-read through L1 is nearly free.
//
// Build: nvcc -std=c++17 -O3 -arch=sm_90 -Xcompiler -Wall,-Wextra,-fopenmp -I. -I.deps/include
//          dev/cuda/fusion.cu -o build/dev/fusion -lcublas          (one line; or `make dev/cuda/fusion`)
// Run:   ./build/dev/fusion [version]     (no argument: every version)
#include <algorithm>              // std::sort, std::max
#include <cmath>                  // std::fabs, std::isfinite
#include <cstdio>                 // std::printf
#include <cstdlib>                // std::atoi
#include <string>                 // std::string
#include <vector>                 // std::vector
#include <cuda_runtime.h>         // cudaEvent_*, cudaMemset
#include "dev/cuda/common.cuh"   // median_ms, rel_err, poison: the playgrounds' shared harness
#include "kernels/common.cuh"     // cudaCheck, cudaCheckLast, DeviceBuffer, elementwise_grid, warp_sum
#include "kernels/intra.cuh"      // v1: intra_scale_kernel; v2, v3: IntraFuseArgs, intra_fuse_norm_join_launch
#include "kernels/matmul.cuh"     // gpu::matmul_forward, the projection timed for scale
#include "kernels/rmsnorm.cuh"    // v1: gpu::rmsnorm_forward
#include "model/fusion.h"         // FusionConfig, parse_fusion
#include "model/intra.h"          // the CPU reference: hl::intra_fuse_forward, IntraConfig, IntraParams, IntraActs

using hl::dev::median_ms;  // dev/cuda/common.cuh
using hl::dev::rel_err;
using hl::dev::poison;

using hl::gpu::DeviceBuffer;
using hl::gpu::IntraFuseArgs;
using hl::gpu::IntraScaleMode;

// ---------------------------------------------------------------------------------------------------------
// v1: the shipped sequence of launches before the fusion (2 norms, 2 scales, 1 join)
// ---------------------------------------------------------------------------------------------------------
namespace v1 {

// f (rows, Wf) = [s2; a3] (concat, Wf = Ws + Wa) or s2 + a3 (add/diff, Wf = Ws = Wa). Grid-stride, one
// thread per element of f.
__global__ void join_kernel(float* f, const float* s2, const float* a3, int rows, int Ws, int Wa, bool concat) {
    const int Wf = concat ? Ws + Wa : Ws;
    const size_t total = (size_t)rows * Wf;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i / Wf;
        const int col = (int)(i % Wf);
        if (concat) f[i] = col < Ws ? s2[r * Ws + col] : a3[r * Wa + col - Ws];
        else f[i] = s2[r * Ws + col] + a3[r * Wa + col];
    }
}

// x: the same arguments as the fused kernel; a3t, s2t: scratch (N, Wa), (N, Ws) for the joint recipes
void forward(const IntraFuseArgs<float>& x, float* a3t, float* s2t) {
    const int N = x.N, Wa = x.Ha * x.dv, Ws = x.Hs * x.P;
    const size_t na = (size_t)N * Wa, ns = (size_t)N * Ws;
    const float* a1 = x.a;
    const float* s1 = x.s;
    if (x.normed) {
        hl::gpu::rmsnorm_forward(x.a1, x.rstd_a, x.a, x.norm_a, N, x.Ha, x.dv, x.eps);
        hl::gpu::rmsnorm_forward(x.s1, x.rstd_s, x.s, x.norm_s, N, x.Hs, x.P, x.eps);
        a1 = x.a1;
        s1 = x.s1;
    }
    float* a3 = x.f ? a3t : x.a3;
    float* s2 = x.f ? s2t : x.s2;
    hl::gpu::intra_scale_kernel<<<hl::gpu::elementwise_grid(na, 256), 256>>>(a3, a1, x.scale_a, x.mode_a, x.sign, Wa,
                                                                             na);
    cudaCheckLast();
    hl::gpu::intra_scale_kernel<<<hl::gpu::elementwise_grid(ns, 256), 256>>>(s2, s1, x.scale_s, x.mode_s, 1.0f, Ws,
                                                                             ns);
    cudaCheckLast();
    if (x.f) {
        const size_t nf = (size_t)N * (x.concat ? Ws + Wa : Ws);
        join_kernel<<<hl::gpu::elementwise_grid(nf, 256), 256>>>(x.f, s2, a3, N, Ws, Wa, x.concat);
        cudaCheckLast();
    }
}

}  // namespace v1

// ---------------------------------------------------------------------------------------------------------
// v4: v3 with the row staged in shared memory (fp32, V = 4, norm=group only)
// ---------------------------------------------------------------------------------------------------------
namespace v4 {

// grid: one block per row; dynamic shared memory: the row's a (Wa) and s (Ws) then its Ha + Hs rstd. Phase 1
// (warp per head) copies each head's float4s into shared memory while summing squares; phase 2 reads them
// back from there instead of from global memory.
__global__ void kernel(IntraFuseArgs<float> x) {
    extern __shared__ float4 sh4[];
    const int n = blockIdx.x, tid = threadIdx.x, lane = tid % 32, warp = tid / 32, warps = blockDim.x / 32;
    const int Wa = x.Ha * x.dv, Ws = x.Hs * x.P;
    float* a_sh = reinterpret_cast<float*>(sh4);  // (Wa)
    float* s_sh = a_sh + Wa;                      // (Ws)
    float* r_sh = s_sh + Ws;                      // (Ha + Hs)
    for (int j = warp; j < x.Ha + x.Hs; j += warps) {
        const bool att = j < x.Ha;
        const int Cg = att ? x.dv : x.P;
        const float* g = att ? x.a + (size_t)n * Wa + (size_t)j * Cg : x.s + (size_t)n * Ws + (size_t)(j - x.Ha) * Cg;
        float* gs = att ? a_sh + j * Cg : s_sh + (j - x.Ha) * Cg;
        float ss = 0.0f;
        for (int c = lane * 4; c < Cg; c += 128) {
            const float4 v = *reinterpret_cast<const float4*>(g + c);
            *reinterpret_cast<float4*>(gs + c) = v;
            ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
        }
        ss = hl::gpu::warp_sum(ss);
        const float r = 1.0f / sqrtf(ss / Cg + x.eps);
        if (lane == 0) {
            r_sh[j] = r;
            if (att) x.rstd_a[(size_t)n * x.Ha + j] = r;
            else x.rstd_s[(size_t)n * x.Hs + (j - x.Ha)] = r;
        }
    }
    __syncthreads();
    // phase 2: the shipped kernel's branch helper, reading the staged row (its loads are plain float4 loads,
    // which work on shared memory as well)
    float* a1 = x.a1 + (size_t)n * Wa;
    float* s1 = x.s1 + (size_t)n * Ws;
    const float* ra = r_sh;
    const float* rs = r_sh + x.Ha;
    if (x.f && !x.concat) {
        float* f = x.f + (size_t)n * Ws;
        for (int col = tid * 4; col < Ws; col += blockDim.x * 4) {
            float ya[4], ys[4];
            hl::gpu::intra_fuse_branch<4>(ya, a1, a_sh, x.norm_a, ra, x.dv, x.scale_a, x.mode_a, x.sign, true, col);
            hl::gpu::intra_fuse_branch<4>(ys, s1, s_sh, x.norm_s, rs, x.P, x.scale_s, x.mode_s, 1.0f, true, col);
            for (int k = 0; k < 4; k++) ys[k] = ys[k] + ya[k];
            hl::gpu::intra_store<4>(f + col, ys);
        }
    } else {
        float* f = x.f ? x.f + (size_t)n * (Ws + Wa) : nullptr;
        float* s2 = x.f ? f : x.s2 + (size_t)n * Ws;
        float* a3 = x.f ? f + Ws : x.a3 + (size_t)n * Wa;
        for (int col = tid * 4; col < Ws + Wa; col += blockDim.x * 4) {
            float y[4];
            if (col < Ws) {
                hl::gpu::intra_fuse_branch<4>(y, s1, s_sh, x.norm_s, rs, x.P, x.scale_s, x.mode_s, 1.0f, true, col);
                hl::gpu::intra_store<4>(s2 + col, y);
            } else {
                hl::gpu::intra_fuse_branch<4>(y, a1, a_sh, x.norm_a, ra, x.dv, x.scale_a, x.mode_a, x.sign, true,
                                              col - Ws);
                hl::gpu::intra_store<4>(a3 + col - Ws, y);
            }
        }
    }
}

void forward(const IntraFuseArgs<float>& x, int block) {
    const size_t smem = sizeof(float) * ((size_t)x.Ha * x.dv + (size_t)x.Hs * x.P + x.Ha + x.Hs);
    kernel<<<x.N, block, smem>>>(x);
    cudaCheckLast();
}

}  // namespace v4

// ---------------------------------------------------------------------------------------------------------
// driver
// ---------------------------------------------------------------------------------------------------------

constexpr double TOL = 1e-5;

// One shape and recipe: CPU reference, then every version checked (and timed when `timed`).
void run_case(const char* name, const std::string& fusion, int N, int Ha, int dv, int Hs, int P, bool timed,
              int only) {
    hl::IntraConfig c;
    c.attn.n_heads = Ha;
    c.attn.d_v = dv;
    c.ssm.d_inner = Hs * P;
    c.ssm.headdim = P;
    c.fusion = hl::parse_fusion(fusion);
    const hl::FusionConfig& fc = c.fusion;
    const int Wa = c.attn_width(), Ws = c.ssm_width(), Wf = c.fused_width();
    const bool normed = fc.norm == hl::FusionNorm::group, joint = fc.out == hl::FusionOut::joint;
    const bool vec_a = fc.scale == hl::FusionScale::vector, scalar_a = fc.scale == hl::FusionScale::scalar;
    std::printf("%s: %s  N=%d  attention %d×%d, Mamba %d×%d\n", name, fusion.c_str(), N, Ha, dv, Hs, P);

    // inputs: the branches at different scales (the reason for the per-branch norms), weights around 1
    hl::Rng rng(11);
    std::vector<float> a((size_t)N * Wa), s((size_t)N * Ws), norm_a(Wa), norm_s(Ws), scale_a(vec_a ? Wa : 1),
        scale_s(Ws);
    rng.fill_normal(a.data(), a.size(), 3.0);
    rng.fill_normal(s.data(), s.size(), 0.2);
    for (auto* v : {&norm_a, &norm_s, &scale_a, &scale_s}) {
        rng.fill_normal(v->data(), v->size(), 0.3);
        for (float& e : *v) e += 1.0f;
    }

    // CPU reference: hl::intra_fuse_forward with d_model = 1 (a 1-wide projection of ones: negligible work)
    std::vector<float> a1((size_t)N * Wa), s1((size_t)N * Ws), a3((size_t)N * Wa), s2((size_t)N * Ws),
        f(joint ? (size_t)N * Wf : 0), rstd_a((size_t)N * Ha), rstd_s((size_t)N * Hs), out(N), tmp(N),
        ones(std::max(Wf, std::max(Wa, Ws)), 1.0f);
    {
        hl::IntraConfig c1 = c;
        c1.d_model = 1;
        hl::IntraParams<float> p;
        if (normed) p.norm_a = norm_a.data(), p.norm_s = norm_s.data();
        if (vec_a || scalar_a) p.scale_a = scale_a.data();
        if (vec_a) p.scale_s = scale_s.data();
        p.out_proj = p.out_a = p.out_s = ones.data();
        hl::IntraActs<float> h{};
        h.a1 = a1.data(), h.rstd_a = rstd_a.data(), h.a3 = a3.data(), h.s1 = s1.data(), h.rstd_s = rstd_s.data();
        h.s2 = s2.data(), h.f = f.data(), h.tmp_out = tmp.data();
        hl::intra_fuse_forward(out.data(), h, a.data(), s.data(), p, c1, N);
    }

    // device buffers and the fused kernel's arguments (the same as intra_fuse_forward builds)
    DeviceBuffer<float> a_(a.size()), s_(s.size()), na_(Wa), ns_(Ws), sa_(scale_a.size()), ss_(Ws);
    DeviceBuffer<float> a1_(a1.size()), s1_(s1.size()), a3_(a3.size()), s2_(s2.size()), f_(f.size()),
        ra_(rstd_a.size()), rs_(rstd_s.size()), a3t_(joint ? a3.size() : 0), s2t_(joint ? s2.size() : 0);
    a_.upload(a), s_.upload(s), na_.upload(norm_a), ns_.upload(norm_s), sa_.upload(scale_a), ss_.upload(scale_s);
    hl::gpu::GpuIntraActs<float> acts;
    acts.a1 = a1_.ptr, acts.rstd_a = ra_.ptr, acts.s1 = s1_.ptr, acts.rstd_s = rs_.ptr;
    acts.a3 = a3_.ptr, acts.s2 = s2_.ptr, acts.f = f_.ptr;
    hl::IntraParams<float> p;
    if (normed) p.norm_a = na_.ptr, p.norm_s = ns_.ptr;
    if (vec_a || scalar_a) p.scale_a = sa_.ptr;
    if (vec_a) p.scale_s = ss_.ptr;
    const IntraFuseArgs<float> x = hl::gpu::intra_fuse_args(acts, a_.ptr, s_.ptr, p, c, N);

    // bytes floor: read a, s; write f (joint) or a3, s2 (sep); with norm=group also a1, s1, rstd
    const double floor_bytes = 4.0 * N * ((Wa + Ws) + (joint ? Wf : Wa + Ws) + (normed ? Wa + Ws + Ha + Hs : 0));

    struct Version {
        int v;
        int block;  // 0: not applicable (v1)
        bool ok;    // applicable to this shape
    };
    const bool vec = dv % 4 == 0 && P % 4 == 0;
    std::vector<Version> versions = {{1, 0, true}};
    for (int b : {64, 128, 256, 512}) versions.push_back({2, b, true});
    for (int b : {64, 128, 256, 512}) versions.push_back({3, b, vec});
    for (int b : {64, 128, 256, 512}) versions.push_back({4, b, vec && normed});
    for (const Version& ver : versions) {
        if (!ver.ok || (only && ver.v != only) || (!timed && ver.block != 0 && ver.block != hl::gpu::INTRA_FUSE_BLOCK))
            continue;
        auto launch = [&] {
            if (ver.v == 1) v1::forward(x, a3t_.ptr, s2t_.ptr);
            else if (ver.v == 2) hl::gpu::intra_fuse_norm_join_launch<1>(x, ver.block);
            else if (ver.v == 3) hl::gpu::intra_fuse_norm_join_launch<4>(x, ver.block);
            else v4::forward(x, ver.block);
        };
        for (auto* d : {&a1_, &s1_, &a3_, &s2_, &f_, &ra_, &rs_}) poison(*d);
        launch();
        cudaCheck(cudaDeviceSynchronize());
        // every output the backward and the projection read
        double err = 0;
        std::string worst = "-";
        auto check = [&](const char* what, const DeviceBuffer<float>& d, const std::vector<float>& ref) {
            const double e = rel_err(d.download(), ref);
            if (!(e <= err)) err = e, worst = what;
        };
        if (joint) check("f", f_, f);
        else check("a3", a3_, a3), check("s2", s2_, s2);
        if (normed) check("a1", a1_, a1), check("s1", s1_, s1), check("rstd_a", ra_, rstd_a), check("rstd_s", rs_, rstd_s);
        char label[32];
        if (ver.block) std::snprintf(label, sizeof label, "v%d (block %3d)", ver.v, ver.block);
        else std::snprintf(label, sizeof label, "v%d (5 launches)", ver.v);
        if (timed) {
            const float ms = median_ms(launch);
            std::printf("  %-16s %8.4f ms %7.0f GB/s   max rel err %.1e (%s) %s\n", label, ms, floor_bytes / ms / 1e6, err,
                        worst.c_str(), err <= TOL ? "ok" : "MISMATCH");
        } else {
            std::printf("  %-16s max rel err %.1e (%s) %s\n", label, err, worst.c_str(), err <= TOL ? "ok" : "MISMATCH");
        }
    }
    if (timed && !only) {  // the projection(s) that follow, cuBLAS fp32 (no TF32), D = d_model = 1536
        const int D = 1536;
        DeviceBuffer<float> w((size_t)D * (joint ? Wf : Wa + Ws)), o((size_t)N * D), o2(joint ? 0 : (size_t)N * D);
        w.zero();
        const float ms = median_ms([&] {
            if (joint) hl::gpu::matmul_forward(o.ptr, f_.ptr, w.ptr, (const float*)nullptr, N, Wf, D);
            else {
                hl::gpu::matmul_forward(o.ptr, s2_.ptr, w.ptr, (const float*)nullptr, N, Ws, D);
                hl::gpu::matmul_forward(o2.ptr, a3_.ptr, w.ptr + (size_t)D * Ws, (const float*)nullptr, N, Wa, D);
                hl::gpu::accumulate(o.ptr, o2.ptr, (size_t)N * D);
            }
        }, 2, 5);
        std::printf("  (projection after it, cuBLAS fp32 D=%d: %.3f ms)\n", D, ms);
    }
}

int main(int argc, char** argv) {
    const int only = argc > 1 ? std::atoi(argv[1]) : 0;
    hl::gpu::cublas();  // the handle's creation kept out of the timings
    std::printf("floor = bytes that must move (read a, s; write f or a3+s2, a1, s1, rstd); tolerance %.0e\n", TOL);
    // correctness at odd shapes (untimed): N not a round number, heads of the two branches not aligned
    // (d_v 6 vs P 10; d_v 12 vs P 4), d_v not a multiple of 4 (v3/v4 skipped there), scale=scalar, norm=none
    const char* small[] = {"norm=group,scale=none,op=diff,value=sep,out=joint", "concat", "hymba", "final", "falcon",
                           "norm=group,scale=scalar,op=diff,value=sep,out=sep",
                           "norm=group,scale=vector,op=concat,value=sep,out=joint",
                           "norm=none,scale=vector,op=add,value=sep,out=joint"};
    for (const char* f : small) run_case("small", f, 37, 5, 6, 3, 10, false, only);
    for (const char* f : small) run_case("small", f, 37, 3, 12, 9, 4, false, only);
    // the 350M intra block's shape, timed
    const char* recipes[][2] = {{"final-like", "norm=group,scale=none,op=diff,value=sep,out=joint"},
                                {"concat", "concat"},
                                {"hymba", "hymba"},
                                {"final", "final"}};
    for (const auto& r : recipes) run_case(r[0], r[1], 16384, 12, 128, 12, 128, true, only);
    return 0;
}
