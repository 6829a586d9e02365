// test_generate.cpp — cached step-by-step inference: every step's logits equal the full forward's row for
// each architecture and fusion variant, prefill and reset, capacity errors, cache sizes, the sampler, and
// cached generation against generation that re-runs the full forward for every token.
#include <algorithm>       // std::sort, std::max
#include <cmath>           // std::exp, std::fabs
#include <string>          // std::string
#include <vector>          // std::vector
#include "test/gradcheck.h"  // randomize_for_gradcheck, max_abs_diff, doctest
#include "test/micro.h"     // micro, step_vs_full: a tiny whole-model config, decoding against the full forward
#include "model/generate.h"    // InferenceState, model_step, model_prefill, sample_token, generate_cached
#include "model/model.h"       // Model, ModelConfig

using namespace hl;
using namespace hl::test;

namespace {

// Tests use micro(..., chunk 4): T = 9 spans three SSD chunks, the last one short.

// The model with wide random parameters (as the gradient checks use), so every path carries signal.
void randomize(Model<double>& m, uint64_t seed) {
    m.init(seed);
    Rng rng(seed + 100);
    randomize_for_gradcheck(m.tensors, m.params.data(), rng);
}


}  // namespace

TEST_CASE("step-by-step logits equal the full forward, for every architecture and fusion, at any SSD chunk") {
    struct Case { const char* name; std::string pattern; std::string fusion; bool tied; bool moe = false; };
    const Case cases[] = {
        {"transformer", "AA", "final", true},
        {"swa (window 3, sink 1: bounded caches)", "SAS", "final", true},
        {"inter with MoE (nonzero balancing biases)", "MAM", "final", true, true},
        {"intra with MoE", "MHM", "final", false, true},
        {"mamba2", "MM", "final", true},
        {"inter", "MAM", "final", true},
        {"inter, untied head", "MAM", "final", false},
        {"intra final", "MHM", "final", true},
        {"intra final, untied head", "MHM", "final", false},
        {"intra concat (out=joint)", "HM", "concat", false},
        {"intra value=shared, joint add, vector scales", "MH", "norm=group,scale=vector,op=add,value=shared,out=joint", true},
        {"intra value=shared, sep diff, scalar scale, no norm", "HMH", "norm=none,scale=scalar,op=diff,value=shared,out=sep", true},
        {"intra hymba", "HA", "hymba", true},
        {"intra falcon", "MH", "falcon", false},
    };
    for (const Case& k : cases) {
        for (int chunk : {1, 4, 64}) {  // the full forward's chunking must not show in the step results
            CAPTURE(k.name);
            CAPTURE(chunk);
            ModelConfig c = micro(k.pattern, k.fusion, 4);
            c.tied = k.tied;
            c.chunk = chunk;
            c.window = 3, c.sink = 1;
            c.moe = k.moe, c.n_experts = 3;
            Model<double> m(c);
            randomize(m, 3);
            for (size_t i = 0; i < m.buffers.size(); i++) m.buffers[i] = 0.05 * double(i % 3) - 0.05;
            const int B = 2, T = 9;
            std::vector<int> tok(B * T);
            Rng rng(7);
            random_tokens(rng, tok, c.vocab_size);
            double max_logit = 0;
            const double err = step_vs_full(m, tok, B, T, max_logit);
            CHECK(err < 1e-10);
            CHECK(max_logit > 1e-2);
        }
    }
}

TEST_CASE("step-by-step equals the full forward with GQA, several B/C groups, and other conv widths") {
    for (int d_conv : {1, 2, 3}) {
        for (std::string fusion : {"final", "norm=group,scale=vector,op=diff,value=shared,out=sep"}) {
            CAPTURE(d_conv);
            CAPTURE(fusion);
            ModelConfig c = micro("AMH", fusion, 4);
            c.n_heads = 4, c.n_kv_heads = 2, c.head_dim = 2;                // 2 query heads per kv head
            c.d_ssm = 16, c.ssm_headdim = 4, c.ngroups = 2, c.d_state = 5;  // 4 Mamba heads in 2 groups
            c.intra_heads = 4, c.intra_kv_heads = 2, c.intra_d_qk = 2, c.intra_d_v = 2;
            c.intra_d_ssm = 8, c.intra_ssm_headdim = 4;  // 2 intra Mamba heads in 2 groups; = heads·d_v
            c.d_conv = d_conv;
            c.chunk = 3;
            Model<double> m(c);
            randomize(m, 11);
            const int B = 3, T = 7;
            std::vector<int> tok(B * T);
            Rng rng(12);
            random_tokens(rng, tok, c.vocab_size);
            double max_logit = 0;
            CHECK(step_vs_full(m, tok, B, T, max_logit) < 1e-10);
            CHECK(max_logit > 1e-2);
        }
    }
}

