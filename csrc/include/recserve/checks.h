// Argument checks shared by every backend. Each failure throws
// std::invalid_argument (pybind11 turns it into ValueError) with a message that
// names the op and the argument, so bad input never reaches a kernel.
//
// Shape/dtype checks run on TensorView metadata and are device-agnostic. Value
// checks (offsets monotonic, index ranges) need the data: the host versions are
// here, the CUDA kernels do the same checks on the device.
#pragma once

#include <cstdint>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>

#include "recserve/tensor.h"

namespace recserve {

template <typename... Parts>
[[noreturn]] void arg_error(const char* op, const Parts&... parts) {
  std::ostringstream os;
  os << op << ": ";
  (os << ... << parts);
  throw std::invalid_argument(os.str());
}

inline void check_ndim(const char* op, const char* name, const TensorView& t, int ndim) {
  if (t.ndim != ndim)
    arg_error(op, name, " must be ", ndim, "-D, got ", t.ndim, "-D");
}

inline void check_dtype(const char* op, const char* name, const TensorView& t, DType want) {
  if (t.dtype != want)
    arg_error(op, name, " must be ", dtype_name(want), ", got ", t.dtype_str);
}

inline void check_float_table(const char* op, const char* name, const TensorView& t) {
  check_ndim(op, name, t, 2);
  if (t.dtype != DType::f32 && t.dtype != DType::f16)
    arg_error(op, name, " must be float32 or float16, got ", t.dtype_str);
  // Negative, or not a whole number of elements (stored as -1): the Python layer
  // copies such views; a direct caller gets an error, never an out-of-bounds read.
  if (t.shape[0] > 1 && t.stride[0] < 0)
    arg_error(op, name, " must have a non-negative row stride that is a whole number of elements");
}

// CSR-style offsets: 1-D int64 of length `n_segments + 1` (n_segments unknown
// when < 0).
inline void check_offsets_meta(const char* op, const char* name, const TensorView& t) {
  check_ndim(op, name, t, 1);
  check_dtype(op, name, t, DType::i64);
  if (t.shape[0] < 1) arg_error(op, name, " must have at least one element (offsets[0] = 0)");
}

// Host-side value check: offsets[0] == 0, non-decreasing, offsets[-1] == total.
inline void check_offsets_values(const char* op, const char* name, const int64_t* offsets,
                                 int64_t len, int64_t total, const char* total_name) {
  if (offsets[0] != 0) arg_error(op, name, "[0] must be 0, got ", offsets[0]);
  for (int64_t i = 1; i < len; ++i) {
    if (offsets[i] < offsets[i - 1])
      arg_error(op, name, " must be non-decreasing, but ", name, "[", i, "] = ", offsets[i],
                " < ", name, "[", i - 1, "] = ", offsets[i - 1]);
  }
  if (offsets[len - 1] != total)
    arg_error(op, name, "[-1] must equal ", total_name, " = ", total, ", got ", offsets[len - 1]);
}

inline void check_hash_params(const char* op, int64_t seed, int64_t num_buckets) {
  if (seed < 0 || seed > int64_t(std::numeric_limits<uint32_t>::max()))
    arg_error(op, "seed must be in [0, 2**32), got ", seed);
  if (num_buckets < 1) arg_error(op, "num_buckets must be >= 1, got ", num_buckets);
}

inline void check_hash_flat(const char* op, const TensorView& data, const TensorView& offsets) {
  check_ndim(op, "tokens data", data, 1);
  check_dtype(op, "tokens data", data, DType::u8);
  check_offsets_meta(op, "tokens offsets", offsets);
}

inline PoolMode parse_pool_mode(const char* op, const std::string& mode) {
  if (mode == "sum") return PoolMode::sum;
  if (mode == "mean") return PoolMode::mean;
  arg_error(op, "mode must be 'sum' or 'mean', got '", mode, "'");
}

inline void check_embedding_bag(const TensorView& table, const TensorView& indices,
                                const TensorView& offsets, const TensorView& weights,
                                PoolMode mode) {
  const char* op = "embedding_bag";
  check_float_table(op, "table", table);
  if (!table.rows_contiguous()) arg_error(op, "table rows must be contiguous");
  check_ndim(op, "indices", indices, 1);
  check_dtype(op, "indices", indices, DType::i64);
  check_offsets_meta(op, "offsets", offsets);
  if (weights.present) {
    if (mode != PoolMode::sum) arg_error(op, "weights are only supported with mode='sum'");
    check_ndim(op, "weights", weights, 1);
    check_dtype(op, "weights", weights, DType::f32);
    if (weights.shape[0] != indices.shape[0])
      arg_error(op, "weights has ", weights.shape[0], " elements but indices has ",
                indices.shape[0]);
  }
}

// Largest k the CUDA top-k supports (block-level selection in shared memory).
constexpr int64_t kCudaMaxTopK = 1024;

inline void check_topk_items(const char* op, const TensorView& items) {
  check_float_table(op, "items", items);
  if (!items.rows_contiguous()) arg_error(op, "items rows must be contiguous");
  if (items.shape[0] > int64_t(std::numeric_limits<int32_t>::max()))
    arg_error(op, "items has ", items.shape[0], " rows; at most 2**31 - 1 are supported");
}

inline void check_topk(const TensorView& queries, const TensorView& items, int64_t k,
                       const TensorView& exclude_indptr, const TensorView& exclude_ids) {
  const char* op = "topk_inner_product";
  check_ndim(op, "queries", queries, 2);
  check_dtype(op, "queries", queries, DType::f32);
  check_topk_items(op, items);
  if (queries.shape[1] != items.shape[1])
    arg_error(op, "queries has d=", queries.shape[1], " but items has d=", items.shape[1]);
  if (k < 1) arg_error(op, "k must be >= 1, got ", k);
  if (exclude_indptr.present != exclude_ids.present)
    arg_error(op, "exclude_indptr and exclude_ids must be given together");
  if (exclude_indptr.present) {
    check_offsets_meta(op, "exclude_indptr", exclude_indptr);
    if (exclude_indptr.shape[0] != queries.shape[0] + 1)
      arg_error(op, "exclude_indptr must have B + 1 = ", queries.shape[0] + 1,
                " elements, got ", exclude_indptr.shape[0]);
    check_ndim(op, "exclude_ids", exclude_ids, 1);
    check_dtype(op, "exclude_ids", exclude_ids, DType::i64);
  }
}

}  // namespace recserve
