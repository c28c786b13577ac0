// AVX-512 (F, BW, VL) inner loops: 16 float lanes, masked tails instead of
// scalar remainders; on CPUs with AVX512_BF16 also the bfloat16 pre-filter for
// batched top-k. Compiled with function-level target attributes only.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "cpu/prefetch.h"
#include "cpu/simd.h"

namespace recserve::cpu {

#if defined(__x86_64__) || defined(__i386__)
#define RS_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))
namespace {

constexpr int kLanes = 16;

// The first r (0..16) lanes.
RS_AVX512 inline __mmask16 tail_mask(int64_t r) { return __mmask16((1u << r) - 1u); }

RS_AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
RS_AVX512 inline __m512 load16(const uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
// Masked loads never touch the masked-off elements (no fault past a memmap's end).
RS_AVX512 inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
RS_AVX512 inline __m512 load16(const uint16_t* p, __mmask16 m) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}

// Horizontal sums of 4 vectors at once: 128-bit chunk r of the folded vector
// holds row r's partial sums, finished inside the chunk.
RS_AVX512 inline __m128 reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm512_shuffle_f32x4(c, d, _MM_SHUFFLE(3, 2, 3, 2)));
  __m512 v = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, _MM_SHUFFLE(2, 0, 2, 0)),
                           _mm512_shuffle_f32x4(ab, cd, _MM_SHUFFLE(3, 1, 3, 1)));
  v = _mm512_add_ps(v, _mm512_permute_ps(v, _MM_SHUFFLE(2, 3, 0, 1)));
  v = _mm512_add_ps(v, _mm512_permute_ps(v, _MM_SHUFFLE(1, 0, 3, 2)));
  const __m512i pick = _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
  return _mm512_castps512_ps128(_mm512_permutexvar_ps(pick, v));
}

// dot(q, row) for 8 rows: two groups of 4 accumulators (more independent FMA
// chains in flight), each group reduced jointly.
template <typename T>
RS_AVX512 inline void dot8(const float* q, const T* const* rows, int64_t d, float* out) {
  __m512 acc[8];
  for (int r = 0; r < 8; ++r) acc[r] = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + kLanes <= d; j += kLanes) {
    const __m512 qj = _mm512_loadu_ps(q + j);
    for (int r = 0; r < 8; ++r) acc[r] = _mm512_fmadd_ps(qj, load16(rows[r] + j), acc[r]);
  }
  if (j < d) {
    const __mmask16 m = tail_mask(d - j);
    const __m512 qj = _mm512_maskz_loadu_ps(m, q + j);
    for (int r = 0; r < 8; ++r) acc[r] = _mm512_fmadd_ps(qj, load16(rows[r] + j, m), acc[r]);
  }
  _mm_storeu_ps(out, reduce4(acc[0], acc[1], acc[2], acc[3]));
  _mm_storeu_ps(out + 4, reduce4(acc[4], acc[5], acc[6], acc[7]));
}

// Streaming rows: prefetch 4 rows this far ahead (the hardware prefetcher alone
// leaves bandwidth unused when each row needs little compute, as with float16).
constexpr int64_t kPrefetchRows = 32;
template <typename T>
RS_AVX512 inline void prefetch_rows(const T* x, int64_t ldx, int64_t d, int64_t i, int64_t n) {
  if (i + 4 > n) return;
  const char* p = reinterpret_cast<const char*>(x + i * ldx);
  const int64_t bytes = 3 * ldx * int64_t(sizeof(T)) + d * int64_t(sizeof(T));
  for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(p + b, _MM_HINT_T0);
}

