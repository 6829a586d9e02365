// generate.h — cached, one-token-at-a-time inference on the CPU, and sampling.
//
// The training forward (model/model.h) reads a whole sequence at once. To generate, each new token only
// needs what the earlier tokens left behind, so every layer keeps a small state and runs one step:
//   A (attention):   a KV cache — the keys (after RoPE) and values of every earlier position; the new
//                    query attends over all of them. Grows with the context: (B, max_len, Hkv, d_qk + d_v).
//                    A sliding-window layer (window W, sink S) keeps only what it can still see: S sink
//                    slots and a ring of W slots, (B, min(max_len, S + W), Hkv, d_qk + d_v).
//   M (Mamba-2):     the recurrent state — the last d_conv−1 inputs of the causal conv, and the SSM state
//                    S (H, P, N) of the recurrence S_t = exp(dt·A)·S_{t−1} + dt·x_t ⊗ B_t. Fixed size.
//   H (intra):       both, for its attention branch and its Mamba branch.
// model_step pushes one token per sequence through embedding → blocks → final norm → LM head and returns
// the next-token logits; feeding a sequence token by token gives the same logits as the full forward.
//
// Pieces reused from the training path: matmul_forward (every projection), rmsnorm_forward (block norms,
// gated norm, final norm), rope_forward at position pos, swiglu_forward and embedding_forward with one row
// per sequence. Written here because the training code has no single-step form of them: the attention of
// one query over the cache, the conv step and the SSD recurrence step. The intra fusion tail
// (intra_fuse_forward) is the training forward's own, from model/intra.h.
#pragma once
#include <algorithm>       // std::max, std::nth_element
#include <cmath>           // std::exp, std::sqrt
#include <cstddef>         // size_t
#include <cstdint>         // uint64_t
#include <functional>      // std::function (the streaming callback), std::greater (top-k)
#include <string>          // std::string, std::to_string
#include <utility>         // std::swap of the residual buffers
#include <vector>          // std::vector for the state's two allocations
#include "model/attention.h"  // AttnConfig, AttnParams, attn_dot
#include "model/block.h"      // BlockConfig, BlockParams
#include "model/common.h"     // Arena, Rng, HL_CHECK, silu, softplus, zero
#include "model/embedding.h"  // embedding_forward for the new tokens
#include "model/intra.h"      // IntraConfig, IntraParams, IntraActs (the fusion tail's buffers)
#include "model/mamba2.h"     // Mamba2Config, Mamba2Params, MAMBA2_NORM_EPS
#include "model/moe.h"        // MoEActs, moe_forward: the FFN of MoE blocks
#include "model/matmul.h"     // matmul_forward for every projection and the LM head
#include "model/model.h"      // Model
#include "model/rmsnorm.h"    // rmsnorm_forward
#include "model/rope.h"       // rope_forward at the new position
#include "model/swiglu.h"     // SwiGLUActs, swiglu_forward

