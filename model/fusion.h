// fusion.h — the five design axes of the intra-layer hybrid's fusion (DESIGN.md §P, paper Table 7),
// the named recipes, and parsing of the `--fusion` flag. The math lives in model/intra.h.
#pragma once
#include <string>          // std::string
#include "model/common.h"  // HL_CHECK, fail

namespace hl {

enum class FusionNorm { group, none };            // RMSNorm per head on each branch's output, or none
enum class FusionScale { none, vector, scalar };  // learnable per-branch vectors, or one scalar (attention branch)
enum class FusionOp { add, diff, concat };        // s + a, s − a, or [s; a]
enum class FusionValue { sep, shared };           // Mamba reads the attention's V as its x
enum class FusionOut { sep, joint };              // one projection per branch before fusing, or one after

struct FusionConfig {
    FusionNorm norm = FusionNorm::group;
    FusionScale scale = FusionScale::none;
    FusionOp op = FusionOp::diff;
    FusionValue value = FusionValue::sep;
    FusionOut out = FusionOut::sep;
};

inline const char* to_string(FusionNorm v) { return v == FusionNorm::group ? "group" : "none"; }
inline const char* to_string(FusionScale v) {
    return v == FusionScale::none ? "none" : v == FusionScale::vector ? "vector" : "scalar";
}
inline const char* to_string(FusionOp v) { return v == FusionOp::add ? "add" : v == FusionOp::diff ? "diff" : "concat"; }
inline const char* to_string(FusionValue v) { return v == FusionValue::sep ? "sep" : "shared"; }
inline const char* to_string(FusionOut v) { return v == FusionOut::sep ? "sep" : "joint"; }

// "norm=group,scale=none,op=diff,value=sep,out=sep": the canonical spelling, also what parse_fusion reads.
inline std::string to_string(const FusionConfig& f) {
    return std::string("norm=") + to_string(f.norm) + ",scale=" + to_string(f.scale) + ",op=" + to_string(f.op) +
           ",value=" + to_string(f.value) + ",out=" + to_string(f.out);
}

// Constraints of DESIGN.md §P that do not depend on widths (value=shared's d_ssm = d_model is checked
// where the widths are known, in intra_config_check).
inline void fusion_check(const FusionConfig& f) {
    HL_CHECK(!(f.op == FusionOp::concat && f.out == FusionOut::sep),
             "fusion: op=concat needs out=joint (concatenate, then one projection)");
}

// A recipe name (final | concat | hymba | falcon) or explicit axes, e.g. "norm=none,op=add,out=joint"
// (axes not named keep the `final` recipe's value).
inline FusionConfig parse_fusion(const std::string& s) {
    using N = FusionNorm; using S = FusionScale; using O = FusionOp; using V = FusionValue; using P = FusionOut;
    FusionConfig f;  // defaults are `final`
    if (s == "final") return f;
    if (s == "concat") { f.op = O::concat; f.out = P::joint; return f; }
    if (s == "hymba") { f.scale = S::vector; f.op = O::add; f.out = P::joint; return f; }
    if (s == "falcon") { f.norm = N::none; f.op = O::concat; f.out = P::joint; return f; }
    HL_CHECK(s.find('=') != std::string::npos, "unknown --fusion '", s,
             "': use final|concat|hymba|falcon or axes like norm=group,scale=none,op=diff,value=sep,out=sep");
    size_t pos = 0;
    while (pos <= s.size()) {
        size_t end = s.find(',', pos);
        if (end == std::string::npos) end = s.size();
        std::string item = s.substr(pos, end - pos);
        size_t eq = item.find('=');
        HL_CHECK(eq != std::string::npos, "--fusion: '", item, "' is not axis=value");
        std::string k = item.substr(0, eq), v = item.substr(eq + 1);
        auto bad = [&]() { fail("--fusion: unknown value '", v, "' for axis '", k, "'"); };
        if (k == "norm") { if (v == "group") f.norm = N::group; else if (v == "none") f.norm = N::none; else bad(); }
        else if (k == "scale") {
            if (v == "none") f.scale = S::none; else if (v == "vector") f.scale = S::vector;
            else if (v == "scalar") f.scale = S::scalar; else bad();
        } else if (k == "op") {
            if (v == "add") f.op = O::add; else if (v == "diff") f.op = O::diff; else if (v == "concat") f.op = O::concat;
            else bad();
        } else if (k == "value") { if (v == "sep") f.value = V::sep; else if (v == "shared") f.value = V::shared; else bad(); }
        else if (k == "out") { if (v == "sep") f.out = P::sep; else if (v == "joint") f.out = P::joint; else bad(); }
        else fail("--fusion: unknown axis '", k, "' (axes: norm, scale, op, value, out)");
        pos = end + 1;
    }
    fusion_check(f);
    return f;
}

}  // namespace hl
