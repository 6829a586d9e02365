// intra.cuh — the intra-layer hybrid mixer on the GPU (DESIGN.md §1 block H, §P), mirroring model/intra.h:
// an attention branch and a Mamba-2 branch read the same normalised input and their outputs are fused along
// the five axes of model/fusion.h; forward and backward of every combination.
//
//   a  = attention branch (kernels/attention.cuh)                 (B, T, Wa = heads·d_v)
//   s  = Mamba-2 branch, y ⊙ SiLU(z) (kernels/mamba2.cuh)         (B, T, Ws = d_ssm)
//   norm=group : a1 = RMSNorm per head · norm_a, s1 = RMSNorm per head · norm_s   (kernels/rmsnorm.cuh)
//   scale/sign : a3 = ±α_a ⊙ a1, s2 = α_s ⊙ s1                     intra_scale_kernel
//   out=sep    : out = out_s · s2 + out_a · a3                      cuBLAS, then an add
//   out=joint  : out = out_proj · (s2 + a3)  or  out_proj · [s2; a3]    intra_join_kernel, cuBLAS
//   value=shared: the Mamba branch's x is the attention's V expanded to the query heads   intra_expand_v_kernel
// Backward: the scale gradients are column sums (colsum: deterministic, no atomics); value=shared sums the
// Mamba branch's dx over the query heads of each kv head (intra_reduce_dv_kernel) into the attention's dv.
//
// Parameters are model/intra.h's IntraParams (intra_params over a device buffer: the CPU's layout).
// Activations: GpuIntraActs, the CPU's IntraActs with the GPU branch acts, fp32 norm statistics, and a separate
// buffer per norm's input gradient (the CPU copies one dnorm scratch back instead).
#pragma once
#include <cstddef>                // size_t
#include <cuda_runtime.h>         // cudaStream_t, cudaMemsetAsync
#include "kernels/attention.cuh"  // GpuAttnActs, gpu_attn_acts, attn_branch_forward/backward
#include "kernels/common.cuh"     // cudaCheck, cudaCheckLast, elementwise_grid, colsum, add, accumulate
#include "kernels/mamba2.cuh"     // GpuMamba2Acts, gpu_mamba2_acts, mamba2_branch_forward/backward
#include "kernels/matmul.cuh"     // matmul_forward/backward for the output projections
#include "kernels/rmsnorm.cuh"    // rmsnorm_forward/backward for the per-head branch norms
#include "model/common.h"         // Arena, HL_CHECK
#include "model/fusion.h"         // FusionConfig and its axes
#include "model/intra.h"          // IntraConfig, IntraParams, intra_config_check, INTRA_NORM_EPS

