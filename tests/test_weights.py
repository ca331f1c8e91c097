"""Pretrained weights: lookup order, atomic fetch, SHA-256 checks, no code from a weights cache.

Real files cannot be downloaded here: tests write random weights under the published file names
and register their digest with ``helpers.register_weights`` (the check itself always runs).
"""

import builtins
import dataclasses
import hashlib
import io
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from helpers import fit_args, register_weights, tiny_open_clip, write_hf_snapshot
from torch import nn

from cm import weights
from cm.cli import main
from cm.metrics import InceptionFeatures
from cm.objectives import LPIPS

INCEPTION = weights.REGISTRY["inception"].filename
VGG = weights.REGISTRY["vgg16"].filename


class Payload:
    """A pickle whose loading writes ``marker``: what a replaced weights file could carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def fails(args: list[str], match: str, capsys) -> str:
    """Run ``cm args``; assert exit 2, no traceback, one ``error:`` line matching ``match``."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, captured.err
    assert re.search(match, errors[0]), errors[0]
    return captured.out


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty ``CM_WEIGHTS`` and torch hub cache under ``tmp_path``."""
    monkeypatch.setenv("CM_WEIGHTS", str(tmp_path / "w"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    (tmp_path / "w").mkdir()
    return tmp_path / "w"


@pytest.fixture
def vgg_file(cache, monkeypatch) -> Path:
    """Random VGG16 weights under the published name, their digest registered."""
    torch.manual_seed(0)
    torch.save(torchvision.models.vgg16(weights=None).state_dict(), cache / VGG)
    register_weights(monkeypatch, "vgg16", cache / VGG)
    return cache / VGG


def test_registry_records_published_digests():
    full = re.compile(r"[0-9a-f]{64}")
    for name in ("inception", "vgg16"):  # full digests found pinned in public sources
        spec = weights.REGISTRY[name]
        assert full.fullmatch(spec.sha256) and spec.name == name
        assert spec.sha256.startswith(spec.filename.rsplit("-", 1)[1].removesuffix(".pth"))
    assert weights.REGISTRY["alexnet"].sha256 == "7be5be79"  # only torch hub's prefix is known
    openai = weights.entry("clip:ViT-L-14:openai")  # the URL's directory is the SHA-256
    assert full.fullmatch(openai.sha256) and openai.sha256 in openai.url
    assert weights.entry("clip:ViT-B-32:laion2b_s34b_b79k").sha256 is None


def test_find_searches_cm_weights_then_hub(tmp_path, monkeypatch):
    first, second = tmp_path / "a", tmp_path / "b"
    second.mkdir()
    (second / VGG).write_bytes(b"x")
    monkeypatch.setenv("CM_WEIGHTS", f"{first}:{second}")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    assert weights.find("vgg16") == second / VGG
    with pytest.raises(FileNotFoundError) as info:
        weights.find("inception")
    message = str(info.value)
    assert INCEPTION in message
    assert "https://github.com/toshas/torch-fidelity" in message and str(first) in message
    with pytest.raises(ValueError, match="Unknown weights"):
        weights.find("resnet")


def test_fetch_is_atomic_and_checks_the_hash(tmp_path, cache):
    source = tmp_path / "source.pth"
    source.write_bytes(b"weights")
    digest = hashlib.sha256(b"weights").hexdigest()
    good = weights.WeightsFile("good.pth", source.as_uri(), "a test", digest, "good")
    assert weights.fetch(good).read_bytes() == b"weights"
    bad = weights.WeightsFile("bad.pth", source.as_uri(), "a test", "00000000")
    with pytest.raises(ValueError, match="SHA-256"):
        weights.fetch(bad)
    missing = weights.WeightsFile("gone.pth", (tmp_path / "nope").as_uri(), "a test")
    with pytest.raises(ConnectionError, match="copy 'gone.pth'"):
        weights.fetch(missing)
    assert sorted(p.name for p in cache.iterdir()) == ["good.pth"]  # no partials
    (cache / "good.pth").write_bytes(b"weights, truncat")  # a corrupt copy is replaced
    assert weights.fetch(good).read_bytes() == b"weights"


def test_malicious_inception_never_runs(tmp_path, cache, monkeypatch, capsys):
    marker = tmp_path / "marker"
    torch.save(Payload(marker), cache / INCEPTION)
    np.savez(tmp_path / "s.npz", np.zeros((4, 8, 8, 3), np.uint8))
    ref = ["eval", "ref", "--data", str(tmp_path / "s.npz"), "--out", str(tmp_path / "r.npz")]
    fails([*ref, "--device", "cpu"], f"{INCEPTION}.*does not match the published SHA-256", capsys)
    out = fails(["weights", "check", "inception"], "inception", capsys)
    assert re.search(r"inception\s+CORRUPT .*expected 6726825d0af5f729", out)
    # even with its digest registered (say, a poisoned mirror), weights_only refuses the pickle
    register_weights(monkeypatch, "inception", cache / INCEPTION)
    fails([*ref, "--device", "cpu"], "as plain tensors", capsys)
    assert not marker.exists() and not (tmp_path / "r.npz").exists()
    torch.load(cache / INCEPTION, weights_only=False)  # the control: unpickled, it does run
    assert marker.read_text() == "ran"


def test_malicious_vgg_ends_an_lpips_fit(tmp_path, cache, capsys):
    marker = tmp_path / "marker"
    torch.save(Payload(marker), cache / VGG)
    lpips = "--model.init_args.objective.init_args.distance=cm.objectives.LPIPS"
    fails(fit_args(tmp_path / "run", lpips), "SHA-256", capsys)
    assert not marker.exists()


def test_corrupt_vgg_is_reported_and_refused(vgg_file, capsys):
    main(["weights", "check", "vgg16"])
    assert re.search(r"vgg16\s+ok ", capsys.readouterr().out)
    assert isinstance(LPIPS(resize=0).lpips.net.slice1[0], nn.Conv2d)  # a good file loads
    vgg_file.write_bytes(vgg_file.read_bytes()[:-1000])  # truncated download
    out = fails(["weights", "check"], "vgg16.*cm weights fetch vgg16", capsys)
    expected = weights.REGISTRY["vgg16"].sha256[:16]
    assert re.search(rf"vgg16\s+CORRUPT .*expected {expected}\.\.\., got [0-9a-f]{{16}}", out)
    assert re.search(r"inception\s+MISSING", out)  # listing everything: missing is not an error
    with pytest.raises(ValueError, match=r"does not match.*`cm weights fetch vgg16`"):
        LPIPS(resize=0)


def test_check_missing_named_file_fails(cache, capsys):
    fails(["weights", "check", "alexnet"], "alexnet", capsys)
    main(["weights", "check"])  # nothing present, nothing named: a listing, exit 0
    assert capsys.readouterr().out.count("MISSING") == len(weights.REGISTRY)


def test_alexnet_prefix_check(cache, capsys):
    (cache / "alexnet-owt-7be5be79.pth").write_bytes(b"x")  # sha256 2d711642..., not 7be5be79
    out = fails(["weights", "check", "alexnet"], "alexnet", capsys)
    assert "CORRUPT" in out and "expected 7be5be79..." in out


def test_inception_loads_verified_weights_without_torch_fidelity_loading(cache, monkeypatch):
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    def forbidden(*args, **kwargs):
        raise AssertionError("torch-fidelity must not load or download anything")

    monkeypatch.setattr(fe, "load_state_dict_from_url", forbidden)
    monkeypatch.setattr(fe.torch, "load", forbidden)  # the torch.load torch-fidelity calls
    net = fe.FeatureExtractorInceptionV3.__new__(fe.FeatureExtractorInceptionV3)
    with pytest.raises(AssertionError):  # the stand-in path is the only way past torch.load
        fe.FeatureExtractorInceptionV3.__init__(net, "inception-v3-compat", ["2048"], "x.pth")
    monkeypatch.undo()
    monkeypatch.setenv("CM_WEIGHTS", str(cache))
    monkeypatch.setenv("TORCH_HOME", str(cache.parent / "hub"))
    torch.manual_seed(0)
    state = {k: v.float().uniform_(0.5, 1) for k, v in net.state_dict().items()}
    torch.save(state, cache / INCEPTION)
    register_weights(monkeypatch, "inception", cache / INCEPTION)
    monkeypatch.setattr(fe, "load_state_dict_from_url", forbidden)
    loaded = InceptionFeatures()
    assert torch.equal(loaded.net.fc.weight, state["fc.weight"])
    assert not loaded.net.training and not loaded.net.fc.weight.requires_grad
    features, logits = loaded(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    assert features.shape == (1, 2048) and logits.shape == (1, 1008)
    torch.save({"fc.weight": state["fc.weight"]}, cache / INCEPTION)  # another network's file
    register_weights(monkeypatch, "inception", cache / INCEPTION)
    with pytest.raises(ValueError, match="not torch-fidelity's Inception"):
        InceptionFeatures()


def test_torchscript_clip_needs_the_published_digest(tmp_path, monkeypatch):
    path = tmp_path / "open_clip_tiny_openai.bin"
    torch.jit.save(torch.jit.script(nn.Linear(2, 3)), path)
    digest = weights.sha256_file(path)
    with pytest.raises(ValueError, match="TorchScript archive, which runs code"):
        weights.load_clip_state_dict(path)  # a file from elsewhere
    unpublished = weights.WeightsFile(path.name, "https://example.invalid/x.bin", "a test")
    with pytest.raises(ValueError, match="TorchScript archive, which runs code"):
        weights.load_clip_state_dict(path, unpublished)
    wrong = weights.WeightsFile(path.name, "u", "a test", "0" * 64, "clip:tiny:openai")
    with pytest.raises(ValueError, match="does not match the published SHA-256"):
        weights.load_clip_state_dict(path, wrong)
    published = weights.WeightsFile(path.name, "u", "a test", digest, "clip:tiny:openai")
    assert set(weights.load_clip_state_dict(path, published)) == {"weight", "bias"}


def test_clip_entry_and_cli_check(tmp_path, cache, capsys):
    spec = weights.entry("clip:ViT-B-32:laion2b_s34b_b79k")
    assert spec.filename == "open_clip_ViT-B-32_laion2b_s34b_b79k.bin"
    assert spec.url.startswith("https://huggingface.co/laion/")
    assert weights.entry("clip:ViT-L-14:openai").url.startswith("https://openaipublic")
    with pytest.raises(ValueError, match="no pretrained tag"):
        weights.entry("clip:ViT-B-32:nonsense")
    (cache / spec.filename).write_bytes(b"x")
    main(["weights", "check", "clip:ViT-B-32:laion2b_s34b_b79k"])
    assert "UNCHECKED" in capsys.readouterr().out  # no published digest: present, not verified


# -- the Hugging Face cache (issue 19) ----------------------------------------------------------

HUB_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


@pytest.fixture
def hf_cache(tmp_path, cache, monkeypatch) -> Path:
    """An empty Hugging Face cache (``HF_HUB_CACHE``) beside the empty weights directories."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path / "hf"


