// test_gpu_layers.cu — the GPU kernels of matmul, rmsnorm, embedding, swiglu, crossentropy, adamw (+ norm and
// clipping) and conv1d against the CPU reference (model/*.h run in float on the host), on random inputs at
// several shapes (sizes of 1, odd sizes, sizes that are not multiples of the block/tile sizes, V = 256 and a
// 50257-like vocabulary).
//
// Error norm: rel err = max_i |gpu_i − cpu_i| / max_i |cpu_i| (max-norm, relative to the tensor's scale);
// a NaN anywhere in the GPU result makes it infinite. Tolerances: forward outputs (and optimizer states)
// ≤ 1e-4, gradients ≤ 1e-3. Every output buffer is filled with NaN (all bits set) before the kernel runs,
// so an element a kernel forgets to write fails; parameter gradients start from random values (not zero)
// so that "accumulate (+=)" is checked too. Each comparison prints one line with its measured error.
#include <doctest/doctest.h>      // TEST_CASE, CHECK, INFO
#include <algorithm>              // std::equal
#include <cmath>                  // std::fabs, std::isfinite, std::isnan
#include <cstdio>                 // std::printf
#include <memory>                 // std::unique_ptr: the shard tables
#include <string>                 // std::string
#include <vector>                 // std::vector
#include "kernels/common.cuh"     // DeviceBuffer, cudaCheck
#include "test/gpu_check.cuh"     // tolerances, device buffers, rel_err, expect_close
#include "kernels/matmul.cuh"     // gpu::matmul_forward/backward
#include "kernels/rmsnorm.cuh"    // gpu::rmsnorm_forward/backward
#include "kernels/embedding.cuh"  // gpu::embedding_forward/backward
#include "kernels/swiglu.cuh"     // gpu::swiglu_forward/backward
#include "kernels/crossentropy.cuh"  // gpu::crossentropy_forward/backward
#include "kernels/adamw.cuh"      // gpu::AdamWTable, adamw_update, grad_norm, clip_grad_norm
#include "kernels/conv1d.cuh"     // gpu::conv1d_silu_forward/backward
#include "model/matmul.h"         // CPU references ...
#include "model/rmsnorm.h"
#include "model/embedding.h"
#include "model/swiglu.h"
#include "model/crossentropy.h"
#include "model/adamw.h"
#include "model/conv1d.h"

namespace {

using namespace hl::test;  // FWD_TOL, GRAD_TOL, randn, to_dev, poison, alloc_poisoned, from_dev, rel_err, expect_close

std::string shape(std::initializer_list<int> dims) {
    std::string s = "(";
    for (int d : dims) s += (s.size() > 1 ? "," : "") + std::to_string(d);
    return s + ")";
}

}  // namespace

TEST_CASE("gpu matmul forward/backward (cuBLAS, fp32 without TF32) equals the CPU") {
    hl::Rng rng(101);
    struct S { int N, C, OC; };
    for (S s : {S{1, 1, 1}, S{37, 19, 23}, S{128, 64, 96}, S{257, 130, 515}, S{1024, 768, 2048}}) {
        const std::string tag = "matmul " + shape({s.N, s.C, s.OC});
        auto x = randn(rng, (size_t)s.N * s.C), w = randn(rng, (size_t)s.OC * s.C, 0.1), b = randn(rng, s.OC);
        auto dout = randn(rng, (size_t)s.N * s.OC), dw0 = randn(rng, w.size()), db0 = randn(rng, b.size());
        DeviceBuffer<float> dx_, dw_, db_, out_, ddout, ddinp, ddw, ddb;
        to_dev(dx_, x); to_dev(dw_, w); to_dev(db_, b); to_dev(ddout, dout);
        for (bool with_bias : {true, false}) {
            std::vector<float> out((size_t)s.N * s.OC);
            hl::matmul_forward(out.data(), x.data(), w.data(), with_bias ? b.data() : (const float*)nullptr, s.N, s.C,
                               s.OC);
            alloc_poisoned(out_, out.size());
            hl::gpu::matmul_forward(out_.ptr, dx_.ptr, dw_.ptr, with_bias ? db_.ptr : (const float*)nullptr, s.N, s.C,
                                    s.OC);
            expect_close(tag + (with_bias ? " out (bias)" : " out (no bias)"), from_dev(out_), out, FWD_TOL);
        }
        // all three gradients; dweight and dbias start from random values (+=)
        std::vector<float> dinp(x.size()), dw = dw0, db = db0;
        hl::matmul_backward(dinp.data(), dw.data(), db.data(), dout.data(), x.data(), w.data(), s.N, s.C, s.OC);
        alloc_poisoned(ddinp, dinp.size()); to_dev(ddw, dw0); to_dev(ddb, db0);
        hl::gpu::matmul_backward(ddinp.ptr, ddw.ptr, ddb.ptr, ddout.ptr, dx_.ptr, dw_.ptr, s.N, s.C, s.OC);
        expect_close(tag + " dinp", from_dev(ddinp), dinp, GRAD_TOL);
        expect_close(tag + " dweight (+=)", from_dev(ddw), dw, GRAD_TOL);
        expect_close(tag + " dbias (+=)", from_dev(ddb), db, GRAD_TOL);
        // null pointers: only dbias, then only dinp (the others must be left alone)
        std::vector<float> db2 = db0;
        hl::matmul_backward<float>(nullptr, nullptr, db2.data(), dout.data(), x.data(), w.data(), s.N, s.C, s.OC);
        to_dev(ddb, db0); to_dev(ddw, dw0);
        hl::gpu::matmul_backward<float>(nullptr, nullptr, ddb.ptr, ddout.ptr, dx_.ptr, dw_.ptr, s.N, s.C, s.OC);
        expect_close(tag + " dbias only", from_dev(ddb), db2, GRAD_TOL);
        poison(ddinp);
        hl::gpu::matmul_backward<float>(ddinp.ptr, nullptr, nullptr, ddout.ptr, dx_.ptr, dw_.ptr, s.N, s.C, s.OC);
        expect_close(tag + " dinp only", from_dev(ddinp), dinp, GRAD_TOL);
        CHECK(from_dev(ddw) == dw0);  // untouched
    }
}

