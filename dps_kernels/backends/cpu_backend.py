"""Fused C++ CPU backend: one pass over memory per element for every DPS step kind.

The arithmetic lives in ``csrc/`` (see ``csrc/README.md`` and ``docs/cpu_backend.md``) and
is exposed as ``torch.ops.dps_cpu.*``. Per element of an fp32 tensor a step moves 28 bytes
(plain AdamW, Mix Stage II), 32 (Dense Stage II: + GAM read) or 36 (Stage I: + GAM read
and write), against the 5 to 10 separate passes of the torch backend.

Loading, on first use only (never at ``import dps_kernels``):

1. ``DPS_SKIP_EXT=1`` in the environment: the backend is unavailable, by request.
2. the library built by ``setup.py`` (``dps_kernels._cpu_ext``), if present;
3. else a JIT build of ``csrc/`` with ``torch.utils.cpp_extension.load`` into
   ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``), reused afterwards.

If none works, :func:`unavailable_reason` says why and warns once, and ``backend="auto"``
uses the torch backend.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch

from ..mask_bits import check_mask_bits
from ..step_types import MixMask, StepKind, TensorStep
from . import cpu_fake
from .base import Backend, write_out

# Must equal dps::kAbiVersion in csrc/ops.h.
ABI_VERSION = 2
PREBUILT_MODULE = "dps_kernels._cpu_ext"
JIT_NAME = "dps_kernels_cpu_jit"
CSRC = Path(__file__).resolve().parents[2] / "csrc"
SOURCES = ("bindings.cpp", "dps_step.cpp", "dps_select.cpp", "dps_mix.cpp", "dps_mask_bits.cpp",
           "dispatch.cpp",
           "span_kernels_default.cpp", "span_kernels_avx2.cpp", "span_kernels_avx512.cpp")
# -ffp-contract=off: no fused multiply-adds, so every fp32 operation rounds like the
# reference (torch's element-wise ops); -fno-math-errno lets sqrt vectorise and
# -fno-trapping-math lets the masked selects vectorise (neither changes a result bit);
# -fopenmp makes at::parallel_for parallel (ATen's OpenMP backend is header-inline).
CXX_FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-fopenmp"]
LD_FLAGS = ["-fopenmp"]

_KIND_CODES = {StepKind.PLAIN: 0, StepKind.DENSE_STAGE1: 1, StepKind.DENSE_STAGE2: 2,
               StepKind.MIX_STAGE1: 3, StepKind.MIX_STAGE2: 4}
_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)

_lock = threading.Lock()
_state: dict = {"done": False, "reason": None, "how": None, "warned": False}


def _ops_loaded() -> bool:
    return hasattr(torch.ops, "dps_cpu") and hasattr(torch.ops.dps_cpu, "fused_step")


def _check_abi() -> Optional[str]:
    got = torch.ops.dps_cpu.abi_version()
    if got != ABI_VERSION:
        return (f"the loaded dps_cpu library has ABI version {got}, this Python code expects "
                f"{ABI_VERSION}: rebuild it (pip install --no-build-isolation -e .)")
    return None


def _jit_build() -> Optional[str]:
    missing = [s for s in SOURCES if not (CSRC / s).is_file()]
    if missing:
        return (f"no prebuilt {PREBUILT_MODULE} and the C++ sources are not next to the "
                f"package for a JIT build (missing {', '.join(missing)} in {CSRC})")
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no prebuilt {PREBUILT_MODULE} and no C++ compiler ({cxx!r}) for a JIT build"
    from torch.utils import cpp_extension

    try:
        cpp_extension.load(name=JIT_NAME, sources=[str(CSRC / s) for s in SOURCES],
                           extra_cflags=CXX_FLAGS, extra_ldflags=LD_FLAGS,
                           is_python_module=False, verbose=False)
    except Exception as exc:  # a failed build must degrade to the torch backend, not crash
        first = str(exc).strip().splitlines()
        return f"JIT build of csrc/ failed: {first[-1] if first else type(exc).__name__}"
    return None


def _load() -> Optional[str]:
    if os.environ.get("DPS_SKIP_EXT", "0") == "1":
        return "DPS_SKIP_EXT=1 is set, so the C++ CPU extension is neither loaded nor built"
    if _ops_loaded():
        _state["how"] = "already loaded"
        return _check_abi()
    if importlib.util.find_spec(PREBUILT_MODULE) is not None:
        try:
            importlib.import_module(PREBUILT_MODULE)
            _state["how"] = "prebuilt"
            return _check_abi()
        except ImportError as exc:
            prebuilt_error = f"{PREBUILT_MODULE} failed to load ({exc}); "
    else:
        prebuilt_error = ""
    reason = _jit_build()
    if reason is not None:
        return prebuilt_error + reason
    _state["how"] = "jit"
    if not _ops_loaded():
        return "the JIT-built library did not register torch.ops.dps_cpu"
    return _check_abi()


def unavailable_reason() -> Optional[str]:
    """None when the C++ ops are loaded (building them on first call if needed), else why not."""
    with _lock:
        if not _state["done"]:
            _state["reason"] = _load()
            if _state["reason"] is None:
                cpu_fake.register()   # so torch.compile / opcheck can trace the ops
            _state["done"] = True
        reason = _state["reason"]
        if reason is not None and not _state["warned"]:
            _state["warned"] = True
            warnings.warn(f"dps_kernels: the C++ cpu backend is unavailable ({reason}); "
                          "backend='auto' uses the slower torch backend on CPU", RuntimeWarning,
                          stacklevel=2)
    return reason


def how_loaded() -> Optional[str]:
    """'prebuilt', 'jit' or 'already loaded' once loaded, else None."""
    return _state["how"] if _state["done"] and _state["reason"] is None else None


_EMPTY = torch.empty(0)


def _stage_two_args(mask: MixMask):
    if mask.stage_one:
        return mask.column_key, mask.keep_threshold, None, None, None, None
    if mask.mask_bits is not None:   # the packed subnetwork: GAM, factor, threshold unread
        return None, 0, None, None, None, mask.mask_bits
    return None, 0, mask.gam, mask.column_factor, mask.threshold, None


class CpuBackend(Backend):
    name = "cpu"

    def step(self, tasks: list[TensorStep], freeze: bool) -> None:
        if not tasks:
            return
        params, grads, avgs, sqs, gams, fams, thrs, factors, bits = ([] for _ in range(9))
        kinds, flags, keys, keep_thrs, cols, scalars = ([] for _ in range(6))
        for t in tasks:
            params.append(t.param)
            grads.append(t.grad)
            avgs.append(t.exp_avg)
            sqs.append(t.exp_avg_sq)
            # Entries a kind does not read get a shared empty placeholder (lists of the
            # schema cannot hold None for mutable tensors).
            gams.append(t.gam if t.gam is not None else _EMPTY)
            fams.append(t.fam if t.fam is not None else _EMPTY)
            thrs.append(t.threshold if t.threshold is not None else _EMPTY)
            factors.append(t.column_factor if t.column_factor is not None else _EMPTY)
            bits.append(t.mask_bits if t.mask_bits is not None else _EMPTY)
            kinds.append(_KIND_CODES[t.kind])
            s = t.scalars
            flags.append((1 if t.reset else 0) | (2 if s.decay_after else 0)
                         | (4 if t.mask_bits is not None else 0))
            keys.append(t.mix_key)
            keep_thrs.append(t.keep_threshold)
            cols.append(t.cols)
            scalars += (s.beta1, s.beta2, s.eps, s.decay, s.step_size, s.bias2_sqrt)
        torch.ops.dps_cpu.fused_step(params, grads, avgs, sqs, gams, fams, thrs, factors, bits,
                                     kinds, flags, keys, keep_thrs, cols, scalars, freeze)

    def select_threshold(self, gam, column_factor, k, method: str = "radix"):
        """Exact k-th largest score; ``method`` is "radix" (default) or "nth_element"."""
        return torch.ops.dps_cpu.select_threshold(gam, column_factor, int(k), method)

    def pack_mask(self, gam, column_factor, threshold, out=None):
        """The packed subnetwork (``Backend.pack_mask``), parallel over words."""
        if out is not None:
            check_mask_bits(out, gam.numel(), "out", gam.device)
        return write_out(torch.ops.dps_cpu.pack_mask(gam, column_factor, threshold), out)

    def mix_weight(self, weight, anchor, mask, p, out_dtype=None):
        if weight.numel() == 0:   # nothing to mix (the op's pointers would be unset)
            return torch.empty_like(weight, dtype=out_dtype or weight.dtype)
        key, keep_thr, gam, factor, thr, bits = _stage_two_args(mask)
        return torch.ops.dps_cpu.mix_weight(weight, anchor, mask.cols, key, keep_thr, gam, factor,
                                            thr, float(p), out_dtype, bits)

    def mix_grad(self, grad, mask):
        if grad.numel() == 0:
            return torch.empty_like(grad)
        key, keep_thr, gam, factor, thr, bits = _stage_two_args(mask)
        return torch.ops.dps_cpu.mix_grad(grad, mask.cols, key, keep_thr, gam, factor, thr, bits)

    def supports(self, tensor: torch.Tensor) -> Optional[str]:
        if tensor.device.type != "cpu":
            return f"the cpu backend runs on CPU tensors only, got a tensor on {tensor.device}"
        if tensor.dtype not in _SUPPORTED_DTYPES:
            return (f"the cpu backend supports float32 and bfloat16 parameters, got "
                    f"{tensor.dtype}")
        if not tensor.is_contiguous():
            return ("the cpu backend updates parameters in place and needs them contiguous, "
                    f"got strides {tensor.stride()} for shape {tuple(tensor.shape)}")
        return None


BACKEND = CpuBackend()
