// test_data.cpp — byte tokenizer, token files (text and llm.c .bin shards), train/val split, and the
// random / sequential window loaders, including their errors on bad input.
#include <cstdint>           // uint16_t, uint32_t, uint64_t
#include <set>               // std::set: which window starts were drawn
#include <string>            // std::string
#include <vector>            // std::vector
#include <doctest/doctest.h>  // TEST_CASE, CHECK
#include "data/loader.h"     // load_tokens, split_tokens, WindowLoader, eval_windows
#include "data/tokenizer.h"  // ByteTokenizer
#include "test/files.h"      // TempDir, write_bytes

using namespace hl;
using hl::test::TempDir;
using hl::test::write_bytes;

namespace {

void put_le(std::string& out, uint64_t v, int nbytes) {
    for (int k = 0; k < nbytes; k++) out += char(uint8_t(v >> (8 * k)));
}

// An llm.c shard, byte by byte as llm.c's Python writes it: 256 int32 header, then uint16 tokens.
std::string make_shard(const std::vector<int>& tokens, uint32_t magic = 20240520, uint32_t version = 1,
                       uint32_t count = UINT32_MAX) {
    std::string b;
    put_le(b, magic, 4);
    put_le(b, version, 4);
    put_le(b, count == UINT32_MAX ? uint32_t(tokens.size()) : count, 4);
    for (int i = 3; i < 256; i++) put_le(b, 0, 4);
    for (int t : tokens) put_le(b, uint16_t(t), 2);
    return b;
}

// The message of the hl::Error f throws (a failed check if it throws none); errors are one line.
template <typename F>
std::string error_of(F&& f) {
    try {
        f();
    } catch (const Error& e) {
        std::string msg = e.what();
        CHECK(msg.find('\n') == std::string::npos);
        return msg;
    }
    FAIL_CHECK("no hl::Error thrown");
    return "";
}
bool has(const std::string& msg, const std::string& part) { return msg.find(part) != std::string::npos; }

}  // namespace

TEST_CASE("byte tokenizer: every byte round-trips, ids are the unsigned byte values") {
    ByteTokenizer tok;
    CHECK(ByteTokenizer::vocab_size == 256);
    std::string all;
    for (int b = 0; b < 256; b++) all += char(uint8_t(b));
    std::string text = "Hello, w\xC3\xB6rld \xE2\x98\x83\n" + all + all;  // UTF-8 and all 256 bytes, twice
    std::vector<int> ids = tok.encode(text);
    REQUIRE(ids.size() == text.size());
    for (size_t i = 0; i < text.size(); i++) CHECK(ids[i] == int(uint8_t(text[i])));
    CHECK(ids[8] == 0xC3);  // a byte ≥ 128 is a positive id, not a negative char
    CHECK(tok.decode(ids) == text);
    for (int b = 0; b < 256; b++) CHECK(tok.decode_token(b) == std::string(1, char(uint8_t(b))));
    CHECK(tok.encode("").empty());
    CHECK_THROWS_AS(tok.decode({65, 256}), Error);
    CHECK(has(error_of([&] { tok.decode({65, -1}); }), "token -1 at position 1"));
    CHECK(has(error_of([&] { tok.decode_token(300); }), "token 300"));
}

TEST_CASE("load_tokens reads text through the byte tokenizer, and the shipped corpus") {
    TempDir dir;
    std::string text = "First line\nsecond \xE2\x98\x83 line\n\xFF\x80";
    write_bytes(dir.file("a.txt"), text);
    CHECK(load_tokens(dir.file("a.txt")) == ByteTokenizer().encode(text));

    // the corpus shipped in data/ (tests run from the repository root)
    std::vector<int> shakespeare = load_tokens("data/tinyshakespeare.txt");
    CHECK(shakespeare.size() == 1115394);
    CHECK(ByteTokenizer().decode({shakespeare.begin(), shakespeare.begin() + 13}) == "First Citizen");
}

TEST_CASE("load_tokens reads an llm.c .bin shard") {
    TempDir dir;
    std::vector<int> tokens = {50256, 0, 1, 255, 256, 65535, 1234, 7, 40000};  // uint16 range, odd count
    write_bytes(dir.file("train.bin"), make_shard(tokens));
    CHECK(load_tokens(dir.file("train.bin")) == tokens);
    // a shard under another name is recognised by its magic, not read as text
    write_bytes(dir.file("shard.dat"), make_shard(tokens));
    CHECK(load_tokens(dir.file("shard.dat")) == tokens);
    // GPT-2 ids do not fit the byte model's vocabulary: refused before they index an embedding
    CHECK(has(error_of([&] { check_vocab(tokens, 256); }), "token 50256 at position 0"));
    CHECK_NOTHROW(check_vocab(tokens, 65536));
}

