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


def dry_run(out, *parts, python=sys.executable, **extra_env):
    # Any index or proxy pip might try is a closed port: the setup must not need one.
    dead = "http://127.0.0.1:9"
    env = dict(os.environ, DPS_PYTHON=str(python), PIP_INDEX_URL=f"{dead}/simple",
               PIP_FIND_LINKS="", http_proxy=dead, https_proxy=dead, HTTP_PROXY=dead,
               HTTPS_PROXY=dead, PIP_DISABLE_PIP_VERSION_CHECK="1", **extra_env)
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


def test_a_spent_budget_runs_nothing_more(tmp_path):
    proc, steps = dry_run(tmp_path, "tests", DPS_GPU_BUDGET_S="1")
    assert proc.returncode == 1
    ran = {row[2] for (_, name), row in steps.items() if name not in GPU_STEPS}
    assert ran == {"budget"}, steps   # the GPU steps of a dry run are only listed
    assert "| setup | versions | not run: budget spent |" in (tmp_path / "summary.md").read_text()


def test_gpu_day_doc_names_every_part():
    doc = (ROOT / "docs" / "gpu_day.md").read_text()
    usage = re.search(r"\[(tests\|[a-z|]+)", SCRIPT.read_text()).group(1).split("|")
    assert usage == ["tests", "bench", "profile", "sanitize"]
    for part in usage:
        assert f"scripts/gpu.sh {part}" in doc, part
    assert "scripts/gpu.sh --dry-run" in doc


NCU_LOG = '''### profile: ncu: fused step and histogram kernels
==PROF== Connected to process 4242 (/usr/bin/python3.12)
profiled: step dense stage 1
"ID","Process ID","Kernel Name","dram__bytes.sum","dram__throughput.avg.pct_of_peak_sustained_elapsed","gpu__time_duration.sum"
"","","","Gbyte","%","msecond"
"0","4242","_dps_step_kernel","12.07","86.41","3.61"
"1","4242","_multi_hist_kernel","1.21","71.02","0.42"
'''


def test_summary_reads_the_part_logs(tmp_path):
    """The summary's parsers on logs shaped like ncu's --csv --page raw, pytest's and
    compute-sanitizer's output (what a GPU run leaves; none of it runs here)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_summary

    (tmp_path / "steps.tsv").write_text("part\tstep\trc\tseconds\tcommand\n"
                                        "tests\tCUDA suite\t1\t250\tpytest\n")
    (tmp_path / "tests.log").write_text("FAILED python_tests/test_x.py::test_y - boom\n"
                                        "==== 1 failed, 500 passed, 20 skipped in 250s ====\n")
    (tmp_path / "profile.log").write_text(NCU_LOG)
    (tmp_path / "sanitize.log").write_text("cycle dense capturable=False: 5 steps\n"
                                           "========= ERROR SUMMARY: 0 errors\n")
    gpu_summary.main([str(tmp_path)])
    md = (tmp_path / "summary.md").read_text()
    assert "| tests | CUDA suite | **1** | 250 |" in md
    assert "- 1 failed, 500 passed, 20 skipped in 250s" in md
    assert "`FAILED python_tests/test_x.py::test_y - boom`" in md
    assert "| 0 | _dps_step_kernel | 3.61 | 12.07 | 86.41 |" in md
    assert "DRAM % of peak (%)" in md
    assert "`========= ERROR SUMMARY: 0 errors`" in md
    assert md.count("(part not run)") == 2   # setup, bench
