"""Exact DPS under FSDP2 and DDP: the same subnetworks as one process (gloo, CPU, spawned).

``dist_worker.py`` trains a 3-Linear model whose dim-0 sizes (29, 7, 2) shard unevenly on 2
and 3 ranks (and leave rank 2 an empty shard of the last weight), each rank on its slice of
every global batch; this test trains the same model in one process on the whole batches and
compares:

* the full subnetwork of every DPS weight at each Stage II step (two selections): **equal**.
  The thresholds are exact k-th largest values over the whole tensor (histograms summed
  across ranks); GAM differs from the single process only by the rounding of the averaged
  gradients (~1e-7 relative), far below the gaps between its values here;
* the full weights after every step: within 1e-6 absolute (measured: <= 9e-8), the rounding
  of the gradient all-reduce / reduce-scatter carried over 9 steps of lr 1e-2.

Every backend available on CPU runs (``triton`` under ``TRITON_INTERPRET=1``), Dense, Mix,
CHILD-TUNING_D (its one global subnetwork, from a Fisher computed on the sharded model) and
CHILD-TUNING_F (each shard hashes its elements by their index in the whole tensor).
"""
from __future__ import annotations

import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dist_worker as w
from dps_kernels.backends import unavailable_reason
from triton_device import compiled_triton

HERE = os.path.dirname(os.path.abspath(__file__))
WEIGHT_ATOL = 1e-6

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def backends():
    out = []
    for name in ("torch", "cpu", "triton"):
        reason = unavailable_reason(name)
        if name == "triton" and reason is None and compiled_triton():
            # gloo on CPU tensors; compiled triton needs CUDA ones
            reason = "CPU tensors only: triton needs TRITON_INTERPRET=1 to step them"
        if reason is None:
            out.append(name)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(world, combos, tmp_path):
    out = str(tmp_path / f"world{world}.pt")
    sys.path.insert(0, HERE)   # the spawned interpreters import dist_worker from here
    mp.spawn(w.run, args=(world, free_port(), out, combos), nprocs=world)
    return torch.load(out)


def single_process(backend, mode):
    model = w.make_model()
    return w.train(model, w.build(model, mode, backend))


@pytest.mark.parametrize("world", [2, 3])
def test_fsdp2_and_ddp_select_what_one_process_selects(world, tmp_path):
    modes = ("dense", "mix", "childtuning_d", "childtuning_f")
    combos = [("fsdp2", b, m) for b in backends() for m in modes]
    combos += [("ddp", "cpu" if "cpu" in backends() else "torch", m) for m in modes]
    results = run_world(world, combos, tmp_path)
    for engine, backend, mode in combos:
        got, ref = results[(engine, backend, mode)], single_process(backend, mode)
        what = f"{engine}/{backend}/{mode}/world {world}"
        # DPS: Stage II at steps 2-3 and 6-7; CHILD-TUNING_D: its one subnetwork throughout;
        # CHILD-TUNING_F: none (a fresh per-element mask each step: the weights tell)
        stage_two = {"childtuning_d": list(range(1, w.STEPS + 1)),
                     "childtuning_f": []}.get(mode, [2, 3, 6, 7])
        assert sorted(got["masks"]) == sorted(ref["masks"]) == stage_two, what
        for t in ref["masks"]:
            for a, b in zip(ref["masks"][t], got["masks"][t]):
                assert a.shape == b.shape and torch.equal(a, b), f"{what}: mask at step {t}"
            assert any(not bool(m.all()) for m in ref["masks"][t])   # a real selection
        for step, (ws, gs) in enumerate(zip(ref["weights"], got["weights"]), start=1):
            for a, b in zip(ws, gs):
                torch.testing.assert_close(b, a, rtol=0, atol=WEIGHT_ATOL,
                                           msg=lambda m: f"{what}: step {step}: {m}")


