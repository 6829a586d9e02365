// test_gpu_ssd.cu — the GPU chunked SSD scan (kernels/ssd.cuh) against the CPU reference (model/ssd.h run
// in float on the host): forward y, chunk_states and final_state; backward dx, ddt, dA, dBm, dCm, dD and
// dinit_state; each against the CPU chunked form with the same Q and against the CPU sequential form.
//
// Error measure (every comparison here): rel = max_i |g_i − c_i| / max_i |c_i|, the max-norm error
// relative to the reference tensor's scale (g = GPU, c = CPU). fp32 tolerances: forward ≤ 1e-4,
// gradients ≤ 1e-3. Written outputs (and the scratch) are poisoned with NaN before each call, so an
// element the GPU forgets to write fails (NaN never compares ≤ tol). dA and dD start at non-zero values
// on both sides (they accumulate) and their increments are compared.
#include <doctest/doctest.h>   // TEST_CASE, CHECK_MESSAGE, MESSAGE, CHECK_THROWS_AS
#include <algorithm>           // std::max
#include <cmath>               // std::fabs
#include <cstdint>             // uint64_t
#include <map>                 // std::map: worst error per tensor over all cases
#include <sstream>             // std::ostringstream for case names
#include <string>              // std::string
#include <vector>              // std::vector host copies
#include <cuda_bf16.h>         // __float2bfloat16_rn, __bfloat162float: the bf16 y's check
#include <cuda_runtime.h>      // cudaMemset, cudaDeviceSynchronize
#include "kernels/common.cuh"  // DeviceBuffer, cudaCheck
#include "kernels/ssd.cuh"     // hl::gpu::ssd_chunked_forward/backward, ssd_chunked_backward_scratch_size
#include "model/common.h"      // Rng, hl::Error
#include "model/ssd.h"         // the CPU reference: ssd_chunked_*, ssd_sequential_*, ssd_backward_scratch_size

