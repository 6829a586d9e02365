// loader.h — token data for training: load a corpus (raw text through the byte tokenizer, or an
// llm.c `.bin` shard), split it into train/val, and cut batches of windows out of it:
//   random windows for training (WindowLoader, its RNG state saved in checkpoints), and
//   consecutive windows for validation (num_eval_windows / eval_windows, the same every time).
#pragma once
#include <cerrno>           // errno
#include <cstdint>          // uint8_t, uint16_t, uint32_t, uint64_t
#include <cstdio>           // std::FILE, std::fopen, std::fread
#include <cstring>          // std::strerror
#include <string>           // std::string
#include <vector>           // std::vector
#include <sys/stat.h>       // stat, S_ISREG: tell a missing file from a directory
#include "data/tokenizer.h"  // ByteTokenizer
#include "model/common.h"    // HL_CHECK, Rng

namespace hl {

// llm.c's tokenized shard (dev/data/*.bin): a header of 256 little-endian int32 —
// [0] magic 20240520, [1] version 1, [2] token count — then that many uint16 tokens (GPT-2 ids).
constexpr int SHARD_HEADER_INTS = 256;
constexpr uint32_t SHARD_MAGIC = 20240520;
constexpr uint32_t SHARD_VERSION = 1;

namespace data_detail {

// The whole file as bytes. Missing, unreadable or not a regular file → one clear error line.
inline std::string read_file(const std::string& path) {
    struct stat st;
    if (stat(path.c_str(), &st) != 0) fail("data: cannot open '", path, "': ", std::strerror(errno));
    HL_CHECK(S_ISREG(st.st_mode), "data: '", path, "' is not a regular file");
    std::FILE* f = std::fopen(path.c_str(), "rb");
    if (!f) fail("data: cannot open '", path, "': ", std::strerror(errno));
    std::string bytes(size_t(st.st_size), '\0');
    size_t got = std::fread(&bytes[0], 1, bytes.size(), f);
    std::fclose(f);
    HL_CHECK(got == bytes.size(), "data: could only read ", got, " of ", bytes.size(), " bytes of '", path, "'");
    return bytes;
}

// Little-endian integers from raw bytes, independent of the host's byte order.
inline uint32_t le_u32(const std::string& b, size_t at) {
    return uint32_t(uint8_t(b[at])) | uint32_t(uint8_t(b[at + 1])) << 8 | uint32_t(uint8_t(b[at + 2])) << 16 |
           uint32_t(uint8_t(b[at + 3])) << 24;
}
inline uint16_t le_u16(const std::string& b, size_t at) {
    return uint16_t(uint8_t(b[at]) | uint8_t(b[at + 1]) << 8);
}

inline bool ends_with(const std::string& s, const std::string& tail) {
    return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}

}  // namespace data_detail

// Tokens of one llm.c shard held in `bytes` (read from `path`, named in errors).
inline std::vector<int> parse_shard(const std::string& bytes, const std::string& path) {
    using namespace data_detail;
    const size_t header_bytes = SHARD_HEADER_INTS * 4;
    HL_CHECK(bytes.size() >= header_bytes, "data: shard '", path, "' is truncated: ", bytes.size(),
             " bytes, shorter than its ", header_bytes, "-byte header");
    uint32_t magic = le_u32(bytes, 0), version = le_u32(bytes, 4), count = le_u32(bytes, 8);
    HL_CHECK(magic == SHARD_MAGIC, "data: '", path, "' is not an llm.c token shard: magic ", magic, ", expected ",
             SHARD_MAGIC);
    HL_CHECK(version == SHARD_VERSION, "data: shard '", path, "' has version ", version, "; only version ",
             SHARD_VERSION, " (uint16 tokens) is supported");
    // The header's count must match the file exactly: fewer bytes = truncated, more = corrupt.
    const uint64_t expect = header_bytes + 2ull * count;
    HL_CHECK(bytes.size() >= expect, "data: shard '", path, "' is truncated: header says ", count,
             " tokens (", expect, " bytes) but the file has ", bytes.size(), " bytes");
    HL_CHECK(bytes.size() == expect, "data: shard '", path, "' has ", bytes.size() - expect,
             " bytes after its ", count, " tokens; the header's token count is wrong");
    HL_CHECK(count > 0, "data: shard '", path, "' holds no tokens");
    std::vector<int> tokens(count);
    for (size_t i = 0; i < count; i++) tokens[i] = le_u16(bytes, header_bytes + 2 * i);
    return tokens;
}

// Tokens of a data file. An llm.c shard (name ends in `.bin`, or the file starts with the shard
// magic) is read as one and checked; anything else is text through the byte tokenizer.
// Missing or empty file → hl::Error naming the path.
inline std::vector<int> load_tokens(const std::string& path) {
    using namespace data_detail;
    std::string bytes = read_file(path);
    HL_CHECK(!bytes.empty(), "data: '", path, "' is empty");
    bool shard = ends_with(path, ".bin") || (bytes.size() >= 4 && le_u32(bytes, 0) == SHARD_MAGIC);
    if (shard) return parse_shard(bytes, path);
    return ByteTokenizer().encode(bytes);
}

// Every token must be an id the model has an embedding row for (a GPT-2 shard on a 256-token
// model would otherwise index out of bounds).
inline void check_vocab(const std::vector<int>& tokens, int vocab_size) {
    for (size_t i = 0; i < tokens.size(); i++)
        HL_CHECK(tokens[i] >= 0 && tokens[i] < vocab_size, "data: token ", tokens[i], " at position ", i,
                 " is outside the model's vocabulary of ", vocab_size,
                 " (was the data tokenized for a larger vocab?)");
}

struct Split {
    std::vector<int> train, val;
};

// val = the last val_frac of the tokens (rounded down), train = the rest. Contiguous halves, so no
// training window ever contains validation text. Both parts must be non-empty.
inline Split split_tokens(const std::vector<int>& tokens, double val_frac = 0.1) {
    HL_CHECK(val_frac > 0 && val_frac < 1, "data: val fraction must be in (0, 1), got ", val_frac);
    const size_t n_val = size_t(double(tokens.size()) * val_frac);
    const size_t n_train = tokens.size() - n_val;
    HL_CHECK(n_val > 0 && n_train > 0, "data: cannot split ", tokens.size(), " tokens with val fraction ", val_frac,
             ": train would get ", n_train, " and val ", n_val, " tokens");
    Split s;
    s.train.assign(tokens.begin(), tokens.begin() + n_train);
    s.val.assign(tokens.begin() + n_train, tokens.end());
    return s;
}

// Training batches: B windows of T+1 consecutive tokens, each starting at an independent uniformly
// random position. inputs = window[0..T), targets = window[1..T] (the next token at each position).
// The whole state of the stream is the RNG's one uint64: save rng_state() in a checkpoint and
// set_rng_state() on resume to draw exactly the batches an uninterrupted run would have drawn.
struct WindowLoader {
    const std::vector<int>* tokens;  // not owned: must outlive the loader
    int B, T;
    Rng rng;

