"""DPSAdamW checkpoints: what ``state_dict`` adds, what ``load_state_dict`` checks and restores.

State format 4 (``STATE_FORMAT``): host-scheduled Mix keeps W' in the GAM buffer during
Stage II (the subnetwork is in ``mask_bits``) and has no ``stage_anchor``; capturable and
FSDP2-sharded Mix keep GAM in ``gam`` and W' apart in ``stage_anchor``. Since format 4
every Mix state says which in its ``anchor_in_gam`` entry (1 or 0): the presence of keys
cannot tell, because ``torch.distributed.checkpoint``'s helpers hand ``load_state_dict``
the union of the saved keys and those of the loading optimizer's own state (which its
zero-lr init step created: all-zero ``mask_bits``, a ``stage_anchor`` copied from W0), or
only the latter (``dcp.load``). Formats 1-3 are told by their keys (a ``stage_anchor``
entry: W' apart) and converted on load. The packed subnetwork of a Dense or CHILD-TUNING_D
state is always packed again from GAM and the threshold on load, so stale or missing bits
never reach Stage II. Format 3 added to the ``"dps"`` entry the saved ids of the parameters
that had state (``params_with_state``), so a state missing from the checkpoint is told from
a parameter that never had a gradient.

``load_state_dict`` checks everything before anything changes (:func:`check_before_load`:
the DPS configuration, the format, the param groups and their hyperparameters, every
parameter's state: keys, shapes, dtypes, step, recoverability of Mix Stage II states), then
lets torch load, then undoes what torch's loader does to DPS state (it casts every floating
tensor to the parameter's dtype: GAM, FAM, thresholds, fp32 moments must stay fp32; it casts
the int32 bits too) and converts between layouts (step counters for capturable, the packed
bits, W'). Should that second part still fail, the optimizer gets its previous state back.
"""
from __future__ import annotations

import itertools
import math

import torch

from .distributed import is_sharded
from .mask_bits import num_words
from .mask_hash import columns_of

# 2: host-scheduled Mix keeps W' in the GAM buffer during Stage II and has no stage_anchor;
#    a state with a "stage_anchor" entry (format 1, or capturable) keeps GAM in "gam".
# 3: the "dps" entry lists the saved ids of the parameters that had state.
# 4: every Mix state carries ANCHOR_IN_GAM (which of the two layouts above it is in).
STATE_FORMAT = 4
READABLE_FORMATS = (1, 2, 3, 4)
ANCHOR_IN_GAM = "anchor_in_gam"   # Mix: 1 = W' in the GAM buffer in Stage II, 0 = apart
WITH_STATE = "params_with_state"   # the "dps" entry's list (not a setting to match)
GROUP_SETTINGS = "dps_settings"    # the settings in each saved param group (DCP drops "dps")
# What a saved param group must carry (torch's loader replaces the optimizer's groups with
# the saved ones, so a missing key would fail at the next step).
GROUP_KEYS = ("lr", "betas", "eps", "weight_decay", "p", "freeze", "dps")
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


def keeps_anchor_in_gam(opt, param) -> bool:
    """The Mix layout ``opt`` uses for ``param``: host-scheduled and unsharded keeps W' in
    the GAM buffer during Stage II (and the subnetwork in bits)."""
    return not opt.capturable and not is_sharded(param)


def saved_anchor_in_gam(state: dict) -> bool:
    """The Mix layout a saved state is in: its ``ANCHOR_IN_GAM`` entry (format 4), else the
    keys (formats 1-3: a ``stage_anchor`` entry means W' apart)."""
    marker = state.get(ANCHOR_IN_GAM)
    if marker is not None:
        return bool(int(marker))
    return "stage_anchor" not in state


def config(opt) -> dict:
    """The settings a state must have been saved with (``state_dict()["dps"]``)."""
    settings = {"format": STATE_FORMAT, "mode": opt.mode, "update_steps": opt.update_steps,
                "seed": opt.seed, "adamw_style": opt.adamw_style}
    if opt.reserve_p is not None:   # CHILD-TUNING modes
        settings["reserve_p"] = opt.reserve_p
    return settings


def state_dict(opt, torch_part: dict) -> dict:
    """``Optimizer.state_dict()`` plus the ``"dps"`` entry, and the settings once more in
    every param group (``GROUP_SETTINGS``): ``torch.distributed.checkpoint``'s
    ``get/set_optimizer_state_dict`` keep only ``state`` and ``param_groups``."""
    # torch keeps a key of optimizer.state that is not a parameter as it is (a str, say):
    # only the parameters' ids (ints) are listed.
    with_state = sorted(key for key in torch_part["state"] if isinstance(key, int))
    torch_part["dps"] = {**config(opt), WITH_STATE: with_state}
    for group in torch_part["param_groups"]:
        group[GROUP_SETTINGS] = config(opt)
    return torch_part


