"""``cm.metrics``: FID/IS/KID against torchmetrics and hand formulas, precision/recall against a
brute-force k-NN, CLIP score against a hand computation, reference files and ``cm eval``.

No pretrained weights can be downloaded here: every test writes RANDOM weights under the exact
file names into a temporary directory and points ``CM_WEIGHTS`` at it, so the real loading code
runs. The random Inception's BatchNorm statistics are calibrated on one batch so its features are
O(1) rather than ~1e-8, and its classifier is scaled down so that IS sees moderate logits.
"""

import json
import math
from pathlib import Path

import numpy as np
import open_clip
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from helpers import register_weights, tiny_open_clip
from torch import nn

from cm.cli import main, run
from cm.metrics import (
    ClipEncoder,
    InceptionFeatures,
    MetricSuite,
    ModuleFeatures,
    PrecisionRecall,
    compute_reference,
    load_reference,
    precision_recall,
)
from cm.weights import REGISTRY

TINY_CLIP = "cm-test-tiny-clip"


def digits(n: int, offset: int = 0, channels: int = 1) -> np.ndarray:
    """``n`` of scikit-learn's 8x8 digits as uint8 NHWC (the samples-file layout)."""
    from sklearn.datasets import load_digits

    x = load_digits().images[offset : offset + n] * (255 / 16)
    x = np.repeat(np.round(x).astype(np.uint8)[..., None], channels, axis=-1)
    return x


def nchw_rgb(x: np.ndarray) -> torch.Tensor:
    """uint8 NHWC (1 or 3 channels) as the RGB NCHW tensor torchmetrics wants."""
    t = torch.from_numpy(x).permute(0, 3, 1, 2)
    return t.expand(-1, 3, -1, -1).contiguous()


@pytest.fixture(scope="module")
def inception_dir(tmp_path_factory) -> Path:
    """A directory holding random Inception weights under torch-fidelity's file name."""
    from unittest import mock

    import torch_fidelity.feature_extractor_inceptionv3 as fe

    torch.manual_seed(0)
    cls = fe.FeatureExtractorInceptionV3
    with (
        mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: {}),
        mock.patch.object(cls, "load_state_dict", lambda self, *a, **k: None),
    ):
        net = cls("inception-v3-compat", ["2048"])
    for m in net.modules():  # calibrate BatchNorm on one batch: O(1) features, not ~1e-8
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
            m.reset_running_stats()
    net.train()
    g = torch.Generator().manual_seed(1)
    noise = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=g)
    with torch.no_grad():  # digits and noise: the kinds of images the tests feed
        net(torch.cat([nchw_rgb(digits(4, offset=1000)), noise]))
        net.fc.weight.mul_(0.05)  # moderate logits, so that softmax probabilities are not 0
    path = tmp_path_factory.mktemp("weights")
    torch.save(net.state_dict(), path / REGISTRY["inception"].filename)
    return path


@pytest.fixture
def weights(inception_dir, monkeypatch) -> Path:
    """``CM_WEIGHTS`` pointing at the random Inception weights (their digest registered)."""
    monkeypatch.setenv("CM_WEIGHTS", str(inception_dir))
    register_weights(monkeypatch, "inception", inception_dir / REGISTRY["inception"].filename)
    return inception_dir


# -- FID / IS / KID with the Inception -------------------------------------------------------


