"""DDP and FSDP2 (DTensor parameters) on CPU with gloo: the same numbers as one process on the full batch.

Two worker processes (the ranks) are started once per module: each runs every
scenario below and stores the final (full) parameters; the tests compare them
with a single-process run on the whole batch, computed here.  Models are fp64
so that the order of the gradient reductions changes nothing visible (the
sign-based optimizers would amplify fp32 rounding into a flipped sign now and then).

Scenarios, each on a small MLP whose 7-row weight is split unevenly (4/3) by FSDP2:
* DDP + Tiger on every path; plain ``state_dict`` save at step k and resume.
* FSDP2 + every optimizer on every path (Tiger's ``lr_scaling`` needs the RMS of the
  whole tensor, not of the local shard); state sharded like the parameters.
* FSDP2 checkpoints through ``torch.distributed.checkpoint``: save at step k with 2
  ranks, resume with 2 ranks and with 1 rank (resharding), and save with 1 rank, resume
  with 2; equal to not stopping (every optimizer, GloVe and row-wise Adagrad, lazy rows).
* Row-wise Adagrad: its ``(rows,)`` accumulator is a DTensor sharded with the rows; a
  ``Shard(1)`` parameter is refused in the constructor.
* A NaN in one rank's gradient shard: ``on_nonfinite="skip"`` and Tiger's ``nan_guard``
  decide the same on every rank (whole-tensor semantics).
* ``lazy=True`` (touched rows only) on an FSDP2-sharded embedding.
* Low precision (bf16 parameters with stochastic rounding, bf16 and 8-bit state) under FSDP2:
  bit for bit the parameters and state of one process, DCP resume with 2 ranks and with 1 rank
  (and a 1-rank checkpoint with 2);
  on the default path the shards go through the fused C step (blocks split between shards: the
  torch code and the all-reduce).
  The model computes in fp64 from bf16 parameters (FSDP2's ``param_dtype=float64``, gradients
  reduced in fp64 and rounded to bf16 once, as one process rounds its fp64 gradient), so the
  gradients are the same bits; the rounding hash takes global element indices and the 8-bit
  blocks are the whole tensor's, including blocks split between the two ranks' shards.

The workers are this file run as a script (``python test_distributed.py RANK WORLD DIR PHASE``)
with a ``FileStore`` rendezvous, so no port has to be chosen.
"""

from __future__ import annotations

import faulthandler
import importlib.util
import math
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
NAN_AT = (5, 1)  # element of the first weight (7 x 5) that gets a NaN gradient; row 5 lives on rank 1

CONFIGS: dict[str, tuple[type, dict[str, Any]]] = {
    "tiger": (Tiger, dict(lr=1e-2, weight_decay=0.1)),
    "tiger_lr_scaling": (Tiger, dict(lr=1e-2, lr_scaling=True)),
    "lion": (Lion, dict(lr=1e-2, weight_decay=0.1)),
    "adax": (AdaX, dict(lr=1e-2)),
    "adagrad": (Adagrad, dict(lr=1e-1, weight_decay=0.01)),
    "adagrad_glove": (Adagrad, dict(lr=5e-2, glove=True)),
    # row-wise: the 2-D weights in a rowwise=True group (see _opt); the (rows,) sum sharded with the rows
    "adagrad_rowwise": (Adagrad, dict(lr=1e-1, weight_decay=0.01, rowwise=True)),
}
#: DCP: save with 2 ranks, resume with 2, with 1 (and a 1-rank checkpoint with 2); LAZY names on the embedding
CHECKPOINTED = ["tiger", "lion", "adax", "adagrad", "adagrad_glove", "adagrad_rowwise", "tiger_lazy"]
NONFINITE = {
    "skip": (Tiger, dict(lr=1e-2, on_nonfinite="skip")),
    "nan_guard": (Tiger, dict(lr=1e-2, nan_guard=True)),
}
LAZY = {
    "tiger_lazy": (Tiger, dict(lr=1e-2, lazy=True)),
    "adax_lazy": (AdaX, dict(lr=1e-2, lazy=True)),
}
#: bf16 parameters; every config rounds stochastically (sr_seed 5)
LOWP: dict[str, tuple[type, dict[str, Any]]] = {
    "tiger_sr": (Tiger, dict(lr=1e-2, weight_decay=0.1)),
    "lion_bf16": (Lion, dict(lr=1e-2, weight_decay=0.1, state_precision="bf16")),
    "tiger_8bit": (Tiger, dict(lr=1e-2, state_precision="8bit")),
    "adax_8bit": (AdaX, dict(lr=1e-2, state_precision="8bit")),
    "adagrad_bf16": (Adagrad, dict(lr=1e-1, state_precision="bf16")),
    "adax_bf16": (AdaX, dict(lr=1e-2, state_precision="bf16")),
    # whole-tensor RMS: not for the kernels (nor for the torch code on a shard's split blocks)
    "tiger_lr_scaling_8bit": (Tiger, dict(lr=1e-2, lr_scaling=True, state_precision="8bit")),
    "adagrad_rowwise_bf16": (Adagrad, dict(lr=1e-1, state_precision="bf16", rowwise=True)),
}
LOWP_PATHS = {"tiger_8bit": ["default", "reference"]}  # others: the default path
LOWP_CHECKPOINTED = ["tiger_sr", "lion_bf16", "tiger_8bit", "adax_8bit", "adagrad_bf16", "adax_bf16",
                     "adagrad_rowwise_bf16", "lion_lazy_8bit"]
