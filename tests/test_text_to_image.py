"""Text-to-image teachers from a captioned image folder: ImageDataModule(cm.data.Captions) with a
frozen text encoder, configs/edm_digits_text.yaml through cm fit, then sampling with a prompt."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import TINY_CLIP, WIDTH

from cm.cli import main
from cm.cli import run as run_cli
from cm.data import Captions
from cm.data.captions import CAPTIONS_JSONL, write_digit_captions
from cm.io import load_checkpoint
from cm.networks.text import TextEncoder
from cm.solvers import heun
from cm.solvers.sampling import Sampler, generate_text_or_latent
from cm.training import ImageDataModule

CONFIG = Path(__file__).parents[1] / "configs" / "edm_digits_text.yaml"


def test_digit_caption_folder_and_datamodule(tmp_path, tiny_text):
    root = write_digit_captions(str(tmp_path / "data"), num=24)
    lines = [json.loads(line) for line in (root / CAPTIONS_JSONL).read_text().splitlines()]
    assert len(lines) == 24 and lines[7] == {
        "file": "00000/img00000007.png",
        "text": "a handwritten digit seven",  # scikit-learn's digits 0..9 come in order first
    }
    enc = TextEncoder(TINY_CLIP, "random", max_length=8)
    dm = ImageDataModule(Captions(str(root), enc), batch_size=6)
    assert (dm.resolution, dm.channels, dm.label_dim, dm.context_dim) == (8, 1, 0, WIDTH)
    x, ctx = next(iter(dm.train_dataloader()))  # the StepStream, as for any ImageDataModule
    assert x.shape == (6, 1, 8, 8) and ctx.shape == (6, 8, WIDTH) and x.abs().max() <= 1
    torch.testing.assert_close(dm.contexts([7, 31]), enc(["a handwritten digit seven"] * 2))
    assert "text_encoder" not in dm.hparams
    with pytest.raises(ValueError, match="captioned dataset"):
        ImageDataModule("digits").contexts([0])


def test_text_teacher_fits_from_captions_and_samples_with_a_prompt(tmp_path, tiny_text):
    root = write_digit_captions(str(tmp_path / "data"), num=40)
    run = tmp_path / "run"
    net = {"context_dim": WIDTH, "model_channels": 16, "num_res_blocks": 1, "num_head_channels": 16}
    encoder = {"model": TINY_CLIP, "pretrained": "random", "max_length": 8}
    override = {
        "trainer": {
            "max_steps": 3,
            "log_every_n_steps": 1,
            "accelerator": "cpu",
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "callbacks": [],
            "default_root_dir": str(run),
            "logger": {"init_args": {"save_dir": str(run)}},
        },
        "model": {"init_args": {"denoiser": {"init_args": {"net": {"init_args": net}}}}},
        "data": {
            "init_args": {
                "dataset": {
                    "init_args": {"path": str(root), "text_encoder": {"init_args": encoder}}
                },
                "batch_size": 8,
            }
        },
    }
    path = tmp_path / "override.yaml"
    path.write_text(yaml.safe_dump(override))
    main(["fit", "--config", str(CONFIG), "--config", str(path)])
    metrics = (next(run.glob("**/metrics.csv"))).read_text()
    assert "train/loss" in metrics
    ckpt = next(run.glob("**/checkpoints/*.ckpt"))
    assert "step=3" in ckpt.name

    denoiser, _ = load_checkpoint(ckpt)
    enc = TextEncoder(TINY_CLIP, "random", max_length=8)
    sampler = Sampler(heun, num_steps=4)  # Heun on the Karras grid, as the config samples
    seven = enc(["a handwritten digit seven"] * 4)
    one = enc(["a handwritten digit one"] * 4)
    images = sampler(denoiser, range(4), (1, 8, 8), seven)
    assert images.shape == (4, 1, 8, 8) and torch.isfinite(images).all()
    # the prompt reaches the trained cross-attention: another caption, other samples
    assert not torch.allclose(images, sampler(denoiser, range(4), (1, 8, 8), one))
    # per-seed contexts, any batch size: what sample grids and Diffusion2GAN students use
    prompt = lambda seeds: enc(["a handwritten digit seven"] * len(seeds))  # noqa: E731
    batched = generate_text_or_latent(sampler, denoiser, range(4), (1, 8, 8), prompt, 3)
    torch.testing.assert_close(batched, images.clamp(-1, 1))
    with pytest.raises(ValueError, match="needs prompts"):
        generate_text_or_latent(sampler, denoiser, range(4), (1, 8, 8))

    # cm sample: the prompt and the teacher's encoder from a file, the same images
    spec = tmp_path / "encoder.yaml"
    spec.write_text(yaml.safe_dump({"class_path": "cm.networks.TextEncoder", "init_args": encoder}))
    out = tmp_path / "seven.npz"
    args = ["sample", "--ckpt_path", str(ckpt), "--num", "4", "--solver", "heun", "--steps", "4"]
    main(
        [
            *args,
            "--prompt",
            "a handwritten digit seven",
            "--text_encoder",
            str(spec),
            "--out",
            str(out),
        ]
    )
    expected = ((images.clamp(-1, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    got = torch.from_numpy(np.load(out)["arr_0"]).permute(0, 3, 1, 2)
    assert (got.int() - expected.int()).abs().max() <= 1
    with pytest.raises(ValueError, match="text-conditioned"):
        run_cli([*args, "--out", str(tmp_path / "none.npz")])
    assert not (tmp_path / "none.npz").exists()
