// mamba2.h — the Mamba-2 mixer (DESIGN.md §1 block M), forward and backward, in two parts:
//   branch: everything before the gated norm, ending in g = y ⊙ SiLU(z). The intra-layer hybrid
//           (model/intra.h) runs this part beside its attention heads and fuses the outputs itself.
//   mixer:  branch, then out = out_proj(RMSNorm_grouped(g) · norm_w): the M block's token mixer.
//
// For one token u (d_model) — every step below runs over all (B, T) rows at once:
//   [z, xBC, dt_raw] = in_proj · u           z (d_inner), xBC (d_inner + 2·G·N), dt_raw (H)
//   xBC = SiLU(causal_depthwise_conv1d(xBC))  (kernel d_conv, with bias: model/conv1d.h)
//   [x, B, C] = split(xBC)                    x (H, P), B and C (G, N); head h reads group h / (H/G)
//   dt = softplus(dt_raw + dt_bias)           (H)
//   A  = −exp(A_log)                          (H), a scalar decay per head
//   y  = SSD(x, dt, A, B, C) + D·x            (model/ssd.h, the chunked form)
//   g  = y ⊙ SiLU(z)                          the branch output
// With shared_x (value sharing in the hybrid) x comes from outside: in_proj has no x rows and the
// given x_shared (B, T, d_inner) fills the x slot of the conv's input.
#pragma once
#include <cmath>            // std::exp, std::log, std::expm1, std::sqrt
#include <cstddef>          // size_t
#include "model/common.h"   // Arena, Rng, HL_CHECK, silu, silu_grad, sigmoid, softplus, zero
#include "model/conv1d.h"   // conv1d_silu_forward/backward
#include "model/matmul.h"   // matmul_forward/backward for in_proj and out_proj
#include "model/rmsnorm.h"  // rmsnorm_forward/backward for the gated norm
#include "model/ssd.h"      // ssd_chunked_forward/backward, ssd_num_chunks, SSD_MAX_CHUNK

