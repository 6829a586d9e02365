// test_trainer.cpp — the training pieces of model/trainer.h (schedule, flags → config, steps, run
// checkpoints and exact resume, sampling) and the train_cpu program end to end: a run, a sample,
// a resumed run equal to an uninterrupted one, and every kind of bad input refused with one
// `error:` line, a non-zero exit and no file touched.
#include <sys/wait.h>         // WIFEXITED, WEXITSTATUS: the exit status of system()
#include <unistd.h>           // readlink: where this test binary (and so train_cpu) lives
#include <algorithm>          // std::min, std::copy
#include <cmath>              // std::exp, std::log, std::cos
#include <cstdio>             // std::FILE, std::fopen, std::fread, std::fwrite
#include <cstdlib>            // mkdtemp, std::getenv, std::system
#include <cstring>            // std::memcmp
#include <filesystem>         // std::filesystem: exists, remove_all, directory_iterator
#include <map>                // std::map: metadata
#include <sstream>            // std::istringstream: log lines
#include <string>             // std::string
#include <vector>             // std::vector
#include <doctest/doctest.h>  // TEST_CASE, CHECK
#include "test/files.h"       // TempDir, read_bytes, write_bytes
#include "model/trainer.h"    // lr_at, build_config, train_step, eval_loss, save_run, load_run, generate, ...

using namespace hl;
using hl::test::TempDir;
using hl::test::read_bytes;
using hl::test::write_bytes;
namespace fs = std::filesystem;

