"""The shipped digits feature extractor: accuracy, input handling and a Frechet distance check."""

import numpy as np
import pytest
import torch
from scipy import linalg

from cm.metrics.digits import DigitsFeatures, digits_split, load_digits_uint8


@pytest.fixture(scope="module")
def extractor() -> DigitsFeatures:
    return DigitsFeatures()


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    return load_digits_uint8()


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to the rows of ``a`` and ``b`` (float64)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


def test_shipped_weights_classify_held_out_digits(extractor, digits):
    images, labels = digits
    _, test_idx = digits_split()
    pred = extractor.logits(images[test_idx]).argmax(1)
    assert (pred == labels[test_idx]).float().mean().item() >= 0.95


def test_split_is_fixed_and_disjoint():
    train, test = digits_split()
    assert len(train) + len(test) == 1797
    assert not set(train) & set(test)
    assert np.array_equal(test, digits_split()[1])


def test_frozen_module(extractor):
    assert not extractor.training
    assert not any(p.requires_grad for p in extractor.parameters())
    assert isinstance(extractor.num_features, int) and extractor.num_features == 64


def test_shapes_and_channels(extractor, digits):
    grey = digits[0][:5]
    feats = extractor(grey)
    assert feats.dtype == torch.float32 and feats.shape == (5, extractor.num_features)
    # Three identical channels average back to the grey image.
    torch.testing.assert_close(extractor(grey.expand(-1, 3, -1, -1)), feats)
    rgb = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    assert extractor(rgb).shape == (4, extractor.num_features)


def test_other_sizes_are_resized(extractor, digits):
    images, labels = digits
    _, test_idx = digits_split()
    big = torch.nn.functional.interpolate(images[test_idx].float(), scale_factor=4, mode="nearest")
    logits = extractor.logits(big.to(torch.uint8))
    # Antialiased downsampling of 32x32 blocks back to 8x8 keeps the digits recognisable.
    assert (logits.argmax(1) == labels[test_idx]).float().mean().item() >= 0.9
    assert extractor(big[:3].to(torch.uint8)).shape == (3, extractor.num_features)


def test_bad_inputs_raise(extractor):
    with pytest.raises(TypeError, match="uint8"):
        extractor(torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="C in"):
        extractor(torch.zeros(2, 2, 8, 8, dtype=torch.uint8))


def test_missing_weights_name_the_script(tmp_path):
    with pytest.raises(FileNotFoundError, match="scripts/train_digits_features.py"):
        DigitsFeatures(path=tmp_path / "absent.safetensors")


# Some ReLU features are never active on digits, so covariances are singular; sqrtm still works.
@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")
def test_frechet_distance_separates_real_from_noise(extractor, digits):
    images = digits[0]
    idx = torch.from_numpy(np.random.default_rng(1).permutation(len(images)))
    half_a, half_b = images[idx[:898]], images[idx[898:1796]]
    noise = torch.randint(0, 256, (898, 1, 8, 8), dtype=torch.uint8, generator=torch.manual_seed(0))
    fa, fb, fn = (extractor(x).numpy() for x in (half_a, half_b, noise))
    real_vs_real, real_vs_noise = frechet(fa, fb), frechet(fa, fn)
    assert real_vs_real < real_vs_noise / 10, (real_vs_real, real_vs_noise)
