// Feature hashing on the GPU: out[i] = murmur3_32(token i, seed) % num_buckets.
//
// Tokens arrive flat: uint8 data[M] + int64 offsets[n + 1], token i being
// data[offsets[i]:offsets[i + 1]]. One thread per token (grid-stride loop): tokens
// are short ("field=value"), so neighbouring threads read neighbouring bytes and
// the loads coalesce through L1. The same loop validates the offsets: thread i
// checks entry i (offsets[0] == 0, offsets[i] >= offsets[i - 1], offsets[n] == M)
// and records the smallest bad entry in the error flag; a token whose span is
// not inside data is not read (its output is garbage, and the op raises; with
// validate = false the flag is not read back and the op does not synchronise).
// The hash itself is the shared host/device murmur3_32 of recserve/murmur3.h, so
// bucket ids are bit-identical to the CPU kernels and the trainer.
#include "common.cuh"
#include "recserve/murmur3.h"
#include "recserve/ops.h"

namespace recserve::cuda {
namespace {

using detail::u64;

constexpr const char* kOp = "hash_features";
constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads)
    hash_flat_kernel(const uint8_t* __restrict__ data, int64_t len, const int64_t* __restrict__ off,
                     int64_t n, uint32_t seed, uint64_t num_buckets, int64_t* __restrict__ out,
                     u64* __restrict__ err) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  // Entries 0..n of the offsets; tokens 0..n-1.
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i <= n; i += stride) {
    if (detail::offsets_entry_bad(off, i, n + 1, len)) detail::record_error(err, i);
    if (i == n) continue;
    const int64_t lo = off[i], hi = off[i + 1];
    out[i] = (lo >= 0 && lo <= hi && hi <= len) ? murmur3_bucket(data + lo, hi - lo, seed, num_buckets) : 0;
  }
}

}  // namespace

void hash_flat(const TensorView& data, const TensorView& offsets, uint32_t seed,
               int64_t num_buckets, const TensorView& out, void* stream, bool validate) {
  const cudaStream_t s = detail::as_stream(stream);
  const int64_t n = offsets.shape[0] - 1;
  const int64_t len = data.shape[0];
  const int64_t* off = offsets.ptr<int64_t>();

  detail::Workspace ws(sizeof(u64), s);
  u64* err = ws.at<u64>(0);
  RECSERVE_CUDA_CHECK(cudaMemsetAsync(err, 0xff, sizeof(u64), s));
  hash_flat_kernel<<<detail::grid_for(n + 1, kThreads), kThreads, 0, s>>>(
      data.ptr<uint8_t>(), len, off, n, seed, uint64_t(num_buckets), out.ptr<int64_t>(), err);
  RECSERVE_CUDA_CHECK_LAUNCH();
  if (!validate) {  // the caller guarantees the offsets: no read-back, no synchronisation
    ws.release();
    return;
  }

  u64 bad = detail::kNoError;
  RECSERVE_CUDA_CHECK(cudaMemcpyAsync(&bad, err, sizeof(u64), cudaMemcpyDeviceToHost, s));
  ws.release();
  RECSERVE_CUDA_CHECK(cudaStreamSynchronize(s));
  if (bad != detail::kNoError)
    detail::throw_offsets_error(kOp, "tokens offsets", off, n + 1, len, "len(tokens data)",
                                int64_t(bad), s);
}

// Lives here for want of a better home: every op file needs the runtime anyway.
int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // no driver / no device: not an error for callers
    return 0;
  }
  return n;
}

}  // namespace recserve::cuda
