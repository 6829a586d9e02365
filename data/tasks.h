// tasks.h — synthetic long-context tasks over the byte vocabulary (vocab 256), deterministic from an Rng:
//   MQAR  multi-query associative recall: key→value pairs, then queries of those keys, each followed by
//         its value; scored at the value bytes of the queries (a mask beside next-token inputs/targets).
//   NIAH  needle in a haystack: "The special magic {city} number is: {7 digits}." hidden in a window of
//         text at a given depth, then a question asking for the number; scored on the generated text.
// The model-side scoring (masked accuracy, greedy NIAH generation) lives in model/trainer.h.
#pragma once
#include <algorithm>         // std::max, std::swap
#include <cmath>             // std::llround
#include <cstdint>           // uint8_t, uint64_t
#include <set>               // std::set: distinct keys
#include <string>            // std::string
#include <vector>            // std::vector
#include "data/tokenizer.h"  // ByteTokenizer: the text of needles and questions as tokens
#include "model/common.h"    // HL_CHECK, Rng

namespace hl {

// ---------------------------------------------------------------------------------------------
// MQAR: multi-query associative recall
// ---------------------------------------------------------------------------------------------
// One example is T + 1 bytes s, cut like a training window: inputs = s[0..T), targets = s[1..T]:
//
//   kx:37 ab:05 qq:37 ... ........\nab?05 qq?37 kx?37 ab?05 ...
//   └── n_pairs pairs "key:value " ┘└gap┘  └── queries "key?value " ─┘
//
// Keys are key_len letters 'a'..'z', distinct within an example; values are value_len digits '0'..'9'
// (they may repeat); the two alphabets and the separators ':' '?' ' ' '.' '\n' are disjoint, so a byte
// model can tell every part of the structure from a single byte. A query repeats a key with '?' in place
// of ':'; the value after it is the answer, and only its digits are scored. Query keys go through the
// example's keys in random orders (each key once before any key twice). The gap of '.' fills the
// sequence to exactly T + 1 bytes: with n_queries = 0 as many queries as fit are asked and the gap is
// shorter than one query; with n_queries set, the gap takes all the remaining room (a longer gap puts
// the queries further from the pairs).
struct MqarConfig {
    int n_pairs = 16;    // key→value pairs stated first
    int n_queries = 0;   // queries after them (0 = as many as fill the sequence)
    int key_len = 2;     // letters per key: 26^key_len distinct keys
    int value_len = 2;   // digits per value
};

// Bytes of one "key:value " (or "key?value ") item.
inline int mqar_item_len(const MqarConfig& c) { return c.key_len + c.value_len + 2; }

// The number of queries an example of length T asks.
inline int mqar_num_queries(const MqarConfig& c, int T) {
    HL_CHECK(c.n_pairs > 0, "mqar: n_pairs must be positive, got ", c.n_pairs);
    HL_CHECK(c.n_queries >= 0, "mqar: n_queries must be non-negative (0 = as many as fit), got ", c.n_queries);
    HL_CHECK(c.key_len >= 1 && c.key_len <= 4, "mqar: key_len must be in 1..4, got ", c.key_len);
    HL_CHECK(c.value_len >= 1, "mqar: value_len must be positive, got ", c.value_len);
    long long n_keys = 1;
    for (int i = 0; i < c.key_len; i++) n_keys *= 26;
    HL_CHECK(c.n_pairs <= n_keys, "mqar: ", c.n_pairs, " distinct keys do not exist with key_len ", c.key_len,
             " (at most ", n_keys, ")");
    HL_CHECK(T > 0, "mqar: seq-len must be positive, got ", T);
    const long long item = mqar_item_len(c);
    const long long room = (long long)T - item * c.n_pairs;  // of the T + 1 bytes, what the pairs and '\n' leave
    const long long n_q = c.n_queries > 0 ? c.n_queries : (room > 0 ? room / item : 0);
    const long long need = item * (c.n_pairs + std::max(c.n_queries, 1));  // T + 1 ≥ pairs, '\n', queries
    HL_CHECK(n_q >= 1 && n_q * item <= room, "mqar: seq-len ", T, " is too short for ", c.n_pairs, " pairs and ",
             std::max(c.n_queries, 1), " queries of ", item, " bytes each: it must be at least ", need);
    return int(n_q);
}

struct MqarExample {
    std::vector<int> inputs, targets;  // (T) as next-token training: targets[t] = inputs[t + 1]
    std::vector<uint8_t> mask;         // (T) 1 where targets[t] is a digit of a query's answer
};

// One example into inputs/targets/mask (T each).
inline void mqar_fill(int* inputs, int* targets, uint8_t* mask, const MqarConfig& c, int T, Rng& rng) {
    const int n_q = mqar_num_queries(c, T);
    const int item = mqar_item_len(c);
    long long n_keys = 1;
    for (int i = 0; i < c.key_len; i++) n_keys *= 26;

    // distinct keys by rejection: cheap even at n_pairs = n_keys (a coupon collector over ≤ 26^4)
    std::vector<std::string> keys, values;
    std::set<long long> seen;
    while ((int)keys.size() < c.n_pairs) {
        long long k = (long long)(rng.next() % uint64_t(n_keys));
        if (!seen.insert(k).second) continue;
        std::string key((size_t)c.key_len, 'a');
        for (int i = c.key_len - 1; i >= 0; i--, k /= 26) key[(size_t)i] = char('a' + k % 26);
        keys.push_back(key);
    }
    for (int i = 0; i < c.n_pairs; i++) {
        std::string value((size_t)c.value_len, '0');
        for (char& d : value) d = char('0' + rng.next() % 10);
        values.push_back(value);
    }

    std::string s;               // the T + 1 bytes
    std::vector<uint8_t> scored;  // scored[i]: s[i] is a digit of a query's answer
    s.reserve(size_t(T) + 1);
    scored.reserve(size_t(T) + 1);
    auto put = [&](const std::string& part, bool answer) {
        s += part;
        scored.resize(s.size(), uint8_t(answer));
    };
    for (int i = 0; i < c.n_pairs; i++) {
        put(keys[size_t(i)] + ":", false);
        put(values[size_t(i)], false);
        put(" ", false);
    }
    const long long gap = (long long)T + 1 - (long long)s.size() - 1 - (long long)n_q * item;
    put(std::string(size_t(gap), '.') + "\n", false);
    // queries: the keys in a fresh random order each round (Fisher–Yates)
    std::vector<size_t> order(keys.size());
    size_t next_in_round = order.size();
    for (int q = 0; q < n_q; q++) {
        if (next_in_round == order.size()) {
            for (size_t i = 0; i < order.size(); i++) order[i] = i;
            for (size_t i = order.size() - 1; i > 0; i--) std::swap(order[i], order[size_t(rng.next() % (i + 1))]);
            next_in_round = 0;
        }
        const size_t pair = order[next_in_round++];
        put(keys[pair] + "?", false);
        put(values[pair], true);
        put(" ", false);
    }
    HL_CHECK(s.size() == size_t(T) + 1, "mqar: internal error, built ", s.size(), " bytes for seq-len ", T);
    for (int t = 0; t < T; t++) {
        inputs[t] = int((unsigned char)s[size_t(t)]);
        targets[t] = int((unsigned char)s[size_t(t) + 1]);
        mask[t] = scored[size_t(t) + 1];
    }
}

inline MqarExample mqar_example(const MqarConfig& c, int T, Rng& rng) {
    mqar_num_queries(c, T);  // the config and T checked before anything is sized by T
    MqarExample e;
    e.inputs.resize(size_t(T));
    e.targets.resize(size_t(T));
    e.mask.resize(size_t(T));
    mqar_fill(e.inputs.data(), e.targets.data(), e.mask.data(), c, T, rng);
    return e;
}

// B independent examples, row b of inputs (B, T), targets (B, T), mask (B, T); successive calls on the
// same rng draw fresh batches (a training stream), the same seed gives the same batches.
inline void mqar_batch(int* inputs, int* targets, uint8_t* mask, const MqarConfig& c, int B, int T, Rng& rng) {
    HL_CHECK(B > 0, "mqar: batch size must be positive, got ", B);
    for (int b = 0; b < B; b++) {
        const size_t off = (size_t)b * T;
        mqar_fill(inputs + off, targets + off, mask + off, c, T, rng);
    }
}

// ---------------------------------------------------------------------------------------------
// NIAH: needle in a haystack
// ---------------------------------------------------------------------------------------------
// prompt = haystack with the needle line inserted, then the question, exactly context_len bytes:
//
//   ...text of the haystack...\n
//   The special magic {city} number is: {7 digits}.\n          ← the needle line, at depth ≈ d
//   ...more text...
//   \nWhat is the special magic {city} number? The special magic {city} number is:␣
//
// The haystack is a window of `text` (byte tokens, e.g. tinyshakespeare) at a random place, started at a
// line start. The needle is placed at a LINE START: of all line starts of the window (its first byte, and
// every byte after a '\n'), the one nearest to d · H, H being the haystack's length; so it lands within
// one line of the requested depth (d = 0: before the first line; d = 1: at the start of the last line,
// or after it when the window ends with '\n'). Text without a '\n' within NIAH_MAX_SNAP bytes is not
// snapped: the needle goes in at round(d · H) exactly. The answer is the 7 digits (first one nonzero).

constexpr int NIAH_MAX_SNAP = 256;  // farthest a needle or the window start moves to reach a line start

inline const std::vector<std::string>& niah_cities() {
    static const std::vector<std::string> cities = {
        "Paris",  "Tokyo", "Lima",  "Cairo",  "Oslo",   "Nairobi", "Lisbon", "Seoul",
        "Dublin", "Quito", "Hanoi", "Prague", "Munich", "Sydney",  "Havana", "Toronto"};
    return cities;
}

inline std::string niah_needle(const std::string& city, const std::string& number) {
    return "The special magic " + city + " number is: " + number + ".";
}

inline std::string niah_question(const std::string& city) {
    return "\nWhat is the special magic " + city + " number? The special magic " + city + " number is: ";
}

struct NiahExample {
    std::vector<int> prompt;  // (context_len) byte tokens: haystack with the needle line, then the question
    std::string answer;       // the 7 digits
    std::string city;
    int haystack_len = 0;     // H: bytes of the text window (the needle line and question excluded)
    int needle_pos = 0;       // where the needle starts: haystack bytes before it (also its index in prompt)
    double depth = 0;         // needle_pos / H: the depth it landed at
};

// One NIAH prompt of exactly context_len byte tokens from `text`, the needle at depth (in [0, 1]).
inline NiahExample niah_example(const std::vector<int>& text, int context_len, double depth, Rng& rng) {
    HL_CHECK(depth >= 0 && depth <= 1, "niah: depth must be in [0, 1], got ", depth);
    const std::vector<std::string>& cities = niah_cities();
    NiahExample e;
    e.city = cities[size_t(rng.next() % cities.size())];
    e.answer = std::to_string(1000000 + rng.next() % 9000000);
    const std::string needle = niah_needle(e.city, e.answer) + "\n", question = niah_question(e.city);
    const long long H = (long long)context_len - (long long)needle.size() - (long long)question.size();
    HL_CHECK(H >= 1, "niah: context_len ", context_len, " leaves no room for a haystack: the needle line and the ",
             "question alone take ", needle.size() + question.size(), " bytes");
    HL_CHECK((long long)text.size() >= H, "niah: the haystack text has ", text.size(), " tokens, fewer than the ", H,
             " that context_len ", context_len, " needs");
    e.haystack_len = int(H);

    // the window: a random start moved forward to just after a '\n' (when one is near enough to keep the
    // window inside the text)
    const long long max_start = (long long)text.size() - H;
    long long start = (long long)(rng.next() % uint64_t(max_start + 1));
    for (long long j = start; j < start + NIAH_MAX_SNAP && j < max_start; j++)
        if (start > 0 && text[size_t(j)] == '\n') {
            start = j + 1;
            break;
        }
    const int* w = text.data() + start;
    for (long long i = 0; i < H; i++)
        HL_CHECK(w[i] >= 0 && w[i] < ByteTokenizer::vocab_size, "niah: haystack token ", w[i], " at position ",
                 start + i, " is not a byte (NIAH needs byte-tokenized text)");

    // the needle: the line start nearest to depth · H (ties: the earlier one), else unsnapped
    const long long p = std::llround(depth * double(H));
    auto line_start = [&](long long q) { return q == 0 || w[q - 1] == '\n'; };
    long long pos = p;
    for (long long d = 0; d <= NIAH_MAX_SNAP; d++) {
        if (p - d >= 0 && line_start(p - d)) { pos = p - d; break; }
        if (p + d <= H && line_start(p + d)) { pos = p + d; break; }
    }
    e.needle_pos = int(pos);
    e.depth = double(pos) / double(H);

    ByteTokenizer tok;
    e.prompt.reserve(size_t(context_len));
    e.prompt.insert(e.prompt.end(), w, w + pos);
    for (int t : tok.encode(needle)) e.prompt.push_back(t);
    e.prompt.insert(e.prompt.end(), w + pos, w + H);
    for (int t : tok.encode(question)) e.prompt.push_back(t);
    HL_CHECK(e.prompt.size() == size_t(context_len), "niah: internal error, built ", e.prompt.size(),
             " tokens for context_len ", context_len);
    return e;
}

// Correct when the answer appears in the generated text as a whole number: not as part of a longer run of
// digits ("1234567" is found in "is 1234567." but not in "91234567").
inline bool niah_correct(const std::string& generated, const std::string& answer) {
    HL_CHECK(!answer.empty(), "niah: empty answer");
    auto digit = [](char ch) { return ch >= '0' && ch <= '9'; };
    for (size_t at = generated.find(answer); at != std::string::npos; at = generated.find(answer, at + 1)) {
        const size_t end = at + answer.size();
        if ((at == 0 || !digit(generated[at - 1])) && (end == generated.size() || !digit(generated[end]))) return true;
    }
    return false;
}

}  // namespace hl
