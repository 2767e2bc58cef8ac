"""The host-overhead benchmark runs, and what keeps ``step()`` cheap holds: one fused-step
launch per param group and step, and no table rebuilt while the tensors stay put.
(The time itself is measured by ``python -m bench.host_overhead``, never asserted here.)"""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import host_overhead  # noqa: E402
from dps_kernels import DPSAdamW  # noqa: E402
from dps_kernels.backends import unavailable_reason  # noqa: E402

pytestmark = pytest.mark.skipif(unavailable_reason("triton") is not None,
                                reason=f"triton backend: {unavailable_reason('triton')}")


def test_benchmark_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    host_overhead.main(["--steps", "6", "--update-steps", "2", "--shrink", "64",
                        "--out", str(tmp_path / "host")])
    text = (tmp_path / "host.md").read_text()
    assert "| dense | same addresses |" in text and "| mix | fresh each step |" in text
    from dps_kernels.ops.triton import fused_step
    assert not isinstance(fused_step._dps_step_kernel, host_overhead._Stub), "stubs left in"


@pytest.mark.parametrize("mode", ["dense", "mix"])
def test_one_launch_per_group_and_tables_reused(mode, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    counter: dict = {}
    for name, stub in _stubs(counter):
        monkeypatch.setattr(*name, stub)
    torch.manual_seed(0)
    model = host_overhead.bert_large(64)
    opt = DPSAdamW.from_model(model, mode=mode, update_steps=100, weight_decay=0.01,
                              backend="triton")
    grads = [torch.randn_like(p) for g in opt.param_groups for p in g["params"]]
    params = [p for g in opt.param_groups for p in g["params"]]
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()   # the general path (states are created), which builds the group plans
    opt.step()   # the first planned step builds the address tables
    tables = [part.cache["triton_plan"][0] for plan in opt._plans.values()
              for part in plan.parts]
    grad_tables = [t.grad_table for t in tables]
    counter.clear()
    for _ in range(3):
        opt.step()
    assert counter == {"_dps_step_kernel": 3 * len(opt.param_groups)}
    now = [part.cache["triton_plan"][0] for plan in opt._plans.values() for part in plan.parts]
    assert all(a is b for a, b in zip(tables, now)), "address tables were rebuilt"
    assert all(t.grad_table is g for t, g in zip(now, grad_tables))


def _stubs(counter):
    from dps_kernels.ops.triton import fused_step, radix_select
    yield (fused_step, "_dps_step_kernel"), host_overhead._Stub(counter, "_dps_step_kernel")
    for name in ("_multi_hist_kernel", "_multi_pick_kernel"):
        yield (radix_select, name), host_overhead._Stub(counter, name)
