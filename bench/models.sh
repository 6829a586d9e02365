#!/usr/bin/env bash
# bench/models.sh OUT — training speed of hybridlm (build/train_gpu) and of the PyTorch baseline (dev/bench_torch.sh)
# on the same models, in one run and one table (issue 9): each architecture at each preset and sequence length, with
# TOKENS tokens a step (batch = TOKENS / T). Writes OUT/models.csv and prints it as a table.
#
#   bash bench/models.sh bench/results/run           (from the repo root, on the GPU machine; `make bench_models`)
#
# Columns: impl, arch, preset, batch, seq_len, ms_per_step, tokens_per_s, peak_gib, mfu. hybridlm's tokens/s is the
# mean of log.csv's per-step figures after the first WARM steps; its memory is what the device holds at the end (our
# buffers are plain cudaMallocs); PyTorch's is torch.cuda.max_memory_allocated. MFU = tokens/s × training FLOPs per
# token (DESIGN.md's formula, as the trainer prints it) / PEAK_TFLOPS (default 989, the H100/H200 dense bf16 peak,
# for both sides, whatever precision they run in).
# Environment (defaults): ARCHS (transformer mamba2 inter intra), PRESETS (100m 350m), SEQ_LENS (2048 8192),
# TOKENS (16384), STEPS (12), WARM (3), PRECISIONS (fp32 bf16: train_gpu --precision; bf16-ssdfp32: bf16 with
# --no-ssd-tensor-cores), TORCH (1: also the PyTorch
# baseline; MODES, DTYPE… as dev/bench_torch.sh),
# TRAINER (build/train_gpu), PEAK_TFLOPS (989). A run that fails is a "failed" row; the script goes on.
set -uo pipefail
[ $# -eq 1 ] || { echo "usage: bash bench/models.sh OUT" >&2; exit 1; }
mkdir -p "$1"
out=$(cd "$1" && pwd)
cd "$(dirname "${BASH_SOURCE[0]}")/.."  # the repo root
ARCHS=${ARCHS:-transformer mamba2 inter intra}
PRESETS=${PRESETS:-100m 350m}
SEQ_LENS=${SEQ_LENS:-2048 8192}
TOKENS=${TOKENS:-16384}
STEPS=${STEPS:-12}
WARM=${WARM:-3}
TORCH=${TORCH:-1}
TRAINER=${TRAINER:-build/train_gpu}
PRECISIONS=${PRECISIONS:-fp32 bf16}
PEAK_TFLOPS=${PEAK_TFLOPS:-989}
csv=$out/models.csv
echo "impl,arch,preset,batch,seq_len,ms_per_step,tokens_per_s,peak_gib,mfu" >"$csv"
mkdir -p "$out/logs"
for preset in $PRESETS; do
    for T in $SEQ_LENS; do
        B=$((TOKENS / T))
        [ "$B" -ge 1 ] || { echo "TOKENS $TOKENS < seq-len $T" >&2; exit 1; }
        for arch in $ARCHS; do
          for prec in $PRECISIONS; do
            run=$out/runs/$preset-$T-$arch-$prec log=$out/logs/hybridlm-$preset-$T-$arch-$prec.txt
            pflags=(--precision "$prec")
            [ "$prec" = bf16-ssdfp32 ] && pflags=(--precision bf16 --no-ssd-tensor-cores)
            "$TRAINER" --preset "$preset" --arch "$arch" --batch "$B" --seq-len "$T" --steps "$STEPS" --warmup 2 \
                --log-every 1 --eval-every 0 --eval-batches 1 --ckpt-every 0 --sample-len 1 "${pflags[@]}" \
                --out "$run" >"$log" 2>&1
            rc=$?
            flops=$(sed -n 's/^training FLOPs at L_ctx [0-9]*: \([0-9.e+]*\) per token.*/\1/p' "$log" | head -n 1)
            mem=$(sed -n 's/^device memory in use: \([0-9.]*\) GiB.*/\1/p' "$log")
            if [ $rc -ne 0 ] || [ ! -s "$run/log.csv" ]; then
                echo "hybridlm $prec,$arch,$preset,$B,$T,failed:rc=$rc,,," >>"$csv"
                echo "hybridlm: $preset $arch T=$T failed (rc $rc): $(tail -n 1 "$log")"
            else
                awk -F, -v warm="$WARM" -v B="$B" -v T="$T" -v f="${flops:-0}" -v peak="$PEAK_TFLOPS" -v mem="${mem:-nan}" \
                    -v arch="$arch" -v preset="$preset" -v prec="$prec" '
                    NR > 1 && $1 > warm { s += $6; n++ }
                    END { tok = s / n; printf "hybridlm %s,%s,%s,%d,%d,%.3f,%.0f,%s,%.4f\n", prec, arch, preset, B, T,
                          1e3 * B * T / tok, tok, mem, f * tok / (peak * 1e12) }' "$run/log.csv" >>"$csv"
                tail -n 1 "$csv"
            fi
            rm -f "$run/model.safetensors"  # a checkpoint of weights and moments: GBs we do not need
          done
        done
        if [ "$TORCH" = 1 ]; then
            PRESET=$preset SEQ_LEN=$T BATCH=$B ARCHS=$ARCHS SELFCHECK=0 TRAINER=$TRAINER \
                bash dev/bench_torch.sh "$out/torch-$preset-$T" >"$out/logs/torch-$preset-$T.txt" 2>&1
            tail -n +2 "$out/torch-$preset-$T/torch.csv" | awk -F, -v OFS=, -v preset="$preset" '{ $3 = preset; print }' \
                >>"$csv"
        fi
    done
done
echo "== $csv"
if command -v column >/dev/null; then column -s, -t <"$csv"; else cat "$csv"; fi
