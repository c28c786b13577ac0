// Shared pieces of recserve's CUDA kernels (hash.cu, embedding_bag.cu, topk.cu).
//
// * RECSERVE_CUDA_CHECK(expr): throws std::runtime_error naming the CUDA error,
//   the expression and file:line (pybind11 turns it into RuntimeError).
// * Device-side error flags: value checks that need the data (offsets monotonic,
//   index ranges) run inside the kernels. A kernel that finds a bad position p
//   does atomicMin(flag, p) on a uint64 in the op's workspace (initialised to
//   kNoError = all ones by a memset), so the reported position is the smallest
//   bad one, exactly like the CPU kernels. The host copies the flags back and
//   synchronises the stream: that is the only host synchronisation of an op, and
//   ops with nothing to validate never synchronise. The error message is then
//   rebuilt on the host from a few values copied back from the inputs, with the
//   same wording as the host checks (checks.h) / CPU kernels.
// * Workspace: one stream-ordered allocation per op (cudaMallocFromPoolAsync /
//   cudaFreeAsync) from a per-device memory pool owned by recserve. The pool keeps
//   up to kPoolReleaseThreshold bytes cached across stream synchronisations, so the
//   per-call allocation is cheap; a private pool means recserve never changes the
//   settings of the device's default pool that torch or CuPy may be using.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>

#include "recserve/checks.h"

#define RECSERVE_CUDA_CHECK(expr)                                                     \
  do {                                                                                \
    const cudaError_t recserve_err_ = (expr);                                         \
    if (recserve_err_ != cudaSuccess)                                                 \
      ::recserve::cuda::detail::throw_cuda_error(recserve_err_, #expr, __FILE__, __LINE__); \
  } while (0)

// After a <<<...>>> launch: reports bad launch configurations immediately. (Every
// runtime call here is checked and a failed one clears the error state, so the
// error read back belongs to this launch.)
#define RECSERVE_CUDA_CHECK_LAUNCH() RECSERVE_CUDA_CHECK(cudaGetLastError())

namespace recserve::cuda::detail {

using u64 = unsigned long long;  // the type CUDA's 64-bit atomics take

[[noreturn]] inline void throw_cuda_error(cudaError_t err, const char* expr, const char* file,
                                          int line) {
  cudaGetLastError();  // clear the (non-sticky) error so later calls start clean
  throw std::runtime_error(std::string("CUDA error ") + cudaGetErrorName(err) + " (" +
                           cudaGetErrorString(err) + ") in " + expr + " at " + file + ":" +
                           std::to_string(line));
}

// ---- small integer helpers (host and device) ---------------------------------

__host__ __device__ __forceinline__ int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }
__host__ __device__ __forceinline__ int64_t round_up(int64_t a, int64_t b) { return div_up(a, b) * b; }

// Smallest power of two >= x (x >= 1, result <= 2**62).
__host__ __device__ __forceinline__ int64_t next_pow2(int64_t x) {
  int64_t p = 1;
  while (p < x) p <<= 1;
  return p;
}

// Blocks for a grid-stride loop over n items (at least one block, so a launch is
// never empty; kernels guard their indices).
inline unsigned int grid_for(int64_t n, int threads, int64_t max_blocks = int64_t(1) << 20) {
  const int64_t b = div_up(n > 0 ? n : 1, threads);
  return static_cast<unsigned int>(b < max_blocks ? b : max_blocks);
}

// ---- device-side error flags ---------------------------------------------------

constexpr u64 kNoError = ~0ull;

__device__ __forceinline__ void record_error(u64* flag, int64_t pos) {
  atomicMin(flag, static_cast<u64>(pos));
}

// Entry i of a CSR offsets array of `len` entries violates "offsets[0] == 0,
// non-decreasing, offsets[len - 1] == total". The smallest bad entry identifies
// the same error the host check (check_offsets_values) reports first.
__device__ __forceinline__ bool offsets_entry_bad(const int64_t* off, int64_t i, int64_t len,
                                                  int64_t total) {
  const int64_t v = off[i];
  if (i == 0 ? v != 0 : v < off[i - 1]) return true;
  return i == len - 1 && v != total;
}

// ---- host helpers ----------------------------------------------------------------

inline cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }

inline int current_device() {
  int dev = 0;
  RECSERVE_CUDA_CHECK(cudaGetDevice(&dev));
  return dev;
}

