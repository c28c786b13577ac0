// A non-owning view of a 1-D or 2-D array on the host or on a CUDA device.
//
// The bindings build TensorViews from NumPy arrays (_C) or from objects exposing
// __cuda_array_interface__ (_C_cuda); kernels only ever see TensorViews and raw
// pointers, so the CPU and CUDA implementations share one set of argument checks.
#pragma once

#include <cstdint>
#include <string>

namespace recserve {

enum class DType { f32, f16, i64, u8, other };

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::f32: return "float32";
    case DType::f16: return "float16";
    case DType::i64: return "int64";
    case DType::u8: return "uint8";
    default: return "unsupported";
  }
}

inline int64_t dtype_size(DType t) {
  switch (t) {
    case DType::f32: return 4;
    case DType::f16: return 2;
    case DType::i64: return 8;
    case DType::u8: return 1;
    default: return 0;
  }
}

struct TensorView {
  void* data = nullptr;
  DType dtype = DType::other;
  std::string dtype_str;      // as the array library spells it, for error messages
  int ndim = 0;
  int64_t shape[2] = {0, 0};
  int64_t stride[2] = {0, 0};  // in elements, not bytes
  bool present = false;        // false for an optional argument that was None

  int64_t numel() const {
    int64_t n = 1;
    for (int i = 0; i < ndim; ++i) n *= shape[i];
    return n;
  }
  // Rows are contiguous (innermost stride 1); the row stride may be larger
  // (a slice of a wider table) without forcing a copy of a huge memmap.
  // (Empty arrays count as contiguous whatever their strides: NumPy reports 0.)
  bool rows_contiguous() const {
    return ndim == 2 && (numel() == 0 || shape[1] <= 1 || stride[1] == 1);
  }
  bool contiguous() const {
    if (numel() == 0) return true;
    if (ndim == 1) return shape[0] <= 1 || stride[0] == 1;
    return rows_contiguous() && (shape[0] <= 1 || stride[0] == shape[1]);
  }
  template <typename T>
  T* ptr() const { return static_cast<T*>(data); }
};

enum class PoolMode { sum, mean };

}  // namespace recserve
