"""End-to-end training-step benchmark: DPS against vanilla AdamW and the authors' approach.

One process trains ``BertForSequenceClassification`` (built from a config, random init,
no download) on fixed synthetic batches with each variant: one variant at a time on GPU
(each needs its own peak-memory figure), side by side one step each in turn on CPU (a
shared CPU's load then hits every variant alike):

============== ==========================================================================
vanilla        ``torch.optim.AdamW`` (fused where this torch has it, else foreach)
authors_dense  authors-style DPS Dense (bench/baselines) + the same AdamW
authors_mix    authors-style DPS Mix (Mixout-style mixing in every forward) + same AdamW
dps_dense      ``dps_kernels.DPSAdamW.from_model(mode="dense")``
dps_mix        ``dps_kernels.DPSAdamW.from_model(mode="mix")``
============== ==========================================================================

Schedule of one variant (``us`` = update steps): the whole first cycle (2*us steps) and
``warmup`` steps of the second are untimed warm-up, so every lazy allocation, kernel
compilation and first selection has happened once; the timed window is the rest of the
second cycle: Stage I, the selection at its end, and all of Stage II. Each step is timed
alone (``torch.cuda.synchronize`` around it on GPU); nothing is allocated or drawn at
random inside the timed region except what the variant itself does.

Memory: on GPU the peak of ``torch.cuda.max_memory_allocated`` over building the model and
optimizer and training (the paper's Appendix F measures whole-process GPU memory); on CPU
the peak is not measured. On both, the bytes of optimizer state (plus the authors-style
DPS tensors) at the end of the window, when Stage II holds everything.
"""
from __future__ import annotations

import argparse
import copy
import gc
import math
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from bench.baselines.authors_style import AuthorsStyleDPS, no_decay_groups
from bench.env import run_conditions
from dps_kernels.schedule import STAGE_ONE, stage_of

VARIANTS = ("vanilla", "authors_dense", "authors_mix", "dps_dense", "dps_mix")

# BERT shapes. "large" is the paper's BERT-large-cased; "cpu" keeps the proportions of a
# BERT block (intermediate = 4 x hidden, most weights in nn.Linear) at a size one core
# trains in a fraction of a second per step; "quick" is for the smoke test.
MODEL_SHAPES = {
    "large": dict(vocab_size=28996, hidden_size=1024, num_hidden_layers=24,
                  num_attention_heads=16, intermediate_size=4096, max_position_embeddings=512),
    "cpu": dict(vocab_size=8192, hidden_size=256, num_hidden_layers=4,
                num_attention_heads=4, intermediate_size=1024, max_position_embeddings=128),
    "quick": dict(vocab_size=128, hidden_size=32, num_hidden_layers=1,
                  num_attention_heads=2, intermediate_size=48, max_position_embeddings=32),
}
# Per-device defaults: (model shape, batch, sequence length, precision, update steps, warmup).
DEFAULTS = {
    "cuda": ("large", 16, 128, "bf16", 20, 5),
    "cpu": ("cpu", 8, 64, "fp32", 20, 4),
    "quick": ("quick", 2, 16, "fp32", 3, 1),
}


