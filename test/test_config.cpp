// test_config.cpp — presets against the paper's tables, the cost formulas against its check values,
// the layer-pattern rule (paper layouts, every placement), and the errors of bad configs.
#include <cmath>                // std::round, std::fabs
#include <string>               // std::string
#include <vector>               // std::vector
#include <doctest/doctest.h>    // TEST_CASE, CHECK
#include "model/config.h"       // ModelConfig, preset, make_pattern, config_check, formula_*

using namespace hl;

namespace {

const char* PRESETS[] = {"tiny", "small", "100m", "350m", "1b", "3b"};
const char* ARCHS[] = {"transformer", "mamba2", "inter", "intra", "swa"};
const double MiB = 1024.0 * 1024.0;

// 1-based layers holding `letter`
std::vector<int> layers_of(const std::string& pattern, char letter) {
    std::vector<int> out;
    for (size_t i = 0; i < pattern.size(); i++)
        if (pattern[i] == letter) out.push_back(int(i) + 1);
    return out;
}

}  // namespace

TEST_CASE("transformer presets reproduce Table 8's non-embedding parameter counts") {
    // Table 8 prints 0.096B / 0.352B / 0.973B / 2.775B: compare in millions, rounded like the table
    struct Row { const char* name; double millions; const char* printed; };
    for (Row r : {Row{"100m", 96, "0.096B"}, Row{"350m", 352, "0.352B"}, Row{"1b", 973, "0.973B"},
                  Row{"3b", 2775, "2.775B"}}) {
        std::string name = r.name;
        CAPTURE(name);
        double p = formula_nonembedding_params(preset(r.name, "transformer"));
        CHECK(std::round(p / 1e6) == r.millions);
        CHECK(human_count(p) == r.printed);
    }
    // and one by hand from the table's row: 16 × (2·2048² + 2·2048·64·8 + 3·2048·8192)
    CHECK(formula_nonembedding_params(preset("1b", "transformer")) == 973078528.0);
}

TEST_CASE("Table 8 shapes: layers, widths, heads") {
    ModelConfig t = preset("3b", "transformer"), m = preset("3b", "mamba2");
    CHECK(t.n_layers == 28);
    CHECK(t.d_model == 3072);
    CHECK(t.d_ff == 8192);
    CHECK(t.n_heads == 32);
    CHECK(t.n_kv_heads == 8);
    CHECK(t.head_dim == 96);
    CHECK(m.n_layers == 21);
    CHECK(m.d_ssm == 6144);
    CHECK(m.ssm_headdim == 192);
    CHECK(m.d_state == 256);
    CHECK(m.pattern == std::string(21, 'M'));
    ModelConfig m1 = preset("1b", "mamba2");
    CHECK(m1.n_layers == 13);
    CHECK(m1.d_ssm == 2 * m1.d_model);  // §P: d_ssm = 2·d_model
    CHECK(m1.ssm_nheads() == 32);
    CHECK(m1.d_conv == 4);
    CHECK(m1.ngroups == 1);
    CHECK(m1.tied);
    CHECK(m1.rope_theta == 500000.0);
}

TEST_CASE("mamba2 and hybrid presets have matched non-embedding params") {
    for (std::string name : {"small", "100m", "350m", "1b", "3b"}) {
        CAPTURE(name);
        double t = formula_nonembedding_params(preset(name, "transformer"));
        for (std::string arch : {"mamba2", "inter", "intra"}) {
            CAPTURE(arch);
            double p = formula_nonembedding_params(preset(name, arch));
            CHECK(std::fabs(p / t - 1) < 0.05);  // within 5% of the transformer
        }
    }
}

