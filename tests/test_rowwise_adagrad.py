"""Row-wise Adagrad (``Adagrad(rowwise=True)``): golden values, FBGEMM's update, paths, sparse, checkpoints.

FBGEMM's row-wise Adagrad (fbgemm_gpu/codegen/genscript/optimizers.py, ``rowwise_adagrad``, the CPU
``split_weight_update_cpu`` template) is transcribed below, loop for loop, in plain Python floats;
tigeropt must follow it (it has no lr_decay or maximize: those are torch's Adagrad conventions).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from tigeropt import Adagrad, _cpu

F64 = torch.float64
PATHS = {"reference": dict(foreach=False), "foreach": dict(foreach=True), "default": {}}


def fbgemm_rowwise_adagrad_cpu(weights: list[list[float]], grads: list[list[float]], momentum1: list[float],
                               rows: list[int], learning_rate: float, eps: float, weight_decay: float,
                               weight_decay_mode: int) -> None:
    """FBGEMM's CPU row-wise Adagrad for the rows ``rows`` (gradient row k belongs to row rows[k]), in place.

    Transcribed from the ``split_weight_update_cpu`` template: weight_decay_mode 1 is L2, 2 decoupled.
    """
    for k, idx in enumerate(rows):
        grad_buffer = grads[k]
        D = len(grad_buffer)
        g_local_sum_square = 0.0
        for d in range(D):
            grad = grad_buffer[d]
            if weight_decay_mode == 1:
                grad += weight_decay * weights[idx][d]
            g_local_sum_square += grad * grad
        g_avg_square = g_local_sum_square / D
        new_sum_square_grads = momentum1[idx] + g_avg_square
        momentum1[idx] = new_sum_square_grads
        multiplier = learning_rate / (math.sqrt(new_sum_square_grads) + eps)
        if weight_decay_mode == 1:
            correction = 1.0 - multiplier * weight_decay
        elif weight_decay_mode == 2:
            correction = 1.0 - learning_rate * weight_decay
        else:
            correction = 1.0
        for d in range(D):
            weights[idx][d] = correction * weights[idx][d] - grad_buffer[d] * multiplier


# ------------------------------------------------------------------------------------------ golden values
@pytest.mark.parametrize("path", list(PATHS))
def test_rowwise_golden_two_steps(path: str) -> None:
    """Hand-computed: lr=0.3, lr_decay=0.5 (clr = 0.3, then 0.2), eps=0, G0=0.

    row 0: g1 = [1, 5, 1, -3]: mean g^2 = 36/4 = 9, G = 9, p -= 0.3*g/3 = 0.1*g -> [0.9, 0.5, 0.9, 1.3]
           g2 = [4, 4, -4, 4]: mean 16, G = 25, p -= 0.2*g/5 = 0.04*g -> [0.74, 0.34, 1.06, 1.14]
    row 1: g1 = [2, 2, 2, 2]: mean 4, G = 4, p -= 0.3*g/2 = 0.3 -> [1.7, -1.3, -0.3, 2.7]
           g2 = [4, 4, 4, 0]: mean 12, G = 16, p -= 0.2*g/4 = 0.05*g -> [1.5, -1.5, -0.5, 2.7]
    """
    W = torch.tensor([[1.0, 1.0, 1.0, 1.0], [2.0, -1.0, 0.0, 3.0]], dtype=F64, requires_grad=True)
    opt = Adagrad([W], lr=0.3, lr_decay=0.5, eps=0.0, rowwise=True, **PATHS[path])
    W.grad = torch.tensor([[1.0, 5.0, 1.0, -3.0], [2.0, 2.0, 2.0, 2.0]], dtype=F64)
    opt.step()
    expected = torch.tensor([[0.9, 0.5, 0.9, 1.3], [1.7, -1.3, -0.3, 2.7]], dtype=F64)
    torch.testing.assert_close(W.detach(), expected, rtol=0, atol=1e-15)
    W.grad = torch.tensor([[4.0, 4.0, -4.0, 4.0], [4.0, 4.0, 4.0, 0.0]], dtype=F64)
    opt.step()
    torch.testing.assert_close(W.detach(), torch.tensor([[0.74, 0.34, 1.06, 1.14], [1.5, -1.5, -0.5, 2.7]],
                                                        dtype=F64), rtol=0, atol=1e-15)
    assert opt.state[W]["sum"].tolist() == [25.0, 16.0]
    assert opt.state[W]["sum"].shape == (2,)


@pytest.mark.parametrize("path", list(PATHS))
def test_rowwise_golden_weight_decay_initial_accumulator_maximize(path: str) -> None:
    """Hand-computed: lr=0.3, lr_decay=0.5, wd=0.5 (L2), G0=5, eps=0, maximize (g -> -g).

    step 1: -g = [1, 1, 1, 1], + 0.5*p (p = 2) -> g = 2: mean 4, G = 9, p -= 0.3*2/3 = 0.2 -> 1.8
    step 2: -g = [3.1, -4.9, 3.1, -4.9], + 0.5*1.8 -> [4, -4, 4, -4]: mean 16, G = 25,
            p -= 0.2*g/5 = 0.04*g -> [1.64, 1.96, 1.64, 1.96]
    """
    W = torch.full((1, 4), 2.0, dtype=F64, requires_grad=True)
    opt = Adagrad([W], lr=0.3, lr_decay=0.5, weight_decay=0.5, initial_accumulator_value=5.0, eps=0.0,
                  rowwise=True, maximize=True, **PATHS[path])
    W.grad = -torch.ones(1, 4, dtype=F64)
    opt.step()
    torch.testing.assert_close(W.detach(), torch.full((1, 4), 1.8, dtype=F64), rtol=0, atol=1e-15)
    W.grad = -torch.tensor([[3.1, -4.9, 3.1, -4.9]], dtype=F64)
    opt.step()
    torch.testing.assert_close(W.detach(), torch.tensor([[1.64, 1.96, 1.64, 1.96]], dtype=F64), rtol=0,
                               atol=1e-14)
    torch.testing.assert_close(opt.state[W]["sum"], torch.tensor([25.0], dtype=F64), rtol=0, atol=1e-13)


# ------------------------------------------------------------------------------------------ FBGEMM
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("weight_decay", [0.0, 0.2])
@pytest.mark.parametrize("sparse", [False, True])
def test_rowwise_equals_fbgemm_transcription(path: str, weight_decay: float, sparse: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    rows, dim, lr, eps = 11, 7, 0.05, 1e-8
    W = torch.randn(rows, dim, generator=gen, dtype=F64, requires_grad=True)
    weights = W.detach().tolist()
    momentum1 = [0.0] * rows
    opt = Adagrad([W], lr=lr, eps=eps, weight_decay=weight_decay, rowwise=True, lazy=sparse, **PATHS[path])
    for _ in range(4):
        if sparse:  # FBGEMM updates the rows of the batch; tigeropt the rows of the sparse gradient
            touched = sorted(torch.randperm(rows, generator=gen)[:4].tolist())
            vals = torch.randn(len(touched), dim, generator=gen, dtype=F64)
            W.grad = torch.sparse_coo_tensor(torch.tensor([touched]), vals, (rows, dim))
        else:
            touched = list(range(rows))
            vals = torch.randn(rows, dim, generator=gen, dtype=F64)
            W.grad = vals.clone()
        opt.step()
        fbgemm_rowwise_adagrad_cpu(weights, vals.tolist(), momentum1, touched, lr, eps, weight_decay,
                                   weight_decay_mode=1 if weight_decay else 0)
    torch.testing.assert_close(W.detach(), torch.tensor(weights, dtype=F64), rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(opt.state[W]["sum"], torch.tensor(momentum1, dtype=F64), rtol=1e-13, atol=0)


# ------------------------------------------------------------------------------------------ paths and dtypes
def _dtypes() -> list[torch.dtype]:
    out = [torch.float32, torch.float64, torch.bfloat16]
    if _cpu.supports("adagrad", torch.float16):
        out.append(torch.float16)
    return out


TOL = {torch.float32: (1e-6, 1e-6), torch.float64: (1e-14, 1e-13), torch.bfloat16: (1e-6, 8e-3),
       torch.float16: (1e-6, 1e-3)}


@pytest.mark.parametrize("dtype", _dtypes())
@pytest.mark.parametrize("options", [{}, dict(weight_decay=0.1, lr_decay=0.01, initial_accumulator_value=0.2,
                                                maximize=True)], ids=["plain", "all-options"])
@pytest.mark.parametrize("mode", ["dense", "lazy-dense", "sparse"])
def test_rowwise_fused_c_equals_reference(dtype: torch.dtype, options: dict, mode: str) -> None:
    """The default CPU path (C row kernel) against the reference, shapes with odd row lengths."""
    results = []
    for path in (dict(foreach=False), {}):
        params = [torch.randn(r, d, generator=torch.Generator().manual_seed(r)).to(dtype).requires_grad_()
                  for r, d in ((13, 7), (1, 1), (40, 513), (0, 4))]
        opt = Adagrad(params, lr=0.1, rowwise=True, lazy=mode != "dense", **options, **path)
        gen = torch.Generator().manual_seed(3)
        for _ in range(3):
            for p in params:
                g = torch.randn(p.shape, generator=gen)
                g[: p.shape[0] // 2] = 0.0  # zero rows: untouched when lazy, decayed (L2) when dense
                g = g.to(dtype)
                p.grad = g.to_sparse(1) if mode == "sparse" else g
            opt.step()
        results.append([(p.detach().clone(), opt.state[p]["sum"].clone()) for p in params])
    atol, rtol = TOL[dtype]
    for (p_ref, s_ref), (p_c, s_c) in zip(*results):
        assert s_c.shape == p_ref.shape[:1]
        assert s_c.dtype == (torch.float64 if dtype == F64 else torch.float32)
        torch.testing.assert_close(p_c, p_ref, atol=atol, rtol=rtol)
        torch.testing.assert_close(s_c, s_ref, atol=1e-6 if dtype != F64 else 1e-14, rtol=1e-6)


def test_rowwise_c_kernel_is_used_and_multithreaded_equal() -> None:
    """The C kernel runs (no reference fallback) and gives the same bits on 1 and 2 threads."""
    if not _cpu.available():
        pytest.skip(_cpu.status())
    from tigeropt._cpu import rows

    out = []
    for threads in (1, 2):
        p = torch.randn(300, 512, generator=torch.Generator().manual_seed(0))
        g = torch.randn(300, 512, generator=torch.Generator().manual_seed(1))
        acc = torch.full((300,), 0.1)
        hyper = dict(lr=0.1, lr_decay=0.0, weight_decay=0.1, eps=1e-10, glove=False, grad_clip_value=None,
                     skip_nonfinite_rows=False, maximize=False, rowwise=True)
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            assert rows.fused_rows("adagrad", p, g, [acc], torch.tensor(1.0), hyper, all_rows=True)
        finally:
            torch.set_num_threads(previous)
        out.append((p, acc))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])


# ------------------------------------------------------------------------------------------ sparse and lazy
@pytest.mark.parametrize("path", list(PATHS))
def test_rowwise_sparse_lazy_and_dense(path: str) -> None:
    """Rows without gradient keep p and G_r with sparse or lazy gradients; a dense step decays them (L2)."""
    gen = torch.Generator().manual_seed(4)
    W0 = torch.randn(6, 5, generator=gen, dtype=F64)
    g = torch.zeros(6, 5, dtype=F64)
    g[[1, 4]] = torch.randn(2, 5, generator=gen, dtype=F64)
    results = {}
    for mode in ("sparse-plain", "sparse-lazy", "dense-lazy", "dense"):
        W = W0.clone().requires_grad_()
        opt = Adagrad([W], lr=0.1, weight_decay=0.1, initial_accumulator_value=0.5, rowwise=True,
                      lazy=mode.endswith("lazy"), **PATHS[path])
        for _ in range(2):
            W.grad = g.to_sparse(1) if mode.startswith("sparse") else g.clone()
            opt.step()
        results[mode] = (W.detach().clone(), opt.state[W]["sum"].clone())
    untouched = [0, 2, 3, 5]
    for mode in ("sparse-plain", "sparse-lazy", "dense-lazy"):
        W, G = results[mode]
        assert torch.equal(W[untouched], W0[untouched]) and G[untouched].eq(0.5).all()
        assert torch.equal(W, results["sparse-plain"][0]) and torch.equal(G, results["sparse-plain"][1])
    W, G = results["dense"]
    assert not torch.equal(W[untouched], W0[untouched]) and G[untouched].gt(0.5).all()  # L2 reaches them
    torch.testing.assert_close(W[[1, 4]], results["sparse-lazy"][0][[1, 4]], rtol=1e-14, atol=1e-14)


def test_rowwise_embedding_sparse_equals_dense_embedding() -> None:
    torch.manual_seed(0)
    dense = torch.nn.Embedding(20, 8)
    sparse = torch.nn.Embedding(20, 8, sparse=True)
    sparse.load_state_dict(dense.state_dict())
    opts = [Adagrad(m.parameters(), lr=0.1, rowwise=True, lazy=True) for m in (dense, sparse)]
    for step in range(3):
        idx = torch.tensor([[1, 3, 3, step], [7, 7, 1, 19]])
        for m, o in zip((dense, sparse), opts):
            o.zero_grad()
            m(idx).pow(2).sum().backward()
            o.step()
    torch.testing.assert_close(sparse.weight, dense.weight, rtol=1e-6, atol=1e-7)
    assert opts[1].state[sparse.weight]["sum"].shape == (20,)


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("shape,dtype", [((5,), torch.float32), ((2, 3, 4), torch.float32),
                                         ((), torch.float32), ((3, 4), torch.complex64)])
def test_rowwise_needs_real_2d_parameters(shape: tuple, dtype: torch.dtype) -> None:
    p = torch.zeros(shape, dtype=dtype, requires_grad=True)
    with pytest.raises(ValueError, match="rowwise.*2-D"):
        Adagrad([p], rowwise=True)
    opt = Adagrad([torch.zeros(3, 4, requires_grad=True)], rowwise=True)
    with pytest.raises(ValueError, match="rowwise.*2-D"):
        opt.add_param_group({"params": [p]})
    # rowwise is per group
    Adagrad([{"params": [torch.zeros(3, 4, requires_grad=True)], "rowwise": True}, {"params": [p]}])


def test_rowwise_with_glove_is_an_error() -> None:
    with pytest.raises(ValueError, match="rowwise.*glove"):
        Adagrad([torch.zeros(3, 4, requires_grad=True)], rowwise=True, glove=True)
    with pytest.raises(TypeError, match="rowwise"):  # a wrong type: TypeError, as for every bool flag
        Adagrad([torch.zeros(3, 4, requires_grad=True)], rowwise="yes")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ checkpoints
def test_rowwise_checkpoint_round_trip_and_shape_check() -> None:
    def make(rowwise: bool = True) -> tuple[torch.Tensor, Adagrad]:
        W = torch.randn(9, 4, generator=torch.Generator().manual_seed(0)).requires_grad_()
        return W, Adagrad([W], lr=0.1, weight_decay=0.01, rowwise=rowwise, lazy=True)

    def train(W: torch.Tensor, opt: Adagrad, seed: int, steps: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            idx = torch.randint(0, 9, (1, 5), generator=gen)
            W.grad = torch.sparse_coo_tensor(idx, torch.randn(5, 4, generator=gen), (9, 4))
            opt.step()

    W, opt = make()
    train(W, opt, 1, 3)
    sd = copy.deepcopy(opt.state_dict())
    assert sd["state"][0]["sum"].shape == (9,) and sd["param_groups"][0]["rowwise"] is True
    W2, opt2 = make(rowwise=False)  # the checkpoint's hyperparameters (rowwise=True) are loaded
    with torch.no_grad():
        W2.copy_(W)
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["rowwise"] is True
    train(W, opt, 2, 3)
    train(W2, opt2, 2, 3)
    assert torch.equal(W, W2) and torch.equal(opt.state[W]["sum"], opt2.state[W2]["sum"])
    # a per-element accumulator does not fit a row-wise group, and the other way round
    W3 = torch.randn(9, 4, requires_grad=True)
    torch_opt = torch.optim.Adagrad([W3], lr=0.1)
    W3.grad = torch.randn(9, 4)
    torch_opt.step()
    W4, opt4 = make()
    torch_sd = torch_opt.state_dict()
    torch_sd["param_groups"][0]["rowwise"] = True
    with pytest.raises(ValueError, match=r"shape \(9, 4\), expected \(9,\)"):
        opt4.load_state_dict(torch_sd)
    sd["param_groups"][0]["rowwise"] = False
    with pytest.raises(ValueError, match=r"shape \(9,\), expected \(9, 4\)"):
        make(rowwise=False)[1].load_state_dict(sd)
