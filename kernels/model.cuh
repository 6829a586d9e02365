// model.cuh — the whole language model on the GPU, mirroring model/model.h (read that first):
//   tokens (B,T) → embedding → blocks by pattern (A | M | H | S) → RMSNorm → LM head → logits → cross-entropy
// GpuModel holds one device allocation for the parameters, one for the gradients, one for each AdamW moment and
// one for every activation of a (B, T) batch. Parameter and gradient views are carved with model/model.h's
// model_params on an Arena over the device buffers, so the layout (names, shapes, offsets: `tensors`) is the CPU
// Model<float>'s exactly: upload()/download() copy the whole buffer, and the CPU init and checkpoints
// (model/trainer.h's save_run/load_run on a host Model<float>) are reused unchanged.
//
// One training step on the device (train_step below): the batch is copied up, then forward (loss to a device
// scalar), zero_grad, backward, global-norm clipping (the norm stays on the device) and AdamW, all queued on one
// stream without a host sync; the step's only sync is reading {loss, grad norm} back at its end.
//
// Also here: the GPU counterparts of model/trainer.h's functions that take a Model<float> — train_step,
// eval_loss, generate — with the same arguments and results, so train.cu and the tests share them.
// Precision: fp32 throughout by default. set_precision(Precision::bf16) makes every matmul take bf16 operands on
// the tensor cores (kernels/matmul.cuh's Bf16Operands: a bf16 copy of the parameters, rounded at the start of each
// forward, and scratch for the activation operand), fp32 accumulation, and attention with head dims the
// tensor-core kernels are compiled for take them (their bf16 staging is Bf16Operands::stage, one buffer for all
// layers); activations, gradients, the fp32 master weights, AdamW and every other kernel stay fp32, but for the
// activations that only feed matmuls, which their producers write in bf16 (kernels/matmul.cuh's bf16_view).
#pragma once
#include <algorithm>              // std::min, std::max, std::copy
#include <cstdint>                // uint64_t
#include <functional>             // std::function: StepHooks
#include <memory>                 // std::unique_ptr: the AdamW table
#include <string>                 // std::string
#include <vector>                 // std::vector
#include <cuda_runtime.h>         // cudaMemcpy(Async), cudaMemsetAsync, cudaStream_t
#include "data/loader.h"          // WindowLoader, eval_windows, num_eval_windows
#include "kernels/adamw.cuh"      // AdamWTable, adamw_update, grad_norm, GRAD_NORM_BLOCKS
#include "kernels/block.cuh"      // GpuBlockActs, gpu_block_acts, block_forward/backward
#include "kernels/common.cuh"     // DeviceBuffer, cudaCheck, cudaCheckLast, elementwise_grid
#include "kernels/crossentropy.cuh"  // crossentropy_forward/backward
#include "kernels/embedding.cuh"  // embedding_forward/backward
#include "kernels/matmul.cuh"     // the LM head; cublas() (created at construction)
#include "kernels/rmsnorm.cuh"    // the final norm
#include "model/adamw.h"          // AdamWConfig
#include "model/common.h"         // Arena, take_layers_sharing_scratch, TensorInfo, Rng, HL_CHECK
#include "model/config.h"         // ModelConfig, config_check
#include "model/embedding.h"      // embedding_check_tokens: host-side id checks before an upload
#include "model/model.h"          // Model<float>, ModelParams, model_params, block_config
#include "model/trainer.h"        // StepStats, TrainFlags, lr_at

