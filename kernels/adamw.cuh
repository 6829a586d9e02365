// adamw.cuh — GPU mirror of model/adamw.h: one AdamW step over all parameters, the global gradient
// norm, and clipping by it.
//
// Weight decay per tensor (hl::adamw_decays: ≥ 2-D and not a conv kernel). The decision is made once on
// the host: AdamWTable turns the tensor list into a short device array of ranges (offset, count, decay),
// sorted by offset, with neighbours of equal decay merged (a model has a few hundred tensors, usually a few
// dozen ranges). One kernel then updates every element of every range: thread i binary-searches the
// range holding its i-th element (a handful of steps on an array that sits in L1), so the whole step is
// one launch, elements in gaps between tensors are left alone (as on the CPU), and no per-element flag
// array (4 bytes per parameter) is needed.
//
// Norm and clipping keep the result on the device (no host sync inside): grad_norm writes a device
// scalar through a fixed two-stage reduction (deterministic: a fixed grid, fixed tree orders, sums in
// double as the CPU), clip_grad_norm then scales the gradients by a factor read from that scalar. The trainers
// instead pass that scalar to adamw_update, which applies the same factor as it reads each gradient (one pass fewer).
// Parameters, moments and the norm are fp32 on every path (master weights); gradients take the element type.
#pragma once
#include <algorithm>            // std::sort, std::max, std::min
#include <cstdint>              // SIZE_MAX, uintptr_t
#include <type_traits>          // std::is_same_v: grad_norm's vector path for fp32 gradients
#include <cmath>                // std::pow
#include <vector>               // std::vector
#include <cuda_bf16.h>          // __nv_bfloat16, __float2bfloat16_rn: the parameters' bf16 copy
#include "kernels/common.cuh"   // cudaCheckLast, DeviceBuffer, elementwise_grid
#include "model/adamw.h"        // AdamWConfig, adamw_decays
#include "model/common.h"       // TensorInfo, HL_CHECK

namespace hl::gpu {

// A run of consecutive parameters with one decay decision; prefix = elements in all earlier ranges.
struct AdamWRange {
    size_t offset;  // into params / grads / m / v
    size_t count;
    size_t prefix;
    int decay;      // 1: weight decay applies
};

// The device table of ranges, built once (it allocates: do it at setup, not per step).
struct AdamWTable {
    DeviceBuffer<AdamWRange> ranges;
    int n_ranges = 0;
    size_t total = 0;  // elements updated per step

    // Every tensor, or (ZeRO-1, kernels/dist.cuh) only their parts inside [lo, hi): one rank's shard.
    explicit AdamWTable(const std::vector<TensorInfo>& tensors, size_t lo = 0, size_t hi = SIZE_MAX) {
        std::vector<AdamWRange> rs;
        for (const TensorInfo& t : tensors) {
            const size_t a = std::max(t.offset, lo), b = std::min(t.offset + t.numel, hi);
            if (a < b) rs.push_back({a, b - a, 0, adamw_decays(t) ? 1 : 0});
        }
        std::sort(rs.begin(), rs.end(), [](const AdamWRange& a, const AdamWRange& b) { return a.offset < b.offset; });
        std::vector<AdamWRange> merged;
        for (const AdamWRange& r : rs) {
            if (!merged.empty()) {
                AdamWRange& last = merged.back();
                HL_CHECK(last.offset + last.count <= r.offset, "adamw: tensors overlap at offset ", r.offset);
                if (last.offset + last.count == r.offset && last.decay == r.decay) {
                    last.count += r.count;
                    continue;
                }
            }
            merged.push_back(r);
        }
        for (AdamWRange& r : merged) {
            r.prefix = total;
            total += r.count;
        }
        n_ranges = (int)merged.size();
        ranges.alloc(merged.size());
        if (!merged.empty()) ranges.upload(merged);
    }
};

// Grid-stride over the table's `total` elements; element i lives in the last range whose prefix ≤ i.
// The moments of parameter j are m[j − mv_base], v[j − mv_base]: 0 when they cover every parameter, the shard's
// first element when they hold one rank's shard (ZeRO-1). Per element, the same float operations in the same
// order as the CPU:
//   m ← β1·m + (1−β1)·g     v ← β2·v + (1−β2)·g²     p ← p − lr·(m̂/(√v̂ + eps) + wd·p)
// clip_norm (device scalar, or null): the gradient clipping fused in, g ← g · max_norm / *clip_norm when the norm is
// above max_norm, the very product clip_scale_kernel stores (so, for fp32 gradients, the same update bit for bit as
// clipping first, without that pass over the gradients; they are left unscaled in memory).
// params16 (or null): the parameters' bf16 copy, each new value rounded into it as it is written (the model's matmul
// weights under bf16: the same values as rounding all of them before the next forward, without that pass).
template <typename TG>
__global__ void adamw_kernel(float* params, const TG* grads, float* m, float* v, const AdamWRange* ranges,
                             int n_ranges, size_t total, size_t mv_base, float b1, float b2, float eps, float lr,
                             float wd, float bc1, float bc2, const float* clip_norm, float max_norm,
                             __nv_bfloat16* params16) {
    const float nrm = clip_norm ? *clip_norm : 0.0f;
    const bool clip = nrm > max_norm;  // (false without clip_norm: max_norm > 0 then is not required)
    const float scale = clip ? max_norm / nrm : 1.0f;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        int lo = 0, hi = n_ranges - 1;  // find the last range with prefix ≤ i
        while (lo < hi) {
            const int mid = (lo + hi + 1) / 2;
            if (ranges[mid].prefix <= i) lo = mid;
            else hi = mid - 1;
        }
        const AdamWRange r = ranges[lo];
        const size_t j = r.offset + (i - r.prefix);
        const float g = clip ? float(grads[j]) * scale : float(grads[j]);
        const size_t k = j - mv_base;
        const float mt = b1 * m[k] + (1.0f - b1) * g;
        const float vt = b2 * v[k] + (1.0f - b2) * g * g;
        m[k] = mt;
        v[k] = vt;
        const float mhat = mt / bc1, vhat = vt / bc2;
        const float p = params[j], p_new = p - lr * (mhat / (sqrtf(vhat) + eps) + (r.decay ? wd : 0.0f) * p);
        params[j] = p_new;
        if (params16) params16[j] = __float2bfloat16_rn(p_new);
    }
}

