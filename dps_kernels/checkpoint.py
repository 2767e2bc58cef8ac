"""DPSAdamW checkpoints: what ``state_dict`` adds, what ``load_state_dict`` checks and restores.

State format 2 (``STATE_FORMAT``): host-scheduled Mix keeps W' in the GAM buffer during
Stage II (the subnetwork is in ``mask_bits``) and has no ``stage_anchor``; a state with a
``stage_anchor`` entry (format 1, or saved by a capturable optimizer) keeps GAM in ``gam``.
Format 1 states are converted on load.

``load_state_dict`` checks what it can before anything changes (the DPS configuration, the
format, recoverability of Mix Stage II states), then lets torch load, then undoes what
torch's loader does to DPS state (it casts every floating tensor to the parameter's dtype:
GAM, FAM, thresholds, fp32 moments must stay fp32; it casts the int32 bits too) and converts
between layouts (step counters for capturable, the packed bits, W').
"""
from __future__ import annotations

import itertools

import torch

from .mask_bits import num_words

# 2: host-scheduled Mix keeps W' in the GAM buffer during Stage II and has no stage_anchor;
#    a state with a "stage_anchor" entry (format 1, or capturable) keeps GAM in "gam".
STATE_FORMAT = 2
READABLE_FORMATS = (1, 2)
# State that is fp32 whatever the parameter dtype: restored as saved by load_state_dict,
# where torch would cast it to the parameter's dtype.
FP32_STATE_KEYS = ("gam", "fam", "threshold", "column_factor")


def steps_taken(state: dict) -> int:
    """``state["step"]`` as an int (a device tensor when capturable: this syncs)."""
    step = state.get("step", 0)
    return int(step.item()) if torch.is_tensor(step) else step


def in_stage_two(state: dict, update_steps: int) -> bool:
    """The next step of this state is a Stage II step."""
    return steps_taken(state) % (2 * update_steps) >= update_steps


def config(opt) -> dict:
    """The settings a state must have been saved with (``state_dict()["dps"]``)."""
    return {"format": STATE_FORMAT, "mode": opt.mode, "update_steps": opt.update_steps,
            "seed": opt.seed, "adamw_style": opt.adamw_style}


def check_before_load(opt, state_dict: dict) -> dict:
    """Refuse what cannot be loaded, before anything changes; returns the torch part."""
    saved = state_dict.get("dps")
    if saved is None:
        raise ValueError("this state_dict was not saved by DPSAdamW (no 'dps' entry)")
    mine = config(opt)
    for key, value in saved.items():
        if key == "format":
            if value not in READABLE_FORMATS:
                raise ValueError(f"cannot load a DPSAdamW state of format {value!r}: this "
                                 f"version reads formats {READABLE_FORMATS}")
        elif mine.get(key) != value:
            raise ValueError(f"cannot load a DPSAdamW state saved with {key}={value!r} into "
                             f"an optimizer built with {key}={mine.get(key)!r}")
    if opt.mode == "mix":
        for index, state in state_dict["state"].items():
            if ("gam" not in state or "stage_anchor" in state
                    or not in_stage_two(state, opt.update_steps)):
                continue
            # A host-scheduled Mix state in Stage II: W' is in "gam", GAM itself is gone.
            if "mask_bits" not in state:
                raise ValueError(f"state of parameter #{index}: a Mix state saved in Stage II "
                                 f"keeps W' in 'gam' and the subnetwork in 'mask_bits', "
                                 f"which is missing")
            if opt.capturable:
                raise ValueError(
                    f"state of parameter #{index} was saved in Mix Stage II by a "
                    f"host-scheduled optimizer, which keeps W' in the GAM buffer and the "
                    f"subnetwork in bits; a capturable optimizer needs GAM there. Resume "
                    f"with capturable=False, or from a Stage I checkpoint")
    return {k: v for k, v in state_dict.items() if k != "dps"}


def restore_after_load(opt, state_dict: dict) -> None:
    """Undo torch's casts and convert layouts after ``Optimizer.load_state_dict``."""
    for group in opt.param_groups:
        # a run may be resumed with or without capturable: the flag is the optimizer's
        group["capturable"] = opt.capturable
        for param in group["params"]:
            state = opt.state.get(param)
            if state and "step" in state:
                steps = steps_taken(state)
                state["step"] = (torch.tensor(float(steps), dtype=torch.float32,
                                              device=param.device)
                                 if opt.capturable else steps)
    fp32_keys = FP32_STATE_KEYS + (("exp_avg", "exp_avg_sq") if opt.fp32_moments else ())
    saved_ids = itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"])
    params = itertools.chain.from_iterable(g["params"] for g in opt.param_groups)
    for saved_id, param in zip(saved_ids, params):
        saved = state_dict["state"].get(saved_id, {})
        for key in fp32_keys:
            if key in saved:
                opt.state[param][key] = saved[key].to(device=param.device,
                                                      dtype=torch.float32, copy=True)
        if "mask_bits" in saved:   # torch cast it to the param dtype: take the original
            opt.state[param]["mask_bits"] = saved["mask_bits"].to(
                device=param.device, dtype=torch.int32, copy=True)
    _restore_layout(opt)


def _restore_layout(opt) -> None:
    """The packed subnetwork must match GAM and the threshold, and Mix's W' must be where
    this optimizer reads it: states saved before the bits existed, or by a capturable
    optimizer, get the bits packed (from GAM) and W' moved into the GAM buffer (in Stage
    II); a capturable optimizer drops the bits and gets a separate W' (Stage I states only:
    check_before_load refused the others)."""
    for group in opt.param_groups:
        if not group["dps"]:
            continue
        for param in group["params"]:
            state = opt.state.get(param)
            if not state or "gam" not in state:
                continue
            if opt.capturable:
                if opt.mode == "mix" and "stage_anchor" not in state:
                    state["stage_anchor"] = state["anchor"].clone()
                state.pop("mask_bits", None)
                continue
            bits = state.get("mask_bits")
            if (bits is None or bits.dtype != torch.int32
                    or bits.numel() != num_words(param.numel())):
                state["mask_bits"] = torch.zeros(num_words(param.numel()), dtype=torch.int32,
                                                 device=param.device)
                factor = state["column_factor"] if opt.mode == "mix" else None
                opt._backend_for(param).pack_mask(state["gam"], factor, state["threshold"],
                                                  out=state["mask_bits"])
            if opt.mode == "mix" and "stage_anchor" in state:
                # "gam" is GAM (the bits were packed from it above) and W' is separate: in
                # Stage II the GAM buffer takes W'.
                anchor = state.pop("stage_anchor")
                if in_stage_two(state, opt.update_steps):
                    state["gam"].copy_(anchor)
