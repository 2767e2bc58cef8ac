// Element-wise span kernels of the fused DPS step, Mix weight and Mix gradient mask.
//
// This header holds plain C++ loops and nothing from torch: it is compiled once per
// instruction set (span_kernels_{default,avx2,avx512}.cpp set `#pragma GCC target`
// before including it), and torch headers must never be compiled under such a pragma
// (their inline functions would be emitted with AVX-512 code and could be picked by the
// linker for the portable path). dispatch.cpp picks the widest variant the CPU supports.
//
// Every loop is branch-free in its body (selects, not ifs) so GCC's vectoriser turns it
// into SIMD code (checked with -fopt-info-vec: all loops, all variants); `-ffp-contract=off` keeps each fp32 operation rounded separately, in
// the same order as dps_kernels/reference.py, so results match the reference bit for bit.
//
// Memory traffic per element of the fused step (fp32 params; bf16 halves w, g, m, v, and
// fp32 moments on bf16 params keep m and v at 4 bytes):
//   PLAIN / MIX_STAGE2:       read w g m v, write w m v           = 28 bytes
//   DENSE_STAGE2:             + read GAM                          = 32 bytes
//   DENSE/MIX_STAGE1:         + read and write GAM                = 36 bytes (24 on reset)
//   MIX_STAGE2 with freeze:   + read GAM                          = 32 bytes
//   either, with mask bits:   + read 1 bit instead of GAM         = 28.125 bytes
//
// The packed Stage II subnetwork (StepSpan/MixSpan::bits, layout of
// dps_kernels/mask_bits.py) is expanded into 0/1 floats, kBitsBlock elements at a time, in
// a small stack buffer (L1), which the vectorised loops then read like a keep column; an
// element loop that extracted bits from memory itself stays scalar (a gather), 5x slower.
#ifndef DPS_ISA
#error "define DPS_ISA (the namespace of this instruction-set variant) before including"
#endif

#include <cmath>
#include <cstdint>
#include <cstring>

#include "span_args.h"

