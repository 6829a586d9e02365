// embedding.h — token embedding: row lookup into wte (V, D), and its backward (scatter-add).
//
// The LM head is tied to this table (DESIGN.md §1) and needs no code of its own: it is the
// plain projection onto the vocabulary with wte as the weight,
//   matmul_forward(logits /*(N,V)*/, x /*(N,D)*/, wte /*(V,D)*/, nullptr, N, D, V);
//   matmul_backward(dx, dwte, nullptr, dlogits, x, wte, N, D, V);  // dwte += dlogitsᵀ · x
// so dwte collects gradient from both uses: the head (every row) and the lookup (rows of seen tokens).
// With --untied the head is a separate (V, D) weight used the same way.
#pragma once
#include <cstddef>         // size_t
#include "model/common.h"  // HL_CHECK

namespace hl {

// (The float type is T_ in this file because T is the sequence length, as everywhere in DESIGN.md.)

// Every token id must index a row of wte; a bad id is a data/config bug, reported with its position.
inline void embedding_check_tokens(const int* tokens, int B, int T, int V) {
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            int id = tokens[(size_t)b * T + t];
            HL_CHECK(id >= 0 && id < V, "embedding: token id ", id, " at position (b=", b, ", t=", t,
                     ") is out of range [0, V=", V, ")");
        }
}

// out (B, T, D)[b, t, :] = wte[tokens[b, t], :]
template <typename T_>
void embedding_forward(T_* out, const int* tokens, const T_* wte, int B, int T, int V, int D) {
    HL_CHECK(B >= 0 && T >= 0 && V > 0 && D > 0, "embedding: bad sizes B=", B, " T=", T, " V=", V, " D=", D);
    embedding_check_tokens(tokens, B, T, V);  // before the parallel loop: an exception must not escape it
    const int N = B * T;
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const T_* row = wte + (size_t)tokens[n] * D;  // (D)
        T_* o = out + (size_t)n * D;                 // (D)
        for (int d = 0; d < D; d++) o[d] = row[d];
    }
}

// dwte (V, D) += scatter of dout (B, T, D) into the rows of the tokens seen.
// Several positions can hold the same token, so two positions may add into one row: threads split
// the D columns instead of the positions, and each thread owns its columns of every row (no race).
template <typename T_>
void embedding_backward(T_* dwte, const T_* dout, const int* tokens, int B, int T, int V, int D) {
    HL_CHECK(B >= 0 && T >= 0 && V > 0 && D > 0, "embedding: bad sizes B=", B, " T=", T, " V=", V, " D=", D);
    embedding_check_tokens(tokens, B, T, V);
    const int N = B * T;
    constexpr int COL_TILE = 32;  // columns per task: wide enough to stream each dout row in pieces
#pragma omp parallel for schedule(static)
    for (int d0 = 0; d0 < D; d0 += COL_TILE) {
        int d1 = d0 + COL_TILE < D ? d0 + COL_TILE : D;
        for (int n = 0; n < N; n++) {
            T_* drow = dwte + (size_t)tokens[n] * D;  // (D)
            const T_* g = dout + (size_t)n * D;       // (D)
            for (int d = d0; d < d1; d++) drow[d] += g[d];
        }
    }
}

}  // namespace hl
