// model.h — the whole language model of DESIGN.md §1, assembled from a ModelConfig:
//   tokens (B,T) → embedding (V,D) → blocks by pattern (A | M | H | S) → RMSNorm → LM head → logits (B,T,V)
//   → cross-entropy. Parameters, gradients and activations each live in one allocation with named views.
//
// Parameter names (as stored in checkpoints):
//   embed (V,D) · layers.{i}.norm1 · layers.{i}.mixer.* · layers.{i}.norm2 · layers.{i}.ffn.{w1,w3,w2}
//   · norm_f (D) · lm_head (V,D) only when untied. Mixer tensors: A: wq wk wv wo; M: in_proj conv_w conv_b
//   dt_bias A_log D norm_w out_proj; H: attn.{wq,wk,wv} ssm.{in_proj,…} norm_a norm_s scale_a scale_s
//   out_a out_s | out_proj. With MoE the FFN is ffn.shared.{w1,w3,w2}, ffn.router, ffn.experts.{w1,w3,w2}, and
//   the model keeps one non-trainable buffer per layer, layers.{i}.ffn.expert_bias (the balancing bias), which
//   checkpoints store beside the parameters.
#pragma once
#include <string>                // std::string, std::to_string
#include <vector>                // std::vector
#include "model/block.h"         // BlockConfig/Params/Acts, block_forward/backward
#include "model/common.h"        // Arena, take_layers_sharing_scratch, TensorInfo, Rng, HL_CHECK
#include "model/config.h"        // ModelConfig, config_check
#include "model/crossentropy.h"  // crossentropy_forward/backward
#include "model/embedding.h"     // embedding_forward/backward
#include "model/matmul.h"        // the LM head
#include "model/rmsnorm.h"       // the final norm

namespace hl {

// The per-layer configuration for the pattern letter at layer l.
inline BlockConfig block_config(const ModelConfig& c, int l) {
    BlockConfig b;
    b.kind = c.pattern[size_t(l)];
    b.d_model = c.d_model;
    b.norm_eps = c.norm_eps;
    b.ffn = SwiGLUConfig{c.d_model, c.d_ff};
    if (c.moe) {
        b.use_moe = true;
        b.moe.d_model = c.d_model;
        b.moe.d_ff = c.d_ff / 2;  // shared + one routed expert: the dense FFN's active width
        b.moe.n_experts = c.n_experts;
        b.moe.bias_rate = c.moe_bias_rate;
    }
    if (b.kind == 'A') b.attn = AttnConfig{c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.head_dim, c.rope_theta};
    if (b.kind == 'S') {  // block A whose attention sees the sink and the window only, with its own RoPE base
        b.kind = 'A';
        b.attn = AttnConfig{c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.head_dim, c.swa_rope_theta};
        b.attn.window = c.window;
        b.attn.sink = c.sink;
    }
    // M blocks and the H blocks' Mamba branch differ only in width and head size
    auto ssm = [&](int d_inner, int headdim) {
        Mamba2Config m;
        m.d_model = c.d_model;
        m.d_inner = d_inner;
        m.headdim = headdim;
        m.d_state = c.d_state;
        m.ngroups = c.ngroups;
        m.d_conv = c.d_conv;
        m.chunk = c.chunk;
        return m;
    };
    if (b.kind == 'M') b.ssm = ssm(c.d_ssm, c.ssm_headdim);
    if (b.kind == 'H') {
        IntraConfig& h = b.intra;
        h.d_model = c.d_model;
        h.attn = AttnConfig{c.d_model, c.intra_heads, c.intra_kv_heads, c.intra_d_qk, c.intra_d_v, c.rope_theta};
        h.ssm = ssm(c.intra_d_ssm, c.intra_ssm_headdim);
        h.ssm.shared_x = c.fusion.value == FusionValue::shared;
        h.fusion = c.fusion;
    }
    return b;
}

template <typename T>
struct ModelParams {
    T* embed = nullptr;    // (V, D)
    std::vector<BlockParams<T>> layers;
    T* norm_f = nullptr;   // (D)
    T* lm_head = nullptr;  // (V, D): == embed when tied
};

// Each tensor starts at a multiple of 8 elements (the gaps are never read, stay 0 and get no gradient): the bf16
// copy of a weight then lies 16-byte aligned in kernels/matmul.cuh's params16, as cuBLAS's sm90 kernels need. Packed,
// a 12-head Mamba side's dt_bias, A_log and D (36 values) shifted every later weight by 8 bytes, and those GEMMs
// fell back to sm80 kernels (intra at 350m: 28% of the step).
constexpr size_t kParamAlign = 8;

template <typename T>
ModelParams<T> model_params(Arena<T>& a, const ModelConfig& c) {
    ModelParams<T> p;
    a.align = kParamAlign;
    p.embed = a.take("embed", {c.vocab_size, c.d_model});
    for (int l = 0; l < c.n_layers; l++) {
        typename Arena<T>::Scope s(a, "layers." + std::to_string(l) + ".");
        p.layers.push_back(block_params(a, block_config(c, l)));
    }
    p.norm_f = a.take("norm_f", {c.d_model});
    p.lm_head = c.tied ? p.embed : a.take("lm_head", {c.vocab_size, c.d_model});
    return p;
}

template <typename T>
struct Model {
    ModelConfig cfg;
    std::vector<BlockConfig> blocks;
    std::vector<TensorInfo> tensors;  // every parameter: name, shape, offset into params/grads
    std::vector<T> params, grads;
    ModelParams<T> p, dp;
    // non-trainable state saved with the parameters: the MoE layers' selection biases (E each), named
    // layers.{i}.ffn.expert_bias; empty without MoE
    std::vector<TensorInfo> buffer_tensors;
    std::vector<T> buffers;
    std::vector<T*> moe_bias;  // per layer: its bias in buffers (null for a layer without MoE)

