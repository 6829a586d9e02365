// matmul.cuh — GPU mirror of model/matmul.h: out = inp · Wᵀ (+ bias) and its backward, through cuBLAS.
//
// The device helpers every kernel file shares (dev_silu, warp_sum, elementwise_grid, colsum, ...) live in
// kernels/common.cuh; matmul's bias gradient uses colsum from there.
//
// Conventions of every host function in kernels/ written with it (matmul, rmsnorm, embedding, swiglu,
// crossentropy, adamw, conv1d): the CPU function's name and arguments, then a trailing
// `cudaStream_t stream = 0`; no allocation or synchronisation inside; parameter gradients +=.
//
// Row-major vs cuBLAS: cuBLAS is column-major, and a row-major (R, C) matrix is the same bytes as a
// column-major (C, R) one, i.e. its transpose. So every row-major product X = A·B below is issued as the
// column-major product Xᵀ = Bᵀ·Aᵀ, which swaps the operand order; the comments write out each case.
//
// fp32 must match the CPU to ~1e-5, so the handle uses CUBLAS_DEFAULT_MATH and every GEMM asks for
// CUBLAS_COMPUTE_32F: no TF32 tensor cores (those round the inputs to 10 mantissa bits).
//
// bf16 operands (train_gpu --precision bf16; section "bf16 operands" below): while a Bf16Scope is open, every
// GEMM here takes its two operands in bf16 and runs on the tensor cores with fp32 accumulation, writing (or
// accumulating into) the same fp32 outputs. The weight comes from a bf16 copy of the model's parameters, the
// activation operand (inp, or dout in the backward) is rounded into a scratch buffer just before its GEMM, unless the
// caller passes it in bf16 (inp16, dout16). Activations, gradients, master weights and AdamW stay fp32, except the
// tensors that are only ever matmul operands: their producers write them in bf16 once (bf16_view, in half the
// memory: bf16_only_shape; the blocks' two norm outputs, the SwiGLU's h and its gate's gradients, Mamba-2's gated
// norm output; and beside its fp32 values, the residual stream's gradient, which the norm backwards also write in
// bf16: block_backward's res16), which spares
// a rounding pass before the forward's GEMM and another before the backward's (100m, H200: 6.6-8.7% more tokens/s;
// the residual gradient's: +1.1% on the 100m transformer). Likewise a GEMM output that only elementwise kernels, a
// norm or the attention read is written by the GEMM in bf16 (out16, dinp16), as autocast keeps it, so its readers
// read half the bytes and the GEMM writes half: the SwiGLU's h1, h3 and dh; the attention's q, k, v and dy; the
// blocks' mixer and FFN outputs and the norms' input gradients; Mamba-2's in_proj output (block.cuh, attention.cuh,
// mamba2.cuh say where). The
// tensor-core attention and SSD kernels round their own operands (kernels/attention.cuh, kernels/ssd.cuh);
// bf16_operand lets one rounded input serve several GEMMs.
#pragma once
#include <climits>          // INT_MAX
#include <cstdio>           // std::fprintf
#include <cstdlib>          // std::exit
#include <cstdint>          // uintptr_t
#include <type_traits>      // std::is_same_v: bf16 operands in the fp32 instantiation only
#include <vector>           // std::vector: bf16_only_shape
#include <cublas_v2.h>      // cublasHandle_t, cublasGemmEx, cublasGetStatusString
#include <cuda_bf16.h>      // __nv_bfloat16, __float2bfloat16_rn: the bf16 operands
#include "kernels/common.cuh"  // cudaCheck, cudaCheckLast, elementwise_grid, colsum, RowsTerm
#include "model/common.h"      // HL_CHECK

