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
#include <omp.h>                // omp_get_max_threads
#include <cstdint>              // uint64_t
#include <cstdio>               // std::printf, std::fwrite
#include <map>                  // std::map: checkpoint metadata
#include <string>               // std::string
#include <vector>               // std::vector
#include "data/loader.h"        // WindowLoader
#include "model/checkpoint.h"   // load_safetensors
#include "model/common.h"       // HL_CHECK
#include "model/model.h"        // Model
#include "model/cli.h"          // Trainer, trainer_main: the command line shared with train_gpu
#include "model/run.h"          // prepare_run, session_end, run_training: the loop shared with train_gpu
#include "model/trainer.h"      // train_step, eval_loss, save/load_run, generate, checkpoint_config, load_params

using namespace hl;

namespace {

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

// The CPU side of a run (model/run.h): the model, its AdamW moments and the step's batch buffers, in memory.
struct CpuBackend {
    const RunSetup& r;
    const TrainFlags& t;
    WindowLoader& loader;
    Model<float>& model;
    std::vector<float>& m;
    std::vector<float>& v;
    std::string ckpt_path, prompt;
    std::map<std::string, std::string> extra;  // the training flags, recorded in each checkpoint
    std::vector<int> inputs, targets;          // (B, T)

    StepStats step(int step) { return train_step(model, m, v, inputs.data(), targets.data(), loader, step, t); }
    float eval() { return eval_loss(model, inputs.data(), targets.data(), r.split.val, r.B, r.T, t.eval_batches); }
    // cached decoding keeps its own state, so the training activations are left as they are
    std::string sample(int done) {
        return prompt + generate(model, prompt, t.sample_len, t.temperature, t.top_k, t.seed + uint64_t(done));
    }
    void save(const TrainState& state) { save_run(ckpt_path, model, m, v, state, extra); }
    std::string where() const { return std::to_string(omp_get_max_threads()) + " threads"; }
};

int train_main(const ModelFlags& flags, const TrainFlags& t, const std::string& data_path, const std::string& out,
               const std::string& resume, const std::string& prompt, double val_frac) {
    // every check first: flags, data, config, resume checkpoint; nothing is written before
    const RunSetup r = prepare_run(flags, t, data_path, out, val_frac);
    Model<float> model(r.cfg);
    model.init(t.seed);
    model.alloc(r.B, r.T);  // once: every step reuses these activations
    std::vector<float> m(model.params.size(), 0.0f), v(model.params.size(), 0.0f);  // AdamW moments
    WindowLoader loader(r.split.train, r.B, r.T, t.seed);
    TrainState state;
    if (!resume.empty()) {
        state = load_run(resume, model, m, v);
        loader.set_rng_state(state.loader_rng);
    }
    const int end = session_end(t, state, resume);
    CpuBackend be{r, t, loader, model, m, v, out + "/model.safetensors", prompt, train_metadata(t, r.mf, data_path),
                  std::vector<int>(size_t(r.B) * r.T), std::vector<int>(size_t(r.B) * r.T)};
    return run_training(be, r, state, end, loader, t, data_path, out, resume, double(model.num_params()));
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
