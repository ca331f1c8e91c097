"""ADM UNet (Dhariwal & Nichol 2021): published sizes on the meta device, tiny configs on CPU."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import check_checkpointed_tangent, check_checkpointing, n_params, one_hot
from torch import nn

from cm.errors import UserError
from cm.networks import ADMUNet
from cm.networks.adm import ResBlock, timestep_embedding
from cm.networks.norms import pixel_norm

# ImageNet-64 consistency models (CD/CT) and their EDM teacher, openai/consistency_models
# scripts/launch.sh: --image_size 64 --num_channels 192 --num_res_blocks 3
# --attention_resolutions 32,16,8 --num_head_channels 64 --class_cond True --learn_sigma False
# (default) --use_scale_shift_norm True --resblock_updown True; channel_mult "" -> (1, 2, 3, 4)
# for 64 px in cm/script_util.py create_model; num_heads 4 (default, unused with head channels).
# Count derived by instantiating OpenAI's cm/unet.py UNetModel (commit e32b69e) with exactly these
# flags through a copy of script_util.create_model in a scratch dir, sum(p.numel()).
IMAGENET64_PARAMS = 295_899_267
# LSUN-256 (bedroom/cat) CD/CT, same file: --image_size 256 --num_channels 256 --num_res_blocks 2
# --attention_resolutions 32,16,8 --num_head_channels 64 --class_cond False
# --use_scale_shift_norm False --resblock_updown True; channel_mult (1, 1, 2, 2, 4, 4) for 256 px.
# Derived the same way.
LSUN256_PARAMS = 526_304_771

TINY = dict(
    img_resolution=8,
    in_channels=1,
    out_channels=1,
    model_channels=32,
    channel_mult=[1, 2],
    num_res_blocks=2,
    attention_resolutions=[4],
    num_heads=4,
    num_head_channels=-1,
)


def perturb_zero_init(net: nn.Module) -> nn.Module:
    """Give the zero-initialised layers random weights, so every path contributes."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.normal_(0.0, 0.05)
    return net


def test_imagenet64_cm_param_count():
    with torch.device("meta"):
        net = ADMUNet(
            img_resolution=64,
            in_channels=3,
            out_channels=3,
            label_dim=1000,
            model_channels=192,
            channel_mult=[1, 2, 3, 4],
            num_res_blocks=3,
            attention_resolutions=[32, 16, 8],
            num_heads=4,
            num_head_channels=64,
            dropout=0.0,
            resblock_updown=True,
            use_scale_shift_norm=True,
        )
    assert n_params(net) == IMAGENET64_PARAMS
    # The constructor defaults are this configuration, minus the class embedding.
    with torch.device("meta"):
        default = ADMUNet()
    assert n_params(default) == IMAGENET64_PARAMS - 1000 * 4 * 192


def test_lsun256_cm_param_count():
    with torch.device("meta"):
        net = ADMUNet(
            img_resolution=256,
            model_channels=256,
            channel_mult=[1, 1, 2, 2, 4, 4],
            num_res_blocks=2,
            attention_resolutions=[32, 16, 8],
            num_head_channels=64,
            resblock_updown=True,
            use_scale_shift_norm=False,
        )
    assert n_params(net) == LSUN256_PARAMS


@pytest.mark.parametrize("label_dim", [10, 0])
@pytest.mark.parametrize("resblock_updown", [True, False])
def test_tiny_digits_shapes_and_zero_output(label_dim, resblock_updown):
    net = ADMUNet(**TINY, label_dim=label_dim, resblock_updown=resblock_updown)
    assert (net.img_resolution, net.in_channels, net.out_channels) == (8, 1, 1)
    assert net.label_dim == label_dim
    x = torch.randn(5, 1, 8, 8)
    labels = one_hot(torch.arange(5), 10) if label_dim else None
    out = net(x, torch.randn(5) * 100, labels)
    assert out.shape == (5, 1, 8, 8)
    assert torch.equal(out, torch.zeros_like(out))  # zero-initialised output conv


