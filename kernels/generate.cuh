// generate.cuh — cached, one-token-at-a-time inference on the GPU, mirroring model/generate.h (read that first):
// every layer keeps what the next token needs from the past, and model_step pushes one position of B sequences
// through embedding → blocks → final norm → LM head:
//   A (attention):  a KV cache (B, len, Hkv, d_qk + d_v) of keys after RoPE and values; a sliding-window layer
//                   keeps only its S sink slots and a ring of W slots (len = attn_cache_len, slot = attn_cache_slot)
//   M (Mamba-2):    the conv's last d_conv − 1 inputs (B, d_conv − 1, conv_dim) and the SSM state S (B, H, P, N)
//   H (intra):      both
// The caches are laid out by model/generate.h's layer_cache on an Arena over one device allocation, so they are
// the CPU InferenceState's caches exactly (same order, same sizes: cache_bytes() agree).
//
// Reused with one row per sequence (T = 1): cuBLAS projections and LM head (matmul.cuh), rmsnorm, rope at
// position pos (rope_forward's pos0), embedding, swiglu, moe_forward (N = B), the intra fusion tail
// (intra_fuse_forward, N = B) and value expansion, Mamba-2's conv-input gather, split and gate kernels.
// New here, because the training kernels have no single-step form:
//   attn_cache_append_kernel   k, v of the new position into its cache slot
//   attention_step_kernel      one query per (b, h) against the visible slots: online softmax, GQA
//   conv1d_silu_step_kernel    the causal depthwise conv for one new input (shift the state, one output)
//   ssd_step_kernel            S = exp(dt·A)·S + dt·x ⊗ B;  y = S·C + D·x, one warp per (b, h, p) row of S
// model_prefill is a loop of model_step over the prompt (the chunked training forward does not hand back the
// caches); generate_cached samples on the host with hl::sample_token from the same seeded stream as the CPU's
// generate_cached, so the text equals the CPU's up to fp32 rounding of near-tied logits.
// Nothing is allocated by a step: GpuInferenceState owns one device allocation for the caches, one for the step
// scratch (every layer's views start at the same address: layers run one after another) and one for token ids.
#pragma once
#include <algorithm>              // std::max
#include <cmath>                  // std::sqrt, INFINITY
#include <cstddef>                // size_t
#include <cstdint>                // uint64_t
#include <functional>             // std::function (the streaming callback)
#include <string>                 // std::string, std::to_string
#include <utility>                // std::swap of the residual buffers
#include <vector>                 // std::vector
#include <cuda_runtime.h>         // cudaStream_t, cudaMemcpyAsync, cudaMemsetAsync
#include "kernels/attention.cuh"  // attn::MAX_DQK, attn::MAX_DV (the same head-dim limits as the training kernels)
#include "kernels/common.cuh"     // DeviceBuffer, cudaCheck, cudaCheckLast, ceil_div, elementwise_grid, add, warp_sum
#include "kernels/embedding.cuh"  // embedding_forward for the new tokens
#include "kernels/intra.cuh"      // GpuIntraActs, intra_fuse_forward, intra_expand_v_kernel
#include "kernels/mamba2.cuh"     // mamba2_conv_in_kernel, mamba2_split_kernel, mamba2_gate_forward
#include "kernels/matmul.cuh"     // matmul_forward: every projection and the LM head
#include "kernels/model.cuh"      // GpuModel
#include "kernels/moe.cuh"        // GpuMoEActs, gpu_moe_acts, moe_forward, MoEGemm
#include "kernels/rmsnorm.cuh"    // rmsnorm_forward: block norms, gated norm, final norm
#include "kernels/rope.cuh"       // rope_forward at position pos
#include "kernels/swiglu.cuh"     // swiglu_forward
#include "model/attention.h"      // AttnConfig, AttnParams
#include "model/block.h"          // BlockConfig, BlockParams
#include "model/common.h"         // Arena, Rng, HL_CHECK
#include "model/embedding.h"      // embedding_check_tokens: host-side id checks before an upload
#include "model/generate.h"       // LayerCache, AttnCache, Mamba2State, layer_cache, attn_cache_len/slot,
                                  // Mamba2Step, mamba2_step_scratch, sample_token
#include "model/intra.h"          // IntraConfig, IntraParams
#include "model/mamba2.h"         // Mamba2Config, Mamba2Params, MAMBA2_NORM_EPS
#include "model/swiglu.h"         // SwiGLUActs

