"""Text conditioning: ADM cross-attention, the frozen open_clip text encoder, captions, text pairs,
and the optional Stable Diffusion teacher (tiny random models; no pretrained weights)."""

import json
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from helpers import TEXT_ADM, TINY_CLIP, WIDTH, text_pairs_config, write_sd_pairs
from PIL import Image
from safetensors import safe_open

from cm.cli import main
from cm.data.captions import CaptionFolderDataset, read_prompts
from cm.networks import ADMUNet
from cm.networks.text import TextEncoder
from cm.training.pair_data import PairDataModule
from cm.weights import clip_weights

# -- ADMUNet cross-attention -------------------------------------------------------------------


def _randomize(net: torch.nn.Module, seed: int = 0) -> None:
    """Non-zero weights everywhere (zero-initialised output layers would hide any difference)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))


def test_default_keys_unchanged_and_cross_only_adds():
    plain, text = ADMUNet(**TEXT_ADM), ADMUNet(**TEXT_ADM, context_dim=WIDTH)
    keys, text_keys = set(plain.state_dict()), set(text.state_dict())
    assert not any(".cross." in k for k in keys)
    added = text_keys - keys
    assert keys <= text_keys and added and all(".cross." in k for k in added)
    with torch.device("meta"):  # the published default is untouched as well
        assert not any("cross" in k for k in ADMUNet().state_dict())


def test_cross_attention_is_identity_at_init_and_learns():
    torch.manual_seed(0)
    plain = ADMUNet(**TEXT_ADM)
    _randomize(plain)
    net = ADMUNet(**TEXT_ADM, context_dim=WIDTH)
    missing, unexpected = net.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(".cross." in k for k in missing)
    x, c_noise = torch.randn(3, 1, 8, 8), torch.randn(3)
    context = torch.randn(3, 5, WIDTH)
    with torch.no_grad():
        torch.testing.assert_close(net(x, c_noise, context), plain(x, c_noise))

    cross = [m for m in net.modules() if type(m).__name__ == "CrossAttention"]
    assert len(cross) == 4  # at 4x4: 1 encoder, 2 decoder blocks; and the middle block
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(2):  # step 1 opens the zero proj_out; then gradients reach q, k, v
        opt.zero_grad()
        net(x, c_noise, context).square().mean().backward()
        opt.step()
    for m in cross:
        for p in (m.q.weight, m.kv.weight, m.proj_out.weight):
            assert p.grad is not None and p.grad.abs().sum() > 0
    with torch.no_grad():  # now the output depends on the text
        assert not torch.allclose(net(x, c_noise, context), net(x, c_noise, -context))


def test_class_labels_unchanged_and_context_width_checked():
    torch.manual_seed(0)
    net = ADMUNet(**TEXT_ADM, label_dim=3, context_dim=WIDTH)
    _randomize(net)
    x, c_noise, y = torch.randn(2, 1, 8, 8), torch.randn(2), torch.eye(3)[:2]
    with torch.no_grad():
        assert not torch.allclose(net(x, c_noise, y), net(x, c_noise, None))
        net(x, c_noise, torch.randn(2, 4, WIDTH))
    with pytest.raises(ValueError, match="context_dim"):
        net(x, c_noise, torch.randn(2, 4, WIDTH + 1))


# -- TextEncoder -------------------------------------------------------------------------------


def test_text_encoder_shapes_frozen_deterministic(tiny_text):
    enc = TextEncoder(TINY_CLIP, "random")
    captions = ["a red square", "a blue circle", ""]
    tokens, pooled = enc.encode(captions)
    assert tokens.shape == (3, 77, WIDTH) and pooled.shape == (3, 16)
    assert (enc.context_dim, enc.pooled_dim) == (WIDTH, 16)
    assert all(not p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training and not enc.model.training
    again, pooled_again = enc.encode(captions)
    assert torch.equal(tokens, again) and torch.equal(pooled, pooled_again)
    assert not torch.allclose(tokens[0], tokens[1])
    # pooled = CLIP's text feature; max_length keeps the first tokens (causal mask)
    clip = open_clip.create_model(TINY_CLIP)
    clip.load_state_dict(torch.load(tiny_text / clip_weights(TINY_CLIP, "random").filename))
    text = open_clip.get_tokenizer(TINY_CLIP)(captions)
    with torch.no_grad():
        torch.testing.assert_close(pooled, clip.eval().encode_text(text))
    short = TextEncoder(TINY_CLIP, "random", max_length=8)
    torch.testing.assert_close(short(captions), tokens[:, :8])
    # SD 1.x padding: same text positions and pooled feature, other padding embeddings
    sd_tokens, sd_pooled = TextEncoder(TINY_CLIP, "random", pad_with_eot=True).encode(captions)
    torch.testing.assert_close(sd_pooled, pooled)
    torch.testing.assert_close(sd_tokens[0, :5], tokens[0, :5])  # <sot> a red square <eot>
    assert not torch.allclose(sd_tokens[0, 5:], tokens[0, 5:])


def test_text_encoder_missing_weights(tiny_text, monkeypatch, tmp_path):
    monkeypatch.setenv("CM_WEIGHTS", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match=clip_weights(TINY_CLIP, "random").filename):
        TextEncoder(TINY_CLIP, "random")


# -- Captions next to an image folder ----------------------------------------------------------


def image_folder(root: Path, n: int = 3) -> list[str]:
    """``n`` random 8x8 grayscale PNGs in EDM's layout; their relative names."""
    names = []
    rng = np.random.default_rng(0)
    (root / "00000").mkdir(parents=True)
    for i in range(n):
        name = f"00000/img{i:08d}.png"
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(root / name)
        names.append(name)
    return names


