// study.h — the paper's comparisons at a small scale (issue 6): every family trained on the same text, at matched
// parameters (the presets' layer counts) and matched training FLOPs (each run's steps = budget / its FLOPs per
// step, DESIGN.md's formula), then evaluated on
//   quality          validation loss along the run, against training FLOPs
//   length           loss at each position of windows longer than the training length (extrapolation)
//   recall           multi-query associative recall and needle-in-a-haystack (data/tasks.h), trained at one
//                    length and scored at longer ones; a needle counts as found when every digit of its number
//                    is the argmax given the ones before (exactly what greedy decoding would write)
//   inference        decode time per token and cache bytes against context length, beside the formula's
// and drawn as PNGs (dev/study/plot.h), with a CSV of every number. Also, for a reader: one attention head's
// softmax matrix and one Mamba-2 head's implicit mixing matrix (ssd_mixing_matrix) on the same text.
//
// The training itself goes through a backend, so that the same study runs on the CPU (study_cpu, a small smoke
// version in the tests) and on the GPU (study.cu). A backend has:
//   Backend(const ModelConfig&, uint64_t seed)       the model, initialised
//   StepStats train(inputs, targets, B, T, step, f, loss_weights)
//                                                    one optimisation step on a host batch (B, T); loss_weights
//                                                    (B·T or null): the recall tasks train on their answers only
//   void forward(inputs, targets, B, T)              logits (B·T·V) and per-token losses (B·T) into host vectors
//   const std::vector<float>& logits(), losses()
//   void to_host(Model<float>&)                      the parameters (and MoE buffers) into a CPU model
//   double decode_ms(int L_ctx, size_t* cache_bytes, double* prefill_ms)
//                                                    time per generated token after a context of L_ctx tokens; the
//                                                    cache's bytes; the prefill: the parallel forward over that
//                                                    context at batch 1 (the chunked SSD and flash attention, not
//                                                    the decoder's token loop, which costs about L_ctx decode steps)
#pragma once
#include <algorithm>             // std::max, std::min, std::find_if
#include <utility>               // std::pair, std::move
#include <chrono>                // std::chrono::steady_clock
#include <cmath>                 // std::log, std::llround, NAN
#include <cstdio>                // std::FILE, std::fprintf
#include <string>                // std::string
#include <vector>                // std::vector
#include "data/loader.h"         // WindowLoader, eval_windows, num_eval_windows, Split
#include "data/tasks.h"          // MqarConfig, mqar_batch, niah_example
#include "dev/study/plot.h"      // LineChart, Heatmap
#include "model/common.h"        // HL_CHECK, Rng
#include "model/config.h"        // ModelConfig, formula_train_flops_per_token, formula_cache_bytes
#include "model/model.h"         // Model<float>: attention / SSD matrices for the pictures
#include "model/ssd.h"           // ssd_mixing_matrix
#include "model/trainer.h"       // ModelFlags, TrainFlags, build_config, StepStats, masked_score

