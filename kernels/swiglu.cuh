// swiglu.cuh — GPU mirror of model/swiglu.h: out = W2 · (SiLU(W1·m) ⊙ W3·m).
//
// The host structs and layouts of model/swiglu.h (SwiGLUConfig, SwiGLUParams, SwiGLUActs, swiglu_params,
// swiglu_acts) are used as they are: an Arena<float> over a device pointer only does pointer arithmetic,
// so the same functions carve views out of a device allocation. The three projections go through
// kernels/matmul.cuh (cuBLAS); the elementwise gate is ours, one thread per element.
#pragma once
#include <cstddef>              // size_t
#include "kernels/common.cuh"   // cudaCheckLast, dev_silu, dev_silu_grad, elementwise_grid
#include "kernels/matmul.cuh"   // matmul_forward/backward, bf16_operand (W1 and W3 share one rounded input), bf16_view
#include "model/swiglu.h"       // SwiGLUConfig, SwiGLUParams, SwiGLUActs, swiglu_check

namespace hl::gpu {

// h (N·F) = SiLU(h1) ⊙ h3. Grid-stride (memory-bound: 3 streams, coalesced), four elements a thread on
// [0, 4·n4) (vec4_count), one on the rest. O: T, or bf16 when h is only a bf16 matmul operand (swiglu_forward under
// bf16 operands).
template <typename T, typename O>
__global__ void swiglu_gate_forward_kernel(O* h, const T* h1, const T* h3, size_t total, size_t n4) {
    const size_t i0 = blockIdx.x * (size_t)blockDim.x + threadIdx.x, stride = (size_t)gridDim.x * blockDim.x;
    auto gate = [](float x1, float x3) { return dev_silu(x1) * x3; };
    for (size_t q = i0; q < n4; q += stride) st4(h, q, map4(ld4(h1, q), ld4(h3, q), gate));
    for (size_t i = 4 * n4 + i0; i < total; i += stride) h[i] = O(gate(float(h1[i]), float(h3[i])));
}

// dh1 = dh ⊙ h3 ⊙ SiLU'(h1),  dh3 = dh ⊙ SiLU(h1): (N·F) each, written, as O (T, or bf16 as above). Same mapping as
// the forward.
template <typename T, typename O>
__global__ void swiglu_gate_backward_kernel(O* dh1, O* dh3, const T* dh, const T* h1, const T* h3, size_t total,
                                            size_t n4) {
    const size_t i0 = blockIdx.x * (size_t)blockDim.x + threadIdx.x, stride = (size_t)gridDim.x * blockDim.x;
    for (size_t q = i0; q < n4; q += stride) {
        const float4 g = ld4(dh, q), x = ld4(h1, q), x3 = ld4(h3, q);
        st4(dh1, q, map4(map4(g, x3, [](float a, float b) { return a * b; }), x,
                         [](float gx3, float x1) { return gx3 * dev_silu_grad(x1); }));
        st4(dh3, q, map4(g, x, [](float a, float x1) { return a * dev_silu(x1); }));
    }
    for (size_t i = 4 * n4 + i0; i < total; i += stride) {
        const float g = float(dh[i]), x = float(h1[i]);
        dh1[i] = O(g * float(h3[i]) * dev_silu_grad(x));
        dh3[i] = O(g * dev_silu(x));
    }
}

// The launches: the grid covers the groups of four where the vector path is taken.
template <typename T, typename O>
void swiglu_gate_forward(O* h, const T* h1, const T* h3, size_t total, cudaStream_t stream) {
    const size_t n4 = vec4_count(total, h, h1, h3);
    swiglu_gate_forward_kernel<<<elementwise_grid(n4 ? n4 : total, 256), 256, 0, stream>>>(h, h1, h3, total, n4);
    cudaCheckLast();
}
template <typename T, typename O>
void swiglu_gate_backward(O* dh1, O* dh3, const T* dh, const T* h1, const T* h3, size_t total, cudaStream_t stream) {
    const size_t n4 = vec4_count(total, dh1, dh3, dh, h1, h3);
    swiglu_gate_backward_kernel<<<elementwise_grid(n4 ? n4 : total, 256), 256, 0, stream>>>(dh1, dh3, dh, h1, h3,
                                                                                            total, n4);
    cudaCheckLast();
}

// Under bf16 operands, h, dh1 and dh3 are used only as matmul operands, which are rounded to bf16 anyway: the gate
// kernels write them in bf16 straight away (bf16_view: into the first half of their fp32 buffers acts.h, acts.dh1,
// acts.dh3), instead of writing fp32 and rounding each into scratch before its GEMM: h is rounded once, for W2's
// forward and dW2 both, and neither gradient is written in fp32. And h1, h3 and dh, which only the gate kernels read,
// come out of their GEMMs in bf16 (out16, dinp16; into acts.h1, acts.h3, acts.dh the same way), as under PyTorch's
// autocast: the gate kernels then move 6 bytes an element forward and 10 backward, not 10 and 16. These are the
// largest tensors of a block ((N, d_ff) each).
// out (N, D) = W2 · (SiLU(W1·inp) ⊙ W3·inp); acts.h1, acts.h3, acts.h are written (saved for the backward). inp16:
// inp in bf16 when the caller has it (the block's norm writes it so), else it is rounded here; the same in the
// backward.
template <typename T>
void swiglu_forward(T* out, SwiGLUActs<T>& acts, const T* inp, const SwiGLUParams<T>& p, const SwiGLUConfig& cfg,
                    int N, cudaStream_t stream = 0, const bf16* inp16 = nullptr) {
    swiglu_check(cfg);
    HL_CHECK(N >= 0, "swiglu: bad row count N=", N);
    if (N == 0) return;
    const int D = cfg.d_model, F = cfg.d_ff;
    if (!inp16) inp16 = bf16_operand(inp, size_t(N) * D, stream);  // (bf16 runs: rounded once for W1 and W3)
    const size_t NF = (size_t)N * F;
    bf16 *h16 = bf16_view(acts.h), *h1_16 = bf16_view(acts.h1), *h3_16 = bf16_view(acts.h3);
    matmul_forward(acts.h1, inp, p.w1, (const T*)nullptr, N, D, F, stream, inp16, h1_16);  // (N, F)
    matmul_forward(acts.h3, inp, p.w3, (const T*)nullptr, N, D, F, stream, inp16, h3_16);  // (N, F)
    if (h16) swiglu_gate_forward(h16, h1_16, h3_16, NF, stream);
    else swiglu_gate_forward(acts.h, acts.h1, acts.h3, NF, stream);
    matmul_forward(out, acts.h, p.w2, (const T*)nullptr, N, F, D, stream, h16);  // (N, D)
}

// dinp (N, D) is written; dp.w1, dp.w3, dp.w2 accumulate (+=). acts.dh, dh1, dh3 are workspace (not
// scratch_dinp, which the CPU needs: here the W3 path's GEMM adds into dinp itself, beta = 1). With h = SiLU(h1) ⊙ h3:
//   dh  = dout · W2                      dW2 += doutᵀ · h
//   dh1 = dh ⊙ h3 ⊙ SiLU'(h1)            dh3 = dh ⊙ SiLU(h1)
//   dinp = dh1 · W1 + dh3 · W3           dW1 += dh1ᵀ · inp,  dW3 += dh3ᵀ · inp
template <typename T>
void swiglu_backward(T* dinp, SwiGLUParams<T>& dp, const T* dout, SwiGLUActs<T>& acts, const T* inp,
                     const SwiGLUParams<T>& p, const SwiGLUConfig& cfg, int N, cudaStream_t stream = 0,
                     const bf16* inp16 = nullptr) {
    swiglu_check(cfg);
    HL_CHECK(N >= 0, "swiglu: bad row count N=", N);
    if (N == 0) return;
    const int D = cfg.d_model, F = cfg.d_ff;
    bf16 *h16 = bf16_view(acts.h), *dh1_16 = bf16_view(acts.dh1), *dh3_16 = bf16_view(acts.dh3);
    bf16 *h1_16 = bf16_view(acts.h1), *h3_16 = bf16_view(acts.h3), *dh16 = bf16_view(acts.dh);
    matmul_backward(acts.dh, dp.w2, (T*)nullptr, dout, acts.h, p.w2, N, F, D, stream, false, h16, nullptr,
                    dh16);  // dh (N, F)
    const size_t NF = (size_t)N * F;
    if (h16) swiglu_gate_backward(dh1_16, dh3_16, dh16, h1_16, h3_16, NF, stream);
    else swiglu_gate_backward(acts.dh1, acts.dh3, acts.dh, acts.h1, acts.h3, NF, stream);
    if (!inp16) inp16 = bf16_operand(inp, size_t(N) * D, stream);
    matmul_backward(dinp, dp.w1, (T*)nullptr, acts.dh1, inp, p.w1, N, D, F, stream, false, inp16, dh1_16);  // W1 path
    matmul_backward(dinp, dp.w3, (T*)nullptr, acts.dh3, inp, p.w3, N, D, F, stream, true, inp16, dh3_16);   // W3, added
}

}  // namespace hl::gpu