def load(opt, state_dict: dict, torch_load) -> None:
    """``opt.load_state_dict``: check, let torch (``torch_load``) load, restore."""
    torch_part = check_before_load(opt, state_dict)
    before = opt.state, opt.param_groups   # torch's loader replaces both, never edits them
    try:
        torch_load(torch_part)
        restore_after_load(opt, torch_part)
    except BaseException:
        opt.state, opt.param_groups = before
        raise
    finally:
        opt._invalidate_plans()


def check_before_load(opt, state_dict: dict) -> dict:
    """Refuse what cannot be loaded, before anything changes; returns the torch part."""
    saved = state_dict.get("dps") if isinstance(state_dict, dict) else None
    if not isinstance(saved, dict) and isinstance(state_dict, dict):
        # through torch.distributed.checkpoint: the settings travel in the param groups,
        # and the saved ids are the loader's own (so there is no list of ids to check)
        groups = state_dict.get("param_groups")
        if isinstance(groups, (list, tuple)) and groups and isinstance(groups[0], dict):
            saved = groups[0].get(GROUP_SETTINGS)
    if not isinstance(saved, dict):
        raise ValueError("this state_dict was not saved by DPSAdamW (no 'dps' entry)")
    _check_config(opt, saved)
    torch_part = {k: v for k, v in state_dict.items() if k != "dps"}
    pairs = _check_groups(opt, torch_part)
    # Before format 4 a Mix state's layout is told by its keys; through DCP's helpers those
    # keys are mixed with the loading optimizer's own (and so would be an
    # ANCHOR_IN_GAM entry it created), so neither tells: such states are not trusted.
    old_format = saved.get("format", STATE_FORMAT) < 4
    if old_format:
        torch_part["state"] = {key: ({k: v for k, v in value.items() if k != ANCHOR_IN_GAM}
                                     if isinstance(value, dict) else value)
                               for key, value in torch_part["state"].items()}
    layout_known = not (old_format and "dps" not in state_dict)
    states = torch_part["state"]
    with_state = saved.get(WITH_STATE)   # None before format 3: nothing to compare with
    if with_state is not None and not isinstance(with_state, (list, tuple)):
        raise ValueError(f"the 'dps' entry's {WITH_STATE!r} must be a list of parameter ids, "
                         f"got {with_state!r}")
    with_state = None if with_state is None else set(with_state)
    for saved_id, param, group in pairs:
        where = f"parameter #{opt._param_index[id(param)]} (shape {tuple(param.shape)})"
        if saved_id in states:
            _check_param_state(opt, where, param, group, states[saved_id], layout_known)
        elif with_state is not None and saved_id in with_state:
            raise ValueError(f"the state of {where} is missing, but it had state when saved "
                             f"(it had stepped): loading would restart it at step 0")
    return torch_part


def _check_config(opt, saved: dict) -> None:
    mine = config(opt)
    for key, value in saved.items():
        if key == WITH_STATE:
            continue
        if key == "format":
            if value not in READABLE_FORMATS:
                raise ValueError(f"cannot load a DPSAdamW state of format {value!r}: this "
                                 f"version reads formats {READABLE_FORMATS}")
        elif mine.get(key) != value:
            raise ValueError(f"cannot load a DPSAdamW state saved with {key}={value!r} into "
                             f"an optimizer built with {key}={mine.get(key)!r}")


