// AVX2 + FMA + F16C inner loops (8 float lanes). Every function here carries the
// target attribute; nothing outside this file is compiled for AVX2, so the
// library still loads and runs on CPUs without it.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cpu/half.h"
#include "cpu/prefetch.h"
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

RS_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
RS_AVX2 inline __m256 load8(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
// The first r (1..7) elements, zero beyond; never reads past them.
RS_AVX2 inline __m256 load8_tail(const float* p, int64_t r) {
  return _mm256_maskload_ps(p, tail_mask(r));
}
RS_AVX2 inline __m256 load8_tail(const uint16_t* p, int64_t r) {
  alignas(16) uint16_t tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t k = 0; k < r; ++k) tmp[k] = p[k];
  return _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(tmp)));
}

// dot(q, row) for 4 rows, reduced together (3 hadds instead of 4 full reductions).
template <typename T>
RS_AVX2 inline void dot4(const float* q, const T* const* rows, int64_t d, float* out) {
  __m256 acc[4];
  for (int r = 0; r < 4; ++r) acc[r] = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + kLanes <= d; j += kLanes) {
    const __m256 qj = _mm256_loadu_ps(q + j);
    for (int r = 0; r < 4; ++r) acc[r] = _mm256_fmadd_ps(qj, load8(rows[r] + j), acc[r]);
  }
  if (j < d) {
    const __m256 qj = load8_tail(q + j, d - j);
    for (int r = 0; r < 4; ++r) acc[r] = _mm256_fmadd_ps(qj, load8_tail(rows[r] + j, d - j), acc[r]);
  }
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
}

template <typename T>
RS_AVX2 inline int64_t score_rows(const float* q, float thr, const T* x, int64_t ldx, int64_t n,
                                  int64_t d, float* scores, int32_t* hits) {
  for (int64_t i = 0; i < n; i += 4) {
    // A short last block repeats the final row, so every row takes the same path.
    const T* rows[4];
    for (int r = 0; r < 4; ++r) rows[r] = x + std::min<int64_t>(i + r, n - 1) * ldx;
    float out[4];
    dot4(q, rows, d, out);
    for (int64_t r = 0; r < 4 && i + r < n; ++r) scores[i + r] = out[r];
  }
  int64_t nh = 0;
  for (int64_t i = 0; i < n; ++i)
    if (scores[i] > thr) hits[nh++] = int32_t(i);
  return nh;
}

RS_AVX2 int64_t score_tile_row(const float* q, float thr, const float* x, int64_t ldx, int64_t n,
                               int64_t d, float* scores, int32_t* hits) {
  return score_rows(q, thr, x, ldx, n, d, scores, hits);
}

RS_AVX2 int64_t score_tile_row_f16(const float* q, float thr, const uint16_t* x, int64_t ldx,
                                   int64_t n, int64_t d, float* scores, int32_t* hits) {
  return score_rows(q, thr, x, ldx, n, d, scores, hits);
}

