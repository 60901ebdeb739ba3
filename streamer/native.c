/* One-row matmuls of resident decode, written for AVX-512 (BF16 and VNNI): reading the weights is their whole
 * cost, and these read them faster than torch's kernels do here (native.py gives the figures). Built by native.py
 * at first use with -fopenmp; its OpenMP runtime is then the one torch has loaded, so the two share one pool of
 * threads. Each thread takes every output row of its share, 4 rows at a time, each row's products summed
 * in its own accumulator along the whole input: 2 or 8 rows at a time read slower (k3.py). */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* float to bfloat16, rounding to nearest even as torch does (NaN stays NaN) */
static inline uint16_t bf16_round(float f) {
    uint32_t b;
    memcpy(&b, &f, 4);
    if ((b & 0x7fffffff) > 0x7f800000)
        return (uint16_t)((b >> 16) | 0x40);
    return (uint16_t)((b + 0x7fff + ((b >> 16) & 1)) >> 16);
}

/* Up to 4 rows of a bf16 gemv: y[r] = bf16(sum_k w[r * ld + k] x[k]), products and sums in float32. */
static inline void rows_bf16(const uint16_t *w, int64_t ld, const uint16_t *x, uint16_t *y, int n, int64_t in) {
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    int64_t k = 0;
    for (; k + 32 <= in; k += 32) {
        __m512bh xv = (__m512bh)_mm512_loadu_si512(x + k);
        for (int r = 0; r < 4; r++)  /* unrolled, the accumulators in registers */
            if (r < n)
                acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_loadu_si512(w + r * ld + k), xv);
    }
    if (k < in) {  /* the tail, zeros past it: masked loads throughout read 30 GB/s against 46-48 (k10.py) */
        __mmask32 m = ((__mmask32)1 << (in - k)) - 1;
        __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(m, x + k);
        for (int r = 0; r < n; r++)
            acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_maskz_loadu_epi16(m, w + r * ld + k), xv);
    }
    for (int r = 0; r < n; r++)
        y[r] = bf16_round(_mm512_reduce_add_ps(acc[r]));
}

/* Up to 4 rows of an int8 gemv, exact in int32: y[r] = sum_k w[r * ld + k] x[k], given sx = sum_k x[k].
 * VNNI multiplies unsigned by signed bytes: w + 128 (its top bit flipped) times x, less 128 sx, is the same
 * exact sum; flipping w read 57-62 GB/s where negating w where x < 0 read 49-54 (k5.py). */
static inline void rows_int8(const int8_t *w, int64_t ld, const int8_t *x, int32_t *y, int n, int64_t in, int32_t sx) {
    __m512i acc[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    int64_t k = 0;
    for (; k + 64 <= in; k += 64) {
        __m512i xv = _mm512_loadu_si512(x + k);
        for (int r = 0; r < 4; r++)
            if (r < n)
                acc[r] = _mm512_dpbusd_epi32(acc[r], _mm512_xor_si512(_mm512_loadu_si512(w + r * ld + k), flip), xv);
    }
    if (k < in) {  /* the tail: x is 0 past it */
        __mmask64 m = ((__mmask64)1 << (in - k)) - 1;
        __m512i xv = _mm512_maskz_loadu_epi8(m, x + k);
        for (int r = 0; r < n; r++)
            acc[r] = _mm512_dpbusd_epi32(acc[r], _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, w + r * ld + k), flip), xv);
    }
    for (int r = 0; r < n; r++)
        y[r] = _mm512_reduce_add_epi32(acc[r]) - 128 * sx;
}

/* The pieces' products in one parallel region: piece j is the matrix at w[j] ([rows[j], in], row stride ld[j]),
 * times x + j * xs (xs = 0: one x for all), into y + yoff[j]. The threads split all pieces' 4-row blocks evenly,
 * in order: block b of the whole is block b - first[j] of piece j. A call per piece cost ~6 us and a fork. */
typedef struct {
    int n;
    const int64_t *rows;
    int j;
    int64_t b, first;  /* the next block, and piece j's first */
} walk;

/* Thread t's first block of nt threads' share, and its end. */
static walk walk_from(int n, const int64_t *rows, int64_t *end) {
    int64_t total = 0;
    for (int j = 0; j < n; j++)
        total += (rows[j] + 3) / 4;
    int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
    *end = total * (t + 1) / nt;
    walk it = {n, rows, 0, total * t / nt, 0};
    return it;
}

/* Piece and row of the next block before end (advancing past it), and its row count; 0 when done. */
static int walk_next(walk *it, int64_t end, int *j, int64_t *row) {
    if (it->b >= end)
        return 0;
    while (it->b >= it->first + (it->rows[it->j] + 3) / 4)
        it->first += (it->rows[it->j++] + 3) / 4;
    *j = it->j;
    *row = 4 * (it->b++ - it->first);
    return it->rows[*j] - *row < 4 ? (int)(it->rows[*j] - *row) : 4;
}

void gemv_bf16(int n, const void *const *w, const int64_t *ld, const int64_t *rows, const int64_t *yoff,
               const uint16_t *x, int64_t xs, uint16_t *y, int64_t in, int threads) {
#pragma omp parallel num_threads(threads)
    {
        int64_t end, row;
        int j, r;
        walk it = walk_from(n, rows, &end);
        while ((r = walk_next(&it, end, &j, &row)))
            rows_bf16((const uint16_t *)w[j] + row * ld[j], ld[j], x + j * xs, y + yoff[j] + row, r, in);
    }
}

void gemv_int8(int n, const void *const *w, const int64_t *ld, const int64_t *rows, const int64_t *yoff,
               const int8_t *x, int64_t xs, int32_t *y, int64_t in, int threads) {
    int32_t *sx = malloc(sizeof(int32_t) * n);
    for (int j = 0; j < n; j++) {
        sx[j] = 0;
        for (int64_t k = 0; k < in && (j == 0 || xs); k++)
            sx[j] += x[j * xs + k];
        if (!xs)
            sx[j] = sx[0];
    }
#pragma omp parallel num_threads(threads)
    {
        int64_t end, row;
        int j, r;
        walk it = walk_from(n, rows, &end);
        while ((r = walk_next(&it, end, &j, &row)))
            rows_int8((const int8_t *)w[j] + row * ld[j], ld[j], x + j * xs, y + yoff[j] + row, r, in, sx[j]);
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
