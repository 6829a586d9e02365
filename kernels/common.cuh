// common.cuh — what every CUDA file shares: error checks, ceil_div, and a device buffer that owns one
// allocation. The kernels mirror model/ (same names, same argument order) in namespace hl::gpu and work
// on device pointers; host-side layouts (Arena, the *_params / *_acts functions of model/) are reused
// as they are, carving views out of device allocations instead of host ones.
#pragma once
#include <cstdio>            // std::fprintf
#include <cstdlib>           // std::exit
#include <vector>            // std::vector for host copies
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

}  // namespace hl::gpu
