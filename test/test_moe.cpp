// test_moe.cpp — the mixture-of-experts FFN (model/moe.h): the grouped computation against a naive per-token
// loop, finite-difference gradients with the routing held fixed, zero gradients for unused experts, the bias
// choosing but never scaling, the balancing update and a balancing simulation, and bad configs.
#include <algorithm>            // std::max, std::min
#include <cmath>                // std::exp, std::fabs, std::sqrt
#include <string>               // std::string, std::to_string
#include <vector>               // std::vector
#include "test/gradcheck.h"     // check_grad, randn, randomize_for_gradcheck, dot, max_abs_diff
#include "model/moe.h"          // MoEConfig/Params/Acts, moe_params/acts/init, moe_forward/backward, moe_route,
                                // moe_update_bias

using namespace hl;
using namespace hl::test;

namespace {

// One MoE layer with its weights, gradients and activations, all owned here.
struct MoELayer {
    MoEConfig cfg;
    int N;
    std::vector<TensorInfo> infos;          // the parameter tensors, in order
    std::vector<double> w, dw, abuf;        // weights, their gradients, activations
    std::vector<int> ibuf;                  // integer activations (routing)
    MoEParams<double> p, dp;
    MoEActs<double> acts;

    MoELayer(const MoEConfig& c, int n) : cfg(c), N(n) {
        Arena<double> count;
        moe_params(count, cfg);
        w.assign(count.size, 0.0);
        dw.assign(count.size, 0.0);
        Arena<double> aw(w.data(), &infos), adw(dw.data());
        p = moe_params(aw, cfg);
        dp = moe_params(adw, cfg);
        Arena<double> acount;
        Arena<int> iacount;
        moe_acts(acount, iacount, cfg, N);
        abuf.assign(acount.size, 0.0);
        ibuf.assign(iacount.size, -1);
        Arena<double> aa(abuf.data());
        Arena<int> ia(ibuf.data());
        acts = moe_acts(aa, ia, cfg, N);
    }
    MoELayer(const MoELayer&) = delete;  // the views point into the vectors
};

// y (D) = W2 · (SiLU(W1·x) ⊙ W3·x) for one token, written out loop by loop.
void swiglu_row(double* y, const double* x, const double* w1, const double* w3, const double* w2, int D, int F) {
    std::vector<double> h(F);
    for (int f = 0; f < F; f++) {
        double h1 = 0, h3 = 0;
        for (int c = 0; c < D; c++) {
            h1 += w1[f * D + c] * x[c];
            h3 += w3[f * D + c] * x[c];
        }
        h[f] = h1 / (1 + std::exp(-h1)) * h3;
    }
    for (int d = 0; d < D; d++) {
        y[d] = 0;
        for (int f = 0; f < F; f++) y[d] += w2[d * F + f] * h[f];
    }
}

// The layer token by token, straight from the formula. Fills out (N, D), expert (N), gate (N).
void naive_moe(std::vector<double>& out, std::vector<int>& expert, std::vector<double>& gate, const double* x,
               const MoEParams<double>& p, const double* bias, const MoEConfig& c, int N) {
    const int D = c.d_model, F = c.d_ff, E = c.n_experts;
    out.assign(N * D, 0.0);
    expert.assign(N, -1);
    gate.assign(N, 0.0);
    std::vector<double> ys(D), ye(D);
    for (int n = 0; n < N; n++) {
        const double* xn = x + n * D;
        swiglu_row(ys.data(), xn, p.shared.w1, p.shared.w3, p.shared.w2, D, F);
        int best = -1;
        double best_sel = -1e300, best_score = 0;
        for (int e = 0; e < E; e++) {
            double logit = 0;
            for (int d = 0; d < D; d++) logit += p.router[e * D + d] * xn[d];
            double score = 1 / (1 + std::exp(-logit));
            double sel = score + (bias ? bias[e] : 0.0);
            if (sel > best_sel) { best = e; best_sel = sel; best_score = score; }
        }
        swiglu_row(ye.data(), xn, p.w1 + best * F * D, p.w3 + best * F * D, p.w2 + best * D * F, D, F);
        expert[n] = best;
        gate[n] = best_score;
        for (int d = 0; d < D; d++) out[n * D + d] = ys[d] + best_score * ye[d];
    }
}

// Smallest gap, over tokens, between the chosen expert's biased score and the runner-up's.
double min_margin(const MoEActs<double>& acts, const double* bias, int E, int N) {
    double m = 1e300;
    for (int n = 0; n < N; n++) {
        double first = -1e300, second = -1e300;
        for (int e = 0; e < E; e++) {
            double s = sigmoid(acts.logits[n * E + e]) + (bias ? bias[e] : 0.0);
            if (s > first) { second = first; first = s; }
            else if (s > second) second = s;
        }
        m = std::min(m, first - second);
    }
    return m;
}

int load(const MoEActs<double>& acts, int e) { return acts.offsets[e + 1] - acts.offsets[e]; }

double max_abs(const double* a, size_t n) {
    double m = 0;
    for (size_t i = 0; i < n; i++) m = std::max(m, std::fabs(a[i]));
    return m;
}

}  // namespace

