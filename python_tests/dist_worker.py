"""Spawned-process bodies of ``test_distributed.py`` (importable, so ``mp.spawn`` can pickle them).

Every process builds the same model, shards it with FSDP2 (``fully_shard`` on each Linear and
the root, gloo, CPU, 127.0.0.1), trains it with ``DPSAdamW`` on its slice of each global batch
and rank 0 saves what the test compares with a single-process run: the full subnetwork of
every DPS weight at each Stage II and the full weights after every step.
"""
from __future__ import annotations

import copy
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

US = 2
CLIP = 0.05          # below every step's gradient norm (0.2-0.9): clipping acts at every step
STEPS = 9            # Stage I, II, I, II, I: two selections
GLOBAL_BATCH = 12    # divisible by 2 and 3


def exit_without_teardown():
    """End a spawned worker once its results are on disk, skipping interpreter teardown.

    ``destroy_process_group`` does not stop the gloo group's worker threads while something
    still holds the group (FSDP2 does even after its model is deleted: the threads were still
    there; a live DDP model does), so they run on into interpreter finalization, where a
    thread that drops the last reference to a tensor must take the GIL and CPython kills it:
    ``terminate called without an active exception``, SIGABRT or SIGSEGV, after every rank had
    returned. Seen in 5 of 117 runs of the checkpoint test's save phase on 2 cores and in CI
    (gdb on a core: ``~AsyncAllgatherCoalescedWork`` -> ``decref_pyobject`` -> ``take_gil`` ->
    ``pthread_exit`` in ``ProcessGroupGloo::runLoop``), and once in 110 runs of the DDP
    example of docs/distributed.md. ``os._exit`` never reaches finalization.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def make_model():
    torch.manual_seed(0)
    # 29, 7 and 2 rows: uneven shards on 2 and 3 ranks, an empty shard (2 rows on 3 ranks)
    return nn.Sequential(nn.Linear(13, 29), nn.Tanh(), nn.Linear(29, 7), nn.Tanh(),
                         nn.Linear(7, 2))


def batch(t):
    g = torch.Generator().manual_seed(100 + t)
    return torch.randn(GLOBAL_BATCH, 13, generator=g), torch.randn(GLOBAL_BATCH, 2, generator=g)


def loss_of(model, xy):
    return ((model(xy[0]) - xy[1]) ** 2).mean()


def build(model, mode, backend, rank=0, world=1, placeholder=False):
    """The optimizer; CHILD-TUNING_D's also gets its subnetwork, from the Fisher of 3 batches
    (each rank its slice of them, as in training), or with ``placeholder`` from a zero
    Fisher (every element kept) that a loaded checkpoint must replace."""
    from dps_kernels import DPSAdamW, child_tuning_fisher
    if mode == "childtuning_f":
        return DPSAdamW.from_model(model, mode=mode, reserve_p=0.4, lr=1e-2, weight_decay=0.01,
                                   backend=backend, seed=3)
    if mode != "childtuning_d":
        return DPSAdamW.from_model(model, mode=mode, p=0.4, lr=1e-2, weight_decay=0.01,
                                   update_steps=US, backend=backend, seed=3)
    opt = DPSAdamW.from_model(model, mode=mode, reserve_p=0.4, lr=1e-2, weight_decay=0.01,
                              backend=backend, seed=3)
    per = GLOBAL_BATCH // world
    batches = [tuple(t[rank * per:(rank + 1) * per] for t in batch(50 + i)) for i in range(3)]
    # max_grad_norm clips every weight's gradient (their norms: 0.28-0.59), so the sharded
    # run must clip each by its whole norm, as the single process does
    fisher = child_tuning_fisher(model, batches, loss_of, max_grad_norm=0.05)
    if placeholder:
        fisher = {p: torch.zeros_like(f) for p, f in fisher.items()}
    opt.set_child_network(fisher)
    return opt


def train(model, opt, rank=0, world=1, full=lambda t: t, steps=range(1, STEPS + 1),
          variant=None):
    """Returns {"masks": {step: [mask per DPS weight]}, "weights": [[param per step]]}.

    ``variant``: what a Trainer does between ``backward()`` and ``step()``: ``"clip"``
    reads every gradient (``clip_grad_norm_`` at CLIP), ``"eval"`` runs an eval-mode
    forward (a metric) and then clips. With a variant the record also holds each step's
    gradients as ``backward()`` left them (what a user sees) and the clipped norms."""
    dps = [p for g in opt.param_groups if g["dps"] for p in g["params"]]
    out = {"masks": {}, "weights": []}
    if variant is not None:
        out.update(grads=[], norms=[])
    per = GLOBAL_BATCH // world
    for t in steps:
        x, y = batch(t)
        x, y = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
        opt.zero_grad()
        loss_of(model, (x, y)).backward()
        if variant is not None:
            out["grads"].append([full(p.grad).clone() for p in model.parameters()])
            if variant == "eval":
                model.eval()
                with torch.no_grad():
                    model(x)
                model.train()
            out["norms"].append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        opt.step()
        masks = [opt.subnetwork(p) for p in dps]
        if masks[0] is not None:
            out["masks"][t] = [full(m).clone() for m in masks]
        out["weights"].append([full(p.detach()).clone() for p in model.parameters()])
    return out


def join_group(rank, world, port):
    """This spawned process joins the gloo group on 127.0.0.1 (one thread: 2 cores here)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)


