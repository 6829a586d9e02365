// ssd.h — the SSD scan of Mamba-2 (DESIGN.md §1 block M), forward and backward, in two forms that
// compute the same function:
//   sequential — the recurrence itself, one time step after another: the definition, and the
//                reference the tests hold the other form to. It saves the state of every step.
//   chunked    — the form the GPU uses: time is cut into chunks of Q steps; inside a chunk the scan
//                is a few small matmuls, and only the state entering each chunk is passed along
//                (and saved for the backward).
//
// Per batch b and head h, with a state S of shape (P, N) and the group g = h / (H/G) whose B and C
// the head reads:
//   S_t = exp(dt_t·A_h) · S_{t−1} + dt_t · x_t ⊗ B_t        S_{−1} = init_state (or 0)
//   y_t = S_t · C_t + D_h · x_t                                 final_state = S_{T−1}
// Shapes: x, y (B,T,H,P)   dt (B,T,H), already softplus'ed, ≥ 0   A (H), ≤ 0   D (H)
//         Bm, Cm (B,T,G,N)   init_state, final_state (B,H,P,N), either may be null.
//
// Gradient conventions (llm.c): dx, ddt, dBm, dCm and dinit_state are WRITTEN; dA and dD are
// parameter gradients and ACCUMULATE. The backward of either form needs a caller-owned scratch of
// ssd_backward_scratch_size(B, H, P, N) elements (see ssd_backward_scratch_size).
//
// Numerics (DESIGN.md §3): the log-decays a_t = dt_t·A are ≤ 0, so every exp() below is of a
// non-positive number — cum_i − cum_j with j ≤ i, or a cumulative sum itself. Strong decay then
// underflows to 0 instead of overflowing to inf (the naive exp(cum_i)·exp(−cum_j) would give inf·0).
#pragma once
#include <cmath>           // std::exp
#include <cstddef>         // size_t
#include "model/common.h"  // HL_CHECK, zero

