// intra.cuh — the intra-layer hybrid mixer on the GPU (DESIGN.md §1 block H, §P), mirroring model/intra.h:
// an attention branch and a Mamba-2 branch read the same normalised input and their outputs are fused along
// the five axes of model/fusion.h; forward and backward of every combination.
//
//   a  = attention branch (kernels/attention.cuh)                 (B, T, Wa = heads·d_v)
//   s  = Mamba-2 branch, y ⊙ SiLU(z) (kernels/mamba2.cuh)         (B, T, Ws = d_ssm)
//   norm=group : a1 = RMSNorm per head · norm_a, s1 = RMSNorm per head · norm_s  ┐ one pass:
//   scale/sign : a3 = ±α_a ⊙ a1, s2 = α_s ⊙ s1                                    ├ intra_fuse_norm_join_kernel
//   join       : f = s2 + a3 or [s2; a3] (out=joint)                              ┘
//   out=sep    : out = out_s · s2 + out_a · a3                      cuBLAS, then an add
//   out=joint  : out = out_proj · f                                 cuBLAS
//   value=shared: the Mamba branch's x is the attention's V expanded to the query heads   intra_expand_v_kernel
// Backward: the scale gradients are column sums (colsum: deterministic, no atomics); value=shared sums the
// Mamba branch's dx over the query heads of each kv head (intra_reduce_dv_kernel) into the attention's dv.
//
// Parameters are model/intra.h's IntraParams (intra_params over a device buffer: the CPU's layout).
// Activations: GpuIntraActs, the CPU's IntraActs with the GPU branch acts, fp32 norm statistics, and a separate
// buffer per norm's input gradient (the CPU copies one dnorm scratch back instead).
#pragma once
#include <cstddef>                // size_t
#include <cstdint>                // uintptr_t (alignment test of the float4 path)
#include <type_traits>            // std::is_same_v
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
    T* a3 = nullptr;          // (B,T,Wa)   out=sep: after scale and sign, what is projected
    T* s1 = nullptr;          // (B,T,Ws)   Mamba branch after its norm
    float* rstd_s = nullptr;  // (B,T,Hs)
    T* s2 = nullptr;          // (B,T,Ws)   out=sep: after scale (out=joint goes straight to f)
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

