// ssd.cuh — the chunked SSD scan of Mamba-2 on the GPU, forward and backward. It mirrors the chunked
// form of model/ssd.h (same function names, same argument order, same math; read that file first):
// time is cut into chunks of Q steps, and per (batch b, chunk c, head h), with a_t = dt_t·A_h and
// cum_i = a_0 + … + a_i inside the chunk,
//   y_i   = Σ_{j≤i} exp(cum_i − cum_j)·(C_i·B_j)·dt_j·x_j      (1) Y_diag = (L ⊙ C·Bᵀ)·(dt ⊙ X)
//         + exp(cum_i)·(S_in · C_i)                          (4) Y_off
//         + D_h·x_i
//   S_out = Σ_j exp(cum_last − cum_j)·dt_j·x_j ⊗ B_j          (2) the chunk's own end state
//         + exp(cum_last)·S_in                               (3) state passing across chunks
// Per-step states are never materialised; only the state entering each chunk is (chunk_states).
// Every exp() is of a non-positive number (clamped with fminf(·, 0) against rounding).
//
// Kernels (all blocks NT = 256 threads; every product of two matrices is a block tile of 64 rows ×
// 64 or 128 columns computed from shared-memory K slices, 4 × (BN/16) outputs per thread: block_gemm, on
// fp32 FMAs, or on the tensor cores with bf16 operands — block_gemm_tc, Dims::tc, when ssd_tensor_cores();
// both fetch the next K slice into registers while the current one is multiplied. On the tensor cores, every kernel
// with a product has one of its own instead (..._tc_kernel: bf16 tiles staged from float4 loads, mma.sync fragments
// from kernels/mma.cuh, the decay mask applied to the scores in registers):
//   forward   1. chunk_state   per (b, c, h, 64 rows of P): (2) S_local = Xᵀ·diag(w)·B
//             2. state_pass    per (b, h, slice of P·N): (3) sequential over chunks, in place
//             3. chunk_output  per (b, c, h, 64 steps): (4) + (1) + D·x
//   backward  1. chunk_state   (again, on dy and C): Σ_i exp(cum_i)·dy_i ⊗ C_i, each chunk's share of dS_in
//             2. state_pass_bwd  reverse pass: dS_out of every chunk, and ⟨dS_out, S_in⟩ per chunk
//             3. bwd_dx        per (b, c, h, 64 steps j): dx, and the direct part of ddt
//             4. bwd_dB        per (b, c, g, head slice, 64 steps j): dB (heads of the group summed)
//             5. bwd_dC        per (b, c, g, head slice, 64 steps i): dC, and ⟨C_i, dC_i⟩ per head
//             6. sum_slices    (only if a group has several head slices) dB, dC = Σ over slices
//             7. bwd_finalize  per (b, c, h): ∂L/∂cum → reverse cumsum → ddt, partial dA and dD
//             8. head_grads    dA, dD += the partial sums, in a fixed order (deterministic)
//
// How the backward avoids differentiating the decays term by term: x_j, B_j and dt_j enter the
// scan only through the product dt_j·x_j ⊗ B_j, and C_i only through y_i − D·x_i, so with
// dC^h = head h's share of dC,
//   ∂L/∂cum_i = ⟨C_i, dC^h_i⟩ − dt_i·ddt_direct_i + [i = last]·(Σ_j v_j + exp(cum_last)·⟨dS_out, S_in⟩)
// where ddt_direct_j = ⟨x_j, ∂L/∂(dt_j x_j)⟩ (the non-decay part of ddt, from the dx kernel) and
// v_j = exp(cum_last − cum_j)·dt_j·⟨dS_out, x_j ⊗ B_j⟩. Then ∂L/∂a_s = Σ_{i≥s} ∂L/∂cum_i, which gives
// ddt_s += A·∂L/∂a_s and dA += Σ_s dt_s·∂L/∂a_s, as on the CPU.
//
// Supported: 1 ≤ Q ≤ 256 (SSD_MAX_CHUNK), 1 ≤ P ≤ 128, 1 ≤ N ≤ 128, any G dividing H, B·H ≤ 65535,
// nchunks ≤ 65535. A ≤ 0 and dt ≥ 0 are the caller's contract (the CPU version checks them; the GPU
// cannot without a sync). fp32 storage; the kernels are templated on the storage type T with fp32
// accumulation and fp32 scratch. Under bf16 operands (a Bf16Scope, kernels/matmul.cuh) and ssd_tensor_cores()
// (train_gpu turns it on under bf16: see there) the block GEMMs round their operands to bf16 and run on the tensor
// cores; cumsums, decays and every accumulation stay fp32. Under bf16 operands Mamba-2 also hands the scan x, B, C
// and dy in bf16 and takes y and the chunk states so (X, DY, Y, ST: bf16 under T = float), in half the bytes; every
// product rounds them to bf16 anyway, and the other reads take the same values an fp32 tensor holding them gives
// (but the backward's ⟨dS_out, S_in⟩, which then reads the rounded states).
// Parameter gradients dA, dD accumulate (+=); every other gradient is written.
#pragma once
#include <cstddef>             // size_t
#include <cuda_runtime.h>      // cudaStream_t, kernel launches, expf / fminf on the device
#include <atomic>              // tc_fallbacks, the count of launches that could not take the tensor cores
#include <cstdint>             // uintptr_t
#include <cstdio>              // std::fprintf: the note when the tensor-core kernels do not fit
#include <initializer_list>    // tc_fits' lists of pointers
#include <type_traits>         // std::is_same_v (the tensor-core kernels read fp32 storage), integral_constant
#include <mma.h>               // nvcuda::wmma: block_gemm on the tensor cores (bf16 runs)
#include "kernels/common.cuh"  // cudaCheckLast, ceil_div, allow_smem, warp_sum
#include "kernels/mma.cuh"     // mma:: fragments and tile products of the tensor-core kernels
#include "kernels/matmul.cuh"  // bf16, current_bf16: whether bf16 operands are in effect
#include "model/common.h"      // HL_CHECK
#include "model/ssd.h"         // ssd_shape, ssd_num_chunks, SSD_MAX_CHUNK: the CPU reference this mirrors

