"""The supported-versions statement: setup.py's lower bounds, README's line and the oldest
stack CI installs (scripts/setup_oldest_env.sh) say the same, and the running environment
satisfies them (CI runs this file on the newest and on the oldest stack)."""
import ast
import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _setup_constants() -> dict:
    tree = ast.parse((ROOT / "setup.py").read_text())
    return {t.id: node.value.value for node in tree.body if isinstance(node, ast.Assign)
            for t in node.targets if isinstance(t, ast.Name) and t.id.endswith("_MIN")}


def _version(text: str) -> tuple:
    return tuple(int(x) for x in re.findall(r"\d+", text.split("+")[0])[:2])


def test_setup_py_uses_its_bounds():
    c = _setup_constants()
    assert set(c) == {"PYTHON_MIN", "TORCH_MIN", "TRITON_MIN"}
    src = (ROOT / "setup.py").read_text()
    for needle in ('python_requires=f">={PYTHON_MIN}"', 'f"torch>={TORCH_MIN}"',
                   'f"triton>={TRITON_MIN}"'):
        assert needle in src


def test_readme_states_the_bounds():
    c = _setup_constants()
    line = (f"Supported versions: Python >= {c['PYTHON_MIN']}, torch >= {c['TORCH_MIN']}, "
            f"triton >= {c['TRITON_MIN']}")
    assert line in (ROOT / "README.md").read_text()


def test_oldest_env_installs_the_lower_bounds():
    c = _setup_constants()
    script = (ROOT / "scripts" / "setup_oldest_env.sh").read_text()
    # torch: the oldest this machine can install (its local 2.13.0 CPU wheel), at or above
    # the bound; the bound itself (the GPU machine's 2.11) runs on a GPU day
    torch_pin = re.search(r'OLDEST_TORCH="torch==([\d.]+)"', script)
    assert torch_pin and _version(torch_pin.group(1)) >= _version(c["TORCH_MIN"])
    assert f'OLDEST_TRITON="triton=={c["TRITON_MIN"]}.0"' in script
    assert "scripts/test_oldest.sh" in (ROOT / ".ci" / "run").read_text()


def test_running_environment_meets_the_bounds():
    c = _setup_constants()
    assert sys.version_info[:2] >= _version(c["PYTHON_MIN"])
    assert _version(torch.__version__) >= _version(c["TORCH_MIN"])
    triton = pytest.importorskip("triton")
    assert _version(triton.__version__) >= _version(c["TRITON_MIN"])