def test_suite_matches_torchmetrics_and_hand_formulas(weights, tmp_path):
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import poly_mmd

    real, fake = digits(8), digits(8, offset=100)
    ref = compute_reference([real[:5], real[5:]], InceptionFeatures(), tmp_path / "ref.npz")
    suite = MetricSuite(
        ("fid", "is", "kid", "precision", "recall"), reference=ref, pr_k=3, is_splits=1
    )
    suite.update(torch.from_numpy(fake[:3]))  # NHWC, 1 channel
    suite.update(torch.from_numpy(fake[3:]).permute(0, 3, 1, 2))  # NCHW
    values = suite.compute()
    assert list(values) == ["fid", "is", "is_std", "kid", "kid_std", "precision", "recall"]

    # FID: torchmetrics fed with the same images and the same weights file
    fid = FrechetInceptionDistance(
        feature=2048,
        feature_extractor_weights_path=str(weights / REGISTRY["inception"].filename),
        antialias=False,
    )
    fid.update(nchw_rgb(real), real=True)
    fid.update(nchw_rgb(fake), real=False)
    expected = float(fid.compute())
    assert expected > 1
    assert values["fid"] == pytest.approx(expected, rel=1e-4)

    # IS (one split): exp E_x KL(p(y|x) || p(y)) from the unbiased logits
    inception = InceptionFeatures()
    with torch.no_grad():
        f_fake, logits = inception(nchw_rgb(fake))
    p = logits.double().softmax(1)
    kl = (p * (p.log() - p.mean(0, keepdim=True).log())).sum(1).mean()
    assert values["is"] == pytest.approx(float(kl.exp()), rel=1e-4)

    # KID with all 8 samples in one subset is permutation-free: the plain unbiased MMD^2
    f_real = torch.from_numpy(load_reference(ref).features)
    mmd = poly_mmd(f_real.double(), f_fake.double())
    assert values["kid"] == pytest.approx(float(mmd), rel=1e-4, abs=1e-6)
    assert values["kid_std"] == pytest.approx(0, abs=1e-6)
    p_, r_ = precision_recall(f_real.double(), f_fake.double(), k=3)
    assert values["precision"] == pytest.approx(float(p_))
    assert values["recall"] == pytest.approx(float(r_))

    # reset forgets the generated samples only: the same samples give the same numbers
    suite.reset()
    assert int(suite.metrics["fid"].fake_features_num_samples) == 0
    assert suite.metrics["fid"].ref_mu.shape == (2048,)  # the reference stays loaded
    suite.update(torch.from_numpy(fake))
    assert int(suite.metrics["fid"].fake_features_num_samples) == 8
    again = suite.metrics["kid"].compute(), suite.metrics["pr"].compute()
    assert float(again[0][0]) == pytest.approx(values["kid"], rel=1e-4, abs=1e-6)
    assert float(again[1][0]) == values["precision"]
    suite.reset()
    suite.update(torch.from_numpy(fake[:1]))
    with pytest.raises(ValueError, match="at least 2 generated samples"):
        suite.metrics["fid"].compute()


def test_guided_diffusion_reference_batch(weights, tmp_path):
    """Their mu/sigma are used as they are; KID/PR banks come from arr_0."""
    images, fake = digits(6, offset=200, channels=3), digits(6, offset=300)
    mu = np.full(2048, 0.5)
    sigma = np.eye(2048) * 0.1
    path = tmp_path / "VIRTUAL_digits.npz"
    np.savez(path, arr_0=images, mu=mu, sigma=sigma)
    suite = MetricSuite(("fid", "precision", "recall"), reference=path)
    suite.update(torch.from_numpy(fake))
    values = suite.compute()

    inception = InceptionFeatures()
    with torch.no_grad():
        f_fake = inception(nchw_rgb(fake))[0].double()
        bank = inception(nchw_rgb(images))[0].double()
    m = f_fake.mean(0).numpy()
    centred = (f_fake - f_fake.mean(0)).numpy()
    # s = C^T C / (n - 1) and sigma = 0.1 I: tr sqrt(s sigma) = sqrt(0.1) sum sqrt(eig(s)), and
    # the nonzero eigenvalues of s are those of the 6x6 Gram matrix C C^T / (n - 1)
    eig = np.clip(np.linalg.eigvalsh(centred @ centred.T / 5), 0, None)
    trace_s = (centred**2).sum() / 5
    hand = ((m - mu) ** 2).sum() + trace_s + np.trace(sigma) - 2 * np.sqrt(eig * 0.1).sum()
    assert values["fid"] == pytest.approx(hand, rel=1e-4)
    p_, r_ = precision_recall(bank, f_fake, k=3)
    assert (values["precision"], values["recall"]) == pytest.approx((float(p_), float(r_)))

    # cm eval ref on such a batch caches the bank and keeps the published mu/sigma
    main(["eval", "ref", "--data", str(path), "--out", str(tmp_path / "ref.npz")])
    ref = load_reference(tmp_path / "ref.npz")
    np.testing.assert_array_equal(ref.mu, mu)
    np.testing.assert_array_equal(ref.sigma, sigma)
    np.testing.assert_allclose(ref.features, bank.float().numpy(), rtol=1e-5, atol=1e-5)
    assert (ref.feature, ref.num_images, ref.has_images) == ("inception", 6, False)


