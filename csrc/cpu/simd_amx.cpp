// AMX (AMX-TILE + AMX-BF16) form of the bfloat16 lanes pre-filter for batched top-k.
//
// The same filter as simd_avx512.cpp's prefilter_lanes_bf16 (same inputs, same rows
// passed up to the accumulation order, which the error bound in topk_cpu.cpp already
// covers: each pair's products are exact in float32 and every add rounds to nearest, as
// with VDPBF16PS), at the tile unit's multiply rate: one TDPBF16PS scores 16 items x 16
// queries x 32 dimensions. The operands need no repacking: the prepared item rows
// ([n][dp] bfloat16 pairs) are the A tiles, row stride dp words, and the transposed query
// block qt2 ([dp][w] pairs) is the B tiles, row stride w words. Shapes the tiles do not
// fit (dp not a multiple of 16, the last rows of a matrix) go through the AVX-512 kernel.
//
// Linux hands out the tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM); the
// ISA is offered only where that request succeeds. Each call loads its tile configuration
// and releases the tiles at the end: other libraries in the process (oneDNN, MLAS) use
// AMX with their own configurations, and a released state keeps context switches cheap.
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>

#include "cpu/simd.h"

namespace recserve::cpu {

#if defined(__x86_64__)
#define RS_AMX __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma,f16c,amx-tile,amx-bf16")))
namespace {

constexpr int64_t kTileRows = 16;   // items (A, C) or pairs (B) per tile
constexpr int64_t kTilePairs = 16;  // bfloat16 pairs per A row: 64 bytes
constexpr int64_t kBlockRows = 32;  // items per block: two A tiles

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Every tile used is 16 rows x 64 bytes: C tiles 0-3 (16 items x 16 float scores), A
// tiles 4-5 (16 items x 16 pairs), B tiles 6-7 (16 pairs x 16 queries).
RS_AMX void load_tile_config() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.colsb[t] = 64;
    config.rows[t] = kTileRows;
  }
  _tile_loadconfig(&config);
}

// Flags rows i0..i0+31 where some lane of the Groups lane groups from l0 (16 lanes each)
// beats thr_lo. `scores` holds the 32 x 32 block.
template <int Groups>
RS_AMX inline void flag_block(const float* scores, const float* thr_lo, int64_t l0, int64_t i0, int32_t* flags) {
  const __m512 t0 = _mm512_loadu_ps(thr_lo + l0);
  const __m512 t1 = Groups == 2 ? _mm512_loadu_ps(thr_lo + l0 + 16) : t0;
  for (int64_t r = 0; r < kBlockRows; ++r) {
    const float* row = scores + r * 32;
    __mmask16 m = _mm512_cmp_ps_mask(_mm512_loadu_ps(row), t0, _CMP_GT_OQ);
    if constexpr (Groups == 2) m |= _mm512_cmp_ps_mask(_mm512_loadu_ps(row + 16), t1, _CMP_GT_OQ);
    if (m) flags[i0 + r] = 1;
  }
}

// 32 items x 16 * Groups queries (Groups: 2, or 1 for the last of an odd number of lane
// groups) into `scores` (row stride 32 floats): C tiles 0 and 2 hold the first group's
// scores of the two A tiles, 1 and 3 the second's; summed over dp in 16-pair chunks.
template <int Groups>
RS_AMX inline void score_block(const uint32_t* qt2, int64_t w, int64_t l0, const uint32_t* xb, int64_t dp,
                               int64_t i0, float* scores) {
  static_assert(Groups == 1 || Groups == 2);
  _tile_zero(0);
  _tile_zero(2);
  if constexpr (Groups == 2) {
    _tile_zero(1);
    _tile_zero(3);
  }
  const uint32_t* a = xb + i0 * dp;
  for (int64_t c = 0; c < dp; c += kTilePairs) {
    _tile_loadd(4, a + c, dp * 4);
    _tile_loadd(5, a + kTileRows * dp + c, dp * 4);
    _tile_loadd(6, qt2 + c * w + l0, w * 4);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(2, 5, 6);
    if constexpr (Groups == 2) {
      _tile_loadd(7, qt2 + c * w + l0 + 16, w * 4);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, scores, 128);
  _tile_stored(2, scores + 16 * 32, 128);
  if constexpr (Groups == 2) {
    _tile_stored(1, scores + 16, 128);
    _tile_stored(3, scores + 16 * 32 + 16, 128);
  }
}

RS_AMX int64_t prefilter_lanes_amx(const uint32_t* qt2, int64_t w, const float* thr_lo, const uint32_t* xb,
                                   int64_t n, int64_t dp, int32_t* hits) {
  const auto& avx512 = simd_avx512bf16();
  if (dp % kTilePairs != 0) return avx512.prefilter_lanes_bf16(qt2, w, thr_lo, xb, n, dp, hits);
  const int64_t blocked = n / kBlockRows * kBlockRows;
  for (int64_t i = 0; i < blocked; ++i) hits[i] = 0;
  if (blocked > 0) {
    alignas(64) float scores[kBlockRows * 32];
    load_tile_config();
    for (int64_t i0 = 0; i0 < blocked; i0 += kBlockRows) {
      int64_t l0 = 0;
      for (; l0 + 32 <= w; l0 += 32) {
        score_block<2>(qt2, w, l0, xb, dp, i0, scores);
        flag_block<2>(scores, thr_lo, l0, i0, hits);
      }
      if (l0 < w) {
        score_block<1>(qt2, w, l0, xb, dp, i0, scores);
        flag_block<1>(scores, thr_lo, l0, i0, hits);
      }
    }
    _tile_release();
  }
  int64_t nh = 0;
  for (int64_t i = 0; i < blocked; ++i)
    if (hits[i]) hits[nh++] = int32_t(i);
  if (blocked < n) {  // the last rows of the matrix: fewer than a block
    const int64_t tail = avx512.prefilter_lanes_bf16(qt2, w, thr_lo, xb + blocked * dp, n - blocked, dp, hits + nh);
    for (int64_t h = nh; h < nh + tail; ++h) hits[h] += int32_t(blocked);
    nh += tail;
  }
  return nh;
}

}  // namespace

bool amx_usable() {
  static const bool usable = [] {
    if (!__builtin_cpu_supports("avx512bf16") || !__builtin_cpu_supports("amx-tile") ||
        !__builtin_cpu_supports("amx-bf16"))
      return false;
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;  // <asm/prctl.h>, the tile data state
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return usable;
}

const SimdKernels& simd_amx() {
  static const SimdKernels k = [] {
    SimdKernels t = simd_avx512bf16();
    t.name = "amx";
    t.prefilter_lanes_bf16 = prefilter_lanes_amx;
    return t;
  }();
  return k;
}
#else
bool amx_usable() { return false; }
const SimdKernels& simd_amx() { return simd_scalar(); }
#endif

}  // namespace recserve::cpu
