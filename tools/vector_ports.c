/* What this core's vector units do per cycle: the pipe model behind docs/speed-notes.md's "Compute per row".
 *
 *   gcc -O2 -march=native tools/vector_ports.c -o /tmp/vp && /tmp/vp
 *
 * Each line times a loop of independent 512-bit instructions (no chains between them) and prints the
 * cycles one iteration takes, the clock taken from a chain of dependent VPADDD (one cycle each). A
 * mix's time against its parts' shows which instructions share execution pipes: two kinds that do
 * not share run in the time of the slower, two that do in the sum. Needs AVX512-VNNI, BF16, VBMI and GFNI.
 */
#define _POSIX_C_SOURCE 199309L  /* clock_gettime under -std=c11 */
#include <stdio.h>
#include <time.h>

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

enum { N = 20000000 };
static char buf[256] __attribute__((aligned(64)));

/* eight independent instructions of a kind (those that only write their destination may share one) */
#define X8(op, a, b, d0)                                                                                  \
    op " " a "," b ",%%zmm" #d0 "\n" op " " a "," b ",%%zmm" #d0 "\n" op " " a "," b ",%%zmm" #d0 "\n" \
    op " " a "," b ",%%zmm" #d0 "\n" op " " a "," b ",%%zmm" #d0 "\n" op " " a "," b ",%%zmm" #d0 "\n" \
    op " " a "," b ",%%zmm" #d0 "\n" op " " a "," b ",%%zmm" #d0 "\n"
/* eight of a kind that read their destination, one accumulator each: zmm0-7 or zmm8-15 */
#define ACC8(op, a, b, r0, r1, r2, r3, r4, r5, r6, r7)                                                   \
    op " " a "," b ",%%zmm" #r0 "\n" op " " a "," b ",%%zmm" #r1 "\n" op " " a "," b ",%%zmm" #r2 "\n" \
    op " " a "," b ",%%zmm" #r3 "\n" op " " a "," b ",%%zmm" #r4 "\n" op " " a "," b ",%%zmm" #r5 "\n" \
    op " " a "," b ",%%zmm" #r6 "\n" op " " a "," b ",%%zmm" #r7 "\n"
#define ACC_LO(op, a, b) ACC8(op, a, b, 0, 1, 2, 3, 4, 5, 6, 7)
#define ACC_HI(op, a, b) ACC8(op, a, b, 8, 9, 10, 11, 12, 13, 14, 15)
#define DP ACC_LO("vpdpwssd", "%%zmm20", "%%zmm21")
#define BF ACC_LO("vdpbf16ps", "%%zmm20", "%%zmm21")
#define UNP X8("vpunpcklwd", "%%zmm22", "%%zmm23", 9)
#define ADD X8("vpaddd", "%%zmm22", "%%zmm23", 10)
#define FMA ACC_HI("vfmadd231ps", "%%zmm22", "%%zmm23")
#define MOV "vmovdqa32 %%zmm22,%%zmm12\n vmovdqa32 %%zmm23,%%zmm12\n vmovdqa32 %%zmm22,%%zmm12\n vmovdqa32 %%zmm23,%%zmm12\n" \
            "vmovdqa32 %%zmm22,%%zmm12\n vmovdqa32 %%zmm23,%%zmm12\n vmovdqa32 %%zmm22,%%zmm12\n vmovdqa32 %%zmm23,%%zmm12\n"
#define PERM X8("vpermw", "%%zmm22", "%%zmm23", 13)
#define PERMT2B ACC_HI("vpermt2b", "%%zmm22", "%%zmm23")  /* (it reads its destination: one each) */

static double ghz;

static void report(const char *name, double t) { printf("%-34s %5.2f cycles\n", name, t / N * ghz * 1e9); }

#define TIME(name, code)                                                                                   \
    do {                                                                                                   \
        const double t0 = now_s();                                                                         \
        for (long i = 0; i < N; i++)                                                                       \
            __asm__ volatile(code ::"r"(buf)                                                               \
                             : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", \
                               "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "xmm16", "xmm17", "xmm18",   \
                               "xmm19", "xmm24", "xmm25", "xmm26", "xmm27", "xmm28", "xmm29", "xmm30", "xmm31",   \
                               "k1", "k2", "k3", "k4", "memory");                               \
        report(name, now_s() - t0);                                                                        \
    } while (0)

