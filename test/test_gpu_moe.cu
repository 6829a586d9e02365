// test_gpu_moe.cu — the GPU mixture-of-experts FFN (kernels/moe.cuh) against the CPU reference (model/moe.h run
// in float on the host) at N = 1, 7, 64, 333 tokens, with and without the balancing bias.
//
// Routing is discrete, so GPU and CPU must pick the same experts: the inputs are drawn so that every token's
// best biased score beats the runner-up by a clear margin (rows are redrawn until the margin, computed in
// double, exceeds 0.02), and the test asserts the CPU's own float margins exceed 1e-3 — far above the ~1e-6
// at which cuBLAS and the CPU logits can differ. Then expert choice, perm and offsets must be identical, and the
// last expert gets a bias of −1 (scores are in (0, 1)), so it has zero tokens in every case.
//
// Error norm (per tensor): rel err = max_i |gpu_i − cpu_i| / max_i |cpu_i| (∞ if any GPU value is not finite);
// forward outputs ≤ 1e-4, gradients ≤ 1e-3, as test/test_gpu_layers.cu. Every GPU output and the whole GPU
// activation buffers are poisoned (all bits set: NaN, or −1 for the index tensors) first, so an element nobody
// writes fails; parameter gradients start from random values (not zero) so "accumulate (+=)" is checked too.
// The backward is run twice from the same state and must be bitwise equal (no atomics decide anything).
// All of it twice: the experts' GEMMs as the cuBLAS loop (MoEGemm::cublas_loop) and as the grouped kernels
// (MoEGemm::grouped); those two kernels are also checked alone against a host loop.
#include <doctest/doctest.h>    // TEST_CASE, CHECK, REQUIRE, INFO
#include <algorithm>            // std::max, std::min, std::equal
#include <cmath>                // std::fabs, std::isfinite, std::exp, std::sqrt, INFINITY
#include <cstdio>               // std::printf: the measured errors
#include <string>               // std::string
#include <vector>               // std::vector host buffers
#include "kernels/common.cuh"   // DeviceBuffer, cudaCheck
#include "test/gpu_check.cuh"   // tolerances, device buffers, rel_err, expect_close
#include "kernels/moe.cuh"      // gpu::GpuMoEActs, gpu_moe_acts, moe_forward/backward (MoEGemm), moe_update_bias,
                                //   moe_grouped_matmul, moe_grouped_dweight
#include "model/common.h"       // Arena, Rng, TensorInfo, sigmoid
#include "model/moe.h"          // the CPU reference: MoEConfig, moe_params, moe_acts, moe_forward/backward, ...

namespace {

using namespace hl::test;  // FWD_TOL, GRAD_TOL, randn, to_dev, alloc_poisoned, from_dev, rel_err, expect_close

// n elements of a device buffer's host copy, starting where ptr points into the buffer
template <typename T>
std::vector<T> slice(const std::vector<T>& host, const DeviceBuffer<T>& d, const T* ptr, size_t n) {
    const size_t at = size_t(ptr - d.ptr);
    return std::vector<T>(host.begin() + at, host.begin() + at + n);
}

// Redraws rows of x (N, D) until, for every token, the best biased score σ(x·R_e) + bias_e beats the runner-up
// by more than `margin` (in double). E ≥ 2.
void draw_routable_inputs(std::vector<float>& x, hl::Rng& rng, const float* router, const std::vector<float>& bias,
                          int N, int D, int E, double margin) {
    for (int n = 0; n < N; n++) {
        float* xn = x.data() + (size_t)n * D;
        for (int tries = 0;; tries++) {
            REQUIRE(tries < 1000);
            for (int d = 0; d < D; d++) xn[d] = float(rng.normal());
            double best = -1e30, second = -1e30;
            for (int e = 0; e < E; e++) {
                double l = 0;
                for (int d = 0; d < D; d++) l += (double)xn[d] * router[(size_t)e * D + d];
                const double s = 1.0 / (1.0 + std::exp(-l)) + (bias.empty() ? 0.0 : bias[e]);
                if (s > best) second = best, best = s;
                else if (s > second) second = s;
            }
            if (best - second > margin) break;
        }
    }
}

// The CPU's own smallest margin between the best and the second-best biased score (float, from its logits).
double cpu_margin(const float* logits, const std::vector<float>& bias, int N, int E) {
    double m = INFINITY;
    for (int n = 0; n < N; n++) {
        float best = -1e30f, second = -1e30f;
        for (int e = 0; e < E; e++) {
            const float s = hl::sigmoid(logits[(size_t)n * E + e]) + (bias.empty() ? 0.0f : bias[e]);
            if (s > best) second = best, best = s;
            else if (s > second) second = s;
        }
        m = std::min(m, double(best) - double(second));
    }
    return m;
}

}  // namespace

