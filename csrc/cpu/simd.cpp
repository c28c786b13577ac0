#include "cpu/simd.h"

#include <atomic>
#include <stdexcept>

namespace recserve::cpu {
namespace {

bool cpu_has_avx2() {
#if defined(__x86_64__) || defined(__i386__)
  // __builtin_cpu_supports also checks that the OS saves the YMM/ZMM state.
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if defined(__x86_64__) || defined(__i386__)
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
#else
  return false;
#endif
}

bool cpu_has_avx512bf16() {
#if defined(__x86_64__) || defined(__i386__)
  return cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

const SimdKernels* best() {
  if (amx_usable()) return &simd_amx();
  if (cpu_has_avx512bf16()) return &simd_avx512bf16();
  if (cpu_has_avx512()) return &simd_avx512();
  if (cpu_has_avx2()) return &simd_avx2();
  return &simd_scalar();
}

std::atomic<const SimdKernels*> g_active{nullptr};

}  // namespace

const SimdKernels& simd() {
  const SimdKernels* k = g_active.load(std::memory_order_acquire);
  if (k == nullptr) {
    k = best();
    g_active.store(k, std::memory_order_release);
  }
  return *k;
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> out{"scalar"};
  if (cpu_has_avx2()) out.push_back("avx2");
  if (cpu_has_avx512()) out.push_back("avx512");
  if (cpu_has_avx512bf16()) out.push_back("avx512bf16");
  if (amx_usable()) out.push_back("amx");
  return out;
}

void set_isa(const std::string& name) {
  const SimdKernels* k = nullptr;
  if (name == "scalar") k = &simd_scalar();
  else if (name == "avx2" && cpu_has_avx2()) k = &simd_avx2();
  else if (name == "avx512" && cpu_has_avx512()) k = &simd_avx512();
  else if (name == "avx512bf16" && cpu_has_avx512bf16()) k = &simd_avx512bf16();
  else if (name == "amx" && amx_usable()) k = &simd_amx();
  else if (name == "best") k = best();
  if (k == nullptr)
    throw std::invalid_argument("set_isa: '" + name + "' is not supported on this CPU (supported: " +
                                [] {
                                  std::string s;
                                  for (const auto& i : supported_isas()) s += (s.empty() ? "" : ", ") + i;
                                  return s;
                                }() + ", best)");
  g_active.store(k, std::memory_order_release);
}

}  // namespace recserve::cpu
