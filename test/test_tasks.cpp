// test_tasks.cpp — the synthetic long-context tasks of data/tasks.h (MQAR and NIAH generators) and their
// scoring in model/trainer.h: per-position loss, masked MQAR accuracy, greedy NIAH evaluation.
#include <algorithm>          // std::count, std::min
#include <cmath>              // std::llround, std::abs
#include <cstdint>            // uint8_t
#include <map>                // std::map: key → value of a parsed MQAR example
#include <set>                // std::set: keys asked so far
#include <string>             // std::string
#include <vector>             // std::vector
#include <doctest/doctest.h>  // TEST_CASE, CHECK
#include "data/loader.h"      // load_tokens
#include "data/tasks.h"       // MqarConfig, mqar_example, mqar_batch, niah_example, niah_correct, ...
#include "model/trainer.h"    // build_config, eval_loss, eval_loss_by_position, masked_score, mqar_accuracy, niah_eval

using namespace hl;

namespace {

// The T + 1 bytes an example was cut from: the inputs, then the last target.
std::string sequence_of(const int* inputs, const int* targets, int T) {
    std::string s;
    for (int t = 0; t < T; t++) s += char(inputs[t]);
    s += char(targets[T - 1]);
    return s;
}

// Parses an MQAR sequence independently of the generator and checks everything about it: the pairs (distinct
// keys, key_len letters, value_len digits), the '.' gap, the queries (each key's value as stated, each key
// once per round), and that the mask marks exactly the targets that are answer digits.
void check_mqar(const MqarConfig& c, const MqarExample& e, int T) {
    REQUIRE(e.inputs.size() == size_t(T));
    REQUIRE(e.targets.size() == size_t(T));
    REQUIRE(e.mask.size() == size_t(T));
    for (int t = 0; t + 1 < T; t++) REQUIRE(e.targets[size_t(t)] == e.inputs[size_t(t) + 1]);
    const std::string s = sequence_of(e.inputs.data(), e.targets.data(), T);
    const size_t item = size_t(c.key_len + c.value_len + 2);
    auto is_key = [&](const std::string& k) {
        if (k.size() != size_t(c.key_len)) return false;
        for (char ch : k)
            if (ch < 'a' || ch > 'z') return false;
        return true;
    };
    auto is_value = [&](const std::string& v) {
        if (v.size() != size_t(c.value_len)) return false;
        for (char ch : v)
            if (ch < '0' || ch > '9') return false;
        return true;
    };
    std::map<std::string, std::string> value_of;
    size_t at = 0;
    for (int i = 0; i < c.n_pairs; i++, at += item) {
        const std::string key = s.substr(at, size_t(c.key_len)), value = s.substr(at + c.key_len + 1, size_t(c.value_len));
        CHECK(is_key(key));
        CHECK(s[at + c.key_len] == ':');
        CHECK(is_value(value));
        CHECK(s[at + item - 1] == ' ');
        CHECK(value_of.count(key) == 0);  // distinct keys
        value_of[key] = value;
    }
    const size_t newline = s.find('\n');
    REQUIRE(newline != std::string::npos);
    for (size_t i = at; i < newline; i++) CHECK(s[i] == '.');
    const size_t gap = newline - at;
    REQUIRE((s.size() - newline - 1) % item == 0);
    const int n_q = int((s.size() - newline - 1) / item);
    if (c.n_queries > 0) CHECK(n_q == c.n_queries);
    else CHECK(gap < item);  // as many queries as fit
    std::vector<uint8_t> expect_mask(size_t(T), 0);
    std::set<std::string> asked;
    for (int q = 0; q < n_q; q++) {
        const size_t qa = newline + 1 + size_t(q) * item;
        const std::string key = s.substr(qa, size_t(c.key_len)), value = s.substr(qa + c.key_len + 1, size_t(c.value_len));
        CHECK(s[qa + c.key_len] == '?');
        CHECK(s[qa + item - 1] == ' ');
        REQUIRE(value_of.count(key) == 1);
        CHECK(value == value_of[key]);  // the answer is the value given earlier in the same sequence
        if (asked.size() == value_of.size()) asked.clear();
        CHECK(asked.insert(key).second);  // no key twice before every key once
        for (int d = 0; d < c.value_len; d++) expect_mask[qa + c.key_len + 1 + size_t(d) - 1] = 1;
    }
    CHECK(e.mask == expect_mask);
    CHECK(std::count(e.mask.begin(), e.mask.end(), 1) == n_q * c.value_len);
}

// A haystack of lines of known lengths "line 0007 ...\n", so the line starts are easy to recompute.
std::vector<int> lined_text(int n_lines) {
    std::string s;
    for (int i = 0; i < n_lines; i++) {
        std::string line = "line " + std::to_string(i) + " " + std::string(size_t(5 + (i * 7) % 30), 'x');
        s += line + "\n";
    }
    return ByteTokenizer().encode(s);
}

// Takes a NIAH prompt apart: checks the needle and question text, and returns the haystack alone.
std::string check_niah(const NiahExample& e, int context_len) {
    ByteTokenizer tok;
    REQUIRE(e.prompt.size() == size_t(context_len));
    const std::string prompt = tok.decode(e.prompt);
    const std::string needle = niah_needle(e.city, e.answer) + "\n", question = niah_question(e.city);
    CHECK(prompt.compare(prompt.size() - question.size(), question.size(), question) == 0);  // ends with the question
    CHECK(prompt.compare(size_t(e.needle_pos), needle.size(), needle) == 0);
    CHECK(e.answer.size() == 7);
    for (char ch : e.answer) CHECK((ch >= '0' && ch <= '9'));
    CHECK(e.answer[0] != '0');
    CHECK(std::find(niah_cities().begin(), niah_cities().end(), e.city) != niah_cities().end());
    CHECK(prompt.find("The special magic") == size_t(e.needle_pos));  // one needle, and no other before it
    const std::string haystack = prompt.substr(0, size_t(e.needle_pos)) +
        prompt.substr(size_t(e.needle_pos) + needle.size(), prompt.size() - question.size() - e.needle_pos - needle.size());
    CHECK(haystack.size() == size_t(e.haystack_len));
    CHECK(e.depth == doctest::Approx(double(e.needle_pos) / e.haystack_len));
    return haystack;
}

// The model used by the trainer tests: the tiny intra-layer hybrid.
ModelConfig tiny(int seq_len) {
    ModelFlags f;
    f.preset = "tiny";
    f.arch = "intra";
    f.seq_len = seq_len;
    return build_config(f);
}

}  // namespace

