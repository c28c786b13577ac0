// recserve._C_cuda: the CUDA kernels as a Python module. Use it through
// recserve.kernels (kernels/_cuda.py allocates the outputs with the caller's
// array library and passes its current stream); this layer turns objects with
// __cuda_array_interface__ into TensorViews, runs the shared argument checks
// (checks.h) plus the output checks, makes the arrays' device current, and
// releases the GIL around the launches and the error-flag synchronisation
// (skipped with validate=False: the caller guarantees the values).
//
// cudart is linked statically: importing this module needs no CUDA library and
// no driver; device_count() is 0 without one.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "bindings/convert.h"
#include "recserve/checks.h"
#include "recserve/ops.h"

#ifndef RECSERVE_CUDA_ARCHS
#define RECSERVE_CUDA_ARCHS ""
#endif
#ifndef RECSERVE_CUDA_VERSION
#define RECSERVE_CUDA_VERSION "unknown"
#endif

namespace py = pybind11;

namespace recserve::bindings {
namespace {

TensorView cuda_view(const py::handle& obj, const char* op, const char* name) {
  return device_view(obj, op, name);
}

TensorView optional_cuda_view(const py::object& obj, const char* op, const char* name) {
  if (obj.is_none()) return TensorView{};
  return cuda_view(obj, op, name);
}

void require_contiguous(const char* op, const char* name, const TensorView& t) {
  if (t.present && !t.contiguous()) arg_error(op, name, " must be contiguous");
}

// Outputs are allocated by kernels/_cuda.py; these checks guard direct callers.
void check_out(const char* op, const char* name, const TensorView& t, DType dtype,
               std::vector<int64_t> shape) {
  bool ok = t.dtype == dtype && t.ndim == int(shape.size()) && t.contiguous();
  for (size_t i = 0; ok && i < shape.size(); ++i) ok = t.shape[i] == shape[i];
  if (!ok) {
    std::string want = "(";
    for (size_t i = 0; i < shape.size(); ++i)
      want += std::to_string(shape[i]) + (shape.size() == 1 ? "," : (i + 1 < shape.size() ? ", " : ""));
    want += ")";
    arg_error(op, name, " must be a contiguous ", dtype_name(dtype), " array of shape ", want);
  }
}

// The device the arrays live on (made current for the launches), checking they
// agree. Empty arrays (null pointers) do not vote.
class ArgsDevice {
 public:
  explicit ArgsDevice(const char* op) : op_(op) {}

  void add(const TensorView& t, const char* name) {
    if (!t.present || t.data == nullptr) return;
    cudaPointerAttributes attr{};
    const cudaError_t err = cudaPointerGetAttributes(&attr, t.data);
    if (err != cudaSuccess) {
      cudaGetLastError();
      throw std::runtime_error(std::string(op_) + ": cannot query the memory of " + name +
                               " (no usable CUDA driver or device?): " + cudaGetErrorString(err));
    }
    if (attr.type == cudaMemoryTypeUnregistered)
      arg_error(op_, name, " does not point to CUDA memory");
    if (attr.type != cudaMemoryTypeDevice) {
      // Managed or mapped host memory: usable from any device; only a fallback.
      if (fallback_ < 0) fallback_ = attr.device;
      return;
    }
    if (device_ < 0) {
      device_ = attr.device;
      first_ = name;
    } else if (attr.device != device_) {
      arg_error(op_, name, " is on cuda:", attr.device, " but ", first_, " is on cuda:", device_,
                "; pass all arrays on the same device");
    }
  }
  int device() const { return device_ >= 0 ? device_ : fallback_; }

