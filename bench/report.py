"""Benchmark output: a Markdown table, JSON lines and a PNG chart from the summary rows.

Each row (one per variant) already carries the run conditions (device, versions, commit,
command, time), so every JSON line stands on its own.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

STAGE_NAMES = {1: "I", 2: "II"}


def _ms(seconds):
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def _num(value, fmt):
    return "-" if value is None else format(value, fmt)


def _gib(n):
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def conditions_lines(row) -> list[str]:
    c = row["config"]
    commit = (row.get("git_commit") or "unknown")[:12]
    if row.get("git_dirty"):
        commit += " (modified tracked files)"
    return [
        f"- device: {row['device']} ({row['device_name']}); torch {row['torch']}, "
        f"transformers {row['transformers']}, python {row['python']}",
        f"- model: BertForSequenceClassification '{c['model']}' (hidden {c['hidden_size']}, "
        f"{c['num_hidden_layers']} layers, intermediate {c['intermediate_size']}, vocab "
        f"{c['vocab_size']}), {row['params']:,} parameters, {row['dps_params']:,} in DPS "
        f"(nn.Linear weights)",
        f"- batch {c['batch']}, sequence {c['seq']}, {c['precision']}, clip {c['clip']}, "
        f"lr {c['lr']}, weight decay {c['weight_decay']}, p {c['p']}, update steps "
        f"{c['update_steps']}; timed: steps {2 * c['update_steps'] + c['warmup'] + 1}-"
        f"{4 * c['update_steps']} of each run (Stage I, selection, Stage II), "
        f"{row['runs']} run(s) per variant"
        f"{', variants interleaved step by step' if c.get('interleave') else ', one variant at a time'}"
        f", {row['timed_steps']} timed steps pooled per variant; torch threads {c['torch_threads']}",
        f"- commit {commit}, {row['timestamp']}; command: `{row['command']}`",
    ]


def markdown(rows) -> str:
    head = ("| variant | backend | final loss | stage | selected | median step ms | x vanilla "
            "| mean x vanilla | Stage I / II median ms | stage change (2 steps) ms | samples/s "
            "| peak GPU mem | x vanilla mem | state B/param | extra state B/DPS param |")
    lines = ["## End-to-end training step", ""] + conditions_lines(rows[0])
    lines += ["", head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["variant"], r["backend"], f"{r['final_loss']:.4f}",
            STAGE_NAMES.get(r["last_stage"], "-"),
            _num(r["selected_fraction"], ".4f"),
            _ms(r["median_step_s"]), _num(r.get("time_ratio"), ".3f"),
            _num(r.get("mean_time_ratio"), ".3f"),
            f"{_ms(r['stage1_median_s'])} / {_ms(r['stage2_median_s'])}",
            _ms(r["stage_change_pair_s"]), f"{r['samples_per_s']:.1f}",
            _gib(r["peak_memory_bytes"]), _num(r.get("memory_ratio"), ".3f"),
            f"{r['state_bytes_per_param']:.2f}",
            _num(r.get("extra_state_bytes_per_dps_param"), ".2f"),
        ]) + " |")
    lines.append("")
    lines.append("stage: stage of the last timed step; selected: fraction of DPS elements in "
                 "the Stage II subnetwork; state: optimizer state (+ authors-style DPS tensors) "
                 "at the end of Stage II." + ("" if rows[0]["peak_memory_bytes"] is not None else
                                              " Peak GPU memory: n/a on CPU."))
    return "\n".join(lines)


def write_jsonl(rows, path) -> None:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r, sort_keys=True) + "\n")


def write_png(rows, path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on benchmark machines
    import matplotlib.pyplot as plt

    names = [r["variant"] for r in rows]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    medians = [r["median_step_s"] * 1e3 for r in rows]
    errs = [[m - r["p10_step_s"] * 1e3 for m, r in zip(medians, rows)],
            [r["p90_step_s"] * 1e3 - m for m, r in zip(medians, rows)]]
    bars = ax_t.bar(names, medians, yerr=errs, capsize=3, color="#4c72b0")
    for bar, r in zip(bars, rows):
        if r.get("time_ratio") is not None:
            # Inside the bar, where the p10-p90 whisker cannot cover it.
            ax_t.annotate(f"x{r['time_ratio']:.2f}", (bar.get_x() + bar.get_width() / 2,
                          bar.get_height() / 2), ha="center", va="center", fontsize=9,
                          color="white")
    ax_t.set_ylabel("median step time, ms (p10-p90)")
    ax_t.set_title("time per training step")
    if rows[0]["peak_memory_bytes"] is not None:
        values = [r["peak_memory_bytes"] / 2**30 for r in rows]
        ax_m.set_ylabel("peak GPU memory, GiB")
        ax_m.set_title("peak GPU memory")
    else:
        values = [r["state_bytes_per_param"] for r in rows]
        ax_m.set_ylabel("optimizer state, bytes per parameter")
        ax_m.set_title("optimizer state (peak GPU memory n/a on CPU)")
    ax_m.bar(names, values, color="#dd8452")
    for ax in (ax_t, ax_m):
        ax.tick_params(axis="x", rotation=20)
    r0 = rows[0]
    c = r0["config"]
    fig.suptitle(f"{r0['device_name'][:60]} | BERT '{c['model']}' batch {c['batch']} seq "
                 f"{c['seq']} {c['precision']} | {(r0.get('git_commit') or 'unknown')[:10]}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_all(rows, out_dir, name) -> list[Path]:
    out = Path(out_dir)
    os.makedirs(out, exist_ok=True)
    md, jl, png = out / f"{name}.md", out / f"{name}.jsonl", out / f"{name}.png"
    md.write_text(markdown(rows) + "\n")
    write_jsonl(rows, jl)
    write_png(rows, png)
    return [md, jl, png]


if __name__ == "__main__":
    # Re-render the table and chart of a saved run: python -m bench.report RUN.jsonl
    import sys

    for jsonl in sys.argv[1:]:
        saved = read_jsonl(jsonl)
        stem = Path(jsonl).with_suffix("")
        Path(f"{stem}.md").write_text(markdown(saved) + "\n")
        write_png(saved, f"{stem}.png")
        print(f"re-rendered {stem}.md and {stem}.png from {jsonl}")
