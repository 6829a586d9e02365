// test_gpu_generate.cu — cached decoding on the GPU (kernels/generate.cuh) against the CPU's (model/generate.h, in
// float on the host), for each family at preset tiny (B = 2, T = 33): transformer, mamba2, inter, intra (final),
// intra with value=shared (joint add, vector scales), swa (window 5, sink 2: the ring wraps several times below
// T) and inter with the MoE FFN (nonzero balancing biases, so the bias decides routes too):
//   1. every position's step logits equal the CPU model_step's (rel err ≤ FWD_TOL), the scratch poisoned with NaN
//      before the first step (a value read before it is written fails);
//   2. after T steps every cache tensor (KV slots, conv and SSM states) equals the CPU's, view by view, and
//      cache_bytes() equals the CPU InferenceState<float>'s;
//   3. reset(), then model_prefill of the sequences in two pieces (the second at pos ≠ 0) gives the last
//      position's logits;
//   4. greedy generation of 20 tokens equals the CPU's generate_cached token for token, and streams each token;
//   5. hl::generate on the GPU model (train_gpu's text sampler) writes the CPU trainer's text.
// Error norm: rel err = max |gpu − cpu| / max |cpu| per tensor (test/gpu_check.cuh).
#include <doctest/doctest.h>        // TEST_CASE, CHECK, INFO, REQUIRE
#include <algorithm>                // std::max
#include <cstdio>                   // std::printf: the measured errors
#include <string>                   // std::string
#include <vector>                   // std::vector host buffers
#include "kernels/common.cuh"       // DeviceBuffer, cudaCheck
#include "kernels/generate.cuh"     // gpu::GpuInferenceState, gpu::model_step, model_prefill, generate_cached
#include "kernels/model.cuh"        // gpu::GpuModel
#include "model/common.h"           // Rng
#include "model/generate.h"         // the CPU reference: InferenceState, model_step, generate_cached
#include "model/model.h"            // Model<float>
#include "model/trainer.h"          // ModelFlags, build_config, generate (the CPU text sampler)
#include "test/gpu_check.cuh"       // FWD_TOL, rel_err, poison, from_dev

namespace {

using hl::Rng;
using namespace hl::test;  // FWD_TOL, rel_err, poison, from_dev

struct Family {
    const char* arch;
    const char* fusion;
    bool moe = false;
};
const Family FAMILIES[] = {{"transformer", "final"},
                           {"mamba2", "final"},
                           {"inter", "final"},
                           {"intra", "final"},
                           {"intra", "norm=group,scale=vector,op=add,value=shared,out=joint"},
                           {"swa", "final"},
                           {"inter", "final", true}};

hl::ModelConfig family_config(const Family& f, int T) {
    hl::ModelFlags fl;
    fl.preset = "tiny";
    fl.arch = f.arch;
    fl.fusion = f.fusion;
    fl.seq_len = T;
    fl.vocab = 256;
    if (std::string(f.arch) == "swa") fl.window = 5, fl.sink = 2;
    fl.moe = f.moe;
    return hl::build_config(fl);
}

std::string family_tag(const Family& f, const hl::ModelConfig& c) {
    return std::string(f.arch) + " " + c.pattern + (std::string(f.fusion) != "final" ? std::string(" ") + f.fusion : "") +
           (c.count('S') > 0 ? " window " + std::to_string(c.window) + " sink " + std::to_string(c.sink) : "") +
           (f.moe ? " moe" : "");
}

// n device floats at p, downloaded
std::vector<float> download(const float* p, size_t n) {
    cudaCheck(cudaDeviceSynchronize());
    std::vector<float> h(n);
    if (n) cudaCheck(cudaMemcpy(h.data(), p, n * sizeof(float), cudaMemcpyDeviceToHost));
    return h;
}

// One cache tensor: the GPU view (an offset into gs.cache) against the CPU view at the same offset of cs.cache.
// Both states were laid out by model/generate.h's layer_cache, so the offsets must agree; n elements.
void compare_cache_view(const std::string& what, const std::vector<float>& gpu_cache, const float* gpu_base,
                        const float* gpu_view, const std::vector<float>& cpu_cache, const float* cpu_view, size_t n,
                        double& worst) {
    if (!gpu_view && !cpu_view) return;
    REQUIRE(gpu_view != nullptr);
    REQUIRE(cpu_view != nullptr);
    const size_t go = size_t(gpu_view - gpu_base), co = size_t(cpu_view - cpu_cache.data());
    INFO(what, ": offset gpu ", go, " cpu ", co);
    CHECK(go == co);
    REQUIRE(go + n <= gpu_cache.size());
    const double e = rel_err(gpu_cache.data() + go, cpu_view, n);
    worst = std::max(worst, e);
    INFO(what, ": rel err ", e);
    CHECK(e <= FWD_TOL);
}

}  // namespace

