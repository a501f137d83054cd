/* The cpu decode kernel alone, timed from C: the measurements behind docs/speed-notes.md.
 *
 *   gcc -O3 -march=native -fopenmp -std=c11 -I backends/cpu/kernels tools/decode_harness.c -o /tmp/dh -lm
 *   /tmp/dh [gqa|mla] BATCH CONTEXT LAYERS THREADS FORMAT REPS [random]
 *   /tmp/dh gqa 8 4096 8 2 int8 5      # Llama-3-8B shapes: 32/8 heads, d128, block 16
 *   /tmp/dh mla 1 4096 57 2 bf16 5     # DeepSeek-V2-Lite absorbed: 16 heads, one 576-wide row, block 64
 *
 * FORMAT: bf16, int8, fp8_e4m3, fp8_e5m2, int6, int4 (rows as hal/kv_formats.py lays them out). The
 * values are a fixed pattern, or with `random` normal values as a model's (bf16, int8, fp8_e4m3): the
 * running max then moves as in real decoding, which costs the softmax its rescales; the timing hardly
 * depends on it (int8 B1 x 4096 in cache, 2 threads: 0.270 against 0.267 ms per layer, Zen 4). The
 * pattern's int8 row scales span 2^-24 .. 1, so its scores spread far enough for weights below fp32's
 * normal range: on the Intel AMX VM that cost int8 1.4-2x until the kernels flushed denormals (see
 * hal_ftz_enter in simd.h). Pages are permuted as in hal bench,
 * and the rows sit on 2 MiB pages where Linux allows, as hal's cpu cache does (hal/hostmem.py);
 * each layer has its own K and V buffers, so LAYERS sets the working set (keep it well above the
 * last-level cache to measure memory, below it to measure compute). Prints the best of REPS passes
 * over the layers (and their median: hal bench reports medians), then the read bandwidth of a plain
 * pass over the same buffers. Compare builds by
 * alternating them in balanced order (A B B A): this VM drifts by 5-10% between minutes. With OUTF=FILE
 * in the environment it writes the last call's output (B x Hq x Dv model-dtype values) to FILE, to
 * check that a change leaves the results byte-identical (cmp). With PROBE=1 it prints every pass's time
 * beside each thread's tile-product time just before and after it (see tile_probe).
 *
 * A/B in one process: on a VM whose speed moves by 2x within a minute, two builds timed in turn by
 * separate runs can disagree by more than a change is worth. Built with -DHAL_AB and linked with a
 * second build of the kernel whose entry points are renamed, every pass runs both (the order swapped
 * every other pass) and the last line gives each one's median and best, and the median and quartiles of
 * the passes' B/A time ratios:
 *   gcc -O3 -march=native -fopenmp -std=c11 -DMY_CHANGE -Dhal_paged_decode=hal_ab_paged_decode \
 *       -Dhal_decode_supports=hal_ab_decode_supports -Dhal_amx_state=hal_ab_amx_state \
 *       -I backends/cpu/kernels -c backends/cpu/kernels/paged_decode.c -o /tmp/b.o
 *   gcc -O3 -march=native -fopenmp -std=c11 -DHAL_AB -I backends/cpu/kernels tools/decode_harness.c /tmp/b.o -o /tmp/ab -lm
 *   /tmp/ab gqa 8 4096 40 2 fp8_e4m3 10
 * (A is the build in backends/cpu/kernels; B the object, from the same file with its change switched on
 * by a macro, or from a copy of the directory.)
 */
#define _GNU_SOURCE
#include "paged_decode.c"
#ifdef HAL_AB
int hal_ab_paged_decode(const decode_args *a, int num_threads);  /* build B (see the header) */
#endif

#include <stdio.h>
#include <sys/mman.h>
#include <time.h>

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* PROBE=1: each thread's ns per tile product (4,000 TDPBF16PS on zeroed tiles, about 30-70 us) into
 * ns[t], just before and after every pass; where the tile unit's rate moves between minutes (the AMX
 * VM's two rates, docs/speed-notes.md, twelfth round) it shows which passes ran at which. Pin the
 * threads (taskset for one, OMP_PROC_BIND=true for more) so that a thread probes the CPU it computes
 * on. Zeros without AMX. */
