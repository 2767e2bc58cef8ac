"""Smoke test of the benchmark suite: ``python -m bench --quick`` runs and its outputs parse.

Timings are never checked here (a shared CI machine makes them meaningless as pass/fail);
what is checked is that every variant ran through both stages, selected the subnetwork
DPS promises, and that the table, JSON lines and chart are written and well formed.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ["vanilla", "authors_dense", "authors_mix", "dps_dense", "dps_mix"]
P = 0.3


def run_quick(out, *extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # backend torch: the C++ backend may JIT-build on a fresh machine, which is not what
    # this test is about and could take minutes.
    cmd = [sys.executable, "-m", "bench", "--quick", "--device", "cpu", "--backend", "torch",
           "--threads", "1", "--no-progress", "--p", str(P), "--out", str(out), "--name", "smoke",
           *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    # Interleaved variants: the CPU default.
    return run_quick(tmp_path_factory.mktemp("bench"))


@pytest.fixture(scope="module")
def quick_run_sequential(tmp_path_factory):
    # One variant at a time: the GPU path (minus CUDA), two repeats to exercise pooling.
    return run_quick(tmp_path_factory.mktemp("bench_seq"), "--no-interleave", "--repeats", "2")


def test_outputs_exist_and_parse(quick_run):
    out, stdout = quick_run
    rows = [json.loads(line) for line in (out / "smoke.jsonl").read_text().splitlines()]
    assert [r["variant"] for r in rows] == VARIANTS
    for r in rows:
        for key in ("device", "torch", "transformers", "timestamp", "command", "git_commit"):
            assert key in r, key
        assert "--quick" in r["command"]
        assert r["timed_steps"] >= 3
        for key in ("median_step_s", "mean_step_s", "samples_per_s", "state_bytes_per_param"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["variant"], key, r[key])
        assert math.isfinite(r["final_loss"])
        assert r["peak_memory_bytes"] is None  # CPU: not measured, reported as n/a
    vanilla = rows[0]
    assert vanilla["time_ratio"] == 1.0 and vanilla["extra_state_bytes_per_dps_param"] == 0.0
    table = (out / "smoke.md").read_text()
    assert table.strip() == stdout.split("\nwrote ")[0].strip()
    for v in VARIANTS:
        assert f"| {v} |" in table
    assert "n/a" in table
    assert (out / "smoke.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dps_variants_reach_stage_two_with_the_promised_subnetwork(quick_run):
    out, _ = quick_run
    rows = {r["variant"]: r for r in map(json.loads, (out / "smoke.jsonl").read_text().splitlines())}
    for v in VARIANTS[1:]:
        assert rows[v]["last_stage"] == 2, v
        # k = ceil(n(1-p)) per tensor, ties kept: a hair above 1 - p, never below.
        assert 1 - P <= rows[v]["selected_fraction"] < 1 - P + 0.01, (v, rows[v]["selected_fraction"])
    # DPS keeps GAM (fp32, 4 B) at least; torch AdamW's per-tensor step counters (0-d
    # tensors that DPSAdamW keeps as ints) take a little of it back on a tiny model.
    for v in VARIANTS[1:]:
        assert rows[v]["extra_state_bytes_per_dps_param"] >= 3.5, v
    assert rows["vanilla"]["selected_fraction"] is None


def test_sequential_runs_train_the_same_as_interleaved(quick_run, quick_run_sequential):
    # The RNG is reseeded per step, so the order in which variants run changes nothing but
    # the timings: the losses must agree exactly.
    def load(run):
        return {r["variant"]: r for r in map(json.loads,
                                             (run[0] / "smoke.jsonl").read_text().splitlines())}
    inter, seq = load(quick_run), load(quick_run_sequential)
    for v in VARIANTS:
        assert seq[v]["final_loss"] == inter[v]["final_loss"], v
        assert seq[v]["runs"] == 2 and seq[v]["timed_steps"] == 2 * inter[v]["timed_steps"], v
        assert seq[v]["config"]["interleave"] is False and inter[v]["config"]["interleave"] is True