// R items x G lane groups: each item value is broadcast once and multiplied
// into G query vectors, so loads per FMA drop as G grows.
template <int R, int G>
RS_AVX2 inline void lanes_block(const float* qt, int64_t w, int64_t l0, const __m256* thr,
                                const float* x, int64_t ldx, int64_t i0, int64_t d, float* scores,
                                int32_t* flags) {
  __m256 acc[R][G];
  for (int r = 0; r < R; ++r)
    for (int g = 0; g < G; ++g) acc[r][g] = _mm256_setzero_ps();
  const float* xr = x + i0 * ldx;
  for (int64_t j = 0; j < d; ++j) {
    __m256 qv[G];
    for (int g = 0; g < G; ++g) qv[g] = _mm256_loadu_ps(qt + j * w + l0 + g * kLanes);
    for (int r = 0; r < R; ++r) {
      const __m256 b = _mm256_broadcast_ss(xr + r * ldx + j);
      for (int g = 0; g < G; ++g) acc[r][g] = _mm256_fmadd_ps(b, qv[g], acc[r][g]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int g = 0; g < G; ++g) {
      _mm256_storeu_ps(scores + (i0 + r) * w + l0 + g * kLanes, acc[r][g]);
      if (_mm256_movemask_ps(_mm256_cmp_ps(acc[r][g], thr[g], _CMP_GT_OQ))) flags[i0 + r] = 1;
    }
}

template <int R, int G>
RS_AVX2 inline void lanes_pass(const float* qt, int64_t w, int64_t l0, const float* thr,
                               const float* x, int64_t ldx, int64_t n, int64_t d, float* scores,
                               int32_t* flags) {
  __m256 t[G];
  for (int g = 0; g < G; ++g) t[g] = _mm256_loadu_ps(thr + l0 + g * kLanes);
  int64_t i = 0;
  for (; i + R <= n; i += R) lanes_block<R, G>(qt, w, l0, t, x, ldx, i, d, scores, flags);
  for (; i < n; ++i) lanes_block<1, G>(qt, w, l0, t, x, ldx, i, d, scores, flags);
}

RS_AVX2 int64_t score_tile_lanes(const float* qt, int64_t w, const float* thr, const float* x,
                                 int64_t ldx, int64_t n, int64_t d, float* scores, int32_t* hits) {
  for (int64_t i = 0; i < n; ++i) hits[i] = 0;  // per-row hit flags, compacted below
  int64_t l0 = 0;
  for (; l0 + 2 * kLanes <= w; l0 += 2 * kLanes)
    lanes_pass<6, 2>(qt, w, l0, thr, x, ldx, n, d, scores, hits);
  if (l0 < w) lanes_pass<8, 1>(qt, w, l0, thr, x, ldx, n, d, scores, hits);
  int64_t nh = 0;
  for (int64_t i = 0; i < n; ++i)
    if (hits[i]) hits[nh++] = int32_t(i);
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

// Columns [c0, c0 + 32) of one bag in 4 registers. Returns -1 or a bad position.
template <typename T>
RS_AVX2 inline int64_t pool_chunk(const char* base, int64_t ld_bytes, const int64_t* idx,
                                  int64_t lo, int64_t hi, int64_t num_indices, int64_t num_rows,
                                  const float* w, bool mean, int64_t c0, int64_t d, float* out,
                                  bool first_chunk) {
  int64_t cols[4];
  for (int v = 0; v < 4; ++v) cols[v] = std::clamp<int64_t>(d - c0 - v * kLanes, 0, kLanes);
  __m256 acc[4];
  for (int v = 0; v < 4; ++v) acc[v] = _mm256_setzero_ps();
  for (int64_t p = lo; p < hi; ++p) {
    if (first_chunk) {
      if (uint64_t(idx[p]) >= uint64_t(num_rows)) return p;
      prefetch_row_ahead(base, ld_bytes, d * int64_t(sizeof(T)), idx, p, num_indices, num_rows);
    }
    const T* row = reinterpret_cast<const T*>(base + idx[p] * ld_bytes) + c0;
    const __m256 wv = _mm256_set1_ps(w ? w[p] : 1.f);
    for (int v = 0; v < 4; ++v) {
      if (cols[v] == 0) break;
      const __m256 x = cols[v] == kLanes ? load8(row + v * kLanes) : load8_tail(row + v * kLanes, cols[v]);
      // Multiply, then add (no FMA): the same two roundings as the spec, bit for bit.
      acc[v] = _mm256_add_ps(acc[v], w ? _mm256_mul_ps(wv, x) : x);
    }
  }
  if (mean && hi > lo) {
    const __m256 count = _mm256_set1_ps(float(hi - lo));
    for (int v = 0; v < 4; ++v) acc[v] = _mm256_div_ps(acc[v], count);
  }
  for (int v = 0; v < 4 && cols[v] > 0; ++v) {
    if (cols[v] == kLanes) {
      _mm256_storeu_ps(out + c0 + v * kLanes, acc[v]);
    } else {
      _mm256_maskstore_ps(out + c0 + v * kLanes, tail_mask(cols[v]), acc[v]);
    }
  }
  return -1;
}

RS_AVX2 int64_t pool_bags(const char* base, int64_t ld_bytes, bool half, const int64_t* idx,
                          const int64_t* off, int64_t b0, int64_t b1, int64_t num_indices,
                          int64_t num_rows, const float* w, bool mean, int64_t d, float* out) {
  for (int64_t b = b0; b < b1; ++b) {
    for (int64_t c0 = 0; c0 < d; c0 += 4 * kLanes) {
      const int64_t bad =
          half ? pool_chunk<uint16_t>(base, ld_bytes, idx, off[b], off[b + 1], num_indices, num_rows,
                                      w, mean, c0, d, out + b * d, c0 == 0)
               : pool_chunk<float>(base, ld_bytes, idx, off[b], off[b + 1], num_indices, num_rows, w,
                                   mean, c0, d, out + b * d, c0 == 0);
      if (bad >= 0) return bad;
    }
  }
  return -1;
}

// -- the int8 pre-filter (topk_cpu.cpp) ----------------------------------------------
// VPMADDUBSW multiplies unsigned bytes (rows: x_hat + 128) by signed bytes (queries,
// |q_hat| <= 63, so a pair of products fits 16 bits) and adds pairs; VPMADDWD by ones adds
// those pairs into 32 bits: 32 products per two multiply-port instructions, where one
// float32 FMA makes 8. The offset 128 * sum(q_hat) is taken off once per row.

RS_AVX2 inline __m256i dot4_i8(__m256i x, __m256i q, __m256i ones16) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(x, q), ones16);
}

// R rows x G lane groups: each row's four bytes at p are broadcast and multiplied into
// G groups of 8 queries.
template <int R, int G>
RS_AVX2 inline void i8_block(const int32_t* qt4, int64_t w, int64_t l0, const __m256i* off, const __m256* scale,
                             const __m256* thr_lo, const uint8_t* xq, int64_t dq, int64_t i0, int32_t* flags) {
  const __m256i ones16 = _mm256_set1_epi16(1);
  __m256i acc[R][G];
  for (int r = 0; r < R; ++r)
    for (int g = 0; g < G; ++g) acc[r][g] = _mm256_setzero_si256();
  const uint8_t* xr = xq + i0 * dq;
  for (int64_t p = 0; p < dq; p += 4) {
    __m256i qv[G];
    for (int g = 0; g < G; ++g)
      qv[g] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qt4 + p / 4 * w + l0 + g * kLanes));
    for (int r = 0; r < R; ++r) {
      int32_t word;
      std::memcpy(&word, xr + r * dq + p, sizeof word);
      const __m256i b = _mm256_set1_epi32(word);
      for (int g = 0; g < G; ++g) acc[r][g] = _mm256_add_epi32(acc[r][g], dot4_i8(b, qv[g], ones16));
    }
  }
  for (int r = 0; r < R; ++r)
    for (int g = 0; g < G; ++g) {
      const __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(acc[r][g], off[g])), scale[g]);
      if (_mm256_movemask_ps(_mm256_cmp_ps(v, thr_lo[g], _CMP_GT_OQ))) flags[i0 + r] = 1;
    }
}

