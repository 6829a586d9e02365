// test_mamba2.cpp — the causal conv1d (model/conv1d.h) and the Mamba-2 branch and mixer
// (model/mamba2.h): finite differences for every parameter and input, a hand-computed conv,
// causality, independence of the chunk size, the init ranges and config errors.
#include <algorithm>         // std::max, std::min
#include <cmath>             // std::exp, std::sqrt
#include <string>            // std::string
#include <vector>            // std::vector
#include "test/gradcheck.h"  // check_grad, randn/randu, dot, max_abs_diff
#include "model/conv1d.h"    // conv1d_silu_forward/backward
#include "model/mamba2.h"    // Mamba2Config/Params/Acts, mamba2_*

using namespace hl;
using namespace hl::test;

TEST_CASE("conv1d: a hand-computed case") {
    // B = 1, T = 4, C = 2, K = 3; inp is (T, C). Tap k = K−1 multiplies the current step.
    const std::vector<double> inp = {1, -1, 2, 0.5, 3, 0, 4, 2};
    const std::vector<double> w = {0.5, -1, 2,   // channel 0
                                   1, 0, -0.5};  // channel 1
    const std::vector<double> bias = {0.1, 0.0};
    // channel 0: 0.1 + 2·1;  0.1 − 1·1 + 2·2;  0.1 + 0.5·1 − 1·2 + 2·3;  0.1 + 0.5·2 − 1·3 + 2·4
    // channel 1: −0.5·(−1);  0·(−1) − 0.5·0.5;  1·(−1) + 0·0.5 − 0.5·0;  1·0.5 + 0·0 − 0.5·2
    const std::vector<double> pre_ref = {2.1, 0.5, 3.1, -0.25, 4.6, -1.0, 6.1, -0.5};
    std::vector<double> out(8), pre(8);
    conv1d_silu_forward(out.data(), pre.data(), inp.data(), w.data(), bias.data(), 1, 4, 2, 3);
    for (int i = 0; i < 8; i++) {
        CHECK(pre[i] == doctest::Approx(pre_ref[i]).epsilon(1e-14));
        CHECK(out[i] == doctest::Approx(pre_ref[i] / (1 + std::exp(-pre_ref[i]))).epsilon(1e-14));
    }
}

TEST_CASE("conv1d: gradient check of input, weight and bias") {
    Rng rng(21);
    for (int K : {1, 4, 9}) {  // K = 9 > T: every output reads the zero padding
        CAPTURE(K);
        const int B = 2, T = 7, C = 5;
        auto inp = randn(rng, B * T * C), w = randn(rng, C * K, 0.5), bias = randn(rng, C), probe = randn(rng, B * T * C);
        std::vector<double> out(B * T * C), pre(B * T * C), dinp(B * T * C, 123.0), dw(C * K, 0.0), db(C, 0.0);
        auto loss = [&] {
            conv1d_silu_forward(out.data(), pre.data(), inp.data(), w.data(), bias.data(), B, T, C, K);
            return dot(out.data(), probe.data(), out.size());
        };
        loss();
        conv1d_silu_backward(dinp.data(), dw.data(), db.data(), probe.data(), pre.data(), inp.data(), w.data(), B, T,
                             C, K);
        check_grad("inp", inp.data(), dinp.data(), dinp.size(), loss);
        check_grad("w", w.data(), dw.data(), dw.size(), loss);
        check_grad("bias", bias.data(), db.data(), db.size(), loss);
    }
    std::vector<double> v(8);
    CHECK_THROWS_WITH_AS(conv1d_silu_forward(v.data(), v.data(), v.data(), v.data(), v.data(), 1, 4, 2, 0),
                         doctest::Contains("conv1d: bad sizes"), hl::Error);
}

namespace {

// A Mamba-2 mixer (or branch) with its parameters, gradients and activations in double, the
// parameters drawn wider than the init so that every nonlinearity is exercised.
struct Mamba2Fixture {
    Mamba2Config c;
    int B, T;
    bool mixer;
    std::vector<TensorInfo> infos;  // names and offsets of the parameters, to check each one
    std::vector<double> pbuf, gbuf, abuf;
    Mamba2Params<double> p, dp;
    Mamba2Acts<double> acts;

