// Fused inner-product top-k on the GPU: for each query the k items with the
// largest <query, item>, scores descending, ties to the smaller id, excluded /
// NaN / -inf items never returned, tail id -1 / score -inf. k <= 1024.
//
// Ordering keys. A (score, id) pair is packed into one uint64 whose ascending
// order is the result order: high 32 bits = the score's bits mapped so that
// larger floats give smaller keys (-0 folded into +0, so they tie as in NumPy),
// low 32 bits = the id (ids < 2**31). Selection then only compares integers,
// tie-breaking is exact, and ~0 (kEmpty) is a sentinel worse than any real key.
//
// Stage 1 (topk_stage1): grid = (query tiles) x (item chunks), blockIdx.x (query
// tile) fastest so the blocks sharing a chunk run together and share it in L2.
// A block holds up to 8 queries in shared memory and streams its chunk, one item
// per thread per tile of 256 items: the thread reads its item row with unrolled
// 16-byte vector loads (128 bytes in flight per thread for one query, 64 for a
// query tile; a thread's consecutive loads use the rest of the sectors its first
// load brought into L1) and accumulates all the block's queries at once (FMA,
// float32), so items are read once per query tile and scores never leave
// registers (no [B, N] matrix). Per query the block keeps a running top-k in
// shared memory: keys[0, ksel) = current best, sorted, and a candidate area
// keys[ksel, S). A score is a candidate only if its key beats the current k-th
// best (theta); candidates are appended with a shared atomicAdd; when the
// candidate area could overflow on the next tile (or theta is still unknown and
// >= k candidates exist), the block bitonic-sorts the used prefix of keys[] and
// keeps the best ksel: theta tightens fast, so after the first tiles almost no
// item reaches the buffer. Exclusions are tested only for candidates that beat
// theta. The block writes its sorted best ksel keys to a workspace, or, when
// there is a single chunk, the final output directly.
//
// Stage 2 (topk_stage2): one block per query merges the P sorted partial lists.
// Lists are read best-first, a few rows at a time: a list stays "alive" only
// while its last row read still beats theta (lists are sorted, so nothing after
// it can), and the rows per round grow as lists die (rounds of <= 256 keys).
// With random data only the first few rows of each list are ever read; when one
// list holds the whole answer, it is read in one or two rounds.
//
// Exclusions (CSR exclude_indptr[B + 1] / exclude_ids, unordered, duplicates
// allowed) go into a global-memory open-addressing hash set keyed by
// (query, id), built by one kernel that also validates exclude_indptr and the ids
// (error flags, reported like the CPU kernel). The set has >= 2x as many slots as
// ids, so a lookup is ~1-2 probes and there is no length limit or fallback path;
// lookups happen only for the rare candidates that beat theta.
//
// Tuning knobs (H100 pass): chunk_bytes / min_blocks_per_sm (loads in flight and
// blocks per SM), the chunking policy in topk_inner_product (one wave of blocks,
// kMinChunk, kMaxChunkMultiQuery), kThreads, the flush policy, and for large B a
// tensor-core (TF32/FP16 mma) scoring path with a bigger query tile.
#include <algorithm>

#include "common.cuh"
#include "recserve/checks.h"
#include "recserve/ops.h"