namespace hl {

// ---------------------------------------------------------------------------------------------------------
// 1. Per-layer caches (kept between steps) and step scratch (rewritten every step)
// ---------------------------------------------------------------------------------------------------------

// The attention cache: keys after RoPE, so a cached key never needs rotating again. Position p lives in
// slot attn_cache_slot(p, ...) of len = attn_cache_len(c, max_len) slots.
template <typename T>
struct AttnCache {
    T* k = nullptr;  // (B, len, Hkv, d_qk)
    T* v = nullptr;  // (B, len, Hkv, d_v)
    int len = 0;     // slots per sequence
};

// Slots per sequence: every position for full attention; for a sliding window (W, S) only the positions a
// later query can still see — the S sinks and the last W — so the cache stops growing at S + W.
inline int attn_cache_len(const AttnConfig& c, int max_len) {
    return c.window > 0 ? int(std::min<long long>(max_len, (long long)c.sink + c.window)) : max_len;
}

// The slot of position p: p itself without a window, or while p is a sink (p < S); otherwise a ring of W
// slots after the sinks, where p overwrites p − W — a position no query from p on can see (t − (p − W) ≥ W).
inline int attn_cache_slot(int p, int window, int sink) {
    return window > 0 && p >= sink ? sink + (p - sink) % window : p;
}

// The Mamba-2 recurrent state: everything the next token needs from the past, whatever its length.
template <typename T>
struct Mamba2State {
    T* conv = nullptr;  // (B, d_conv−1, conv_dim)  the conv's last inputs, oldest first; null when d_conv = 1
    T* ssm = nullptr;   // (B, H, P, N)             S of the recurrence
};

// One layer's cache: attention for A, Mamba for M, both for H.
template <typename T>
struct LayerCache {
    AttnCache<T> attn{};
    Mamba2State<T> ssm{};
};

template <typename T>
AttnCache<T> attn_cache(Arena<T>& a, const AttnConfig& c, int B, int max_len) {
    AttnCache<T> s;
    s.len = attn_cache_len(c, max_len);
    s.k = a.take("k_cache", {B, s.len, c.n_kv_heads, c.d_qk});
    s.v = a.take("v_cache", {B, s.len, c.n_kv_heads, c.d_v});
    return s;
}

template <typename T>
Mamba2State<T> mamba2_state(Arena<T>& a, const Mamba2Config& c, int B) {
    Mamba2State<T> s;
    if (c.d_conv > 1) s.conv = a.take("conv_state", {B, c.d_conv - 1, c.conv_dim()});
    s.ssm = a.take("ssm_state", {B, c.nheads(), c.headdim, c.d_state});
    return s;
}

template <typename T>
LayerCache<T> layer_cache(Arena<T>& a, const BlockConfig& c, int B, int max_len) {
    LayerCache<T> s;
    if (c.kind == 'A') s.attn = attn_cache(a, c.attn, B, max_len);
    if (c.kind == 'M') s.ssm = mamba2_state(a, c.ssm, B);
    if (c.kind == 'H') {
        s.attn = attn_cache(a, c.intra.attn, B, max_len);
        s.ssm = mamba2_state(a, c.intra.ssm, B);
    }
    return s;
}

// Step scratch of the attention branch: one row per sequence.
template <typename T>
struct AttnStep {
    T* q = nullptr;    // (B, H, d_qk)     the new query, after RoPE
    T* k = nullptr;    // (B, Hkv, d_qk)   the new key, after RoPE (then copied into the cache)
    T* v = nullptr;    // (B, Hkv, d_v)    the new value (then copied into the cache)
    T* att = nullptr;  // (B, H, len)      softmax weights over the cache slots (len = attn_cache_len)
    T* y = nullptr;    // (B, H·d_v)       branch output
};

// Step scratch of the Mamba-2 branch (and the M mixer's gated norm).
template <typename T>
struct Mamba2Step {
    T* zxbcdt = nullptr;   // (B, d_in_proj)  in_proj output [z, xBC, dt_raw]
    T* conv_in = nullptr;  // (B, conv_dim)   the conv's new input [x, B, C]
    T* xBC = nullptr;      // (B, conv_dim)   after conv and SiLU
    T* x = nullptr;        // (B, H, P)
    T* Bm = nullptr;       // (B, G, N)
    T* Cm = nullptr;       // (B, G, N)
    T* dt = nullptr;       // (B, H)          softplus(dt_raw + dt_bias)
    T* A = nullptr;        // (H)             −exp(A_log)
    T* y = nullptr;        // (B, H, P)       S·C + D·x
    T* g = nullptr;        // (B, d_inner)    y ⊙ SiLU(z): the branch output
    T* gn = nullptr;       // (B, d_inner)    M mixer: gated norm output
    T* rstd = nullptr;     // (B, G)          M mixer
};

// Step scratch of one block.
template <typename T>
struct BlockStep {
    T* n1 = nullptr;     // (B, D)  RMSNorm(x)
    T* rstd1 = nullptr;  // (B)
    AttnStep<T> attn{};
    Mamba2Step<T> ssm{};
    T* x_shared = nullptr;  // (B, Ws)  H with value=shared: V expanded to the query heads
    IntraActs<T> fuse{};    // H: only the fusion tail's fields (a1 … tmp_out), one row per sequence
    T* mix = nullptr;    // (B, D)  mixer output
    T* h = nullptr;      // (B, D)  x + mix
    T* n2 = nullptr;     // (B, D)  RMSNorm(h)
    T* rstd2 = nullptr;  // (B)
    SwiGLUActs<T> ffn{};  // forward fields only (h1, h3, h)
    MoEActs<T> moe{};     // with MoE instead: the mixture's activations for B rows
    T* ffo = nullptr;    // (B, D)  FFN output
};

template <typename T>
AttnStep<T> attn_step_scratch(Arena<T>& a, const AttnConfig& c, int B, int max_len) {
    AttnStep<T> s;
    s.q = a.take("q", {B, c.n_heads, c.d_qk});
    s.k = a.take("k", {B, c.n_kv_heads, c.d_qk});
    s.v = a.take("v", {B, c.n_kv_heads, c.d_v});
    s.att = a.take("att", {B, c.n_heads, attn_cache_len(c, max_len)});
    s.y = a.take("y", {B, c.n_heads * c.d_v});
    return s;
}

template <typename T>
Mamba2Step<T> mamba2_step_scratch(Arena<T>& a, const Mamba2Config& c, int B, bool mixer) {
    const int H = c.nheads(), GN = c.ngroups * c.d_state;
    Mamba2Step<T> s;
    s.zxbcdt = a.take("zxbcdt", {B, c.d_in_proj()});
    s.conv_in = a.take("conv_in", {B, c.conv_dim()});
    s.xBC = a.take("xBC", {B, c.conv_dim()});
    s.x = a.take("x", {B, c.d_inner});
    s.Bm = a.take("Bm", {B, GN});
    s.Cm = a.take("Cm", {B, GN});
    s.dt = a.take("dt", {B, H});
    s.A = a.take("A", {H});
    s.y = a.take("y", {B, c.d_inner});
    s.g = a.take("g", {B, c.d_inner});
    if (mixer) {
        s.gn = a.take("gn", {B, c.d_inner});
        s.rstd = a.take("rstd", {B, c.ngroups});
    }
    return s;
}

template <typename T>
BlockStep<T> block_step_scratch(Arena<T>& a, Arena<int>& ia, const BlockConfig& c, int B, int max_len) {
    const int D = c.d_model;
    BlockStep<T> s;
    s.n1 = a.take("n1", {B, D});
    s.rstd1 = a.take("rstd1", {B});
    if (c.kind == 'A') s.attn = attn_step_scratch(a, c.attn, B, max_len);
    if (c.kind == 'M') s.ssm = mamba2_step_scratch(a, c.ssm, B, /*mixer=*/true);
    if (c.kind == 'H') {
        const IntraConfig& ic = c.intra;
        const int Wa = ic.attn_width(), Ws = ic.ssm_width(), Wf = ic.fused_width();
        s.attn = attn_step_scratch(a, ic.attn, B, max_len);
        s.ssm = mamba2_step_scratch(a, ic.ssm, B, /*mixer=*/false);
        s.x_shared = a.take("x_shared", {B, Ws});
        s.fuse.a1 = a.take("a1", {B, Wa});
        s.fuse.rstd_a = a.take("rstd_a", {B, ic.attn.n_heads});
        s.fuse.a3 = a.take("a3", {B, Wa});
        s.fuse.s1 = a.take("s1", {B, Ws});
        s.fuse.rstd_s = a.take("rstd_s", {B, ic.ssm.nheads()});
        s.fuse.s2 = a.take("s2", {B, Ws});
        s.fuse.f = a.take("f", {B, Wf});
        s.fuse.tmp_out = a.take("tmp_out", {B, D});
    }
    s.mix = a.take("mix", {B, D});
    s.h = a.take("h", {B, D});
    s.n2 = a.take("n2", {B, D});
    s.rstd2 = a.take("rstd2", {B});
    if (c.use_moe) {
        s.moe = moe_acts(a, ia, c.moe, B);
    } else {
        s.ffn.h1 = a.take("ffn_h1", {B, c.ffn.d_ff});
        s.ffn.h3 = a.take("ffn_h3", {B, c.ffn.d_ff});
        s.ffn.h = a.take("ffn_h", {B, c.ffn.d_ff});
    }
    s.ffo = a.take("ffo", {B, D});
    return s;
}

// ---------------------------------------------------------------------------------------------------------
// 2. The inference state of a whole model: caches + scratch, allocated once
// ---------------------------------------------------------------------------------------------------------

// Holds B sequences of up to max_len tokens each. All sequences advance together, one position per
// model_step. Two allocations: `cache` (what carries from step to step, reported by cache_bytes) and
// `scratch` (rewritten every step). Nothing is allocated by a step.
template <typename T>
struct InferenceState {
    int B = 0, max_len = 0;
    int pos = 0;  // the position the next token goes to = tokens seen so far
    // what this state was laid out for, checked by model_step
    std::string pattern;
    int d_model = 0, vocab_size = 0;

