// moe.h — the mixture-of-experts FFN (DESIGN.md "Mixture of experts", paper Table 4): one shared SwiGLU expert
// that every token uses, plus the top-1 of E routed SwiGLU experts, all of hidden width F:
//   logits = x · Rᵀ                          R: router (E, D)
//   score  = sigmoid(logits)                 (N, E)
//   e(x)   = argmax_e (score_e + bias_e)     bias: selection only, not trained; ties → lowest index
//   g      = score_{e(x)}                    the chosen expert's unbiased score, not normalised
//   out    = SwiGLU_shared(x) + g · SwiGLU_{e(x)}(x)
// The routed experts run grouped: tokens are sorted by expert (a stable counting sort), gathered into one
// contiguous block per expert, each block goes through its expert's SwiGLU (model/swiglu.h, three matmuls),
// and the results are scattered back, scaled by g. Balancing is auxiliary-loss-free: after each optimizer step
// moe_update_bias nudges the bias of over-loaded experts down and under-loaded ones up.
#pragma once
#include <cstddef>         // size_t
#include "model/common.h"  // Arena, HL_CHECK, Rng, sigmoid
#include "model/matmul.h"  // matmul_forward (the router)
#include "model/swiglu.h"  // SwiGLUConfig/Params/Acts, swiglu_params/acts, swiglu_forward/backward