namespace hl::gpu {

namespace ssd_detail {

constexpr int NT = 256;       // threads per block, in every kernel here
constexpr int BM = 64;        // rows of a block tile (time steps, or rows p of a state)
constexpr int KT = 16;        // depth of one shared-memory K slice of a block GEMM
constexpr int TM = 4;         // rows per thread: 16 thread rows × 4 = BM
constexpr int TX = 16;        // threads along a tile's columns (NT / TX = 16 thread rows)
constexpr int PAD = 4;        // shared-memory row padding (keeps rows 16-byte aligned, spreads banks)
constexpr int MAX_FEAT = 128; // largest P and N: one block tile spans all of them
constexpr int PASS_ELEMS = 4; // state elements per thread in the state-passing kernels
constexpr int PASS_AHEAD = 4; // ... and how many chunks ahead they load
// Blocks an SM must hold of each block-GEMM kernel: __launch_bounds__(NT, GEMM_MIN_BLOCKS) caps them at 128
// registers. Left alone, ptxas gave them 135–249, one block (8 warps) an SM, and they stalled on memory latency
// with nothing else to run; at 2 they spill 4–480 bytes and the scan is 25% faster (100m layer, Q = 64, H200:
// fwd+bwd 8.89 → 6.63 ms). 3 (80 registers) spills up to 1.5 KB and is slower again.
constexpr int GEMM_MIN_BLOCKS = 2;
// The same for the tensor-core kernels, which were bound by the latency of staging their tiles (load, round, store,
// barrier, multiply: nothing overlaps inside a block), so more blocks an SM pay even at a few spilled registers.
// (Since session 24 bf16 tiles are copied by cp.async, two in flight, which took the scan at the 100m layer from
// 2.69 to 2.10 ms; the block counts were not measured again after it.)
// H200, dev/cuda/ssd.cu, 100m layer (Q = 64) / 350m layer (Q = 256), ms at 2 → 3 blocks (chunk_state 2 → 4):
// chunk_state 0.370 → 0.232 / 0.187 → 0.128, chunk_output 0.469 → 0.391 / 0.526 → 0.406, dx 0.570 → 0.542 /
// 0.566 → 0.504, dB 0.427 → 0.381 / 0.539 → 0.466. dC stays at 2: its 87 KB of shared memory allow no third
// block, and the tighter register cap alone made it slower (0.517 → 0.534).
constexpr int TC_MIN_BLOCKS = 3;        // chunk_output, dx, dB on the tensor cores (≤ 85 registers)
constexpr int TC_STATE_MIN_BLOCKS = 4;  // chunk_state on the tensor cores (≤ 64 registers, no spills)
static_assert(NT >= SSD_MAX_CHUNK, "the chunk cumsum gives each step of a chunk its own thread");
static_assert(NT == TX * (BM / TM), "thread layout of a block tile");

// Sizes and row-major offsets, the device twin of SsdShape in model/ssd.h (plus Q and nchunks).
struct Dims {
    int B, T_, H, P, G, N, Q, nchunks;
    bool tc = false;  // every block_gemm on the tensor cores (ssd_tensor_cores() and bf16 operands in effect)
    __host__ __device__ int hpg() const { return H / G; }  // heads per group
    __host__ __device__ size_t PN() const { return (size_t)P * N; }
    // the state passes' blocks per (b, h), each walking PASS_ELEMS·NT of the P·N state elements through the chunks
    __host__ __device__ int pass_blocks() const { return (int)((PN() + PASS_ELEMS * NT - 1) / (PASS_ELEMS * NT)); }
    __host__ __device__ size_t x(int b, int t, int h) const { return (((size_t)b * T_ + t) * H + h) * P; }   // (B,T,H,P)
    __host__ __device__ size_t dt(int b, int t, int h) const { return ((size_t)b * T_ + t) * H + h; }        // (B,T,H)
    __host__ __device__ size_t bc(int b, int t, int g) const { return (((size_t)b * T_ + t) * G + g) * N; }  // (B,T,G,N)
    // the (P, N) state of chunk c of (b, h) inside a (B, H, nchunks, P, N) tensor, bh = b·H + h
    __host__ __device__ size_t chunk(int bh, int c) const { return ((size_t)bh * nchunks + c) * PN(); }
    __host__ __device__ int chunk_len(int c) const { return T_ - c * Q < Q ? T_ - c * Q : Q; }
};

// The feature tile width for a dimension of n ≤ 128 columns: 64 or 128 (one block covers all of them).
inline int feat_tile(int n) { return n <= 64 ? 64 : 128; }

// exp of a log-decay difference that is ≤ 0 in exact arithmetic; the clamp keeps rounding from
// ever producing a factor above 1.
__device__ __forceinline__ float decay_exp(float v) { return expf(fminf(v, 0.f)); }

// cum[i] = Σ_{s≤i} dt[s]·A_h for the len ≤ NT steps of one chunk (Hillis–Steele scan in shared
// memory, one step per thread), and sdt[i] = dt[s]. Steps i ≥ len get dt 0, so cum[i] = cum[len−1].
// dt_c points at dt[b, t0, h]; consecutive steps are H apart. Called by all NT threads; starts
// by writing cum/sdt (the caller must be past any earlier reader) and ends with a barrier.
template <typename T>
__device__ void chunk_cumsum(float* cum, float* sdt, const T* dt_c, int H, float A_h, int len) {
    const int i = threadIdx.x;
    const float d = i < len ? float(dt_c[(size_t)i * H]) : 0.f;
    sdt[i] = d;
    cum[i] = d * A_h;
    for (int off = 1; off < NT; off <<= 1) {
        __syncthreads();
        const float v = i >= off ? cum[i - off] : 0.f;
        __syncthreads();
        cum[i] += v;
    }
    __syncthreads();
}

// Σ of v over the block's NT threads, returned to every thread (tree in shared memory red[NT];
// fixed order, so deterministic). Called by all threads; red is free again on return.
__device__ inline float block_sum(float v, float* red) {
    const int tid = threadIdx.x;
    red[tid] = v;
    __syncthreads();
    for (int s = NT / 2; s > 0; s >>= 1) {
        if (tid < s) red[tid] += red[tid + s];
        __syncthreads();
    }
    const float r = red[0];
    __syncthreads();
    return r;
}

// Row sums of a block tile: part[r] is this thread's partial sum for tile row ty·TM + r (over its
// columns). Returns the full row sum for row tid (valid for tid < BM). red is a (BM, ≥ TX) shared
// array of row stride RS; free again on return.
template <int RS>
__device__ inline float tile_row_sum(const float (&part)[TM], float (*red)[RS]) {
    static_assert(RS >= TX, "row buffer too narrow");
    const int tid = threadIdx.x, tx = tid % TX, ty = tid / TX;
#pragma unroll
    for (int r = 0; r < TM; r++) red[ty * TM + r][tx] = part[r];
    __syncthreads();
    float s = 0.f;
    if (tid < BM)
        for (int k = 0; k < TX; k++) s += red[tid][k];
    __syncthreads();
    return s;
}

// The block GEMM every kernel here is built from:
//   acc (this thread's TM × BN/16 share of a BM × BN tile) += Σ_{k<K} A(m, k)·B(k, n)
// fa(m, k) and fb(k, n) fetch one element as float and return 0 outside the valid rows/columns
// (so tiles need no special edge code); k ≥ K is zeroed here. Each K slice of KT is staged in
// shared memory k-major (sa[k][m], sb[k][n]); thread (ty, tx) = (tid / 16, tid % 16) then owns rows
// ty·TM.. and columns tx·(BN/16).., reading a column of sa and a row of sb per k: TM + BN/16 loads for
// TM·BN/16 FMAs. A_KC / B_KC say whether the source is contiguous along k (true) or along m / n
// (false): the loader then lets consecutive threads read consecutive addresses (coalesced).
// sb may be wider than BN (one buffer serves the 64- and the 128-wide GEMMs of a kernel).
// Called by all threads; starts and ends with the staging buffers free.
template <int BN, bool A_KC, bool B_KC, int SBW, class FA, class FB>
__device__ void block_gemm_tc(float (&acc)[TM][BN / TX], int K, const FA& fa, const FB& fb, float (*sa)[BM + PAD],
                              float (*sb)[SBW]);

template <int BN, bool A_KC, bool B_KC, int SBW, class FA, class FB>
__device__ void block_gemm(float (&acc)[TM][BN / TX], int K, const FA& fa, const FB& fb, float (*sa)[BM + PAD],
                           float (*sb)[SBW], bool tc) {
    if (tc) return block_gemm_tc<BN, A_KC, B_KC>(acc, K, fa, fb, sa, sb);
    constexpr int TN = BN / TX, NA = KT * BM / NT, NB = KT * BN / NT;  // elements a thread stages per slice
    static_assert(SBW >= BN, "staging buffer too narrow");
    static_assert(KT * BM % NT == 0 && KT * BN % NT == 0, "every thread stages the same number of elements");
    const int tid = threadIdx.x, tx = tid % TX, ty = tid / TX;
    // The next K slice is fetched into registers while the current one is multiplied, so that the fetch's
    // global-memory latency overlaps the FMAs instead of stalling every slice.
    float next_a[NA], next_b[NB];
    auto fetch = [&](int k0) {
#pragma unroll
        for (int u = 0; u < NA; u++) {
            const int e = tid + u * NT, kk = A_KC ? e % KT : e / BM, m = A_KC ? e / KT : e % BM;
            next_a[u] = k0 + kk < K ? fa(m, k0 + kk) : 0.f;
        }
#pragma unroll
        for (int u = 0; u < NB; u++) {
            const int e = tid + u * NT, kk = B_KC ? e % KT : e / BN, n = B_KC ? e / KT : e % BN;
            next_b[u] = k0 + kk < K ? fb(k0 + kk, n) : 0.f;
        }
    };
    fetch(0);
    for (int k0 = 0; k0 < K; k0 += KT) {
#pragma unroll
        for (int u = 0; u < NA; u++) {
            const int e = tid + u * NT;
            sa[A_KC ? e % KT : e / BM][A_KC ? e / KT : e % BM] = next_a[u];
        }
#pragma unroll
        for (int u = 0; u < NB; u++) {
            const int e = tid + u * NT;
            sb[B_KC ? e % KT : e / BN][B_KC ? e / KT : e % BN] = next_b[u];
        }
        __syncthreads();
        if (k0 + KT < K) fetch(k0 + KT);
#pragma unroll
        for (int kk = 0; kk < KT; kk++) {
            float av[TM], bv[TN];
#pragma unroll
            for (int r = 0; r < TM; r++) av[r] = sa[kk][ty * TM + r];
#pragma unroll
            for (int c = 0; c < TN; c++) bv[c] = sb[kk][tx * TN + c];
#pragma unroll
            for (int r = 0; r < TM; r++)
#pragma unroll
                for (int c = 0; c < TN; c++) acc[r][c] += av[r] * bv[c];
        }
        __syncthreads();
    }
}

// block_gemm on the tensor cores (Dims::tc: bf16 runs), the same product and the same acc layout: each K slice
// is staged as bf16 in the same buffers (k-major, so A is a column-major fragment and B a row-major one), the 8
// warps each keep BN/32 fp32 accumulator fragments of 16 × 16 (warp w: rows 16·(w % 4), column blocks from
// (w / 4)·BN/32), and at the end the tile passes through sb, 16 rows at a time, into the threads' acc.
// The staging buffers must be 32-byte aligned (wmma), as every kernel here declares them.
template <int BN, bool A_KC, bool B_KC, int SBW, class FA, class FB>
__device__ void block_gemm_tc(float (&acc)[TM][BN / TX], int K, const FA& fa, const FB& fb, float (*sa)[BM + PAD],
                              float (*sb)[SBW]) {
    using namespace nvcuda;
    constexpr int TN = BN / TX, F = BN / 32, LDA = BM + 8, LDB = BN + 8;
    static_assert(LDA * sizeof(bf16) <= (BM + PAD) * sizeof(float) && LDB * sizeof(bf16) <= SBW * sizeof(float) &&
                      KT == 16 && SBW % 4 == 0 && BN % 32 == 0,
                  "bf16 staging fits the float buffers; one 16-deep K slice a step; fp32 rows of sb for wmma");
    bf16* sa16 = reinterpret_cast<bf16*>(&sa[0][0]);  // (KT, LDA): A(m, k) at [k][m]
    bf16* sb16 = reinterpret_cast<bf16*>(&sb[0][0]);  // (KT, LDB): B(k, n) at [k][n]
    const int tid = threadIdx.x, warp = tid / 32, rb = warp % 4, cb0 = (warp / 4) * F;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> c[F];
#pragma unroll
    for (int f = 0; f < F; f++) wmma::fill_fragment(c[f], 0.f);
    constexpr int NA = KT * BM / NT, NB = KT * BN / NT;
    float next_a[NA], next_b[NB];  // the next K slice, fetched while the current one is multiplied (as in block_gemm)
    auto fetch = [&](int k0) {
#pragma unroll
        for (int u = 0; u < NA; u++) {
            const int e = tid + u * NT, kk = A_KC ? e % KT : e / BM, m = A_KC ? e / KT : e % BM;
            next_a[u] = k0 + kk < K ? fa(m, k0 + kk) : 0.f;
        }
#pragma unroll
        for (int u = 0; u < NB; u++) {
            const int e = tid + u * NT, kk = B_KC ? e % KT : e / BN, n = B_KC ? e / KT : e % BN;
            next_b[u] = k0 + kk < K ? fb(k0 + kk, n) : 0.f;
        }
    };
    fetch(0);
    for (int k0 = 0; k0 < K; k0 += KT) {
#pragma unroll
        for (int u = 0; u < NA; u++) {
            const int e = tid + u * NT;
            sa16[(A_KC ? e % KT : e / BM) * LDA + (A_KC ? e / KT : e % BM)] = __float2bfloat16_rn(next_a[u]);
        }
#pragma unroll
        for (int u = 0; u < NB; u++) {
            const int e = tid + u * NT;
            sb16[(B_KC ? e % KT : e / BN) * LDB + (B_KC ? e / KT : e % BN)] = __float2bfloat16_rn(next_b[u]);
        }
        __syncthreads();
        if (k0 + KT < K) fetch(k0 + KT);
        wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::col_major> a;
        wmma::load_matrix_sync(a, sa16 + rb * 16, LDA);
#pragma unroll
        for (int f = 0; f < F; f++) {
            wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> bm;
            wmma::load_matrix_sync(bm, sb16 + (cb0 + f) * 16, LDB);
            wmma::mma_sync(c[f], a, bm, c[f]);
        }
        __syncthreads();
    }
    const int tx = tid % TX, ty = tid / TX;
    float* st = &sb[0][0];  // (16, SBW) floats: one 16-row block of the tile at a time
    for (int r16 = 0; r16 < BM / 16; r16++) {
        if (rb == r16)
#pragma unroll
            for (int f = 0; f < F; f++) wmma::store_matrix_sync(st + (cb0 + f) * 16, c[f], SBW, wmma::mem_row_major);
        __syncthreads();
        if ((ty * TM) / 16 == r16)
#pragma unroll
            for (int r = 0; r < TM; r++)
#pragma unroll
                for (int cc = 0; cc < TN; cc++) acc[r][cc] += st[(ty * TM + r - 16 * r16) * SBW + tx * TN + cc];
        __syncthreads();
    }
}

template <int BN>
__device__ __forceinline__ void zero_acc(float (&acc)[TM][BN / TX]) {
#pragma unroll
    for (int r = 0; r < TM; r++)
#pragma unroll
        for (int c = 0; c < BN / TX; c++) acc[r][c] = 0.f;
}

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------

// Where chunk_state's result for chunk c of bh goes: a dS or state slot, or (the first chunk backward, the last
// forward) the end tensor; false when that end tensor is null (nothing to compute).
template <bool BWD, typename S, typename E>
__device__ inline bool chunk_state_dst(S*& slot, E*& end_out, S* slots, E* end, const Dims& d, int bh, int c) {
    slot = nullptr;
    end_out = nullptr;
    const int c_slot = BWD ? c - 1 : c + 1;  // the neighbouring chunk whose slot holds the result
    if (c_slot >= 0 && c_slot < d.nchunks) slot = slots + d.chunk(bh, c_slot);
    else if (end) end_out = end + (size_t)bh * d.PN();
    else return false;
    return true;
}

// w[t] of chunk_state: forward exp(cum_last − cum_t)·dt_t, backward exp(cum_t); 0 past the chunk. All threads;
// ends with a barrier.
template <bool BWD>
__device__ inline void chunk_state_weights(float* w, const float* cum, const float* sdt, int len) {
    const int i = threadIdx.x;
    w[i] = i >= len ? 0.f : BWD ? decay_exp(cum[i]) : decay_exp(cum[len - 1] - cum[i]) * sdt[i];
    __syncthreads();
}

// Chunk-local outer-product sum, the (2) of the forward and its mirror in the backward:
//   out (P, N) = Σ_{t<len} w_t · U[t, :]ᵀ ⊗ V[t, :]
//   forward  (BWD = false): U = x, V = Bm, w_t = exp(cum_last − cum_t)·dt_t: the chunk's end state from
//            zero. Written to chunk_states[c + 1] (= S_in of the next chunk, completed by state_pass; with bf16
//            chunk states to the fp32 local_states[c + 1], which state_pass reads),
//            or to final_state for the last chunk (skipped when final_state is null).
//   backward (BWD = true):  U = dy, V = Cm, w_t = exp(cum_t): the chunk's own share of ∂L/∂S_in.
//            Written to dS slot c − 1 (= ∂L/∂S_out of the previous chunk, completed by
//            state_pass_bwd), or to dinit_state for chunk 0 (skipped when null).
// Grid (ceil(P/64), nchunks, B·H): one block per 64 rows p of one chunk's (P, N) state, all N
// columns (BN ≥ N), K = the chunk's steps. A GEMM with M = P, N = N, K = len — shaped so, because the
// output is tiny (P·N) and the K dimension is the chunk.
template <typename T, typename S, int BN, bool BWD, typename UT, typename VT>
__global__ void __launch_bounds__(NT, GEMM_MIN_BLOCKS)
ssd_chunk_state_kernel(S* slots, T* end, const UT* U, const T* dt, const T* A, const VT* V, Dims d) {
    const int c = blockIdx.y, bh = blockIdx.z, b = bh / d.H, h = bh % d.H, g = h / d.hpg();
    const int t0 = c * d.Q, len = d.chunk_len(c), p0 = blockIdx.x * BM;
    // where this chunk's result goes (a whole block leaves at once, before any barrier)
    S* dst_slot;
    T* dst_end;
    if (!chunk_state_dst<BWD>(dst_slot, dst_end, slots, end, d, bh, c)) return;
    __shared__ float cum[NT], sdt[NT], w[NT];
    __shared__ __align__(32) float sa[KT][BM + PAD];  // (aligned for block_gemm_tc)
    __shared__ __align__(32) float sb[KT][BN + PAD];
    chunk_cumsum(cum, sdt, dt + d.dt(b, t0, h), d.H, float(A[h]), len);
    chunk_state_weights<BWD>(w, cum, sdt, len);

    float acc[TM][BN / TX];
    zero_acc<BN>(acc);
    const int P = d.P, N = d.N;
    // A(m = p, k = t) = w_t·U[t, p0 + m]: contiguous along p;  B(k = t, n) = V[t, n]: contiguous along n
    auto fa = [&](int m, int k) { return p0 + m < P ? w[k] * float(U[d.x(b, t0 + k, h) + p0 + m]) : 0.f; };
    auto fb = [&](int k, int n) { return n < N ? float(V[d.bc(b, t0 + k, g) + n]) : 0.f; };
    block_gemm<BN, false, false>(acc, len, fa, fb, sa, sb, d.tc);

    const int tx = threadIdx.x % TX, ty = threadIdx.x / TX;
#pragma unroll
    for (int r = 0; r < TM; r++) {
        const int p = p0 + ty * TM + r;
        if (p >= P) continue;
#pragma unroll
        for (int cc = 0; cc < BN / TX; cc++) {
            const int n = tx * (BN / TX) + cc;
            if (n >= N) continue;
            if (dst_slot) dst_slot[(size_t)p * N + n] = S(acc[r][cc]);
            else dst_end[(size_t)p * N + n] = T(acc[r][cc]);
        }
    }
}

// The scale of a tile staged as it is (stage_bf16's rows not multiplied).
struct Unscaled {
    __device__ float operator()(int) const { return 1.f; }
};

// Stages a tile for the tensor-core kernels below: `rows` rows of `width` columns (a multiple of 8) into shared
// memory as bf16 (row stride ld, a multiple of 8). src(r) is row r (fp32, or bf16: x, B, C, dy and the chunk states
// under bf16 tensors) or null (a zero row: past the chunk, or past P); columns ≥ valid (a multiple of 4) are zeros;
// row r is multiplied by scale(r). Rounding or scaling goes through registers, four columns a thread at a time (ld4:
// a float4 load, or 8 bytes of bf16). bf16 rows staged Unscaled are copied as they are, 16 bytes a cp.async, so
// every copy of the thread is in flight at once and nothing passes through registers (a row not 16-byte aligned
// there, or the last 4 columns when valid is not a multiple of 8, takes the register path). All threads of the block
// take part; complete after a __syncthreads. stage_bf16<false> leaves its copies in flight for the next
// stage_bf16 to wait for, so that two tiles load at once.
template <bool WAIT = true, class Src, class Scale>
__device__ inline void stage_bf16(bf16* dst, int ld, int rows, int width, int valid, const Src& src,
                                  const Scale& scale) {
    using Row = std::remove_cv_t<std::remove_pointer_t<decltype(src(0))>>;
    const auto through_registers = [&](int r, int col, const Row* row) {
        float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
        if (row && col < valid) {
            v = ld4(row, col / 4);
            const float k = scale(r);
            v.x *= k, v.y *= k, v.z *= k, v.w *= k;
        }
        *reinterpret_cast<uint2*>(dst + r * ld + col) = make_uint2(mma::pack_bf16(v.x, v.y), mma::pack_bf16(v.z, v.w));
    };
    if constexpr (std::is_same_v<Row, bf16> && std::is_same_v<Scale, Unscaled>) {
        for (int idx = threadIdx.x; idx < rows * (width / 8); idx += blockDim.x) {
            const int r = idx / (width / 8), col = (idx % (width / 8)) * 8;
            const bf16* row = src(r);
            bf16* to = dst + r * ld + col;
            if (!row || col >= valid)
                *reinterpret_cast<uint4*>(to) = make_uint4(0u, 0u, 0u, 0u);
            else if (col + 8 <= valid && reinterpret_cast<uintptr_t>(row + col) % 16 == 0)
                mma::cp_async16(to, row + col, true);
            else
                through_registers(r, col, row), through_registers(r, col + 4, row);
        }
        mma::cp_async_commit();
    } else {
        for (int idx = threadIdx.x; idx < rows * (width / 4); idx += blockDim.x) {
            const int r = idx / (width / 4), col = (idx % (width / 4)) * 4;
            through_registers(r, col, src(r));
        }
    }
    if constexpr (WAIT) mma::cp_async_wait<0>();  // every copy of this thread's, earlier stagings' included
}

// Whether the tensor-core kernels apply: Dims::tc, P and N multiples of 4 (float4 staging), and every pointer in
// `vec` 16-byte aligned (float4 loads), every one in `pair` 8-byte aligned (float2 loads and stores). When Dims::tc
// is set but a shape or a pointer does not fit, the launchers fall back to the block GEMMs, slower: tc_fallbacks()
// counts those launches, and the first in a process says so on stderr.
inline std::atomic<long>& tc_fallbacks() {
    static std::atomic<long> n{0};
    return n;
}
inline bool tc_fits(const Dims& d, const char* who, std::initializer_list<const void*> vec,
                    std::initializer_list<const void*> pair) {
    if (!d.tc) return false;
    bool ok = d.P % 4 == 0 && d.N % 4 == 0;
    for (const void* p : vec) ok = ok && reinterpret_cast<uintptr_t>(p) % 16 == 0;
    for (const void* p : pair) ok = ok && reinterpret_cast<uintptr_t>(p) % 8 == 0;
    if (!ok && tc_fallbacks()++ == 0)
        std::fprintf(stderr, "note: ssd %s: P=%d, N=%d or a tensor's alignment does not fit the tensor-core kernels "
                             "(P, N multiples of 4, 16-byte aligned tensors); using the block GEMMs\n", who, d.P, d.N);
    return ok;
}

// Calls launch(NF, PF) with the feature tiles of N and P as std::integral_constant: one instantiation of a
// tensor-core kernel per (64 | 128, 64 | 128).
template <class Launch>
void tc_dispatch(const Dims& d, Launch&& launch) {
    using F64 = std::integral_constant<int, 64>;
    using F128 = std::integral_constant<int, 128>;
    const bool n64 = feat_tile(d.N) == 64, p64 = feat_tile(d.P) == 64;
    if (n64 && p64) launch(F64{}, F64{});
    else if (n64) launch(F64{}, F128{});
    else if (p64) launch(F128{}, F64{});
    else launch(F128{}, F128{});
    cudaCheckLast();
}

// chunk_state on the tensor cores: the same product, grid and outputs as ssd_chunk_state_kernel, for fp32 storage
// under Dims::tc when P and N are multiples of 4 and U, V are 16-byte aligned (launch_chunk_state checks). Instead
// of block_gemm_tc's element-by-element fetch through lambdas, 16 steps a slice, each K slice here is CS_KT = 64
// steps: the threads load float4s of U and V, scale U's rows by w_t, round to bf16 and store both as they lie in
// memory, (t, p) and (t, n) rows; each warp then takes 16 rows p × BN/2 columns n with mma.sync, reading U
// transposed through ldmatrix.trans (its rows are the K dimension), and stores its accumulators from registers.
constexpr int CS_KT = 64;
template <typename S, int BN, bool BWD, typename UT, typename VT>
__global__ void __launch_bounds__(NT, TC_STATE_MIN_BLOCKS)
ssd_chunk_state_tc_kernel(S* slots, float* end, const UT* U, const float* dt, const float* A, const VT* V,
                          Dims d) {
    constexpr int WN = BN / 2, LU = BM + 8, LV = BN + 8;  // a warp's columns; row strides (mma.cuh's padding)
    const int c = blockIdx.y, bh = blockIdx.z, b = bh / d.H, h = bh % d.H, g = h / d.hpg();
    const int t0 = c * d.Q, len = d.chunk_len(c), p0 = blockIdx.x * BM;
    S* dst_slot;  // where this chunk's result goes
    float* dst_end;
    if (!chunk_state_dst<BWD>(dst_slot, dst_end, slots, end, d, bh, c)) return;
    __shared__ float cum[NT], sdt[NT], w[NT];
    __shared__ __align__(16) bf16 su[CS_KT][LU];  // (t, p): w_t·U[t, p0 + p]
    __shared__ __align__(16) bf16 sv[CS_KT][LV];  // (t, n): V[t, n]
    chunk_cumsum(cum, sdt, dt + d.dt(b, t0, h), d.H, A[h], len);
    chunk_state_weights<BWD>(w, cum, sdt, len);
    const int P = d.P, N = d.N, tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int wm = warp % 4, wn = warp / 4;  // this warp: rows p0 + 16·wm .., columns WN·wn ..
    float acc[WN / 8][4];
    mma::zero(acc);
    for (int k0 = 0; k0 < len; k0 += CS_KT) {
        // V first: staged as it is (by cp.async, when bf16), its copies load while U's rows are scaled
        stage_bf16<false>(
            &sv[0][0], LV, CS_KT, BN, N, [&](int r) { return k0 + r < len ? V + d.bc(b, t0 + k0 + r, g) : nullptr; },
            Unscaled{});
        stage_bf16(
            &su[0][0], LU, CS_KT, BM, P - p0,
            [&](int r) { return k0 + r < len ? U + d.x(b, t0 + k0 + r, h) + p0 : nullptr; },
            [&](int r) { return w[k0 + r]; });
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < CS_KT; kk += 16) {
            // A (16 p × 16 t) from the (t, p) rows: matrices (t 0-7 | 8-15) × (p 0-7 | 8-15) as mma.cuh's header says
            uint32_t a[1][4];
            mma::ldsm_x4_trans(a[0], &su[kk + lane % 8 + (lane / 16) * 8][16 * wm + ((lane / 8) % 2) * 8]);
            mma::tile_ab<16, WN>(acc, a, &sv[kk][WN * wn], LV);
        }
        __syncthreads();
    }
#pragma unroll
    for (int j = 0; j < WN / 8; j++)
#pragma unroll
        for (int half = 0; half < 2; half++) {
            const int p = p0 + 16 * wm + lane / 4 + 8 * half, n = WN * wn + 8 * j + 2 * (lane % 4);
            if (p >= P) continue;
#pragma unroll
            for (int e = 0; e < 2; e++) {
                if (n + e >= N) continue;
                if (dst_slot) dst_slot[(size_t)p * N + n + e] = S(acc[j][2 * half + e]);
                else dst_end[(size_t)p * N + n + e] = acc[j][2 * half + e];
            }
        }
}

// Launches chunk_state (forward: U = x, V = Bm into chunk_states / final_state; backward: U = dy, V = Cm into the dS
// slots / dinit_state) on the tensor-core kernel when it applies, else on ssd_chunk_state_kernel. U, V: T, or bf16
// under T = float (x, B, C and dy as bf16 runs hold them).
template <bool BWD, typename T, typename S, typename UT, typename VT>
void launch_chunk_state(S* slots, T* end, const UT* U, const T* dt, const T* A, const VT* V, const Dims& d,
                        cudaStream_t stream) {
    const dim3 grid(ceil_div(d.P, BM), d.nchunks, d.B * d.H);
    if constexpr (std::is_same_v<T, float>) {
        if (tc_fits(d, BWD ? "chunk_state (backward)" : "chunk_state", {U, V}, {})) {
            if (feat_tile(d.N) == 64)
                ssd_chunk_state_tc_kernel<S, 64, BWD, UT, VT><<<grid, NT, 0, stream>>>(slots, end, U, dt, A, V, d);
            else
                ssd_chunk_state_tc_kernel<S, 128, BWD, UT, VT><<<grid, NT, 0, stream>>>(slots, end, U, dt, A, V, d);
            cudaCheckLast();
            return;
        }
    }
    if (feat_tile(d.N) == 64)
        ssd_chunk_state_kernel<T, S, 64, BWD, UT, VT><<<grid, NT, 0, stream>>>(slots, end, U, dt, A, V, d);
    else
        ssd_chunk_state_kernel<T, S, 128, BWD, UT, VT><<<grid, NT, 0, stream>>>(slots, end, U, dt, A, V, d);
    cudaCheckLast();
}

// dec[c − c_lo] = exp(A_h·Σ_t dt_t over chunk c of (b, h)), each chunk's total decay, for the chunks c_lo .. c_hi − 1
// (at most NT): one warp a chunk, its lanes striding over the steps, a shuffle sum (fixed order). The state passes
// take them a batch at a time, so that their walk over the chunks needs no barrier for them. Called by all threads;
// starts and ends with a barrier.
template <typename T>
__device__ void chunk_decays(float* dec, const T* dt, float A_h, const Dims& d, int b, int h, int c_lo, int c_hi) {
    __syncthreads();  // earlier readers of dec are done
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int c = c_lo + warp; c < c_hi; c += NT / 32) {
        const int len = d.chunk_len(c);
        float a = 0.f;
        for (int i = lane; i < len; i += 32) a += float(dt[d.dt(b, c * d.Q + i, h)]);
        a = warp_sum(a);
        if (lane == 0) dec[c - c_lo] = decay_exp(A_h * a);
    }
    __syncthreads();
}

