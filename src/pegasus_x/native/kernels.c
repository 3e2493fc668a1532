/* Decode-step kernels for the CPU: few-row linear layers and few-query attention.
 *
 * A decode step reads every decoder weight, the LM head and the cross-attention keys/values once, for one to a few
 * query rows: it is bound by memory bandwidth. These kernels stream each tensor once, split across the threads of
 * torch's own OpenMP pool (this file links the libgomp torch has already loaded, so no second pool competes for the
 * cores), and keep everything else in registers or L1. Built on first use by loader.py with the system C compiler;
 * without one, the library uses torch kernels instead. kernels.py calls them; px_constants() below tells it this
 * file's struct layout, limits and enum values, which it checks against its own at load.
 *
 * Past the decode step, the encoder's compute-bound work in fp32: px_gemm (its linears) and px_encoder_attention (its
 * attention), both on one register tile (section GEMM).
 *
 * Portable C with GCC/Clang vector extensions: the compiler maps v8f to the target's SIMD registers
 * (-march=native: AVX2 on x86, NEON pairs on ARM). Accumulation is fp32; bf16 tensors are widened on load, int8
 * weights (one fp32 scale per output row) are widened to fp32 in registers and scaled once per output.
 */
#include <float.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <omp.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

typedef float v8f __attribute__((vector_size(32), aligned(4)));          /* unaligned loads are fine */
typedef uint16_t v8h __attribute__((vector_size(16), aligned(2)));
typedef uint32_t v8u __attribute__((vector_size(32)));

#define ROW_CHUNK 4           /* linear: query rows per pass over the weight */
#define MAX_ROWS 8            /* px_linear: query rows per call (beyond, px_linear_rows) */
#define MAX_DRAFT_ROWS 72     /* px_decoder_rows, px_linear_rows, px_linear_int8: rows (× positions) per call */
#define MAX_HEAD_DIM 256      /* attention: head_dim upper bound for the on-stack accumulators */
#define L1_BYTES 32768       /* a core's L1 data cache, or less: what the few-row products keep there */
#define MAX_TOPK 256          /* px_topk: k per row (beam search keeps 2·beams candidates) */
#define ABI_VERSION 8         /* raise with any change to a px_ function's arguments */
/* Inlined at every call even past GCC's size limits: the callers' constant arguments (row counts, the key/value type)
 * must reach the loops, or the sums leave the registers (benchmarks/lookahead.py). */
#define ALWAYS_INLINE static inline __attribute__((always_inline))

static inline float hsum(v8f v) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

static inline v8f load_f32(const float *p) { return *(const v8f *)p; }

typedef int32_t v8i __attribute__((vector_size(32)));
typedef int32_t v8i_u __attribute__((vector_size(32), aligned(2)));   /* unaligned load of 16 bf16 */

/* The 8 horizontal sums of a[0..7] as one vector: a transpose-and-add tree instead of 8 separate hsums. */
static inline v8f hsum8(const v8f a[8]) {
    v8f u0 = __builtin_shufflevector(a[0], a[1], 0, 8, 2, 10, 4, 12, 6, 14)
           + __builtin_shufflevector(a[0], a[1], 1, 9, 3, 11, 5, 13, 7, 15);
    v8f u1 = __builtin_shufflevector(a[2], a[3], 0, 8, 2, 10, 4, 12, 6, 14)
           + __builtin_shufflevector(a[2], a[3], 1, 9, 3, 11, 5, 13, 7, 15);
    v8f u2 = __builtin_shufflevector(a[4], a[5], 0, 8, 2, 10, 4, 12, 6, 14)
           + __builtin_shufflevector(a[4], a[5], 1, 9, 3, 11, 5, 13, 7, 15);
    v8f u3 = __builtin_shufflevector(a[6], a[7], 0, 8, 2, 10, 4, 12, 6, 14)
           + __builtin_shufflevector(a[6], a[7], 1, 9, 3, 11, 5, 13, 7, 15);
    /* u0 = [a0 01, a1 01, a0 23, a1 23, a0 45, a1 45, a0 67, a1 67] (pairs of lanes summed) */
    v8f w0 = __builtin_shufflevector(u0, u1, 0, 1, 8, 9, 4, 5, 12, 13)
           + __builtin_shufflevector(u0, u1, 2, 3, 10, 11, 6, 7, 14, 15);
    v8f w1 = __builtin_shufflevector(u2, u3, 0, 1, 8, 9, 4, 5, 12, 13)
           + __builtin_shufflevector(u2, u3, 2, 3, 10, 11, 6, 7, 14, 15);
    /* w0 = [a0..a3 lanes 0-3, a0..a3 lanes 4-7] */
    return __builtin_shufflevector(w0, w1, 0, 1, 2, 3, 8, 9, 10, 11)
         + __builtin_shufflevector(w0, w1, 4, 5, 6, 7, 12, 13, 14, 15);
}

static inline v8f vmax(v8f a, v8f b) {
    v8i take = a < b;
    return (v8f)(((v8i)a & ~take) | ((v8i)b & take));
}

/* exp(x) for x <= 0 (a softmax after subtracting the maximum); exp(-inf) = 0. 2^k · e^r with k = round(x/ln 2),
 * r = x - k·ln 2 split in two constants (Cody–Waite), e^r by its degree-6 Taylor polynomial (|r| <= ln2/2:
 * error below 2e-7 relative, about one fp32 ulp). A SIMD exp, since the scalar expf costs as much as the scores. */
static inline v8f vexp(v8f x) {
    const v8f lo = (v8f){0} - 87.0f;
    v8i tiny = x < lo;                        /* below ~1.6e-38 (and -inf): 0 */
    x = (v8f)(((v8i)x & ~tiny) | ((v8i)lo & tiny));
    v8i k = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, v8i);   /* x <= 0: truncation rounds */
    v8f kf = __builtin_convertvector(k, v8f);
    v8f r = (x - kf * 0.693359375f) + kf * 2.12194440e-4f;
    v8f p = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 + r * (1.0f / 720))))));
    v8f scale = (v8f)((k + 127) << 23);
    return (v8f)((v8i)(p * scale) & ~tiny);
}

/* The largest of x[0 .. n) (-inf for n = 0). Four running maxima: one would wait on each comparison in turn.
 * With `finite`, also whether every value is finite (x·0 is 0 for finite x, NaN for NaN and ±inf). */
static inline float max_of(const float *x, int64_t n, int *finite) {
    v8f m[4], z = (v8f){0};
    for (int u = 0; u < 4; u++) m[u] = (v8f){0} - INFINITY;
    int64_t i = 0;
    for (; i + 32 <= n; i += 32)
        for (int u = 0; u < 4; u++) {
            v8f v = load_f32(x + i + 8 * u);
            m[u] = vmax(m[u], v);
            if (finite) z += v * 0.0f;
        }
    for (; i + 8 <= n; i += 8) {                  /* then a vector at a time, the last n % 8 one by one */
        v8f v = load_f32(x + i);
        m[0] = vmax(m[0], v);
        if (finite) z += v * 0.0f;
    }
    v8f mv = vmax(vmax(m[0], m[1]), vmax(m[2], m[3]));
    float best = -INFINITY, zs = hsum(z);
    for (int j = 0; j < 8; j++) best = mv[j] > best ? mv[j] : best;
    for (; i < n; i++) {
        best = x[i] > best ? x[i] : best;
        zs += x[i] * 0.0f;
    }
    if (finite) *finite = zs == 0.0f;
    return best;
}

/* sum of exp(x[i] - m) over i < n (m: at least every x[i]), each term also written to out[i] unless out is NULL
 * (out may be x). Four independent exponentials per step: one at a time, each waits on its predecessor's chain. */
static inline float exp_sum(const float *x, int64_t n, float m, float *out) {
    v8f t[4] = {{0}, {0}, {0}, {0}};
    int64_t i = 0;
    for (; i + 32 <= n; i += 32)
        for (int u = 0; u < 4; u++) {
            v8f e = vexp(load_f32(x + i + 8 * u) - m);
            if (out) memcpy(out + i + 8 * u, &e, sizeof e);
            t[u] += e;
        }
    for (; i + 8 <= n; i += 8) {                  /* then a vector at a time, the last n % 8 one by one */
        v8f e = vexp(load_f32(x + i) - m);
        if (out) memcpy(out + i, &e, sizeof e);
        t[0] += e;
    }
    float total = hsum((t[0] + t[1]) + (t[2] + t[3]));
    for (; i < n; i++) {
        float e = expf(x[i] - m);
        if (out) out[i] = e;
        total += e;
    }
    return total;
}