namespace hl::gpu {

// ---------------------------------------------------------------------------------------------------------
// 1. Step scratch (rewritten every step)
// ---------------------------------------------------------------------------------------------------------

// The attention branch, one row per sequence. (The CPU's AttnStep also keeps the softmax weights per slot; the
// GPU kernel's online softmax needs none.)
struct GpuAttnStep {
    float* q = nullptr;  // (B, H, d_qk)    the new query, after RoPE
    float* k = nullptr;  // (B, Hkv, d_qk)  the new key, after RoPE (then copied into the cache)
    float* v = nullptr;  // (B, Hkv, d_v)   the new value (then copied into the cache)
    float* y = nullptr;  // (B, H·d_v)      branch output
};

inline GpuAttnStep gpu_attn_step_scratch(Arena<float>& a, const AttnConfig& c, int B) {
    GpuAttnStep s;
    s.q = a.take("q", {B, c.n_heads, c.d_qk});
    s.k = a.take("k", {B, c.n_kv_heads, c.d_qk});
    s.v = a.take("v", {B, c.n_kv_heads, c.d_v});
    s.y = a.take("y", {B, c.n_heads * c.d_v});
    return s;
}

// One block's step scratch: the CPU's BlockStep with the GPU's fusion and MoE activations. The Mamba-2 part is
// model/generate.h's Mamba2Step itself (all its tensors, rstd included, are fp32 here).
struct GpuBlockStep {
    float* n1 = nullptr;     // (B, D)  RMSNorm(x)
    float* rstd1 = nullptr;  // (B)
    GpuAttnStep attn{};
    Mamba2Step<float> ssm{};
    float* x_shared = nullptr;  // (B, Ws)  H with value=shared: V expanded to the query heads
    GpuIntraActs<float> fuse{}; // H: only the fusion tail's fields (a1 … tmp_out), one row per sequence
    float* mix = nullptr;    // (B, D)  mixer output
    float* h = nullptr;      // (B, D)  x + mix
    float* n2 = nullptr;     // (B, D)  RMSNorm(h)
    float* rstd2 = nullptr;  // (B)
    SwiGLUActs<float> ffn{}; // forward fields only (h1, h3, h)
    GpuMoEActs<float> moe{}; // with MoE instead: the mixture's activations for B rows
    float* ffo = nullptr;    // (B, D)  FFN output
};

inline GpuBlockStep gpu_block_step_scratch(Arena<float>& a, Arena<int>& ia, const BlockConfig& c, int B) {
    const int D = c.d_model;
    GpuBlockStep s;
    s.n1 = a.take("n1", {B, D});
    s.rstd1 = a.take("rstd1", {B});
    if (c.kind == 'A') s.attn = gpu_attn_step_scratch(a, c.attn, B);
    if (c.kind == 'M') s.ssm = mamba2_step_scratch(a, c.ssm, B, /*mixer=*/true);
    if (c.kind == 'H') {
        const IntraConfig& ic = c.intra;
        const int Wa = ic.attn_width(), Ws = ic.ssm_width(), Wf = ic.fused_width();
        s.attn = gpu_attn_step_scratch(a, ic.attn, B);
        s.ssm = mamba2_step_scratch(a, ic.ssm, B, /*mixer=*/false);
        s.x_shared = a.take("x_shared", {B, Ws});
        s.fuse.a1 = a.take("a1", {B, Wa});
        s.fuse.rstd_a = a.take("rstd_a", {B, ic.attn.n_heads});
        s.fuse.a3 = a.take("a3", {B, Wa});
        s.fuse.s1 = a.take("s1", {B, Ws});
        s.fuse.rstd_s = a.take("rstd_s", {B, ic.ssm.nheads()});
        s.fuse.s2 = a.take("s2", {B, Ws});
        s.fuse.f = a.take("f", {B, Wf});
        s.fuse.tmp_out = a.take("tmp_out", {B, D});
    }
    s.mix = a.take("mix", {B, D});
    s.h = a.take("h", {B, D});
    s.n2 = a.take("n2", {B, D});
    s.rstd2 = a.take("rstd2", {B});
    if (c.use_moe) {
        s.moe = gpu_moe_acts(a, ia, c.moe, B);
    } else {
        s.ffn.h1 = a.take("ffn_h1", {B, c.ffn.d_ff});
        s.ffn.h3 = a.take("ffn_h3", {B, c.ffn.d_ff});
        s.ffn.h = a.take("ffn_h", {B, c.ffn.d_ff});
    }
    s.ffo = a.take("ffo", {B, D});
    return s;
}

// ---------------------------------------------------------------------------------------------------------
// 2. The inference state of a whole model on the device: caches + scratch, allocated once
// ---------------------------------------------------------------------------------------------------------

// B sequences of up to max_len tokens each, advancing together one position per model_step (as the CPU's
// InferenceState). Device allocations: `cache` (what carries from step to step: cache_bytes), `scratch` and
// `iscratch` (rewritten every step) and `tokens` (max_len, B): the prompt's columns for model_prefill, one
// position after another, whose first row also takes generate_cached's fed-back token.
struct GpuInferenceState {
    int B = 0, max_len = 0;
    int pos = 0;  // the position the next token goes to = tokens seen so far
    // what this state was laid out for, checked by model_step
    std::string pattern;
    int d_model = 0, vocab_size = 0;
    // how moe_forward runs the routed experts' GEMMs: cublas_loop (one host sync per MoE layer and step) or
    // grouped (no sync)
    MoEGemm moe_gemm = MoEGemm::cublas_loop;

    DeviceBuffer<float> cache;           // every layer's KV cache / conv state / SSM state
    std::vector<LayerCache<float>> layers;  // device views into cache (the CPU's layout)
    DeviceBuffer<float> scratch;
    DeviceBuffer<int> iscratch;          // index scratch (MoE routing), laid out like scratch
    std::vector<GpuBlockStep> steps;     // views into scratch; every layer's start at the same address
    float* x = nullptr;      // (B, D)  residual stream into a block
    float* y = nullptr;      // (B, D)  residual stream out of a block (then swapped with x)
    float* xf = nullptr;     // (B, D)  final norm
    float* rstdf = nullptr;  // (B)
    DeviceBuffer<int> tokens;            // (max_len, B) token ids by position (model_prefill, generate_cached)
    std::vector<int> tokens_host;        // (max_len, B) host staging of the same

