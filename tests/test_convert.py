"""Importing published checkpoints (OpenAI UNetModel, EDM SongUNet) and the frozen teacher wrapper.

The foreign key lists below are written by hand from reading openai/consistency_models
``cm/unet.py``, openai/guided-diffusion ``guided_diffusion/unet.py`` and NVlabs/edm
``training/networks.py``; each row also names, independently of ``cm.convert``, where the tensor
must land in our networks.
"""

import copy
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from cm.cli import main
from cm.convert import convert_edm, convert_openai, heads_first_to_qkv_first
from cm.io import PretrainedDenoiser, build, export, load_denoiser, read_config
from cm.networks import ADMUNet, NCSNpp
from cm.networks.adm import AttentionBlock
from cm.precond import EDMPrecond

TEACHERS = Path(__file__).parents[1] / "configs" / "teachers"
Row = tuple[str, str | None, tuple[int, ...]]  # (their key, our key or None = dropped, shape)

# -- OpenAI UNetModel ------------------------------------------------------------------------


def openai_resblock(theirs: str, ours: str, cin: int, cout: int, emb: int, ss: bool) -> list[Row]:
    rows = [
        (f"{theirs}.in_layers.0.weight", f"{ours}.norm0.weight", (cin,)),
        (f"{theirs}.in_layers.0.bias", f"{ours}.norm0.bias", (cin,)),
        (f"{theirs}.in_layers.2.weight", f"{ours}.conv0.weight", (cout, cin, 3, 3)),
        (f"{theirs}.in_layers.2.bias", f"{ours}.conv0.bias", (cout,)),
        (f"{theirs}.emb_layers.1.weight", f"{ours}.affine.weight", ((1 + ss) * cout, emb)),
        (f"{theirs}.emb_layers.1.bias", f"{ours}.affine.bias", ((1 + ss) * cout,)),
        (f"{theirs}.out_layers.0.weight", f"{ours}.norm1.weight", (cout,)),
        (f"{theirs}.out_layers.0.bias", f"{ours}.norm1.bias", (cout,)),
        (f"{theirs}.out_layers.3.weight", f"{ours}.conv1.weight", (cout, cout, 3, 3)),
        (f"{theirs}.out_layers.3.bias", f"{ours}.conv1.bias", (cout,)),
    ]
    if cin != cout:
        rows += [
            (f"{theirs}.skip_connection.weight", f"{ours}.skip.weight", (cout, cin, 1, 1)),
            (f"{theirs}.skip_connection.bias", f"{ours}.skip.bias", (cout,)),
        ]
    return rows


def openai_attention(theirs: str, ours: str, ch: int, conv_1d: bool) -> list[Row]:
    k = (1,) if conv_1d else (1, 1)  # guided-diffusion: conv_nd(1, ...); consistency_models: 2D
    return [
        (f"{theirs}.norm.weight", f"{ours}.norm.weight", (ch,)),
        (f"{theirs}.norm.bias", f"{ours}.norm.bias", (ch,)),
        (f"{theirs}.qkv.weight", f"{ours}.qkv.weight", (3 * ch, ch, *k)),
        (f"{theirs}.qkv.bias", f"{ours}.qkv.bias", (3 * ch,)),
        (f"{theirs}.proj_out.weight", f"{ours}.proj_out.weight", (ch, ch, *k)),
        (f"{theirs}.proj_out.bias", f"{ours}.proj_out.bias", (ch,)),
    ]


