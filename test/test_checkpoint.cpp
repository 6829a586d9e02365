// test_checkpoint.cpp — the JSON reader/writer and safetensors checkpoints: bit-exact round trips,
// the file layout checked byte by byte, every kind of bad file refused clearly, atomic saves.
#include <cmath>              // INFINITY, NAN
#include <cstdint>            // uint8_t, uint32_t, uint64_t
#include <cstdio>             // std::FILE, std::fopen, std::fread, std::fwrite
#include <cstdlib>            // mkdtemp
#include <cstring>            // std::memcpy, std::memcmp
#include <filesystem>         // std::filesystem: exists, create_directory, remove_all
#include <limits>             // std::numeric_limits: denormals, NaN payloads
#include <map>                // std::map
#include <string>             // std::string
#include <vector>             // std::vector
#include <doctest/doctest.h>  // TEST_CASE, CHECK
#include "test/files.h"       // TempDir, read_bytes, write_bytes
#include "model/checkpoint.h" // Json, save_safetensors, load_safetensors, load_into
#include "model/common.h"     // Arena, Rng, TensorInfo

using namespace hl;
using hl::test::TempDir;
using hl::test::read_bytes;
using hl::test::write_bytes;
namespace fs = std::filesystem;

namespace {

uint64_t le64(const std::string& b, size_t at) {
    uint64_t v = 0;
    for (int k = 0; k < 8; k++) v |= uint64_t(uint8_t(b[at + k])) << (8 * k);
    return v;
}
std::string le64_bytes(uint64_t v) {
    std::string s;
    for (int k = 0; k < 8; k++) s += char(uint8_t(v >> (8 * k)));
    return s;
}
// A hand-made safetensors file: header text (unpadded) and raw data bytes.
std::string raw_file(const std::string& header, const std::string& data) {
    return le64_bytes(header.size()) + header + data;
}
uint32_t bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}

template <typename F>
std::string error_of(F&& f) {
    try {
        f();
    } catch (const Error& e) {
        std::string msg = e.what();
        CHECK(msg.find('\n') == std::string::npos);  // one line
        return msg;
    }
    FAIL_CHECK("no hl::Error thrown");
    return "";
}
bool has(const std::string& msg, const std::string& part) { return msg.find(part) != std::string::npos; }

// Metadata that exercises the string escapes: quotes, backslashes, control bytes, UTF-8.
std::map<std::string, std::string> tricky_metadata() {
    return {{"quote", "say \"hi\""},
            {"backslash", "C:\\dir\\file\\"},
            {"control", "line1\nline2\ttab\r\x01\x1f end"},
            {"unicode", "h\xC3\xA9llo \xE2\x98\x83 \xF0\x9F\x98\x80"},  // é ☃ 😀
            {"k\xC3\xA9y \"x\"", "value"},
            {"empty", ""},
            {"step", "12345"},
            {"rng", "18446744073709551615"}};
}

}  // namespace