namespace hl {

struct MoEConfig {
    int d_model = 0;
    int d_ff = 0;          // F: hidden width of each expert, shared and routed (= the dense FFN's d_ff / 2)
    int n_experts = 8;     // E routed experts; each token uses the shared one and the top-1 routed one
    double bias_rate = 1e-3;
};

inline void moe_check(const MoEConfig& c) {
    HL_CHECK(c.d_model > 0, "moe: d_model must be positive, got ", c.d_model);
    HL_CHECK(c.d_ff > 0, "moe: d_ff (each expert's hidden width) must be positive, got ", c.d_ff);
    HL_CHECK(c.n_experts > 0, "moe: n_experts must be positive, got ", c.n_experts);
    HL_CHECK(c.bias_rate >= 0, "moe: bias_rate must be >= 0, got ", c.bias_rate);
}

// Every expert, shared or routed, is a SwiGLU from D to F to D.
inline SwiGLUConfig moe_expert_config(const MoEConfig& c) { return SwiGLUConfig{c.d_model, c.d_ff}; }

template <typename T>
struct MoEParams {
    SwiGLUParams<T> shared{};  // "shared.w1" (F, D), "shared.w3" (F, D), "shared.w2" (D, F)
    T* router = nullptr;       // "router" (E, D)
    T* w1 = nullptr;           // "experts.w1" (E, F, D)
    T* w3 = nullptr;           // "experts.w3" (E, F, D)
    T* w2 = nullptr;           // "experts.w2" (E, D, F)
};

template <typename T>
MoEParams<T> moe_params(Arena<T>& a, const MoEConfig& c) {
    moe_check(c);
    const int D = c.d_model, F = c.d_ff, E = c.n_experts;
    MoEParams<T> p;
    {
        typename Arena<T>::Scope s(a, "shared.");
        p.shared = swiglu_params(a, moe_expert_config(c));
    }
    p.router = a.take("router", {E, D});
    p.w1 = a.take("experts.w1", {E, F, D});
    p.w3 = a.take("experts.w3", {E, F, D});
    p.w2 = a.take("experts.w2", {E, D, F});
    return p;
}

// Routed expert e as a plain SwiGLU: views into the stacked (E, ...) weights (or their gradients).
template <typename T>
SwiGLUParams<T> moe_expert(const MoEParams<T>& p, const MoEConfig& c, int e) {
    const size_t FD = (size_t)c.d_ff * c.d_model;
    return SwiGLUParams<T>{p.w1 + e * FD, p.w3 + e * FD, p.w2 + e * FD};
}

// w1, w3, router ~ N(0, std); w2 (shared and routed) ~ N(0, out_std), the residual projections.
template <typename T>
void moe_init(MoEParams<T>& p, const MoEConfig& c, Rng& rng, double std, double out_std) {
    moe_check(c);
    const size_t FD = (size_t)c.d_ff * c.d_model, E = c.n_experts;
    rng.fill_normal(p.shared.w1, FD, std);
    rng.fill_normal(p.shared.w3, FD, std);
    rng.fill_normal(p.shared.w2, FD, out_std);
    rng.fill_normal(p.router, E * c.d_model, std);
    rng.fill_normal(p.w1, E * FD, std);
    rng.fill_normal(p.w3, E * FD, std);
    rng.fill_normal(p.w2, E * FD, out_std);
}

template <typename T>
struct MoEActs {
    SwiGLUActs<T> shared{};  // the shared expert's activations, N rows
    T* shared_out;           // (N, D)
    T* logits;               // (N, E) router logits
    T* gate;                 // (N)    g: sigmoid score of the chosen expert
    int* expert;             // (N)    chosen expert of each token
    int* offsets;            // (E+1)  rows of expert e are [offsets[e], offsets[e+1]) in the permuted order
    int* perm;               // (N)    perm[j] = the token at permuted row j (grouped by expert, ascending token
                             //        order inside a group: a stable counting sort)
    T* xp;                   // (N, D) permuted inputs (gathered)
    T* h1; T* h3; T* h;      // (N, F) permuted experts' hidden: W1·x, W3·x, SiLU(h1) ⊙ h3
    T* yp;                   // (N, D) permuted experts' outputs before the gate
    // backward scratch
    T* dyp;                  // (N, D) g · dout, permuted: the routed experts' output gradient
    T* dh1; T* dh3; T* dh;   // (N, F) the routed experts' hidden gradients
    T* dxp;                  // (N, D) the routed experts' input gradients, permuted
    T* scratch_dxp;          // (N, D) swiglu_backward's W3-path scratch for the routed experts
    T* dgate;                // (N)    dL/dg = dout · SwiGLU_e(x)
};

template <typename T>
MoEActs<T> moe_acts(Arena<T>& a, Arena<int>& ia, const MoEConfig& c, int N) {
    moe_check(c);
    HL_CHECK(N > 0, "moe: need N > 0 rows for activations, got ", N);
    const int D = c.d_model, F = c.d_ff, E = c.n_experts;
    MoEActs<T> x;
    {
        typename Arena<T>::Scope s(a, "shared.");
        x.shared = swiglu_acts(a, moe_expert_config(c), N);
    }
    x.shared_out = a.take_scratch("shared_out", {N, D});
    x.logits = a.take("logits", {N, E});
    x.gate = a.take("gate", {N});
    x.expert = ia.take("expert", {N});
    x.offsets = ia.take("offsets", {E + 1});
    x.perm = ia.take("perm", {N});
    x.xp = a.take("xp", {N, D});
    x.h1 = a.take("h1", {N, F});
    x.h3 = a.take("h3", {N, F});
    x.h = a.take("h", {N, F});
    x.yp = a.take("yp", {N, D});
    x.dyp = a.take_scratch("dyp", {N, D});
    x.dh1 = a.take_scratch("dh1", {N, F});
    x.dh3 = a.take_scratch("dh3", {N, F});
    x.dh = a.take_scratch("dh", {N, F});
    x.dxp = a.take_scratch("dxp", {N, D});
    x.scratch_dxp = a.take_scratch("scratch_dxp", {N, D});
    x.dgate = a.take("dgate", {N});
    return x;
}

// The routed experts' activations from permuted row r0 on, as a SwiGLUActs: what one expert's block sees.
template <typename T>
SwiGLUActs<T> moe_rows(const MoEActs<T>& acts, const MoEConfig& c, int r0) {
    const size_t F = c.d_ff, D = c.d_model, r = r0;
    return SwiGLUActs<T>{acts.h1 + r * F,  acts.h3 + r * F,  acts.h + r * F,
                         acts.dh1 + r * F, acts.dh3 + r * F, acts.dh + r * F,
                         acts.scratch_dxp + r * D};
}

// Routing: logits, the chosen expert and its gate for every token, then a stable counting sort of the tokens
// by expert into perm/offsets. bias (E) may be null (= zeros).
template <typename T>
void moe_route(MoEActs<T>& acts, const T* inp, const T* router, const T* bias, const MoEConfig& c, int N) {
    const int D = c.d_model, E = c.n_experts;
    matmul_forward(acts.logits, inp, router, (const T*)nullptr, N, D, E);  // (N, E)
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const T* logit = acts.logits + (size_t)n * E;
        int best = 0;
        T best_sel = T(0);
        for (int e = 0; e < E; e++) {
            T sel = sigmoid(logit[e]) + (bias ? bias[e] : T(0));  // the bias only decides, never scales
            if (e == 0 || sel > best_sel) { best = e; best_sel = sel; }  // strict >: ties keep the lower index
        }
        acts.expert[n] = best;
        acts.gate[n] = sigmoid(logit[best]);
    }
    // counting sort: offsets = exclusive prefix sum of the counts
    for (int e = 0; e <= E; e++) acts.offsets[e] = 0;
    for (int n = 0; n < N; n++) acts.offsets[acts.expert[n] + 1]++;
    for (int e = 0; e < E; e++) acts.offsets[e + 1] += acts.offsets[e];
    // each expert's tokens in token order (one pass per expert, as the GPU's one block per expert): no scratch
    for (int e = 0; e < E; e++)
        for (int n = 0, j = acts.offsets[e]; n < N; n++)
            if (acts.expert[n] == e) acts.perm[j++] = n;
}

