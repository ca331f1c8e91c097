"""E-LatentLPIPS: shared augmentation, the distance, weight loading, the two training stages."""

import math

import numpy as np
import pytest
import torch
from helpers import cpu_trainer, published_names
from safetensors.torch import save_file

from cm.networks.latent_vgg import LatentVGG16BN
from cm.objectives.augment import _rotate, _translate, augment, warp
from cm.objectives.elatentlpips import ELatentLPIPS, convert_published, load_trunk
from cm.training.latent_vgg import (
    ELatentLPIPSCalibration,
    LatentFieldsDataModule,
    LatentVGGClassifier,
)

TINY = (8, 8, 16, 16, 16)
PRESETS = ["b", "g", "c", "o", "bg", "bgco"]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("preset", PRESETS)
def test_augment_same_draw_for_both_inputs(preset):
    x = torch.randn(4, 4, 16, 16)
    a, b = augment(x, x.clone(), preset, gen())
    assert a.shape == x.shape and torch.equal(a, b)
    a, b = augment(x, 2 * x + 1, preset, gen())
    if "c" not in preset and "o" not in preset:  # warps are affine maps preserving constants
        torch.testing.assert_close(b, 2 * a + 1, atol=1e-5, rtol=1e-5)
    if "o" in preset:  # one cutout rectangle of half the size, at the same place in both
        assert torch.equal(a == 0, b == 0)
    if preset == "o":
        area = (a[:, 0] == 0).float().mean((1, 2))
        assert torch.all(area > 0.0) and torch.all(area <= 0.25)
    assert not torch.equal(augment(x, x, preset, gen(1))[0], a)  # a new draw per call


def test_pixel_blitting_is_exact():
    x = torch.randn(3, 2, 8, 8)
    a, _ = augment(x, x, "b", gen())
    for i in range(3):  # flips, quarter turns and integer shifts only move values around
        assert torch.isin(a[i], x[i]).all()
    z = torch.arange(2 * 20.0).view(2, 1, 4, 5)
    square = z[..., :4].contiguous()
    turned = warp(square, _rotate(torch.full((2,), math.pi / 2)), exact=True)
    assert torch.equal(turned, torch.rot90(square, 1, (2, 3)))
    shifted = warp(z, _translate(torch.full((2,), -1.0), torch.zeros(2)), exact=True)
    assert torch.equal(shifted[..., 1:], z[..., :-1])


@pytest.mark.parametrize("preset", ["b", "g", "c", "o"])
def test_augment_differentiable(preset):
    x = torch.randn(2, 4, 16, 16, requires_grad=True)
    y = torch.randn(2, 4, 16, 16, requires_grad=True)
    a, b = augment(x, y, preset, gen())
    (a.pow(2).sum() + (a * b).sum()).backward()
    for t in (x, y):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_augment_rejects_unknown_letter():
    with pytest.raises(ValueError, match="bgco"):
        augment(torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8), "bx")
    with pytest.raises(ValueError, match="bgco"):
        ELatentLPIPS(augment="q")


def test_distance_zero_on_self_and_grows_with_perturbation():
    torch.manual_seed(0)
    d = ELatentLPIPS(widths=TINY)
    x, n = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    assert torch.equal(d(x, x, gen()), torch.zeros(2))
    values = torch.stack([d(x, x + s * n, gen(3)) for s in (0.01, 0.03, 0.1, 0.3, 1.0)])
    assert values.shape == (5, 2) and torch.all(values[1:] > values[:-1])
    # the L1 term is added on the inputs before augmentation
    plain, l1 = (
        ELatentLPIPS(widths=TINY, augment=""),
        ELatentLPIPS(widths=TINY, augment="", l1_weight=2),
    )
    l1.load_state_dict(plain.state_dict())
    y = x + 0.1 * n
    torch.testing.assert_close(l1(x, y) - plain(x, y), 2 * (x - y).abs().flatten(1).mean(1))


def test_distance_frozen_float32_and_differentiable_in_inputs():
    d = ELatentLPIPS(widths=TINY).train()
    assert not any(p.requires_grad for p in d.parameters()) and not d.trunk.training
    x = torch.randn(2, 4, 16, 16, requires_grad=True)
    y = torch.randn(2, 4, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = d(x, y, gen())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, d(x, y, gen()))
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def randomized(**kwargs) -> ELatentLPIPS:
    d = ELatentLPIPS(widths=TINY, **kwargs)
    state = {
        k: torch.rand_like(v) if v.is_floating_point() else v for k, v in d.state_dict().items()
    }
    d.load_state_dict(state)
    return d


def test_cm_format_round_trip(tmp_path):
    torch.manual_seed(0)
    d = randomized()
    x, y = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    save_file(d.state_dict(), tmp_path / "e.safetensors")
    e = ELatentLPIPS(widths=TINY, path=str(tmp_path / "e.safetensors"))
    torch.testing.assert_close(e(x, y, gen()), d(x, y, gen()))
    # a calibration checkpoint: Lightning's prefixed state dict, plus the ranking network
    state = {f"metric.{k}": v for k, v in d.state_dict().items()} | {"rank.w": torch.ones(1)}
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "last.ckpt")
    f = ELatentLPIPS(widths=TINY, path=str(tmp_path / "last.ckpt"))
    torch.testing.assert_close(f(x, y, gen()), d(x, y, gen()))
    with pytest.raises(ValueError, match="does not fit"):
        ELatentLPIPS(latent_channels=16, widths=TINY, path=str(tmp_path / "e.safetensors"))


