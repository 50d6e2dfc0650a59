/* Weight-only 4-bit matmul for the CPU:
 *   y[m, n] = sum_k x[m, k] * (q[n, k] * scale[n, g] + offset[n, g]),  g = k / group,
 * from the packed codes, without dequantizing the weight.
 *
 * As llama.cpp does, each row of x is first rounded to int8 in blocks of 32 inputs (one float32
 * scale per block, absmax / 127), so that the inner loop is integer multiply-adds: 32 code x
 * activation products per AVX2 instruction (maddubs), about 4x fewer instructions than converting
 * codes to float. The rounding costs about 0.5% relative output error on Gaussian inputs, about 3x
 * what bfloat16 inputs (torch's int4 kernel) cost. The offset term uses the sums of the rounded x per group, so that code and offset
 * see the same inputs: w = (q - 8) s has a large common part 8 s that then cancels exactly.
 *
 * Codes layout (lowbit's, see kernels/__init__.py): row-major, k / 2 bytes per output row; in each
 * run of 32 inputs byte i holds input i in its low nibble and input 16 + i in its high one.
 * The output rows are split over threads (OpenMP).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
/* 64 codes per step: xq is stored per 64 inputs as [0..15, 32..47, 16..31, 48..63], the order in
 * which one 32-byte load of codes yields them (low nibbles, then high), and xd holds one scale per
 * 8 inputs (each run's scale repeated over the 4 lanes its products land in) */
#define ALIGN_INPUTS 64
#define XD_STRIDE 8
#else
#define ALIGN_INPUTS 32
#define XD_STRIDE 32
#endif

/* One output row for `rows` (1..4) rows of x at once, so that each run of codes is unpacked once:
 * out[r] = sum_g s[g] * sum_{runs b in g} xd[r][b] * sum_{i in b} q[i] * xq[r][i] + o[g] * xsum[r][g].
 * The group scale is folded into the activation scales, so one vector accumulator per row of x runs
 * across the whole row (no reduction per group). */
static inline __attribute__((always_inline)) void dot_rows(const uint8_t *w, const int8_t *xq, const float *xd,
                                                          const float *xsum, const float *s, const float *o,
                                                          int64_t k, int64_t group, const int rows, float *out) {
    int64_t groups = k / group;
#if defined(__AVX2__) && defined(__FMA__)
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    const __m256i low = _mm256_set1_epi8(15);
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t g = 0; g < groups; g++) {
        const __m256 sg = _mm256_set1_ps(s[g]);
        for (int64_t c = g * group; c < (g + 1) * group; c += 64) {
            __m256i bytes = _mm256_loadu_si256((const __m256i *)(w + c / 2));
            __m256i lo = _mm256_and_si256(bytes, low);
            __m256i hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low);
            for (int r = 0; r < rows; r++) {
                const int8_t *xr = xq + r * k + c;
                __m256i sum16 =
                    _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)xr)),
                                     _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(xr + 32))));
                __m256 products = _mm256_cvtepi32_ps(_mm256_madd_epi16(sum16, ones));
                __m256 scales = _mm256_mul_ps(_mm256_loadu_ps(xd + r * (k / XD_STRIDE) + c / XD_STRIDE), sg);
                acc[r] = _mm256_fmadd_ps(products, scales, acc[r]);
            }
        }
    }
    for (int r = 0; r < rows; r++) {
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc[r]), _mm256_extractf128_ps(acc[r], 1));
        h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        h = _mm_add_ss(h, _mm_movehdup_ps(h));
        out[r] = _mm_cvtss_f32(h);
    }
