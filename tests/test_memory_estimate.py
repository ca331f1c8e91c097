"""scripts/memory_estimate.py: Diffusion2GAN's memory per rank, DDP vs FSDP2, on the meta device.

The script's core (``estimate``) on configs/d2g_sd15.yaml with tiny U-Net and VAE configs: the
networks are cm's real classes, and the arithmetic of the table holds (FSDP's sharded state is
DDP's over the world size, plus its buffers; activations follow the per-rank batch).
"""

import importlib.util

import pytest
import torch
import yaml
from helpers import ROOT, WIDTH, n_params

diffusers = pytest.importorskip("diffusers")

TINY_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=[16, 32],
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    layers_per_block=1,
    cross_attention_dim=WIDTH,
    attention_head_dim=4,
    norm_num_groups=8,
)
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    block_out_channels=[8, 16],
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=16,
)
WORLD_SIZES = (1, 2, 4)


def load_script():
    """scripts/memory_estimate.py as a module."""
    spec = importlib.util.spec_from_file_location(
        "memory_estimate", ROOT / "scripts" / "memory_estimate.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


@pytest.fixture(scope="module")
def tiny():
    """The script module and its estimate of the SD 1.5 config with tiny networks, batch 8."""
    script = load_script()
    config = yaml.safe_load((ROOT / "configs" / "d2g_sd15.yaml").read_text())
    parts, rows = script.estimate(
        config, TINY_UNET, TINY_VAE, world_sizes=WORLD_SIZES, global_batch=8
    )
    return script, parts, {(r.world_size, r.strategy): r for r in rows}


def test_sd15_published_sizes_on_meta():
    # The published parameter counts of SD 1.5's U-Net and VAE (diffusers' config.json files).
    script = load_script()
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**script.SD15_UNET)
        vae = diffusers.AutoencoderKL(**script.SD15_VAE)
    assert n_params(unet) == 859_520_964
    assert n_params(vae) == 83_653_863


def test_networks_are_cms_on_meta_with_the_real_counts(tiny):
    _, parts, _ = tiny
    torch.manual_seed(0)
    unet = n_params(diffusers.UNet2DConditionModel(**TINY_UNET))  # on the CPU
    g, d = parts.trainable["G"], parts.trainable["D"]
    assert type(g).__name__ == "StableDiffusionDenoiser" and type(d).__name__ == "SDDiscriminator"
    assert n_params(g) == unet == n_params(parts.ema["EMA of G"])
    # D drops the U-Net's output layers and adds injections and readout heads.
    out = diffusers.UNet2DConditionModel(**TINY_UNET)
    dropped = n_params(out.conv_norm_out) + n_params(out.conv_out)
    assert n_params(d) > unet - dropped
    assert n_params(parts.frozen["VAE"]) == n_params(diffusers.AutoencoderKL(**TINY_VAE))
    assert all(p.device.type == "meta" for net in (g, d) for p in net.parameters())


def largest_unit(net: torch.nn.Module) -> int:
    """By hand, the parameters of the largest FSDP unit of G or D (cm.training.FSDP's blocks:
    the U-Net's down/up blocks and mid-block items, D's injection convs and readout heads)."""
    unet = net.net.unet
    units = [*unet.down_blocks, *unet.up_blocks, *unet.mid_block.attentions]
    units += [*unet.mid_block.resnets]
    for name in ("x_in", "skip_heads", "mid_heads", "dec_heads"):
        units += list(getattr(net, name, []))
    return max(n_params(u) for u in units)


def test_fsdp_state_is_ddp_state_over_world_plus_buffers(tiny):
    script, parts, rows = tiny
    trained = sum(4 * n_params(net) for net in parts.trainable.values())  # fp32
    for net in parts.trainable.values():
        root, units = script.fsdp_units(net)
        assert root + sum(units) == 4 * n_params(net) and root == 0  # all inside units
    buffers = 3 * 4 * max(largest_unit(net) for net in parts.trainable.values())
    for world in WORLD_SIZES:
        ddp, fsdp = rows[world, "ddp"], rows[world, "fsdp"]
        assert ddp.state["parameters"] == ddp.state["gradients"] == trained
        assert ddp.state["Adam"] == 2 * trained and ddp.state["buffers"] == trained
        for key in ("parameters", "gradients", "Adam"):
            assert fsdp.state[key] == pytest.approx(ddp.state[key] / world)
        assert fsdp.state["buffers"] == buffers
        # Replicated under both: G's evaluation EMA (as cm.training.FSDP keeps it) and the
        # frozen networks.
        assert fsdp.state["EMA"] == ddp.state["EMA"] == 4 * n_params(parts.ema["EMA of G"])
        assert fsdp.state["frozen"] == ddp.state["frozen"] > 0
        replicated = ddp.state["EMA"] + ddp.state["frozen"]
        sharded = sum(fsdp.state.values()) - fsdp.state["buffers"] - replicated
        assert sharded == pytest.approx((sum(ddp.state.values()) - trained - replicated) / world)
        # One rank's activations do not depend on the strategy; totals add up.
        assert fsdp.steps is ddp.steps and fsdp.batch == ddp.batch == 8 // world
        for c in (False, True):
            assert fsdp.total(c) == sum(fsdp.state.values()) + fsdp.activations(c)


def test_activations_follow_the_batch_and_checkpointing_saves(tiny):
    _, _, rows = tiny
    g = {w: rows[w, "ddp"].steps[False]["G step"]["activations"] for w in WORLD_SIZES}
    assert g[1] / g[2] == pytest.approx(2, rel=0.05) and g[2] / g[4] == pytest.approx(2, rel=0.05)
    steps = rows[1, "ddp"].steps
    assert steps[False]["G step"]["checkpoint inputs"] == steps[False]["G step"]["recompute"] == 0
    assert steps[True]["G step"]["checkpoint inputs"] > 0 and steps[True]["G step"]["recompute"] > 0
    assert steps[True]["G step"]["activations"] < steps[False]["G step"]["activations"]
    # bf16 copies of G's trained weights live in autocast's cache through both steps.
    assert steps[False]["D step"]["weight copies"] > steps[False]["G step"]["weight copies"] / 2
    assert rows[1, "ddp"].activations(True) < rows[1, "ddp"].activations(False)


def test_markdown_has_every_row(tiny):
    script, parts, rows = tiny
    text = script.markdown(parts, list(rows.values()))
    assert text.count("| DDP |") == text.count("| FSDP |") == len(WORLD_SIZES)
    assert "| G | trained (fp32, Adam) |" in text
