// dist.cuh — data-parallel training over several GPUs with NCCL (issue 7, first version): one process per GPU,
// every rank holds the whole model and the whole AdamW state, runs forward and backward on its own rows of the
// global batch, and the gradients are averaged over the ranks (one all-reduce of the whole fp32 gradient buffer
// after the backward, before clipping), so every rank clips and steps with the same gradients and the
// parameters stay identical without ever being sent.
//
// Rendezvous: the ranks find each other through NCCL's unique id (128 opaque bytes). Rank 0 makes it and writes
// it to a file on a filesystem every rank sees (`--nccl-init fs:PATH`: written to PATH.tmp, then renamed, so a
// reader never sees half a file); the other ranks poll for PATH (with a timeout and a clear error). Rank 0 removes
// PATH once every rank has joined (they all have read it by then), so a launcher may reuse the path. There is no
// MPI dependency: under mpirun the rank and world size come from OpenMPI's environment, the id still goes through
// the file.
//
// Data rule (train.cu): --batch is the GLOBAL batch. Every rank's WindowLoader has the same seed and draws the
// same global batch of --batch rows; rank r trains on rows [r·B/world, (r+1)·B/world). So a run on N GPUs sees
// exactly the batches of a 1-GPU run with the same flags, the loader state is the same on every rank (rank 0's
// checkpoint holds it), and a checkpoint written on N GPUs resumes on M. Each rank's loss is the mean over its own
// B/world·T tokens; the global mean loss is the mean of the ranks' means (equal sizes), hence the averages below.
//
// Gradients travel in fp32 buckets all-reduced while the backward still runs, or (ZeRO-1) reduce-scattered onto
// sharded AdamW state (DataParallel below). Left for later (issue 7): bf16 buckets (with the bf16 work),
// validation shared among the ranks, MoE balancing across ranks (its expert loads would have to be summed over
// the ranks: refused for now).
#pragma once
#include <algorithm>              // std::min, std::max
#include <cerrno>                 // errno: why a rendezvous file could not be written
#include <chrono>                 // std::chrono: the rendezvous timeout
#include <cstdio>                 // std::FILE, std::fopen, std::rename, std::remove
#include <cstdlib>                // std::getenv, setenv, std::atoi
#include <cstdint>                // SIZE_MAX
#include <cstring>                // std::strerror
#include <string>                 // std::string
#include <thread>                 // std::this_thread::sleep_for: polling for the id file
#include <vector>                 // std::vector: buckets, gathered moments
#include <cuda_runtime.h>         // cudaSetDevice, cudaGetDeviceCount, cudaStream_t
#include <nccl.h>                 // ncclComm_t, ncclGetUniqueId, ncclCommInitRank, ncclAllReduce
#include "kernels/common.cuh"     // cudaCheck
#include "kernels/adamw.cuh"      // grad_norm, sqrt_kernel, adamw_update (with the clip)
#include "kernels/model.cuh"      // GpuModel, train_step_on, StepHooks
#include "model/adamw.h"          // AdamWConfig
#include "model/common.h"         // HL_CHECK, hl::fail
#include "model/trainer.h"        // StepStats, TrainFlags, lr_at

namespace hl::gpu {

// A failed NCCL call (a peer that died, a network error) is reported like a CUDA one: where, and stop.
inline void nccl_check(ncclResult_t r, const char* file, int line) {
    if (r != ncclSuccess) {
        std::fprintf(stderr, "error: NCCL %s at %s:%d\n", ncclGetErrorString(r), file, line);
        std::exit(1);
    }
}
#define ncclCheck(call) ::hl::gpu::nccl_check((call), __FILE__, __LINE__)

// How the ranks are told apart and how they meet; from the command line, with defaults from the environment.
struct DistFlags {
    std::string nccl_init;  // "fs:PATH", or empty: a single GPU
    int rank = -1;          // -1: from RANK / OMPI_COMM_WORLD_RANK, else 0
    int world = 0;          // 0: from WORLD_SIZE / OMPI_COMM_WORLD_SIZE, else 1
};

// The first of the environment variables that is set, as an int; `fallback` when none is.
inline int env_int(const char* a, const char* b, int fallback) {
    for (const char* name : {a, b}) {
        const char* s = std::getenv(name);
        if (s && *s) return std::atoi(s);
    }
    return fallback;
}

struct Dist {
    int rank = 0, world = 1, local_rank = 0;
    std::string id_path;             // the rendezvous file (fs:PATH); empty on a single GPU
    ncclComm_t comm = nullptr;       // null on a single GPU: every collective is then a no-op
    double timeout_s = 300;          // how long a rank waits for rank 0's id file

