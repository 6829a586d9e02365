// matmul.h — the one dense matmul of the CPU reference: out = inp · Wᵀ (+ bias), forward and
// backward, cache-blocked and OpenMP-parallel. Every projection in the model goes through it.
#pragma once
#include <cstddef>        // size_t
#include "model/common.h"  // zero

namespace hl {

// Rows are processed in tiles of ROW_TILE so each weight row, once in cache, serves several
// input rows; the inner loop runs over C, contiguous in both inp and weight.
constexpr int ROW_TILE = 8;

// out (N, OC) = inp (N, C) · weight (OC, C)ᵀ + bias (OC) [bias may be null]
template <typename T>
void matmul_forward(T* out, const T* inp, const T* weight, const T* bias, int N, int C, int OC) {
    // work items: (row tile, block of 64 output channels), so that one-row calls (decoding) use every thread too
    const int n_tiles = (N + ROW_TILE - 1) / ROW_TILE, o_blocks = (OC + 63) / 64;
#pragma omp parallel for schedule(static)
    for (int item = 0; item < n_tiles * o_blocks; item++) {
        const int n0 = (item / o_blocks) * ROW_TILE, n1 = n0 + ROW_TILE < N ? n0 + ROW_TILE : N;
        const int o0 = (item % o_blocks) * 64, o1 = o0 + 64 < OC ? o0 + 64 : OC;
        for (int o = o0; o < o1; o++) {
            const T* w = weight + (size_t)o * C;
            T b = bias ? bias[o] : T(0);
            for (int n = n0; n < n1; n++) {
                const T* x = inp + (size_t)n * C;
                T acc = b;
                for (int c = 0; c < C; c++) acc += x[c] * w[c];
                out[(size_t)n * OC + o] = acc;
            }
        }
    }
}

// dinp (N, C) is written; dweight (OC, C) and dbias (OC) accumulate (+=). Any of the three may
// be null when that gradient is not needed.
template <typename T>
void matmul_backward(T* dinp, T* dweight, T* dbias, const T* dout, const T* inp, const T* weight, int N,
                     int C, int OC) {
    if (dinp) {
        // dinp[n, :] = Σ_o dout[n, o] · weight[o, :]
#pragma omp parallel for schedule(static)
        for (int n0 = 0; n0 < N; n0 += ROW_TILE) {
            int n1 = n0 + ROW_TILE < N ? n0 + ROW_TILE : N;
            for (int n = n0; n < n1; n++) zero(dinp + (size_t)n * C, C);
            for (int o = 0; o < OC; o++) {
                const T* w = weight + (size_t)o * C;
                for (int n = n0; n < n1; n++) {
                    T d = dout[(size_t)n * OC + o];
                    T* dx = dinp + (size_t)n * C;
                    for (int c = 0; c < C; c++) dx[c] += d * w[c];
                }
            }
        }
    }
    if (dweight || dbias) {
        // dweight[o, :] += Σ_n dout[n, o] · inp[n, :]; parallel over o so no two threads share a row
#pragma omp parallel for schedule(static)
        for (int o = 0; o < OC; o++) {
            T* dw = dweight ? dweight + (size_t)o * C : nullptr;
            T db = T(0);
            for (int n = 0; n < N; n++) {
                T d = dout[(size_t)n * OC + o];
                db += d;
                if (dw) {
                    const T* x = inp + (size_t)n * C;
                    for (int c = 0; c < C; c++) dw[c] += d * x[c];
                }
            }
            if (dbias) dbias[o] += db;
        }
    }
}

}  // namespace hl