    Mamba2Fixture(const Mamba2Config& cfg, int B_, int T_, bool mixer_, uint64_t seed)
        : c(cfg), B(B_), T(T_), mixer(mixer_) {
        Arena<double> count;
        mamba2_params(count, c, mixer);
        pbuf.resize(count.size);
        gbuf.assign(count.size, 0.0);
        Arena<double> pa(pbuf.data(), &infos), ga(gbuf.data());
        p = mamba2_params(pa, c, mixer);
        dp = mamba2_params(ga, c, mixer);
        Arena<double> acount;
        mamba2_acts(acount, c, B, T);
        abuf.assign(acount.size, 0.0);
        Arena<double> aa(abuf.data());
        acts = mamba2_acts(aa, c, B, T);
        Rng rng(seed);
        for (const TensorInfo& t : infos) {
            double* v = pbuf.data() + t.offset;
            if (t.name == "A_log") rng.fill_uniform(v, t.numel, -1.0, 0.7);        // A in [−2, −0.37]
            else if (t.name == "dt_bias") rng.fill_uniform(v, t.numel, -1.5, 0.5);  // dt ≈ 0.2 … 1
            else if (t.name == "norm_w") {
                rng.fill_normal(v, t.numel, 0.2);
                for (size_t i = 0; i < t.numel; i++) v[i] += 1.0;
            } else rng.fill_normal(v, t.numel, 0.5);
        }
    }
    size_t n_out() const { return (size_t)B * T * (mixer ? c.d_model : c.d_inner); }
    // the branch's g, or the mixer's output
    void forward(std::vector<double>& out, const std::vector<double>& inp, const double* x_shared) {
        if (mixer) {
            out.resize(n_out());
            mamba2_mixer_forward(out.data(), acts, inp.data(), p, c, B, T);
        } else {
            mamba2_branch_forward(acts, inp.data(), x_shared, p, c, B, T);
            out.assign(acts.g, acts.g + n_out());
        }
    }
};

Mamba2Config small_config(int ngroups, bool shared_x) {
    Mamba2Config c;
    c.d_model = 6;
    c.d_inner = 10;
    c.headdim = 5;  // 2 heads
    c.d_state = 3;
    c.ngroups = ngroups;
    c.chunk = 3;  // does not divide T = 7
    c.shared_x = shared_x;
    return c;
}

// Gradient check of every parameter (by name, from the arena's records), the input and x_shared.
void gradient_check(Mamba2Fixture& f, uint64_t seed) {
    const int B = f.B, T = f.T;
    Rng rng(seed);
    auto inp = randn(rng, (size_t)B * T * f.c.d_model);
    auto x_shared = randn(rng, (size_t)B * T * f.c.d_inner);
    auto probe = randn(rng, f.n_out());
    const double* xs = f.c.shared_x ? x_shared.data() : nullptr;
    std::vector<double> out;
    auto loss = [&] {
        f.forward(out, inp, xs);
        return dot(out.data(), probe.data(), out.size());
    };
    loss();
    std::vector<double> dinp(inp.size(), 123.0), dxs(x_shared.size(), 123.0);
    if (f.mixer)
        mamba2_mixer_backward(dinp.data(), f.dp, probe.data(), f.acts, inp.data(), f.p, f.c, B, T);
    else
        mamba2_branch_backward(dinp.data(), f.c.shared_x ? dxs.data() : nullptr, f.dp, probe.data(), f.acts,
                               inp.data(), xs, f.p, f.c, B, T);
    check_grad("inp", inp.data(), dinp.data(), dinp.size(), loss);
    if (f.c.shared_x) check_grad("x_shared", x_shared.data(), dxs.data(), dxs.size(), loss);
    for (const TensorInfo& t : f.infos)
        check_grad(t.name, f.pbuf.data() + t.offset, f.gbuf.data() + t.offset, t.numel, loss);
    CHECK(f.infos.size() == (f.mixer ? 8u : 6u));  // every parameter was checked
}

}  // namespace

TEST_CASE("mamba2 branch: gradient check of every parameter, the input and x_shared") {
    for (int G : {1, 2}) {
        for (bool shared : {false, true}) {
            CAPTURE(G);
            CAPTURE(shared);
            Mamba2Fixture f(small_config(G, shared), 2, 7, /*mixer=*/false, 31 + G);
            gradient_check(f, 41 + G);
        }
    }
}

TEST_CASE("mamba2 mixer: gradient check of every parameter and the input") {
    for (int G : {1, 2}) {
        CAPTURE(G);
        Mamba2Fixture f(small_config(G, false), 2, 7, /*mixer=*/true, 51 + G);
        gradient_check(f, 61 + G);
    }
}

