#!/usr/bin/env bash
# moe_compare.sh [TRAINER] [STEPS] — each family with and without --moe (equal active parameters: each expert
# is half the dense FFN, a token uses the shared one and one routed one), same data, seed and schedule.
# Prints one line per run (final validation loss, tokens/s, the experts' shares at the end) and writes
# runs/moe/<family>[-moe]/log.csv. TRAINER defaults to build/train_gpu; any extra flags go in ARGS.
set -euo pipefail
trainer=${1:-build/train_gpu}
steps=${2:-1000}
args=${ARGS:-"--batch 32 --seq-len 256 --warmup 100 --lr 2e-3 --log-every 100 --eval-every 100 --ckpt-every 0 --sample-every 0 --sample-len 64"}
printf "%-12s %-4s %10s %12s  %s\n" family moe "val loss" "tok/s" "expert shares at the end (%)"
for family in transformer mamba2 inter intra; do
    for moe in "" "--moe"; do
        out=runs/moe/$family${moe:+-moe}
        # shellcheck disable=SC2086
        log=$("$trainer" --arch "$family" $moe --steps "$steps" $args --out "$out")
        val=$(grep -E '^val loss' <<<"$log" | tail -n 1 | awk '{print $3}' || true)
        rate=$(grep -E '^training throughput' <<<"$log" | awk '{print $3}' || true)  # train_gpu prints it
        shares=$(grep -E '^step ' <<<"$log" | tail -n 1 | sed -n 's/.*experts % //p' || true)
        printf "%-12s %-4s %10s %12s  %s\n" "$family" "${moe:+yes}" "$val" "${rate:-?}" "${shares:--}"
    done
done