namespace recserve::cuda {
namespace {

using detail::u64;

constexpr const char* kOp = "topk_inner_product";
constexpr int kThreads = 256;                 // stage 1 and stage 2 block size
constexpr int kMaxQueryTile = 8;              // queries per stage-1 block when B > 1
constexpr int kColBlock = 512;                // query columns staged in shared memory at once
// Row bytes each thread loads per unrolled step (all in flight at once): more for
// one query (memory-bound), less for a query tile (register pressure).
__host__ __device__ constexpr int chunk_bytes(int qbt) { return qbt == 1 ? 128 : 64; }
// Stage-1 blocks per SM the register allocation must allow (__launch_bounds__).
__host__ __device__ constexpr int min_blocks_per_sm(int qbt) { return qbt == 1 ? 4 : 2; }
constexpr int64_t kMinChunk = 1024;           // fewest items per stage-1 block
constexpr int64_t kMaxChunkMultiQuery = 32768;  // items per chunk when several query tiles share it
constexpr int64_t kMaxChunks = 1024;          // partial lists per query (stage-2 smem)
constexpr int64_t kMaxPartialBytes = int64_t(256) << 20;  // stage-1 -> stage-2 workspace cap
constexpr u64 kEmpty = ~0ull;

// ---- keys -------------------------------------------------------------------------

__device__ __forceinline__ bool eligible(float s) {
  return !isnan(s) && s != __int_as_float(0xff800000);  // not NaN, not -inf
}

__device__ __forceinline__ u64 make_key(float s, int64_t id) {
  uint32_t u = __float_as_uint(s);
  if (u == 0x80000000u) u = 0;  // -0 -> +0
  const uint32_t hi = (u & 0x80000000u) ? u : (~u & 0x7fffffffu);
  return (u64(hi) << 32) | u64(uint32_t(id));
}

__device__ __forceinline__ float key_score(u64 key) {
  const uint32_t hi = uint32_t(key >> 32);
  return __uint_as_float((hi & 0x80000000u) ? hi : (~hi & 0x7fffffffu));
}

__device__ __forceinline__ int64_t key_id(u64 key) { return int64_t(uint32_t(key)); }

__device__ __forceinline__ void write_result(u64 key, float* score, int64_t* id) {
  if (key == kEmpty) {
    *score = __int_as_float(0xff800000);
    *id = -1;
  } else {
    *score = key_score(key);
    *id = key_id(key);
  }
}

// ---- exclusion hash set -----------------------------------------------------------

__device__ __forceinline__ u64 mix64(u64 x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdull;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ull;
  x ^= x >> 33;
  return x;
}

__device__ __forceinline__ u64 excl_key(int64_t query, int64_t id) {
  return (u64(query) << 32) | u64(uint32_t(id));
}

// Validates exclude_indptr (entries 0..B) and exclude_ids (all of them) and
// inserts the valid ids into the hash set. err[0]: smallest bad indptr entry,
// err[1]: smallest bad id position. With a bad indptr the query found for an id
// is garbage but in range: the op raises anyway.
__global__ void __launch_bounds__(kThreads)
    build_exclusions(const int64_t* __restrict__ indptr, int64_t num_queries,
                     const int64_t* __restrict__ ids, int64_t total, int64_t num_items,
                     u64* __restrict__ table, u64 mask, u64* __restrict__ err) {
  const int64_t n = num_queries + 1 > total ? num_queries + 1 : total;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < n;
       t += int64_t(gridDim.x) * blockDim.x) {
    if (t <= num_queries && detail::offsets_entry_bad(indptr, t, num_queries + 1, total))
      detail::record_error(&err[0], t);
    if (t >= total) continue;
    const int64_t id = ids[t];
    if (id < 0 || id >= num_items) {
      detail::record_error(&err[1], t);
      continue;
    }
    if (table == nullptr || num_queries == 0) continue;
    // Query owning position t: last q with indptr[q] <= t (upper bound - 1).
    int64_t lo = 0, hi = num_queries + 1;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (indptr[mid] <= t) lo = mid + 1;
      else hi = mid;
    }
    int64_t q = lo - 1;
    q = q < 0 ? 0 : (q >= num_queries ? num_queries - 1 : q);
    const u64 key = excl_key(q, id);
    u64 slot = mix64(key) & mask;
    while (true) {  // terminates: the table has more slots than ids
      const u64 prev = atomicCAS(&table[slot], kEmpty, key);
      if (prev == kEmpty || prev == key) break;
      slot = (slot + 1) & mask;
    }
  }
}

__device__ __forceinline__ bool is_excluded(const u64* __restrict__ table, u64 mask, int64_t query,
                                            int64_t id) {
  const u64 key = excl_key(query, id);
  u64 slot = mix64(key) & mask;
  while (true) {
    const u64 v = __ldg(&table[slot]);
    if (v == key) return true;
    if (v == kEmpty) return false;
    slot = (slot + 1) & mask;
  }
}

// ---- block-level running top-k (shared memory) -------------------------------------
//
// For each of nq queries: keys[j * S, j * S + S), theta[j], count[j]. Invariant
// between flushes: keys[0, ksel) sorted best-first (kEmpty-padded), candidates in
// keys[ksel, ksel + count), kEmpty beyond. ctl[0] = flush mask, ctl[1] = sort length.

