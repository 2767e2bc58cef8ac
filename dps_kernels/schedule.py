"""The cyclic two-stage schedule of DPS (Algorithm 1 of the paper), as pure functions.

A run is a sequence of 1-based optimizer steps ``t``. With ``us`` update steps per
stage, the cycle index is ``c = ceil(t / us)``; odd cycles are Stage I (accumulate
Fisher information, update everything), even cycles are Stage II (update only the
selected subnetwork). The cycle keeps repeating past ``total_steps``.
"""
from __future__ import annotations

import functools
import math
from fractions import Fraction

STAGE_ONE = 1
STAGE_TWO = 2


def resolve_update_steps(total_steps=None, update_ratio=None, update_steps=None) -> int:
    """Steps per stage: ``update_steps`` if given, else ``int(total_steps * update_ratio)``.

    Truncation follows the authors' code. A result below 1 is an error, because a
    stage of zero steps has no meaning.
    """
    if update_steps is not None:
        if isinstance(update_steps, bool) or not isinstance(update_steps, int):
            raise TypeError(f"update_steps must be an int, got {update_steps!r}")
        if update_steps < 1:
            raise ValueError(f"update_steps must be >= 1, got {update_steps}")
        return update_steps
    if total_steps is None or update_ratio is None:
        raise ValueError(
            "DPS needs the stage length: pass update_steps, or both total_steps and "
            f"update_ratio (got total_steps={total_steps!r}, update_ratio={update_ratio!r})"
        )
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
    if not (isinstance(update_ratio, (int, float)) and 0.0 < update_ratio <= 1.0):
        raise ValueError(f"update_ratio must be a number in (0, 1], got {update_ratio!r}")
    us = int(total_steps * update_ratio)
    if us < 1:
        raise ValueError(
            f"update_steps = int(total_steps * update_ratio) = int({total_steps} * {update_ratio}) "
            f"= {us} < 1; raise total_steps or update_ratio, or pass update_steps"
        )
    return us


def _check_step(t: int) -> None:
    if t < 1:
        raise ValueError(f"steps are 1-based, got t={t}")


def cycle_of(t: int, us: int) -> int:
    """1-based cycle index of step ``t``: ``ceil(t / us)``."""
    _check_step(t)
    return -(-t // us)


def stage_of(t: int, us: int) -> int:
    """``STAGE_ONE`` when the cycle of step ``t`` is odd, else ``STAGE_TWO``."""
    return STAGE_ONE if cycle_of(t, us) % 2 == 1 else STAGE_TWO


def is_stage_start(t: int, us: int) -> bool:
    """True when step ``t`` is the first step of its stage."""
    _check_step(t)
    return (t - 1) % us == 0


def stage_start(t: int, us: int) -> int:
    """The first step of the stage that contains step ``t``."""
    _check_step(t)
    return t - (t - 1) % us


def is_last_of_stage_one(t: int, us: int) -> bool:
    """True when step ``t`` closes a Stage I, so the subnetwork is chosen right after it."""
    return stage_of(t, us) == STAGE_ONE and t % us == 0


@functools.lru_cache(maxsize=4096)   # called per tensor at every stage boundary
def selected_count(n: int, p: float) -> int:
    """``k = ceil(n * (1 - p))``: how many elements Stage II keeps (at least one when n > 0).

    Computed exactly from the shortest decimal form of ``p`` (``repr``), so that
    ``p=0.3, n=10`` gives 7 and not the 8 that ``ceil(10 * (1 - 0.3))`` gives in binary
    floating point.
    """
    return math.ceil(n * (1 - Fraction(repr(float(p)))))
