/* portaserve cpu_native: small-batch kernels for the `cpu` device, called through ctypes.
 *
 * 1. GGUF linears on the packed struct-of-arrays layout of portaserve.quant.gguf_formats, read
 *    once per step in their packed form and never written out dense. Q4_0 / Q4_1 / Q8_0: each
 *    32-weight block's codes are widened to float32 in registers and multiplied into the
 *    float32 activations with FMA, the scale applied once per block. Q4_K / Q5_K / Q6_K: each
 *    256-weight super-block is expanded to float32 in an L1 buffer (the reference's values)
 *    and dotted with the activations. int8 (a scale per row), int4 (interleaved nibbles,
 *    a scale and zero point per group) and fp8 e4m3 (a scale per row; each byte read as an
 *    fp16, see fp8_halves) reuse the 32-block path. Rows are split over OpenMP threads; up to
 *    eight tokens share each expanded block.
 * 2. Paged decode attention (one query token per request) straight over the block table of a
 *    float32 KV cache in the `blocks_nhd` layout [2, num_blocks, block_size, Hk, D]: no gather,
 *    no padding, the query heads of one KV head share each key/value load (GQA).
 *
 * Built at first use by portaserve/devices/cpu_native/__init__.py with the host compiler
 * (-O3 -march=native -fopenmp). Every function has a portable scalar path; the AVX2/FMA/F16C
 * paths are chosen at compile time. OpenMP is libgomp, the runtime torch itself loads, so the
 * two share one thread pool.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <omp.h>

#define ALWAYS_INLINE_EARLY static inline __attribute__((always_inline))

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define PS_AVX2 1
#else
#define PS_AVX2 0
#endif


static inline float half_to_float(uint16_t h) {
#if PS_AVX2
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 0x1F, mant = h & 0x3FF, bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else { /* subnormal: renormalize */
            exp = 127 - 15 + 1;
            while (!(mant & 0x400)) { mant <<= 1; exp--; }
            bits = sign | (exp << 23) | ((mant & 0x3FF) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7F800000u | (mant << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
#endif
}

/* ---- weights ----------------------------------------------------------------------------- */

enum { FMT_Q4_0 = 0, FMT_Q4_1 = 1, FMT_Q8_0 = 2, FMT_Q4_K = 3, FMT_Q5_K = 4, FMT_Q6_K = 5,
       FMT_INT8 = 6, FMT_INT4 = 7, FMT_FP8 = 8 };

/* fp8 e4m3fn (torch.float8_e4m3fn: sign, 4 exponent bits with bias 7, 3 mantissa bits, no
 * infinities, 0x7f / 0xff NaN) as fp16 bits of a value 256 times smaller. The seven bits below
 * the sign, moved up 7 places, become an fp16 exponent and mantissa: fp16's bias is 15, so a
 * normal e4m3 2^(e-7) (1 + m/8) reads as 2^(e-15) (1 + m/8), 2^-8 of it, and a subnormal
 * m 2^-9 lands on the fp16 subnormal m 2^-17, again 2^-8 of it. fp16 -> float32 is exact
 * (F16C), so every code, 256 times the result, is torch's value; the scale absorbs the 256.
 * The NaN codes would read as 1.875 and are given an all-ones fp16 exponent instead. */
static inline uint16_t fp8_half_bits(uint8_t v) {
    const uint16_t h = (uint16_t)(((v & 0x80) << 8) | ((v & 0x7F) << 7));
    return (v & 0x7F) == 0x7F ? (uint16_t)(h | 0x7C00) : h;
}

/* Every format is w = d * c + m' for an integer code c: Q4_0 c = q, m' = -8 d; Q4_1 c = q,
 * m' = m; Q8_0 c = q, m' = 0. So a block's dot product with x is d * sum(c x) + m' * sum(x),
 * and sum(x) per block is computed once per call, not once per row. */

/* The float32 weights of one block, as the reference dequantizes them (for embedding rows). */
static inline void expand_block_scalar(int fmt, const uint8_t *qs, float d, float m, float w[32]) {
    if (fmt == FMT_Q8_0) {
        for (int j = 0; j < 32; j++) w[j] = (float)((const int8_t *)qs)[j] * d;
        return;
    }
    for (int j = 0; j < 16; j++) {
        int lo = qs[j] & 0x0F, hi = qs[j] >> 4;
        if (fmt == FMT_Q4_1) {
            w[j] = (float)lo * d + m;
            w[j + 16] = (float)hi * d + m;
        } else {
            w[j] = (float)(lo - 8) * d;
            w[j + 16] = (float)(hi - 8) * d;
        }
    }
}

/* The code c of element j (0..31) of a block: GGUF puts low nibbles at elements 0..15 and high
 * nibbles at 16..31. (int4 interleaves them, element 2i low and 2i + 1 high nibble of byte i;
 * its linears take x in block order, int4_order_x, and then read the codes as GGUF's.) */
static inline float code_scalar(int fmt, const uint8_t *qs, int j) {
    if (fmt == FMT_Q8_0) return (float)((const int8_t *)qs)[j];
    if (fmt == FMT_FP8) return half_to_float(fp8_half_bits(qs[j])); /* e4m3 / 256 */
    return (float)(j < 16 ? (qs[j] & 0x0F) : (qs[j - 16] >> 4));
}

/* One row of x for an int4 linear, in block order: in each 32-block, the even elements, then the
 * odd ones. Byte i of an int4 block holds elements 2i (low nibble) and 2i + 1 (high), so
 * against x so ordered its low nibbles are elements 0..15 and its high ones 16..31, as in GGUF's
 * 4-bit blocks: the codes unpack with Q4_0 / Q4_1's two widening loads and no byte shuffles,
 * which took a 2048 x 4096 GEMV at one token from 0.70 to 0.50 ms (Q4_1 0.46). */
static void int4_order_x(const float *x, int64_t K, float *xp) {
    for (int64_t b = 0; b + 32 <= K; b += 32)
        for (int j = 0; j < 16; j++) {
            xp[b + j] = x[b + 2 * j];
            xp[b + 16 + j] = x[b + 2 * j + 1];
        }
}

#if PS_AVX2
/* 16 fp8 e4m3 codes as float32 values / 256 (fp8_half_bits, 16 lanes at once): sign-extending
 * each byte to 16 bits and shifting by 7 puts the sign at bit 15 (and a copy at bit 14, which
 * is cleared) and exponent|mantissa at bits 7..13. (Shifting straight into a float32 would
 * turn e4m3 subnormals into float32 subnormals, slow or flushed to zero on some CPUs.)
 * Measured on an AMD EPYC (AVX2, one thread, a 2048x4096 GEMV in row_tile's loop, 2026-11-29):
 * this takes 0.86 ms at 1 token and 2.75 ms at 8 tokens; a 256-entry float table read with
 * _mm256_i32gather_ps 3.6 / 5.1 ms, the same table read by scalar loads into a 32-float stack
 * buffer 3.8 / 5.8 ms (dense float32: 1.6-2.0 ms at 1 token). The NaN check costs about 3%. */
ALWAYS_INLINE_EARLY void fp8_halves(const uint8_t *q, __m256 *lo, __m256 *hi) {
    const __m256i t = _mm256_slli_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)q)), 7);
    const __m256i em = _mm256_set1_epi16(0x3F80); /* exponent and mantissa of all-ones codes */
    const __m256i nan = _mm256_cmpeq_epi16(_mm256_and_si256(t, em), em);
    const __m256i bits = _mm256_or_si256(_mm256_and_si256(t, _mm256_set1_epi16((short)0xBFFF)),
                                         _mm256_and_si256(nan, _mm256_set1_epi16(0x7C00)));
    *lo = _mm256_cvtph_ps(_mm256_castsi256_si128(bits));
    *hi = _mm256_cvtph_ps(_mm256_extracti128_si256(bits, 1));
}

