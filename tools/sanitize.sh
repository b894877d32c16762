#!/usr/bin/env bash
# fastce under AddressSanitizer + UndefinedBehaviorSanitizer, in one command.
#
#   bash tools/sanitize.sh                   # the default test selection (below)
#   bash tools/sanitize.sh tests/test_grad.py -k avx2   # any pytest arguments instead
#
# What it does
#   1. Copies this checkout (tracked and untracked-but-not-ignored files, i.e. your
#      working tree without build/, *.so, _core.c) into a temporary directory: nothing
#      is built or written in the repository.
#   2. Builds a wheel there with gcc and
#        CFLAGS="-fsanitize=address,undefined -fno-omit-frame-pointer
#                -fno-sanitize-recover=undefined -O2 -fno-tree-pta -g1"
#      (LDFLAGS: -fsanitize=...)
#      (pip, with build isolation: setuptools, Cython and NumPy 2.x from PyPI or pip's
#      cache, as tools/build_wheel.sh does). setuptools puts CFLAGS into the compiler
#      command itself (compiler_so), so the kernel objects that setup.py compiles with
#      self.compiler.compile get them as well as the Cython module; this script checks
#      that: every object file must call __asan_report_* and __ubsan_handle_*, and
#      _core*.so must need libasan and libubsan, or it stops. (-g1: line tables for
#      the reports' stack traces; it overrides Python's -g and saves ~25% of the build;
#      -fno-tree-pta roughly halves the UBSan compiles, see SAN below.)
#      setup.py runs the compiles one per CPU at a time.
#   3. Installs the wheel (--no-deps) into a temporary --target directory put first on
#      PYTHONPATH, and runs pytest from the copy with $PYTHON (default `python`: it
#      must have the test extra, pytest and torch==2.13.0; tools/test.sh passes its
#      venv). Your environment is not modified. Under the run:
#        LD_PRELOAD=$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)
#        ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:abort_on_error=0
#        UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
#        PYTHONMALLOC=malloc   (Python objects through malloc too, so ASan sees the
#                               binding's object handling, not only the array buffers)
#        pytest --capture=sys  (pytest's default fd capture would swallow the reports,
#                               which the runtimes write to fd 2, with the process)
#      detect_leaks=0: CPython (and torch, NumPy) keep memory until exit by design.
#      The preload and options are inherited by the tests' subprocesses (test_threads,
#      test_isa start Python children, and every such test asserts on their exit
#      status, which a report makes non-zero). (log_path would also catch reports of
#      children whose status nobody checks, but with gcc 12's ASan and UBSan runtimes
#      together a halting UBSan report then goes nowhere, not even to stderr: unused.)
#   4. Exits non-zero if pytest fails (a report aborts the process: halt_on_error,
#      -fno-sanitize-recover) OR if its output holds any report ("runtime error:",
#      "ERROR: AddressSanitizer", "SUMMARY: ...Sanitizer"); prints each kind and place
#      with its count, and the time taken.
#   5. Then (SANITIZE_FUZZ_SECONDS, default 60; 0 skips it) tools/fuzz.sh's harness and
#      oracle run on this build, so every fuzzed input also runs under ASan + UBSan:
#      the suite passes no unaligned weight, for one, and the fuzzer does. atheris's
#      coverage feedback does not survive the preloaded gcc runtime (which provides the
#      coverage symbols itself), so the harness runs in its blind mode
#      (FUZZ_RANDOM_SECONDS: the seeds, then random and byte-flipped inputs); atheris is
#      put into a temporary --target directory when $PYTHON lacks it. A report, a crash
#      or an oracle finding fails the script; the input is printed (base64; replay:
#      python fuzz/fuzz_cross_entropy.py <file>). tools/fuzz.sh does the guided fuzzing.
#
# torch under ASan: torch 2.13.0+cpu imports and runs under the preloaded gcc ASan
# runtime with no special option (its CPU allocator is plain malloc/posix_memalign,
# intercepted by ASan; no jemalloc in the CPU wheels). protect_shadow_gap=0 is only
# needed by CUDA builds, so it is not set. The tests comparing with torch therefore
# run (torch itself is not instrumented; only fastce is).
#
# The default selection: tests/ except
#   test_build.py  compiles csrc/ with `cc` itself to check warnings and instructions:
#                  it tests the compiler's output, not this sanitized build (and every
#                  gcc it starts would run under the preloaded ASan: ~3.5 min);
#   test_bench.py  timings and the jax/torch.compile peers: no kernel paths that the
#                  rest does not run, ~2 min under ASan;
#   test_scale.py  its leak test measures RSS, which ASan's quarantine of freed memory
#                  inflates by design (the >2**31 test is opt-in and needs 10 GB).
# Every remaining test runs once per ISA variant built (by default scalar and the widest
# this CPU runs, see SANITIZE_ISAS below: the autouse fixture in tests/conftest.py).
#
# Time on 2 cores (Zen 5, CI of 2026-12-02): build 4.9 min (-O2, 2 compiles at a time),
# the default tests 4 min (10813 tests), the fuzzing 1 min: ~10 min.
# Bounds: SANITIZE_BUILD_TIMEOUT (default 1200 s) and SANITIZE_TEST_TIMEOUT (default
# 1200 s); past them the step is killed and the script fails.
# Knobs: SANITIZE_KEEP=1 keeps the temporary directory (and says where);
# SANITIZE_RECOVER=1 is a survey: recoverable checks, halt_on_error=0, every distinct
# report listed in one run (still exit status 1 if any); SANITIZE_EXTRA_CFLAGS adds
# compiler flags (e.g. -fno-sanitize=signed-integer-overflow to set one check aside).
#
# Not covered: LeakSanitizer (off, see above); MemorySanitizer/ThreadSanitizer (need
# clang and an instrumented CPython/OpenMP); torch's and NumPy's own code (not
# instrumented); the neon variant (arm64 only). gcc only (its libasan is preloaded).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
CC="${CC:-gcc}"
export CC
BUILD_TIMEOUT="${SANITIZE_BUILD_TIMEOUT:-1200}"
TEST_TIMEOUT="${SANITIZE_TEST_TIMEOUT:-1200}"
TMP="$(mktemp -d "${TMPDIR:-/tmp}/fastce-sanitize.XXXXXX")"
cleanup() {
    if [ "${SANITIZE_KEEP:-0}" = 1 ]; then echo "sanitize.sh: kept $TMP"; else rm -rf "$TMP"; fi
}
trap cleanup EXIT
t0=$SECONDS
step() { echo; echo "=== sanitize.sh: $* ($((SECONDS - t0)) s so far)"; }
die() { echo "sanitize.sh: $*" >&2; exit 1; }

