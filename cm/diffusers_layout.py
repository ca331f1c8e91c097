"""ADM networks in diffusers' layout: ``ADMUNet`` <-> ``UNet2DModel`` keys and configs.

diffusers stores OpenAI's consistency models (``openai/diffusers-cd_imagenet64_l2`` and friends,
``scripts/convert_consistency_to_diffusers.py``) as a ``ConsistencyModelPipeline`` folder::

    model_index.json                      {"_class_name": "ConsistencyModelPipeline", ...}
    unet/config.json                      UNet2DModel kwargs
    unet/diffusion_pytorch_model.safetensors
    scheduler/scheduler_config.json       CMStochasticIterativeScheduler kwargs

``UNet2DModel`` with ``resnet_time_scale_shift: scale_shift`` is ADM's network (Dhariwal & Nichol
2021) renamed: ``ResnetBlock2D`` is ``ResBlock`` (``norm1/conv1/time_emb_proj/norm2/conv2/
conv_shortcut``), ``Attention`` holds ``qkv`` as three ``Linear`` (``to_q/to_k/to_v``, ADM's
``(3, heads, head_dim)`` split) and ``proj_out`` as ``to_out.0``, the class table is an
``nn.Embedding``. The scheduler is the preconditioner (``cm.diffusers_io``, which reads and
writes the folders). Nothing here imports ``diffusers``: it is needed only to use an export in
diffusers, never to write or read one in cm.
"""

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cm.errors import UserError
from cm.networks.adm import ADMUNet, AttentionBlock, Downsample, ResBlock, Upsample
from cm.networks.norms import GroupNorm

INDEX, UNET, UNET_CONFIG = "model_index.json", "unet", "config.json"
DIFFUSERS_VERSION = "0.27.0"  # the oldest diffusers that reads every key written here

# ADM leaf module -> diffusers leaf module, per block kind.
_RES = {
    "norm0": "norm1",
    "conv0": "conv1",
    "affine": "time_emb_proj",
    "norm1": "norm2",
    "conv1": "conv2",
    "skip": "conv_shortcut",
}
_ATTN = {"norm": "group_norm", "proj_out": "to_out.0"}


def is_diffusers_folder(path: str | Path) -> bool:
    """Whether ``path`` is a diffusers pipeline folder (``model_index.json`` or ``unet/``)."""
    path = Path(path)
    return (path / INDEX).is_file() or (path / UNET / UNET_CONFIG).is_file()


# -- ADMUNet <-> UNet2DModel: the module paths ------------------------------------------------


def block_paths(net: ADMUNet) -> dict[str, str]:
    """``ADMUNet`` module path -> ``UNet2DModel`` module path for every block of ``net``."""
    paths = {
        "time_embed.0": "time_embedding.linear_1",
        "time_embed.2": "time_embedding.linear_2",
        "label_embed": "class_embedding",
        "encoder.0.0": "conv_in",
        "middle.0": "mid_block.resnets.0",
        "middle.1": "mid_block.attentions.0",
        "middle.2": "mid_block.resnets.1",
        "out_norm": "conv_norm_out",
        "out_conv": "conv_out",
    }
    level = j = 0
    for k, entry in enumerate(net.encoder[1:], start=1):
        if _resamples(entry[0]):
            paths[f"encoder.{k}.0"] = f"down_blocks.{level}.downsamplers.0"
            level, j = level + 1, 0
            continue
        paths[f"encoder.{k}.0"] = f"down_blocks.{level}.resnets.{j}"
        if len(entry) > 1:
            paths[f"encoder.{k}.1"] = f"down_blocks.{level}.attentions.{j}"
        j += 1
    level = j = 0
    for k, entry in enumerate(net.decoder):
        for i, layer in enumerate(entry):
            if _resamples(layer):
                name = "upsamplers.0"
            else:
                name = f"{'attentions' if isinstance(layer, AttentionBlock) else 'resnets'}.{j}"
            paths[f"decoder.{k}.{i}"] = f"up_blocks.{level}.{name}"
        if _resamples(entry[-1]):
            level, j = level + 1, 0
        else:
            j += 1
    return paths


