/* Resident decode's one-row matmuls (bf16, int8, int4), whose whole cost is reading the weights, and bf16 attention
 * of decode rows and prompt chunks, written for AVX-512 (BF16, VNNI, VBMI): faster here than torch's kernels
 * (native.py gives the figures). Built by native.py at first use with -fopenmp; its OpenMP runtime is then the one
 * torch has loaded, so the two share one pool of threads. A thread takes its share of output rows (in blocks of 4;
 * 64 for int4) and reads them in order, one sequential stream. */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* bfloat16 to float, exactly */
static inline float bf16_float(uint16_t h) {
    uint32_t b = (uint32_t)h << 16;
    float f;
    memcpy(&f, &b, 4);
    return f;
}

/* float to bfloat16, rounding to nearest even as torch does (NaN stays NaN) */
static inline uint16_t bf16_round(float f) {
    uint32_t b;
    memcpy(&b, &f, 4);
    if ((b & 0x7fffffff) > 0x7f800000)
        return (uint16_t)((b >> 16) | 0x40);
    return (uint16_t)((b + 0x7fff + ((b >> 16) & 1)) >> 16);
}

/* Rows of a bf16 gemv, one at a time: y[r] = bf16(sum_k w[r * ld + k] x[k]), products and sums in float32, in 4
 * accumulators along k, so each thread reads one sequential stream: 69-81 GB/s where 4 rows interleaved read 59-62
 * and a plain read 69-78 (k16.py). */
static inline void rows_bf16(const uint16_t *w, int64_t ld, const uint16_t *x, uint16_t *y, int n, int64_t in) {
    for (int r = 0; r < n; r++, w += ld) {
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        int64_t k = 0;
        for (; k + 128 <= in; k += 128) {
            a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(w + k), (__m512bh)_mm512_loadu_si512(x + k));
            a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(w + k + 32), (__m512bh)_mm512_loadu_si512(x + k + 32));
            a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(w + k + 64), (__m512bh)_mm512_loadu_si512(x + k + 64));
            a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(w + k + 96), (__m512bh)_mm512_loadu_si512(x + k + 96));
        }
        for (; k + 32 <= in; k += 32)
            a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(w + k), (__m512bh)_mm512_loadu_si512(x + k));
        if (k < in) {  /* the tail, zeros past it: masked loads throughout read 30 GB/s against 46-48 (k10.py) */
            __mmask32 m = ((__mmask32)1 << (in - k)) - 1;
            a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_maskz_loadu_epi16(m, w + k), (__m512bh)_mm512_maskz_loadu_epi16(m, x + k));
        }
        y[r] = bf16_round(_mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3))));
    }
}

/* Rows of an int8 gemv, one at a time as rows_bf16, exact in int32: y[r] = sum_k w[r * ld + k] x[k], given
 * sx = sum_k x[k]. VNNI multiplies unsigned by signed bytes: w + 128 (its top bit flipped) times x, less 128 sx, is
 * the same exact sum; flipping w read 57-62 GB/s where negating w where x < 0 read 49-54 (k5.py). */
static inline void rows_int8(const int8_t *w, int64_t ld, const int8_t *x, int32_t *y, int n, int64_t in, int32_t sx) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    for (int r = 0; r < n; r++, w += ld) {
        __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
        int64_t k = 0;
        for (; k + 256 <= in; k += 256) {
            a0 = _mm512_dpbusd_epi32(a0, _mm512_xor_si512(_mm512_loadu_si512(w + k), flip), _mm512_loadu_si512(x + k));
            a1 = _mm512_dpbusd_epi32(a1, _mm512_xor_si512(_mm512_loadu_si512(w + k + 64), flip), _mm512_loadu_si512(x + k + 64));
            a2 = _mm512_dpbusd_epi32(a2, _mm512_xor_si512(_mm512_loadu_si512(w + k + 128), flip), _mm512_loadu_si512(x + k + 128));
            a3 = _mm512_dpbusd_epi32(a3, _mm512_xor_si512(_mm512_loadu_si512(w + k + 192), flip), _mm512_loadu_si512(x + k + 192));
        }
        for (; k + 64 <= in; k += 64)
            a0 = _mm512_dpbusd_epi32(a0, _mm512_xor_si512(_mm512_loadu_si512(w + k), flip), _mm512_loadu_si512(x + k));
        if (k < in) {  /* the tail: x is 0 past it */
            __mmask64 m = ((__mmask64)1 << (in - k)) - 1;
            a0 = _mm512_dpbusd_epi32(a0, _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, w + k), flip), _mm512_maskz_loadu_epi8(m, x + k));
        }
        y[r] = _mm512_reduce_add_epi32(_mm512_add_epi32(_mm512_add_epi32(a0, a1), _mm512_add_epi32(a2, a3))) - 128 * sx;
    }
}

