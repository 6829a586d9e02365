// test_ssd.cpp — the SSD scan (model/ssd.h): both forms against finite differences, against each
// other, against the semiseparable matrix they implement, across a split of the sequence, and under
// strong decay.
#include <algorithm>         // std::max
#include <cmath>             // std::isfinite, std::exp, std::fabs
#include <vector>            // std::vector
#include "test/gradcheck.h"  // check_grad, randn/randu, dot, max_abs_diff
#include "model/ssd.h"       // ssd_sequential_*, ssd_chunked_*, ssd_num_chunks, ssd_backward_scratch_size

using namespace hl;
using namespace hl::test;

namespace {

// One scan problem: random inputs of odd sizes, and fixed random probes wy, wf that define the loss
//   L = Σ y ⊙ wy + Σ final_state ⊙ wf,  so dL/dy = wy and dL/dfinal_state = wf.
struct Problem {
    int B, T, H, P, G, N;
    std::vector<double> x, dt, A, Bm, Cm, D, init, wy, wf;
    Problem(int B_, int T_, int H_, int P_, int G_, int N_, uint64_t seed, double dt_lo = 0.1, double dt_hi = 1.0,
            double A_lo = -1.5, double A_hi = -0.2)
        : B(B_), T(T_), H(H_), P(P_), G(G_), N(N_) {
        Rng rng(seed);
        x = randn(rng, n_x());
        dt = randu(rng, n_dt(), dt_lo, dt_hi);
        A = randu(rng, H, A_lo, A_hi);
        Bm = randn(rng, n_bc());
        Cm = randn(rng, n_bc());
        D = randn(rng, H);
        init = randn(rng, n_state());
        wy = randn(rng, n_x());
        wf = randn(rng, n_state());
    }
    size_t n_x() const { return (size_t)B * T * H * P; }
    size_t n_dt() const { return (size_t)B * T * H; }
    size_t n_bc() const { return (size_t)B * T * G * N; }
    size_t n_state() const { return (size_t)B * H * P * N; }
};

struct Grads {
    std::vector<double> dx, ddt, dA, dBm, dCm, dD, dinit;
};

// One forward + backward of either form: Q == 0 is the sequential form, Q > 0 the chunked one.
// with_init: the problem's init_state is used (else null = zeros); with_final: the final state is
// returned and enters the loss (else null, and no dfinal_state).
struct Scan {
    int Q = 0;
    bool with_init = true, with_final = true;
    std::vector<double> y, final_state, saved, scratch;

    double forward(const Problem& pr) {
        y.assign(pr.n_x(), 0.0);
        final_state.assign(pr.n_state(), 0.0);
        const double* init = with_init ? pr.init.data() : nullptr;
        double* fin = with_final ? final_state.data() : nullptr;
        if (Q == 0) {
            saved.assign((size_t)pr.B * pr.H * pr.T * pr.P * pr.N, 0.0);
            ssd_sequential_forward(y.data(), saved.data(), pr.x.data(), pr.dt.data(), pr.A.data(), pr.Bm.data(),
                                   pr.Cm.data(), pr.D.data(), init, fin, pr.B, pr.T, pr.H, pr.P, pr.G, pr.N);
        } else {
            saved.assign((size_t)pr.B * pr.H * ssd_num_chunks(pr.T, Q) * pr.P * pr.N, 0.0);
            ssd_chunked_forward(y.data(), saved.data(), pr.x.data(), pr.dt.data(), pr.A.data(), pr.Bm.data(),
                                pr.Cm.data(), pr.D.data(), init, fin, pr.B, pr.T, pr.H, pr.P, pr.G, pr.N, Q);
        }
        double L = dot(y.data(), pr.wy.data(), y.size());
        if (with_final) L += dot(final_state.data(), pr.wf.data(), final_state.size());
        return L;
    }

