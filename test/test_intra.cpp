// test_intra.cpp — the intra-layer hybrid mixer: a gradient check of every parameter and the input for
// every valid combination of the five fusion axes, structural identities between the axes, causality,
// and clear errors for the combinations DESIGN.md §P refuses.
#include "test/gradcheck.h"
#include "model/intra.h"  // IntraConfig, intra_params/acts/init, intra_mixer_forward/backward

using namespace hl;
using namespace hl::test;

namespace {

// Tiny and odd: T = 5 with chunk 2 (the last chunk is short), 2 query heads over 1 kv head.
IntraConfig tiny_config(const FusionConfig& f, int d_ssm = 6) {
    IntraConfig c;
    c.d_model = 6;
    c.attn = AttnConfig{6, 2, 1, 4, 3};  // d_model, heads, kv heads, d_qk, d_v → attention width 2·3 = 6
    c.ssm.d_model = 6;
    c.ssm.d_inner = d_ssm;
    c.ssm.headdim = 3;
    c.ssm.d_state = 2;
    c.ssm.ngroups = 1;
    c.ssm.d_conv = 4;
    c.ssm.chunk = 2;
    c.ssm.shared_x = f.value == FusionValue::shared;
    c.fusion = f;
    return c;
}

// Owns one mixer's parameters, gradients and activations (all in single allocations).
struct Mixer {
    IntraConfig c;
    int B, T;
    std::vector<TensorInfo> infos;
    std::vector<double> params, grads, acts_buf;
    IntraParams<double> p, dp;
    IntraActs<double> acts;
    Mixer(const IntraConfig& cfg, int B_, int T_, uint64_t seed) : c(cfg), B(B_), T(T_) {
        intra_config_check(c);
        Arena<double> count(nullptr, &infos);
        intra_params(count, c);
        params.assign(count.size, 0.0);
        grads.assign(count.size, 0.0);
        Arena<double> pa(params.data()), ga(grads.data());
        p = intra_params(pa, c);
        dp = intra_params(ga, c);
        Rng rng(seed);
        randomize_for_gradcheck(infos, params.data(), rng);
        Arena<double> ac;
        intra_acts(ac, c, B, T);
        acts_buf.assign(ac.size, 0.0);
        Arena<double> aa(acts_buf.data());
        acts = intra_acts(aa, c, B, T);
    }
    void forward(double* out, const double* inp) { intra_mixer_forward(out, acts, inp, p, c, B, T); }
};

std::vector<FusionConfig> all_valid_fusions() {
    std::vector<FusionConfig> v;
    for (auto norm : {FusionNorm::group, FusionNorm::none})
        for (auto scale : {FusionScale::none, FusionScale::vector, FusionScale::scalar})
            for (auto op : {FusionOp::add, FusionOp::diff, FusionOp::concat})
                for (auto value : {FusionValue::sep, FusionValue::shared})
                    for (auto out : {FusionOut::sep, FusionOut::joint}) {
                        FusionConfig f{norm, scale, op, value, out};
                        if (op == FusionOp::concat && out == FusionOut::sep) continue;  // refused, tested below
                        v.push_back(f);
                    }
    return v;
}

}  // namespace

TEST_CASE("intra mixer: gradient check of every parameter and the input, for every fusion combination") {
    auto fusions = all_valid_fusions();
    CHECK(fusions.size() == 60);  // 2·3·3·2·2 = 72, less the 12 with op=concat, out=sep
    for (const FusionConfig& f : fusions) {
        CAPTURE(to_string(f));
        const int B = 2, T = 5;
        Mixer m(tiny_config(f), B, T, 7);
        const int N = B * T, D = m.c.d_model;
        Rng rng(11);
        auto x = randn(rng, N * D), probe = randn(rng, N * D);
        std::vector<double> out(N * D), dx(N * D);
        auto loss = [&] {
            m.forward(out.data(), x.data());
            return dot(out.data(), probe.data(), out.size());
        };
        loss();
        intra_mixer_backward(dx.data(), m.dp, probe.data(), m.acts, x.data(), m.p, m.c, B, T);
        for (const TensorInfo& t : m.infos)
            check_grad(t.name, m.params.data() + t.offset, m.grads.data() + t.offset, t.numel, loss);
        check_grad("input", x.data(), dx.data(), dx.size(), loss);
    }
}

