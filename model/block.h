// block.h — the three blocks of DESIGN.md §1, each pre-norm with residuals and ending in a SwiGLU FFN:
//   A (transformer):   h = x + Attn(RMSNorm(x)),        y = h + SwiGLU(RMSNorm(h))
//   M (Mamba-2):       h = x + Mamba2(RMSNorm(x)),      y = h + SwiGLU(RMSNorm(h))
//   H (intra hybrid):  h = x + Fuse(Attn, Mamba2)(RMSNorm(x)),  y = h + SwiGLU(RMSNorm(h))
// The pattern letter S (sliding-window attention) is block A with a window in its AttnConfig. With MoE the
// FFN is model/moe.h's mixture of experts instead of one SwiGLU.
// A stack of them (a pattern such as "MMAMMH") is the model body; see model/model.h.
#pragma once
#include "model/attention.h"  // AttnConfig/Params/Acts, attn_mixer_forward/backward
#include "model/common.h"     // Arena, HL_CHECK
#include "model/intra.h"      // IntraConfig/Params/Acts, intra_mixer_forward/backward
#include "model/mamba2.h"     // Mamba2Config/Params/Acts, mamba2_mixer_forward/backward
#include "model/moe.h"        // MoEConfig/Params/Acts, moe_forward/backward (the FFN with --moe)
#include "model/rmsnorm.h"    // rmsnorm_forward/backward
#include "model/swiglu.h"     // SwiGLUConfig/Params/Acts, swiglu_forward/backward

