// common.cuh — what every dev/cuda playground shares: timing a launch sequence with CUDA events, the
// max-norm relative error against the CPU reference, and NaN poisoning of outputs before a run.
#pragma once
#include <algorithm>          // std::sort, std::max
#include <cmath>              // std::fabs, std::isfinite, INFINITY
#include <vector>             // std::vector
#include "kernels/common.cuh"  // cudaCheck, DeviceBuffer

namespace hl::dev {

// Median time in ms of f() over reps runs, after warmup runs (module load, cuBLAS handles and caches stay out of
// the numbers), each timed with a pair of events on the default stream.
template <typename F>
float median_ms(F&& f, int warmup = 3, int reps = 21) {
    for (int i = 0; i < warmup; i++) f();
    cudaCheck(cudaDeviceSynchronize());
    cudaEvent_t a, b;
    cudaCheck(cudaEventCreate(&a));
    cudaCheck(cudaEventCreate(&b));
    std::vector<float> ms(static_cast<size_t>(reps));
    for (int i = 0; i < reps; i++) {
        cudaCheck(cudaEventRecord(a));
        f();
        cudaCheck(cudaEventRecord(b));
        cudaCheck(cudaEventSynchronize(b));
        cudaCheck(cudaEventElapsedTime(ms.data() + i, a, b));
    }
    cudaCheck(cudaEventDestroy(a));
    cudaCheck(cudaEventDestroy(b));
    std::sort(ms.begin(), ms.end());
    return ms[size_t(reps / 2)];
}

// max_i |g_i − c_i| / max_i |c_i|; any non-finite GPU value (an unwritten, poisoned element) makes it infinite.
inline double rel_err(const std::vector<float>& gpu, const std::vector<float>& cpu) {
    double err = 0, scale = 0;
    for (size_t i = 0; i < cpu.size(); i++) {
        if (!std::isfinite(gpu[i])) return INFINITY;
        err = std::max(err, std::fabs((double)gpu[i] - cpu[i]));
        scale = std::max(scale, std::fabs((double)cpu[i]));
    }
    return scale > 0 ? err / scale : err;
}

// Every element NaN (all bits set), so that an element a kernel forgets to write fails the check.
inline void poison(gpu::DeviceBuffer<float>& d) {
    if (d.n) cudaCheck(cudaMemset(d.ptr, 0xFF, d.n * sizeof(float)));
}

}  // namespace hl::dev