namespace {

using hl::gpu::DeviceBuffer;

constexpr double FWD_TOL = 1e-4;   // fp32 forward, max-norm relative
constexpr double GRAD_TOL = 1e-3;  // fp32 gradients, max-norm relative

// rel = max|g − c| / max|c| (a NaN anywhere in g makes it NaN, which fails every ≤ check)
double max_rel_err(const std::vector<float>& g, const std::vector<float>& c) {
    double num = 0, den = 0;
    for (size_t i = 0; i < c.size(); i++) {
        const double e = std::fabs(double(g[i]) - double(c[i]));
        if (!(e <= num)) num = e;
        den = std::max(den, std::fabs(double(c[i])));
    }
    return den > 0 ? num / den : num;
}

std::map<std::string, double>& worst() {
    static std::map<std::string, double> w;
    return w;
}

void expect_close(const std::string& what, const std::vector<float>& g, const std::vector<float>& c, double tol,
                  const std::string& ctx) {
    const double e = max_rel_err(g, c);
    double& w = worst()[what];
    if (!(e <= w)) w = e;
    CHECK_MESSAGE(e <= tol, ctx, ": ", what, " max-norm rel err ", e, " > ", tol);
}

std::vector<float> minus(std::vector<float> v, float c) {
    for (float& f : v) f -= c;
    return v;
}

template <typename T>
void poison(DeviceBuffer<T>& b) {  // all bits set: a NaN in every float
    if (b.n) cudaCheck(cudaMemset(b.ptr, 0xFF, b.n * sizeof(T)));
}

struct Case {
    int B, T, H, P, G, N, Q;
    bool init, fin;          // init_state given (and dinit_state wanted); final_state wanted (and dfinal_state given)
    double dt_lo = 0.01, dt_hi = 0.2, A_lo = -0.3, A_hi = -0.02;  // weak decay: the state carries across chunks
    std::string name() const {
        std::ostringstream os;
        os << "B=" << B << " T=" << T << " H=" << H << " P=" << P << " G=" << G << " N=" << N << " Q=" << Q
           << " init=" << init << " final=" << fin << " dt∈[" << dt_lo << "," << dt_hi << "] A∈[" << A_lo << ","
           << A_hi << "]";
        return os.str();
    }
};

constexpr float DA0 = 0.25f, DD0 = -0.5f;  // dA, dD start here on both sides

struct Result {  // everything one implementation produces
    std::vector<float> y, states, fin, dx, ddt, dA, dBm, dCm, dD, dinit;
};

struct Inputs {
    std::vector<float> x, dt, A, Bm, Cm, D, init, dy, dfin;
};

Inputs make_inputs(const Case& k, uint64_t seed) {
    const size_t nx = (size_t)k.B * k.T * k.H * k.P, ndt = (size_t)k.B * k.T * k.H;
    const size_t nbc = (size_t)k.B * k.T * k.G * k.N, ns = (size_t)k.B * k.H * k.P * k.N;
    hl::Rng rng(seed);
    Inputs in;
    in.x.resize(nx), in.dt.resize(ndt), in.A.resize(k.H), in.Bm.resize(nbc), in.Cm.resize(nbc), in.D.resize(k.H);
    in.init.resize(ns), in.dy.resize(nx), in.dfin.resize(ns);
    rng.fill_normal(in.x.data(), nx, 1.0);
    rng.fill_uniform(in.dt.data(), ndt, k.dt_lo, k.dt_hi);
    rng.fill_uniform(in.A.data(), k.H, k.A_lo, k.A_hi);
    rng.fill_normal(in.Bm.data(), nbc, 0.5);
    rng.fill_normal(in.Cm.data(), nbc, 0.5);
    rng.fill_normal(in.D.data(), k.H, 1.0);
    rng.fill_normal(in.init.data(), ns, 1.0);
    rng.fill_normal(in.dy.data(), nx, 1.0);
    rng.fill_normal(in.dfin.data(), ns, 1.0);
    return in;
}

// The CPU reference in float: Q > 0 the chunked form, Q == 0 the sequential one.
Result run_cpu(const Case& k, const Inputs& in, int Q) {
    const int B = k.B, T = k.T, H = k.H, P = k.P, G = k.G, N = k.N;
    const size_t nx = in.x.size(), ns = in.init.size();
    Result r;
    r.y.assign(nx, 0.f), r.fin.assign(ns, 0.f);
    const float* init = k.init ? in.init.data() : nullptr;
    float* fin = k.fin ? r.fin.data() : nullptr;
    if (Q > 0) {
        r.states.assign((size_t)B * H * hl::ssd_num_chunks(T, Q) * P * N, 0.f);
        hl::ssd_chunked_forward(r.y.data(), r.states.data(), in.x.data(), in.dt.data(), in.A.data(), in.Bm.data(),
                                in.Cm.data(), in.D.data(), init, fin, B, T, H, P, G, N, Q);
    } else {
        r.states.assign((size_t)B * H * T * P * N, 0.f);
        hl::ssd_sequential_forward(r.y.data(), r.states.data(), in.x.data(), in.dt.data(), in.A.data(), in.Bm.data(),
                                   in.Cm.data(), in.D.data(), init, fin, B, T, H, P, G, N);
    }
    r.dx.assign(nx, 0.f), r.ddt.assign(in.dt.size(), 0.f), r.dBm.assign(in.Bm.size(), 0.f);
    r.dCm.assign(in.Cm.size(), 0.f), r.dinit.assign(ns, 0.f), r.dA.assign(H, DA0), r.dD.assign(H, DD0);
    std::vector<float> scratch(hl::ssd_backward_scratch_size(B, H, P, N));
    float* dinit = k.init ? r.dinit.data() : nullptr;
    const float* dfin = k.fin ? in.dfin.data() : nullptr;
    if (Q > 0)
        hl::ssd_chunked_backward(r.dx.data(), r.ddt.data(), r.dA.data(), r.dBm.data(), r.dCm.data(), r.dD.data(), dinit,
                                 scratch.data(), in.dy.data(), dfin, r.states.data(), in.x.data(), in.dt.data(),
                                 in.A.data(), in.Bm.data(), in.Cm.data(), in.D.data(), B, T, H, P, G, N, Q);
    else
        hl::ssd_sequential_backward(r.dx.data(), r.ddt.data(), r.dA.data(), r.dBm.data(), r.dCm.data(), r.dD.data(),
                                    dinit, scratch.data(), in.dy.data(), dfin, r.states.data(), in.x.data(),
                                    in.dt.data(), in.A.data(), in.Bm.data(), in.Cm.data(), in.D.data(), init, B, T, H,
                                    P, G, N);
    return r;
}

// The GPU version, chunked with k.Q; every output poisoned first. r16 (non-null): the scan again as Mamba-2 runs it
// under bf16 operands, from x, B, C and dy in bf16 (in's must hold bf16 values already) and writing y and the chunk
// states in bf16 (their local states in the backward's scratch): its y and chunk states (as floats) and gradients.
Result run_gpu(const Case& k, const Inputs& in, Result* r16 = nullptr) {
    const int B = k.B, T = k.T, H = k.H, P = k.P, G = k.G, N = k.N, Q = k.Q;
    const size_t nx = in.x.size(), ns = in.init.size();
    DeviceBuffer<float> x(nx), dt(in.dt.size()), A(H), Bm(in.Bm.size()), Cm(in.Cm.size()), D(H), init(ns), dy(nx),
        dfin(ns);
    x.upload(in.x), dt.upload(in.dt), A.upload(in.A), Bm.upload(in.Bm), Cm.upload(in.Cm), D.upload(in.D);
    init.upload(in.init), dy.upload(in.dy), dfin.upload(in.dfin);
    DeviceBuffer<float> y(nx), states((size_t)B * H * hl::ssd_num_chunks(T, Q) * P * N), fin(ns);
    poison(y), poison(states), poison(fin);
    hl::gpu::ssd_chunked_forward(y.ptr, states.ptr, x.ptr, dt.ptr, A.ptr, Bm.ptr, Cm.ptr, D.ptr,
                                 k.init ? init.ptr : nullptr, k.fin ? fin.ptr : nullptr, B, T, H, P, G, N, Q);
    cudaCheck(cudaDeviceSynchronize());

    DeviceBuffer<float> dx(nx), ddt(in.dt.size()), dA(H), dBm(in.Bm.size()), dCm(in.Cm.size()), dD(H), dinit(ns);
    DeviceBuffer<float> scratch(hl::gpu::ssd_chunked_backward_scratch_size(B, T, H, P, G, N, Q));
    poison(dx), poison(ddt), poison(dBm), poison(dCm), poison(dinit), poison(scratch);
    dA.upload(std::vector<float>(H, DA0)), dD.upload(std::vector<float>(H, DD0));
    hl::gpu::ssd_chunked_backward(dx.ptr, ddt.ptr, dA.ptr, dBm.ptr, dCm.ptr, dD.ptr, k.init ? dinit.ptr : nullptr,
                                  scratch.ptr, dy.ptr, k.fin ? dfin.ptr : nullptr, states.ptr, x.ptr, dt.ptr, A.ptr,
                                  Bm.ptr, Cm.ptr, D.ptr, B, T, H, P, G, N, Q);
    cudaCheck(cudaDeviceSynchronize());
    if (r16) {
        using hl::gpu::bf16;
        auto upload16 = [](DeviceBuffer<bf16>& d, const std::vector<float>& v) {
            std::vector<bf16> h(v.size());
            for (size_t i = 0; i < v.size(); i++) h[i] = __float2bfloat16_rn(v[i]);
            d.alloc(v.size());
            d.upload(h);
        };
        DeviceBuffer<bf16> xb, Bb, Cb, dyb;
        upload16(xb, in.x), upload16(Bb, in.Bm), upload16(Cb, in.Cm), upload16(dyb, in.dy);
        DeviceBuffer<bf16> yb(nx), states2(states.n);
        poison(yb), poison(states2);  // (NaNs in bf16 too: an element not written shows)
        DeviceBuffer<float> dx2(nx), ddt2(in.dt.size()), dA2(H), dBm2(in.Bm.size()),
            dCm2(in.Cm.size()), dD2(H), dinit2(ns), scratch2(scratch.n);
        poison(dx2), poison(ddt2), poison(dBm2), poison(dCm2), poison(dinit2), poison(scratch2);
        hl::gpu::ssd_chunked_forward(yb.ptr, states2.ptr, xb.ptr, dt.ptr, A.ptr, Bb.ptr, Cb.ptr, D.ptr,
                                     k.init ? init.ptr : nullptr, (float*)nullptr, B, T, H, P, G, N, Q, 0, scratch2.ptr);
        dA2.upload(std::vector<float>(H, DA0)), dD2.upload(std::vector<float>(H, DD0));
        hl::gpu::ssd_chunked_backward(dx2.ptr, ddt2.ptr, dA2.ptr, dBm2.ptr, dCm2.ptr, dD2.ptr,
                                      k.init ? dinit2.ptr : nullptr, scratch2.ptr, dyb.ptr, k.fin ? dfin.ptr : nullptr,
                                      states2.ptr, xb.ptr, dt.ptr, A.ptr, Bb.ptr, Cb.ptr, D.ptr, B, T, H, P, G, N, Q);
        cudaCheck(cudaDeviceSynchronize());
        auto to_float = [](const DeviceBuffer<bf16>& d) {
            const std::vector<bf16> h = d.download();
            std::vector<float> f(h.size());
            for (size_t i = 0; i < h.size(); i++) f[i] = __bfloat162float(h[i]);
            return f;
        };
        r16->y = to_float(yb), r16->states = to_float(states2);
        r16->dx = dx2.download(), r16->ddt = ddt2.download(), r16->dA = dA2.download(), r16->dBm = dBm2.download();
        r16->dCm = dCm2.download(), r16->dD = dD2.download(), r16->dinit = dinit2.download();
    }
    Result r;
    r.y = y.download(), r.states = states.download(), r.fin = fin.download();
    r.dx = dx.download(), r.ddt = ddt.download(), r.dA = dA.download(), r.dBm = dBm.download();
    r.dCm = dCm.download(), r.dD = dD.download(), r.dinit = dinit.download();
    return r;
}

// GPU vs one CPU form; `tag` names the form in the messages and the summary.
void compare(const Result& g, const Result& c, const Case& k, const std::string& tag, bool with_states) {
    const std::string ctx = tag + " " + k.name();
    expect_close(tag + " y", g.y, c.y, FWD_TOL, ctx);
    if (with_states) expect_close(tag + " chunk_states", g.states, c.states, FWD_TOL, ctx);
    if (k.fin) expect_close(tag + " final_state", g.fin, c.fin, FWD_TOL, ctx);
    expect_close(tag + " dx", g.dx, c.dx, GRAD_TOL, ctx);
    expect_close(tag + " ddt", g.ddt, c.ddt, GRAD_TOL, ctx);
    expect_close(tag + " dBm", g.dBm, c.dBm, GRAD_TOL, ctx);
    expect_close(tag + " dCm", g.dCm, c.dCm, GRAD_TOL, ctx);
    expect_close(tag + " dA", minus(g.dA, DA0), minus(c.dA, DA0), GRAD_TOL, ctx);
    expect_close(tag + " dD", minus(g.dD, DD0), minus(c.dD, DD0), GRAD_TOL, ctx);
    if (k.init) expect_close(tag + " dinit_state", g.dinit, c.dinit, GRAD_TOL, ctx);
}

void check_case(const Case& k, uint64_t seed) {
    const Inputs in = make_inputs(k, seed);
    const Result g = run_gpu(k, in);
    compare(g, run_cpu(k, in, k.Q), k, "vs chunked", true);
    compare(g, run_cpu(k, in, 0), k, "vs sequential", false);
}

void print_worst(const char* title) {
    std::ostringstream os;
    os << title << " (worst max-norm rel err over the cases):";
    for (auto& [name, e] : worst()) os << "\n  " << name << ": " << e;
    MESSAGE(os.str());
    worst().clear();
}

}  // namespace