// Thread 0 only: which queries to flush now, and how long a prefix to sort.
__device__ __forceinline__ void plan_flush(int nq, int ksel, int cand_limit, bool final_flush,
                                           const u64* theta, const int* count, int* ctl) {
  unsigned mask = 0;
  int max_count = 0;
  for (int j = 0; j < nq; ++j) {
    const int c = count[j];
    const bool need = final_flush ? c > 0 : (c > cand_limit || (theta[j] == kEmpty && c >= ksel));
    if (need) {
      mask |= 1u << j;
      max_count = c > max_count ? c : max_count;
    }
  }
  ctl[0] = int(mask);
  ctl[1] = int(detail::next_pow2(ksel + max_count < 2 ? 2 : ksel + max_count));
}

// All threads: bitonic-sort keys[j * S, j * S + sort_len) of the queries in `mask`
// (every key at or beyond ksel + count[j] is kEmpty, so sorting the prefix sorts
// everything), keep the best ksel, reset the candidate area, update theta.
__device__ __noinline__ void flush(u64* keys, int S, int nq, unsigned mask, int sort_len, int ksel,
                                  u64* theta, int* count) {
  const int half = sort_len >> 1;
  const int work = nq * half;
  for (int size = 2; size <= sort_len; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int t = threadIdx.x; t < work; t += blockDim.x) {
        const int j = t / half;
        if (!((mask >> j) & 1u)) continue;
        const int pi = t - j * half;
        const int lo = ((pi & ~(stride - 1)) << 1) | (pi & (stride - 1));
        u64* k = keys + j * S;
        const u64 a = k[lo], b = k[lo + stride];
        const bool ascending = (lo & size) == 0;
        if ((a > b) == ascending) {
          k[lo] = b;
          k[lo + stride] = a;
        }
      }
      __syncthreads();
    }
  }
  for (int t = threadIdx.x; t < nq * sort_len; t += blockDim.x) {
    const int j = t / sort_len;
    const int e = t - j * sort_len;
    if (((mask >> j) & 1u) && e >= ksel) keys[j * S + e] = kEmpty;
  }
  if (threadIdx.x < nq && ((mask >> threadIdx.x) & 1u)) {
    theta[threadIdx.x] = keys[threadIdx.x * S + ksel - 1];  // not touched by the reset above
    count[threadIdx.x] = 0;
  }
  __syncthreads();
}

// ---- stage 1 -----------------------------------------------------------------------

struct Stage1Params {
  const float* queries;  // [B, d] contiguous
  int64_t num_queries, d;
  const void* items;     // [N, d], row stride ld
  int64_t num_items, ld;
  int64_t k;
  int ksel, S, qb, dcp;  // dcp: padded query columns per staged block
  int64_t chunk;
  int num_chunks;
  const u64* excl_table;  // nullptr: no exclusions
  u64 excl_mask;
  u64* partial;           // [B][num_chunks][ksel] (num_chunks > 1)
  float* out_scores;      // [B, k] (num_chunks == 1)
  int64_t* out_ids;
};

struct Stage1Layout {
  size_t keys, theta, qs, count, ctl, total;
};

__host__ __device__ __forceinline__ Stage1Layout stage1_layout(int qb, int S, int dcp) {
  Stage1Layout l;
  size_t off = 0;
  l.keys = off;
  off += size_t(qb) * size_t(S) * sizeof(u64);
  l.theta = off;
  off += size_t(detail::round_up(int64_t(qb) * 8, 16));
  l.qs = off;  // 16-byte aligned: float4 reads
  off += size_t(qb) * size_t(dcp) * sizeof(float);
  l.count = off;
  off += size_t(detail::round_up(int64_t(qb) * 4, 16));
  l.ctl = off;
  off += 16;
  l.total = off;
  return l;
}