TEST_CASE("gpu matmul with bf16 operands (tensor cores) equals the CPU on the bf16-rounded operands") {
    // The weight lives inside a "parameter" buffer (at an offset, as in a model) whose bf16 copy the GEMMs read; the
    // CPU reference multiplies the same operands rounded to bf16, in fp32 like the GPU's accumulation. Against the
    // unrounded fp32 product the error must be far larger: the tensor-core path really ran.
    hl::Rng rng(102);
    struct S { int N, C, OC; };
    for (S s : {S{1, 1, 1}, S{37, 19, 23}, S{257, 130, 515}, S{1024, 768, 2048}}) {
        const std::string tag = "matmul bf16 " + shape({s.N, s.C, s.OC});
        const size_t offset = 13;  // the weight's place in the parameters (odd: an unaligned copy)
        auto params = randn(rng, offset + (size_t)s.OC * s.C + 5, 0.1);
        auto x = randn(rng, (size_t)s.N * s.C), dout = randn(rng, (size_t)s.N * s.OC);
        auto dw0 = randn(rng, (size_t)s.OC * s.C), b = randn(rng, s.OC);
        const std::vector<float> w(params.begin() + offset, params.begin() + offset + (size_t)s.OC * s.C);
        const auto x16 = round_bf16_host(x), w16 = round_bf16_host(w), dout16 = round_bf16_host(dout);
        DeviceBuffer<float> dparams, dx_, ddout, db_, out_, ddinp, ddw;
        to_dev(dparams, params); to_dev(dx_, x); to_dev(ddout, dout); to_dev(db_, b);
        const TestBf16 b16(dparams.ptr, params.size(), (size_t)s.N * std::max(s.C, s.OC));
        const hl::gpu::Bf16Operands& ops = b16.ops;
        const float* dw_ptr = dparams.ptr + offset;

        std::vector<float> out((size_t)s.N * s.OC), out32(out.size());
        hl::matmul_forward(out.data(), x16.data(), w16.data(), b.data(), s.N, s.C, s.OC);
        hl::matmul_forward(out32.data(), x.data(), w.data(), b.data(), s.N, s.C, s.OC);
        std::vector<float> dinp(x.size()), dw = dw0;
        hl::matmul_backward(dinp.data(), dw.data(), (float*)nullptr, dout16.data(), x16.data(), w16.data(), s.N, s.C,
                            s.OC);
        alloc_poisoned(out_, out.size());
        alloc_poisoned(ddinp, dinp.size());
        to_dev(ddw, dw0);
        {
            const hl::gpu::Bf16Scope scope(&ops);
            hl::gpu::matmul_forward(out_.ptr, dx_.ptr, dw_ptr, db_.ptr, s.N, s.C, s.OC);
            hl::gpu::matmul_backward(ddinp.ptr, ddw.ptr, (float*)nullptr, ddout.ptr, dx_.ptr, dw_ptr, s.N, s.C, s.OC);
        }
        CHECK(hl::gpu::current_bf16() == nullptr);  // the scope closed
        expect_close(tag + " out", from_dev(out_), out, FWD_TOL);
        expect_close(tag + " dinp", from_dev(ddinp), dinp, GRAD_TOL);
        expect_close(tag + " dweight (+=)", from_dev(ddw), dw, GRAD_TOL);
        if (s.C >= 19) {
            const double vs_fp32 = rel_err(from_dev(out_), out32);
            std::printf("  %-64s rel err %.2e (> 1e-4: the operands were rounded)\n", (tag + " out vs fp32").c_str(),
                        vs_fp32);
            CHECK(vs_fp32 > 1e-4);
        }
        // a weight that is not a parameter is refused, not read from somewhere else
        const hl::gpu::Bf16Scope scope(&ops);
        CHECK_THROWS_AS(hl::gpu::matmul_forward(out_.ptr, dx_.ptr, dx_.ptr, (const float*)nullptr, 1, 1, 1), hl::Error);
    }
}

TEST_CASE("gpu rmsnorm (plain and grouped, with and without weight; dweight by partial sums; dout in bf16) equals the CPU") {
    hl::Rng rng(102);
    // (no Cg = 1: there x̂ = ±1 up to eps and dinp is pure cancellation, ill-conditioned on the CPU as well)
    struct S { int N, G, Cg; };
    // (the last four take the wide-row forward and backward: Cg % 4 == 0 and 1024 ≤ Cg ≤ 4096; 1030 does not)
    for (S s : {S{1, 1, 3}, S{7, 1, 33}, S{65, 3, 17}, S{33, 5, 129}, S{129, 8, 64}, S{9, 1, 1030}, S{300, 1, 2048},
                S{40, 1, 1028}, S{17, 2, 4096}, S{5, 3, 1024}}) {
        for (bool with_weight : {true, false}) {
            const std::string tag = "rmsnorm " + shape({s.N, s.G, s.Cg}) + (with_weight ? " w" : " no-w");
            const int C = s.G * s.Cg;
            auto x = randn(rng, (size_t)s.N * C, 2.0, 0.3), w = randn(rng, C, 0.3, 1.0);
            auto dout = randn(rng, x.size()), dw0 = randn(rng, C);
            const float* wp = with_weight ? w.data() : nullptr;
            std::vector<float> out(x.size()), rstd((size_t)s.N * s.G), dinp(x.size()), dw = dw0;
            hl::rmsnorm_forward(out.data(), rstd.data(), x.data(), wp, s.N, s.G, s.Cg, 1e-5f);
            hl::rmsnorm_backward(dinp.data(), with_weight ? dw.data() : nullptr, dout.data(), x.data(), wp,
                                 rstd.data(), s.N, s.G, s.Cg);
            DeviceBuffer<float> dx_, dw_, ddout, out_, rstd_, dinp_, ddw;
            to_dev(dx_, x); to_dev(dw_, w); to_dev(ddout, dout); to_dev(ddw, dw0);
            alloc_poisoned(out_, out.size()); alloc_poisoned(rstd_, rstd.size()); alloc_poisoned(dinp_, dinp.size());
            const float* wpd = with_weight ? dw_.ptr : nullptr;
            hl::gpu::rmsnorm_forward(out_.ptr, rstd_.ptr, dx_.ptr, wpd, s.N, s.G, s.Cg, 1e-5f);
            hl::gpu::rmsnorm_backward(dinp_.ptr, with_weight ? ddw.ptr : nullptr, ddout.ptr, dx_.ptr, wpd, rstd_.ptr,
                                      s.N, s.G, s.Cg);
            expect_close(tag + " out", from_dev(out_), out, FWD_TOL);
            expect_close(tag + " rstd", from_dev(rstd_), rstd, FWD_TOL);
            expect_close(tag + " dinp", from_dev(dinp_), dinp, GRAD_TOL);
            if (with_weight) expect_close(tag + " dweight (+=)", from_dev(ddw), dw, GRAD_TOL);
            else CHECK(from_dev(ddw) == dw0);
            if (with_weight) {  // the weight gradient from the wide-row kernel's partial sums (the blocks' norms)
                DeviceBuffer<float> part, ddw2, dinp2;
                to_dev(ddw2, dw0);
                alloc_poisoned(part, hl::gpu::rmsnorm_dweight_part_size(s.N, s.G, s.Cg));
                alloc_poisoned(dinp2, dinp.size());
                hl::gpu::rmsnorm_backward(dinp2.ptr, ddw2.ptr, ddout.ptr, dx_.ptr, wpd, rstd_.ptr, s.N, s.G, s.Cg, 0,
                                          (const float*)nullptr, part.ptr);
                CHECK(from_dev(dinp2) == from_dev(dinp_));
                expect_close(tag + " dweight (+=) through dw_part", from_dev(ddw2), dw, GRAD_TOL);
            }
            // with a residual gradient added in the same pass (the block's dh = norm2ᵀ(dn) + dy): dinp + residual,
            // also in place (the residual is dinp itself)
            const auto res = randn(rng, x.size());
            std::vector<float> want = dinp;
            for (size_t i = 0; i < want.size(); i++) want[i] += res[i];
            DeviceBuffer<float> res_;
            to_dev(res_, res);
            hl::gpu::rmsnorm_backward(dinp_.ptr, (float*)nullptr, ddout.ptr, dx_.ptr, wpd, rstd_.ptr, s.N, s.G, s.Cg,
                                      0, res_.ptr);
            expect_close(tag + " dinp + residual", from_dev(dinp_), want, GRAD_TOL);
            hl::gpu::rmsnorm_backward(res_.ptr, (float*)nullptr, ddout.ptr, dx_.ptr, wpd, rstd_.ptr, s.N, s.G, s.Cg,
                                      0, res_.ptr);
            expect_close(tag + " dinp + residual, in place", from_dev(res_), want, GRAD_TOL);
            // dinp16 (the bf16 copy for a GEMM's dout), as the block writes it: in place, with dw_part; bitwise the
            // fp32 dinp rounded, and the fp32 dinp unchanged by it
            DeviceBuffer<float> res2, part2, ddw3;
            DeviceBuffer<hl::gpu::bf16> dinp16(x.size());
            to_dev(res2, res); to_dev(ddw3, dw0);
            alloc_poisoned(part2, hl::gpu::rmsnorm_dweight_part_size(s.N, s.G, s.Cg));
            cudaCheck(cudaMemset(dinp16.ptr, 0xFF, dinp16.n * sizeof(hl::gpu::bf16)));
            hl::gpu::rmsnorm_backward(res2.ptr, with_weight ? ddw3.ptr : nullptr, ddout.ptr, dx_.ptr, wpd, rstd_.ptr,
                                      s.N, s.G, s.Cg, 0, res2.ptr, part2.ptr, dinp16.ptr);
            const auto got = from_dev(res2);
            CHECK(got == from_dev(res_));
            std::vector<hl::gpu::bf16> got16 = dinp16.download();
            size_t mismatch = 0;
            for (size_t i = 0; i < got.size(); i++)
                mismatch += __bfloat162float(got16[i]) != round_bf16_host(got[i]);
            INFO(tag, ": dinp16 differs from dinp rounded at ", mismatch, " elements");
            CHECK(mismatch == 0);
            // dout16 (dout in bf16, as a GEMM writes the block's dn in bf16 runs): bitwise what the same call gives
            // on dout's rounded values in fp32 (dinp, dinp16 and dweight, through dw_part and through the column sum)
            DeviceBuffer<float> doutr;
            to_dev(doutr, round_bf16_host(dout));
            DeviceBuffer<hl::gpu::bf16> dout16;
            TestBf16::take_bf16(dout16, ddout);  // (ddout poisoned: a read of it would show)
            for (bool with_part : {true, false}) {
                DeviceBuffer<float> ra, rb, pa, pb, wa, wb;
                DeviceBuffer<hl::gpu::bf16> ia(x.size()), ib(x.size());
                to_dev(ra, res); to_dev(rb, res); to_dev(wa, dw0); to_dev(wb, dw0);
                alloc_poisoned(pa, hl::gpu::rmsnorm_dweight_part_size(s.N, s.G, s.Cg));
                alloc_poisoned(pb, pa.n);
                float* wa_ = with_weight ? wa.ptr : nullptr;
                float* wb_ = with_weight ? wb.ptr : nullptr;
                hl::gpu::rmsnorm_backward(ra.ptr, wa_, doutr.ptr, dx_.ptr, wpd, rstd_.ptr, s.N, s.G, s.Cg, 0, ra.ptr,
                                          with_part ? pa.ptr : nullptr, ia.ptr);
                hl::gpu::rmsnorm_backward(rb.ptr, wb_, (const float*)nullptr, dx_.ptr, wpd, rstd_.ptr, s.N, s.G, s.Cg,
                                          0, rb.ptr, with_part ? pb.ptr : nullptr, ib.ptr, dout16.ptr);
                INFO(tag, with_part ? " (dw_part)" : " (column sum)", ": dout16 against its values in fp32");
                const bool same = from_dev(rb) == from_dev(ra) && from_dev(wb) == from_dev(wa);
                const std::vector<hl::gpu::bf16> a16 = ia.download(), b16 = ib.download();
                size_t diff16 = 0;
                for (size_t i = 0; i < a16.size(); i++) diff16 += __bfloat162float(a16[i]) != __bfloat162float(b16[i]);
                CHECK(same);
                CHECK(diff16 == 0);
                if (with_part)
                    std::printf("  %-64s bitwise equal to its fp32 values: %s\n", (tag + " dout16").c_str(),
                                same && diff16 == 0 ? "yes" : "NO");
            }
        }
    }
}