/* The block's 32 codes as float32, 8 per register, in element order. */
ALWAYS_INLINE_EARLY void codes_f32(int fmt, const uint8_t *qs, __m256 c[4]) {
    if (fmt == FMT_FP8) {
        fp8_halves(qs, &c[0], &c[1]);
        fp8_halves(qs + 16, &c[2], &c[3]);
        return;
    }
    if (fmt == FMT_Q8_0) {
        for (int j = 0; j < 4; j++)
            c[j] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(qs + 8 * j))));
        return;
    }
    /* bytes 0..7 and 8..15 widened to int32 (straight from memory); the low nibbles are
     * elements 0..15, the high nibbles (value >> 4: a byte has no higher bits) 16..31 */
    const __m256i b0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)qs));
    const __m256i b1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(qs + 8)));
    const __m256i mask = _mm256_set1_epi32(0x0F);
    c[0] = _mm256_cvtepi32_ps(_mm256_and_si256(b0, mask));
    c[1] = _mm256_cvtepi32_ps(_mm256_and_si256(b1, mask));
    c[2] = _mm256_cvtepi32_ps(_mm256_srli_epi32(b0, 4));
    c[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(b1, 4));
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

/* ---- linears ---------------------------------------------------------------------------
 * out[t, n] = sum_k x[t, k] * W[n, k] (+ bias[n]) for t < T, n < N.
 * x: float32 [T, K] with row stride x_stride; out: float32 [T, N] with row stride out_stride.
 * qs: the packed codes [N, K/32, qbytes]; d (and m for Q4_1): fp16 bits [N, K/32].
 * Returns -1 when a scratch buffer cannot be allocated.
 */
#define ALWAYS_INLINE static inline __attribute__((always_inline))

#if PS_AVX2
/* Block blk of the row (codes at row_q) against TT tokens of x: s = codes . x, then acc[t] =
 * UPDATE, an expression of s and acc[t]. BLOCK_DOT: acc[t] += d * s; BLOCK_SUM (one scale for
 * the whole row, int8 / fp8, applied once after the sum): acc[t] += s. BLOCK_FMA, the same sum
 * for 4 or 8 tokens: the four products go straight into acc[t] (one instruction a block and
 * token fewer; the tokens' independent chains hide the FMA latency, which one token alone
 * would wait on): on this 2-core EPYC at 8 tokens fp8 12-16% faster, int8 4-10%.
 * BLOCK_FMA_SCALED with SCALE_CODES(d), for formats with a scale a block at 8 tokens: the
 * block's codes times d once, shared by the 8 tokens (4 multiplies a block against 8): 3-4%. */
#define BLOCK_ACC(fmt, blk, UPDATE)                                                      \
    do {                                                                                 \
        codes_f32((fmt), row_q + (blk) * qbytes, c);                                     \
        for (int t = 0; t < TT; t++) {                                                   \
            const float *xb = x + t * x_stride + (blk) * 32;                             \
            __m256 s = _mm256_mul_ps(c[0], _mm256_loadu_ps(xb));                         \
            s = _mm256_fmadd_ps(c[1], _mm256_loadu_ps(xb + 8), s);                       \
            s = _mm256_fmadd_ps(c[2], _mm256_loadu_ps(xb + 16), s);                      \
            s = _mm256_fmadd_ps(c[3], _mm256_loadu_ps(xb + 24), s);                      \
            acc[t] = (UPDATE);                                                           \
        }                                                                                \
    } while (0)
#define BLOCK_DOT(fmt, blk, vd) BLOCK_ACC(fmt, blk, _mm256_fmadd_ps(s, (vd), acc[t]))
#define BLOCK_SUM(fmt, blk) BLOCK_ACC(fmt, blk, _mm256_add_ps(s, acc[t]))
#define BLOCK_FMA_SCALED(fmt, blk, SCALE)                                                 \
    do {                                                                                 \
        codes_f32((fmt), row_q + (blk) * qbytes, c);                                     \
        SCALE;                                                                           \
        for (int t = 0; t < TT; t++) {                                                   \
            const float *xb = x + t * x_stride + (blk) * 32;                             \
            acc[t] = _mm256_fmadd_ps(c[0], _mm256_loadu_ps(xb), acc[t]);                 \
            acc[t] = _mm256_fmadd_ps(c[1], _mm256_loadu_ps(xb + 8), acc[t]);             \
            acc[t] = _mm256_fmadd_ps(c[2], _mm256_loadu_ps(xb + 16), acc[t]);            \
            acc[t] = _mm256_fmadd_ps(c[3], _mm256_loadu_ps(xb + 24), acc[t]);            \
        }                                                                                \
    } while (0)
#define BLOCK_FMA(fmt, blk) BLOCK_FMA_SCALED(fmt, blk, (void)0)
#define SCALE_CODES(vd) \
    for (int i = 0; i < 4; i++) c[i] = _mm256_mul_ps(c[i], (vd))
#endif

/* One row against TT tokens starting at x (row stride x_stride); xsum [TT, nb] is each
 * block's sum of x; dr/mr are the row's d and m' per block, or dr NULL: every block's d is
 * the row's scale rs (int8, fp8; m' = 0), multiplied once into the row's sum instead of into
 * each block's (no per-block array to fill per row). TT and fmt are constants at every call
 * site, and dr NULL or not, so the accumulators stay in registers and the branches fold. */