namespace hl {

// Longest chunk the chunked form takes: its per-chunk cumulative sums live in fixed stack arrays.
// (64 is the CPU default, 256 the GPU's.)
constexpr int SSD_MAX_CHUNK = 256;

inline int ssd_num_chunks(int T_, int Q) { return (T_ + Q - 1) / Q; }

// Scratch the backward needs: the running state gradient dS (P, N) of every (batch, head), then
// per-(batch, head) partial sums of dA and dD, which are reduced over the batch after the parallel
// loop so that the order of the sum never depends on the threads.
inline size_t ssd_backward_scratch_size(int B, int H, int P, int N) {
    return (size_t)B * H * ((size_t)P * N + 2);
}

// The sizes of one scan and the offsets into its row-major tensors, written once so every loop
// indexes the same way. (T_ is the sequence length; T is the float type.)
struct SsdShape {
    int B, T_, H, P, G, N;
    int heads_per_group() const { return H / G; }
    size_t PN() const { return (size_t)P * N; }
    size_t x(int b, int t, int h) const { return (((size_t)b * T_ + t) * H + h) * P; }   // x, y (B,T,H,P)
    size_t dt(int b, int t, int h) const { return ((size_t)b * T_ + t) * H + h; }        // dt (B,T,H)
    size_t bc(int b, int t, int g) const { return (((size_t)b * T_ + t) * G + g) * N; }  // Bm, Cm (B,T,G,N)
    size_t state(int b, int h) const { return ((size_t)b * H + h) * PN(); }              // (B,H,P,N)
    size_t step_state(int b, int h, int t) const { return (((size_t)b * H + h) * T_ + t) * PN(); }  // (B,H,T,P,N)
};

inline SsdShape ssd_shape(const char* who, int B, int T_, int H, int P, int G, int N) {
    HL_CHECK(B > 0 && T_ > 0 && H > 0 && P > 0 && G > 0 && N > 0, who, ": bad sizes B=", B, " T=", T_, " H=", H,
             " P=", P, " G=", G, " N=", N, " (all must be positive)");
    HL_CHECK(H % G == 0, who, ": nheads H=", H, " must be a multiple of ngroups G=", G);
    return SsdShape{B, T_, H, P, G, N};
}

// The scan decays (|exp(a)| ≤ 1) only when a = dt·A ≤ 0; checked before any parallel loop.
template <typename T>
void ssd_check_decay(const char* who, const T* dt, const T* A, const SsdShape& s) {
    for (int h = 0; h < s.H; h++) HL_CHECK(A[h] <= T(0), who, ": A must be <= 0 (a decay), got A[", h, "]=", A[h]);
    const size_t n = (size_t)s.B * s.T_ * s.H;
    for (size_t i = 0; i < n; i++) HL_CHECK(dt[i] >= T(0), who, ": dt must be >= 0 (softplus'ed), got dt[", i, "]=", dt[i]);
}

// dA[h] += Σ_b partial_dA[b, h] and the same for dD: the batch reduction of both backwards.
template <typename T>
void ssd_reduce_head_grads(T* dA, T* dD, const T* partial_dA, const T* partial_dD, int B, int H) {
    for (int h = 0; h < H; h++) {
        T sa = 0, sd = 0;
        for (int b = 0; b < B; b++) {
            sa += partial_dA[(size_t)b * H + h];
            sd += partial_dD[(size_t)b * H + h];
        }
        dA[h] += sa;
        dD[h] += sd;
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Sequential form
// ---------------------------------------------------------------------------------------------

// y (B,T,H,P) and states (B,H,T,P,N) — S_t of every step, saved for the backward — are written;
// final_state (B,H,P,N) too when non-null.
template <typename T>
void ssd_sequential_forward(T* y, T* states, const T* x, const T* dt, const T* A, const T* Bm, const T* Cm,
                            const T* D, const T* init_state, T* final_state, int B, int T_, int H, int P, int G,
                            int N) {
    const SsdShape s = ssd_shape("ssd_sequential_forward", B, T_, H, P, G, N);
    ssd_check_decay("ssd_sequential_forward", dt, A, s);
    // heads are independent: one (b, h) pair per iteration, each writing only its own y and states
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++) {
        for (int h = 0; h < H; h++) {
            const int g = h / s.heads_per_group();
            const T* S_prev = init_state ? init_state + s.state(b, h) : nullptr;  // (P, N), null = zeros
            for (int t = 0; t < T_; t++) {
                const T* xt = x + s.x(b, t, h);  // (P)
                const T* Bt = Bm + s.bc(b, t, g);  // (N)
                const T* Ct = Cm + s.bc(b, t, g);  // (N)
                const T dtt = dt[s.dt(b, t, h)];
                const T decay = std::exp(dtt * A[h]);  // in (0, 1]: the share of the old state that survives
                T* S = states + s.step_state(b, h, t);  // (P, N)
                T* yt = y + s.x(b, t, h);                // (P)
                for (int p = 0; p < P; p++) {
                    T acc = 0;
                    for (int n = 0; n < N; n++) {
                        // S_t = exp(dt·A)·S_{t−1} + dt · x_t ⊗ B_t
                        T v = dtt * xt[p] * Bt[n];
                        if (S_prev) v += decay * S_prev[(size_t)p * N + n];
                        S[(size_t)p * N + n] = v;
                        acc += v * Ct[n];  // y_t = S_t · C_t ...
                    }
                    yt[p] = acc + D[h] * xt[p];  // ... + D·x_t
                }
                S_prev = S;
            }
            if (final_state)
                for (size_t i = 0; i < s.PN(); i++) final_state[s.state(b, h) + i] = S_prev[i];
        }
    }
}

// Reverse-time loop carrying dS = ∂L/∂S_t. With a_t = dt_t·A and the step read backwards:
//   y_t = S_t·C_t + D·x_t          →  dS += dy_t ⊗ C_t,  dC_t += dy_t·S_t,  dD += dy_t·x_t
//   S_t = e^{a_t}·S_{t−1} + dt_t·x_t⊗B_t
//                                  →  dx_t = D·dy_t + dt_t·dS·B_t,  dB_t += dt_t·dSᵀx_t
//                                     ∂L/∂a_t = e^{a_t}·⟨dS, S_{t−1}⟩  →  ddt_t = A·∂L/∂a_t + ⟨dS, x_t⊗B_t⟩,
//                                                                         dA += dt_t·∂L/∂a_t
//                                     and dS ← e^{a_t}·dS becomes ∂L/∂S_{t−1}.
// dfinal_state (B,H,P,N) may be null (no gradient reaches the final state); dinit_state may be
// null (not wanted); init_state must be the one given to the forward.
template <typename T>
void ssd_sequential_backward(T* dx, T* ddt, T* dA, T* dBm, T* dCm, T* dD, T* dinit_state, T* scratch, const T* dy,
                             const T* dfinal_state, const T* states, const T* x, const T* dt, const T* A,
                             const T* Bm, const T* Cm, const T* D, const T* init_state, int B, int T_, int H,
                             int P, int G, int N) {
    const SsdShape s = ssd_shape("ssd_sequential_backward", B, T_, H, P, G, N);
    HL_CHECK(scratch, "ssd_sequential_backward: scratch must hold ssd_backward_scratch_size(B, H, P, N) elements");
    T* dS_all = scratch;                              // (B, H, P, N)
    T* partial_dA = scratch + (size_t)B * H * s.PN();  // (B, H)
    T* partial_dD = partial_dA + (size_t)B * H;        // (B, H)
    const int hpg = s.heads_per_group();
    // The heads of a group read the same B_t and C_t, so one iteration owns a (b, g) pair and all its
    // heads: their dB and dC contributions are summed by one thread, without races.
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++) {
        for (int g = 0; g < G; g++) {
            for (int t = 0; t < T_; t++) {
                zero(dBm + s.bc(b, t, g), N);
                zero(dCm + s.bc(b, t, g), N);
            }
            for (int h = g * hpg; h < (g + 1) * hpg; h++) {
                T* dS = dS_all + s.state(b, h);  // (P, N) = ∂L/∂S_t
                for (size_t i = 0; i < s.PN(); i++) dS[i] = dfinal_state ? dfinal_state[s.state(b, h) + i] : T(0);
                T dA_bh = 0, dD_bh = 0;
                for (int t = T_ - 1; t >= 0; t--) {
                    const T* S = states + s.step_state(b, h, t);  // S_t
                    const T* S_prev = t > 0 ? states + s.step_state(b, h, t - 1)
                                            : (init_state ? init_state + s.state(b, h) : nullptr);  // null = 0
                    const T* xt = x + s.x(b, t, h);
                    const T* dyt = dy + s.x(b, t, h);
                    const T* Bt = Bm + s.bc(b, t, g);
                    const T* Ct = Cm + s.bc(b, t, g);
                    T* dBt = dBm + s.bc(b, t, g);
                    T* dCt = dCm + s.bc(b, t, g);
                    T* dxt = dx + s.x(b, t, h);
                    const T dtt = dt[s.dt(b, t, h)];
                    const T decay = std::exp(dtt * A[h]);

                    // y_t = S_t · C_t + D·x_t
                    for (int p = 0; p < P; p++) {
                        for (int n = 0; n < N; n++) {
                            dS[(size_t)p * N + n] += dyt[p] * Ct[n];
                            dCt[n] += dyt[p] * S[(size_t)p * N + n];
                        }
                        dD_bh += dyt[p] * xt[p];
                    }
                    // S_t = decay·S_{t−1} + dt·x_t ⊗ B_t: the input path ...
                    T dS_xB = 0;  // ⟨dS, x_t ⊗ B_t⟩
                    for (int p = 0; p < P; p++) {
                        T dSB = 0;  // (dS · B_t)[p]
                        for (int n = 0; n < N; n++) dSB += dS[(size_t)p * N + n] * Bt[n];
                        dxt[p] = D[h] * dyt[p] + dtt * dSB;
                        dS_xB += xt[p] * dSB;
                    }
                    for (int n = 0; n < N; n++) {
                        T acc = 0;
                        for (int p = 0; p < P; p++) acc += dS[(size_t)p * N + n] * xt[p];
                        dBt[n] += dtt * acc;
                    }
                    // ... and the decay path, through a_t = dt_t·A
                    T dS_Sprev = 0;  // ⟨dS, S_{t−1}⟩
                    if (S_prev)
                        for (size_t i = 0; i < s.PN(); i++) dS_Sprev += dS[i] * S_prev[i];
                    const T da = decay * dS_Sprev;  // ∂L/∂a_t
                    ddt[s.dt(b, t, h)] = A[h] * da + dS_xB;
                    dA_bh += dtt * da;
                    // carry the gradient to the previous state: ∂L/∂S_{t−1} = decay · ∂L/∂S_t
                    for (size_t i = 0; i < s.PN(); i++) dS[i] *= decay;
                }
                if (dinit_state)
                    for (size_t i = 0; i < s.PN(); i++) dinit_state[s.state(b, h) + i] = dS[i];
                partial_dA[(size_t)b * H + h] = dA_bh;
                partial_dD[(size_t)b * H + h] = dD_bh;
            }
        }
    }
    ssd_reduce_head_grads(dA, dD, partial_dA, partial_dD, B, H);
}

// ---------------------------------------------------------------------------------------------
// 2. Chunked form
// ---------------------------------------------------------------------------------------------
// Cut time into chunks of Q steps (the last may be shorter). Inside a chunk, with a_t = dt_t·A and
// cum_i = a_0 + … + a_i (inclusive, relative to the chunk start), unrolling the recurrence gives
//   y_i   = Σ_{j≤i} exp(cum_i − cum_j)·(C_i·B_j)·dt_j·x_j    (1) intra-chunk: Y_diag = (L ⊙ C·Bᵀ)·(dt ⊙ X)
//         + exp(cum_i)·(S_in · C_i)                        (4) what the state entering the chunk adds
//         + D·x_i
//   S_out = Σ_j exp(cum_last − cum_j)·dt_j·x_j ⊗ B_j       (2) the chunk's own end state
//         + exp(cum_last)·S_in                             (3) the entering state, decayed across the chunk
// The quadratic part (1) is local to a chunk; only (3) runs sequentially over chunks.

// cum[i] = Σ_{s≤i} dt_{t0+s}·A_h for i < len: the inclusive cumulative log-decay inside one chunk, ≤ 0.
// dt points at dt[b, t0, h]; consecutive steps are H apart.
template <typename T>
void ssd_chunk_cumsum(T* cum, const T* dt, int H, T A_h, int len) {
    T run = 0;
    for (int i = 0; i < len; i++) {
        run += dt[(size_t)i * H] * A_h;
        cum[i] = run;
    }
}

// y (B,T,H,P) and chunk_states (B,H,nchunks,P,N) — the state entering each chunk, saved for the
// backward (chunk 0's is init_state or zeros) — are written; final_state too when non-null.
template <typename T>
void ssd_chunked_forward(T* y, T* chunk_states, const T* x, const T* dt, const T* A, const T* Bm, const T* Cm,
                         const T* D, const T* init_state, T* final_state, int B, int T_, int H, int P, int G, int N,
                         int Q) {
    const SsdShape s = ssd_shape("ssd_chunked_forward", B, T_, H, P, G, N);
    HL_CHECK(Q >= 1 && Q <= SSD_MAX_CHUNK, "ssd_chunked_forward: chunk length Q=", Q, " must be in [1, ",
             SSD_MAX_CHUNK, "]");
    ssd_check_decay("ssd_chunked_forward", dt, A, s);
    const int nchunks = ssd_num_chunks(T_, Q);
    const size_t PN = s.PN();
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++) {
        for (int h = 0; h < H; h++) {
            const int g = h / s.heads_per_group();
            T cum[SSD_MAX_CHUNK];
            T* states_bh = chunk_states + ((size_t)b * H + h) * nchunks * PN;  // (nchunks, P, N)
            // S_in of chunk c is states_bh[c]; S_out of chunk c is S_in of chunk c + 1, or final_state.
            auto S_out_of = [&](int c) -> T* {
                if (c + 1 < nchunks) return states_bh + (size_t)(c + 1) * PN;
                return final_state ? final_state + s.state(b, h) : nullptr;
            };
            for (size_t i = 0; i < PN; i++) states_bh[i] = init_state ? init_state[s.state(b, h) + i] : T(0);
            // (each step below recomputes the chunk's cumsum: O(Q), and it keeps the steps apart, as
            //  they are on the GPU, where (2) and (1)+(4) run over all chunks in parallel)

            // (2) each chunk's own end state, as if it started from zero:
            //     S_out = Σ_j exp(cum_last − cum_j)·dt_j·x_j ⊗ B_j
            for (int c = 0; c < nchunks; c++) {
                T* S_out = S_out_of(c);
                if (!S_out) continue;  // the last chunk, and no final_state wanted
                const int t0 = c * Q, len = T_ - t0 < Q ? T_ - t0 : Q;
                ssd_chunk_cumsum(cum, dt + s.dt(b, t0, h), H, A[h], len);
                zero(S_out, PN);
                for (int j = 0; j < len; j++) {
                    const T w = std::exp(cum[len - 1] - cum[j]) * dt[s.dt(b, t0 + j, h)];
                    const T* xj = x + s.x(b, t0 + j, h);
                    const T* Bj = Bm + s.bc(b, t0 + j, g);
                    for (int p = 0; p < P; p++)
                        for (int n = 0; n < N; n++) S_out[(size_t)p * N + n] += w * xj[p] * Bj[n];
                }
            }
            // (3) pass the states across chunks, in order: S_out += exp(cum_last)·S_in
            for (int c = 0; c < nchunks; c++) {
                T* S_out = S_out_of(c);
                if (!S_out) continue;
                const int t0 = c * Q, len = T_ - t0 < Q ? T_ - t0 : Q;
                ssd_chunk_cumsum(cum, dt + s.dt(b, t0, h), H, A[h], len);
                const T chunk_decay = std::exp(cum[len - 1]);
                const T* S_in = states_bh + (size_t)c * PN;
                for (size_t i = 0; i < PN; i++) S_out[i] += chunk_decay * S_in[i];
            }
            // (1) + (4) the outputs, chunk by chunk (independent once every S_in is known)
            for (int c = 0; c < nchunks; c++) {
                const int t0 = c * Q, len = T_ - t0 < Q ? T_ - t0 : Q;
                ssd_chunk_cumsum(cum, dt + s.dt(b, t0, h), H, A[h], len);
                const T* S_in = states_bh + (size_t)c * PN;
                for (int i = 0; i < len; i++) {
                    const T* xi = x + s.x(b, t0 + i, h);
                    const T* Ci = Cm + s.bc(b, t0 + i, g);
                    T* yi = y + s.x(b, t0 + i, h);
                    // (4) Y_off[i] = exp(cum_i)·(S_in · C_i), plus the skip D·x_i
                    const T in_decay = std::exp(cum[i]);
                    for (int p = 0; p < P; p++) {
                        T acc = 0;
                        for (int n = 0; n < N; n++) acc += S_in[(size_t)p * N + n] * Ci[n];
                        yi[p] = in_decay * acc + D[h] * xi[p];
                    }
                    // (1) Y_diag[i] = Σ_{j≤i} M[i, j]·x_j with M = L ⊙ (C·Bᵀ) ⊙ dt: row i of a causal
                    //     (len × len) matrix times the chunk's (len × P) block of x
                    for (int j = 0; j <= i; j++) {
                        const T* Bj = Bm + s.bc(b, t0 + j, g);
                        T CB = 0;  // (C·Bᵀ)[i, j]
                        for (int n = 0; n < N; n++) CB += Ci[n] * Bj[n];
                        const T M = std::exp(cum[i] - cum[j]) * CB * dt[s.dt(b, t0 + j, h)];
                        const T* xj = x + s.x(b, t0 + j, h);
                        for (int p = 0; p < P; p++) yi[p] += M * xj[p];
                    }
                }
            }
        }
    }
}

