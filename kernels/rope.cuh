// rope.cuh — rotary position embedding on the GPU, mirroring model/rope.h ("rotate half": channel i pairs with
// i + hd/2 and the pair turns by (pos0 + t) · θ^(−2i/hd); the backward turns by the negative angle).
// The angle, its cosine and sine are computed in double as on the CPU: at position 8192 the angle is ~8e3
// radians, and a float angle would already be off by ~5e-4 rad. The element type T is a template parameter
// (values are rotated in float), so a bf16 instantiation needs no change here; the output may be bf16 while the input
// is fp32 (the backward's dq, dk, rounded as they are written for their GEMMs).
#pragma once
#include <cuda_runtime.h>       // cudaStream_t, dim3
#include "kernels/common.cuh"   // cudaCheckLast, ceil_div
#include "model/common.h"       // HL_CHECK

namespace hl::gpu {

namespace rope_detail {
constexpr int THREADS = 256;
constexpr int ROWS_PER_THREAD = 8;  // (b, h) rows one thread rotates with the angle it computed
}  // namespace rope_detail

// out (B, T, H, hd) = inp rotated by sign · angle(t, i); out may alias inp (each pair is read, then written).
// Grid (ceil(T·hd/2 / 256), ceil(B·H / 8)); thread x ↔ one (t, i) pair index, i fastest, so that consecutive
// threads touch consecutive channels of a row (coalesced); thread y-block ↔ a run of 8 (b, h) rows that reuse
// the one double-precision cos/sin the thread computed (the expensive part), while keeping enough blocks for
// small T.
template <typename T, typename O>
__global__ void rope_rotate_kernel(O* out, const T* inp, int B, int T_, int H, int hd, double theta, int pos0,
                                   int sign) {
    using namespace rope_detail;
    const int half = hd / 2;
    const int p = blockIdx.x * blockDim.x + threadIdx.x;  // over (T, hd/2)
    if (p >= T_ * half) return;
    const int t = p / half, i = p - t * half;
    const double freq = pow(theta, -2.0 * i / hd);  // the CPU's formula, in the same order
    const double angle = sign * double(pos0 + t) * freq;
    double sd, cd;
    sincos(angle, &sd, &cd);
    const float c = float(cd), s = float(sd);
    const int r_begin = blockIdx.y * ROWS_PER_THREAD, r_end = min(B * H, r_begin + ROWS_PER_THREAD);
    // All the rows' pairs are loaded before any is written: out may alias inp, so the compiler could not move a
    // row's loads above the previous row's stores, and the thread would wait out the memory latency once a row.
    float x1[ROWS_PER_THREAD], x2[ROWS_PER_THREAD];
    size_t at[ROWS_PER_THREAD];
#pragma unroll
    for (int k = 0; k < ROWS_PER_THREAD; k++) {
        const int r = r_begin + k, b = r / H, h = r - b * H;  // r = b·H + h
        at[k] = (((size_t)b * T_ + t) * H + h) * hd + i;      // (B, T, H, hd)
        x1[k] = r < r_end ? float(inp[at[k]]) : 0.0f;
        x2[k] = r < r_end ? float(inp[at[k] + half]) : 0.0f;
    }
#pragma unroll
    for (int k = 0; k < ROWS_PER_THREAD; k++) {
        if (r_begin + k >= r_end) break;
        out[at[k]] = O(x1[k] * c - x2[k] * s);
        out[at[k] + half] = O(x2[k] * c + x1[k] * s);
    }
}

template <typename T, typename O>
void rope_rotate(O* out, const T* inp, int B, int T_, int H, int hd, double theta, int pos0, int sign,
                 cudaStream_t stream = 0) {
    using namespace rope_detail;
    HL_CHECK(B > 0 && T_ > 0 && H > 0 && hd > 0, "rope (gpu): bad sizes B=", B, " T=", T_, " H=", H, " hd=", hd);
    HL_CHECK(hd % 2 == 0, "rope (gpu): head dim must be even to pair channels (i, i + hd/2), got hd=", hd);
    HL_CHECK(theta > 0, "rope (gpu): theta must be positive, got ", theta);
    HL_CHECK(pos0 >= 0, "rope (gpu): pos0 must be non-negative, got ", pos0);
    HL_CHECK(ceil_div(B * H, ROWS_PER_THREAD) <= 65535, "rope (gpu): B·H = ", B * H, " is too large for the grid");
    const dim3 grid(ceil_div(T_ * (hd / 2), THREADS), ceil_div(B * H, ROWS_PER_THREAD));
    rope_rotate_kernel<<<grid, THREADS, 0, stream>>>(out, inp, B, T_, H, hd, theta, pos0, sign);
    cudaCheckLast();
}

// out (B, T, H, hd) = RoPE(inp (B, T, H, hd)); token t sits at position pos0 + t. In place allowed.
template <typename T>
void rope_forward(T* out, const T* inp, int B, int T_, int H, int hd, double theta, int pos0 = 0,
                  cudaStream_t stream = 0) {
    rope_rotate(out, inp, B, T_, H, hd, theta, pos0, +1, stream);
}

// dinp (B, T, H, hd) is written: the transpose of a rotation is the rotation by −angle. In place allowed. O: T, or
// bf16 for a dinp that is only a matmul's dout (not in place then).
template <typename T, typename O>
void rope_backward(O* dinp, const T* dout, int B, int T_, int H, int hd, double theta, int pos0 = 0,
                   cudaStream_t stream = 0) {
    rope_rotate(dinp, dout, B, T_, H, hd, theta, pos0, -1, stream);
}

}  // namespace hl::gpu