    GpuInferenceState(const GpuModel& m, int B_, int max_len_)
        : B(B_), max_len(max_len_), pattern(m.cfg.pattern), d_model(m.cfg.d_model), vocab_size(m.cfg.vocab_size) {
        HL_CHECK(B > 0 && max_len > 0, "GpuInferenceState: batch and max_len must be positive, got batch ", B,
                 ", max_len ", max_len);
        const int L = m.cfg.n_layers, D = m.cfg.d_model;
        HL_CHECK(int(m.blocks.size()) == L, "GpuInferenceState: the model has ", m.blocks.size(),
                 " block configs for ", L, " layers");
        for (const BlockConfig& c : m.blocks) {  // the attention step kernel's limits (those of the training kernels)
            const AttnConfig* ac = c.kind == 'A' ? &c.attn : c.kind == 'H' ? &c.intra.attn : nullptr;
            if (ac)
                HL_CHECK(ac->d_qk <= attn::MAX_DQK && ac->d_v <= attn::MAX_DV, "GpuInferenceState: head dims d_qk ",
                         ac->d_qk, ", d_v ", ac->d_v, " above the GPU limits ", attn::MAX_DQK, ", ", attn::MAX_DV);
        }
        // caches: model/generate.h's layout, counted, then carved out of one zeroed device allocation
        auto cache_layout = [&](Arena<float>& a) {
            layers.clear();
            for (int l = 0; l < L; l++) {
                Arena<float>::Scope s(a, "layers." + std::to_string(l) + ".");
                layers.push_back(layer_cache(a, m.blocks[size_t(l)], B, max_len));
            }
        };
        Arena<float> count;
        cache_layout(count);
        cache.alloc(count.size);
        cache.zero();
        Arena<float> ca(cache.ptr);
        cache_layout(ca);
        // scratch: the model-level buffers, then one block's scratch per layer from the same address (no layer
        // reads another's scratch), as large as the widest layer needs
        size_t iwidest = 0;
        auto scratch_layout = [&](float* base, int* ibase) {
            Arena<float> a(base);
            x = a.take("x", {B, D});
            y = a.take("y", {B, D});
            xf = a.take("xf", {B, D});
            rstdf = a.take("rstdf", {B});
            const size_t common = a.size;
            size_t widest = 0;
            steps.clear();
            for (int l = 0; l < L; l++) {
                Arena<float> la(base ? base + common : nullptr);
                Arena<int> ia(ibase);
                steps.push_back(gpu_block_step_scratch(la, ia, m.blocks[size_t(l)], B));
                widest = std::max(widest, la.size);
                iwidest = std::max(iwidest, ia.size);
            }
            return common + widest;
        };
        scratch.alloc(scratch_layout(nullptr, nullptr));
        scratch.zero();
        if (iwidest > 0) iscratch.alloc(iwidest);
        scratch_layout(scratch.ptr, iscratch.ptr);
        tokens.alloc((size_t)max_len * B);
        tokens_host.assign((size_t)max_len * B, 0);
    }
    // the views point into this object's own buffers (and DeviceBuffer cannot be copied)
    GpuInferenceState(const GpuInferenceState&) = delete;
    GpuInferenceState& operator=(const GpuInferenceState&) = delete;

    // Back to the empty context: zero caches and states, position 0.
    void reset(cudaStream_t stream = 0) {
        if (cache.n) cudaCheck(cudaMemsetAsync(cache.ptr, 0, cache.n * sizeof(float), stream));
        pos = 0;
    }

    // Bytes carried from step to step (KV caches, conv and SSM states), not the per-step scratch: the CPU
    // InferenceState<float>'s cache_bytes() for the same model, B and max_len.
    size_t cache_bytes() const { return cache.n * sizeof(float); }
};

// ---------------------------------------------------------------------------------------------------------
// 3. Attention, one step
// ---------------------------------------------------------------------------------------------------------

// The slot of position p in a cache of attn_cache_len slots: model/generate.h's attn_cache_slot on the device.
__device__ __forceinline__ int attn_step_slot(int p, int window, int sink) {
    return window > 0 && p >= sink ? sink + (p - sink) % window : p;
}

// k (B, Hkv·d_qk) and v (B, Hkv·d_v) of the new position into slot `slot` of k_cache (B, len, Hkv, d_qk) and
// v_cache (B, len, Hkv, d_v). Grid-stride over the B·(Wk + Wv) elements, consecutive threads on consecutive
// columns of one row (coalesced both ways).
template <typename T>
__global__ void attn_cache_append_kernel(T* k_cache, T* v_cache, const T* k, const T* v, int B, int len, int slot,
                                         int Wk, int Wv) {
    const int W = Wk + Wv;
    const size_t total = (size_t)B * W;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const size_t b = i / W;
        const int c = (int)(i % W);
        if (c < Wk) k_cache[(b * len + slot) * Wk + c] = k[b * Wk + c];
        else v_cache[(b * len + slot) * Wv + (c - Wk)] = v[b * Wv + (c - Wk)];
    }
}

