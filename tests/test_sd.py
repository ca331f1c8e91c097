"""Stable Diffusion Diffusion2GAN: the SD U-Net discriminator, the trainable SD generator, text
mix-and-match, and configs/d2g_sd15.yaml end to end on tiny random diffusers / open_clip models."""

import json
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from helpers import WIDTH, write_sd_pairs
from PIL import Image

from cm.checkpoint import load_checkpoint
from cm.cli import main
from cm.objectives.diffusion2gan import swap_contexts

diffusers = pytest.importorskip("diffusers")
CONFIG = Path(__file__).parents[1] / "configs" / "d2g_sd15.yaml"
HEADS = ("skip_heads", "mid_heads", "dec_heads")


@pytest.fixture
def sd_disc(tiny_sd):
    from cm.networks.sd_discriminator import SDDiscriminator

    torch.manual_seed(0)
    return SDDiscriminator(str(tiny_sd), num_groups=8)


def test_sd_discriminator_walks_the_unet_exactly(tiny_sd, sd_disc):
    """The explicit block walk reproduces UNet2DConditionModel.forward up to its output layers."""
    from cm.networks.stable_diffusion import StableDiffusionDenoiser

    teacher = StableDiffusionDenoiser(str(tiny_sd), load_vae=False)
    unet, seen = teacher.net.unet, {}
    unet.mid_block.register_forward_hook(lambda m, a, out: seen.update(mid=out))
    unet.conv_norm_out.register_forward_hook(lambda m, a, out: seen.update(dec=a[0]))
    x, z, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.randn(2, 5, WIDTH)
    c_in = 1 / math.sqrt(1 + sd_disc.sigma**2)
    assert sd_disc.sigma == pytest.approx(teacher.sigmas[200].item())  # VP sigma of timestep 200
    with torch.no_grad():
        unet(c_in * x, torch.tensor([200.0, 200.0]), encoder_hidden_states=ctx)
        # zero-initialised injections: D's features are the teacher's whatever z is
        emb = sd_disc._embed(torch.full((2,), sd_disc.c_noise()), ctx)
        inject = {}

        def record(i, h):
            inject[i] = h.shape[-1]
            return sd_disc.z_in(z) + h if i == 0 else h

        skips, mid, dec = sd_disc._features(c_in * x, emb, record)
    torch.testing.assert_close(mid, seen["mid"])
    torch.testing.assert_close(dec[8], seen["dec"])
    assert sorted(skips) == sorted(dec) == [4, 8] and inject == {0: 8, 1: 4}
    assert not any("conv_out" in k or "conv_norm_out" in k for k in sd_disc.state_dict())


def test_sd_discriminator_readouts_gradients_and_teacher_copy(tiny_sd, sd_disc):
    from cm.networks.stable_diffusion import StableDiffusionDenoiser

    x, z, ctx = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.randn(3, 5, WIDTH)
    with torch.no_grad():  # zero-init z_in / x_in would hide missing gradients: perturb them
        for conv in [sd_disc.z_in, *sd_disc.x_in]:
            conv.weight.normal_(0, 0.1)
    logits = sd_disc(x, z, ctx)
    assert [tuple(m.shape) for m in logits] == [(3, 1, 4, 4)] * 3 + [(3, 1, 8, 8)] * 3
    sum(m.mean() for m in logits).backward()
    for name in HEADS:
        for head in getattr(sd_disc, name):
            assert head.conv.weight.grad.abs().sum() > 0, name
    for conv in [sd_disc.z_in, *sd_disc.x_in]:
        assert conv.weight.grad.abs().sum() > 0
    # the text reaches D through the U-Net's cross-attention
    with torch.no_grad():
        other = sd_disc(x, z, torch.randn(3, 5, WIDTH))
    assert not torch.allclose(other[-1], logits[-1])
    with pytest.raises(ValueError, match=r"text token embeddings \[N, L, D\]"):
        sd_disc(x, z, torch.randn(3, WIDTH))

    teacher = StableDiffusionDenoiser(str(tiny_sd), load_vae=False)
    with torch.no_grad():
        for p in sd_disc.net.parameters():
            p.add_(1.0)
    sd_disc.init_from(teacher)
    unet_state = teacher.net.unet.state_dict()
    for k, v in sd_disc.net.unet.state_dict().items():
        torch.testing.assert_close(v, unet_state[k])


def test_trainable_sd_generator_keeps_vae_frozen(tiny_sd):
    from cm.networks.stable_diffusion import StableDiffusionDenoiser

    G = StableDiffusionDenoiser(str(tiny_sd), trainable=True).train()
    assert all(p.requires_grad for p in G.net.parameters()) and G.net.training
    assert not any(p.requires_grad for p in G.vae.parameters()) and not G.vae.training
    teacher = StableDiffusionDenoiser(str(tiny_sd)).train()  # a teacher stays frozen in eval
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    with pytest.raises(ValueError, match="bf16-mixed"):
        StableDiffusionDenoiser(str(tiny_sd), dtype="float16", trainable=True)


def test_swap_contexts_pairs_real_images_with_other_captions():
    n = 6
    x_real, x_fake = torch.randn(n, 4, 2, 2), torch.randn(n, 4, 2, 2)
    labels = torch.arange(n, dtype=torch.float32)[:, None, None].expand(n, 3, 2).clone()
    mixed = torch.tensor([True, False, True, True, False, True])
    fake, ctx = swap_contexts(x_real, x_fake, labels, mixed, torch.Generator().manual_seed(0))
    swapped = [0, 3]  # every other mixed row
    for i in range(n):
        if i in swapped:  # its own real image, another row's caption
            assert torch.equal(fake[i], x_real[i]) and ctx[i, 0, 0] != i
        else:  # untouched: the mix-and-match or generated image with its own caption
            assert torch.equal(fake[i], x_fake[i]) and ctx[i, 0, 0] == i
    assert torch.equal(labels[:, 0, 0], torch.arange(n, dtype=torch.float32))  # not in place
    same = swap_contexts(x_real, x_fake, labels, torch.zeros(n, dtype=torch.bool))
    assert same[0] is x_fake and same[1] is labels


