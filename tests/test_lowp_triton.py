"""The Triton stochastic-rounding store equals the torch code of tigeropt._lowp bit for bit
(on CPU under the Triton interpreter, set before triton is imported)."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

if os.environ.get("TIGEROPT_REQUIRE_OPTIONAL") != "1":  # CI installs triton: there it must import
    pytest.importorskip("triton", reason="triton is not installed: pip install -e '.[test,triton]'")

from tigeropt import _lowp, kernels  # noqa: E402


def test_triton_sr_bf16_equals_the_torch_code():
    assert kernels.triton_usable(), kernels.triton_status()
    from tigeropt.kernels import lowp

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    x = torch.randn(5003) * torch.logspace(-45, 38, 5003)
    x[::97], x[::101], x[::103] = float("nan"), float("inf"), -float("inf")
    x[5], x[7] = -0.0, 3.3961e38
    x = x.to(device)
    for key in (0, 12345, 0xFFFFFFFF):
        out = torch.empty(x.shape, dtype=torch.bfloat16, device=device)
        assert lowp.sr_bf16(x, out, key)
        assert torch.equal(out.view(torch.int16), _lowp.round_bf16(x, key).view(torch.int16))
    assert not lowp.sr_bf16(x[::2], torch.empty(x[::2].shape, dtype=torch.bfloat16, device=device), 1)