// Backward of the chunked form, from the saved chunk_states only (no per-step state is rebuilt).
// Chunks are visited last to first carrying dS = ∂L/∂S_out of the current chunk. Inside a chunk
// every step (1)-(4) of the forward is differentiated as the sum it is; the log-decays collect
// their gradient in dcum[i] = ∂L/∂cum_i, and since cum_i = Σ_{s≤i} a_s, ∂L/∂a_s = Σ_{i≥s} dcum[i]
// (a reverse cumulative sum), which then splits into ddt (a = dt·A: ·A) and dA (·dt).
// Same arguments and conventions as ssd_sequential_backward, with chunk_states for states.
template <typename T>
void ssd_chunked_backward(T* dx, T* ddt, T* dA, T* dBm, T* dCm, T* dD, T* dinit_state, T* scratch, const T* dy,
                          const T* dfinal_state, const T* chunk_states, const T* x, const T* dt, const T* A,
                          const T* Bm, const T* Cm, const T* D, int B, int T_, int H, int P, int G, int N, int Q) {
    const SsdShape s = ssd_shape("ssd_chunked_backward", B, T_, H, P, G, N);
    HL_CHECK(Q >= 1 && Q <= SSD_MAX_CHUNK, "ssd_chunked_backward: chunk length Q=", Q, " must be in [1, ",
             SSD_MAX_CHUNK, "]");
    HL_CHECK(scratch, "ssd_chunked_backward: scratch must hold ssd_backward_scratch_size(B, H, P, N) elements");
    const int nchunks = ssd_num_chunks(T_, Q);
    const size_t PN = s.PN();
    T* dS_all = scratch;                            // (B, H, P, N)
    T* partial_dA = scratch + (size_t)B * H * PN;  // (B, H)
    T* partial_dD = partial_dA + (size_t)B * H;    // (B, H)
    const int hpg = s.heads_per_group();
    // one iteration owns a (b, g) pair and all heads of the group, so dB and dC sum without races
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++) {
        for (int g = 0; g < G; g++) {
            T cum[SSD_MAX_CHUNK], dcum[SSD_MAX_CHUNK];
            for (int t = 0; t < T_; t++) {
                zero(dBm + s.bc(b, t, g), N);
                zero(dCm + s.bc(b, t, g), N);
            }
            for (int h = g * hpg; h < (g + 1) * hpg; h++) {
                T* dS = dS_all + s.state(b, h);  // (P, N) = ∂L/∂S_out of the current chunk
                for (size_t i = 0; i < PN; i++) dS[i] = dfinal_state ? dfinal_state[s.state(b, h) + i] : T(0);
                T dA_bh = 0, dD_bh = 0;
                for (int c = nchunks - 1; c >= 0; c--) {
                    const int t0 = c * Q, len = T_ - t0 < Q ? T_ - t0 : Q;
                    const T* S_in = chunk_states + (((size_t)b * H + h) * nchunks + c) * PN;
                    ssd_chunk_cumsum(cum, dt + s.dt(b, t0, h), H, A[h], len);
                    for (int i = 0; i < len; i++) dcum[i] = 0;
                    const T cum_last = cum[len - 1];

                    // skip connection y_i += D·x_i (this also initialises dx and ddt of the chunk)
                    for (int i = 0; i < len; i++) {
                        const T* xi = x + s.x(b, t0 + i, h);
                        const T* dyi = dy + s.x(b, t0 + i, h);
                        T* dxi = dx + s.x(b, t0 + i, h);
                        for (int p = 0; p < P; p++) {
                            dxi[p] = D[h] * dyi[p];
                            dD_bh += dyi[p] * xi[p];
                        }
                        ddt[s.dt(b, t0 + i, h)] = 0;
                    }

                    // (1) Y_diag[i] = Σ_{j≤i} exp(cum_i − cum_j)·(C_i·B_j)·dt_j·x_j. For each pair with
                    //     L = exp(cum_i − cum_j), CB = C_i·B_j and G_ij = dy_i·x_j, the term's value
                    //     in the loss is v = L·CB·dt_j·G_ij.
                    for (int i = 0; i < len; i++) {
                        const T* dyi = dy + s.x(b, t0 + i, h);
                        const T* Ci = Cm + s.bc(b, t0 + i, g);
                        T* dCi = dCm + s.bc(b, t0 + i, g);
                        for (int j = 0; j <= i; j++) {
                            const T* xj = x + s.x(b, t0 + j, h);
                            const T* Bj = Bm + s.bc(b, t0 + j, g);
                            T* dxj = dx + s.x(b, t0 + j, h);
                            T* dBj = dBm + s.bc(b, t0 + j, g);
                            const T dtj = dt[s.dt(b, t0 + j, h)];
                            const T L = std::exp(cum[i] - cum[j]);
                            T CB = 0, Gij = 0;
                            for (int n = 0; n < N; n++) CB += Ci[n] * Bj[n];
                            for (int p = 0; p < P; p++) Gij += dyi[p] * xj[p];
                            const T M = L * CB * dtj;  // the (i, j) entry of L ⊙ (C·Bᵀ) ⊙ dt
                            for (int p = 0; p < P; p++) dxj[p] += M * dyi[p];
                            for (int n = 0; n < N; n++) {
                                dCi[n] += L * dtj * Gij * Bj[n];
                                dBj[n] += L * dtj * Gij * Ci[n];
                            }
                            ddt[s.dt(b, t0 + j, h)] += L * CB * Gij;
                            const T v = M * Gij;  // ∂v/∂cum_i = v, ∂v/∂cum_j = −v
                            dcum[i] += v;
                            dcum[j] -= v;
                        }
                    }

                    // (4) Y_off[i] = exp(cum_i)·(S_in · C_i)
                    for (int i = 0; i < len; i++) {
                        const T* dyi = dy + s.x(b, t0 + i, h);
                        const T* Ci = Cm + s.bc(b, t0 + i, g);
                        T* dCi = dCm + s.bc(b, t0 + i, g);
                        const T in_decay = std::exp(cum[i]);
                        T v = 0;  // dy_i · (S_in·C_i), its value in the loss before the decay
                        for (int n = 0; n < N; n++) {
                            T dyS = 0;  // (dy_iᵀ · S_in)[n]
                            for (int p = 0; p < P; p++) dyS += dyi[p] * S_in[(size_t)p * N + n];
                            dCi[n] += in_decay * dyS;
                            v += dyS * Ci[n];
                        }
                        dcum[i] += in_decay * v;
                        // (its gradient for S_in joins dS below, once dS = ∂L/∂S_out is used up)
                    }

                    // (2) S_out = Σ_j exp(cum_last − cum_j)·dt_j·x_j ⊗ B_j   (+ (3) below)
                    for (int j = 0; j < len; j++) {
                        const T* xj = x + s.x(b, t0 + j, h);
                        const T* Bj = Bm + s.bc(b, t0 + j, g);
                        T* dxj = dx + s.x(b, t0 + j, h);
                        T* dBj = dBm + s.bc(b, t0 + j, g);
                        const T dtj = dt[s.dt(b, t0 + j, h)];
                        const T w = std::exp(cum_last - cum[j]);
                        T dS_xB = 0;  // ⟨dS, x_j ⊗ B_j⟩
                        for (int p = 0; p < P; p++) {
                            T dSB = 0;  // (dS · B_j)[p]
                            for (int n = 0; n < N; n++) dSB += dS[(size_t)p * N + n] * Bj[n];
                            dxj[p] += w * dtj * dSB;
                            dS_xB += xj[p] * dSB;
                        }
                        for (int n = 0; n < N; n++) {
                            T acc = 0;
                            for (int p = 0; p < P; p++) acc += dS[(size_t)p * N + n] * xj[p];
                            dBj[n] += w * dtj * acc;
                        }
                        ddt[s.dt(b, t0 + j, h)] += w * dS_xB;
                        const T v = w * dtj * dS_xB;  // ∂v/∂cum_last = v, ∂v/∂cum_j = −v
                        dcum[len - 1] += v;
                        dcum[j] -= v;
                    }

                    // (3) S_out += exp(cum_last)·S_in
                    const T chunk_decay = std::exp(cum_last);
                    T dS_Sin = 0;  // ⟨dS, S_in⟩
                    for (size_t i = 0; i < PN; i++) dS_Sin += dS[i] * S_in[i];
                    dcum[len - 1] += chunk_decay * dS_Sin;

                    // dS becomes ∂L/∂S_in = exp(cum_last)·∂L/∂S_out (3) + Σ_i exp(cum_i)·dy_i ⊗ C_i (4),
                    // which is ∂L/∂S_out of the previous chunk
                    for (size_t i = 0; i < PN; i++) dS[i] *= chunk_decay;
                    for (int i = 0; i < len; i++) {
                        const T* dyi = dy + s.x(b, t0 + i, h);
                        const T* Ci = Cm + s.bc(b, t0 + i, g);
                        const T in_decay = std::exp(cum[i]);
                        for (int p = 0; p < P; p++)
                            for (int n = 0; n < N; n++) dS[(size_t)p * N + n] += in_decay * dyi[p] * Ci[n];
                    }

                    // cum_i = Σ_{s≤i} a_s  ⇒  ∂L/∂a_s = Σ_{i≥s} dcum[i];  a_s = dt_s·A
                    T da = 0;
                    for (int i = len - 1; i >= 0; i--) {
                        da += dcum[i];
                        ddt[s.dt(b, t0 + i, h)] += A[h] * da;
                        dA_bh += dt[s.dt(b, t0 + i, h)] * da;
                    }
                }
                if (dinit_state)
                    for (size_t i = 0; i < PN; i++) dinit_state[s.state(b, h) + i] = dS[i];
                partial_dA[(size_t)b * H + h] = dA_bh;
                partial_dD[(size_t)b * H + h] = dD_bh;
            }
        }
    }
    ssd_reduce_head_grads(dA, dD, partial_dA, partial_dD, B, H);
}

