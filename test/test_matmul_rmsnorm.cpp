// test_matmul_rmsnorm.cpp — matmul and RMSNorm: against naive loops and finite differences.
#include "test/gradcheck.h"
#include "model/matmul.h"   // matmul_forward/backward
#include "model/rmsnorm.h"  // rmsnorm_forward/backward

using namespace hl;
using namespace hl::test;

TEST_CASE("matmul forward equals the naive triple loop; backward passes the gradient check") {
    Rng rng(1);
    const int N = 11, C = 7, OC = 5;  // N > ROW_TILE and not a multiple of it
    auto x = randn(rng, N * C), w = randn(rng, OC * C), b = randn(rng, OC), probe = randn(rng, N * OC);
    std::vector<double> out(N * OC);
    matmul_forward(out.data(), x.data(), w.data(), b.data(), N, C, OC);
    for (int n = 0; n < N; n++)
        for (int o = 0; o < OC; o++) {
            double ref = b[o];
            for (int c = 0; c < C; c++) ref += x[n * C + c] * w[o * C + c];
            CHECK(out[n * OC + o] == doctest::Approx(ref).epsilon(1e-12));
        }
    auto loss = [&] {
        matmul_forward(out.data(), x.data(), w.data(), b.data(), N, C, OC);
        return dot(out.data(), probe.data(), out.size());
    };
    std::vector<double> dx(N * C, 123.0), dw(OC * C, 0.0), db(OC, 0.0);
    matmul_backward(dx.data(), dw.data(), db.data(), probe.data(), x.data(), w.data(), N, C, OC);
    check_grad("x", x.data(), dx.data(), dx.size(), loss);
    check_grad("weight", w.data(), dw.data(), dw.size(), loss);
    check_grad("bias", b.data(), db.data(), db.size(), loss);

    // parameter gradients accumulate: a second backward doubles them
    std::vector<double> dw1 = dw;
    matmul_backward<double>(nullptr, dw.data(), nullptr, probe.data(), x.data(), w.data(), N, C, OC);
    for (size_t i = 0; i < dw.size(); i++) CHECK(dw[i] == doctest::Approx(2 * dw1[i]));
}

TEST_CASE("rmsnorm (plain and grouped) passes the gradient check") {
    Rng rng(2);
    for (int G : {1, 3}) {
        for (bool with_weight : {true, false}) {
            CAPTURE(G);
            CAPTURE(with_weight);
            const int N = 7, Cg = 5, C = G * Cg;
            auto x = randn(rng, N * C), w = randn(rng, C), probe = randn(rng, N * C);
            std::vector<double> out(N * C), rstd(N * G), dx(N * C), dw(C, 0.0);
            const double* wp = with_weight ? w.data() : nullptr;
            auto loss = [&] {
                rmsnorm_forward(out.data(), rstd.data(), x.data(), wp, N, G, Cg, 1e-5);
                return dot(out.data(), probe.data(), out.size());
            };
            loss();
            // each group of the output has unit RMS before the weight
            if (!with_weight)
                for (int n = 0; n < N; n++)
                    for (int g = 0; g < G; g++) {
                        double ss = 0;
                        for (int c = 0; c < Cg; c++) ss += out[n * C + g * Cg + c] * out[n * C + g * Cg + c];
                        CHECK(ss / Cg == doctest::Approx(1.0).epsilon(1e-3));
                    }
            rmsnorm_backward(dx.data(), with_weight ? dw.data() : nullptr, probe.data(), x.data(), wp, rstd.data(),
                             N, G, Cg);
            check_grad("x", x.data(), dx.data(), dx.size(), loss);
            if (with_weight) check_grad("weight", w.data(), dw.data(), dw.size(), loss);
        }
    }
}

TEST_CASE("a bad rmsnorm size is a clear error") {
    std::vector<double> a(4), r(4);
    CHECK_THROWS_WITH_AS(rmsnorm_forward(a.data(), r.data(), a.data(), (const double*)nullptr, 2, 0, 2, 1e-5),
                         "rmsnorm: bad sizes N=2 G=0 Cg=2", hl::Error);
}
