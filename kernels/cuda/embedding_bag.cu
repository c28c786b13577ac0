// Pooled embedding lookup on the GPU: out[b] = sum/mean of table rows
// indices[offsets[b]:offsets[b + 1]] (optionally scaled by weights), float32.
//
// Layout: a "group" of L lanes (L a power of two <= 32) pools one bag, the lanes
// spread across the row, each lane owning W consecutive columns loaded with one
// vector load (float4 / float2 / float for float32 tables, 16/8/4/2-byte loads of
// halves for float16; W is the widest width the row stride and alignment allow).
// L = min(32, next_pow2(d / W)), so narrow tables pack several bags per warp
// (d=64 float32: 16 lanes x float4, 2 bags per warp) and wide rows (d > 32 W) are
// split into column "passes" given to different groups, so a bag's columns are
// pooled in parallel. The lanes of a group load the bag's indices (and weights)
// cooperatively, L at a time, and broadcast them with width-L shuffles; rows are
// then gathered kUnroll at a time (loads issued before the adds) to keep several
// rows in flight per lane.
//
// Exactness: each column is accumulated sequentially in bag order with IEEE
// single-precision ops (__fmul_rn / __fadd_rn: no FMA contraction) and mean uses
// a true division by the bag size, exactly as reference.py does in NumPy: results
// are bit-identical to the spec.
//
// Validation on the device: pass 0 of each bag checks its offsets entry (and the
// last bag the final entry) and every index of the bag; the smallest bad offsets
// entry and the smallest bad index position are recorded in two error flags. Bad
// offsets are clamped to [0, M] and bad rows are skipped, so garbage input never
// reads out of bounds. The host reports offsets errors first, as the CPU does;
// with validate = false it reads nothing back and does not synchronise.
#include "common.cuh"
#include "recserve/ops.h"

namespace recserve::cuda {
namespace {

using detail::u64;

constexpr const char* kOp = "embedding_bag";
constexpr int kThreads = 256;
constexpr int kUnroll = 4;  // rows in flight per lane

struct BagParams {
  const void* table;
  int64_t num_rows, d, ld;  // ld: row stride in elements
  const int64_t* indices;
  int64_t num_indices;
  const int64_t* offsets;
  int64_t num_bags;
  const float* weights;  // nullptr: unweighted
  bool mean;
  float* out;            // [num_bags, d], contiguous
  int lanes;             // L
  int64_t vecs;          // d / W
  int64_t passes;        // column passes per bag
  int64_t num_items;     // num_bags * passes
  u64* err;              // [0]: offsets entry, [1]: index position
};

template <int W>
__device__ __forceinline__ void store_floats(float* p, const float (&v)[W]) {
  if constexpr (W % 4 == 0) {
#pragma unroll
    for (int e = 0; e < W; e += 4)
      *reinterpret_cast<float4*>(p + e) = make_float4(v[e], v[e + 1], v[e + 2], v[e + 3]);
  } else if constexpr (W == 2) {
    *reinterpret_cast<float2*>(p) = make_float2(v[0], v[1]);
  } else {
    p[0] = v[0];
  }
}

template <typename T, int W>
__global__ void __launch_bounds__(kThreads) embedding_bag_kernel(const BagParams p) {
  using IO = detail::VecIO<T, W>;
  const T* __restrict__ table = static_cast<const T*>(p.table);
  const int lanes = p.lanes;
  const int lane = int(threadIdx.x & 31);
  const int gl = lane & (lanes - 1);  // lane within the group
  const unsigned group_mask =
      lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u) << (lane & ~(lanes - 1));
  const int64_t groups_per_block = kThreads / lanes;
  const int64_t total_groups = int64_t(gridDim.x) * groups_per_block;

  // Every lane of a group sees the same item, bag bounds and trip counts, so the
  // group-masked shuffles below are always executed by the whole group.
  for (int64_t item = int64_t(blockIdx.x) * groups_per_block + threadIdx.x / lanes;
       item < p.num_items; item += total_groups) {
    const int64_t bag = item / p.passes;
    const int64_t pass = item - bag * p.passes;
    const int64_t vec = pass * lanes + gl;
    const bool active = vec < p.vecs;  // lanes past the row's end only help load indices
    const int64_t col = vec * W;

    int64_t lo = p.offsets[bag], hi = p.offsets[bag + 1];
    if (pass == 0 && gl == 0) {
      if (detail::offsets_entry_bad(p.offsets, bag, p.num_bags + 1, p.num_indices))
        detail::record_error(&p.err[0], bag);
      if (bag == p.num_bags - 1 &&
          detail::offsets_entry_bad(p.offsets, bag + 1, p.num_bags + 1, p.num_indices))
        detail::record_error(&p.err[0], bag + 1);
    }
    lo = lo < 0 ? 0 : (lo > p.num_indices ? p.num_indices : lo);
    hi = hi < lo ? lo : (hi > p.num_indices ? p.num_indices : hi);

    float acc[W];
#pragma unroll
    for (int e = 0; e < W; ++e) acc[e] = 0.f;

    for (int64_t p0 = lo; p0 < hi; p0 += lanes) {
      const int cnt = int(hi - p0 < lanes ? hi - p0 : lanes);
      int64_t my_row = 0;
      float my_w = 1.f;
      if (gl < cnt) {
        my_row = p.indices[p0 + gl];
        if (p.weights != nullptr) my_w = p.weights[p0 + gl];
        if (pass == 0 && (my_row < 0 || my_row >= p.num_rows))
          detail::record_error(&p.err[1], p0 + gl);
      }
      for (int j = 0; j < cnt; j += kUnroll) {
        int64_t row[kUnroll];
        float wt[kUnroll];
        bool ok[kUnroll];
        typename IO::Raw raw[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          // srcLane >= cnt (past the chunk) returns some lane's value: unused.
          row[u] = __shfl_sync(group_mask, my_row, j + u, lanes);
          wt[u] = __shfl_sync(group_mask, my_w, j + u, lanes);
          ok[u] = active && j + u < cnt && row[u] >= 0 && row[u] < p.num_rows;
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
          if (ok[u]) raw[u] = IO::load(table + row[u] * p.ld + col);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          if (!ok[u]) continue;
          float v[W];
          IO::convert(raw[u], v);
          if (p.weights != nullptr) {
#pragma unroll
            for (int e = 0; e < W; ++e) acc[e] = __fadd_rn(acc[e], __fmul_rn(wt[u], v[e]));
          } else {
#pragma unroll
            for (int e = 0; e < W; ++e) acc[e] = __fadd_rn(acc[e], v[e]);
          }
        }
      }
    }

    if (active) {
      if (p.mean && hi > lo) {
        const float count = float(hi - lo);  // round-to-nearest, like the CPU's float(hi - lo)
#pragma unroll
        for (int e = 0; e < W; ++e) acc[e] = __fdiv_rn(acc[e], count);
      }
      store_floats<W>(p.out + bag * p.d + col, acc);
    }
  }
}

// offsets validation alone, for B = 0 (no bag to carry it): offsets == [0] and
// len(indices) == 0.
__global__ void check_offsets_kernel(const int64_t* off, int64_t len, int64_t total, u64* err) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < len;
       i += int64_t(gridDim.x) * blockDim.x)
    if (detail::offsets_entry_bad(off, i, len, total)) detail::record_error(err, i);
}