// out (B, H, d_v) = Σ_s att[s] · v_s, att = softmax_s(q · k_s / √d_qk) over the positions s the query at pos can
// see, as model/generate.h's attention_step: two runs in increasing order, [0, sink_end) and [win_begin, pos]
// (without a window: every s ≤ pos, the second run empty), position s read from slot attn_step_slot(s).
// Grid: B·H blocks, one per (b, h); ATTN_STEP_THREADS threads = 8 warps. Warp w takes the visible positions
// w, w + 8, … of the enumeration: its lanes stride the d_qk channels of the key (coalesced), a shuffle sum gives
// the score, and the warp keeps an online softmax — running max m, running sum l of exp(s − m), and the
// unnormalised output over d_v (lane-strided, ≤ 8 values a lane) rescaled by exp(m_old − m_new) when m grows.
// The 8 warps' (m, l, acc) are then merged through shared memory: o = Σ_w acc_w·e^{m_w − M} / Σ_w l_w·e^{m_w − M}.
// Query head h reads kv head h / (H / Hkv) (GQA); the new position is always visible, so no row is empty.
constexpr int ATTN_STEP_THREADS = 256;
constexpr int ATTN_STEP_WARPS = ATTN_STEP_THREADS / 32;
constexpr int ATTN_STEP_QK = attn::MAX_DQK / 32;  // query / key channels per lane
constexpr int ATTN_STEP_V = attn::MAX_DV / 32;    // output channels per lane

template <typename T>
__global__ void __launch_bounds__(ATTN_STEP_THREADS)
    attention_step_kernel(T* out, const T* q, const T* k_cache, const T* v_cache, int pos, int len, int H, int Hkv,
                          int d_qk, int d_v, int window, int sink, float scale) {
    __shared__ float m_sh[ATTN_STEP_WARPS], l_sh[ATTN_STEP_WARPS];
    __shared__ float acc_sh[ATTN_STEP_WARPS][attn::MAX_DV];
    const int b = blockIdx.x / H, h = blockIdx.x % H, g = h / (H / Hkv);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const T* qh = q + ((size_t)b * H + h) * d_qk;  // (d_qk)
    float qr[ATTN_STEP_QK];
#pragma unroll
    for (int c = 0; c < ATTN_STEP_QK; c++) {
        const int d = lane + 32 * c;
        qr[c] = d < d_qk ? float(qh[d]) : 0.f;
    }
    const int sink_end = window > 0 ? min(sink, pos + 1) : pos + 1;
    const int win_begin = window > 0 ? max(sink_end, pos - window + 1) : pos + 1;
    const int n_vis = sink_end + (pos + 1 - win_begin);

    float m = -INFINITY, l = 0.f, acc[ATTN_STEP_V];
#pragma unroll
    for (int c = 0; c < ATTN_STEP_V; c++) acc[c] = 0.f;
    for (int i = warp; i < n_vis; i += ATTN_STEP_WARPS) {  // warp-uniform: the shuffles see all 32 lanes
        const int s = i < sink_end ? i : win_begin + (i - sink_end);
        const int j = attn_step_slot(s, window, sink);
        const T* kj = k_cache + (((size_t)b * len + j) * Hkv + g) * d_qk;  // (d_qk)
        const T* vj = v_cache + (((size_t)b * len + j) * Hkv + g) * d_v;   // (d_v)
        float dot = 0.f;
#pragma unroll
        for (int c = 0; c < ATTN_STEP_QK; c++) {
            const int d = lane + 32 * c;
            if (d < d_qk) dot = fmaf(qr[c], float(kj[d]), dot);
        }
        const float sc = warp_sum(dot) * scale;
        const float m_new = fmaxf(m, sc);
        const float corr = expf(m - m_new);  // 0 at the warp's first position (m = −∞)
        const float p = expf(sc - m_new);
        l = l * corr + p;
#pragma unroll
        for (int c = 0; c < ATTN_STEP_V; c++) {
            const int e = lane + 32 * c;
            if (e < d_v) acc[c] = acc[c] * corr + p * float(vj[e]);
        }
        m = m_new;
    }
    if (lane == 0) m_sh[warp] = m, l_sh[warp] = l;
#pragma unroll
    for (int c = 0; c < ATTN_STEP_V; c++) {
        const int e = lane + 32 * c;
        if (e < d_v) acc_sh[warp][e] = acc[c];
    }
    __syncthreads();
    // merge: a warp without positions has m = −∞, l = 0, acc = 0 and weight e^{−∞} = 0; warp 0 always has one
    float M = -INFINITY;
    for (int w = 0; w < ATTN_STEP_WARPS; w++) M = fmaxf(M, m_sh[w]);
    float wgt[ATTN_STEP_WARPS], L = 0.f;
#pragma unroll
    for (int w = 0; w < ATTN_STEP_WARPS; w++) {
        wgt[w] = expf(m_sh[w] - M);
        L += l_sh[w] * wgt[w];
    }
    const float inv_L = 1.f / L;
    T* o = out + ((size_t)b * H + h) * d_v;  // (d_v)
    for (int e = threadIdx.x; e < d_v; e += ATTN_STEP_THREADS) {
        float acc_e = 0.f;
#pragma unroll
        for (int w = 0; w < ATTN_STEP_WARPS; w++) acc_e += acc_sh[w][e] * wgt[w];
        o[e] = T(acc_e * inv_L);
    }
}