#else
    for (int r = 0; r < rows; r++) {
        float total = 0;
        for (int64_t g = 0; g < groups; g++) {
            float part = 0;
            for (int64_t c = g * group; c < (g + 1) * group; c += 32) {
                int32_t run = 0;
                for (int i = 0; i < 16; i++) {
                    uint8_t b = w[c / 2 + i];
                    run += (int32_t)(b & 15) * xq[r * k + c + i] + (int32_t)(b >> 4) * xq[r * k + c + 16 + i];
                }
                part += xd[r * (k / XD_STRIDE) + c / XD_STRIDE] * (float)run;
            }
            total += s[g] * part;
        }
        out[r] = total;
    }
#endif
    for (int r = 0; r < rows; r++)
        for (int64_t g = 0; g < groups; g++) out[r] += o[g] * xsum[r * groups + g];
}

/* `rows` as a constant in each branch, so that the compiler unrolls the loops over it and keeps the
 * accumulators in registers */
static void dot_row(const uint8_t *w, const int8_t *xq, const float *xd, const float *xsum, const float *s,
                    const float *o, int64_t k, int64_t group, int rows, float *out) {
    switch (rows) {
    case 1: dot_rows(w, xq, xd, xsum, s, o, k, group, 1, out); break;
    case 2: dot_rows(w, xq, xd, xsum, s, o, k, group, 2, out); break;
    case 3: dot_rows(w, xq, xd, xsum, s, o, k, group, 3, out); break;
    default: dot_rows(w, xq, xd, xsum, s, o, k, group, 4, out); break;
    }
}

int lowbit_int4_gemm(const float *x, const uint8_t *codes, const float *scale, const float *offset, float *y,
                     int64_t m, int64_t n, int64_t k, int64_t group, int threads) {
    if (k % group || group % ALIGN_INPUTS) return 1;
    int64_t groups = k / group;
    int8_t *xq = malloc((size_t)(m * k));
    float *xd = malloc(sizeof(float) * (size_t)(m * k / XD_STRIDE));
    float *xsum = malloc(sizeof(float) * (size_t)(m * groups));
    if (!xq || !xd || !xsum) {
        free(xq), free(xd), free(xsum);
        return 2;
    }
    for (int64_t i = 0; i < m * groups; i++) xsum[i] = 0;
    for (int64_t i = 0; i < m; i++) {
        for (int64_t b = 0; b < k / 32; b++) {
            const float *v = x + i * k + b * 32;
            float amax = 0;
            for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(v[j]));
            float d = amax / 127.0f, inv = d > 0 ? 1.0f / d : 0.0f;
#if XD_STRIDE == 8
            for (int j = 0; j < 4; j++) xd[i * (k / 8) + (b / 2) * 8 + (b % 2) * 4 + j] = d;
#else
            xd[i * (k / 32) + b] = d;
#endif
            int32_t run = 0;
            for (int j = 0; j < 32; j++) {
                int8_t q = (int8_t)nearbyintf(v[j] * inv);
                run += q;
#if XD_STRIDE == 8
                /* input 32 * b + j of the 64-run b / 2: position 32 * (j / 16) + 16 * (b % 2) + j % 16 */
                xq[i * k + (b / 2) * 64 + 32 * (j / 16) + 16 * (b % 2) + j % 16] = q;
#else
                xq[i * k + b * 32 + j] = q;
#endif
            }
            xsum[i * groups + b * 32 / group] += d * (float)run;
        }
    }
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t row = 0; row < n; row++) {
        const uint8_t *w = codes + row * (k / 2);
        const float *s = scale + row * groups, *o = offset + row * groups;
        for (int64_t i = 0; i < m; i += 4) {
            int rows = m - i < 4 ? (int)(m - i) : 4;
            float out[4];
            dot_row(w, xq + i * k, xd + i * (k / XD_STRIDE), xsum + i * groups, s, o, k, group, rows, out);
            for (int r = 0; r < rows; r++) y[(i + r) * n + row] = out[r];
        }
    }
    free(xq), free(xd), free(xsum);
    return 0;
}

/* the input count that group sizes and K must be multiples of */
int lowbit_int4_alignment(void) { return ALIGN_INPUTS; }