namespace hl {

struct BlockConfig {
    char kind = 'A';     // 'A' attention (windowed for the pattern's S), 'M' Mamba-2, 'H' intra-layer hybrid
    int d_model = 0;
    AttnConfig attn;     // used by 'A'
    Mamba2Config ssm;    // used by 'M'
    IntraConfig intra;   // used by 'H'
    SwiGLUConfig ffn;    // the dense FFN, when !use_moe
    bool use_moe = false;
    MoEConfig moe;       // the mixture-of-experts FFN, when use_moe
    double norm_eps = 1e-5;
};

inline void block_config_check(const BlockConfig& c) {
    HL_CHECK(c.kind == 'A' || c.kind == 'M' || c.kind == 'H', "block kind '", c.kind, "' is not A, M or H");
    if (!c.use_moe) HL_CHECK(c.ffn.d_model == c.d_model, "block: FFN width ", c.ffn.d_model, " != d_model ", c.d_model);
    if (c.use_moe) {
        moe_check(c.moe);
        HL_CHECK(c.moe.d_model == c.d_model, "block: MoE width ", c.moe.d_model, " != d_model ", c.d_model);
    }
    if (c.kind == 'A') {
        attn_config_check(c.attn);
        HL_CHECK(c.attn.d_model == c.d_model, "block: attention d_model ", c.attn.d_model, " != ", c.d_model);
    }
    if (c.kind == 'M') {
        mamba2_config_check(c.ssm);
        HL_CHECK(c.ssm.d_model == c.d_model, "block: Mamba-2 d_model ", c.ssm.d_model, " != ", c.d_model);
    }
    if (c.kind == 'H') intra_config_check(c.intra);
}

template <typename T>
struct BlockParams {
    T* norm1 = nullptr;  // (D) before the mixer
    AttnParams<T> attn{};
    Mamba2Params<T> ssm{};
    IntraParams<T> intra{};
    T* norm2 = nullptr;  // (D) before the FFN
    SwiGLUParams<T> ffn{};
    MoEParams<T> moe{};
};

// Names: norm1, mixer.*, norm2, ffn.* under the arena's prefix (e.g. "layers.3.").
template <typename T>
BlockParams<T> block_params(Arena<T>& a, const BlockConfig& c) {
    BlockParams<T> p;
    p.norm1 = a.take("norm1", {c.d_model});
    {
        typename Arena<T>::Scope s(a, "mixer.");
        if (c.kind == 'A') p.attn = attn_params(a, c.attn);
        if (c.kind == 'M') p.ssm = mamba2_params(a, c.ssm);
        if (c.kind == 'H') p.intra = intra_params(a, c.intra);
    }
    p.norm2 = a.take("norm2", {c.d_model});
    {
        typename Arena<T>::Scope s(a, "ffn.");
        if (c.use_moe) p.moe = moe_params(a, c.moe);
        else p.ffn = swiglu_params(a, c.ffn);
    }
    return p;
}

template <typename T>
void block_init(BlockParams<T>& p, const BlockConfig& c, Rng& rng, int n_layers, double std = 0.02) {
    const int D = c.d_model;
    for (int i = 0; i < D; i++) p.norm1[i] = p.norm2[i] = T(1);
    const double out_std = std / std::sqrt(2.0 * n_layers);  // residual projections, as GPT-2/llm.c
    if (c.kind == 'A') {
        const AttnConfig& a = c.attn;
        rng.fill_normal(p.attn.wq, (size_t)a.n_heads * a.d_qk * D, std);
        rng.fill_normal(p.attn.wk, (size_t)a.n_kv_heads * a.d_qk * D, std);
        rng.fill_normal(p.attn.wv, (size_t)a.n_kv_heads * a.d_v * D, std);
        rng.fill_normal(p.attn.wo, (size_t)D * a.n_heads * a.d_v, out_std);
    }
    if (c.kind == 'M') mamba2_init(p.ssm, c.ssm, rng, n_layers);
    if (c.kind == 'H') intra_init(p.intra, c.intra, rng, n_layers, std);
    if (c.use_moe) {
        moe_init(p.moe, c.moe, rng, std, out_std);
        return;
    }
    rng.fill_normal(p.ffn.w1, (size_t)c.ffn.d_ff * D, std);
    rng.fill_normal(p.ffn.w3, (size_t)c.ffn.d_ff * D, std);
    rng.fill_normal(p.ffn.w2, (size_t)D * c.ffn.d_ff, out_std);
}

template <typename T>
struct BlockActs {
    T* n1;     // (B,T,D)  RMSNorm(x)
    T* rstd1;  // (B,T)
    AttnActs<T> attn{};
    Mamba2Acts<T> ssm{};
    IntraActs<T> intra{};
    T* mix;    // (B,T,D)  mixer output
    T* h;      // (B,T,D)  x + mix
    T* n2;     // (B,T,D)  RMSNorm(h)
    T* rstd2;  // (B,T)
    SwiGLUActs<T> ffn{};
    MoEActs<T> moe{};
    const T* moe_bias = nullptr;  // (E) the MoE's selection bias: model state (not a parameter), set by the model
    T* ffo;    // (B,T,D)  FFN output (a forward temporary: scratch)
    // backward scratch
    T* dn;     // (B,T,D)
    T* dh;     // (B,T,D)
};

// Index tensors (the MoE's routing) come from ia.
template <typename T>
BlockActs<T> block_acts(Arena<T>& a, Arena<int>& ia, const BlockConfig& c, int B, int T_) {
    BlockActs<T> x;
    const int N = B * T_, D = c.d_model;
    x.n1 = a.take("n1", {N, D});
    x.rstd1 = a.take("rstd1", {N});
    if (c.kind == 'A') x.attn = attn_acts(a, c.attn, B, T_);
    if (c.kind == 'M') x.ssm = mamba2_acts(a, c.ssm, B, T_);
    if (c.kind == 'H') x.intra = intra_acts(a, c.intra, B, T_);
    x.mix = a.take_scratch("mix", {N, D});
    x.h = a.take("h", {N, D});
    x.n2 = a.take("n2", {N, D});
    x.rstd2 = a.take("rstd2", {N});
    if (c.use_moe) x.moe = moe_acts(a, ia, c.moe, N);
    else x.ffn = swiglu_acts(a, c.ffn, N);
    x.ffo = a.take_scratch("ffo", {N, D});  // read only by block_forward's residual add
    x.dn = a.take_scratch("dn", {N, D});
    x.dh = a.take_scratch("dh", {N, D});
    return x;
}

// y (B,T,D) = block(x)
template <typename T>
void block_forward(T* y, BlockActs<T>& acts, const T* x, const BlockParams<T>& p, const BlockConfig& c, int B,
                   int T_) {
    const int N = B * T_, D = c.d_model;
    const T eps = T(c.norm_eps);
    rmsnorm_forward(acts.n1, acts.rstd1, x, p.norm1, N, 1, D, eps);
    if (c.kind == 'A') attn_mixer_forward(acts.mix, acts.attn, acts.n1, p.attn, c.attn, B, T_);
    if (c.kind == 'M') mamba2_mixer_forward(acts.mix, acts.ssm, acts.n1, p.ssm, c.ssm, B, T_);
    if (c.kind == 'H') intra_mixer_forward(acts.mix, acts.intra, acts.n1, p.intra, c.intra, B, T_);
    for (size_t i = 0; i < (size_t)N * D; i++) acts.h[i] = x[i] + acts.mix[i];
    rmsnorm_forward(acts.n2, acts.rstd2, acts.h, p.norm2, N, 1, D, eps);
    if (c.use_moe) moe_forward(acts.ffo, acts.moe, acts.n2, p.moe, acts.moe_bias, c.moe, N);
    else swiglu_forward(acts.ffo, acts.ffn, acts.n2, p.ffn, c.ffn, N);
    for (size_t i = 0; i < (size_t)N * D; i++) y[i] = acts.h[i] + acts.ffo[i];
}

// dx (B,T,D) written; dp.* accumulate. dx may alias dy (the model passes one residual-stream gradient).
template <typename T>
void block_backward(T* dx, BlockParams<T>& dp, const T* dy, BlockActs<T>& acts, const T* x, const BlockParams<T>& p,
                    const BlockConfig& c, int B, int T_) {
    const int N = B * T_, D = c.d_model;
    const size_t ND = (size_t)N * D;
    // y = h + FFN(RMSNorm(h)):  dh = dy + RMSNorm'ᵀ FFN'ᵀ dy
    if (c.use_moe) moe_backward(acts.dn, dp.moe, dy, acts.moe, acts.n2, p.moe, c.moe, N);
    else swiglu_backward(acts.dn, dp.ffn, dy, acts.ffn, acts.n2, p.ffn, c.ffn, N);
    rmsnorm_backward(acts.dh, dp.norm2, acts.dn, acts.h, p.norm2, acts.rstd2, N, 1, D);
    for (size_t i = 0; i < ND; i++) acts.dh[i] += dy[i];
    // h = x + mixer(RMSNorm(x)):  dx = dh + RMSNorm'ᵀ mixer'ᵀ dh
    if (c.kind == 'A') attn_mixer_backward(acts.dn, dp.attn, acts.dh, acts.attn, acts.n1, p.attn, c.attn, B, T_);
    if (c.kind == 'M') mamba2_mixer_backward(acts.dn, dp.ssm, acts.dh, acts.ssm, acts.n1, p.ssm, c.ssm, B, T_);
    if (c.kind == 'H') intra_mixer_backward(acts.dn, dp.intra, acts.dh, acts.intra, acts.n1, p.intra, c.intra, B, T_);
    rmsnorm_backward(dx, dp.norm1, acts.dn, x, p.norm1, acts.rstd1, N, 1, D);
    for (size_t i = 0; i < ND; i++) dx[i] += acts.dh[i];
}

}  // namespace hl
