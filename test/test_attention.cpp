// test_attention.cpp — RoPE, the causal GQA attention core, the attention branch and the full mixer:
// closed forms, a naive reference, causality, finite-difference gradients and bad configs.
#include <algorithm>           // std::fill, std::max
#include <cmath>               // std::cos, std::sin, std::exp, std::sqrt, std::isfinite, INFINITY
#include <vector>              // std::vector
#include "test/gradcheck.h"    // check_grad, randn, dot, max_abs_diff, doctest
#include "model/attention.h"   // attention_*, attn_*
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

// Naive reference: the full (T, T) score matrix with −∞ above the diagonal, softmax over each whole row.
static void naive_attention(std::vector<double>& out, std::vector<double>& att, const std::vector<double>& q,
                            const std::vector<double>& k, const std::vector<double>& v, int B, int T, int H, int Hkv,
                            int dqk, int dv) {
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
                    S[t * T + s] = s <= t ? sc / std::sqrt(double(dqk)) : -INFINITY;
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

TEST_CASE("attention mixer passes the gradient check (block A shapes and dqk != dv)") {
    Rng rng(40);
    const int B = 2, T = 5;
    // block A: d_qk = d_v = D / H with D = 12, H = 3, Hkv = 1; intra-hybrid-like: d_qk = 6, d_v = 5, D = 7
    for (AttnConfig c : {AttnConfig{12, 3, 1, 4, 4, 500000.0}, AttnConfig{7, 4, 2, 6, 5, 30.0}}) {
        CAPTURE(c.d_model);
        const int D = c.d_model;
        AttnSetup s(c, B, T, true, rng);
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
    Arena<double> count;
    CHECK_THROWS_AS(attn_params(count, AttnConfig{8, 4, 3, 2, 2}), hl::Error);
    CHECK_THROWS_AS(attn_acts(count, AttnConfig{8, 4, 2, 2, 2}, 0, 3), hl::Error);

    // the mixer refuses params made without an output projection
    Rng rng(50);
    AttnConfig c{8, 4, 2, 2, 2};
    AttnSetup s(c, 1, 3, false, rng);
    CHECK_THROWS_AS(attn_mixer_forward(a.data(), s.acts, a.data(), s.p, c, 1, 3), hl::Error);
}
