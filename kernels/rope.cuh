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
constexpr int VEC = 8;              // pairs a thread of the table kernel takes from each half of a row
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

// table (2, T, hd/2) = the cosines, then the sines, of the angles (pos0 + t) · θ^(−2i/hd) of every position t < T and
// pair i < hd/2, in double as in rope_rotate_kernel (the same floats). The attention makes it once a forward (a few
// µs), and its four rotations (q, k; dq, dk) read it from L2 instead of computing it: a thread computing its own
// angles in double spent more time on them than on its memory (100m q: 30 µs for 64 MB; 41 with 4 rows a thread).
template <typename Unused = void>
__global__ void rope_table_kernel(float* table, int T_, int hd, double theta, int pos0) {
    const int half = hd / 2, p = blockIdx.x * blockDim.x + threadIdx.x;  // over (T, hd/2)
    if (p >= T_ * half) return;
    const int t = p / half, i = p - t * half;
    rope_cos_sin(table[p], table[(size_t)T_ * half + p], pos0 + t, i, hd, theta, 1);
}

inline void rope_table(float* table, int T_, int hd, double theta, int pos0 = 0, cudaStream_t stream = 0) {
    HL_CHECK(T_ > 0 && hd > 0 && hd % 2 == 0 && theta > 0 && pos0 >= 0, "rope table (gpu): bad T=", T_, " hd=", hd,
             " theta=", theta, " pos0=", pos0);
    rope_table_kernel<><<<ceil_div(T_ * (hd / 2), rope_detail::THREADS), rope_detail::THREADS, 0, stream>>>(
        table, T_, hd, theta, pos0);
    cudaCheckLast();
}

// The rotation from a table (rope_table of the same T, hd, θ and pos0): VEC = 8 pairs of one (b, t, h) row a thread,
// 16-byte accesses (one of bf16, two of fp32), the row's cosines and sines two float4 each from the table. The same
// float products as rope_rotate_kernel on the same cos and sin, so the forward gives its values bit for bit; the
// backward (sign −1) negates the table's sine where that kernel takes the sine of −a (equal wherever the double sine
// is odd to the last bit; the test holds it to the rotation's tolerance). Needs hd/2 and ldo multiples of 8 and
// 16-byte pointers.
template <typename T, typename O>
__global__ void rope_rotate_vec_kernel(O* out, const T* inp, const float* table, int B, int T_, int H, int hd,
                                       size_t ldo, int sign) {
    using namespace rope_detail;
    const int half = hd / 2, runs = half / VEC;
    const size_t n = (size_t)B * T_ * H * runs;
    for (size_t p = blockIdx.x * (size_t)blockDim.x + threadIdx.x; p < n; p += (size_t)gridDim.x * blockDim.x) {
        const size_t row = p / runs;  // (b·T + t)·H + h
        const int i0 = int(p - row * runs) * VEC, h = int(row % H);
        const size_t bt = row / H;
        const int t = int(bt % T_);
        float x1[VEC], x2[VEC], c[VEC], s[VEC];
        const T* src = inp + row * hd + i0;
        ld8(src, x1);
        ld8(src + half, x2);
        ld8(table + (size_t)t * half + i0, c);
        ld8(table + ((size_t)T_ + t) * half + i0, s);
        float y1[VEC], y2[VEC];
#pragma unroll
        for (int j = 0; j < VEC; j++) {
            const float sj = sign > 0 ? s[j] : -s[j];
            y1[j] = x1[j] * c[j] - x2[j] * sj;
            y2[j] = x2[j] * c[j] + x1[j] * sj;
        }
        O* dst = out + bt * ldo + (size_t)h * hd + i0;
        st8(dst, y1);
        st8(dst + half, y2);
    }
}

// ldo: out's row stride (0: H·hd, packed). table: rope_table's for this T, hd, θ and pos0, or null; with it the
// vector kernel runs where the shapes and pointers allow it.
template <typename T, typename O>
void rope_rotate(O* out, const T* inp, int B, int T_, int H, int hd, double theta, int pos0, int sign,
                 cudaStream_t stream = 0, size_t ldo = 0, const float* table = nullptr) {
    using namespace rope_detail;
    HL_CHECK(B > 0 && T_ > 0 && H > 0 && hd > 0, "rope (gpu): bad sizes B=", B, " T=", T_, " H=", H, " hd=", hd);
    HL_CHECK(hd % 2 == 0, "rope (gpu): head dim must be even to pair channels (i, i + hd/2), got hd=", hd);
    HL_CHECK(theta > 0, "rope (gpu): theta must be positive, got ", theta);
    HL_CHECK(pos0 >= 0, "rope (gpu): pos0 must be non-negative, got ", pos0);
    HL_CHECK(ceil_div(B * H, ROWS_PER_THREAD) <= 65535, "rope (gpu): B·H = ", B * H, " is too large for the grid");
    if (ldo == 0) ldo = size_t(H) * hd;
    HL_CHECK(ldo >= size_t(H) * hd, "rope (gpu): out's row stride ", ldo, " is below H·hd = ", H * hd);
    HL_CHECK((void*)out == (const void*)inp ? ldo == size_t(H) * hd : true, "rope (gpu): in place needs packed rows");
    const bool vec = table && (hd / 2) % VEC == 0 && ldo % VEC == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0 &&
                     reinterpret_cast<uintptr_t>(inp) % 16 == 0 && reinterpret_cast<uintptr_t>(table) % 16 == 0;
    if (vec) {
        const size_t n = (size_t)B * T_ * H * (hd / 2 / VEC);
        rope_rotate_vec_kernel<<<elementwise_grid(n, THREADS), THREADS, 0, stream>>>(out, inp, table, B, T_, H, hd,
                                                                                     ldo, sign);
    } else {
        const dim3 grid(ceil_div(T_ * (hd / 2), THREADS), ceil_div(B * H, ROWS_PER_THREAD));
        rope_rotate_kernel<<<grid, THREADS, 0, stream>>>(out, inp, B, T_, H, hd, ldo, theta, pos0, sign);
    }
    cudaCheckLast();
}

// out (B, T, H, hd) = RoPE(inp (B, T, H, hd)); token t sits at position pos0 + t. In place allowed. table: see
// rope_rotate.
template <typename T>
void rope_forward(T* out, const T* inp, int B, int T_, int H, int hd, double theta, int pos0 = 0,
                  cudaStream_t stream = 0, const float* table = nullptr) {
    rope_rotate(out, inp, B, T_, H, hd, theta, pos0, +1, stream, 0, table);
}

// dinp (B, T, H, hd) is written: the transpose of a rotation is the rotation by −angle. In place allowed. O: T, or
// bf16 for a dinp that is only a matmul's dout (not in place then); ldo > H·hd: dinp's rows are slices of wider
// rows (the attention's dq, dk, dv side by side, for one GEMM).
template <typename T, typename O>
void rope_backward(O* dinp, const T* dout, int B, int T_, int H, int hd, double theta, int pos0 = 0,
                   cudaStream_t stream = 0, size_t ldo = 0, const float* table = nullptr) {
    rope_rotate(dinp, dout, B, T_, H, hd, theta, pos0, -1, stream, ldo, table);
}

}  // namespace hl::gpu