def openai_layout(
    image_size: int,
    in_channels: int,
    model_channels: int,
    out_channels: int,
    num_res_blocks: int,
    attention_resolutions: tuple[int, ...],  # pixels, as the command-line flags
    channel_mult: tuple[int, ...],
    num_classes: int | None,
    resblock_updown: bool,
    use_scale_shift_norm: bool,
    conv_1d: bool = False,
) -> list[Row]:
    m, emb, ss = model_channels, 4 * model_channels, use_scale_shift_norm
    attention_ds = {image_size // r for r in attention_resolutions}  # script_util's conversion
    rows: list[Row] = [
        ("time_embed.0.weight", "time_embed.0.weight", (emb, m)),
        ("time_embed.0.bias", "time_embed.0.bias", (emb,)),
        ("time_embed.2.weight", "time_embed.2.weight", (emb, emb)),
        ("time_embed.2.bias", "time_embed.2.bias", (emb,)),
    ]
    if num_classes:
        rows.append(("label_emb.weight", "label_embed.weight", (num_classes, emb)))
    ch = channel_mult[0] * m
    rows += [
        ("input_blocks.0.0.weight", "encoder.0.0.weight", (ch, in_channels, 3, 3)),
        ("input_blocks.0.0.bias", "encoder.0.0.bias", (ch,)),
    ]
    chans, ds, i = [ch], 1, 1
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            rows += openai_resblock(f"input_blocks.{i}.0", f"encoder.{i}.0", ch, mult * m, emb, ss)
            ch = mult * m
            if ds in attention_ds:
                rows += openai_attention(f"input_blocks.{i}.1", f"encoder.{i}.1", ch, conv_1d)
            chans.append(ch)
            i += 1
        if level != len(channel_mult) - 1:
            if resblock_updown:
                rows += openai_resblock(f"input_blocks.{i}.0", f"encoder.{i}.0", ch, ch, emb, ss)
            else:
                rows += [
                    (f"input_blocks.{i}.0.op.weight", f"encoder.{i}.0.conv.weight", (ch, ch, 3, 3)),
                    (f"input_blocks.{i}.0.op.bias", f"encoder.{i}.0.conv.bias", (ch,)),
                ]
            chans.append(ch)
            ds *= 2
            i += 1
    rows += openai_resblock("middle_block.0", "middle.0", ch, ch, emb, ss)
    rows += openai_attention("middle_block.1", "middle.1", ch, conv_1d)
    rows += openai_resblock("middle_block.2", "middle.2", ch, ch, emb, ss)
    j = 0
    for level, mult in reversed(list(enumerate(channel_mult))):
        for k in range(num_res_blocks + 1):
            theirs, ours = f"output_blocks.{j}", f"decoder.{j}"
            rows += openai_resblock(f"{theirs}.0", f"{ours}.0", ch + chans.pop(), mult * m, emb, ss)
            ch, n = mult * m, 1
            if ds in attention_ds:
                rows += openai_attention(f"{theirs}.1", f"{ours}.1", ch, conv_1d)
                n = 2
            if level and k == num_res_blocks:
                if resblock_updown:
                    rows += openai_resblock(f"{theirs}.{n}", f"{ours}.{n}", ch, ch, emb, ss)
                else:
                    rows += [
                        (f"{theirs}.{n}.conv.weight", f"{ours}.{n}.conv.weight", (ch, ch, 3, 3)),
                        (f"{theirs}.{n}.conv.bias", f"{ours}.{n}.conv.bias", (ch,)),
                    ]
                ds //= 2
            j += 1
    rows += [
        ("out.0.weight", "out_norm.weight", (ch,)),
        ("out.0.bias", "out_norm.bias", (ch,)),
        ("out.2.weight", "out_conv.weight", (out_channels, ch, 3, 3)),
        ("out.2.bias", "out_conv.bias", (out_channels,)),
    ]
    return rows


TINY_OPENAI = dict(
    image_size=8,
    in_channels=3,
    model_channels=32,
    out_channels=3,
    num_res_blocks=2,
    attention_resolutions=(4,),
    channel_mult=(1, 2),
    num_classes=10,
    resblock_updown=True,
    use_scale_shift_norm=True,
)
# The same network as ADMUNet constructor arguments; 16 channels per head: 4 heads at 4x4.
TINY_ADM = dict(
    class_path="cm.networks.ADMUNet",
    init_args=dict(
        img_resolution=8,
        in_channels=3,
        out_channels=3,
        label_dim=10,
        model_channels=32,
        channel_mult=[1, 2],
        num_res_blocks=2,
        attention_resolutions=[4],
        num_head_channels=16,
        resblock_updown=True,
        use_scale_shift_norm=True,
    ),
)
TINY_EDM_TEACHER = dict(
    class_path="cm.precond.EDMPrecond", init_args=dict(noise_scale=250.0, net=TINY_ADM)
)

# openai/consistency_models scripts/launch.sh, ImageNet-64 (EDM teacher, CD, CT).
IMAGENET64 = dict(
    image_size=64,
    in_channels=3,
    model_channels=192,
    out_channels=3,
    num_res_blocks=3,
    attention_resolutions=(32, 16, 8),
    channel_mult=(1, 2, 3, 4),
    num_classes=1000,
    resblock_updown=True,
    use_scale_shift_norm=True,
)


def random_state(rows: list[Row], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {key: torch.randn(shape, generator=g) for key, _, shape in rows}


def test_tiny_openai_checkpoint_lands_by_name(tmp_path):
    rows = openai_layout(**TINY_OPENAI)
    state = random_state(rows)
    torch.save(state, tmp_path / "cd_tiny.pt")
    denoiser, hparams = load_denoiser(tmp_path / "cd_tiny.pt", TINY_EDM_TEACHER, "openai")
    assert isinstance(denoiser, EDMPrecond) and not denoiser.training
    assert hparams == {"denoiser": TINY_EDM_TEACHER}
    ours = denoiser.net.state_dict()
    assert len(rows) == len(ours) == len(state)
    for theirs, key, _ in rows:
        expected = state[theirs].t() if theirs == "label_emb.weight" else state[theirs]
        assert torch.equal(ours[key], expected), (theirs, key)
    # the class table: one-hot label y adds row y of OpenAI's nn.Embedding
    y = F.one_hot(torch.tensor([7]), 10).float()
    assert torch.allclose(denoiser.net.label_embed(y)[0], state["label_emb.weight"][7])


def test_imagenet64_layout_matches_on_meta_device():
    rows = openai_layout(**IMAGENET64)
    state = {key: torch.empty(shape, device="meta") for key, _, shape in rows}
    with torch.device("meta"):
        net = build(read_config(TEACHERS / "openai_edm_imagenet64.yaml")).net
    out = convert_openai(state, net)
    assert sum(t.numel() for t in out.values()) == 295_899_267
    assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in net.state_dict().items()}
    assert sorted(key for _, key, _ in rows) == sorted(out)
    # guided-diffusion's 64x64_diffusion.pt: same flags, learn_sigma (6 outputs), 1D attn convs
    rows = openai_layout(**{**IMAGENET64, "out_channels": 6}, conv_1d=True)
    state = {key: torch.empty(shape, device="meta") for key, _, shape in rows}
    with torch.device("meta"):
        net = ADMUNet(label_dim=1000, out_channels=6)
    assert convert_openai(state, net)["out_conv.weight"].shape == (6, 192, 3, 3)


def test_cd_teacher_config_builds_published_size():
    with torch.device("meta"):
        cd = build(read_config(TEACHERS / "openai_cd_imagenet64.yaml"))
    assert (cd.sigma_min, cd.noise_scale) == (0.002, 250.0)
    assert sum(p.numel() for p in cd.parameters()) == 295_899_267


def legacy_attention(x, norm_w, norm_b, qkv_w, qkv_b, proj_w, proj_b, heads):
    """guided-diffusion's AttentionBlock with QKVAttentionLegacy, written from its description."""
    n, c, h, w = x.shape
    x = x.reshape(n, c, h * w)
    qkv = F.conv1d(F.group_norm(x, 32 if c % 32 == 0 else math.gcd(32, c), norm_w, norm_b), qkv_w)
    qkv = qkv + qkv_b[:, None]
    d = c // heads
    q, k, v = qkv.reshape(n * heads, 3 * d, h * w).split(d, dim=1)  # heads split first
    attn = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(d), dim=-1)
    a = torch.einsum("bts,bcs->bct", attn, v).reshape(n, c, h * w)
    return (x + F.conv1d(a, proj_w) + proj_b[:, None]).reshape(n, c, h, w)


