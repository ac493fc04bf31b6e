/* The memory ceiling of the lazy row step: a stand-alone C loop (no optimizer code, no Python) that
 * applies Tiger's update to 10k rows of a 1M x 512 fp32 table (p, state m, gradient g), the same bytes
 * as `bench_lazy.py`'s lazy sparse step with a coalesced gradient (no repeats), in the access patterns
 * that bound it, with 4 KB pages, with 2 MB (transparent huge) pages, and with 2 MB pages for the state
 * only (what an optimizer could madvise for the state it allocates):
 *
 *   dense stream         every row of the table, one pass (what the dense step streams per element)
 *   contiguous rows      10k adjacent rows, one after the other (the same bytes as a stream)
 *   scattered rows       10k sorted random rows, one after the other
 *   groups of 4          the row kernel's loop (tigeropt_rows): 4 rows at a time, 64 elements of each
 *                        in turn, the first 128 bytes of each row's p, m and g prefetched as it joins
 *   + prefetch ahead     and every line of the next group's rows prefetched (software prefetch)
 *   even / odd rows      groups of 4 over rows that start a 4 KB page / end one
 *
 * Time per pass (median / fastest of --reps), process CPU time with 1 thread (other load on a shared
 * machine only adds wall time), wall clock with more; GB/s counts p, m read + written and g read
 * (20 bytes per element).  Build and run:
 *
 *   cc -O3 -march=native -fopenmp -ffp-contract=off -fno-math-errno benchmarks/rows_ceiling.c \
 *      -o /tmp/rows_ceiling && /tmp/rows_ceiling [threads] [reps]
 */
#define _GNU_SOURCE
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define ROWS 1000000
#define DIM 512
#define TOUCHED 10000
#define SIGN(x) (((float)((x) > 0.0f) - (float)((x) < 0.0f)) + (x) * 0.0f)
#define PREFETCH(ptr, bytes, rw)                                                                  \
    do {                                                                                          \
        const char *pf_ = (const char *)(ptr);                                                    \
        for (size_t o_ = 0; o_ < (bytes); o_ += 64) __builtin_prefetch(pf_ + o_, rw, 3);          \
    } while (0)

static float *P, *M, *G;  /* table, state, gradient (a full table: the dense stream reads it all) */
static int64_t *rows;     /* the touched rows of the current pattern, sorted */
static int64_t *grow;     /* gradient row of each touched row: k (a coalesced sparse gradient's values) */

/* Tiger: m = beta*m + (1-beta)*g;  p = p - lr*(sign(m) + wd*p)   (the kernel's fp32 core) */
static void tiger(float *restrict p, const float *restrict g, float *restrict m, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        float mi = fmaf(g[i], 0.055f, m[i] * 0.945f);
        m[i] = mi;
        float pi = p[i];
        p[i] = fmaf(fmaf(pi, 0.01f, SIGN(mi)), -1e-3f, pi);
    }
}

static void one_by_one(int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; k++)
        tiger(P + rows[k] * DIM, G + grow[k] * DIM, M + rows[k] * DIM, DIM);
}

static void groups(int64_t k0, int64_t k1, int ahead) {
    for (int64_t k = k0; k < k1; k += 4) {
        int cnt = k1 - k < 4 ? (int)(k1 - k) : 4;
        float *p[4], *m[4];
        const float *g[4];
        for (int j = 0; j < cnt; j++) {
            p[j] = P + rows[k + j] * DIM, m[j] = M + rows[k + j] * DIM, g[j] = G + grow[k + j] * DIM;
            PREFETCH(p[j], 128, 1);
            PREFETCH(m[j], 128, 1);
            PREFETCH(g[j], 128, 0);
        }
        if (ahead)
            for (int64_t j = k + 4; j < k + 8 && j < k1; j++) {
                PREFETCH(P + rows[j] * DIM, DIM * 4, 1);
                PREFETCH(M + rows[j] * DIM, DIM * 4, 1);
                PREFETCH(G + grow[j] * DIM, DIM * 4, 0);
            }
        for (int o = 0; o < DIM; o += 64)
            for (int j = 0; j < cnt; j++) tiger(p[j] + o, g[j] + o, m[j] + o, 64);
    }
}