/* The pieces' products in one parallel region: piece j is the matrix at w[j] ([rows[j], in], row stride ld[j]),
 * times x + j * xs (xs = 0: one x for all), into y + yoff[j]. The threads split all pieces' blocks of `size` rows
 * (4; int4: 64) evenly, in order: block b of the whole is block b - first of piece j. A call per piece cost ~6 us
 * and a fork. */
typedef struct {
    const int64_t *rows;
    int64_t size;
    int j;
    int64_t b, first;  /* the next block, and piece j's first */
} walk;

/* This thread's first block of its share, and its end. */
static walk walk_from(int n, const int64_t *rows, int64_t size, int64_t *end) {
    int64_t total = 0;
    for (int j = 0; j < n; j++)
        total += (rows[j] + size - 1) / size;
    int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
    *end = total * (t + 1) / nt;
    walk it = {rows, size, 0, total * t / nt, 0};
    return it;
}

/* Piece and row of the next block before end (advancing past it), and its row count; 0 when done. */
static int walk_next(walk *it, int64_t end, int *j, int64_t *row) {
    if (it->b >= end)
        return 0;
    while (it->b >= it->first + (it->rows[it->j] + it->size - 1) / it->size)
        it->first += (it->rows[it->j++] + it->size - 1) / it->size;
    *j = it->j;
    *row = it->size * (it->b++ - it->first);
    return it->rows[*j] - *row < it->size ? (int)(it->rows[*j] - *row) : (int)it->size;
}

void gemv_bf16(int n, const void *const *w, const int64_t *ld, const int64_t *rows, const int64_t *yoff,
               const uint16_t *x, int64_t xs, uint16_t *y, int64_t in, int threads) {
#pragma omp parallel num_threads(threads)
    {
        int64_t end, row;
        int j, r;
        walk it = walk_from(n, rows, 4, &end);
        while ((r = walk_next(&it, end, &j, &row)))
            rows_bf16((const uint16_t *)w[j] + row * ld[j], ld[j], x + j * xs, y + yoff[j] + row, r, in);
    }
}

void gemv_int8(int n, const void *const *w, const int64_t *ld, const int64_t *rows, const int64_t *yoff,
               const int8_t *x, int64_t xs, int32_t *y, int64_t in, int threads) {
    int32_t *sx = calloc(xs ? n : 1, sizeof(int32_t));  /* each x's sum */
    for (int j = 0; j < (xs ? n : 1); j++)
        for (int64_t k = 0; k < in; k++)
            sx[j] += x[j * xs + k];
#pragma omp parallel num_threads(threads)
    {
        int64_t end, row;
        int j, r;
        walk it = walk_from(n, rows, 4, &end);
        while ((r = walk_next(&it, end, &j, &row)))
            rows_int8((const int8_t *)w[j] + row * ld[j], ld[j], x + j * xs, y + yoff[j] + row, r, in, sx[xs ? j : 0]);
    }
    free(sx);
}

