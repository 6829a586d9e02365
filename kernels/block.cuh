// block.cuh — the three blocks of DESIGN.md §1 on the GPU, mirroring model/block.h: pre-norm, a token mixer
// (A attention — windowed for the pattern's S —, M Mamba-2, H intra-layer hybrid), a residual add, then pre-norm,
// the FFN (SwiGLU, or with --moe the mixture of experts) and a residual add:
//   h = x + mixer(RMSNorm(x)),   y = h + FFN(RMSNorm(h))
// Parameters: model/block.h's BlockParams over a device buffer (block_params gives the CPU's layout).
// Activations: GpuBlockActs, the CPU's BlockActs with the GPU mixer acts and fp32 norm statistics; the FFN's
// SwiGLUActs are the CPU struct itself (all of its tensors are element tensors), laid out by gpu_swiglu_acts.
#pragma once
#include <cstddef>                // size_t
#include <cuda_runtime.h>         // cudaStream_t
#include "kernels/attention.cuh"  // GpuAttnActs, gpu_attn_acts, attn_mixer_forward/backward
#include "kernels/common.cuh"     // add
#include "kernels/matmul.cuh"     // current_bf16, bf16_only_shape, bf16_view
#include "kernels/intra.cuh"      // GpuIntraActs, gpu_intra_acts, intra_mixer_forward/backward
#include "kernels/mamba2.cuh"     // GpuMamba2Acts, gpu_mamba2_acts, mamba2_mixer_forward/backward
#include "kernels/moe.cuh"        // GpuMoEActs, gpu_moe_acts, moe_forward/backward
#include "kernels/rmsnorm.cuh"    // rmsnorm_forward/backward, add_rmsnorm_forward
#include "kernels/swiglu.cuh"     // gpu_swiglu_acts, swiglu_forward/backward
#include "model/block.h"          // BlockConfig, BlockParams, block_config_check
#include "model/common.h"         // Arena
#include "model/swiglu.h"         // SwiGLUActs