// ---------------------------------------------------------------------------------------------
// 3. The matrix the scan implements (for reading and for pictures, not for training)
// ---------------------------------------------------------------------------------------------

// From a zero state the scan is a lower-triangular (semiseparable) matrix acting on x along time:
//   y_i = Σ_{j ≤ i} M[i, j] · x_j + D_h · x_i,   M[i, j] = (C_i · B_j) · exp(Σ_{j<s≤i} dt_s·A_h) · dt_j
// M (T, T) of batch row b and head h is written (zeros above the diagonal) — attention's softmax matrix
// has the same place in an attention layer. The log-decay sums are running sums, so this is O(T²·N).
template <typename T>
void ssd_mixing_matrix(T* M, const T* dt, const T* A, const T* Bm, const T* Cm, int b, int h, int B, int T_, int H,
                       int G, int N) {
    HL_CHECK(b >= 0 && b < B && h >= 0 && h < H && G > 0 && H % G == 0 && T_ > 0 && N > 0,
             "ssd_mixing_matrix: bad sizes b=", b, " h=", h, " B=", B, " T=", T_, " H=", H, " G=", G, " N=", N);
    const int g = h / (H / G);
    for (int i = 0; i < T_; i++) {
        const T* Ci = Cm + (((size_t)b * T_ + i) * G + g) * N;
        T seg = 0;  // Σ_{j<s≤i} dt_s·A: grows as j walks down from i
        for (int j = i; j >= 0; j--) {
            const T* Bj = Bm + (((size_t)b * T_ + j) * G + g) * N;
            T CB = 0;
            for (int n = 0; n < N; n++) CB += Ci[n] * Bj[n];
            M[(size_t)i * T_ + j] = CB * std::exp(seg) * dt[((size_t)b * T_ + j) * H + h];
            seg += dt[((size_t)b * T_ + j) * H + h] * A[h];
        }
        for (int j = i + 1; j < T_; j++) M[(size_t)i * T_ + j] = T(0);
    }
}

}  // namespace hl