TEST_CASE("gpu ssd: chunked scan equals the CPU chunked and sequential scans (forward, every gradient)") {
    // B=2, H=4, every T × P × G × N × Q of the brief; (init, final) cycles through all four combinations
    int n = 0;
    for (int T : {7, 64, 100, 300})
        for (int P : {5, 64})
            for (int G : {1, 2})
                for (int N : {3, 16, 128})
                    for (int Q : {4, 64, 256}) {
                        if (Q == 256 && T < 256) continue;  // a chunk longer than the sequence is covered by T=7, Q=64
                        Case k{2, T, 4, P, G, N, Q, (n & 1) != 0, (n & 2) != 0};
                        check_case(k, 1000 + n);
                        n++;
                    }
    MESSAGE(n, " shapes");
    print_worst("grid of shapes");
}

TEST_CASE("gpu ssd: wide heads, many heads per group, chunk edge cases") {
    const std::vector<Case> cases = {
        {2, 300, 4, 128, 1, 128, 256, true, true},  // P = N = 128: the 128-wide tiles, two row tiles of the state
        {2, 200, 2, 100, 1, 100, 64, true, true},   // P, N not multiples of anything
        {1, 130, 2, 65, 2, 65, 128, false, true},   // just over 64
        {2, 100, 8, 16, 1, 16, 64, true, true},     // 8 heads per group: two head slices per group in dB/dC
        {1, 64, 24, 16, 1, 32, 32, true, false},    // 24 heads per group: six slices (the paper's H/G)
        {2, 50, 6, 8, 2, 8, 16, false, true},       // 3 heads per group
        {1, 7, 4, 5, 1, 3, 1, true, true},          // Q = 1: every step its own chunk
        {1, 256, 2, 32, 1, 32, 256, true, true},    // T = Q = 256 exactly
        {1, 257, 2, 32, 1, 32, 256, true, true},    // one step into a second chunk
        {1, 65, 2, 16, 1, 16, 64, true, true},      // a last chunk of one step
        {1, 1101, 2, 8, 1, 8, 4, true, true},       // 276 chunks: two batches of decays (256 a batch), and the
        {1, 1097, 2, 8, 1, 8, 4, false, false},     // state passes' 4-chunk rings ending part-way (275 chunks)
    };
    for (size_t i = 0; i < cases.size(); i++) check_case(cases[i], 2000 + i);
    print_worst("edge shapes");
}

