/* portaserve cpu_native: small-batch kernels for the `cpu` device, called through ctypes.
 *
 * 1. GGUF block-format linears (Q4_0, Q4_1, Q8_0) on the packed struct-of-arrays layout of
 *    portaserve.quant.gguf_formats, read once per step in their packed form and never written
 *    out dense: each block's codes are widened to float32 in registers and multiplied into the
 *    float32 activations with FMA, the scale applied once per block. Rows are split over
 *    OpenMP threads; up to eight tokens share each widened block.
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

int ps_has_avx2(void) { return PS_AVX2; }

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

enum { FMT_Q4_0 = 0, FMT_Q4_1 = 1, FMT_Q8_0 = 2 };

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

/* The code c of element j (0..31) of a block: low nibbles are elements 0..15, high 16..31. */
static inline float code_scalar(int fmt, const uint8_t *qs, int j) {
    if (fmt == FMT_Q8_0) return (float)((const int8_t *)qs)[j];
    return (float)(j < 16 ? (qs[j] & 0x0F) : (qs[j - 16] >> 4));
}

#if PS_AVX2
/* The block's 32 codes as float32, 8 per register, in element order. */
ALWAYS_INLINE_EARLY void codes_f32(int fmt, const uint8_t *qs, __m256 c[4]) {
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

/* One row against TT tokens starting at x (row stride x_stride); xsum [TT, nb] is each
 * block's sum of x; dr/mr are the row's d and m' per block. TT and fmt are constants at every
 * call site, so the accumulators stay in registers. */
ALWAYS_INLINE void row_tile(const int fmt, const int TT, const uint8_t *row_q, int64_t nb,
                            const float *dr, const float *mr, const float *x, int64_t x_stride,
                            const float *xsum, float *out, int64_t out_stride, float b) {
    const int64_t qbytes = fmt == FMT_Q8_0 ? 32 : 16;
    float macc[8] = {0};
#if PS_AVX2
    __m256 acc[8], c[4];
    for (int t = 0; t < TT; t++) acc[t] = _mm256_setzero_ps();
    for (int64_t blk = 0; blk < nb; blk++) {
        codes_f32(fmt, row_q + blk * qbytes, c);
        const __m256 vd = _mm256_set1_ps(dr[blk]);
        for (int t = 0; t < TT; t++) {
            const float *xb = x + t * x_stride + blk * 32;
            __m256 s = _mm256_mul_ps(c[0], _mm256_loadu_ps(xb));
            s = _mm256_fmadd_ps(c[1], _mm256_loadu_ps(xb + 8), s);
            s = _mm256_fmadd_ps(c[2], _mm256_loadu_ps(xb + 16), s);
            s = _mm256_fmadd_ps(c[3], _mm256_loadu_ps(xb + 24), s);
            acc[t] = _mm256_fmadd_ps(s, vd, acc[t]);
        }
    }
    if (fmt != FMT_Q8_0) /* the m' * sum(x) terms, one short dot product per token */
        for (int t = 0; t < TT; t++)
            for (int64_t blk = 0; blk < nb; blk++) macc[t] += mr[blk] * xsum[t * nb + blk];
    for (int t = 0; t < TT; t++) out[t * out_stride] = hsum(acc[t]) + macc[t] + b;
#else
    float acc[8] = {0};
    for (int64_t blk = 0; blk < nb; blk++) {
        const uint8_t *qb = row_q + blk * qbytes;
        for (int t = 0; t < TT; t++) {
            const float *xb = x + t * x_stride + blk * 32;
            float s = 0.0f;
            for (int j = 0; j < 32; j++) s += code_scalar(fmt, qb, j) * xb[j];
            acc[t] += s * dr[blk];
            macc[t] += mr[blk] * xsum[t * nb + blk];
        }
    }
    for (int t = 0; t < TT; t++) out[t * out_stride] = acc[t] + macc[t] + b;
#endif
}

/* All T tokens of one row, in tiles of 8, 4, 2 and 1 tokens. */
ALWAYS_INLINE void row_all(const int fmt, const uint8_t *row_q, int64_t nb, const float *dr,
                           const float *mr, const float *x, int64_t x_stride, int64_t T,
                           const float *xsum, float *out, int64_t out_stride, float b) {
    int64_t t = 0;
    for (; t + 8 <= T; t += 8)
        row_tile(fmt, 8, row_q, nb, dr, mr, x + t * x_stride, x_stride, xsum + t * nb,
                 out + t * out_stride, out_stride, b);
    if (t + 4 <= T) {
        row_tile(fmt, 4, row_q, nb, dr, mr, x + t * x_stride, x_stride, xsum + t * nb,
                 out + t * out_stride, out_stride, b);
        t += 4;
    }
    if (t + 2 <= T) {
        row_tile(fmt, 2, row_q, nb, dr, mr, x + t * x_stride, x_stride, xsum + t * nb,
                 out + t * out_stride, out_stride, b);
        t += 2;
    }
    if (t < T)
        row_tile(fmt, 1, row_q, nb, dr, mr, x + t * x_stride, x_stride, xsum + t * nb,
                 out + t * out_stride, out_stride, b);
}

/* A linear layer as the decode step sees it: float32 rows or a GGUF block format. */
enum { FMT_F32 = -1 };
typedef struct {
    int32_t fmt, pad;
    int64_t n, k;
    const void *w;         /* float32 [n, k], or the codes [n, k/32, qbytes] */
    const uint16_t *d, *m; /* fp16 bits [n, k/32] (GGUF) */
    const float *bias;     /* [n] or NULL */
} ps_linear_t;

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
    const int fmt = L->fmt;
    const int64_t nb = L->k / 32, qbytes = fmt == FMT_Q8_0 ? 32 : 16;
    const uint8_t *row_q = (const uint8_t *)L->w + n * nb * qbytes;
    float *dr = dm, *mr = dm + nb;
    for (int64_t blk = 0; blk < nb; blk++) {
        dr[blk] = half_to_float(L->d[n * nb + blk]);
        mr[blk] = fmt == FMT_Q4_1 ? half_to_float(L->m[n * nb + blk])
                  : fmt == FMT_Q4_0 ? -8.0f * dr[blk] : 0.0f;
    }
    if (fmt == FMT_Q4_0)
        row_all(FMT_Q4_0, row_q, nb, dr, mr, x, x_stride, T, xsum, o, out_stride, b);
    else if (fmt == FMT_Q4_1)
        row_all(FMT_Q4_1, row_q, nb, dr, mr, x, x_stride, T, xsum, o, out_stride, b);
    else
        row_all(FMT_Q8_0, row_q, nb, dr, mr, x, x_stride, T, xsum, o, out_stride, b);
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

int ps_gguf_linear(int fmt, const float *x, int64_t x_stride, int64_t T, int64_t K,
                   const uint8_t *qs, const uint16_t *d, const uint16_t *m, int64_t N,
                   const float *bias, float *out, int64_t out_stride, int nthreads) {
    const ps_linear_t L = {fmt, 0, N, K, qs, d, m, bias};
    const int64_t nb = K / 32;
    float *xsum = malloc(sizeof(float) * (size_t)(T * nb + 1));
    if (!xsum) return -1;
    block_sums(x, x_stride, 0, T, K, xsum);
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        float *dm = malloc(sizeof(float) * 2 * (size_t)(nb + 1)); /* this row's d and m' */
        if (!dm) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++)
            if (dm) linear_row(&L, n, x, x_stride, T, xsum, out, out_stride, dm);
        free(dm);
    }
    free(xsum);
    return failed ? -1 : 0;
}

