"""torch.compile of tigeropt steps: the fused steps are opaque custom ops, lr never becomes a constant.

Counts come from ``torch._dynamo.utils.counters`` (compiled graphs and graph breaks); every compiled
result is compared with the same steps run eagerly.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch._dynamo.utils import counters

import tigeropt
from tigeropt import _cpu, kernels

OPTIMIZERS: list[tuple[str, type, dict[str, Any]]] = [
    ("tiger", tigeropt.Tiger, dict(lr=0.01)),
    ("lion", tigeropt.Lion, dict(lr=0.01, weight_decay=0.1)),
    ("adax", tigeropt.AdaX, dict(lr=0.01)),
    ("adagrad", tigeropt.Adagrad, dict(lr=0.1, lr_decay=0.01, weight_decay=0.01)),
    ("glove", tigeropt.Adagrad, dict(lr=0.05, glove=True, grad_clip_value=1.0)),
]
IDS = [o[0] for o in OPTIMIZERS]
PATHS = {"default": {}, "foreach": dict(foreach=True), "reference": dict(foreach=False)}
if kernels.triton_usable():
    PATHS["fused"] = dict(fused=True)
EXPECTED_PATH = {"default": "cpu" if _cpu.available() else "foreach", "foreach": "foreach",
                 "reference": "reference", "fused": "fused"}


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Any:
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def _train(make: Callable[..., torch.optim.Optimizer], compiled: bool, steps: int = 6, device: str = "cpu"
           ) -> tuple[torch.nn.Module, dict[str, int]]:
    """A training loop whose step (forward, backward, opt.step, zero_grad) is compiled or eager."""
    model = _model().to(device)
    lr = torch.tensor(0.01, device=device)
    opt = make(model.parameters(), lr)
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(32, 8, generator=gen).to(device), torch.randn(32, 3, generator=gen).to(device))
            for _ in range(steps)]

    def train_step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    step = torch.compile(train_step) if compiled else train_step
    for i, (x, y) in enumerate(data):
        lr.fill_(0.01 * 0.8 ** i)  # a scheduler writing into the lr tensor
        step(x, y)
    return model, {"graphs": counters["stats"]["unique_graphs"],
                   "breaks": sum(counters["graph_break"].values())}


_ADAMW: dict[str, dict[str, int]] = {}


def _adamw_counts(device: str) -> dict[str, int]:
    """Graphs and breaks of torch.optim.AdamW on the same compiled loop (measured once per device)."""
    if device not in _ADAMW:
        _, _ADAMW[device] = _train(lambda ps, lr: torch.optim.AdamW(ps, lr=lr), compiled=True, device=device)
        torch._dynamo.reset()
        counters.clear()
    return _ADAMW[device]


@pytest.mark.parametrize("name,cls,kwargs", OPTIMIZERS, ids=IDS)
def test_compiled_train_step_no_more_graphs_than_adamw_and_equal_to_eager(name: str, cls: type,
                                                                          kwargs: dict[str, Any]) -> None:
    adamw = _adamw_counts("cpu")
    make = lambda ps, lr: cls(ps, **dict(kwargs, lr=lr))  # noqa: E731
    compiled, ours = _train(make, compiled=True)
    assert ours["graphs"] <= adamw["graphs"], (ours, adamw, dict(counters["graph_break"]))
    assert ours["breaks"] <= adamw["breaks"], (ours, adamw, dict(counters["graph_break"]))
    eager, _ = _train(make, compiled=False)
    for p, q, p0 in zip(compiled.parameters(), eager.parameters(), _model().parameters()):
        # the compiled forward/backward may round gradients differently from eager: a few ulps
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-5)
        assert not torch.equal(p, p0)  # the steps did update the parameters


def _params(dtype: torch.dtype = torch.float32, seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(5, 3), (7,), (300,), (2, 3, 4)]
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]


def _set_grads(params: list[torch.nn.Parameter], i: int) -> None:
    gen = torch.Generator().manual_seed(100 + i)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("name,cls,kwargs", OPTIMIZERS, ids=IDS)
def test_fullgraph_step_after_one_eager_step(name: str, cls: type, kwargs: dict[str, Any], path: str) -> None:
    """torch.compile(opt.step, fullgraph=True) after one eager step, tensor lr changed every step."""
    params, twins = _params(), _params()
    lr, lr_twin = torch.tensor(kwargs["lr"]), torch.tensor(kwargs["lr"])
    opt = cls(params, **dict(kwargs, lr=lr), **PATHS[path])
    ref = cls(twins, **dict(kwargs, lr=lr_twin), **PATHS[path])
    assert opt._path(opt.param_groups[0], torch.device("cpu"), torch.float32) == EXPECTED_PATH[path]
    _set_grads(params, 0)
    _set_grads(twins, 0)
    opt.step()
    ref.step()
    step = torch.compile(opt.step, fullgraph=True)
    for i in range(1, 5):
        lr.fill_(kwargs["lr"] * 0.7 ** i)
        lr_twin.fill_(kwargs["lr"] * 0.7 ** i)
        _set_grads(params, i)
        _set_grads(twins, i)
        step()
        ref.step()
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["graph_break"])
    exact = path in ("default", "fused")  # opaque ops; elsewhere Inductor generates its own code
    for p, q in zip(params, twins):
        if exact:
            assert torch.equal(p, q), (p - q).abs().max()
        else:
            torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6)
        for key in opt.state_keys:
            torch.testing.assert_close(opt.state[p][key], ref.state[q][key], atol=1e-6, rtol=1e-6)
        assert opt.state[p]["step"].item() == 5


@pytest.mark.parametrize("name,cls,kwargs", OPTIMIZERS, ids=IDS)
def test_float_lr_changed_every_step_costs_at_most_one_recompile(name: str, cls: type,
                                                                 kwargs: dict[str, Any]) -> None:
    """A float lr rewritten every step (as an LR scheduler does): one recompile, no breaks, eager result."""
    params, twins = _params(), _params()
    opt, ref = cls(params, **kwargs), cls(twins, **kwargs)
    _set_grads(params, 0)
    _set_grads(twins, 0)
    opt.step()
    ref.step()
    step = torch.compile(opt.step)
    for i in range(1, 7):
        for o in (opt, ref):
            o.param_groups[0]["lr"] = kwargs["lr"] * 0.9 ** i
        _set_grads(params, i)
        _set_grads(twins, i)
        step()
        ref.step()
    assert counters["stats"]["unique_graphs"] <= 2, counters["stats"]
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert isinstance(opt.param_groups[0]["lr"], float)  # the user's value is left as it is
    for p, q in zip(params, twins):
        assert torch.equal(p, q), (p - q).abs().max()


def test_custom_ops_declare_their_mutations() -> None:
    """The fused C steps are torch.library ops whose schemas mark params and state as mutated."""
    for name, nstates in (("tiger", 1), ("lion", 1), ("adax", 2), ("adagrad", 1)):
        schema = getattr(torch.ops.tigeropt, f"cpu_{name}").default._schema
        mutated = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
        assert len(mutated) == 1 + nstates and mutated[0] == "params", (name, mutated)
        assert "grads" not in mutated


def test_custom_op_called_directly_matches_the_launcher() -> None:
    """The op (what a compiled graph calls) equals the eager launcher, also for tensors it must copy."""
    params, twins = _params(), _params()
    params[0] = torch.nn.Parameter(params[0].detach().t().contiguous().t())  # non-contiguous: copied
    twins[0] = torch.nn.Parameter(twins[0].detach().t().contiguous().t())
    m = [torch.zeros_like(p) for p in params]
    m2 = copy.deepcopy(m)
    steps = [torch.tensor(1.0) for _ in params]
    grads = [torch.randn(p.shape) for p in params]
    from tigeropt.lion import _multi_tensor_lion

    with torch.no_grad():
        torch.ops.tigeropt.cpu_lion(params, grads, m, steps, 0.0, torch.tensor(0.1), 0.9, 0.99, 0.1, False)
        _cpu.fused_lion(twins, grads, m2, steps, lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.1,
                        maximize=False, fallback=_multi_tensor_lion)
    for a, b in zip(params + m, twins + m2):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------- CUDA
@pytest.fixture
def _cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if not kernels.triton_usable():
        pytest.skip(kernels.triton_status())


@pytest.mark.gpu
@pytest.mark.parametrize("name,cls,kwargs", OPTIMIZERS, ids=IDS)
def test_cuda_compiled_train_step_no_more_graphs_than_adamw(name: str, cls: type, kwargs: dict[str, Any],
                                                            _cuda: None) -> None:
    adamw = _adamw_counts("cuda")
    make = lambda ps, lr: cls(ps, **dict(kwargs, lr=lr))  # noqa: E731
    compiled, ours = _train(make, compiled=True, device="cuda")
    assert ours["graphs"] <= adamw["graphs"] and ours["breaks"] <= adamw["breaks"], (ours, adamw)
    eager, _ = _train(make, compiled=False, device="cuda")
    for p, q in zip(compiled.parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("name,cls,kwargs", OPTIMIZERS, ids=IDS)
def test_cuda_graph_capture_of_the_compiled_capturable_step(name: str, cls: type, kwargs: dict[str, Any],
                                                            _cuda: None) -> None:
    """capturable=True: the compiled step (fused custom op) captured in a CUDA graph, replayed with new
    gradients and a new lr each time, equals the eager steps."""
    params = [torch.nn.Parameter(p.detach().cuda()) for p in _params()]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    lr, lr_twin = torch.tensor(kwargs["lr"], device="cuda"), torch.tensor(kwargs["lr"], device="cuda")
    opt = cls(params, **dict(kwargs, lr=lr), capturable=True)
    ref = cls(twins, **dict(kwargs, lr=lr_twin), capturable=True)
    for p, q in zip(params, twins):  # static gradient buffers, refilled before every replay
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    opt.step()
    ref.step()
    step = torch.compile(opt.step, fullgraph=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compiles, builds the launch tables
        for _ in range(2):
            step()
            ref.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for i in range(3):
        gen = torch.Generator(device="cuda").manual_seed(i)
        for p, q in zip(params, twins):
            p.grad.copy_(torch.randn(p.shape, device="cuda", generator=gen))
            q.grad.copy_(p.grad)
        lr.fill_(kwargs["lr"] * 0.5 ** i)
        lr_twin.fill_(kwargs["lr"] * 0.5 ** i)
        graph.replay()
        ref.step()
    torch.cuda.synchronize()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6)
        assert opt.state[p]["step"].item() == ref.state[q]["step"].item() == 6


# ---------------------------------------------------------------------------------------- low precision
def _lowp_run(cls: type, compiled: bool, backend: str = "inductor", **kw: Any
              ) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer]:
    """bf16 parameters, 1 eager step, then 4 steps of opt.step (compiled with fullgraph=True, or eager)."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).bfloat16()) for s in [(300, 7), (7,)]]
    opt = cls(params, lr=0.01, stochastic_rounding=True, sr_seed=3, **kw)
    step = opt.step
    for i in range(5):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).bfloat16()
        step()
        if i == 0 and compiled:
            step = torch.compile(opt.step, fullgraph=True, backend=backend)
    return params, opt