    std::vector<T> cache;               // every layer's KV cache / conv state / SSM state
    std::vector<LayerCache<T>> layers;  // views into cache
    std::vector<T> scratch;
    std::vector<int> iscratch;          // index scratch (MoE routing), laid out like scratch
    std::vector<BlockStep<T>> steps;    // views into scratch; every layer's start at the same address
    T* x = nullptr;       // (B, D)  residual stream into a block
    T* y = nullptr;       // (B, D)  residual stream out of a block (then swapped with x)
    T* xf = nullptr;      // (B, D)  final norm
    T* rstdf = nullptr;   // (B)
    std::vector<int> step_tokens;  // (B)  model_prefill's column of tokens for one position

    InferenceState(const Model<T>& m, int B_, int max_len_)
        : B(B_), max_len(max_len_), pattern(m.cfg.pattern), d_model(m.cfg.d_model), vocab_size(m.cfg.vocab_size) {
        HL_CHECK(B > 0 && max_len > 0, "InferenceState: batch and max_len must be positive, got batch ", B,
                 ", max_len ", max_len);
        const int L = m.cfg.n_layers, D = m.cfg.d_model;
        HL_CHECK(int(m.blocks.size()) == L, "InferenceState: the model has ", m.blocks.size(), " block configs for ",
                 L, " layers");
        // caches: laid out once to count, once more for the views
        auto cache_layout = [&](Arena<T>& a) {
            layers.clear();
            for (int l = 0; l < L; l++) {
                typename Arena<T>::Scope s(a, "layers." + std::to_string(l) + ".");
                layers.push_back(layer_cache(a, m.blocks[size_t(l)], B, max_len));
            }
        };
        Arena<T> count;
        cache_layout(count);
        cache.assign(count.size, T(0));
        Arena<T> ca(cache.data());
        cache_layout(ca);
        // scratch: the model-level buffers, then one block's scratch. Layers run one after another and none
        // reads another's scratch, so every layer lays its views out from the same address; the allocation
        // is as large as the widest layer needs.
        size_t iwidest = 0;
        auto scratch_layout = [&](T* base, int* ibase) {
            Arena<T> a(base);
            x = a.take("x", {B, D});
            y = a.take("y", {B, D});
            xf = a.take("xf", {B, D});
            rstdf = a.take("rstdf", {B});
            const size_t common = a.size;
            size_t widest = 0;
            steps.clear();
            for (int l = 0; l < L; l++) {
                Arena<T> la(base ? base + common : nullptr);
                Arena<int> ia(ibase);
                steps.push_back(block_step_scratch(la, ia, m.blocks[size_t(l)], B, max_len));
                widest = std::max(widest, la.size);
                iwidest = std::max(iwidest, ia.size);
            }
            return common + widest;
        };
        scratch.assign(scratch_layout(nullptr, nullptr), T(0));
        iscratch.assign(iwidest, 0);
        scratch_layout(scratch.data(), iscratch.empty() ? nullptr : iscratch.data());
        step_tokens.assign(size_t(B), 0);
    }
    // the views point into this object's own buffers: a copy would point into the original's
    InferenceState(const InferenceState&) = delete;
    InferenceState& operator=(const InferenceState&) = delete;
    InferenceState(InferenceState&&) = default;
    InferenceState& operator=(InferenceState&&) = default;

