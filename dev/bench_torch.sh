#!/usr/bin/env bash
# bench_torch.sh OUT — the PyTorch baseline of the speed comparison (issue 9) in one command, on a GPU machine that
# has torch + triton but no internet: writes a hybridlm checkpoint of each family at preset 100m (one train_gpu step:
# only its config is used), then times dev/bench_torch.py on each (SDPA attention, mamba_ssm's Triton SSD from
# .whl/py, bf16 autocast), eager for every family first, then with --compile. A run that fails or passes TIMEOUT is
# a "failed:..." row and the script goes on. Writes OUT/torch.csv (one row a run, as it goes), OUT/logs/*.log, and
# prints the CSV. The checkpoints (~1.2 GB each at 100m, weights and AdamW moments) go to CKPT_DIR, not OUT.
#
#   bash dev/bench_torch.sh OUT                 from the repo root, with .whl/ and build/ there
#   MODES=eager bash dev/bench_torch.sh OUT1 && MODES=compile SELFCHECK=0 bash dev/bench_torch.sh OUT2   (two halves)
#
# Environment (defaults): PYTHON (python3), TRAINER (build/train_gpu), PRESET (100m), ARCHS (transformer mamba2 inter
# intra), MODES (eager compile; also compile-ro: torch.compile's mode "reduce-overhead", CUDA graphs), BATCH (8),
# SEQ_LEN (2048), STEPS (10), TIMEOUT (240 s per python run), ATTN (sdpa), SSD (triton), DTYPE (bf16), SELFCHECK
# (1: run --selfcheck first), CKPT_DIR (runs/bench_torch_ckpt, relative to the repo root; a checkpoint of the same
# PRESET and SEQ_LEN found there is reused).
# .whl/py holds einops and the trimmed mamba_ssm (ops/triton SSD only); .whl/py-fallback holds `packaging`, put on
# the path only when the interpreter lacks it.
set -euo pipefail

[ $# -eq 1 ] || { echo "usage: bash dev/bench_torch.sh OUT" >&2; exit 1; }
mkdir -p "$1"
out=$(cd "$1" && pwd)
cd "$(dirname "${BASH_SOURCE[0]}")/.."  # the repo root

PYTHON=${PYTHON:-python3}
TRAINER=${TRAINER:-build/train_gpu}
PRESET=${PRESET:-100m}
ARCHS=${ARCHS:-transformer mamba2 inter intra}
MODES=${MODES:-eager compile}
BATCH=${BATCH:-8}
SEQ_LEN=${SEQ_LEN:-2048}
STEPS=${STEPS:-10}
TIMEOUT=${TIMEOUT:-240}
ATTN=${ATTN:-sdpa}
SSD=${SSD:-triton}
DTYPE=${DTYPE:-bf16}
SELFCHECK=${SELFCHECK:-1}
CKPT_DIR=${CKPT_DIR:-runs/bench_torch_ckpt}
mkdir -p "$CKPT_DIR" "$out/logs"
CKPT_DIR=$(cd "$CKPT_DIR" && pwd)

pypath=$PWD/.whl/py
"$PYTHON" -c "import packaging.version" 2>/dev/null || pypath=$pypath:$PWD/.whl/py-fallback
export PYTHONPATH=$pypath${PYTHONPATH:+:$PYTHONPATH}

csv=$out/torch.csv
[ -e "$csv" ] && mv "$csv" "$csv.$(date +%Y%m%d-%H%M%S)"  # each run starts its own table
echo "impl,arch,pattern,batch,seq_len,ms_per_step,tokens_per_s,peak_gib,mfu" >"$csv"  # bench_torch.py's header

echo "== $(date -u '+%F %T') UTC, $(command -v nvidia-smi >/dev/null && nvidia-smi -L | head -n 1 || echo 'no nvidia-smi')"
timeout "$TIMEOUT" "$PYTHON" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch',
torch.__version__, '| triton', triton.__version__, '| cuda', torch.cuda.is_available())" || echo "(torch/triton import failed)"
timeout "$TIMEOUT" "$PYTHON" -c "import mamba_ssm.ops.triton.ssd_combined" \
    || echo "(mamba_ssm's Triton SSD does not import: --ssd triton runs will fail)"