namespace hl::gpu {

// *loss = Σ losses (N) / N. One block of LOSS_THREADS threads: each sums a strided share in double, then a
// fixed tree in shared memory (deterministic), like the CPU's double sum. N is B·T, a few thousand at most
// per step, so one block is plenty.
constexpr int LOSS_THREADS = 256;
template <typename Unused = void>
__global__ void mean_loss_kernel(float* loss, const float* losses, int N) {
    __shared__ double part[LOSS_THREADS];
    double acc = 0.0;
    for (int i = threadIdx.x; i < N; i += LOSS_THREADS) acc += (double)losses[i];
    part[threadIdx.x] = acc;
    __syncthreads();
    for (int half = LOSS_THREADS / 2; half > 0; half /= 2) {
        if (threadIdx.x < half) part[threadIdx.x] += part[threadIdx.x + half];
        __syncthreads();
    }
    if (threadIdx.x == 0) *loss = (float)(part[0] / N);
}

// x (n) = value, grid-stride (the cross-entropy's dlosses = 1/N).
template <typename T>
__global__ void fill_kernel(T* x, T value, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        x[i] = value;
}

enum class Precision { fp32, bf16 };
inline const char* precision_name(Precision p) { return p == Precision::bf16 ? "bf16" : "fp32"; }

struct GpuModel {
    ModelConfig cfg;
    std::vector<BlockConfig> blocks;
    std::vector<TensorInfo> tensors;     // every parameter: name, shape, offset (== Model<float>'s)
    bool training = true;                // false: no gradients, moments or optimizer (a sampler)
    size_t n_params = 0;                 // the parameter buffer's length (model_params' layout, its alignment gaps
                                         // included); params and grads hold it rounded up to whole shards
    DeviceBuffer<float> params, grads;   // (shards · shard_n) each; grads empty when !training
    DeviceBuffer<float> m, v;            // AdamW moments of parameters [shard_lo, shard_lo + shard_n) when training
    size_t shard_lo = 0, shard_n = 0;    // all of them on one GPU; one rank's shard under ZeRO-1 (kernels/dist.cuh)
    ModelParams<float> p, dp;            // device views; dp all null when !training
    std::vector<TensorInfo> buffer_tensors;  // the MoE balancing biases (Model<float>'s buffers, same layout)
    DeviceBuffer<float> buffers;
    std::vector<float*> moe_bias;        // per layer: its bias in buffers (null without MoE)
    std::unique_ptr<AdamWTable> adamw;   // the optimizer's device table of tensor ranges (within the shard)
    DeviceBuffer<float> scalars;         // [0] mean loss of the last forward, [1] grad norm of the last update
    DeviceBuffer<double> norm_scratch;   // GRAD_NORM_BLOCKS partial sums of the gradient norm
    cudaStream_t stream = 0;             // every launch of this model goes here
    Precision precision = Precision::fp32;  // of the matmuls (set_precision)
    DeviceBuffer<bf16> params16, operand_scratch;  // bf16 only: the parameters' copy; a16 and b16 of `ops`
    bool params16_valid = false;         // params16 holds params rounded: AdamW keeps it so, any other write ends it
    DeviceBuffer<bf16> dres16;           // bf16 only: the residual stream's gradient rounded (block_backward's res16)
    Bf16Operands ops;                    // what the matmuls read in bf16 (kernels/matmul.cuh)

    // activations for one (B, T), allocated by alloc(); nothing is allocated in forward/backward
    int B = 0, T_ = 0;
    DeviceBuffer<float> act;
    DeviceBuffer<int> iact;              // index activations (MoE routing)
    std::vector<float*> xs;              // L+1 residual streams (B,T,D): xs[0] embeddings, xs[l+1] block l output
    std::vector<GpuBlockActs<float>> bacts;
    float *xf = nullptr, *rstdf = nullptr;  // final norm (B,T,D) (bf16: in bf16 only), (B,T)
    float *logits = nullptr, *probs = nullptr, *losses = nullptr;  // (B,T,V) (B,T,V) (B,T)
    float *dlogits = nullptr, *dxf = nullptr, *dres = nullptr, *dlosses = nullptr;
    DeviceBuffer<int> tokens_buf, targets_buf;  // (B,T) the batch on the device (set_batch; targets of the last forward)
    const int* last_tokens = nullptr;
    bool have_targets = false;
    bool weighted = false;               // dlosses already holds set_loss_weights' weights for the next backward

