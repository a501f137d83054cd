/* Whether this machine's CPUs share one AMX tile unit: what a tile product costs on CPU 0 while CPU 1
 * is idle, multiplies on tiles too, runs AVX-512 FMAs, or runs scalar integer work. The measurement
 * behind docs/speed-notes.md's twelfth round.
 *
 *   gcc -O2 -march=native -pthread tools/amx_share.c -o /tmp/amx_share && /tmp/amx_share [CPU_A CPU_B]
 *   /tmp/amx_share watch CPU SECONDS    # the tile unit's speed on CPU, every 50 ms (one run per CPU at once)
 *
 * Thread A is pinned to CPU_A (default 0) and times a loop of TDPBF16PS (four independent accumulator
 * tiles, so the loop measures throughput, not latency), then of TILELOADD. Thread B, pinned to CPU_B
 * (default 1), runs the neighbour's work for the whole of A's loop: nothing, the same tile loop, a loop
 * of independent 512-bit FMAs, or a loop of scalar integer adds. Each line prints ns per tile
 * instruction on A and, where B does vector or tile work, ns per instruction on B. On two separate
 * cores each with its own tile unit the four columns match; where they are two hyperthreads of one
 * core (or the host shares the unit otherwise), A's tile work slows when B multiplies or runs FMAs.
 * `watch` times 50 ms loops of products on one CPU for SECONDS and prints how many ran near the
 * product's nominal 16 cycles (under 11 ns here) and how many near twice that, with the median of each.
 * Needs AMX-BF16 and Linux's consent (arch_prctl ARCH_REQ_XCOMP_PERM), as the kernels do.
 */
#define _GNU_SOURCE
#include <immintrin.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static void pin(int cpu) {
    cpu_set_t s;
    CPU_ZERO(&s);
    CPU_SET(cpu, &s);
    if (pthread_setaffinity_np(pthread_self(), sizeof s, &s)) {
        fprintf(stderr, "cannot pin a thread to CPU %d\n", cpu);
        exit(1);
    }
}

typedef struct { uint8_t palette, start; uint8_t reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; } tile_cfg;

/* the configuration as an asm operand that reads its 64 bytes: gcc's _tile_loadconfig does not tell the
 * compiler it reads them, and at -O2 the stores that fill it were dropped (as in kernels/amx.h) */
#define load_tile_config(cfg) __asm__ volatile("ldtilecfg\t%0" ::"m"(*(const uint8_t(*)[64])(cfg)))

static void tiles_on(void) {  /* eight 16 x 64-byte tiles */
    tile_cfg c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int i = 0; i < 8; i++) { c.rows[i] = 16; c.colsb[i] = 64; }
    load_tile_config(&c);
}

enum { NONE, TILES, FMA, SCALAR };
static const char *names[] = {"idle", "tile products", "AVX-512 FMAs", "scalar adds"};
static volatile int stop;
static char tile_buf[2][4096] __attribute__((aligned(64)));

/* n rounds of four products into four accumulators; returns ns per product */
static double products(long n) {
    const double t0 = now_s();
    for (long i = 0; i < n; i++) {
        _tile_dpbf16ps(0, 4, 5); _tile_dpbf16ps(1, 4, 6); _tile_dpbf16ps(2, 4, 7); _tile_dpbf16ps(3, 5, 6);
    }
    return (now_s() - t0) / (4.0 * (double)n) * 1e9;
}

static double loads(long n, const char *buf) {  /* ns per TILELOADD of 16 rows */
    const double t0 = now_s();
    for (long i = 0; i < n; i++) {
        _tile_loadd(4, buf, 64); _tile_loadd(5, buf + 1024, 64); _tile_loadd(6, buf + 2048, 64); _tile_loadd(7, buf + 3072, 64);
    }
    return (now_s() - t0) / (4.0 * (double)n) * 1e9;
}

typedef struct { int cpu, work; double ns; } neighbour;

