// mamba2.cuh — the Mamba-2 mixer on the GPU (DESIGN.md §1 block M), mirroring model/mamba2.h: the branch
// (everything up to g = y ⊙ SiLU(z), which the intra-layer hybrid reuses) and the mixer (branch, then the
// grouped gated RMSNorm and out_proj), forward and backward, same names and arguments on device pointers.
//
//   [z, xBC, dt_raw] = in_proj · u           cuBLAS (kernels/matmul.cuh)
//   conv_in = [x, B, C]                       in_proj's columns, read in place by the conv (rows LD apart);
//                                             with x_shared a gather first (mamba2_conv_in_kernel)
//   [x, B, C] = SiLU(causal_depthwise_conv1d) kernels/conv1d.cuh, its output columns written into x, B, C
//   dt = softplus(dt_raw + dt_bias), A = −exp(A_log)    mamba2_split_kernel
//   y = SSD(x, dt, A, B, C) + D·x             kernels/ssd.cuh (chunked)
//   g = y ⊙ SiLU(z)                           mamba2_gate_forward_kernel
//   mixer: gn = RMSNorm_grouped(g) · norm_w, out = out_proj · gn    kernels/rmsnorm.cuh, cuBLAS; on wide groups
//          the gate and the norm are one kernel (mamba2_gate_norm_forward_kernel), g not stored
// Under bf16 operands in_proj's output zxbcdt comes out of its GEMM in bf16 (as autocast keeps it), in half the
// memory: its readers (the conv, the dt split, the gate or the fused gate and norm, and in the backward the gate, the
// dt gradient and the conv's weight gradient) are templated on its type Z. So does the scan's output y, which only
// the gate (or the fused gate and norm) reads, forward and backward (type Y). Both through mamba2_bf16_views. And the
// conv's output, the scan's x, B and C (type X), as autocast's conv1d gives them, and the scan's chunk states (type
// ST), as mamba_ssm keeps them: both through mamba2_scan_views.
// in_proj's output and its gradient are (B, T, LD) with LD = in_proj_rows(), d_in_proj rounded up to a multiple of
// 8: its GEMMs run over the parameter layout's extra rows after in_proj (model/mamba2.h), whose output columns
// nothing reads, and whose gradient columns the dt backward writes as zeros (so they add nothing to the input's
// gradient and leave the gap's gradient at zero).
// The SSD kernels read dense (B, T, H, P) / (B, T, G, N) rows, so the conv writes its output's three column ranges
// into x, B and C (and its backward reads the gradient there): no xBC tensor, no split or concatenation pass (they
// took 3–4% of a 100m mamba2 step). The parameter-gradient reductions over rows (dt_bias) use colsum
// (deterministic, no atomics); dA comes from the SSD backward's fixed-order per-head sums.
//
// Parameters are model/mamba2.h's Mamba2Params (mamba2_params on an Arena over a device buffer: the CPU's
// layout, so checkpoints are interchangeable). Activations: GpuMamba2Acts, the CPU's Mamba2Acts with the
// norm's rstd in fp32 and the SSD scratch sized for the GPU backward (ssd_chunked_backward_scratch_size).
// fp32 for now; the kernels here are templated on the element type T (fp32 arithmetic inside).
#pragma once
#include <climits>               // INT_MAX
#include <cstddef>               // size_t
#include <type_traits>           // std::is_same_v
#include <cuda_runtime.h>        // cudaStream_t, cudaMemsetAsync
#include "kernels/common.cuh"    // cudaCheck, cudaCheckLast, elementwise_grid, colsum, dev_silu, dev_softplus, ...
#include "kernels/conv1d.cuh"    // conv1d_silu_forward/backward
#include "kernels/matmul.cuh"    // matmul_forward/backward for in_proj and out_proj; bf16_view, bf16_only_shape
#include "kernels/rmsnorm.cuh"   // rmsnorm_forward/backward, rmsnorm_block_sum, rmsnorm_row_output, rmsnorm_wide_row,
                                 // rmsnorm_row_dispatch
#include "kernels/ssd.cuh"       // ssd_chunked_forward/backward, ssd_chunked_backward_scratch_size
#include "model/common.h"        // Arena, HL_CHECK
#include "model/mamba2.h"        // Mamba2Config, Mamba2Params, mamba2_config_check, MAMBA2_NORM_EPS
#include "model/ssd.h"           // ssd_num_chunks