TEST_CASE("gpu ssd: strong decay (large dt, A <= -1) and steps with dt = 0") {
    // a = dt·A in [−4, −0.5] per step: decays underflow to 0 within a chunk. (Q = 64 keeps |cum| ≤ 256: in
    // fp32 a cumsum near −2000 has an ulp of ~1e-4, so exp(cum_i − cum_j) itself would carry ~1e-4 relative
    // error on the CPU and the GPU alike, whichever rounds it.)
    Case k{2, 300, 4, 64, 1, 64, 64, true, true, 0.5, 2.0, -2.0, -1.0};
    check_case(k, 3000);
    Case z{2, 100, 4, 16, 2, 16, 64, true, true, 0.0, 0.0, -1.0, -0.5};
    check_case(z, 3001);  // dt = 0 everywhere: no decay, no input; y = D·x + C·init
    print_worst("decay extremes");
}

TEST_CASE("gpu ssd: the backward is deterministic (bitwise, twice)") {
    Case k{2, 100, 8, 16, 1, 16, 64, true, true};  // two head slices: the slice sum path too
    const Inputs in = make_inputs(k, 4000);
    const Result a = run_gpu(k, in), b = run_gpu(k, in);
    CHECK(a.dx == b.dx);
    CHECK(a.ddt == b.ddt);
    CHECK(a.dBm == b.dBm);
    CHECK(a.dCm == b.dCm);
    CHECK(a.dA == b.dA);
    CHECK(a.dD == b.dD);
    CHECK(a.dinit == b.dinit);
}