@pytest.mark.parametrize("layout", ["jsonl", "imagefolder", "dataset_json", "dataset_json_list"])
def test_captions_layouts(tmp_path, layout):
    names = image_folder(tmp_path)
    texts = [f"caption {i}" for i in range(len(names))]
    match layout:
        case "jsonl" | "imagefolder":
            keys = ("file", "text") if layout == "jsonl" else ("file_name", "caption")
            lines = [
                json.dumps({keys[0]: n, keys[1]: t}) for n, t in zip(names, texts, strict=True)
            ]
            (tmp_path / "captions.jsonl").write_text("\n".join(reversed(lines)) + "\n")
        case "dataset_json":
            captions = dict(zip(names, texts, strict=True))
            (tmp_path / "dataset.json").write_text(
                json.dumps({"labels": None, "captions": captions})
            )
        case "dataset_json_list":
            captions = [list(p) for p in zip(names, texts, strict=True)]
            (tmp_path / "dataset.json").write_text(json.dumps({"captions": captions}))
    ds = CaptionFolderDataset(str(tmp_path))
    assert ds.captions == texts and ds.label_dim == 0 and len(ds) == 3
    x, caption = ds[1]
    assert x.shape == (1, 8, 8) and caption == "caption 1"


def test_captions_errors_and_encoding(tmp_path, tiny_text):
    root = tmp_path / "images"
    names = image_folder(root)
    with pytest.raises(FileNotFoundError, match="captions.jsonl"):
        CaptionFolderDataset(str(root))
    (root / "captions.jsonl").write_text(json.dumps({"file": names[0], "text": "only one"}))
    with pytest.raises(ValueError, match="miss 2 image"):
        CaptionFolderDataset(str(root))
    lines = [json.dumps({"file": n, "text": f"a picture {i}"}) for i, n in enumerate(names)]
    (root / "captions.jsonl").write_text("\n".join(lines))
    enc = TextEncoder(TINY_CLIP, "random", max_length=8)
    ds = CaptionFolderDataset(str(root), text_encoder=enc)
    batch = torch.utils.data.default_collate([ds[i] for i in range(3)])
    assert batch[1].shape == (3, 8, WIDTH)
    torch.testing.assert_close(batch[1], enc([f"a picture {i}" for i in range(3)]))


# -- ODE pairs of a text-conditioned teacher through cm predict --------------------------------


