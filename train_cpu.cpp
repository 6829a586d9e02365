// train_cpu.cpp — trains a hybridlm model on the CPU, and samples from a checkpoint.
//
//   train_cpu                                    the small intra-layer hybrid on tinyshakespeare (make train)
//   train_cpu --arch inter --ratio 1:1 --placement sandwich --steps 200
//   train_cpu --resume runs/cpu/model.safetensors --steps 800     continue a run exactly where it stopped
//   train_cpu --sample --load runs/cpu/model.safetensors --prompt "ROMEO:"
//
// A run: AdamW with warmup + cosine, gradient clipping, a progress line every --log-every steps,
// validation loss (and bits per byte) every --eval-every, a sample every --sample-every, a checkpoint
// <out>/model.safetensors every --ckpt-every and at the end, one CSV row per step in <out>/log.csv.
// Bad input of any kind: one line "error: ..." on stderr, exit status 1, and nothing written — every
// flag, the data and a --resume checkpoint are checked before the first file is touched.
#include <CLI/CLI.hpp>          // CLI11: the command line
#include <omp.h>                // omp_set_num_threads, omp_get_max_threads
#include <sys/stat.h>           // mkdir, stat: the output folder
#include <algorithm>            // std::max
#include <cerrno>               // errno
#include <chrono>               // std::chrono::steady_clock: step times
#include <cmath>                // std::log
#include <cstdio>               // std::printf, std::fprintf, std::FILE
#include <cstdlib>              // std::atoi
#include <cstring>              // std::strerror
#include <fstream>              // std::ifstream: the old log on resume
#include <map>                  // std::map: checkpoint metadata
#include <string>               // std::string
#include <vector>               // std::vector
#include "data/loader.h"        // load_tokens, split_tokens, check_vocab, WindowLoader
#include "model/checkpoint.h"   // load_safetensors, meta_get
#include "model/common.h"       // hl::Error, HL_CHECK
#include "model/config.h"       // cost_report, formula_nonembedding_params, human_count
#include "model/model.h"        // Model
#include "model/cli.h"           // add_trainer_flags, RunFlags: the command line shared with train_gpu
#include "model/trainer.h"      // ModelFlags, TrainFlags, build_config, train_step, eval_loss, save/load_run, generate

using namespace hl;

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// --sample --load ckpt: the config from the checkpoint, then text from the prompt.
int sample_main(const std::string& load, const std::string& prompt, const TrainFlags& t) {
    HL_CHECK(!load.empty(), "--sample needs --load <checkpoint>");
    HL_CHECK(t.sample_len > 0, "--sample-len must be positive, got ", t.sample_len);
    HL_CHECK(t.temperature >= 0, "--temperature must be non-negative (0 = greedy), got ", t.temperature);
    HL_CHECK(t.top_k >= 0, "--top-k must be non-negative (0 = all tokens), got ", t.top_k);
    Checkpoint ck = load_safetensors(load);
    ModelConfig cfg = checkpoint_config(ck);
    Model<float> model(cfg);
    load_params(ck, model);
    // streamed as it is sampled; raw bytes, so a sampled 0 byte does not end the text
    std::fwrite(prompt.data(), 1, prompt.size(), stdout);
    generate(model, prompt, t.sample_len, t.temperature, t.top_k, t.seed, [](const std::string& piece) {
        std::fwrite(piece.data(), 1, piece.size(), stdout);
        std::fflush(stdout);
    });
    std::printf("\n");
    return 0;
}