TEST_CASE("moe: params are named and shaped as the checkpoint expects; init draws at std and out_std") {
    const MoEConfig cfg{32, 16, 8, 1e-3};
    MoELayer L(cfg, 4);
    const int D = 32, F = 16, E = 8;
    REQUIRE(L.infos.size() == 7);
    const char* names[] = {"shared.w1", "shared.w3", "shared.w2", "router", "experts.w1", "experts.w3", "experts.w2"};
    const std::vector<int> shapes[] = {{F, D}, {F, D}, {D, F}, {E, D}, {E, F, D}, {E, F, D}, {E, D, F}};
    for (int i = 0; i < 7; i++) {
        CHECK(L.infos[i].name == names[i]);
        CHECK(L.infos[i].shape == shapes[i]);
    }
    Rng rng(1);
    moe_init(L.p, cfg, rng, 0.02, 0.002);
    for (const TensorInfo& t : L.infos) {
        double ss = 0;
        for (size_t i = 0; i < t.numel; i++) ss += L.w[t.offset + i] * L.w[t.offset + i];
        const double rms = std::sqrt(ss / t.numel), want = ends_with(t.name, "w2") ? 0.002 : 0.02;
        INFO(t.name, " rms ", rms);
        CHECK(rms == doctest::Approx(want).epsilon(0.15));
    }
}

TEST_CASE("moe: the grouped forward equals a naive per-token loop; perm/offsets are a stable sort by expert") {
    Rng rng(21);
    const MoEConfig cfg{8, 5, 8, 1e-3};
    const int N = 37, D = 8, E = 8;
    MoELayer L(cfg, N);
    randomize_for_gradcheck(L.infos, L.w.data(), rng);
    auto x = randn(rng, N * D);
    auto bias = randn(rng, E, 0.1);
    bias[5] = -5.0;  // expert 5 gets no tokens: the grouped code must skip it
    std::vector<double> out(N * D, 123.0);
    moe_forward(out.data(), L.acts, x.data(), L.p, bias.data(), cfg, N);

    std::vector<double> ref, gate;
    std::vector<int> expert;
    naive_moe(ref, expert, gate, x.data(), L.p, bias.data(), cfg, N);
    CHECK(max_abs_diff(out.data(), ref.data(), out.size()) < 1e-12);
    CHECK(max_abs(ref.data(), ref.size()) > 0.1);  // not a vacuous comparison
    int used = 0;
    for (int n = 0; n < N; n++) {
        CHECK(L.acts.expert[n] == expert[n]);
        CHECK(L.acts.gate[n] == doctest::Approx(gate[n]).epsilon(1e-14));
    }
    // offsets: counts in order, covering all N rows; perm: each block holds its expert's tokens, ascending
    CHECK(L.acts.offsets[0] == 0);
    CHECK(L.acts.offsets[E] == N);
    CHECK(load(L.acts, 5) == 0);
    std::vector<int> seen(N, 0);
    for (int e = 0; e < E; e++) {
        used += load(L.acts, e) > 0;
        for (int j = L.acts.offsets[e]; j < L.acts.offsets[e + 1]; j++) {
            const int n = L.acts.perm[j];
            REQUIRE((n >= 0 && n < N));
            seen[n]++;
            CHECK(expert[n] == e);
            if (j > L.acts.offsets[e]) CHECK(L.acts.perm[j - 1] < n);
            for (int d = 0; d < D; d++) CHECK(L.acts.xp[j * D + d] == x[n * D + d]);
        }
    }
    for (int n = 0; n < N; n++) CHECK(seen[n] == 1);
    CHECK(used >= 4);  // several groups really formed

    // without a bias the selection is the plain argmax of the scores
    moe_forward(out.data(), L.acts, x.data(), L.p, (const double*)nullptr, cfg, N);
    naive_moe(ref, expert, gate, x.data(), L.p, nullptr, cfg, N);
    CHECK(max_abs_diff(out.data(), ref.data(), out.size()) < 1e-12);
    for (int n = 0; n < N; n++) CHECK(L.acts.expert[n] == expert[n]);
}

