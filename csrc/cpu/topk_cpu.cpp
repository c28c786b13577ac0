// Fused inner-product top-k on the CPU.
//
// Items are streamed once per block of queries, tile by tile (a tile fits in L1/L2);
// threads take chunks of items dynamically and keep a running top-k heap per
// query. A SIMD micro-kernel scores a tile and reports only the rows that beat the
// current k-th best score, so the [B, N] score matrix never exists and almost no
// row reaches the heaps once they are warm. The per-thread heaps are merged at the
// end. Float16 items are widened tile by tile, so they cost half the memory traffic.
//
// On CPUs with AVX512_BF16, blocks of several queries are first scored in bfloat16
// (twice the multiply rate of float32 FMAs). The bfloat16 score of a row is within a
// proven bound of its float32 score, so a row whose bfloat16 score cannot beat the
// heap threshold minus that bound cannot enter the heap; the few rows that can are
// rescored with the float32 kernel. Results are bit-identical to the float32 path.
// A matrix searched many times can have its bfloat16 form made once (topk_prepare):
// calls then read those rows instead of converting each tile.
//
// With AVX2 alone, prepared items get an int8 form instead (each tile quantized with
// one scale) and the same filter runs in int8 (twice the float32 FMA rate, a quarter of
// its bytes), with its own bound: the quantization errors of query and rows, measured.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

#include "cpu/half.h"
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
constexpr float kPosInf = std::numeric_limits<float>::infinity();
// A tile where more than 1 row in this many passes the bfloat16 filter (heaps still
// filling, or scores packed closer than the bound) is scored in float32 directly.
constexpr int64_t kMaxPassFraction = 4;
constexpr int64_t kMaxBackoffTiles = 16;  // after misses, the filter is retried at least this often
std::atomic<int64_t> g_filtered_tiles{0};

// float32 -> bfloat16 bits, round to nearest even (what VCVTNE2PS2BF16 does for normal
// numbers; NaN stays NaN).
inline uint32_t bf16_bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (u >> 16) | 0x40u;
  return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}

// Bound on |float32 score - bfloat16 score| for query q and row x:
//   rel(d) * |q| * |x| + abs(d) * (1 + |q| + |x|).
// Rounding q and x to bfloat16 moves each product q_j x_j by at most
// (2 * 2^-8 + 2^-16) |q_j x_j|; the float32 kernel's FMA chain and the bfloat16
// kernel's float32 accumulation each add at most gamma_d * sum |q_j x_j| (gamma_d =
// d u / (1 - d u), u = 2^-24; counted twice more for implementations that round
// each pair twice); sum |q_j x_j| <= |q| |x| (Cauchy-Schwarz), and 5 % covers the
// rounding of the norms themselves. The absolute term covers bfloat16 subnormals,
// which the instructions flush to zero (each < 2^-126).
struct Bf16Bound {
  double rel, abs;
  explicit Bf16Bound(int64_t d) {
    const double u = std::ldexp(1.0, -24), gamma = double(d) * u / (1.0 - double(d) * u);
    rel = 1.05 * (std::ldexp(1.0, -7) + std::ldexp(1.0, -16) + 4.0 * gamma);
    abs = double(d) * std::ldexp(1.0, -120);
  }
};

// The int8 filter's bound for query q (its quantized form q~ = scale_q * q_hat) and the
// rows of a tile (x~ = scale_t * x_hat): q.x - q~.x~ = (q - q~).x + q~.(x - x~), so
//   |q.x - q~.x~| <= |q - q~| max|x| + |q~| max|x - x~|,
// both error norms measured (in double) when the query and the tile were quantized. On
// top: the float32 kernel's own rounding (gamma_d |q| |x|, counted four times as for
// bfloat16), the rounding of scale_q * scale_t and of the integer sum to float32 (a few
// units in 2^-24 of |q~| |x~|, covered by 2^-20), and 2 % for the norms' own rounding.
inline double i8_slack(int64_t d, double q_norm, double q_err, double q_quant_norm, double tile_norm,
                       double tile_err) {
  const double u = std::ldexp(1.0, -24), gamma = double(d) * u / (1.0 - double(d) * u);
  return 1.02 * (q_err * tile_norm + q_quant_norm * tile_err) +
         (4.0 * gamma + std::ldexp(1.0, -20)) * (q_norm + q_err) * (tile_norm + tile_err) +
         double(d) * std::ldexp(1.0, -120);
}

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
      // Replace the root and sift it down: one pass, where pop_heap + push_heap take two
      // (the heap work dominates a batch over a small catalogue while thresholds rise).
      const size_t n = heap_.size();
      size_t i = 0;
      for (size_t c = 1; c < n; c = 2 * i + 1) {
        if (c + 1 < n && better(heap_[c], heap_[c + 1])) ++c;  // the worse child
        if (!better(e, heap_[c])) break;
        heap_[i] = heap_[c];
        i = c;
      }
      heap_[i] = e;
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