    WindowLoader(const std::vector<int>& toks, int B_, int T_, uint64_t seed)
        : tokens(&toks), B(B_), T(T_), rng(seed) {
        HL_CHECK(B > 0 && T > 0, "data: batch size and seq-len must be positive, got B=", B, " T=", T);
        HL_CHECK(toks.size() >= size_t(T) + 1, "data: data has ", toks.size(), " tokens, fewer than seq-len+1 = ",
                 T + 1);
    }
    WindowLoader(const std::vector<int>&&, int, int, uint64_t) = delete;  // would keep a dangling pointer

    // inputs (B, T), targets (B, T)
    void next(int* inputs, int* targets) {
        const std::vector<int>& tok = *tokens;
        // A window needs T+1 tokens, so it can start at 0 .. N-T-1: N-T choices. The modulo bias
        // is at most N / 2^64, far below anything measurable.
        const uint64_t n_starts = tok.size() - size_t(T);
        for (int b = 0; b < B; b++) {
            const size_t start = size_t(rng.next() % n_starts);
            const int* w = tok.data() + start;
            for (int t = 0; t < T; t++) {
                inputs[(size_t)b * T + t] = w[t];
                targets[(size_t)b * T + t] = w[t + 1];
            }
        }
    }

    uint64_t rng_state() const { return rng.s; }
    void set_rng_state(uint64_t s) { rng.s = s; }
};

// Validation: the tokens cut into consecutive windows, window w = tokens [w·T, w·T + T]. Windows
// overlap by one token (the last target of one is the first input of the next), so every token
// after the first is predicted exactly once and the mean loss over all windows is a plain
// per-token average. The leftover tail shorter than a window is not used.
inline int num_eval_windows(const std::vector<int>& tokens, int T) {
    HL_CHECK(T > 0, "data: seq-len must be positive, got ", T);
    HL_CHECK(tokens.size() >= size_t(T) + 1, "data: data has ", tokens.size(), " tokens, fewer than seq-len+1 = ",
             T + 1);
    return int((tokens.size() - 1) / size_t(T));
}

// Fills rows 0.. of inputs (B, T) / targets (B, T) with windows first, first+1, ... and returns how
// many rows it filled: B, or fewer for the last batch (then run the model on that many rows; rows
// beyond are left untouched). Typical loop:
//   for (int w = 0; w < num_eval_windows(val, T); w += B) { int rows = eval_windows(in, tg, val, w, B, T); ... }
inline int eval_windows(int* inputs, int* targets, const std::vector<int>& tokens, int first, int B, int T) {
    const int n = num_eval_windows(tokens, T);
    HL_CHECK(B > 0, "data: batch size must be positive, got ", B);
    HL_CHECK(first >= 0 && first < n, "data: eval window ", first, " out of range 0..", n - 1);
    const int rows = first + B <= n ? B : n - first;
    for (int b = 0; b < rows; b++) {
        const int* w = tokens.data() + (size_t)(first + b) * T;
        for (int t = 0; t < T; t++) {
            inputs[(size_t)b * T + t] = w[t];
            targets[(size_t)b * T + t] = w[t + 1];
        }
    }
    return rows;
}

}  // namespace hl
