"""What ``DPSAdamW.step`` keeps per param group between steps, so a step costs little host time.

A :class:`GroupPlan` holds, for one param group whose every parameter has state, the
per-tensor buffers that do not change from step to step (:class:`~step_types.TensorEntry`:
param, moments, GAM, FAM, factor, threshold, anchors), split by backend, plus the group's
common step ``t`` on the host. A usual step then only gathers the gradients, computes the
AdamW scalars once for the group and hands one :class:`~step_types.GroupStep` per backend
(the Triton backend keeps its address tables in ``cache``). Per tensor per step that is a
list comprehension and a dict write, not a Python object.

A plan is dropped (and rebuilt at the next step) whenever what it caches may have changed:
``add_param_group``, ``load_state_dict``, Mix wiring removed, a step on the general path
(some gradient missing, so steps diverge), or a changed ``group["params"]`` list. State
tensors are only ever updated in place while a plan lives, so cached addresses stay valid.

Capturable plans also own the device-side pieces: the fp64 hyperparameter vector
``[lr, beta1, beta2, eps, weight_decay]``, the step counters (``state["step"]``, 0-d fp32 on
the device) and the :class:`~ops.triton.radix_select.CapturableSelection` of the group.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch

from . import reference as ref
from .distributed import is_sharded, local
from .mask_hash import columns_of, key_base
from .step_types import TensorEntry

_LAYOUT = operator.attrgetter("layout")


class BackendPart:
    """The tensors of a plan that one backend steps, in group order."""

    def __init__(self, backend):
        self.backend = backend
        self.indices: list[int] = []
        self.entries: list[TensorEntry] = []
        self.cache: dict = {}
        self.selection = None        # capturable: the group's CapturableSelection


class GroupPlan:
    """Cached per-group step data (see module docstring)."""

    def __init__(self, optimizer, group: dict):
        self.params_list = group["params"]
        self.params = list(group["params"])
        self.states = [optimizer.state[p] for p in self.params]
        self.mode = optimizer._kernel_mode(group)   # plain, dense or mix
        self.capturable = optimizer.capturable
        # FSDP2: the kernels step the local shards (entries hold them; step() takes the
        # local shards of the gradients)
        self.sharded = any(is_sharded(p) for p in self.params)
        steps = {self._host_step(s) for s in self.states}
        self.t: Optional[int] = steps.pop() if len(steps) == 1 else None
        self.parts: list[BackendPart] = []
        # one part per (backend, device, dtype), as torch's optimizers bucket their tensors:
        # a backend's group step takes tensors of one device and dtype
        by_kind: dict[tuple, BackendPart] = {}
        for i, (param, state) in enumerate(zip(self.params, self.states)):
            backend = optimizer._backend_for(param)
            kind = (id(backend), param.device, param.dtype)
            part = by_kind.get(kind)
            if part is None:
                part = by_kind[kind] = BackendPart(backend)
                self.parts.append(part)
            part.indices.append(i)
            part.entries.append(_entry(optimizer, param, state, group))
        self.hyper: Optional[torch.Tensor] = None
        self.hyper_values = None
        # The gradients the plan last took. The same objects again (autograd accumulates
        # into .grad in place) need no look; new ones must be laid out like the parameters
        # (``takes``), else the step goes to the general path, whose checks and copies are
        # the first step's. Nothing else a step checks can change while a plan lives
        # (wiring and CHILD-TUNING_D's network drop or precede the plans).
        self.taken_grads: list = []
        self.layouts = [torch.strided] * len(self.params)

    def takes(self, grads: list) -> bool:
        """Whether the plan can step these gradients as the first step's checks would:
        the tensors it took before, or new ones that are dense (not sparse) and
        contiguous. (torch itself refuses a ``.grad`` of another dtype or shape than its
        parameter.) Vectorized over the group: no Python loop."""
        if len(grads) == len(self.taken_grads) and all(map(operator.is_, grads,
                                                           self.taken_grads)):
            return True
        ok = (list(map(_LAYOUT, grads)) == self.layouts
              and all(map(torch.Tensor.is_contiguous, grads)))
        if ok:
            self.taken_grads = grads
        return ok

    def _host_step(self, state) -> Optional[int]:
        step = state["step"]
        return None if torch.is_tensor(step) else step

    def still_valid(self, group: dict) -> bool:
        return group["params"] is self.params_list and len(self.params_list) == len(self.params)

    # ------------------------------------------------------------------ capturable pieces
    def device_hyper(self, group: dict, device) -> torch.Tensor:
        """fp64 ``[lr, beta1, beta2, eps, weight_decay]`` on the device, written only when a
        value changed; a tensor ``lr`` is copied on the device at every step (so a CUDA
        graph replays schedulers that update it in place)."""
        lr = group["lr"]
        values = (None if torch.is_tensor(lr) else float(lr), *map(float, group["betas"]),
                  float(group["eps"]), float(group["weight_decay"]))
        if self.hyper is None:
            self.hyper = torch.zeros(5, dtype=torch.float64, device=device)
        if values != self.hyper_values:
            host = torch.tensor([0.0 if v is None else v for v in values], dtype=torch.float64)
            self.hyper.copy_(host.to(device, non_blocking=True))
            self.hyper_values = values
        if torch.is_tensor(lr):
            self.hyper[0].copy_(lr.reshape(()))
        return self.hyper


def _entry(optimizer, param, state, group) -> TensorEntry:
    entry = TensorEntry(local(param), local(state["exp_avg"]), local(state["exp_avg_sq"]),
                        optimizer._param_index[id(param)])
    if optimizer.capturable:
        entry.device_step = state["step"]
    if optimizer._kernel_mode(group) == "plain":
        return entry
    entry.cols = columns_of(param.shape)
    entry.gam, entry.threshold = local(state["gam"]), state["threshold"]
    entry.mask_bits = state.get("mask_bits")   # read in Stage II (None when capturable)
    if optimizer.mode == "mix":
        entry.fam, entry.column_factor = state["fam"], state["column_factor"]
        entry.key_base = key_base(optimizer.seed, entry.index)
        if optimizer.capturable:
            entry.stage_anchor = state["stage_anchor"]
    return entry


def mix_factor_table(update_steps: int, device) -> torch.Tensor:
    """``reference.mix_column_factor`` of every FAM value a Stage I can produce (0..us):
    the capturable selection gathers from it, so its factors are the reference's bits."""
    counts = torch.arange(update_steps + 1, dtype=torch.float32)
    return ref.mix_column_factor(counts, update_steps).to(device)
