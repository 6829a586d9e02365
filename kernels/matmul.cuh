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
// CUBLAS_COMPUTE_32F: no TF32 tensor cores (those round the inputs to 10 mantissa bits). For bf16 later,
// the same cublasGemmEx call takes CUDA_R_16BF operands with fp32 accumulation (see CublasType).
#pragma once
#include <cstdio>           // std::fprintf
#include <cstdlib>          // std::exit
#include <cublas_v2.h>      // cublasHandle_t, cublasGemmEx, cublasGetStatusString
#include <cuda_bf16.h>      // __nv_bfloat16, for CublasType (the later bf16 path)
#include "kernels/common.cuh"  // cudaCheck, cudaCheckLast, elementwise_grid, colsum
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
// matmul

// out (N, OC) += bias (OC) broadcast over rows. Grid-stride, one thread per element: consecutive
// threads touch consecutive out elements (coalesced), bias is tiny and stays in cache.
template <typename T>
__global__ void matmul_add_bias_kernel(T* out, const T* bias, size_t total, int OC) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x)
        out[i] = T(float(out[i]) + float(bias[i % OC]));
}

// column n-sum of dout for the bias gradient: f(n, o) = dout[n, o]
template <typename T>
struct MatmulDbiasTerm {
    const T* x;
    int ld;
    __device__ float operator()(int n, int c) const { return float(x[(size_t)n * ld + c]); }
};

// out (N, OC) = inp (N, C) · weight (OC, C)ᵀ + bias (OC) [bias may be null]
template <typename T>
void matmul_forward(T* out, const T* inp, const T* weight, const T* bias, int N, int C, int OC,
                    cudaStream_t stream = 0) {
    HL_CHECK(N >= 0 && C > 0 && OC > 0, "matmul: bad sizes N=", N, " C=", C, " OC=", OC);
    if (N == 0) return;
    const cudaDataType_t ty = CublasType<T>::value;
    const float one = 1.0f, zero = 0.0f;
    cublasCheck(cublasSetStream(cublas(), stream));
    // column-major: outᵀ (OC, N) = W (OC, C) [stored as Wᵀ (C, OC), so op T] · inpᵀ (C, N) [op N]
    cublasCheck(cublasGemmEx(cublas(), CUBLAS_OP_T, CUBLAS_OP_N, OC, N, C, &one, weight, ty, C, inp, ty, C, &zero,
                             out, ty, OC, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    if (bias) {
        const size_t total = (size_t)N * OC;
        matmul_add_bias_kernel<<<elementwise_grid(total, 256), 256, 0, stream>>>(out, bias, total, OC);
        cudaCheckLast();
    }
}

// dinp (N, C) is written; dweight (OC, C) and dbias (OC) accumulate (+=). Any of the three may be null.
template <typename T>
void matmul_backward(T* dinp, T* dweight, T* dbias, const T* dout, const T* inp, const T* weight, int N, int C,
                     int OC, cudaStream_t stream = 0) {
    HL_CHECK(N >= 0 && C > 0 && OC > 0, "matmul: bad sizes N=", N, " C=", C, " OC=", OC);
    const cudaDataType_t ty = CublasType<T>::value;
    const float one = 1.0f, zero = 0.0f;
    cublasCheck(cublasSetStream(cublas(), stream));
    if (dinp && N > 0) {
        // dinp (N, C) = dout (N, OC) · W (OC, C);  column-major: dinpᵀ (C, N) = Wᵀ (C, OC) · doutᵀ (OC, N)
        cublasCheck(cublasGemmEx(cublas(), CUBLAS_OP_N, CUBLAS_OP_N, C, N, OC, &one, weight, ty, C, dout, ty, OC,
                                 &zero, dinp, ty, C, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    }
    if (dweight && N > 0) {
        // dW (OC, C) += doutᵀ (OC, N) · inp (N, C);  column-major: dWᵀ (C, OC) += inpᵀ (C, N) · dout (N, OC),
        // where dout (N, OC) is the transpose of the stored column-major doutᵀ (OC, N): op T. beta = 1: +=.
        cublasCheck(cublasGemmEx(cublas(), CUBLAS_OP_N, CUBLAS_OP_T, C, OC, N, &one, inp, ty, C, dout, ty, OC, &one,
                                 dweight, ty, C, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    }
    if (dbias && N > 0) colsum(dbias, MatmulDbiasTerm<T>{dout, OC}, N, OC, stream);  // dbias[o] += Σ_n dout[n, o]
}

}  // namespace hl::gpu