    // Backward after forward(pr). Written outputs start as garbage (123) to prove they are written;
    // dA and dD start at acc0 to prove they accumulate.
    Grads backward(const Problem& pr, double acc0 = 0.0) {
        Grads g;
        g.dx.assign(pr.n_x(), 123.0);
        g.ddt.assign(pr.n_dt(), 123.0);
        g.dBm.assign(pr.n_bc(), 123.0);
        g.dCm.assign(pr.n_bc(), 123.0);
        g.dinit.assign(pr.n_state(), 123.0);
        g.dA.assign(pr.H, acc0);
        g.dD.assign(pr.H, acc0);
        scratch.assign(ssd_backward_scratch_size(pr.B, pr.H, pr.P, pr.N), 321.0);
        const double* dfinal = with_final ? pr.wf.data() : nullptr;
        double* dinit = with_init ? g.dinit.data() : nullptr;
        if (Q == 0)
            ssd_sequential_backward(g.dx.data(), g.ddt.data(), g.dA.data(), g.dBm.data(), g.dCm.data(), g.dD.data(),
                                    dinit, scratch.data(), pr.wy.data(), dfinal, saved.data(), pr.x.data(),
                                    pr.dt.data(), pr.A.data(), pr.Bm.data(), pr.Cm.data(), pr.D.data(),
                                    with_init ? pr.init.data() : nullptr, pr.B, pr.T, pr.H, pr.P, pr.G, pr.N);
        else
            ssd_chunked_backward(g.dx.data(), g.ddt.data(), g.dA.data(), g.dBm.data(), g.dCm.data(), g.dD.data(),
                                 dinit, scratch.data(), pr.wy.data(), dfinal, saved.data(), pr.x.data(),
                                 pr.dt.data(), pr.A.data(), pr.Bm.data(), pr.Cm.data(), pr.D.data(), pr.B, pr.T,
                                 pr.H, pr.P, pr.G, pr.N, Q);
        return g;
    }
};

// max |a − b| / max(1, max |b|): an absolute error for O(1) tensors, relative for larger ones
double scaled_diff(const std::vector<double>& a, const std::vector<double>& b) {
    double m = 1.0;
    for (double v : b) m = std::max(m, std::fabs(v));
    return max_abs_diff(a.data(), b.data(), a.size()) / m;
}

bool all_finite(const std::vector<double>& v) {
    for (double e : v)
        if (!std::isfinite(e)) return false;
    return true;
}

}  // namespace

TEST_CASE("ssd: both forms pass the gradient check for every input") {
    // odd sizes, 2 heads per group; chunk 3 does not divide T = 7
    for (int Q : {0, 3}) {
        for (bool with_state : {true, false}) {
            CAPTURE(Q);
            CAPTURE(with_state);
            Problem pr(2, 7, 4, 5, 2, 3, 11);
            Scan scan;
            scan.Q = Q;
            scan.with_init = scan.with_final = with_state;
            scan.forward(pr);
            Grads g = scan.backward(pr);
            auto loss = [&] { return scan.forward(pr); };
            check_grad("x", pr.x.data(), g.dx.data(), g.dx.size(), loss);
            check_grad("dt", pr.dt.data(), g.ddt.data(), g.ddt.size(), loss);
            check_grad("A", pr.A.data(), g.dA.data(), g.dA.size(), loss);
            check_grad("Bm", pr.Bm.data(), g.dBm.data(), g.dBm.size(), loss);
            check_grad("Cm", pr.Cm.data(), g.dCm.data(), g.dCm.size(), loss);
            check_grad("D", pr.D.data(), g.dD.data(), g.dD.size(), loss);
            if (with_state) check_grad("init_state", pr.init.data(), g.dinit.data(), g.dinit.size(), loss);

            // dA and dD accumulate onto what is there; everything else is overwritten
            scan.forward(pr);  // the gradient check left the saved states of a perturbed input
            Grads g2 = scan.backward(pr, 0.5);
            for (int h = 0; h < pr.H; h++) {
                CHECK(g2.dA[h] == doctest::Approx(g.dA[h] + 0.5).epsilon(1e-12));
                CHECK(g2.dD[h] == doctest::Approx(g.dD[h] + 0.5).epsilon(1e-12));
            }
            CHECK(max_abs_diff(g2.dx.data(), g.dx.data(), g.dx.size()) == 0.0);
            CHECK(max_abs_diff(g2.dBm.data(), g.dBm.data(), g.dBm.size()) == 0.0);
        }
    }
}