// One AdamW step over every tensor of the table. lr is this step's learning rate (cfg.lr is not read);
// step is 1-based. Bias corrections are computed in double on the host, as the CPU does. clip_norm: the global
// gradient norm (device scalar, from grad_norm) when the gradients are to be clipped to max_norm in the same pass
// (what clip_by_norm would do first); null: no clipping. params16: see adamw_kernel.
template <typename TG>
void adamw_update(float* params, const TG* grads, float* m, float* v, const AdamWTable& table,
                  const AdamWConfig& cfg, float lr, int step, cudaStream_t stream = 0, size_t mv_base = 0,
                  const float* clip_norm = nullptr, float max_norm = 0.0f, __nv_bfloat16* params16 = nullptr) {
    HL_CHECK(step >= 1, "adamw: step is 1-based (for bias correction), got ", step);
    HL_CHECK(clip_norm == nullptr || max_norm > 0.0f, "clip_grad_norm: max_norm must be positive, got ", max_norm);
    if (table.total == 0) return;
    const float bc1 = 1.0f - float(std::pow((double)cfg.beta1, step));
    const float bc2 = 1.0f - float(std::pow((double)cfg.beta2, step));
    adamw_kernel<<<elementwise_grid(table.total, 256), 256, 0, stream>>>(params, grads, m, v, table.ranges.ptr,
                                                              table.n_ranges, table.total, mv_base, cfg.beta1, cfg.beta2,
                                                              cfg.eps, lr, cfg.weight_decay, bc1, bc2, clip_norm,
                                                              max_norm, params16);
    cudaCheckLast();
}

// ---------------------------------------------------------------------------------------------------
// Global gradient norm and clipping

constexpr int GRAD_NORM_BLOCKS = 264;  // fixed (2 per H100 SM): the reduction order never changes
constexpr int GRAD_NORM_THREADS = 512;

// Block-wide sum of a double (warp shuffles, then the warps' sums in shared memory); thread 0 gets it.
__device__ __forceinline__ double block_sum_double(double x) {
    __shared__ double warp_part[32];
    for (int off = 16; off > 0; off /= 2) x += __shfl_xor_sync(0xffffffffu, x, off);
    const int lane = threadIdx.x % 32, wid = threadIdx.x / 32, nw = blockDim.x / 32;
    if (lane == 0) warp_part[wid] = x;
    __syncthreads();
    double s = 0.0;
    if (threadIdx.x == 0)
        for (int k = 0; k < nw; k++) s += warp_part[k];
    return s;
}

