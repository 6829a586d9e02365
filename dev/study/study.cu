// study.cu — the study of dev/study/study.h on the GPU: every family at preset small on tinyshakespeare, matched
// parameters and training FLOPs, the recall tasks, decoding with caches, the CSV and the figures (issue 6).
//
//   make study                                   builds build/study and runs every entry into docs/study
//   build/study --entries 0-5 --device 0 &       or in pieces (several GPUs, several sessions): each entry's
//   build/study --entries 6-11 --device 1        Result goes to docs/study/parts/NN.txt,
//   build/study --merge                          and the merge writes the CSV and the figures
#include <chrono>                 // std::chrono: decode and prefill times
#include <cstdio>                 // std::printf
#include <exception>              // std::exception
#include <string>                 // std::string
#include <vector>                 // std::vector
// CLI11 trips nvcc's front end (warning 2361, a narrowing check in its type traits, harmless), as in train.cu
#pragma nv_diag_suppress 2361
#include <CLI/CLI.hpp>            // CLI::App
#pragma nv_diag_default 2361
#include <cuda_runtime.h>         // cudaMemcpy, cudaDeviceSynchronize
#include "data/loader.h"          // load_tokens, split_tokens
#include "dev/study/study.h"      // StudyConfig, default_entries, run_study
#include "kernels/common.cuh"     // cudaCheck, DeviceBuffer
#include "kernels/generate.cuh"   // gpu::GpuInferenceState, gpu::model_step, gpu::model_prefill
#include "kernels/model.cuh"      // gpu::GpuModel, gpu::train_step_on

namespace {

// The GPU backend of run_study: the model on the device, logits and losses copied back for the evaluations.
struct GpuBackend {
    hl::gpu::GpuModel model;
    std::vector<float> logit_buf, loss_buf;

    GpuBackend(const hl::ModelConfig& cfg, uint64_t seed) : model(cfg) {
        hl::Model<float> host(cfg);
        host.init(seed);
        model.upload(host);
    }
    hl::StepStats train(const int* in, const int* tg, int B, int T, int step, const hl::TrainFlags& f,
                        const float* loss_weights = nullptr) {
        return hl::gpu::train_step_on(model, in, tg, B, T, step, f, {}, loss_weights);
    }
    void forward(const int* in, const int* tg, int B, int T) {
        model.set_batch(in, tg, B, T);
        model.forward(model.tokens_buf.ptr, model.targets_buf.ptr, B, T);
        const size_t n = (size_t)B * T;
        logit_buf.resize(n * model.cfg.vocab_size);
        loss_buf.resize(n);
        cudaCheck(cudaMemcpy(logit_buf.data(), model.logits, logit_buf.size() * sizeof(float), cudaMemcpyDeviceToHost));
        cudaCheck(cudaMemcpy(loss_buf.data(), model.losses, n * sizeof(float), cudaMemcpyDeviceToHost));
    }
    const std::vector<float>& logits() const { return logit_buf; }
    const std::vector<float>& losses() const { return loss_buf; }
    void to_host(hl::Model<float>& host) const { model.download(host); }
    // the prefill: the parallel forward over L_ctx tokens at batch 1 (timed after one untimed pass at that shape,
    // which allocates its activations); then the context through the cached decoder and 32 timed steps
    double decode_ms(int L_ctx, size_t* cache_bytes, double* prefill_ms) {
        const int n_timed = 32;
        std::vector<int> prompt(size_t(L_ctx), '\n');
        model.set_batch(prompt.data(), nullptr, 1, L_ctx);
        model.forward(model.tokens_buf.ptr, nullptr, 1, L_ctx);
        cudaCheck(cudaDeviceSynchronize());
        const auto p0 = std::chrono::steady_clock::now();
        model.forward(model.tokens_buf.ptr, nullptr, 1, L_ctx);
        cudaCheck(cudaDeviceSynchronize());
        *prefill_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - p0).count();
        hl::gpu::GpuInferenceState st(model, 1, L_ctx + n_timed);
        hl::gpu::DeviceBuffer<float> logits(size_t(model.cfg.vocab_size));
        hl::gpu::DeviceBuffer<int> tok(1);
        hl::gpu::model_prefill(logits.ptr, st, model, prompt.data(), L_ctx);
        const int nl = '\n';
        tok.upload(&nl);
        cudaCheck(cudaDeviceSynchronize());
        const auto t0 = std::chrono::steady_clock::now();
        for (int i = 0; i < n_timed; i++) hl::gpu::model_step(logits.ptr, st, model, tok.ptr);
        cudaCheck(cudaDeviceSynchronize());
        const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
        *cache_bytes = hl::gpu::GpuInferenceState(model, 1, L_ctx).cache_bytes();  // the cache of L_ctx tokens
        return ms / n_timed;
    }
};

}  // namespace