template <typename T>
RS_AVX512 inline int64_t score_rows(const float* q, float thr, const T* x, int64_t ldx, int64_t n,
                                    int64_t d, float* scores, int32_t* hits) {
  for (int64_t i = 0; i < n; i += 8) {
    // A short last block repeats the final row, so every row takes the same path.
    const T* rows[8];
    for (int r = 0; r < 8; ++r) rows[r] = x + std::min<int64_t>(i + r, n - 1) * ldx;
    prefetch_rows(x, ldx, d, i + kPrefetchRows, n);
    prefetch_rows(x, ldx, d, i + kPrefetchRows + 4, n);
    float out[8];
    dot8(q, rows, d, out);
    for (int64_t r = 0; r < 8 && i + r < n; ++r) scores[i + r] = out[r];
  }
  // Vectorised filter: almost every row loses against a warm threshold.
  const __m512 t = _mm512_set1_ps(thr);
  int64_t nh = 0;
  for (int64_t i = 0; i < n; i += kLanes) {
    const __mmask16 valid = n - i >= kLanes ? __mmask16(0xffff) : tail_mask(n - i);
    unsigned m = _mm512_mask_cmp_ps_mask(valid, _mm512_maskz_loadu_ps(valid, scores + i), t, _CMP_GT_OQ);
    while (m) {
      hits[nh++] = int32_t(i + __builtin_ctz(m));
      m &= m - 1;
    }
  }
  return nh;
}

RS_AVX512 int64_t score_tile_row(const float* q, float thr, const float* x, int64_t ldx,
                                 int64_t n, int64_t d, float* scores, int32_t* hits) {
  return score_rows(q, thr, x, ldx, n, d, scores, hits);
}

RS_AVX512 int64_t score_tile_row_f16(const float* q, float thr, const uint16_t* x, int64_t ldx,
                                     int64_t n, int64_t d, float* scores, int32_t* hits) {
  return score_rows(q, thr, x, ldx, n, d, scores, hits);
}

