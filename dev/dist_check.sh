#!/usr/bin/env bash
# dist_check.sh [TRAINER] [STEPS] — data parallel on 2 GPUs against 1 GPU (issue 7), on a host with two GPUs.
#
# Same flags and global batch every time, so every run sees the same batches (kernels/dist.cuh's data rule):
#   g1        1 GPU
#   dp        2 GPUs, gradients all-reduced in 1 MB buckets during the backward
#   dp0       2 GPUs, one all-reduce after the backward (--bucket-mb 0): bitwise equal to dp
#   zero1     2 GPUs, ZeRO-1 (sharded moments): equal to dp up to the norm's summation order
#   resume    zero1 stopped at STEPS/2 (--stop-at), resumed on 1 GPU: a checkpoint from 2 GPUs goes on on 1
# Prints the largest train-loss difference of each against its reference, over all steps of log.csv, and
# "dist_check: N passed, N failed" (fp32 tolerances: 1e-4 between GPU counts, whose sums go in another order;
# 0 between the two 2-GPU exchanges; 1e-5 for ZeRO-1). Runs go to runs/dist/<name>.
set -euo pipefail
trainer=${1:-build/train_gpu}
steps=${2:-100}
args="--preset small --arch inter --batch 32 --seq-len 256 --steps $steps --warmup 10 --lr 2e-3 --log-every 25
      --eval-every 0 --ckpt-every 0 --sample-len 32"
rm -rf runs/dist
run2() {  # run2 NAME FLAGS...: two ranks
    local name=$1 id
    shift
    id=$(mktemp -u /tmp/hybridlm_dist.XXXXXX)
    # shellcheck disable=SC2086
    "$trainer" $args --out "runs/dist/$name" --nccl-init "fs:$id" --rank 1 --world 2 "$@" >"runs/dist/$name.r1.txt" 2>&1 &
    local pid=$!
    # shellcheck disable=SC2086
    "$trainer" $args --out "runs/dist/$name" --nccl-init "fs:$id" --rank 0 --world 2 "$@" >"runs/dist/$name.txt" 2>&1
    wait $pid
}
mkdir -p runs/dist
# shellcheck disable=SC2086
"$trainer" $args --out runs/dist/g1 >runs/dist/g1.txt 2>&1
run2 dp --bucket-mb 1
run2 dp0 --bucket-mb 0
run2 zero1 --zero1
run2 resume --zero1 --stop-at $((steps / 2))
# shellcheck disable=SC2086
"$trainer" $args --out runs/dist/resume --resume runs/dist/resume/model.safetensors >runs/dist/resume-1gpu.txt 2>&1
grep -h "^data:" runs/dist/dp.txt runs/dist/zero1.txt

pass=0 fail=0
compare() {  # compare RUN REFERENCE TOLERANCE: max |train_loss difference| over the steps both logged
    local d
    d=$(awk -F, 'NR == FNR { if (FNR > 1) ref[$1] = $2; next }
                 FNR > 1 && ($1 in ref) { x = $2 - ref[$1]; if (x < 0) x = -x; if (x > m) m = x; n++ }
                 END { printf "%.3g %d", m, n }' "runs/dist/$2/log.csv" "runs/dist/$1/log.csv")
    if awk -v d="${d% *}" -v n="${d#* }" -v tol="$3" -v want="$4" 'BEGIN { exit !(d <= tol && n == want) }'; then
        pass=$((pass + 1)); echo "PASS $1 vs $2: max |loss diff| ${d% *} over ${d#* } steps (tolerance $3)"
    else
        fail=$((fail + 1)); echo "FAIL $1 vs $2: max |loss diff| ${d% *} over ${d#* } steps (tolerance $3, $4 steps)"
    fi
}
compare dp g1 1e-4 "$steps"
compare dp0 dp 0 "$steps"
compare zero1 dp 1e-5 "$steps"
compare resume zero1 1e-4 "$steps"
for f in g1 dp zero1; do grep -h "^training throughput" "runs/dist/$f.txt" | sed "s/^/$f: /"; done
echo "dist_check: $pass passed, $fail failed"
[ "$fail" = 0 ]
