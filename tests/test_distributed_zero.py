"""ZeroRedundancyOptimizer (ZeRO stage 1) with every tigeropt optimizer, and DDP with optimizer_in_backward,
lazy rows and sparse embedding gradients: on CPU with gloo, 2 ranks, the same bits as one process.

Two worker processes (the ranks) are started once per module and run every scenario below; the tests
compare with one process computed here.  Bit for bit: each rank computes the gradient of its half of
the batch and the ranks average them (all-reduce sum, then /2, or DDP); one process computes the two
halves' gradients separately and averages them the same way, (g0 + g1) / 2, which is the same
rounding (a two-term sum is commutative, /2 exact).  So nothing differs but what the optimizer does.

ZeRO puts the largest parameter first, each on the rank with the fewest elements so far: on the MLP
below (weights 60x5, 3x60, biases 60 and 3) rank 0 steps the first weight and rank 1 the other three,
numbered 0, 1, 2 by its local optimizer where their global (state_dict) indices are 2, 1, 3.

The workers are this file run as a script (``python test_distributed_zero.py RANK WORLD DIR``) with a
``FileStore`` rendezvous, so no port has to be chosen.
"""

from __future__ import annotations

import copy
import faulthandler
import os
import sys
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn
from workers import run_ranks

import tigeropt
from tigeropt import Adagrad, AdaX, Lion, Tiger

WORLD = 2
STEPS = 6
RESUME_AT = 3
NAN_STEP = 2

#: fp64 parameters, default path unless a path is named
CONFIGS: dict[str, tuple[type, dict[str, Any]]] = {
    "tiger": (Tiger, dict(lr=1e-2, weight_decay=0.1)),
    "tiger_foreach": (Tiger, dict(lr=1e-2, weight_decay=0.1, foreach=True)),
    "tiger_reference": (Tiger, dict(lr=1e-2, weight_decay=0.1, foreach=False)),
    "tiger_lr_scaling_nan_guard": (Tiger, dict(lr=1e-2, lr_scaling=True, nan_guard=True)),
    "lion": (Lion, dict(lr=1e-2, weight_decay=0.1)),
    "adax": (AdaX, dict(lr=1e-2)),
    "adagrad": (Adagrad, dict(lr=1e-1, weight_decay=0.01)),
    "adagrad_glove": (Adagrad, dict(lr=5e-2, glove=True)),
    "adagrad_rowwise": (Adagrad, dict(lr=1e-1)),  # weights in a rowwise=True group: see _groups
}
#: bf16 parameters (or fp32 where named); every one rounds something stochastically
LOWP: dict[str, tuple[type, dict[str, Any]]] = {
    "tiger_sr": (Tiger, dict(lr=1e-2, weight_decay=0.1, stochastic_rounding=True)),
    "lion_bf16_sr": (Lion, dict(lr=1e-2, state_precision="bf16", stochastic_rounding=True)),
    "tiger_8bit_sr": (Tiger, dict(lr=1e-2, state_precision="8bit", stochastic_rounding=True)),
    "adax_8bit_sr": (AdaX, dict(lr=1e-2, state_precision="8bit", stochastic_rounding=True)),
    "adagrad_bf16_sr": (Adagrad, dict(lr=1e-1, state_precision="bf16", stochastic_rounding=True)),
    "adax_bf16_sr_fp32": (AdaX, dict(lr=1e-2, state_precision="bf16", stochastic_rounding=True)),
}
#: round-to-nearest only: nothing depends on the parameter index, attach_zero or not
LOWP_RTN: dict[str, tuple[type, dict[str, Any]]] = {
    "tiger_8bit": (Tiger, dict(lr=1e-2, state_precision="8bit")),
    "adax_bf16": (AdaX, dict(lr=1e-2, state_precision="bf16")),
}
ALL = {**CONFIGS, **LOWP, **LOWP_RTN}
NONFINITE = {
    "skip": (Tiger, dict(lr=1e-2, on_nonfinite="skip")),
    "raise": (Tiger, dict(lr=1e-2, on_nonfinite="raise")),
}
CHECKPOINTED = ["adagrad", "tiger_8bit_sr", "adax_bf16_sr_fp32"]
#: DDP with an embedding (rows 6..9 never looked up): (optimizer, options, sparse gradients)
EMBEDDING: dict[str, tuple[type, dict[str, Any], bool]] = {
    "tiger_lazy_sparse": (Tiger, dict(lr=1e-2, lazy=True), True),
    "tiger_lazy_dense": (Tiger, dict(lr=1e-2, lazy=True), False),
    "adagrad_sparse": (Adagrad, dict(lr=1e-1), True),
    "lion_lazy_bf16_sparse": (Lion, dict(lr=1e-2, lazy=True, state_precision="bf16"), True),
}
SCHEDULED = ["lion", "tiger_sr"]
#: (saved by, loaded into): a one-process checkpoint of another state_precision loaded by ZeRO
CONVERTED = [("tiger_sr", "tiger_8bit_sr"), ("tiger_8bit_sr", "tiger_sr"), ("adax_8bit_sr", "adax_bf16")]


