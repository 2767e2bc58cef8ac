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

The wiring never keeps its optimizer alive: the hooks hold it weakly, and when it is
garbage-collected its wiring is removed (hooks and all), so the model trains with ``W``
again under any other optimizer. :func:`detach` removes the wiring of a model by hand; a
second optimizer cannot wire, or take as DPS parameters, parameters still wired to a live
optimizer (it is told to ``detach`` first).

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


def wired_to(param):
    """The live optimizer ``param`` is wired to, or None."""
    owner = _OWNERS.get(param)
    return None if owner is None else owner()


class MixHandle:
    """Returned by :func:`attach`; ``remove()`` unwires the model (also done when the
    optimizer is garbage-collected, and by :func:`detach`)."""

    def __init__(self, optimizer):
        # Weak: a handle is held by the optimizer (``_wired``) and by the finalizer that
        # removes the wiring when the optimizer dies; a strong reference would keep the
        # optimizer (2-3x the model's memory) alive as long as the model.
        self._optimizer = weakref.ref(optimizer)
        self.hooks = []
        self.params = []
        self.slots = []   # mix_op registry entries (what a compiled forward names)
        self.parts = []   # the _MixSwap/_ShardedMix objects: made inert on removal

    @property
    def optimizer(self):
        return self._optimizer()

    def remove(self) -> None:
        optimizer = self._optimizer()
        if optimizer is not None:
            optimizer._invalidate_plans()
            if optimizer._mixed_shards:   # FSDP2 shards still hold W~: W back first
                optimizer._unmix_shards()
        for hook in self.hooks:
            hook.remove()
        for part in self.parts:
            part.go_inert()
        for param in self.params:
            if optimizer is not None:
                optimizer._wired.pop(id(param), None)
            if wired_to(param) in (optimizer, None):
                _OWNERS.pop(param, None)
        for slot in self.slots:
            mix_op.release(slot)
        self.hooks.clear()
        self.params.clear()
        self.slots.clear()
        self.parts.clear()


def detach(model: nn.Module) -> int:
    """Remove every DPS Mix wiring from ``model`` (whatever optimizer made it); returns the
    number of parameters unwired. The model then trains with its own weights under any
    optimizer; a Mix optimizer whose wiring was removed refuses to step until
    :func:`attach` wires it again."""
    handles = []
    for module in model.modules():
        for hook in list(module._forward_pre_hooks.values()):
            part = getattr(hook, "__self__", None)
            if isinstance(part, (_MixSwap, _ShardedMix)) and part.handle is not None:
                handle = part.handle()
                if handle is not None and handle not in handles:
                    handles.append(handle)
    count = 0
    for handle in handles:
        count += len(handle.params)
        handle.remove()
    return count


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
    for module, name in candidates:   # every check before any hook
        owner = wired_to(module._parameters[name])
        if owner is not None and owner is not optimizer:
            raise RuntimeError(
                f"parameter {name!r} of {type(module).__name__} is already wired to another "
                f"live DPSAdamW (one optimizer per parameter): call "
                f"dps_kernels.detach(model) first, or delete that optimizer")
    handle = MixHandle(optimizer)
    by_module: dict[nn.Module, list[str]] = {}
    sharded = []
    for module, name in candidates:
        param = module._parameters[name]
        if id(param) in optimizer._wired:
            continue  # attach() called twice: keep the first wiring
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
        root = _ShardedMix(optimizer, sharded, handle)
        handle.parts.append(root)
        handle.hooks.append(model.register_forward_pre_hook(root.pre_forward, prepend=True))
        handle.hooks.append(model.register_forward_hook(root.post_forward, always_call=True))
        for param in sharded:
            _OWNERS[param] = weakref.ref(optimizer)
            optimizer._wired[id(param)] = handle
            handle.params.append(param)
    for module in by_module:
        # attach() again after an engine replaced the parameters: the module's old wiring
        # by this optimizer goes inert, so only the new one swaps
        for hook in list(module._forward_pre_hooks.values()):
            old = getattr(hook, "__self__", None)
            if isinstance(old, _MixSwap) and old.optimizer() is optimizer:
                old.go_inert()
    for module, names in by_module.items():
        swap = _MixSwap(optimizer, {name: module._parameters[name] for name in names}, handle)
        handle.parts.append(swap)
        handle.hooks += [module.register_forward_pre_hook(swap.swap_in),
                         module.register_forward_hook(swap.swap_out, always_call=True)]
        handle.slots += swap.slots.values()
        for param in swap.params.values():
            _OWNERS[param] = weakref.ref(optimizer)
            optimizer._wired[id(param)] = handle
            handle.params.append(param)
    # The optimizer's death removes its wiring (the handle holds it weakly, see MixHandle).
    weakref.finalize(optimizer, handle.remove)
    return handle


