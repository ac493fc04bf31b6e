/*
 * tigeropt fused CPU step: one call updates a whole list of tensors.
 *
 * Built on first use by tigeropt/_cpu/__init__.py with the system C compiler
 * (cc -O3 -march=native -fopenmp -ffp-contract=off -fno-math-errno -shared -fPIC)
 * and loaded with ctypes.  No Python or torch headers are needed.
 *
 * Every entry point takes the tensors of one call as arrays of data pointers
 * plus their element counts, the hyperparameters as doubles (hp), optional
 * per-tensor scalars as doubles (per), and a thread count.  The tensors are cut
 * into work items (up to 2^20 elements) that the threads of one OpenMP
 * parallel region take in turn, so one region covers the whole list and each
 * byte of p, g and the state is read once and p and the state written once.
 *
 * Numerics follow the reference (single-tensor torch) implementation
 * operation by operation: the math runs in the state dtype (fp32 for bf16 and
 * fp16 parameters), scalars are rounded to that dtype as torch rounds a Python
 * float, `add_(x, alpha=a)` is fma(x, a, self) like ATen's vectorized add,
 * addcmul is fma(value*t1, t2, self) and addcdiv self + (value*t1)/t2, sign(0) =
 * sign(NaN) = 0, and low-precision parameters are rounded once, at the store,
 * to nearest even.  -ffp-contract=off keeps the compiler from fusing anything
 * else.
 *
 * dtype codes: 0 float32, 1 float64, 2 bfloat16, 3 float16 (state is float32
 * for codes 2 and 3, else the parameter's dtype).
 */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__F16C__)
#include <immintrin.h>
#define TIGEROPT_F16 1
#elif defined(__FLT16_MAX__)
#define TIGEROPT_F16 2
#else
#define TIGEROPT_F16 0
#endif

#define TIGEROPT_ABI 1

enum { DT_F32 = 0, DT_F64 = 1, DT_BF16 = 2, DT_F16 = 3 };

/* Elements per thread below which fewer threads are used; bounds of the elements per work
   item (about total / (4 * threads): long streams suit the prefetchers, several items per
   thread balance the load); the block of low-precision elements converted to fp32 at a time
   (stays in L1). */
#define MIN_PER_THREAD 32768
#define MIN_CHUNK 16384
#define MAX_CHUNK 1048576
#define BLOCK 512

int tigeropt_abi(void) { return TIGEROPT_ABI; }

int tigeropt_has_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

int tigeropt_has_f16(void) { return TIGEROPT_F16 != 0; }

/* ------------------------------------------------------------------ conversions */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* c10::BFloat16's round_to_nearest_even. */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if (f != f) return (uint16_t)0x7FC0;
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static void load_bf16(float *restrict dst, const uint16_t *restrict src, int64_t n) {
    for (int64_t i = 0; i < n; i++) dst[i] = bf16_to_f32(src[i]);
}

static void store_bf16(uint16_t *restrict dst, const float *restrict src, int64_t n) {
    for (int64_t i = 0; i < n; i++) dst[i] = f32_to_bf16(src[i]);
}

#if TIGEROPT_F16 == 1
static void load_f16(float *restrict dst, const uint16_t *restrict src, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
    for (; i < n; i++) dst[i] = _cvtsh_ss(src[i]);
}

static void store_f16(uint16_t *restrict dst, const float *restrict src, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(dst + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++) dst[i] = (uint16_t)_cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT);
}
#elif TIGEROPT_F16 == 2
static void load_f16(float *restrict dst, const uint16_t *restrict src, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        _Float16 h;
        memcpy(&h, src + i, sizeof h);
        dst[i] = (float)h;
    }
}

static void store_f16(uint16_t *restrict dst, const float *restrict src, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        _Float16 h = (_Float16)src[i];
        memcpy(dst + i, &h, sizeof h);
    }
}
#endif

/* ------------------------------------------------------------------ core loops
 * One definition per math type T (float, double).  FMA is fmaf/fma, SQRT the
 * correctly rounded square root; gs is +1 or -1 (maximize), exact.
 */

/* sign(x), NaN for an inf/NaN x (x*0 is NaN there, +-0 otherwise): as tigeropt._base.nan_sign */
#define SIGN(T, x) (((T)((x) > (T)0) - (T)((x) < (T)0)) + (x) * (T)0)

#define DEFINE_CORES(T, SUF, FMA, SQRT)                                                           \
    /* m = beta*m + (1-beta)*g;  p = p - lr*(sign(m) + wd*p) */                                   \
    static void tiger_core_##SUF(T *restrict p, const T *restrict g, T *restrict m, int64_t n,    \
                                 T beta, T alpha, T wd, T nlr, T gs) {                            \
        for (int64_t i = 0; i < n; i++) {                                                         \
            T mi = FMA(g[i] * gs, alpha, m[i] * beta);                                            \
            m[i] = mi;                                                                            \
            T pi = p[i];                                                                          \
            p[i] = FMA(FMA(pi, wd, SIGN(T, mi)), nlr, pi);                                           \
        }                                                                                         \
    }                                                                                             \
    /* c = b1*m + (1-b1)*g;  p = p*(1-lr*wd) - lr*sign(c);  m = b2*m + (1-b2)*g */                \
    static void lion_core_##SUF(T *restrict p, const T *restrict g, T *restrict m, int64_t n,     \
                                T b1, T a1, T b2, T a2, T decay, T nlr, T gs) {                   \
        for (int64_t i = 0; i < n; i++) {                                                         \
            T gi = g[i] * gs;                                                                     \
            T mi = m[i];                                                                          \
            T c = FMA(gi, a1, mi * b1);                                                           \
            p[i] = FMA(SIGN(T, c), nlr, p[i] * decay);                                               \
            m[i] = FMA(gi, a2, mi * b2);                                                          \
        }                                                                                         \
    }                                                                                             \
    /* g += wd*p (L2);  m = b1*m + (1-b1)*g;  v = bhat*v + (1-bhat)*g^2;                          \
       p *= 1-lr*wd (decoupled);  p -= lr*m/(sqrt(v) + eps_t) */                                  \
    static void adax_core_##SUF(T *restrict p, const T *restrict g, T *restrict m, T *restrict v, \
                                int64_t n, T b1, T a1, T wd, int l2, T decay, int decoupled,      \
                                T nlr, T gs, T bhat, T omb, T eps_t) {                            \
        for (int64_t i = 0; i < n; i++) {                                                         \
            T pi = p[i];                                                                          \
            T gi = g[i] * gs;                                                                     \
            if (l2) gi = FMA(pi, wd, gi);                                                         \
            T mi = FMA(gi, a1, m[i] * b1);                                                        \
            m[i] = mi;                                                                            \
            T vi = FMA(omb * gi, gi, v[i] * bhat);                                                 \
            v[i] = vi;                                                                            \
            T d = SQRT(vi) + eps_t;                                                               \
            if (decoupled) pi = pi * decay;                                                       \
            p[i] = pi + (nlr * mi) / d;                                                           \
        }                                                                                         \
    }                                                                                             \
    /* g += wd*p;  G += g^2;  p -= clr*g/(sqrt(G) + eps)      (torch.optim.Adagrad) */            \
    static void adagrad_core_##SUF(T *restrict p, const T *restrict g, T *restrict acc,           \
                                   int64_t n, T wd, int l2, T eps, T gs, T nclr) {                \
        for (int64_t i = 0; i < n; i++) {                                                         \
            T pi = p[i];                                                                          \
            T gi = g[i] * gs;                                                                     \
            if (l2) gi = FMA(pi, wd, gi);                                                         \
            T a = FMA(gi, gi, acc[i]);                                                               \
            acc[i] = a;                                                                           \
            p[i] = pi + (nclr * gi) / (SQRT(a) + eps);                                            \
        }                                                                                         \
    }                                                                                             \
    /* g += wd*p;  u = clr*clip(g, -c, c);  p -= u/sqrt(G);  G += u^2      (GloVe) */             \
    static void glove_core_##SUF(T *restrict p, const T *restrict g, T *restrict acc, int64_t n,  \
                                 T wd, int l2, T clip, int do_clip, T gs, T clr) {                \
        for (int64_t i = 0; i < n; i++) {                                                         \
            T pi = p[i];                                                                          \
            T gi = g[i] * gs;                                                                     \
            if (l2) gi = FMA(pi, wd, gi);                                                         \
            if (do_clip) gi = gi < -clip ? -clip : (gi > clip ? clip : gi);                       \
            T u = gi * clr;                                                                       \
            T a = acc[i];                                                                         \
            p[i] = pi - u / SQRT(a);                                                              \
            acc[i] = FMA(u, u, a);                                                                   \
        }                                                                                         \
    }

DEFINE_CORES(float, f32, fmaf, sqrtf)
DEFINE_CORES(double, f64, fma, sqrt)

/* ------------------------------------------------------------------ call arguments */

typedef struct {
    int dtype;
    void *const *p;
    void *const *g;
    void *const *s1;
    void *const *s2;
    const double *hp;  /* global hyperparameters (meaning per optimizer) */
    const double *per; /* per-tensor scalars, `nper` per tensor, or NULL */
    int nper;
    const void *ext; /* the low-precision step's arguments (LpArgs), or NULL */
} Args;

typedef void (*RangeFn)(const Args *a, int t, int64_t start, int64_t len);

/* Work items are (tensor, start, length) pieces of at most `chunk` elements.  Threads take
   them in order from a shared counter (OpenMP dynamic schedule): the work balances itself
   over threads, and a thread that starts late (another process holds its core) finds the
   work already done by the others instead of making them wait for its share. */
typedef struct {
    int t;
    int64_t start, len;
} Item;

static void run_items(const Item *items, int64_t nitems, int nt, RangeFn fn, const Args *a) {
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1)
#endif
    for (int64_t k = 0; k < nitems; k++) fn(a, items[k].t, items[k].start, items[k].len);
}

/* shift (or NULL): per tensor, work items start at local positions k*chunk - shift[t] (k >= 1) besides 0,
   so that a grid the caller needs (the low-precision step's 256-element blocks) is never cut. */
static void run_shifted(int n, const int64_t *numel, const int64_t *shift, int nthreads, RangeFn fn,
                        const Args *a) {
    int64_t total = 0, nitems = 0;
    for (int i = 0; i < n; i++) total += numel[i];
    if (total <= 0) return;
    int nt = nthreads < 1 ? 1 : nthreads;
    if ((int64_t)nt * MIN_PER_THREAD > total) nt = (int)(total / MIN_PER_THREAD);
    if (nt < 1) nt = 1;
    int64_t chunk = total / (4 * (int64_t)nt);
    chunk = (chunk + 4095) / 4096 * 4096;
    chunk = chunk < MIN_CHUNK ? MIN_CHUNK : (chunk > MAX_CHUNK ? MAX_CHUNK : chunk);
    for (int i = 0; i < n; i++) nitems += (numel[i] + (shift ? shift[i] : 0) + chunk - 1) / chunk;
    if (nt == 1) {
        for (int i = 0; i < n; i++)
            if (numel[i] > 0) fn(a, i, 0, numel[i]);
        return;
    }
    Item stack_items[256];
    Item *items = nitems <= 256 ? stack_items : (Item *)malloc((size_t)nitems * sizeof(Item));
    if (items == NULL) { /* out of memory: one thread, no table */
        for (int i = 0; i < n; i++)
            if (numel[i] > 0) fn(a, i, 0, numel[i]);
        return;
    }
    int64_t k = 0;
    for (int i = 0; i < n; i++) {
        int64_t sh = shift ? shift[i] : 0;
        for (int64_t s = 0; s < numel[i];) {
            int64_t e = (s + sh) / chunk * chunk + chunk - sh; /* the next boundary after s */
            if (e > numel[i]) e = numel[i];
            items[k].t = i;
            items[k].start = s;
            items[k].len = e - s;
            k++;
            s = e;
        }
    }
    run_items(items, k, nt, fn, a);
    if (items != stack_items) free(items);
}

static void run(int n, const int64_t *numel, int nthreads, RangeFn fn, const Args *a) {
    run_shifted(n, numel, NULL, nthreads, fn, a);
}

/* Low-precision parameters: convert blocks of p and g to fp32, run the fp32
   core on them and the fp32 state, round p back. */
#if TIGEROPT_F16
#define LOWP_LOAD(dst, src, n, dt) ((dt) == DT_BF16 ? load_bf16(dst, src, n) : load_f16(dst, src, n))
#define LOWP_STORE(dst, src, n, dt) ((dt) == DT_BF16 ? store_bf16(dst, src, n) : store_f16(dst, src, n))
#else
#define LOWP_LOAD(dst, src, n, dt) load_bf16(dst, src, n)
#define LOWP_STORE(dst, src, n, dt) store_bf16(dst, src, n)
#endif

#define LOWP_BLOCKS(a, t, start, len, CALL)                                                       \
    do {                                                                                          \
        uint16_t *p16 = (uint16_t *)(a)->p[t] + (start);                                          \
        const uint16_t *g16 = (const uint16_t *)(a)->g[t] + (start);                              \
        float pb[BLOCK], gb[BLOCK];                                                               \
        for (int64_t o = 0; o < (len); o += BLOCK) {                                              \
            int64_t k = (len) - o < BLOCK ? (len) - o : BLOCK;                                    \
            LOWP_LOAD(pb, p16 + o, k, (a)->dtype);                                                \
            LOWP_LOAD(gb, g16 + o, k, (a)->dtype);                                                \
            CALL;                                                                                 \
            LOWP_STORE(p16 + o, pb, k, (a)->dtype);                                               \
        }                                                                                         \
    } while (0)