int main(void) {
    const double t0 = now_s();
    for (long i = 0; i < N; i++)
        __asm__ volatile("vpaddd %%zmm0,%%zmm0,%%zmm0\n vpaddd %%zmm0,%%zmm0,%%zmm0\n vpaddd %%zmm0,%%zmm0,%%zmm0\n"
                         "vpaddd %%zmm0,%%zmm0,%%zmm0\n vpaddd %%zmm0,%%zmm0,%%zmm0\n vpaddd %%zmm0,%%zmm0,%%zmm0\n"
                         "vpaddd %%zmm0,%%zmm0,%%zmm0\n vpaddd %%zmm0,%%zmm0,%%zmm0\n" ::: "xmm0");
    ghz = 8.0 * N / (now_s() - t0) / 1e9;
    printf("clock %.2f GHz (a chain of VPADDD, one cycle each); cycles per iteration of:\n", ghz);
    TIME("8 VPDPWSSD", DP);
    TIME("8 VDPBF16PS", BF);
    TIME("8 VPMOVSXBW (widen int8)", "vpmovsxbw (%0),%%zmm8\n vpmovsxbw 32(%0),%%zmm8\n vpmovsxbw (%0),%%zmm8\n"
                                      "vpmovsxbw 32(%0),%%zmm8\n vpmovsxbw (%0),%%zmm8\n vpmovsxbw 32(%0),%%zmm8\n"
                                      "vpmovsxbw (%0),%%zmm8\n vpmovsxbw 32(%0),%%zmm8\n");
    TIME("8 VPUNPCKLWD", UNP);
    TIME("8 VPADDD", ADD);
    TIME("8 VFMADD231PS", FMA);
    TIME("8 VPERMW", PERM);
    TIME("8 VPDPWSSD + 8 VPMOVSXBW", DP "vpmovsxbw (%0),%%zmm8\n vpmovsxbw 32(%0),%%zmm8\n vpmovsxbw (%0),%%zmm8\n"
                                        "vpmovsxbw 32(%0),%%zmm8\n vpmovsxbw (%0),%%zmm8\n vpmovsxbw 32(%0),%%zmm8\n"
                                        "vpmovsxbw (%0),%%zmm8\n vpmovsxbw 32(%0),%%zmm8\n");
    TIME("8 VPDPWSSD + 8 VPUNPCKLWD", DP UNP);
    TIME("8 VPDPWSSD + 8 VPADDD", DP ADD);
    TIME("8 VPDPWSSD + 16 VPADDD", DP ADD ADD);
    TIME("8 VPDPWSSD + 8 VPUNPCKLWD + 8 VPADDD", DP UNP ADD);
    TIME("8 VPDPWSSD + 8 VFMADD231PS", DP FMA);
    TIME("8 VPDPWSSD + 8 VPERMW", DP PERM);
    TIME("8 VPDPWSSD + 8 VMOVDQA32 (reg)", DP MOV);
    TIME("8 VDPBF16PS + 8 VPUNPCKLWD", BF UNP);
    /* the alternatives for 8-bit rows (2026-11-29): VPDPBUSD on bytes, lane-crossing shuffles, in-lane work */
    TIME("8 VPDPBUSD", ACC_LO("vpdpbusd", "%%zmm20", "%%zmm21"));
    TIME("8 VPDPWSSD + 8 VPERMT2B", DP PERMT2B);
    TIME("8 VPDPWSSD + 8 VSHUFI64X2", DP X8("vshufi64x2 $0x44,", "%%zmm22", "%%zmm23", 13));
    TIME("8 VPDPWSSD + 8 VINSERTI64X4 (mem)", DP X8("vinserti64x4 $1,", "32(%0)", "%%zmm23", 13));
    TIME("8 VPDPWSSD + 8 VPUNPCKLBW", DP X8("vpunpcklbw", "%%zmm22", "%%zmm23", 13));
    TIME("8 VPDPWSSD + 8 VPXORD (mem)", DP X8("vpxord", "(%0)", "%%zmm23", 13));
    TIME("8 VPDPWSSD + 8 VPSLLD", DP X8("vpslld", "$7", "%%zmm22", 13));
    TIME("8 VPDPWSSD + 8 VPBROADCASTD (mem)", DP "vpbroadcastd (%0),%%zmm13\n vpbroadcastd 4(%0),%%zmm13\n vpbroadcastd 8(%0),%%zmm13\n"
                                               "vpbroadcastd 12(%0),%%zmm13\n vpbroadcastd 16(%0),%%zmm13\n vpbroadcastd 20(%0),%%zmm13\n"
                                               "vpbroadcastd 24(%0),%%zmm13\n vpbroadcastd 28(%0),%%zmm13\n");
    TIME("8 VPDPWSSD, one operand from memory", "vpdpwssd (%0),%%zmm21,%%zmm0\n vpdpwssd 64(%0),%%zmm21,%%zmm1\n vpdpwssd 128(%0),%%zmm21,%%zmm2\n"
                                                "vpdpwssd 192(%0),%%zmm21,%%zmm3\n vpdpwssd (%0),%%zmm21,%%zmm4\n vpdpwssd 64(%0),%%zmm21,%%zmm5\n"
                                                "vpdpwssd 128(%0),%%zmm21,%%zmm6\n vpdpwssd 192(%0),%%zmm21,%%zmm7\n");
    TIME("8 VPDPWSSD, one operand broadcast", "vpdpwssd (%0)%{1to16%},%%zmm21,%%zmm0\n vpdpwssd 4(%0)%{1to16%},%%zmm21,%%zmm1\n"
                                              "vpdpwssd 8(%0)%{1to16%},%%zmm21,%%zmm2\n vpdpwssd 12(%0)%{1to16%},%%zmm21,%%zmm3\n"
                                              "vpdpwssd 16(%0)%{1to16%},%%zmm21,%%zmm4\n vpdpwssd 20(%0)%{1to16%},%%zmm21,%%zmm5\n"
                                              "vpdpwssd 24(%0)%{1to16%},%%zmm21,%%zmm6\n vpdpwssd 28(%0)%{1to16%},%%zmm21,%%zmm7\n");
    /* fp8 conversions on the bf16 products (2026-11-29, sixth round): the table lookup's VPERMI2B against
     * the alternatives, one 512-bit VDPBF16PS per conversion instruction */
    TIME("8 VDPBF16PS + 8 VPERMI2B", BF ACC_HI("vpermi2b", "%%zmm22", "%%zmm23"));
    TIME("8 VDPBF16PS + 8 VPERMB", BF X8("vpermb", "%%zmm22", "%%zmm23", 13));
    TIME("8 VDPBF16PS + 8 GF2P8AFFINEQB", BF X8("vgf2p8affineqb $0,", "%%zmm22", "%%zmm23", 13));
    TIME("8 VDPBF16PS + 8 VPSHUFB", BF X8("vpshufb", "%%zmm22", "%%zmm23", 13));
    TIME("8 VDPBF16PS + 8 VPTESTNMB (to a mask)", BF "vptestnmb %%zmm22,%%zmm23,%%k1\n vptestnmb %%zmm22,%%zmm23,%%k2\n"
                                                  "vptestnmb %%zmm22,%%zmm23,%%k3\n vptestnmb %%zmm22,%%zmm23,%%k4\n"
                                                  "vptestnmb %%zmm22,%%zmm23,%%k1\n vptestnmb %%zmm22,%%zmm23,%%k2\n"
                                                  "vptestnmb %%zmm22,%%zmm23,%%k3\n vptestnmb %%zmm22,%%zmm23,%%k4\n");
    /* the int8 scores' instruction mix per key (16 products, 4 widenings, the four heads' reduction):
     * what one key could take if nothing but the pipes limited it */
    TIME("int8 scores mix: 16 VPDPWSSD + 18 others", DP ACC_HI("vpdpwssd", "%%zmm20", "%%zmm21")
         "vpmovsxbw (%0),%%zmm16\n vpmovsxbw 32(%0),%%zmm17\n vpmovsxbw 64(%0),%%zmm18\n vpmovsxbw 96(%0),%%zmm19\n"
         "vpunpckldq %%zmm22,%%zmm23,%%zmm24\n vpunpckhdq %%zmm22,%%zmm23,%%zmm25\n"
         "vpunpckldq %%zmm22,%%zmm23,%%zmm26\n vpunpckhdq %%zmm22,%%zmm23,%%zmm27\n"
         "vpaddd %%zmm22,%%zmm23,%%zmm28\n vpaddd %%zmm22,%%zmm23,%%zmm29\n vpaddd %%zmm22,%%zmm23,%%zmm30\n"
         "vpaddd %%zmm22,%%zmm23,%%zmm31\n vpaddd %%zmm22,%%zmm23,%%zmm24\n vpaddd %%zmm22,%%zmm23,%%zmm25\n"
         "vshufps $0x4e,%%zmm22,%%zmm23,%%zmm26\n vshufps $0x4e,%%zmm22,%%zmm23,%%zmm27\n"
         "vextracti64x4 $1,%%zmm22,%%ymm28\n vextracti64x2 $1,%%ymm23,%%xmm29\n");
    return 0;
}