ALWAYS_INLINE void row_tile(const int fmt, const int TT, const uint8_t *row_q, int64_t nb,
                            const float *dr, const float *mr, float rs, const float *x, int64_t x_stride,
                            const float *xsum, float *out, int64_t out_stride, float b) {
    const int64_t qbytes = (fmt == FMT_Q8_0 || fmt == FMT_FP8) ? 32 : 16;
    const int has_m = fmt != FMT_Q8_0 && fmt != FMT_FP8; /* m' = 0: xsum is not even computed */
    float macc[8] = {0};
#if PS_AVX2
    __m256 acc[8], c[4];
    for (int t = 0; t < TT; t++) acc[t] = _mm256_setzero_ps();
    if (dr == NULL && TT >= 4)
        for (int64_t blk = 0; blk < nb; blk++) BLOCK_FMA(fmt, blk);
    else if (dr == NULL)
        for (int64_t blk = 0; blk < nb; blk++) BLOCK_SUM(fmt, blk);
    else if (TT >= 8)
        for (int64_t blk = 0; blk < nb; blk++) BLOCK_FMA_SCALED(fmt, blk, SCALE_CODES(_mm256_set1_ps(dr[blk])));
    else
        for (int64_t blk = 0; blk < nb; blk++) BLOCK_DOT(fmt, blk, _mm256_set1_ps(dr[blk]));
    if (has_m) /* the m' * sum(x) terms, one short dot product per token */
        for (int t = 0; t < TT; t++)
            for (int64_t blk = 0; blk < nb; blk++) macc[t] += mr[blk] * xsum[t * nb + blk];
    for (int t = 0; t < TT; t++)
        out[t * out_stride] = (dr == NULL ? hsum(acc[t]) * rs : hsum(acc[t])) + macc[t] + b;
#else
    float acc[8] = {0};
    for (int64_t blk = 0; blk < nb; blk++) {
        const uint8_t *qb = row_q + blk * qbytes;
        for (int t = 0; t < TT; t++) {
            const float *xb = x + t * x_stride + blk * 32;
            float s = 0.0f;
            for (int j = 0; j < 32; j++) s += code_scalar(fmt, qb, j) * xb[j];
            acc[t] += dr == NULL ? s : s * dr[blk];
            if (has_m) macc[t] += mr[blk] * xsum[t * nb + blk];
        }
    }
    for (int t = 0; t < TT; t++) out[t * out_stride] = (dr == NULL ? acc[t] * rs : acc[t]) + macc[t] + b;
#endif
}

/* All T tokens of one row, in tiles of 8, 4, 2 and 1 tokens. */
ALWAYS_INLINE void row_all(const int fmt, const uint8_t *row_q, int64_t nb, const float *dr,
                           const float *mr, float rs, const float *x, int64_t x_stride, int64_t T,
                           const float *xsum, float *out, int64_t out_stride, float b) {
    int64_t t = 0;
    for (; t + 8 <= T; t += 8)
        row_tile(fmt, 8, row_q, nb, dr, mr, rs, x + t * x_stride, x_stride, xsum + t * nb,
                 out + t * out_stride, out_stride, b);
    if (t + 4 <= T) {
        row_tile(fmt, 4, row_q, nb, dr, mr, rs, x + t * x_stride, x_stride, xsum + t * nb,
                 out + t * out_stride, out_stride, b);
        t += 4;
    }
    if (t + 2 <= T) {
        row_tile(fmt, 2, row_q, nb, dr, mr, rs, x + t * x_stride, x_stride, xsum + t * nb,
                 out + t * out_stride, out_stride, b);
        t += 2;
    }
    if (t < T)
        row_tile(fmt, 1, row_q, nb, dr, mr, rs, x + t * x_stride, x_stride, xsum + t * nb,
                 out + t * out_stride, out_stride, b);
}

/* An int4 row against one token of x in block order (int4_order_x), its codes read as Q4_1's:
 * row_tile with the scale s and zero z of each group of `per` blocks read where they are, not
 * copied per block first (at 576 columns the copy cost about as much as the dot products; with
 * 8 tokens sharing it, row_tile's flat loop is the faster one, so only one token comes here). */
static inline void int4_row1(const uint8_t *row_q, int64_t nb, int64_t per, const float *s, const uint8_t *z,
                             const float *x, const float *xsum, float *out, float b) {
    const int64_t qbytes = 16, ng = nb / per, x_stride = 0;
    const int TT = 1;
    float macc = 0.0f;
#if PS_AVX2
    __m256 acc[1] = {_mm256_setzero_ps()}, c[4];
    for (int64_t g = 0; g < ng; g++) {
        const __m256 vd = _mm256_set1_ps(s[g]);
        for (int64_t blk = g * per; blk < (g + 1) * per; blk++) BLOCK_DOT(FMT_Q4_1, blk, vd);
    }
    float dot = hsum(acc[0]);
#else
    float dot = 0.0f;
    (void)x_stride;
    (void)TT;
    for (int64_t blk = 0; blk < nb; blk++) {
        float d = 0.0f;
        for (int j = 0; j < 32; j++) d += code_scalar(FMT_Q4_1, row_q + blk * qbytes, j) * x[blk * 32 + j];
        dot += d * s[blk / per];
    }
#endif
    for (int64_t g = 0; g < ng; g++) { /* the -z s * sum(x) terms, a group at a time */
        float xs = 0.0f;
        for (int64_t blk = g * per; blk < (g + 1) * per; blk++) xs += xsum[blk];
        macc -= (float)z[g] * s[g] * xs;
    }
    *out = dot + macc + b;
}

/* A linear layer as the decode step sees it: float32 rows or a GGUF block format. */
enum { FMT_F32 = -1 };
typedef struct {
    int32_t fmt, pad;
    int64_t n, k;
    const void *w;         /* float32 [n, k], or the codes: qs (Q6_K: ql; fp8: e4m3 [n, k]) */
    const uint16_t *d, *m; /* fp16 bits per block: d, and m (Q4_1) or dmin (Q4_K, Q5_K) */
    const float *bias;     /* [n] or NULL */
    const uint8_t *scales, *qh; /* K formats: packed scales, high bits (Q5_K, Q6_K) */
    const float *fscales;       /* int8, fp8: [n]; int4: [n, k / group] (float32) */
    const uint8_t *zeros;       /* int4: [n, k / group] integer zero points */
    int64_t group;              /* int4: group size (a multiple of 32) */
} ps_linear_t;

/* ---- K formats: 256-weight super-blocks, expanded to float32 exactly as the reference ---- */

enum { QK_K = 256 };

static inline int is_k_format(int fmt) { return fmt >= FMT_Q4_K && fmt <= FMT_Q6_K; }

/* The six-bit scale and min of sub-block j (0..7) from a Q4_K/Q5_K super-block's 12 bytes. */
static inline void k_scale_min(const uint8_t *sc12, int j, int *sc, int *mn) {
    if (j < 4) {
        *sc = sc12[j] & 0x3F;
        *mn = sc12[j + 4] & 0x3F;
    } else {
        *sc = (sc12[j + 4] & 0x0F) | ((sc12[j - 4] >> 2) & 0x30);
        *mn = (sc12[j + 4] >> 4) | ((sc12[j] >> 2) & 0x30);
    }
}