// R items x G lane groups: each item value is broadcast once and multiplied
// into G query vectors, so loads per FMA drop as G grows.
template <int R, int G>
RS_AVX512 inline void lanes_block(const float* qt, int64_t w, int64_t l0, const __m512* thr,
                                  const float* x, int64_t ldx, int64_t i0, int64_t d,
                                  float* scores, int32_t* flags) {
  __m512 acc[R][G];
  for (int r = 0; r < R; ++r)
    for (int g = 0; g < G; ++g) acc[r][g] = _mm512_setzero_ps();
  const float* xr = x + i0 * ldx;
  for (int64_t j = 0; j < d; ++j) {
    __m512 qv[G];
    for (int g = 0; g < G; ++g) qv[g] = _mm512_loadu_ps(qt + j * w + l0 + g * kLanes);
    for (int r = 0; r < R; ++r) {
      const __m512 b = _mm512_set1_ps(xr[r * ldx + j]);
      for (int g = 0; g < G; ++g) acc[r][g] = _mm512_fmadd_ps(b, qv[g], acc[r][g]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int g = 0; g < G; ++g) {
      _mm512_storeu_ps(scores + (i0 + r) * w + l0 + g * kLanes, acc[r][g]);
      if (_mm512_cmp_ps_mask(acc[r][g], thr[g], _CMP_GT_OQ)) flags[i0 + r] = 1;
    }
}

template <int R, int G>
RS_AVX512 inline void lanes_pass(const float* qt, int64_t w, int64_t l0, const float* thr,
                                 const float* x, int64_t ldx, int64_t n, int64_t d, float* scores,
                                 int32_t* flags) {
  __m512 t[G];
  for (int g = 0; g < G; ++g) t[g] = _mm512_loadu_ps(thr + l0 + g * kLanes);
  int64_t i = 0;
  for (; i + R <= n; i += R) lanes_block<R, G>(qt, w, l0, t, x, ldx, i, d, scores, flags);
  for (; i < n; ++i) lanes_block<1, G>(qt, w, l0, t, x, ldx, i, d, scores, flags);
}

RS_AVX512 int64_t score_tile_lanes(const float* qt, int64_t w, const float* thr, const float* x,
                                   int64_t ldx, int64_t n, int64_t d, float* scores,
                                   int32_t* hits) {
  for (int64_t i = 0; i < n; ++i) hits[i] = 0;  // per-row hit flags, compacted below
  int64_t l0 = 0;
  for (; l0 + 2 * kLanes <= w; l0 += 2 * kLanes)
    lanes_pass<12, 2>(qt, w, l0, thr, x, ldx, n, d, scores, hits);
  if (l0 < w) lanes_pass<12, 1>(qt, w, l0, thr, x, ldx, n, d, scores, hits);
  int64_t nh = 0;
  for (int64_t i = 0; i < n; ++i)
    if (hits[i]) hits[nh++] = int32_t(i);
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

// Columns [c0, c0 + 64) of one bag in 4 registers. Returns -1 or a bad position.
template <typename T>
RS_AVX512 inline int64_t pool_chunk(const char* base, int64_t ld_bytes, const int64_t* idx,
                                    int64_t lo, int64_t hi, int64_t num_indices, int64_t num_rows,
                                    const float* w, bool mean, const __mmask16* m, int64_t c0,
                                    int64_t d, float* out, bool first_chunk) {
  __m512 acc[4];
  for (int v = 0; v < 4; ++v) acc[v] = _mm512_setzero_ps();
  for (int64_t p = lo; p < hi; ++p) {
    if (first_chunk) {
      if (uint64_t(idx[p]) >= uint64_t(num_rows)) return p;
      prefetch_row_ahead(base, ld_bytes, d * int64_t(sizeof(T)), idx, p, num_indices, num_rows);
    }
    const T* row = reinterpret_cast<const T*>(base + idx[p] * ld_bytes) + c0;
    // Multiply, then add (no FMA): the same two roundings as the spec, bit for bit.
    if (w) {
      const __m512 wv = _mm512_set1_ps(w[p]);
      for (int v = 0; v < 4; ++v)
        acc[v] = _mm512_add_ps(acc[v], _mm512_mul_ps(wv, load16(row + v * kLanes, m[v])));
    } else {
      for (int v = 0; v < 4; ++v) acc[v] = _mm512_add_ps(acc[v], load16(row + v * kLanes, m[v]));
    }
  }
  if (mean && hi > lo) {
    const __m512 count = _mm512_set1_ps(float(hi - lo));
    for (int v = 0; v < 4; ++v) acc[v] = _mm512_div_ps(acc[v], count);
  }
  for (int v = 0; v < 4; ++v) _mm512_mask_storeu_ps(out + c0 + v * kLanes, m[v], acc[v]);
  return -1;
}

template <typename T>
RS_AVX512 inline int64_t pool_bags_t(const char* base, int64_t ld_bytes, const int64_t* idx,
                                     const int64_t* off, int64_t b0, int64_t b1,
                                     int64_t num_indices, int64_t num_rows, const float* w,
                                     bool mean, int64_t d, float* out) {
  const int64_t chunks = (d + 4 * kLanes - 1) / (4 * kLanes);
  __mmask16 masks[4 * 8];  // up to 512 columns precomputed; wider tables recompute
  const int64_t cached = std::min<int64_t>(chunks, 8);
  for (int64_t c = 0; c < cached * 4; ++c)
    masks[c] = tail_mask(std::clamp<int64_t>(d - c * kLanes, 0, kLanes));
  for (int64_t b = b0; b < b1; ++b) {
    for (int64_t c = 0; c < chunks; ++c) {
      __mmask16 local[4];
      const __mmask16* m = masks + 4 * c;
      if (c >= cached) {
        for (int v = 0; v < 4; ++v)
          local[v] = tail_mask(std::clamp<int64_t>(d - (4 * c + v) * kLanes, 0, kLanes));
        m = local;
      }
      const int64_t bad = pool_chunk<T>(base, ld_bytes, idx, off[b], off[b + 1], num_indices,
                                        num_rows, w, mean, m, c * 4 * kLanes, d, out + b * d, c == 0);
      if (bad >= 0) return bad;
    }
  }
  return -1;
}

RS_AVX512 int64_t pool_bags(const char* base, int64_t ld_bytes, bool half, const int64_t* idx,
                            const int64_t* off, int64_t b0, int64_t b1, int64_t num_indices,
                            int64_t num_rows, const float* w, bool mean, int64_t d, float* out) {
  return half ? pool_bags_t<uint16_t>(base, ld_bytes, idx, off, b0, b1, num_indices, num_rows, w, mean, d, out)
              : pool_bags_t<float>(base, ld_bytes, idx, off, b0, b1, num_indices, num_rows, w, mean, d, out);
}

// ---- bfloat16 pre-filter (AVX512_BF16) ------------------------------------------
#define RS_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma,f16c")))

// Same-size vector reinterpretation (GCC vector casts; no instruction).
RS_AVX512BF16 inline __m512bh as_bh(__m512i v) { return (__m512bh)v; }
RS_AVX512BF16 inline __m512i as_words(__m512bh v) { return (__m512i)v; }

template <typename T>
RS_AVX512BF16 inline float to_bf16_rows_t(const T* x, int64_t ldx, int64_t n, int64_t d, uint32_t* dst) {
  const int64_t dp = (d + 1) / 2;
  float max_sq = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    const T* row = x + i * ldx;
    uint32_t* out = dst + i * dp;
    __m512 sq = _mm512_setzero_ps();
    for (int64_t j = 0; j < d; j += 2 * kLanes) {  // 32 columns -> 16 words per step
      const __m512 lo = load16(row + j, tail_mask(std::clamp<int64_t>(d - j, 0, kLanes)));
      const __m512 hi = load16(row + j + kLanes, tail_mask(std::clamp<int64_t>(d - j - kLanes, 0, kLanes)));
      sq = _mm512_fmadd_ps(lo, lo, _mm512_fmadd_ps(hi, hi, sq));
      const __m512i words = as_words(_mm512_cvtne2ps_pbh(hi, lo));  // columns j.. in order
      _mm512_mask_storeu_epi32(out + j / 2, tail_mask(std::min<int64_t>(dp - j / 2, kLanes)), words);
    }
    const float row_sq = _mm512_reduce_add_ps(sq);
    if (!(row_sq <= std::numeric_limits<float>::max())) return std::numeric_limits<float>::quiet_NaN();
    max_sq = std::max(max_sq, row_sq);
  }
  return std::sqrt(max_sq);
}

RS_AVX512BF16 float to_bf16_rows(const void* x, bool half, int64_t ldx, int64_t n, int64_t d, uint32_t* dst) {
  return half ? to_bf16_rows_t(static_cast<const uint16_t*>(x), ldx, n, d, dst)
              : to_bf16_rows_t(static_cast<const float*>(x), ldx, n, d, dst);
}

// R rows x G lane groups of approximate scores; flags the rows where a lane beats thr_lo.
template <int R, int G>
RS_AVX512BF16 inline void bf16_block(const uint32_t* qt2, int64_t w, int64_t l0, const __m512* thr_lo,
                                     const uint32_t* xb, int64_t dp, int64_t i0, int32_t* flags) {
  __m512 acc[R][G];
  for (int r = 0; r < R; ++r)
    for (int g = 0; g < G; ++g) acc[r][g] = _mm512_setzero_ps();
  const uint32_t* xr = xb + i0 * dp;
  for (int64_t p = 0; p < dp; ++p) {
    __m512bh qv[G];
    for (int g = 0; g < G; ++g) qv[g] = as_bh(_mm512_loadu_si512(qt2 + p * w + l0 + g * kLanes));
    for (int r = 0; r < R; ++r) {
      const __m512bh b = as_bh(_mm512_set1_epi32(int(xr[r * dp + p])));
      for (int g = 0; g < G; ++g) acc[r][g] = _mm512_dpbf16_ps(acc[r][g], b, qv[g]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int g = 0; g < G; ++g)
      if (_mm512_cmp_ps_mask(acc[r][g], thr_lo[g], _CMP_GT_OQ)) flags[i0 + r] = 1;
}

template <int R, int G>
RS_AVX512BF16 inline void bf16_pass(const uint32_t* qt2, int64_t w, int64_t l0, const float* thr_lo,
                                    const uint32_t* xb, int64_t n, int64_t dp, int32_t* flags) {
  __m512 t[G];
  for (int g = 0; g < G; ++g) t[g] = _mm512_loadu_ps(thr_lo + l0 + g * kLanes);
  int64_t i = 0;
  for (; i + R <= n; i += R) bf16_block<R, G>(qt2, w, l0, t, xb, dp, i, flags);
  // A 128-row tile leaves 8 rows after blocks of 12: in fours, not one by one (a lone
  // row's accumulator chain waits on each dot product's latency).
  for (; i + 4 <= n; i += 4) bf16_block<4, G>(qt2, w, l0, t, xb, dp, i, flags);
  for (; i < n; ++i) bf16_block<1, G>(qt2, w, l0, t, xb, dp, i, flags);
}

RS_AVX512BF16 int64_t prefilter_lanes_bf16(const uint32_t* qt2, int64_t w, const float* thr_lo,
                                           const uint32_t* xb, int64_t n, int64_t dp, int32_t* hits) {
  for (int64_t i = 0; i < n; ++i) hits[i] = 0;
  int64_t l0 = 0;
  for (; l0 + 2 * kLanes <= w; l0 += 2 * kLanes) bf16_pass<12, 2>(qt2, w, l0, thr_lo, xb, n, dp, hits);
  if (l0 < w) bf16_pass<12, 1>(qt2, w, l0, thr_lo, xb, n, dp, hits);
  int64_t nh = 0;
  for (int64_t i = 0; i < n; ++i)
    if (hits[i]) hits[nh++] = int32_t(i);
  return nh;
}

// One query against rows of bfloat16 pairs (row-major, as to_bf16_rows writes them):
// 16 rows at a time, each row's pairs in chunks of 16 (masked at the end), the 16 row
// sums reduced four at a time. A short last block repeats the final row. The rows
// kRowFilterPrefetch ahead (past this tile while `readable` allows) are prefetched: the
// rows stream from L3 or memory with little compute each, and without it the pass ran at
// under half the float32 row kernel's bandwidth on Zen 5 (10k x 64 items, one query:
// 1.3-1.75x slower than the float32 rows it reads half of; 1M items 1.2x).
constexpr int64_t kRowFilterPrefetch = 32;
RS_AVX512BF16 int64_t prefilter_row_bf16(const uint32_t* q2, float thr_lo, const uint32_t* xb, int64_t n,
                                         int64_t readable, int64_t dp, int32_t* hits) {
  const __m128 t = _mm_set1_ps(thr_lo);
  int64_t nh = 0;
  for (int64_t i = 0; i < n; i += 16) {
    const int64_t rows = std::min<int64_t>(16, n - i);
    if (i + kRowFilterPrefetch + 16 <= readable) {
      const char* ahead = reinterpret_cast<const char*>(xb + (i + kRowFilterPrefetch) * dp);
      for (int64_t b = 0; b < 16 * dp * int64_t(sizeof(uint32_t)); b += 64) _mm_prefetch(ahead + b, _MM_HINT_T0);
    }
    __m512 acc[16];
    for (int r = 0; r < 16; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t p = 0; p < dp; p += kLanes) {
      const __mmask16 m = tail_mask(std::min<int64_t>(dp - p, kLanes));
      const __m512bh qv = as_bh(_mm512_maskz_loadu_epi32(m, q2 + p));
      for (int r = 0; r < 16; ++r) {
        const uint32_t* row = xb + (i + std::min<int64_t>(r, rows - 1)) * dp + p;
        acc[r] = _mm512_dpbf16_ps(acc[r], as_bh(_mm512_maskz_loadu_epi32(m, row)), qv);
      }
    }
    for (int g = 0; g < 4; ++g) {
      unsigned pass = _mm_cmp_ps_mask(reduce4(acc[4 * g], acc[4 * g + 1], acc[4 * g + 2], acc[4 * g + 3]), t,
                                      _CMP_GT_OQ);
      while (pass) {
        const int64_t r = 4 * g + __builtin_ctz(pass);
        if (r < rows) hits[nh++] = int32_t(i + r);
        pass &= pass - 1;
      }
    }
  }
  return nh;
}

}  // namespace

const SimdKernels& simd_avx512() {
  static const SimdKernels k{"avx512",         kLanes,           score_tile_row,
                             score_tile_row_f16, score_tile_lanes, half_to_float_rows,
                             pool_bags,          nullptr,          nullptr,
                             nullptr};
  return k;
}

const SimdKernels& simd_avx512bf16() {
  static const SimdKernels k{"avx512bf16",     kLanes,           score_tile_row,
                             score_tile_row_f16, score_tile_lanes, half_to_float_rows,
                             pool_bags,          to_bf16_rows,     prefilter_lanes_bf16,
                             prefilter_row_bf16};
  return k;
}
#else
const SimdKernels& simd_avx512() { return simd_scalar(); }
const SimdKernels& simd_avx512bf16() { return simd_scalar(); }
#endif

}  // namespace recserve::cpu