static void *table(size_t bytes, int huge) { /* 2 MB aligned, madvised before the first touch */
    size_t align = (size_t)2 << 20;
    char *q = mmap(NULL, bytes + align, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (q == MAP_FAILED) {
        perror("mmap");
        exit(1);
    }
    char *r = (char *)(((uintptr_t)q + align - 1) & ~(uintptr_t)(align - 1));
    madvise(r, bytes, huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
    return r;
}

static double now(int cpu) {
    struct timespec t;
    clock_gettime(cpu ? CLOCK_PROCESS_CPUTIME_ID : CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static int by_value(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}
static int by_time(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static uint64_t rng = 88172645463325252ull;
static uint64_t next(void) {
    rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
    return rng;
}

/* the touched rows: 0 random, 1 adjacent, 2 random even (a row starts a 4 KB page), 3 random odd */
static void pick(int kind) {
    static char used[ROWS];
    memset(used, 0, sizeof used);
    for (int64_t k = 0; k < TOUCHED;) {
        int64_t r = kind == 1 ? k : (int64_t)(next() % ROWS);
        if (kind >= 2) r = (r & ~(int64_t)1) | (kind - 2);
        if (!used[r]) used[r] = 1, rows[k++] = r;
    }
    qsort(rows, TOUCHED, sizeof(int64_t), by_value);
}

enum { DENSE, ONE_BY_ONE, GROUPS, GROUPS_AHEAD };

static void measure(const char *name, int what, int threads, int reps, int huge) {
    double *t = malloc(sizeof(double) * reps);
    int64_t elems = what == DENSE ? (int64_t)ROWS * DIM : (int64_t)TOUCHED * DIM;
    for (int r = -2; r < reps; r++) {
        double t0 = now(threads == 1);
#pragma omp parallel num_threads(threads)
        {
#ifdef _OPENMP
            int64_t i = omp_get_thread_num(), n = omp_get_num_threads();
#else
            int64_t i = 0, n = 1;
#endif
            if (what == DENSE) {
                int64_t a = ROWS * i / n * DIM, b = ROWS * (i + 1) / n * DIM;
                tiger(P + a, G + a, M + a, b - a);
            } else {
                int64_t a = TOUCHED * i / n, b = TOUCHED * (i + 1) / n;
                if (what == ONE_BY_ONE) one_by_one(a, b);
                else groups(a, b, what == GROUPS_AHEAD);
            }
        }
        if (r >= 0) t[r] = (now(threads == 1) - t0) * 1e3;
    }
    qsort(t, reps, sizeof(double), by_time);
    double med = t[reps / 2];
    const char *pages = huge == 2 ? "2 MB for the state only" : (huge ? "2 MB" : "4 KB");
    printf("| %s | %s | %.2f / %.2f | %.1f |\n", pages, name, med, t[0], elems * 20.0 / med / 1e6);
    fflush(stdout);
    free(t);
}

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 1, reps = argc > 2 ? atoi(argv[2]) : 15;
    size_t bytes = (size_t)ROWS * DIM * sizeof(float);
    rows = malloc(TOUCHED * sizeof(int64_t));
    grow = malloc(TOUCHED * sizeof(int64_t));
    for (int64_t k = 0; k < TOUCHED; k++) grow[k] = k; /* gradient rows in order (coalesced values) */
    printf("%d x %d fp32 table, Tiger's update, %d touched rows; median / fastest of %d passes (%s), %d "
           "thread(s)\n\n| pages | pattern | ms | GB/s |\n|---|---|---|---|\n",
           ROWS, DIM, TOUCHED, reps, threads == 1 ? "process CPU time" : "wall clock", threads);
    for (int huge = 0; huge < 3; huge++) { /* 4 KB pages, 2 MB pages, 2 MB pages for the state m only */
        P = table(bytes, huge == 1), M = table(bytes, huge != 0), G = table(bytes, huge == 1);
        for (size_t i = 0; i < (size_t)ROWS * DIM; i++) P[i] = (float)(i & 127) * 0.01f - 0.6f;
        memset(M, 0, bytes);
        for (size_t i = 0; i < (size_t)ROWS * DIM; i++) G[i] = (float)(i & 15) - 7.5f;
        measure("dense stream (all 1M rows)", DENSE, threads, reps, huge);
        if (huge == 2) {
            pick(0);
            measure("scattered rows, groups of 4 (the kernel's loop)", GROUPS, threads, reps, huge);
            munmap(P, bytes), munmap(M, bytes), munmap(G, bytes);
            continue;
        }
        pick(1);
        measure("contiguous rows, one by one", ONE_BY_ONE, threads, reps, huge);
        pick(0);
        measure("scattered rows, one by one", ONE_BY_ONE, threads, reps, huge);
        measure("scattered rows, groups of 4 (the kernel's loop)", GROUPS, threads, reps, huge);
        measure("scattered rows, groups of 4 + prefetch ahead", GROUPS_AHEAD, threads, reps, huge);
        pick(2);
        measure("scattered even rows (start a 4 KB page), groups of 4", GROUPS, threads, reps, huge);
        pick(3);
        measure("scattered odd rows (end a 4 KB page), groups of 4", GROUPS, threads, reps, huge);
        munmap(P, bytes), munmap(M, bytes), munmap(G, bytes); /* the aligned parts (the slack stays mapped) */
    }
    return 0;
}
