// checkpoint.h — checkpoints in the safetensors format, so PyTorch users can open them
// (`safetensors.torch.load_file`). The layout of a file:
//   [8 bytes]  N, the header length, little-endian uint64
//   [N bytes]  JSON header: {"__metadata__": {"key": "value", ...},
//                            "name": {"dtype": "F32", "shape": [d0, d1], "data_offsets": [begin, end]}, ...}
//              padded with spaces so the data starts 8-byte aligned
//   [rest]     the data section: raw little-endian tensors; offsets are relative to its start
// Only F32 tensors are written and read; integers such as the step or the RNG state go into the
// metadata as decimal strings. A save goes to `path.tmp`, is fsynced, then renamed over `path`,
// so a crash or a failed write never leaves a half-written checkpoint under the real name.
#pragma once
#include <algorithm>       // std::sort
#include <cerrno>          // errno
#include <climits>         // INT_MAX
#include <cstdint>         // int64_t, uint8_t, uint32_t, uint64_t
#include <cstdio>          // std::FILE, std::fopen, std::fwrite, std::fread, std::rename, std::remove
#include <cstring>         // std::memcpy, std::strerror
#include <map>             // std::map
#include <set>             // std::set: duplicate names
#include <string>          // std::string
#include <utility>         // std::pair, std::move
#include <vector>          // std::vector
#include <fcntl.h>         // open, O_RDONLY: the directory to fsync after the rename
#include <sys/stat.h>      // stat, S_ISREG
#include <unistd.h>        // fsync, close
#include "model/common.h"  // Error, HL_CHECK, fail, TensorInfo

namespace hl {

// ============================================================================================
// A small JSON reader/writer: just what a safetensors header needs — objects, arrays, strings
// (with escapes) and integers. No floats, booleans or null.
// ============================================================================================

struct Json {
    enum Kind { Int, String, Array, Object };
    Kind kind = Object;
    int64_t num = 0;                                    // Int
    std::string str;                                    // String (UTF-8 bytes, escapes resolved)
    std::vector<Json> items;                            // Array
    std::vector<std::pair<std::string, Json>> members;  // Object, in file order

    static Json integer(int64_t v) { Json j; j.kind = Int; j.num = v; return j; }
    static Json string(std::string s) { Json j; j.kind = String; j.str = std::move(s); return j; }
    static Json array() { Json j; j.kind = Array; return j; }
    static Json object() { Json j; j.kind = Object; return j; }

