// train.cu — trains a hybridlm model on the GPU (fp32, or bf16 matmuls: --precision), and samples from a
// checkpoint. The same command line,
// data, checkpoint format and sampling as train_cpu.cpp: a checkpoint written by one loads in the other.
//
//   train_gpu                                    the small intra-layer hybrid on tinyshakespeare
//   train_gpu --arch inter --ratio 1:1 --placement sandwich --steps 200
//   train_gpu --resume runs/gpu/model.safetensors --steps 800     continue a run where it stopped
//   train_gpu --sample --load runs/gpu/model.safetensors --prompt "ROMEO:"
//   train_gpu --nccl-init fs:/tmp/id --rank R --world 2 ...      one rank of a 2-GPU run (`make train_gpu NGPU=2`)
//
// Build: nvcc -std=c++17 -O3 -arch=sm_90 -Xcompiler -Wall,-Wextra,-fopenmp -I. -I.deps/include train.cu
//          -o build/train_gpu -lcublas -lnccl          (one line; or `make train_gpu`)
//
// Several GPUs (kernels/dist.cuh): one process per GPU, data parallel. --batch is the global batch, split evenly
// over the ranks, each rank's loader draws the same global batch and keeps its own rows, so N GPUs train on
// exactly the batches of one GPU with the same flags, and a checkpoint of N GPUs resumes on M. Only rank 0 prints,
// evaluates, samples and writes log.csv and checkpoints.
//
// The model lives on the device (kernels/model.cuh: GpuModel); the host keeps a Model<float> only as the
// staging copy of the CPU init and of checkpoints (model/trainer.h's save_run/load_run are reused as they are,
// so the file format is the CPU trainer's). Each step queues forward, backward, clipping and AdamW without a
// host sync and reads {loss, grad norm} back once at the end; the progress line's tok/s is measured on that.
// Sampling runs the cached decoder on the GPU (kernels/generate.cuh: KV caches, conv and SSM states; one step per
// token) and samples on the host from the same seeded stream as the CPU. Bad input: one line "error: ..." on stderr, exit status 1, nothing written.
// CLI11 trips nvcc's front end (warning 2361, a narrowing check inside its type traits, harmless): silenced for
// that header only.
#pragma nv_diag_suppress 2361
#include <CLI/CLI.hpp>           // CLI11: the command line
#pragma nv_diag_default 2361
#include <cstdint>               // uint64_t
#include <cstdio>                // std::printf, std::fwrite
#include <map>                   // std::map: checkpoint metadata
#include <string>                // std::string
#include <vector>                // std::vector
#include <cuda_runtime.h>        // cudaGetDeviceProperties, cudaMemGetInfo
#include "data/loader.h"         // WindowLoader
#include "kernels/common.cuh"    // cudaCheck
#include "kernels/dist.cuh"      // gpu::Dist, gpu::DistFlags, gpu::train_step_dist: several GPUs
#include "kernels/generate.cuh"  // gpu::generate_cached: cached decoding (model/trainer.h's generate calls it)
#include "kernels/model.cuh"     // gpu::GpuModel, gpu::train_step, gpu::eval_loss
#include "model/checkpoint.h"    // load_safetensors
#include "model/common.h"        // HL_CHECK
#include "model/model.h"         // Model<float>: the host staging copy
#include "model/cli.h"           // Trainer, trainer_main: the command line shared with train_cpu
#include "model/run.h"           // prepare_run, session_end, run_training: the loop shared with train_cpu
#include "model/trainer.h"       // save/load_run, checkpoint_config, load_params

using namespace hl;

