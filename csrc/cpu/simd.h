// Run-time ISA dispatch for the CPU kernels' inner loops.
//
// Each ISA (scalar, AVX2, AVX-512, AVX-512 + BF16, AMX) fills one SimdKernels table in its own
// translation unit (simd_<isa>.cpp) using function-level target attributes, so
// the rest of the library is compiled for the baseline ISA and never executes an
// instruction the CPU lacks. The table is chosen once from CPUID; tests and
// benchmarks can force a lower ISA with set_isa().
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace recserve::cpu {

struct SimdKernels {
  const char* name;
  // Query lanes processed together by score_tile_lanes (the SIMD width in floats).
  int lanes;

  // scores[i] = dot(q, x_i) for n rows x_i = x + i * ldx of length d. Returns the
  // number of rows with scores[i] > thr, their row numbers written to hits[0..n).
  // Every row goes through the same arithmetic, so equal rows score equal.
  int64_t (*score_tile_row)(const float* q, float thr, const float* x, int64_t ldx, int64_t n,
                            int64_t d, float* scores, int32_t* hits);
  // Same for IEEE binary16 rows, widened in registers.
  int64_t (*score_tile_row_f16)(const float* q, float thr, const uint16_t* x, int64_t ldx,
                                int64_t n, int64_t d, float* scores, int32_t* hits);

  // w queries at once (w a multiple of `lanes`): qt is the query block transposed,
  // [d][w] (lanes beyond the real queries are zero, their thr +inf).
  // scores[i * w + l] = dot(q_l, x_i). Returns the rows where any lane beats thr[l].
  int64_t (*score_tile_lanes)(const float* qt, int64_t w, const float* thr, const float* x,
                              int64_t ldx, int64_t n, int64_t d, float* scores, int32_t* hits);

  // dst[i * d + j] = float(src[i * lds + j]) for IEEE binary16 src.
  void (*half_to_float_rows)(const uint16_t* src, int64_t lds, int64_t n, int64_t d, float* dst);

  // Pools bags [b0, b1): out[b][j] = sum over p in [off[b], off[b + 1]) of
  // w[p] * row(idx[p])[j] (w == nullptr: all 1; mean: divided by the bag size;
  // empty bag: zeros), rows at base + idx[p] * ld_bytes, float32 or binary16
  // (`half`). Each column is summed in bag order with a multiply and an add (two
  // roundings, as the spec), accumulators in registers. Rows idx[p + ahead] are
  // prefetched while p is pooled. Returns -1, or the first position p whose
  // index is outside [0, num_rows) (pooling stops there).
  int64_t (*pool_bags)(const char* base, int64_t ld_bytes, bool half, const int64_t* idx,
                       const int64_t* off, int64_t b0, int64_t b1, int64_t num_indices,
                       int64_t num_rows, const float* w, bool mean, int64_t d, float* out);

  // Optional (nullptr unless the CPU has AVX512_BF16): a bfloat16 pre-filter for
  // score_tile_lanes at twice its multiply rate. to_bf16_rows rounds n float32 (or, with
  // `half`, binary16) rows x + i * ldx (nearest even) into dst, [n][dp] words of two bfloat16 (dp = ceil(d / 2); word p holds
  // columns 2p and 2p + 1, an odd d padded with 0) and returns the largest row norm
  // (NaN or inf if some row has one). prefilter_lanes_bf16 scores those rows against qt2,
  // the query block in the same pairs, [dp][w], and returns the rows where some lane's
  // approximate score exceeds thr_lo[l] (the caller lowers the thresholds by a bound on
  // the approximation error, so no row that could enter a heap is missed).
  float (*to_bf16_rows)(const void* x, bool half, int64_t ldx, int64_t n, int64_t d, uint32_t* dst);
  int64_t (*prefilter_lanes_bf16)(const uint32_t* qt2, int64_t w, const float* thr_lo,
                                  const uint32_t* xb, int64_t n, int64_t dp, int32_t* hits);
  // The same filter for one query (q2: its dp pairs) over n rows of such pairs: the rows
  // whose approximate score exceeds thr_lo. The top-k uses it for one to three queries
  // when the rows were prepared once (a per-call conversion would cost what it saves).
  // `readable` >= n rows exist from xb on (the kernel may prefetch past the n it scores).
  int64_t (*prefilter_row_bf16)(const uint32_t* q2, float thr_lo, const uint32_t* xb, int64_t n, int64_t readable,
                                int64_t dp, int32_t* hits);

  // Optional (nullptr except on AVX2): the same two filters over an int8 form of the rows,
  // for CPUs without bfloat16 arithmetic (four 8-bit products per 32-bit lane: twice the
  // float32 FMA rate, a quarter of its bytes). Rows xq are [n][dq] bytes (dq: d rounded up
  // to 4), each x_hat + 128 for x_hat in [-127, 127]; queries are q_hat in [-63, 63] (so
  // that two products never overflow 16 bits), padded with 0. The approximate score of
  // lane l is scale[l] * (dot(x_hat + 128, q_hat) - off[l]) with off[l] = 128 * sum(q_hat);
  // the rows where some lane's exceeds thr_lo[l] are returned. Lanes: qt4 is [dq / 4][w]
  // words of four q_hat bytes. One query: q8, its dq bytes (readable as for the bfloat16 kernel).
  int64_t (*prefilter_lanes_i8)(const int32_t* qt4, int64_t w, const int32_t* off, const float* scale,
                                const float* thr_lo, const uint8_t* xq, int64_t n, int64_t dq, int32_t* hits);
  int64_t (*prefilter_row_i8)(const int8_t* q8, int32_t off, float scale, float thr_lo, const uint8_t* xq,
                              int64_t n, int64_t readable, int64_t dq, int32_t* hits);
};

const SimdKernels& simd_scalar();
const SimdKernels& simd_avx2();
const SimdKernels& simd_avx512();
const SimdKernels& simd_avx512bf16();
// AVX-512 + BF16 with the lanes pre-filter on the AMX tile unit (simd_amx.cpp), where the
// CPU has AMX-BF16 and the kernel grants this process the tile state.
const SimdKernels& simd_amx();
bool amx_usable();

// The table in use (the best the CPU supports unless set_isa() lowered it).
const SimdKernels& simd();
// ISAs this CPU can run, best last: e.g. {"scalar", "avx2", "avx512", "avx512bf16", "amx"}.
std::vector<std::string> supported_isas();
// Force an ISA; throws std::invalid_argument if unknown or unsupported here.
void set_isa(const std::string& name);

}  // namespace recserve::cpu
