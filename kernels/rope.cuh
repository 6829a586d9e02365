// rope.cuh — rotary position embedding on the GPU, mirroring model/rope.h ("rotate half": channel i pairs with
// i + hd/2 and the pair turns by (pos0 + t) · θ^(−2i/hd); the backward turns by the negative angle).
// The angle, its cosine and sine are computed in double as on the CPU: at position 8192 the angle is ~8e3
// radians, and a float angle would already be off by ~5e-4 rad. The element type T is a template parameter
// (values are rotated in float), so a bf16 instantiation needs no change here; the output may be bf16 while the input
// is fp32 (the backward's dq, dk, rounded as they are written for their GEMMs).
#pragma once
#include <cstdint>              // uintptr_t (the vector kernel's alignment test)
#include <cuda_runtime.h>       // cudaStream_t, dim3
#include "kernels/common.cuh"   // cudaCheckLast, ceil_div, ld8, st8
#include "model/common.h"       // HL_CHECK

namespace hl::gpu {

namespace rope_detail {
constexpr int THREADS = 256;
constexpr int ROWS_PER_THREAD = 8;  // (b, h) rows one thread rotates with the angles it computed
constexpr int VEC = 8;              // pairs a thread of the vector kernel takes from each half of a row
constexpr int VEC_ROWS = 4;         // and (b, h) rows
}  // namespace rope_detail

// The angle of pair i at position pos, as cos and sin: in double, the CPU's formula in the same order.
__device__ __forceinline__ void rope_cos_sin(float& c, float& s, int pos, int i, int hd, double theta, int sign) {
    const double freq = pow(theta, -2.0 * i / hd);
    double sd, cd;
    sincos(sign * double(pos) * freq, &sd, &cd);
    c = float(cd), s = float(sd);
}

// out (B, T, H, hd) = inp rotated by sign · angle(t, i); out may alias inp (each pair is read, then written). Rows of
// out are ldo elements apart (H·hd: packed; more: out is a slice of wider rows). One pair a thread: any hd.
// Grid (ceil(T·hd/2 / 256), ceil(B·H / 8)); thread x ↔ one (t, i) pair index, i fastest, so that consecutive
// threads touch consecutive channels of a row (coalesced); thread y-block ↔ a run of 8 (b, h) rows that reuse
// the one double-precision cos/sin the thread computed (the expensive part), while keeping enough blocks for
// small T.
template <typename T, typename O>
__global__ void rope_rotate_kernel(O* out, const T* inp, int B, int T_, int H, int hd, size_t ldo, double theta,
                                   int pos0, int sign) {
    using namespace rope_detail;
    const int half = hd / 2;
    const int p = blockIdx.x * blockDim.x + threadIdx.x;  // over (T, hd/2)
    if (p >= T_ * half) return;
    const int t = p / half, i = p - t * half;
    float c, s;
    rope_cos_sin(c, s, pos0 + t, i, hd, theta, sign);
    const int r_begin = blockIdx.y * ROWS_PER_THREAD, r_end = min(B * H, r_begin + ROWS_PER_THREAD);
    // All the rows' pairs are loaded before any is written: out may alias inp, so the compiler could not move a
    // row's loads above the previous row's stores, and the thread would wait out the memory latency once a row.
    float x1[ROWS_PER_THREAD], x2[ROWS_PER_THREAD];
    size_t at[ROWS_PER_THREAD], to[ROWS_PER_THREAD];
#pragma unroll
    for (int k = 0; k < ROWS_PER_THREAD; k++) {
        const int r = r_begin + k, b = r / H, h = r - b * H;  // r = b·H + h
        at[k] = (((size_t)b * T_ + t) * H + h) * hd + i;      // (B, T, H, hd)
        to[k] = ((size_t)b * T_ + t) * ldo + (size_t)h * hd + i;
        x1[k] = r < r_end ? float(inp[at[k]]) : 0.0f;
        x2[k] = r < r_end ? float(inp[at[k] + half]) : 0.0f;
    }
#pragma unroll
    for (int k = 0; k < ROWS_PER_THREAD; k++) {
        if (r_begin + k >= r_end) break;
        out[to[k]] = O(x1[k] * c - x2[k] * s);
        out[to[k] + half] = O(x2[k] * c + x1[k] * s);
    }
}

// The same rotation, VEC = 8 pairs a thread from each half of a row: 16-byte accesses (one of bf16, two of fp32),
// where the one-pair kernel's 2- and 4-byte accesses left it waiting on memory latency at a quarter of the DRAM
// bandwidth (100m q: 55 µs for 64 MB). A thread takes VEC_ROWS = 4 (b, h) rows: its loads are issued first and the
// angles computed while they are in flight (8 rows of 8 pairs held 128 values a thread, and one block an SM).
// Needs hd/2 a multiple of 8, ldo a multiple of 8 and 16-byte pointers.
// Grid (ceil(T·hd/16 / 256), ceil(B·H / 4)): thread x ↔ (t, run of 8 pairs), runs fastest; y ↔ 4 (b, h) rows.
template <typename T, typename O>
__global__ void rope_rotate_vec_kernel(O* out, const T* inp, int B, int T_, int H, int hd, size_t ldo,
                                       double theta, int pos0, int sign) {
    using namespace rope_detail;
    const int half = hd / 2, runs = half / VEC;
    const int p = blockIdx.x * blockDim.x + threadIdx.x;  // over (T, hd/16)
    if (p >= T_ * runs) return;
    const int t = p / runs, i0 = (p - t * runs) * VEC;
    const int r_begin = blockIdx.y * VEC_ROWS, r_end = min(B * H, r_begin + VEC_ROWS);
    // loads of every row first, as in the one-pair kernel (out may alias inp)
    float x1[VEC_ROWS][VEC], x2[VEC_ROWS][VEC];
#pragma unroll
    for (int k = 0; k < VEC_ROWS; k++) {
        const int r = min(r_begin + k, r_end - 1), b = r / H, h = r - b * H;  // (past the end: row r_end − 1 again)
        const T* src = inp + (((size_t)b * T_ + t) * H + h) * hd + i0;
        ld8(src, x1[k]);
        ld8(src + half, x2[k]);
    }
    float c[VEC], s[VEC];
#pragma unroll
    for (int j = 0; j < VEC; j++) rope_cos_sin(c[j], s[j], pos0 + t, i0 + j, hd, theta, sign);
#pragma unroll
    for (int k = 0; k < VEC_ROWS; k++) {
        const int r = r_begin + k, b = r / H, h = r - b * H;
        if (r >= r_end) break;
        float y1[VEC], y2[VEC];
#pragma unroll
        for (int j = 0; j < VEC; j++) {
            y1[j] = x1[k][j] * c[j] - x2[k][j] * s[j];
            y2[j] = x2[k][j] * c[j] + x1[k][j] * s[j];
        }
        O* dst = out + ((size_t)b * T_ + t) * ldo + (size_t)h * hd + i0;
        st8(dst, y1);
        st8(dst + half, y2);
    }
}

// ldo: out's row stride (0: H·hd, packed). The vector kernel where the shapes and pointers allow it.
template <typename T, typename O>
void rope_rotate(O* out, const T* inp, int B, int T_, int H, int hd, double theta, int pos0, int sign,
                 cudaStream_t stream = 0, size_t ldo = 0) {
    using namespace rope_detail;
    HL_CHECK(B > 0 && T_ > 0 && H > 0 && hd > 0, "rope (gpu): bad sizes B=", B, " T=", T_, " H=", H, " hd=", hd);
    HL_CHECK(hd % 2 == 0, "rope (gpu): head dim must be even to pair channels (i, i + hd/2), got hd=", hd);
    HL_CHECK(theta > 0, "rope (gpu): theta must be positive, got ", theta);
    HL_CHECK(pos0 >= 0, "rope (gpu): pos0 must be non-negative, got ", pos0);
    HL_CHECK(ceil_div(B * H, VEC_ROWS) <= 65535, "rope (gpu): B·H = ", B * H, " is too large for the grid");
    if (ldo == 0) ldo = size_t(H) * hd;
    HL_CHECK(ldo >= size_t(H) * hd, "rope (gpu): out's row stride ", ldo, " is below H·hd = ", H * hd);
    HL_CHECK((void*)out == (const void*)inp ? ldo == size_t(H) * hd : true, "rope (gpu): in place needs packed rows");
    const bool vec = (hd / 2) % VEC == 0 && ldo % VEC == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0 &&
                     reinterpret_cast<uintptr_t>(inp) % 16 == 0;
    if (vec) {
        const dim3 grid(ceil_div(T_ * (hd / 2 / VEC), THREADS), ceil_div(B * H, VEC_ROWS));
        rope_rotate_vec_kernel<<<grid, THREADS, 0, stream>>>(out, inp, B, T_, H, hd, ldo, theta, pos0, sign);
    } else {
        const dim3 grid(ceil_div(T_ * (hd / 2), THREADS), ceil_div(B * H, ROWS_PER_THREAD));
        rope_rotate_kernel<<<grid, THREADS, 0, stream>>>(out, inp, B, T_, H, hd, ldo, theta, pos0, sign);
    }
    cudaCheckLast();
}

// out (B, T, H, hd) = RoPE(inp (B, T, H, hd)); token t sits at position pos0 + t. In place allowed.
template <typename T>
void rope_forward(T* out, const T* inp, int B, int T_, int H, int hd, double theta, int pos0 = 0,
                  cudaStream_t stream = 0) {
    rope_rotate(out, inp, B, T_, H, hd, theta, pos0, +1, stream);
}

// dinp (B, T, H, hd) is written: the transpose of a rotation is the rotation by −angle. In place allowed. O: T, or
// bf16 for a dinp that is only a matmul's dout (not in place then); ldo > H·hd: dinp's rows are slices of wider
// rows (the attention's dq, dk, dv side by side, for one GEMM).
template <typename T, typename O>
void rope_backward(O* dinp, const T* dout, int B, int T_, int H, int hd, double theta, int pos0 = 0,
                   cudaStream_t stream = 0, size_t ldo = 0) {
    rope_rotate(dinp, dout, B, T_, H, hd, theta, pos0, -1, stream, ldo);
}

}  // namespace hl::gpu