namespace hl::study {

// One model of the study: a name for the legend and the flags that build it.
struct Entry {
    std::string name;
    ModelFlags flags;
};

// The families of DESIGN.md: transformer, Mamba-2, inter-layer hybrids at the ratios and placements the paper
// sweeps, intra-layer hybrids with each fusion recipe, the sliding-window baseline.
inline std::vector<Entry> default_entries(const std::string& preset) {
    auto make = [&](std::string name, std::string arch, std::string ratio = "", std::string placement = "",
                    std::string fusion = "final") {
        ModelFlags f;
        f.preset = preset, f.arch = arch, f.ratio = ratio, f.placement = placement, f.fusion = fusion;
        return Entry{name, f};
    };
    return {make("transformer", "transformer"),
            make("mamba2", "mamba2"),
            make("inter 1:1", "inter", "1:1"),
            make("inter 1:3", "inter", "1:3"),
            make("inter 1:5", "inter", "1:5"),
            make("inter 1:5 front", "inter", "1:5", "front"),
            make("inter 1:5 end", "inter", "1:5", "end"),
            make("intra final", "intra"),
            make("intra concat", "intra", "", "", "concat"),
            make("intra hymba", "intra", "", "", "hymba"),
            make("intra falcon", "intra", "", "", "falcon"),
            make("swa", "swa")};
}

constexpr int MATRIX_T = 64;  // tokens of the attention / SSD matrix pictures

struct StudyConfig {
    std::vector<Entry> entries;
    int B = 16, T = 256;              // text training batch and length
    double flops_budget = 0;          // training FLOPs per run; 0: what the transformer does in `steps` steps
    int steps = 500;                  // the transformer's steps when flops_budget is 0
    TrainFlags train;                 // lr, warmup, clipping (steps are set per run)
    int eval_every = 50;              // validation points along each run
    int eval_batches = 4;
    int long_T = 1024;                // per-position loss on windows this long (≥ T)
    // recall tasks, trained at task_T and scored at each of task_lengths
    int task_steps = 300, task_B = 16, task_T = 256;
    std::vector<int> task_lengths = {256, 512, 1024};
    std::vector<double> niah_depths = {0.0, 0.25, 0.5, 0.75, 1.0};
    int task_eval_examples = 16;
    MqarConfig mqar;
    // inference: decode time and cache bytes at these context lengths
    std::vector<int> decode_lengths = {256, 512, 1024};
    uint64_t seed = 1234;
    std::string out = "docs/study";
};

// What one entry measured.
struct Result {
    std::string name, arch, pattern;
    double params = 0, flops_per_token = 0, flops = 0;
    int steps = 0;
    std::vector<double> curve_flops, curve_val;  // validation along the run
    double val = NAN;                            // at the end
    std::vector<double> per_pos;                 // long_T positions
    std::vector<double> mqar_acc, niah_acc;      // per task length: MQAR answer bytes right; needles found whole
    std::vector<double> mqar_exact, niah_digits; // ... MQAR examples with every answer right; needle digits right
    std::vector<std::vector<double>> niah_grid;  // [depth][length]
    std::vector<double> decode_ms, cache_bytes, cache_formula;
    std::vector<double> prefill_ms, decode_flops;  // the context's prefill; DESIGN.md's FLOPs of one decoded token
    std::vector<double> attn_matrix, ssd_matrix;  // (64, 64) each, for a model with A and M blocks (else empty)
};

// Mean loss over the first n_batches·B windows of `tokens` at length T, and (per_pos non-null) the mean at each
// position: both from the backend's per-token losses.
template <typename Backend>
double eval_text(Backend& be, const std::vector<int>& tokens, int B, int T, int n_batches,
                 std::vector<double>* per_pos = nullptr) {
    std::vector<int> in((size_t)B * T), tg((size_t)B * T);
    const int n_windows = num_eval_windows(tokens, T);
    double sum = 0;
    long long count = 0;
    if (per_pos) per_pos->assign(size_t(T), 0.0);
    for (int w = 0, batch = 0; w < n_windows && batch < n_batches; w += B, batch++) {
        const int rows = eval_windows(in.data(), tg.data(), tokens, w, B, T);
        for (int b = rows; b < B; b++)  // padding rows, not counted
            for (int t = 0; t < T; t++) in[(size_t)b * T + t] = in[t], tg[(size_t)b * T + t] = tg[t];
        be.forward(in.data(), tg.data(), B, T);
        for (int b = 0; b < rows; b++)
            for (int t = 0; t < T; t++) {
                const double l = be.losses()[(size_t)b * T + t];
                sum += l;
                if (per_pos) (*per_pos)[size_t(t)] += l;
            }
        count += (long long)rows * T;
    }
    if (per_pos)
        for (double& p : *per_pos) p /= double(count / T);
    return sum / double(count);
}

// A recall task's batch (B, T): MQAR examples, or NIAH prompt + answer windows with the answer's digits masked.
struct TaskBatch {
    std::vector<int> in, tg;
    std::vector<uint8_t> mask;
};
inline TaskBatch niah_batch(const std::vector<int>& text, int B, int T, double depth, Rng& rng) {
    TaskBatch tb{std::vector<int>((size_t)B * T), std::vector<int>((size_t)B * T), std::vector<uint8_t>((size_t)B * T)};
    for (int b = 0; b < B; b++) {
        // prompt (T − 6 bytes) + 7 answer digits = T + 1 tokens: inputs and targets of one window of T
        NiahExample ex = niah_example(text, T - 6, depth < 0 ? rng.uniform() : depth, rng);
        std::vector<int> seq = ex.prompt;
        for (char c : ex.answer) seq.push_back((unsigned char)c);
        for (int t = 0; t < T; t++) {
            tb.in[(size_t)b * T + t] = seq[size_t(t)];
            tb.tg[(size_t)b * T + t] = seq[size_t(t) + 1];
            tb.mask[(size_t)b * T + t] = t >= T - 7;  // the targets that are the answer's digits
        }
    }
    return tb;
}
inline TaskBatch mqar_task_batch(const MqarConfig& c, int B, int T, Rng& rng) {
    TaskBatch tb{std::vector<int>((size_t)B * T), std::vector<int>((size_t)B * T), std::vector<uint8_t>((size_t)B * T)};
    mqar_batch(tb.in.data(), tb.tg.data(), tb.mask.data(), c, B, T, rng);
    return tb;
}

// Of the masked targets (a needle's digits, MQAR's answers): the fraction that are the argmax (`token`), and the
// fraction of examples whose every one is (`exact`).
struct TaskScore {
    double token = 0, exact = 0;
};
template <typename Backend>
TaskScore task_accuracy(Backend& be, const TaskBatch& tb, int B, int T, int V) {
    be.forward(tb.in.data(), tb.tg.data(), B, T);
    TaskScore ts;
    long long right = 0, count = 0;
    for (int b = 0; b < B; b++) {
        const size_t o = (size_t)b * T;
        const MaskedScore s = masked_score(be.logits().data() + o * V, tb.tg.data() + o, tb.mask.data() + o, T, V);
        ts.exact += s.accuracy == 1.0;
        right += (long long)std::llround(s.accuracy * double(s.count)), count += s.count;
    }
    ts.exact /= B;
    ts.token = double(right) / double(std::max(1LL, count));
    return ts;
}

// Trains a fresh model of `cfg` on batches from make_batch(rng) for `steps` steps, on the answers alone (the
// mean loss over the masked targets: the rest of a task's bytes are random, and would only add noise).
template <typename Backend, typename MakeBatch>
void train_on(Backend& be, int steps, const TrainFlags& base, uint64_t seed, int B, int T, MakeBatch make_batch) {
    TrainFlags f = base;
    f.steps = steps;
    f.warmup = std::min(f.warmup, steps / 10);
    Rng rng(seed);
    std::vector<float> w((size_t)B * T);
    for (int s = 0; s < steps; s++) {
        const TaskBatch tb = make_batch(rng);
        long long count = 0;
        for (uint8_t m : tb.mask) count += m;
        HL_CHECK(count > 0, "study: a task batch without answers");
        for (size_t i = 0; i < w.size(); i++) w[i] = tb.mask[i] ? 1.0f / float(count) : 0.0f;
        be.train(tb.in.data(), tb.tg.data(), B, T, s, f, w.data());
    }
}

// One attention head's probabilities and one SSD head's mixing matrix on the same T tokens of text, from a model
// with both (an inter-layer hybrid): (T, T) each, row-major. The first A block's head 0, the first M block's head 0.
inline void mixing_matrices(Model<float>& m, const std::vector<int>& tokens, int T, std::vector<double>& attn,
                            std::vector<double>& ssd) {
    HL_CHECK(int(tokens.size()) >= T + 1, "mixing_matrices: need ", T + 1, " tokens");
    m.forward(tokens.data(), tokens.data() + 1, 1, T);
    attn.clear(), ssd.clear();
    for (int l = 0; l < m.cfg.n_layers; l++) {
        const BlockConfig& b = m.blocks[size_t(l)];
        if (b.kind == 'A' && attn.empty()) attn.assign(m.bacts[size_t(l)].attn.att, m.bacts[size_t(l)].attn.att + T * T);
        if (b.kind == 'M' && ssd.empty()) {
            const Mamba2Acts<float>& a = m.bacts[size_t(l)].ssm;
            std::vector<float> M((size_t)T * T);
            ssd_mixing_matrix(M.data(), a.dt, a.A, a.Bm, a.Cm, 0, 0, 1, T, b.ssm.nheads(), b.ssm.ngroups, b.ssm.d_state);
            ssd.assign(M.begin(), M.end());
        }
    }
    HL_CHECK(!attn.empty() && !ssd.empty(), "mixing_matrices: the model needs an A block and an M block, pattern ",
             m.cfg.pattern);
}

// The whole study for one entry. text: the training split; val: the validation split.
// An entry's model config: its flags at the study's training length, with room for the longest evaluation.
inline ModelConfig entry_config(const Entry& e, const StudyConfig& sc) {
    ModelFlags mf = e.flags;
    mf.seq_len = sc.T;
    ModelConfig cfg = build_config(mf);
    cfg.max_seq_len = std::max({cfg.max_seq_len, sc.long_T, sc.task_lengths.back(), sc.decode_lengths.back()});
    return cfg;
}

// Inference at each of sc.decode_lengths, beside DESIGN.md's formulas, into r (replacing what it held). The
// times do not depend on the weights, so any model of the config will do (remeasure_inference uses a fresh one).
template <typename Backend>
void measure_inference(Backend& be, const ModelConfig& cfg, const StudyConfig& sc, Result& r) {
    r.decode_ms.clear(), r.prefill_ms.clear(), r.cache_bytes.clear(), r.cache_formula.clear(), r.decode_flops.clear();
    for (int L : sc.decode_lengths) {
        size_t bytes = 0;
        double prefill = 0;
        r.decode_ms.push_back(be.decode_ms(L, &bytes, &prefill));
        r.prefill_ms.push_back(prefill);
        r.cache_bytes.push_back(double(bytes));
        r.cache_formula.push_back(formula_cache_bytes(cfg, L) * 2);  // the formula counts bf16; we hold fp32
        r.decode_flops.push_back(formula_decode_flops_per_token(cfg, L + 1));  // the first token after L
    }
}

template <typename Backend>
Result run_entry(const Entry& e, const StudyConfig& sc, const std::vector<int>& text, const std::vector<int>& val,
                 double flops_budget) {
    const ModelConfig cfg = entry_config(e, sc);
    Result r;
    r.name = e.name, r.arch = cfg.arch, r.pattern = cfg.pattern;
    r.params = formula_nonembedding_params(cfg);
    r.flops_per_token = formula_train_flops_per_token(cfg, sc.T);
    r.steps = std::max(1, int(flops_budget / (r.flops_per_token * sc.B * sc.T) + 0.5));
    r.flops = r.flops_per_token * sc.B * sc.T * r.steps;

    // quality: language modelling on the text at matched FLOPs
    {
        Backend be(cfg, sc.seed);
        TrainFlags f = sc.train;
        f.steps = r.steps;
        WindowLoader loader(text, sc.B, sc.T, sc.seed);
        std::vector<int> in((size_t)sc.B * sc.T), tg(in.size());
        for (int s = 0; s < r.steps; s++) {
            loader.next(in.data(), tg.data());
            be.train(in.data(), tg.data(), sc.B, sc.T, s, f);
            if ((s + 1) % sc.eval_every == 0 || s + 1 == r.steps) {
                r.curve_flops.push_back(r.flops_per_token * sc.B * sc.T * (s + 1));
                r.curve_val.push_back(eval_text(be, val, sc.B, sc.T, sc.eval_batches));
            }
        }
        r.val = r.curve_val.back();
        if (cfg.count('A') > 0 && cfg.count('M') > 0) {  // the pictures: both mixers of this trained model
            Model<float> host(cfg);
            be.to_host(host);
            const int T = std::min(MATRIX_T, sc.T);
            mixing_matrices(host, std::vector<int>(val.begin(), val.begin() + T + 1), T, r.attn_matrix, r.ssd_matrix);
        }
        eval_text(be, val, std::max(1, sc.B * sc.T / sc.long_T), sc.long_T, sc.eval_batches, &r.per_pos);
        measure_inference(be, cfg, sc, r);
    }
    // recall: each task on a fresh model, trained at task_T, scored at every length
    const int V = cfg.vocab_size;
    {
        Backend be(cfg, sc.seed + 1);
        train_on(be, sc.task_steps, sc.train, sc.seed + 2, sc.task_B, sc.task_T,
                 [&](Rng& rng) { return mqar_task_batch(sc.mqar, sc.task_B, sc.task_T, rng); });
        Rng rng(sc.seed + 3);
        for (int L : sc.task_lengths) {
            const TaskScore ts = task_accuracy(be, mqar_task_batch(sc.mqar, sc.task_eval_examples, L, rng),
                                               sc.task_eval_examples, L, V);
            r.mqar_acc.push_back(ts.token);
            r.mqar_exact.push_back(ts.exact);
        }
    }
    {
        Backend be(cfg, sc.seed + 4);
        train_on(be, sc.task_steps, sc.train, sc.seed + 5, sc.task_B, sc.task_T,
                 [&](Rng& rng) { return niah_batch(text, sc.task_B, sc.task_T, -1.0, rng); });
        Rng rng(sc.seed + 6);
        r.niah_grid.assign(sc.niah_depths.size(), std::vector<double>(sc.task_lengths.size(), 0.0));
        for (size_t li = 0; li < sc.task_lengths.size(); li++) {
            double found = 0, digits = 0;
            for (size_t di = 0; di < sc.niah_depths.size(); di++) {
                const int L = sc.task_lengths[li];
                const TaskScore ts = task_accuracy(
                    be, niah_batch(val, sc.task_eval_examples, L, sc.niah_depths[di], rng), sc.task_eval_examples, L, V);
                r.niah_grid[di][li] = ts.exact;
                found += ts.exact, digits += ts.token;
            }
            r.niah_acc.push_back(found / double(sc.niah_depths.size()));
            r.niah_digits.push_back(digits / double(sc.niah_depths.size()));
        }
    }
    return r;
}

// ---- outputs: one CSV of every number, and the figures ----

inline std::string join(const std::vector<double>& v) {
    std::string s;
    char buf[32];
    for (size_t i = 0; i < v.size(); i++) {
        std::snprintf(buf, sizeof buf, "%s%.6g", i ? " " : "", v[i]);
        s += buf;
    }
    return s;
}

inline void write_csv(const std::string& path, const StudyConfig& sc, const std::vector<Result>& rs) {
    std::FILE* f = std::fopen(path.c_str(), "w");
    HL_CHECK(f != nullptr, "study: cannot write '", path, "'");
    std::fprintf(f, "name,arch,pattern,nonembedding_params,train_flops_per_token,steps,train_flops,val_loss,"
                    "val_curve_flops,val_curve_loss,loss_first_T,loss_beyond_T,mqar_acc_by_length,"
                    "niah_acc_by_length,task_lengths,decode_ms,cache_bytes,cache_bytes_formula_fp32,"
                    "decode_lengths,mqar_exact_by_length,niah_digit_acc_by_length,prefill_ms,"
                    "decode_flops_formula\n");
    for (const Result& r : rs) {
        double first = 0, beyond = 0;
        const int T = std::min<int>(sc.T, int(r.per_pos.size()));
        for (int t = 0; t < int(r.per_pos.size()); t++) (t < T ? first : beyond) += r.per_pos[size_t(t)];
        first /= std::max(1, T);
        beyond /= std::max(1, int(r.per_pos.size()) - T);
        std::vector<double> lengths(sc.task_lengths.begin(), sc.task_lengths.end()),
            dlen(sc.decode_lengths.begin(), sc.decode_lengths.end());
        std::fprintf(f, "%s,%s,%s,%.0f,%.6g,%d,%.6g,%.6f,%s,%s,%.6f,%.6f,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s\n",
                     r.name.c_str(),
                     r.arch.c_str(), r.pattern.c_str(), r.params, r.flops_per_token, r.steps, r.flops, r.val,
                     join(r.curve_flops).c_str(), join(r.curve_val).c_str(), first, beyond, join(r.mqar_acc).c_str(),
                     join(r.niah_acc).c_str(), join(lengths).c_str(), join(r.decode_ms).c_str(),
                     join(r.cache_bytes).c_str(), join(r.cache_formula).c_str(), join(dlen).c_str(),
                     join(r.mqar_exact).c_str(), join(r.niah_digits).c_str(), join(r.prefill_ms).c_str(),
                     join(r.decode_flops).c_str());
    }
    HL_CHECK(std::fclose(f) == 0, "study: cannot finish writing '", path, "'");
}

// loss_vs_flops.png, position_loss.png, recall.png (MQAR), niah_digits.png, decode.png, cache.png,
// niah_<entry>.png (needles found by length × depth, one per entry); write_matrices: attention.png, ssd_matrix.png.
inline void write_figures(const std::string& dir, const StudyConfig& sc, const std::vector<Result>& rs) {
    using namespace hl::plot;
    auto xs = [](const std::vector<int>& v) { return std::vector<double>(v.begin(), v.end()); };
    LineChart q;
    q.title = "validation loss vs training FLOPs (matched budget)";
    q.xlabel = "training FLOPs", q.ylabel = "val loss (nats/byte)", q.log_x = true;
    for (const Result& r : rs) q.add(r.name, r.curve_flops, r.curve_val);
    q.save_png(dir + "/loss_vs_flops.png");

    LineChart p;
    constexpr int bin = 32;  // positions averaged per point: one position's mean over a few windows is noisy
    p.title = "loss by position, means of " + std::to_string(bin) + " (trained at T = " + std::to_string(sc.T) + ")";
    p.xlabel = "position", p.ylabel = "loss (nats/byte)";
    for (const Result& r : rs) {
        std::vector<double> x, y;
        for (size_t i = 0; i + bin <= r.per_pos.size(); i += bin) {
            double sum = 0;
            for (size_t j = i; j < i + bin; j++) sum += r.per_pos[j];
            x.push_back(double(i) + bin / 2.0), y.push_back(sum / bin);
        }
        p.add(r.name, x, y);
    }
    p.save_png(dir + "/position_loss.png");

    LineChart m;
    m.title = "MQAR: answer bytes right, trained at T = " + std::to_string(sc.task_T);
    m.xlabel = "context length", m.ylabel = "accuracy", m.log_x = true;
    LineChart n;
    n.title = "needle in a haystack: digits right, trained at T = " + std::to_string(sc.task_T);
    n.xlabel = "context length", n.ylabel = "accuracy", n.log_x = true;
    for (const Result& r : rs) {
        m.add(r.name, xs(sc.task_lengths), r.mqar_acc).markers = true;
        n.add(r.name, xs(sc.task_lengths), r.niah_digits).markers = true;
    }
    m.save_png(dir + "/recall.png");
    n.save_png(dir + "/niah_digits.png");

    LineChart d;
    d.title = "decode time per token";
    d.xlabel = "context length", d.ylabel = "ms / token", d.log_x = true;
    LineChart c;
    c.title = "cache bytes (measured fp32; dots: DESIGN.md formula, as fp32)";
    c.xlabel = "context length", c.ylabel = "bytes", c.log_x = true, c.log_y = true;
    for (const Result& r : rs) {
        d.add(r.name, xs(sc.decode_lengths), r.decode_ms).markers = true;
        c.add(r.name, xs(sc.decode_lengths), r.cache_bytes);
        c.add(r.name + " formula", xs(sc.decode_lengths), r.cache_formula).markers = true;
    }
    d.save_png(dir + "/decode.png");
    LineChart pf;
    pf.title = "prefill time (the parallel forward over the context, batch 1)";
    pf.xlabel = "context length", pf.ylabel = "ms", pf.log_x = true, pf.log_y = true;
    for (const Result& r : rs)  // (parts written before prefill was timed have none)
        if (r.prefill_ms.size() == sc.decode_lengths.size())
            pf.add(r.name, xs(sc.decode_lengths), r.prefill_ms).markers = true;
    if (!pf.series.empty()) pf.save_png(dir + "/prefill.png");
    c.save_png(dir + "/cache.png");

    for (size_t i = 0; i < rs.size(); i++) {
        const Result& r = rs[i];
        std::vector<double> cells;
        for (const auto& row : r.niah_grid) cells.insert(cells.end(), row.begin(), row.end());
        Heatmap h(int(sc.niah_depths.size()), int(sc.task_lengths.size()), cells);
        h.title = "needle found: " + r.name, h.xlabel = "context length", h.ylabel = "needle depth";
        for (int L : sc.task_lengths) h.col_labels.push_back(std::to_string(L));
        for (double dd : sc.niah_depths) h.row_labels.push_back(std::to_string(int(dd * 100 + 0.5)) + "%");
        h.vmin = 0, h.vmax = 1, h.annotate = true;
        std::string file;
        for (char ch : r.name) file += (std::isalnum((unsigned char)ch) ? ch : '_');
        h.save_png(dir + "/niah_" + file + ".png");
    }
}

inline void write_matrices(const std::string& dir, const std::vector<double>& attn, const std::vector<double>& ssd,
                           int T) {
    using namespace hl::plot;
    std::vector<double> a = attn, s = ssd;
    for (int i = 0; i < T; i++)
        for (int j = i + 1; j < T; j++) a[size_t(i) * T + j] = s[size_t(i) * T + j] = NAN;  // the causal half
    Heatmap ha(T, T, a);
    ha.title = "attention: softmax(q k^T) of one head", ha.xlabel = "key position", ha.ylabel = "query position";
    ha.mask_nan = true;
    ha.save_png(dir + "/attention.png");
    Heatmap hs(T, T, s);
    hs.title = "Mamba-2: the SSD's implicit matrix of one head", hs.xlabel = "input position",
    hs.ylabel = "output position";
    hs.mask_nan = true;
    hs.save_png(dir + "/ssd_matrix.png");
}

// ---- one entry's Result as a small text file (out/parts/NN.txt), so that a study can be run in pieces (entries
// on several GPUs or in several sessions) and merged: `key n v1 … vn` per line, numbers with 17 digits. ----

inline std::string part_path(const std::string& out, size_t index) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "/parts/%02zu.txt", index);
    return out + buf;
}

