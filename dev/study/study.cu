// study.cu — the study of dev/study/study.h on the GPU: every family at preset small on tinyshakespeare, matched
// parameters and training FLOPs, the recall tasks, decoding with caches, the CSV and the figures (issue 6).
//
//   make study                      builds build/study and runs it into docs/study
//   build/study [out] [preset] [steps]
#include <cstdio>                 // std::printf
#include <cstdlib>                // std::atoi
#include <exception>              // std::exception
#include <string>                 // std::string
#include <vector>                 // std::vector
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
    hl::StepStats train(const int* in, const int* tg, int B, int T, int step, const hl::TrainFlags& f) {
        return hl::gpu::train_step_on(model, in, tg, B, T, step, f);
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
    // the prompt through the cached decoder (a loop of steps), then 32 timed steps
    double decode_ms(int L_ctx, size_t* cache_bytes) {
        const int n_timed = 32;
        hl::gpu::GpuInferenceState st(model, 1, L_ctx + n_timed);
        hl::gpu::DeviceBuffer<float> logits(size_t(model.cfg.vocab_size));
        hl::gpu::DeviceBuffer<int> tok(1);
        std::vector<int> prompt(size_t(L_ctx), '\n');
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
    try {
        hl::study::StudyConfig sc;
        sc.out = argc > 1 ? argv[1] : "docs/study";
        const std::string preset = argc > 2 ? argv[2] : "small";
        sc.steps = argc > 3 ? std::atoi(argv[3]) : 1000;
        sc.entries = hl::study::default_entries(preset);
        sc.B = 32, sc.T = 256, sc.eval_every = 100, sc.eval_batches = 8, sc.long_T = 1024;
        sc.train.lr = 2e-3f, sc.train.warmup = 100;
        sc.task_steps = 1000, sc.task_B = 32, sc.task_T = 256, sc.task_lengths = {256, 512, 1024, 2048};
        sc.task_eval_examples = 32;
        sc.decode_lengths = {256, 1024, 4096, 8192};
        const hl::Split split = hl::split_tokens(hl::load_tokens("data/tinyshakespeare.txt"), 0.1);
        hl::study::run_study<GpuBackend>(sc, split.train, split.val);
        std::printf("wrote %s/results.csv and its figures\n", sc.out.c_str());
        return 0;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
}
