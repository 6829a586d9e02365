// dump_grads.cpp — one forward + backward of the CPU model, written to disk for dev/reference.py to check.
//
//   dump_grads --preset tiny --arch intra --fusion hymba --seed 7 --batch 2 --seq-len 11 --out /tmp/ref/intra
//
// writes two safetensors files into --out:
//   model.safetensors  the initialised parameters with the config in the metadata, written by save_run exactly
//                      as train_cpu writes its checkpoints (so the reference loads what a user would load)
//   grads.safetensors  tokens, targets (B, T) stored as floats, loss (1), logits (B, T, V) and every parameter's
//                      gradient under the parameter's own name; metadata "dtype" says float64 or float32
// With --double (the default) the model runs in double: parameters are drawn in float (what the checkpoint
// can hold) and widened exactly, and grads.safetensors is F64, so the reference can be held to ~1e-9.
// --float runs Model<float> and writes F32. The batch is a random window of --data (tinyshakespeare by
// default), or uniform random tokens with --data random. --perturb s moves every parameter off its init
// (norm weights, scales and D start at 1, where mixing two of them up would not show).
// --gpu (the nvcc build only) runs the same forward + backward on the GPU model instead (kernels/model.cuh, fp32):
// train.cu's logits, loss and gradients, for the same check against PyTorch autograd; it writes F32.
//
// Build (from the repository root):
//   g++ -std=c++17 -O2 -fopenmp -I. -I.deps/include dev/dump_grads.cpp -o build/dump_grads
//   make build/dump_grads_gpu     (nvcc -x cu on this file, with the Makefile's NVFLAGS and -lcublas)
#ifdef __CUDACC__
// nvcc's front end (not g++) warns of a narrowing inside CLI11's SFINAE probes when it instantiates --set's
// std::vector<std::string> option; the probe is meant to fail there
#pragma nv_diag_suppress 2361
#endif
#include <CLI/CLI.hpp>         // CLI11: the command line
#include <sys/stat.h>          // mkdir, stat: the output folder
#include <cerrno>              // errno
#include <cstdint>             // uint8_t, uint64_t
#include <cstdio>              // std::FILE, std::fopen, std::fwrite, std::printf, std::fprintf
#include <cstring>             // std::memcpy, std::strerror
#include <map>                 // std::map: metadata
#include <string>              // std::string
#include <utility>             // std::pair, std::move
#include <vector>              // std::vector
#include "data/loader.h"       // load_tokens, check_vocab, WindowLoader
#include "model/checkpoint.h"  // Json, json_dump: the grads file's header
#include "model/common.h"      // hl::Error, HL_CHECK, fail, Rng
#include "model/config.h"      // ModelConfig, config_check, cost_report
#include "model/model.h"       // Model
#include "model/trainer.h"     // ModelFlags, build_config, save_run, TrainState
#ifdef __CUDACC__
#include "kernels/model.cuh"   // gpu::GpuModel: --gpu
#endif

using namespace hl;