// (3) Forward state passing. On entry local[c + 1] holds chunk c's end state from zero (and final_state the last
// chunk's); on exit chunk_states[c] is the state entering chunk c (chunk 0: init_state or zeros) and final_state the
// state after the last chunk:
//   S_in[0] = init;   S_in[c + 1] = S_local[c] + exp(Σ_chunk a)·S_in[c]
// In place (local = chunk_states) when the states are stored as T; bf16 states (ST, under T = float) take their
// local states from a separate fp32 buffer of the same shape (the scan's backward scratch).
// Grid (ceil(P·N / (PASS_ELEMS·NT)), B·H): the state elements are independent, so each block walks
// all chunks in order for PASS_ELEMS·NT of them (coalesced: element k·NT + tid), holding them in
// registers; the chunks' decays come NT chunks at a time (chunk_decays). Sequential in chunks, parallel in elements.
// Each chunk's slot is loaded PASS_AHEAD chunks before its turn, into a ring of registers (the walk is unrolled by
// PASS_AHEAD so that the ring's index is a constant): the loads are of slots no store in between touches, so a
// thread need not wait a memory latency each chunk. Intra at 350m (H200, ncu, mean over a step's launches): the
// forward, near the bandwidth already (a 24-head layer moves 0.8 GB), 214 → 206 µs; the backward, which reads two
// tensors a chunk, 429 → 351 µs.
template <typename T, typename ST, typename LT>
__global__ void __launch_bounds__(NT) ssd_state_pass_kernel(ST* chunk_states, const LT* local, T* final_state,
                                                            const T* init_state, const T* dt, const T* A, Dims d) {
    const int bh = blockIdx.y, b = bh / d.H, h = bh % d.H;
    const size_t PN = d.PN(), e0 = (size_t)blockIdx.x * PASS_ELEMS * NT + threadIdx.x;
    __shared__ float dec[NT];
    float run[PASS_ELEMS], ahead[PASS_AHEAD][PASS_ELEMS];
    ST* st0 = chunk_states + d.chunk(bh, 0);
    T* fin = final_state ? final_state + (size_t)bh * PN : nullptr;  // (null: not wanted)
    auto load = [&](float* v, int c) {  // chunk c's local end state, this thread's elements (zeros past the end)
        const LT* src = c + 1 < d.nchunks ? local + d.chunk(bh, c + 1) : nullptr;
        const T* src_fin = c + 1 == d.nchunks ? fin : nullptr;
#pragma unroll
        for (int k = 0; k < PASS_ELEMS; k++) {
            const size_t e = e0 + (size_t)k * NT;
            v[k] = e >= PN ? 0.f : src ? float(src[e]) : src_fin ? float(src_fin[e]) : 0.f;
        }
    };
#pragma unroll
    for (int k = 0; k < PASS_ELEMS; k++) {
        const size_t e = e0 + (size_t)k * NT;
        run[k] = (init_state && e < PN) ? float(init_state[(size_t)bh * PN + e]) : 0.f;
        if (e < PN) st0[e] = ST(run[k]);
    }
#pragma unroll
    for (int j = 0; j < PASS_AHEAD; j++) load(ahead[j], j);
    for (int c0 = 0; c0 < d.nchunks; c0 += PASS_AHEAD) {
#pragma unroll
        for (int j = 0; j < PASS_AHEAD; j++) {
            const int c = c0 + j;
            // where the state after chunk c goes: chunk_states[c + 1], or final_state after the last chunk
            ST* dst = c + 1 < d.nchunks ? chunk_states + d.chunk(bh, c + 1) : nullptr;
            T* dst_fin = c + 1 == d.nchunks ? fin : nullptr;
            if (!dst && !dst_fin) return;  // past the last chunk, or the last with no final state wanted (uniform)
            if (c % NT == 0) chunk_decays(dec, dt, float(A[h]), d, b, h, c, min(c + NT, d.nchunks));
            const float decay = dec[c % NT];
#pragma unroll
            for (int k = 0; k < PASS_ELEMS; k++) run[k] = ahead[j][k] + decay * run[k];
            load(ahead[j], c + PASS_AHEAD);
#pragma unroll
            for (int k = 0; k < PASS_ELEMS; k++) {
                const size_t e = e0 + (size_t)k * NT;
                if (e >= PN) continue;
                if (dst) dst[e] = ST(run[k]);
                else dst_fin[e] = T(run[k]);
            }
        }
    }
}

// (4) + (1) + skip: the outputs of one 64-step tile of a chunk, all P columns (BF ≥ P):
//   Y[i, :] = exp(cum_i)·C_i·S_inᵀ  +  Σ_{j≤i} exp(cum_i − cum_j)·dt_j·(C_i·B_j)·x_j  +  D·x_i
// Grid (ceil(min(Q, T)/64), nchunks, B·H). The first term is one GEMM (K = N). The second walks the
// causal j tiles j0 ≤ i0: the 64 × 64 tile of C·Bᵀ (K = N) goes to shared memory ms, is masked and
// weighted there by exp(cum_i − cum_j)·dt_j, and multiplies the j tile of x (K = 64). Blocks are per
// head, so C·Bᵀ is recomputed by each head of a group (a later version can share it).
template <typename T, int BF, typename Y, typename X, typename ST>
__global__ void __launch_bounds__(NT, GEMM_MIN_BLOCKS)
ssd_chunk_output_kernel(Y* y, const ST* chunk_states, const X* x, const T* dt, const T* A, const X* Bm, const X* Cm,
                        const T* D, Dims d) {
    const int c = blockIdx.y, bh = blockIdx.z, b = bh / d.H, h = bh % d.H, g = h / d.hpg();
    const int t0 = c * d.Q, len = d.chunk_len(c), i0 = blockIdx.x * BM;
    if (i0 >= len) return;  // a short last chunk has fewer tiles
    const int P = d.P, N = d.N;
    __shared__ float cum[NT], sdt[NT];
    __shared__ __align__(32) float sa[KT][BM + PAD];  // (aligned for block_gemm_tc)
    __shared__ __align__(32) float sb[KT][BF + PAD];
    __shared__ float ms[BM][BM + 1];  // the masked, weighted (C·Bᵀ) tile
    chunk_cumsum(cum, sdt, dt + d.dt(b, t0, h), d.H, float(A[h]), len);
    const ST* S_in = chunk_states + d.chunk(bh, c);  // (P, N)

    float acc[TM][BF / TX];
    zero_acc<BF>(acc);
    // (4) A(m = i, k = n) = exp(cum_i)·C[i, n] (contiguous along n);  B(k = n, p) = S_in[p, n] (along n)
    {
        auto fa = [&](int m, int k) {
            return i0 + m < len ? decay_exp(cum[i0 + m]) * float(Cm[d.bc(b, t0 + i0 + m, g) + k]) : 0.f;
        };
        auto fb = [&](int k, int p) { return p < P ? float(S_in[(size_t)p * N + k]) : 0.f; };
        block_gemm<BF, true, true>(acc, N, fa, fb, sa, sb, d.tc);
    }
    const int tid = threadIdx.x, tx = tid % TX, ty = tid / TX;
    // (1) causal j tiles
    for (int j0 = 0; j0 <= i0; j0 += BM) {
        float cb[TM][BM / TX];
        zero_acc<BM>(cb);
        auto fc = [&](int m, int k) { return i0 + m < len ? float(Cm[d.bc(b, t0 + i0 + m, g) + k]) : 0.f; };
        auto fbj = [&](int k, int j) { return j0 + j < len ? float(Bm[d.bc(b, t0 + j0 + j, g) + k]) : 0.f; };
        block_gemm<BM, true, true>(cb, N, fc, fbj, sa, sb, d.tc);
#pragma unroll
        for (int r = 0; r < TM; r++)
#pragma unroll
            for (int cc = 0; cc < BM / TX; cc++) {
                const int i = i0 + ty * TM + r, j = j0 + tx * (BM / TX) + cc;
                ms[ty * TM + r][tx * (BM / TX) + cc] =
                    (j <= i && i < len) ? decay_exp(cum[i] - cum[j]) * sdt[j] * cb[r][cc] : 0.f;
            }
        __syncthreads();
        // A(m = i, k = j) = ms[i][j];  B(k = j, p) = x[j, p] (contiguous along p)
        auto fm = [&](int m, int k) { return ms[m][k]; };
        auto fx = [&](int k, int p) { return j0 + k < len && p < P ? float(x[d.x(b, t0 + j0 + k, h) + p]) : 0.f; };
        block_gemm<BF, true, false>(acc, BM, fm, fx, sa, sb, d.tc);  // its closing barrier frees ms
    }
    const float Dh = float(D[h]);
#pragma unroll
    for (int r = 0; r < TM; r++) {
        const int i = i0 + ty * TM + r;
        if (i >= len) continue;
        const size_t row = d.x(b, t0 + i, h);
#pragma unroll
        for (int cc = 0; cc < BF / TX; cc++) {
            const int p = tx * (BF / TX) + cc;
            if (p < P) y[row + p] = Y(acc[r][cc] + Dh * float(x[row + p]));
        }
    }
}

