// swiglu.cuh — GPU mirror of model/swiglu.h: out = W2 · (SiLU(W1·m) ⊙ W3·m).
//
// The host structs and layouts of model/swiglu.h (SwiGLUConfig, SwiGLUParams, SwiGLUActs, swiglu_params,
// swiglu_acts) are used as they are: an Arena<float> over a device pointer only does pointer arithmetic,
// so the same functions carve views out of a device allocation. The three projections go through
// kernels/matmul.cuh (cuBLAS); the elementwise gate is ours, one thread per element.
#pragma once
#include <algorithm>            // std::min
#include <cstddef>              // size_t
#include <cstdint>              // uintptr_t (the gate kernels' alignment test)
#include <type_traits>          // std::is_same_v
#include "kernels/common.cuh"   // cudaCheckLast, dev_silu, dev_silu_grad, elementwise_grid, ldv, stv
#include "kernels/matmul.cuh"   // matmul_forward/backward, bf16_operand (W1 and W3 share one rounded input), bf16_view
#include "model/swiglu.h"       // SwiGLUConfig, SwiGLUParams, SwiGLUActs, swiglu_check

namespace hl::gpu {

// h (rows, F) = SiLU(h1) ⊙ h3, h packed, h1 and h3 with their rows ld elements apart (ld = F: packed; ld = 2F: the two
// halves of one GEMM output, see swiglu_w13_fused). Block row y takes rows y, y + gridDim.y, …; in a row, threads
// stride the columns, V a thread (ldv/stv: 8 → 16-byte accesses of bf16, 4 → float4 / 8-byte bf16), then one a
// thread for the rest. Memory-bound: 3 coalesced streams. (A flat index split into row and column by a 64-bit
// division a group cost 20% more time than the GEMM halves saved. At 100m under bf16, 8 a thread against 4: 88 → 84 µs
// forward, 130 → 120 µs backward, ncu at the GPU's clocks.) O: T, or bf16 when h is only a bf16 matmul operand.
template <typename T, typename O, int V>
__global__ void swiglu_gate_forward_kernel(O* h, const T* h1, const T* h3, size_t rows, size_t F, size_t ld) {
    const size_t c0 = blockIdx.x * (size_t)blockDim.x + threadIdx.x, stride = (size_t)gridDim.x * blockDim.x;
    const size_t FV = F / V;
    for (size_t r = blockIdx.y; r < rows; r += gridDim.y) {
        const T *a = h1 + r * ld, *b = h3 + r * ld;  // (F)
        O* o = h + r * F;                             // (F)
        for (size_t q = c0; q < FV; q += stride) {
            float x1[V], x3[V], y[V];
            ldv(a + q * V, x1);
            ldv(b + q * V, x3);
#pragma unroll
            for (int j = 0; j < V; j++) y[j] = dev_silu(x1[j]) * x3[j];
            stv(o + q * V, y);
        }
        for (size_t i = V * FV + c0; i < F; i += stride) o[i] = O(dev_silu(float(a[i])) * float(b[i]));
    }
}

// dh1 = dh ⊙ h3 ⊙ SiLU'(h1),  dh3 = dh ⊙ SiLU(h1): (rows, F) each, written, as O (T, or bf16 as above); dh packed,
// the others with row stride ld. Same mapping as the forward.
template <typename T, typename O, int V>
__global__ void swiglu_gate_backward_kernel(O* dh1, O* dh3, const T* dh, const T* h1, const T* h3, size_t rows,
                                            size_t F, size_t ld) {
    const size_t c0 = blockIdx.x * (size_t)blockDim.x + threadIdx.x, stride = (size_t)gridDim.x * blockDim.x;
    const size_t FV = F / V;
    for (size_t r = blockIdx.y; r < rows; r += gridDim.y) {
        const T *g_ = dh + r * F, *a = h1 + r * ld, *b = h3 + r * ld;  // (F)
        O *d1 = dh1 + r * ld, *d3 = dh3 + r * ld;                       // (F)
        for (size_t q = c0; q < FV; q += stride) {
            float g[V], x1[V], x3[V], y1[V], y3[V];
            ldv(g_ + q * V, g);
            ldv(a + q * V, x1);
            ldv(b + q * V, x3);
#pragma unroll
            for (int j = 0; j < V; j++) {
                y1[j] = g[j] * x3[j] * dev_silu_grad(x1[j]);
                y3[j] = g[j] * dev_silu(x1[j]);
            }
            stv(d1 + q * V, y1);
            stv(d3 + q * V, y3);
        }
        for (size_t i = V * FV + c0; i < F; i += stride) {
            const float g = float(g_[i]), x = float(a[i]);
            d1[i] = O(g * float(b[i]) * dev_silu_grad(x));
            d3[i] = O(g * dev_silu(x));
        }
    }
}

// The launch grid of the gate kernels over rows of F elements, V a thread: a packed tensor (one long row) is strided by
// the whole grid; rows are spread over the grid's y (each row's groups over x).
inline dim3 swiglu_gate_grid(size_t rows, size_t F, int V) {
    const size_t per_row = F / V;  // threads a row wants
    if (rows == 1) return dim3(elementwise_grid(per_row, 256));
    return dim3((unsigned)((per_row + 255) / 256), (unsigned)std::min(rows, (size_t)65535));
}

// The elements a thread of the gate kernels takes: 8 where every row start is 16-byte aligned, else 4 where it is
// aligned for ld4/st4, else 1.
template <typename... P>
int swiglu_gate_width(size_t total, size_t F, size_t ld, const P*... p) {
    auto rows_allow = [&](size_t v) { return F == total ? total >= v : F % v == 0 && ld % v == 0; };
    if (rows_allow(8) && ((p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0) && ...)) return 8;
    if (rows_allow(4) && vec4_aligned(p...)) return 4;
    return 1;
}

// F, ld: rows of F elements ld apart in h1, h3 (dh1, dh3); 0 = packed (the whole tensor one row).
template <typename T, typename O>
void swiglu_gate_forward(O* h, const T* h1, const T* h3, size_t total, cudaStream_t stream, size_t F = 0,
                         size_t ld = 0) {
    if (total == 0) return;
    if (F == 0) F = ld = total;
    const int V = swiglu_gate_width(total, F, ld, h, h1, h3);
    auto launch = [&](auto kernel) {
        kernel<<<swiglu_gate_grid(total / F, F, V), 256, 0, stream>>>(h, h1, h3, total / F, F, ld);
        cudaCheckLast();
    };
    if (V == 8) launch(swiglu_gate_forward_kernel<T, O, 8>);
    else if (V == 4) launch(swiglu_gate_forward_kernel<T, O, 4>);
    else launch(swiglu_gate_forward_kernel<T, O, 1>);
}
template <typename T, typename O>
void swiglu_gate_backward(O* dh1, O* dh3, const T* dh, const T* h1, const T* h3, size_t total, cudaStream_t stream,
                          size_t F = 0, size_t ld = 0) {
    if (total == 0) return;
    if (F == 0) F = ld = total;
    const int V = swiglu_gate_width(total, F, ld, dh1, dh3, dh, h1, h3);
    auto launch = [&](auto kernel) {
        kernel<<<swiglu_gate_grid(total / F, F, V), 256, 0, stream>>>(dh1, dh3, dh, h1, h3, total / F, F, ld);
        cudaCheckLast();
    };
    if (V == 8) launch(swiglu_gate_backward_kernel<T, O, 8>);
    else if (V == 4) launch(swiglu_gate_backward_kernel<T, O, 4>);
    else launch(swiglu_gate_backward_kernel<T, O, 1>);
}

// Whether W1 and W3 run as one GEMM of a (2F, D) weight: under bf16 operands, with W3 stored right after W1 (as
// swiglu_params lays them out). Then h1 and h3 come out as the halves of each row of one (N, 2F) bf16 tensor in
// acts.h1's buffer (bf16_view: exactly its size), and in the backward dh1, dh3 likewise in acts.dh1's, so that
// dinp = [dh1 dh3] · [W1; W3] and [dW1; dW3] += [dh1 dh3]ᵀ · inp are one GEMM each too (K = 2F; no beta = 1 pass).
// Three GEMMs instead of six at the sizes of a block's largest.
template <typename T>
bool swiglu_w13_fused(const SwiGLUParams<T>& p, const SwiGLUConfig& cfg) {
    return std::is_same_v<T, float> && current_bf16() != nullptr && p.w3 == p.w1 + (size_t)cfg.d_ff * cfg.d_model;
}

// Lays out SwiGLUActs for the GPU (model/swiglu.h's swiglu_acts less its scratch_dinp, which only the CPU uses). Under
// a Bf16Scope (lay out under the scope the layer will run in) the weights are taken to be swiglu_params' (W3 right
// after W1: swiglu_w13_fused; swiglu_forward checks it): h1 then holds the (N, 2F) bf16 product of [W1; W3] (its full
// size), dh1 its gradient likewise, h and dh are bf16 only (half the floats) and h3, dh3 are not laid out (null).
inline SwiGLUActs<float> gpu_swiglu_acts(Arena<float>& a, const SwiGLUConfig& cfg, int N) {
    swiglu_check(cfg);
    HL_CHECK(N > 0, "swiglu: need N > 0 rows for activations, got ", N);
    const bool bf16 = current_bf16() != nullptr;
    SwiGLUActs<float> s{};
    s.h1 = a.take("h1", {N, cfg.d_ff});
    if (!bf16) s.h3 = a.take("h3", {N, cfg.d_ff});
    s.h = a.take("h", bf16_only_shape({N, cfg.d_ff}, bf16));
    s.dh1 = a.take_scratch("dh1", {N, cfg.d_ff});
    if (!bf16) s.dh3 = a.take_scratch("dh3", {N, cfg.d_ff});
    s.dh = a.take_scratch("dh", bf16_only_shape({N, cfg.d_ff}, bf16));
    return s;
}

// Under bf16 operands, h, dh1 and dh3 are used only as matmul operands, which are rounded to bf16 anyway: the gate
// kernels write them in bf16 straight away (bf16_view: into their buffers acts.h, acts.dh1, acts.dh3), instead of
// writing fp32 and rounding each into scratch before its GEMM: h is rounded once, for W2's
// forward and dW2 both, and neither gradient is written in fp32. And h1, h3 and dh, which only the gate kernels read,
// come out of their GEMMs in bf16 (out16, dinp16; into acts.h1, acts.h3, acts.dh the same way), as under PyTorch's
// autocast: the gate kernels then move 6 bytes an element forward and 10 backward, not 10 and 16. These are the
// largest tensors of a block ((N, d_ff) each).
// out (N, D) = W2 · (SiLU(W1·inp) ⊙ W3·inp); acts.h1, acts.h3, acts.h are written (saved for the backward). inp16:
// inp in bf16 when the caller has it (the block's norm writes it so), else it is rounded here; the same in the
// backward. out16 (bf16 runs; or null): out's bf16 view, where W2's GEMM writes it instead (its one reader, the next
// norm, adds it into the residual stream, as autocast keeps it); returned.
template <typename T>
const bf16* swiglu_forward(T* out, SwiGLUActs<T>& acts, const T* inp, const SwiGLUParams<T>& p,
                           const SwiGLUConfig& cfg, int N, cudaStream_t stream = 0, const bf16* inp16 = nullptr,
                           bf16* out16 = nullptr) {
    swiglu_check(cfg);
    HL_CHECK(N >= 0, "swiglu: bad row count N=", N);
    if (N == 0) return out16;
    const int D = cfg.d_model, F = cfg.d_ff;
    if (!inp16) inp16 = bf16_operand(inp, size_t(N) * D, stream);  // (bf16 runs: rounded once for W1 and W3)
    const size_t NF = (size_t)N * F;
    bf16 *h16 = bf16_view(acts.h), *h1_16 = bf16_view(acts.h1), *h3_16 = bf16_view(acts.h3);
    HL_CHECK(acts.h3 || swiglu_w13_fused(p, cfg), "swiglu: activations laid out for bf16 with W1·W3 fused (no h3), "
             "but ", current_bf16() ? "W3 does not follow W1" : "no bf16 operands are in effect");
    if (swiglu_w13_fused(p, cfg)) {  // h13 (N, 2F) = inp · [W1; W3]ᵀ, row n = [h1[n] h3[n]]
        matmul_forward(acts.h1, inp, p.w1, (const T*)nullptr, N, D, 2 * F, stream, inp16, h1_16);
        swiglu_gate_forward(h16, h1_16, h1_16 + F, NF, stream, F, 2 * F);
    } else {
        matmul_forward(acts.h1, inp, p.w1, (const T*)nullptr, N, D, F, stream, inp16, h1_16);  // (N, F)
        matmul_forward(acts.h3, inp, p.w3, (const T*)nullptr, N, D, F, stream, inp16, h3_16);  // (N, F)
        if (h16) swiglu_gate_forward(h16, h1_16, h3_16, NF, stream);
        else swiglu_gate_forward(acts.h, acts.h1, acts.h3, NF, stream);
    }
    matmul_forward(out, acts.h, p.w2, (const T*)nullptr, N, F, D, stream, h16, out16);  // (N, D)
    return out16;
}

// dinp (N, D) is written; dp.w1, dp.w3, dp.w2 accumulate (+=). acts.dh, dh1, dh3 are workspace (not
// scratch_dinp, which the CPU needs: here the W3 path's GEMM adds into dinp itself, beta = 1). With h = SiLU(h1) ⊙ h3:
//   dh  = dout · W2                      dW2 += doutᵀ · h
//   dh1 = dh ⊙ h3 ⊙ SiLU'(h1)            dh3 = dh ⊙ SiLU(h1)
//   dinp = dh1 · W1 + dh3 · W3           dW1 += dh1ᵀ · inp,  dW3 += dh3ᵀ · inp
// dout16: dout in bf16 for W2's GEMM (matmul_backward's), from its producer, or null. dinp16 (bf16 runs; or null):
// dinp's bf16 view, offered for where dinp comes out of one GEMM (W1·W3 fused): then written there in bf16 instead
// and dinp16 returned; else null (dinp in fp32).
template <typename T>
const bf16* swiglu_backward(T* dinp, SwiGLUParams<T>& dp, const T* dout, SwiGLUActs<T>& acts, const T* inp,
                            const SwiGLUParams<T>& p, const SwiGLUConfig& cfg, int N, cudaStream_t stream = 0,
                            const bf16* inp16 = nullptr, const bf16* dout16 = nullptr, bf16* dinp16 = nullptr) {
    swiglu_check(cfg);
    HL_CHECK(N >= 0, "swiglu: bad row count N=", N);
    if (N == 0) return nullptr;
    const int D = cfg.d_model, F = cfg.d_ff;
    bf16 *h16 = bf16_view(acts.h), *dh1_16 = bf16_view(acts.dh1), *dh3_16 = bf16_view(acts.dh3);
    bf16 *h1_16 = bf16_view(acts.h1), *h3_16 = bf16_view(acts.h3), *dh16 = bf16_view(acts.dh);
    matmul_backward(acts.dh, dp.w2, (T*)nullptr, dout, acts.h, p.w2, N, F, D, stream, false, h16, dout16,
                    dh16);  // dh (N, F)
    const size_t NF = (size_t)N * F;
    if (!inp16) inp16 = bf16_operand(inp, size_t(N) * D, stream);
    if (swiglu_w13_fused(p, cfg)) {  // dh13 (N, 2F) = [dh1 dh3]; both products over K = 2F at once
        HL_CHECK(dp.w3 == dp.w1 + (size_t)F * D, "swiglu: the gradients' W3 does not follow W1 as the weights' does");
        swiglu_gate_backward(dh1_16, dh1_16 + F, dh16, h1_16, h1_16 + F, NF, stream, F, 2 * F);
        matmul_backward(dinp, dp.w1, (T*)nullptr, acts.dh1, inp, p.w1, N, D, 2 * F, stream, false, inp16, dh1_16,
                        dinp16);
        return dinp16;
    }
    if (h16) swiglu_gate_backward(dh1_16, dh3_16, dh16, h1_16, h3_16, NF, stream);
    else swiglu_gate_backward(acts.dh1, acts.dh3, acts.dh, acts.h1, acts.h3, NF, stream);
    matmul_backward(dinp, dp.w1, (T*)nullptr, acts.dh1, inp, p.w1, N, D, F, stream, false, inp16, dh1_16);  // W1 path
    matmul_backward(dinp, dp.w3, (T*)nullptr, acts.dh3, inp, p.w3, N, D, F, stream, true, inp16, dh3_16);   // W3, added
    return nullptr;
}

}  // namespace hl::gpu