TEST_CASE("load_tokens: missing, empty, bad-magic, truncated or inconsistent files are clear errors") {
    TempDir dir;
    std::vector<int> tokens = {1, 2, 3, 4, 5};
    std::string good = make_shard(tokens);

    std::string missing = dir.file("nope.txt");
    CHECK_THROWS_AS(load_tokens(missing), Error);
    CHECK(has(error_of([&] { load_tokens(missing); }), missing));
    CHECK(has(error_of([&] { load_tokens(dir.path); }), "not a regular file"));

    write_bytes(dir.file("empty.txt"), "");
    CHECK(has(error_of([&] { load_tokens(dir.file("empty.txt")); }), dir.file("empty.txt") + "' is empty"));
    write_bytes(dir.file("empty.bin"), "");
    CHECK(has(error_of([&] { load_tokens(dir.file("empty.bin")); }), "is empty"));

    write_bytes(dir.file("magic.bin"), make_shard(tokens, 20240521));
    CHECK_THROWS_AS(load_tokens(dir.file("magic.bin")), Error);
    CHECK(has(error_of([&] { load_tokens(dir.file("magic.bin")); }), "magic 20240521, expected 20240520"));

    write_bytes(dir.file("version.bin"), make_shard(tokens, 20240520, 2));
    CHECK(has(error_of([&] { load_tokens(dir.file("version.bin")); }), "version 2"));

    write_bytes(dir.file("cut.bin"), good.substr(0, good.size() - 1));  // last token half there
    CHECK_THROWS_AS(load_tokens(dir.file("cut.bin")), Error);
    CHECK(has(error_of([&] { load_tokens(dir.file("cut.bin")); }), "truncated: header says 5 tokens"));

    write_bytes(dir.file("short.bin"), good.substr(0, 100));  // inside the header
    CHECK(has(error_of([&] { load_tokens(dir.file("short.bin")); }), "shorter than its 1024-byte header"));

    write_bytes(dir.file("long.bin"), good + "xy");
    CHECK(has(error_of([&] { load_tokens(dir.file("long.bin")); }), "2 bytes after its 5 tokens"));

    write_bytes(dir.file("zero.bin"), make_shard({}));
    CHECK(has(error_of([&] { load_tokens(dir.file("zero.bin")); }), "holds no tokens"));
}

TEST_CASE("split_tokens: val is the last fraction, both parts non-empty") {
    std::vector<int> tokens(103);
    for (int i = 0; i < 103; i++) tokens[i] = i;
    Split s = split_tokens(tokens, 0.1);
    CHECK(s.val.size() == 10);  // floor(10.3)
    CHECK(s.train.size() == 93);
    CHECK(s.train.front() == 0);
    CHECK(s.train.back() == 92);
    CHECK(s.val.front() == 93);
    CHECK(s.val.back() == 102);
    Split h = split_tokens(tokens, 0.5);
    CHECK(h.val.size() == 51);
    CHECK(h.train.size() == 52);

    CHECK_THROWS_AS(split_tokens(tokens, 0.0), Error);
    CHECK_THROWS_AS(split_tokens(tokens, 1.0), Error);
    CHECK(has(error_of([&] { split_tokens(std::vector<int>(5, 1), 0.1); }), "val 0 tokens"));
    CHECK_THROWS_AS(split_tokens(std::vector<int>(), 0.5), Error);
}

TEST_CASE("WindowLoader: targets are inputs shifted by one, windows stay in bounds and reach both ends") {
    const int N = 12, B = 3, T = 7;  // 5 possible starts: 0..4
    std::vector<int> tokens(N);
    for (int i = 0; i < N; i++) tokens[i] = 100 + i;  // the value gives the position back
    WindowLoader loader(tokens, B, T, 42);
    std::vector<int> in(B * T), tg(B * T);
    std::set<int> starts;
    for (int step = 0; step < 100; step++) {
        loader.next(in.data(), tg.data());
        for (int b = 0; b < B; b++) {
            int start = in[b * T] - 100;
            CHECK(start >= 0);
            CHECK(start + T + 1 <= N);  // the whole window of T+1 tokens lies inside the data
            starts.insert(start);
            for (int t = 0; t < T; t++) {
                CHECK(in[b * T + t] == tokens[start + t]);
                CHECK(tg[b * T + t] == tokens[start + t + 1]);
            }
        }
    }
    CHECK(starts.size() == size_t(N - T));  // every start, including the last, is drawn

    // exactly T+1 tokens: the only window is the whole data
    std::vector<int> tiny = {5, 6, 7, 8, 9, 10, 11, 12};
    WindowLoader one(tiny, 2, 7, 1);
    one.next(in.data(), tg.data());
    for (int b = 0; b < 2; b++)
        for (int t = 0; t < 7; t++) {
            CHECK(in[b * 7 + t] == tiny[t]);
            CHECK(tg[b * 7 + t] == tiny[t + 1]);
        }
}