TEST_CASE("gpu moe forward/backward equals the CPU (same routing, every gradient, zero-token expert, deterministic)") {
    hl::Rng rng(107);
    struct S { int N, D, F, E; };
    for (S s : {S{1, 8, 12, 4}, S{7, 16, 24, 4}, S{64, 32, 48, 8}, S{333, 64, 80, 8}}) {
        for (bool with_bias : {true, false}) {
            const std::string tag = "moe N=" + std::to_string(s.N) + " D=" + std::to_string(s.D) + " F=" +
                                    std::to_string(s.F) + " E=" + std::to_string(s.E) + (with_bias ? " bias" : "");
            const hl::MoEConfig cfg{s.D, s.F, s.E, 1e-3};
            const int N = s.N, D = s.D, E = s.E;
            // layouts: parameter tensors with their names, CPU and GPU activations
            std::vector<hl::TensorInfo> infos;
            hl::Arena<float> pc(nullptr, &infos), ac, gac;
            hl::Arena<int> iac, giac;
            hl::moe_params(pc, cfg);
            hl::moe_acts(ac, iac, cfg, N);
            hl::gpu::gpu_moe_acts(gac, giac, cfg, N);
            // host data: router std 2/√D (logits of std ≈ 2: clear margins are common), the experts' std 0.3/√D
            std::vector<float> params(pc.size), dparams0 = randn(rng, pc.size);
            for (const auto& t : infos) {
                const double std = (t.name == "router" ? 2.0 : 0.3) / std::sqrt((double)(t.shape.back()));
                for (size_t i = 0; i < t.numel; i++) params[t.offset + i] = float(std * rng.normal());
            }
            std::vector<float> bias;
            if (with_bias) {
                bias = randn(rng, E, 0.05);
                bias[E - 1] = -1.0f;  // scores are in (0, 1): the last expert is never chosen
            }
            hl::Arena<float> hp(params.data());
            const auto p = hl::moe_params(hp, cfg);
            std::vector<float> x((size_t)N * D), dout = randn(rng, (size_t)N * D);
            draw_routable_inputs(x, rng, p.router, bias, N, D, E, 0.02);
            // CPU
            std::vector<float> dparams = dparams0, acts(ac.size), out(x.size()), dinp(x.size());
            std::vector<int> iacts(iac.size);
            hl::Arena<float> hdp(dparams.data()), ha(acts.data());
            hl::Arena<int> hia(iacts.data());
            auto dp = hl::moe_params(hdp, cfg);
            auto a = hl::moe_acts(ha, hia, cfg, N);
            const float* biasp = with_bias ? bias.data() : nullptr;
            hl::moe_forward(out.data(), a, x.data(), p, biasp, cfg, N);
            hl::moe_backward(dinp.data(), dp, dout.data(), a, x.data(), p, cfg, N);
            const double margin = cpu_margin(a.logits, bias, N, E);
            INFO(tag, ": CPU routing margin ", margin);
            REQUIRE(margin > 1e-3);  // the routing comparison below is meaningful
            const std::vector<int> expert(a.expert, a.expert + N), perm(a.perm, a.perm + N),
                offsets(a.offsets, a.offsets + E + 1);
            if (with_bias) REQUIRE(offsets[E] - offsets[E - 1] == 0);  // the zero-token expert
            int used = 0;
            for (int e = 0; e < E; e++) used += offsets[e + 1] > offsets[e];
            std::printf("  %-58s margin %.3f, %d of %d experts used\n", tag.c_str(), margin, used, E);
            const auto bias_start = with_bias ? bias : randn(rng, E, 0.05);  // for the balancing update below
            // GPU, both ways of running the experts' GEMMs
            for (const auto gemm : {hl::gpu::MoEGemm::cublas_loop, hl::gpu::MoEGemm::grouped}) {
                const bool grouped = gemm == hl::gpu::MoEGemm::grouped;
                const std::string gtag = tag + (grouped ? " grouped" : " cublas");
                DeviceBuffer<float> params_, dparams_, acts_, bias_, x_, dout_, out_, dinp_;
                DeviceBuffer<int> iacts_;
                to_dev(params_, params); to_dev(dparams_, dparams0); to_dev(bias_, bias); to_dev(x_, x);
                to_dev(dout_, dout);
                alloc_poisoned(acts_, gac.size); alloc_poisoned(iacts_, giac.size);
                alloc_poisoned(out_, out.size()); alloc_poisoned(dinp_, dinp.size());
                hl::Arena<float> dpa(params_.ptr), ddpa(dparams_.ptr), daa(acts_.ptr);
                hl::Arena<int> dia(iacts_.ptr);
                const auto gp = hl::moe_params(dpa, cfg);
                auto gdp = hl::moe_params(ddpa, cfg);
                auto ga = hl::gpu::gpu_moe_acts(daa, dia, cfg, N);
                const float* gbias = with_bias ? bias_.ptr : nullptr;
                hl::gpu::moe_forward(out_.ptr, ga, x_.ptr, gp, gbias, cfg, N, 0, gemm);
                hl::gpu::moe_backward(dinp_.ptr, gdp, dout_.ptr, ga, x_.ptr, gp, cfg, N, 0, gemm);
                const auto g_out = from_dev(out_), g_dinp = from_dev(dinp_), g_dparams = from_dev(dparams_);
                const auto g_acts = from_dev(acts_);
                const auto g_iacts = from_dev(iacts_);
                // routing: identical
                CHECK(slice(g_iacts, iacts_, ga.expert, N) == expert);
                CHECK(slice(g_iacts, iacts_, ga.perm, N) == perm);
                CHECK(slice(g_iacts, iacts_, ga.offsets, E + 1) == offsets);
                // the host copy: the cuBLAS loop's forward writes it, the grouped one leaves it as laid out (zeros)
                CHECK(ga.offsets_host == (grouped ? std::vector<int>(size_t(E) + 1, 0) : offsets));
                // forward
                expect_close(gtag + " out", g_out, out, FWD_TOL);
                expect_close(gtag + " logits", slice(g_acts, acts_, ga.logits, (size_t)N * E),
                             std::vector<float>(a.logits, a.logits + (size_t)N * E), FWD_TOL);
                expect_close(gtag + " gate", slice(g_acts, acts_, ga.gate, N), std::vector<float>(a.gate, a.gate + N),
                             FWD_TOL);
                expect_close(gtag + " yp (routed experts, permuted)", slice(g_acts, acts_, ga.yp, (size_t)N * D),
                             std::vector<float>(a.yp, a.yp + (size_t)N * D), FWD_TOL);
                // backward: dinp, dgate and every parameter tensor's gradient (+=)
                expect_close(gtag + " dinp", g_dinp, dinp, GRAD_TOL);
                expect_close(gtag + " dgate", slice(g_acts, acts_, ga.dgate, N),
                             std::vector<float>(a.dgate, a.dgate + N), GRAD_TOL);
                for (const auto& t : infos) {
                    const auto first = (long)t.offset, last = (long)(t.offset + t.numel);
                    expect_close(gtag + " d" + t.name + " (+=)",
                                 std::vector<float>(g_dparams.begin() + first, g_dparams.begin() + last),
                                 std::vector<float>(dparams.begin() + first, dparams.begin() + last), GRAD_TOL);
                }
                // experts without tokens: their gradients are left exactly as they were
                for (int e = 0; e < E; e++) {
                    if (offsets[e + 1] > offsets[e]) continue;
                    const size_t FD = (size_t)s.F * D;
                    for (const float* w : {dp.w1, dp.w3, dp.w2}) {
                        const size_t at = size_t(w - dparams.data()) + e * FD;
                        INFO(gtag, ": expert ", e, " has no tokens");
                        CHECK(std::vector<float>(g_dparams.begin() + at, g_dparams.begin() + at + FD) ==
                              std::vector<float>(dparams0.begin() + at, dparams0.begin() + at + FD));
                    }
                }
                // determinism: forward and backward again from the same state, bitwise equal
                to_dev(dparams_, dparams0);
                alloc_poisoned(out_, out.size()); alloc_poisoned(dinp_, dinp.size());
                hl::gpu::moe_forward(out_.ptr, ga, x_.ptr, gp, gbias, cfg, N, 0, gemm);
                hl::gpu::moe_backward(dinp_.ptr, gdp, dout_.ptr, ga, x_.ptr, gp, cfg, N, 0, gemm);
                CHECK(from_dev(out_) == g_out);
                CHECK(from_dev(dinp_) == g_dinp);
                CHECK(from_dev(dparams_) == g_dparams);
                // the balancing bias after this step, from the device offsets: bit-identical to the CPU (same integer
                // sign, same float add)
                auto bias_cpu = bias_start;
                to_dev(bias_, bias_cpu);
                hl::moe_update_bias(bias_cpu.data(), offsets.data(), E, cfg.bias_rate);
                hl::gpu::moe_update_bias(bias_.ptr, ga.offsets, E, cfg.bias_rate);
                CHECK(from_dev(bias_) == bias_cpu);
            }
        }
    }
}