enum class Filter { none, bf16, i8 };

// One block of queries as the lane kernels take it.
struct QueryBlock {
  int64_t nq = 0, w = 0;        // real queries, lanes (a multiple of the SIMD width)
  std::vector<float> qt;        // transposed, [d][w], padding lanes zero
  Filter filter = Filter::none;  // the pre-filter these queries go through (none: a non-finite query)
  std::vector<uint32_t> qt2;    // bfloat16 pairs, [dp][w]
  std::vector<uint32_t> q2;     // the same pairs per query, [nq][dp] (the one-query filter)
  std::vector<double> qnorm;    // |q_l|
  // The int8 filter: q_hat in quads [dq / 4][w] and per query [nq][dq]; per lane the
  // offset 128 * sum(q_hat), the scale, |q - q~| and |q~| (padding lanes: zeros).
  std::vector<int32_t> qt4, qoff;
  std::vector<int8_t> q8;
  std::vector<float> qscale;
  std::vector<double> qerr, qquant;

  void fill(const float* q_all, int64_t q0, int64_t d, Filter want) {
    qt.assign(size_t(d * w), 0.f);
    for (int64_t l = 0; l < nq; ++l)
      for (int64_t j = 0; j < d; ++j) qt[size_t(j * w + l)] = q_all[(q0 + l) * d + j];
    filter = want;
    if (want == Filter::i8) fill_i8(q_all, q0, d);
    if (want != Filter::bf16) return;
    const int64_t dp = (d + 1) / 2;
    qt2.assign(size_t(dp * w), 0u);
    q2.assign(size_t(dp * nq), 0u);
    qnorm.assign(size_t(w), 0.0);
    for (int64_t l = 0; l < nq; ++l) {
      const float* q = q_all + (q0 + l) * d;
      double sq = 0.0;
      for (int64_t j = 0; j < d; ++j) {
        qt2[size_t(j / 2 * w + l)] |= bf16_bits(q[j]) << (16 * (j % 2));
        q2[size_t(l * dp + j / 2)] |= bf16_bits(q[j]) << (16 * (j % 2));
        sq += double(q[j]) * double(q[j]);
      }
      qnorm[size_t(l)] = std::sqrt(sq);
      if (!std::isfinite(qnorm[size_t(l)])) filter = Filter::none;  // inf/NaN queries: no useful bound
    }
  }

  // q_hat = round(q / scale) with scale = max|q_j| / 63 (7 bits: two products of a
  // row byte and a query byte fit 16 bits), the errors measured in double.
  void fill_i8(const float* q_all, int64_t q0, int64_t d) {
    const int64_t dq = (d + 3) / 4 * 4;
    qt4.assign(size_t(dq / 4 * w), 0);
    q8.assign(size_t(dq * nq), 0);
    qoff.assign(size_t(w), 0);
    qscale.assign(size_t(w), 0.f);
    qnorm.assign(size_t(w), 0.0);
    qerr.assign(size_t(w), 0.0);
    qquant.assign(size_t(w), 0.0);
    for (int64_t l = 0; l < nq; ++l) {
      const float* q = q_all + (q0 + l) * d;
      float amax = 0.f;
      for (int64_t j = 0; j < d; ++j) amax = std::max(amax, std::fabs(q[j]));
      if (!std::isfinite(amax)) {  // inf/NaN queries: no useful bound
        filter = Filter::none;
        return;
      }
      const float scale = amax / 63.f;
      double sq = 0.0, err = 0.0, quant = 0.0;
      int32_t sum = 0;
      for (int64_t j = 0; j < d; ++j) {
        const int32_t v = scale > 0.f ? int32_t(std::clamp(std::nearbyint(q[j] / scale), -63.f, 63.f)) : 0;
        q8[size_t(l * dq + j)] = int8_t(v);
        reinterpret_cast<int8_t*>(qt4.data())[size_t((j / 4 * w + l) * 4 + j % 4)] = int8_t(v);
        sum += v;
        const double x = double(q[j]), xq = double(scale) * v;
        sq += x * x;
        err += (x - xq) * (x - xq);
        quant += xq * xq;
      }
      qoff[size_t(l)] = 128 * sum;
      qscale[size_t(l)] = scale;
      qnorm[size_t(l)] = std::sqrt(sq);
      qerr[size_t(l)] = std::sqrt(err);
      qquant[size_t(l)] = std::sqrt(quant);
      if (!std::isfinite(qnorm[size_t(l)])) {
        filter = Filter::none;
        return;
      }
    }
  }
};

