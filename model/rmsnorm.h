// rmsnorm.h — RMSNorm forward and backward. One function covers the plain norm (G = 1) and the
// per-group / per-head norms of the Mamba-2 gated norm and the intra-layer hybrid (G > 1).
#pragma once
#include <cmath>           // std::sqrt
#include "model/common.h"  // HL_CHECK

namespace hl {

// out (N, G·Cg) = inp / rms(inp over each group of Cg channels) · weight (G·Cg)
// rstd (N, G) is saved for the backward. weight may be null (no learnable scale).
template <typename T>
void rmsnorm_forward(T* out, T* rstd, const T* inp, const T* weight, int N, int G, int Cg, T eps) {
    HL_CHECK(N >= 0 && G > 0 && Cg > 0, "rmsnorm: bad sizes N=", N, " G=", G, " Cg=", Cg);
    const int C = G * Cg;
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        for (int g = 0; g < G; g++) {
            const T* x = inp + (size_t)n * C + g * Cg;
            T ss = 0;
            for (int c = 0; c < Cg; c++) ss += x[c] * x[c];
            T r = T(1) / std::sqrt(ss / Cg + eps);
            rstd[(size_t)n * G + g] = r;
            T* y = out + (size_t)n * C + g * Cg;
            const T* w = weight ? weight + g * Cg : nullptr;
            for (int c = 0; c < Cg; c++) y[c] = x[c] * r * (w ? w[c] : T(1));
        }
    }
}

// dinp is written, dweight accumulates. With x̂ = x·rstd and d = dout ⊙ weight:
//   dinp = rstd · (d − x̂ · mean(d ⊙ x̂)),   dweight += Σ_n dout ⊙ x̂
template <typename T>
void rmsnorm_backward(T* dinp, T* dweight, const T* dout, const T* inp, const T* weight, const T* rstd, int N,
                      int G, int Cg) {
    const int C = G * Cg;
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        for (int g = 0; g < G; g++) {
            const T* x = inp + (size_t)n * C + g * Cg;
            const T* dy = dout + (size_t)n * C + g * Cg;
            const T* w = weight ? weight + g * Cg : nullptr;
            T r = rstd[(size_t)n * G + g];
            T dot = 0;  // Σ d ⊙ x̂
            for (int c = 0; c < Cg; c++) dot += dy[c] * (w ? w[c] : T(1)) * x[c] * r;
            dot /= Cg;
            T* dx = dinp + (size_t)n * C + g * Cg;
            for (int c = 0; c < Cg; c++) dx[c] = r * (dy[c] * (w ? w[c] : T(1)) - x[c] * r * dot);
        }
    }
    if (dweight) {
        // accumulated over n in one thread per channel block, so no two threads write one weight
#pragma omp parallel for schedule(static)
        for (int c = 0; c < C; c++) {
            T acc = 0;
            for (int n = 0; n < N; n++) acc += dout[(size_t)n * C + c] * inp[(size_t)n * C + c] * rstd[(size_t)n * G + c / Cg];
            dweight[c] += acc;
        }
    }
}

}  // namespace hl
