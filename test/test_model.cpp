// test_model.cpp — the whole model (embedding → blocks → norm → LM head → cross-entropy) for each
// architecture family: gradient check of every parameter tensor, causality, and config errors.
#include "test/gradcheck.h"
#include "test/micro.h"     // micro: a tiny whole-model config
#include <numeric>         // std::accumulate
#include "model/model.h"  // Model, ModelConfig, block_config

using namespace hl;
using namespace hl::test;

namespace {

}  // namespace

TEST_CASE("whole model: gradient check of every parameter tensor, for each architecture") {
    struct Case { const char* name; std::string pattern; std::string fusion; bool tied; bool moe = false; };
    const Case cases[] = {
        {"transformer", "AA", "final", true},
        {"mamba2", "MM", "final", true},
        {"inter", "MAM", "final", true},
        {"intra final", "MHM", "final", true},
        {"intra concat, untied head", "HM", "concat", false},
        {"intra value=shared", "MH", "norm=group,scale=vector,op=add,value=shared,out=joint", true},
        {"swa (window 2, sink 1)", "SAS", "final", true},
        {"inter with MoE", "MAM", "final", true, true},
        {"intra with MoE", "HM", "final", true, true},
    };
    for (const Case& k : cases) {
        CAPTURE(k.name);
        ModelConfig c = micro(k.pattern, k.fusion);
        c.window = 2, c.sink = 1;
        c.moe = k.moe, c.n_experts = 3;
        if (k.fusion.find("shared") != std::string::npos) c.intra_d_ssm = 8;  // = heads·d_v, as value=shared needs
        c.tied = k.tied;
        Model<double> m(c);
        m.init(3);
        Rng prng(5);
        randomize_for_gradcheck(m.tensors, m.params.data(), prng);
        const int B = 2, T = 5;
        Rng rng(7);
        std::vector<int> tok(B * T), tgt(B * T);
        random_tokens(rng, tok, c.vocab_size);
        random_tokens(rng, tgt, c.vocab_size);
        auto loss = [&] { return m.forward(tok.data(), tgt.data(), B, T); };
        loss();
        m.zero_grad();
        m.backward();
        // MoE: the routing of the unperturbed forward, which every perturbed one must keep (else the numeric
        // gradient would cross a routing switch and prove nothing)
        std::vector<int> routing;
        for (int l = 0; l < c.n_layers; l++)
            if (m.blocks[l].use_moe) routing.insert(routing.end(), m.bacts[l].moe.expert, m.bacts[l].moe.expert + B * T);
        auto loss_same_routing = [&] {
            double v = loss();
            std::vector<int> now;
            for (int l = 0; l < c.n_layers; l++)
                if (m.blocks[l].use_moe) now.insert(now.end(), m.bacts[l].moe.expert, m.bacts[l].moe.expert + B * T);
            REQUIRE(now == routing);
            return v;
        };
        if (k.moe) {  // the routing uses more than one expert, so the router's gradient is really exercised
            std::vector<int> used(size_t(c.n_experts), 0);
            for (int e : routing) used[size_t(e)] = 1;
            CHECK(std::accumulate(used.begin(), used.end(), 0) >= 2);
        }
        for (const TensorInfo& t : m.tensors)
            check_grad(t.name, m.params.data() + t.offset, m.grads.data() + t.offset, t.numel, loss_same_routing);
    }
}

TEST_CASE("whole model: per-token loss weights give the gradient of the weighted loss (gradient check)") {
    // what the study's recall tasks train on: Σ_i w_i · loss_i, here with some weights 0 (unscored tokens)
    ModelConfig c = micro("MAM", "final");
    Model<double> m(c);
    m.init(3);
    Rng prng(5);
    randomize_for_gradcheck(m.tensors, m.params.data(), prng);
    const int B = 2, T = 5, N = B * T;
    Rng rng(8);
    std::vector<int> tok(N), tgt(N);
    random_tokens(rng, tok, c.vocab_size);
    random_tokens(rng, tgt, c.vocab_size);
    std::vector<double> w(N);
    for (int i = 0; i < N; i++) w[i] = i % 3 == 0 ? 0.0 : rng.uniform();
    auto weighted = [&] {
        m.forward(tok.data(), tgt.data(), B, T);
        double sum = 0;
        for (int i = 0; i < N; i++) sum += w[i] * m.losses[i];
        return sum;
    };
    weighted();
    m.zero_grad();
    m.backward(w.data());
    for (const TensorInfo& t : m.tensors)
        check_grad(t.name, m.params.data() + t.offset, m.grads.data() + t.offset, t.numel, weighted);
    // weights of 1/N everywhere are the plain mean, bitwise
    const std::vector<double> g_w = m.grads;
    std::vector<double> mean_w(N, 1.0 / N);
    m.forward(tok.data(), tgt.data(), B, T);
    m.zero_grad();
    m.backward(mean_w.data());
    const std::vector<double> g_mean_w = m.grads;
    m.zero_grad();
    m.backward();
    CHECK(m.grads == g_mean_w);
    CHECK(m.grads != g_w);
}

