// The ops, declared once and implemented per device (cpu/*_cpu.cpp,
// kernels/cuda/*.cu). Arguments have passed the checks in checks.h; value
// checks that need the data (index ranges, offsets) happen inside the op.
// Outputs are preallocated by the caller: float32/int64, C-contiguous.
#pragma once

#include <cstdint>
#include <memory>
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

// The forms of an item matrix that the top-k's pre-filters score, made once for a
// matrix searched many times (a served model's items) instead of tile by tile in every
// call. Results are identical with or without them.
//
// bfloat16 (CPUs with AVX512_BF16): rows as bfloat16 pairs [num_items][(d + 1) / 2] and
// each tile's largest row norm (NaN for a tile holding a non-finite row); the same bits
// a call would compute. A call reads half the bytes (float32 items).
struct Bf16Items {
  int64_t num_items = 0, d = 0;
  std::vector<uint32_t> rows;
  std::vector<float> tile_norms;
};
// int8 (AVX2, without bfloat16 arithmetic): each tile quantized with one scale,
// rows [num_items][dq] (dq: d rounded up to 4) of round(x / scale) + 128 (padding 128,
// i.e. 0), and per tile the scale (NaN for a tile holding a non-finite value), the
// largest row norm and the largest norm of a row's quantization error.
struct I8Items {
  int64_t num_items = 0, d = 0, dq = 0;
  std::vector<uint8_t> rows;
  std::vector<float> tile_scale;
  std::vector<double> tile_norms, tile_errors;
};
// What topk_prepare makes: the form the selected ISA's filter reads, or neither.
struct PreparedItems {
  std::shared_ptr<const Bf16Items> bf16;
  std::shared_ptr<const I8Items> i8;
  int64_t nbytes() const;  // beyond the items themselves
};
PreparedItems topk_prepare(const TensorView& items);

// `prepared`: topk_prepare(items) of these same items, or nullptr.
void topk_inner_product(const TensorView& queries, const TensorView& items, int64_t k,
                        const TensorView& exclude_indptr, const TensorView& exclude_ids,
                        const TensorView& out_scores, const TensorView& out_ids,
                        const PreparedItems* prepared = nullptr);
// Tiles of items the CPU top-k scored through a pre-filter (since the process
// started): lets tests see that the filter path runs.
int64_t topk_filtered_tiles();
// Test hook: the rows of `items` that pass the selected ISA's pre-filter for `queries`
// (at most 256, float32) against thresholds `thr` (one per query, all finite), as the
// top-k applies it tile by tile; with `one_query`, the union of the rows the one-query
// kernel passes for each query. Prepared items are needed for the int8 filter and the
// one-query kernels. Throws std::invalid_argument where the filter cannot run (the ISA
// has none, non-finite query or row norms).
std::vector<int64_t> topk_filter_rows(const TensorView& queries, const TensorView& items, const float* thr,
                                      const PreparedItems* prepared = nullptr, bool one_query = false);

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
