#!/usr/bin/env bash
# dev/check_reference.sh — the C++ CPU model against the PyTorch reference (dev/reference.py), for every
# architecture and every fusion axis: builds dev/dump_grads, dumps one forward + backward per case, checks
# them all with `reference.py check`, prints a summary table, and exits non-zero on any FAIL.
#
#   bash dev/check_reference.sh              # all cases (about a minute on 2 cores)
#   PYTHON=/tmp/venv-ref/bin/python bash dev/check_reference.sh
#   GPU=1 bash dev/check_reference.sh        # the GPU model instead (train.cu's kernels, fp32): a GPU machine
#
# With GPU=1 every case runs build/dump_grads_gpu --gpu (the nvcc build of dev/dump_grads.cpp, make
# build/dump_grads_gpu): logits, loss and every gradient of the GPU model, checked in float (fwd 1e-4, grads 1e-3)
# against PyTorch autograd on the same checkpoint and batch; the --float cases are then the same as the others.
#
# Needs torch (see dev/README.md). Environment: PYTHON (default .venv-ref/bin/python if present, else
# python3), BUILD (default build), OUT (default $BUILD/reference, or reference-gpu: one folder per case).
set -euo pipefail
cd "$(dirname "$0")/.."

BUILD=${BUILD:-build}
GPU=${GPU:-0}
OUT=${OUT:-$BUILD/reference$([ "$GPU" = 1 ] && echo -gpu)}
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv-ref/bin/python ]; then PYTHON=.venv-ref/bin/python; else PYTHON=python3; fi
fi
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "error: '$PYTHON' cannot import torch; install it (dev/README.md) or set PYTHON=/path/to/python" >&2
    exit 2
fi

# ---- build dump_grads when it is missing or older than its sources ----
BIN=$BUILD/dump_grads
DEVICE_FLAG=""
mkdir -p "$BUILD"
if [ "$GPU" = 1 ]; then
    BIN=$BUILD/dump_grads_gpu
    DEVICE_FLAG="--gpu"
    if [ ! -x "$BIN" ] || [ -n "$(find dev/dump_grads.cpp model data kernels -newer "$BIN" -name '*.[ch]*' -print -quit)" ]; then
        echo "building $BIN"
        make "$BIN"
    fi
elif [ ! -x "$BIN" ] || [ -n "$(find dev/dump_grads.cpp model data -newer "$BIN" -name '*.[ch]*' -print -quit)" ]; then
    echo "building $BIN"
    ${CXX:-g++} -std=c++17 -O2 -Wall -Wextra -fopenmp -I. -I.deps/include dev/dump_grads.cpp -o "$BIN"
fi

