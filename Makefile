# hybridlm — build, test and train. `make test` runs the CPU suite (and compiles the CUDA code
# when there is any); `make deps` installs the Debian packages the build needs.

CXX      ?= g++
NVCC     ?= nvcc
CXXFLAGS ?= -std=c++17 -O3 -Wall -Wextra -fopenmp
# .deps/include holds copies of the header-only deps on machines without the Debian packages; -isystem, as for the
# packages' /usr/include, so that their own warnings stay theirs (stb's fall-through at -O0 in the compile check)
INCLUDES := -I. -isystem .deps/include
# sm_90a (H100/H200): the attention's wgmma kernels need the arch-specific target (kernels/wgmma.cuh). For another
# GPU set NVFLAGS with its -arch: the wgmma products then compile to traps and the mma.sync kernels run instead.
NVFLAGS  ?= -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a -Xcompiler -Wall,-Wextra,-fopenmp
# The compile check (`make cuda_check`, part of `make test`) builds objects that are never run: it keeps every stage
# (front end, cicc, ptxas for sm_90a, the host compiler with the warnings) but optimizes little, which makes nvcc
# 2.7x faster (test/test_gpu_model.cu: 108 s -> 41 s here). Binaries that run use NVFLAGS. Unoptimized, ptxas reports
# performance losses the real builds do not have (wgmma serialized across calls not inlined): nvcheck drops those
# info lines (C75xx) and passes every error and warning on.
NVCHECKFLAGS ?= $(subst -O3,-O0 -Xcicc -O1 -Xptxas -O0,$(NVFLAGS))
nvcheck = $(NVCC) $(NVCHECKFLAGS) $(INCLUDES) $(1) -c $< -o $@ 2>$@.err; rc=$$?; \
	grep -v '^ptxas info *: (C75' $@.err >&2; rm -f $@.err; exit $$rc
BUILD    := build

