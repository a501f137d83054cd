/* How this CPU streams a paged KV cache: the loops behind docs/speed-notes.md's "Headroom in the memory path".
 *
 *   gcc -O2 -march=native -std=c11 tools/prefetch_probe.c -o /tmp/pp
 *   /tmp/pp chunks CHUNK BURST WORK AHEAD   # 512 MiB read as CHUNK-byte chunks in random order
 *   /tmp/pp tiles WORK                      # the decode kernel's pattern, bf16 rows (see below)
 *   taskset -c 0 /tmp/pp ... & taskset -c 1 /tmp/pp ... & wait   # one process per core
 *
 * chunks: every 64-byte line is loaded once and fed through WORK dependent VPDPWSSD (the compute per
 * line; plain vector multiply-adds on CPUs without AVX512-VNNI); the chunk AHEAD chunks further on is prefetched into L2 (T1: __builtin_prefetch locality 2), BURST lines at a time every BURST
 * lines (BURST 0: no prefetch, demand loads and the hardware prefetchers only; BURST -1: the whole
 * chunk at once at its start).
 * tiles: the decode kernel's memory pattern for bf16 Llama-3-8B rows: K and V in two 512 MiB buffers
 * of blocks of 16 tokens x 8 heads x 256 bytes, in random order; a tile is 32 tokens (two blocks); per
 * tile and head, 32 K rows then 32 V rows of that head (a strided walk), WORK VPDPWSSD per line, while
 * the next tile's four blocks are prefetched in address order, four lines per row.
 * Prints GB/s read by this process (best of 3 passes). Machines drift: compare runs back to back.
 */
#define _GNU_SOURCE
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static char *buffer(size_t n) {  /* on 2 MiB pages where Linux allows, as hal's cache (hal/hostmem.py) */
    char *p = aligned_alloc((size_t)1 << 21, n);
    if (!p) { perror("aligned_alloc"); exit(1); }
#ifdef MADV_HUGEPAGE
    madvise(p, n, MADV_HUGEPAGE);
#endif
    memset(p, 1, n);
    return p;
}

static uint32_t *shuffled(size_t n) {
    uint32_t *o = malloc(sizeof(uint32_t) * n);
    for (size_t i = 0; i < n; i++) o[i] = (uint32_t)i;
    srand(1);
    for (size_t i = n - 1; i > 0; i--) {
        size_t j = (size_t)rand() % (i + 1);
        uint32_t t = o[i]; o[i] = o[j]; o[j] = t;
    }
    return o;
}

#if defined(__AVX512F__) && defined(__AVX512VNNI__)
typedef __m512i line_t;
static inline line_t load_line(const char *p) { return _mm512_load_si512(p); }
static inline line_t work(line_t x, int w) {  /* the kernel's product instruction */
    for (int i = 0; i < w; i++) x = _mm512_dpwssd_epi32(x, x, x);
    return x;
}
static inline line_t add(line_t a, line_t b) { return _mm512_add_epi32(a, b); }
static inline int low_bit(line_t a) { return _mm512_reduce_add_epi32(a) & 1; }
#else  /* other CPUs: the same loops with plain vector arithmetic as the work */
#pragma GCC diagnostic ignored "-Wpsabi"  /* static inline helpers only: no ABI crosses a boundary */
typedef int32_t line_t __attribute__((vector_size(32)));  /* both halves of the line, combined */
static inline line_t load_line(const char *p) { line_t x, y; memcpy(&x, p, 32); memcpy(&y, p + 32, 32); return x ^ y; }
static inline line_t work(line_t x, int w) {
    for (int i = 0; i < w; i++) x = x * x + x;
    return x;
}
static inline line_t add(line_t a, line_t b) { return a + b; }
static inline int low_bit(line_t a) { int32_t s = 0; for (int i = 0; i < 8; i++) s += a[i]; return s & 1; }
#endif

enum { N = 1 << 29 };

