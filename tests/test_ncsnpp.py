"""DDPM++ / NCSN++ (Song et al. 2021): published sizes on the meta device, tiny configs on CPU."""

import pytest
import torch
import torch.nn.functional as F
from helpers import check_checkpointed_tangent, check_checkpointing, n_params, one_hot
from torch import nn

from cm.networks.ncsnpp import FIRResample, NCSNpp

# EDM's CIFAR-10 networks (Karras et al. 2022), NVlabs/edm train.py (commit 008a4e5):
#   --arch=ddpmpp: embedding_type positional, encoder/decoder standard, channel_mult_noise 1,
#                  resample_filter [1,1], model_channels 128, channel_mult [2,2,2]
#   --arch=ncsnpp: embedding_type fourier, encoder residual, decoder standard,
#                  channel_mult_noise 2, resample_filter [1,3,3,1], model_channels 128,
#                  channel_mult [2,2,2]
# and SongUNet's defaults (num_blocks 4, attn_resolutions [16], channel_mult_emb 4); --cond=1
# gives label_dim 10. Counts derived by instantiating EDM's training/networks.py SongUNet with
# exactly these arguments and augment_dim=0 in a scratch dir, sum(p.numel()). (EDM's released
# CIFAR-10 pickles were trained with --augment=0.12, i.e. augment_dim=9, which adds a bias-free
# 9 x noise-channels map_augment: +1,152 for DDPM++, +2,304 for NCSN++; cm has no augmentation
# conditioning.) Cross-checked against yang-song/score_sde_pytorch models/ncsnpp.py (Apache-2.0):
# NCSNpp with the NCSN++ config of openai/consistency_models_cifar10
# configs/cifar10_ve_ct_adaptive.py (nf 128, ch_mult (2,2,2), 4 res blocks, biggan, fir
# [1,3,3,1], progressive_input residual) has 56,395,523 trainable parameters (plus its frozen
# 128-entry Fourier W, a Parameter there), and DDPM++ (positional, no fir, no progressive input)
# with ch_mult (2,2,2) has 55,732,739. locuslab/ect README: DDPM++ 55.7M, NCSN++ 56.4M.
CIFAR10 = dict(img_resolution=32, in_channels=3, out_channels=3, model_channels=128)
DDPMPP = dict(
    embedding_type="positional",
    channel_mult_noise=1,
    encoder_type="standard",
    decoder_type="standard",
    resample_filter=[1, 1],
    channel_mult=[2, 2, 2],
)
NCSNPP = dict(
    embedding_type="fourier",
    channel_mult_noise=2,
    encoder_type="residual",
    decoder_type="standard",
    resample_filter=[1, 3, 3, 1],
    channel_mult=[2, 2, 2],
)
PARAMS = {
    ("ddpmpp", 0): 55_732_739,
    ("ddpmpp", 10): 55_734_147,
    ("ncsnpp", 0): 56_395_523,
    ("ncsnpp", 10): 56_398_339,
}