// out (B, H, d_v): the query q (B, H, d_qk) of position pos against the caches' visible slots (see the kernel).
template <typename T>
void attention_step(T* out, const T* q, const T* k_cache, const T* v_cache, int B, int pos, int len, int H, int Hkv,
                    int d_qk, int d_v, int window = 0, int sink = 0, cudaStream_t stream = 0) {
    HL_CHECK(B > 0 && H > 0 && Hkv > 0 && H % Hkv == 0, "attention step (gpu): bad heads H=", H, " Hkv=", Hkv);
    HL_CHECK(d_qk >= 1 && d_qk <= attn::MAX_DQK && d_v >= 1 && d_v <= attn::MAX_DV, "attention step (gpu): head dims d_qk=",
             d_qk, " d_v=", d_v, " outside [1, ", attn::MAX_DQK, "] and [1, ", attn::MAX_DV, "]");
    HL_CHECK(pos >= 0 && attn_cache_slot(pos, window, sink) < len, "attention step (gpu): position ", pos,
             " has no slot in a cache of ", len);
    const float scale = 1.f / std::sqrt(float(d_qk));  // the CPU's T(1) / std::sqrt(T(d_qk))
    attention_step_kernel<<<B * H, ATTN_STEP_THREADS, 0, stream>>>(out, q, k_cache, v_cache, pos, len, H, Hkv, d_qk,
                                                                   d_v, window, sink, scale);
    cudaCheckLast();
}

// The attention branch for the token at position pos: project q, k, v, rotate q and k to pos, put k and v in
// pos's cache slot, attend over the visible positions ≤ pos. The output is s.y (B, H·d_v); inp (B, D).
inline void attn_branch_step(GpuAttnStep& s, AttnCache<float>& cache, const float* inp, const AttnParams<float>& p,
                             const AttnConfig& c, int B, int pos, int max_len, cudaStream_t stream = 0) {
    const int D = c.d_model, H = c.n_heads, Hkv = c.n_kv_heads, dqk = c.d_qk, dv = c.d_v;
    HL_CHECK(cache.len == attn_cache_len(c, max_len), "attention step (gpu): the cache has ", cache.len,
             " slots, this layer needs ", attn_cache_len(c, max_len));
    gpu::matmul_forward(s.q, inp, p.wq, (const float*)nullptr, B, D, H * dqk, stream);
    gpu::matmul_forward(s.k, inp, p.wk, (const float*)nullptr, B, D, Hkv * dqk, stream);
    gpu::matmul_forward(s.v, inp, p.wv, (const float*)nullptr, B, D, Hkv * dv, stream);
    // one "time step" per sequence at position pos: the rotation the full forward gives token pos
    gpu::rope_forward(s.q, s.q, B, 1, H, dqk, c.rope_theta, pos, stream);
    gpu::rope_forward(s.k, s.k, B, 1, Hkv, dqk, c.rope_theta, pos, stream);
    const int slot = attn_cache_slot(pos, c.window, c.sink);
    const size_t n = (size_t)B * Hkv * (dqk + dv);
    attn_cache_append_kernel<<<elementwise_grid(n, 256), 256, 0, stream>>>(cache.k, cache.v, s.k, s.v, B, cache.len,
                                                                           slot, Hkv * dqk, Hkv * dv);
    cudaCheckLast();
    gpu::attention_step(s.y, s.q, cache.k, cache.v, B, pos, cache.len, H, Hkv, dqk, dv, c.window, c.sink, stream);
}

// ---------------------------------------------------------------------------------------------------------
// 4. Mamba-2, one step
// ---------------------------------------------------------------------------------------------------------

// The causal depthwise conv for one new input, with its SiLU (model/generate.h's conv1d_silu_step). The state
// holds the previous K−1 inputs, oldest first:
//   out[c] = SiLU(bias[c] + Σ_{k<K−1} w[c, k] · state[k, c] + w[c, K−1] · inp[c])
// then the state shifts by one and inp becomes its newest entry. One thread per (b, c), grid-stride: consecutive
// threads on consecutive channels (the state rows, inp and out are read and written coalesced).
// out (B, C) written; conv_state (B, K−1, C) updated (null when K = 1); inp (B, C); w (C, K); bias (C).
template <typename T>
__global__ void conv1d_silu_step_kernel(T* out, T* conv_state, const T* inp, const T* w, const T* bias, int B, int C,
                                        int K) {
    const size_t total = (size_t)B * C;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const size_t b = i / C;
        const int c = (int)(i % C);
        T* st = conv_state ? conv_state + b * (K - 1) * C : nullptr;  // (K−1, C)
        const float xc = float(inp[i]);
        const T* wc = w + (size_t)c * K;  // (K)
        float acc = float(bias[c]);
        for (int k = 0; k < K - 1; k++) acc += float(wc[k]) * float(st[(size_t)k * C + c]);
        acc += float(wc[K - 1]) * xc;
        out[i] = T(dev_silu(acc));
        // shift: the oldest input leaves, the new one enters at the end
        for (int k = 0; k + 1 < K - 1; k++) st[(size_t)k * C + c] = st[(size_t)(k + 1) * C + c];
        if (K > 1) st[(size_t)(K - 2) * C + c] = T(xc);
    }
}