static double chunks(size_t ch, int burst, int w, int ahead, line_t *acc) {
    char *buf = buffer(N);
    const size_t nc = N / ch;
    uint32_t *ord = shuffled(nc);
    double best = 1e30;
    for (int rep = 0; rep < 3; rep++) {
        const double t0 = now_s();
        for (size_t c = 0; c < nc; c++) {
            const char *p = buf + (size_t)ord[c] * ch, *pf = buf + (size_t)ord[(c + ahead) % nc] * ch;
            if (burst < 0)
                for (size_t o = 0; o < ch; o += 64) __builtin_prefetch(pf + o, 0, 2);
            for (size_t o = 0; o < ch; o += 64) {
                if (burst > 0 && (o / 64) % (size_t)burst == 0)
                    for (int z = 0; z < burst; z++) __builtin_prefetch(pf + o + 64 * (size_t)z, 0, 2);
                *acc = add(*acc, work(load_line(p + o), w));
            }
        }
        const double t = now_s() - t0;
        best = t < best ? t : best;
    }
    return (double)N / best;
}

enum { ROW = 256, H = 8, BS = 16, TT = 32, NBT = TT / BS, LINES = ROW / 64 };

static double tiles(int w, line_t *acc) {
    const size_t blk = (size_t)BS * H * ROW, nb = N / blk, ntiles = nb / NBT;
    char *k = buffer(N), *v = buffer(N);
    uint32_t *perm = shuffled(nb);
    const int steps = H * 2 * TT, total = 2 * NBT * (int)(blk / 64), per_step = (total + steps - 1) / steps;
    double best = 1e30;
    for (int rep = 0; rep < 3; rep++) {
        const double t0 = now_s();
        for (size_t t = 0; t < ntiles; t++) {
            const char *kb[NBT], *vb[NBT], *next[2 * NBT];
            const size_t tn = (t + 1) % ntiles;
            for (int j = 0; j < NBT; j++) {
                kb[j] = k + (size_t)perm[t * NBT + j] * blk;
                vb[j] = v + (size_t)perm[t * NBT + j] * blk;
                next[j] = k + (size_t)perm[tn * NBT + j] * blk;
                next[NBT + j] = v + (size_t)perm[tn * NBT + j] * blk;
            }
            int pl = 0;
            for (int h = 0; h < H; h++)
                for (int c = 0; c < 2; c++)
                    for (int i = 0; i < TT; i++) {
                        for (int z = 0; z < per_step && pl < total; z++, pl++)
                            __builtin_prefetch(next[pl / (int)(blk / 64)] + 64 * (size_t)(pl % (int)(blk / 64)), 0, 2);
                        const char *row = (c ? vb : kb)[i / BS] + (size_t)(i % BS) * H * ROW + (size_t)h * ROW;
                        for (int l = 0; l < LINES; l++)
                            *acc = add(*acc, work(load_line(row + 64 * l), w));
                    }
        }
        const double t = now_s() - t0;
        best = t < best ? t : best;
    }
    return 2.0 * N / best;
}

int main(int argc, char **argv) {
    line_t acc;
    memset(&acc, 0, sizeof(acc));
    double bps;
    if (argc == 6 && !strcmp(argv[1], "chunks")) {
        const long ch = atol(argv[2]);
        if (ch < 64 || ch % 64 || N % ch) { fprintf(stderr, "CHUNK: a multiple of 64 that divides 512 MiB\n"); return 2; }
        bps = chunks((size_t)ch, atoi(argv[3]), atoi(argv[4]), atoi(argv[5]), &acc);
    } else if (argc == 3 && !strcmp(argv[1], "tiles")) {
        bps = tiles(atoi(argv[2]), &acc);
    } else {
        fprintf(stderr, "usage: %s chunks CHUNK BURST WORK AHEAD | tiles WORK\n", argv[0]);
        return 2;
    }
    printf("%s: %.1f GB/s (%d)\n", argv[1], bps / 1e9, low_bit(acc));
    return 0;
}