namespace {

// One tensor of grads.safetensors: values kept in double, written as F64 or F32.
struct OutTensor {
    std::string name;
    std::vector<int> shape;
    std::vector<double> data;
};

// A safetensors file of F64 (or F32) tensors. model/checkpoint.h writes F32 only, which would round the
// double gradients to ~1e-7 and hide everything below; this writer shares its JSON header code.
void write_safetensors(const std::string& path, const std::vector<OutTensor>& tensors,
                       const std::map<std::string, std::string>& metadata, bool f64) {
    const uint64_t esize = f64 ? 8 : 4;
    Json header = Json::object();
    Json meta = Json::object();
    for (const auto& kv : metadata) meta.members.emplace_back(kv.first, Json::string(kv.second));
    header.members.emplace_back("__metadata__", std::move(meta));
    uint64_t offset = 0;
    for (const OutTensor& t : tensors) {
        Json info = Json::object(), shape = Json::array(), offs = Json::array();
        uint64_t numel = 1;
        for (int d : t.shape) {
            shape.items.push_back(Json::integer(d));
            numel *= uint64_t(d);
        }
        HL_CHECK(numel == t.data.size(), "dump_grads: tensor ", t.name, " has ", t.data.size(), " values for its shape");
        offs.items.push_back(Json::integer(int64_t(offset)));
        offs.items.push_back(Json::integer(int64_t(offset + numel * esize)));
        info.members.emplace_back("dtype", Json::string(f64 ? "F64" : "F32"));
        info.members.emplace_back("shape", std::move(shape));
        info.members.emplace_back("data_offsets", std::move(offs));
        header.members.emplace_back(t.name, std::move(info));
        offset += numel * esize;
    }
    std::string text = json_dump(header);
    text.append((8 - text.size() % 8) % 8, ' ');  // the data section starts 8-byte aligned

    std::vector<uint8_t> bytes(8 + text.size() + offset);
    for (int k = 0; k < 8; k++) bytes[size_t(k)] = uint8_t(uint64_t(text.size()) >> (8 * k));  // little-endian
    std::memcpy(bytes.data() + 8, text.data(), text.size());
    uint8_t* p = bytes.data() + 8 + text.size();
    for (const OutTensor& t : tensors) {
        for (double v : t.data) {
            // little-endian bytes of the IEEE value, independent of the host
            uint64_t u = 0;
            if (f64) {
                std::memcpy(&u, &v, 8);
            } else {
                float f = float(v);
                uint32_t u32;
                std::memcpy(&u32, &f, 4);
                u = u32;
            }
            for (uint64_t k = 0; k < esize; k++) *p++ = uint8_t(u >> (8 * k));
        }
    }
    const std::string tmp = path + ".tmp";  // written whole, then renamed: never a half file under the name
    std::FILE* f = std::fopen(tmp.c_str(), "wb");
    if (!f) fail("dump_grads: cannot open '", tmp, "' for writing: ", std::strerror(errno));
    const bool ok = std::fwrite(bytes.data(), 1, bytes.size(), f) == bytes.size();
    if (std::fclose(f) != 0 || !ok) {
        std::remove(tmp.c_str());
        fail("dump_grads: writing '", tmp, "' failed");
    }
    if (std::rename(tmp.c_str(), path.c_str()) != 0) fail("dump_grads: cannot rename '", tmp, "' to '", path, "'");
}

// Forward with targets, backward, and everything the reference compares, in the model's float type T.
template <typename T>
std::vector<OutTensor> run(Model<T>& model, const std::vector<int>& inputs, const std::vector<int>& targets, int B,
                           int Tn, double* loss_out) {
    const ModelConfig& c = model.cfg;
    const double loss = double(model.forward(inputs.data(), targets.data(), B, Tn));
    model.zero_grad();
    model.backward();
    *loss_out = loss;
    std::vector<OutTensor> out;
    out.push_back({"tokens", {B, Tn}, std::vector<double>(inputs.begin(), inputs.end())});
    out.push_back({"targets", {B, Tn}, std::vector<double>(targets.begin(), targets.end())});
    out.push_back({"loss", {1}, {loss}});
    const size_t nl = (size_t)B * Tn * c.vocab_size;
    out.push_back({"logits", {B, Tn, c.vocab_size}, std::vector<double>(model.logits, model.logits + nl)});
    for (const TensorInfo& info : model.tensors) {
        const T* g = model.grads.data() + info.offset;
        out.push_back({info.name, info.shape, std::vector<double>(g, g + info.numel)});
    }
    return out;
}

#ifdef __CUDACC__
// The same on the GPU model, from the host model's parameters (and MoE biases): fp32 kernels, cuBLAS without TF32.
std::vector<OutTensor> run_gpu(const Model<float>& host, const std::vector<int>& inputs,
                               const std::vector<int>& targets, int B, int Tn, double* loss_out) {
    const ModelConfig& c = host.cfg;
    gpu::GpuModel model(c, /*train=*/true);
    model.upload(host);
    model.set_batch(inputs.data(), targets.data(), B, Tn);
    model.forward(model.tokens_buf.ptr, model.targets_buf.ptr, B, Tn);
    model.zero_grad();
    model.backward();
    const double loss = double(model.loss());  // (a sync: every launch above is done)
    *loss_out = loss;
    const size_t nl = (size_t)B * Tn * c.vocab_size;
    std::vector<float> logits(nl);
    cudaCheck(cudaMemcpy(logits.data(), model.logits, nl * sizeof(float), cudaMemcpyDeviceToHost));
    const std::vector<float> grads = model.grads.download();
    std::vector<OutTensor> out;
    out.push_back({"tokens", {B, Tn}, std::vector<double>(inputs.begin(), inputs.end())});
    out.push_back({"targets", {B, Tn}, std::vector<double>(targets.begin(), targets.end())});
    out.push_back({"loss", {1}, {loss}});
    out.push_back({"logits", {B, Tn, c.vocab_size}, std::vector<double>(logits.begin(), logits.end())});
    for (const TensorInfo& info : model.tensors)
        out.push_back({info.name, info.shape,
                       std::vector<double>(grads.begin() + info.offset, grads.begin() + info.offset + info.numel)});
    return out;
}
#endif

}  // namespace

