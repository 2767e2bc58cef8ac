"""Package build. Pure Python unless the C++ CPU backend can be built (see csrc/README.md).

The extension ``dps_kernels._cpu_ext`` (csrc/) is built with torch's ``BuildExtension``
(ninja) when torch is importable, a C++ compiler is on PATH and ``DPS_SKIP_EXT`` is not
``1``. Install with ``pip install --no-build-isolation -e .`` so that torch comes from the
environment. A failed extension build does not fail the install: the package then
compiles csrc/ on first use of the cpu backend, or falls back to the torch backend.
No network, no device probing, no git here.
"""
import os
import shutil
import sys

from setuptools import find_packages, setup

CPU_EXT_SOURCES = ["csrc/bindings.cpp", "csrc/dps_step.cpp", "csrc/dps_select.cpp",
                   "csrc/dps_mix.cpp", "csrc/dps_mask_bits.cpp", "csrc/dispatch.cpp",
                   "csrc/span_kernels_default.cpp",
                   "csrc/span_kernels_avx2.cpp", "csrc/span_kernels_avx512.cpp"]
# Same flags as the JIT build in dps_kernels/backends/cpu_backend.py (see the reasons there).
CPU_EXT_CXX_FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math",
                     "-fopenmp"]


def _cpu_extension():
    """(ext_modules, cmdclass) for the C++ CPU backend, or empty ones with the reason printed."""
    if os.environ.get("DPS_SKIP_EXT", "0") == "1":
        print("dps_kernels: DPS_SKIP_EXT=1, not building the C++ CPU extension", file=sys.stderr)
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("dps_kernels: torch is not importable here (use --no-build-isolation); "
              "not building the C++ CPU extension", file=sys.stderr)
        return [], {}
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        print("dps_kernels: no C++ compiler on PATH; not building the C++ CPU extension",
              file=sys.stderr)
        return [], {}

    class OptionalBuildExtension(BuildExtension):
        """A failed extension build warns instead of failing the install."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # compiler errors come in several exception types
                print(f"dps_kernels: building {ext.name} failed ({exc}); the cpu backend will "
                      "try a JIT build on first use, else fall back to torch", file=sys.stderr)

    ext = CppExtension("dps_kernels._cpu_ext", CPU_EXT_SOURCES,
                       extra_compile_args={"cxx": CPU_EXT_CXX_FLAGS},
                       extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _cpu_extension()

# Supported versions: the oldest stack CI tests (scripts/setup_oldest_env.sh installs exactly
# these lower bounds, with numpy < 2 as triton 3.6's interpreter needs) and the newest it
# finds (scripts/setup_env.sh). Kept equal to README.md's line and to the oldest-env
# script by python_tests/test_supported_versions.py.
PYTHON_MIN = "3.11"   # the only Python of the machines CI runs on
TORCH_MIN = "2.11"    # the GPU machine's torch (scripts/gpu.sh tests runs the suite on it);
                      # CI can install only the local CPU wheel, 2.13.0
TRITON_MIN = "3.6"    # AOT gate and interpreter tests in CI (bench/results/aot_triton36/)

setup(
    name="dps_kernels",
    version="0.1.0",
    description="Dynamic Parameter Selection (DPS) fine-tuning as a fused drop-in optimizer",
    packages=find_packages(include=["dps_kernels", "dps_kernels.*"]),
    python_requires=f">={PYTHON_MIN}",
    install_requires=[f"torch>={TORCH_MIN}"],
    extras_require={
        "triton": [f"triton>={TRITON_MIN}"],
        "transformers": ["transformers", "accelerate"],
        "test": ["pytest", "transformers", f"triton>={TRITON_MIN}", "ninja"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
