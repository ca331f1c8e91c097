"""Objectives: iCT/CT losses, distances, target network, dropout sharing, LPIPS weights."""

import math
from pathlib import Path

import pytest
import torch
from helpers import register_weights

from cm.objectives import (
    L1,
    LPIPS,
    ConsistencyTraining,
    DenoisingScoreMatching,
    PseudoHuber,
    SquaredL2,
)
from cm.oracle import GaussianMixture
from cm.precond import ConsistencyPrecond


class DropoutNet(torch.nn.Module):
    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)
        self.drop = torch.nn.Dropout(p)

    def forward(self, x, c_noise, labels=None):
        return self.drop(self.conv(x))


def test_pseudo_huber_reference():
    assert PseudoHuber().scale(torch.zeros(1, 3, 32, 32)) == pytest.approx(0.0299, abs=1e-4)
    x, y = torch.zeros(2, 3, 32, 32), torch.ones(2, 3, 32, 32)
    c = 0.00054 * math.sqrt(3072)
    assert PseudoHuber()(x, y).tolist() == pytest.approx([math.sqrt(3072 + c**2) - c] * 2)
    assert SquaredL2()(x, y).tolist() == [1.0, 1.0] and L1()(x, 2 * y).tolist() == [2.0, 2.0]


def test_ict_loss_zero_for_exact_consistency_function():
    # An identity "denoiser" is trivially consistent only at the boundary; the exact mixture
    # denoiser is not a consistency function, so its loss is positive. A constant map is.
    const = lambda x, sigma, labels=None: torch.zeros_like(x)  # noqa: E731
    obj = ConsistencyTraining()
    x0 = torch.randn(16, 1, 8, 8)
    assert torch.all(obj(const, x0, None, 0, 1000) == 0)
    gm = GaussianMixture.random(2, (1, 8, 8))
    loss = obj(gm, x0, None, 0, 1000)
    assert loss.shape == (16,) and torch.all(loss > 0)
    assert obj.metrics()["num_scales"] == 11.0


def test_ct_target_network_and_ema():
    torch.manual_seed(0)
    D = ConsistencyPrecond(DropoutNet(0.0))
    obj = ConsistencyTraining(
        SquaredL2(),
        curriculum="ct",
        s0=2,
        s1=150,
        mu0=0.9,
        weighting="uniform",
        index_sampling="uniform",
    )
    obj.bind(D)
    assert obj.target is not None and not any(p.requires_grad for p in obj.target.parameters())
    with torch.no_grad():
        for p in D.parameters():
            p.add_(1.0)
    before = [p.clone() for p in obj.target.parameters()]
    obj.after_optimizer_step(D, 0, 100)
    mu = obj.ema_decay(0, 100)
    assert mu == pytest.approx(0.9)  # N(0) = 2 = s0, so mu = mu0
    for b, t, p in zip(before, obj.target.parameters(), D.parameters(), strict=True):
        assert torch.allclose(t, mu * b + (1 - mu) * p)


def test_dropout_mask_shared_between_online_and_target():
    torch.manual_seed(0)
    D = ConsistencyPrecond(DropoutNet(0.5)).train()
    obj = ConsistencyTraining(SquaredL2(), s0=10, s1=10)
    seen = []
    original = D.net.drop.forward
    D.net.drop.forward = lambda h: seen.append(original(torch.ones_like(h))) or seen[-1] * h
    obj(D, torch.randn(4, 1, 8, 8), None, 0, 10)
    assert len(seen) == 2 and torch.equal(seen[0], seen[1])


def test_distance_reaches_the_loss():
    torch.manual_seed(0)
    D = ConsistencyPrecond(DropoutNet(0.0))
    x0 = torch.randn(8, 1, 8, 8)
    losses = []
    for distance in (SquaredL2(), L1(), PseudoHuber()):
        torch.manual_seed(1)
        losses.append(ConsistencyTraining(distance)(D, x0, None, 0, 10).mean().item())
    assert len(set(losses)) == 3