TEST_CASE("prefill gives the last position's logits; reset starts the context over") {
    ModelConfig c = micro("MHA", "final", 4);
    Model<double> m(c);
    randomize(m, 5);
    const int B = 2, T = 6, V = c.vocab_size;
    std::vector<int> tok(B * T);
    Rng rng(6);
    random_tokens(rng, tok, V);
    m.forward(tok.data(), nullptr, B, T);
    InferenceState<double> st(m, B, T + 2);
    std::vector<double> logits((size_t)B * V), again((size_t)B * V);
    model_prefill(logits.data(), st, m, tok.data(), T);
    CHECK(st.pos == T);
    for (int b = 0; b < B; b++)
        CHECK(max_abs_diff(logits.data() + (size_t)b * V, m.logits + ((size_t)b * T + T - 1) * V, V) < 1e-10);
    // after reset the same tokens give the same logits: no state leaks from the first pass
    st.reset();
    CHECK(st.pos == 0);
    model_prefill(again.data(), st, m, tok.data(), T);
    CHECK(max_abs_diff(logits.data(), again.data(), logits.size()) == 0.0);
    // prefill in two parts is the same as in one
    st.reset();
    std::vector<int> first(B * 2), rest(B * (T - 2));
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) (t < 2 ? first[b * 2 + t] : rest[b * (T - 2) + t - 2]) = tok[b * T + t];
    model_prefill(again.data(), st, m, first.data(), 2);
    model_prefill(again.data(), st, m, rest.data(), T - 2);
    CHECK(max_abs_diff(logits.data(), again.data(), logits.size()) < 1e-12);
}

TEST_CASE("inference state: capacity, bad sizes and a mismatched model are clear errors") {
    Model<double> m(micro("MA", "final", 4));
    m.init(1);
    std::vector<double> logits(16 * 2);
    int tok[2] = {1, 2};
    InferenceState<double> st(m, 1, 3);
    for (int i = 0; i < 3; i++) model_step(logits.data(), st, m, tok);
    CHECK_THROWS_WITH_AS(model_step(logits.data(), st, m, tok),
                         doctest::Contains("inference state is full: 3 positions (max_len) are used"), hl::Error);
    st.reset();
    model_step(logits.data(), st, m, tok);  // usable again after a reset
    std::vector<int> five(5, 1);
    CHECK_THROWS_WITH_AS(model_prefill(logits.data(), st, m, five.data(), 5),
                         doctest::Contains("5 tokens after 1 do not fit in the inference state's max_len = 3"),
                         hl::Error);
    CHECK_THROWS_AS(model_prefill(logits.data(), st, m, five.data(), 0), hl::Error);
    CHECK_THROWS_WITH_AS(InferenceState<double>(m, 0, 4), doctest::Contains("batch and max_len must be positive"),
                         hl::Error);
    CHECK_THROWS_AS(InferenceState<double>(m, 1, 0), hl::Error);
    int bad[1] = {16};  // outside the vocabulary
    InferenceState<double> st2(m, 1, 4);
    CHECK_THROWS_AS(model_step(logits.data(), st2, m, bad), hl::Error);
    Model<double> other(micro("AM", "final", 4));
    CHECK_THROWS_WITH_AS(model_step(logits.data(), st2, other, tok), doctest::Contains("made for another model"),
                         hl::Error);
    CHECK_THROWS_WITH_AS(generate_cached(m, std::vector<int>{}, 3, 1.0f, 0, 1),
                         doctest::Contains("prompt must hold at least one token"), hl::Error);
    CHECK_THROWS_AS(generate_cached(m, std::vector<int>{1}, -1, 1.0f, 0, 1), hl::Error);
}

TEST_CASE("cache_bytes: a transformer's KV cache grows with max_len, a Mamba's state does not") {
    ModelConfig ca = micro("AA", "final", 4), cm = micro("MM", "final", 4);
    Model<float> a(ca), mm(cm);
    const int B = 2;
    InferenceState<float> a8(a, B, 8), a16(a, B, 16), m8(mm, B, 8), m100(mm, B, 100);
    // A: per layer, keys and values of every position: B · max_len · Hkv · (d_qk + d_v)
    const size_t kv = size_t(2) * B * ca.n_kv_heads * (ca.head_dim + ca.head_dim) * sizeof(float);
    CHECK(a8.cache_bytes() == kv * 8);
    CHECK(a16.cache_bytes() == kv * 16);
    // M: per layer, the conv's last d_conv−1 inputs and the SSM state, whatever the length
    const int conv_dim = cm.d_ssm + 2 * cm.ngroups * cm.d_state;
    const size_t ssm = size_t(2) * B *
                       ((cm.d_conv - 1) * conv_dim + cm.ssm_nheads() * cm.ssm_headdim * cm.d_state) * sizeof(float);
    CHECK(m8.cache_bytes() == ssm);
    CHECK(m100.cache_bytes() == ssm);
    // H: both
    ModelConfig ch = micro("H", "final", 4);
    Model<double> h(ch);
    InferenceState<double> h8(h, 1, 8), h9(h, 1, 9);
    const size_t h_kv_pos = size_t(ch.intra_kv_heads) * (ch.intra_d_qk + ch.intra_d_v) * sizeof(double);
    CHECK(h9.cache_bytes() - h8.cache_bytes() == h_kv_pos);
    CHECK(h8.cache_bytes() > 8 * h_kv_pos);  // plus the Mamba branch's state
}

