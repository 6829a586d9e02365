// intra.h — the intra-layer hybrid mixer (DESIGN.md §1 block H, §P): attention heads and Mamba-2 heads
// read the same normalised input side by side, and their outputs are fused along five design axes
// (model/fusion.h). Forward and backward of every combination.
//
//   a  = attention branch (reduced q/k, values of width d_v = d_model / heads)   (B, T, Wa = heads·d_v)
//   s  = Mamba-2 branch, y ⊙ SiLU(z) before any norm                            (B, T, Ws = d_ssm)
//   norm=group : a1 = RMSNorm per head (d_v) · norm_a,  s1 = RMSNorm per head (P) · norm_s;  none: a1 = a, s1 = s
//   scale      : vector: s2 = scale_s ⊙ s1, a2 = scale_a ⊙ a1;  scalar: a2 = scale_a · a1 (one number);  none
//   op         : the attention side carries the sign, a3 = ±a2 (− for diff), so every op is a sum or a concat
//   out=sep    : out = out_s · s2 + out_a · a3            (one projection per branch, then add)
//   out=joint  : out = out_proj · (s2 + a3)   or   out_proj · [s2; a3]  (concat)
//   value=shared: the Mamba branch's x is the attention's V, each query head's slot holding its kv head's V.
#pragma once
#include <vector>             // std::vector
#include "model/attention.h"  // AttnConfig, attn_params/acts, attn_branch_forward/backward
#include "model/common.h"     // Arena, HL_CHECK
#include "model/fusion.h"     // FusionConfig and its axes
#include "model/mamba2.h"     // Mamba2Config, mamba2_params/acts, mamba2_branch_forward/backward
#include "model/matmul.h"     // matmul_forward/backward for the output projections
#include "model/rmsnorm.h"    // rmsnorm_forward/backward for the per-head branch norms