// W query floats from shared memory (offset is a multiple of W floats, base 16-aligned).
template <int W>
__device__ __forceinline__ void load_q(const float* q, float (&v)[W]) {
  if constexpr (W % 4 == 0) {
#pragma unroll
    for (int e = 0; e < W; e += 4) {
      const float4 t = *reinterpret_cast<const float4*>(q + e);
      v[e] = t.x; v[e + 1] = t.y; v[e + 2] = t.z; v[e + 3] = t.w;
    }
  } else if constexpr (W == 2) {
    const float2 t = *reinterpret_cast<const float2*>(q);
    v[0] = t.x; v[1] = t.y;
  } else {
    v[0] = q[0];
  }
}

template <int W, int QBT>
__device__ __forceinline__ void fma_queries(const float* qs, int dcp, int nq, const float (&x)[W],
                                            float (&acc)[QBT]) {
#pragma unroll
  for (int j = 0; j < QBT; ++j) {
    if (QBT == 1 || j < nq) {
      float q[W];
      load_q<W>(qs + j * dcp, q);
#pragma unroll
      for (int e = 0; e < W; ++e) acc[j] = fmaf(q[e], x[e], acc[j]);
    }
  }
}

// acc[j] += <queries[j][cb:ce], row[cb:ce]> for the block's queries; qs holds
// the staged query columns [cb, ce).
template <typename T, int W, int QBT>
__device__ __forceinline__ void dot_block(const T* __restrict__ row, int64_t cb, int64_t ce,
                                          const float* qs, int dcp, int nq, float (&acc)[QBT]) {
  using IO = detail::VecIO<T, W>;
  constexpr int kBytes = chunk_bytes(QBT) / int(W * sizeof(T));
  constexpr int kVecs = kBytes < 1 ? 1 : (kBytes > 8 ? 8 : kBytes);  // vectors per step
  int64_t c = cb;
  for (; c + kVecs * W <= ce; c += kVecs * W) {
    typename IO::Raw raw[kVecs];
#pragma unroll
    for (int u = 0; u < kVecs; ++u) raw[u] = IO::load(row + c + u * W);
#pragma unroll
    for (int u = 0; u < kVecs; ++u) {
      float x[W];
      IO::convert(raw[u], x);
      fma_queries<W, QBT>(qs + (c - cb) + u * W, dcp, nq, x, acc);
    }
  }
  for (; c < ce; c += W) {
    float x[W];
    IO::convert(IO::load(row + c), x);
    fma_queries<W, QBT>(qs + (c - cb), dcp, nq, x, acc);
  }
}

// qs[j][0, ce - cb) = queries[q0 + j][cb, ce) for j < nq.
__device__ __forceinline__ void stage_queries(float* qs, const Stage1Params& p, int64_t q0, int nq,
                                              int64_t cb, int64_t ce) {
  const int64_t width = ce - cb;
  for (int64_t t = threadIdx.x; t < nq * width; t += blockDim.x) {
    const int64_t j = t / width;
    const int64_t c = t - j * width;
    qs[j * p.dcp + c] = p.queries[(q0 + j) * p.d + cb + c];
  }
}

