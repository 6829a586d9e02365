// test_gpu_attention.cu — the GPU attention core (kernels/attention.cuh) and RoPE (kernels/rope.cuh) against the
// CPU reference (model/attention.h, model/rope.h) run in float on the host, on random inputs; full causal and
// sliding-window (window W, sink S) attention, whose kernels skip the key/query tiles that are fully masked.
// Error measure (max-norm relative to the tensor's scale), stated once:
//   rel_err(g, c) = max_i |g_i − c_i| / max_i |c_i|          (∞ if any GPU value is not finite)
// Tolerances: forward outputs (out, lse, rope) ≤ 1e-4, gradients ≤ 1e-3.
// Every GPU output is poisoned with NaN (all bytes 0xFF) before its kernel runs, so an element the kernel fails
// to write fails the test.
#include <algorithm>                // std::max
#include <cmath>                    // std::fabs, std::isfinite, std::exp, std::log, std::sqrt
#include <cstdint>                  // uint16_t: bf16 bit patterns
#include <cstdio>                   // std::printf for the measured errors
#include <cstring>                  // std::memcpy
#include <vector>                   // std::vector host buffers
#include <doctest/doctest.h>        // TEST_CASE, CHECK, SUBCASE
#include "kernels/attention.cuh"    // hl::gpu::attention_forward/backward
#include "kernels/rope.cuh"         // hl::gpu::rope_forward/backward
#include "model/attention.h"        // hl::attention_forward/backward (CPU reference)
#include "model/rope.h"             // hl::rope_forward/backward (CPU reference)
#include "test/gpu_check.cuh"        // tolerances, poison, randn, rel_err

namespace {

using namespace hl::test;  // FWD_TOL, GRAD_TOL, randn, poison, rel_err


struct AttnErrors {
    double out = 0, lse = 0, dq = 0, dk = 0, dv = 0;
};

// One configuration: CPU forward/backward in float, GPU forward/backward, the errors of every output.
// W = 0: full causal attention; else a sliding window of W with S sinks.
// tc: with bf16 operands in effect (a Bf16Scope, as in a bf16 model), where the tensor-core kernels run.
// offset > 0: q, k, v and dout start that many floats into their buffers (not 16-byte aligned, as tensors carved
// out of an arena can be), so the kernels' unaligned loads run.
AttnErrors run_attention(int B, int T, int H, int Hkv, int dqk, int dv, uint64_t seed, int W = 0, int S = 0,
                         bool tc = false, int offset = 0) {
    hl::Rng rng(seed);
    const size_t nq = (size_t)B * T * H * dqk, nk = (size_t)B * T * Hkv * dqk, nv = (size_t)B * T * Hkv * dv,
                 no = (size_t)B * T * H * dv, nl = (size_t)B * H * T;
    auto q = randn(rng, nq), k = randn(rng, nk), v = randn(rng, nv), dout = randn(rng, no);

    // CPU reference
    std::vector<float> out(no), att((size_t)B * H * T * T), dq(nq), dk(nk), dvv(nv);
    hl::attention_forward(out.data(), att.data(), q.data(), k.data(), v.data(), B, T, H, Hkv, dqk, dv, W, S);
    hl::attention_backward(dq.data(), dk.data(), dvv.data(), dout.data(), att.data(), q.data(), k.data(), v.data(),
                           B, T, H, Hkv, dqk, dv, W, S);
    // log-sum-exp of each row's visible scores, in double from q and k (what the GPU saves)
    std::vector<float> lse(nl);
    const int group = H / Hkv;
    const double scale = 1.0 / std::sqrt(double(dqk));
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++)
            for (int t = 0; t < T; t++) {
                const float* qt = &q[(((size_t)b * T + t) * H + h) * dqk];
                std::vector<double> s(t + 1, -INFINITY);  // invisible keys stay at −∞: exp gives 0
                double mx = -INFINITY;
                for (int j = 0; j <= t; j++) {
                    if (!hl::attn_visible(t, j, W, S)) continue;
                    const float* kj = &k[(((size_t)b * T + j) * Hkv + h / group) * dqk];
                    double d = 0;
                    for (int e = 0; e < dqk; e++) d += double(qt[e]) * kj[e];
                    s[j] = d * scale;
                    mx = std::max(mx, s[j]);
                }
                double sum = 0;
                for (int j = 0; j <= t; j++) sum += std::exp(s[j] - mx);
                lse[((size_t)b * H + h) * T + t] = float(mx + std::log(sum));
            }

    // GPU
    DeviceBuffer<float> d_q(nq + offset), d_k(nk + offset), d_v(nv + offset), d_dout(no + offset), d_out(no),
        d_lse(nl), d_D(hl::gpu::attention_backward_scratch_size(B, T, H, Hkv, dqk, dv, W, S)), d_dq(nq), d_dk(nk),
        d_dv(nv);
    auto upload_at = [&](DeviceBuffer<float>& d, const std::vector<float>& h) {
        cudaCheck(cudaMemcpy(d.ptr + offset, h.data(), h.size() * sizeof(float), cudaMemcpyHostToDevice));
    };
    upload_at(d_q, q);
    upload_at(d_k, k);
    upload_at(d_v, v);
    upload_at(d_dout, dout);
    poison(d_out);
    poison(d_lse);
    // bf16 operands in effect; the tensor-core kernels need their staging (the attention asks for no other scratch)
    DeviceBuffer<__nv_bfloat16> stage(tc ? hl::gpu::attention_tc_stage_size(B, T, H, Hkv, dqk, dv) : 0);
    hl::gpu::Bf16Operands ops;
    ops.stage = stage.ptr, ops.stage_n = stage.n;
    const hl::gpu::Bf16Scope scope(tc ? &ops : nullptr);
    const float *q_in = d_q.ptr + offset, *k_in = d_k.ptr + offset, *v_in = d_v.ptr + offset,
                *dout_in = d_dout.ptr + offset;
    hl::gpu::attention_forward(d_out.ptr, d_lse.ptr, q_in, k_in, v_in, B, T, H, Hkv, dqk, dv, W, S);
    poison(d_dq);
    poison(d_dk);
    poison(d_dv);
    poison(d_D);
    hl::gpu::attention_backward(d_dq.ptr, d_dk.ptr, d_dv.ptr, d_D.ptr, dout_in, d_out.ptr, d_lse.ptr, q_in, k_in, v_in,
                                B, T, H, Hkv, dqk, dv, W, S);
    cudaCheck(cudaDeviceSynchronize());

