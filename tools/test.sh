#!/usr/bin/env bash
# The test command (README; .ci/run runs exactly this). From the repository root:
#
#   bash tools/test.sh
#
# 1. tools/build_wheel.sh: the sdist, the wheel built from it, repaired by auditwheel.
# 2. A fresh virtual environment in which no C compiler can be found (CC=/bin/false, and
#    a PATH of links to every program on PATH except the C/C++ compilers); the wheel and
#    the test extra are installed there from binaries only (--only-binary :all:, so
#    nothing can be compiled behind our back).
# 3. The test suite against the installed package (FASTCE_TEST_INSTALLED=1: conftest.py
#    refuses to run if fastce was imported from anywhere but that venv's site-packages).
#    The tests that compile csrc/ (test_build.py) skip there for want of a compiler;
# 4. so they run next, in the same venv with the compiler back: they check the source
#    (C11, -Wall -Wextra clean, no AVX in the baseline variants), not the wheel.
# 5. tools/test_floor.sh: the declared floors (Python 3.10, NumPy 2.0.0).
# 6. tools/fuzz.sh (bounded) and tools/sanitize.sh (ASan + UBSan), when present.
# Each step prints its time. Any failure stops the run with a non-zero status.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
PY="${PYTHON:-python}"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
t0=$SECONDS
step() { echo; echo "=== tools/test.sh: $* ($((SECONDS - t0)) s so far)"; }

step "1. build the sdist and the wheel"
bash tools/build_wheel.sh "$TMP/dist"
WHEEL="$(ls "$TMP"/dist/fastce-*.whl)"

step "2. a fresh venv without a C compiler; install the wheel and the test extra"
"$PY" -m venv "$TMP/venv"
VPY="$TMP/venv/bin/python"
mkdir "$TMP/nocc"
IFS=: read -r -a dirs <<< "$PATH"
for d in "${dirs[@]}"; do
    [ -d "$d" ] || continue
    for f in "$d"/*; do
        name="${f##*/}"
        case "$name" in
            cc|c89|c99|cpp|c++|gcc|g++|tcc|icc|icx|*-gcc|*-gcc-[0-9]*|gcc-[0-9]*|*-g++|*-g++-[0-9]*|g++-[0-9]*|clang*|*-cc) continue ;;
        esac
        [ -e "$TMP/nocc/$name" ] || ln -s "$f" "$TMP/nocc/$name"
    done
done
NOCC_PATH="$TMP/venv/bin:$TMP/nocc"
run_nocc() { env PATH="$NOCC_PATH" CC=/bin/false CXX=/bin/false "$@"; }
run_nocc "$VPY" -c 'import shutil, sys
found = [c for c in ("cc", "gcc", "c++", "g++", "clang") if shutil.which(c)]
sys.exit(f"a C compiler is still on PATH: {found}" if found else 0)'
run_nocc "$VPY" -m pip install -q --disable-pip-version-check --only-binary :all: "$WHEEL[test]"

step "3. the test suite against the installed wheel (no compiler)"
run_nocc env FASTCE_TEST_INSTALLED=1 "$VPY" -m pytest -q -p no:cacheprovider tests

step "4. the source checks (tests/test_build.py) with the compiler"
env FASTCE_TEST_INSTALLED=1 PATH="$TMP/venv/bin:$PATH" "$VPY" -m pytest -q -p no:cacheprovider tests/test_build.py

step "5. the declared floors"
bash tools/test_floor.sh "$TMP/dist"/fastce-*.tar.gz

for tool in fuzz sanitize; do
    if [ -f "tools/$tool.sh" ]; then
        step "6. tools/$tool.sh"
        PYTHON="$VPY" bash "tools/$tool.sh"
    fi
done
echo; echo "=== tools/test.sh: all passed in $((SECONDS - t0)) s"