// =============================================================================================
// MQAR
// =============================================================================================

TEST_CASE("mqar task: deterministic per seed, different across seeds, exactly T long") {
    MqarConfig c;
    for (int T : {256, 1024, 8192}) {
        CAPTURE(T);
        Rng a(7), b(7), other(8);
        MqarExample x = mqar_example(c, T, a), y = mqar_example(c, T, b), z = mqar_example(c, T, other);
        CHECK(x.inputs.size() == size_t(T));
        CHECK(x.inputs == y.inputs);
        CHECK(x.targets == y.targets);
        CHECK(x.mask == y.mask);
        CHECK(x.inputs != z.inputs);
        // the next example of the same stream is a new one
        CHECK(mqar_example(c, T, a).inputs != x.inputs);
    }
    // a batch is its rows drawn in turn from the same stream
    const int B = 3, T = 128;
    std::vector<int> in(B * T), tg(B * T);
    std::vector<uint8_t> mask(B * T);
    Rng r1(11), r2(11);
    mqar_batch(in.data(), tg.data(), mask.data(), c, B, T, r1);
    for (int b = 0; b < B; b++) {
        MqarExample e = mqar_example(c, T, r2);
        CHECK(std::vector<int>(in.begin() + b * T, in.begin() + (b + 1) * T) == e.inputs);
        CHECK(std::vector<int>(tg.begin() + b * T, tg.begin() + (b + 1) * T) == e.targets);
        CHECK(std::vector<uint8_t>(mask.begin() + b * T, mask.begin() + (b + 1) * T) == e.mask);
    }
}