// One causal step of the tensor-core kernels but chunk_state, for a warp's 16 rows r0 .. r0+15 of the block's tile:
//   acc (16 × W) += (S ⊙ weight)·V,   S = A·Rᵀ (16 × 64): the scores of those rows against the 64 rows c0 .. c0+63
// of the other side, A (16 × K) and R (64 × K) staged bf16 rows, V (64 × W) the staged tile they weight. weight(r,
// c) is the decay mask and weight of score (r, c) (0 where masked); it is applied in registers, and the weighted
// scores go straight into the A operand of the product with V.
template <int K, int W, class Weight>
__device__ inline void causal_tile(float (&acc)[W / 8][4], const bf16* A, int lda, const bf16* R, int ldr,
                                   const bf16* V, int ldv, int r0, int c0, const Weight& weight) {
    const int lane = threadIdx.x % 32, ra = r0 + lane / 4, rb = ra + 8;  // this lane's two rows
    float sc[BM / 8][4];
    mma::zero(sc);
    mma::tile_abt<K, BM>(sc, A, lda, R, ldr);
#pragma unroll
    for (int n = 0; n < BM / 8; n++)
#pragma unroll
        for (int e = 0; e < 2; e++) {
            const int col = c0 + 8 * n + 2 * (lane % 4) + e;
            sc[n][e] *= weight(ra, col);
            sc[n][2 + e] *= weight(rb, col);
        }
    uint32_t pa[BM / 16][4];
    mma::to_a<BM>(pa, sc);
    mma::tile_ab<BM, W>(acc, pa, V, ldv);
}

// Dynamic shared memory of the tensor-core kernels but chunk_state: a (64, stay_width) bf16 tile that stays (C or B
// rows: NF wide; x or dy rows: PF wide), and a region that holds first a (PF, NF) state, then a (64, NF) and a
// (64, PF) tile (row strides padded by 8).
template <int NF, int PF>
__host__ __device__ constexpr size_t tc_tile_smem(int stay_width) {
    constexpr size_t LN = NF + 8, LP = PF + 8, state = PF * LN, tiles = BM * (LN + LP);
    return sizeof(bf16) * (BM * (size_t)(stay_width + 8) + (state > tiles ? state : tiles));
}

// chunk_output on the tensor cores, for fp32 storage under Dims::tc (P, N multiples of 4; x, Bm, Cm, chunk_states
// 16-byte aligned, y 8-byte: launch_chunk_output checks). The same outputs and grid as ssd_chunk_output_kernel, in
// the attention forward's pattern: the block's 64 rows of C and the chunk's S_in are staged as bf16 (stage_bf16),
// each warp takes 16 rows i × PF/2 columns p; (4) is one mma.sync product scaled by exp(cum_i) in registers; per
// causal j tile, the warp's C·Bᵀ scores (16 × 64) are masked and weighted by exp(cum_i − cum_j)·dt_j in registers
// and turned straight into the A operand of the product with the j tile of x. (Both warps of a row block compute
// the same scores: cheaper than passing them through shared memory.) Shared memory: C, then S_in, whose space the
// B and x tiles reuse (dynamic, tc_tile_smem).
template <int NF, int PF, typename Y, typename X, typename ST>
__global__ void __launch_bounds__(NT, TC_MIN_BLOCKS)
ssd_chunk_output_tc_kernel(Y* y, const ST* chunk_states, const X* x, const float* dt, const float* A,
                           const X* Bm, const X* Cm, const float* D, Dims d) {
    constexpr int LN = NF + 8, LP = PF + 8, WP = PF / 2;  // row strides; a warp's columns p
    const int c = blockIdx.y, bh = blockIdx.z, b = bh / d.H, h = bh % d.H, g = h / d.hpg();
    const int t0 = c * d.Q, len = d.chunk_len(c), i0 = blockIdx.x * BM;
    if (i0 >= len) return;
    const int P = d.P, N = d.N, lane = threadIdx.x % 32, wm = threadIdx.x / 32 % 4, wn = threadIdx.x / 128;
    __shared__ float cum[NT], sdt[NT];
    extern __shared__ __align__(16) unsigned char smem_raw[];
    bf16* sc = reinterpret_cast<bf16*>(smem_raw);  // (64, LN) C rows i0 ..
    bf16* sS = sc + BM * LN;                        // (PF, LN) S_in, rows p; then:
    bf16* sB = sS;                                  // (64, LN) B rows j0 ..
    bf16* sx = sS + BM * LN;                        // (64, LP) x rows j0 ..
    chunk_cumsum(cum, sdt, dt + d.dt(b, t0, h), d.H, A[h], len);
    const ST* S_in = chunk_states + d.chunk(bh, c);  // (P, N)
    stage_bf16<false>(
        sc, LN, BM, NF, N, [&](int r) { return i0 + r < len ? Cm + d.bc(b, t0 + i0 + r, g) : nullptr; }, Unscaled{});
    stage_bf16(
        sS, LN, PF, NF, N, [&](int p) { return p < P ? S_in + (size_t)p * N : nullptr; }, Unscaled{});
    __syncthreads();
    // (4) exp(cum_i)·C_i·S_inᵀ
    float acc[WP / 8][4];
    mma::zero(acc);
    mma::tile_abt<NF, WP>(acc, sc + 16 * wm * LN, LN, sS + WP * wn * LN, LN);
    const int ra = 16 * wm + lane / 4, rb = ra + 8;  // this lane's two rows of the tile
    const float ea = decay_exp(cum[i0 + ra]), eb = decay_exp(cum[i0 + rb]);
#pragma unroll
    for (int n = 0; n < WP / 8; n++) acc[n][0] *= ea, acc[n][1] *= ea, acc[n][2] *= eb, acc[n][3] *= eb;
    __syncthreads();  // S_in's space is the B and x tiles' from here
    // (1) causal j tiles
    for (int j0 = 0; j0 <= i0; j0 += BM) {
        stage_bf16<false>(
            sB, LN, BM, NF, N, [&](int r) { return j0 + r < len ? Bm + d.bc(b, t0 + j0 + r, g) : nullptr; },
            Unscaled{});
        stage_bf16(
            sx, LP, BM, PF, P, [&](int r) { return j0 + r < len ? x + d.x(b, t0 + j0 + r, h) : nullptr; },
            Unscaled{});
        __syncthreads();
        // scores C_i·B_j, weighted exp(cum_i − cum_j)·dt_j for j ≤ i, times x_j (steps j ≥ len have sdt 0)
        causal_tile<NF, WP>(acc, sc + 16 * wm * LN, LN, sB, LN, sx + WP * wn, LP, i0 + 16 * wm, j0,
                            [&](int i, int j) { return j <= i ? decay_exp(cum[i] - cum[j]) * sdt[j] : 0.f; });
        __syncthreads();  // the tiles are restaged next
    }
    // y = acc + D·x, two columns a store
    const float Dh = D[h];
#pragma unroll
    for (int half = 0; half < 2; half++) {
        const int i = i0 + (half ? rb : ra);
        if (i >= len) continue;
        const size_t row = d.x(b, t0 + i, h);
#pragma unroll
        for (int n = 0; n < WP / 8; n++) {
            const int p = WP * wn + 8 * n + 2 * (lane % 4);
            if (p >= P) continue;  // (P is a multiple of 4, so p + 1 < P too)
            const float2 xv = ld2(x + row + p);
            st2(y + row + p, make_float2(acc[n][2 * half] + Dh * xv.x, acc[n][2 * half + 1] + Dh * xv.y));
        }
    }
}

// Launches chunk_output on the tensor-core kernel when it applies, else on ssd_chunk_output_kernel. y: T, or bf16
// under T = float (its only readers are elementwise: Mamba-2's gate and norm); x, Bm, Cm and chunk_states: T, or bf16
// likewise.
template <typename T, typename Y, typename X, typename ST>
void launch_chunk_output(Y* y, const ST* chunk_states, const X* x, const T* dt, const T* A, const X* Bm, const X* Cm,
                         const T* D, const Dims& d, cudaStream_t stream) {
    const dim3 grid(ceil_div(d.T_ < d.Q ? d.T_ : d.Q, BM), d.nchunks, d.B * d.H);
    if constexpr (std::is_same_v<T, float>) {
        if (tc_fits(d, "chunk_output", {x, Bm, Cm, chunk_states}, {y})) {
            tc_dispatch(d, [&](auto nf, auto pf) {
                constexpr int NF = decltype(nf)::value, PF = decltype(pf)::value;
                const auto kernel = ssd_chunk_output_tc_kernel<NF, PF, Y, X, ST>;
                const size_t smem = tc_tile_smem<NF, PF>(NF);
                allow_smem(kernel, smem);
                kernel<<<grid, NT, smem, stream>>>(y, chunk_states, x, dt, A, Bm, Cm, D, d);
            });
            return;
        }
    }
    if (feat_tile(d.P) == 64)
        ssd_chunk_output_kernel<T, 64, Y, X, ST><<<grid, NT, 0, stream>>>(y, chunk_states, x, dt, A, Bm, Cm, D, d);
    else
        ssd_chunk_output_kernel<T, 128, Y, X, ST><<<grid, NT, 0, stream>>>(y, chunk_states, x, dt, A, Bm, Cm, D, d);
    cudaCheckLast();
}

// Backward state passing, in place, the mirror of ssd_state_pass_kernel run from the last chunk to
// the first. On entry dS slot c − 1 holds Σ_i exp(cum_i)·dy_i ⊗ C_i of chunk c (c ≥ 1), and
// dinit_state that of chunk 0; on exit slot c holds dS_out(c) = ∂L/∂S_out of chunk c (the last one:
// dfinal_state or zeros), and dinit_state = ∂L/∂init_state:
//   dS_out(nc−1) = dfinal;   dS_out(c−1) = local(c) + exp(Σ_chunk c a)·dS_out(c)
// Also writes dot_part[b, h, c, part] = exp(Σ_chunk c a)·⟨dS_out(c), S_in(c)⟩ over one warp's elements
// (S_in(c) = chunk_states[c]; part = blockIdx.x·(NT/32) + warp): the term (3) contributes to ∂L/∂cum_last. Each
// warp writes its own share, so the walk over the chunks needs no barrier (the finalize kernel adds the shares up).
// Grid and layout as the forward pass.
template <typename T, typename ST>
__global__ void __launch_bounds__(NT) ssd_state_pass_bwd_kernel(float* slots, T* dinit_state, float* dot_part,
                                                                const T* dfinal_state, const ST* chunk_states,
                                                                const T* dt, const T* A, Dims d) {
    const int bh = blockIdx.y, b = bh / d.H, h = bh % d.H, nparts = gridDim.x * (NT / 32);
    const int part = blockIdx.x * (NT / 32) + threadIdx.x / 32;
    const size_t PN = d.PN(), e0 = (size_t)blockIdx.x * PASS_ELEMS * NT + threadIdx.x;
    __shared__ float dec[NT];
    float run[PASS_ELEMS];
    // the ring of the forward's kernel: chunk c's S_in and local share (slot c − 1, or dinit_state for chunk 0),
    // loaded PASS_AHEAD chunks ahead (nothing stores to them in between)
    float ahead_s[PASS_AHEAD][PASS_ELEMS], ahead_l[PASS_AHEAD][PASS_ELEMS];
    auto load = [&](int j, int c) {
        const ST* S_in = c >= 0 ? chunk_states + d.chunk(bh, c) : nullptr;
        const float* slot = c > 0 ? slots + d.chunk(bh, c - 1) : nullptr;
        const T* init = c == 0 && dinit_state ? dinit_state + (size_t)bh * PN : nullptr;
#pragma unroll
        for (int k = 0; k < PASS_ELEMS; k++) {
            const size_t e = e0 + (size_t)k * NT;
            const bool in = e < PN;
            ahead_s[j][k] = S_in && in ? float(S_in[e]) : 0.f;
            ahead_l[j][k] = slot && in ? slot[e] : init && in ? float(init[e]) : 0.f;
        }
    };
    float* last = slots + d.chunk(bh, d.nchunks - 1);
#pragma unroll
    for (int k = 0; k < PASS_ELEMS; k++) {
        const size_t e = e0 + (size_t)k * NT;
        run[k] = (dfinal_state && e < PN) ? float(dfinal_state[(size_t)bh * PN + e]) : 0.f;
        if (e < PN) last[e] = run[k];
    }
#pragma unroll
    for (int j = 0; j < PASS_AHEAD; j++) load(j, d.nchunks - 1 - j);
    int c_lo = 0;  // the first chunk of the batch of decays in dec
    for (int c0 = d.nchunks - 1; c0 >= 0; c0 -= PASS_AHEAD) {
#pragma unroll
        for (int j = 0; j < PASS_AHEAD; j++) {  // here run = dS_out(c)
            const int c = c0 - j;
            if (c < 0) return;
            if ((d.nchunks - 1 - c) % NT == 0) {
                c_lo = c + 1 - NT > 0 ? c + 1 - NT : 0;
                chunk_decays(dec, dt, float(A[h]), d, b, h, c_lo, c + 1);
            }
            const float decay = dec[c - c_lo];
            float dot = 0.f, local[PASS_ELEMS];
#pragma unroll
            for (int k = 0; k < PASS_ELEMS; k++) dot += run[k] * ahead_s[j][k], local[k] = ahead_l[j][k];
            load(j, c - PASS_AHEAD);
            dot = warp_sum(dot);  // this warp's share; no barrier: the finalize kernel adds the shares
            if (threadIdx.x % 32 == 0) dot_part[((size_t)bh * d.nchunks + c) * nparts + part] = decay * dot;
            // dS_out(c − 1) = dS_in(c), kept in slot c − 1 (chunk 0: dinit_state, if wanted)
            float* dst_slot = c > 0 ? slots + d.chunk(bh, c - 1) : nullptr;
            T* dst_init = c == 0 && dinit_state ? dinit_state + (size_t)bh * PN : nullptr;
            if (!dst_slot && !dst_init) return;
#pragma unroll
            for (int k = 0; k < PASS_ELEMS; k++) {
                const size_t e = e0 + (size_t)k * NT;
                run[k] = local[k] + decay * run[k];
                if (e >= PN) continue;
                if (dst_slot) dst_slot[e] = run[k];
                else dst_init[e] = T(run[k]);
            }
        }
    }
}

