"""Offline-safe weights: lookup order, one clear error, atomic fetch, ``cm weights``."""

import hashlib
from pathlib import Path

import pytest

from cm import weights
from cm.cli import main


def test_find_searches_cm_weights_then_hub(tmp_path, monkeypatch):
    first, second = tmp_path / "a", tmp_path / "b"
    second.mkdir()
    (second / "vgg16-397923af.pth").write_bytes(b"x")
    monkeypatch.setenv("CM_WEIGHTS", f"{first}:{second}")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    assert weights.find("vgg16") == second / "vgg16-397923af.pth"
    with pytest.raises(FileNotFoundError) as info:
        weights.find("inception")
    message = str(info.value)
    assert "weights-inception-2015-12-05-6726825d.pth" in message
    assert "https://github.com/toshas/torch-fidelity" in message and str(first) in message
    with pytest.raises(ValueError, match="Unknown weights"):
        weights.find("resnet")


def test_fetch_is_atomic_and_checks_the_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("CM_WEIGHTS", str(tmp_path / "w"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    source = tmp_path / "source.pth"
    source.write_bytes(b"weights")
    digest = hashlib.sha256(b"weights").hexdigest()
    good = weights.WeightsFile("good.pth", source.as_uri(), "a test", digest[:8])
    assert weights.fetch(good).read_bytes() == b"weights"
    bad = weights.WeightsFile("bad.pth", source.as_uri(), "a test", "00000000")
    with pytest.raises(ValueError, match="SHA-256"):
        weights.fetch(bad)
    missing = weights.WeightsFile("gone.pth", (tmp_path / "nope").as_uri(), "a test")
    with pytest.raises(ConnectionError, match="copy 'gone.pth'"):
        weights.fetch(missing)
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["good.pth"]  # no partials


def test_clip_entry_and_cli_check(tmp_path, monkeypatch, capsys):
    spec = weights.entry("clip:ViT-B-32:laion2b_s34b_b79k")
    assert spec.filename == "open_clip_ViT-B-32_laion2b_s34b_b79k.bin"
    assert spec.url.startswith("https://huggingface.co/laion/")
    assert weights.entry("clip:ViT-L-14:openai").url.startswith("https://openaipublic")
    with pytest.raises(ValueError, match="no pretrained tag"):
        weights.entry("clip:ViT-B-32:nonsense")
    monkeypatch.setenv("CM_WEIGHTS", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    Path(tmp_path / "alexnet-owt-7be5be79.pth").write_bytes(b"x")
    main(["weights", "check"])
    out = capsys.readouterr().out
    assert "alexnet" in out and "ok" in out and "MISSING" in out
