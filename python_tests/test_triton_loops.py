"""Kernel loops over runtime bounds (while loops since triton 3.6's interpreter cannot take
``range()`` of a runtime value under numpy 2): the capturable Mix factor kernel over a
column count of several blocks. (The radix histogram's tile loop is covered by the
selection tests on 5 x 1013 elements: 2 tiles per program on CPU.)

Runs on CPU under the Triton interpreter (``TRITON_INTERPRET=1``), or on CUDA.
"""
from __future__ import annotations

import pytest
import torch

from dps_kernels import reference as ref
from dps_kernels.backends import interpreter_enabled, unavailable_reason

REASON = unavailable_reason("triton")
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"triton backend: {REASON}")
DEVICE = torch.device("cuda" if torch.cuda.is_available() and not interpreter_enabled()
                      else "cpu")


@pytest.mark.parametrize("cols", [1, 1024, 2500])
def test_capturable_factor_covers_every_column(cols):
    from dps_kernels.ops.triton.radix_select import _capturable_factor_kernel

    us = 5
    gen = torch.Generator().manual_seed(cols)
    fam = torch.randint(0, us + 1, (cols,), generator=gen).float().to(DEVICE)
    factor = torch.full((cols,), -1.0, device=DEVICE)
    step = torch.tensor(float(us - 1), device=DEVICE)   # the next step closes Stage I
    table = ref.mix_column_factor(torch.arange(us + 1, dtype=torch.float32), us).to(DEVICE)
    addr = torch.tensor([[fam.data_ptr(), factor.data_ptr()]], dtype=torch.int64,
                        device=DEVICE)
    meta = torch.tensor([[cols, cols]], dtype=torch.int32, device=DEVICE)
    steps = torch.tensor([step.data_ptr()], dtype=torch.int64, device=DEVICE)
    _capturable_factor_kernel[(1,)](addr, meta, steps, table, us, step, HAS_FOUND_INF=False,
                                    BLOCK=1024)
    want = table[fam.long().clamp(1, us)]
    assert torch.equal(factor, want)
    assert torch.equal(want, ref.mix_column_factor(fam.cpu(), us).to(DEVICE))