TEST_CASE("gpu add_rmsnorm_forward (the block's residual add and norm in one pass) equals add then rmsnorm, bitwise; res in bf16 too") {
    hl::Rng rng(108);
    for (int D : {33, 1024, 2048}) {  // the warp kernel, then the wide-row one
        const int N = 37;
        const size_t n = (size_t)N * D;
        auto x = randn(rng, n), r = randn(rng, n), w = randn(rng, D, 0.3, 1.0);
        DeviceBuffer<float> x_, r_, w_, h1, o1, s1, h2, o2, s2;
        to_dev(x_, x); to_dev(r_, r); to_dev(w_, w);
        alloc_poisoned(h1, n); alloc_poisoned(o1, n); alloc_poisoned(s1, N);
        alloc_poisoned(h2, n); alloc_poisoned(o2, n); alloc_poisoned(s2, N);
        hl::gpu::add(h1.ptr, x_.ptr, r_.ptr, n);
        hl::gpu::rmsnorm_forward(o1.ptr, s1.ptr, h1.ptr, w_.ptr, N, 1, D, 1e-5f);
        hl::gpu::add_rmsnorm_forward(h2.ptr, o2.ptr, s2.ptr, x_.ptr, r_.ptr, w_.ptr, N, D, 1e-5f);
        INFO("D = ", D);
        CHECK(from_dev(h2) == from_dev(h1));
        CHECK(from_dev(o2) == from_dev(o1));
        CHECK(from_dev(s2) == from_dev(s1));
        std::printf("  add_rmsnorm (%d,%d): sum, out, rstd bitwise equal to add then rmsnorm: %s\n", N, D,
                    from_dev(o2) == from_dev(o1) && from_dev(h2) == from_dev(h1) ? "yes" : "NO");
        // res16 (the branch output in bf16, as its GEMM writes it in bf16 runs): bitwise the same call on its
        // values in fp32; sum still fp32 (the residual stream), out in bf16 as the block takes it (out16)
        DeviceBuffer<float> rr;
        to_dev(rr, round_bf16_host(r));
        DeviceBuffer<hl::gpu::bf16> r16, oa(n), ob(n);
        TestBf16::take_bf16(r16, r_);  // (r_ poisoned)
        hl::gpu::add_rmsnorm_forward(h1.ptr, o1.ptr, s1.ptr, x_.ptr, rr.ptr, w_.ptr, N, D, 1e-5f, 0, oa.ptr);
        hl::gpu::add_rmsnorm_forward(h2.ptr, o2.ptr, s2.ptr, x_.ptr, (const float*)nullptr, w_.ptr, N, D, 1e-5f, 0,
                                     ob.ptr, r16.ptr);
        const std::vector<hl::gpu::bf16> a16 = oa.download(), b16 = ob.download();
        size_t diff16 = 0;
        for (size_t i = 0; i < n; i++) diff16 += __bfloat162float(a16[i]) != __bfloat162float(b16[i]);
        CHECK(from_dev(h2) == from_dev(h1));
        CHECK(from_dev(s2) == from_dev(s1));
        CHECK(diff16 == 0);
        std::printf("  add_rmsnorm (%d,%d) with res16: bitwise equal to res's bf16 values in fp32: %s\n", N, D,
                    from_dev(h2) == from_dev(h1) && diff16 == 0 ? "yes" : "NO");
    }
}