int main(int argc, char** argv) {
    CLI::App app{"dump_grads: one forward + backward of the CPU model, saved for dev/reference.py check"};
    ModelFlags mf;
    mf.preset = "tiny";
    mf.arch = "transformer";
    mf.seq_len = 11;
    uint64_t seed = 1337;
    int batch = 2;
    std::vector<std::string> sets;
    double perturb = 0;
    std::string out, data = "data/tinyshakespeare.txt";
    bool use_double = true;
    app.add_option("--preset", mf.preset, "tiny | small | 100m | 350m | 1b | 3b");
    app.add_option("--arch", mf.arch, "transformer | mamba2 | inter | intra");
    app.add_option("--pattern", mf.pattern, "one letter per layer (A, M, H), replaces the preset's");
    app.add_option("--fusion", mf.fusion, "the H blocks' fusion: final | concat | hymba | falcon | axes");
    app.add_flag("--untied", mf.untied, "separate LM head instead of the tied embedding");
    app.add_option("--set", sets, "override a config field, e.g. --set ngroups=2 --set chunk=5 (repeatable)");
    app.add_option("--seed", seed, "init and data seed");
    app.add_option("--perturb", perturb,
                   "scale every parameter by (1 + s·N(0,1)) after init, so norm weights, scales and D are not all 1");
    app.add_option("--batch", batch, "B");
    app.add_option("--seq-len", mf.seq_len, "T");
    app.add_option("--data", data, "text file or llm.c shard, or 'random' for uniform random tokens");
    app.add_option("--out", out, "folder for model.safetensors and grads.safetensors")->required();
    app.add_flag("--double,!--float", use_double, "run in double (the default) or in float");
    bool use_gpu = false;
#ifdef __CUDACC__
    app.add_flag("--gpu", use_gpu, "run the GPU model (fp32) instead of the CPU one; writes F32");
#endif
    CLI11_PARSE(app, argc, argv);
    const bool use_float = !use_double || use_gpu;

    try {
        HL_CHECK(batch > 0, "--batch must be positive, got ", batch);
        HL_CHECK(perturb >= 0, "--perturb must be non-negative, got ", perturb);
        ModelConfig cfg = build_config(mf);
        if (!sets.empty()) {  // through the metadata map: every field by its checkpoint name, re-checked
            std::map<std::string, std::string> meta = config_to_metadata(cfg);
            for (const std::string& kv : sets) {
                const size_t eq = kv.find('=');
                HL_CHECK(eq != std::string::npos && meta.count(kv.substr(0, eq)), "--set '", kv,
                         "': expected field=value with a config field (as in the checkpoint metadata)");
                meta[kv.substr(0, eq)] = kv.substr(eq + 1);
            }
            cfg = config_from_metadata(meta, "--set");
        }

        // the batch: B random windows of the data, or uniform random tokens
        const int Tn = mf.seq_len;
        std::vector<int> inputs(size_t(batch) * Tn), targets(size_t(batch) * Tn);
        if (data == "random") {
            Rng rng(seed ^ 0x5eedu);
            for (size_t i = 0; i < inputs.size(); i++) {
                inputs[i] = int(rng.next() % uint64_t(cfg.vocab_size));
                targets[i] = int(rng.next() % uint64_t(cfg.vocab_size));
            }
        } else {
            std::vector<int> tokens = load_tokens(data);
            check_vocab(tokens, cfg.vocab_size);
            WindowLoader loader(tokens, batch, Tn, seed);
            loader.next(inputs.data(), targets.data());
        }

        // parameters are drawn in float, the precision the checkpoint holds; the double model copies them exactly
        Model<float> fmodel(cfg);
        fmodel.init(seed);
        if (perturb > 0) {  // at init many tensors are all ones: a mix-up between two of them would not show
            Rng prng(seed ^ 0x9e3779b97f4a7c15ull);
            for (float& p : fmodel.params) p *= float(1.0 + perturb * prng.normal());
            for (float& b : fmodel.buffers) b = float(0.05 * prng.normal());  // MoE biases: routing must use them
        }
        double loss = 0;
        std::vector<OutTensor> tensors;
        if (use_gpu) {
#ifdef __CUDACC__
            tensors = run_gpu(fmodel, inputs, targets, batch, Tn, &loss);
#endif
        } else if (use_float) {
            tensors = run(fmodel, inputs, targets, batch, Tn, &loss);
        } else {
            Model<double> dmodel(cfg);
            for (size_t i = 0; i < fmodel.params.size(); i++) dmodel.params[i] = double(fmodel.params[i]);
            for (size_t i = 0; i < fmodel.buffers.size(); i++) dmodel.buffers[i] = double(fmodel.buffers[i]);
            tensors = run(dmodel, inputs, targets, batch, Tn, &loss);
        }

        make_dirs(out);
        const std::vector<float> zeros(fmodel.params.size(), 0.0f);  // AdamW moments of a step-0 run
        save_run(out + "/model.safetensors", fmodel, zeros, zeros, TrainState{},
                 {{"dump.seed", std::to_string(seed)}, {"dump.data", data}, {"dump.perturb", std::to_string(perturb)}});
        std::map<std::string, std::string> meta = {
            {"dtype", use_float ? "float32" : "float64"}, {"device", use_gpu ? "gpu" : "cpu"},
            {"batch", std::to_string(batch)},
            {"seq_len", std::to_string(Tn)},             {"seed", std::to_string(seed)},
            {"arch", cfg.arch},                          {"pattern", cfg.pattern},
            {"fusion", to_string(cfg.fusion)},           {"tied", cfg.tied ? "true" : "false"}};
        write_safetensors(out + "/grads.safetensors", tensors, meta, !use_float);
        std::printf("%s%s %s pattern %s fusion %s %s: loss %.10f, %zu parameters → %s\n", use_gpu ? "gpu " : "",
                    use_float ? "float" : "double",
                    cfg.arch.c_str(), cfg.pattern.c_str(), to_string(cfg.fusion).c_str(),
                    cfg.tied ? "tied" : "untied", loss, fmodel.num_params(), out.c_str());
    } catch (const Error& e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
    return 0;
}