TEST_CASE("ssd: the chunked form equals the sequential one, outputs and every gradient") {
    Problem pr(2, 7, 4, 5, 2, 3, 12);
    Scan seq;
    seq.forward(pr);
    Grads gs = seq.backward(pr);
    // chunks of 1 (pure recurrence), dividing 7 or not, equal to T, and longer than T
    for (int Q : {1, 2, 3, 7, 8, 16}) {
        CAPTURE(Q);
        Scan ch;
        ch.Q = Q;
        ch.forward(pr);
        Grads gc = ch.backward(pr);
        const double tol = 1e-12;
        CHECK(scaled_diff(ch.y, seq.y) < tol);
        CHECK(scaled_diff(ch.final_state, seq.final_state) < tol);
        CHECK(scaled_diff(gc.dx, gs.dx) < tol);
        CHECK(scaled_diff(gc.ddt, gs.ddt) < tol);
        CHECK(scaled_diff(gc.dA, gs.dA) < tol);
        CHECK(scaled_diff(gc.dBm, gs.dBm) < tol);
        CHECK(scaled_diff(gc.dCm, gs.dCm) < tol);
        CHECK(scaled_diff(gc.dD, gs.dD) < tol);
        CHECK(scaled_diff(gc.dinit, gs.dinit) < tol);
    }
}

// Copies steps [t0, t1) of a (B, T, rest) tensor into a (B, t1 − t0, rest) one.
static std::vector<double> time_slice(const std::vector<double>& v, int B, int T, size_t rest, int t0, int t1) {
    std::vector<double> out((size_t)B * (t1 - t0) * rest);
    for (int b = 0; b < B; b++)
        for (int t = t0; t < t1; t++)
            for (size_t i = 0; i < rest; i++)
                out[((size_t)b * (t1 - t0) + (t - t0)) * rest + i] = v[((size_t)b * T + t) * rest + i];
    return out;
}

TEST_CASE("ssd: carrying the state across a split of the sequence equals one run") {
    Problem full(2, 7, 4, 5, 2, 3, 13);
    for (int Q : {0, 2, 3}) {
        Scan whole;
        whole.Q = Q;
        whole.forward(full);
        Grads gw = whole.backward(full);
        for (int split : {1, 3, 6}) {
            CAPTURE(Q);
            CAPTURE(split);
            // the two halves, each a problem of its own; the second starts from the first's final state
            auto half = [&](int t0, int t1) {
                Problem p = full;
                const int H = full.H, P = full.P, G = full.G, N = full.N;
                p.T = t1 - t0;
                p.x = time_slice(full.x, full.B, full.T, (size_t)H * P, t0, t1);
                p.dt = time_slice(full.dt, full.B, full.T, H, t0, t1);
                p.Bm = time_slice(full.Bm, full.B, full.T, (size_t)G * N, t0, t1);
                p.Cm = time_slice(full.Cm, full.B, full.T, (size_t)G * N, t0, t1);
                p.wy = time_slice(full.wy, full.B, full.T, (size_t)H * P, t0, t1);
                return p;
            };
            Problem first = half(0, split), second = half(split, full.T);
            Scan s1, s2;
            s1.Q = s2.Q = Q;
            s1.forward(first);
            second.init = s1.final_state;
            s2.forward(second);
            CHECK(scaled_diff(s1.y, time_slice(whole.y, full.B, full.T, (size_t)full.H * full.P, 0, split)) < 1e-12);
            CHECK(scaled_diff(s2.y, time_slice(whole.y, full.B, full.T, (size_t)full.H * full.P, split, full.T)) <
                  1e-12);
            CHECK(scaled_diff(s2.final_state, whole.final_state) < 1e-12);

            // and backwards: the second half's dinit_state is the first half's dfinal_state
            Grads g2 = s2.backward(second);
            first.wf = g2.dinit;
            Grads g1 = s1.backward(first);
            CHECK(scaled_diff(g1.dinit, gw.dinit) < 1e-12);
            CHECK(scaled_diff(g1.dx, time_slice(gw.dx, full.B, full.T, (size_t)full.H * full.P, 0, split)) < 1e-12);
            CHECK(scaled_diff(g2.dx, time_slice(gw.dx, full.B, full.T, (size_t)full.H * full.P, split, full.T)) <
                  1e-12);
            std::vector<double> dA_sum(full.H), dD_sum(full.H);
            for (int h = 0; h < full.H; h++) {
                dA_sum[h] = g1.dA[h] + g2.dA[h];
                dD_sum[h] = g1.dD[h] + g2.dD[h];
            }
            CHECK(scaled_diff(dA_sum, gw.dA) < 1e-12);
            CHECK(scaled_diff(dD_sum, gw.dD) < 1e-12);
        }
    }
}