#define PTR(T, arr, t, start) ((T *)(arr)[t] + (start))

/* ------------------------------------------------------------------ Tiger
   hp = [beta, 1-beta, wd, -lr, gs] */
static void tiger_range(const Args *a, int t, int64_t s, int64_t n) {
    const double *h = a->hp;
    if (a->dtype == DT_F64) {
        tiger_core_f64(PTR(double, a->p, t, s), PTR(const double, a->g, t, s), PTR(double, a->s1, t, s),
                       n, h[0], h[1], h[2], h[3], h[4]);
    } else if (a->dtype == DT_F32) {
        tiger_core_f32(PTR(float, a->p, t, s), PTR(const float, a->g, t, s), PTR(float, a->s1, t, s), n,
                       (float)h[0], (float)h[1], (float)h[2], (float)h[3], (float)h[4]);
    } else {
        float *m = PTR(float, a->s1, t, s);
        LOWP_BLOCKS(a, t, s, n,
                    tiger_core_f32(pb, gb, m + o, k, (float)h[0], (float)h[1], (float)h[2], (float)h[3],
                                   (float)h[4]));
    }
}

void tigeropt_tiger(int n, int dtype, void *const *p, void *const *g, void *const *m, const int64_t *numel,
                    const double *hp, int nthreads) {
    Args a = {dtype, p, g, m, NULL, hp, NULL, 0, NULL};
    run(n, numel, nthreads, tiger_range, &a);
}

/* ------------------------------------------------------------------ Lion
   hp = [b1, 1-b1, b2, 1-b2, 1-lr*wd, -lr, gs] */
static void lion_range(const Args *a, int t, int64_t s, int64_t n) {
    const double *h = a->hp;
    if (a->dtype == DT_F64) {
        lion_core_f64(PTR(double, a->p, t, s), PTR(const double, a->g, t, s), PTR(double, a->s1, t, s), n,
                      h[0], h[1], h[2], h[3], h[4], h[5], h[6]);
    } else if (a->dtype == DT_F32) {
        lion_core_f32(PTR(float, a->p, t, s), PTR(const float, a->g, t, s), PTR(float, a->s1, t, s), n,
                      (float)h[0], (float)h[1], (float)h[2], (float)h[3], (float)h[4], (float)h[5],
                      (float)h[6]);
    } else {
        float *m = PTR(float, a->s1, t, s);
        LOWP_BLOCKS(a, t, s, n,
                    lion_core_f32(pb, gb, m + o, k, (float)h[0], (float)h[1], (float)h[2], (float)h[3],
                                  (float)h[4], (float)h[5], (float)h[6]));
    }
}

void tigeropt_lion(int n, int dtype, void *const *p, void *const *g, void *const *m, const int64_t *numel,
                   const double *hp, int nthreads) {
    Args a = {dtype, p, g, m, NULL, hp, NULL, 0, NULL};
    run(n, numel, nthreads, lion_range, &a);
}

/* ------------------------------------------------------------------ AdaX
   hp = [b1, 1-b1, wd, l2, 1-lr*wd, decoupled, -lr, gs]; per = [bhat, 1-bhat, eps_t] per tensor */
static void adax_range(const Args *a, int t, int64_t s, int64_t n) {
    const double *h = a->hp, *q = a->per + 3 * (int64_t)t;
    int l2 = h[3] != 0.0, dec = h[5] != 0.0;
    if (a->dtype == DT_F64) {
        adax_core_f64(PTR(double, a->p, t, s), PTR(const double, a->g, t, s), PTR(double, a->s1, t, s),
                      PTR(double, a->s2, t, s), n, h[0], h[1], h[2], l2, h[4], dec, h[6], h[7], q[0], q[1],
                      q[2]);
    } else if (a->dtype == DT_F32) {
        adax_core_f32(PTR(float, a->p, t, s), PTR(const float, a->g, t, s), PTR(float, a->s1, t, s),
                      PTR(float, a->s2, t, s), n, (float)h[0], (float)h[1], (float)h[2], l2, (float)h[4],
                      dec, (float)h[6], (float)h[7], (float)q[0], (float)q[1], (float)q[2]);
    } else {
        float *m = PTR(float, a->s1, t, s), *v = PTR(float, a->s2, t, s);
        LOWP_BLOCKS(a, t, s, n,
                    adax_core_f32(pb, gb, m + o, v + o, k, (float)h[0], (float)h[1], (float)h[2], l2,
                                  (float)h[4], dec, (float)h[6], (float)h[7], (float)q[0], (float)q[1],
                                  (float)q[2]));
    }
}

void tigeropt_adax(int n, int dtype, void *const *p, void *const *g, void *const *m, void *const *v,
                   const int64_t *numel, const double *hp, const double *per, int nthreads) {
    Args a = {dtype, p, g, m, v, hp, per, 3, NULL};
    run(n, numel, nthreads, adax_range, &a);
}

/* ------------------------------------------------------------------ Adagrad
   hp = [wd, l2, eps, gs, glove, clip, do_clip]; per = [clr] per tensor */
static void adagrad_range(const Args *a, int t, int64_t s, int64_t n) {
    const double *h = a->hp;
    double clr = a->per[t];
    int l2 = h[1] != 0.0, glove = h[4] != 0.0, do_clip = h[6] != 0.0;
    if (a->dtype == DT_F64) {
        double *p = PTR(double, a->p, t, s), *acc = PTR(double, a->s1, t, s);
        const double *g = PTR(const double, a->g, t, s);
        if (glove)
            glove_core_f64(p, g, acc, n, h[0], l2, h[5], do_clip, h[3], clr);
        else
            adagrad_core_f64(p, g, acc, n, h[0], l2, h[2], h[3], -clr);
    } else if (a->dtype == DT_F32) {
        float *p = PTR(float, a->p, t, s), *acc = PTR(float, a->s1, t, s);
        const float *g = PTR(const float, a->g, t, s);
        if (glove)
            glove_core_f32(p, g, acc, n, (float)h[0], l2, (float)h[5], do_clip, (float)h[3], (float)clr);
        else
            adagrad_core_f32(p, g, acc, n, (float)h[0], l2, (float)h[2], (float)h[3], (float)-clr);
    } else {
        float *acc = PTR(float, a->s1, t, s);
        if (glove)
            LOWP_BLOCKS(a, t, s, n,
                        glove_core_f32(pb, gb, acc + o, k, (float)h[0], l2, (float)h[5], do_clip,
                                       (float)h[3], (float)clr));
        else
            LOWP_BLOCKS(a, t, s, n,
                        adagrad_core_f32(pb, gb, acc + o, k, (float)h[0], l2, (float)h[2], (float)h[3],
                                         (float)-clr));
    }
}

void tigeropt_adagrad(int n, int dtype, void *const *p, void *const *g, void *const *acc,
                      const int64_t *numel, const double *hp, const double *per, int nthreads) {
    Args a = {dtype, p, g, acc, NULL, hp, per, 1, NULL};
    run(n, numel, nthreads, adagrad_range, &a);
}

/* ================================================================== rows
 * Row updates of one 2-D (rows x D, contiguous) parameter: lazy rows, sparse gradients and
 * row-wise Adagrad.  One call reads the gradient once and p and the state of each updated row
 * once, and writes them once; rows the call does not update are not read at all (except the
 * gradient, for the dense-lazy scan).
 *
 * Which rows: with idx != NULL, row idx[k] takes gradient row k of g (the values of a coalesced
 * sparse gradient; idx sorted and unique, so no two threads share a row); with idx == NULL, row
 * k takes gradient row k of a dense gradient.  With all_rows == 0 a row whose gradient is all
 * zero (NaN counts as non-zero, -0.0 as zero) is skipped: "touched" means a non-zero gradient.
 *
 * Element-wise optimizers run the same *_range functions as the dense step on each row (so a
 * touched row gets bit for bit the dense update); hp and per are theirs.  opt codes: 0 Tiger,
 * 1 Lion, 2 AdaX, 3 Adagrad (standard or GloVe-style, as hp says), 4 row-wise Adagrad (hp and
 * per as Adagrad's; the accumulator has one element per row).
 */

#define ROWS_MIN_PER_THREAD 1048576

enum { OPT_TIGER = 0, OPT_LION = 1, OPT_ADAX = 2, OPT_ADAGRAD = 3, OPT_ROWWISE = 4 };

/* Whether any element of a gradient row is non-zero (NaN counts, -0.0 does not): the bits
   outside the sign bit, OR-ed over blocks of 64 elements (vectorizes; stops at the first block
   holding a non-zero). */
/* a float row read through integer words: types that may alias any object (strict aliasing) */
#if defined(__GNUC__)
#define MAY_ALIAS __attribute__((may_alias))
#else
#define MAY_ALIAS
#endif
typedef uint16_t MAY_ALIAS u16_alias;
typedef uint32_t MAY_ALIAS u32_alias;
typedef uint64_t MAY_ALIAS u64_alias;

#define NONZERO_SCAN(UT, MASK)                                                                    \
    do {                                                                                          \
        const UT *x = (const UT *)g;                                                              \
        int64_t i = 0;                                                                            \
        for (; i + 64 <= n; i += 64) {                                                            \
            UT acc = 0;                                                                           \
            for (int j = 0; j < 64; j++) acc |= x[i + j];                                         \
            if (acc & (MASK)) return 1;                                                           \
        }                                                                                         \
        for (; i < n; i++)                                                                        \
            if (x[i] & (MASK)) return 1;                                                          \
        return 0;                                                                                 \
    } while (0)

static int row_nonzero(const void *g, int64_t n, int dtype) {
    if (dtype == DT_F32) NONZERO_SCAN(u32_alias, 0x7FFFFFFFu);
    if (dtype == DT_F64) NONZERO_SCAN(u64_alias, 0x7FFFFFFFFFFFFFFFull);
    NONZERO_SCAN(u16_alias, 0x7FFFu); /* bf16 / fp16 */
}

/* Row-wise Adagrad on one row (math type T):
     g += wd*p (L2);  G += (1/n) sum g^2 (summed in double, rounded once);
     p += (-clr*g) / (sqrt(G) + eps)                 (the reference's addcdiv) */
static double rowwise_total(const double *part) {
    return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

#define DEFINE_ROWWISE(T, SUF, FMA, SQRT)                                                         \
    /* 8 partial sums (vectorizes; the order differs from torch's reduction only below fp64   \
       rounding, far under the fp32 rounding of the mean): element i adds to part[i % 8], the     \
       n % 8 last to part[0], so a row summed in pieces of a multiple of 8 elements (the last     \
       piece holding the tail) gets the same partial sums as in one piece */                      \
    static void rowwise_part_##SUF(double *restrict part, const T *restrict p, const T *restrict g, \
                                   int64_t n, T wd, int l2, T gs) {                               \
        int64_t i = 0;                                                                            \
        for (; i + 8 <= n; i += 8)                                                                \
            for (int j = 0; j < 8; j++) {                                                         \
                T gi = g[i + j] * gs;                                                             \
                if (l2) gi = FMA(p[i + j], wd, gi);                                               \
                part[j] += (double)gi * (double)gi;                                               \
            }                                                                                     \
        for (; i < n; i++) {                                                                      \
            T gi = g[i] * gs;                                                                     \
            if (l2) gi = FMA(p[i], wd, gi);                                                       \
            part[0] += (double)gi * (double)gi;                                                   \
        }                                                                                         \
    }                                                                                             \
    static double rowwise_sumsq_##SUF(const T *restrict p, const T *restrict g, int64_t n, T wd,  \
                                      int l2, T gs) {                                             \
        double part[8] = {0, 0, 0, 0, 0, 0, 0, 0};                                                \
        rowwise_part_##SUF(part, p, g, n, wd, l2, gs);                                            \
        return rowwise_total(part);                                                               \
    }                                                                                             \
    static void rowwise_apply_##SUF(T *restrict p, const T *restrict g, int64_t n, T wd, int l2,  \
                                    T gs, T nclr, T d) {                                          \
        for (int64_t i = 0; i < n; i++) {                                                         \
            T pi = p[i];                                                                          \
            T gi = g[i] * gs;                                                                     \
            if (l2) gi = FMA(pi, wd, gi);                                                         \
            p[i] = pi + (nclr * gi) / d;                                                          \
        }                                                                                         \
    }

DEFINE_ROWWISE(float, f32, fmaf, sqrtf)
DEFINE_ROWWISE(double, f64, fma, sqrt)