    // Back to the empty context: zero caches and states, position 0.
    void reset() {
        zero(cache.data(), cache.size());
        pos = 0;
    }

    // Bytes carried from step to step (KV caches, conv and SSM states), not the per-step scratch.
    size_t cache_bytes() const { return cache.size() * sizeof(T); }
};

// ---------------------------------------------------------------------------------------------------------
// 3. Attention, one step
// ---------------------------------------------------------------------------------------------------------

// The new query of each sequence, at position pos, against the cached positions it can see (attn_visible;
// the new one included):
//   out (B, H, d_v) = Σ_s att[s] · v_s,  att = softmax_s(q · k_s / √d_qk)
// Position s is read from slot attn_cache_slot(s, window, sink). att (B, H, len) is scratch, by slot;
// q (B, H, d_qk); k_cache (B, len, Hkv, d_qk); v_cache (B, len, Hkv, d_v).
template <typename T>
void attention_step(T* out, T* att, const T* q, const T* k_cache, const T* v_cache, int B, int pos, int len, int H,
                    int Hkv, int d_qk, int d_v, int window = 0, int sink = 0) {
    const int group = H / Hkv;  // query heads sharing one kv head
    const T scale = T(1) / std::sqrt(T(d_qk));
    // the visible positions are two runs, in increasing order: [0, sink_end) — every s ≤ pos without a
    // window — and [win_begin, pos], the window (empty without one)
    const int sink_end = window > 0 ? std::min(sink, pos + 1) : pos + 1;
    const int win_begin = window > 0 ? std::max(sink_end, pos - window + 1) : pos + 1;
    auto for_visible = [&](auto&& f) {  // f(slot) for each visible position
        for (int s = 0; s < sink_end; s++) f(attn_cache_slot(s, window, sink));
        for (int s = win_begin; s <= pos; s++) f(attn_cache_slot(s, window, sink));
    };
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++) {
        for (int h = 0; h < H; h++) {
            const int g = h / group;
            const T* qh = q + ((size_t)b * H + h) * d_qk;
            T* a = att + ((size_t)b * H + h) * len;
            // scores and their max, for a softmax whose exponents are all ≤ 0
            T maxv = 0;
            bool first = true;
            for_visible([&](int j) {
                const T* kj = k_cache + (((size_t)b * len + j) * Hkv + g) * d_qk;
                a[j] = attn_dot(qh, kj, d_qk) * scale;
                if (first || a[j] > maxv) maxv = a[j];
                first = false;
            });
            T sum = 0;
            for_visible([&](int j) {
                a[j] = std::exp(a[j] - maxv);
                sum += a[j];
            });
            for_visible([&](int j) { a[j] /= sum; });
            T* o = out + ((size_t)b * H + h) * d_v;
            zero(o, d_v);
            for_visible([&](int j) {
                const T* vj = v_cache + (((size_t)b * len + j) * Hkv + g) * d_v;
                for (int i = 0; i < d_v; i++) o[i] += a[j] * vj[i];
            });
        }
    }
}

