// dps_cpu::select_threshold: the exact k-th largest selection score of one tensor.
//
// score = GAM (Dense) or GAM * factor[col] (Mix, one fp32 multiply, as
// reference.mix_score). Two methods, chosen by the `method` argument:
//
// * "radix" (default): the scores are mapped to uint32 keys whose unsigned order is the
//   float order (NaN above +inf as in torch.kthvalue, -0 == +0); a parallel histogram of
//   the top 16 key bits finds the bin of the k-th largest, a second parallel pass gathers
//   that bin's keys, and nth_element finishes on them. The Mix score is never
//   materialised. (A first version with three 11/11/10-bit histogram passes lost to
//   nth_element: most GAM values share few top-11-bit bins, so the counter increments
//   formed long dependency chains. bench/cpu_step.py measures both.)
// * "nth_element": a copy of the keys and std::nth_element, single-threaded; kept as
//   the simple baseline the radix select was measured against (bench/cpu_step.py).
//
// Both return exactly the value torch.kthvalue(score, n - k + 1) returns.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cstring>
#include <functional>
#include <limits>

#include "ops.h"

namespace dps {
namespace {

inline uint32_t order_key(float f) {
  if (f != f) return 0xFFFFFFFFu;  // every NaN ranks above +inf, as in torch.kthvalue
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if (f == 0.0f) u = 0;  // -0 and +0 are the same value
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

inline float key_value(uint32_t k) {
  if (k == 0xFFFFFFFFu) return std::numeric_limits<float>::quiet_NaN();
  const uint32_t u = (k & 0x80000000u) ? (k & 0x7FFFFFFFu) : ~k;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Calls f(start, len, factor_or_null) over [begin, end), split at row ends for Mix.
template <typename F>
inline void for_scores(int64_t begin, int64_t end, const float* factor, int64_t cols, const F& f) {
  if (factor == nullptr) {
    f(begin, end - begin, static_cast<const float*>(nullptr));
  } else {
    for_row_segments(begin, end, cols, [&](int64_t s, int64_t len, int64_t c0) {
      f(s, len, factor + c0);
    });
  }
}

uint32_t radix_select(const float* gam, const float* factor, int64_t cols, int64_t n, int64_t k) {
  // Pass 1: histogram of the top 16 key bits (sign, exponent, 7 mantissa bits), one per
  // thread. Pass 2: gather the keys of the bin that holds the k-th largest (typically a
  // tiny fraction of n; all of n only when most scores tie) and finish with
  // std::nth_element on them. Two reads of the scores in all, both parallel.
  constexpr int kShift = 16;
  constexpr int64_t kBins = int64_t{1} << (32 - kShift);
  const int nthreads = at::get_num_threads();
  std::vector<int64_t> hist(static_cast<size_t>(nthreads) * kBins, 0);
  at::parallel_for(0, n, kChunk, [&](int64_t begin, int64_t end) {
    int64_t* h = hist.data() + static_cast<size_t>(at::get_thread_num()) * kBins;
    for_scores(begin, end, factor, cols, [&](int64_t s, int64_t len, const float* fc) {
      const float* g = gam + s;
      if (fc) {
        for (int64_t j = 0; j < len; ++j) ++h[order_key(g[j] * fc[j]) >> kShift];
      } else {
        for (int64_t j = 0; j < len; ++j) ++h[order_key(g[j]) >> kShift];
      }
    });
  });
  // Walk down from the largest bin until k keys are covered.
  int64_t above = 0, bin = kBins, in_bin = 0;
  while (bin > 0) {
    --bin;
    in_bin = 0;
    for (int t = 0; t < nthreads; ++t) in_bin += hist[static_cast<size_t>(t) * kBins + bin];
    if (above + in_bin >= k) break;
    above += in_bin;
  }
  const uint32_t wanted = static_cast<uint32_t>(bin);
  std::vector<std::vector<uint32_t>> found(static_cast<size_t>(nthreads));
  at::parallel_for(0, n, kChunk, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t>& out = found[static_cast<size_t>(at::get_thread_num())];
    for_scores(begin, end, factor, cols, [&](int64_t s, int64_t len, const float* fc) {
      const float* g = gam + s;
      for (int64_t j = 0; j < len; ++j) {
        const uint32_t key = order_key(fc ? g[j] * fc[j] : g[j]);
        if ((key >> kShift) == wanted) out.push_back(key);
      }
    });
  });
  std::vector<uint32_t> keys;
  keys.reserve(static_cast<size_t>(in_bin));
  for (const auto& f : found) keys.insert(keys.end(), f.begin(), f.end());
  TORCH_CHECK(static_cast<int64_t>(keys.size()) == in_bin,
              "dps_cpu.select_threshold: internal error, the scores changed during selection");
  const int64_t rank = k - above;  // 1-based rank of the wanted key inside the bin
  std::nth_element(keys.begin(), keys.begin() + (rank - 1), keys.end(), std::greater<uint32_t>());
  return keys[rank - 1];
}

uint32_t nth_element_select(const float* gam, const float* factor, int64_t cols, int64_t n,
                            int64_t k) {
  std::vector<uint32_t> keys(static_cast<size_t>(n));
  for_scores(0, n, factor, cols, [&](int64_t s, int64_t len, const float* fc) {
    for (int64_t j = 0; j < len; ++j) keys[s + j] = order_key(fc ? gam[s + j] * fc[j] : gam[s + j]);
  });
  std::nth_element(keys.begin(), keys.begin() + (k - 1), keys.end(), std::greater<uint32_t>());
  return keys[k - 1];
}

}  // namespace

at::Tensor select_threshold(const at::Tensor& gam, const std::optional<at::Tensor>& column_factor,
                            int64_t k, c10::string_view method) {
  TORCH_CHECK(gam.device().is_cpu(), "dps_cpu.select_threshold: gam must be a CPU tensor, got ",
              gam.device());
  TORCH_CHECK(gam.scalar_type() == at::kFloat, "dps_cpu.select_threshold: gam must be float32, got ",
              gam.scalar_type());
  const int64_t n = gam.numel();
  TORCH_CHECK(k >= 1 && k <= n, "dps_cpu.select_threshold: k must be in [1, ", n,
              "] (the number of elements of gam), got ", k);
  const at::Tensor g = gam.contiguous();
  at::Tensor f;
  int64_t cols = 1;
  if (column_factor.has_value() && column_factor->defined()) {
    const at::Tensor& cf = *column_factor;
    TORCH_CHECK(cf.device().is_cpu() && cf.scalar_type() == at::kFloat && cf.dim() == 1,
                "dps_cpu.select_threshold: column_factor must be a 1-d float32 CPU tensor, got ",
                cf.toString(), " of shape ", cf.sizes());
    cols = cf.numel();
    TORCH_CHECK(cols >= 1 && n % cols == 0, "dps_cpu.select_threshold: column_factor has ", cols,
                " entries, which does not divide the ", n, " elements of gam");
    f = cf.contiguous();
  }
  const float* factor = f.defined() ? f.data_ptr<float>() : nullptr;
  uint32_t key;
  if (method == "radix") {
    key = radix_select(g.data_ptr<float>(), factor, cols, n, k);
  } else if (method == "nth_element") {
    key = nth_element_select(g.data_ptr<float>(), factor, cols, n, k);
  } else {
    TORCH_CHECK(false, "dps_cpu.select_threshold: method must be 'radix' or 'nth_element', got '",
                std::string(method), "'");
  }
  at::Tensor out = at::empty({}, gam.options());
  out.data_ptr<float>()[0] = key_value(key);
  return out;
}

}  // namespace dps