// Lays out GpuIntraActs in an arena (counting when it has no base), as intra_acts does on the CPU (under a Bf16Scope,
// the attention branch's q, k, v held only in bf16 take half the floats: gpu_attn_acts).
inline GpuIntraActs<float> gpu_intra_acts(Arena<float>& a, const IntraConfig& c, int B, int T_) {
    intra_config_check(c);
    GpuIntraActs<float> x;
    const int N = B * T_, D = c.d_model, Wa = c.attn_width(), Ws = c.ssm_width(), Wf = c.fused_width();
    // (v in fp32 with value sharing: the Mamba branch's x is V expanded)
    x.attn = gpu_attn_acts(a, c.attn, B, T_, /*mixer=*/false, /*v_fp32=*/c.fusion.value == FusionValue::shared);
    x.ssm = gpu_mamba2_acts(a, c.ssm, B, T_, /*mixer=*/false);
    x.x_shared = a.take_scratch("x_shared", {N, Ws});
    x.a1 = a.take("a1", {N, Wa});
    x.rstd_a = a.take("rstd_a", {N, c.attn.n_heads});
    x.a3 = a.take("a3", {N, Wa});
    x.s1 = a.take("s1", {N, Ws});
    x.rstd_s = a.take("rstd_s", {N, c.ssm.nheads()});
    x.s2 = a.take("s2", {N, Ws});
    x.f = a.take("f", {N, Wf});
    x.tmp_out = a.take_scratch("tmp_out", {N, D});
    x.df = a.take_scratch("df", {N, Wf});
    x.da = a.take_scratch("da", {N, Wa});
    x.ds = a.take_scratch("ds", {N, Ws});
    x.dnorm_a = a.take_scratch("dnorm_a", {N, Wa});
    x.dnorm_s = a.take_scratch("dnorm_s", {N, Ws});
    x.dx_shared = a.take_scratch("dx_shared", {N, Ws});
    x.dv_extra = a.take_scratch("dv_extra", {N, c.attn.n_kv_heads * c.attn.d_v});
    x.dinp_ssm = a.take_scratch("dinp_ssm", {N, D});
    x.scale_part = a.take_scratch("scale_part", {Wa});
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

// ---------------------------------------------------------------------------------------------------------
// Everything before the projection(s) in one pass: per-head norms, scales, the sign of op=diff and the join.
// Done as five launches (two norms, two scales, the join) it moves a and s through memory about 11 times the
// row width; fused, a and s are read once and only what the projection and the backward need is written
// (a1, s1, rstd with norm=group; f for out=joint, a3 and s2 for out=sep). Measured in dev/cuda/fusion.cu on an
// H100 at the 350M intra shape (N = 16384, 12 × 128 per branch), fp32: op=diff/add with out=joint 0.437 ms →
// 0.187 ms (2.7 TB/s of the bytes floor), concat 0.498 → 0.222 ms, out=sep 0.319 → 0.220 ms.
// ---------------------------------------------------------------------------------------------------------

// What intra_fuse_norm_join_kernel reads and writes. Null outputs are not produced.
template <typename T>
struct IntraFuseArgs {
    T* a1 = nullptr;                  // (N, Wa)  norm=group: a normalised per head (kept for the backward)
    float* rstd_a = nullptr;          // (N, Ha)  norm=group
    T* s1 = nullptr;                  // (N, Ws)  norm=group
    float* rstd_s = nullptr;          // (N, Hs)  norm=group
    T* a3 = nullptr;                  // (N, Wa)  out=sep: ±α_a ⊙ a1
    T* s2 = nullptr;                  // (N, Ws)  out=sep: α_s ⊙ s1
    T* f = nullptr;                   // (N, Wf)  out=joint: s2 + a3 (add/diff) or [s2; a3] (concat)
    const T* a = nullptr;             // (N, Wa)  attention branch output, Wa = Ha·dv
    const T* s = nullptr;             // (N, Ws)  Mamba branch output, Ws = Hs·P
    const T* norm_a = nullptr;        // (Wa)     norm=group
    const T* norm_s = nullptr;        // (Ws)     norm=group
    const T* scale_a = nullptr;       // (Wa) or (1)
    const T* scale_s = nullptr;       // (Ws)
    IntraScaleMode mode_a = IntraScaleMode::none, mode_s = IntraScaleMode::none;
    float sign = 1.0f;                // −1 on the attention side for op=diff
    float eps = 1e-5f;
    int N = 0, Ha = 0, dv = 0, Hs = 0, P = 0;
    bool normed = false;              // norm=group
    bool concat = false;              // with f: [s2; a3] rather than s2 + a3
};

// V consecutive elements to / from floats: one 16-byte access for V = 4 floats, else V scalar ones.
template <int V, typename T>
__device__ __forceinline__ void intra_load(float (&x)[V], const T* p) {
    if constexpr (V == 4 && std::is_same_v<T, float>) {
        const float4 q = *reinterpret_cast<const float4*>(p);
        x[0] = q.x, x[1] = q.y, x[2] = q.z, x[3] = q.w;
    } else {
#pragma unroll
        for (int k = 0; k < V; k++) x[k] = float(p[k]);
    }
}
template <int V, typename T>
__device__ __forceinline__ void intra_store(T* p, const float (&x)[V]) {
    if constexpr (V == 4 && std::is_same_v<T, float>) {
        *reinterpret_cast<float4*>(p) = make_float4(x[0], x[1], x[2], x[3]);
    } else {
#pragma unroll
        for (int k = 0; k < V; k++) p[k] = T(x[k]);
    }
}

// One branch at columns col … col+V−1 of one row, in the CPU's order of operations: x1 = x · rstd[head] · w
// (normed; x1 is stored for the backward), then y = (sign · α) · x1.
template <int V, typename T>
__device__ __forceinline__ void intra_fuse_branch(float (&y)[V], T* x1, const T* x, const T* norm_w, const float* rstd,
                                                  int Cg, const T* scale, IntraScaleMode mode, float sign, bool normed,
                                                  int col) {
    intra_load<V>(y, x + col);
    if (normed) {
        float w[V];
        intra_load<V>(w, norm_w + col);
        const float r = rstd[col / Cg];  // V divides Cg: the V columns share one head
#pragma unroll
        for (int k = 0; k < V; k++) y[k] = y[k] * r * w[k];
        intra_store<V>(x1 + col, y);
    }
    if (mode == IntraScaleMode::vector) {
        float al[V];
        intra_load<V>(al, scale + col);
#pragma unroll
        for (int k = 0; k < V; k++) y[k] = sign * al[k] * y[k];
    } else {
        const float al = sign * (mode == IntraScaleMode::scalar ? float(scale[0]) : 1.0f);
#pragma unroll
        for (int k = 0; k < V; k++) y[k] = al * y[k];
    }
}

// grid: one block per row n (blockIdx.x); block: INTRA_FUSE_BLOCK threads; dynamic shared memory: the row's
// Ha + Hs rstd (norm=group). V = elements per access (4: float4; needs dv, P multiples of 4, 16-byte pointers).
// Phase 1 (norm=group): warp w takes heads w, w + warps, … of the row's Ha + Hs heads (attention heads first),
//   lanes striding over the head's channels, one shuffle reduction per head: rstd into shared memory and rstd_a
//   / rstd_s. A row's heads are short (128) and many (24), so a warp per head keeps every lane busy without a
//   block reduction.
// Phase 2: thread t takes V-column slices t, t + block, … of the output row: add/diff walk the Ws (= Wa)
//   columns of f, each reading both branches there; concat and sep walk the Ws + Wa columns of [s; a], each
//   reading one. The re-read of a and s in phase 2 is served by L1/L2 (the block just read the same 12 KB), so
//   DRAM sees one read of a, s and one write of each output: the bytes floor.
// A block per row, not a warp per row: 350M rows are 2 × 1536 floats, too many registers to hold in one warp,
// and a block per row still gives 16384 blocks, many waves on 132 SMs. 256 threads measured fastest (64: +33%,
// 128: +16%, 512: +13% time); float4 ~8% faster than scalar; staging the row in shared memory instead of
// re-reading it through L1 gained < 2% (dev/cuda/fusion.cu v4), so it is not done.
constexpr int INTRA_FUSE_BLOCK = 256;

template <int V, typename T>
__global__ void intra_fuse_norm_join_kernel(IntraFuseArgs<T> x) {
    extern __shared__ float rstd_sh[];  // (Ha + Hs)  this row's rstd, attention heads first
    const int n = blockIdx.x, tid = threadIdx.x, lane = tid % 32, warp = tid / 32, warps = blockDim.x / 32;
    const int Wa = x.Ha * x.dv, Ws = x.Hs * x.P;
    const T* a = x.a + (size_t)n * Wa;  // (Wa)
    const T* s = x.s + (size_t)n * Ws;  // (Ws)
    if (x.normed) {
        for (int j = warp; j < x.Ha + x.Hs; j += warps) {  // warp-uniform: the shuffles see all 32 lanes
            const bool att = j < x.Ha;
            const int Cg = att ? x.dv : x.P;
            const T* g = att ? a + (size_t)j * Cg : s + (size_t)(j - x.Ha) * Cg;  // (Cg)
            float ss = 0.0f;
            for (int c = lane * V; c < Cg; c += 32 * V) {
                float v[V];
                intra_load<V>(v, g + c);
#pragma unroll
                for (int k = 0; k < V; k++) ss += v[k] * v[k];
            }
            ss = warp_sum(ss);
            const float r = 1.0f / sqrtf(ss / Cg + x.eps);  // as the CPU: 1/sqrt, not rsqrtf
            if (lane == 0) {
                rstd_sh[j] = r;
                if (att) x.rstd_a[(size_t)n * x.Ha + j] = r;
                else x.rstd_s[(size_t)n * x.Hs + (j - x.Ha)] = r;
            }
        }
        __syncthreads();
    }
    const float* ra = rstd_sh;         // (Ha)
    const float* rs = rstd_sh + x.Ha;  // (Hs)
    T* a1 = x.normed ? x.a1 + (size_t)n * Wa : nullptr;  // (Wa)
    T* s1 = x.normed ? x.s1 + (size_t)n * Ws : nullptr;  // (Ws)
    if (x.f && !x.concat) {  // add / diff: f = s2 + a3 (Wa = Ws)
        T* f = x.f + (size_t)n * Ws;  // (Ws)
        for (int col = tid * V; col < Ws; col += blockDim.x * V) {
            float ya[V], ys[V];
            intra_fuse_branch<V>(ya, a1, a, x.norm_a, ra, x.dv, x.scale_a, x.mode_a, x.sign, x.normed, col);
            intra_fuse_branch<V>(ys, s1, s, x.norm_s, rs, x.P, x.scale_s, x.mode_s, 1.0f, x.normed, col);
#pragma unroll
            for (int k = 0; k < V; k++) ys[k] = ys[k] + ya[k];
            intra_store<V>(f + col, ys);
        }
    } else {  // concat ([s2; a3] into f) or sep (s2 and a3 apart): each column belongs to one branch
        T* f = x.f ? x.f + (size_t)n * (Ws + Wa) : nullptr;  // (Ws + Wa)
        T* s2 = x.f ? f : x.s2 + (size_t)n * Ws;              // (Ws)
        T* a3 = x.f ? f + Ws : x.a3 + (size_t)n * Wa;         // (Wa)
        for (int col = tid * V; col < Ws + Wa; col += blockDim.x * V) {
            float y[V];
            if (col < Ws) {  // V divides P, so a slice never straddles the two branches
                intra_fuse_branch<V>(y, s1, s, x.norm_s, rs, x.P, x.scale_s, x.mode_s, 1.0f, x.normed, col);
                intra_store<V>(s2 + col, y);
            } else {
                intra_fuse_branch<V>(y, a1, a, x.norm_a, ra, x.dv, x.scale_a, x.mode_a, x.sign, x.normed, col - Ws);
                intra_store<V>(a3 + col - Ws, y);
            }
        }
    }
}

// One launch of the fused kernel with V elements per access and `block` threads per row (a multiple of 32).
template <int V, typename T>
void intra_fuse_norm_join_launch(const IntraFuseArgs<T>& x, int block = INTRA_FUSE_BLOCK, cudaStream_t stream = 0) {
    HL_CHECK(x.dv % V == 0 && x.P % V == 0 && block % 32 == 0, "intra fuse: V=", V, " must divide d_v=", x.dv,
             " and P=", x.P, ", block=", block, " be a multiple of 32");
    if (x.N == 0) return;
    const size_t smem = x.normed ? sizeof(float) * (x.Ha + x.Hs) : 0;
    intra_fuse_norm_join_kernel<V><<<x.N, block, smem, stream>>>(x);
    cudaCheckLast();
}

// The fused kernel's arguments for intra_fuse_forward: a, s (N rows) into acts' a1, rstd_a, s1, rstd_s
// (norm=group) and f (out=joint) or a3, s2 (out=sep).
template <typename T>
IntraFuseArgs<T> intra_fuse_args(GpuIntraActs<T>& acts, const T* a, const T* s, const IntraParams<T>& p,
                                 const IntraConfig& c, int N) {
    const FusionConfig& f = c.fusion;
    IntraFuseArgs<T> x;
    x.normed = f.norm == FusionNorm::group;
    if (x.normed) {
        x.a1 = acts.a1, x.rstd_a = acts.rstd_a, x.s1 = acts.s1, x.rstd_s = acts.rstd_s;
        x.norm_a = p.norm_a, x.norm_s = p.norm_s;
    }
    if (f.out == FusionOut::sep) x.a3 = acts.a3, x.s2 = acts.s2;
    else x.f = acts.f, x.concat = f.op == FusionOp::concat;
    x.a = a, x.s = s;
    x.scale_a = p.scale_a, x.scale_s = p.scale_s;
    x.mode_a = intra_scale_mode_a(f), x.mode_s = intra_scale_mode_s(f);
    x.sign = f.op == FusionOp::diff ? -1.0f : 1.0f;
    x.eps = float(INTRA_NORM_EPS);
    x.N = N, x.Ha = c.attn.n_heads, x.dv = c.attn.d_v, x.Hs = c.ssm.nheads(), x.P = c.ssm.headdim;
    return x;
}

// Launches the fused kernel: float4 accesses (V = 4) when T is float, d_v and P are multiples of 4 and every
// vector-read pointer is 16-byte aligned (arena views need not be), else V = 1.
template <typename T>
void intra_fuse_norm_join(const IntraFuseArgs<T>& x, cudaStream_t stream = 0) {
    auto al16 = [](const void* q) { return q == nullptr || (uintptr_t)q % 16 == 0; };
    const bool vec4 = std::is_same_v<T, float> && x.dv % 4 == 0 && x.P % 4 == 0 && al16(x.a1) && al16(x.s1) &&
                      al16(x.a3) && al16(x.s2) && al16(x.f) && al16(x.a) && al16(x.s) && al16(x.norm_a) &&
                      al16(x.norm_s) && (x.mode_a != IntraScaleMode::vector || al16(x.scale_a)) &&
                      (x.mode_s != IntraScaleMode::vector || al16(x.scale_s));
    if (vec4) intra_fuse_norm_join_launch<4>(x, INTRA_FUSE_BLOCK, stream);
    else intra_fuse_norm_join_launch<1>(x, INTRA_FUSE_BLOCK, stream);
}

// out (N, D) = Fuse(a (N, Wa), s (N, Ws)): per-head norms, scales, the sign of op=diff, then the output
// projection(s). Fills acts.a1, rstd_a, s1, rstd_s (norm=group) and acts.f (out=joint) or acts.a3, s2, tmp_out
// (out=sep). out16 (bf16 runs; or null): out's bf16 view, where one output projection (out=joint) writes it instead;
// returned then, else null (out in fp32: out=sep sums two products into it).
template <typename T>
const bf16* intra_fuse_forward(T* out, GpuIntraActs<T>& acts, const T* a, const T* s, const IntraParams<T>& p,
                               const IntraConfig& c, int N, cudaStream_t stream = 0, bf16* out16 = nullptr) {
    const FusionConfig& f = c.fusion;
    const int D = c.d_model, Wa = c.attn_width(), Ws = c.ssm_width();

    // per-head norms, scales, the sign of op=diff and (out=joint) the join: one pass over a and s
    intra_fuse_norm_join(intra_fuse_args(acts, a, s, p, c, N), stream);
    if (f.out == FusionOut::sep) {  // out_s · s2 + out_a · a3
        gpu::matmul_forward(out, acts.s2, p.out_s, (const T*)nullptr, N, Ws, D, stream);
        gpu::matmul_forward(acts.tmp_out, acts.a3, p.out_a, (const T*)nullptr, N, Wa, D, stream);
        gpu::accumulate(out, acts.tmp_out, (size_t)N * D, stream);
        return nullptr;
    }
    // out_proj · (s2 + a3)  or  out_proj · [s2; a3]
    gpu::matmul_forward(out, acts.f, p.out_proj, (const T*)nullptr, N, c.fused_width(), D, stream, nullptr, out16);
    return out16;
}

// out (B,T,D) = Fuse(attention branch, Mamba branch) of inp (B,T,D). out16 and the value returned: as
// intra_fuse_forward's.
template <typename T>
const bf16* intra_mixer_forward(T* out, GpuIntraActs<T>& acts, const T* inp, const IntraParams<T>& p,
                                const IntraConfig& c, int B, int T_, cudaStream_t stream = 0,
                                const bf16* inp16 = nullptr, bf16* out16 = nullptr) {
    const int N = B * T_;
    // (bf16 runs: both branches' projections take inp in bf16, rounded once here unless the caller has it)
    if (!inp16) inp16 = gpu::bf16_operand(inp, size_t(N) * c.d_model, stream);
    // the two branches; with shared values the Mamba branch reads V, so attention runs first
    gpu::attn_branch_forward(acts.attn, inp, p.attn, c.attn, B, T_, stream, inp16);
    const T* x_shared = nullptr;
    if (c.fusion.value == FusionValue::shared) {
        const size_t n = (size_t)N * c.ssm_width();
        intra_expand_v_kernel<<<elementwise_grid(n, 256), 256, 0, stream>>>(acts.x_shared, acts.attn.v, N,
                                                                            c.attn.n_heads, c.attn.n_kv_heads,
                                                                            c.attn.d_v);
        cudaCheckLast();
        x_shared = acts.x_shared;
    }
    gpu::mamba2_branch_forward(acts.ssm, inp, x_shared, p.ssm, c.ssm, B, T_, stream, inp16);
    return gpu::intra_fuse_forward(out, acts, acts.attn.y, acts.ssm.g, p, c, N, stream, out16);
}

// dinp (B,T,D) written; dp.* accumulate. dout16: dout in bf16 for the output projections' GEMMs
// (matmul_backward's), or null.
template <typename T>
void intra_mixer_backward(T* dinp, IntraParams<T>& dp, const T* dout, GpuIntraActs<T>& acts, const T* inp,
                          const IntraParams<T>& p, const IntraConfig& c, int B, int T_, cudaStream_t stream = 0,
                          const bf16* inp16 = nullptr, const bf16* dout16 = nullptr) {
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
        gpu::matmul_backward(acts.ds, dp.out_s, (T*)nullptr, dout, acts.s2, p.out_s, N, Ws, D, stream, false, nullptr,
                             dout16);
        gpu::matmul_backward(acts.da, dp.out_a, (T*)nullptr, dout, acts.a3, p.out_a, N, Wa, D, stream, false, nullptr,
                             dout16);
    } else {
        const bool concat = f.op == FusionOp::concat;
        gpu::matmul_backward(acts.df, dp.out_proj, (T*)nullptr, dout, acts.f, p.out_proj, N, c.fused_width(), D,
                             stream, false, nullptr, dout16);
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
    if (!inp16) inp16 = gpu::bf16_operand(inp, size_t(N) * D, stream);  // (bf16 runs: once for both branches)
    gpu::mamba2_branch_backward(acts.dinp_ssm, shared ? acts.dx_shared : (T*)nullptr, dp.ssm, ds, acts.ssm, inp,
                                shared ? acts.x_shared : (const T*)nullptr, p.ssm, c.ssm, B, T_, stream, inp16);
    const T* dv_extra = nullptr;
    if (shared) {
        const size_t n = (size_t)N * Hkv * dv;
        intra_reduce_dv_kernel<<<elementwise_grid(n, 256), 256, 0, stream>>>(acts.dv_extra, acts.dx_shared, N, Ha, Hkv,
                                                                             dv);
        cudaCheckLast();
        dv_extra = acts.dv_extra;
    }
    gpu::attn_branch_backward(dinp, dp.attn, da, dv_extra, acts.attn, inp, p.attn, ac, B, T_, stream, inp16);
    gpu::accumulate(dinp, acts.dinp_ssm, (size_t)N * D, stream);
}

}  // namespace hl::gpu