#if PS_AVX2
/* 32 bytes (unsigned or signed) as 4 x 8 float32, in order. */
static inline void bytes_f32(__m256i v, int is_signed, __m256 out[4]) {
    const __m128i lo = _mm256_castsi256_si128(v), hi = _mm256_extracti128_si256(v, 1);
    const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
    for (int j = 0; j < 4; j++)
        out[j] = _mm256_cvtepi32_ps(is_signed ? _mm256_cvtepi8_epi32(parts[j])
                                              : _mm256_cvtepu8_epi32(parts[j]));
}
#endif

/* Super-block blk of row n of L as 256 float32 weights (the reference's values: every
 * product below is exact in float32 or rounded once, as in the reference). */
static void expand_k(const ps_linear_t *L, int64_t n, int64_t blk, float *w) {
    const int64_t nb = L->k / QK_K, b = n * nb + blk;
    const float d = half_to_float(L->d[b]);
#if PS_AVX2
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    __m256 f[4];
    if (L->fmt == FMT_Q6_K) {
        const uint8_t *ql = (const uint8_t *)L->w + b * 128, *qhp = L->qh + b * 64;
        const int8_t *sc = (const int8_t *)L->scales + b * 16;
        for (int j = 0; j < 8; j++) {
            const int half = j >> 2, k = j & 3;
            __m256i lo = _mm256_loadu_si256((const __m256i *)(ql + 64 * half + 32 * (k & 1)));
            lo = (k >> 1) ? _mm256_and_si256(_mm256_srli_epi16(lo, 4), m4) : _mm256_and_si256(lo, m4);
            __m256i hi = _mm256_loadu_si256((const __m256i *)(qhp + 32 * half));
            hi = _mm256_and_si256(_mm256_srli_epi16(hi, 2 * k), _mm256_set1_epi8(3));
            const __m256i code = _mm256_sub_epi8(_mm256_or_si256(lo, _mm256_slli_epi16(hi, 4)),
                                                 _mm256_set1_epi8(32));
            bytes_f32(code, 1, f);
            const __m256 s0 = _mm256_set1_ps(d * (float)sc[2 * j]);
            const __m256 s1 = _mm256_set1_ps(d * (float)sc[2 * j + 1]);
            _mm256_storeu_ps(w + 32 * j, _mm256_mul_ps(s0, f[0]));
            _mm256_storeu_ps(w + 32 * j + 8, _mm256_mul_ps(s0, f[1]));
            _mm256_storeu_ps(w + 32 * j + 16, _mm256_mul_ps(s1, f[2]));
            _mm256_storeu_ps(w + 32 * j + 24, _mm256_mul_ps(s1, f[3]));
        }
        return;
    }
    {
        const float dmin = half_to_float(L->m[b]);
        const uint8_t *sc12 = L->scales + b * 12, *qs = (const uint8_t *)L->w + b * 128;
        const uint8_t *qhp = L->fmt == FMT_Q5_K ? L->qh + b * 32 : NULL;
        const __m256i qh = qhp ? _mm256_loadu_si256((const __m256i *)qhp) : _mm256_setzero_si256();
        for (int j = 0; j < 8; j++) {
            int sc, mn;
            k_scale_min(sc12, j, &sc, &mn);
            __m256i code = _mm256_loadu_si256((const __m256i *)(qs + 32 * (j >> 1)));
            code = (j & 1) ? _mm256_and_si256(_mm256_srli_epi16(code, 4), m4) : _mm256_and_si256(code, m4);
            if (qhp) /* bit j of each qh byte is the code's bit 4 */
                code = _mm256_or_si256(code, _mm256_slli_epi16(
                    _mm256_and_si256(_mm256_srli_epi16(qh, j), _mm256_set1_epi8(1)), 4));
            bytes_f32(code, 0, f);
            const __m256 dj = _mm256_set1_ps(d * (float)sc), mj = _mm256_set1_ps(dmin * (float)mn);
            for (int q = 0; q < 4; q++) /* d*sc*code is exact, so the FMA rounds once, as the reference */
                _mm256_storeu_ps(w + 32 * j + 8 * q, _mm256_fmsub_ps(dj, f[q], mj));
        }
        return;
    }
#endif
    if (L->fmt == FMT_Q6_K) { /* ql [128], qh [64], scales int8 [16]: w = d * sc * (code - 32) */
        const uint8_t *ql = (const uint8_t *)L->w + b * 128, *qh = L->qh + b * 64;
        const int8_t *sc = (const int8_t *)L->scales + b * 16;
        for (int j = 0; j < 8; j++) {
            const int half = j >> 2, k = j & 3, hi_nib = k >> 1, s = k & 1;
            for (int i = 0; i < 32; i++) {
                const uint8_t lb = ql[64 * half + 32 * s + i];
                const int lo = hi_nib ? lb >> 4 : lb & 0x0F;
                const int hi = (qh[32 * half + i] >> (2 * k)) & 3;
                const int f = 32 * j + i;
                w[f] = (d * (float)sc[f >> 4]) * (float)((lo | (hi << 4)) - 32);
            }
        }
        return;
    }
    /* Q4_K / Q5_K: qs [128], scales [12] (six-bit scale and min per 32), Q5_K qh [32] */
    const float dmin = half_to_float(L->m[b]);
    const uint8_t *sc12 = L->scales + b * 12, *qs = (const uint8_t *)L->w + b * 128;
    const uint8_t *qh = L->fmt == FMT_Q5_K ? L->qh + b * 32 : NULL;
    for (int j = 0; j < 8; j++) {
        int sc, mn;
        k_scale_min(sc12, j, &sc, &mn);
        const float dj = d * (float)sc, mj = dmin * (float)mn;
        const uint8_t *g = qs + 32 * (j >> 1);
        for (int i = 0; i < 32; i++) {
            int code = (j & 1) ? g[i] >> 4 : g[i] & 0x0F;
            if (qh) code |= ((qh[i] >> j) & 1) << 4;
            w[32 * j + i] = dj * (float)code - mj;
        }
    }
}

/* Row n of a K-format L against T tokens: each super-block is expanded once into a buffer
 * (L1-resident) and dotted with every token. */
static void k_row(const ps_linear_t *L, int64_t n, const float *x, int64_t x_stride, int64_t T,
                  float *out, int64_t out_stride, float *w) {
    const int64_t nb = L->k / QK_K;
    const float b = L->bias ? L->bias[n] : 0.0f;
    for (int64_t t0 = 0; t0 < T; t0 += 8) {
        const int tt = T - t0 < 8 ? (int)(T - t0) : 8;
        float acc[8] = {0};
        for (int64_t blk = 0; blk < nb; blk++) {
            expand_k(L, n, blk, w);
            for (int t = 0; t < tt; t++) {
                const float *xb = x + (t0 + t) * x_stride + blk * QK_K;
#if PS_AVX2
                __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
                for (int i = 0; i < QK_K; i += 32) {
                    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(xb + i), a0);
                    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 8), _mm256_loadu_ps(xb + i + 8), a1);
                    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 16), _mm256_loadu_ps(xb + i + 16), a2);
                    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 24), _mm256_loadu_ps(xb + i + 24), a3);
                }
                acc[t] += hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