/* bf16 [n] to float32, exactly */
static inline __m512 bf16_load(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* Decode attention of D sequences, one new token each, as kernels._decode_attention computes it: q [D, H, hd]
 * (contiguous); sequence d's keys and values at k + d * sd + s * ss + g * sg (and v alike) for positions
 * s < ends[d] and kv heads g; query head h reads kv head h / (H / KV). Scores, softmax and the weighted sum of
 * values in float32, rounded to bf16 once, into out [D, H * hd]. hd % 16 == 0. The threads split the (sequence,
 * kv head) pairs. */
void attend_bf16(int D, int H, int KV, int hd, const uint16_t *q, const uint16_t *k, const uint16_t *v, int64_t sd,
                 int64_t ss, int64_t sg, const int64_t *ends, uint16_t *out, float scale, int threads) {
    int64_t most = 0;
    for (int d = 0; d < D; d++)
        most = ends[d] > most ? ends[d] : most;
#pragma omp parallel num_threads(threads)
    {
        float *p = malloc(sizeof(float) * (most > 0 ? most : 1)), acc[512];
#pragma omp for schedule(static)
        for (int dg = 0; dg < D * KV; dg++) {
            int d = dg / KV, g = dg % KV;
            int64_t end = ends[d];
            const uint16_t *kd = k + d * sd + g * sg, *vd = v + d * sd + g * sg;
            for (int h = g * (H / KV); h < (g + 1) * (H / KV); h++) {
                const uint16_t *qh = q + ((int64_t)d * H + h) * hd;
                float top = -INFINITY, sum = 0;
                for (int64_t s = 0; s < end; s++) {
                    __m512 dot = _mm512_setzero_ps();
                    for (int i = 0; i < hd; i += 16)
                        dot = _mm512_fmadd_ps(bf16_load(kd + s * ss + i), bf16_load(qh + i), dot);
                    p[s] = _mm512_reduce_add_ps(dot) * scale;
                    top = p[s] > top ? p[s] : top;
                }
                for (int64_t s = 0; s < end; s++)
                    sum += (p[s] = expf(p[s] - top));
                for (int i = 0; i < hd; i++)
                    acc[i] = 0;
                for (int64_t s = 0; s < end; s++) {
                    __m512 w = _mm512_set1_ps(p[s] / sum);
                    for (int i = 0; i < hd; i += 16)
                        _mm512_storeu_ps(acc + i, _mm512_fmadd_ps(w, bf16_load(vd + s * ss + i), _mm512_loadu_ps(acc + i)));
                }
                for (int i = 0; i < hd; i++)
                    out[((int64_t)d * H + h) * hd + i] = bf16_round(acc[i]);
            }
        }
        free(p);
    }
}

/* e^x for x <= 0 (Cephes' expf: 2^n e^r, |r| <= ln 2 / 2, a degree-6 polynomial; within ~2 ulp) */
static inline __m512 exp_ps(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 y = _mm512_set1_ps(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(y, n);
}

/* All G heads' scores of 16 positions (kb: their keys, [hd, 16] float32), two chains each along hd, into ps + h * Sp;
 * masked lanes -inf. Inlined per G and hd, so that the accumulators stay in registers. */
static inline __attribute__((always_inline)) void scores16(const float *kb, const float (*qs)[512], int G, int hd,
                                                          __mmask16 m, float *ps, int64_t Sp) {
    __m512 a[8][2];
    for (int h = 0; h < G; h++)
        a[h][0] = a[h][1] = _mm512_setzero_ps();
    for (int i = 0; i < hd; i += 2) {
        __m512 k0 = _mm512_load_ps(kb + i * 16), k1 = _mm512_load_ps(kb + (i + 1) * 16);
        for (int h = 0; h < G; h++) {
            a[h][0] = _mm512_fmadd_ps(_mm512_set1_ps(qs[h][i]), k0, a[h][0]);
            a[h][1] = _mm512_fmadd_ps(_mm512_set1_ps(qs[h][i + 1]), k1, a[h][1]);
        }
    }
    for (int h = 0; h < G; h++)
        _mm512_store_ps(ps + h * Sp, _mm512_mask_blend_ps(m, _mm512_set1_ps(-INFINITY), _mm512_add_ps(a[h][0], a[h][1])));
}

/* o[hd] = bf16(sum over s < n of p[s] * vg[s, :] * inv), hd / 16 accumulators (inlined per hd: in registers) */
static inline __attribute__((always_inline)) void weigh16(const float *vg, const float *p, int64_t n, int hd, float inv,
                                                         uint16_t *o) {
    __m512 acc[32];
    for (int i = 0; i < hd / 16; i++)
        acc[i] = _mm512_setzero_ps();
    for (int64_t s = 0; s < n; s++) {
        __m512 w = _mm512_set1_ps(p[s]);
        for (int i = 0; i < hd / 16; i++)
            acc[i] = _mm512_fmadd_ps(w, _mm512_loadu_ps(vg + s * hd + 16 * i), acc[i]);
    }
    for (int i = 0; i < hd / 16; i++) {
        float f[16];
        _mm512_storeu_ps(f, _mm512_mul_ps(acc[i], _mm512_set1_ps(inv)));
        for (int j = 0; j < 16; j++)
            o[16 * i + j] = bf16_round(f[j]);
    }
}

/* Causal attention of one sequence's T new rows (a prompt's chunk): q [T, H, hd] (contiguous) at positions
 * start .. start + T - 1; keys and values at k + s * ss + g * sg (v alike) for positions s < start + T and kv heads
 * g; row t sees positions s <= start + t, and query head h reads kv head h / (H / KV). Scores, softmax and the
 * weighted sum of values in float32, rounded to bf16 once, into out [T, H * hd]; hd % 16 == 0, H / KV <= 8. work
 * holds KV * hd * Sp + KV * S * hd + threads * H / KV * Sp floats, 64-byte aligned (S = start + T, Sp = S rounded
 * up to 16): each kv head's keys in float32, 16 positions at a time transposed ([Sp / 16, hd, 16]: the scores of
 * 16 positions are then 16-wide multiply-adds down hd, reading 64 contiguous bytes each), its values in float32,
 * and each thread's scores for a row's heads. The threads split the (row, kv head) pairs cyclically, since later
 * rows see more positions. */
void attend_prefill_bf16(int T, int64_t start, int H, int KV, int hd, const uint16_t *q, const uint16_t *k,
                         const uint16_t *v, int64_t ss, int64_t sg, uint16_t *out, float scale, float *work,
                         int threads) {
    int64_t S = start + T, Sp = (S + 15) / 16 * 16;
    float *kt = work, *vf = kt + KV * hd * Sp;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t gs = 0; gs < KV * Sp; gs++) {
            int64_t g = gs / Sp, s = gs % Sp;
            float *blk = kt + ((g * (Sp / 16) + s / 16) * hd) * 16 + s % 16;
            for (int i = 0; i < hd; i++)
                blk[i * 16] = s < S ? bf16_float(k[s * ss + g * sg + i]) : 0.0f;
            for (int i = 0; s < S && i < hd; i += 16)
                _mm512_storeu_ps(vf + (g * S + s) * hd + i, bf16_load(v + s * ss + g * sg + i));
        }
        int G = H / KV;
        float *ps = vf + KV * S * hd + omp_get_thread_num() * G * Sp, qs[8][512];
#pragma omp for schedule(static, 1)
        for (int64_t tg = 0; tg < (int64_t)T * KV; tg++) {
            int64_t t = tg / KV, g = tg % KV, n = start + t + 1;  /* positions row t sees */
            const float *vg = vf + g * S * hd;
            for (int h = 0; h < G; h++)
                for (int i = 0; i < hd; i++)
                    qs[h][i] = bf16_float(q[(t * H + g * G + h) * hd + i]) * scale;
            for (int64_t s = 0; s < n; s += 16) {  /* all G heads' scores at once: each key value is loaded once */
                const float *kb = kt + (g * (Sp / 16) + s / 16) * hd * 16;
                __mmask16 m = n - s >= 16 ? 0xffff : (__mmask16)((1u << (n - s)) - 1);
                float *p = ps + s;
                if (hd == 128 && G == 4)
                    scores16(kb, (const float (*)[512])qs, 4, 128, m, p, Sp);
                else if (hd == 128 && G == 8)
                    scores16(kb, (const float (*)[512])qs, 8, 128, m, p, Sp);
                else if (hd == 64 && G == 4)
                    scores16(kb, (const float (*)[512])qs, 4, 64, m, p, Sp);
                else
                    scores16(kb, (const float (*)[512])qs, G, hd, m, p, Sp);
            }
            for (int hh = 0; hh < G; hh++) {
                int h = g * G + hh;
                float *p = ps + hh * Sp;
                __m512 top = _mm512_set1_ps(-INFINITY), sum = _mm512_setzero_ps();
                for (int64_t s = 0; s < n; s += 16)
                    top = _mm512_max_ps(top, _mm512_load_ps(p + s));
                __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(top));
                for (int64_t s = 0; s < n; s += 16) {
                    __mmask16 m = n - s >= 16 ? 0xffff : (__mmask16)((1u << (n - s)) - 1);
                    __m512 e = _mm512_maskz_mov_ps(m, exp_ps(_mm512_sub_ps(_mm512_load_ps(p + s), mx)));
                    _mm512_store_ps(p + s, e);
                    sum = _mm512_add_ps(sum, e);
                }
                float inv = 1.0f / _mm512_reduce_add_ps(sum);
                uint16_t *o = out + (t * H + h) * hd;
                if (hd == 128)
                    weigh16(vg, p, n, 128, inv, o);
                else if (hd == 64)
                    weigh16(vg, p, n, 64, inv, o);
                else
                    weigh16(vg, p, n, hd, inv, o);
            }
        }
    }
}