TEST_CASE("moe: gradient check of every parameter and the input, with routing stable under the perturbation") {
    Rng rng(7);
    const MoEConfig cfg{6, 4, 4, 1e-3};
    const int N = 11, D = 6, E = 4;
    MoELayer L(cfg, N);
    randomize_for_gradcheck(L.infos, L.w.data(), rng);
    auto x = randn(rng, N * D), probe = randn(rng, N * D);
    const std::vector<double> bias = {0.03, -0.02, 0.05, 0.0};
    std::vector<double> out(N * D), dx(N * D, 123.0);

    // the routing of the unperturbed point: every expert used, no token near a decision boundary
    moe_forward(out.data(), L.acts, x.data(), L.p, bias.data(), cfg, N);
    const std::vector<int> routed(L.acts.expert, L.acts.expert + N);
    for (int e = 0; e < E; e++) CHECK(load(L.acts, e) > 0);
    const double margin = min_margin(L.acts, bias.data(), E, N);
    INFO("smallest routing margin ", margin);
    CHECK(margin > 5e-3);  // a ±2h = 2e-4 step moves a logit by 2e-4·|x| or 2e-4·|R|, a score by ≤ ¼ of that

    // every loss evaluation (±h, ±2h for each entry) re-routes; count any change of a chosen expert
    long evaluations = 0, flips = 0;
    auto loss = [&] {
        moe_forward(out.data(), L.acts, x.data(), L.p, bias.data(), cfg, N);
        evaluations++;
        for (int n = 0; n < N; n++) flips += L.acts.expert[n] != routed[n];
        return dot(out.data(), probe.data(), out.size());
    };
    loss();
    moe_backward(dx.data(), L.dp, probe.data(), L.acts, x.data(), L.p, cfg, N);
    for (const TensorInfo& t : L.infos)
        check_grad(t.name, L.w.data() + t.offset, L.dw.data() + t.offset, t.numel, loss);
    check_grad("input", x.data(), dx.data(), dx.size(), loss);
    CHECK(evaluations == 1 + 4 * long(L.w.size() + x.size()));
    CHECK(flips == 0);

    // parameter gradients accumulate, the input gradient is overwritten
    loss();
    const std::vector<double> dw1 = L.dw, dx1 = dx;
    moe_backward(dx.data(), L.dp, probe.data(), L.acts, x.data(), L.p, cfg, N);
    for (size_t i = 0; i < L.dw.size(); i++) CHECK(L.dw[i] == doctest::Approx(2 * dw1[i]));
    for (size_t i = 0; i < dx.size(); i++) CHECK(dx[i] == doctest::Approx(dx1[i]));
}