TEST_CASE("gpu ssd: unsupported sizes are clear errors") {
    float* p = nullptr;
    auto fwd = [&](int P, int N, int Q, int H, int G) {
        hl::gpu::ssd_chunked_forward<float>(p, p, p, p, p, p, p, p, nullptr, nullptr, 1, 8, H, P, G, N, Q);
    };
    CHECK_THROWS_AS(fwd(129, 16, 64, 2, 1), hl::Error);  // P > 128
    CHECK_THROWS_AS(fwd(16, 129, 64, 2, 1), hl::Error);  // N > 128
    CHECK_THROWS_AS(fwd(16, 16, 257, 2, 1), hl::Error);  // Q > 256
    CHECK_THROWS_AS(fwd(16, 16, 0, 2, 1), hl::Error);    // Q < 1
    CHECK_THROWS_AS(fwd(16, 16, 64, 3, 2), hl::Error);   // G does not divide H
    CHECK_THROWS_AS(hl::gpu::ssd_chunked_backward<float>(p, p, p, p, p, p, nullptr, nullptr, p, nullptr, p, p, p, p, p,
                                                         p, p, 1, 8, 2, 16, 1, 16, 64),
                    hl::Error);  // no scratch
}

TEST_CASE("gpu ssd on tensor cores (bf16 operands) equals the CPU chunked scan within bf16 rounding") {
    // Every block GEMM of the scan takes bf16 operands (8 mantissa bits) with fp32 accumulation when a Bf16Scope
    // is open (a bf16 model): the forward within 2e-2 of its scale, the gradients within 5e-2 (dA, a sum over
    // every step of cancelling terms, 1e-1). The errors are printed; the fp32 path stays at 1e-4 / 1e-3 above.
    const std::vector<Case> cases = {
        {2, 300, 4, 64, 1, 128, 256, true, true},   // the paper's P = 64, N = 128, Q = 256
        {2, 200, 4, 128, 2, 64, 64, false, true},   // wide heads, two groups
        {1, 130, 2, 65, 1, 65, 128, true, false},   // sizes off the tiles (the block GEMMs: P, N not multiples of 4)
        {2, 300, 4, 128, 1, 128, 256, true, true},  // P = N = 128 at Q = 256: four causal tiles a chunk
        {2, 100, 8, 16, 1, 16, 64, true, true},     // two head slices a group: dB, dC through the slice sums
        {1, 64, 24, 16, 1, 32, 32, true, false},    // six slices; N = 32 inside a 64-wide tile
        {2, 50, 6, 8, 2, 8, 16, false, true},       // 3 heads per group, two groups, 16-step chunks
        {2, 90, 4, 12, 1, 20, 32, true, true},      // P, N multiples of 4, not 8: bf16 rows not all 16-byte aligned,
                                                    // and a row's last 4 columns, staged through registers, not cp.async
    };
    const hl::gpu::Bf16Operands ops;  // (the scan only asks whether bf16 operands are in effect)
    hl::gpu::ssd_detail::ssd_tensor_cores() = true;  // (train_gpu: on under bf16, see kernels/ssd.cuh)
    for (size_t i = 0; i < cases.size(); i++) {
        const Case& k = cases[i];
        Inputs in = make_inputs(k, 5000 + i);
        for (auto* v : {&in.x, &in.Bm, &in.Cm, &in.dy})  // bf16 values, for the bf16 tensors' check
            for (float& e : *v) e = __bfloat162float(__float2bfloat16_rn(e));
        Result g, g16;
        const long fallbacks = hl::gpu::ssd_detail::tc_fallbacks();
        {
            const hl::gpu::Bf16Scope scope(&ops);
            g = run_gpu(k, in, &g16);
        }
        if (k.P % 4 == 0 && k.N % 4 == 0)  // the shapes the tensor-core kernels take: none fell back
            CHECK_MESSAGE(hl::gpu::ssd_detail::tc_fallbacks() == fallbacks, k.name() << ": not on the tensor cores");
        // x, B, C and dy in bf16 (Mamba-2's conv and gate write them so for the scan under bf16), y and the chunk
        // states stored in bf16: y and the states are the fp32 ones rounded once, and dx, dB, dC, dD, dinit_state the
        // fp32 tensors' bit for bit (every product rounds its operands to bf16; the rest reads the same floats), on
        // both kernel families. ddt and dA take ⟨dS_out, S_in⟩ from the rounded states: checked against the CPU below.
        auto rounded = [](const std::vector<float>& v) {
            std::vector<float> r(v.size());
            for (size_t j = 0; j < v.size(); j++) r[j] = __bfloat162float(__float2bfloat16_rn(v[j]));
            return r;
        };
        CHECK_MESSAGE(g16.y == rounded(g.y), "bf16 " << k.name() << ": y in bf16 is not the fp32 y rounded");
        CHECK_MESSAGE(g16.states == rounded(g.states), "bf16 " << k.name() << ": bf16 states are not the fp32 ones rounded");
        CHECK_MESSAGE((g16.dx == g.dx && g16.dBm == g.dBm && g16.dCm == g.dCm && g16.dD == g.dD &&
                       (!k.init || g16.dinit == g.dinit)),
                      "bf16 " << k.name() << ": the backward on bf16 tensors differs from the fp32 tensors'");
        const Result c = run_cpu(k, in, k.Q);
        const std::string ctx = "bf16 " + k.name();
        const double ey = max_rel_err(g.y, c.y);
        expect_close("bf16 y", g.y, c.y, 2e-2, ctx);
        expect_close("bf16 chunk_states", g.states, c.states, 2e-2, ctx);
        if (k.fin) expect_close("bf16 final_state", g.fin, c.fin, 2e-2, ctx);
        expect_close("bf16 dx", g.dx, c.dx, 5e-2, ctx);
        expect_close("bf16 ddt", g.ddt, c.ddt, 5e-2, ctx);
        expect_close("bf16 dBm", g.dBm, c.dBm, 5e-2, ctx);
        expect_close("bf16 dCm", g.dCm, c.dCm, 5e-2, ctx);
        expect_close("bf16 dA", minus(g.dA, DA0), minus(c.dA, DA0), 1e-1, ctx);
        expect_close("bf16 ddt, bf16 states", g16.ddt, c.ddt, 5e-2, ctx);
        expect_close("bf16 dA, bf16 states", minus(g16.dA, DA0), minus(c.dA, DA0), 1e-1, ctx);
        expect_close("bf16 dD", minus(g.dD, DD0), minus(c.dD, DD0), 5e-2, ctx);
        if (k.init) expect_close("bf16 dinit_state", g.dinit, c.dinit, 5e-2, ctx);
        CHECK(ey > 1e-6);  // the tensor-core path ran (fp32 agrees to ~1e-7 here)
    }
    hl::gpu::ssd_detail::ssd_tensor_cores() = false;
    print_worst("bf16 operands");
}