static void tile_probe(int threads, double *ns) {
    for (int i = 0; i < threads && i < 64; i++) ns[i] = 0.0;
#if HAL_FAST && HAL_AMX_NATIVE && defined(_OPENMP)
    if (amx_grant() != AMX_NATIVE) return;
    #pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num();
        amx_configure();
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
        _tile_zero(4); _tile_zero(5); _tile_zero(6); _tile_zero(7);
        const double t0 = omp_get_wtime();
        for (int i = 0; i < 1000; i++) {
            _tile_dpbf16ps(0, 4, 5); _tile_dpbf16ps(1, 4, 6); _tile_dpbf16ps(2, 4, 7); _tile_dpbf16ps(3, 5, 6);
        }
        if (t < 64) ns[t] = (omp_get_wtime() - t0) / 4000.0 * 1e9;
    }
#endif
}

static int parse_format(const char *s) {
    const char *names[] = {"fp32", "fp16", "bf16", "int8", "fp8_e4m3", "fp8_e5m2", "int6", "int4"};
    for (int i = 0; i < 8; i++)
        if (!strcmp(s, names[i])) return i;
    return -1;
}

/* DATA "random": values as a model's (queries and keys N(0, 1), so that the running max moves as it
 * does in real decoding) for bf16, int8 and fp8_e4m3 rows; the default pattern is cheaper to fill */
static double uniform(uint64_t *s) {
    *s ^= *s << 13; *s ^= *s >> 7; *s ^= *s << 17;
    return (double)(*s >> 11) / 9007199254740992.0;
}
static float gauss(uint64_t *s) { return (float)(uniform(s) + uniform(s) + uniform(s) - 1.5) * 2.0f; }
static void fill_random(uint8_t *buf, size_t bytes, int64_t width, int D, int fmt, uint64_t *s) {
    for (size_t r = 0; r + (size_t)width <= bytes; r += (size_t)width) {
        uint8_t *row = buf + r;
        for (int d = 0; d < D; d++) {
            const float x = gauss(s);
            if (fmt == FMT_BF16) { const uint16_t b = f32_to_bf16(x); memcpy(row + 2 * d, &b, 2); }
            else if (fmt == FMT_INT8) { const float v = x * 40.f; row[d] = (uint8_t)(int8_t)(v > 127 ? 127 : v < -127 ? -127 : v); }
            else if (fmt == FMT_E4M3) { const int e = 4 + (int)(uniform(s) * 7), m = (int)(uniform(s) * 8);
                                        row[d] = (uint8_t)((x < 0) << 7 | e << 3 | m); }
            else row[d] = (uint8_t)(uniform(s) * 64);
        }
        if (fmt == FMT_INT8) { const uint16_t sc = f32_to_f16(0.025f * (float)(1.0 + uniform(s))); memcpy(row + D, &sc, 2); }
    }
}

/* one pass over the layers with kernel `fn`: seconds per layer, or -1 when the kernel refuses a call */
static double pass_s(int (*fn)(const decode_args *, int), decode_args *a, uint8_t *const *rows, int L, int comps,
                     int threads) {
    const double t0 = now_s();
    for (int l = 0; l < L; l++) {
        a->k = rows[l * comps];
        a->v = rows[l * comps + comps - 1];  /* MLA: V is K's rows (comps 1) */
        if (fn(a, threads)) return -1.0;
    }
    return (now_s() - t0) / L;
}

#ifdef HAL_AB
static int cmp_double(const void *x, const void *y) {
    const double a = *(const double *)x, b = *(const double *)y;
    return (a > b) - (a < b);
}
#endif

