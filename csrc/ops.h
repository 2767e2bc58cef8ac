// The torch-facing CPU ops of dps_kernels (registered in bindings.cpp as dps_cpu::*).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

namespace dps {

// Bumped whenever a schema in bindings.cpp changes; cpu_backend.py refuses a prebuilt
// library whose version differs (a stale in-place build) instead of crashing on it.
constexpr int64_t kAbiVersion = 2;

void fused_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                at::TensorList exp_avg_sqs, at::TensorList gams, at::TensorList fams,
                at::TensorList thresholds, at::TensorList column_factors,
                at::TensorList mask_bits, at::IntArrayRef kinds, at::IntArrayRef flags,
                at::IntArrayRef mix_keys,
                at::IntArrayRef keep_thresholds, at::IntArrayRef cols,
                at::ArrayRef<double> scalars, bool freeze);

at::Tensor select_threshold(const at::Tensor& gam, const std::optional<at::Tensor>& column_factor,
                            int64_t k, c10::string_view method);

at::Tensor mix_weight(const at::Tensor& weight, const at::Tensor& anchor, int64_t cols,
                      std::optional<int64_t> column_key, int64_t keep_threshold,
                      const std::optional<at::Tensor>& gam,
                      const std::optional<at::Tensor>& column_factor,
                      const std::optional<at::Tensor>& threshold, double p,
                      std::optional<at::ScalarType> out_dtype,
                      const std::optional<at::Tensor>& mask_bits);

at::Tensor mix_grad(const at::Tensor& grad, int64_t cols, std::optional<int64_t> column_key,
                    int64_t keep_threshold, const std::optional<at::Tensor>& gam,
                    const std::optional<at::Tensor>& column_factor,
                    const std::optional<at::Tensor>& threshold,
                    const std::optional<at::Tensor>& mask_bits);

// The Stage II subnetwork gam [* column_factor[col]] >= threshold packed into int32 words
// (dps_kernels/mask_bits.py: element i is bit i % 32 of word i / 32, tail bits zero).
at::Tensor pack_mask(const at::Tensor& gam, const std::optional<at::Tensor>& column_factor,
                     const at::Tensor& threshold);

// Checks that `bits` holds the packed mask of `n` elements (int32, ceil(n/32) words, CPU,
// contiguous) and returns its words.
const uint32_t* mask_bits_ptr(const at::Tensor& bits, int64_t n, const char* op,
                              const char* what);

// Elements per parallel work item: large enough that the per-item overhead vanishes
// against ~30 bytes of traffic per element, small enough that many small tensors and a
// few large ones spread evenly over the threads.
constexpr int64_t kChunk = 1 << 15;

// Calls f(start, len, col0) for the pieces of [begin, end) that lie in one row of a
// row-major [rows, cols] view, so column-indexed vectors stay contiguous in the kernels.
template <typename F>
inline void for_row_segments(int64_t begin, int64_t end, int64_t cols, const F& f) {
  int64_t i = begin;
  while (i < end) {
    const int64_t c = i % cols;
    const int64_t len = std::min(end - i, cols - c);
    f(i, len, c);
    i += len;
  }
}

// The Mix Stage I keep-mask over `cols` columns as 0/1 floats (the kernels multiply and
// select with it).
std::vector<float> column_keep_vector(int64_t key, int64_t keep_threshold, int64_t cols);

}  // namespace dps