namespace hl {

struct IntraConfig {
    int d_model = 0;
    AttnConfig attn;    // n_heads × (d_qk, d_v); the branch output is n_heads·d_v wide
    Mamba2Config ssm;   // reduced d_inner; ssm.shared_x must equal (fusion.value == shared)
    FusionConfig fusion;
    int attn_width() const { return attn.n_heads * attn.d_v; }
    int ssm_width() const { return ssm.d_inner; }
    // width of what the joint projection reads
    int fused_width() const { return fusion.op == FusionOp::concat ? ssm_width() + attn_width() : ssm_width(); }
};

inline void intra_config_check(const IntraConfig& c) {
    fusion_check(c.fusion);
    attn_config_check(c.attn);
    mamba2_config_check(c.ssm);
    HL_CHECK(c.attn.d_model == c.d_model && c.ssm.d_model == c.d_model, "intra: branches must read d_model = ",
             c.d_model, " (attention reads ", c.attn.d_model, ", Mamba reads ", c.ssm.d_model, ")");
    HL_CHECK(c.ssm.shared_x == (c.fusion.value == FusionValue::shared),
             "intra: Mamba2Config.shared_x must match fusion value=", to_string(c.fusion.value));
    if (c.fusion.value == FusionValue::shared)
        HL_CHECK(c.ssm_width() == c.attn_width(), "fusion value=shared needs d_ssm (", c.ssm_width(),
                 ") = the attention's value width heads·d_v (", c.attn_width(), ")");
    if (c.fusion.out == FusionOut::joint && c.fusion.op != FusionOp::concat)
        HL_CHECK(c.ssm_width() == c.attn_width(), "fusion op=", to_string(c.fusion.op),
                 " with out=joint adds the branches, so d_ssm (", c.ssm_width(),
                 ") must equal the attention width heads·d_v (", c.attn_width(), ")");
}

template <typename T>
struct IntraParams {
    AttnParams<T> attn;    // wq, wk, wv (no wo)
    Mamba2Params<T> ssm;   // in_proj, conv, dt_bias, A_log, D (no norm_w, no out_proj)
    T* norm_a = nullptr;   // (Wa)          norm=group
    T* norm_s = nullptr;   // (Ws)          norm=group
    T* scale_a = nullptr;  // (Wa) or (1)   scale=vector | scalar
    T* scale_s = nullptr;  // (Ws)          scale=vector
    T* out_a = nullptr;    // (D, Wa)       out=sep
    T* out_s = nullptr;    // (D, Ws)       out=sep
    T* out_proj = nullptr; // (D, Wf)       out=joint
};

template <typename T>
IntraParams<T> intra_params(Arena<T>& a, const IntraConfig& c) {
    IntraParams<T> p;
    const FusionConfig& f = c.fusion;
    const int D = c.d_model, Wa = c.attn_width(), Ws = c.ssm_width();
    {
        typename Arena<T>::Scope s(a, "attn.");
        p.attn = attn_params(a, c.attn, /*with_wo=*/false);
    }
    {
        typename Arena<T>::Scope s(a, "ssm.");
        p.ssm = mamba2_params(a, c.ssm, /*with_norm_out=*/false);
    }
    if (f.norm == FusionNorm::group) {
        p.norm_a = a.take("norm_a", {Wa});
        p.norm_s = a.take("norm_s", {Ws});
    }
    if (f.scale == FusionScale::vector) {
        p.scale_a = a.take("scale_a", {Wa});
        p.scale_s = a.take("scale_s", {Ws});
    } else if (f.scale == FusionScale::scalar) {
        p.scale_a = a.take("scale_a", {1});
    }
    if (f.out == FusionOut::sep) {
        p.out_s = a.take("out_s", {D, Ws});
        p.out_a = a.take("out_a", {D, Wa});
    } else {
        p.out_proj = a.take("out_proj", {D, c.fused_width()});
    }
    return p;
}

// Norm weights and scales start at 1; projections N(0, std), the output ones scaled down like every
// residual projection (std / √(2·n_layers)).
template <typename T>
void intra_init(IntraParams<T>& p, const IntraConfig& c, Rng& rng, int n_layers, double std = 0.02) {
    const int D = c.d_model, Wa = c.attn_width(), Ws = c.ssm_width();
    const AttnConfig& ac = c.attn;
    rng.fill_normal(p.attn.wq, (size_t)ac.n_heads * ac.d_qk * D, std);
    rng.fill_normal(p.attn.wk, (size_t)ac.n_kv_heads * ac.d_qk * D, std);
    rng.fill_normal(p.attn.wv, (size_t)ac.n_kv_heads * ac.d_v * D, std);
    mamba2_init(p.ssm, c.ssm, rng, n_layers);
    auto ones = [](T* q, size_t n) { for (size_t i = 0; i < n; i++) q[i] = T(1); };
    if (p.norm_a) { ones(p.norm_a, Wa); ones(p.norm_s, Ws); }
    if (p.scale_a) ones(p.scale_a, c.fusion.scale == FusionScale::vector ? Wa : 1);
    if (p.scale_s) ones(p.scale_s, Ws);
    const double out_std = std / std::sqrt(2.0 * n_layers);
    if (p.out_s) { rng.fill_normal(p.out_s, (size_t)D * Ws, out_std); rng.fill_normal(p.out_a, (size_t)D * Wa, out_std); }
    if (p.out_proj) rng.fill_normal(p.out_proj, (size_t)D * c.fused_width(), out_std);
}

template <typename T>
struct IntraActs {
    AttnActs<T> attn;
    Mamba2Acts<T> ssm;
    T* x_shared;  // (B,T,Ws)  value=shared: V expanded to the query heads
    T* a1;        // (B,T,Wa)  attention branch after its norm
    T* rstd_a;    // (B,T,Ha)
    T* a3;        // (B,T,Wa)  after scale and sign: what is projected / fused
    T* s1;        // (B,T,Ws)  Mamba branch after its norm
    T* rstd_s;    // (B,T,Hs)
    T* s2;        // (B,T,Ws)  after scale
    T* f;         // (B,T,Wf)  out=joint: the fused features
    T* tmp_out;   // (B,T,D)   out=sep: the attention projection before it is added
    // backward scratch
    T* df;        // (B,T,Wf)
    T* da;        // (B,T,Wa)
    T* ds;        // (B,T,Ws)
    T* dx_shared; // (B,T,Ws)
    T* dv_extra;  // (B,T,Hkv·d_v)
    T* dinp_ssm;  // (B,T,D)
    T* dnorm;     // (B,T,max(Wa,Ws))  the norms' input gradient before it is copied back
};

template <typename T>
IntraActs<T> intra_acts(Arena<T>& a, const IntraConfig& c, int B, int T_) {
    IntraActs<T> x;
    const int N = B * T_, D = c.d_model, Wa = c.attn_width(), Ws = c.ssm_width(), Wf = c.fused_width();
    x.attn = attn_acts(a, c.attn, B, T_);
    x.ssm = mamba2_acts(a, c.ssm, B, T_);
    x.x_shared = a.take_scratch("x_shared", {N, Ws});
    x.a1 = a.take("a1", {N, Wa});
    x.rstd_a = a.take("rstd_a", {N, c.attn.n_heads});
    x.a3 = a.take("a3", {N, Wa});
    x.s1 = a.take("s1", {N, Ws});
    x.rstd_s = a.take("rstd_s", {N, c.ssm.nheads()});
    x.s2 = a.take("s2", {N, Ws});
    x.f = a.take("f", {N, Wf});
    x.tmp_out = a.take_scratch("tmp_out", {N, D});
    x.df = a.take_scratch("df", {N, Wf});
    x.da = a.take_scratch("da", {N, Wa});
    x.ds = a.take_scratch("ds", {N, Ws});
    x.dx_shared = a.take_scratch("dx_shared", {N, Ws});
    x.dv_extra = a.take_scratch("dv_extra", {N, c.attn.n_kv_heads * c.attn.d_v});
    x.dinp_ssm = a.take_scratch("dinp_ssm", {N, D});
    x.dnorm = a.take_scratch("dnorm", {N, Wa > Ws ? Wa : Ws});
    return x;
}

// value=shared: x_shared (N, Ws) holds, in each query head's slot, the V (N, Hkv, d_v) of its kv head.
template <typename T>
void intra_expand_shared_v(T* x_shared, const T* v, const IntraConfig& c, int N) {
    const int Ha = c.attn.n_heads, Hkv = c.attn.n_kv_heads, dv = c.attn.d_v, Ws = c.ssm_width();
    const int group = Ha / Hkv;
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++)
        for (int h = 0; h < Ha; h++)
            for (int i = 0; i < dv; i++) x_shared[(size_t)n * Ws + h * dv + i] = v[((size_t)n * Hkv + h / group) * dv + i];
}

