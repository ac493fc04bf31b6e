"""Test set-up: Triton kernels run under the interpreter when no CUDA device is present."""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before triton is first imported (that is how CI checks the kernels on CPU).
    os.environ.setdefault("TRITON_INTERPRET", "1")
