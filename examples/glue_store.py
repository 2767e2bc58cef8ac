"""The experiment's run store and its reports: JSON lines in, tables and box plots out.

One line per finished run, keyed by (task, method, seed, lr, train subset, hyperparameters);
a run whose key is in the file is skipped, so an interrupted experiment resumes where it
stopped and a grown one (more seeds, another task) runs only what is new.

Summary per (task, method, lr, hyperparameters): mean and sample std (n-1) of the dev metric,
n, and the failed-run count as the DPS paper uses it: runs below the mean of vanilla
fine-tuning on the same task, subset and lr.
"""
from __future__ import annotations

import json
import math
import os
from typing import Iterable, Optional


def run_key(task: str, method: str, seed: int, lr: float, subset: Optional[int],
            hparams: dict) -> str:
    return json.dumps([task, method, seed, float(lr), subset, sorted(hparams.items())])


class RunStore:
    def __init__(self, path: str):
        self.path = path
        self.rows: list[dict] = []
        if os.path.exists(path):
            with open(path) as f:
                self.rows = [json.loads(line) for line in f if line.strip()]
        self.keys = {row["key"] for row in self.rows}

    def done(self, key: str) -> bool:
        return key in self.keys

    def add(self, row: dict) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        self.rows.append(row)
        self.keys.add(row["key"])


def _stats(values: list[float]) -> tuple[float, Optional[float]]:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return float("nan"), None
    mean = sum(finite) / len(finite)
    std = (math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1))
           if len(finite) > 1 else None)
    return mean, std


def _hparams(row: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(row.get("hparams", {}).items())) or "-"


def summarize(rows: Iterable[dict]) -> list[dict]:
    """One entry per (task, subset, method, lr, hyperparameters): mean, std, n and failed
    runs, i.e. runs below the mean of vanilla fine-tuning on the same task, subset and lr."""
    groups: dict = {}
    for r in rows:
        key = (r["task"], r.get("subset"), r["method"], float(r["lr"]), _hparams(r))
        groups.setdefault(key, []).append(r)
    vanilla_mean = {}
    for (task, subset, method, lr, _), runs in groups.items():
        if method == "vanilla":
            vanilla_mean[(task, subset, lr)] = _stats([r["value"] for r in runs])[0]
    out = []
    for (task, subset, method, lr, hparams), runs in sorted(groups.items()):
        values = [r["value"] for r in sorted(runs, key=lambda r: r["seed"])]
        mean, std = _stats(values)
        base = vanilla_mean.get((task, subset, lr))
        failed = None if base is None else sum(1 for v in values if math.isnan(v) or v < base)
        out.append({"task": task, "subset": subset, "method": method, "lr": lr,
                    "hparams": hparams, "metric": runs[0]["metric"], "n": len(values),
                    "mean": mean, "std": std, "failed": failed, "values": values,
                    "seeds": sorted(r["seed"] for r in runs)})
    return out


def main_entries(summary: list[dict]) -> list[dict]:
    """Per (task, subset, method, hyperparameters) the lr with the most runs (the
    experiment's; the others are a vanilla lr search)."""
    best: dict = {}
    for s in summary:
        key = (s["task"], s["subset"], s["method"], s["hparams"])
        if key not in best or (s["n"], s["mean"]) > (best[key]["n"], best[key]["mean"]):
            best[key] = s
    return list(best.values())


def _cell(s: Optional[dict], with_lr: bool = True) -> str:
    if s is None:
        return "-"
    std = "n/a" if s["std"] is None else f"{s['std']:.2f}"
    failed = "" if s["failed"] is None else f", {s['failed']} failed"
    lr = f"; lr {s['lr']:g}" if with_lr else ""
    return f"{s['mean']:.2f} ± {std} (n={s['n']}{failed}{lr})"


def markdown(summary: list[dict], methods: list[str], labels: dict) -> str:
    """Methods down, tasks across: ``mean ± std (n, failed; lr)``, one table per subset, then
    every lr of the vanilla runs (the lr search)."""
    lines = []
    main = main_entries(summary)
    for subset in sorted({s["subset"] for s in summary}, key=lambda s: (s is None, s)):
        part = [s for s in main if s["subset"] == subset]
        tasks = sorted({s["task"] for s in part})
        title = "full train set" if subset is None else f"{subset} training examples"
        metric = {t: next(s["metric"] for s in part if s["task"] == t) for t in tasks}
        lines += [f"### {title}", "",
                  "| method | hyperparameters | " + " | ".join(f"{t} ({metric[t]})" for t in tasks)
                  + " |", "|---|---|" + "---|" * len(tasks)]
        rows = []
        for m in methods:
            for s in part:
                if s["method"] == m and (m, s["hparams"]) not in rows:
                    rows.append((m, s["hparams"]))
        for m, hp in rows:
            cells = [_cell(next((s for s in part if (s["task"], s["method"], s["hparams"])
                                 == (t, m, hp)), None)) for t in tasks]
            lines.append(f"| {labels.get(m, m)} | {hp} | " + " | ".join(cells) + " |")
        search = [s for s in summary if s["subset"] == subset and s["method"] == "vanilla"]
        if len({s["lr"] for s in search}) > 1:
            lines += ["", f"vanilla at every lr run ({title}; the lr of the table above is "
                      "the one with the most runs):", "", "| lr | " + " | ".join(tasks) + " |",
                      "|---|" + "---|" * len(tasks)]
            for lr in sorted({s["lr"] for s in search}):
                cells = [_cell(next((s for s in search if (s["task"], s["lr"]) == (t, lr)),
                                    None), with_lr=False) for t in tasks]
                lines.append(f"| {lr:g} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("mean ± sample std over seeds of the dev metric (x100); failed = runs below "
                 "the vanilla mean of the same task and lr (the paper's definition of a "
                 "failed run, against vanilla).")
    return "\n".join(lines)