// The attention branch for the token at position pos: project q, k, v, rotate q and k to pos, put k and v
// in pos's cache slot, attend over the visible positions ≤ pos. The output is s.y (B, H·d_v); inp (B, D).
template <typename T>
void attn_branch_step(AttnStep<T>& s, AttnCache<T>& cache, const T* inp, const AttnParams<T>& p,
                      const AttnConfig& c, int B, int pos, int max_len) {
    const int D = c.d_model, H = c.n_heads, Hkv = c.n_kv_heads, dqk = c.d_qk, dv = c.d_v;
    HL_CHECK(cache.len == attn_cache_len(c, max_len), "attention step: the cache has ", cache.len,
             " slots, this layer needs ", attn_cache_len(c, max_len));
    matmul_forward(s.q, inp, p.wq, (const T*)nullptr, B, D, H * dqk);
    matmul_forward(s.k, inp, p.wk, (const T*)nullptr, B, D, Hkv * dqk);
    matmul_forward(s.v, inp, p.wv, (const T*)nullptr, B, D, Hkv * dv);
    // one "time step" per sequence, at position pos: the same rotation the full forward gives token pos
    rope_forward(s.q, s.q, B, 1, H, dqk, c.rope_theta, pos);
    rope_forward(s.k, s.k, B, 1, Hkv, dqk, c.rope_theta, pos);
    const int slot = attn_cache_slot(pos, c.window, c.sink), len = cache.len;
    for (int b = 0; b < B; b++) {
        for (int i = 0; i < Hkv * dqk; i++) cache.k[((size_t)b * len + slot) * Hkv * dqk + i] = s.k[(size_t)b * Hkv * dqk + i];
        for (int i = 0; i < Hkv * dv; i++) cache.v[((size_t)b * len + slot) * Hkv * dv + i] = s.v[(size_t)b * Hkv * dv + i];
    }
    attention_step(s.y, s.att, s.q, cache.k, cache.v, B, pos, len, H, Hkv, dqk, dv, c.window, c.sink);
}

// ---------------------------------------------------------------------------------------------------------
// 4. Mamba-2, one step
// ---------------------------------------------------------------------------------------------------------

// The causal depthwise conv for one new input, with its SiLU. The state holds the previous K−1 inputs
// (zeros before the sequence starts, as the full conv pads), oldest first, so with s the state:
//   out[c] = SiLU(bias[c] + Σ_{k<K−1} w[c, k] · s[k, c] + w[c, K−1] · inp[c])
// then the state shifts by one and inp becomes its newest entry.
// out (B, C) written; conv_state (B, K−1, C) updated; inp (B, C); w (C, K); bias (C).
template <typename T>
void conv1d_silu_step(T* out, T* conv_state, const T* inp, const T* w, const T* bias, int B, int C, int K) {
    // every (sequence, channel) is independent: its own taps, its own column of the state
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++) {
        for (int c = 0; c < C; c++) {
            T* st = conv_state ? conv_state + (size_t)b * (K - 1) * C : nullptr;  // (K−1, C)
            const T xc = inp[(size_t)b * C + c];
            T acc = bias[c];
            for (int k = 0; k < K - 1; k++) acc += w[(size_t)c * K + k] * st[(size_t)k * C + c];
            acc += w[(size_t)c * K + K - 1] * xc;
            out[(size_t)b * C + c] = silu(acc);
            // shift: the oldest input leaves, the new one enters at the end
            for (int k = 0; k + 1 < K - 1; k++) st[(size_t)k * C + c] = st[(size_t)(k + 1) * C + c];
            if (K > 1) st[(size_t)(K - 2) * C + c] = xc;
        }
    }
}

