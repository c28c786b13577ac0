// Fused inner-product top-k on the CPU.
//
// Items are streamed once per block of queries, tile by tile (a tile fits in L1/L2);
// each thread owns a contiguous range of items and keeps a running top-k heap per
// query. A SIMD micro-kernel scores a tile and reports only the rows that beat the
// current k-th best score, so the [B, N] score matrix never exists and almost no
// row reaches the heaps once they are warm. The per-thread heaps are merged at the
// end. Float16 items are widened tile by tile, so they cost half the memory traffic.
#include <algorithm>
#include <limits>
#include <vector>

#include "cpu/parallel.h"
#include "cpu/simd.h"
#include "recserve/checks.h"
#include "recserve/ops.h"

namespace recserve::cpu {
namespace {

constexpr const char* kOp = "topk_inner_product";
constexpr int64_t kTile = 128;                // items per tile
constexpr int64_t kMaxQueryBlock = 256;       // queries sharing one pass over the items
constexpr int64_t kHeapBudgetBytes = 64 << 20;
constexpr int64_t kMinMacsPerThread = 1 << 20;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Entry {
  float score;
  int64_t id;
};

// Higher score first; ties to the smaller id.
inline bool better(const Entry& a, const Entry& b) {
  return a.score > b.score || (a.score == b.score && a.id < b.id);
}

// Min-heap under `better`: the root is the worst entry kept. Within one thread
// items arrive in increasing id order, so a candidate that merely ties the root
// never displaces it and a strict `score > threshold()` test is exact.
class RunningTopK {
 public:
  void reset(int64_t capacity) {
    cap_ = capacity;
    heap_.clear();
    heap_.reserve(size_t(std::min<int64_t>(capacity, 1 << 16)));
  }
  float threshold() const { return int64_t(heap_.size()) < cap_ ? kNegInf : heap_[0].score; }
  void push(float score, int64_t id) {
    const Entry e{score, id};
    if (int64_t(heap_.size()) < cap_) {
      heap_.push_back(e);
      std::push_heap(heap_.begin(), heap_.end(), better);
    } else if (better(e, heap_[0])) {
      std::pop_heap(heap_.begin(), heap_.end(), better);
      heap_.back() = e;
      std::push_heap(heap_.begin(), heap_.end(), better);
    }
  }
  const std::vector<Entry>& entries() const { return heap_; }

 private:
  int64_t cap_ = 0;
  std::vector<Entry> heap_;
};

// Per-query sorted exclusion lists (the caller's lists are unordered).
class Exclusions {
 public:
  Exclusions(const TensorView& indptr, const TensorView& ids, int64_t num_queries,
             int64_t num_items) {
    if (!indptr.present) return;
    const int64_t* p = indptr.ptr<int64_t>();
    const int64_t* e = ids.ptr<int64_t>();
    const int64_t total = ids.shape[0];
    check_offsets_values(kOp, "exclude_indptr", p, num_queries + 1, total, "len(exclude_ids)");
    for (int64_t j = 0; j < total; ++j)
      if (e[j] < 0 || e[j] >= num_items)
        arg_error(kOp, "exclude_ids[", j, "] = ", e[j], " is not an item id in [0, ", num_items, ")");
    indptr_.assign(p, p + num_queries + 1);
    ids_.assign(e, e + total);
    for (int64_t q = 0; q < num_queries; ++q)
      std::sort(ids_.begin() + p[q], ids_.begin() + p[q + 1]);
  }
  bool excluded(int64_t query, int64_t item) const {
    if (indptr_.empty()) return false;
    return std::binary_search(ids_.begin() + indptr_[query], ids_.begin() + indptr_[query + 1], item);
  }