def test_clip_entries_name_their_hub_home():
    openai = weights.entry("clip:ViT-L-14:openai")  # open_clip's hf_hub: state dicts from timm
    assert openai.hub_repo == "timm/vit_large_patch14_clip_224.openai"
    assert openai.hub_files == HUB_NAMES
    assert weights.hub_copy(openai, HUB_NAMES[1]).sha256 is None  # OpenAI's digest: another file
    laion = weights.entry("clip:ViT-B-32:laion2b_s34b_b79k")
    assert laion.hub_repo == "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"
    assert laion.url == weights.HUB_URL.format(laion.hub_repo, HUB_NAMES[1])
    assert not any(spec.hub_repo for spec in weights.REGISTRY.values())  # not on the Hub as such


def test_find_looks_in_the_hugging_face_cache_last(hf_cache, cache):
    spec = weights.WeightsFile("mine.bin", "https://example.invalid/mine.bin", "a test", None,
                               "mine", "cm-test/clip", HUB_NAMES)  # fmt: skip
    with pytest.raises(FileNotFoundError) as info:
        weights.find(spec)
    message = str(info.value)
    assert str(cache) in message and str(hf_cache / "models--cm-test--clip") in message
    assert f"`hf download cm-test/clip {HUB_NAMES[1]}`" in message
    snapshot = write_hf_snapshot(hf_cache, "cm-test/clip", {HUB_NAMES[1]: b"bin"})
    assert weights.find(spec) == snapshot / HUB_NAMES[1]
    snapshot = write_hf_snapshot(hf_cache, "cm-test/clip", dict.fromkeys(HUB_NAMES, b"x"))
    assert weights.find(spec) == snapshot / HUB_NAMES[0]  # safetensors first, as open_clip
    (cache / "mine.bin").write_bytes(b"mine")
    assert weights.find(spec) == cache / "mine.bin"  # CM_WEIGHTS first