namespace hl::gpu {

// ---------------------------------------------------------------------------------------------------
// cuBLAS handle and error check

inline void cublas_check(cublasStatus_t s, const char* file, int line) {
    if (s != CUBLAS_STATUS_SUCCESS) {
        std::fprintf(stderr, "error: cuBLAS %s at %s:%d\n", cublasGetStatusString(s), file, line);
        std::exit(1);
    }
}
#define cublasCheck(call) ::hl::gpu::cublas_check((call), __FILE__, __LINE__)

// The process-wide handle, created on first use (that first call allocates cuBLAS's workspace: call
// cublas() once at startup to keep it out of the first timed step). It is never destroyed; the driver
// reclaims it at exit. Each matmul sets the handle's stream to its own stream argument (default 0) first.
inline cublasHandle_t cublas() {
    static cublasHandle_t handle = [] {
        cublasHandle_t h;
        cublasCheck(cublasCreate(&h));
        cublasCheck(cublasSetMathMode(h, CUBLAS_DEFAULT_MATH));  // no TF32: fp32 results match the CPU
        return h;
    }();
    return handle;
}

// The cudaDataType of an element type, for cublasGemmEx.
template <typename T> struct CublasType;
template <> struct CublasType<float> { static constexpr cudaDataType_t value = CUDA_R_32F; };
template <> struct CublasType<__nv_bfloat16> { static constexpr cudaDataType_t value = CUDA_R_16BF; };

// ---------------------------------------------------------------------------------------------------
// bf16 operands

using bf16 = __nv_bfloat16;

// out (n) = in rounded to the nearest bf16. Grid-stride, four elements a thread per iteration (float4 loads)
// when both pointers allow it.
template <typename Unused = void>
__global__ void round_bf16_kernel(bf16* out, const float* in, size_t n) {
    const size_t stride = (size_t)gridDim.x * blockDim.x, first = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    const bool vec = (reinterpret_cast<uintptr_t>(in) % 16 == 0) && (reinterpret_cast<uintptr_t>(out) % 8 == 0);
    size_t done = 0;
    if (vec) {
        const size_t n4 = n / 4;
        for (size_t i = first; i < n4; i += stride) {
            const float4 x = reinterpret_cast<const float4*>(in)[i];
            __nv_bfloat162 lo = __floats2bfloat162_rn(x.x, x.y), hi = __floats2bfloat162_rn(x.z, x.w);
            reinterpret_cast<__nv_bfloat162*>(out)[2 * i] = lo;
            reinterpret_cast<__nv_bfloat162*>(out)[2 * i + 1] = hi;
        }
        done = n4 * 4;
    }
    for (size_t i = done + first; i < n; i += stride) out[i] = __float2bfloat16_rn(in[i]);
}

inline void round_bf16(bf16* out, const float* in, size_t n, cudaStream_t stream = 0) {
    if (n == 0) return;
    round_bf16_kernel<><<<elementwise_grid((n + 3) / 4, 256), 256, 0, stream>>>(out, in, n);
    cudaCheckLast();
}

// out (rows, cols), rows ldo elements apart = in (rows, cols, packed) rounded to bf16: a slice of wider rows (the
// attention's dv beside dq and dk, kernels/attention.cuh). Four elements a thread (float4 loads) when cols and ldo
// are multiples of 4 and the pointers allow it.
template <typename Unused = void>
__global__ void round_bf16_rows_kernel(bf16* out, size_t ldo, const float* in, size_t rows, int cols, bool vec) {
    const int per = vec ? 4 : 1, groups = cols / per;
    const size_t n = rows * size_t(groups);
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i / size_t(groups);
        const int c = int(i - r * size_t(groups)) * per;
        if (vec) {
            st4(out + r * ldo + c, 0, ld4(in + r * size_t(cols) + c, 0));
        } else {
            out[r * ldo + c] = __float2bfloat16_rn(in[r * size_t(cols) + c]);
        }
    }
}

inline void round_bf16_rows(bf16* out, size_t ldo, const float* in, size_t rows, int cols, cudaStream_t stream = 0) {
    HL_CHECK(cols > 0 && ldo >= size_t(cols), "round_bf16_rows: ", cols, " columns in rows ", ldo, " apart");
    if (rows == 0) return;
    const bool vec = cols % 4 == 0 && ldo % 4 == 0 && vec4_aligned(in) && vec4_aligned(out);
    round_bf16_rows_kernel<><<<elementwise_grid(rows * size_t(cols) / (vec ? 4 : 1), 256), 256, 0, stream>>>(
        out, ldo, in, rows, cols, vec);
    cudaCheckLast();
}