/* hp = [wd, l2, eps, gs, ...]; per = [clr] */
static void rowwise_row(int dtype, void *p, const void *g, void *acc, int64_t n, const double *h,
                        const double *per) {
    int l2 = h[1] != 0.0;
    if (dtype == DT_F64) {
        double *a = (double *)acc;
        double ss = rowwise_sumsq_f64((const double *)p, (const double *)g, n, h[0], l2, h[3]);
        double G = *a + ss / (double)n;
        *a = G;
        rowwise_apply_f64((double *)p, (const double *)g, n, h[0], l2, h[3], -per[0], sqrt(G) + h[2]);
        return;
    }
    float wd = (float)h[0], gs = (float)h[3], eps = (float)h[2], nclr = (float)-per[0];
    float *a = (float *)acc;
    if (dtype == DT_F32) {
        double ss = rowwise_sumsq_f32((const float *)p, (const float *)g, n, wd, l2, gs);
        float G = *a + (float)(ss / (double)n);
        *a = G;
        rowwise_apply_f32((float *)p, (const float *)g, n, wd, l2, gs, nclr, sqrtf(G) + eps);
        return;
    }
    uint16_t *p16 = (uint16_t *)p;
    const uint16_t *g16 = (const uint16_t *)g;
    float pb[BLOCK], gb[BLOCK];
    double ss = 0.0;
    for (int64_t o = 0; o < n; o += BLOCK) {
        int64_t k = n - o < BLOCK ? n - o : BLOCK;
        LOWP_LOAD(pb, p16 + o, k, dtype);
        LOWP_LOAD(gb, g16 + o, k, dtype);
        ss += rowwise_sumsq_f32(pb, gb, k, wd, l2, gs);
    }
    float G = *a + (float)(ss / (double)n);
    *a = G;
    float d = sqrtf(G) + eps;
    for (int64_t o = 0; o < n; o += BLOCK) {
        int64_t k = n - o < BLOCK ? n - o : BLOCK;
        LOWP_LOAD(pb, p16 + o, k, dtype);
        LOWP_LOAD(gb, g16 + o, k, dtype);
        rowwise_apply_f32(pb, gb, k, wd, l2, gs, nclr, d);
        LOWP_STORE(p16 + o, pb, k, dtype);
    }
}

/* rows updated together, and elements of each row in turn (see tigeropt_rows) */
#ifndef ROWS_GROUP
#define ROWS_GROUP 4
#endif
#ifndef ROWS_CHUNK
#define ROWS_CHUNK 64
#endif
#if ROWS_CHUNK % 8 != 0
#error "ROWS_CHUNK must be a multiple of 8 (row-wise Adagrad's partial sums)"
#endif

/* Row-wise Adagrad on the rows act[0..nact) of a group (fp32 / fp64): the sums of squares of all the
   rows, ROWS_CHUNK elements of each in turn (several rows' misses in flight, as the element-wise
   rows), then each row's accumulator, then the updates, interleaved the same way; each row gets
   exactly rowwise_row's operations (chunk a multiple of 8 elements, or D: the same partial sums).
   Low-precision rows take rowwise_row (their sums go by conversion blocks). */
static void rowwise_rows(int dtype, int nact, const int *act, void *const *pp, void *const *gp,
                         void *const *acc, int64_t D, int64_t chunk, const double *h, const double *per) {
    if (dtype != DT_F32 && dtype != DT_F64) {
        for (int i = 0; i < nact; i++) rowwise_row(dtype, pp[act[i]], gp[act[i]], acc[act[i]], D, h, per);
        return;
    }
    int l2 = h[1] != 0.0;
    double part[ROWS_GROUP][8], dd[ROWS_GROUP];
    float df[ROWS_GROUP];
    memset(part, 0, sizeof(part));
    float wd = (float)h[0], gs = (float)h[3], eps = (float)h[2], nclr = (float)-per[0];
    for (int64_t o = 0; o < D; o += chunk) {
        int64_t len = D - o < chunk ? D - o : chunk;
        for (int i = 0; i < nact; i++) {
            int j = act[i];
            if (dtype == DT_F64)
                rowwise_part_f64(part[i], (const double *)pp[j] + o, (const double *)gp[j] + o, len, h[0], l2,
                                 h[3]);
            else
                rowwise_part_f32(part[i], (const float *)pp[j] + o, (const float *)gp[j] + o, len, wd, l2, gs);
        }
    }
    for (int i = 0; i < nact; i++) {
        double ss = rowwise_total(part[i]);
        if (dtype == DT_F64) {
            double *a = (double *)acc[act[i]];
            double G = *a + ss / (double)D;
            *a = G;
            dd[i] = sqrt(G) + h[2];
        } else {
            float *a = (float *)acc[act[i]];
            float G = *a + (float)(ss / (double)D);
            *a = G;
            df[i] = sqrtf(G) + eps;
        }
    }
    for (int64_t o = 0; o < D; o += chunk) {
        int64_t len = D - o < chunk ? D - o : chunk;
        for (int i = 0; i < nact; i++) {
            int j = act[i];
            if (dtype == DT_F64)
                rowwise_apply_f64((double *)pp[j] + o, (const double *)gp[j] + o, len, h[0], l2, h[3], -per[0],
                                  dd[i]);
            else
                rowwise_apply_f32((float *)pp[j] + o, (const float *)gp[j] + o, len, wd, l2, gs, nclr, df[i]);
        }
    }
}

static RangeFn range_of(int opt) {
    switch (opt) {
    case OPT_TIGER: return tiger_range;
    case OPT_LION: return lion_range;
    case OPT_ADAX: return adax_range;
    case OPT_ADAGRAD: return adagrad_range;
    default: return NULL;
    }
}

/* buf[0..len) = sum of elements [o, o+len) of the gradient rows order[0..m) of g (rows of D elements),
   added in that order in the gradient's dtype (low precision: each sum rounded to nearest even, as
   torch's coalesce adds rows). */
static void sum_rows(void *buf, const void *g, const int64_t *order, int64_t m, int64_t D, int64_t o,
                     int64_t len, int dtype, size_t pe) {
#define GROW(j) ((const char *)g + ((size_t)order[j] * (size_t)D + (size_t)o) * pe)
    memcpy(buf, GROW(0), (size_t)len * pe);
    for (int64_t j = 1; j < m; j++) {
        const char *x = GROW(j);
        if (dtype == DT_F32) {
            float *b = (float *)buf;
            const float *y = (const float *)x;
            for (int64_t i = 0; i < len; i++) b[i] = b[i] + y[i];
        } else if (dtype == DT_F64) {
            double *b = (double *)buf;
            const double *y = (const double *)x;
            for (int64_t i = 0; i < len; i++) b[i] = b[i] + y[i];
        } else {
            uint16_t *b = (uint16_t *)buf;
            const uint16_t *y = (const uint16_t *)x;
            float fb[BLOCK], fy[BLOCK];
            for (int64_t q = 0; q < len; q += BLOCK) {
                int64_t k = len - q < BLOCK ? len - q : BLOCK;
                LOWP_LOAD(fb, b + q, k, dtype);
                LOWP_LOAD(fy, y + q, k, dtype);
                for (int64_t i = 0; i < k; i++) fb[i] = fb[i] + fy[i];
                LOWP_STORE(b + q, fb, k, dtype);
            }
        }
    }
#undef GROW
}

/* The element-wise update of a group's rows act[0..nact), ROWS_CHUNK elements of each row in turn
   (interleaved).  fp32 rows call the fp32 cores directly with the very arguments *_range passes them
   (converted once per group): the same bits without a call through fn and a dtype dispatch per
   64-element piece (80k calls for 10k rows of 512; 6-8% of the 1M x 512 lazy step).  Other dtypes
   go through fn. */
static void rows_group(int opt, RangeFn fn, const Args *a, int nact, const int *act, int64_t D) {
    if (a[act[0]].dtype == DT_F32) {
        const double *h = a[0].hp, *q = a[0].per;
#define ROWS_LOOP(CALL)                                                                           \
    for (int64_t o = 0; o < D; o += ROWS_CHUNK) {                                                 \
        int64_t len = D - o < ROWS_CHUNK ? D - o : ROWS_CHUNK;                                    \
        for (int i = 0; i < nact; i++) {                                                          \
            const Args *x = &a[act[i]];                                                           \
            float *p = (float *)x->p[0] + o, *s1 = (float *)x->s1[0] + o;                         \
            const float *g = (const float *)x->g[0] + o;                                          \
            CALL;                                                                                 \
        }                                                                                         \
    }
        switch (opt) {
        case OPT_TIGER: {
            float b = (float)h[0], al = (float)h[1], wd = (float)h[2], nlr = (float)h[3], gs = (float)h[4];
            ROWS_LOOP(tiger_core_f32(p, g, s1, len, b, al, wd, nlr, gs));
            return;
        }
        case OPT_LION: {
            float h0 = (float)h[0], h1 = (float)h[1], h2 = (float)h[2], h3 = (float)h[3], h4 = (float)h[4],
                  h5 = (float)h[5], h6 = (float)h[6];
            ROWS_LOOP(lion_core_f32(p, g, s1, len, h0, h1, h2, h3, h4, h5, h6));
            return;
        }
        case OPT_ADAX: {
            int l2 = h[3] != 0.0, dec = h[5] != 0.0;
            float h0 = (float)h[0], h1 = (float)h[1], h2 = (float)h[2], h4 = (float)h[4], h6 = (float)h[6],
                  h7 = (float)h[7], q0 = (float)q[0], q1 = (float)q[1], q2 = (float)q[2];
            ROWS_LOOP(adax_core_f32(p, g, s1, (float *)x->s2[0] + o, len, h0, h1, h2, l2, h4, dec, h6, h7, q0,
                                    q1, q2));
            return;
        }
        case OPT_ADAGRAD: {
            int l2 = h[1] != 0.0, glove = h[4] != 0.0, do_clip = h[6] != 0.0;
            float wd = (float)h[0], eps = (float)h[2], gs = (float)h[3], clip = (float)h[5], clr = (float)q[0];
            if (glove)
                ROWS_LOOP(glove_core_f32(p, g, s1, len, wd, l2, clip, do_clip, gs, clr))
            else
                ROWS_LOOP(adagrad_core_f32(p, g, s1, len, wd, l2, eps, gs, -clr))
            return;
        }
        default: break;
        }
#undef ROWS_LOOP
    }
    for (int64_t o = 0; o < D; o += ROWS_CHUNK) { /* interleaved */
        int64_t len = D - o < ROWS_CHUNK ? D - o : ROWS_CHUNK;
        for (int i = 0; i < nact; i++) fn(&a[act[i]], 0, o, len);
    }
}

/* Rows of the call, three ways:
     idx == NULL:                 rows 0..nrows-1, gradient row k of a dense g;
     idx != NULL, order == NULL:  rows idx[0..nidx) (sorted, unique), gradient row k (coalesced sparse);
     idx != NULL, order != NULL:  idx[0..nidx) sorted with repeats (an uncoalesced sparse gradient's
                                  indices, stably sorted), order[k] the gradient row of entry k: the
                                  rows of each run of equal indices are summed first (coalescing in
                                  the kernel, without torch's coalesce pass).
   Scattered rows are bound by memory latency, not bandwidth: the touched rows are updated in groups of
   ROWS_GROUP, ROWS_CHUNK elements of each row in turn, so that several rows' misses are in flight at
   once, and the first ROWS_JOIN_BYTES of a row's p and state (and of the gradient rows of a repeated
   index) are prefetched when the row joins its group.  The rows of a repeated index are summed when
   its group is full, ROWS_CHUNK elements of each group member in turn (summing them as the row joined
   read them one after the other: 1M x 512 fp32 with 2.5k repeats among 12.5k entries, 1.8 ms of a
   9 ms step); a sum that is all zero (cancelling repeats) drops out of the group.  A listed row's
   gradient (idx != NULL) is likewise checked for a non-zero when its group is full, its first
   ROWS_REPEAT_BYTES prefetched as it joins (checked as it joined, each row's first gradient line was
   a miss waited for alone: 0.4-0.9 ms of a 6-7 ms sparse step); a dense gradient's rows are still
   checked as they come (most of them are zero and never join).  Prefetching later
   candidates' rows ahead (1-8 rows, 128-512 bytes) was slower, as were larger groups or chunks.
   Row-wise Adagrad rows are grouped the same way.  Each element still gets the dense step's function
   once: the same bits.
   Returns the number of rows updated. */
#ifndef ROWS_JOIN_BYTES
#define ROWS_JOIN_BYTES 128
#endif
#ifndef ROWS_REPEAT_BYTES
#define ROWS_REPEAT_BYTES 128
#endif
#define ROWS_BLOCK 16 /* candidate rows per scheduling block (the threads' unit of work) */

/* (inline macro: GCC drops a call to a function that only prefetches) */
#define PREFETCH_LINES(ptr, bytes, rw)                                                            \
    do {                                                                                          \
        const char *pf_ = (const char *)(ptr);                                                    \
        for (size_t off_ = 0; off_ < (bytes); off_ += 64) __builtin_prefetch(pf_ + off_, rw, 3);  \
    } while (0)

