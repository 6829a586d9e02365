// trainer.h — the pieces of a training run that do not depend on where the math runs, shared by
// train_cpu.cpp and train.cu, and each one testable on its own:
//   lr_at           warmup + cosine learning-rate schedule
//   build_config    the ModelConfig from the command-line flags (preset, arch, pattern/ratio, fusion, ...)
//   train_step      one optimisation step: batch → forward → backward → clip → AdamW
//   eval_loss       mean validation loss over fixed windows
//   eval_loss_by_position, mqar_accuracy, niah_eval   long-context evaluation (data/tasks.h's tasks)
//   save_run/load_run   run checkpoints: parameters, AdamW moments, step and data RNG (exact resume)
//   generate        text from a prompt with temperature and top-k, through the cached decoder
#pragma once
#include <algorithm>            // std::partial_sort, std::copy, std::min
#include <climits>              // INT_MAX
#include <cmath>                // std::cos, std::exp, std::log
#include <cstdint>              // uint64_t
#include <cerrno>               // errno
#include <cstdio>               // std::snprintf, std::FILE: the progress line, the CSV log
#include <cstdlib>              // std::atoi
#include <cstring>              // std::strerror
#include <functional>           // std::function: streaming samples
#include <fstream>              // std::ifstream: the old log on resume
#include <sys/stat.h>           // mkdir, stat: the run folder
#include <map>                  // std::map: checkpoint metadata
#include <string>               // std::string
#include <utility>              // std::move
#include <vector>               // std::vector
#include "data/loader.h"        // WindowLoader, eval_windows, num_eval_windows
#include "data/tasks.h"         // niah_correct: NIAH scoring
#include "data/tokenizer.h"     // ByteTokenizer: prompts in, samples out
#include "model/adamw.h"        // AdamWConfig, adamw_update, clip_grad_norm
#include "model/checkpoint.h"   // save_safetensors, load_safetensors, tensor_views, load_into, meta_*
#include "model/common.h"       // HL_CHECK, fail, Rng
#include "model/config.h"       // ModelConfig, preset, make_pattern, config_to/from_metadata
#include "model/fusion.h"       // parse_fusion
#include "model/generate.h"     // generate_cached, sample_token: cached decoding
#include "model/model.h"        // Model
#include "model/ssd.h"          // SSD_MAX_CHUNK: the --chunk limit

