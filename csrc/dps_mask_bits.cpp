// dps_cpu::pack_mask: the Stage II subnetwork packed into bits, once per selection.
//
// Layout (dps_kernels/mask_bits.py, the same on every backend): int32 words, element i
// (flat, row-major) is bit i % 32 (LSB first) of word i / 32, tail bits past n are zero.
// Score: gam (Dense) or gam * factor[col] (Mix, one fp32 multiply as reference.mix_score),
// kept where score >= threshold (ties kept). Parallel over words; reads 4 B and writes
// 1/8 B per element (+ the per-column factor for Mix). Runs once per selection; the bit
// loops are scalar (measured: 2.7 ms for 4M elements on 2 threads, below the selection's
// 7 ms; fixed 32-lane or-reductions were no faster with the baseline SSE2 flags).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include "ops.h"

namespace dps {

const uint32_t* mask_bits_ptr(const at::Tensor& bits, int64_t n, const char* op,
                              const char* what) {
  const int64_t words = (n + 31) / 32;
  TORCH_CHECK(bits.defined() && bits.device().is_cpu() && bits.scalar_type() == at::kInt &&
                  bits.is_contiguous() && bits.numel() == words,
              op, ": ", what, " must be a contiguous int32 CPU tensor of ceil(", n,
              "/32) = ", words, " words, got ",
              bits.defined() ? bits.toString() : std::string("undefined"), " with ",
              bits.defined() ? bits.numel() : 0, " elements");
  return reinterpret_cast<const uint32_t*>(bits.data_ptr<int32_t>());
}

at::Tensor pack_mask(const at::Tensor& gam, const std::optional<at::Tensor>& column_factor,
                     const at::Tensor& threshold) {
  const char* op = "dps_cpu.pack_mask";
  TORCH_CHECK(gam.device().is_cpu() && gam.scalar_type() == at::kFloat, op,
              ": gam must be a float32 CPU tensor, got ", gam.toString());
  TORCH_CHECK(threshold.device().is_cpu() && threshold.scalar_type() == at::kFloat &&
                  threshold.numel() == 1,
              op, ": threshold must be a one-element float32 CPU tensor, got ",
              threshold.toString(), " with ", threshold.numel(), " elements");
  const int64_t n = gam.numel();
  const at::Tensor g = gam.contiguous();
  at::Tensor factor;
  int64_t cols = 1;
  if (column_factor.has_value()) {
    cols = column_factor->numel();
    TORCH_CHECK(column_factor->device().is_cpu() && column_factor->scalar_type() == at::kFloat &&
                    cols >= 1 && n % cols == 0,
                op, ": column_factor must be a float32 CPU tensor whose length divides the ",
                n, " elements of gam, got ", column_factor->toString(), " with ", cols);
    factor = column_factor->contiguous();
  }
  const int64_t words = (n + 31) / 32;
  at::Tensor out = at::empty({words}, gam.options().dtype(at::kInt));
  if (n == 0) return out;
  const float thr = threshold.item<float>();
  const float* gp = g.data_ptr<float>();
  const float* fp = factor.defined() ? factor.data_ptr<float>() : nullptr;
  uint32_t* op_words = reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>());
  at::parallel_for(0, words, kChunk / 32, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const int64_t i0 = w * 32;
      const int64_t len = std::min<int64_t>(32, n - i0);
      uint32_t word = 0;
      if (fp == nullptr) {
        for (int64_t b = 0; b < len; ++b) {
          word |= static_cast<uint32_t>(gp[i0 + b] >= thr) << b;
        }
      } else {
        int64_t c = i0 % cols;
        for (int64_t b = 0; b < len; ++b) {
          const float score = gp[i0 + b] * fp[c];  // one fp32 multiply, as mix_score
          word |= static_cast<uint32_t>(score >= thr) << b;
          if (++c == cols) c = 0;
        }
      }
      op_words[w] = word;  // bits past n stay zero
    }
  });
  return out;
}

}  // namespace dps