namespace hl::gpu {

// Saved activations and backward scratch of one Mamba-2 mixer (or branch) for a (B, T) batch: the fields of
// model/mamba2.h's Mamba2Acts but xBC and dxBC (the conv writes x, B, C and reads their gradients in place) and
// conv_pre (the conv's backward recomputes it: kernels/conv1d.cuh), with rstd and the SSD scratch in fp32.
template <typename T>
struct GpuMamba2Acts {
    // forward, saved for the backward
    T* zxbcdt = nullptr;         // (B, T, LD)         in_proj output [z, xBC, dt_raw, pad] ([z, BC, dt_raw, pad] if
                                 //                    shared_x); LD = in_proj_rows(); bf16 only in bf16 runs
    T* conv_in = nullptr;        // (B, T, conv_dim)   the conv's input [x, B, C], gathered with a shared x only
    T* x = nullptr;              // (B, T, H, P)       the scan's inputs: the conv's output columns (no xBC tensor);
    T* Bm = nullptr;             // (B, T, G, N)       bf16 only in bf16 runs
    T* Cm = nullptr;             // (B, T, G, N)
    T* dt = nullptr;             // (B, T, H)          softplus(dt_raw + dt_bias)
    T* A = nullptr;              // (H)                −exp(A_log)
    T* chunk_states = nullptr;   // (B, H, nchunks, P, N)  the state entering each chunk; bf16 only in bf16 runs
    T* y = nullptr;              // (B, T, H, P)       SSD output, D·x included; bf16 only in bf16 runs
    T* g = nullptr;              // (B, T, d_inner)    y ⊙ SiLU(z): the branch output (null for a mixer whose gate
                                 //                    and norm are fused: mamba2_gate_norm_fused)
    T* gn = nullptr;             // (B, T, d_inner)    mixer: RMSNorm(g) · norm_w
    float* rstd = nullptr;       // (B, T, G)          mixer: the norm's 1/rms per group
    // backward scratch
    T* dgn = nullptr;            // (B, T, d_inner)    mixer: gradient of gn
    T* dg = nullptr;             // (B, T, d_inner)    mixer: gradient of g (fused: the blocks' dnorm_w partials)
    T* dy = nullptr;             // (B, T, H, P)       bf16 (its first half) where mamba2_dy16 says
    T* dx = nullptr;             // (B, T, H, P)
    T* dBm = nullptr;            // (B, T, G, N)
    T* dCm = nullptr;            // (B, T, G, N)
    T* ddt = nullptr;            // (B, T, H)
    T* dA = nullptr;             // (H)
    T* dconv_in = nullptr;       // (B, T, conv_dim)
    T* dzxbcdt = nullptr;        // (B, T, LD)
    float* ssd_scratch = nullptr;  // ssd_chunked_backward_scratch_size(B, T, H, P, G, N, chunk)
    float* conv_scratch = nullptr;  // conv1d_backward_scratch_size(B, T, conv_dim, d_conv): the conv's dw partials
};

// Whether the mixer of config c takes the fused gate and norm (mamba2_gate_norm_forward_kernel below), forward and
// backward alike: a property of the config, so that gpu_mamba2_acts leaves g out of the layout. The fused kernels'
// float4 accesses need 16-byte aligned tensors, which the arenas give (activations 64 elements, parameters
// kParamAlign), and rows of zxbcdt a multiple of 4 floats (in_proj_rows() is a multiple of 8);
// mamba2_gate_norm_check checks the pointers at the launch.
template <typename T>
bool mamba2_gate_norm_fused(const Mamba2Config& c) {
    return std::is_same_v<T, float> && rmsnorm_wide_row(c.d_inner / c.ngroups);
}

// Lays out GpuMamba2Acts in an arena (counting when it has no base), as mamba2_acts does on the CPU: one float arena
// holds the element tensors and the fp32 statistics alike; under a Bf16Scope (the one the layer will run in) the
// tensors held only in bf16, zxbcdt, x, B, C, the chunk states, y and the mixer's gn, take half the floats.
// mixer: the M block's mixer (the gated norm's tensors; g only where its gate and norm are not fused), else the
// intra-layer block's branch (g, its output, and none of the norm's).
inline GpuMamba2Acts<float> gpu_mamba2_acts(Arena<float>& a, const Mamba2Config& c, int B, int T_, bool mixer) {
    mamba2_config_check(c);
    HL_CHECK(B > 0 && T_ > 0, "mamba2 activations (gpu): bad sizes B=", B, " T=", T_);
    const int H = c.nheads(), P = c.headdim, G = c.ngroups, N = c.d_state, CD = c.conv_dim();
    const int nchunks = ssd_num_chunks(T_, c.chunk);
    const size_t scratch = ssd_chunked_backward_scratch_size(B, T_, H, P, G, N, c.chunk);
    HL_CHECK(scratch < (size_t)INT_MAX, "mamba2 activations (gpu): SSD scratch of ", scratch, " floats is too large");
    GpuMamba2Acts<float> x;
    const bool b16 = current_bf16() != nullptr;
    x.zxbcdt = a.take("zxbcdt", bf16_only_shape({B, T_, c.in_proj_rows()}, b16));  // (bf16: zxbcdt16 only)
    if (c.shared_x) x.conv_in = a.take("conv_in", {B, T_, CD});  // else the conv reads zxbcdt in place
    x.x = a.take("x", bf16_only_shape({B, T_, H, P}, b16));  // (bf16: x16, B16, C16 only)
    x.Bm = a.take("Bm", bf16_only_shape({B, T_, G, N}, b16));
    x.Cm = a.take("Cm", bf16_only_shape({B, T_, G, N}, b16));
    x.dt = a.take("dt", {B, T_, H});
    x.A = a.take("A", {H});
    x.chunk_states = a.take("chunk_states", bf16_only_shape({B, H, nchunks, P, N}, b16));  // (bf16: states16 only)
    x.y = a.take("y", bf16_only_shape({B, T_, H, P}, b16));  // (bf16: y16 only)
    if (!mixer || !mamba2_gate_norm_fused<float>(c)) x.g = a.take("g", {B, T_, c.d_inner});
    if (mixer) {
        x.gn = a.take("gn", bf16_only_shape({B, T_, c.d_inner}, b16));  // (bf16: gn16 only)
        x.rstd = a.take("rstd", {B, T_, G});
        x.dgn = a.take_scratch("dgn", {B, T_, c.d_inner});
        x.dg = a.take_scratch("dg", {B, T_, c.d_inner});
    }
    x.dy = a.take_scratch("dy", {B, T_, H, P});
    x.dx = a.take_scratch("dx", {B, T_, H, P});
    x.dBm = a.take_scratch("dBm", {B, T_, G, N});
    x.dCm = a.take_scratch("dCm", {B, T_, G, N});
    x.ddt = a.take_scratch("ddt", {B, T_, H});
    x.dA = a.take_scratch("dA", {H});
    if (c.shared_x) x.dconv_in = a.take_scratch("dconv_in", {B, T_, CD});
    x.dzxbcdt = a.take_scratch("dzxbcdt", {B, T_, c.in_proj_rows()});
    x.ssd_scratch = a.take_scratch("ssd_scratch", {(int)scratch});
    x.conv_scratch = a.take_scratch("conv_scratch", {(int)gpu::conv1d_backward_scratch_size(B, T_, CD, c.d_conv)});
    return x;
}

// Calls f(zx, y) with in_proj's output and the scan's output as their producers write them and their readers take
// them: their bf16_views under bf16 operands, else the T tensors. Each kernel on them is one instantiation over
// Z, Y = T or bf16.
template <typename T, typename F>
void mamba2_bf16_views(GpuMamba2Acts<T>& acts, F&& f) {
    if (bf16* z16 = bf16_view(acts.zxbcdt)) f(z16, bf16_view(acts.y));
    else f(acts.zxbcdt, acts.y);
}

// Calls f(x, Bm, Cm, chunk_states) with the scan's inputs as the conv writes them and the scan reads them, and its
// chunk states as the forward writes them for the backward: their bf16_views under bf16 operands (whether or not the
// scan's products run on the tensor cores), else the T tensors.
template <typename T, typename F>
void mamba2_scan_views(GpuMamba2Acts<T>& acts, F&& f) {
    if (bf16* x16 = bf16_view(acts.x))
        f(x16, bf16_view(acts.Bm), bf16_view(acts.Cm), bf16_view(acts.chunk_states));
    else
        f(acts.x, acts.Bm, acts.Cm, acts.chunk_states);
}

// The scan's input gradient dy in bf16 (its bf16_view), written so by the gate's backward, where the scan's products
// round it to bf16 anyway (ssd_bf16_dy); else null (fp32). dy stays laid out in fp32: it is backward scratch, shared
// by the layers, and --no-ssd-tensor-cores runs in bf16 keep it fp32.
template <typename T>
bf16* mamba2_dy16(GpuMamba2Acts<T>& acts) {
    return ssd_bf16_dy() ? bf16_view(acts.dy) : nullptr;
}

// ---------------------------------------------------------------------------------------------------------
// Elementwise kernels of the branch. All grid-stride with one thread per element of a (rows, cols) view,
// index i = r·cols + col: consecutive threads read and write consecutive columns of a row (coalesced; the
// sources are row slices of the same width, so their reads are coalesced too). They are memory-bound and
// tiny next to the projections and the scan, so they are kept simple.
// ---------------------------------------------------------------------------------------------------------

// conv_in (rows, CD) = [x, B, C]: columns [DI, DI+CD) of zxbcdt (rows, LD), or with x_shared (rows, DI)
// non-null, x from x_shared and B, C from columns [DI, DI+2GN) of zxbcdt (which then has no x columns).
template <typename T, typename Z>
__global__ void mamba2_conv_in_kernel(T* conv_in, const Z* zxbcdt, const T* x_shared, int rows, int DI, int CD,
                                      int LD) {
    const size_t total = (size_t)rows * CD;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i / CD;
        const int col = (int)(i % CD);
        const Z* zr = zxbcdt + r * LD;
        conv_in[i] = x_shared ? (col < DI ? x_shared[r * DI + col] : T(float(zr[col]))) : T(float(zr[DI + col]));
    }
}

