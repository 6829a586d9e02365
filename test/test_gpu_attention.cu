// test_gpu_attention.cu — the GPU attention core (kernels/attention.cuh) and RoPE (kernels/rope.cuh) against the
// CPU reference (model/attention.h, model/rope.h) run in float on the host, on random inputs.
// Error measure (max-norm relative to the tensor's scale), stated once:
//   rel_err(g, c) = max_i |g_i − c_i| / max_i |c_i|          (∞ if any GPU value is not finite)
// Tolerances: forward outputs (out, lse, rope) ≤ 1e-4, gradients ≤ 1e-3.
// Every GPU output is poisoned with NaN (all bytes 0xFF) before its kernel runs, so an element the kernel fails
// to write fails the test.
#include <algorithm>                // std::max
#include <cmath>                    // std::fabs, std::isfinite, std::exp, std::log, std::sqrt
#include <cstdio>                   // std::printf for the measured errors
#include <vector>                   // std::vector host buffers
#include <doctest/doctest.h>        // TEST_CASE, CHECK, SUBCASE
#include "kernels/attention.cuh"    // hl::gpu::attention_forward/backward
#include "kernels/rope.cuh"         // hl::gpu::rope_forward/backward
#include "model/attention.h"        // hl::attention_forward/backward (CPU reference)
#include "model/rope.h"             // hl::rope_forward/backward (CPU reference)

