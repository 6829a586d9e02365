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

// compares, prints the measured error, and checks it against tol
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

inline void expect_close(const std::string& what, const std::vector<float>& gpu, const std::vector<float>& cpu,
                         double tol) {
    const double e = rel_err(gpu, cpu);
    std::printf("  %-64s rel err %.2e (tol %.0e)\n", what.c_str(), e, tol);
    INFO(what, ": rel err ", e, " > tol ", tol);
    CHECK(e <= tol);
}

}  // namespace hl::test