// The per-length / per-position vectors of a Result by their key in a part file: one list for the writer and the
// reader. (scalars and the NIAH grid's rows are written apart.)
using ResultVector = std::vector<double> Result::*;
inline const std::vector<std::pair<const char*, ResultVector>>& result_vectors() {
    static const std::vector<std::pair<const char*, ResultVector>> fields = {
        {"curve_flops", &Result::curve_flops}, {"curve_val", &Result::curve_val},
        {"per_pos", &Result::per_pos},         {"mqar_acc", &Result::mqar_acc},
        {"niah_acc", &Result::niah_acc},       {"mqar_exact", &Result::mqar_exact},
        {"niah_digits", &Result::niah_digits}, {"decode_ms", &Result::decode_ms},
        {"cache_bytes", &Result::cache_bytes}, {"cache_formula", &Result::cache_formula},
        {"prefill_ms", &Result::prefill_ms},   {"decode_flops", &Result::decode_flops},
        {"attn_matrix", &Result::attn_matrix}, {"ssd_matrix", &Result::ssd_matrix}};
    return fields;
}

inline void save_result(const std::string& path, const Result& r) {
    std::FILE* f = std::fopen((path + ".tmp").c_str(), "w");
    HL_CHECK(f != nullptr, "study: cannot write '", path, ".tmp'");
    std::fprintf(f, "name %s\narch %s\npattern %s\nsteps %d\n", r.name.c_str(), r.arch.c_str(), r.pattern.c_str(),
                 r.steps);
    auto vec = [&](const char* key, const std::vector<double>& v) {
        std::fprintf(f, "%s %zu", key, v.size());
        for (double x : v) std::fprintf(f, " %.17g", x);
        std::fprintf(f, "\n");
    };
    vec("scalars", {r.params, r.flops_per_token, r.flops, r.val});
    for (const auto& [key, field] : result_vectors()) vec(key, r.*field);
    for (const auto& row : r.niah_grid) vec("niah_row", row);
    const bool ok = std::fprintf(f, "end\n") > 0;
    HL_CHECK(std::fclose(f) == 0 && ok, "study: cannot finish writing '", path, ".tmp'");
    HL_CHECK(std::rename((path + ".tmp").c_str(), path.c_str()) == 0, "study: cannot rename to '", path, "'");
}

