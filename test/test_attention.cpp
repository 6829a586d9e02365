// test_attention.cpp — RoPE, the causal GQA attention core, the attention branch and the full mixer:
// closed forms, a naive reference, causality, finite-difference gradients and bad configs; sliding-window
// attention with a sink: its masks, gradients, and cached decoding with a bounded cache.
#include <algorithm>           // std::fill, std::max, std::min
#include <cmath>               // std::cos, std::sin, std::exp, std::sqrt, std::isfinite, INFINITY
#include <set>                 // std::set: the visible keys of a row, built independently of attn_visible
#include <vector>              // std::vector
#include "test/gradcheck.h"    // check_grad, randn, dot, max_abs_diff, randomize_for_gradcheck, doctest
#include "test/micro.h"        // micro, random_tokens, step_vs_full: a tiny whole model for cached decoding
#include "model/attention.h"   // attention_*, attn_*
#include "model/generate.h"    // attn_cache, attn_step_scratch, attn_branch_step, InferenceState, model_step
#include "model/model.h"       // Model
#include "model/rope.h"        // rope_forward/backward

using namespace hl;
using namespace hl::test;

// ---------------------------------------------------------------------------------------------------------
// RoPE
// ---------------------------------------------------------------------------------------------------------

TEST_CASE("rope equals the closed-form rotation of pairs (i, i + hd/2)") {
    // hd = 4, θ = 100: pair (0, 2) turns at frequency 100^0 = 1, pair (1, 3) at 100^(−2/4) = 0.1
    Rng rng(10);
    const int B = 2, T = 3, H = 2, hd = 4, pos0 = 5;
    auto x = randn(rng, B * T * H * hd);
    std::vector<double> out(x.size());
    rope_forward(out.data(), x.data(), B, T, H, hd, 100.0, pos0);
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++)
            for (int h = 0; h < H; h++) {
                const double* xi = &x[((b * T + t) * H + h) * hd];
                const double* o = &out[((b * T + t) * H + h) * hd];
                double p = pos0 + t, c0 = std::cos(p), s0 = std::sin(p), c1 = std::cos(0.1 * p), s1 = std::sin(0.1 * p);
                CHECK(o[0] == doctest::Approx(xi[0] * c0 - xi[2] * s0).epsilon(1e-12));
                CHECK(o[2] == doctest::Approx(xi[2] * c0 + xi[0] * s0).epsilon(1e-12));
                CHECK(o[1] == doctest::Approx(xi[1] * c1 - xi[3] * s1).epsilon(1e-12));
                CHECK(o[3] == doctest::Approx(xi[3] * c1 + xi[1] * s1).epsilon(1e-12));
            }
    // position 0 is the identity
    rope_forward(out.data(), x.data(), B, T, H, hd, 100.0, 0);
    for (int i = 0; i < H * hd; i++) CHECK(out[i] == x[i]);
}

TEST_CASE("rope preserves norms and q·k depends only on the position difference") {
    Rng rng(11);
    const int hd = 6, H = 3, T = 7;
    const double theta = 10000.0;
    auto x = randn(rng, T * H * hd);
    std::vector<double> out(x.size());
    rope_forward(out.data(), x.data(), 1, T, H, hd, theta, 2);
    for (int r = 0; r < T * H; r++)
        CHECK(dot(&out[r * hd], &out[r * hd], hd) == doctest::Approx(dot(&x[r * hd], &x[r * hd], hd)).epsilon(1e-12));

    // q at position m, k at position n: the score depends on m − n only
    auto q = randn(rng, hd), k = randn(rng, hd);
    std::vector<double> rq(hd), rk(hd);
    auto score = [&](int m, int n) {
        rope_forward(rq.data(), q.data(), 1, 1, 1, hd, theta, m);
        rope_forward(rk.data(), k.data(), 1, 1, 1, hd, theta, n);
        return dot(rq.data(), rk.data(), hd);
    };
    for (int delta : {0, 1, 3}) {
        double ref = score(delta, 0);
        for (int n : {1, 5, 40, 1000}) CHECK(score(n + delta, n) == doctest::Approx(ref).epsilon(1e-9));
    }
    CHECK(std::fabs(score(3, 0) - score(0, 0)) > 1e-6);  // ...and does depend on it
}

TEST_CASE("rope backward passes the gradient check; in place equals out of place") {
    Rng rng(12);
    const int B = 2, T = 7, H = 3, hd = 6, pos0 = 4;
    const double theta = 50.0;
    const size_t n = B * T * H * hd;
    auto x = randn(rng, n), probe = randn(rng, n);
    std::vector<double> out(n), dx(n, 123.0);
    auto loss = [&] {
        rope_forward(out.data(), x.data(), B, T, H, hd, theta, pos0);
        return dot(out.data(), probe.data(), n);
    };
    rope_backward(dx.data(), probe.data(), B, T, H, hd, theta, pos0);
    check_grad("rope x", x.data(), dx.data(), n, loss);

    loss();
    std::vector<double> inplace = x;
    rope_forward(inplace.data(), inplace.data(), B, T, H, hd, theta, pos0);
    CHECK(max_abs_diff(inplace.data(), out.data(), n) == 0.0);
    std::vector<double> dinplace = probe;
    rope_backward(dinplace.data(), dinplace.data(), B, T, H, hd, theta, pos0);
    CHECK(max_abs_diff(dinplace.data(), dx.data(), n) == 0.0);
    // backward undoes forward
    rope_backward(inplace.data(), inplace.data(), B, T, H, hd, theta, pos0);
    CHECK(max_abs_diff(inplace.data(), x.data(), n) < 1e-12);
}

