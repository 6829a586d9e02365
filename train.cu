// train.cu — trains a hybridlm model on the GPU (fp32), and samples from a checkpoint. The same command line,
// data, checkpoint format and sampling as train_cpu.cpp: a checkpoint written by one loads in the other.
//
//   train_gpu                                    the small intra-layer hybrid on tinyshakespeare
//   train_gpu --arch inter --ratio 1:1 --placement sandwich --steps 200
//   train_gpu --resume runs/gpu/model.safetensors --steps 800     continue a run where it stopped
//   train_gpu --sample --load runs/gpu/model.safetensors --prompt "ROMEO:"
//
// Build: nvcc -std=c++17 -O3 -arch=sm_90 -Xcompiler -Wall,-Wextra,-fopenmp -I. -I.deps/include train.cu
//          -o build/train_gpu -lcublas          (one line; or `make train_gpu`)
//
// The model lives on the device (kernels/model.cuh: GpuModel); the host keeps a Model<float> only as the
// staging copy of the CPU init and of checkpoints (model/trainer.h's save_run/load_run are reused as they are,
// so the file format is the CPU trainer's). Each step queues forward, backward, clipping and AdamW without a
// host sync and reads {loss, grad norm} back once at the end; the progress line's tok/s is measured on that.
// Sampling runs a full GPU forward over the context window per token and samples on the host (no cached decode
// yet). Bad input: one line "error: ..." on stderr, exit status 1, nothing written.
// CLI11 trips nvcc's front end (warning 2361, a narrowing check inside its type traits, harmless): silenced for
// that header only.
#pragma nv_diag_suppress 2361
#include <CLI/CLI.hpp>           // CLI11: the command line
#pragma nv_diag_default 2361
#include <omp.h>                 // omp_set_num_threads: host-side init and checkpoint code
#include <sys/stat.h>            // mkdir, stat: the output folder
#include <algorithm>             // std::max, std::min
#include <cerrno>                // errno
#include <chrono>                // std::chrono::steady_clock: step times
#include <cmath>                 // std::log
#include <cstdio>                // std::printf, std::fprintf, std::FILE
#include <cstdlib>               // std::atoi
#include <cstring>               // std::strerror
#include <fstream>               // std::ifstream: the old log on resume
#include <map>                   // std::map: checkpoint metadata
#include <string>                // std::string
#include <vector>                // std::vector
#include <cuda_runtime.h>        // cudaGetDeviceProperties
#include "data/loader.h"         // load_tokens, split_tokens, check_vocab, WindowLoader
#include "data/tokenizer.h"      // ByteTokenizer
#include "kernels/model.cuh"     // gpu::GpuModel, gpu::train_step, gpu::eval_loss, gpu::generate
#include "model/checkpoint.h"    // load_safetensors
#include "model/common.h"        // hl::Error, HL_CHECK
#include "model/config.h"        // cost_report, formula_nonembedding_params, human_count
#include "model/model.h"         // Model<float>: the host staging copy
#include "model/cli.h"           // add_trainer_flags, RunFlags: the command line shared with train_cpu
#include "model/trainer.h"       // ModelFlags, TrainFlags, build_config, save/load_run, progress_line, ...

using namespace hl;

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

std::string device_name() {
    int dev = 0;
    cudaCheck(cudaGetDevice(&dev));
    cudaDeviceProp prop;
    cudaCheck(cudaGetDeviceProperties(&prop, dev));
    return prop.name;
}