    Dist() = default;
    Dist(const Dist&) = delete;
    Dist& operator=(const Dist&) = delete;
    ~Dist() {
        if (comm) ncclCommDestroy(comm);
    }

    bool lead() const { return rank == 0; }  // the rank that logs, samples, evaluates and writes checkpoints

    // Rank and world from the flags (else the environment), checked; no CUDA yet, so a bad flag is one hl::Error
    // line before anything starts. Then connect().
    void configure(const DistFlags& f) {
        world = f.world > 0 ? f.world : env_int("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", 1);
        rank = f.rank >= 0 ? f.rank : env_int("RANK", "OMPI_COMM_WORLD_RANK", 0);
        HL_CHECK(f.world >= 0, "--world must be positive, got ", f.world);
        HL_CHECK(world >= 1, "--world (or WORLD_SIZE) must be positive, got ", world);
        HL_CHECK(rank >= 0 && rank < world, "--rank (or RANK) must be in [0, ", world, "), got ", rank);
        id_path.clear();
        if (!f.nccl_init.empty()) {
            HL_CHECK(f.nccl_init.rfind("fs:", 0) == 0 && f.nccl_init.size() > 3,
                     "--nccl-init must be fs:PATH (a file on a filesystem every rank sees), got '", f.nccl_init, "'");
            id_path = f.nccl_init.substr(3);
        }
        HL_CHECK(world == 1 || !id_path.empty(), "--world ", world, " needs --nccl-init fs:PATH for the ranks to meet");
    }

    // This rank's GPU (the local rank: $LOCAL_RANK or $OMPI_COMM_WORLD_LOCAL_RANK, else rank mod the GPUs of the
    // host) becomes the current device; with world > 1, the rendezvous through the id file and the communicator.
    // Call it before any other CUDA work of the process.
    void connect() {
        int n_dev = 0;
        cudaCheck(cudaGetDeviceCount(&n_dev));
        local_rank = env_int("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", n_dev > 0 ? rank % n_dev : 0);
        HL_CHECK(local_rank >= 0 && local_rank < n_dev, "rank ", rank, ": local rank ", local_rank,
                 " has no GPU (this host has ", n_dev, ")");
        cudaCheck(cudaSetDevice(local_rank));
        if (world == 1) return;
        setenv("NCCL_NVLS_ENABLE", "0", /*overwrite=*/0);  // NVLink SHARP off unless the user says otherwise
        const ncclUniqueId id = rank == 0 ? publish_id(id_path) : wait_for_id(id_path);
        ncclCheck(ncclCommInitRank(&comm, world, id, rank));
        if (rank == 0) std::remove(id_path.c_str());  // every rank has joined, so every rank has read it
    }

    // x (n) ← the mean of x over the ranks (sum, then × 1/world), queued on `stream`.
    void all_reduce_mean(float* x, size_t n, cudaStream_t stream) const {
        if (!comm) return;
        ncclCheck(ncclAllReduce(x, x, n, ncclFloat32, ncclAvg, comm, stream));
    }

    // x (n) ← rank 0's x, queued on `stream`: the parameters and moments at the start, so every rank starts from
    // exactly the lead's state whatever its host did.
    void broadcast(float* x, size_t n, cudaStream_t stream) const {
        if (!comm) return;
        ncclCheck(ncclBroadcast(x, x, n, ncclFloat32, /*root=*/0, comm, stream));
    }

