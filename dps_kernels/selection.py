"""Choosing subnetworks: the DPS selection at the end of each Stage I, and CHILD-TUNING_D's
one global subnetwork. Functions of a ``DPSAdamW`` (``opt``), split from ``optim.py`` because
they change for their own reasons (exactness, sharding, the packed layout).

* :func:`select`: per backend, one ``select_thresholds`` call for every tensor that closes
  Stage I, then the packed bits (and Mix's hand-over of the GAM buffer to W');
* :func:`select_sharded_tensors`: FSDP2 shards, exact over all shards (``distributed.py``);
* :func:`choose_child_network`: CHILD-TUNING_D's global top ``reserve_p`` over all DPS
  tensors together (``histogram_select.py``).
"""
from __future__ import annotations

import math
from fractions import Fraction

import torch

from . import checkpoint
from . import reference as ref
from .distributed import is_sharded, local, select_sharded, shard_group, sum_over
from .histogram_select import kth_largest_of_unions
from .mask_bits import num_words
from .schedule import selected_count

_steps_taken = checkpoint.steps_taken


def select(opt, due: list) -> None:
    """Choose the Stage II subnetworks right after the last Stage I step.

    ``due`` holds ``(param, group, state, backend)`` of every tensor that just closed
    Stage I; each backend gets all of its tensors in one ``select_thresholds`` call,
    which writes the thresholds into the state in place (their addresses stay put).
    """
    by_backend: dict[int, tuple[object, list]] = {}
    sharded = []
    for param, group, state, backend in due:
        if param.numel() == 0:
            continue   # nothing to select: its (empty) subnetwork is its (empty) tensor
        if opt.mode == "mix":
            state["column_factor"].copy_(
                ref.mix_column_factor(state["fam"], opt.update_steps))
        if is_sharded(param):
            sharded.append((param, group, state))
            continue
        by_backend.setdefault(id(backend), (backend, []))[1].append((param, group, state))
    if sharded:
        select_sharded_tensors(opt, sharded)
    for backend, entries in by_backend.values():
        items = [(state["gam"], state["column_factor"] if opt.mode == "mix" else None,
                  selected_count(param.numel(), group["p"]))
                 for param, group, state in entries]
        backend.select_thresholds(items, out=[state["threshold"] for _, _, state in entries])
        for (gam, factor, _), (param, _, state) in zip(items, entries):
            backend.pack_mask(gam, factor, state["threshold"], out=state["mask_bits"])
            if opt.mode == "mix":
                # The hand-over: GAM has been read for the last time this cycle; its
                # buffer holds W' (the Stage II anchor) from now to the next reset.
                gam.copy_(param.detach())

def select_sharded_tensors(opt, due: list) -> None:
    """The selection of sharded (FSDP2) tensors: the exact k-th largest over all shards,
    by radix select on local histograms summed over each tensor's shard group (one
    ``all_reduce`` per pass for all of them; ``distributed.select_sharded``). Every
    process runs this at the same step with the same tensors. No bits: the Stage II
    kernels recompute the mask from the local GAM; Mix snapshots W' into
    ``stage_anchor``."""
    items = []
    for param, group, state in due:
        gam = local(state["gam"])
        score = gam if opt.mode != "mix" else ref.mix_score(gam, state["column_factor"])
        items.append((shard_group(param), score, selected_count(param.numel(), group["p"]),
                      param.numel()))
    for (param, _, state), value in zip(due, select_sharded(items)):
        state["threshold"].fill_(value)
        if opt.mode == "mix":
            local(state["stage_anchor"]).copy_(local(param.detach()))