#: (saved by, loaded into): a full-state-dict checkpoint converted to the loader's state_precision
LOWP_CONVERT = [("tiger_sr", "tiger_8bit"), ("tiger_8bit", "tiger_sr"), ("adax_8bit", "adax_bf16")]
#: bf16, SR; a lazy group for the embedding (256-element rows: whole 8-bit blocks), a dense one for the rest
LOWP_LAZY: dict[str, tuple[type, dict[str, Any]]] = {
    "tiger_lazy_bf16": (Tiger, dict(lr=1e-2, state_precision="bf16")),
    "lion_lazy_8bit": (Lion, dict(lr=1e-2, state_precision="8bit")),
    "adax_lazy_8bit": (AdaX, dict(lr=1e-2, state_precision="8bit")),
}


def _paths() -> dict[str, dict[str, Any]]:
    paths: dict[str, dict[str, Any]] = {"reference": dict(foreach=False), "foreach": dict(foreach=True),
                                        "default": {}}
    kernels_present = all(importlib.util.find_spec(f"tigeropt.kernels.{k}") is not None
                          for k in ("tiger", "lion", "adax", "adagrad"))
    if kernels_present and tigeropt.kernels.triton_usable():
        paths["fused"] = dict(fused=True)
    return paths


PATHS = _paths()


def _combos(configs: dict[str, tuple[type, dict[str, Any]]]) -> list[tuple[str, str]]:
    """(config, path) pairs; fused only where the kernels implement the config's options."""
    out = []
    for name, (cls, kw) in configs.items():
        opt = cls([nn.Parameter(torch.zeros(1, 1))], **kw)
        out += [(name, p) for p in PATHS if p != "fused" or opt._fused_ok(opt.param_groups[0])]
    return out


def _dtype(path: str) -> torch.dtype:
    """fp64 everywhere, except on the fused path whose kernels take fp32/bf16/fp16 only."""
    return torch.float32 if path == "fused" else torch.float64


def _opt(cls: type, kw: dict[str, Any], model: nn.Module) -> torch.optim.Optimizer:
    """``cls`` over the model's parameters; ``rowwise=True``: the 2-D ones in a row-wise group."""
    if not kw.get("rowwise"):
        return cls(model.parameters(), **kw)
    kw = {k: v for k, v in kw.items() if k != "rowwise"}
    params = list(model.parameters())
    return cls([{"params": [p for p in params if p.dim() == 2], "rowwise": True},
                {"params": [p for p in params if p.dim() != 2]}], **kw)


def _fp64_config(name: str) -> tuple[type, dict[str, Any], str]:
    """(class, options, model kind) of a CONFIGS or LAZY name."""
    if name in LAZY:
        return (*LAZY[name], "emb")
    return (*CONFIGS[name], "mlp")


# --------------------------------------------------------------------------- model, data, training
def _model(kind: str = "mlp", seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Sequential:
    torch.manual_seed(seed)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(dtype)
    return nn.Sequential(nn.Embedding(9, 6), nn.Linear(6, 3)).to(dtype)


class F64Linear(nn.Linear):
    """A linear layer computing in fp64 whatever its parameters' dtype (bf16 here): one process
    rounds the fp64 gradient to bf16 once, as FSDP2 with ``param_dtype=reduce_dtype=float64`` does."""

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x.double(), self.weight.double(), self.bias.double())


class F64Embedding(nn.Embedding):
    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.embedding(x, self.weight.double())


