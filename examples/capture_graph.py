"""docs/capturable.md's capture recipe, runnable: a whole training step (forward, backward,
``DPSAdamW(capturable=True).step()``) captured in one CUDA graph and replayed.

Two identical Mix models (same init, same batches): one trains eagerly with the capturable
optimizer, the other through the replayed graph. The graph must do what the eager steps do:
after warm-up plus ``--steps`` steps (crossing stage boundaries and selections, us = 4) the
script prints the largest weight difference between the two and the median step time of
each, and exits 1 if the weights differ by more than 1e-4 (cuBLAS may pick other GEMM
algorithms inside a graph) or are not finite.

    python examples/capture_graph.py [--steps 40]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch import nn

from dps_kernels import DPSAdamW

WARMUP = 3


def build():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 256), nn.GELU(),
                          nn.Linear(256, 16)).cuda()
    lr = torch.tensor(2e-4, dtype=torch.float64, device="cuda")   # a tensor: graph-safe
    opt = DPSAdamW.from_model(model, mode="mix", p=0.3, update_steps=4, lr=lr,
                              weight_decay=0.01, backend="triton", capturable=True)
    return model, opt


def batches(n):
    gen = torch.Generator(device="cuda").manual_seed(1)
    return [(torch.randn(64, 256, device="cuda", generator=gen),
             torch.randint(0, 16, (64,), device="cuda", generator=gen)) for _ in range(n)]


def timed(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("examples/capture_graph.py needs a CUDA device")
    loss_fn = nn.CrossEntropyLoss()
    data = batches(WARMUP + args.steps)

    # eager twin: the same capturable optimizer, no graph
    eager, eager_opt = build()

    def eager_step(x, y):
        eager_opt.zero_grad(set_to_none=False)
        loss_fn(eager(x), y).backward()
        eager_opt.step()

    eager_s = [timed(lambda b=b: eager_step(*b)) for b in data]

    model, opt = build()
    static_x, static_y = data[0][0].clone(), data[0][1].clone()
    # warm up on a side stream (builds the address tables, compiles the kernels): these
    # are real training steps, as in PyTorch's recipe
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x, y in data[:WARMUP]:
            static_x.copy_(x)
            static_y.copy_(y)
            opt.zero_grad(set_to_none=False)
            loss_fn(model(static_x), static_y).backward()
            opt.step()
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        # zeroed inside the graph: the gradients keep their addresses (the optimizer's
        # cached tables point at them) and each replay starts from zero, not accumulates
        opt.zero_grad(set_to_none=False)
        static_loss = loss_fn(model(static_x), static_y)
        static_loss.backward()
        opt.step()

    def replay(x, y):
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()

    graph_s = [timed(lambda b=b: replay(*b)) for b in data[WARMUP:]]
    diff = max((a - b).abs().max().item() for a, b in zip(eager.parameters(),
                                                          model.parameters()))
    finite = all(bool(p.isfinite().all()) for p in model.parameters())
    steps = opt.state[model[0].weight]["step"].item()
    print(f"capture: {WARMUP} warm-up + {args.steps} replayed steps (optimizer step {steps:.0f}),"
          f" max |W_graph - W_eager| = {diff:.3g}, finite: {finite}")
    print(f"capture: median step eager {1e3 * statistics.median(eager_s[WARMUP:]):.3f} ms, "
          f"graph replay {1e3 * statistics.median(graph_s):.3f} ms")
    return 0 if finite and diff <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
