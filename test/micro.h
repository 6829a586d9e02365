// micro.h — a micro model config (vocab 16, d_model 8) for whole-model tests: small enough that a
// finite-difference check of every parameter runs in a fraction of a second.
#pragma once
#include <string>          // std::string
#include <vector>          // std::vector
#include "model/config.h"  // ModelConfig
#include "model/fusion.h"  // parse_fusion

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

}  // namespace hl::test
