"""Tests for tigeropt.gan: gradient-normalized critics (GN, GraN) and the WGAN-GP penalty."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from tigeropt.gan import GradNormCritic, gradient_penalty, input_grad_norm

DT = torch.float64


class HalfSquare(nn.Module):
    """D(x) = 0.5 * ||x||^2 per sample, so grad_x D = x and ||grad|| = ||x||."""

    def __init__(self, keepdim: bool = False) -> None:
        super().__init__()
        self.keepdim = keepdim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x.flatten(1).square().sum(dim=1, keepdim=self.keepdim)


def relu_mlp(d_in: int = 3, width: int = 32, seed: int = 0, act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, width), act(), nn.Linear(width, width), act(),
                         nn.Linear(width, 1)).to(DT)


# --- golden values (SPEC.md) -------------------------------------------------------------------

@pytest.mark.parametrize("keepdim", [False, True])
def test_golden_values_and_output_shape(keepdim: bool) -> None:
    x = torch.tensor([[3.0, 4.0]], dtype=DT)
    gn = GradNormCritic(HalfSquare(keepdim), "gn")(x)
    gran = GradNormCritic(HalfSquare(keepdim), "gran", eps=0.0)(x)
    assert gn.shape == gran.shape == ((1, 1) if keepdim else (1,))
    # D = 12.5, ||grad|| = 5: GN = 12.5 / (5 + 12.5); GraN = 12.5 * 5 / 25.
    assert gn.item() == pytest.approx(12.5 / 17.5, abs=1e-12)
    assert gran.item() == pytest.approx(2.5, abs=1e-12)


def test_eps_enters_the_denominators() -> None:
    x = torch.tensor([[3.0, 4.0], [0.0, 2.0]], dtype=DT)
    d = torch.tensor([12.5, 2.0], dtype=DT)
    n = torch.tensor([5.0, 2.0], dtype=DT)
    gran = GradNormCritic(HalfSquare(), "gran", eps=0.5, lipschitz=2.0)(x)
    gn = GradNormCritic(HalfSquare(), "gn", eps=0.5)(x)
    torch.testing.assert_close(gran, 2.0 * d * n / (n**2 + 0.5))
    torch.testing.assert_close(gn, d / (n + d.abs() + 0.5))


def test_default_eps() -> None:
    assert GradNormCritic(HalfSquare(), "gn").eps == 0.0
    assert GradNormCritic(HalfSquare(), "gran").eps == 1e-4


def test_gradient_norm_is_over_all_non_batch_dims() -> None:
    x = torch.randn(4, 2, 3, 5, dtype=DT)
    d = 0.5 * x.flatten(1).square().sum(1)
    n = x.flatten(1).norm(dim=1)
    torch.testing.assert_close(input_grad_norm(HalfSquare(), x), n)
    torch.testing.assert_close(GradNormCritic(HalfSquare())(x), d / (n + d))


def test_linear_critic_matches_closed_form() -> None:
    torch.manual_seed(1)
    lin = nn.Linear(6, 1).to(DT)
    x = torch.randn(16, 6, dtype=DT)
    d = (x @ lin.weight[0] + lin.bias).detach()
    w = lin.weight.detach().norm()
    torch.testing.assert_close(GradNormCritic(lin, "gn")(x)[:, 0].detach(), d / (w + d.abs()))
    torch.testing.assert_close(GradNormCritic(lin, "gran", eps=1e-3)(x)[:, 0].detach(), d * w / (w**2 + 1e-3))


# --- the Lipschitz bound on a ReLU critic ------------------------------------------------------

@pytest.mark.parametrize("variant", ["gn", "gran"])
def test_relu_critic_input_gradient_at_most_one(variant: str) -> None:
    critic = GradNormCritic(relu_mlp(seed=3), variant, eps=None if variant == "gn" else 1e-8)
    x = (3.0 * torch.randn(512, 3, dtype=DT)).requires_grad_(True)
    dhat = critic(x)[:, 0]
    (g,) = torch.autograd.grad(dhat.sum(), x)
    norms = g.norm(dim=1)
    assert torch.isfinite(norms).all()
    assert norms.max() <= 1.0 + 1e-9
    if variant == "gran":
        # Locally linear D: ||grad Dhat|| = n^2 / (n^2 + eps), i.e. 1 up to eps/n^2 almost everywhere.
        assert norms.min() > 0.99
    else:
        # GN: ||grad Dhat|| = n^2 / (n + |D|)^2, well inside (0, 1] but not identically small.
        assert norms.max() > 0.05
        assert (dhat.abs() <= 1.0).all()


def test_gn_bounded_by_one_for_large_outputs() -> None:
    critic = GradNormCritic(relu_mlp(seed=4), "gn")
    with torch.no_grad():
        critic.critic[-1].bias.fill_(1e6)
    dhat = critic(torch.randn(64, 3, dtype=DT))
    assert (dhat.abs() <= 1.0).all() and dhat.min() > 0.99


# --- training: gradients reach the critic and the generator ------------------------------------

@pytest.mark.parametrize("variant", ["gn", "gran"])
def test_gradients_reach_generator_and_critic(variant: str) -> None:
    torch.manual_seed(5)
    gen = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 3)).to(DT)
    critic = GradNormCritic(relu_mlp(seed=6), variant)
    z = torch.randn(32, 2, dtype=DT)
    real = torch.randn(32, 3, dtype=DT)

    # Generator step: x = G(z) requires grad; gradients must flow through x into G.
    (-critic(gen(z)).mean()).backward()
    for p in gen.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0

    # Critic step on detached fakes: only the critic gets gradients, the input is not modified.
    gen.zero_grad()
    critic.zero_grad()
    fake = gen(z).detach()
    (critic(fake).mean() - critic(real).mean()).backward()
    assert not fake.requires_grad and not real.requires_grad
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in gen.parameters())
    for p in critic.critic.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()
    assert critic.critic[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("variant", ["gn", "gran"])
def test_generator_gradient_includes_the_norm_term(variant: str) -> None:
    # A smooth critic makes n(x) depend on x, so ignoring the create_graph path would give a
    # wrong generator gradient; gradcheck compares against finite differences.
    critic = GradNormCritic(relu_mlp(d_in=3, width=8, seed=7, act=nn.Softplus), variant, eps=0.1)
    z = torch.randn(5, 2, dtype=DT)

    def dhat_of_generator_weight(w: torch.Tensor) -> torch.Tensor:
        return critic(torch.tanh(z @ w.T)).sum()

    w0 = torch.randn(3, 2, dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(dhat_of_generator_weight, (w0,))


@pytest.mark.parametrize("variant", ["gn", "gran"])
def test_critic_parameter_gradient_is_exact(variant: str) -> None:
    net = relu_mlp(d_in=3, width=8, seed=8, act=nn.Softplus)
    critic = GradNormCritic(net, variant, eps=0.1)
    x = torch.randn(6, 3, dtype=DT)
    params = {k: v.detach() for k, v in net.named_parameters()}

    def dhat_of_first_weight(w: torch.Tensor) -> torch.Tensor:
        wrapped = GradNormCritic(_Functional(net, {**params, "0.weight": w}), variant, eps=0.1)
        return wrapped(x).sum()

    w0 = params["0.weight"].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(dhat_of_first_weight, (w0,))
    # The module path gives the same gradient as the functional one.
    net.zero_grad()
    critic(x).sum().backward()
    (ref,) = torch.autograd.grad(dhat_of_first_weight(w0), w0)
    torch.testing.assert_close(net[0].weight.grad, ref)


class _Functional(nn.Module):
    def __init__(self, net: nn.Module, params: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.net, self.params = net, params

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.net, self.params, (x,))


def test_no_grad_returns_detached_correct_values() -> None:
    x = torch.tensor([[3.0, 4.0]], dtype=DT)
    with torch.no_grad():
        out = GradNormCritic(HalfSquare(), "gn")(x)
    assert not out.requires_grad
    assert out.item() == pytest.approx(12.5 / 17.5)


def test_flat_relu_critic_gives_finite_gradients() -> None:
    # All-dead ReLU: D is constant (= bias), grad_x D = 0; second-order terms must stay finite.
    net = relu_mlp(seed=9)
    with torch.no_grad():
        net[0].bias.fill_(-1e3)
    x = torch.randn(8, 3, dtype=DT)
    out = GradNormCritic(net, "gran")(x)
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    assert torch.isfinite(out).all() and out.abs().max() < 1e-100  # D * n / (n^2 + eps) with n ~ 0


# --- gradient penalty --------------------------------------------------------------------------

def test_gradient_penalty_linear_critic_closed_form() -> None:
    torch.manual_seed(10)
    lin = nn.Linear(4, 1).to(DT)
    real, fake = torch.randn(8, 4, dtype=DT), torch.randn(8, 4, dtype=DT)
    gp = gradient_penalty(lin, real, fake)
    w = lin.weight.detach()
    wn = w.norm()
    assert gp.item() == pytest.approx(10.0 * (wn.item() - 1.0) ** 2, rel=1e-12)
    gp.backward()
    torch.testing.assert_close(lin.weight.grad, 20.0 * (wn - 1.0) * w / wn)  # d/dw of 10 (||w|| - 1)^2
    assert lin.bias.grad is None or lin.bias.grad.abs().max() == 0


def test_gradient_penalty_interpolates_per_sample() -> None:
    real = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=DT)
    fake = torch.tensor([[0.0, 0.0], [6.0, 8.0]], dtype=DT)
    alpha = torch.tensor([1.0, 0.25], dtype=DT)
    # x_hat = [3, 4] and [4.5, 6]; for D = 0.5||x||^2, ||grad|| = ||x_hat|| = 5 and 7.5.
    gp = gradient_penalty(HalfSquare(), real, fake, weight=2.0, alpha=alpha)
    assert gp.item() == pytest.approx(2.0 * ((5 - 1) ** 2 + (7.5 - 1) ** 2) / 2)
    assert not math.isnan(gp.item())


def test_gradient_penalty_does_not_train_the_generator() -> None:
    gen = nn.Linear(2, 3).to(DT)
    fake = gen(torch.randn(4, 2, dtype=DT))
    gradient_penalty(relu_mlp(), torch.randn(4, 3, dtype=DT), fake).backward()
    assert gen.weight.grad is None


# --- errors ------------------------------------------------------------------------------------

class _Out(nn.Module):
    def __init__(self, fn) -> None:  # noqa: ANN001
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


@pytest.mark.parametrize("fn, match", [
    (lambda x: x.sum(1, keepdim=True).repeat(1, 2), r"critic output shape: \(4, 2\)"),
    (lambda x: x.sum(1).reshape(4, 1, 1), r"critic output shape: \(4, 1, 1\)"),
    (lambda x: x[:3].sum(1), "batch size 3 does not match the input's batch size 4"),
    (lambda x: x.sum(), r"critic output shape: \(\)"),
])
def test_bad_critic_output_shapes(fn, match: str) -> None:  # noqa: ANN001
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match=match):
        GradNormCritic(_Out(fn))(x)
    with pytest.raises(ValueError, match=match):
        gradient_penalty(_Out(fn), x, x)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="Invalid variant: 'sn'"):
        GradNormCritic(HalfSquare(), "sn")
    with pytest.raises(ValueError, match="Invalid eps: -0.1"):
        GradNormCritic(HalfSquare(), "gran", eps=-0.1)
    with pytest.raises(ValueError, match="Invalid lipschitz: 0"):
        GradNormCritic(HalfSquare(), "gran", lipschitz=0)
    with pytest.raises(TypeError, match="critic"):
        GradNormCritic(lambda x: x)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Invalid x shape"):
        GradNormCritic(HalfSquare())(torch.tensor(1.0))
    with pytest.raises(ValueError, match="Invalid x dtype"):
        GradNormCritic(HalfSquare())(torch.ones(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="Invalid fake shape"):
        gradient_penalty(HalfSquare(), torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="Invalid alpha shape"):
        gradient_penalty(HalfSquare(), torch.randn(4, 3), torch.randn(4, 3), alpha=torch.rand(4, 1))