def test_a_hub_copy_must_match_a_published_digest(hf_cache, monkeypatch, capsys):
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buffer)
    data = buffer.getvalue()
    url = weights.HUB_URL.format("cm-test/trunk", "trunk.pth")  # the published file is the Hub's
    spec = weights.WeightsFile("trunk-0.pth", url, "a test", "0" * 64, "trunk", "cm-test/trunk",
                               ("trunk.pth",))  # fmt: skip
    monkeypatch.setitem(weights.REGISTRY, "trunk", spec)
    path = write_hf_snapshot(hf_cache, "cm-test/trunk", {"trunk.pth": data}) / "trunk.pth"
    with pytest.raises(ValueError, match=f"'{path}'.*does not match the published SHA-256"):
        weights.load_state_dict("trunk")
    out = fails(["weights", "check", "trunk"], "trunk", capsys)
    assert re.search(rf"trunk\s+CORRUPT\s+{path}", out)
    digest = hashlib.sha256(data).hexdigest()
    monkeypatch.setitem(weights.REGISTRY, "trunk", dataclasses.replace(spec, sha256=digest))
    assert torch.equal(weights.load_state_dict("trunk")["w"], torch.ones(2))
    assert weights.fetch("trunk") == path  # a good Hub copy: nothing to download
    main(["weights", "check", "trunk"])
    assert re.search(rf"trunk\s+ok\s+{path}", capsys.readouterr().out)