// Per row r: x (rows, DI), Bm, Cm (rows, GN) = the three column ranges of xBC (rows, CD); dt (rows, H) =
// softplus(zxbcdt[r, dt_off + h] + dt_bias[h]) (zxbcdt (rows, LD), dt_off = d_in_proj − H); and A (H) = −exp(A_log).
// One launch over rows·(CD + H) elements: columns col < CD are the split, col ≥ CD the dt of head col − CD
// (the first H threads of the grid-stride loop also do A). With xBC null only dt and A (rows·H elements): the
// training path's conv wrote x, B and C itself (ConvColumns); cached decoding splits here.
template <typename T, typename Z>
__global__ void mamba2_split_kernel(T* x, T* Bm, T* Cm, T* dt, T* A, const T* xBC, const Z* zxbcdt,
                                    const T* dt_bias, const T* A_log, int rows, int DI, int GN, int H, int LD,
                                    int dt_off) {
    const int CD = DI + 2 * GN, C0 = xBC ? 0 : CD, W = CD - C0 + H;
    const size_t total = (size_t)rows * W;
    const size_t i0 = blockIdx.x * (size_t)blockDim.x + threadIdx.x, stride = (size_t)gridDim.x * blockDim.x;
    for (size_t h = i0; h < (size_t)H; h += stride) A[h] = T(-expf(float(A_log[h])));
    for (size_t i = i0; i < total; i += stride) {
        const size_t r = i / W;
        const int col = C0 + (int)(i % W);
        if (col < DI) x[r * DI + col] = xBC[r * CD + col];
        else if (col < DI + GN) Bm[r * GN + col - DI] = xBC[r * CD + col];
        else if (col < CD) Cm[r * GN + col - DI - GN] = xBC[r * CD + col];
        else {
            const int h = col - CD;
            dt[r * H + h] = T(dev_softplus(float(zxbcdt[r * LD + dt_off + h]) + float(dt_bias[h])));
        }
    }
}

// g (rows, DI) = y ⊙ SiLU(z), z = columns [0, DI) of zxbcdt (rows, LD). Four elements a thread on [0, 4·n4)
// (mamba2_gate_vec4: then DI and LD are multiples of 4, so a group of four lies in one row), one on the rest.
template <typename T, typename Y, typename Z>
__global__ void mamba2_gate_forward_kernel(T* g, const Y* y, const Z* zxbcdt, int rows, int DI, int LD, size_t n4) {
    const size_t total = (size_t)rows * DI;
    const size_t i0 = blockIdx.x * (size_t)blockDim.x + threadIdx.x, stride = (size_t)gridDim.x * blockDim.x;
    auto gate = [](float yv, float z) { return yv * dev_silu(z); };
    for (size_t q = i0; q < n4; q += stride) {
        const size_t r = 4 * q / DI, col = 4 * q % DI;
        st4(g, q, map4(ld4(y, q), ld4(zxbcdt, (r * LD + col) / 4), gate));
    }
    for (size_t i = 4 * n4 + i0; i < total; i += stride) {
        const size_t r = i / DI;
        const int col = (int)(i % DI);
        g[i] = T(gate(float(y[i]), float(zxbcdt[r * LD + col])));
    }
}

