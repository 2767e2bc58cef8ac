"""The Mix forward as one opaque ``torch.library`` op: what ``torch.compile`` traces.

Eagerly the wiring (``mix.py``) mixes through ``mix._MixWeight`` with what
``DPSAdamW._mix_mask`` / ``_mix_anchor`` pick from the optimizer's host state: a
Python-int step hashed on the host into the Stage I key, W0 or W' as the anchor, state
created at the parameter's first training forward. Traced by Dynamo, each of those reads
becomes a guard (the step int: a recompile at every step; the optimizer's state dict: a
recompile when the first step adds the other states), and the hash becomes graph
arithmetic. Under ``torch.compile`` the wiring calls instead

    dps_kernels::mixed_weight(Tensor weight, int slot) -> Tensor
    dps_kernels::mixed_weight_backward(Tensor grad, int slot) -> Tensor   (its autograd)

``slot`` names one wired (optimizer, parameter) pair in this module's registry, a fixed
int per parameter given by ``attach``: Dynamo sees a tensor and a constant. When the graph
runs, the op does what the eager path does, through the same function
(:func:`mix_inputs`) and the same backend kernel, so a compiled ``W~`` is the eager one bit
for bit, the state is created lazily as eagerly (W0 is the weight at the first training
forward), and a new step, a new stage or a ``load_state_dict`` is seen at the next call
without a hook or a recompile. Inductor never sees the hash arithmetic.

The op reads optimizer state that is not among its arguments. That state changes only in
``optimizer.step()`` and ``load_state_dict()``, outside any forward and its backward, so
within one run of a graph (and the recomputation of a checkpointed region) the op is a
function of its inputs. It must not be replayed without running, though: a CUDA graph
would freeze one step's mask, so both ops are tagged ``torch.Tag.cudagraph_unsafe`` (kept
out of Inductor's CUDA graphs). The backward asks for the mask when it runs: an
``optimizer.step()`` between a forward and its backward would give it the new step's mask
(``_MixWeight`` keeps the forward's).
"""
from __future__ import annotations

import itertools
import weakref

import torch

# slot -> (weakref to the optimizer, weakref to the parameter); see register().
_SLOTS: dict[int, tuple] = {}
_NEXT_SLOT = itertools.count()


def register(optimizer, param) -> int:
    """A new slot for ``param`` wired to ``optimizer`` (weak references: the registry keeps
    neither alive)."""
    slot = next(_NEXT_SLOT)
    _SLOTS[slot] = (weakref.ref(optimizer), weakref.ref(param))
    return slot


def release(slot: int) -> None:
    _SLOTS.pop(slot, None)


def _lookup(slot: int):
    entry = _SLOTS.get(slot)
    optimizer, param = (entry[0](), entry[1]()) if entry else (None, None)
    if optimizer is None or param is None:
        raise RuntimeError(f"dps_kernels mix slot {slot}: the wiring was removed or its "
                           f"optimizer or parameter no longer exists")
    return optimizer, param


def mix_inputs(optimizer, param):
    """``(anchor, mask, p, backend)`` of ``param``'s next step: what both the eager and the
    compiled Mix forward hand the backend's ``mix_weight``. The mask first: it creates the
    parameter's state at its first training forward (``_mix_anchor`` reads it)."""
    mask = optimizer._mix_mask(param)
    anchor = optimizer._mix_anchor(param)
    return anchor, mask, optimizer._group_of(param)["p"], optimizer._backend_for(param)


@torch.library.custom_op("dps_kernels::mixed_weight", mutates_args=(),
                         tags=(torch.Tag.cudagraph_unsafe,))
def mixed_weight(weight: torch.Tensor, slot: int) -> torch.Tensor:
    anchor, mask, p, backend = mix_inputs(*_lookup(slot))
    return backend.mix_weight(weight, anchor, mask, p)


@mixed_weight.register_fake
def _(weight, slot):
    # Every backend returns a fresh contiguous tensor of the weight's shape and dtype.
    return torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)


@torch.library.custom_op("dps_kernels::mixed_weight_backward", mutates_args=(),
                         tags=(torch.Tag.cudagraph_unsafe,))
def mixed_weight_backward(grad: torch.Tensor, slot: int) -> torch.Tensor:
    optimizer, param = _lookup(slot)
    # As mix._MixWeight.backward: grad * M, the kernels walk flat memory.
    return optimizer._backend_for(param).mix_grad(grad.contiguous(), optimizer._mix_mask(param))


@mixed_weight_backward.register_fake
def _(grad, slot):
    return torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)


def _setup_context(ctx, inputs, output):
    ctx.slot = inputs[1]


def _backward(ctx, grad):
    return mixed_weight_backward(grad, ctx.slot), None


mixed_weight.register_autograd(_backward, setup_context=_setup_context)
