"""WGAN on a 2-D mixture of 8 Gaussians: gradient-normalized critics (GN, GraN) vs gradient penalty.

Seed 001 (kexue.fm/archives/8757) describes gradient normalization, GN (ICCV 2021) and GraN
(WACV 2022), and notes that it needs second-order gradients in *both* the critic and the generator
step, while WGAN-GP needs them only in the critic step - so GN/GraN should be slower and heavier.
This script trains the same generator and critic (ReLU MLPs) three ways and measures that:

    gn    critic loss  Dhat(fake) - Dhat(real),  Dhat = GradNormCritic(D, "gn")
    gran  hinge loss   relu(1 - Dhat(real)) + relu(1 + Dhat(fake)),  Dhat = GradNormCritic(D, "gran")
    gp    critic loss  D(fake) - D(real) + gradient_penalty(D, real, fake)   (lambda = 0.1)

and the generator loss is -Dhat(G(z)) (or -D(G(z))).  GraN's Dhat is not bounded (about D/n) and,
as seed 001 points out, jumps between the linear pieces of D, so the Wasserstein critic objective
has no maximum: with ``--loss wgan`` it ran away (samples left the plot) in our runs, hence the
hinge loss for it by default (``--loss`` overrides).  Optimizer: ``tigeropt`` (``--optimizer``,
default AdaX with beta1 = 0.5 as is usual for WGAN-GP's Adam), lr 1e-3 decayed linearly to 0,
5 critic steps per generator step, batch 256, generator and critic 3 x 128 ReLU MLPs.

The WGAN-GP baseline follows Gulrajani et al.'s toy code (wgan_toy.py): lambda = 0.1 ("smaller
lambda seems to help for toy tasks specifically"; 10 is their value for images) and n_critic = 5.
Their 100k iterations at a fixed lr do not fit a CPU example; 1000 iterations with the lr decayed
to 0 let the modes sharpen: with lambda = 10 and a fixed lr 3e-4 the baseline covered 0 of 8
modes, with these settings all 8 (the spread-out ring is the usual WGAN-GP picture early on).

For each method it prints the time per critic step, per generator step and per training
iteration (``--n-critic`` critic steps + 1 generator step), and the memory used by autograd:
the peak total size of the tensors saved for backward that are alive at once during one
iteration (CPU: counted with ``torch.autograd.graph.saved_tensors_hooks``; that is the
activation memory that double backward inflates, not the process RSS; on CUDA the script also
prints ``torch.cuda.max_memory_allocated``).  It also counts how many of the 8 modes the
generator covers (a mode counts when >= 1% of 2,000 samples lie within 3 std of it), the share of
samples within 3 std of a mode, and the sliced 1-Wasserstein distance between 2,000 generated
and 2,000 real points (about 0.08 between two real samples: the floor).  With ``--out DIR`` it also
writes the report (``wgan_gradnorm.md``: date, command, versions, load, the results) and a scatter
plot per method (needs matplotlib) into DIR; without it nothing is written.

    python examples/wgan_gradnorm.py                 # 9 minutes wall at load average 8 on 2 cores
    python examples/wgan_gradnorm.py --steps 300 --methods gn,gp
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import platform
import sys
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

import tigeropt
from tigeropt.demo import cpu_name, load_average
from tigeropt.gan import GradNormCritic, gradient_penalty

OUT = Path(__file__).resolve().parent / "out"


def eight_gaussians(n: int, *, radius: float = 2.0, std: float = 0.02,
                    generator: torch.Generator | None = None, device: str = "cpu") -> Tensor:
    """n samples of the mixture of 8 Gaussians centred on a circle (Gulrajani et al.'s toy set)."""
    k = torch.randint(0, 8, (n,), generator=generator)
    angle = k.float() * (2 * math.pi / 8)
    centres = radius * torch.stack([angle.cos(), angle.sin()], dim=1)
    return (centres + std * torch.randn(n, 2, generator=generator)).to(device)


def mode_centres(radius: float = 2.0) -> Tensor:
    angle = torch.arange(8).float() * (2 * math.pi / 8)
    return radius * torch.stack([angle.cos(), angle.sin()], dim=1)


def mlp(d_in: int, d_out: int, width: int, depth: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    d = d_in
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    layers.append(nn.Linear(d, d_out))
    return nn.Sequential(*layers)


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:  # noqa: ANN001
    if name == "adax":
        return tigeropt.AdaX(params, lr=lr, betas=(0.5, 1e-4), weight_decay=0.0)
    if name == "lion":
        return tigeropt.Lion(params, lr=lr, betas=(0.5, 0.9))
    if name == "tiger":
        return tigeropt.Tiger(params, lr=lr, beta=0.5, weight_decay=0.0)
    raise SystemExit(f"unknown optimizer {name!r} (adax, lion, tiger)")


class SavedTensorMeter:
    """Peak bytes of tensors saved for backward that are alive at the same time.

    Each saved tensor is wrapped on pack; the wrapper's finalizer runs when autograd frees the
    graph that holds it.  Storages saved several times are counted once.
    """

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0
        self._refs: dict[tuple[int, str], int] = {}

    def _pack(self, t: Tensor) -> object:
        storage = t.untyped_storage()
        key = (storage.data_ptr(), str(t.device))
        box = _Box(t)
        if key[0] != 0:
            if self._refs.get(key, 0) == 0:
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
            self._refs[key] = self._refs.get(key, 0) + 1
            weakref.finalize(box, self._release, key, storage.nbytes())
        return box

    def _release(self, key: tuple[int, str], nbytes: int) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            del self._refs[key]
            self.live -= nbytes

    @staticmethod
    def _unpack(box: object) -> Tensor:
        return box.tensor  # type: ignore[attr-defined]

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)


class _Box:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor


@dataclass
class MethodResult:
    method: str
    ms_critic: float
    ms_generator: float
    ms_iteration: float
    loss: str
    saved_critic_mb: float
    saved_generator_mb: float
    cuda_peak_mb: float | None
    modes: int
    high_quality: float
    sw1: float
    samples: Tensor


def coverage(samples: Tensor, radius: float = 2.0, std: float = 0.02) -> tuple[int, float]:
    """(modes holding >= 1% of the samples within 3 std, fraction of samples within 3 std of a mode)."""
    d = torch.cdist(samples, mode_centres(radius).to(samples.device))
    dist, nearest = d.min(dim=1)
    close = dist < 3 * std
    counts = torch.bincount(nearest[close], minlength=8)
    return int((counts >= 0.01 * samples.shape[0]).sum()), float(close.float().mean())


def sliced_w1(a: Tensor, b: Tensor, projections: int = 256, seed: int = 0) -> float:
    """Sliced 1-Wasserstein distance between two equal-size 2-D samples (mean over random directions).

    A sample-quality number that also sees spread and mode balance: 0 for identical samples; two
    independent real samples of 2,000 points are about 0.08 apart (sampling noise: mode counts vary).
    """
    gen = torch.Generator().manual_seed(seed)
    angle = torch.rand(projections, generator=gen) * math.pi
    dirs = torch.stack([angle.cos(), angle.sin()], dim=1)
    pa, _ = (a @ dirs.T).sort(dim=0)
    pb, _ = (b @ dirs.T).sort(dim=0)
    return float((pa - pb).abs().mean())


def run(method: str, args: argparse.Namespace) -> MethodResult:
    torch.manual_seed(args.seed)
    gen_data = torch.Generator().manual_seed(args.seed)
    gen_eval = torch.Generator().manual_seed(args.seed + 1)
    dev = args.device
    G = mlp(args.z_dim, 2, args.width, args.depth).to(dev)
    D = mlp(2, 1, args.width, args.depth).to(dev)
    critic: nn.Module = GradNormCritic(D, method) if method in ("gn", "gran") else D
    opt_g = make_optimizer(args.optimizer, G.parameters(), args.lr)
    opt_d = make_optimizer(args.optimizer, D.parameters(), args.lr)
    # lr decays linearly to 0 (wgan_toy.py trains 100k iterations at a fixed lr; in a short run the decay
    # lets the modes sharpen at the end instead of oscillating around them)
    decay = (lambda it: 1.0 - it / args.steps) if args.lr_decay else (lambda it: 1.0)
    sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, decay)
    sched_d = torch.optim.lr_scheduler.LambdaLR(opt_d, decay)
    bs = args.batch_size
    loss_kind = args.loss if args.loss != "auto" else ("wgan" if method in ("gp", "gn") else "hinge")

    def critic_step(meter: SavedTensorMeter | None = None) -> None:
        real = eight_gaussians(bs, generator=gen_data, device=dev)
        with torch.no_grad():
            fake = G(torch.randn(bs, args.z_dim, device=dev))
        opt_d.zero_grad(set_to_none=True)
        ctx = meter.hooks() if meter else _null()
        with ctx:
            if loss_kind == "hinge":
                loss = torch.relu(1 - critic(real)).mean() + torch.relu(1 + critic(fake)).mean()
            else:
                loss = critic(fake).mean() - critic(real).mean()
            if method == "gp":
                loss = loss + gradient_penalty(D, real, fake, args.gp_weight)
            loss.backward()
        opt_d.step()

    def generator_step(meter: SavedTensorMeter | None = None) -> None:
        opt_g.zero_grad(set_to_none=True)
        ctx = meter.hooks() if meter else _null()
        with ctx:
            loss = -critic(G(torch.randn(bs, args.z_dim, device=dev))).mean()
            loss.backward()
        opt_d.zero_grad(set_to_none=True)  # the generator step also filled D's grads
        opt_g.step()

    sync: Callable[[], None] = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)
    clock = time.thread_time if args.thread_time else time.perf_counter
    t_critic = t_gen = 0.0
    timed = 0
    warmup = min(20, args.steps // 5)
    for it in range(args.steps):
        sync()
        t0 = clock()
        for _ in range(args.n_critic):
            critic_step()
        sync()
        t1 = clock()
        generator_step()
        sync()
        t2 = clock()
        sched_g.step()
        sched_d.step()
        if it >= warmup:
            t_critic += t1 - t0
            t_gen += t2 - t1
            timed += 1
        if args.log_every and (it + 1) % args.log_every == 0:
            with torch.no_grad():  # own generator: logging must not change the training noise
                z = torch.randn(2000, args.z_dim, generator=gen_eval).to(dev)
                m, hq = coverage(G(z).cpu())
            print(f"  [{method}] iteration {it + 1}: modes {m}/8, {100 * hq:.0f}% of samples near a mode")

    # Memory: one more iteration under the saved-tensor meter (and the CUDA peak counter).
    meter_d, meter_g = SavedTensorMeter(), SavedTensorMeter()
    cuda_peak = None
    if dev.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    critic_step(meter_d)
    generator_step(meter_g)
    if dev.startswith("cuda"):
        cuda_peak = (torch.cuda.max_memory_allocated() - base) / 2**20

    with torch.no_grad():
        samples = G(torch.randn(2000, args.z_dim, generator=gen_eval).to(dev)).cpu()
    modes, hq = coverage(samples)
    sw1 = sliced_w1(samples, eight_gaussians(samples.shape[0], generator=torch.Generator().manual_seed(7)))
    timed = max(timed, 1)
    return MethodResult(method, 1e3 * t_critic / (timed * args.n_critic), 1e3 * t_gen / timed,
                        1e3 * (t_critic + t_gen) / timed, loss_kind, meter_d.peak / 2**20,
                        meter_g.peak / 2**20, cuda_peak, modes, hq, sw1, samples)


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def save_plot(results: Sequence[MethodResult], out: Path, steps: int) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no PNG written (`pip install matplotlib` for the plots)"
    out.mkdir(parents=True, exist_ok=True)
    real = eight_gaussians(2000, generator=torch.Generator().manual_seed(123))
    written = []
    for r in results:
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.scatter(real[:, 0], real[:, 1], s=2, alpha=0.3, label="real")
        ax.scatter(r.samples[:, 0], r.samples[:, 1], s=2, alpha=0.5, label="generated")
        ax.set_xlim(-3, 3)
        ax.set_ylim(-3, 3)
        ax.set_aspect("equal")
        ax.set_xlabel("x1")
        ax.set_ylabel("x2")
        ax.set_title(f"{r.method}: {steps} iterations, {r.modes}/8 modes, SW1 {r.sw1:.3f}", fontsize=10)
        ax.legend(loc="upper right", markerscale=4)
        fig.tight_layout()
        path = out / f"wgan_{r.method}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(str(path))
    return "wrote " + ", ".join(written)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--steps", type=int, default=1000, help="training iterations (generator steps)")
    ap.add_argument("--n-critic", type=int, default=5, help="critic steps per generator step")
    ap.add_argument("--methods", default="gn,gran,gp")
    ap.add_argument("--optimizer", default="adax", choices=["adax", "lion", "tiger"])
    ap.add_argument("--lr", type=float, default=1e-3, help="learning rate of G and D (peak, see --lr-decay)")
    ap.add_argument("--lr-decay", action=argparse.BooleanOptionalAction, default=True,
                    help="decay the lr linearly to 0 over the run")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--z-dim", type=int, default=2)
    ap.add_argument("--gp-weight", type=float, default=0.1,
                    help="lambda of the gradient penalty (0.1: wgan_toy.py's value for toy sets; 10: images)")
    ap.add_argument("--loss", default="auto", choices=["auto", "wgan", "hinge"],
                    help="critic loss; auto = Wasserstein for gp and gn, hinge for gran (see docstring)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch.set_num_threads; tiny MLPs run fastest on one thread (0 = leave as is)")
    ap.add_argument("--log-every", type=int, default=0)
    ap.add_argument("--thread-time", action="store_true",
                    help="CPU with --threads 1: time steps by the thread's CPU time (time.thread_time), "
                         "which other processes on the cores do not inflate, instead of wall time")
    ap.add_argument("--out", type=Path, default=None, metavar="DIR",
                    help="write the report (wgan_gradnorm.md: date, command, versions, the printed "
                         "results) and, with matplotlib, a scatter plot per method into DIR, e.g. "
                         f"{OUT} (default: print only, write nothing)")
    args = ap.parse_args(argv)
    if args.thread_time and (args.device != "cpu" or args.threads != 1):
        ap.error("--thread-time needs --device cpu and --threads 1 (it misses other threads' work)")
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in ("gn", "gran", "gp"):
            raise SystemExit(f"unknown method {m!r} (gn, gran, gp)")

    report: list[str] = []

    def say(line: str) -> None:
        print(line, flush=True)
        report.append(line)

    load_start, wall_start = load_average(), time.perf_counter()
    results = []
    for m in methods:
        t0 = time.perf_counter()
        r = run(m, args)
        results.append(r)
        say(f"- {m} ({r.loss} loss): {time.perf_counter() - t0:.1f}s total; "
            f"{r.ms_critic:.2f} ms/critic step, {r.ms_generator:.2f} ms/generator step, "
            f"{r.ms_iteration:.2f} ms/iteration; "
            f"peak saved-for-backward {r.saved_critic_mb:.2f} MiB (critic step), "
            f"{r.saved_generator_mb:.2f} MiB (generator step)"
            + (f", CUDA peak {r.cuda_peak_mb:.1f} MiB" if r.cuda_peak_mb is not None else "")
            + f"; modes {r.modes}/8, {100 * r.high_quality:.0f}% of samples within 3 std of a mode, "
            f"sliced W1 to the data {r.sw1:.3f}")
    floor = sliced_w1(eight_gaussians(2000, generator=torch.Generator().manual_seed(8)),
                      eight_gaussians(2000, generator=torch.Generator().manual_seed(7)))
    say("\n| method | critic loss | modes covered | samples within 3 std of a mode | sliced W1 to data "
        "| ms / iteration |\n|---|---|---:|---:|---:|---:|")
    for r in results:
        say(f"| {r.method} | {r.loss} | {r.modes}/8 | {100 * r.high_quality:.0f}% | {r.sw1:.3f} "
            f"| {r.ms_iteration:.1f} |")
    say(f"\n(sliced W1 between two real samples of the same size: {floor:.3f}; lower is better)\n")
    if len(results) > 1 and any(r.method == "gp" for r in results):
        gp = next(r for r in results if r.method == "gp")
        for r in results:
            if r is not gp:
                say(f"- {r.method} vs gp: {r.ms_iteration / gp.ms_iteration:.2f}x time per iteration, "
                    f"{r.ms_generator / gp.ms_generator:.2f}x per generator step, "
                    f"saved-tensor peak {r.saved_critic_mb / gp.saved_critic_mb:.2f}x (critic step), "
                    f"{r.saved_generator_mb / gp.saved_generator_mb:.2f}x (generator step)")
    if args.out is not None:
        print(save_plot(results, args.out, args.steps))
        command = " ".join(sys.argv[1:] if argv is None else argv)
        clock = ("time.thread_time (CPU time of the thread)" if args.thread_time
                 else "wall time (time.perf_counter)")
        header = [f"# WGAN critics on 8 Gaussians: GN, GraN, WGAN-GP ({dt.date.today().isoformat()})", "",
                  f"- command: `{f'python examples/{Path(__file__).name} {command}'.strip()}`",
                  f"- versions: python {platform.python_version()}, torch {torch.__version__}, "
                  f"tigeropt {tigeropt.__version__}",
                  f"- device: {args.device} ({cpu_name()}), {torch.get_num_threads()} torch thread(s); "
                  f"load average {load_start} at start, {load_average()} at end; times: {clock}; "
                  f"the run took {time.perf_counter() - wall_start:.0f} s wall", ""]
        path = args.out / "wgan_gradnorm.md"
        path.write_text("\n".join(header + report) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