// Backward of the gate: dy = dg ⊙ SiLU(z) (rows, DI; DYO = T, or bf16 for the scan), and dz = dg ⊙ y ⊙ SiLU'(z)
// straight into the z columns of dzxbcdt (rows, LD). Same mapping as the forward.
template <typename T, typename DYO, typename Y, typename Z>
__global__ void mamba2_gate_backward_kernel(DYO* dy, T* dzxbcdt, const T* dg, const Y* y, const Z* zxbcdt, int rows,
                                            int DI, int LD, size_t n4) {
    const size_t total = (size_t)rows * DI;
    const size_t i0 = blockIdx.x * (size_t)blockDim.x + threadIdx.x, stride = (size_t)gridDim.x * blockDim.x;
    for (size_t q = i0; q < n4; q += stride) {
        const size_t r = 4 * q / DI, col = 4 * q % DI, qz = (r * LD + col) / 4;
        const float4 d = ld4(dg, q), z = ld4(zxbcdt, qz);
        st4(dy, q, map4(d, z, [](float a, float zv) { return a * dev_silu(zv); }));
        st4(dzxbcdt, qz, map4(map4(d, ld4(y, q), [](float a, float b) { return a * b; }), z,
                              [](float dyv, float zv) { return dyv * dev_silu_grad(zv); }));
    }
    for (size_t i = 4 * n4 + i0; i < total; i += stride) {
        const size_t r = i / DI;
        const int col = (int)(i % DI);
        const float z = float(zxbcdt[r * LD + col]), d = float(dg[i]);
        dy[i] = DYO(d * dev_silu(z));
        dzxbcdt[r * LD + col] = T(d * float(y[i]) * dev_silu_grad(z));
    }
}

// The gate kernels' groups of four (vec4_count), 0 where a group could straddle two rows of zxbcdt.
template <typename... P>
size_t mamba2_gate_vec4(int rows, int DI, int LD, const P*... p) {
    return DI % 4 == 0 && LD % 4 == 0 ? vec4_count((size_t)rows * DI, p...) : 0;
}
template <typename T, typename Y, typename Z>
void mamba2_gate_forward(T* g, const Y* y, const Z* zxbcdt, int rows, int DI, int LD, cudaStream_t stream) {
    const size_t n4 = mamba2_gate_vec4(rows, DI, LD, g, y, zxbcdt);
    mamba2_gate_forward_kernel<<<elementwise_grid(n4 ? n4 : (size_t)rows * DI, 256), 256, 0, stream>>>(
        g, y, zxbcdt, rows, DI, LD, n4);
    cudaCheckLast();
}
template <typename T, typename DYO, typename Y, typename Z>
void mamba2_gate_backward(DYO* dy, T* dzxbcdt, const T* dg, const Y* y, const Z* zxbcdt, int rows, int DI, int LD,
                          cudaStream_t stream) {
    const size_t n4 = mamba2_gate_vec4(rows, DI, LD, dy, dzxbcdt, dg, y, zxbcdt);
    mamba2_gate_backward_kernel<<<elementwise_grid(n4 ? n4 : (size_t)rows * DI, 256), 256, 0, stream>>>(
        dy, dzxbcdt, dg, y, zxbcdt, rows, DI, LD, n4);
    cudaCheckLast();
}

// The dt_raw gradient at (r, h), as mamba2_dt_backward_kernel writes it: colsum takes dt_bias's gradient from it
// (recomputed, not read back: under bf16 the kernel writes it rounded, for the GEMM only).
template <typename T, typename Z>
__device__ __forceinline__ float mamba2_dt_grad(const T* ddt, const Z* zxbcdt, const T* dt_bias, size_t r, int h, int H,
                                                int LD, int dt_off) {
    return float(ddt[r * H + h]) * dev_sigmoid(float(zxbcdt[r * LD + dt_off + h]) + float(dt_bias[h]));
}

// Backward of dt = softplus(dt_raw + dt_bias): the dt_raw columns of dzxbcdt (rows, LD; O = T, or bf16 for the
// in_proj GEMM) get ddt · σ(dt_raw + dt_bias) (rows, H), and the pad columns after them (up to LD) zeros, which the
// GEMM reads. The first H threads also finish A = −exp(A_log): dA_log += dA · A. (dt_bias's gradient is the column
// sum of the same values: colsum with Mamba2DtGradTerm.)
template <typename T, typename O, typename Z>
__global__ void mamba2_dt_backward_kernel(O* dzxbcdt, T* dA_log, const T* ddt, const Z* zxbcdt, const T* dt_bias,
                                          const T* dA, const T* A, int rows, int H, int LD, int dt_off) {
    const int W = LD - dt_off;  // dt columns and pads
    const size_t total = (size_t)rows * W;
    const size_t i0 = blockIdx.x * (size_t)blockDim.x + threadIdx.x, stride = (size_t)gridDim.x * blockDim.x;
    for (size_t h = i0; h < (size_t)H; h += stride) dA_log[h] = T(float(dA_log[h]) + float(dA[h]) * float(A[h]));
    for (size_t i = i0; i < total; i += stride) {
        const size_t r = i / W;
        const int h = (int)(i % W);
        dzxbcdt[r * LD + dt_off + h] = O(h < H ? mamba2_dt_grad(ddt, zxbcdt, dt_bias, r, h, H, LD, dt_off) : 0.f);
    }
}

// f(r, h) = mamba2_dt_grad at (r, h): colsum's term for dt_bias.
template <typename T, typename Z>
struct Mamba2DtGradTerm {
    const T* ddt;
    const Z* zxbcdt;
    const T* dt_bias;
    int H, LD, dt_off;
    __device__ float operator()(int r, int h) const {
        return mamba2_dt_grad(ddt, zxbcdt, dt_bias, r, h, H, LD, dt_off);
    }
};

// Backward of mamba2_conv_in_kernel: dconv_in (rows, CD) back into the x/B/C columns of dzxbcdt (rows, LD),
// or with dx_shared (rows, DI) non-null, its x part into dx_shared and B, C into dzxbcdt's columns [DI, DI+2GN).
template <typename T>
__global__ void mamba2_conv_in_backward_kernel(T* dzxbcdt, T* dx_shared, const T* dconv_in, int rows, int DI, int CD,
                                               int LD) {
    const size_t total = (size_t)rows * CD;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i / CD;
        const int col = (int)(i % CD);
        T* zr = dzxbcdt + r * LD;
        if (!dx_shared) zr[DI + col] = dconv_in[i];
        else if (col < DI) dx_shared[r * DI + col] = dconv_in[i];
        else zr[col] = dconv_in[i];
    }
}