    // shards > 1 (ZeRO-1): this model keeps AdamW moments for shard `shard` of `shards` equal parts of the
    // parameters only, and its update is kernels/dist.cuh's (the step needs the other ranks).
    explicit GpuModel(const ModelConfig& c, bool train = true, int shards = 1, int shard = 0)
        : cfg(c), training(train) {
        HL_CHECK(shards >= 1 && shard >= 0 && shard < shards, "GpuModel: shard ", shard, " of ", shards);
        config_check(cfg);
        for (int l = 0; l < cfg.n_layers; l++) {
            blocks.push_back(block_config(cfg, l));
            block_config_check(blocks.back());
        }
        Arena<float> count(nullptr, &tensors);
        model_params(count, cfg);
        n_params = count.size;
        shard_n = (n_params + size_t(shards) - 1) / size_t(shards);
        shard_lo = size_t(shard) * shard_n;
        params.alloc(shard_n * size_t(shards));  // the padding stays 0 (and its gradients too)
        params.zero();
        Arena<float> pa(params.ptr);
        p = model_params(pa, cfg);
        if (training) {
            grads.alloc(params.n);
            grads.zero();
            m.alloc(shard_n);
            m.zero();
            v.alloc(shard_n);
            v.zero();
            Arena<float> ga(grads.ptr);
            dp = model_params(ga, cfg);
            adamw = std::make_unique<AdamWTable>(tensors, shard_lo, shard_lo + shard_n);
            norm_scratch.alloc(GRAD_NORM_BLOCKS);
        }
        Arena<float> count_b(nullptr, &buffer_tensors);
        for (int l = 0; l < cfg.n_layers; l++)
            if (blocks[size_t(l)].use_moe)
                count_b.take("layers." + std::to_string(l) + ".ffn.expert_bias", {cfg.n_experts});
        if (count_b.size > 0) {
            buffers.alloc(count_b.size);
            buffers.zero();
        }
        for (int l = 0, i = 0; l < cfg.n_layers; l++)
            moe_bias.push_back(blocks[size_t(l)].use_moe ? buffers.ptr + size_t(i++) * cfg.n_experts : nullptr);
        scalars.alloc(2);
        scalars.zero();
        cublas();  // create the cuBLAS handle (and its workspace) now, not inside the first timed step
    }

    // fp32 or bf16 matmul operands from the next forward on (allocates the bf16 copy and scratch on the first
    // switch to bf16; the scratch follows alloc's batch shape). The activations' layout depends on the precision
    // (alloc): already allocated, they are laid out again (their values are lost: call it between steps).
    void set_precision(Precision pr) {
        const bool relayout = pr != precision && B > 0;
        precision = pr;
        if (pr == Precision::bf16 && params16.n == 0) {
            params16.alloc(n_params);
            params16_valid = false;
            ops.params = params.ptr, ops.n = n_params, ops.params16 = params16.ptr;
            alloc_operand_scratch();
        }
        if (relayout) {
            const int b = B, t = T_;
            B = T_ = 0;
            alloc(b, t);
        }
    }
    // the two activation operands of any matmul of a (B, T) batch: rows ≤ B·T, width ≤ the widest parameter dim
    // rounded up to a multiple of 8 (Mamba-2's in_proj GEMMs run over in_proj_rows);
    // then the tensor-core attention's staging, sized for the largest attention of any layer (layers take turns) and
    // the kernel family this GPU runs (no per-head dk, dv shares under the wgmma kernels)
    void alloc_operand_scratch() {
        if (precision != Precision::bf16 || B == 0) return;
        int width = 0;
        for (const TensorInfo& t : tensors)
            if (t.shape.size() >= 2)
                for (int d : t.shape) width = std::max(width, (d + 7) / 8 * 8);
        ops.scratch_n = (size_t(B) * T_ * size_t(width) + 7) / 8 * 8;  // keeps b16 and stage 16-byte aligned
        ops.stage_n = 0;
        for (const BlockConfig& c : blocks)
            if (c.kind == 'A' || c.kind == 'H') {
                const AttnConfig& ac = c.kind == 'A' ? c.attn : c.intra.attn;
                ops.stage_n = std::max(ops.stage_n, attention_tc_stage_size(B, T_, ac.n_heads, ac.n_kv_heads,
                                                                            ac.d_qk, ac.d_v, !attention_use_wgmma()));
            }
        operand_scratch.alloc(2 * ops.scratch_n + ops.stage_n);
        ops.a16 = operand_scratch.ptr, ops.b16 = operand_scratch.ptr + ops.scratch_n;
        ops.stage = ops.stage_n > 0 ? operand_scratch.ptr + 2 * ops.scratch_n : nullptr;
        if (training) dres16.alloc(size_t(B) * T_ * size_t(cfg.d_model));
    }
    // the operands the matmuls should see now: null = fp32
    const Bf16Operands* matmul_operands() const { return precision == Precision::bf16 ? &ops : nullptr; }

    size_t num_params() const { return count_params(tensors); }  // n_params less model_params' alignment gaps
    bool sharded() const { return shard_n != n_params; }

