"""sCD on a 2-D two-component Gaussian mixture with its exact teacher: which weighting learns.

A 3-layer MLP behind ``TrigFlowPrecond`` trains with ``ContinuousConsistencyDistillation`` and the
exact ``cm.oracle`` teacher (batch 256, Adam); every 500 steps it prints the one-step RMSE against
the exact PF-ODE endpoints from sigma = 80 and from sigma = 1 (1000 points each, a 256/128-step
Heun solve of the oracle). A diagnostic for the weighting options (seconds per run on a CPU):

    python scripts/scd_toy.py --adaptive_weighting true --prior_weighting true
    python scripts/scd_toy.py --adaptive_weighting false --prior_weighting true
"""

import argparse

import torch
from torch import nn

from cm.objectives import ContinuousConsistencyDistillation
from cm.oracle import GaussianMixture
from cm.precond import TrigFlowPrecond
from cm.schedules import karras_sigmas
from cm.solvers import heun


class MLP(nn.Module):
    """``F(x, c_noise)`` for ``[N, 1, 1, 2]`` points: a sinusoidal embedding and 3 layers."""

    def __init__(self, hidden: int = 128) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.arange(8).float())
        self.emb = nn.Linear(16, hidden)
        self.f = nn.Sequential(
            nn.Linear(2 + hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, 2),
        )  # fmt: skip

    def forward(self, x, c_noise, labels=None):
        """``F`` of the points ``x`` at ``c_noise`` (labels unused)."""
        c = c_noise.float().view(-1, 1) * self.freqs
        e = self.emb(torch.cat([c.cos(), c.sin()], 1))
        return self.f(torch.cat([x.flatten(1).float(), e], 1)).view(x.shape)


def rmse(model: nn.Module, teacher: GaussianMixture, sigma: float) -> float:
    """Mean per-point RMSE of ``f(x, sigma)`` to the exact ODE endpoint, 1000 fixed points."""
    g = torch.Generator().manual_seed(1)
    y = teacher.sample(1000, g)[0]
    x = y + sigma * torch.randn(y.shape, generator=g, dtype=torch.float64)
    with torch.no_grad():
        exact = heun(teacher, x, karras_sigmas(256, sigma_max=sigma))
        f = model(x.float(), torch.full((1000,), sigma)).double()
    return (f - exact).pow(2).flatten(1).mean(1).sqrt().mean().item()


def main(argv: list[str] | None = None) -> None:
    """Train and print the RMSE every 500 steps."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--tangent_warmup_steps", type=int, default=300)
    for flag in ("adaptive_weighting", "prior_weighting"):
        parser.add_argument(f"--{flag}", type=lambda s: s.lower() == "true", default=True)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    means = torch.tensor([[[[-0.6, 0.3]]], [[[0.5, -0.4]]]], dtype=torch.float64)
    teacher = GaussianMixture(means, torch.tensor([0.1, 0.1], dtype=torch.float64))
    model = TrigFlowPrecond(MLP())
    objective = ContinuousConsistencyDistillation(
        teacher,
        init_from_teacher=False,
        tangent_warmup_steps=args.tangent_warmup_steps,
        adaptive_weighting=args.adaptive_weighting,
        prior_weighting=args.prior_weighting,
    )
    params = [*model.parameters(), *objective.trainable_parameters()]
    optimizer = torch.optim.Adam(params, lr=args.lr)
    for step in range(args.steps + 1):
        loss = objective(model, teacher.sample(256)[0].float(), None, step, args.steps).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 500 == 0:
            print(
                f"step {step}: loss {loss.item():.3f}, one-step RMSE from sigma 80 "
                f"{rmse(model, teacher, 80.0):.4f}, from sigma 1 {rmse(model, teacher, 1.0):.4f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