int64_t tigeropt_rows(int opt, int dtype, void *p, const void *g, void *s1, void *s2, int64_t nrows,
                      int64_t D, const int64_t *idx, const int64_t *order, int64_t nidx, int all_rows,
                      const double *hp, const double *per, int nthreads) {
    if (D <= 0) return 0;
    int64_t *seg = NULL;
    int64_t n = idx != NULL ? nidx : nrows;
    if (idx != NULL && order != NULL && nidx > 0) {
        seg = (int64_t *)malloc((size_t)(nidx + 1) * sizeof(int64_t));
        if (seg == NULL) return -1;
        n = 0;
        for (int64_t k = 0; k < nidx; k++)
            if (k == 0 || idx[k] != idx[k - 1]) seg[n++] = k;
        seg[n] = nidx;
    }
    if (n <= 0) {
        free(seg);
        return 0;
    }
    size_t pe = dtype == DT_F64 ? 8 : (dtype == DT_F32 ? 4 : 2);
    size_t se = dtype == DT_F64 ? 8 : 4;
    size_t prow = (size_t)D * pe, srow = opt == OPT_ROWWISE ? se : (size_t)D * se;
    size_t join_p = prow < ROWS_JOIN_BYTES ? prow : ROWS_JOIN_BYTES;
    size_t join_s = srow < ROWS_JOIN_BYTES ? srow : ROWS_JOIN_BYTES;
    size_t join_g = prow < ROWS_REPEAT_BYTES ? prow : ROWS_REPEAT_BYTES;
    RangeFn fn = range_of(opt);
    int64_t total = (idx != NULL ? nidx : n) * D;
    int nt = nthreads < 1 ? 1 : nthreads;
    /* Scattered rows: a thread pays off only for a large share (waking a second thread costs more
       than a few hundred rows on one). */
    if ((int64_t)nt * ROWS_MIN_PER_THREAD > total) nt = (int)(total / ROWS_MIN_PER_THREAD);
    if (nt < 1) nt = 1;
    int64_t updated = 0;
    int failed = 0;
    int64_t nblocks = (n + ROWS_BLOCK - 1) / ROWS_BLOCK;
    int defer = idx != NULL && !all_rows; /* listed rows: the zero check when the group is full */
#ifdef _OPENMP
#pragma omp parallel num_threads(nt) if (nt > 1) reduction(+ : updated, failed)
#endif
    {
        char *buf = NULL; /* ROWS_GROUP summed gradient rows (repeated sparse indices) */
        void *pp[ROWS_GROUP], *gp[ROWS_GROUP], *m1[ROWS_GROUP], *m2[ROWS_GROUP];
        int64_t rk[ROWS_GROUP], rm[ROWS_GROUP]; /* a repeated index's entries: first, count (else 0) */
        Args a[ROWS_GROUP];
        if (seg != NULL && seg[n] > n) { /* repeats: room for a group's sums */
            buf = (char *)malloc((size_t)ROWS_GROUP * prow);
            if (buf == NULL) failed++;
        }
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
        for (int64_t b = 0; b < nblocks; b++) {
            if (seg != NULL && seg[n] > n && buf == NULL) continue; /* out of memory: report, change nothing */
            int64_t kend = (b + 1) * ROWS_BLOCK < n ? (b + 1) * ROWS_BLOCK : n;
            int cnt = 0, nrep = 0;
            for (int64_t k = b * ROWS_BLOCK; k < kend || cnt > 0;) {
                if (k < kend) { /* the next candidate row: join the group if touched */
                    int64_t r;
                    const char *gr;
                    rm[cnt] = 0;
                    if (seg != NULL) {
                        int64_t k0 = seg[k], m = seg[k + 1] - seg[k];
                        r = idx[k0];
                        if (m == 1) {
                            gr = (const char *)g + (size_t)order[k0] * prow;
                        } else { /* summed when the group is full */
                            gr = buf + (size_t)cnt * prow;
                            rk[cnt] = k0;
                            rm[cnt] = m;
                            nrep++;
                            for (int64_t j = 0; j < m; j++)
                                PREFETCH_LINES((const char *)g + (size_t)order[k0 + j] * prow, join_g, 0);
                        }
                    } else {
                        r = idx != NULL ? idx[k] : k;
                        gr = (const char *)g + (size_t)k * prow;
                    }
                    k++;
                    if (defer) {
                        if (rm[cnt] == 0) PREFETCH_LINES(gr, join_g, 0);
                    } else if (!all_rows && !row_nonzero(gr, D, dtype)) {
                        continue;
                    }
                    pp[cnt] = (char *)p + (size_t)r * prow;
                    gp[cnt] = (void *)gr;
                    m1[cnt] = s1 != NULL ? (char *)s1 + (size_t)r * srow : NULL;
                    m2[cnt] = s2 != NULL ? (char *)s2 + (size_t)r * srow : NULL;
                    PREFETCH_LINES(pp[cnt], join_p, 1);
                    if (m1[cnt] != NULL) PREFETCH_LINES(m1[cnt], join_s, 1);
                    if (m2[cnt] != NULL) PREFETCH_LINES(m2[cnt], join_s, 1);
                    Args aj = {dtype, &pp[cnt], &gp[cnt], &m1[cnt], &m2[cnt], hp, per, 0, NULL};
                    a[cnt] = aj;
                    if (++cnt < ROWS_GROUP) continue;
                }
                /* a full group, or the block's last candidate rows: sum the repeated indices' rows,
                   drop the listed rows and sums that are all zero, update the rest */
                int act[ROWS_GROUP], nact = 0;
                if (nrep > 0)
                    for (int64_t o = 0; o < D; o += ROWS_CHUNK) {
                        int64_t len = D - o < ROWS_CHUNK ? D - o : ROWS_CHUNK;
                        for (int j = 0; j < cnt; j++)
                            if (rm[j] > 0)
                                sum_rows((char *)gp[j] + (size_t)o * pe, g, order + rk[j], rm[j], D, o, len,
                                         dtype, pe);
                    }
                for (int j = 0; j < cnt; j++)
                    if ((rm[j] == 0 && !defer) || row_nonzero(gp[j], D, dtype)) act[nact++] = j;
                updated += nact;
                if (opt == OPT_ROWWISE) {
                    /* every row in order (the dense step): one row after the other; interleaved, the
                       1M x 512 dense step took 2.5x longer */
                    rowwise_rows(dtype, nact, act, pp, gp, m1, D, all_rows ? D : ROWS_CHUNK, hp, per);
                } else {
                    if (nact > 0) rows_group(opt, fn, a, nact, act, D);
                }
                cnt = 0;
                nrep = 0;
            }
        }
        free(buf);
    }
    free(seg);
    return failed ? -1 : updated;
}

/* Stable sort of an uncoalesced sparse gradient's row indices, in C: sidx = idx sorted, order = the
   positions in idx of the sorted entries, equal indices in the order they appear (what
   torch.sort(idx, stable=True) gives).  Least-significant-digit radix sort (ROWS_SORT_BITS-bit digits,
   as many passes as the row count needs: 2 for a million rows) of idx[k] << pb | k, pb the bits of
   the largest position; when index and position do not fit in 64 bits together (over 2^44 rows for a
   million entries), a bottom-up merge sort of the positions.  Returns 0; -2 when an index is outside
   [0, nrows) (nothing written); -1 out of memory. */
#define ROWS_SORT_BITS 11
static int bits_for(uint64_t x) { /* bits needed to write x (>= 1) */
    int b = 1;
    while (b < 64 && (x >> b) != 0) b++;
    return b;
}

static int merge_sort_rows(const int64_t *idx, int64_t n, int64_t *sidx, int64_t *order) {
    int64_t *t = (int64_t *)malloc((size_t)n * sizeof(int64_t));
    if (t == NULL) return -1;
    int64_t *x = order, *y = t;
    for (int64_t k = 0; k < n; k++) x[k] = k;
    for (int64_t w = 1; w < n; w *= 2) {
        for (int64_t lo = 0; lo < n; lo += 2 * w) {
            int64_t mid = lo + w < n ? lo + w : n, hi = lo + 2 * w < n ? lo + 2 * w : n;
            int64_t i = lo, j = mid, o = lo;
            while (i < mid && j < hi) y[o++] = idx[x[j]] < idx[x[i]] ? x[j++] : x[i++]; /* ties: left */
            while (i < mid) y[o++] = x[i++];
            while (j < hi) y[o++] = x[j++];
        }
        int64_t *z = x;
        x = y;
        y = z;
    }
    if (x != order) memcpy(order, x, (size_t)n * sizeof(int64_t));
    free(t);
    for (int64_t k = 0; k < n; k++) sidx[k] = idx[order[k]];
    return 0;
}

int tigeropt_rows_sort(const int64_t *idx, int64_t n, int64_t nrows, int64_t *sidx, int64_t *order) {
    if (n <= 0) return 0;
    for (int64_t k = 0; k < n; k++)
        if (idx[k] < 0 || idx[k] >= nrows) return -2;
    int pb = bits_for((uint64_t)(n - 1)), kb = bits_for((uint64_t)(nrows - 1));
    if (pb + kb > 64) return merge_sort_rows(idx, n, sidx, order);
    uint64_t *a = (uint64_t *)sidx, *t = (uint64_t *)order; /* ping-pong in the outputs */
    for (int64_t k = 0; k < n; k++) a[k] = (uint64_t)idx[k] << pb | (uint64_t)k;
    int passes = (kb + ROWS_SORT_BITS - 1) / ROWS_SORT_BITS;
    size_t nb = (size_t)1 << ROWS_SORT_BITS;
    int64_t *hist = (int64_t *)calloc((size_t)passes * nb, sizeof(int64_t));
    if (hist == NULL) return -1;
    for (int64_t k = 0; k < n; k++)
        for (int d = 0; d < passes; d++) hist[d * nb + ((a[k] >> (pb + d * ROWS_SORT_BITS)) & (nb - 1))]++;
    for (int d = 0; d < passes; d++) {
        int64_t *h = hist + d * nb, sum = 0;
        int shift = pb + d * ROWS_SORT_BITS;
        if (h[(a[0] >> shift) & (nb - 1)] == n) continue; /* one digit value: already in order */
        for (size_t j = 0; j < nb; j++) {
            int64_t c = h[j];
            h[j] = sum;
            sum += c;
        }
        for (int64_t k = 0; k < n; k++) t[h[(a[k] >> shift) & (nb - 1)]++] = a[k];
        uint64_t *x = a;
        a = t;
        t = x;
    }
    free(hist);
    uint64_t mask = pb == 64 ? ~(uint64_t)0 : (((uint64_t)1 << pb) - 1);
    for (int64_t k = 0; k < n; k++) { /* a is sidx or order: read each entry once, write both */
        uint64_t v = a[k];
        sidx[k] = (int64_t)(v >> pb);
        order[k] = (int64_t)(v & mask);
    }
    return 0;
}

/* A sparse COO gradient's row update in one call: idx[0..nidx) its row indices as given (any order,
   repeats), g its values.  coalesced != 0: idx sorted and unique (the rows are updated as given) when
   a check of every index confirms it (torch trusts is_coalesced=True without checking: indices out of
   order or repeated go the uncoalesced way); otherwise the indices are sorted here (tigeropt_rows_sort)
   and repeats summed in the order they appear.  Returns tigeropt_rows's count, or tigeropt_rows_sort's
   error (-2, -1) before any row changes. */
int64_t tigeropt_rows_sparse(int opt, int dtype, void *p, const void *g, void *s1, void *s2, int64_t nrows,
                             int64_t D, const int64_t *idx, int64_t nidx, int coalesced, const double *hp,
                             const double *per, int nthreads) {
    if (nidx <= 0) return 0;
    if (coalesced) {
        if (idx[0] < 0 || idx[nidx - 1] >= nrows) return -2;
        for (int64_t k = 1; k < nidx; k++)
            if (idx[k] <= idx[k - 1]) {
                coalesced = 0;
                break;
            }
        if (coalesced)
            return tigeropt_rows(opt, dtype, p, g, s1, s2, nrows, D, idx, NULL, nidx, 0, hp, per, nthreads);
    }
    int64_t *scratch = (int64_t *)malloc((size_t)nidx * 2 * sizeof(int64_t));
    if (scratch == NULL) return -1;
    int err = tigeropt_rows_sort(idx, nidx, nrows, scratch, scratch + nidx);
    int64_t done = err != 0 ? err
                            : tigeropt_rows(opt, dtype, p, g, s1, s2, nrows, D, scratch, scratch + nidx, nidx,
                                            0, hp, per, nthreads);
    free(scratch);
    return done;
}

/* ------------------------------------------------------------------ step counts
   The step count tensors of one call (0-d, float32 when dtype == 0, else float64): each += 1, as
   torch's `step += 1` rounds; the new values are written to `out` when it is not NULL. */
void tigeropt_steps(int n, void *const *steps, int dtype, double *out) {
    for (int i = 0; i < n; i++) {
        if (dtype == 0) {
            float *s = (float *)steps[i];
            *s = *s + 1.0f;
            if (out) out[i] = (double)*s;
        } else {
            double *s = (double *)steps[i];
            *s = *s + 1.0;
            if (out) out[i] = *s;
        }
    }
}

/* ------------------------------------------------------------------ low-precision stores
 * Stochastic rounding to bf16 and block-scaled fp8 e4m3 encoding, bit for bit as
 * tigeropt/_lowp.py specifies them (the torch code there is the reference):
 *   h(x)  = lowbias32;  bits(e) = h(lo32(e) ^ h(key ^ hi32(e)))  (h(key ^ hi32(e)): the chunk key,
 *           one per 2^32 elements)
 *   bf16  = (u + r) >> 16, NaN -> 0x7fc0, r = bits >> 16, or bits & 0xffff for a rounding key with
 *           bit 32 set (_lowp.LOW16: bf16 state 0 takes the low half of the parameter's hash)
 *   e4m3  = per 256-element block: absmax of the finite |x|, y = |x| / (absmax/448) (<= 448),
 *           ulp = 2^(max(exponent(y), -6) - 3), t = y/ulp, up = frac(t) > (bits>>8)*2^-24
 *           (or to nearest even without key), code = e4m3fn bits of (floor(t)+up)*ulp with x's sign,
 *           non-finite x -> 0x7f | sign.
 */
static inline uint32_t lowbias32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    x ^= x >> 16;
    return x;
}

/* the chunk key of elements whose high index word is hi */
static inline uint32_t chunk_key(uint32_t key, uint32_t hi) {
    return lowbias32(key ^ hi);
}