namespace hl {

// The metadata key "format" of every checkpoint we write; a file without it is not ours.
constexpr const char* RUN_FORMAT = "hybridlm-run-1";

// ---------------------------------------------------------------------------------------------
// Learning-rate schedule
// ---------------------------------------------------------------------------------------------

// The learning rate of 0-based step `step` of a run of `total` steps:
//   warmup   step < warmup:  lr · (step + 1) / warmup   (linear; the first step already moves)
//   cosine   after:          min + (lr − min) · ½(1 + cos(π · (step − warmup) / (total − warmup)))
//            with min = min_lr_frac · lr, reaching min at step == total (one past the last step)
// Steps at or past `total` get min (a run resumed with fewer --steps trains no further anyway).
inline float lr_at(int step, int total, int warmup, float lr, float min_lr_frac) {
    HL_CHECK(total > 0, "lr schedule: total steps must be positive, got ", total);
    HL_CHECK(warmup >= 0, "lr schedule: warmup must be non-negative, got ", warmup);
    HL_CHECK(step >= 0, "lr schedule: step must be non-negative, got ", step);
    HL_CHECK(min_lr_frac >= 0 && min_lr_frac <= 1, "lr schedule: min_lr_frac must be in [0, 1], got ", min_lr_frac);
    const double min_lr = double(min_lr_frac) * lr;
    if (step < warmup) return float(double(lr) * (step + 1) / warmup);
    if (step >= total) return float(min_lr);
    const double progress = double(step - warmup) / double(total - warmup);  // in [0, 1): total > step >= warmup
    const double cosine = 0.5 * (1.0 + std::cos(3.14159265358979323846 * progress));
    return float(min_lr + (double(lr) - min_lr) * cosine);
}

// ---------------------------------------------------------------------------------------------
// Flags → config
// ---------------------------------------------------------------------------------------------

// The flags that define the model. Defaults are train_cpu's: the small intra-layer hybrid.
struct ModelFlags {
    std::string preset = "small";  // tiny | small | 100m | 350m | 1b | 3b
    std::string arch = "intra";    // transformer | mamba2 | inter | intra | swa
    std::string pattern;           // e.g. "MMHMM": replaces the preset's layers ("" = the preset's)
    std::string ratio;             // e.g. "1:5": attention (or H) blocks per Mamba blocks ("" = not given)
    std::string placement;         // middle | front | end | cluster | sandwich ("" = middle)
    int layers = 0;                // layer count for --ratio (0 = the preset's)
    std::string fusion = "final";  // the H blocks' fusion (recipe name or axes), see model/fusion.h
    bool untied = false;           // separate LM head instead of the tied embedding
    int window = 0;                // S blocks' window (0 = the preset's)
    int sink = -1;                 // S blocks' sink (-1 = the preset's)
    int chunk = 0;                 // the SSD's chunk length Q in M and H blocks (0 = the preset's)
    bool moe = false;              // mixture-of-experts FFN in every block
    int experts = 8;               // routed experts per MoE layer
    double moe_bias_rate = 1e-3;   // the balancing bias's step
    int seq_len = 64;              // training context; must not exceed the preset's max_seq_len
    int vocab = 256;               // from the data: 256 for the byte tokenizer
};

// What a pattern is, for display: all A transformer, all M mamba2, any H intra, S with A only swa, else inter.
inline std::string arch_of_pattern(const std::string& pattern) {
    int a = 0, m = 0, h = 0, sw = 0;
    for (char c : pattern) a += c == 'A', m += c == 'M', h += c == 'H', sw += c == 'S';
    if (h > 0) return "intra";
    if (m == 0) return sw > 0 ? "swa" : "transformer";
    if (a == 0 && sw == 0) return "mamba2";
    return "inter";
}

// The model config from the flags, in this order:
//   1. preset(preset, arch): every block type's sizes, the arch's layer count and pattern
//   2. --pattern replaces the pattern (and layer count); or --ratio/--placement/--layers rebuild it
//      with make_pattern, the letter being H for --arch intra and A otherwise (a transformer or
//      mamba2 with a ratio becomes an inter-layer hybrid)
//   3. --fusion, --untied, --window/--sink, --chunk, --moe/--experts, the vocabulary of the data
//   4. --seq-len checked against the model's max_seq_len, then config_check
// Every bad value is one hl::Error line naming the flag.
inline ModelConfig build_config(const ModelFlags& f) {
    HL_CHECK(f.seq_len > 0, "--seq-len must be positive, got ", f.seq_len);
    HL_CHECK(f.vocab > 0, "--vocab must be positive, got ", f.vocab);
    HL_CHECK(f.layers >= 0, "--layers must be positive (or 0 for the preset's), got ", f.layers);
    ModelConfig c = preset(f.preset, f.arch);

    if (!f.pattern.empty()) {
        HL_CHECK(f.ratio.empty() && f.placement.empty() && f.layers == 0,
                 "--pattern names every layer itself: do not combine it with --ratio, --placement or --layers");
        try {
            pattern_check(f.pattern);
        } catch (const Error& e) {
            fail("--pattern: ", e.what());
        }
        c.pattern = f.pattern;
        c.n_layers = int(f.pattern.size());
        c.arch = arch_of_pattern(c.pattern);
    } else if (!f.ratio.empty() || !f.placement.empty() || f.layers > 0) {
        const bool hybrid_arch = f.arch == "inter" || f.arch == "intra" || f.arch == "swa";
        const int L = f.layers > 0 ? f.layers : c.n_layers;
        if (f.ratio.empty() && !hybrid_arch) {
            // a pure model with another depth: --arch transformer --layers 4 → AAAA
            HL_CHECK(f.placement.empty(), "--placement needs --ratio (or --arch inter|intra)");
            c.pattern = std::string(size_t(L), f.arch == "transformer" ? 'A' : 'M');
        } else {
            const char letter = f.arch == "intra" ? 'H' : 'A', base = f.arch == "swa" ? 'S' : 'M';
            const std::string ratio = f.ratio.empty() ? "1:5" : f.ratio;  // the hybrid presets' ratio
            HL_CHECK(L >= 2, "--layers ", L, ": a hybrid needs at least 2 layers, one block of each kind (--arch ",
                     f.arch, ", ratio ", ratio, ")");
            c.pattern = make_pattern(L, ratio_to_count(ratio, L), letter, f.placement.empty() ? "middle" : f.placement,
                                     base);
        }
        c.n_layers = L;
        c.arch = arch_of_pattern(c.pattern);
    }

    c.fusion = parse_fusion(f.fusion);  // parsed even without H blocks, so a typo is never silently ignored
    c.tied = !f.untied;
    HL_CHECK(f.window >= 0, "--window must be positive (or 0 for the preset's), got ", f.window);
    HL_CHECK(f.sink >= -1, "--sink must be non-negative (or -1 for the preset's), got ", f.sink);
    HL_CHECK((f.window == 0 && f.sink == -1) || c.count('S') > 0, "--window and --sink apply to S blocks, and "
             "pattern ", c.pattern, " has none (use --arch swa or S letters in --pattern)");
    if (f.window > 0) c.window = f.window;
    if (f.sink >= 0) c.sink = f.sink;
    HL_CHECK(f.chunk >= 0 && f.chunk <= SSD_MAX_CHUNK, "--chunk must be in 1..", SSD_MAX_CHUNK,
             " (or 0 for the preset's), got ", f.chunk);
    HL_CHECK(f.chunk == 0 || c.count('M') + c.count('H') > 0, "--chunk applies to M and H blocks, and pattern ",
             c.pattern, " has none");
    if (f.chunk > 0) c.chunk = f.chunk;
    HL_CHECK(f.experts >= 1 && f.experts <= MAX_EXPERTS, "--experts must be in 1..", MAX_EXPERTS, ", got ",
             f.experts);
    HL_CHECK(f.moe_bias_rate >= 0 && std::isfinite(f.moe_bias_rate), "--moe-bias-rate must be non-negative, got ",
             f.moe_bias_rate);
    c.moe = f.moe;
    c.n_experts = f.experts;
    c.moe_bias_rate = f.moe_bias_rate;
    c.vocab_size = f.vocab;
    HL_CHECK(f.seq_len <= c.max_seq_len, "--seq-len ", f.seq_len, " is above the model's limit max_seq_len = ",
             c.max_seq_len, " (preset ", f.preset, ")");
    config_check(c);
    return c;
}

// The flags of the optimisation and of the run's periodic work. "0" for an *_every means: only at
// the end of the run. The defaults (with ModelFlags') are `make train`'s: 600 steps of 8 × 64 bytes,
// ~300K tokens, about 4 minutes on 2 cores (~1.4k tok/s). For such a budget many small steps beat
// fewer large ones: of the (batch, seq-len, lr) we tried at equal tokens, 8 × 64 at lr 4e-3 gave the
// lowest validation loss.
struct TrainFlags {
    int batch = 8;               // B windows per step
    int steps = 600;             // total steps of the run (a resumed run continues up to here)
    int warmup = 40;             // linear warmup steps
    float lr = 4e-3f;            // peak learning rate
    float min_lr_frac = 0.1f;    // the cosine ends at min_lr_frac · lr
    float weight_decay = 0.1f;   // AdamW's decoupled decay (matrices only, see adamw_decays)
    float grad_clip = 1.0f;      // global gradient-norm clip
    uint64_t seed = 1337;        // init, data order, samples
    int log_every = 10;          // progress line every N steps
    int eval_every = 100;        // validation loss every N steps
    int eval_batches = 8;        // ... on this many batches of the validation split
    int ckpt_every = 100;        // checkpoint every N steps
    int sample_every = 300;      // sample every N steps
    int sample_len = 256;        // tokens per sample
    float temperature = 0.8f;    // sampling temperature (0 = greedy)
    int top_k = 40;              // sample among the k likeliest tokens (0 = all)
    int stop_at = 0;             // end this session after that step, checkpointed, as if interrupted
                                 // (the schedule still spans --steps; 0 = run to --steps)
};

inline void train_flags_check(const TrainFlags& f) {
    HL_CHECK(f.batch > 0, "--batch must be positive, got ", f.batch);
    HL_CHECK(f.steps > 0, "--steps must be positive, got ", f.steps);
    HL_CHECK(f.warmup >= 0, "--warmup must be non-negative, got ", f.warmup);
    HL_CHECK(f.lr > 0 && std::isfinite(f.lr), "--lr must be positive, got ", f.lr);
    HL_CHECK(f.min_lr_frac >= 0 && f.min_lr_frac <= 1, "--min-lr-frac must be in [0, 1], got ", f.min_lr_frac);
    HL_CHECK(f.weight_decay >= 0, "--weight-decay must be non-negative, got ", f.weight_decay);
    HL_CHECK(f.grad_clip > 0, "--grad-clip must be positive, got ", f.grad_clip);
    HL_CHECK(f.log_every > 0, "--log-every must be positive, got ", f.log_every);
    HL_CHECK(f.eval_every >= 0, "--eval-every must be non-negative (0 = only at the end), got ", f.eval_every);
    HL_CHECK(f.eval_batches > 0, "--eval-batches must be positive, got ", f.eval_batches);
    HL_CHECK(f.ckpt_every >= 0, "--ckpt-every must be non-negative (0 = only at the end), got ", f.ckpt_every);
    HL_CHECK(f.sample_every >= 0, "--sample-every must be non-negative (0 = only at the end), got ", f.sample_every);
    HL_CHECK(f.sample_len > 0, "--sample-len must be positive, got ", f.sample_len);
    HL_CHECK(f.temperature >= 0, "--temperature must be non-negative (0 = greedy), got ", f.temperature);
    HL_CHECK(f.top_k >= 0, "--top-k must be non-negative (0 = all tokens), got ", f.top_k);
    HL_CHECK(f.stop_at >= 0, "--stop-at must be non-negative (0 = run to --steps), got ", f.stop_at);
}

// ---------------------------------------------------------------------------------------------
// Training and validation steps
// ---------------------------------------------------------------------------------------------

// Everything a resumed run needs beyond the parameters and the AdamW moments.
struct TrainState {
    int step = 0;             // steps completed
    uint64_t loader_rng = 0;  // WindowLoader::rng_state() after those steps
};

struct StepStats {
    float loss = 0;       // mean cross-entropy of this step's batch (before the update)
    float lr = 0;         // the scheduled learning rate used
    float grad_norm = 0;  // global gradient norm before clipping
    int n_experts = 0;    // with MoE: each routed expert's share of this step's tokens, averaged over layers
    float expert_share[MAX_EXPERTS] = {};
};

// One optimisation step, `step` 0-based: the loader's next batch into inputs/targets (B, T) (caller-
// owned), forward, backward, clip to f.grad_clip, AdamW with the scheduled lr (bias correction counts
// step + 1). m and v are the AdamW moments, as long as model.params. Allocates nothing once the model
// is allocated for (loader.B, loader.T).
inline StepStats train_step_on(Model<float>& model, std::vector<float>& m, std::vector<float>& v, const int* inputs,
                               const int* targets, int B, int T, int step, const TrainFlags& f,
                               const float* loss_weights = nullptr);

inline StepStats train_step(Model<float>& model, std::vector<float>& m, std::vector<float>& v, int* inputs,
                            int* targets, WindowLoader& loader, int step, const TrainFlags& f) {
    loader.next(inputs, targets);
    return train_step_on(model, m, v, inputs, targets, loader.B, loader.T, step, f);
}

// The step itself on a given batch (B, T) — text windows or a synthetic task's batch (data/tasks.h); with
// loss_weights (B·T), the gradient is of the weighted loss (Model::backward), the reported loss still the mean.
inline StepStats train_step_on(Model<float>& model, std::vector<float>& m, std::vector<float>& v, const int* inputs,
                               const int* targets, int B, int T, int step, const TrainFlags& f,
                               const float* loss_weights) {
    HL_CHECK(m.size() == model.params.size() && v.size() == model.params.size(),
             "train_step: AdamW moments hold ", m.size(), " and ", v.size(), " values, the model has ",
             model.params.size(), " parameters");
    StepStats s;
    s.lr = lr_at(step, f.steps, f.warmup, f.lr, f.min_lr_frac);
    s.loss = model.forward(inputs, targets, B, T);
    model.zero_grad();
    model.backward(loss_weights);
    s.grad_norm = clip_grad_norm(model.grads.data(), model.grads.size(), f.grad_clip);
    AdamWConfig opt;
    opt.weight_decay = f.weight_decay;  // beta1 0.9, beta2 0.95, eps 1e-8 as in model/adamw.h
    adamw_update(model.params.data(), model.grads.data(), m.data(), v.data(), model.tensors, opt, s.lr, step + 1);
    if (model.cfg.moe) {  // balancing from this step's loads, for the next step's routing
        model.moe_update();
        s.n_experts = model.cfg.n_experts;
        model.expert_share(s.expert_share);
    }
    return s;
}

// Mean loss per token over the first n_batches · B consecutive windows of `tokens` (all of them if
// there are fewer); inputs/targets are (B, T) buffers. A last partial batch is padded with copies of
// its first window so the model keeps its (B, T) activations (no reallocation between training
// steps and validation); only the real rows count.
inline float eval_loss(Model<float>& model, int* inputs, int* targets, const std::vector<int>& tokens, int B, int T,
                       int n_batches) {
    HL_CHECK(B > 0 && T > 0, "eval_loss: batch and seq-len must be positive, got ", B, " and ", T);
    HL_CHECK(n_batches > 0, "eval_loss: n_batches must be positive, got ", n_batches);
    const int n_windows = num_eval_windows(tokens, T);
    double sum = 0;
    long long count = 0;
    for (int w = 0, batch = 0; w < n_windows && batch < n_batches; w += B, batch++) {
        const int rows = eval_windows(inputs, targets, tokens, w, B, T);
        for (int b = rows; b < B; b++)  // padding rows: any valid tokens, their losses are not counted
            for (int t = 0; t < T; t++) {
                inputs[(size_t)b * T + t] = inputs[t];
                targets[(size_t)b * T + t] = targets[t];
            }
        model.forward(inputs, targets, B, T);
        for (long long i = 0; i < (long long)rows * T; i++) sum += model.losses[i];
        count += (long long)rows * T;
    }
    return float(sum / double(count));
}

// ---------------------------------------------------------------------------------------------
// Long-context evaluation
// ---------------------------------------------------------------------------------------------

// eval_loss per position: per_pos[t] (resized to T) = the mean loss at position t over the same windows
// (the loss of predicting token t + 1 of a window from tokens 0..t). Returns the overall mean, which is
// eval_loss's, as every window has all T positions. With T beyond the training length it shows where the
// loss starts to climb.
inline float eval_loss_by_position(Model<float>& model, int* inputs, int* targets, const std::vector<int>& tokens,
                                   int B, int T, int n_batches, std::vector<double>& per_pos) {
    HL_CHECK(B > 0 && T > 0, "eval_loss_by_position: batch and seq-len must be positive, got ", B, " and ", T);
    HL_CHECK(n_batches > 0, "eval_loss_by_position: n_batches must be positive, got ", n_batches);
    const int n_windows = num_eval_windows(tokens, T);
    per_pos.assign(size_t(T), 0.0);
    long long windows = 0;
    for (int w = 0, batch = 0; w < n_windows && batch < n_batches; w += B, batch++) {
        const int rows = eval_windows(inputs, targets, tokens, w, B, T);
        for (int b = rows; b < B; b++)  // padding rows as in eval_loss: not counted
            for (int t = 0; t < T; t++) {
                inputs[(size_t)b * T + t] = inputs[t];
                targets[(size_t)b * T + t] = targets[t];
            }
        model.forward(inputs, targets, B, T);
        for (int b = 0; b < rows; b++)
            for (int t = 0; t < T; t++) per_pos[size_t(t)] += model.losses[(size_t)b * T + t];
        windows += rows;
    }
    double sum = 0;
    for (double& l : per_pos) {
        sum += l;
        l /= double(windows);
    }
    return float(sum / (double(windows) * T));
}

// A score over the masked positions of a batch (an MQAR batch: the answer digits).
struct MaskedScore {
    double accuracy = 0;  // fraction of masked positions whose argmax logit (lowest id on ties) is the target
    double loss = 0;      // mean cross-entropy −log softmax(logits)[target] over them
    long long count = 0;  // masked positions
};

// The score of logits (N, V) against targets (N) at the positions where mask (N) is nonzero (at least one).
inline MaskedScore masked_score(const float* logits, const int* targets, const uint8_t* mask, long long N, int V) {
    HL_CHECK(V > 0, "masked_score: vocabulary size must be positive, got ", V);
    MaskedScore s;
    long long right = 0;
    double loss = 0;
    for (long long i = 0; i < N; i++) {
        if (!mask[i]) continue;
        const float* row = logits + i * V;
        const int y = targets[i];
        HL_CHECK(y >= 0 && y < V, "masked_score: target ", y, " at position ", i, " is outside 0..", V - 1);
        int best = 0;
        for (int v = 1; v < V; v++)
            if (row[v] > row[best]) best = v;
        double z = 0;  // log-sum-exp, shifted by the max for range
        for (int v = 0; v < V; v++) z += std::exp(double(row[v]) - double(row[best]));
        loss += std::log(z) + double(row[best]) - double(row[y]);
        right += best == y;
        s.count++;
    }
    HL_CHECK(s.count > 0, "masked_score: the mask selects no position");
    s.accuracy = double(right) / double(s.count);
    s.loss = loss / double(s.count);
    return s;
}

// MQAR accuracy and masked loss of the model on one batch inputs/targets/mask (B, T) (data/tasks.h's
// mqar_batch): a forward, then masked_score of its logits. The model's activations become (B, T).
inline MaskedScore mqar_accuracy(Model<float>& model, const int* inputs, const int* targets, const uint8_t* mask,
                                 int B, int T) {
    model.forward(inputs, targets, B, T);
    return masked_score(model.logits, targets, mask, (long long)B * T, model.cfg.vocab_size);
}

// One NIAH prompt (data/tasks.h's niah_example): max_new tokens of greedy generation (temperature 0) through
// the cached decoder, scored by niah_correct. The generated text goes to *generated when asked for. The
// cached decoder has no length limit of its own, so prompts may be longer than the training context.
inline bool niah_eval(const Model<float>& model, const std::vector<int>& prompt, const std::string& answer,
                      int max_new, std::string* generated = nullptr) {
    HL_CHECK(model.cfg.vocab_size == ByteTokenizer::vocab_size, "niah_eval: NIAH needs the byte vocabulary (",
             ByteTokenizer::vocab_size, "), this model has ", model.cfg.vocab_size);
    HL_CHECK(max_new > 0, "niah_eval: max_new must be positive, got ", max_new);
    const std::string text = ByteTokenizer().decode(generate_cached(model, prompt, max_new, 0.0f, 0, 0));
    if (generated) *generated = text;
    return niah_correct(text, answer);
}

// ---------------------------------------------------------------------------------------------
// Run checkpoints (safetensors, model/checkpoint.h)
// ---------------------------------------------------------------------------------------------
// Tensors: every parameter under its name (embed, layers.3.mixer.in_proj, ...), the model's buffers (the MoE
// balancing biases layers.{i}.ffn.expert_bias), then the AdamW moments as optim.m.<name> and optim.v.<name>. Metadata: every ModelConfig field (config_to_metadata),
// format, step, loader_rng, plus the caller's extras (e.g. the training flags, for the record).

// Refuses a file that is not one of our checkpoints, before anything else is read from it.
inline void check_run_format(const Checkpoint& ck) {
    auto it = ck.metadata.find("format");
    HL_CHECK(it != ck.metadata.end() && it->second == RUN_FORMAT, "checkpoint '", ck.path,
             "' is not a hybridlm checkpoint: metadata 'format' is ",
             it == ck.metadata.end() ? std::string("missing") : "'" + it->second + "'", ", expected '", RUN_FORMAT,
             "'");
}

inline void save_run(const std::string& path, const Model<float>& model, const std::vector<float>& m,
                     const std::vector<float>& v, const TrainState& state,
                     const std::map<std::string, std::string>& extra = {}) {
    HL_CHECK(m.size() == model.params.size() && v.size() == model.params.size(), "save_run: AdamW moments hold ",
             m.size(), " and ", v.size(), " values, the model has ", model.params.size(), " parameters");
    std::map<std::string, std::string> meta = config_to_metadata(model.cfg);
    meta["format"] = RUN_FORMAT;
    meta["step"] = std::to_string(state.step);
    meta["loader_rng"] = std::to_string(state.loader_rng);
    for (const auto& kv : extra) {
        HL_CHECK(meta.count(kv.first) == 0, "save_run: extra metadata '", kv.first, "' would replace a reserved key");
        meta[kv.first] = kv.second;
    }
    auto tensors = tensor_views(model.tensors, model.params.data());
    for (auto& t : tensor_views(model.buffer_tensors, model.buffers.data())) tensors.push_back(std::move(t));
    for (auto& t : tensor_views(model.tensors, m.data(), "optim.m.")) tensors.push_back(std::move(t));
    for (auto& t : tensor_views(model.tensors, v.data(), "optim.v.")) tensors.push_back(std::move(t));
    save_safetensors(path, tensors, meta);
}

// Restores a run: the checkpoint's config must equal model.cfg field by field (else "checkpoint 'p':
// saved with d_model=32, this run has d_model=128"); then parameters, m and v are replaced and the
// step and loader RNG returned. Everything is read and checked before the model is touched, so a
// refused checkpoint leaves model, m and v as they were.
inline TrainState load_run(const std::string& path, Model<float>& model, std::vector<float>& m, std::vector<float>& v) {
    Checkpoint ck = load_safetensors(path);
    check_run_format(ck);
    check_metadata(ck, config_to_metadata(model.cfg));
    const size_t n = model.params.size();
    std::vector<float> params(n), m_new(n), v_new(n), buffers(model.buffers.size());
    load_into(ck, model.tensors, params.data());
    load_into(ck, model.buffer_tensors, buffers.data());
    load_into(ck, model.tensors, m_new.data(), "optim.m.");
    load_into(ck, model.tensors, v_new.data(), "optim.v.");
    TrainState state;
    const uint64_t step = meta_u64(ck, "step");
    HL_CHECK(step <= uint64_t(INT_MAX), "checkpoint '", path, "': step ", step, " is out of range");
    state.step = int(step);
    state.loader_rng = meta_u64(ck, "loader_rng");
    std::copy(params.begin(), params.end(), model.params.begin());
    std::copy(buffers.begin(), buffers.end(), model.buffers.begin());
    m = std::move(m_new);
    v = std::move(v_new);
    return state;
}

// For sampling from a checkpoint without knowing its flags: the config from its metadata.
inline ModelConfig checkpoint_config(const Checkpoint& ck) {
    check_run_format(ck);
    return config_from_metadata(ck.metadata, "checkpoint '" + ck.path + "'");
}

// The parameters (and buffers) of a checkpoint into a model built from checkpoint_config (moments are ignored).
inline void load_params(const Checkpoint& ck, Model<float>& model) {
    std::vector<float> buffers(model.buffers.size());
    load_into(ck, model.buffer_tensors, buffers.data());  // checked before the model is touched
    load_into(ck, model.tensors, model.params.data());
    model.buffers = std::move(buffers);
}

// ---------------------------------------------------------------------------------------------
// Sampling
// ---------------------------------------------------------------------------------------------

// n_tokens of text continuing `prompt` (the continuation only; an empty prompt starts from a newline),
// through the cached decoder of model/generate.h — attention layers keep a KV cache, Mamba-2 layers their conv
// and SSM state — sampled with temperature and top_k (sample_token) from a seeded stream. Byte vocabulary only.
// on_text, if given, sees each new byte as it is sampled (streaming). The same for the GPU model (kernels/
// generate.cuh): its generate_cached is found by argument-dependent lookup.
template <typename Model_>
std::string generate(const Model_& model, const std::string& prompt, int n_tokens, float temperature, int top_k,
                     uint64_t seed, const std::function<void(const std::string&)>& on_text = {}) {
    HL_CHECK(model.cfg.vocab_size == ByteTokenizer::vocab_size, "generate: text needs the byte vocabulary (",
             ByteTokenizer::vocab_size, "), this model has ", model.cfg.vocab_size);
    HL_CHECK(n_tokens >= 0, "generate: n_tokens must be non-negative, got ", n_tokens);
    ByteTokenizer tok;
    const std::vector<int> context = tok.encode(prompt.empty() ? std::string("\n") : prompt);
    std::function<void(int)> on_token;
    if (on_text) on_token = [&](int id) { on_text(tok.decode_token(id)); };
    return tok.decode(generate_cached(model, context, n_tokens, temperature, top_k, seed, on_token));
}

// ---------------------------------------------------------------------------------------------
// Progress line
// ---------------------------------------------------------------------------------------------

// 5130 → "5.1k", 950 → "950", 2.3e6 → "2.3M"
inline std::string human_rate(double x) {
    char buf[32];
    if (x >= 1e6) std::snprintf(buf, sizeof buf, "%.1fM", x / 1e6);
    else if (x >= 1e3) std::snprintf(buf, sizeof buf, "%.1fk", x / 1e3);
    else std::snprintf(buf, sizeof buf, "%.0f", x);
    return buf;
}

// 42 → "42s", 72 → "1m12s", 3725 → "1h02m"
inline std::string human_duration(double seconds) {
    const long s = seconds > 0 ? long(seconds + 0.5) : 0;
    char buf[32];
    if (s < 60) std::snprintf(buf, sizeof buf, "%lds", s);
    else if (s < 3600) std::snprintf(buf, sizeof buf, "%ldm%02lds", s / 60, s % 60);
    else std::snprintf(buf, sizeof buf, "%ldh%02ldm", s / 3600, (s % 3600) / 60);
    return buf;
}

// "step 120/600 | loss 2.3412 | lr 1.2e-03 | norm 0.83 | 5.1k tok/s | ETA 1m12s", and with MoE each expert's
// share of the step's tokens in percent: " | experts % 13 12 11 14 12 13 12 13"
inline std::string progress_line(int step, int total, const StepStats& s, double tokens_per_s, double eta_s) {
    char buf[160];
    std::snprintf(buf, sizeof buf, "step %d/%d | loss %.4f | lr %.1e | norm %.2f | %s tok/s | ETA %s", step, total,
                  double(s.loss), double(s.lr), double(s.grad_norm), human_rate(tokens_per_s).c_str(),
                  human_duration(eta_s).c_str());
    std::string line = buf;
    if (s.n_experts > 0) line += " | experts %";
    for (int e = 0; e < s.n_experts; e++) {
        std::snprintf(buf, sizeof buf, " %.0f", 100.0 * s.expert_share[e]);
        line += buf;
    }
    return line;
}

// One row of log.csv (the header is open_log's): step, train_loss, val_loss (empty without validation), lr,
// grad_norm, tokens_per_s and, with MoE, expert_share: the shares separated by spaces.
inline std::string log_row(int step, const StepStats& s, const std::string& val, double tokens_per_s) {
    char buf[160];
    std::snprintf(buf, sizeof buf, "%d,%.6f,%s,%.6e,%.6f,%.1f", step, double(s.loss), val.c_str(), double(s.lr),
                  double(s.grad_norm), tokens_per_s);
    std::string row = buf;
    for (int e = 0; e < s.n_experts; e++) {
        std::snprintf(buf, sizeof buf, "%s%.4f", e == 0 ? "," : " ", double(s.expert_share[e]));
        row += buf;
    }
    return row;
}

// ---- host helpers shared by train_cpu.cpp and train.cu: the run folder, its CSV log, its metadata ----

// mkdir -p: every missing folder of path, in order.
inline void make_dirs(const std::string& path) {
    for (size_t i = 1; i <= path.size(); i++) {
        if (i < path.size() && path[i] != '/') continue;
        const std::string part = path.substr(0, i);
        struct stat st;
        if (stat(part.c_str(), &st) == 0) {
            HL_CHECK(S_ISDIR(st.st_mode), "--out: '", part, "' exists and is not a folder");
            continue;
        }
        if (mkdir(part.c_str(), 0755) != 0 && errno != EEXIST)
            fail("--out: cannot create folder '", part, "': ", std::strerror(errno));
    }
}

// The CSV log of a run. A fresh run starts it over; a resumed run keeps the rows up to the
// checkpoint's step (dropping rows of steps it will redo) and appends, so the file is one curve.
inline std::FILE* open_log(const std::string& path, int resume_step, bool moe = false) {
    std::vector<std::string> keep;
    if (resume_step > 0) {
        std::ifstream in(path);
        std::string line;
        bool header = true;
        while (std::getline(in, line)) {
            if (header) { header = false; continue; }
            if (!line.empty() && std::atoi(line.c_str()) <= resume_step) keep.push_back(line);
        }
    }
    std::FILE* f = std::fopen(path.c_str(), "w");
    if (!f) fail("cannot write the log '", path, "': ", std::strerror(errno));
    std::fprintf(f, "step,train_loss,val_loss,lr,grad_norm,tokens_per_s%s\n", moe ? ",expert_share" : "");
    for (const std::string& line : keep) std::fprintf(f, "%s\n", line.c_str());
    std::fflush(f);
    return f;
}

// The training flags as metadata, for the record .
inline std::map<std::string, std::string> train_metadata(const TrainFlags& t, const ModelFlags& mf, const std::string& data) {
    return {{"train.seq_len", std::to_string(mf.seq_len)},  {"train.batch", std::to_string(t.batch)},
            {"train.steps", std::to_string(t.steps)},       {"train.warmup", std::to_string(t.warmup)},
            {"train.lr", std::to_string(t.lr)},             {"train.min_lr_frac", std::to_string(t.min_lr_frac)},
            {"train.weight_decay", std::to_string(t.weight_decay)},
            {"train.grad_clip", std::to_string(t.grad_clip)}, {"train.seed", std::to_string(t.seed)},
            {"train.data", data}};
}

}  // namespace hl