# --------------------------------------------------------------------------- model, data, training
def _dtype(name: str) -> torch.dtype:
    if name in LOWP or name in LOWP_RTN:
        return torch.float32 if name.endswith("_fp32") else torch.bfloat16
    return torch.float64


def _model(dtype: torch.dtype, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 60), nn.Tanh(), nn.Linear(60, 3)).to(dtype)


def _groups(name: str, model: nn.Module) -> list[dict[str, Any]] | list[Tensor]:
    if name == "adagrad_rowwise":  # row-wise state for the 2-D weights
        return [{"params": [model[0].weight, model[2].weight], "rowwise": True},
                {"params": [model[0].bias, model[2].bias]}]
    return list(model.parameters())


def _batches(dtype: torch.dtype) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(1234)
    return [(torch.randn(8, 5, generator=gen).to(dtype), torch.randn(8, 3, generator=gen).to(dtype))
            for _ in range(STEPS)]


def _grads(model: nn.Module, x: Tensor, y: Tensor, rank: int | None) -> None:
    """The gradient averaged over the WORLD halves of the batch: this rank's half all-reduced
    (``rank``), or in one process every half's, averaged in the same rounding (``rank=None``)."""
    params = list(model.parameters())
    if rank is not None:
        (model(x.chunk(WORLD)[rank]) - y.chunk(WORLD)[rank]).square().mean().backward()
        for p in params:
            dist.all_reduce(p.grad)
            p.grad.div_(WORLD)
        return
    halves = []
    for r in range(WORLD):
        for p in params:
            p.grad = None
        (model(x.chunk(WORLD)[r]) - y.chunk(WORLD)[r]).square().mean().backward()
        halves.append([p.grad for p in params])
    for p, g0, g1 in zip(params, *halves):
        p.grad = (g0 + g1) / WORLD


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: range, rank: int | None, *,
           nan_step: int | None = None, sched: Any = None, grow: Callable[[int], None] | None = None) -> None:
    batches = _batches(next(model.parameters()).dtype)
    for t in steps:
        if grow is not None:
            grow(t)
        x, y = batches[t]
        opt.zero_grad()
        _grads(model, x, y, rank)
        if t == nan_step:  # a NaN in the last bias's gradient (rank 1's parameter), on every rank
            model[2].bias.grad[1] = float("nan")
        opt.step()
        if sched is not None:
            sched.step()


def _single(name: str, *, nan_step: int | None = None, sched: bool = False, grow: bool = False
            ) -> tuple[list[Tensor], dict[str, Any]]:
    """One process: (parameters, state_dict) after STEPS steps."""
    cls, kw = {**ALL, **NONFINITE}[name]
    model = _model(_dtype(name))
    params = list(model.parameters())
    opt = cls(params[:2] if grow else _groups(name, model), **kw)
    _train(model, opt, range(STEPS), None, nan_step=nan_step, sched=_scheduler(opt) if sched else None,
           grow=_grower(opt, params) if grow else None)
    return _params(model), opt.state_dict()


def _scaled_train(model: nn.Module, opt: torch.optim.Optimizer, scaler: Any, rank: int | None) -> None:
    """GradScaler's loop: the loss scaled (by a power of two: unscaling is exact), step through the
    scaler, which skips the step with an inf gradient (the last bias's, on every rank, at NAN_STEP)."""
    batches = _batches(torch.float32)
    for t in range(STEPS):
        x, y = batches[t]
        opt.zero_grad()
        params = list(model.parameters())
        if rank is not None:
            scaler.scale((model(x.chunk(WORLD)[rank]) - y.chunk(WORLD)[rank]).square().mean()).backward()
            for p in params:
                dist.all_reduce(p.grad)
                p.grad.div_(WORLD)
        else:
            halves = []
            for r in range(WORLD):
                for p in params:
                    p.grad = None
                scaler.scale((model(x.chunk(WORLD)[r]) - y.chunk(WORLD)[r]).square().mean()).backward()
                halves.append([p.grad for p in params])
            for p, g0, g1 in zip(params, *halves):
                p.grad = (g0 + g1) / WORLD
        if t == NAN_STEP:
            model[2].bias.grad[1] = float("inf")
        scaler.step(opt)
        scaler.update()