if [ "${SANITIZE_RECOVER:-0}" = 1 ]; then
    # survey mode: keep going after a report, to list them all (exit status still 1)
    SAN="-fsanitize=address,undefined -fno-omit-frame-pointer -fsanitize-recover=address,undefined"
    HALT=0
else
    SAN="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined"
    HALT=1
fi
# -fno-tree-pta: GCC 12's points-to analysis takes ~40 % of a UBSan-instrumented kernel
# compile (the inlined paths are large): measured on Zen 4, one avx512 float32 object,
# 162 s -> 91 s with UBSan alone. It is an optimisation analysis only (no check is lost).
# -O2 (setup.py takes the -O level of CFLAGS): quicker to build than -O3, and the lowest
# level at which GCC forms the FMAs the exp's accuracy relies on (setup.py, C_FLAGS).
SAN="$SAN -O2 -fno-tree-pta ${SANITIZE_EXTRA_CFLAGS:-}"
# The variants instrumented: scalar (the generic vector code at one lane) and the widest
# this CPU runs (its intrinsic leaves), by default (setup.py's FASTCE_ISAS=native);
# SANITIZE_ISAS=all builds every one, or name them (SANITIZE_ISAS=scalar,sse2,avx2).
# Every variant shares the paths' code but for simd.h's leaves; the half-precision
# kernels doubled the objects, and an instrumented build of all of them took 700 s of
# CI on Zen 3.
SANITIZE_ISAS="${SANITIZE_ISAS:-native}"
[ "$SANITIZE_ISAS" = all ] && SANITIZE_ISAS=
LIBASAN="$("$CC" -print-file-name=libasan.so)"
LIBUBSAN="$("$CC" -print-file-name=libubsan.so)"
[ -f "$LIBASAN" ] && [ -f "$LIBUBSAN" ] ||
    die "$CC has no libasan.so/libubsan.so (got '$LIBASAN', '$LIBUBSAN'); this script needs gcc with its sanitizer runtimes"
