// Counter-based hash of the DPS Mix Stage I keep-masks: the C++ twin of
// dps_kernels/mask_hash.py, bit for bit (uint32 arithmetic wraps mod 2**32 exactly as
// the Python version masks with 0xFFFFFFFF).
//
//   h    = H(key ^ column),  keep = (h >> 8) < keep_threshold
//
// `key` is the per-(seed, parameter, step) prefix computed on the host by
// mask_hash.step_key, so kernels only evaluate one H per column.
#pragma once

#include <cstdint>

namespace dps {

inline uint32_t hash32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x21F0AAADu;
  x ^= x >> 15;
  x *= 0x735A2D97u;
  x ^= x >> 15;
  return x;
}

inline bool column_keep(uint32_t key, int64_t keep_threshold, int64_t column) {
  // Python XORs the int64 column index with the key; columns are < 2**32 for any
  // tensor that fits in memory, so truncating to uint32 changes nothing.
  const uint32_t h = hash32(key ^ static_cast<uint32_t>(column));
  return static_cast<int64_t>(h >> 8) < keep_threshold;
}

}  // namespace dps