def _scheduler(opt: torch.optim.Optimizer) -> Any:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 ** t)


def _grower(opt: torch.optim.Optimizer, params: list[Tensor]) -> Callable[[int], None]:
    def grow(t: int) -> None:
        if t == RESUME_AT:  # the second layer joins with its own lr
            opt.add_param_group({"params": params[2:], "lr": 3e-3})
    return grow


def _params(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _emb_model(sparse: bool, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Embedding(10, 4, sparse=sparse), nn.Linear(4, 3)).double()


def _emb_batches() -> list[tuple[Tensor, Tensor]]:
    """Each half of a batch looks up 4 distinct rows of 0..5 (so no gradient sums more than two terms:
    rank 0's and rank 1's, the same rounding in any order); rows 6..9 never."""
    gen = torch.Generator().manual_seed(99)
    out = []
    for _ in range(STEPS):
        halves = [torch.randperm(6, generator=gen)[:4] for _ in range(WORLD)]
        out.append((torch.cat(halves), torch.randn(4 * WORLD, 3, generator=gen, dtype=torch.float64)))
    return out


def _emb_single(name: str) -> tuple[list[Tensor], dict[str, Any]]:
    cls, kw, sparse = EMBEDDING[name]
    model = _emb_model(sparse)
    opt = cls(model.parameters(), **kw)
    for x, y in _emb_batches():
        halves = []
        for r in range(WORLD):
            opt.zero_grad()
            (model(x.chunk(WORLD)[r]) - y.chunk(WORLD)[r]).square().mean().backward()
            halves.append([p.grad for p in model.parameters()])
        for p, g0, g1 in zip(model.parameters(), *halves):
            p.grad = ((g0 + g1) / WORLD).coalesce() if g0.is_sparse else (g0 + g1) / WORLD
        opt.step()
    return _params(model), opt.state_dict()


def _oib_single() -> list[Tensor]:
    cls, kw = CONFIGS["tiger"]
    model = _model(torch.float64)
    opt = cls(model.parameters(), **kw)
    _train(model, opt, range(STEPS), None)
    return _params(model)


# --------------------------------------------------------------------------- worker side
def _zero(name: str, model: nn.Module, *, attach: bool = True, bucket_view: bool = False,
          params: Any = None) -> Any:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    cls, kw = {**ALL, **NONFINITE}[name]
    zero = ZeroRedundancyOptimizer(_groups(name, model) if params is None else params, optimizer_class=cls,
                                   parameters_as_bucket_view=bucket_view, **kw)
    return tigeropt.attach_zero(zero) if attach else zero


def _consolidated(zero: Any) -> dict[str, Any] | None:
    zero.consolidate_state_dict(to=0)
    return zero.state_dict() if dist.get_rank() == 0 else None


def _scenarios(rank: int, outdir: str) -> dict[str, Callable[[], Any]]:
    jobs: dict[str, Callable[[], Any]] = {}

    def run(name: str, attach: bool = True, bucket_view: bool = False, nan_step: int | None = None,
            sched: bool = False) -> tuple[list[Tensor], dict[str, Any] | None, list[int]]:
        """(parameters, consolidated state_dict on rank 0, number of parameters this rank stepped)"""
        model = _model(_dtype(name))
        zero = _zero(name, model, attach=attach, bucket_view=bucket_view)
        _train(model, zero, range(STEPS), rank, nan_step=nan_step, sched=_scheduler(zero) if sched else None)
        local = [len(g["params"]) for g in zero.optim.param_groups]
        return _params(model), _consolidated(zero), local

    def nonfinite(name: str, attach: bool) -> Any:
        try:
            return run(name, attach=attach, nan_step=NAN_STEP)
        except FloatingPointError as exc:
            return ("raised", str(exc))

    def grow(name: str) -> tuple[list[Tensor], dict[str, Any] | None]:
        model = _model(_dtype(name))
        params = list(model.parameters())
        zero = _zero(name, model, params=params[:2])
        _train(model, zero, range(STEPS), rank, grow=_grower(zero, params))
        return _params(model), _consolidated(zero)

    def checkpoint(name: str) -> dict[str, Any]:
        """Save a consolidated ZeRO checkpoint at RESUME_AT, resume it in a fresh ZeRO; load a one-process
        checkpoint into a ZeRO and resume.  The ZeRO checkpoint is left in outdir for the test process."""
        cls, kw = ALL[name]
        model = _model(_dtype(name))
        zero = _zero(name, model)
        _train(model, zero, range(RESUME_AT), rank)
        sd = _consolidated(zero)
        file = os.path.join(outdir, f"zero_{name}.pt")
        if rank == 0:
            torch.save({"model": model.state_dict(), "optim": sd}, file)
        dist.barrier()
        out: dict[str, Any] = {}
        for source in ("zero", "single"):
            if source == "zero":
                ck = torch.load(file, weights_only=True)
            else:  # one process (every rank the same), its plain state_dict
                m1 = _model(_dtype(name))
                o1 = cls(_groups(name, m1), **kw)
                _train(m1, o1, range(RESUME_AT), None)
                ck = {"model": m1.state_dict(), "optim": copy.deepcopy(o1.state_dict())}
            model = _model(_dtype(name), seed=1)  # other values: only the checkpoint makes them right
            model.load_state_dict(ck["model"])
            zero = _zero(name, model)
            zero.load_state_dict(ck["optim"])
            _train(model, zero, range(RESUME_AT, STEPS), rank)
            out[source] = (_params(model), _consolidated(zero))
        return out

    def ddp_embedding(name: str, zero: bool = False) -> tuple[list[Tensor], dict[str, Any] | None]:
        """DDP with the embedding; ``zero``: the optimizer inside a ZeroRedundancyOptimizer too."""
        from torch.distributed.optim import ZeroRedundancyOptimizer
        from torch.nn.parallel import DistributedDataParallel as DDP

        cls, kw, sparse = EMBEDDING[name]
        model = DDP(_emb_model(sparse))
        if zero:
            opt = tigeropt.attach_zero(ZeroRedundancyOptimizer(model.parameters(), optimizer_class=cls, **kw))
        else:
            opt = cls(model.parameters(), **kw)
        for x, y in _emb_batches():
            opt.zero_grad()
            (model(x.chunk(WORLD)[rank]) - y.chunk(WORLD)[rank]).square().mean().backward()
            opt.step()
        return _params(model.module), _consolidated(opt) if zero else opt.state_dict()

    def ddp_in_backward(order: str) -> Any:
        """optimizer_in_backward with DDP: "cpu" as it is here (refused at the first step); "before" /
        "after" (built before / after wrapping the model) with torch's accelerator-stream wait
        emulated by a no-op, so that DDP's in-backward hook runs on CPU; "early": as if built before
        init_process_group (no handle map then): not wired into DDP, so it warns at its first step."""
        import warnings

        from torch.nn.parallel import DistributedDataParallel as DDP

        from tigeropt import in_backward

        cls, kw = CONFIGS["tiger"]
        model = _model(torch.float64)
        batches = _batches(torch.float64)
        if order == "fsdp2":  # FSDP2 runs the hooks of its sharded parameters after the reduce-scatter
            from torch.distributed.fsdp import fully_shard

            for layer in (model[0], model[2]):
                fully_shard(layer)
            fully_shard(model)
            opt = tigeropt.optimizer_in_backward(model.parameters(), cls, **kw)
            for t in range(STEPS):
                x, y = batches[t]
                (model(x.chunk(WORLD)[rank]) - y.chunk(WORLD)[rank]).square().mean().backward()
            grads_freed = all(p.grad is None for p in model.parameters())
            full = [p.full_tensor().detach().clone() for p in model.parameters()]
            return full, grads_freed, [], len(opt.optimizers)
        if order == "cpu":
            ddp = DDP(model)
            opt = tigeropt.optimizer_in_backward(model.parameters(), cls, **kw)
            x, y = batches[0]
            try:
                (ddp(x.chunk(WORLD)[rank]) - y.chunk(WORLD)[rank]).square().mean().backward()
            except RuntimeError as exc:
                return ("raised", str(exc), _params(model))
            return ("stepped", "", _params(model))

        class _Stream:
            def wait_stream(self, stream: Any) -> None:
                pass

        saved = (torch.accelerator.current_stream, in_backward._accelerator_available,
                 in_backward._ddp_handle_map)
        torch.accelerator.current_stream = lambda *a, **k: _Stream()
        in_backward._accelerator_available = lambda: True
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if order == "early":
                    in_backward._ddp_handle_map = lambda: None
                    opt = tigeropt.optimizer_in_backward(model.parameters(), cls, **kw)
                    in_backward._ddp_handle_map = saved[2]
                    ddp = DDP(model)
                elif order == "before":
                    opt = tigeropt.optimizer_in_backward(model.parameters(), cls, **kw)
                    ddp = DDP(model)
                else:
                    ddp = DDP(model)
                    opt = tigeropt.optimizer_in_backward(ddp.parameters(), cls, **kw)
                for t in range(STEPS):
                    x, y = batches[t]
                    (ddp(x.chunk(WORLD)[rank]) - y.chunk(WORLD)[rank]).square().mean().backward()
                grads_freed = all(p.grad is None for p in model.parameters())
            return _params(model), grads_freed, [str(w.message) for w in caught], len(opt.optimizers)
        finally:
            (torch.accelerator.current_stream, in_backward._accelerator_available,
             in_backward._ddp_handle_map) = saved

    for name in EMBEDDING:
        jobs[f"ddp_embedding/{name}"] = lambda name=name: ddp_embedding(name)
        jobs[f"zero_embedding/{name}"] = lambda name=name: ddp_embedding(name, zero=True)
    for order in ("cpu", "before", "after", "early", "fsdp2"):
        jobs[f"ddp_in_backward/{order}"] = lambda order=order: ddp_in_backward(order)
    for name in ALL:
        jobs[f"zero/{name}"] = lambda name=name: run(name)
    for name in ["tiger", "adagrad_rowwise", "tiger_8bit_sr", "adax_bf16_sr_fp32"]:
        jobs[f"zero_bucket_view/{name}"] = lambda name=name: run(name, bucket_view=True)
    for name in ["tiger_sr", "tiger_8bit_sr", *LOWP_RTN]:
        jobs[f"zero_unattached/{name}"] = lambda name=name: run(name, attach=False)
    for name in NONFINITE:
        jobs[f"nonfinite/{name}/True"] = lambda name=name: nonfinite(name, True)
    # not "raise" without attach_zero: rank 1 would raise and rank 0 wait in ZeRO's broadcast
    jobs["nonfinite/skip/False"] = lambda: nonfinite("skip", False)
    for name in SCHEDULED:
        jobs[f"sched/{name}"] = lambda name=name: run(name, sched=True)
    for name in ["adax", "tiger_sr"]:
        jobs[f"grow/{name}"] = lambda name=name: grow(name)
    def convert(saver: str, loader: str) -> tuple[list[Tensor], dict[str, Any] | None]:
        """A one-process checkpoint of ``saver`` (another state_precision) loaded into ``loader``'s ZeRO."""
        cls, kw = ALL[saver]
        m1 = _model(_dtype(saver))
        o1 = cls(_groups(saver, m1), **kw)
        _train(m1, o1, range(RESUME_AT), None)
        model = _model(_dtype(loader), seed=1)
        model.load_state_dict(m1.state_dict())
        zero = _zero(loader, model)
        zero.load_state_dict(copy.deepcopy(o1.state_dict()))
        _train(model, zero, range(RESUME_AT, STEPS), rank)
        return _params(model), _consolidated(zero)

    def refused() -> tuple[str, str, bool, bool]:
        """A Lion checkpoint loaded into a Tiger ZeRO: (outcome, message, checkpoint dict untouched,
        local state untouched)."""
        m1 = _model(torch.float64)
        o1 = Lion(m1.parameters(), lr=1e-2)
        _train(m1, o1, range(1), None)
        ck = o1.state_dict()
        before = {k: set(v) for k, v in ck["state"].items()}
        model = _model(torch.float64)
        zero = _zero("tiger", model)
        _train(model, zero, range(1), rank)
        state = {id(p): dict(st) for p, st in zero.optim.state.items()}
        try:
            zero.load_state_dict(ck)
        except ValueError as exc:
            outcome, message = "raised", str(exc)
        else:
            outcome, message = "loaded", ""
        same = all(all(v is state[id(p)][k] for k, v in st.items()) for p, st in zero.optim.state.items())
        return outcome, message, {k: set(v) for k, v in ck["state"].items()} == before, same

    def scaled() -> tuple[list[Tensor], dict[str, Any] | None, float]:
        """torch.amp.GradScaler driving the ZeRO object (fp32, an inf in one gradient at NAN_STEP)."""
        model = _model(torch.float32)
        zero = _zero("tiger", model)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
        _scaled_train(model, zero, scaler, rank)
        return _params(model), _consolidated(zero), scaler.get_scale()

    jobs["ckpt_refused"] = refused
    jobs["scaled"] = scaled
    for name in CHECKPOINTED:
        jobs[f"ckpt/{name}"] = lambda name=name: checkpoint(name)
    for saver, loader in CONVERTED:
        jobs[f"convert/{saver}/{loader}"] = lambda s=saver, ld=loader: convert(s, ld)
    return jobs


def _worker(rank: int, world: int, outdir: str) -> None:
    faulthandler.enable()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(os.path.join(outdir, "store"), world),
                            rank=rank, world_size=world)
    results: dict[str, Any] = {}
    for key, job in _scenarios(rank, outdir).items():
        try:
            results[key] = job()
        except Exception:  # recorded, and reported by the test that reads it
            results[key] = "".join(traceback.format_exc(limit=-6))
        dist.barrier()
    torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gloo's threads can abort the interpreter's shutdown; everything is written