    // activations for one (B, T), allocated by alloc(); nothing is allocated in forward/backward
    int B = 0, T_ = 0;
    std::vector<T> act;
    std::vector<int> iact;               // index activations (MoE routing)
    std::vector<T*> xs;                  // L+1 residual streams (B,T,D): xs[0] embeddings, xs[l+1] block l output
    std::vector<BlockActs<T>> bacts;
    T *xf = nullptr, *rstdf = nullptr;   // final norm (B,T,D), (B,T)
    T *logits = nullptr, *probs = nullptr, *losses = nullptr;  // (B,T,V) (B,T,V) (B,T)
    T *dlogits = nullptr, *dxf = nullptr, *dres = nullptr, *dlosses = nullptr;
    std::vector<int> targets_buf;        // (B,T) the targets of the last forward, for the backward
    const int* last_tokens = nullptr;
    bool have_targets = false;

    explicit Model(const ModelConfig& c) : cfg(c) {
        config_check(cfg);
        for (int l = 0; l < cfg.n_layers; l++) {
            blocks.push_back(block_config(cfg, l));
            block_config_check(blocks.back());
        }
        Arena<T> count(nullptr, &tensors);
        model_params(count, cfg);
        params.assign(count.size, T(0));
        grads.assign(count.size, T(0));
        Arena<T> pa(params.data()), ga(grads.data());
        p = model_params(pa, cfg);
        dp = model_params(ga, cfg);
        Arena<T> count_b(nullptr, &buffer_tensors);
        for (int l = 0; l < cfg.n_layers; l++)
            if (blocks[l].use_moe) count_b.take("layers." + std::to_string(l) + ".ffn.expert_bias", {cfg.n_experts});
        buffers.assign(count_b.size, T(0));  // bias 0: selection by the scores alone at the start
        for (int l = 0, i = 0; l < cfg.n_layers; l++)
            moe_bias.push_back(blocks[l].use_moe ? buffers.data() + size_t(i++) * cfg.n_experts : nullptr);
    }

    // After an optimizer step: each MoE layer's bias moves towards balance, from the last forward's loads.
    void moe_update() {
        for (int l = 0; l < cfg.n_layers; l++)
            if (blocks[l].use_moe) moe_update_bias(moe_bias[l], bacts[l].moe.offsets, cfg.n_experts, cfg.moe_bias_rate);
    }

    // share[e] = fraction of the last forward's tokens routed to expert e, averaged over the MoE layers.
    void expert_share(float* share) const {
        const int E = cfg.n_experts;
        for (int e = 0; e < E; e++) share[e] = 0;
        int layers = 0;
        for (int l = 0; l < cfg.n_layers; l++) {
            if (!blocks[l].use_moe) continue;
            const int* off = bacts[l].moe.offsets;
            for (int e = 0; e < E; e++) share[e] += float(off[e + 1] - off[e]) / float(off[E]);
            layers++;
        }
        for (int e = 0; e < E && layers > 0; e++) share[e] /= float(layers);
    }

    // the parameters themselves (params holds them with model_params' alignment gaps)
    size_t num_params() const { return count_params(tensors); }

    void init(uint64_t seed) {
        Rng rng(seed);
        const double std = cfg.init_std;
        rng.fill_normal(p.embed, (size_t)cfg.vocab_size * cfg.d_model, std);
        for (int l = 0; l < cfg.n_layers; l++) block_init(p.layers[l], blocks[l], rng, cfg.n_layers, std);
        for (int i = 0; i < cfg.d_model; i++) p.norm_f[i] = T(1);
        if (!cfg.tied) rng.fill_normal(p.lm_head, (size_t)cfg.vocab_size * cfg.d_model, std);
    }