def _lowp_model(seed: int = 0, kind: str = "mlp") -> nn.Sequential:
    """bf16 parameters whose FSDP2 shards split 8-bit blocks: the first weight (120 x 5, 600 elements,
    3 blocks) is cut at element 300 inside block 1; the second (3 x 120) at 240 inside block 0.
    ``kind="emb_lowp"``: a 9 x 256 embedding (rows 0-4 on rank 0, 5-8 on rank 1; rows 7, 8 never
    looked up) and a 256 -> 3 linear layer."""
    torch.manual_seed(seed)
    if kind == "emb_lowp":
        return nn.Sequential(F64Embedding(9, 256), F64Linear(256, 3)).to(torch.bfloat16)
    return nn.Sequential(F64Linear(5, 120), nn.Tanh(), F64Linear(120, 3)).to(torch.bfloat16)


def _lowp_kw(name: str, pname: str = "default") -> tuple[type, dict[str, Any]]:
    cls, kw = {**LOWP, **LOWP_LAZY}[name]
    return cls, {**kw, "stochastic_rounding": True, "sr_seed": 5, **PATHS[pname]}


def _lowp_optimizer(model: nn.Module, name: str, pname: str = "default") -> torch.optim.Optimizer:
    cls, kw = _lowp_kw(name, pname)
    if name in LOWP_LAZY:  # the embedding in a lazy group
        return cls([{"params": list(model[0].parameters()), "lazy": True},
                    {"params": list(model[1].parameters())}], **kw)
    return _opt(cls, kw, model)


def _lowp_kind(name: str) -> str:
    return "emb_lowp" if name in LOWP_LAZY else "mlp"


def _batches(kind: str, dtype: torch.dtype) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(1234)
    out = []
    dtype = torch.float64 if dtype == torch.bfloat16 else dtype  # bf16 parameters compute in fp64
    for _ in range(STEPS):
        if kind == "mlp":
            x = torch.randn(8, 5, generator=gen, dtype=torch.float64).to(dtype)
        else:  # rows 5..8 of the embedding are never looked up
            x = torch.randint(0, 7 if kind == "emb_lowp" else 5, (8,), generator=gen)
        out.append((x, torch.randn(8, 3, generator=gen, dtype=torch.float64).to(dtype)))
    return out


def _full_state(model: nn.Module, opt: torch.optim.Optimizer) -> list[dict[str, Tensor]]:
    """Each parameter's optimizer state as whole tensors (8-bit codes and absmax included)."""
    return [{k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
             for k, v in opt.state[p].items()} for p in model.parameters()]


def _inject_nan(model: nn.Module, rank: int, world: int) -> None:
    """Put a NaN into the gradient element NAN_AT of the first weight (only on the rank owning it)."""
    grad = next(iter(model.parameters())).grad
    row, col = NAN_AT
    if hasattr(grad, "to_local"):
        per_rank = math.ceil(grad.shape[0] / world)  # FSDP2 shards dim 0 like torch.chunk
        if row // per_rank == rank:
            grad.to_local()[row - rank * per_rank, col] = float("nan")
    else:
        grad[row, col] = float("nan")


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: range, *, kind: str = "mlp", rank: int = 0,
           world: int = 1, nan_step: int | None = None) -> None:
    batches = _batches(kind, next(iter(model.parameters())).dtype)
    for t in steps:
        x, y = batches[t]
        x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        opt.zero_grad()
        (model(x) - y).square().mean().backward()
        if t == nan_step:
            _inject_nan(model, rank, world)
        opt.step()


def _full(model: nn.Module) -> list[Tensor]:
    return [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for p in model.parameters()]


def _single_lowp(name: str, pname: str = "reference") -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """One process, bf16 parameters: (parameters, optimizer state) after STEPS steps."""
    model = _lowp_model(kind=_lowp_kind(name))
    opt = _lowp_optimizer(model, name, pname)
    _train(model, opt, range(STEPS), kind=_lowp_kind(name))
    return _full(model), _full_state(model, opt)


def _single_lowp_convert(saver: str, loader: str) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """One process: RESUME_AT steps with ``saver``'s options, state_dict, loaded into ``loader``'s
    optimizer (another state_precision: converted) on a fresh model, the remaining steps."""
    model = _lowp_model()
    opt = _lowp_optimizer(model, saver)
    _train(model, opt, range(RESUME_AT))
    ck = {"model": model.state_dict(), "optim": opt.state_dict()}
    model = _lowp_model(seed=1)
    model.load_state_dict(ck["model"])
    opt = _lowp_optimizer(model, loader)
    opt.load_state_dict(ck["optim"])
    _train(model, opt, range(RESUME_AT, STEPS))
    return _full(model), _full_state(model, opt)


