// gpu_check.cuh — what the GPU-vs-CPU test files share: the tolerances, random host data, device buffers filled,
// poisoned (NaN) and read back, and the error measure rel_err = max|gpu − cpu| / max|cpu| (a non-finite GPU
// value counts as an infinite error).
#pragma once
#include <algorithm>             // std::max
#include <cmath>                 // std::fabs, std::isfinite, INFINITY
#include <cstdint>               // uint32_t
#include <cstdio>                // std::printf
#include <cstring>               // std::memcpy
#include <string>                // std::string
#include <vector>                // std::vector
#include <doctest/doctest.h>     // CHECK, INFO
#include "kernels/common.cuh"    // DeviceBuffer, cudaCheck
#include "kernels/matmul.cuh"    // Bf16Operands, round_bf16: the bf16-operand runs' setup
#include "model/common.h"        // Rng

namespace hl::test {

using hl::gpu::DeviceBuffer;

constexpr double FWD_TOL = 1e-4;   // forward outputs, optimizer states, the loss
constexpr double GRAD_TOL = 1e-3;  // gradients

inline std::vector<float> randn(hl::Rng& rng, size_t n, double std = 1.0, double mean = 0.0) {
    std::vector<float> v(n);
    for (auto& x : v) x = float(mean + std * rng.normal());
    return v;
}

template <typename T>
void to_dev(DeviceBuffer<T>& d, const std::vector<T>& h) {
    d.alloc(h.size());
    if (!h.empty()) d.upload(h);
}

// every float becomes 0xFFFFFFFF, a NaN (an int −1): a kernel that reads what it should have written shows
template <typename T>
void poison(DeviceBuffer<T>& d) {
    if (d.n) cudaCheck(cudaMemset(d.ptr, 0xFF, d.n * sizeof(T)));
}

template <typename T>
void alloc_poisoned(DeviceBuffer<T>& d, size_t n) {
    d.alloc(n);
    poison(d);
}

template <typename T>
std::vector<T> from_dev(const DeviceBuffer<T>& d) {
    cudaCheck(cudaDeviceSynchronize());
    return d.download();
}

inline double rel_err(const float* g, const float* c, size_t n) {
    double err = 0, scale = 0;
    for (size_t i = 0; i < n; i++) {
        if (!std::isfinite(g[i])) return INFINITY;
        err = std::max(err, std::fabs((double)g[i] - (double)c[i]));
        scale = std::max(scale, std::fabs((double)c[i]));
    }
    return scale > 0 ? err / scale : err;
}
inline double rel_err(const std::vector<float>& g, const std::vector<float>& c) {
    return g.size() == c.size() ? rel_err(g.data(), c.data(), c.size()) : INFINITY;
}

// x rounded to the nearest bf16 (ties to even), kept as a float: what __float2bfloat16_rn gives on the device
inline float round_bf16_host(float x) {
    uint32_t u;
    std::memcpy(&u, &x, sizeof u);
    u += 0x7FFFu + ((u >> 16) & 1u);
    u &= 0xFFFF0000u;
    std::memcpy(&x, &u, sizeof x);
    return x;
}
inline std::vector<float> round_bf16_host(std::vector<float> v) {
    for (float& x : v) x = round_bf16_host(x);
    return v;
}

// compares, prints the measured error, and checks it against tol
inline void expect_close(const std::string& what, const std::vector<float>& gpu, const std::vector<float>& cpu,
                         double tol) {
    const double e = rel_err(gpu, cpu);
    std::printf("  %-64s rel err %.2e (tol %.0e)\n", what.c_str(), e, tol);
    INFO(what, ": rel err ", e, " > tol ", tol);
    CHECK(e <= tol);
}

// What a model would hand its GEMMs under bf16 operands, for a test's own parameters: their bf16 copy (rounded
// from the device parameters [params, params + n) now) and scratch_n elements for each activation operand, plus
// stage_n for the tensor-core attention's staging. Open a Bf16Scope on `ops` to run under it.
struct TestBf16 {
    DeviceBuffer<hl::gpu::bf16> params16, scratch;
    hl::gpu::Bf16Operands ops;
    TestBf16(const float* params, size_t n, size_t scratch_n, size_t stage_n = 0) {
        params16.alloc(n);
        hl::gpu::round_bf16(params16.ptr, params, n);
        scratch.alloc(2 * scratch_n + stage_n);
        ops.params = params, ops.n = n, ops.params16 = params16.ptr, ops.scratch_n = scratch_n;
        ops.a16 = scratch.ptr, ops.b16 = scratch.ptr + scratch_n;
        if (stage_n) ops.stage = scratch.ptr + 2 * scratch_n, ops.stage_n = stage_n;
    }
    // d16 = d's values in bf16, as a producer that writes a GEMM's operand in bf16 would give them; d itself is then
    // poisoned, so that a GEMM reading the fp32 values instead shows
    static void take_bf16(DeviceBuffer<hl::gpu::bf16>& d16, DeviceBuffer<float>& d) {
        d16.alloc(d.n);
        hl::gpu::round_bf16(d16.ptr, d.ptr, d.n);
        poison(d);
    }
};

}  // namespace hl::test
