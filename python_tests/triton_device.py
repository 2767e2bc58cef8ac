"""Where a test that runs the triton backend puts its tensors.

The triton backend steps CUDA tensors with the compiled kernels, and CPU tensors only under
the Triton interpreter (``TRITON_INTERPRET=1``). A test that builds CPU tensors for it
passes on a CPU machine and fails on a GPU one, so every such test takes its device from
here: CUDA when a GPU is present and the interpreter is off, else CPU (the interpreter).
A test that can only run on CPU tensors (it records interpreter launches, or steps the same
CPU tensors on every backend) skips when :func:`compiled_triton` is True, with a reason that
starts "CPU tensors only".

``emulate_gpu.py`` (a pytest plugin, ``test_gpu_correctness.py``) replaces
:func:`compiled_triton` to check, on a CPU machine, that the tests really ask here.
"""
from __future__ import annotations

import torch

from dps_kernels.backends import interpreter_enabled


def compiled_triton() -> bool:
    """True when triton runs its compiled kernels here (a GPU, no interpreter)."""
    return torch.cuda.is_available() and not interpreter_enabled()


def triton_device() -> torch.device:
    return torch.device("cuda" if compiled_triton() else "cpu")


def device_for(backend: str) -> torch.device:
    """The device of a test parametrized over backends: the torch and cpu backends step
    CPU tensors (the cpu backend only those), triton :func:`triton_device`'s."""
    return triton_device() if backend == "triton" else torch.device("cpu")