    AttnErrors e;
    e.out = rel_err(d_out.download(), out);
    e.lse = rel_err(d_lse.download(), lse);
    e.dq = rel_err(d_dq.download(), dq);
    e.dk = rel_err(d_dk.download(), dk);
    e.dv = rel_err(d_dv.download(), dvv);
    std::printf("attention%s%s B=%d T=%4d H=%d Hkv=%d d_qk=%3d d_v=%3d W=%3d S=%2d  rel err: out %.2e lse %.2e "
                "dq %.2e dk %.2e dv %.2e\n",
                tc ? " (tensor cores)" : "", offset ? " (unaligned)" : "", B, T, H, Hkv, dqk, dv, W, S, e.out, e.lse,
                e.dq, e.dk, e.dv);
    return e;
}

void check_attention(int B, int T, int H, int Hkv, int dqk, int dv, uint64_t seed, int W = 0, int S = 0) {
    CAPTURE(B);
    CAPTURE(T);
    CAPTURE(H);
    CAPTURE(Hkv);
    CAPTURE(dqk);
    CAPTURE(dv);
    CAPTURE(W);
    CAPTURE(S);
    AttnErrors e = run_attention(B, T, H, Hkv, dqk, dv, seed, W, S);
    CHECK(e.out <= FWD_TOL);
    CHECK(e.lse <= FWD_TOL);
    CHECK(e.dq <= GRAD_TOL);
    CHECK(e.dk <= GRAD_TOL);
    CHECK(e.dv <= GRAD_TOL);
}

}  // namespace

TEST_CASE("gpu attention forward/backward match the CPU core (B=2, H=4, T in {1,7,65,200}, GQA, d_qk != d_v)") {
    uint64_t seed = 100;
    const int dims[][2] = {{6, 5}, {64, 64}, {64, 128}};
    for (auto& d : dims)
        for (int Hkv : {1, 2, 4})
            for (int T : {1, 7, 65, 200}) check_attention(2, T, 4, Hkv, d[0], d[1], seed++);
}

TEST_CASE("gpu attention at the paper's other head dims and at the largest supported ones") {
    // 128/128; the 1b intra-layer hybrid's 72/128; the 3b intra-layer hybrid's 96/192; the limits 128/256
    const int dims[][2] = {{128, 128}, {72, 128}, {96, 192}, {128, 256}, {1, 1}, {33, 17}};
    uint64_t seed = 200;
    for (auto& d : dims) check_attention(2, 130, 4, 2, d[0], d[1], seed++);
}

TEST_CASE("gpu attention at T=1024") {
    check_attention(2, 1024, 4, 2, 64, 64, 300);
}

// Windows around the 64-row/key tiles: W = 1 (only the diagonal), 16 (inside a tile), 64 (one tile), 100 (a tile
// and a half); sinks 0, 4 (part of the first tile), 64 (the whole first tile); T short of, just past and several
// tiles long, not a multiple of 64 (a ragged last tile).
TEST_CASE("gpu sliding-window attention forward/backward match the CPU (W, S, T around the tiles, GQA, d_qk != d_v)") {
    uint64_t seed = 600;
    const int dims[][2] = {{6, 5}, {64, 128}};
    for (auto& d : dims)
        for (int W : {1, 16, 64, 100})
            for (int S : {0, 4, 64})
                for (int T : {7, 65, 200, 300}) check_attention(2, T, 4, 2, d[0], d[1], seed++, W, S);
}

TEST_CASE("gpu sliding-window attention: long sequences (many skipped tiles), a window wider than T, H = Hkv") {
    check_attention(1, 1100, 4, 2, 64, 64, 700, 100, 4);   // window tiles far from the sink tile
    check_attention(1, 1100, 4, 1, 32, 48, 701, 64, 64);   // sink and window exactly one tile each
    check_attention(1, 1100, 2, 2, 64, 64, 702, 130, 70);  // sink past the first tile, window over 2+ tiles
    check_attention(2, 300, 4, 4, 64, 64, 703, 1000, 0);   // W ≥ T: full attention
    // W ≥ T is full attention on the GPU too (same kernels; the mask never bites)
    AttnErrors full = run_attention(2, 150, 4, 2, 16, 16, 704), wide = run_attention(2, 150, 4, 2, 16, 16, 704, 150, 3);
    CHECK(full.out == wide.out);
    CHECK(full.dq == wide.dq);
    CHECK(full.dk == wide.dk);
}

