// test_layers.cpp — embedding (and the tied LM head), SwiGLU, cross-entropy, AdamW and gradient
// clipping: finite differences, values worked out by hand, and bad inputs; the arena's scratch placement.
#include <cmath>                // std::log, std::log1p, std::exp, std::sqrt, std::isfinite
#include <vector>               // std::vector
#include "test/gradcheck.h"     // check_grad, randn, dot
#include "model/adamw.h"        // adamw_update, grad_norm, clip_grad_norm
#include "model/crossentropy.h" // crossentropy_forward/backward
#include "model/embedding.h"    // embedding_forward/backward
#include "model/matmul.h"       // matmul_forward/backward (the tied LM head)
#include "model/swiglu.h"       // SwiGLU config, params, acts, forward/backward

using namespace hl;
using namespace hl::test;

TEST_CASE("embedding: forward copies rows; backward (repeated tokens) passes the gradient check") {
    Rng rng(11);
    const int B = 2, T = 7, V = 6, D = 5, N = B * T;
    // token 3 appears four times, 0 twice, 5 never: repeated rows must sum, unused rows stay zero
    std::vector<int> tok = {3, 0, 3, 1, 2, 3, 4, 0, 3, 2, 1, 1, 4, 2};
    auto wte = randn(rng, V * D), probe = randn(rng, N * D);
    std::vector<double> out(N * D);
    embedding_forward(out.data(), tok.data(), wte.data(), B, T, V, D);
    for (int n = 0; n < N; n++)
        for (int d = 0; d < D; d++) CHECK(out[n * D + d] == wte[tok[n] * D + d]);
    auto loss = [&] {
        embedding_forward(out.data(), tok.data(), wte.data(), B, T, V, D);
        return dot(out.data(), probe.data(), out.size());
    };
    std::vector<double> dwte(V * D, 0.0);
    embedding_backward(dwte.data(), probe.data(), tok.data(), B, T, V, D);
    check_grad("wte", wte.data(), dwte.data(), dwte.size(), loss);
    for (int d = 0; d < D; d++) CHECK(dwte[5 * D + d] == 0.0);

    // accumulates: a second backward doubles it
    std::vector<double> d1 = dwte;
    embedding_backward(dwte.data(), probe.data(), tok.data(), B, T, V, D);
    for (size_t i = 0; i < dwte.size(); i++) CHECK(dwte[i] == doctest::Approx(2 * d1[i]));
}

TEST_CASE("embedding backward splits columns race-free when D spans several tiles") {
    // D = 70 > 2 column tiles of 32, and every position holds the same token: the worst case for races
    Rng rng(12);
    const int B = 3, T = 5, V = 4, D = 70, N = B * T;
    std::vector<int> tok(N, 2);
    auto dout = randn(rng, N * D);
    std::vector<double> dwte(V * D, 1.0);
    embedding_backward(dwte.data(), dout.data(), tok.data(), B, T, V, D);
    for (int v = 0; v < V; v++)
        for (int d = 0; d < D; d++) {
            double ref = 1.0;
            if (v == 2)
                for (int n = 0; n < N; n++) ref += dout[n * D + d];
            CHECK(dwte[v * D + d] == doctest::Approx(ref).epsilon(1e-12));
        }
}

