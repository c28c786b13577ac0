// Python objects -> TensorView: NumPy arrays for _C, objects exposing
// __cuda_array_interface__ (CuPy, torch, numba...) for _C_cuda.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>

#include "recserve/checks.h"
#include "recserve/tensor.h"

namespace recserve::bindings {

namespace py = pybind11;

// A readable dtype name for error messages from an array-interface typestr
// ("<f8" -> "float64"). Built in C++: str(np.dtype) runs Python code (~µs).
inline std::string readable_dtype(const std::string& typestr) {
  if (typestr.size() < 3) return "'" + typestr + "'";
  const char kind = typestr[1];
  int nbytes = 0;
  for (size_t i = 2; i < typestr.size(); ++i) {
    if (typestr[i] < '0' || typestr[i] > '9') return "'" + typestr + "'";
    nbytes = nbytes * 10 + (typestr[i] - '0');
  }
  const std::string bits = std::to_string(nbytes * 8);
  std::string name;
  switch (kind) {
    case 'f': name = "float" + bits; break;
    case 'i': name = "int" + bits; break;
    case 'u': name = "uint" + bits; break;
    case 'c': name = "complex" + bits; break;
    case 'b': name = "bool"; break;
    case 'U': name = "str"; break;
    case 'S': name = "bytes"; break;
    case 'O': name = "object"; break;
    case 'V': name = nbytes == 2 ? "bfloat16 ('" + typestr + "')" : "'" + typestr + "'"; break;
    default: name = "'" + typestr + "'";
  }
  return typestr[0] == '>' ? name + " (big-endian)" : name;
}

// typestr per the array interface protocol ("<f4", "|u1", ...).
inline DType dtype_from_typestr(const std::string& ts) {
  if (ts.size() < 3) return DType::other;
  const char order = ts[0];
  if (order == '>') return DType::other;  // big-endian data is not supported
  const std::string kind_size = ts.substr(1);
  if (kind_size == "f4") return DType::f32;
  if (kind_size == "f2") return DType::f16;
  if (kind_size == "i8") return DType::i64;
  if (kind_size == "u1") return DType::u8;
  return DType::other;
}

// View of a NumPy array. Shapes/strides are taken as they are; rank > 2 is
// reported with its real rank by the checks.
inline TensorView host_view(const py::array& a) {
  TensorView t;
  t.present = true;
  t.data = const_cast<void*>(a.data());
  // One dtype mapping for both bindings: describe the NumPy dtype as an
  // array-interface typestr ("<f4").
  const py::dtype dt = a.dtype();
  const std::string typestr =
      std::string{dt.byteorder() == '>' ? '>' : '<', dt.kind()} + std::to_string(dt.itemsize());
  t.dtype = dtype_from_typestr(typestr);
  t.dtype_str = readable_dtype(typestr);
  t.ndim = int(a.ndim());
  const auto itemsize = a.itemsize();
  for (int i = 0; i < t.ndim && i < 2; ++i) {
    t.shape[i] = a.shape(i);
    // Strides that are not a multiple of the item size cannot be expressed in
    // elements: mark them so the caller copies.
    t.stride[i] = (a.strides(i) % itemsize == 0) ? a.strides(i) / itemsize : -1;
  }
  return t;
}

// Any array-like -> NumPy array, without a copy when it already is one.
inline py::array as_numpy(const py::handle& obj, const char* op, const char* name) {
  if (py::isinstance<py::array>(obj)) return py::reinterpret_borrow<py::array>(obj);
  if (py::hasattr(obj, "__cuda_array_interface__"))
    arg_error(op, name, " is a CUDA array but other arguments are on the host");
  try {
    return py::array::ensure(obj);
  } catch (py::error_already_set&) {
  }
  arg_error(op, name, " must be a NumPy array");
}

// C-contiguous NumPy array (a copy only when needed); small inputs take this path.
inline py::array contiguous(const py::array& a) {
  return py::array::ensure(a, py::array::c_style);
}

// Contiguous rows, any row stride: big tables/items (possibly np.memmap bigger
// than RAM) are used in place; only a column-strided view is copied.
inline py::array rows_contiguous(const py::array& a) {
  if (a.ndim() == 2 && a.shape(1) > 1 && a.strides(1) != a.itemsize()) return contiguous(a);
  if (a.ndim() == 2 && (a.strides(0) < 0 || a.strides(0) % a.itemsize() != 0))
    return contiguous(a);
  return a;
}

// View of an object exposing __cuda_array_interface__ (version 2 or 3).
inline TensorView device_view(const py::handle& obj, const char* op, const char* name) {
  if (!py::hasattr(obj, "__cuda_array_interface__"))
    arg_error(op, name, " must be a CUDA array (CuPy or torch) like the other arguments");
  py::dict cai = obj.attr("__cuda_array_interface__");
  TensorView t;
  t.present = true;
  py::tuple data = cai["data"];
  // data[1] is the read-only flag: fine for inputs, and outputs are allocated by the
  // Python layer, so it needs no check.
  t.data = reinterpret_cast<void*>(data[0].cast<uintptr_t>());
  const std::string typestr = cai["typestr"].cast<std::string>();
  t.dtype = dtype_from_typestr(typestr);
  t.dtype_str = readable_dtype(typestr);
  py::tuple shape = cai["shape"];
  t.ndim = int(shape.size());
  const int64_t itemsize = dtype_size(t.dtype);
  int64_t expected = 1;
  for (int i = t.ndim - 1; i >= 0; --i) {
    const int64_t extent = shape[i].cast<int64_t>();
    if (i < 2) t.shape[i] = extent;
    if (i < 2) t.stride[i] = expected;
    expected *= extent;
  }
  if (cai.contains("strides") && !cai["strides"].is_none() && itemsize > 0) {
    py::tuple strides = cai["strides"];
    for (int i = 0; i < t.ndim && i < 2; ++i) {
      const int64_t s = strides[i].cast<int64_t>();
      t.stride[i] = (s % itemsize == 0) ? s / itemsize : -1;
    }
  }
  return t;
}

}  // namespace recserve::bindings