# --------------------------------------------------------------------------- test side
@pytest.fixture(scope="module")
def results() -> dict[str, Any]:
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    with tempfile.TemporaryDirectory() as outdir:
        run_ranks(__file__, WORLD, [outdir])
        per_rank = [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]
        files = {name: torch.load(os.path.join(outdir, f"zero_{name}.pt"), weights_only=True)
                 for name in CHECKPOINTED if os.path.exists(os.path.join(outdir, f"zero_{name}.pt"))}
    return {"ranks": per_rank, "files": files}


def _get(results: dict[str, Any], key: str, rank: int = 0) -> Any:
    for r, res in enumerate(results["ranks"]):
        if isinstance(res[key], str):
            pytest.fail(f"{key} raised in the worker on rank {r}:\n{res[key]}")
    return results["ranks"][rank][key]


def _assert_bitwise(got: tuple[list[Tensor], dict[str, Any] | None], want: tuple[list[Tensor], dict[str, Any]]
                    ) -> None:
    """Parameters and the (consolidated) optimizer state: the same dtypes and bits."""
    assert len(got[0]) == len(want[0])
    for i, (g, w) in enumerate(zip(got[0], want[0])):
        assert g.dtype == w.dtype and torch.equal(g, w), (i, (g.double() - w.double()).abs().max())
    assert got[1] is not None
    gs, ws = got[1]["state"], want[1]["state"]
    assert sorted(gs) == sorted(ws)
    for i in ws:
        assert gs[i].keys() == ws[i].keys(), i
        for k in ws[i]:
            assert gs[i][k].dtype == ws[i][k].dtype and torch.equal(gs[i][k], ws[i][k]), (i, k)
    sizes = [[len(g["params"]) for g in sd["param_groups"]] for sd in (got[1], want[1])]
    assert sizes[0] == sizes[1]
    for g, w in zip(got[1]["param_groups"], want[1]["param_groups"]):
        assert float(g["lr"]) == float(w["lr"])