# ---- the cases: name | dump_grads flags. All on the tiny preset, B = 2, T = 11 (three SSD chunks of 4), and
# all but the first two with every parameter moved off its init (--perturb), so that norm weights, fusion
# scales and D are not all 1 (a mix-up of two such tensors would not show at init).
CASES=(
    "transformer-init|--arch transformer --perturb 0"
    "intra-final-init|--arch intra --perturb 0"
    "transformer|--arch transformer"
    "transformer-untied|--arch transformer --untied"
    "mamba2|--arch mamba2"
    "mamba2-groups2|--arch mamba2 --set ngroups=2"
    "inter|--arch inter"
    "inter-AMAM-untied|--pattern AMAM --untied"
    "mixed-MAHM|--pattern MAHM"
    "intra-final|--arch intra --fusion final"
    "intra-norm-none|--arch intra --fusion norm=none"
    "intra-scale-vector|--arch intra --fusion scale=vector"
    "intra-scale-scalar|--arch intra --fusion scale=scalar"
    "intra-op-add|--arch intra --fusion op=add"
    "intra-op-add-joint|--arch intra --fusion op=add,out=joint"
    "intra-op-diff-joint|--arch intra --fusion op=diff,out=joint"
    "intra-op-concat|--arch intra --fusion concat"
    "intra-value-shared|--arch intra --fusion value=shared"
    "intra-shared-gqa|--arch intra --fusion value=shared --set intra_heads=4 --set intra_kv_heads=2 --set intra_d_v=8"
    "intra-shared-concat|--arch intra --fusion norm=none,scale=vector,op=concat,value=shared,out=joint"
    "intra-shared-scalar-joint|--arch intra --fusion scale=scalar,op=add,value=shared,out=joint"
    "intra-hymba|--arch intra --fusion hymba"
    "intra-falcon|--arch intra --fusion falcon"
    "intra-untied|--arch intra --untied"
    "intra-groups2-chunk5|--arch intra --set ngroups=2 --set chunk=5"
    "intra-chunk16|--pattern HH --set chunk=16 --data random"
    "transformer-float|--arch transformer --float"
    "mamba2-float|--arch mamba2 --float"
    "intra-final-float|--arch intra --float"
    "intra-hymba-float|--arch intra --fusion hymba --untied --float --data random"
    "swa-window4-sink2|--pattern SAS --set window=4 --set sink=2"
    "swa-window3-sink0|--arch swa --set window=3 --set sink=0"
    "inter-moe|--arch inter --set moe=true --set n_experts=4"
    "intra-moe|--arch intra --set moe=true"
    "swa-moe-float|--arch swa --set window=3 --set sink=1 --set moe=true --float"
)

rm -rf "$OUT"
mkdir -p "$OUT"
dirs=()
for c in "${CASES[@]}"; do
    name=${c%%|*}
    flags=${c#*|}
    perturb="--perturb 0.2"
    [[ $flags == *--perturb* ]] && perturb=""
    # shellcheck disable=SC2086  # flags are words on purpose
    if ! "$BIN" --preset tiny --batch 2 --seq-len 11 --seed 5 $perturb $flags $DEVICE_FLAG --out "$OUT/$name" \
        > "$OUT/$name.dump.log" 2>&1; then
        echo "dump failed for $name ($flags):" >&2
        cat "$OUT/$name.dump.log" >&2
    fi
    dirs+=("$OUT/$name")  # a failed dump fails its check below
done

# ---- one Python process checks every case (torch is imported once) ----
status=0
"$PYTHON" dev/reference.py check --quiet "${dirs[@]}" > "$OUT/check.log" 2>&1 || status=$?

# ---- summary: one row per case from the RESULT lines ----
printf '%-28s %-8s %-10s %-10s %-5s %s\n' case dtype fwd_err grad_err result "worst gradient"
fails=0
for c in "${CASES[@]}"; do
    name=${c%%|*}
    line=$(grep "^RESULT $OUT/$name " "$OUT/check.log" || true)
    if [ -z "$line" ]; then
        printf '%-28s %-8s %-10s %-10s %-5s %s\n' "$name" "?" "-" "-" FAIL "(no result)"
        fails=$((fails + 1))
        continue
    fi
    # RESULT <dir> <PASS|FAIL> <dtype> fwd <e> grad <e> worst <name>
    read -r _ _ res dtype _ fwd _ grad _ worst <<< "$line"
    printf '%-28s %-8s %-10s %-10s %-5s %s\n' "$name" "$dtype" "$fwd" "$grad" "$res" "$worst"
    [ "$res" = PASS ] || fails=$((fails + 1))
done
if [ "$fails" -gt 0 ] || [ "$status" -ne 0 ]; then
    echo "FAIL: $fails of ${#CASES[@]} cases (details: $OUT/check.log)"
    grep -v "^RESULT" "$OUT/check.log" | head -50 || true
    exit 1
fi
echo "PASS: all ${#CASES[@]} cases agree$([ "$GPU" = 1 ] && echo " (the GPU model)") (double: 1e-9, float: fwd 1e-4, grads 1e-3)"