// ---------------------------------------------------------------------------------------------------------
// Branch and mixer
// ---------------------------------------------------------------------------------------------------------

// Everything up to g = y ⊙ SiLU(z), written to acts.g (B, T, d_inner). inp (B, T, d_model);
// x_shared (B, T, d_inner) when c.shared_x, else null. gate = false: stop at y (the mixer's fused gate and norm
// read y and z from acts; acts.g is not written).
template <typename T>
void mamba2_branch_forward(GpuMamba2Acts<T>& acts, const T* inp, const T* x_shared, const Mamba2Params<T>& p,
                           const Mamba2Config& c, int B, int T_, cudaStream_t stream = 0, const bf16* inp16 = nullptr,
                           bool gate = true) {
    mamba2_config_check(c);
    HL_CHECK(B > 0 && T_ > 0, "mamba2 (gpu): bad sizes B=", B, " T=", T_);
    HL_CHECK(c.shared_x == (x_shared != nullptr), "mamba2 (gpu): x_shared must be given exactly when shared_x is set");
    const int rows = B * T_, D = c.d_model, DI = c.d_inner, H = c.nheads(), GN = c.ngroups * c.d_state;
    const int CD = c.conv_dim(), LD = c.in_proj_rows(), dt_off = c.d_in_proj() - H;

    // [z, xBC, dt_raw, pad] = in_proj · u (the pad columns from the parameter layout's gap rows: not read); in bf16
    // under bf16 operands (zx below)
    gpu::matmul_forward(acts.zxbcdt, inp, p.in_proj, (const T*)nullptr, rows, D, LD, stream, inp16,
                        gpu::bf16_view(acts.zxbcdt));
    mamba2_bf16_views(acts, [&](auto* zx, auto* y) {
        mamba2_scan_views(acts, [&](auto* x, auto* Bm, auto* Cm, auto* states) {
            // [x, B, C] = SiLU(conv1d([x, B, C])): the conv reads its input in place, the x, B, C columns of
            // in_proj's output (rows LD apart), gathered first only with a shared x (x from x_shared, B and C from
            // in_proj); it writes its output's column ranges straight into the scan's x, B and C
            using X = std::remove_pointer_t<decltype(x)>;
            const ConvColumns<X> xbc(x, DI, DI, Bm, DI + GN, GN, Cm, CD, GN);
            if (x_shared) {
                mamba2_conv_in_kernel<<<elementwise_grid((size_t)rows * CD, 256), 256, 0, stream>>>(
                    acts.conv_in, zx, x_shared, rows, DI, CD, LD);
                cudaCheckLast();
                gpu::conv1d_silu_forward(xbc, acts.conv_in, p.conv_w, p.conv_b, B, T_, CD, c.d_conv, stream);
            } else {
                gpu::conv1d_silu_forward(xbc, zx + DI, p.conv_w, p.conv_b, B, T_, CD, c.d_conv, stream, LD);
            }
            // dt = softplus(dt_raw + dt_bias); A = −exp(A_log) (no xBC: the kernel writes only those)
            mamba2_split_kernel<<<elementwise_grid((size_t)rows * H, 256), 256, 0, stream>>>(
                (T*)nullptr, (T*)nullptr, (T*)nullptr, acts.dt, acts.A, (const T*)nullptr, zx, p.dt_bias, p.A_log,
                rows, DI, GN, H, LD, dt_off);
            cudaCheckLast();
            // y = SSD(x, dt, A, B, C) + D·x from a zero state (bf16 states: their fp32 local states in the backward's
            // scratch, free during the forward)
            gpu::ssd_chunked_forward(y, states, x, acts.dt, acts.A, Bm, Cm, p.D, (const T*)nullptr, (T*)nullptr, B, T_,
                                     H, c.headdim, c.ngroups, c.d_state, c.chunk, stream, acts.ssd_scratch);
        });
        // g = y ⊙ SiLU(z)
        if (gate) mamba2_gate_forward(acts.g, y, zx, rows, DI, LD, stream);
    });
}