static inline v8f load_bf16(const uint16_t *p) {          /* bf16 is the top half of an fp32 */
    v8u w = __builtin_convertvector(*(const v8h *)p, v8u) << 16;
    v8f f;
    memcpy(&f, &w, sizeof f);
    return f;
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t w = (uint32_t)h << 16;
    float f;
    memcpy(&f, &w, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {             /* round to nearest even, like torch; NaN stays NaN */
    uint32_t w;
    memcpy(&w, &f, sizeof w);
    if ((w & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((w >> 16) | 0x40);
    return (uint16_t)((w + 0x7fffu + ((w >> 16) & 1u)) >> 16);
}

static inline float param(const void *p, int bf16, int64_t i) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* ------------------------------------------------------------------------------------------------ linear
 * y[r, o] = sum_i W[o, i] x[r, i] + bias[o]  for r < rows <= MAX_ROWS.  W: (out, in) row-major, fp32 or bf16
 * (is_bf16). x and y are fp32 (the caller widens/narrows the few activations; the weights are what costs).
 * Each thread takes a contiguous range of output rows and streams that part of W once.
 */
/* One weight row at a time: each thread then reads one sequential stream, which the hardware prefetcher follows at
 * the rate of a plain sum (two or more interleaved rows ran slower in A/B runs). U vectors per step for every query row:
 * U·rows ≤ 8 independent accumulators. With rows constant (DISPATCH_ROWS) the accumulators live in registers. */
static inline void dot_block_f32(const float *W, int64_t o0, int64_t o1, int64_t in, const float *x,
                                 const float *xs, int rows, float *y, int64_t out) {
    (void)xs;
    const int U = rows == 1 ? 4 : 2;
    int64_t inU = in - in % (8 * U);
    for (int64_t o = o0; o < o1; o++) {
        const float *w = W + o * in;
        v8f acc[ROW_CHUNK][4];
        for (int r = 0; r < rows; r++)
            for (int u = 0; u < U; u++) acc[r][u] = (v8f){0};
        for (int64_t i = 0; i < inU; i += 8 * U) {
            /* With several query rows each weight load carries more arithmetic and fewer loads are in flight: a
             * prefetch 1 KB ahead keeps the stream going (faster at 4 rows in A/B runs; no help for one row). */
            if (rows > 1) __builtin_prefetch(w + i + 256);
            for (int u = 0; u < U; u++) {
                v8f wv = load_f32(w + i + 8 * u);
                for (int r = 0; r < rows; r++) acc[r][u] += wv * load_f32(x + r * in + i + 8 * u);
            }
        }
        for (int r = 0; r < rows; r++) {
            v8f a = acc[r][0];
            for (int u = 1; u < U; u++) a += acc[r][u];
            float sum = hsum(a);
            for (int64_t i = inU; i < in; i++) sum += w[i] * x[r * in + i];
            y[r * out + o] = sum;
        }
    }
}

/* bf16 weights, 16 per 32-byte load: the even elements are the low halves of its 32-bit lanes (shift them up),
 * the odd ones the high halves (mask the low half off) — two fp32 vectors for two integer operations, where
 * widening 8 at a time costs a shuffle each and streamed slower. xs holds each row of x split the same
 * way: x[0], x[2], … x[n-2] then x[1], x[3], … x[n-1] over the first n = in − in % 16 elements. */
static inline void dot_block_bf16(const uint16_t *W, int64_t o0, int64_t o1, int64_t in, const float *x,
                                  const float *xs, int rows, float *y, int64_t out) {
    const int U = rows == 1 ? 2 : 1;
    int64_t n = in - in % 16, nU = in - in % (16 * U), half = n / 2;
    for (int64_t o = o0; o < o1; o++) {
        const uint16_t *w = W + o * in;
        v8f even[ROW_CHUNK][2], odd[ROW_CHUNK][2];
        for (int r = 0; r < rows; r++)
            for (int u = 0; u < U; u++) even[r][u] = odd[r][u] = (v8f){0};
        for (int64_t i = 0; i < nU; i += 16 * U) {
            /* Unlike fp32, one row gains from the prefetch too (in A/B runs): a bf16 load carries twice the
             * arithmetic per byte, so fewer loads are in flight. */
            __builtin_prefetch(w + i + 512);               /* 1 KB ahead, as in dot_block_f32 */
            for (int u = 0; u < U; u++) {
                v8i pair = *(const v8i_u *)(w + i + 16 * u);
                v8i lo = pair << 16, hi = pair & (int32_t)0xffff0000;
                v8f we, wo;
                memcpy(&we, &lo, sizeof we);
                memcpy(&wo, &hi, sizeof wo);
                for (int r = 0; r < rows; r++) {
                    const float *xe = xs + r * in + (i + 16 * u) / 2;
                    even[r][u] += we * load_f32(xe);
                    odd[r][u] += wo * load_f32(xe + half);
                }
            }
        }
        for (int r = 0; r < rows; r++) {
            v8f a = even[r][0] + odd[r][0];
            for (int u = 1; u < U; u++) a += even[r][u] + odd[r][u];
            float sum = hsum(a);
            for (int64_t i = nU; i < in; i++) sum += bf16_to_f32(w[i]) * x[r * in + i];
            y[r * out + o] = sum;
        }
    }
}

/* xs for dot_block_bf16: each row's first n = in − in % 16 elements, even ones first, then odd ones (elements
 * i0 ≤ i < i1 of them: threads can each split the part of x they computed). */
static void split_range(const float *x, int rows, int64_t in, int64_t i0, int64_t i1, float *xs) {
    int64_t n = in - in % 16;
    for (int r = 0; r < rows; r++)
        for (int64_t i = i0; i < (i1 < n ? i1 : n); i++) xs[r * in + (i % 2 ? n / 2 : 0) + i / 2] = x[r * in + i];
}

static void split_even_odd(const float *x, int rows, int64_t in, float *xs) { split_range(x, rows, in, 0, in, xs); }

/* Thread t's share [o0, o1) of `out` outputs: even shares, boundaries on multiples of 8 rows so no two threads write
 * the same cache line of y. */
static void share(int64_t out, int t, int n, int64_t *o0, int64_t *o1) {
    int64_t per = ((out + n - 1) / n + 7) / 8 * 8;
    *o0 = t * per < out ? t * per : out;
    *o1 = *o0 + per < out ? *o0 + per : out;
}

/* Specialise the block on the row count so the accumulator arrays live in registers. */
#define DISPATCH_ROWS(FN, W, o0, o1, in, x, xs, rows, y, out)                                                   \
    switch (rows) {                                                                                             \
    case 1: FN(W, o0, o1, in, x, xs, 1, y, out); break;                                                        \
    case 2: FN(W, o0, o1, in, x, xs, 2, y, out); break;                                                        \
    case 3: FN(W, o0, o1, in, x, xs, 3, y, out); break;                                                        \
    default: FN(W, o0, o1, in, x, xs, 4, y, out); break;                                                       \
    }

/* Outputs o0 ≤ o < o1 of y = W x (no bias) for every row, one pass over those weight rows per ROW_CHUNK rows. */
static void linear_range(const void *W, int is_bf16, int64_t o0, int64_t o1, int64_t out, int64_t in,
                         const float *x, const float *xs, int rows, float *y) {
    for (int r0 = 0; r0 < rows; r0 += ROW_CHUNK) {
        int rn = rows - r0 < ROW_CHUNK ? rows - r0 : ROW_CHUNK;
        const float *xc = x + r0 * in, *xsc = xs ? xs + r0 * in : NULL;
        float *yc = y + r0 * out;
        if (is_bf16) {
            DISPATCH_ROWS(dot_block_bf16, (const uint16_t *)W, o0, o1, in, xc, xsc, rn, yc, out)
        } else {
            DISPATCH_ROWS(dot_block_f32, (const float *)W, o0, o1, in, xc, xsc, rn, yc, out)
        }
    }
}

/* y[r, o] += bias[o] (fp32 or bf16) for o0 ≤ o < o1; nothing without a bias. */
static void add_bias(const void *bias, int bf16, int64_t o0, int64_t o1, int rows, float *y, int64_t out) {
    if (bias)
        for (int r = 0; r < rows; r++)
            for (int64_t o = o0; o < o1; o++) y[r * out + o] += param(bias, bf16, o);
}

/* Thread t of n computes its share of y = W x (+ bias, in W's dtype). xs: split_even_odd(x) when W is bf16. */
static void linear_part(const void *W, int is_bf16, int64_t out, int64_t in, const float *x, const float *xs,
                        int rows, const void *bias, float *y, int t, int n) {
    int64_t o0, o1;
    share(out, t, n, &o0, &o1);
    linear_range(W, is_bf16, o0, o1, out, in, x, xs, rows, y);
    add_bias(bias, is_bf16, o0, o1, rows, y, out);
}

static void linear_rows(const void *W, int is_bf16, int64_t out, int64_t in, const float *x, const float *xs,
                        int rows, const void *bias, float *y, int t, int n);

/* Whether `rows` query rows take linear_rows' register tiles (the weight streamed once for all of them) rather than
 * linear_part (once per ROW_CHUNK rows, each weight vector meeting one row chunk's sums): for fp32 from 2 rows, for
 * bf16 from 4, where linear_part's paired bf16 loads still win (benchmarks/peers.py, beam 4; the decode step). */
static inline int tiles_win(int rows, int bf16) { return rows >= (bf16 ? 4 : 2); }

/* Scratch floats px_linear needs: the even/odd split of x for bf16 weights. */
int64_t px_linear_work(int64_t rows, int64_t in, int is_bf16) { return is_bf16 ? rows * in : 0; }

/* x: fp32 (rows, in); bias: W's dtype or NULL; y: fp32 (rows, out); work: px_linear_work floats. */
int px_linear(const void *W, int is_bf16, int64_t out, int64_t in, const float *x, int rows, const void *bias,
              float *y, float *work, int threads) {
    if (rows < 1 || rows > MAX_ROWS) return 1;
    if (is_bf16)
        split_even_odd(x, rows, in, work);
#pragma omp parallel num_threads(threads)
    (tiles_win(rows, is_bf16) ? linear_rows : linear_part)(W, is_bf16, out, in, x, is_bf16 ? work : NULL, rows, bias,
                                                           y, omp_get_thread_num(), omp_get_num_threads());
    return 0;
}

/* --------------------------------------------------------------------------------------------- int8 linear
 * y[r, o] = scale[o] · sum_i Q[o, i] x[r, i] + bias[o]: weight-only int8 (quantize.py: per output row, symmetric).
 * A quarter of fp32's bytes per weight; each 8 int8 are sign-extended and converted to one fp32 vector in
 * registers (with AVX2: vpmovsxbd + vcvtdq2ps, then an FMA per query row) and the scale is applied once per output.
 * The sums are exact products of small integers and fp32 activations, so the only difference from the torch
 * reference (dequantize, then F.linear) is the order of summation.
 */
#ifdef __AVX2__
/* vpmovsxbd + vcvtdq2ps: GCC's __builtin_convertvector from 8 int8 widens one element at a time instead. */
static inline v8f load_i8(const int8_t *p) {
    __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
    v8f out;
    memcpy(&out, &f, sizeof out);
    return out;
}
#else
/* Portable: the compiler vectorises what it can for the target. */
static inline v8f load_i8(const int8_t *p) {
    v8f out;
    for (int j = 0; j < 8; j++) out[j] = (float)p[j];
    return out;
}
#endif

/* Weight rows w0 and w1 against `rows` query rows at once, their sums (before the horizontal add) into s0 and s1:
 * each activation vector is loaded once for both weight rows. */
static inline void dot_pair_i8(const int8_t *w0, const int8_t *w1, int64_t in, const float *x, int rows,
                               v8f s0[ROW_CHUNK], v8f s1[ROW_CHUNK]) {
    int64_t in8 = in - in % 8;
    v8f a0[ROW_CHUNK], a1[ROW_CHUNK];
    for (int r = 0; r < rows; r++) a0[r] = a1[r] = (v8f){0};
    for (int64_t i = 0; i < in8; i += 8) {
        __builtin_prefetch(w0 + i + 1024);
        __builtin_prefetch(w1 + i + 1024);
        v8f u0 = load_i8(w0 + i), u1 = load_i8(w1 + i);
        for (int r = 0; r < rows; r++) {
            v8f xv = load_f32(x + r * in + i);
            a0[r] += u0 * xv;
            a1[r] += u1 * xv;
        }
    }
    for (int r = 0; r < rows; r++) {
        float t0 = 0.0f, t1 = 0.0f;
        for (int64_t i = in8; i < in; i++) {
            t0 += (float)w0[i] * x[r * in + i];
            t1 += (float)w1[i] * x[r * in + i];
        }
        a0[r][0] += t0;
        a1[r][0] += t1;
        s0[r] = a0[r];
        s1[r] = a1[r];
    }
}

/* Output rows o0 ≤ o < o1, 8 at a time where possible: the 8 rows' sums leave through one hsum8. When the query
 * rows outgrow L1 (the feed-forward's second product at four rows), weight rows go in pairs so each activation
 * load serves two of them (benchmarks/peers.py, beam 4). */
static inline void dot_block_i8(const int8_t *W, const float *scale, int64_t o0, int64_t o1, int64_t in,
                                const float *x, int rows, float *y, int64_t out) {
    const int U = rows == 1 ? 4 : 2;
    int64_t inU = in - in % (8 * U);
    int pairs = rows * in * (int64_t)sizeof(float) > L1_BYTES;
    for (int64_t ob = o0; ob < o1; ob += 8) {
        int64_t on = o1 - ob < 8 ? o1 - ob : 8;
        v8f sums[ROW_CHUNK][8];
        for (int64_t j = 0; j < 8; j++) {
            if (j >= on) {
                for (int r = 0; r < rows; r++) sums[r][j] = (v8f){0};
                continue;
            }
            if (pairs && j + 1 < on) {
                v8f s0[ROW_CHUNK], s1[ROW_CHUNK];
                dot_pair_i8(W + (ob + j) * in, W + (ob + j + 1) * in, in, x, rows, s0, s1);
                for (int r = 0; r < rows; r++) {
                    sums[r][j] = s0[r];
                    sums[r][j + 1] = s1[r];
                }
                j++;
                continue;
            }
            const int8_t *w = W + (ob + j) * in;
            v8f acc[ROW_CHUNK][4];
            for (int r = 0; r < rows; r++)
                for (int u = 0; u < U; u++) acc[r][u] = (v8f){0};
            for (int64_t i = 0; i < inU; i += 8 * U) {
                __builtin_prefetch(w + i + 1024);         /* int8 carries 4x fp32's arithmetic per byte */
                for (int u = 0; u < U; u++) {
                    v8f wv = load_i8(w + i + 8 * u);
                    for (int r = 0; r < rows; r++) acc[r][u] += wv * load_f32(x + r * in + i + 8 * u);
                }
            }
            for (int r = 0; r < rows; r++) {
                v8f a = acc[r][0];
                for (int u = 1; u < U; u++) a += acc[r][u];
                float tail = 0.0f;
                for (int64_t i = inU; i < in; i++) tail += (float)w[i] * x[r * in + i];
                a[0] += tail;
                sums[r][j] = a;
            }
        }
        for (int r = 0; r < rows; r++) {
            v8f s = hsum8(sums[r]);
            for (int64_t j = 0; j < on; j++) y[r * out + ob + j] = s[j] * scale[ob + j];
        }
    }
}

/* linear_part for int8 weights: thread t of n computes its share of y = scale · (Q x) (+ bias, fp32 or bf16). */
static void linear_part_i8(const int8_t *W, const float *scale, int64_t out, int64_t in, const float *x, int rows,
                           const void *bias, int bias_bf16, float *y, int t, int n) {
    int64_t o0, o1;
    share(out, t, n, &o0, &o1);
    for (int r0 = 0; r0 < rows; r0 += ROW_CHUNK) {
        int rn = rows - r0 < ROW_CHUNK ? rows - r0 : ROW_CHUNK;
        const float *xc = x + r0 * in;
        float *yc = y + r0 * out;
        switch (rn) {                         /* the row count as a constant: accumulators in registers */
        case 1: dot_block_i8(W, scale, o0, o1, in, xc, 1, yc, out); break;
        case 2: dot_block_i8(W, scale, o0, o1, in, xc, 2, yc, out); break;
        case 3: dot_block_i8(W, scale, o0, o1, in, xc, 3, yc, out); break;
        default: dot_block_i8(W, scale, o0, o1, in, xc, 4, yc, out); break;
        }
    }
    add_bias(bias, bias_bf16, o0, o1, rows, y, out);
}

/* A decoder layer's product: int8 weights when `scale` is given (in chunks of ROW_CHUNK rows per stream of the
 * weight), else W in the layer's dtype: linear_part for a few rows, or with `tiles` linear_rows, which streams it
 * once for any number of rows (layer_rows). */
static void linear_any(const void *W, const float *scale, int bf16, int64_t out, int64_t in, const float *x,
                       const float *xs, int rows, const void *bias, float *y, int t, int n, int tiles) {
    if (scale)
        linear_part_i8((const int8_t *)W, scale, out, in, x, rows, bias, bf16, y, t, n);
    else if (tiles)
        linear_rows(W, bf16, out, in, x, xs, rows, bias, y, t, n);
    else
        linear_part(W, bf16, out, in, x, xs, rows, bias, y, t, n);
}

/* W: int8 (out, in) row-major; scale: fp32 (out); x: fp32 (rows, in); bias: fp32/bf16 (bias_bf16) or NULL;
 * y: fp32 (rows, out). */
int px_linear_int8(const int8_t *W, const float *scale, int64_t out, int64_t in, const float *x, int rows,
                   const void *bias, int bias_bf16, float *y, int threads) {
    if (rows < 1 || rows > MAX_DRAFT_ROWS) return 1;
#pragma omp parallel num_threads(threads)
    linear_part_i8(W, scale, out, in, x, rows, bias, bias_bf16, y, omp_get_thread_num(), omp_get_num_threads());
    return 0;
}

/* --------------------------------------------------------------------------------------------- attention
 * out[b, h, g] = softmax_s(scale · q[b, h, g] · k[b, h, s] + mask) v[b, h, s]   for g < G query rows, s < S.
 * q and out: fp32, element (b, h, g, d) at b·sb + h·sh + g·sg + d (the same strides for both).
 * k, v: fp32, bf16 or int8 (kv: KV_*), element (b, h, s, d) at b·k_sb + h·k_sh + s·D + d (a view of a preallocated
 * cache works as is). int8 rows come with fp32 scales (k_scale, v_scale: one per row, element (b, h, s) at
 * (b·k_sb + h·k_sh) / D + s): a key's score is scaled once after its dot product, a value's scale is folded into
 * its softmax weight. keep: (B, S) bytes with batch stride keep_sb, nonzero = attend; NULL = every key.
 * scores: fp32 scratch of G · (S + D) for this task. A row with no key to attend gets zeros.
 * One (batch, head) pair per call: its keys and values stream once for all G query rows.
 */
enum { KV_F32, KV_BF16, KV_I8 };    /* keys/values: fp32, bf16 (0 and 1: a layer's bf16 flag), int8 with row scales */

typedef struct {
    const float *q;
    float *out;
    int64_t sb, sh, sg;
    const void *k, *v;
    int64_t k_sb, k_sh, v_sb, v_sh;
    int kv;
    const uint8_t *keep;
    int64_t keep_sb;
    int64_t B, H, G, S, D;
    const float *k_scale, *v_scale;   /* KV_I8 only */
} attn_args;

static inline int64_t kv_bytes(int kv) { return kv == KV_F32 ? 4 : kv == KV_BF16 ? 2 : 1; }

/* Vectors v0 … v0+nv-1 of row `off` of a key/value tensor as fp32 vectors. With `pairs` (bf16, D a multiple of 16;
 * v0 and nv even) each 16 elements come from one 32-byte load as the vector of the even elements then that of the
 * odd ones (see dot_block_bf16): the caller permutes the query the same way and un-permutes the output
 * (store_head). */
static inline void load_part(const void *base, int kv, int pairs, int64_t off, int64_t v0, const int64_t nv,
                             v8f *dst) {
    if (kv == KV_F32) {
        for (int64_t d = 0; d < nv; d++) dst[d] = load_f32((const float *)base + off + 8 * (v0 + d));
    } else if (kv == KV_I8) {
        for (int64_t d = 0; d < nv; d++) dst[d] = load_i8((const int8_t *)base + off + 8 * (v0 + d));
    } else if (pairs) {
        for (int64_t d = 0; d < nv / 2; d++) {
            v8i pair = *(const v8i_u *)((const uint16_t *)base + off + 8 * v0 + 16 * d);
            v8i lo = pair << 16, hi = pair & (int32_t)0xffff0000;
            memcpy(&dst[2 * d], &lo, sizeof lo);
            memcpy(&dst[2 * d + 1], &hi, sizeof hi);
        }
    } else {
        for (int64_t d = 0; d < nv; d++) dst[d] = load_bf16((const uint16_t *)base + off + 8 * (v0 + d));
    }
}

/* Row `off` of D elements as D/8 vectors (load_part over the whole row). */
static inline void load_row(const void *base, int kv, int pairs, int64_t off, const int64_t D, v8f *dst) {
    load_part(base, kv, pairs, off, 0, D / 8, dst);
}

/* One query row's D sums into its output row o, back from load_row's order when `pairs`. */
static inline void store_head(float *o, const float *sum, int pairs, const int64_t D) {
    if (pairs)
        for (int64_t d = 0; d < D; d++) o[d] = sum[(d & ~15) + (d & 1) * 8 + (d & 15) / 2];
    else
        memcpy(o, sum, D * sizeof(float));
}

/* acc += sum over s < S of p[s] · v[s] for one query row: each value row is read once, in load_row's order. With D
 * constant the compiler unrolls the inner loop (the row's sums fit the registers). */
static inline void value_row(const attn_args *a, int64_t b, int64_t h, const float *p, int64_t S,
                             v8f acc[MAX_HEAD_DIM / 8], const int64_t D, int pairs) {
    for (int64_t s = 0; s < S; s++) {
        v8f vr[MAX_HEAD_DIM / 8];
        load_row(a->v, a->kv, pairs, b * a->v_sb + h * a->v_sh + s * D, D, vr);
        for (int64_t d = 0; d < D / 8; d++) acc[d] += vr[d] * p[s];
    }
}

/* acc[g, vectors v0 … v0+vn-1] += sum over s0 ≤ s < s1 of p[g·S + s] · v[s] for gn query rows (gn and vn ≤
 * VALUE_VECS constants): the sums of gn rows × vn vectors stay in registers while the tile of value rows is read
 * from L1. */
#define VALUE_VECS 4
#define VALUE_ROWS 3
ALWAYS_INLINE void value_part(const attn_args *a, const int kv, int64_t off, const float *p, int64_t S, int64_t s0,
                              int64_t s1, int64_t v0, const int gn, const int vn, int pairs, float *acc,
                              const int64_t D, const char *next, int64_t *fetched, int64_t lines) {
    v8f c[VALUE_ROWS][VALUE_VECS];
    for (int g = 0; g < gn; g++)
        for (int d = 0; d < vn; d++) c[g][d] = load_f32(acc + g * D + 8 * (v0 + d));
    for (int64_t s = s0; s < s1; s++) {
        if (*fetched < lines) __builtin_prefetch(next + 64 * (*fetched)++);   /* the next tile, spread over passes */
        v8f w[VALUE_ROWS], vr[VALUE_VECS] = {0};  /* all set by load_part (with pairs vn is even) */
        for (int g = 0; g < gn; g++) w[g] = (v8f){0} + p[g * S + s];
        load_part(a->v, kv, pairs, off + s * D, v0, vn, vr);
        for (int d = 0; d < vn; d++)
            for (int g = 0; g < gn; g++) c[g][d] += vr[d] * w[g];
    }
    for (int g = 0; g < gn; g++)
        for (int d = 0; d < vn; d++) memcpy(acc + g * D + 8 * (v0 + d), &c[g][d], sizeof c[g][d]);
}

/* value_part with gn (1 … VALUE_ROWS) and vn (1 … VALUE_VECS) as constants, so its loops unroll. */
#define VALUE_PART(GN, VN) value_part(a, kv, off, pg, S, s0, s1, v0, GN, VN, pairs, ag, D, next, &fetched, lines)
#define VALUE_PART_ROWS(GN)                                                                                       \
    switch (vn) {                                                                                                 \
    case 1: VALUE_PART(GN, 1); break;                                                                             \
    case 2: VALUE_PART(GN, 2); break;                                                                             \
    case 3: VALUE_PART(GN, 3); break;                                                                             \
    default: VALUE_PART(GN, VALUE_VECS); break;                                                                   \
    }

/* The value pass of attend_one for G query rows: tiles of VALUE_TILE value rows, each read from memory once and
 * then from L1 by every chunk of query rows and every VALUE_VECS vectors of the head (the last group of a head
 * whose D/8 vectors are not a multiple of VALUE_VECS is shorter; with bf16 `pairs` D/8 is even, and so is every
 * group), while the next tile is fetched. Each output element is still summed over s in order (the same sums as
 * value_row). acc: G·D floats. */
#define VALUE_TILE 64
ALWAYS_INLINE void value_tiles_kv(const attn_args *a, const int kv, int64_t b, int64_t h, const float *p, int64_t G,
                                  int64_t S, const int64_t D, int pairs, float *acc) {
    int64_t off = b * a->v_sb + h * a->v_sh, size = kv_bytes(kv), nch = (G + VALUE_ROWS - 1) / VALUE_ROWS;
    memset(acc, 0, G * D * sizeof(float));
    for (int64_t s0 = 0; s0 < S; s0 += VALUE_TILE) {
        int64_t s1 = s0 + VALUE_TILE < S ? s0 + VALUE_TILE : S, fetched = 0;
        int64_t lines = s1 < S ? ((S - s1 < VALUE_TILE ? S - s1 : VALUE_TILE) * D * size + 63) / 64 : 0;
        const char *next = (const char *)a->v + (off + s1 * D) * size;
        for (int64_t c = 0, g0 = 0; c < nch; c++) {
            int64_t gn = G / nch + (c < G % nch);
            for (int64_t v0 = 0; v0 < D / 8; v0 += VALUE_VECS) {
                const float *pg = p + g0 * S;
                float *ag = acc + g0 * D;
                int vn = D / 8 - v0 < VALUE_VECS ? (int)(D / 8 - v0) : VALUE_VECS;
                if (gn == 1) {                    /* the row count as a constant */
                    VALUE_PART_ROWS(1)
                } else if (gn == 2) {
                    VALUE_PART_ROWS(2)
                } else {
                    VALUE_PART_ROWS(VALUE_ROWS)
                }
            }
            g0 += gn;
        }
    }
}

/* value_tiles_kv with the key/value type as a constant: no branch on it per value row. */
static void value_tiles(const attn_args *a, int64_t b, int64_t h, const float *p, int64_t G, int64_t S,
                        const int64_t D, int pairs, float *acc) {
    switch (a->kv) {
    case KV_F32: value_tiles_kv(a, KV_F32, b, h, p, G, S, D, pairs, acc); break;
    case KV_BF16: value_tiles_kv(a, KV_BF16, b, h, p, G, S, D, pairs, acc); break;
    default: value_tiles_kv(a, KV_I8, b, h, p, G, S, D, pairs, acc); break;
    }
}

/* Key s's score from its scaled dot product v: -inf where the key is masked, times the row scale of int8 keys. */
static inline float key_score(float v, const uint8_t *kp, const float *ks, int64_t s) {
    return kp && !kp[s] ? -INFINITY : ks ? v * ks[s] : v;
}

/* Scores of query rows g0 … g0+R-1 (q, row stride sg) against the 4 keys from row `koff` of the key tensor: R × 4
 * sums over the head dim, each in its own register, so every key vector is loaded (and widened) once for the R rows
 * and every query vector once for the 4 keys, and no sum waits on another (one chain of FMAs per key and row stalls
 * on their latency). R, kv and D are constants at every call. Written to scores[(g0 + g)·S + s0 + j], scaled, int8
 * keys' row scales applied, masked keys -inf. */
ALWAYS_INLINE void score_tile(const attn_args *a, const int kv, int64_t koff, const float *q, int64_t sg, const int R,
                              const int64_t D, float scale, const uint8_t *kp, const float *ks, int64_t g0,
                              int64_t s0, float *scores) {
    v8f acc[3][4], t[16] = {0};
    for (int g = 0; g < R; g++)
        for (int j = 0; j < 4; j++) acc[g][j] = (v8f){0};
    for (int64_t d = 0; d < D / 8; d++) {
        v8f qv[3];
        for (int g = 0; g < R; g++) qv[g] = load_f32(q + g * sg + 8 * d);
        for (int j = 0; j < 4; j++) {
            v8f kr;
            load_part(a->k, kv, 0, koff + j * D, d, 1, &kr);
            for (int g = 0; g < R; g++) acc[g][j] += kr * qv[g];
        }
    }
    for (int g = 0; g < R; g++)
        for (int j = 0; j < 4; j++) t[4 * g + j] = acc[g][j];
    v8f lo = hsum8(t), hi = R > 2 ? hsum8(t + 8) : (v8f){0};    /* lanes 4g + j: rows 0-1, then row 2 */
    for (int g = 0; g < R; g++)
        for (int j = 0; j < 4; j++) {
            float v = (g < 2 ? lo[4 * g + j] : hi[j]) * scale;
            scores[(g0 + g) * a->S + s0 + j] = key_score(v, kp, ks, s0 + j);
        }
}

/* Fetch keys s0 + KEY_AHEAD … s0 + KEY_AHEAD + n - 1 (rows of row_bytes; key_bytes in all). For many query rows only:
 * then each key row carries enough arithmetic that the hardware prefetcher falls behind; with a few it keeps up, and
 * the extra loads only slow the step (benchmarks/peers.py, greedy at 4,096 tokens). */
#define KEY_AHEAD 32
static inline void fetch_ahead(const char *kbase, int64_t s0, int64_t n, int64_t row_bytes, int64_t key_bytes) {
    for (int64_t at = (s0 + KEY_AHEAD) * row_bytes; at < (s0 + KEY_AHEAD + n) * row_bytes && at < key_bytes; at += 64)
        __builtin_prefetch(kbase + at);
}

#define SCORE_ROWS 3          /* query rows per score_tile */
static inline void attend_one(const attn_args *a, int64_t bh, float *scores, const int64_t D, const int kv) {
    int64_t b = bh / a->H, h = bh % a->H, G = a->G, S = a->S, sg = a->sg;
    const float *qb = a->q + b * a->sb + h * a->sh;
    const uint8_t *kp = a->keep ? a->keep + b * a->keep_sb : NULL;
    float scale = 1.0f / sqrtf((float)D);
    int pairs = kv == KV_BF16 && D % 16 == 0;
    int64_t koff = b * a->k_sb + h * a->k_sh;
    const char *kbase = (const char *)a->k + koff * kv_bytes(kv);
    int64_t row_bytes = D * kv_bytes(kv), key_bytes = S * row_bytes;
    const float *ks = kv == KV_I8 ? a->k_scale + koff / D : NULL;
    const float *vs = kv == KV_I8 ? a->v_scale + (b * a->v_sb + h * a->v_sh) / D : NULL;
    if (kv != KV_F32 || G == 1) {
        /* One pass over the keys (per chunk of at most MAX_ROWS query rows, balanced: 9 rows as 5 + 4); each key row,
         * once widened, meets the query rows straight away: their partial sums, not the widened row, wait for the
         * 8-key horizontal sum. One row is bound by reading the keys; for bf16 and int8 keys this keeps the
         * widening to one pass (with `pairs`, two bf16 vectors per load), where score_tile's loads were slower. */
        if (pairs) {                          /* the query in load_row's order: 8 even, 8 odd elements per 16 */
            float *qs = scores + G * S;
            for (int64_t g = 0; g < G; g++)
                for (int64_t d = 0; d < D; d++) qs[g * D + (d & ~15) + (d & 1) * 8 + (d & 15) / 2] = qb[g * sg + d];
            qb = qs;
            sg = D;
        }
        int64_t nch = (G + MAX_ROWS - 1) / MAX_ROWS;
        for (int64_t s0 = 0; s0 < S; s0 += 8) {
            int64_t n = S - s0 < 8 ? S - s0 : 8;
            if (G > 4)
                fetch_ahead(kbase, s0, 8, row_bytes, key_bytes);
            for (int64_t c = 0, g0 = 0; c < nch; c++) {
                int64_t gn = G / nch + (c < G % nch);
                const float *qg = qb + g0 * sg;
                v8f acc[MAX_ROWS][8];
                for (int64_t j = 0; j < 8; j++) {
                    v8f kr[MAX_HEAD_DIM / 8];
                    if (j < n)
                        load_row(a->k, kv, pairs, koff + (s0 + j) * D, D, kr);
                    else
                        for (int64_t d = 0; d < D / 8; d++) kr[d] = (v8f){0};
                    for (int64_t g = 0; g < gn; g++) {
                        v8f sum = {0};                /* + the first product exactly: the same sums as from it */
                        for (int64_t d = 0; d < D / 8; d++) sum += kr[d] * load_f32(qg + g * sg + 8 * d);
                        acc[g][j] = sum;
                    }
                }
                for (int64_t g = 0; g < gn; g++) {
                    v8f sc = hsum8(acc[g]) * scale;
                    float *out = scores + (g0 + g) * S + s0;
                    if (n == 8 && !kp) {              /* 8 unmasked keys: one vector (int8 keys: times their scales) */
                        if (ks) sc *= load_f32(ks + s0);
                        memcpy(out, &sc, sizeof sc);
                    } else {
                        for (int64_t j = 0; j < n; j++) out[j] = key_score(sc[j], kp, ks, s0 + j);
                    }
                }
                g0 += gn;
            }
        }
    } else {
        /* Several query rows, fp32 keys: 4 keys at a time meet every chunk of at most SCORE_ROWS rows (balanced: 4
         * rows as 2 + 2) in score_tile while they are in L1. */
        int64_t nch = (G + SCORE_ROWS - 1) / SCORE_ROWS, S4 = S - S % 4;
        for (int64_t s0 = 0; s0 < S4; s0 += 4) {
            if (G > 4)
                fetch_ahead(kbase, s0, 4, row_bytes, key_bytes);
            for (int64_t c = 0, g0 = 0; c < nch; c++) {
                int64_t gn = G / nch + (c < G % nch);
                const float *qg = qb + g0 * sg;
                switch (gn) {                     /* the chunk's rows as a constant */
                case 1: score_tile(a, kv, koff + s0 * D, qg, sg, 1, D, scale, kp, ks, g0, s0, scores); break;
                case 2: score_tile(a, kv, koff + s0 * D, qg, sg, 2, D, scale, kp, ks, g0, s0, scores); break;
                default: score_tile(a, kv, koff + s0 * D, qg, sg, 3, D, scale, kp, ks, g0, s0, scores); break;
                }
                g0 += gn;
            }
        }
        for (int64_t s = S4; s < S; s++)          /* the last S % 4 keys, one row at a time */
            for (int64_t g = 0; g < G; g++) {
                v8f sum = (v8f){0}, kr;
                for (int64_t d = 0; d < D / 8; d++) {
                    load_part(a->k, kv, 0, koff + s * D, d, 1, &kr);
                    sum += kr * load_f32(qb + g * sg + 8 * d);
                }
                float v = hsum(sum) * scale;
                scores[g * S + s] = key_score(v, kp, ks, s);
            }
    }
    /* Softmax per query row, in place (the scores of one head stay in L2: S floats per query row). */
    for (int64_t g = 0; g < G; g++) {
        float *row = scores + g * S, mx = max_of(row, S, NULL);
        if (mx == -INFINITY) {                    /* nothing to attend: the row's weights are all 0 */
            memset(row, 0, S * sizeof(float));
            continue;
        }
        float inv = 1.0f / exp_sum(row, S, mx, row);
        for (int64_t s = 0; s < S; s++) row[s] *= inv;
        if (vs)                                   /* each int8 value row's scale, folded into its weight */
            for (int64_t s = 0; s < S; s++) row[s] *= vs[s];
    }
    /* Weighted sum of the values: value_tiles for several query rows (its accumulators fit the registers, where
     * value_row's whole head per row does not: faster from 2 rows on, ad hoc); one pass of value_row for one. */
    float *out = a->out + b * a->sb + h * a->sh;
    if (G > 1) {
        float *acc = scores + G * S;                  /* the query's copy is no longer needed */
        value_tiles(a, b, h, scores, G, S, D, pairs, acc);
        for (int64_t g = 0; g < G; g++) store_head(out + g * a->sg, acc + g * D, pairs, D);
        return;
    }
    v8f acc[MAX_HEAD_DIM / 8] = {0};
    value_row(a, b, h, scores, S, acc, D, pairs);
    store_head(out, (const float *)acc, pairs, D);
}

/* Every (batch, head) task of `a`, shared among the threads of the enclosing parallel region (an orphaned
 * work-sharing loop: the caller opens the region). scratch: G · S floats per thread. */
static void attend_tasks(const attn_args *a, float *scratch) {
    float *scores = scratch + (int64_t)omp_get_thread_num() * a->G * (a->S + a->D);
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < a->B * a->H; bh++) {
        /* Constant bounds keep a head's sums in registers (64 for every PEGASUS-X size, 48 for the bundled demo), and a
         * constant key/value type keeps its branch out of the inner loops. */
#define ATTEND(D)                                                                                                   \
    switch (a->kv) {                                                                                                \
    case KV_F32: attend_one(a, bh, scores, D, KV_F32); break;                                                       \
    case KV_BF16: attend_one(a, bh, scores, D, KV_BF16); break;                                                     \
    default: attend_one(a, bh, scores, D, KV_I8); break;                                                            \
    }
        if (a->D == 64) {
            ATTEND(64)
        } else if (a->D == 48) {
            ATTEND(48)
        } else {
            ATTEND(a->D)
        }
#undef ATTEND
    }
}

/* Scratch floats px_attention needs: G · (S + D) per thread (attend_tasks). */
int64_t px_attention_work(int64_t G, int64_t S, int64_t D, int threads) { return threads * G * (S + D); }

/* q, out: fp32 (B, H, G, D) contiguous. work: px_attention_work floats. */
int px_attention(const float *q, const void *k, const void *v, int kv, const float *k_scale, const float *v_scale,
                 int64_t B, int64_t H, int64_t G, int64_t S, int64_t D, int64_t k_sb, int64_t k_sh, int64_t v_sb,
                 int64_t v_sh, const uint8_t *keep, int64_t keep_sb, float *out, float *work, int threads) {
    if (D > MAX_HEAD_DIM || D % 8 != 0 || kv < KV_F32 || kv > KV_I8 || (kv == KV_I8 && !(k_scale && v_scale)))
        return 1;
    attn_args a = {q, out, H * G * D, G * D, D, k, v, k_sb, k_sh, v_sb, v_sh, kv, keep, keep_sb, B, H, G, S, D,
                   k_scale, v_scale};
#pragma omp parallel num_threads(threads)
    attend_tasks(&a, work);
    return 0;
}

/* ------------------------------------------------------------------------------------- decoder layer
 * One pre-LN decoder layer for R rows and one new position (or several: layer_rows), in place on x (R, D):
 *   x += Wo · selfattn(Wq·LN1(x), cache)     (writes this position's Wk·LN1(x), Wv·LN1(x) into the cache first)
 *   x += Wco · crossattn(Wcq·LN2(x), cross keys/values of the row's input)
 *   x += W2 · act(W1 · LN3(x) + b1) + b2
 * Weights, biases, LayerNorm parameters and caches share one dtype (fp32 or bf16), except int8 weights (a scale
 * pointer set: see px_layer); activations stay fp32.
 * The R rows are B inputs × G rows each (beams): row r belongs to input r / G and reads that input's cross keys.
 */
enum { ACT_RELU, ACT_GELU, ACT_GELU_TANH, ACT_SILU, ACT_TANH };

typedef struct {
    const void *ln1_w, *ln1_b, *q, *k, *v, *o;
    const void *ln2_w, *ln2_b, *cq, *co;
    const void *ln3_w, *ln3_b, *fc1_w, *fc1_b, *fc2_w, *fc2_b;
    void *self_k, *self_v;            /* (R, H, max_len, hd), written at the step's position */
    const void *cross_k, *cross_v;    /* (B, H, S, hd) */
    const uint8_t *keep;              /* (B, S) or NULL */
    int64_t R, B, H, hd, ffn, max_len, S;
    int bf16, activation;
    float eps;
    /* int8 weights (quantize.py): each product's fp32 row scales, and its weight pointer above holds int8; NULL:
     * that weight is in the layer's dtype. */
    const float *q_s, *k_s, *v_s, *o_s, *cq_s, *co_s, *fc1_s, *fc2_s;
    int cross_kv;                     /* cross_k/cross_v: KV_F32, KV_BF16 or KV_I8 (quantize.py's kv_dtype) */
    const float *cross_ks, *cross_vs; /* KV_I8: their row scales (B, H, S); else NULL */
} px_layer;


static inline v8f load_param(const void *p, int bf16, int64_t i) {
    return bf16 ? load_bf16((const uint16_t *)p + i) : load_f32((const float *)p + i);
}

/* Two passes (mean, then the variance about it) like torch; eight lanes at a time. */
static void layer_norm(const float *x, int64_t rows, int64_t D, const void *w, const void *b, int bf16, float eps,
                       float *y) {
    int64_t D8 = D - D % 8;
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * D;
        v8f sv = {0}, qv = {0};
        for (int64_t d = 0; d < D8; d += 8) sv += load_f32(xr + d);
        float mean = hsum(sv);
        for (int64_t d = D8; d < D; d++) mean += xr[d];
        mean /= (float)D;
        for (int64_t d = 0; d < D8; d += 8) {
            v8f c = load_f32(xr + d) - mean;
            qv += c * c;
        }
        float var = hsum(qv);
        for (int64_t d = D8; d < D; d++) var += (xr[d] - mean) * (xr[d] - mean);
        float inv = 1.0f / sqrtf(var / (float)D + eps);
        for (int64_t d = 0; d < D8; d += 8) {
            v8f out = (load_f32(xr + d) - mean) * inv * load_param(w, bf16, d) + load_param(b, bf16, d);
            memcpy(y + r * D + d, &out, sizeof out);
        }
        for (int64_t d = D8; d < D; d++) y[r * D + d] = (xr[d] - mean) * inv * param(w, bf16, d) + param(b, bf16, d);
    }
}

/* x += delta (when given), then out = LayerNorm(x) and, for bf16 weights, its even/odd split into xs. */
static void add_norm(float *x, const float *delta, int rows, int64_t D, const void *w, const void *b, int bf16,
                     float eps, float *out, float *xs) {
    if (delta)
        for (int64_t i = 0; i < rows * D; i++) x[i] += delta[i];
    layer_norm(x, rows, D, w, b, bf16, eps, out);
    if (bf16) split_even_odd(out, rows, D, xs);
}

/* f[i] = act(f[i]) for i < n: the kind is chosen once per range, so each loop is a plain (for ReLU, vector) loop
 * rather than a call and a switch per element. */
static void activate(float *f, int64_t n, int kind) {
    switch (kind) {
    case ACT_RELU:
        for (int64_t i = 0; i < n; i++) f[i] = f[i] > 0.0f ? f[i] : 0.0f;
        break;
    case ACT_GELU:
        for (int64_t i = 0; i < n; i++) f[i] = 0.5f * f[i] * (1.0f + erff(f[i] * 0.70710678118654752f));
        break;
    case ACT_GELU_TANH:
        for (int64_t i = 0; i < n; i++) {
            float x = f[i];
            f[i] = 0.5f * x * (1.0f + tanhf(0.79788456080286536f * (x + 0.044715f * x * x * x)));
        }
        break;
    case ACT_SILU:
        for (int64_t i = 0; i < n; i++) f[i] = f[i] / (1.0f + expf(-f[i]));
        break;
    default:
        for (int64_t i = 0; i < n; i++) f[i] = tanhf(f[i]);
    }
}

/* ---------------------------------------------------------------------------- decoder layer, several rows
 * A decode step (T = 1: one row per input, or per beam of each input) and lookahead decoding's verification pass
 * (pegasus_x/lookahead.py): each of the layer's L->R cache rows feeds T consecutive new positions length …
 * length+T-1 (the current token and a draft) as T query rows, x is (R·T, D) with row r·T + i = cache row r,
 * position length+i. Every weight is streamed from memory once per pass for all R·T rows where the register tiles
 * win (tiles_win; else once per ROW_CHUNK rows, as int8 weights always are), every cross-attention key and value
 * once (attend_one); self-attention is causal inside the draft: query i of row r sees that row's keys 0 …
 * length+i, one attention call per draft position (the self-attention cache is small next to the weights and the
 * cross keys/values). */

/* linear_part for any number of rows, as register tiles: TILE_W weight rows × up to TILE_Q query rows of dot
 * products at once, so each weight vector loaded feeds several multiply-adds (the one-row kernels above are bound by
 * loads with several rows, not by memory). A tile of weight rows meets every chunk of query rows while it is in L1,
 * and the next tile is fetched in software meanwhile, spread over the chunks, so memory streams while the later
 * chunks compute. Chunks are balanced (9 rows: 3 + 3 + 3, not 4 + 4 + 1). */
#define TILE_W 4
#define TILE_Q 3

/* Prefetch the rows r ≡ c (mod nch) of the next tile at element offset i (next NULL: the share's last tile). */
#define PREFETCH_NEXT(next, in, i, c, nch)                                                                      \
    if (next)                                                                                                   \
        for (int r_ = (c); r_ < TILE_W; r_ += (nch)) __builtin_prefetch((next) + r_ * (in) + (i));

static inline void tile_f32(const float *w, const float *next, int64_t in, const float *x, const int qn, float *y,
                            int64_t out, int c, int nch) {
    v8f acc[TILE_W][TILE_Q];
    for (int j = 0; j < TILE_W; j++)
        for (int r = 0; r < qn; r++) acc[j][r] = (v8f){0};
    int64_t n = in - in % 16;
    for (int64_t i = 0; i < n; i += 16) {
        PREFETCH_NEXT(next, in, i, c, nch)
        for (int u = 0; u < 2; u++)
            for (int j = 0; j < TILE_W; j++) {
                v8f wv = load_f32(w + j * in + i + 8 * u);
                for (int r = 0; r < qn; r++) acc[j][r] += wv * load_f32(x + r * in + i + 8 * u);
            }
    }
    for (int j = 0; j < TILE_W; j++)
        for (int r = 0; r < qn; r++) {
            float sum = hsum(acc[j][r]);
            for (int64_t i = n; i < in; i++) sum += w[j * in + i] * x[r * in + i];
            y[r * out + j] = sum;
        }
}

/* The bf16 tile: weights widened as in dot_block_bf16 (even and odd elements), xs the matching split of x. */
static inline void tile_bf16(const uint16_t *w, const uint16_t *next, int64_t in, const float *x, const float *xs,
                             const int qn, float *y, int64_t out, int c, int nch) {
    v8f acc[TILE_W][TILE_Q];
    for (int j = 0; j < TILE_W; j++)
        for (int r = 0; r < qn; r++) acc[j][r] = (v8f){0};
    int64_t n = in - in % 16, half = n / 2;
    for (int64_t i = 0; i < n; i += 16) {
        PREFETCH_NEXT(next, in, i, c, nch)
        v8f xe[TILE_Q], xo[TILE_Q];
        for (int r = 0; r < qn; r++) {
            xe[r] = load_f32(xs + r * in + i / 2);
            xo[r] = load_f32(xs + r * in + i / 2 + half);
        }
        for (int j = 0; j < TILE_W; j++) {
            v8i pair = *(const v8i_u *)(w + j * in + i);
            v8i lo = pair << 16, hi = pair & (int32_t)0xffff0000;
            v8f we, wo;
            memcpy(&we, &lo, sizeof we);
            memcpy(&wo, &hi, sizeof wo);
            for (int r = 0; r < qn; r++) acc[j][r] += we * xe[r];
            for (int r = 0; r < qn; r++) acc[j][r] += wo * xo[r];
        }
    }
    for (int j = 0; j < TILE_W; j++)
        for (int r = 0; r < qn; r++) {
            float sum = hsum(acc[j][r]);
            for (int64_t i = n; i < in; i++) sum += bf16_to_f32(w[j * in + i]) * x[r * in + i];
            y[r * out + j] = sum;
        }
}

static void linear_rows(const void *W, int is_bf16, int64_t out, int64_t in, const float *x, const float *xs,
                        int rows, const void *bias, float *y, int t, int n) {
    if (rows == 1) {
        linear_part(W, is_bf16, out, in, x, xs, rows, bias, y, t, n);
        return;
    }
    int64_t o0, o1;
    share(out, t, n, &o0, &o1);
    int nch = (rows + TILE_Q - 1) / TILE_Q;
    int64_t whole = o0 + (o1 - o0) / TILE_W * TILE_W;
    for (int64_t o = o0; o < whole; o += TILE_W) {
        int last = o + TILE_W >= whole;
        for (int c = 0, r0 = 0; c < nch; c++) {
            int qn = rows / nch + (c < rows % nch);
            const float *xc = x + r0 * in, *xsc = xs ? xs + r0 * in : NULL;
            float *yc = y + r0 * out + o;
            if (is_bf16) {
                const uint16_t *w = (const uint16_t *)W + o * in, *next = last ? NULL : w + TILE_W * in;
                switch (qn) {                  /* the row count as a constant: the sums live in registers */
                case 1: tile_bf16(w, next, in, xc, xsc, 1, yc, out, c, nch); break;
                case 2: tile_bf16(w, next, in, xc, xsc, 2, yc, out, c, nch); break;
                default: tile_bf16(w, next, in, xc, xsc, 3, yc, out, c, nch); break;
                }
            } else {
                const float *w = (const float *)W + o * in, *next = last ? NULL : w + TILE_W * in;
                switch (qn) {
                case 1: tile_f32(w, next, in, xc, 1, yc, out, c, nch); break;
                case 2: tile_f32(w, next, in, xc, 2, yc, out, c, nch); break;
                default: tile_f32(w, next, in, xc, 3, yc, out, c, nch); break;
                }
            }
            r0 += qn;
        }
    }
    linear_range(W, is_bf16, whole, o1, out, in, x, xs, rows, y);     /* the share's last rows, short of a tile */
    add_bias(bias, is_bf16, o0, o1, rows, y, out);
}

/* px_linear for up to MAX_DRAFT_ROWS rows, each weight streamed once (lookahead's LM head over 1+K positions). */
int px_linear_rows(const void *W, int is_bf16, int64_t out, int64_t in, const float *x, int rows, const void *bias,
                   float *y, float *work, int threads) {
    if (rows < 1 || rows > MAX_DRAFT_ROWS) return 1;
    if (is_bf16)
        split_even_odd(x, rows, in, work);
#pragma omp parallel num_threads(threads)
    linear_rows(W, is_bf16, out, in, x, is_bf16 ? work : NULL, rows, bias, y, omp_get_thread_num(),
                omp_get_num_threads());
    return 0;
}

/* One layer, run by every thread (t of n) of the enclosing parallel region. The threads go from one weight straight
 * to the next (q, k and v without a pause) and meet only where a result is needed whole; the small serial steps
 * (LayerNorm, residual adds, cache writes) run on one thread ("single", which ends in a barrier, as does the
 * layer). */
static void layer_rows(const px_layer *L, int64_t length, int64_t T, float *x, float *work, int t, int n) {
    int64_t R = L->R, H = L->H, hd = L->hd, D = H * hd, F = L->ffn, N = L->R * T, wide = F > D ? F : D;
    int bf16 = L->bf16, rows = (int)N, tiles = tiles_win(rows, bf16);
    float *h = work, *q = h + N * D, *k = q + N * D, *v = k + N * D, *a = v + N * D, *f = a + N * D,
          *xs = f + N * F, *fs = xs + N * wide, *scratch = fs + N * wide;
    attn_args cross = {q, a, (N / L->B) * D, hd, D, L->cross_k, L->cross_v, H * L->S * hd, L->S * hd, H * L->S * hd,
                       L->S * hd, L->cross_kv, L->keep, L->S, L->B, H, N / L->B, L->S, hd, L->cross_ks,
                       L->cross_vs};

#pragma omp single
    add_norm(x, NULL, rows, D, L->ln1_w, L->ln1_b, bf16, L->eps, h, xs);
    linear_any(L->q, L->q_s, bf16, D, D, h, xs, rows, NULL, q, t, n, tiles);
    linear_any(L->k, L->k_s, bf16, D, D, h, xs, rows, NULL, k, t, n, tiles);
    linear_any(L->v, L->v_s, bf16, D, D, h, xs, rows, NULL, v, t, n, tiles);
#pragma omp barrier
#pragma omp single
    for (int64_t r = 0; r < R; r++)
        for (int64_t i = 0; i < T; i++)
            for (int64_t hh = 0; hh < H; hh++) {
                int64_t at = ((r * H + hh) * L->max_len + length + i) * hd;
                const float *kk = k + (r * T + i) * D + hh * hd, *vv = v + (r * T + i) * D + hh * hd;
                for (int64_t d = 0; d < hd; d++) {
                    if (bf16) {
                        ((uint16_t *)L->self_k)[at + d] = f32_to_bf16(kk[d]);
                        ((uint16_t *)L->self_v)[at + d] = f32_to_bf16(vv[d]);
                    } else {
                        ((float *)L->self_k)[at + d] = kk[d];
                        ((float *)L->self_v)[at + d] = vv[d];
                    }
                }
            }
    for (int64_t i = 0; i < T; i++) {        /* draft position i: every row's query i over its first length+i+1 keys */
        attn_args self = {q + i * D, a + i * D, T * D, hd, D, L->self_k, L->self_v, H * L->max_len * hd,
                          L->max_len * hd, H * L->max_len * hd, L->max_len * hd, bf16, NULL, 0, R, H, 1,
                          length + i + 1, hd, NULL, NULL};
        attend_tasks(&self, scratch);        /* ends in a barrier */
    }
#pragma omp single
    if (bf16) split_even_odd(a, rows, D, xs);
    linear_any(L->o, L->o_s, bf16, D, D, a, xs, rows, NULL, h, t, n, tiles);
#pragma omp barrier

#pragma omp single
    add_norm(x, h, rows, D, L->ln2_w, L->ln2_b, bf16, L->eps, h, xs);
    linear_any(L->cq, L->cq_s, bf16, D, D, h, xs, rows, NULL, q, t, n, tiles);
#pragma omp barrier
    attend_tasks(&cross, scratch);           /* ends in a barrier */
#pragma omp single
    if (bf16) split_even_odd(a, rows, D, xs);
    linear_any(L->co, L->co_s, bf16, D, D, a, xs, rows, NULL, h, t, n, tiles);
#pragma omp barrier

#pragma omp single
    add_norm(x, h, rows, D, L->ln3_w, L->ln3_b, bf16, L->eps, h, xs);
    linear_any(L->fc1_w, L->fc1_s, bf16, F, D, h, xs, rows, L->fc1_b, f, t, n, tiles);
    {
        int64_t o0, o1;
        share(F, t, n, &o0, &o1);
        for (int64_t r = 0; r < N; r++)
            activate(f + r * F + o0, o1 - o0, L->activation);
        if (bf16) split_range(f, rows, F, o0, o1, fs);
    }
#pragma omp barrier
    linear_any(L->fc2_w, L->fc2_s, bf16, D, F, f, fs, rows, L->fc2_b, h, t, n, tiles);
#pragma omp barrier
#pragma omp single
    for (int64_t i = 0; i < N * D; i++) x[i] += h[i];
}

/* Scratch floats px_decoder_rows needs. */
int64_t px_decoder_rows_work(int64_t R, int64_t T, int64_t D, int64_t ffn, int64_t B, int64_t S, int64_t length,
                             int threads) {
    int64_t N = R * T, G = N / B, keys = S > length + T ? S : length + T, wide = ffn > D ? ffn : D;
    return 5 * N * D + N * ffn + 2 * N * wide + threads * G * (keys + D);
}

/* Every layer for T new positions length … length+T-1 of each cache row (layer_rows), in place on x (R·T, D) fp32.
 * Returns 1 (doing nothing) when the shapes are outside what the kernels take. */
int px_decoder_rows(const px_layer *layers, int count, int64_t length, int64_t T, float *x, float *work,
                    int threads) {
    for (int i = 0; i < count; i++) {
        const px_layer *L = layers + i;
        if (T < 1 || L->R < 1 || L->R * T > MAX_DRAFT_ROWS || L->R % L->B != 0 || L->hd > MAX_HEAD_DIM
                || L->hd % 8 != 0 || length + T > L->max_len || L->R != layers[0].R
                || L->H * L->hd != layers[0].H * layers[0].hd)
            return 1;
    }
#pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num(), n = omp_get_num_threads();
        for (int i = 0; i < count; i++) layer_rows(layers + i, length, T, x, work, t, n);
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------ beam search
 * The vocabulary-wide work of a beam-search step, between the LM head and the next step: log-softmax of every
 * row's logits, then the best k of each input's K·V candidate scores. Both read a few rows of V floats that are
 * still in cache, so a vector pass over them costs little next to the step; torch's CPU reductions and topk on
 * these shapes cost a sizeable share of a step (benchmarks/generate.py, beam 4). Logits that are not all finite,
 * and NaN among candidate scores, are refused (return 1): kernels.py then runs torch, whose rules for them stay
 * the reference. */

/* Whether any lane of a comparison's result is set. */
static inline int any_lane(v8i m) {
#ifdef __AVX2__
    __m256 f;
    memcpy(&f, &m, sizeof f);
    return _mm256_movemask_ps(f) != 0;
#else
    int any = 0;
    for (int j = 0; j < 8; j++) any |= m[j];
    return any != 0;
#endif
}

/* y = x - log(sum(exp(x))) for one row, computed as torch does: m = max(x), (x - m) - log(sum(exp(x - m))).
 * Returns 1 (y not written) if a value is not finite. */
static int log_softmax_row(const float *x, float *y, int64_t V) {
    int finite;
    float m = max_of(x, V, &finite);
    if (!finite) return 1;
    float log_sum = logf(exp_sum(x, V, m, NULL));
    for (int64_t i = 0; i < V; i++) y[i] = (x[i] - m) - log_sum;
    return 0;
}

/* x, y: fp32 (rows, V). Returns 1 (y undefined) if a value of x is not finite. */
int px_log_softmax(const float *x, float *y, int64_t rows, int64_t V, int threads) {
    int bad = 0;
#pragma omp parallel for num_threads(threads) reduction(| : bad) schedule(static)
    for (int64_t r = 0; r < rows; r++) bad |= log_softmax_row(x + r * V, y + r * V, V);
    return bad;
}

/* Insert (v, i) into the k best so far, sorted best first; an equal value already there stays ahead of it (callers
 * offer equal values in increasing index order, so ties come out lowest index first). */
static inline void offer(float *val, int64_t *idx, int k, float v, int64_t i) {
    int p = k - 1;
    while (p > 0 && val[p - 1] < v) {
        val[p] = val[p - 1];
        idx[p] = idx[p - 1];
        p--;
    }
    val[p] = v;
    idx[p] = i;
}

/* The k best of x[i0 .. i1) (k <= i1 - i0) into val/idx, best first. Returns 1 if a value is NaN (±inf are
 * ordered as usual: the logits processors set -inf). */
static int topk_range(const float *x, int64_t i0, int64_t i1, int k, float *val, int64_t *idx) {
    for (int j = 0; j < k; j++) {
        if (isnan(x[i0 + j])) return 1;
        val[j] = -INFINITY;
        offer(val, idx, j + 1, x[i0 + j], i0 + j);
    }
    int64_t i = i0 + k;
    v8i bad = (v8i){0};
    for (; i + 8 <= i1; i += 8) {             /* most vectors hold nothing above the k-th best: one compare each */
        v8f v = load_f32(x + i);
        bad |= v != v;
        if (any_lane(v > val[k - 1]))
            for (int j = 0; j < 8; j++)
                if (v[j] > val[k - 1]) offer(val, idx, k, v[j], i + j);
    }
    int tail_bad = 0;
    for (; i < i1; i++) {
        tail_bad |= isnan(x[i]);
        if (x[i] > val[k - 1]) offer(val, idx, k, x[i], i);
    }
    return tail_bad || any_lane(bad);
}

/* Scratch floats px_topk needs: a k-best list per row and thread, k int64 indices (2k floats) then k values. */
int64_t px_topk_work(int64_t rows, int k, int threads) { return rows * threads * k * 4; }

/* The k largest of each row of x (rows, n), best first, ties lowest index first, into values (rows, k) and
 * indices (rows, k). Each row is split among the threads (one input's candidates are one long row), their lists
 * merged in index order. Returns 1 (outputs undefined) if k is out of range or a value is NaN. */
int px_topk(const float *x, int64_t rows, int64_t n, int k, float *values, int64_t *indices, float *work,
            int threads) {
    if (k < 1 || k > MAX_TOPK || k > n || rows < 1) return 1;
    int bad = 0;
#pragma omp parallel num_threads(threads) reduction(| : bad)
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        int64_t per = (n + nt - 1) / nt, i0 = t * per, i1 = i0 + per < n ? i0 + per : n;
        for (int64_t r = 0; r < rows; r++) {
            int64_t *idx = (int64_t *)(work + (r * nt + t) * k * 4);
            float *val = (float *)(idx + k);
            if (i1 - i0 >= k)
                bad |= topk_range(x + r * n, i0, i1, k, val, idx);
            else                              /* too short a share: its elements join at the merge */
                for (int j = 0; j < k; j++) {
                    val[j] = NAN;
                    idx[j] = -1;
                }
        }
#pragma omp barrier
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            float *best = values + r * k;
            int64_t *at = indices + r * k, filled = 0;
            for (int p = 0; p < nt; p++) {    /* the threads' lists in index order, then any short share's elements */
                const int64_t *idx = (const int64_t *)(work + (r * nt + p) * k * 4);
                const float *val = (const float *)(idx + k);
                int64_t s0 = p * per, s1 = s0 + per < n ? s0 + per : n;
                if (idx[0] >= 0) {
                    for (int j = 0; j < k; j++)
                        if (filled < k) offer(best, at, (int)++filled, val[j], idx[j]);
                        else if (val[j] > best[k - 1]) offer(best, at, k, val[j], idx[j]);
                        else break;                   /* the rest of this list is no better */
                } else {
                    for (int64_t i = s0; i < s1; i++) {
                        float v = x[r * n + i];
                        if (isnan(v)) bad = 1;
                        else if (filled < k) offer(best, at, (int)++filled, v, i);
                        else if (v > best[k - 1]) offer(best, at, k, v, i);
                    }
                }
            }
        }
    }
    return bad;
}

/* ------------------------------------------------------------------------------------------------ GEMM
 * Products of many rows (the encoder's linears, a prefill's cross keys/values): y = x Wᵀ + bias in fp32. Unlike a
 * decode step these are bound by multiply-adds, not memory, so the layout is a register tile: GEMM_MR rows of x ×
 * GEMM_NR outputs in 12 accumulators, fed per input element by two loads of packed weights and GEMM_MR broadcasts
 * of x (the broadcast form needs the weight transposed: each thread packs its outputs' weights, a block of inputs ×
 * GEMM_NR outputs per panel, k-major, as it goes). Below GEMM_DEEP_ROWS rows a block is GEMM_KC inputs: a panel
 * stays in L1 while GEMM_MC rows meet it, those rows' inputs in L2. From GEMM_DEEP_ROWS rows it is up to
 * GEMM_KC_DEEP inputs (every encoder product in one block): each tile keeps its sums in registers that much longer
 * and stores them once, the panel read from L2. x is read in place. Each output sums its inputs in order, block by
 * block. */
#define GEMM_MR 6
#define GEMM_NR 16
#define GEMM_KC 384
#define GEMM_KC_DEEP 3072
#define GEMM_DEEP_ROWS 512
#define GEMM_MC 96
#define GEMM_PANEL 1572864    /* floats of packed weights per thread at most: KC × the outputs packed at once */
#define GEMM_MIN_GROUPS 4     /* NR-output groups per thread below which threads also split the rows */

#define BROADCAST(s) ((v8f){s, s, s, s, s, s, s, s})

static const float gemm_zeros[GEMM_KC_DEEP];              /* what the rows a short tile lacks read */

/* n outputs in whole groups of GEMM_NR. */
static inline int64_t gemm_groups(int64_t n) { return (n + GEMM_NR - 1) / GEMM_NR; }

/* y[r][0..nr) (+)= Σ_k a[r][k] · panel[k][0..nr) for r < mr; first: y = that + bias instead. */
static inline void gemm_tile(int64_t kc, const float *const a[GEMM_MR], const float *panel, float *y, int64_t ldy,
                             int mr, int nr, int first, const float *bias) {
    v8f acc[GEMM_MR][2];
    for (int r = 0; r < GEMM_MR; r++) acc[r][0] = acc[r][1] = (v8f){0};
    for (int64_t k = 0; k < kc; k++, panel += GEMM_NR) {
        v8f w0 = load_f32(panel), w1 = load_f32(panel + 8);
        for (int r = 0; r < GEMM_MR; r++) {
            v8f xr = BROADCAST(a[r][k]);
            acc[r][0] += xr * w0;
            acc[r][1] += xr * w1;
        }
    }
    if (mr == GEMM_MR && nr == GEMM_NR) {
        v8f b0 = {0}, b1 = {0};
        if (first && bias) b0 = load_f32(bias), b1 = load_f32(bias + 8);
        for (int r = 0; r < GEMM_MR; r++) {
            v8f *out = (v8f *)(y + r * ldy);
            if (first) out[0] = acc[r][0] + b0, out[1] = acc[r][1] + b1;
            else out[0] += acc[r][0], out[1] += acc[r][1];
        }
        return;
    }
    for (int r = 0; r < mr; r++) {                        /* an edge tile: the rows and outputs that exist */
        float sums[GEMM_NR];
        memcpy(sums, acc[r], sizeof sums);
        for (int j = 0; j < nr; j++)
            y[r * ldy + j] = first ? sums[j] + (bias ? bias[j] : 0.0f) : y[r * ldy + j] + sums[j];
    }
}

/* Inputs per block for a product of `rows` rows (benchmarks/encoder.py: the deep blocks win from GEMM_DEEP_ROWS rows,
 * the short ones, whose panels stay in L1, below). */
static inline int64_t gemm_kc(int64_t rows, int64_t in) {
    int64_t kc = rows < GEMM_DEEP_ROWS ? GEMM_KC : GEMM_KC_DEEP;
    return in < kc ? in : kc;
}

/* Outputs packed at once for blocks of kc inputs, in whole groups: what bounds each thread's panel buffer. */
static inline int64_t gemm_nc(int64_t kc) {
    int64_t nc = GEMM_PANEL / kc / GEMM_NR * GEMM_NR;
    return nc > GEMM_NR ? nc : GEMM_NR;
}

/* How n threads split the work: tn over the output groups times tm over the rows. By rows alone where each thread
 * gets GEMM_MC rows or more and the weight is small (GEMM_SMALL_WEIGHT floats at most): a thread then reads the rows
 * that the step before (torch's row-parallel operations, or this product's own split) most likely wrote on its own
 * core, and writes whole rows for the step after, for the price of packing the whole (small) weight. Reading the
 * other core's rows made the bundled demo's products a third slower (benchmarks/summarize.py, batches of 8); for a
 * large weight the second packing costs more than that (benchmarks/encoder.py). Else the fewest row splits that
 * leave each thread GEMM_MIN_GROUPS output groups (a thread past tn·tm idles). */
#define GEMM_SMALL_WEIGHT 262144
static void gemm_split(int64_t rows, int64_t in, int64_t out, int n, int *tn, int *tm) {
    if (rows >= (int64_t)n * GEMM_MC && in * out <= GEMM_SMALL_WEIGHT) {
        *tm = n;
        *tn = 1;
        return;
    }
    for (*tm = 1; *tm < n; (*tm)++)
        if (n % *tm == 0 && gemm_groups(out) >= (int64_t)GEMM_MIN_GROUPS * (n / *tm)) break;
    *tn = n / *tm;
}

/* Thread t's panel buffer, in floats. */
static int64_t gemm_panel_floats(int64_t rows, int64_t in, int64_t out, int n) {
    int tn, tm;
    int64_t groups = gemm_groups(out), kc = gemm_kc(rows, in), nc = gemm_nc(kc);
    gemm_split(rows, in, out, n, &tn, &tm);
    int64_t per = (groups + tn - 1) / tn * GEMM_NR;
    return kc * (per < nc ? per : nc);
}

/* Floats of work px_gemm needs: every thread's panel buffer, for however many of the threads OpenMP grants. */
int64_t px_gemm_work(int64_t rows, int64_t in, int64_t out, int threads) {
    int64_t most = 0;
    for (int n = 1; n <= threads; n++)
        if (n * gemm_panel_floats(rows, in, out, n) > most) most = n * gemm_panel_floats(rows, in, out, n);
    return most;
}

/* Pack W's outputs [o0, o1) × inputs [k0, k0 + kc) as panels of GEMM_NR outputs, k-major (zero past `out`). */
static void gemm_pack(const float *W, int64_t out, int64_t in, int64_t o0, int64_t o1, int64_t k0, int64_t kc,
                      float *panels) {
    for (int64_t g = o0; g < o1; g += GEMM_NR, panels += kc * GEMM_NR)
        for (int j = 0; j < GEMM_NR; j++) {
            const float *src = W + (g + j) * in + k0;
            if (g + j < out)
                for (int64_t k = 0; k < kc; k++) panels[k * GEMM_NR + j] = src[k];
            else
                for (int64_t k = 0; k < kc; k++) panels[k * GEMM_NR + j] = 0.0f;
        }
}

static void gemm_part(const float *x, int64_t rows, int64_t in, const float *W, int64_t out, const float *bias,
                      float *y, float *panels, int t, int n) {
    int tn, tm;
    int64_t groups = gemm_groups(out);
    gemm_split(rows, in, out, n, &tn, &tm);
    if (t >= tn * tm) return;
    int64_t g0 = groups * (t % tn) / tn, g1 = groups * (t % tn + 1) / tn;
    int64_t tiles = (rows + GEMM_MR - 1) / GEMM_MR;
    int64_t r0 = tiles * (t / tn) / tm * GEMM_MR, r1 = tiles * (t / tn + 1) / tm * GEMM_MR;
    if (r1 > rows) r1 = rows;
    int64_t KC = gemm_kc(rows, in), NC = gemm_nc(KC);
    for (int64_t c0 = g0 * GEMM_NR; c0 < g1 * GEMM_NR; c0 += NC) {
        int64_t c1 = c0 + NC < g1 * GEMM_NR ? c0 + NC : g1 * GEMM_NR;
        for (int64_t k0 = 0; k0 < in; k0 += KC) {
            int64_t kc = in - k0 < KC ? in - k0 : KC;
            gemm_pack(W, out, in, c0, c1, k0, kc, panels);
            for (int64_t m0 = r0; m0 < r1; m0 += GEMM_MC) {
                int64_t m1 = m0 + GEMM_MC < r1 ? m0 + GEMM_MC : r1;
                for (int64_t o = c0; o < c1; o += GEMM_NR) {
                    const float *panel = panels + (o - c0) * kc;
                    int nr = out - o < GEMM_NR ? (int)(out - o) : GEMM_NR;
                    for (int64_t m = m0; m < m1; m += GEMM_MR) {
                        int mr = m1 - m < GEMM_MR ? (int)(m1 - m) : GEMM_MR;
                        const float *a[GEMM_MR];
                        for (int r = 0; r < GEMM_MR; r++) a[r] = r < mr ? x + (m + r) * in + k0 : gemm_zeros;
                        gemm_tile(kc, a, panel, y + m * out + o, out, mr, nr, k0 == 0, bias ? bias + o : NULL);
                    }
                }
            }
        }
    }
}

/* 1 where px_gemm is the GEMM to use: its tile fills the 16 vector registers of AVX2 with FMA; with AVX-512 (wider
 * registers) or another architecture torch's GEMM is the one measured (benchmarks/encoder.py). */
int px_gemm_preferred(void) {
#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
    return 1;
#else
    return 0;
#endif
}

/* y (rows, out) = x (rows, in) Wᵀ (W: out × in, row-major) + bias (or none), all fp32; work: px_gemm_work floats. */
int px_gemm(const float *x, int64_t rows, int64_t in, const float *W, int64_t out, const float *bias, float *y,
            float *work, int threads) {
    if (rows < 1 || in < 1 || out < 1 || threads < 1) return 1;
#pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num(), n = omp_get_num_threads();
        gemm_part(x, rows, in, W, out, bias, y, work + t * gemm_panel_floats(rows, in, out, n), t, n);
    }
    return 0;
}