#else
                float s = 0.0f;
                for (int i = 0; i < QK_K; i++) s += w[i] * xb[i];
                acc[t] += s;
#endif
            }
        }
        for (int t = 0; t < tt; t++) out[(t0 + t) * out_stride + n] = acc[t] + b;
    }
}

#if PS_AVX2
/* One float32 row against TT tokens. */
ALWAYS_INLINE void dense_tile(const int TT, const float *w, int64_t K, const float *x,
                              int64_t x_stride, float *out, int64_t out_stride, float b) {
    __m256 acc[8];
    for (int t = 0; t < TT; t++) acc[t] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        const __m256 wk = _mm256_loadu_ps(w + k);
        for (int t = 0; t < TT; t++)
            acc[t] = _mm256_fmadd_ps(wk, _mm256_loadu_ps(x + t * x_stride + k), acc[t]);
    }
    for (int t = 0; t < TT; t++) {
        float r = hsum(acc[t]);
        for (int64_t j = k; j < K; j++) r += w[j] * x[t * x_stride + j];
        out[t * out_stride] = r + b;
    }
}
#endif

/* Row n of L against all T tokens; dm is scratch for 2 * k/32 floats. */
static void linear_row(const ps_linear_t *L, int64_t n, const float *x, int64_t x_stride,
                       int64_t T, const float *xsum, float *out, int64_t out_stride, float *dm) {
    const float b = L->bias ? L->bias[n] : 0.0f;
    float *o = out + n;
    if (L->fmt == FMT_F32) {
        const float *w = (const float *)L->w + n * L->k;
#if PS_AVX2
        int64_t t = 0;
        for (; t + 8 <= T; t += 8) dense_tile(8, w, L->k, x + t * x_stride, x_stride, o + t * out_stride, out_stride, b);
        if (t + 4 <= T) { dense_tile(4, w, L->k, x + t * x_stride, x_stride, o + t * out_stride, out_stride, b); t += 4; }
        if (t + 2 <= T) { dense_tile(2, w, L->k, x + t * x_stride, x_stride, o + t * out_stride, out_stride, b); t += 2; }
        if (t < T) dense_tile(1, w, L->k, x + t * x_stride, x_stride, o + t * out_stride, out_stride, b);
#else
        for (int64_t t = 0; t < T; t++) {
            float r = 0.0f;
            for (int64_t j = 0; j < L->k; j++) r += w[j] * x[t * x_stride + j];
            o[t * out_stride] = r + b;
        }
#endif
        return;
    }
    if (is_k_format(L->fmt)) {
        k_row(L, n, x, x_stride, T, out, out_stride, dm);
        return;
    }
    const int fmt = L->fmt;
    const int64_t nb = L->k / 32;
    const int64_t qbytes = (fmt == FMT_Q8_0 || fmt == FMT_INT8 || fmt == FMT_FP8) ? 32 : 16;
    const uint8_t *row_q = (const uint8_t *)L->w + n * nb * qbytes;
    float *dr = dm, *mr = dm + nb;
    if (fmt == FMT_INT8) { /* w = q * s: Q8_0's codes, the row's one scale applied to the sum */
        row_all(FMT_Q8_0, row_q, nb, NULL, NULL, L->fscales[n], x, x_stride, T, xsum, o, out_stride, b);
        return;
    }
    if (fmt == FMT_FP8) { /* w = e4m3(q) s = (q read as fp16) * 256 s */
        row_all(FMT_FP8, row_q, nb, NULL, NULL, 256.0f * L->fscales[n], x, x_stride, T, xsum, o, out_stride, b);
        return;
    }
    if (fmt == FMT_INT4) { /* w = (q - z) s = s q + (-z s), a scale and zero per group of 32-blocks */
        const int64_t per = L->group / 32, ng = L->k / L->group;
        const float *s = L->fscales + n * ng;
        const uint8_t *z = L->zeros + n * ng;
        /* (x in block order, int4_order_x: the codes read as Q4_1's, the same w = d c + m') */
        if (T == 1) {
            int4_row1(row_q, nb, per, s, z, x, xsum, o, b);
            return;
        }
        for (int64_t g = 0; g < ng; g++) /* (a loop per group: no division per block) */
            for (int64_t j = 0; j < per; j++) {
                dr[g * per + j] = s[g];
                mr[g * per + j] = -(float)z[g] * s[g];
            }
        row_all(FMT_Q4_1, row_q, nb, dr, mr, 1.0f, x, x_stride, T, xsum, o, out_stride, b);
        return;
    }
    for (int64_t blk = 0; blk < nb; blk++) {
        dr[blk] = half_to_float(L->d[n * nb + blk]);
        mr[blk] = fmt == FMT_Q4_1 ? half_to_float(L->m[n * nb + blk])
                  : fmt == FMT_Q4_0 ? -8.0f * dr[blk] : 0.0f;
    }
    if (fmt == FMT_Q4_0)
        row_all(FMT_Q4_0, row_q, nb, dr, mr, 1.0f, x, x_stride, T, xsum, o, out_stride, b);
    else if (fmt == FMT_Q4_1)
        row_all(FMT_Q4_1, row_q, nb, dr, mr, 1.0f, x, x_stride, T, xsum, o, out_stride, b);
    else
        row_all(FMT_Q8_0, row_q, nb, dr, mr, 1.0f, x, x_stride, T, xsum, o, out_stride, b);
}

/* Each 32-element block's sum of x, tokens [t0, t1): xsum [T, K/32]. */
static void block_sums(const float *x, int64_t x_stride, int64_t t0, int64_t t1, int64_t K,
                       float *xsum) {
    const int64_t nb = K / 32;
    for (int64_t t = t0; t < t1; t++)
        for (int64_t blk = 0; blk < nb; blk++) {
            const float *xb = x + t * x_stride + blk * 32;
            float s = 0.0f;
            for (int j = 0; j < 32; j++) s += xb[j];
            xsum[t * nb + blk] = s;
        }
}

/* out[t, n] = sum_k x[t, k] * W[n, k] (+ bias) for any format of L; -1 if out of memory. */
int ps_linear(const ps_linear_t *L, const float *x, int64_t x_stride, int64_t T, float *out,
              int64_t out_stride, int nthreads) {
    const int64_t nb = L->k / 32;
    const int int4 = L->fmt == FMT_INT4;
    float *xsum = malloc(sizeof(float) * (size_t)(T * nb + 1));
    float *xp = int4 ? malloc(sizeof(float) * (size_t)(T * L->k)) : NULL;
    if (!xsum || (int4 && !xp)) {
        free(xsum);
        free(xp);
        return -1;
    }
    if (L->fmt == FMT_Q4_0 || L->fmt == FMT_Q4_1 || int4)
        block_sums(x, x_stride, 0, T, L->k, xsum);
    if (int4) { /* the rows read x in block order */
        for (int64_t t = 0; t < T; t++) int4_order_x(x + t * x_stride, L->k, xp + t * L->k);
        x = xp;
        x_stride = L->k;
    }
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        float *dm = malloc(sizeof(float) * (size_t)(2 * (nb + 1) + QK_K)); /* per-row scratch */
        if (!dm) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t n = 0; n < L->n; n++)
            if (dm) linear_row(L, n, x, x_stride, T, xsum, out, out_stride, dm);
        free(dm);
    }
    free(xsum);
    free(xp);
    return failed ? -1 : 0;
}

