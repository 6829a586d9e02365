// embedding.cuh — GPU mirror of model/embedding.h: token embedding lookup and its backward.
//
// Token ids are not range-checked on the device the way the CPU version throws: the caller checks the host
// copy of the batch (hl::embedding_check_tokens) before uploading it. The kernels still never read outside
// wte: a forward row whose id is out of range is written as NaN (loud, not a stray read), and the backward
// simply matches no vocabulary row for it.
//
// Backward, deterministic and atomic-free: one block per (vocabulary row v, tile of 256 columns) scans all N token
// ids, collects (in position order, up to 4096 at a time) the positions that hold v, and adds their dout rows into
// dwte[v]. Positions are added in increasing order starting from the old dwte value, exactly the CPU's order, so the
// fp32 result is bit-identical to the CPU. The cost is O(V·N·D/256) id comparisons, but they are cheap: ids are 4
// bytes read from L2, 8 a thread a step; for V = 256 it is nothing, and even for V = 50257, N = 16384, D = 1024 it is
// ~3 G comparisons (about a millisecond). The dout rows themselves are read exactly once overall. Column tiles, not
// a block per row: with bytes as tokens the most frequent one (a space) owns ~15% of the positions, and its row's
// sum is a serial chain per column; split over D/256 blocks it runs on as many SMs (one block for all 1024 columns
// took 0.73 ms at 100m, B 8, T 2048 on an H200). (A sort-based scheme would be O(N log N) but needs a stable device
// sort; not worth it at these sizes.)
#pragma once
#include <cuda_runtime.h>       // __shfl_up_sync, __popc, __ffs
#include "kernels/common.cuh"   // cudaCheckLast, ceil_div, elementwise_grid, ld4, st4, vec4_aligned
#include "model/common.h"       // HL_CHECK

namespace hl::gpu {

// out (N, D)[n, :] = wte[tokens[n], :]. Grid-stride over the N·D outputs, one thread per element: a warp
// reads 32 consecutive floats of one wte row and writes 32 consecutive outputs (both coalesced).
template <typename T>
__global__ void embedding_forward_kernel(T* out, const int* tokens, const T* wte, size_t total, int V, int D) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const size_t n = i / D;
        const int d = (int)(i % D);
        const int id = tokens[n];
        out[i] = (id >= 0 && id < V) ? wte[(size_t)id * D + d] : T(__int_as_float(0x7fc00000));  // NaN: bad id
    }
}

// The same four elements a thread, for D % 4 == 0 and 16-byte aligned out and wte (every model's width): one
// thread an element took 59 µs for (16384, 1024) fp32 on an H200, half the bandwidth.
template <typename T>
__global__ void embedding_forward4_kernel(T* out, const int* tokens, const T* wte, size_t total4, int V, int D4) {
    const float nan = __int_as_float(0x7fc00000);  // bad id
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total4; i += (size_t)gridDim.x * blockDim.x) {
        const int id = tokens[i / D4];
        st4(out, i, (id >= 0 && id < V) ? ld4(wte + (size_t)id * D4 * 4, i % D4) : make_float4(nan, nan, nan, nan));
    }
}

// out (B, T, D) = wte (V, D) rows picked by tokens (B, T)
template <typename T_>
void embedding_forward(T_* out, const int* tokens, const T_* wte, int B, int T, int V, int D,
                       cudaStream_t stream = 0) {
    HL_CHECK(B >= 0 && T >= 0 && V > 0 && D > 0, "embedding: bad sizes B=", B, " T=", T, " V=", V, " D=", D);
    const size_t total = (size_t)B * T * D;
    if (total == 0) return;
    if (D % 4 == 0 && vec4_aligned(out, wte))
        embedding_forward4_kernel<<<elementwise_grid(total / 4, 256), 256, 0, stream>>>(out, tokens, wte, total / 4,
                                                                                        V, D / 4);
    else
        embedding_forward_kernel<<<elementwise_grid(total, 256), 256, 0, stream>>>(out, tokens, wte, total, V, D);
    cudaCheckLast();
}

constexpr int EMB_BWD_BLOCK = 256;  // threads per (vocabulary row, column tile)
constexpr int EMB_BWD_IDS = 8;      // token ids a thread compares per step: a step covers 2048 positions
constexpr int EMB_BWD_STEP = EMB_BWD_BLOCK * EMB_BWD_IDS;
constexpr int EMB_BWD_CAP = 2 * EMB_BWD_STEP;  // matching positions gathered in shared memory before they are added
constexpr int EMB_BWD_ROWS = 32;    // matching dout rows loaded before they are added (loads in flight)