// out (N, D) written. bias (E) may be null (= zeros).
template <typename T>
void moe_forward(T* out, MoEActs<T>& acts, const T* inp, const MoEParams<T>& p, const T* bias, const MoEConfig& c,
                 int N) {
    moe_check(c);
    HL_CHECK(N >= 0, "moe: bad row count N=", N);
    const int D = c.d_model, E = c.n_experts;
    const SwiGLUConfig ecfg = moe_expert_config(c);
    swiglu_forward(acts.shared_out, acts.shared, inp, p.shared, ecfg, N);  // every token
    moe_route(acts, inp, p.router, bias, c, N);
#pragma omp parallel for schedule(static)
    for (int j = 0; j < N; j++) {  // gather: xp[j] = inp[perm[j]]
        const T* x = inp + (size_t)acts.perm[j] * D;
        T* xp = acts.xp + (size_t)j * D;
        for (int d = 0; d < D; d++) xp[d] = x[d];
    }
    for (int e = 0; e < E; e++) {  // each expert on its contiguous block of rows
        const int r0 = acts.offsets[e], rows = acts.offsets[e + 1] - r0;
        if (rows == 0) continue;
        SwiGLUActs<T> a = moe_rows(acts, c, r0);
        swiglu_forward(acts.yp + (size_t)r0 * D, a, acts.xp + (size_t)r0 * D, moe_expert(p, c, e), ecfg, rows);
    }
#pragma omp parallel for schedule(static)
    for (int j = 0; j < N; j++) {  // scatter: perm is a bijection, so each output row is written once
        const int n = acts.perm[j];
        const T g = acts.gate[n];
        const T* s = acts.shared_out + (size_t)n * D;
        const T* y = acts.yp + (size_t)j * D;
        T* o = out + (size_t)n * D;
        for (int d = 0; d < D; d++) o[d] = s[d] + g * y[d];
    }
}

