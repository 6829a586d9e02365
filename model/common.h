// common.h — shared helpers for the CPU reference: error checks, a seeded RNG,
// scalar activations, and Arena, which carves named tensors out of one allocation.
#pragma once
#include <algorithm>  // std::max
#include <cmath>      // std::exp, std::log1p, std::sqrt
#include <cstdint>    // uint64_t
#include <cstring>    // std::memset
#include <sstream>    // std::ostringstream for error messages
#include <stdexcept>  // std::runtime_error
#include <string>     // std::string
#include <utility>    // std::move
#include <vector>     // std::vector

namespace hl {

// A shape or config mismatch is a user error, not a crash: throw one clear line.
struct Error : std::runtime_error {
    using std::runtime_error::runtime_error;
};

template <typename... Args>
[[noreturn]] inline void fail(Args&&... args) {
    std::ostringstream os;
    (os << ... << args);
    throw Error(os.str());
}

#define HL_CHECK(cond, ...)                                      \
    do {                                                         \
        if (!(cond)) ::hl::fail(__VA_ARGS__);                    \
    } while (0)

// splitmix64: tiny, seedable, the same stream on every platform.
struct Rng {
    uint64_t s;
    explicit Rng(uint64_t seed = 1337) : s(seed) {}
    uint64_t next() {
        uint64_t z = (s += 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        return z ^ (z >> 31);
    }
    double uniform() { return (next() >> 11) * (1.0 / 9007199254740992.0); }  // [0, 1)
    double uniform(double lo, double hi) { return lo + (hi - lo) * uniform(); }
    double normal() {  // Box-Muller
        double u1 = uniform(), u2 = uniform();
        if (u1 < 1e-300) u1 = 1e-300;
        return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
    }
    template <typename T>
    void fill_uniform(T* p, size_t n, double lo, double hi) {
        for (size_t i = 0; i < n; i++) p[i] = T(uniform(lo, hi));
    }
    template <typename T>
    void fill_normal(T* p, size_t n, double std) {
        for (size_t i = 0; i < n; i++) p[i] = T(std * normal());
    }
};

// Scalar activations, written once so every layer agrees on them.
template <typename T> inline T sigmoid(T x) { return T(1) / (T(1) + std::exp(-x)); }
template <typename T> inline T silu(T x) { return x * sigmoid(x); }
template <typename T> inline T silu_grad(T x) {  // d/dx x·σ(x) = σ(x)(1 + x(1 − σ(x)))
    T s = sigmoid(x);
    return s * (T(1) + x * (T(1) - s));
}
template <typename T> inline T softplus(T x) {  // log(1 + e^x), stable for large |x|
    return x > T(20) ? x : std::log1p(std::exp(x));
}

// One tensor inside an allocation: its name (as in checkpoints), shape and offset.
struct TensorInfo {
    std::string name;
    std::vector<int> shape;
    size_t offset = 0;
    size_t numel = 0;
};

// Arena carves consecutive named tensors out of one buffer. With base == nullptr it only
// counts, so the same function both sizes an allocation and lays out the views on it:
//   Arena<float> count;  layout(count);  std::vector<float> buf(count.size);
//   Arena<float> a(buf.data());  auto views = layout(a);
template <typename T>
struct Arena {
    T* base = nullptr;
    size_t size = 0;                          // elements taken so far
    std::string prefix;                       // e.g. "layers.3.mixer."
    std::vector<TensorInfo>* infos = nullptr;  // where to record names and shapes (optional)
    size_t align = 1;  // each tensor starts at a multiple of this many elements (1: packed)

    Arena() = default;
    explicit Arena(T* b, std::vector<TensorInfo>* inf = nullptr) : base(b), infos(inf) {}

    T* take(const std::string& name, std::vector<int> shape) {
        size_t n = 1;
        for (int d : shape) {
            HL_CHECK(d > 0, "tensor ", prefix, name, " has a non-positive dimension ", d);
            n *= size_t(d);
        }
        size = (size + align - 1) / align * align;
        if (infos) infos->push_back({prefix + name, shape, size, n});
        T* p = base ? base + size : nullptr;
        size += n;
        return p;
    }
    // A layer's backward scratch: a tensor that only that layer's backward (or one forward call, as a temporary)
    // writes and reads, so that nothing in it must outlive the call. Taken from `scratch` where it is set (by
    // take_layers_sharing_scratch, below: the layers then share one region); else as take.
    Arena* scratch = nullptr;
    T* take_scratch(const std::string& name, std::vector<int> shape) {
        return scratch ? scratch->take(prefix + name, std::move(shape)) : take(name, std::move(shape));
    }
    // n elements left out after the last tensor (a gap, like the alignment's: no tensor of its own)
    void reserve(size_t n) { size += n; }
    // Scoped prefix for nested modules: Arena<T>::Scope s(a, "mixer.");
    struct Scope {
        Arena& a;
        size_t len;
        Scope(Arena& arena, const std::string& p) : a(arena), len(arena.prefix.size()) { a.prefix += p; }
        ~Scope() { a.prefix.resize(len); }
    };
};

// Lays out L layers with take_layer(l), which takes each layer's tensors from a; their take_scratch tensors come from
// s, which every layer starts again at its beginning, so the layers share that region (a layer's backward uses its
// scratch up before the next layer's backward begins). s.size ends as the largest layer's need. The models' layouts.
template <typename T, typename F>
void take_layers_sharing_scratch(Arena<T>& a, Arena<T>& s, int L, F&& take_layer) {
    size_t most = 0;
    a.scratch = &s;
    for (int l = 0; l < L; l++) {
        s.size = 0;
        take_layer(l);
        most = std::max(most, s.size);
    }
    a.scratch = nullptr;
    s.size = most;
}

// The number of values in the tensors listed (an Arena's size, less its alignment gaps).
inline size_t count_params(const std::vector<TensorInfo>& tensors) {
    size_t n = 0;
    for (const TensorInfo& t : tensors) n += t.numel;
    return n;
}

template <typename T>
inline void zero(T* p, size_t n) {
    for (size_t i = 0; i < n; i++) p[i] = T(0);
}

}  // namespace hl
