// Registers the dps_cpu::* ops with the PyTorch dispatcher (CPU kernels), and a minimal
// Python module init so that setup.py can build the library as `dps_kernels._cpu_ext`.
// Loading the library (import, or torch.ops.load_library for the JIT build) is what
// registers the ops; dps_kernels/backends/cpu_backend.py calls them as torch.ops.dps_cpu.*.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "ops.h"
#include "span_args.h"

namespace {

int64_t abi_version() { return dps::kAbiVersion; }

std::string isa() { return dps::span_kernels().name; }

std::string best_isa() { return dps::best_isa(); }

// Returns the variant in use before the call; raises for one this CPU cannot run.
std::string set_isa(c10::string_view name) {
  std::string previous = dps::span_kernels().name;
  const std::string wanted(name);
  TORCH_CHECK(dps::set_isa(wanted.c_str()), "dps_cpu.set_isa: unknown instruction set or not ",
              "supported by this CPU: '", wanted, "' (choose from default, avx2, avx512; best ",
              "here is ", dps::best_isa(), ")");
  return previous;
}

}  // namespace

TORCH_LIBRARY(dps_cpu, m) {
  m.def(
      "fused_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] gams, Tensor(e!)[] fams, Tensor[] thresholds, "
      "Tensor[] column_factors, Tensor[] mask_bits, int[] kinds, int[] flags, int[] mix_keys, "
      "int[] keep_thresholds, int[] cols, float[] scalars, bool freeze) -> ()");
  m.def(
      "select_threshold(Tensor gam, Tensor? column_factor, int k, str method=\"radix\") "
      "-> Tensor");
  m.def(
      "mix_weight(Tensor weight, Tensor anchor, int cols, int? column_key, int keep_threshold, "
      "Tensor? gam, Tensor? column_factor, Tensor? threshold, float p, "
      "ScalarType? out_dtype=None, Tensor? mask_bits=None) -> Tensor");
  m.def(
      "mix_grad(Tensor grad, int cols, int? column_key, int keep_threshold, Tensor? gam, "
      "Tensor? column_factor, Tensor? threshold, Tensor? mask_bits=None) -> Tensor");
  m.def("pack_mask(Tensor gam, Tensor? column_factor, Tensor threshold) -> Tensor");
  // Tensor-free ops: registered as catch-all kernels.
  m.def("abi_version() -> int", &abi_version);
  m.def("isa() -> str", &isa);
  m.def("best_isa() -> str", &best_isa);
  m.def("set_isa(str name) -> str", &set_isa);
}

TORCH_LIBRARY_IMPL(dps_cpu, CPU, m) {
  m.impl("fused_step", &dps::fused_step);
  m.impl("select_threshold", &dps::select_threshold);
  m.impl("mix_weight", &dps::mix_weight);
  m.impl("mix_grad", &dps::mix_grad);
  m.impl("pack_mask", &dps::pack_mask);
}

#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _cpu_ext
#endif
#define DPS_CONCAT_(a, b) a##b
#define DPS_CONCAT(a, b) DPS_CONCAT_(a, b)

// An empty module: importing it only loads the library, which registers the ops above.
extern "C" PyObject* DPS_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "dps_kernels._cpu_ext",
                            "DPS C++ CPU kernels (ops live in torch.ops.dps_cpu)", -1,
                            nullptr};
  return PyModule_Create(&def);
}