// One step of the SSD recurrence (DESIGN.md §1), per sequence b and head h (group g = h / (H/G)):
//   S = exp(dt·A_h) · S + dt · x ⊗ B        y = S · C + D_h · x
// y (B, H, P) written; state (B, H, P, N) updated; x (B, H, P); dt (B, H); A, D (H); Bm, Cm (B, G, N).
template <typename T>
void ssd_step(T* y, T* state, const T* x, const T* dt, const T* A, const T* Bm, const T* Cm, const T* D, int B,
              int H, int P, int G, int N) {
    const int heads_per_group = H / G;
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++) {
        for (int h = 0; h < H; h++) {
            const int g = h / heads_per_group;
            const T* xh = x + ((size_t)b * H + h) * P;  // (P)
            const T* Bt = Bm + ((size_t)b * G + g) * N;  // (N)
            const T* Ct = Cm + ((size_t)b * G + g) * N;  // (N)
            const T dth = dt[(size_t)b * H + h];
            const T decay = std::exp(dth * A[h]);  // in (0, 1]: the share of the old state that survives
            T* S = state + ((size_t)b * H + h) * P * N;  // (P, N)
            T* yh = y + ((size_t)b * H + h) * P;
            for (int p = 0; p < P; p++) {
                T acc = 0;
                for (int n = 0; n < N; n++) {
                    T v = decay * S[(size_t)p * N + n] + dth * xh[p] * Bt[n];
                    S[(size_t)p * N + n] = v;
                    acc += v * Ct[n];
                }
                yh[p] = acc + D[h] * xh[p];
            }
        }
    }
}

// The Mamba-2 branch for one new token, the step form of mamba2_branch_forward: writes s.g (B, d_inner).
// inp (B, d_model); x_shared (B, d_inner) when c.shared_x, else null.
template <typename T>
void mamba2_branch_step(Mamba2Step<T>& s, Mamba2State<T>& st, const T* inp, const T* x_shared,
                        const Mamba2Params<T>& p, const Mamba2Config& c, int B) {
    HL_CHECK(c.shared_x == (x_shared != nullptr), "mamba2 step: x_shared must be given exactly when shared_x is set");
    const int D = c.d_model, DI = c.d_inner, H = c.nheads(), GN = c.ngroups * c.d_state;
    const int CD = c.conv_dim(), DIP = c.d_in_proj();
    const int dt_off = DIP - H;  // the dt_raw columns are the last H of a zxbcdt row

    // [z, xBC, dt_raw] = in_proj · u
    matmul_forward(s.zxbcdt, inp, p.in_proj, (const T*)nullptr, B, D, DIP);
    // the conv's new input [x, B, C]: all from in_proj, or x from outside
    for (int b = 0; b < B; b++) {
        const T* zr = s.zxbcdt + (size_t)b * DIP;
        T* ci = s.conv_in + (size_t)b * CD;
        if (c.shared_x) {
            for (int i = 0; i < DI; i++) ci[i] = x_shared[(size_t)b * DI + i];
            for (int i = 0; i < 2 * GN; i++) ci[DI + i] = zr[DI + i];
        } else {
            for (int i = 0; i < CD; i++) ci[i] = zr[DI + i];
        }
    }
    // xBC = SiLU(conv1d(xBC)), from the conv state and the new input
    conv1d_silu_step(s.xBC, st.conv, s.conv_in, p.conv_w, p.conv_b, B, CD, c.d_conv);
    // split [x, B, C]; dt = softplus(dt_raw + dt_bias); A = −exp(A_log)
    for (int b = 0; b < B; b++) {
        const T* xbc = s.xBC + (size_t)b * CD;
        for (int i = 0; i < DI; i++) s.x[(size_t)b * DI + i] = xbc[i];
        for (int i = 0; i < GN; i++) s.Bm[(size_t)b * GN + i] = xbc[DI + i];
        for (int i = 0; i < GN; i++) s.Cm[(size_t)b * GN + i] = xbc[DI + GN + i];
        for (int h = 0; h < H; h++) s.dt[(size_t)b * H + h] = softplus(s.zxbcdt[(size_t)b * DIP + dt_off + h] + p.dt_bias[h]);
    }
    for (int h = 0; h < H; h++) s.A[h] = -std::exp(p.A_log[h]);
    // S = exp(dt·A)·S + dt·x⊗B,  y = S·C + D·x
    ssd_step(s.y, st.ssm, s.x, s.dt, s.A, s.Bm, s.Cm, p.D, B, H, c.headdim, c.ngroups, c.d_state);
    // g = y ⊙ SiLU(z)
    for (int b = 0; b < B; b++)
        for (int i = 0; i < DI; i++) s.g[(size_t)b * DI + i] = s.y[(size_t)b * DI + i] * silu(s.zxbcdt[(size_t)b * DIP + i]);
}

// ---------------------------------------------------------------------------------------------------------
// 5. The intra-layer fusion tail (the same math as the end of intra_mixer_forward)
// ---------------------------------------------------------------------------------------------------------

// intra_expand_shared_v and intra_fuse_forward (model/intra.h) are shared with the training forward.

