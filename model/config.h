// config.h — the model configuration: sizes of every block type, the layer pattern (one letter per
// block: A attention, M Mamba-2, H intra-layer hybrid, S sliding-window attention), the MoE option, the
// presets of DESIGN.md §P (Table 8, Table 15), the pattern builder for --ratio/--placement, config_check,
// and the paper's cost formulas (§2).
// Pure configuration and arithmetic: no tensors, no math of the layers themselves.
#pragma once
#include <algorithm>       // std::min, std::clamp
#include <cmath>           // std::lround, std::isfinite
#include <cstdio>          // std::snprintf for the cost report
#include <map>             // std::map: config as checkpoint metadata
#include <string>          // std::string
#include <vector>          // std::vector of layer positions
#include "model/common.h"  // HL_CHECK, fail, Error
#include "model/fusion.h"  // FusionConfig, fusion_check, to_string(FusionConfig)

namespace hl {

constexpr int MAX_EXPERTS = 64;  // routed experts per MoE layer (fixed-size load statistics)

struct ModelConfig {
    std::string arch = "transformer";  // for display: transformer | mamba2 | inter | intra
    int vocab_size = 256;              // bytes by default (§P: the paper uses Llama 3.2's 128K tokenizer)
    int d_model = 0;
    int n_layers = 0;
    int d_ff = 0;  // SwiGLU hidden size; every block has its FFN (§P)

    // A blocks: causal GQA attention, n_heads · head_dim == d_model (§1: hd = D / n_heads)
    int n_heads = 0;
    int n_kv_heads = 0;
    int head_dim = 64;
    double rope_theta = 500000.0;

    // S blocks (App. E, G): the A block's attention, each query seeing the first `sink` tokens and the last
    // `window` ones (itself included), with its own RoPE base
    int window = 512;
    int sink = 64;
    double swa_rope_theta = 10000.0;

    // M blocks: Mamba-2 mixer, nheads = d_ssm / ssm_headdim (d_ssm is the paper's name for d_inner)
    int d_ssm = 0;
    int ssm_headdim = 128;
    int d_state = 128;  // N, also used by the H blocks' Mamba branch
    int ngroups = 1;    // G groups of B/C, also used by the H blocks
    int d_conv = 4;
    int chunk = 64;  // chunk length Q of the chunked SSD (64 in every preset, CPU and GPU; the GPU takes up to 256)

    // H blocks (Table 15): an attention branch with fewer heads, reduced q/k dim d_qk and value dim d_v
    // (heads · d_v = d_model), beside a Mamba-2 branch of reduced width intra_d_ssm
    int intra_heads = 0;
    int intra_kv_heads = 0;
    int intra_d_qk = 0;
    int intra_d_v = 0;
    int intra_d_ssm = 0;
    int intra_ssm_headdim = 0;
    FusionConfig fusion;  // how the two branches are combined (default: the paper's `final` recipe)

    // Mixture of experts (§4.4): every block's FFN is 1 shared + top-1 of n_experts routed SwiGLU experts,
    // each d_ff / 2 wide, so a token's active FFN compute equals the dense FFN's
    bool moe = false;
    int n_experts = 8;
    double moe_bias_rate = 1e-3;  // the balancing bias moves by this after each step

    std::string pattern;  // one letter per layer, e.g. "MMMAMMMAMMMMM"
    bool tied = true;     // LM head shares the embedding
    int max_seq_len = 1024;
    double norm_eps = 1e-5;
    double init_std = 0.02;

