// attention.h — causal grouped-query softmax attention (DESIGN.md §1 block A) at two levels:
//   1. the core: out = softmax(q·kᵀ/√d_qk, causal) · v, with query head h reading kv head h / (H/Hkv);
//   2. the attention mixer: projections Wq, Wk, Wv, RoPE on q and k, the core, and the output projection Wo.
//      It is split into a "branch" (everything up to the core's output) and the Wo on top, so the intra-layer
//      hybrid can reuse the branch with its own fusion and projections.
// d_qk (query/key head width) and d_v (value head width) may differ: the intra-layer hybrid uses reduced q/k
// and values of width d_model / H (DESIGN.md §P). The sequence length is called T_ because T is the float type.
#pragma once
#include <cmath>           // std::exp, std::sqrt
#include <cstddef>         // size_t
#include "model/common.h"  // HL_CHECK, Arena, zero
#include "model/matmul.h"  // matmul_forward/backward for every projection
#include "model/rope.h"    // rope_forward/backward on q and k

namespace hl {

// ---------------------------------------------------------------------------------------------------------
// 1. The core
// ---------------------------------------------------------------------------------------------------------

// Sliding-window attention with an attention sink (DESIGN.md, "Sliding-window baseline"): with window W > 0
// and sink S ≥ 0, query position t sees key position s iff s ≤ t and (t − s < W or s < S) — the last W
// positions (itself included) and the first S. W = 0 is full causal attention (S must then be 0).
// The one statement of the rule: nvcc compiles it for the device too, so the GPU kernels use it as is.
#ifdef __CUDACC__
#define HL_ATTN_HOST_DEVICE __host__ __device__
#else
#define HL_ATTN_HOST_DEVICE
#endif
HL_ATTN_HOST_DEVICE inline bool attn_visible(int t, int s, int window, int sink) {
    return s <= t && (window <= 0 || t - s < window || s < sink);
}

// How the rule meets a block of pairs, queries [qa, qb) × keys [ka, kb), in a sequence of T_ positions — what a
// tiled kernel (kernels/attention.cuh's tensor-core ones) asks before a block: NONE when every key comes after
// every query (no pair visible: the block is skipped), ALL when every pair is visible and every query, hence every
// key, is below T_ (no mask needed), else SOME (masked pair by pair). Blocks left SOME may still hold no visible
// pair (a window's far side): the mask then zeroes them all.
enum class AttnBlock { NONE, SOME, ALL };
HL_ATTN_HOST_DEVICE inline AttnBlock attn_block(int qa, int qb, int ka, int kb, int T_, int window, int sink) {
    if (ka > qb - 1) return AttnBlock::NONE;
    const bool all = kb - 1 <= qa && qb <= T_ && (window <= 0 || kb <= sink || qb - 1 - ka < window);
    return all ? AttnBlock::ALL : AttnBlock::SOME;
}

inline void attention_window_check(int window, int sink) {
    HL_CHECK(window >= 0 && sink >= 0, "attention: window and sink must be >= 0, got window=", window,
             " sink=", sink);
    HL_CHECK(sink == 0 || window > 0, "attention: a sink (", sink, ") needs a sliding window (window > 0)");
}

inline void attention_check(int B, int T_, int H, int Hkv, int d_qk, int d_v, int window = 0, int sink = 0) {
    HL_CHECK(B > 0 && T_ > 0 && H > 0 && Hkv > 0 && d_qk > 0 && d_v > 0, "attention: bad sizes B=", B, " T=", T_,
             " H=", H, " Hkv=", Hkv, " d_qk=", d_qk, " d_v=", d_v);
    HL_CHECK(H % Hkv == 0, "attention: n_heads (", H, ") must be a multiple of n_kv_heads (", Hkv, ")");
    attention_window_check(window, sink);
}

// a · b over n entries (a query-key score, or an output gradient against a value row)
template <typename T>
inline T attn_dot(const T* a, const T* b, int n) {
    T s = 0;
    for (int i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

// out (B, T, H, d_v) = Σ_s att[t, s] · v_s, att[t, :] = softmax over the visible s (attn_visible) of
// q_t · k_s / √d_qk. att (B, H, T, T) is saved for the backward; invisible entries (the future, and with a
// window the keys that slid out of it) are written as 0. window = 0: full causal attention.
// q (B, T, H, d_qk), k (B, T, Hkv, d_qk), v (B, T, Hkv, d_v).
template <typename T>
void attention_forward(T* out, T* att, const T* q, const T* k, const T* v, int B, int T_, int H, int Hkv, int d_qk,
                       int d_v, int window = 0, int sink = 0) {
    attention_check(B, T_, H, Hkv, d_qk, d_v, window, sink);
    const int group = H / Hkv;  // query heads sharing one kv head
    const T scale = T(1) / std::sqrt(T(d_qk));
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++) {
        for (int h = 0; h < H; h++) {
            const int g = h / group;  // the kv head this query head reads
            for (int t = 0; t < T_; t++) {
                const T* qt = q + (((size_t)b * T_ + t) * H + h) * d_qk;
                T* a = att + (((size_t)b * H + h) * T_ + t) * T_;  // row t of this head's (T, T) matrix
                zero(a, T_);  // masked entries get probability 0; the visible ones are overwritten below
                // scores of the visible keys, and their max for a stable softmax (s = t is always visible)
                T maxv = 0;
                bool first = true;
                for (int s = 0; s <= t; s++) {
                    if (!attn_visible(t, s, window, sink)) continue;
                    const T* ks = k + (((size_t)b * T_ + s) * Hkv + g) * d_qk;
                    a[s] = attn_dot(qt, ks, d_qk) * scale;
                    if (first || a[s] > maxv) maxv = a[s];
                    first = false;
                }
                T sum = 0;
                for (int s = 0; s <= t; s++) {
                    if (!attn_visible(t, s, window, sink)) continue;
                    a[s] = std::exp(a[s] - maxv);  // ≤ 1: no overflow
                    sum += a[s];
                }
                for (int s = 0; s <= t; s++)
                    if (attn_visible(t, s, window, sink)) a[s] /= sum;
                // out_t = Σ_s att[t, s] · v_s over the visible s
                T* o = out + (((size_t)b * T_ + t) * H + h) * d_v;
                zero(o, d_v);
                for (int s = 0; s <= t; s++) {
                    if (!attn_visible(t, s, window, sink)) continue;
                    const T* vs = v + (((size_t)b * T_ + s) * Hkv + g) * d_v;
                    for (int i = 0; i < d_v; i++) o[i] += a[s] * vs[i];
                }
            }
        }
    }
}

// dq, dk, dv are written (same shapes as q, k, v). With P = att[t, :] and dP[s] = dout_t · v_s:
//   dv_s  = Σ_h Σ_{t ≥ s} P[t, s] · dout_t            (summed over the query heads sharing the kv head)
//   dS[s] = P[s] · (dP[s] − Σ_s' P[s'] · dP[s'])       (backward through the softmax)
//   dq_t  = Σ_s dS[s] · k_s / √d_qk,   dk_s = Σ_h Σ_t dS[t, s] · q_t / √d_qk
// The sums run over the visible (t, s) only (window, sink as in the forward): masked entries get no gradient.
// Parallel over (b, kv head): each thread owns its kv head's dk/dv rows and its query heads' dq rows,
// so no two threads ever add into the same entry.
template <typename T>
void attention_backward(T* dq, T* dk, T* dv, const T* dout, const T* att, const T* q, const T* k, const T* v, int B,
                        int T_, int H, int Hkv, int d_qk, int d_v, int window = 0, int sink = 0) {
    attention_check(B, T_, H, Hkv, d_qk, d_v, window, sink);
    const int group = H / Hkv;
    const T scale = T(1) / std::sqrt(T(d_qk));
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++) {
        for (int g = 0; g < Hkv; g++) {
            for (int s = 0; s < T_; s++) {  // dk, dv are sums over query heads and positions: start at 0
                zero(dk + (((size_t)b * T_ + s) * Hkv + g) * d_qk, d_qk);
                zero(dv + (((size_t)b * T_ + s) * Hkv + g) * d_v, d_v);
            }
            for (int h = g * group; h < (g + 1) * group; h++) {
                for (int t = 0; t < T_; t++) {
                    const T* a = att + (((size_t)b * H + h) * T_ + t) * T_;
                    const T* dout_t = dout + (((size_t)b * T_ + t) * H + h) * d_v;
                    const T* qt = q + (((size_t)b * T_ + t) * H + h) * d_qk;
                    T* dqt = dq + (((size_t)b * T_ + t) * H + h) * d_qk;
                    // Σ_s P[s]·dP[s]; dP is recomputed below rather than stored, to need no length-T scratch
                    T rowdot = 0;
                    for (int s = 0; s <= t; s++)
                        if (attn_visible(t, s, window, sink))
                            rowdot += a[s] * attn_dot(dout_t, v + (((size_t)b * T_ + s) * Hkv + g) * d_v, d_v);
                    zero(dqt, d_qk);
                    for (int s = 0; s <= t; s++) {
                        if (!attn_visible(t, s, window, sink)) continue;
                        const T* vs = v + (((size_t)b * T_ + s) * Hkv + g) * d_v;
                        const T* ks = k + (((size_t)b * T_ + s) * Hkv + g) * d_qk;
                        T* dvs = dv + (((size_t)b * T_ + s) * Hkv + g) * d_v;
                        T* dks = dk + (((size_t)b * T_ + s) * Hkv + g) * d_qk;
                        T dP = attn_dot(dout_t, vs, d_v);
                        for (int i = 0; i < d_v; i++) dvs[i] += a[s] * dout_t[i];
                        T dS = a[s] * (dP - rowdot) * scale;  // the 1/√d_qk of the scores folded in
                        for (int i = 0; i < d_qk; i++) {
                            dqt[i] += dS * ks[i];
                            dks[i] += dS * qt[i];
                        }
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// 2. The attention mixer of block A, and its reusable branch
// ---------------------------------------------------------------------------------------------------------

// Block A uses d_qk = d_v = d_model / n_heads; the intra-layer hybrid sets them separately.
// window > 0 makes it sliding-window attention over the last `window` positions plus the first `sink`
// (attn_visible); window = 0 is full causal attention.
struct AttnConfig {
    int d_model = 0, n_heads = 0, n_kv_heads = 0, d_qk = 0, d_v = 0;
    double rope_theta = 500000.0;
    int window = 0;  // W: keys t − W < s ≤ t are visible; 0 = all keys s ≤ t
    int sink = 0;    // S: keys s < S are always visible (only with window > 0)
};

inline void attn_config_check(const AttnConfig& c) {
    HL_CHECK(c.d_model > 0 && c.n_heads > 0 && c.n_kv_heads > 0 && c.d_qk > 0 && c.d_v > 0,
             "attention config: sizes must be positive, got d_model=", c.d_model, " n_heads=", c.n_heads,
             " n_kv_heads=", c.n_kv_heads, " d_qk=", c.d_qk, " d_v=", c.d_v);
    HL_CHECK(c.n_heads % c.n_kv_heads == 0, "attention config: n_heads (", c.n_heads,
             ") must be a multiple of n_kv_heads (", c.n_kv_heads, ")");
    HL_CHECK(c.d_qk % 2 == 0, "attention config: d_qk must be even for RoPE, got ", c.d_qk);
    HL_CHECK(c.rope_theta > 0, "attention config: rope_theta must be positive, got ", c.rope_theta);
    HL_CHECK(c.window >= 0 && c.sink >= 0, "attention config: window and sink must be >= 0, got window=", c.window,
             " sink=", c.sink);
    HL_CHECK(c.sink == 0 || c.window > 0, "attention config: a sink (", c.sink,
             ") needs a sliding window (window > 0)");
}

// Weights as (out_features, in_features), the layout matmul_forward expects.
template <typename T>
struct AttnParams {
    T* wq = nullptr;  // (H·d_qk, D)
    T* wk = nullptr;  // (Hkv·d_qk, D)
    T* wv = nullptr;  // (Hkv·d_v, D)
    T* wo = nullptr;  // (D, H·d_v); null when the caller projects the branch output itself
};

// Saved activations, and the backward's scratch so that no call allocates.
template <typename T>
struct AttnActs {
    T* q = nullptr;    // (B, T, H, d_qk)   after Wq and RoPE
    T* k = nullptr;    // (B, T, Hkv, d_qk) after Wk and RoPE
    T* v = nullptr;    // (B, T, Hkv, d_v)  after Wv
    T* att = nullptr;  // (B, H, T, T)      softmax probabilities
    T* y = nullptr;    // (B, T, H·d_v)     core output = branch output
    // backward scratch
    T* dq = nullptr;         // (B, T, H, d_qk)
    T* dk = nullptr;         // (B, T, Hkv, d_qk)
    T* dv = nullptr;         // (B, T, Hkv, d_v)
    T* dy = nullptr;         // (B, T, H·d_v)  gradient of y (mixer backward only)
    T* dinp_part = nullptr;  // (B, T, D)      one projection's share of dinp, before it is added in
};

// Takes "wq", "wk", "wv" (and "wo") from the arena; with a prefix these become e.g. "layers.3.mixer.wq".
template <typename T>
AttnParams<T> attn_params(Arena<T>& a, const AttnConfig& c, bool with_wo = true) {
    attn_config_check(c);
    const int D = c.d_model, H = c.n_heads, Hkv = c.n_kv_heads;
    AttnParams<T> p;
    p.wq = a.take("wq", {H * c.d_qk, D});
    p.wk = a.take("wk", {Hkv * c.d_qk, D});
    p.wv = a.take("wv", {Hkv * c.d_v, D});
    if (with_wo) p.wo = a.take("wo", {D, H * c.d_v});
    return p;
}

template <typename T>
AttnActs<T> attn_acts(Arena<T>& a, const AttnConfig& c, int B, int T_) {
    attn_config_check(c);
    HL_CHECK(B > 0 && T_ > 0, "attention activations: bad sizes B=", B, " T=", T_);
    const int D = c.d_model, H = c.n_heads, Hkv = c.n_kv_heads;
    AttnActs<T> s;
    s.q = a.take("q", {B, T_, H, c.d_qk});
    s.k = a.take("k", {B, T_, Hkv, c.d_qk});
    s.v = a.take("v", {B, T_, Hkv, c.d_v});
    s.att = a.take("att", {B, H, T_, T_});
    s.y = a.take("y", {B, T_, H * c.d_v});
    s.dq = a.take_scratch("dq", {B, T_, H, c.d_qk});
    s.dk = a.take_scratch("dk", {B, T_, Hkv, c.d_qk});
    s.dv = a.take_scratch("dv", {B, T_, Hkv, c.d_v});
    s.dy = a.take_scratch("dy", {B, T_, H * c.d_v});
    s.dinp_part = a.take_scratch("dinp_part", {B, T_, D});
    return s;
}

// Branch: acts.y (B, T, H·d_v) = Attn(RoPE(Wq·inp), RoPE(Wk·inp), Wv·inp); no output projection.
// inp (B, T, D) is the normed residual stream n.
template <typename T>
void attn_branch_forward(AttnActs<T>& acts, const T* inp, const AttnParams<T>& p, const AttnConfig& c, int B, int T_) {
    attn_config_check(c);
    const int N = B * T_, D = c.d_model, H = c.n_heads, Hkv = c.n_kv_heads;
    matmul_forward(acts.q, inp, p.wq, (const T*)nullptr, N, D, H * c.d_qk);
    matmul_forward(acts.k, inp, p.wk, (const T*)nullptr, N, D, Hkv * c.d_qk);
    matmul_forward(acts.v, inp, p.wv, (const T*)nullptr, N, D, Hkv * c.d_v);
    // positions enter only through q and k: rotated in place, the rotated versions are what is saved
    rope_forward(acts.q, acts.q, B, T_, H, c.d_qk, c.rope_theta);
    rope_forward(acts.k, acts.k, B, T_, Hkv, c.d_qk, c.rope_theta);
    attention_forward(acts.y, acts.att, acts.q, acts.k, acts.v, B, T_, H, Hkv, c.d_qk, c.d_v, c.window, c.sink);
}

// dy (B, T, H·d_v): gradient of acts.y. dv_extra (B, T, Hkv·d_v) or null: gradient reaching v from another
// consumer (value sharing in the intra-layer hybrid), added before the Wv backward.
// dinp (B, T, D) is written; dp.* accumulate (a null dp field skips that gradient).
// Uses acts.dq, acts.dk, acts.dv, acts.dinp_part as scratch.
template <typename T>
void attn_branch_backward(T* dinp, AttnParams<T>& dp, const T* dy, const T* dv_extra, AttnActs<T>& acts,
                          const T* inp, const AttnParams<T>& p, const AttnConfig& c, int B, int T_) {
    attn_config_check(c);
    const int N = B * T_, D = c.d_model, H = c.n_heads, Hkv = c.n_kv_heads;
    attention_backward(acts.dq, acts.dk, acts.dv, dy, acts.att, acts.q, acts.k, acts.v, B, T_, H, Hkv, c.d_qk,
                       c.d_v, c.window, c.sink);
    if (dv_extra) {
        const size_t nv = (size_t)N * Hkv * c.d_v;
#pragma omp parallel for schedule(static)
        for (size_t i = 0; i < nv; i++) acts.dv[i] += dv_extra[i];
    }
    // undo the rotations: now dq, dk are gradients of the projections' outputs
    rope_backward(acts.dq, acts.dq, B, T_, H, c.d_qk, c.rope_theta);
    rope_backward(acts.dk, acts.dk, B, T_, Hkv, c.d_qk, c.rope_theta);
    // inp feeds three projections, so dinp is the sum of three matmul input gradients: the first is
    // written straight into dinp, the other two go through dinp_part and are added
    const size_t nx = (size_t)N * D;
    matmul_backward(dinp, dp.wq, (T*)nullptr, acts.dq, inp, p.wq, N, D, H * c.d_qk);
    matmul_backward(acts.dinp_part, dp.wk, (T*)nullptr, acts.dk, inp, p.wk, N, D, Hkv * c.d_qk);
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < nx; i++) dinp[i] += acts.dinp_part[i];
    matmul_backward(acts.dinp_part, dp.wv, (T*)nullptr, acts.dv, inp, p.wv, N, D, Hkv * c.d_v);
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < nx; i++) dinp[i] += acts.dinp_part[i];
}

// Full mixer: out (B, T, D) = Wo · branch(inp).
template <typename T>
void attn_mixer_forward(T* out, AttnActs<T>& acts, const T* inp, const AttnParams<T>& p, const AttnConfig& c, int B,
                        int T_) {
    HL_CHECK(p.wo != nullptr, "attention mixer: no output projection (params were made with with_wo = false)");
    attn_branch_forward(acts, inp, p, c, B, T_);
    matmul_forward(out, acts.y, p.wo, (const T*)nullptr, B * T_, c.n_heads * c.d_v, c.d_model);
}

// dinp (B, T, D) written; dp.* accumulate. Uses acts.dy as the gradient of the branch output.
template <typename T>
void attn_mixer_backward(T* dinp, AttnParams<T>& dp, const T* dout, AttnActs<T>& acts, const T* inp,
                         const AttnParams<T>& p, const AttnConfig& c, int B, int T_) {
    HL_CHECK(p.wo != nullptr, "attention mixer: no output projection (params were made with with_wo = false)");
    matmul_backward(acts.dy, dp.wo, (T*)nullptr, dout, acts.y, p.wo, B * T_, c.n_heads * c.d_v, c.d_model);
    attn_branch_backward(dinp, dp, acts.dy, (const T*)nullptr, acts, inp, p, c, B, T_);
}

}  // namespace hl