def _resamples(layer: nn.Module) -> bool:
    """Whether ``layer`` changes the resolution (a BigGAN res block or a plain resampler)."""
    return isinstance(layer, Downsample | Upsample) or (
        isinstance(layer, ResBlock) and layer.resample != "none"
    )


def key_map(net: ADMUNet) -> dict[str, list[str]]:
    """``ADMUNet`` state-dict key -> the ``UNet2DModel`` key(s) it is stored as.

    ``qkv`` maps to three keys (``to_q``, ``to_k``, ``to_v``), every other key to one.
    """
    paths = block_paths(net)
    kinds = dict(net.named_modules())
    out: dict[str, list[str]] = {}
    for key in net.state_dict():
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            block = ".".join(parts[:cut])
            if block in paths:
                break
        else:
            raise UserError(f"ADMUNet key {key!r} has no place in diffusers' UNet2DModel.")
        leaf, param = ".".join(parts[cut:-1]), parts[-1]
        target = paths[block]
        match kinds[block]:
            case ResBlock():
                out[key] = [f"{target}.{_RES.get(leaf, leaf)}.{param}"]
            case AttentionBlock() if leaf == "qkv":
                out[key] = [f"{target}.to_{n}.{param}" for n in "qkv"]
            case AttentionBlock():
                out[key] = [f"{target}.{_ATTN.get(leaf, leaf)}.{param}"]
            case _:
                out[key] = [f"{target}.{leaf}.{param}" if leaf else f"{target}.{param}"]
    return out


def to_diffusers(net: ADMUNet) -> dict[str, Tensor]:
    """``net``'s weights as ``UNet2DModel``'s state dict (diffusers' conversion, inverted)."""
    state = net.state_dict()
    out: dict[str, Tensor] = {}
    for key, targets in key_map(net).items():
        t = state[key].detach().cpu()
        if key == "label_embed.weight":
            t = t.t()  # Linear [E, classes] -> nn.Embedding [classes, E]
        if len(targets) == 3:
            parts = t.chunk(3, dim=0)  # qkv's output channels are (3, heads, head_dim)
        else:
            parts = (t,)
        for name, part in zip(targets, parts, strict=True):
            is_attn_linear = ".to_" in name and part.dim() == 4
            out[name] = (part.flatten(1) if is_attn_linear else part).contiguous()
    return out


def from_diffusers(state: Mapping[str, Tensor], net: ADMUNet, source: str) -> dict[str, Tensor]:
    """A ``UNet2DModel`` state dict as ``net``'s; every key must be used, every shape fit."""
    target = net.state_dict()
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    for key, names in key_map(net).items():
        missing = [n for n in names if n not in state]
        if missing:
            raise UserError(
                f"'{source}' has no tensor {missing[0]!r} that the UNet config implies: the "
                "folder's config.json and weights do not belong together; re-save it."
            )
        t = torch.cat([state[n] for n in names]) if len(names) > 1 else state[names[0]]
        used.update(names)
        if key == "label_embed.weight":
            t = t.t()
        if t.dim() == 2 and target[key].dim() == 4:
            t = t[..., None, None]  # to_q/to_k/to_v/to_out Linear -> ADM's 1x1 convolutions
        if t.shape != target[key].shape:
            raise UserError(
                f"'{source}' tensor {names[0]!r} has shape {list(t.shape)} where the UNet "
                f"config implies {list(target[key].shape)}: re-save the folder."
            )
        out[key] = t
    extra = sorted(set(state) - used)
    if extra:
        raise UserError(
            f"'{source}' holds {len(extra)} tensor(s) an ADM UNet has no place for, e.g. "
            f"{extra[0]!r}: only ADM-style UNet2DModel folders (OpenAI's consistency models) "
            "load into cm."
        )
    return out


# -- ADMUNet <-> UNet2DModel: the configs -----------------------------------------------------