// When a filter keeps passing too many rows (thresholds still low against the
// catalogue's scores), skip it for the next tiles, twice as many after each miss.
class Backoff {
 public:
  bool skip() {
    if (skip_ == 0) return false;
    --skip_;
    return true;
  }
  void record(bool in_vain) {
    backoff_ = in_vain ? std::min<int64_t>(2 * backoff_ + 1, kMaxBackoffTiles) : 0;
    skip_ = backoff_;
  }

 private:
  int64_t skip_ = 0, backoff_ = 0;  // tiles left to skip; the current backoff
};

// thr lowered by the bound on the bfloat16 error for a query of norm q against rows of
// norm <= max_norm, rounded down: no row whose float32 score beats thr scores below it.
inline float lowered_threshold(const Bf16Bound& bound, float thr, double q, double max_norm) {
  const double slack = bound.rel * q * max_norm + bound.abs * (1.0 + q + max_norm);
  return std::nextafter(float(double(thr) - slack), kNegInf);
}

// The same for the int8 filter: query l of qb against tile t of the int8 rows.
inline float lowered_threshold_i8(const QueryBlock& qb, int64_t l, const I8Items& pre, int64_t t, float thr) {
  const double slack = i8_slack(pre.d, qb.qnorm[size_t(l)], qb.qerr[size_t(l)], qb.qquant[size_t(l)],
                                pre.tile_norms[size_t(t)], pre.tile_errors[size_t(t)]);
  return std::nextafter(float(double(thr) - slack), kNegInf);
}

// The prepared forms the selected ISA's filters can read (tests switch ISAs; a form made
// under another ISA is ignored), checked against the items they were made from.
struct Usable {
  const Bf16Items* bf16 = nullptr;
  const I8Items* i8 = nullptr;
};
Usable usable(const PreparedItems* prepared, const SimdKernels& sk, const TensorView& items) {
  Usable u;
  if (prepared == nullptr) return u;
  if (prepared->bf16 && sk.prefilter_lanes_bf16 != nullptr) u.bf16 = prepared->bf16.get();
  if (prepared->i8 && sk.prefilter_lanes_i8 != nullptr) u.i8 = prepared->i8.get();
  const auto check = [&](int64_t n, int64_t d) {
    if (n != items.shape[0] || d != items.shape[1])
      arg_error(kOp, "the prepared items are [", n, ", ", d, "], not the items' shape");
  };
  if (u.bf16) check(u.bf16->num_items, u.bf16->d);
  if (u.i8) check(u.i8->num_items, u.i8->d);
  return u;
}

// Scores tiles of items against a query block (one per thread, owning its buffers):
// scores[i * w + l] for every row i it reports as a hit (some lane beats thr[l]).
// With a pre-filter, only rows that pass it are scored in float32, by the same
// score_tile_lanes call on that row alone, so hits and their scores are the same bits
// as without the filter.
class LaneScorer {
 public:
  LaneScorer(const SimdKernels& sk, const QueryBlock& qb, const Bf16Bound& bound, int64_t d, bool half,
             const Usable& prepared)
      : sk_(sk), qb_(qb), bound_(bound), prepared_(prepared), d_(d), dp_((d + 1) / 2), half_(half),
        widened_(half ? size_t(kTile * d) : 0), scores_(size_t(kTile * qb.w)), hits_(size_t(kTile)),
        xb_(qb.filter == Filter::bf16 && prepared.bf16 == nullptr ? size_t(kTile * dp_) : 0),
        thr_lo_(qb.filter != Filter::none ? size_t(qb.w) : 0),
        scale_(qb.filter == Filter::i8 ? size_t(qb.w) : 0), passed_(qb.filter != Filter::none ? size_t(kTile) : 0) {}