// What the GEMMs need while a model runs with bf16 operands (kernels/model.cuh owns the buffers): params16 is
// the bf16 copy of the fp32 parameters [params, params + n) (AdamW writes it as it updates them; the model rounds
// it all at the start of a forward after any other write), a16 and b16 are scratch for the two activation operands of a GEMM, scratch_n elements each; stage
// (stage_n elements) is the tensor-core attention's bf16 copy of its inputs (attention_tc_stage_size).
struct Bf16Operands {
    const float* params = nullptr;
    size_t n = 0;
    const bf16* params16 = nullptr;
    bf16 *a16 = nullptr, *b16 = nullptr;
    size_t scratch_n = 0;
    bf16* stage = nullptr;
    size_t stage_n = 0;

    // the bf16 copy of a weight (count elements) that lies within the parameters
    const bf16* weight(const float* w, size_t count) const {
        const uintptr_t lo = reinterpret_cast<uintptr_t>(params), at = reinterpret_cast<uintptr_t>(w);
        HL_CHECK(at >= lo && at + count * sizeof(float) <= lo + n * sizeof(float),
                 "matmul (bf16 operands): the weight is not within the model's parameters");
        return params16 + (w - params);
    }
    // `in` (count elements) rounded into the scratch `dst` (a16 or b16)
    bf16* round(bf16* dst, const float* in, size_t count, cudaStream_t stream) const {
        HL_CHECK(count <= scratch_n, "matmul (bf16 operands): ", count, " elements, scratch holds ", scratch_n);
        round_bf16(dst, in, count, stream);
        return dst;
    }
};

// The operands in effect: null (fp32 GEMMs) unless a Bf16Scope is open (one per forward or backward of a model in
// bf16; they nest, the innermost wins).
inline const Bf16Operands*& current_bf16() {
    static thread_local const Bf16Operands* current = nullptr;
    return current;
}
struct Bf16Scope {
    const Bf16Operands* saved;
    explicit Bf16Scope(const Bf16Operands* b) : saved(current_bf16()) { current_bf16() = b; }
    ~Bf16Scope() { current_bf16() = saved; }
    Bf16Scope(const Bf16Scope&) = delete;
    Bf16Scope& operator=(const Bf16Scope&) = delete;
};

// The bf16 operand of an activation x (count elements), rounded into the scratch a16; null (nothing done) when no
// Bf16Scope is open. For one input that feeds several projections (q, k, v; SwiGLU's W1 and W3), pass it to each of
// their matmul calls as inp16: the input is then rounded once, not once a projection. Valid until the next call
// that rounds into a16 (a matmul given no inp16).
template <typename T>
const bf16* bf16_operand(const T* x, size_t count, cudaStream_t stream) {
    const Bf16Operands* ops = std::is_same_v<T, float> ? current_bf16() : nullptr;
    return ops ? ops->round(ops->a16, reinterpret_cast<const float*>(x), count, stream) : nullptr;
}

// A float buffer `buf` as bf16 storage, when a Bf16Scope is open (null otherwise): for a tensor that is only ever a
// matmul operand, its producer writes it in bf16 there, once, instead of fp32 that each GEMM reading it rounds into
// scratch (the fp32 values are then never in the buffer, which a model lays out with half the floats: below).
template <typename T>
bf16* bf16_view(T* buf) {
    return std::is_same_v<T, float> && current_bf16() ? reinterpret_cast<bf16*>(buf) : nullptr;
}

// The shape to lay out such a tensor with in a float arena: when bf16_only (under the Bf16Scope the model will run in,
// the predicate by which its producer and every reader take the bf16_view) it holds only bf16 values, so half the
// floats (flat); else its own. GpuModel::alloc lays out under its precision's scope (H200, B 8, T 2048: the bf16
// 100m transformer's device memory 12.16 → 8.41 GiB).
inline std::vector<int> bf16_only_shape(std::vector<int> shape, bool bf16_only) {
    if (!bf16_only) return shape;
    size_t n = 1;
    for (int d : shape) n *= size_t(d > 0 ? d : 0);
    HL_CHECK(n > 0 && (n + 1) / 2 <= (size_t)INT_MAX, "bf16_only_shape: a tensor of ", n, " elements");
    return {int((n + 1) / 2)};
}