// The mixer path: a config's window and sink reach the kernels (forward and backward), through RoPE and the
// cuBLAS projections, against the CPU mixer with the same config.
TEST_CASE("gpu attention mixer with a window and sink matches the CPU mixer") {
    const int B = 2, T = 150, D = 32;
    const hl::AttnConfig c{D, 4, 2, 8, 12, 10000.0, 20, 4};
    hl::Rng rng(800);
    std::vector<hl::TensorInfo> infos;
    hl::Arena<float> count(nullptr, &infos);
    hl::attn_params(count, c);
    auto params = randn(rng, count.size, 0.2);
    const auto x = randn(rng, (size_t)B * T * D), dout = randn(rng, (size_t)B * T * D);

    // CPU
    std::vector<float> grads(count.size, 0.f), out(x.size()), dx(x.size());
    hl::Arena<float> pa(params.data()), ga(grads.data()), acount;
    hl::AttnParams<float> p = hl::attn_params(pa, c), dp = hl::attn_params(ga, c);
    hl::attn_acts(acount, c, B, T);
    std::vector<float> abuf(acount.size);
    hl::Arena<float> aa(abuf.data());
    hl::AttnActs<float> acts = hl::attn_acts(aa, c, B, T);
    hl::attn_mixer_forward(out.data(), acts, x.data(), p, c, B, T);
    hl::attn_mixer_backward(dx.data(), dp, dout.data(), acts, x.data(), p, c, B, T);

    // GPU
    DeviceBuffer<float> d_params(count.size), d_grads(count.size), d_x(x.size()), d_dout(dout.size()),
        d_out(out.size()), d_dx(dx.size());
    d_params.upload(params);
    d_grads.zero();
    d_x.upload(x);
    d_dout.upload(dout);
    poison(d_out);
    poison(d_dx);
    hl::Arena<float> dpa(d_params.ptr), dga(d_grads.ptr), gcount;
    hl::AttnParams<float> gp = hl::attn_params(dpa, c), gdp = hl::attn_params(dga, c);
    hl::gpu::gpu_attn_acts(gcount, c, B, T);
    DeviceBuffer<float> d_acts(gcount.size);
    hl::Arena<float> gaa(d_acts.ptr);
    hl::gpu::GpuAttnActs<float> gacts = hl::gpu::gpu_attn_acts(gaa, c, B, T);
    hl::gpu::attn_mixer_forward(d_out.ptr, gacts, d_x.ptr, gp, c, B, T);
    hl::gpu::attn_mixer_backward(d_dx.ptr, gdp, d_dout.ptr, gacts, d_x.ptr, gp, c, B, T);
    cudaCheck(cudaDeviceSynchronize());

    const double e_out = rel_err(d_out.download(), out), e_dx = rel_err(d_dx.download(), dx);
    std::printf("attention mixer W=%d S=%d T=%d  rel err: out %.2e dinp %.2e", c.window, c.sink, T, e_out, e_dx);
    CHECK(e_out <= FWD_TOL);
    CHECK(e_dx <= GRAD_TOL);
    const std::vector<float> g = d_grads.download();
    for (const hl::TensorInfo& ti : infos) {
        CAPTURE(ti.name);
        const std::vector<float> gi(g.begin() + ti.offset, g.begin() + ti.offset + ti.numel),
            ci(grads.begin() + ti.offset, grads.begin() + ti.offset + ti.numel);
        const double e = rel_err(gi, ci);
        std::printf(" d%s %.2e", ti.name.c_str(), e);
        CHECK(e <= GRAD_TOL);
    }
    std::printf("\n");

    // the window matters at this T: the full-attention mixer's output is far from the windowed one
    hl::AttnConfig full = c;
    full.window = full.sink = 0;
    std::vector<float> out_full(out.size());
    hl::attn_mixer_forward(out_full.data(), acts, x.data(), p, full, B, T);
    CHECK(rel_err(out_full, out) > 1e-2);
}

TEST_CASE("gpu attention: the wgmma (sm_90a) kernels give the mma.sync kernels' results") {
    // The same products on the same bf16 operands, summed by different tensor-core instructions: fp32 sums in
    // another order, so a score, a dP (and the bf16 roundings of P and dS made from them) can differ in their last
    // bits. Bound: 5e-3 of the scale, a tenth of the bf16 kernels' tolerance against the CPU (measured on an H200:
    // out identical, lse 8e-8, gradients up to 1.9e-3 at head dim 128 and 6e-5 at 64).
    if (!hl::gpu::wgmma::available()) {
        MESSAGE("no sm_90a device code for this GPU: nothing to compare");
        return;
    }
    // The last two shapes give the persistent warp-specialised forward several work items a block (512 and 320
    // items of 128 query rows on an H100/H200's 132 SMs): its buffers and barrier phases carried across items.
    struct C { int T, Hkv, dqk, dv, W, S, B = 2, H = 4; };
    for (C c : {C{300, 2, 64, 64, 0, 0}, C{300, 2, 64, 64, 100, 4}, C{200, 4, 128, 128, 0, 0}, C{200, 1, 64, 128, 0, 0},
                C{1024, 4, 64, 64, 0, 0, 4, 16}, C{600, 4, 64, 128, 0, 0, 4, 16}}) {
        CAPTURE(c.T);
        CAPTURE(c.dqk);
        CAPTURE(c.dv);
        CAPTURE(c.W);
        CAPTURE(c.B);
        const int B = c.B, H = c.H;
        const size_t nq = (size_t)B * c.T * H * c.dqk, nk = (size_t)B * c.T * c.Hkv * c.dqk,
                     nv = (size_t)B * c.T * c.Hkv * c.dv, no = (size_t)B * c.T * H * c.dv;
        hl::Rng rng(31);
        DeviceBuffer<float> q(nq), k(nk), v(nv), dout(no), out(no), lse((size_t)B * H * c.T),
            D(hl::gpu::attention_backward_scratch_size(B, c.T, H, c.Hkv, c.dqk, c.dv, c.W, c.S)), dq(nq), dk(nk), dv(nv);
        q.upload(randn(rng, nq)), k.upload(randn(rng, nk)), v.upload(randn(rng, nv)), dout.upload(randn(rng, no));
        DeviceBuffer<__nv_bfloat16> stage(hl::gpu::attention_tc_stage_size(B, c.T, H, c.Hkv, c.dqk, c.dv));
        hl::gpu::Bf16Operands ops;
        ops.stage = stage.ptr, ops.stage_n = stage.n;
        const hl::gpu::Bf16Scope scope(&ops);
        std::vector<float> got[3][5];  // [mma.sync, wgmma, wgmma with the warp-specialised forward][out, lse, dq, dk, dv]
        for (int wg = 0; wg < 3; wg++) {
            hl::gpu::attention_wgmma_on = wg >= 1;
            hl::gpu::attention_ws_on = wg == 2;
            for (auto* t : {&out, &lse, &dq, &dk, &dv}) poison(*t);
            hl::gpu::attention_forward(out.ptr, lse.ptr, q.ptr, k.ptr, v.ptr, B, c.T, H, c.Hkv, c.dqk, c.dv, c.W, c.S);
            hl::gpu::attention_backward(dq.ptr, dk.ptr, dv.ptr, D.ptr, dout.ptr, out.ptr, lse.ptr, q.ptr, k.ptr, v.ptr, B,
                                        c.T, H, c.Hkv, c.dqk, c.dv, c.W, c.S);
            int i = 0;
            for (auto* t : {&out, &lse, &dq, &dk, &dv}) got[wg][i++] = t->download();
        }
        hl::gpu::attention_wgmma_on = hl::gpu::attention_ws_on = true;
        const char* names[5] = {"out", "lse", "dq", "dk", "dv"};
        for (int wg = 1; wg < 3; wg++) {
            std::printf("attention %s vs mma.sync, B=%d H=%d T=%d Hkv=%d d_qk=%d d_v=%d W=%d:",
                        wg == 1 ? "wgmma" : "wgmma+ws", B, H, c.T, c.Hkv, c.dqk, c.dv, c.W);
            for (int i = 0; i < 5; i++) {
                const double e = rel_err(got[wg][i], got[0][i]);
                std::printf(" %s %.2e", names[i], e);
                CAPTURE(names[i]);
                CHECK(e <= 5e-3);
            }
            std::printf("\n");
        }
    }
}