// dx and the direct part of ddt for one 64-step tile j of a chunk, all P columns (BF ≥ P):
//   acc[j, :] = Σ_{i≥j} exp(cum_i − cum_j)·(C_i·B_j)·dy_i  +  exp(cum_last − cum_j)·B_j·dS_outᵀ
//             = ∂L/∂(dt_j·x_j)
//   dx_j = D·dy_j + dt_j·acc_j        ddt_direct_j = ⟨x_j, acc_j⟩ (written to ddt; finalize adds A·∂L/∂a_j)
//   v[b, h, t] = dt_j·⟨x_j, state part of acc_j⟩ (the (2) term of ∂L/∂cum_last, summed by finalize)
// Grid (ceil(min(Q, T)/64), nchunks, B·H); the mirror of chunk_output with the causal loop over the
// i tiles at or after j (B·Cᵀ tile in ms, masked and weighted, times the i tile of dy).
template <typename T, int BF, typename DY, typename X>
__global__ void __launch_bounds__(NT, GEMM_MIN_BLOCKS)
ssd_bwd_dx_kernel(T* dx, T* ddt, float* v_state, const DY* dy, const float* slots, const X* x, const T* dt, const T* A,
                  const X* Bm, const X* Cm, const T* D, Dims d) {
    const int c = blockIdx.y, bh = blockIdx.z, b = bh / d.H, h = bh % d.H, g = h / d.hpg();
    const int t0 = c * d.Q, len = d.chunk_len(c), j0 = blockIdx.x * BM;
    if (j0 >= len) return;
    const int P = d.P, N = d.N;
    __shared__ float cum[NT], sdt[NT];
    __shared__ __align__(32) float sa[KT][BM + PAD];  // (aligned for block_gemm_tc)
    __shared__ __align__(32) float sb[KT][BF + PAD];
    __shared__ float ms[BM][BM + 1];  // masked, weighted (B·Cᵀ) tile; later the row-sum buffer
    chunk_cumsum(cum, sdt, dt + d.dt(b, t0, h), d.H, float(A[h]), len);
    const float cum_last = cum[len - 1];
    const float* dS = slots + d.chunk(bh, c);  // dS_out of this chunk (P, N)
    const int tid = threadIdx.x, tx = tid % TX, ty = tid / TX;

    float acc[TM][BF / TX];
    zero_acc<BF>(acc);
    // state part: A(m = j, k = n) = exp(cum_last − cum_j)·B[j, n] (along n);  B(k = n, p) = dS[p, n] (along n)
    {
        auto fa = [&](int m, int k) {
            return j0 + m < len ? decay_exp(cum_last - cum[j0 + m]) * float(Bm[d.bc(b, t0 + j0 + m, g) + k]) : 0.f;
        };
        auto fb = [&](int k, int p) { return p < P ? dS[(size_t)p * N + k] : 0.f; };
        block_gemm<BF, true, true>(acc, N, fa, fb, sa, sb, d.tc);
    }
    float vpart[TM];  // this thread's share of ⟨x_j, state part⟩
#pragma unroll
    for (int r = 0; r < TM; r++) {
        vpart[r] = 0.f;
        const int j = j0 + ty * TM + r;
        if (j >= len) continue;
#pragma unroll
        for (int cc = 0; cc < BF / TX; cc++) {
            const int p = tx * (BF / TX) + cc;
            if (p < P) vpart[r] += float(x[d.x(b, t0 + j, h) + p]) * acc[r][cc];
        }
    }
    // intra-chunk part: causal i tiles from j0 on
    for (int i0 = j0; i0 < len; i0 += BM) {
        float bc[TM][BM / TX];
        zero_acc<BM>(bc);
        auto fbm = [&](int m, int k) { return j0 + m < len ? float(Bm[d.bc(b, t0 + j0 + m, g) + k]) : 0.f; };
        auto fci = [&](int k, int i) { return i0 + i < len ? float(Cm[d.bc(b, t0 + i0 + i, g) + k]) : 0.f; };
        block_gemm<BM, true, true>(bc, N, fbm, fci, sa, sb, d.tc);
#pragma unroll
        for (int r = 0; r < TM; r++)
#pragma unroll
            for (int cc = 0; cc < BM / TX; cc++) {
                const int j = j0 + ty * TM + r, i = i0 + tx * (BM / TX) + cc;
                ms[ty * TM + r][tx * (BM / TX) + cc] = (j <= i && i < len) ? decay_exp(cum[i] - cum[j]) * bc[r][cc] : 0.f;
            }
        __syncthreads();
        // A(m = j, k = i) = ms[j][i];  B(k = i, p) = dy[i, p] (along p)
        auto fm = [&](int m, int k) { return ms[m][k]; };
        auto fdy = [&](int k, int p) { return i0 + k < len && p < P ? float(dy[d.x(b, t0 + i0 + k, h) + p]) : 0.f; };
        block_gemm<BF, true, false>(acc, BM, fm, fdy, sa, sb, d.tc);
    }
    // dx, and the row dots ⟨x_j, acc_j⟩
    const float Dh = float(D[h]);
    float dpart[TM];
#pragma unroll
    for (int r = 0; r < TM; r++) {
        dpart[r] = 0.f;
        const int j = j0 + ty * TM + r;
        if (j >= len) continue;
        const size_t row = d.x(b, t0 + j, h);
        const float dtj = sdt[j];
#pragma unroll
        for (int cc = 0; cc < BF / TX; cc++) {
            const int p = tx * (BF / TX) + cc;
            if (p >= P) continue;
            dpart[r] += float(x[row + p]) * acc[r][cc];
            dx[row + p] = T(Dh * float(dy[row + p]) + dtj * acc[r][cc]);
        }
    }
    const float ddt_direct = tile_row_sum(dpart, ms);
    const float vrow = tile_row_sum(vpart, ms);
    if (tid < BM && j0 + tid < len) {
        const int t = t0 + j0 + tid;
        ddt[d.dt(b, t, h)] = T(ddt_direct);
        v_state[(size_t)bh * d.T_ + t] = sdt[j0 + tid] * vrow;
    }
}

// dx on the tensor cores, for fp32 storage under Dims::tc (P, N multiples of 4; dy, x, Bm, Cm 16-byte aligned, dx
// 8-byte: launch_bwd_dx checks). The same outputs and grid as ssd_bwd_dx_kernel, in chunk_output_tc's pattern
// mirrored: the block's 64 rows j of B stay staged; the state part B_j·dS_outᵀ is one product on the staged dS_out,
// scaled by exp(cum_last − cum_j) in registers; per causal i tile (i ≥ j) the scores B_j·C_iᵀ are masked and weighted
// by exp(cum_i − cum_j) in registers and multiply the i tile of dy. The row sums ⟨x_j, ·⟩ are taken in registers,
// across a quad of lanes and then across the two warps of a row block, in a fixed order.
template <int NF, int PF, typename DY, typename X>
__global__ void __launch_bounds__(NT, TC_MIN_BLOCKS)
ssd_bwd_dx_tc_kernel(float* dx, float* ddt, float* v_state, const DY* dy, const float* slots, const X* x,
                     const float* dt, const float* A, const X* Bm, const X* Cm, const float* D, Dims d) {
    constexpr int LN = NF + 8, LP = PF + 8, WP = PF / 2;  // row strides; a warp's columns p
    const int c = blockIdx.y, bh = blockIdx.z, b = bh / d.H, h = bh % d.H, g = h / d.hpg();
    const int t0 = c * d.Q, len = d.chunk_len(c), j0 = blockIdx.x * BM;
    if (j0 >= len) return;
    const int P = d.P, N = d.N, lane = threadIdx.x % 32, wm = threadIdx.x / 32 % 4, wn = threadIdx.x / 128;
    __shared__ float cum[NT], sdt[NT];
    __shared__ float red[2][2][BM];  // (ddt part, v part) × (warp column wn) × row: the cross-warp row sums
    extern __shared__ __align__(16) unsigned char smem_raw[];
    bf16* sb = reinterpret_cast<bf16*>(smem_raw);  // (64, LN) B rows j0 ..
    bf16* sS = sb + BM * LN;                        // (PF, LN) dS_out, rows p; then:
    bf16* sc = sS;                                  // (64, LN) C rows i0 ..
    bf16* sdy = sS + BM * LN;                       // (64, LP) dy rows i0 ..
    chunk_cumsum(cum, sdt, dt + d.dt(b, t0, h), d.H, A[h], len);
    const float cum_last = cum[len - 1];
    const float* dS = slots + d.chunk(bh, c);  // dS_out of this chunk (P, N)
    stage_bf16<false>(
        sb, LN, BM, NF, N, [&](int r) { return j0 + r < len ? Bm + d.bc(b, t0 + j0 + r, g) : nullptr; }, Unscaled{});
    stage_bf16(
        sS, LN, PF, NF, N, [&](int p) { return p < P ? dS + (size_t)p * N : nullptr; }, Unscaled{});
    __syncthreads();
    // state part: exp(cum_last − cum_j)·B_j·dS_outᵀ
    float acc[WP / 8][4];
    mma::zero(acc);
    mma::tile_abt<NF, WP>(acc, sb + 16 * wm * LN, LN, sS + WP * wn * LN, LN);
    const int ra = 16 * wm + lane / 4, rb = ra + 8;  // this lane's two rows of the tile
    const int ja = j0 + ra, jb = j0 + rb;
    const float ea = decay_exp(cum_last - cum[ja]), eb = decay_exp(cum_last - cum[jb]);
    // x at this lane's accumulator positions (zero past the chunk or P: P is a multiple of 4, so p < P covers p + 1)
    auto x_at = [&](int j, int p) {
        return j < len && p < P ? ld2(x + d.x(b, t0 + j, h) + p) : make_float2(0.f, 0.f);
    };
    float va = 0.f, vb = 0.f;  // ⟨x_j, state part⟩ over this lane's columns
#pragma unroll
    for (int n = 0; n < WP / 8; n++) {
        const int p = WP * wn + 8 * n + 2 * (lane % 4);
        acc[n][0] *= ea, acc[n][1] *= ea, acc[n][2] *= eb, acc[n][3] *= eb;
        const float2 xa = x_at(ja, p), xb = x_at(jb, p);
        va += xa.x * acc[n][0] + xa.y * acc[n][1];
        vb += xb.x * acc[n][2] + xb.y * acc[n][3];
    }
    __syncthreads();  // dS_out's space is the C and dy tiles' from here
    // intra-chunk part: causal i tiles from j0 on
    for (int i0 = j0; i0 < len; i0 += BM) {
        stage_bf16<false>(
            sc, LN, BM, NF, N, [&](int r) { return i0 + r < len ? Cm + d.bc(b, t0 + i0 + r, g) : nullptr; },
            Unscaled{});
        stage_bf16(
            sdy, LP, BM, PF, P, [&](int r) { return i0 + r < len ? dy + d.x(b, t0 + i0 + r, h) : nullptr; },
            Unscaled{});
        __syncthreads();
        // scores B_j·C_i, weighted exp(cum_i − cum_j) for i ≥ j, times dy_i (steps i ≥ len: zero C and dy rows)
        causal_tile<NF, WP>(acc, sb + 16 * wm * LN, LN, sc, LN, sdy + WP * wn, LP, j0 + 16 * wm, i0,
                            [&](int j, int i) { return i >= j ? decay_exp(cum[i] - cum[j]) : 0.f; });
        __syncthreads();  // the tiles are restaged next
    }
    // dx = D·dy_j + dt_j·acc_j, two columns a store, and ⟨x_j, acc_j⟩
    const float Dh = D[h];
    float da = 0.f, db = 0.f;
#pragma unroll
    for (int half = 0; half < 2; half++) {
        const int j = half ? jb : ja;
        if (j >= len) continue;
        const size_t row = d.x(b, t0 + j, h);
        const float dtj = sdt[j];
#pragma unroll
        for (int n = 0; n < WP / 8; n++) {
            const int p = WP * wn + 8 * n + 2 * (lane % 4);
            if (p >= P) continue;  // (P is a multiple of 4, so p + 1 < P too)
            const float a0 = acc[n][2 * half], a1 = acc[n][2 * half + 1];
            const float2 xv = x_at(j, p);
            (half ? db : da) += xv.x * a0 + xv.y * a1;
            const float2 dyv = ld2(dy + row + p);
            *reinterpret_cast<float2*>(dx + row + p) = make_float2(Dh * dyv.x + dtj * a0, Dh * dyv.y + dtj * a1);
        }
    }
    // row sums: the quad's four lanes, then the two warps of the row block (fixed order: deterministic)
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
        da += __shfl_xor_sync(0xffffffffu, da, off), db += __shfl_xor_sync(0xffffffffu, db, off);
        va += __shfl_xor_sync(0xffffffffu, va, off), vb += __shfl_xor_sync(0xffffffffu, vb, off);
    }
    if (lane % 4 == 0) red[0][wn][ra] = da, red[0][wn][rb] = db, red[1][wn][ra] = va, red[1][wn][rb] = vb;
    __syncthreads();
    const int r = threadIdx.x;
    if (r < BM && j0 + r < len) {
        const int t = t0 + j0 + r;
        ddt[d.dt(b, t, h)] = red[0][0][r] + red[0][1][r];
        v_state[(size_t)bh * d.T_ + t] = sdt[j0 + r] * (red[1][0][r] + red[1][1][r]);
    }
}