TEST_CASE("gpu embedding forward/backward equals the CPU (backward bit-exact: same summation order)") {
    hl::Rng rng(103);
    struct S { int B, T, V, D; bool text = false; };
    // (text: text-like ids, a third of them one byte, so a row sums hundreds of positions, D over several tiles;
    // the last: ~2700 of them, more than the kernel gathers before it adds them)
    for (S s : {S{1, 1, 1, 1}, S{3, 17, 256, 33}, S{1, 7, 5, 1500}, S{4, 129, 256, 768}, S{2, 50, 50257, 64},
                S{4, 700, 256, 1030, true}, S{8, 1024, 256, 260, true}}) {
        const std::string tag = "embedding " + shape({s.B, s.T, s.V, s.D});
        const int N = s.B * s.T;
        std::vector<int> tok(N);
        for (int& t : tok) t = s.text && rng.next() % 3 == 0 ? 32 : int(rng.next() % (uint64_t)s.V);
        auto wte = randn(rng, (size_t)s.V * s.D), dout = randn(rng, (size_t)N * s.D), dwte0 = randn(rng, wte.size());
        std::vector<float> out((size_t)N * s.D), dwte = dwte0;
        hl::embedding_forward(out.data(), tok.data(), wte.data(), s.B, s.T, s.V, s.D);
        hl::embedding_backward(dwte.data(), dout.data(), tok.data(), s.B, s.T, s.V, s.D);
        DeviceBuffer<int> tok_;
        DeviceBuffer<float> wte_, dout_, out_, dwte_;
        to_dev(tok_, tok); to_dev(wte_, wte); to_dev(dout_, dout); to_dev(dwte_, dwte0);
        alloc_poisoned(out_, out.size());
        hl::gpu::embedding_forward(out_.ptr, tok_.ptr, wte_.ptr, s.B, s.T, s.V, s.D);
        hl::gpu::embedding_backward(dwte_.ptr, dout_.ptr, tok_.ptr, s.B, s.T, s.V, s.D);
        auto g_out = from_dev(out_), g_dwte = from_dev(dwte_);
        expect_close(tag + " out", g_out, out, FWD_TOL);
        expect_close(tag + " dwte (+=)", g_dwte, dwte, GRAD_TOL);
        CHECK(g_out == out);    // a copy: exact
        CHECK(g_dwte == dwte);  // same order of additions as the CPU: exact
    }
    // an out-of-range id gives a NaN row (never a stray read), and matches no row in the backward; D = 3: one
    // element a thread, D = 4: four
    for (int D : {3, 4}) {
        std::vector<int> tok = {0, 7, 2};
        const int V = 4;
        DeviceBuffer<int> tok_;
        DeviceBuffer<float> wte_, out_;
        to_dev(tok_, tok); wte_.alloc(V * D); wte_.zero(); out_.alloc(tok.size() * D);
        hl::gpu::embedding_forward(out_.ptr, tok_.ptr, wte_.ptr, 1, 3, V, D);
        auto o = from_dev(out_);
        for (int d = 0; d < D; d++) {
            CHECK(o[d] == 0.0f);
            CHECK(std::isnan(o[D + d]));
            CHECK(o[2 * D + d] == 0.0f);
        }
    }
}

TEST_CASE("gpu swiglu forward/backward equals the CPU (host layouts reused on device memory)") {
    hl::Rng rng(104);
    struct S { int N, D, F; };
    for (S s : {S{1, 1, 1}, S{37, 33, 65}, S{128, 64, 172}, S{300, 256, 683}}) {
        const std::string tag = "swiglu " + shape({s.N, s.D, s.F});
        hl::SwiGLUConfig cfg{s.D, s.F};
        hl::Arena<float> pc, ac;
        hl::swiglu_params(pc, cfg);
        hl::swiglu_acts(ac, cfg, s.N);
        // host
        auto params = randn(rng, pc.size, 0.2), dparams0 = randn(rng, pc.size);
        std::vector<float> dparams = dparams0, acts(ac.size);
        auto x = randn(rng, (size_t)s.N * s.D), dout = randn(rng, (size_t)s.N * s.D);
        hl::Arena<float> hp(params.data()), hdp(dparams.data()), ha(acts.data());
        auto p = hl::swiglu_params(hp, cfg);
        auto dp = hl::swiglu_params(hdp, cfg);
        auto a = hl::swiglu_acts(ha, cfg, s.N);
        std::vector<float> out(x.size()), dinp(x.size());
        hl::swiglu_forward(out.data(), a, x.data(), p, cfg, s.N);
        hl::swiglu_backward(dinp.data(), dp, dout.data(), a, x.data(), p, cfg, s.N);
        std::vector<float> h(a.h, a.h + (size_t)s.N * s.F);
        // device: the same layout functions over device pointers
        DeviceBuffer<float> params_, dparams_, acts_, x_, dout_, out_, dinp_;
        to_dev(params_, params); to_dev(dparams_, dparams0); to_dev(x_, x); to_dev(dout_, dout);
        alloc_poisoned(acts_, ac.size); alloc_poisoned(out_, out.size()); alloc_poisoned(dinp_, dinp.size());
        hl::Arena<float> dpa(params_.ptr), ddpa(dparams_.ptr), daa(acts_.ptr);
        auto gp = hl::swiglu_params(dpa, cfg);
        auto gdp = hl::swiglu_params(ddpa, cfg);
        auto ga = hl::swiglu_acts(daa, cfg, s.N);
        hl::gpu::swiglu_forward(out_.ptr, ga, x_.ptr, gp, cfg, s.N);
        hl::gpu::swiglu_backward(dinp_.ptr, gdp, dout_.ptr, ga, x_.ptr, gp, cfg, s.N);
        auto gacts = from_dev(acts_);
        expect_close(tag + " out", from_dev(out_), out, FWD_TOL);
        expect_close(tag + " acts.h", std::vector<float>(gacts.begin() + (ga.h - acts_.ptr),
                                                         gacts.begin() + (ga.h - acts_.ptr) + h.size()), h, FWD_TOL);
        expect_close(tag + " dinp", from_dev(dinp_), dinp, GRAD_TOL);
        expect_close(tag + " dparams w1,w3,w2 (+=)", from_dev(dparams_), dparams, GRAD_TOL);
    }
}

// bf16 values of a device buffer, widened to floats on the host
static std::vector<float> from_dev_bf16(const hl::gpu::bf16* p, size_t n) {
    std::vector<hl::gpu::bf16> h(n);
    cudaCheck(cudaMemcpy(h.data(), p, n * sizeof(hl::gpu::bf16), cudaMemcpyDeviceToHost));
    std::vector<float> f(n);
    for (size_t i = 0; i < n; i++) f[i] = __bfloat162float(h[i]);
    return f;
}