int train_main(const ModelFlags& flags, const TrainFlags& t, const std::string& data_path, const std::string& out,
               const std::string& resume, const std::string& prompt, double val_frac) {
    // ---- every check first: flags, data, config, resume checkpoint; nothing is written before ----
    train_flags_check(t);
    HL_CHECK(!out.empty(), "--out must name a folder");
    std::vector<int> tokens = load_tokens(data_path);
    ModelFlags mf = flags;
    if (mf.vocab == 0) {  // from the data: bytes → 256, a token shard → its largest id + 1
        int max_id = 0;
        for (int tok : tokens) max_id = std::max(max_id, tok);
        mf.vocab = std::max(256, max_id + 1);
    }
    const ModelConfig cfg = build_config(mf);
    check_vocab(tokens, cfg.vocab_size);
    const int B = t.batch, T = mf.seq_len;
    Split split = split_tokens(tokens, val_frac);
    HL_CHECK(split.val.size() >= size_t(T) + 1, "data: '", data_path, "' is too short for --seq-len ", T,
             ": its validation part (the last ", val_frac, ") has ", split.val.size(), " tokens, fewer than ", T + 1);
    HL_CHECK(split.train.size() >= size_t(T) + 1, "data: '", data_path, "' is too short for --seq-len ", T,
             ": its training part has ", split.train.size(), " tokens, fewer than ", T + 1);

    Model<float> model(cfg);
    model.init(t.seed);
    model.alloc(B, T);  // once: every step reuses these activations
    std::vector<float> m(model.params.size(), 0.0f), v(model.params.size(), 0.0f);  // AdamW moments
    std::vector<int> inputs(size_t(B) * T), targets(size_t(B) * T);
    WindowLoader loader(split.train, B, T, t.seed);
    TrainState state;
    if (!resume.empty()) {
        state = load_run(resume, model, m, v);
        loader.set_rng_state(state.loader_rng);
        HL_CHECK(state.step < t.steps, "--resume: checkpoint '", resume, "' is already at step ", state.step,
                 " of --steps ", t.steps, "; raise --steps to train further");
    }
    HL_CHECK(t.stop_at == 0 || t.stop_at > state.step, "--stop-at ", t.stop_at, " is not after the checkpoint's step ",
             state.step);
    const int end = t.stop_at > 0 ? std::min(t.stop_at, t.steps) : t.steps;  // last step of this session
    const bool bytes = cfg.vocab_size == ByteTokenizer::vocab_size;

    // ---- the run ----
    make_dirs(out);
    const std::string ckpt_path = out + "/model.safetensors";
    std::FILE* log = open_log(out + "/log.csv", state.step, cfg.moe);
    const std::map<std::string, std::string> extra = train_metadata(t, mf, data_path);

    std::printf("%s", cost_report(cfg, T).c_str());
    const double n_params = double(model.num_params());
    const double n_embed = double(cfg.vocab_size) * cfg.d_model * (cfg.tied ? 1 : 2);
    std::printf("exact params: %s (%.0f) total, %s (%.0f) non-embedding incl. norms, biases, D, dt_bias "
                "[formula: %.0f]\n",
                human_count(n_params).c_str(), n_params, human_count(n_params - n_embed).c_str(),
                n_params - n_embed, formula_nonembedding_params(cfg));
    std::printf("data: %s, %zu tokens (train %zu, val %zu), vocab %d | batch %d × seq-len %d = %d tokens/step | "
                "%d threads\n",
                data_path.c_str(), tokens.size(), split.train.size(), split.val.size(), cfg.vocab_size, B, T, B * T,
                omp_get_max_threads());
    if (state.step > 0) std::printf("resumed from %s at step %d\n", resume.c_str(), state.step);
    std::printf("training steps %d..%d of %d, lr %.1e (warmup %d, cosine to %.1e), out %s\n", state.step + 1, end,
                t.steps, double(t.lr), t.warmup, double(t.lr * t.min_lr_frac), out.c_str());
    std::fflush(stdout);

    auto sample = [&](int done) {
        if (!bytes) return;  // text needs the byte tokenizer
        // cached decoding keeps its own state, so the training activations are left as they are
        const std::string text =
            prompt + generate(model, prompt, t.sample_len, t.temperature, t.top_k, t.seed + uint64_t(done));
        std::printf("---- sample at step %d ----\n", done);
        std::fwrite(text.data(), 1, text.size(), stdout);  // raw bytes: a sampled 0 byte must not end the text
        std::printf("\n----\n");
        std::fflush(stdout);
    };

    const Clock::time_point run_start = Clock::now();
    const int first = state.step;
    double window_time = 0;  // training time of the steps since the last progress line
    int window_steps = 0;
    for (int step = first; step < end; step++) {
        const Clock::time_point t0 = Clock::now();
        const StepStats s = train_step(model, m, v, inputs.data(), targets.data(), loader, step, t);
        const double dt = seconds_since(t0);
        const int done = step + 1;
        const bool last = done == t.steps;
        window_time += dt;
        window_steps++;

        if (done % t.log_every == 0 || done == end || step == first) {
            const double eta = seconds_since(run_start) / (done - first) * (end - done);
            std::printf("%s\n", progress_line(done, t.steps, s, double(B) * T * window_steps / window_time, eta).c_str());
            std::fflush(stdout);
            window_time = 0;
            window_steps = 0;
        }
        char val_str[32] = "";  // the CSV's val_loss: empty on steps without validation
        if ((t.eval_every > 0 && done % t.eval_every == 0) || last) {
            const float val = eval_loss(model, inputs.data(), targets.data(), split.val, B, T, t.eval_batches);
            std::snprintf(val_str, sizeof val_str, "%.6f", double(val));
            if (bytes) std::printf("val loss %.4f | %.4f bits per byte\n", double(val), double(val) / std::log(2.0));
            else std::printf("val loss %.4f\n", double(val));
            std::fflush(stdout);
        }
        std::fprintf(log, "%s\n", log_row(done, s, val_str, double(B) * T / dt).c_str());
        std::fflush(log);
        if ((t.ckpt_every > 0 && done % t.ckpt_every == 0) || done == end) {
            state.step = done;
            state.loader_rng = loader.rng_state();
            save_run(ckpt_path, model, m, v, state, extra);
        }
        if ((t.sample_every > 0 && done % t.sample_every == 0) || last) sample(done);
    }
    std::fclose(log);
    if (end < t.steps) std::printf("stopped at step %d of %d (--stop-at); continue with --resume %s\n", end, t.steps,
                                   ckpt_path.c_str());
    std::printf("done in %s: checkpoint %s, log %s/log.csv\n", human_duration(seconds_since(run_start)).c_str(),
                ckpt_path.c_str(), out.c_str());
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    Trainer trainer;
    trainer.name = "train_cpu";
    trainer.about =
        "train_cpu — train a transformer / Mamba-2 / hybrid language model on the CPU, or sample from a "
        "checkpoint.\nDefaults train the small intra-layer hybrid on tinyshakespeare in a few minutes (make train).";
    trainer.out = "runs/cpu";
    trainer.text = CliText{"OpenMP threads (0 = all cores); fix it for bit-exact resumes",
                           "sample from --load instead of training",
                           "checkpoint to sample from (its config is read from the file)"};
    trainer.sample_main = sample_main;
    trainer.train_main = train_main;
    return trainer_main(argc, argv, trainer);
}