TEST_CASE("gpu cached decoding equals the CPU's for each family (tiny, B=2, T=33): step logits, caches, prefill, "
          "greedy generation") {
    const int B = 2, T = 33, n_gen = 20, prompt_len = 9;
    for (const Family& fam : FAMILIES) {
        const hl::ModelConfig cfg = family_config(fam, T);
        const std::string tag = family_tag(fam, cfg);
        const int V = cfg.vocab_size;
        hl::Model<float> cpu(cfg);
        cpu.init(1234);
        Rng rng(77);
        for (float& b : cpu.buffers) b = float(0.05 * rng.normal());  // MoE balancing biases: routes depend on them
        hl::gpu::GpuModel gpu(cfg, /*train=*/false);
        gpu.upload(cpu);
        std::vector<int> tokens((size_t)B * T);
        for (int& t : tokens) t = int(rng.next() % unsigned(V));

        // 1. step by step
        hl::InferenceState<float> cs(cpu, B, T);
        hl::gpu::GpuInferenceState gs(gpu, B, T);
        poison(gs.scratch);  // every scratch value must be written (this step) before it is read
        poison(gs.iscratch);
        std::vector<float> cl((size_t)B * V);
        std::vector<int> col((size_t)B);
        DeviceBuffer<float> d_logits((size_t)B * V);
        DeviceBuffer<int> d_col((size_t)B);
        double worst = 0;
        int worst_t = 0;
        for (int t = 0; t < T; t++) {
            for (int b = 0; b < B; b++) col[size_t(b)] = tokens[(size_t)b * T + t];
            hl::model_step(cl.data(), cs, cpu, col.data());
            d_col.upload(col);
            poison(d_logits);
            hl::gpu::model_step(d_logits.ptr, gs, gpu, d_col.ptr);
            const double e = rel_err(from_dev(d_logits), cl);
            if (!(e <= worst)) worst = e, worst_t = t;
            INFO(tag, " position ", t, ": step logits rel err ", e);
            CHECK(e <= FWD_TOL);
        }
        CHECK(gs.pos == T);
        std::printf("  %-72s step logits, %d positions: worst rel err %.2e at t=%d (tol %.0e)\n", tag.c_str(), T,
                    worst, worst_t, FWD_TOL);

        // 2. the caches after T steps, view by view, and their size
        INFO(tag, ": cache bytes gpu ", gs.cache_bytes(), " cpu ", cs.cache_bytes());
        CHECK(gs.cache_bytes() == cs.cache_bytes());
        REQUIRE(gs.layers.size() == cs.layers.size());
        const std::vector<float> gc = download(gs.cache.ptr, gs.cache.n);
        double worst_cache = 0;
        for (size_t l = 0; l < gs.layers.size(); l++) {
            const hl::LayerCache<float>& g = gs.layers[l];
            const hl::LayerCache<float>& c = cs.layers[l];
            const hl::BlockConfig& bc = cpu.blocks[l];
            const std::string lt = tag + " layer " + std::to_string(l);
            CHECK(g.attn.len == c.attn.len);
            const hl::AttnConfig& ac = bc.kind == 'H' ? bc.intra.attn : bc.attn;
            const hl::Mamba2Config& mc = bc.kind == 'H' ? bc.intra.ssm : bc.ssm;
            const size_t kv = (size_t)B * c.attn.len * ac.n_kv_heads;
            compare_cache_view(lt + " k_cache", gc, gs.cache.ptr, g.attn.k, cs.cache, c.attn.k, kv * ac.d_qk, worst_cache);
            compare_cache_view(lt + " v_cache", gc, gs.cache.ptr, g.attn.v, cs.cache, c.attn.v, kv * ac.d_v, worst_cache);
            if (bc.kind == 'M' || bc.kind == 'H') {
                compare_cache_view(lt + " conv_state", gc, gs.cache.ptr, g.ssm.conv, cs.cache, c.ssm.conv,
                                   (size_t)B * (mc.d_conv - 1) * mc.conv_dim(), worst_cache);
                compare_cache_view(lt + " ssm_state", gc, gs.cache.ptr, g.ssm.ssm, cs.cache, c.ssm.ssm,
                                   (size_t)B * mc.nheads() * mc.headdim * mc.d_state, worst_cache);
            }
        }
        std::printf("  %-72s caches: %zu bytes (cpu %zu), worst rel err %.2e\n", tag.c_str(), gs.cache_bytes(),
                    cs.cache_bytes(), worst_cache);

        // 3. reset, then prefill in two pieces (the second starts at pos ≠ 0): the last position's logits
        gs.reset();
        CHECK(gs.pos == 0);
        const int T1 = T - 5;
        std::vector<int> part1((size_t)B * T1), part2((size_t)B * (T - T1));
        for (int b = 0; b < B; b++)
            for (int t = 0; t < T; t++) {
                if (t < T1) part1[(size_t)b * T1 + t] = tokens[(size_t)b * T + t];
                else part2[(size_t)b * (T - T1) + (t - T1)] = tokens[(size_t)b * T + t];
            }
        poison(d_logits);
        hl::gpu::model_prefill(d_logits.ptr, gs, gpu, part1.data(), T1);
        hl::gpu::model_prefill(d_logits.ptr, gs, gpu, part2.data(), T - T1);
        CHECK(gs.pos == T);
        const double ep = rel_err(from_dev(d_logits), cl);  // cl: the CPU's logits after position T − 1
        std::printf("  %-72s prefill %d + %d after reset: last logits rel err %.2e\n", tag.c_str(), T1, T - T1, ep);
        INFO(tag, ": prefill logits rel err ", ep);
        CHECK(ep <= FWD_TOL);
        CHECK_THROWS_AS(hl::gpu::model_step(d_logits.ptr, gs, gpu, d_col.ptr), hl::Error);  // the state is full

        // 4. greedy generation, the same tokens as the CPU's; streamed as sampled
        const std::vector<int> prompt(tokens.begin(), tokens.begin() + prompt_len);
        const std::vector<int> want = hl::generate_cached(cpu, prompt, n_gen, 0.0f, 0, 42);
        std::vector<int> streamed;
        const std::vector<int> got =
            hl::gpu::generate_cached(gpu, prompt, n_gen, 0.0f, 0, 42, [&](int t) { streamed.push_back(t); });
        int first_diff = -1;
        for (int i = 0; i < n_gen && first_diff < 0; i++)
            if (i >= int(got.size()) || got[size_t(i)] != want[size_t(i)]) first_diff = i;
        std::printf("  %-72s greedy %d tokens: %s\n", tag.c_str(), n_gen,
                    first_diff < 0 ? "equal" : ("differ from token " + std::to_string(first_diff)).c_str());
        INFO(tag, ": greedy generation differs from token ", first_diff);
        CHECK(got == want);
        CHECK(streamed == got);

        // 5. the text sampler train_gpu uses (temperature and top-k, streamed pieces): the CPU trainer's text
        std::string pieces;
        const std::string text =
            hl::generate(gpu, "ROMEO:", n_gen, 0.0f, 0, 7, [&](const std::string& p) { pieces += p; });
        CHECK(text == hl::generate(cpu, "ROMEO:", n_gen, 0.0f, 0, 7));
        CHECK(pieces == text);
        CHECK(hl::generate(gpu, "", 3, 0.8f, 5, 1).size() == 3);  // an empty prompt starts from "\n"
    }
}