namespace hl::gpu {

template <typename T>
struct GpuIntraActs {
    GpuAttnActs<T> attn;
    GpuMamba2Acts<T> ssm;
    T* x_shared = nullptr;    // (B,T,Ws)   value=shared: V expanded to the query heads
    T* a1 = nullptr;          // (B,T,Wa)   attention branch after its norm
    float* rstd_a = nullptr;  // (B,T,Ha)
    T* a3 = nullptr;          // (B,T,Wa)   after scale and sign: what is projected / fused
    T* s1 = nullptr;          // (B,T,Ws)   Mamba branch after its norm
    float* rstd_s = nullptr;  // (B,T,Hs)
    T* s2 = nullptr;          // (B,T,Ws)   after scale
    T* f = nullptr;           // (B,T,Wf)   out=joint: the fused features
    T* tmp_out = nullptr;     // (B,T,D)    out=sep: the attention projection before it is added
    // backward scratch
    T* df = nullptr;          // (B,T,Wf)
    T* da = nullptr;          // (B,T,Wa)   gradient of a3, then (in place) of a1
    T* ds = nullptr;          // (B,T,Ws)   gradient of s2, then (in place) of s1
    T* dnorm_a = nullptr;     // (B,T,Wa)   norm=group: gradient of the attention branch output a
    T* dnorm_s = nullptr;     // (B,T,Ws)   norm=group: gradient of the Mamba branch output s
    T* dx_shared = nullptr;   // (B,T,Ws)
    T* dv_extra = nullptr;    // (B,T,Hkv·d_v)
    T* dinp_ssm = nullptr;    // (B,T,D)
    T* scale_part = nullptr;  // (Wa)       scale=scalar: per-channel partial sums of the scalar's gradient
};

// Lays out GpuIntraActs in an arena (counting when it has no base), as intra_acts does on the CPU. fp32 for now.
inline GpuIntraActs<float> gpu_intra_acts(Arena<float>& a, const IntraConfig& c, int B, int T_) {
    intra_config_check(c);
    GpuIntraActs<float> x;
    const int N = B * T_, D = c.d_model, Wa = c.attn_width(), Ws = c.ssm_width(), Wf = c.fused_width();
    x.attn = gpu_attn_acts(a, c.attn, B, T_);
    x.ssm = gpu_mamba2_acts(a, c.ssm, B, T_);
    x.x_shared = a.take("x_shared", {N, Ws});
    x.a1 = a.take("a1", {N, Wa});
    x.rstd_a = a.take("rstd_a", {N, c.attn.n_heads});
    x.a3 = a.take("a3", {N, Wa});
    x.s1 = a.take("s1", {N, Ws});
    x.rstd_s = a.take("rstd_s", {N, c.ssm.nheads()});
    x.s2 = a.take("s2", {N, Ws});
    x.f = a.take("f", {N, Wf});
    x.tmp_out = a.take("tmp_out", {N, D});
    x.df = a.take("df", {N, Wf});
    x.da = a.take("da", {N, Wa});
    x.ds = a.take("ds", {N, Ws});
    x.dnorm_a = a.take("dnorm_a", {N, Wa});
    x.dnorm_s = a.take("dnorm_s", {N, Ws});
    x.dx_shared = a.take("dx_shared", {N, Ws});
    x.dv_extra = a.take("dv_extra", {N, c.attn.n_kv_heads * c.attn.d_v});
    x.dinp_ssm = a.take("dinp_ssm", {N, D});
    x.scale_part = a.take("scale_part", {Wa});
    return x;
}

// ---------------------------------------------------------------------------------------------------------
// Elementwise kernels: grid-stride, one thread per element of a (rows, width) view, consecutive threads on
// consecutive columns (coalesced). Memory-bound and small next to the projections.
// ---------------------------------------------------------------------------------------------------------

// How a branch is scaled: not at all, by a per-channel vector, or by one scalar.
enum class IntraScaleMode : int { none = 0, vector = 1, scalar = 2 };

// out (n = rows·W) = sign · α ⊙ inp, α = scale[col] (vector), scale[0] (scalar) or 1 (none). In place allowed
// (the backward multiplies the gradients of a3 / s2 by the same factors to get those of a1 / s1).
template <typename T>
__global__ void intra_scale_kernel(T* out, const T* inp, const T* scale, IntraScaleMode mode, float sign, int W,
                                   size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float alpha = mode == IntraScaleMode::vector ? float(scale[i % W])
                            : mode == IntraScaleMode::scalar ? float(scale[0])
                                                             : 1.0f;
        out[i] = T(sign * alpha * float(inp[i]));
    }
}

// out=joint: f (rows, Wf) = [s2; a3] (concat, Wf = Ws + Wa) or s2 + a3 (add/diff, Wf = Ws = Wa).
template <typename T>
__global__ void intra_join_kernel(T* f, const T* s2, const T* a3, int rows, int Ws, int Wa, bool concat) {
    const int Wf = concat ? Ws + Wa : Ws;
    const size_t total = (size_t)rows * Wf;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i / Wf;
        const int col = (int)(i % Wf);
        if (concat) f[i] = col < Ws ? s2[r * Ws + col] : a3[r * Wa + col - Ws];
        else f[i] = T(float(s2[r * Ws + col]) + float(a3[r * Wa + col]));
    }
}

// Backward of the join: ds (rows, Ws) = df[:, :Ws]; da (rows, Wa) = df[:, Ws:] (concat) or df (add/diff: both
// sides see the same gradient; the sign of diff is applied with the scales).
template <typename T>
__global__ void intra_split_grad_kernel(T* ds, T* da, const T* df, int rows, int Ws, int Wa, bool concat) {
    const int Wf = concat ? Ws + Wa : Ws, W = Ws + Wa;
    const size_t total = (size_t)rows * W;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i / W;
        const int col = (int)(i % W);
        if (col < Ws) ds[r * Ws + col] = df[r * Wf + col];
        else da[r * Wa + col - Ws] = df[r * Wf + (concat ? col : col - Ws)];
    }
}