TEST_CASE("sample_token: greedy, top-k, the softmax distribution, determinism, errors") {
    Rng lr(21);
    const int V = 12;
    std::vector<double> logits = randn(lr, V, 1.5);
    std::vector<int> order(V);
    for (int i = 0; i < V; i++) order[i] = i;
    std::sort(order.begin(), order.end(), [&](int a, int b) { return logits[a] > logits[b]; });
    Rng rng(1);
    // temperature 0 is the argmax, and draws nothing from the stream
    CHECK(sample_token(logits.data(), V, 0.0f, 0, rng) == order[0]);
    CHECK(sample_token(logits.data(), V, 0.0f, 3, rng) == order[0]);
    CHECK(rng.s == Rng(1).s);
    // top_k = 1 is greedy at any temperature
    for (int i = 0; i < 200; i++) CHECK(sample_token(logits.data(), V, 2.0f, 1, rng) == order[0]);
    // top_k = 3: only the three best ever appear, and all three do
    {
        std::vector<int> count(V, 0);
        for (int i = 0; i < 3000; i++) count[size_t(sample_token(logits.data(), V, 3.0f, 3, rng))]++;
        int seen = 0;
        for (int r = 0; r < V; r++) {
            if (r < 3) CHECK(count[size_t(order[r])] > 0);
            else CHECK(count[size_t(order[r])] == 0);
            seen += count[size_t(order[r])];
        }
        CHECK(seen == 3000);
    }
    // no top-k: frequencies follow softmax(logits / temperature)
    {
        const float temp = 1.7f;
        const int n = 40000;
        std::vector<int> count(V, 0);
        for (int i = 0; i < n; i++) count[size_t(sample_token(logits.data(), V, temp, 0, rng))]++;
        double sum = 0;
        std::vector<double> p(V);
        for (int i = 0; i < V; i++) sum += (p[size_t(i)] = std::exp(logits[size_t(i)] / temp));
        for (int i = 0; i < V; i++) {
            CAPTURE(i);
            CHECK(std::fabs(count[size_t(i)] / double(n) - p[size_t(i)] / sum) < 0.01);  // ~4 std errors
        }
    }
    // top_k ≥ V is the same as no top-k: same seed, same draws
    {
        Rng r1(9), r2(9);
        for (int i = 0; i < 50; i++)
            CHECK(sample_token(logits.data(), V, 1.0f, V + 5, r1) == sample_token(logits.data(), V, 1.0f, 0, r2));
    }
    // ties at the cut: exactly k tokens are kept (the lower ids)
    {
        std::vector<float> flat(6, 0.5f);
        Rng r(3);
        for (int i = 0; i < 300; i++) CHECK(sample_token(flat.data(), 6, 1.0f, 2, r) < 2);
    }
    CHECK_THROWS_WITH_AS(sample_token(logits.data(), V, -1.0f, 0, rng), doctest::Contains("temperature must be >= 0"),
                         hl::Error);
    CHECK_THROWS_AS(sample_token(logits.data(), 0, 1.0f, 0, rng), hl::Error);
}

TEST_CASE("cached generation equals generation that re-runs the full forward, and streams every token") {
    for (std::string pattern : {"AA", "MHM"}) {
        CAPTURE(pattern);
        ModelConfig c = micro(pattern, "final", 4);
        Model<double> m(c);
        randomize(m, 8);
        const std::vector<int> prompt = {3, 1, 4, 1, 5};
        const int n_new = 8, top_k = 5;
        const float temp = 0.9f;
        const uint64_t seed = 42;
        std::vector<int> streamed;
        std::vector<int> got = generate_cached(m, prompt, n_new, temp, top_k, seed, [&](int t) { streamed.push_back(t); });
        CHECK(got.size() == size_t(n_new));
        CHECK(streamed == got);
        // the reference: the whole context through the full forward for every new token, same sampler and stream
        std::vector<int> ctx = prompt, ref;
        Rng rng(seed);
        for (int i = 0; i < n_new; i++) {
            const int T = int(ctx.size());
            m.forward(ctx.data(), nullptr, 1, T);
            const int next = sample_token(m.logits + (size_t)(T - 1) * c.vocab_size, c.vocab_size, temp, top_k, rng);
            ref.push_back(next);
            ctx.push_back(next);
        }
        CHECK(got == ref);
        // same seed, same tokens; greedy ignores the seed
        CHECK(generate_cached(m, prompt, n_new, temp, top_k, seed) == got);
        CHECK(generate_cached(m, prompt, n_new, 0.0f, 0, 1) == generate_cached(m, prompt, n_new, 0.0f, 0, 2));
        CHECK(generate_cached(m, prompt, 0, temp, top_k, seed).empty());
    }
    // with near-uniform logits (a fresh init), two seeds give two different samples
    Model<double> m(micro("MHM", "final", 4));
    m.init(1);
    CHECK(generate_cached(m, {2}, 24, 1.0f, 0, 1) != generate_cached(m, {2}, 24, 1.0f, 0, 2));
}