static inline uint32_t element_bits(uint32_t key, uint64_t e) {
    return lowbias32((uint32_t)e ^ chunk_key(key, (uint32_t)(e >> 32)));
}

/* dst[t][i] = SR_bf16(src[t][i]) with rounding key keys[t] (element index i; bit 32: the low 16 bits). */
void tigeropt_sr_bf16(int n, void *const *src, void *const *dst, const int64_t *numel, const uint64_t *keys,
                      int nthreads) {
    for (int t = 0; t < n; t++) {
        const float *s = (const float *)src[t];
        uint16_t *d = (uint16_t *)dst[t];
        int64_t m = numel[t];
        uint32_t key = (uint32_t)keys[t];
        int shift = keys[t] >> 32 ? 0 : 16;
#ifdef _OPENMP
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1 && m >= MIN_PER_THREAD)
#endif
        for (int64_t i = 0; i < m; i++) {
            float f = s[i];
            uint32_t u;
            memcpy(&u, &f, sizeof u);
            uint32_t r = (element_bits(key, (uint64_t)i) >> shift) & 0xFFFFu;
            d[i] = f != f ? (uint16_t)0x7FC0 : (uint16_t)((u + r) >> 16);
        }
    }
    (void)nthreads;
}

static inline float f32_from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* e4m3fn bits of a value on the e4m3 grid (|q| <= 448), sign from neg. */
static inline uint8_t e4m3_bits(float q, int neg) {
    uint8_t sign = neg ? 0x80 : 0;
    if (q == 0.0f) return sign;
    uint32_t u;
    memcpy(&u, &q, sizeof u);
    int e = (int)((u >> 23) & 0xFF) - 127;
    if (e < -6) /* subnormal: q = k * 2^-9, k in 1..7 */
        return sign | (uint8_t)(q * 512.0f);
    uint32_t mant = (u >> 20) & 0x7;
    return sign | (uint8_t)(((e + 7) << 3) | mant);
}

/* codes[t] (uint8, numel[t]) and absmax[t] (float, ceil(numel/256)) of src[t]; keys NULL: nearest. */
void tigeropt_encode_e4m3(int n, void *const *src, void *const *codes, void *const *absmax,
                          const int64_t *numel, const uint32_t *keys, int nthreads) {
    for (int t = 0; t < n; t++) {
        const float *s = (const float *)src[t];
        uint8_t *c = (uint8_t *)codes[t];
        float *am = (float *)absmax[t];
        int64_t m = numel[t];
        int64_t nb = (m + 255) / 256;
        uint32_t key = keys ? keys[t] : 0;
#ifdef _OPENMP
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1 && m >= MIN_PER_THREAD)
#endif
        for (int64_t b = 0; b < nb; b++) {
            int64_t lo = b * 256, hi = lo + 256 < m ? lo + 256 : m;
            float a = 0.0f;
            for (int64_t i = lo; i < hi; i++) {
                float x = fabsf(s[i]);
                if (isfinite(x) && x > a) a = x;
            }
            float scale = a / 448.0f;
            am[b] = scale * 448.0f; /* _lowp.stored_absmax: what the largest code decodes to */
            float div = scale > 0.0f ? scale : 1.0f;
            for (int64_t i = lo; i < hi; i++) {
                float x = s[i];
                int neg = signbit(x) != 0;
                if (!isfinite(x)) {
                    c[i] = neg ? 0xFF : 0x7F;
                    continue;
                }
                float y = fabsf(x) / div;
                if (y > 448.0f) y = 448.0f;
                uint32_t u;
                memcpy(&u, &y, sizeof u);
                int e = (int)(u >> 23) - 127;
                if (e < -6) e = -6;
                float ulp = f32_from_bits((uint32_t)(e - 3 + 127) << 23);
                float tt = y / ulp;
                float fl = floorf(tt);
                float frac = tt - fl;
                int up;
                if (keys)
                    up = frac > (float)(element_bits(key, (uint64_t)i) >> 8) * 0x1p-24f;
                else
                    up = frac > 0.5f || (frac == 0.5f && fmodf(fl, 2.0f) == 1.0f);
                c[i] = e4m3_bits((fl + (float)up) * ulp, neg);
            }
        }
    }
    (void)nthreads;
}

/* ================================================================== low-precision step
 * One pass over memory for a group with bf16 parameters rounded stochastically, bf16 state or
 * 8-bit state: per 256-element block of a work item, the parameters, gradients and state are
 * loaded into fp32 (8-bit state decoded: e4m3 value * absmax/448), the fp32 core above runs on
 * them (the numerics of the fp32 step, operation by operation), and each is stored once:
 * parameters bf16 (to nearest even, or stochastically), fp16 (to nearest even) or fp32; state
 * fp32, bf16 (to nearest even or stochastically) or 8-bit (the block's new absmax of the finite
 * magnitudes, then the codes to nearest even or stochastically).  Bit for bit the reference
 * low-precision step (tigeropt._base._step_low_precision with tigeropt._lowp's stores).
 *
 * The rounding bits: key = h(h(h(h(seed) ^ step) ^ param_index) ^ stream) per tensor and stream
 * (0 the parameter, 1 + i state i), bits(e) = h(lo32(e) ^ chunk_key(key, hi32(e))); the parameter
 * takes the high 16 bits of stream 0's, bf16 state 0 their low 16 bits, bf16 state 1 the high 16
 * bits of stream 2's, 8-bit state i the high 24 bits of stream 1 + i's (_lowp.sr_key); element
 * index e = offset[t] + local index (offset: where the
 * tensor's elements start in the whole tensor, e.g. a shard's global offset; 0 otherwise).  The
 * 8-bit blocks are the 256-element grid of e: a tensor whose offset is not a multiple of 256 has
 * partial blocks at its start; its absmax array holds one value per block it touches,
 * ((offset + numel + 255) >> 8) - (offset >> 8).  Blocks are independent, so any number of threads
 * gives the same bits.
 */

enum { SK_F32 = 0, SK_BF16 = 1, SK_8BIT = 2 };
#define LP_BLOCK 256

typedef struct {
    int opt;
    int kind[2];  /* storage of state 0 and 1 (SK_*) */
    int sr;       /* stochastic rounding of bf16 parameters and of bf16/8-bit state */
    uint32_t seed;
    void *const *am[2];     /* absmax arrays of 8-bit state */
    const int64_t *offset;  /* per tensor, or NULL (all 0) */
    const int64_t *pidx;    /* per tensor: the parameter's index in the optimizer */
    const double *steps;    /* per tensor: the step count after the increment */
    uint16_t bf16_nan;      /* bf16 bits of a NaN rounded to nearest (what torch's conversion gives) */
    int negate;             /* maximize: the gradient is negated at the load (a sign flip, as torch's -g) */
} LpArgs;

static uint32_t lp_key(uint32_t seed, double step, int64_t pidx, uint32_t stream) {
    uint32_t k = lowbias32(seed);
    k = lowbias32(k ^ (uint32_t)fmod(step, 4294967296.0));  /* int(step) mod 2^32, defined at any step */
    k = lowbias32(k ^ (uint32_t)(uint64_t)pidx);
    return lowbias32(k ^ stream);
}

/* SR to bf16 of s[0..k) with bits shift..shift+15 of the random bits of elements lo0 + i under the
   chunk key kc (a block never crosses a multiple of 2^32: it lies in one 256-element cell of the grid) */
static void store_bf16_sr(uint16_t *restrict d, const float *restrict s, int64_t k, uint32_t kc,
                          uint32_t lo0, int shift) {
    for (int64_t i = 0; i < k; i++) {
        uint32_t u;
        memcpy(&u, s + i, sizeof u);
        uint32_t r = (lowbias32((lo0 + (uint32_t)i) ^ kc) >> shift) & 0xFFFFu;
        uint16_t h = (uint16_t)((u + r) >> 16);
        d[i] = (u & 0x7FFFFFFFu) > 0x7F800000u ? (uint16_t)0x7FC0 : h;
    }
}

/* round to nearest even (c10::BFloat16's rounding), NaN -> `nan` */
static void store_bf16_rtn(uint16_t *restrict d, const float *restrict s, int64_t k, uint16_t nan) {
    for (int64_t i = 0; i < k; i++) {
        uint32_t u;
        memcpy(&u, s + i, sizeof u);
        uint16_t h = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
        d[i] = (u & 0x7FFFFFFFu) > 0x7F800000u ? nan : h;
    }
}

/* d = value of e4m3fn code c * absmax/448, as torch's conversion and multiplication give it: the
   code's 7 magnitude bits shifted into an fp32 pattern (exponent bias 127 - 7 short: a normal code is
   then its value * 2^-120, a subnormal one an fp32 subnormal, m * 2^-129) times 2^120, exact; the
   NaN codes 0x7f/0xff give the NaN 0x7ff00000; the code's sign on top. */
static void decode_e4m3_block(float *restrict d, const uint8_t *restrict c, int64_t k, float absmax) {
    float scale = absmax / 448.0f;
    for (int64_t i = 0; i < k; i++) {
        uint32_t c7 = c[i] & 0x7Fu;
        uint32_t sign = (uint32_t)(c[i] & 0x80u) << 24;
        float v = f32_from_bits(c7 << 20) * 0x1p120f;
        uint32_t u;
        memcpy(&u, &v, sizeof u);
        u = c7 == 0x7Fu ? 0x7FF00000u : u;
        d[i] = f32_from_bits(u | sign) * scale;
    }
}

/* absmax of one block: the largest finite magnitude (compared as bit patterns) */
static float block_absmax(const float *restrict x, int64_t k) {
    int32_t amb = 0;
    for (int64_t i = 0; i < k; i++) {
        int32_t u;
        memcpy(&u, x + i, sizeof u);
        u &= 0x7FFFFFFF;
        u = u < 0x7F800000 ? u : 0;
        amb = u > amb ? u : amb;
    }
    return f32_from_bits((uint32_t)amb);
}

/* The e4m3fn codes of the block x[0..k) with absmax a, as tigeropt._lowp.encode_8bit gives them:
   y = |x| / (a/448) (a true division), at most 448; normal range (y >= 2^-6): the code is y's fp32
   pattern rounded at bit 20 (3 mantissa bits; ties to even, or up when the 20 discarded bits, times
   16, exceed the 24 random bits), exponent rebiased (960 = 120 << 3); subnormal range: t = y * 2^9
   (exact) rounded to an integer (ties to even: t + 2^23; or up when frac(t) > bits * 2^-24).
   Non-finite x: the NaN code 0x7f with x's sign.  Masks instead of branches (the loop vectorizes).
   sr is a constant at each call site: each gets its own loop. */
static inline __attribute__((always_inline)) void encode_e4m3_codes(uint8_t *restrict c,
                                                                    const float *restrict x, int64_t k,
                                                                    float a, uint32_t kc, uint32_t lo0,
                                                                    const int sr) {
    float scale = a / 448.0f;
    float div = scale > 0.0f ? scale : 1.0f;
    for (int64_t i = 0; i < k; i++) {
        uint32_t u;
        memcpy(&u, x + i, sizeof u);
        uint32_t sign = (u >> 24) & 0x80u;
        uint32_t mag = u & 0x7FFFFFFFu;
        uint32_t nonfinite = (uint32_t)-(int32_t)(mag >= 0x7F800000u);
        float y = f32_from_bits(mag & ~nonfinite) / div;
        int32_t yb;
        memcpy(&yb, &y, sizeof yb);
        yb = yb < 0x43E00000 ? yb : 0x43E00000; /* min(y, 448) */
        y = f32_from_bits((uint32_t)yb);
        int32_t code_n, code_s;
        float t = y * 512.0f; /* y / 2^-9, exact: the subnormal range's grid units */
        if (sr) {
            uint32_t r = lowbias32((lo0 + (uint32_t)i) ^ kc) >> 8;
            code_n = (yb >> 20) - 960 + (int32_t)((uint32_t)(yb & 0xFFFFF) << 4 > r);
            int32_t n = (int32_t)t;
            code_s = n + (t - (float)n > (float)(int32_t)r * 0x1p-24f ? 1 : 0);
        } else {
            code_n = ((yb + 0x7FFFF + ((yb >> 20) & 1)) >> 20) - 960;
            float tr = t + 0x1p23f; /* t < 8: rounded to an integer, ties to even */
            int32_t trb;
            memcpy(&trb, &tr, sizeof trb);
            code_s = trb - 0x4B000000;
        }
        uint32_t normal = (uint32_t)-(int32_t)(yb >= 0x3C800000); /* y >= 2^-6 (a mask: no branch) */
        uint32_t code = ((uint32_t)code_n & normal) | ((uint32_t)code_s & ~normal);
        c[i] = (uint8_t)(code | (nonfinite & 0x7Fu) | sign);
    }
}

/* codes and absmax (returned) of the block x[0..k): stochastically (sr, the bits of elements lo0 + i
   under the chunk key kc) or to nearest even */
static float encode_e4m3_block(uint8_t *restrict c, const float *restrict x, int64_t k, int sr, uint32_t kc,
                               uint32_t lo0) {
    float a = block_absmax(x, k);
    if (sr)
        encode_e4m3_codes(c, x, k, a, kc, lo0, 1);
    else
        encode_e4m3_codes(c, x, k, a, 0, 0, 0);
    return (a / 448.0f) * 448.0f; /* _lowp.stored_absmax */
}