static void *neighbour_main(void *arg) {
    neighbour *b = (neighbour *)arg;
    pin(b->cpu);
    long done = 0;
    const double t0 = now_s();
    if (b->work == TILES) {
        tiles_on();
        memset(tile_buf[1], 0, sizeof tile_buf[1]);
        _tile_loadd(4, tile_buf[1], 64); _tile_loadd(5, tile_buf[1], 64); _tile_loadd(6, tile_buf[1], 64); _tile_loadd(7, tile_buf[1], 64);
        while (!stop) { products(1000); done += 4000; }
        _tile_release();
    } else if (b->work == FMA) {
        __m512 a0 = _mm512_set1_ps(0.f), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
        const __m512 x = _mm512_set1_ps(0.5f), y = _mm512_set1_ps(0.25f);
        while (!stop) {
            for (int i = 0; i < 1000; i++) {  /* eight chains of four-cycle FMAs: two a cycle at most */
                a0 = _mm512_fmadd_ps(a0, x, y); a1 = _mm512_fmadd_ps(a1, x, y); a2 = _mm512_fmadd_ps(a2, x, y);
                a3 = _mm512_fmadd_ps(a3, x, y); a4 = _mm512_fmadd_ps(a4, x, y); a5 = _mm512_fmadd_ps(a5, x, y);
                a6 = _mm512_fmadd_ps(a6, x, y); a7 = _mm512_fmadd_ps(a7, x, y);
            }
            done += 8000;
        }
        const __m512 s = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)),
                                       _mm512_add_ps(_mm512_add_ps(a4, a5), _mm512_add_ps(a6, a7)));
        if (_mm512_reduce_add_ps(s) == 12345.f) puts("");  /* keeps the chains */
    } else if (b->work == SCALAR) {
        uint64_t a = 1, c = 2;
        while (!stop) {
            for (int i = 0; i < 1000; i++) { a += (uint64_t)i; c ^= a; __asm__ volatile("" : "+r"(a), "+r"(c)); }
            done += 1000;
        }
        if (a == c) puts("");
    }
    b->ns = done ? (now_s() - t0) / (double)done * 1e9 : 0.0;
    return NULL;
}

static int by_value(const void *x, const void *y) {
    const double a = *(const double *)x, b = *(const double *)y;
    return (a > b) - (a < b);
}

static int watch(int cpu, double seconds) {
    pin(cpu);
    tiles_on();
    memset(tile_buf[0], 0, sizeof tile_buf[0]);
    _tile_loadd(4, tile_buf[0], 64); _tile_loadd(5, tile_buf[0], 64); _tile_loadd(6, tile_buf[0], 64); _tile_loadd(7, tile_buf[0], 64);
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    enum { MAXN = 100000 };
    static double ns[MAXN], fast[MAXN], slow[MAXN];
    int n = 0, nf = 0, nsl = 0;
    const double t0 = now_s();
    while (now_s() - t0 < seconds && n < MAXN) {
        long reps = 0;
        const double t1 = now_s();
        double t;
        do { products(1000); reps += 1000; } while ((t = now_s()) - t1 < 0.05);
        ns[n] = (t - t1) / (4.0 * (double)reps) * 1e9;
        if (ns[n] < 11.0) fast[nf++] = ns[n]; else slow[nsl++] = ns[n];
        n++;
    }
    _tile_release();
    qsort(fast, (size_t)nf, sizeof(double), by_value);
    qsort(slow, (size_t)nsl, sizeof(double), by_value);
    printf("CPU %d, %d loops of 50 ms: %d under 11 ns a product (median %.2f), %d at 11 ns or more (median %.2f)\n", cpu, n,
           nf, nf ? fast[nf / 2] : 0.0, nsl, nsl ? slow[nsl / 2] : 0.0);
    printf("  in order:");
    for (int i = 0; i < n; i++) printf(" %.1f", ns[i]);
    printf("\n");
    return 0;
}

int main(int argc, char **argv) {
    if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */)) {
        fprintf(stderr, "Linux refused the AMX tile state\n");
        return 1;
    }
    if (argc > 3 && !strcmp(argv[1], "watch")) return watch(atoi(argv[2]), atof(argv[3]));
    const int cpu_a = argc > 2 ? atoi(argv[1]) : 0, cpu_b = argc > 2 ? atoi(argv[2]) : 1;
    pin(cpu_a);
    tiles_on();
    memset(tile_buf[0], 0, sizeof tile_buf[0]);
    _tile_loadd(4, tile_buf[0], 64); _tile_loadd(5, tile_buf[0], 64); _tile_loadd(6, tile_buf[0], 64); _tile_loadd(7, tile_buf[0], 64);
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    products(200000);  /* warm up */
    printf("CPU %d's tile instructions while CPU %d runs: ns per TDPBF16PS, per TILELOADD (neighbour: ns per its instruction)\n",
           cpu_a, cpu_b);
    for (int round = 0; round < 2; round++)
        for (int w = NONE; w <= SCALAR; w++) {
            neighbour b = {cpu_b, w, 0.0};
            pthread_t t;
            stop = 0;
            if (w != NONE) pthread_create(&t, NULL, neighbour_main, &b);
            usleep(20000);  /* the neighbour under way */
            const double p = products(2000000), l = loads(2000000, tile_buf[0]);
            stop = 1;
            if (w != NONE) pthread_join(t, NULL);
            printf("  %-14s %6.2f %6.2f", names[w], p, l);
            if (b.ns > 0) printf("   (neighbour %.2f)", b.ns);
            printf("\n");
        }
    _tile_release();
    return 0;
}
