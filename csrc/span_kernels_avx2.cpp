// AVX2 variant of span_kernels.h (x86-64-v3 level). The standard headers are included
// before the target pragma so that only this file's own loops get AVX2 code.
#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx2,fma,bmi,bmi2,f16c")
#define DPS_ISA isa_avx2
#include "span_kernels.h"
#else
#include "span_args.h"
namespace dps::isa_avx2 {  // other architectures: never selected, forwards to portable code
void step_span(const StepSpan& a) { isa_default::step_span(a); }
void mix_weight_span(const MixSpan& a) { isa_default::mix_weight_span(a); }
void mix_grad_span(const MixSpan& a) { isa_default::mix_grad_span(a); }
}  // namespace dps::isa_avx2
#endif
