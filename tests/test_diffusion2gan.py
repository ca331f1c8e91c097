"""Diffusion2GAN: discriminator readouts and init, lazy single-sample R1, mix-and-match, the CLI."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import cpu_trainer, fit, last_ckpt, tiny_adm, tiny_ncsnpp

from cm.cli import main
from cm.networks.discriminator import ADMDiscriminator, NCSNppDiscriminator
from cm.networks.ncsnpp import NCSNpp
from cm.objectives.diffusion2gan import (
    discriminator_gan_loss,
    generator_gan_loss,
    is_lazy_step,
    mix_and_match,
    r1_penalty,
)

CONFIG = Path(__file__).parents[1] / "configs" / "d2g_digits.yaml"


@pytest.fixture
def disc():
    """A discriminator initialised from a (random) teacher network, and that teacher."""
    torch.manual_seed(0)
    teacher = tiny_adm(num_groups=8)
    with torch.no_grad():  # zero-init output layers would hide a failed copy; perturb all
        for p in teacher.parameters():
            p.add_(0.1 * torch.randn_like(p))
    d = ADMDiscriminator(tiny_adm(num_groups=8), sigma=0.5, num_groups=8)
    d.init_from(teacher)
    return d, teacher


def batch(n=4):
    """Images, noise and one-hot labels."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, 1, 8, 8, generator=g) * 2 - 1
    z = torch.randn(n, 1, 8, 8, generator=g)
    return x, z, torch.eye(10)[torch.arange(n) % 10]


def test_readouts_at_every_decoder_scale_and_gradients_reach_each_head(disc):
    d, _ = disc
    x, z, c = batch()
    logits = d(x, z, c)
    # skip, bottleneck and decoder heads at each decoder resolution (4 and 8 px)
    assert [m.shape[-1] for m in logits] == [4, 4, 4, 8, 8, 8]
    assert all(m.shape[:2] == (4, 1) for m in logits)
    generator_gan_loss(logits).sum().backward()
    heads = [*d.skip_heads, *d.mid_heads, *d.dec_heads]
    assert len(heads) == 6
    for head in heads:
        assert head.conv.weight.grad is not None and head.conv.weight.grad.abs().sum() > 0


def test_copied_weights_and_zero_init_noise_input(disc):
    d, teacher = disc
    t_state = teacher.state_dict()
    for k, v in d.net.state_dict().items():
        assert torch.equal(v, t_state[k]), k
    assert not hasattr(d.net, "out_conv")  # the U-Net's output layers are dropped
    assert all(p.abs().sum() == 0 for p in d.z_in.parameters())
    assert all(p.abs().sum() == 0 for m in d.x_in for p in m.parameters())
    x, z, c = batch()
    with torch.no_grad():
        a, b = d(x, z, c), d(x, torch.randn_like(z), c)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))  # ignores z at init
    with torch.no_grad():
        other = d(x, z, torch.eye(10)[[5, 6, 7, 8]])
    assert not torch.allclose(a[-1], other[-1])  # the class goes through the label embedding


@pytest.mark.parametrize("variant", ["ddpmpp", "ncsnpp"])
def test_ncsnpp_discriminator_reads_out_every_scale_and_starts_from_the_teacher(variant):
    extra = {}
    if variant == "ncsnpp":
        extra = {"embedding_type": "fourier", "channel_mult_noise": 2, "encoder_type": "residual"}
        extra |= {"decoder_type": "skip", "resample_filter": [1, 3, 3, 1]}

    def net() -> NCSNpp:
        return tiny_ncsnpp(dropout=0.0, **extra)

    torch.manual_seed(0)
    teacher, d = net(), NCSNppDiscriminator(net(), num_groups=8)
    d.init_from(teacher)
    t_state = teacher.state_dict()
    assert all(torch.equal(v, t_state[k]) for k, v in d.net.state_dict().items())
    x, z, c = batch()
    logits = d(x, z, c)
    assert [m.shape[-1] for m in logits] == [4, 4, 4, 8, 8, 8]
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(logits, d(x, -z, c), strict=True))
    generator_gan_loss(logits).sum().backward()
    for head in [*d.skip_heads, *d.mid_heads, *d.dec_heads]:
        assert head.conv.weight.grad.abs().sum() > 0


