#!/usr/bin/env bash
# Build and run bench/kernel_loops.c (x86-64, gcc) for each vector variant this CPU
# runs (or those named): the float32 forward kernel against plain loops doing the
# same per-element work, from memory and from L2. Flags from csrc/variants.txt.
#   bash bench/kernel_loops.sh [ROUNDS] [ISA ...]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-9}
shift || true
isas=("$@")
if [ ${#isas[@]} -eq 0 ]; then
    grep -qw avx2 /proc/cpuinfo && isas+=(avx2)
    grep -qw avx512f /proc/cpuinfo && isas+=(avx512)
fi
if [ ${#isas[@]} -eq 0 ]; then
    echo "kernel_loops: needs an x86-64 CPU with AVX2 or AVX-512 (and Linux); not this one" >&2
    exit 1
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
base="-std=c11 -O3 -Wall -Wextra -fno-math-errno -fopenmp -Icsrc -DFCE_DTYPE=32"
gcc $base -c csrc/fastce_planner.c -o "$out/planner.o"
for isa in "${isas[@]}"; do
    flags=$(awk -v isa="$isa" '$1 == isa { $1 = ""; $2 = ""; print }' csrc/variants.txt)
    gcc $base $flags -DFCE_ISA="$isa" -c csrc/fastce_kernel.c -o "$out/k_$isa.o"
    gcc $base $flags -DFCE_ISA="$isa" bench/kernel_loops.c "$out/k_$isa.o" "$out/planner.o" -lm \
        -o "$out/kernel_loops_$isa"
    "$out/kernel_loops_$isa" "$rounds"
    SMALL=1 "$out/kernel_loops_$isa" "$rounds"
done