namespace hl::gpu {

template <typename T>
struct GpuBlockActs {
    T* n1 = nullptr;          // (B,T,D)  RMSNorm(x)
    float* rstd1 = nullptr;   // (B,T)
    GpuAttnActs<T> attn{};    // kind A
    GpuMamba2Acts<T> ssm{};   // kind M
    GpuIntraActs<T> intra{};  // kind H
    T* mix = nullptr;         // (B,T,D)  mixer output
    T* h = nullptr;           // (B,T,D)  x + mix
    T* n2 = nullptr;          // (B,T,D)  RMSNorm(h)
    float* rstd2 = nullptr;   // (B,T)
    SwiGLUActs<T> ffn{};
    GpuMoEActs<T> moe{};
    const T* moe_bias = nullptr;  // (E) the MoE's selection bias (model state, set by the model)
    T* ffo = nullptr;         // (B,T,D)  FFN output (from the scratch: see gpu_block_acts)
    const bf16* ffo16 = nullptr;  // ffo's bf16 view when the last forward wrote it so (block_forward), else null
    // backward scratch (with mix, and the mixers' and FFN's own, from Arena::take_scratch: in GpuModel one region all
    // layers share)
    T* dn = nullptr;          // (B,T,D)
    T* dh = nullptr;          // (B,T,D)
};

// Lays out GpuBlockActs in an arena (counting when it has no base), as block_acts does on the CPU; index tensors
// (MoE routing) in ia. Under a Bf16Scope, the tensors held only in bf16 take half the floats (bf16_only_shape): lay out
// under the scope the block will run in.
inline GpuBlockActs<float> gpu_block_acts(Arena<float>& a, Arena<int>& ia, const BlockConfig& c, int B, int T_) {
    block_config_check(c);
    GpuBlockActs<float> x;
    const int N = B * T_, D = c.d_model;
    // (under a Bf16Scope, as GpuModel lays out a bf16 model: the norms' outputs held in bf16 only, as block_forward
    // writes them; n2 not with an MoE, which reads it in fp32)
    const bool bf16 = current_bf16() != nullptr;
    x.n1 = a.take("n1", bf16_only_shape({N, D}, bf16));
    x.rstd1 = a.take("rstd1", {N});
    if (c.kind == 'A') x.attn = gpu_attn_acts(a, c.attn, B, T_);
    if (c.kind == 'M') x.ssm = gpu_mamba2_acts(a, c.ssm, B, T_, /*mixer=*/true);
    if (c.kind == 'H') x.intra = gpu_intra_acts(a, c.intra, B, T_);
    x.mix = a.take_scratch("mix", {N, D});
    x.h = a.take("h", {N, D});
    x.n2 = a.take("n2", bf16_only_shape({N, D}, bf16 && !c.use_moe));
    x.rstd2 = a.take("rstd2", {N});
    if (c.use_moe) x.moe = gpu_moe_acts(a, ia, c.moe, N);
    else x.ffn = gpu_swiglu_acts(a, c.ffn, N);
    // ffo outlives this block's forward, but only until the next block's first norm (or the final norm) has added it
    // into the residual stream, which is that block's first step, before it writes any scratch; the backward uses it
    // as scratch only (dw_part). So it can live in the shared scratch region too.
    x.ffo = a.take_scratch("ffo", {N, D});
    x.dn = a.take_scratch("dn", {N, D});
    x.dh = a.take_scratch("dh", {N, D});
    return x;
}

// y (B,T,D) = block(x).
// The last residual add, y = h + FFN(…), can be left to whatever reads y next, which is always a norm (the next
// block's first, or the model's final one): with write_y false, y is not written here, and the next block, given
// this block's acts as prev, writes its x = prev->h + prev->ffo in its first norm's pass (add_rmsnorm_forward: the
// same values bit for bit, one (N, D) read and one launch less a block). x is then written, not read.
// bf16 runs: the mixer's and the FFN's outputs are read only by the norm after them, which adds them into the fp32
// residual stream; their GEMMs write them in bf16 (as autocast keeps them: half the bytes written there and read
// here), where one GEMM makes them (not the MoE's, nor the intra block's out=sep sum): the mixers' and
// swiglu_forward's out16, which they return when used; ffo16 records it for the next block's first norm.
template <typename T>
void block_forward(T* y, GpuBlockActs<T>& acts, T* x, const BlockParams<T>& p, const BlockConfig& c, int B, int T_,
                   cudaStream_t stream = 0, const GpuBlockActs<T>* prev = nullptr, bool write_y = true) {
    const int N = B * T_, D = c.d_model;
    const size_t ND = (size_t)N * D;
    // bf16 runs: the two norms' outputs are only matmul inputs (the mixer's input projections, the SwiGLU's W1 and
    // W3), so the norms write them in bf16 (kernels/matmul.cuh's bf16_view), rounded once for the forward and the
    // backward both; the MoE reads n2 in fp32
    bf16* n1_16 = gpu::bf16_view(acts.n1);
    if (prev)
        gpu::add_rmsnorm_forward(x, acts.n1, acts.rstd1, prev->h, prev->ffo, p.norm1, N, D, c.norm_eps, stream,
                                 n1_16, prev->ffo16);
    else gpu::rmsnorm_forward(acts.n1, acts.rstd1, x, p.norm1, N, 1, D, c.norm_eps, stream, n1_16);
    bf16* mix_view = gpu::bf16_view(acts.mix);
    const bf16* mix16 = nullptr;
    if (c.kind == 'A')
        mix16 = gpu::attn_mixer_forward(acts.mix, acts.attn, acts.n1, p.attn, c.attn, B, T_, stream, n1_16, mix_view);
    if (c.kind == 'M')
        mix16 = gpu::mamba2_mixer_forward(acts.mix, acts.ssm, acts.n1, p.ssm, c.ssm, B, T_, stream, n1_16, mix_view);
    if (c.kind == 'H')
        mix16 = gpu::intra_mixer_forward(acts.mix, acts.intra, acts.n1, p.intra, c.intra, B, T_, stream, n1_16,
                                         mix_view);
    bf16* n2_16 = c.use_moe ? nullptr : gpu::bf16_view(acts.n2);
    gpu::add_rmsnorm_forward(acts.h, acts.n2, acts.rstd2, x, acts.mix, p.norm2, N, D, c.norm_eps, stream, n2_16,
                             mix16);
    acts.ffo16 = nullptr;
    if (c.use_moe) gpu::moe_forward(acts.ffo, acts.moe, acts.n2, p.moe, acts.moe_bias, c.moe, N, stream);
    else
        acts.ffo16 = gpu::swiglu_forward(acts.ffo, acts.ffn, acts.n2, p.ffn, c.ffn, N, stream, n2_16,
                                         write_y ? nullptr : gpu::bf16_view(acts.ffo));  // (gpu::add reads fp32)
    if (write_y) gpu::add(y, acts.h, acts.ffo, ND, stream);
}

// dx (B,T,D) written; dp.* accumulate. dx may alias dy (the model passes one residual-stream gradient): dy is
// last read (added into dh) before dx is first written.
// res16 (bf16 runs; null otherwise): N·D bf16 for the residual stream's gradient rounded, which the GEMMs that take it
// as their dout (W2's, the mixer's output projection's) read instead of rounding it in a pass of their own; the norm
// backwards that make those gradients write the copies beside the fp32 ones. On entry it holds dy's copy, then dh's,
// and on exit dx's (when dx16_out: the model's first block has no GEMM after it).
// bf16 runs: the norms' input gradients (dn) are read only by the norm backwards; where one GEMM makes them (the
// FFN's with W1·W3 fused, the attention's with wq, wk, wv packed, Mamba-2's in_proj) it writes them in bf16, as
// autocast keeps them (the backwards' dinp16, returned when used).
template <typename T>
void block_backward(T* dx, BlockParams<T>& dp, const T* dy, GpuBlockActs<T>& acts, const T* x,
                    const BlockParams<T>& p, const BlockConfig& c, int B, int T_, cudaStream_t stream = 0,
                    bf16* res16 = nullptr, bool dx16_out = true) {
    const int N = B * T_, D = c.d_model;
    bf16* dn_view = gpu::bf16_view(acts.dn);
    const bf16* dn16 = nullptr;  // dn's bf16 view where its producer wrote it so
    // y = h + FFN(RMSNorm(h)):  dh = dy + RMSNorm'ᵀ FFN'ᵀ dy
    if (c.use_moe) gpu::moe_backward(acts.dn, dp.moe, dy, acts.moe, acts.n2, p.moe, c.moe, N, stream);
    else
        dn16 = gpu::swiglu_backward(acts.dn, dp.ffn, dy, acts.ffn, acts.n2, p.ffn, c.ffn, N, stream,
                                    gpu::bf16_view(acts.n2), res16, dn_view);
    // + dy; the norms' weight gradients are summed through acts.ffo, which the backward does not read (dw_part)
    gpu::rmsnorm_backward(acts.dh, dp.norm2, acts.dn, acts.h, p.norm2, acts.rstd2, N, 1, D, stream, dy, acts.ffo,
                          res16, dn16);
    // h = x + mixer(RMSNorm(x)):  dx = dh + RMSNorm'ᵀ mixer'ᵀ dh
    const bf16* n1_16 = gpu::bf16_view(acts.n1);
    dn16 = nullptr;
    if (c.kind == 'A')
        dn16 = gpu::attn_mixer_backward(acts.dn, dp.attn, acts.dh, acts.attn, acts.n1, p.attn, c.attn, B, T_, stream,
                                        n1_16, res16, dn_view);
    if (c.kind == 'M')
        dn16 = gpu::mamba2_mixer_backward(acts.dn, dp.ssm, acts.dh, acts.ssm, acts.n1, p.ssm, c.ssm, B, T_, stream,
                                          n1_16, res16, dn_view);
    if (c.kind == 'H')  // (both branches' input gradients summed in fp32)
        gpu::intra_mixer_backward(acts.dn, dp.intra, acts.dh, acts.intra, acts.n1, p.intra, c.intra, B, T_, stream,
                                  n1_16, res16);
    gpu::rmsnorm_backward(dx, dp.norm1, acts.dn, x, p.norm1, acts.rstd1, N, 1, D, stream, acts.dh, acts.ffo,
                          dx16_out ? res16 : nullptr, dn16);  // + dh
}

}  // namespace hl::gpu