/* Rows [r0, r1) of a packed L expanded to float32 into out [r1 - r0, k], the values the
 * reference dequantization gives (for prefill: the caller multiplies them with BLAS). */
void ps_dequant_rows(const ps_linear_t *L, int64_t r0, int64_t r1, float *out, int nthreads) {
    const int64_t K = L->k;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t n = r0; n < r1; n++) {
        float *o = out + (n - r0) * K;
        if (is_k_format(L->fmt)) {
            for (int64_t blk = 0; blk < K / QK_K; blk++) expand_k(L, n, blk, o + blk * QK_K);
            continue;
        }
        if (L->fmt == FMT_INT8) { /* q * s */
            const int8_t *q = (const int8_t *)L->w + n * K;
            for (int64_t j = 0; j < K; j++) o[j] = (float)q[j] * L->fscales[n];
            continue;
        }
        if (L->fmt == FMT_FP8) { /* e4m3(q) * s: (q as fp16) * 256 is exact, so one rounding */
            const uint8_t *q = (const uint8_t *)L->w + n * K;
            const float s = L->fscales[n];
            int64_t j = 0;
#if PS_AVX2
            const __m256 v256 = _mm256_set1_ps(256.0f), vs = _mm256_set1_ps(s);
            for (; j + 16 <= K; j += 16) {
                __m256 lo, hi;
                fp8_halves(q + j, &lo, &hi);
                _mm256_storeu_ps(o + j, _mm256_mul_ps(_mm256_mul_ps(lo, v256), vs));
                _mm256_storeu_ps(o + j + 8, _mm256_mul_ps(_mm256_mul_ps(hi, v256), vs));
            }
#endif
            for (; j < K; j++) o[j] = half_to_float(fp8_half_bits(q[j])) * 256.0f * s;
            continue;
        }
        if (L->fmt == FMT_INT4) { /* (q - z) * s */
            const uint8_t *q = (const uint8_t *)L->w + n * (K / 2);
            const int64_t ng = K / L->group;
            for (int64_t j = 0; j < K; j++) {
                const int64_t g = n * ng + j / L->group;
                const int c = (j & 1) ? q[j >> 1] >> 4 : q[j >> 1] & 0x0F;
                o[j] = (float)(c - L->zeros[g]) * L->fscales[g];
            }
            continue;
        }
        const int64_t nb = K / 32, qbytes = L->fmt == FMT_Q8_0 ? 32 : 16;
        for (int64_t blk = 0; blk < nb; blk++)
            expand_block_scalar(L->fmt, (const uint8_t *)L->w + (n * nb + blk) * qbytes,
                                half_to_float(L->d[n * nb + blk]),
                                L->m ? half_to_float(L->m[n * nb + blk]) : 0.0f, o + blk * 32);
    }
}

/* ---- paged decode attention --------------------------------------------------------------
 * q: [R, Hq, D] float32 (row stride q_stride between requests); out: [R, Hq, D] contiguous.
 * kv: one layer's cache [2, num_blocks, block_size, Hk, D] float32.
 * block_tables: int32 [R, bt_stride]; seq_lens: int32 [R] (keys visible to the query).
 * Each (request, KV head) task scores its G = Hq / Hk query heads against every key once,
 * softmaxes in float32 with the max subtracted, and sums the values.
 */
static inline float dot(const float *a, const float *b, int D) {
#if PS_AVX2
    if (D % 16 == 0) {
        __m256 s0 = _mm256_setzero_ps(), s1 = s0;
        for (int i = 0; i < D; i += 16) {
            s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
            s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
        }
        return hsum(_mm256_add_ps(s0, s1));
    }
#endif
    float s = 0.0f;
    for (int i = 0; i < D; i++) s += a[i] * b[i];
    return s;
}

static inline void axpy(float *y, float a, const float *x, int D) {
    int i = 0;
#if PS_AVX2
    __m256 va = _mm256_set1_ps(a);
    for (; i + 8 <= D; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
#endif
    for (; i < D; i++) y[i] += a * x[i];
}

/* One (request, KV head) task: the G query heads of KV head h against the S cached keys.
 * q_heads [G, D]; out_heads [G, D]; scores scratch [G, S]. */
static void attend(const float *q_heads, const float *kv, const float *vcache, const int32_t *table,
                   int64_t S, int64_t h, int64_t G, int64_t D, int64_t block_size,
                   int64_t tok_stride, int64_t blk_stride, float scale, float *scores,
                   float *out_heads) {
    for (int64_t s = 0; s < S; s++) {
        const float *k = kv + table[s / block_size] * blk_stride + (s % block_size) * tok_stride + h * D;
        for (int64_t g = 0; g < G; g++) scores[g * S + s] = dot(q_heads + g * D, k, (int)D) * scale;
    }
    for (int64_t g = 0; g < G; g++) {
        float *sc = scores + g * S, mx = -INFINITY, sum = 0.0f;
        for (int64_t s = 0; s < S; s++) mx = sc[s] > mx ? sc[s] : mx;
        for (int64_t s = 0; s < S; s++) {
            sc[s] = expf(sc[s] - mx);
            sum += sc[s];
        }
        const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
        for (int64_t s = 0; s < S; s++) sc[s] *= inv;
        memset(out_heads + g * D, 0, sizeof(float) * (size_t)D);
    }
    for (int64_t s = 0; s < S; s++) {
        const float *v = vcache + table[s / block_size] * blk_stride + (s % block_size) * tok_stride + h * D;
        for (int64_t g = 0; g < G; g++) axpy(out_heads + g * D, scores[g * S + s], v, (int)D);
    }
}

int ps_paged_decode_attention(const float *q, int64_t q_stride, const float *kv,
                              int64_t num_blocks, int64_t block_size, int64_t Hk, int64_t D,
                              int64_t Hq, const int32_t *block_tables, int64_t bt_stride,
                              const int32_t *seq_lens, int64_t R, float scale, float *out,
                              int nthreads) {
    const int64_t G = Hq / Hk;
    const int64_t tok_stride = Hk * D;                  /* between tokens of a block */
    const int64_t blk_stride = block_size * tok_stride; /* between blocks */
    const float *vcache = kv + num_blocks * blk_stride;
    int64_t max_len = 1;
    for (int64_t r = 0; r < R; r++) max_len = seq_lens[r] > max_len ? seq_lens[r] : max_len;
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        float *scores = malloc(sizeof(float) * (size_t)(G * max_len));
        if (!scores) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < R * Hk; task++) {
            if (!scores) continue;
            const int64_t r = task / Hk, h = task % Hk;
            attend(q + r * q_stride + h * G * D, kv, vcache, block_tables + r * bt_stride,
                   seq_lens[r], h, G, D, block_size, tok_stride, blk_stride, scale, scores,
                   out + (r * Hq + h * G) * D);
        }
        free(scores);
    }
    return failed ? -1 : 0;
}

