// dps_cpu::mix_weight and dps_cpu::mix_grad: the Mix forward weight and backward mask.
//
// The mask is never materialised: Stage I evaluates the column hash once per column into
// a small keep vector; Stage II evaluates GAM * factor[col] >= thr per element, or reads
// it from the packed subnetwork (mask_bits, 1 bit per element). Traffic: mix_weight reads
// W and A (+ GAM or the bits in Stage II) and writes the result; mix_grad reads the
// gradient (+ GAM or the bits) and writes the masked gradient.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include "ops.h"
#include "span_args.h"

namespace dps {
namespace {

struct MaskArgs {
  std::vector<float> keep;  // Stage I
  at::Tensor gam, factor;   // Stage II
  const uint32_t* bits = nullptr;  // Stage II, packed (then gam/factor/threshold unused)
  float threshold = 0.0f;
  bool stage_two = false;
};

MaskArgs mask_args(const char* op, const at::Tensor& like, int64_t cols,
                   std::optional<int64_t> column_key, int64_t keep_threshold,
                   const std::optional<at::Tensor>& gam,
                   const std::optional<at::Tensor>& column_factor,
                   const std::optional<at::Tensor>& threshold,
                   const std::optional<at::Tensor>& mask_bits) {
  const int64_t n = like.numel();
  TORCH_CHECK(cols >= 1 && n % cols == 0, op, ": cols must be >= 1 and divide the ", n,
              " elements, got ", cols);
  MaskArgs m;
  if (column_key.has_value()) {
    TORCH_CHECK(*column_key >= 0 && *column_key <= 0xFFFFFFFFLL, op,
                ": column_key must be a uint32 hash prefix, got ", *column_key);
    TORCH_CHECK(keep_threshold >= 0 && keep_threshold <= (1LL << 24), op,
                ": keep_threshold must be in [0, 2**24], got ", keep_threshold);
    m.keep = column_keep_vector(*column_key, keep_threshold, cols);
    return m;
  }
  if (mask_bits.has_value()) {
    m.bits = mask_bits_ptr(*mask_bits, n, op, "mask_bits");
    m.stage_two = true;
    return m;
  }
  TORCH_CHECK(gam.has_value() && column_factor.has_value() && threshold.has_value(), op,
              ": a Stage II mask needs gam, column_factor and threshold (or pass column_key ",
              "for a Stage I mask)");
  TORCH_CHECK(gam->device().is_cpu() && gam->scalar_type() == at::kFloat && gam->numel() == n, op,
              ": gam must be a float32 CPU tensor with ", n, " elements, got ", gam->toString(),
              " with ", gam->numel());
  TORCH_CHECK(column_factor->device().is_cpu() && column_factor->scalar_type() == at::kFloat &&
                  column_factor->numel() == cols,
              op, ": column_factor must be a float32 CPU tensor with cols=", cols,
              " elements, got ", column_factor->toString(), " with ", column_factor->numel());
  TORCH_CHECK(threshold->device().is_cpu() && threshold->scalar_type() == at::kFloat &&
                  threshold->numel() == 1,
              op, ": threshold must be a one-element float32 CPU tensor, got ",
              threshold->toString(), " with ", threshold->numel(), " elements");
  m.gam = gam->contiguous();
  m.factor = column_factor->contiguous();
  m.threshold = threshold->item<float>();
  m.stage_two = true;
  return m;
}

void check_value(const char* op, const char* what, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", what, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, op, ": ", what,
              " must be float32 or bfloat16, got ", t.scalar_type());
}

// Bytes per anchor element: the weight's, or 4 for an fp32 anchor on a bf16 weight.
int64_t anchor_size(const MixSpan& a, int64_t in_size) { return a.anchor_fp32 ? 4 : in_size; }

// Runs `kernel` over the elements in parallel, one call per row segment.
template <typename K>
void run_mix(const MaskArgs& m, MixSpan base, int64_t n, int64_t cols, int64_t in_size,
             int64_t out_size, const K& kernel) {
  base.stage_two = m.stage_two;
  base.threshold = m.threshold;
  base.bits = m.bits;
  if (m.bits != nullptr) {
    // The packed mask is indexed by the flat element index: no row segments needed.
    base.gam = nullptr;
    base.column = nullptr;
    at::parallel_for(0, n, kChunk, [&](int64_t begin, int64_t end) {
      MixSpan a = base;
      a.weight = static_cast<const char*>(base.weight) + begin * in_size;
      if (base.anchor) a.anchor = static_cast<const char*>(base.anchor) + begin * anchor_size(base, in_size);
      a.out = static_cast<char*>(base.out) + begin * out_size;
      a.bit0 = begin;
      a.len = end - begin;
      kernel(a);
    });
    return;
  }
  base.gam = m.stage_two ? m.gam.data_ptr<float>() : nullptr;
  base.column = m.stage_two ? m.factor.data_ptr<float>() : m.keep.data();
  at::parallel_for(0, n, kChunk, [&](int64_t begin, int64_t end) {
    for_row_segments(begin, end, cols, [&](int64_t s, int64_t len, int64_t c0) {
      MixSpan a = base;
      a.weight = static_cast<const char*>(base.weight) + s * in_size;
      if (base.anchor) a.anchor = static_cast<const char*>(base.anchor) + s * anchor_size(base, in_size);
      a.out = static_cast<char*>(base.out) + s * out_size;
      if (a.gam) a.gam = base.gam + s;
      a.column = base.column + c0;
      a.len = len;
      kernel(a);
    });
  });
}

}  // namespace

