// Plain-data arguments of the span kernels (span_kernels.h), shared by the torch-facing
// op code and the per-instruction-set kernel files. No torch types here on purpose.
#pragma once

#include <cstdint>

namespace dps {

// Codes of base.StepKind, in the order cpu_backend.py sends them.
enum : int {
  KIND_PLAIN = 0,
  KIND_DENSE_STAGE1 = 1,
  KIND_DENSE_STAGE2 = 2,
  KIND_MIX_STAGE1 = 3,
  KIND_MIX_STAGE2 = 4,
};

// reference.AdamWScalars rounded to fp32 exactly as torch rounds a Python float that
// multiplies an fp32 tensor: each host double is cast once to float.
struct StepScalars {
  float beta1, one_minus_beta1, beta2, one_minus_beta2, eps;
  float decay_pre;   // torch style: decay; hf_legacy: 1
  float decay_post;  // torch style: 1; hf_legacy: decay
  float step_size, bias2_sqrt;
};

// One contiguous run of elements of one tensor, lying inside one row when `column` is
// used (column[j] belongs to element j).
struct StepSpan {
  int kind;
  bool bf16, freeze, reset;
  bool grad_fp32;     // fp32 gradient on a bf16 parameter
  bool moments_fp32;  // fp32 exp_avg / exp_avg_sq on a bf16 parameter
  void* param;
  const void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  float* gam;
  const float* column;  // Mix Stage I keep (0/1), Mix Stage II score factor
  float threshold;
  // The packed Stage II subnetwork (dps_kernels/mask_bits.py: element i is bit i % 32 of
  // word i / 32) or nullptr. Indexed by the tensor's flat element index: element j of
  // this span is element bit0 + j of the tensor, so spans may start anywhere.
  const uint32_t* bits;
  int64_t bit0;
  int64_t len;
  StepScalars s;
};

struct MixSpan {
  bool bf16, out_bf16, stage_two;
  bool anchor_fp32;    // fp32 anchor on a bf16 weight (Mix W' held in the fp32 GAM buffer)
  const void* weight;  // the weight (mix_weight) or the gradient (mix_grad)
  const void* anchor;
  void* out;
  const float* gam;
  const float* column;  // Stage I keep (0/1), Stage II score factor
  const uint32_t* bits;  // Stage II packed subnetwork (see StepSpan), or nullptr
  int64_t bit0;          // flat index of this span's first element in the tensor
  float threshold, p, one_minus_p;
  int64_t len;
};

// The instruction-set variants, widest last. dispatch.cpp chooses one at first use.
namespace isa_default {
void step_span(const StepSpan&);
void mix_weight_span(const MixSpan&);
void mix_grad_span(const MixSpan&);
}  // namespace isa_default
namespace isa_avx2 {
void step_span(const StepSpan&);
void mix_weight_span(const MixSpan&);
void mix_grad_span(const MixSpan&);
}  // namespace isa_avx2
namespace isa_avx512 {
void step_span(const StepSpan&);
void mix_weight_span(const MixSpan&);
void mix_grad_span(const MixSpan&);
}  // namespace isa_avx512

struct SpanKernels {
  const char* name;
  void (*step)(const StepSpan&);
  void (*mix_weight)(const MixSpan&);
  void (*mix_grad)(const MixSpan&);
};

// The kernels in use; `set_isa("avx2")` etc. switch (tests and benchmarks compare them).
const SpanKernels& span_kernels();
// Returns false if `name` is unknown or the CPU lacks it.
bool set_isa(const char* name);
const char* best_isa();

}  // namespace dps