inline int device_attr(cudaDeviceAttr attr, int dev) {
  int v = 0;
  RECSERVE_CUDA_CHECK(cudaDeviceGetAttribute(&v, attr, dev));
  return v;
}

inline bool aligned(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

// Bytes a pool keeps cached across synchronisations (beyond this, freed memory
// goes back to the driver at the next synchronisation). Covers the largest top-k
// workspace (256 MiB of partial lists, topk.cu) plus its exclusion table, so
// repeated calls do not map and unmap it each time.
constexpr uint64_t kPoolReleaseThreshold = uint64_t(320) << 20;

// recserve's memory pool for `dev`, created on first use; nullptr when the
// device does not support stream-ordered allocation.
inline cudaMemPool_t device_pool(int dev) {
  static std::mutex mu;
  static std::unordered_map<int, cudaMemPool_t>* pools = new std::unordered_map<int, cudaMemPool_t>();
  std::lock_guard<std::mutex> lock(mu);
  auto it = pools->find(dev);
  if (it != pools->end()) return it->second;
  cudaMemPool_t pool = nullptr;
  if (device_attr(cudaDevAttrMemoryPoolsSupported, dev) != 0) {
    cudaMemPoolProps props;
    std::memset(&props, 0, sizeof(props));
    props.allocType = cudaMemAllocationTypePinned;
    props.handleTypes = cudaMemHandleTypeNone;
    props.location.type = cudaMemLocationTypeDevice;
    props.location.id = dev;
    RECSERVE_CUDA_CHECK(cudaMemPoolCreate(&pool, &props));
    uint64_t threshold = kPoolReleaseThreshold;
    RECSERVE_CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &threshold));
  }
  (*pools)[dev] = pool;  // never destroyed: lives as long as the process
  return pool;
}

// One stream-ordered device allocation for the duration of an op. release()
// enqueues the free on the stream (the normal path); the destructor does the
// same, ignoring errors, when an exception unwinds the op.
class Workspace {
 public:
  Workspace(size_t bytes, cudaStream_t stream) : stream_(stream) {
    if (bytes == 0) return;
    cudaMemPool_t pool = device_pool(current_device());
    if (pool != nullptr) {
      RECSERVE_CUDA_CHECK(cudaMallocFromPoolAsync(&ptr_, bytes, pool, stream));
      async_ = true;
    } else {
      RECSERVE_CUDA_CHECK(cudaMalloc(&ptr_, bytes));
    }
  }
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  ~Workspace() {
    if (ptr_ == nullptr) return;
    if (async_) {
      cudaFreeAsync(ptr_, stream_);
    } else {
      cudaStreamSynchronize(stream_);
      cudaFree(ptr_);
    }
    cudaGetLastError();
  }

  void release() {
    if (ptr_ == nullptr) return;
    void* p = ptr_;
    ptr_ = nullptr;
    if (async_) {
      RECSERVE_CUDA_CHECK(cudaFreeAsync(p, stream_));
    } else {
      RECSERVE_CUDA_CHECK(cudaStreamSynchronize(stream_));
      RECSERVE_CUDA_CHECK(cudaFree(p));
    }
  }

  template <typename T>
  T* at(size_t byte_offset) const {
    return reinterpret_cast<T*>(static_cast<char*>(ptr_) + byte_offset);
  }

 private:
  void* ptr_ = nullptr;
  cudaStream_t stream_;
  bool async_ = false;
};

// One int64 of a device array (error path only).
inline int64_t read_i64(const int64_t* dev, int64_t index, cudaStream_t stream) {
  int64_t v = 0;
  RECSERVE_CUDA_CHECK(cudaMemcpyAsync(&v, dev + index, sizeof(v), cudaMemcpyDeviceToHost, stream));
  RECSERVE_CUDA_CHECK(cudaStreamSynchronize(stream));
  return v;
}