def _single(cls: type, kw: dict[str, Any], *, kind: str = "mlp", nan_step: int | None = None,
            dtype: torch.dtype = torch.float64) -> list[Tensor]:
    model = _model(kind, dtype=dtype)
    opt = _opt(cls, {**kw, "foreach": False}, model)
    _train(model, opt, range(STEPS), kind=kind, nan_step=nan_step)
    return _full(model)


# --------------------------------------------------------------------------- worker side
def _fsdp(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    bf16 = next(iter(model.parameters())).dtype == torch.bfloat16
    # bf16 parameters: computed and reduced in fp64 (see the module docstring)
    mp = MixedPrecisionPolicy(param_dtype=torch.float64, reduce_dtype=torch.float64) if bf16 else None
    kw = {"mp_policy": mp} if mp is not None else {}
    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer, **kw)
    fully_shard(model, **kw)
    return model


def _lowp_dcp_resume(name: str, ckpt: str, rank: int, world: int
                     ) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    kind = _lowp_kind(name)
    model = _fsdp(_lowp_model(seed=1, kind=kind))
    opt = _lowp_optimizer(model, name)
    sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(sd, checkpoint_id=ckpt)
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, opt, sd["optim"])
    _train(model, opt, range(RESUME_AT, STEPS), kind=kind, rank=rank, world=world)
    return _full(model), _full_state(model, opt)


def _dcp_resume(name: str, ckpt: str, rank: int, world: int) -> list[Tensor]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    cls, kw, kind = _fp64_config(name)
    model = _fsdp(_model(kind, seed=1))  # other initial values: only the checkpoint can make this right
    opt = _opt(cls, kw, model)
    sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(sd, checkpoint_id=ckpt)
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, opt, sd["optim"])
    _train(model, opt, range(RESUME_AT, STEPS), kind=kind, rank=rank, world=world)
    return _full(model)