def _trained(want: tuple[list[Tensor], dict[str, Any]], name: str) -> None:
    """The reference moved every parameter (so equality with it says something)."""
    initial = _model(_dtype(name)).parameters()
    assert all(not torch.equal(w, p0) for w, p0 in zip(want[0], initial))


@pytest.mark.parametrize("name", list(ALL))
def test_zero_equals_one_process_bitwise(results: dict[str, Any], name: str) -> None:
    """Each rank steps its share of the parameters, ZeRO broadcasts them: one process's parameters
    and state bit for bit (stochastic rounding keyed on global indices: attach_zero)."""
    want = _single(name)
    _trained(want, name)
    got = _get(results, f"zero/{name}")
    _assert_bitwise(got[:2], want)
    assert got[2] != _get(results, f"zero/{name}", rank=1)[2]  # the ranks stepped different shares
    assert _get(results, f"zero/{name}", rank=1)[0][0].equal(got[0][0])  # and agree after the broadcast


@pytest.mark.parametrize("name", ["tiger", "adagrad_rowwise", "tiger_8bit_sr", "adax_bf16_sr_fp32"])
def test_zero_parameters_as_bucket_view_equals_one_process(results: dict[str, Any], name: str) -> None:
    _assert_bitwise(_get(results, f"zero_bucket_view/{name}")[:2], _single(name))