// Scratch for a gradient (count elements) that its producer writes in bf16 straight for the next matmul_backward,
// given there as dout16 (the rounding pass that GEMM would make is then not needed): the GEMMs' own dout scratch
// b16, valid until the next matmul_backward that rounds a dout itself. Null when no Bf16Scope is open.
template <typename T>
bf16* bf16_dout_scratch(size_t count) {
    const Bf16Operands* ops = std::is_same_v<T, float> ? current_bf16() : nullptr;
    if (!ops) return nullptr;
    HL_CHECK(count <= ops->scratch_n, "matmul (bf16 operands): ", count, " elements, scratch holds ", ops->scratch_n);
    return ops->b16;
}

// One column-major GEMM C (m, n) = alpha · op(A) · op(B) + beta · C through cublasGemmEx, fp32 accumulation; the
// element types of A and B (fp32 or bf16, the same for both) and of C are given.
inline void gemm(cublasOperation_t opA, cublasOperation_t opB, int m, int n, int k, const void* A, int lda,
                 const void* B, int ldb, cudaDataType_t ab_type, float beta, void* C, cudaDataType_t c_type, int ldc,
                 cudaStream_t stream) {
    const float one = 1.0f;
    cublasCheck(cublasSetStream(cublas(), stream));
    cublasCheck(cublasGemmEx(cublas(), opA, opB, m, n, k, &one, A, ab_type, lda, B, ab_type, ldb, &beta, C, c_type,
                             ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

// ---------------------------------------------------------------------------------------------------
// matmul

// out (N, OC) += bias (OC) broadcast over rows. Grid-stride, one thread per element: consecutive
// threads touch consecutive out elements (coalesced), bias is tiny and stays in cache.
template <typename T>
__global__ void matmul_add_bias_kernel(T* out, const T* bias, size_t total, int OC) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x)
        out[i] = T(float(out[i]) + float(bias[i % OC]));
}

// out (N, OC) = inp (N, C) · weight (OC, C)ᵀ + bias (OC) [bias may be null]. inp16: inp's bf16_operand, when
// the caller rounded it already (null: rounded here if bf16 operands are in effect). out16: under bf16 operands, the
// GEMM writes its result there in bf16 instead of into out (its epilogue rounds: for an output that only an
// elementwise kernel reads, which then reads half the bytes; no bias).
template <typename T>
void matmul_forward(T* out, const T* inp, const T* weight, const T* bias, int N, int C, int OC,
                    cudaStream_t stream = 0, const bf16* inp16 = nullptr, bf16* out16 = nullptr) {
    HL_CHECK(N >= 0 && C > 0 && OC > 0, "matmul: bad sizes N=", N, " C=", C, " OC=", OC);
    if (N == 0) return;
    const cudaDataType_t ty = CublasType<T>::value;
    // column-major: outᵀ (OC, N) = W (OC, C) [stored as Wᵀ (C, OC), so op T] · inpᵀ (C, N) [op N]
    const Bf16Operands* ops = std::is_same_v<T, float> ? current_bf16() : nullptr;
    if (ops) {
        HL_CHECK(out16 == nullptr || bias == nullptr, "matmul: a bf16 out16 with a bias");
        const float* w = reinterpret_cast<const float*>(weight);
        const float* x = reinterpret_cast<const float*>(inp);
        gemm(CUBLAS_OP_T, CUBLAS_OP_N, OC, N, C, ops->weight(w, size_t(OC) * C), C,
             inp16 ? inp16 : ops->round(ops->a16, x, size_t(N) * C, stream), C, CUDA_R_16BF, 0.0f,
             out16 ? static_cast<void*>(out16) : static_cast<void*>(out), out16 ? CUDA_R_16BF : ty, OC, stream);
    } else {
        HL_CHECK(inp16 == nullptr && out16 == nullptr,
                 "matmul: a bf16 inp16 or out16 given without bf16 operands in effect");
        gemm(CUBLAS_OP_T, CUBLAS_OP_N, OC, N, C, weight, C, inp, C, ty, 0.0f, out, ty, OC, stream);
    }
    if (bias) {
        const size_t total = (size_t)N * OC;
        matmul_add_bias_kernel<<<elementwise_grid(total, 256), 256, 0, stream>>>(out, bias, total, OC);
        cudaCheckLast();
    }
}

// dinp (N, C) is written (added to with accumulate_dinp: the GEMM's beta = 1, so that a tensor feeding several
// projections sums its input gradients without a scratch buffer and an add pass); dweight (OC, C) and dbias (OC)
// accumulate (+=). Any of the three may be null. inp16: as in matmul_forward. dout16: dout already in bf16, from a
// kernel that wrote its gradient straight in bf16 (then dout itself is not read, and may be null without dbias).
// dinp16: as out16 in matmul_forward, dinp written there in bf16 instead (not with accumulate_dinp).
template <typename T>
void matmul_backward(T* dinp, T* dweight, T* dbias, const T* dout, const T* inp, const T* weight, int N, int C,
                     int OC, cudaStream_t stream = 0, bool accumulate_dinp = false, const bf16* inp16 = nullptr,
                     const bf16* dout16 = nullptr, bf16* dinp16 = nullptr) {
    HL_CHECK(N >= 0 && C > 0 && OC > 0, "matmul: bad sizes N=", N, " C=", C, " OC=", OC);
    HL_CHECK(dinp16 == nullptr || !accumulate_dinp, "matmul: a bf16 dinp16 cannot accumulate");
    if (N == 0) return;
    const cudaDataType_t ty = CublasType<T>::value;
    // the operands: as given, or in bf16 (dout rounded once for both products)
    const void *W = weight, *dY = dout, *X = inp;
    cudaDataType_t ab = ty;
    if (const Bf16Operands* ops = std::is_same_v<T, float> ? current_bf16() : nullptr) {
        ab = CUDA_R_16BF;
        if (dinp || dinp16) W = ops->weight(reinterpret_cast<const float*>(weight), size_t(OC) * C);
        dY = dout16 ? dout16 : ops->round(ops->b16, reinterpret_cast<const float*>(dout), size_t(N) * OC, stream);
        if (dweight)
            X = inp16 ? inp16 : ops->round(ops->a16, reinterpret_cast<const float*>(inp), size_t(N) * C, stream);
    } else {
        HL_CHECK(inp16 == nullptr && dout16 == nullptr && dinp16 == nullptr,
                 "matmul: a bf16 operand given without bf16 operands in effect");
    }
    // dinp (N, C) = dout (N, OC) · W (OC, C);  column-major: dinpᵀ (C, N) = Wᵀ (C, OC) · doutᵀ (OC, N)
    if (dinp16) gemm(CUBLAS_OP_N, CUBLAS_OP_N, C, N, OC, W, C, dY, OC, ab, 0.0f, dinp16, CUDA_R_16BF, C, stream);
    else if (dinp) gemm(CUBLAS_OP_N, CUBLAS_OP_N, C, N, OC, W, C, dY, OC, ab, accumulate_dinp ? 1.0f : 0.0f, dinp, ty,
                        C, stream);
    // dW (OC, C) += doutᵀ (OC, N) · inp (N, C);  column-major: dWᵀ (C, OC) += inpᵀ (C, N) · dout (N, OC),
    // where dout (N, OC) is the transpose of the stored column-major doutᵀ (OC, N): op T. beta = 1: +=.
    if (dweight) gemm(CUBLAS_OP_N, CUBLAS_OP_T, C, OC, N, X, C, dY, OC, ab, 1.0f, dweight, ty, C, stream);
    if (dbias) colsum(dbias, RowsTerm<T>{dout, OC}, N, OC, stream);  // dbias[o] += Σ_n dout[n, o]
}

}  // namespace hl::gpu
