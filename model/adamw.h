// adamw.h — the optimizer: AdamW with bias correction and decoupled weight decay, and global-norm
// gradient clipping (DESIGN.md §P, training setup: "AdamW + clipping").
#pragma once
#include <cmath>           // std::sqrt, std::pow
#include <cstddef>         // size_t
#include <string>          // std::string
#include <vector>          // std::vector
#include "model/common.h"  // TensorInfo, HL_CHECK

namespace hl {

struct AdamWConfig {
    float lr = 3e-4f;  // peak learning rate; the schedule's value for each step is passed to adamw_update
    float beta1 = 0.9f;
    float beta2 = 0.95f;
    float eps = 1e-8f;
    float weight_decay = 0.1f;
};

// Which tensors get weight decay. Rule: a tensor decays iff its shape has ≥ 2 dims AND its name
// does not end in "conv_w". So the projections and the embedding (matrices) decay; norm weights,
// biases, A_log, D, dt_bias, conv biases (vectors) do not, and neither does the depthwise conv
// kernel (C, K): it is 2-D but acts per channel like a bias-sized filter, not a projection.
inline bool adamw_decays(const TensorInfo& t) {
    const std::string suffix = "conv_w";
    bool conv = t.name.size() >= suffix.size() &&
                t.name.compare(t.name.size() - suffix.size(), suffix.size(), suffix) == 0;
    return t.shape.size() >= 2 && !conv;
}

// One AdamW step over every tensor listed (offsets and sizes index params, grads, m, v alike):
//   m ← β1·m + (1−β1)·g          v ← β2·v + (1−β2)·g²
//   m̂ = m / (1−β1^step)          v̂ = v / (1−β2^step)
//   p ← p − lr · (m̂ / (√v̂ + eps) + wd·p)        (wd = 0 for tensors that do not decay)
// lr is this step's learning rate (the schedule's value); cfg.lr is not read. step is 1-based.
template <typename T>
void adamw_update(T* params, const T* grads, T* m, T* v, const std::vector<TensorInfo>& tensors,
                  const AdamWConfig& cfg, T lr, int step) {
    HL_CHECK(step >= 1, "adamw: step is 1-based (for bias correction), got ", step);
    const T b1 = cfg.beta1, b2 = cfg.beta2, eps = cfg.eps;
    const T bc1 = T(1) - T(std::pow((double)cfg.beta1, step));  // bias corrections, in double: β^step
    const T bc2 = T(1) - T(std::pow((double)cfg.beta2, step));  // is 1 − tiny for the first steps
    for (const TensorInfo& t : tensors) {
        const T wd = adamw_decays(t) ? T(cfg.weight_decay) : T(0);
        const long long n = (long long)t.numel;
        T* p = params + t.offset;
        const T* g = grads + t.offset;
        T* mt = m + t.offset;
        T* vt = v + t.offset;
#pragma omp parallel for schedule(static)
        for (long long i = 0; i < n; i++) {
            mt[i] = b1 * mt[i] + (T(1) - b1) * g[i];
            vt[i] = b2 * vt[i] + (T(1) - b2) * g[i] * g[i];
            T mhat = mt[i] / bc1, vhat = vt[i] / bc2;
            p[i] -= lr * (mhat / (std::sqrt(vhat) + eps) + wd * p[i]);
        }
    }
}

// Global L2 norm of all gradients, summed in double so millions of small squares do not lose bits.
template <typename T>
T grad_norm(const T* grads, size_t n) {
    double ss = 0;
    const long long nn = (long long)n;
#pragma omp parallel for reduction(+ : ss) schedule(static)
    for (long long i = 0; i < nn; i++) ss += (double)grads[i] * (double)grads[i];
    return T(std::sqrt(ss));
}

// Scales all gradients by max_norm / norm when norm > max_norm; returns the norm before clipping
// (what the trainer logs).
template <typename T>
T clip_grad_norm(T* grads, size_t n, T max_norm) {
    HL_CHECK(max_norm > T(0), "clip_grad_norm: max_norm must be positive, got ", max_norm);
    T norm = grad_norm(grads, n);
    if (norm > max_norm) {
        const T scale = max_norm / norm;
        const long long nn = (long long)n;
#pragma omp parallel for schedule(static)
        for (long long i = 0; i < nn; i++) grads[i] *= scale;
    }
    return norm;
}

}  // namespace hl