TEST_CASE("ssd: the scan is the semiseparable matrix y = M·(dt ⊙ x) + D·x") {
    // From a zero state, y_i = Σ_{j≤i} M[i, j]·dt_j·x_j + D·x_i with
    // M[i, j] = (C_i·B_j)·exp(Σ_{j<s≤i} a_s): built here entry by entry, nothing shared with ssd.h.
    Problem pr(2, 7, 4, 5, 2, 3, 14);
    const int B = pr.B, T = pr.T, H = pr.H, P = pr.P, G = pr.G, N = pr.N;
    std::vector<double> ref(pr.n_x(), 0.0);
    std::vector<double> Mref((size_t)B * H * T * T, 0.0);  // (B, H, T, T), M[i, j]·dt_j
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++) {
            const int g = h / (H / G);
            for (int i = 0; i < T; i++)
                for (int j = 0; j <= i; j++) {
                    double CB = 0, seg = 0;
                    for (int n = 0; n < N; n++)
                        CB += pr.Cm[(((size_t)b * T + i) * G + g) * N + n] * pr.Bm[(((size_t)b * T + j) * G + g) * N + n];
                    for (int s = j + 1; s <= i; s++) seg += pr.dt[((size_t)b * T + s) * H + h] * pr.A[h];
                    const double M = CB * std::exp(seg);
                    const double dtj = pr.dt[((size_t)b * T + j) * H + h];
                    Mref[((size_t)(b * H + h) * T + i) * T + j] = M * dtj;
                    for (int p = 0; p < P; p++)
                        ref[(((size_t)b * T + i) * H + h) * P + p] += M * dtj * pr.x[(((size_t)b * T + j) * H + h) * P + p];
                }
            for (int t = 0; t < T; t++)
                for (int p = 0; p < P; p++) {
                    size_t k = (((size_t)b * T + t) * H + h) * P + p;
                    ref[k] += pr.D[h] * pr.x[k];
                }
        }
    for (int Q : {0, 1, 3, 16}) {
        CAPTURE(Q);
        Scan scan;
        scan.Q = Q;
        scan.with_init = false;
        scan.forward(pr);
        CHECK(scaled_diff(scan.y, ref) < 1e-12);
    }
    // ssd_mixing_matrix (what the study draws) is that matrix, zeros above the diagonal included
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++) {
            std::vector<double> M((size_t)T * T, -1.0);
            ssd_mixing_matrix(M.data(), pr.dt.data(), pr.A.data(), pr.Bm.data(), pr.Cm.data(), b, h, B, T, H, G, N);
            CHECK(scaled_diff(M, std::vector<double>(Mref.begin() + (size_t)(b * H + h) * T * T,
                                                     Mref.begin() + (size_t)(b * H + h + 1) * T * T)) < 1e-13);
        }
}

TEST_CASE("ssd: strong decay (large dt, A ≈ −2) stays finite, in double and in float") {
    // a_t down to −100 per step: a chunk of 16 sums to ≈ −1000, whose exp underflows to 0 even in
    // double. A form that computed exp(−cum) would overflow to inf and return inf·0 = NaN.
    Problem pr(2, 40, 3, 5, 1, 3, 15, /*dt*/ 5.0, 50.0, /*A*/ -2.0, -1.9);
    Scan seq, ch;
    ch.Q = 16;
    seq.forward(pr);
    ch.forward(pr);
    Grads gs = seq.backward(pr), gc = ch.backward(pr);
    for (auto* v : {&ch.y, &ch.final_state, &gc.dx, &gc.ddt, &gc.dA, &gc.dBm, &gc.dCm, &gc.dD, &gc.dinit})
        CHECK(all_finite(*v));
    // the two forms still agree; dA sums ~10² terms of mixed sign, so it gets a little more room
    CHECK(scaled_diff(ch.y, seq.y) < 1e-12);
    CHECK(scaled_diff(gc.dx, gs.dx) < 1e-12);
    CHECK(scaled_diff(gc.ddt, gs.ddt) < 1e-12);
    CHECK(scaled_diff(gc.dA, gs.dA) < 1e-10);

    // the same in float, at the CPU's default chunk of 64
    const int B = pr.B, T = pr.T, H = pr.H, P = pr.P, G = pr.G, N = pr.N, Q = 64;
    auto f = [](const std::vector<double>& v) { return std::vector<float>(v.begin(), v.end()); };
    std::vector<float> x = f(pr.x), dt = f(pr.dt), A = f(pr.A), Bm = f(pr.Bm), Cm = f(pr.Cm), D = f(pr.D),
                       init = f(pr.init), dy = f(pr.wy), dfin = f(pr.wf);
    std::vector<float> y(pr.n_x()), fin(pr.n_state()), cs((size_t)B * H * ssd_num_chunks(T, Q) * P * N);
    std::vector<float> dx(pr.n_x()), ddt(pr.n_dt()), dA(H, 0.f), dBm(pr.n_bc()), dCm(pr.n_bc()), dD(H, 0.f),
        dinit(pr.n_state()), scratch(ssd_backward_scratch_size(B, H, P, N));
    ssd_chunked_forward(y.data(), cs.data(), x.data(), dt.data(), A.data(), Bm.data(), Cm.data(), D.data(),
                        init.data(), fin.data(), B, T, H, P, G, N, Q);
    ssd_chunked_backward(dx.data(), ddt.data(), dA.data(), dBm.data(), dCm.data(), dD.data(), dinit.data(),
                         scratch.data(), dy.data(), dfin.data(), cs.data(), x.data(), dt.data(), A.data(), Bm.data(),
                         Cm.data(), D.data(), B, T, H, P, G, N, Q);
    bool finite = true;
    for (auto* v : {&y, &fin, &dx, &ddt, &dA, &dBm, &dCm, &dD, &dinit})
        for (float e : *v) finite = finite && std::isfinite(e);
    CHECK(finite);
    double worst = 0, scale = 1;  // float vs double, relative to the output's scale
    for (size_t i = 0; i < y.size(); i++) {
        worst = std::max(worst, std::fabs(y[i] - seq.y[i]));
        scale = std::max(scale, std::fabs(seq.y[i]));
    }
    CHECK(worst / scale < 1e-5);
}