TEST_CASE("tied LM head: embed -> matmul with wte -> mean cross-entropy; dwte gets both paths") {
    Rng rng(13);
    const int B = 2, T = 7, V = 6, D = 5, N = B * T;
    std::vector<int> tok = {1, 4, 4, 0, 2, 5, 1, 3, 3, 3, 0, 2, 4, 1};
    std::vector<int> tgt = {4, 4, 0, 2, 5, 1, 3, 3, 3, 0, 2, 4, 1, 5};
    auto wte = randn(rng, V * D, 0.7);
    std::vector<double> x(N * D), logits(N * V), probs(N * V), losses(N);
    auto loss = [&] {
        embedding_forward(x.data(), tok.data(), wte.data(), B, T, V, D);
        matmul_forward(logits.data(), x.data(), wte.data(), (const double*)nullptr, N, D, V);  // the tied head
        crossentropy_forward(losses.data(), probs.data(), logits.data(), tgt.data(), N, V);
        double s = 0;
        for (double l : losses) s += l;
        return s / N;
    };
    loss();
    std::vector<double> dlosses(N, 1.0 / N), dlogits(N * V), dx(N * D), dwte(V * D, 0.0);
    crossentropy_backward(dlogits.data(), dlosses.data(), probs.data(), tgt.data(), N, V);
    matmul_backward(dx.data(), dwte.data(), (double*)nullptr, dlogits.data(), x.data(), wte.data(), N, D, V);
    std::vector<double> head_only = dwte;
    embedding_backward(dwte.data(), dx.data(), tok.data(), B, T, V, D);
    check_grad("wte (tied)", wte.data(), dwte.data(), dwte.size(), loss);
    // the lookup path really contributed: the head alone is not the full gradient
    CHECK(max_abs_diff(head_only.data(), dwte.data(), dwte.size()) > 1e-3);
}

TEST_CASE("arena: take_scratch is take without a scratch arena, and takes from it with one (the GPU model's shared region)") {
    const SwiGLUConfig cfg{5, 9};
    const int N = 7, F = cfg.d_ff, D = cfg.d_model;
    std::vector<float> buf(size_t(N) * (6 * F + D)), sbuf(buf.size());
    // no scratch: every tensor one after another, in the order taken (the CPU's layout)
    Arena<float> plain(buf.data());
    auto p = swiglu_acts(plain, cfg, N);
    CHECK(plain.size == buf.size());
    CHECK(p.dh1 == p.h + size_t(N) * F);
    CHECK(p.scratch_dinp == p.dh + size_t(N) * F);
    // with one: the activations the forward saves stay in the main arena, the backward's scratch comes from the other,
    // in the same order, and the prefix goes with its names
    std::vector<TensorInfo> sinfo;
    Arena<float> main_(buf.data()), scratch(sbuf.data(), &sinfo);
    main_.scratch = &scratch;
    main_.prefix = "ffn.";
    auto q = swiglu_acts(main_, cfg, N);
    CHECK(main_.size == size_t(3) * N * F);
    CHECK(scratch.size == size_t(N) * (3 * F + D));
    CHECK(q.h1 == buf.data());
    CHECK(q.h == buf.data() + size_t(2) * N * F);
    CHECK(q.dh1 == sbuf.data());
    CHECK(q.dh3 == sbuf.data() + size_t(N) * F);
    CHECK(q.scratch_dinp == sbuf.data() + size_t(3) * N * F);
    REQUIRE(sinfo.size() == 4);
    CHECK(sinfo[0].name == "ffn.dh1");
    CHECK(sinfo[3].name == "ffn.scratch_dinp");
    // a second layer's layout starting the scratch arena again gets the same scratch, new saved tensors
    scratch.size = 0;
    auto r = swiglu_acts(main_, cfg, N);
    CHECK(r.dh == q.dh);
    CHECK(r.h1 == q.h1 + size_t(3) * N * F);
    // take_layers_sharing_scratch does that for L layers (here of two widths) and leaves the scratch arena's size at
    // the largest layer's, the main arena without a scratch arena
    const SwiGLUConfig wide{5, 13};
    Arena<float> m2, s2;
    std::vector<SwiGLUActs<float>> layers;
    take_layers_sharing_scratch(m2, s2, 3, [&](int l) { layers.push_back(swiglu_acts(m2, l == 1 ? wide : cfg, N)); });
    CHECK(m2.scratch == nullptr);
    CHECK(m2.size == size_t(3) * N * (2 * F + wide.d_ff));
    CHECK(s2.size == size_t(N) * (3 * wide.d_ff + D));
}