/* the fp32 core of optimizer a->opt on one block (hp, per as the optimizer's entry point) */
static void lp_core(const Args *a, int t, float *restrict p, const float *restrict g, float *restrict s0,
                    float *restrict s1, int64_t k) {
    const double *h = a->hp;
    const LpArgs *x = (const LpArgs *)a->ext;
    switch (x->opt) {
    case OPT_TIGER:
        tiger_core_f32(p, g, s0, k, (float)h[0], (float)h[1], (float)h[2], (float)h[3], (float)h[4]);
        break;
    case OPT_LION:
        lion_core_f32(p, g, s0, k, (float)h[0], (float)h[1], (float)h[2], (float)h[3], (float)h[4],
                      (float)h[5], (float)h[6]);
        break;
    case OPT_ADAX: {
        const double *q = a->per + 3 * (int64_t)t;
        adax_core_f32(p, g, s0, s1, k, (float)h[0], (float)h[1], (float)h[2], h[3] != 0.0, (float)h[4],
                      h[5] != 0.0, (float)h[6], (float)h[7], (float)q[0], (float)q[1], (float)q[2]);
        break;
    }
    default: { /* OPT_ADAGRAD */
        double clr = a->per[t];
        if (h[4] != 0.0)
            glove_core_f32(p, g, s0, k, (float)h[0], h[1] != 0.0, (float)h[5], h[6] != 0.0, (float)h[3],
                           (float)clr);
        else
            adagrad_core_f32(p, g, s0, k, (float)h[0], h[1] != 0.0, (float)h[2], (float)h[3], (float)-clr);
    }
    }
}

/* ------------------------------------------------------------------ low-precision step, AVX-512
 * The same block loop written with AVX-512 intrinsics (built when the compiler targets AVX-512 F, BW,
 * VL, DQ and BF16, e.g. -march=native on Zen 4 or Sapphire Rapids): per block, one pass over 16
 * elements at a time does the loads (8-bit state decoded), the optimizer's fp32 math and the stores of
 * the parameters and of fp32/bf16 state; 8-bit state goes to an fp32 block buffer (in L1) with the
 * block's absmax, and a second pass over the buffer encodes it.  Every operation is the generic
 * code's, lane by lane, so the bits are the same (tests/test_lowp_fused.py runs both builds):
 *  - sign(x) as ((x != 0) ? copysign(1, x) : +0) + x*0 with the product and sum in one fma (x*0 is
 *    exactly +-0 or NaN, so the single rounding changes nothing);
 *  - bf16 round to nearest even by vcvtneps2bf16, which equals c10's rounding except on NaN and
 *    fp32 subnormals (it flushes them to zero): lanes holding those take the scalar rounding;
 *  - 8-bit state decoded without the NaN codes' blend in a block that holds none (checked 64 codes at a
 *    time), encoded without the non-finite and subnormal-range lanes' work in a vector that has none;
 *  - the rounding bits' lowbias32 on 16 lanes (vpmulld), one per element for the parameter and bf16
 *    state 0 together (the high and the low 16 bits of one hash); where only bits >> 16 are used
 *    the hash's last step (x ^= x >> 16) does not change them, so it is skipped there.
 * fp16 parameters take the generic code. */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__) && \
    defined(__AVX512BF16__)
#include <immintrin.h>
#define LP_AVX512 1
#define LP_GLOVE 5 /* GloVe-style Adagrad: its own block loop */

#define V_I(x) _mm512_set1_epi32((int)(x))
#define V_F(x) _mm512_set1_ps(x)
#define AS_I(x) _mm512_castps_si512(x)
#define AS_F(x) _mm512_castsi512_ps(x)

static inline __m512 v_ld_bf16(const uint16_t *s, __mmask16 m) {
    return AS_F(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, s)), 16));
}

/* e4m3fn codes times the block's scale, as decode_e4m3_block computes them: the code's 7 magnitude bits at
   bit 20 of an fp32 (the code's value times 2^-120, exact), the NaN code's 0x7ff00000, the sign on top,
   times s120 = scale * 2^120 when that is finite (the same exact product as value * scale, rounded once),
   else times 2^120 and then scale */
static inline __m512 v_ld_e4m3(const uint8_t *s, __mmask16 m, const int full, int fold, __m512 s120,
                               __m512 scale) {
    __m128i b = full ? _mm_loadu_si128((const __m128i *)s) : _mm_maskz_loadu_epi8(m, s);
    __m512i c = _mm512_cvtepi8_epi32(b); /* sign-extended: bit 31 is the code's sign */
    __m512i c7 = _mm512_and_si512(c, V_I(0x7F));
    __mmask16 nan = _mm512_cmpeq_epi32_mask(c7, V_I(0x7F));
    __m512i u = _mm512_slli_epi32(c7, 20);
    if (!fold) {
        u = AS_I(_mm512_mul_ps(AS_F(u), V_F(0x1p120f)));
        s120 = scale;
    }
    u = _mm512_mask_mov_epi32(u, nan, V_I(0x7FF00000));
    u = _mm512_ternarylogic_epi32(u, c, V_I(0x80000000), 0xF8); /* u | (c & sign bit) */
    return _mm512_mul_ps(AS_F(u), s120);
}

/* v_ld_e4m3 for a block without NaN codes (block_has_nan_code): the code sign-extended and shifted left
   by 20 holds the sign in bit 31 and the 7 magnitude bits at 20..26 (bits 27..30 are copies of the sign,
   cleared by the and): the same fp32 pattern as v_ld_e4m3's, in two operations */
static inline __m512 v_ld_e4m3_finite(const uint8_t *s, __mmask16 m, const int full, int fold, __m512 s120,
                                      __m512 scale) {
    __m128i b = full ? _mm_loadu_si128((const __m128i *)s) : _mm_maskz_loadu_epi8(m, s);
    __m512i u = _mm512_and_si512(_mm512_slli_epi32(_mm512_cvtepi8_epi32(b), 20), V_I(0x87F00000));
    if (!fold) {
        u = AS_I(_mm512_mul_ps(AS_F(u), V_F(0x1p120f)));
        s120 = scale;
    }
    return _mm512_mul_ps(AS_F(u), s120);
}

/* whether the codes c[0..k) hold a NaN code (0x7f or 0xff), 64 at a time */
static inline int block_has_nan_code(const uint8_t *c, int64_t k) {
    __mmask64 any = 0;
    for (int64_t q = 0; q < k; q += 64) {
        __mmask64 m = k - q >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (k - q)) - 1);
        __m512i b = _mm512_maskz_loadu_epi8(m, c + q);
        any |= _mm512_mask_cmpeq_epi8_mask(m, _mm512_or_si512(b, V_I(0x80808080u)), V_I(0xFFFFFFFFu));
    }
    return any != 0;
}

/* sign(x) as SIGN(float, x) gives it (see above) */
static inline __m512 v_sign(__m512 x) {
    __m512 zero = _mm512_setzero_ps();
    __mmask16 nz = _mm512_cmp_ps_mask(x, zero, _CMP_NEQ_OQ);
    __m512i s = _mm512_maskz_ternarylogic_epi32(nz, AS_I(x), V_I(0x80000000), V_I(0x3F800000), 0xEA);
    return _mm512_fmadd_ps(x, zero, AS_F(s)); /* (x & sign bit) | 1.0 on the nonzero lanes, else +0 */
}

/* lowbias32 after its first step (x ^= x >> 16), on x1 = idx ^ kb: for the elements of one block (inside one
   256-element cell of the index grid, so idx >> 16 is the same for all of them) the first step of
   lowbias32(idx ^ kc) is idx ^ kb with the block key kb = kc ^ ((lo0 ^ kc) >> 16) (block_key) */
static inline __m512i v_lowbias32_rest(__m512i x) {
    x = _mm512_mullo_epi32(x, V_I(0x7feb352du));
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
    x = _mm512_mullo_epi32(x, V_I(0x846ca68bu));
    return _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
}

/* v_lowbias32_rest without its last step: the same bits 16..31 */
static inline __m512i v_lowbias32_rest_hi16(__m512i x) {
    x = _mm512_mullo_epi32(x, V_I(0x7feb352du));
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
    return _mm512_mullo_epi32(x, V_I(0x846ca68bu));
}

/* the block key of chunk key kc for a block whose first element index has low word lo0 */
static inline uint32_t block_key(uint32_t kc, uint32_t lo0) {
    return kc ^ ((lo0 ^ kc) >> 16);
}

/* bf16 to nearest even; NaN -> nan */
static inline void v_st_bf16_rtn(uint16_t *d, __m512 v, __mmask16 m, const int full, uint16_t nan) {
    __mmask16 special = _mm512_fpclass_ps_mask(v, 0xA1) & m; /* QNaN | SNaN | denormal */
    __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
    if (full)
        _mm256_storeu_si256((__m256i *)d, h);
    else
        _mm256_mask_storeu_epi16(d, m, h);
    if (__builtin_expect(special != 0, 0)) {
        float tmp[16];
        _mm512_storeu_ps(tmp, v);
        for (int j = 0; j < 16; j++)
            if (special >> j & 1) store_bf16_rtn(d + j, tmp + j, 1, nan);
    }
}

/* bf16 stochastically with the 16 random bits r (in the low half of each lane) */
static inline void v_st_bf16_sr(uint16_t *d, __m512 v, __mmask16 m, const int full, __m512i r) {
    __m512i h = _mm512_srli_epi32(_mm512_add_epi32(AS_I(v), r), 16);
    __mmask16 nan = _mm512_fpclass_ps_mask(v, 0x81);
    if (__builtin_expect(nan != 0, 0)) h = _mm512_mask_mov_epi32(h, nan, V_I(0x7FC0));
    if (full)
        _mm256_storeu_si256((__m256i *)d, _mm512_cvtepi32_epi16(h));
    else
        _mm256_mask_storeu_epi16(d, m, _mm512_cvtepi32_epi16(h));
}

/* the largest magnitude's bits so far, non-finite ones included (the block's absmax is redone without them
   in the rare block that holds one) */
static inline __m512i v_absmax(__m512i acc, __m512 v, __mmask16 m) {
    return _mm512_mask_max_epu32(acc, m, acc, _mm512_and_si512(AS_I(v), V_I(0x7FFFFFFF)));
}

/* encode_e4m3_codes on 16 lanes, with fewer operations and the same low 8 bits of each code: a non-finite x
   is divided as it is (y clamps to 448, a code <= 0x7e, then 0x7f is or-ed in); the subnormal range's
   rounding to nearest is y + 2^14 rounded at its unit 2^-9 (the grid of t + 2^23, scaled by 2^-9), whose
   low byte is the code; the normal range's rebias (- 960 << 20) is folded into the rounding constant.
   finite: the block holds no inf/NaN (its absmax pass saw none); then a vector whose every y is 0 or at
   least 2^-6 (the common case) takes the normal range's rounding alone. */
static inline __attribute__((always_inline)) void v_st_e4m3(uint8_t *c, __m512 x, __mmask16 m, const int full,
                                                            __m512 div, const int sr, __m512i idx, __m512i kb,
                                                            const int finite) {
    __m512i u = AS_I(x);
    __m512i mag = _mm512_and_si512(u, V_I(0x7FFFFFFF));
    __m512i yb = _mm512_min_epi32(AS_I(_mm512_div_ps(AS_F(mag), div)), V_I(0x43E00000)); /* min(y, 448) */
    if (finite) { /* a block of finite values: no NaN code */
        __mmask16 nz = _mm512_test_epi32_mask(yb, yb);
        if (__builtin_expect(_mm512_mask_cmplt_epi32_mask(nz, yb, V_I(0x3C800000)) == 0, 1)) {
            /* every y is 0 or in e4m3's normal range (>= 2^-6): the normal range's rounding, 0 for y = 0 */
            __m512i t;
            if (sr) { /* up when 16 * (the 20 discarded bits f) > bits >> 8, i.e. when f << 12 > bits (f << 12
                         is a multiple of 2^8): the hash's 32 bits compared at once */
                __m512i h = v_lowbias32_rest(_mm512_xor_si512(idx, kb));
                __mmask16 up = _mm512_cmpgt_epu32_mask(_mm512_slli_epi32(yb, 12), h);
                t = _mm512_sub_epi32(yb, V_I(960 << 20));
                t = _mm512_mask_add_epi32(t, up, t, V_I(1 << 20));
            } else { /* + 0x7ffff, + 1 where the kept lsb (bit 20) is set: ties to even */
                t = _mm512_add_epi32(yb, V_I(0x7FFFF - (960 << 20)));
                t = _mm512_mask_add_epi32(t, _mm512_test_epi32_mask(yb, V_I(1 << 20)), t, V_I(1));
            }
            __m512i code = _mm512_maskz_srli_epi32(nz, t, 20);
            code = _mm512_ternarylogic_epi32(code, _mm512_srli_epi32(u, 24), V_I(0x80), 0xF8); /* code | sign */
            if (full)
                _mm_storeu_si128((__m128i *)c, _mm512_cvtepi32_epi8(code));
            else
                _mm_mask_storeu_epi8(c, m, _mm512_cvtepi32_epi8(code));
            return;
        }
    }
    __mmask16 nonfinite = _mm512_cmpge_epu32_mask(mag, V_I(0x7F800000));
    __m512i code_n, code_s;
    if (sr) {
        __m512i r = _mm512_srli_epi32(v_lowbias32_rest(_mm512_xor_si512(idx, kb)), 8);
        code_n = _mm512_srli_epi32(_mm512_sub_epi32(yb, V_I(960 << 20)), 20);
        __mmask16 up = _mm512_cmpgt_epu32_mask(_mm512_srli_epi32(_mm512_slli_epi32(yb, 12), 8), r);
        code_n = _mm512_mask_add_epi32(code_n, up, code_n, V_I(1));
        __m512 t = _mm512_mul_ps(AS_F(yb), V_F(512.0f));
        __m512i n = _mm512_cvttps_epi32(t);
        __m512 frac = _mm512_sub_ps(t, _mm512_cvtepi32_ps(n));
        __mmask16 up_s = _mm512_cmp_ps_mask(frac, _mm512_mul_ps(_mm512_cvtepi32_ps(r), V_F(0x1p-24f)), _CMP_GT_OQ);
        code_s = _mm512_mask_add_epi32(n, up_s, n, V_I(1));
    } else {
        __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(yb, 20), V_I(1));
        code_n = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(yb, V_I(0x7FFFF - (960 << 20))), lsb), 20);
        code_s = AS_I(_mm512_add_ps(AS_F(yb), V_F(0x1p14f)));
    }
    __m512i code = _mm512_mask_mov_epi32(code_s, _mm512_cmpge_epi32_mask(yb, V_I(0x3C800000)), code_n);
    code = _mm512_ternarylogic_epi32(code, _mm512_srli_epi32(u, 24), V_I(0x80), 0xF8); /* code | sign */
    code = _mm512_mask_or_epi32(code, nonfinite, code, V_I(0x7F));
    if (full)
        _mm_storeu_si128((__m128i *)c, _mm512_cvtepi32_epi8(code));
    else
        _mm_mask_storeu_epi8(c, m, _mm512_cvtepi32_epi8(code));
}

