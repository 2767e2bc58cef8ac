"""The checks of ``DPSAdamW``'s hyperparameters and param-group keys, as torch.optim does them.

``torch.optim.AdamW`` checks its hyperparameters before it looks at ``params`` (torch's own
optimizer tests build optimizers with ``params=None`` to see the error), accepts a
one-element tensor ``lr`` (kept as a tensor, so LR schedulers update it in place) and
one-element tensor betas (turned into floats). ``DPSAdamW`` does the same, with AdamW's
messages for the arguments AdamW has, each naming the argument and the value.

A param group may carry the per-group keys (``GROUP_KEYS``) and any key of the user's own
(torch allows them, LR schedulers add ``initial_lr``); the optimizer-level settings are
refused there, because ``step()`` never reads them from a group: a ``"mode"`` or
``"seed"`` in a group would otherwise be ignored without a word.
"""
from __future__ import annotations

import torch

from .checkpoint import GROUP_KEYS
from .modes import check_number

# Keyword arguments of DPSAdamW that hold for the whole optimizer (capturable, also an
# optimizer setting, is refused by DPSAdamW._validate_group with its own message).
OPTIMIZER_SETTINGS = ("mode", "total_steps", "update_ratio", "update_steps", "adamw_style",
                      "seed", "backend", "fp32_moments", "reserve_p")
# torch.optim.AdamW options that change the update and that DPSAdamW does not implement:
# refused when set (their falsy values are what DPSAdamW does anyway).
UNSUPPORTED_ADAMW_OPTIONS = ("amsgrad", "maximize")


def scalar_betas(betas):
    """The constructor's betas, one-element tensors turned into floats as AdamW does."""
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    tensors = [torch.is_tensor(b) for b in betas]
    if any(tensors) and not all(tensors):
        raise ValueError(f"betas must be either both floats or both Tensors, got {betas!r}")
    for index, beta in enumerate(betas):
        if torch.is_tensor(beta) and beta.numel() != 1:
            raise ValueError(f"Tensor betas[{index}] must be 1-element, got a tensor of shape "
                             f"{tuple(beta.shape)}")
    return tuple(b.item() if torch.is_tensor(b) else b for b in betas)


def check_group_keys(group: dict) -> None:
    """Refuse optimizer-level settings and unsupported AdamW options in a param group."""
    for key in OPTIMIZER_SETTINGS:
        if key in group:
            raise ValueError(
                f"{key}={group[key]!r} was given in a param group, but {key} is set per "
                f"optimizer: pass it to DPSAdamW(..., {key}=...) (per-group keys: "
                f"{', '.join(GROUP_KEYS)})")
    for key in UNSUPPORTED_ADAMW_OPTIONS:
        if group.get(key):
            raise ValueError(f"{key}={group[key]!r} (a torch.optim.AdamW option) was given in "
                             f"a param group; DPSAdamW does not implement {key}")


def check_group_values(group: dict) -> None:
    """The hyperparameters of a group (also of a group being loaded from a state)."""
    check_group_keys(group)
    lr = group["lr"]
    if torch.is_tensor(lr):
        if lr.numel() != 1:
            raise ValueError(f"Tensor lr must be 1-element, got a tensor of shape "
                             f"{tuple(lr.shape)}")
        lr = lr.item()
    check_number("lr", lr, 0.0)
    check_number("eps", group["eps"], 0.0)
    check_number("weight_decay", group["weight_decay"], 0.0)
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for index, beta in enumerate(betas):
        if torch.is_tensor(beta):   # the constructor turns them into floats; a group cannot
            raise ValueError(f"betas[{index}] of a param group must be a float, got {beta!r} "
                             f"(tensor betas are taken by DPSAdamW(betas=...) only)")
        check_number(f"betas[{index}]", beta, 0.0, 1.0)
    check_number("p", group["p"], 0.0, 1.0)
    for flag in ("freeze", "dps"):
        if not isinstance(group[flag], bool):
            raise TypeError(f"{flag} must be a bool, got {group[flag]!r}")