TEST_CASE("gpu attention with a bf16 output (the mixer's y under bf16): the fp32 output rounded; the backward's D from it") {
    const int B = 2, T = 200, H = 4, Hkv = 2;
    for (int dv : {64, 128}) {
        const int d = 64;
        CAPTURE(dv);
        const size_t nq = (size_t)B * T * H * d, nk = (size_t)B * T * Hkv * d, nv = (size_t)B * T * Hkv * dv,
                     no = (size_t)B * T * H * dv;
        hl::Rng rng(77);
        auto host = [&](size_t n) { std::vector<float> v(n); rng.fill_normal(v.data(), n, 1.0); return v; };
        DeviceBuffer<float> q(nq), k(nk), v(nv), dout(no), out(no), lse((size_t)B * H * T),
            D(hl::gpu::attention_backward_scratch_size(B, T, H, Hkv, d, dv)), dq(nq), dk(nk), dvv(nv), dq2(nq),
            dk2(nk), dv2(nv);
        q.upload(host(nq)), k.upload(host(nk)), v.upload(host(nv)), dout.upload(host(no));
        DeviceBuffer<__nv_bfloat16> stage(hl::gpu::attention_tc_stage_size(B, T, H, Hkv, d, dv)), out16(no);
        hl::gpu::Bf16Operands ops;
        ops.stage = stage.ptr, ops.stage_n = stage.n;
        // without bf16 operands (the fp32 kernels) a bf16 output is refused
        CHECK_THROWS_AS(hl::gpu::attention_forward(out.ptr, lse.ptr, q.ptr, k.ptr, v.ptr, B, T, H, Hkv, d, dv, 0, 0, 0,
                                                   out16.ptr),
                        hl::Error);
        const hl::gpu::Bf16Scope scope(&ops);
        hl::gpu::attention_forward(out.ptr, lse.ptr, q.ptr, k.ptr, v.ptr, B, T, H, Hkv, d, dv);
        hl::gpu::attention_backward(dq.ptr, dk.ptr, dvv.ptr, D.ptr, dout.ptr, out.ptr, lse.ptr, q.ptr, k.ptr, v.ptr, B,
                                    T, H, Hkv, d, dv);
        const std::vector<float> out32 = out.download();
        poison(out);
        hl::gpu::attention_forward(out.ptr, lse.ptr, q.ptr, k.ptr, v.ptr, B, T, H, Hkv, d, dv, 0, 0, 0, out16.ptr);
        hl::gpu::attention_backward(dq2.ptr, dk2.ptr, dv2.ptr, D.ptr, dout.ptr, out.ptr, lse.ptr, q.ptr, k.ptr, v.ptr,
                                    B, T, H, Hkv, d, dv, 0, 0, 0, out16.ptr);
        const std::vector<__nv_bfloat16> o16 = out16.download();
        std::vector<float> got(no);
        for (size_t i = 0; i < no; i++) got[i] = __bfloat162float(o16[i]);
        CHECK(got == hl::test::round_bf16_host(out32));  // the same fp32 values, rounded once
        // the backward read out16, not out (poisoned): D = rowsum(dout ⊙ out) with out in bf16 moves the
        // gradients by about bf16's rounding
        const double eq = rel_err(dq2.download(), dq.download()), ek = rel_err(dk2.download(), dk.download()),
                     ev = rel_err(dv2.download(), dvv.download());
        std::printf("attention bf16 out, d_v=%3d: out16 = out rounded; gradients from it vs from fp32 out: dq %.2e "
                    "dk %.2e dv %.2e\n", dv, eq, ek, ev);
        CHECK(eq <= 1e-2);
        CHECK(ek <= 1e-2);
        CHECK(ev == 0);  // dv = Pᵀ dout does not involve D
    }
}