typedef struct { /* decoding 8-bit state 0 and 1 of a block (v_ld_e4m3) */
    float scale[2], s120[2];
    int fold[2];
    int nan[2]; /* the block holds a NaN code */
} LpDec;

typedef struct {
    int opt, pdt, nst, sr, negate, l2, decoupled, do_clip;
    int kind[2];
    uint16_t nan;
    float c[8]; /* the optimizer's fp32 scalars (lp_core's order) */
} LpVec;

static inline __mmask16 lane_mask(int64_t left) {
    return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
}

/* one block (k <= 256 elements at local index i0 of tensor t, element index e0) of optimizer OPT
   (OPT_* or LP_GLOVE): the loads, math and stores of lp_range */
/* one vector of 16 elements (mask m; full: all 16, plain loads and stores) at local index e of a block of
   optimizer OPT (OPT_* or LP_GLOVE) whose state 0 is stored as K0: loads, math, the stores of the parameters
   and of fp32/bf16 state; 8-bit state to buf (at bi) and its absmax bits to amax */
static inline __attribute__((always_inline)) void lp_vec_avx512(
    const LpVec *v, const int OPT, const int K0, const int full, __mmask16 m, char *pbase, const char *gbase,
    void *const sbase[2], int64_t e, __m512i idx, const LpDec *dec, float *buf0, float *buf1, __m512i amax[2],
    const __m512i kb[3]) {
    const int nst = OPT == OPT_ADAX ? 2 : 1;
    const int kind[2] = {K0, v->kind[1]};
    const float *c = v->c;
    float *buf[2] = {buf0, buf1};
    __m512 p, g, s[2];
    const int v_share0 = v->sr && K0 == SK_BF16; /* state 0 rounds with the low half of stream 0's hash */
    __m512i r0 = _mm512_setzero_si512();
    int have_r0 = 0;
#define LD_F32(ptr) (full ? _mm512_loadu_ps(ptr) : _mm512_maskz_loadu_ps(m, ptr))
#define LD_BF16(ptr)                                                                                     \
    AS_F(_mm512_slli_epi32(                                                                              \
        _mm512_cvtepu16_epi32(full ? _mm256_loadu_si256((const __m256i *)(ptr)) : _mm256_maskz_loadu_epi16(m, ptr)), \
        16))
    if (v->pdt == DT_F32) {
        p = LD_F32((const float *)pbase + e);
        g = LD_F32((const float *)gbase + e);
    } else {
        p = LD_BF16((const uint16_t *)pbase + e);
        g = LD_BF16((const uint16_t *)gbase + e);
    }
    if (v->negate) g = AS_F(_mm512_xor_si512(AS_I(g), V_I(0x80000000u)));
    for (int j = 0; j < nst; j++) {
        if (kind[j] == SK_F32)
            s[j] = LD_F32((const float *)sbase[j] + e);
        else if (kind[j] == SK_BF16)
            s[j] = LD_BF16((const uint16_t *)sbase[j] + e);
        else
            s[j] = __builtin_expect(dec->nan[j], 0)
                       ? v_ld_e4m3((const uint8_t *)sbase[j] + e, m, full, dec->fold[j], V_F(dec->s120[j]),
                                   V_F(dec->scale[j]))
                       : v_ld_e4m3_finite((const uint8_t *)sbase[j] + e, m, full, dec->fold[j], V_F(dec->s120[j]),
                                          V_F(dec->scale[j]));
    }
#undef LD_F32
#undef LD_BF16
    if (OPT == OPT_TIGER) { /* m = beta*m + (1-beta)*g;  p = p - lr*(sign(m) + wd*p) */
        s[0] = _mm512_fmadd_ps(g, V_F(c[1]), _mm512_mul_ps(s[0], V_F(c[0])));
        p = _mm512_fmadd_ps(_mm512_fmadd_ps(p, V_F(c[2]), v_sign(s[0])), V_F(c[3]), p);
    } else if (OPT == OPT_LION) { /* c = b1*m + (1-b1)*g;  p = p*decay - lr*sign(c);  m = b2*m + (1-b2)*g */
        __m512 u = _mm512_fmadd_ps(g, V_F(c[1]), _mm512_mul_ps(s[0], V_F(c[0])));
        p = _mm512_fmadd_ps(v_sign(u), V_F(c[5]), _mm512_mul_ps(p, V_F(c[4])));
        s[0] = _mm512_fmadd_ps(g, V_F(c[3]), _mm512_mul_ps(s[0], V_F(c[2])));
    } else if (OPT == OPT_ADAX) { /* c: b1 a1 wd decay nlr bhat omb eps_t */
        if (v->l2) g = _mm512_fmadd_ps(p, V_F(c[2]), g);
        s[0] = _mm512_fmadd_ps(g, V_F(c[1]), _mm512_mul_ps(s[0], V_F(c[0])));
        s[1] = _mm512_fmadd_ps(_mm512_mul_ps(V_F(c[6]), g), g, _mm512_mul_ps(s[1], V_F(c[5])));
        __m512 d = _mm512_add_ps(_mm512_sqrt_ps(s[1]), V_F(c[7]));
        if (v->decoupled) p = _mm512_mul_ps(p, V_F(c[3]));
        p = _mm512_add_ps(p, _mm512_div_ps(_mm512_mul_ps(V_F(c[4]), s[0]), d));
    } else if (OPT == OPT_ADAGRAD) { /* c: wd eps nclr */
        if (v->l2) g = _mm512_fmadd_ps(p, V_F(c[0]), g);
        s[0] = _mm512_fmadd_ps(g, g, s[0]);
        p = _mm512_add_ps(p, _mm512_div_ps(_mm512_mul_ps(V_F(c[2]), g),
                                           _mm512_add_ps(_mm512_sqrt_ps(s[0]), V_F(c[1]))));
    } else { /* GloVe, c: wd clip clr */
        if (v->l2) g = _mm512_fmadd_ps(p, V_F(c[0]), g);
        if (v->do_clip) {
            __m512 lo = V_F(-c[1]), up = V_F(c[1]);
            __mmask16 below = _mm512_cmp_ps_mask(g, lo, _CMP_LT_OQ);
            __mmask16 above = _mm512_cmp_ps_mask(g, up, _CMP_GT_OQ);
            g = _mm512_mask_mov_ps(_mm512_mask_mov_ps(g, above, up), below, lo);
        }
        __m512 u = _mm512_mul_ps(g, V_F(c[2]));
        __m512 acc = s[0];
        p = _mm512_sub_ps(p, _mm512_div_ps(u, _mm512_sqrt_ps(acc)));
        s[0] = _mm512_fmadd_ps(u, u, acc);
    }
    if (v->pdt == DT_F32) {
        if (full)
            _mm512_storeu_ps((float *)pbase + e, p);
        else
            _mm512_mask_storeu_ps((float *)pbase + e, m, p);
    } else if (v->sr) { /* the high 16 bits of stream 0's hash: y >> 16 with y the hash before its last step
                           (x ^= x >> 16); bf16 state 0 takes the low 16, (y ^ y >> 16) & 0xffff, one ternlog */
        __m512i y = v_lowbias32_rest_hi16(_mm512_xor_si512(idx, kb[0]));
        __m512i rp = _mm512_srli_epi32(y, 16);
        v_st_bf16_sr((uint16_t *)pbase + e, p, m, full, rp);
        if (v_share0) {
            r0 = _mm512_ternarylogic_epi32(y, rp, V_I(0xFFFF), 0x28); /* (y ^ rp) & 0xffff */
            have_r0 = 1;
        }
    } else {
        v_st_bf16_rtn((uint16_t *)pbase + e, p, m, full, v->nan);
    }
    for (int j = 0; j < nst; j++) {
        if (kind[j] == SK_F32) {
            if (full)
                _mm512_storeu_ps((float *)sbase[j] + e, s[j]);
            else
                _mm512_mask_storeu_ps((float *)sbase[j] + e, m, s[j]);
        } else if (kind[j] == SK_BF16) {
            if (v->sr && j == 0) /* the low 16 bits of stream 0's hash */
                v_st_bf16_sr((uint16_t *)sbase[j] + e, s[j], m, full,
                             have_r0 ? r0
                                     : _mm512_and_si512(v_lowbias32_rest(_mm512_xor_si512(idx, kb[0])), V_I(0xFFFF)));
            else if (v->sr)
                v_st_bf16_sr((uint16_t *)sbase[j] + e, s[j], m, full,
                             _mm512_srli_epi32(v_lowbias32_rest_hi16(_mm512_xor_si512(idx, kb[1 + j])), 16));
            else
                v_st_bf16_rtn((uint16_t *)sbase[j] + e, s[j], m, full, v->nan);
        } else {
            _mm512_store_ps(buf[j], s[j]);
            amax[j] = v_absmax(amax[j], s[j], m);
        }
    }
}

/* one block (k <= 256 elements at local index i0, element index e0 = lo0 + 2^32 hi32, absmax index blk)
   of optimizer OPT whose state 0 is stored as K0: lp_range's loads, math and stores */
