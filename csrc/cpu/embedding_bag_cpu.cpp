// Pooled embedding lookup on the CPU: bags in parallel, rows gathered with
// software prefetch (random rows of a large table are latency-bound), float32
// accumulation straight into the output row.
#include "cpu/parallel.h"
#include "cpu/simd.h"
#include "recserve/checks.h"
#include "recserve/ops.h"

namespace recserve::cpu {
namespace {

constexpr const char* kOp = "embedding_bag";
// How many indices ahead to prefetch: enough to cover DRAM latency at a few
// hundred bytes per row, small enough not to evict rows still in use.
constexpr int64_t kPrefetchDistance = 8;
constexpr int64_t kMinElementsPerThread = 1 << 16;

inline void prefetch_row(const char* row, int64_t bytes) {
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(row + b, 0, 1);
}

}  // namespace

void embedding_bag(const TensorView& table, const TensorView& indices, const TensorView& offsets,
                   const TensorView& weights, PoolMode mode, const TensorView& out) {
  const int64_t num_bags = offsets.shape[0] - 1;
  const int64_t num_indices = indices.shape[0];
  const int64_t num_rows = table.shape[0], d = table.shape[1];
  const int64_t* off = offsets.ptr<int64_t>();
  const int64_t* idx = indices.ptr<int64_t>();
  const float* w = weights.present ? weights.ptr<float>() : nullptr;
  float* o = out.ptr<float>();
  check_offsets_values(kOp, "offsets", off, num_bags + 1, num_indices, "len(indices)");

  const bool half = table.dtype == DType::f16;
  const int64_t elem = half ? 2 : 4;
  const int64_t row_bytes = d * elem;
  const char* base = static_cast<const char*>(table.data);
  const int64_t ld_bytes = table.stride[0] * elem;
  const SimdKernels& sk = simd();
  FirstError bad;

  const int nt = threads_for((num_indices + num_bags) * d, kMinElementsPerThread);
#pragma omp parallel for num_threads(nt) schedule(dynamic, 16)
  for (int64_t b = 0; b < num_bags; ++b) {
    float* acc = o + b * d;
    for (int64_t j = 0; j < d; ++j) acc[j] = 0.f;
    const int64_t lo = off[b], hi = off[b + 1];
    for (int64_t p = lo; p < hi; ++p) {
      // Prefetch across bag boundaries too: with one row per bag there is no
      // "later in this bag" to prefetch.
      const int64_t ahead = p + kPrefetchDistance;
      if (ahead < num_indices) {
        const int64_t r = idx[ahead];
        if (r >= 0 && r < num_rows) prefetch_row(base + r * ld_bytes, row_bytes);
      }
      const int64_t r = idx[p];
      if (r < 0 || r >= num_rows) {
        bad.record(p);
        break;
      }
      const float wt = w ? w[p] : 1.f;
      const char* row = base + r * ld_bytes;
      if (half) sk.axpy_f16(wt, reinterpret_cast<const uint16_t*>(row), acc, d);
      else sk.axpy_f32(wt, reinterpret_cast<const float*>(row), acc, d);
    }
    if (mode == PoolMode::mean && hi > lo) {
      const float count = float(hi - lo);  // divide (not * 1/count): matches the spec bit for bit
      for (int64_t j = 0; j < d; ++j) acc[j] /= count;
    }
  }
  if (bad.any()) {
    const int64_t p = bad.get();
    arg_error(kOp, "indices[", p, "] = ", idx[p], " is out of range for a table with ", num_rows,
              " rows");
  }
}

}  // namespace recserve::cpu