namespace {

gpu::DistFlags dist_flags;          // --nccl-init, --rank, --world (set by the parser, read by train_main)
gpu::DataParallelFlags dp_flags;    // --bucket-mb, --zero1
std::string precision = "fp32";     // --precision
bool ssd_tc_off = false;            // --no-ssd-tensor-cores

// the flags train_cpu does not have: precision and several GPUs
void add_gpu_flags(CLI::App& app) {
    app.add_option("--precision", precision, "fp32, or bf16: every matmul on bf16 operands (tensor cores, fp32 "
                                             "accumulation); activations, master weights and AdamW stay fp32")
        ->check(CLI::IsMember({"fp32", "bf16"}));
    app.add_flag("--no-ssd-tensor-cores", ssd_tc_off, "with --precision bf16: keep the SSD scan's block products in "
                                                      "fp32 (by default they run on the tensor cores too)");
    app.add_option("--nccl-init", dist_flags.nccl_init, "several GPUs: fs:PATH, a file every rank sees, through "
                                                        "which the ranks meet (empty = one GPU)")
        ->group("Multi-GPU");
    app.add_option("--rank", dist_flags.rank, "this process's rank (-1 = $RANK or $OMPI_COMM_WORLD_RANK, else 0)")
        ->group("Multi-GPU");
    app.add_option("--world", dist_flags.world, "number of ranks (0 = $WORLD_SIZE or $OMPI_COMM_WORLD_SIZE, else 1); "
                                                "--batch is split evenly over them")
        ->group("Multi-GPU");
    app.add_option("--bucket-mb", dp_flags.bucket_mb, "gradients all-reduced in buckets of about this many MB while "
                                                      "the backward runs (0 = one all-reduce after it)")
        ->check(CLI::Range(0.0, 1e6))
        ->group("Multi-GPU");
    app.add_flag("--zero1", dp_flags.zero1, "ZeRO-1: AdamW moments sharded over the ranks (reduce-scatter the "
                                            "gradients, update a shard, all-gather the parameters)")
        ->group("Multi-GPU");
}

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
    HL_CHECK(dist_flags.nccl_init.empty() && dist_flags.world <= 1, "--nccl-init / --world are for training; "
             "--sample runs on one GPU");
    HL_CHECK(t.sample_len > 0, "--sample-len must be positive, got ", t.sample_len);
    HL_CHECK(t.temperature >= 0, "--temperature must be non-negative (0 = greedy), got ", t.temperature);
    HL_CHECK(t.top_k >= 0, "--top-k must be non-negative (0 = all tokens), got ", t.top_k);
    Checkpoint ck = load_safetensors(load);
    ModelConfig cfg = checkpoint_config(ck);
    Model<float> host(cfg);
    load_params(ck, host);
    gpu::GpuModel model(cfg, /*train=*/false);
    model.upload(host);
    // streamed as it is sampled; raw bytes, so a sampled 0 byte does not end the text
    std::fwrite(prompt.data(), 1, prompt.size(), stdout);
    generate(model, prompt, t.sample_len, t.temperature, t.top_k, t.seed, [](const std::string& piece) {
        std::fwrite(piece.data(), 1, piece.size(), stdout);
        std::fflush(stdout);
    });
    std::printf("\n");
    return 0;
}

// The GPU side of a run (model/run.h): the model and its AdamW moments on the device, a host Model<float> as the
// staging copy of checkpoints, and a second device copy at batch 1 for sampling (so sampling never reshapes the
// training activations). On several GPUs, each rank's model runs B_rank = B / world rows of the global batch.
struct GpuBackend {
    const RunSetup& r;
    const TrainFlags& t;
    const gpu::Dist& dist;
    gpu::DataParallel& dp;
    WindowLoader& loader;
    gpu::GpuModel& model;
    Model<float>& host;
    std::string ckpt_path, prompt;
    std::map<std::string, std::string> extra;  // the training flags, recorded in each checkpoint
    std::vector<int> inputs, targets;          // (B, T) host staging of the global batch

    int rank_rows() const { return r.B / dist.world; }
    StepStats step(int step) {
        loader.next(inputs.data(), targets.data());  // the same global batch on every rank
        const size_t first = size_t(dist.rank) * rank_rows() * r.T;  // this rank's rows
        return gpu::train_step_dist(dp, inputs.data() + first, targets.data() + first, rank_rows(), r.T, step, t);
    }
    // (lead rank only) the 1-GPU run's windows: --eval-batches batches of B are world times as many of B_rank
    float eval() {
        return gpu::eval_loss(model, inputs.data(), targets.data(), r.split.val, rank_rows(), r.T,
                              t.eval_batches * dist.world);
    }
    // the cached decoder reads the parameters only: the training activations are left as they are
    std::string sample(int done) {
        return prompt + generate(model, prompt, t.sample_len, t.temperature, t.top_k, t.seed + uint64_t(done));
    }
    // every rank calls it (ZeRO-1's moments are gathered from all of them); the lead writes the file
    void save(const TrainState& state) {
        std::vector<float> m, v;
        dp.gather_moments(m, v);
        if (!dist.lead()) return;
        model.download(host);
        save_run(ckpt_path, host, m, v, state, extra);
    }
    std::string where() const {
        const std::string prec = std::string(", ") + gpu::precision_name(model.precision);
        if (dist.world == 1) return "device " + device_name() + prec;
        return std::to_string(dist.world) + " × device " + device_name() + " (NCCL, " + std::to_string(rank_rows()) +
               " rows each, " + (dp.flags.zero1 ? std::string("ZeRO-1") : bucket_text()) + ")" + prec;
    }
    std::string bucket_text() const {
        if (dp.buckets.empty()) return "one all-reduce after the backward";
        return std::to_string(dp.buckets.size()) + " all-reduce buckets overlapped with the backward";
    }
};

