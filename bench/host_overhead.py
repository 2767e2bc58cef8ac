"""Host time of ``DPSAdamW(backend="triton").step()`` on BERT-large's parameter list, launches stubbed.

What a GPU step costs beyond its kernels is the Python that decides and launches them. This
benchmark measures that part alone, on the CPU: every Triton kernel the step launches is
replaced by a stub that records the launch and returns, so the time is the optimizer's
own host work (plans, scalars, gradient address checks, launch arguments) without
Triton's launcher or any device work. Target (issue 9): <= 0.15 ms per step for the 393
tensors of BertForSequenceClassification-large (146 DPS weights), ``capturable=False``.

Tensors are real CPU tensors with BERT-large's count and grouping (``DPSAdamW.from_model``
groups: DPS weights, decayed and undecayed others); by default every dimension is divided
by ``--shrink`` (16) so the run fits anywhere in seconds: the host work per step does not
depend on the sizes (``--shrink 1`` uses the real sizes, 335M parameters, ~8 GB).

Timed per mode (dense, mix) and stage: the median and 20/80% quantiles of single
``step()`` calls inside a stage (boundary steps, which also launch the selection, are
reported separately), with gradients at the same addresses every step (what a CUDA
caching allocator gives back after ``zero_grad()``) and with fresh gradient buffers
at new addresses every step (the worst case: the address table is rebuilt and uploaded).

    python -m bench.host_overhead [--steps 200] [--shrink 16] [--out bench/results/host_overhead]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


class _Stub:
    """Stands in for a Triton kernel: ``kernel[grid](*args)`` counts and returns."""

    def __init__(self, counter: dict, name: str):
        self.counter, self.name = counter, name

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.counter[self.name] = self.counter.get(self.name, 0) + 1
        return launch


def stub_kernels(counter: dict):
    """Replace the kernels by stubs; returns a function that puts the real ones back."""
    from dps_kernels.ops.triton import fused_step, mask_bits, mix, radix_select

    saved = []
    for module, names in ((fused_step, ["_dps_step_kernel"]),
                          (mask_bits, ["_pack_mask_kernel"]),
                          (radix_select, ["_multi_hist_kernel", "_multi_pick_kernel",
                                          "_capturable_factor_kernel"]),
                          (mix, ["_mix_weight_kernel", "_mix_grad_kernel"])):
        for name in names:
            saved.append((module, name, getattr(module, name)))
            setattr(module, name, _Stub(counter, name))

    def restore():
        for module, name, kernel in saved:
            setattr(module, name, kernel)
    return restore


def bert_large(shrink: int) -> torch.nn.Module:
    import transformers

    config = transformers.BertConfig(
        vocab_size=28996 // shrink, hidden_size=1024 // shrink, num_hidden_layers=24,
        num_attention_heads=max(1, 16 // shrink), intermediate_size=4096 // shrink)
    return transformers.BertForSequenceClassification(config)


def measure(model, mode: str, steps: int, fresh_grads: bool, us: int) -> dict:
    from dps_kernels import DPSAdamW
    from dps_kernels.schedule import stage_of

    opt = DPSAdamW.from_model(model, mode=mode, p=0.3, update_steps=us, lr=2e-5,
                              weight_decay=0.01, backend="triton")
    params = [p for g in opt.param_groups for p in g["params"]]
    grads = [torch.randn_like(p) for p in params]
    times = {1: [], 2: [], "boundary": []}
    for t in range(1, steps + 1):
        for p, g in zip(params, grads):
            p.grad = g.clone() if fresh_grads else g
        start = time.perf_counter()
        opt.step()
        elapsed = (time.perf_counter() - start) * 1e3
        if t % us == 0 and stage_of(t, us) == 1:
            times["boundary"].append(elapsed)
        elif t > 2:   # the first steps build the plans and tables
            times[stage_of(t, us)].append(elapsed)
    dps = sum(len(g["params"]) for g in opt.param_groups if g["dps"])
    row = dict(mode=mode, fresh_grads=fresh_grads, tensors=len(params), dps_tensors=dps)
    for key, values in times.items():
        if len(values) > 1:
            q = statistics.quantiles(values, n=5)
            row[f"stage{key}" if key != "boundary" else "boundary"] = dict(
                median_ms=statistics.median(values), q20_ms=q[0], q80_ms=q[3], n=len(values))
        elif values:
            row["boundary" if key == "boundary" else f"stage{key}"] = dict(
                median_ms=values[0], q20_ms=values[0], q80_ms=values[0], n=1)
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--shrink", type=int, default=16, help="divide BERT-large's dims by")
    parser.add_argument("--update-steps", type=int, default=50)
    parser.add_argument("--out", default=None, help="write OUT.md and OUT.json")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRITON_INTERPRET", "1")   # lets the triton backend take CPU tensors
    torch.set_num_threads(1)
    counter: dict = {}
    restore = stub_kernels(counter)
    rows = []
    try:
        for mode in ("dense", "mix"):
            for fresh in (False, True):
                torch.manual_seed(0)
                rows.append(measure(bert_large(args.shrink), mode, args.steps, fresh,
                                    args.update_steps))
    finally:
        restore()
    from bench.triton_step import conditions
    cond = conditions(torch.device("cpu"))
    lines = [f"# Host time of DPSAdamW.step(), triton backend, launches stubbed (measured)\n",
             f"BERT-large parameter list ({rows[0]['tensors']} tensors, "
             f"{rows[0]['dps_tensors']} DPS), dims / {args.shrink}, {args.steps} steps, "
             f"update_steps={args.update_steps}, capturable=False; {cond['device']}, "
             f"torch {cond['torch']}, commit {cond['git_commit']}.\n",
             f"Command: `{cond['command']}`\n",
             "| mode | gradients | Stage I ms (20-80%) | Stage II ms (20-80%) | "
             "boundary step ms |", "|---|---|---|---|---|"]
    for r in rows:
        def cell(key):
            c = r.get(key)
            return "-" if c is None else (f"{c['median_ms']:.3f} ({c['q20_ms']:.3f}-"
                                          f"{c['q80_ms']:.3f})")
        lines.append(f"| {r['mode']} | {'fresh each step' if r['fresh_grads'] else 'same addresses'}"
                     f" | {cell('stage1')} | {cell('stage2')} | {cell('boundary')} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out + ".md").write_text(text + "\n")
        with open(args.out + ".json", "w") as f:
            json.dump(dict(cond, rows=rows, launches=counter, shrink=args.shrink,
                           steps=args.steps), f, indent=1)


if __name__ == "__main__":
    main()