TEST_CASE("Mamba mixer formula uses d_ssm, and the H mixer's is as stated") {
    ModelConfig m = preset("1b", "mamba2");
    // d·(2·d_ssm + 2N + nheads) + d_ssm·(d_conv + d) + 2·nheads with d 2048, d_ssm 4096, N 128, 32 heads
    CHECK(formula_params_mamba_mixer(m) == 2048.0 * (8192 + 256 + 32) + 4096.0 * (4 + 2048) + 64);
    CHECK(formula_params_ffn(m) == 3.0 * 2048 * 8192);
    CHECK(formula_params_attn_mixer(m) == 2.0 * 2048 * 2048 + 2.0 * 2048 * 64 * 8);

    // 1B intra block (Table 15): 16 heads × d_qk 72, d_v 128, 4 kv heads; Mamba 2304 = 16 × 144, N 128
    ModelConfig c = preset("1b", "intra");
    const double d = 2048, attn = d * 16 * 72 + d * 4 * 72 + d * 4 * 128;
    const double mamba = d * (2 * 2304 + 2 * 128 + 16) + 2304.0 * 4 + 2 * 16;  // no out_proj
    CHECK(formula_params_intra_mixer(c) == attn + mamba + 16 * 128 * d + 2304 * d);  // out=sep: two projections
    c.fusion = parse_fusion("concat");
    CHECK(formula_params_intra_mixer(c) == attn + mamba + (16 * 128 + 2304) * d);  // one joint 2-branch projection
    // 100M intra, value=shared: no x in in_proj; hymba recipe: one d → d projection after the add
    ModelConfig h = preset("100m", "intra");
    const double d1 = 1024, attn1 = d1 * 8 * 64 + d1 * 2 * 64 + d1 * 2 * 128;
    const double mamba1 = d1 * (2 * 1024 + 2 * 128 + 8) + 1024.0 * 4 + 2 * 8;
    h.fusion = parse_fusion("value=shared");
    config_check(h);
    CHECK(formula_params_intra_mixer(h) == attn1 + mamba1 - d1 * 1024 + 8 * 128 * d1 + 1024 * d1);
    h.fusion = parse_fusion("hymba");
    config_check(h);
    CHECK(formula_params_intra_mixer(h) == attn1 + mamba1 + 1024 * d1);
    // the total sums mixer + FFN per letter
    ModelConfig i = preset("1b", "intra");
    CHECK(formula_nonembedding_params(i) ==
          11 * (formula_params_mamba_mixer(i) + formula_params_ffn(i)) +
              2 * (formula_params_intra_mixer(i) + formula_params_ffn(i)));
}

TEST_CASE("decode FLOPs per token: three times their sum over the positions is the training formula") {
    for (const char* arch : {"transformer", "mamba2", "inter", "intra", "swa"}) {
        for (bool moe : {false, true}) {
            CAPTURE(arch);
            CAPTURE(moe);
            ModelConfig c = preset("small", arch);
            c.window = 64, c.sink = 4;  // the S blocks' window well inside L, so their cost saturates
            c.moe = moe;
            const int L = 300;
            double sum = 0;
            for (int t = 1; t <= L; t++) sum += formula_decode_flops_per_token(c, t);
            CHECK(3 * sum == doctest::Approx(formula_train_flops_per_sample(c, L)).epsilon(1e-12));
            // attention's per-token cost grows with the position, Mamba's and a saturated window's do not
            const double grow = formula_decode_flops_per_token(c, 2 * L) - formula_decode_flops_per_token(c, L);
            if (std::string(arch) == "mamba2") CHECK(grow == 0);
            else CHECK(grow > 0);
        }
    }
    ModelConfig s = preset("small", "swa");
    s.pattern = "SSS", s.n_layers = 3, s.window = 64, s.sink = 4;
    CHECK(formula_decode_flops_per_token(s, 1000) == formula_decode_flops_per_token(s, 2000));
}

