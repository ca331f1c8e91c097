"""Classifier-free and classifier guidance against the exact mixture denoiser; label dropout."""

import torch
from helpers import CONFIGS, fit_args
from torch import nn

from cm.guidance import ClassifierGuidance, cfg
from cm.objectives import DenoisingScoreMatching
from cm.objectives.base import drop_labels
from cm.oracle import GaussianMixture


def mixture() -> GaussianMixture:
    return GaussianMixture.random(4, (1, 4, 4), std=0.2, seed=1)


class ZeroMeansUnconditional(nn.Module):
    """The exact mixture denoiser; an all-zero label row means "no class" (as our networks)."""

    def __init__(self, gm: GaussianMixture) -> None:
        super().__init__()
        self.gm = gm

    def forward(self, x, sigma, labels=None):
        if labels is None:
            return self.gm(x, sigma)
        cond = self.gm(x, sigma, torch.where(labels.sum(1, keepdim=True) > 0, labels, 1.0))
        return torch.where(labels.sum(1).view(-1, 1, 1, 1) > 0, cond, self.gm(x, sigma))


def test_cfg_scales_one_and_zero_are_conditional_and_unconditional():
    gm = mixture()
    den = ZeroMeansUnconditional(gm)
    x = torch.randn(6, 1, 4, 4, dtype=torch.float64) * 2
    sigma = torch.full((6,), 1.5, dtype=torch.float64)
    y = torch.nn.functional.one_hot(torch.arange(6) % 4, 4).double()
    cond, uncond = gm(x, sigma, y), gm(x, sigma)
    torch.testing.assert_close(cfg(den, 1.0)(x, sigma, y), cond)
    torch.testing.assert_close(cfg(den, 0.0)(x, sigma, y), uncond)
    torch.testing.assert_close(cfg(den, 3.0)(x, sigma, y), uncond + 3 * (cond - uncond))
    torch.testing.assert_close(cfg(den, 3.0)(x, sigma, None), uncond)


def test_classifier_guidance_with_the_exact_classifier_is_the_conditional_denoiser():
    gm = mixture()

    def classifier(x, sigma):  # exact log p(k | x, sigma): Bayes' rule on the mixture
        return gm.log_responsibilities(x, sigma)

    class Exact(nn.Module):
        def forward(self, x, sigma):
            return classifier(x, sigma)

    x = torch.randn(5, 1, 4, 4, dtype=torch.float64) * 1.3
    sigma = torch.full((5,), 0.7, dtype=torch.float64)
    y = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 3, 1]), 4).double()
    guided = ClassifierGuidance(gm, Exact(), scale=1.0)
    torch.testing.assert_close(guided(x, sigma, y), gm(x, sigma, y))
    torch.testing.assert_close(ClassifierGuidance(gm, Exact(), 0.0)(x, sigma, y), gm(x, sigma))


def test_label_dropout_rate_and_only_in_training():
    torch.manual_seed(0)
    labels = torch.nn.functional.one_hot(torch.arange(10000) % 10, 10).float()
    dropped = drop_labels(labels, 0.2)
    rate = (dropped.sum(1) == 0).float().mean().item()
    assert abs(rate - 0.2) < 0.02 and drop_labels(labels, 0.0) is labels
    assert torch.equal(dropped[dropped.sum(1) > 0], labels[dropped.sum(1) > 0])
    seen = []

    def spy(x, sigma, labels):
        seen.append(labels.clone())
        return x

    obj = DenoisingScoreMatching(p_uncond=1.0)
    x0, y = torch.zeros(4, 1, 2, 2), labels[:4]
    obj(spy, x0, y, 0, 1)
    obj.eval()
    obj(spy, x0, y, 0, 1)
    assert seen[0].sum() == 0 and torch.equal(seen[1], y)  # evaluation keeps the labels


def test_cm_sample_cfg_scale(tmp_path):

    import numpy as np

    from cm.cli import main

    root = tmp_path / "run"
    main(fit_args(root, steps=2, config=CONFIGS / "edm_digits.yaml"))
    ckpt = next(root.glob("**/checkpoints/*.ckpt"))
    outs = {}
    for scale in ("1.0", "3.0"):
        out = tmp_path / f"s{scale}.npz"
        args = ["sample", "--ckpt_path", str(ckpt), "--num", "4", "--steps", "2"]
        main([*args, "--cfg_scale", scale, "--out", str(out)])
        outs[scale] = np.load(out)["arr_0"]
    main([*args, "--out", str(tmp_path / "plain.npz")])
    plain = np.load(tmp_path / "plain.npz")["arr_0"]
    assert np.abs(outs["1.0"].astype(int) - plain.astype(int)).max() <= 1  # s = 1: conditional
    assert not np.array_equal(outs["3.0"], plain)
