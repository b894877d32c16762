/* Runtime choice of the kernel variant, and thread defaults.
 *
 * Every variant compiled in is listed in `variants`; the best one this CPU and
 * OS can run (CPUID for the instructions, XGETBV for the OS saving the wider
 * registers) is chosen on first use. fce_isa_select() lets the binding force
 * another one (FASTCE_ISA, tests). */
#include <stddef.h>
#include "fastce_internal.h"

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(FCE_X86) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#endif

typedef struct {
    const char *name;
    fce_run_fn run_f32, run_f64;
    fce_exp_f32_fn exp_f32;
    fce_exp_f64_fn exp_f64;
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
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 12))) return 0; /* FMA */
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
    {#isa, fce_run_f32_##isa, fce_run_f64_##isa, fce_exp_f32_##isa, fce_exp_f64_##isa, check}

static const variant variants[] = {
    VARIANT(scalar, always),
#if defined(FCE_X86)
    VARIANT(sse2, always),
    VARIANT(avx2, has_avx2),
    VARIANT(avx512, has_avx512),
#elif defined(FCE_ARM64)
    VARIANT(neon, always),
#endif
};
#define N_VARIANTS ((int)(sizeof variants / sizeof variants[0]))

/* -1 until first use; a benign race (every thread computes the same value) */
static volatile int current = -1;

int fce_isa_count(void) { return N_VARIANTS; }

const char *fce_isa_name(int index)
{
    return index >= 0 && index < N_VARIANTS ? variants[index].name : NULL;
}

int fce_isa_supported(int index)
{
    return index >= 0 && index < N_VARIANTS && variants[index].supported();
}

int fce_isa_best(void)
{
    int best = 0;
    for (int i = 0; i < N_VARIANTS; i++)
        if (variants[i].supported()) best = i;
    return best;
}

int fce_isa_current(void)
{
    if (current < 0) current = fce_isa_best();
    return current;
}

int fce_isa_select(int index)
{
    if (!fce_isa_supported(index)) return FCE_ERR_ISA;
    current = index;
    return FCE_OK;
}

int fce_run_f32(fce_job *job) { return variants[fce_isa_current()].run_f32(job); }
int fce_run_f64(fce_job *job) { return variants[fce_isa_current()].run_f64(job); }

void fce_exp_f32(const float *x, float *y, int64_t n) { variants[fce_isa_current()].exp_f32(x, y, n); }
void fce_exp_f64(const double *x, double *y, int64_t n) { variants[fce_isa_current()].exp_f64(x, y, n); }

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

/* Below this many logits per thread, another thread costs more than it saves. */
#define FCE_MIN_ELEMS_PER_THREAD 65536

int fce_pick_threads(int n_threads, int64_t elems, int64_t n_items)
{
    int nt = n_threads > 0 ? n_threads : fce_max_threads();
    if (n_threads <= 0) {
        int64_t by_size = elems / FCE_MIN_ELEMS_PER_THREAD;
        if (by_size < nt) nt = by_size < 1 ? 1 : (int)by_size;
    }
    if (n_items < nt) nt = n_items < 1 ? 1 : (int)n_items;
    return nt;
}
