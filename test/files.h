// files.h — test helpers for files: a temporary folder removed at the end of a test, a whole file's bytes, and a file
// written from bytes.
#pragma once
#include <cstdio>             // std::fopen, std::fread, std::fwrite
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

// path's bytes set to bytes (created or truncated); the test stops if it cannot be written.
inline void write_bytes(const std::string& path, const std::string& bytes) {
    std::FILE* f = std::fopen(path.c_str(), "wb");
    REQUIRE(f != nullptr);
    REQUIRE(std::fwrite(bytes.data(), 1, bytes.size(), f) == bytes.size());
    std::fclose(f);
}

}  // namespace hl::test