@pytest.mark.parametrize("cfg_scale", [None, 2.0])
def test_text_pairs_through_cli(tmp_path, tiny_text, cfg_scale):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"text": f"prompt {i}"}) for i in range(3)))
    assert read_prompts(str(prompts)) == ["prompt 0", "prompt 1", "prompt 2"]
    root = tmp_path / "pairs"
    config = text_pairs_config(tmp_path, root, prompts, cfg_scale)
    main(["predict", "--config", config])
    index = json.loads((root / "index.json").read_text())
    assert index["complete"] and index["label_dim"] == 0 and index["captions"].endswith(".jsonl")
    with safe_open(str(root / index["shards"][1]["file"]), framework="pt") as f:
        assert json.loads(f.metadata()["captions"]) == [f"prompt {s % 3}" for s in range(4, 8)]
        assert "labels" not in f.keys()
    mtimes = {p: p.stat().st_mtime_ns for p in root.glob("pairs-*")}
    main(["predict", "--config", config])  # resumes: nothing left to generate
    assert mtimes == {p: p.stat().st_mtime_ns for p in root.glob("pairs-*")}

    data = PairDataModule(str(root), batch_size=4)
    data.setup("fit")
    z, x, caption = data.train_set[9]
    assert z.shape == x.shape == (1, 8, 8) and caption == "prompt 0"
    enc = TextEncoder(TINY_CLIP, "random", max_length=8)
    data = PairDataModule(str(root), batch_size=4, text_encoder=enc)
    data.setup("fit")
    torch.testing.assert_close(data.train_set[9][2], enc(["prompt 0"])[0])


# -- Stable Diffusion through diffusers --------------------------------------------------------


def test_stable_diffusion_needs_diffusers(monkeypatch):
    from cm.networks.stable_diffusion import StableDiffusionDenoiser

    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ImportError
    with pytest.raises(ImportError, match=r"pip install diffusers \(the optional extra cm\[sd\]\)"):
        StableDiffusionDenoiser("nowhere")


def test_stable_diffusion_denoiser(tiny_sd):
    from cm.networks.stable_diffusion import StableDiffusionDenoiser

    D = StableDiffusionDenoiser(str(tiny_sd))
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)
    torch.testing.assert_close(D.sigmas.double(), ((1 - abar) / abar).sqrt())
    # the nearest trained timestep (in log sigma), as any discrete DDPM in cm.precond
    t = torch.tensor([0, 499, 999])
    sigma = D.sigmas[t].float() * torch.tensor([1.001, 0.999, 1.0])
    assert D.timestep(sigma).tolist() == t.tolist()
    torch.testing.assert_close(D.round_sigma(sigma), D.sigmas[t].float())

    z, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 5, WIDTH)
    s = torch.tensor([D.sigmas[10].item(), D.sigmas[700].item()])
    with torch.no_grad():
        out = D(z, s, ctx)
        eps = D.net.unet(z / (1 + s**2).sqrt()[:, None, None, None], torch.tensor([10.0, 700.0]),
                         encoder_hidden_states=ctx).sample  # fmt: skip
    torch.testing.assert_close(out, z - s[:, None, None, None] * eps)
    assert all(not p.requires_grad for p in D.parameters())
    assert (D.net.in_channels, D.net.img_resolution, D.net.label_dim) == (4, 8, 0)
    with pytest.raises(ValueError, match="text token embeddings"):
        D(z, s, None)

    images = torch.rand(2, 3, 16, 16) * 2 - 1
    latents = D.encode(images)
    assert latents.shape == (2, 4, 8, 8) and D.scaling_factor == pytest.approx(0.18215)
    decoded = D.decode(latents)
    assert decoded.shape == images.shape and decoded.abs().max() <= 1


def test_stable_diffusion_latent_pairs(tmp_path, tiny_sd, tiny_text):
    """configs/pairs_sd15.yaml in miniature: DDIM on trained timesteps, CFG, unclamped latents."""
    root, config = write_sd_pairs(tmp_path, tiny_sd, "a cat\na dog\n")
    index = json.loads((root / "index.json").read_text())
    assert index["complete"] and index["image_shape"] == [4, 8, 8] and not index["clamp"]
    assert index["sigmas"][0] > 10 and index["uncond_caption"] == ""  # SD's sigma_max ~ 14.6
    data = PairDataModule(str(root), batch_size=4)
    data.setup("fit")
    z, x, caption = data.train_set[3]
    assert z.shape == x.shape == (4, 8, 8) and caption == "a dog" and torch.isfinite(x).all()