@pytest.mark.parametrize("name", list(LOWP_RTN))
def test_zero_round_to_nearest_needs_no_attach(results: dict[str, Any], name: str) -> None:
    _assert_bitwise(_get(results, f"zero_unattached/{name}")[:2], _single(name))


@pytest.mark.parametrize("name", ["tiger_sr", "tiger_8bit_sr"])
def test_zero_without_attach_rounds_with_local_indices(results: dict[str, Any], name: str) -> None:
    """Documented: without attach_zero each rank's local optimizer numbers its own parameters, so the
    stochastic rounding of the parameters whose local and global indices differ (rank 1's second weight:
    local 0, global 2) is not one process's, and through the gradients the whole trajectory differs."""
    want = _single(name)
    got = _get(results, f"zero_unattached/{name}")
    assert not torch.equal(got[0][2], want[0][2])
    assert all(torch.isfinite(g).all() for g in got[0])


@pytest.mark.parametrize("name", list(NONFINITE))
def test_zero_nonfinite_decided_over_the_whole_group(results: dict[str, Any], name: str) -> None:
    """A NaN in the gradient of a parameter rank 1 steps: with attach_zero every rank skips (as one
    process skips the whole group) or raises; without it only rank 1 skips (or would raise)."""
    got = [_get(results, f"nonfinite/{name}/True", rank=r) for r in range(WORLD)]
    if name == "skip":
        want = _single(name, nan_step=NAN_STEP)
        assert not torch.equal(want[0][0], _single(name)[0][0])  # skipping changed the trajectory
        _assert_bitwise(got[0][:2], want)
        unattached = _get(results, f"nonfinite/{name}/False")
        assert not torch.equal(unattached[0][0], want[0][0])  # rank 0 stepped its weight at the NaN step
    else:
        with pytest.raises(FloatingPointError):
            _single(name, nan_step=NAN_STEP)
        assert all(g[0] == "raised" and "non-finite" in g[1] for g in got)