TEST_CASE("JSON: parse and dump round-trip; escapes and surrogate pairs decode; bad text is refused") {
    std::string text = R"( { "a" : [1, -23, 0, 9223372036854775807, -9223372036854775807],
                           "s" : "q\"b\\s\/\n\t\u00e9\u2603\ud83d\ude00", "o": {"x": []}, "e": {} } )";
    Json j = json_parse(text);
    REQUIRE(j.kind == Json::Object);
    REQUIRE(j.members.size() == 4);
    CHECK(j.members[0].first == "a");  // members keep file order
    const Json* a = j.find("a");
    REQUIRE(a);
    REQUIRE(a->items.size() == 5);
    CHECK(a->items[1].num == -23);
    CHECK(a->items[3].num == INT64_MAX);
    CHECK(j.find("s")->str == "q\"b\\s/\n\t\xC3\xA9\xE2\x98\x83\xF0\x9F\x98\x80");
    CHECK(j.find("o")->find("x")->kind == Json::Array);
    CHECK(j.find("missing") == nullptr);
    // dump → parse gives the same value again
    std::string dumped = json_dump(j);
    CHECK(json_dump(json_parse(dumped)) == dumped);
    CHECK(json_parse(dumped).find("s")->str == j.find("s")->str);
    CHECK(json_quote("a\"\\\n\x01\xC3\xA9") == "\"a\\\"\\\\\\n\\u0001\xC3\xA9\"");

    const char* bad[] = {"", "{", "{\"a\":1,}", "[1 2]", "{\"a\" 1}", "01", "1.5", "1e3", "-", "true", "null",
                         "\"abc", "\"a\x01\"", "\"\\x\"", "\"\\u12\"", "\"\\ud800\"", "\"\\udc00\"",
                         "{\"a\":1,\"a\":2}", "{} x", "99999999999999999999", "{1:2}"};
    for (const char* b : bad) {
        CAPTURE(b);
        CHECK(has(error_of([&] { json_parse(b); }), "JSON: "));
    }
    CHECK(has(error_of([&] { json_parse(std::string(100, '[') + std::string(100, ']')); }), "nesting"));
    CHECK(has(error_of([&] { json_parse("[1, 2,, 3]"); }), "at byte 6"));

    CHECK(valid_utf8("plain \xC3\xA9 \xF0\x9F\x98\x80"));
    CHECK_FALSE(valid_utf8("\xC3"));          // cut short
    CHECK_FALSE(valid_utf8("\x80"));          // stray continuation byte
    CHECK_FALSE(valid_utf8("\xC0\xAF"));      // overlong '/'
    CHECK_FALSE(valid_utf8("\xED\xA0\x80"));  // a surrogate
    CHECK_FALSE(valid_utf8("\xF4\x90\x80\x80"));  // above U+10FFFF
}

TEST_CASE("safetensors: save then load is bit-exact, metadata included") {
    TempDir dir;
    Rng rng(3);
    std::vector<float> w(3 * 5), b(7), s(1), special = {0.0f, -0.0f, INFINITY, -INFINITY,
                                                       std::numeric_limits<float>::denorm_min(),
                                                       std::numeric_limits<float>::max(), 1e-30f, -3.25f};
    rng.fill_normal(w.data(), w.size(), 1.0);
    rng.fill_normal(b.data(), b.size(), 1e-3);
    s[0] = 42.5f;
    float nan_payload;
    uint32_t nan_bits = 0x7FC12345u;
    std::memcpy(&nan_payload, &nan_bits, 4);
    special.push_back(nan_payload);
    // given order is not alphabetical: the file keeps it
    std::vector<std::pair<std::string, TensorView>> tensors = {{"z.first.weight", {{3, 5}, w.data()}},
                                                               {"b.second", {{7}, b.data()}},
                                                               {"scalar", {{}, s.data()}},
                                                               {"special", {{3, 1, 3}, special.data()}},
                                                               {"empty", {{0, 4}, nullptr}}};
    const std::string path = dir.file("model.safetensors");
    save_safetensors(path, tensors, tricky_metadata());
    CHECK_FALSE(fs::exists(path + ".tmp"));

    Checkpoint ck = load_safetensors(path);
    CHECK(ck.metadata == tricky_metadata());
    CHECK(meta_u64(ck, "step") == 12345);
    CHECK(meta_u64(ck, "rng") == UINT64_MAX);
    REQUIRE(ck.tensors.size() == tensors.size());
    for (const auto& t : tensors) {
        CAPTURE(t.first);
        REQUIRE(ck.tensors.count(t.first) == 1);
        const auto& got = ck.tensors.at(t.first);
        CHECK(got.first == t.second.shape);
        size_t numel = 1;
        for (int d : t.second.shape) numel *= size_t(d);
        REQUIRE(got.second.size() == numel);
        for (size_t i = 0; i < numel; i++) CHECK(bits(got.second[i]) == bits(t.second.data[i]));
    }
    CHECK(has(error_of([&] { meta_u64(ck, "quote"); }), "'quote' = \"say \\\"hi\\\"\" is not a non-negative integer"));
    CHECK(has(error_of([&] { meta_get(ck, "nope"); }), "metadata has no 'nope'"));
    CHECK(has(error_of([&] { check_metadata(ck, {{"step", "12346"}}); }), "saved with step=12345, this run has step=12346"));
    CHECK_NOTHROW(check_metadata(ck, {{"step", "12345"}, {"empty", ""}}));

    // saving again over the existing file replaces it
    save_safetensors(path, {{"only", {{2}, b.data()}}}, {});
    Checkpoint ck2 = load_safetensors(path);
    CHECK(ck2.tensors.size() == 1);
    CHECK(ck2.metadata.empty());
    CHECK(ck2.tensors.at("only").second == std::vector<float>(b.begin(), b.begin() + 2));
}