TEST_CASE("gpu rmsnorm and swiglu under bf16 operands: outputs that only feed matmuls are written in bf16") {
    hl::Rng rng(107);
    // rmsnorm's out16 holds exactly its fp32 output rounded (the warp kernel, and the wide-row one from Cg = 1024)
    struct R { int N, G, Cg; };
    for (R r : {R{65, 3, 17}, R{40, 1, 1024}, R{17, 1, 2048}}) {
        const std::string tag = "rmsnorm out16 " + shape({r.N, r.G, r.Cg});
        const size_t n = (size_t)r.N * r.G * r.Cg;
        auto x = randn(rng, n, 2.0, 0.3), w = randn(rng, (size_t)r.G * r.Cg, 0.3, 1.0);
        DeviceBuffer<float> x_, w_, out_, rstd_, rstd16_;
        DeviceBuffer<hl::gpu::bf16> out16_(n);
        to_dev(x_, x); to_dev(w_, w);
        alloc_poisoned(out_, n); alloc_poisoned(rstd_, (size_t)r.N * r.G); alloc_poisoned(rstd16_, (size_t)r.N * r.G);
        hl::gpu::rmsnorm_forward(out_.ptr, rstd_.ptr, x_.ptr, w_.ptr, r.N, r.G, r.Cg, 1e-5f);
        hl::gpu::rmsnorm_forward(out_.ptr, rstd16_.ptr, x_.ptr, w_.ptr, r.N, r.G, r.Cg, 1e-5f, 0, out16_.ptr);
        const std::vector<float> out16 = from_dev_bf16(out16_.ptr, n), want = round_bf16_host(from_dev(out_));
        INFO(tag);
        CHECK(out16 == want);
        CHECK(from_dev(rstd16_) == from_dev(rstd_));
        std::printf("  %-64s bitwise equal to the fp32 output rounded: %s\n", tag.c_str(), out16 == want ? "yes" : "NO");
    }
    // SwiGLU under a Bf16Scope (W1 and W3 as one GEMM; h1, h3 and dh written in bf16 by their GEMMs, h, dh1, dh3 by
    // the gate kernels; x given in bf16 as the block's norm gives it) against the CPU's matmuls and gate on the same
    // roundings: x, the weights, h1, h3, h, dout, dh, dh1 and dh3 in bf16, products accumulated in fp32. A cuBLAS sum
    // that differs from the CPU's in the last bits can round an entry to the neighbouring bf16, hence the gradients'
    // tolerance.
    struct S { int N, D, F; };
    for (S s : {S{37, 32, 64}, S{300, 256, 688}, S{50, 40, 66}}) {  // (F = 66: not in groups of 4)
        const std::string tag = "swiglu bf16 " + shape({s.N, s.D, s.F});
        const int N = s.N, D = s.D, F = s.F;
        hl::SwiGLUConfig cfg{D, F};
        hl::Arena<float> pc, ac;
        hl::swiglu_params(pc, cfg);
        hl::swiglu_acts(ac, cfg, N);
        auto params = randn(rng, pc.size, 0.2), dparams0 = randn(rng, pc.size);
        auto x = randn(rng, (size_t)N * D), dout = randn(rng, (size_t)N * D);
        // host, step by step
        std::vector<float> p16 = round_bf16_host(params);
        const std::vector<float> x16 = round_bf16_host(x), dout16 = round_bf16_host(dout);
        hl::Arena<float> hp(p16.data());
        auto p = hl::swiglu_params(hp, cfg);
        std::vector<float> dparams = dparams0;
        hl::Arena<float> hdp(dparams.data());
        auto dp = hl::swiglu_params(hdp, cfg);
        std::vector<float> h1((size_t)N * F), h3(h1.size()), h(h1.size()), out(x.size()), dh(h1.size()),
            dh1(h1.size()), dh3(h1.size()), dinp(x.size()), dinp3(x.size());
        hl::matmul_forward(h1.data(), x16.data(), p.w1, (const float*)nullptr, N, D, F);
        hl::matmul_forward(h3.data(), x16.data(), p.w3, (const float*)nullptr, N, D, F);
        h1 = round_bf16_host(h1), h3 = round_bf16_host(h3);
        for (size_t i = 0; i < h.size(); i++) h[i] = round_bf16_host(hl::silu(h1[i]) * h3[i]);
        hl::matmul_forward(out.data(), h.data(), p.w2, (const float*)nullptr, N, F, D);
        hl::matmul_backward(dh.data(), dp.w2, (float*)nullptr, dout16.data(), h.data(), p.w2, N, F, D);
        dh = round_bf16_host(dh);
        for (size_t i = 0; i < h.size(); i++) {
            dh1[i] = round_bf16_host(dh[i] * h3[i] * hl::silu_grad(h1[i]));
            dh3[i] = round_bf16_host(dh[i] * hl::silu(h1[i]));
        }
        hl::matmul_backward(dinp.data(), dp.w1, (float*)nullptr, dh1.data(), x16.data(), p.w1, N, D, F);
        hl::matmul_backward(dinp3.data(), dp.w3, (float*)nullptr, dh3.data(), x16.data(), p.w3, N, D, F);
        for (size_t i = 0; i < dinp.size(); i++) dinp[i] += dinp3[i];
        // device
        DeviceBuffer<float> params_, dparams_, acts_, x_, dout_, out_, dinp_;
        DeviceBuffer<hl::gpu::bf16> x16_(x.size());
        to_dev(params_, params); to_dev(dparams_, dparams0); to_dev(x_, x); to_dev(dout_, dout);
        alloc_poisoned(acts_, ac.size); alloc_poisoned(out_, out.size()); alloc_poisoned(dinp_, dinp.size());
        hl::gpu::round_bf16(x16_.ptr, x_.ptr, x.size());
        const TestBf16 b16(params_.ptr, params.size(), (size_t)N * F);
        const hl::gpu::Bf16Operands& ops = b16.ops;
        hl::Arena<float> dpa(params_.ptr), ddpa(dparams_.ptr), daa(acts_.ptr);
        auto gp = hl::swiglu_params(dpa, cfg);
        auto gdp = hl::swiglu_params(ddpa, cfg);
        auto ga = hl::swiglu_acts(daa, cfg, N);
        {
            const hl::gpu::Bf16Scope scope(&ops);
            CHECK(hl::gpu::swiglu_w13_fused(gp, cfg));  // W1 and W3 as one GEMM (below: the layout that gives)
            hl::gpu::swiglu_forward(out_.ptr, ga, x_.ptr, gp, cfg, N, 0, x16_.ptr);
            hl::gpu::swiglu_backward(dinp_.ptr, gdp, dout_.ptr, ga, x_.ptr, gp, cfg, N, 0, x16_.ptr);
        }
        expect_close(tag + " out", from_dev(out_), out, GRAD_TOL);
        // h1 and dh are GEMM outputs rounded by cuBLAS's epilogue: a sum differing from the CPU's in its last fp32
        // bits can round to the neighbouring bf16, one step of 2^-8 relative (so tolerance 4e-3 of the largest)
        // W1 and W3 ran as one GEMM (swiglu_w13_fused): acts.h1's buffer holds (N, 2F) bf16, rows [h1 h3]
        const std::vector<float> h13 = from_dev_bf16(reinterpret_cast<hl::gpu::bf16*>(ga.h1), 2 * h.size());
        std::vector<float> h1_gpu(h.size()), h3_gpu(h.size());
        for (int n = 0; n < N; n++)
            for (int f = 0; f < F; f++) {
                h1_gpu[(size_t)n * F + f] = h13[(size_t)n * 2 * F + f];
                h3_gpu[(size_t)n * F + f] = h13[(size_t)n * 2 * F + F + f];
            }
        expect_close(tag + " h1 (bf16, in acts.h1 with h3)", h1_gpu, h1, 4e-3);
        expect_close(tag + " h3 (bf16, in acts.h1 with h1)", h3_gpu, h3, 4e-3);
        expect_close(tag + " h (bf16, in acts.h)", from_dev_bf16(reinterpret_cast<hl::gpu::bf16*>(ga.h), h.size()), h,
                     GRAD_TOL);
        expect_close(tag + " dh (bf16, in acts.dh)", from_dev_bf16(reinterpret_cast<hl::gpu::bf16*>(ga.dh), h.size()),
                     dh, 4e-3);
        expect_close(tag + " dinp", from_dev(dinp_), dinp, 1e-2);
        expect_close(tag + " dparams w1,w3,w2 (+=)", from_dev(dparams_), dparams, 1e-2);
    }
}

TEST_CASE("gpu round_bf16_rows writes a slice of wider rows, each value rounded, the rest untouched") {
    hl::Rng rng(103);
    struct S { int rows, cols, ld, at; };  // at: the slice's first column in the wide rows
    for (S s : {S{5, 4, 12, 8}, S{33, 256, 1536, 1280}, S{7, 5, 13, 3}, S{3, 8, 16, 4}}) {
        CAPTURE(s.cols);
        CAPTURE(s.ld);
        CAPTURE(s.at);
        const auto x = randn(rng, (size_t)s.rows * s.cols);
        DeviceBuffer<float> dx;
        to_dev(dx, x);
        DeviceBuffer<__nv_bfloat16> wide;
        alloc_poisoned(wide, (size_t)s.rows * s.ld);
        hl::gpu::round_bf16_rows(wide.ptr + s.at, size_t(s.ld), dx.ptr, size_t(s.rows), s.cols);
        const std::vector<float> got = from_dev_bf16(wide.ptr, wide.n), want = round_bf16_host(x);
        bool slice_ok = true, rest_nan = true;
        for (int r = 0; r < s.rows; r++)
            for (int j = 0; j < s.ld; j++) {
                const float g = got[(size_t)r * s.ld + j];
                if (j >= s.at && j < s.at + s.cols) slice_ok = slice_ok && g == want[(size_t)r * s.cols + j - s.at];
                else rest_nan = rest_nan && std::isnan(g);
            }
        CHECK(slice_ok);
        CHECK(rest_nan);
    }
}