/* The encoder's attention on the same tiles. Each task (a block or an input's globals, one head) has Lq queries and,
 * in one softmax, G global keys then Lk keys of its own. q, k, v are rows of D floats (the projections), addressed
 * by row index: task m's queries are rows queries[m][·], its globals G rows from globals[m], its own keys rows
 * keys[m][·], counted where keep[m][·]; query i's output goes to row out_rows[m][i] of out (none where -1). A
 * block's queries are its keys (the padded layout's positions, or a packed batch's real tokens); the globals'
 * keys are every token of their input. The keys go by in chunks of up to ATT_CHUNK: a thread packs a chunk's
 * keys transposed (panels of GEMM_NR keys, d-major) and its values (panels of GEMM_NR head dims, key-major), so
 * they stay in L2 while every query meets them, and keeps each query's running maximum, sum and weighted values
 * (rescaled when the maximum grows: one softmax over all chunks). A masked key scores the most negative float, as
 * the torch reference fills it. */
#define ATT_CHUNK 768

static int64_t attention_floats(int64_t G, int64_t Lq, int64_t Lk, int64_t hd) {
    int64_t dims = gemm_groups(hd) * GEMM_NR, S = gemm_groups(G + Lk) * GEMM_NR, chunk = S < ATT_CHUNK ? S : ATT_CHUNK;
    return chunk * (hd + dims + 1 + GEMM_MR) + Lq * (dims + 2);
}

