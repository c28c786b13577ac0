// recserve._C: the CPU kernels as a Python module. Use it through
// recserve.kernels, which adds the CUDA dispatch; this layer converts NumPy
// arrays to TensorViews, runs the shared argument checks, allocates outputs and
// releases the GIL around the compute.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <string>
#include <vector>

#include "bindings/convert.h"
#include "cpu/parallel.h"
#include "cpu/simd.h"
#include "recserve/checks.h"
#include "recserve/murmur3.h"
#include "recserve/ops.h"

#ifndef RECSERVE_VERSION
#define RECSERVE_VERSION "0+unknown"
#endif

namespace py = pybind11;

namespace recserve::bindings {
namespace {

constexpr const char* kHashOp = "hash_features";

uint32_t checked_seed(const char* op, int64_t seed) {
  check_hash_params(op, seed, 1);
  return uint32_t(seed);
}

// The bytes of a str (as UTF-8) or of any buffer (bytes, bytearray, memoryview...).
std::string_view token_bytes(const py::handle& obj, const char* op, const std::string& what,
                             py::object& keepalive) {
  if (PyUnicode_Check(obj.ptr())) {
    Py_ssize_t len = 0;
    const char* p = PyUnicode_AsUTF8AndSize(obj.ptr(), &len);
    if (p == nullptr) {
      PyErr_Clear();
      arg_error(op, what, " is not valid Unicode (a lone surrogate?) and cannot be encoded as UTF-8");
    }
    return {p, size_t(len)};
  }
  if (PyBytes_Check(obj.ptr())) {
    return {PyBytes_AS_STRING(obj.ptr()), size_t(PyBytes_GET_SIZE(obj.ptr()))};
  }
  if (PyObject_CheckBuffer(obj.ptr())) {
    keepalive = py::reinterpret_steal<py::object>(PyBytes_FromObject(obj.ptr()));
    if (!keepalive) throw py::error_already_set();
    return {PyBytes_AS_STRING(keepalive.ptr()), size_t(PyBytes_GET_SIZE(keepalive.ptr()))};
  }
  arg_error(op, what, " must be str or bytes, got ", py::str(py::type::of(obj).attr("__name__")).cast<std::string>());
}

uint32_t murmur3_32_py(const py::object& data, int64_t seed) {
  const uint32_t s = checked_seed("murmur3_32", seed);
  py::object keepalive;
  const std::string_view bytes = token_bytes(data, "murmur3_32", "data", keepalive);
  return murmur3_32(reinterpret_cast<const uint8_t*>(bytes.data()), int64_t(bytes.size()), s);
}

// Sequence of str/bytes objects (a list, tuple or object array), hashed in one
// pass while holding the GIL. Reading the objects needs the GIL anyway, and that
// read (one cache miss per object) costs more than the hash: releasing the GIL
// for a parallel hash would first need a reference to every object (a tuple copy
// plus increfs and decrefs, ~25 ns per token), which measured slower than
// hashing in place. The other layouts (flat bytes, U/S arrays) hash in parallel
// without the GIL.
py::array_t<int64_t> hash_objects(const py::handle& seq, uint32_t seed, int64_t num_buckets) {
  py::object fast = py::reinterpret_steal<py::object>(
      PySequence_Fast(seq.ptr(), "tokens must be a sequence"));
  if (!fast) throw py::error_already_set();
  const int64_t n = int64_t(PySequence_Fast_GET_SIZE(fast.ptr()));
  PyObject** items = PySequence_Fast_ITEMS(fast.ptr());
  py::array_t<int64_t> out(n);
  int64_t* o = out.mutable_data();
  for (int64_t i = 0; i < n; ++i) {
    PyObject* obj = items[i];
    const char* p;
    Py_ssize_t len = 0;
    if (PyUnicode_Check(obj)) {
      p = PyUnicode_AsUTF8AndSize(obj, &len);
      if (p == nullptr) {
        PyErr_Clear();
        arg_error(kHashOp, "tokens[", i, "] is not valid Unicode (a lone surrogate?) and cannot be encoded as UTF-8");
      }
    } else if (PyBytes_Check(obj)) {
      p = PyBytes_AS_STRING(obj);
      len = PyBytes_GET_SIZE(obj);
    } else {
      arg_error(kHashOp, "tokens[", i, "] must be str or bytes, got ", Py_TYPE(obj)->tp_name);
    }
    o[i] = murmur3_bucket(reinterpret_cast<const uint8_t*>(p), len, seed, uint64_t(num_buckets));
  }
  return out;
}

py::array_t<int64_t> hash_features_py(const py::object& tokens, int64_t seed, int64_t num_buckets) {
  check_hash_params(kHashOp, seed, num_buckets);
  const uint32_t s = uint32_t(seed);

  // Flat form: (data uint8[M], offsets int64[n + 1]).
  if (py::isinstance<py::tuple>(tokens) && py::len(tokens) == 2) {
    py::tuple pair = tokens;
    if (py::isinstance<py::array>(pair[0]) && py::isinstance<py::array>(pair[1])) {
      py::array data = contiguous(pair[0].cast<py::array>());
      py::array offsets = contiguous(pair[1].cast<py::array>());
      const TensorView dv = host_view(data), ov = host_view(offsets);
      check_hash_flat(kHashOp, dv, ov);
      py::array_t<int64_t> out(ov.shape[0] - 1);
      TensorView outv = host_view(out);
      py::gil_scoped_release nogil;
      cpu::hash_flat(dv, ov, s, num_buckets, outv);
      return out;
    }
  }
  if (py::isinstance<py::array>(tokens)) {
    py::array arr = tokens.cast<py::array>();
    if (arr.ndim() != 1) arg_error(kHashOp, "tokens must be 1-D, got ", arr.ndim(), "-D");
    const char kind = arr.dtype().kind();
    if (kind == 'O') return hash_objects(arr, s, num_buckets);
    if (kind != 'U' && kind != 'S')
      arg_error(kHashOp, "tokens array must hold str or bytes (dtype U, S or object), got ",
                py::str(arr.dtype()).cast<std::string>());
    arr = contiguous(arr);
    const int64_t n = arr.shape(0);
    py::array_t<int64_t> out(n);
    int64_t* o = out.mutable_data();
    py::gil_scoped_release nogil;
    if (kind == 'U')
      cpu::hash_ucs4(static_cast<const uint32_t*>(arr.data()), n, arr.itemsize() / 4, s, num_buckets, o);
    else
      cpu::hash_fixed_bytes(static_cast<const uint8_t*>(arr.data()), n, arr.itemsize(), s, num_buckets, o);
    return out;
  }
  if (py::isinstance<py::str>(tokens) || py::isinstance<py::bytes>(tokens))
    arg_error(kHashOp, "tokens must be a sequence of tokens, not a single ",
              py::isinstance<py::str>(tokens) ? "str" : "bytes", " (wrap it in a list)");
  if (py::isinstance<py::sequence>(tokens)) return hash_objects(tokens, s, num_buckets);
  arg_error(kHashOp, "tokens must be a list/array of str or bytes, or (data, offsets); got ",
            py::str(py::type::of(tokens).attr("__name__")).cast<std::string>());
}

TensorView optional_view(const py::object& obj, const char* op, const char* name, py::array& keep) {
  if (obj.is_none()) return TensorView{};
  keep = contiguous(as_numpy(obj, op, name));
  return host_view(keep);
}

py::array_t<float> embedding_bag_py(const py::object& table, const py::object& indices,
                                    const py::object& offsets, const std::string& mode,
                                    const py::object& weights) {
  const char* op = "embedding_bag";
  const PoolMode pm = parse_pool_mode(op, mode);
  py::array t = rows_contiguous(as_numpy(table, op, "table"));
  py::array i = contiguous(as_numpy(indices, op, "indices"));
  py::array o = contiguous(as_numpy(offsets, op, "offsets"));
  py::array w;
  const TensorView tv = host_view(t), iv = host_view(i), ov = host_view(o);
  const TensorView wv = optional_view(weights, op, "weights", w);
  check_embedding_bag(tv, iv, ov, wv, pm);
  py::array_t<float> out({ov.shape[0] - 1, tv.shape[1]});
  const TensorView outv = host_view(out);
  py::gil_scoped_release nogil;
  cpu::embedding_bag(tv, iv, ov, wv, pm, outv);
  return out;
}

// kernels.prepare_items: an item matrix with the top-k's filter form (bfloat16 or int8) made once.
struct PreparedItems {
  py::array items;  // rows contiguous; must not change while prepared
  cpu::PreparedItems forms;
};

PreparedItems prepare_items_py(const py::object& items) {
  const char* op = "prepare_items";
  py::array it = rows_contiguous(as_numpy(items, op, "items"));
  const TensorView iv = host_view(it);
  check_topk_items(op, iv);
  PreparedItems p{it, {}};
  {
    py::gil_scoped_release nogil;
    p.forms = cpu::topk_prepare(iv);
  }
  return p;
}

// The items of a top-k call as an array; a PreparedItems also gives its filter form.
py::array topk_items(const py::object& items, const char* op, const cpu::PreparedItems*& prepared) {
  if (py::isinstance<PreparedItems>(items)) {
    const auto& p = items.cast<const PreparedItems&>();
    prepared = &p.forms;
    return p.items;
  }
  prepared = nullptr;
  return rows_contiguous(as_numpy(items, op, "items"));
}

py::tuple topk_py(const py::object& queries, const py::object& items, int64_t k,
                  const py::object& exclude_indptr, const py::object& exclude_ids) {
  const char* op = "topk_inner_product";
  py::array q = contiguous(as_numpy(queries, op, "queries"));
  const cpu::PreparedItems* prepared = nullptr;
  py::array it = topk_items(items, op, prepared);
  py::array ei, ej;
  const TensorView qv = host_view(q), iv = host_view(it);
  const TensorView eiv = optional_view(exclude_indptr, op, "exclude_indptr", ei);
  const TensorView ejv = optional_view(exclude_ids, op, "exclude_ids", ej);
  check_topk(qv, iv, k, eiv, ejv);
  py::array_t<float> scores({qv.shape[0], k});
  py::array_t<int64_t> ids({qv.shape[0], k});
  const TensorView sv = host_view(scores), idv = host_view(ids);
  {
    py::gil_scoped_release nogil;
    cpu::topk_inner_product(qv, iv, k, eiv, ejv, sv, idv, prepared);
  }
  return py::make_tuple(scores, ids);
}

// Test hook for the pre-filters of the CPU top-k (see ops.h).
py::array_t<int64_t> topk_filter_py(const py::object& queries, const py::object& items,
                                         const py::object& thresholds, bool one_query) {
  const char* op = "topk_inner_product";
  py::array q = contiguous(as_numpy(queries, op, "queries"));
  const cpu::PreparedItems* prepared = nullptr;
  py::array it = topk_items(items, op, prepared);
  py::array_t<float, py::array::c_style | py::array::forcecast> t(thresholds);
  const TensorView qv = host_view(q), iv = host_view(it);
  check_topk(qv, iv, 1, TensorView{}, TensorView{});
  if (t.ndim() != 1 || t.shape(0) != qv.shape[0]) arg_error(op, "one threshold per query");
  std::vector<int64_t> rows;
  {
    py::gil_scoped_release nogil;
    rows = cpu::topk_filter_rows(qv, iv, t.data(), prepared, one_query);
  }
  return py::array_t<int64_t>(py::ssize_t(rows.size()), rows.data());
}

py::dict build_info_py() {
  py::dict d;
  d["version"] = RECSERVE_VERSION;
  d["cpu_isa"] = cpu::simd().name;
  d["cpu_isas_supported"] = cpu::supported_isas();
#if defined(_OPENMP)
  d["openmp"] = true;
#else
  d["openmp"] = false;
#endif
  d["cpu_threads"] = cpu::max_threads();
  return d;
}

}  // namespace
}  // namespace recserve::bindings

