"""Algorithm 1's schedule: stages, stage starts, update-step resolution, k."""
import pytest

from dps_kernels.schedule import (STAGE_ONE, STAGE_TWO, cycle_of, is_last_of_stage_one,
                                  is_stage_start, resolve_update_steps, selected_count,
                                  stage_of, stage_start)


def test_stages_follow_ceil_t_over_us():
    us = 3
    expected = [1, 1, 1, 2, 2, 2, 1, 1, 1, 2, 2, 2, 1]
    assert [stage_of(t, us) for t in range(1, 14)] == expected
    assert [cycle_of(t, us) for t in range(1, 8)] == [1, 1, 1, 2, 2, 2, 3]
    assert [t for t in range(1, 14) if is_stage_start(t, us)] == [1, 4, 7, 10, 13]
    assert [t for t in range(1, 14) if is_last_of_stage_one(t, us)] == [3, 9]
    assert [stage_start(t, us) for t in (1, 2, 3, 4, 6, 7)] == [1, 1, 1, 4, 4, 7]


def test_one_step_stages_alternate():
    assert [stage_of(t, 1) for t in range(1, 6)] == [STAGE_ONE, STAGE_TWO] * 2 + [STAGE_ONE]
    assert all(is_stage_start(t, 1) for t in range(1, 6))


def test_schedule_keeps_cycling_past_total_steps():
    us = resolve_update_steps(total_steps=20, update_ratio=0.25)  # 5
    assert us == 5
    assert stage_of(21, us) == STAGE_ONE and stage_of(26, us) == STAGE_TWO
    assert stage_of(10_001, us) == STAGE_ONE


def test_update_steps_resolution():
    assert resolve_update_steps(update_steps=7) == 7
    assert resolve_update_steps(total_steps=468, update_ratio=0.05) == 23  # RTE: int(23.4)
    assert resolve_update_steps(total_steps=1605, update_ratio=0.05) == 80  # CoLA
    # update_steps wins over the ratio
    assert resolve_update_steps(total_steps=100, update_ratio=0.5, update_steps=3) == 3


@pytest.mark.parametrize("kwargs, match", [
    (dict(), "update_steps, or both total_steps and update_ratio"),
    (dict(total_steps=100), "update_ratio=None"),
    (dict(update_ratio=0.1), "total_steps=None"),
    (dict(total_steps=10, update_ratio=0.05), r"int\(10 \* 0.05\) = 0 < 1"),
    (dict(update_steps=0), "update_steps must be >= 1, got 0"),
    (dict(total_steps=-5, update_ratio=0.1), "total_steps must be a positive int, got -5"),
    (dict(total_steps=100, update_ratio=1.5), r"update_ratio must be a number in \(0, 1\], got 1.5"),
])
def test_bad_update_steps_are_explained(kwargs, match):
    with pytest.raises(ValueError, match=match):
        resolve_update_steps(**kwargs)


def test_update_steps_type():
    with pytest.raises(TypeError, match="update_steps must be an int"):
        resolve_update_steps(update_steps=2.5)


def test_steps_are_one_based():
    with pytest.raises(ValueError, match="1-based"):
        stage_of(0, 3)


@pytest.mark.parametrize("n, p, k", [(10, 0.3, 7), (1, 0.3, 1), (1, 0.0, 1), (7, 0.99, 1),
                                     (1000, 0.999, 1), (91, 0.3, 64), (100, 0.0, 100),
                                     (3, 0.5, 2)])
def test_selected_count_is_exact_ceiling(n, p, k):
    assert selected_count(n, p) == k