TEST_CASE("safetensors: the file layout, checked by hand") {
    TempDir dir;
    std::vector<float> w = {1.0f, -2.0f, 0.5f, 3.0f, 4.0f, 5.0f}, b = {0.25f, -1.5f, 7.0f};
    const std::string path = dir.file("x.safetensors");
    save_safetensors(path, {{"w", {{2, 3}, w.data()}}, {"a.b", {{3}, b.data()}}}, {{"d_model", "64"}, {"q", "a\"b"}});
    std::string f = read_bytes(path);
    REQUIRE(f.size() >= 8);
    uint64_t n = le64(f, 0);
    REQUIRE(8 + n + 4 * (6 + 3) == f.size());  // length, header, then exactly the tensor bytes
    CHECK((8 + n) % 8 == 0);                   // data section 8-byte aligned
    std::string header = f.substr(8, n);
    const std::string expected = R"({"__metadata__":{"d_model":"64","q":"a\"b"},)"
                                 R"("w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},)"
                                 R"("a.b":{"dtype":"F32","shape":[3],"data_offsets":[24,36]}})";
    REQUIRE(n >= expected.size());
    CHECK(n - expected.size() < 8);  // padding only
    CHECK(header == expected + std::string(n - expected.size(), ' '));
    // data: w then a.b, raw little-endian float32
    auto f32_at = [&](size_t at) {
        uint32_t u = 0;
        for (int k = 0; k < 4; k++) u |= uint32_t(uint8_t(f[at + k])) << (8 * k);
        float x;
        std::memcpy(&x, &u, 4);
        return x;
    };
    const size_t data = 8 + n;
    for (int i = 0; i < 6; i++) CHECK(f32_at(data + 4 * i) == w[i]);
    for (int i = 0; i < 3; i++) CHECK(f32_at(data + 24 + 4 * i) == b[i]);
    CHECK(uint8_t(f[data + 4]) == 0x00);  // -2.0f = 0xC0000000, little-endian: 00 00 00 C0
    CHECK(uint8_t(f[data + 7]) == 0xC0);
}