if [ "$SELFCHECK" = 1 ]; then
    echo "== selfcheck (SDPA and, on a GPU, the Triton SSD against the reference)"
    timeout "$TIMEOUT" "$PYTHON" dev/bench_torch.py --selfcheck >"$out/logs/selfcheck.log" 2>&1 || true
    tail -n 4 "$out/logs/selfcheck.log"
fi

# (a) one checkpoint per family: its config is what bench_torch.py reads; FLOPs per token from the trainer's report
declare -A flops pattern
for arch in $ARCHS; do
    ckpt=$CKPT_DIR/$arch
    log=$out/logs/train-$arch.log
    if [ -s "$ckpt/model.safetensors" ] && [ -s "$ckpt/train.log" ] && [ -s "$ckpt/args" ] \
        && [ "$(cat "$ckpt/args")" = "$PRESET $SEQ_LEN" ]; then
        cp "$ckpt/train.log" "$log"
        echo "== $arch: reusing $ckpt/model.safetensors"
    else
        rm -rf "$ckpt"
        rc=0
        timeout 600 "$TRAINER" --preset "$PRESET" --arch "$arch" --steps 1 --batch 1 --seq-len "$SEQ_LEN" \
            --eval-batches 1 --sample-len 1 --out "$ckpt" >"$log" 2>&1 || rc=$?
        if [ $rc -ne 0 ]; then
            echo "== $arch: $TRAINER failed (rc $rc): $(tail -n 1 "$log")"
            continue
        fi
        cp "$log" "$ckpt/train.log"
        echo "$PRESET $SEQ_LEN" >"$ckpt/args"
        echo "== $arch: wrote $ckpt/model.safetensors"
    fi
    flops[$arch]=$(sed -n 's/^training FLOPs at L_ctx [0-9]*: \([0-9.e+-]*\) per token.*/\1/p' "$log" | head -n 1)
    pattern[$arch]=$(sed -n 's/^arch [a-z0-9]*, pattern \([AMHS]*\) .*/\1/p' "$log" | head -n 1)
    grep -E '^(arch|non-embedding|training FLOPs)' "$log" | sed 's/^/   /'
done

# (b) the timed runs: every family eager, then every family compiled (so a cut-short session keeps the eager table)
for mode in $MODES; do
    case $mode in
        eager) flag="" tag="" ;;
        compile) flag="--compile" tag="compile " ;;
        compile-ro) flag="--compile --compile-mode reduce-overhead" tag="compile=reduce-overhead " ;;
        *) echo "unknown mode '$mode'" >&2; exit 1 ;;
    esac
    for arch in $ARCHS; do
        label="torch attn=$ATTN ssd=$SSD $tag$DTYPE"
        log=$out/logs/bench-$arch-$mode.log
        ckpt=$CKPT_DIR/$arch/model.safetensors
        if [ ! -s "$ckpt" ]; then
            echo "$label,$arch,,$BATCH,$SEQ_LEN,failed:no-checkpoint,,," >>"$csv"
            continue
        fi
        rc=0
        # shellcheck disable=SC2086
        timeout "$TIMEOUT" "$PYTHON" dev/bench_torch.py --config "$ckpt" --batch "$BATCH" --seq-len "$SEQ_LEN" \
            --steps "$STEPS" --attn "$ATTN" --ssd "$SSD" --dtype "$DTYPE" ${flops[$arch]:+--flops-per-token "${flops[$arch]}"} \
            $flag --csv "$csv" >"$log" 2>&1 || rc=$?
        if [ $rc -eq 0 ]; then
            grep " ms/step, " "$log" | tail -n 1
        else
            why=$([ $rc -eq 124 ] && echo "timeout-${TIMEOUT}s" || echo "rc=$rc")
            echo "$label,$arch,${pattern[$arch]:-},$BATCH,$SEQ_LEN,failed:$why,,," >>"$csv"
            echo "$label: $arch FAILED ($why), see $log: $(grep -E 'Error|error' "$log" | tail -n 1 | cut -c1-200)"
        fi
    done
done

echo "== $csv"
if command -v column >/dev/null; then column -s, -t <"$csv"; else cat "$csv"; fi