def test_fsdp1_flat_parameters_and_zero_partitions_are_refused():
    """FSDP1 marks its FlatParameter and the views use_orig_params hands out with
    ``_fsdp_flattened`` (torch.distributed.fsdp._common_utils._set_fsdp_flattened);
    DeepSpeed ZeRO-3 gives its partitions ``ds_id``. Neither holds a whole weight or whole
    rows, so DPS refuses them when the optimizer is built, naming the reason and the remedy,
    instead of selecting (or mixing) silently wrong."""
    from torch.distributed.fsdp._common_utils import _set_fsdp_flattened

    from dps_kernels import DPSAdamW

    for mode in ("dense", "mix"):
        flat = torch.nn.Parameter(torch.randn(6, 4))
        _set_fsdp_flattened(flat)
        with pytest.raises(ValueError, match=r"FSDP1 flat parameter.*Use FSDP2"):
            DPSAdamW([flat], mode=mode, update_steps=2)
        zero = torch.nn.Parameter(torch.randn(6, 4))
        zero.ds_id = 3
        with pytest.raises(ValueError, match=r"DeepSpeed ZeRO partition.*FSDP2"):
            DPSAdamW([zero], mode=mode, update_steps=2)


@pytest.mark.parametrize("mode", ["dense", "mix", "childtuning_d"])
def test_distributed_checkpoint_resumes_exactly_and_reshards(mode, tmp_path):
    """torch.distributed.checkpoint with get/set_optimizer_state_dict, saved mid Stage II on
    2 ranks: resumed on 2 ranks the run is bit-identical; resumed on 3 ranks (resharded) it
    selects the same subnetworks, with weights within WEIGHT_ATOL (the gradient reduction
    order differs). GAM, FAM, thresholds and anchors come back in their dtypes.
    CHILD-TUNING_D resumes from a placeholder subnetwork (all kept), which the loaded one
    must replace."""
    ckpt = str(tmp_path / "ckpt")

    def spawn(world, phase):
        out = str(tmp_path / f"{phase}{world}.pt")
        sys.path.insert(0, HERE)
        mp.spawn(w.run_checkpoint, args=(world, free_port(), ckpt, out, phase, mode),
                 nprocs=world)
        return torch.load(out)

    straight = spawn(2, "save")
    same = spawn(2, "load")
    resharded = spawn(3, "load")
    assert same["dtypes"]["step"] == w.SAVE_AFTER
    expected = {"exp_avg": torch.float32, "exp_avg_sq": torch.float32, "gam": torch.float32,
                "threshold": torch.float32}
    if mode == "mix":
        expected.update(fam=torch.float32, column_factor=torch.float32, anchor=torch.float32,
                        stage_anchor=torch.float32)
    for run in (same, resharded):
        assert {k: v[0] for k, v in run["dtypes"].items() if k != "step"} == expected
        assert run["dtypes"]["gam"][1] == "DTensor" and run["dtypes"]["threshold"][1] == "Tensor"
    assert sorted(straight["masks"]) == sorted(same["masks"]) == sorted(resharded["masks"])
    assert straight["masks"], "the continuation must reach a Stage II"
    for t in straight["masks"]:
        for a, b, c in zip(straight["masks"][t], same["masks"][t], resharded["masks"][t]):
            assert torch.equal(a, b) and torch.equal(a, c), f"mask at step {t}"
    for ws, ss, rs in zip(straight["weights"], same["weights"], resharded["weights"]):
        for a, b, c in zip(ws, ss, rs):
            assert torch.equal(a, b)                      # bit-exact resume
            torch.testing.assert_close(c, a, rtol=0, atol=WEIGHT_ATOL)