  const float* scores() const { return scores_.data(); }
  const int32_t* hits() const { return hits_.data(); }
  const int32_t* passed() const { return passed_.data(); }

  // Rows x + i * ldx, i < n, of float32 or (half) binary16 items; x is row `start` (a
  // multiple of kTile) of the matrix.
  int64_t score(const void* x, int64_t start, int64_t ldx, int64_t n, const float* thr) {
    const int64_t np = try_filter(x, start, ldx, n, thr);
    if (np < 0) {  // score the whole tile
      const float* rows = half_ ? widen(x, ldx, 0, n) : static_cast<const float*>(x);
      return sk_.score_tile_lanes(qb_.qt.data(), qb_.w, thr, rows, half_ ? d_ : ldx, n, d_, scores_.data(),
                                  hits_.data());
    }
    int64_t nh = 0;
    int32_t unused;
    for (int64_t c = 0; c < np; ++c) {
      const int64_t i = passed_[size_t(c)];
      const float* row = half_ ? widen(x, ldx, i, 1) : static_cast<const float*>(x) + i * ldx;
      if (sk_.score_tile_lanes(qb_.qt.data(), qb_.w, thr, row, ldx, 1, d_, scores_.data() + i * qb_.w, &unused))
        hits_[size_t(nh++)] = int32_t(i);
    }
    return nh;
  }

  // The rows of this tile that pass the filter (passed()), or -1: score the whole tile
  // (the filter cannot be used here, or is backing off after tiles it filtered in vain).
  int64_t try_filter(const void* x, int64_t start, int64_t ldx, int64_t n, const float* thr) {
    if (qb_.filter == Filter::none || backoff_.skip()) return -1;
    const int64_t np = filter(x, start, ldx, n, thr);
    if (np < 0) return -1;
    backoff_.record(np * kMaxPassFraction > n);
    if (np * kMaxPassFraction > n) return -1;
    g_filtered_tiles.fetch_add(1, std::memory_order_relaxed);
    return np;
  }

  // Rows that pass the pre-filter (into passed_), or -1 when it cannot be used for this
  // tile: some heap is not full yet (its threshold is -inf) or some row has a non-finite
  // norm.
  int64_t filter(const void* x, int64_t start, int64_t ldx, int64_t n, const float* thr) {
    for (int64_t l = 0; l < qb_.nq; ++l)
      if (thr[l] == kNegInf) return -1;
    if (qb_.filter == Filter::i8) return filter_i8(start, n, thr);
    const uint32_t* xb = xb_.data();
    float max_norm;
    if (prepared_.bf16 != nullptr) {
      xb = prepared_.bf16->rows.data() + start * dp_;
      max_norm = prepared_.bf16->tile_norms[size_t(start / kTile)];
    } else {
      max_norm = sk_.to_bf16_rows(x, half_, ldx, n, d_, xb_.data());
    }
    if (!std::isfinite(max_norm)) return -1;
    for (int64_t l = 0; l < qb_.w; ++l) {
      if (l >= qb_.nq) {
        thr_lo_[size_t(l)] = kPosInf;  // padding lanes never pass
        continue;
      }
      thr_lo_[size_t(l)] = lowered_threshold(bound_, thr[l], qb_.qnorm[size_t(l)], max_norm);
    }
    return sk_.prefilter_lanes_bf16(qb_.qt2.data(), qb_.w, thr_lo_.data(), xb, n, dp_, passed_.data());
  }

 private:
  int64_t filter_i8(int64_t start, int64_t n, const float* thr) {
    const I8Items& pre = *prepared_.i8;
    const int64_t t = start / kTile;
    const float tile_scale = pre.tile_scale[size_t(t)];
    if (!std::isfinite(tile_scale)) return -1;
    for (int64_t l = 0; l < qb_.w; ++l) {
      scale_[size_t(l)] = qb_.qscale[size_t(l)] * tile_scale;
      thr_lo_[size_t(l)] = l < qb_.nq ? lowered_threshold_i8(qb_, l, pre, t, thr[l]) : kPosInf;
    }
    return sk_.prefilter_lanes_i8(qb_.qt4.data(), qb_.w, qb_.qoff.data(), scale_.data(), thr_lo_.data(),
                                  pre.rows.data() + start * pre.dq, n, pre.dq, passed_.data());
  }