// Backward of the branch, given dg (B, T, d_inner), the gradient of acts.g. dinp (B, T, d_model) is written;
// dx_shared (B, T, d_inner) is written when c.shared_x (else pass null); dp.* accumulate. dg null: the gate's
// backward is done already (acts.dy and the z columns of acts.dzxbcdt written: the mixer's fused gate and norm).
// dzxbcdt16 (the mixer's, under bf16 with the fused gate and norm: acts.dzxbcdt's bf16 view): the gradient of
// in_proj's output is written there in bf16 by its producers (the fused gate's backward wrote its z columns), for the
// GEMM, and not in fp32, which nothing else reads: the GEMM's rounding pass over it is saved (0.15 ms a layer at
// 350m, H200), and half the bytes written. Each value is rounded once from the same float: the same bf16 as before.
// dinp16 (bf16 runs; or null): dinp's bf16 view, where in_proj's GEMM writes it instead; returned.
template <typename T>
const bf16* mamba2_branch_backward(T* dinp, T* dx_shared, Mamba2Params<T>& dp, const T* dg, GpuMamba2Acts<T>& acts,
                                   const T* inp, const T* x_shared, const Mamba2Params<T>& p, const Mamba2Config& c,
                                   int B, int T_, cudaStream_t stream = 0, const bf16* inp16 = nullptr,
                                   bf16* dzxbcdt16 = nullptr, bf16* dinp16 = nullptr) {
    mamba2_config_check(c);
    HL_CHECK(B > 0 && T_ > 0, "mamba2 (gpu): bad sizes B=", B, " T=", T_);
    HL_CHECK(c.shared_x == (x_shared != nullptr) && c.shared_x == (dx_shared != nullptr),
             "mamba2 (gpu): x_shared and dx_shared must be given exactly when shared_x is set");
    HL_CHECK(!dzxbcdt16 || (!dg && !x_shared), "mamba2 (gpu): a bf16 dzxbcdt needs the fused gate and no shared x");
    const int rows = B * T_, D = c.d_model, DI = c.d_inner, H = c.nheads(), GN = c.ngroups * c.d_state;
    const int CD = c.conv_dim(), LD = c.in_proj_rows(), dt_off = c.d_in_proj() - H;

    mamba2_bf16_views(acts, [&](auto* zx, auto* y) {  // in_proj's and the scan's outputs as the forward wrote them
        using Z = std::remove_pointer_t<decltype(zx)>;
        bf16* dy16 = mamba2_dy16(acts);  // (the fused gate and norm's backward wrote dy so already)
        // g = y ⊙ SiLU(z)  →  dy, and dz into dzxbcdt
        if (dg && dy16) mamba2_gate_backward(dy16, acts.dzxbcdt, dg, y, zx, rows, DI, LD, stream);
        else if (dg) mamba2_gate_backward(acts.dy, acts.dzxbcdt, dg, y, zx, rows, DI, LD, stream);
        // the scan: dx, ddt, dB, dC written; dA (zeroed here) and dp.D accumulate
        cudaCheck(cudaMemsetAsync(acts.dA, 0, sizeof(T) * H, stream));
        auto scan_backward = [&](const auto* dyv) {
            mamba2_scan_views(acts, [&](const auto* x, const auto* Bm, const auto* Cm, const auto* states) {
                gpu::ssd_chunked_backward(acts.dx, acts.ddt, acts.dA, acts.dBm, acts.dCm, dp.D, (T*)nullptr,
                                          acts.ssd_scratch, dyv, (const T*)nullptr, states, x, acts.dt,
                                          acts.A, Bm, Cm, p.D, B, T_, H, c.headdim, c.ngroups, c.d_state, c.chunk,
                                          stream);
            });
        };
        if (dy16) scan_backward(dy16);
        else scan_backward(acts.dy);
        // dt = softplus(dt_raw + dt_bias) → the dt_raw columns of dzxbcdt (and zeros in its pad columns);
        // A = −exp(A_log) → dA_log += dA · A
        auto dt_backward = [&](auto* dst) {
            mamba2_dt_backward_kernel<<<elementwise_grid((size_t)rows * (LD - dt_off), 256), 256, 0, stream>>>(
                dst, dp.A_log, acts.ddt, zx, p.dt_bias, acts.dA, acts.A, rows, H, LD, dt_off);
            cudaCheckLast();
        };
        if (dzxbcdt16) dt_backward(dzxbcdt16);
        else dt_backward(acts.dzxbcdt);
        // dt_bias[h] += Σ_rows of that column (deterministic column sum)
        gpu::colsum(dp.dt_bias, Mamba2DtGradTerm<T, Z>{acts.ddt, zx, p.dt_bias, H, LD, dt_off}, rows, H, stream);
        // [x, B, C] = SiLU(conv1d(conv_in)): the conv reads the gradient at its output from dx, dB and dC; without a
        // shared x, conv_in is in_proj's x, B, C columns, and its gradient goes straight into those columns of
        // dzxbcdt
        const ConvColumns<const T> dxbc(acts.dx, DI, DI, acts.dBm, DI + GN, GN, acts.dCm, CD, GN);
        if (x_shared) {
            gpu::conv1d_silu_backward(acts.dconv_in, dp.conv_w, dp.conv_b, dxbc, acts.conv_in, p.conv_w, p.conv_b, B,
                                      T_, CD, c.d_conv, acts.conv_scratch, stream);
            mamba2_conv_in_backward_kernel<<<elementwise_grid((size_t)rows * CD, 256), 256, 0, stream>>>(
                acts.dzxbcdt, dx_shared, acts.dconv_in, rows, DI, CD, LD);
            cudaCheckLast();
        } else if (dzxbcdt16) {
            gpu::conv1d_silu_backward(dzxbcdt16 + DI, dp.conv_w, dp.conv_b, dxbc, zx + DI, p.conv_w, p.conv_b, B, T_,
                                      CD, c.d_conv, acts.conv_scratch, stream, LD);
        } else {
            gpu::conv1d_silu_backward(acts.dzxbcdt + DI, dp.conv_w, dp.conv_b, dxbc, zx + DI, p.conv_w, p.conv_b, B,
                                      T_, CD, c.d_conv, acts.conv_scratch, stream, LD);
        }
    });
    // [z, xBC, dt_raw, pad] = in_proj · u (over the gap rows too: their gradient stays zero, the pads being zero)
    gpu::matmul_backward(dinp, dp.in_proj, (T*)nullptr, acts.dzxbcdt, inp, p.in_proj, rows, D, LD, stream, false,
                         inp16, dzxbcdt16, dinp16);
    return dinp16;
}

// ---------------------------------------------------------------------------------------------------------
// The M mixer's gate and grouped norm fused: gn = RMSNorm_grouped(y ⊙ SiLU(z)) · norm_w in one pass, on the wide fp32
// groups of the block norms (rmsnorm_wide_row: every model size from 100m on). Block r = (row, group) reads its y and
// z once and holds g = y ⊙ SiLU(z) in registers from the sum of squares to the output. g is not stored: the backward
// recomputes it from y and z, the same two reads its gate backward makes anyway. Unfused, the gate wrote g and the
// norm read it back, and the backward wrote dg for the gate's backward to read: at 100m (16384 rows of 2048) that
// was two (rows, d_inner) passes more each way. Other shapes (the tests' tiny ones, G groups narrower than 1024) go
// through mamba2_gate_forward and rmsnorm_forward as before.

template <typename T>
void mamba2_gate_norm_check(const GpuMamba2Acts<T>& acts, const Mamba2Params<T>& p) {
    HL_CHECK(vec4_aligned(acts.gn, acts.dgn, acts.dg, acts.y, acts.dy, acts.zxbcdt, acts.dzxbcdt, p.norm_w),
             "mamba2 mixer (gpu): the fused gate and norm need 16-byte aligned activations and norm_w");
}

