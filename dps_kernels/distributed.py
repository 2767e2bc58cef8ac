"""DPS on sharded parameters (FSDP2 ``fully_shard``: dim-0-sharded DTensors), and refusals.

What the optimizer needs to know about a parameter that lives on several processes:

* ``local(t)``: the shard a kernel steps (``DTensor.to_local()``; any other tensor as is).
  A dim-0 shard is a run of whole rows, so flat element ``i`` of the shard lies in column
  ``i % cols`` of the full ``[rows, cols]`` view, exactly as in the full tensor: Mix
  keep-masks, FAM and the score factor (all per column) are complete on every shard.
* ``shard_group(param)``: the process group whose shards make up the whole tensor (the mesh
  dimension with ``Shard(0)``; other mesh dimensions must be ``Replicate``, as in HSDP).
* ``select_sharded``: the exact k-th largest score of each tensor over all its shards. The
  radix-select histograms of the local shards are summed with one ``all_reduce`` per pass
  for all tensors of a process group (3 collectives of ``tensors x 4096`` int64 counts,
  whatever the tensor sizes), never an all-gather of scores.
* ``refuse_flat(param, where)``: FSDP1 (``FlatParameter``, and the views
  ``use_orig_params=True`` hands out) and DeepSpeed ZeRO partitions do not give a DPS weight
  as a whole tensor or a row shard of one; a selection there could not be exact, so the
  optimizer refuses them with the reason and the remedy.

Importing this module imports no distributed code; DTensor is looked up when a tensor is.
"""
from __future__ import annotations

from typing import Optional

import torch

from .histogram_select import kth_largest_of_unions


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:   # pragma: no cover - torch built without distributed
        return None
    return DTensor


def is_sharded(t) -> bool:
    """True for a DTensor (what FSDP2 makes of a parameter, its gradient and its state)."""
    cls = _dtensor_type() if type(t) is not torch.Tensor else None
    return cls is not None and isinstance(t, cls)


def local(t):
    """The local shard of a DTensor; any other tensor (or None) unchanged."""
    return t.to_local() if is_sharded(t) else t


def shard_group(param):
    """The process group over which ``param``'s dim-0 shards are spread (None: not sharded).

    Raises for placements a row-wise selection cannot handle (``Shard(d)`` with d != 0,
    ``Partial``), naming them."""
    if not is_sharded(param):
        return None
    from torch.distributed.tensor import Replicate, Shard

    mesh = param.device_mesh
    shard_dims = [i for i, pl in enumerate(param.placements) if isinstance(pl, Shard)]
    ok = (len(shard_dims) == 1 and param.placements[shard_dims[0]].dim == 0
          and all(isinstance(pl, Replicate) for i, pl in enumerate(param.placements)
                  if i != shard_dims[0]))
    if not ok:
        raise ValueError(f"DPS needs parameters sharded on dim 0 (FSDP2's fully_shard), "
                         f"possibly replicated on other mesh dimensions (HSDP); got "
                         f"placements {param.placements}")
    return mesh.get_group(shard_dims[0])


def first_element(param) -> int:
    """The flat index, in the whole tensor, of the first element of ``param``'s local dim-0
    shard (0 when not sharded). ``Shard(0)`` splits rows like ``torch.chunk``: ``ceil(rows / n)``
    per process, the last ones shorter or empty. Checked against the local shard's length,
    so a layout that splits otherwise raises instead of hashing the wrong elements."""
    if not is_sharded(param):
        return 0
    import torch.distributed as dist
    group = shard_group(param)   # Shard(0): the parameter has a dim 0
    rows = param.shape[0]
    n, r = dist.get_world_size(group), dist.get_rank(group)
    chunk = -(-rows // n)
    start = min(r * chunk, rows)
    held = local(param).shape[0]
    if held != min(chunk, rows - start):
        raise ValueError(f"the local shard of a parameter of shape {tuple(param.shape)} holds "
                         f"{held} rows on rank {r} of {n}; DPS expects torch.chunk's split "
                         f"({min(chunk, rows - start)} rows from row {start})")
    return start * (param.numel() // rows if rows else 0)


def refuse_flat(param, where: str) -> None:
    """Raise for parameters whose DPS weight is not a whole tensor or a dim-0 shard."""
    try:
        from torch.distributed.fsdp._flat_param import FlatParameter
    except ImportError:   # pragma: no cover
        FlatParameter = ()
    if isinstance(param, FlatParameter) or getattr(param, "_fsdp_flattened", False):
        raise ValueError(
            f"{where} is an FSDP1 flat parameter (FullyShardedDataParallel, with or without "
            f"use_orig_params): its shards are slices of a flattened concatenation of several "
            f"weights, so no process holds a weight or whole rows of one, and neither the "
            f"per-tensor top-k nor the Mix masks can be exact. Use FSDP2 "
            f"(torch.distributed.fsdp.fully_shard), DDP, or one process")
    if hasattr(param, "ds_id") or hasattr(param, "ds_numel"):
        raise ValueError(
            f"{where} is a DeepSpeed ZeRO partition: ZeRO-3 splits a flattened weight across "
            f"processes and builds its own optimizer, so DPSAdamW cannot select over it. Use "
            f"FSDP2 (torch.distributed.fsdp.fully_shard) or DDP")


def sum_over(group):
    """A callback that sums a host int64 tensor in place over ``group`` (``all_reduce``;
    NCCL reduces device tensors only, so there it goes through the current device)."""
    import torch.distributed as dist

    def reduce(counts: torch.Tensor) -> None:
        if "nccl" in str(dist.get_backend(group)):
            on_device = counts.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(on_device, group=group)
            counts.copy_(on_device.cpu())
        else:
            dist.all_reduce(counts, group=group)
    return reduce


def select_sharded(items) -> list[float]:
    """Exact thresholds of sharded tensors: ``items`` = ``[(group, local_score, k, numel)]``.

    Tensors of one process group share one ``all_reduce`` per radix pass. Every process
    must call this with the same tensors in the same order (the optimizer's own order)."""
    out: list[Optional[float]] = [None] * len(items)
    by_group: dict = {}
    for i, (group, score, k, numel) in enumerate(items):
        by_group.setdefault(group, []).append(i)
    for group, indices in by_group.items():
        values = kth_largest_of_unions([[items[i][1]] for i in indices],
                                       [items[i][2] for i in indices], reduce=sum_over(group),
                                       totals=[items[i][3] for i in indices])
        for i, value in zip(indices, values):
            out[i] = value
    return out