// Launches the dx kernel on the tensor cores when it applies, else ssd_bwd_dx_kernel. dy and x, Bm, Cm: T, or bf16
// under T = float (as for every backward kernel below).
template <typename T, typename DY, typename X>
void launch_bwd_dx(T* dx, T* ddt, float* v_state, const DY* dy, const float* slots, const X* x, const T* dt,
                   const T* A, const X* Bm, const X* Cm, const T* D, const Dims& d, cudaStream_t stream) {
    const dim3 grid(ceil_div(d.T_ < d.Q ? d.T_ : d.Q, BM), d.nchunks, d.B * d.H);
    if constexpr (std::is_same_v<T, float>) {
        if (tc_fits(d, "bwd_dx", {dy, x, Bm, Cm, slots}, {dx})) {
            tc_dispatch(d, [&](auto nf, auto pf) {
                constexpr int NF = decltype(nf)::value, PF = decltype(pf)::value;
                const auto kernel = ssd_bwd_dx_tc_kernel<NF, PF, DY, X>;
                const size_t smem = tc_tile_smem<NF, PF>(NF);
                allow_smem(kernel, smem);
                kernel<<<grid, NT, smem, stream>>>(dx, ddt, v_state, dy, slots, x, dt, A, Bm, Cm, D, d);
            });
            return;
        }
    }
    if (feat_tile(d.P) == 64)
        ssd_bwd_dx_kernel<T, 64, DY, X><<<grid, NT, 0, stream>>>(dx, ddt, v_state, dy, slots, x, dt, A, Bm, Cm, D, d);
    else
        ssd_bwd_dx_kernel<T, 128, DY, X><<<grid, NT, 0, stream>>>(dx, ddt, v_state, dy, slots, x, dt, A, Bm, Cm, D, d);
    cudaCheckLast();
}

// How the heads of a group are split for the dB / dC kernels: each block sums the gradient of
// `heads_per_slice` heads in registers (deterministic, no atomics); with more than one slice per
// group the slices' partial sums are added by ssd_sum_slices_kernel. Largest divisor of H/G ≤ 4:
// enough blocks to fill the GPU at G = 1, little scratch.
inline int ssd_heads_per_slice(int hpg) {
    for (int s = 4; s > 1; s--)
        if (hpg % s == 0) return s;
    return 1;
}

// dB for one 64-step tile j of a chunk, all N columns (BF ≥ N), summed over the heads of one slice:
//   dB[j, :] = Σ_h  exp(cum_last − cum_j)·dt_j·x_jᵀ·dS_out  +  Σ_{i≥j} exp(cum_i − cum_j)·dt_j·(dy_i·x_j)·C_i
// Grid (ceil(min(Q, T)/64), nchunks, B·G·nslices). Per head: one GEMM with K = P for the state part
// (the weight folded into the A operand, so heads accumulate into the same registers), then the
// causal i tiles: the (x·dyᵀ) tile (K = P) in ms, masked and weighted, times the i tile of C (K = 64).
// Writes dBm (one slice per group) or the slice's partial sum part[slice] (B, T, G, N).
template <typename T, int BF, typename DY, typename X>
__global__ void __launch_bounds__(NT, GEMM_MIN_BLOCKS)
ssd_bwd_dB_kernel(T* dBm, float* part, const DY* dy, const float* slots, const X* x, const T* dt, const T* A,
                  const X* Cm, Dims d, int heads_per_slice) {
    const int nslices = d.hpg() / heads_per_slice;
    const int c = blockIdx.y, z = blockIdx.z, s = z % nslices, g = (z / nslices) % d.G, b = z / (nslices * d.G);
    const int t0 = c * d.Q, len = d.chunk_len(c), j0 = blockIdx.x * BM;
    if (j0 >= len) return;
    const int P = d.P, N = d.N;
    __shared__ float cum[NT], sdt[NT];
    __shared__ __align__(32) float sa[KT][BM + PAD];  // (aligned for block_gemm_tc)
    __shared__ __align__(32) float sb[KT][BF + PAD];
    __shared__ float ms[BM][BM + 1];
    const int tid = threadIdx.x, tx = tid % TX, ty = tid / TX;

    float acc[TM][BF / TX];
    zero_acc<BF>(acc);
    for (int hh = 0; hh < heads_per_slice; hh++) {
        const int h = g * d.hpg() + s * heads_per_slice + hh, bh = b * d.H + h;
        chunk_cumsum(cum, sdt, dt + d.dt(b, t0, h), d.H, float(A[h]), len);
        const float cum_last = cum[len - 1];
        const float* dS = slots + d.chunk(bh, c);
        // state part: A(m = j, k = p) = w_j·x[j, p] (along p);  B(k = p, n) = dS[p, n] (along n)
        {
            auto fa = [&](int m, int k) {
                const int j = j0 + m;
                return j < len ? decay_exp(cum_last - cum[j]) * sdt[j] * float(x[d.x(b, t0 + j, h) + k]) : 0.f;
            };
            auto fb = [&](int k, int n) { return n < N ? dS[(size_t)k * N + n] : 0.f; };
            block_gemm<BF, true, false>(acc, P, fa, fb, sa, sb, d.tc);
        }
        for (int i0 = j0; i0 < len; i0 += BM) {
            float gx[TM][BM / TX];
            zero_acc<BM>(gx);
            auto fxj = [&](int m, int k) { return j0 + m < len ? float(x[d.x(b, t0 + j0 + m, h) + k]) : 0.f; };
            auto fdyi = [&](int k, int i) { return i0 + i < len ? float(dy[d.x(b, t0 + i0 + i, h) + k]) : 0.f; };
            block_gemm<BM, true, true>(gx, P, fxj, fdyi, sa, sb, d.tc);
#pragma unroll
            for (int r = 0; r < TM; r++)
#pragma unroll
                for (int cc = 0; cc < BM / TX; cc++) {
                    const int j = j0 + ty * TM + r, i = i0 + tx * (BM / TX) + cc;
                    ms[ty * TM + r][tx * (BM / TX) + cc] =
                        (j <= i && i < len) ? decay_exp(cum[i] - cum[j]) * sdt[j] * gx[r][cc] : 0.f;
                }
            __syncthreads();
            // A(m = j, k = i) = ms[j][i];  B(k = i, n) = C[i, n] (along n)
            auto fm = [&](int m, int k) { return ms[m][k]; };
            auto fc = [&](int k, int n) { return i0 + k < len && n < N ? float(Cm[d.bc(b, t0 + i0 + k, g) + n]) : 0.f; };
            block_gemm<BF, true, false>(acc, BM, fm, fc, sa, sb, d.tc);
        }
    }
    const size_t slice_off = (size_t)s * d.B * d.T_ * d.G * N;
#pragma unroll
    for (int r = 0; r < TM; r++) {
        const int j = j0 + ty * TM + r;
        if (j >= len) continue;
        const size_t row = d.bc(b, t0 + j, g);
#pragma unroll
        for (int cc = 0; cc < BF / TX; cc++) {
            const int n = tx * (BF / TX) + cc;
            if (n >= N) continue;
            if (nslices == 1) dBm[row + n] = T(acc[r][cc]);
            else part[slice_off + row + n] = acc[r][cc];
        }
    }
}

// dC for one 64-step tile i of a chunk, all N columns (BF ≥ N), summed over the heads of one slice:
//   dC^h[i, :] = exp(cum_i)·dy_i·S_in  +  Σ_{j≤i} exp(cum_i − cum_j)·dt_j·(dy_i·x_j)·B_j
// and, per head, cdot[b, h, t] = ⟨C_i, dC^h_i⟩ (the C side of ∂L/∂cum_i). Grid (ceil(min(Q, T)/64),
// nchunks, B·G·nslices). Per head the gradient is built in its own registers (for the dot), then
// added to the slice total. Mirrors chunk_output with dy in place of C and the (dy·xᵀ) tile in ms.
template <typename T, int BF, typename DY, typename X, typename ST>
__global__ void __launch_bounds__(NT, GEMM_MIN_BLOCKS)
ssd_bwd_dC_kernel(T* dCm, float* part, float* cdot, const DY* dy, const ST* chunk_states, const X* x, const T* dt,
                  const T* A, const X* Bm, const X* Cm, Dims d, int heads_per_slice) {
    const int nslices = d.hpg() / heads_per_slice;
    const int c = blockIdx.y, z = blockIdx.z, s = z % nslices, g = (z / nslices) % d.G, b = z / (nslices * d.G);
    const int t0 = c * d.Q, len = d.chunk_len(c), i0 = blockIdx.x * BM;
    if (i0 >= len) return;
    const int P = d.P, N = d.N;
    __shared__ float cum[NT], sdt[NT];
    __shared__ __align__(32) float sa[KT][BM + PAD];  // (aligned for block_gemm_tc)
    __shared__ __align__(32) float sb[KT][BF + PAD];
    __shared__ float ms[BM][BM + 1];
    const int tid = threadIdx.x, tx = tid % TX, ty = tid / TX;

    float acc[TM][BF / TX];
    zero_acc<BF>(acc);
    for (int hh = 0; hh < heads_per_slice; hh++) {
        const int h = g * d.hpg() + s * heads_per_slice + hh, bh = b * d.H + h;
        chunk_cumsum(cum, sdt, dt + d.dt(b, t0, h), d.H, float(A[h]), len);
        const ST* S_in = chunk_states + d.chunk(bh, c);
        float acch[TM][BF / TX];
        zero_acc<BF>(acch);
        // (4): A(m = i, k = p) = exp(cum_i)·dy[i, p] (along p);  B(k = p, n) = S_in[p, n] (along n)
        {
            auto fa = [&](int m, int k) {
                const int i = i0 + m;
                return i < len ? decay_exp(cum[i]) * float(dy[d.x(b, t0 + i, h) + k]) : 0.f;
            };
            auto fb = [&](int k, int n) { return n < N ? float(S_in[(size_t)k * N + n]) : 0.f; };
            block_gemm<BF, true, false>(acch, P, fa, fb, sa, sb, d.tc);
        }
        // (1): causal j tiles
        for (int j0 = 0; j0 <= i0; j0 += BM) {
            float gx[TM][BM / TX];
            zero_acc<BM>(gx);
            auto fdyi = [&](int m, int k) { return i0 + m < len ? float(dy[d.x(b, t0 + i0 + m, h) + k]) : 0.f; };
            auto fxj = [&](int k, int j) { return j0 + j < len ? float(x[d.x(b, t0 + j0 + j, h) + k]) : 0.f; };
            block_gemm<BM, true, true>(gx, P, fdyi, fxj, sa, sb, d.tc);
#pragma unroll
            for (int r = 0; r < TM; r++)
#pragma unroll
                for (int cc = 0; cc < BM / TX; cc++) {
                    const int i = i0 + ty * TM + r, j = j0 + tx * (BM / TX) + cc;
                    ms[ty * TM + r][tx * (BM / TX) + cc] =
                        (j <= i && i < len) ? decay_exp(cum[i] - cum[j]) * sdt[j] * gx[r][cc] : 0.f;
                }
            __syncthreads();
            // A(m = i, k = j) = ms[i][j];  B(k = j, n) = B[j, n] (along n)
            auto fm = [&](int m, int k) { return ms[m][k]; };
            auto fbj = [&](int k, int n) { return j0 + k < len && n < N ? float(Bm[d.bc(b, t0 + j0 + k, g) + n]) : 0.f; };
            block_gemm<BF, true, false>(acch, BM, fm, fbj, sa, sb, d.tc);
        }
        // ⟨C_i, dC^h_i⟩, then add the head to the slice total
        float cpart[TM];
#pragma unroll
        for (int r = 0; r < TM; r++) {
            cpart[r] = 0.f;
            const int i = i0 + ty * TM + r;
#pragma unroll
            for (int cc = 0; cc < BF / TX; cc++) {
                const int n = tx * (BF / TX) + cc;
                if (i < len && n < N) cpart[r] += float(Cm[d.bc(b, t0 + i, g) + n]) * acch[r][cc];
                acc[r][cc] += acch[r][cc];
            }
        }
        const float crow = tile_row_sum(cpart, ms);
        if (tid < BM && i0 + tid < len) cdot[(size_t)bh * d.T_ + t0 + i0 + tid] = crow;
    }
    const size_t slice_off = (size_t)s * d.B * d.T_ * d.G * N;
#pragma unroll
    for (int r = 0; r < TM; r++) {
        const int i = i0 + ty * TM + r;
        if (i >= len) continue;
        const size_t row = d.bc(b, t0 + i, g);
#pragma unroll
        for (int cc = 0; cc < BF / TX; cc++) {
            const int n = tx * (BF / TX) + cc;
            if (n >= N) continue;
            if (nslices == 1) dCm[row + n] = T(acc[r][cc]);
            else part[slice_off + row + n] = acc[r][cc];
        }
    }
}

// Stores a warp's 16 × WN accumulator tile of a block's 64 × N output (rows ra = 16·wm + lane / 4 and ra + 8;
// columns WN·wn + 8n + 2·(lane % 4), two at a time) into a (B, T, G, N) tensor at rows t0 + r0 + row < t0 + len.
template <int WN>
__device__ inline void store_bc_tile(float* dst, const float (&acc)[WN / 8][4], const Dims& d, int b, int g, int t0,
                                     int r0, int len) {
    const int lane = threadIdx.x % 32, wm = threadIdx.x / 32 % 4, wn = threadIdx.x / 128;
#pragma unroll
    for (int half = 0; half < 2; half++) {
        const int r = r0 + 16 * wm + lane / 4 + 8 * half;
        if (r >= len) continue;
        float* row = dst + d.bc(b, t0 + r, g);
#pragma unroll
        for (int n = 0; n < WN / 8; n++) {
            const int col = WN * wn + 8 * n + 2 * (lane % 4);
            if (col < d.N)  // (N is a multiple of 4, so col + 1 < N too)
                *reinterpret_cast<float2*>(row + col) = make_float2(acc[n][2 * half], acc[n][2 * half + 1]);
        }
    }
}