def unet_config(net: ADMUNet) -> dict[str, Any]:
    """The ``UNet2DModel`` config that computes what ``net`` computes, or a UserError why not."""
    _check_exportable(net)
    levels: list[dict[str, Any]] = [{"width": None, "attn": False, "n": 0}]
    for entry in net.encoder[1:]:
        if _resamples(entry[0]):
            levels.append({"width": None, "attn": False, "n": 0})
            continue
        levels[-1].update(width=entry[0].conv0.out_channels, n=levels[-1]["n"] + 1)
        levels[-1]["attn"] |= any(isinstance(m, AttentionBlock) for m in entry)
    counts = {lv["n"] for lv in levels}
    widths = [lv["width"] for lv in levels]
    if len(counts) != 1 or widths[0] != net.model_channels:
        raise UserError(
            "diffusers' UNet2DModel embeds time with block_out_channels[0] sinusoids, so the "
            "ADMUNet needs channel_mult[0] = 1 to export to diffusers."
        )
    res = next(m for m in net.modules() if isinstance(m, ResBlock))
    down = [m for m in net.encoder[1:] if _resamples(m[0])]
    updown = not down or isinstance(down[0][0], ResBlock)
    down_kind = "ResnetDownsampleBlock2D" if updown else "DownBlock2D"
    up_kind = "ResnetUpsampleBlock2D" if updown else "UpBlock2D"
    attn = [m for m in net.modules() if isinstance(m, AttentionBlock)]
    groups = next(m.num_groups for m in net.modules() if isinstance(m, GroupNorm))
    return {
        "_class_name": "UNet2DModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": net.img_resolution,
        "in_channels": net.in_channels,
        "out_channels": net.out_channels,
        "center_input_sample": False,
        "time_embedding_type": "positional",
        "flip_sin_to_cos": True,  # OpenAI's [cos, sin] order
        "freq_shift": 0,
        "down_block_types": ["AttnDownBlock2D" if lv["attn"] else down_kind for lv in levels],
        "up_block_types": ["AttnUpBlock2D" if lv["attn"] else up_kind for lv in reversed(levels)],
        "block_out_channels": widths,
        "layers_per_block": counts.pop(),
        "mid_block_scale_factor": 1,
        "downsample_padding": 1,
        "downsample_type": "resnet" if updown else "conv",
        "upsample_type": "resnet" if updown else "conv",
        "dropout": float(res.dropout.p),
        "act_fn": "silu",
        "attention_head_dim": attn[0].qkv.in_channels // attn[0].num_heads,
        "norm_num_groups": groups,
        "attn_norm_num_groups": groups,  # ADM's middle attention has a GroupNorm too
        "norm_eps": 1e-5,
        "resnet_time_scale_shift": "scale_shift" if res.use_scale_shift_norm else "default",
        "add_attention": True,
        "class_embed_type": None,
        "num_class_embeds": net.label_dim or None,
    }