// The two grouped GEMM kernels alone (moe_grouped_matmul both ways round, write and accumulate;
// moe_grouped_dweight) against a double-precision host loop over the groups, on random data. Group sizes around
// the 128-row tile (0, 1, 63, 64, 65, 127, 128, 129, 200), rows before the first group and after the last (they
// must stay untouched), a layout whose tile count nearly reaches the grid's bound (4 × 129 rows: 8 tiles of 9
// launched), one with no rows in any group; C and OC not multiples of the tile, and one pair above it (several
// tiles each way). Outputs start from random values, so "write" must not read them and "accumulate" must.
TEST_CASE("gpu grouped matmul kernels equal a host loop (ragged groups and sizes, rows outside untouched)") {
    hl::Rng rng(211);
    struct Layout { int lead, trail; std::vector<int> sizes; };  // rows before, rows after, group sizes
    const std::vector<Layout> layouts = {{3, 2, {0, 1, 63, 64, 65, 200, 127, 128, 129, 0}},
                                         {0, 0, {129, 129, 129, 129}},
                                         {5, 0, {0, 0, 0}}};
    struct S { int C, OC; };
    for (const Layout& g : layouts) {
        for (S s : {S{33, 70}, S{70, 33}, S{150, 260}}) {
            const int E = (int)g.sizes.size(), C = s.C, OC = s.OC;
            std::vector<int> offsets(size_t(E) + 1, g.lead);
            for (int e = 0; e < E; e++) offsets[size_t(e) + 1] = offsets[size_t(e)] + g.sizes[size_t(e)];
            const int N = offsets[size_t(E)] + g.trail;
            const size_t WE = (size_t)OC * C;  // one group's weight
            const std::string tag = "grouped N=" + std::to_string(N) + " E=" + std::to_string(E) + " C=" +
                                    std::to_string(C) + " OC=" + std::to_string(OC);
            const auto inp = randn(rng, (size_t)N * C), w = randn(rng, E * WE, 1.0 / std::sqrt((double)C));
            const auto out0 = randn(rng, (size_t)N * OC), dout = randn(rng, (size_t)N * OC), dw0 = randn(rng, E * WE);
            DeviceBuffer<int> offsets_;
            DeviceBuffer<float> inp_, w_, out_, dout_, dw_;
            to_dev(offsets_, offsets); to_dev(inp_, inp); to_dev(w_, w); to_dev(dout_, dout);
            const size_t first = (size_t)offsets[0] * OC, last = (size_t)offsets[size_t(E)] * OC;  // grouped rows
            // out rows of group e = inp rows · W_eᵀ (W_e (OC, C)) or · W_e (W_e (C, OC)), written or added
            for (bool transpose : {true, false}) {
                for (bool accumulate : {false, true}) {
                    std::vector<float> expect = out0;
                    for (int e = 0; e < E; e++) {
                        const float* we = w.data() + e * WE;
                        for (int r = offsets[size_t(e)]; r < offsets[size_t(e) + 1]; r++) {
                            for (int n = 0; n < OC; n++) {
                                double acc = accumulate ? out0[(size_t)r * OC + n] : 0.0;
                                for (int k = 0; k < C; k++)
                                    acc += (double)inp[(size_t)r * C + k] *
                                           we[transpose ? (size_t)n * C + k : (size_t)k * OC + n];
                                expect[(size_t)r * OC + n] = float(acc);
                            }
                        }
                    }
                    to_dev(out_, out0);
                    if (transpose)
                        hl::gpu::moe_grouped_matmul<true>(out_.ptr, inp_.ptr, w_.ptr, offsets_.ptr, N, C, OC, E,
                                                          accumulate);
                    else
                        hl::gpu::moe_grouped_matmul<false>(out_.ptr, inp_.ptr, w_.ptr, offsets_.ptr, N, C, OC, E,
                                                           accumulate);
                    const auto got = from_dev(out_);
                    expect_close(tag + (transpose ? " x·Wᵀ" : " x·W") + (accumulate ? " +=" : " ="), got, expect,
                                 FWD_TOL);
                    CHECK(std::equal(got.begin(), got.begin() + (long)first, out0.begin()));  // rows outside
                    CHECK(std::equal(got.begin() + (long)last, got.end(), out0.begin() + (long)last));
                }
            }
            // dW_e (OC, C) += dout rows of group eᵀ · inp rows of group e; empty groups bitwise unchanged
            std::vector<float> expect = dw0;
            for (int e = 0; e < E; e++) {
                for (int m = 0; m < OC; m++) {
                    for (int k = 0; k < C; k++) {
                        double acc = dw0[e * WE + (size_t)m * C + k];
                        for (int r = offsets[size_t(e)]; r < offsets[size_t(e) + 1]; r++)
                            acc += (double)dout[(size_t)r * OC + m] * inp[(size_t)r * C + k];
                        expect[e * WE + (size_t)m * C + k] = float(acc);
                    }
                }
            }
            to_dev(dw_, dw0);
            hl::gpu::moe_grouped_dweight(dw_.ptr, dout_.ptr, inp_.ptr, offsets_.ptr, N, C, OC, E);
            const auto got = from_dev(dw_);
            expect_close(tag + " dW +=", got, expect, FWD_TOL);
            for (int e = 0; e < E; e++) {
                if (g.sizes[size_t(e)] > 0) continue;
                INFO(tag, ": group ", e, " is empty");
                CHECK(std::equal(got.begin() + (long)(e * WE), got.begin() + (long)((e + 1) * WE),
                                 dw0.begin() + (long)(e * WE)));
            }
        }
    }
}