// dB on the tensor cores, for fp32 storage under Dims::tc (launch_bwd_dB checks the fit). The same sums, grid and
// outputs as ssd_bwd_dB_kernel, in bwd_dx_tc's pattern with x in place of B: per head, the block's 64 rows j of
// dt_j·x_j are staged as bf16 and stay; the state part (dt_j·x_j)·dS_out is one product (K = P) on the staged
// dS_out, scaled by exp(cum_last − cum_j) in registers and added to the slice total; per causal i tile the scores
// (dt_j·x_j)·dy_iᵀ (K = P) are masked and weighted by exp(cum_i − cum_j) in registers and multiply the i tile of C,
// straight into the total. Each warp: 16 rows j × NF/2 columns n (both warps of a row block compute the scores).
template <int NF, int PF, typename DY, typename X>
__global__ void __launch_bounds__(NT, TC_MIN_BLOCKS)
ssd_bwd_dB_tc_kernel(float* dBm, float* part, const DY* dy, const float* slots, const X* x, const float* dt,
                     const float* A, const X* Cm, Dims d, int heads_per_slice) {
    constexpr int LN = NF + 8, LP = PF + 8, WN = NF / 2;  // row strides; a warp's columns n
    const int nslices = d.hpg() / heads_per_slice;
    const int c = blockIdx.y, z = blockIdx.z, s = z % nslices, g = (z / nslices) % d.G, b = z / (nslices * d.G);
    const int t0 = c * d.Q, len = d.chunk_len(c), j0 = blockIdx.x * BM;
    if (j0 >= len) return;
    const int P = d.P, N = d.N, lane = threadIdx.x % 32, wm = threadIdx.x / 32 % 4, wn = threadIdx.x / 128;
    __shared__ float cum[NT], sdt[NT];
    extern __shared__ __align__(16) unsigned char smem_raw[];
    bf16* sx = reinterpret_cast<bf16*>(smem_raw);  // (64, LP) dt_j·x_j, rows j0 ..
    bf16* sS = sx + BM * LP;                        // (PF, LN) dS_out, rows p; then:
    bf16* sdy = sS;                                 // (64, LP) dy rows i0 ..
    bf16* sc = sS + BM * LP;                        // (64, LN) C rows i0 ..
    const int ja = j0 + 16 * wm + lane / 4, jb = ja + 8;  // this lane's two rows (< NT: j0 + 63 < Q)
    float acc[WN / 8][4];  // the slice total
    mma::zero(acc);
    for (int hh = 0; hh < heads_per_slice; hh++) {
        const int h = g * d.hpg() + s * heads_per_slice + hh, bh = b * d.H + h;
        chunk_cumsum(cum, sdt, dt + d.dt(b, t0, h), d.H, A[h], len);
        const float* dS = slots + d.chunk(bh, c);  // dS_out of this chunk (P, N)
        stage_bf16<false>(
            sx, LP, BM, PF, P, [&](int r) { return j0 + r < len ? x + d.x(b, t0 + j0 + r, h) : nullptr; },
            [&](int r) { return sdt[j0 + r]; });
        stage_bf16(
            sS, LN, PF, NF, N, [&](int p) { return p < P ? dS + (size_t)p * N : nullptr; }, Unscaled{});
        __syncthreads();
        {  // state part: exp(cum_last − cum_j)·(dt_j·x_j)·dS_out
            float st[WN / 8][4];
            mma::zero(st);
            mma::tile_ab<PF, WN>(st, sx + 16 * wm * LP, LP, sS + WN * wn, LN);
            const float cum_last = cum[len - 1];
            const float ea = decay_exp(cum_last - cum[ja]), eb = decay_exp(cum_last - cum[jb]);
#pragma unroll
            for (int n = 0; n < WN / 8; n++)
                acc[n][0] += ea * st[n][0], acc[n][1] += ea * st[n][1], acc[n][2] += eb * st[n][2],
                    acc[n][3] += eb * st[n][3];
        }
        __syncthreads();  // dS_out's space is the dy and C tiles' from here
        for (int i0 = j0; i0 < len; i0 += BM) {
            stage_bf16<false>(
                sdy, LP, BM, PF, P, [&](int r) { return i0 + r < len ? dy + d.x(b, t0 + i0 + r, h) : nullptr; },
                Unscaled{});
            stage_bf16(
                sc, LN, BM, NF, N, [&](int r) { return i0 + r < len ? Cm + d.bc(b, t0 + i0 + r, g) : nullptr; },
                Unscaled{});
            __syncthreads();
            // scores (dt_j·x_j)·dy_i, weighted exp(cum_i − cum_j) for i ≥ j, times C_i (steps i ≥ len: zero rows)
            causal_tile<PF, WN>(acc, sx + 16 * wm * LP, LP, sdy, LP, sc + WN * wn, LN, j0 + 16 * wm, i0,
                                [&](int j, int i) { return i >= j ? decay_exp(cum[i] - cum[j]) : 0.f; });
            __syncthreads();  // the tiles are restaged next (and x, cum with the next head)
        }
    }
    store_bc_tile<WN>(nslices == 1 ? dBm : part + (size_t)s * d.B * d.T_ * d.G * N, acc, d, b, g, t0, j0, len);
}

// dC on the tensor cores, for fp32 storage under Dims::tc (launch_bwd_dC checks the fit). The same sums, grid and
// outputs as ssd_bwd_dC_kernel, in chunk_output_tc's pattern with dy in place of C: per head, the block's 64 rows i
// of dy are staged as bf16 and stay; the head's dC^h starts as dy_i·S_in (K = P) on the staged S_in, scaled by
// exp(cum_i) in registers; per causal j tile the scores dy_i·x_jᵀ (K = P) are masked and weighted by
// exp(cum_i − cum_j)·dt_j in registers and multiply the j tile of B. ⟨C_i, dC^h_i⟩ is taken from the registers
// (quad, then the row block's two warps, fixed order); then dC^h is added to the slice total, which stays in shared
// memory (fp32, each thread its own elements) so that only one head's accumulators live in registers.
template <int NF, int PF>
__host__ __device__ constexpr size_t dC_tc_smem() {
    return tc_tile_smem<NF, PF>(PF) + sizeof(float) * BM * (NF + 8);
}
template <int NF, int PF, typename DY, typename X, typename ST>
__global__ void __launch_bounds__(NT, GEMM_MIN_BLOCKS)
ssd_bwd_dC_tc_kernel(float* dCm, float* part, float* cdot, const DY* dy, const ST* chunk_states, const X* x,
                     const float* dt, const float* A, const X* Bm, const X* Cm, Dims d, int heads_per_slice) {
    constexpr int LN = NF + 8, LP = PF + 8, WN = NF / 2, LT = NF + 8;  // row strides; a warp's columns n
    const int nslices = d.hpg() / heads_per_slice;
    const int c = blockIdx.y, z = blockIdx.z, s = z % nslices, g = (z / nslices) % d.G, b = z / (nslices * d.G);
    const int t0 = c * d.Q, len = d.chunk_len(c), i0 = blockIdx.x * BM;
    if (i0 >= len) return;
    const int P = d.P, N = d.N, lane = threadIdx.x % 32, wm = threadIdx.x / 32 % 4, wn = threadIdx.x / 128;
    __shared__ float cum[NT], sdt[NT];
    __shared__ float red[2][BM];  // (warp column wn) × row: the cross-warp sums of ⟨C_i, dC^h_i⟩
    extern __shared__ __align__(16) unsigned char smem_raw[];
    bf16* sdy = reinterpret_cast<bf16*>(smem_raw);  // (64, LP) dy rows i0 ..
    bf16* sS = sdy + BM * LP;                        // (PF, LN) S_in, rows p; then:
    bf16* sx = sS;                                   // (64, LP) x rows j0 ..
    bf16* sB = sS + BM * LP;                         // (64, LN) B rows j0 ..
    float* tot = reinterpret_cast<float*>(smem_raw + tc_tile_smem<NF, PF>(PF));  // (64, LT) the slice total
    const int ra = 16 * wm + lane / 4, rb = ra + 8;  // this lane's two rows of the tile
    const int ia = i0 + ra, ib = i0 + rb;
    for (int hh = 0; hh < heads_per_slice; hh++) {
        const int h = g * d.hpg() + s * heads_per_slice + hh, bh = b * d.H + h;
        chunk_cumsum(cum, sdt, dt + d.dt(b, t0, h), d.H, A[h], len);
        const ST* S_in = chunk_states + d.chunk(bh, c);  // (P, N)
        stage_bf16<false>(
            sdy, LP, BM, PF, P, [&](int r) { return i0 + r < len ? dy + d.x(b, t0 + i0 + r, h) : nullptr; },
            Unscaled{});
        stage_bf16(
            sS, LN, PF, NF, N, [&](int p) { return p < P ? S_in + (size_t)p * N : nullptr; }, Unscaled{});
        __syncthreads();
        // (4): exp(cum_i)·dy_i·S_in
        float acc[WN / 8][4];
        mma::zero(acc);
        mma::tile_ab<PF, WN>(acc, sdy + 16 * wm * LP, LP, sS + WN * wn, LN);
        const float ea = decay_exp(cum[ia]), eb = decay_exp(cum[ib]);
#pragma unroll
        for (int n = 0; n < WN / 8; n++) acc[n][0] *= ea, acc[n][1] *= ea, acc[n][2] *= eb, acc[n][3] *= eb;
        __syncthreads();  // S_in's space is the x and B tiles' from here
        // (1): causal j tiles
        for (int j0 = 0; j0 <= i0; j0 += BM) {
            stage_bf16<false>(
                sx, LP, BM, PF, P, [&](int r) { return j0 + r < len ? x + d.x(b, t0 + j0 + r, h) : nullptr; },
                Unscaled{});
            stage_bf16(
                sB, LN, BM, NF, N, [&](int r) { return j0 + r < len ? Bm + d.bc(b, t0 + j0 + r, g) : nullptr; },
                Unscaled{});
            __syncthreads();
            // scores dy_i·x_j, weighted exp(cum_i − cum_j)·dt_j for j ≤ i, times B_j (steps j ≥ len have sdt 0)
            causal_tile<PF, WN>(acc, sdy + 16 * wm * LP, LP, sx, LP, sB + WN * wn, LN, i0 + 16 * wm, j0,
                                [&](int i, int j) { return j <= i ? decay_exp(cum[i] - cum[j]) * sdt[j] : 0.f; });
            __syncthreads();  // the tiles are restaged next (and dy, cum with the next head)
        }
        // ⟨C_i, dC^h_i⟩ over this lane's columns, then the quad, then the two warps of the row block; the head's
        // share added to the slice total
        float ca = 0.f, cb = 0.f;
#pragma unroll
        for (int n = 0; n < WN / 8; n++) {
            const int col = WN * wn + 8 * n + 2 * (lane % 4);
            if (col < N) {  // (N is a multiple of 4, so col + 1 < N too)
                if (ia < len) {
                    const float2 cv = ld2(Cm + d.bc(b, t0 + ia, g) + col);
                    ca += cv.x * acc[n][0] + cv.y * acc[n][1];
                }
                if (ib < len) {
                    const float2 cv = ld2(Cm + d.bc(b, t0 + ib, g) + col);
                    cb += cv.x * acc[n][2] + cv.y * acc[n][3];
                }
            }
            float2* ta = reinterpret_cast<float2*>(tot + ra * LT + col);
            float2* tb = reinterpret_cast<float2*>(tot + rb * LT + col);
            const float2 pa2 = hh ? *ta : make_float2(0.f, 0.f), pb2 = hh ? *tb : make_float2(0.f, 0.f);
            *ta = make_float2(pa2.x + acc[n][0], pa2.y + acc[n][1]);
            *tb = make_float2(pb2.x + acc[n][2], pb2.y + acc[n][3]);
        }
#pragma unroll
        for (int off = 1; off < 4; off <<= 1)
            ca += __shfl_xor_sync(0xffffffffu, ca, off), cb += __shfl_xor_sync(0xffffffffu, cb, off);
        if (lane % 4 == 0) red[wn][ra] = ca, red[wn][rb] = cb;
        __syncthreads();
        const int r = threadIdx.x;
        if (r < BM && i0 + r < len) cdot[(size_t)bh * d.T_ + t0 + i0 + r] = red[0][r] + red[1][r];
        // (red is next written after the next head's barriers)
    }
    // the slice total, from this thread's own elements of tot
    float acc[WN / 8][4];
#pragma unroll
    for (int n = 0; n < WN / 8; n++) {
        const int col = WN * wn + 8 * n + 2 * (lane % 4);
        const float2 va = *reinterpret_cast<const float2*>(tot + ra * LT + col);
        const float2 vb = *reinterpret_cast<const float2*>(tot + rb * LT + col);
        acc[n][0] = va.x, acc[n][1] = va.y, acc[n][2] = vb.x, acc[n][3] = vb.y;
    }
    store_bc_tile<WN>(nslices == 1 ? dCm : part + (size_t)s * d.B * d.T_ * d.G * N, acc, d, b, g, t0, i0, len);
}

// Launch dB and dC (summed over the heads of each slice of a group; grid (tiles, chunks, B·G·slices)) on the
// tensor-core kernels when they apply, else on the block-GEMM ones.
template <typename T, typename DY, typename X>
void launch_bwd_dB(T* dBm, float* part, const DY* dy, const float* slots, const X* x, const T* dt, const T* A,
                   const X* Cm, const Dims& d, int hps, cudaStream_t stream) {
    const dim3 grid(ceil_div(d.T_ < d.Q ? d.T_ : d.Q, BM), d.nchunks, d.B * d.G * (d.hpg() / hps));
    if constexpr (std::is_same_v<T, float>) {
        if (tc_fits(d, "bwd_dB", {dy, slots, x, Cm}, {dBm, part})) {
            tc_dispatch(d, [&](auto nf, auto pf) {
                constexpr int NF = decltype(nf)::value, PF = decltype(pf)::value;
                const auto kernel = ssd_bwd_dB_tc_kernel<NF, PF, DY, X>;
                const size_t smem = tc_tile_smem<NF, PF>(PF);
                allow_smem(kernel, smem);
                kernel<<<grid, NT, smem, stream>>>(dBm, part, dy, slots, x, dt, A, Cm, d, hps);
            });
            return;
        }
    }
    if (feat_tile(d.N) == 64)
        ssd_bwd_dB_kernel<T, 64, DY, X><<<grid, NT, 0, stream>>>(dBm, part, dy, slots, x, dt, A, Cm, d, hps);
    else
        ssd_bwd_dB_kernel<T, 128, DY, X><<<grid, NT, 0, stream>>>(dBm, part, dy, slots, x, dt, A, Cm, d, hps);
    cudaCheckLast();
}
template <typename T, typename DY, typename X, typename ST>
void launch_bwd_dC(T* dCm, float* part, float* cdot, const DY* dy, const ST* chunk_states, const X* x, const T* dt,
                   const T* A, const X* Bm, const X* Cm, const Dims& d, int hps, cudaStream_t stream) {
    const dim3 grid(ceil_div(d.T_ < d.Q ? d.T_ : d.Q, BM), d.nchunks, d.B * d.G * (d.hpg() / hps));
    if constexpr (std::is_same_v<T, float>) {
        if (tc_fits(d, "bwd_dC", {dy, chunk_states, x, Bm}, {Cm, dCm, part})) {
            tc_dispatch(d, [&](auto nf, auto pf) {
                constexpr int NF = decltype(nf)::value, PF = decltype(pf)::value;
                const auto kernel = ssd_bwd_dC_tc_kernel<NF, PF, DY, X, ST>;
                const size_t smem = dC_tc_smem<NF, PF>();
                allow_smem(kernel, smem);
                kernel<<<grid, NT, smem, stream>>>(dCm, part, cdot, dy, chunk_states, x, dt, A, Bm, Cm, d, hps);
            });
            return;
        }
    }
    if (feat_tile(d.N) == 64)
        ssd_bwd_dC_kernel<T, 64, DY, X, ST><<<grid, NT, 0, stream>>>(dCm, part, cdot, dy, chunk_states, x, dt, A, Bm,
                                                                     Cm, d, hps);
    else
        ssd_bwd_dC_kernel<T, 128, DY, X, ST><<<grid, NT, 0, stream>>>(dCm, part, cdot, dy, chunk_states, x, dt, A, Bm,
                                                                      Cm, d, hps);
    cudaCheckLast();
}

// out[i] = Σ_{s<nslices} part[s·n + i], in slice order (deterministic). Grid-stride over the n
// elements of a (B, T, G, N) tensor; one thread per element, coalesced.
template <typename T>
__global__ void __launch_bounds__(NT) ssd_sum_slices_kernel(T* out, const float* part, size_t n, int nslices) {
    for (size_t i = (size_t)blockIdx.x * NT + threadIdx.x; i < n; i += (size_t)gridDim.x * NT) {
        float s = 0.f;
        for (int k = 0; k < nslices; k++) s += part[(size_t)k * n + i];
        out[i] = T(s);
    }
}

