// dps_cpu::fused_step: one optimizer step for a list of tensors, each with its StepKind,
// in one pass over memory per element (see span_kernels.h for the traffic per kind).
//
// The tensors of a param group are cut into chunks of kChunk elements and all chunks of
// all tensors go to one at::parallel_for, so a model with hundreds of small tensors pays
// the thread fork/join once per step, not once per tensor (as torch's fused AdamW).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>

#include "mask_hash.h"
#include "ops.h"
#include "span_args.h"

namespace dps {

std::vector<float> column_keep_vector(int64_t key, int64_t keep_threshold, int64_t cols) {
  std::vector<float> keep(static_cast<size_t>(cols));
  for (int64_t c = 0; c < cols; ++c) {
    keep[c] = column_keep(static_cast<uint32_t>(key), keep_threshold, c) ? 1.0f : 0.0f;
  }
  return keep;
}

namespace {

constexpr int kScalarsPerTensor = 6;  // beta1, beta2, eps, decay, step_size, bias2_sqrt
// kFlagMaskBits: mask_bits[i] holds the packed Stage II subnetwork, read instead of GAM.
constexpr int64_t kFlagReset = 1, kFlagDecayAfter = 2, kFlagMaskBits = 4;

const char* kind_name(int64_t kind) {
  static const char* names[] = {"PLAIN", "DENSE_STAGE1", "DENSE_STAGE2", "MIX_STAGE1",
                                "MIX_STAGE2"};
  return kind >= 0 && kind <= 4 ? names[kind] : "?";
}

void check_cpu_contiguous(const at::Tensor& t, const char* what, size_t i) {
  TORCH_CHECK(t.defined(), "dps_cpu.fused_step: ", what, "[", i, "] is undefined");
  TORCH_CHECK(t.device().is_cpu(), "dps_cpu.fused_step: ", what, "[", i,
              "] must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.is_contiguous(), "dps_cpu.fused_step: ", what, "[", i,
              "] must be contiguous (it is updated in place), got strides ", t.strides(),
              " for shape ", t.sizes());
}

void check_fp32(const at::Tensor& t, const char* what, size_t i, int64_t numel) {
  check_cpu_contiguous(t, what, i);
  TORCH_CHECK(t.scalar_type() == at::kFloat, "dps_cpu.fused_step: ", what, "[", i,
              "] must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.numel() == numel, "dps_cpu.fused_step: ", what, "[", i, "] must have ",
              numel, " elements, got ", t.numel(), " (shape ", t.sizes(), ")");
}

}  // namespace

void fused_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                at::TensorList exp_avg_sqs, at::TensorList gams, at::TensorList fams,
                at::TensorList thresholds, at::TensorList column_factors,
                at::TensorList mask_bits, at::IntArrayRef kinds, at::IntArrayRef flags,
                at::IntArrayRef mix_keys,
                at::IntArrayRef keep_thresholds, at::IntArrayRef cols,
                at::ArrayRef<double> scalars, bool freeze) {
  const size_t n = params.size();
  const std::pair<const char*, size_t> lists[] = {
      {"grads", grads.size()},          {"exp_avgs", exp_avgs.size()},
      {"exp_avg_sqs", exp_avg_sqs.size()}, {"gams", gams.size()},
      {"fams", fams.size()},            {"thresholds", thresholds.size()},
      {"column_factors", column_factors.size()}, {"mask_bits", mask_bits.size()},
      {"kinds", kinds.size()},
      {"flags", flags.size()},          {"mix_keys", mix_keys.size()},
      {"keep_thresholds", keep_thresholds.size()}, {"cols", cols.size()}};
  for (const auto& [name, size] : lists) {
    TORCH_CHECK(size == n, "dps_cpu.fused_step: ", name, " has ", size,
                " entries but params has ", n);
  }
  TORCH_CHECK(scalars.size() == kScalarsPerTensor * n, "dps_cpu.fused_step: scalars must hold ",
              kScalarsPerTensor, " numbers per tensor (", kScalarsPerTensor * n,
              "), got ", scalars.size());

  std::vector<StepSpan> spans(n);
  std::vector<at::Tensor> contiguous_grads(n);
  std::vector<std::vector<float>> keeps(n);
  std::vector<int64_t> first_chunk(n + 1, 0);
  for (size_t i = 0; i < n; ++i) {
    const int64_t kind = kinds[i];
    TORCH_CHECK(kind >= KIND_PLAIN && kind <= KIND_MIX_STAGE2,
                "dps_cpu.fused_step: kinds[", i, "] must be a StepKind code in [0, 4], got ", kind);
    const at::Tensor& p = params[i];
    check_cpu_contiguous(p, "params", i);
    const auto dtype = p.scalar_type();
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "dps_cpu.fused_step: params[",
                i, "] must be float32 or bfloat16, got ", dtype);
    const int64_t numel = p.numel();
    const at::Tensor& g = grads[i];
    TORCH_CHECK(g.defined() && g.device().is_cpu(), "dps_cpu.fused_step: grads[", i,
                "] must be a CPU tensor");
    // fp32 gradients on bf16 parameters are accepted, as by the torch backend.
    TORCH_CHECK(g.scalar_type() == dtype || g.scalar_type() == at::kFloat,
                "dps_cpu.fused_step: grads[", i, "] must have the param's dtype ", dtype,
                " or float32, got ", g.scalar_type());
    TORCH_CHECK(g.sizes() == p.sizes(), "dps_cpu.fused_step: grads[", i, "] has shape ",
                g.sizes(), " but params[", i, "] has shape ", p.sizes());
    // Gradients are read only, so an odd layout costs a copy instead of an error.
    contiguous_grads[i] = g.contiguous();
    for (const auto& [t, what] : {std::pair<const at::Tensor&, const char*>{exp_avgs[i], "exp_avgs"},
                                  {exp_avg_sqs[i], "exp_avg_sqs"}}) {
      check_cpu_contiguous(t, what, i);
      // fp32 moments on bf16 parameters (DPSAdamW(fp32_moments=True)) are accepted.
      TORCH_CHECK(t.scalar_type() == dtype || t.scalar_type() == at::kFloat,
                  "dps_cpu.fused_step: ", what, "[", i, "] must have the param's dtype ",
                  dtype, " or float32, got ", t.scalar_type());
      TORCH_CHECK(t.scalar_type() == exp_avgs[i].scalar_type(), "dps_cpu.fused_step: ",
                  "exp_avgs[", i, "] and exp_avg_sqs[", i, "] must share one dtype");
      TORCH_CHECK(t.sizes() == p.sizes(), "dps_cpu.fused_step: ", what, "[", i,
                  "] has shape ", t.sizes(), " but params[", i, "] has shape ", p.sizes());
    }
    const bool reset = flags[i] & kFlagReset;
    const bool decay_after = flags[i] & kFlagDecayAfter;
    const bool mix = kind == KIND_MIX_STAGE1 || kind == KIND_MIX_STAGE2;
    const bool stage_two_mask = kind == KIND_DENSE_STAGE2 || (kind == KIND_MIX_STAGE2 && freeze);
    // The packed subnetwork replaces GAM (and the factor, the threshold) in Stage II.
    const bool uses_bits = stage_two_mask && (flags[i] & kFlagMaskBits);
    const bool uses_threshold = stage_two_mask && !uses_bits;
    const bool uses_gam =
        kind != KIND_PLAIN && !(kind == KIND_MIX_STAGE2 && !freeze) && !uses_bits;

    StepSpan& s = spans[i];
    s.kind = static_cast<int>(kind);
    s.bf16 = dtype == at::kBFloat16;
    s.freeze = freeze;
    s.reset = reset;
    s.grad_fp32 = s.bf16 && g.scalar_type() == at::kFloat;
    s.moments_fp32 = s.bf16 && exp_avgs[i].scalar_type() == at::kFloat;
    s.param = p.data_ptr();
    s.grad = contiguous_grads[i].data_ptr();
    s.exp_avg = exp_avgs[i].data_ptr();
    s.exp_avg_sq = exp_avg_sqs[i].data_ptr();
    s.gam = nullptr;
    s.column = nullptr;
    s.threshold = 0.0f;
    s.bits = nullptr;
    s.bit0 = 0;
    s.len = numel;
    if (flags[i] & kFlagMaskBits) {
      const uint32_t* bits = mask_bits_ptr(mask_bits[i], numel, "dps_cpu.fused_step",
                                           "mask_bits");
      if (uses_bits) s.bits = bits;
    }
    if (uses_gam) {
      check_fp32(gams[i], "gams", i, numel);
      s.gam = gams[i].data_ptr<float>();
    }
    if (uses_threshold) {
      const at::Tensor& thr = thresholds[i];
      TORCH_CHECK(thr.defined() && thr.device().is_cpu() && thr.scalar_type() == at::kFloat &&
                      thr.numel() == 1,
                  "dps_cpu.fused_step: thresholds[", i, "] must be a one-element float32 CPU "
                  "tensor for ", kind_name(kind), ", got ", thr.defined() ? thr.toString() : "undefined",
                  " with ", thr.defined() ? thr.numel() : 0, " elements");
      s.threshold = thr.item<float>();
    }
    if (mix) {
      TORCH_CHECK(cols[i] >= 1 && numel % cols[i] == 0, "dps_cpu.fused_step: cols[", i,
                  "] must be >= 1 and divide the ", numel, " elements of params[", i, "], got ",
                  cols[i]);
    }
    if (kind == KIND_MIX_STAGE1) {
      TORCH_CHECK(mix_keys[i] >= 0 && mix_keys[i] <= 0xFFFFFFFFLL, "dps_cpu.fused_step: ",
                  "mix_keys[", i, "] must be a uint32 hash prefix, got ", mix_keys[i]);
      TORCH_CHECK(keep_thresholds[i] >= 0 && keep_thresholds[i] <= (1LL << 24),
                  "dps_cpu.fused_step: keep_thresholds[", i, "] must be in [0, 2**24], got ",
                  keep_thresholds[i]);
      check_fp32(fams[i], "fams", i, cols[i]);
      keeps[i] = column_keep_vector(mix_keys[i], keep_thresholds[i], cols[i]);
      // Without freeze the keep-mask only feeds FAM; the elements need no column walk.
      if (freeze) s.column = keeps[i].data();
    }
    if (kind == KIND_MIX_STAGE2 && freeze && !uses_bits) {
      check_fp32(column_factors[i], "column_factors", i, cols[i]);
      s.column = column_factors[i].data_ptr<float>();
    }
    const double* sc = scalars.data() + kScalarsPerTensor * i;
    const double beta1 = sc[0], beta2 = sc[1], eps = sc[2], decay = sc[3];
    // Each scalar is rounded to fp32 once, from the same double the reference hands torch.
    s.s.beta1 = static_cast<float>(beta1);
    s.s.one_minus_beta1 = static_cast<float>(1.0 - beta1);
    s.s.beta2 = static_cast<float>(beta2);
    s.s.one_minus_beta2 = static_cast<float>(1.0 - beta2);
    s.s.eps = static_cast<float>(eps);
    s.s.decay_pre = decay_after ? 1.0f : static_cast<float>(decay);
    s.s.decay_post = decay_after ? static_cast<float>(decay) : 1.0f;
    s.s.step_size = static_cast<float>(sc[4]);
    s.s.bias2_sqrt = static_cast<float>(sc[5]);
    first_chunk[i + 1] = first_chunk[i] + (numel + kChunk - 1) / kChunk;
  }

