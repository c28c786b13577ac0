// AVX2 + FMA + F16C inner loops (8 float lanes). Every function here carries the
// target attribute; nothing outside this file is compiled for AVX2, so the
// library still loads and runs on CPUs without it.
#include <immintrin.h>

#include <cstdint>

#include "cpu/half.h"
#include "cpu/simd.h"

namespace recserve::cpu {

#if defined(__x86_64__) || defined(__i386__)
#define RS_AVX2 __attribute__((target("avx2,fma,f16c")))
namespace {

constexpr int kLanes = 8;

// Mask selecting the first r (1..7) lanes, for the tail of a row.
RS_AVX2 inline __m256i tail_mask(int64_t r) {
  alignas(32) static const int32_t bits[16] = {-1, -1, -1, -1, -1, -1, -1, -1,
                                               0,  0,  0,  0,  0,  0,  0,  0};
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bits + 8 - r));
}

RS_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  __m128 sh = _mm_movehdup_ps(s);
  s = _mm_add_ps(s, sh);
  sh = _mm_movehl_ps(sh, s);
  return _mm_cvtss_f32(_mm_add_ss(s, sh));
}

// R rows at once: independent FMA chains hide the FMA latency.
template <int R>
RS_AVX2 inline void dot_rows(const float* q, const float* x, int64_t ldx, int64_t d, float* out) {
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + kLanes <= d; j += kLanes) {
    const __m256 qj = _mm256_loadu_ps(q + j);
    for (int r = 0; r < R; ++r)
      acc[r] = _mm256_fmadd_ps(qj, _mm256_loadu_ps(x + r * ldx + j), acc[r]);
  }
  if (j < d) {
    const __m256i m = tail_mask(d - j);
    const __m256 qj = _mm256_maskload_ps(q + j, m);
    for (int r = 0; r < R; ++r)
      acc[r] = _mm256_fmadd_ps(qj, _mm256_maskload_ps(x + r * ldx + j, m), acc[r]);
  }
  for (int r = 0; r < R; ++r) out[r] = hsum(acc[r]);
}

RS_AVX2 int64_t score_tile_row(const float* q, float thr, const float* x, int64_t ldx, int64_t n,
                               int64_t d, float* scores, int32_t* hits) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) dot_rows<4>(q, x + i * ldx, ldx, d, scores + i);
  for (; i < n; ++i) dot_rows<1>(q, x + i * ldx, ldx, d, scores + i);
  int64_t nh = 0;
  for (i = 0; i < n; ++i)
    if (scores[i] > thr) hits[nh++] = int32_t(i);
  return nh;
}

template <int R>
RS_AVX2 inline int64_t lanes_block(const float* qt, __m256 thr, const float* x, int64_t ldx,
                                   int64_t i0, int64_t d, float* scores, int32_t* hits) {
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  const float* xr = x + i0 * ldx;
  for (int64_t j = 0; j < d; ++j) {
    const __m256 qj = _mm256_loadu_ps(qt + j * kLanes);
    for (int r = 0; r < R; ++r)
      acc[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(xr + r * ldx + j), qj, acc[r]);
  }
  int64_t nh = 0;
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(scores + (i0 + r) * kLanes, acc[r]);
    if (_mm256_movemask_ps(_mm256_cmp_ps(acc[r], thr, _CMP_GT_OQ))) hits[nh++] = int32_t(i0 + r);
  }
  return nh;
}

RS_AVX2 int64_t score_tile_lanes(const float* qt, const float* thr, const float* x, int64_t ldx,
                                 int64_t n, int64_t d, float* scores, int32_t* hits) {
  const __m256 t = _mm256_loadu_ps(thr);
  int64_t nh = 0, i = 0;
  for (; i + 8 <= n; i += 8) nh += lanes_block<8>(qt, t, x, ldx, i, d, scores, hits + nh);
  for (; i < n; ++i) nh += lanes_block<1>(qt, t, x, ldx, i, d, scores, hits + nh);
  return nh;
}

RS_AVX2 void half_to_float_rows(const uint16_t* src, int64_t lds, int64_t n, int64_t d,
                                float* dst) {
  for (int64_t i = 0; i < n; ++i) {
    const uint16_t* s = src + i * lds;
    float* o = dst + i * d;
    int64_t j = 0;
    for (; j + 8 <= d; j += 8)
      _mm256_storeu_ps(o + j, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + j))));
    for (; j < d; ++j) o[j] = half_to_float(s[j]);
  }
}

RS_AVX2 void axpy_f32(float w, const float* row, float* acc, int64_t d) {
  const __m256 wv = _mm256_set1_ps(w);
  int64_t j = 0;
  for (; j + 8 <= d; j += 8)
    _mm256_storeu_ps(acc + j, _mm256_fmadd_ps(wv, _mm256_loadu_ps(row + j), _mm256_loadu_ps(acc + j)));
  for (; j < d; ++j) acc[j] += w * row[j];
}

RS_AVX2 void axpy_f16(float w, const uint16_t* row, float* acc, int64_t d) {
  const __m256 wv = _mm256_set1_ps(w);
  int64_t j = 0;
  for (; j + 8 <= d; j += 8) {
    const __m256 r = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + j)));
    _mm256_storeu_ps(acc + j, _mm256_fmadd_ps(wv, r, _mm256_loadu_ps(acc + j)));
  }
  for (; j < d; ++j) acc[j] += w * half_to_float(row[j]);
}

}  // namespace

const SimdKernels& simd_avx2() {
  static const SimdKernels k{"avx2",             kLanes,   score_tile_row, score_tile_lanes,
                             half_to_float_rows, axpy_f32, axpy_f16};
  return k;
}
#else
const SimdKernels& simd_avx2() { return simd_scalar(); }
#endif

}  // namespace recserve::cpu
