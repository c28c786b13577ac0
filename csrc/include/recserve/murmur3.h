// MurmurHash3_x86_32 (Austin Appleby's public-domain algorithm), shared by the
// CPU and CUDA kernels so both produce bit-identical bucket ids.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define RECSERVE_HD __host__ __device__ __forceinline__
#else
#define RECSERVE_HD inline
#endif

namespace recserve {

RECSERVE_HD uint32_t murmur3_rotl(uint32_t x, int r) { return (x << r) | (x >> (32 - r)); }

RECSERVE_HD uint32_t murmur3_fmix(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85ebca6bu;
  h ^= h >> 13;
  h *= 0xc2b2ae35u;
  h ^= h >> 16;
  return h;
}

// Blocks are read as little-endian 32-bit words one byte at a time: correct for
// any alignment and compiled to a single load on x86.
RECSERVE_HD uint32_t murmur3_load_u32(const uint8_t* p) {
  return uint32_t(p[0]) | (uint32_t(p[1]) << 8) | (uint32_t(p[2]) << 16) | (uint32_t(p[3]) << 24);
}

RECSERVE_HD uint32_t murmur3_32(const uint8_t* data, int64_t len, uint32_t seed) {
  const uint32_t c1 = 0xcc9e2d51u, c2 = 0x1b873593u;
  uint32_t h = seed;
  const int64_t nblocks = len / 4;
  for (int64_t i = 0; i < nblocks; ++i) {
    uint32_t k = murmur3_load_u32(data + 4 * i);
    k *= c1;
    k = murmur3_rotl(k, 15);
    k *= c2;
    h ^= k;
    h = murmur3_rotl(h, 13);
    h = h * 5 + 0xe6546b64u;
  }
  const uint8_t* tail = data + 4 * nblocks;
  uint32_t k = 0;
  switch (len & 3) {
    case 3: k ^= uint32_t(tail[2]) << 16; [[fallthrough]];
    case 2: k ^= uint32_t(tail[1]) << 8; [[fallthrough]];
    case 1:
      k ^= tail[0];
      k *= c1;
      k = murmur3_rotl(k, 15);
      k *= c2;
      h ^= k;
  }
  h ^= uint32_t(len);
  return murmur3_fmix(h);
}

// The bucket of a token: murmur3_32(token, seed) % num_buckets (num_buckets >= 1),
// the one definition used by every backend. The hash is < 2**32, so 32-bit
// unsigned math is exact whenever num_buckets fits in 32 bits (cheaper on GPUs).
RECSERVE_HD int64_t murmur3_bucket(const uint8_t* data, int64_t len, uint32_t seed,
                                   uint64_t num_buckets) {
  const uint32_t h = murmur3_32(data, len, seed);
  return num_buckets > 0xffffffffull ? int64_t(h) : int64_t(h % uint32_t(num_buckets));
}

}  // namespace recserve