inline Result load_result(const std::string& path) {
    std::FILE* f = std::fopen(path.c_str(), "r");
    HL_CHECK(f != nullptr, "study: no part '", path, "' (run its entry first)");
    Result r;
    char key[64], text[256];
    auto bad = [&](const char* what) {
        std::fclose(f);
        fail("study: '", path, "' is not a study part (", what, ")");
    };
    for (const char* k : {"name", "arch", "pattern"}) {
        if (std::fscanf(f, "%63s %255[^\n]", key, text) != 2 || std::string(key) != k) bad(k);
        (k[0] == 'n' ? r.name : k[0] == 'a' ? r.arch : r.pattern) = text;
    }
    if (std::fscanf(f, "%63s %d", key, &r.steps) != 2 || std::string(key) != "steps") bad("steps");
    bool ended = false;
    while (!ended && std::fscanf(f, "%63s", key) == 1) {
        const std::string k = key;
        if (k == "end") {
            ended = true;
            break;
        }
        size_t n = 0;
        if (std::fscanf(f, "%zu", &n) != 1 || n > (1u << 24)) bad(key);
        std::vector<double> v(n);
        for (double& x : v)
            if (std::fscanf(f, "%lf", &x) != 1) bad(key);
        if (k == "scalars" && n == 4) {
            r.params = v[0], r.flops_per_token = v[1], r.flops = v[2], r.val = v[3];
        } else if (k == "niah_row") {
            r.niah_grid.push_back(v);
        } else {
            const auto& fields = result_vectors();
            const auto it = std::find_if(fields.begin(), fields.end(), [&](const auto& e) { return k == e.first; });
            if (it == fields.end()) bad(key);
            r.*(it->second) = std::move(v);
        }
    }
    if (!ended) bad("it ends early");
    std::fclose(f);
    return r;
}

