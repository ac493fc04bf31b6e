"""Test set-up: Triton kernels run under the interpreter when no CUDA device is present."""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before triton is first imported (that is how CI checks the kernels on CPU).
    os.environ.setdefault("TRITON_INTERPRET", "1")

# One intra-op thread: the tests use small tensors, where thread start-up dominates
# on a loaded 2-core machine.
torch.set_num_threads(1)