@pytest.mark.parametrize("name", SCHEDULED)
def test_zero_lr_scheduler_on_the_zero_object(results: dict[str, Any], name: str) -> None:
    want = _single(name, sched=True)
    assert not torch.equal(want[0][0], _single(name)[0][0])  # the schedule changed the trajectory
    got = _get(results, f"sched/{name}")
    _assert_bitwise(got[:2], want)
    assert float(got[1]["param_groups"][0]["lr"]) == ALL[name][1]["lr"] * 0.5 ** STEPS


@pytest.mark.parametrize("name", ["adax", "tiger_sr"])
def test_zero_add_param_group(results: dict[str, Any], name: str) -> None:
    """The second layer added at step RESUME_AT with its own lr (global indices 2, 3 appended)."""
    want = _single(name, grow=True)
    _assert_bitwise(_get(results, f"grow/{name}"), want)
    assert len(want[1]["param_groups"]) == 2


@pytest.mark.parametrize("name", CHECKPOINTED)
def test_zero_checkpoint_resumes_in_zero_and_in_one_process(results: dict[str, Any], name: str) -> None:
    """consolidate_state_dict + state_dict on rank 0: resumed by a fresh ZeRO, by a plain optimizer in
    one process, and a one-process checkpoint resumed by ZeRO: all equal not stopping, bit for bit."""
    want = _single(name)
    got = _get(results, f"ckpt/{name}")
    _assert_bitwise(got["zero"], want)
    _assert_bitwise(got["single"], want)
    ck = results["files"][name]
    cls, kw = ALL[name]
    model = _model(_dtype(name), seed=1)
    model.load_state_dict(ck["model"])
    opt = cls(_groups(name, model), **kw)
    opt.load_state_dict(ck["optim"])
    _train(model, opt, range(RESUME_AT, STEPS), None)
    _assert_bitwise((_params(model), opt.state_dict()), want)


@pytest.mark.parametrize("zero", [False, True], ids=["ddp", "ddp_zero"])
@pytest.mark.parametrize("name", list(EMBEDDING))
def test_ddp_embedding_lazy_and_sparse_equal_one_process(results: dict[str, Any], name: str,
                                                        zero: bool) -> None:
    """DDP all-reduces sparse embedding gradients (and dense ones of a lazy group), with the optimizer
    itself or inside ZeRO: one process's parameters and state bit for bit, and the rows no rank
    looked up (6..9) never move."""
    want = _emb_single(name)
    got = _get(results, f"{'zero' if zero else 'ddp'}_embedding/{name}")
    _assert_bitwise(got, want)
    initial = _emb_model(EMBEDDING[name][2])[0].weight.detach()
    assert torch.equal(got[0][0][6:], initial[6:]) and not torch.equal(got[0][0][:6], initial[:6])


def test_ddp_optimizer_in_backward_refused_without_an_accelerator(results: dict[str, Any]) -> None:
    """CPU-only DDP cannot run torch's in-backward hook: a clear RuntimeError before any update (before the
    fix each rank stepped with its own gradient before the all-reduce and the replicas drifted apart)."""
    for r in range(WORLD):
        outcome, message, params = _get(results, "ddp_in_backward/cpu", rank=r)
        assert outcome == "raised" and "accelerator" in message and "nothing was updated" in message
        assert all(torch.equal(p, p0) for p, p0 in zip(params, _model(torch.float64).parameters()))