/* ---- small per-token ops ---------------------------------------------------------------- */

/* y = rms_norm(x + residual) * w; res_out = x + residual (the new residual stream). residual
 * and res_out may be NULL (no residual). x, residual, y, res_out: float32 [T, H] contiguous. */
void ps_rms_norm(const float *x, const float *residual, const float *w, float eps, int64_t T,
                 int64_t H, float *y, float *res_out) {
    for (int64_t t = 0; t < T; t++) {
        const float *xt = x + t * H;
        if (residual) {
            const float *rt = residual + t * H;
            float *st = res_out + t * H;
            for (int64_t i = 0; i < H; i++) st[i] = xt[i] + rt[i];
            xt = st;
        }
        float ss = 0.0f;
        for (int64_t i = 0; i < H; i++) ss += xt[i] * xt[i];
        const float inv = 1.0f / sqrtf(ss / (float)H + eps);
        float *yt = y + t * H;
        for (int64_t i = 0; i < H; i++) yt[i] = xt[i] * inv * w[i];
    }
}

/* Rotate-half rotary on the first rot_dim of each head, out of place. src [T, heads, D] with
 * token stride src_stride; dst [T, heads, D] contiguous; cos_sin [max_pos, rot_dim] float32
 * (cos in the first half, sin in the second); positions int64 [T]. */
void ps_rotary(const int64_t *positions, const float *src, int64_t src_stride, int64_t T,
               int64_t heads, int64_t D, const float *cos_sin, int64_t rot_dim, float *dst) {
    const int64_t half = rot_dim / 2;
    for (int64_t t = 0; t < T; t++) {
        const float *cs = cos_sin + positions[t] * rot_dim, *sn = cs + half;
        for (int64_t h = 0; h < heads; h++) {
            const float *s = src + t * src_stride + h * D;
            float *o = dst + (t * heads + h) * D;
            for (int64_t i = 0; i < half; i++) {
                const float a = s[i], b = s[i + half];
                o[i] = a * cs[i] - b * sn[i];
                o[i + half] = b * cs[i] + a * sn[i];
            }
            for (int64_t i = rot_dim; i < D; i++) o[i] = s[i];
        }
    }
}

/* Write T tokens' K and V (each [T, Hk * D] with token strides k_stride / v_stride) into a
 * float32 blocks_nhd cache [2, num_blocks, block_size, Hk, D] at slots [T] (int64). */
void ps_write_kv(const float *k, int64_t k_stride, const float *v, int64_t v_stride, int64_t T,
                 int64_t row, float *kv, int64_t num_slots, const int64_t *slots) {
    float *vcache = kv + num_slots * row;
    for (int64_t t = 0; t < T; t++) {
        if (slots[t] < 0) continue; /* a padding row: nothing to store */
        memcpy(kv + slots[t] * row, k + t * k_stride, sizeof(float) * (size_t)row);
        memcpy(vcache + slots[t] * row, v + t * v_stride, sizeof(float) * (size_t)row);
    }
}

/* ---- the whole decode step ---------------------------------------------------------------
 * A Llama-family model (pre-norm, rotate-half rotary over the whole head, SwiGLU MLP, GQA)
 * for R requests with one new token each, in one OpenMP parallel region: each op splits its
 * rows over the threads and ends in a barrier, so a step costs one fork instead of one per op
 * and no Python between ops. The ops are the ones above, so results equal the op-by-op path.
 */
typedef struct {
    const float *input_norm, *post_norm; /* [H] */
    ps_linear_t qkv, o, gate_up, down;   /* fused q|k|v rows and gate|up rows */
    float *kv_cache;                      /* float32 [2, num_blocks, block_size, Hk, D] */
} ps_layer_t;

typedef struct {
    int64_t num_layers, hidden, num_heads, num_kv_heads, head_dim, inter;
    int64_t num_blocks, block_size;
    float eps, scale;
    const float *cos_sin;    /* [max_pos, head_dim]: cos | sin */
    const float *final_norm; /* [H] */
    ps_linear_t lm_head;
    const ps_layer_t *layers;
} ps_model_t;

static void rms_row(const float *x, const float *w, float eps, int64_t H, float *y) {
    float ss = 0.0f;
    for (int64_t i = 0; i < H; i++) ss += x[i] * x[i];
    const float inv = 1.0f / sqrtf(ss / (float)H + eps);
    for (int64_t i = 0; i < H; i++) y[i] = x[i] * inv * w[i];
}

static void rotate_heads(float *t, int64_t heads, int64_t D, const float *cs) {
    const int64_t half = D / 2;
    const float *sn = cs + half;
    for (int64_t h = 0; h < heads; h++) {
        float *v = t + h * D;
        for (int64_t i = 0; i < half; i++) {
            const float a = v[i], b = v[i + half];
            v[i] = a * cs[i] - b * sn[i];
            v[i + half] = b * cs[i] + a * sn[i];
        }
    }
}

/* Row r of a linear's input x ([R, K], rows K apart) made ready for its rows: each block's sum
 * of x (xsum), and for int4 the row in block order (int4_order_x) at xp; LINEAR_X is then the
 * x the rows read. */
static inline void linear_input(const ps_linear_t *L, const float *x, int64_t r, int64_t K, float *xsum,
                                float *xp) {
    block_sums(x, K, r, r + 1, K, xsum);
    if (L->fmt == FMT_INT4) int4_order_x(x + r * K, K, xp + r * K);
}
#define LINEAR_X(L, x, xp) ((L)->fmt == FMT_INT4 ? (const float *)(xp) : (const float *)(x))

/* Phases of the decode step that ps_decode_step can time (``profile`` non-NULL: seconds per
 * phase are added to profile[phase], measured by thread 0 between the barriers that end them). */
enum { PH_NORM, PH_QKV, PH_ROPE, PH_ATTN, PH_O, PH_GATE_UP, PH_ACT, PH_DOWN, PH_LM_HEAD, PH_COUNT };
int ps_decode_num_phases(void) { return PH_COUNT; }
#define PROFILE_MARK(phase)                                                  \
    do {                                                                     \
        if (profile && omp_get_thread_num() == 0) {                         \
            const double now_ = omp_get_wtime();                             \
            profile[phase] += now_ - t_last;                                 \
            t_last = now_;                                                   \
        }                                                                    \
    } while (0)