PYBIND11_MODULE(_C, m) {
  using namespace recserve::bindings;
  m.doc() = "recserve CPU kernels (use recserve.kernels)";
  m.def("murmur3_32", &murmur3_32_py, py::arg("data"), py::arg("seed") = 0);
  m.def("hash_features", &hash_features_py, py::arg("tokens"), py::kw_only(), py::arg("seed"),
        py::arg("num_buckets"));
  m.def("embedding_bag", &embedding_bag_py, py::arg("table"), py::arg("indices"), py::arg("offsets"),
        py::kw_only(), py::arg("mode") = "sum", py::arg("weights") = py::none());
  m.def("topk_inner_product", &topk_py, py::arg("queries"), py::arg("items"), py::arg("k"),
        py::kw_only(), py::arg("exclude_indptr") = py::none(), py::arg("exclude_ids") = py::none());
  py::class_<PreparedItems>(m, "PreparedItems", "An item matrix prepared for many top-k calls (kernels.prepare_items).")
      .def_readonly("items", &PreparedItems::items)
      .def_property_readonly("bfloat16", [](const PreparedItems& p) { return p.forms.bf16 != nullptr; })
      .def_property_readonly("int8", [](const PreparedItems& p) { return p.forms.i8 != nullptr; })
      .def_property_readonly("nbytes", [](const PreparedItems& p) { return p.forms.nbytes(); });  // beyond the items
  m.def("prepare_items", &prepare_items_py, py::arg("items"));
  m.def("build_info", &build_info_py);
  // Test/benchmark hooks: run the CPU kernels with a lower ISA than the best.
  m.def("_set_isa", &recserve::cpu::set_isa, py::arg("name"));
  m.def("_isa", [] { return std::string(recserve::cpu::simd().name); });
  m.def("_topk_filtered_tiles", &recserve::cpu::topk_filtered_tiles);
  // Server hook: kernels called from this thread use at most n threads (the model loader).
  m.def("_set_calling_thread_limit", &recserve::cpu::set_calling_thread_limit, py::arg("n"));
  m.def("_calling_thread_limit", &recserve::cpu::max_threads);
  m.def("_topk_filter", &topk_filter_py, py::arg("queries"), py::arg("items"), py::arg("thresholds"),
        py::arg("one_query") = false);
}
