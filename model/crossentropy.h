// crossentropy.h — fused softmax + cross-entropy over the vocabulary, and its backward.
// loss_n = logsumexp(logits_n) − logits_n[target_n]; the max is subtracted first (DESIGN.md §3), so
// logits of any size stay finite.
#pragma once
#include <cmath>           // std::exp, std::log
#include <cstddef>         // size_t
#include "model/common.h"  // HL_CHECK

namespace hl {

// losses (N), probs (N, V) saved for the backward; logits (N, V), targets (N).
template <typename T>
void crossentropy_forward(T* losses, T* probs, const T* logits, const int* targets, int N, int V) {
    HL_CHECK(N >= 0 && V > 0, "crossentropy: bad sizes N=", N, " V=", V);
    for (int n = 0; n < N; n++)  // checked before the parallel loop: an exception must not escape it
        HL_CHECK(targets[n] >= 0 && targets[n] < V, "crossentropy: target ", targets[n], " at row ", n,
                 " is out of range [0, V=", V, ")");
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const T* z = logits + (size_t)n * V;  // (V)
        T* p = probs + (size_t)n * V;         // (V)
        T zmax = z[0];
        for (int v = 1; v < V; v++) zmax = z[v] > zmax ? z[v] : zmax;
        T sum = 0;
        for (int v = 0; v < V; v++) {
            p[v] = std::exp(z[v] - zmax);  // ≤ 1: no overflow
            sum += p[v];                   // ≥ 1 (the max term): the log below is finite
        }
        T inv = T(1) / sum;
        for (int v = 0; v < V; v++) p[v] *= inv;
        // From log-sum-exp, not −log(p[target]): p[target] may underflow to 0 while the loss is finite.
        // (z[target] − zmax) first: adding zmax back to log(sum) would round away the loss's small digits.
        losses[n] = std::log(sum) - (z[targets[n]] - zmax);
    }
}

// dlogits (N, V) is written: dlogits_n = (probs_n − onehot(target_n)) · dlosses_n.
// (For the mean loss the trainer feeds dlosses = 1/N.)
template <typename T>
void crossentropy_backward(T* dlogits, const T* dlosses, const T* probs, const int* targets, int N, int V) {
    HL_CHECK(N >= 0 && V > 0, "crossentropy: bad sizes N=", N, " V=", V);
    for (int n = 0; n < N; n++)
        HL_CHECK(targets[n] >= 0 && targets[n] < V, "crossentropy: target ", targets[n], " at row ", n,
                 " is out of range [0, V=", V, ")");
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const T* p = probs + (size_t)n * V;  // (V)
        T* dz = dlogits + (size_t)n * V;     // (V)
        T dl = dlosses[n];
        for (int v = 0; v < V; v++) dz[v] = p[v] * dl;
        dz[targets[n]] -= dl;
    }
}

}  // namespace hl