def test_missing_inception_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("CM_WEIGHTS", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    spec = REGISTRY["inception"]
    with pytest.raises(FileNotFoundError) as error:
        MetricSuite(("is",))
    assert spec.filename in str(error.value) and spec.url in str(error.value)
    (tmp_path / spec.filename).write_bytes(b"<html>not a checkpoint</html>")
    with pytest.raises(ValueError, match="does not match the published SHA-256"):
        MetricSuite(("is",))
    with pytest.raises(ValueError, match="need reference statistics"):
        MetricSuite(("fid",))
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        MetricSuite(("fid",), reference=tmp_path / "missing.npz")
    with pytest.raises(ValueError, match="Unknown metrics"):
        MetricSuite(("fad",))


# -- precision / recall ----------------------------------------------------------------------


def brute_force_pr(real: torch.Tensor, fake: torch.Tensor, k: int) -> tuple[float, float]:
    """Kynkäänniemi et al. (2019) written out with loops over points."""

    def radii(x):
        return [sorted(torch.dist(a, b).item() for b in x)[k] for a in x]  # [0] is a itself

    def coverage(queries, points, r):
        balls = list(zip(points, r, strict=True))
        inside = [any(torch.dist(q, p).item() <= rp for p, rp in balls) for q in queries]
        return sum(inside) / len(inside)

    return coverage(fake, real, radii(real)), coverage(real, fake, radii(fake))


def test_precision_recall_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(40, 5, generator=g, dtype=torch.float64)
    fake = 1.3 * torch.randn(30, 5, generator=g, dtype=torch.float64) + 0.7
    expected = brute_force_pr(real, fake, k=3)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    assert tuple(map(float, precision_recall(real, fake, k=3))) == pytest.approx(expected)

    metric = PrecisionRecall(real, k=3)  # states fed in chunks, float32 like the suite
    for chunk in fake.split(7):
        metric.update(chunk)
    got = tuple(map(float, metric.compute()))
    assert got == pytest.approx(expected, abs=1 / 30 + 1e-9)  # float32 may flip a boundary point
    metric.fake_features = fake.float()  # after a DDP sync a cat state is one tensor, not a list
    metric._computed = None
    assert tuple(map(float, metric.compute())) == got

    assert tuple(map(float, precision_recall(real, real, k=3))) == (1.0, 1.0)
    assert tuple(map(float, precision_recall(real, real + 100, k=3))) == (0.0, 0.0)
    with pytest.raises(ValueError, match="more than 3"):
        precision_recall(real, fake[:3], k=3)


# -- a swappable feature module ---------------------------------------------------------------


class TinyFeatures(nn.Module):
    """Four numbers per uint8 image: the 2x2 average-pooled intensity (no weights)."""

    num_features = 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x.float().mean(1, keepdim=True) / 255, 2).flatten(1)


class OtherFeatures(TinyFeatures):
    """The same features under another name: a reference built with it must not be mixed."""


def hand_fid(a: np.ndarray, b: np.ndarray) -> float:
    """Heusel et al. (2017), Eq. 6, with scipy's sqrtm."""
    m1, m2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_custom_feature_module(tmp_path):
    real, fake = digits(64), digits(48, offset=500)
    ref = compute_reference([real], ModuleFeatures(TinyFeatures()), tmp_path / "ref.npz")
    suite = MetricSuite(
        ("fid", "kid", "precision", "recall"), TinyFeatures(), ref, kid_subset_size=16
    )
    for start in range(0, 48, 10):
        suite.update(torch.from_numpy(fake[start : start + 10]))
    values = suite.compute()
    f_real = TinyFeatures()(torch.from_numpy(real).permute(0, 3, 1, 2)).double().numpy()
    f_fake = TinyFeatures()(torch.from_numpy(fake).permute(0, 3, 1, 2)).double().numpy()
    assert values["fid"] == pytest.approx(hand_fid(f_real, f_fake), rel=1e-4)
    assert math.isfinite(values["kid"]) and values["kid_std"] > 0  # subsets of 16 out of 48
    p_, r_ = brute_force_pr(torch.from_numpy(f_real), torch.from_numpy(f_fake), k=3)
    assert (values["precision"], values["recall"]) == pytest.approx((p_, r_), abs=1 / 48 + 1e-9)
    with pytest.raises(ValueError, match="feature bank"):
        MetricSuite(("fid",), OtherFeatures(), ref)
    with pytest.raises(ValueError, match="uint8 images"):
        suite.update(torch.rand(2, 1, 8, 8))


