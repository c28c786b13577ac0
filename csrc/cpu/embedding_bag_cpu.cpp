// Pooled embedding lookup on the CPU: each thread hands one contiguous run of
// bags to the SIMD table's pool_bags (float32 accumulators in registers, indices
// checked as they are read, software prefetch of rows a few indices ahead across
// bag boundaries).
#include <algorithm>

#include "cpu/parallel.h"
#include "cpu/prefetch.h"
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

  // Each thread pools one contiguous run of bags holding ~1/nt of the indices:
  // balanced for any bag sizes, and the row prefetch runs ahead through the
  // thread's own indices without a gap at chunk boundaries.
  const int nt = threads_for((num_indices + num_bags) * d, kMinElementsPerThread);
#pragma omp parallel num_threads(nt)
  {
    const int t = thread_id();
    auto first_bag = [&](int part) -> int64_t {
      if (part == 0) return 0;
      if (part == nt) return num_bags;
      const int64_t target = num_indices / nt * part + std::min<int64_t>(part, num_indices % nt);
      return std::lower_bound(off, off + num_bags, target) - off;
    };
    const int64_t b0 = first_bag(t), b1 = std::max(b0, first_bag(t + 1));
    const int64_t row_bytes = d * (half ? 2 : 4);
    for (int64_t p = off[b0]; p < std::min(off[b1], off[b0] + kPrefetchDistance); ++p)
      prefetch_row_ahead(base, ld_bytes, row_bytes, idx, p - kPrefetchDistance, num_indices, num_rows);
    const int64_t p = sk.pool_bags(base, ld_bytes, half, idx, off, b0, b1, num_indices, num_rows,
                                   w, mode == PoolMode::mean, d, o);
    if (p >= 0) bad.record(p);
  }
  if (bad.any()) {
    const int64_t p = bad.get();
    arg_error(kOp, "indices[", p, "] = ", idx[p], " is out of range for a table with ", num_rows,
              " rows");
  }
}

}  // namespace recserve::cpu
