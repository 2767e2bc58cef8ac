"""Every code block of docs/distributed.md runs as written (2 CPU processes, gloo)."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch.distributed as dist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(REPO, "docs", "distributed.md")


def blocks():
    with open(DOC) as f:
        text = f.read()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_the_page_has_the_four_blocks():
    found = blocks()
    assert len(found) == 4
    assert "DistributedDataParallel" in found[0] and "fully_shard" in found[1]
    assert "accelerate" in found[2] and "dcp.save" in found[3]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
@pytest.mark.parametrize("index", range(4))
def test_block_runs(index, tmp_path):
    script = tmp_path / f"block{index}.py"
    script.write_text(blocks()[index])
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(script)], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