TEST_CASE("1B at 8K: cache 256 MiB vs 13.4 MiB vs 43 MiB; Mamba ~18% fewer FLOPs") {
    const int L = 8192;
    ModelConfig t = preset("1b", "transformer"), m = preset("1b", "mamba2"), inter = preset("1b", "inter");
    CHECK(formula_cache_bytes(t, L) / MiB == 256.0);
    CHECK(formula_cache_bytes(m, L) / MiB == doctest::Approx(13.4).epsilon(0.005));
    CHECK(formula_cache_bytes(inter, L) / MiB == doctest::Approx(43.0).epsilon(0.02));
    // Mamba's cache is constant in the context length, attention's grows linearly
    CHECK(formula_cache_bytes(m, 100) == formula_cache_bytes(m, L));
    CHECK(formula_cache_bytes(t, 2 * L) == 2 * formula_cache_bytes(t, L));

    double ft = formula_train_flops_per_sample(t, L), fm = formula_train_flops_per_sample(m, L);
    double fewer = 1 - fm / ft;
    CHECK(fewer > 0.16);
    CHECK(fewer < 0.20);
    CHECK(formula_train_flops_per_token(t, L) == doctest::Approx(ft / L));
    // attention's term is quadratic: per token it grows with L, Mamba's does not (only via 6·params)
    double ft_short = formula_train_flops_per_token(t, 1024), fm_short = formula_train_flops_per_token(m, 1024);
    CHECK(formula_train_flops_per_token(t, L) - ft_short > 1e8);
    CHECK(formula_train_flops_per_token(m, L) == doctest::Approx(fm_short));
    // the hybrids lie between the pure models
    double fi = formula_train_flops_per_sample(inter, L);
    CHECK(fi < ft);
    CHECK(formula_cache_bytes(preset("1b", "intra"), L) < formula_cache_bytes(t, L));
}

TEST_CASE("preset layouts are the paper's (1-based layers)") {
    CHECK(layers_of(preset("350m", "inter").pattern, 'A') == std::vector<int>{4, 8});
    CHECK(layers_of(preset("350m", "intra").pattern, 'H') == std::vector<int>{4, 8});
    CHECK(preset("350m", "inter").n_layers == 11);
    CHECK(layers_of(preset("1b", "inter").pattern, 'A') == std::vector<int>{4, 8});
    CHECK(layers_of(preset("1b", "intra").pattern, 'H') == std::vector<int>{5, 9});
    CHECK(preset("1b", "inter").pattern == "MMMAMMMAMMMMM");
    CHECK(preset("1b", "intra").pattern == "MMMMHMMMHMMMM");
    for (const char* arch : {"inter", "intra"}) {
        ModelConfig c = preset("100m", arch);
        CHECK(c.n_layers == 6);
        CHECK(c.count('A') + c.count('H') == 1);
    }
    CHECK(layers_of(preset("100m", "intra").pattern, 'H') == std::vector<int>{3});
    ModelConfig big = preset("3b", "intra");
    CHECK(big.n_layers == 22);
    CHECK(layers_of(big.pattern, 'H') == std::vector<int>{5, 9, 13, 17});
}

TEST_CASE("intra presets follow Table 15's shapes") {
    struct Row { const char* name; int heads, dqk, dv, kv, dssm, P; };
    for (Row r : {Row{"100m", 8, 64, 128, 2, 1024, 128}, Row{"350m", 12, 64, 128, 4, 1536, 128},
                  Row{"1b", 16, 72, 128, 4, 2304, 144}, Row{"3b", 16, 96, 192, 4, 3072, 192}}) {
        std::string name = r.name;
        CAPTURE(name);
        ModelConfig c = preset(name, "intra");
        CHECK(c.intra_heads == r.heads);
        CHECK(c.intra_d_qk == r.dqk);
        CHECK(c.intra_d_v == r.dv);
        CHECK(c.intra_kv_heads == r.kv);
        CHECK(c.intra_d_ssm == r.dssm);
        CHECK(c.intra_ssm_headdim == r.P);
        ModelConfig t = preset(name, "transformer");
        // the rules behind the table: half the heads and kv heads, q/k width d_ssm/2, values d_model wide
        CHECK(2 * c.intra_heads == t.n_heads);
        CHECK(2 * c.intra_kv_heads == t.n_kv_heads);
        CHECK(c.intra_heads * c.intra_d_qk * 2 == c.intra_d_ssm);
        CHECK(c.intra_heads * c.intra_d_v == c.d_model);
        CHECK(c.intra_ssm_nheads() == c.intra_heads);
    }
    ModelConfig c = preset("1b", "intra");
    CHECK(c.intra_heads * c.intra_d_qk == 1152);  // §P: 1B intra q/k total dim 1152, d_ssm 2304
    CHECK(c.intra_d_ssm == 2304);
}