int train_main(const ModelFlags& flags, const TrainFlags& t, const std::string& data_path, const std::string& out,
               const std::string& resume, const std::string& prompt, double val_frac) {
    // every check first: flags, data, config, resume checkpoint; nothing is written before
    const RunSetup r = prepare_run(flags, t, data_path, out, val_frac);
    gpu::Dist dist;
    dist.configure(dist_flags);
    HL_CHECK(r.B % dist.world == 0, "--batch ", r.B, " (the global batch) must be a multiple of --world ", dist.world);
    HL_CHECK(dist.world == 1 || !r.cfg.moe, "--moe is not supported on several GPUs yet");
    Model<float> host(r.cfg);  // the CPU init, and the staging copy of checkpoints
    host.init(t.seed);
    std::vector<float> m(host.params.size(), 0.0f), v(host.params.size(), 0.0f);  // AdamW moments (host copies)
    WindowLoader loader(r.split.train, r.B, r.T, t.seed);
    TrainState state;
    if (!resume.empty()) {
        state = load_run(resume, host, m, v);
        loader.set_rng_state(state.loader_rng);
    }
    const int end = session_end(t, state, resume);
    dist.connect();  // before any other CUDA call: it picks this rank's GPU

    const int shards = dp_flags.zero1 ? dist.world : 1;
    gpu::GpuModel model(r.cfg, /*train=*/true, shards, dp_flags.zero1 ? dist.rank : 0);
    model.upload(host);
    model.upload_moments(m, v);  // (ZeRO-1: this rank's shard of them)
    model.set_precision(precision == "bf16" ? gpu::Precision::bf16 : gpu::Precision::fp32);
    HL_CHECK(!ssd_tc_off || precision == "bf16", "--no-ssd-tensor-cores needs --precision bf16");
    const bool ssd_tc = precision == "bf16" && !ssd_tc_off;
    gpu::ssd_detail::ssd_tensor_cores() = ssd_tc;
    dist.broadcast(model.params.ptr, model.params.n, model.stream);  // every rank starts from the lead's state
    model.params_changed();
    if (!model.sharded()) {
        dist.broadcast(model.m.ptr, model.m.n, model.stream);
        dist.broadcast(model.v.ptr, model.v.n, model.stream);
    }
    gpu::DataParallel dp(dist, model, t, dp_flags);
    model.alloc(r.B / dist.world, r.T);  // once: every step reuses these activations
    GpuBackend be{r, t, dist, dp, loader, model, host, out + "/model.safetensors", prompt,
                  train_metadata(t, r.mf, data_path), std::vector<int>(size_t(r.B) * r.T),
                  std::vector<int>(size_t(r.B) * r.T)};
    be.extra["precision"] = precision + (ssd_tc_off ? " (ssd fp32)" : "");
    const int rc = run_training(be, r, state, end, loader, t, data_path, out, resume, double(model.num_params()),
                                dist.lead());
    if (dist.lead()) {  // what the run held on the device (our buffers are plain cudaMallocs: no caching allocator)
        size_t free = 0, total = 0;
        cudaCheck(cudaMemGetInfo(&free, &total));
        std::printf("device memory in use: %.2f GiB of %.2f GiB\n", double(total - free) / (1 << 30),
                    double(total) / (1 << 30));
    }
    return rc;
}

}  // namespace

int main(int argc, char** argv) {
    Trainer trainer;
    trainer.name = "train_gpu";
    trainer.about =
        "train_gpu — train a transformer / Mamba-2 / hybrid language model on the GPU (fp32 or bf16 matmuls), or sample "
        "from a checkpoint.\nSame flags, data and checkpoint format as train_cpu (a checkpoint of one loads "
        "in the other). Sampling decodes on the GPU with KV caches and recurrent states and samples on the "
        "host.";
    trainer.out = "runs/gpu";
    trainer.text = CliText{"OpenMP threads of the host-side work (init, checkpoints; 0 = all cores)",
                           "sample from --load instead of training (cached GPU decoding, host-side sampling)",
                           "checkpoint to sample from (its config is read from the file; train_cpu's too)"};
    trainer.sample_main = sample_main;
    trainer.train_main = train_main;
    trainer.add_flags = add_gpu_flags;
    return trainer_main(argc, argv, trainer);
}
