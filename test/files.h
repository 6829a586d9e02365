// files.h — test helpers for files: a temporary folder removed at the end of a test, and a whole file's bytes.
#pragma once
#include <cstdio>             // std::fopen, std::fread
#include <cstdlib>            // mkdtemp
#include <filesystem>         // std::filesystem::remove_all
#include <string>             // std::string
#include <doctest/doctest.h>  // REQUIRE

namespace hl::test {

struct TempDir {
    std::string path;
    TempDir() {
        char tmpl[] = "/tmp/hl_test_XXXXXX";
        REQUIRE(mkdtemp(tmpl) != nullptr);
        path = tmpl;
    }
    ~TempDir() { std::filesystem::remove_all(path); }
    std::string file(const std::string& name) const { return path + "/" + name; }
};

// The file's bytes, or "(missing)" when it cannot be opened (so a comparison with it fails).
inline std::string read_bytes(const std::string& path) {
    std::FILE* f = std::fopen(path.c_str(), "rb");
    if (!f) return "(missing)";
    std::string out;
    char buf[4096];
    size_t n;
    while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) out.append(buf, n);
    std::fclose(f);
    return out;
}

}  // namespace hl::test