TEST_CASE("swiglu: forward matches the formula; backward passes the gradient check for w1, w3, w2, input") {
    Rng rng(14);
    const int N = 7;
    const SwiGLUConfig cfg{5, 9};
    const int D = cfg.d_model, F = cfg.d_ff;

    std::vector<TensorInfo> infos;
    Arena<double> count;
    swiglu_params(count, cfg);
    CHECK(count.size == size_t(3 * F * D));
    std::vector<double> w(count.size), dw(count.size, 0.0);
    rng.fill_normal(w.data(), w.size(), 0.5);
    Arena<double> aw(w.data(), &infos), adw(dw.data());
    SwiGLUParams<double> p = swiglu_params(aw, cfg), dp = swiglu_params(adw, cfg);
    REQUIRE(infos.size() == 3);
    CHECK(infos[0].name == "w1");
    CHECK(infos[1].name == "w3");
    CHECK(infos[2].name == "w2");
    CHECK(infos[2].shape == std::vector<int>{D, F});

    Arena<double> acount;
    swiglu_acts(acount, cfg, N);
    std::vector<double> abuf(acount.size);
    Arena<double> aa(abuf.data());
    SwiGLUActs<double> acts = swiglu_acts(aa, cfg, N);

    auto x = randn(rng, N * D), probe = randn(rng, N * D);
    std::vector<double> out(N * D), dx(N * D, 123.0);
    swiglu_forward(out.data(), acts, x.data(), p, cfg, N);
    for (int n = 0; n < N; n++)  // naive reference
        for (int d = 0; d < D; d++) {
            double ref = 0;
            for (int f = 0; f < F; f++) {
                double h1 = 0, h3 = 0;
                for (int c = 0; c < D; c++) {
                    h1 += p.w1[f * D + c] * x[n * D + c];
                    h3 += p.w3[f * D + c] * x[n * D + c];
                }
                ref += p.w2[d * F + f] * (h1 / (1 + std::exp(-h1))) * h3;
            }
            CHECK(out[n * D + d] == doctest::Approx(ref).epsilon(1e-12));
        }

    auto loss = [&] {
        swiglu_forward(out.data(), acts, x.data(), p, cfg, N);
        return dot(out.data(), probe.data(), out.size());
    };
    loss();
    swiglu_backward(dx.data(), dp, probe.data(), acts, x.data(), p, cfg, N);
    check_grad("w1", p.w1, dp.w1, size_t(F * D), loss);
    check_grad("w3", p.w3, dp.w3, size_t(F * D), loss);
    check_grad("w2", p.w2, dp.w2, size_t(D * F), loss);
    check_grad("input", x.data(), dx.data(), dx.size(), loss);

    // parameter gradients accumulate, the input gradient is overwritten
    loss();
    std::vector<double> dw1 = dw, dx1 = dx;
    swiglu_backward(dx.data(), dp, probe.data(), acts, x.data(), p, cfg, N);
    for (size_t i = 0; i < dw.size(); i++) CHECK(dw[i] == doctest::Approx(2 * dw1[i]));
    for (size_t i = 0; i < dx.size(); i++) CHECK(dx[i] == doctest::Approx(dx1[i]));
}

TEST_CASE("cross-entropy: gradient check w.r.t. logits with non-uniform dlosses") {
    Rng rng(15);
    const int N = 7, V = 11;
    auto logits = randn(rng, N * V, 2.0), dlosses = randu(rng, N, 0.1, 2.0);
    std::vector<int> tgt = {0, 10, 3, 3, 7, 1, 10};
    std::vector<double> losses(N), probs(N * V), dlogits(N * V, 123.0);
    auto loss = [&] {
        crossentropy_forward(losses.data(), probs.data(), logits.data(), tgt.data(), N, V);
        return dot(losses.data(), dlosses.data(), N);
    };
    loss();
    for (int n = 0; n < N; n++) {  // against −log softmax computed naively (fine for these small logits)
        double s = 0;
        for (int v = 0; v < V; v++) s += std::exp(logits[n * V + v]);
        CHECK(losses[n] == doctest::Approx(-std::log(std::exp(logits[n * V + tgt[n]]) / s)).epsilon(1e-12));
    }
    crossentropy_backward(dlogits.data(), dlosses.data(), probs.data(), tgt.data(), N, V);
    check_grad("logits", logits.data(), dlogits.data(), dlogits.size(), loss);
}