  // Binary16 rows [i, i + n) widened into the same rows of widened_ (row stride d).
  const float* widen(const void* x, int64_t ldx, int64_t i, int64_t n) {
    float* dst = widened_.data() + i * d_;
    sk_.half_to_float_rows(static_cast<const uint16_t*>(x) + i * ldx, ldx, n, d_, dst);
    return dst;
  }

  const SimdKernels& sk_;
  const QueryBlock& qb_;
  const Bf16Bound& bound_;
  const Usable prepared_;
  const int64_t d_, dp_;
  const bool half_;
  std::vector<float> widened_, scores_;
  std::vector<int32_t> hits_;
  std::vector<uint32_t> xb_;
  std::vector<float> thr_lo_, scale_;
  std::vector<int32_t> passed_;
  Backoff backoff_;
};

// The one-query filter of the selected ISA over the prepared rows (bfloat16 or int8), if any.
Filter row_filter_kind(const SimdKernels& sk, const Usable& pre) {
  if (pre.bf16 != nullptr && sk.prefilter_row_bf16 != nullptr) return Filter::bf16;
  if (pre.i8 != nullptr && sk.prefilter_row_i8 != nullptr) return Filter::i8;
  return Filter::none;
}

// Rows of the tile at `start` (n rows) that pass the one-query filter for query l of qb
// against thr, into `passed`; -1 where the filter cannot decide (a heap not full, a
// non-finite norm).
int64_t one_query_rows(const SimdKernels& sk, const QueryBlock& qb, int64_t l, const Bf16Bound& bound,
                       const Usable& pre, int64_t start, int64_t n, float thr, int32_t* passed) {
  if (thr == kNegInf || qb.filter == Filter::none) return -1;
  const int64_t t = start / kTile;
  if (qb.filter == Filter::i8) {
    const I8Items& p = *pre.i8;
    const float tile_scale = p.tile_scale[size_t(t)];
    if (!std::isfinite(tile_scale)) return -1;
    return sk.prefilter_row_i8(qb.q8.data() + l * p.dq, qb.qoff[size_t(l)], qb.qscale[size_t(l)] * tile_scale,
                               lowered_threshold_i8(qb, l, p, t, thr), p.rows.data() + start * p.dq, n,
                               p.num_items - start, p.dq, passed);
  }
  const Bf16Items& p = *pre.bf16;
  const float max_norm = p.tile_norms[size_t(t)];
  if (!std::isfinite(max_norm)) return -1;
  const int64_t dp = (p.d + 1) / 2;
  return sk.prefilter_row_bf16(qb.q2.data() + l * dp, lowered_threshold(bound, thr, qb.qnorm[size_t(l)], max_norm),
                               p.rows.data() + start * dp, n, p.num_items - start, dp, passed);
}

// One query's candidate rows per tile (one to three queries; one per thread and query).
// The candidates are then scored side by side, so even a filter that passes many rows
// costs about what it saves; one that passes over half of them is backed off.
class OneQueryFilter {
 public:
  // The candidates of the tile into `passed`, or -1: score the whole tile.
  int64_t candidates(const SimdKernels& sk, const QueryBlock& qb, int64_t l, const Bf16Bound& bound,
                     const Usable& pre, int64_t start, int64_t n, float thr, int32_t* passed) {
    if (backoff_.skip()) return -1;
    const int64_t np = one_query_rows(sk, qb, l, bound, pre, start, n, thr, passed);
    if (np < 0) return -1;
    backoff_.record(np * 2 > n);
    g_filtered_tiles.fetch_add(1, std::memory_order_relaxed);
    return np;
  }

 private:
  Backoff backoff_;
};