@pytest.mark.parametrize("order", ["before", "after", "fsdp2"])
def test_ddp_optimizer_in_backward_steps_after_the_all_reduce(results: dict[str, Any], order: str) -> None:
    """Built before or after wrapping in DDP (before its first forward): DDP's communication hook steps
    each parameter's optimizer with the all-reduced gradient, one process bit for bit (torch's stream
    wait emulated: see ddp_in_backward), the gradients freed.  Under FSDP2 (sharded parameters) the
    hooks run after the reduce-scatter: the same."""
    want = _oib_single()
    for r in range(WORLD):
        params, grads_freed, warned, n = _get(results, f"ddp_in_backward/{order}", rank=r)
        assert n == len(want) and grads_freed and not warned
        for g, w in zip(params, want):
            assert torch.equal(g, w), (g - w).abs().max()


def test_ddp_optimizer_in_backward_built_before_init_process_group_warns(results: dict[str, Any]) -> None:
    """Not wired into DDP (no process group when it was built): each rank steps with its own gradient
    before the all-reduce, so the replicas drift apart from each other and from one process; it says so."""
    got = [_get(results, "ddp_in_backward/early", rank=r) for r in range(WORLD)]
    for _, _, warned, _ in got:
        assert len(warned) == 1 and "init_process_group" in warned[0]
    assert not torch.equal(got[0][0][0], got[1][0][0])
    assert not torch.equal(got[0][0][0], _oib_single()[0])


@pytest.mark.parametrize(("saver", "loader"), CONVERTED)
def test_zero_loads_a_checkpoint_of_another_state_precision(results: dict[str, Any], saver: str,
                                                            loader: str) -> None:
    """torch's ZeRO.load_state_dict writes each rank's state into the local optimizer directly and
    copies the checkpoint's state_precision into the groups (so it ran on in the saver's precision);
    attach_zero routes it through tigeropt's load_state_dict, which converts the state to the
    loader's precision: one process's conversion, bit for bit."""
    cls, kw = ALL[saver]
    m1 = _model(_dtype(saver))
    o1 = cls(_groups(saver, m1), **kw)
    _train(m1, o1, range(RESUME_AT), None)
    cls, kw = ALL[loader]
    model = _model(_dtype(loader), seed=1)
    model.load_state_dict(m1.state_dict())
    opt = cls(_groups(loader, model), **kw)
    opt.load_state_dict(o1.state_dict())
    _train(model, opt, range(RESUME_AT, STEPS), None)
    want = (_params(model), opt.state_dict())
    key = cls.state_keys[0]
    assert want[1]["state"][0][key].dtype != o1.state_dict()["state"][0][key].dtype  # it was converted
    _assert_bitwise(_get(results, f"convert/{saver}/{loader}"), want)


def test_zero_with_grad_scaler_equals_one_process(results: dict[str, Any]) -> None:
    """GradScaler unscales every parameter's gradient through the ZeRO object's param_groups and skips
    the whole step at the inf (every rank holds the same gradients): one process bit for bit."""
    model = _model(torch.float32)
    opt = Tiger(model.parameters(), **CONFIGS["tiger"][1])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    _scaled_train(model, opt, scaler, None)
    assert scaler.get_scale() == 2.0 ** 9  # the inf step was seen and skipped
    got = _get(results, "scaled")
    _assert_bitwise(got[:2], (_params(model), opt.state_dict()))
    assert got[2] == scaler.get_scale()
    assert all(int(st["step"]) == STEPS - 1 for st in got[1]["state"].values())


def test_zero_load_state_dict_checks_the_checkpoint(results: dict[str, Any]) -> None:
    """Attached, a Lion checkpoint is refused by the Tiger ZeRO on every rank (torch's loader took it and
    failed later, at a step) and neither the checkpoint dict nor the state changed."""
    for r in range(WORLD):
        outcome, message, untouched, same = _get(results, "ckpt_refused", rank=r)
        assert outcome == "raised" and "Lion" in message
        assert untouched and same


def test_attach_zero_refuses_what_is_not_a_tigeropt_zero() -> None:
    with pytest.raises(TypeError, match="ZeroRedundancyOptimizer"):
        tigeropt.attach_zero(Tiger([nn.Parameter(torch.zeros(2))]))


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