    // Lays out every activation for batch B and sequence length T in one allocation.
    void alloc(int B_, int T_) {
        HL_CHECK(B_ > 0 && T_ > 0, "batch and seq-len must be positive, got batch ", B_, ", seq-len ", T_);
        HL_CHECK(T_ <= cfg.max_seq_len, "seq-len ", T_, " is above the model's limit max_seq_len = ", cfg.max_seq_len);
        if (B_ == B && T_ == this->T_) return;
        B = B_;
        this->T_ = T_;
        const int N = B * T_, D = cfg.d_model, V = cfg.vocab_size, L = cfg.n_layers;
        // s: the region the layers' backward scratch shares (take_layers_sharing_scratch)
        auto layout = [&](Arena<T>& a, Arena<int>& ia, Arena<T>& s) {
            xs.clear();
            bacts.clear();
            for (int l = 0; l <= L; l++) xs.push_back(a.take("x", {N, D}));
            take_layers_sharing_scratch(a, s, L, [&](int l) {
                bacts.push_back(block_acts(a, ia, blocks[l], B, T_));
                bacts.back().moe_bias = moe_bias[l];
            });
            xf = a.take("xf", {N, D});
            rstdf = a.take("rstdf", {N});
            logits = a.take("logits", {N, V});
            probs = a.take("probs", {N, V});
            losses = a.take("losses", {N});
            dlogits = a.take("dlogits", {N, V});
            dxf = a.take("dxf", {N, D});
            dres = a.take("dres", {N, D});
            dlosses = a.take("dlosses", {N});
        };
        Arena<T> count, scount;
        Arena<int> icount;
        layout(count, icount, scount);
        act.assign(count.size + scount.size, T(0));  // the scratch region after the rest
        iact.assign(icount.size, 0);
        Arena<T> a(act.data()), s(act.data() + count.size);
        Arena<int> ia(iact.data());
        layout(a, ia, s);
        targets_buf.assign(size_t(N), 0);
    }

    // Logits for tokens (B,T) into this->logits; with targets (B,T), returns the mean cross-entropy
    // (else 0). Rows b of the batch are independent sequences.
    T forward(const int* tokens, const int* targets, int B_, int Tn) {
        alloc(B_, Tn);
        const int N = B * T_, D = cfg.d_model, V = cfg.vocab_size;
        embedding_forward(xs[0], tokens, p.embed, B, T_, V, D);
        for (int l = 0; l < cfg.n_layers; l++) block_forward(xs[l + 1], bacts[l], xs[l], p.layers[l], blocks[l], B, T_);
        rmsnorm_forward(xf, rstdf, xs[cfg.n_layers], p.norm_f, N, 1, D, T(cfg.norm_eps));
        matmul_forward(logits, xf, p.lm_head, (const T*)nullptr, N, D, V);
        last_tokens = tokens;
        have_targets = targets != nullptr;
        if (!targets) return T(0);
        for (int i = 0; i < N; i++) targets_buf[size_t(i)] = targets[i];
        crossentropy_forward(losses, probs, logits, targets, N, V);
        double sum = 0;
        for (int i = 0; i < N; i++) sum += losses[i];
        return T(sum / N);
    }

    void zero_grad() { zero(grads.data(), grads.size()); }

    // Gradients of the mean loss of the last forward (which must have had targets) accumulate into grads, or,
    // given loss_weights (N = B·T), of Σ_i loss_weights[i] · loss_i: a task trained on its answers alone puts
    // 1/count on those and 0 elsewhere. The tokens passed to that forward must still be alive.
    void backward(const T* loss_weights = nullptr) {
        HL_CHECK(have_targets, "backward needs a forward with targets first");
        const int N = B * T_, D = cfg.d_model, V = cfg.vocab_size, L = cfg.n_layers;
        for (int i = 0; i < N; i++) dlosses[i] = loss_weights ? loss_weights[i] : T(1) / T(N);
        crossentropy_backward(dlogits, dlosses, probs, targets_buf.data(), N, V);
        matmul_backward(dxf, dp.lm_head, (T*)nullptr, dlogits, xf, p.lm_head, N, D, V);
        rmsnorm_backward(dres, dp.norm_f, dxf, xs[L], p.norm_f, rstdf, N, 1, D);
        for (int l = L - 1; l >= 0; l--) block_backward(dres, dp.layers[l], dres, bacts[l], xs[l], p.layers[l], blocks[l], B, T_);
        embedding_backward(dp.embed, dres, last_tokens, B, T_, V, D);
    }
};

}  // namespace hl