def run(rank, world, port, out_path, combos):
    """``combos``: ``(engine, backend, mode)`` with engine ``"fsdp2"`` or ``"ddp"``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    results = {}
    try:
        for engine, backend, mode in combos:
            model = make_model()
            if engine == "fsdp2":
                for module in model:
                    if isinstance(module, nn.Linear):
                        fully_shard(module)
                fully_shard(model)
                opt = build(model, mode, backend, rank, world)
                results[(engine, backend, mode)] = train(model, opt, rank, world,
                                                         full=lambda t: t.full_tensor())
            else:
                wrapped = DistributedDataParallel(model)
                opt = build(wrapped, mode, backend, rank, world)
                results[(engine, backend, mode)] = train(wrapped, opt, rank, world)
    finally:
        if rank == 0:
            torch.save(results, out_path)
        dist.destroy_process_group()
    exit_without_teardown()


def shard(model):
    from torch.distributed.fsdp import fully_shard
    for module in model:
        if isinstance(module, nn.Linear):
            fully_shard(module)
    fully_shard(model)
    return model


SAVE_AFTER = 3   # mid Stage II (steps 3-4 are Stage II)


def run_checkpoint(rank, world, port, ckpt_dir, out_path, phase, mode):
    """``phase="save"``: train to SAVE_AFTER, save with torch.distributed.checkpoint, go on to
    STEPS; ``"load"``: a fresh model and optimizer load the checkpoint and go on to STEPS.
    Rank 0 saves the continuation (masks, weights) and the loaded state's dtypes."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                         get_optimizer_state_dict,
                                                         set_model_state_dict,
                                                         set_optimizer_state_dict)
    full = lambda t: t.full_tensor()  # noqa: E731
    try:
        model = shard(make_model())
        # CHILD-TUNING_D resumes with a placeholder subnetwork (DCP's state init takes a step,
        # which needs one); the loaded state must replace it.
        opt = build(model, mode, "auto", rank, world, placeholder=phase == "load")
        dtypes = None
        if phase == "save":
            train(model, opt, rank, world, full, steps=range(1, SAVE_AFTER + 1))
            dcp.save({"model": get_model_state_dict(model),
                      "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=ckpt_dir)
        else:
            state = {"model": get_model_state_dict(model),
                     "optim": get_optimizer_state_dict(model, opt)}
            dcp.load(state, checkpoint_id=ckpt_dir)
            set_model_state_dict(model, state["model"])
            set_optimizer_state_dict(model, opt, state["optim"])
            first = model[0].weight
            dtypes = {k: (v.dtype, type(v).__name__) for k, v in opt.state[first].items()
                      if torch.is_tensor(v)}
            dtypes["step"] = opt.state[first]["step"]
        out = train(model, opt, rank, world, full, steps=range(SAVE_AFTER + 1, STEPS + 1))
        out["dtypes"] = dtypes
    finally:
        dist.destroy_process_group()
    if rank == 0:
        torch.save(out, out_path)
    exit_without_teardown()


def run_child_errors(rank, world, port, out_path):
    """CHILD-TUNING under FSDP2, what must fail: every rank records what it raised.

    ``nan_on_rank1``: a NaN in rank 1's shard of one Fisher only; every rank must raise the
    same error (a rank that went on into the histogram all_reduce would hang) and keep no
    subnetwork. ``plain_fisher``: a whole plain tensor for a sharded weight. ``capturable``:
    capturable=True is refused when built."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from dps_kernels import DPSAdamW, child_tuning_fisher
    from dps_kernels.distributed import local

    errors = {}
    try:
        model = shard(make_model())
        opt = DPSAdamW.from_model(model, mode="childtuning_d", reserve_p=0.4, backend="torch")
        fisher = child_tuning_fisher(model, [batch(1)], loss_of)
        first = model[0].weight
        if rank == 1:
            local(fisher[first])[0, 0] = float("nan")
        try:
            opt.set_child_network(fisher)
            errors["nan_on_rank1"] = None
        except ValueError as error:
            errors["nan_on_rank1"] = str(error)
        errors["state_after_nan"] = sorted(opt.state.get(first, {}))
        plain = dict(fisher)
        plain[first] = torch.zeros(first.shape)
        try:
            opt.set_child_network(plain)
            errors["plain_fisher"] = None
        except ValueError as error:
            errors["plain_fisher"] = str(error)
        for name, kwargs in (("capturable", dict(mode="dense", update_steps=2, capturable=True)),):
            try:
                DPSAdamW.from_model(model, **kwargs)
                errors[name] = None
            except ValueError as error:
                errors[name] = str(error)
    finally:
        dist.destroy_process_group()
    torch.save(errors, f"{out_path}.rank{rank}")
    exit_without_teardown()


def child_network_on_whole_batches(model):
    """CHILD-TUNING_D's subnetwork from the Fisher of 3 whole batches (the same on every
    rank); the full masks of the DPS weights."""
    from dps_kernels import DPSAdamW, child_tuning_fisher
    opt = DPSAdamW.from_model(model, mode="childtuning_d", reserve_p=0.4, backend="torch")
    opt.set_child_network(child_tuning_fisher(model, [batch(50 + i) for i in range(3)],
                                              loss_of))
    dps = [p for g in opt.param_groups if g["dps"] for p in g["params"]]
    masks = [opt.subnetwork(p) for p in dps]
    return [m.full_tensor() if hasattr(m, "full_tensor") else m for m in masks]


def run_child_mixed(rank, world, port, out_path):
    """Only the first Linear sharded, the others plain and whole on every rank (each rank
    computes the same Fisher for them): the plain tensors must be counted once, not once per
    rank, in CHILD-TUNING_D's one threshold."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.fsdp import fully_shard
    try:
        model = make_model()
        fully_shard(model[0])
        masks = child_network_on_whole_batches(model)
    finally:
        dist.destroy_process_group()
    if rank == 0:
        torch.save(masks, out_path)
    exit_without_teardown()


def run_fsdp1(rank, world, port, out_path):
    """Build DPSAdamW on a real FSDP1 model (flat parameters, use_orig_params off and on)
    and record the errors."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.fsdp import FullyShardedDataParallel

    from dps_kernels import DPSAdamW

    errors = {}
    try:
        for orig in (False, True):
            for how in ("from_model", "parameters"):
                model = FullyShardedDataParallel(make_model(), use_orig_params=orig,
                                                 device_id=torch.device("cpu"))
                try:
                    if how == "from_model":
                        DPSAdamW.from_model(model, mode="mix", update_steps=2)
                    else:
                        DPSAdamW(model.parameters(), mode="dense", update_steps=2)
                    errors[(orig, how)] = None
                except ValueError as error:
                    errors[(orig, how)] = str(error)
    finally:
        dist.destroy_process_group()
    if rank == 0:
        torch.save(errors, out_path)
    exit_without_teardown()


# ---------------------------------------------------------------- seams (test_distributed_seams)
def build_seam(model, mode, backend):
    from dps_kernels import DPSAdamW
    stages = {"update_steps": US} if mode in ("dense", "mix") else {}
    return DPSAdamW.from_model(model, mode=mode, p=0.4, lr=1e-2, weight_decay=0.01,
                               backend=backend, seed=3, **stages)


def run_seams(rank, world, port, out_path, combos):
    """``combos``: ``(backend, mode, variant)``; FSDP2 per Linear and at the root."""
    join_group(rank, world, port)
    results = {}
    try:
        for backend, mode, variant in combos:
            model = shard(make_model())
            opt = build_seam(model, mode, backend)
            results[(backend, mode, variant)] = train(
                model, opt, rank, world, full=lambda t: t.full_tensor(), variant=variant)
    finally:
        if rank == 0:
            torch.save(results, out_path)
        dist.destroy_process_group()
    exit_without_teardown()


class NormedModel(nn.Module):
    """make_model with a LayerNorm: a 1-D weight for targets=[nn.Linear, nn.LayerNorm]."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.norm, self.out = nn.Linear(13, 29), nn.LayerNorm(29), nn.Linear(29, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.norm(self.inp(x))))


def run_refusals(rank, world, port, out_path):
    """Mix and Mixout under FSDP2 with a sharded 1-D DPS parameter: refused when built (or
    trained, were it made to work): every rank records what happened."""
    join_group(rank, world, port)
    from torch.distributed.fsdp import fully_shard

    from dps_kernels import DPSAdamW
    errors = {}
    try:
        for mode in ("mix", "mixout"):
            model = NormedModel()
            for module in (model.inp, model.norm, model.out, model):
                fully_shard(module)
            stages = {"update_steps": US} if mode == "mix" else {}
            try:
                opt = DPSAdamW.from_model(model, targets=[nn.Linear, nn.LayerNorm], mode=mode,
                                          p=0.4, backend="torch", **stages)
                x, y = batch(1)
                ((model(x) - y) ** 2).mean().backward()
                opt.step()
                errors[mode] = None
            except ValueError as error:
                errors[mode] = str(error)
    finally:
        dist.destroy_process_group()
    torch.save(errors, f"{out_path}.rank{rank}")
    exit_without_teardown()


def run_full_state_dicts(rank, world, port, out_path, mode, host_state_path):
    """Full (unsharded) optimizer state dicts across the FSDP2 / one-process line, through
    torch's DCP helpers: (a) train sharded to SAVE_AFTER, rank 0 keeps
    ``get_optimizer_state_dict(full_state_dict=True)`` and the model's full state, then the
    sharded run goes on (the straight continuation); (b) a one-process state saved by the
    test (``host_state_path``) is loaded into a fresh sharded model with
    ``set_optimizer_state_dict`` and trained on, or refused: every rank records which."""
    join_group(rank, world, port)
    from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                         get_model_state_dict,
                                                         get_optimizer_state_dict,
                                                         set_model_state_dict,
                                                         set_optimizer_state_dict)
    full_sd = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = lambda t: t.full_tensor()  # noqa: E731
    out = {}
    try:
        model = shard(make_model())
        opt = build_seam(model, mode, "torch")
        train(model, opt, rank, world, full, steps=range(1, SAVE_AFTER + 1))
        # a copy: the gathered dict still shares the plain (unsharded) state tensors, such
        # as the thresholds, with the optimizer, which the next selection rewrites in place
        saved = copy.deepcopy({"model": get_model_state_dict(model, options=full_sd),
                               "optim": get_optimizer_state_dict(model, opt, options=full_sd)})
        out["straight"] = train(model, opt, rank, world, full,
                                steps=range(SAVE_AFTER + 1, STEPS + 1))
        out["saved"] = saved
        host = torch.load(host_state_path, weights_only=False)
        model = shard(make_model())
        opt = build_seam(model, mode, "torch")
        set_model_state_dict(model, host["model"], options=full_sd)
        try:
            set_optimizer_state_dict(model, opt, host["optim"], options=full_sd)
            out["from_host"] = train(model, opt, rank, world, full,
                                     steps=range(SAVE_AFTER + 1, STEPS + 1))
        except ValueError as error:
            out["from_host"] = str(error)
    finally:
        dist.destroy_process_group()
    torch.save(out if rank == 0 else {"from_host": out.get("from_host")},
               f"{out_path}.rank{rank}")
    exit_without_teardown()
