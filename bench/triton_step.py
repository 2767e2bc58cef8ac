"""Fused Triton DPS step vs ``torch.optim.AdamW(fused=True)`` on the BERT-large parameter list.

For each stage (Dense Stage I / II, Mix Stage I / II) and parameter dtype, times one
``triton_backend.BACKEND.step(tasks, freeze=False)`` over every BERT-large tensor (the
``nn.Linear`` weights take the DPS kind, every other tensor PLAIN, as ``DPSAdamW`` does)
against one ``torch.optim.AdamW(fused=True).step()`` over the same tensors, and reports
the achieved bandwidth from the bytes each element must move (fused_step.py docstring:
fp32 AdamW 28 B, Stage I 36 B, Stage II 32 B; P-byte dtypes 7P (+8 / +4)), next to the
device's measured copy bandwidth (a large ``copy_``: 2 x bytes).

Targets (issue 3): Stage I <= 1.35x and Stage II <= 1.2x of fused AdamW's time, and
>= 80% of the copy bandwidth on large tensors.

The parameter list comes from ``transformers.BertConfig`` (BERT-large sizes) on the meta
device: no download. Timing: ``triton.testing.do_bench`` (median and 20/80% quantiles) on
CUDA; on CPU (``--toy`` under ``TRITON_INTERPRET=1``, only to prove the script runs) a
steady-state timer. Tensors and gradients are made before timing.

Also measures the memory the triton backend adds: optimizer state per DPS parameter of a
``DPSAdamW(backend="triton")`` after a full cycle (what the optimizer allocates) and the
bytes of the cached launch tables.

    python bench/triton_step.py [--dtypes fp32 bf16] [--out bench/results/triton_step.jsonl]
    TRITON_INTERPRET=1 python bench/triton_step.py --toy
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def bert_shapes(toy: bool):
    """[(name, shape, is_dps)] of BertForSequenceClassification built on the meta device."""
    import transformers

    if toy:
        config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, intermediate_size=64)
    else:   # BERT-large (cased vocabulary, as the paper)
        config = transformers.BertConfig(vocab_size=28996, hidden_size=1024,
                                         num_hidden_layers=24, num_attention_heads=16,
                                         intermediate_size=4096)
    with torch.device("meta"):
        model = transformers.BertForSequenceClassification(config)
    dps = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    return [(n, tuple(p.shape), id(p) in dps) for n, p in model.named_parameters()]


def bytes_per_element(kind, itemsize: int) -> int:
    from dps_kernels.step_types import StepKind

    extra = {StepKind.PLAIN: 0, StepKind.MIX_STAGE2: 0, StepKind.DENSE_STAGE1: 8,
             StepKind.MIX_STAGE1: 8, StepKind.DENSE_STAGE2: 4}[kind]
    return 7 * itemsize + extra


def make_tasks(shapes, dtype, device, mode, stage):
    from dps_kernels import reference as ref
    from dps_kernels.step_types import StepKind, TensorStep
    from dps_kernels.mask_hash import columns_of, keep_threshold, step_key

    gen = torch.Generator(device=device).manual_seed(0)
    s = ref.adamw_scalars(2e-5, 0.9, 0.999, 1e-8, 0.01, 3)
    tasks = []
    for i, (_, shape, is_dps) in enumerate(shapes):
        p = torch.randn(shape, generator=gen, device=device).to(dtype)
        g = torch.randn(shape, generator=gen, device=device).to(dtype)
        task = TensorStep(StepKind.PLAIN, p, g, torch.zeros_like(p), torch.rand_like(p), s)
        if is_dps:
            cols = columns_of(shape)
            task.cols = cols
            task.gam = torch.rand(shape, generator=gen, device=device)
            task.threshold = torch.tensor(0.7, device=device)
            if mode == "dense":
                task.kind = StepKind.DENSE_STAGE1 if stage == 1 else StepKind.DENSE_STAGE2
            elif stage == 1:
                task.kind = StepKind.MIX_STAGE1
                task.fam = torch.zeros(cols, device=device)
                task.mix_key, task.keep_threshold = step_key(0, i, 3), keep_threshold(0.3)
            else:
                task.kind = StepKind.MIX_STAGE2
                task.column_factor = torch.rand(cols, generator=gen, device=device)
        tasks.append(task)
    return tasks


def timer(device, toy: bool):
    """fn -> (median, q20, q80) in ms."""
    if device.type == "cuda":
        import triton.testing

        def bench(fn, repeats=None):
            med, q20, q80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
            return med, q20, q80
        return bench

    def bench(fn, repeats=None):  # steady state: warm-up, then the median of many calls
        for _ in range(2):
            fn()
        times = []
        for _ in range(repeats or (3 if toy else 20)):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        q = statistics.quantiles(times, n=5) if len(times) > 1 else times * 4
        return statistics.median(times), q[0], q[3]
    return bench


def copy_bandwidth(device, bench, toy: bool) -> float:
    n = (1 << 22) if toy else (1 << 28)
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    med, _, _ = bench(lambda: dst.copy_(src), 20)
    return 2 * src.numel() * 4 / (med * 1e-3) / 1e9


def measure_state_memory(device, dtype) -> list[dict]:
    """Bytes the triton DPSAdamW allocates per DPS parameter after a full cycle (toy BERT)."""
    import transformers

    from dps_kernels import DPSAdamW

    rows = []
    for mode in ("dense", "mix"):
        torch.manual_seed(0)
        config = transformers.BertConfig(vocab_size=500, hidden_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, intermediate_size=128)
        model = transformers.BertForSequenceClassification(config).to(dtype).to(device)
        opt = DPSAdamW.from_model(model, mode=mode, update_steps=2, backend="triton")
        ids = torch.randint(0, 500, (2, 16), device=device)
        for _ in range(4):
            opt.zero_grad()
            model(input_ids=ids, labels=torch.tensor([0, 1], device=device)).loss.backward()
            opt.step()
        dps = [p for g in opt.param_groups if g["dps"] for p in g["params"]]
        state = sum(v.numel() * v.element_size() for p in dps for v in opt.state[p].values()
                    if torch.is_tensor(v))
        n = sum(p.numel() for p in dps)
        # the tables the optimizer's group plans keep for the triton backend
        plans = [part.cache["triton_plan"][0] for plan in opt._plans.values()
                 for part in plan.parts if "triton_plan" in part.cache]
        tables = sum(t.numel() * t.element_size() for plan in plans
                     for t in (plan.addr, plan.meta, plan.grad_table, plan.layout.block_tensor,
                               plan.layout.block_start))
        total = sum(p.numel() for p in model.parameters())
        rows.append(dict(mode=mode, dtype=str(dtype).replace("torch.", ""),
                         state_bytes_per_dps_param=state / n,
                         table_bytes_per_param=tables / total))
    return rows


def conditions(device) -> dict:
    import triton

    # bench.env's git: None without git or outside a checkout (a GPU machine may have neither)
    from bench.env import _git, device_description
    status = _git("status", "--porcelain", "--untracked-files=no")
    return dict(device=device_description(device), torch=torch.__version__,
                triton=triton.__version__, cuda=torch.version.cuda,
                git_commit=_git("rev-parse", "HEAD"),
                git_dirty=None if status is None else bool(status),
                interpreter=os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
                command=" ".join(["python", *map(shlex.quote, sys.argv)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--toy", action="store_true",
                        help="toy BERT on CPU under TRITON_INTERPRET=1 (proves the script runs)")
    parser.add_argument("--dtypes", nargs="+", default=None, choices=sorted(DTYPES))
    parser.add_argument("--out", default=None, help="JSON lines file to append to "
                        "(default bench/results/triton_step.jsonl on CUDA, none with --toy)")
    args = parser.parse_args()
    if args.toy and not torch.cuda.is_available():
        # Triton reads this when the kernels are defined, i.e. when the backend first loads.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from dps_kernels.backends import get_backend

    backend = get_backend("triton")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = [DTYPES[d] for d in (args.dtypes or (["fp32"] if args.toy else ["fp32", "bf16"]))]
    out = args.out or (None if args.toy else str(ROOT / "bench/results/triton_step.jsonl"))
    bench = timer(device, args.toy)
    cond = conditions(device)
    shapes = bert_shapes(args.toy)
    n_params = sum(torch.Size(s).numel() for _, s, _ in shapes)
    copy_gbs = copy_bandwidth(device, bench, args.toy)
    records = []
    for dtype in dtypes:
        itemsize = torch.finfo(dtype).bits // 8
        # fused AdamW: one group, same tensors; its state is created by a first step
        base = make_tasks(shapes, dtype, device, "dense", 1)
        params = [t.param for t in base]
        for t in base:
            t.param.grad = t.grad
        adamw = torch.optim.AdamW(params, lr=2e-5, weight_decay=0.01, fused=True)
        adamw.step()
        med, q20, q80 = bench(adamw.step)
        adamw_ms = med
        gbytes = n_params * 7 * itemsize / 1e9
        records.append(dict(cond, op="fused_adamw", stage=None, dtype=str(dtype)[6:],
                            params=n_params, tensors=len(shapes), ms=med, ms_q20=q20,
                            ms_q80=q80, gb_per_s=gbytes / (med * 1e-3), vs_adamw=1.0,
                            copy_gb_per_s=copy_gbs))
        del adamw, base, params
        for mode in ("dense", "mix"):
            for stage in (1, 2):
                tasks = make_tasks(shapes, dtype, device, mode, stage)
                backend.step(tasks, False)   # compile, build and cache the tables
                med, q20, q80 = bench(lambda: backend.step(tasks, False))
                gbytes = sum(t.param.numel() * bytes_per_element(t.kind, itemsize)
                             for t in tasks) / 1e9
                records.append(dict(cond, op=f"triton_{mode}", stage=stage,
                                    dtype=str(dtype)[6:], params=n_params,
                                    tensors=len(shapes), ms=med, ms_q20=q20, ms_q80=q80,
                                    gb_per_s=gbytes / (med * 1e-3), vs_adamw=med / adamw_ms,
                                    copy_gb_per_s=copy_gbs))
                del tasks
    memory = [dict(cond, op="state_memory", **row) for row in
              measure_state_memory(device, torch.float32)]
    print(f"# Triton fused DPS step, {'toy BERT' if args.toy else 'BERT-large'} "
          f"({n_params:,} params, {len(shapes)} tensors) on {cond['device']}\n")
    print(f"torch {cond['torch']}, triton {cond['triton']}, commit {cond['git_commit']}, "
          f"interpreter={cond['interpreter']}; copy bandwidth {copy_gbs:.1f} GB/s\n")
    print("| op | stage | dtype | median ms (20-80%) | GB/s | % copy BW | x fused AdamW |")
    print("|---|---|---|---|---|---|---|")
    for r in records:
        print(f"| {r['op']} | {r['stage'] or '-'} | {r['dtype']} | {r['ms']:.3f} "
              f"({r['ms_q20']:.3f}-{r['ms_q80']:.3f}) | {r['gb_per_s']:.1f} | "
              f"{100 * r['gb_per_s'] / copy_gbs:.0f}% | {r['vs_adamw']:.2f} |")
    print("\n| mode | dtype | optimizer state bytes / DPS param (measured) | "
          "launch-table bytes / param |")
    print("|---|---|---|---|")
    for r in memory:
        print(f"| {r['mode']} | {r['dtype']} | {r['state_bytes_per_dps_param']:.2f} | "
              f"{r['table_bytes_per_param']:.4f} |")
    if out:
        with open(out, "a") as f:
            for r in records + memory:
                f.write(json.dumps(r) + "\n")
        print(f"\nappended {len(records) + len(memory)} JSON lines to {out}")


if __name__ == "__main__":
    main()