def _dcp_save(name: str, ckpt: str, rank: int, world: int, lowp: bool) -> None:
    """RESUME_AT steps of ``name`` (a LOWP or a fp64 config) under FSDP2, saved by DCP to ``ckpt``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    if lowp:
        kind = _lowp_kind(name)
        model = _fsdp(_lowp_model(kind=kind))
        opt = _lowp_optimizer(model, name)
    else:
        cls, kw, kind = _fp64_config(name)
        model = _fsdp(_model(kind))
        opt = _opt(cls, kw, model)
    _train(model, opt, range(RESUME_AT), kind=kind, rank=rank, world=world)
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=ckpt)


def _scenarios(rank: int, world: int, outdir: str) -> dict[str, Callable[[], Any]]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    from torch.nn.parallel import DistributedDataParallel as DDP

    jobs: dict[str, Callable[[], Any]] = {}

    def ddp(pname: str) -> list[Tensor]:
        model = DDP(_model(dtype=_dtype(pname)))
        opt = Tiger(model.parameters(), **{**CONFIGS["tiger"][1], **PATHS[pname]})
        _train(model, opt, range(STEPS), rank=rank, world=world)
        return _full(model.module)

    def ddp_resume() -> list[Tensor]:
        kw = CONFIGS["tiger"][1]
        model = DDP(_model())
        opt = Tiger(model.parameters(), **kw)
        _train(model, opt, range(RESUME_AT), rank=rank, world=world)
        file = os.path.join(outdir, "ddp.pt")
        if rank == 0:
            torch.save({"model": model.module.state_dict(), "optim": opt.state_dict()}, file)
        dist.barrier()
        ck = torch.load(file, weights_only=True)
        model = DDP(_model(seed=1))
        model.module.load_state_dict(ck["model"])
        opt = Tiger(model.parameters(), **kw)
        opt.load_state_dict(ck["optim"])
        _train(model, opt, range(RESUME_AT, STEPS), rank=rank, world=world)
        return _full(model.module)

    def fsdp(cls: type, kw: dict[str, Any], *, kind: str = "mlp", nan_step: int | None = None,
             pname: str = "default") -> list[Tensor]:
        model = _fsdp(_model(kind, dtype=_dtype(pname)))
        kw = {**kw, **PATHS[pname]}
        opt = _opt(cls, kw, model)
        _train(model, opt, range(STEPS), kind=kind, rank=rank, world=world, nan_step=nan_step)
        return _full(model)

    def fsdp_state(cls: type, kw: dict[str, Any]) -> list[tuple[str, str, bool]]:
        """(state key, placements, local state shape == local param shape, or (local rows,) for a
        row-wise weight) for every tensor state."""
        model = _fsdp(_model())
        opt = _opt(cls, kw, model)
        _train(model, opt, range(1), rank=rank, world=world)
        out = []
        for p in model.parameters():
            for key, s in opt.state[p].items():
                if key != "step":
                    local = p.to_local().shape
                    want = local[:1] if kw.get("rowwise") and p.dim() == 2 else local
                    same = hasattr(s, "to_local") and s.to_local().shape == want
                    out.append((key, str(getattr(s, "placements", None)), same))
        return out

    def fsdp_checkpoint(name: str) -> list[Tensor]:
        ckpt = os.path.join(outdir, f"ckpt_{name}")
        _dcp_save(name, ckpt, rank, world, lowp=False)
        return _dcp_resume(name, ckpt, rank, world)

    def fsdp_lowp(name: str, pname: str) -> tuple[list[Tensor], list[dict[str, Tensor]], int]:
        """(parameters, state, number of shards the fused C kernel took with their global offsets)."""
        from tigeropt import _cpu

        kind = _lowp_kind(name)
        model = _fsdp(_lowp_model(kind=kind))
        opt = _lowp_optimizer(model, name, pname)
        taken = []
        real = _cpu.lowp_step

        def spy(opt_name: str, params: list[Tensor], *args: Any, **kwargs: Any) -> list[int]:
            rest = real(opt_name, params, *args, **kwargs)
            if kwargs.get("offsets") is not None:
                taken.append(len(params) - len(rest))
            return rest

        _cpu.lowp_step = spy
        try:
            _train(model, opt, range(STEPS), kind=kind, rank=rank, world=world)
        finally:
            _cpu.lowp_step = real
        return _full(model), _full_state(model, opt), sum(taken)

    def fsdp_lowp_checkpoint(name: str) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
        ckpt = os.path.join(outdir, f"ckpt_lowp_{name}")
        _dcp_save(name, ckpt, rank, world, lowp=True)
        return _lowp_dcp_resume(name, ckpt, rank, world)

    def fsdp_lowp_convert(saver: str, loader: str) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
        """A full (unsharded) state dict of ``saver``'s run loaded into ``loader``'s optimizer: each rank
        cuts its shards, quantizing or decoding on the way (the 8-bit blocks all-reduced)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        full = StateDictOptions(full_state_dict=True)
        model = _fsdp(_lowp_model())
        opt = _lowp_optimizer(model, saver)
        _train(model, opt, range(RESUME_AT), rank=rank, world=world)
        ck = {"model": get_model_state_dict(model, options=full),
              "optim": get_optimizer_state_dict(model, opt, options=full)}
        model = _fsdp(_lowp_model(seed=1))
        opt = _lowp_optimizer(model, loader)
        set_model_state_dict(model, ck["model"], options=full)
        set_optimizer_state_dict(model, opt, ck["optim"], options=full)
        _train(model, opt, range(RESUME_AT, STEPS), rank=rank, world=world)
        return _full(model), _full_state(model, opt)

    def lowp_placements() -> tuple[str, str]:
        """Tensor-parallel-like Shard(1): refused with an error naming the placements."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (world,))
        p = nn.Parameter(distribute_tensor(torch.zeros(3, 4, dtype=torch.bfloat16), mesh, [Shard(1)]))
        opt = Tiger([p], stochastic_rounding=True)
        p.grad = distribute_tensor(torch.ones(3, 4, dtype=torch.bfloat16), mesh, [Shard(1)])
        try:
            opt.step()
        except RuntimeError as exc:
            return ("raised", str(exc))
        return ("stepped", "")

    def rowwise_placements() -> tuple[str, str]:
        """Row-wise Adagrad on a Shard(1) DTensor (rows split between ranks): refused in the constructor."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (world,))
        p = nn.Parameter(distribute_tensor(torch.zeros(3, 4), mesh, [Shard(1)]))
        try:
            Adagrad([p], rowwise=True)
        except ValueError as exc:
            return ("raised", str(exc))
        return ("constructed", "")

    jobs["rowwise_placements"] = rowwise_placements
    for name in [*LOWP, *LOWP_LAZY]:
        for pname in LOWP_PATHS.get(name, ["default"]):
            jobs[f"lowp/{name}/{pname}"] = lambda name=name, pname=pname: fsdp_lowp(name, pname)
    for name in LOWP_CHECKPOINTED:
        jobs[f"lowp_dcp/{name}"] = lambda name=name: fsdp_lowp_checkpoint(name)
    jobs["lowp_placements"] = lowp_placements
    for saver, loader in LOWP_CONVERT:
        jobs[f"lowp_convert/{saver}/{loader}"] = lambda s=saver, ld=loader: fsdp_lowp_convert(s, ld)
    for pname in PATHS:
        jobs[f"ddp/{pname}"] = lambda pname=pname: ddp(pname)
    jobs["ddp_resume"] = ddp_resume
    for name, pname in _combos(CONFIGS):
        jobs[f"fsdp/{name}/{pname}"] = lambda name=name, pname=pname: fsdp(*CONFIGS[name], pname=pname)
    for name, (cls, kw) in CONFIGS.items():
        jobs[f"fsdp_state/{name}"] = lambda cls=cls, kw=kw: fsdp_state(cls, kw)
    for name in CHECKPOINTED:
        jobs[f"fsdp_dcp/{name}"] = lambda name=name: fsdp_checkpoint(name)
    for name, pname in _combos(NONFINITE):
        jobs[f"nonfinite/{name}/{pname}"] = lambda name=name, pname=pname: fsdp(
            *NONFINITE[name], nan_step=NAN_STEP, pname=pname)
    for name, (cls, kw) in LAZY.items():
        jobs[f"lazy/{name}"] = lambda cls=cls, kw=kw: fsdp(cls, kw, kind="emb")
    return jobs