def choose_child_network(opt, fisher) -> float:
    """``DPSAdamW.set_child_network`` (see there); everything is checked before anything
    changes.

    Sharded (FSDP2) parameters take their Fisher as a DTensor laid out like them (what
    :func:`dps_kernels.child_tuning_fisher` gives on the sharded model): each process counts
    its shards into the radix-select histograms and one ``all_reduce`` per pass sums them over
    the shard group; an unsharded DPS tensor, whole on every process, is counted by the
    group's first process only. The checks that look at values agree over the group first,
    so every process raises the same error or none does."""
    if opt.mode != "childtuning_d":
        raise ValueError(f"set_child_network() belongs to mode='childtuning_d', this "
                         f"optimizer has mode={opt.mode!r}")
    targets = [(param, group) for group in opt.param_groups if group["dps"]
               for param in group["params"]]
    shard_groups = {shard_group(param) for param, _ in targets if is_sharded(param)}
    if len(shard_groups) > 1:
        raise ValueError(f"set_child_network(): the sharded DPS parameters are spread over "
                         f"{len(shard_groups)} different process groups; CHILD-TUNING_D's one "
                         f"threshold needs them sharded over one (one FSDP2 mesh)")
    over = shard_groups.pop() if shard_groups else None
    wheres, scores = [], []
    for param, group in targets:
        where = f"parameter #{opt._param_index[id(param)]} (shape {tuple(param.shape)})"
        if _steps_taken(opt.state.get(param, {})):
            raise RuntimeError(f"set_child_network(): {where} has already stepped; "
                               f"CHILD-TUNING_D fixes its subnetwork before training")
        value = fisher.get(param) if hasattr(fisher, "get") else None
        if value is None:
            raise ValueError(f"set_child_network(): fisher has no entry for DPS {where}")
        if (not torch.is_tensor(value) or not value.is_floating_point()
                or tuple(value.shape) != tuple(param.shape)):
            raise ValueError(f"set_child_network(): fisher of {where} must be a floating "
                             f"tensor of shape {tuple(param.shape)}, got "
                             f"{checkpoint._describe(value)}")
        if is_sharded(param) and not (
                is_sharded(value) and value.device_mesh == param.device_mesh
                and tuple(value.placements) == tuple(param.placements)):
            raise ValueError(f"set_child_network(): DPS {where} is sharded (FSDP2, placements "
                             f"{tuple(param.placements)}), so its fisher must be a DTensor "
                             f"laid out like it, e.g. from child_tuning_fisher on the sharded "
                             f"model; got {type(value).__name__}"
                             + (f" with placements {tuple(value.placements)}"
                                if is_sharded(value) else ""))
        if is_sharded(value) and not is_sharded(param):
            raise ValueError(f"set_child_network(): DPS {where} is not sharded, but its "
                             f"fisher is a DTensor")
        value = local(value).detach().to(device=param.device, dtype=torch.float32,
                                         memory_format=torch.contiguous_format, copy=True)
        wheres.append(where)
        scores.append(value.reshape(local(param).shape))
    bad = torch.tensor([int(not bool(torch.isfinite(v).all()) or bool((v < 0).any()))
                        for v in scores], dtype=torch.int64)
    if over is not None and len(bad):
        sum_over(over)(bad)   # a bad shard anywhere fails every process
    if len(bad) and bool(bad.any()):
        first = int(bad.nonzero()[0])
        raise ValueError(f"set_child_network(): fisher of {wheres[first]} must be finite "
                         f"and >= 0")
    total = sum(param.numel() for param, _ in targets)   # a DTensor's numel is the whole's
    if total == 0:
        raise ValueError("set_child_network(): the DPS parameters have no elements")
    k = max(1, min(total, math.ceil(total * Fraction(repr(opt.reserve_p)))))
    pieces = scores
    if over is not None:
        import torch.distributed as dist
        counted_here = dist.get_rank(over) == 0
        pieces = [score if is_sharded(param) or counted_here else score[:0]
                  for (param, _), score in zip(targets, scores)]
    threshold = kth_largest_of_unions([pieces], [k], totals=[total],
                                      reduce=sum_over(over) if over is not None else None)[0]
    for (param, group), score in zip(targets, scores):
        state = opt._init_state(param, group)
        state["threshold"] = torch.tensor(threshold, dtype=torch.float32,
                                          device=param.device)
        if is_sharded(param):
            # GAM laid out like the parameter; no bits (a shard's bits would not survive
            # resharding): the Stage II kernels compare the local GAM with the threshold.
            state["gam"] = torch.zeros_like(param, dtype=torch.float32)
            local(state["gam"]).copy_(score)
            continue
        state["gam"] = score
        state["mask_bits"] = torch.zeros(num_words(param.numel()), dtype=torch.int32,
                                         device=param.device)
        opt._backend_for(param).pack_mask(score, None, state["threshold"],
                                           out=state["mask_bits"])
    # Every other parameter's state too: the optimizer is then wholly initialized, as
    # torch.distributed.checkpoint expects of one with any state (its init step is skipped).
    for group in opt.param_groups:
        for param in group["params"]:
            opt._init_state(param, group)
    opt._invalidate_plans()
    return opt.selected_fraction()
