#!/usr/bin/env bash
# The code-placement experiment: the same kernel source built with its code shifted
# by 0, 16, 32 and 48 bytes (an assembler .skip before everything else in the
# object), each linked into bench/kernel_loops.c, run in alternating processes.
# The spread of the "kernel" line across the four builds is how much the forward's
# speed depends on where its hot loops land relative to 64-byte lines.
#   bash bench/placement.sh [ISA] [ROUNDS]      (default: avx512 if the CPU has it, else avx2; 3)
set -euo pipefail
cd "$(dirname "$0")/.."
isa=${1:-$(grep -qw avx512f /proc/cpuinfo && echo avx512 || echo avx2)}
rounds=${2:-3}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
base="-std=c11 -O3 -Wall -Wextra -fno-math-errno -fopenmp -Icsrc -DFCE_DTYPE=32"
flags=$(awk -v isa="$isa" '$1 == isa { $1 = ""; $2 = ""; print }' csrc/variants.txt)
gcc $base -c csrc/fastce_planner.c -o "$out/planner.o"
for pad in 0 16 32 48; do
    printf '__asm__(".text\\n.skip %d\\n");\n#include "fastce_kernel.c"\n' "$pad" > "$out/padded_$pad.c"
    gcc $base $flags -DFCE_ISA="$isa" -c "$out/padded_$pad.c" -o "$out/k_$pad.o" 2>/dev/null
    gcc $base $flags -DFCE_ISA="$isa" bench/kernel_loops.c "$out/k_$pad.o" "$out/planner.o" -lm \
        -o "$out/kl_$pad"
done
echo "placement ($isa, float32 forward, rows of 32768, 1 GiB from memory): kernel GB/s per padding"
for r in $(seq "$rounds"); do
    line="round $r:"
    for pad in 0 16 32 48; do
        gbs=$("$out/kl_$pad" 3 | awk '$1 == "kernel" { print $3 }')
        line="$line  +$pad: $gbs"
    done
    echo "$line"
done