int64_t px_encoder_attention_work(int64_t G, int64_t Lq, int64_t Lk, int64_t hd, int threads) {
    return threads * attention_floats(G, Lq, Lk, hd);
}

/* One task: q, k, v, out at the head's first dim; g the first global row; the task's rows and flags. */
static void attention_task(const float *q, const float *k, const float *v, int64_t D, int64_t hd, int64_t G,
                           int64_t g, int64_t Lq, const int64_t *queries, int64_t Lk, const int64_t *keys,
                           const uint8_t *keep, const int64_t *out_rows, float *out, float *work) {
    const int64_t S = G + Lk, dims = gemm_groups(hd) * GEMM_NR;
    const int64_t chunk = gemm_groups(S) * GEMM_NR < ATT_CHUNK ? gemm_groups(S) * GEMM_NR : ATT_CHUNK;
    float *kp = work, *vp = kp + chunk * hd, *bias = vp + chunk * dims, *scores = bias + chunk;
    float *acc = scores + GEMM_MR * chunk, *most = acc + Lq * dims, *total = most + Lq;
    memset(acc, 0, sizeof(float) * Lq * dims);
    for (int64_t i = 0; i < Lq; i++) most[i] = -INFINITY, total[i] = 0.0f;
    const float scale = 1.0f / sqrtf((float)hd);
    for (int64_t c0 = 0; c0 < S; c0 += chunk) {
        const int64_t n = S - c0 < chunk ? S - c0 : chunk, width = gemm_groups(n) * GEMM_NR;
#define KEY_ROW(j) ((j) < G ? g + (j) : keys[(j) - G])
        for (int64_t j0 = 0; j0 < width; j0 += GEMM_NR) {     /* a panel: GEMM_NR key rows read side by side */
            const float *row[GEMM_NR];
            for (int e = 0; e < GEMM_NR; e++) {
                int64_t j = j0 + e, key = c0 + j;
                bias[j] = j < n && (key < G || keep[key - G]) ? 0.0f : -FLT_MAX;
                row[e] = j < n ? k + KEY_ROW(key) * D : gemm_zeros;
            }
            float *panel = kp + j0 * hd;
            for (int64_t d = 0; d < hd; d++)
                for (int e = 0; e < GEMM_NR; e++) panel[d * GEMM_NR + e] = row[e][d];
        }
        for (int64_t d0 = 0; d0 < dims; d0 += GEMM_NR)
            for (int64_t j = 0; j < n; j++) {
                const float *row = v + KEY_ROW(c0 + j) * D;
                for (int e = 0; e < GEMM_NR; e++) vp[d0 * n + j * GEMM_NR + e] = d0 + e < hd ? row[d0 + e] : 0.0f;
            }
#undef KEY_ROW
        for (int64_t m = 0; m < Lq; m += GEMM_MR) {
            int mr = Lq - m < GEMM_MR ? (int)(Lq - m) : GEMM_MR;
            const float *a[GEMM_MR];
            for (int r = 0; r < GEMM_MR; r++) a[r] = r < mr ? q + queries[m + r] * D : gemm_zeros;
            for (int64_t j0 = 0; j0 < width; j0 += GEMM_NR)
                gemm_tile(hd, a, kp + j0 * hd, scores + j0, width, mr, GEMM_NR, 1, NULL);
            for (int r = 0; r < mr; r++) {                /* this chunk's exponentials, the running sums rescaled */
                float *row = scores + r * width, *sums = acc + (m + r) * dims;
                for (int64_t j = 0; j < width; j += 8) {
                    v8f x = load_f32(row + j) * scale + load_f32(bias + j);
                    memcpy(row + j, &x, sizeof x);
                }
                float top = max_of(row, n, NULL), before = most[m + r];
                if (top > before) {
                    float shrink = expf(before - top);    /* 0 for the first chunk */
                    total[m + r] *= shrink;
                    for (int64_t d = 0; d < hd; d++) sums[d] *= shrink;
                    most[m + r] = before = top;
                }
                total[m + r] += exp_sum(row, n, before, row);
                a[r] = row;
            }
            for (int64_t d0 = 0; d0 < dims; d0 += GEMM_NR)
                for (int64_t k0 = 0; k0 < n; k0 += GEMM_KC) {
                    int64_t kc = n - k0 < GEMM_KC ? n - k0 : GEMM_KC;
                    const float *p[GEMM_MR];
                    for (int r = 0; r < GEMM_MR; r++) p[r] = r < mr ? a[r] + k0 : gemm_zeros;
                    gemm_tile(kc, p, vp + d0 * n + k0 * GEMM_NR, acc + m * dims + d0, dims, mr, GEMM_NR, 0, NULL);
                }
        }
    }
    for (int64_t i = 0; i < Lq; i++)
        if (out_rows[i] >= 0)
            for (int64_t d = 0; d < hd; d++) out[out_rows[i] * D + d] = acc[i * dims + d] / total[i];
}