template <int R, int G>
RS_AVX2 inline void i8_pass(const int32_t* qt4, int64_t w, int64_t l0, const int32_t* off, const float* scale,
                            const float* thr_lo, const uint8_t* xq, int64_t n, int64_t dq, int32_t* flags) {
  __m256i o[G];
  __m256 s[G], t[G];
  for (int g = 0; g < G; ++g) {
    o[g] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(off + l0 + g * kLanes));
    s[g] = _mm256_loadu_ps(scale + l0 + g * kLanes);
    t[g] = _mm256_loadu_ps(thr_lo + l0 + g * kLanes);
  }
  int64_t i = 0;
  for (; i + R <= n; i += R) i8_block<R, G>(qt4, w, l0, o, s, t, xq, dq, i, flags);
  for (; i < n; ++i) i8_block<1, G>(qt4, w, l0, o, s, t, xq, dq, i, flags);
}

RS_AVX2 int64_t prefilter_lanes_i8(const int32_t* qt4, int64_t w, const int32_t* off, const float* scale,
                                   const float* thr_lo, const uint8_t* xq, int64_t n, int64_t dq, int32_t* hits) {
  for (int64_t i = 0; i < n; ++i) hits[i] = 0;
  int64_t l0 = 0;
  for (; l0 + 2 * kLanes <= w; l0 += 2 * kLanes) i8_pass<4, 2>(qt4, w, l0, off, scale, thr_lo, xq, n, dq, hits);
  if (l0 < w) i8_pass<8, 1>(qt4, w, l0, off, scale, thr_lo, xq, n, dq, hits);
  int64_t nh = 0;
  for (int64_t i = 0; i < n; ++i)
    if (hits[i]) hits[nh++] = int32_t(i);
  return nh;
}

