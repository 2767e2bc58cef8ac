"""Triton backend: fused DPS + AdamW step, radix-select threshold, Mix weight/grad kernels.

Runs on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` (the Triton
interpreter: how CI and reviewers without a GPU exercise the kernels). Importing this
module does not import triton; the kernels (``dps_kernels.ops.triton``) and the
``torch.library`` ops are loaded on first use.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from . import interpreter_enabled
from ..step_types import MAX_TENSOR_ELEMENTS, GroupStep, MixMask, TensorStep
from .base import Backend

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def unavailable_reason() -> Optional[str]:
    """None when the Triton backend can run here, else why not."""
    try:
        import triton  # noqa: F401  (imported only here and when the kernels load)
    except Exception as exc:  # ImportError, or a broken install raising anything else
        return f"triton cannot be imported ({type(exc).__name__}: {exc})"
    if not torch.cuda.is_available() and not interpreter_enabled():
        return ("no CUDA device is available and TRITON_INTERPRET is not set "
                "(set TRITON_INTERPRET=1 to run the kernels in the Triton interpreter on CPU)")
    return None


class TritonBackend(Backend):
    name = "triton"

    def __init__(self):
        self._ops = None
        self._fused_step = None

    def _load(self):
        """Import the kernels and register the torch.library ops, once."""
        if self._ops is None:
            from ..ops.triton import fused_step, library
            self._fused_step = fused_step.FusedStep()
            self._ops = library.register()
        return self._ops

    def supports(self, tensor: torch.Tensor) -> Optional[str]:
        if tensor.dtype not in SUPPORTED_DTYPES:
            return f"dtype {tensor.dtype} is not one of fp32, bf16, fp16"
        if tensor.device.type == "cpu" and not interpreter_enabled():
            return "CPU tensors need TRITON_INTERPRET=1 (the Triton interpreter)"
        if tensor.device.type not in ("cpu", "cuda"):
            return f"device {tensor.device} is neither CUDA nor CPU (interpreter)"
        if not tensor.is_contiguous():
            return "the tensor is not contiguous (the fused kernels walk flat memory)"
        if tensor.numel() > MAX_TENSOR_ELEMENTS:
            return (f"{tensor.numel()} elements is more than the fused kernels' limit of "
                    f"{MAX_TENSOR_ELEMENTS} (int32 offsets)")
        return None

    def step(self, tasks: list[TensorStep], freeze: bool) -> None:
        self._load()
        # Gradients are only read: a contiguous copy of an odd-strided one is harmless.
        tasks = [t if t.grad.is_contiguous() else dataclasses.replace(t, grad=t.grad.contiguous())
                 for t in tasks]
        self._fused_step(tasks, freeze)

    def step_group(self, group: GroupStep) -> None:
        self._load()
        self._fused_step.group(group)

    def select_threshold(self, gam, column_factor, k, approx: bool = False):
        """Exact k-th largest score (``approx=True``: one radix pass, see radix_select.py)."""
        ops = self._load()
        return ops.select_threshold(gam, column_factor, int(k), bool(approx))

    def select_thresholds(self, items, out=None, approx: bool = False) -> list[torch.Tensor]:
        """``select_threshold`` of every ``(gam, column_factor or None, k)`` of ``items`` in
        7 launches in all (not 7 per tensor): what an optimizer should call when several
        tensors reach the end of Stage I at the same step. With ``out`` the kernels write
        each threshold into its 0-d tensor in place. Not a torch.library op."""
        self._load()
        from ..ops.triton import radix_select
        return radix_select.select_thresholds([(g, f, int(k)) for g, f, k in items],
                                              bool(approx), out=out)

    def select_capturable(self, selection, found_inf=None) -> None:
        """The capturable selection of a :class:`radix_select.CapturableSelection`: the same
        launches at every step, each exiting early on the device unless its tensor has just
        closed Stage I."""
        self._load()
        if selection is not None:
            selection.run(found_inf)

    def pack_mask(self, gam, column_factor, threshold, out=None):
        """The packed subnetwork (``Backend.pack_mask``) in one launch. Without ``out``
        through the ``torch.library`` op; with ``out`` the kernel writes the words there."""
        ops = self._load()
        if out is None:
            return ops.pack_mask(gam, column_factor, threshold)
        from ..ops.triton import mask_bits
        return mask_bits.pack_mask(gam, column_factor, threshold, out=out)

    def mix_weight(self, weight, anchor, mask: MixMask, p, out_dtype=None):
        ops = self._load()
        return ops.mix_weight(weight, anchor, mask.cols, mask.column_key, mask.keep_threshold,
                              mask.gam, mask.column_factor, mask.threshold, float(p), out_dtype,
                              mask.device_step, mask.key_base, mask.update_steps,
                              mask.stage_anchor, mask.mask_bits)

    def mix_grad(self, grad, mask: MixMask):
        ops = self._load()
        return ops.mix_grad(grad, mask.cols, mask.column_key, mask.keep_threshold, mask.gam,
                            mask.column_factor, mask.threshold, mask.device_step,
                            mask.key_base, mask.update_steps, mask.mask_bits)


BACKEND = TritonBackend()