// dinp (N, D) written; dp.* accumulate. Routing is the forward's (acts.expert/perm/offsets): the argmax is
// piecewise constant, so the router's gradient flows through g alone:
//   dyp     = g · dout                        (into the routed expert's backward)
//   dg      = dout · SwiGLU_e(x)
//   dlogit  = dg · g · (1 − g)                (sigmoid', for the chosen expert's logit only)
//   dR_e   += dlogit · x,    dx += dlogit · R_e  (plus both experts' input gradients)
template <typename T>
void moe_backward(T* dinp, MoEParams<T>& dp, const T* dout, MoEActs<T>& acts, const T* inp, const MoEParams<T>& p,
                  const MoEConfig& c, int N) {
    moe_check(c);
    HL_CHECK(N >= 0, "moe: bad row count N=", N);
    const int D = c.d_model, E = c.n_experts;
    const SwiGLUConfig ecfg = moe_expert_config(c);
    swiglu_backward(dinp, dp.shared, dout, acts.shared, inp, p.shared, ecfg, N);  // writes dinp
#pragma omp parallel for schedule(static)
    for (int j = 0; j < N; j++) {  // gather the output gradient through the gate
        const int n = acts.perm[j];
        const T g = acts.gate[n];
        const T* dy = dout + (size_t)n * D;
        const T* y = acts.yp + (size_t)j * D;
        T* dyp = acts.dyp + (size_t)j * D;
        T dg = T(0);
        for (int d = 0; d < D; d++) {
            dyp[d] = g * dy[d];
            dg += dy[d] * y[d];
        }
        acts.dgate[n] = dg;
    }
    for (int e = 0; e < E; e++) {  // each expert's backward on its block; experts without tokens get nothing
        const int r0 = acts.offsets[e], rows = acts.offsets[e + 1] - r0;
        if (rows == 0) continue;
        SwiGLUActs<T> a = moe_rows(acts, c, r0);
        SwiGLUParams<T> de = moe_expert(dp, c, e);
        swiglu_backward(acts.dxp + (size_t)r0 * D, de, acts.dyp + (size_t)r0 * D, a, acts.xp + (size_t)r0 * D,
                        moe_expert(p, c, e), ecfg, rows);
    }
    // router and scatter, one expert per iteration: row e of dR and the rows of e's tokens belong to one thread
#pragma omp parallel for schedule(static)
    for (int e = 0; e < E; e++) {
        const T* R = p.router + (size_t)e * D;
        T* dR = dp.router + (size_t)e * D;
        for (int j = acts.offsets[e]; j < acts.offsets[e + 1]; j++) {
            const int n = acts.perm[j];
            const T g = acts.gate[n];
            const T dlogit = acts.dgate[n] * g * (T(1) - g);
            const T* x = inp + (size_t)n * D;
            const T* dxp = acts.dxp + (size_t)j * D;
            T* dx = dinp + (size_t)n * D;
            for (int d = 0; d < D; d++) {
                dR[d] += dlogit * x[d];
                dx[d] += dxp[d] + dlogit * R[d];
            }
        }
    }
}

// Auxiliary-loss-free balancing, after each optimizer step: bias_e += rate · sign(mean_load − load_e), where
// load_e = offsets[e+1] − offsets[e] tokens went to e in the last forward and mean_load = N / E; sign(0) = 0.
// The comparison is done in integers (N − E·load_e) so that an exactly balanced expert never moves.
template <typename T>
void moe_update_bias(T* bias, const int* offsets, int E, double rate) {
    HL_CHECK(E > 0, "moe_update_bias: n_experts must be positive, got ", E);
    const long long N = offsets[E] - offsets[0];
    for (int e = 0; e < E; e++) {
        const long long load = offsets[e + 1] - offsets[e];
        const long long diff = N - (long long)E * load;  // E · (mean_load − load_e)
        if (diff > 0) bias[e] += T(rate);
        if (diff < 0) bias[e] -= T(rate);
    }
}

}  // namespace hl
