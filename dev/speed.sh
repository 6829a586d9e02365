#!/usr/bin/env bash
# dev/speed.sh TRAINER ARCH [PRESET] — one short bf16 run of a GPU trainer build (B 8, T 2048, 12 steps): the mean
# tokens/s of steps 5..12 and the device memory in use after it, on one line. For A/B calls: run two builds
# alternately in one call, e.g.
#   for i in 1 2; do for b in build/var/train_gpu.a build/var/train_gpu.b; do bash dev/speed.sh $b mamba2; done; done
# (the bench/results entries "builds alternating within a call" were made this way).
set -uo pipefail
[ $# -ge 2 ] || { echo "usage: dev/speed.sh TRAINER ARCH [PRESET]" >&2; exit 2; }
bin=$1 arch=$2 preset=${3:-100m}
[ -x "$bin" ] || { echo "error: trainer '$bin' not found or not executable" >&2; exit 1; }
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
if ! "$bin" --preset "$preset" --arch "$arch" --batch 8 --seq-len 2048 --steps 12 --warmup 2 --log-every 1 \
    --eval-every 0 --eval-batches 1 --ckpt-every 0 --sample-len 1 --precision bf16 --out "$out/run" >"$out/log" 2>&1; then
    echo "$bin $arch $preset FAILED: $(tail -n 1 "$out/log")"
    exit 1
fi
mem=$(grep -m1 "device memory in use" "$out/log" | sed 's/device memory in use: //')
awk -F, -v b="$bin" -v a="$arch" -v p="$preset" -v m="$mem" 'NR > 1 && $1 >= 5 { s += $6; n++ }
    END { printf "%-28s %-12s %-5s %10.0f tok/s (n=%d)  mem %s\n", b, a, p, s / n, n, m }' "$out/run/log.csv"
