"""Every path into the optimizer gives the same answer: a state loaded through
``torch.distributed.checkpoint``'s helpers trains exactly as the same state through
``optimizer.load_state_dict``, or is refused (a ValueError naming the cause), never
silently otherwise.

The helpers build the loading optimizer's state first (a zero-lr step), then hand
``load_state_dict`` the union of the saved keys and that init state's keys
(``set_optimizer_state_dict`` with a full state dict), or only the init state's keys filled
from the checkpoint (``dcp.load(..., allow_partial_load=True)``). The repros: a capturable
(or FSDP2) state, which has no packed bits, into a host-scheduled optimizer kept the init
step's all-zero bits (kept fraction 0.0 instead of 0.602 in Stage II); a host-scheduled
Mix Stage II state (W' in the GAM buffer) into a capturable one got past the refusal
because the init step had made a ``stage_anchor`` (kept fraction 0.488).

Single process: capturable is the layout without bits (the triton backend, under
``TRITON_INTERPRET=1`` here), host the one with them; FSDP2's sharded layout is the
capturable one's and is covered in test_distributed_seams.py.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dps_kernels import DPSAdamW
from dps_kernels.backends import interpreter_enabled, unavailable_reason

dcp = pytest.importorskip("torch.distributed.checkpoint")
from torch.distributed.checkpoint.api import CheckpointException  # noqa: E402
from torch.distributed.checkpoint.state_dict import (StateDictOptions,  # noqa: E402
                                                     get_optimizer_state_dict,
                                                     set_optimizer_state_dict)

US, STEPS = 2, 6
FULL = StateDictOptions(full_state_dict=True)

needs_capturable = pytest.mark.skipif(
    unavailable_reason("triton") is not None or not (interpreter_enabled()
                                                     or torch.cuda.is_available()),
    reason="capturable needs the triton backend (CUDA, or TRITON_INTERPRET=1)")


def device():
    return "cpu" if interpreter_enabled() or not torch.cuda.is_available() else "cuda"


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(13, 29), nn.Tanh(), nn.Linear(29, 7)).to(device())


def make_opt(model, mode, layout):
    capturable = layout == "capturable"
    return DPSAdamW.from_model(model, mode=mode, p=0.4, lr=1e-2, weight_decay=0.01,
                               update_steps=US, seed=3, capturable=capturable,
                               backend="triton" if capturable else "torch")


def train(model, opt, steps):
    for t in steps:
        g = torch.Generator().manual_seed(t)
        x = torch.randn(8, 13, generator=g).to(device())
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


def continue_and_record(model, opt, first):
    record = []
    dps = [p for g in opt.param_groups if g["dps"] for p in g["params"]]
    for t in range(first, STEPS + 1):
        masks = [opt.subnetwork(p) for p in dps]
        record.append(None if masks[0] is None else [m.clone() for m in masks])
        train(model, opt, [t])
    return record, [p.detach().clone() for p in model.parameters()]


def load(path, source_model, source_opt, mode, layout, tmp_path):
    """A fresh model (the source's weights) and optimizer, loaded through ``path``."""
    model = make_model()
    model.load_state_dict(source_model.state_dict())
    opt = make_opt(model, mode, layout)
    if path == "load_state_dict":
        opt.load_state_dict(source_opt.state_dict())
    elif path == "set_full":
        full = get_optimizer_state_dict(source_model, source_opt, options=FULL)
        set_optimizer_state_dict(model, opt, full, options=FULL)
    else:   # dcp.save / dcp.load(allow_partial_load=True) / set_optimizer_state_dict
        where = str(tmp_path / "ckpt")
        dcp.save({"optim": get_optimizer_state_dict(source_model, source_opt)},
                 checkpoint_id=where)
        template = {"optim": get_optimizer_state_dict(model, opt)}
        try:
            dcp.load(template, checkpoint_id=where,
                     planner=dcp.DefaultLoadPlanner(allow_partial_load=True))
        except CheckpointException as error:
            # DCP itself refuses a capturable state's tensor 'step' for a host int one
            raise ValueError(f"dcp.load: {error}") from None
        set_optimizer_state_dict(model, opt, template["optim"])
    return model, opt


def run_path(path, mode, source_layout, target_layout, save_after, tmp_path):
    source_model = make_model()
    source_opt = make_opt(source_model, mode, source_layout)
    train(source_model, source_opt, range(1, save_after + 1))
    try:
        model, opt = load(path, source_model, source_opt, mode, target_layout, tmp_path)
    except ValueError as error:
        return "refused", str(error)
    return "trained", continue_and_record(model, opt, save_after + 1)


LAYOUTS = [("capturable", "host"), ("host", "capturable"), ("host", "host"),
           ("capturable", "capturable")]


@needs_capturable
@pytest.mark.parametrize("save_after", [1, 3], ids=["stage1", "stage2"])
@pytest.mark.parametrize("source_layout,target_layout", LAYOUTS,
                         ids=[f"{a}-to-{b}" for a, b in LAYOUTS])
@pytest.mark.parametrize("mode", ["dense", "mix"])
def test_dcp_helpers_load_what_load_state_dict_loads(mode, source_layout, target_layout,
                                                     save_after, tmp_path):
    args = (mode, source_layout, target_layout, save_after, tmp_path)
    reference = run_path("load_state_dict", *args)
    for path in ("set_full", "dcp_partial"):
        got = run_path(path, *args)
        what = f"{path}: {mode} {source_layout} -> {target_layout}, saved after {save_after}"
        if got[0] == "refused":
            # a refusal is the only other answer, and only where the reference refuses or
            # the path cannot carry W' (dcp.load reads only the loader's own keys)
            dcp_cannot = path == "dcp_partial" and (
                "expected BytesStorageMetadata" in got[1]      # DCP: tensor step -> int
                or (mode == "mix" and save_after == 3 and "'stage_anchor' is missing" in got[1]))
            assert reference[0] == "refused" or dcp_cannot, (what, got)
            continue
        assert reference[0] == "trained", (what, reference)
        (ref_masks, ref_weights), (masks, weights) = reference[1], got[1]
        for t, (a, b) in enumerate(zip(ref_masks, masks), start=save_after + 1):
            assert (a is None) == (b is None), f"{what}: step {t}"
            for x, y in zip(a or [], b or []):
                assert torch.equal(x, y), f"{what}: subnetwork at step {t}"
        for x, y in zip(ref_weights, weights):
            assert torch.equal(x, y), f"{what}: weights"


@needs_capturable
@pytest.mark.parametrize("mode", ["dense", "mix"])
def test_a_state_without_bits_keeps_its_stage_two_subnetwork(mode, tmp_path):
    """Item 4's repro, spelled out: the kept fraction after a full-state-dict load."""
    status, result = run_path("set_full", mode, "capturable", "host", 3, tmp_path)
    assert status == "trained", result
    masks = result[0][0]   # the next step's (Stage II) subnetwork
    kept = sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)
    assert kept == pytest.approx(0.6, abs=0.01)


@needs_capturable
def test_a_host_mix_stage_two_state_is_refused_on_every_path(tmp_path):
    """Item 5's repro: W' sits in the GAM buffer; a capturable optimizer needs GAM there."""
    for path in ("load_state_dict", "set_full", "dcp_partial"):
        status, message = run_path(path, "mix", "host", "capturable", 3, tmp_path)
        assert status == "refused", path
        assert "capturable optimizer needs GAM" in message or "'mask_bits'" in message, message