TEST_CASE("every placement on a 12-layer 1:3 pattern") {
    const int n = ratio_to_count("1:3", 12);
    CHECK(n == 3);
    CHECK(make_pattern(12, n, 'A') == "MMAMMAMMAMMM");  // middle is the default
    CHECK(make_pattern(12, n, 'A', "middle") == "MMAMMAMMAMMM");
    CHECK(make_pattern(12, n, 'A', "front") == "AMMAMMAMMMMM");
    CHECK(make_pattern(12, n, 'A', "end") == "MMMMMAMMAMMA");
    CHECK(make_pattern(12, n, 'A', "cluster") == "MMMMAAAMMMMM");
    CHECK(make_pattern(12, n, 'A', "sandwich") == "AAMMMMMMMMMA");
    CHECK(make_pattern(12, n, 'H', "middle") == "MMHMMHMMHMMM");
    CHECK(make_pattern(12, ratio_to_count("1:1", 12), 'A') == "MAMAMAMAMAMA");
    CHECK(make_pattern(12, 0, 'A') == std::string(12, 'M'));
    CHECK(make_pattern(12, 12, 'H') == std::string(12, 'H'));
}

TEST_CASE("middle placement: right count, never layer 1, evenly spaced, centred") {
    for (int L = 2; L <= 40; L++)
        for (int n = 1; n < L; n++) {
            CAPTURE(L);
            CAPTURE(n);
            std::string p = make_pattern(L, n, 'A');
            REQUIRE(int(p.size()) == L);
            std::vector<int> at = layers_of(p, 'A');
            REQUIRE(int(at.size()) == n);
            CHECK(at[0] >= 2);
            for (size_t i = 2; i < at.size(); i++) CHECK(at[i] - at[i - 1] == at[1] - at[0]);
            int before = at.front() - 1, after = L - at.back();
            if (before > 1) CHECK((after == before || after == before + 1));  // centred unless pushed off layer 1
            // every other placement also gives n blocks
            for (const char* pl : {"front", "end", "cluster", "sandwich"})
                CHECK(layers_of(make_pattern(L, n, 'H', pl), 'H').size() == size_t(n));
        }
}

TEST_CASE("ratio_to_count rounds to the share of attention, at least one block") {
    CHECK(ratio_to_count("1:1", 12) == 6);
    CHECK(ratio_to_count("1:3", 16) == 4);
    CHECK(ratio_to_count("1:5", 13) == 2);
    CHECK(ratio_to_count("1:5", 11) == 2);
    CHECK(ratio_to_count("1:5", 6) == 1);
    CHECK(ratio_to_count("1:5", 22) == 4);
    CHECK(ratio_to_count("1:12", 13) == 1);
    CHECK(ratio_to_count("1:12", 26) == 2);
    CHECK(ratio_to_count("1:12", 4) == 1);  // at least one
    CHECK(ratio_to_count("2:1", 9) == 6);
    CHECK(ratio_to_count("12:1", 4) == 3);  // at most n_layers − 1: a block of each kind
    CHECK(ratio_to_count("1:3", 2) == 1);
    CHECK_THROWS_WITH_AS(ratio_to_count("1-5", 12), "ratio '1-5': expected attention:mamba as two integers, like 1:5",
                         hl::Error);
    CHECK_THROWS_AS(ratio_to_count("1:", 12), hl::Error);
    CHECK_THROWS_AS(ratio_to_count("a:b", 12), hl::Error);
    CHECK_THROWS_AS(ratio_to_count("-1:3", 12), hl::Error);
    CHECK_THROWS_WITH_AS(ratio_to_count("0:5", 12),
                         "ratio '0:5': both sides must be positive (like 1:1, 1:3, 1:5, 1:12)", hl::Error);
    CHECK_THROWS_AS(ratio_to_count("1:5", 0), hl::Error);
}