template <typename T>
void conv1d_silu_step(T* out, T* conv_state, const T* inp, const T* w, const T* bias, int B, int C, int K,
                      cudaStream_t stream = 0) {
    HL_CHECK(B > 0 && C > 0 && K > 0, "conv1d step (gpu): bad sizes B=", B, " C=", C, " K=", K);
    HL_CHECK(K == 1 || conv_state != nullptr, "conv1d step (gpu): a conv of width ", K, " needs its state");
    const size_t n = (size_t)B * C;
    conv1d_silu_step_kernel<<<elementwise_grid(n, 256), 256, 0, stream>>>(out, conv_state, inp, w, bias, B, C, K);
    cudaCheckLast();
}

// One step of the SSD recurrence (DESIGN.md §1), per sequence b and head h (group g = h / (H/G)):
//   S = exp(dt·A_h) · S + dt · x ⊗ B        y = S · C + D_h · x
// One warp per row (b, h, p) of the state: lanes stride its N entries (coalesced), each updates its entries and
// adds its share of S[p, :] · C, a shuffle sum gives y[p]. Row r = (b·H + h)·P + p is also the index of x and y
// (B, H, P) and the row of state (B, H, P, N). SSD_STEP_THREADS / 32 rows per block.
// y (B, H, P) written; state (B, H, P, N) updated; x (B, H, P); dt (B, H); A, D (H); Bm, Cm (B, G, N).
constexpr int SSD_STEP_THREADS = 256;

template <typename T>
__global__ void __launch_bounds__(SSD_STEP_THREADS)
    ssd_step_kernel(T* y, T* state, const T* x, const T* dt, const T* A, const T* Bm, const T* Cm, const T* D, int B,
                    int H, int P, int G, int N) {
    const int row = blockIdx.x * (SSD_STEP_THREADS / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= B * H * P) return;  // whole warps leave together: row is warp-uniform
    const int bh = row / P, h = bh % H, b = bh / H, g = h / (H / G);
    const float dth = float(dt[bh]);
    const float decay = expf(dth * float(A[h]));  // in (0, 1]: the share of the old state that survives
    const float xp = float(x[row]);
    const T* Bt = Bm + ((size_t)b * G + g) * N;  // (N)
    const T* Ct = Cm + ((size_t)b * G + g) * N;  // (N)
    T* S = state + (size_t)row * N;              // (N): S[p, :] of (b, h)
    float acc = 0.f;
    for (int n = lane; n < N; n += 32) {
        const float v = decay * float(S[n]) + dth * xp * float(Bt[n]);
        S[n] = T(v);
        acc += v * float(Ct[n]);
    }
    acc = warp_sum(acc);
    if (lane == 0) y[row] = T(acc + float(D[h]) * xp);
}

template <typename T>
void ssd_step(T* y, T* state, const T* x, const T* dt, const T* A, const T* Bm, const T* Cm, const T* D, int B, int H,
              int P, int G, int N, cudaStream_t stream = 0) {
    HL_CHECK(B > 0 && H > 0 && P > 0 && G > 0 && N > 0 && H % G == 0, "ssd step (gpu): bad sizes B=", B, " H=", H,
             " P=", P, " G=", G, " N=", N);
    const int rows = B * H * P, per_block = SSD_STEP_THREADS / 32;
    ssd_step_kernel<<<ceil_div(rows, per_block), SSD_STEP_THREADS, 0, stream>>>(y, state, x, dt, A, Bm, Cm, D, B, H, P,
                                                                               G, N);
    cudaCheckLast();
}

// The Mamba-2 branch for one new token, the step form of mamba2_branch_forward: writes s.g (B, d_inner).
// inp (B, d_model); x_shared (B, d_inner) when c.shared_x, else null. The gather, split and gate are the
// training forward's kernels with one row per sequence.
inline void mamba2_branch_step(Mamba2Step<float>& s, Mamba2State<float>& st, const float* inp, const float* x_shared,
                               const Mamba2Params<float>& p, const Mamba2Config& c, int B, cudaStream_t stream = 0) {
    HL_CHECK(c.shared_x == (x_shared != nullptr),
             "mamba2 step (gpu): x_shared must be given exactly when shared_x is set");
    const int D = c.d_model, DI = c.d_inner, H = c.nheads(), GN = c.ngroups * c.d_state;
    const int CD = c.conv_dim(), DIP = c.d_in_proj();
    // [z, xBC, dt_raw] = in_proj · u
    gpu::matmul_forward(s.zxbcdt, inp, p.in_proj, (const float*)nullptr, B, D, DIP, stream);
    // the conv's new input [x, B, C]: all from in_proj, or x from outside
    mamba2_conv_in_kernel<<<elementwise_grid((size_t)B * CD, 256), 256, 0, stream>>>(s.conv_in, s.zxbcdt, x_shared,
                                                                                      B, DI, CD, DIP);
    cudaCheckLast();
    // xBC = SiLU(conv1d(xBC)), from the conv state and the new input
    gpu::conv1d_silu_step(s.xBC, st.conv, s.conv_in, p.conv_w, p.conv_b, B, CD, c.d_conv, stream);
    // split [x, B, C]; dt = softplus(dt_raw + dt_bias); A = −exp(A_log)
    mamba2_split_kernel<<<elementwise_grid((size_t)B * (CD + H), 256), 256, 0, stream>>>(
        s.x, s.Bm, s.Cm, s.dt, s.A, s.xBC, s.zxbcdt, p.dt_bias, p.A_log, B, DI, GN, H, DIP, DIP - H);
    cudaCheckLast();
    // S = exp(dt·A)·S + dt·x⊗B,  y = S·C + D·x
    gpu::ssd_step(s.y, st.ssm, s.x, s.dt, s.A, s.Bm, s.Cm, p.D, B, H, c.headdim, c.ngroups, c.d_state, stream);
    // g = y ⊙ SiLU(z)
    mamba2_gate_forward(s.g, s.y, s.zxbcdt, B, DI, DIP, stream);
}

