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

The wiring is not part of the model's data: a ``copy.deepcopy`` or a pickle of a wired
model is a plain model (inert hooks), and the Parameters carry no reference to the
optimizer, so ``torch.save(model)`` works.

Under ``torch.compile`` Dynamo traces these hooks into the model's graph; ``W~`` then comes
from one opaque op per weight whose arguments are the weight and a fixed int
(``mix_op.py``, ``docs/compile.md``), so the graph has no break and is not recompiled at
new steps or stages.
"""
from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from . import mix_op
from .distributed import is_sharded

# The optimizer modes whose forward mixes the weight with its anchor: DPS Mix, and Mixout
# (DPS Mix Stage I at every step).
WIRED_MODES = ("mix", "mixout")


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
    anchor, mask, p, backend = mix_op.mix_inputs(optimizer, param)
    return _MixWeight.apply(param, anchor, mask, p, backend)


# param -> weakref to the optimizer it is wired to. Kept here, not on the Parameter, so a
# wired Parameter pickles (a weakref attribute would not) and a copy carries no wiring.
_OWNERS = WeakIdKeyDictionary()


class MixHandle:
    """Returned by :func:`attach`; ``remove()`` unwires the model."""

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.hooks = []
        self.params = []
        self.slots = []   # mix_op registry entries (what a compiled forward names)

    def remove(self) -> None:
        self.optimizer._invalidate_plans()
        for hook in self.hooks:
            hook.remove()
        for param in self.params:
            self.optimizer._wired.pop(id(param), None)
            _OWNERS.pop(param, None)
        for slot in self.slots:
            mix_op.release(slot)
        self.hooks.clear()
        self.params.clear()
        self.slots.clear()


def attach(model: nn.Module, optimizer) -> MixHandle:
    """Wire ``model`` so that its Mix DPS parameters (in ``optimizer``) are mixed in training.

    Raises if ``optimizer`` is not a ``DPSAdamW(mode="mix")``, if no parameter of the model
    is a Mix DPS parameter of it, or if a parameter is already wired to another optimizer.

    The wiring belongs to this model object: a ``copy.deepcopy`` or a pickle
    (``torch.save(model)``) of the model is a plain, unwired model (its hooks do nothing);
    wire the copy with ``attach(copy, its_optimizer)``.
    """
    # Duck-typed (DPSAdamW's own attribute) so this module need not import optim.py.
    is_dps = getattr(optimizer, "_is_dps_adamw", False)
    if not is_dps or optimizer.mode not in WIRED_MODES:
        detail = f"(mode={optimizer.mode!r})" if is_dps else ""
        raise ValueError(f"attach() needs a DPSAdamW optimizer built with mode in {WIRED_MODES}, "
                         f"got {type(optimizer).__name__}{detail}")
    candidates = [(module, name) for module in model.modules()
                  for name, param in module.named_parameters(recurse=False)
                  if optimizer.is_mix_param(param)]
    if not candidates:
        raise ValueError("attach(): no parameter of this model is a Mix DPS parameter of the "
                         "optimizer (was the optimizer built from this model's parameters?)")
    handle = MixHandle(optimizer)
    by_module: dict[nn.Module, list[str]] = {}
    sharded = []
    for module, name in candidates:
        param = module._parameters[name]
        if id(param) in optimizer._wired:
            continue  # attach() called twice: keep the first wiring
        owner = _OWNERS.get(param)
        if owner is not None and owner() is not None and owner() is not optimizer:
            raise RuntimeError(f"parameter {name!r} of {type(module).__name__} is already "
                               f"wired to another DPSAdamW; one optimizer per parameter")
        if is_sharded(param):
            sharded.append(param)
        else:
            by_module.setdefault(module, []).append(name)
    if sharded:
        # FSDP2 all-gathers a module's weights in its own pre-forward hook (prepended), and
        # again for the backward: mix the local shards in place before the root's
        # all-gather, i.e. in a pre-hook prepended to the model's own, so every all-gather
        # (forward, recomputation, backward) sees W~; step() puts W back and masks the
        # gradient (docs/distributed.md).
        root = _ShardedMix(optimizer, sharded)
        handle.hooks.append(model.register_forward_pre_hook(root.pre_forward, prepend=True))
        for param in sharded:
            _OWNERS[param] = weakref.ref(optimizer)
            optimizer._wired[id(param)] = handle
            handle.params.append(param)
    for module in by_module:
        # attach() again after an engine replaced the parameters: the module's old wiring
        # by this optimizer goes inert, so only the new one swaps
        for hook in list(module._forward_pre_hooks.values()):
            old = getattr(hook, "__self__", None)
            if isinstance(old, _MixSwap) and old.optimizer is optimizer:
                old.optimizer, old.params = None, {}
    for module, names in by_module.items():
        swap = _MixSwap(optimizer, {name: module._parameters[name] for name in names})
        handle.hooks += [module.register_forward_pre_hook(swap.swap_in),
                         module.register_forward_hook(swap.swap_out, always_call=True)]
        handle.slots += swap.slots.values()
        for param in swap.params.values():
            _OWNERS[param] = weakref.ref(optimizer)
            optimizer._wired[id(param)] = handle
            handle.params.append(param)
    return handle


class _ShardedMix:
    """The model-level pre-hook of FSDP2-sharded Mix parameters (see ``attach``)."""

    def __init__(self, optimizer=None, params=()):
        self.optimizer = optimizer   # None: inert (a copy or a pickle of the model)
        self.params = list(params)

    def pre_forward(self, module, args):
        if self.optimizer is None:
            return None
        if module.training:
            self.optimizer._mix_shards(self.params)
        else:
            self.optimizer._unmix_shards()   # eval uses W
        return None

    def __deepcopy__(self, memo):
        return _ShardedMix()

    def __reduce__(self):
        return (_ShardedMix, ())


class _MixSwap:
    """The forward pre-hook (``swap_in``) and hook (``swap_out``) of one wired module.

    An object rather than closures so that a copy of the model can drop the wiring: a
    deepcopy or an unpickled copy of the module gets an inert ``_MixSwap`` (its hooks do
    nothing), never one that would put the original's Parameters into the copy or mix the
    copy's forward with the original optimizer's state.
    """

    def __init__(self, optimizer=None, params=None):
        self.optimizer = optimizer   # None: inert
        self.params = params or {}
        # name -> mix_op slot of (optimizer, param): what a compiled forward passes the op
        self.slots = {name: mix_op.register(optimizer, param)
                      for name, param in self.params.items()} if optimizer else {}
        self.depth = 0               # nested calls of the same module keep the outermost swap

    def swap_in(self, mod, args):
        if torch.compiler.is_compiling():
            return _undone_in_region(self._swap_in, mod)
        return self._swap_in(mod)

    def swap_out(self, mod, args, output):
        if torch.compiler.is_compiling():
            return _undone_in_region(self._swap_out, mod)
        return self._swap_out(mod)

    def _swap_in(self, mod):
        self.depth += 1
        if self.optimizer is None or self.depth > 1 or not mod.training:
            return None
        compiling = torch.compiler.is_compiling()
        for name, param in self.params.items():
            if mod._parameters.get(name) is not param:
                continue   # an engine replaced the parameter: attach() again wires the new one
            mod._parameters[name] = (mix_op.mixed_weight(param, self.slots[name]) if compiling
                                     else mixed_weight(self.optimizer, param))
        return None

    def _swap_out(self, mod):
        self.depth -= 1
        if self.depth == 0:
            for name, param in self.params.items():
                if mod._parameters.get(name) is not param:   # swapped in by this hook: W~
                    current = mod._parameters.get(name)
                    if current is None or isinstance(current, nn.Parameter):
                        continue   # replaced by an engine, not by swap_in: leave it
                mod._parameters[name] = param
        return None

    def __deepcopy__(self, memo):
        return _MixSwap()

    def __reduce__(self):
        return (_MixSwap, ())


def _undone_in_region(hook, mod):
    """Trace ``hook(mod)`` (a swap) letting it mutate the module and the depth counter
    inside a higher-order op. Dynamo refuses any mutation of outside state within the body
    of ``torch.utils.checkpoint`` (whose eager recomputation would replay it), unless the
    global ``torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint`` is set.
    A swap and its swap-back both run in the same region and cancel out, so nothing needs
    replaying; torch's helper for exactly that lifts the check for this call only. It is
    private: on a torch without it the hook is called as is (and checkpointed regions need
    that config)."""
    allow = getattr(torch._dynamo.utils,
                    "_disable_side_effect_safety_checks_for_current_subtracer", None)
    return hook(mod) if allow is None else allow(hook, mod)