TEST_CASE("bad patterns and pattern arguments are clear errors") {
    CHECK_THROWS_WITH_AS(pattern_check("MMX"), "pattern 'MMX': unknown letter 'X' at position 3 (use A, M, H, S)",
                         hl::Error);
    CHECK_THROWS_WITH_AS(pattern_check("a"), "pattern 'a': unknown letter 'a' at position 1 (use A, M, H, S)", hl::Error);
    CHECK_THROWS_WITH_AS(pattern_check(""), "pattern is empty (use one letter per layer: A, M, H, S)", hl::Error);
    CHECK_NOTHROW(pattern_check("AMH"));
    CHECK_THROWS_WITH_AS(make_pattern(12, 3, 'A', "spread"),
                         "unknown placement 'spread' (use middle, front, end, cluster, sandwich)", hl::Error);
    CHECK_THROWS_WITH_AS(make_pattern(4, 5, 'A'), "make_pattern: 5 hybrid blocks do not fit in 4 layers", hl::Error);
    CHECK_THROWS_AS(make_pattern(0, 0, 'A'), hl::Error);
    CHECK_THROWS_AS(make_pattern(4, 1, 'M'), hl::Error);
    CHECK(pattern_from_layers(5, {2, 5}, 'H') == "MHMMH");
    CHECK_THROWS_WITH_AS(pattern_from_layers(5, {6}, 'A'), "pattern: layer 6 is outside 1..5", hl::Error);
}

TEST_CASE("every preset × arch passes config_check; unknown names list the valid ones") {
    for (std::string name : PRESETS)
        for (std::string arch : ARCHS) {
            CAPTURE(name);
            CAPTURE(arch);
            ModelConfig c = preset(name, arch);
            CHECK_NOTHROW(config_check(c));
            CHECK(c.arch == arch);
            CHECK(int(c.pattern.size()) == c.n_layers);
            CHECK(c.vocab_size == 256);
            const std::string& a = arch;
            char want = a == "transformer" ? 'A' : a == "mamba2" ? 'M' : a == "inter" ? 'A' : a == "swa" ? 'S' : 'H';
            CHECK(c.count(want) >= 1);
            if (a == "swa") CHECK(c.count('A') >= 1);  // global layers among the windowed ones
            if (a == "inter" || a == "intra") {
                CHECK(c.count('M') >= 1);
                CHECK(c.pattern[0] == 'M');  // never first
            }
            // every block type's sizes are filled, so a pattern override is valid too
            c.pattern = std::string(size_t(c.n_layers), 'A');
            c.pattern[0] = 'M';
            c.pattern[size_t(c.n_layers) - 1] = 'H';
            CHECK_NOTHROW(config_check(c));
        }
    CHECK_THROWS_WITH_AS(preset("7b", "transformer"), "unknown preset '7b' (use tiny, small, 100m, 350m, 1b, 3b)",
                         hl::Error);
    CHECK_THROWS_WITH_AS(preset("1b", "mamba"), "unknown arch 'mamba' (use transformer, mamba2, inter, intra, swa)",
                         hl::Error);
    CHECK(preset("small", "transformer").d_model == 128);
    CHECK(formula_nonembedding_params(preset("small", "transformer")) < 2e6);
    CHECK(formula_nonembedding_params(preset("small", "transformer")) > 1e6);
}