TEST_CASE("gpu crossentropy forward/backward equals the CPU (V = 1, 7, 256, 50257)") {
    hl::Rng rng(105);
    struct S { int N, V; double std, mean; };
    for (S s : {S{1, 1, 1, 0}, S{5, 7, 3, 0}, S{37, 256, 3, 50}, S{33, 50257, 2, -20}, S{64, 32000, 4, 0}}) {
        const std::string tag = "crossentropy " + shape({s.N, s.V});
        auto logits = randn(rng, (size_t)s.N * s.V, s.std, s.mean), dl = randn(rng, s.N, 1.0 / s.N);
        std::vector<int> tgt(s.N);
        for (int& t : tgt) t = int(rng.next() % (uint64_t)s.V);
        std::vector<float> losses(s.N), probs(logits.size()), dlogits(logits.size());
        hl::crossentropy_forward(losses.data(), probs.data(), logits.data(), tgt.data(), s.N, s.V);
        hl::crossentropy_backward(dlogits.data(), dl.data(), probs.data(), tgt.data(), s.N, s.V);
        DeviceBuffer<int> tgt_;
        DeviceBuffer<float> logits_, dl_, losses_, probs_, dlogits_;
        to_dev(tgt_, tgt); to_dev(logits_, logits); to_dev(dl_, dl);
        alloc_poisoned(losses_, losses.size()); alloc_poisoned(probs_, probs.size());
        alloc_poisoned(dlogits_, dlogits.size());
        hl::gpu::crossentropy_forward(losses_.ptr, probs_.ptr, logits_.ptr, tgt_.ptr, s.N, s.V);
        hl::gpu::crossentropy_backward(dlogits_.ptr, dl_.ptr, probs_.ptr, tgt_.ptr, s.N, s.V);
        auto g_losses = from_dev(losses_), g_probs = from_dev(probs_);
        expect_close(tag + " losses", g_losses, losses, FWD_TOL);
        expect_close(tag + " probs", g_probs, probs, FWD_TOL);
        expect_close(tag + " dlogits", from_dev(dlogits_), dlogits, GRAD_TOL);
        // The float CPU sums V exponentials one by one, and terms below half an ulp of the running sum are
        // rounded away: with wide logits (std 4, V = 32000) that alone is a ~1e-4 relative error of the CPU's
        // own. The double reference shows how far each side is from the exact answer.
        std::vector<double> zd(logits.begin(), logits.end()), lossd(s.N), probd(logits.size());
        hl::crossentropy_forward(lossd.data(), probd.data(), zd.data(), tgt.data(), s.N, s.V);
        const std::vector<float> lossd_f(lossd.begin(), lossd.end()), probd_f(probd.begin(), probd.end());
        expect_close(tag + " losses (GPU vs double CPU)", g_losses, lossd_f, FWD_TOL);
        expect_close(tag + " probs (GPU vs double CPU)", g_probs, probd_f, FWD_TOL);
        std::printf("  %-58s rel err %.2e (information)\n", (tag + " probs (float CPU vs double CPU)").c_str(),
                    rel_err(probs, probd_f));
    }
}

TEST_CASE("gpu adamw: five steps with per-tensor decay equal the CPU; gaps untouched; the clip fused in is bitwise clip-then-step") {
    hl::Rng rng(106);
    // tensors laid out with an arena; "skipped" is taken but left out of the list: a gap the update must not touch
    std::vector<hl::TensorInfo> infos;
    hl::Arena<float> count(nullptr, &infos);
    count.take("embed.weight", {256, 33});    // decays
    count.take("layers.0.norm1", {33});       // 1-D: no decay
    count.take("layers.0.mixer.conv_w", {19, 4});  // conv kernel: no decay
    count.take("skipped", {11});
    count.take("layers.0.mixer.conv_b", {19});
    count.take("layers.0.ffn.w1", {65, 33});  // decays
    count.take("layers.0.ffn.w2", {33, 65});  // decays (merged with w1 into one range)
    count.take("norm_f", {1});
    std::vector<hl::TensorInfo> listed;
    for (auto& t : infos)
        if (t.name != "skipped") listed.push_back(t);
    const size_t n = count.size;
    hl::AdamWConfig cfg;
    cfg.weight_decay = 0.1f;
    auto params = randn(rng, n, 0.5);
    std::vector<float> m(n, 0.0f), v(n, 0.0f);
    const std::vector<float> params0 = params;
    hl::gpu::AdamWTable table(listed);
    DeviceBuffer<float> p_, g_, m_, v_;
    to_dev(p_, params); to_dev(m_, m); to_dev(v_, v);
    for (int step = 1; step <= 5; step++) {
        auto grads = randn(rng, n, step == 3 ? 1e-4 : 1.0);  // one step of tiny gradients
        const float lr = 1e-3f * step;
        hl::adamw_update(params.data(), grads.data(), m.data(), v.data(), listed, cfg, lr, step);
        to_dev(g_, grads);
        hl::gpu::adamw_update(p_.ptr, g_.ptr, m_.ptr, v_.ptr, table, cfg, lr, step);
    }
    auto gp = from_dev(p_);
    std::vector<float> dcpu(n), dgpu(n);
    for (size_t i = 0; i < n; i++) { dcpu[i] = params[i] - params0[i]; dgpu[i] = gp[i] - params0[i]; }
    expect_close("adamw params after 5 steps", gp, params, FWD_TOL);
    expect_close("adamw updates (params − params0)", dgpu, dcpu, FWD_TOL);
    expect_close("adamw m", from_dev(m_), m, FWD_TOL);
    expect_close("adamw v", from_dev(v_), v, FWD_TOL);
    const hl::TensorInfo& gap = infos[3];
    for (size_t i = gap.offset; i < gap.offset + gap.numel; i++) CHECK(gp[i] == params0[i]);
    CHECK(table.n_ranges == 5);  // embed · norm1+conv_w · (gap) conv_b · w1+w2 · norm_f
    // The trainers' step: the clipping fused into the update (the norm read on the device) gives the same
    // parameters and moments, bit for bit, as clip_by_norm first and then the update; the norm above the limit
    // (every gradient scaled) and below it (none). The fused step leaves the gradients unscaled.
    DeviceBuffer<double> scratch(hl::gpu::GRAD_NORM_BLOCKS);
    DeviceBuffer<float> norm_(1);
    for (const float limit_of_norm : {0.25f, 2.0f}) {
        const auto g = randn(rng, n), zero = std::vector<float>(n, 0.0f);
        DeviceBuffer<float> pa, pb, ma, mb, va, vb, ga, gb;
        to_dev(pa, params0); to_dev(pb, params0); to_dev(ma, zero); to_dev(mb, zero); to_dev(va, zero);
        to_dev(vb, zero); to_dev(ga, g); to_dev(gb, g);
        hl::gpu::grad_norm(norm_.ptr, ga.ptr, n, scratch.ptr);
        const float limit = from_dev(norm_)[0] * limit_of_norm;
        hl::gpu::clip_by_norm(ga.ptr, n, norm_.ptr, limit);
        hl::gpu::adamw_update(pa.ptr, ga.ptr, ma.ptr, va.ptr, table, cfg, 1e-2f, 2);
        hl::gpu::adamw_update(pb.ptr, gb.ptr, mb.ptr, vb.ptr, table, cfg, 1e-2f, 2, 0, 0, norm_.ptr, limit);
        INFO("clip fused into adamw, limit = norm × ", limit_of_norm);
        CHECK(from_dev(pa) == from_dev(pb));
        CHECK(from_dev(ma) == from_dev(mb));
        CHECK(from_dev(va) == from_dev(vb));
        CHECK(from_dev(gb) == g);
        CHECK((from_dev(ga) == g) == (limit_of_norm > 1));  // (clip_by_norm did scale them, or not)
        std::printf("  %-64s bitwise equal: %s\n", ("adamw with the clip fused, limit = norm x " +
                    std::to_string(limit_of_norm)).c_str(), from_dev(pa) == from_dev(pb) ? "yes" : "NO");
    }
}

