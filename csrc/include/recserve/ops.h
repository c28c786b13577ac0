// The ops, declared once and implemented per device (cpu/*_cpu.cpp,
// kernels/cuda/*.cu). Arguments have passed the checks in checks.h; value
// checks that need the data (index ranges, offsets) happen inside the op.
// Outputs are preallocated by the caller: float32/int64, C-contiguous.
#pragma once

#include <cstdint>
#include <vector>

#include "recserve/tensor.h"

namespace recserve {

namespace cpu {
// Tokens as flat UTF-8 bytes + int64 offsets[n + 1].
void hash_flat(const TensorView& data, const TensorView& offsets, uint32_t seed,
               int64_t num_buckets, const TensorView& out);
// NumPy fixed-width 'U' (UCS-4) or 'S' (bytes) arrays: `width` code units per
// element, trailing NULs are padding (NumPy's own convention).
void hash_ucs4(const uint32_t* data, int64_t n, int64_t width, uint32_t seed,
               int64_t num_buckets, int64_t* out);
void hash_fixed_bytes(const uint8_t* data, int64_t n, int64_t width, uint32_t seed,
                      int64_t num_buckets, int64_t* out);

void embedding_bag(const TensorView& table, const TensorView& indices, const TensorView& offsets,
                   const TensorView& weights, PoolMode mode, const TensorView& out);

void topk_inner_product(const TensorView& queries, const TensorView& items, int64_t k,
                        const TensorView& exclude_indptr, const TensorView& exclude_ids,
                        const TensorView& out_scores, const TensorView& out_ids);
// Tiles of items the CPU top-k scored through its bfloat16 pre-filter (since the
// process started): lets tests see that the filter path runs.
int64_t topk_bf16_filtered_tiles();
// Test hook: the rows of `items` that pass the bfloat16 pre-filter for `queries`
// (at most 256, float32) against thresholds `thr` (one per query, all finite), as the
// top-k applies it tile by tile. Throws std::invalid_argument where the filter cannot
// run (CPU without AVX512_BF16 selected, non-finite query or row norms).
std::vector<int64_t> topk_bf16_filter_rows(const TensorView& queries, const TensorView& items,
                                           const float* thr);

}  // namespace cpu

// Same ops on device memory, enqueued on `stream` (a cudaStream_t). Value errors
// found on the device are reported after a stream synchronisation. With
// validate = false the caller guarantees the values (offsets, index ranges,
// exclusion ids): the device-side checks are not read back and the op never
// synchronises (invalid values are still never read or written out of bounds;
// the result is then unspecified). The CPU ops check values inline at no extra
// cost, so they have no such argument.
namespace cuda {
void hash_flat(const TensorView& data, const TensorView& offsets, uint32_t seed,
               int64_t num_buckets, const TensorView& out, void* stream, bool validate = true);

void embedding_bag(const TensorView& table, const TensorView& indices, const TensorView& offsets,
                   const TensorView& weights, PoolMode mode, const TensorView& out, void* stream,
                   bool validate = true);

void topk_inner_product(const TensorView& queries, const TensorView& items, int64_t k,
                        const TensorView& exclude_indptr, const TensorView& exclude_ids,
                        const TensorView& out_scores, const TensorView& out_ids, void* stream,
                        bool validate = true);

// Device count; 0 when no driver or device is present (never throws).
int device_count();
}  // namespace cuda

}  // namespace recserve