namespace hl {

struct Mamba2Config {
    int d_model = 0;
    int d_inner = 0;    // d_ssm = expand · d_model
    int headdim = 0;    // P
    int d_state = 0;    // N
    int ngroups = 1;    // G: heads of one group share B and C
    int d_conv = 4;     // K, the conv kernel length
    int chunk = 64;     // Q of the chunked SSD
    bool shared_x = false;  // x comes from outside (value sharing): in_proj has no x rows
    int nheads() const { return d_inner / headdim; }
    int conv_dim() const { return d_inner + 2 * ngroups * d_state; }  // the conv runs over [x, B, C]
    int d_in_proj() const { return d_inner + (shared_x ? 0 : d_inner) + 2 * ngroups * d_state + nheads(); }
    // in_proj's rows rounded up to a multiple of 8: the parameter layout leaves room for the extra rows after it
    // (mamba2_params), and the GPU runs in_proj's GEMMs over them (kernels/mamba2.cuh)
    int in_proj_rows() const { return (d_in_proj() + 7) / 8 * 8; }
};

constexpr double MAMBA2_NORM_EPS = 1e-5;  // the gated RMSNorm's eps (DESIGN.md §P: ours)

inline void mamba2_config_check(const Mamba2Config& c) {
    HL_CHECK(c.d_model > 0 && c.d_inner > 0 && c.headdim > 0 && c.d_state > 0 && c.ngroups > 0 && c.d_conv > 0,
             "mamba2: sizes must be positive (d_model=", c.d_model, " d_inner=", c.d_inner, " headdim=", c.headdim,
             " d_state=", c.d_state, " ngroups=", c.ngroups, " d_conv=", c.d_conv, ")");
    HL_CHECK(c.d_inner % c.headdim == 0, "mamba2: d_inner=", c.d_inner, " is not a multiple of headdim=", c.headdim);
    HL_CHECK(c.nheads() % c.ngroups == 0, "mamba2: nheads=", c.nheads(), " is not a multiple of ngroups=",
             c.ngroups);
    HL_CHECK(c.chunk >= 1 && c.chunk <= SSD_MAX_CHUNK, "mamba2: chunk=", c.chunk, " must be in [1, ",
             SSD_MAX_CHUNK, "]");
}

template <typename T>
struct Mamba2Params {
    T* in_proj = nullptr;   // (d_in_proj, d_model)  rows: [z, x (unless shared_x), B, C, dt]
    T* conv_w = nullptr;    // (conv_dim, d_conv)
    T* conv_b = nullptr;    // (conv_dim)
    T* dt_bias = nullptr;   // (H)
    T* A_log = nullptr;     // (H)
    T* D = nullptr;         // (H)
    T* norm_w = nullptr;    // (d_inner)   mixer only
    T* out_proj = nullptr;  // (d_model, d_inner)   mixer only
};

// The branch alone (with_norm_out = false) has no norm_w and out_proj.
template <typename T>
Mamba2Params<T> mamba2_params(Arena<T>& a, const Mamba2Config& c, bool with_norm_out = true) {
    mamba2_config_check(c);
    const int H = c.nheads();
    Mamba2Params<T> p;
    p.in_proj = a.take("in_proj", {c.d_in_proj(), c.d_model});
    // then in_proj_rows − d_in_proj rows of gap, which nothing here reads or writes. cuBLAS's Hopper kernels need
    // the GEMM sizes to be multiples of 8 (bf16): at d_in_proj = 1804 (intra 350m's 12 Mamba heads) the product ran
    // on a fallback 2.6–2.9× slower (H200: forward 279 µs against 95 at 1808 rows, input gradient 248 against 85)
    a.reserve(size_t(c.in_proj_rows() - c.d_in_proj()) * size_t(c.d_model));
    p.conv_w = a.take("conv_w", {c.conv_dim(), c.d_conv});
    p.conv_b = a.take("conv_b", {c.conv_dim()});
    p.dt_bias = a.take("dt_bias", {H});
    p.A_log = a.take("A_log", {H});
    p.D = a.take("D", {H});
    if (with_norm_out) {
        p.norm_w = a.take("norm_w", {c.d_inner});
        p.out_proj = a.take("out_proj", {c.d_model, c.d_inner});
    }
    return p;
}

// DESIGN.md §1 init. dt is drawn log-uniform in [1e-3, 1e-1] and stored through the inverse of
// softplus, so that softplus(dt_bias) is that dt at the start; A = −exp(A_log) is uniform in
// [−2, −0.01] (the paper's range). out_proj is scaled by 1/√(2·n_layers) like every residual projection.
template <typename T>
void mamba2_init(Mamba2Params<T>& p, const Mamba2Config& c, Rng& rng, int n_layers) {
    mamba2_config_check(c);
    HL_CHECK(n_layers > 0, "mamba2_init: n_layers=", n_layers, " must be positive");
    const int H = c.nheads(), K = c.d_conv;
    rng.fill_normal(p.in_proj, (size_t)c.d_in_proj() * c.d_model, 0.02);
    const double bound = 1.0 / std::sqrt((double)K);  // PyTorch's default for a depthwise conv (fan_in = K)
    rng.fill_uniform(p.conv_w, (size_t)c.conv_dim() * K, -bound, bound);
    rng.fill_uniform(p.conv_b, (size_t)c.conv_dim(), -bound, bound);
    for (int h = 0; h < H; h++) {
        double dt = std::exp(rng.uniform(std::log(1e-3), std::log(1e-1)));
        p.dt_bias[h] = T(dt + std::log(-std::expm1(-dt)));  // softplus⁻¹(dt) = log(eᵈᵗ − 1)
    }
    for (int h = 0; h < H; h++) p.A_log[h] = T(std::log(rng.uniform(0.01, 2.0)));
    for (int h = 0; h < H; h++) p.D[h] = T(1);
    if (p.norm_w)
        for (int i = 0; i < c.d_inner; i++) p.norm_w[i] = T(1);
    if (p.out_proj) rng.fill_normal(p.out_proj, (size_t)c.d_model * c.d_inner, 0.02 / std::sqrt(2.0 * n_layers));
}

// Saved activations and backward scratch of one mixer (or branch) for a (B, T) batch.
template <typename T>
struct Mamba2Acts {
    // forward, saved for the backward
    T* zxbcdt = nullptr;        // (B, T, d_in_proj)  in_proj output [z, xBC, dt_raw] ([z, BC, dt_raw] if shared_x)
    T* conv_in = nullptr;       // (B, T, conv_dim)   the conv's input [x, B, C]
    T* conv_pre = nullptr;      // (B, T, conv_dim)   conv output before SiLU
    T* xBC = nullptr;           // (B, T, conv_dim)   after SiLU
    T* x = nullptr;             // (B, T, H, P)       the scan's inputs, split out of xBC
    T* Bm = nullptr;            // (B, T, G, N)
    T* Cm = nullptr;            // (B, T, G, N)
    T* dt = nullptr;            // (B, T, H)          softplus(dt_raw + dt_bias)
    T* A = nullptr;             // (H)                −exp(A_log)
    T* chunk_states = nullptr;  // (B, H, nchunks, P, N)  the state entering each chunk
    T* y = nullptr;             // (B, T, H, P)       SSD output, D·x included
    T* g = nullptr;             // (B, T, d_inner)    y ⊙ SiLU(z): the branch output
    T* gn = nullptr;            // (B, T, d_inner)    mixer: RMSNorm(g) · norm_w
    T* rstd = nullptr;          // (B, T, G)          mixer: the norm's 1/rms per group
    // backward scratch
    T* dgn = nullptr;           // (B, T, d_inner)    mixer: gradient of gn
    T* dg = nullptr;            // (B, T, d_inner)    mixer: gradient of g
    T* dy = nullptr;            // (B, T, H, P)
    T* dx = nullptr;            // (B, T, H, P)
    T* dBm = nullptr;           // (B, T, G, N)
    T* dCm = nullptr;           // (B, T, G, N)
    T* ddt = nullptr;           // (B, T, H)
    T* dA = nullptr;            // (H)
    T* dxBC = nullptr;          // (B, T, conv_dim)   gradient of the conv output (after SiLU)
    T* dconv_in = nullptr;      // (B, T, conv_dim)
    T* dzxbcdt = nullptr;       // (B, T, d_in_proj)
    T* ssd_scratch = nullptr;   // ssd_backward_scratch_size(B, H, P, N)
};

template <typename T>
Mamba2Acts<T> mamba2_acts(Arena<T>& a, const Mamba2Config& c, int B, int T_) {
    mamba2_config_check(c);
    HL_CHECK(B > 0 && T_ > 0, "mamba2_acts: bad sizes B=", B, " T=", T_);
    const int H = c.nheads(), P = c.headdim, G = c.ngroups, N = c.d_state, CD = c.conv_dim();
    const int nchunks = ssd_num_chunks(T_, c.chunk);
    Mamba2Acts<T> x;
    x.zxbcdt = a.take("zxbcdt", {B, T_, c.d_in_proj()});
    x.conv_in = a.take("conv_in", {B, T_, CD});
    x.conv_pre = a.take("conv_pre", {B, T_, CD});
    x.xBC = a.take("xBC", {B, T_, CD});
    x.x = a.take("x", {B, T_, H, P});
    x.Bm = a.take("Bm", {B, T_, G, N});
    x.Cm = a.take("Cm", {B, T_, G, N});
    x.dt = a.take("dt", {B, T_, H});
    x.A = a.take("A", {H});
    x.chunk_states = a.take("chunk_states", {B, H, nchunks, P, N});
    x.y = a.take("y", {B, T_, H, P});
    x.g = a.take("g", {B, T_, c.d_inner});
    x.gn = a.take("gn", {B, T_, c.d_inner});
    x.rstd = a.take("rstd", {B, T_, G});
    x.dgn = a.take_scratch("dgn", {B, T_, c.d_inner});
    x.dg = a.take_scratch("dg", {B, T_, c.d_inner});
    x.dy = a.take_scratch("dy", {B, T_, H, P});
    x.dx = a.take_scratch("dx", {B, T_, H, P});
    x.dBm = a.take_scratch("dBm", {B, T_, G, N});
    x.dCm = a.take_scratch("dCm", {B, T_, G, N});
    x.ddt = a.take_scratch("ddt", {B, T_, H});
    x.dA = a.take_scratch("dA", {H});
    x.dxBC = a.take_scratch("dxBC", {B, T_, CD});
    x.dconv_in = a.take_scratch("dconv_in", {B, T_, CD});
    x.dzxbcdt = a.take_scratch("dzxbcdt", {B, T_, c.d_in_proj()});
    x.ssd_scratch = a.take_scratch("ssd_scratch", {(int)ssd_backward_scratch_size(B, H, P, N)});
    return x;
}

// Everything up to g = y ⊙ SiLU(z), written to acts.g (B, T, d_inner). inp (B, T, d_model);
// x_shared (B, T, d_inner) when c.shared_x, else null.
template <typename T>
void mamba2_branch_forward(Mamba2Acts<T>& acts, const T* inp, const T* x_shared, const Mamba2Params<T>& p,
                           const Mamba2Config& c, int B, int T_) {
    mamba2_config_check(c);
    HL_CHECK(B > 0 && T_ > 0, "mamba2: bad sizes B=", B, " T=", T_);
    HL_CHECK(c.shared_x == (x_shared != nullptr), "mamba2: x_shared must be given exactly when shared_x is set");
    const int rows = B * T_, D = c.d_model, DI = c.d_inner, H = c.nheads(), GN = c.ngroups * c.d_state;
    const int CD = c.conv_dim(), DIP = c.d_in_proj();
    const int dt_off = DIP - H;  // the dt_raw columns are the last H of a zxbcdt row

    // [z, xBC, dt_raw] = in_proj · u
    matmul_forward(acts.zxbcdt, inp, p.in_proj, (const T*)nullptr, rows, D, DIP);

    // the conv's input [x, B, C]: all from in_proj, or x from outside and B, C from in_proj
#pragma omp parallel for schedule(static)
    for (int r = 0; r < rows; r++) {
        const T* zr = acts.zxbcdt + (size_t)r * DIP;
        T* ci = acts.conv_in + (size_t)r * CD;
        if (c.shared_x) {
            for (int i = 0; i < DI; i++) ci[i] = x_shared[(size_t)r * DI + i];
            for (int i = 0; i < 2 * GN; i++) ci[DI + i] = zr[DI + i];
        } else {
            for (int i = 0; i < CD; i++) ci[i] = zr[DI + i];
        }
    }

    // xBC = SiLU(conv1d(xBC))
    conv1d_silu_forward(acts.xBC, acts.conv_pre, acts.conv_in, p.conv_w, p.conv_b, B, T_, CD, c.d_conv);

    // split [x, B, C], and dt = softplus(dt_raw + dt_bias)
#pragma omp parallel for schedule(static)
    for (int r = 0; r < rows; r++) {
        const T* xbc = acts.xBC + (size_t)r * CD;
        for (int i = 0; i < DI; i++) acts.x[(size_t)r * DI + i] = xbc[i];
        for (int i = 0; i < GN; i++) acts.Bm[(size_t)r * GN + i] = xbc[DI + i];
        for (int i = 0; i < GN; i++) acts.Cm[(size_t)r * GN + i] = xbc[DI + GN + i];
        for (int h = 0; h < H; h++) acts.dt[(size_t)r * H + h] = softplus(acts.zxbcdt[(size_t)r * DIP + dt_off + h] + p.dt_bias[h]);
    }
    // A = −exp(A_log) < 0: every head decays
    for (int h = 0; h < H; h++) acts.A[h] = -std::exp(p.A_log[h]);

    // y = SSD(x, dt, A, B, C) + D·x, starting from a zero state
    ssd_chunked_forward(acts.y, acts.chunk_states, acts.x, acts.dt, acts.A, acts.Bm, acts.Cm, p.D, (const T*)nullptr,
                        (T*)nullptr, B, T_, H, c.headdim, c.ngroups, c.d_state, c.chunk);

    // g = y ⊙ SiLU(z)
#pragma omp parallel for schedule(static)
    for (int r = 0; r < rows; r++)
        for (int i = 0; i < DI; i++)
            acts.g[(size_t)r * DI + i] = acts.y[(size_t)r * DI + i] * silu(acts.zxbcdt[(size_t)r * DIP + i]);
}

// Backward of the branch, given dg (B, T, d_inner), the gradient of acts.g. dinp (B, T, d_model) is
// written; dx_shared (B, T, d_inner) is written when c.shared_x (else pass null); dp.* accumulate.
template <typename T>
void mamba2_branch_backward(T* dinp, T* dx_shared, Mamba2Params<T>& dp, const T* dg, Mamba2Acts<T>& acts,
                            const T* inp, const T* x_shared, const Mamba2Params<T>& p, const Mamba2Config& c, int B,
                            int T_) {
    mamba2_config_check(c);
    HL_CHECK(B > 0 && T_ > 0, "mamba2: bad sizes B=", B, " T=", T_);
    HL_CHECK(c.shared_x == (x_shared != nullptr) && c.shared_x == (dx_shared != nullptr),
             "mamba2: x_shared and dx_shared must be given exactly when shared_x is set");
    const int rows = B * T_, D = c.d_model, DI = c.d_inner, H = c.nheads(), GN = c.ngroups * c.d_state;
    const int CD = c.conv_dim(), DIP = c.d_in_proj();
    const int dt_off = DIP - H;

    // g = y ⊙ SiLU(z)  →  dy = dg ⊙ SiLU(z),  dz = dg ⊙ y ⊙ SiLU'(z)  (dz goes straight into dzxbcdt)
#pragma omp parallel for schedule(static)
    for (int r = 0; r < rows; r++)
        for (int i = 0; i < DI; i++) {
            const T z = acts.zxbcdt[(size_t)r * DIP + i];
            const T d = dg[(size_t)r * DI + i];
            acts.dy[(size_t)r * DI + i] = d * silu(z);
            acts.dzxbcdt[(size_t)r * DIP + i] = d * acts.y[(size_t)r * DI + i] * silu_grad(z);
        }

    // the scan: dx, ddt, dB, dC written; dA (zeroed here) and dp.D accumulate
    zero(acts.dA, H);
    ssd_chunked_backward(acts.dx, acts.ddt, acts.dA, acts.dBm, acts.dCm, dp.D, (T*)nullptr, acts.ssd_scratch,
                         acts.dy, (const T*)nullptr, acts.chunk_states, acts.x, acts.dt, acts.A, acts.Bm, acts.Cm,
                         p.D, B, T_, H, c.headdim, c.ngroups, c.d_state, c.chunk);

    // A = −exp(A_log)  →  dA_log = dA · (−exp(A_log)) = dA · A
    for (int h = 0; h < H; h++) dp.A_log[h] += acts.dA[h] * acts.A[h];

    // dt = softplus(dt_raw + dt_bias)  →  ddt_raw = ddt · σ(dt_raw + dt_bias), dt_bias gets the same summed
#pragma omp parallel for schedule(static)
    for (int r = 0; r < rows; r++)
        for (int h = 0; h < H; h++) {
            T* zr = acts.dzxbcdt + (size_t)r * DIP;
            zr[dt_off + h] = acts.ddt[(size_t)r * H + h] * sigmoid(acts.zxbcdt[(size_t)r * DIP + dt_off + h] + p.dt_bias[h]);
        }
    for (int h = 0; h < H; h++) {  // H is small: one thread sums each head's column
        T acc = 0;
        for (int r = 0; r < rows; r++) acc += acts.dzxbcdt[(size_t)r * DIP + dt_off + h];
        dp.dt_bias[h] += acc;
    }

    // split [x, B, C]  →  concatenate their gradients
#pragma omp parallel for schedule(static)
    for (int r = 0; r < rows; r++) {
        T* d = acts.dxBC + (size_t)r * CD;
        for (int i = 0; i < DI; i++) d[i] = acts.dx[(size_t)r * DI + i];
        for (int i = 0; i < GN; i++) d[DI + i] = acts.dBm[(size_t)r * GN + i];
        for (int i = 0; i < GN; i++) d[DI + GN + i] = acts.dCm[(size_t)r * GN + i];
    }

    // xBC = SiLU(conv1d(xBC))
    conv1d_silu_backward(acts.dconv_in, dp.conv_w, dp.conv_b, acts.dxBC, acts.conv_pre, acts.conv_in, p.conv_w, B,
                         T_, CD, c.d_conv);

    // the conv's input came from in_proj (and x_shared)
#pragma omp parallel for schedule(static)
    for (int r = 0; r < rows; r++) {
        const T* d = acts.dconv_in + (size_t)r * CD;
        T* zr = acts.dzxbcdt + (size_t)r * DIP;
        if (c.shared_x) {
            for (int i = 0; i < DI; i++) dx_shared[(size_t)r * DI + i] = d[i];
            for (int i = 0; i < 2 * GN; i++) zr[DI + i] = d[DI + i];
        } else {
            for (int i = 0; i < CD; i++) zr[DI + i] = d[i];
        }
    }

    // [z, xBC, dt_raw] = in_proj · u
    matmul_backward(dinp, dp.in_proj, (T*)nullptr, acts.dzxbcdt, inp, p.in_proj, rows, D, DIP);
}

// The M block's mixer: out (B, T, d_model) = out_proj(RMSNorm_grouped(g) · norm_w), g from the branch.
// The gated norm normalises each group of d_inner/G channels on its own (as mamba_ssm does).
template <typename T>
void mamba2_mixer_forward(T* out, Mamba2Acts<T>& acts, const T* inp, const Mamba2Params<T>& p,
                          const Mamba2Config& c, int B, int T_) {
    mamba2_config_check(c);
    HL_CHECK(!c.shared_x, "mamba2 mixer: shared_x is for the hybrid's branch; the mixer computes its own x");
    HL_CHECK(p.norm_w && p.out_proj, "mamba2 mixer: params have no norm_w/out_proj (made with with_norm_out=false)");
    mamba2_branch_forward(acts, inp, (const T*)nullptr, p, c, B, T_);
    const int rows = B * T_, G = c.ngroups;
    rmsnorm_forward(acts.gn, acts.rstd, acts.g, p.norm_w, rows, G, c.d_inner / G, T(MAMBA2_NORM_EPS));
    matmul_forward(out, acts.gn, p.out_proj, (const T*)nullptr, rows, c.d_inner, c.d_model);
}

// dinp (B, T, d_model) is written; dp.* accumulate.
template <typename T>
void mamba2_mixer_backward(T* dinp, Mamba2Params<T>& dp, const T* dout, Mamba2Acts<T>& acts, const T* inp,
                           const Mamba2Params<T>& p, const Mamba2Config& c, int B, int T_) {
    mamba2_config_check(c);
    HL_CHECK(!c.shared_x, "mamba2 mixer: shared_x is for the hybrid's branch; the mixer computes its own x");
    HL_CHECK(p.norm_w && p.out_proj, "mamba2 mixer: params have no norm_w/out_proj (made with with_norm_out=false)");
    const int rows = B * T_, G = c.ngroups;
    matmul_backward(acts.dgn, dp.out_proj, (T*)nullptr, dout, acts.gn, p.out_proj, rows, c.d_inner, c.d_model);
    rmsnorm_backward(acts.dg, dp.norm_w, acts.dgn, acts.g, p.norm_w, acts.rstd, rows, G, c.d_inner / G);
    mamba2_branch_backward(dinp, (T*)nullptr, dp, acts.dg, acts, inp, (const T*)nullptr, p, c, B, T_);
}

}  // namespace hl