def test_dsm_loss_is_weighted_mse():
    gm = GaussianMixture(torch.zeros(1, 1, 4, 4), torch.tensor([0.5]))  # N(0, sigma_d^2)
    x0 = gm.sample(4096, torch.Generator().manual_seed(0))[0].float()
    torch.manual_seed(0)
    loss = DenoisingScoreMatching()(gm, x0, None, 0, 1)
    # With the exact denoiser of N(0, sd^2), E[lambda ||D - y||^2] = 1 per dimension (EDM Eq. 8).
    assert loss.mean().item() == pytest.approx(1.0, rel=0.05)


def test_lpips_missing_weights_is_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("CM_WEIGHTS", str(tmp_path))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth.*download.pytorch.org"):
        LPIPS()


def test_lpips_loads_random_weights_from_cache(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("CM_WEIGHTS", str(tmp_path))
    torch.manual_seed(0)
    vgg = torchvision.models.vgg16(weights=None)
    torch.save(vgg.state_dict(), tmp_path / "vgg16-397923af.pth")
    register_weights(monkeypatch, "vgg16", tmp_path / "vgg16-397923af.pth")
    d = LPIPS(resize=0)
    assert torch.equal(d.lpips.net.slice1[0].weight, vgg.features[0].weight)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.allclose(d(x, x), torch.zeros(2), atol=1e-6)
    assert torch.all(d(x, -x) > 0)


def test_objectives_draw_per_sample_randomness_through_sample_draws():
    # Per-sample noise, sigmas, indices and label masks must come from Objective.draws (keyed by
    # the global sample index) or an explicit generator, never from the global RNG directly.
    import re

    import cm.objectives as objectives

    call = re.compile(r"torch\.(randn|rand|randint|randn_like|rand_like|multinomial|randperm)\(|"
                      r"\.(normal_|uniform_|bernoulli_|random_)\(")  # fmt: skip
    offenders = [
        f"{path.name}:{number}"
        for path in Path(objectives.__file__).parent.glob("*.py")
        if path.name not in ("base.py", "augment.py")  # the helper itself; data augmentation
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if call.search(line) and "generator=" not in line
    ]
    assert offenders == []


def test_sample_draws_split_the_global_batch():
    from cm.objectives.base import SampleDraws

    def draws(offset: int, n: int, total: int) -> list[torch.Tensor]:
        d = SampleDraws()
        d.set(7, offset, total)
        x = torch.zeros(n, 2)
        probs = torch.tensor([0.2, 0.3, 0.5])
        return [d.randn_like(x), d.rand(n), d.randint(0, 5, n), d.multinomial(probs, n), d.randn(n)]

    whole = draws(0, 6, 6)
    parts = [draws(offset, 3, 6) for offset in (0, 3)]
    for full, a, b in zip(whole, *parts, strict=True):
        assert torch.equal(full, torch.cat([a, b]))
    assert not torch.equal(parts[0][0], parts[1][0])
    with pytest.raises(ValueError, match="same batch size"):
        draws(4, 3, 6)


def test_edm_ema_rampup_counts_images_seen_before_the_step():
    """NVlabs/edm training_loop.py: the EMA update uses cur_nimg before ``+= batch_size``."""
    from cm.ema import EMA

    torch.manual_seed(0)
    ema, batch, halflife, ratio = EMA(halflife_kimg=0.5, rampup_ratio=0.05), 32, 500.0, 0.05
    model, avg = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    reference = [p.detach().clone() for p in avg.parameters()]
    cur_nimg = 0
    for step in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        nimg = min(halflife, cur_nimg * ratio)  # EDM, verbatim
        beta = 0.5 ** (batch / max(nimg, 1e-8))
        assert ema.beta(step, batch) == beta
        pairs = zip(reference, model.parameters(), strict=True)
        reference = [p.detach().lerp(r, beta) for r, p in pairs]
        ema.update(avg, model, step, batch)
        for r, a in zip(reference, avg.parameters(), strict=True):
            # beta is exact (above); lerp's two argument orders differ in the last ulp
            torch.testing.assert_close(a, r, rtol=0, atol=1e-6)
        cur_nimg += batch
    assert ema.beta(0, batch) == 0.0  # the first update copies the model
    assert ema.beta(10**6, batch) == 0.5 ** (batch / halflife)  # capped by the half-life