TEST_CASE("mqar task: answers are the values given earlier in the sequence; the mask marks exactly them") {
    struct Case { MqarConfig c; int T; };
    const Case cases[] = {
        {{16, 0, 2, 2}, 256},    // default: queries fill the sequence, keys asked in several rounds
        {{64, 0, 2, 2}, 1024},
        {{8, 3, 2, 2}, 300},     // 3 queries, a long gap
        {{5, 0, 1, 1}, 37},      // short keys and values, a gap of 1 (37 = 5·4 + 4·4 + 1)
        {{40, 10, 3, 4}, 8192},  // long: the queries far from the pairs
        {{26, 0, 1, 3}, 2000},   // every one-letter key
    };
    for (const Case& k : cases) {
        CAPTURE(k.T);
        CAPTURE(k.c.n_pairs);
        Rng rng(5);
        for (int i = 0; i < 3; i++) check_mqar(k.c, mqar_example(k.c, k.T, rng), k.T);
    }
    // exactly the room for the pairs and one query: no gap
    MqarConfig c{4, 1, 2, 2};
    Rng rng(1);
    MqarExample e = mqar_example(c, 30, rng);
    check_mqar(c, e, 30);
    CHECK(sequence_of(e.inputs.data(), e.targets.data(), 30).find(".") == std::string::npos);
}

TEST_CASE("mqar task: a sequence too short or an impossible config is a clear error") {
    Rng rng(1);
    MqarConfig c{4, 1, 2, 2};
    CHECK_THROWS_WITH_AS(mqar_example(c, 29, rng), "mqar: seq-len 29 is too short for 4 pairs and 1 queries of 6 bytes each: it must be at least 30", Error);
    c = MqarConfig{27, 0, 1, 1};
    CHECK_THROWS_AS(mqar_example(c, 4096, rng), Error);  // only 26 one-letter keys
    c = MqarConfig{0, 0, 2, 2};
    CHECK_THROWS_AS(mqar_example(c, 256, rng), Error);
}

TEST_CASE("mqar accuracy: an oracle's logits score 1; only masked positions count") {
    const int N = 6, V = 5;
    const int targets[N] = {1, 4, 0, 2, 3, 3};
    const uint8_t mask[N] = {0, 1, 1, 0, 1, 0};
    std::vector<float> logits(N * V, 0.0f);
    for (int i = 0; i < N; i++) logits[size_t(i) * V + size_t(targets[i])] = 30.0f;  // the oracle: sure of every target
    MaskedScore s = masked_score(logits.data(), targets, mask, N, V);
    CHECK(s.count == 3);
    CHECK(s.accuracy == 1.0);
    CHECK(s.loss == doctest::Approx(0.0).epsilon(1e-9));  // log(1 + 4e^-30)
    // wrong at an unmasked position: still 1
    logits[0 * V + 1] = 0, logits[0 * V + 2] = 30;
    CHECK(masked_score(logits.data(), targets, mask, N, V).accuracy == 1.0);
    // wrong at one masked position (position 4 says 0); uniform row at position 2 (a tie → id 0 == target 0)
    logits[4 * V + 3] = 0, logits[4 * V + 0] = 30;
    for (int v = 0; v < V; v++) logits[2 * V + size_t(v)] = 1.0f;
    s = masked_score(logits.data(), targets, mask, N, V);
    CHECK(s.accuracy == doctest::Approx(2.0 / 3.0));
    CHECK(s.loss == doctest::Approx((std::log(1 + 4 * std::exp(-30.0)) + std::log(5.0) + 30.0) / 3).epsilon(1e-6));
    const uint8_t none[N] = {};
    CHECK_THROWS_AS(masked_score(logits.data(), targets, none, N, V), Error);
}