TEST_CASE("intra mixer: the fusion axes are what they say") {
    const int B = 1, T = 5, N = B * T, D = 6;
    Rng rng(3);
    auto x = randn(rng, N * D);
    std::vector<double> out1(N * D), out2(N * D);

    SUBCASE("diff = add with the attention projection negated") {
        FusionConfig fa{FusionNorm::group, FusionScale::none, FusionOp::add, FusionValue::sep, FusionOut::sep};
        FusionConfig fd = fa;
        fd.op = FusionOp::diff;
        Mixer ma(tiny_config(fa), B, T, 5), md(tiny_config(fd), B, T, 5);
        CHECK(ma.params == md.params);  // same layout, same seed
        for (auto& t : md.infos)
            if (t.name == "out_a")
                for (size_t i = 0; i < t.numel; i++) md.params[t.offset + i] *= -1;
        ma.forward(out1.data(), x.data());
        md.forward(out2.data(), x.data());
        CHECK(max_abs_diff(out1.data(), out2.data(), out1.size()) < 1e-12);
    }
    SUBCASE("concat + joint projection [W_s W_a] = separate projections W_s, W_a") {
        FusionConfig fs{FusionNorm::group, FusionScale::none, FusionOp::add, FusionValue::sep, FusionOut::sep};
        FusionConfig fc{FusionNorm::group, FusionScale::none, FusionOp::concat, FusionValue::sep, FusionOut::joint};
        Mixer ms(tiny_config(fs), B, T, 5), mc(tiny_config(fc), B, T, 5);
        // copy the shared parameters by name, and build out_proj = [out_s | out_a] row by row
        auto find = [](Mixer& m, const std::string& n) -> TensorInfo& {
            for (auto& t : m.infos)
                if (t.name == n) return t;
            FAIL("no tensor ", n);
            return m.infos[0];
        };
        for (auto& t : mc.infos)
            if (t.name != "out_proj") {
                TensorInfo& u = find(ms, t.name);
                for (size_t i = 0; i < t.numel; i++) mc.params[t.offset + i] = ms.params[u.offset + i];
            }
        const int Ws = ms.c.ssm_width(), Wa = ms.c.attn_width();
        TensorInfo &op = find(mc, "out_proj"), &os = find(ms, "out_s"), &oa = find(ms, "out_a");
        for (int d = 0; d < D; d++) {
            for (int i = 0; i < Ws; i++) mc.params[op.offset + d * (Ws + Wa) + i] = ms.params[os.offset + d * Ws + i];
            for (int i = 0; i < Wa; i++) mc.params[op.offset + d * (Ws + Wa) + Ws + i] = ms.params[oa.offset + d * Wa + i];
        }
        ms.forward(out1.data(), x.data());
        mc.forward(out2.data(), x.data());
        CHECK(max_abs_diff(out1.data(), out2.data(), out1.size()) < 1e-12);
    }
    SUBCASE("norm=group makes the output invariant to scaling a branch's value weights") {
        // each head's output is normalised, so scaling Wv (hence every attention head's output) changes nothing
        FusionConfig f{FusionNorm::group, FusionScale::none, FusionOp::diff, FusionValue::sep, FusionOut::sep};
        Mixer m(tiny_config(f), B, T, 5);
        m.forward(out1.data(), x.data());
        for (auto& t : m.infos)
            if (t.name == "attn.wv")
                for (size_t i = 0; i < t.numel; i++) m.params[t.offset + i] *= 37.0;
        m.forward(out2.data(), x.data());
        // equal up to the norm's eps (1e-5 against a mean square of ~0.1)
        double scale = 0;
        for (double o : out1) scale = std::max(scale, std::fabs(o));
        CHECK(max_abs_diff(out1.data(), out2.data(), out1.size()) < 1e-3 * scale);
        FusionConfig fn = f;
        fn.norm = FusionNorm::none;  // without the norm the same change does show
        Mixer m2(tiny_config(fn), B, T, 5);
        m2.forward(out1.data(), x.data());
        for (auto& t : m2.infos)
            if (t.name == "attn.wv")
                for (size_t i = 0; i < t.numel; i++) m2.params[t.offset + i] *= 37.0;
        m2.forward(out2.data(), x.data());
        double scale2 = 0;
        for (double o : out1) scale2 = std::max(scale2, std::fabs(o));
        CHECK(max_abs_diff(out1.data(), out2.data(), out1.size()) > 0.1 * scale2);
    }
}