def test_low_precision_step_traces_whole_and_equals_eager_bitwise() -> None:
    """bf16 parameters + stochastic rounding, 8-bit exp_avg, bf16 exp_avg_sq (AdaX "8bit"): Dynamo
    traces the whole step (the rounding keys come from the step tensors, no int(), no C store), in one
    graph without breaks; run by the eager ATen ops (aot_eager) it is the eager step bit for bit."""
    eager, opt_e = _lowp_run(tigeropt.AdaX, False, state_precision="8bit")
    traced, opt_t = _lowp_run(tigeropt.AdaX, True, "aot_eager", state_precision="8bit")
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["graph_break"])
    assert sum(counters["graph_break"].values()) == 0
    for p, q in zip(eager, traced):
        assert torch.equal(p, q)
        st_e, st_t = opt_e.state[p], opt_t.state[q]
        assert st_t["exp_avg"].dtype == torch.uint8 and st_t["exp_avg_sq"].dtype == torch.bfloat16
        for key in st_e:
            assert torch.equal(st_e[key], st_t[key]), key


def test_low_precision_inductor_step_equals_eager() -> None:
    """Compiled by Inductor (bf16 + SR parameters, 8-bit Tiger momentum): the fp32 momentum may differ
    from eager by Inductor's rounding (FMA contraction: 1 ulp), which reaches the 8-bit absmax (1 ulp)
    and, rarely, a code or a stochastically rounded bit; everything else is the eager result."""
    eager, opt_e = _lowp_run(tigeropt.Tiger, False, state_precision="8bit")
    compiled, opt_c = _lowp_run(tigeropt.Tiger, True, state_precision="8bit")
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["graph_break"])
    for p, q in zip(eager, compiled):
        assert (p != q).float().mean() <= 1e-3
        torch.testing.assert_close(p, q, atol=0, rtol=2 ** -7)  # one bf16 unit at most
        st_e, st_c = opt_e.state[p], opt_c.state[q]
        assert (st_e["exp_avg"] != st_c["exp_avg"]).float().mean() <= 1e-2
        torch.testing.assert_close(st_c["exp_avg_absmax"], st_e["exp_avg_absmax"], atol=0, rtol=1e-6)
        assert st_c["step"].item() == 5
