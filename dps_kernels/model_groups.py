"""Param groups for ``DPSAdamW.from_model``: which weights are DPS, which get weight decay.

Defaults follow the authors (DPS on the weight of every ``nn.Linear``: query, key, value,
attention output, intermediate, output, pooler, classifier) and the Hugging Face decay
convention (no decay on biases and normalisation-layer weights).
"""
from __future__ import annotations

import fnmatch
from typing import Iterable, Optional

import torch
from torch import nn

_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm,
               nn.modules.instancenorm._InstanceNorm)


def _is_norm(module: nn.Module) -> bool:
    # Many model libraries define their own RMSNorm/LayerNorm classes; match those by name.
    return isinstance(module, _NORM_TYPES) or "norm" in type(module).__name__.lower()


def _split_targets(targets) -> tuple[tuple[type, ...], tuple[str, ...]]:
    if targets is None:
        return (nn.Linear,), ()
    if isinstance(targets, (str, type)):
        targets = [targets]
    types, patterns = [], []
    for target in targets:
        if isinstance(target, type) and issubclass(target, nn.Module):
            types.append(target)
        elif isinstance(target, str):
            patterns.append(target)
        else:
            raise TypeError(f"targets must hold nn.Module subclasses or fnmatch patterns on "
                            f"parameter names, got {target!r}")
    return tuple(types), tuple(patterns)


def dps_parameter_names(model: nn.Module, targets=None) -> set[str]:
    """Full names of the parameters that ``targets`` selects for DPS."""
    types, patterns = _split_targets(targets)
    names = set()
    for module_name, module in model.named_modules():
        if types and isinstance(module, types):
            weight = module._parameters.get("weight")
            if weight is not None and weight.requires_grad:
                names.add(f"{module_name}.weight" if module_name else "weight")
    if patterns:
        for name, param in model.named_parameters():
            if param.requires_grad and any(fnmatch.fnmatchcase(name, pat) for pat in patterns):
                names.add(name)
    return names


def no_decay_parameter_names(model: nn.Module, no_decay: Optional[Iterable[str]] = None) -> set[str]:
    """Names without weight decay: ``no_decay`` patterns, or biases and norm weights."""
    if no_decay is not None:
        if isinstance(no_decay, str):
            no_decay = [no_decay]
        patterns = list(no_decay)
        return {name for name, _ in model.named_parameters()
                if any(fnmatch.fnmatchcase(name, pat) for pat in patterns)}
    names = set()
    for module_name, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{pname}" if module_name else pname
            if pname == "bias" or _is_norm(module):
                names.add(full)
    return names


def build_param_groups(model: nn.Module, *, targets=None, no_decay=None,
                       weight_decay: float = 1e-2) -> list[dict]:
    """Up to four groups: DPS / plain x decay / no decay, trainable parameters only."""
    dps_names = dps_parameter_names(model, targets)
    if not dps_names:
        raise ValueError(f"targets={targets!r} selects no trainable parameter of the model")
    nd_names = no_decay_parameter_names(model, no_decay)
    buckets: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():  # tied weights appear once
        if not param.requires_grad:
            continue
        key = (name in dps_names, name not in nd_names)
        buckets.setdefault(key, []).append(param)
    groups = []
    for (dps, decay), params in sorted(buckets.items(), reverse=True):
        groups.append({"params": params, "dps": dps,
                       "weight_decay": weight_decay if decay else 0.0})
    return groups
