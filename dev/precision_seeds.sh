#!/usr/bin/env bash
# dev/precision_seeds.sh [TRAINER] — does bf16 training track fp32 (issue 9: within 1% after 500 steps)? One run
# per seed and precision, the same model, data and schedule; a single pair cannot tell a 1% drift from the seed's own
# spread, so it takes several seeds and compares the means. Prints each run's final validation loss, then per
# precision the mean and sd over the seeds and the per-seed difference from the first precision (mean, sd,
# largest); writes OUT/results.csv (arch,precision,seed,val_loss).
#
#   bash dev/precision_seeds.sh build/train_gpu                      (on the GPU machine; ten seeds of mamba2)
#   ARCH=transformer SEEDS="1337 2 3" bash dev/precision_seeds.sh
#
# Environment (defaults): ARCH (mamba2), STEPS (500), SEEDS (1337 2 3 4 5 6 7 8 9 10), PRECISIONS (fp32 bf16: each
# run gets --precision P), ARGS (extra trainer flags, e.g. --preset), OUT (runs/precision).
set -euo pipefail
trainer=${1:-build/train_gpu}
arch=${ARCH:-mamba2}
steps=${STEPS:-500}
seeds=${SEEDS:-1337 2 3 4 5 6 7 8 9 10}
precisions=${PRECISIONS:-fp32 bf16}
out=${OUT:-runs/precision}
[ -x "$trainer" ] || { echo "error: trainer '$trainer' not found or not executable (make train_gpu)" >&2; exit 1; }
mkdir -p "$out"
csv=$out/results.csv
echo "arch,precision,seed,val_loss" >"$csv"
for seed in $seeds; do
    for p in $precisions; do
        run=$out/$arch-$p-$seed
        # shellcheck disable=SC2086
        if ! "$trainer" --arch "$arch" --steps "$steps" --eval-every 100 --seed "$seed" --precision "$p" \
            --ckpt-every 0 --sample-every 0 --sample-len 16 ${ARGS:-} --out "$run" >"$run.log" 2>&1; then
            echo "error: $arch $p seed $seed failed: $(tail -n 1 "$run.log")" >&2
            exit 1
        fi
        val=$(grep -E '^val loss' "$run.log" | tail -n 1 | awk '{print $3}')
        [ -n "$val" ] || { echo "error: no validation loss in $run.log" >&2; exit 1; }
        echo "$arch,$p,$seed,$val" >>"$csv"
        printf "%-12s %-5s seed %-5s val loss %s\n" "$arch" "$p" "$seed" "$val"
    done
done
# The summary: per precision the mean and sd (n − 1) over the seeds; against the first precision, each seed's
# relative difference (mean, sd, largest in magnitude).
awk -F, -v first="${precisions%% *}" '
    NR == 1 { next }
    { v[$2, $3] = $4; s[$2] += $4; ss[$2] += $4 * $4; n[$2]++; if (!($2 in seen)) { seen[$2] = 1; order[++np] = $2 }
      if (!($3 in sseen)) { sseen[$3] = 1; seedlist[++ns] = $3 } }
    END {
        for (i = 1; i <= np; i++) {
            p = order[i]; m = s[p] / n[p]; sd = n[p] > 1 ? sqrt((ss[p] - n[p] * m * m) / (n[p] - 1)) : 0
            line = sprintf("%-5s mean %.4f  sd %.4f  (%d seeds)", p, m, sd, n[p])
            if (p != first) {
                k = 0; dm = 0; dss = 0; big = 0
                for (j = 1; j <= ns; j++) {
                    if (!((p, seedlist[j]) in v) || !((first, seedlist[j]) in v)) continue
                    d = 100 * (v[p, seedlist[j]] - v[first, seedlist[j]]) / v[first, seedlist[j]]
                    k++; dm += d; dss += d * d; if (d * d > big * big) big = d
                }
                dm /= k; dsd = k > 1 ? sqrt((dss - k * dm * dm) / (k - 1)) : 0
                line = line sprintf("  per seed against %s: mean %+.2f%%, sd %.2f%%, largest %+.2f%%", first, dm, dsd, big)
            }
            print line
        }
    }' "$csv"
echo "== $csv"