// ---------------------------------------------------------------------------------------------------------
// 5. Blocks and the whole model, one step
// ---------------------------------------------------------------------------------------------------------

// y (B, D) = block(x (B, D)) for the token at position pos; the layer's cache is read and extended.
inline void block_step(float* y, GpuBlockStep& s, LayerCache<float>& cache, const float* x,
                       const BlockParams<float>& p, const float* moe_bias, const BlockConfig& c, int B, int pos,
                       int max_len, MoEGemm moe_gemm = MoEGemm::cublas_loop, cudaStream_t stream = 0) {
    const int D = c.d_model;
    const size_t BD = (size_t)B * D;
    const float eps = float(c.norm_eps);
    gpu::rmsnorm_forward(s.n1, s.rstd1, x, p.norm1, B, 1, D, eps, stream);
    if (c.kind == 'A') {  // Wo · Attn
        gpu::attn_branch_step(s.attn, cache.attn, s.n1, p.attn, c.attn, B, pos, max_len, stream);
        gpu::matmul_forward(s.mix, s.attn.y, p.attn.wo, (const float*)nullptr, B, c.attn.n_heads * c.attn.d_v, D,
                            stream);
    }
    if (c.kind == 'M') {  // out_proj(RMSNorm_grouped(y ⊙ SiLU(z)) · norm_w)
        const Mamba2Config& mc = c.ssm;
        gpu::mamba2_branch_step(s.ssm, cache.ssm, s.n1, (const float*)nullptr, p.ssm, mc, B, stream);
        gpu::rmsnorm_forward(s.ssm.gn, s.ssm.rstd, s.ssm.g, p.ssm.norm_w, B, mc.ngroups, mc.d_inner / mc.ngroups,
                             float(MAMBA2_NORM_EPS), stream);
        gpu::matmul_forward(s.mix, s.ssm.gn, p.ssm.out_proj, (const float*)nullptr, B, mc.d_inner, D, stream);
    }
    if (c.kind == 'H') {  // both branches (attention first: with shared values Mamba reads its V), then fuse
        const IntraConfig& ic = c.intra;
        gpu::attn_branch_step(s.attn, cache.attn, s.n1, p.intra.attn, ic.attn, B, pos, max_len, stream);
        const float* x_shared = nullptr;
        if (ic.fusion.value == FusionValue::shared) {
            const size_t n = (size_t)B * ic.ssm_width();
            intra_expand_v_kernel<<<elementwise_grid(n, 256), 256, 0, stream>>>(
                s.x_shared, s.attn.v, B, ic.attn.n_heads, ic.attn.n_kv_heads, ic.attn.d_v);
            cudaCheckLast();
            x_shared = s.x_shared;
        }
        gpu::mamba2_branch_step(s.ssm, cache.ssm, s.n1, x_shared, p.intra.ssm, ic.ssm, B, stream);
        gpu::intra_fuse_forward(s.mix, s.fuse, s.attn.y, s.ssm.g, p.intra, ic, B, stream);
    }
    gpu::add(s.h, x, s.mix, BD, stream);
    gpu::rmsnorm_forward(s.n2, s.rstd2, s.h, p.norm2, B, 1, D, eps, stream);
    if (c.use_moe) gpu::moe_forward(s.ffo, s.moe, s.n2, p.moe, moe_bias, c.moe, B, stream, moe_gemm);
    else gpu::swiglu_forward(s.ffo, s.ffn, s.n2, p.ffn, c.ffn, B, stream);
    gpu::add(y, s.h, s.ffo, BD, stream);
}