constexpr double INTRA_NORM_EPS = 1e-5;  // the per-head branch norms

// out (N, D) = Fuse(a (N, Wa), s (N, Ws)): per-head norms, scales, the sign of op=diff, then the output
// projection(s). Fills acts.a1, rstd_a, a3, s1, rstd_s, s2 and acts.f (out=joint) or acts.tmp_out (out=sep)
// for N rows. Shared by the training forward and the one-token step of model/generate.h.
template <typename T>
void intra_fuse_forward(T* out, IntraActs<T>& acts, const T* a, const T* s, const IntraParams<T>& p,
                        const IntraConfig& c, int N) {
    const FusionConfig& f = c.fusion;
    const int D = c.d_model, Wa = c.attn_width(), Ws = c.ssm_width();
    const int Ha = c.attn.n_heads, dv = c.attn.d_v, Hs = c.ssm.nheads(), P = c.ssm.headdim;

    // per-branch normalisation: the branches' output scales differ by > 10×, so each is normalised per head
    const T* a1 = a;
    const T* s1 = s;
    if (f.norm == FusionNorm::group) {
        rmsnorm_forward(acts.a1, acts.rstd_a, a, p.norm_a, N, Ha, dv, T(INTRA_NORM_EPS));
        rmsnorm_forward(acts.s1, acts.rstd_s, s, p.norm_s, N, Hs, P, T(INTRA_NORM_EPS));
        a1 = acts.a1;
        s1 = acts.s1;
    }

    // scale, and the sign of op=diff folded into the attention side
    const T sign = f.op == FusionOp::diff ? T(-1) : T(1);
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        for (int i = 0; i < Wa; i++) {
            T alpha = f.scale == FusionScale::vector ? p.scale_a[i] : f.scale == FusionScale::scalar ? p.scale_a[0] : T(1);
            acts.a3[(size_t)n * Wa + i] = sign * alpha * a1[(size_t)n * Wa + i];
        }
        for (int i = 0; i < Ws; i++) {
            T alpha = f.scale == FusionScale::vector ? p.scale_s[i] : T(1);
            acts.s2[(size_t)n * Ws + i] = alpha * s1[(size_t)n * Ws + i];
        }
    }

    if (f.out == FusionOut::sep) {  // out_s · s2 + out_a · a3
        matmul_forward(out, acts.s2, p.out_s, (const T*)nullptr, N, Ws, D);
        matmul_forward(acts.tmp_out, acts.a3, p.out_a, (const T*)nullptr, N, Wa, D);
        for (size_t i = 0; i < (size_t)N * D; i++) out[i] += acts.tmp_out[i];
    } else {  // out_proj · (s2 + a3)  or  out_proj · [s2; a3]
        const int Wf = c.fused_width();
#pragma omp parallel for schedule(static)
        for (int n = 0; n < N; n++) {
            T* fn = acts.f + (size_t)n * Wf;
            const T* sn = acts.s2 + (size_t)n * Ws;
            const T* an = acts.a3 + (size_t)n * Wa;
            if (f.op == FusionOp::concat) {
                for (int i = 0; i < Ws; i++) fn[i] = sn[i];
                for (int i = 0; i < Wa; i++) fn[Ws + i] = an[i];
            } else {
                for (int i = 0; i < Ws; i++) fn[i] = sn[i] + an[i];
            }
        }
        matmul_forward(out, acts.f, p.out_proj, (const T*)nullptr, N, Wf, D);
    }
}