def test_16px_rgb_shapes_and_other_resolutions():
    net = ADMUNet(
        img_resolution=16,
        model_channels=16,  # narrower than num_groups: GroupNorm falls back to gcd groups
        channel_mult=[1, 2, 2],
        num_res_blocks=1,
        attention_resolutions=[8, 4],
        num_head_channels=8,
        conv_resample=False,
        resblock_updown=False,
    )
    perturb_zero_init(net)
    assert net(torch.randn(2, 3, 16, 16), torch.randn(2)).shape == (2, 3, 16, 16)
    assert net(torch.randn(2, 3, 32, 8), torch.randn(2)).shape == (2, 3, 32, 8)
    # A scalar c_noise broadcasts over the batch.
    assert net(torch.randn(2, 3, 16, 16), torch.tensor(0.3)).shape == (2, 3, 16, 16)
    with pytest.raises(ValueError):
        ADMUNet(img_resolution=18, channel_mult=[1, 2, 2])


def test_gradients_reach_every_parameter():
    net = perturb_zero_init(ADMUNet(**TINY, label_dim=10, dropout=0.1))
    x = torch.randn(4, 1, 8, 8, requires_grad=True)
    net(x, torch.randn(4), one_hot(torch.tensor([0, 1, 2, 3]), 10)).square().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


def test_gradient_at_init_reaches_output_conv():
    net = ADMUNet(**TINY)
    net(torch.randn(2, 1, 8, 8), torch.randn(2)).sum().backward()
    assert net.out_conv.weight.grad.abs().sum() > 0


def test_batch_independence():
    net = perturb_zero_init(ADMUNet(**TINY, label_dim=10)).eval()
    x, c = torch.randn(6, 1, 8, 8), torch.randn(6) * 50
    labels = one_hot(torch.tensor([0, 3, 3, 9, 1, 5]), 10)
    with torch.no_grad():
        batch = net(x, c, labels)
        assert batch.abs().max() > 1e-3
        for i in range(6):
            alone = net(x[i : i + 1], c[i : i + 1], labels[i : i + 1])
            torch.testing.assert_close(alone, batch[i : i + 1], atol=1e-5, rtol=1e-5)


def test_conditioning_matters():
    net = perturb_zero_init(ADMUNet(**TINY, label_dim=10)).eval()
    x = torch.randn(1, 1, 8, 8)
    with torch.no_grad():
        a = net(x, torch.tensor([0.5]), one_hot(torch.tensor([2]), 10))
        b = net(x, torch.tensor([0.5]), one_hot(torch.tensor([7]), 10))
        c = net(x, torch.tensor([-3.0]), one_hot(torch.tensor([2]), 10))
        none = net(x, torch.tensor([0.5]), None)
        zeros = net(x, torch.tensor([0.5]), torch.zeros(1, 10))
    assert not torch.allclose(a, b) and not torch.allclose(a, c)
    torch.testing.assert_close(none, zeros)


def test_timestep_embedding_matches_openai_formula():
    t = torch.tensor([0.0, 1.5, -250.0, 999.0])
    for dim in (8, 9):
        emb = timestep_embedding(t, dim)
        half = dim // 2
        freqs = torch.tensor([10000 ** (-i / half) for i in range(half)])
        expected = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], 1)
        assert emb.shape == (4, dim)
        torch.testing.assert_close(emb[:, : 2 * half], expected)
        assert dim % 2 == 0 or torch.equal(emb[:, -1], torch.zeros(4))
    assert math.isclose(timestep_embedding(torch.zeros(1), 4)[0, 0].item(), 1.0)


def test_constructor_signature_is_a_yaml_schema(tmp_path):
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser()
    parser.add_class_arguments(ADMUNet, "net")
    parser.add_argument("--config", action=jsonargparse.ActionConfigFile)
    cfg = tmp_path / "net.yaml"
    cfg.write_text(
        "net:\n  img_resolution: 8\n  in_channels: 1\n  out_channels: 1\n  label_dim: 10\n"
        "  model_channels: 32\n  channel_mult: [1, 2]\n  attention_resolutions: [4]\n"
        "  num_head_channels: -1\n"
    )
    net = ADMUNet(**vars(parser.parse_args(["--config", str(cfg)]).net))
    assert net.label_dim == 10
    assert net(torch.randn(1, 1, 8, 8), torch.zeros(1), torch.zeros(1, 10)).shape == (1, 1, 8, 8)


