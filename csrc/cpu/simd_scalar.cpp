// Portable inner loops: the reference for the SIMD tables and the path on CPUs
// without AVX2.
#include "cpu/half.h"
#include "cpu/prefetch.h"
#include "cpu/simd.h"

namespace recserve::cpu {
namespace {

template <typename T, typename Load>
int64_t score_rows(const float* q, float thr, const T* x, int64_t ldx, int64_t n, int64_t d,
                   float* scores, int32_t* hits, Load load) {
  int64_t nh = 0;
  for (int64_t i = 0; i < n; ++i) {
    const T* xi = x + i * ldx;
    float s = 0.f;
    for (int64_t j = 0; j < d; ++j) s += q[j] * load(xi[j]);
    scores[i] = s;
    if (s > thr) hits[nh++] = int32_t(i);
  }
  return nh;
}

int64_t score_tile_row(const float* q, float thr, const float* x, int64_t ldx, int64_t n,
                       int64_t d, float* scores, int32_t* hits) {
  return score_rows(q, thr, x, ldx, n, d, scores, hits, [](float v) { return v; });
}

int64_t score_tile_row_f16(const float* q, float thr, const uint16_t* x, int64_t ldx, int64_t n,
                           int64_t d, float* scores, int32_t* hits) {
  return score_rows(q, thr, x, ldx, n, d, scores, hits, half_to_float);
}

constexpr int kLanes = 8;

int64_t score_tile_lanes(const float* qt, int64_t w, const float* thr, const float* x, int64_t ldx,
                         int64_t n, int64_t d, float* scores, int32_t* hits) {
  int64_t nh = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float* xi = x + i * ldx;
    float* si = scores + i * w;
    for (int64_t l = 0; l < w; ++l) si[l] = 0.f;
    for (int64_t j = 0; j < d; ++j)
      for (int64_t l = 0; l < w; ++l) si[l] += qt[j * w + l] * xi[j];
    bool hit = false;
    for (int64_t l = 0; l < w; ++l) hit |= si[l] > thr[l];
    if (hit) hits[nh++] = int32_t(i);
  }
  return nh;
}

void half_to_float_rows(const uint16_t* src, int64_t lds, int64_t n, int64_t d, float* dst) {
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < d; ++j) dst[i * d + j] = half_to_float(src[i * lds + j]);
}

int64_t pool_bags(const char* base, int64_t ld_bytes, bool half, const int64_t* idx,
                  const int64_t* off, int64_t b0, int64_t b1, int64_t num_indices, int64_t num_rows,
                  const float* w, bool mean, int64_t d, float* out) {
  const int64_t row_bytes = d * (half ? 2 : 4);
  for (int64_t b = b0; b < b1; ++b) {
    float* acc = out + b * d;
    for (int64_t j = 0; j < d; ++j) acc[j] = 0.f;
    for (int64_t p = off[b]; p < off[b + 1]; ++p) {
      if (uint64_t(idx[p]) >= uint64_t(num_rows)) return p;
      prefetch_row_ahead(base, ld_bytes, row_bytes, idx, p, num_indices, num_rows);
      const char* row = base + idx[p] * ld_bytes;
      const float wt = w ? w[p] : 1.f;
      if (half) {
        const uint16_t* r = reinterpret_cast<const uint16_t*>(row);
        for (int64_t j = 0; j < d; ++j) acc[j] += wt * half_to_float(r[j]);
      } else {
        const float* r = reinterpret_cast<const float*>(row);
        for (int64_t j = 0; j < d; ++j) acc[j] += wt * r[j];
      }
    }
    const int64_t count = off[b + 1] - off[b];
    if (mean && count > 0)
      for (int64_t j = 0; j < d; ++j) acc[j] /= float(count);
  }
  return -1;
}

}  // namespace

const SimdKernels& simd_scalar() {
  static const SimdKernels k{"scalar",         kLanes,           score_tile_row,
                             score_tile_row_f16, score_tile_lanes, half_to_float_rows,
                             pool_bags,          nullptr,          nullptr,
                             nullptr};
  return k;
}

}  // namespace recserve::cpu