    // The two halves of the rendezvous (public for tests). Rank 0: a fresh id into PATH.tmp, renamed to PATH (atomic on one filesystem). An existing PATH is refused:
    // it is another run's id, and ranks that read it would wait for a root that is not there.
    static ncclUniqueId publish_id(const std::string& path) {
        if (std::FILE* old = std::fopen(path.c_str(), "rb")) {
            std::fclose(old);
            fail("--nccl-init: '", path, "' already exists (left by another run?); remove it or give a fresh path");
        }
        ncclUniqueId id;
        ncclCheck(ncclGetUniqueId(&id));
        const std::string tmp = path + ".tmp";
        std::FILE* f = std::fopen(tmp.c_str(), "wb");
        HL_CHECK(f, "--nccl-init: cannot write '", tmp, "': ", std::strerror(errno));
        const bool ok = std::fwrite(&id, sizeof id, 1, f) == 1;
        HL_CHECK(std::fclose(f) == 0 && ok, "--nccl-init: cannot write '", tmp, "'");
        HL_CHECK(std::rename(tmp.c_str(), path.c_str()) == 0, "--nccl-init: cannot rename '", tmp, "' to '", path,
                 "': ", std::strerror(errno));
        return id;
    }

    // Other ranks: poll for PATH every 50 ms until it holds a whole id, or fail after timeout_s.
    ncclUniqueId wait_for_id(const std::string& path) const {
        const auto t0 = std::chrono::steady_clock::now();
        ncclUniqueId id;
        for (;;) {
            if (std::FILE* f = std::fopen(path.c_str(), "rb")) {
                const bool ok = std::fread(&id, sizeof id, 1, f) == 1;
                std::fclose(f);
                if (ok) return id;
            }
            const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
            HL_CHECK(waited < timeout_s, "rank ", rank, ": no NCCL id from rank 0 in '", path, "' after ", timeout_s,
                     " s (is rank 0 running, with the same --nccl-init path on a filesystem both see?)");
            std::this_thread::sleep_for(std::chrono::milliseconds(50));
        }
    }
};

// How the gradients travel (train.cu's --bucket-mb and --zero1).
struct DataParallelFlags {
    double bucket_mb = 25;  // plain data parallel: all-reduce buckets of about this size during the backward
                            // (0: one all-reduce of everything after it)
    bool zero1 = false;     // ZeRO-1: reduce-scatter, AdamW on this rank's shard of the moments, all-gather
};

// The gradient exchange of one rank's model (built once, before the training loop).
//
// Plain data parallel: the blocks' gradients are laid out in order (model/model.h: embed, layers 0…L−1, norm_f,
// lm_head), and the backward finishes them from the last block down. Consecutive blocks are grouped into buckets
// of about bucket_mb; when the lowest block of a bucket is done (GpuModel::backward's layer_done), an event on the
// compute stream lets a second stream all-reduce that bucket while the backward of the earlier blocks goes on.
// The first bucket also takes everything after the layers (norm_f, lm_head: done before any block), and the
// embedding, done last, goes when the backward ends; the compute stream then waits for the communication stream
// before clipping. Every element is still averaged exactly once, so with two ranks the result is bitwise that of
// one all-reduce (each element is (a + b)/2 either way).
//
// ZeRO-1: the gradient buffer (padded to world equal shards) is reduce-scattered after the backward, so rank r
// holds the averaged gradients of shard r only; the squared norms of the shards are summed over the ranks (the
// global norm, for clipping and the log), AdamW updates the shard with this rank's moments (1/world of them), and
// an all-gather puts every shard's new parameters on every rank. A checkpoint gathers the moments into the lead's
// gradient buffer (free between steps) with point-to-point sends.
struct DataParallel {
    const Dist& d;
    GpuModel& model;
    const TrainFlags& train;          // clipping and weight decay (ZeRO-1's update)
    DataParallelFlags flags;
    cudaStream_t comm = nullptr;      // the bucket all-reduces (plain data parallel, world > 1)
    cudaEvent_t ready = nullptr, reduced = nullptr;
    std::vector<int> trigger;         // per layer: the bucket it completes, or -1
    struct Range {
        size_t lo, n;
    };
    std::vector<Range> buckets;       // buckets[k] = the parameters all-reduced when its lowest layer is done
    Range tail{0, 0}, head{0, 0};     // after the layers (norm_f, lm_head, padding), before them (embed)
    DeviceBuffer<double> sumsq;       // ZeRO-1: this shard's ‖g‖², then the sum over the ranks
    StepHooks step_hooks;             // built once (no allocation per step)