TEST_CASE("gpu attention backward writing dq, dk, dv in bf16 for the qkv GEMM (AttnGrad16): the fp32 gradients, "
          "RoPE undone, rounded") {
    // the packed dout the attention branch hands its qkv GEMM under bf16: (B·T, Wq + Wk + Wv), dq and dk turned back
    // by RoPE. Reference: the fp32 backward, then rope_backward and round_bf16_rows as the branch does without it.
    const int B = 2, T = 200, H = 4, Hkv = 2, d = 64;
    const double theta = 10000.0;
    for (int dv : {64, 128}) {
        CAPTURE(dv);
        const int N = B * T, Wq = H * d, Wk = Hkv * d, Wv = Hkv * dv, W = Wq + Wk + Wv;
        const size_t nq = (size_t)N * H * d, nk = (size_t)N * Hkv * d, nv = (size_t)N * Hkv * dv, no = (size_t)N * H * dv;
        hl::Rng rng(78);
        auto host = [&](size_t n) { std::vector<float> v(n); rng.fill_normal(v.data(), n, 1.0); return v; };
        DeviceBuffer<float> q(nq), k(nk), v(nv), dout(no), out(no), lse((size_t)B * H * T),
            D(hl::gpu::attention_backward_scratch_size(B, T, H, Hkv, d, dv)), dq(nq), dk(nk), dvv(nv), dq2(nq),
            dk2(nk), dv2(nv), table((size_t)T * d);
        q.upload(host(nq)), k.upload(host(nk)), v.upload(host(nv)), dout.upload(host(no));
        DeviceBuffer<__nv_bfloat16> stage(hl::gpu::attention_tc_stage_size(B, T, H, Hkv, d, dv)), want16((size_t)N * W),
            got16((size_t)N * W);
        cudaCheck(cudaMemset(got16.ptr, 0xFF, got16.n * sizeof(__nv_bfloat16)));
        hl::gpu::rope_table(table.ptr, T, d, theta);
        hl::gpu::Bf16Operands ops;
        ops.stage = stage.ptr, ops.stage_n = stage.n;
        const hl::gpu::Bf16Scope scope(&ops);
        hl::gpu::attention_forward(out.ptr, lse.ptr, q.ptr, k.ptr, v.ptr, B, T, H, Hkv, d, dv);
        CHECK(!hl::gpu::attention_backward(dq.ptr, dk.ptr, dvv.ptr, D.ptr, dout.ptr, out.ptr, lse.ptr, q.ptr, k.ptr,
                                           v.ptr, B, T, H, Hkv, d, dv));
        hl::gpu::rope_backward(want16.ptr, dq.ptr, B, T, H, d, theta, 0, 0, size_t(W), table.ptr);
        hl::gpu::rope_backward(want16.ptr + Wq, dk.ptr, B, T, Hkv, d, theta, 0, 0, size_t(W), table.ptr);
        hl::gpu::round_bf16_rows(want16.ptr + Wq + Wk, size_t(W), dvv.ptr, size_t(N), Wv);
        poison(dq2), poison(dk2), poison(dv2);
        const hl::gpu::AttnGrad16 g16{got16.ptr, got16.ptr + Wq, got16.ptr + Wq + Wk, size_t(W), table.ptr};
        const bool wrote = hl::gpu::attention_backward(dq2.ptr, dk2.ptr, dv2.ptr, D.ptr, dout.ptr, out.ptr, lse.ptr,
                                                       q.ptr, k.ptr, v.ptr, B, T, H, Hkv, d, dv, 0, 0, 0, nullptr, {},
                                                       g16);
        CHECK(wrote == hl::gpu::attention_use_wgmma());  // the warpgroup kernels write it (sm_90a), else the caller
        if (!wrote) continue;
        const std::vector<__nv_bfloat16> w16 = want16.download(), g = got16.download();
        std::vector<float> wf(w16.size()), gf(g.size());
        size_t exact = 0, far = 0;
        for (size_t i = 0; i < g.size(); i++) {
            wf[i] = __bfloat162float(w16[i]), gf[i] = __bfloat162float(g[i]);
            exact += wf[i] == gf[i];
            // (the turn's products may fuse differently in the two kernels: one bf16 step apart at most)
            far += !(std::fabs(gf[i] - wf[i]) <= std::ldexp(std::fabs(wf[i]), -7));
        }
        std::printf("attention backward into the bf16 qkv dout, d_v=%3d: %zu of %zu equal to the unfused path's, %zu "
                    "more than one bf16 step away (rel err %.2e)\n", dv, exact, g.size(), far, rel_err(gf, wf));
        CHECK(far == 0);
        CHECK(exact >= g.size() * 99 / 100);
        CHECK(rel_err(gf, wf) <= 1e-3);
    }
}

TEST_CASE("gpu attention staging without the mma.sync kernels' dk, dv shares: enough for the wgmma kernels, a clear "
          "error for mma.sync") {
    const int B = 2, T = 130, H = 4, Hkv = 2, d = 64;
    using hl::gpu::attention_tc_stage_size;
    const size_t full = attention_tc_stage_size(B, T, H, Hkv, d, d), lean = attention_tc_stage_size(B, T, H, Hkv, d, d, false);
    CHECK(lean == size_t(B) * T * (H + Hkv) * 2 * d);  // q, k, v, dout only
    CHECK(full == lean + 2 * size_t(B) * T * H * 2 * d);
    CHECK(attention_tc_stage_size(B, T, H, H, d, d, false) == attention_tc_stage_size(B, T, H, H, d, d));  // no GQA
    const size_t nq = (size_t)B * T * H * d, nk = (size_t)B * T * Hkv * d;
    hl::Rng rng(79);
    DeviceBuffer<float> q(nq), k(nk), v(nk), dout(nq), out(nq), lse((size_t)B * H * T),
        D(hl::gpu::attention_backward_scratch_size(B, T, H, Hkv, d, d)), dq(nq), dk(nk), dv(nk), dq2(nq), dk2(nk), dv2(nk);
    q.upload(randn(rng, nq)), k.upload(randn(rng, nk)), v.upload(randn(rng, nk)), dout.upload(randn(rng, nq));
    DeviceBuffer<__nv_bfloat16> big(full), small(lean);
    hl::gpu::Bf16Operands ops;
    auto run = [&](DeviceBuffer<__nv_bfloat16>& st, DeviceBuffer<float>& gq, DeviceBuffer<float>& gk,
                   DeviceBuffer<float>& gv) {
        ops.stage = st.ptr, ops.stage_n = st.n;
        const hl::gpu::Bf16Scope scope(&ops);
        hl::gpu::attention_forward(out.ptr, lse.ptr, q.ptr, k.ptr, v.ptr, B, T, H, Hkv, d, d);
        hl::gpu::attention_backward(gq.ptr, gk.ptr, gv.ptr, D.ptr, dout.ptr, out.ptr, lse.ptr, q.ptr, k.ptr, v.ptr, B,
                                    T, H, Hkv, d, d);
    };
    if (hl::gpu::attention_use_wgmma()) {  // the same gradients, bit for bit, from the lean staging
        run(big, dq, dk, dv);
        run(small, dq2, dk2, dv2);
        CHECK(dq2.download() == dq.download());
        CHECK(dk2.download() == dk.download());
        CHECK(dv2.download() == dv.download());
    }
    hl::gpu::attention_wgmma_on = false;  // the mma.sync kernels need the shares: refused in one line, not overrun
    CHECK_THROWS_AS(run(small, dq2, dk2, dv2), hl::Error);
    hl::gpu::attention_wgmma_on = true;
}