def test_open_clip_from_the_hugging_face_cache(tmp_path, hf_cache, monkeypatch, capsys):
    import open_clip
    from safetensors.torch import save

    model = tiny_open_clip("cm-test-hub-clip", tmp_path / "w2", monkeypatch)
    (tmp_path / "w2" / weights.clip_weights("cm-test-hub-clip", "random").filename).unlink()
    published = f"https://openaipublic.azureedge.net/clip/models/{'1' * 64}/tiny.pt"
    pcfg = open_clip.pretrained._pcfg(url=published, hf_hub="cm-test/tiny-clip/")
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "cm-test-hub-clip", {"random": pcfg})
    spec = weights.entry("clip:cm-test-hub-clip:random")
    assert spec.sha256 == "1" * 64 and spec.hub_repo == "cm-test/tiny-clip"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    write_hf_snapshot(hf_cache, "cm-test/tiny-clip", {HUB_NAMES[0]: save(state)})
    clip, _ = weights.load_open_clip("cm-test-hub-clip", "random")  # unchecked: another file
    assert all(torch.equal(v, state[k]) for k, v in clip.state_dict().items())
    main(["weights", "check", "clip:cm-test-hub-clip:random"])
    out = capsys.readouterr().out
    assert re.search(r"UNCHECKED .*\(no published SHA-256, Hugging Face cache copy\)", out)
    # a TorchScript archive in the cache is never opened, even for an entry with OpenAI's digest
    archive = tmp_path / "ts.bin"
    torch.jit.save(torch.jit.script(nn.Linear(2, 3)), archive)
    shutil.rmtree(hf_cache)
    write_hf_snapshot(hf_cache, "cm-test/tiny-clip", {HUB_NAMES[1]: archive.read_bytes()})
    with pytest.raises(ValueError, match="TorchScript archive, which runs code"):
        weights.load_open_clip("cm-test-hub-clip", "random")