    int ssm_nheads() const { return ssm_headdim > 0 ? d_ssm / ssm_headdim : 0; }
    int intra_ssm_nheads() const { return intra_ssm_headdim > 0 ? intra_d_ssm / intra_ssm_headdim : 0; }
    int count(char letter) const {  // how many blocks of one kind
        int n = 0;
        for (char c : pattern) n += (c == letter);
        return n;
    }
};

// ---------------------------------------------------------------------------------------------
// Layer patterns
// ---------------------------------------------------------------------------------------------

// Every letter must be A, M, H or S; the string must not be empty.
inline void pattern_check(const std::string& pattern) {
    HL_CHECK(!pattern.empty(), "pattern is empty (use one letter per layer: A, M, H, S)");
    for (size_t i = 0; i < pattern.size(); i++) {
        char c = pattern[i];
        HL_CHECK(c == 'A' || c == 'M' || c == 'H' || c == 'S', "pattern '", pattern, "': unknown letter '", c,
                 "' at position ", i + 1, " (use A, M, H, S)");
    }
}

// A pattern of n_layers M blocks with `letter` at the given 1-based layers (how the paper numbers them).
inline std::string pattern_from_layers(int n_layers, const std::vector<int>& layers, char letter) {
    HL_CHECK(n_layers > 0, "pattern: n_layers must be positive, got ", n_layers);
    HL_CHECK(letter == 'A' || letter == 'H', "pattern: the hybrid letter must be A or H, got '", letter, "'");
    std::string p(size_t(n_layers), 'M');
    for (int l : layers) {
        HL_CHECK(l >= 1 && l <= n_layers, "pattern: layer ", l, " is outside 1..", n_layers);
        p[size_t(l - 1)] = letter;
    }
    return p;
}

// "1:5" → 1 attention (or hybrid) block per 5 Mamba blocks: round(n_layers · a / (a + m)), at least 1
// and, from 2 layers on, at most n_layers − 1 (a hybrid keeps a block of each kind: 12:1 on 4 layers is 3,
// not 4). So 1:1 → half, 1:3 → a quarter, 1:5 → a sixth, 1:12 → a thirteenth.
inline int ratio_to_count(const std::string& ratio, int n_layers) {
    HL_CHECK(n_layers > 0, "ratio: n_layers must be positive, got ", n_layers);
    size_t colon = ratio.find(':');
    auto digits = [](const std::string& s) {
        if (s.empty() || s.size() > 6) return false;
        for (char c : s)
            if (c < '0' || c > '9') return false;
        return true;
    };
    std::string sa = colon == std::string::npos ? "" : ratio.substr(0, colon);
    std::string sm = colon == std::string::npos ? "" : ratio.substr(colon + 1);
    HL_CHECK(digits(sa) && digits(sm), "ratio '", ratio, "': expected attention:mamba as two integers, like 1:5");
    int a = std::stoi(sa), m = std::stoi(sm);
    HL_CHECK(a > 0 && m > 0, "ratio '", ratio, "': both sides must be positive (like 1:1, 1:3, 1:5, 1:12)");
    const long most = n_layers > 1 ? n_layers - 1 : 1;
    return int(std::clamp(std::lround(double(n_layers) * a / (a + m)), 1L, most));
}

// Builds a pattern of n_layers blocks, n_attn of them `letter` (A for inter-layer, H for intra-layer
// hybrids), the rest `base` (M; S for the sliding-window baseline, whose global A layers sit in the middle).
// The exact rule, with L = n_layers, n = n_attn, layers numbered 1..L:
//   spacing  s = round(L / (n + 1)), at least 1, and at most (L − 2) / (n − 1) so the group fits in 2..L
//   middle   (default) the n blocks s apart, the group centred: the layers left outside it are split
//            before/after with the odd one after, and at least one M before — never layer 1.
//            E.g. 13 layers, 2 blocks → {5, 9}; 11 → {4, 8}; 6 layers, 1 block → {3}; 22, 4 → {5,9,13,17}.
//   front    the same group shifted to start at layer 1:  1, 1 + s, ...
//   end      the same group shifted to end at layer L:    ..., L − s, L
//   cluster  n adjacent layers, centred (odd leftover after), never layer 1 when n < L
//   sandwich ceil(n/2) blocks on the first layers, floor(n/2) on the last layers
// n == 0 gives all `base`, n == L all `letter`.
inline std::string make_pattern(int n_layers, int n_attn, char letter, const std::string& placement = "middle",
                                char base = 'M') {
    const int L = n_layers, n = n_attn;
    HL_CHECK(L > 0, "make_pattern: n_layers must be positive, got ", L);
    HL_CHECK(n >= 0 && n <= L, "make_pattern: ", n, " hybrid blocks do not fit in ", L, " layers");
    HL_CHECK(letter == 'A' || letter == 'H', "make_pattern: the hybrid letter must be A or H, got '", letter, "'");
    HL_CHECK(placement == "middle" || placement == "front" || placement == "end" || placement == "cluster" ||
                 placement == "sandwich",
             "unknown placement '", placement, "' (use middle, front, end, cluster, sandwich)");
    HL_CHECK(base == 'M' || base == 'S', "make_pattern: the base letter must be M or S, got '", base, "'");
    std::string p(size_t(L), base);
    if (n == 0) return p;
    if (n == L) return std::string(size_t(L), letter);
    long s = std::lround(double(L) / (n + 1));
    if (s < 1) s = 1;
    if (n >= 2 && s > (L - 2) / (n - 1)) s = (L - 2) / (n - 1);  // n < L, so this stays >= 1
    const long span = (n - 1) * s;  // first to last block of the group
    long first = 1;                 // 1-based layer of the first block
    if (placement == "middle") {
        long before = (L - 1 - span) / 2;  // layers before the group; the odd one goes after
        first = 1 + (before < 1 ? 1 : before);
    } else if (placement == "front") {
        first = 1;
    } else if (placement == "end") {
        first = L - span;
    } else if (placement == "cluster") {
        long before = (L - n) / 2;
        first = 1 + (before < 1 ? 1 : before);
        for (int i = 0; i < n; i++) p[size_t(first - 1 + i)] = letter;
        return p;
    } else {  // sandwich
        int n_front = (n + 1) / 2;
        for (int i = 0; i < n_front; i++) p[size_t(i)] = letter;
        for (int i = 0; i < n - n_front; i++) p[size_t(L - 1 - i)] = letter;
        return p;
    }
    for (int i = 0; i < n; i++) p[size_t(first - 1 + i * s)] = letter;
    return p;
}

// ---------------------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------------------

// Every size positive and every divisibility the layers rely on, one clear line per problem.
// Sizes of a block type are checked only when the pattern uses it (a pure transformer may leave
// the Mamba sizes at 0); the presets fill every block type's sizes anyway.
inline void config_check(const ModelConfig& c) {
    HL_CHECK(c.vocab_size > 0, "config: vocab_size must be positive, got ", c.vocab_size);
    HL_CHECK(c.d_model > 0, "config: d_model must be positive, got ", c.d_model);
    HL_CHECK(c.n_layers > 0, "config: n_layers must be positive, got ", c.n_layers);
    HL_CHECK(c.d_ff > 0, "config: d_ff must be positive, got ", c.d_ff);
    HL_CHECK(c.max_seq_len > 0, "config: max_seq_len must be positive, got ", c.max_seq_len);
    HL_CHECK(c.norm_eps > 0, "config: norm_eps must be positive, got ", c.norm_eps);
    HL_CHECK(c.init_std > 0, "config: init_std must be positive, got ", c.init_std);
    pattern_check(c.pattern);
    HL_CHECK(int(c.pattern.size()) == c.n_layers, "config: pattern '", c.pattern, "' has ", c.pattern.size(),
             " letters but n_layers = ", c.n_layers);

    if (c.count('A') > 0 || c.count('S') > 0) {
        HL_CHECK(c.n_heads > 0 && c.n_kv_heads > 0 && c.head_dim > 0, "config: attention needs positive n_heads (",
                 c.n_heads, "), n_kv_heads (", c.n_kv_heads, ") and head_dim (", c.head_dim, ")");
        HL_CHECK(c.d_model % c.n_heads == 0, "config: d_model ", c.d_model, " is not divisible by n_heads ",
                 c.n_heads);
        HL_CHECK(c.n_heads * c.head_dim == c.d_model, "config: n_heads ", c.n_heads, " × head_dim ", c.head_dim,
                 " must equal d_model ", c.d_model);
        HL_CHECK(c.n_heads % c.n_kv_heads == 0, "config: n_heads ", c.n_heads, " is not divisible by n_kv_heads ",
                 c.n_kv_heads);
        HL_CHECK(c.head_dim % 2 == 0, "config: head_dim ", c.head_dim, " must be even for RoPE");
        HL_CHECK(c.rope_theta > 0, "config: rope_theta must be positive, got ", c.rope_theta);
    }
    if (c.count('S') > 0) {
        HL_CHECK(c.window > 0, "config: sliding-window blocks (S) need a positive window, got ", c.window);
        HL_CHECK(c.sink >= 0, "config: sink must be non-negative, got ", c.sink);
        HL_CHECK(c.swa_rope_theta > 0, "config: swa_rope_theta must be positive, got ", c.swa_rope_theta);
    }
    if (c.moe) {
        HL_CHECK(c.d_ff % 2 == 0, "config: --moe halves d_ff per expert, so d_ff must be even, got ", c.d_ff);
        HL_CHECK(c.n_experts >= 1 && c.n_experts <= MAX_EXPERTS, "config: n_experts must be in 1..", MAX_EXPERTS,
                 ", got ", c.n_experts);
        HL_CHECK(c.moe_bias_rate >= 0 && std::isfinite(c.moe_bias_rate),
                 "config: moe_bias_rate must be non-negative, got ", c.moe_bias_rate);
    }
    if (c.count('M') > 0 || c.count('H') > 0) {  // shared by the Mamba blocks and the H blocks' Mamba branch
        HL_CHECK(c.d_state > 0 && c.ngroups > 0 && c.d_conv > 0 && c.chunk > 0,
                 "config: Mamba needs positive d_state (", c.d_state, "), ngroups (", c.ngroups, "), d_conv (",
                 c.d_conv, ") and chunk (", c.chunk, ")");
    }
    if (c.count('M') > 0) {
        HL_CHECK(c.d_ssm > 0 && c.ssm_headdim > 0, "config: Mamba needs positive d_ssm (", c.d_ssm,
                 ") and ssm_headdim (", c.ssm_headdim, ")");
        HL_CHECK(c.d_ssm % c.ssm_headdim == 0, "config: d_ssm ", c.d_ssm, " is not divisible by ssm_headdim ",
                 c.ssm_headdim);
        HL_CHECK(c.ssm_nheads() % c.ngroups == 0, "config: Mamba heads ", c.ssm_nheads(),
                 " are not divisible by ngroups ", c.ngroups);
    }
    if (c.count('H') > 0) {
        HL_CHECK(c.intra_heads > 0 && c.intra_kv_heads > 0 && c.intra_d_qk > 0 && c.intra_d_v > 0,
                 "config: the intra-layer attention needs positive intra_heads (", c.intra_heads,
                 "), intra_kv_heads (", c.intra_kv_heads, "), intra_d_qk (", c.intra_d_qk, ") and intra_d_v (",
                 c.intra_d_v, ")");
        HL_CHECK(c.intra_heads % c.intra_kv_heads == 0, "config: intra_heads ", c.intra_heads,
                 " is not divisible by intra_kv_heads ", c.intra_kv_heads);
        HL_CHECK(c.intra_d_qk % 2 == 0, "config: intra_d_qk ", c.intra_d_qk, " must be even for RoPE");
        HL_CHECK(c.rope_theta > 0, "config: rope_theta must be positive, got ", c.rope_theta);
        HL_CHECK(c.intra_d_ssm > 0 && c.intra_ssm_headdim > 0, "config: the intra-layer Mamba needs positive ",
                 "intra_d_ssm (", c.intra_d_ssm, ") and intra_ssm_headdim (", c.intra_ssm_headdim, ")");
        HL_CHECK(c.intra_d_ssm % c.intra_ssm_headdim == 0, "config: intra_d_ssm ", c.intra_d_ssm,
                 " is not divisible by intra_ssm_headdim ", c.intra_ssm_headdim);
        HL_CHECK(c.intra_ssm_nheads() % c.ngroups == 0, "config: intra Mamba heads ", c.intra_ssm_nheads(),
                 " are not divisible by ngroups ", c.ngroups);
        fusion_check(c.fusion);
        // value=shared: the attention's V, expanded to all heads (intra_heads · d_v = d_model wide), is the
        // Mamba branch's x, so the two widths must agree
        HL_CHECK(c.fusion.value != FusionValue::shared || c.intra_d_ssm == c.d_model,
                 "config: fusion value=shared needs intra_d_ssm == d_model, got ", c.intra_d_ssm, " vs ",
                 c.d_model);
        HL_CHECK(c.fusion.value != FusionValue::shared || c.intra_heads * c.intra_d_v == c.d_model,
                 "config: fusion value=shared needs intra_heads × intra_d_v == d_model, got ",
                 c.intra_heads * c.intra_d_v, " vs ", c.d_model);
        // out=joint adds (or subtracts) the branches before the one projection: same width needed
        const bool elementwise = c.fusion.op == FusionOp::add || c.fusion.op == FusionOp::diff;
        HL_CHECK(!(c.fusion.out == FusionOut::joint && elementwise) || c.intra_d_ssm == c.intra_heads * c.intra_d_v,
                 "config: fusion op=", to_string(c.fusion.op), " with out=joint needs equal branch widths, ",
                 "intra_d_ssm ", c.intra_d_ssm, " vs intra_heads × intra_d_v ", c.intra_heads * c.intra_d_v);
    }
}

// ---------------------------------------------------------------------------------------------
// Presets
// ---------------------------------------------------------------------------------------------

// One row of Table 8 (both archs) with the intra-layer shapes of Table 15 and the paper's layer counts.
struct PresetRow {
    const char* name;
    int d_model, d_ff;
    int L_transformer, n_heads, n_kv_heads, head_dim;
    int L_mamba, d_ssm, ssm_headdim, d_state;
    int intra_heads, intra_kv_heads, intra_d_qk, intra_d_v, intra_d_ssm, intra_ssm_headdim;
    int L_hybrid;  // inter and intra (1:5) at matched non-embedding params
    int max_seq_len, chunk;
};

// tiny:  for tests; chunk 4 so that even a 7-token sequence spans several SSD chunks.
// small: ~1.5M non-embedding params, trains on 2 CPU cores in minutes; shapes follow the paper's
//        rules (intra: half the heads and kv heads, intra_d_ssm = d_model, d_qk = d_ssm/2/heads).
// 100m..3b: Table 8 and Table 15 as printed. 3b: the paper gives only the intra layout (22 layers,
//        4 hybrids); inter uses the same layer count.
inline const PresetRow* preset_rows(int* n_rows) {
    static const PresetRow rows[] = {
        // name   d_model d_ff | transformer: L heads kv hd | mamba2: L d_ssm P N |
        //        intra: heads kv d_qk d_v d_ssm P | hybrid L | max_seq_len chunk
        {"tiny", 32, 64, 2, 4, 2, 8, 2, 64, 16, 8, 2, 1, 8, 16, 32, 16, 3, 128, 4},
        {"small", 128, 512, 6, 4, 2, 32, 5, 256, 32, 32, 2, 1, 32, 64, 128, 32, 5, 1024, 64},
        {"100m", 1024, 3072, 8, 16, 4, 64, 6, 2048, 128, 128, 8, 2, 64, 128, 1024, 128, 6, 8192, 64},
        {"350m", 1536, 4096, 14, 24, 8, 64, 11, 3072, 128, 128, 12, 4, 64, 128, 1536, 128, 11, 8192, 64},
        {"1b", 2048, 8192, 16, 32, 8, 64, 13, 4096, 128, 128, 16, 4, 72, 128, 2304, 144, 13, 8192, 64},
        {"3b", 3072, 8192, 28, 32, 8, 96, 21, 6144, 192, 256, 16, 4, 96, 192, 3072, 192, 22, 8192, 64},
    };
    *n_rows = int(sizeof(rows) / sizeof(rows[0]));
    return rows;
}

// preset("1b", "inter"): every block type's sizes are filled from the row (so a --pattern override
// works with any letters); arch picks the layer count and the pattern.
inline ModelConfig preset(const std::string& name, const std::string& arch) {
    int n_rows = 0;
    const PresetRow* rows = preset_rows(&n_rows);
    const PresetRow* r = nullptr;
    for (int i = 0; i < n_rows; i++)
        if (name == rows[i].name) r = &rows[i];
    HL_CHECK(r != nullptr, "unknown preset '", name, "' (use tiny, small, 100m, 350m, 1b, 3b)");
    HL_CHECK(arch == "transformer" || arch == "mamba2" || arch == "inter" || arch == "intra" || arch == "swa",
             "unknown arch '", arch, "' (use transformer, mamba2, inter, intra, swa)");
    ModelConfig c;
    c.arch = arch;
    c.d_model = r->d_model;
    c.d_ff = r->d_ff;
    c.n_heads = r->n_heads;
    c.n_kv_heads = r->n_kv_heads;
    c.head_dim = r->head_dim;
    c.d_ssm = r->d_ssm;
    c.ssm_headdim = r->ssm_headdim;
    c.d_state = r->d_state;
    c.intra_heads = r->intra_heads;
    c.intra_kv_heads = r->intra_kv_heads;
    c.intra_d_qk = r->intra_d_qk;
    c.intra_d_v = r->intra_d_v;
    c.intra_d_ssm = r->intra_d_ssm;
    c.intra_ssm_headdim = r->intra_ssm_headdim;
    c.max_seq_len = r->max_seq_len;
    c.chunk = r->chunk;
    if (arch == "transformer") {
        c.n_layers = r->L_transformer;
        c.pattern = std::string(size_t(c.n_layers), 'A');
    } else if (arch == "swa") {
        // the sliding-window baseline: the transformer's layers, 1 global A per 5 S, in the middle
        c.n_layers = r->L_transformer;
        c.pattern = make_pattern(c.n_layers, ratio_to_count("1:5", c.n_layers), 'A', "middle", 'S');
    } else if (arch == "mamba2") {
        c.n_layers = r->L_mamba;
        c.pattern = std::string(size_t(c.n_layers), 'M');
    } else {
        c.n_layers = r->L_hybrid;
        // 1:5 gives 1 block in 3..6 layers, 2 in 11 or 13, 4 in 22 — the paper's counts
        c.pattern = make_pattern(c.n_layers, ratio_to_count("1:5", c.n_layers), arch == "inter" ? 'A' : 'H');
        // The paper's 1B inter layout is {4, 8} but its 1B intra layout is {5, 9}; our centred rule gives
        // {5, 9}, so the 1B inter layout is hard-coded here.
        if (name == "1b" && arch == "inter") c.pattern = pattern_from_layers(13, {4, 8}, 'A');
    }
    config_check(c);
    return c;
}

// ---------------------------------------------------------------------------------------------
// Cost formulas (DESIGN.md §2, the paper's Table 1 / App. C). All in double: counts pass 2^31.
// They count matmul weights only (no norms, biases or embeddings), like the paper.
// ---------------------------------------------------------------------------------------------

// A block's attention: q and o are d·d, k and v are d·head_dim·n_kv each (GQA).
inline double formula_params_attn_mixer(const ModelConfig& c) {
    const double d = c.d_model;
    return 2 * d * d + 2 * d * double(c.head_dim) * c.n_kv_heads;
}

// Mamba-2 mixer with width d_ssm and heads nh = d_ssm / P:
//   d·(2·d_ssm + 2·G·N + nh)   in_proj (z, x, B, C, dt)
// + d_ssm·(d_conv + d)          conv weights on x, out_proj
// + 2·nh                        A_log, D
// The paper prints d_state·(N_conv + d_model) in the second term; only d_ssm·(...) reproduces its own
// totals, so d_ssm is used here. The paper has G = 1; G > 1 widens B and C (2·G·N).
inline double mamba_mixer_params(double d, double d_ssm, double nh, double G, double N, double d_conv) {
    return d * (2 * d_ssm + 2 * G * N + nh) + d_ssm * (d_conv + d) + 2 * nh;
}
inline double formula_params_mamba_mixer(const ModelConfig& c) {
    return mamba_mixer_params(c.d_model, c.d_ssm, c.ssm_nheads(), c.ngroups, c.d_state, c.d_conv);
}

// H block's mixer (our formula, same conventions):
//   attention  d·h·d_qk (q) + d·kv·d_qk (k) + d·kv·d_v (v)
//   Mamba      the formula above at intra_d_ssm, less d·d_ssm_i when value=shared (x comes from V),
//              and without its out_proj term d_ssm_i·d (counted below)
//   output     out=sep:   h·d_v·d + d_ssm_i·d    (one projection per branch)
//              out=joint: op=concat: (h·d_v + d_ssm_i)·d;  add/diff: d_ssm_i·d (one projection after)
// Norm weights and scales (norm=group, scale=vector|scalar) are not counted, like all norms here.
inline double formula_params_intra_mixer(const ModelConfig& c) {
    const double d = c.d_model, h = c.intra_heads, kv = c.intra_kv_heads, dqk = c.intra_d_qk, dv = c.intra_d_v;
    const double ds = c.intra_d_ssm;
    double attn = d * h * dqk + d * kv * dqk + d * kv * dv;
    double mamba = mamba_mixer_params(d, ds, c.intra_ssm_nheads(), c.ngroups, c.d_state, c.d_conv) - ds * d;
    if (c.fusion.value == FusionValue::shared) mamba -= d * ds;
    double out;
    if (c.fusion.out == FusionOut::sep) out = h * dv * d + ds * d;
    else if (c.fusion.op == FusionOp::concat) out = (h * dv + ds) * d;
    else out = ds * d;
    return attn + mamba + out;
}

// SwiGLU: W1, W3 (d → d_ff) and W2 (d_ff → d).
// MoE (all experts, `active` = false): the shared and E routed experts at d_ff / 2, and the router E·d;
// active per token (`active` = true): the shared and one routed expert — the dense FFN's 3·d·d_ff — and the
// router.
inline double formula_params_ffn(const ModelConfig& c, bool active = false) {
    const double d = c.d_model;
    if (!c.moe) return 3.0 * d * double(c.d_ff);
    const double expert = 3.0 * d * (c.d_ff / 2), router = d * c.n_experts;
    return expert * (1 + (active ? 1 : c.n_experts)) + router;
}

// Sum over the pattern: each block is its mixer (by letter; S has A's weights) plus its FFN. With MoE,
// `active` counts the parameters one token uses (what the FLOPs scale with), else all of them.
inline double formula_nonembedding_params(const ModelConfig& c, bool active = false) {
    double total = 0;
    for (char l : c.pattern) {
        double mixer = l == 'A' || l == 'S' ? formula_params_attn_mixer(c)
                       : l == 'M'           ? formula_params_mamba_mixer(c)
                                            : formula_params_intra_mixer(c);
        total += mixer + formula_params_ffn(c, active);
    }
    return total;
}

// Query-key pairs a causal attention evaluates over L_ctx positions: all of them (L(L+1)/2) when window is 0,
// else, for each t, the last min(t+1, W) keys plus the sink keys before that window.
inline double attention_pairs(int L_ctx, int window = 0, int sink = 0) {
    const double Lc = L_ctx;
    if (window <= 0) return Lc * (Lc + 1) / 2;
    double pairs = 0;
    for (long t = 0; t < L_ctx; t++) {
        const long in_window = std::min<long>(t + 1, window);
        pairs += double(in_window + std::min<long>(sink, t + 1 - in_window));
    }
    return pairs;
}

// Embedding (and LM head when untied): not part of the cost formulas, printed beside them.
inline double formula_embedding_params(const ModelConfig& c) {
    return double(c.vocab_size) * c.d_model * (c.tied ? 1 : 2);
}

// Training FLOPs (forward + backward) for one sample of L_ctx tokens:
//   6·L_ctx·(non-embedding params; with MoE the active ones)        matmuls
// + per A block  12·d_attn·L_ctx·(L_ctx + 1)/2, d_attn = n_heads·head_dim   causal QKᵀ and AV
// + per S block  12·d_attn·(visible pairs), ≈ 12·d_attn·L_ctx·(window + sink) for L_ctx ≫ window
// + per H block   6·(h·d_qk + h·d_v)·L_ctx·(L_ctx + 1)/2             the same, QKᵀ at d_qk, AV at d_v
// + per M block   3·L_ctx·(9·d_ssm·N + 2·d_ssm)                      SSD scan (H: at intra_d_ssm)
// The LM head's matmul is not included (the paper's formula counts non-embedding params only).
inline double formula_train_flops_per_sample(const ModelConfig& c, int L_ctx) {
    HL_CHECK(L_ctx > 0, "cost: L_ctx must be positive, got ", L_ctx);
    const double Lc = L_ctx, pairs = attention_pairs(L_ctx), N = c.d_state;
    const double swa_pairs = c.count('S') > 0 ? attention_pairs(L_ctx, c.window, c.sink) : 0;
    double flops = 6 * Lc * formula_nonembedding_params(c, /*active=*/true);
    for (char l : c.pattern) {
        if (l == 'A') flops += 12.0 * c.n_heads * c.head_dim * pairs;
        if (l == 'S') flops += 12.0 * c.n_heads * c.head_dim * swa_pairs;
        if (l == 'M') flops += 3 * Lc * (9.0 * c.d_ssm * N + 2.0 * c.d_ssm);
        if (l == 'H') {
            flops += 6.0 * c.intra_heads * (c.intra_d_qk + c.intra_d_v) * pairs;
            flops += 3 * Lc * (9.0 * c.intra_d_ssm * N + 2.0 * c.intra_d_ssm);
        }
    }
    return flops;
}
inline double formula_train_flops_per_token(const ModelConfig& c, int L_ctx) {
    return formula_train_flops_per_sample(c, L_ctx) / L_ctx;
}

// FLOPs of one decoded token at position L_ctx (the L_ctx-th token, seeing itself and the L_ctx − 1 before it),
// the forward share of the training formula above (a third of it) at that one position:
//   2·(active non-embedding params) + per A block 4·d_attn·L_ctx (QKᵀ and AV over the visible keys),
//   S blocks over min(visible) keys, H blocks 2·h·(d_qk + d_v) per key, + per M block 9·d_ssm·N + 2·d_ssm
// so that 3 · Σ_{t=1..L} decode(t) = formula_train_flops_per_sample(L) exactly (a test checks it).
inline double formula_decode_flops_per_token(const ModelConfig& c, int L_ctx) {
    HL_CHECK(L_ctx > 0, "cost: L_ctx must be positive, got ", L_ctx);
    const double keys = attention_pairs(L_ctx) - attention_pairs(L_ctx - 1), N = c.d_state;  // = L_ctx
    const double swa_keys = c.count('S') > 0 ? attention_pairs(L_ctx, c.window, c.sink) -
                                                   attention_pairs(L_ctx - 1, c.window, c.sink)
                                             : 0;
    double flops = 2 * formula_nonembedding_params(c, /*active=*/true);
    for (char l : c.pattern) {
        if (l == 'A') flops += 4.0 * c.n_heads * c.head_dim * keys;
        if (l == 'S') flops += 4.0 * c.n_heads * c.head_dim * swa_keys;
        if (l == 'M') flops += 9.0 * c.d_ssm * N + 2.0 * c.d_ssm;
        if (l == 'H') {
            flops += 2.0 * c.intra_heads * (c.intra_d_qk + c.intra_d_v) * keys;
            flops += 9.0 * c.intra_d_ssm * N + 2.0 * c.intra_d_ssm;
        }
    }
    return flops;
}

// Inference cache in bytes (bf16, 2 bytes a number) after L_ctx tokens:
//   A block  4·head_dim·n_kv·L_ctx                       K and V
//   S block  4·head_dim·n_kv·min(L_ctx, sink + window)   bounded: the sink and the window's ring
//   H block  2·(d_qk + d_v)·kv·L_ctx + the Mamba term at intra_d_ssm
//   M block  2·(d_ssm·N + d_conv·(2·G·N + d_ssm))         SSM state + conv window, constant in L_ctx
inline double formula_cache_bytes(const ModelConfig& c, int L_ctx) {
    HL_CHECK(L_ctx > 0, "cost: L_ctx must be positive, got ", L_ctx);
    const double N = c.d_state, G = c.ngroups, K = c.d_conv;
    auto mamba = [&](double ds) { return 2 * (ds * N + K * (2 * G * N + ds)); };
    double bytes = 0;
    for (char l : c.pattern) {
        if (l == 'A') bytes += 4.0 * c.head_dim * c.n_kv_heads * L_ctx;
        if (l == 'S') bytes += 4.0 * c.head_dim * c.n_kv_heads * std::min(L_ctx, c.sink + c.window);
        if (l == 'M') bytes += mamba(c.d_ssm);
        if (l == 'H') bytes += 2.0 * (c.intra_d_qk + c.intra_d_v) * c.intra_kv_heads * L_ctx + mamba(c.intra_d_ssm);
    }
    return bytes;
}

// 973078528 → "0.973B", 96468992 → "0.096B" (billions from 1e7 up, as Table 8 prints them),
// 1474560 → "1.475M"
inline std::string human_count(double n) {
    char buf[32];
    if (n >= 1e7) std::snprintf(buf, sizeof buf, "%.3fB", n / 1e9);
    else if (n >= 1e6) std::snprintf(buf, sizeof buf, "%.3fM", n / 1e6);
    else if (n >= 1e3) std::snprintf(buf, sizeof buf, "%.1fK", n / 1e3);
    else std::snprintf(buf, sizeof buf, "%.0f", n);
    return buf;
}

// A few lines for the programs to print, e.g.
//   arch inter, pattern MMMAMMMAMMMMM (2 A, 11 M, 0 H)
//   non-embedding params (formula): 0.959B (958776000)   embedding: 524.3K (tied)
//   training FLOPs at L_ctx 8192: 6.110e+09 per token, 5.005e+13 per sample
//   inference cache at 8192 tokens (bf16): 43.37 MiB
inline std::string cost_report(const ModelConfig& c, int L_ctx) {
    char buf[256];
    std::string s = "arch " + c.arch + ", pattern " + c.pattern + " (" + std::to_string(c.count('A')) + " A, " +
                    std::to_string(c.count('M')) + " M, " + std::to_string(c.count('H')) + " H";
    if (c.count('S') > 0) s += ", " + std::to_string(c.count('S')) + " S";
    s += ")";
    if (c.count('H') > 0) s += ", fusion " + to_string(c.fusion);
    if (c.count('S') > 0) s += ", window " + std::to_string(c.window) + " sink " + std::to_string(c.sink);
    if (c.moe) s += ", MoE 1 shared + top-1 of " + std::to_string(c.n_experts);
    s += "\n";
    const double params = formula_nonembedding_params(c);
    std::snprintf(buf, sizeof buf, "non-embedding params (formula): %s (%.0f)   embedding: %s (%s)\n",
                  human_count(params).c_str(), params, human_count(formula_embedding_params(c)).c_str(),
                  c.tied ? "tied" : "untied");
    s += buf;
    if (c.moe) {
        const double active = formula_nonembedding_params(c, true);
        std::snprintf(buf, sizeof buf, "active per token (formula): %s (%.0f)\n", human_count(active).c_str(), active);
        s += buf;
    }
    double per_sample = formula_train_flops_per_sample(c, L_ctx);
    std::snprintf(buf, sizeof buf, "training FLOPs at L_ctx %d: %.3e per token, %.3e per sample\n", L_ctx,
                  per_sample / L_ctx, per_sample);
    s += buf;
    std::snprintf(buf, sizeof buf, "inference cache at %d tokens (bf16): %.2f MiB\n", L_ctx,
                  formula_cache_bytes(c, L_ctx) / (1024.0 * 1024.0));
    s += buf;
    return s;
}

// ---------------------------------------------------------------------------------------------
// The config as checkpoint metadata (safetensors `__metadata__` holds strings only)
// ---------------------------------------------------------------------------------------------

namespace config_detail {

// Doubles in the shortest "%.Ng" that reads back to the same bits: "500000", "1e-05", "0.02".
inline std::string double_str(double v) {
    char buf[32];
    for (int digits = 6; digits <= 17; digits++) {
        std::snprintf(buf, sizeof buf, "%.*g", digits, v);
        if (std::stod(buf) == v) break;
    }
    return buf;
}

// A number starts with a digit, '-' or '.' (std::stoll/stod would skip leading spaces).
inline bool starts_number(const std::string& s) {
    return !s.empty() && (s[0] == '-' || s[0] == '.' || (s[0] >= '0' && s[0] <= '9'));
}

inline const std::string& get(const std::map<std::string, std::string>& meta, const std::string& key,
                              const std::string& where) {
    auto it = meta.find(key);
    HL_CHECK(it != meta.end(), where, ": metadata has no '", key, "' (not a hybridlm checkpoint?)");
    return it->second;
}

// The whole string must be the number: "12abc", "", " 3" are refused.
inline int get_int(const std::map<std::string, std::string>& meta, const std::string& key, const std::string& where) {
    const std::string& s = get(meta, key, where);
    size_t used = 0;
    long long v = 0;
    try {
        v = std::stoll(s, &used);
    } catch (const std::exception&) {
        used = 0;
    }
    HL_CHECK(starts_number(s) && used == s.size() && v >= -2147483647LL && v <= 2147483647LL, where,
             ": metadata '", key, "' = '", s, "' is not an integer");
    return int(v);
}

inline double get_double(const std::map<std::string, std::string>& meta, const std::string& key,
                         const std::string& where) {
    const std::string& s = get(meta, key, where);
    size_t used = 0;
    double v = 0;
    try {
        v = std::stod(s, &used);
    } catch (const std::exception&) {
        used = 0;
    }
    HL_CHECK(starts_number(s) && used == s.size() && std::isfinite(v), where, ": metadata '", key,
             "' = '", s, "' is not a number");
    return v;
}

inline bool get_bool(const std::map<std::string, std::string>& meta, const std::string& key, const std::string& where) {
    const std::string& s = get(meta, key, where);
    HL_CHECK(s == "true" || s == "false", where, ": metadata '", key, "' = '", s, "' is not true or false");
    return s == "true";
}

}  // namespace config_detail

// Every ModelConfig field as "name" → "value" (fusion in its canonical axes spelling, tied as
// true/false), so a checkpoint carries everything needed to rebuild the model, and comparing two
// of these maps (check_metadata in model/checkpoint.h) names the first field that differs.
inline std::map<std::string, std::string> config_to_metadata(const ModelConfig& c) {
    using config_detail::double_str;
    std::map<std::string, std::string> m;
    m["arch"] = c.arch;
    m["vocab_size"] = std::to_string(c.vocab_size);
    m["d_model"] = std::to_string(c.d_model);
    m["n_layers"] = std::to_string(c.n_layers);
    m["d_ff"] = std::to_string(c.d_ff);
    m["n_heads"] = std::to_string(c.n_heads);
    m["n_kv_heads"] = std::to_string(c.n_kv_heads);
    m["head_dim"] = std::to_string(c.head_dim);
    m["rope_theta"] = double_str(c.rope_theta);
    m["d_ssm"] = std::to_string(c.d_ssm);
    m["ssm_headdim"] = std::to_string(c.ssm_headdim);
    m["d_state"] = std::to_string(c.d_state);
    m["ngroups"] = std::to_string(c.ngroups);
    m["d_conv"] = std::to_string(c.d_conv);
    m["chunk"] = std::to_string(c.chunk);
    m["intra_heads"] = std::to_string(c.intra_heads);
    m["intra_kv_heads"] = std::to_string(c.intra_kv_heads);
    m["intra_d_qk"] = std::to_string(c.intra_d_qk);
    m["intra_d_v"] = std::to_string(c.intra_d_v);
    m["intra_d_ssm"] = std::to_string(c.intra_d_ssm);
    m["intra_ssm_headdim"] = std::to_string(c.intra_ssm_headdim);
    m["fusion"] = to_string(c.fusion);
    m["window"] = std::to_string(c.window);
    m["sink"] = std::to_string(c.sink);
    m["swa_rope_theta"] = double_str(c.swa_rope_theta);
    m["moe"] = c.moe ? "true" : "false";
    m["n_experts"] = std::to_string(c.n_experts);
    m["moe_bias_rate"] = double_str(c.moe_bias_rate);
    m["pattern"] = c.pattern;
    m["tied"] = c.tied ? "true" : "false";
    m["max_seq_len"] = std::to_string(c.max_seq_len);
    m["norm_eps"] = double_str(c.norm_eps);
    m["init_std"] = double_str(c.init_std);
    return m;
}

// The inverse: a ModelConfig from checkpoint metadata (other keys, like the step, are ignored).
// A missing or malformed field, or a config that fails config_check, is one hl::Error line that
// starts with `where` (e.g. "checkpoint 'runs/x/model.safetensors'").
inline ModelConfig config_from_metadata(const std::map<std::string, std::string>& meta,
                                        const std::string& where = "checkpoint") {
    using namespace config_detail;
    ModelConfig c;
    c.arch = get(meta, "arch", where);
    c.vocab_size = get_int(meta, "vocab_size", where);
    c.d_model = get_int(meta, "d_model", where);
    c.n_layers = get_int(meta, "n_layers", where);
    c.d_ff = get_int(meta, "d_ff", where);
    c.n_heads = get_int(meta, "n_heads", where);
    c.n_kv_heads = get_int(meta, "n_kv_heads", where);
    c.head_dim = get_int(meta, "head_dim", where);
    c.rope_theta = get_double(meta, "rope_theta", where);
    c.d_ssm = get_int(meta, "d_ssm", where);
    c.ssm_headdim = get_int(meta, "ssm_headdim", where);
    c.d_state = get_int(meta, "d_state", where);
    c.ngroups = get_int(meta, "ngroups", where);
    c.d_conv = get_int(meta, "d_conv", where);
    c.chunk = get_int(meta, "chunk", where);
    c.intra_heads = get_int(meta, "intra_heads", where);
    c.intra_kv_heads = get_int(meta, "intra_kv_heads", where);
    c.intra_d_qk = get_int(meta, "intra_d_qk", where);
    c.intra_d_v = get_int(meta, "intra_d_v", where);
    c.intra_d_ssm = get_int(meta, "intra_d_ssm", where);
    c.intra_ssm_headdim = get_int(meta, "intra_ssm_headdim", where);
    try {
        c.fusion = parse_fusion(get(meta, "fusion", where));
    } catch (const Error& e) {
        fail(where, ": metadata 'fusion': ", e.what());
    }
    c.window = get_int(meta, "window", where);
    c.sink = get_int(meta, "sink", where);
    c.swa_rope_theta = get_double(meta, "swa_rope_theta", where);
    c.moe = get_bool(meta, "moe", where);
    c.n_experts = get_int(meta, "n_experts", where);
    c.moe_bias_rate = get_double(meta, "moe_bias_rate", where);
    c.pattern = get(meta, "pattern", where);
    c.tied = get_bool(meta, "tied", where);
    c.max_seq_len = get_int(meta, "max_seq_len", where);
    c.norm_eps = get_double(meta, "norm_eps", where);
    c.init_std = get_double(meta, "init_std", where);
    try {
        config_check(c);
    } catch (const Error& e) {
        fail(where, ": the stored config is invalid: ", e.what());
    }
    return c;
}

}  // namespace hl
