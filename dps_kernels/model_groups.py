"""Param groups for ``DPSAdamW.from_model``: which weights are DPS, which get weight decay.

Defaults follow the authors (DPS on the weight of every ``nn.Linear``: query, key, value,
attention output, intermediate, output, pooler, classifier), extended to the other layers
that hold a transformer's projections (``nn.MultiheadAttention``'s input projections,
transformers' ``Conv1D`` in GPT-2), and the Hugging Face decay convention (no decay on
biases and normalisation-layer weights). Parameters are selected by identity, so a tied
weight is DPS once, whichever module registered it first.
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


# The default target layers and the parameters of each that are DPS. transformers' Conv1D
# (GPT-2's projections, weight [in, out]) is matched by its class without importing
# transformers; nn.MultiheadAttention's input projections are plain parameters of the
# attention module (its out_proj is an nn.Linear).
_MHA_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
DEFAULT_TARGETS = "nn.Linear, nn.MultiheadAttention projections, transformers Conv1D"


def _is_transformers_conv1d(module: nn.Module) -> bool:
    return any(cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")
               for cls in type(module).__mro__)


def _target_weight_names(module: nn.Module, types: tuple, default: bool) -> tuple[str, ...]:
    """Names of ``module``'s own parameters that are DPS as a target layer."""
    if isinstance(module, nn.MultiheadAttention) and (default or isinstance(module, types)):
        return _MHA_WEIGHTS
    if (types and isinstance(module, types)) or (default and _is_transformers_conv1d(module)):
        return ("weight",)
    return ()


def _split_targets(targets) -> tuple[tuple[type, ...], tuple[str, ...], bool]:
    """``(module types, name patterns, default)``."""
    if targets is None:
        return (nn.Linear,), (), True
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
    return tuple(types), tuple(patterns), False


def dps_parameters(model: nn.Module, targets=None) -> dict[int, str]:
    """``{id(param): name}`` of the trainable parameters ``targets`` selects for DPS.

    Selected by identity, not by name: a weight tied into several modules (an LM head tied
    to its input embedding) is listed once by ``named_parameters()``, under the name of
    the module that registered it first, and is DPS when any target layer owns it (or any
    of its names matches a pattern). Its name here is the one ``named_parameters()``
    gives."""
    types, patterns, default = _split_targets(targets)
    first_name = {id(param): name for name, param in model.named_parameters()}
    chosen: dict[int, str] = {}
    for module in model.modules():
        for pname in _target_weight_names(module, types, default):
            param = module._parameters.get(pname)
            if param is not None and param.requires_grad:
                chosen[id(param)] = first_name[id(param)]
    if patterns:
        for name, param in model.named_parameters(remove_duplicate=False):
            if param.requires_grad and any(fnmatch.fnmatchcase(name, pat) for pat in patterns):
                chosen[id(param)] = first_name[id(param)]
    return chosen


def dps_parameter_names(model: nn.Module, targets=None) -> set[str]:
    """Names (as ``named_parameters()`` gives them) of the parameters ``targets`` selects."""
    return set(dps_parameters(model, targets).values())


def owners(model: nn.Module) -> dict[int, list[tuple[str, nn.Module]]]:
    """``{id(param): [(module name, module), ...]}``: every module that registers it."""
    out: dict[int, list] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param in module._parameters.values():
            if param is not None:
                out.setdefault(id(param), []).append((module_name, module))
    return out


def no_dps_target_message(model: nn.Module, targets) -> str:
    """Why nothing is DPS, what the model has, and the remedy."""
    kinds = sorted({type(m).__name__ for m in model.modules()
                    if any(p is not None and p.requires_grad
                           for p in m._parameters.values())})
    shown = ", ".join(kinds[:12]) + (", ..." if len(kinds) > 12 else "")
    chosen = DEFAULT_TARGETS if targets is None else repr(targets)
    layers = [m for m in model.modules() if m._parameters and not _is_norm(m)]
    example = type(layers[0]) if layers else nn.Linear
    example = (f"nn.{example.__name__}" if getattr(nn, example.__name__, None) is example
               else example.__name__)
    return (f"{type(model).__name__}: targets={chosen} select no trainable parameter, so DPS "
            f"would train nothing (plain AdamW). Its layers with trainable parameters: "
            f"{shown}. Name the layers to train with DPS in targets=, module types and/or "
            f"fnmatch patterns on parameter names, e.g. targets=[{example}]")


def refuse_unwired_mix_targets(model: nn.Module, dps_ids: dict, mode: str) -> None:
    """Mix and Mixout mix a DPS weight inside the forward of the module that owns it, with
    column masks along its input features (the last axis of an ``[out, in]`` weight).
    Refused, with the reason, where that would be wrong: transformers' ``Conv1D`` keeps
    its input features on axis 0 (``[in, out]``), and a weight tied into several modules
    would be mixed in one forward and not in the other."""
    for pid, where in owners(model).items():
        if pid not in dps_ids:
            continue
        name = dps_ids[pid]
        if len(where) > 1:
            places = ", ".join(f"{n or '<root>'} ({type(m).__name__})" for n, m in where)
            raise ValueError(
                f"mode={mode!r}: DPS parameter {name!r} is tied into several modules "
                f"({places}); Mix would mix it in one module's forward only. Use "
                f"mode='dense', or leave it out of DPS with targets= patterns that do not "
                f"select it")
        module = where[0][1]
        if _is_transformers_conv1d(module):
            raise ValueError(
                f"mode={mode!r}: DPS parameter {name!r} is the weight of a transformers Conv1D "
                f"([in, out]: its input features are axis 0), which the Mix kernels do not "
                f"take yet (they mask the last axis). Use mode='dense', or targets= that "
                f"leave Conv1D out")


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
    dps_ids = dps_parameters(model, targets)
    if not dps_ids:
        raise ValueError(no_dps_target_message(model, targets))
    nd_names = no_decay_parameter_names(model, no_decay)
    buckets: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():  # tied weights appear once
        if not param.requires_grad:
            continue
        key = (id(param) in dps_ids, name not in nd_names)
        buckets.setdefault(key, []).append(param)
    groups = []
    for (dps, decay), params in sorted(buckets.items(), reverse=True):
        groups.append({"params": params, "dps": dps,
                       "weight_decay": weight_decay if decay else 0.0})
    return groups