TEST_CASE("mqar accuracy of a model: its masked loss is the model's own cross-entropy at the masked positions") {
    const int B = 2, T = 64;
    Model<float> model(tiny(T));
    model.init(3);
    MqarConfig c{4, 0, 2, 2};
    std::vector<int> in(B * T), tg(B * T);
    std::vector<uint8_t> mask(B * T);
    Rng rng(9);
    mqar_batch(in.data(), tg.data(), mask.data(), c, B, T, rng);
    MaskedScore s = mqar_accuracy(model, in.data(), tg.data(), mask.data(), B, T);
    double loss = 0;
    int count = 0, right = 0;
    for (int i = 0; i < B * T; i++) {
        if (!mask[size_t(i)]) continue;
        loss += model.losses[i];
        const float* row = model.logits + size_t(i) * 256;
        right += int(std::max_element(row, row + 256) - row) == tg[size_t(i)];
        count++;
    }
    CHECK(s.count == count);
    CHECK(count == B * mqar_num_queries(c, T) * c.value_len);
    CHECK(s.loss == doctest::Approx(loss / count).epsilon(1e-5));
    CHECK(s.accuracy == doctest::Approx(double(right) / count));
    CHECK(s.loss > 4.0);  // an untrained model is near log(256) ≈ 5.5, not the oracle
}

// =============================================================================================
// NIAH
// =============================================================================================

TEST_CASE("niah task: the needle lands at the nearest line start to the depth, the prompt ends with the question") {
    const std::vector<int> text = lined_text(3000);
    for (int context_len : {256, 1024, 4096}) {
        for (double depth : {0.0, 0.1, 0.25, 0.5, 0.77, 0.9, 1.0}) {
            CAPTURE(context_len);
            CAPTURE(depth);
            Rng rng(uint64_t(context_len) + uint64_t(depth * 100));
            NiahExample e = niah_example(text, context_len, depth, rng);
            const std::string hay = check_niah(e, context_len);
            const int H = e.haystack_len;
            // the line starts of the haystack, recomputed; the needle is at the one nearest to depth · H
            const long long p = std::llround(depth * H);
            long long nearest = -1;
            for (long long q = 0; q <= H; q++)
                if ((q == 0 || hay[size_t(q) - 1] == '\n') && (nearest < 0 || std::abs(q - p) < std::abs(nearest - p)))
                    nearest = q;
            CHECK(e.needle_pos == nearest);
            CHECK(std::abs(e.depth - depth) * H <= 45.5);  // within one line (lines here are ≤ 45 bytes)
            CHECK(hay[0] == 'l');                        // the window starts at a line start
            if (depth == 0.0) CHECK(e.needle_pos == 0);
        }
    }
}

TEST_CASE("niah task: deterministic per seed, differs across seeds; tinyshakespeare haystack; text without lines") {
    const std::vector<int> shakespeare = load_tokens("data/tinyshakespeare.txt");
    Rng a(3), b(3), c(4);
    NiahExample x = niah_example(shakespeare, 2048, 0.5, a), y = niah_example(shakespeare, 2048, 0.5, b),
                z = niah_example(shakespeare, 2048, 0.5, c);
    CHECK(x.prompt == y.prompt);
    CHECK(x.answer == y.answer);
    CHECK(x.prompt != z.prompt);
    CHECK(x.answer != z.answer);
    check_niah(x, 2048);
    CHECK(std::abs(x.depth - 0.5) * x.haystack_len <= 80);  // a Shakespeare line is short
    const std::string hay = ByteTokenizer().decode(x.prompt);
    CHECK(hay[size_t(x.needle_pos) - 1] == '\n');  // its own line

    // no '\n' anywhere: not snapped, exactly round(depth · H)
    const std::vector<int> flat(5000, int('z'));
    Rng r(1);
    NiahExample f = niah_example(flat, 1000, 0.3, r);
    check_niah(f, 1000);
    CHECK(f.needle_pos == std::llround(0.3 * f.haystack_len));

    // errors: no room for a haystack, too little text, a bad depth
    CHECK_THROWS_AS(niah_example(shakespeare, 100, 0.5, r), Error);
    CHECK_THROWS_AS(niah_example(std::vector<int>(50, 'a'), 1000, 0.5, r), Error);
    CHECK_THROWS_AS(niah_example(shakespeare, 1000, 1.5, r), Error);
    CHECK_THROWS_AS(niah_example(std::vector<int>(2000, 300), 1000, 0.5, r), Error);  // not bytes
}