// Quantizes rows [start, start + rows) of the items as one tile: scale = max|x| / 127.
void quantize_tile(const TensorView& items, int64_t start, int64_t rows, I8Items& out) {
  const int64_t d = out.d, dq = out.dq, ldx = items.stride[0], t = start / kTile;
  const bool half = items.dtype == DType::f16;
  std::vector<float> x(size_t(rows * d));
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < d; ++j)
      x[size_t(i * d + j)] = half ? half_to_float(items.ptr<uint16_t>()[(start + i) * ldx + j])
                                  : items.ptr<float>()[(start + i) * ldx + j];
  float amax = 0.f;
  for (const float v : x) amax = std::max(amax, std::fabs(v));
  uint8_t* dst = out.rows.data() + start * dq;
  std::fill(dst, dst + rows * dq, uint8_t(128));
  if (!std::isfinite(amax)) {  // inf/NaN: this tile is never filtered
    out.tile_scale[size_t(t)] = std::numeric_limits<float>::quiet_NaN();
    return;
  }
  const float scale = amax / 127.f;
  double max_norm = 0.0, max_err = 0.0;
  for (int64_t i = 0; i < rows; ++i) {
    double sq = 0.0, err = 0.0;
    for (int64_t j = 0; j < d; ++j) {
      const float v = x[size_t(i * d + j)];
      const int32_t qv = scale > 0.f ? int32_t(std::clamp(std::nearbyint(v / scale), -127.f, 127.f)) : 0;
      dst[i * dq + j] = uint8_t(qv + 128);
      const double e = double(v) - double(scale) * qv;
      sq += double(v) * double(v);
      err += e * e;
    }
    max_norm = std::max(max_norm, std::sqrt(sq));
    max_err = std::max(max_err, std::sqrt(err));
  }
  out.tile_scale[size_t(t)] = scale;
  out.tile_norms[size_t(t)] = max_norm;
  out.tile_errors[size_t(t)] = max_err;
}

}  // namespace

int64_t PreparedItems::nbytes() const {
  int64_t n = 0;
  if (bf16) n += int64_t(bf16->rows.size() * 4 + bf16->tile_norms.size() * 4);
  if (i8) n += int64_t(i8->rows.size() + i8->tile_scale.size() * (4 + 8 + 8));
  return n;
}

int64_t topk_filtered_tiles() { return g_filtered_tiles.load(); }

PreparedItems topk_prepare(const TensorView& items) {
  const SimdKernels& sk = simd();
  PreparedItems prepared;
  const int64_t n = items.shape[0], d = items.shape[1], dp = (d + 1) / 2, ldx = items.stride[0];
  const bool half = items.dtype == DType::f16;
  const int64_t tiles = (n + kTile - 1) / kTile;
  const int nt = threads_for(n * d, kMinMacsPerThread);
  if (sk.to_bf16_rows != nullptr) {
    auto out = std::make_shared<Bf16Items>();
    out->num_items = n;
    out->d = d;
    out->rows.resize(size_t(n * dp));
    out->tile_norms.resize(size_t(tiles));
    // Tile by tile, exactly as a call would convert them.
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t start = t * kTile, rows = std::min(kTile, n - start);
      const void* x = half ? static_cast<const void*>(items.ptr<uint16_t>() + start * ldx)
                           : static_cast<const void*>(items.ptr<float>() + start * ldx);
      out->tile_norms[size_t(t)] = sk.to_bf16_rows(x, half, ldx, rows, d, out->rows.data() + start * dp);
    }
    prepared.bf16 = std::move(out);
  } else if (sk.prefilter_lanes_i8 != nullptr) {
    auto out = std::make_shared<I8Items>();
    out->num_items = n;
    out->d = d;
    out->dq = (d + 3) / 4 * 4;
    out->rows.resize(size_t(n * out->dq));
    out->tile_scale.resize(size_t(tiles));
    out->tile_norms.resize(size_t(tiles));
    out->tile_errors.resize(size_t(tiles));
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t t = 0; t < tiles; ++t) quantize_tile(items, t * kTile, std::min(kTile, n - t * kTile), *out);
    prepared.i8 = std::move(out);
  }
  return prepared;
}

