// Pooled embedding lookup on the CPU: bags in parallel; each bag is validated,
// then pooled by the SIMD table's pool_rows (float32 accumulators in registers,
// software prefetch of rows a few indices ahead, across bag boundaries).
#include "cpu/parallel.h"
#include "cpu/simd.h"
#include "recserve/checks.h"
#include "recserve/ops.h"

namespace recserve::cpu {
namespace {

constexpr const char* kOp = "embedding_bag";
constexpr int64_t kMinElementsPerThread = 1 << 16;

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
  const int64_t ld_bytes = table.stride[0] * (half ? 2 : 4);
  const char* base = static_cast<const char*>(table.data);
  const SimdKernels& sk = simd();
  FirstError bad;

  const int nt = threads_for((num_indices + num_bags) * d, kMinElementsPerThread);
#pragma omp parallel for num_threads(nt) schedule(static, 64)
  for (int64_t b = 0; b < num_bags; ++b) {
    const int64_t lo = off[b], hi = off[b + 1];
    float* acc = o + b * d;
    bool valid = true;
    for (int64_t p = lo; p < hi && valid; ++p) {
      if (uint64_t(idx[p]) >= uint64_t(num_rows)) {
        bad.record(p);
        valid = false;
      }
    }
    if (!valid) continue;
    sk.pool_rows(base, ld_bytes, half, idx, lo, hi, num_indices, num_rows, w, d, acc);
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
