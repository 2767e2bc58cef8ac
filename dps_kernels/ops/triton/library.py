"""``torch.library`` registration of the functional Triton ops, so torch.compile sees them.

Registered with ``torch.library.triton_op`` (the launcher body doubles as the fake
implementation: it only allocates and launches through ``wrap_triton``, so it traces with
fake tensors), on first use of the backend, never at ``import dps_kernels``:

    dps_kernels::triton_mix_weight(weight, anchor, cols, column_key?, keep_threshold,
                                   gam?, column_factor?, threshold?, p, out_dtype?,
                                   device_step?, key_base, update_steps, stage_anchor?,
                                   mask_bits?)
    dps_kernels::triton_mix_grad(grad, cols, column_key?, keep_threshold, gam?,
                                 column_factor?, threshold?, device_step?, key_base,
                                 update_steps, mask_bits?) -> Tensor
(``device_step`` up to ``stage_anchor``: the capturable Mix mask, see ops/triton/mix.py;
``mask_bits``: the packed Stage II subnetwork, see dps_kernels/mask_bits.py)
    dps_kernels::triton_select_threshold(gam, column_factor?, k, approx) -> Tensor (0-d fp32)
    dps_kernels::triton_pack_mask(gam, column_factor?, threshold) -> Tensor (int32 words)

The optimizer step (``fused_step``) is not an op: it mutates a variable list of tensors
through a pointer table, which no schema can describe; it runs outside compiled graphs,
like ``torch.optim``'s own fused kernels.

Under ``TRITON_INTERPRET=1`` the kernels cannot be traced (``wrap_triton`` hands an
interpreted kernel back unwrapped, so a launcher run on FakeTensors would launch it on
tensors without data). There the same four ops are plain ``torch.library.custom_op``s,
opaque to ``torch.compile``, whose fake implementations only allocate the outputs (the
``_fake_*`` functions below: shape, dtype, device and contiguous layout of what the
launchers return).
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import torch

from ...backends import interpreter_enabled
from ...mask_bits import num_words
from . import mask_bits, mix, radix_select

_OPS: Optional[SimpleNamespace] = None


def _fake_mix_weight(weight, anchor, cols, column_key, keep_threshold, gam, column_factor,
                     threshold, p, out_dtype, device_step=None, key_base=0, update_steps=1,
                     stage_anchor=None, mask_bits=None):
    return torch.empty(weight.shape, dtype=out_dtype or weight.dtype, device=weight.device)


def _fake_mix_grad(grad, cols, column_key, keep_threshold, gam, column_factor, threshold,
                   device_step=None, key_base=0, update_steps=1, mask_bits=None):
    return torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)


def _fake_select_threshold(gam, column_factor, k, approx):
    return torch.empty((), dtype=torch.float32, device=gam.device)


def _fake_pack_mask(gam, column_factor, threshold):
    return torch.empty(num_words(gam.numel()), dtype=torch.int32, device=gam.device)


def _define(name: str, fake):
    """``triton_op`` (traceable launchers) on a GPU; under the interpreter a custom op with
    ``fake`` as its fake implementation (see the module docstring)."""
    if not interpreter_enabled():
        from torch.library import triton_op
        return triton_op(name, mutates_args=())

    def define(fn):
        op = torch.library.custom_op(name, fn, mutates_args=())
        op.register_fake(fake)
        return op
    return define


def register() -> SimpleNamespace:
    """Define the ops once per process; returns callables ``mix_weight``, ``mix_grad``,
    ``select_threshold``, ``pack_mask`` (the ``torch.ops.dps_kernels`` entries)."""
    global _OPS
    if _OPS is not None:
        return _OPS
    from torch.library import wrap_triton

    def _wrap(kernel):
        # Interpreted kernels (TRITON_INTERPRET=1) cannot be traced; recent torch returns
        # them unwrapped, older torch raises: launch them directly in both cases.
        try:
            return wrap_triton(kernel)
        except RuntimeError:
            return kernel

    @_define("dps_kernels::triton_mix_weight", _fake_mix_weight)
    def triton_mix_weight(weight: torch.Tensor, anchor: torch.Tensor, cols: int,
                          column_key: Optional[int], keep_threshold: int,
                          gam: Optional[torch.Tensor], column_factor: Optional[torch.Tensor],
                          threshold: Optional[torch.Tensor], p: float,
                          out_dtype: Optional[torch.dtype],
                          device_step: Optional[torch.Tensor] = None, key_base: int = 0,
                          update_steps: int = 1,
                          stage_anchor: Optional[torch.Tensor] = None,
                          mask_bits: Optional[torch.Tensor] = None) -> torch.Tensor:
        return mix.mix_weight(weight, anchor, cols, column_key, keep_threshold, gam,
                              column_factor, threshold, p, out_dtype, device_step, key_base,
                              update_steps, stage_anchor, launch=_wrap, mask_bits=mask_bits)

    @_define("dps_kernels::triton_mix_grad", _fake_mix_grad)
    def triton_mix_grad(grad: torch.Tensor, cols: int, column_key: Optional[int],
                        keep_threshold: int, gam: Optional[torch.Tensor],
                        column_factor: Optional[torch.Tensor],
                        threshold: Optional[torch.Tensor],
                        device_step: Optional[torch.Tensor] = None, key_base: int = 0,
                        update_steps: int = 1,
                        mask_bits: Optional[torch.Tensor] = None) -> torch.Tensor:
        return mix.mix_grad(grad, cols, column_key, keep_threshold, gam, column_factor,
                            threshold, device_step, key_base, update_steps, launch=_wrap,
                            mask_bits=mask_bits)

    @_define("dps_kernels::triton_select_threshold", _fake_select_threshold)
    def triton_select_threshold(gam: torch.Tensor, column_factor: Optional[torch.Tensor],
                                k: int, approx: bool) -> torch.Tensor:
        return radix_select.select_threshold(gam, column_factor, k, approx,
                                             launch=_wrap)

    @_define("dps_kernels::triton_pack_mask", _fake_pack_mask)
    def triton_pack_mask(gam: torch.Tensor, column_factor: Optional[torch.Tensor],
                         threshold: torch.Tensor) -> torch.Tensor:
        return mask_bits.pack_mask(gam, column_factor, threshold, launch=_wrap)

    ops = torch.ops.dps_kernels
    _OPS = SimpleNamespace(mix_weight=ops.triton_mix_weight, mix_grad=ops.triton_mix_grad,
                           select_threshold=ops.triton_select_threshold,
                           pack_mask=ops.triton_pack_mask)
    return _OPS
