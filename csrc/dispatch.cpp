// Runtime choice of the span-kernel variant: the widest instruction set this CPU has.
// DPS_CPU_ISA=default|avx2|avx512 in the environment, or dps_cpu::set_isa, overrides it
// (the test suite runs every variant the CPU supports; the benchmark compares them).
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "span_args.h"

namespace dps {
namespace {

const SpanKernels kDefault{"default", isa_default::step_span, isa_default::mix_weight_span,
                           isa_default::mix_grad_span};
const SpanKernels kAvx2{"avx2", isa_avx2::step_span, isa_avx2::mix_weight_span,
                        isa_avx2::mix_grad_span};
const SpanKernels kAvx512{"avx512", isa_avx512::step_span, isa_avx512::mix_weight_span,
                          isa_avx512::mix_grad_span};

bool cpu_has(const char* name) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (std::strcmp(name, "avx2") == 0) {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("bmi2");
  }
  if (std::strcmp(name, "avx512") == 0) {
    return cpu_has("avx2") && __builtin_cpu_supports("avx512f") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512dq");
  }
#endif
  return std::strcmp(name, "default") == 0;
}

const SpanKernels* by_name(const char* name) {
  if (name == nullptr || !cpu_has(name)) return nullptr;
  if (std::strcmp(name, "avx512") == 0) return &kAvx512;
  if (std::strcmp(name, "avx2") == 0) return &kAvx2;
  if (std::strcmp(name, "default") == 0) return &kDefault;
  return nullptr;
}

const SpanKernels* initial() {
  if (const SpanKernels* k = by_name(std::getenv("DPS_CPU_ISA"))) return k;
  return by_name(best_isa());
}

std::atomic<const SpanKernels*> g_current{nullptr};

}  // namespace

const char* best_isa() {
  if (cpu_has("avx512")) return "avx512";
  if (cpu_has("avx2")) return "avx2";
  return "default";
}

const SpanKernels& span_kernels() {
  const SpanKernels* k = g_current.load(std::memory_order_acquire);
  if (k == nullptr) {
    k = initial();
    g_current.store(k, std::memory_order_release);
  }
  return *k;
}

bool set_isa(const char* name) {
  const SpanKernels* k = by_name(name);
  if (k == nullptr) return false;
  g_current.store(k, std::memory_order_release);
  return true;
}

}  // namespace dps
