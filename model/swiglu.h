// swiglu.h — the SwiGLU feed-forward network every block ends with (DESIGN.md §1):
//   out = W2 · (SiLU(W1·m) ⊙ W3·m)
// built from three bias-free projections (model/matmul.h) and an elementwise gate.
#pragma once
#include <cstddef>         // size_t
#include "model/common.h"  // Arena, HL_CHECK, silu, silu_grad
#include "model/matmul.h"  // matmul_forward/backward

namespace hl {

struct SwiGLUConfig {
    int d_model;  // D: input and output width
    int d_ff;     // hidden width
};

inline void swiglu_check(const SwiGLUConfig& cfg) {
    HL_CHECK(cfg.d_model > 0 && cfg.d_ff > 0, "swiglu: bad config d_model=", cfg.d_model, " d_ff=", cfg.d_ff);
}

template <typename T>
struct SwiGLUParams {
    T* w1;  // (d_ff, D)  gate projection (through SiLU)
    T* w3;  // (d_ff, D)  up projection (linear)
    T* w2;  // (D, d_ff)  down projection
};

// Lays out the weights in an arena under the names "w1", "w3", "w2" (the arena's prefix names the block).
template <typename T>
SwiGLUParams<T> swiglu_params(Arena<T>& a, const SwiGLUConfig& cfg) {
    swiglu_check(cfg);
    SwiGLUParams<T> p;
    p.w1 = a.take("w1", {cfg.d_ff, cfg.d_model});
    p.w3 = a.take("w3", {cfg.d_ff, cfg.d_model});
    p.w2 = a.take("w2", {cfg.d_model, cfg.d_ff});
    return p;
}

// Saved activations (forward) and the backward's workspace, for N = B·T rows.
template <typename T>
struct SwiGLUActs {
    T* h1;            // (N, d_ff)  W1·m, saved: the SiLU's input
    T* h3;            // (N, d_ff)  W3·m
    T* h;             // (N, d_ff)  SiLU(h1) ⊙ h3, saved: W2's input
    T* dh1;           // (N, d_ff)
    T* dh3;           // (N, d_ff)
    T* dh;            // (N, d_ff)
    T* scratch_dinp;  // (N, D)  matmul_backward writes dinp, so the W3 path lands here before the sum
};

template <typename T>
SwiGLUActs<T> swiglu_acts(Arena<T>& a, const SwiGLUConfig& cfg, int N) {
    swiglu_check(cfg);
    HL_CHECK(N > 0, "swiglu: need N > 0 rows for activations, got ", N);
    SwiGLUActs<T> s;
    s.h1 = a.take("h1", {N, cfg.d_ff});
    s.h3 = a.take("h3", {N, cfg.d_ff});
    s.h = a.take("h", {N, cfg.d_ff});
    s.dh1 = a.take_scratch("dh1", {N, cfg.d_ff});
    s.dh3 = a.take_scratch("dh3", {N, cfg.d_ff});
    s.dh = a.take_scratch("dh", {N, cfg.d_ff});
    s.scratch_dinp = a.take_scratch("scratch_dinp", {N, cfg.d_model});
    return s;
}

// out (N, D) = W2 · (SiLU(W1·inp) ⊙ W3·inp)
template <typename T>
void swiglu_forward(T* out, SwiGLUActs<T>& acts, const T* inp, const SwiGLUParams<T>& p, const SwiGLUConfig& cfg,
                    int N) {
    swiglu_check(cfg);
    HL_CHECK(N >= 0, "swiglu: bad row count N=", N);
    const int D = cfg.d_model, F = cfg.d_ff;
    matmul_forward(acts.h1, inp, p.w1, (const T*)nullptr, N, D, F);  // (N, F)
    matmul_forward(acts.h3, inp, p.w3, (const T*)nullptr, N, D, F);  // (N, F)
    const size_t NF = (size_t)N * F;
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < NF; i++) acts.h[i] = silu(acts.h1[i]) * acts.h3[i];
    matmul_forward(out, acts.h, p.w2, (const T*)nullptr, N, F, D);  // (N, D)
}

// dinp (N, D) is written; dp.w1, dp.w3, dp.w2 accumulate (+=). With h = SiLU(h1) ⊙ h3:
//   dh  = dout · W2                      dW2 += doutᵀ · h
//   dh1 = dh ⊙ h3 ⊙ SiLU'(h1)            dh3 = dh ⊙ SiLU(h1)
//   dinp = dh1 · W1 + dh3 · W3           dW1 += dh1ᵀ · inp,  dW3 += dh3ᵀ · inp
template <typename T>
void swiglu_backward(T* dinp, SwiGLUParams<T>& dp, const T* dout, SwiGLUActs<T>& acts, const T* inp,
                     const SwiGLUParams<T>& p, const SwiGLUConfig& cfg, int N) {
    swiglu_check(cfg);
    HL_CHECK(N >= 0, "swiglu: bad row count N=", N);
    const int D = cfg.d_model, F = cfg.d_ff;
    matmul_backward(acts.dh, dp.w2, (T*)nullptr, dout, acts.h, p.w2, N, F, D);  // dh (N, F)
    const size_t NF = (size_t)N * F;
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < NF; i++) {
        T g = acts.dh[i];
        acts.dh1[i] = g * acts.h3[i] * silu_grad(acts.h1[i]);
        acts.dh3[i] = g * silu(acts.h1[i]);
    }
    matmul_backward(dinp, dp.w1, (T*)nullptr, acts.dh1, inp, p.w1, N, D, F);               // W1 path
    matmul_backward(acts.scratch_dinp, dp.w3, (T*)nullptr, acts.dh3, inp, p.w3, N, D, F);  // W3 path
    const size_t ND = (size_t)N * D;
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < ND; i++) dinp[i] += acts.scratch_dinp[i];  // both projections read inp
}

}  // namespace hl