std::vector<int64_t> topk_filter_rows(const TensorView& queries, const TensorView& items, const float* thr,
                                      const PreparedItems* prepared, bool one_query) {
  const SimdKernels& sk = simd();
  const int64_t nq = queries.shape[0], d = queries.shape[1], ldx = items.stride[0];
  if (nq < 1 || nq > kMaxQueryBlock) arg_error(kOp, "1..", kMaxQueryBlock, " queries, got ", nq);
  const Usable pre = usable(prepared, sk, items);
  const Filter kind = one_query ? row_filter_kind(sk, pre)
                      : sk.prefilter_lanes_bf16 != nullptr ? Filter::bf16
                      : pre.i8 != nullptr ? Filter::i8 : Filter::none;
  if (kind == Filter::none)
    arg_error(kOp, "no ", one_query ? "one-query" : "lanes", " pre-filter for these items on ", sk.name,
              " (the int8 filter and the one-query filters need prepared items)");
  QueryBlock qb;
  qb.nq = nq;
  qb.w = (nq + sk.lanes - 1) / sk.lanes * sk.lanes;
  qb.fill(queries.ptr<float>(), 0, d, kind);
  if (qb.filter == Filter::none) arg_error(kOp, "a query has a non-finite norm");
  const bool half = items.dtype == DType::f16;
  const Bf16Bound bound(d);
  LaneScorer scorer(sk, qb, bound, d, half, pre);
  std::vector<float> t(size_t(qb.w), kPosInf);
  std::copy(thr, thr + nq, t.begin());
  std::vector<int64_t> rows;
  std::vector<int32_t> passed(static_cast<size_t>(kTile));
  for (int64_t start = 0; start < items.shape[0]; start += kTile) {
    const int64_t n = std::min(kTile, items.shape[0] - start);
    if (one_query) {  // each query through the one-query kernel; the union of their rows
      std::vector<bool> any(size_t(n), false);
      for (int64_t l = 0; l < nq; ++l) {
        const int64_t np = one_query_rows(sk, qb, l, bound, pre, start, n, thr[l], passed.data());
        if (np < 0) arg_error(kOp, "the filter does not apply to the tile at row ", start);
        for (int64_t c = 0; c < np; ++c) any[size_t(passed[size_t(c)])] = true;
      }
      for (int64_t i = 0; i < n; ++i)
        if (any[size_t(i)]) rows.push_back(start + i);
      continue;
    }
    const void* x = half ? static_cast<const void*>(items.ptr<uint16_t>() + start * ldx)
                         : static_cast<const void*>(items.ptr<float>() + start * ldx);
    const int64_t np = scorer.filter(x, start, ldx, n, t.data());
    if (np < 0) arg_error(kOp, "the filter does not apply to the tile at row ", start);
    for (int64_t c = 0; c < np; ++c) rows.push_back(start + scorer.passed()[c]);
  }
  return rows;
}

