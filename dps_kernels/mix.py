"""DPS Mix wiring: the model's forward sees ``W~``, its backward gives ``W.grad += g_up * M``.

``attach(model, optimizer)`` hooks every module that owns a Mix DPS parameter. In training
mode, a forward pre-hook puts ``W~ = (M*W + (1-M)*A - p*A) / (1-p)`` in place of the
parameter for the duration of that module's forward, and a forward hook (which also runs
when the forward raises) puts the parameter back. ``state_dict`` keys, parameter objects
and eval mode (which uses ``W`` itself) are untouched.

All state lives in the optimizer, per parameter, and the mask depends only on
(seed, parameter index, step) in Stage I and on (GAM, FAM, threshold) in Stage II. So the
micro-batches of one optimizer step share one mask (the step advances only in
``optimizer.step()``), a recomputed forward under gradient checkpointing uses the same
mask, and several models with their own optimizers in one process never interact.
"""
from __future__ import annotations

import weakref

import torch
from torch import nn


class _MixWeight(torch.autograd.Function):
    """W -> W~ in the forward; upstream gradient times the mask in the backward."""

    @staticmethod
    def forward(ctx, weight, anchor, mask, p, backend):
        ctx.mask = mask
        ctx.backend = backend
        return backend.mix_weight(weight, anchor, mask, p)

    @staticmethod
    def backward(ctx, grad):
        return ctx.backend.mix_grad(grad.contiguous(), ctx.mask), None, None, None, None


def mixed_weight(optimizer, param: torch.Tensor) -> torch.Tensor:
    """The training-time weight of Mix DPS parameter ``param`` for the next optimizer step."""
    mask = optimizer._mix_mask(param)
    anchor = optimizer._mix_anchor(param)
    p = optimizer._group_of(param)["p"]
    return _MixWeight.apply(param, anchor, mask, p, optimizer._backend_for(param))


class MixHandle:
    """Returned by :func:`attach`; ``remove()`` unwires the model."""

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.hooks = []
        self.params = []

    def remove(self) -> None:
        self.optimizer._invalidate_plans()
        for hook in self.hooks:
            hook.remove()
        for param in self.params:
            self.optimizer._wired.pop(id(param), None)
            param.__dict__.pop("_dps_mix_owner", None)
        self.hooks.clear()
        self.params.clear()


def attach(model: nn.Module, optimizer) -> MixHandle:
    """Wire ``model`` so that its Mix DPS parameters (in ``optimizer``) are mixed in training.

    Raises if ``optimizer`` is not a ``DPSAdamW(mode="mix")``, if no parameter of the model
    is a Mix DPS parameter of it, or if a parameter is already wired to another optimizer.
    """
    from .optim import DPSAdamW

    if not isinstance(optimizer, DPSAdamW) or optimizer.mode != "mix":
        raise ValueError("attach() needs a DPSAdamW optimizer built with mode='mix', "
                         f"got {type(optimizer).__name__}"
                         f"{'(mode=%r)' % optimizer.mode if isinstance(optimizer, DPSAdamW) else ''}")
    candidates = [(module, name) for module in model.modules()
                  for name, param in module.named_parameters(recurse=False)
                  if optimizer.is_mix_param(param)]
    if not candidates:
        raise ValueError("attach(): no parameter of this model is a Mix DPS parameter of the "
                         "optimizer (was the optimizer built from this model's parameters?)")
    handle = MixHandle(optimizer)
    by_module: dict[nn.Module, list[str]] = {}
    for module, name in candidates:
        param = module._parameters[name]
        if id(param) in optimizer._wired:
            continue  # attach() called twice: keep the first wiring
        owner = getattr(param, "_dps_mix_owner", None)
        if owner is not None and owner() is not None and owner() is not optimizer:
            raise RuntimeError(f"parameter {name!r} of {type(module).__name__} is already "
                               f"wired to another DPSAdamW; one optimizer per parameter")
        by_module.setdefault(module, []).append(name)
    for module, names in by_module.items():
        handle.hooks.extend(_hook_module(module, names, optimizer))
        for name in names:
            param = module._parameters[name]
            param._dps_mix_owner = weakref.ref(optimizer)
            optimizer._wired[id(param)] = handle
            handle.params.append(param)
    return handle


def _hook_module(module: nn.Module, names: list[str], optimizer):
    params = {name: module._parameters[name] for name in names}
    depth = [0]  # nested calls of the same module keep the outermost swap

    def swap_in(mod, args):
        depth[0] += 1
        if depth[0] > 1 or not mod.training:
            return None
        for name, param in params.items():
            mod._parameters[name] = mixed_weight(optimizer, param)
        return None

    def swap_out(mod, args, output):
        depth[0] -= 1
        if depth[0] == 0:
            for name, param in params.items():
                mod._parameters[name] = param
        return None

    return [module.register_forward_pre_hook(swap_in),
            module.register_forward_hook(swap_out, always_call=True)]