def box_plots(summary: list[dict], methods: list[str], labels: dict, out_dir: str) -> list[str]:
    """One PNG per (task, subset): the per-seed values of each method (Figure 2 style)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    main = main_entries(summary)
    for task, subset in sorted({(s["task"], s["subset"]) for s in main},
                               key=lambda x: (x[0], x[1] is None, x[1])):
        part = [s for s in main if (s["task"], s["subset"]) == (task, subset)]
        part = [s for m in methods for s in part if s["method"] == m]
        if not part:
            continue
        fig, ax = plt.subplots(figsize=(1.1 * len(part) + 2, 4))
        ax.boxplot([[v for v in s["values"] if not math.isnan(v)] for s in part])
        ax.set_xticks(range(1, len(part) + 1))
        ax.set_xticklabels([labels.get(s["method"], s["method"]).replace(" (", "\n(")
                            for s in part], fontsize=7)
        ax.set_ylabel(part[0]["metric"])
        ax.set_title(f"{task}, {'full' if subset is None else subset} train, "
                     f"n={min(s['n'] for s in part)}-{max(s['n'] for s in part)} seeds")
        fig.tight_layout()
        path = os.path.join(out_dir, f"{task}_{'full' if subset is None else subset}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def subnetwork_p(method: str, hparams: str) -> Optional[float]:
    """The Figure 2 probability of a summary entry: ``p`` (DPS, Mixout) or ``1 - reserve_p``
    (CHILD-TUNING_D); None for a method without one (vanilla)."""
    values = dict(item.split("=", 1) for item in hparams.split(", ") if "=" in item)
    if "p" in values:
        return float(values["p"])
    if "reserve_p" in values:
        return round(1.0 - float(values["reserve_p"]), 10)
    return None


def p_sweep_plots(summary: list[dict], methods: list[str], labels: dict, out_dir: str,
                  ps: Optional[list] = None) -> list[str]:
    """Figure 2 of the paper: per (task, subset) one PNG, ``<TASK>_<subset>_p_sweep.png``, with
    a box per (method, p) over seeds (solid dot: mean; hollow: outliers) and vanilla's box and
    mean (dashed line; runs below it are the failed runs). ``ps``: only these p (a merged
    store may hold other points, e.g. the Table 3 default of CHILD-TUNING_D)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    main = main_entries(summary)
    colours = ["0.6", "tab:orange", "tab:green", "tab:blue", "tab:purple", "tab:red"]
    for task, subset in sorted({(s["task"], s["subset"]) for s in main},
                               key=lambda x: (x[0], x[1] is None, x[1])):
        part = [s for s in main if (s["task"], s["subset"]) == (task, subset)]
        boxes = []   # (method index, p, entry)
        for i, m in enumerate(methods):
            entries = [s for s in part if s["method"] == m and (
                ps is None or subnetwork_p(m, s["hparams"]) is None
                or any(abs(subnetwork_p(m, s["hparams"]) - p) < 1e-9 for p in ps))]
            entries.sort(key=lambda s: (subnetwork_p(m, s["hparams"]) is None,
                                        subnetwork_p(m, s["hparams"]) or 0.0))
            boxes += [(i, subnetwork_p(m, s["hparams"]), s) for s in entries]
        if not boxes:
            continue
        fig, ax = plt.subplots(figsize=(0.55 * len(boxes) + 2.5, 4))
        data = [[v for v in s["values"] if not math.isnan(v)] for _, _, s in boxes]
        bp = ax.boxplot(data, patch_artist=True,
                        flierprops={"marker": "o", "markerfacecolor": "none"})
        for patch, (i, _, _) in zip(bp["boxes"], boxes):
            patch.set_facecolor(colours[i % len(colours)])
            patch.set_alpha(0.5)
        ax.plot(range(1, len(boxes) + 1), [s["mean"] for _, _, s in boxes], "ko", ms=4,
                linestyle="none", label="mean")
        vanilla = next((s for _, _, s in boxes if s["method"] == "vanilla"), None)
        if vanilla is not None:
            ax.axhline(vanilla["mean"], color="0.3", linestyle="--", linewidth=0.8,
                       label="vanilla mean")
        ax.set_xticks(range(1, len(boxes) + 1))
        ax.set_xticklabels([labels.get(s["method"], s["method"]).split(" (")[0]
                            .replace("CHILD-TUNING_D", "CT_D")   # the paper's short name
                            + ("" if p is None else f"\np={p:g}") for _, p, s in boxes],
                           fontsize=6)
        ax.set_ylabel(part[0]["metric"])
        ns = [s["n"] for _, _, s in boxes]
        ax.set_title(f"{task}, {'full' if subset is None else subset} train: p sweep, "
                     f"n={min(ns)}-{max(ns)} seeds", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        path = os.path.join(out_dir, f"{task}_{'full' if subset is None else subset}_p_sweep.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