def _worker(rank: int, world: int, outdir: str, phase: str) -> None:
    faulthandler.enable()  # a crash in a kernel shows its Python stack in the test failure
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(os.path.join(outdir, f"store_{phase}"), world),
                            rank=rank, world_size=world)
    if phase == "main":
        jobs = _scenarios(rank, world, outdir)
    else:  # "reshard": the 2-rank checkpoints resumed on 1 rank, 1-rank ones saved; "grow": those on 2
        src, dst = ("ckpt", "ckpt1") if phase == "reshard" else ("ckpt1", None)
        jobs = {}
        for lowp, names in ((False, CHECKPOINTED), (True, LOWP_CHECKPOINTED)):
            pre = "lowp_" if lowp else ""
            resume = _lowp_dcp_resume if lowp else _dcp_resume
            for name in names:
                jobs[f"{pre}{phase}/{name}"] = lambda name=name, pre=pre, resume=resume: resume(
                    name, os.path.join(outdir, f"{src}_{pre}{name}"), rank, world)
                if dst is not None:
                    jobs[f"{pre}save1/{name}"] = lambda name=name, pre=pre, lowp=lowp: _dcp_save(
                        name, os.path.join(outdir, f"{dst}_{pre}{name}"), rank, world, lowp)
    results: dict[str, Any] = {}
    for key, job in jobs.items():
        try:
            results[key] = job()
        except Exception:  # recorded, and reported by the test that reads it
            results[key] = "".join(traceback.format_exc(limit=-6))
        dist.barrier()
    torch.save(results, os.path.join(outdir, f"{phase}_rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    # gloo's worker threads can abort the interpreter's shutdown ("terminate called without an
    # active exception"); everything is written, so leave without it.
    os._exit(0)


# --------------------------------------------------------------------------- test side
def _launch(world: int, outdir: str, phase: str) -> dict[str, Any]:
    run_ranks(__file__, world, [outdir, phase], phase)
    merged: dict[str, Any] = {}
    for r in range(world):
        for key, value in torch.load(os.path.join(outdir, f"{phase}_rank{r}.pt"), weights_only=False).items():
            if isinstance(value, str):  # an error on any rank is the result
                if not isinstance(merged.get(key), str):
                    merged[key] = f"rank {r}:\n{value}"
            elif r == 0:
                merged[key] = value
    return merged


@pytest.fixture(scope="module")
def results() -> dict[str, Any]:
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    with tempfile.TemporaryDirectory() as outdir:
        out = _launch(WORLD, outdir, "main")
        out.update(_launch(1, outdir, "reshard"))
        out.update(_launch(WORLD, outdir, "grow"))
    return out


def _get(results: dict[str, Any], key: str) -> Any:
    value = results[key]
    if isinstance(value, str):
        pytest.fail(f"{key} raised in the worker:\n{value}")
    return value


def _assert_same(got: list[Tensor], want: list[Tensor]) -> None:
    """Equal up to the order of the gradient reduction (fp64: 1e-12; fp32 on the fused path: 1e-5)."""
    assert len(got) == len(want)
    tol = 1e-12 if want[0].dtype == torch.float64 else 1e-5
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g, w, atol=tol, rtol=tol)


@pytest.mark.parametrize("path", list(PATHS))
def test_ddp_tiger_matches_single_process(results: dict[str, Any], path: str) -> None:
    want = _single(*CONFIGS["tiger"], dtype=_dtype(path))
    initial = _model(dtype=_dtype(path)).parameters()
    assert not any(torch.equal(w, p) for w, p in zip(want, initial))  # it trained
    _assert_same(_get(results, f"ddp/{path}"), want)


def test_ddp_state_dict_resume_equals_not_stopping(results: dict[str, Any]) -> None:
    _assert_same(_get(results, "ddp_resume"), _single(*CONFIGS["tiger"]))


@pytest.mark.parametrize(("name", "path"), _combos(CONFIGS))
def test_fsdp2_matches_single_process(results: dict[str, Any], name: str, path: str) -> None:
    _assert_same(_get(results, f"fsdp/{name}/{path}"), _single(*CONFIGS[name], dtype=_dtype(path)))


def test_tiger_lr_scaling_uses_whole_tensor_rms(results: dict[str, Any]) -> None:
    """A per-shard RMS would differ: the two shards of the first weight have different RMS."""
    weight = _model()[0].weight.detach()
    rms_shards = [s.square().mean().sqrt() for s in weight.chunk(WORLD)]
    assert abs(float(rms_shards[0] - rms_shards[1])) > 1e-3  # so the check below can tell them apart
    got = _get(results, "fsdp/tiger_lr_scaling/default")
    _assert_same(got, _single(*CONFIGS["tiger_lr_scaling"]))
    assert not torch.allclose(got[0], _single(*CONFIGS["tiger"])[0], atol=1e-6)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fsdp2_state_is_sharded_like_the_parameters(results: dict[str, Any], name: str) -> None:
    info = _get(results, f"fsdp_state/{name}")
    cls = CONFIGS[name][0]
    assert len(info) == len(cls.state_keys) * len(list(_model().parameters()))
    for key, placements, same_local_shape in info:
        assert key in cls.state_keys
        assert placements == "(Shard(dim=0),)", (key, placements)
        assert same_local_shape


def _single_fp64(name: str) -> list[Tensor]:
    cls, kw, kind = _fp64_config(name)
    return _single(cls, kw, kind=kind)


@pytest.mark.parametrize("name", CHECKPOINTED)
def test_fsdp2_dcp_resume_equals_not_stopping(results: dict[str, Any], name: str) -> None:
    want = _single_fp64(name)
    assert not torch.equal(want[0], next(_model(_fp64_config(name)[2]).parameters()))  # it trained
    _assert_same(_get(results, f"fsdp_dcp/{name}"), want)


@pytest.mark.parametrize("name", CHECKPOINTED)
def test_fsdp2_dcp_reshards_two_ranks_to_one_and_one_to_two(results: dict[str, Any], name: str) -> None:
    _assert_same(_get(results, f"reshard/{name}"), _single_fp64(name))
    _assert_same(_get(results, f"grow/{name}"), _single_fp64(name))


def test_fsdp2_rowwise_adagrad_refuses_rows_split_between_ranks(results: dict[str, Any]) -> None:
    outcome, message = _get(results, "rowwise_placements")
    assert outcome == "raised"
    assert "rowwise" in message and "dim 0" in message and "Shard(dim=1)" in message


@pytest.mark.parametrize(("name", "path"), _combos(NONFINITE))
def test_nan_in_one_shard_is_handled_alike_on_every_rank(results: dict[str, Any], name: str,
                                                         path: str) -> None:
    cls, kw = NONFINITE[name]
    want = _single(cls, kw, nan_step=NAN_STEP, dtype=_dtype(path))
    assert all(torch.isfinite(w).all() for w in want)
    # the NaN step did something different from a clean step (skip / shrink), so the check is not vacuous
    assert not torch.allclose(want[0], _single(cls, kw, dtype=_dtype(path))[0], atol=1e-4)
    _assert_same(_get(results, f"nonfinite/{name}/{path}"), want)


@pytest.mark.parametrize("name", list(LAZY))
def test_fsdp2_lazy_rows(results: dict[str, Any], name: str) -> None:
    cls, kw = LAZY[name]
    want = _single(cls, kw, kind="emb")
    got = _get(results, f"lazy/{name}")
    _assert_same(got, want)
    untouched = _model("emb")[0].weight.detach()[5:]
    torch.testing.assert_close(got[0][5:], untouched, atol=0, rtol=0)
    assert not torch.equal(got[0][:5], _model("emb")[0].weight.detach()[:5])


def _assert_bitwise(got: tuple[list[Tensor], list[dict[str, Tensor]]],
                    want: tuple[list[Tensor], list[dict[str, Tensor]]]) -> None:
    for g, w in zip(got[0], want[0]):
        assert g.dtype == w.dtype == torch.bfloat16
        assert torch.equal(g, w), (g.float() - w.float()).abs().max()
    assert len(got[1]) == len(want[1])
    for g, w in zip(got[1], want[1]):
        assert g.keys() == w.keys()
        for k in w:
            assert g[k].dtype == w[k].dtype and torch.equal(g[k], w[k]), k


@pytest.mark.parametrize(("name", "path"), [(n, p) for n in LOWP for p in LOWP_PATHS.get(n, ["default"])])
def test_fsdp2_low_precision_equals_one_process_bitwise(results: dict[str, Any], name: str,
                                                        path: str) -> None:
    want = _single_lowp(name)
    initial = list(_lowp_model().parameters())
    assert all(not torch.equal(w, p0) for w, p0 in zip(want[0], initial))  # it trained
    state = want[1][0]
    key = LOWP[name][0].state_keys[0]
    precision = LOWP[name][1].get("state_precision")
    assert state[key].dtype == {None: torch.float32, "bf16": torch.bfloat16, "8bit": torch.uint8}[precision]
    if precision == "8bit":  # blocks split between the ranks' shards hold non-zero codes on both sides
        assert state[key].reshape(-1)[299].item() != 0 and state[key].reshape(-1)[300].item() != 0
    got = _get(results, f"lowp/{name}/{path}")
    _assert_bitwise(got, want)
    from tigeropt import _cpu

    if path == "default" and _cpu.available():  # the shards went through the fused C step
        assert (got[2] > 0) == ("lr_scaling" not in LOWP[name][1])


@pytest.mark.parametrize("name", list(LOWP_LAZY))
def test_fsdp2_low_precision_lazy_rows_equal_one_process_bitwise(results: dict[str, Any], name: str) -> None:
    """Lazy rows of an FSDP2-sharded embedding (touched rows on both ranks, rows 7 and 8 never)."""
    want = _single_lowp(name)
    got = _get(results, f"lowp/{name}/default")
    _assert_bitwise(got, want)
    initial = _lowp_model(kind="emb_lowp")[0].weight.detach()
    assert torch.equal(got[0][0][7:], initial[7:]) and not torch.equal(got[0][0][5:7], initial[5:7])
    if LOWP_LAZY[name][1]["state_precision"] == "8bit":
        state = got[1][0]
        assert state["exp_avg"].dtype == torch.uint8 and state["exp_avg_absmax"].shape == (9,)
        assert (state["exp_avg_absmax"][:7] > 0).all() and (state["exp_avg_absmax"][7:] == 0).all()


@pytest.mark.parametrize("name", LOWP_CHECKPOINTED)
def test_fsdp2_low_precision_dcp_resume_and_reshard(results: dict[str, Any], name: str) -> None:
    """Saved with 2 ranks, resumed with 2 and with 1; saved with 1, resumed with 2: bit for bit."""
    want = _single_lowp(name)
    _assert_bitwise(_get(results, f"lowp_dcp/{name}"), want)
    _assert_bitwise(_get(results, f"lowp_reshard/{name}"), want)
    _assert_bitwise(_get(results, f"lowp_grow/{name}"), want)


@pytest.mark.parametrize(("saver", "loader"), LOWP_CONVERT)
def test_fsdp2_checkpoint_converted_between_precisions_equals_one_process(results: dict[str, Any], saver: str,
                                                                         loader: str) -> None:
    """fp32 -> 8-bit (quantized), 8-bit -> fp32 (decoded), 8-bit -> bf16 on load under FSDP2: the one-process
    conversion bit for bit (the loader's state_precision is what the state becomes)."""
    want = _single_lowp_convert(saver, loader)
    got = _get(results, f"lowp_convert/{saver}/{loader}")
    _assert_bitwise(got, want)
    key = LOWP[loader][0].state_keys[0]
    dtypes = {None: torch.float32, "bf16": torch.bfloat16, "8bit": torch.uint8}
    assert got[1][0][key].dtype == dtypes[LOWP[loader][1].get("state_precision")]


def test_low_precision_refuses_shards_that_are_not_ranges(results: dict[str, Any]) -> None:
    outcome, message = _get(results, "lowp_placements")
    assert outcome == "raised"
    assert "dim 0" in message and "Shard(dim=1)" in message


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
