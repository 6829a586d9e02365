// test_study.cpp — the study pipeline of dev/study/study.h end to end on the CPU at a micro scale: runs matched in
// training FLOPs, every evaluation filled in, the CSV's rows and the figures written as PNGs; and the recall
// batches' masks.
#include <cmath>                 // std::isfinite
#include <cstdio>                // std::fopen: a part cut short
#include <string>                // std::string
#include <vector>                // std::vector
#include <doctest/doctest.h>     // TEST_CASE, CHECK, REQUIRE
#include "data/loader.h"         // load_tokens, split_tokens
#include "dev/study/study.h"     // StudyConfig, run_study, CpuBackend, niah_batch, mqar_task_batch
#include "test/files.h"          // TempDir, read_bytes

using namespace hl;

TEST_CASE("study: a micro study runs every evaluation, matches training FLOPs, writes the CSV and the figures") {
    test::TempDir dir;
    study::StudyConfig sc;
    sc.out = dir.file("study");
    for (const auto& e : study::default_entries("tiny"))
        if (e.name == "transformer" || e.name == "inter 1:1") sc.entries.push_back(e);
    REQUIRE(sc.entries.size() == 2);
    sc.B = 2, sc.T = 32, sc.steps = 6, sc.eval_every = 3, sc.eval_batches = 1, sc.long_T = 64;
    sc.train.warmup = 1;
    sc.task_steps = 3, sc.task_B = 2, sc.task_T = 160, sc.task_lengths = {160, 192}, sc.task_eval_examples = 2;
    sc.niah_depths = {0.0, 1.0};
    sc.mqar.n_pairs = 4;
    sc.decode_lengths = {8, 16};
    const Split split = split_tokens(load_tokens("data/tinyshakespeare.txt"), 0.1);
    const std::vector<study::Result> rs = study::run_study<study::CpuBackend>(sc, split.train, split.val);
    REQUIRE(rs.size() == 2);

    const double budget = rs[0].flops_per_token * sc.B * sc.T * sc.steps;  // the transformer's 6 steps
    for (const study::Result& r : rs) {
        CAPTURE(r.name);
        const double per_step = r.flops_per_token * sc.B * sc.T;
        CHECK(std::fabs(r.flops - budget) <= per_step / 2);  // matched to within half a step
        CHECK(r.curve_val.size() == size_t(r.steps / 3 + (r.steps % 3 != 0)));  // every 3 steps, and the end
        CHECK(std::isfinite(r.val));
        CHECK(r.per_pos.size() == size_t(sc.long_T));
        CHECK(r.mqar_acc.size() == 2);
        CHECK(r.niah_grid.size() == 2);
        CHECK(r.decode_ms.size() == 2);
        CHECK(r.prefill_ms.size() == 2);
        CHECK(r.prefill_ms[1] > 0);
        CHECK(r.decode_flops[1] > 0);
        CHECK(r.cache_bytes[0] > 0);
    }
    CHECK(rs[0].steps == 6);
    CHECK(rs[1].steps != rs[0].steps);  // another cost per token, so another step count for the same FLOPs
    // the transformer's KV cache doubles with the context; formula and measurement agree for it (fp32 both)
    CHECK(rs[0].cache_bytes[1] == doctest::Approx(2 * rs[0].cache_bytes[0]));
    CHECK(rs[0].cache_bytes[0] == doctest::Approx(rs[0].cache_formula[0]));

    const std::string csv = test::read_bytes(sc.out + "/results.csv");
    size_t lines = 0;
    for (char c : csv) lines += c == '\n';
    CHECK(lines == 3);  // header + one row per entry
    CHECK(csv.find("inter 1:1,inter,") != std::string::npos);
    for (const char* png : {"loss_vs_flops", "position_loss", "recall", "niah_digits", "decode", "prefill", "cache",
                            "niah_transformer", "niah_inter_1_1", "attention", "ssd_matrix"}) {
        CAPTURE(png);
        const std::string bytes = test::read_bytes(sc.out + "/" + png + ".png");
        CHECK(bytes.substr(0, 4) == "\x89PNG");
    }

    // each entry's part file holds its Result exactly (17 digits), so a study run in pieces merges to the same CSV
    const study::Result back = study::load_result(study::part_path(sc.out, 1));
    CHECK(back.name == rs[1].name);
    CHECK(back.steps == rs[1].steps);
    CHECK(back.val == rs[1].val);
    CHECK(back.curve_val == rs[1].curve_val);
    CHECK(back.per_pos == rs[1].per_pos);
    CHECK(back.niah_grid == rs[1].niah_grid);
    CHECK(back.attn_matrix == rs[1].attn_matrix);
    CHECK(back.cache_formula == rs[1].cache_formula);
    CHECK(back.prefill_ms == rs[1].prefill_ms);
    CHECK(back.decode_flops == rs[1].decode_flops);
    study::merge_study(sc);
    CHECK(test::read_bytes(sc.out + "/results.csv") == csv);
    // inference measured again (--inference-only): new times in the part, every other number kept
    study::remeasure_inference<study::CpuBackend>(sc, 1, 2);
    const study::Result again = study::load_result(study::part_path(sc.out, 1));
    CHECK(again.val == rs[1].val);
    CHECK(again.curve_val == rs[1].curve_val);
    CHECK(again.niah_grid == rs[1].niah_grid);
    CHECK(again.cache_bytes == rs[1].cache_bytes);  // sizes are exact; the times are new
    CHECK(again.decode_flops == rs[1].decode_flops);
    REQUIRE(again.prefill_ms.size() == 2);
    CHECK(again.prefill_ms[1] > 0);
    CHECK(again.decode_ms.size() == 2);
    // a part cut short, or another study's part in its place, is one clear error
    const std::string part = test::read_bytes(study::part_path(sc.out, 1));
    {
        std::FILE* f = std::fopen(study::part_path(sc.out, 1).c_str(), "w");
        std::fwrite(part.data(), 1, part.size() / 2, f);
        std::fclose(f);
    }
    CHECK_THROWS_WITH_AS(study::load_result(study::part_path(sc.out, 1)), doctest::Contains("is not a study part"),
                         Error);
    std::swap(sc.entries[0], sc.entries[1]);
    CHECK_THROWS_WITH_AS(study::merge_study(sc), doctest::Contains("a part of another study"), Error);
}

TEST_CASE("study: NIAH and MQAR batches mask exactly the answers") {
    const std::vector<int> text = load_tokens("data/tinyshakespeare.txt");
    Rng rng(3);
    const int B = 3, T = 200;
    study::TaskBatch nb = study::niah_batch(text, B, T, 0.5, rng);
    for (int b = 0; b < B; b++) {
        int masked = 0;
        for (int t = 0; t < T; t++) {
            const size_t i = (size_t)b * T + t;
            if (t + 1 < T) CHECK(nb.in[i + 1] == nb.tg[i]);  // targets are the inputs shifted by one
            if (nb.mask[i]) {
                masked++;
                CHECK((nb.tg[i] >= '0' && nb.tg[i] <= '9'));
            }
        }
        CHECK(masked == 7);  // the needle's 7 digits
    }
    MqarConfig mc;
    mc.n_pairs = 4;
    study::TaskBatch mb = study::mqar_task_batch(mc, B, 64, rng);
    int masked = 0;
    for (uint8_t m : mb.mask) masked += m;
    CHECK(masked > 0);
}