    // The member named key of an object, or null when absent.
    const Json* find(const std::string& key) const {
        for (const auto& m : members)
            if (m.first == key) return &m.second;
        return nullptr;
    }
};

// True when s is well-formed UTF-8 (no overlong forms, no surrogates, nothing above U+10FFFF).
// The safetensors header must be: Python and Rust refuse the file otherwise.
inline bool valid_utf8(const std::string& s) {
    size_t i = 0, n = s.size();
    while (i < n) {
        uint8_t c = uint8_t(s[i]);
        if (c < 0x80) { i++; continue; }
        int len;
        uint32_t cp;
        if ((c & 0xE0) == 0xC0) { len = 2; cp = c & 0x1F; }
        else if ((c & 0xF0) == 0xE0) { len = 3; cp = c & 0x0F; }
        else if ((c & 0xF8) == 0xF0) { len = 4; cp = c & 0x07; }
        else return false;  // a continuation byte or 0xF8.. where a character should start
        if (i + len > n) return false;
        for (int k = 1; k < len; k++) {
            uint8_t cc = uint8_t(s[i + k]);
            if ((cc & 0xC0) != 0x80) return false;
            cp = (cp << 6) | (cc & 0x3F);
        }
        static const uint32_t min_cp[5] = {0, 0, 0x80, 0x800, 0x10000};
        if (cp < min_cp[len] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
        i += len;
    }
    return true;
}

// s as a JSON string literal: quotes, backslashes and control characters escaped; bytes ≥ 0x80
// (UTF-8) pass through verbatim.
inline std::string json_quote(const std::string& s) {
    static const char hex[] = "0123456789abcdef";
    std::string out = "\"";
    for (char ch : s) {
        uint8_t c = uint8_t(ch);
        switch (c) {
            case '"': out += "\\\""; break;
            case '\\': out += "\\\\"; break;
            case '\n': out += "\\n"; break;
            case '\r': out += "\\r"; break;
            case '\t': out += "\\t"; break;
            case '\b': out += "\\b"; break;
            case '\f': out += "\\f"; break;
            default:
                if (c < 0x20) {
                    out += "\\u00";
                    out += hex[c >> 4];
                    out += hex[c & 15];
                } else {
                    out += ch;
                }
        }
    }
    return out + "\"";
}

// Compact JSON text of a value (no spaces), members in their stored order.
inline std::string json_dump(const Json& j) {
    switch (j.kind) {
        case Json::Int: return std::to_string(j.num);
        case Json::String: return json_quote(j.str);
        case Json::Array: {
            std::string out = "[";
            for (size_t i = 0; i < j.items.size(); i++) out += (i ? "," : "") + json_dump(j.items[i]);
            return out + "]";
        }
        case Json::Object: {
            std::string out = "{";
            for (size_t i = 0; i < j.members.size(); i++)
                out += (i ? "," : "") + json_quote(j.members[i].first) + ":" + json_dump(j.members[i].second);
            return out + "}";
        }
    }
    return "";
}

namespace json_detail {

// Recursive descent over the text; every error names what was expected and the byte offset.
struct Parser {
    const std::string& s;
    size_t i = 0;
    int depth = 0;
    static constexpr int MAX_DEPTH = 64;  // a corrupt "[[[[[..." must not overflow the stack

    [[noreturn]] void error(const std::string& what) const { fail("JSON: ", what, " at byte ", i); }

    void skip_ws() {
        while (i < s.size() && (s[i] == ' ' || s[i] == '\t' || s[i] == '\n' || s[i] == '\r')) i++;
    }
    void expect(char c) {
        skip_ws();
        if (i >= s.size() || s[i] != c) error(std::string("expected '") + c + "'");
        i++;
    }

    Json value() {
        skip_ws();
        if (i >= s.size()) error("unexpected end of text");
        if (++depth > MAX_DEPTH) error("nesting deeper than 64 levels");
        Json v;
        char c = s[i];
        if (c == '{') v = object();
        else if (c == '[') v = array();
        else if (c == '"') v = Json::string(string());
        else if (c == '-' || (c >= '0' && c <= '9')) v = integer();
        else error(std::string("unexpected character '") + c + "' (only objects, arrays, strings, integers)");
        depth--;
        return v;
    }

    Json object() {
        Json v = Json::object();
        i++;  // '{'
        skip_ws();
        if (i < s.size() && s[i] == '}') { i++; return v; }
        for (;;) {
            skip_ws();
            if (i >= s.size() || s[i] != '"') error("expected a string key");
            std::string key = string();
            if (v.find(key)) error("duplicate key " + json_quote(key));
            expect(':');
            v.members.emplace_back(std::move(key), value());
            skip_ws();
            if (i < s.size() && s[i] == ',') { i++; continue; }
            if (i < s.size() && s[i] == '}') { i++; return v; }
            error("expected ',' or '}'");
        }
    }

    Json array() {
        Json v = Json::array();
        i++;  // '['
        skip_ws();
        if (i < s.size() && s[i] == ']') { i++; return v; }
        for (;;) {
            v.items.push_back(value());
            skip_ws();
            if (i < s.size() && s[i] == ',') { i++; continue; }
            if (i < s.size() && s[i] == ']') { i++; return v; }
            error("expected ',' or ']'");
        }
    }

    // -?(0|[1-9][0-9]*), within int64
    Json integer() {
        bool neg = s[i] == '-';
        if (neg) i++;
        if (i >= s.size() || s[i] < '0' || s[i] > '9') error("expected a digit");
        if (s[i] == '0' && i + 1 < s.size() && s[i + 1] >= '0' && s[i + 1] <= '9') error("leading zero in number");
        uint64_t mag = 0;
        while (i < s.size() && s[i] >= '0' && s[i] <= '9') {
            uint64_t d = uint64_t(s[i] - '0');
            if (mag > (uint64_t(INT64_MAX) - d) / 10) error("integer out of range");
            mag = mag * 10 + d;
            i++;
        }
        if (i < s.size() && (s[i] == '.' || s[i] == 'e' || s[i] == 'E')) error("non-integer numbers are not supported");
        return Json::integer(neg ? -int64_t(mag) : int64_t(mag));
    }

    uint32_t hex4() {
        if (i + 4 > s.size()) error("truncated \\u escape");
        uint32_t v = 0;
        for (int k = 0; k < 4; k++, i++) {
            char c = s[i];
            int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
            if (d < 0) error("bad hex digit in \\u escape");
            v = v * 16 + uint32_t(d);
        }
        return v;
    }

    static void put_utf8(std::string& out, uint32_t cp) {
        if (cp < 0x80) {
            out += char(cp);
        } else if (cp < 0x800) {
            out += char(0xC0 | (cp >> 6));
            out += char(0x80 | (cp & 0x3F));
        } else if (cp < 0x10000) {
            out += char(0xE0 | (cp >> 12));
            out += char(0x80 | ((cp >> 6) & 0x3F));
            out += char(0x80 | (cp & 0x3F));
        } else {
            out += char(0xF0 | (cp >> 18));
            out += char(0x80 | ((cp >> 12) & 0x3F));
            out += char(0x80 | ((cp >> 6) & 0x3F));
            out += char(0x80 | (cp & 0x3F));
        }
    }

    std::string string() {
        i++;  // opening quote
        std::string out;
        for (;;) {
            if (i >= s.size()) error("unterminated string");
            uint8_t c = uint8_t(s[i]);
            if (c == '"') { i++; return out; }
            if (c < 0x20) error("raw control character in string");
            if (c != '\\') { out += char(c); i++; continue; }
            if (++i >= s.size()) error("unterminated escape");
            char e = s[i++];
            switch (e) {
                case '"': out += '"'; break;
                case '\\': out += '\\'; break;
                case '/': out += '/'; break;
                case 'b': out += '\b'; break;
                case 'f': out += '\f'; break;
                case 'n': out += '\n'; break;
                case 'r': out += '\r'; break;
                case 't': out += '\t'; break;
                case 'u': {
                    uint32_t cp = hex4();
                    if (cp >= 0xDC00 && cp <= 0xDFFF) error("lone low surrogate in \\u escape");
                    if (cp >= 0xD800 && cp <= 0xDBFF) {  // UTF-16 pair: \uD83D\uDE00 → U+1F600
                        if (i + 2 > s.size() || s[i] != '\\' || s[i + 1] != 'u') error("unpaired high surrogate");
                        i += 2;
                        uint32_t lo = hex4();
                        if (lo < 0xDC00 || lo > 0xDFFF) error("unpaired high surrogate");
                        cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                    }
                    put_utf8(out, cp);
                    break;
                }
                default: i--; error(std::string("unknown escape '\\") + e + "'");
            }
        }
    }
};

}  // namespace json_detail

// Parses a complete JSON text (surrounding whitespace allowed). Errors: hl::Error "JSON: ... at byte N".
inline Json json_parse(const std::string& text) {
    json_detail::Parser p{text};
    Json v = p.value();
    p.skip_ws();
    if (p.i != text.size()) p.error("trailing characters after the value");
    return v;
}

// ============================================================================================
// safetensors
// ============================================================================================

struct TensorView {
    std::vector<int> shape;
    const float* data;  // numel floats, not owned
};

struct Checkpoint {
    std::map<std::string, std::string> metadata;
    std::map<std::string, std::pair<std::vector<int>, std::vector<float>>> tensors;  // name → (shape, data)
    std::string path;  // where it was loaded from (for error messages; empty if built in memory)
};

namespace ckpt_detail {

inline std::string shape_str(const std::vector<int>& shape) {
    std::string s = "[";
    for (size_t i = 0; i < shape.size(); i++) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + "]";
}

inline std::string where(const Checkpoint& ck) { return ck.path.empty() ? "checkpoint" : "checkpoint '" + ck.path + "'"; }

// Floats ↔ little-endian bytes, one element at a time, so the file is the same on any host.
inline void put_f32_le(uint8_t* out, float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    out[0] = uint8_t(u), out[1] = uint8_t(u >> 8), out[2] = uint8_t(u >> 16), out[3] = uint8_t(u >> 24);
}
inline float get_f32_le(const uint8_t* in) {
    uint32_t u = uint32_t(in[0]) | uint32_t(in[1]) << 8 | uint32_t(in[2]) << 16 | uint32_t(in[3]) << 24;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// The temporary file of a save: closed, and removed unless the save completed, whatever happens.
struct TmpFile {
    std::FILE* f = nullptr;
    std::string path;
    bool done = false;
    ~TmpFile() {
        if (f) std::fclose(f);
        if (!done) std::remove(path.c_str());
    }
};

}  // namespace ckpt_detail

// Writes tensors (in the given order, offsets increasing) and metadata to path, atomically:
// path.tmp is written, flushed, fsynced and renamed over path. On any error: hl::Error, no .tmp
// left behind, and an existing file at path untouched.
inline void save_safetensors(const std::string& path, const std::vector<std::pair<std::string, TensorView>>& tensors,
                             const std::map<std::string, std::string>& metadata) {
    using namespace ckpt_detail;
    // ---- validate everything before touching the disk ----
    std::set<std::string> names;
    for (const auto& kv : metadata)
        HL_CHECK(valid_utf8(kv.first) && valid_utf8(kv.second), "checkpoint: metadata ", json_quote(kv.first),
                 " is not valid UTF-8 (safetensors headers must be)");
    for (const auto& t : tensors) {
        const std::string& name = t.first;
        HL_CHECK(!name.empty(), "checkpoint: empty tensor name");
        HL_CHECK(name != "__metadata__", "checkpoint: '__metadata__' is reserved, not a tensor name");
        HL_CHECK(valid_utf8(name), "checkpoint: tensor name ", json_quote(name), " is not valid UTF-8");
        HL_CHECK(names.insert(name).second, "checkpoint: duplicate tensor name '", name, "'");
        size_t numel = 1;
        for (int d : t.second.shape) {
            HL_CHECK(d >= 0, "checkpoint: tensor '", name, "' has a negative dimension in shape ", shape_str(t.second.shape));
            numel *= size_t(d);
        }
        HL_CHECK(numel == 0 || t.second.data, "checkpoint: tensor '", name, "' has no data");
    }

    // ---- the header: metadata first, then the tensors with consecutive byte ranges ----
    Json header = Json::object();
    if (!metadata.empty()) {
        Json meta = Json::object();
        for (const auto& kv : metadata) meta.members.emplace_back(kv.first, Json::string(kv.second));
        header.members.emplace_back("__metadata__", std::move(meta));
    }
    uint64_t offset = 0;
    for (const auto& t : tensors) {
        uint64_t nbytes = 4;
        Json info = Json::object(), shape = Json::array(), offsets = Json::array();
        for (int d : t.second.shape) {
            shape.items.push_back(Json::integer(d));
            nbytes *= uint64_t(d);
        }
        offsets.items.push_back(Json::integer(int64_t(offset)));
        offsets.items.push_back(Json::integer(int64_t(offset + nbytes)));
        info.members.emplace_back("dtype", Json::string("F32"));
        info.members.emplace_back("shape", std::move(shape));
        info.members.emplace_back("data_offsets", std::move(offsets));
        header.members.emplace_back(t.first, std::move(info));
        offset += nbytes;
    }
    std::string text = json_dump(header);
    text.append((8 - text.size() % 8) % 8, ' ');  // pad: the data section starts 8-byte aligned

    // ---- write path.tmp ----
    TmpFile tmp;
    tmp.path = path + ".tmp";
    tmp.f = std::fopen(tmp.path.c_str(), "wb");
    if (!tmp.f) {
        tmp.done = true;  // nothing was created: nothing to remove (and never remove what is not ours)
        fail("checkpoint: cannot open '", tmp.path, "' for writing: ", std::strerror(errno));
    }
    auto write = [&](const void* p, size_t n) {
        if (std::fwrite(p, 1, n, tmp.f) != n) fail("checkpoint: write to '", tmp.path, "' failed: ", std::strerror(errno));
    };
    uint8_t len[8];
    for (int k = 0; k < 8; k++) len[k] = uint8_t(uint64_t(text.size()) >> (8 * k));
    write(len, 8);
    write(text.data(), text.size());
    uint8_t buf[4 * 4096];  // tensors go out in chunks, converted to little-endian on the way
    for (const auto& t : tensors) {
        size_t numel = 1;
        for (int d : t.second.shape) numel *= size_t(d);
        for (size_t i0 = 0; i0 < numel; i0 += 4096) {
            size_t n = numel - i0 < 4096 ? numel - i0 : 4096;
            for (size_t i = 0; i < n; i++) put_f32_le(buf + 4 * i, t.second.data[i0 + i]);
            write(buf, 4 * n);
        }
    }
    // flush the C buffer, then the OS cache, so the bytes are on disk before the rename publishes them
    if (std::fflush(tmp.f) != 0) fail("checkpoint: write to '", tmp.path, "' failed: ", std::strerror(errno));
    if (fsync(fileno(tmp.f)) != 0) fail("checkpoint: fsync of '", tmp.path, "' failed: ", std::strerror(errno));
    std::FILE* f = tmp.f;
    tmp.f = nullptr;
    if (std::fclose(f) != 0) fail("checkpoint: closing '", tmp.path, "' failed: ", std::strerror(errno));
    if (std::rename(tmp.path.c_str(), path.c_str()) != 0)
        fail("checkpoint: cannot rename '", tmp.path, "' to '", path, "': ", std::strerror(errno));
    tmp.done = true;
    // Best effort: fsync the directory so the rename itself survives a power loss.
    size_t slash = path.find_last_of('/');
    std::string dir = slash == std::string::npos ? "." : slash == 0 ? "/" : path.substr(0, slash);
    int dfd = open(dir.c_str(), O_RDONLY);
    if (dfd >= 0) {
        (void)fsync(dfd);
        close(dfd);
    }
}

// Reads a safetensors file of F32 tensors. Every malformation is one clear hl::Error naming the
// file: missing, shorter than 8 bytes, header length past the end, header not UTF-8 / not JSON /
// not the expected structure, dtype other than F32, data_offsets out of range or not matching the
// shape, tensors overlapping or leaving bytes of the data section uncovered.
inline Checkpoint load_safetensors(const std::string& path) {
    using namespace ckpt_detail;
    const std::string ck = "checkpoint '" + path + "'";
    struct stat st;
    if (stat(path.c_str(), &st) != 0) fail("checkpoint: cannot open '", path, "': ", std::strerror(errno));
    HL_CHECK(S_ISREG(st.st_mode), ck, " is not a regular file");
    const uint64_t file_size = uint64_t(st.st_size);
    HL_CHECK(file_size >= 8, ck, " is truncated: ", file_size, " bytes, shorter than the 8-byte header length");

    std::FILE* f = std::fopen(path.c_str(), "rb");
    if (!f) fail("checkpoint: cannot open '", path, "': ", std::strerror(errno));
    struct Closer {
        std::FILE* f;
        ~Closer() { std::fclose(f); }
    } closer{f};
    auto read = [&](void* p, size_t n, uint64_t at) {
        if (std::fseek(f, long(at), SEEK_SET) != 0 || std::fread(p, 1, n, f) != n)
            fail(ck, ": read of ", n, " bytes at offset ", at, " failed (file changed while reading?)");
    };

    uint8_t len[8];
    read(len, 8, 0);
    uint64_t hlen = 0;
    for (int k = 0; k < 8; k++) hlen |= uint64_t(len[k]) << (8 * k);
    HL_CHECK(hlen <= file_size - 8, ck, ": header length ", hlen, " runs past the end of the file (", file_size,
             " bytes): truncated, or not a safetensors file");
    std::string text(hlen, '\0');
    read(&text[0], hlen, 8);
    HL_CHECK(valid_utf8(text), ck, ": header is not valid UTF-8: corrupt, or not a safetensors file");
    Json header;
    try {
        header = json_parse(text);
    } catch (const Error& e) {
        fail(ck, ": header is not valid JSON (", e.what(), "): corrupt, or not a safetensors file");
    }
    HL_CHECK(header.kind == Json::Object, ck, ": header is not a JSON object");
    const uint64_t data_start = 8 + hlen, data_size = file_size - data_start;

    // ---- parse and check every entry ----
    struct Entry {
        std::string name;
        std::vector<int> shape;
        uint64_t begin, end;
    };
    std::vector<Entry> entries;
    Checkpoint out;
    out.path = path;
    for (const auto& m : header.members) {
        const std::string& name = m.first;
        const Json& v = m.second;
        if (name == "__metadata__") {
            HL_CHECK(v.kind == Json::Object, ck, ": __metadata__ is not an object");
            for (const auto& kv : v.members) {
                HL_CHECK(kv.second.kind == Json::String, ck, ": metadata ", json_quote(kv.first), " is not a string");
                out.metadata[kv.first] = kv.second.str;
            }
            continue;
        }
        const std::string t = ck + ": tensor '" + name + "'";
        HL_CHECK(v.kind == Json::Object, t, " is not described by an object");
        const Json *dtype = v.find("dtype"), *shape = v.find("shape"), *offs = v.find("data_offsets");
        HL_CHECK(dtype && shape && offs, t, " lacks dtype, shape or data_offsets");
        HL_CHECK(dtype->kind == Json::String, t, ": dtype is not a string");
        HL_CHECK(dtype->str == "F32", t, " has dtype ", dtype->str, "; only F32 is supported");
        HL_CHECK(shape->kind == Json::Array, t, ": shape is not an array");
        Entry e{name, {}, 0, 0};
        uint64_t numel = 1;
        bool too_big = false;
        for (const Json& d : shape->items) {
            HL_CHECK(d.kind == Json::Int && d.num >= 0 && d.num <= INT_MAX, t,
                     ": shape entries must be integers in 0..", INT_MAX);
            e.shape.push_back(int(d.num));
            if (d.num != 0 && numel > (uint64_t(1) << 60) / uint64_t(d.num)) too_big = true;
            else numel *= uint64_t(d.num);
        }
        for (int d : e.shape)
            if (d == 0) numel = 0, too_big = false;  // an empty tensor, however large its other dims
        HL_CHECK(offs->kind == Json::Array && offs->items.size() == 2 && offs->items[0].kind == Json::Int &&
                     offs->items[1].kind == Json::Int,
                 t, ": data_offsets must be [begin, end] integers");
        const int64_t b = offs->items[0].num, en = offs->items[1].num;
        HL_CHECK(b >= 0 && b <= en && uint64_t(en) <= data_size, t, ": data_offsets [", b, ", ", en,
                 "] out of range: the data section has ", data_size, " bytes (truncated file?)");
        e.begin = uint64_t(b), e.end = uint64_t(en);
        HL_CHECK(!too_big && e.end - e.begin == 4 * numel, t, ": data_offsets [", b, ", ", en, "] hold ",
                 e.end - e.begin, " bytes but F32 shape ", shape_str(e.shape), " needs ",
                 too_big ? std::string("more") : std::to_string(4 * numel));
        entries.push_back(std::move(e));
    }

    // ---- the byte ranges must tile the data section exactly: no overlap, no gap, no tail ----
    std::vector<const Entry*> order;
    for (const Entry& e : entries) order.push_back(&e);
    std::sort(order.begin(), order.end(), [](const Entry* x, const Entry* y) {
        return x->begin != y->begin ? x->begin < y->begin : x->end < y->end;
    });
    uint64_t covered = 0;
    const Entry* prev = nullptr;
    for (const Entry* e : order) {
        HL_CHECK(e->begin >= covered, ck, ": tensors '", prev ? prev->name : "", "' and '", e->name,
                 "' overlap in the data section");
        HL_CHECK(e->begin == covered, ck, ": bytes [", covered, ", ", e->begin, ") of the data section belong to no tensor");
        covered = e->end;
        prev = e;
    }
    HL_CHECK(covered == data_size, ck, ": bytes [", covered, ", ", data_size,
             ") of the data section belong to no tensor (corrupt file?)");

    // ---- read the data: raw bytes into the float vector, then decoded in place ----
    for (const Entry& e : entries) {
        std::vector<float> data((e.end - e.begin) / 4);
        if (!data.empty()) read(data.data(), e.end - e.begin, data_start + e.begin);
        uint8_t* raw = reinterpret_cast<uint8_t*>(data.data());
        for (size_t i = 0; i < data.size(); i++) data[i] = get_f32_le(raw + 4 * i);
        out.tensors[e.name] = {e.shape, std::move(data)};
    }
    return out;
}

// Views of the tensors an Arena laid out in base, named prefix + info.name, ready for saving:
//   save_safetensors(path, tensor_views(infos, params), metadata)
inline std::vector<std::pair<std::string, TensorView>> tensor_views(const std::vector<TensorInfo>& infos,
                                                                    const float* base, const std::string& prefix = "") {
    std::vector<std::pair<std::string, TensorView>> views;
    for (const TensorInfo& info : infos) views.push_back({prefix + info.name, TensorView{info.shape, base + info.offset}});
    return views;
}

// Copies the checkpoint's tensor prefix + info.name into base + info.offset for every info (an
// Arena layout). All names and shapes are checked before anything is copied, so a checkpoint of
// another config is refused with a clear message and leaves base untouched. Tensors of the
// checkpoint that no info asks for are ignored (e.g. optimizer state under another prefix).
inline void load_into(const Checkpoint& ck, const std::vector<TensorInfo>& infos, float* base,
                      const std::string& prefix = "") {
    using namespace ckpt_detail;
    for (const TensorInfo& info : infos) {
        const std::string name = prefix + info.name;
        auto it = ck.tensors.find(name);
        HL_CHECK(it != ck.tensors.end(), where(ck), ": missing tensor ", name);
        HL_CHECK(it->second.first == info.shape, where(ck), ": tensor ", name, " has shape ",
                 shape_str(it->second.first), ", model expects ", shape_str(info.shape));
        HL_CHECK(it->second.second.size() == info.numel, where(ck), ": tensor ", name, " holds ",
                 it->second.second.size(), " values, model expects ", info.numel);
    }
    for (const TensorInfo& info : infos) {
        const std::vector<float>& src = ck.tensors.at(prefix + info.name).second;
        for (size_t i = 0; i < info.numel; i++) base[info.offset + i] = src[i];
    }
}

// A metadata value; missing key → hl::Error.
inline const std::string& meta_get(const Checkpoint& ck, const std::string& key) {
    auto it = ck.metadata.find(key);
    HL_CHECK(it != ck.metadata.end(), ckpt_detail::where(ck), ": metadata has no '", key, "'");
    return it->second;
}

// A metadata value that holds a uint64 in decimal (the step, an RNG state).
inline uint64_t meta_u64(const Checkpoint& ck, const std::string& key) {
    const std::string& s = meta_get(ck, key);
    bool ok = !s.empty() && s.size() <= 20;
    uint64_t v = 0;
    for (char c : s) {
        if (c < '0' || c > '9') { ok = false; break; }
        uint64_t d = uint64_t(c - '0');
        if (v > (UINT64_MAX - d) / 10) { ok = false; break; }
        v = v * 10 + d;
    }
    HL_CHECK(ok, ckpt_detail::where(ck), ": metadata '", key, "' = ", json_quote(s), " is not a non-negative integer");
    return v;
}

// Refuses a checkpoint whose metadata disagrees with expected (e.g. the run's config as strings):
// "checkpoint 'p': saved with d_model=64, this run has d_model=128".
inline void check_metadata(const Checkpoint& ck, const std::map<std::string, std::string>& expected) {
    for (const auto& kv : expected) {
        const std::string& got = meta_get(ck, kv.first);
        HL_CHECK(got == kv.second, ckpt_detail::where(ck), ": saved with ", kv.first, "=", got, ", this run has ",
                 kv.first, "=", kv.second);
    }
}

}  // namespace hl