    DataParallel(const Dist& dist, GpuModel& m, const TrainFlags& tf, const DataParallelFlags& f)
        : d(dist), model(m), train(tf), flags(f) {
        HL_CHECK(f.bucket_mb >= 0, "--bucket-mb must be non-negative, got ", f.bucket_mb);
        HL_CHECK(!f.zero1 || model.sharded() || d.world == 1, "DataParallel: --zero1 needs a sharded GpuModel");
        if (d.world == 1) return;
        if (f.zero1) sumsq.alloc(1);
        else plan_buckets();
        step_hooks = hooks();
    }

    // each layer's range [begin[l], begin[l+1]) of the flat buffer, from the tensor table, grouped into buckets
    void plan_buckets() {
        const DataParallelFlags& f = flags;
        const int L = model.cfg.n_layers;
        std::vector<size_t> begin(size_t(L) + 1, SIZE_MAX);
        size_t layers_end = 0;
        for (const TensorInfo& t : model.tensors)
            if (t.name.rfind("layers.", 0) == 0) {
                const int l = std::atoi(t.name.c_str() + 7);
                begin[size_t(l)] = std::min(begin[size_t(l)], t.offset);
                layers_end = std::max(layers_end, t.offset + t.numel);
            }
        begin[size_t(L)] = layers_end;
        head = {0, begin[0]};
        tail = {layers_end, model.grads.n - layers_end};
        trigger.assign(size_t(L), -1);
        if (f.bucket_mb > 0) {
            const size_t cap = size_t(f.bucket_mb * 1e6 / sizeof(float));
            size_t top = size_t(L);  // the bucket being filled covers layers [l, top)
            for (int l = L - 1; l >= 0; l--)
                if (begin[top] - begin[size_t(l)] >= cap || l == 0) {
                    trigger[size_t(l)] = int(buckets.size());
                    buckets.push_back({begin[size_t(l)], begin[top] - begin[size_t(l)]});
                    top = size_t(l);
                }
            cudaCheck(cudaStreamCreateWithFlags(&comm, cudaStreamNonBlocking));
            cudaCheck(cudaEventCreateWithFlags(&ready, cudaEventDisableTiming));
            cudaCheck(cudaEventCreateWithFlags(&reduced, cudaEventDisableTiming));
        }
    }
    DataParallel(const DataParallel&) = delete;
    DataParallel& operator=(const DataParallel&) = delete;
    ~DataParallel() {
        if (comm) cudaStreamDestroy(comm);
        if (ready) cudaEventDestroy(ready);
        if (reduced) cudaEventDestroy(reduced);
    }

    // the work queued so far on the compute stream, then `r` averaged on the communication stream
    void reduce_async(Range r) {
        if (r.n == 0) return;
        cudaCheck(cudaEventRecord(ready, model.stream));
        cudaCheck(cudaStreamWaitEvent(comm, ready, 0));
        d.all_reduce_mean(model.grads.ptr + r.lo, r.n, comm);
    }

    // the hooks of every step (kernels/model.cuh's StepHooks)
    StepHooks hooks() {
        StepHooks h;
        h.after_update = [this] { d.all_reduce_mean(model.scalars.ptr, 1, model.stream); };  // the mean loss
        if (flags.zero1) {
            h.after_backward = [this] {
                float* g = model.grads.ptr;  // in place: shard r lands at its own offset
                ncclCheck(ncclReduceScatter(g, g + model.shard_lo, model.shard_n, ncclFloat32, ncclAvg, d.comm,
                                            model.stream));
            };
            h.update = [this](float lr, int step) { zero1_update(lr, step); };
            return h;
        }
        if (!comm) {  // no buckets: everything after the backward
            h.after_backward = [this] { d.all_reduce_mean(model.grads.ptr, model.grads.n, model.stream); };
            return h;
        }
        h.layer_done = [this](int l) {
            const int k = trigger[size_t(l)];
            if (k < 0) return;
            if (k == 0) reduce_async(tail);
            reduce_async(buckets[size_t(k)]);
        };
        h.after_backward = [this] {
            reduce_async(head);
            cudaCheck(cudaEventRecord(reduced, comm));  // clipping waits for every bucket
            cudaCheck(cudaStreamWaitEvent(model.stream, reduced, 0));
        };
        return h;
    }