def test_init_from_mismatched_teacher_is_one_clear_error():
    d = ADMDiscriminator(tiny_adm(num_groups=8), num_groups=8)
    wide = tiny_adm(model_channels=32, num_groups=8)
    with pytest.raises(ValueError, match="network config"):
        d.init_from(wide)


def test_gan_losses_are_non_saturating_per_position():
    real, fake = [torch.full((2, 1, 4, 4), 3.0)], [torch.full((2, 1, 4, 4), -3.0)]
    softplus = torch.nn.functional.softplus
    assert torch.allclose(generator_gan_loss(fake), softplus(torch.tensor(3.0)).expand(2))
    expected = 2 * softplus(torch.tensor(-3.0))
    assert torch.allclose(discriminator_gan_loss(real, fake), expected.expand(2))


def test_r1_is_lazy_and_touches_one_sample(disc):
    d, _ = disc
    x, z, c = batch()
    seen = []

    def spy(x_, z_, c_):
        seen.append(x_.shape[0])
        return d(x_, z_, c_)

    x_leaf = x.clone().requires_grad_(True)
    penalty = r1_penalty(spy, x_leaf, z, c, gamma=1.0, index=2)
    assert seen == [1] and penalty > 0
    penalty.backward()
    # R1 differentiates wrt a detached copy of row `index` alone: the batch gets no gradient
    assert x_leaf.grad is None
    assert [is_lazy_step(s, 16) for s in (0, 1, 15, 16, 32)] == [True, False, False, True, True]
    assert not any(is_lazy_step(s, 0) for s in range(4))


def test_r1_penalty_equals_single_sample_gradient_norm(disc):
    d, _ = disc
    x, z, c = batch()
    xi = x[1:2].clone().requires_grad_(True)
    score = sum(m.sum() for m in d(xi, z[1:2], c[1:2]))
    (g,) = torch.autograd.grad(score, xi)
    expected = 0.5 * 0.3 * g.square().sum()
    assert torch.allclose(r1_penalty(d, x, z, c, 0.3, index=1), expected, rtol=1e-4)


def test_mix_and_match_replaces_the_fraction_with_unrelated_reals():
    n = 8
    x_real = torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, 1, 2, 2)
    x_fake = -torch.ones(n, 1, 2, 2)
    z, c = torch.randn(n, 1, 2, 2), torch.eye(10)[:n]
    g = torch.Generator().manual_seed(0)
    mixed, mask = mix_and_match(x_real, x_fake, z, c, 0.25, generator=g)
    assert int(mask.sum()) == 2
    assert torch.equal(mixed[~mask], x_fake[~mask])
    rows = mask.nonzero().flatten()
    sources = mixed[rows, 0, 0, 0].long()
    assert (sources != rows).all()  # a real image from another row: unrelated to (z_i, c_i)
    none, none_mask = mix_and_match(x_real, x_fake, z, c, 0.0)
    assert torch.equal(none, x_fake) and not none_mask.any()
    with pytest.raises(ValueError, match="mix_fraction"):
        mix_and_match(x_real, x_fake, z, c, 1.5)