@dataclass
class Result:
    variant: str
    times_s: list            # per timed step
    stages: list             # stage of each timed step (1 or 2)
    change_index: int        # index in times_s of the last Stage I step
    final_loss: float
    first_loss: float
    last_stage: object       # 1, 2 or None (vanilla)
    selected_fraction: object
    state_bytes: int
    peak_memory_bytes: object
    backend: str
    optimizer_impl: str
    change_pair_s: float = 0.0  # the last Stage I step + the first Stage II step
    runs: int = 1


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    ap.add_argument("--quick", action="store_true", help="tiny model and window (smoke test)")
    ap.add_argument("--model", choices=sorted(MODEL_SHAPES), default=None,
                    help="BERT shape (default: large on GPU, cpu on CPU)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default=None,
                    help="bf16 autocast, fp16 autocast with GradScaler, or fp32 "
                         "(default: bf16 on GPU, fp32 on CPU)")
    ap.add_argument("--update-steps", type=int, default=None, help="DPS steps per stage")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed steps of the second cycle, after the untimed first cycle")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"comma-separated subset of {','.join(VARIANTS)}")
    ap.add_argument("--backend", default="auto", choices=("auto", "torch", "triton", "cpu"),
                    help="dps_kernels backend of the dps_* variants (default auto)")
    ap.add_argument("--p", type=float, default=0.3, help="DPS p (fraction not updated)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--clip", type=float, default=1.0, help="gradient clipping norm (0: off)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="run every variant this many times, in rotated order, and pool the "
                         "timed steps (evens out load drift on a shared machine)")
    ap.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=None,
                    help="train all variants side by side, one step of each in turn, so that "
                         "they share the machine's load (default: on for CPU; off for GPU, "
                         "where each variant needs its own peak-memory measurement)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/out", help="folder for the .md, .jsonl and .png")
    ap.add_argument("--name", default=None, help="file stem (default: <device>_e2e)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    key = "quick" if args.quick else device.type
    shape, batch, seq, precision, us, warmup = DEFAULTS[key]
    args.model = args.model or shape
    args.batch = args.batch or batch
    args.seq = args.seq or seq
    args.precision = args.precision or precision
    args.update_steps = args.update_steps or us
    args.warmup = warmup if args.warmup is None else args.warmup
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in args.variants:
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.update_steps < 2:
        ap.error(f"--update-steps must be >= 2 (Stage II must last a step after the "
                 f"selection is inspected), got {args.update_steps}")
    if not 0 <= args.warmup < args.update_steps:
        ap.error(f"--warmup must be in [0, update_steps), got {args.warmup}")
    if args.precision == "fp16" and device.type != "cuda":
        ap.error("--precision fp16 (GradScaler) needs a CUDA device")
    if args.seq > MODEL_SHAPES[args.model]["max_position_embeddings"]:
        ap.error(f"--seq {args.seq} exceeds the model's max_position_embeddings")
    if args.quick and args.threads is None:
        # Tensors of the quick model are tiny: intra-op threads only add synchronisation,
        # which on a busy machine turned 3 ms steps into 50-500 ms ones.
        args.threads = 1
    if args.interleave is None:
        args.interleave = device.type != "cuda"
    if args.interleave and device.type == "cuda":
        ap.error("--interleave mixes the variants' GPU memory; it is for CPU runs only")
    args.name = args.name or f"{device.type}_e2e"
    return args


# -------------------------------------------------------------------------- model, data
def build_base_model(args):
    import transformers

    config = transformers.BertConfig(**MODEL_SHAPES[args.model], num_labels=2)
    torch.manual_seed(args.seed)
    return transformers.BertForSequenceClassification(config)


def make_batches(args, vocab, device, count=4):
    """A few fixed batches, made once, outside any timed region.

    The label is whether the second token lies in the upper half of the vocabulary, a task
    the model can learn, so the final loss says whether training moves at all.
    """
    g = torch.Generator().manual_seed(args.seed + 1)
    out = []
    for _ in range(count):
        ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g)
        labels = (ids[:, 1] >= vocab // 2).long()
        out.append({"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
                    "labels": labels.to(device)})
    return out


def dps_linear_numel(model) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of every tensor in ``optimizer.state``; storages shared by two entries count once."""
    seen, total = set(), 0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                key = (value.untyped_storage().data_ptr(), value.device)
                if key not in seen:
                    seen.add(key)
                    total += value.untyped_storage().nbytes()
    return total


def vanilla_adamw(params, args):
    """torch AdamW, fused where this torch and device support it (else foreach)."""
    try:
        return torch.optim.AdamW(params, lr=args.lr, fused=True), "fused"
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.AdamW(params, lr=args.lr, foreach=True), "foreach"


def build_variant(variant, model, args, device):
    """(optimizer, authors-style wiring or None, backend name, optimizer implementation)."""
    us, wd = args.update_steps, args.weight_decay
    if variant == "vanilla" or variant.startswith("authors_"):
        opt, impl = vanilla_adamw(no_decay_groups(model, wd), args)
        if variant == "vanilla":
            return opt, None, "-", impl
        authors = AuthorsStyleDPS(model, mode=variant.split("_")[1], p=args.p, update_steps=us)
        return opt, authors, "authors-style", impl
    from dps_kernels import DPSAdamW
    from dps_kernels.backends import auto_backend_name

    opt = DPSAdamW.from_model(model, weight_decay=wd, lr=args.lr, mode=variant.split("_")[1],
                              p=args.p, update_steps=us, seed=args.seed, backend=args.backend)
    backend = auto_backend_name(device.type) if args.backend == "auto" else args.backend
    return opt, None, backend, "DPSAdamW"


def selected_fraction(opt, authors):
    if authors is not None:
        masks = [layer.mask for layer in authors.layers if layer.mask is not None]
        if not masks:
            return None
        return sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)
    if hasattr(opt, "selected_fraction"):
        return opt.selected_fraction()
    return None


# -------------------------------------------------------------------------- one variant
class VariantRun:
    """One variant's model, optimizer and step loop; ``step(t)`` trains and times step t."""

    def __init__(self, variant, base_model, batches, args, device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        self.variant, self.args, self.device, self.batches = variant, args, device, batches
        self.model = copy.deepcopy(base_model).to(device)
        self.model.train()
        self.opt, self.authors, self.backend, self.impl = build_variant(variant, self.model,
                                                                        args, device)
        self.us = args.update_steps
        self.total = 4 * self.us  # two cycles: cycle 1 and `warmup` steps of cycle 2 untimed
        self.first_timed = 2 * self.us + args.warmup + 1
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
        self.autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else nullcontext
        self.scaler = torch.amp.GradScaler("cuda") if args.precision == "fp16" else None
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.times, self.stages, self.losses, self.fraction = [], [], [], None

    def step(self, t: int) -> None:
        model, opt, scaler = self.model, self.opt, self.scaler
        batch = self.batches[(t - 1) % len(self.batches)]
        # Dropout (and the authors-style Bernoulli masks) draw from the global RNG; seeding
        # per step, outside the timer, gives every variant the same draws in either order.
        torch.manual_seed(self.args.seed * 1_000_003 + t)
        if self.cuda:
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with self.autocast():
            loss = model(**batch).loss
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
        else:
            loss.backward()
        if self.args.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.args.clip)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        if self.cuda:
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - start
        self.losses.append(float(loss.detach()))  # after the timer: .item() would sync
        if t >= self.first_timed:
            self.times.append(elapsed)
            self.stages.append(stage_of(t, self.us))
        if t == self.total - 1:
            # The next (last) step is still Stage II: its subnetwork is the current one.
            self.fraction = selected_fraction(opt, self.authors)

    def finish(self) -> Result:
        """The figures of this run; frees the model and optimizer."""
        authors, us = self.authors, self.us
        state = optimizer_state_bytes(self.opt) + (authors.state_bytes() if authors else 0)
        peak = torch.cuda.max_memory_allocated(self.device) if self.cuda else None
        is_dps = self.variant != "vanilla"
        change = 3 * us - self.first_timed  # index of the last Stage I step among timed ones
        result = Result(variant=self.variant, times_s=self.times, stages=self.stages,
                        change_index=change,
                        change_pair_s=self.times[change] + self.times[change + 1],
                        final_loss=self.losses[-1], first_loss=self.losses[0],
                        last_stage=stage_of(self.total, us) if is_dps else None,
                        selected_fraction=self.fraction if is_dps else None,
                        state_bytes=state, peak_memory_bytes=peak, backend=self.backend,
                        optimizer_impl=self.impl)
        if authors is not None:
            authors.detach()
        self.model = self.opt = self.authors = None
        return result


def run_sequential(variants, base_model, batches, args, device, progress=None):
    """Each variant alone, one after the other: required for per-variant peak GPU memory."""
    results = []
    for variant in variants:
        if progress is not None:
            progress.set_postfix_str(variant)
        run = VariantRun(variant, base_model, batches, args, device)
        for t in range(1, run.total + 1):
            run.step(t)
            if progress is not None:
                progress.update(1)
        results.append(run.finish())
    return results


def run_interleaved(variants, base_model, batches, args, device, progress=None):
    """All variants side by side, step t of each in turn (order rotated every step).

    On a shared CPU the load changes from second to second; interleaving makes every
    variant see the same load, so the ratios to vanilla stay meaningful. Peak memory per
    variant cannot be separated this way, hence CPU only.
    """
    runs = [VariantRun(v, base_model, batches, args, device) for v in variants]
    for t in range(1, runs[0].total + 1):
        shift = t % len(runs)
        for run in runs[shift:] + runs[:shift]:
            run.step(t)
            if progress is not None:
                progress.update(1)
    return [run.finish() for run in runs]


def pool_runs(runs):
    """One Result from repeated runs of a variant: timed steps pooled, the rest from run 1.

    Runs of one variant are deterministic apart from time (same seed, same batches), so
    loss, stage, selection and state bytes agree; the peak memory is the largest seen.
    The stage-change pair is the median over runs.
    """
    first = runs[0]
    if len(runs) == 1:
        return first
    times, stages = [], []
    for r in runs:
        times += r.times_s
        stages += r.stages
    pairs = [r.change_pair_s for r in runs]
    peaks = [r.peak_memory_bytes for r in runs if r.peak_memory_bytes is not None]
    pooled = copy.copy(first)
    pooled.times_s, pooled.stages = times, stages
    pooled.change_pair_s = statistics.median(pairs)
    pooled.peak_memory_bytes = max(peaks) if peaks else None
    pooled.runs = len(runs)
    return pooled


# -------------------------------------------------------------------------- summary
def summarize(results, base_model, args, device, conditions):
    """One dict per variant with every figure of the table, ratios to vanilla included."""
    n_params = sum(p.numel() for p in base_model.parameters() if p.requires_grad)
    n_dps = dps_linear_numel(base_model)
    vanilla = next((r for r in results if r.variant == "vanilla"), None)
    rows = []
    for r in results:
        median = statistics.median(r.times_s)
        stage1 = [t for t, s in zip(r.times_s, r.stages) if s == STAGE_ONE]
        stage2 = [t for t, s in zip(r.times_s, r.stages) if s != STAGE_ONE]
        # The selection runs in the last Stage I step (dps_kernels, in step()) or in the
        # first Stage II forward (authors-style): the pair of steps around it holds it.
        change = r.change_pair_s
        row = {
            "bench": "e2e", "variant": r.variant, "backend": r.backend,
            "optimizer_impl": r.optimizer_impl,
            "final_loss": r.final_loss, "first_loss": r.first_loss,
            "last_stage": r.last_stage, "selected_fraction": r.selected_fraction,
            "median_step_s": median, "mean_step_s": sum(r.times_s) / len(r.times_s),
            "p10_step_s": _quantile(r.times_s, 0.1), "p90_step_s": _quantile(r.times_s, 0.9),
            "stage1_median_s": statistics.median(stage1) if stage1 else None,
            "stage2_median_s": statistics.median(stage2) if stage2 else None,
            "stage_change_pair_s": change,
            "timed_steps": len(r.times_s), "runs": r.runs,
            "samples_per_s": args.batch / median,
            "tokens_per_s": args.batch * args.seq / median,
            "peak_memory_bytes": r.peak_memory_bytes,
            "state_bytes": r.state_bytes,
            "state_bytes_per_param": r.state_bytes / n_params,
            "params": n_params, "dps_params": n_dps,
        }
        if vanilla is not None:
            v_median = statistics.median(vanilla.times_s)
            row["time_ratio"] = median / v_median
            row["mean_time_ratio"] = row["mean_step_s"] / (sum(vanilla.times_s) / len(vanilla.times_s))
            row["extra_state_bytes_per_dps_param"] = (r.state_bytes - vanilla.state_bytes) / n_dps
            if r.peak_memory_bytes is not None:
                row["memory_ratio"] = r.peak_memory_bytes / vanilla.peak_memory_bytes
                row["extra_peak_bytes_per_dps_param"] = (
                    (r.peak_memory_bytes - vanilla.peak_memory_bytes) / n_dps)
        row["config"] = {
            "model": args.model, **MODEL_SHAPES[args.model], "batch": args.batch,
            "seq": args.seq, "precision": args.precision, "update_steps": args.update_steps,
            "warmup": args.warmup, "repeats": args.repeats, "interleave": args.interleave, "p": args.p, "lr": args.lr,
            "weight_decay": args.weight_decay, "clip": args.clip, "seed": args.seed,
            "torch_threads": torch.get_num_threads(),
        }
        row.update(conditions)
        rows.append(row)
    return rows


def _quantile(values, q):
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def main(argv=None):
    from bench import report

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    conditions = run_conditions(device, args.argv)
    base_model = build_base_model(args)
    batches = make_batches(args, base_model.config.vocab_size, device)
    steps = 4 * args.update_steps * len(args.variants) * args.repeats
    progress = None
    if not args.no_progress:
        from tqdm.auto import tqdm
        progress = tqdm(total=steps, unit="step", desc="e2e", leave=False)
    runs = {v: [] for v in args.variants}
    try:
        for rep in range(args.repeats):
            # Rotate the order so that no variant always runs first (cold caches) or last.
            shift = rep % len(args.variants)
            order = args.variants[shift:] + args.variants[:shift]
            run_all = run_interleaved if args.interleave else run_sequential
            for result in run_all(order, base_model, batches, args, device, progress):
                runs[result.variant].append(result)
    finally:
        if progress is not None:
            progress.close()
    results = [pool_runs(runs[v]) for v in args.variants]
    rows = summarize(results, base_model, args, device, conditions)
    paths = report.write_all(rows, args.out, args.name)
    print(report.markdown(rows))
    print("\nwrote " + ", ".join(str(p) for p in paths))
    return rows


__all__ = ["main", "parse_args", "VARIANTS", "MODEL_SHAPES"]