def test_d2g_sd15_config_parses(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIG), "--print_config"])
    assert exit_info.value.code == 0
    out = yaml.safe_load(capsys.readouterr().out)
    model = out["model"]["init_args"]
    assert model["discriminator"]["class_path"].endswith("SDDiscriminator")
    assert model["distance"]["class_path"].endswith("ELatentLPIPS")
    assert out["trainer"]["strategy"] == "ddp_find_unused_parameters_true"
    assert out["trainer"]["precision"] == "bf16-mixed" and out["trainer"]["devices"] == 8


class GradProbe(L.Callback):
    """Records, per optimizer step, which D parts got gradients, and the logged losses."""

    def __init__(self, out: str) -> None:
        self.out, self.steps, self.metrics = out, [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:  # noqa: D102
        D = pl_module.discriminator
        if optimizer is not trainer.optimizers[1]:
            return

        def got(conv):  # the weights (a head's scalar bias can cancel to 0 in bf16 at init)
            return conv.weight.grad is not None and bool(conv.weight.grad.abs().sum() > 0)

        heads = {name: [got(h.conv) for h in getattr(D, name)] for name in HEADS}
        self.steps.append({**heads, "z_in": got(D.z_in), "x_in": [got(c) for c in D.x_in]})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: D102
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})

    def on_train_end(self, trainer, pl_module) -> None:  # noqa: D102
        z, x, labels = next(iter(trainer.datamodule.train_dataloader()))
        with torch.no_grad():
            logits = pl_module.discriminator(x, z, labels)
        shapes = [list(m.shape[-2:]) for m in logits]
        report = {"steps": self.steps, "metrics": self.metrics, "shapes": shapes}
        Path(self.out).write_text(json.dumps(report))


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_d2g_sd15_tiny_end_to_end(tmp_path, tiny_sd, tiny_text, precision):
    """configs/d2g_sd15.yaml in miniature: text pairs by cm predict, then cm fit with SD G and D."""
    root, _ = write_sd_pairs(tmp_path, tiny_sd, "a cat\na dog\na red car\n")

    run, probe = tmp_path / "run", tmp_path / "probe.json"
    encoder = {"model": "cm-test-tiny-text-clip", "pretrained": "random", "max_length": 8}
    override = {
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "strategy": "auto",
            "precision": precision,  # the config's bf16-mixed too: autocast through D and R1
            "max_steps": 2,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(run),
            "logger": False,
            "callbacks": [
                {"class_path": "test_sd.GradProbe", "init_args": {"out": str(probe)}},
                {
                    "class_path": "cm.training.SampleGrid",
                    "init_args": {"every_n_steps": 0, "num": 4, "final_num": 4, "batch_size": 4},
                },
            ],
        },
        "model": {
            "init_args": {
                "denoiser": {"init_args": {"path": str(tiny_sd)}},
                "distance": {"init_args": {"path": None, "widths": [8, 8, 8, 8, 8]}},
                "discriminator": {"init_args": {"path": str(tiny_sd), "num_groups": 8}},
                "gan_start": 0,
                "r1_interval": 1,
                "ema": {"class_path": "cm.ema.EMA", "init_args": {"decay": 0.9}},
            }
        },
        "data": {
            "init_args": {
                "root": str(root),
                "batch_size": 4,
                "num_workers": 0,
                "text_encoder": {"init_args": encoder},
            }
        },
    }
    path = tmp_path / "override.yaml"
    path.write_text(yaml.safe_dump(override))
    main(["fit", "--config", str(CONFIG), "--config", str(path)])

    report = json.loads(probe.read_text())
    # three readouts (skip, bottleneck, decoder) at each decoder resolution of the 8x8 latents
    assert report["shapes"] == [[4, 4]] * 3 + [[8, 8]] * 3
    assert len(report["steps"]) == 2
    for step in report["steps"]:  # every head, the z conv and the input convs get gradients
        assert all(all(step[name]) for name in HEADS) and step["z_in"] and all(step["x_in"])
    for metrics in report["metrics"]:
        keys = {"train/loss", "train/regression", "train/gan_g", "train/gan_d", "train/r1"}
        assert keys <= set(metrics) and all(math.isfinite(metrics[k]) for k in keys)
    assert report["metrics"][-1]["train/gan_g"] > 0  # G got the adversarial term
    # sample grids: the pairs' prompts, one step, decoded by the VAE into 16 px RGB
    samples = np.load(next(run.glob("**/samples/samples.npz")))["arr_0"]
    assert samples.shape == (4, 16, 16, 3) and samples.dtype == np.uint8
    assert Image.open(next(run.glob("**/samples/final.png"))).mode == "RGB"
    if precision == "32-true":  # the student exports as the unet/ an SD 1.5 pipeline takes
        ckpt = next(run.glob("**/checkpoints/*.ckpt"))
        main(["export", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "hf"),
              "--format", "diffusers"])
        unet = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "hf", subfolder="unet")
        student, _ = load_checkpoint(ckpt)
        expected = student.net.unet.state_dict()
        assert all(torch.equal(v, expected[k]) for k, v in unet.state_dict().items())
        assert "num_inference_steps=1" in (tmp_path / "hf" / "README.md").read_text()