# -- CLIP score on a tiny open_clip model ------------------------------------------------------


@pytest.fixture
def tiny_clip(tmp_path, monkeypatch) -> nn.Module:
    """A tiny open_clip model ``cm-test-tiny-clip``/``random`` with random weights cached."""
    return tiny_open_clip(TINY_CLIP, tmp_path, monkeypatch)


def test_clip_score_matches_hand_computation(tiny_clip, tmp_path):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8, generator=g)
    captions = ["a digit", "a photo of a cat", "zero", "one", "two", "three"]
    ref = compute_reference([images], ClipEncoder(TINY_CLIP, "random"), tmp_path / "ref.npz")
    suite = MetricSuite(
        ("fid", "clip_score"), "clip", ref, clip_model=TINY_CLIP, clip_pretrained="random"
    )
    assert suite.clip is None  # one CLIP serves both the features and the score
    suite.update(images[:4], captions=captions[:4])
    suite.update(images[4:].permute(0, 2, 3, 1), captions=captions[4:])  # NHWC too
    values = suite.compute()

    x = F.interpolate(images.float() / 255, size=32, mode="bicubic", antialias=True).clamp(0, 1)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        e_img = tiny_clip.encode_image((x - mean) / std)
        e_txt = tiny_clip.encode_text(open_clip.get_tokenizer(TINY_CLIP)(captions))
    cos = F.cosine_similarity(e_img.double(), e_txt.double(), dim=-1)
    assert values["clip_score"] == pytest.approx(float(100 * cos.clamp_min(0).mean()), rel=1e-4)
    assert values["fid"] == pytest.approx(0, abs=1e-2)  # same images as the reference
    with pytest.raises(ValueError, match="one caption per image"):
        suite.update(images)


# -- cm eval ------------------------------------------------------------------------------------


def test_cli_ref_and_samples(weights, tmp_path):
    config = tmp_path / "digits.yaml"
    config.write_text(
        "data:\n  class_path: cm.training.ImageDataModule\n"
        "  init_args:\n    dataset: digits\n    resolution: 8\n"
    )
    ref = tmp_path / "ref.npz"
    main(["eval", "ref", "--data", str(config), "--out", str(ref), "--num", "12",
          "--batch_size", "8"])  # fmt: skip
    with np.load(ref) as data:
        assert data["mu"].shape == (2048,) and data["sigma"].shape == (2048, 2048)
        assert data["features"].shape == (12, 2048)
        assert str(data["feature"]) == "inception" and int(data["num_images"]) == 12
    assert not list(tmp_path.glob(".*.part"))  # nothing half-written left behind

    samples = tmp_path / "samples.npz"
    np.savez(samples, arr_0=digits(8, offset=40))
    main(["eval", str(samples), "--ref", str(ref), "--batch_size", "4",
          "--kid_subset_size", "4"])  # fmt: skip
    result = json.loads((tmp_path / "samples.metrics.json").read_text())
    assert result["num_samples"] == 8
    assert set(result["metrics"]) == {
        "fid", "is", "is_std", "kid", "kid_std", "precision", "recall"
    }  # fmt: skip
    assert all(math.isfinite(v) for v in result["metrics"].values())

    with pytest.raises(FileNotFoundError, match="nope.npz"):
        run(["eval", str(tmp_path / "nope.npz"), "--ref", str(ref)])
    with pytest.raises(FileNotFoundError, match="missing_ref.npz"):
        run(["eval", str(samples), "--ref", str(tmp_path / "missing_ref.npz")])


def test_cli_custom_feature(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    images = tmp_path / "real.npz"
    np.savez(images, arr_0=digits(40))
    ref, out = tmp_path / "ref.npz", tmp_path / "out.json"
    feature = f"{TinyFeatures.__module__}.TinyFeatures"
    main(["eval", "ref", "--data", str(images), "--out", str(ref), "--feature", feature])
    assert load_reference(ref).feature.endswith("TinyFeatures")
    samples = tmp_path / "samples.npz"
    np.savez(samples, arr_0=digits(30, offset=900))
    main(["eval", str(samples), "--ref", str(ref), "--feature", feature,
          "--metrics", "fid", "precision", "--json", str(out)])  # fmt: skip
    metrics = json.loads(out.read_text())["metrics"]
    assert set(metrics) == {"fid", "precision"} and metrics["fid"] > 0