namespace {

// The message of the hl::Error that f throws ("(no error)" if none).
template <typename F>
std::string error_of(F&& f) {
    try {
        f();
    } catch (const Error& e) {
        return e.what();
    }
    return "(no error)";
}
bool has(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

// Text with some structure to learn: random words from a small list, lines and speakers.
std::string synthetic_text(size_t n_bytes, uint64_t seed) {
    static const char* words[] = {"the", "king", "shall", "not", "be", "so", "my", "lord", "and", "thou",
                                  "art", "a", "fool", "good", "night", "sweet", "prince", "of", "love"};
    Rng rng(seed);
    std::string s;
    while (s.size() < n_bytes) {
        s += (rng.next() % 2) ? "ROMEO:\n" : "JULIET:\n";
        const int n = 3 + int(rng.next() % 8);
        for (int i = 0; i < n; i++) s += std::string(words[rng.next() % 19]) + (i + 1 < n ? " " : ".\n\n");
    }
    s.resize(n_bytes);
    return s;
}

// The tiny intra-layer hybrid used by most tests (3 layers, one H block, chunk 4).
ModelFlags tiny_flags(int seq_len = 16) {
    ModelFlags f;
    f.preset = "tiny";
    f.arch = "intra";
    f.seq_len = seq_len;
    return f;
}

TrainFlags short_run(int steps) {
    TrainFlags t;
    t.batch = 2;
    t.steps = steps;
    t.warmup = 2;
    t.lr = 3e-3f;
    return t;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

}  // namespace

// =============================================================================================
// Schedule, flags and config
// =============================================================================================

TEST_CASE("lr_at: linear warmup, then cosine from lr down to min_lr_frac·lr") {
    const float lr = 1e-3f, frac = 0.1f;
    const int total = 100, warmup = 10;
    CHECK(lr_at(0, total, warmup, lr, frac) == doctest::Approx(1e-4));  // (0+1)/10 of lr: the first step moves
    CHECK(lr_at(4, total, warmup, lr, frac) == doctest::Approx(5e-4));
    CHECK(lr_at(9, total, warmup, lr, frac) == doctest::Approx(1e-3));
    CHECK(lr_at(10, total, warmup, lr, frac) == doctest::Approx(1e-3));  // cosine starts at the peak
    CHECK(lr_at(55, total, warmup, lr, frac) == doctest::Approx(1e-4 + 0.5 * 9e-4));  // halfway: the midpoint
    const double pi = 3.14159265358979323846, p = 89.0 / 90.0;  // the last step: one short of the cosine's end
    CHECK(lr_at(99, total, warmup, lr, frac) == doctest::Approx(1e-4 + 9e-4 * 0.5 * (1 + std::cos(pi * p))));
    CHECK(lr_at(100, total, warmup, lr, frac) == doctest::Approx(1e-4));  // past the end: the floor
    CHECK(lr_at(500, total, warmup, lr, frac) == doctest::Approx(1e-4));
    for (int s = warmup; s + 1 < total; s++) CHECK(lr_at(s + 1, total, warmup, lr, frac) < lr_at(s, total, warmup, lr, frac));
    for (int s = 0; s + 1 < warmup; s++) CHECK(lr_at(s + 1, total, warmup, lr, frac) > lr_at(s, total, warmup, lr, frac));
    CHECK(lr_at(0, 10, 0, lr, frac) == doctest::Approx(1e-3));  // no warmup: starts at the peak
    CHECK(lr_at(7, 10, 0, lr, 1.0f) == doctest::Approx(1e-3));  // min_lr_frac 1: constant

    CHECK_THROWS_AS(lr_at(0, 0, 0, lr, frac), Error);
    CHECK(has(error_of([&] { lr_at(0, 10, -1, lr, frac); }), "warmup must be non-negative"));
    CHECK(has(error_of([&] { lr_at(-1, 10, 0, lr, frac); }), "step must be non-negative"));
    CHECK(has(error_of([&] { lr_at(0, 10, 0, lr, 1.5f); }), "min_lr_frac must be in [0, 1]"));
}

TEST_CASE("build_config: preset + arch, then --pattern or --ratio/--placement/--layers, fusion, untied, vocab") {
    ModelFlags f;  // the defaults: make train's small intra hybrid
    ModelConfig c = build_config(f);
    CHECK(c.arch == "intra");
    CHECK(c.count('H') >= 1);
    CHECK(c.pattern == preset("small", "intra").pattern);
    CHECK(c.tied);
    CHECK(c.vocab_size == 256);

    f = tiny_flags();
    f.pattern = "MAHM";
    c = build_config(f);
    CHECK(c.pattern == "MAHM");
    CHECK(c.n_layers == 4);
    CHECK(c.arch == "intra");  // the display arch follows the pattern
    f.pattern = "AA";
    CHECK(build_config(f).arch == "transformer");
    f.pattern = "MAM";
    CHECK(build_config(f).arch == "inter");

    // --ratio/--placement: the letter is H for intra, A otherwise (a transformer with a ratio is inter)
    f = tiny_flags();
    f.arch = "inter", f.ratio = "1:1", f.layers = 6, f.placement = "sandwich";
    c = build_config(f);
    CHECK(c.pattern == make_pattern(6, ratio_to_count("1:1", 6), 'A', "sandwich"));
    CHECK(c.n_layers == 6);
    f.arch = "intra";
    CHECK(build_config(f).pattern == make_pattern(6, 3, 'H', "sandwich"));
    f.arch = "transformer", f.placement = "", f.ratio = "1:3", f.layers = 8;
    c = build_config(f);
    CHECK(c.pattern == make_pattern(8, 2, 'A', "middle"));
    CHECK(c.arch == "inter");
    f = tiny_flags();
    f.arch = "mamba2", f.layers = 4;  // a depth alone keeps the pure arch
    CHECK(build_config(f).pattern == "MMMM");
    f = tiny_flags();
    f.arch = "inter", f.placement = "front";  // the hybrid presets' ratio 1:5, placed at the front
    CHECK(build_config(f).pattern == make_pattern(preset("tiny", "inter").n_layers, 1, 'A', "front"));

    f = tiny_flags();
    f.fusion = "concat", f.untied = true, f.vocab = 300;
    c = build_config(f);
    CHECK(to_string(c.fusion) == to_string(parse_fusion("concat")));
    CHECK(!c.tied);
    CHECK(c.vocab_size == 300);
    f = tiny_flags(128);  // the tiny preset's limit itself is fine
    CHECK(build_config(f).max_seq_len == 128);

    // the sliding-window baseline: S blocks around global A ones; --window/--sink; MoE on any family
    f = tiny_flags();
    f.arch = "swa", f.layers = 6;
    c = build_config(f);
    CHECK(c.pattern == "SSASSS");
    CHECK(c.arch == "swa");
    CHECK((c.window == 512 && c.sink == 64));  // the paper's, unless given
    f.window = 8, f.sink = 0;
    c = build_config(f);
    CHECK((c.window == 8 && c.sink == 0));
    f = tiny_flags(), f.pattern = "MSM", f.window = 4;
    CHECK(build_config(f).arch == "inter");
    f.pattern = "SSA";
    CHECK(build_config(f).arch == "swa");
    f = tiny_flags(), f.arch = "mamba2", f.chunk = 16;  // --chunk: the SSD's chunk length, the preset's unless given
    CHECK(build_config(f).chunk == 16);
    CHECK(block_config(build_config(f), 0).ssm.chunk == 16);
    f.chunk = 0;
    CHECK(build_config(f).chunk == preset("tiny", "mamba2").chunk);
    f = tiny_flags(), f.moe = true, f.experts = 4;
    c = build_config(f);
    CHECK((c.moe && c.n_experts == 4 && c.moe_bias_rate == 1e-3));
    CHECK(block_config(c, 0).use_moe);
    CHECK(block_config(c, 0).moe.d_ff == c.d_ff / 2);
    f = tiny_flags(), f.pattern = "SAS", f.window = 3, f.sink = 1;
    c = build_config(f);
    const BlockConfig sb = block_config(c, 0);
    CHECK((sb.kind == 'A' && sb.attn.window == 3 && sb.attn.sink == 1 && sb.attn.rope_theta == 10000.0));
    CHECK(block_config(c, 1).attn.window == 0);  // A stays global
}

TEST_CASE("build_config and train_flags_check refuse bad flags with one clear line") {
    auto err = [](ModelFlags f) { return error_of([&] { build_config(f); }); };
    ModelFlags f = tiny_flags();
    f.arch = "rnn";
    CHECK_THROWS_AS(build_config(f), Error);
    CHECK(has(err(f), "unknown arch 'rnn'"));
    f = tiny_flags(), f.preset = "huge";
    CHECK(has(err(f), "unknown preset 'huge'"));
    f = tiny_flags(), f.fusion = "blend";
    CHECK_THROWS_AS(build_config(f), Error);
    CHECK(has(err(f), "unknown --fusion 'blend'"));
    f = tiny_flags(), f.fusion = "op=mul";
    CHECK(has(err(f), "unknown value 'mul'"));
    f = tiny_flags(), f.arch = "mamba2", f.chunk = -1;
    CHECK(has(err(f), "--chunk must be in 1..256 (or 0 for the preset's), got -1"));
    f = tiny_flags(), f.arch = "inter", f.layers = 1;  // one layer cannot hold both kinds (it was a transformer)
    CHECK(has(err(f), "--layers 1: a hybrid needs at least 2 layers, one block of each kind (--arch inter, ratio 1:5)"));
    f.arch = "transformer", f.ratio = "1:3";
    CHECK(has(err(f), "--layers 1: a hybrid needs at least 2 layers"));
    f.arch = "transformer", f.ratio = "", f.layers = 1;  // a pure model may have one layer
    CHECK(build_config(f).pattern == "A");
    f = tiny_flags(), f.arch = "inter", f.ratio = "12:1", f.layers = 4;
    CHECK(build_config(f).count('M') == 1);
    f.chunk = 300;
    CHECK(has(err(f), "--chunk must be in 1..256 (or 0 for the preset's), got 300"));
    f = tiny_flags(), f.arch = "transformer", f.chunk = 32;
    CHECK(has(err(f), "--chunk applies to M and H blocks"));
    f = tiny_flags(), f.pattern = "MXM";
    CHECK_THROWS_AS(build_config(f), Error);
    CHECK(has(err(f), "--pattern"));
    CHECK(has(err(f), "unknown letter 'X'"));
    f = tiny_flags(129);
    CHECK_THROWS_AS(build_config(f), Error);
    CHECK(has(err(f), "--seq-len 129 is above the model's limit max_seq_len = 128"));
    f = tiny_flags(0);
    CHECK(has(err(f), "--seq-len must be positive, got 0"));
    f = tiny_flags(-3);
    CHECK(has(err(f), "--seq-len must be positive, got -3"));
    f = tiny_flags(), f.vocab = 0;
    CHECK(has(err(f), "--vocab must be positive"));
    f = tiny_flags(), f.layers = -2;
    CHECK(has(err(f), "--layers must be positive"));
    f = tiny_flags(), f.pattern = "MHM", f.ratio = "1:1";
    CHECK(has(err(f), "do not combine it with --ratio"));
    f = tiny_flags(), f.ratio = "1-5";
    CHECK(has(err(f), "ratio '1-5'"));
    f = tiny_flags(), f.placement = "top";
    CHECK(has(err(f), "unknown placement 'top'"));
    f = tiny_flags(), f.arch = "transformer", f.placement = "end";
    CHECK(has(err(f), "--placement needs --ratio"));
    f = tiny_flags(), f.window = 16;
    CHECK(has(err(f), "--window and --sink apply to S blocks"));
    f = tiny_flags(), f.arch = "swa", f.window = -1;
    CHECK(has(err(f), "--window must be positive"));
    f = tiny_flags(), f.arch = "swa", f.sink = -2;
    CHECK(has(err(f), "--sink must be non-negative"));
    f = tiny_flags(), f.moe = true, f.experts = 0;
    CHECK(has(err(f), "--experts must be in 1..64, got 0"));
    f = tiny_flags(), f.moe = true, f.moe_bias_rate = -1;
    CHECK(has(err(f), "--moe-bias-rate must be non-negative"));

    auto terr = [](TrainFlags t) { return error_of([&] { train_flags_check(t); }); };
    TrainFlags t;
    CHECK_NOTHROW(train_flags_check(t));
    t = TrainFlags(), t.batch = 0;
    CHECK_THROWS_AS(train_flags_check(t), Error);
    CHECK(has(terr(t), "--batch must be positive, got 0"));
    t = TrainFlags(), t.steps = -1;
    CHECK(has(terr(t), "--steps must be positive, got -1"));
    t = TrainFlags(), t.lr = 0;
    CHECK(has(terr(t), "--lr must be positive"));
    t = TrainFlags(), t.warmup = -1;
    CHECK(has(terr(t), "--warmup must be non-negative"));
    t = TrainFlags(), t.eval_batches = 0;
    CHECK(has(terr(t), "--eval-batches must be positive"));
    t = TrainFlags(), t.log_every = 0;
    CHECK(has(terr(t), "--log-every must be positive"));
    t = TrainFlags(), t.sample_len = 0;
    CHECK(has(terr(t), "--sample-len must be positive"));
    t = TrainFlags(), t.grad_clip = 0;
    CHECK(has(terr(t), "--grad-clip must be positive"));
    t = TrainFlags(), t.ckpt_every = -1;
    CHECK(has(terr(t), "--ckpt-every must be non-negative"));
    t = TrainFlags(), t.top_k = -1;
    CHECK(has(terr(t), "--top-k must be non-negative"));
    t = TrainFlags(), t.stop_at = -1;
    CHECK(has(terr(t), "--stop-at must be non-negative"));
}

TEST_CASE("config ⇄ metadata: every field round-trips; malformed metadata is refused") {
    ModelFlags f = tiny_flags();
    f.fusion = "norm=none,scale=vector,op=add,value=sep,out=joint";
    f.untied = true;
    ModelConfig c = build_config(f);
    c.rope_theta = 10000.5, c.norm_eps = 1e-6, c.init_std = 0.0123456789, c.chunk = 3;
    std::map<std::string, std::string> meta = config_to_metadata(c);
    c.moe = true, c.n_experts = 5, c.moe_bias_rate = 0.0025, c.window = 7, c.sink = 3, c.swa_rope_theta = 12345.5;
    meta = config_to_metadata(c);
    CHECK(meta.size() == 33);  // every ModelConfig field
    ModelConfig back = config_from_metadata(meta);
    CHECK(config_to_metadata(back) == meta);
    CHECK(back.pattern == c.pattern);
    CHECK(back.rope_theta == c.rope_theta);  // doubles exactly
    CHECK(back.norm_eps == c.norm_eps);
    CHECK(back.init_std == c.init_std);
    CHECK(back.tied == false);
    CHECK(to_string(back.fusion) == to_string(c.fusion));
    CHECK((back.moe && back.n_experts == 5 && back.moe_bias_rate == 0.0025));
    CHECK((back.window == 7 && back.sink == 3 && back.swa_rope_theta == 12345.5));
    CHECK(meta["norm_eps"] == "1e-06");  // the shortest exact spelling
    for (const char* preset_name : {"small", "1b"})
        for (const char* arch : {"transformer", "mamba2", "inter", "intra", "swa"}) {
            ModelConfig p = preset(preset_name, arch);
            CHECK(config_to_metadata(config_from_metadata(config_to_metadata(p))) == config_to_metadata(p));
        }

    auto broken = [&](const std::string& key, const std::string& value) {
        std::map<std::string, std::string> m = meta;
        if (value == "(erase)") m.erase(key);
        else m[key] = value;
        return error_of([&] { config_from_metadata(m, "checkpoint 'x'"); });
    };
    CHECK(has(broken("d_model", "(erase)"), "checkpoint 'x': metadata has no 'd_model'"));
    CHECK(has(broken("d_model", "32x"), "metadata 'd_model' = '32x' is not an integer"));
    CHECK(has(broken("d_model", " 32"), "is not an integer"));
    CHECK(has(broken("d_model", ""), "is not an integer"));
    CHECK(has(broken("norm_eps", "tiny"), "metadata 'norm_eps' = 'tiny' is not a number"));
    CHECK(has(broken("norm_eps", "inf"), "is not a number"));
    CHECK(has(broken("tied", "yes"), "metadata 'tied' = 'yes' is not true or false"));
    CHECK(has(broken("moe", "1"), "metadata 'moe' = '1' is not true or false"));
    CHECK(has(broken("n_experts", "0"), "the stored config is invalid"));
    CHECK(has(broken("fusion", "blend"), "metadata 'fusion'"));
    CHECK(has(broken("pattern", "MQM"), "the stored config is invalid"));
    CHECK(has(broken("d_model", "-32"), "the stored config is invalid"));
    CHECK_THROWS_AS(config_from_metadata(std::map<std::string, std::string>{}), Error);
}

// =============================================================================================
// Steps
// =============================================================================================

TEST_CASE("train_step: overfitting a single batch drives the loss near zero") {
    // data of exactly seq-len + 1 tokens: every batch is that one window
    const int T = 16;
    std::vector<int> data = ByteTokenizer().encode(synthetic_text(T + 1, 3));
    Model<float> model(build_config(tiny_flags(T)));
    model.init(1);
    TrainFlags t = short_run(300);
    t.warmup = 0, t.lr = 1e-2f, t.min_lr_frac = 1.0f, t.weight_decay = 0;
    WindowLoader loader(data, t.batch, T, 5);
    std::vector<float> m(model.params.size()), v(model.params.size());
    std::vector<int> in(size_t(t.batch) * T), tg(size_t(t.batch) * T);
    StepStats first = train_step(model, m, v, in.data(), tg.data(), loader, 0, t), s;
    CHECK(first.loss == doctest::Approx(std::log(256.0)).epsilon(0.05));  // a fresh model is near uniform
    CHECK(first.lr == doctest::Approx(1e-2));
    CHECK(first.grad_norm > 0);
    for (int step = 1; step < t.steps; step++) s = train_step(model, m, v, in.data(), tg.data(), loader, step, t);
    CHECK(s.loss < 0.05f);
    // the loss of a fresh forward agrees with what the step reported (up to the last update)
    CHECK(model.forward(in.data(), tg.data(), t.batch, T) < 0.05f);

    std::vector<float> short_m(3);
    CHECK(has(error_of([&] { train_step(model, short_m, v, in.data(), tg.data(), loader, 0, t); }),
              "AdamW moments hold 3"));
}

TEST_CASE("eval_loss: the mean over windows, a last partial batch padded and not counted") {
    const int T = 8, B = 2;
    std::vector<int> val = ByteTokenizer().encode(synthetic_text(5 * T + 1, 4));  // exactly 5 windows
    ModelConfig c = build_config(tiny_flags(T));
    Model<float> model(c), single(c);
    model.init(2);
    std::copy(model.params.begin(), model.params.end(), single.params.begin());
    model.alloc(B, T);
    std::vector<int> in(B * T), tg(B * T);
    auto window_loss = [&](int w) {
        return double(single.forward(val.data() + w * T, val.data() + w * T + 1, 1, T));
    };
    double all = 0;
    for (int w = 0; w < 5; w++) all += window_loss(w) / 5;
    CHECK(eval_loss(model, in.data(), tg.data(), val, B, T, 10) == doctest::Approx(all).epsilon(1e-5));  // 3 batches
    CHECK(eval_loss(model, in.data(), tg.data(), val, B, T, 1) ==
          doctest::Approx((window_loss(0) + window_loss(1)) / 2).epsilon(1e-5));
    CHECK(model.B == B);  // the (B, T) activations were kept
    CHECK_THROWS_AS(eval_loss(model, in.data(), tg.data(), val, B, T, 0), Error);
}

// =============================================================================================
// Run checkpoints and exact resume
// =============================================================================================

namespace {

// A short run on synthetic text: `steps` steps of `total` from the given state.
struct MiniRun {
    std::vector<int> data;
    ModelConfig cfg;
    TrainFlags t;
    Model<float> model;
    std::vector<float> m, v;
    std::vector<int> in, tg;
    WindowLoader loader;
    MiniRun(const ModelFlags& f, int total)
        : data(ByteTokenizer().encode(synthetic_text(4000, 9))), cfg(build_config(f)), t(short_run(total)),
          model(cfg), m(model.params.size()), v(model.params.size()), in(size_t(t.batch) * f.seq_len),
          tg(size_t(t.batch) * f.seq_len), loader(data, t.batch, f.seq_len, t.seed) {
        model.init(t.seed);
    }
    std::vector<float> train(int from, int to) {
        std::vector<float> losses;
        for (int s = from; s < to; s++)
            losses.push_back(train_step(model, m, v, in.data(), tg.data(), loader, s, t).loss);
        return losses;
    }
    TrainState state(int step) const { return TrainState{step, loader.rng_state()}; }
};

}  // namespace

TEST_CASE("save_run / load_run: bit-exact round trip of parameters, moments, step and data RNG") {
    TempDir dir;
    const std::string path = dir.file("run.safetensors");
    MiniRun a(tiny_flags(), 10);
    a.train(0, 2);  // non-zero moments
    save_run(path, a.model, a.m, a.v, a.state(2), {{"train.note", "hello"}});
    CHECK(!fs::exists(path + ".tmp"));

    MiniRun b(tiny_flags(), 10);
    b.model.init(99);  // different parameters, zero moments
    CHECK(!same_bits(a.model.params, b.model.params));
    TrainState s = load_run(path, b.model, b.m, b.v);
    CHECK(same_bits(a.model.params, b.model.params));
    CHECK(same_bits(a.m, b.m));
    CHECK(same_bits(a.v, b.v));
    CHECK(s.step == 2);
    CHECK(s.loader_rng == a.loader.rng_state());

    // the file: parameters under their names, moments under optim.m./optim.v., config in the metadata
    Checkpoint ck = load_safetensors(path);
    CHECK(ck.tensors.size() == 3 * a.model.tensors.size());
    CHECK(ck.tensors.count("embed") == 1);
    CHECK(ck.tensors.count("optim.m.embed") == 1);
    CHECK(ck.tensors.count("optim.v.layers.1.mixer.attn.wq") == 1);
    CHECK(meta_get(ck, "format") == RUN_FORMAT);
    CHECK(meta_get(ck, "pattern") == a.cfg.pattern);
    CHECK(meta_get(ck, "fusion") == to_string(a.cfg.fusion));
    CHECK(meta_get(ck, "train.note") == "hello");
    CHECK(config_to_metadata(checkpoint_config(ck)) == config_to_metadata(a.cfg));
    Model<float> c(checkpoint_config(ck));  // model-only load, config from the file
    load_params(ck, c);
    CHECK(same_bits(c.params, a.model.params));

    CHECK(has(error_of([&] { save_run(path, a.model, a.m, a.v, a.state(2), {{"step", "7"}}); }),
              "would replace a reserved key"));
}

TEST_CASE("load_run refuses another config, a truncated or corrupt file, and leaves the model untouched") {
    TempDir dir;
    const std::string path = dir.file("run.safetensors");
    MiniRun a(tiny_flags(), 10);
    a.train(0, 1);
    save_run(path, a.model, a.m, a.v, a.state(1));
    const std::string good = read_bytes(path);

    auto refused = [&](const ModelFlags& f, const std::string& file) {
        MiniRun b(f, 10);
        const std::vector<float> p0 = b.model.params, m0 = b.m;
        std::string msg = error_of([&] { load_run(file, b.model, b.m, b.v); });
        CHECK(same_bits(b.model.params, p0));
        CHECK(same_bits(b.m, m0));
        return msg;
    };
    ModelFlags other = tiny_flags();
    other.arch = "transformer";
    CHECK(has(refused(other, path), "saved with arch=intra, this run has arch=transformer"));
    other = tiny_flags(), other.fusion = "concat";
    CHECK(has(refused(other, path), "saved with fusion=norm=group,scale=none,op=diff,value=sep,out=sep"));
    other = tiny_flags(), other.untied = true;
    CHECK(has(refused(other, path), "saved with tied=true, this run has tied=false"));

    write_bytes(dir.file("trunc"), good.substr(0, good.size() - 100));
    CHECK(has(refused(tiny_flags(), dir.file("trunc")), "truncated"));
    write_bytes(dir.file("short"), good.substr(0, 5));
    CHECK(has(refused(tiny_flags(), dir.file("short")), "truncated"));
    std::string corrupt = good;
    corrupt[8] = 'X';  // the header's opening brace
    write_bytes(dir.file("corrupt"), corrupt);
    CHECK(has(refused(tiny_flags(), dir.file("corrupt")), "not valid JSON"));
    CHECK(has(refused(tiny_flags(), dir.file("missing")), "cannot open"));
    // a valid safetensors file that is not ours
    float x = 1;
    save_safetensors(dir.file("foreign"), {{"w", TensorView{{1}, &x}}}, {{"d_model", "32"}});
    CHECK(has(refused(tiny_flags(), dir.file("foreign")), "is not a hybridlm checkpoint"));
    CHECK(has(error_of([&] { checkpoint_config(load_safetensors(dir.file("foreign"))); }),
              "is not a hybridlm checkpoint"));
}

TEST_CASE("resume: 3 steps + save + load + 3 steps equals 6 uninterrupted steps, bit for bit") {
    TempDir dir;
    for (const char* arch : {"intra", "inter", "swa", "inter+moe"}) {
        CAPTURE(arch);
        ModelFlags f = tiny_flags();
        f.arch = std::string(arch).substr(0, std::string(arch).find('+'));
        f.moe = std::string(arch).find("moe") != std::string::npos;
        if (f.arch == "swa") f.window = 5, f.sink = 2;  // below the sequence length 16: the window matters
        if (f.moe) f.moe_bias_rate = 0.01;              // the biases move visibly in 6 steps
        MiniRun straight(f, 6);
        std::vector<float> losses = straight.train(0, 6);

        MiniRun first(f, 6);
        std::vector<float> resumed = first.train(0, 3);
        save_run(dir.file("ckpt"), first.model, first.m, first.v, first.state(3));
        MiniRun second(f, 6);  // a fresh process: new init, zero moments, fresh loader
        second.model.init(12345);
        TrainState s = load_run(dir.file("ckpt"), second.model, second.m, second.v);
        second.loader.set_rng_state(s.loader_rng);
        for (float l : second.train(s.step, 6)) resumed.push_back(l);

        REQUIRE(resumed.size() == losses.size());
        for (size_t i = 0; i < losses.size(); i++) CHECK(resumed[i] == losses[i]);  // exact
        CHECK(same_bits(second.model.params, straight.model.params));
        CHECK(same_bits(second.m, straight.m));
        CHECK(same_bits(second.v, straight.v));
        CHECK(same_bits(second.model.buffers, straight.model.buffers));  // the MoE biases came back too
        if (f.moe) {
            CHECK(second.model.buffers.size() == size_t(3 * 8));  // 3 layers × 8 experts
            bool moved = false;
            for (float b : straight.model.buffers) moved = moved || b != 0.0f;
            CHECK(moved);
        }
        CHECK(losses.back() < losses.front());  // and it did learn something
    }
}

// =============================================================================================
// Sampling
// =============================================================================================

TEST_CASE("generate: text through the cached decoder, streamed, seeded") {
    ModelConfig c = build_config(tiny_flags());
    Model<float> model(c);
    model.init(4);
    const int n = 14;
    const std::string prompt = "ROMEO:";
    std::string streamed;
    std::string got = generate(model, prompt, n, 0.9f, 10, 77, [&](const std::string& piece) { streamed += piece; });
    CHECK(got.size() == size_t(n));
    CHECK(streamed == got);
    // the same as the token-level cached decoder on the prompt's bytes
    std::vector<int> ids = generate_cached(model, ByteTokenizer().encode(prompt), n, 0.9f, 10, 77);
    CHECK(got == ByteTokenizer().decode(ids));
    CHECK(generate(model, prompt, n, 0.9f, 10, 77) == got);  // same seed, same text
    CHECK(generate(model, prompt, n, 0.9f, 10, 78) != got);  // another seed, other text
    CHECK(generate(model, prompt, 0, 0.9f, 10, 77).empty());
    CHECK(generate(model, "", 3, 0.0f, 0, 1).size() == 3);  // an empty prompt starts from "\n"

    CHECK(has(error_of([&] { generate(model, prompt, -1, 1.0f, 0, 1); }), "n_tokens must be non-negative"));
    ModelFlags big = tiny_flags();
    big.vocab = 300;
    Model<float> other(build_config(big));
    CHECK(has(error_of([&] { generate(other, prompt, 5, 1.0f, 0, 1); }), "byte vocabulary"));
}

TEST_CASE("progress line and its number formats") {
    StepStats s;
    s.loss = 2.34123f, s.lr = 1.2e-3f, s.grad_norm = 0.834f;
    CHECK(progress_line(120, 600, s, 5130, 72) ==
          "step 120/600 | loss 2.3412 | lr 1.2e-03 | norm 0.83 | 5.1k tok/s | ETA 1m12s");
    CHECK(human_rate(950) == "950");
    CHECK(human_rate(2.3e6) == "2.3M");
    CHECK(human_duration(42) == "42s");
    CHECK(human_duration(3725) == "1h02m");
    CHECK(human_duration(-5) == "0s");
}

// =============================================================================================
// train_cpu end to end
// =============================================================================================

namespace {

// train_cpu sits next to this test binary (both in $(BUILD)); HL_TRAIN_CPU overrides.
std::string train_cpu_path() {
    if (const char* env = std::getenv("HL_TRAIN_CPU")) return env;
    char buf[4096];
    ssize_t n = readlink("/proc/self/exe", buf, sizeof buf - 1);
    if (n <= 0) return "build/train_cpu";
    std::string self(buf, size_t(n));
    return self.substr(0, self.find_last_of('/') + 1) + "train_cpu";
}

std::string quote(const std::string& s) {
    std::string q = "'";
    for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
    return q + "'";
}

struct Result {
    int rc = -1;
    std::string out, err;
};

Result run_cli(const TempDir& dir, const std::string& args) {
    const std::string out = dir.file("stdout"), err = dir.file("stderr");
    const std::string cmd = quote(train_cpu_path()) + " " + args + " >" + quote(out) + " 2>" + quote(err);
    int status = std::system(cmd.c_str());
    Result r;
    r.rc = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    r.out = read_bytes(out);
    r.err = read_bytes(err);
    return r;
}

std::vector<std::string> lines(const std::string& s) {
    std::vector<std::string> v;
    std::istringstream in(s);
    std::string line;
    while (std::getline(in, line)) v.push_back(line);
    return v;
}

// Columns step, train_loss, lr, grad_norm of a log.csv (val_loss and tokens_per_s left out).
std::vector<std::string> log_curve(const std::string& csv) {
    std::vector<std::string> rows;
    for (const std::string& line : lines(csv)) {
        std::vector<std::string> col;
        std::istringstream in(line);
        std::string c;
        while (std::getline(in, c, ',')) col.push_back(c);
        if (col.size() >= 5) rows.push_back(col[0] + "," + col[1] + "," + col[3] + "," + col[4]);
    }
    return rows;
}

const char* TINY = " --preset tiny --seq-len 16 --batch 2 --eval-batches 1 --sample-len 8 --threads 1 --log-every 1";

}  // namespace

TEST_CASE("train_cpu: --help, a short run, its log and checkpoint, then --sample --load") {
    REQUIRE_MESSAGE(fs::exists(train_cpu_path()), "build train_cpu first (make builds it before the suite): ",
                    train_cpu_path());
    TempDir dir;
    write_bytes(dir.file("data.txt"), synthetic_text(6000, 1));

    Result help = run_cli(dir, "--help");
    CHECK(help.rc == 0);
    for (const char* flag : {"--arch", "--preset", "--pattern", "--ratio", "--placement", "--fusion", "--seq-len",
                             "--batch", "--steps", "--lr", "--warmup", "--seed", "--data", "--out", "--resume",
                             "--sample-every", "--temperature", "--top-k", "--sample", "--load", "--prompt"})
        CHECK_MESSAGE(has(help.out, flag), flag);

    Result r = run_cli(dir, std::string(TINY) + " --steps 4 --data " + quote(dir.file("data.txt")) + " --out " +
                                quote(dir.file("run")));
    INFO(r.out, r.err);
    REQUIRE(r.rc == 0);
    CHECK(r.err.empty());
    CHECK(has(r.out, "non-embedding params (formula)"));  // cost_report
    CHECK(has(r.out, "exact params: "));
    CHECK(has(r.out, "training FLOPs"));
    CHECK(has(r.out, "step 4/4 | loss "));
    CHECK(has(r.out, " tok/s | ETA "));
    CHECK(has(r.out, "bits per byte"));
    CHECK(has(r.out, "---- sample at step 4 ----\nROMEO:"));
    CHECK(fs::exists(dir.file("run/model.safetensors")));
    CHECK(!fs::exists(dir.file("run/model.safetensors.tmp")));
    std::vector<std::string> log = lines(read_bytes(dir.file("run/log.csv")));
    REQUIRE(log.size() == 5);
    CHECK(log[0] == "step,train_loss,val_loss,lr,grad_norm,tokens_per_s");
    CHECK(log[4].rfind("4,", 0) == 0);
    CHECK(log[3].find(",,") != std::string::npos);   // no validation at step 3 ...
    CHECK(log[4].find(",,") == std::string::npos);   // ... one at the end

    Result s = run_cli(dir, "--sample --load " + quote(dir.file("run/model.safetensors")) +
                                " --prompt 'JULIET:' --sample-len 12 --seed 3");
    INFO(s.err);
    CHECK(s.rc == 0);
    CHECK(s.out.rfind("JULIET:", 0) == 0);
    CHECK(s.out.size() == 7 + 12 + 1);  // prompt + 12 bytes + newline
    CHECK(run_cli(dir, "--sample --load " + quote(dir.file("run/model.safetensors")) +
                           " --prompt 'JULIET:' --sample-len 12 --seed 3").out == s.out);
}

TEST_CASE("train_cpu: --stop-at then --resume writes the same losses and the same checkpoint as one run") {
    REQUIRE(fs::exists(train_cpu_path()));
    TempDir dir;
    write_bytes(dir.file("data.txt"), synthetic_text(6000, 2));
    const std::string base = std::string(TINY) + " --steps 6 --warmup 2 --eval-every 0 --data " +
                             quote(dir.file("data.txt"));
    Result a = run_cli(dir, base + " --out " + quote(dir.file("a")));
    REQUIRE(a.rc == 0);
    Result b1 = run_cli(dir, base + " --out " + quote(dir.file("b")) + " --stop-at 3");
    INFO(b1.out, b1.err);
    REQUIRE(b1.rc == 0);
    CHECK(has(b1.out, "stopped at step 3 of 6"));
    CHECK(log_curve(read_bytes(dir.file("b/log.csv"))).size() == 4);
    Result b2 = run_cli(dir, base + " --out " + quote(dir.file("b")) + " --resume " +
                                 quote(dir.file("b/model.safetensors")));
    INFO(b2.out, b2.err);
    REQUIRE(b2.rc == 0);
    CHECK(has(b2.out, "resumed from"));
    std::vector<std::string> curve_a = log_curve(read_bytes(dir.file("a/log.csv")));
    CHECK(curve_a.size() == 7);
    CHECK(log_curve(read_bytes(dir.file("b/log.csv"))) == curve_a);
    // parameters, moments, step, RNG and metadata: the same bytes
    CHECK(read_bytes(dir.file("b/model.safetensors")) == read_bytes(dir.file("a/model.safetensors")));

    Result done = run_cli(dir, base + " --out " + quote(dir.file("b")) + " --resume " +
                                   quote(dir.file("b/model.safetensors")));
    CHECK(done.rc != 0);
    CHECK(has(done.err, "already at step 6 of --steps 6"));
}

TEST_CASE("train_cpu: every bad input is one `error:` line, exit 1, and the existing run untouched") {
    REQUIRE(fs::exists(train_cpu_path()));
    TempDir dir;
    const std::string data = dir.file("data.txt");
    write_bytes(data, synthetic_text(6000, 3));
    write_bytes(dir.file("empty.txt"), "");
    const std::string run = dir.file("run"), ckpt = dir.file("run/model.safetensors");
    const std::string good = std::string(TINY) + " --steps 2 --data " + quote(data) + " --out " + quote(run);
    REQUIRE(run_cli(dir, good).rc == 0);
    // a checkpoint of another config (a tiny transformer) and broken copies of the good one
    REQUIRE(run_cli(dir, std::string(TINY) + " --steps 1 --arch transformer --data " + quote(data) + " --out " +
                             quote(dir.file("other"))).rc == 0);
    const std::string bytes = read_bytes(ckpt), log = read_bytes(dir.file("run/log.csv"));
    write_bytes(dir.file("trunc.safetensors"), bytes.substr(0, bytes.size() / 2));
    std::string corrupt = bytes;
    corrupt[12] = '\x01';  // a control character inside the JSON header
    write_bytes(dir.file("corrupt.safetensors"), corrupt);

    struct Case {
        std::string what;
        std::string args;
        const char* message;
    };
    const std::string q_data = quote(data), q_run = quote(run);
    const std::string at = std::string(TINY) + " --steps 4 --out " + q_run;  // every case targets the good run
    const Case cases[] = {
        {"missing data", at + " --data " + quote(dir.file("nope.txt")), "cannot open"},
        {"empty data", at + " --data " + quote(dir.file("empty.txt")), "is empty"},
        {"truncated checkpoint", at + " --data " + q_data + " --resume " + quote(dir.file("trunc.safetensors")),
         "truncated"},
        {"corrupt checkpoint", at + " --data " + q_data + " --resume " + quote(dir.file("corrupt.safetensors")),
         "header"},
        {"checkpoint of another config",
         at + " --data " + q_data + " --resume " + quote(dir.file("other/model.safetensors")),
         "saved with arch=transformer, this run has arch=intra"},
        {"unknown arch", at + " --data " + q_data + " --arch rnn", "unknown arch 'rnn'"},
        {"unknown preset", at + " --data " + q_data + " --preset huge", "unknown preset 'huge'"},
        {"unknown fusion", at + " --data " + q_data + " --fusion blend", "unknown --fusion 'blend'"},
        {"bad pattern letter", at + " --data " + q_data + " --pattern MXM", "unknown letter 'X'"},
        {"seq-len above the limit", at + " --data " + q_data + " --seq-len 129", "above the model's limit"},
        {"zero seq-len", at + " --data " + q_data + " --seq-len 0", "--seq-len must be positive"},
        {"zero batch", at + " --data " + q_data + " --batch 0", "--batch must be positive"},
        {"negative steps", at + " --data " + q_data + " --steps -3", "--steps must be positive"},
        {"zero lr", at + " --data " + q_data + " --lr 0", "--lr must be positive"},
        {"not a number", at + " --data " + q_data + " --batch many", "batch"},
        {"unknown flag", at + " --data " + q_data + " --colour blue", "colour"},
        {"sample from a truncated checkpoint", "--sample --load " + quote(dir.file("trunc.safetensors")), "truncated"},
        {"sample without --load", "--sample", "--sample needs --load"},
        {"--load without --sample", at + " --data " + q_data + " --load " + quote(ckpt), "--load is for --sample"},
    };
    for (const Case& k : cases) {
        CAPTURE(k.what);
        Result r = run_cli(dir, k.args);
        INFO(r.out, r.err);
        CHECK(r.rc == 1);
        std::vector<std::string> err = lines(r.err);
        REQUIRE(err.size() == 1);
        CHECK(err[0].rfind("error: ", 0) == 0);
        CHECK(has(err[0], k.message));
        CHECK(read_bytes(ckpt) == bytes);  // nothing overwritten
        CHECK(read_bytes(dir.file("run/log.csv")) == log);
        CHECK(!fs::exists(ckpt + ".tmp"));
    }
}
