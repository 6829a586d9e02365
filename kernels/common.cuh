// common.cuh — what every CUDA file shares: error checks, ceil_div, allow_smem, a device buffer that owns one
// allocation, and the small device helpers of every kernel file (scalar activations, warp_sum,
// elementwise_grid, the deterministic column sum colsum, elementwise add / accumulate). The kernels mirror model/ (same names, same argument order) in namespace hl::gpu and work
// on device pointers; host-side layouts (Arena, the *_params / *_acts functions of model/) are reused
// as they are, carving views out of device allocations instead of host ones.
#pragma once
#include <algorithm>         // std::min
#include <cstdio>            // std::fprintf
#include <cstdlib>           // std::exit
#include <vector>            // std::vector for host copies
#include <cstdint>           // uintptr_t
#include <cuda_bf16.h>       // __nv_bfloat16, __nv_bfloat162: ld4/st4 on bf16
#include <cuda_runtime.h>    // cudaMalloc, cudaMemcpy, cudaGetErrorString
#include "model/common.h"    // hl::Error, HL_CHECK

namespace hl::gpu {

// A failed CUDA call is not a user error: report where and stop (as llm.c does).
inline void cuda_check(cudaError_t e, const char* file, int line) {
    if (e != cudaSuccess) {
        std::fprintf(stderr, "error: CUDA %s at %s:%d\n", cudaGetErrorString(e), file, line);
        std::exit(1);
    }
}
#define cudaCheck(call) ::hl::gpu::cuda_check((call), __FILE__, __LINE__)
// after a kernel launch: launch-configuration errors surface here, execution errors at the next sync
#define cudaCheckLast() ::hl::gpu::cuda_check(cudaGetLastError(), __FILE__, __LINE__)

__host__ __device__ constexpr inline int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Opt in to more than 48 KiB of dynamic shared memory (a host-side setting of the kernel on the current device,
// not an allocation; cheap enough to repeat at every launch, which keeps it right for every template instantiation
// and every device).
template <typename Kernel>
inline void allow_smem(Kernel kernel, size_t bytes) {
    if (bytes > 48 * 1024)
        cudaCheck(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
}

// Streaming multiprocessors of the current device: the grid of a persistent kernel (one block an SM).
inline int sm_count() {
    int dev = 0, n = 0;
    cudaCheck(cudaGetDevice(&dev));
    cudaCheck(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
    return n;
}

// One device allocation of n elements of T, freed when it goes out of scope.
template <typename T>
struct DeviceBuffer {
    T* ptr = nullptr;
    size_t n = 0;
    DeviceBuffer() = default;
    explicit DeviceBuffer(size_t count) { alloc(count); }
    DeviceBuffer(const DeviceBuffer&) = delete;
    DeviceBuffer& operator=(const DeviceBuffer&) = delete;
    ~DeviceBuffer() { if (ptr) cudaFree(ptr); }
    void alloc(size_t count) {
        if (ptr) cudaCheck(cudaFree(ptr));
        n = count;
        ptr = nullptr;
        if (n) cudaCheck(cudaMalloc(&ptr, n * sizeof(T)));
    }
    void upload(const T* host) { cudaCheck(cudaMemcpy(ptr, host, n * sizeof(T), cudaMemcpyHostToDevice)); }
    void upload(const std::vector<T>& host) { HL_CHECK(host.size() == n, "upload: size mismatch"); upload(host.data()); }
    std::vector<T> download() const {
        std::vector<T> h(n);
        cudaCheck(cudaMemcpy(h.data(), ptr, n * sizeof(T), cudaMemcpyDeviceToHost));
        return h;
    }
    void zero() { if (n) cudaCheck(cudaMemset(ptr, 0, n * sizeof(T))); }
};

// ---------------------------------------------------------------------------------------------------
// Shared device helpers (used by every kernel file; they were first written in kernels/matmul.cuh)

// Scalar activations on the device, the same formulas as model/common.h (expf, not the fast __expf,
// so results stay within an ulp or two of the CPU's std::exp).
__device__ __forceinline__ float dev_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }
__device__ __forceinline__ float dev_silu(float x) { return x * dev_sigmoid(x); }
__device__ __forceinline__ float dev_silu_grad(float x) {  // σ(x)(1 + x(1 − σ(x)))
    float s = dev_sigmoid(x);
    return s * (1.0f + x * (1.0f - s));
}
__device__ __forceinline__ float dev_softplus(float x) {  // log(1 + eˣ), stable for large x (as model/common.h)
    return x > 20.0f ? x : log1pf(expf(x));
}

// Sum of v over the 32 lanes of a warp (butterfly: every lane ends with the total; the order of the
// additions is fixed, so the result is deterministic).
__device__ __forceinline__ float warp_sum(float v) {
    for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

// Max of v over the 32 lanes of a warp (every lane ends with it).
__device__ __forceinline__ float warp_max(float v) {
    for (int off = 16; off > 0; off /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
    return v;
}

// Blocks for a grid-stride loop over n elements with `block` threads each: enough to fill the GPU many
// times over, capped so the index arithmetic in the kernels (size_t) never needs more than 2^16 blocks.
inline int elementwise_grid(size_t n, int block) {
    size_t blocks = (n + block - 1) / block;
    return (int)std::min<size_t>(blocks, size_t(1) << 16);
}

// Four consecutive elements in one access (16 bytes of fp32, 8 of bf16), as fp32: the vector path of the
// memory-bound elementwise kernels. One 4-byte access a thread leaves an H100/H200 at about half its DRAM bandwidth
// (the swiglu gate ran at 2.2 TB/s); four elements a thread, loaded at once, keep more bytes in flight. i4 counts
// groups of four: elements 4·i4 … 4·i4 + 3.
__device__ __forceinline__ float4 ld4(const float* p, size_t i4) { return reinterpret_cast<const float4*>(p)[i4]; }
__device__ __forceinline__ float4 ld4(const __nv_bfloat16* p, size_t i4) {
    const uint2 u = reinterpret_cast<const uint2*>(p)[i4];
    const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u.x));
    const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u.y));
    return make_float4(a.x, a.y, b.x, b.y);
}
__device__ __forceinline__ void st4(float* p, size_t i4, float4 v) { reinterpret_cast<float4*>(p)[i4] = v; }
__device__ __forceinline__ void st4(__nv_bfloat16* p, size_t i4, float4 v) {
    const __nv_bfloat162 a = __floats2bfloat162_rn(v.x, v.y), b = __floats2bfloat162_rn(v.z, v.w);
    uint2 u;
    u.x = *reinterpret_cast<const unsigned*>(&a);
    u.y = *reinterpret_cast<const unsigned*>(&b);
    reinterpret_cast<uint2*>(p)[i4] = u;
}
// Two consecutive elements as fp32 (8 bytes of fp32, 4 of bf16); p aligned to that.
__device__ __forceinline__ float2 ld2(const float* p) { return *reinterpret_cast<const float2*>(p); }
__device__ __forceinline__ float2 ld2(const __nv_bfloat16* p) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p));
}
// Two fp32 values stored as two consecutive elements (8 bytes of fp32, 4 of bf16, rounded); p aligned to that.
__device__ __forceinline__ void st2(float* p, float2 v) { *reinterpret_cast<float2*>(p) = v; }
__device__ __forceinline__ void st2(__nv_bfloat16* p, float2 v) {
    *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(v.x, v.y);
}
// Eight consecutive elements as fp32: two 16-byte accesses of fp32, one of bf16; p 16-byte aligned.
__device__ __forceinline__ void ld8(const float* p, float (&x)[8]) {
    const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
    x[0] = a.x, x[1] = a.y, x[2] = a.z, x[3] = a.w, x[4] = b.x, x[5] = b.y, x[6] = b.z, x[7] = b.w;
}
__device__ __forceinline__ void ld8(const __nv_bfloat16* p, float (&x)[8]) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int j = 0; j < 4; j++) {
        const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w[j]));
        x[2 * j] = f.x, x[2 * j + 1] = f.y;
    }
}
__device__ __forceinline__ void st8(float* p, const float (&x)[8]) {
    reinterpret_cast<float4*>(p)[0] = make_float4(x[0], x[1], x[2], x[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(x[4], x[5], x[6], x[7]);
}
__device__ __forceinline__ void st8(__nv_bfloat16* p, const float (&x)[8]) {
    unsigned w[4];
#pragma unroll
    for (int j = 0; j < 4; j++) {
        const __nv_bfloat162 h = __floats2bfloat162_rn(x[2 * j], x[2 * j + 1]);
        w[j] = *reinterpret_cast<const unsigned*>(&h);
    }
    *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
}
// V consecutive elements as fp32, V = 1, 4 (ld4/st4) or 8 (ld8/st8); p aligned as those need.
template <typename T, int V>
__device__ __forceinline__ void ldv(const T* p, float (&x)[V]) {
    static_assert(V == 1 || V == 4 || V == 8, "ldv: 1, 4 or 8 elements");
    if constexpr (V == 8) {
        ld8(p, x);
    } else if constexpr (V == 4) {
        const float4 f = ld4(p, 0);
        x[0] = f.x, x[1] = f.y, x[2] = f.z, x[3] = f.w;
    } else {
        x[0] = float(p[0]);
    }
}
template <typename T, int V>
__device__ __forceinline__ void stv(T* p, const float (&x)[V]) {
    static_assert(V == 1 || V == 4 || V == 8, "stv: 1, 4 or 8 elements");
    if constexpr (V == 8) st8(p, x);
    else if constexpr (V == 4) st4(p, 0, make_float4(x[0], x[1], x[2], x[3]));
    else p[0] = T(x[0]);
}
// f applied to the four lanes of a and b
template <typename F>
__device__ __forceinline__ float4 map4(float4 a, float4 b, F f) {
    return make_float4(f(a.x, b.x), f(a.y, b.y), f(a.z, b.z), f(a.w, b.w));
}

// Whether every pointer given (null ones are ignored) is aligned for ld4/st4 of its type.
template <typename... P>
bool vec4_aligned(const P*... p) {
    return ((p == nullptr || reinterpret_cast<uintptr_t>(p) % (4 * sizeof(P)) == 0) && ...);
}
// Whether every pointer given (null ones are ignored) is aligned for ld2 of its type.
template <typename... P>
bool vec2_aligned(const P*... p) {
    return ((p == nullptr || reinterpret_cast<uintptr_t>(p) % (2 * sizeof(P)) == 0) && ...);
}
// The groups of four an elementwise kernel over n elements takes on its vector path: n / 4 when every pointer is
// aligned (ld4/st4), else 0 (all scalar). The kernels do elements [4·n4, n) one at a time.
template <typename... P>
size_t vec4_count(size_t n, const P*... p) {
    return vec4_aligned(p...) ? n / 4 : 0;
}

// Deterministic column sums: dst[c] += Σ_{n<N} f(n, c) for c < C (no atomics, so the result is the same
// bit for bit on every run). A block owns COLSUM_TW consecutive columns and has COLSUM_LANES row lanes:
// thread (x, y) sums rows y, y + LANES, ... of column x. A warp covers 8 columns × 4 rows, i.e. 32-byte
// sectors of 4 rows: full use of every DRAM sector. Narrow tiles (8 columns, not 32) give C/8 blocks, so
// even C = 2048 fills the GPU. The lanes' partials are then added in a fixed tree order in shared memory.
// f is a functor (plain struct with a __device__ operator()(int n, int c) const returning float).
constexpr int COLSUM_TW = 8;
constexpr int COLSUM_LANES = 128;

template <typename TD, typename F>
__global__ void colsum_kernel(TD* dst, F f, int N, int C) {
    __shared__ float part[COLSUM_LANES][COLSUM_TW];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int c = blockIdx.x * COLSUM_TW + tx;
    float acc = 0.0f;
    if (c < C)
        for (int n = ty; n < N; n += COLSUM_LANES) acc += f(n, c);
    part[ty][tx] = acc;
    __syncthreads();
    for (int half = COLSUM_LANES / 2; half > 0; half /= 2) {  // fixed tree: deterministic
        if (ty < half) part[ty][tx] += part[ty + half][tx];
        __syncthreads();
    }
    if (ty == 0 && c < C) dst[c] = TD(float(dst[c]) + part[0][tx]);
}

// f(n, c) = x[n·ld + c]: the column sums of a row-major matrix (a bias gradient; per-block partial sums).
template <typename T>
struct RowsTerm {
    const T* x;
    int ld;
    __device__ float operator()(int n, int c) const { return float(x[(size_t)n * ld + c]); }
};

template <typename TD, typename F>
void colsum(TD* dst, F f, int N, int C, cudaStream_t stream = 0) {
    if (C <= 0) return;
    dim3 block(COLSUM_TW, COLSUM_LANES);  // 1024 threads
    colsum_kernel<<<ceil_div(C, COLSUM_TW), block, 0, stream>>>(dst, f, N, C);
    cudaCheckLast();
}

// Elementwise sums, the residual adds of the blocks and the "this input feeds several consumers" sums of
// the backward. Grid-stride (memory-bound; consecutive threads touch consecutive elements), elements [0, 4·n4) four
// a thread (vec4_count), the rest one a thread. out may alias a or b.
template <typename T>
__global__ void add_kernel(T* out, const T* a, const T* b, size_t n, size_t n4) {
    const size_t i0 = blockIdx.x * (size_t)blockDim.x + threadIdx.x, stride = (size_t)gridDim.x * blockDim.x;
    for (size_t q = i0; q < n4; q += stride)
        st4(out, q, map4(ld4(a, q), ld4(b, q), [](float x, float y) { return x + y; }));
    for (size_t i = 4 * n4 + i0; i < n; i += stride) out[i] = T(float(a[i]) + float(b[i]));
}

// out (n) = a (n) + b (n)
template <typename T>
void add(T* out, const T* a, const T* b, size_t n, cudaStream_t stream = 0) {
    if (n == 0) return;
    const size_t n4 = vec4_count(n, out, a, b);
    add_kernel<<<elementwise_grid(n4 ? n4 : n, 256), 256, 0, stream>>>(out, a, b, n, n4);
    cudaCheckLast();
}

// dst (n) += src (n)
template <typename T>
void accumulate(T* dst, const T* src, size_t n, cudaStream_t stream = 0) { add(dst, dst, src, n, stream); }

}  // namespace hl::gpu
