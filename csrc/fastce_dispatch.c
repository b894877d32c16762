/* Runtime choice of the kernel variant, and thread defaults.
 *
 * Every variant compiled in is listed in `variants`; on first use the one that
 * is fastest on this CPU among those it and the OS can run (CPUID for the
 * instructions, XGETBV for the OS saving the wider registers) is chosen by a
 * small table by vendor and family (choose()), with the per-CPU tuning.
 * fce_isa_select() and fce_prefetch_select() let the binding force another
 * variant or tuning (FASTCE_ISA, FASTCE_PREFETCH, tests). */
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include "fastce_internal.h"

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(FCE_X86) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#endif

typedef struct {
    const char *name;
    const struct fce_paths_f32 *paths_f32;
    const struct fce_paths_f64 *paths_f64;
    const struct fce_paths_f16 *paths_f16;
    const struct fce_paths_bf16 *paths_bf16;
    int (*supported)(void);
} variant;

static int always(void) { return 1; }

#if defined(FCE_X86)
static uint64_t xgetbv0(void)
{
    uint32_t eax, edx;
    __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
    return ((uint64_t)edx << 32) | eax;
}

/* AVX state (XMM|YMM) enabled by the OS and the CPU has AVX, OSXSAVE */
static int os_avx(void)
{
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    if (!(c & (1u << 27)) || !(c & (1u << 28))) return 0; /* OSXSAVE, AVX */
    return (xgetbv0() & 0x6) == 0x6;
}

static int has_avx2(void)
{
    unsigned a, b, c, d;
    if (!os_avx()) return 0;
    /* FMA, F16C (every AVX2 CPU has both; the half-precision loads use F16C) */
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 12)) || !(c & (1u << 29))) return 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    return (b & (1u << 5)) != 0; /* AVX2 */
}

static int has_avx512(void)
{
    unsigned a, b, c, d;
    if (!has_avx2()) return 0;
    if ((xgetbv0() & 0xE6) != 0xE6) return 0; /* opmask, ZMM_Hi256, Hi16_ZMM */
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    const unsigned need = (1u << 16) | (1u << 17) | (1u << 30) | (1u << 31); /* F DQ BW VL */
    return (b & need) == need;
}
#endif

