// micro.h — a micro model config (vocab 16, d_model 8) for whole-model tests: small enough that a
// finite-difference check of every parameter runs in a fraction of a second; and cached decoding checked against
// the full forward on such a model.
#pragma once
#include <algorithm>          // std::max
#include <cmath>              // std::fabs
#include <optional>           // std::optional: step_vs_full's own state
#include <string>             // std::string
#include <vector>             // std::vector
#include <doctest/doctest.h>  // CHECK
#include "model/config.h"     // ModelConfig
#include "model/fusion.h"     // parse_fusion
#include "model/generate.h"   // InferenceState, model_step
#include "model/model.h"      // Model

namespace hl::test {

// chunk 3 by default, so that sequences of 5–9 tokens span several SSD chunks with a short last one
inline ModelConfig micro(const std::string& pattern, const std::string& fusion = "final", int chunk = 3) {
    ModelConfig c;
    c.arch = "test";
    c.vocab_size = 16;
    c.d_model = 8;
    c.d_ff = 12;
    c.n_heads = 2, c.n_kv_heads = 1, c.head_dim = 4;
    c.d_ssm = 12, c.ssm_headdim = 4, c.d_state = 3, c.ngroups = 1, c.chunk = chunk;
    c.intra_heads = 2, c.intra_kv_heads = 1, c.intra_d_qk = 4, c.intra_d_v = 4, c.intra_d_ssm = 8;
    c.intra_ssm_headdim = 4;
    c.fusion = parse_fusion(fusion);
    c.n_layers = int(pattern.size());
    c.pattern = pattern;
    c.max_seq_len = 64;
    return c;
}

inline void random_tokens(Rng& rng, std::vector<int>& v, int V) {
    for (int& t : v) t = int(rng.next() % uint64_t(V));
}

// Runs tokens (B, T) through the full forward and through model_step one position at a time (from *state when
// given, a fresh InferenceState for m at B, T; else its own); returns the largest |difference| of any logit, and
// (through max_logit) the largest |logit|, so a vacuous zero fails.
inline double step_vs_full(Model<double>& m, const std::vector<int>& tok, int B, int T, double& max_logit,
                           InferenceState<double>* state = nullptr) {
    const int V = m.cfg.vocab_size;
    m.forward(tok.data(), nullptr, B, T);
    std::vector<double> full(m.logits, m.logits + (size_t)B * T * V);  // (B, T, V)
    std::optional<InferenceState<double>> own;
    if (!state) own.emplace(m, B, T);
    InferenceState<double>& st = state ? *state : *own;
    std::vector<double> logits((size_t)B * V);  // (B, V)
    std::vector<int> col((size_t)B);
    double worst = 0;
    max_logit = 0;
    for (int t = 0; t < T; t++) {
        for (int b = 0; b < B; b++) col[size_t(b)] = tok[size_t(b) * T + t];
        model_step(logits.data(), st, m, col.data());
        for (int b = 0; b < B; b++)
            for (int v = 0; v < V; v++) {
                const double ref = full[((size_t)b * T + t) * V + v];
                worst = std::max(worst, std::fabs(logits[(size_t)b * V + v] - ref));
                max_logit = std::max(max_logit, std::fabs(ref));
            }
    }
    CHECK(st.pos == T);
    return worst;
}

}  // namespace hl::test