TEST_CASE("ssd: bad sizes and inputs are clear errors") {
    Problem pr(1, 3, 2, 2, 1, 2, 16);
    std::vector<double> y(pr.n_x()), st((size_t)pr.B * pr.H * pr.T * pr.P * pr.N), scratch(1000);
    auto seq = [&](int H, int G, const std::vector<double>& dt, const std::vector<double>& A) {
        ssd_sequential_forward(y.data(), st.data(), pr.x.data(), dt.data(), A.data(), pr.Bm.data(), pr.Cm.data(),
                               pr.D.data(), (const double*)nullptr, (double*)nullptr, pr.B, pr.T, H, pr.P, G, pr.N);
    };
    auto chunked = [&](int Q) {
        ssd_chunked_forward(y.data(), st.data(), pr.x.data(), pr.dt.data(), pr.A.data(), pr.Bm.data(), pr.Cm.data(),
                            pr.D.data(), (const double*)nullptr, (double*)nullptr, pr.B, pr.T, pr.H, pr.P, pr.G,
                            pr.N, Q);
    };
    CHECK_NOTHROW(seq(2, 1, pr.dt, pr.A));
    CHECK_THROWS_WITH_AS(seq(2, 3, pr.dt, pr.A), doctest::Contains("H=2 must be a multiple of ngroups G=3"),
                         hl::Error);
    CHECK_THROWS_WITH_AS(seq(0, 1, pr.dt, pr.A), doctest::Contains("bad sizes"), hl::Error);
    std::vector<double> A_pos = pr.A, dt_neg = pr.dt;
    A_pos[1] = 0.3;
    dt_neg[2] = -0.1;
    CHECK_THROWS_WITH_AS(seq(2, 1, pr.dt, A_pos), doctest::Contains("A must be <= 0"), hl::Error);
    CHECK_THROWS_WITH_AS(seq(2, 1, dt_neg, pr.A), doctest::Contains("dt must be >= 0"), hl::Error);
    CHECK_NOTHROW(chunked(2));
    CHECK_THROWS_WITH_AS(chunked(0), doctest::Contains("chunk length Q=0"), hl::Error);
    CHECK_THROWS_WITH_AS(chunked(SSD_MAX_CHUNK + 1), doctest::Contains("must be in [1, 256]"), hl::Error);
    std::vector<double> g(1000);
    CHECK_THROWS_WITH_AS(ssd_chunked_backward(g.data(), g.data(), g.data(), g.data(), g.data(), g.data(), g.data(),
                                              (double*)nullptr, g.data(), g.data(), g.data(), g.data(), g.data(),
                                              g.data(), g.data(), g.data(), g.data(), 1, 3, 2, 2, 1, 2, 2),
                         doctest::Contains("scratch"), hl::Error);
}