template <typename T, int W, int QBT>
__global__ void __launch_bounds__(kThreads, min_blocks_per_sm(QBT)) topk_stage1(const Stage1Params p) {
  extern __shared__ __align__(16) unsigned char smem[];
  const Stage1Layout layout = stage1_layout(p.qb, p.S, p.dcp);
  u64* keys = reinterpret_cast<u64*>(smem + layout.keys);
  u64* theta = reinterpret_cast<u64*>(smem + layout.theta);
  float* qs = reinterpret_cast<float*>(smem + layout.qs);
  int* count = reinterpret_cast<int*>(smem + layout.count);
  int* ctl = reinterpret_cast<int*>(smem + layout.ctl);

  const int tid = int(threadIdx.x);
  const int64_t q0 = int64_t(blockIdx.x) * p.qb;
  const int nq = int(p.num_queries - q0 < p.qb ? p.num_queries - q0 : p.qb);
  const int64_t chunk = blockIdx.y;
  const int64_t i0 = chunk * p.chunk;
  const int64_t i1 = i0 + p.chunk < p.num_items ? i0 + p.chunk : p.num_items;
  const int ksel = p.ksel, S = p.S;
  const int cand_limit = S - ksel - kThreads;  // >= kThreads by construction of S
  const T* __restrict__ items = static_cast<const T*>(p.items);

  for (int t = tid; t < p.qb * S; t += kThreads) keys[t] = kEmpty;
  if (tid < p.qb) {
    theta[tid] = kEmpty;
    count[tid] = 0;
  }
  const bool staged_once = p.d <= kColBlock;
  if (staged_once) stage_queries(qs, p, q0, nq, 0, p.d);
  __syncthreads();

  for (int64_t base = i0; base < i1; base += kThreads) {
    const int64_t i = base + tid;
    const bool valid = i < i1;
    float acc[QBT];
#pragma unroll
    for (int j = 0; j < QBT; ++j) acc[j] = 0.f;
    const T* row = items + (valid ? i : i0) * p.ld;
    for (int64_t cb = 0; cb < p.d; cb += kColBlock) {
      const int64_t ce = cb + kColBlock < p.d ? cb + kColBlock : p.d;
      if (!staged_once) {  // d > kColBlock: stage this column block (uniform branch)
        __syncthreads();
        stage_queries(qs, p, q0, nq, cb, ce);
        __syncthreads();
      }
      if (valid) dot_block<T, W, QBT>(row, cb, ce, qs, p.dcp, nq, acc);
    }

    if (valid) {
#pragma unroll
      for (int j = 0; j < QBT; ++j) {
        if (QBT > 1 && j >= nq) continue;
        const float s = acc[j];
        if (!eligible(s)) continue;
        const u64 key = make_key(s, i);
        if (key >= theta[j]) continue;
        if (p.excl_table != nullptr && is_excluded(p.excl_table, p.excl_mask, q0 + j, i)) continue;
        const int pos = atomicAdd(&count[j], 1);
        keys[j * S + ksel + pos] = key;
      }
    }
    __syncthreads();  // (A) this tile's candidates are in; everyone is done reading ctl
    if (tid == 0) plan_flush(nq, ksel, cand_limit, false, theta, count, ctl);
    __syncthreads();  // (B)
    const unsigned mask = unsigned(ctl[0]);
    if (mask != 0) flush(keys, S, nq, mask, ctl[1], ksel, theta, count);
  }

  __syncthreads();
  if (tid == 0) plan_flush(nq, ksel, cand_limit, true, theta, count, ctl);
  __syncthreads();
  const unsigned mask = unsigned(ctl[0]);
  if (mask != 0) flush(keys, S, nq, mask, ctl[1], ksel, theta, count);

  if (p.num_chunks == 1) {
    const int64_t k = p.k;
    for (int64_t t = tid; t < nq * k; t += kThreads) {
      const int64_t j = t / k;
      const int64_t e = t - j * k;
      const u64 key = e < ksel ? keys[j * S + e] : kEmpty;
      write_result(key, &p.out_scores[(q0 + j) * k + e], &p.out_ids[(q0 + j) * k + e]);
    }
  } else {
    for (int t = tid; t < nq * ksel; t += kThreads) {
      const int j = t / ksel;
      const int e = t - j * ksel;
      p.partial[((q0 + j) * p.num_chunks + chunk) * ksel + e] = keys[j * S + e];
    }
  }
}

// ---- stage 2 -----------------------------------------------------------------------

struct Stage2Params {
  const u64* partial;  // [B][P][ksel], each list sorted best-first
  int num_chunks;      // P
  int ksel, S;
  int64_t k;
  float* out_scores;
  int64_t* out_ids;
};

struct Stage2Layout {
  size_t keys, theta, ints, alive, total;
};

__host__ __device__ __forceinline__ Stage2Layout stage2_layout(int S, int num_chunks) {
  Stage2Layout l;
  size_t off = 0;
  l.keys = off;
  off += size_t(S) * sizeof(u64);
  l.theta = off;
  off += 16;
  l.ints = off;  // count, ctl[2], n_alive[2]
  off += 32;
  l.alive = off;  // two lists of P ints
  off += size_t(2) * size_t(num_chunks) * sizeof(int);
  l.total = off;
  return l;
}

