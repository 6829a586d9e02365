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
// Left for later (issue 7): gradient buckets all-reduced while the backward still runs (bf16/fp32), ZeRO-1
// (sharded AdamW state), validation shared among the ranks, MoE balancing across ranks (its expert loads would
// have to be summed over the ranks: refused for now).
#pragma once
#include <cerrno>                 // errno: why a rendezvous file could not be written
#include <chrono>                 // std::chrono: the rendezvous timeout
#include <cstdio>                 // std::FILE, std::fopen, std::rename, std::remove
#include <cstdlib>                // std::getenv, setenv, std::atoi
#include <cstring>                // std::strerror
#include <string>                 // std::string
#include <thread>                 // std::this_thread::sleep_for: polling for the id file
#include <cuda_runtime.h>         // cudaSetDevice, cudaGetDeviceCount, cudaStream_t
#include <nccl.h>                 // ncclComm_t, ncclGetUniqueId, ncclCommInitRank, ncclAllReduce
#include "kernels/common.cuh"     // cudaCheck
#include "kernels/model.cuh"      // GpuModel, train_step_on
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

// train_step_on (kernels/model.cuh) for one rank of a data-parallel run: forward and backward on this rank's
// rows (B, T) of the global batch, the gradients averaged over the ranks, then clipping (the norm is of the
// averaged gradients, so it is the same on every rank) and AdamW; the reported loss is the mean over the ranks.
// On one GPU it is train_step_on itself.
inline StepStats train_step_dist(GpuModel& model, const Dist& d, const int* inputs, const int* targets, int B, int T,
                                 int step, const TrainFlags& f) {
    if (d.world == 1) return train_step_on(model, inputs, targets, B, T, step, f);
    HL_CHECK(!model.cfg.moe, "--moe is not supported on several GPUs yet (its balancing needs the expert loads of "
                             "every rank)");
    StepHooks hooks;
    // each rank's mean-loss gradient → the global one; after the update, the loss (the norm is already global)
    hooks.after_backward = [&] { d.all_reduce_mean(model.grads.ptr, model.grads.n, model.stream); };
    hooks.after_update = [&] { d.all_reduce_mean(model.scalars.ptr, 1, model.stream); };
    return train_step_on(model, inputs, targets, B, T, step, f, hooks);
}

}  // namespace hl::gpu