template <typename F>
void check_huge_logits() {
    // rows [1000, 999, −1000]: logsumexp = 1000 + log(1 + e^−1 + e^−2000) = 1000 + log1p(e^−1)
    const int N = 3, V = 3;
    std::vector<F> logits = {1000, 999, -1000, 1000, 999, -1000, -1000, -1000, 1000};
    std::vector<int> tgt = {0, 2, 1};
    std::vector<F> losses(N), probs(N * V), dlogits(N * V), dl(N, F(1));
    crossentropy_forward(losses.data(), probs.data(), logits.data(), tgt.data(), N, V);
    const double lse01 = 1000 + std::log1p(std::exp(-1.0));          // rows 0, 1
    const double lse2 = 1000 + std::log1p(2 * std::exp(-2000.0));  // row 2: = 1000 in any precision
    CHECK(double(losses[0]) == doctest::Approx(lse01 - 1000).epsilon(1e-5));
    CHECK(double(losses[1]) == doctest::Approx(lse01 + 1000).epsilon(1e-6));  // p[target] underflows to 0
    CHECK(double(losses[2]) == doctest::Approx(lse2 + 1000).epsilon(1e-6));
    CHECK(double(probs[1]) == doctest::Approx(std::exp(999 - lse01)).epsilon(1e-5));
    crossentropy_backward(dlogits.data(), dl.data(), probs.data(), tgt.data(), N, V);
    for (int i = 0; i < N * V; i++) {
        CHECK(std::isfinite(double(probs[i])));
        CHECK(std::isfinite(double(dlogits[i])));
    }
    for (int n = 0; n < N; n++) {
        CHECK(std::isfinite(double(losses[n])));
        double s = 0, ds = 0;
        for (int v = 0; v < V; v++) { s += probs[n * V + v]; ds += dlogits[n * V + v]; }
        CHECK(s == doctest::Approx(1.0).epsilon(1e-6));
        CHECK(ds == doctest::Approx(0.0).epsilon(1e-6));  // Σ (p − onehot) = 0
    }
}

TEST_CASE("cross-entropy with logits of ±1000 stays finite and equals log-sum-exp by hand") {
    SUBCASE("double") { check_huge_logits<double>(); }
    SUBCASE("float") { check_huge_logits<float>(); }
}

TEST_CASE("cross-entropy of uniform logits is log V") {
    const int N = 4, V = 13;
    std::vector<double> logits(N * V, 3.7), losses(N), probs(N * V);
    std::vector<int> tgt = {0, 12, 5, 5};
    crossentropy_forward(losses.data(), probs.data(), logits.data(), tgt.data(), N, V);
    for (int n = 0; n < N; n++) CHECK(losses[n] == doctest::Approx(std::log(double(V))).epsilon(1e-14));
    for (double p : probs) CHECK(p == doctest::Approx(1.0 / V).epsilon(1e-14));
}

// A tiny parameter layout like the model's: a projection (decays), a norm weight (does not),
// a conv kernel (2-D, but named conv_w: does not).
template <typename F>
std::vector<TensorInfo> toy_layout(Arena<F>& a) {
    std::vector<TensorInfo> infos;
    a.infos = &infos;
    typename Arena<F>::Scope s(a, "layers.0.");
    a.take("mixer.in_proj.weight", {3, 4});
    a.take("norm.weight", {5});
    a.take("mixer.conv_w", {2, 4});
    a.infos = nullptr;
    return infos;
}

