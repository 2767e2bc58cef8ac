"""Readers for the NLI sets of the out-of-domain experiment (the DPS paper's Table 2).

The files (``../shared/data/nli_ood/``, outside the repository for licence reasons):

* ``mnli_matched.tsv``, ``mnli_mismatched.tsv``, ``snli.tsv``: 1000-example samples of the
  MNLI matched / mismatched dev sets and the SNLI dev set; no header, ``label premise
  hypothesis`` with labels ``entailment``, ``neutral``, ``contradiction``.
* ``sick_test.txt``: the SICK 2014 test set (4927 pairs); header ``pair_ID sentence_A
  sentence_B relatedness_score entailment_judgment`` with ``ENTAILMENT``, ``NEUTRAL``,
  ``CONTRADICTION``.

Every file is parsed with quoting disabled (``csv.QUOTE_NONE``), as the GLUE readers do.
Three-way labels use the coding of ``datasets``' MNLI/SNLI: entailment=0, neutral=1,
contradiction=2. GLUE RTE (two-way, ``glue_data``: entailment=0, not_entailment=1) is
scored by mapping a three-way prediction to RTE's space: entailment -> entailment, neutral
and contradiction -> not_entailment (the paper's Appendix E, after Mahabadi et al., 2021).
"""
from __future__ import annotations

import csv
import os
from typing import Optional

from glue_data import Example

LABELS = ("entailment", "neutral", "contradiction")

# name -> (file under the nli_ood folder, format)
SETS = {
    "mnli_m": ("mnli_matched.tsv", "plain"),
    "mnli_mm": ("mnli_mismatched.tsv", "plain"),
    "snli": ("snli.tsv", "plain"),
    "sick": ("sick_test.txt", "sick"),
}
TITLES = {"mnli_m": "MNLI-m", "mnli_mm": "MNLI-mm", "snli": "SNLI", "sick": "SICK",
          "rte": "RTE"}


def _label(raw: str, where: str) -> int:
    value = raw.strip().lower()
    if value not in LABELS:
        raise ValueError(f"{where}: label {raw!r} is not one of {LABELS}")
    return LABELS.index(value)


def _rows(path: str) -> list[list[str]]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        return list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def read_plain(path: str) -> list[Example]:
    """``label premise hypothesis`` lines, no header (the MNLI/SNLI samples)."""
    out = []
    for lineno, row in enumerate(_rows(path), start=1):
        if len(row) != 3:
            raise ValueError(f"{path}:{lineno}: {len(row)} fields, expected 3 "
                             "(label, premise, hypothesis)")
        out.append(Example(row[1], row[2], _label(row[0], f"{path}:{lineno}")))
    return out


def read_sick(path: str) -> list[Example]:
    """The SICK release: a header naming ``sentence_A``, ``sentence_B`` and
    ``entailment_judgment``."""
    rows = _rows(path)
    header, rows = rows[0], rows[1:]
    need = ("sentence_A", "sentence_B", "entailment_judgment")
    missing = [c for c in need if c not in header]
    if missing:
        raise ValueError(f"{path}: header {header} lacks columns {missing}")
    ia, ib, il = (header.index(c) for c in need)
    out = []
    for lineno, row in enumerate(rows, start=2):
        if len(row) != len(header):
            raise ValueError(f"{path}:{lineno}: {len(row)} fields, expected {len(header)}")
        out.append(Example(row[ia], row[ib], _label(row[il], f"{path}:{lineno}")))
    return out


def load_set(name: str, data_dir: str) -> list[Example]:
    """All examples of one NLI set (a key of ``SETS``) under ``data_dir``."""
    try:
        filename, fmt = SETS[name]
    except KeyError:
        raise ValueError(f"unknown NLI set {name!r}; expected one of {sorted(SETS)}") from None
    path = os.path.join(data_dir, filename)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found; pass --nli-dir pointing at the folder with "
                                f"{', '.join(f for f, _ in SETS.values())}")
    return read_sick(path) if fmt == "sick" else read_plain(path)


def to_two_way(prediction: int) -> int:
    """A three-way prediction in RTE's label space: entailment (0) stays 0, neutral and
    contradiction become not_entailment (1)."""
    if prediction not in (0, 1, 2):
        raise ValueError(f"three-way prediction must be 0, 1 or 2, got {prediction!r}")
    return 0 if prediction == 0 else 1


def split_source(examples: list[Example], n_train: int, seed: int = 0,
                 ) -> tuple[list[Example], list[Example]]:
    """A fixed random split of the source sample: ``n_train`` examples to train on, the rest
    held out (the in-domain evaluation). The same split for every method and seed."""
    import random

    if not 0 < n_train <= len(examples):
        raise ValueError(f"n_train must be in [1, {len(examples)}], got {n_train}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    train = [examples[i] for i in sorted(order[:n_train])]
    held = [examples[i] for i in sorted(order[n_train:])]
    return train, held


def label_counts(examples: list[Example], names: Optional[tuple] = LABELS) -> dict:
    counts: dict = {}
    for e in examples:
        key = names[e.label] if names else e.label
        counts[key] = counts.get(key, 0) + 1
    return counts
