"""The Triton row kernels (``tigeropt.kernels.rows``: lazy rows and sparse gradients with ``fused=True``)
against the reference, on CPU under the Triton interpreter (small sizes: the interpreter is slow).

Same cases as ``test_rows_fused.py`` (the C twin): duplicates, a listed all-zero row, duplicates that
cancel, first and last rows, an empty step, row lengths that are not multiples of the 128-element block.
The kernels compute in float32 and round once at the store, like the dense Triton kernels (whose
compiler may fuse a multiply-add): every optimizer matches the reference within float32 rounding, and
untouched rows are bit for bit unchanged.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from typing import Any  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed")

from rows_cases import IDS, OPTIMIZERS, sparse_grads, stable_coalesce  # noqa: E402

from tigeropt import kernels  # noqa: E402
from tigeropt.kernels import rows as triton_rows  # noqa: E402

if not kernels.triton_usable():
    pytest.skip(f"Triton kernels unusable here: {kernels.triton_status()}", allow_module_level=True)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: (1e-6, 1e-6), torch.bfloat16: (1e-6, 8e-3), torch.float16: (1e-6, 1e-3)}
# 272: the 256-element block of rows whose length is a multiple of 16.  (Not 3 x 272: its seed draws an
# fp16 element whose g + wd*p cancels to the last bit, where AdaX's m/sqrt(v) turns a rounding difference
# of the residual into a full step: an ill-conditioned case, not a kernel property.)
SHAPES = [(1, 3), (6, 130), (4, 272)]


def _run(cls: type, kwargs: dict, shape: tuple[int, int], dtype: torch.dtype, grads: list[torch.Tensor],
         mode: str, path: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    W = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype).requires_grad_()
    opt = cls([W], lazy=True, **kwargs, **path)
    for g in grads:
        g = g.to(DEVICE)
        W.grad = g.to_dense() if mode == "dense" else g
        opt.step()
    return W.detach().cpu(), {k: v.cpu() for k, v in opt.state[W].items()}


@pytest.mark.parametrize("mode", ["sparse", "dense"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,cls,kwargs", OPTIMIZERS, ids=IDS)
def test_triton_rows_equal_reference(name: str, cls: type, kwargs: dict, dtype: torch.dtype, mode: str,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bool] = []
    original = triton_rows.fused_rows

    def spy(*args: Any, **kw: Any) -> bool:
        calls.append(original(*args, **kw))
        return calls[-1]

    monkeypatch.setattr(triton_rows, "fused_rows", spy)
    for shape in SHAPES:
        grads = [stable_coalesce(g) for g in sparse_grads(*shape, dtype, steps=3, seed=shape[0])]
        W_ref, st_ref = _run(cls, kwargs, shape, dtype, grads, mode, dict(foreach=False))
        W_t, st_t = _run(cls, kwargs, shape, dtype, grads, mode, dict(fused=True))
        assert calls and all(calls)  # the Triton row kernel did every step
        calls.clear()
        atol, rtol = TOL[dtype]
        torch.testing.assert_close(W_t, W_ref, atol=atol, rtol=rtol)
        for k in st_ref:
            torch.testing.assert_close(st_t[k], st_ref[k], atol=atol, rtol=max(rtol, 1e-6))
        # rows that no step touched are bit for bit unchanged
        start = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
        touched = torch.zeros(shape[0], dtype=torch.bool)
        for g in grads:
            if g._nnz():
                touched[g.indices()[0][g.values().flatten(1).ne(0).any(1)]] = True
        assert torch.equal(W_t[~touched], start[~touched])


@pytest.mark.parametrize("index", [6, -1])
@pytest.mark.parametrize("name,cls,kwargs", OPTIMIZERS, ids=IDS)
def test_triton_rows_refuse_out_of_range_rows(name: str, cls: type, kwargs: dict, index: int) -> None:
    """A sparse gradient listing a row the table lacks: IndexError naming the parameter and the index, with
    nothing changed, from the optimizer; the kernel's launcher refuses it too (it would write outside)."""
    shape = (6, 130)
    W = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(DEVICE).requires_grad_()
    opt = cls([W], lazy=True, fused=True, **kwargs)
    W.grad = stable_coalesce(sparse_grads(*shape, torch.float32, steps=1, seed=0)[0]).to(DEVICE)
    opt.step()
    W0, st0 = W.detach().clone(), {k: v.clone() for k, v in opt.state[W].items()}
    bad = torch.sparse_coo_tensor(torch.tensor([[0, index]]), torch.ones(2, shape[1]), shape,
                                  check_invariants=False).to(DEVICE)
    W.grad = bad
    with pytest.raises(IndexError, match=rf"parameter 0 \(param group 0, shape \(6, 130\)\) lists row index "
                                         rf"{index}, out of range for 6 rows"):
        opt.step()
    assert torch.equal(W.detach(), W0)
    assert all(torch.equal(opt.state[W][k], v) for k, v in st0.items())
    states = [opt.state[W][k] for k in opt.state[W] if k != "step"]
    with pytest.raises(IndexError, match=f"row index {index} out of range for 6 rows"):
        triton_rows.fused_rows(opt.kernel, W.detach(), bad, states, opt.state[W]["step"],
                               opt._hyper(opt.param_groups[0]))
    assert torch.equal(W.detach(), W0)
