// run.h — one training run, shared by train_cpu.cpp and train.cu: the checks before anything is written
// (prepare_run), and the loop (run_training) with its progress lines, validation, CSV log, checkpoints and
// samples. What differs between the CPU and the GPU — where the model lives, how a step, an evaluation, a sample
// and a checkpoint are made — is the trainer's "backend", an object with five members:
//   StepStats step(int step)                 one optimisation step (0-based)
//   float eval()                             the validation loss
//   std::string sample(int done)             text continuing the prompt
//   void save(const TrainState& state)       the checkpoint after state.step steps (every rank calls it; only
//                                            the lead writes, the others give their share of the state)
//   std::string where()                      for the header line: "2 threads", "device NVIDIA H200, fp32"
#pragma once
#include <algorithm>            // std::max, std::min
#include <chrono>               // std::chrono::steady_clock: step times
#include <cmath>                // std::log
#include <cstdio>               // std::printf, std::fprintf, std::FILE
#include <map>                  // std::map: checkpoint metadata
#include <string>               // std::string
#include <vector>               // std::vector
#include "data/loader.h"        // load_tokens, split_tokens, check_vocab, Split, WindowLoader
#include "data/tokenizer.h"     // ByteTokenizer: is the vocabulary bytes?
#include "model/common.h"       // HL_CHECK
#include "model/config.h"       // ModelConfig, cost_report, formula_nonembedding_params, human_count
#include "model/trainer.h"      // ModelFlags, TrainFlags, build_config, StepStats, TrainState, open_log, log_row, ...

