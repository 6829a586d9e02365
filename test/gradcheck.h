// gradcheck.h — finite-difference gradient checking for the double-precision CPU reference, and
// small helpers (random tensors, probe losses) shared by the test files.
#pragma once
#include <algorithm>   // std::max
#include <cmath>       // std::fabs
#include <functional>  // std::function
#include <string>      // std::string
#include <vector>      // std::vector
#include <doctest/doctest.h>
#include "model/common.h"  // Rng

namespace hl::test {

// The error measure every gradient check in the project uses, stated once:
//   err = max_i |a_i − n_i| / max(|a_i|, |n_i|, 1e-3 · max_j |n_j|, 1e-12)
// a = analytic gradient, n = the fourth-order central difference
//   n = (L(x−2h) − 8·L(x−h) + 8·L(x+h) − L(x+2h)) / 12h,   h = 1e-4, in double,
// whose truncation error (h⁴) and rounding error (ε·|L|/h) are both ~1e-12 — far below the tolerance, so a
// failure means a wrong backward, not a noisy reference.
// The tensor-scale floor keeps entries whose true gradient is ~0 from turning rounding noise
// into a huge relative error; everything else is a true relative error.
constexpr double GRAD_TOL = 1e-6;

struct GradResult {
    double max_rel_err = 0;
    double max_abs_num = 0;  // largest |numeric gradient|: zero means the check was vacuous
    size_t worst = 0;
    double worst_a = 0, worst_n = 0;
};

inline GradResult grad_error(double* x, const double* analytic, size_t n, const std::function<double()>& loss,
                             double h = 1e-4) {
    std::vector<double> num(n);
    for (size_t i = 0; i < n; i++) {
        const double x0 = x[i];
        auto at = [&](double d) { x[i] = x0 + d; return loss(); };
        num[i] = (at(-2 * h) - 8 * at(-h) + 8 * at(h) - at(2 * h)) / (12 * h);
        x[i] = x0;
    }
    GradResult r;
    for (size_t i = 0; i < n; i++) r.max_abs_num = std::max(r.max_abs_num, std::fabs(num[i]));
    double floor = std::max(1e-3 * r.max_abs_num, 1e-12);
    for (size_t i = 0; i < n; i++) {
        double a = analytic[i], nu = num[i];
        double e = std::fabs(a - nu) / std::max({std::fabs(a), std::fabs(nu), floor});
        if (e > r.max_rel_err) { r.max_rel_err = e; r.worst = i; r.worst_a = a; r.worst_n = nu; }
    }
    return r;
}

// Checks one tensor. Unless allow_zero, a gradient that is zero everywhere fails: a check
// that compares 0 with 0 proves nothing.
inline void check_grad(const std::string& name, double* x, const double* analytic, size_t n,
                       const std::function<double()>& loss, bool allow_zero = false) {
    GradResult r = grad_error(x, analytic, n, loss);
    INFO("gradient ", name, ": max rel err ", r.max_rel_err, " at [", r.worst, "] analytic ", r.worst_a,
         " numeric ", r.worst_n, " (max |grad| ", r.max_abs_num, ")");
    CHECK(r.max_rel_err < GRAD_TOL);
    if (!allow_zero) CHECK(r.max_abs_num > 1e-9);
}

inline std::vector<double> randn(Rng& rng, size_t n, double std = 1.0) {
    std::vector<double> v(n);
    rng.fill_normal(v.data(), n, std);
    return v;
}
inline std::vector<double> randu(Rng& rng, size_t n, double lo, double hi) {
    std::vector<double> v(n);
    rng.fill_uniform(v.data(), n, lo, hi);
    return v;
}

// Parameters for a gradient check, drawn wider than a training init so that every path carries a
// gradient far above finite-difference rounding: decays A = −exp(A_log) in [−2, −0.37], dt ≈ 0.2…1,
// norm weights and fusion scales near 1 (but not 1), everything else N(0, 0.5).
inline bool ends_with(const std::string& s, const std::string& tail) {
    return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}
inline void randomize_for_gradcheck(const std::vector<TensorInfo>& tensors, double* params, Rng& rng) {
    for (const TensorInfo& t : tensors) {
        double* v = params + t.offset;
        std::string leaf = t.name.substr(t.name.rfind('.') == std::string::npos ? 0 : t.name.rfind('.') + 1);
        if (leaf == "A_log") rng.fill_uniform(v, t.numel, -1.0, 0.7);
        else if (leaf == "dt_bias") rng.fill_uniform(v, t.numel, -1.5, 0.5);
        else if (leaf.rfind("norm", 0) == 0 || leaf.rfind("scale_", 0) == 0)
            for (size_t i = 0; i < t.numel; i++) v[i] = 1.0 + 0.2 * rng.normal();
        else rng.fill_normal(v, t.numel, 0.5);
    }
}

// Probe loss L = Σ out ⊙ w with fixed random w; dL/dout = w is what the backward is fed.
inline double dot(const double* a, const double* b, size_t n) {
    double s = 0;
    for (size_t i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}
inline double max_abs_diff(const double* a, const double* b, size_t n) {
    double m = 0;
    for (size_t i = 0; i < n; i++) m = std::max(m, std::fabs(a[i] - b[i]));
    return m;
}

}  // namespace hl::test
