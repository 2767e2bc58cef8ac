"""Fake implementations of the ``dps_cpu`` C++ ops, for tracing with FakeTensors.

``torch.compile``, ``torch.export`` and ``torch.library.opcheck`` run an op on FakeTensors
(shapes, dtypes and devices, no data) to learn what it returns; an op without a fake
implementation stops Dynamo ("Operator does not support running with fake tensors"). Each
function below allocates what the C++ kernel in ``csrc/`` allocates and nothing more:
the same shape, dtype and (contiguous) layout. ``cpu_backend`` registers them when it
loads the library, once per process. The tensor-free ops (``abi_version``, ``isa``,
``best_isa``, ``set_isa``) are catch-all kernels that run as they are.
"""
from __future__ import annotations

from typing import Optional

import torch

_registered = False


def register() -> None:
    """Register the fake implementations (``torch.ops.dps_cpu`` must be loaded)."""
    global _registered
    if _registered:
        return

    @torch.library.register_fake("dps_cpu::fused_step")
    def _fused_step(params, grads, exp_avgs, exp_avg_sqs, gams, fams, thresholds,
                    column_factors, mask_bits, kinds, flags, mix_keys, keep_thresholds, cols,
                    scalars, freeze) -> None:
        return None   # updates its (a!)..(e!) lists in place, returns nothing

    @torch.library.register_fake("dps_cpu::select_threshold")
    def _select_threshold(gam, column_factor, k, method="radix"):
        return gam.new_empty(())   # 0-d, gam's dtype (float32, checked by the kernel)

    @torch.library.register_fake("dps_cpu::mix_weight")
    def _mix_weight(weight, anchor, cols, column_key, keep_threshold, gam, column_factor,
                    threshold, p, out_dtype: Optional[torch.dtype] = None, mask_bits=None):
        return weight.new_empty(weight.shape, dtype=out_dtype or weight.dtype)

    @torch.library.register_fake("dps_cpu::mix_grad")
    def _mix_grad(grad, cols, column_key, keep_threshold, gam, column_factor, threshold,
                  mask_bits=None):
        return grad.new_empty(grad.shape)

    @torch.library.register_fake("dps_cpu::pack_mask")
    def _pack_mask(gam, column_factor, threshold):
        return gam.new_empty(((gam.numel() + 31) // 32,), dtype=torch.int32)

    _registered = True
