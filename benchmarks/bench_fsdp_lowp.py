"""The low-precision optimizer step under FSDP2 on CPU: the fused C step on the shards vs the torch code.

Two ranks (gloo, one thread each, a ``FileStore`` rendezvous) shard ``--layers`` bf16 linear layers of
``--width`` x ``--width`` with ``fully_shard`` (dim 0, so the 8-bit blocks of most tensors are split
between the ranks' shards).  For each optimizer and state precision (bf16 parameters with stochastic
rounding; fp32, bf16 or 8-bit state) the step runs on the default path (each shard in the fused C
low-precision step, blocks split between shards by the torch code and one all-reduce) and with
``foreach=True`` (the torch code on the DTensors: working copies, foreach math, rounded stores).  Both
give the same bits (tests/test_distributed.py); the table gives the CPU time of ``opt.step()`` (the
thread's CPU time, median of ``--steps`` steps after 2 warm-up steps; the larger of the two ranks).

    python benchmarks/bench_fsdp_lowp.py
    python benchmarks/bench_fsdp_lowp.py --optimizers tiger,adax --width 2000
    python benchmarks/bench_fsdp_lowp.py --out benchmarks/results/fsdp-lowp-cpu-<date>.md   # also a file
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

PRECISIONS = ("fp32", "bf16", "8bit")
PATHS = {"default (C)": {}, "foreach (torch)": {"foreach": True}}


def _worker(rank: int, store: str, args: argparse.Namespace) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    import tigeropt

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, 2), rank=rank, world_size=2)
    rows = []
    for name in args.optimizers.split(","):
        cls = {"tiger": tigeropt.Tiger, "lion": tigeropt.Lion, "adax": tigeropt.AdaX,
               "adagrad": tigeropt.Adagrad}[name]
        for precision in PRECISIONS:
            for pname, path in PATHS.items():
                torch.manual_seed(0)
                model = nn.Sequential(*[nn.Linear(args.width, args.width) for _ in range(args.layers)])
                model = model.to(torch.bfloat16)
                for layer in model:
                    fully_shard(layer)
                fully_shard(model)
                opt = cls(model.parameters(), lr=1e-3, stochastic_rounding=True, **path,
                          state_precision=precision)
                x = torch.randn(8, args.width, dtype=torch.bfloat16)
                times = []
                for _ in range(args.steps + 2):
                    opt.zero_grad()
                    model(x).float().square().mean().backward()
                    dist.barrier()
                    t0 = time.thread_time()
                    opt.step()
                    times.append(time.thread_time() - t0)
                ms = sorted(times[2:])[len(times[2:]) // 2] * 1e3
                gathered: list[float] = [0.0, 0.0]
                dist.all_gather_object(gathered, ms)
                rows.append((name, precision, pname, max(gathered)))
    if rank == 0:
        print(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizers", default="tiger,lion,adax,adagrad", help="comma-separated")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=9, help="timed steps (after 2 untimed ones)")
    parser.add_argument("--out", type=Path, default=None, metavar="PATH",
                        help="also write the table (with command, date, versions, load) to PATH as markdown")
    return parser


def main(argv: list[str]) -> None:
    args = _parser().parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        env = dict(os.environ, OMP_NUM_THREADS="1")
        procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(r), store, *argv], env=env,
                                  stdout=subprocess.PIPE, text=True) for r in range(2)]
        out = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit("a worker failed")
    rows = json.loads(out[0].strip().splitlines()[-1])
    params = args.layers * (args.width * args.width + args.width)
    lines = [f"### FSDP2, 2 ranks (gloo, 1 thread each), {params / 1e6:.1f}M bf16 parameters in "
             f"{args.layers} linear layers; torch {torch.__version__}", "",
             "| optimizer | state | default: fused C on the shards (ms) | foreach: torch code (ms) "
             "| speed-up |",
             "|---|---|---:|---:|---:|"]
    by = {(n, pr, pa): ms for n, pr, pa, ms in rows}
    for name in args.optimizers.split(","):
        for precision in PRECISIONS:
            c, t = by[(name, precision, "default (C)")], by[(name, precision, "foreach (torch)")]
            lines.append(f"| {name} | {precision} | {c:.2f} | {t:.2f} | {t / c:.1f}x |")
    lines += ["", "ms: CPU time of opt.step() (thread time), median of the steps, the larger of the two "
              "ranks; bf16 parameters with stochastic rounding."]
    print("\n".join(lines))
    if args.out is not None:
        load = " / ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
        head = ["# Low-precision step under FSDP2 on CPU", "",
                f"`python benchmarks/bench_fsdp_lowp.py {' '.join(argv)}`", "",
                f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; {platform.machine()} "
                f"({os.cpu_count()} CPUs), Python {platform.python_version()}, torch {torch.__version__}; "
                f"load average at the end {load}", ""]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(head + lines) + "\n")

if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        _worker(int(sys.argv[2]), sys.argv[3], _parser().parse_args(sys.argv[4:]))
    else:
        main(sys.argv[1:])