namespace dps {
namespace DPS_ISA {

// bf16 <-> fp32 with the bit tricks c10::BFloat16 uses (round to nearest even, NaN ->
// 0x7FC0), written on integers so the vectoriser handles them.
static inline float bf16_to_f32(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

static inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return f != f ? static_cast<uint16_t>(0x7FC0) : static_cast<uint16_t>(rounded);
}

template <typename T> struct Io;
template <> struct Io<float> {
  static inline float load(float x) { return x; }
  static inline float store(float x) { return x; }
};
template <> struct Io<uint16_t> {  // bf16 storage
  static inline float load(uint16_t x) { return bf16_to_f32(x); }
  static inline uint16_t store(float x) { return f32_to_bf16(x); }
};

// Elements per expansion of the packed mask (a 2 KB stack buffer of floats).
constexpr int64_t kBitsBlock = 512;

// out[j] = bit e0 + j of the packed mask as 0.0f / 1.0f, j < len (<= kBitsBlock). Whole
// words go through a 32-lane loop with a loop-invariant word (vectorised variable shifts).
static inline void expand_bits(const uint32_t* bits, int64_t e0, int64_t len, float* out) {
  int64_t j = 0;
  for (; j < len && ((e0 + j) & 31) != 0; ++j) {
    out[j] = static_cast<float>((bits[(e0 + j) >> 5] >> ((e0 + j) & 31)) & 1u);
  }
  for (; j + 32 <= len; j += 32) {
    const uint32_t word = bits[(e0 + j) >> 5];
    for (int b = 0; b < 32; ++b) out[j + b] = static_cast<float>((word >> b) & 1u);
  }
  for (; j < len; ++j) {
    out[j] = static_cast<float>((bits[(e0 + j) >> 5] >> ((e0 + j) & 31)) & 1u);
  }
}

// KIND values are the StepKind codes of span_args.h. FREEZE only matters for kinds
// with a mask; RESET only for the Stage I kinds. G is the gradient's storage (the
// param's, or fp32 gradients on bf16 parameters), M the moments' (the param's, or fp32).
// BITS (Stage II kinds with a mask): a.column holds the expanded mask bits (0/1 per
// element, see step_span_bits) and GAM is not read.
template <typename T, typename G, typename M, int KIND, bool FREEZE, bool RESET,
          bool BITS = false>
static void step_span_t(const StepSpan& a) {
  T* __restrict__ w = static_cast<T*>(a.param);
  const G* __restrict__ g = static_cast<const G*>(a.grad);
  M* __restrict__ m = static_cast<M*>(a.exp_avg);
  M* __restrict__ v = static_cast<M*>(a.exp_avg_sq);
  float* __restrict__ gam = a.gam;
  const float* __restrict__ col = a.column;  // keep (0/1) or score factor, from this column on
  const float thr = a.threshold;
  const StepScalars s = a.s;
  const int64_t n = a.len;
  // Iteration j touches element j only. Without this hint GCC 12 leaves the fp32 Mix
  // loops with freeze scalar ("no vectype for stmt"); without -fno-trapping-math it
  // leaves every masked loop scalar on AVX2 and SSE ("control flow in loop").
#pragma GCC ivdep
  for (int64_t j = 0; j < n; ++j) {
    float gj = Io<G>::load(g[j]);
    const float w0 = Io<T>::load(w[j]);
    const float m0 = Io<M>::load(m[j]);
    const float v0 = Io<M>::load(v[j]);
    if constexpr (KIND == KIND_DENSE_STAGE1 || KIND == KIND_MIX_STAGE1) {
      // reference: GAM.zero_() then GAM += g*g; 0 + g*g == g*g exactly (g*g is never -0)
      const float sq = gj * gj;
      gam[j] = RESET ? sq : gam[j] + sq;
    }
    bool sel = true;
    if constexpr (BITS) {
      sel = col[j] != 0.0f;
    } else {
      if constexpr (KIND == KIND_DENSE_STAGE2) sel = gam[j] >= thr;
      if constexpr (KIND == KIND_MIX_STAGE2 && FREEZE) sel = gam[j] * col[j] >= thr;
    }
    if constexpr (KIND == KIND_MIX_STAGE1 && FREEZE) sel = col[j] != 0.0f;
    // Dense gradient masking multiplies (as reference.mix_grad does) rather than selects,
    // so a NaN/inf gradient outside the mask propagates the same way.
    if constexpr (KIND == KIND_DENSE_STAGE2 && !FREEZE) gj = gj * (sel ? 1.0f : 0.0f);
    // Same operations in the same order as reference.adamw_update; decay_pre/decay_post
    // are 1.0 for the style that does not use them (a multiply by 1 is exact).
    const float wd = w0 * s.decay_pre;
    const float m1 = s.beta1 * m0 + s.one_minus_beta1 * gj;
    const float v1 = s.beta2 * v0 + (s.one_minus_beta2 * gj) * gj;
    const float denom = std::sqrt(v1) / s.bias2_sqrt + s.eps;
    float w1 = (wd - (s.step_size * m1) / denom) * s.decay_post;
    float m2 = m1, v2 = v1;
    if constexpr (FREEZE && KIND != KIND_PLAIN && KIND != KIND_DENSE_STAGE1) {
      w1 = sel ? w1 : w0;
      m2 = sel ? m1 : m0;
      v2 = sel ? v1 : v0;
    }
    w[j] = Io<T>::store(w1);
    m[j] = Io<M>::store(m2);
    v[j] = Io<M>::store(v2);
  }
}

// A Stage II step whose mask comes from the packed bits: kBitsBlock elements at a time,
// expand the bits of element a.bit0 + j0 on, then run the element loop over them.
template <typename T, typename G, typename M, int KIND, bool FREEZE>
static void step_span_bits(const StepSpan& a) {
  float keep[kBitsBlock];
  for (int64_t j0 = 0; j0 < a.len; j0 += kBitsBlock) {
    const int64_t len = a.len - j0 < kBitsBlock ? a.len - j0 : kBitsBlock;
    expand_bits(a.bits, a.bit0 + j0, len, keep);
    StepSpan s = a;
    s.param = static_cast<T*>(a.param) + j0;
    s.grad = static_cast<const G*>(a.grad) + j0;
    s.exp_avg = static_cast<M*>(a.exp_avg) + j0;
    s.exp_avg_sq = static_cast<M*>(a.exp_avg_sq) + j0;
    s.gam = nullptr;
    s.column = keep;
    s.len = len;
    step_span_t<T, G, M, KIND, FREEZE, false, true>(s);
  }
}

template <typename T, typename G, typename M>
static void step_span_dtype(const StepSpan& a) {
  // Kinds whose freeze/non-freeze loops coincide share one instantiation: Mix Stage I
  // without freeze is Dense Stage I, Mix Stage II without freeze is plain AdamW.
  switch (a.kind) {
    case KIND_PLAIN:
      return step_span_t<T, G, M, KIND_PLAIN, false, false>(a);
    case KIND_DENSE_STAGE1:
      return a.reset ? step_span_t<T, G, M, KIND_DENSE_STAGE1, false, true>(a)
                     : step_span_t<T, G, M, KIND_DENSE_STAGE1, false, false>(a);
    case KIND_DENSE_STAGE2:
      if (a.bits != nullptr) {
        return a.freeze ? step_span_bits<T, G, M, KIND_DENSE_STAGE2, true>(a)
                        : step_span_bits<T, G, M, KIND_DENSE_STAGE2, false>(a);
      }
      return a.freeze ? step_span_t<T, G, M, KIND_DENSE_STAGE2, true, false>(a)
                      : step_span_t<T, G, M, KIND_DENSE_STAGE2, false, false>(a);
    case KIND_MIX_STAGE1:
      if (!a.freeze) {
        return a.reset ? step_span_t<T, G, M, KIND_DENSE_STAGE1, false, true>(a)
                       : step_span_t<T, G, M, KIND_DENSE_STAGE1, false, false>(a);
      }
      return a.reset ? step_span_t<T, G, M, KIND_MIX_STAGE1, true, true>(a)
                     : step_span_t<T, G, M, KIND_MIX_STAGE1, true, false>(a);
    case KIND_MIX_STAGE2:
      if (a.freeze && a.bits != nullptr) {
        return step_span_bits<T, G, M, KIND_MIX_STAGE2, true>(a);
      }
      return a.freeze ? step_span_t<T, G, M, KIND_MIX_STAGE2, true, false>(a)
                      : step_span_t<T, G, M, KIND_PLAIN, false, false>(a);
  }
}

void step_span(const StepSpan& a) {
  if (!a.bf16) {
    step_span_dtype<float, float, float>(a);
  } else if (a.moments_fp32) {
    if (a.grad_fp32) {
      step_span_dtype<uint16_t, float, float>(a);
    } else {
      step_span_dtype<uint16_t, uint16_t, float>(a);
    }
  } else if (a.grad_fp32) {
    step_span_dtype<uint16_t, float, uint16_t>(a);
  } else {
    step_span_dtype<uint16_t, uint16_t, uint16_t>(a);
  }
}

// Mix weight (M*W + (1-M)*A - p*A) / (1-p), in the operation order of
// reference.mix_weight. STAGE_TWO: M = gam*factor >= thr; else M = keep[col] (0/1).
template <typename T, typename A, typename O, bool STAGE_TWO>
static void mix_weight_span_t(const MixSpan& a) {
  const T* __restrict__ w = static_cast<const T*>(a.weight);
  const A* __restrict__ an = static_cast<const A*>(a.anchor);
  O* __restrict__ out = static_cast<O*>(a.out);
  const float* __restrict__ gam = a.gam;
  const float* __restrict__ col = a.column;
  const float thr = a.threshold, p = a.p, q = a.one_minus_p;
  for (int64_t j = 0; j < a.len; ++j) {
    float mk;
    if constexpr (STAGE_TWO) {
      mk = gam[j] * col[j] >= thr ? 1.0f : 0.0f;
    } else {
      mk = col[j];
    }
    const float wf = Io<T>::load(w[j]);
    const float af = Io<A>::load(an[j]);
    const float r = ((mk * wf + (1.0f - mk) * af) - p * af) / q;
    out[j] = Io<O>::store(r);
  }
}

// Stage II from the packed bits: the expanded bits are a per-element keep column, so the
// keep-column loop (STAGE_TWO false: mk = column[j]) computes it, kBitsBlock at a time.
template <typename K>
static void mix_span_bits(const MixSpan& a, int64_t in_size, int64_t out_size, const K& loop,
                          int64_t anchor_size = 0) {
  float keep[kBitsBlock];
  for (int64_t j0 = 0; j0 < a.len; j0 += kBitsBlock) {
    const int64_t len = a.len - j0 < kBitsBlock ? a.len - j0 : kBitsBlock;
    expand_bits(a.bits, a.bit0 + j0, len, keep);
    MixSpan s = a;
    s.weight = static_cast<const char*>(a.weight) + j0 * in_size;
    if (a.anchor) s.anchor = static_cast<const char*>(a.anchor) + j0 * (anchor_size ? anchor_size : in_size);
    s.out = static_cast<char*>(a.out) + j0 * out_size;
    s.gam = nullptr;
    s.column = keep;
    s.stage_two = false;
    s.len = len;
    loop(s);
  }
}

template <typename T, typename A, typename O>
static void mix_weight_span_o(const MixSpan& a) {
  if (a.bits != nullptr) {
    mix_span_bits(a, sizeof(T), sizeof(O), mix_weight_span_t<T, A, O, false>, sizeof(A));
  } else if (a.stage_two) {
    mix_weight_span_t<T, A, O, true>(a);
  } else {
    mix_weight_span_t<T, A, O, false>(a);
  }
}

void mix_weight_span(const MixSpan& a) {
  if (a.bf16 && a.anchor_fp32) {  // W' held in the fp32 GAM buffer
    if (a.out_bf16) mix_weight_span_o<uint16_t, float, uint16_t>(a);
    else mix_weight_span_o<uint16_t, float, float>(a);
  } else if (a.bf16) {
    if (a.out_bf16) mix_weight_span_o<uint16_t, uint16_t, uint16_t>(a);
    else mix_weight_span_o<uint16_t, uint16_t, float>(a);
  } else {
    if (a.out_bf16) mix_weight_span_o<float, float, uint16_t>(a);
    else mix_weight_span_o<float, float, float>(a);
  }
}

// Mix backward: grad * M (reference.mix_grad), M as above. Products with 0/1 are exact
// in every dtype, so computing them in fp32 and rounding back changes nothing.
template <typename T, bool STAGE_TWO>
static void mix_grad_span_t(const MixSpan& a) {
  const T* __restrict__ g = static_cast<const T*>(a.weight);
  T* __restrict__ out = static_cast<T*>(a.out);
  const float* __restrict__ gam = a.gam;
  const float* __restrict__ col = a.column;
  const float thr = a.threshold;
  for (int64_t j = 0; j < a.len; ++j) {
    float mk;
    if constexpr (STAGE_TWO) {
      mk = gam[j] * col[j] >= thr ? 1.0f : 0.0f;
    } else {
      mk = col[j];
    }
    out[j] = Io<T>::store(Io<T>::load(g[j]) * mk);
  }
}

void mix_grad_span(const MixSpan& a) {
  if (a.bits != nullptr) {
    if (a.bf16) mix_span_bits(a, 2, 2, mix_grad_span_t<uint16_t, false>);
    else mix_span_bits(a, 4, 4, mix_grad_span_t<float, false>);
  } else if (a.bf16) {
    if (a.stage_two) mix_grad_span_t<uint16_t, true>(a);
    else mix_grad_span_t<uint16_t, false>(a);
  } else {
    if (a.stage_two) mix_grad_span_t<float, true>(a);
    else mix_grad_span_t<float, false>(a);
  }
}

}  // namespace DPS_ISA
}  // namespace dps