TEST_CASE("config_check refuses bad sizes with one clear line") {
    ModelConfig t = preset("tiny", "transformer");  // d_model 32, 4 heads × 8, 2 kv heads
    ModelConfig m = preset("tiny", "mamba2");       // d_ssm 64, headdim 16
    ModelConfig h = preset("tiny", "intra");
    auto with = [](ModelConfig c, auto edit) { edit(c); return c; };
    CHECK_THROWS_WITH_AS(config_check(with(t, [](ModelConfig& c) { c.d_model = 0; })),
                         "config: d_model must be positive, got 0", hl::Error);
    CHECK_THROWS_WITH_AS(config_check(with(t, [](ModelConfig& c) { c.n_heads = 3; })),
                         "config: d_model 32 is not divisible by n_heads 3", hl::Error);
    CHECK_THROWS_WITH_AS(config_check(with(t, [](ModelConfig& c) { c.head_dim = 4; })),
                         "config: n_heads 4 × head_dim 4 must equal d_model 32", hl::Error);
    CHECK_THROWS_WITH_AS(config_check(with(t, [](ModelConfig& c) { c.n_kv_heads = 3; })),
                         "config: n_heads 4 is not divisible by n_kv_heads 3", hl::Error);
    CHECK_THROWS_WITH_AS(config_check(with(t, [](ModelConfig& c) { c.d_model = 36; c.n_heads = 4; c.head_dim = 9; })),
                         "config: head_dim 9 must be even for RoPE", hl::Error);
    CHECK_THROWS_WITH_AS(config_check(with(t, [](ModelConfig& c) { c.pattern = "AAA"; })),
                         "config: pattern 'AAA' has 3 letters but n_layers = 2", hl::Error);
    CHECK_THROWS_WITH_AS(config_check(with(t, [](ModelConfig& c) { c.pattern = "AQ"; })),
                         "pattern 'AQ': unknown letter 'Q' at position 2 (use A, M, H, S)", hl::Error);
    CHECK_THROWS_WITH_AS(config_check(with(m, [](ModelConfig& c) { c.ssm_headdim = 24; })),
                         "config: d_ssm 64 is not divisible by ssm_headdim 24", hl::Error);
    CHECK_THROWS_WITH_AS(config_check(with(m, [](ModelConfig& c) { c.ngroups = 3; })),
                         "config: Mamba heads 4 are not divisible by ngroups 3", hl::Error);
    CHECK_THROWS_AS(config_check(with(m, [](ModelConfig& c) { c.d_state = 0; })), hl::Error);
    CHECK_THROWS_AS(config_check(with(m, [](ModelConfig& c) { c.chunk = -1; })), hl::Error);
    CHECK_THROWS_AS(config_check(with(t, [](ModelConfig& c) { c.vocab_size = 0; })), hl::Error);
    CHECK_THROWS_AS(config_check(with(t, [](ModelConfig& c) { c.d_ff = 0; })), hl::Error);
    // a pure transformer does not need Mamba sizes, a pure Mamba no attention sizes
    CHECK_NOTHROW(config_check(with(t, [](ModelConfig& c) { c.d_ssm = 0; c.intra_heads = 0; })));
    CHECK_NOTHROW(config_check(with(m, [](ModelConfig& c) { c.n_heads = 0; })));
    // intra block
    CHECK_THROWS_WITH_AS(config_check(with(h, [](ModelConfig& c) { c.intra_d_qk = 7; })),
                         "config: intra_d_qk 7 must be even for RoPE", hl::Error);
    CHECK_THROWS_WITH_AS(config_check(with(h, [](ModelConfig& c) { c.intra_kv_heads = 3; })),
                         "config: intra_heads 2 is not divisible by intra_kv_heads 3", hl::Error);
    CHECK_THROWS_WITH_AS(config_check(with(h, [](ModelConfig& c) { c.intra_ssm_headdim = 12; })),
                         "config: intra_d_ssm 32 is not divisible by intra_ssm_headdim 12", hl::Error);
    CHECK_THROWS_AS(config_check(with(h, [](ModelConfig& c) { c.intra_heads = 0; })), hl::Error);
    // fusion constraints
    CHECK_THROWS_WITH_AS(config_check(with(h, [](ModelConfig& c) { c.fusion.op = FusionOp::concat; })),
                         "fusion: op=concat needs out=joint (concatenate, then one projection)", hl::Error);
    CHECK_NOTHROW(config_check(with(h, [](ModelConfig& c) { c.fusion = parse_fusion("value=shared"); })));
    ModelConfig b = preset("1b", "intra");  // intra_d_ssm 2304 != d_model 2048
    CHECK_THROWS_WITH_AS(config_check(with(b, [](ModelConfig& c) { c.fusion = parse_fusion("value=shared"); })),
                         "config: fusion value=shared needs intra_d_ssm == d_model, got 2304 vs 2048", hl::Error);
    CHECK_THROWS_WITH_AS(config_check(with(b, [](ModelConfig& c) { c.fusion = parse_fusion("hymba"); })),
                         "config: fusion op=add with out=joint needs equal branch widths, intra_d_ssm 2304 vs "
                         "intra_heads × intra_d_v 2048",
                         hl::Error);
    CHECK_NOTHROW(config_check(with(b, [](ModelConfig& c) { c.fusion = parse_fusion("falcon"); })));
    CHECK_THROWS_AS(formula_cache_bytes(b, 0), hl::Error);
}