TEST_CASE("safetensors: truncated or corrupt files are refused with one clear line") {
    TempDir dir;
    std::vector<float> w(15, 1.0f), b(7, 2.0f);
    const std::string good_path = dir.file("good.safetensors");
    save_safetensors(good_path, {{"w", {{3, 5}, w.data()}}, {"b", {{7}, b.data()}}}, {{"k", "v"}});
    const std::string good = read_bytes(good_path);
    const uint64_t n = le64(good, 0);
    auto error_for = [&](const std::string& bytes) {
        const std::string p = dir.file("bad.safetensors");
        write_bytes(p, bytes);
        std::string msg = error_of([&] { load_safetensors(p); });
        CHECK(has(msg, "checkpoint '" + p + "'"));  // names the file
        return msg;
    };

    CHECK(has(error_of([&] { load_safetensors(dir.file("missing")); }), "cannot open '" + dir.file("missing") + "'"));
    CHECK_THROWS_AS(load_safetensors(dir.path), Error);
    // truncated anywhere
    CHECK(has(error_for(""), "0 bytes, shorter than the 8-byte header length"));
    CHECK(has(error_for(good.substr(0, 5)), "shorter than the 8-byte header length"));
    CHECK(has(error_for(good.substr(0, 8 + n - 1)), "runs past the end of the file"));
    CHECK(has(error_for(good.substr(0, good.size() - 1)), "out of range: the data section has 87 bytes"));
    CHECK(has(error_for(good.substr(0, 8 + n)), "truncated file?"));
    // header length beyond the file
    CHECK(has(error_for(le64_bytes(good.size()) + good.substr(8)), "header length"));
    CHECK(has(error_for(le64_bytes(UINT64_MAX) + good.substr(8)), "runs past the end"));
    // garbage / not JSON / not UTF-8
    std::string garbage = good;
    garbage[8 + 15] = '#';  // the ':' after "__metadata__"
    CHECK(has(error_for(garbage), "header is not valid JSON (JSON: "));
    CHECK(has(error_for(raw_file("{\"w\": [1, 2", "")), "not valid JSON"));
    CHECK(has(error_for(raw_file("[1, 2]", "")), "not a JSON object"));
    CHECK(has(error_for(raw_file("{\"\xFF\": 1}", "")), "not valid UTF-8"));
    // wrong structure inside valid JSON
    const std::string d12(12, '\0');
    CHECK(has(error_for(raw_file(R"({"w":{"dtype":"BF16","shape":[6],"data_offsets":[0,12]}})", d12)),
              "tensor 'w' has dtype BF16; only F32 is supported"));
    CHECK(has(error_for(raw_file(R"({"w":{"dtype":"F32","shape":[3]}})", d12)), "lacks dtype, shape or data_offsets"));
    CHECK(has(error_for(raw_file(R"({"w":{"dtype":"F32","shape":[-3],"data_offsets":[0,12]}})", d12)),
              "shape entries must be integers"));
    CHECK(has(error_for(raw_file(R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,12]}})", d12)),
              "hold 12 bytes but F32 shape [4] needs 16"));
    CHECK(has(error_for(raw_file(R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[4,16]}})", d12)), "out of range"));
    CHECK(has(error_for(raw_file(R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[8,-4]}})", d12)), "out of range"));
    CHECK(has(error_for(raw_file(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0]}})", d12)),
              "data_offsets must be [begin, end]"));
    CHECK(has(error_for(raw_file(R"({"w":{"dtype":"F32","shape":[65536,65536,65536,65536],"data_offsets":[0,12]}})", d12)),
              "needs more"));
    CHECK(has(error_for(raw_file(R"({"__metadata__":{"step":5}})", "")), "metadata \"step\" is not a string"));
    // byte ranges: overlap, gap, uncovered tail
    CHECK(has(error_for(raw_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                 R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", d12)),
              "tensors 'a' and 'b' overlap"));
    CHECK(has(error_for(raw_file(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                                 R"("b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})", d12)),
              "bytes [4, 8) of the data section belong to no tensor"));
    CHECK(has(error_for(raw_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", d12)),
              "bytes [8, 12) of the data section belong to no tensor"));
    // a hand-made file with offsets given out of order is fine: only the tiling matters
    std::string data;
    for (float x : {1.0f, 2.0f, 3.0f}) data.append(reinterpret_cast<const char*>(&x), 4);  // host is little-endian
    const std::string p = dir.file("ok.safetensors");
    write_bytes(p, raw_file(R"({"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]},)"
                            R"("a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}   )", data));
    Checkpoint ok = load_safetensors(p);
    CHECK(ok.tensors.at("a").second == std::vector<float>{1.0f, 2.0f});
    CHECK(ok.tensors.at("b").second == std::vector<float>{3.0f});
}