TEST_CASE("gpu adamw on shards (ZeRO-1's update): every shard's update with its own moments is the whole update") {
    // what kernels/dist.cuh does on each rank, here all shards on one GPU: the table of one shard (tensors cut at
    // its ends), moments holding that shard only (mv_base), and the shard's squared gradient norm
    hl::Rng rng(109);
    std::vector<hl::TensorInfo> infos;
    hl::Arena<float> count(nullptr, &infos);
    count.take("embed", {40, 7});
    count.take("layers.0.norm1", {7});
    count.take("layers.0.mixer.conv_w", {9, 4});
    count.take("layers.0.ffn.w1", {13, 7});
    count.take("norm_f", {7});
    const size_t n = count.size;
    const int shards = 3;
    const size_t S = (n + shards - 1) / shards;  // padded to 3·S, as GpuModel does
    hl::AdamWConfig cfg;
    cfg.weight_decay = 0.1f;
    std::vector<float> p0 = randn(rng, shards * S, 0.5), zeros(shards * S, 0.0f);
    for (size_t i = n; i < shards * S; i++) p0[i] = 0;
    hl::gpu::AdamWTable whole(infos);
    DeviceBuffer<float> p_, g_, m_, v_, ps_, ms_[shards], vs_[shards];
    to_dev(p_, p0), to_dev(ps_, p0), to_dev(m_, zeros), to_dev(v_, zeros);
    for (int r = 0; r < shards; r++) ms_[r].alloc(S), ms_[r].zero(), vs_[r].alloc(S), vs_[r].zero();
    std::vector<std::unique_ptr<hl::gpu::AdamWTable>> tables;
    size_t total = 0;
    for (int r = 0; r < shards; r++) {
        tables.push_back(std::make_unique<hl::gpu::AdamWTable>(infos, r * S, (r + 1) * S));
        total += tables.back()->total;
    }
    CHECK(total == whole.total);  // the shards cut the tensors, they lose and double nothing
    DeviceBuffer<double> scratch(hl::gpu::GRAD_NORM_BLOCKS), sumsq(1);
    DeviceBuffer<float> norm_(1);
    for (int step = 1; step <= 3; step++) {
        std::vector<float> g = randn(rng, shards * S, 1.0);
        for (size_t i = n; i < shards * S; i++) g[i] = 0;
        to_dev(g_, g);
        hl::gpu::adamw_update(p_.ptr, g_.ptr, m_.ptr, v_.ptr, whole, cfg, 1e-2f, step);
        double sq = 0;
        for (int r = 0; r < shards; r++) {
            hl::gpu::adamw_update(ps_.ptr, g_.ptr, ms_[r].ptr, vs_[r].ptr, *tables[size_t(r)], cfg, 1e-2f, step, 0,
                                  r * S);
            hl::gpu::grad_norm(norm_.ptr, g_.ptr + r * S, S, scratch.ptr, 0, sumsq.ptr);
            sq += from_dev(sumsq)[0];
        }
        const float cpu_norm = hl::grad_norm(g.data(), n);
        CHECK(std::sqrt(sq) == doctest::Approx(cpu_norm).epsilon(1e-6));
    }
    CHECK(from_dev(ps_) == from_dev(p_));  // bitwise: the same float operations per element
    std::vector<float> m_all = from_dev(m_), m_cat;
    for (int r = 0; r < shards; r++) {
        const std::vector<float> mr = from_dev(ms_[r]);
        m_cat.insert(m_cat.end(), mr.begin(), mr.end());
    }
    CHECK(m_cat == m_all);
}

TEST_CASE("gpu grad_norm and clip_grad_norm equal the CPU (device scalar, no host sync inside)") {
    hl::Rng rng(107);
    DeviceBuffer<double> scratch(hl::gpu::GRAD_NORM_BLOCKS);
    DeviceBuffer<float> norm_(1);
    for (size_t n : {size_t(1), size_t(1000), size_t(1 << 20) + 7, size_t(5000001)}) {
        const std::string tag = "grad_norm n=" + std::to_string(n);
        auto g = randn(rng, n, 0.01);
        DeviceBuffer<float> g_;
        to_dev(g_, g);
        poison(norm_);
        hl::gpu::grad_norm(norm_.ptr, g_.ptr, n, scratch.ptr);
        const float cpu_norm = hl::grad_norm(g.data(), n);
        expect_close(tag + " norm", from_dev(norm_), {cpu_norm}, FWD_TOL);
        if (n > 1) {  // off a 16-byte boundary (a ZeRO-1 shard's slice): the one-at-a-time path
            hl::gpu::grad_norm(norm_.ptr, g_.ptr + 1, n - 1, scratch.ptr);
            expect_close(tag + " norm from element 1", from_dev(norm_), {hl::grad_norm(g.data() + 1, n - 1)}, FWD_TOL);
        }
        // clipping to a third of the norm scales every gradient; to twice the norm changes nothing
        std::vector<float> gc = g;
        const float c1 = hl::clip_grad_norm(gc.data(), n, cpu_norm / 3);
        poison(norm_);
        hl::gpu::clip_grad_norm(norm_.ptr, g_.ptr, n, cpu_norm / 3, scratch.ptr);
        expect_close(tag + " clip: norm before", from_dev(norm_), {c1}, FWD_TOL);
        expect_close(tag + " clip: clipped grads", from_dev(g_), gc, FWD_TOL);
        auto before = from_dev(g_);
        hl::gpu::clip_grad_norm(norm_.ptr, g_.ptr, n, cpu_norm * 2, scratch.ptr);
        CHECK(from_dev(g_) == before);
    }
}

