// Portable inner loops: the reference for the SIMD tables and the path on CPUs
// without AVX2.
#include "cpu/half.h"
#include "cpu/simd.h"

namespace recserve::cpu {
namespace {

int64_t score_tile_row(const float* q, float thr, const float* x, int64_t ldx, int64_t n,
                       int64_t d, float* scores, int32_t* hits) {
  int64_t nh = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float* xi = x + i * ldx;
    float s = 0.f;
    for (int64_t j = 0; j < d; ++j) s += q[j] * xi[j];
    scores[i] = s;
    if (s > thr) hits[nh++] = int32_t(i);
  }
  return nh;
}

constexpr int kLanes = 8;

int64_t score_tile_lanes(const float* qt, const float* thr, const float* x, int64_t ldx,
                         int64_t n, int64_t d, float* scores, int32_t* hits) {
  int64_t nh = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float* xi = x + i * ldx;
    float acc[kLanes] = {};
    for (int64_t j = 0; j < d; ++j)
      for (int g = 0; g < kLanes; ++g) acc[g] += qt[j * kLanes + g] * xi[j];
    bool hit = false;
    for (int g = 0; g < kLanes; ++g) {
      scores[i * kLanes + g] = acc[g];
      hit |= acc[g] > thr[g];
    }
    if (hit) hits[nh++] = int32_t(i);
  }
  return nh;
}

void half_to_float_rows(const uint16_t* src, int64_t lds, int64_t n, int64_t d, float* dst) {
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < d; ++j) dst[i * d + j] = half_to_float(src[i * lds + j]);
}

void axpy_f32(float w, const float* row, float* acc, int64_t d) {
  for (int64_t j = 0; j < d; ++j) acc[j] += w * row[j];
}

void axpy_f16(float w, const uint16_t* row, float* acc, int64_t d) {
  for (int64_t j = 0; j < d; ++j) acc[j] += w * half_to_float(row[j]);
}

}  // namespace

const SimdKernels& simd_scalar() {
  static const SimdKernels k{"scalar",           kLanes,   score_tile_row, score_tile_lanes,
                             half_to_float_rows, axpy_f32, axpy_f16};
  return k;
}

}  // namespace recserve::cpu
