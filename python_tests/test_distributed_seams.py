"""FSDP2 seams where a sharded run once trained differently from one process without a
word (gloo, CPU, spawned processes; the model and batches of ``dist_worker.py``).

* Between ``backward()`` and ``step()`` a Mix/Mixout gradient must already be ``g * M``,
  as in one process: ``clip_grad_norm_`` (the Trainer's and accelerate's default) read the
  unmasked sharded gradient (norm 0.857 against 0.803 at step 1), and an eval forward there
  (a metric) dropped the mask (118/62/6 elements of the subnetworks differed).
* A sharded 1-D DPS parameter in Mix (``targets=[nn.Linear, nn.LayerNorm]``) failed at the
  first forward with an internal reshape message; it is refused when the optimizer is built.
* Full optimizer state dicts cross between FSDP2 and one process through torch's DCP
  helpers exactly, or are refused (a one-process Mix Stage II state keeps W' in the GAM
  buffer, which a sharded optimizer needs for GAM).

The reference is the single-process run: subnetworks equal at every selection, gradients
after ``backward()`` and weights within 1e-6 (the reduce-scatter's rounding; see
test_distributed.py).
"""
from __future__ import annotations

import sys

import pytest
import torch
import torch.multiprocessing as mp

import dist_worker as w
from test_distributed import HERE, WEIGHT_ATOL, backends, free_port, pytestmark  # noqa: F401


def spawn(target, world, *args):
    sys.path.insert(0, HERE)
    mp.spawn(target, args=(world, free_port(), *args), nprocs=world)


def single_process(backend, mode, variant):
    model = w.make_model()
    return w.train(model, w.build_seam(model, mode, backend), variant=variant)


def assert_same_run(got, ref, what, masks_expected=True):
    assert sorted(got["masks"]) == sorted(ref["masks"]), what
    assert bool(ref["masks"]) == masks_expected, what
    for t in ref["masks"]:
        for a, b in zip(ref["masks"][t], got["masks"][t]):
            assert torch.equal(a, b), f"{what}: subnetwork at step {t}"
    for key in ("grads", "weights") if "grads" in ref else ("weights",):
        for step, (rs, gs) in enumerate(zip(ref[key], got[key]), start=1):
            for a, b in zip(rs, gs):
                torch.testing.assert_close(b, a, rtol=0, atol=WEIGHT_ATOL,
                                           msg=lambda m: f"{what}: {key} at step {step}: {m}")
    if "norms" in ref:
        assert got["norms"] == pytest.approx(ref["norms"], rel=1e-5), what


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_mix_gradients_are_masked_before_step(world, tmp_path):
    """clip_grad_norm_ and an eval forward between backward() and step()."""
    names = backends() if world == 2 else ["torch"]
    combos = [(b, m, v) for b in names for m in ("mix", "mixout") for v in ("clip", "eval")]
    out = str(tmp_path / "seams.pt")
    spawn(w.run_seams, world, out, combos)
    results = torch.load(out)
    for backend, mode, variant in combos:
        what = f"{backend}/{mode}/{variant}/world {world}"
        ref = single_process(backend, mode, variant)
        assert min(ref["norms"]) > w.CLIP, "clipping must act at every step"
        assert_same_run(results[(backend, mode, variant)], ref, what,
                        masks_expected=mode == "mix")


def test_sharded_one_dimensional_mix_parameters_are_refused_when_built(tmp_path):
    out = str(tmp_path / "refusals")
    spawn(w.run_refusals, 2, out)
    ranks = [torch.load(f"{out}.rank{r}") for r in range(2)]
    assert ranks[0] == ranks[1]
    for mode in ("mix", "mixout"):
        message = ranks[0][mode]
        assert message is not None, mode
        assert "needs DPS parameters of 2 or more dimensions" in message, message
        assert "shape (29,)" in message and "'dps': False" in message, message


@pytest.mark.parametrize("mode", ["dense", "mix"])
def test_full_state_dicts_cross_between_fsdp2_and_one_process(mode, tmp_path):
    """Saved mid Stage II (after step SAVE_AFTER) by each side, loaded by the other through
    ``set_optimizer_state_dict(..., full_state_dict=True)``."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                         get_model_state_dict,
                                                         get_optimizer_state_dict,
                                                         set_optimizer_state_dict)
    full_sd = StateDictOptions(full_state_dict=True)
    steps_after = range(w.SAVE_AFTER + 1, w.STEPS + 1)

    # the one-process side: its saved state, and its own straight continuation
    model = w.make_model()
    opt = w.build_seam(model, mode, "torch")
    w.train(model, opt, steps=range(1, w.SAVE_AFTER + 1))
    host_path = str(tmp_path / "host.pt")
    torch.save({"model": get_model_state_dict(model, options=full_sd),
                "optim": get_optimizer_state_dict(model, opt, options=full_sd)}, host_path)
    host_straight = w.train(model, opt, steps=steps_after)

    out = str(tmp_path / "full")
    spawn(w.run_full_state_dicts, 2, out, mode, host_path)
    ranks = [torch.load(f"{out}.rank{r}", weights_only=False) for r in range(2)]

    # FSDP2 -> one process: the sharded run's own continuation, exactly
    sharded = ranks[0]
    model = w.make_model()
    model.load_state_dict(sharded["saved"]["model"])
    opt = w.build_seam(model, mode, "torch")
    set_optimizer_state_dict(model, opt, sharded["saved"]["optim"], options=full_sd)
    kept = opt.selected_fraction()
    assert kept is not None and kept > 0.5, kept   # 0.0 when the bits were lost (p=0.4)
    assert_same_run(w.train(model, opt, steps=steps_after), sharded["straight"],
                    f"{mode}: FSDP2 -> one process")

    # one process -> FSDP2: Dense exactly; Mix Stage II refused on every rank alike
    if mode == "dense":
        assert_same_run(sharded["from_host"], host_straight, "dense: one process -> FSDP2")
    else:
        messages = [r["from_host"] for r in ranks]
        assert all(isinstance(m, str) for m in messages), messages
        assert messages[0] == messages[1]
        assert "a sharded (FSDP2) one needs GAM there" in messages[0], messages[0]
