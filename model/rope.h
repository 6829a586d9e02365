// rope.h — rotary position embedding (RoPE), "rotate half" form as in Llama (DESIGN.md §1 block A).
// Within each head of width hd, channel i is paired with channel i + hd/2 (i < hd/2) and the pair is
// rotated by the angle (pos0 + t) · θ^(−2i/hd). A rotation is orthogonal, so its backward is the same
// rotation by the negative angle. (The sequence length is called T_ because T is the float type.)
#pragma once
#include <cmath>           // std::pow, std::cos, std::sin
#include <cstddef>         // size_t
#include "model/common.h"  // HL_CHECK

namespace hl {

// Rotates every pair by sign · angle; sign = +1 is RoPE, sign = −1 undoes it. out may alias inp:
// each pair is read completely before it is written.
template <typename T>
void rope_rotate(T* out, const T* inp, int B, int T_, int H, int hd, double theta, int pos0, int sign) {
    HL_CHECK(B > 0 && T_ > 0 && H > 0 && hd > 0, "rope: bad sizes B=", B, " T=", T_, " H=", H, " hd=", hd);
    HL_CHECK(hd % 2 == 0, "rope: head dim must be even to pair channels (i, i + hd/2), got hd=", hd);
    HL_CHECK(theta > 0, "rope: theta must be positive, got ", theta);
    HL_CHECK(pos0 >= 0, "rope: pos0 must be non-negative, got ", pos0);
    const int half = hd / 2;
#pragma omp parallel for schedule(static)
    for (int t = 0; t < T_; t++) {
        for (int i = 0; i < half; i++) {
            // the angle in double: at long positions float would lose the phase
            double freq = std::pow(theta, -2.0 * i / hd);
            double angle = sign * double(pos0 + t) * freq;
            T c = T(std::cos(angle)), s = T(std::sin(angle));
            for (int b = 0; b < B; b++) {
                for (int h = 0; h < H; h++) {
                    size_t row = (((size_t)b * T_ + t) * H + h) * hd;  // (B, T, H, hd)
                    T x1 = inp[row + i], x2 = inp[row + i + half];
                    out[row + i] = x1 * c - x2 * s;
                    out[row + i + half] = x2 * c + x1 * s;
                }
            }
        }
    }
}

// out (B, T, H, hd) = RoPE(inp (B, T, H, hd)); token t sits at position pos0 + t.
template <typename T>
void rope_forward(T* out, const T* inp, int B, int T_, int H, int hd, double theta, int pos0 = 0) {
    rope_rotate(out, inp, B, T_, H, hd, theta, pos0, +1);
}

// dinp (B, T, H, hd) is written: the transpose of a rotation is the rotation by −angle.
template <typename T>
void rope_backward(T* dinp, const T* dout, int B, int T_, int H, int hd, double theta, int pos0 = 0) {
    rope_rotate(dinp, dout, B, T_, H, hd, theta, pos0, -1);
}

}  // namespace hl