/* One row's int4 products on torch's CPU int4 layout (quant.py: torch._convert_weight_to_int4pack_for_cpu), with x
 * quantized to int8 a group at a time, as llama.cpp's Q4_0 x Q8_0 products are. Piece j: codes at w[j] ([rows[j],
 * in / 2] uint8: for each block of 64 rows and each input k, 32 bytes, row i's code in byte i's low nibble, row
 * 32 + i's in its high one) and their scales and zeros at sz[j] ([in / group, rows[j], 2] bf16: w = (q - 8) * scale
 * + zero), times x + j * xs (xs = 0: one x for all), into y + yoff[j]. So y[n] = sum over groups g of
 * scale * sx_g * sum_k (q - 8) xq_k + zero * sum_k x_k, with xq = round(x / sx_g), the integer sums exact (VNNI, 4
 * inputs of a row per 32-bit lane, gathered by one byte permute per 16 rows), rounded to bf16 once. rows[j] % 64
 * == 0, group % 4 == 0, in % group == 0. The threads split all pieces' 64-row blocks evenly, in order. */
typedef struct {
    int8_t *q;                 /* [in] */
    float *sx, *xsum, *qsum;   /* [in / group] each: x's int8 step, sum of x, 8 * sum of xq */
} qx;

static void quantize_x(const uint16_t *x, int64_t in, int64_t group, qx *o) {
    for (int64_t g = 0; g < in / group; g++) {
        float top = 0, sum = 0;
        int32_t isum = 0;
        for (int64_t k = g * group; k < (g + 1) * group; k++) {
            float v = bf16_float(x[k]);
            top = fabsf(v) > top ? fabsf(v) : top;
            sum += v;
        }
        o->sx[g] = top / 127;
        for (int64_t k = g * group; k < (g + 1) * group; k++) {
            o->q[k] = top > 0 ? (int8_t)nearbyintf(bf16_float(x[k]) / o->sx[g]) : 0;
            isum += o->q[k];
        }
        o->xsum[g] = sum;
        o->qsum[g] = (float)(8 * isum);  /* the -8 of every code, times this group's xq */
    }
}

