"""Adversarial review, session 4: known items left open by session 3 (fused=True on devices the kernels
cannot take, the stochastic-rounding warning on every checkpoint load, 8-bit state drifting when it is
stored back unchanged) and what a demanding user hits next.  Each test reproduces a defect the way a
user hits it and failed before its fix."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch

import tigeropt
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


# ------------------------------------------------------------------ the SR warning, once per cause
def _no_effect_warnings(record: list[warnings.WarningMessage]) -> int:
    return sum("stochastic_rounding=True has no effect" in str(w.message) for w in record)


@pytest.mark.parametrize("cls", [Tiger, Lion, AdaX, Adagrad], ids=lambda c: c.__name__)
def test_stochastic_rounding_warning_comes_once_per_cause_not_on_every_load(cls: type) -> None:
    """stochastic_rounding=True with fp32 parameters and fp32 state warns in the constructor ("no
    effect").  Every load_state_dict (it validates the checkpoint's groups with the constructor's
    routine) warned again, once per group, and optimizer_in_backward once per parameter.  Now: the
    constructor warns once per group; loading a checkpoint into a group that already had the cause
    does not; loading one that brings the cause (stochastic_rounding=True into a group without it)
    warns once; optimizer_in_backward warns once for the call."""
    def params() -> list[dict[str, Any]]:
        return [{"params": [torch.zeros(3, requires_grad=True)]},
                {"params": [torch.zeros(2, requires_grad=True)]}]

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        opt = cls(params(), stochastic_rounding=True)
        assert _no_effect_warnings(record) == 2  # one per group
        sd = opt.state_dict()
        record.clear()
        opt.load_state_dict(sd)
        opt.load_state_dict(sd)
        assert _no_effect_warnings(record) == 0
        plain = cls(params())
        plain.load_state_dict(sd)  # the checkpoint brings stochastic_rounding=True into both groups
        assert _no_effect_warnings(record) == 2
        assert all(g["stochastic_rounding"] for g in plain.param_groups)
        record.clear()
        plain.load_state_dict(sd)
        assert _no_effect_warnings(record) == 0
        ps = [torch.zeros(3, requires_grad=True) for _ in range(4)]
        tigeropt.optimizer_in_backward(ps, cls, stochastic_rounding=True)
        assert _no_effect_warnings(record) == 1