// gn (rows, G·Cg) = y ⊙ SiLU(z) / rms(group) · norm_w, rstd (rows, G) saved. O: float, or bf16 under bf16 operands
// (gn is out_proj's input only). grid: rows·G blocks of RMSNORM_BLOCK threads.
template <int V, typename O, typename Y, typename Z>
__global__ void mamba2_gate_norm_forward_kernel(O* gn, float* rstd, const Y* y, const Z* zxbcdt,
                                                const float* norm_w, int G, int Cg, int LD, float eps) {
    __shared__ float part[RMSNORM_BLOCK / 32];
    const int r = blockIdx.x, tid = threadIdx.x, C4 = Cg / 4, grp = r % G;
    const Y* yr = y + (size_t)r * Cg;                                     // (Cg)
    const Z* zr = zxbcdt + (size_t)(r / G) * LD + (size_t)grp * Cg;      // (Cg): z is columns [0, d_inner)
    const float* wr = norm_w + (size_t)grp * Cg;                          // (Cg)
    float4 g[V];
    float ss = 0.0f;
#pragma unroll
    for (int q = 0; q < V; q++) {
        const int c = tid + q * RMSNORM_BLOCK;
        g[q] = c < C4 ? map4(ld4(yr, c), ld4(zr, c), [](float yv, float z) { return yv * dev_silu(z); })
                      : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        ss += g[q].x * g[q].x + g[q].y * g[q].y + g[q].z * g[q].z + g[q].w * g[q].w;
    }
    rmsnorm_row_output(gn + (size_t)r * Cg, rstd + r, g, ss, wr, Cg, eps, part);
}

// With g = y ⊙ SiLU(z), ĝ = g · rstd, d = dgn ⊙ norm_w:  dg = rstd · (d − ĝ · mean(d ⊙ ĝ)) over the group, then
// dy = dg ⊙ SiLU(z) (rows, DI; DYO float, or bf16 for the scan) and dz = dg ⊙ y ⊙ SiLU'(z) into the z columns of
// dzxbcdt (rows, LD; ZO float, or bf16 for the in_proj GEMM): both written.
// grid (ceil(rows / MAMBA2_GN_ROWS), G): block (b, g) takes group g of rows b·R … b·R + R − 1 in turn and keeps its
// threads' share of Σ_rows dgn ⊙ ĝ (norm_w's gradient) in registers, written to wpart row b (ceil(rows / R), DI):
// a column sum over those few rows finishes it, instead of one over all rows that would read dgn, y and z again.
constexpr int MAMBA2_GN_ROWS = 16;

