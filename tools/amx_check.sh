#!/usr/bin/env bash
# The cpu kernels' AMX tile paths (backends/cpu/kernels/amx.h) on the machine at hand, in one go:
#
#   bash tools/amx_check.sh            # from the repository root; OUT=DIR keeps the files (default /tmp/amx_check)
#
# On a CPU with AMX (Sapphire Rapids or later, Linux >= 5.16): the kernel alone from C
# (tools/decode_harness.c) built with the tiles and without (-DHAL_AMX_OFF), alternated three times
# per shape (MLA bf16, GQA int8 / fp8_e4m3 / bf16 at B8 x 4096 streamed, int8 B1 x 4096 in cache),
# then the full conformance level on the tiles and `hal bench --quick`. (int8 GQA decode's tiles, off in
# native builds, are timed from a build with -DHAL_AMX_INT8_DECODE=1.) Elsewhere: the conformance
# families that reach the tile code, on its C model (HAL_CPU_AMX=emulate), which checks correctness
# only. A device run fits in a few minutes (the harness needs only gcc; the suite and the bench run
# where hal and torch import).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/amx_check}
mkdir -p "$out"
kernels=backends/cpu/kernels
if ! grep -qw amx_tile /proc/cpuinfo; then
    echo "no AMX on this CPU ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs)): the tile code in its C model"
    HAL_CPU_AMX=emulate python -m hal conformance --backend cpu --level full --family mla,paged,quant
    exit 0
fi
threads=$(nproc)
gcc -O3 -march=native -fopenmp -std=c11 -I "$kernels" tools/decode_harness.c -o "$out/tiles" -lm
gcc -O3 -march=native -fopenmp -std=c11 -DHAL_AMX_OFF -I "$kernels" tools/decode_harness.c -o "$out/avx512" -lm
# int8 GQA decode's tile path is off in native builds (paged_decode.c, HAL_AMX_INT8_DECODE): timed here built in
gcc -O3 -march=native -fopenmp -std=c11 -DHAL_AMX_INT8_DECODE=1 -I "$kernels" tools/decode_harness.c -o "$out/tiles8" -lm
"$out/tiles" gqa 1 64 1 1 int8 1 | grep "AMX tiles"
for args in "mla 1 4096 57 $threads bf16 5" "gqa 8 4096 8 $threads int8 5" "gqa 8 4096 8 $threads fp8_e4m3 5" \
            "gqa 8 4096 8 $threads bf16 5" "gqa 1 4096 1 1 int8 100" "mla 1 4096 1 1 bf16 50"; do
    echo "== $args"
    tiles=tiles
    case $args in *int8*) tiles=tiles8 ;; esac
    for order in "avx512 $tiles" "$tiles avx512" "avx512 $tiles"; do
        for build in $order; do printf '%-7s ' "$build"; "$out/$build" $args | head -1; done
    done
done
if ! python -c "import hal, torch" 2>/dev/null; then  # (a lent device's host may have no torch, nor a way to fetch it)
    echo "hal or torch not importable here: the conformance suite and hal bench are left out"
    exit 0
fi
python -m hal conformance --backend cpu --level full --report "$out/conformance.json" | tail -4
python -m hal bench --backend cpu --quick --json "$out/bench.json" --plot "$out/bench.png" | tee "$out/bench.txt" | tail -40
