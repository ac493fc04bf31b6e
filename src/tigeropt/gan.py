"""Gradient-normalized WGAN critics (seed 001) and the WGAN-GP penalty, for comparison.

A WGAN critic D must be 1-Lipschitz; ``||grad_x D(x)|| <= 1`` everywhere is sufficient.  Gradient
normalization rescales D by its own input-gradient norm so that a piecewise-linear critic (ReLU,
LeakyReLU) satisfies the bound by construction.  With ``n(x) = ||grad_x D(x)||`` (L2 norm per
sample, over all non-batch dimensions):

    GN   (Wu et al., "Gradient Normalization for Generative Adversarial Networks", ICCV 2021):
         Dhat(x) = D(x) / (n(x) + |D(x)|)                      in [-1, 1]
    GraN (Bhaskara et al., "GraN-GAN: Piecewise Gradient Normalization for Generative
         Adversarial Networks", WACV 2022):
         Dhat(x) = K * D(x) * n(x) / (n(x)^2 + eps)

Where D is locally linear (``D = <w, x> + b``, ``n = ||w||``) the input gradients are
``||grad Dhat|| = n^2 / (n + |D|)^2 <= 1`` (GN) and ``K * n^2 / (n^2 + eps) <= K`` (GraN).

Notes on the papers' forms:

* GN has no epsilon (the official GN-GAN code divides by ``n + |D|`` as written), so ``eps``
  defaults to 0 for ``"gn"``; a positive ``eps`` is added to that denominator if given.
* GraN's ``eps`` is a small positive constant and ``K`` its Lipschitz constant (the paper tunes
  K, the "often untuned Lipschitz constant"; K = 1 is plain 1-Lipschitz).  The default
  ``eps = 1e-4`` here is this library's choice, not a value checked against the paper.
  ``eps = 0`` is allowed (the exact ``D / n``, golden value 2.5 in SPEC.md) but divides by
  zero where D is flat.

Training (seed 001): the normalized critic needs second-order gradients in *both* steps - the
critic step differentiates ``n(x)`` with respect to D's parameters, and the generator step
differentiates ``Dhat(G(z))`` through ``n`` with respect to x and hence G.  The gradient is
therefore taken with ``create_graph=True`` whenever autograd is recording, which makes GN/GraN
slower and heavier than WGAN-GP (which needs double backward in the critic step only).

Samples must be independent inside the critic (no batch statistics such as BatchNorm in
training mode): the per-sample gradients are read from the gradient of ``sum_b D(x_b)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._validate import check_choice, check_number

__all__ = ["GradNormCritic", "gradient_penalty", "input_grad_norm"]

_VARIANTS = ("gn", "gran")


def _check_output(out: Tensor, batch: int, what: str = "critic output") -> Tensor:
    """Return the critic output as shape (B,), or raise ValueError for anything but (B,) / (B, 1)."""
    if not isinstance(out, Tensor):
        raise ValueError(f"Invalid {what}: expected a Tensor, got {type(out).__name__}")
    if out.dim() == 2 and out.shape[1] == 1:
        flat = out[:, 0]
    elif out.dim() == 1:
        flat = out
    else:
        raise ValueError(f"Invalid {what} shape: {tuple(out.shape)} (expected (B,) or (B, 1), B = {batch})")
    if flat.shape[0] != batch:
        raise ValueError(f"Invalid {what} shape: {tuple(out.shape)} (batch size {flat.shape[0]} does not "
                         f"match the input's batch size {batch})")
    return flat


def _check_input(x: Tensor, name: str = "x") -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"Invalid {name}: expected a Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"Invalid {name} shape: {tuple(x.shape)} (need a non-empty batch dimension first)")
    if not x.is_floating_point():
        raise ValueError(f"Invalid {name} dtype: {x.dtype} (need a floating-point tensor)")


def _safe_norm(g: Tensor) -> Tensor:
    """Per-sample L2 norm over all non-batch dims, with a finite second derivative at g = 0.

    ``torch.linalg.vector_norm`` has a NaN double-backward at exactly zero (a ReLU critic can be
    flat); ``sqrt(max(sum g^2, tiny))`` equals the norm wherever it is >= ~1e-19 (float32) and has
    zero gradient below.
    """
    sq = g.reshape(g.shape[0], -1).square().sum(dim=1)
    return sq.clamp_min(torch.finfo(sq.dtype).tiny).sqrt()


def _critic_and_grad(critic: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Run D on x and return (D(x) as given, D(x) as (B,), grad_x D(x)), keeping the graph if recording.

    If x already requires grad (e.g. ``x = G(z)`` in the generator step) the gradient is taken
    with respect to x itself, so the result stays connected to G through x.  Otherwise (real data,
    detached fakes) a detached leaf copy is made; the caller's tensor is never modified.
    """
    if torch.is_inference_mode_enabled():
        # torch.inference_mode() (e.g. a validation loop) disables autograd altogether: take the input
        # gradient outside it, on a normal copy of x (an inference tensor cannot enter autograd)
        with torch.inference_mode(False):
            return _critic_and_grad(critic, x.clone())
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        xi = x if x.requires_grad else x.detach().requires_grad_(True)
        out = critic(xi)
        flat = _check_output(out, x.shape[0])
        (grad,) = torch.autograd.grad(flat.sum(), xi, create_graph=create_graph, allow_unused=True)
    if grad is None:  # D does not depend on x at all
        grad = torch.zeros_like(xi)
    if not create_graph:
        out, flat, grad = out.detach(), flat.detach(), grad.detach()
    return out, flat, grad