def _check_exportable(net: nn.Module) -> None:
    """Raise a UserError naming the option that ``UNet2DModel`` cannot express."""
    if not isinstance(net, ADMUNet):
        raise UserError(
            f"Only ADM networks (cm.networks.ADMUNet) export to diffusers' UNet2DModel; this "
            f"denoiser's network is a {type(net).__name__}: export it with --format cm."
        )
    res = [m for m in net.modules() if isinstance(m, ResBlock)]
    attn = [m for m in net.modules() if isinstance(m, AttentionBlock)]
    groups = {m.num_groups for m in net.modules() if isinstance(m, GroupNorm)}
    heads = {m.qkv.in_channels // m.num_heads for m in attn}
    problems = [
        (net.context_dim, "context_dim (cross-attention)"),
        (net.time_embed_to is not None, "second_time (a flow map)"),
        (any(m.double_norm for m in res), "double_norm (sCM)"),
        (
            len(groups) > 1,
            f"GroupNorm group counts {sorted(groups)} that differ by width "
            "(set num_groups to their minimum)",
        ),
        (
            len(heads) > 1,
            f"attention head widths {sorted(heads)} that differ by level (set num_head_channels)",
        ),
        (
            any(isinstance(m, Downsample | Upsample) and m.conv is None for m in net.modules()),
            "conv_resample: false",
        ),
    ]
    for bad, what in problems:
        if bad:
            raise UserError(
                f"diffusers' UNet2DModel has no equivalent of this ADMUNet's {what}: export it "
                "with --format cm."
            )


def adm_init_args(config: Mapping[str, Any], source: str) -> dict[str, Any]:
    """``ADMUNet`` init_args equivalent to a ``UNet2DModel`` config, or a UserError why none."""
    widths = list(config["block_out_channels"])
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    scale_shift = config.get("resnet_time_scale_shift", "default")
    groups = int(config.get("norm_num_groups", 32))
    attn_groups = config.get("attn_norm_num_groups")
    updown = {"ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D"} & {*down, *up} or (
        config.get("downsample_type") == "resnet"
    )
    expected = {
        "time_embedding_type": "positional",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "center_input_sample": False,
        "act_fn": "silu",
        "class_embed_type": None,
        "mid_block_type": "UNetMidBlock2D",
        "add_attention": True,
        "mid_block_scale_factor": 1,
        "downsample_padding": 1,
        "time_embedding_dim": None,
    }
    for name, value in expected.items():
        if config.get(name, value) != value:
            raise UserError(
                f"'{source}' sets {name} = {config[name]!r}; cm's ADMUNet reads only ADM-style "
                f"UNet2DModel folders ({name} = {value!r})."
            )
    if not math.isclose(float(config.get("norm_eps", 1e-5)), 1e-5):
        raise UserError(f"'{source}' sets norm_eps = {config['norm_eps']}; ADM uses 1e-5.")
    known = {"AttnDownBlock2D", "ResnetDownsampleBlock2D", "DownBlock2D"}
    known_up = {"AttnUpBlock2D", "ResnetUpsampleBlock2D", "UpBlock2D"}
    if not set(down) <= known or not set(up) <= known_up or len(down) != len(up):
        raise UserError(
            f"'{source}' has block types {down} / {up}; cm reads ADM-style UNet2DModels "
            "(AttnDownBlock2D, ResnetDownsampleBlock2D, DownBlock2D and their Up twins)."
        )
    if attn_groups is None and scale_shift != "default":
        raise UserError(
            f"'{source}' sets no attn_norm_num_groups, so diffusers builds its middle attention "
            "without a GroupNorm, which ADM always has: set attn_norm_num_groups to "
            f"{groups} in the unet config.json."
        )
    if attn_groups is not None and int(attn_groups) != groups:
        raise UserError(f"'{source}' uses different GroupNorm groups for attention and resnets.")
    model_channels = widths[0]
    if any(w % model_channels for w in widths):
        raise UserError(f"'{source}' block_out_channels {widths} are not multiples of the first.")
    resolution = config.get("sample_size")
    if not isinstance(resolution, int):
        raise UserError(f"'{source}' needs a square integer sample_size, not {resolution!r}.")
    head_dim = config.get("attention_head_dim") or widths[-1]
    return {
        "img_resolution": resolution,
        "in_channels": int(config.get("in_channels", 3)),
        "out_channels": int(config.get("out_channels", 3)),
        "label_dim": int(config.get("num_class_embeds") or 0),
        "model_channels": model_channels,
        "channel_mult": [w // model_channels for w in widths],
        "num_res_blocks": int(config.get("layers_per_block", 2)),
        "attention_resolutions": [
            resolution >> i for i, kind in enumerate(down) if kind.startswith("Attn")
        ],
        "num_head_channels": int(head_dim),
        "dropout": float(config.get("dropout", 0.0)),
        "resblock_updown": bool(updown),
        "use_scale_shift_norm": scale_shift == "scale_shift",
        "num_groups": groups,
    }