TEST_CASE("mamba2 mixer: causal, and independent of the chunk size") {
    for (int G : {1, 2}) {
        CAPTURE(G);
        Mamba2Fixture f(small_config(G, false), 2, 7, /*mixer=*/true, 71);
        const int B = f.B, T = f.T, D = f.c.d_model;
        Rng rng(72);
        auto inp = randn(rng, (size_t)B * T * D);
        std::vector<double> out0, out1;
        f.forward(out0, inp, nullptr);
        for (int t = 0; t + 1 < T; t++) {
            CAPTURE(t);
            auto inp2 = inp;
            for (int b = 0; b < B; b++)
                for (int i = 0; i < D; i++) inp2[((size_t)b * T + t + 1) * D + i] += 1.0;
            f.forward(out1, inp2, nullptr);
            double before = 0, at = 0;  // max change at steps ≤ t, and at step t + 1
            for (int b = 0; b < B; b++)
                for (int s = 0; s <= t + 1; s++)
                    for (int i = 0; i < D; i++) {
                        size_t k = ((size_t)b * T + s) * D + i;
                        double d = std::fabs(out1[k] - out0[k]);
                        if (s <= t) before = std::max(before, d);
                        else at = std::max(at, d);
                    }
            CHECK(before == 0.0);
            CHECK(at > 1e-6);  // the change does arrive: the check above is not vacuous
        }
        // the chunk is an implementation detail: 1 (a pure recurrence), 3, and one chunk for all of T
        for (int Q : {1, 64}) {
            CAPTURE(Q);
            Mamba2Config c2 = f.c;
            c2.chunk = Q;
            Mamba2Fixture f2(c2, B, T, /*mixer=*/true, 71);  // the same seed draws the same parameters
            f2.forward(out1, inp, nullptr);
            CHECK(max_abs_diff(out1.data(), out0.data(), out0.size()) < 1e-12);
        }
    }
}

TEST_CASE("mamba2 mixer: float (training) agrees with double, forward and backward") {
    Mamba2Fixture f(small_config(2, false), 2, 7, /*mixer=*/true, 75);
    const int B = f.B, T = f.T, D = f.c.d_model;
    Rng rng(76);
    auto inp = randn(rng, (size_t)B * T * D), probe = randn(rng, f.n_out());
    std::vector<double> out;
    f.forward(out, inp, nullptr);
    std::vector<double> dinp(inp.size());
    mamba2_mixer_backward(dinp.data(), f.dp, probe.data(), f.acts, inp.data(), f.p, f.c, B, T);

    // the same parameters in float, laid out by the same functions
    Arena<float> count;
    mamba2_params(count, f.c);
    std::vector<float> pbuf(f.pbuf.begin(), f.pbuf.end()), gbuf(count.size, 0.f);
    Arena<float> pa(pbuf.data()), ga(gbuf.data());
    Mamba2Params<float> p = mamba2_params(pa, f.c), dp = mamba2_params(ga, f.c);
    Arena<float> acount;
    mamba2_acts(acount, f.c, B, T);
    std::vector<float> abuf(acount.size);
    Arena<float> aa(abuf.data());
    Mamba2Acts<float> acts = mamba2_acts(aa, f.c, B, T);
    std::vector<float> inp_f(inp.begin(), inp.end()), probe_f(probe.begin(), probe.end()), out_f(out.size()),
        dinp_f(inp.size());
    mamba2_mixer_forward(out_f.data(), acts, inp_f.data(), p, f.c, B, T);
    mamba2_mixer_backward(dinp_f.data(), dp, probe_f.data(), acts, inp_f.data(), p, f.c, B, T);
    auto rel = [](const auto& a, const std::vector<double>& b) {
        double m = 1e-30, e = 0;
        for (size_t i = 0; i < b.size(); i++) {
            m = std::max(m, std::fabs(b[i]));
            e = std::max(e, std::fabs((double)a[i] - b[i]));
        }
        return e / m;
    };
    CHECK(rel(out_f, out) < 1e-5);
    CHECK(rel(dinp_f, dinp) < 1e-5);
    CHECK(rel(gbuf, f.gbuf) < 1e-4);
}