  // FAM counts each column once per step, so it is updated here, not per element.
  for (size_t i = 0; i < n; ++i) {
    if (kinds[i] != KIND_MIX_STAGE1) continue;
    float* fam = fams[i].data_ptr<float>();
    const bool reset = spans[i].reset;
    for (int64_t c = 0; c < cols[i]; ++c) fam[c] = (reset ? 0.0f : fam[c]) + keeps[i][c];
  }

  const SpanKernels& kernels = span_kernels();
  const int64_t total_chunks = first_chunk[n];
  at::parallel_for(0, total_chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    // Walk the tensors whose chunks fall in [chunk_begin, chunk_end).
    size_t i = std::upper_bound(first_chunk.begin(), first_chunk.end(), chunk_begin) -
               first_chunk.begin() - 1;
    for (int64_t c = chunk_begin; c < chunk_end; ++c) {
      while (c >= first_chunk[i + 1]) ++i;
      const StepSpan& base = spans[i];
      const int64_t begin = (c - first_chunk[i]) * kChunk;
      const int64_t end = std::min(begin + kChunk, base.len);
      const int64_t esize = base.bf16 ? 2 : 4;
      const int64_t gsize = base.bf16 && !base.grad_fp32 ? 2 : 4;
      const int64_t msize = base.bf16 && !base.moments_fp32 ? 2 : 4;
      auto run = [&](int64_t start, int64_t len, int64_t col0) {
        StepSpan s = base;
        s.param = static_cast<char*>(base.param) + start * esize;
        s.grad = static_cast<const char*>(base.grad) + start * gsize;
        s.exp_avg = static_cast<char*>(base.exp_avg) + start * msize;
        s.exp_avg_sq = static_cast<char*>(base.exp_avg_sq) + start * msize;
        if (base.gam) s.gam = base.gam + start;
        if (base.column) s.column = base.column + col0;
        s.bit0 = start;  // the bits are indexed by the tensor's flat element index
        s.len = len;
        kernels.step(s);
      };
      if (base.column != nullptr) {
        for_row_segments(begin, end, cols[i], run);
      } else {
        run(begin, end - begin, 0);
      }
    }
  });
}

}  // namespace dps