    // ---- host ↔ device (synchronous; setup, checkpoints and tests only) ----

    void check_host(const Model<float>& host, const char* who) const {
        HL_CHECK(host.params.size() == n_params && host.tensors.size() == tensors.size(), who,
                 ": the host model has ", host.params.size(), " parameters in ", host.tensors.size(),
                 " tensors, the GPU model ", n_params, " in ", tensors.size());
        for (size_t i = 0; i < tensors.size(); i++)
            HL_CHECK(host.tensors[i].name == tensors[i].name && host.tensors[i].offset == tensors[i].offset, who,
                     ": tensor ", i, " is '", host.tensors[i].name, "' on the host, '", tensors[i].name, "' here");
    }
    // parameters from a host Model<float> of the same config (its init or a loaded checkpoint)
    // (the buffers — MoE biases — travel with the parameters)
    void upload(const Model<float>& host) {
        check_host(host, "GpuModel::upload");
        cudaCheck(cudaMemcpy(params.ptr, host.params.data(), n_params * sizeof(float), cudaMemcpyHostToDevice));
        if (buffers.n > 0) buffers.upload(host.buffers);
        params_changed();
    }
    // Whoever writes the parameters other than through update() calls this: the next forward then rounds them all
    // into the bf16 copy again (update() rounds each value it writes).
    void params_changed() { params16_valid = false; }
    void download(Model<float>& host) const {
        check_host(host, "GpuModel::download");
        cudaCheck(cudaMemcpy(host.params.data(), params.ptr, n_params * sizeof(float), cudaMemcpyDeviceToHost));
        if (buffers.n > 0)
            cudaCheck(cudaMemcpy(host.buffers.data(), buffers.ptr, buffers.n * sizeof(float), cudaMemcpyDeviceToHost));
    }
    // AdamW moments, as the host vectors of model/trainer.h's save_run/load_run
    void upload_moments(const std::vector<float>& m_host, const std::vector<float>& v_host) {
        HL_CHECK(training, "GpuModel::upload_moments: this model was built without an optimizer");
        HL_CHECK(m_host.size() == n_params && v_host.size() == n_params, "GpuModel::upload_moments: ",
                 m_host.size(), " and ", v_host.size(), " moments for ", n_params, " parameters");
        const size_t n = std::min(shard_n, n_params - std::min(shard_lo, n_params));  // the shard's real ones
        m.zero(), v.zero();
        cudaCheck(cudaMemcpy(m.ptr, m_host.data() + shard_lo, n * sizeof(float), cudaMemcpyHostToDevice));
        cudaCheck(cudaMemcpy(v.ptr, v_host.data() + shard_lo, n * sizeof(float), cudaMemcpyHostToDevice));
    }
    void download_moments(std::vector<float>& m_host, std::vector<float>& v_host) const {
        HL_CHECK(training, "GpuModel::download_moments: this model was built without an optimizer");
        HL_CHECK(!sharded(), "GpuModel::download_moments: a sharded model holds one shard (kernels/dist.cuh gathers)");
        m_host = m.download();
        v_host = v.download();
    }
    // parameters from another GpuModel of the same config (device to device, queued on the stream)
    void copy_params_from(const GpuModel& other) {
        HL_CHECK(other.n_params == n_params, "GpuModel::copy_params_from: ", other.n_params, " vs ", n_params,
                 " parameters");
        cudaCheck(cudaMemcpyAsync(params.ptr, other.params.ptr, n_params * sizeof(float), cudaMemcpyDeviceToDevice,
                                  stream));
        params_changed();
        if (buffers.n > 0)
            cudaCheck(cudaMemcpyAsync(buffers.ptr, other.buffers.ptr, buffers.n * sizeof(float),
                                      cudaMemcpyDeviceToDevice, stream));
    }

    // ---- activations ----

