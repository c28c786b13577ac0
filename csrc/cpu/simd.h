// Run-time ISA dispatch for the CPU kernels' inner loops.
//
// Each ISA (scalar, AVX2, AVX-512) fills one SimdKernels table in its own
// translation unit (simd_<isa>.cpp) using function-level target attributes, so
// the rest of the library is compiled for the baseline ISA and never executes an
// instruction the CPU lacks. The table is chosen once from CPUID; tests and
// benchmarks can force a lower ISA with set_isa().
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace recserve::cpu {

struct SimdKernels {
  const char* name;
  // Query lanes processed together by score_tile_lanes (the SIMD width in floats).
  int lanes;

  // scores[i] = dot(q, x_i) for n rows x_i = x + i * ldx of length d. Returns the
  // number of rows with scores[i] > thr, their row numbers written to hits.
  int64_t (*score_tile_row)(const float* q, float thr, const float* x, int64_t ldx, int64_t n,
                            int64_t d, float* scores, int32_t* hits);

  // `lanes` queries at once: qt is the query block transposed, [d][lanes]
  // (lanes beyond the real queries are zero). scores[i * lanes + g] = dot(q_g, x_i).
  // Returns the rows where any lane beats thr[g], written to hits.
  int64_t (*score_tile_lanes)(const float* qt, const float* thr, const float* x, int64_t ldx,
                              int64_t n, int64_t d, float* scores, int32_t* hits);

  // dst[i * d + j] = float(src[i * lds + j]) for IEEE binary16 src.
  void (*half_to_float_rows)(const uint16_t* src, int64_t lds, int64_t n, int64_t d, float* dst);

  // acc[j] += w * row[j], j < d.
  void (*axpy_f32)(float w, const float* row, float* acc, int64_t d);
  void (*axpy_f16)(float w, const uint16_t* row, float* acc, int64_t d);
};

const SimdKernels& simd_scalar();
const SimdKernels& simd_avx2();
const SimdKernels& simd_avx512();

// The table in use (the best the CPU supports unless set_isa() lowered it).
const SimdKernels& simd();
// ISAs this CPU can run, best last: e.g. {"scalar", "avx2", "avx512"}.
std::vector<std::string> supported_isas();
// Force an ISA; throws std::invalid_argument if unknown or unsupported here.
void set_isa(const std::string& name);

}  // namespace recserve::cpu