// value=shared, forward: x_shared (rows, Ws = Ha·d_v) holds in query head h's slot the V (rows, Hkv, d_v) of
// its kv head h / (Ha / Hkv).
template <typename T>
__global__ void intra_expand_v_kernel(T* x_shared, const T* v, int rows, int Ha, int Hkv, int dv) {
    const int W = Ha * dv, group = Ha / Hkv;
    const size_t total = (size_t)rows * W;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i / W;
        const int col = (int)(i % W), h = col / dv, e = col % dv;
        x_shared[i] = v[(r * Hkv + h / group) * dv + e];
    }
}

// value=shared, backward: dv_extra (rows, Hkv, d_v) = Σ over the query heads h of kv head g of dx_shared[:, h
// slot] (fixed order h = g·group, …: deterministic). One thread per output element.
template <typename T>
__global__ void intra_reduce_dv_kernel(T* dv_extra, const T* dx_shared, int rows, int Ha, int Hkv, int dv) {
    const int W = Hkv * dv, group = Ha / Hkv;
    const size_t total = (size_t)rows * W;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i / W;
        const int col = (int)(i % W), g = col / dv, e = col % dv;
        float acc = 0.0f;
        for (int h = g * group; h < (g + 1) * group; h++) acc += float(dx_shared[r * ((size_t)Ha * dv) + h * dv + e]);
        dv_extra[i] = T(acc);
    }
}

// f(n, c) = sign · dout[n, c] · x[n, c]: the summand of a scale vector's gradient (colsum over rows n).
template <typename T>
struct IntraScaleGradTerm {
    const T* dout;
    const T* x;
    int W;
    float sign;
    __device__ float operator()(int n, int c) const {
        const size_t i = (size_t)n * W + c;
        return sign * float(dout[i]) * float(x[i]);
    }
};

// f(n, 0) = part[n]: sums a vector of partial sums into one scalar (colsum with one column).
template <typename T>
struct IntraVectorTerm {
    const T* part;
    __device__ float operator()(int n, int) const { return float(part[n]); }
};

// ---------------------------------------------------------------------------------------------------------
// Fusion and mixer
// ---------------------------------------------------------------------------------------------------------

inline IntraScaleMode intra_scale_mode_a(const FusionConfig& f) {
    return f.scale == FusionScale::vector ? IntraScaleMode::vector
           : f.scale == FusionScale::scalar ? IntraScaleMode::scalar
                                            : IntraScaleMode::none;
}
inline IntraScaleMode intra_scale_mode_s(const FusionConfig& f) {  // scale=scalar scales the attention side only
    return f.scale == FusionScale::vector ? IntraScaleMode::vector : IntraScaleMode::none;
}

