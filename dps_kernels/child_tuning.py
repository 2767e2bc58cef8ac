"""CHILD-TUNING_D's Fisher pass (Xu et al., EMNLP 2021), the input of ``set_child_network``.

The official code (``alibaba/AliceMind``, ``ChildTuning/``) runs one pass over the training
data before training: per batch, forward, backward, clip each targeted parameter's gradient
on its own to ``max_grad_norm``, and add ``g**2 / N`` (``N`` = number of batches). This
function does the same on any model, with the loss computed by ``loss_fn(model, batch)``.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
from torch import nn


def child_tuning_fisher(model: nn.Module, batches: Iterable, loss_fn: Callable,
                        params: Optional[Iterable[torch.Tensor]] = None,
                        max_grad_norm: Optional[float] = None) -> dict:
    """Mean over ``batches`` of the squared gradient of every parameter in ``params``.

    Args:
        model: switched to training mode for the pass (as the official code), then back.
        batches: an iterable of batches; a sized one (``len``) is accumulated as
            ``g**2 / N`` per batch like the official code, any other as a sum divided at
            the end.
        loss_fn: ``loss_fn(model, batch) -> scalar loss``.
        params: the targeted parameters (default: every parameter that requires grad).
        max_grad_norm: clip each parameter's gradient separately to this norm before
            squaring (the official code passes its ``max_grad_norm``); None: no clipping.

    Returns ``{param: fp32 tensor of param's shape}``. Gradients are cleared before and
    after (``grad = None``).
    """
    params = [p for p in (model.parameters() if params is None else params) if p.requires_grad]
    if not params:
        raise ValueError("child_tuning_fisher(): no parameter requires grad")
    count = len(batches) if hasattr(batches, "__len__") else None
    if count == 0:
        raise ValueError("child_tuning_fisher(): batches is empty")
    fisher = {p: torch.zeros_like(p, dtype=torch.float32) for p in params}
    was_training = model.training
    model.train()
    model.zero_grad(set_to_none=True)
    seen = 0
    try:
        for batch in batches:
            loss = loss_fn(model, batch)
            loss.backward()
            for p in params:
                if p.grad is None:
                    continue
                if max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(p, max_grad_norm)
                g2 = p.grad.float() ** 2
                fisher[p] += g2 / count if count is not None else g2
            model.zero_grad(set_to_none=True)
            seen += 1
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if seen == 0:
        raise ValueError("child_tuning_fisher(): batches is empty")
    if count is None:
        for value in fisher.values():
            value /= seen
    return fisher