// The GPU conv saves no pre: its backward recomputes it from the input (the CPU reference stores it).
TEST_CASE("gpu conv1d + SiLU forward/backward (pre recomputed) equals the CPU (odd T, T < K, K = 1…8)") {
    hl::Rng rng(108);
    struct S { int B, T, C, K; };
    for (S s : {S{1, 1, 1, 1}, S{2, 37, 19, 4}, S{2, 3, 8, 4}, S{1, 257, 64, 2}, S{3, 100, 130, 4}, S{2, 70, 33, 8},
                S{4, 1000, 520, 4}}) {
        const std::string tag = "conv1d " + shape({s.B, s.T, s.C, s.K});
        const size_t NC = (size_t)s.B * s.T * s.C;
        auto x = randn(rng, NC), w = randn(rng, (size_t)s.C * s.K, 0.5), b = randn(rng, s.C, 0.5);
        auto dout = randn(rng, NC), dw0 = randn(rng, w.size()), db0 = randn(rng, b.size());
        std::vector<float> out(NC), pre(NC), dinp(NC), dw = dw0, db = db0;
        hl::conv1d_silu_forward(out.data(), pre.data(), x.data(), w.data(), b.data(), s.B, s.T, s.C, s.K);
        hl::conv1d_silu_backward(dinp.data(), dw.data(), db.data(), dout.data(), pre.data(), x.data(), w.data(), s.B,
                                 s.T, s.C, s.K);
        DeviceBuffer<float> x_, w_, b_, dout_, out_, dinp_, dw_, db_;
        to_dev(x_, x); to_dev(w_, w); to_dev(b_, b); to_dev(dout_, dout); to_dev(dw_, dw0); to_dev(db_, db0);
        alloc_poisoned(out_, NC); alloc_poisoned(dinp_, NC);
        hl::gpu::conv1d_silu_forward(out_.ptr, x_.ptr, w_.ptr, b_.ptr, s.B, s.T, s.C, s.K);
        DeviceBuffer<float> scratch(hl::gpu::conv1d_backward_scratch_size(s.B, s.T, s.C, s.K));
        hl::gpu::conv1d_silu_backward(dinp_.ptr, dw_.ptr, db_.ptr, dout_.ptr, x_.ptr, w_.ptr, b_.ptr, s.B, s.T,
                                      s.C, s.K, scratch.ptr);
        expect_close(tag + " out", from_dev(out_), out, FWD_TOL);
        expect_close(tag + " dinp", from_dev(dinp_), dinp, GRAD_TOL);
        expect_close(tag + " dw (+=)", from_dev(dw_), dw, GRAD_TOL);
        expect_close(tag + " dbias (+=)", from_dev(db_), db, GRAD_TOL);
        // the input (and dinp) as C columns of wider rows (ld = C + 7, at column 3: as Mamba-2 reads x, B, C out of
        // in_proj's rows): the same values, bit for bit; the columns around them untouched
        const int ld = s.C + 7;
        const size_t NL = (size_t)s.B * s.T * ld;
        std::vector<float> xw(NL, 0.f);
        for (size_t r = 0; r < (size_t)s.B * s.T; r++)
            for (int c = 0; c < s.C; c++) xw[r * ld + 3 + c] = x[r * s.C + c];
        DeviceBuffer<float> xw_, dinpw_, dw2_, db2_;
        to_dev(xw_, xw); to_dev(dw2_, dw0); to_dev(db2_, db0);
        alloc_poisoned(dinpw_, NL);
        const std::vector<float> out1 = from_dev(out_), dinp1 = from_dev(dinp_), dw1 = from_dev(dw_);
        hl::gpu::conv1d_silu_forward(out_.ptr, xw_.ptr + 3, w_.ptr, b_.ptr, s.B, s.T, s.C, s.K, 0, ld);
        hl::gpu::conv1d_silu_backward(dinpw_.ptr + 3, dw2_.ptr, db2_.ptr, dout_.ptr, xw_.ptr + 3, w_.ptr, b_.ptr, s.B,
                                      s.T, s.C, s.K, scratch.ptr, 0, ld);
        CHECK(from_dev(out_) == out1);
        CHECK(from_dev(dw2_) == dw1);
        const std::vector<float> dinpw = from_dev(dinpw_);
        bool same = true, others_untouched = true;
        for (size_t r = 0; r < (size_t)s.B * s.T; r++)
            for (int c = 0; c < ld; c++) {
                const float v = dinpw[r * ld + c];
                if (c >= 3 && c < 3 + s.C) same = same && v == dinp1[r * s.C + c - 3];
                else others_untouched = others_untouched && std::isnan(v);  // still the poison
            }
        CHECK(same);
        CHECK(others_untouched);
        // the input in bf16 in those wide rows (IT: Mamba-2's in_proj output in bf16 runs) gives, bit for bit, what
        // the fp32 input holding the same rounded values gives: out, dinp, dw, dbias
        {
            DeviceBuffer<float> xr_, dinpa, dinpb, dwa, dba, dwb, dbb;
            to_dev(xr_, round_bf16_host(xw));
            DeviceBuffer<hl::gpu::bf16> x16;
            x16.alloc(NL);
            hl::gpu::round_bf16(x16.ptr, xw_.ptr, NL);
            to_dev(dwa, dw0); to_dev(dba, db0); to_dev(dwb, dw0); to_dev(dbb, db0);
            alloc_poisoned(dinpa, NL); alloc_poisoned(dinpb, NL);
            hl::gpu::conv1d_silu_forward(out_.ptr, xr_.ptr + 3, w_.ptr, b_.ptr, s.B, s.T, s.C, s.K, 0, ld);
            const std::vector<float> outa = from_dev(out_);
            hl::gpu::conv1d_silu_backward(dinpa.ptr + 3, dwa.ptr, dba.ptr, dout_.ptr, xr_.ptr + 3, w_.ptr, b_.ptr, s.B,
                                          s.T, s.C, s.K, scratch.ptr, 0, ld);
            poison(out_);
            const hl::gpu::bf16* xin16 = x16.ptr + 3;
            hl::gpu::conv1d_silu_forward(hl::gpu::ConvColumns<float>(out_.ptr, s.C), xin16, w_.ptr, b_.ptr, s.B, s.T,
                                         s.C, s.K, 0, ld);
            CHECK(from_dev(out_) == outa);
            hl::gpu::conv1d_silu_backward(dinpb.ptr + 3, dwb.ptr, dbb.ptr, hl::gpu::ConvColumns<const float>(dout_.ptr, s.C),
                                          xin16, w_.ptr, b_.ptr, s.B, s.T, s.C, s.K, scratch.ptr, 0, ld);
            const std::vector<float> da = from_dev(dinpa), db = from_dev(dinpb);
            CHECK(std::equal(da.begin(), da.end(), db.begin(), [](float a, float b) { return a == b || (std::isnan(a) && std::isnan(b)); }));
            CHECK(from_dev(dwb) == from_dev(dwa));
            CHECK(from_dev(dbb) == from_dev(dba));
            // the output in bf16 (OT: Mamba-2's x, B, C in bf16 runs): the fp32 output rounded, bit for bit
            DeviceBuffer<hl::gpu::bf16> out16(NC);
            poison(out16);
            hl::gpu::conv1d_silu_forward(hl::gpu::ConvColumns<hl::gpu::bf16>(out16.ptr, s.C), xin16, w_.ptr, b_.ptr,
                                         s.B, s.T, s.C, s.K, 0, ld);
            CHECK(from_dev_bf16(out16.ptr, NC) == round_bf16_host(outa));
        }
        // the output (and dout) split by column over three tensors, as Mamba-2's x, B and C: the same values
        if (s.C >= 3) {
            const int e0 = s.C / 3, e1 = 2 * s.C / 3, rows = s.B * s.T;
            const int w[3] = {e0, e1 - e0, s.C - e1};
            DeviceBuffer<float> o3[3], d3[3];
            std::vector<float> dparts[3];
            for (int k = 0; k < 3; k++) {
                alloc_poisoned(o3[k], (size_t)rows * w[k]);
                dparts[k].resize((size_t)rows * w[k]);
                for (int r = 0; r < rows; r++)
                    for (int c = 0; c < w[k]; c++) dparts[k][(size_t)r * w[k] + c] = dout[(size_t)r * s.C + (k ? (k == 1 ? e0 : e1) : 0) + c];
                to_dev(d3[k], dparts[k]);
            }
            const hl::gpu::ConvColumns<float> oc(o3[0].ptr, e0, w[0], o3[1].ptr, e1, w[1], o3[2].ptr, s.C, w[2]);
            const hl::gpu::ConvColumns<const float> dc(d3[0].ptr, e0, w[0], d3[1].ptr, e1, w[1], d3[2].ptr, s.C, w[2]);
            DeviceBuffer<float> dinp3, dw3, db3;
            to_dev(dw3, dw0); to_dev(db3, db0);
            alloc_poisoned(dinp3, NC);
            hl::gpu::conv1d_silu_forward(oc, x_.ptr, w_.ptr, b_.ptr, s.B, s.T, s.C, s.K);
            hl::gpu::conv1d_silu_backward(dinp3.ptr, dw3.ptr, db3.ptr, dc, x_.ptr, w_.ptr, b_.ptr, s.B, s.T, s.C, s.K,
                                          scratch.ptr);
            std::vector<float> joined(NC);
            for (int k = 0; k < 3; k++) {
                const std::vector<float> part = from_dev(o3[k]);
                for (int r = 0; r < rows; r++)
                    for (int c = 0; c < w[k]; c++) joined[(size_t)r * s.C + (k ? (k == 1 ? e0 : e1) : 0) + c] = part[(size_t)r * w[k] + c];
            }
            CHECK(joined == out1);
            CHECK(from_dev(dinp3) == dinp1);
            CHECK(from_dev(dw3) == dw1);
        }
    }
    DeviceBuffer<float> d(64);
    CHECK_THROWS_AS(hl::gpu::conv1d_silu_forward(d.ptr, d.ptr, d.ptr, d.ptr, 1, 2, 8, 4, 0, 7), hl::Error);
}