def input_grad_norm(critic: nn.Module, x: Tensor) -> Tensor:
    """``||grad_x D(x)||`` per sample (shape (B,)), graph kept when autograd is recording."""
    _check_input(x)
    _, _, grad = _critic_and_grad(critic, x)
    return _safe_norm(grad)


class GradNormCritic(nn.Module):
    """Wrap a critic D into its gradient-normalized form Dhat (see the module docstring).

    Args:
        critic: the critic D, mapping a batch (B, ...) to scores of shape (B,) or (B, 1).
        variant: ``"gn"`` (ICCV 2021, ``D / (n + |D| + eps)``) or ``"gran"`` (WACV 2022,
            ``K * D * n / (n^2 + eps)``).
        eps: ``None`` picks the default: 0.0 for ``"gn"`` (the paper has none) and 1e-4 for
            ``"gran"``.  Must be >= 0.
        lipschitz: GraN's constant K (default 1.0); only used by ``"gran"``.

    ``forward(x)`` returns Dhat(x) with the critic's own output shape.  It works whether or not x
    requires grad: with ``x = G(z)`` the generator receives gradients through Dhat, including
    through ``n(x)``; with real data or ``fake.detach()`` an internal leaf copy is used.  Under
    ``torch.no_grad()`` and ``torch.inference_mode()`` it still computes n(x) (autograd is enabled
    internally) and returns a detached result.
    """

    def __init__(self, critic: nn.Module, variant: str = "gn", eps: float | None = None, *,
                 lipschitz: float = 1.0) -> None:
        super().__init__()
        if not isinstance(critic, nn.Module):
            raise TypeError(f"Invalid type for critic: expected an nn.Module, got {type(critic).__name__}")
        check_choice("variant", variant, _VARIANTS)
        if eps is None:
            eps = 0.0 if variant == "gn" else 1e-4
        check_number("eps", eps, 0.0)
        check_number("lipschitz", lipschitz, 0.0, lo_open=True)
        self.critic = critic
        self.variant = variant
        self.eps = float(eps)
        self.lipschitz = float(lipschitz)

    def extra_repr(self) -> str:
        extra = f", lipschitz={self.lipschitz}" if self.variant == "gran" else ""
        return f"variant={self.variant!r}, eps={self.eps}{extra}"

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x)
        out, d, grad = _critic_and_grad(self.critic, x)
        n = _safe_norm(grad).to(d.dtype)
        if self.variant == "gn":
            dhat = d / (n + d.abs() + self.eps)
        else:
            dhat = self.lipschitz * d * n / (n.square() + self.eps)
        return dhat.reshape(out.shape)


def gradient_penalty(critic: nn.Module, real: Tensor, fake: Tensor, weight: float = 10.0, *,
                     target: float = 1.0, alpha: Tensor | None = None,
                     generator: torch.Generator | None = None) -> Tensor:
    """WGAN-GP penalty (Gulrajani et al., "Improved Training of Wasserstein GANs", 2017).

        x_hat = alpha * real + (1 - alpha) * fake,     alpha ~ U[0, 1] per sample
        GP    = weight * mean_b (||grad_x D(x_hat_b)|| - target)^2

    ``weight`` is the paper's lambda (default 10) and is applied here: add the returned scalar
    to the critic loss as is.  ``real`` and ``fake`` are detached (the penalty trains the critic
    only); the graph to D's parameters is kept (double backward).  ``alpha`` may be given
    (shape (B,), values in [0, 1]) for reproducible tests; otherwise it is drawn with
    ``generator``.
    """
    _check_input(real, "real")
    _check_input(fake, "fake")
    if real.shape != fake.shape:
        raise ValueError(f"Invalid fake shape: {tuple(fake.shape)} (must match real's {tuple(real.shape)})")
    check_number("weight", weight, 0.0)
    check_number("target", target, 0.0)
    batch = real.shape[0]
    if alpha is None:
        alpha = torch.rand(batch, generator=generator, dtype=real.dtype, device=real.device)
    elif alpha.shape != (batch,):
        raise ValueError(f"Invalid alpha shape: {tuple(alpha.shape)} (expected ({batch},))")
    a = alpha.to(real.dtype).reshape((batch,) + (1,) * (real.dim() - 1))
    x_hat = (a * real.detach() + (1 - a) * fake.detach()).requires_grad_(True)
    _, _, grad = _critic_and_grad(critic, x_hat)
    n = _safe_norm(grad)
    return weight * (n - target).square().mean()