"$PY" -c 'import pytest, torch, numpy' 2>/dev/null ||
    die "$PY lacks pytest/torch/numpy: install the test extra (pip install 'fastce[test]' deps) or set PYTHON"

step "1. copy the working tree to $TMP/src"
mkdir "$TMP/src"
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git ls-files -z --cached --others --exclude-standard |
        while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done |
        tar --null -T - -cf - | tar -xf - -C "$TMP/src"
else
    tar --exclude=./build --exclude=./dist --exclude='*.so' --exclude='*.o' \
        --exclude=./src/fastce/_core.c -cf - . | tar -xf - -C "$TMP/src"
fi
rm -rf "$TMP/src/build"

step "2. build the sanitized wheel (CC=$CC, log: build.log)"
if ! (cd "$TMP/src" &&
      CC="$CC" CFLAGS="${CFLAGS:+$CFLAGS }$SAN -g1" FASTCE_ISAS="$SANITIZE_ISAS" \
      LDFLAGS="${LDFLAGS:+$LDFLAGS }-fsanitize=address,undefined" \
      timeout --kill-after=30 "$BUILD_TIMEOUT" \
      "$PY" -m pip wheel -v --no-deps --disable-pip-version-check --wheel-dir "$TMP/wheel" . \
      >"$TMP/build.log" 2>&1); then
    tail -n 60 "$TMP/build.log"
    die "the build failed (or ran past ${BUILD_TIMEOUT} s)"
fi
echo "built in $((SECONDS - t0)) s"

# every object of the extension must be instrumented (the kernel objects come from
# setup.py's own compile calls), and the module must link both runtimes
objs=()
while IFS= read -r -d '' o; do objs+=("$o"); done < <(find "$TMP/src/build" -name '*.o' -print0 | sort -z)
[ "${#objs[@]}" -gt 0 ] || die "no object files under $TMP/src/build (did the build happen there?)"
for o in "${objs[@]}"; do
    syms="$(nm -u "$o")"
    grep -q '__asan_report' <<<"$syms" && grep -q '__ubsan_handle' <<<"$syms" ||
        die "${o#"$TMP/src/"} is not instrumented (no __asan_report_*/__ubsan_handle_* calls)"
done
echo "all ${#objs[@]} object files call __asan_report_* and __ubsan_handle_*:"
printf '  %s\n' "${objs[@]#"$TMP/src/build/"}"
so="$(find "$TMP/src/build" -name '_core*.so' | head -n 1)"
needed="$(readelf -d "$so" | grep NEEDED)"
grep -q libasan <<<"$needed" && grep -q libubsan <<<"$needed" ||
    die "$so does not link libasan and libubsan: $needed"

mkdir "$TMP/site"
"$PY" -m pip install -q --no-deps --disable-pip-version-check --root-user-action=ignore --target "$TMP/site" "$TMP"/wheel/fastce-*.whl

if [ "$#" -gt 0 ]; then
    TESTS=("$@")
else
    TESTS=(tests --ignore=tests/test_build.py --ignore=tests/test_bench.py --ignore=tests/test_scale.py)
fi

step "3. pytest under ASan + UBSan: ${TESTS[*]}"
cd "$TMP/src"
rc=0
env PYTHONPATH="$TMP/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONMALLOC=malloc PYTHONDONTWRITEBYTECODE=1 \
    LD_PRELOAD="$LIBASAN:$LIBUBSAN${LD_PRELOAD:+:$LD_PRELOAD}" \
    ASAN_OPTIONS="detect_leaks=0:halt_on_error=$HALT:abort_on_error=0" \
    UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=$HALT" \
    timeout --kill-after=30 "$TEST_TIMEOUT" \
    "$PY" -m pytest -q -p no:cacheprovider --capture=sys "${TESTS[@]}" 2>&1 | tee "$TMP/pytest.log" || rc=$?