void topk_inner_product(const TensorView& queries, const TensorView& items, int64_t k,
                        const TensorView& exclude_indptr, const TensorView& exclude_ids,
                        const TensorView& out_scores, const TensorView& out_ids, const PreparedItems* prepared) {
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

  // About 16 chunks per thread, whole tiles.
  const int64_t chunk_items = std::max<int64_t>(kTile, (num_items / (16 * nt) + kTile - 1) / kTile * kTile);
  const int64_t num_chunks = (num_items + chunk_items - 1) / chunk_items;

  std::vector<RunningTopK> heaps(size_t(nt * block));
  QueryBlock qb;
  const Bf16Bound bound(d);
  const Usable pre = usable(prepared, sk, items);
  // Several queries: the bfloat16 filter where the ISA has it (rows converted per tile
  // unless prepared), else the int8 filter over prepared rows.
  const Filter lanes_filter = sk.prefilter_lanes_bf16 != nullptr ? Filter::bf16
                              : pre.i8 != nullptr                ? Filter::i8
                                                                 : Filter::none;

  for (int64_t q0 = 0; q0 < num_queries; q0 += block) {
    const int64_t nq = std::min(block, num_queries - q0);
    // Several queries: the transposed kernel scores `lanes` of them per FMA.
    // One to three: score row by row (most lanes would be padding). With prepared
    // rows, one to three queries are also filtered first (the bfloat16 pass reads half
    // the bytes, the int8 one a quarter; the float32 rows are read only where a row passes).
    const bool use_lanes = lanes > 1 && nq >= 4;
    const Filter row_kind = use_lanes ? Filter::none : row_filter_kind(sk, pre);
    const bool row_filter = row_kind != Filter::none;
    if (use_lanes || row_filter) {
      qb.nq = nq;
      qb.w = (nq + lanes - 1) / lanes * lanes;
      // The int8 lanes filter only where most of a thread's tiles come after its heaps
      // warm: a tile passes while the union of the lanes' thresholds admits a quarter of
      // its rows, about the first 4 nq k / kTile tiles; on a small catalogue the tries in
      // vain and the per-row rescoring cost more than the filter saves (10k items, 32-64
      // queries: 8-11 % slower on Zen 3; 1M items: 1.4-1.55x faster).
      const bool warm_enough = num_items >= int64_t(nt) * 16 * nq * cap;
      const Filter lanes_kind = lanes_filter == Filter::i8 && !warm_enough ? Filter::none : lanes_filter;
      qb.fill(q_all, q0, d, use_lanes ? lanes_kind : row_kind);
    }
    for (auto& h : heaps) h.reset(cap);

#pragma omp parallel num_threads(nt)
    {
      const int t = thread_id();
      RunningTopK* my = heaps.data() + t * block;
      std::vector<float> scores(use_lanes ? 0 : size_t(kTile));
      std::vector<int32_t> hits(use_lanes ? 0 : size_t(kTile));
      std::vector<float> thr(use_lanes ? size_t(qb.w) : 0);
      std::vector<int32_t> passed(row_filter ? size_t(kTile) : 0);
      std::vector<OneQueryFilter> one_query(row_filter ? size_t(nq) : 0);
      const size_t esz = half ? 2 : 4;  // bytes per item value
      std::vector<char> gathered(row_filter ? size_t(kTile * d) * esz : 0);
      std::optional<LaneScorer> lanes_scorer;
      if (use_lanes) lanes_scorer.emplace(sk, qb, bound, d, half, pre);

      // Chunks are handed out dynamically: a thread the OS preempts (a server shares its
      // cores with the network stack) does not hold the batch up. OpenMP hands them out in
      // increasing order, so each thread still sees item ids in increasing order.
#pragma omp for schedule(dynamic, 1) nowait
      for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
        const int64_t hi = std::min(num_items, (chunk + 1) * chunk_items);
        for (int64_t start = chunk * chunk_items; start < hi; start += kTile) {
          const int64_t n = std::min(kTile, hi - start);
          if (use_lanes) {
            for (int64_t l = 0; l < qb.w; ++l) thr[l] = l < nq ? my[l].threshold() : kPosInf;
            const void* x = half ? static_cast<const void*>(items.ptr<uint16_t>() + start * ldx)
                                 : static_cast<const void*>(items.ptr<float>() + start * ldx);
            const int64_t nh = lanes_scorer->score(x, start, ldx, n, thr.data());
            const float* sc = lanes_scorer->scores();
            const int32_t* hit = lanes_scorer->hits();
            // thr[l] tracks my[l].threshold(): the dense array, not one heap per query, is
            // what each hit row is compared against.
            for (int64_t h = 0; h < nh; ++h) {
              const int64_t i = hit[h];
              const float* row = sc + i * qb.w;
              for (int64_t l = 0; l < nq; ++l) {
                if (row[l] > thr[l] && !excl.excluded(q0 + l, start + i)) {
                  my[l].push(row[l], start + i);
                  thr[l] = my[l].threshold();
                }
              }
            }
          } else {
            // m rows (row r at x + r * ld, its id ids[r] or start + r) through the float32 row
            // kernel; a row scores the same bits wherever it lies and whatever its neighbours.
            auto score_rows = [&](RunningTopK& heap, const float* q, int64_t l, const void* x, int64_t ld,
                                  int64_t m, const int32_t* ids) {
              const int64_t nh =
                  half ? sk.score_tile_row_f16(q, heap.threshold(), static_cast<const uint16_t*>(x), ld, m, d,
                                               scores.data(), hits.data())
                       : sk.score_tile_row(q, heap.threshold(), static_cast<const float*>(x), ld, m, d,
                                           scores.data(), hits.data());
              for (int64_t h = 0; h < nh; ++h) {
                const float s = scores[size_t(hits[h])];
                const int64_t id = start + (ids ? ids[hits[h]] : hits[h]);
                if (s > heap.threshold() && !excl.excluded(q0 + l, id)) heap.push(s, id);
              }
            };
            const size_t row_bytes = size_t(d) * esz;
            const char* tile = static_cast<const char*>(items.data) + size_t(start * ldx) * esz;
            for (int64_t l = 0; l < nq; ++l) {
              const float* q = q_all + (q0 + l) * d;
              const int64_t np = row_filter ? one_query[size_t(l)].candidates(sk, qb, l, bound, pre, start, n,
                                                                              my[l].threshold(), passed.data())
                                            : -1;
              if (np < 0) {
                score_rows(my[l], q, l, tile, ldx, n, nullptr);
              } else {
                // The candidates side by side, so the row kernel scores them 8 at a time.
                for (int64_t c = 0; c < np; ++c)
                  std::memcpy(gathered.data() + size_t(c) * row_bytes,
                              tile + size_t(passed[size_t(c)] * ldx) * esz, row_bytes);
                score_rows(my[l], q, l, gathered.data(), d, np, passed.data());
              }
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
