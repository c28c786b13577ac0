// AVX-512 (F, BW, VL) inner loops: 16 float lanes, masked tails instead of
// scalar remainders. Compiled with function-level target attributes only.
#include <immintrin.h>

#include <cstdint>

#include "cpu/simd.h"

namespace recserve::cpu {

#if defined(__x86_64__) || defined(__i386__)
#define RS_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))
namespace {

constexpr int kLanes = 16;

RS_AVX512 inline __mmask16 tail_mask(int64_t r) { return __mmask16((1u << r) - 1u); }

template <int R>
RS_AVX512 inline void dot_rows(const float* q, const float* x, int64_t ldx, int64_t d, float* out) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + kLanes <= d; j += kLanes) {
    const __m512 qj = _mm512_loadu_ps(q + j);
    for (int r = 0; r < R; ++r)
      acc[r] = _mm512_fmadd_ps(qj, _mm512_loadu_ps(x + r * ldx + j), acc[r]);
  }
  if (j < d) {
    const __mmask16 m = tail_mask(d - j);
    const __m512 qj = _mm512_maskz_loadu_ps(m, q + j);
    for (int r = 0; r < R; ++r)
      acc[r] = _mm512_fmadd_ps(qj, _mm512_maskz_loadu_ps(m, x + r * ldx + j), acc[r]);
  }
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(acc[r]);
}

RS_AVX512 int64_t score_tile_row(const float* q, float thr, const float* x, int64_t ldx,
                                 int64_t n, int64_t d, float* scores, int32_t* hits) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) dot_rows<4>(q, x + i * ldx, ldx, d, scores + i);
  for (; i < n; ++i) dot_rows<1>(q, x + i * ldx, ldx, d, scores + i);
  // Vectorised filter: almost every row loses against a warm threshold.
  const __m512 t = _mm512_set1_ps(thr);
  int64_t nh = 0;
  for (i = 0; i < n; i += kLanes) {
    const __mmask16 valid = n - i >= kLanes ? __mmask16(0xffff) : tail_mask(n - i);
    unsigned m = _mm512_mask_cmp_ps_mask(valid, _mm512_maskz_loadu_ps(valid, scores + i), t, _CMP_GT_OQ);
    while (m) {
      hits[nh++] = int32_t(i + __builtin_ctz(m));
      m &= m - 1;
    }
  }
  return nh;
}

template <int R>
RS_AVX512 inline int64_t lanes_block(const float* qt, __m512 thr, const float* x, int64_t ldx,
                                     int64_t i0, int64_t d, float* scores, int32_t* hits) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  const float* xr = x + i0 * ldx;
  for (int64_t j = 0; j < d; ++j) {
    const __m512 qj = _mm512_loadu_ps(qt + j * kLanes);
    for (int r = 0; r < R; ++r)
      acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(xr[r * ldx + j]), qj, acc[r]);
  }
  int64_t nh = 0;
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_ps(scores + (i0 + r) * kLanes, acc[r]);
    if (_mm512_cmp_ps_mask(acc[r], thr, _CMP_GT_OQ)) hits[nh++] = int32_t(i0 + r);
  }
  return nh;
}

RS_AVX512 int64_t score_tile_lanes(const float* qt, const float* thr, const float* x, int64_t ldx,
                                   int64_t n, int64_t d, float* scores, int32_t* hits) {
  const __m512 t = _mm512_loadu_ps(thr);
  int64_t nh = 0, i = 0;
  for (; i + 12 <= n; i += 12) nh += lanes_block<12>(qt, t, x, ldx, i, d, scores, hits + nh);
  for (; i < n; ++i) nh += lanes_block<1>(qt, t, x, ldx, i, d, scores, hits + nh);
  return nh;
}

RS_AVX512 void half_to_float_rows(const uint16_t* src, int64_t lds, int64_t n, int64_t d,
                                  float* dst) {
  for (int64_t i = 0; i < n; ++i) {
    const uint16_t* s = src + i * lds;
    float* o = dst + i * d;
    int64_t j = 0;
    for (; j + kLanes <= d; j += kLanes)
      _mm512_storeu_ps(o + j, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + j))));
    if (j < d) {
      const __mmask16 m = tail_mask(d - j);
      _mm512_mask_storeu_ps(o + j, m, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, s + j)));
    }
  }
}

RS_AVX512 void axpy_f32(float w, const float* row, float* acc, int64_t d) {
  const __m512 wv = _mm512_set1_ps(w);
  int64_t j = 0;
  for (; j + kLanes <= d; j += kLanes)
    _mm512_storeu_ps(acc + j, _mm512_fmadd_ps(wv, _mm512_loadu_ps(row + j), _mm512_loadu_ps(acc + j)));
  if (j < d) {
    const __mmask16 m = tail_mask(d - j);
    _mm512_mask_storeu_ps(acc + j, m,
                          _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(m, row + j), _mm512_maskz_loadu_ps(m, acc + j)));
  }
}

RS_AVX512 void axpy_f16(float w, const uint16_t* row, float* acc, int64_t d) {
  const __m512 wv = _mm512_set1_ps(w);
  int64_t j = 0;
  for (; j + kLanes <= d; j += kLanes) {
    const __m512 r = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + j)));
    _mm512_storeu_ps(acc + j, _mm512_fmadd_ps(wv, r, _mm512_loadu_ps(acc + j)));
  }
  if (j < d) {
    const __mmask16 m = tail_mask(d - j);
    const __m512 r = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, row + j));
    _mm512_mask_storeu_ps(acc + j, m, _mm512_fmadd_ps(wv, r, _mm512_maskz_loadu_ps(m, acc + j)));
  }
}

}  // namespace

const SimdKernels& simd_avx512() {
  static const SimdKernels k{"avx512",           kLanes,   score_tile_row, score_tile_lanes,
                             half_to_float_rows, axpy_f32, axpy_f16};
  return k;
}
#else
const SimdKernels& simd_avx512() { return simd_scalar(); }
#endif

}  // namespace recserve::cpu