TEST_CASE("WindowLoader: same seed same batches; a saved RNG state resumes the same stream") {
    std::vector<int> tokens(500);
    for (int i = 0; i < 500; i++) tokens[i] = i;
    const int B = 3, T = 5;
    auto draw = [&](WindowLoader& l) {
        std::vector<int> in(B * T), tg(B * T);
        l.next(in.data(), tg.data());
        return in;
    };
    WindowLoader a(tokens, B, T, 7), b(tokens, B, T, 7), c(tokens, B, T, 8);
    bool c_differs = false;
    for (int i = 0; i < 5; i++) {
        auto xa = draw(a), xb = draw(b), xc = draw(c);
        CHECK(xa == xb);
        c_differs = c_differs || xa != xc;
    }
    CHECK(c_differs);

    // checkpoint the state mid-stream, draw on; a loader restored from it draws the same batches
    uint64_t state = a.rng_state();
    std::vector<std::vector<int>> expected;
    for (int i = 0; i < 4; i++) expected.push_back(draw(a));
    WindowLoader resumed(tokens, B, T, 999);
    resumed.set_rng_state(state);
    for (int i = 0; i < 4; i++) CHECK(draw(resumed) == expected[i]);
}

TEST_CASE("WindowLoader: too little data or bad sizes are clear errors") {
    std::vector<int> seven(7, 1);
    CHECK_THROWS_AS(WindowLoader(seven, 2, 7, 1), Error);
    CHECK(error_of([&] { WindowLoader(seven, 2, 7, 1); }) == "data: data has 7 tokens, fewer than seq-len+1 = 8");
    CHECK(has(error_of([&] { WindowLoader(seven, 0, 3, 1); }), "B=0"));
    CHECK(has(error_of([&] { WindowLoader(seven, 2, -1, 1); }), "T=-1"));
    CHECK_NOTHROW(WindowLoader(seven, 2, 6, 1));
}

TEST_CASE("eval windows: consecutive, deterministic, every token after the first predicted once") {
    const int N = 30, T = 7, B = 3;
    std::vector<int> tokens(N);
    for (int i = 0; i < N; i++) tokens[i] = 1000 + i;
    const int n = num_eval_windows(tokens, T);
    CHECK(n == 4);  // (30 − 1) / 7: tokens 0..28 used, token 29 is the unused tail
    std::vector<int> predicted(N, 0);
    int batches = 0;
    for (int w = 0; w < n; w += B) {
        std::vector<int> in(B * T, -1), tg(B * T, -1);
        int rows = eval_windows(in.data(), tg.data(), tokens, w, B, T);
        CHECK(rows == (w == 0 ? 3 : 1));
        for (int b = 0; b < rows; b++)
            for (int t = 0; t < T; t++) {
                CHECK(in[b * T + t] == tokens[(w + b) * T + t]);
                CHECK(tg[b * T + t] == in[b * T + t] + 1);
                predicted[tg[b * T + t] - 1000]++;
            }
        for (int i = rows * T; i < B * T; i++) CHECK(in[i] == -1);  // rows past the count untouched
        batches++;
    }
    CHECK(batches == 2);
    CHECK(predicted[0] == 0);
    for (int i = 1; i <= 28; i++) CHECK(predicted[i] == 1);
    CHECK(predicted[29] == 0);

    std::vector<int> in(B * T), tg(B * T);
    CHECK(has(error_of([&] { eval_windows(in.data(), tg.data(), tokens, 4, B, T); }), "eval window 4 out of range 0..3"));
    CHECK_THROWS_AS(num_eval_windows(std::vector<int>(7, 0), 7), Error);
    CHECK(num_eval_windows(std::vector<int>(8, 0), 7) == 1);
}