template <typename T, int W>
void launch(BagParams p, cudaStream_t s) {
  p.vecs = p.d / W;
  p.lanes = int(p.vecs >= 32 ? 32 : detail::next_pow2(p.vecs > 0 ? p.vecs : 1));
  p.passes = p.vecs > p.lanes ? detail::div_up(p.vecs, p.lanes) : 1;
  p.num_items = p.num_bags * p.passes;
  const int64_t groups_per_block = kThreads / p.lanes;
  const unsigned int blocks = detail::grid_for(detail::div_up(p.num_items, groups_per_block), 1);
  embedding_bag_kernel<T, W><<<blocks, kThreads, 0, s>>>(p);
  RECSERVE_CUDA_CHECK_LAUNCH();
}

}  // namespace

void embedding_bag(const TensorView& table, const TensorView& indices, const TensorView& offsets,
                   const TensorView& weights, PoolMode mode, const TensorView& out, void* stream,
                   bool validate) {
  const cudaStream_t s = detail::as_stream(stream);
  BagParams p{};
  p.table = table.data;
  p.num_rows = table.shape[0];
  p.d = table.shape[1];
  p.ld = table.stride[0];
  p.indices = indices.ptr<int64_t>();
  p.num_indices = indices.shape[0];
  p.offsets = offsets.ptr<int64_t>();
  p.num_bags = offsets.shape[0] - 1;
  p.weights = weights.present ? weights.ptr<float>() : nullptr;
  p.mean = mode == PoolMode::mean;
  p.out = out.ptr<float>();

  detail::Workspace ws(2 * sizeof(u64), s);
  p.err = ws.at<u64>(0);
  RECSERVE_CUDA_CHECK(cudaMemsetAsync(p.err, 0xff, 2 * sizeof(u64), s));

  if (p.num_bags == 0) {
    check_offsets_kernel<<<1, 32, 0, s>>>(p.offsets, 1, p.num_indices, p.err);
    RECSERVE_CUDA_CHECK_LAUNCH();
  } else if (table.dtype == DType::f32) {
    // Output rows are d floats apart: the vector store needs out aligned too.
    int w = detail::vector_width(p.table, p.d, p.ld, p.num_rows, 4, 4);
    while (w > 1 && !detail::aligned(p.out, 4 * w)) w >>= 1;
    switch (w) {
      case 4: launch<float, 4>(p, s); break;
      case 2: launch<float, 2>(p, s); break;
      default: launch<float, 1>(p, s); break;
    }
  } else {
    int w = detail::vector_width(p.table, p.d, p.ld, p.num_rows, 2, 8);
    while (w > 1 && !detail::aligned(p.out, 4 * (w < 4 ? w : 4))) w >>= 1;
    switch (w) {
      case 8: launch<__half, 8>(p, s); break;
      case 4: launch<__half, 4>(p, s); break;
      case 2: launch<__half, 2>(p, s); break;
      default: launch<__half, 1>(p, s); break;
    }
  }

  if (!validate) {  // the caller guarantees offsets and indices: no synchronisation
    ws.release();
    return;
  }
  u64 bad[2] = {detail::kNoError, detail::kNoError};
  RECSERVE_CUDA_CHECK(cudaMemcpyAsync(bad, p.err, sizeof(bad), cudaMemcpyDeviceToHost, s));
  ws.release();
  RECSERVE_CUDA_CHECK(cudaStreamSynchronize(s));
  if (bad[0] != detail::kNoError)
    detail::throw_offsets_error(kOp, "offsets", p.offsets, p.num_bags + 1, p.num_indices,
                                "len(indices)", int64_t(bad[0]), s);
  if (bad[1] != detail::kNoError) {
    const int64_t pos = int64_t(bad[1]);
    arg_error(kOp, "indices[", pos, "] = ", detail::read_i64(p.indices, pos, s),
              " is out of range for a table with ", p.num_rows, " rows");
  }
}

}  // namespace recserve::cuda