TINY = dict(
    img_resolution=16,
    model_channels=16,
    channel_mult=[1, 2],
    num_blocks=1,
    attn_resolutions=[8],
    dropout=0.0,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny convolutions gain nothing from intra-op threads, and on a loaded 2-core machine the
    OpenMP spin-waits make them ~20x slower; restore the thread count afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def perturb(net: nn.Module) -> nn.Module:
    """Give every parameter random values, so near-zero-initialised paths contribute."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return net


@pytest.mark.parametrize(("arch", "label_dim"), sorted(PARAMS))
def test_edm_cifar10_param_count(arch, label_dim):
    with torch.device("meta"):
        net = NCSNpp(**CIFAR10, **(DDPMPP if arch == "ddpmpp" else NCSNPP), label_dim=label_dim)
    assert n_params(net) == PARAMS[arch, label_dim]


def test_defaults_are_cifar10_ddpmpp():
    with torch.device("meta"):
        net = NCSNpp()
    assert n_params(net) == PARAMS["ddpmpp", 0]
    assert (net.img_resolution, net.in_channels, net.out_channels, net.label_dim) == (32, 3, 3, 0)


def test_ict_cifar10_param_count():
    # iCT on CIFAR-10 (Song & Dhariwal 2023): the NCSN++ of Song et al. 2023 (unconditional) with
    # Fourier scale 0.02 instead of 16 and dropout 0.3; neither changes the parameter count.
    with torch.device("meta"):
        net = NCSNpp(**CIFAR10, **NCSNPP, fourier_scale=0.02, dropout=0.3)
    assert n_params(net) == PARAMS["ncsnpp", 0]


def test_fourier_frequencies_are_a_buffer():
    net = NCSNpp(**TINY, embedding_type="fourier", fourier_scale=0.02)
    sd = net.state_dict()
    assert "map_noise.freqs" in sd and sd["map_noise.freqs"].shape == (8,)
    assert sd["map_noise.freqs"].std() < 0.1
    assert not any(k.endswith("filter") for k in sd)  # FIR filters are derived, not stored


# Every option appears at least once (1 and 3 channels, label_dim 0 and 10, both embeddings, all
# encoder and decoder types); the full product costs minutes on a busy 2-core CI box.
@pytest.mark.parametrize(
    ("in_channels", "label_dim", "embedding_type", "encoder_type", "decoder_type"),
    [
        (1, 0, "positional", "standard", "standard"),
        (3, 10, "fourier", "residual", "standard"),
        (1, 10, "positional", "skip", "skip"),
        (3, 0, "fourier", "skip", "standard"),
        (1, 0, "fourier", "residual", "skip"),
        (3, 10, "positional", "standard", "skip"),
    ],
)
def test_tiny_shapes_and_grads(in_channels, label_dim, embedding_type, encoder_type, decoder_type):
    torch.manual_seed(0)
    net = NCSNpp(
        **TINY,
        in_channels=in_channels,
        out_channels=in_channels,
        label_dim=label_dim,
        embedding_type=embedding_type,
        channel_mult_noise=2 if embedding_type == "fourier" else 1,
        encoder_type=encoder_type,
        decoder_type=decoder_type,
        resample_filter=[1, 3, 3, 1] if encoder_type == "residual" else [1, 1],
    )
    perturb(net)
    x = torch.randn(2, in_channels, 16, 16)
    labels = one_hot(torch.tensor([3, 7]), label_dim) if label_dim else None
    out = net(x, torch.tensor([-1.0, 0.5]), labels)
    assert out.shape == (2, in_channels, 16, 16)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_near_zero_output_at_init():
    # EDM's SongUNet initialises the last conv of every residual branch, the attention projection
    # and the output conv with xavier_uniform * 1e-5 (not exactly zero), zero biases.
    torch.manual_seed(0)
    net = NCSNpp(**TINY, label_dim=10)
    x = torch.randn(4, 3, 16, 16)
    out = net(x, torch.randn(4), one_hot(torch.arange(4), 10))
    assert 0 < out.abs().max() < 1e-3
    assert net.dec[-1].head.conv.weight.abs().max() < 1e-4


def test_conditioning_changes_output():
    torch.manual_seed(0)
    net = perturb(NCSNpp(**TINY, label_dim=10)).eval()
    x = torch.randn(1, 3, 16, 16).expand(2, -1, -1, -1)
    with torch.no_grad():
        a = net(x, torch.tensor([0.0, 1.0]), one_hot(torch.tensor([1, 1]), 10))
        b = net(x, torch.tensor([0.0, 0.0]), one_hot(torch.tensor([1, 2]), 10))
        # A scalar c_noise broadcasts; labels=None means all-zero label rows.
        c = net(x, torch.tensor(0.0), None)
        d = net(x, torch.zeros(2), torch.zeros(2, 10))
    assert not torch.allclose(a[0], a[1])
    assert not torch.allclose(b[0], b[1])
    torch.testing.assert_close(c, d)


def test_eval_batch_independence_and_train_dropout():
    torch.manual_seed(0)
    net = perturb(NCSNpp(**{**TINY, "dropout": 0.3}, label_dim=10, embedding_type="fourier"))
    x = torch.randn(4, 3, 16, 16)
    c_noise = torch.randn(4)
    labels = one_hot(torch.tensor([0, 1, 2, 3]), 10)
    net.eval()
    with torch.no_grad():
        full = net(x, c_noise, labels)
        parts = torch.cat(
            [net(x[i : i + 1], c_noise[i : i + 1], labels[i : i + 1]) for i in range(4)]
        )
    torch.testing.assert_close(full, parts, rtol=1e-4, atol=1e-5)
    net.train()
    with torch.no_grad():
        assert not torch.allclose(net(x, c_noise, labels), net(x, c_noise, labels))


def test_other_resolution_and_bad_configs():
    net = NCSNpp(**TINY)
    assert net(torch.randn(1, 3, 8, 24), torch.zeros(1)).shape == (1, 3, 8, 24)
    with pytest.raises(ValueError, match="divisible"):
        NCSNpp(**{**TINY, "img_resolution": 15})
    with pytest.raises(ValueError, match="encoder_type"):
        NCSNpp(**TINY, encoder_type="progressive")


def test_fir_resampling():
    x = torch.randn(2, 3, 8, 8)
    # [1, 1]: 2x2 average pooling and nearest-neighbour up-sampling.
    torch.testing.assert_close(FIRResample("down", [1, 1])(x), F.avg_pool2d(x, 2))
    torch.testing.assert_close(FIRResample("up", [1, 1])(x), F.interpolate(x, scale_factor=2.0))
    # [1, 3, 3, 1]: exact halving/doubling; a constant stays constant away from the border.
    ones = torch.ones(1, 2, 8, 8)
    down = FIRResample("down", [1, 3, 3, 1])(ones)
    up = FIRResample("up", [1, 3, 3, 1])(ones)
    assert down.shape == (1, 2, 4, 4) and up.shape == (1, 2, 16, 16)
    torch.testing.assert_close(down[..., 1:-1, 1:-1], torch.ones(1, 2, 2, 2))
    torch.testing.assert_close(up[..., 1:-1, 1:-1], torch.ones(1, 2, 14, 14))
    with pytest.raises(ValueError):
        FIRResample("none")


@pytest.mark.parametrize("encoder_type", ["standard", "residual"])
def test_checkpointing_keeps_keys_outputs_and_gradients(encoder_type):
    # Activation checkpointing (Chen et al. 2016) trades memory for recomputation only.
    args = dict(TINY, label_dim=10, dropout=0.1, encoder_type=encoder_type)
    nets = [perturb(NCSNpp(**args, checkpointing=c)) for c in (False, True)]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 16, 16, generator=gen)
    labels = F.one_hot(torch.tensor([1, 7]), 10).float()
    check_checkpointing(*nets, x, torch.randn(2, generator=gen), labels)


def test_checkpointing_keeps_the_jvp_tangent():
    nets = [perturb(NCSNpp(**{**TINY, "dropout": 0.1}, checkpointing=c)) for c in (False, True)]
    gen = torch.Generator().manual_seed(0)
    check_checkpointed_tangent(
        *nets, torch.randn(2, 3, 16, 16, generator=gen), torch.rand(2, generator=gen)
    )