TEST_CASE("gpu moe_update_bias equals the CPU: over- and under-loaded experts move, balanced ones stay") {
    const int E = 4;
    const double rate = 1e-3;
    // loads (3, 1, 0, 4), mean 2: down, up, up, down; then loads (2, 2, 2, 2): nothing moves; then a single
    // token (N = 1 < E: the one loaded expert goes down, the rest up); offsets need not start at 0
    for (std::vector<int> offsets : {std::vector<int>{0, 3, 4, 4, 8}, std::vector<int>{0, 2, 4, 6, 8},
                                     std::vector<int>{5, 5, 6, 6, 6}}) {
        std::vector<float> bias = {0.1f, -0.2f, 0.0f, 0.3f}, expect = bias;
        hl::moe_update_bias(expect.data(), offsets.data(), E, rate);
        DeviceBuffer<int> off_;
        DeviceBuffer<float> bias_;
        to_dev(off_, offsets); to_dev(bias_, bias);
        hl::gpu::moe_update_bias(bias_.ptr, off_.ptr, E, rate);
        const auto got = from_dev(bias_);
        CHECK(got == expect);
        for (int e = 0; e < E; e++) {
            const long long diff = (offsets[E] - offsets[0]) - (long long)E * (offsets[e + 1] - offsets[e]);
            INFO("expert ", e, " load ", offsets[e + 1] - offsets[e]);
            if (diff == 0) CHECK(got[e] == bias[e]);
            if (diff > 0) CHECK(got[e] > bias[e]);
            if (diff < 0) CHECK(got[e] < bias[e]);
        }
    }
}