    // Lays out every activation for batch B and sequence length T in one device allocation (the CPU's order).
    void alloc(int B_, int Tn) {
        HL_CHECK(B_ > 0 && Tn > 0, "batch and seq-len must be positive, got batch ", B_, ", seq-len ", Tn);
        HL_CHECK(Tn <= cfg.max_seq_len, "seq-len ", Tn, " is above the model's limit max_seq_len = ", cfg.max_seq_len);
        if (B_ == B && Tn == T_) return;
        B = B_;
        T_ = Tn;
        const int N = B * T_, D = cfg.d_model, V = cfg.vocab_size, L = cfg.n_layers;
        // s: the region the layers' backward scratch shares (take_layers_sharing_scratch; one stream takes the layers
        // one at a time). At 350m, B 8, T 2048 that is about half of each block's activations (mamba2: 60 → 32 GiB).
        // Laid out under the Bf16Scope the forward and backward run in: under bf16 the tensors held only in bf16
        // take half their floats (kernels/matmul.cuh's bf16_only_shape; 100m transformer 12.16 → 8.41 GiB).
        const Bf16Scope scope(matmul_operands());
        const bool bf16 = precision == Precision::bf16;
        auto layout = [&](Arena<float>& a, Arena<int>& ia, Arena<float>& s) {
            xs.clear();
            bacts.clear();
            for (int l = 0; l <= L; l++) xs.push_back(a.take("x", {N, D}));
            take_layers_sharing_scratch(a, s, L, [&](int l) {
                bacts.push_back(gpu_block_acts(a, ia, blocks[size_t(l)], B, T_));
                bacts.back().moe_bias = moe_bias[size_t(l)];
            });
            xf = a.take("xf", bf16_only_shape({N, D}, bf16));  // (bf16: only lm_head's operand, xf16)
            rstdf = a.take("rstdf", {N});
            logits = a.take("logits", {N, V});
            probs = a.take("probs", {N, V});
            losses = a.take("losses", {N});
            dlogits = a.take("dlogits", {N, V});
            dxf = a.take("dxf", bf16_only_shape({N, D}, bf16));  // (bf16: written and read in bf16 only, dxf16)
            dres = a.take("dres", {N, D});
            dlosses = a.take("dlosses", {N});
        };
        // Every activation 256-byte aligned (64 floats), as cudaMalloc aligns a buffer: the vectorised loads of the
        // SSD's tensor-core kernels need 16 bytes, and a small model's odd sizes would otherwise break that.
        Arena<float> count, scount;
        Arena<int> icount;
        count.align = scount.align = 64;
        layout(count, icount, scount);
        const size_t main = (count.size + 63) / 64 * 64;  // the scratch region after the rest, 256-byte aligned
        act.alloc(main + scount.size);
        act.zero();
        if (icount.size > 0) iact.alloc(icount.size);
        Arena<float> a(act.ptr), s(act.ptr + main);
        Arena<int> ia(iact.ptr);
        a.align = s.align = 64;
        layout(a, ia, s);
        tokens_buf.alloc(size_t(N));
        targets_buf.alloc(size_t(N));
        alloc_operand_scratch();
        last_tokens = nullptr;
        have_targets = false;
    }

    // Checks a host batch (ids in [0, V)) and copies it into tokens_buf / targets_buf (targets may be null).
    // Allocates only when (B, T) changes.
    void set_batch(const int* inputs, const int* targets, int B_, int Tn) {
        alloc(B_, Tn);
        embedding_check_tokens(inputs, B, T_, cfg.vocab_size);
        const size_t bytes = sizeof(int) * size_t(B) * T_;
        cudaCheck(cudaMemcpyAsync(tokens_buf.ptr, inputs, bytes, cudaMemcpyHostToDevice, stream));
        if (targets) {
            for (size_t i = 0; i < size_t(B) * T_; i++)
                HL_CHECK(targets[i] >= 0 && targets[i] < cfg.vocab_size, "target ", targets[i], " at position (b=",
                         i / size_t(T_), ", t=", i % size_t(T_), ") is out of range [0, V=", cfg.vocab_size, ")");
            cudaCheck(cudaMemcpyAsync(targets_buf.ptr, targets, bytes, cudaMemcpyHostToDevice, stream));
        }
    }

    // The next backward's gradient is of Σ_i w[i] · loss_i (w: B·T host floats, after the forward) instead of
    // the mean loss (model/model.h's loss_weights).
    void set_loss_weights(const float* w) {
        HL_CHECK(have_targets, "set_loss_weights: after a forward with targets");
        cudaCheck(cudaMemcpyAsync(dlosses, w, sizeof(float) * size_t(B) * T_, cudaMemcpyHostToDevice, stream));
        weighted = true;
    }

    // ---- forward / backward / update (queued on `stream`, no host sync) ----