def test_published_format_remap(tmp_path):
    torch.manual_seed(0)
    ours = randomized()
    published = {}
    for k, v in ours.state_dict().items():
        if k.startswith("heads."):
            published[f"lin{k.split('.')[1]}.model.1.weight"] = v.clone()
        else:
            published[published_names(k)] = v.clone()
    torch.save(published, tmp_path / "sd15_latest_vgg16_tuned.pth")
    loaded = ELatentLPIPS(
        widths=TINY, path=str(tmp_path / "sd15_latest_vgg16_tuned.pth"), format="elatentlpips"
    )
    for k, v in ours.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    # the release's full-size names (torchvision vgg16_bn: conv at these indices, BN after) map
    # one to one onto ours
    convs = (0, 3, 7, 10, 14, 17, 20, 24, 27, 30, 34, 37, 40)
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    release = [
        published_names(f"trunk.features.{i}.{p}") for i in convs for p in ("weight", "bias")
    ]
    release += [published_names(f"trunk.features.{i + 1}.{p}") for i in convs for p in bn]
    release += [f"lin{k}.model.1.weight" for k in range(5)]
    with torch.device("meta"):
        full = ELatentLPIPS()
    assert set(convert_published(dict.fromkeys(release))) == set(full.state_dict())
    assert len(release) == len(full.state_dict()) and full.trunk.tap_indices == [6, 13, 23, 33, 43]
    # the trunk-only release file initialises a classifier trunk (for calibration)
    net = LatentVGG16BN(4, TINY, num_classes=5, hidden=8, pool_size=1)
    tar = {f"module.model.{k}": v + torch.rand(()) for k, v in net.state_dict().items()}
    torch.save({"state_dict": tar, "best_acc1": 60.0}, tmp_path / "sd15_latent_vgg16.pth.tar")
    load_trunk(net, tmp_path / "sd15_latent_vgg16.pth.tar", "elatentlpips")
    assert torch.equal(net.classifier[6].weight, tar["module.model.classifier.6.weight"])
    with pytest.raises(ValueError, match="no calibrated heads"):
        ELatentLPIPS(
            widths=TINY, path=str(tmp_path / "sd15_latent_vgg16.pth.tar"), format="elatentlpips"
        )


def test_missing_weights_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="elatentlpips release") as info:
        ELatentLPIPS(path=str(tmp_path / "sd15_latest_vgg16_tuned.pth"), format="elatentlpips")
    assert "huggingface.co/Mingguksky/elatentlpips" in str(info.value)


def test_training_stages_run_on_cpu(tmp_path):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (tmp_path / "in" / split).mkdir(parents=True)
        np.save(tmp_path / "in" / split / "latents.npy", rng.normal(size=(8, 4, 8, 8)).astype("f2"))
        np.save(tmp_path / "in" / split / "labels.npy", rng.integers(0, 5, 8))
        (tmp_path / "2afc" / split).mkdir(parents=True)
        for f in ("ref", "p0", "p1"):
            np.save(tmp_path / "2afc" / split / f"{f}.npy", rng.normal(size=(8, 4, 8, 8)))
        np.save(tmp_path / "2afc" / split / "judge.npy", rng.uniform(size=8))
    net = LatentVGG16BN(4, TINY, num_classes=5, hidden=8, pool_size=1)
    before = net.features[0].weight.clone()
    stage1 = LatentVGGClassifier(net, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    data = LatentFieldsDataModule(
        str(tmp_path / "in/train"), str(tmp_path / "in/val"), batch_size=4, num_workers=0
    )
    cpu_trainer(fast_dev_run=2).fit(stage1, data)
    assert not torch.equal(net.features[0].weight, before)
    save_file(net.state_dict(), tmp_path / "trunk.safetensors")

    metric = ELatentLPIPS(widths=TINY, dropout=0.5)
    stage2 = ELatentLPIPSCalibration(
        metric, str(tmp_path / "trunk.safetensors"), optimizer=lambda p: torch.optim.Adam(p, lr=0.5)
    )
    assert torch.equal(metric.trunk.features[0].weight, net.features[0].weight)
    data = LatentFieldsDataModule(
        str(tmp_path / "2afc/train"),
        str(tmp_path / "2afc/val"),
        task="2afc",
        batch_size=4,
        num_workers=0,
    )
    cpu_trainer(fast_dev_run=2).fit(stage2, data)
    heads = torch.cat([h.weight.flatten() for h in metric.heads])
    assert torch.all(heads >= 0) and not torch.all(heads == 1)
    assert torch.equal(metric.trunk.features[0].weight, net.features[0].weight)  # frozen
    with pytest.raises(FileNotFoundError, match="judge.npy"):
        LatentFieldsDataModule(str(tmp_path / "in/train"), task="2afc").train_dataloader()