TEST_CASE("adamw: two steps match the closed form; decay on matrices only") {
    Arena<double> a;
    std::vector<TensorInfo> tensors = toy_layout(a);
    REQUIRE(tensors.size() == 3);
    CHECK(adamw_decays(tensors[0]));
    CHECK(!adamw_decays(tensors[1]));
    CHECK(!adamw_decays(tensors[2]));
    const size_t n = a.size;
    Rng rng(16);
    auto p = randn(rng, n), g1 = randn(rng, n), g2 = randn(rng, n);
    std::vector<double> p0 = p, m(n, 0.0), v(n, 0.0);
    AdamWConfig cfg;
    cfg.weight_decay = 0.25f;
    const double lr = 0.01, b1 = cfg.beta1, b2 = cfg.beta2, eps = cfg.eps, wd = cfg.weight_decay;

    // step 1: m̂ = g, v̂ = g², so the step is lr·(g / (|g| + eps) + wd·p)
    adamw_update(p.data(), g1.data(), m.data(), v.data(), tensors, cfg, lr, 1);
    std::vector<double> p1(n);
    for (const TensorInfo& t : tensors) {
        double w = t.shape.size() == 2 && t.name != "layers.0.mixer.conv_w" ? wd : 0.0;
        for (size_t i = t.offset; i < t.offset + t.numel; i++) {
            p1[i] = p0[i] - lr * (g1[i] / (std::fabs(g1[i]) + eps) + w * p0[i]);
            CHECK(p[i] == doctest::Approx(p1[i]).epsilon(1e-12));
        }
    }
    // the norm weight moved by exactly lr (no decay); the matrix by more or less than lr
    CHECK(std::fabs(p[12] - p0[12]) == doctest::Approx(lr).epsilon(1e-6));

    // step 2: full moments with bias correction 1 − β^2
    adamw_update(p.data(), g2.data(), m.data(), v.data(), tensors, cfg, lr, 2);
    for (const TensorInfo& t : tensors) {
        double w = t.name == "layers.0.mixer.in_proj.weight" ? wd : 0.0;
        for (size_t i = t.offset; i < t.offset + t.numel; i++) {
            double mm = b1 * (1 - b1) * g1[i] + (1 - b1) * g2[i];
            double vv = b2 * (1 - b2) * g1[i] * g1[i] + (1 - b2) * g2[i] * g2[i];
            double mhat = mm / (1 - b1 * b1), vhat = vv / (1 - b2 * b2);
            double ref = p1[i] - lr * (mhat / (std::sqrt(vhat) + eps) + w * p1[i]);
            CHECK(m[i] == doctest::Approx(mm).epsilon(1e-12));
            CHECK(v[i] == doctest::Approx(vv).epsilon(1e-12));
            CHECK(p[i] == doctest::Approx(ref).epsilon(1e-12));
        }
    }
}

TEST_CASE("adamw on a quadratic converges (float)") {
    Arena<float> a;
    std::vector<TensorInfo> tensors = toy_layout(a);
    const size_t n = a.size;
    Rng rng(17);
    std::vector<float> p(n), target(n), curv(n), g(n), m(n, 0.f), v(n, 0.f);
    rng.fill_normal(p.data(), n, 1.0);
    rng.fill_normal(target.data(), n, 1.0);
    rng.fill_uniform(curv.data(), n, 0.5, 5.0);  // L = ½ Σ c (p − target)², differently curved per entry
    AdamWConfig cfg;
    cfg.weight_decay = 0.f;  // with decay the minimum moves; the closed-form test covers decay
    auto L = [&] {
        double s = 0;
        for (size_t i = 0; i < n; i++) s += 0.5 * curv[i] * (p[i] - target[i]) * (p[i] - target[i]);
        return s;
    };
    const double L0 = L();
    const int steps = 600;
    for (int s = 1; s <= steps; s++) {
        for (size_t i = 0; i < n; i++) g[i] = curv[i] * (p[i] - target[i]);
        float lr = 0.05f * (1.f - float(s - 1) / steps);  // linear decay to 0 damps Adam's sign-like steps
        adamw_update(p.data(), g.data(), m.data(), v.data(), tensors, cfg, lr, s);
    }
    for (size_t i = 0; i < n; i++) CHECK(std::fabs(p[i] - target[i]) < 1e-2f);
    CHECK(L() < 1e-4 * L0);
}