// Per (b, c, h), one thread per step i of the chunk:
//   ∂L/∂cum_i = cdot_i − dt_i·ddt_direct_i + [i = len−1]·(Σ_j v_j + Σ_parts dot_part)
//   ∂L/∂a_i   = Σ_{i' ≥ i} ∂L/∂cum_i'   (reverse Hillis–Steele scan in shared memory)
//   ddt_i     = ddt_direct_i + A_h·∂L/∂a_i;   dA_part = Σ_i dt_i·∂L/∂a_i;   dD_part = Σ_{i,p} dy·x
// Grid (nchunks, B·H). The partial dA, dD go to (B, H, nchunks) scratch for head_grads.
template <typename T, typename DY, typename X>
__global__ void __launch_bounds__(NT) ssd_bwd_finalize_kernel(T* ddt, float* dA_part, float* dD_part,
                                                              const float* cdot, const float* v_state,
                                                              const float* dot_part, int nparts, const DY* dy,
                                                              const X* x, const T* dt, const T* A, Dims d) {
    const int c = blockIdx.x, bh = blockIdx.y, b = bh / d.H, h = bh % d.H;
    const int t0 = c * d.Q, len = d.chunk_len(c), i = threadIdx.x;
    __shared__ float red[NT], s[NT];
    const bool valid = i < len;
    const size_t it = valid ? d.dt(b, t0 + i, h) : 0;
    const float dti = valid ? float(dt[it]) : 0.f;
    const float direct = valid ? float(ddt[it]) : 0.f;
    float e = valid ? v_state[(size_t)bh * d.T_ + t0 + i] : 0.f;
    for (int k = i; k < nparts; k += NT) e += dot_part[((size_t)bh * d.nchunks + c) * nparts + k];
    const float E = block_sum(e, red);
    s[i] = valid ? cdot[(size_t)bh * d.T_ + t0 + i] - dti * direct + (i == len - 1 ? E : 0.f) : 0.f;
    for (int off = 1; off < NT; off <<= 1) {  // reverse inclusive scan
        __syncthreads();
        const float v = i + off < NT ? s[i + off] : 0.f;
        __syncthreads();
        s[i] += v;
    }
    __syncthreads();
    const float da = s[i];
    if (valid) ddt[it] = T(direct + float(A[h]) * da);
    const float dA_c = block_sum(dti * da, red);
    float dd = 0.f;
    for (int e = i; e < len * d.P; e += NT) {
        const size_t k = d.x(b, t0 + e / d.P, h) + e % d.P;
        dd += float(dy[k]) * float(x[k]);
    }
    const float dD_c = block_sum(dd, red);
    if (i == 0) {
        dA_part[(size_t)bh * d.nchunks + c] = dA_c;
        dD_part[(size_t)bh * d.nchunks + c] = dD_c;
    }
}

// dA[h] += Σ_{b, c} dA_part[b, h, c], the same for dD: one thread per head, fixed order.
template <typename T>
__global__ void __launch_bounds__(NT) ssd_head_grads_kernel(T* dA, T* dD, const float* dA_part, const float* dD_part,
                                                            Dims d) {
    const int h = blockIdx.x * NT + threadIdx.x;
    if (h >= d.H) return;
    float sa = 0.f, sd = 0.f;
    for (int b = 0; b < d.B; b++)
        for (int c = 0; c < d.nchunks; c++) {
            sa += dA_part[((size_t)b * d.H + h) * d.nchunks + c];
            sd += dD_part[((size_t)b * d.H + h) * d.nchunks + c];
        }
    dA[h] = T(float(dA[h]) + sa);
    dD[h] = T(float(dD[h]) + sd);
}

// Whether a bf16 run's scan takes the tensor cores (block_gemm_tc and the ..._tc_kernels; on by default in
// train_gpu --precision bf16, off with --no-ssd-tensor-cores). H200, dev/cuda/ssd.cu, fwd+bwd: 6.6 → 4.4 ms at the
// 100m layer (Q = 64), 6.6 → 4.1 ms at the 350m one (Q = 256). Over ten seeds of mamba2 (preset small, 500 steps)
// its mean validation loss is fp32's to 0.03% (README, "Mixed precision"; measured before the ..._tc_kernels); one
// seed alone moves that loss by up to 1.8%. The fp32 FMA path stays for fp32 runs and the CPU comparisons.
inline bool& ssd_tensor_cores() {
    static bool on = false;  // train_gpu sets it; the playground and the tests choose per case
    return on;
}

// Checks shared by forward and backward; returns the sizes.
inline Dims ssd_dims(const char* who, int B, int T_, int H, int P, int G, int N, int Q) {
    ssd_shape(who, B, T_, H, P, G, N);  // positive sizes, G divides H
    HL_CHECK(Q >= 1 && Q <= SSD_MAX_CHUNK, who, ": chunk length Q=", Q, " must be in [1, ", SSD_MAX_CHUNK, "]");
    HL_CHECK(P <= MAX_FEAT && N <= MAX_FEAT, who, ": headdim P=", P, " and d_state N=", N,
             " must be <= ", MAX_FEAT, " on the GPU");
    const int nchunks = ssd_num_chunks(T_, Q);
    HL_CHECK((long long)B * H <= 65535 && nchunks <= 65535, who,
             ": B·H=", (long long)B * H, " and nchunks=", nchunks, " must be <= 65535 (grid limits)");
    Dims d{B, T_, H, P, G, N, Q, nchunks};
    d.tc = ssd_tensor_cores() && current_bf16() != nullptr;
    return d;
}

// The backward's scratch, carved in this order out of one float buffer.
struct BwdScratch {
    float* slots;     // (B, H, nchunks, P, N)  dS_out of every chunk
    float* dot_part;  // (B, H, nchunks, nparts)
    float* v_state;   // (B, H, T)
    float* cdot;      // (B, H, T)
    float* dA_part;   // (B, H, nchunks)
    float* dD_part;   // (B, H, nchunks)
    float* dB_part;   // (nslices, B, T, G, N)  only when a group has several head slices
    float* dC_part;   // (nslices, B, T, G, N)
    size_t total;
    int nsplit, nparts, nslices;  // the state passes' blocks per (b, h); their warps (dot_part's shares); slices
};

inline BwdScratch bwd_scratch(float* base, const Dims& d) {
    BwdScratch s{};
    s.nsplit = d.pass_blocks();
    s.nparts = s.nsplit * (NT / 32);
    s.nslices = d.hpg() / ssd_heads_per_slice(d.hpg());
    const size_t BH = (size_t)d.B * d.H;
    const size_t part = s.nslices > 1 ? (size_t)s.nslices * d.B * d.T_ * d.G * d.N : 0;
    size_t off = 0;
    auto take = [&](size_t n) {  // each part a multiple of 4 floats: 16-byte aligned when base is (tc_fits)
        float* p = base ? base + off : nullptr;
        off += (n + 3) / 4 * 4;
        return p;
    };
    s.slots = take(BH * d.nchunks * d.PN());
    s.dot_part = take(BH * d.nchunks * s.nparts);
    s.v_state = take(BH * d.T_);
    s.cdot = take(BH * d.T_);
    s.dA_part = take(BH * d.nchunks);
    s.dD_part = take(BH * d.nchunks);
    s.dB_part = take(part);
    s.dC_part = take(part);
    s.total = off;
    return s;
}

}  // namespace ssd_detail

// Whether the scan's backward rounds dy to bf16 in every product (bf16 operands in effect and the SSD on the tensor
// cores): a producer of dy may then write it in bf16 for ssd_chunked_backward (Mamba-2's gate does). Not with
// --no-ssd-tensor-cores, whose scan stays fp32 from its input on.
inline bool ssd_bf16_dy() { return ssd_detail::ssd_tensor_cores() && current_bf16() != nullptr; }

// Floats of scratch ssd_chunked_backward needs (the GPU's layout differs from the CPU's
// ssd_backward_scratch_size: it keeps dS_out of every chunk, ≈ B·H·nchunks·P·N floats, plus
// O(B·H·T) and, when H/G > 4, the per-slice partial sums of dB and dC).
inline size_t ssd_chunked_backward_scratch_size(int B, int T_, int H, int P, int G, int N, int Q) {
    const ssd_detail::Dims d = ssd_detail::ssd_dims("ssd_chunked_backward_scratch_size", B, T_, H, P, G, N, Q);
    return ssd_detail::bwd_scratch(nullptr, d).total;
}

// y (B,T,H,P) and chunk_states (B,H,nchunks,P,N) — the state entering each chunk — are written;
// final_state (B,H,P,N) too when non-null. init_state (B,H,P,N) or null (zeros). Device pointers;
// three launches on `stream`, no allocation, no sync. Same arguments as model/ssd.h. y may be bf16 under T = float
// (Y): the output rounded once as it is stored, for readers that take it in bf16 (nothing in the backward reads y).
// x, Bm, Cm may be bf16 under T = float (X; Mamba-2's conv writes them so under bf16 operands, as autocast's conv
// does): the products round them to bf16 anyway, and the rest (the D·x skip) reads the same values as from fp32
// tensors holding them. chunk_states may be bf16 under T = float too (ST; Mamba-2's under bf16 operands, as
// mamba_ssm keeps them): each state is passed on in fp32 registers and rounded once as it is stored, where the
// products read it rounded anyway; its fp32 local states (before the passing) then go to local_states, (B, H, nchunks,
// P, N) floats of caller-owned scratch (the backward's scratch will do: it is at least that large), instead of in
// place.
template <typename T, typename Y, typename X, typename ST>
void ssd_chunked_forward(Y* y, ST* chunk_states, const X* x, const T* dt, const T* A, const X* Bm, const X* Cm,
                         const T* D, const T* init_state, T* final_state, int B, int T_, int H, int P, int G, int N,
                         int Q, cudaStream_t stream = 0, float* local_states = nullptr) {
    using namespace ssd_detail;
    static_assert(std::is_same_v<ST, T> || std::is_same_v<T, float>, "bf16 chunk states under T = float only");
    const Dims d = ssd_dims("ssd_chunked_forward", B, T_, H, P, G, N, Q);
    const dim3 pass_grid(d.pass_blocks(), B * H);
    if constexpr (std::is_same_v<ST, T>) {
        // 1. each chunk's end state from zero → chunk_states[c + 1] / final_state
        launch_chunk_state<false>(chunk_states, final_state, x, dt, A, Bm, d, stream);
        // 2. pass the states across chunks, in place
        ssd_state_pass_kernel<T, ST, T><<<pass_grid, NT, 0, stream>>>(chunk_states, chunk_states, final_state,
                                                                      init_state, dt, A, d);
    } else {
        HL_CHECK(local_states, "ssd_chunked_forward: bf16 chunk states need local_states (B·H·nchunks·P·N floats)");
        // 1. → local_states[c + 1] / final_state;  2. passed from there into chunk_states
        launch_chunk_state<false>(local_states, final_state, x, dt, A, Bm, d, stream);
        ssd_state_pass_kernel<T, ST, float><<<pass_grid, NT, 0, stream>>>(chunk_states, local_states, final_state,
                                                                          init_state, dt, A, d);
    }
    cudaCheckLast();
    // 3. the outputs
    launch_chunk_output(y, chunk_states, x, dt, A, Bm, Cm, D, d, stream);
}

// Backward of ssd_chunked_forward, from the saved chunk_states. dx, ddt, dBm, dCm and dinit_state
// (when non-null) are written; dA, dD accumulate. dfinal_state may be null (no gradient reaches the
// final state). scratch: ssd_chunked_backward_scratch_size(...) floats, caller-owned. Same
// arguments as model/ssd.h (scratch is float whatever T is); eight launches on `stream`. dy may be bf16 under
// T = float (DY; Mamba-2's gate writes it so under bf16 operands): its products round it to bf16 anyway, and the
// rest (dx's D·dy, dD) read the same values as from an fp32 dy holding them. x, Bm, Cm and chunk_states: as the
// forward took and wrote them (X, ST: T, or bf16 under T = float).
template <typename T, typename DY, typename X, typename ST>
void ssd_chunked_backward(T* dx, T* ddt, T* dA, T* dBm, T* dCm, T* dD, T* dinit_state, float* scratch, const DY* dy,
                          const T* dfinal_state, const ST* chunk_states, const X* x, const T* dt, const T* A,
                          const X* Bm, const X* Cm, const T* D, int B, int T_, int H, int P, int G, int N, int Q,
                          cudaStream_t stream = 0) {
    using namespace ssd_detail;
    const Dims d = ssd_dims("ssd_chunked_backward", B, T_, H, P, G, N, Q);
    HL_CHECK(scratch, "ssd_chunked_backward: scratch must hold ssd_chunked_backward_scratch_size(...) floats");
    const BwdScratch s = bwd_scratch(scratch, d);
    const int hps = ssd_heads_per_slice(d.hpg());
    // 1. each chunk's own share of dS_in: Σ_i exp(cum_i)·dy_i ⊗ C_i → slot c − 1 / dinit_state
    launch_chunk_state<true>(s.slots, dinit_state, dy, dt, A, Cm, d, stream);
    // 2. reverse state passing: dS_out of every chunk, dinit_state, and the ⟨dS_out, S_in⟩ partials
    ssd_state_pass_bwd_kernel<T, ST><<<dim3(s.nsplit, B * H), NT, 0, stream>>>(s.slots, dinit_state, s.dot_part,
                                                                               dfinal_state, chunk_states, dt, A, d);
    cudaCheckLast();
    // 3. dx and the direct part of ddt
    launch_bwd_dx(dx, ddt, s.v_state, dy, s.slots, x, dt, A, Bm, Cm, D, d, stream);
    // 4., 5. dB and dC, summed over the heads of each slice of a group
    launch_bwd_dB(dBm, s.dB_part, dy, s.slots, x, dt, A, Cm, d, hps, stream);
    launch_bwd_dC(dCm, s.dC_part, s.cdot, dy, chunk_states, x, dt, A, Bm, Cm, d, hps, stream);
    // 6. several slices per group: add them up
    if (s.nslices > 1) {
        const size_t n = (size_t)B * T_ * G * N;
        const int blocks = (int)((n + NT - 1) / NT < 4096 ? (n + NT - 1) / NT : 4096);
        ssd_sum_slices_kernel<T><<<blocks, NT, 0, stream>>>(dBm, s.dB_part, n, s.nslices);
        cudaCheckLast();
        ssd_sum_slices_kernel<T><<<blocks, NT, 0, stream>>>(dCm, s.dC_part, n, s.nslices);
        cudaCheckLast();
    }
    // 7. the decay gradients: ddt completed, per-chunk partial dA and dD
    ssd_bwd_finalize_kernel<T, DY, X><<<dim3(d.nchunks, B * H), NT, 0, stream>>>(
        ddt, s.dA_part, s.dD_part, s.cdot, s.v_state, s.dot_part, s.nparts, dy, x, dt, A, d);
    cudaCheckLast();
    // 8. dA, dD += their sums
    ssd_head_grads_kernel<T><<<ceil_div(H, NT), NT, 0, stream>>>(dA, dD, s.dA_part, s.dD_part, d);
    cudaCheckLast();
}

}  // namespace hl::gpu
