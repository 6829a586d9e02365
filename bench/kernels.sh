#!/usr/bin/env bash
# kernels.sh OUT — the per-kernel table of issue 9, on the device machine (build/dev/* built, .whl/ carried):
# our attention (fp32 and bf16-operand tensor-core kernels) and SSD (fp32; bf16 on the tensor cores, from fp32 and
# from bf16 tensors, the latter as Mamba-2 runs it under bf16 and as the Triton kernel is given them) against
# PyTorch's SDPA (flash and cuDNN backends) and mamba_ssm's Triton SSD on the same shapes over T, in one run. Each
# side prints `csv,` lines (dev/cuda/attention.cu's last section, dev/cuda/ssd.cu's timing, dev/bench_kernels.py);
# this joins them into OUT/attention.csv, OUT/ssd.csv and a table with PyTorch's fwd+bwd time over each of ours.
# Logs in OUT/.
# Environment: PYTHON (python3), SSD_TS (2048 4096 8192: the T of the 350m rows), ONLY (attention or ssd: that
# kernel alone, both sides).
set -u
[ $# -eq 1 ] || { echo "usage: bash bench/kernels.sh OUT" >&2; exit 1; }
out=$1
mkdir -p "$out"
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
PYTHON=${PYTHON:-python3}
SSD_TS=${SSD_TS:-2048 4096 8192}
ONLY=${ONLY:-}
case "$ONLY" in "" | attention | ssd) ;; *) echo "error: ONLY must be attention or ssd, got '$ONLY'" >&2; exit 1 ;; esac
for k in attention ssd; do  # the playgrounds this run needs
    [ -n "$ONLY" ] && [ "$ONLY" != "$k" ] && continue
    [ -x "build/dev/$k" ] || { echo "error: build/dev/$k not built (make dev)" >&2; exit 1; }
done

echo "== $(date -u '+%F %T') UTC, $(command -v nvidia-smi >/dev/null && nvidia-smi -L | head -n 1 || echo 'no nvidia-smi')"
if [ "$ONLY" != ssd ]; then
    build/dev/attention >"$out/attention.log" 2>&1 || echo "(build/dev/attention failed: see $out/attention.log)"
fi
# the 350m layer (Q = 256) over T, and the 100m one as the presets train it (Q = 64), B = 8, T = 2048
ssd_shapes=()
for T in $SSD_TS; do ssd_shapes+=("$((8192 / T)) $T 24 128 128 1 256"); done
ssd_shapes+=("8 2048 16 128 128 1 64")
[ "$ONLY" = attention ] && ssd_shapes=()
for shape in "${ssd_shapes[@]}"; do
    tag=$(echo "$shape" | tr ' ' '-')
    for v in 2 3 4; do  # the shipped fp32 kernels; on the tensor cores; and so on bf16 tensors (train_gpu under bf16)
        # shellcheck disable=SC2086  # the shape is seven numbers, split on purpose
        build/dev/ssd $v $shape >"$out/ssd-$tag-v$v.log" 2>&1 \
            || echo "(build/dev/ssd $v at $shape failed: see $out/ssd-$tag-v$v.log)"
    done
done
PYTHONPATH=$PWD/.whl/py${PYTHONPATH:+:$PYTHONPATH} "$PYTHON" dev/bench_kernels.py ${ONLY:+--only "$ONLY"} \
    >"$out/torch.log" 2>&1 \
    || echo "(dev/bench_kernels.py failed: see $out/torch.log)"

logs=("$out/torch.log")
[ "$ONLY" != ssd ] && logs+=("$out/attention.log")
[ "$ONLY" != attention ] && logs+=("$out"/ssd-*.log)
for k in ${ONLY:-attention ssd}; do  # OUT/attention.csv, OUT/ssd.csv: the header line of that kernel's columns, then its rows
    { grep -h "^csv,kernel" "${logs[@]}" | grep -m1 "$([ $k = ssd ] && echo ',P,' || echo ',Hkv,')"
      grep -h "^csv,$k," "${logs[@]}"; } | sed 's/^csv,//' >"$out/$k.csv"
done
"$PYTHON" dev/bench_kernels.py --join "${logs[@]}"