def test_module_step_counts_and_lazy_r1(tmp_path, monkeypatch):
    """Direct module checks: global_step counts G only; R1 only on lazy iterations."""

    from cm.objectives import SquaredL2
    from cm.precond import EDMPrecond
    from cm.training.diffusion2gan import Diffusion2GANModule

    teacher = EDMPrecond(tiny_adm(num_groups=8))
    module = Diffusion2GANModule(
        EDMPrecond(tiny_adm(num_groups=8)),
        SquaredL2(),
        ADMDiscriminator(tiny_adm(num_groups=8), num_groups=8),
        teacher=teacher,
        lambda_gan=0.5,
        r1_interval=2,
    )
    r1_calls = []
    import cm.training.diffusion2gan as d2g

    real_r1 = d2g.r1_penalty
    monkeypatch.setattr(
        d2g, "r1_penalty", lambda *a, **k: r1_calls.append(module.iteration) or real_r1(*a, **k)
    )
    x, z, c = batch(8)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(z, x, c), batch_size=4)
    trainer = cpu_trainer(tmp_path, max_steps=3)
    d_before = [p.detach().clone() for p in module.discriminator.parameters()]
    trainer.fit(module, data)
    assert trainer.global_step == 3 and module.iteration == 3
    # the uncounted D step still updates D
    d_after = list(module.discriminator.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(d_before, d_after, strict=True))
    assert r1_calls == [0, 2]


