"""CPU step benchmark: the fused C++ DPS step on the BERT-base parameter list.

Compares, in one run and on the same fp32 parameters, per DPS stage:

* ``cpu``: ``dps_kernels.backends.cpu_backend.BACKEND.step`` (one fused pass per element);
* ``fused_adamw``: ``torch.optim.AdamW(fused=True)``, PyTorch's own single-pass CPU AdamW,
  the anchor: a DPS step must move 36 bytes per Stage I element (28 for AdamW + GAM read
  and write), so 36/28 = 1.29x is the floor of a memory-bound DPS Stage I step;
* ``torch``: ``dps_kernels.backends.torch_backend.BACKEND.step`` (one op per pass).

Targets (issue 4): cpu <= 1.3x fused_adamw per stage, cpu >= 3x faster than torch.
It also times the Stage II threshold selection (radix select vs nth_element vs
torch.kthvalue) and the fused step per instruction-set variant of the kernels.

Parameters come from ``transformers.BertConfig()`` shapes (meta device, no download).
DPS targets are the ``nn.Linear`` weights, as in the paper; every other tensor takes the
PLAIN kind. Steady-state timing: warm-up calls, then many timed calls, median and
quartiles; all tensors and random numbers are made before timing.

    python -m bench.cpu_step [--repeats 30] [--out bench/results]

writes ``cpu_step.json`` (one JSON line per point) and ``cpu_step.md`` (table).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from dps_kernels import reference as ref
from dps_kernels.backends import cpu_backend, torch_backend
from dps_kernels.mask_bits import pack_subnetwork
from dps_kernels.step_types import StepKind, TensorStep
from dps_kernels.mask_hash import columns_of, keep_threshold, step_key
from dps_kernels.schedule import selected_count

ROOT = Path(__file__).resolve().parents[1]


def _git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                "csrc", "dps_kernels", "bench/cpu_step.py"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None, None
    return out.stdout.strip() or None, bool(dirty.stdout.strip())


def _machine() -> str:
    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} logical cores"


def bert_base_shapes():
    """(name, shape, is_dps_target) for every parameter of BertModel(BertConfig())."""
    from transformers import BertConfig, BertModel

    with torch.device("meta"):
        model = BertModel(BertConfig())
    linear_weights = {f"{name}.weight" for name, mod in model.named_modules()
                      if isinstance(mod, torch.nn.Linear)}
    return [(name, tuple(p.shape), name in linear_weights) for name, p in model.named_parameters()]


def interleaved(variants: dict, warmup: int, rounds: int) -> dict:
    """Times {name: (setup or None, fn)} in rounds, rotating the order every round, so
    load from other processes hits every variant alike. setup runs untimed before fn."""
    for setup, fn in variants.values():
        if setup:
            setup()
        for _ in range(warmup):
            fn()
    names = list(variants)
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            setup, fn = variants[name]
            if setup:
                setup()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def summary(samples) -> dict:
    q = statistics.quantiles(samples, n=4) if len(samples) > 1 else list(samples) * 3
    return {"median_ms": 1e3 * statistics.median(samples), "q1_ms": 1e3 * q[0],
            "q3_ms": 1e3 * q[2], "min_ms": 1e3 * min(samples), "repeats": len(samples)}


class Workload:
    """BERT-base fp32 parameters with gradients, moments and DPS state, built once."""

    def __init__(self, shapes, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.shapes = shapes
        self.params, self.grads, self.avgs, self.sqs = [], [], [], []
        self.gams, self.fams, self.factors, self.thresholds = {}, {}, {}, {}
        self.bits = {}
        for i, (_, shape, target) in enumerate(shapes):
            p = torch.randn(shape, generator=gen) * 0.02
            self.params.append(p)
            self.grads.append(torch.randn(shape, generator=gen) * 1e-3)
            self.avgs.append(torch.randn(shape, generator=gen) * 1e-4)
            self.sqs.append(torch.rand(shape, generator=gen) * 1e-6)
            if target:
                cols = columns_of(shape)
                gam = torch.rand(shape, generator=gen) * 1e-5
                fam = torch.randint(0, 20, (cols,), generator=gen).float()
                factor = ref.mix_column_factor(fam, 50)
                k = selected_count(gam.numel(), 0.3)
                self.gams[i], self.fams[i], self.factors[i] = gam, fam, factor
                self.thresholds[(i, "dense")] = ref.kth_largest(gam, k)
                self.thresholds[(i, "mix")] = ref.kth_largest(ref.mix_score(gam, factor), k)
                # the packed subnetwork DPSAdamW reads in Stage II (dps_kernels/mask_bits.py)
                for mode, factor_or_none in (("dense", None), ("mix", factor)):
                    self.bits[(i, mode)] = pack_subnetwork(gam, factor_or_none,
                                                           self.thresholds[(i, mode)])
        self.scalars = ref.adamw_scalars(1e-5, 0.9, 0.999, 1e-8, 0.01, 10)

    def numel(self, target_only=False):
        return sum(p.numel() for p, (_, _, t) in zip(self.params, self.shapes)
                   if t or not target_only)

    def tasks(self, stage: str):
        """TensorSteps of one optimizer step of the given stage (one DPS param group)."""
        kind = {"dense_stage1": StepKind.DENSE_STAGE1, "dense_stage2": StepKind.DENSE_STAGE2,
                "mix_stage1": StepKind.MIX_STAGE1, "mix_stage2": StepKind.MIX_STAGE2}[stage]
        mode = "mix" if stage.startswith("mix") else "dense"
        out = []
        for i, (_, shape, target) in enumerate(self.shapes):
            t = TensorStep(StepKind.PLAIN, self.params[i], self.grads[i], self.avgs[i],
                           self.sqs[i], self.scalars)
            if target:
                t.kind = kind
                t.gam = self.gams[i]
                t.fam = self.fams[i]
                t.column_factor = self.factors[i]
                t.threshold = self.thresholds[(i, mode)]
                t.cols = columns_of(shape)
                t.mix_key = step_key(0, i, 10)
                t.keep_threshold = keep_threshold(0.3)
                if stage.endswith("stage2"):
                    t.mask_bits = self.bits[(i, mode)]
            out.append(t)
        return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--torch-repeats", type=int, default=8,
                        help="repeats for the (slow) torch backend")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args(argv)

    reason = cpu_backend.unavailable_reason()
    if reason is not None:
        print(f"cpu backend unavailable: {reason}", file=sys.stderr)
        return 1
    commit, dirty = _git_commit()
    cond = {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(), "torch": torch.__version__, "python": platform.python_version(),
        "threads": torch.get_num_threads(), "git_commit": commit, "git_dirty": dirty,
        "isa": torch.ops.dps_cpu.isa(), "loaded": cpu_backend.how_loaded(),
        "load_average": " ".join(f"{x:.1f}" for x in os.getloadavg()),
        "command": " ".join(["python", "-m", "bench.cpu_step", *map(shlex.quote, argv or sys.argv[1:])]),
    }
    shapes = bert_base_shapes()
    work = Workload(shapes)
    n_all, n_dps = work.numel(), work.numel(target_only=True)
    print(f"BERT-base: {n_all / 1e6:.1f}M parameters ({n_dps / 1e6:.1f}M DPS targets, "
          f"{len(shapes)} tensors), fp32, {cond['threads']} threads, {cond['machine']}")
    points = []

    def record(point):
        point = {**cond, **point}
        points.append(point)
        print(json.dumps({k: v for k, v in point.items() if k not in cond}))

    # Phase A: the cpu backend per stage against fused AdamW, in interleaved rounds
    # (rotated order each round) so that load from other processes on a shared machine
    # hits every variant alike. Phase B: the torch backend against the cpu backend, also
    # interleaved, in fewer rounds (it is far slower, and its gigabytes of temporaries
    # would disturb phase A's timings if mixed in).
    fused_params = [p.clone() for p in work.params]
    for p, g in zip(fused_params, work.grads):
        p.grad = g
    fused = torch.optim.AdamW(fused_params, lr=1e-5, weight_decay=0.01, fused=True)
    stages = ("dense_stage1", "dense_stage2", "mix_stage1", "mix_stage2")
    stage_tasks = {stage: work.tasks(stage) for stage in stages}
    cpu_variants = {("cpu", stage): (None, lambda t=stage_tasks[stage]: cpu_backend.BACKEND.step(t, False))
                    for stage in stages}
    times_a = interleaved({("fused_adamw", "adamw"): (None, fused.step), **cpu_variants},
                          args.warmup, args.repeats)
    # Phase A1: the same on one thread. Both implementations fork/join per parallel
    # region (fused AdamW once per tensor, the cpu backend once per step); on a loaded
    # machine a descheduled second thread stalls every region, so the one-thread ratio is
    # the load-robust measure of the work per element.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times_a1 = interleaved({("fused_adamw", "adamw"): (None, fused.step), **cpu_variants},
                               1, max(5, args.repeats // 2))
    finally:
        torch.set_num_threads(threads)
    del fused, fused_params
    torch_variants = {("torch_backend", stage): (
        None, lambda t=stage_tasks[stage]: torch_backend.BACKEND.step(t, False)) for stage in stages}
    times_b = interleaved({**torch_variants, **cpu_variants}, 1, args.torch_repeats)

    fused_t = summary(times_a[("fused_adamw", "adamw")])
    record({"what": "step", "stage": "adamw", "impl": "fused_adamw", "phase": "A", **fused_t})
    rows = []
    for stage in stages:
        cpu_t = summary(times_a[("cpu", stage)])
        ratio_fused = cpu_t["median_ms"] / fused_t["median_ms"]
        # Same-round ratios: less sensitive to load drift than the ratio of medians.
        paired = statistics.median(c / f for c, f in zip(times_a[("cpu", stage)],
                                                          times_a[("fused_adamw", "adamw")]))
        cpu_b = summary(times_b[("cpu", stage)])
        torch_t = summary(times_b[("torch_backend", stage)])
        speedup_torch = torch_t["median_ms"] / cpu_b["median_ms"]
        best_ratio = cpu_t["min_ms"] / fused_t["min_ms"]
        fused1 = summary(times_a1[("fused_adamw", "adamw")])
        cpu1 = summary(times_a1[("cpu", stage)])
        ratio1 = cpu1["median_ms"] / fused1["median_ms"]
        record({"what": "step", "stage": stage, "impl": "cpu", "phase": "A", **cpu_t,
                "ratio_to_fused_adamw": ratio_fused, "paired_ratio_to_fused_adamw": paired,
                "best_of_ratio_to_fused_adamw": best_ratio})
        record({"what": "step", "stage": stage, "impl": "cpu", "phase": "A1", "threads": 1, **cpu1,
                "ratio_to_fused_adamw": ratio1})
        if stage == stages[0]:
            record({"what": "step", "stage": "adamw", "impl": "fused_adamw", "phase": "A1",
                    "threads": 1, **fused1})
        record({"what": "step", "stage": stage, "impl": "cpu", "phase": "B", **cpu_b,
                "speedup_vs_torch_backend": speedup_torch})
        record({"what": "step", "stage": stage, "impl": "torch_backend", "phase": "B", **torch_t})
        rows.append((stage, cpu_t, torch_t, ratio_fused, paired, best_ratio, cpu1, fused1, ratio1, speedup_torch))

    # Instruction-set variants of the span kernels on one stage (vectorisation payoff),
    # interleaved like the steps above.
    best = torch.ops.dps_cpu.isa()
    tasks = work.tasks("dense_stage1")
    isa_names = []
    for isa in ("default", "avx2", "avx512"):
        try:
            torch.ops.dps_cpu.set_isa(isa)
            isa_names.append(isa)
        except RuntimeError:  # this CPU lacks it
            pass
    isa_times = interleaved(
        {isa: (lambda isa=isa: torch.ops.dps_cpu.set_isa(isa),
               lambda: cpu_backend.BACKEND.step(tasks, False)) for isa in isa_names},
        args.warmup, args.repeats)
    torch.ops.dps_cpu.set_isa(best)
    isa_rows = []
    for isa in isa_names:
        t = summary(isa_times[isa])
        record({"what": "step_isa", "stage": "dense_stage1", "impl": f"cpu[{isa}]", **t})
        isa_rows.append((isa, t))

    # Threshold selection on the largest DPS tensor and over all DPS tensors.
    sel_rows = []
    largest = max(work.gams, key=lambda i: work.gams[i].numel())
    for label, ids in (("largest tensor", [largest]), ("all DPS tensors", list(work.gams))):
        def select(method, ids=ids):
            for i in ids:
                gam, factor = work.gams[i], work.factors[i]
                k = selected_count(gam.numel(), 0.3)
                if method == "torch.kthvalue":
                    torch_backend.BACKEND.select_threshold(gam, factor, k)
                else:
                    cpu_backend.BACKEND.select_threshold(gam, factor, k, method=method)
        def one_thread_radix():
            # The radix select is parallel; on one thread it shows the algorithmic gain
            # over nth_element without the cost of waiting for a descheduled thread.
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                select("radix")
            finally:
                torch.set_num_threads(threads)
        methods = ("radix", "radix, 1 thread", "nth_element", "torch.kthvalue")
        sel_times = interleaved({m: (None, (one_thread_radix if m == "radix, 1 thread"
                                            else lambda m=m: select(m))) for m in methods},
                                1, max(5, args.repeats // 3))
        numel = sum(work.gams[i].numel() for i in ids)
        for method in methods:
            t = summary(sel_times[method])
            record({"what": "select_mix", "scope": label, "numel": numel, "impl": method, **t})
            sel_rows.append((label, numel, method, t))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "cpu_step.json", "w") as f:
        for p in points:
            f.write(json.dumps(p) + "\n")
    md = [f"# CPU step benchmark (BERT-base, fp32)", "",
          f"- machine: {cond['machine']}; torch {cond['torch']}; threads {cond['threads']}; "
          f"kernels: {cond['isa']} ({cond['loaded']})",
          f"- commit {cond['git_commit']}{' (dirty)' if dirty else ''}; {cond['timestamp']}",
          f"- command: `{cond['command']}`",
          f"- {n_all / 1e6:.1f}M parameters in {len(shapes)} tensors, {n_dps / 1e6:.1f}M of them "
          "DPS targets (Linear weights); the rest take plain AdamW in every row",
          f"- phase A: cpu backend and fused AdamW, {args.repeats} interleaved rounds after "
          f"{args.warmup} warm-up steps; phase B: torch backend and cpu backend, "
          f"{args.torch_repeats} interleaved rounds; median, [q1, q3] in brackets",
          f"- load average at start: {cond['load_average']} (the machine is shared)", "",
          f"torch.optim.AdamW(fused=True), {cond['threads']} threads: "
          f"**{fused_t['median_ms']:.1f} ms** [{fused_t['q1_ms']:.1f}, {fused_t['q3_ms']:.1f}], "
          f"best {fused_t['min_ms']:.1f} ms", "",
          "| stage | cpu backend (ms, A) | cpu / fused AdamW: medians (target <= 1.3) "
          "| same-round | best-of | 1 thread: cpu ms / fused ms = ratio (A1) "
          "| torch backend (ms, B) | torch / cpu (B; target >= 3) |",
          "|---|---|---|---|---|---|---|---|"]
    for stage, c, t, r, pr, br, c1, f1, r1, sp in rows:
        md.append(f"| {stage} | {c['median_ms']:.1f} [{c['q1_ms']:.1f}, {c['q3_ms']:.1f}] | "
                  f"{r:.2f} | {pr:.2f} | {br:.2f} | {c1['median_ms']:.1f} / "
                  f"{f1['median_ms']:.1f} = {r1:.2f} | "
                  f"{t['median_ms']:.1f} [{t['q1_ms']:.1f}, {t['q3_ms']:.1f}] | {sp:.1f} |")
    md += ["", "Fused step per kernel variant (dense_stage1):", "",
           "| variant | ms |", "|---|---|"]
    md += [f"| {isa} | {t['median_ms']:.1f} [{t['q1_ms']:.1f}, {t['q3_ms']:.1f}] |"
           for isa, t in isa_rows]
    md += ["", "Mix threshold selection (exact k-th largest of GAM * factor, p = 0.3):", "",
           "| scope | elements | method | ms |", "|---|---|---|---|"]
    md += [f"| {label} | {numel} | {method} | {t['median_ms']:.1f} [{t['q1_ms']:.1f}, "
           f"{t['q3_ms']:.1f}] |" for label, numel, method, t in sel_rows]
    text = "\n".join(md) + "\n"
    (out / "cpu_step.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