    // Logits for device tokens (B,T) into this->logits; with device targets (B,T), the per-token losses into
    // this->losses and their mean into scalars[0] (read it with loss()). Token ids must be in range (set_batch
    // checks them on the host; the kernels only make a bad id loud, as NaN). The tokens must stay alive and
    // unchanged until backward(); the targets are copied (into targets_buf) unless they already are targets_buf.
    void forward(const int* tokens_dev, const int* targets_dev, int B_, int Tn) {
        alloc(B_, Tn);
        const int N = B * T_, D = cfg.d_model, V = cfg.vocab_size, L = cfg.n_layers;
        const Bf16Scope scope(matmul_operands());
        if (precision == Precision::bf16 && !params16_valid) {  // this step's weights (after an update: already)
            round_bf16(params16.ptr, params.ptr, n_params, stream);
            params16_valid = true;
        }
        gpu::embedding_forward(xs[0], tokens_dev, p.embed, B, T_, V, D, stream);
        // each block's last residual add is done by the norm after it, in the same pass (block_forward's write_y):
        // block l + 1 writes xs[l + 1], the final norm xs[L]
        for (int l = 0; l < L; l++)
            gpu::block_forward(xs[size_t(l) + 1], bacts[size_t(l)], xs[size_t(l)], p.layers[size_t(l)],
                               blocks[size_t(l)], B, T_, stream, l > 0 ? &bacts[size_t(l) - 1] : nullptr, false);
        // bf16: the final norm's output is only lm_head's operand (forward and weight gradient): written in bf16
        bf16* xf16 = gpu::bf16_view(xf);
        gpu::add_rmsnorm_forward(xs[size_t(L)], xf, rstdf, bacts[size_t(L) - 1].h, bacts[size_t(L) - 1].ffo,
                                 p.norm_f, N, D, float(cfg.norm_eps), stream, xf16, bacts[size_t(L) - 1].ffo16);
        gpu::matmul_forward(logits, xf, p.lm_head, (const float*)nullptr, N, D, V, stream, xf16);
        last_tokens = tokens_dev;
        have_targets = targets_dev != nullptr;
        if (!targets_dev) return;
        if (targets_dev != targets_buf.ptr)
            cudaCheck(cudaMemcpyAsync(targets_buf.ptr, targets_dev, sizeof(int) * size_t(N), cudaMemcpyDeviceToDevice,
                                      stream));
        gpu::crossentropy_forward(losses, probs, logits, targets_buf.ptr, N, V, stream);
        mean_loss_kernel<><<<1, LOSS_THREADS, 0, stream>>>(scalars.ptr, losses, N);
        cudaCheckLast();
    }

    // The mean loss of the last forward with targets (a host sync).
    float loss() const {
        float x = 0;
        cudaCheck(cudaMemcpy(&x, scalars.ptr, sizeof(float), cudaMemcpyDeviceToHost));
        return x;
    }

    void zero_grad() {
        HL_CHECK(training, "GpuModel::zero_grad: this model was built without gradients");
        cudaCheck(cudaMemsetAsync(grads.ptr, 0, grads.n * sizeof(float), stream));
    }

    // Gradients of the mean loss of the last forward (which must have had targets) accumulate into grads (or of
    // the weighted loss, after set_loss_weights). layer_done(l), when given, is called (on the host, as the launches are queued) once block l's gradients
    // are queued: a data-parallel run starts reducing them while the earlier blocks' backward runs.
    void backward(const std::function<void(int)>& layer_done = {}) {
        HL_CHECK(training, "GpuModel::backward: this model was built without gradients");
        HL_CHECK(have_targets, "backward needs a forward with targets first");
        const int N = B * T_, D = cfg.d_model, V = cfg.vocab_size, L = cfg.n_layers;
        const Bf16Scope scope(matmul_operands());  // (the forward's bf16 weights)
        if (!weighted) {
            fill_kernel<<<elementwise_grid(size_t(N), 256), 256, 0, stream>>>(dlosses, 1.0f / float(N), size_t(N));
            cudaCheckLast();
        }
        weighted = false;
        gpu::crossentropy_backward(dlogits, dlosses, probs, targets_buf.ptr, N, V, stream);
        // bf16: dxf, read only by norm_f's backward, comes out of its GEMM in bf16 (as the blocks' dn)
        bf16* dxf16 = gpu::bf16_view(dxf);
        gpu::matmul_backward(dxf, dp.lm_head, (float*)nullptr, dlogits, xf, p.lm_head, N, D, V, stream, false,
                             gpu::bf16_view(xf), nullptr, dxf16);
        // bf16: each norm backward also writes the residual stream's gradient in bf16, for the GEMMs after it
        bf16* res16 = precision == Precision::bf16 ? dres16.ptr : nullptr;
        // norm_f's weight gradient through the last block's ffo as scratch, as the blocks' norms do (the backward
        // never reads ffo)
        gpu::rmsnorm_backward(dres, dp.norm_f, dxf, xs[size_t(L)], p.norm_f, rstdf, N, 1, D, stream,
                              (const float*)nullptr, bacts[size_t(L) - 1].ffo, res16, dxf16);
        for (int l = L - 1; l >= 0; l--) {
            gpu::block_backward(dres, dp.layers[size_t(l)], dres, bacts[size_t(l)], xs[size_t(l)], p.layers[size_t(l)],
                                blocks[size_t(l)], B, T_, stream, res16, l > 0);
            if (layer_done) layer_done(l);
        }
        gpu::embedding_backward(dp.embed, dres, last_tokens, B, T_, V, D, stream);
    }