// logits_dev (B, V) of the token after tokens_dev (B, device ids in [0, V)), one per sequence, each placed at
// position st.pos; the caches take the new position in, and st.pos advances by one. Queued on m.stream; no host
// sync (except moe_forward's, with MoEGemm::cublas_loop).
inline void model_step(float* logits_dev, GpuInferenceState& st, const GpuModel& m, const int* tokens_dev) {
    const ModelConfig& c = m.cfg;
    HL_CHECK(st.pattern == c.pattern && st.d_model == c.d_model && st.vocab_size == c.vocab_size,
             "model_step (gpu): the inference state was made for another model (pattern ", st.pattern, ", d_model ",
             st.d_model, ", vocab ", st.vocab_size, "; this model has ", c.pattern, ", ", c.d_model, ", ",
             c.vocab_size, ")");
    HL_CHECK(st.pos < st.max_len, "model_step (gpu): the inference state is full: ", st.max_len,
             " positions (max_len) are used; make it with a larger max_len or reset() it");
    const int B = st.B, D = c.d_model, V = c.vocab_size;
    gpu::embedding_forward(st.x, tokens_dev, m.p.embed, B, 1, V, D, m.stream);
    for (int l = 0; l < c.n_layers; l++) {
        gpu::block_step(st.y, st.steps[size_t(l)], st.layers[size_t(l)], st.x, m.p.layers[size_t(l)],
                        m.moe_bias[size_t(l)], m.blocks[size_t(l)], B, st.pos, st.max_len, st.moe_gemm, m.stream);
        std::swap(st.x, st.y);  // this block's output is the next one's input
    }
    gpu::rmsnorm_forward(st.xf, st.rstdf, st.x, m.p.norm_f, B, 1, D, float(c.norm_eps), m.stream);
    gpu::matmul_forward(logits_dev, st.xf, m.p.lm_head, (const float*)nullptr, B, D, V, m.stream);
    st.pos++;
}

// Feeds host tokens (B, T_) one position at a time; logits_dev (B, V) are those after the last one. The ids are
// checked on the host and copied up once, by position (st.tokens rows st.pos … st.pos + T_ − 1); then a loop of
// model_step reads one row per position. (A plain loop of steps: T_ sequential steps, not the chunked training
// forward, which does not hand back the caches.)
inline void model_prefill(float* logits_dev, GpuInferenceState& st, const GpuModel& m, const int* tokens, int T_) {
    HL_CHECK(T_ > 0, "model_prefill (gpu): need at least one token, got ", T_);
    HL_CHECK(st.pos + T_ <= st.max_len, "model_prefill (gpu): ", T_, " tokens after ", st.pos,
             " do not fit in the inference state's max_len = ", st.max_len);
    embedding_check_tokens(tokens, st.B, T_, m.cfg.vocab_size);
    const int B = st.B, p0 = st.pos;
    for (int t = 0; t < T_; t++)
        for (int b = 0; b < B; b++) st.tokens_host[(size_t)(p0 + t) * B + b] = tokens[(size_t)b * T_ + t];
    // pageable source: the call returns once the host buffer has been read (staged), nothing else touches it
    cudaCheck(cudaMemcpyAsync(st.tokens.ptr + (size_t)p0 * B, st.tokens_host.data() + (size_t)p0 * B,
                              sizeof(int) * (size_t)T_ * B, cudaMemcpyHostToDevice, m.stream));
    for (int t = 0; t < T_; t++) gpu::model_step(logits_dev, st, m, st.tokens.ptr + (size_t)(p0 + t) * B);
}

// n_new tokens continuing prompt (the continuation only), one sequence, with the caches, as model/generate.h's
// generate_cached: the prompt is prefilled, then each token is sampled on the host (hl::sample_token, Rng(seed):
// the CPU's stream) from the downloaded logits and fed back as the next step's input. on_token, when set, sees
// each token as soon as it is sampled. One host sync per token (the logits download).
inline std::vector<int> generate_cached(const GpuModel& m, const std::vector<int>& prompt, int n_new,
                                        float temperature, int top_k, uint64_t seed,
                                        std::function<void(int)> on_token = {}) {
    HL_CHECK(!prompt.empty(), "generate (gpu): the prompt must hold at least one token");
    HL_CHECK(n_new >= 0, "generate (gpu): n_new must be non-negative, got ", n_new);
    const int V = m.cfg.vocab_size;
    // the prompt, then every sampled token but the last goes through a step
    GpuInferenceState st(m, 1, int(prompt.size()) + std::max(n_new - 1, 0));
    DeviceBuffer<float> logits_dev((size_t)V);  // (1, V)
    std::vector<float> logits((size_t)V);
    gpu::model_prefill(logits_dev.ptr, st, m, prompt.data(), int(prompt.size()));
    Rng rng(seed);
    std::vector<int> out;
    out.reserve(size_t(n_new));
    for (int i = 0; i < n_new; i++) {
        cudaCheck(cudaMemcpyAsync(logits.data(), logits_dev.ptr, sizeof(float) * V, cudaMemcpyDeviceToHost, m.stream));
        cudaCheck(cudaStreamSynchronize(m.stream));
        const int next = sample_token(logits.data(), V, temperature, top_k, rng);
        out.push_back(next);
        if (on_token) on_token(next);
        if (i + 1 < n_new) {
            // the sampled id goes to its position's row of st.tokens (then read by the step on the stream)
            const size_t row = (size_t)st.pos;
            st.tokens_host[row] = next;
            cudaCheck(cudaMemcpyAsync(st.tokens.ptr + row, st.tokens_host.data() + row, sizeof(int),
                                      cudaMemcpyHostToDevice, m.stream));
            gpu::model_step(logits_dev.ptr, st, m, st.tokens.ptr + row);
        }
    }
    return out;
}

}  // namespace hl::gpu
