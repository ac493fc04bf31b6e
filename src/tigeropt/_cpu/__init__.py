"""Fused CPU step (placeholder until the C kernels land): reports itself unavailable."""

from __future__ import annotations

import torch


def supports(name: str, dtype: torch.dtype) -> bool:
    return False


def available() -> bool:
    return False