int main(int argc, char **argv) {
    if (argc < 8) {
        fprintf(stderr, "usage: %s [gqa|mla] BATCH CONTEXT LAYERS THREADS FORMAT REPS [random]\n", argv[0]);
        return 2;
    }
    const int mla = !strcmp(argv[1], "mla");
    const int B = atoi(argv[2]), S = atoi(argv[3]), L = atoi(argv[4]), threads = atoi(argv[5]);
    const int fmt = parse_format(argv[6]), reps = atoi(argv[7]), rnd = argc > 8 && !strcmp(argv[8], "random");
    uint64_t seed = 88172645463325252ULL;
    if (argc > 8 && !rnd) {
        fprintf(stderr, "DATA must be 'random' (or left out for the fixed pattern), not '%s'\n", argv[8]);
        return 2;
    }
    if (fmt < FMT_BF16 || B < 1 || S < 1 || L < 1 || threads < 1 || reps < 1) {
        fprintf(stderr, "FORMAT must be bf16, int8, fp8_e4m3, fp8_e5m2, int6 or int4; the counts positive\n");
        return 2;
    }
    const int Hq = mla ? 16 : 32, Hkv = mla ? 1 : 8, D = mla ? 576 : 128, Dv = mla ? 512 : 128;
    const int bs = mla ? 64 : 16, need = (S + bs - 1) / bs, nb = B * need;
    const int64_t width = fmt == FMT_BF16 ? 2 * D : fmt == FMT_INT8 ? D + 2 : fmt == FMT_INT6 ? 3 * D / 4 + 2
                        : fmt == FMT_INT4 ? D / 2 + D / 16 : D;  /* bytes per row (hal/kv_formats.py) */
    const size_t layer_bytes = (size_t)nb * bs * Hkv * width;
    const int comps = mla ? 1 : 2;  /* MLA: V is the first Dv channels of K's row */
    uint8_t **rows = malloc(sizeof(uint8_t *) * (size_t)L * comps);
    for (int i = 0; i < L * comps; i++) {
        const size_t huge = (size_t)2 << 20, alloc = (layer_bytes + huge - 1) / huge * huge;
        rows[i] = aligned_alloc(huge, alloc);
#ifdef MADV_HUGEPAGE
        madvise(rows[i], alloc, MADV_HUGEPAGE);  /* advice: ordinary pages where declined */
#endif
        if (rnd)
            fill_random(rows[i], layer_bytes, width, D, fmt, &seed);
        else
            for (size_t j = 0; j < layer_bytes; j++) rows[i][j] = (uint8_t)((j * (7 + 6 * (i % 2)) + (size_t)i) & 0x3f);
    }
    int32_t *table = malloc(sizeof(int32_t) * (size_t)nb);
    for (int i = 0; i < nb; i++) table[i] = i;
    srand(1);
    for (int i = nb - 1; i > 0; i--) {  /* pages permuted */
        const int j = rand() % (i + 1), t = table[i];
        table[i] = table[j];
        table[j] = t;
    }
    int32_t *seq_lens = malloc(sizeof(int32_t) * (size_t)B), *cu_q = malloc(sizeof(int32_t) * (size_t)(B + 1));
    uint8_t *active = malloc((size_t)B);
    for (int b = 0; b <= B; b++) cu_q[b] = b;
    for (int b = 0; b < B; b++) { seq_lens[b] = S; active[b] = 1; }
    uint16_t *q = malloc(sizeof(uint16_t) * (size_t)B * Hq * D), *out = malloc(sizeof(uint16_t) * (size_t)B * Hq * Dv);
    for (size_t i = 0; i < (size_t)B * Hq * D; i++)  /* bf16 1.0 .. 1.05, or N(0, 1) */
        q[i] = rnd ? f32_to_bf16(gauss(&seed)) : (uint16_t)(0x3f80 + (i & 7));
    float scales[8] = {1, 1, 1, 1, 1, 1, 1, 1};
    decode_args a = {0};
    a.q = q; a.out = out; a.block_table = table; a.seq_lens = seq_lens; a.cu_q = cu_q; a.active = active;
    a.bt_stride = need; a.B = B; a.Hq = Hq; a.Hkv = Hkv; a.D = D; a.Dv = Dv; a.bs = bs;
    a.dtype = FMT_BF16; a.kfmt = a.vfmt = fmt; a.k_width = a.v_width = width;
    a.scale = 1.f / sqrtf((float)D); a.causal = 1; a.window = -1; a.k_scale = a.v_scale = scales;
    double *times = malloc(sizeof(double) * (size_t)reps);  /* sorted: the best first, the median */
#ifdef HAL_AB
    {
        double *tb = malloc(sizeof(double) * (size_t)reps), *ratio = malloc(sizeof(double) * (size_t)reps);
        for (int r = 0; r < reps; r++) {
            double t[2];
            for (int o = 0; o < 2; o++) {
                const int which = (r & 1) ^ o;  /* A first in even passes, B first in odd ones */
                t[which] = pass_s(which ? hal_ab_paged_decode : hal_paged_decode, &a, rows, L, comps, threads);
                if (t[which] < 0) {
                    fprintf(stderr, "build %c refused the call\n", which ? 'B' : 'A');
                    return 1;
                }
            }
            times[r] = t[0];
            tb[r] = t[1];
            ratio[r] = t[1] / t[0];
        }
        qsort(times, (size_t)reps, sizeof(double), cmp_double);
        qsort(tb, (size_t)reps, sizeof(double), cmp_double);
        qsort(ratio, (size_t)reps, sizeof(double), cmp_double);
        printf("%s %s B%d S%d, %d threads, ms/layer: A median %.3f best %.3f | B median %.3f best %.3f | "
               "B/A median %.3f (quartiles %.3f, %.3f) over %d passes\n", mla ? "mla" : "gqa", argv[6], B, S, threads,
               times[reps / 2] * 1e3, times[0] * 1e3, tb[reps / 2] * 1e3, tb[0] * 1e3, ratio[reps / 2], ratio[reps / 4],
               ratio[3 * reps / 4], reps);
        return 0;
    }
#endif
    const int probe = getenv("PROBE") != NULL;
    for (int r = 0; r < reps; r++) {
        double before[64], after[64];
        if (probe) tile_probe(threads, before);
        const double t = pass_s(hal_paged_decode, &a, rows, L, comps, threads);
        if (t < 0) { fprintf(stderr, "the kernel refused the call\n"); return 1; }
        if (probe) {
            tile_probe(threads, after);
            printf("pass %d: %.3f ms/layer; tile product ns per thread before, after:", r, t * 1e3);
            for (int i = 0; i < threads && i < 64; i++) printf(" %.1f,%.1f", before[i], after[i]);
            printf("\n");
        }
        int j = r;                           /* insertion sort */
        for (; j > 0 && times[j - 1] > t; j--) times[j] = times[j - 1];
        times[j] = t;
    }
    printf("%s %s B%d S%d, %d threads: %.3f ms/layer, %.2f GB/s of rows (median of %d passes %.3f ms)\n",
           mla ? "mla" : "gqa", argv[6], B, S, threads, times[0] * 1e3, comps * (double)layer_bytes / times[0] / 1e9,
           reps, times[reps / 2] * 1e3);
    free(times);
    if (getenv("OUTF")) {                    /* the last call's output, for cmp between builds */
        FILE *f = fopen(getenv("OUTF"), "wb");
        if (!f || fwrite(out, 2, (size_t)B * Hq * Dv, f) != (size_t)B * Hq * Dv) { fprintf(stderr, "cannot write OUTF\n"); return 1; }
        fclose(f);
    }
    double best = 1e30;
    for (int r = 0; r < 3; r++) {  /* a plain read of the same buffers */
        const double t0 = now_s();
        uint64_t acc = 0;
#ifdef _OPENMP
        #pragma omp parallel for num_threads(threads) reduction(^ : acc)
#endif
        for (int i = 0; i < L * comps; i++) {
            const uint64_t *p = (const uint64_t *)rows[i];
            uint64_t x = 0;
            for (size_t j = 0; j < layer_bytes / 8; j++) x ^= p[j];
            acc ^= x;
        }
        const double t = (now_s() - t0) / L;
        best = t < best ? t : best;
        if (acc == 42) printf(" ");
    }
    printf("  read: %.2f GB/s\n", comps * (double)layer_bytes / best / 1e9);
    {
        static const char *amx[] = {"none in this build", "native", "emulated", "refused by Linux"};
        printf("  AMX tiles: %s\n", amx[hal_amx_state()]);
    }
    return 0;
}