// One query against int8 rows, 8 rows at a time (a short last block repeats the final
// row), 32 bytes per step (masked to whole words at the end of a row); the 8 row sums
// reduced together. Rows kRowFilterPrefetch ahead are prefetched while `readable` allows.
constexpr int64_t kRowFilterPrefetch = 32;
RS_AVX2 int64_t prefilter_row_i8(const int8_t* q8, int32_t off, float scale, float thr_lo, const uint8_t* xq,
                                 int64_t n, int64_t readable, int64_t dq, int32_t* hits) {
  const __m256i ones16 = _mm256_set1_epi16(1);
  const __m256 t = _mm256_set1_ps(thr_lo), sc = _mm256_set1_ps(scale);
  const __m256i o = _mm256_set1_epi32(off);
  int64_t nh = 0;
  for (int64_t i = 0; i < n; i += 8) {
    const int64_t rows = std::min<int64_t>(8, n - i);
    if (i + kRowFilterPrefetch + 8 <= readable) {
      const char* ahead = reinterpret_cast<const char*>(xq + (i + kRowFilterPrefetch) * dq);
      for (int64_t b = 0; b < 8 * dq; b += 64) _mm_prefetch(ahead + b, _MM_HINT_T0);
    }
    const uint8_t* row[8];
    for (int r = 0; r < 8; ++r) row[r] = xq + (i + std::min<int64_t>(r, rows - 1)) * dq;
    __m256i acc[8];
    for (int r = 0; r < 8; ++r) acc[r] = _mm256_setzero_si256();
    for (int64_t p = 0; p < dq; p += 32) {
      const int64_t words = std::min<int64_t>((dq - p) / 4, kLanes);
      if (words == kLanes) {
        const __m256i qv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q8 + p));
        for (int r = 0; r < 8; ++r)
          acc[r] = _mm256_add_epi32(
              acc[r], dot4_i8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row[r] + p)), qv, ones16));
      } else {
        const __m256i m = tail_mask(words);
        const __m256i qv = _mm256_maskload_epi32(reinterpret_cast<const int*>(q8 + p), m);
        for (int r = 0; r < 8; ++r)
          acc[r] = _mm256_add_epi32(
              acc[r], dot4_i8(_mm256_maskload_epi32(reinterpret_cast<const int*>(row[r] + p), m), qv, ones16));
      }
    }
    // hadd pairs, then swap 128-bit halves: lane r holds row r's sum.
    const __m256i h01 = _mm256_hadd_epi32(_mm256_hadd_epi32(acc[0], acc[1]), _mm256_hadd_epi32(acc[2], acc[3]));
    const __m256i h23 = _mm256_hadd_epi32(_mm256_hadd_epi32(acc[4], acc[5]), _mm256_hadd_epi32(acc[6], acc[7]));
    const __m256i sums = _mm256_add_epi32(_mm256_permute2x128_si256(h01, h23, 0x20),
                                          _mm256_permute2x128_si256(h01, h23, 0x31));
    const __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(sums, o)), sc);
    unsigned pass = unsigned(_mm256_movemask_ps(_mm256_cmp_ps(v, t, _CMP_GT_OQ)));
    while (pass) {
      const int64_t r = __builtin_ctz(pass);
      if (r < rows) hits[nh++] = int32_t(i + r);
      pass &= pass - 1;
    }
  }
  return nh;
}

}  // namespace

const SimdKernels& simd_avx2() {
  static const SimdKernels k{"avx2",             kLanes,           score_tile_row,
                             score_tile_row_f16, score_tile_lanes, half_to_float_rows,
                             pool_bags,          nullptr,          nullptr,
                             nullptr,            prefilter_lanes_i8, prefilter_row_i8};
  return k;
}
#else
const SimdKernels& simd_avx2() { return simd_scalar(); }
#endif

}  // namespace recserve::cpu