    // One AdamW step at learning rate lr on the gradients clipped to global norm grad_clip (the norm before
    // clipping goes to scalars[1]; the clipping is applied inside the update, the gradients stay as they are);
    // step is 1-based (bias correction). adamw_update checks grad_clip > 0.
    void update(const AdamWConfig& opt, float lr, int step, float grad_clip) {
        HL_CHECK(training, "GpuModel::update: this model was built without an optimizer");
        HL_CHECK(!sharded(), "GpuModel::update: a sharded model steps through kernels/dist.cuh");
        gpu::grad_norm(scalars.ptr + 1, grads.ptr, grads.n, norm_scratch.ptr, stream);
        // the bf16 copy follows the update where it held the parameters before it
        const bool copy = precision == Precision::bf16 && params16_valid;
        gpu::adamw_update(params.ptr, grads.ptr, m.ptr, v.ptr, *adamw, opt, lr, step, stream, 0, scalars.ptr + 1,
                          grad_clip, copy ? params16.ptr : nullptr);
        params16_valid = copy;
    }

    // After an update: each MoE layer's bias moves towards balance, from the last forward's loads (on the device).
    void moe_update() {
        for (int l = 0; l < cfg.n_layers; l++)
            if (blocks[size_t(l)].use_moe)
                gpu::moe_update_bias(moe_bias[size_t(l)], bacts[size_t(l)].moe.offsets, cfg.n_experts,
                                     cfg.moe_bias_rate, stream);
    }

    // share[e] = fraction of the last forward's tokens routed to expert e, averaged over the MoE layers (from the
    // host copies of the offsets each MoE forward makes; no sync here).
    void expert_share(float* share) const {
        const int E = cfg.n_experts;
        for (int e = 0; e < E; e++) share[e] = 0;
        int layers = 0;
        for (int l = 0; l < cfg.n_layers; l++) {
            if (!blocks[size_t(l)].use_moe) continue;
            const std::vector<int>& off = bacts[size_t(l)].moe.offsets_host;
            for (int e = 0; e < E; e++) share[e] += float(off[size_t(e) + 1] - off[size_t(e)]) / float(off[size_t(E)]);
            layers++;
        }
        for (int e = 0; e < E && layers > 0; e++) share[e] /= float(layers);
    }

