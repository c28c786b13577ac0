// Feature hashing on the CPU: murmur3_32(token, seed) % num_buckets per token,
// for every token layout the bindings accept.
#include <vector>

#include "cpu/parallel.h"
#include "recserve/checks.h"
#include "recserve/murmur3.h"
#include "recserve/ops.h"

namespace recserve::cpu {
namespace {

constexpr const char* kOp = "hash_features";
constexpr int64_t kMinTokensPerThread = 1 << 14;

// Encodes UCS-4 code points as UTF-8; returns the byte length, or -1 for a
// surrogate / out-of-range code point (which Python itself refuses to encode).
int64_t ucs4_to_utf8(const uint32_t* cps, int64_t n, uint8_t* out) {
  int64_t o = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t c = cps[i];
    if (c < 0x80) {
      out[o++] = uint8_t(c);
    } else if (c < 0x800) {
      out[o++] = uint8_t(0xc0 | (c >> 6));
      out[o++] = uint8_t(0x80 | (c & 0x3f));
    } else if (c < 0x10000) {
      if (c >= 0xd800 && c <= 0xdfff) return -1;
      out[o++] = uint8_t(0xe0 | (c >> 12));
      out[o++] = uint8_t(0x80 | ((c >> 6) & 0x3f));
      out[o++] = uint8_t(0x80 | (c & 0x3f));
    } else if (c <= 0x10ffff) {
      out[o++] = uint8_t(0xf0 | (c >> 18));
      out[o++] = uint8_t(0x80 | ((c >> 12) & 0x3f));
      out[o++] = uint8_t(0x80 | ((c >> 6) & 0x3f));
      out[o++] = uint8_t(0x80 | (c & 0x3f));
    } else {
      return -1;
    }
  }
  return o;
}

}  // namespace

void hash_flat(const TensorView& data, const TensorView& offsets, uint32_t seed,
               int64_t num_buckets, const TensorView& out) {
  const int64_t n = offsets.shape[0] - 1;
  const int64_t* off = offsets.ptr<int64_t>();
  check_offsets_values(kOp, "tokens offsets", off, n + 1, data.shape[0], "len(tokens data)");
  const uint8_t* bytes = data.ptr<uint8_t>();
  int64_t* o = out.ptr<int64_t>();
#pragma omp parallel for num_threads(threads_for(n, kMinTokensPerThread)) schedule(static)
  for (int64_t i = 0; i < n; ++i)
    o[i] = murmur3_bucket(bytes + off[i], off[i + 1] - off[i], seed, uint64_t(num_buckets));
}

void hash_ucs4(const uint32_t* data, int64_t n, int64_t width, uint32_t seed,
               int64_t num_buckets, int64_t* out) {
  FirstError bad;
#pragma omp parallel num_threads(threads_for(n, kMinTokensPerThread))
  {
    std::vector<uint8_t> buf(size_t(4 * width + 1));
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t* cps = data + i * width;
      int64_t len = width;
      while (len > 0 && cps[len - 1] == 0) --len;  // NumPy pads with NULs
      const int64_t nbytes = ucs4_to_utf8(cps, len, buf.data());
      if (nbytes < 0) {
        bad.record(i);
        continue;
      }
      out[i] = murmur3_bucket(buf.data(), nbytes, seed, uint64_t(num_buckets));
    }
  }
  if (bad.any())
    arg_error(kOp, "tokens[", bad.get(), "] contains a code point that is not valid Unicode "
              "(a surrogate?); it cannot be encoded as UTF-8");
}

void hash_fixed_bytes(const uint8_t* data, int64_t n, int64_t width, uint32_t seed,
                      int64_t num_buckets, int64_t* out) {
#pragma omp parallel for num_threads(threads_for(n, kMinTokensPerThread)) schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t* s = data + i * width;
    int64_t len = width;
    while (len > 0 && s[len - 1] == 0) --len;
    out[i] = murmur3_bucket(s, len, seed, uint64_t(num_buckets));
  }
}

}  // namespace recserve::cpu
