#!/usr/bin/env bash
# run.sh BINARY — runs a doctest binary and ends with the plain line "N passed, N failed"
# (counting test cases), keeping the binary's exit status.
set -o pipefail
log=$(mktemp)
"$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
line=$(grep -E '^\[doctest\] test cases:' "$log" | tail -n 1)
passed=$(echo "$line" | sed -E 's/.*\| *([0-9]+) passed.*/\1/')
failed=$(echo "$line" | sed -E 's/.*\| *([0-9]+) failed.*/\1/')
rm -f "$log"
if [ -z "$line" ]; then echo "0 passed, 1 failed"; exit 1; fi
echo "$passed passed, $failed failed"
exit $rc