// --sample --load ckpt: the config from the checkpoint, the parameters onto the device, then text.
int sample_main(const std::string& load, const std::string& prompt, const TrainFlags& t) {
    HL_CHECK(!load.empty(), "--sample needs --load <checkpoint>");
    HL_CHECK(t.sample_len > 0, "--sample-len must be positive, got ", t.sample_len);
    HL_CHECK(t.temperature >= 0, "--temperature must be non-negative (0 = greedy), got ", t.temperature);
    HL_CHECK(t.top_k >= 0, "--top-k must be non-negative (0 = all tokens), got ", t.top_k);
    Checkpoint ck = load_safetensors(load);
    ModelConfig cfg = checkpoint_config(ck);
    Model<float> host(cfg);
    load_params(ck, host);
    gpu::GpuModel model(cfg, /*train=*/false);
    model.upload(host);
    int window = 0;  // the window the model was trained on (beyond it RoPE positions were never seen)
    auto it = ck.metadata.find("train.seq_len");
    if (it != ck.metadata.end()) window = std::min(std::atoi(it->second.c_str()), cfg.max_seq_len);
    const std::string text = prompt + gpu::generate(model, prompt, t.sample_len, t.temperature, t.top_k, t.seed, window);
    std::fwrite(text.data(), 1, text.size(), stdout);  // raw bytes: a sampled 0 byte must not end the text
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
    check_vocab(tokens, mf.vocab);
    const ModelConfig cfg = build_config(mf);
    const int B = t.batch, T = mf.seq_len;
    Split split = split_tokens(tokens, val_frac);
    HL_CHECK(split.val.size() >= size_t(T) + 1, "data: '", data_path, "' is too short for --seq-len ", T,
             ": its validation part (the last ", val_frac, ") has ", split.val.size(), " tokens, fewer than ", T + 1);
    HL_CHECK(split.train.size() >= size_t(T) + 1, "data: '", data_path, "' is too short for --seq-len ", T,
             ": its training part has ", split.train.size(), " tokens, fewer than ", T + 1);

    Model<float> host(cfg);  // the CPU init, and the staging copy of checkpoints
    host.init(t.seed);
    std::vector<float> m(host.params.size(), 0.0f), v(host.params.size(), 0.0f);  // AdamW moments (host copies)
    WindowLoader loader(split.train, B, T, t.seed);
    TrainState state;
    if (!resume.empty()) {
        state = load_run(resume, host, m, v);
        loader.set_rng_state(state.loader_rng);
        HL_CHECK(state.step < t.steps, "--resume: checkpoint '", resume, "' is already at step ", state.step,
                 " of --steps ", t.steps, "; raise --steps to train further");
    }
    HL_CHECK(t.stop_at == 0 || t.stop_at > state.step, "--stop-at ", t.stop_at, " is not after the checkpoint's step ",
             state.step);
    const int end = t.stop_at > 0 ? std::min(t.stop_at, t.steps) : t.steps;  // last step of this session

    gpu::GpuModel model(cfg);
    model.upload(host);
    model.upload_moments(m, v);
    model.alloc(B, T);  // once: every step reuses these activations
    std::vector<int> inputs(size_t(B) * T), targets(size_t(B) * T);
    // the sampler: a second device copy at batch 1 (no gradients), so sampling never reshapes the training
    // activations
    gpu::GpuModel sampler(cfg, /*train=*/false);
    sampler.alloc(1, T);
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
                "device %s, fp32\n",
                data_path.c_str(), tokens.size(), split.train.size(), split.val.size(), cfg.vocab_size, B, T, B * T,
                device_name().c_str());
    if (state.step > 0) std::printf("resumed from %s at step %d\n", resume.c_str(), state.step);
    std::printf("training steps %d..%d of %d, lr %.1e (warmup %d, cosine to %.1e), out %s\n", state.step + 1, end,
                t.steps, double(t.lr), t.warmup, double(t.lr * t.min_lr_frac), out.c_str());
    std::fflush(stdout);

    auto sample = [&](int done) {
        if (!bytes) return;  // text needs the byte tokenizer
        sampler.copy_params_from(model);
        const std::string text =
            prompt + gpu::generate(sampler, prompt, t.sample_len, t.temperature, t.top_k, t.seed + uint64_t(done), T);
        std::printf("---- sample at step %d ----\n", done);
        std::fwrite(text.data(), 1, text.size(), stdout);
        std::printf("\n----\n");
        std::fflush(stdout);
    };
    auto checkpoint = [&](int done) {
        state.step = done;
        state.loader_rng = loader.rng_state();
        model.download(host);
        model.download_moments(m, v);
        save_run(ckpt_path, host, m, v, state, extra);
    };

    const Clock::time_point run_start = Clock::now();
    const int first = state.step;
    double window_time = 0, train_time = 0;  // training time since the last progress line / of the session
    int window_steps = 0;
    for (int step = first; step < end; step++) {
        const Clock::time_point t0 = Clock::now();
        const StepStats s = gpu::train_step(model, inputs.data(), targets.data(), loader, step, t);
        const double dt = seconds_since(t0);  // train_step ends with a sync: this is the step's device time
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
        std::string val_str;
        if ((t.eval_every > 0 && done % t.eval_every == 0) || last) {
            const float val = gpu::eval_loss(model, inputs.data(), targets.data(), split.val, B, T, t.eval_batches);
            char buf[64];
            std::snprintf(buf, sizeof buf, "%.6f", double(val));
            val_str = buf;
            if (bytes) std::printf("val loss %.4f | %.4f bits per byte\n", double(val), double(val) / std::log(2.0));
            else std::printf("val loss %.4f\n", double(val));
            std::fflush(stdout);
        }
        std::fprintf(log, "%s\n", log_row(done, s, val_str, double(B) * T / dt).c_str());
        std::fflush(log);
        if ((t.ckpt_every > 0 && done % t.ckpt_every == 0) || done == end) checkpoint(done);
        if ((t.sample_every > 0 && done % t.sample_every == 0) || last) sample(done);
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

}  // namespace

int main(int argc, char** argv) {
    Trainer trainer;
    trainer.name = "train_gpu";
    trainer.about =
        "train_gpu — train a transformer / Mamba-2 / hybrid language model on the GPU (fp32), or sample "
        "from a checkpoint.\nSame flags, data and checkpoint format as train_cpu (a checkpoint of one loads "
        "in the other). Sampling runs a full GPU forward over the context window for every token and samples "
        "on the host (no cached decode yet).";
    trainer.out = "runs/gpu";
    trainer.text = CliText{"OpenMP threads of the host-side work (init, checkpoints; 0 = all cores)",
                           "sample from --load instead of training (full GPU forward per token, host-side sampling)",
                           "checkpoint to sample from (its config is read from the file; train_cpu's too)"};
    trainer.sample_main = sample_main;
    trainer.train_main = train_main;
    return trainer_main(argc, argv, trainer);
}