template <int V, typename DYO, typename ZO, typename Y, typename Z>
__global__ void mamba2_gate_norm_backward_kernel(DYO* dy, ZO* dzxbcdt, float* wpart, const float* dgn,
                                                 const Y* y, const Z* zxbcdt, const float* norm_w,
                                                 const float* rstd, int rows, int G, int Cg, int LD) {
    __shared__ float part[RMSNORM_BLOCK / 32];
    const int tid = threadIdx.x, C4 = Cg / 4, grp = blockIdx.y;
    const float* wr = norm_w + (size_t)grp * Cg;  // (Cg)
    float4 w[V], dw[V];                            // norm_w, and the block's Σ dgn ⊙ ĝ
#pragma unroll
    for (int q = 0; q < V; q++) {
        const int c = tid + q * RMSNORM_BLOCK;
        w[q] = c < C4 ? ld4(wr, c) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        dw[q] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
    const int n1 = min(rows, (blockIdx.x + 1) * MAMBA2_GN_ROWS);
    for (int n = blockIdx.x * MAMBA2_GN_ROWS; n < n1; n++) {
        const size_t r = (size_t)n * G + grp, zoff = (size_t)n * LD + (size_t)grp * Cg;
        const float s = rstd[r];
        float4 yv[V], z[V], gh[V], d[V];  // y, z, ĝ, d
        float dot = 0.0f;
#pragma unroll
        for (int q = 0; q < V; q++) {
            const int c = tid + q * RMSNORM_BLOCK;
            yv[q] = z[q] = gh[q] = d[q] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            if (c < C4) {
                yv[q] = ld4(y + r * Cg, c);
                z[q] = ld4(zxbcdt + zoff, c);
                gh[q] = map4(yv[q], z[q], [s](float a, float zz) { return a * dev_silu(zz) * s; });
                const float4 go = ld4(dgn + r * Cg, c);
                dw[q] = map4(dw[q], map4(go, gh[q], [](float a, float b) { return a * b; }),
                             [](float a, float b) { return a + b; });
                d[q] = map4(go, w[q], [](float a, float b) { return a * b; });
            }
            dot += d[q].x * gh[q].x + d[q].y * gh[q].y + d[q].z * gh[q].z + d[q].w * gh[q].w;
        }
        const float mean = rmsnorm_block_sum(dot, part) / Cg;
        __syncthreads();  // every thread has read part before the next row writes it
#pragma unroll
        for (int q = 0; q < V; q++) {
            const int c = tid + q * RMSNORM_BLOCK;
            if (c < C4) {
                const float4 dg = map4(d[q], gh[q], [s, mean](float dv, float g) { return s * (dv - g * mean); });
                st4(dy + r * Cg, c, map4(dg, z[q], [](float a, float zz) { return a * dev_silu(zz); }));
                st4(dzxbcdt + zoff, c, map4(map4(dg, yv[q], [](float a, float b) { return a * b; }), z[q],
                                            [](float a, float zz) { return a * dev_silu_grad(zz); }));
            }
        }
    }
    float* pr = wpart + (size_t)blockIdx.x * G * Cg + (size_t)grp * Cg;  // (Cg)
#pragma unroll
    for (int q = 0; q < V; q++) {
        const int c = tid + q * RMSNORM_BLOCK;
        if (c < C4) st4(pr, c, dw[q]);
    }
}

// The M block's mixer: out (B, T, d_model) = out_proj(RMSNorm_grouped(g) · norm_w), g from the branch. The gated
// norm normalises each group of d_inner/G channels on its own (as mamba_ssm does). out16: as attn_mixer_forward's.
template <typename T>
const bf16* mamba2_mixer_forward(T* out, GpuMamba2Acts<T>& acts, const T* inp, const Mamba2Params<T>& p,
                                 const Mamba2Config& c, int B, int T_, cudaStream_t stream = 0,
                                 const bf16* inp16 = nullptr, bf16* out16 = nullptr) {
    mamba2_config_check(c);
    HL_CHECK(!c.shared_x, "mamba2 mixer (gpu): shared_x is for the hybrid's branch; the mixer computes its own x");
    HL_CHECK(p.norm_w && p.out_proj, "mamba2 mixer (gpu): params have no norm_w/out_proj (with_norm_out=false)");
    const int rows = B * T_, G = c.ngroups, Cg = c.d_inner / G;
    bf16* gn16 = gpu::bf16_view(acts.gn);  // (bf16 runs: gn is out_proj's input only, written in bf16 once)
    const bool fused = mamba2_gate_norm_fused<T>(c);
    if (fused) mamba2_gate_norm_check(acts, p);
    gpu::mamba2_branch_forward(acts, inp, (const T*)nullptr, p, c, B, T_, stream, inp16, !fused);
    if constexpr (std::is_same_v<T, float>) {
        if (fused) {
            auto launch = [&](auto* o) {
                mamba2_bf16_views(acts, [&](auto* zx, auto* y) {
                    rmsnorm_row_dispatch(Cg, [&](auto v) {
                        mamba2_gate_norm_forward_kernel<decltype(v)::value><<<rows * G, RMSNORM_BLOCK, 0, stream>>>(
                            o, acts.rstd, y, zx, p.norm_w, G, Cg, c.in_proj_rows(), float(MAMBA2_NORM_EPS));
                    });
                });
                cudaCheckLast();
            };
            if (gn16) launch(gn16);
            else launch(acts.gn);
        }
    }
    if (!fused)
        gpu::rmsnorm_forward(acts.gn, acts.rstd, acts.g, p.norm_w, rows, G, Cg, float(MAMBA2_NORM_EPS), stream, gn16);
    gpu::matmul_forward(out, acts.gn, p.out_proj, (const T*)nullptr, rows, c.d_inner, c.d_model, stream, gn16, out16);
    return out16;
}

// dinp (B, T, d_model) is written; dp.* accumulate. dout16: dout in bf16 for out_proj's GEMM (matmul_backward's), or
// null. dinp16 (bf16 runs; or null): dinp's bf16 view, where in_proj's GEMM writes it instead; returned.
template <typename T>
const bf16* mamba2_mixer_backward(T* dinp, Mamba2Params<T>& dp, const T* dout, GpuMamba2Acts<T>& acts, const T* inp,
                                  const Mamba2Params<T>& p, const Mamba2Config& c, int B, int T_,
                                  cudaStream_t stream = 0, const bf16* inp16 = nullptr, const bf16* dout16 = nullptr,
                                  bf16* dinp16 = nullptr) {
    mamba2_config_check(c);
    HL_CHECK(!c.shared_x, "mamba2 mixer (gpu): shared_x is for the hybrid's branch; the mixer computes its own x");
    HL_CHECK(p.norm_w && p.out_proj, "mamba2 mixer (gpu): params have no norm_w/out_proj (with_norm_out=false)");
    const int rows = B * T_, G = c.ngroups, Cg = c.d_inner / G, LD = c.in_proj_rows();
    gpu::matmul_backward(acts.dgn, dp.out_proj, (T*)nullptr, dout, acts.gn, p.out_proj, rows, c.d_inner, c.d_model,
                         stream, false, gpu::bf16_view(acts.gn), dout16);
    bf16* dzxbcdt16 = nullptr;  // in_proj's output gradient in bf16 (on the fused path)
    const bool fused = mamba2_gate_norm_fused<T>(c);  // as the forward chose
    if (fused) mamba2_gate_norm_check(acts, p);
    if constexpr (std::is_same_v<T, float>) {
        if (fused) {  // dy and the z columns of dzxbcdt, dnorm_w from the blocks' partials
            const int nb = ceil_div(rows, MAMBA2_GN_ROWS);  // the partials go to acts.dg, unused on this path
            auto launch = [&](auto* dyo, auto* dz) {
                mamba2_bf16_views(acts, [&](auto* zx, auto* y) {
                    rmsnorm_row_dispatch(Cg, [&](auto v) {
                        mamba2_gate_norm_backward_kernel<decltype(v)::value><<<dim3(nb, G), RMSNORM_BLOCK, 0,
                                                                               stream>>>(
                            dyo, dz, acts.dg, acts.dgn, y, zx, p.norm_w, acts.rstd, rows, G, Cg, LD);
                    });
                });
                cudaCheckLast();
            };
            dzxbcdt16 = gpu::bf16_view(acts.dzxbcdt);  // under bf16: in_proj's GEMM is the only reader
            bf16* dy16 = mamba2_dy16(acts);             // the scan's, as its backward will read it
            if (dzxbcdt16 && dy16) launch(dy16, dzxbcdt16);
            else if (dzxbcdt16) launch(acts.dy, dzxbcdt16);
            else launch(acts.dy, acts.dzxbcdt);
            gpu::colsum(dp.norm_w, RowsTerm<float>{acts.dg, c.d_inner}, nb, c.d_inner, stream);  // the partials
        }
    }
    if (!fused) gpu::rmsnorm_backward(acts.dg, dp.norm_w, acts.dgn, acts.g, p.norm_w, acts.rstd, rows, G, Cg, stream);
    return gpu::mamba2_branch_backward(dinp, (T*)nullptr, dp, fused ? (const T*)nullptr : acts.dg, acts, inp,
                                       (const T*)nullptr, p, c, B, T_, stream, inp16, dzxbcdt16, dinp16);
}

}  // namespace hl::gpu
