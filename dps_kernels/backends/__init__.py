"""Backend registry. Backends are imported lazily, on first use, never at package import.

Each backend module defines ``BACKEND`` (a :class:`~dps_kernels.backends.base.Backend`)
and ``unavailable_reason()`` (None when it can run here, else why not).
"""
from __future__ import annotations

import importlib
import os
from typing import Optional

BACKEND_MODULES = {
    "torch": "dps_kernels.backends.torch_backend",
    "triton": "dps_kernels.backends.triton_backend",
    "cpu": "dps_kernels.backends.cpu_backend",
}
BACKEND_NAMES = tuple(BACKEND_MODULES) + ("auto",)


def _module(name: str):
    return importlib.import_module(BACKEND_MODULES[name])


def unavailable_reason(name: str) -> Optional[str]:
    """None if backend ``name`` can run on this machine, else a sentence saying why not."""
    if name not in BACKEND_MODULES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {name!r}")
    try:
        module = _module(name)
    except ImportError as exc:
        return f"backend {name!r} cannot be imported: {exc}"
    return module.unavailable_reason()


def available_backends() -> list[str]:
    """Names of the backends that can run here, e.g. ``["torch"]`` or ``["torch", "cpu"]``."""
    return [name for name in BACKEND_MODULES if unavailable_reason(name) is None]


def get_backend(name: str):
    """The backend object ``name``; raises RuntimeError with the reason if it cannot run."""
    reason = unavailable_reason(name)
    if reason is not None:
        raise RuntimeError(reason)
    return _module(name).BACKEND


def auto_backend_name(device_type: str) -> str:
    """What ``backend="auto"`` picks for tensors on ``device_type``.

    CUDA: triton, else torch. CPU: the compiled cpu backend, else torch. The Triton
    interpreter is never picked automatically (it is a test vehicle, far slower than torch).
    """
    if device_type == "cuda" and unavailable_reason("triton") is None:
        return "triton"
    if device_type == "cpu" and unavailable_reason("cpu") is None:
        return "cpu"
    return "torch"


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
