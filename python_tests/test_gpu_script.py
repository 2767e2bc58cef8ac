"""``scripts/gpu.sh --dry-run`` on this (CPU) machine with pip cut off from the network: the
setup path, the CUDA suite's selection, the result folder and its summary, each GPU step
listed, not run; a failing step is recorded and the script goes on."""
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu.sh"
RESULT_FILES = {"summary.md", "steps.tsv", "setup.log", "tests.log", "bench.log",
                "bench.jsonl", "profile.log", "sanitize.log"}
GPU_STEPS = {"CUDA suite", "fused step vs AdamW(fused=True)",
             "radix select vs torch.sort and topk", "BERT-large end to end, batch 16",
             "CUDA graph capture example", "ncu: fused step and histogram kernels",
             "compute-sanitizer memcheck", "compute-sanitizer racecheck"}


def dry_run(out, *parts, python=sys.executable):
    # Any index or proxy pip might try is a closed port: the setup must not need one.
    dead = "http://127.0.0.1:9"
    env = dict(os.environ, DPS_PYTHON=str(python), PIP_INDEX_URL=f"{dead}/simple",
               PIP_FIND_LINKS="", http_proxy=dead, https_proxy=dead, HTTP_PROXY=dead,
               HTTPS_PROXY=dead, PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(out), *parts],
                          env=env, capture_output=True, text=True, timeout=600)
    rows = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()[1:]]
    return proc, {(r[0], r[1]): r for r in rows}


def test_dry_run_runs_everything_that_needs_no_gpu(tmp_path):
    proc, steps = dry_run(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr + str(steps)
    assert {p.name for p in tmp_path.iterdir()} == RESULT_FILES - {"bench.jsonl"}
    assert {name for (_, name), row in steps.items() if row[2] == "dry"} == GPU_STEPS
    for (part, name), row in steps.items():
        if row[2] != "dry" and not name.startswith("tool "):   # GPU tools: listed only
            assert row[2] == "0", (part, name, (tmp_path / f"{part}.log").read_text()[-3000:])
    setup = (tmp_path / "setup.log").read_text()
    assert "Would install dps_kernels" in setup   # pip --dry-run: this venv is not touched
    suite = steps[("tests", "CUDA suite")][4]
    assert suite.startswith("env -u TRITON_INTERPRET")   # the compiled kernels
    assert "--ignore=python_tests/test_aot_gate.py" in suite
    collected = re.search(r"(\d+) tests collected", (tmp_path / "tests.log").read_text())
    assert collected and int(collected.group(1)) > 300
    summary = (tmp_path / "summary.md").read_text()
    assert f"{collected.group(1)} tests collected" in summary
    assert summary.count("| dry run: not run |") == len(GPU_STEPS)   # the steps table


def test_a_failing_step_is_recorded_and_the_rest_runs(tmp_path):
    # a python that fails one step: bench/triton_step.py --help
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\ncase "$*" in *triton_step.py*) exit 3 ;; esac\n'
                    f'exec "{sys.executable}" "$@"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "out"
    proc, steps = dry_run(out, "bench", python=fake)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert steps[("bench", "bench/triton_step.py --help")][2] == "3"
    assert steps[("bench", "python -m bench --help")][2] == "0"   # ran after the failure
    assert "| bench | bench/triton_step.py --help | **3** |" in (out / "summary.md").read_text()


def test_gpu_day_doc_names_every_part():
    doc = (ROOT / "docs" / "gpu_day.md").read_text()
    usage = re.search(r"\[(tests\|[a-z|]+)", SCRIPT.read_text()).group(1).split("|")
    assert usage == ["tests", "bench", "profile", "sanitize"]
    for part in usage:
        assert f"scripts/gpu.sh {part}" in doc, part
    assert "scripts/gpu.sh --dry-run" in doc