TEST_CASE("load_into: fills an Arena layout; another config's checkpoint is refused, the buffer untouched") {
    TempDir dir;
    // a toy model layout: an embedding, one layer's norm and projection
    auto layout = [](Arena<float>& a, int V, int C) {
        a.take("embed.weight", {V, C});
        Arena<float>::Scope s(a, "layers.0.");
        a.take("norm.weight", {C});
        a.take("mixer.in_proj.weight", {2 * C, C});
    };
    std::vector<TensorInfo> infos;
    Arena<float> count(nullptr, &infos);
    layout(count, 11, 3);
    std::vector<float> params(count.size);
    Rng rng(5);
    rng.fill_normal(params.data(), params.size(), 1.0);
    const std::string path = dir.file("m.safetensors");
    // parameters under "model.", a second copy under "adam.m." (as optimizer state would be)
    auto views = tensor_views(infos, params.data(), "model.");
    for (auto& v : tensor_views(infos, params.data(), "adam.m.")) views.push_back(v);
    save_safetensors(path, views, {{"d_model", "3"}});
    Checkpoint ck = load_safetensors(path);
    CHECK(ck.tensors.count("model.layers.0.mixer.in_proj.weight") == 1);

    std::vector<float> restored(count.size, -7.0f);
    load_into(ck, infos, restored.data(), "model.");
    CHECK(restored == params);

    // another config: d_model 4 instead of 3
    std::vector<TensorInfo> other;
    Arena<float> count2(nullptr, &other);
    layout(count2, 11, 4);
    std::vector<float> buf(count2.size, -7.0f);
    std::string msg = error_of([&] { load_into(ck, other, buf.data(), "model."); });
    CHECK(msg == "checkpoint '" + path + "': tensor model.embed.weight has shape [11, 3], model expects [11, 4]");
    for (float x : buf) CHECK(x == -7.0f);  // nothing copied

    // a layout with a tensor the checkpoint lacks; the wrong prefix
    std::vector<TensorInfo> extra = infos;
    extra.push_back({"layers.1.norm.weight", {3}, count.size - 3, 3});
    CHECK(has(error_of([&] { load_into(ck, extra, restored.data(), "model."); }), "missing tensor model.layers.1.norm.weight"));
    CHECK_THROWS_AS(load_into(ck, infos, restored.data(), "ema."), Error);
}

TEST_CASE("save_safetensors: a failed save throws, leaves no .tmp, and keeps an existing file untouched") {
    TempDir dir;
    std::vector<float> w = {1, 2, 3, 4};
    // directory does not exist
    const std::string nodir = dir.file("no/such/dir/m.safetensors");
    CHECK(has(error_of([&] { save_safetensors(nodir, {{"w", {{4}, w.data()}}}, {}); }), "cannot open '" + nodir + ".tmp'"));
    CHECK_FALSE(fs::exists(nodir + ".tmp"));

    const std::string path = dir.file("m.safetensors");
    save_safetensors(path, {{"w", {{4}, w.data()}}}, {{"step", "1"}});
    const std::string before = read_bytes(path);
    std::vector<float> w2 = {9, 9, 9, 9};

    // invalid input: refused before anything is written
    CHECK(has(error_of([&] { save_safetensors(path, {{"w", {{4}, w2.data()}}, {"w", {{4}, w2.data()}}}, {}); }),
              "duplicate tensor name 'w'"));
    CHECK(has(error_of([&] { save_safetensors(path, {{"__metadata__", {{4}, w2.data()}}}, {}); }), "reserved"));
    CHECK(has(error_of([&] { save_safetensors(path, {{"w", {{4, -1}, w2.data()}}}, {}); }), "negative dimension"));
    CHECK(has(error_of([&] { save_safetensors(path, {{"w", {{4}, nullptr}}}, {}); }), "has no data"));
    CHECK(has(error_of([&] { save_safetensors(path, {{"w", {{4}, w2.data()}}}, {{"k", "\xFF"}}); }), "not valid UTF-8"));
    CHECK(read_bytes(path) == before);
    CHECK_FALSE(fs::exists(path + ".tmp"));

    // the tmp name is taken by a directory: cannot open, and the directory is not ours to remove
    fs::create_directory(path + ".tmp");
    CHECK(has(error_of([&] { save_safetensors(path, {{"w", {{4}, w2.data()}}}, {}); }), "cannot open"));
    CHECK(fs::is_directory(path + ".tmp"));
    CHECK(read_bytes(path) == before);
    fs::remove(path + ".tmp");

    // the write succeeds but the rename fails (target is a non-empty directory): the tmp is removed
    const std::string dpath = dir.file("d.safetensors");
    fs::create_directory(dpath);
    write_bytes(dpath + "/keep", "x");
    CHECK(has(error_of([&] { save_safetensors(dpath, {{"w", {{4}, w2.data()}}}, {}); }), "cannot rename"));
    CHECK_FALSE(fs::exists(dpath + ".tmp"));
    CHECK(read_bytes(dpath + "/keep") == "x");
    CHECK(load_safetensors(path).tensors.at("w").second == w);  // the good checkpoint still loads
}