TEST_CASE("mamba2 init: A in [−2, −0.01], softplus(dt_bias) in [1e-3, 1e-1], D = norm_w = 1") {
    Mamba2Config c;
    c.d_model = 16;
    c.d_inner = 256;
    c.headdim = 2;  // 128 heads: enough draws to see both ends of the ranges
    c.d_state = 4;
    Arena<float> count;
    mamba2_params(count, c);
    std::vector<float> buf(count.size, -999.f);
    Arena<float> a(buf.data());
    Mamba2Params<float> p = mamba2_params(a, c);
    Rng rng(81);
    const int n_layers = 8;
    mamba2_init(p, c, rng, n_layers);
    const int H = c.nheads();
    double dt_min = 1, dt_max = 0, A_min = 0, A_max = -10;
    for (int h = 0; h < H; h++) {
        double A = -std::exp((double)p.A_log[h]);
        double dt = softplus((double)p.dt_bias[h]);
        dt_min = std::min(dt_min, dt);
        dt_max = std::max(dt_max, dt);
        A_min = std::min(A_min, A);
        A_max = std::max(A_max, A);
        CHECK(p.D[h] == 1.0f);
    }
    CHECK(A_min >= -2.0 * (1 + 1e-6));
    CHECK(A_max <= -0.01 * (1 - 1e-6));
    CHECK(dt_min >= 1e-3 * (1 - 1e-5));
    CHECK(dt_max <= 1e-1 * (1 + 1e-5));
    CHECK(dt_min < 3e-3);  // log-uniform: both decades are reached
    CHECK(dt_max > 3e-2);
    CHECK(A_min < -1.5);
    CHECK(A_max > -0.5);
    for (int i = 0; i < c.d_inner; i++) CHECK(p.norm_w[i] == 1.0f);
    auto rms = [](const float* v, size_t n) {
        double s = 0;
        for (size_t i = 0; i < n; i++) s += (double)v[i] * v[i];
        return std::sqrt(s / n);
    };
    CHECK(rms(p.in_proj, (size_t)c.d_in_proj() * c.d_model) == doctest::Approx(0.02).epsilon(0.05));
    CHECK(rms(p.out_proj, (size_t)c.d_model * c.d_inner) == doctest::Approx(0.02 / std::sqrt(2.0 * n_layers)).epsilon(0.05));
    float conv_max = 0;
    for (size_t i = 0; i < (size_t)c.conv_dim() * c.d_conv; i++) conv_max = std::max(conv_max, std::fabs(p.conv_w[i]));
    CHECK(conv_max <= 0.5f);  // U(±1/√K), K = 4
    CHECK(conv_max > 0.4f);
}

TEST_CASE("mamba2: a bad config is a clear error") {
    auto check = [](Mamba2Config c) { mamba2_config_check(c); };
    Mamba2Config ok = small_config(2, false);
    CHECK_NOTHROW(check(ok));
    Mamba2Config c = ok;
    c.headdim = 4;  // 10 % 4 != 0
    CHECK_THROWS_WITH_AS(check(c), doctest::Contains("d_inner=10 is not a multiple of headdim=4"), hl::Error);
    c = ok;
    c.ngroups = 3;  // 2 heads
    CHECK_THROWS_WITH_AS(check(c), doctest::Contains("nheads=2 is not a multiple of ngroups=3"), hl::Error);
    c = ok;
    c.d_state = 0;
    CHECK_THROWS_WITH_AS(check(c), doctest::Contains("sizes must be positive"), hl::Error);
    c = ok;
    c.chunk = 0;
    CHECK_THROWS_WITH_AS(check(c), doctest::Contains("chunk=0"), hl::Error);
    c = ok;
    c.chunk = SSD_MAX_CHUNK + 1;
    CHECK_THROWS_AS(check(c), hl::Error);
    Mamba2Config unset;  // sizes left at 0
    CHECK_THROWS_AS(check(unset), hl::Error);

    // x_shared must come exactly when shared_x is set; the mixer never takes shared_x
    Mamba2Fixture f(ok, 1, 3, /*mixer=*/true, 91);
    std::vector<double> inp(3 * ok.d_model, 0.1), xs(3 * ok.d_inner, 0.1), out(3 * ok.d_model);
    CHECK_THROWS_WITH_AS(mamba2_branch_forward(f.acts, inp.data(), xs.data(), f.p, ok, 1, 3),
                         doctest::Contains("x_shared"), hl::Error);
    Mamba2Config shared = ok;
    shared.shared_x = true;
    CHECK_THROWS_WITH_AS(mamba2_mixer_forward(out.data(), f.acts, inp.data(), f.p, shared, 1, 3),
                         doctest::Contains("shared_x"), hl::Error);
}