TEST_CASE("gpu attention backward scratch: D alone, plus the sink chunks' partial sums for long windowed T") {
    using hl::gpu::attention_backward_scratch_size;
    CHECK(attention_backward_scratch_size(2, 1100, 6, 2, 64, 128) == size_t(2 * 6 * 1100));
    CHECK(attention_backward_scratch_size(2, 1100, 6, 2, 64, 128, 100, 0) == size_t(2 * 6 * 1100));
    CHECK(attention_backward_scratch_size(2, 512, 6, 2, 64, 128, 100, 64) == size_t(2 * 6 * 512));  // one chunk
    // 18 key tiles: the sink tile's 18 query tiles in 3 chunks of 8; S = 70 makes two sink tiles
    CHECK(attention_backward_scratch_size(2, 1100, 6, 2, 64, 128, 100, 64) ==
          size_t(2 * 6 * 1100 + 2 * 2 * 1 * 3 * 64 * 192));
    CHECK(attention_backward_scratch_size(2, 1100, 6, 2, 64, 128, 100, 70) ==
          size_t(2 * 6 * 1100 + 2 * 2 * 2 * 3 * 64 * 192));
}

TEST_CASE("gpu attention backward is deterministic (bitwise) and refuses unsupported head dims") {
    const int B = 2, H = 6, Hkv = 2, dqk = 64, dv = 128;
    // full attention; and a window with a sink over T = 1100, whose sink key tile is split into chunks summed by
    // a second kernel
    struct Case { int T, W, S; };
    for (Case cs : {Case{150, 0, 0}, Case{1100, 100, 64}}) {
        const int T = cs.T;
        CAPTURE(T);
        hl::Rng rng(400);
        const size_t nq = (size_t)B * T * H * dqk, nk = (size_t)B * T * Hkv * dqk, nv = (size_t)B * T * Hkv * dv,
                     no = (size_t)B * T * H * dv, nl = (size_t)B * H * T;
        DeviceBuffer<float> d_q(nq), d_k(nk), d_v(nv), d_dout(no), d_out(no), d_lse(nl),
            d_D(hl::gpu::attention_backward_scratch_size(B, T, H, Hkv, dqk, dv, cs.W, cs.S)), d_dq(nq), d_dk(nk),
            d_dv(nv);
        d_q.upload(randn(rng, nq));
        d_k.upload(randn(rng, nk));
        d_v.upload(randn(rng, nv));
        d_dout.upload(randn(rng, no));
        hl::gpu::attention_forward(d_out.ptr, d_lse.ptr, d_q.ptr, d_k.ptr, d_v.ptr, B, T, H, Hkv, dqk, dv, cs.W, cs.S);
        std::vector<float> first[3];
        for (int rep = 0; rep < 2; rep++) {
            poison(d_dq);
            poison(d_dk);
            poison(d_dv);
            hl::gpu::attention_backward(d_dq.ptr, d_dk.ptr, d_dv.ptr, d_D.ptr, d_dout.ptr, d_out.ptr, d_lse.ptr,
                                        d_q.ptr, d_k.ptr, d_v.ptr, B, T, H, Hkv, dqk, dv, cs.W, cs.S);
            std::vector<float> now[3] = {d_dq.download(), d_dk.download(), d_dv.download()};
            if (rep == 0)
                for (int i = 0; i < 3; i++) first[i] = now[i];
            else
                for (int i = 0; i < 3; i++) CHECK(now[i] == first[i]);
        }
    }
    const int T = 150;
    const size_t nq = (size_t)B * T * H * dqk, nk = (size_t)B * T * Hkv * dqk, nv = (size_t)B * T * Hkv * dv,
                 no = (size_t)B * T * H * dv, nl = (size_t)B * H * T;
    DeviceBuffer<float> d_q(nq), d_k(nk), d_v(nv), d_out(no), d_lse(nl);
    CHECK_THROWS_AS(hl::gpu::attention_forward(d_out.ptr, d_lse.ptr, d_q.ptr, d_k.ptr, d_v.ptr, B, T, H, Hkv, 130,
                                               dv),
                    hl::Error);
    CHECK_THROWS_AS(hl::gpu::attention_forward(d_out.ptr, d_lse.ptr, d_q.ptr, d_k.ptr, d_v.ptr, B, T, H, Hkv, dqk,
                                               257),
                    hl::Error);
    CHECK_THROWS_AS(hl::gpu::attention_forward(d_out.ptr, d_lse.ptr, d_q.ptr, d_k.ptr, d_v.ptr, B, T, 6, 4, dqk, dv),
                    hl::Error);
    CHECK_THROWS_AS(hl::gpu::attention_forward(d_out.ptr, d_lse.ptr, d_q.ptr, d_k.ptr, d_v.ptr, B, T, H, Hkv, dqk, dv,
                                               -1, 0),
                    hl::Error);
    CHECK_THROWS_AS(hl::gpu::attention_forward(d_out.ptr, d_lse.ptr, d_q.ptr, d_k.ptr, d_v.ptr, B, T, H, Hkv, dqk, dv,
                                               0, 4),
                    hl::Error);
}

