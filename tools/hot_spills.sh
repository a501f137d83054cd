#!/usr/bin/env bash
# Where gcc left a hot loop's vectors in memory: the cpu decode kernel alone (tools/decode_harness.c)
# under `perf record`, then the hottest instructions of one item function that load or store a vector
# register on the stack or read one through %rip (a table or constant reloaded inside a loop).
#
#   bash tools/hot_spills.sh FUNCTION HARNESS-ARGS...      # from the repository root
#   bash tools/hot_spills.sh item_e4m3 gqa 1 4096 1 1 fp8_e4m3 300
#   bash tools/hot_spills.sh item_bf16.constprop.0 mla 1 4096 1 1 bf16 1500
#   CFLAGS=-DHAL_STAGED16 bash tools/hot_spills.sh item_int8.constprop.0 mla 1 4096 1 1 int8 300
#
# FUNCTION is the symbol as `nm` prints it (item_<format>, some with gcc's .constprop.0). Keep the
# arguments in cache (one layer, one thread) so that the samples are compute. Prints the instructions'
# shares of the function's samples (perf annotate; sample skid puts a slow instruction's cost on the
# next one) and their total. The speed notes' eighth round found three loops this way (a vector on
# the stack took 9-15% of its function's samples); a clean loop shows none above ~1%. Needs perf.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { sed -n '2,14p' "$0"; exit 2; }
fn=$1; shift
out=${OUT:-/tmp/hot_spills}
mkdir -p "$out"
flags="-O3 -g -march=native -fopenmp -std=c11 ${CFLAGS:-}"
stale=1  # rebuilt unless the last build had these flags and is newer than every source
if [ -x "$out/harness" ] && [ "$(cat "$out/flags" 2>/dev/null)" = "$flags" ]; then
    stale=0
    for f in tools/decode_harness.c backends/cpu/kernels/*.c backends/cpu/kernels/*.h; do
        [ "$f" -nt "$out/harness" ] && stale=1
    done
fi
if [ "$stale" = 1 ]; then
    # shellcheck disable=SC2086
    gcc $flags -I backends/cpu/kernels tools/decode_harness.c -o "$out/harness" -lm
    echo "$flags" > "$out/flags"
fi
if ! perf record -q -e cpu-clock -F 8000 -o "$out/perf.data" "$out/harness" "$@" > "$out/harness.txt" 2>&1; then
    cat "$out/harness.txt" >&2  # the harness's usage line, or perf's reason
    exit 2
fi
head -1 "$out/harness.txt"
perf annotate -i "$out/perf.data" --stdio -s "$fn" 2>/dev/null | grep -E '^\s+[0-9]+\.[0-9]+ :' > "$out/annotate.txt" || true
[ -s "$out/annotate.txt" ] || { echo "no samples in $fn (check the name: nm $out/harness | grep item_)"; exit 1; }
echo "hottest vector loads and stores on the stack or through %rip in $fn (% of its samples):"
grep -E 'mm[0-9]+' "$out/annotate.txt" | grep -E '\(%r[bs]p\)|%rip' | sort -rn | head -"${TOP:-10}" || true
grep -E 'mm[0-9]+' "$out/annotate.txt" | grep -E '\(%r[bs]p\)|%rip' \
    | awk '{s += $1} END {printf "total: %.1f%%\n", s}'