// out (N, D) = Fuse(a (N, Wa), s (N, Ws)): per-head norms, scales, the sign of op=diff, then the output
// projection(s). Fills acts.a1, rstd_a, a3, s1, rstd_s, s2 and acts.f (out=joint) or acts.tmp_out (out=sep).
template <typename T>
void intra_fuse_forward(T* out, GpuIntraActs<T>& acts, const T* a, const T* s, const IntraParams<T>& p,
                        const IntraConfig& c, int N, cudaStream_t stream = 0) {
    const FusionConfig& f = c.fusion;
    const int D = c.d_model, Wa = c.attn_width(), Ws = c.ssm_width();
    const int Ha = c.attn.n_heads, dv = c.attn.d_v, Hs = c.ssm.nheads(), P = c.ssm.headdim;
    const size_t na = (size_t)N * Wa, ns = (size_t)N * Ws;

    // per-branch normalisation (per head)
    const T* a1 = a;
    const T* s1 = s;
    if (f.norm == FusionNorm::group) {
        gpu::rmsnorm_forward(acts.a1, acts.rstd_a, a, p.norm_a, N, Ha, dv, float(INTRA_NORM_EPS), stream);
        gpu::rmsnorm_forward(acts.s1, acts.rstd_s, s, p.norm_s, N, Hs, P, float(INTRA_NORM_EPS), stream);
        a1 = acts.a1;
        s1 = acts.s1;
    }
    // scale, and the sign of op=diff folded into the attention side
    const float sign = f.op == FusionOp::diff ? -1.0f : 1.0f;
    intra_scale_kernel<<<elementwise_grid(na, 256), 256, 0, stream>>>(acts.a3, a1, p.scale_a, intra_scale_mode_a(f),
                                                                      sign, Wa, na);
    cudaCheckLast();
    intra_scale_kernel<<<elementwise_grid(ns, 256), 256, 0, stream>>>(acts.s2, s1, p.scale_s, intra_scale_mode_s(f),
                                                                      1.0f, Ws, ns);
    cudaCheckLast();

    if (f.out == FusionOut::sep) {  // out_s · s2 + out_a · a3
        gpu::matmul_forward(out, acts.s2, p.out_s, (const T*)nullptr, N, Ws, D, stream);
        gpu::matmul_forward(acts.tmp_out, acts.a3, p.out_a, (const T*)nullptr, N, Wa, D, stream);
        gpu::accumulate(out, acts.tmp_out, (size_t)N * D, stream);
    } else {  // out_proj · (s2 + a3)  or  out_proj · [s2; a3]
        const bool concat = f.op == FusionOp::concat;
        const int Wf = c.fused_width();
        intra_join_kernel<<<elementwise_grid((size_t)N * Wf, 256), 256, 0, stream>>>(acts.f, acts.s2, acts.a3, N, Ws,
                                                                                     Wa, concat);
        cudaCheckLast();
        gpu::matmul_forward(out, acts.f, p.out_proj, (const T*)nullptr, N, Wf, D, stream);
    }
}

// out (B,T,D) = Fuse(attention branch, Mamba branch) of inp (B,T,D)
template <typename T>
void intra_mixer_forward(T* out, GpuIntraActs<T>& acts, const T* inp, const IntraParams<T>& p, const IntraConfig& c,
                         int B, int T_, cudaStream_t stream = 0) {
    const int N = B * T_;
    // the two branches; with shared values the Mamba branch reads V, so attention runs first
    gpu::attn_branch_forward(acts.attn, inp, p.attn, c.attn, B, T_, stream);
    const T* x_shared = nullptr;
    if (c.fusion.value == FusionValue::shared) {
        const size_t n = (size_t)N * c.ssm_width();
        intra_expand_v_kernel<<<elementwise_grid(n, 256), 256, 0, stream>>>(acts.x_shared, acts.attn.v, N,
                                                                            c.attn.n_heads, c.attn.n_kv_heads,
                                                                            c.attn.d_v);
        cudaCheckLast();
        x_shared = acts.x_shared;
    }
    gpu::mamba2_branch_forward(acts.ssm, inp, x_shared, p.ssm, c.ssm, B, T_, stream);
    gpu::intra_fuse_forward(out, acts, acts.attn.y, acts.ssm.g, p, c, N, stream);
}