__global__ void __launch_bounds__(kThreads) topk_stage2(const Stage2Params p) {
  extern __shared__ __align__(16) unsigned char smem[];
  const Stage2Layout layout = stage2_layout(p.S, p.num_chunks);
  u64* keys = reinterpret_cast<u64*>(smem + layout.keys);
  u64* theta = reinterpret_cast<u64*>(smem + layout.theta);
  int* ints = reinterpret_cast<int*>(smem + layout.ints);
  int* count = ints;
  int* ctl = ints + 1;      // [2]
  int* n_alive = ints + 3;  // [2]
  int* alive = reinterpret_cast<int*>(smem + layout.alive);  // [2][P]

  const int tid = int(threadIdx.x);
  const int P = p.num_chunks, ksel = p.ksel, S = p.S;
  const int cand_limit = S - ksel - kThreads;
  const int64_t query = blockIdx.x;
  const u64* __restrict__ lists = p.partial + query * P * ksel;

  for (int t = tid; t < S; t += kThreads) keys[t] = kEmpty;
  for (int t = tid; t < P; t += kThreads) alive[t] = t;
  if (tid == 0) {
    theta[0] = kEmpty;
    count[0] = 0;
    n_alive[0] = P;
  }
  __syncthreads();

  int cur = 0;   // alive[cur * P ...] holds the n_alive[cur] lists still in play
  int row0 = 0;  // first row not read yet (same for every alive list)
  while (true) {
    const int na = n_alive[cur];
    if (na == 0 || row0 >= ksel) break;  // uniform: read after a barrier
    if (tid == 0) n_alive[cur ^ 1] = 0;  // not read before the barriers below
    int rows = kThreads / na;
    rows = rows < 1 ? 1 : rows;
    rows = rows < ksel - row0 ? rows : ksel - row0;
    const int total = na * rows;  // rows of consecutive keys per list: coalesced
    for (int t0 = 0; t0 < total; t0 += kThreads) {
      const int t = t0 + tid;
      if (t < total) {
        const int list = alive[cur * P + t / rows];
        const u64 key = lists[int64_t(list) * ksel + row0 + t % rows];
        if (key < theta[0]) {
          const int pos = atomicAdd(count, 1);
          keys[ksel + pos] = key;
        }
      }
      __syncthreads();
      if (tid == 0) plan_flush(1, ksel, cand_limit, false, theta, count, ctl);
      __syncthreads();
      const unsigned mask = unsigned(ctl[0]);
      if (mask != 0) flush(keys, S, 1, mask, ctl[1], ksel, theta, count);
    }
    // A list stays alive while its last row read beats theta (the rows after it
    // are worse, and theta only gets tighter).
    const int last = row0 + rows - 1;
    for (int a = tid; a < na; a += kThreads) {
      const int list = alive[cur * P + a];
      if (last + 1 < ksel && lists[int64_t(list) * ksel + last] < theta[0]) {
        const int pos = atomicAdd(&n_alive[cur ^ 1], 1);
        alive[(cur ^ 1) * P + pos] = list;
      }
    }
    __syncthreads();
    cur ^= 1;
    row0 += rows;
  }

  __syncthreads();
  if (tid == 0) plan_flush(1, ksel, cand_limit, true, theta, count, ctl);
  __syncthreads();
  const unsigned mask = unsigned(ctl[0]);
  if (mask != 0) flush(keys, S, 1, mask, ctl[1], ksel, theta, count);

  for (int64_t e = tid; e < p.k; e += kThreads) {
    const u64 key = e < ksel ? keys[e] : kEmpty;
    write_result(key, &p.out_scores[query * p.k + e], &p.out_ids[query * p.k + e]);
  }
}

// N == 0: every slot is the "not enough items" tail.
__global__ void fill_empty(float* scores, int64_t* ids, int64_t n) {
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < n;
       t += int64_t(gridDim.x) * blockDim.x) {
    scores[t] = __int_as_float(0xff800000);
    ids[t] = -1;
  }
}

// ---- host side ---------------------------------------------------------------------

using Stage1Kernel = void (*)(Stage1Params);