static inline void block_int4(const uint8_t *pb, const uint16_t *sz, int64_t rows, const qx *x, uint16_t *y,
                              int64_t in, int64_t group, __m512i ilo, __m512i ihi) {
    const __m512i nib = _mm512_set1_epi8(0x0f), zmask = _mm512_set1_epi32((int)0xffff0000);
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t g = 0; g < in / group; g++) {
        __m512i sum[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
        /* the scales two groups on, rows * 4 bytes apart, which no prefetcher guesses: prefetched, the kernel read
         * 38.6-40.4 GB/s against 36.5-36.9 without and a plain read of 42.2-42.7 (k19.py) */
        if (g + 2 < in / group)
            for (int i = 0; i < 256; i += 64)
                _mm_prefetch((const char *)(sz + (g + 2) * rows * 2) + i, _MM_HINT_T0);
        for (int64_t k = g * group; k < (g + 1) * group; k += 4) {
            /* the bytes permuted first, then split: a byte's two nibbles are rows r and 32 + r alike (2 permutes a
             * quad, not 4, at the same speed: 36-38 GB/s either way against a plain read of 43-46, k19.py) */
            __m512i a = _mm512_loadu_si512(pb + k * 32), c = _mm512_loadu_si512(pb + k * 32 + 64);
            __m512i p0 = _mm512_permutex2var_epi8(a, ilo, c), p1 = _mm512_permutex2var_epi8(a, ihi, c);
            int32_t quad;
            memcpy(&quad, x->q + k, 4);
            __m512i xv = _mm512_set1_epi32(quad);
            sum[0] = _mm512_dpbusd_epi32(sum[0], _mm512_and_si512(p0, nib), xv);
            sum[1] = _mm512_dpbusd_epi32(sum[1], _mm512_and_si512(p1, nib), xv);
            sum[2] = _mm512_dpbusd_epi32(sum[2], _mm512_and_si512(_mm512_srli_epi16(p0, 4), nib), xv);
            sum[3] = _mm512_dpbusd_epi32(sum[3], _mm512_and_si512(_mm512_srli_epi16(p1, 4), nib), xv);
        }
        const uint16_t *s = sz + g * rows * 2;  /* 64 rows' (scale, zero), 16 rows a vector */
        for (int q = 0; q < 4; q++) {
            __m512i pair = _mm512_loadu_si512(s + 32 * q);
            __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(pair, 16));
            __m512 zero = _mm512_castsi512_ps(_mm512_and_si512(pair, zmask));
            __m512 t = _mm512_sub_ps(_mm512_cvtepi32_ps(sum[q]), _mm512_set1_ps(x->qsum[g]));
            acc[q] = _mm512_fmadd_ps(_mm512_mul_ps(scale, _mm512_set1_ps(x->sx[g])), t, acc[q]);
            acc[q] = _mm512_fmadd_ps(zero, _mm512_set1_ps(x->xsum[g]), acc[q]);
        }
    }
    for (int q = 0; q < 4; q++) {
        float out[16];
        _mm512_storeu_ps(out, acc[q]);
        for (int i = 0; i < 16; i++)
            y[16 * q + i] = bf16_round(out[i]);
    }
}