TEST_CASE("gpu rope forward/backward match the CPU (positions up to 8192, pos0 offset, in place)") {
    struct Shape { int B, T, H, hd, pos0; double theta; };
    const Shape shapes[] = {{2, 7, 3, 6, 0, 50.0}, {2, 65, 4, 64, 5, 500000.0}, {1, 8192, 2, 64, 0, 500000.0},
                            {1, 8192, 2, 128, 0, 10000.0}, {2, 1, 4, 64, 8191, 500000.0}, {1, 100, 3, 96, 8000, 500000.0}};
    uint64_t seed = 500;
    for (const Shape& s : shapes) {
        CAPTURE(s.B);
        CAPTURE(s.T);
        CAPTURE(s.H);
        CAPTURE(s.hd);
        CAPTURE(s.pos0);
        hl::Rng rng(seed++);
        const size_t n = (size_t)s.B * s.T * s.H * s.hd;
        auto x = randn(rng, n), dy = randn(rng, n);
        std::vector<float> y(n), dx(n);
        hl::rope_forward(y.data(), x.data(), s.B, s.T, s.H, s.hd, s.theta, s.pos0);
        hl::rope_backward(dx.data(), dy.data(), s.B, s.T, s.H, s.hd, s.theta, s.pos0);

        DeviceBuffer<float> d_x(n), d_y(n), d_dy(n), d_dx(n);
        d_x.upload(x);
        d_dy.upload(dy);
        poison(d_y);
        poison(d_dx);
        hl::gpu::rope_forward(d_y.ptr, d_x.ptr, s.B, s.T, s.H, s.hd, s.theta, s.pos0);
        hl::gpu::rope_backward(d_dx.ptr, d_dy.ptr, s.B, s.T, s.H, s.hd, s.theta, s.pos0);
        const double e_fwd = rel_err(d_y.download(), y), e_bwd = rel_err(d_dx.download(), dx);
        // in place: rotate x where it lies
        hl::gpu::rope_forward(d_x.ptr, d_x.ptr, s.B, s.T, s.H, s.hd, s.theta, s.pos0);
        const double e_inplace = rel_err(d_x.download(), y);
        std::printf("rope B=%d T=%4d H=%d hd=%3d pos0=%4d  rel err: fwd %.2e bwd %.2e in-place %.2e\n", s.B, s.T, s.H,
                    s.hd, s.pos0, e_fwd, e_bwd, e_inplace);
        CHECK(e_fwd <= FWD_TOL);
        CHECK(e_bwd <= FWD_TOL);  // a rotation: as exact as the forward
        CHECK(e_inplace <= FWD_TOL);
        // the backward into bf16 (dq, dk for their GEMMs under bf16 operands): the fp32 result rounded, bit for bit
        DeviceBuffer<__nv_bfloat16> d_dx16(n);
        hl::gpu::rope_backward(d_dx16.ptr, d_dy.ptr, s.B, s.T, s.H, s.hd, s.theta, s.pos0);
        const std::vector<__nv_bfloat16> dx16 = d_dx16.download();
        std::vector<float> got(n);
        for (size_t i = 0; i < n; i++) got[i] = __bfloat162float(dx16[i]);
        CHECK(got == round_bf16_host(d_dx.download()));
        // from a table of the angles' cosines and sines (rope_table, as the attention's rotations run): the forward
        // the same values bit for bit (the same floats, the same products), the backward within the tolerance (its
        // sines negated from the table's, where the table-less kernel takes the sines of negated angles)
        {
            DeviceBuffer<float> table((size_t)2 * s.T * (s.hd / 2)), d_x2(n), d_y2(n), d_dx2(n);
            hl::gpu::rope_table(table.ptr, s.T, s.hd, s.theta, s.pos0);
            d_x2.upload(x);
            poison(d_y2);
            poison(d_dx2);
            hl::gpu::rope_forward(d_y2.ptr, d_x2.ptr, s.B, s.T, s.H, s.hd, s.theta, s.pos0, 0, table.ptr);
            hl::gpu::rope_backward(d_dx2.ptr, d_dy.ptr, s.B, s.T, s.H, s.hd, s.theta, s.pos0, 0, 0, table.ptr);
            CHECK(d_y2.download() == d_y.download());
            CHECK(rel_err(d_dx2.download(), dx) <= FWD_TOL);
            hl::gpu::rope_forward(d_x2.ptr, d_x2.ptr, s.B, s.T, s.H, s.hd, s.theta, s.pos0, 0, table.ptr);  // in place
            CHECK(d_x2.download() == d_y.download());
        }
        // into a slice of wider rows (the attention's dq, dk, dv side by side for one GEMM): the same values there,
        // the rest of each row untouched (the poison stays); 8 more columns keep the vector kernel's alignment, 3
        // more take the one-pair kernel
        for (int extra : {8, 3}) {
            const size_t ld = size_t(s.H) * s.hd + size_t(extra), rows = size_t(s.B) * s.T;
            DeviceBuffer<__nv_bfloat16> d_wide(rows * ld);
            poison(d_wide);
            hl::gpu::rope_backward(d_wide.ptr + extra, d_dy.ptr, s.B, s.T, s.H, s.hd, s.theta, s.pos0, 0, ld);
            // (and from the table, the vector kernel where the offset keeps it 16-byte aligned: within a bf16 step)
            DeviceBuffer<float> table((size_t)2 * s.T * (s.hd / 2));
            hl::gpu::rope_table(table.ptr, s.T, s.hd, s.theta, s.pos0);
            DeviceBuffer<__nv_bfloat16> d_wide_t(rows * ld);
            poison(d_wide_t);
            hl::gpu::rope_backward(d_wide_t.ptr + extra, d_dy.ptr, s.B, s.T, s.H, s.hd, s.theta, s.pos0, 0, ld,
                                   table.ptr);
            const std::vector<__nv_bfloat16> wide_t = d_wide_t.download();
            const std::vector<__nv_bfloat16> wide = d_wide.download();
            const auto bits = [](__nv_bfloat16 x) {
                uint16_t u;
                std::memcpy(&u, &x, sizeof u);
                return u;
            };
            bool slice_ok = true, rest_ok = true;
            for (size_t r = 0; r < rows; r++)
                for (size_t j = 0; j < ld; j++) {
                    if (j < size_t(extra)) {
                        rest_ok = rest_ok && bits(wide[r * ld + j]) == 0xFFFF && bits(wide_t[r * ld + j]) == 0xFFFF;
                    } else {
                        const float want = __bfloat162float(dx16[r * (ld - extra) + (j - extra)]);
                        slice_ok = slice_ok && bits(wide[r * ld + j]) == bits(dx16[r * (ld - extra) + (j - extra)]) &&
                                   std::fabs(__bfloat162float(wide_t[r * ld + j]) - want) <= 1e-2f * std::fabs(want) + 1e-6f;
                    }
                }
            CAPTURE(extra);
            CHECK(slice_ok);
            CHECK(rest_ok);
        }
    }
    DeviceBuffer<float> d(16);
    CHECK_THROWS_AS(hl::gpu::rope_forward(d.ptr, d.ptr, 1, 2, 1, 7, 10000.0), hl::Error);  // odd head dim
}