// dinp (B,T,D) written; dp.* accumulate.
template <typename T>
void intra_mixer_backward(T* dinp, IntraParams<T>& dp, const T* dout, GpuIntraActs<T>& acts, const T* inp,
                          const IntraParams<T>& p, const IntraConfig& c, int B, int T_, cudaStream_t stream = 0) {
    const FusionConfig& f = c.fusion;
    const AttnConfig& ac = c.attn;
    const int N = B * T_, D = c.d_model, Wa = c.attn_width(), Ws = c.ssm_width();
    const int Ha = ac.n_heads, Hkv = ac.n_kv_heads, dv = ac.d_v, Hs = c.ssm.nheads(), P = c.ssm.headdim;
    const size_t na = (size_t)N * Wa, ns = (size_t)N * Ws;
    const bool normed = f.norm == FusionNorm::group;
    const T* a1 = normed ? acts.a1 : acts.attn.y;
    const T* s1 = normed ? acts.s1 : acts.ssm.g;

    // output projection(s): gradients of s2 and a3 into ds and da
    if (f.out == FusionOut::sep) {
        gpu::matmul_backward(acts.ds, dp.out_s, (T*)nullptr, dout, acts.s2, p.out_s, N, Ws, D, stream);
        gpu::matmul_backward(acts.da, dp.out_a, (T*)nullptr, dout, acts.a3, p.out_a, N, Wa, D, stream);
    } else {
        const bool concat = f.op == FusionOp::concat;
        gpu::matmul_backward(acts.df, dp.out_proj, (T*)nullptr, dout, acts.f, p.out_proj, N, c.fused_width(), D,
                             stream);
        intra_split_grad_kernel<<<elementwise_grid(na + ns, 256), 256, 0, stream>>>(acts.ds, acts.da, acts.df, N, Ws,
                                                                                    Wa, concat);
        cudaCheckLast();
    }

    // scale and sign: a3 = sign·α_a ⊙ a1, s2 = α_s ⊙ s1. The scale gradients (column sums over rows) are taken
    // before the in-place update below turns da, ds into the gradients of a1, s1.
    const float sign = f.op == FusionOp::diff ? -1.0f : 1.0f;
    if (f.scale == FusionScale::vector) {
        gpu::colsum(dp.scale_a, IntraScaleGradTerm<T>{acts.da, a1, Wa, sign}, N, Wa, stream);
        gpu::colsum(dp.scale_s, IntraScaleGradTerm<T>{acts.ds, s1, Ws, 1.0f}, N, Ws, stream);
    } else if (f.scale == FusionScale::scalar) {  // per channel first, then the Wa partials into the scalar
        cudaCheck(cudaMemsetAsync(acts.scale_part, 0, sizeof(T) * Wa, stream));
        gpu::colsum(acts.scale_part, IntraScaleGradTerm<T>{acts.da, a1, Wa, sign}, N, Wa, stream);
        gpu::colsum(dp.scale_a, IntraVectorTerm<T>{acts.scale_part}, Wa, 1, stream);
    }
    intra_scale_kernel<<<elementwise_grid(na, 256), 256, 0, stream>>>(acts.da, acts.da, p.scale_a,
                                                                      intra_scale_mode_a(f), sign, Wa, na);
    cudaCheckLast();
    if (f.scale == FusionScale::vector) {
        intra_scale_kernel<<<elementwise_grid(ns, 256), 256, 0, stream>>>(acts.ds, acts.ds, p.scale_s,
                                                                          IntraScaleMode::vector, 1.0f, Ws, ns);
        cudaCheckLast();
    }

    // per-head norms: the gradients of the branch outputs a, s
    const T* da = acts.da;
    const T* ds = acts.ds;
    if (normed) {
        gpu::rmsnorm_backward(acts.dnorm_a, dp.norm_a, acts.da, acts.attn.y, p.norm_a, acts.rstd_a, N, Ha, dv, stream);
        gpu::rmsnorm_backward(acts.dnorm_s, dp.norm_s, acts.ds, acts.ssm.g, p.norm_s, acts.rstd_s, N, Hs, P, stream);
        da = acts.dnorm_a;
        ds = acts.dnorm_s;
    }

    // branches: Mamba first, since with shared values it hands a gradient to the attention's V
    const bool shared = f.value == FusionValue::shared;
    gpu::mamba2_branch_backward(acts.dinp_ssm, shared ? acts.dx_shared : (T*)nullptr, dp.ssm, ds, acts.ssm, inp,
                                shared ? acts.x_shared : (const T*)nullptr, p.ssm, c.ssm, B, T_, stream);
    const T* dv_extra = nullptr;
    if (shared) {
        const size_t n = (size_t)N * Hkv * dv;
        intra_reduce_dv_kernel<<<elementwise_grid(n, 256), 256, 0, stream>>>(acts.dv_extra, acts.dx_shared, N, Ha, Hkv,
                                                                             dv);
        cudaCheckLast();
        dv_extra = acts.dv_extra;
    }
    gpu::attn_branch_backward(dinp, dp.attn, da, dv_extra, acts.attn, inp, p.attn, ac, B, T_, stream);
    gpu::accumulate(dinp, acts.dinp_ssm, (size_t)N * D, stream);
}

}  // namespace hl::gpu
