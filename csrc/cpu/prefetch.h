// Software prefetch for gathers of random table rows (latency-bound: the
// hardware prefetcher cannot guess the next row).
#pragma once

#include <cstdint>

namespace recserve::cpu {

// How many indices ahead to prefetch: enough to cover DRAM latency at a few
// hundred bytes per row, small enough not to evict rows still in use.
constexpr int64_t kPrefetchDistance = 16;
// One prefetch per 128-byte line pair: the L2 adjacent-line prefetcher brings the
// other half. Prefetching every 64-byte line fills the L1 miss buffers with
// prefetches and measured slower (bench/kernels.py, embedding_bag, 256-byte rows).
constexpr int64_t kPrefetchStride = 128;

// Prefetches row idx[p + kPrefetchDistance], if there is one and it is a valid
// row (indices that far ahead have not been validated yet).
inline void prefetch_row_ahead(const char* base, int64_t ld_bytes, int64_t row_bytes,
                               const int64_t* idx, int64_t p, int64_t total, int64_t num_rows) {
  const int64_t ahead = p + kPrefetchDistance;
  if (ahead >= total) return;
  const int64_t r = idx[ahead];
  if (uint64_t(r) >= uint64_t(num_rows)) return;
  const char* row = base + r * ld_bytes;
  for (int64_t b = 0; b < row_bytes; b += kPrefetchStride) __builtin_prefetch(row + b, 0, 3);
}

}  // namespace recserve::cpu