def _check_groups(opt, torch_part: dict) -> list:
    """The saved groups against the optimizer's; ``[(saved_id, param, group)]``."""
    if not isinstance(torch_part.get("state"), dict):
        raise ValueError("this state_dict has no 'state' dict")
    if not isinstance(torch_part.get("param_groups"), (list, tuple)):
        raise ValueError("this state_dict has no 'param_groups' list")
    saved_groups = torch_part["param_groups"]
    if len(saved_groups) != len(opt.param_groups):
        raise ValueError(f"the state has {len(saved_groups)} param groups, the optimizer "
                         f"{len(opt.param_groups)}")
    pairs = []
    for index, (saved, group) in enumerate(zip(saved_groups, opt.param_groups)):
        what = f"param group #{index} of the state"
        missing = [key for key in GROUP_KEYS + ("params",) if key not in saved]
        if missing:
            raise ValueError(f"{what} has no {missing[0]!r}")
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(f"{what} has {len(saved['params'])} parameters, the optimizer's "
                             f"group #{index} {len(group['params'])}")
        if saved["dps"] != group["dps"]:
            raise ValueError(f"{what} has dps={saved['dps']!r}, the optimizer's group "
                             f"#{index} dps={group['dps']!r}")
        try:
            opt._check_group_values(saved)
        except (TypeError, ValueError) as error:
            raise type(error)(f"{what}: {error}") from None
        pairs += [(saved_id, param, group) for saved_id, param in zip(saved["params"],
                                                                         group["params"])]
    listed = {saved_id for saved_id, _, _ in pairs}
    if len(listed) != len(pairs):
        raise ValueError("the state's param groups list a parameter id twice")
    # a key that is not an id (torch's loader keeps it as it is) is not a parameter's
    stray = [key for key in torch_part["state"] if isinstance(key, int) and key not in listed]
    if stray:
        raise ValueError(f"the state has an entry for parameter id {stray[0]!r}, which no "
                         f"param group of the state lists")
    return pairs


def _expected_shapes(opt, param, group) -> dict:
    """Every state tensor a parameter of ``group`` needs, with its shape."""
    shape = tuple(param.shape)
    keys = {"exp_avg": shape, "exp_avg_sq": shape}
    if group["dps"] and opt.mode == "mixout":
        keys.update(anchor=shape)
    elif group["dps"] and opt.mode in ("dense", "mix", "childtuning_d"):
        keys.update(gam=shape, threshold=())   # childtuning_d: gam is the Fisher
        if opt.mode == "mix":
            cols = (columns_of(param.shape),)
            keys.update(fam=cols, column_factor=cols, anchor=shape)
    return keys


def _check_param_state(opt, where: str, param, group, state, layout_known=True) -> None:
    if not isinstance(state, dict):
        raise ValueError(f"the state of {where} is a {type(state).__name__}, not a dict")
    if "step" not in state:
        raise ValueError(f"the state of {where} has no 'step'")
    _check_step(where, state["step"])
    for key, shape in _expected_shapes(opt, param, group).items():
        if key not in state:
            raise ValueError(f"the state of {where} has no {key!r}")
        _check_tensor(where, key, state[key], shape)
    if not group["dps"]:
        return
    if opt.mode == "mix" and "stage_anchor" in state:   # W' apart: format 1, capturable
        _check_tensor(where, "stage_anchor", state["stage_anchor"], tuple(param.shape))
    marker = state.get(ANCHOR_IN_GAM)
    if opt.mode == "mix" and marker is not None:
        value = marker.item() if torch.is_tensor(marker) and marker.numel() == 1 else marker
        if isinstance(value, bool) or value not in (0, 1):
            raise ValueError(f"the state of {where}: {ANCHOR_IN_GAM!r} must be 0 or 1, got "
                             f"{_describe(marker)}")
    bits = state.get("mask_bits")   # optional: packed again on load when absent
    words = (num_words(param.numel()),)
    if bits is not None and not (torch.is_tensor(bits) and bits.dtype == torch.int32
                                 and tuple(bits.shape) == words):
        raise ValueError(f"the state of {where}: 'mask_bits' must be an int32 tensor of "
                         f"shape {words}, got {_describe(bits)}")
    if opt.mode == "mix":
        _check_mix_stage_two(opt, where, state, param, layout_known)


def _check_tensor(where: str, key: str, value, shape: tuple) -> None:
    if not torch.is_tensor(value) or not value.is_floating_point():
        raise ValueError(f"the state of {where}: {key!r} must be a floating-point tensor, "
                         f"got {_describe(value)}")
    if tuple(value.shape) != shape:
        raise ValueError(f"the state of {where}: {key!r} has shape {tuple(value.shape)}, "
                         f"expected {shape}")


def _check_step(where: str, step) -> None:
    if torch.is_tensor(step) and step.numel() == 1 and not step.is_complex():
        value = step.item()
    else:
        value = step
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value) and value >= 0 and value == int(value))
    if not ok:
        raise ValueError(f"the state of {where}: 'step' must be a count of steps (an int >= 0, "
                         f"or a one-element tensor holding one), got {_describe(step)}")


def _describe(value) -> str:
    if torch.is_tensor(value):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return repr(value)