namespace {

using hl::gpu::DeviceBuffer;

constexpr double FWD_TOL = 1e-4;
constexpr double GRAD_TOL = 1e-3;

double rel_err(const std::vector<float>& g, const std::vector<float>& c) {
    REQUIRE(g.size() == c.size());
    double num = 0, den = 0;
    for (size_t i = 0; i < g.size(); i++) {
        if (!std::isfinite(g[i])) return INFINITY;
        num = std::max(num, std::fabs(double(g[i]) - double(c[i])));
        den = std::max(den, std::fabs(double(c[i])));
    }
    return den > 0 ? num / den : num;
}

template <typename T>
void poison(DeviceBuffer<T>& buf) {
    cudaCheck(cudaMemset(buf.ptr, 0xFF, buf.n * sizeof(T)));
}

std::vector<float> randn(hl::Rng& rng, size_t n, double std = 1.0) {
    std::vector<float> x(n);
    rng.fill_normal(x.data(), n, std);
    return x;
}

struct AttnErrors {
    double out = 0, lse = 0, dq = 0, dk = 0, dv = 0;
};

// One configuration: CPU forward/backward in float, GPU forward/backward, the errors of every output.
AttnErrors run_attention(int B, int T, int H, int Hkv, int dqk, int dv, uint64_t seed) {
    hl::Rng rng(seed);
    const size_t nq = (size_t)B * T * H * dqk, nk = (size_t)B * T * Hkv * dqk, nv = (size_t)B * T * Hkv * dv,
                 no = (size_t)B * T * H * dv, nl = (size_t)B * H * T;
    auto q = randn(rng, nq), k = randn(rng, nk), v = randn(rng, nv), dout = randn(rng, no);

    // CPU reference
    std::vector<float> out(no), att((size_t)B * H * T * T), dq(nq), dk(nk), dvv(nv);
    hl::attention_forward(out.data(), att.data(), q.data(), k.data(), v.data(), B, T, H, Hkv, dqk, dv);
    hl::attention_backward(dq.data(), dk.data(), dvv.data(), dout.data(), att.data(), q.data(), k.data(), v.data(),
                           B, T, H, Hkv, dqk, dv);
    // log-sum-exp of each row's visible scores, in double from q and k (what the GPU saves)
    std::vector<float> lse(nl);
    const int group = H / Hkv;
    const double scale = 1.0 / std::sqrt(double(dqk));
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++)
            for (int t = 0; t < T; t++) {
                const float* qt = &q[(((size_t)b * T + t) * H + h) * dqk];
                std::vector<double> s(t + 1);
                double mx = -INFINITY;
                for (int j = 0; j <= t; j++) {
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
    DeviceBuffer<float> d_q(nq), d_k(nk), d_v(nv), d_dout(no), d_out(no), d_lse(nl), d_D(nl), d_dq(nq), d_dk(nk),
        d_dv(nv);
    d_q.upload(q);
    d_k.upload(k);
    d_v.upload(v);
    d_dout.upload(dout);
    poison(d_out);
    poison(d_lse);
    hl::gpu::attention_forward(d_out.ptr, d_lse.ptr, d_q.ptr, d_k.ptr, d_v.ptr, B, T, H, Hkv, dqk, dv);
    poison(d_dq);
    poison(d_dk);
    poison(d_dv);
    poison(d_D);
    hl::gpu::attention_backward(d_dq.ptr, d_dk.ptr, d_dv.ptr, d_D.ptr, d_dout.ptr, d_out.ptr, d_lse.ptr, d_q.ptr,
                                d_k.ptr, d_v.ptr, B, T, H, Hkv, dqk, dv);
    cudaCheck(cudaDeviceSynchronize());

    AttnErrors e;
    e.out = rel_err(d_out.download(), out);
    e.lse = rel_err(d_lse.download(), lse);
    e.dq = rel_err(d_dq.download(), dq);
    e.dk = rel_err(d_dk.download(), dk);
    e.dv = rel_err(d_dv.download(), dvv);
    std::printf("attention B=%d T=%4d H=%d Hkv=%d d_qk=%3d d_v=%3d  rel err: out %.2e lse %.2e dq %.2e dk %.2e "
                "dv %.2e\n",
                B, T, H, Hkv, dqk, dv, e.out, e.lse, e.dq, e.dk, e.dv);
    return e;
}

void check_attention(int B, int T, int H, int Hkv, int dqk, int dv, uint64_t seed) {
    CAPTURE(B);
    CAPTURE(T);
    CAPTURE(H);
    CAPTURE(Hkv);
    CAPTURE(dqk);
    CAPTURE(dv);
    AttnErrors e = run_attention(B, T, H, Hkv, dqk, dv, seed);
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

TEST_CASE("gpu attention backward is deterministic (bitwise) and refuses unsupported head dims") {
    const int B = 2, T = 150, H = 6, Hkv = 2, dqk = 64, dv = 128;
    hl::Rng rng(400);
    const size_t nq = (size_t)B * T * H * dqk, nk = (size_t)B * T * Hkv * dqk, nv = (size_t)B * T * Hkv * dv,
                 no = (size_t)B * T * H * dv, nl = (size_t)B * H * T;
    DeviceBuffer<float> d_q(nq), d_k(nk), d_v(nv), d_dout(no), d_out(no), d_lse(nl), d_D(nl), d_dq(nq), d_dk(nk),
        d_dv(nv);
    d_q.upload(randn(rng, nq));
    d_k.upload(randn(rng, nk));
    d_v.upload(randn(rng, nv));
    d_dout.upload(randn(rng, no));
    hl::gpu::attention_forward(d_out.ptr, d_lse.ptr, d_q.ptr, d_k.ptr, d_v.ptr, B, T, H, Hkv, dqk, dv);
    std::vector<float> first[3];
    for (int rep = 0; rep < 2; rep++) {
        poison(d_dq);
        poison(d_dk);
        poison(d_dv);
        hl::gpu::attention_backward(d_dq.ptr, d_dk.ptr, d_dv.ptr, d_D.ptr, d_dout.ptr, d_out.ptr, d_lse.ptr, d_q.ptr,
                                    d_k.ptr, d_v.ptr, B, T, H, Hkv, dqk, dv);
        std::vector<float> now[3] = {d_dq.download(), d_dk.download(), d_dv.download()};
        if (rep == 0)
            for (int i = 0; i < 3; i++) first[i] = now[i];
        else
            for (int i = 0; i < 3; i++) CHECK(now[i] == first[i]);
    }
    CHECK_THROWS_AS(hl::gpu::attention_forward(d_out.ptr, d_lse.ptr, d_q.ptr, d_k.ptr, d_v.ptr, B, T, H, Hkv, 130,
                                               dv),
                    hl::Error);
    CHECK_THROWS_AS(hl::gpu::attention_forward(d_out.ptr, d_lse.ptr, d_q.ptr, d_k.ptr, d_v.ptr, B, T, H, Hkv, dqk,
                                               257),
                    hl::Error);
    CHECK_THROWS_AS(hl::gpu::attention_forward(d_out.ptr, d_lse.ptr, d_q.ptr, d_k.ptr, d_v.ptr, B, T, 6, 4, dqk, dv),
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
    }
    DeviceBuffer<float> d(16);
    CHECK_THROWS_AS(hl::gpu::rope_forward(d.ptr, d.ptr, 1, 2, 1, 7, 10000.0), hl::Error);  // odd head dim
}