/* Rows of a packed table expanded to float32: out[i, :] = W[ids[i], :] (embedding lookup). */
void ps_gguf_rows(int fmt, const int64_t *ids, int64_t n_ids, int64_t K, const uint8_t *qs,
                  const uint16_t *d, const uint16_t *m, float *out) {
    const int64_t nb = K / 32, qbytes = fmt == FMT_Q8_0 ? 32 : 16;
    for (int64_t i = 0; i < n_ids; i++) {
        const int64_t n = ids[i];
        for (int64_t blk = 0; blk < nb; blk++)
            expand_block_scalar(fmt, qs + (n * nb + blk) * qbytes, half_to_float(d[n * nb + blk]),
                                m ? half_to_float(m[n * nb + blk]) : 0.0f, out + i * K + blk * 32);
    }
}

/* Rows [r0, r1) of a packed weight expanded to float32 into out [r1 - r0, K], the values the
 * reference dequantization gives (for prefill: the caller multiplies them with BLAS). */
void ps_gguf_dequant_rows(int fmt, const uint8_t *qs, const uint16_t *d, const uint16_t *m,
                          int64_t K, int64_t r0, int64_t r1, float *out, int nthreads) {
    const int64_t nb = K / 32, qbytes = fmt == FMT_Q8_0 ? 32 : 16;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t n = r0; n < r1; n++)
        for (int64_t blk = 0; blk < nb; blk++)
            expand_block_scalar(fmt, qs + (n * nb + blk) * qbytes, half_to_float(d[n * nb + blk]),
                                m ? half_to_float(m[n * nb + blk]) : 0.0f,
                                out + (n - r0) * K + blk * 32);
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
    const size_t floats = (size_t)R * (size_t)(2 * H + QKV + Hq * D + 2 * I + I + kmax / 32 + 1);
    float *buf = malloc(sizeof(float) * floats);
    if (!buf) return -1;
    float *resid = buf, *x = resid + R * H, *qkv = x + R * H, *att = qkv + R * QKV;
    float *gu = att + R * Hq * D, *act = gu + R * 2 * I, *xsum = act + R * I;
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        float *dm = malloc(sizeof(float) * (size_t)(2 * (kmax / 32 + 1)));
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
                    block_sums(x, H, r, r + 1, H, xsum);
                }
                PROFILE_MARK(PH_NORM);
