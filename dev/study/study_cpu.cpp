// study_cpu.cpp — the study of dev/study/study.h on the CPU: a small smoke version of what study.cu runs on the
// GPU, to see the whole pipeline (training at matched FLOPs, the evaluations, the CSV and the figures) work.
//
//   build/study_cpu [out folder]       (make study_cpu; under a minute on 2 cores)
#include <cstdio>                // std::printf
#include <exception>             // std::exception
#include <string>                // std::string
#include "data/loader.h"         // load_tokens, split_tokens
#include "dev/study/study.h"     // StudyConfig, default_entries, run_study, CpuBackend

int main(int argc, char** argv) {
    try {
        hl::study::StudyConfig sc;
        sc.out = argc > 1 ? argv[1] : "runs/study_cpu";
        for (const auto& e : hl::study::default_entries("tiny"))
            if (e.name == "transformer" || e.name == "mamba2" || e.name == "inter 1:1" || e.name == "intra final")
                sc.entries.push_back(e);
        sc.B = 4, sc.T = 64, sc.steps = 60, sc.eval_every = 20, sc.eval_batches = 2, sc.long_T = 128;
        sc.train.lr = 3e-3f, sc.train.warmup = 10;
        sc.task_steps = 40, sc.task_B = 4, sc.task_T = 192, sc.task_lengths = {192, 256}, sc.task_eval_examples = 4;
        sc.mqar.n_pairs = 4;
        sc.decode_lengths = {32, 64, 128};
        const hl::Split split = hl::split_tokens(hl::load_tokens("data/tinyshakespeare.txt"), 0.1);
        hl::study::run_study<hl::study::CpuBackend>(sc, split.train, split.val);
        std::printf("wrote %s/results.csv and its figures\n", sc.out.c_str());
        return 0;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
}