TEST_CASE("grad_norm and clip_grad_norm by hand") {
    std::vector<double> g = {3, 0, -4};
    CHECK(grad_norm(g.data(), g.size()) == doctest::Approx(5.0).epsilon(1e-15));
    // below the limit: untouched, norm returned
    CHECK(clip_grad_norm(g.data(), g.size(), 10.0) == doctest::Approx(5.0).epsilon(1e-15));
    CHECK(g == std::vector<double>{3, 0, -4});
    // above: scaled to norm 1, the pre-clip norm returned
    CHECK(clip_grad_norm(g.data(), g.size(), 1.0) == doctest::Approx(5.0).epsilon(1e-15));
    CHECK(g[0] == doctest::Approx(0.6).epsilon(1e-15));
    CHECK(g[1] == 0.0);
    CHECK(g[2] == doctest::Approx(-0.8).epsilon(1e-15));
    CHECK(grad_norm(g.data(), g.size()) == doctest::Approx(1.0).epsilon(1e-15));

    // many float entries: the double accumulator keeps the sum exact-ish (1e6 · 1e-3² = 1)
    std::vector<float> f(1000000, 1e-3f);
    CHECK(double(grad_norm(f.data(), f.size())) == doctest::Approx(1.0).epsilon(1e-6));
    CHECK(double(clip_grad_norm(f.data(), f.size(), 0.5f)) == doctest::Approx(1.0).epsilon(1e-6));
    CHECK(double(grad_norm(f.data(), f.size())) == doctest::Approx(0.5).epsilon(1e-6));
}

TEST_CASE("bad tokens, targets and configs are clear errors") {
    std::vector<double> wte(4 * 3), out(2 * 3), dw(4 * 3);
    std::vector<int> tok = {1, 4};  // 4 is not < V = 4
    CHECK_THROWS_WITH_AS(embedding_forward(out.data(), tok.data(), wte.data(), 1, 2, 4, 3),
                         "embedding: token id 4 at position (b=0, t=1) is out of range [0, V=4)", hl::Error);
    tok = {-1, 0};
    CHECK_THROWS_WITH_AS(embedding_backward(dw.data(), out.data(), tok.data(), 1, 2, 4, 3),
                         "embedding: token id -1 at position (b=0, t=0) is out of range [0, V=4)", hl::Error);

    std::vector<double> logits(2 * 5), probs(2 * 5), losses(2), dl(2);
    std::vector<int> tgt = {0, 5};
    CHECK_THROWS_WITH_AS(crossentropy_forward(losses.data(), probs.data(), logits.data(), tgt.data(), 2, 5),
                         "crossentropy: target 5 at row 1 is out of range [0, V=5)", hl::Error);
    tgt = {-2, 0};
    CHECK_THROWS_AS(crossentropy_backward(logits.data(), dl.data(), probs.data(), tgt.data(), 2, 5), hl::Error);

    Arena<double> a;
    CHECK_THROWS_WITH_AS(swiglu_params(a, SwiGLUConfig{8, 0}), "swiglu: bad config d_model=8 d_ff=0", hl::Error);
    CHECK_THROWS_AS(swiglu_acts(a, SwiGLUConfig{8, 16}, 0), hl::Error);

    std::vector<TensorInfo> tensors;
    std::vector<double> p(1), g(1), m(1), v(1);
    CHECK_THROWS_WITH_AS(adamw_update(p.data(), g.data(), m.data(), v.data(), tensors, AdamWConfig{}, 1e-3, 0),
                         "adamw: step is 1-based (for bias correction), got 0", hl::Error);
    CHECK_THROWS_AS(clip_grad_norm(g.data(), g.size(), 0.0), hl::Error);
}