@pytest.mark.parametrize("mode", ["dense", "mix"])
def test_parameters_swapped_after_construction_are_adopted(mode):
    """What accelerate's FSDP2 ``prepare`` does (``fsdp2_switch_optimizer_parameters``): the
    optimizer is built, then every parameter object in the model and in ``param_groups`` is
    replaced. State is created lazily, so the optimizer adopts the new objects (index i
    stays index i: the same Mix masks) and trains exactly like one built on them; W0 is the
    weight of the first training forward. Mix needs ``attach`` again for the new objects;
    the old wiring goes inert instead of putting the old Parameter back."""
    from dps_kernels import DPSAdamW, attach

    def swap(model, opt):
        mapping = {}
        for module in model:
            for name, param in list(module._parameters.items()):
                new = torch.nn.Parameter(param.detach().clone())
                module._parameters[name] = new
                mapping[id(param)] = new
        for group in opt.param_groups:
            group["params"] = [mapping[id(p)] for p in group["params"]]

    swapped_model = w.make_model()
    swapped = w.build(swapped_model, mode, "torch")
    swap(swapped_model, swapped)
    if mode == "mix":
        attach(swapped_model, swapped)
    got = w.train(swapped_model, swapped)
    direct_model = w.make_model()
    ref = w.train(direct_model, w.build(direct_model, mode, "torch"))
    for t in ref["masks"]:
        assert all(torch.equal(a, b) for a, b in zip(ref["masks"][t], got["masks"][t]))
    for ws, gs in zip(ref["weights"], got["weights"]):
        assert all(torch.equal(a, b) for a, b in zip(ws, gs))

    # a swap after state exists would orphan it: refused with the reason
    model = w.make_model()
    opt = DPSAdamW.from_model(model, mode="dense", update_steps=2, backend="torch")
    x, y = w.batch(1)
    ((model(x) - y) ** 2).mean().backward()
    opt.step()
    swap(model, opt)
    ((model(x) - y) ** 2).mean().backward()
    with pytest.raises(RuntimeError, match="replaced after .* had stepped"):
        opt.step()


def test_child_tuning_under_fsdp2_fails_on_every_rank_alike(tmp_path):
    """A bad Fisher on one rank's shard only: every rank raises the same error and keeps no
    subnetwork (no rank waits in a collective the others skipped). A plain whole tensor for a
    sharded weight is refused with the layout it needs; capturable=True is refused when built
    (not shard-aware yet)."""
    out = str(tmp_path / "child_errors")
    sys.path.insert(0, HERE)
    mp.spawn(w.run_child_errors, args=(2, free_port(), out), nprocs=2)
    ranks = [torch.load(f"{out}.rank{r}") for r in range(2)]
    assert ranks[0] == ranks[1]
    errors = ranks[0]
    assert "parameter #0 (shape (29, 13)) must be finite and >= 0" in errors["nan_on_rank1"]
    assert "threshold" not in errors["state_after_nan"]
    assert "must be a DTensor laid out like it" in errors["plain_fisher"]
    assert "capturable=True does not support sharded" in errors["capturable"]


@pytest.mark.parametrize("world", [2, 3])
def test_child_tuning_counts_unsharded_tensors_once(world, tmp_path):
    """First Linear sharded, the rest plain on every rank: the same subnetwork as one
    process (a plain tensor counted once per rank would move the global threshold)."""
    out = str(tmp_path / "child_mixed.pt")
    sys.path.insert(0, HERE)
    mp.spawn(w.run_child_mixed, args=(world, free_port(), out), nprocs=world)
    got = torch.load(out)
    ref = w.child_network_on_whole_batches(w.make_model())
    assert len(got) == len(ref) == 3
    for a, b in zip(ref, got):
        assert torch.equal(a, b)
    assert any(not bool(m.all()) for m in ref) and any(bool(m.any()) for m in ref)


def test_real_fsdp1_is_refused(tmp_path):
    """FullyShardedDataParallel on 2 CPU processes, with and without use_orig_params: the
    optimizer is refused when built, from the model or from its parameters."""
    out = str(tmp_path / "fsdp1.pt")
    sys.path.insert(0, HERE)
    mp.spawn(w.run_fsdp1, args=(2, free_port(), out), nprocs=2)
    errors = torch.load(out)
    assert len(errors) == 4
    for key, message in errors.items():
        assert message is not None and "FSDP1 flat parameter" in message, key
