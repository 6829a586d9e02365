// swiglu.cuh — GPU mirror of model/swiglu.h: out = W2 · (SiLU(W1·m) ⊙ W3·m).
//
// The host structs and layouts of model/swiglu.h (SwiGLUConfig, SwiGLUParams, SwiGLUActs, swiglu_params,
// swiglu_acts) are used as they are: an Arena<float> over a device pointer only does pointer arithmetic,
// so the same functions carve views out of a device allocation. The three projections go through
// kernels/matmul.cuh (cuBLAS); the elementwise gate is ours, one thread per element.
#pragma once
#include <cstddef>              // size_t
#include "kernels/common.cuh"   // cudaCheckLast, dev_silu, dev_silu_grad, elementwise_grid
#include "kernels/matmul.cuh"   // matmul_forward/backward, bf16_operand: W1 and W3 share one rounded input
#include "model/swiglu.h"       // SwiGLUConfig, SwiGLUParams, SwiGLUActs, swiglu_check

namespace hl::gpu {

// h (N·F) = SiLU(h1) ⊙ h3. Grid-stride, one thread per element (memory-bound: 3 streams, coalesced).
template <typename T>
__global__ void swiglu_gate_forward_kernel(T* h, const T* h1, const T* h3, size_t total) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x)
        h[i] = T(dev_silu(float(h1[i])) * float(h3[i]));
}

// dh1 = dh ⊙ h3 ⊙ SiLU'(h1),  dh3 = dh ⊙ SiLU(h1): (N·F) each, written. Same mapping as the forward.
template <typename T>
__global__ void swiglu_gate_backward_kernel(T* dh1, T* dh3, const T* dh, const T* h1, const T* h3, size_t total) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const float g = float(dh[i]), x = float(h1[i]);
        dh1[i] = T(g * float(h3[i]) * dev_silu_grad(x));
        dh3[i] = T(g * dev_silu(x));
    }
}

// out (N, D) = W2 · (SiLU(W1·inp) ⊙ W3·inp); acts.h1, acts.h3, acts.h are written (saved for the backward).
template <typename T>
void swiglu_forward(T* out, SwiGLUActs<T>& acts, const T* inp, const SwiGLUParams<T>& p, const SwiGLUConfig& cfg,
                    int N, cudaStream_t stream = 0) {
    swiglu_check(cfg);
    HL_CHECK(N >= 0, "swiglu: bad row count N=", N);
    if (N == 0) return;
    const int D = cfg.d_model, F = cfg.d_ff;
    const bf16* inp16 = bf16_operand(inp, size_t(N) * D, stream);  // (bf16 runs: rounded once for W1 and W3)
    matmul_forward(acts.h1, inp, p.w1, (const T*)nullptr, N, D, F, stream, inp16);  // (N, F)
    matmul_forward(acts.h3, inp, p.w3, (const T*)nullptr, N, D, F, stream, inp16);  // (N, F)
    const size_t NF = (size_t)N * F;
    swiglu_gate_forward_kernel<<<elementwise_grid(NF, 256), 256, 0, stream>>>(acts.h, acts.h1, acts.h3, NF);
    cudaCheckLast();
    matmul_forward(out, acts.h, p.w2, (const T*)nullptr, N, F, D, stream);  // (N, D)
}

// dinp (N, D) is written; dp.w1, dp.w3, dp.w2 accumulate (+=). acts.dh, dh1, dh3 are workspace (not
// scratch_dinp, which the CPU needs: here the W3 path's GEMM adds into dinp itself, beta = 1). With h = SiLU(h1) ⊙ h3:
//   dh  = dout · W2                      dW2 += doutᵀ · h
//   dh1 = dh ⊙ h3 ⊙ SiLU'(h1)            dh3 = dh ⊙ SiLU(h1)
//   dinp = dh1 · W1 + dh3 · W3           dW1 += dh1ᵀ · inp,  dW3 += dh3ᵀ · inp
template <typename T>
void swiglu_backward(T* dinp, SwiGLUParams<T>& dp, const T* dout, SwiGLUActs<T>& acts, const T* inp,
                     const SwiGLUParams<T>& p, const SwiGLUConfig& cfg, int N, cudaStream_t stream = 0) {
    swiglu_check(cfg);
    HL_CHECK(N >= 0, "swiglu: bad row count N=", N);
    if (N == 0) return;
    const int D = cfg.d_model, F = cfg.d_ff;
    matmul_backward(acts.dh, dp.w2, (T*)nullptr, dout, acts.h, p.w2, N, F, D, stream);  // dh (N, F)
    const size_t NF = (size_t)N * F;
    swiglu_gate_backward_kernel<<<elementwise_grid(NF, 256), 256, 0, stream>>>(acts.dh1, acts.dh3, acts.dh, acts.h1, acts.h3,
                                                                     NF);
    cudaCheckLast();
    const bf16* inp16 = bf16_operand(inp, size_t(N) * D, stream);
    matmul_backward(dinp, dp.w1, (T*)nullptr, acts.dh1, inp, p.w1, N, D, F, stream, false, inp16);  // W1 path
    matmul_backward(dinp, dp.w3, (T*)nullptr, acts.dh3, inp, p.w3, N, D, F, stream, true, inp16);   // W3, added
}

}  // namespace hl::gpu