    // ZeRO-1's update: the global norm from every shard's squares, clip this shard, AdamW on it, gather.
    void zero1_update(float lr, int step) {
        float* g = model.grads.ptr + model.shard_lo;
        float* norm = model.scalars.ptr + 1;
        grad_norm(norm, g, model.shard_n, model.norm_scratch.ptr, model.stream, sumsq.ptr);
        ncclCheck(ncclAllReduce(sumsq.ptr, sumsq.ptr, 1, ncclFloat64, ncclSum, d.comm, model.stream));
        sqrt_kernel<><<<1, 1, 0, model.stream>>>(norm, sumsq.ptr);
        cudaCheckLast();
        AdamWConfig opt;
        opt.weight_decay = train.weight_decay;
        adamw_update(model.params.ptr, model.grads.ptr, model.m.ptr, model.v.ptr, *model.adamw, opt, lr, step,
                     model.stream, model.shard_lo, norm, train.grad_clip);  // (clipped as it reads them)
        float* p = model.params.ptr;
        ncclCheck(ncclAllGather(p + model.shard_lo, p, model.shard_n, ncclFloat32, d.comm, model.stream));
        model.params_changed();
    }

    // Every rank calls it: the whole AdamW moments into m_host / v_host on the lead (sharded: gathered through
    // the lead's gradient buffer, which the next step zeroes anyway); other ranks' vectors are left alone.
    void gather_moments(std::vector<float>& m_host, std::vector<float>& v_host) {
        if (!model.sharded()) {
            if (d.lead()) model.download_moments(m_host, v_host);
            return;
        }
        const size_t S = model.shard_n, N = model.n_params;
        for (int which = 0; which < 2; which++) {
            const float* mine = which == 0 ? model.m.ptr : model.v.ptr;
            ncclCheck(ncclGroupStart());
            if (d.lead()) {
                cudaCheck(cudaMemcpyAsync(model.grads.ptr, mine, S * sizeof(float), cudaMemcpyDeviceToDevice,
                                          model.stream));
                for (int r = 1; r < d.world; r++)
                    ncclCheck(ncclRecv(model.grads.ptr + size_t(r) * S, S, ncclFloat32, r, d.comm, model.stream));
            } else {
                ncclCheck(ncclSend(mine, S, ncclFloat32, 0, d.comm, model.stream));
            }
            ncclCheck(ncclGroupEnd());
            cudaCheck(cudaStreamSynchronize(model.stream));
            if (d.lead()) {
                std::vector<float>& h = which == 0 ? m_host : v_host;
                h.resize(N);
                cudaCheck(cudaMemcpy(h.data(), model.grads.ptr, N * sizeof(float), cudaMemcpyDeviceToHost));
            }
        }
    }
};

// train_step_on (kernels/model.cuh) for one rank of a data-parallel run: forward and backward on this rank's
// rows (B, T) of the global batch, the gradients averaged over the ranks (DataParallel), then clipping (the norm
// is of the averaged gradients, the same on every rank) and AdamW; the reported loss is the mean over the ranks.
// On one GPU it is train_step_on itself.
inline StepStats train_step_dist(DataParallel& dp, const int* inputs, const int* targets, int B, int T, int step,
                                 const TrainFlags& f) {
    if (dp.d.world == 1) return train_step_on(dp.model, inputs, targets, B, T, step, f);
    HL_CHECK(!dp.model.cfg.moe, "--moe is not supported on several GPUs yet (its balancing needs the expert loads "
                                "of every rank)");
    return train_step_on(dp.model, inputs, targets, B, T, step, f, dp.step_hooks);
}

}  // namespace hl::gpu