at::Tensor mix_weight(const at::Tensor& weight, const at::Tensor& anchor, int64_t cols,
                      std::optional<int64_t> column_key, int64_t keep_threshold,
                      const std::optional<at::Tensor>& gam,
                      const std::optional<at::Tensor>& column_factor,
                      const std::optional<at::Tensor>& threshold, double p,
                      std::optional<at::ScalarType> out_dtype,
                      const std::optional<at::Tensor>& mask_bits) {
  const char* op = "dps_cpu.mix_weight";
  check_value(op, "weight", weight);
  check_value(op, "anchor", anchor);
  // An fp32 anchor on a bf16 weight is accepted: DPSAdamW keeps Mix's Stage II anchor W' in
  // the fp32 GAM buffer, which Stage II does not need.
  TORCH_CHECK(anchor.scalar_type() == weight.scalar_type() || anchor.scalar_type() == at::kFloat,
              op, ": anchor must have the weight's dtype ", weight.scalar_type(),
              " or float32, got ", anchor.scalar_type());
  TORCH_CHECK(anchor.sizes() == weight.sizes(), op, ": anchor has shape ", anchor.sizes(),
              " but weight has shape ", weight.sizes());
  TORCH_CHECK(p >= 0.0 && p < 1.0, op, ": p must be in [0, 1), got ", p);
  const at::ScalarType odt = out_dtype.value_or(weight.scalar_type());
  TORCH_CHECK(odt == at::kFloat || odt == at::kBFloat16, op,
              ": out_dtype must be float32 or bfloat16, got ", odt);
  const MaskArgs m = mask_args(op, weight, cols, column_key, keep_threshold, gam, column_factor,
                               threshold, mask_bits);
  const at::Tensor w = weight.contiguous(), a = anchor.contiguous();
  at::Tensor out = at::empty(weight.sizes(), weight.options().dtype(odt));
  MixSpan base{};
  base.bf16 = weight.scalar_type() == at::kBFloat16;
  base.out_bf16 = odt == at::kBFloat16;
  base.anchor_fp32 = base.bf16 && anchor.scalar_type() == at::kFloat;
  base.weight = w.data_ptr();
  base.anchor = a.data_ptr();
  base.out = out.data_ptr();
  // Rounded once each from the host doubles, as torch rounds `p * a` and `/ (1.0 - p)`.
  base.p = static_cast<float>(p);
  base.one_minus_p = static_cast<float>(1.0 - p);
  const SpanKernels& k = span_kernels();
  run_mix(m, base, weight.numel(), cols, w.element_size(), out.element_size(), k.mix_weight);
  return out;
}

at::Tensor mix_grad(const at::Tensor& grad, int64_t cols, std::optional<int64_t> column_key,
                    int64_t keep_threshold, const std::optional<at::Tensor>& gam,
                    const std::optional<at::Tensor>& column_factor,
                    const std::optional<at::Tensor>& threshold,
                    const std::optional<at::Tensor>& mask_bits) {
  const char* op = "dps_cpu.mix_grad";
  check_value(op, "grad", grad);
  const MaskArgs m = mask_args(op, grad, cols, column_key, keep_threshold, gam, column_factor,
                               threshold, mask_bits);
  const at::Tensor g = grad.contiguous();
  at::Tensor out = at::empty(grad.sizes(), g.options());
  MixSpan base{};
  base.bf16 = grad.scalar_type() == at::kBFloat16;
  base.weight = g.data_ptr();
  base.anchor = nullptr;
  base.out = out.data_ptr();
  const SpanKernels& k = span_kernels();
  run_mix(m, base, grad.numel(), cols, g.element_size(), g.element_size(), k.mix_grad);
  return out;
}

}  // namespace dps