// Stage 1: partial[b] = Σ g² over the elements block b visits (grid-stride; GRAD_NORM_BLOCKS blocks). fp32 gradients
// on 16-byte boundaries go eight a thread an iteration (two float4 loads in flight: one 4-byte load a thread left
// the pass at about a quarter of the DRAM bandwidth, 0.29 ms for the 100m model's 0.37 GB), the rest one at a time. The
// order of the sum is fixed by the grid, as before (deterministic).
template <typename T>
__global__ void grad_norm_partial_kernel(double* partial, const T* grads, size_t n) {
    double acc = 0.0;
    const size_t first = blockIdx.x * (size_t)blockDim.x + threadIdx.x, stride = (size_t)gridDim.x * blockDim.x;
    size_t done = 0;
    if constexpr (std::is_same_v<T, float>) {
        if (reinterpret_cast<uintptr_t>(grads) % 16 == 0) {
            const size_t n8 = n / 8;
            for (size_t i = first; i < n8; i += stride) {
                const float4 a = reinterpret_cast<const float4*>(grads)[2 * i];
                const float4 b = reinterpret_cast<const float4*>(grads)[2 * i + 1];
                const float x[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
                for (int j = 0; j < 8; j++) acc += double(x[j]) * double(x[j]);
            }
            done = n8 * 8;
        }
    }
    for (size_t i = done + first; i < n; i += stride) {
        const double g = (double)float(grads[i]);
        acc += g * g;
    }
    const double s = block_sum_double(acc);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

// Stage 2 (one block): *norm = sqrt(Σ partial), and *sumsq = Σ partial when sumsq is not null (a shard's share,
// to be summed over the ranks). (A template only so that the header can be included by several translation
// units without a duplicate kernel symbol.)
template <typename Unused = void>
__global__ void grad_norm_final_kernel(float* norm, double* sumsq, const double* partial, int n_partial) {
    double acc = 0.0;
    for (int i = threadIdx.x; i < n_partial; i += blockDim.x) acc += partial[i];
    const double s = block_sum_double(acc);
    if (threadIdx.x == 0) {
        *norm = (float)sqrt(s);
        if (sumsq) *sumsq = s;
    }
}

// *norm (a device scalar) = ‖grads (n)‖₂, and *sumsq = ‖grads‖₂² when given. scratch: GRAD_NORM_BLOCKS doubles.
template <typename T>
void grad_norm(float* norm, const T* grads, size_t n, double* scratch, cudaStream_t stream = 0,
               double* sumsq = nullptr) {
    grad_norm_partial_kernel<<<GRAD_NORM_BLOCKS, GRAD_NORM_THREADS, 0, stream>>>(scratch, grads, n);
    cudaCheckLast();
    grad_norm_final_kernel<><<<1, GRAD_NORM_THREADS, 0, stream>>>(norm, sumsq, scratch, GRAD_NORM_BLOCKS);
    cudaCheckLast();
}

// *norm = sqrt(*sumsq): the global norm from the squares summed over the ranks.
template <typename Unused = void>
__global__ void sqrt_kernel(float* norm, const double* sumsq) { *norm = (float)sqrt(*sumsq); }

// grads *= max_norm / *norm when *norm > max_norm (the norm is read on the device; every thread reads
// the same scalar, so the whole grid takes the same branch). Grid-stride, one thread per element.
template <typename T>
__global__ void clip_scale_kernel(T* grads, size_t n, const float* norm, float max_norm) {
    const float nrm = *norm;
    if (!(nrm > max_norm)) return;
    const float scale = max_norm / nrm;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        grads[i] = T(float(grads[i]) * scale);
}

// grads scaled down to norm max_norm when the norm already in *norm (device) is above it.
template <typename T>
void clip_by_norm(T* grads, size_t n, const float* norm, float max_norm, cudaStream_t stream = 0) {
    HL_CHECK(max_norm > 0.0f, "clip_grad_norm: max_norm must be positive, got ", max_norm);
    if (n == 0) return;
    clip_scale_kernel<<<elementwise_grid(n, 256), 256, 0, stream>>>(grads, n, norm, max_norm);
    cudaCheckLast();
}

// *norm = ‖grads‖₂ before clipping (what the trainer logs; read it when convenient), and grads scaled
// down to norm max_norm when above it. scratch: GRAD_NORM_BLOCKS doubles.
template <typename T>
void clip_grad_norm(float* norm, T* grads, size_t n, float max_norm, double* scratch, cudaStream_t stream = 0) {
    grad_norm(norm, grads, n, scratch, stream);
    clip_by_norm(grads, n, norm, max_norm, stream);
}

}  // namespace hl::gpu