TEST_CASE("cost_report prints the formula's numbers") {
    std::string r = cost_report(preset("1b", "transformer"), 8192);
    CHECK(r.find("0.973B") != std::string::npos);
    CHECK(r.find("256.00 MiB") != std::string::npos);
    CHECK(r.find("AAAAAAAAAAAAAAAA (16 A, 0 M, 0 H)") != std::string::npos);
    std::string ri = cost_report(preset("1b", "intra"), 8192);
    CHECK(ri.find("fusion norm=group,scale=none,op=diff,value=sep,out=sep") != std::string::npos);
    CHECK(cost_report(preset("1b", "inter"), 8192).find("43.37 MiB") != std::string::npos);
}

TEST_CASE("sliding window and MoE costs: visible pairs by brute force, bounded cache, active vs total params") {
    // attention_pairs against counting the visible (t, s) pairs one by one
    for (int L : {1, 5, 17, 64})
        for (int W : {0, 1, 3, 8, 100})
            for (int S : {0, 2, 5}) {
                if (W == 0 && S > 0) continue;
                double brute = 0;
                for (int t = 0; t < L; t++)
                    for (int s = 0; s <= t; s++) brute += (W == 0 || t - s < W || s < S) ? 1 : 0;
                CAPTURE(L);
                CAPTURE(W);
                CAPTURE(S);
                CHECK(attention_pairs(L, W, S) == brute);
            }
    // S blocks: the transformer's weights; at L ≤ window they cost what A blocks cost, beyond it linearly
    ModelConfig t = preset("350m", "transformer"), w = preset("350m", "swa");
    CHECK(w.n_layers == t.n_layers);
    CHECK(formula_nonembedding_params(w) == formula_nonembedding_params(t));
    CHECK(formula_train_flops_per_sample(w, 512) == formula_train_flops_per_sample(t, 512));
    CHECK(formula_train_flops_per_sample(w, 8192) < formula_train_flops_per_sample(t, 8192));
    // the S blocks' per-token attention term is flat beyond the window (+ sink): only the A blocks' grows
    ModelConfig all_s = w;
    all_s.pattern = std::string(size_t(w.n_layers), 'S');
    const double d4k = formula_train_flops_per_token(all_s, 4096), d8k = formula_train_flops_per_token(all_s, 8192);
    CHECK(d8k / d4k == doctest::Approx(1.0).epsilon(0.01));
    // the cache of an S block stops growing at sink + window tokens
    CHECK(formula_cache_bytes(all_s, 8192) == formula_cache_bytes(all_s, 576));
    CHECK(formula_cache_bytes(all_s, 100) == formula_cache_bytes(t, 100));
    CHECK(formula_cache_bytes(all_s, 8192) == 4.0 * all_s.head_dim * all_s.n_kv_heads * 576 * all_s.n_layers);

    // MoE: all experts (1 shared + E routed, each d_ff/2) and the router; active = the dense FFN + the router
    ModelConfig d = preset("100m", "inter"), m = d;
    m.moe = true;
    const double D = d.d_model, F = d.d_ff, E = m.n_experts;
    CHECK(formula_params_ffn(m) == 3 * D * (F / 2) * (1 + E) + D * E);
    CHECK(formula_params_ffn(m, true) == formula_params_ffn(d) + D * E);
    CHECK(formula_nonembedding_params(m, true) ==
          formula_nonembedding_params(d) + d.n_layers * D * E);  // equal active compute, plus the router
    CHECK(formula_train_flops_per_sample(m, 2048) ==
          doctest::Approx(formula_train_flops_per_sample(d, 2048) + 6.0 * 2048 * d.n_layers * D * E));
    CHECK(cost_report(m, 2048).find("active per token") != std::string::npos);
    m.d_ff = 7;
    CHECK_THROWS_AS(config_check(m), Error);
    m = d, m.moe = true, m.n_experts = 65;
    CHECK_THROWS_AS(config_check(m), Error);
    ModelConfig bad = preset("tiny", "swa");
    bad.window = 0;
    CHECK_THROWS_AS(config_check(bad), Error);
    CHECK(make_pattern(6, 1, 'A', "middle", 'S') == "SSASSS");
    CHECK_THROWS_AS(make_pattern(6, 1, 'A', "middle", 'X'), Error);
}