#define VARIANT(isa, check) \
    {#isa, &fce_paths_f32_##isa, &fce_paths_f64_##isa, &fce_paths_f16_##isa, &fce_paths_bf16_##isa, check}

static const variant variants[] = {
    VARIANT(scalar, always),
/* a build of some variants only (setup.py, FASTCE_ISAS: debugging and sanitizer
 * builds) leaves the others out with FCE_WITHOUT_<ISA> */
#if defined(FCE_X86)
#ifndef FCE_WITHOUT_SSE2
    VARIANT(sse2, always),
#endif
#ifndef FCE_WITHOUT_AVX2
    VARIANT(avx2, has_avx2),
#endif
#ifndef FCE_WITHOUT_AVX512
    VARIANT(avx512, has_avx512),
#endif
#elif defined(FCE_ARM64) && !defined(FCE_WITHOUT_NEON)
    VARIANT(neon, always),
#endif
};
#define N_VARIANTS ((int)(sizeof variants / sizeof variants[0]))

/* The choice by merit: the fastest supported variant for this CPU, which is not
 * always the widest, and the tuning that goes with it. Measured (README):
 *   Intel with AVX-512 (Xeon, 2-core VM): avx512; the hardware prefetchers did
 *     little there, the software prefetch 2 KiB ahead set the memory rate
 *   AMD Zen 5 (family 26, full-width AVX-512): avx512 (1.2-1.7x avx2), and the
 *     software prefetch: 1.14-1.48x on arrays >= 64 MiB (bench/variants.py; the
 *     kernel from memory 16.0 -> 19.2 GB/s in bench/kernel_loops.sh, from L2 it
 *     costs 13 %, which the forward at (16384, 1000) shows: 3 % slower); small C
 *     by transposes (gathers 1.4x slower in the forward)
 *   AMD Zen 4 (family 25, AVX-512 on 256-bit units): avx512 (the AVX-512 exp's
 *     register table and masks beat avx2 by 1.5x in the forward); no software
 *     prefetch (Zen's hardware prefetchers stream the rows on their own)
 *   AMD Zen 2/3 (no AVX-512): avx2, no software prefetch
 *   anything else: the widest variant, with the prefetch (the safe default). */
typedef struct {
    int isa;            /* index into variants */
    fce_tuning tune;
    char reason[320];
} choice;

static int find_variant(const char *name)
{
    for (int i = 0; i < N_VARIANTS; i++)
        if (strcmp(variants[i].name, name) == 0) return i;
    return -1;
}

static void cpu_identity(char vendor[13], unsigned *family, unsigned *model)
{
    memset(vendor, 0, 13);
    *family = *model = 0;
#if defined(FCE_X86) && (defined(__GNUC__) || defined(__clang__))
    unsigned a, b, c, d;
    if (!__get_cpuid(0, &a, &b, &c, &d)) return;
    memcpy(vendor, &b, 4);
    memcpy(vendor + 4, &d, 4);
    memcpy(vendor + 8, &c, 4);
    if (!__get_cpuid(1, &a, &b, &c, &d)) return;
    unsigned fam = (a >> 8) & 0xf, mod = (a >> 4) & 0xf;
    if (fam == 0xf) fam += (a >> 20) & 0xff;
    if (fam == 0x6 || fam >= 0xf) mod += ((a >> 16) & 0xf) << 4;
    *family = fam;
    *model = mod;
#endif
}

static choice choose(void)
{
    choice ch;
    int widest = 0;
    for (int i = 0; i < N_VARIANTS; i++)
        if (variants[i].supported()) widest = i;
    ch.isa = widest;
    ch.tune.prefetch = 1;
    ch.tune.small_c_gather = 1;
    char vendor[13];
    unsigned family, model;
    cpu_identity(vendor, &family, &model);
    const char *why = "the widest variant; software prefetch, gathers (no measured rule for this CPU)";
    if (strcmp(vendor, "AuthenticAMD") == 0 && family >= 0x1A) {
        ch.tune.prefetch = 1;
        ch.tune.small_c_gather = 0;
        why = "AMD Zen 5 or later: the widest variant (avx512 measured 1.2-1.7x avx2); "
              "software prefetch 2 KiB ahead (1.14-1.48x on large arrays); small C by "
              "transposes (gathers 1.4x slower)";
    } else if (strcmp(vendor, "AuthenticAMD") == 0 && family >= 0x17) {
        ch.tune.prefetch = 0;
        ch.tune.small_c_gather = 0;
        why = strcmp(variants[widest].name, "avx512") == 0
                  ? "AMD Zen 4: avx512 (measured 1.5x avx2 in the forward); hardware "
                    "prefetch only; small C by transposes (gathers are slow on Zen)"
                  : "AMD Zen 1-3: the widest variant; hardware prefetch only; small C by "
                    "transposes (gathers are microcoded on Zen)";
    } else if (strcmp(vendor, "GenuineIntel") == 0) {
        why = "Intel: the widest variant; software prefetch 2 KiB ahead and small C by gathers "
              "(both measured best on a Xeon with AVX-512)";
    }
    snprintf(ch.reason, sizeof ch.reason, "%s family %u model %u: %s",
             vendor[0] ? vendor : "unknown CPU", family, model, why);
    (void)find_variant;
    return ch;
}

/* -1 until first use; a benign race (every thread computes the same value) */
static volatile int current = -1;
static choice chosen;
static volatile int chosen_ready = 0;
static fce_tuning tuning_in_use = {1, 1};
/* forced tuning knobs, -1: as chosen; in the order of fce_tuning_names */
static const char *const tuning_names[] = {"prefetch", "small_c_gather"};
#define N_TUNING 2
static int tuning_forced[N_TUNING] = {-1, -1};

static const choice *get_choice(void)
{
    if (!chosen_ready) {
        chosen = choose();
        chosen_ready = 1;
    }
    return &chosen;
}

int fce_isa_count(void) { return N_VARIANTS; }

const char *fce_isa_name(int index)
{
    return index >= 0 && index < N_VARIANTS ? variants[index].name : NULL;
}

int fce_isa_supported(int index)
{
    return index >= 0 && index < N_VARIANTS && variants[index].supported();
}

int fce_isa_best(void) { return get_choice()->isa; }

const char *fce_isa_reason(void) { return get_choice()->reason; }

static void update_tuning(void)
{
    fce_tuning t = get_choice()->tune;
    if (tuning_forced[0] >= 0) t.prefetch = tuning_forced[0];
    if (tuning_forced[1] >= 0) t.small_c_gather = tuning_forced[1];
    tuning_in_use = t;
}

int fce_isa_current(void)
{
    if (current < 0) {
        update_tuning();
        current = fce_isa_best();
    }
    return current;
}

int fce_isa_select(int index)
{
    if (!fce_isa_supported(index)) return FCE_ERR_ISA;
    update_tuning();
    current = index;
    return FCE_OK;
}

int fce_tuning_count(void) { return N_TUNING; }

const char *fce_tuning_name(int index)
{
    return index >= 0 && index < N_TUNING ? tuning_names[index] : NULL;
}

int fce_tuning_select(int index, int value)
{
    if (index < 0 || index >= N_TUNING || value < -1 || value > 1) return FCE_ERR_ARG;
    tuning_forced[index] = value;
    update_tuning();
    return FCE_OK;
}

int fce_tuning_current(int index)
{
    fce_isa_current();
    switch (index) {
    case 0: return tuning_in_use.prefetch;
    case 1: return tuning_in_use.small_c_gather;
    default: return -1;
    }
}

const struct fce_paths_f32 *fce_current_paths_f32(void) { return variants[fce_isa_current()].paths_f32; }
const struct fce_paths_f64 *fce_current_paths_f64(void) { return variants[fce_isa_current()].paths_f64; }
const struct fce_paths_f16 *fce_current_paths_f16(void) { return variants[fce_isa_current()].paths_f16; }
const struct fce_paths_bf16 *fce_current_paths_bf16(void) { return variants[fce_isa_current()].paths_bf16; }
const fce_tuning *fce_current_tuning(void)
{
    fce_isa_current();
    return &tuning_in_use;
}

int fce_openmp_enabled(void)
{
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

int fce_max_threads(void)
{
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

/* fork: libgomp's thread pool does not survive fork(), and a child that enters a
 * parallel region after its parent used threads hangs (torch's children do too).
 * So a child forked after a threaded call runs every later call on one thread
 * (the kernel then never enters a parallel region). Registered on first use. */
#if defined(_OPENMP) && (defined(__unix__) || defined(__APPLE__))
#include <pthread.h>
static volatile int threads_used = 0, forked_single = 0;
static void child_after_fork(void)
{
    if (threads_used) forked_single = 1;
}
static void fork_guard(int nt)
{
    static volatile int registered = 0;
    if (!registered) {
        registered = 1;
        pthread_atfork(NULL, NULL, child_after_fork);
    }
    if (nt > 1) threads_used = 1;
}
#define FORKED_SINGLE() (forked_single)
#else
static void fork_guard(int nt) { (void)nt; }
#define FORKED_SINGLE() 0
#endif

int fce_forked_single(void) { return FORKED_SINGLE(); }

/* Below this many logits per thread, another thread costs more than it saves. */
#define FCE_MIN_ELEMS_PER_THREAD 65536

int fce_pick_threads(int n_threads, int64_t elems, int64_t n_items)
{
    if (FORKED_SINGLE()) return 1;
    int nt = n_threads > 0 ? n_threads : fce_max_threads();
    if (n_threads <= 0) {
        int64_t by_size = elems / FCE_MIN_ELEMS_PER_THREAD;
        if (by_size < nt) nt = by_size < 1 ? 1 : (int)by_size;
    }
    if (n_items < nt) nt = n_items < 1 ? 1 : (int)n_items;
    fork_guard(nt);
    return nt;
}