// dwte (V, D) += Σ_{n : tokens[n] = v} dout[n, :], for v = blockIdx.x, columns blockIdx.y·256 + threadIdx.x.
// grid: (V (grid-stride over v for huge V), ceil(D / 256)), block: 256 threads, a column each.
// Walk the ids in steps of 2048; thread t compares the 8 ids t·8 … t·8 + 7 of the step, an exclusive scan of the
// threads' match counts (warp shuffles, then the 8 warp totals) gives each match its rank, and the matching positions
// are appended to pos in increasing order. When pos could not take another step's matches (or the ids are done),
// every thread adds those dout rows at its column (a warp reads 128 contiguous bytes of a row), EMB_BWD_ROWS rows
// loaded before they are added in order. The accumulator lives in a register, seeded with dwte.
// Nearly every block's time is its walk over the ids (V · D/256 blocks, most of whose ids match rarely), so the walk
// is few steps with many ids in flight. At 100m, B 8, T 2048 on an H200 (ncu, the GPU's own clocks): one id a
// thread a step and the matching rows added after every step, 8 at a time, 0.29 ms; the positions gathered 2048 at a
// time and added 64 rows at a time, 0.25 ms; as here, 0.14 ms.
template <typename T>
__global__ void __launch_bounds__(EMB_BWD_BLOCK, 2)  // (at the default ptxas kept 32 registers: few loads in flight)
    embedding_backward_kernel(T* dwte, const T* dout, const int* tokens, int N, int V, int D) {
    __shared__ int pos[EMB_BWD_CAP];  // matching positions gathered so far, in order
    __shared__ int warp_count[EMB_BWD_BLOCK / 32];
    const int tid = threadIdx.x, lane = tid % 32, wid = tid / 32;
    const int d = blockIdx.y * EMB_BWD_BLOCK + tid;  // this thread's column
    for (int v = blockIdx.x; v < V; v += gridDim.x) {
        T* drow = dwte + (size_t)v * D;  // (D)
        float acc = d < D ? float(drow[d]) : 0.0f;
        bool any = false;
        int count = 0;  // positions in pos (the same in every thread)
        for (int n0 = 0; n0 < N; n0 += EMB_BWD_STEP) {
            const int nb = n0 + tid * EMB_BWD_IDS;  // this thread's ids nb … nb + 7
            unsigned bits = 0;
#pragma unroll
            for (int k = 0; k < EMB_BWD_IDS; k++)
                if (nb + k < N && tokens[nb + k] == v) bits |= 1u << k;
            const int c = __popc(bits);
            int incl = c;  // inclusive scan of the counts over the warp's lanes
#pragma unroll
            for (int off = 1; off < 32; off *= 2) {
                const int y = __shfl_up_sync(0xffffffffu, incl, off);
                if (lane >= off) incl += y;
            }
            if (lane == 31) warp_count[wid] = incl;
            __syncthreads();
            int offset = count + incl - c, total = 0;  // where this thread's matches go, and the step's matches
            for (int k = 0; k < EMB_BWD_BLOCK / 32; k++) {
                offset += k < wid ? warp_count[k] : 0;
                total += warp_count[k];
            }
            for (; bits; bits &= bits - 1) pos[offset++] = nb + __ffs(bits) - 1;  // in increasing position order
            count += total;
            __syncthreads();  // pos written; warp_count read by all before the next step rewrites it
            if (count > EMB_BWD_CAP - EMB_BWD_STEP || n0 + EMB_BWD_STEP >= N) {
                if (d < D)
                    for (int j0 = 0; j0 < count; j0 += EMB_BWD_ROWS) {
                        float x[EMB_BWD_ROWS];
#pragma unroll
                        for (int u = 0; u < EMB_BWD_ROWS; u++)  // unconditional (past the end: the last row again)
                            x[u] = float(__ldg(dout + (size_t)pos[min(j0 + u, count - 1)] * D + d));
#pragma unroll
                        for (int u = 0; u < EMB_BWD_ROWS; u++)
                            acc = j0 + u < count ? acc + x[u] : acc;  // in position order (skipping, not adding 0:
                                                                      // -0 stays)
                    }
                any = any || count > 0;
                count = 0;
                __syncthreads();  // pos is rewritten from the start by the next step
            }
        }
        if (any && d < D) drow[d] = T(acc);
    }
}

// dwte (V, D) += scatter of dout (B, T, D) into the rows of the tokens seen (deterministic, see the top).
template <typename T_>
void embedding_backward(T_* dwte, const T_* dout, const int* tokens, int B, int T, int V, int D,
                        cudaStream_t stream = 0) {
    HL_CHECK(B >= 0 && T >= 0 && V > 0 && D > 0, "embedding: bad sizes B=", B, " T=", T, " V=", V, " D=", D);
    HL_CHECK((long long)B * T < (1ll << 31), "embedding: B·T too large");
    const int N = B * T;
    if (N == 0) return;
    HL_CHECK(ceil_div(D, EMB_BWD_BLOCK) <= 65535, "embedding: D = ", D, " is too large for the backward's grid");
    const dim3 grid(V < (1 << 20) ? V : (1 << 20), ceil_div(D, EMB_BWD_BLOCK));
    embedding_backward_kernel<<<grid, EMB_BWD_BLOCK, 0, stream>>>(dwte, dout, tokens, N, V, D);
    cudaCheckLast();
}

}  // namespace hl::gpu
