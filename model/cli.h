// cli.h — the command line that train_cpu.cpp and train.cu share (CLI11): the same flags, groups, defaults and
// help texts, so a command that works with one trainer works with the other. Each program names itself and
// says in its own words what differs (threads, sampling).
#pragma once
#include <cstdio>             // std::fprintf: the one error line
#include <exception>          // std::exception
#include <string>             // std::string
#include <CLI/CLI.hpp>        // CLI::App
#include <omp.h>              // omp_set_num_threads
#include "model/trainer.h"    // ModelFlags, TrainFlags

namespace hl {

// Flags of the run itself (where the data is, where the run goes, what to sample).
struct RunFlags {
    std::string data = "data/tinyshakespeare.txt", out, resume, load, prompt = "ROMEO:";
    bool sample = false;
    int threads = 0;
    double val_frac = 0.1;
};

// What each trainer says of itself.
struct CliText {
    const char* threads_help;
    const char* sample_help;
    const char* load_help;
};

inline void add_trainer_flags(CLI::App& app, ModelFlags& mf, TrainFlags& t, RunFlags& r, const CliText& text) {
    // the help shows every default; a flag given twice takes its last value (so a script can override)
    app.option_defaults()->always_capture_default()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
    // model
    app.add_option("--preset", mf.preset, "size preset: tiny | small | 100m | 350m | 1b | 3b")->group("Model");
    app.add_option("--arch", mf.arch, "transformer | mamba2 | inter (A and M blocks) | intra (H blocks in M) | "
                                      "swa (sliding-window S blocks, global A in the middle)")
        ->group("Model");
    app.add_option("--pattern", mf.pattern, "layer pattern, one letter per block: A attention, M Mamba-2, "
                                            "H intra-layer hybrid, S sliding-window attention (e.g. MMHMM); "
                                            "replaces the preset's")
        ->group("Model");
    app.add_option("--ratio", mf.ratio, "attention:Mamba block ratio, e.g. 1:5 (H blocks for --arch intra, "
                                        "A blocks otherwise)")
        ->group("Model");
    app.add_option("--placement", mf.placement, "where the ratio's blocks go: middle (default) | front | end | "
                                                "cluster | sandwich")
        ->group("Model");
    app.add_option("--layers", mf.layers, "number of layers with --ratio (0 = the preset's)")->group("Model");
    app.add_option("--fusion", mf.fusion, "intra-layer fusion: final | concat | hymba | falcon, or axes like "
                                          "norm=group,scale=none,op=diff,value=sep,out=sep")
        ->group("Model");
    app.add_flag("--untied", mf.untied, "separate LM head (default: tied to the embedding)")->group("Model");
    app.add_option("--window", mf.window, "S blocks: each query sees the last W tokens (0 = the preset's, 512)")
        ->group("Model");
    app.add_option("--sink", mf.sink, "S blocks: ... and the first S tokens (-1 = the preset's, 64)")->group("Model");
    app.add_option("--chunk", mf.chunk, "M and H blocks: the SSD's chunk length Q (0 = the preset's, 64); the same "
                                        "model and math at any Q, only the speed changes (1..256)")
        ->group("Model");
    app.add_flag("--moe", mf.moe, "mixture-of-experts FFN: 1 shared + top-1 of --experts routed, each half as wide")
        ->group("Model");
    app.add_option("--experts", mf.experts, "routed experts per MoE layer")->group("Model");
    app.add_option("--moe-bias-rate", mf.moe_bias_rate, "MoE balancing: each step the selection bias of an "
                                                        "under- (over-)loaded expert rises (falls) by this")
        ->group("Model");
    mf.vocab = 0;  // from the data unless given
    app.add_option("--vocab", mf.vocab, "vocabulary size (0 = from the data: 256 for text, largest id + 1 for "
                                        ".bin shards)")
        ->group("Model");
    // data and run
    app.add_option("--data", r.data, "training text (bytes) or llm.c .bin token shard")->group("Run");
    app.add_option("--val-frac", r.val_frac, "fraction of the data (at its end) held out for validation")->group("Run");
    app.add_option("--out", r.out, "folder for model.safetensors and log.csv")->group("Run");
    app.add_option("--resume", r.resume, "continue a run from its checkpoint (same flags: the config must match)")
        ->group("Run");
    app.add_option("--stop-at", t.stop_at, "end this session after that step, checkpointed (as if interrupted; "
                                          "the schedule still spans --steps)")
        ->group("Run");
    app.add_option("--threads", r.threads, text.threads_help)->group("Run");
    // optimisation
    app.add_option("--seq-len", mf.seq_len, "training context length T")->group("Optimisation");
    app.add_option("--batch", t.batch, "sequences per step B")->group("Optimisation");
    app.add_option("--steps", t.steps, "total optimisation steps")->group("Optimisation");
    app.add_option("--lr", t.lr, "peak learning rate (AdamW, beta2 0.95)")->group("Optimisation");
    app.add_option("--warmup", t.warmup, "linear warmup steps, then cosine decay")->group("Optimisation");
    app.add_option("--min-lr-frac", t.min_lr_frac, "the cosine ends at this fraction of --lr")->group("Optimisation");
    app.add_option("--weight-decay", t.weight_decay, "AdamW weight decay (matrices only)")->group("Optimisation");
    app.add_option("--grad-clip", t.grad_clip, "clip the global gradient norm to this")->group("Optimisation");
    app.add_option("--seed", t.seed, "seed of the init, the data order and the samples")->group("Optimisation");
    // monitoring
    app.add_option("--log-every", t.log_every, "progress line every N steps")->group("Monitoring");
    app.add_option("--eval-every", t.eval_every, "validation loss every N steps (0 = at the end only)")
        ->group("Monitoring");
    app.add_option("--eval-batches", t.eval_batches, "validation batches per evaluation")->group("Monitoring");
    app.add_option("--ckpt-every", t.ckpt_every, "checkpoint every N steps (0 = at the end only)")->group("Monitoring");
    app.add_option("--sample-every", t.sample_every, "sample every N steps (0 = at the end only)")
        ->group("Monitoring");
    // sampling
    app.add_flag("--sample", r.sample, text.sample_help)->group("Sampling");
    app.add_option("--load", r.load, text.load_help)->group("Sampling");
    app.add_option("--prompt", r.prompt, "text the samples start from")->group("Sampling");
    app.add_option("--sample-len", t.sample_len, "tokens per sample")->group("Sampling");
    app.add_option("--temperature", t.temperature, "sampling temperature (0 = greedy)")->group("Sampling");
    app.add_option("--top-k", t.top_k, "sample among the k likeliest tokens (0 = all)")->group("Sampling");

}

// What a trainer program is: its name and description, its default run folder, its help texts, and its two
// modes — sample from a checkpoint, or train.
struct Trainer {
    const char* name;
    const char* about;
    const char* out;
    CliText text;
    int (*sample_main)(const std::string& load, const std::string& prompt, const TrainFlags& t);
    int (*train_main)(const ModelFlags& mf, const TrainFlags& t, const std::string& data, const std::string& out,
                      const std::string& resume, const std::string& prompt, double val_frac);
    // flags of this trainer only (train_gpu's multi-GPU flags), added after the shared ones; null: none
    void (*add_flags)(CLI::App& app) = nullptr;
};

// main() of both trainers: parse, dispatch, and turn any error into one line "error: ..." with exit status 1.
inline int trainer_main(int argc, char** argv, const Trainer& tr) {
    std::string msg;
    try {
        ModelFlags mf;
        TrainFlags t;
        RunFlags r;
        r.out = tr.out;
        CLI::App app{tr.about, tr.name};
        add_trainer_flags(app, mf, t, r, tr.text);
        if (tr.add_flags) tr.add_flags(app);
        try {
            app.parse(argc, argv);
        } catch (const CLI::Success& e) {  // --help
            return app.exit(e);
        }
        HL_CHECK(r.threads >= 0, "--threads must be non-negative (0 = all cores), got ", r.threads);
        if (r.threads > 0) omp_set_num_threads(r.threads);
        if (r.sample) return tr.sample_main(r.load, r.prompt, t);
        HL_CHECK(r.load.empty(), "--load is for --sample; to continue training use --resume");
        return tr.train_main(mf, t, r.data, r.out, r.resume, r.prompt, r.val_frac);
    } catch (const std::exception& e) {  // hl::Error, CLI11's parse errors, anything else
        msg = e.what();
    }
    for (char& c : msg)  // one line, whatever the message holds
        if (c == '\n' || c == '\r') c = ' ';
    std::fprintf(stderr, "error: %s\n", msg.c_str());
    return 1;
}

}  // namespace hl
