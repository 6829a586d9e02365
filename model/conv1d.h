// conv1d.h — the causal depthwise 1-D convolution of the Mamba-2 mixer, with bias and a fused SiLU.
// Every channel c has its own kernel of K taps; the output at time t reads the inputs at times
// t−K+1 … t only (zeros before the sequence starts), so the layer is causal:
//   pre[t, c] = bias[c] + Σ_{k<K} w[c, k] · inp[t − (K−1) + k, c]      (tap K−1 reads time t itself)
//   out[t, c] = SiLU(pre[t, c])
// Shapes: inp, pre, out (B, T, C)   w (C, K)   bias (C).
#pragma once
#include <cstddef>         // size_t
#include "model/common.h"  // HL_CHECK, silu, silu_grad

namespace hl {

// out and pre (saved for the backward) are written.
template <typename T>
void conv1d_silu_forward(T* out, T* pre, const T* inp, const T* w, const T* bias, int B, int T_, int C, int K) {
    HL_CHECK(B > 0 && T_ > 0 && C > 0 && K > 0, "conv1d: bad sizes B=", B, " T=", T_, " C=", C, " K=", K,
             " (all must be positive)");
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++) {
        for (int t = 0; t < T_; t++) {
            const size_t row = ((size_t)b * T_ + t) * C;  // (b, t, ·)
            for (int c = 0; c < C; c++) {
                T acc = bias[c];
                for (int k = 0; k < K; k++) {
                    const int s = t - (K - 1) + k;  // the input time tap k reads
                    if (s >= 0) acc += w[(size_t)c * K + k] * inp[((size_t)b * T_ + s) * C + c];
                }
                pre[row + c] = acc;
                out[row + c] = silu(acc);
            }
        }
    }
}

// dinp is written; dw and dbias accumulate. The gradient before the SiLU,
// dpre = dout ⊙ SiLU'(pre), is recomputed where it is read (it is cheap), so no scratch is needed.
template <typename T>
void conv1d_silu_backward(T* dinp, T* dw, T* dbias, const T* dout, const T* pre, const T* inp, const T* w, int B,
                          int T_, int C, int K) {
    HL_CHECK(B > 0 && T_ > 0 && C > 0 && K > 0, "conv1d: bad sizes B=", B, " T=", T_, " C=", C, " K=", K,
             " (all must be positive)");
    auto dpre = [&](size_t i) { return dout[i] * silu_grad(pre[i]); };
    // dinp[s, c] = Σ_k dpre[s + (K−1) − k, c] · w[c, k]: every output whose tap k read input time s
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++) {
        for (int s = 0; s < T_; s++) {
            for (int c = 0; c < C; c++) {
                T acc = 0;
                for (int k = 0; k < K; k++) {
                    const int t = s + (K - 1) - k;  // the output time whose tap k read time s
                    if (t < T_) acc += dpre(((size_t)b * T_ + t) * C + c) * w[(size_t)c * K + k];
                }
                dinp[((size_t)b * T_ + s) * C + c] = acc;
            }
        }
    }
    // dw[c, k] += Σ_{b,t} dpre[t, c] · inp[t − (K−1) + k, c],  dbias[c] += Σ_{b,t} dpre[t, c]
    // (parallel over channels: each thread owns its channels' weights)
#pragma omp parallel for schedule(static)
    for (int c = 0; c < C; c++) {
        T db = 0;
        for (int b = 0; b < B; b++) {
            for (int t = 0; t < T_; t++) {
                const T d = dpre(((size_t)b * T_ + t) * C + c);
                db += d;
                for (int k = 0; k < K; k++) {
                    const int s = t - (K - 1) + k;
                    if (s >= 0) dw[(size_t)c * K + k] += d * inp[((size_t)b * T_ + s) * C + c];
                }
            }
        }
        dbias[c] += db;
    }
}

}  // namespace hl