int main(int argc, char** argv) {
    CLI::App app{"study — the paper's comparisons at a small scale on the GPU (dev/study/study.h)"};
    hl::study::StudyConfig sc;
    std::string preset = "small", entries;
    bool merge_only = false, inference_only = false;
    int device = 0;
    sc.out = "docs/study", sc.steps = 1000, sc.task_steps = 1500;
    app.add_option("--out", sc.out, "folder of results.csv, the figures and parts/ (one file per entry)");
    app.add_option("--preset", preset, "model size of every entry")->check(CLI::IsMember({"tiny", "small", "100m"}));
    app.add_option("--steps", sc.steps, "the transformer's text steps; the FLOPs budget of every entry")
        ->check(CLI::Range(1, 1000000));
    app.add_option("--task-steps", sc.task_steps, "training steps of each recall task")->check(CLI::Range(1, 1000000));
    app.add_option("--entries", entries, "only entries FIRST-LAST (0-based, inclusive), into parts/; no merge");
    app.add_flag("--merge", merge_only, "only the merge: parts/ of every entry into the CSV and the figures");
    app.add_flag("--inference-only", inference_only, "only measure inference again (decode, prefill, cache) for the "
                 "--entries (default all) on fresh models, into their existing parts; no merge");
    app.add_option("--device", device, "CUDA device")->check(CLI::Range(0, 63));
    app.add_flag_callback("--list", [] {
        const auto es = hl::study::default_entries("small");
        for (size_t i = 0; i < es.size(); i++) std::printf("%2zu %s\n", i, es[i].name.c_str());
        throw CLI::Success();
    }, "print the entries with their indices");
    try {
        app.parse(argc, argv);
    } catch (const CLI::ParseError& e) {
        return app.exit(e);
    }
    try {
        sc.entries = hl::study::default_entries(preset);
        size_t first = 0, last = sc.entries.size();
        if (!entries.empty()) {  // "A" or "A-B"
            const size_t dash = entries.find('-');
            auto number = [&](const std::string& t) {
                HL_CHECK(!t.empty() && t.size() < 6 && t.find_first_not_of("0123456789") == std::string::npos,
                         "--entries must be FIRST-LAST within 0-", last - 1, ", got '", entries, "'");
                return std::stoi(t);
            };
            const int a = number(entries.substr(0, dash));
            const int b = dash == std::string::npos ? a : number(entries.substr(dash + 1));
            HL_CHECK(a <= b && b < int(last), "--entries must be FIRST-LAST within 0-", last - 1, ", got '", entries,
                     "'");
            first = size_t(a), last = size_t(b) + 1;
        }
        sc.B = 32, sc.T = 256, sc.eval_every = 100, sc.eval_batches = 8, sc.long_T = 1024;
        sc.train.lr = 2e-3f, sc.train.warmup = 100;
        sc.task_B = 32, sc.task_T = 256, sc.task_lengths = {256, 512, 1024, 2048};
        sc.task_eval_examples = 32;
        sc.decode_lengths = {256, 1024, 4096, 8192};
        HL_CHECK(!(merge_only && inference_only), "--merge and --inference-only exclude each other");
        if (inference_only) {
            cudaCheck(cudaSetDevice(device));
            hl::study::remeasure_inference<GpuBackend>(sc, first, last);
        } else if (!merge_only) {
            cudaCheck(cudaSetDevice(device));
            const hl::Split split = hl::split_tokens(hl::load_tokens("data/tinyshakespeare.txt"), 0.1);
            hl::study::run_entries<GpuBackend>(sc, first, last, split.train, split.val);
        }
        if (merge_only || (entries.empty() && !inference_only)) {
            hl::study::merge_study(sc);
            std::printf("wrote %s/results.csv and its figures\n", sc.out.c_str());
        }
        return 0;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
}