// Entry i's part, which must be of that entry.
inline Result load_part(const StudyConfig& sc, size_t i) {
    Result r = load_result(part_path(sc.out, i));
    HL_CHECK(r.name == sc.entries[i].name, "study: part ", i, " is '", r.name, "', expected '", sc.entries[i].name,
             "' (a part of another study?)");
    return r;
}

// The training FLOPs every entry gets: sc.flops_budget, or what the first entry does in sc.steps steps.
inline double study_budget(const StudyConfig& sc) {
    if (sc.flops_budget > 0) return sc.flops_budget;
    ModelFlags mf = sc.entries.front().flags;
    mf.seq_len = sc.T;
    return formula_train_flops_per_token(build_config(mf), sc.T) * sc.B * sc.T * sc.steps;
}

// The inference lines of one entry, beside DESIGN.md's formulas.
inline void print_inference(const StudyConfig& sc, const Result& r) {
    for (size_t k = 0; k < r.decode_ms.size(); k++)
        std::printf("    context %5d: decode %.3f ms/token (formula %.3g FLOP/token), prefill %.1f ms, cache %.0f B "
                    "(formula %.0f B, fp32)\n",
                    sc.decode_lengths[k], r.decode_ms[k], r.decode_flops[k], r.prefill_ms[k], r.cache_bytes[k],
                    r.cache_formula[k]);
    std::fflush(stdout);
}