template <int QBT>
Stage1Kernel pick_stage1(DType dtype, int w) {
  if (dtype == DType::f32) {
    switch (w) {
      case 4: return topk_stage1<float, 4, QBT>;
      case 2: return topk_stage1<float, 2, QBT>;  // rows only 8-byte aligned (odd d / 2)
      default: return topk_stage1<float, 1, QBT>;
    }
  }
  switch (w) {
    case 8: return topk_stage1<__half, 8, QBT>;
    case 4: return topk_stage1<__half, 4, QBT>;
    case 2: return topk_stage1<__half, 2, QBT>;
    default: return topk_stage1<__half, 1, QBT>;
  }
}

}  // namespace

void topk_inner_product(const TensorView& queries, const TensorView& items, int64_t k,
                        const TensorView& exclude_indptr, const TensorView& exclude_ids,
                        const TensorView& out_scores, const TensorView& out_ids, void* stream,
                        bool validate) {
  if (k > kCudaMaxTopK) arg_error(kOp, "k must be <= ", kCudaMaxTopK, " on CUDA, got ", k);
  const int64_t B = queries.shape[0], d = queries.shape[1], N = items.shape[0];
  if (B > int64_t(std::numeric_limits<int32_t>::max()))
    arg_error(kOp, "queries has ", B, " rows; at most 2**31 - 1 are supported on CUDA");
  const cudaStream_t s = detail::as_stream(stream);
  const bool has_excl = exclude_indptr.present;
  const int64_t total_excl = has_excl ? exclude_ids.shape[0] : 0;
  if (B == 0 && !has_excl) return;  // nothing to validate, nothing to compute
  const int ksel = int(std::min<int64_t>(k, N));
  const bool score = B > 0 && N > 0;

  // ---- plan stage 1 ----
  Stage1Params p1{};
  Stage1Kernel kernel1 = nullptr;
  size_t smem1 = 0;
  int64_t q_tiles = 0;
  if (score) {
    const int dev = detail::current_device();
    const bool half = items.dtype == DType::f16;
    const int w = detail::vector_width(items.data, d, items.stride[0], N, half ? 2 : 4, half ? 8 : 4);
    const int qbt = B == 1 ? 1 : kMaxQueryTile;
    kernel1 = qbt == 1 ? pick_stage1<1>(items.dtype, w) : pick_stage1<kMaxQueryTile>(items.dtype, w);

    p1.queries = queries.ptr<float>();
    p1.num_queries = B;
    p1.d = d;
    p1.items = items.data;
    p1.num_items = N;
    p1.ld = items.stride[0];
    p1.k = k;
    p1.ksel = ksel;
    p1.S = int(detail::next_pow2(ksel + 2 * kThreads));
    p1.dcp = int(detail::round_up(std::max<int64_t>(1, std::min<int64_t>(d, kColBlock)), 4));
    const size_t max_smem = size_t(detail::device_attr(cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    int qb = int(std::min<int64_t>(qbt, B));
    while (qb > 1 && stage1_layout(qb, p1.S, p1.dcp).total > max_smem) --qb;
    p1.qb = qb;
    smem1 = stage1_layout(qb, p1.S, p1.dcp).total;
    if (smem1 > 48 * 1024)
      RECSERVE_CUDA_CHECK(cudaFuncSetAttribute(kernel1, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               int(smem1)));
    int occupancy = 0;
    RECSERVE_CUDA_CHECK(
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occupancy, kernel1, kThreads, smem1));
    const int64_t sms = detail::device_attr(cudaDevAttrMultiProcessorCount, dev);
    const int64_t target_blocks = sms * std::max(occupancy, 1);

    // Chunks per query: enough blocks for one full wave; with several query
    // tiles, chunks small enough to be shared in L2; never tiny chunks; a
    // bounded stage-2 workspace and stage-2 shared memory.
    q_tiles = detail::div_up(B, qb);
    int64_t P = detail::div_up(target_blocks, q_tiles);
    if (q_tiles > 1) P = std::max(P, detail::div_up(N, kMaxChunkMultiQuery));
    P = std::min(P, detail::div_up(N, kMinChunk));
    P = std::min(P, kMaxChunks);
    P = std::min(P, std::max<int64_t>(1, kMaxPartialBytes / (B * ksel * int64_t(sizeof(u64)))));
    P = std::max<int64_t>(P, 1);
    p1.chunk = detail::round_up(detail::div_up(N, P), kThreads);
    p1.num_chunks = int(detail::div_up(N, p1.chunk));
    p1.out_scores = out_scores.ptr<float>();
    p1.out_ids = out_ids.ptr<int64_t>();
  }

  // ---- workspace: [error flags | exclusion hash set | partial lists] ----
  const size_t flags_bytes = has_excl ? 256 : 0;
  const int64_t table_slots = has_excl && total_excl > 0 ? detail::next_pow2(2 * total_excl) : 0;
  const size_t table_bytes = size_t(table_slots) * sizeof(u64);
  const size_t partial_bytes =
      score && p1.num_chunks > 1 ? size_t(B) * size_t(p1.num_chunks) * size_t(ksel) * sizeof(u64) : 0;
  const size_t partial_off = size_t(detail::round_up(int64_t(flags_bytes + table_bytes), 256));
  detail::Workspace ws(partial_off + partial_bytes, s);
  u64* flags = has_excl ? ws.at<u64>(0) : nullptr;
  u64* table = table_slots > 0 ? ws.at<u64>(flags_bytes) : nullptr;

  if (has_excl) {
    // kEmpty for every flag and slot.
    RECSERVE_CUDA_CHECK(cudaMemsetAsync(flags, 0xff, flags_bytes + table_bytes, s));
    const int64_t n = std::max(B + 1, total_excl);
    build_exclusions<<<detail::grid_for(n, kThreads), kThreads, 0, s>>>(
        exclude_indptr.ptr<int64_t>(), B, exclude_ids.ptr<int64_t>(), total_excl, N, table,
        u64(table_slots > 0 ? table_slots - 1 : 0), flags);
    RECSERVE_CUDA_CHECK_LAUNCH();
  }

  if (B > 0 && N == 0) {
    fill_empty<<<detail::grid_for(B * k, kThreads), kThreads, 0, s>>>(out_scores.ptr<float>(),
                                                                       out_ids.ptr<int64_t>(), B * k);
    RECSERVE_CUDA_CHECK_LAUNCH();
  } else if (score) {
    p1.excl_table = table;
    p1.excl_mask = u64(table_slots > 0 ? table_slots - 1 : 0);
    p1.partial = partial_bytes > 0 ? ws.at<u64>(partial_off) : nullptr;
    const dim3 grid1(unsigned(q_tiles), unsigned(p1.num_chunks));
    kernel1<<<grid1, kThreads, smem1, s>>>(p1);
    RECSERVE_CUDA_CHECK_LAUNCH();
    if (p1.num_chunks > 1) {
      Stage2Params p2{};
      p2.partial = p1.partial;
      p2.num_chunks = p1.num_chunks;
      p2.ksel = ksel;
      p2.S = p1.S;
      p2.k = k;
      p2.out_scores = out_scores.ptr<float>();
      p2.out_ids = out_ids.ptr<int64_t>();
      const size_t smem2 = stage2_layout(p2.S, p2.num_chunks).total;  // <= 16 KiB + 8 KiB
      topk_stage2<<<unsigned(B), kThreads, smem2, s>>>(p2);
      RECSERVE_CUDA_CHECK_LAUNCH();
    }
  }

  if (!has_excl || !validate) {
    // Fully asynchronous: nothing to check on the host, or the caller guarantees the
    // exclusions (bad ones were skipped by build_exclusions, never used out of range).
    ws.release();
    return;
  }
  u64 bad[2] = {detail::kNoError, detail::kNoError};
  RECSERVE_CUDA_CHECK(cudaMemcpyAsync(bad, flags, sizeof(bad), cudaMemcpyDeviceToHost, s));
  ws.release();
  RECSERVE_CUDA_CHECK(cudaStreamSynchronize(s));
  if (bad[0] != detail::kNoError)
    detail::throw_offsets_error(kOp, "exclude_indptr", exclude_indptr.ptr<int64_t>(), B + 1,
                                total_excl, "len(exclude_ids)", int64_t(bad[0]), s);
  if (bad[1] != detail::kNoError) {
    const int64_t pos = int64_t(bad[1]);
    arg_error(kOp, "exclude_ids[", pos, "] = ", detail::read_i64(exclude_ids.ptr<int64_t>(), pos, s),
              " is not an item id in [0, ", N, ")");
  }
}

}  // namespace recserve::cuda