/* hidden: [R, H] embeddings in, scratch after; logits: [R, vocab] out. Returns -1 when a
 * scratch buffer cannot be allocated (nothing is written to the caches in that case). */
int ps_decode_step(const ps_model_t *M, int64_t R, float *hidden, const int64_t *positions,
                   const int64_t *slots, const int32_t *block_tables, int64_t bt_stride,
                   const int32_t *seq_lens, float *logits, int nthreads, double *profile) {
    const int64_t H = M->hidden, D = M->head_dim, Hq = M->num_heads, Hk = M->num_kv_heads;
    const int64_t G = Hq / Hk, I = M->inter, QKV = (Hq + 2 * Hk) * D;
    const int64_t tok_stride = Hk * D, blk_stride = M->block_size * tok_stride;
    const int64_t kmax = I > Hq * D ? (I > H ? I : H) : (Hq * D > H ? Hq * D : H);
    int64_t max_len = 1;
    for (int64_t r = 0; r < R; r++) max_len = seq_lens[r] > max_len ? seq_lens[r] : max_len;
    const size_t floats = (size_t)R * (size_t)(2 * H + QKV + Hq * D + 2 * I + I + kmax / 32 + 1 + kmax);
    float *buf = malloc(sizeof(float) * floats);
    if (!buf) return -1;
    float *resid = buf, *x = resid + R * H, *qkv = x + R * H, *att = qkv + R * QKV;
    float *gu = att + R * Hq * D, *act = gu + R * 2 * I, *xsum = act + R * I;
    float *xp = xsum + R * (kmax / 32 + 1); /* an int4 linear's input in block order */
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        float *dm = malloc(sizeof(float) * (size_t)(2 * (kmax / 32 + 1) + QK_K));
        float *scores = malloc(sizeof(float) * (size_t)(G * max_len));
        if (!dm || !scores) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        double t_last = profile ? omp_get_wtime() : 0.0;
        if (!failed) {
            for (int64_t l = 0; l < M->num_layers; l++) {
                const ps_layer_t *L = &M->layers[l];
                float *vcache = L->kv_cache + M->num_blocks * blk_stride;
#pragma omp for schedule(static)
                for (int64_t r = 0; r < R; r++) { /* residual stream and input norm */
                    float *res = resid + r * H, *h = hidden + r * H;
                    for (int64_t i = 0; i < H; i++) res[i] = l == 0 ? h[i] : res[i] + h[i];
                    rms_row(res, L->input_norm, M->eps, H, x + r * H);
                    linear_input(&L->qkv, x, r, H, xsum, xp);
                }
                PROFILE_MARK(PH_NORM);
#pragma omp for schedule(static)
                for (int64_t n = 0; n < QKV; n++) linear_row(&L->qkv, n, LINEAR_X(&L->qkv, x, xp), H, R, xsum, qkv, QKV, dm);
                PROFILE_MARK(PH_QKV);
#pragma omp for schedule(static)
                for (int64_t r = 0; r < R; r++) { /* rotary on q and k, then k and v to the cache */
                    float *row = qkv + r * QKV;
                    const float *cs = M->cos_sin + positions[r] * D;
                    rotate_heads(row, Hq + Hk, D, cs); /* q heads then k heads are adjacent */
                    memcpy(L->kv_cache + slots[r] * tok_stride, row + Hq * D, sizeof(float) * (size_t)(Hk * D));
                    memcpy(vcache + slots[r] * tok_stride, row + (Hq + Hk) * D, sizeof(float) * (size_t)(Hk * D));
                }
                PROFILE_MARK(PH_ROPE);
#pragma omp for schedule(dynamic, 1)
                for (int64_t task = 0; task < R * Hk; task++) {
                    const int64_t r = task / Hk, h = task % Hk;
                    attend(qkv + r * QKV + h * G * D, L->kv_cache, vcache, block_tables + r * bt_stride,
                           seq_lens[r], h, G, D, M->block_size, tok_stride, blk_stride, M->scale,
                           scores, att + r * Hq * D + h * G * D);
                }
                PROFILE_MARK(PH_ATTN);
#pragma omp for schedule(static)
                for (int64_t r = 0; r < R; r++) linear_input(&L->o, att, r, Hq * D, xsum, xp);
                PROFILE_MARK(PH_O);
#pragma omp for schedule(static)
                for (int64_t n = 0; n < H; n++) linear_row(&L->o, n, LINEAR_X(&L->o, att, xp), Hq * D, R, xsum, hidden, H, dm);
                PROFILE_MARK(PH_O);
#pragma omp for schedule(static)
                for (int64_t r = 0; r < R; r++) { /* residual and post-attention norm */
                    float *res = resid + r * H, *h = hidden + r * H;
                    for (int64_t i = 0; i < H; i++) res[i] += h[i];
                    rms_row(res, L->post_norm, M->eps, H, x + r * H);
                    linear_input(&L->gate_up, x, r, H, xsum, xp);
                }
                PROFILE_MARK(PH_NORM);
#pragma omp for schedule(static)
                for (int64_t n = 0; n < 2 * I; n++) linear_row(&L->gate_up, n, LINEAR_X(&L->gate_up, x, xp), H, R, xsum, gu, 2 * I, dm);
                PROFILE_MARK(PH_GATE_UP);
#pragma omp for schedule(static)
                for (int64_t r = 0; r < R; r++) { /* silu(gate) * up */
                    const float *g = gu + r * 2 * I, *u = g + I;
                    float *a = act + r * I;
                    for (int64_t i = 0; i < I; i++) a[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
                    linear_input(&L->down, act, r, I, xsum, xp);
                }
                PROFILE_MARK(PH_ACT);
#pragma omp for schedule(static)
                for (int64_t n = 0; n < H; n++) linear_row(&L->down, n, LINEAR_X(&L->down, act, xp), I, R, xsum, hidden, H, dm);
                PROFILE_MARK(PH_DOWN);
            }
#pragma omp for schedule(static)
            for (int64_t r = 0; r < R; r++) { /* final norm */
                float *res = resid + r * H, *h = hidden + r * H;
                for (int64_t i = 0; i < H; i++) res[i] += h[i];
                rms_row(res, M->final_norm, M->eps, H, x + r * H);
                linear_input(&M->lm_head, x, r, H, xsum, xp);
            }
            PROFILE_MARK(PH_NORM);
#pragma omp for schedule(static)
            for (int64_t n = 0; n < M->lm_head.n; n++)
                linear_row(&M->lm_head, n, LINEAR_X(&M->lm_head, x, xp), H, R, xsum, logits, M->lm_head.n, dm);
            PROFILE_MARK(PH_LM_HEAD);
        }
        free(dm);
        free(scores);
    }
    free(buf);
    return failed ? -1 : 0;
}