HEADERS   := $(wildcard model/*.h data/*.h test/*.h dev/study/*.h)
TEST_SRCS := $(wildcard test/*.cpp)
TEST_OBJS := $(TEST_SRCS:%.cpp=$(BUILD)/%.o)
CUDA_SRCS := $(wildcard *.cu dev/cuda/*.cu dev/study/*.cu test/*.cu)

.PHONY: all test deps clean cuda_check test_gpu

all: $(BUILD)/test_cpu

# ---- dependencies (Debian packages; headers only, except OpenMP) ----
DEB_PACKAGES := libcli11-dev doctest-dev libstb-dev libomp-dev
deps:
	@missing=""; for pkg in $(DEB_PACKAGES); do \
	  dpkg -s $$pkg >/dev/null 2>&1 || missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ]; then echo "installing:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq $$missing >/dev/null || \
	  { echo "error: could not install$$missing (run as root or with sudo)"; exit 1; }; \
	else echo "deps: all present"; fi

# ---- CPU test suite ----
$(BUILD)/%.o: %.cpp $(HEADERS)
	@mkdir -p $(dir $@)
	$(CXX) $(CXXFLAGS) $(INCLUDES) -c $< -o $@

$(BUILD)/test_cpu: $(TEST_OBJS)
	$(CXX) $(CXXFLAGS) $^ -o $@

test: $(BUILD)/test_cpu $(BUILD)/study_cpu $(BUILD)/dump_grads cuda_check
	@OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} bash test/run.sh $(BUILD)/test_cpu

# ---- GPU test suite (device machine): every kernel against the CPU reference ----
GPU_TEST_SRCS := test/gpu_main.cu $(wildcard test/test_gpu_*.cu)
KERNEL_HEADERS := $(wildcard kernels/*.cuh)
CUDA_HEADERS := $(KERNEL_HEADERS) $(wildcard test/*.cuh dev/cuda/*.cuh)
$(BUILD)/test_gpu: $(GPU_TEST_SRCS) $(HEADERS) $(CUDA_HEADERS)
	@mkdir -p $(BUILD)
	$(NVCC) $(NVFLAGS) $(INCLUDES) $(GPU_TEST_SRCS) -o $@ -lcublas

test_gpu: $(BUILD)/test_gpu
	@bash test/run.sh $(BUILD)/test_gpu

# `make sanitize` (device machine): the GPU suite under compute-sanitizer, one process per test case in
# parallel; each tool ends with its own "N passed, N failed".
SANITIZE_TOOLS ?= memcheck racecheck
.PHONY: sanitize
sanitize: $(BUILD)/test_gpu
	@for t in $(SANITIZE_TOOLS); do echo "==== compute-sanitizer --tool $$t"; \
	  bash test/sanitize.sh $(BUILD)/test_gpu $$t || exit 1; done

# ---- the CPU trainer ----
.PHONY: train train_cpu
$(BUILD)/train_cpu: train_cpu.cpp $(HEADERS)
	@mkdir -p $(dir $@)
	$(CXX) $(CXXFLAGS) $(INCLUDES) $< -o $@

train_cpu: $(BUILD)/train_cpu

# test/test_trainer.cpp runs the trainer binary end to end, so it is built before the suite
$(BUILD)/test_cpu: | $(BUILD)/train_cpu

# `make train`: install what is missing, build, then train the default small intra-layer hybrid on
# tinyshakespeare, ending with a sample: on the GPU when one is present (make train_gpu), else on the CPU
# (a few minutes on 2 cores). TRAIN_ARGS adds flags.
HAVE_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
train:
	@$(MAKE) --no-print-directory deps
ifeq ($(HAVE_GPU),1)
	@$(MAKE) --no-print-directory train_gpu
else
	@$(MAKE) --no-print-directory $(BUILD)/train_cpu
	$(BUILD)/train_cpu $(TRAIN_ARGS)
endif

# ---- the GPU trainer (device machine): build/train_gpu from train.cu ----
# The GPU's defaults: 16× the CPU's tokens per step (32 × 256) for 1000 steps (2000 overfit: README); same model, same data.
GPU_TRAIN_ARGS ?= --batch 32 --seq-len 256 --steps 1000 --warmup 100 --lr 2e-3 --log-every 100 --eval-every 200 \
                  --ckpt-every 500 --sample-every 500 --out runs/gpu
# `make train_gpu NGPU=2`: NGPU processes on this host, one per GPU (data parallel, kernels/dist.cuh), meeting
# through a fresh id file; --batch is the global batch (the same loss curve as one GPU with the same flags). If a
# rank fails the others are stopped, and the exit status is non-zero.
NGPU ?= 1
.PHONY: train_gpu
$(BUILD)/train_gpu: train.cu $(HEADERS) $(KERNEL_HEADERS)
	@mkdir -p $(dir $@)
	$(NVCC) $(NVFLAGS) $(INCLUDES) $< -o $@ -lcublas -lnccl

train_gpu: SHELL := /bin/bash
train_gpu: $(BUILD)/train_gpu
ifeq ($(NGPU),1)
	$(BUILD)/train_gpu $(GPU_TRAIN_ARGS) $(TRAIN_ARGS)
else
	@id=$$(mktemp -u /tmp/hybridlm_nccl_id.XXXXXX); pids=(); \
	echo "$(NGPU) ranks: $(BUILD)/train_gpu $(GPU_TRAIN_ARGS) $(TRAIN_ARGS) --nccl-init fs:$$id --rank R --world $(NGPU)"; \
	for ((r = 0; r < $(NGPU); r++)); do \
	  $(BUILD)/train_gpu $(GPU_TRAIN_ARGS) $(TRAIN_ARGS) --nccl-init fs:$$id --rank $$r --world $(NGPU) & pids+=($$!); \
	done; \
	rc=0; while [ $${#pids[@]} -gt 0 ]; do sleep 1; \
	  for i in "$${!pids[@]}"; do kill -0 $${pids[i]} 2>/dev/null && continue; \
	    wait $${pids[i]} || { [ $$rc != 0 ] || kill "$${pids[@]}" 2>/dev/null; rc=1; }; unset "pids[i]"; \
	  done; \
	done; rm -f "$$id" "$$id.tmp"; exit $$rc
endif

# ---- dev/cuda playgrounds (device machine): `make dev/cuda/<kernel>` builds build/dev/<kernel> from
# dev/cuda/<kernel>.cu; `make dev` builds them all. Run them as ./build/dev/<kernel> (see each file's header).
DEV_SRCS    := $(wildcard dev/cuda/*.cu)
DEV_TARGETS := $(DEV_SRCS:.cu=)
.PHONY: dev $(DEV_TARGETS)
$(BUILD)/dev/%: dev/cuda/%.cu $(HEADERS) $(CUDA_HEADERS)
	@mkdir -p $(dir $@)
	$(NVCC) $(NVFLAGS) $(INCLUDES) $< -o $@ -lcublas
$(DEV_TARGETS): dev/cuda/%: $(BUILD)/dev/%
dev: $(DEV_SRCS:dev/cuda/%.cu=$(BUILD)/dev/%)

# `make bench` (device machine, with .whl/ carried): issue 9's tables against PyTorch in one run, into
# bench/results/<date>/ — the per-kernel table (bench_kernels), then training speed of every architecture
# (bench_models). `make bench_dev`: every playground in turn — each checks its versions against the CPU and
# prints their timings. Benchmarks never assert a time.
.PHONY: bench bench_dev
bench: bench_kernels bench_models
bench_dev: dev
	@for b in $(DEV_SRCS:dev/cuda/%.cu=$(BUILD)/dev/%); do echo "==== $$b"; $$b || exit 1; done

# ---- training speed against PyTorch (issue 9), on the device machine with .whl/ carried (dev/bench_torch.sh):
# every architecture at 100m and 350m, T = 2048 and 8192, hybridlm and PyTorch in one table (bench/models.sh;
# ARCHS, PRESETS, SEQ_LENS, TOKENS, TORCH=0 … narrow it) into bench/results/<date>/models.csv
.PHONY: bench_models
bench_models: $(BUILD)/train_gpu
	bash bench/models.sh bench/results/$$(date +%F)

# ---- the per-kernel table (issue 9): our attention and SSD beside PyTorch's SDPA (flash, cuDNN) and mamba_ssm's
# Triton SSD over T, one run (bench/kernels.sh) into bench/results/<date>/{attention,ssd}.csv
.PHONY: bench_kernels
bench_kernels: dev
	bash bench/kernels.sh bench/results/$$(date +%F)

# dev/dump_grads (for dev/check_reference.sh, the PyTorch comparison): built by `make test` so it keeps compiling;
# the nvcc build of the same file adds --gpu (GPU=1 bash dev/check_reference.sh: train.cu's model against PyTorch)
$(BUILD)/dump_grads: dev/dump_grads.cpp $(HEADERS)
	@mkdir -p $(dir $@)
	$(CXX) $(CXXFLAGS) $(INCLUDES) $< -o $@
$(BUILD)/dump_grads_gpu: dev/dump_grads.cpp $(HEADERS) $(KERNEL_HEADERS)
	@mkdir -p $(dir $@)
	$(NVCC) $(NVFLAGS) $(INCLUDES) -x cu $< -o $@ -lcublas

# ---- the study (dev/study, issue 6): `make study` on the device machine runs every family into docs/study;
# `make study_cpu` builds the CPU smoke version (build/study_cpu [out]: tiny models, under a minute).
.PHONY: study study_cpu
$(BUILD)/study_cpu: dev/study/study_cpu.cpp $(HEADERS)
	@mkdir -p $(dir $@)
	$(CXX) $(CXXFLAGS) $(INCLUDES) $< -o $@
study_cpu: $(BUILD)/study_cpu
$(BUILD)/study: dev/study/study.cu $(HEADERS) $(CUDA_HEADERS)
	@mkdir -p $(dir $@)
	$(NVCC) $(NVFLAGS) $(INCLUDES) $< -o $@ -lcublas
study: $(BUILD)/study
	$(BUILD)/study --out docs/study $(STUDY_ARGS)

# Compile check of every CUDA source (no GPU needed): one object each (so `make -j` compiles them side by side and
# an unchanged file is not compiled again), nothing is run.
CUDA_CHECK_OBJS := $(CUDA_SRCS:%.cu=$(BUILD)/cuda_check/%.o)
$(BUILD)/cuda_check/%.o: %.cu $(HEADERS) $(CUDA_HEADERS)
	@mkdir -p $(dir $@)
	@echo "nvcc -c $<"
	@$(call nvcheck)
$(BUILD)/cuda_check/dev/dump_grads_gpu.o: dev/dump_grads.cpp $(HEADERS) $(KERNEL_HEADERS)
	@mkdir -p $(dir $@)
	@echo "nvcc -c -x cu $<"
	@$(call nvcheck,-x cu)
cuda_check: $(CUDA_CHECK_OBJS) $(BUILD)/cuda_check/dev/dump_grads_gpu.o
	@[ -n "$(CUDA_SRCS)" ] || echo "cuda_check: no CUDA sources yet"

clean:
	rm -rf $(BUILD)