void gemv_int4(int n, const void *const *w, const void *const *sz, const int64_t *rows, const int64_t *yoff,
               const uint16_t *x, int64_t xs, uint16_t *y, int64_t in, int64_t group, int threads) {
    int nx = xs ? n : 1, groups = (int)(in / group);
    qx *xq = malloc(sizeof(qx) * nx);
    int8_t *codes = malloc(in * nx);
    float *f = malloc(sizeof(float) * 3 * groups * nx);
    for (int j = 0; j < nx; j++) {
        qx o = {codes + j * in, f + 3 * groups * j, f + 3 * groups * j + groups, f + 3 * groups * j + 2 * groups};
        xq[j] = o;
        quantize_x(x + j * xs, in, group, &xq[j]);
    }
    /* lane r of a permuted vector: the codes of row r (first 16) or 16 + r for inputs k..k+3: bytes k, k+1 of the
     * first vector (its two halves), k+2, k+3 of the second (indices 64.. in the permute) */
    uint8_t lo_idx[64], hi_idx[64];
    for (int r = 0; r < 16; r++)
        for (int j = 0; j < 4; j++) {
            lo_idx[4 * r + j] = (uint8_t)((j / 2) * 64 + (j % 2) * 32 + r);
            hi_idx[4 * r + j] = (uint8_t)((j / 2) * 64 + (j % 2) * 32 + 16 + r);
        }
    const __m512i ilo = _mm512_loadu_si512(lo_idx), ihi = _mm512_loadu_si512(hi_idx);
#pragma omp parallel num_threads(threads)
    {
        int64_t end, row;
        int j;
        walk it = walk_from(n, rows, 64, &end);
        while (walk_next(&it, end, &j, &row))  /* whole blocks of 64 rows */
            block_int4((const uint8_t *)w[j] + row * (in / 2), (const uint16_t *)sz[j] + row * 2, rows[j],
                       &xq[xs ? j : 0], y + yoff[j] + row, in, group, ilo, ihi);
    }
    free(f);
    free(codes);
    free(xq);
}