namespace hl {

// What a run is made of once every flag and the data have been checked.
struct RunSetup {
    ModelFlags mf;                  // the flags, with the vocabulary read from the data
    ModelConfig cfg;
    std::vector<int> tokens;        // the whole data
    Split split;                    // its training and validation parts
    int B = 0, T = 0;               // batch and sequence length of a step
};

// Checks the flags, reads the data, builds the config; nothing is written. Every problem is one hl::Error line.
inline RunSetup prepare_run(const ModelFlags& flags, const TrainFlags& t, const std::string& data_path,
                            const std::string& out, double val_frac) {
    train_flags_check(t);
    HL_CHECK(!out.empty(), "--out must name a folder");
    RunSetup r;
    r.tokens = load_tokens(data_path);
    r.mf = flags;
    if (r.mf.vocab == 0) {  // from the data: bytes → 256, a token shard → its largest id + 1
        int max_id = 0;
        for (int tok : r.tokens) max_id = std::max(max_id, tok);
        r.mf.vocab = std::max(256, max_id + 1);
    }
    r.cfg = build_config(r.mf);
    check_vocab(r.tokens, r.cfg.vocab_size);
    r.B = t.batch;
    r.T = r.mf.seq_len;
    r.split = split_tokens(r.tokens, val_frac);
    const int T = r.T;
    HL_CHECK(r.split.val.size() >= size_t(T) + 1, "data: '", data_path, "' is too short for --seq-len ", T,
             ": its validation part (the last ", val_frac, ") has ", r.split.val.size(), " tokens, fewer than ",
             T + 1);
    HL_CHECK(r.split.train.size() >= size_t(T) + 1, "data: '", data_path, "' is too short for --seq-len ", T,
             ": its training part has ", r.split.train.size(), " tokens, fewer than ", T + 1);
    return r;
}

// The last step of this session: --stop-at, or --steps. Checks that a resumed run has steps left.
inline int session_end(const TrainFlags& t, const TrainState& state, const std::string& resume) {
    HL_CHECK(resume.empty() || state.step < t.steps, "--resume: checkpoint '", resume, "' is already at step ",
             state.step, " of --steps ", t.steps, "; raise --steps to train further");
    HL_CHECK(t.stop_at == 0 || t.stop_at > state.step, "--stop-at ", t.stop_at,
             " is not after the checkpoint's step ", state.step);
    return t.stop_at > 0 ? std::min(t.stop_at, t.steps) : t.steps;
}

// Steps state.step .. end−1 of the run: a progress line every --log-every steps, validation every --eval-every,
// a checkpoint every --ckpt-every and at the end, a sample every --sample-every and at the last step, one CSV
// row per step in <out>/log.csv. The loader's RNG goes into each checkpoint, so a resumed run continues the
// same data order. n_params: the model's exact parameter count, printed beside the formula's.
// lead = false: a follower rank of a multi-GPU run (train.cu, kernels/dist.cuh) — it only steps, in step with the
// lead rank (its collectives wait for the others); printing, log, validation, checkpoints and samples are the
// lead's alone.
// A checkpoint after `done` steps: every --ckpt-every, and at the session's last step.
inline bool checkpoint_due(const TrainFlags& t, int done, int end) {
    return (t.ckpt_every > 0 && done % t.ckpt_every == 0) || done == end;
}

template <typename Backend>
int run_training(Backend& be, const RunSetup& r, TrainState state, int end, WindowLoader& loader,
                 const TrainFlags& t, const std::string& data_path, const std::string& out,
                 const std::string& resume, double n_params, bool lead = true) {
    if (!lead) {  // the steps, and its share of each checkpoint (a sharded optimizer's moments)
        for (int step = state.step; step < end; step++) {
            be.step(step);
            if (checkpoint_due(t, step + 1, end)) be.save(state);
        }
        return 0;
    }
    using Clock = std::chrono::steady_clock;
    auto seconds_since = [](Clock::time_point t0) {
        return std::chrono::duration<double>(Clock::now() - t0).count();
    };
    const ModelConfig& cfg = r.cfg;
    const int B = r.B, T = r.T;
    const bool bytes = cfg.vocab_size == ByteTokenizer::vocab_size;

    make_dirs(out);
    const std::string ckpt_path = out + "/model.safetensors";
    std::FILE* log = open_log(out + "/log.csv", state.step, cfg.moe);

    std::printf("%s", cost_report(cfg, T).c_str());
    const double n_embed = double(cfg.vocab_size) * cfg.d_model * (cfg.tied ? 1 : 2);
    std::printf("exact params: %s (%.0f) total, %s (%.0f) non-embedding incl. norms, biases, D, dt_bias "
                "[formula: %.0f]\n",
                human_count(n_params).c_str(), n_params, human_count(n_params - n_embed).c_str(),
                n_params - n_embed, formula_nonembedding_params(cfg));
    std::printf("data: %s, %zu tokens (train %zu, val %zu), vocab %d | batch %d × seq-len %d = %d tokens/step | "
                "%s\n",
                data_path.c_str(), r.tokens.size(), r.split.train.size(), r.split.val.size(), cfg.vocab_size, B, T,
                B * T, be.where().c_str());
    if (state.step > 0) std::printf("resumed from %s at step %d\n", resume.c_str(), state.step);
    std::printf("training steps %d..%d of %d, lr %.1e (warmup %d, cosine to %.1e), out %s\n", state.step + 1, end,
                t.steps, double(t.lr), t.warmup, double(t.lr * t.min_lr_frac), out.c_str());
    std::fflush(stdout);

    const Clock::time_point run_start = Clock::now();
    const int first = state.step;
    double window_time = 0, train_time = 0;  // training time since the last progress line / of the session
    int window_steps = 0;
    for (int step = first; step < end; step++) {
        const Clock::time_point t0 = Clock::now();
        const StepStats s = be.step(step);
        const double dt = seconds_since(t0);  // the GPU's step ends with a sync: this is its device time too
        const int done = step + 1;
        const bool last = done == t.steps;
        window_time += dt;
        train_time += dt;
        window_steps++;

        if (done % t.log_every == 0 || done == end || step == first) {
            const double eta = seconds_since(run_start) / (done - first) * (end - done);
            std::printf("%s\n", progress_line(done, t.steps, s, double(B) * T * window_steps / window_time, eta).c_str());
            std::fflush(stdout);
            window_time = 0;
            window_steps = 0;
        }
        std::string val_str;  // the CSV's val_loss: empty on steps without validation
        if ((t.eval_every > 0 && done % t.eval_every == 0) || last) {
            const float val = be.eval();
            char buf[32];
            std::snprintf(buf, sizeof buf, "%.6f", double(val));
            val_str = buf;
            if (bytes) std::printf("val loss %.4f | %.4f bits per byte\n", double(val), double(val) / std::log(2.0));
            else std::printf("val loss %.4f\n", double(val));
            std::fflush(stdout);
        }
        std::fprintf(log, "%s\n", log_row(done, s, val_str, double(B) * T / dt).c_str());
        std::fflush(log);
        if (checkpoint_due(t, done, end)) {
            state.step = done;
            state.loader_rng = loader.rng_state();
            be.save(state);
        }
        if (bytes && ((t.sample_every > 0 && done % t.sample_every == 0) || last)) {  // text needs bytes
            const std::string text = be.sample(done);
            std::printf("---- sample at step %d ----\n", done);
            std::fwrite(text.data(), 1, text.size(), stdout);  // raw bytes: a sampled 0 byte must not end the text
            std::printf("\n----\n");
            std::fflush(stdout);
        }
    }
    std::fclose(log);
    if (end > first)
        std::printf("training throughput: %s tok/s over %d steps (%.2f ms/step, excluding eval, samples, checkpoints)\n",
                    human_rate(double(B) * T * (end - first) / train_time).c_str(), end - first,
                    1e3 * train_time / (end - first));
    if (end < t.steps) std::printf("stopped at step %d of %d (--stop-at); continue with --resume %s\n", end, t.steps,
                                   ckpt_path.c_str());
    std::printf("done in %s: checkpoint %s, log %s/log.csv\n", human_duration(seconds_since(run_start)).c_str(),
                ckpt_path.c_str(), out.c_str());
    return 0;
}

}  // namespace hl