/* Every (task, head) of the attention above; H heads of hd dims, D = H·hd floats per row. */
int px_encoder_attention(const float *q, const float *k, const float *v, int64_t H, int64_t hd, int64_t M, int64_t G,
                         int64_t Lq, int64_t Lk, const int64_t *globals, const int64_t *queries, const int64_t *keys,
                         const uint8_t *keep, const int64_t *out_rows, float *out, float *work, int threads) {
    if (H < 1 || hd < 1 || hd > MAX_HEAD_DIM || M < 1 || G < 0 || Lq < 1 || Lk < 0 || G + Lk < 1) return 1;
    const int64_t D = H * hd, tasks = M * H;
#pragma omp parallel num_threads(threads)
    {
        float *mine = work + omp_get_thread_num() * attention_floats(G, Lq, Lk, hd);
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tasks; t++) {
            int64_t m = t / H, h = t % H;
            attention_task(q + h * hd, k + h * hd, v + h * hd, D, hd, G, globals[m], Lq, queries + m * Lq, Lk,
                           keys + m * Lk, keep + m * Lk, out_rows + m * Lq, out + h * hd, mine);
        }
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------------ ABI
 * What kernels.py mirrors by hand, exported by name so it can check its copy at load: the ABI version, the limits,
 * the activation enum and px_layer's size and every field's offset and size. */
typedef struct {
    const char *name;
    int64_t value;
} px_constant;

#define FIELD(f) {"px_layer." #f, offsetof(px_layer, f)}, {"px_layer." #f ".size", sizeof(((px_layer *)0)->f)}

static const px_constant constants[] = {
    {"abi", ABI_VERSION}, {"max_rows", MAX_ROWS}, {"max_draft_rows", MAX_DRAFT_ROWS}, {"max_head_dim", MAX_HEAD_DIM},
    {"max_topk", MAX_TOPK},
    {"act.relu", ACT_RELU}, {"act.gelu", ACT_GELU}, {"act.gelu_tanh", ACT_GELU_TANH}, {"act.silu", ACT_SILU},
    {"act.tanh", ACT_TANH}, {"kv.f32", KV_F32}, {"kv.bf16", KV_BF16}, {"kv.int8", KV_I8},
    {"px_layer", sizeof(px_layer)},
    FIELD(ln1_w), FIELD(ln1_b), FIELD(q), FIELD(k), FIELD(v), FIELD(o), FIELD(ln2_w), FIELD(ln2_b), FIELD(cq),
    FIELD(co), FIELD(ln3_w), FIELD(ln3_b), FIELD(fc1_w), FIELD(fc1_b), FIELD(fc2_w), FIELD(fc2_b), FIELD(self_k),
    FIELD(self_v), FIELD(cross_k), FIELD(cross_v), FIELD(keep), FIELD(R), FIELD(B), FIELD(H), FIELD(hd), FIELD(ffn),
    FIELD(max_len), FIELD(S), FIELD(bf16), FIELD(activation), FIELD(eps), FIELD(q_s), FIELD(k_s), FIELD(v_s),
    FIELD(o_s), FIELD(cq_s), FIELD(co_s), FIELD(fc1_s), FIELD(fc2_s), FIELD(cross_kv), FIELD(cross_ks), FIELD(cross_vs),
};

/* The table above; its length in *count. */
const px_constant *px_constants(int *count) {
    *count = (int)(sizeof constants / sizeof constants[0]);
    return constants;
}
