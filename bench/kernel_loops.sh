#!/usr/bin/env bash
# Build and run bench/kernel_loops.c (x86-64 with AVX-512, gcc): the float32 forward
# kernel against plain loops doing the same per-element work, from memory and from L2.
#   bash bench/kernel_loops.sh [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
if ! grep -qw avx512f /proc/cpuinfo 2>/dev/null; then
    echo "kernel_loops: needs an x86-64 CPU with AVX-512 (and Linux); not this one" >&2
    exit 1
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
flags="-std=c11 -O3 -Wall -Wextra -fno-math-errno -fopenmp"
isa="-mavx512f -mavx512dq -mavx512bw -mavx512vl -mavx2 -mfma -ffp-contract=fast"
gcc $flags $isa -DFCE_DTYPE=32 -DFCE_ISA=avx512 -Icsrc -c csrc/fastce_kernel.c -o "$out/k.o"
gcc $flags $isa -Icsrc bench/kernel_loops.c "$out/k.o" -lm -o "$out/kernel_loops"
"$out/kernel_loops" "${1:-9}"
SMALL=1 "$out/kernel_loops" "${1:-9}"
