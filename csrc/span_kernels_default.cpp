// Portable variant of span_kernels.h: the compiler's baseline (SSE2 on x86-64, NEON on
// aarch64), used on CPUs without AVX2 and on other architectures.
#define DPS_ISA isa_default
#include "span_kernels.h"