TEST_CASE("whole model is causal: changing token t+1 leaves the logits up to t unchanged") {
    for (std::string pattern : {"AA", "MM", "MAM", "MHM"}) {
        CAPTURE(pattern);
        ModelConfig c = micro(pattern);
        Model<double> m(c);
        m.init(1);
        const int T = 9, V = c.vocab_size, t = 4;
        std::vector<int> tok(T);
        Rng rng(2);
        random_tokens(rng, tok, V);
        m.forward(tok.data(), nullptr, 1, T);
        std::vector<double> before(m.logits, m.logits + T * V);
        tok[t + 1] = (tok[t + 1] + 5) % V;
        m.forward(tok.data(), nullptr, 1, T);
        CHECK(max_abs_diff(before.data(), m.logits, size_t(t + 1) * V) == 0.0);
        CHECK(max_abs_diff(before.data() + (t + 1) * V, m.logits + (t + 1) * V, V) > 0.0);
    }
}

TEST_CASE("model: bad sizes are clear errors") {
    Model<float> m(micro("MA"));
    std::vector<int> tok(100, 1);
    CHECK_THROWS_WITH_AS(m.forward(tok.data(), nullptr, 1, 65), "seq-len 65 is above the model's limit max_seq_len = 64",
                         hl::Error);
    CHECK_THROWS_AS(m.forward(tok.data(), nullptr, 0, 4), hl::Error);
    tok[3] = 16;  // out of the vocabulary
    CHECK_THROWS_AS(m.forward(tok.data(), nullptr, 1, 8), hl::Error);
    ModelConfig bad = micro("MXA");
    CHECK_THROWS_AS(Model<float>{bad}, hl::Error);
}

TEST_CASE("parameter counts: the allocated tensors equal DESIGN.md's formulas, for every preset and family") {
    // The formulas count the matmul weights, the conv weights on the x channels and A_log, D (the paper's
    // terms); norms, biases, dt_bias, the conv on B/C and the fusion scales are ours and counted apart.
    auto formula_part = [](const ModelConfig& c, const std::vector<TensorInfo>& tensors) {
        double n = 0;
        for (const TensorInfo& t : tensors) {
            const std::string leaf = t.name.substr(t.name.rfind('.') + 1);
            if (t.name == "embed" || t.name == "lm_head") continue;
            if (leaf == "conv_w") n += double(t.shape[0] - 2 * c.ngroups * c.d_state) * t.shape[1];  // x rows
            else if (leaf == "A_log" || leaf == "D" || t.shape.size() >= 2) n += double(t.numel);
        }
        return n;
    };
    struct Case { const char* preset; const char* arch; const char* fusion; };
    std::vector<Case> cases;
    for (const char* p : {"tiny", "small", "100m", "350m", "1b", "3b"})
        for (const char* a : {"transformer", "mamba2", "inter", "intra", "swa", "inter+moe"}) cases.push_back({p, a, "final"});
    for (const char* f : {"concat", "hymba", "falcon", "norm=none,scale=scalar,op=add,value=shared,out=sep"})
        cases.push_back({"350m", "intra", f});
    for (const Case& k : cases) {
        CAPTURE(k.preset);
        CAPTURE(k.arch);
        CAPTURE(k.fusion);
        const std::string arch = k.arch;
        ModelConfig c = preset(k.preset, arch.substr(0, arch.find('+')));
        c.moe = arch.find("moe") != std::string::npos;  // counts all experts and the router
        c.fusion = parse_fusion(k.fusion);
        std::vector<TensorInfo> tensors;
        Arena<float> count(nullptr, &tensors);  // counts only: no allocation, so 3b is cheap
        model_params(count, c);
        CHECK(formula_part(c, tensors) == formula_nonembedding_params(c));
        // each tensor 8-aligned (bf16 weights 16-byte aligned for cuBLAS), after the one before it, gaps < 8; and
        // after in_proj, room for its rows rounded up to a multiple of 8 (Mamba2Config::in_proj_rows)
        size_t end = 0;
        for (const TensorInfo& t : tensors) {
            CHECK(t.offset % kParamAlign == 0);
            CHECK((t.offset >= end && t.offset - end < kParamAlign));
            end = t.offset + t.numel;
            if (t.name.size() >= 7 && t.name.compare(t.name.size() - 7, 7, "in_proj") == 0)
                end += size_t((8 - t.shape[0] % 8) % 8) * t.shape[1];
        }
        CHECK(count.size == end);
        CHECK(double(count_params(tensors)) == formula_part(c, tensors) + formula_embedding_params(c) +
                                        [&] {  // the rest: every tensor the formulas leave out
                                            double rest = 0;
                                            for (const TensorInfo& t : tensors) {
                                                const std::string leaf = t.name.substr(t.name.rfind('.') + 1);
                                                if (t.name == "embed" || t.name == "lm_head") continue;
                                                if (leaf == "conv_w")
                                                    rest += double(2 * c.ngroups * c.d_state) * t.shape[1];
                                                else if (!(leaf == "A_log" || leaf == "D" || t.shape.size() >= 2))
                                                    rest += double(t.numel);
                                            }
                                            return rest;
                                        }());
    }
    // the paper's Table 8 non-embedding counts, from the allocated tensors themselves
    for (auto [p, expect] : {std::pair{"100m", 96}, {"350m", 352}, {"1b", 973}, {"3b", 2775}}) {  // millions
        ModelConfig c = preset(p, "transformer");
        std::vector<TensorInfo> tensors;
        Arena<float> count(nullptr, &tensors);
        model_params(count, c);
        CHECK(std::lround(formula_part(c, tensors) / 1e6) == expect);  // Table 8 prints 0.096B, 0.352B, ...
    }
}
