"""What a DPS stage boundary costs under FSDP2: bytes each rank sends, and time, on CPU.

``python -m bench.distributed_boundary [--worlds 2 3] [--out bench/results/distributed]``

Each world size spawns that many gloo processes (127.0.0.1) that shard a 4-Linear MLP
(1024 -> 1024 -> 1024 -> 1024 -> 10, dim-0 sizes chosen to shard unevenly) with FSDP2 and train
it with ``DPSAdamW(mode="dense", update_steps=US)`` for a few cycles. Per rank it records:

* every ``all_reduce`` the selection makes (count and payload bytes), by wrapping
  ``torch.distributed.all_reduce``; the formula is 3 passes x (4096 + 1024 + 1024) bins x
  tensors x 8 B (int64 counts), one collective per pass for all tensors;
* the payload an all-gather of the scores would need instead: ``(world-1)/world x numel x 4 B``
  per tensor received by each rank;
* the wall time of ``optimizer.step()`` at the steps that close a Stage I (selection
  included) and at the other Stage I steps (median over the cycles), so the selection's cost
  is their difference. CPU timings on a shared 2-core machine: read them as orders of
  magnitude.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

US = 3
CYCLES = 4
SIZES = (1024, 1023, 1021, 1019, 10)   # in, then the out features of each Linear (uneven)
BINS = 4096 + 1024 + 1024
BATCH = 24


def make_model():
    torch.manual_seed(0)
    layers = []
    for fan_in, fan_out in zip(SIZES[:-1], SIZES[1:]):
        layers += [nn.Linear(fan_in, fan_out), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def worker(rank, world, port, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    from torch.distributed.fsdp import fully_shard

    from dps_kernels import DPSAdamW

    model = make_model()
    for module in model:
        if isinstance(module, nn.Linear):
            fully_shard(module)
    fully_shard(model)
    opt = DPSAdamW.from_model(model, mode="dense", update_steps=US, lr=1e-3)
    calls = []
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        calls.append(tensor.numel() * tensor.element_size())
        return real_all_reduce(tensor, *args, **kwargs)

    boundary, ordinary, boundary_calls = [], [], []
    g = torch.Generator().manual_seed(rank)
    for t in range(1, 2 * US * CYCLES + 1):
        x = torch.randn(BATCH // world, SIZES[0], generator=g)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        closes = t % (2 * US) == US
        calls.clear()
        dist.all_reduce = counting_all_reduce
        dist.barrier()
        start = time.perf_counter()
        opt.step()
        elapsed = time.perf_counter() - start
        dist.all_reduce = real_all_reduce
        if closes:
            boundary.append(elapsed)
            boundary_calls.append(list(calls))
        elif (t - 1) % (2 * US) < US:   # the other Stage I steps
            ordinary.append(elapsed)
    dps = [p for grp in opt.param_groups if grp["dps"] for p in grp["params"]]
    result = {
        "world": world, "tensors": len(dps), "elements": sum(p.numel() for p in dps),
        "collectives_per_boundary": len(boundary_calls[-1]),
        "bytes_per_boundary_measured": sum(boundary_calls[-1]),
        "bytes_per_boundary_formula": BINS * len(dps) * 8,
        "allgather_bytes_received_per_rank": int(sum(p.numel() for p in dps) * 4
                                                 * (world - 1) / world),
        "step_ms_boundary_median": 1e3 * statistics.median(boundary),
        "step_ms_stage1_median": 1e3 * statistics.median(ordinary),
    }
    dist.destroy_process_group()
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(result, f)
    # FSDP2 keeps the gloo group alive past destroy_process_group; its worker threads can abort
    # the interpreter's teardown (python_tests/dist_worker.py: exit_without_teardown), so a
    # finished worker leaves without one.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worlds", nargs="+", type=int, default=[2, 3])
    ap.add_argument("--out", default=os.path.join("bench", "results", "distributed"))
    args = ap.parse_args(argv)
    rows = []
    for world in args.worlds:
        path = f"{args.out}_world{world}.tmp.json"
        mp.spawn(worker, args=(world, free_port(), path), nprocs=world)
        with open(path) as f:
            rows.append(json.load(f))
        os.remove(path)
    lines = ["# DPS stage boundary under FSDP2 (CPU, gloo, 127.0.0.1)", "",
             f"Model: Linear layers {SIZES} (dim-0 sharded unevenly), Dense, us={US}, "
             f"{CYCLES} cycles; `python -m bench.distributed_boundary`. Timings on a shared "
             f"2-core CPU machine (medians).", "",
             "| ranks | DPS tensors | elements | all_reduce calls per boundary | bytes sent per "
             "boundary (measured payload) | formula 3 passes x bins x tensors x 8 B | "
             "all-gather of scores instead (bytes received per rank) | step at boundary "
             "(ms) | other Stage I step (ms) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['world']} | {r['tensors']} | {r['elements']} | "
                     f"{r['collectives_per_boundary']} | {r['bytes_per_boundary_measured']} | "
                     f"{r['bytes_per_boundary_formula']} | "
                     f"{r['allgather_bytes_received_per_rank']} | "
                     f"{r['step_ms_boundary_median']:.1f} | {r['step_ms_stage1_median']:.1f} |")
    lines += ["", "The payload is the int64 count matrix each all_reduce reduces (a ring "
              "all-reduce sends about 2 (N-1)/N times it per rank); it does not grow with "
              "the tensors' sizes."]
    text = "\n".join(lines) + "\n"
    with open(args.out + ".md", "w") as f:
        f.write(text)
    with open(args.out + ".json", "w") as f:
        json.dump({"rows": rows, "command": " ".join(sys.argv)}, f, indent=1)
    print(text)


if __name__ == "__main__":
    main()
