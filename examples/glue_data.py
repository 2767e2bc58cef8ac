"""Readers for the GLUE TSV files (the layout of the original GLUE download).

Every file is parsed with quoting disabled: MRPC and SST-2 contain bare ``"`` characters
that the csv module would otherwise take as the start of a quoted field and merge lines.
Headers are matched by name where a file has one (MRPC's starts with a byte-order mark,
removed by reading as ``utf-8-sig``); CoLA has none and is read by position.

Labels follow the integer coding of ``datasets.load_dataset("glue", ...)`` so that the
TSV path and the hub fallback train the same model: RTE/QNLI entailment=0,
not_entailment=1; MRPC 1=paraphrase; CoLA 1=acceptable; SST-2 1=positive; STS-B a float
score in [0, 5].
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from typing import Optional, Union


@dataclass(frozen=True)
class Example:
    text_a: str
    text_b: Optional[str]
    label: Union[int, float]


@dataclass(frozen=True)
class TaskSpec:
    name: str            # folder name under the GLUE directory
    hub_name: str        # config name of datasets' "glue"
    text_a: str          # column of the first sentence (header name, or index for CoLA)
    text_b: Optional[str]
    label: str
    label_names: Optional[tuple]  # string labels in id order; None when labels are ints/floats
    metric: str          # the paper's metric (a key of glue_metrics.METRICS)
    has_header: bool = True

    @property
    def is_regression(self) -> bool:
        return self.metric in ("spearman", "pearson")

    @property
    def num_labels(self) -> int:
        return 1 if self.is_regression else 2


TASKS = {
    "RTE": TaskSpec("RTE", "rte", "sentence1", "sentence2", "label",
                    ("entailment", "not_entailment"), "accuracy"),
    "MRPC": TaskSpec("MRPC", "mrpc", "#1 String", "#2 String", "Quality", None, "f1"),
    # CoLA columns: source, label, original label (empty), sentence
    "CoLA": TaskSpec("CoLA", "cola", "3", None, "1", None, "matthews", has_header=False),
    "STS-B": TaskSpec("STS-B", "stsb", "sentence1", "sentence2", "score", None, "spearman"),
    "SST-2": TaskSpec("SST-2", "sst2", "sentence", None, "label", None, "accuracy"),
    "QNLI": TaskSpec("QNLI", "qnli", "question", "sentence", "label",
                     ("entailment", "not_entailment"), "accuracy"),
}

_HUB_COLUMNS = {  # datasets' "glue" column names per config
    "rte": ("sentence1", "sentence2"), "mrpc": ("sentence1", "sentence2"),
    "cola": ("sentence", None), "stsb": ("sentence1", "sentence2"),
    "sst2": ("sentence", None), "qnli": ("question", "sentence"),
}


def task_spec(task: str) -> TaskSpec:
    try:
        return TASKS[task]
    except KeyError:
        raise ValueError(f"unknown GLUE task {task!r}; expected one of {sorted(TASKS)}") from None


def _convert_label(spec: TaskSpec, raw: str, where: str):
    raw = raw.strip()
    if spec.is_regression:
        return float(raw)
    if spec.label_names is not None:
        if raw not in spec.label_names:
            raise ValueError(f"{where}: label {raw!r} is not one of {spec.label_names}")
        return spec.label_names.index(raw)
    value = int(raw)
    if value not in (0, 1):
        raise ValueError(f"{where}: label {value} is not 0 or 1")
    return value


def read_tsv(path: str, task: str) -> list[Example]:
    """All examples of one GLUE TSV file (``train.tsv`` or ``dev.tsv``) of ``task``."""
    spec = task_spec(task)
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if spec.has_header:
        header, rows = rows[0], rows[1:]
        missing = [c for c in (spec.text_a, spec.text_b, spec.label) if c and c not in header]
        if missing:
            raise ValueError(f"{path}: header {header} lacks columns {missing}")
        col = {name: header.index(name) for name in header}
        ia, ib, il = col[spec.text_a], (col[spec.text_b] if spec.text_b else None), col[spec.label]
        width = len(header)
    else:
        ia, ib, il = int(spec.text_a), (int(spec.text_b) if spec.text_b else None), int(spec.label)
        width = None
    examples = []
    for lineno, row in enumerate(rows, start=2 if spec.has_header else 1):
        where = f"{path}:{lineno}"
        if (width is not None and len(row) != width) or len(row) <= max(ia, il, ib or 0):
            raise ValueError(f"{where}: {len(row)} fields, expected {width or max(ia, il) + 1}")
        examples.append(Example(row[ia], row[ib] if ib is not None else None,
                                _convert_label(spec, row[il], where)))
    return examples


def load_split(task: str, split: str, data_dir: Optional[str]) -> list[Example]:
    """``split`` ("train" or "dev") of ``task`` from ``data_dir/<task>/<split>.tsv``.

    When ``data_dir`` is None or does not hold the file, fall back to the hub copy via
    ``datasets`` if it is installed (this needs network access once); otherwise raise
    with the ways out spelled out.
    """
    spec = task_spec(task)
    if split not in ("train", "dev"):
        raise ValueError(f"split must be 'train' or 'dev', got {split!r}")
    if data_dir is not None:
        path = os.path.join(data_dir, spec.name, f"{split}.tsv")
        if os.path.isfile(path):
            return read_tsv(path, task)
    try:
        import datasets  # optional: only for machines without the TSV files
    except ImportError:
        raise FileNotFoundError(
            f"no {split}.tsv for {task} under data dir {data_dir!r}, and the `datasets` package "
            "is not installed for the hub fallback; pass --data-dir pointing at a folder with "
            f"{spec.name}/{split}.tsv (the GLUE TSV layout) or `pip install datasets`"
        ) from None
    hub = datasets.load_dataset("glue", spec.hub_name, split="validation" if split == "dev" else "train")
    col_a, col_b = _HUB_COLUMNS[spec.hub_name]
    return [Example(r[col_a], r[col_b] if col_b else None,
                    float(r["label"]) if spec.is_regression else int(r["label"])) for r in hub]