def _check_mix_stage_two(opt, where: str, state: dict, param, layout_known=True) -> None:
    """A Mix state in Stage II needs W' and the subnetwork: a host-scheduled one holds W'
    in 'gam' (GAM itself is gone) and the subnetwork in bits; the others GAM in 'gam' and
    W' in 'stage_anchor'."""
    if not in_stage_two(state, opt.update_steps):
        return
    if not layout_known:
        raise ValueError(
            f"the state of {where} is a Mix Stage II state saved before state format 4 and "
            f"loaded through torch.distributed.checkpoint, whose helpers mix its keys with "
            f"this optimizer's own: where it keeps W' cannot be told. Load it with "
            f"optimizer.load_state_dict, or resume from a Stage I checkpoint")
    if not saved_anchor_in_gam(state):
        if "stage_anchor" not in state:
            raise ValueError(
                f"the state of {where} was saved in Mix Stage II with W' apart (by a "
                f"capturable or FSDP2 optimizer), but its 'stage_anchor' is missing: "
                f"torch.distributed.checkpoint's dcp.load reads only the keys of the "
                f"loading optimizer's own state, and a host-scheduled unsharded one has "
                f"none. Load it with set_optimizer_state_dict from get_optimizer_state_dict("
                f"..., options=StateDictOptions(full_state_dict=True)), or with "
                f"optimizer.load_state_dict, or resume from a Stage I checkpoint")
        return
    if "mask_bits" not in state and not (opt.capturable or is_sharded(param)):
        raise ValueError(f"the state of {where}: a Mix state saved in Stage II keeps W' in "
                         f"'gam' and the subnetwork in 'mask_bits', which is missing")
    if is_sharded(param):
        raise ValueError(
            f"the state of {where} was saved in Mix Stage II by an unsharded optimizer, which "
            f"keeps W' in the GAM buffer and the subnetwork in bits; a sharded (FSDP2) one "
            f"needs GAM there. Resume unsharded, or from a Stage I checkpoint")
    if opt.capturable:
        raise ValueError(
            f"the state of {where} was saved in Mix Stage II by a host-scheduled optimizer, "
            f"which keeps W' in the GAM buffer and the subnetwork in bits; a capturable "
            f"optimizer needs GAM there. Resume with capturable=False, or from a Stage I "
            f"checkpoint")


def restore_after_load(opt, state_dict: dict) -> None:
    """Undo torch's casts and convert layouts after ``Optimizer.load_state_dict``."""
    for group in opt.param_groups:
        # a run may be resumed with or without capturable: the flag is the optimizer's
        group["capturable"] = opt.capturable
        group.pop(GROUP_SETTINGS, None)
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
            anchor_in_gam = opt.mode == "mix" and saved_anchor_in_gam(state)
            if opt.mode == "mix":
                state[ANCHOR_IN_GAM] = int(keeps_anchor_in_gam(opt, param))
            if opt.capturable or is_sharded(param):
                # GAM in "gam", W' apart, no bits (check_before_load refused a Stage II
                # state that keeps W' in "gam" and the subnetwork only in bits)
                if opt.mode == "mix" and (anchor_in_gam or "stage_anchor" not in state):
                    # Stage I only: W' is taken at the next selection
                    state["stage_anchor"] = state["anchor"].clone()
                state.pop("mask_bits", None)
                continue
            if anchor_in_gam:
                # host-scheduled Mix: in Stage II "gam" holds W' and the bits are the only
                # record of the subnetwork (check_before_load made sure they are there); in
                # Stage I the bits are unused until the selection packs them again
                state.pop("stage_anchor", None)
                if "mask_bits" not in state:
                    state["mask_bits"] = torch.zeros(num_words(param.numel()),
                                                     dtype=torch.int32, device=param.device)
                continue
            # "gam" holds GAM: pack the subnetwork from it, always. Bits that came with the
            # state may be another optimizer's placeholder (torch.distributed.checkpoint's
            # helpers keep the loading optimizer's all-zero bits when the saved state has
            # none), and packing costs one pass.
            state["mask_bits"] = torch.zeros(num_words(param.numel()), dtype=torch.int32,
                                             device=param.device)
            factor = state["column_factor"] if opt.mode == "mix" else None
            opt._backend_for(param).pack_mask(state["gam"], factor, state["threshold"],
                                              out=state["mask_bits"])
            if opt.mode == "mix":
                # W' was apart: in Stage II the GAM buffer takes it (check_before_load made
                # sure it is there)
                anchor = state.pop("stage_anchor", None)
                if anchor is not None and in_stage_two(state, opt.update_steps):
                    state["gam"].copy_(anchor)