#pragma omp for schedule(static)
                for (int64_t n = 0; n < QKV; n++) linear_row(&L->qkv, n, x, H, R, xsum, qkv, QKV, dm);
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
                for (int64_t r = 0; r < R; r++) block_sums(att, Hq * D, r, r + 1, Hq * D, xsum);
                PROFILE_MARK(PH_O);
#pragma omp for schedule(static)
                for (int64_t n = 0; n < H; n++) linear_row(&L->o, n, att, Hq * D, R, xsum, hidden, H, dm);
                PROFILE_MARK(PH_O);
#pragma omp for schedule(static)
                for (int64_t r = 0; r < R; r++) { /* residual and post-attention norm */
                    float *res = resid + r * H, *h = hidden + r * H;
                    for (int64_t i = 0; i < H; i++) res[i] += h[i];
                    rms_row(res, L->post_norm, M->eps, H, x + r * H);
                    block_sums(x, H, r, r + 1, H, xsum);
                }
                PROFILE_MARK(PH_NORM);
#pragma omp for schedule(static)
                for (int64_t n = 0; n < 2 * I; n++) linear_row(&L->gate_up, n, x, H, R, xsum, gu, 2 * I, dm);
                PROFILE_MARK(PH_GATE_UP);
#pragma omp for schedule(static)
                for (int64_t r = 0; r < R; r++) { /* silu(gate) * up */
                    const float *g = gu + r * 2 * I, *u = g + I;
                    float *a = act + r * I;
                    for (int64_t i = 0; i < I; i++) a[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
                    block_sums(act, I, r, r + 1, I, xsum);
                }
                PROFILE_MARK(PH_ACT);
#pragma omp for schedule(static)
                for (int64_t n = 0; n < H; n++) linear_row(&L->down, n, act, I, R, xsum, hidden, H, dm);
                PROFILE_MARK(PH_DOWN);
            }
#pragma omp for schedule(static)
            for (int64_t r = 0; r < R; r++) { /* final norm */
                float *res = resid + r * H, *h = hidden + r * H;
                for (int64_t i = 0; i < H; i++) res[i] += h[i];
                rms_row(res, M->final_norm, M->eps, H, x + r * H);
                block_sums(x, H, r, r + 1, H, xsum);
            }
            PROFILE_MARK(PH_NORM);
#pragma omp for schedule(static)
            for (int64_t n = 0; n < M->lm_head.n; n++)
                linear_row(&M->lm_head, n, x, H, R, xsum, logits, M->lm_head.n, dm);
            PROFILE_MARK(PH_LM_HEAD);
        }
        free(dm);
        free(scores);
    }
    free(buf);
    return failed ? -1 : 0;
}