TEST_CASE("gpu attention on tensor cores (bf16 operands) matches the CPU core within bf16 rounding") {
    // q, k, v, dout and the probabilities are rounded to bf16 (8 mantissa bits, relative step 2^-8): the outputs
    // within 2e-2 of their scale, the gradients within 5e-2, against the fp32 CPU reference. Head dims 64 and 128
    // (and d_qk 64 with d_v 128 below), GQA, T not a multiple of the 64-row tile, full causal and a window with sinks
    // (with and without the sink split that the key kernel leaves to the fp32 kernel; a window without sinks, where
    // the key kernel skips query tiles past the window in a group of 4 heads), and inputs that are not 16-byte
    // aligned (the kernels read their bf16 staging, which is: the rounding pass takes the unaligned fp32 tensors).
    // Both kernel families: the mma.sync ones, and on an sm_90a build on an H100/H200 the wgmma ones (what runs
    // there by default).
    // On sm_90a, with and without the warp-specialised forward (TMA loads, 128-key tiles; full causal only).
    struct C { int T, Hkv, d, W, S, offset; };
    for (const int fam : {0, 1, 2}) {
        const bool wg = fam >= 1;
        if (wg && !hl::gpu::wgmma::available()) {
            MESSAGE("no sm_90a device code for this GPU: the wgmma attention kernels are not tested here");
            break;
        }
        CAPTURE(fam);
        hl::gpu::attention_wgmma_on = wg;
        hl::gpu::attention_ws_on = fam == 2;
        std::printf("attention kernels: %s\n", fam == 2 ? "wgmma (sm_90a), warp-specialised forward"
                                                   : wg ? "wgmma (sm_90a)" : "mma.sync");
        uint64_t seed = 900;
        for (C c : {C{1, 2, 64, 0, 0, 0}, C{65, 2, 64, 0, 0, 0}, C{200, 1, 64, 0, 0, 0}, C{130, 4, 128, 0, 0, 0},
                    C{300, 2, 64, 16, 4, 0}, C{700, 2, 64, 64, 16, 0}, C{1024, 2, 128, 0, 0, 0}, C{200, 2, 64, 0, 0, 1},
                    C{150, 2, 128, 100, 4, 3}, C{1100, 2, 64, 0, 0, 0}, C{1100, 1, 64, 100, 0, 0}}) {
            CAPTURE(c.T);
            CAPTURE(c.d);
            CAPTURE(c.W);
            CAPTURE(c.offset);
            const AttnErrors e = run_attention(2, c.T, 4, c.Hkv, c.d, c.d, seed++, c.W, c.S, true, c.offset);
            CHECK(e.out <= 2e-2);
            CHECK(e.lse <= 2e-2);
            CHECK(e.dq <= 5e-2);
            CHECK(e.dk <= 5e-2);
            CHECK(e.dv <= 5e-2);
            if (c.T > 1) CHECK(e.out > 1e-5);  // the bf16 kernels ran: fp32 ones are within 1e-6
        }
        // d_qk = 64, d_v = 128 (the 100m and 350m intra-layer hybrids' heads): full, a window with sinks, a long
        // window without, GQA groups of 2 and 4
        for (C c : {C{200, 2, 64, 0, 0, 0}, C{300, 2, 64, 16, 4, 0}, C{1100, 1, 64, 100, 0, 0}}) {
            CAPTURE(c.T);
            CAPTURE(c.W);
            const AttnErrors e = run_attention(2, c.T, 4, c.Hkv, 64, 128, seed++, c.W, c.S, true);
            CHECK(e.out <= 2e-2);
            CHECK(e.lse <= 2e-2);
            CHECK(e.dq <= 5e-2);
            CHECK(e.dk <= 5e-2);
            CHECK(e.dv <= 5e-2);
            CHECK(e.out > 1e-5);
        }
    }
    hl::gpu::attention_wgmma_on = hl::gpu::attention_ws_on = true;
    // without room for the bf16 copies of q, k, v (and dout), a one-line error, not a write past the buffer
    const int B = 1, T = 70, H = 2, d = 64;
    DeviceBuffer<float> q((size_t)B * T * H * d), lse((size_t)B * H * T), out(q.n);
    DeviceBuffer<__nv_bfloat16> small(hl::gpu::attention_tc_stage_size(B, T, H, H, d, d) / 2 - 8);
    hl::gpu::Bf16Operands ops;
    const hl::gpu::Bf16Scope scope(&ops);
    CHECK_THROWS_AS(hl::gpu::attention_forward(out.ptr, lse.ptr, q.ptr, q.ptr, q.ptr, B, T, H, H, d, d), hl::Error);
    ops.stage = small.ptr, ops.stage_n = small.n;
    CHECK_THROWS_AS(hl::gpu::attention_forward(out.ptr, lse.ptr, q.ptr, q.ptr, q.ptr, B, T, H, H, d, d), hl::Error);
}