// Entries [first, last) in turn, each into its part file. Prints a line per entry.
template <typename Backend>
void run_entries(const StudyConfig& sc, size_t first, size_t last, const std::vector<int>& text,
                 const std::vector<int>& val) {
    HL_CHECK(!sc.entries.empty(), "study: no entries");
    HL_CHECK(first < last && last <= sc.entries.size(), "study: entries ", first, "..", last, " are not within 0..",
             sc.entries.size());
    HL_CHECK(sc.long_T >= sc.T, "study: long_T (", sc.long_T, ") must be at least T (", sc.T, ")");
    const double budget = study_budget(sc);
    make_dirs(sc.out + "/parts");
    for (size_t i = first; i < last; i++) {
        const auto t0 = std::chrono::steady_clock::now();
        const Result r = run_entry<Backend>(sc.entries[i], sc, text, val, budget);
        save_result(part_path(sc.out, i), r);
        std::printf("%-18s %-14s %5d steps  val %.4f  MQAR %s  NIAH found %s digits %s  (%.0f s)\n", r.name.c_str(),
                    r.pattern.c_str(), r.steps, r.val, join(r.mqar_acc).c_str(), join(r.niah_acc).c_str(),
                    join(r.niah_digits).c_str(),
                    std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
        print_inference(sc, r);
    }
}

// Entries [first, last) again, inference only: each part's decode, prefill and cache columns measured anew on a
// fresh model of its config (everything else in the part is kept). For a new device, or after a kernel change.
template <typename Backend>
void remeasure_inference(const StudyConfig& sc, size_t first, size_t last) {
    HL_CHECK(first < last && last <= sc.entries.size(), "study: entries ", first, "..", last, " are not within 0..",
             sc.entries.size());
    for (size_t i = first; i < last; i++) {
        Result r = load_part(sc, i);
        const ModelConfig cfg = entry_config(sc.entries[i], sc);
        Backend be(cfg, sc.seed);
        measure_inference(be, cfg, sc, r);
        save_result(part_path(sc.out, i), r);
        std::printf("%-18s %-14s inference measured again\n", r.name.c_str(), r.pattern.c_str());
        print_inference(sc, r);
    }
}

// Every entry's part into the CSV and the figures, and the two matrices of the first model with both mixers.
inline std::vector<Result> merge_study(const StudyConfig& sc) {
    std::vector<Result> rs;
    for (size_t i = 0; i < sc.entries.size(); i++) rs.push_back(load_part(sc, i));
    write_csv(sc.out + "/results.csv", sc, rs);
    write_figures(sc.out, sc, rs);
    for (const Result& r : rs)
        if (!r.attn_matrix.empty()) {
            write_matrices(sc.out, r.attn_matrix, r.ssd_matrix, std::min(MATRIX_T, sc.T));
            break;
        }
    return rs;
}

// The whole study in one go: every entry, then the merge.
template <typename Backend>
std::vector<Result> run_study(const StudyConfig& sc, const std::vector<int>& text, const std::vector<int>& val) {
    run_entries<Backend>(sc, 0, sc.entries.size(), text, val);
    return merge_study(sc);
}

// ---- the CPU backend (the GPU's is in study.cu) ----

struct CpuBackend {
    Model<float> model;
    std::vector<float> m, v, logit_buf, loss_buf;

    CpuBackend(const ModelConfig& cfg, uint64_t seed) : model(cfg) {
        model.init(seed);
        m.assign(model.params.size(), 0.f);
        v.assign(model.params.size(), 0.f);
    }
    StepStats train(const int* in, const int* tg, int B, int T, int step, const TrainFlags& f,
                    const float* loss_weights = nullptr) {
        return train_step_on(model, m, v, in, tg, B, T, step, f, loss_weights);
    }
    void forward(const int* in, const int* tg, int B, int T) {
        model.forward(in, tg, B, T);
        const size_t n = (size_t)B * T;
        logit_buf.assign(model.logits, model.logits + n * model.cfg.vocab_size);
        loss_buf.assign(model.losses, model.losses + n);
    }
    const std::vector<float>& logits() const { return logit_buf; }
    const std::vector<float>& losses() const { return loss_buf; }
    void to_host(Model<float>& host) const {
        host.params = model.params;
        host.buffers = model.buffers;
    }
    // the prefill: the parallel forward over L_ctx tokens at batch 1 (timed); then the context through the cached
    // decoder and 8 timed steps
    double decode_ms(int L_ctx, size_t* cache_bytes, double* prefill_ms) {
        std::vector<int> prompt(size_t(L_ctx), '\n');
        model.forward(prompt.data(), nullptr, 1, L_ctx);  // (allocates the activations of that shape)
        const auto p0 = std::chrono::steady_clock::now();
        model.forward(prompt.data(), nullptr, 1, L_ctx);
        *prefill_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - p0).count();
        InferenceState<float> st(model, 1, L_ctx + 8);
        std::vector<float> logits(size_t(model.cfg.vocab_size));
        int tok = '\n';
        for (int i = 0; i < L_ctx; i++) model_step(logits.data(), st, model, &tok);
        const auto t0 = std::chrono::steady_clock::now();
        for (int i = 0; i < 8; i++) model_step(logits.data(), st, model, &tok);
        *cache_bytes = InferenceState<float>(model, 1, L_ctx).cache_bytes();  // the cache of L_ctx tokens exactly
        return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / 8;
    }
};

}  // namespace hl::study