// The offsets error found at entry `pos` (the smallest bad entry), worded as
// check_offsets_values words it.
[[noreturn]] inline void throw_offsets_error(const char* op, const char* name, const int64_t* dev_off,
                                             int64_t len, int64_t total, const char* total_name,
                                             int64_t pos, cudaStream_t stream) {
  const int64_t cur = read_i64(dev_off, pos, stream);
  if (pos == 0 && cur != 0) arg_error(op, name, "[0] must be 0, got ", cur);
  if (pos > 0) {
    const int64_t prev = read_i64(dev_off, pos - 1, stream);
    if (cur < prev)
      arg_error(op, name, " must be non-decreasing, but ", name, "[", pos, "] = ", cur, " < ", name,
                "[", pos - 1, "] = ", prev);
  }
  const int64_t last = pos == len - 1 ? cur : read_i64(dev_off, len - 1, stream);
  arg_error(op, name, "[-1] must equal ", total_name, " = ", total, ", got ", last);
}

// ---- vector loads: W consecutive elements of T -> float[W] ------------------------
//
// VecIO<T, W>::Raw is the register type of one load (16, 8, 4 or 2 bytes); the
// pointer must be aligned to sizeof(Raw). Loads go through the read-only path.

template <typename T, int W>
struct VecIO;

template <>
struct VecIO<float, 4> {
  using Raw = float4;
  static __device__ __forceinline__ Raw load(const float* p) { return __ldg(reinterpret_cast<const float4*>(p)); }
  static __device__ __forceinline__ void convert(const Raw& r, float (&f)[4]) {
    f[0] = r.x; f[1] = r.y; f[2] = r.z; f[3] = r.w;
  }
};

template <>
struct VecIO<float, 2> {
  using Raw = float2;
  static __device__ __forceinline__ Raw load(const float* p) { return __ldg(reinterpret_cast<const float2*>(p)); }
  static __device__ __forceinline__ void convert(const Raw& r, float (&f)[2]) {
    f[0] = r.x; f[1] = r.y;
  }
};

template <>
struct VecIO<float, 1> {
  using Raw = float;
  static __device__ __forceinline__ Raw load(const float* p) { return __ldg(p); }
  static __device__ __forceinline__ void convert(const Raw& r, float (&f)[1]) { f[0] = r; }
};

__device__ __forceinline__ void half2x_to_float(unsigned int bits, float& lo, float& hi) {
  __half2 h;
  memcpy(&h, &bits, sizeof(h));
  const float2 f = __half22float2(h);
  lo = f.x;
  hi = f.y;
}

template <>
struct VecIO<__half, 8> {
  using Raw = uint4;
  static __device__ __forceinline__ Raw load(const __half* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }
  static __device__ __forceinline__ void convert(const Raw& r, float (&f)[8]) {
    half2x_to_float(r.x, f[0], f[1]);
    half2x_to_float(r.y, f[2], f[3]);
    half2x_to_float(r.z, f[4], f[5]);
    half2x_to_float(r.w, f[6], f[7]);
  }
};

template <>
struct VecIO<__half, 4> {
  using Raw = uint2;
  static __device__ __forceinline__ Raw load(const __half* p) { return __ldg(reinterpret_cast<const uint2*>(p)); }
  static __device__ __forceinline__ void convert(const Raw& r, float (&f)[4]) {
    half2x_to_float(r.x, f[0], f[1]);
    half2x_to_float(r.y, f[2], f[3]);
  }
};

template <>
struct VecIO<__half, 2> {
  using Raw = unsigned int;
  static __device__ __forceinline__ Raw load(const __half* p) { return __ldg(reinterpret_cast<const unsigned int*>(p)); }
  static __device__ __forceinline__ void convert(const Raw& r, float (&f)[2]) { half2x_to_float(r, f[0], f[1]); }
};

template <>
struct VecIO<__half, 1> {
  using Raw = unsigned short;
  static __device__ __forceinline__ Raw load(const __half* p) { return __ldg(reinterpret_cast<const unsigned short*>(p)); }
  static __device__ __forceinline__ void convert(const Raw& r, float (&f)[1]) {
    f[0] = __half2float(__ushort_as_half(r));
  }
};

// Widest vector (in elements, <= 16 bytes) usable for rows of `d` elements of
// `elem_bytes` each, `ld` elements apart, starting at `base`: every row start
// and every W-element step must stay aligned to the vector size.
inline int vector_width(const void* base, int64_t d, int64_t ld, int64_t rows, int elem_bytes,
                        int max_width) {
  for (int w = max_width; w > 1; w >>= 1) {
    if (d % w != 0) continue;
    if (rows > 1 && ld % w != 0) continue;
    if (!aligned(base, int64_t(w) * elem_bytes)) continue;
    return w;
  }
  return 1;
}

}  // namespace recserve::cuda::detail
