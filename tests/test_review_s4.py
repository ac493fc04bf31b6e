"""Adversarial review, session 4: known items left open by session 3 (fused=True on devices the kernels
cannot take, the stochastic-rounding warning on every checkpoint load, 8-bit state drifting when it is
stored back unchanged) and what a demanding user hits next.  Each test reproduces a defect the way a
user hits it and failed before its fix."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch

from tigeropt import Adagrad, AdaX, Lion, Tiger, kernels

TRITON = kernels.triton_usable()  # CPU under TRITON_INTERPRET=1 (tests/conftest.py)


# ------------------------------------------------------------------ fused=True on a device the kernels lack
@pytest.mark.skipif(not TRITON, reason="fused=True needs Triton (the interpreter on CPU)")
@pytest.mark.parametrize("cls", [Tiger, Lion, AdaX, Adagrad], ids=lambda c: c.__name__)
def test_fused_with_parameters_on_the_meta_device_fails_in_the_constructor(cls: type) -> None:
    """fused=True with meta parameters was accepted and failed at the first step (ValueError "a Parameter
    without storage" from the launcher).  An impossible flag combination fails up front: the constructor
    and add_param_group raise (RuntimeError naming the device, as for CPU parameters without the
    interpreter) and a rejected group is not added."""
    meta = torch.zeros(4, device="meta", requires_grad=True)
    with pytest.raises(RuntimeError, match="fused=True.*meta"):
        cls([meta], fused=True)
    opt = cls([torch.zeros(4, requires_grad=True)], fused=True)
    with pytest.raises(RuntimeError, match="fused=True.*meta"):
        opt.add_param_group({"params": [meta]})
    assert len(opt.param_groups) == 1