TEST_CASE("moe: every expert with tokens gets a gradient; experts without tokens get exactly zero") {
    Rng rng(8);
    const MoEConfig cfg{6, 4, 4, 1e-3};
    const int N = 11, D = 6, F = 4, E = 4;
    MoELayer L(cfg, N);
    randomize_for_gradcheck(L.infos, L.w.data(), rng);
    auto x = randn(rng, N * D), probe = randn(rng, N * D);
    const std::vector<double> bias = {0.0, 0.0, -5.0, 0.0};  // scores are in (0, 1): expert 2 can never win
    std::vector<double> out(N * D), dx(N * D);
    moe_forward(out.data(), L.acts, x.data(), L.p, bias.data(), cfg, N);
    moe_backward(dx.data(), L.dp, probe.data(), L.acts, x.data(), L.p, cfg, N);
    for (int e = 0; e < E; e++) {
        INFO("expert ", e, " has ", load(L.acts, e), " tokens");
        const double g1 = max_abs(L.dp.w1 + e * F * D, F * D), g3 = max_abs(L.dp.w3 + e * F * D, F * D),
                     g2 = max_abs(L.dp.w2 + e * D * F, D * F), gr = max_abs(L.dp.router + e * D, D);
        if (e == 2) {
            CHECK(load(L.acts, e) == 0);
            CHECK(g1 == 0.0);
            CHECK(g3 == 0.0);
            CHECK(g2 == 0.0);
            CHECK(gr == 0.0);  // the router learns only through the chosen expert's gate
        } else {
            CHECK(load(L.acts, e) > 0);
            CHECK(g1 > 1e-6);
            CHECK(g3 > 1e-6);
            CHECK(g2 > 1e-6);
            CHECK(gr > 1e-6);
        }
    }
    CHECK(max_abs(L.dp.shared.w1, F * D) > 1e-6);
}

TEST_CASE("moe: the bias changes which expert is chosen, never the gate (hand-built)") {
    // D = 2, router rows e0 = (1, 0), e1 = (0, 1): the logits are the input's coordinates
    const MoEConfig cfg{2, 3, 2, 1e-3};
    const int N = 3, D = 2;
    MoELayer L(cfg, N);
    Rng rng(9);
    randomize_for_gradcheck(L.infos, L.w.data(), rng);
    const double R[] = {1, 0, 0, 1};
    for (int i = 0; i < 4; i++) L.p.router[i] = R[i];
    // token 0: scores σ(2) > σ(1);  token 1: σ(1) < σ(2);  token 2: a tie σ(1) = σ(1)
    const std::vector<double> x = {2, 1, 1, 2, 1, 1};
    std::vector<double> out(N * D), ref, gate;
    std::vector<int> expert;
    const double s1 = 1 / (1 + std::exp(-1.0)), s2 = 1 / (1 + std::exp(-2.0));

    moe_forward(out.data(), L.acts, x.data(), L.p, (const double*)nullptr, cfg, N);
    CHECK(L.acts.expert[0] == 0);
    CHECK(L.acts.expert[1] == 1);
    CHECK(L.acts.expert[2] == 0);  // ties go to the lowest index
    CHECK(L.acts.gate[0] == doctest::Approx(s2).epsilon(1e-15));
    CHECK(L.acts.gate[1] == doctest::Approx(s2).epsilon(1e-15));
    CHECK(L.acts.gate[2] == doctest::Approx(s1).epsilon(1e-15));

    // σ(1) + 0.2 = 0.931 > σ(2) = 0.881: token 0 switches to expert 1 and its gate is σ(1), without the bias
    const std::vector<double> bias = {0.0, 0.2};
    moe_forward(out.data(), L.acts, x.data(), L.p, bias.data(), cfg, N);
    CHECK(L.acts.expert[0] == 1);
    CHECK(L.acts.expert[1] == 1);
    CHECK(L.acts.expert[2] == 1);
    CHECK(L.acts.gate[0] == doctest::Approx(s1).epsilon(1e-15));
    CHECK(L.acts.gate[1] == doctest::Approx(s2).epsilon(1e-15));
    CHECK(L.acts.gate[2] == doctest::Approx(s1).epsilon(1e-15));
    CHECK(L.acts.offsets[1] == 0);
    CHECK(L.acts.offsets[2] == 3);
    naive_moe(ref, expert, gate, x.data(), L.p, bias.data(), cfg, N);
    CHECK(max_abs_diff(out.data(), ref.data(), out.size()) < 1e-12);

    // an equal bias on both keeps the tie, and the tie still goes to expert 0
    const std::vector<double> same = {0.2, 0.2};
    moe_forward(out.data(), L.acts, x.data(), L.p, same.data(), cfg, N);
    CHECK(L.acts.expert[2] == 0);
    CHECK(L.acts.gate[2] == doctest::Approx(s1).epsilon(1e-15));
}