    // {mean loss of the last forward, grad norm of the last update}: one copy, the step's one host sync.
    void read_scalars(float* loss_out, float* norm_out) const {
        float s[2];
        cudaCheck(cudaMemcpy(s, scalars.ptr, sizeof s, cudaMemcpyDeviceToHost));
        if (loss_out) *loss_out = s[0];
        if (norm_out) *norm_out = s[1];
    }
};

// ---------------------------------------------------------------------------------------------------------
// GPU counterparts of model/trainer.h's train_step, eval_loss and generate (same arguments, same results)
// ---------------------------------------------------------------------------------------------------------

// One optimisation step, `step` 0-based: the loader's next batch into inputs/targets (B, T) (caller-owned host
// buffers), up to the device, forward, backward, clip to f.grad_clip, AdamW with the scheduled lr (bias
// correction counts step + 1). The AdamW moments are the model's own (model.m, model.v). One host sync, at the
// end (loss and grad norm).
// Work a multi-GPU run (kernels/dist.cuh) adds inside a step: as each block's gradients are queued (start
// averaging them over the ranks), after the backward (the rest), the update itself (ZeRO-1: this rank's shard,
// then the parameters gathered) and after it (average the loss). Empty on one GPU.
struct StepHooks {
    std::function<void(int)> layer_done;          // block l's gradients are queued (GpuModel::backward)
    std::function<void()> after_backward;         // every gradient is queued
    std::function<void(float lr, int step)> update;  // replaces model.update (clip + AdamW); step is 1-based
    std::function<void()> after_update;
};

inline StepStats train_step_on(GpuModel& model, const int* inputs, const int* targets, int B, int T, int step,
                               const TrainFlags& f, const StepHooks& hooks = {}, const float* loss_weights = nullptr);

inline StepStats train_step(GpuModel& model, int* inputs, int* targets, WindowLoader& loader, int step,
                            const TrainFlags& f) {
    loader.next(inputs, targets);
    return train_step_on(model, inputs, targets, loader.B, loader.T, step, f);
}

// The step itself on a given host batch (B, T) — text windows or a synthetic task's batch (data/tasks.h); with
// loss_weights (B·T, host), the gradient is of the weighted loss (GpuModel::set_loss_weights).
inline StepStats train_step_on(GpuModel& model, const int* inputs, const int* targets, int B, int T, int step,
                               const TrainFlags& f, const StepHooks& hooks, const float* loss_weights) {
    StepStats s;
    s.lr = lr_at(step, f.steps, f.warmup, f.lr, f.min_lr_frac);
    model.set_batch(inputs, targets, B, T);
    model.forward(model.tokens_buf.ptr, model.targets_buf.ptr, B, T);
    model.zero_grad();
    if (loss_weights) model.set_loss_weights(loss_weights);
    model.backward(hooks.layer_done);
    if (hooks.after_backward) hooks.after_backward();
    if (hooks.update) {
        hooks.update(s.lr, step + 1);
    } else {
        AdamWConfig opt;
        opt.weight_decay = f.weight_decay;  // beta1 0.9, beta2 0.95, eps 1e-8 as in model/adamw.h
        model.update(opt, s.lr, step + 1, f.grad_clip);
    }
    if (hooks.after_update) hooks.after_update();
    if (model.cfg.moe) {  // balancing from this step's loads, for the next step's routing
        model.moe_update();
        s.n_experts = model.cfg.n_experts;
        model.expert_share(s.expert_share);
    }
    model.read_scalars(&s.loss, &s.grad_norm);
    return s;
}

// Mean loss per token over the first n_batches · B consecutive windows of `tokens` (as model/trainer.h's
// eval_loss: a last partial batch is padded with copies of its first window, only real rows count). The
// per-token losses come back to the host and are summed there in double, as on the CPU.
inline float eval_loss(GpuModel& model, int* inputs, int* targets, const std::vector<int>& tokens, int B, int T,
                       int n_batches) {
    HL_CHECK(B > 0 && T > 0, "eval_loss: batch and seq-len must be positive, got ", B, " and ", T);
    HL_CHECK(n_batches > 0, "eval_loss: n_batches must be positive, got ", n_batches);
    const int n_windows = num_eval_windows(tokens, T);
    std::vector<float> row_losses((size_t)B * T);
    double sum = 0;
    long long count = 0;
    for (int w = 0, batch = 0; w < n_windows && batch < n_batches; w += B, batch++) {
        const int rows = eval_windows(inputs, targets, tokens, w, B, T);
        for (int b = rows; b < B; b++)
            for (int t = 0; t < T; t++) {
                inputs[(size_t)b * T + t] = inputs[t];
                targets[(size_t)b * T + t] = targets[t];
            }
        model.set_batch(inputs, targets, B, T);
        model.forward(model.tokens_buf.ptr, model.targets_buf.ptr, B, T);
        cudaCheck(cudaMemcpy(row_losses.data(), model.losses, sizeof(float) * (size_t)rows * T,
                             cudaMemcpyDeviceToHost));
        for (long long i = 0; i < (long long)rows * T; i++) sum += row_losses[(size_t)i];
        count += (long long)rows * T;
    }
    return float(sum / double(count));
}

}  // namespace hl::gpu