// out (B,T,D) = Fuse(attention branch, Mamba branch) of inp (B,T,D)
template <typename T>
void intra_mixer_forward(T* out, IntraActs<T>& acts, const T* inp, const IntraParams<T>& p, const IntraConfig& c,
                         int B, int T_) {
    const int N = B * T_;
    // the two branches; with shared values the Mamba branch reads V, so attention runs first
    attn_branch_forward(acts.attn, inp, p.attn, c.attn, B, T_);
    const T* x_shared = nullptr;
    if (c.fusion.value == FusionValue::shared) {
        intra_expand_shared_v(acts.x_shared, acts.attn.v, c, N);
        x_shared = acts.x_shared;
    }
    mamba2_branch_forward(acts.ssm, inp, x_shared, p.ssm, c.ssm, B, T_);
    intra_fuse_forward(out, acts, acts.attn.y, acts.ssm.g, p, c, N);
}

// dinp (B,T,D) written; dp.* accumulate.
template <typename T>
void intra_mixer_backward(T* dinp, IntraParams<T>& dp, const T* dout, IntraActs<T>& acts, const T* inp,
                          const IntraParams<T>& p, const IntraConfig& c, int B, int T_) {
    const FusionConfig& f = c.fusion;
    const AttnConfig& ac = c.attn;
    const int N = B * T_, D = c.d_model, Wa = c.attn_width(), Ws = c.ssm_width();
    const int Ha = ac.n_heads, Hkv = ac.n_kv_heads, dv = ac.d_v, Hs = c.ssm.nheads(), P = c.ssm.headdim;
    const bool normed = f.norm == FusionNorm::group;
    const T* a1 = normed ? acts.a1 : acts.attn.y;
    const T* s1 = normed ? acts.s1 : acts.ssm.g;

    // output projection(s): gradients of s2 and a3, kept in ds and da
    T* ds2 = acts.ds;
    T* da3 = acts.da;
    if (f.out == FusionOut::sep) {
        matmul_backward(ds2, dp.out_s, (T*)nullptr, dout, acts.s2, p.out_s, N, Ws, D);
        matmul_backward(da3, dp.out_a, (T*)nullptr, dout, acts.a3, p.out_a, N, Wa, D);
    } else {
        const int Wf = c.fused_width();
        matmul_backward(acts.df, dp.out_proj, (T*)nullptr, dout, acts.f, p.out_proj, N, Wf, D);
#pragma omp parallel for schedule(static)
        for (int n = 0; n < N; n++) {
            const T* dfn = acts.df + (size_t)n * Wf;
            for (int i = 0; i < Ws; i++) ds2[(size_t)n * Ws + i] = dfn[i];
            const int off = f.op == FusionOp::concat ? Ws : 0;  // add/diff: both sides see the same gradient
            for (int i = 0; i < Wa; i++) da3[(size_t)n * Wa + i] = dfn[off + i];
        }
    }

    // scale and sign: a3 = sign·α_a ⊙ a1, s2 = α_s ⊙ s1. The scale gradients are reduced over rows, one
    // channel per thread, before the in-place update below overwrites da3/ds2.
    const T sign = f.op == FusionOp::diff ? T(-1) : T(1);
    if (f.scale == FusionScale::vector) {
#pragma omp parallel for schedule(static)
        for (int i = 0; i < Wa; i++) {
            T acc = 0;
            for (int n = 0; n < N; n++) acc += da3[(size_t)n * Wa + i] * a1[(size_t)n * Wa + i];
            dp.scale_a[i] += sign * acc;
        }
#pragma omp parallel for schedule(static)
        for (int i = 0; i < Ws; i++) {
            T acc = 0;
            for (int n = 0; n < N; n++) acc += ds2[(size_t)n * Ws + i] * s1[(size_t)n * Ws + i];
            dp.scale_s[i] += acc;
        }
    } else if (f.scale == FusionScale::scalar) {
        T acc = 0;
        for (size_t i = 0; i < (size_t)N * Wa; i++) acc += da3[i] * a1[i];
        dp.scale_a[0] += sign * acc;
    }
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        for (int i = 0; i < Wa; i++) {
            T alpha = f.scale == FusionScale::vector ? p.scale_a[i] : f.scale == FusionScale::scalar ? p.scale_a[0] : T(1);
            da3[(size_t)n * Wa + i] *= sign * alpha;  // now da1
        }
        if (f.scale == FusionScale::vector)
            for (int i = 0; i < Ws; i++) ds2[(size_t)n * Ws + i] *= p.scale_s[i];  // now ds1
    }

    // per-head norms: da1 → da, ds1 → ds (through a scratch, since the norm's backward reads its dout twice)
    T* da = acts.da;
    T* ds = acts.ds;
    if (normed) {
        rmsnorm_backward(acts.dnorm, dp.norm_a, da, acts.attn.y, p.norm_a, acts.rstd_a, N, Ha, dv);
        for (size_t i = 0; i < (size_t)N * Wa; i++) da[i] = acts.dnorm[i];
        rmsnorm_backward(acts.dnorm, dp.norm_s, ds, acts.ssm.g, p.norm_s, acts.rstd_s, N, Hs, P);
        for (size_t i = 0; i < (size_t)N * Ws; i++) ds[i] = acts.dnorm[i];
    }

    // branches: Mamba first, since with shared values it hands a gradient to the attention's V
    const bool shared = f.value == FusionValue::shared;
    mamba2_branch_backward(acts.dinp_ssm, shared ? acts.dx_shared : (T*)nullptr, dp.ssm, ds, acts.ssm, inp,
                           shared ? acts.x_shared : (const T*)nullptr, p.ssm, c.ssm, B, T_);
    const T* dv_extra = nullptr;
    if (shared) {
        const int group = Ha / Hkv;
#pragma omp parallel for schedule(static)
        for (int n = 0; n < N; n++)
            for (int g = 0; g < Hkv; g++)
                for (int i = 0; i < dv; i++) {
                    T acc = 0;
                    for (int h = g * group; h < (g + 1) * group; h++) acc += acts.dx_shared[(size_t)n * Ws + h * dv + i];
                    acts.dv_extra[((size_t)n * Hkv + g) * dv + i] = acc;
                }
        dv_extra = acts.dv_extra;
    }
    attn_branch_backward(dinp, dp.attn, da, dv_extra, acts.attn, inp, p.attn, ac, B, T_);
    for (size_t i = 0; i < (size_t)N * D; i++) dinp[i] += acts.dinp_ssm[i];
}

}  // namespace hl