TEST_CASE("moe_update_bias: over-loaded experts go down and under-loaded up by exactly rate; balanced stay") {
    const double rate = 1e-3;
    {   // N = 8, E = 4: mean load 2; loads 4, 2, 0, 2
        const int offsets[] = {0, 4, 6, 6, 8};
        const double b0[] = {0.1, -0.2, 0.3, 0.0};
        double b[] = {0.1, -0.2, 0.3, 0.0};
        moe_update_bias(b, offsets, 4, rate);
        CHECK(b[0] == b0[0] - rate);
        CHECK(b[1] == b0[1]);
        CHECK(b[2] == b0[2] + rate);
        CHECK(b[3] == b0[3]);
    }
    {   // N = 10, E = 4: mean load 2.5 is no integer, so every expert moves; loads 3, 2, 5, 0
        const int offsets[] = {0, 3, 5, 10, 10};
        float b[] = {0.f, 0.f, 0.f, 0.f};
        moe_update_bias(b, offsets, 4, 0.25);
        CHECK(b[0] == -0.25f);
        CHECK(b[1] == 0.25f);
        CHECK(b[2] == -0.25f);
        CHECK(b[3] == 0.25f);
    }
    double b[] = {0.0};
    CHECK_THROWS_AS(moe_update_bias(b, (const int*)nullptr, 0, rate), hl::Error);
}

TEST_CASE("moe balancing: with only the bias update, a skewed random router ends with every share within 2x of 1/E") {
    Rng rng(31);
    const MoEConfig cfg{16, 4, 8, 1e-2};
    const int N = 512, D = 16, E = 8, steps = 300;
    MoELayer L(cfg, N);
    moe_init(L.p, cfg, rng, 0.3, 0.1);
    // hidden states share a common direction, so a few experts would take most tokens without balancing
    const auto mean = randn(rng, D);
    std::vector<double> x(N * D), bias(E, 0.0);
    auto draw_batch = [&] {
        for (int n = 0; n < N; n++)
            for (int d = 0; d < D; d++) x[n * D + d] = mean[d] + rng.normal();
    };
    auto shares_within_2x = [&] {
        bool ok = true;
        for (int e = 0; e < E; e++) {
            const double share = double(load(L.acts, e)) / N;
            ok = ok && share > 0.5 / E && share < 2.0 / E;
        }
        return ok;
    };
    // no training, so only the routing is run: moe_forward's first step, which fills acts.offsets
    draw_batch();
    moe_route(L.acts, x.data(), L.p.router, bias.data(), cfg, N);
    CHECK_FALSE(shares_within_2x());  // the start really is imbalanced
    for (int step = 0; step < steps; step++) {
        draw_batch();
        moe_route(L.acts, x.data(), L.p.router, bias.data(), cfg, N);
        moe_update_bias(bias.data(), L.acts.offsets, E, cfg.bias_rate);
    }
    draw_batch();  // a fresh batch with the final bias
    moe_route(L.acts, x.data(), L.p.router, bias.data(), cfg, N);
    std::string report;
    for (int e = 0; e < E; e++) report += " " + std::to_string(load(L.acts, e)) + " (bias " + std::to_string(bias[e]) + ")";
    INFO("loads of ", N, " tokens:", report);
    CHECK(shares_within_2x());
}

TEST_CASE("moe: bad configs are one clear error") {
    CHECK_THROWS_WITH_AS(moe_check(MoEConfig{0, 4, 8, 1e-3}), "moe: d_model must be positive, got 0", hl::Error);
    CHECK_THROWS_WITH_AS(moe_check(MoEConfig{8, -1, 8, 1e-3}),
                         "moe: d_ff (each expert's hidden width) must be positive, got -1", hl::Error);
    CHECK_THROWS_WITH_AS(moe_check(MoEConfig{8, 4, 0, 1e-3}), "moe: n_experts must be positive, got 0", hl::Error);
    CHECK_THROWS_WITH_AS(moe_check(MoEConfig{8, 4, 8, -1.0}), "moe: bias_rate must be >= 0, got -1", hl::Error);
    CHECK_NOTHROW(moe_check(MoEConfig{8, 4, 8, 0.0}));
    Arena<double> a;
    Arena<int> ia;
    CHECK_THROWS_AS(moe_params(a, MoEConfig{8, 0, 8, 1e-3}), hl::Error);
    CHECK_THROWS_WITH_AS(moe_acts(a, ia, MoEConfig{8, 4, 8, 1e-3}, 0), "moe: need N > 0 rows for activations, got 0",
                         hl::Error);
}