 private:
  const char* op_;
  const char* first_ = "";
  int device_ = -1;
  int fallback_ = -1;
};

// Makes `dev` current for the scope (no-op for dev < 0) and restores the
// previous device.
class DeviceGuard {
 public:
  explicit DeviceGuard(int dev) {
    if (dev < 0) return;
    if (cudaGetDevice(&prev_) != cudaSuccess) {
      cudaGetLastError();
      prev_ = -1;
    }
    if (prev_ != dev) {
      const cudaError_t err = cudaSetDevice(dev);
      if (err != cudaSuccess) {
        cudaGetLastError();
        throw std::runtime_error(std::string("cannot make cuda:") + std::to_string(dev) +
                                 " current: " + cudaGetErrorString(err));
      }
      changed_ = true;
    }
  }
  ~DeviceGuard() {
    if (changed_ && prev_ >= 0) {
      cudaSetDevice(prev_);
      cudaGetLastError();
    }
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = -1;
  bool changed_ = false;
};

void* as_stream(uintptr_t stream) { return reinterpret_cast<void*>(stream); }

void hash_flat_py(const py::object& data, const py::object& offsets, int64_t seed,
                  int64_t num_buckets, const py::object& out, uintptr_t stream, bool validate) {
  const char* op = "hash_features";
  check_hash_params(op, seed, num_buckets);
  const TensorView dv = cuda_view(data, op, "tokens data");
  const TensorView ov = cuda_view(offsets, op, "tokens offsets");
  check_hash_flat(op, dv, ov);
  require_contiguous(op, "tokens data", dv);
  require_contiguous(op, "tokens offsets", ov);
  const TensorView outv = cuda_view(out, op, "out");
  check_out(op, "out", outv, DType::i64, {ov.shape[0] - 1});
  ArgsDevice dev(op);
  dev.add(dv, "tokens data");
  dev.add(ov, "tokens offsets");
  dev.add(outv, "out");
  py::gil_scoped_release nogil;
  DeviceGuard guard(dev.device());
  cuda::hash_flat(dv, ov, uint32_t(seed), num_buckets, outv, as_stream(stream), validate);
}

void embedding_bag_py(const py::object& table, const py::object& indices, const py::object& offsets,
                      const py::object& weights, const std::string& mode, const py::object& out,
                      uintptr_t stream, bool validate) {
  const char* op = "embedding_bag";
  const PoolMode pm = parse_pool_mode(op, mode);
  const TensorView tv = cuda_view(table, op, "table");
  const TensorView iv = cuda_view(indices, op, "indices");
  const TensorView ov = cuda_view(offsets, op, "offsets");
  const TensorView wv = optional_cuda_view(weights, op, "weights");
  check_embedding_bag(tv, iv, ov, wv, pm);
  require_contiguous(op, "indices", iv);
  require_contiguous(op, "offsets", ov);
  require_contiguous(op, "weights", wv);
  const TensorView outv = cuda_view(out, op, "out");
  check_out(op, "out", outv, DType::f32, {ov.shape[0] - 1, tv.shape[1]});
  ArgsDevice dev(op);
  dev.add(tv, "table");
  dev.add(iv, "indices");
  dev.add(ov, "offsets");
  dev.add(wv, "weights");
  dev.add(outv, "out");
  py::gil_scoped_release nogil;
  DeviceGuard guard(dev.device());
  cuda::embedding_bag(tv, iv, ov, wv, pm, outv, as_stream(stream), validate);
}

void topk_py(const py::object& queries, const py::object& items, int64_t k,
             const py::object& exclude_indptr, const py::object& exclude_ids,
             const py::object& out_scores, const py::object& out_ids, uintptr_t stream,
             bool validate) {
  const char* op = "topk_inner_product";
  const TensorView qv = cuda_view(queries, op, "queries");
  const TensorView iv = cuda_view(items, op, "items");
  const TensorView eiv = optional_cuda_view(exclude_indptr, op, "exclude_indptr");
  const TensorView ejv = optional_cuda_view(exclude_ids, op, "exclude_ids");
  check_topk(qv, iv, k, eiv, ejv);
  if (k > kCudaMaxTopK) arg_error(op, "k must be <= ", kCudaMaxTopK, " on CUDA, got ", k);
  if (!qv.contiguous()) arg_error(op, "queries must be contiguous");
  require_contiguous(op, "exclude_indptr", eiv);
  require_contiguous(op, "exclude_ids", ejv);
  const TensorView sv = cuda_view(out_scores, op, "out_scores");
  const TensorView idv = cuda_view(out_ids, op, "out_ids");
  check_out(op, "out_scores", sv, DType::f32, {qv.shape[0], k});
  check_out(op, "out_ids", idv, DType::i64, {qv.shape[0], k});
  ArgsDevice dev(op);
  dev.add(qv, "queries");
  dev.add(iv, "items");
  dev.add(eiv, "exclude_indptr");
  dev.add(ejv, "exclude_ids");
  dev.add(sv, "out_scores");
  dev.add(idv, "out_ids");
  py::gil_scoped_release nogil;
  DeviceGuard guard(dev.device());
  cuda::topk_inner_product(qv, iv, k, eiv, ejv, sv, idv, as_stream(stream), validate);
}

py::dict build_info_py() {
  py::list archs;
  const std::string all = RECSERVE_CUDA_ARCHS;
  size_t start = 0;
  while (start < all.size()) {
    size_t end = all.find(',', start);
    if (end == std::string::npos) end = all.size();
    if (end > start) archs.append(all.substr(start, end - start));
    start = end + 1;
  }
  py::dict d;
  d["cuda_archs"] = archs;
  d["cuda_version"] = RECSERVE_CUDA_VERSION;
  return d;
}

}  // namespace
}  // namespace recserve::bindings

PYBIND11_MODULE(_C_cuda, m) {
  using namespace recserve::bindings;
  m.doc() = "recserve CUDA kernels (use recserve.kernels)";
  m.def("hash_flat", &hash_flat_py, py::arg("data"), py::arg("offsets"), py::arg("seed"),
        py::arg("num_buckets"), py::arg("out"), py::arg("stream"), py::arg("validate") = true);
  m.def("embedding_bag", &embedding_bag_py, py::arg("table"), py::arg("indices"), py::arg("offsets"),
        py::arg("weights"), py::arg("mode"), py::arg("out"), py::arg("stream"),
        py::arg("validate") = true);
  m.def("topk_inner_product", &topk_py, py::arg("queries"), py::arg("items"), py::arg("k"),
        py::arg("exclude_indptr"), py::arg("exclude_ids"), py::arg("out_scores"),
        py::arg("out_ids"), py::arg("stream"), py::arg("validate") = true);
  m.def("device_count", &recserve::cuda::device_count,
        "Number of CUDA devices; 0 without a driver or device (never raises).");
  m.def("build_info", &build_info_py);
  m.attr("MAX_TOPK") = recserve::kCudaMaxTopK;
}