// ---------------------------------------------------------------------------------------------------------
// 6. Blocks and the whole model, one step
// ---------------------------------------------------------------------------------------------------------

// y (B, D) = block(x (B, D)) for the token at position pos; the layer's cache is read and extended.
template <typename T>
void block_step(T* y, BlockStep<T>& s, LayerCache<T>& cache, const T* x, const BlockParams<T>& p, const T* moe_bias,
                const BlockConfig& c, int B, int pos, int max_len) {
    const int D = c.d_model;
    const T eps = T(c.norm_eps);
    rmsnorm_forward(s.n1, s.rstd1, x, p.norm1, B, 1, D, eps);
    if (c.kind == 'A') {  // Wo · Attn
        attn_branch_step(s.attn, cache.attn, s.n1, p.attn, c.attn, B, pos, max_len);
        matmul_forward(s.mix, s.attn.y, p.attn.wo, (const T*)nullptr, B, c.attn.n_heads * c.attn.d_v, D);
    }
    if (c.kind == 'M') {  // out_proj(RMSNorm_grouped(y ⊙ SiLU(z)) · norm_w)
        const Mamba2Config& mc = c.ssm;
        mamba2_branch_step(s.ssm, cache.ssm, s.n1, (const T*)nullptr, p.ssm, mc, B);
        rmsnorm_forward(s.ssm.gn, s.ssm.rstd, s.ssm.g, p.ssm.norm_w, B, mc.ngroups, mc.d_inner / mc.ngroups,
                        T(MAMBA2_NORM_EPS));
        matmul_forward(s.mix, s.ssm.gn, p.ssm.out_proj, (const T*)nullptr, B, mc.d_inner, D);
    }
    if (c.kind == 'H') {  // both branches (attention first: with shared values Mamba reads its V), then fuse
        const IntraConfig& ic = c.intra;
        attn_branch_step(s.attn, cache.attn, s.n1, p.intra.attn, ic.attn, B, pos, max_len);
        const T* x_shared = nullptr;
        if (ic.fusion.value == FusionValue::shared) {
            intra_expand_shared_v(s.x_shared, s.attn.v, ic, B);
            x_shared = s.x_shared;
        }
        mamba2_branch_step(s.ssm, cache.ssm, s.n1, x_shared, p.intra.ssm, ic.ssm, B);
        intra_fuse_forward(s.mix, s.fuse, s.attn.y, s.ssm.g, p.intra, ic, B);
    }
    for (size_t i = 0; i < (size_t)B * D; i++) s.h[i] = x[i] + s.mix[i];
    rmsnorm_forward(s.n2, s.rstd2, s.h, p.norm2, B, 1, D, eps);
    if (c.use_moe) moe_forward(s.ffo, s.moe, s.n2, p.moe, moe_bias, c.moe, B);  // each token routed on its own
    else swiglu_forward(s.ffo, s.ffn, s.n2, p.ffn, c.ffn, B);
    for (size_t i = 0; i < (size_t)B * D; i++) y[i] = s.h[i] + s.ffo[i];
}

// logits (B, V) of the token after tokens (B), one per sequence, each placed at position st.pos; the caches
// take the new position in, and st.pos advances by one.
template <typename T>
void model_step(T* logits, InferenceState<T>& st, const Model<T>& m, const int* tokens) {
    const ModelConfig& c = m.cfg;
    HL_CHECK(st.pattern == c.pattern && st.d_model == c.d_model && st.vocab_size == c.vocab_size,
             "model_step: the inference state was made for another model (pattern ", st.pattern, ", d_model ",
             st.d_model, ", vocab ", st.vocab_size, "; this model has ", c.pattern, ", ", c.d_model, ", ",
             c.vocab_size, ")");
    HL_CHECK(st.pos < st.max_len, "model_step: the inference state is full: ", st.max_len,
             " positions (max_len) are used; make it with a larger max_len or reset() it");
    const int B = st.B, D = c.d_model, V = c.vocab_size;
    embedding_forward(st.x, tokens, m.p.embed, B, 1, V, D);
    for (int l = 0; l < c.n_layers; l++) {
        block_step(st.y, st.steps[size_t(l)], st.layers[size_t(l)], st.x, m.p.layers[size_t(l)], m.moe_bias[size_t(l)],
                   m.blocks[size_t(l)], B,
                   st.pos, st.max_len);
        std::swap(st.x, st.y);  // this block's output is the next one's input
    }
    rmsnorm_forward(st.xf, st.rstdf, st.x, m.p.norm_f, B, 1, D, T(c.norm_eps));
    matmul_forward(logits, st.xf, m.p.lm_head, (const T*)nullptr, B, D, V);
    st.pos++;
}

