"""The optimizer's modes and the checks of their fractions: which mode takes ``p`` (dropped)
and which ``reserve_p`` (kept), and what each defaults to. Used by ``DPSAdamW`` and the
Trainer integration."""
from __future__ import annotations

import math

MODES = ("dense", "mix", "mixout", "childtuning_d", "childtuning_f")
# The DPS modes proper: cyclic stages, a selection at the end of each Stage I.
CYCLIC_MODES = ("dense", "mix")
# Modes whose subnetwork is chosen by CHILD-TUNING's reserve_p (the fraction KEPT).
CHILD_MODES = ("childtuning_d", "childtuning_f")
DEFAULT_P = 0.3
DEFAULT_RESERVE_P = 0.3


# torch.optim.AdamW's wording for the arguments it shares with DPSAdamW: code and tests
# written against AdamW's errors match ours; the rest of the message gives the range.
ADAMW_WORDING = {"lr": "Invalid learning rate", "eps": "Invalid epsilon value",
                 "weight_decay": "Invalid weight_decay value",
                 "betas[0]": "Invalid beta parameter at index 0",
                 "betas[1]": "Invalid beta parameter at index 1"}


def check_number(name, value, low, high=None, low_open=False, high_closed=False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low)
    ok = ok and (high is None or (value <= high if high_closed else value < high))
    if not ok:
        bound = (f"{'(' if low_open else '['}{low}, "
                 f"{high if high is not None else 'inf'}{']' if high_closed else ')'}")
        if name in ADAMW_WORDING:
            raise ValueError(f"{ADAMW_WORDING[name]}: {value} ({name} must be a finite number "
                             f"in {bound})")
        raise ValueError(f"{name} must be a finite number in {bound}, got {value!r}")


def mode_fractions(mode: str, p, reserve_p) -> tuple:
    """``(p, reserve_p)`` of a mode: DPS and Mixout take ``p`` (dropped), CHILD-TUNING takes
    ``reserve_p`` (kept); the other one is refused, so the two are never confused. The
    CHILD-TUNING modes store ``p = 0`` in their groups (unused)."""
    if mode in CHILD_MODES:
        if p is not None:
            raise ValueError(f"mode={mode!r} takes reserve_p (the fraction KEPT), not p (the "
                             f"fraction dropped); got p={p!r}")
        reserve_p = DEFAULT_RESERVE_P if reserve_p is None else reserve_p
        check_number("reserve_p", reserve_p, 0, 1, low_open=True, high_closed=True)
        return 0.0, float(reserve_p)
    if reserve_p is not None:
        raise ValueError(f"reserve_p belongs to the CHILD-TUNING modes {CHILD_MODES}; "
                         f"mode={mode!r} takes p (the fraction dropped), got "
                         f"reserve_p={reserve_p!r}")
    return (DEFAULT_P if p is None else p), None
