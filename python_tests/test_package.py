"""Packaging promises: importing probes nothing and compiles nothing; backends are listed."""
import subprocess
import sys

import dps_kernels


def test_import_probes_no_device_and_loads_no_backend():
    code = ("import sys, dps_kernels; "
            "bad = [m for m in ('triton', 'dps_kernels.backends.triton_backend', "
            "'dps_kernels.backends.cpu_backend', 'transformers', 'torch.utils.cpp_extension') "
            "if m in sys.modules]; "
            "import torch; print(bad, torch.cuda.is_initialized())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[] False", out.stdout + out.stderr


def test_available_backends_always_has_torch():
    names = dps_kernels.available_backends()
    assert names[0] == "torch"
    assert set(names) <= {"torch", "triton", "cpu"}


def test_public_api():
    assert {"DPSAdamW", "attach", "available_backends"} <= set(dps_kernels.__all__)