static inline __attribute__((always_inline)) void lp_block_avx512(
    const LpVec *v, const int OPT, const int K0, char *pbase, const char *gbase, void *const sbase[2],
    float *const ambase[2], int64_t blk, int64_t i0, int64_t k, uint32_t lo0, uint32_t hi32,
    const uint32_t key32[3]) {
    const int nst = OPT == OPT_ADAX ? 2 : 1;
    const int kind[2] = {K0, v->kind[1]};
    float buf[2][LP_BLOCK] __attribute__((aligned(64)));
    LpDec dec = {{0.0f, 0.0f}, {0.0f, 0.0f}, {1, 1}, {0, 0}};
    for (int j = 0; j < nst; j++)
        if (kind[j] == SK_8BIT) {
            dec.scale[j] = ambase[j][blk] / 448.0f;
            dec.s120[j] = dec.scale[j] * 0x1p120f;
            dec.fold[j] = dec.s120[j] < INFINITY;
            dec.nan[j] = block_has_nan_code((const uint8_t *)sbase[j] + i0, k);
        }
    __m512i amax[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i kb[3] = {V_I(block_key(chunk_key(key32[0], hi32), lo0)),
                           V_I(block_key(chunk_key(key32[1], hi32), lo0)),
                           V_I(block_key(chunk_key(key32[2], hi32), lo0))};
    int64_t i = 0;
    for (; i + 16 <= k; i += 16)
        lp_vec_avx512(v, OPT, K0, 1, (__mmask16)0xFFFF, pbase, gbase, sbase, i0 + i,
                      _mm512_add_epi32(V_I(lo0 + (uint32_t)i), iota), &dec, buf[0] + i, buf[1] + i, amax, kb);
    if (i < k)
        lp_vec_avx512(v, OPT, K0, 0, lane_mask(k - i), pbase, gbase, sbase, i0 + i,
                      _mm512_add_epi32(V_I(lo0 + (uint32_t)i), iota), &dec, buf[0] + i, buf[1] + i, amax, kb);
    for (int j = 0; j < nst; j++) {
        if (kind[j] != SK_8BIT) continue;
        uint32_t ab = (uint32_t)_mm512_reduce_max_epu32(amax[j]);
        int finite = ab < 0x7F800000u;
        float a = finite ? f32_from_bits(ab) : block_absmax(buf[j], k); /* inf/NaN: without them */
        float sc = a / 448.0f;
        ambase[j][blk] = sc * 448.0f; /* _lowp.stored_absmax */
        __m512 div = V_F(sc > 0.0f ? sc : 1.0f);
        uint8_t *codes = (uint8_t *)sbase[j] + i0;
        for (int64_t q = 0; q < k; q += 16) {
            __m512i idx = _mm512_add_epi32(V_I(lo0 + (uint32_t)q), iota);
            __m512 x = _mm512_load_ps(buf[j] + q);
            if (q + 16 > k || !finite)
                v_st_e4m3(codes + q, x, lane_mask(k - q), 0, div, v->sr, idx, kb[1 + j], 0);
            else if (v->sr)
                v_st_e4m3(codes + q, x, 0xFFFF, 1, div, 1, idx, kb[1 + j], 1);
            else
                v_st_e4m3(codes + q, x, 0xFFFF, 1, div, 0, idx, kb[1 + j], 1);
        }
    }
}

/* the block loop of each optimizer and state-0 storage, each its own function (smaller functions
   compile much faster than one holding them all) */
typedef void (*LpBlockFn)(const LpVec *v, char *pbase, const char *gbase, void *const sbase[2],
                          float *const ambase[2], int64_t blk, int64_t i0, int64_t k, uint32_t lo0, uint32_t hi32,
                          const uint32_t key32[3]);
#define LP_DEF_BLOCK(NAME, OPT, K0)                                                                       \
    static __attribute__((noinline)) void NAME(const LpVec *v, char *pbase, const char *gbase,             \
                                               void *const sbase[2], float *const ambase[2], int64_t blk,  \
                                               int64_t i0, int64_t k, uint32_t lo0, uint32_t hi32,        \
                                               const uint32_t key32[3]) {                                  \
        lp_block_avx512(v, OPT, K0, pbase, gbase, sbase, ambase, blk, i0, k, lo0, hi32, key32);            \
    }
#define LP_DEF_BLOCKS(SUF, OPT)                    \
    LP_DEF_BLOCK(lp_block_##SUF##_f32, OPT, SK_F32)   \
    LP_DEF_BLOCK(lp_block_##SUF##_bf16, OPT, SK_BF16) \
    LP_DEF_BLOCK(lp_block_##SUF##_8bit, OPT, SK_8BIT)
LP_DEF_BLOCKS(tiger, OPT_TIGER)
LP_DEF_BLOCKS(lion, OPT_LION)
LP_DEF_BLOCKS(adax, OPT_ADAX)
LP_DEF_BLOCKS(adagrad, OPT_ADAGRAD)
LP_DEF_BLOCKS(glove, LP_GLOVE)
#undef LP_DEF_BLOCKS
#undef LP_DEF_BLOCK

static const LpBlockFn lp_blocks[5][3] = {
    {lp_block_tiger_f32, lp_block_tiger_bf16, lp_block_tiger_8bit},
    {lp_block_lion_f32, lp_block_lion_bf16, lp_block_lion_8bit},
    {lp_block_adax_f32, lp_block_adax_bf16, lp_block_adax_8bit},
    {lp_block_adagrad_f32, lp_block_adagrad_bf16, lp_block_adagrad_8bit},
    {lp_block_glove_f32, lp_block_glove_bf16, lp_block_glove_8bit},
};

/* lp_range on AVX-512 (parameters fp32 or bf16) */
static void lp_range_avx512(const Args *a, int t, int64_t s, int64_t n) {
    const LpArgs *x = (const LpArgs *)a->ext;
    const double *h = a->hp;
    LpVec v;
    memset(&v, 0, sizeof v);
    v.opt = x->opt;
    v.pdt = a->dtype;
    v.nst = x->opt == OPT_ADAX ? 2 : 1;
    v.sr = x->sr;
    v.negate = x->negate;
    v.kind[0] = x->kind[0];
    v.kind[1] = v.nst > 1 ? x->kind[1] : SK_F32;
    v.nan = x->bf16_nan;
    int opt = x->opt;
    switch (opt) {
    case OPT_TIGER:
        for (int j = 0; j < 4; j++) v.c[j] = (float)h[j];
        break;
    case OPT_LION:
        for (int j = 0; j < 6; j++) v.c[j] = (float)h[j];
        break;
    case OPT_ADAX: {
        const double *q = a->per + 3 * (int64_t)t;
        float cc[8] = {(float)h[0], (float)h[1], (float)h[2], (float)h[4], (float)h[6],
                       (float)q[0], (float)q[1], (float)q[2]};
        memcpy(v.c, cc, sizeof cc);
        v.l2 = h[3] != 0.0;
        v.decoupled = h[5] != 0.0;
        break;
    }
    default: {
        double clr = a->per[t];
        v.l2 = h[1] != 0.0;
        if (h[4] != 0.0) {
            opt = LP_GLOVE;
            v.c[0] = (float)h[0];
            v.c[1] = (float)h[5];
            v.c[2] = (float)clr;
            v.do_clip = h[6] != 0.0;
        } else {
            v.c[0] = (float)h[0];
            v.c[1] = (float)h[2];
            v.c[2] = (float)-clr;
        }
    }
    }
    int64_t off = x->offset ? x->offset[t] : 0;
    uint32_t key[3];
    for (uint32_t j = 0; j < 3; j++) key[j] = lp_key(x->seed, x->steps[t], x->pidx[t], j);
    char *pbase = (char *)a->p[t];
    const char *gbase = (const char *)a->g[t];
    void *const sbase[2] = {a->s1[t], v.nst > 1 ? a->s2[t] : NULL};
    float *const ambase[2] = {x->kind[0] == SK_8BIT ? (float *)x->am[0][t] : NULL,
                              v.nst > 1 && x->kind[1] == SK_8BIT ? (float *)x->am[1][t] : NULL};
    LpBlockFn block = lp_blocks[opt == LP_GLOVE ? 4 : opt][v.kind[0]];
    for (int64_t i0 = s; i0 < s + n;) {
        uint64_t e0 = (uint64_t)(off + i0);
        int64_t k = LP_BLOCK - (int64_t)(e0 & (LP_BLOCK - 1));
        if (k > s + n - i0) k = s + n - i0;
        int64_t blk = (off + i0) / LP_BLOCK - off / LP_BLOCK;
        uint32_t lo0 = (uint32_t)e0, hi = (uint32_t)(e0 >> 32);
        block(&v, pbase, gbase, sbase, ambase, blk, i0, k, lo0, hi, key);
        i0 += k;
    }
}
#endif /* LP_AVX512 */

/* 1 when the low-precision step runs the AVX-512 block loop, 0 for the generic one */
int tigeropt_lowp_simd(void) {
#ifdef LP_AVX512
    return 1;
#else
    return 0;
#endif
}

static void lp_range(const Args *a, int t, int64_t s, int64_t n) {
#ifdef LP_AVX512
    if (a->dtype != DT_F16) {
        lp_range_avx512(a, t, s, n);
        return;
    }
#endif
    const LpArgs *x = (const LpArgs *)a->ext;
    int nst = x->opt == OPT_ADAX ? 2 : 1;
    int64_t off = x->offset ? x->offset[t] : 0;
    uint32_t key[3];
    for (uint32_t j = 0; j < 3; j++) key[j] = lp_key(x->seed, x->steps[t], x->pidx[t], j);
    int pdt = a->dtype;
    char *pbase = (char *)a->p[t];
    const char *gbase = (const char *)a->g[t];
    void *sbase[2] = {a->s1[t], nst > 1 ? a->s2[t] : NULL};
    float *ambase[2] = {x->kind[0] == SK_8BIT ? (float *)x->am[0][t] : NULL,
                        nst > 1 && x->kind[1] == SK_8BIT ? (float *)x->am[1][t] : NULL};
    float pb[LP_BLOCK], gb[LP_BLOCK], sb[2][LP_BLOCK];
    for (int64_t i0 = s; i0 < s + n;) {
        uint64_t e0 = (uint64_t)(off + i0);
        int64_t k = LP_BLOCK - (int64_t)(e0 & (LP_BLOCK - 1));
        if (k > s + n - i0) k = s + n - i0;
        uint32_t lo0 = (uint32_t)e0, hi = (uint32_t)(e0 >> 32);
        uint32_t kc[3] = {0, 0, 0};
        if (x->sr)
            for (int j = 0; j < 3; j++) kc[j] = chunk_key(key[j], hi);
        int64_t blk = (off + i0) / LP_BLOCK - off / LP_BLOCK; /* absmax index (off >= 0) */
        float *pw, *sw[2] = {NULL, NULL};
        const float *gw;
        if (pdt == DT_F32) {
            pw = (float *)pbase + i0;
            gw = (const float *)gbase + i0;
        } else {
            LOWP_LOAD(pb, (const uint16_t *)pbase + i0, k, pdt);
            LOWP_LOAD(gb, (const uint16_t *)gbase + i0, k, pdt);
            pw = pb;
            gw = gb;
        }
        if (x->negate) { /* -g flips the sign bit, also of a NaN (g * -1 would keep a NaN's sign) */
            for (int64_t i = 0; i < k; i++) gb[i] = -gw[i];
            gw = gb;
        }
        for (int j = 0; j < nst; j++) {
            if (x->kind[j] == SK_F32) {
                sw[j] = (float *)sbase[j] + i0;
            } else if (x->kind[j] == SK_BF16) {
                load_bf16(sb[j], (const uint16_t *)sbase[j] + i0, k);
                sw[j] = sb[j];
            } else {
                decode_e4m3_block(sb[j], (const uint8_t *)sbase[j] + i0, k, ambase[j][blk]);
                sw[j] = sb[j];
            }
        }
        lp_core(a, t, pw, gw, sw[0], sw[1], k);
        if (pdt == DT_BF16 && x->sr) {
            store_bf16_sr((uint16_t *)pbase + i0, pb, k, kc[0], lo0, 16);
        } else if (pdt == DT_BF16) {
            store_bf16_rtn((uint16_t *)pbase + i0, pb, k, x->bf16_nan);
        } else if (pdt != DT_F32) {
            LOWP_STORE((uint16_t *)pbase + i0, pb, k, pdt);
        }
        for (int j = 0; j < nst; j++) {
            if (x->kind[j] == SK_F32) continue;
            if (x->kind[j] == SK_BF16) {
                if (x->sr) /* state 0: the low half of the parameter's stream */
                    store_bf16_sr((uint16_t *)sbase[j] + i0, sb[j], k, j == 0 ? kc[0] : kc[1 + j], lo0,
                                  j == 0 ? 0 : 16);
                else
                    store_bf16_rtn((uint16_t *)sbase[j] + i0, sb[j], k, x->bf16_nan);
            } else {
                ambase[j][blk] = encode_e4m3_block((uint8_t *)sbase[j] + i0, sb[j], k, x->sr, kc[1 + j], lo0);
            }
        }
        i0 += k;
    }
}

/* The low-precision step of n tensors of one optimizer (opt: OPT_TIGER, OPT_LION, OPT_ADAX or
   OPT_ADAGRAD; hp and per as its entry point above, per from the step counts after the
   increment); dtype: the parameters' and gradients' (0 fp32, 2 bf16, 3 fp16); s1/s2 and
   kind1/kind2: the state tensors and how they are stored (SK_*; s2 only for AdaX), am1/am2 their
   absmax arrays when 8-bit; offset (or NULL), pidx, steps: per tensor, as LpArgs says; bf16_nan:
   the bf16 bits that rounding a NaN to nearest gives (torch's conversion: 0xffff on x86 builds,
   0x7fc0 in c10's scalar code), so that the stores equal torch's copy_ there.  The step
   counts are not touched (the caller increments them).  Returns 0, or -1 for arguments it does not
   take (nothing changed). */
int tigeropt_lowp_step(int opt, int n, int dtype, void *const *p, void *const *g, void *const *s1,
                       void *const *am1, void *const *s2, void *const *am2, int kind1, int kind2, int sr,
                       uint32_t seed, const int64_t *numel, const int64_t *offset, const int64_t *pidx,
                       const double *steps, const double *hp, const double *per, int bf16_nan,
                       int nthreads) {
    if (opt < OPT_TIGER || opt > OPT_ADAGRAD || (dtype != DT_F32 && dtype != DT_BF16 && dtype != DT_F16))
        return -1;
    if (dtype == DT_F16 && !TIGEROPT_F16) return -1;
    if (kind1 < SK_F32 || kind1 > SK_8BIT || (opt == OPT_ADAX && (kind2 < SK_F32 || kind2 > SK_8BIT)))
        return -1;
    if (offset)
        for (int i = 0; i < n; i++)
            if (offset[i] < 0) return -1;
    /* maximize: the cores' gradient sign gs (hp[3] Adagrad, hp[4] Tiger, hp[6] Lion, hp[7] AdaX) becomes
       +1 and the gradient is negated at the load instead */
    static const int gs_at[4] = {4, 6, 7, 3};
    double h[8];
    int nhp = opt == OPT_ADAGRAD ? 7 : gs_at[opt] + 1;
    memcpy(h, hp, (size_t)nhp * sizeof(double));
    int negate = h[gs_at[opt]] < 0.0;
    h[gs_at[opt]] = 1.0;
    LpArgs x = {opt, {kind1, kind2}, sr, seed, {am1, am2}, offset, pidx, steps, (uint16_t)bf16_nan, negate};
    Args a = {dtype, p, g, s1, s2, h, per, 0, &x};
    int64_t stack_shift[64];
    int64_t *shift = NULL;
    int eight = kind1 == SK_8BIT || (opt == OPT_ADAX && kind2 == SK_8BIT);
    if (eight && offset) { /* work items must not cut a block of the grid */
        shift = n <= 64 ? stack_shift : (int64_t *)malloc((size_t)n * sizeof(int64_t));
        if (shift == NULL) return -1;
        for (int i = 0; i < n; i++) shift[i] = offset[i] % LP_BLOCK;
    }
    run_shifted(n, numel, shift, nthreads, lp_range, &a);
    if (shift != stack_shift) free(shift);
    return 0;
}