 private:
  std::vector<int64_t> indptr_, ids_;
};

void write_sorted(std::vector<Entry>& all, int64_t k, float* scores, int64_t* ids) {
  const int64_t n = std::min<int64_t>(k, int64_t(all.size()));
  std::partial_sort(all.begin(), all.begin() + n, all.end(), better);
  for (int64_t j = 0; j < n; ++j) {
    scores[j] = all[j].score;
    ids[j] = all[j].id;
  }
  for (int64_t j = n; j < k; ++j) {
    scores[j] = kNegInf;
    ids[j] = -1;
  }
}

}  // namespace

void topk_inner_product(const TensorView& queries, const TensorView& items, int64_t k,
                        const TensorView& exclude_indptr, const TensorView& exclude_ids,
                        const TensorView& out_scores, const TensorView& out_ids) {
  const int64_t num_queries = queries.shape[0], d = queries.shape[1];
  const int64_t num_items = items.shape[0];
  const Exclusions excl(exclude_indptr, exclude_ids, num_queries, num_items);
  float* o_scores = out_scores.ptr<float>();
  int64_t* o_ids = out_ids.ptr<int64_t>();
  const int64_t cap = std::min(k, num_items);  // heap capacity per query
  if (cap == 0) {  // no items at all: every slot is the "not enough items" tail
    std::vector<Entry> none;
    for (int64_t q = 0; q < num_queries; ++q) write_sorted(none, k, o_scores + q * k, o_ids + q * k);
    return;
  }

  const SimdKernels& sk = simd();
  const int lanes = sk.lanes;
  const bool half = items.dtype == DType::f16;
  const int64_t ldx = items.stride[0];
  const float* q_all = queries.ptr<float>();

  const int64_t macs_per_query = num_items * std::max<int64_t>(d, 1);
  const int nt = int(std::min<int64_t>(
      threads_for(num_queries * macs_per_query, kMinMacsPerThread),
      std::max<int64_t>(1, (num_items + 4 * kTile - 1) / (4 * kTile))));
  // Query block: as many queries per pass as the heap budget allows.
  const int64_t per_query_bytes = std::max<int64_t>(cap, 1) * int64_t(sizeof(Entry)) * nt;
  int64_t block = std::clamp<int64_t>(kHeapBudgetBytes / per_query_bytes, 1, kMaxQueryBlock);
  if (block >= lanes) block -= block % lanes;
  block = std::min(block, num_queries);  // small batches: allocate only what they use

  std::vector<RunningTopK> heaps(size_t(nt * block));
  std::vector<float> qt;  // the current query block transposed, [d][w]

  for (int64_t q0 = 0; q0 < num_queries; q0 += block) {
    const int64_t nq = std::min(block, num_queries - q0);
    // Several queries: the transposed kernel scores `lanes` of them per FMA.
    // One to three: score row by row (most lanes would be padding).
    const bool use_lanes = lanes > 1 && nq * 4 >= lanes;
    const int64_t w = use_lanes ? (nq + lanes - 1) / lanes * lanes : 1;
    if (use_lanes) {
      qt.assign(size_t(d * w), 0.f);
      for (int64_t l = 0; l < nq; ++l)
        for (int64_t j = 0; j < d; ++j) qt[size_t(j * w + l)] = q_all[(q0 + l) * d + j];
    }
    for (auto& h : heaps) h.reset(cap);

#pragma omp parallel num_threads(nt)
    {
      const int t = thread_id();
      const int64_t per = (num_items + nt - 1) / nt;
      const int64_t lo = std::min<int64_t>(num_items, t * per);
      const int64_t hi = std::min<int64_t>(num_items, lo + per);
      RunningTopK* my = heaps.data() + t * block;
      std::vector<float> widened(half && use_lanes ? size_t(kTile * d) : 0);
      std::vector<float> scores(size_t(kTile * w));
      std::vector<int32_t> hits(static_cast<size_t>(kTile));
      std::vector<float> thr(static_cast<size_t>(w));

      for (int64_t start = lo; start < hi; start += kTile) {
        const int64_t n = std::min(kTile, hi - start);
        if (use_lanes) {
          const float* x = items.ptr<float>() + start * ldx;
          int64_t ld = ldx;
          if (half) {  // widen once per tile, reused by every query lane
            sk.half_to_float_rows(items.ptr<uint16_t>() + start * ldx, ldx, n, d, widened.data());
            x = widened.data();
            ld = d;
          }
          for (int64_t l = 0; l < w; ++l)
            thr[l] = l < nq ? my[l].threshold() : std::numeric_limits<float>::infinity();
          const int64_t nh = sk.score_tile_lanes(qt.data(), w, thr.data(), x, ld, n, d, scores.data(), hits.data());
          for (int64_t h = 0; h < nh; ++h) {
            const int64_t i = hits[h];
            for (int64_t l = 0; l < nq; ++l) {
              RunningTopK& heap = my[l];
              const float s = scores[size_t(i * w + l)];
              if (s > heap.threshold() && !excl.excluded(q0 + l, start + i)) heap.push(s, start + i);
            }
          }
        } else {
          for (int64_t l = 0; l < nq; ++l) {
            RunningTopK& heap = my[l];
            const float* q = q_all + (q0 + l) * d;
            const int64_t nh =
                half ? sk.score_tile_row_f16(q, heap.threshold(), items.ptr<uint16_t>() + start * ldx,
                                             ldx, n, d, scores.data(), hits.data())
                     : sk.score_tile_row(q, heap.threshold(), items.ptr<float>() + start * ldx, ldx,
                                         n, d, scores.data(), hits.data());
            for (int64_t h = 0; h < nh; ++h) {
              const int64_t i = hits[h];
              const float s = scores[size_t(i)];
              if (s > heap.threshold() && !excl.excluded(q0 + l, start + i)) heap.push(s, start + i);
            }
          }
        }
      }
    }

    // Merge the threads' heaps per query.
#pragma omp parallel for num_threads(threads_for(nq * nt * std::max<int64_t>(cap, 1), 1 << 16)) schedule(dynamic, 4)
    for (int64_t q = 0; q < nq; ++q) {
      std::vector<Entry> all;
      for (int t = 0; t < nt; ++t) {
        const auto& e = heaps[size_t(t * block + q)].entries();
        all.insert(all.end(), e.begin(), e.end());
      }
      write_sorted(all, k, o_scores + (q0 + q) * k, o_ids + (q0 + q) * k);
    }
  }
}

}  // namespace recserve::cpu