def _dead():
    return None


def _grad_tensors(output) -> list:
    """The tensors of a module's output (any nesting of sequences, dicts and dataclass-like
    ``ModelOutput``s) that the backward will reach."""
    from torch.utils._pytree import tree_leaves

    if hasattr(output, "to_tuple") and not isinstance(output, (tuple, list, dict)):
        output = output.to_tuple()   # transformers' ModelOutput
    return [t for t in tree_leaves(output) if torch.is_tensor(t) and t.requires_grad]


class _ShardedMix:
    """The model-level hooks of FSDP2-sharded Mix parameters (see ``attach``).

    A training forward mixes the local shards in place (``W~``) before FSDP2's
    all-gathers. FSDP2 reduce-scatters the gradient of ``W~`` into each shard's ``.grad``,
    which Mix needs as ``g * M``: the end of the backward (a callback queued once the
    gradient reaches the model's output, and queued again from there so that it runs after
    FSDP2's own end-of-backward callback, which finishes the reduce-scatters) masks those
    gradients and puts ``W`` back. So whatever reads ``.grad`` between ``backward()`` and
    ``step()`` (``clip_grad_norm_``, a metric, a callback) sees the single-process gradient,
    and an eval forward then simply uses ``W``. An eval forward between a training forward
    and its backward uses ``W`` and puts ``W~`` back after itself. ``M`` is 0/1, so
    masking twice (gradient accumulation, or ``step()``'s own pass for a forward without a
    backward) changes nothing.
    """

    def __init__(self, optimizer=None, params=(), handle=None):
        # weak references (see MixHandle); an inert one (a copy or a pickle of the model,
        # or removed wiring) has none
        self.optimizer = weakref.ref(optimizer) if optimizer is not None else _dead
        self.handle = weakref.ref(handle) if handle is not None else None
        self.params = list(params)
        self.remix_after_eval = False
        self.queued = False

    def go_inert(self) -> None:
        self.optimizer, self.params = _dead, []

    def pre_forward(self, module, args):
        optimizer = self.optimizer()
        if optimizer is None or not self.params:
            return None
        if module.training:
            optimizer._mix_shards(self.params)
        elif optimizer._mixed_shards:   # eval uses W; a pending backward gets W~ back after
            optimizer._unmix_shards()
            self.remix_after_eval = True
        return None

    def post_forward(self, module, args, output):
        optimizer = self.optimizer()
        if optimizer is None or not self.params:
            return None
        if not module.training:
            if self.remix_after_eval:
                self.remix_after_eval = False
                optimizer._mix_shards(self.params)
            return None
        if torch.is_grad_enabled():
            for tensor in _grad_tensors(output):
                tensor.register_hook(self._on_output_grad)
        return None

    def _on_output_grad(self, grad):
        if not self.queued:
            self.queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._after_fsdp)
        return None

    def _after_fsdp(self):
        # FSDP2 queues its final callback at its first pre-backward hook, which may come
        # after ours (wiring attached before fully_shard): queueing again from inside the
        # callback loop runs last.
        torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)

    def _end_of_backward(self):
        self.queued = False
        optimizer = self.optimizer()
        if optimizer is not None and optimizer._mixed_shards:
            optimizer._unmix_shards(mask_grads=True)

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

    def __init__(self, optimizer=None, params=None, handle=None):
        # weak references (see MixHandle); inert (no params) without an optimizer
        self.optimizer = weakref.ref(optimizer) if optimizer is not None else _dead
        self.handle = weakref.ref(handle) if handle is not None else None
        self.params = params or {}
        # name -> mix_op slot of (optimizer, param): what a compiled forward passes the op
        self.slots = {name: mix_op.register(optimizer, param)
                      for name, param in self.params.items()} if optimizer else {}
        self.depth = 0               # nested calls of the same module keep the outermost swap

    def go_inert(self) -> None:
        self.optimizer, self.params = _dead, {}

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
        if not self.params or self.depth > 1 or not mod.training:
            return None
        compiling = torch.compiler.is_compiling()
        optimizer = None if compiling else self.optimizer()
        if not compiling and optimizer is None:
            return None   # the optimizer is gone (its finalizer is removing this wiring)
        for name, param in self.params.items():
            if mod._parameters.get(name) is not param:
                continue   # an engine replaced the parameter: attach() again wires the new one
            mod._parameters[name] = (mix_op.mixed_weight(param, self.slots[name]) if compiling
                                     else mixed_weight(optimizer, param))
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