TEST_CASE("niah_correct: the answer must appear as a whole number in the generated text") {
    CHECK(niah_correct("1234567", "1234567"));
    CHECK(niah_correct("1234567.\nThe", "1234567"));
    CHECK(niah_correct(" is 1234567", "1234567"));
    CHECK(niah_correct("91234567 or 1234567!", "1234567"));  // the second one counts
    CHECK_FALSE(niah_correct("12345678", "1234567"));
    CHECK_FALSE(niah_correct("91234567", "1234567"));
    CHECK_FALSE(niah_correct("123456", "1234567"));
    CHECK_FALSE(niah_correct("1234 567", "1234567"));
    CHECK_FALSE(niah_correct("", "1234567"));
}

TEST_CASE("niah_eval: greedy decoding of a model that always says '7' is right only for 7777777") {
    // All block weights zero: every block adds nothing, the final state is the token's embedding. Every row
    // of the tied embedding is the same vector u, except '7''s which is 2u: whatever the context, the logit of
    // '7' is twice any other, so greedy decoding writes 7777777...
    ModelConfig c = tiny(16);
    Model<float> model(c);
    REQUIRE(c.tied);
    std::fill(model.params.begin(), model.params.end(), 0.0f);
    for (int i = 0; i < c.d_model; i++) model.p.norm_f[i] = 1.0f;
    for (int v = 0; v < c.vocab_size; v++)
        for (int i = 0; i < c.d_model; i++) model.p.embed[size_t(v) * c.d_model + i] = (v == '7' ? 2.0f : 1.0f) * float(1 + i % 3);

    // a prompt longer than the tiny preset's max_seq_len (128): the cached decoder has no such limit
    Rng rng(2);
    NiahExample e = niah_example(lined_text(50), 200, 0.5, rng);
    std::string out;
    CHECK(niah_eval(model, e.prompt, "7777777", 7, &out));
    CHECK(out == "7777777");
    CHECK_FALSE(niah_eval(model, e.prompt, e.answer, 7));
    CHECK_FALSE(niah_eval(model, e.prompt, "7777777", 10, &out));  // ten sevens are another number
    CHECK(out == "7777777777");
    // an untrained model does not find the needle, and says the same thing every time (greedy)
    Model<float> random(c);
    random.init(1);
    std::string first, second;
    CHECK_FALSE(niah_eval(random, e.prompt, e.answer, 8, &first));
    niah_eval(random, e.prompt, e.answer, 8, &second);
    CHECK(first == second);
    CHECK(first.size() == 8);
}

// =============================================================================================
// Per-position loss
// =============================================================================================

TEST_CASE("eval_loss_by_position: averages to eval_loss's mean over the same windows; each position its own mean") {
    const int T = 12, B = 2;
    std::vector<int> val = lined_text(10);
    val.resize(5 * T + 1);  // exactly 5 windows: the last batch is a padded partial one
    Model<float> model(tiny(T)), single(tiny(T));
    model.init(4);
    single.params = model.params;
    std::vector<int> in(B * T), tg(B * T);
    std::vector<double> per_pos;
    for (int n_batches : {1, 10}) {
        CAPTURE(n_batches);
        const float mean = eval_loss_by_position(model, in.data(), tg.data(), val, B, T, n_batches, per_pos);
        REQUIRE(per_pos.size() == size_t(T));
        double avg = 0;
        for (double l : per_pos) avg += l / T;
        const float ref = eval_loss(model, in.data(), tg.data(), val, B, T, n_batches);
        CHECK(avg == doctest::Approx(ref).epsilon(1e-6));
        CHECK(mean == doctest::Approx(ref).epsilon(1e-6));
        // position t: the mean over the windows of each window's own loss at t
        const int windows = n_batches == 1 ? B : 5;
        std::vector<double> expect(size_t(T), 0.0);
        for (int w = 0; w < windows; w++) {
            single.forward(val.data() + w * T, val.data() + w * T + 1, 1, T);
            for (int t = 0; t < T; t++) expect[size_t(t)] += single.losses[t] / windows;
        }
        for (int t = 0; t < T; t++) CHECK(per_pos[size_t(t)] == doctest::Approx(expect[size_t(t)]).epsilon(1e-5));
        CHECK(per_pos[0] != doctest::Approx(per_pos[T - 1]));  // the positions do differ
    }
    CHECK_THROWS_AS(eval_loss_by_position(model, in.data(), tg.data(), val, B, T, 0, per_pos), Error);
}
