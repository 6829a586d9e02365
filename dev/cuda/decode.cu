// dev/cuda/decode.cu — cached decoding on the GPU (kernels/generate.cuh) against context length, for the four
// families (transformer, mamba2, inter, intra final) at preset 100m (or the one given), one sequence (B = 1):
//   prefill   model_prefill of `ctx` random tokens: a loop of model_step, one position after another (the
//             chunked training forward does not hand back the caches), so it is ctx × a decode step;
//   forward   next to it, the training forward over the same (1, ctx) batch (GpuModel::forward, no cache out):
//             what a chunked prefill could cost;
//   decode    the mean time per token of DECODE_STEPS steps right after the prefill (positions ctx, ctx + 1, …),
//             queued back to back with no host sync between them (sampling on the host would add one logits
//             download per token);
//   cache     the measured GpuInferenceState::cache_bytes() of a state holding ctx + DECODE_STEPS positions, next
//             to model/config.h's formula_cache_bytes at the same length × 2: the GPU state is fp32, the formula
//             counts bf16 (2 bytes a number). The formula counts d_conv conv inputs per Mamba layer; the state
//             keeps d_conv − 1 (the newest input arrives with the step), so M layers measure a little below it.
// First an untimed check: 16 positions of GPU step logits against the CPU's model_step (model/generate.h in float
// on the host), per family, printed as rel err = max |gpu − cpu| / max |cpu|.
// The decode step is launch-bound at B = 1 (≈ 15 launches per layer); the attention step is one block per
// (b, h) walking the cache with an online softmax, so its share grows with ctx for the A and H layers while M
// layers stay flat.
//
// Build: make dev/cuda/decode   (nvcc with the Makefile's NVFLAGS → build/dev/decode)
// Run:   ./build/dev/decode [preset (100m)] [largest context (8192)]
// Measured: not yet (written without a GPU at hand).
#include <algorithm>               // std::min
#include <cstdio>                  // std::printf
#include <cstdlib>                 // std::atoi
#include <string>                  // std::string
#include <vector>                  // std::vector
#include <cuda_runtime.h>          // cudaEvent_*
#include "dev/cuda/common.cuh"     // rel_err: the playgrounds' shared harness
#include "kernels/common.cuh"      // cudaCheck, DeviceBuffer
#include "kernels/generate.cuh"    // GpuInferenceState, model_step, model_prefill
#include "kernels/model.cuh"       // GpuModel (and its training forward, for comparison)
#include "model/common.h"          // Rng
#include "model/config.h"          // formula_cache_bytes
#include "model/generate.h"        // the CPU reference: InferenceState, model_step
#include "model/model.h"           // Model<float>: the init, uploaded
#include "model/trainer.h"         // ModelFlags, build_config

using hl::gpu::DeviceBuffer;

constexpr int DECODE_STEPS = 32;
constexpr int CHECK_STEPS = 16;

// ms between two events recorded around f() on the default stream (one run)
template <typename F>
float time_ms(F&& f) {
    cudaEvent_t a, b;
    cudaCheck(cudaEventCreate(&a));
    cudaCheck(cudaEventCreate(&b));
    cudaCheck(cudaEventRecord(a));
    f();
    cudaCheck(cudaEventRecord(b));
    cudaCheck(cudaEventSynchronize(b));
    float ms = 0;
    cudaCheck(cudaEventElapsedTime(&ms, a, b));
    cudaCheck(cudaEventDestroy(a));
    cudaCheck(cudaEventDestroy(b));
    return ms;
}

int main(int argc, char** argv) {
    const std::string preset = argc > 1 ? argv[1] : "100m";
    const int max_ctx = argc > 2 ? std::atoi(argv[2]) : 8192;
    const char* archs[] = {"transformer", "mamba2", "inter", "intra"};
    constexpr double MiB = 1024.0 * 1024.0;
    std::printf("cached decoding, preset %s, B = 1, fp32; decode = mean of %d steps after the prefill\n",
                preset.c_str(), DECODE_STEPS);
    for (const char* arch : archs) {
        hl::ModelFlags f;
        f.preset = preset;
        f.arch = arch;
        f.seq_len = 64;
        f.vocab = 256;
        const hl::ModelConfig cfg = hl::build_config(f);
        hl::gpu::GpuModel gpu(cfg, /*train=*/false);
        const int V = cfg.vocab_size;
        DeviceBuffer<float> d_logits((size_t)V);
        hl::Rng rng(1);

        // the untimed check: CHECK_STEPS positions against the CPU
        {
            hl::Model<float> cpu(cfg);
            cpu.init(1234);
            gpu.upload(cpu);
            hl::InferenceState<float> cs(cpu, 1, CHECK_STEPS);
            hl::gpu::GpuInferenceState gs(gpu, 1, CHECK_STEPS);
            std::vector<float> cl((size_t)V);
            DeviceBuffer<int> d_tok(1);
            double worst = 0;
            for (int t = 0; t < CHECK_STEPS; t++) {
                const int tok = int(rng.next() % unsigned(V));
                hl::model_step(cl.data(), cs, cpu, &tok);
                d_tok.upload(&tok);
                hl::gpu::model_step(d_logits.ptr, gs, gpu, d_tok.ptr);
                cudaCheck(cudaDeviceSynchronize());
                worst = std::max(worst, hl::dev::rel_err(d_logits.download(), cl));
            }
            std::printf("\n%s %s (%d layers): step logits vs CPU over %d positions: rel err %.2e\n", arch,
                        cfg.pattern.c_str(), cfg.n_layers, CHECK_STEPS, worst);
        }
        std::printf("  %6s %12s %12s %12s %12s %14s %16s\n", "ctx", "prefill ms", "prefill tok/s", "forward ms",
                    "decode ms/tok", "cache MiB", "formula×2 MiB");
        for (int ctx = 512; ctx <= std::min(max_ctx, cfg.max_seq_len); ctx *= 2) {
            std::vector<int> prompt((size_t)ctx);
            for (int& t : prompt) t = int(rng.next() % unsigned(V));
            hl::gpu::GpuInferenceState st(gpu, 1, ctx + DECODE_STEPS);
            const float prefill = time_ms([&] { hl::gpu::model_prefill(d_logits.ptr, st, gpu, prompt.data(), ctx); });
            // decode: the same token each step (its row of st.tokens), DECODE_STEPS positions
            const int* tok = st.tokens.ptr;  // prompt[0], uploaded by the prefill
            const float decode = time_ms([&] {
                for (int i = 0; i < DECODE_STEPS; i++) hl::gpu::model_step(d_logits.ptr, st, gpu, tok);
            });
            // the training forward over the same batch, for comparison (a second run: the first allocates)
            gpu.set_batch(prompt.data(), nullptr, 1, ctx);
            gpu.forward(gpu.tokens_buf.ptr, nullptr, 1, ctx);
            const float forward = time_ms([&] { gpu.forward(gpu.tokens_buf.ptr, nullptr, 1, ctx); });
            const double formula = 2.0 * hl::formula_cache_bytes(cfg, ctx + DECODE_STEPS);
            std::printf("  %6d %12.2f %12.0f %12.3f %12.4f %14.3f %16.3f\n", ctx, prefill, ctx / (prefill * 1e-3),
                        forward, decode / DECODE_STEPS, st.cache_bytes() / MiB, formula / MiB);
        }
    }
    return 0;
}