def write_pairs(root: Path, n: int = 32) -> Path:
    """A folder of ``n`` random 8x8 class-conditional ODE pairs in ``cm predict``'s layout."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    root.mkdir(parents=True)
    name = f"pairs-000000000-{n - 1:09d}.safetensors"
    pairs = {
        "seeds": torch.arange(n),
        "z": torch.randn(n, 1, 8, 8, generator=g).half(),
        "x": (torch.rand(n, 1, 8, 8, generator=g) * 2 - 1).half(),
        "labels": torch.arange(n) % 10,
    }
    save_file(pairs, str(root / name))
    shard = {"file": name, "first_seed": 0, "count": n}
    index = {"image_shape": [1, 8, 8], "label_dim": 10, "shards": [shard], "num_pairs": n}
    (root / "index.json").write_text(json.dumps(index))
    return root


def test_fit_then_sample_through_the_cli(tmp_path):
    teacher = last_ckpt(fit(tmp_path / "teacher", 2))
    # The quickstart teacher is a ConsistencyPrecond: give G that preconditioner so cm sample
    # rebuilds it; the D config is the tiny quickstart net (tests/tiny.yaml).
    tiny = {"model_channels": 16, "num_res_blocks": 1, "num_head_channels": 16}
    root = write_pairs(tmp_path / "pairs")
    net = {"init_args": tiny}
    override = {
        "trainer": {
            "max_steps": 2,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "callbacks": [
                {
                    "class_path": "cm.training.SampleGrid",
                    "init_args": {"every_n_steps": 0, "num": 4, "final_num": 4},
                }
            ],
            "default_root_dir": str(tmp_path / "run"),
            "logger": {"init_args": {"save_dir": str(tmp_path / "run")}},
        },
        "model": {
            "init_args": {
                "denoiser": {
                    "class_path": "cm.precond.ConsistencyPrecond",
                    "init_args": {"sigma_data": 0.5, "sigma_min": 0.002, "net": net},
                },
                "discriminator": {"init_args": {"net": net, "num_groups": 8}},
                "teacher": {"init_args": {"path": str(teacher)}},
                "r1_interval": 1,
            }
        },
        "data": {"init_args": {"root": str(root), "batch_size": 8}},
    }
    path = tmp_path / "override.yaml"
    path.write_text(yaml.safe_dump(override))
    main(["fit", "--config", str(CONFIG), "--config", str(path)])
    ckpt = last_ckpt(tmp_path / "run")
    assert "step=2" in ckpt.name  # global_step counts generator iterations
    state = torch.load(ckpt, weights_only=True)
    assert state["diffusion2gan_iteration"] == 2
    assert not any(k.startswith("teacher") for k in state["state_dict"])
    assert any(k.startswith("discriminator.z_in") for k in state["state_dict"])
    out = tmp_path / "s.npz"
    main(["sample", "--ckpt_path", str(ckpt), "--num", "6", "--out", str(out)])
    images = np.load(out)["arr_0"]
    assert images.shape == (6, 8, 8, 1) and images.dtype == np.uint8


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_nonfinite_generator_step_is_skipped_or_stops(tmp_path, policy):
    """A NaN in G's loss: "skip" leaves G, its Adam moments and the EMA untouched; "stop" raises."""
    import lightning as L

    from cm.ema import EMA
    from cm.objectives import SquaredL2
    from cm.precond import EDMPrecond
    from cm.training.diffusion2gan import Diffusion2GANModule

    torch.manual_seed(0)
    module = Diffusion2GANModule(
        EDMPrecond(tiny_adm(num_groups=8)),
        SquaredL2(),
        ADMDiscriminator(tiny_adm(num_groups=8), num_groups=8),
        lambda_gan=0.5,
        r1_interval=0,
        ema=EMA(decay=0.9),
        nonfinite=policy,
    )
    x, z, c = batch(8)
    x[4:] = float("nan")  # the second batch (step 1) poisons G's regression loss
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(z, x, c), batch_size=4)
    seen = {}

    class Snapshot(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            opt_g = pl_module.optimizers()[0].optimizer
            seen[batch_idx] = (
                [p.detach().clone() for p in pl_module.denoiser.parameters()],
                [p.detach().clone() for p in pl_module.ema_denoiser.parameters()],
                [s["exp_avg"].clone() for s in opt_g.state.values()],
            )

    trainer = cpu_trainer(tmp_path, Snapshot(), max_steps=2)
    if policy == "stop":
        with pytest.raises(ValueError, match="Non-finite loss or gradients at step 1"):
            trainer.fit(module, data)
        return
    trainer.fit(module, data)
    # G's and D's steps are both skipped (the NaN reals reach D too); the skipped step counts
    assert trainer.global_step == 2 and module.skipped_steps == 2
    for before, after in zip(seen[0], seen[1], strict=True):
        assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def d2g_fit(root: Path, pairs: Path, *extra: str) -> dict:
    """Two G+D iterations of the tiny digits config from random weights, SGD; the checkpoint."""
    net = ["model_channels=16", "num_res_blocks=1", "num_head_channels=16", "num_groups=8"]
    main(
        [
            "fit",
            "--config",
            str(CONFIG),
            "--trainer.max_steps=2",
            f"--trainer.default_root_dir={root}",
            f"--trainer.logger.init_args.save_dir={root}",
            "--trainer.accelerator=cpu",
            "--trainer.enable_progress_bar=false",
            "--trainer.callbacks=[]",
            "--model.init_args.teacher=null",
            *[f"--model.init_args.denoiser.init_args.net.init_args.{a}" for a in net],
            *[f"--model.init_args.discriminator.init_args.net.init_args.{a}" for a in net],
            "--model.init_args.discriminator.init_args.num_groups=8",
            *[f"--model.init_args.{o}=torch.optim.SGD" for o in OPTIMIZERS],
            *[f"--model.init_args.{o}.init_args.lr=0.01" for o in OPTIMIZERS],
            "--model.init_args.r1_interval=1",
            "--model.init_args.mix_fraction=0.5",
            f"--data.init_args.root={pairs}",
            "--data.init_args.batch_size=8",
            *extra,
        ]
    )
    (ckpt,) = root.glob("**/checkpoints/*.ckpt")
    return torch.load(ckpt, weights_only=True)


# SGD rather than Adam, as tests/test_ddp.py: Adam turns summation-order rounding into steps.
OPTIMIZERS = ("optimizer", "discriminator_optimizer")


def test_two_process_ddp_matches_one_process(tmp_path):
    """Mix-and-match rows and partners and the R1 sample are drawn over the global batch."""
    pairs = write_pairs(tmp_path / "pairs")
    single = d2g_fit(tmp_path / "one", pairs)
    ddp = d2g_fit(
        tmp_path / "two",
        pairs,
        "--trainer.devices=2",
        "--trainer.strategy=ddp_spawn_find_unused_parameters_true",
    )
    assert single["global_step"] == ddp["global_step"] == 2
    assert any(k.startswith("discriminator.") for k in single["state_dict"])
    for key, value in single["state_dict"].items():
        torch.testing.assert_close(value, ddp["state_dict"][key], msg=key)