def resblock_by_hand(block: ResBlock, x: torch.Tensor, emb: torch.Tensor, double: bool):
    """ADM's ResBlock with AdaGN (Dhariwal & Nichol 2021), optionally with sCM's double norm."""

    def pnorm(v: torch.Tensor) -> torch.Tensor:  # Karras et al. 2018, over channels
        return v / (v.square().mean(dim=1, keepdim=True) + 1e-8).sqrt()

    h = block.conv0(F.silu(block.norm0(x)))
    scale, shift = block.affine(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
    s, b = (pnorm(1 + scale), pnorm(shift)) if double else (1 + scale, shift)
    return block.skip(x) + block.conv1(F.silu(block.norm1(h) * s + b))


def test_double_norm_is_scm_equation_and_off_is_adagn():
    # Lu & Song 2024, Sec. 4.1: y = norm(h) * pnorm(s(t)) + pnorm(b(t)); off: ADM's AdaGN.
    torch.manual_seed(0)
    x, emb = torch.randn(3, 16, 4, 4), torch.randn(3, 64)
    off = perturb_zero_init(ResBlock(16, 32, 64, num_groups=8)).eval()
    on = ResBlock(16, 32, 64, num_groups=8, double_norm=True).eval()
    assert list(on.state_dict()) == list(off.state_dict())  # no parameter added
    on.load_state_dict(off.state_dict())
    with torch.no_grad():
        assert torch.equal(off(x, emb), resblock_by_hand(off, x, emb, double=False))
        torch.testing.assert_close(on(x, emb), resblock_by_hand(on, x, emb, double=True))
        assert not torch.allclose(on(x, emb), off(x, emb))
    with pytest.raises(UserError, match="use_scale_shift_norm"):
        ResBlock(16, 32, 64, use_scale_shift_norm=False, double_norm=True)


def test_pixel_norm_gives_unit_rms_and_is_scale_invariant():
    v = torch.randn(4, 32, 1, 1) * torch.tensor([0.1, 1.0, 10.0, 1e4])[:, None, None, None]
    y = pixel_norm(v)
    torch.testing.assert_close(y.square().mean(dim=1), torch.ones(4, 1, 1))
    torch.testing.assert_close(pixel_norm(7.0 * v), y)
    assert pixel_norm(v.bfloat16()).dtype == torch.bfloat16
    assert torch.equal(pixel_norm(torch.zeros(2, 8)), torch.zeros(2, 8))  # eps keeps it finite


def test_double_norm_network_ignores_the_magnitude_of_the_shift():
    # With double_norm the network sees only the direction of every AdaGN shift b(t) (pnorm);
    # scaling the shift rows of every affine layer changes ADM's output but not sCM's.
    def shift_times(net: ADMUNet, factor: float) -> ADMUNet:
        with torch.no_grad():
            for m in net.modules():
                if isinstance(m, ResBlock):
                    half = m.affine.out_features // 2
                    m.affine.weight[half:] *= factor
                    m.affine.bias[half:] *= factor
        return net

    x, c, labels = torch.randn(2, 1, 8, 8), torch.tensor([0.3, 1.2]), one_hot(torch.arange(2), 10)
    adm = perturb_zero_init(ADMUNet(**TINY, label_dim=10)).eval()
    scm = ADMUNet(**TINY, label_dim=10, double_norm=True).eval()
    scm.load_state_dict(adm.state_dict())  # strict: same keys
    with torch.no_grad():
        a, s = adm(x, c, labels), scm(x, c, labels)
        assert not torch.allclose(a, s, atol=1e-4)
        assert not torch.allclose(shift_times(adm, 5.0)(x, c, labels), a, atol=1e-4)
        torch.testing.assert_close(shift_times(scm, 5.0)(x, c, labels), s)


def test_checkpointing_keeps_keys_outputs_and_gradients():
    # Activation checkpointing (Chen et al. 2016) trades memory for recomputation only.
    nets = [
        perturb_zero_init(ADMUNet(**TINY, label_dim=10, dropout=0.1, checkpointing=c))
        for c in (False, True)
    ]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 8, 8, generator=gen)
    labels = one_hot(torch.tensor([0, 1, 2, 3]), 10)
    check_checkpointing(*nets, x, torch.randn(4, generator=gen), labels)


def test_checkpointing_keeps_the_jvp_tangent():
    nets = [perturb_zero_init(ADMUNet(**TINY, dropout=0.1, checkpointing=c)) for c in (False, True)]
    gen = torch.Generator().manual_seed(0)
    check_checkpointed_tangent(
        *nets, torch.randn(4, 1, 8, 8, generator=gen), torch.rand(4, generator=gen)
    )