TEST_CASE("intra mixer is causal for every fusion") {
    for (const FusionConfig& f : all_valid_fusions()) {
        CAPTURE(to_string(f));
        const int B = 1, T = 7, N = B * T, D = 6;
        Mixer m(tiny_config(f), B, T, 9);
        Rng rng(4);
        auto x = randn(rng, N * D);
        std::vector<double> out1(N * D), out2(N * D);
        m.forward(out1.data(), x.data());
        const int t = 3;
        for (int d = 0; d < D; d++) x[(t + 1) * D + d] += 1.0;  // change token t+1
        m.forward(out2.data(), x.data());
        CHECK(max_abs_diff(out1.data(), out2.data(), (t + 1) * D) == 0.0);        // ≤ t unchanged, bit for bit
        CHECK(max_abs_diff(out1.data() + (t + 1) * D, out2.data() + (t + 1) * D, D) > 1e-6);  // t+1 did change
    }
}

TEST_CASE("intra mixer refuses the combinations DESIGN.md refuses") {
    FusionConfig f;
    f.op = FusionOp::concat;
    f.out = FusionOut::sep;
    CHECK_THROWS_WITH_AS(intra_config_check(tiny_config(f)),
                         "fusion: op=concat needs out=joint (concatenate, then one projection)", hl::Error);
    FusionConfig g;
    g.value = FusionValue::shared;
    CHECK_THROWS_WITH_AS(intra_config_check(tiny_config(g, 9)),
                         "fusion value=shared needs d_ssm (9) = the attention's value width heads·d_v (6)", hl::Error);
    FusionConfig h;
    h.op = FusionOp::add;
    h.out = FusionOut::joint;
    CHECK_THROWS_WITH_AS(intra_config_check(tiny_config(h, 9)),
                         "fusion op=add with out=joint adds the branches, so d_ssm (9) must equal the attention "
                         "width heads·d_v (6)", hl::Error);
    IntraConfig c = tiny_config(FusionConfig{});
    c.ssm.shared_x = true;
    CHECK_THROWS_AS(intra_config_check(c), hl::Error);
    CHECK_THROWS_WITH_AS(parse_fusion("op=mul"), "--fusion: unknown value 'mul' for axis 'op'", hl::Error);
    CHECK_THROWS_WITH_AS(parse_fusion("fancy"),
                         "unknown --fusion 'fancy': use final|concat|hymba|falcon or axes like "
                         "norm=group,scale=none,op=diff,value=sep,out=sep", hl::Error);
    CHECK(to_string(parse_fusion("final")) == "norm=group,scale=none,op=diff,value=sep,out=sep");
    CHECK(to_string(parse_fusion("concat")) == "norm=group,scale=none,op=concat,value=sep,out=joint");
    CHECK(to_string(parse_fusion("hymba")) == "norm=group,scale=vector,op=add,value=sep,out=joint");
    CHECK(to_string(parse_fusion("falcon")) == "norm=none,scale=none,op=concat,value=sep,out=joint");
    CHECK(to_string(parse_fusion("norm=none,op=add")) == "norm=none,scale=none,op=add,value=sep,out=sep");
    CHECK_THROWS_AS(parse_fusion("op=concat,out=sep"), hl::Error);
}