// ---------------------------------------------------------------------------------------------------------
// The core
// ---------------------------------------------------------------------------------------------------------

// The keys row t sees with window W > 0 and sink S, as sets: the last W positions up to t, and the first S
// (clipped to t). Written from the description, not from attn_visible, so the two can disagree.
static std::set<int> brute_force_visible_set(int t, int W, int S) {
    std::set<int> keys;
    for (int s = t; s >= 0 && s > t - W; s--) keys.insert(s);
    for (int s = 0; s < S && s <= t; s++) keys.insert(s);
    return keys;
}
static bool brute_force_visible(int t, int s, int W, int S) {
    if (W == 0) return s <= t;
    return brute_force_visible_set(t, W, S).count(s) > 0;
}

// Naive reference: the full (T, T) score matrix with −∞ where a key is not visible (the future; with a window
// W > 0, brute_force_visible), softmax over each whole row.
static void naive_attention(std::vector<double>& out, std::vector<double>& att, const std::vector<double>& q,
                            const std::vector<double>& k, const std::vector<double>& v, int B, int T, int H, int Hkv,
                            int dqk, int dv, int W = 0, int sink = 0) {
    out.assign(B * T * H * dv, 0.0);
    att.assign(B * H * T * T, 0.0);
    std::vector<double> S(T * T);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++) {
            int g = h * Hkv / H;  // = h / (H / Hkv)
            for (int t = 0; t < T; t++)
                for (int s = 0; s < T; s++) {
                    double sc = 0;
                    for (int i = 0; i < dqk; i++) sc += q[((b * T + t) * H + h) * dqk + i] * k[((b * T + s) * Hkv + g) * dqk + i];
                    S[t * T + s] = brute_force_visible(t, s, W, sink) ? sc / std::sqrt(double(dqk)) : -INFINITY;
                }
            for (int t = 0; t < T; t++) {
                double mx = -INFINITY, sum = 0;
                for (int s = 0; s < T; s++) mx = std::max(mx, S[t * T + s]);
                for (int s = 0; s < T; s++) sum += std::exp(S[t * T + s] - mx);
                for (int s = 0; s < T; s++) {
                    double p = std::exp(S[t * T + s] - mx) / sum;
                    att[((b * H + h) * T + t) * T + s] = p;
                    for (int i = 0; i < dv; i++) out[((b * T + t) * H + h) * dv + i] += p * v[((b * T + s) * Hkv + g) * dv + i];
                }
            }
        }
}

TEST_CASE("attention core equals the naive masked softmax and passes the gradient check") {
    Rng rng(20);
    const int B = 2, T = 7, H = 4, dqk = 6, dv = 5;
    for (int Hkv : {1, 2, 4}) {
        CAPTURE(Hkv);
        auto q = randn(rng, B * T * H * dqk), k = randn(rng, B * T * Hkv * dqk), v = randn(rng, B * T * Hkv * dv);
        auto probe = randn(rng, B * T * H * dv);
        std::vector<double> out(B * T * H * dv), att(B * H * T * T, 7.0), ref_out, ref_att;
        attention_forward(out.data(), att.data(), q.data(), k.data(), v.data(), B, T, H, Hkv, dqk, dv);
        naive_attention(ref_out, ref_att, q, k, v, B, T, H, Hkv, dqk, dv);
        CHECK(max_abs_diff(out.data(), ref_out.data(), out.size()) < 1e-12);
        CHECK(max_abs_diff(att.data(), ref_att.data(), att.size()) < 1e-12);

        auto loss = [&] {
            attention_forward(out.data(), att.data(), q.data(), k.data(), v.data(), B, T, H, Hkv, dqk, dv);
            return dot(out.data(), probe.data(), out.size());
        };
        loss();
        // gradients are written: pre-fill with garbage
        std::vector<double> dq(q.size(), 123.0), dk(k.size(), 123.0), dvv(v.size(), 123.0);
        attention_backward(dq.data(), dk.data(), dvv.data(), probe.data(), att.data(), q.data(), k.data(), v.data(), B,
                           T, H, Hkv, dqk, dv);
        check_grad("q", q.data(), dq.data(), q.size(), loss);
        check_grad("k", k.data(), dk.data(), k.size(), loss);
        check_grad("v", v.data(), dvv.data(), v.size(), loss);
    }
}

TEST_CASE("attention core is stable for large scores") {
    const int T = 3, d = 2;
    std::vector<double> q = {1000, 0, 1000, 0, 1000, 0}, k = {1, 0, 2, 0, 3, 0}, v = {1, 2, 3};
    std::vector<double> out(T), att(T * T);
    attention_forward(out.data(), att.data(), q.data(), k.data(), v.data(), 1, T, 1, 1, d, 1);
    for (double o : out) CHECK(std::isfinite(o));
    CHECK(out[2] == doctest::Approx(3.0));  // the last key wins by a huge margin
}

