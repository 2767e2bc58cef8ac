// AVX-512 variant of span_kernels.h (x86-64-v4 level, 512-bit vectors preferred: the
// loops are long and the fp32 divide and square root dominate the arithmetic).
#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,bmi,bmi2,f16c,prefer-vector-width=512")
#define DPS_ISA isa_avx512
#include "span_kernels.h"
#else
#include "span_args.h"
namespace dps::isa_avx512 {
void step_span(const StepSpan& a) { isa_default::step_span(a); }
void mix_weight_span(const MixSpan& a) { isa_default::mix_weight_span(a); }
void mix_grad_span(const MixSpan& a) { isa_default::mix_grad_span(a); }
}  // namespace dps::isa_avx512
#endif