// Feeds tokens (B, T_) one position at a time; logits (B, V) are those after the last one. (The CPU has
// no faster way in than the steps themselves; the GPU may prefill with the chunked forward.)
template <typename T>
void model_prefill(T* logits, InferenceState<T>& st, const Model<T>& m, const int* tokens, int T_) {
    HL_CHECK(T_ > 0, "model_prefill: need at least one token, got ", T_);
    HL_CHECK(st.pos + T_ <= st.max_len, "model_prefill: ", T_, " tokens after ", st.pos,
             " do not fit in the inference state's max_len = ", st.max_len);
    for (int t = 0; t < T_; t++) {
        for (int b = 0; b < st.B; b++) st.step_tokens[size_t(b)] = tokens[(size_t)b * T_ + t];
        model_step(logits, st, m, st.step_tokens.data());
    }
}

// ---------------------------------------------------------------------------------------------------------
// 7. Sampling and generation
// ---------------------------------------------------------------------------------------------------------

// The next token from one row of logits (V). temperature 0 is greedy (the argmax, lowest id on ties);
// otherwise softmax(logits / temperature) over the top_k largest logits (all when top_k ≤ 0 or ≥ V),
// sampled with one uniform draw from rng.
template <typename T>
int sample_token(const T* logits, int V, float temperature, int top_k, Rng& rng) {
    HL_CHECK(V > 0, "sample_token: vocabulary size must be positive, got ", V);
    HL_CHECK(temperature >= 0, "sample_token: temperature must be >= 0 (0 = greedy), got ", temperature);
    int best = 0;
    for (int i = 1; i < V; i++)
        if (logits[i] > logits[best]) best = i;
    if (temperature == 0) return best;
    // keep the k largest: those above the k-th largest logit (the cut), and ties at the cut, lowest ids
    // first, until k are kept
    const int k = (top_k <= 0 || top_k >= V) ? V : top_k;
    T cut = logits[best];
    int ties = 0;
    if (k < V) {
        std::vector<T> sorted(logits, logits + V);  // one small copy per sampled token, outside any forward
        std::nth_element(sorted.begin(), sorted.begin() + (k - 1), sorted.end(), std::greater<T>());
        cut = sorted[size_t(k - 1)];
        int above = 0;
        for (int i = 0; i < V; i++) above += logits[i] > cut;
        ties = k - above;
    }
    auto kept = [&](int i, int& ties_left) {
        if (k == V || logits[i] > cut) return true;
        if (logits[i] == cut && ties_left > 0) { ties_left--; return true; }
        return false;
    };
    // softmax weights exp((l − max) / temperature) ≤ 1, walked twice: to sum them, then to pick
    const double maxv = double(logits[best]), inv_t = 1.0 / double(temperature);
    double sum = 0;
    int ties_left = ties;
    for (int i = 0; i < V; i++)
        if (kept(i, ties_left)) sum += std::exp((double(logits[i]) - maxv) * inv_t);
    const double target = rng.uniform() * sum;
    double cum = 0;
    int last = best;
    ties_left = ties;
    for (int i = 0; i < V; i++) {
        if (!kept(i, ties_left)) continue;
        cum += std::exp((double(logits[i]) - maxv) * inv_t);
        last = i;
        if (target < cum) return i;
    }
    return last;  // target rounded up to the total
}

// n_new tokens continuing prompt (the continuation only), one sequence, with the caches: the prompt is
// prefilled, then each sampled token is fed back as the next step's input. on_token, when set, sees each
// token as soon as it is sampled (for streaming). Same seed, same tokens.
template <typename T>
std::vector<int> generate_cached(const Model<T>& m, const std::vector<int>& prompt, int n_new, float temperature,
                                 int top_k, uint64_t seed, std::function<void(int)> on_token = {}) {
    HL_CHECK(!prompt.empty(), "generate: the prompt must hold at least one token");
    HL_CHECK(n_new >= 0, "generate: n_new must be non-negative, got ", n_new);
    const int V = m.cfg.vocab_size;
    // the prompt, then every sampled token but the last goes through a step
    InferenceState<T> st(m, 1, int(prompt.size()) + std::max(n_new - 1, 0));
    std::vector<T> logits((size_t)V);  // (1, V)
    model_prefill(logits.data(), st, m, prompt.data(), int(prompt.size()));
    Rng rng(seed);
    std::vector<int> out;
    out.reserve(size_t(n_new));
    for (int i = 0; i < n_new; i++) {
        int next = sample_token(logits.data(), V, temperature, top_k, rng);
        out.push_back(next);
        if (on_token) on_token(next);
        if (i + 1 < n_new) model_step(logits.data(), st, m, &next);
    }
    return out;
}

}  // namespace hl