TEST_CASE("attention core is causal: a later token never changes earlier outputs") {
    Rng rng(21);
    const int B = 2, T = 7, H = 4, Hkv = 2, dqk = 6, dv = 5;
    auto q = randn(rng, B * T * H * dqk), k = randn(rng, B * T * Hkv * dqk), v = randn(rng, B * T * Hkv * dv);
    std::vector<double> out0(B * T * H * dv), out1(out0.size()), att(B * H * T * T);
    attention_forward(out0.data(), att.data(), q.data(), k.data(), v.data(), B, T, H, Hkv, dqk, dv);
    for (int t = 0; t + 1 < T; t++) {
        auto q1 = q, k1 = k, v1 = v;
        for (int b = 0; b < B; b++) {  // change token t + 1 everywhere
            for (int i = 0; i < H * dqk; i++) q1[(b * T + t + 1) * H * dqk + i] += 1.0;
            for (int i = 0; i < Hkv * dqk; i++) k1[(b * T + t + 1) * Hkv * dqk + i] += 1.0;
            for (int i = 0; i < Hkv * dv; i++) v1[(b * T + t + 1) * Hkv * dv + i] += 1.0;
        }
        attention_forward(out1.data(), att.data(), q1.data(), k1.data(), v1.data(), B, T, H, Hkv, dqk, dv);
        for (int b = 0; b < B; b++) {
            const size_t row = H * dv;
            CHECK(max_abs_diff(&out0[b * T * row], &out1[b * T * row], (t + 1) * row) == 0.0);
            CHECK(max_abs_diff(&out0[(b * T + t + 1) * row], &out1[(b * T + t + 1) * row], row) > 1e-6);
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Sliding-window attention with an attention sink: the core
// ---------------------------------------------------------------------------------------------------------

// (W, S) pairs for the mask tests: no sink, a sink shorter than, equal to and longer than the window, W = 1
static const int kWindows[][2] = {{1, 0}, {1, 2}, {2, 0}, {3, 2}, {3, 3}, {2, 5}, {4, 1}, {5, 0}};

TEST_CASE("attn_visible is the rule s <= t and (t - s < W or s < S); W = 0 is causal") {
    for (auto& ws : kWindows)
        for (int t = 0; t < 12; t++)
            for (int s = 0; s < 12; s++) {
                CAPTURE(ws[0]);
                CAPTURE(ws[1]);
                CAPTURE(t);
                CAPTURE(s);
                CHECK(attn_visible(t, s, ws[0], ws[1]) == brute_force_visible(t, s, ws[0], ws[1]));
            }
    for (int t = 0; t < 12; t++)
        for (int s = 0; s < 12; s++) CHECK(attn_visible(t, s, 0, 0) == (s <= t));
    CHECK(attn_visible(10, 0, 3, 1));   // a sink
    CHECK(!attn_visible(10, 1, 3, 1));  // slid out of the window
    CHECK(attn_visible(10, 8, 3, 1));   // the window's oldest
    CHECK(!attn_visible(10, 7, 3, 1));
    CHECK(!attn_visible(2, 3, 3, 5));   // a sink is still in the future of an earlier query
}

// attn_block classifies a block of (query, key) pairs for the GPU's tiled kernels; a wrong ALL would drop the mask
// where it matters and a wrong NONE would skip visible pairs, so it is checked pair by pair on every small block.
TEST_CASE("attn_block: NONE blocks hold no visible pair, ALL blocks only visible pairs inside T") {
    const int windows[][2] = {{0, 0}, {1, 0}, {3, 0}, {3, 2}, {2, 5}, {6, 1}};
    int n_none = 0, n_all = 0, n_some = 0, wrong = 0, missed = 0;
    for (auto& ws : windows)
        for (int T = 1; T <= 9; T++)
            for (int qa = 0; qa < 10; qa++)
                for (int qb = qa + 1; qb <= 11; qb++)
                    for (int ka = 0; ka < 10; ka++)
                        for (int kb = ka + 1; kb <= 11; kb++) {
                            bool any = false, every = true;
                            for (int i = qa; i < qb; i++)
                                for (int j = ka; j < kb; j++) {
                                    const bool v = attn_visible(i, j, ws[0], ws[1]);
                                    any = any || v;
                                    every = every && v && i < T && j < T;
                                }
                            const AttnBlock c = attn_block(qa, qb, ka, kb, T, ws[0], ws[1]);
                            n_none += c == AttnBlock::NONE;
                            n_all += c == AttnBlock::ALL;
                            n_some += c == AttnBlock::SOME;
                            // a wrong answer: a skipped block with a visible pair, or an unmasked one with a hidden
                            if ((c == AttnBlock::NONE && any) || (c == AttnBlock::ALL && !every)) wrong++;
                            // a missed fast path: wholly after the diagonal is NONE; wholly below it, inside T and
                            // inside a window (or without one) is ALL
                            if ((ka > qb - 1 && c != AttnBlock::NONE) ||
                                (kb - 1 <= qa && qb <= T && (ws[0] == 0 || qb - 1 - ka < ws[0]) && c != AttnBlock::ALL))
                                missed++;
                        }
    CHECK(wrong == 0);
    CHECK(missed == 0);
    CHECK(n_none > 0);
    CHECK(n_all > 0);
    CHECK(n_some > 0);
}

TEST_CASE("sliding-window attention with W >= T equals full attention, forward and backward, bitwise") {
    Rng rng(60);
    const int B = 2, T = 7, H = 4, Hkv = 2, dqk = 6, dv = 5;
    auto q = randn(rng, B * T * H * dqk), k = randn(rng, B * T * Hkv * dqk), v = randn(rng, B * T * Hkv * dv);
    auto dout = randn(rng, B * T * H * dv);
    std::vector<double> out0(B * T * H * dv), att0(B * H * T * T), dq0(q.size()), dk0(k.size()), dv0(v.size());
    attention_forward(out0.data(), att0.data(), q.data(), k.data(), v.data(), B, T, H, Hkv, dqk, dv);
    attention_backward(dq0.data(), dk0.data(), dv0.data(), dout.data(), att0.data(), q.data(), k.data(), v.data(), B,
                       T, H, Hkv, dqk, dv);
    for (int W : {T, T + 5})
        for (int S : {0, 3, T + 1}) {
            CAPTURE(W);
            CAPTURE(S);
            std::vector<double> out(out0.size(), 7.0), att(att0.size(), 7.0), dq(q.size(), 7.0), dk(k.size(), 7.0),
                dvv(v.size(), 7.0);
            attention_forward(out.data(), att.data(), q.data(), k.data(), v.data(), B, T, H, Hkv, dqk, dv, W, S);
            attention_backward(dq.data(), dk.data(), dvv.data(), dout.data(), att.data(), q.data(), k.data(), v.data(),
                               B, T, H, Hkv, dqk, dv, W, S);
            CHECK(max_abs_diff(out.data(), out0.data(), out.size()) == 0.0);
            CHECK(max_abs_diff(att.data(), att0.data(), att.size()) == 0.0);
            CHECK(max_abs_diff(dq.data(), dq0.data(), dq.size()) == 0.0);
            CHECK(max_abs_diff(dk.data(), dk0.data(), dk.size()) == 0.0);
            CHECK(max_abs_diff(dvv.data(), dv0.data(), dvv.size()) == 0.0);
        }
    // ...and a window shorter than T does change the result
    std::vector<double> out(out0.size()), att(att0.size());
    attention_forward(out.data(), att.data(), q.data(), k.data(), v.data(), B, T, H, Hkv, dqk, dv, T - 1, 0);
    CHECK(max_abs_diff(out.data(), out0.data(), out.size()) > 1e-6);
}

TEST_CASE("sliding-window attention: att is 0 exactly off the window and sink, > 0 on it; out equals the naive") {
    Rng rng(61);
    const int B = 2, T = 9, H = 4, Hkv = 2, dqk = 6, dv = 5;
    for (auto& ws : kWindows) {
        const int W = ws[0], S = ws[1];
        CAPTURE(W);
        CAPTURE(S);
        auto q = randn(rng, B * T * H * dqk), k = randn(rng, B * T * Hkv * dqk), v = randn(rng, B * T * Hkv * dv);
        std::vector<double> out(B * T * H * dv), att(B * H * T * T, 7.0), ref_out, ref_att;
        attention_forward(out.data(), att.data(), q.data(), k.data(), v.data(), B, T, H, Hkv, dqk, dv, W, S);
        int n_visible = 0;
        for (int b = 0; b < B; b++)
            for (int h = 0; h < H; h++)
                for (int t = 0; t < T; t++) {
                    double row = 0;
                    for (int s = 0; s < T; s++) {
                        const double a = att[((b * H + h) * T + t) * T + s];
                        row += a;
                        if (brute_force_visible(t, s, W, S)) {
                            CHECK(a > 0);
                            n_visible++;
                        } else {
                            CHECK(a == 0.0);
                        }
                    }
                    CHECK(row == doctest::Approx(1.0).epsilon(1e-12));
                }
        // as many positive entries as the sets hold
        int expect = 0;
        for (int t = 0; t < T; t++) expect += int(brute_force_visible_set(t, W, S).size());
        CHECK(n_visible == expect * B * H);
        naive_attention(ref_out, ref_att, q, k, v, B, T, H, Hkv, dqk, dv, W, S);
        CHECK(max_abs_diff(out.data(), ref_out.data(), out.size()) < 1e-12);
        CHECK(max_abs_diff(att.data(), ref_att.data(), att.size()) < 1e-12);
    }
}

TEST_CASE("sliding-window attention core passes the gradient check (T=9, W=3, S=2, GQA)") {
    Rng rng(62);
    const int B = 2, T = 9, H = 4, Hkv = 2, dqk = 6, dv = 5, W = 3, S = 2;
    auto q = randn(rng, B * T * H * dqk), k = randn(rng, B * T * Hkv * dqk), v = randn(rng, B * T * Hkv * dv);
    auto probe = randn(rng, B * T * H * dv);
    std::vector<double> out(B * T * H * dv), att(B * H * T * T);
    auto loss = [&] {
        attention_forward(out.data(), att.data(), q.data(), k.data(), v.data(), B, T, H, Hkv, dqk, dv, W, S);
        return dot(out.data(), probe.data(), out.size());
    };
    loss();
    std::vector<double> dq(q.size(), 123.0), dk(k.size(), 123.0), dvv(v.size(), 123.0);
    attention_backward(dq.data(), dk.data(), dvv.data(), probe.data(), att.data(), q.data(), k.data(), v.data(), B, T,
                       H, Hkv, dqk, dv, W, S);
    check_grad("q", q.data(), dq.data(), q.size(), loss);
    check_grad("k", k.data(), dk.data(), k.size(), loss);
    check_grad("v", v.data(), dvv.data(), v.size(), loss);
    // queries that do not see a key do not depend on it: k_2 is neither a sink nor in the window of t ≥ 5
    auto k1 = k;
    for (int b = 0; b < B; b++)
        for (int i = 0; i < Hkv * dqk; i++) k1[(b * T + 2) * Hkv * dqk + i] += 1.0;
    std::vector<double> out1(out.size());
    loss();
    attention_forward(out1.data(), att.data(), q.data(), k1.data(), v.data(), B, T, H, Hkv, dqk, dv, W, S);
    for (int b = 0; b < B; b++) {
        const size_t row = H * dv;
        CHECK(max_abs_diff(&out[(b * T + 5) * row], &out1[(b * T + 5) * row], 4 * row) == 0.0);
        CHECK(max_abs_diff(&out[(b * T + 2) * row], &out1[(b * T + 2) * row], row) > 1e-6);
    }
}

// ---------------------------------------------------------------------------------------------------------
// The branch and the mixer
// ---------------------------------------------------------------------------------------------------------

// Parameters, activations and their buffers for one config, laid out through Arena as the model will.
struct AttnSetup {
    AttnConfig c;
    int B, T;
    std::vector<double> pbuf, gbuf, abuf;
    AttnParams<double> p, dp;
    AttnActs<double> acts;
    AttnSetup(const AttnConfig& cfg, int B_, int T_, bool with_wo, Rng& rng) : c(cfg), B(B_), T(T_) {
        Arena<double> count;
        attn_params(count, c, with_wo);
        pbuf = randn(rng, count.size, 0.4);
        gbuf.assign(count.size, 0.0);
        Arena<double> pa(pbuf.data()), ga(gbuf.data());
        p = attn_params(pa, c, with_wo);
        dp = attn_params(ga, c, with_wo);
        Arena<double> acount;
        attn_acts(acount, c, B, T);
        abuf.assign(acount.size, 0.0);
        Arena<double> aa(abuf.data());
        acts = attn_acts(aa, c, B, T);
    }
};

TEST_CASE("attention params and acts are laid out with checkpoint names and shapes") {
    AttnConfig c{7, 4, 2, 6, 5};
    std::vector<TensorInfo> infos;
    Arena<float> a(nullptr, &infos);
    Arena<float>::Scope s(a, "layers.1.mixer.");
    attn_params(a, c);
    REQUIRE(infos.size() == 4);
    CHECK(infos[0].name == "layers.1.mixer.wq");
    CHECK(infos[0].shape == std::vector<int>{24, 7});
    CHECK(infos[1].name == "layers.1.mixer.wk");
    CHECK(infos[1].shape == std::vector<int>{12, 7});
    CHECK(infos[2].name == "layers.1.mixer.wv");
    CHECK(infos[2].shape == std::vector<int>{10, 7});
    CHECK(infos[3].name == "layers.1.mixer.wo");
    CHECK(infos[3].shape == std::vector<int>{7, 20});
    CHECK(a.size == size_t(24 * 7 + 12 * 7 + 10 * 7 + 7 * 20));
    Arena<float> b;
    attn_params(b, c, false);
    CHECK(b.size == size_t(24 * 7 + 12 * 7 + 10 * 7));
}

TEST_CASE("attention branch passes the gradient check for every weight, the input and dv_extra") {
    Rng rng(30);
    const int B = 2, T = 5, D = 7;
    AttnConfig c{D, 4, 2, 6, 5};
    c.rope_theta = 30.0;  // angles that vary strongly across these few positions
    AttnSetup s(c, B, T, false, rng);
    auto x = randn(rng, B * T * D);
    auto probe_y = randn(rng, B * T * c.n_heads * c.d_v);
    auto probe_v = randn(rng, B * T * c.n_kv_heads * c.d_v);
    for (bool extra : {false, true}) {
        CAPTURE(extra);
        // L = Σ y ⊙ probe_y (+ Σ v ⊙ probe_v: v read by a second consumer, whose gradient is dv_extra)
        auto loss = [&] {
            attn_branch_forward(s.acts, x.data(), s.p, c, B, T);
            double L = dot(s.acts.y, probe_y.data(), probe_y.size());
            if (extra) L += dot(s.acts.v, probe_v.data(), probe_v.size());
            return L;
        };
        loss();
        std::fill(s.gbuf.begin(), s.gbuf.end(), 0.0);
        std::vector<double> dx(x.size(), 123.0);
        attn_branch_backward(dx.data(), s.dp, probe_y.data(), extra ? probe_v.data() : nullptr, s.acts, x.data(), s.p,
                             c, B, T);
        check_grad("wq", s.p.wq, s.dp.wq, 24 * D, loss);
        check_grad("wk", s.p.wk, s.dp.wk, 12 * D, loss);
        check_grad("wv", s.p.wv, s.dp.wv, 10 * D, loss);
        check_grad("x", x.data(), dx.data(), dx.size(), loss);

        // parameter gradients accumulate: a second backward doubles them
        loss();
        std::vector<double> g1 = s.gbuf;
        attn_branch_backward(dx.data(), s.dp, probe_y.data(), extra ? probe_v.data() : nullptr, s.acts, x.data(), s.p,
                             c, B, T);
        for (size_t i = 0; i < g1.size(); i++) CHECK(s.gbuf[i] == doctest::Approx(2 * g1[i]).epsilon(1e-12));
    }
}

// Finite-difference check of the mixer's every weight and its input at config c (B, T), through a random probe
// of the output. s.acts keep the last forward's activations.
static void check_mixer_gradients(AttnSetup& s, const AttnConfig& c, int B, int T, Rng& rng) {
    const int D = c.d_model;
    auto x = randn(rng, B * T * D), probe = randn(rng, B * T * D);
    std::vector<double> out(B * T * D), dx(x.size(), 123.0);
    auto loss = [&] {
        attn_mixer_forward(out.data(), s.acts, x.data(), s.p, c, B, T);
        return dot(out.data(), probe.data(), out.size());
    };
    loss();
    attn_mixer_backward(dx.data(), s.dp, probe.data(), s.acts, x.data(), s.p, c, B, T);
    const int H = c.n_heads, Hkv = c.n_kv_heads;
    check_grad("wq", s.p.wq, s.dp.wq, H * c.d_qk * D, loss);
    check_grad("wk", s.p.wk, s.dp.wk, Hkv * c.d_qk * D, loss);
    check_grad("wv", s.p.wv, s.dp.wv, Hkv * c.d_v * D, loss);
    check_grad("wo", s.p.wo, s.dp.wo, D * H * c.d_v, loss);
    check_grad("x", x.data(), dx.data(), dx.size(), loss);
}

TEST_CASE("attention mixer passes the gradient check (block A shapes and dqk != dv)") {
    Rng rng(40);
    const int B = 2, T = 5;
    // block A: d_qk = d_v = D / H with D = 12, H = 3, Hkv = 1; intra-hybrid-like: d_qk = 6, d_v = 5, D = 7
    for (AttnConfig c : {AttnConfig{12, 3, 1, 4, 4, 500000.0}, AttnConfig{7, 4, 2, 6, 5, 30.0}}) {
        CAPTURE(c.d_model);
        AttnSetup s(c, B, T, true, rng);
        check_mixer_gradients(s, c, B, T, rng);
    }
}

TEST_CASE("attention mixer is causal") {
    Rng rng(41);
    const int B = 2, T = 7, D = 7;
    AttnConfig c{D, 4, 2, 6, 5};
    AttnSetup s(c, B, T, true, rng);
    auto x = randn(rng, B * T * D);
    std::vector<double> out0(B * T * D), out1(out0.size());
    attn_mixer_forward(out0.data(), s.acts, x.data(), s.p, c, B, T);
    for (int t = 0; t + 1 < T; t++) {
        auto x1 = x;
        for (int b = 0; b < B; b++)
            for (int i = 0; i < D; i++) x1[(b * T + t + 1) * D + i] += 1.0;
        attn_mixer_forward(out1.data(), s.acts, x1.data(), s.p, c, B, T);
        for (int b = 0; b < B; b++) {
            CHECK(max_abs_diff(&out0[b * T * D], &out1[b * T * D], (t + 1) * D) == 0.0);
            CHECK(max_abs_diff(&out0[(b * T + t + 1) * D], &out1[(b * T + t + 1) * D], D) > 1e-6);
        }
    }
}

TEST_CASE("attention mixer in float agrees with double") {
    Rng rng(42);
    const int B = 2, T = 6, D = 8;
    AttnConfig c{D, 2, 1, 4, 4};
    AttnSetup s(c, B, T, true, rng);
    auto x = randn(rng, B * T * D), probe = randn(rng, B * T * D);
    std::vector<double> out(B * T * D), dx(x.size());
    attn_mixer_forward(out.data(), s.acts, x.data(), s.p, c, B, T);
    attn_mixer_backward(dx.data(), s.dp, probe.data(), s.acts, x.data(), s.p, c, B, T);

    auto to_f = [](const std::vector<double>& v) { return std::vector<float>(v.begin(), v.end()); };
    std::vector<float> pf = to_f(s.pbuf), gf(pf.size(), 0.f), xf = to_f(x), probef = to_f(probe);
    Arena<float> pa(pf.data()), ga(gf.data()), count;
    AttnParams<float> p = attn_params(pa, c), dp = attn_params(ga, c);
    attn_acts(count, c, B, T);
    std::vector<float> abuf(count.size);
    Arena<float> aa(abuf.data());
    AttnActs<float> acts = attn_acts(aa, c, B, T);
    std::vector<float> outf(out.size()), dxf(dx.size());
    attn_mixer_forward(outf.data(), acts, xf.data(), p, c, B, T);
    attn_mixer_backward(dxf.data(), dp, probef.data(), acts, xf.data(), p, c, B, T);
    for (size_t i = 0; i < out.size(); i++) CHECK(outf[i] == doctest::Approx(out[i]).epsilon(1e-4).scale(1.0));
    for (size_t i = 0; i < dx.size(); i++) CHECK(dxf[i] == doctest::Approx(dx[i]).epsilon(1e-4).scale(1.0));
    for (size_t i = 0; i < gf.size(); i++) CHECK(gf[i] == doctest::Approx(s.gbuf[i]).epsilon(1e-4).scale(1.0));
}

TEST_CASE("sliding-window attention mixer passes the gradient check (T=9, W=3, S=2, GQA, dqk != dv)") {
    Rng rng(63);
    const int B = 2, T = 9, D = 7;
    AttnConfig c{D, 4, 2, 6, 5, 30.0, 3, 2};
    AttnSetup s(c, B, T, true, rng);
    check_mixer_gradients(s, c, B, T, rng);
    // the mixer really is windowed: its saved probabilities vanish off the window and sink
    for (int t = 0; t < T; t++)
        for (int j = 0; j < T; j++)
            if (!brute_force_visible(t, j, 3, 2)) CHECK(s.acts.att[t * T + j] == 0.0);
    CHECK(s.acts.att[8 * T + 3] == 0.0);
}

// ---------------------------------------------------------------------------------------------------------
// Cached decoding with a sliding window: a bounded cache of S sinks and a ring of W slots
// ---------------------------------------------------------------------------------------------------------

TEST_CASE("attn_cache_slot: sinks keep their slot, the rest share a ring of W; the cache holds min(max_len, S + W)") {
    CHECK(attn_cache_len(AttnConfig{8, 2, 1, 4, 4, 1e4, 0, 0}, 100) == 100);
    CHECK(attn_cache_len(AttnConfig{8, 2, 1, 4, 4, 1e4, 3, 2}, 100) == 5);
    CHECK(attn_cache_len(AttnConfig{8, 2, 1, 4, 4, 1e4, 3, 2}, 4) == 4);
    for (int p = 0; p < 20; p++) CHECK(attn_cache_slot(p, 0, 0) == p);
    const int expect[] = {0, 1, 2, 3, 4, 2, 3, 4, 2, 3};  // W = 3, S = 2
    for (int p = 0; p < 10; p++) CHECK(attn_cache_slot(p, 3, 2) == expect[p]);
    // at every query position, the visible positions sit in distinct slots of the bounded cache
    for (auto& ws : kWindows) {
        const int W = ws[0], S = ws[1];
        for (int t = 0; t < 30; t++) {
            std::set<int> slots;
            for (int s : brute_force_visible_set(t, W, S)) {
                const int slot = attn_cache_slot(s, W, S);
                CHECK(slot < S + W);
                slots.insert(slot);
            }
            CHECK(slots.size() == brute_force_visible_set(t, W, S).size());
        }
    }
}

TEST_CASE("cached attention branch steps equal the full windowed branch forward, with a bounded cache") {
    const int B = 2, T = 11, D = 7;
    struct WS { int W, S; };
    for (WS ws : {WS{0, 0}, WS{3, 2}, WS{1, 0}, WS{2, 5}, WS{4, 0}, WS{20, 3}}) {
        CAPTURE(ws.W);
        CAPTURE(ws.S);
        Rng rng(64);
        AttnConfig c{D, 4, 2, 6, 5, 30.0, ws.W, ws.S};
        AttnSetup s(c, B, T, false, rng);
        auto x = randn(rng, B * T * D);
        attn_branch_forward(s.acts, x.data(), s.p, c, B, T);  // acts.y (B, T, H·d_v)

        const int len = attn_cache_len(c, T), Wy = c.n_heads * c.d_v;
        CHECK(len == (ws.W > 0 ? std::min(T, ws.S + ws.W) : T));
        Arena<double> count;
        attn_cache(count, c, B, T);
        CHECK(count.size == size_t(B) * len * c.n_kv_heads * (c.d_qk + c.d_v));  // bounded: S + W slots
        attn_step_scratch(count, c, B, T);
        std::vector<double> buf(count.size, 0.0);
        Arena<double> a(buf.data());
        AttnCache<double> cache = attn_cache(a, c, B, T);
        AttnStep<double> step = attn_step_scratch(a, c, B, T);
        std::vector<double> xt((size_t)B * D);  // (B, D): position t of each sequence
        double worst = 0, scale = 0;
        for (int t = 0; t < T; t++) {
            for (int b = 0; b < B; b++)
                for (int i = 0; i < D; i++) xt[(size_t)b * D + i] = x[((size_t)b * T + t) * D + i];
            attn_branch_step(step, cache, xt.data(), s.p, c, B, t, T);
            for (int b = 0; b < B; b++)
                for (int i = 0; i < Wy; i++) {
                    const double ref = s.acts.y[((size_t)b * T + t) * Wy + i];
                    worst = std::max(worst, std::fabs(step.y[(size_t)b * Wy + i] - ref));
                    scale = std::max(scale, std::fabs(ref));
                }
        }
        CHECK(worst < 1e-12);
        CHECK(scale > 1e-2);
    }
}

TEST_CASE("step-by-step logits equal the full forward with windowed attention layers (A and H blocks)") {
    // The model config has no window yet (wired by the lead): set it on the block configs directly.
    ModelConfig mc = micro("AMH", "final", 3);
    Model<double> m(mc);
    m.blocks[0].attn.window = 3, m.blocks[0].attn.sink = 1;
    m.blocks[2].intra.attn.window = 2, m.blocks[2].intra.attn.sink = 2;
    m.init(3);
    Rng prng(103);
    randomize_for_gradcheck(m.tensors, m.params.data(), prng);
    const int B = 2, T = 10, V = mc.vocab_size;
    std::vector<int> tok(B * T);
    Rng rng(7);
    random_tokens(rng, tok, V);
    m.forward(tok.data(), nullptr, B, T);
    std::vector<double> full(m.logits, m.logits + (size_t)B * T * V);

    InferenceState<double> st(m, B, T);
    CHECK(st.layers[0].attn.len == 4);  // S + W = 1 + 3 slots, not T
    CHECK(st.layers[2].attn.len == 4);  // 2 + 2
    double max_logit = 0;
    CHECK(step_vs_full(m, tok, B, T, max_logit, &st) < 1e-10);
    CHECK(max_logit > 1e-2);

    // the window matters: without it the same weights give other logits after position W + S
    Model<double> full_attn(mc);
    std::copy(m.params.begin(), m.params.end(), full_attn.params.begin());
    full_attn.forward(tok.data(), nullptr, B, T);
    CHECK(max_abs_diff(full_attn.logits, full.data(), full.size()) > 1e-6);
    // and the windowed state is smaller than the full-attention one
    InferenceState<double> st_full(full_attn, B, T);
    CHECK(st.cache_bytes() < st_full.cache_bytes());
}

// ---------------------------------------------------------------------------------------------------------
// Bad sizes and configs
// ---------------------------------------------------------------------------------------------------------

TEST_CASE("bad attention and rope configs are clear errors") {
    std::vector<double> a(64);
    CHECK_THROWS_WITH_AS(rope_forward(a.data(), a.data(), 1, 2, 1, 5, 10000.0),
                         "rope: head dim must be even to pair channels (i, i + hd/2), got hd=5", hl::Error);
    CHECK_THROWS_AS(rope_backward(a.data(), a.data(), 1, 0, 1, 4, 10000.0), hl::Error);
    CHECK_THROWS_AS(rope_forward(a.data(), a.data(), 1, 2, 1, 4, -1.0), hl::Error);
    CHECK_THROWS_WITH_AS(attention_forward(a.data(), a.data(), a.data(), a.data(), a.data(), 1, 2, 3, 2, 2, 2),
                         "attention: n_heads (3) must be a multiple of n_kv_heads (2)", hl::Error);
    CHECK_THROWS_AS(attention_backward(a.data(), a.data(), a.data(), a.data(), a.data(), a.data(), a.data(), a.data(),
                                       1, 2, 0, 1, 2, 2),
                    hl::Error);

    CHECK_NOTHROW(attn_config_check(AttnConfig{8, 4, 2, 2, 2}));
    CHECK_THROWS_WITH_AS(attn_config_check(AttnConfig{8, 4, 3, 2, 2}),
                         "attention config: n_heads (4) must be a multiple of n_kv_heads (3)", hl::Error);
    CHECK_THROWS_WITH_AS(attn_config_check(AttnConfig{8, 4, 2, 3, 2}),
                         "attention config: d_qk must be even for RoPE, got 3", hl::Error);
    CHECK_THROWS_AS(attn_config_check(AttnConfig{0, 4, 2, 2, 2}), hl::Error);
    CHECK_THROWS_AS(attn_config_check(AttnConfig{8, 4, 0, 2, 2}), hl::Error);
    CHECK_THROWS_AS(attn_config_check(AttnConfig{8, 4, 2, 2, -1}), hl::Error);
    CHECK_THROWS_AS(attn_config_check(AttnConfig{}), hl::Error);
    // window and sink
    CHECK_NOTHROW(attn_config_check(AttnConfig{8, 4, 2, 2, 2, 1e4, 1, 0}));
    CHECK_NOTHROW(attn_config_check(AttnConfig{8, 4, 2, 2, 2, 1e4, 512, 64}));
    CHECK_THROWS_WITH_AS(attn_config_check(AttnConfig{8, 4, 2, 2, 2, 1e4, 0, 4}),
                         "attention config: a sink (4) needs a sliding window (window > 0)", hl::Error);
    CHECK_THROWS_AS(attn_config_check(AttnConfig{8, 4, 2, 2, 2, 1e4, -1, 0}), hl::Error);
    CHECK_THROWS_AS(attn_config_check(AttnConfig{8, 4, 2, 2, 2, 1e4, 3, -1}), hl::Error);
    CHECK_THROWS_AS(attention_forward(a.data(), a.data(), a.data(), a.data(), a.data(), 1, 2, 2, 2, 2, 2, -1, 0),
                    hl::Error);
    CHECK_THROWS_AS(attention_backward(a.data(), a.data(), a.data(), a.data(), a.data(), a.data(), a.data(), a.data(),
                                       1, 2, 2, 2, 2, 2, 0, 3),
                    hl::Error);
    Arena<double> count;
    CHECK_THROWS_AS(attn_params(count, AttnConfig{8, 4, 3, 2, 2}), hl::Error);
    CHECK_THROWS_AS(attn_acts(count, AttnConfig{8, 4, 2, 2, 2}, 0, 3), hl::Error);

    // the mixer refuses params made without an output projection
    Rng rng(50);
    AttnConfig c{8, 4, 2, 2, 2};
    AttnSetup s(c, 1, 3, false, rng);
    CHECK_THROWS_AS(attn_mixer_forward(a.data(), s.acts, a.data(), s.p, c, 1, 3), hl::Error);
}