def test_legacy_attention_order_is_permuted():
    torch.manual_seed(0)
    c, heads = 64, 4
    p = dict(
        norm_w=torch.randn(c),
        norm_b=torch.randn(c),
        qkv_w=torch.randn(3 * c, c, 1) / 8,
        qkv_b=torch.randn(3 * c),
        proj_w=torch.randn(c, c, 1) / 8,
        proj_b=torch.randn(c),
    )
    x = torch.randn(2, c, 4, 4)
    block = AttentionBlock(c, num_head_channels=c // heads)
    block.load_state_dict(
        {
            "norm.weight": p["norm_w"],
            "norm.bias": p["norm_b"],
            "qkv.weight": heads_first_to_qkv_first(p["qkv_w"], heads)[..., None],
            "qkv.bias": heads_first_to_qkv_first(p["qkv_b"], heads),
            "proj_out.weight": p["proj_w"][..., None],
            "proj_out.bias": p["proj_b"],
        }
    )
    with torch.no_grad():
        assert torch.allclose(block(x), legacy_attention(x, **p, heads=heads), atol=1e-5)
        # without the permutation the heads mix q, k and v: a different function
        block.qkv.weight.copy_(p["qkv_w"][..., None])
        block.qkv.bias.copy_(p["qkv_b"])
        assert not torch.allclose(block(x), legacy_attention(x, **p, heads=heads), atol=1e-3)


def test_guided_diffusion_legacy_checkpoint(tmp_path):
    rows = openai_layout(**{**TINY_OPENAI, "out_channels": 6}, conv_1d=True)
    state = random_state(rows, seed=1)
    torch.save(state, tmp_path / "gd.pt")
    net_cfg = {**TINY_ADM, "init_args": {**TINY_ADM["init_args"], "out_channels": 6}}
    config = {"class_path": "cm.precond.IDDPMPrecond", "init_args": {"net": net_cfg}}
    path = tmp_path / "iddpm.yaml"
    path.write_text(yaml.safe_dump(config))
    denoiser, _ = load_denoiser(tmp_path / "gd.pt", path, "openai_legacy")
    assert denoiser.learned_variance
    ours = denoiser.net.state_dict()
    qkv = "middle_block.1.qkv.weight"
    assert torch.equal(ours["middle.1.qkv.weight"][..., 0], heads_first_to_qkv_first(state[qkv], 4))
    assert torch.equal(
        ours["encoder.4.1.qkv.bias"],
        heads_first_to_qkv_first(state["input_blocks.4.1.qkv.bias"], 4),
    )
    assert torch.equal(
        ours["middle.1.proj_out.weight"][..., 0], state["middle_block.1.proj_out.weight"]
    )
    assert ours["out_conv.weight"].shape == (6, 64 // 2, 3, 3)


@pytest.mark.parametrize(
    "edit, match",
    [
        (
            lambda s: s.update({"input_blocks.9.0.weight": torch.zeros(1)}),
            "input_blocks.9.0.weight",
        ),
        (lambda s: s.pop("middle_block.1.qkv.bias"), "middle.1.qkv.bias"),
        (lambda s: s.update({"label_emb.weight": torch.zeros(1000, 128)}), "label_emb.weight"),
    ],
    ids=["leftover", "missing", "shape"],
)
def test_openai_mismatch_is_one_clear_error(tmp_path, edit, match):
    state = random_state(openai_layout(**TINY_OPENAI))
    edit(state)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=match) as info:
        load_denoiser(tmp_path / "bad.pt", TINY_EDM_TEACHER, "openai")
    assert "check the ADMUNet config" in str(info.value)


# -- EDM SongUNet ----------------------------------------------------------------------------


def edm_block(
    theirs: str, ours: str, cin: int, cout: int, emb: int, attn: bool, resample: bool, taps: int
) -> list[Row]:
    # EDM stores each resampling Conv2d's filter f f^T / sum(f)^2 as a buffer [1, 1, taps, taps]
    filt = (1, 1, taps, taps)
    f = [(f"{theirs}.conv0.resample_filter", None, filt)] if resample else []
    rows = [
        (f"{theirs}.norm0.weight", f"{ours}.norm0.weight", (cin,)),
        (f"{theirs}.norm0.bias", f"{ours}.norm0.bias", (cin,)),
        (f"{theirs}.conv0.weight", f"{ours}.conv0.weight", (cout, cin, 3, 3)),
        (f"{theirs}.conv0.bias", f"{ours}.conv0.bias", (cout,)),
        *f,
        (f"{theirs}.affine.weight", f"{ours}.affine.weight", (cout, emb)),
        (f"{theirs}.affine.bias", f"{ours}.affine.bias", (cout,)),
        (f"{theirs}.norm1.weight", f"{ours}.norm1.weight", (cout,)),
        (f"{theirs}.norm1.bias", f"{ours}.norm1.bias", (cout,)),
        (f"{theirs}.conv1.weight", f"{ours}.conv1.weight", (cout, cout, 3, 3)),
        (f"{theirs}.conv1.bias", f"{ours}.conv1.bias", (cout,)),
    ]
    if cin != cout or resample:  # resample_proj=True: a 1x1 skip whenever resampling
        rows += [
            (f"{theirs}.skip.weight", f"{ours}.skip.weight", (cout, cin, 1, 1)),
            (f"{theirs}.skip.bias", f"{ours}.skip.bias", (cout,)),
        ]
        if resample:
            rows.append((f"{theirs}.skip.resample_filter", None, filt))
    if attn:
        rows += [
            (f"{theirs}.norm2.weight", f"{ours}.attn.norm.weight", (cout,)),
            (f"{theirs}.norm2.bias", f"{ours}.attn.norm.bias", (cout,)),
            (f"{theirs}.qkv.weight", f"{ours}.attn.qkv.weight", (3 * cout, cout, 1, 1)),
            (f"{theirs}.qkv.bias", f"{ours}.attn.qkv.bias", (3 * cout,)),
            (f"{theirs}.proj.weight", f"{ours}.attn.proj.weight", (cout, cout, 1, 1)),
            (f"{theirs}.proj.bias", f"{ours}.attn.proj.bias", (cout,)),
        ]
    return rows


def edm_layout(
    res0: int,
    in_ch: int,
    out_ch: int,
    label_dim: int,
    augment_dim: int,
    m: int,
    channel_mult: tuple[int, ...],
    num_blocks: int,
    attn_resolutions: tuple[int, ...],
    noise_mult: int,
    fourier: bool,
    encoder: str,
    decoder: str,
    taps: int,
) -> list[Row]:
    emb, noise, levels = 4 * m, noise_mult * m, len(channel_mult)
    filt = (1, 1, taps, taps)

    def block(theirs: str, ours: str, cin: int, cout: int, attn: bool, resample: bool):
        return edm_block(theirs, ours, cin, cout, emb, attn, resample, taps)

    rows: list[Row] = [("map_noise.freqs", "map_noise.freqs", (noise // 2,))] if fourier else []
    if label_dim:
        rows += [
            ("map_label.weight", "map_label.weight", (noise, label_dim)),
            ("map_label.bias", "map_label.bias", (noise,)),
        ]
    if augment_dim:
        rows.append(("map_augment.weight", None, (noise, augment_dim)))
    rows += [
        ("map_layer0.weight", "map_layer0.weight", (emb, noise)),
        ("map_layer0.bias", "map_layer0.bias", (emb,)),
        ("map_layer1.weight", "map_layer1.weight", (emb, emb)),
        ("map_layer1.bias", "map_layer1.bias", (emb,)),
    ]
    cout, caux, skips = in_ch, in_ch, []
    for level, mult in enumerate(channel_mult):
        r = res0 >> level
        e, o = f"enc.{r}x{r}", f"enc.{level}"
        if level == 0:
            cout = m
            rows += [
                (f"{e}_conv.weight", "enc_in.weight", (cout, in_ch, 3, 3)),
                (f"{e}_conv.bias", "enc_in.bias", (cout,)),
            ]
        else:
            rows += block(f"{e}_down", f"{o}.entry.0", cout, cout, False, True)
            if encoder == "skip":
                rows += [
                    (f"{e}_aux_down.resample_filter", None, filt),
                    (f"{e}_aux_skip.weight", f"{o}.aux.conv.weight", (cout, caux, 1, 1)),
                    (f"{e}_aux_skip.bias", f"{o}.aux.conv.bias", (cout,)),
                ]
            if encoder == "residual":
                rows += [
                    (f"{e}_aux_residual.weight", f"{o}.aux.conv.weight", (cout, caux, 3, 3)),
                    (f"{e}_aux_residual.bias", f"{o}.aux.conv.bias", (cout,)),
                    (f"{e}_aux_residual.resample_filter", None, filt),
                ]
                caux = cout
        skips.append(cout)
        for idx in range(num_blocks):
            cin, cout = cout, m * mult
            attn = r in attn_resolutions
            rows += block(f"{e}_block{idx}", f"{o}.blocks.{idx}", cin, cout, attn, False)
            skips.append(cout)
    for level, mult in reversed(list(enumerate(channel_mult))):
        r = res0 >> level
        e, o = f"dec.{r}x{r}", f"dec.{levels - 1 - level}"
        if level == levels - 1:
            rows += block(f"{e}_in0", f"{o}.entry.0", cout, cout, True, False)
            rows += block(f"{e}_in1", f"{o}.entry.1", cout, cout, False, False)
        else:
            rows += block(f"{e}_up", f"{o}.entry.0", cout, cout, False, True)
        for idx in range(num_blocks + 1):
            cin, cout = cout + skips.pop(), m * mult
            attn = idx == num_blocks and r in attn_resolutions
            rows += block(f"{e}_block{idx}", f"{o}.blocks.{idx}", cin, cout, attn, False)
        if decoder == "skip" or level == 0:
            if decoder == "skip" and level < levels - 1:
                rows.append((f"{e}_aux_up.resample_filter", None, filt))
            rows += [
                (f"{e}_aux_norm.weight", f"{o}.head.norm.weight", (cout,)),
                (f"{e}_aux_norm.bias", f"{o}.head.norm.bias", (cout,)),
                (f"{e}_aux_conv.weight", f"{o}.head.conv.weight", (out_ch, cout, 3, 3)),
                (f"{e}_aux_conv.bias", f"{o}.head.conv.bias", (out_ch,)),
            ]
    return rows


TINY_NCSNPP = dict(
    img_resolution=8,
    in_channels=3,
    out_channels=3,
    label_dim=10,
    model_channels=16,
    channel_mult=[1, 2],
    num_blocks=1,
    attn_resolutions=[4],
    embedding_type="fourier",
    channel_mult_noise=2,
    encoder_type="residual",
    decoder_type="skip",
    resample_filter=[1, 3, 3, 1],
)


def test_tiny_edm_checkpoint_lands_by_name(tmp_path):
    from safetensors.torch import save_file

    rows = edm_layout(8, 3, 3, 10, 9, 16, (1, 2), 1, (4,), 2, True, "residual", "skip", 4)
    state = random_state(rows)
    f = torch.tensor([1.0, 3.0, 3.0, 1.0])
    for key, ours, _ in rows:
        if ours is None and key.endswith("resample_filter"):
            state[key] = torch.outer(f, f)[None, None] / f.sum() ** 2
    # EDMPrecond.state_dict() of EDM: the network sits under "model."
    save_file({f"model.{k}": v for k, v in state.items()}, tmp_path / "edm.safetensors")
    denoiser, _ = load_denoiser(
        tmp_path / "edm.safetensors", EDMPrecond(NCSNpp(**TINY_NCSNPP)), "edm"
    )
    ours = denoiser.net.state_dict()
    assert len(ours) == sum(1 for _, key, _ in rows if key is not None)
    for theirs, key, _ in rows:
        if key is not None:
            assert torch.equal(ours[key], state[theirs]), (theirs, key)
    # a [1, 1] filter checkpoint does not load into a [1, 3, 3, 1] network
    bad = {k: (torch.ones(1, 1, 2, 2) / 4 if k.endswith("filter") else v) for k, v in state.items()}
    save_file(bad, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="resample_filter"):
        load_denoiser(tmp_path / "bad.safetensors", EDMPrecond(NCSNpp(**TINY_NCSNPP)), "edm")


def test_edm_cifar10_layouts_match_on_meta_device():
    # EDM's cifar10-32x32-cond-vp (DDPM++) and -ve (NCSN++) networks: augment_dim 9
    for fourier, encoder, taps in [(False, "standard", [1, 1]), (True, "residual", [1, 3, 3, 1])]:
        noise_mult = 1 + fourier
        rows = edm_layout(
            32,
            3,
            3,
            10,
            9,
            128,
            (2, 2, 2),
            4,
            (16,),
            noise_mult,
            fourier,
            encoder,
            "standard",
            len(taps),
        )
        state = {key: torch.empty(shape, device="meta") for key, _, shape in rows}
        with torch.device("meta"):
            net = NCSNpp(
                label_dim=10,
                embedding_type="fourier" if fourier else "positional",
                channel_mult_noise=1 + fourier,
                encoder_type=encoder,
                resample_filter=taps,
            )
        out = convert_edm(state, net)
        assert sorted(out) == sorted(key for _, key, _ in rows if key is not None)


def test_edm_into_adm_is_a_clear_error(tmp_path):
    torch.save({"map_layer0.weight": torch.zeros(1)}, tmp_path / "edm.pt")
    with pytest.raises(ValueError, match="loads into cm.networks.NCSNpp"):
        load_denoiser(tmp_path / "edm.pt", TINY_EDM_TEACHER, "edm")


# -- PretrainedDenoiser and cm sample --------------------------------------------------------


def tiny_export(tmp_path):
    torch.manual_seed(0)
    denoiser = build(TINY_EDM_TEACHER)
    with torch.no_grad():  # give the zero-initialised output conv weights: a non-trivial F
        denoiser.net.out_conv.weight.normal_(0, 0.05)
    return denoiser, export(denoiser, tmp_path / "teacher", TINY_EDM_TEACHER)


class Student(nn.Module):
    def __init__(self, teacher: nn.Module) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.teacher = teacher


def test_pretrained_denoiser_is_frozen_and_invisible(tmp_path):
    reference, path = tiny_export(tmp_path)
    teacher = PretrainedDenoiser(str(path))
    assert teacher.state_dict() == {} and list(teacher.parameters()) == []
    assert all(not p.requires_grad for p in teacher.module.parameters())
    parent = Student(teacher)
    assert set(parent.state_dict()) == {"lin.weight", "lin.bias"}
    assert len(list(parent.parameters())) == 2
    parent.train()
    assert not teacher.training and not teacher.module.training
    x, sigma = torch.randn(3, 3, 8, 8), torch.tensor([0.1, 1.0, 10.0])
    labels = F.one_hot(torch.tensor([1, 2, 3]), 10).float()
    with torch.no_grad():
        assert torch.equal(teacher(x, sigma, labels), reference.eval()(x, sigma, labels))
    # attributes fall through to the loaded denoiser
    assert teacher.net is teacher.module.net and teacher.noise_scale == 250.0
    parent.to(torch.float64)  # .to() on the parent reaches the held module
    assert next(teacher.module.parameters()).dtype == torch.float64
    # copies (e.g. of an objective) share the frozen teacher instead of duplicating it
    twin = copy.deepcopy(parent)
    assert twin.teacher.module is teacher.module and twin.lin is not parent.lin
    assert "teacher" in repr(parent) and str(path) in repr(teacher)


def test_pretrained_denoiser_from_ckpt_and_foreign(tmp_path):
    reference, _ = tiny_export(tmp_path)
    state = reference.state_dict()
    ckpt = {
        "hyper_parameters": {"denoiser": TINY_EDM_TEACHER},
        "state_dict": {
            **{f"denoiser.{k}": torch.zeros_like(v) for k, v in state.items()},
            **{f"ema_denoiser.{k}": v for k, v in state.items()},
        },
    }
    torch.save(ckpt, tmp_path / "run.ckpt")
    ema = PretrainedDenoiser(str(tmp_path / "run.ckpt"))
    raw = PretrainedDenoiser(str(tmp_path / "run.ckpt"), ema=False)
    assert torch.equal(ema.net.out_conv.weight, reference.net.out_conv.weight)
    assert not raw.net.out_conv.weight.any()
    # a foreign file: the architecture comes as a module (jsonargparse instantiates class_path)
    torch.save(random_state(openai_layout(**TINY_OPENAI)), tmp_path / "edm_tiny.pt")
    teacher = PretrainedDenoiser(str(tmp_path / "edm_tiny.pt"), build(TINY_EDM_TEACHER), "openai")
    assert teacher.module.net.label_embed.weight.shape == (128, 10)
    # as written in a YAML config: the denoiser is a nested class_path object
    init_args = {"path": str(tmp_path / "edm_tiny.pt"), "format": "openai"}
    config = {"class_path": "cm.io.PretrainedDenoiser", "init_args": init_args}
    config["init_args"]["denoiser"] = TINY_EDM_TEACHER
    from_yaml = build(config)
    assert torch.equal(from_yaml.net.out_conv.bias, teacher.net.out_conv.bias)
    assert pickle.loads(pickle.dumps(from_yaml)).module.net.out_conv.bias.shape == (3,)


def test_loading_errors_are_clear(tmp_path):
    with pytest.raises(
        FileNotFoundError,
        match="edm_imagenet64_ema.pt' does not exist.*/consistency/edm_imagenet64_ema.pt",
    ):
        PretrainedDenoiser(str(tmp_path / "edm_imagenet64_ema.pt"), format="openai")
    with pytest.raises(FileNotFoundError, match="openaipublic.blob.core.windows.net/consistency"):
        load_denoiser(tmp_path / "cd_imagenet64_lpips.pt", TINY_EDM_TEACHER, "openai")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        PretrainedDenoiser(str(tmp_path / "teacher_dir"))
    torch.save({"a": torch.zeros(1)}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="Cannot tell the format"):
        load_denoiser(tmp_path / "x.pt")
    with pytest.raises(ValueError, match="needs the denoiser architecture"):
        load_denoiser(tmp_path / "x.pt", format="openai")
    torch.save({"net": nn.Linear(1, 1)}, tmp_path / "pickle.pt")
    with pytest.raises(ValueError, match="not a plain state dict"):
        load_denoiser(tmp_path / "pickle.pt", TINY_EDM_TEACHER, "openai")
    (tmp_path / "empty.yaml").write_text("trainer: {}\n")
    with pytest.raises(ValueError, match="holds no denoiser config"):
        load_denoiser(tmp_path / "x.pt", tmp_path / "empty.yaml", "openai")


def test_cm_sample_openai_checkpoint(tmp_path):
    torch.save(random_state(openai_layout(**TINY_OPENAI)), tmp_path / "x.pt")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(TINY_EDM_TEACHER))
    out = tmp_path / "s.npz"
    main(
        [
            "sample",
            "--ckpt_path",
            str(tmp_path / "x.pt"),
            "--format",
            "openai",
            "--denoiser",
            str(tmp_path / "cfg.yaml"),
            "--num",
            "4",
            "--steps",
            "2",
            "--solver",
            "cm.solvers.heun",
            "--device",
            "cpu",
            "--out",
            str(out),
        ]
    )
    data = np.load(out)
    assert data["arr_0"].shape == (4, 8, 8, 3) and data["arr_0"].dtype == np.uint8