# the module under test must have been the sanitized one
where="$(env PYTHONPATH="$TMP/site" LD_PRELOAD="$LIBASAN:$LIBUBSAN" ASAN_OPTIONS=detect_leaks=0 \
         "$PY" -c 'import fastce._core as m; print(m.__file__)')"
case "$where" in "$TMP/site/"*) ;; *) die "the tests imported fastce from $where, not the sanitized build" ;; esac

step "4. sanitizer reports"
# (pytest's dots may precede a report on its line; the numbers in a message vary)
reports="$(grep -oE '[A-Za-z0-9_][A-Za-z0-9_./-]*:[0-9]+:[0-9]+: runtime error: [^0-9]*|ERROR: AddressSanitizer: [a-z-]+|ERROR: LeakSanitizer|SUMMARY: (Address|UndefinedBehavior)Sanitizer: [a-z-]+ [^ ]*' \
           "$TMP/pytest.log" | sort | uniq -c | sort -rn || true)"
if [ -n "$reports" ]; then
    echo "sanitizer reports (count, kind and place; the stack traces are in the output above):"
    echo "$reports"
fi
echo "sanitize.sh: pytest exit status $rc; $((SECONDS - t0)) s in all"
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    die "the tests ran past ${TEST_TIMEOUT} s"
fi
[ "$rc" -eq 0 ] && [ -z "$reports" ] || die "FAILED"

FUZZ_SECONDS_SAN="${SANITIZE_FUZZ_SECONDS:-60}"
if [ "$FUZZ_SECONDS_SAN" -gt 0 ] && [ ! -f fuzz/fuzz_cross_entropy.py ]; then
    echo "sanitize.sh: no fuzz/fuzz_cross_entropy.py in this tree: the fuzzing step is skipped"
elif [ "$FUZZ_SECONDS_SAN" -gt 0 ]; then
    step "5. fuzz/fuzz_cross_entropy.py for $FUZZ_SECONDS_SAN s on the sanitized build"
    fpath="$TMP/site"
    if ! "$PY" -c 'import atheris' 2>/dev/null; then
        "$PY" -m pip install -q --disable-pip-version-check --root-user-action=ignore \
            --target "$TMP/atheris" "atheris==3.0.0"
        fpath="$fpath:$TMP/atheris"
    fi
    mkdir -p "$TMP/fuzz-artifacts"
    frc=0
    env PYTHONPATH="$fpath${PYTHONPATH:+:$PYTHONPATH}" PYTHONDONTWRITEBYTECODE=1 \
        LD_PRELOAD="$LIBASAN:$LIBUBSAN${LD_PRELOAD:+:$LD_PRELOAD}" \
        ASAN_OPTIONS="detect_leaks=0:halt_on_error=$HALT:abort_on_error=0" \
        UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=$HALT" \
        FUZZ_RANDOM_SECONDS="$FUZZ_SECONDS_SAN" FUZZ_ARTIFACTS="$TMP/fuzz-artifacts" \
        timeout --kill-after=30 "$((FUZZ_SECONDS_SAN + 300))" \
        "$PY" fuzz/fuzz_cross_entropy.py fuzz/corpus >"$TMP/fuzz.log" 2>&1 || frc=$?
    tail -n 80 "$TMP/fuzz.log"
    freports="$(grep -oE '[A-Za-z0-9_][A-Za-z0-9_./-]*:[0-9]+:[0-9]+: runtime error: [^0-9]*|ERROR: AddressSanitizer: [a-z-]+|SUMMARY: (Address|UndefinedBehavior)Sanitizer: [a-z-]+ [^ ]*' \
                "$TMP/fuzz.log" | sort | uniq -c | sort -rn || true)"
    [ -z "$freports" ] || { echo "sanitizer reports while fuzzing:"; echo "$freports"; }
    for f in "$TMP"/fuzz-artifacts/* "$TMP"/fuzz-artifacts/.last-input; do
        if [ -e "$f" ]; then echo "fuzz input ${f##*/}, base64:"; base64 -w 0 "$f"; echo; fi
    done
    echo "sanitize.sh: fuzzer exit status $frc; $((SECONDS - t0)) s in all"
    [ "$frc" -eq 0 ] && [ -z "$freports" ] || die "FAILED (while fuzzing)"
fi
echo "sanitize.sh: OK"
