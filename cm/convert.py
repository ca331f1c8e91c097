"""Key remaps from published checkpoint layouts to ``cm.networks`` (pure functions on state dicts).

- OpenAI ``UNetModel`` (openai/guided-diffusion, openai/consistency_models ``unet.py``) ->
  ``ADMUNet``: renamed by name (``input_blocks.N.0.in_layers.2`` -> ``encoder.N.0.conv0``), the
  ``nn.Embedding`` class table transposed into the bias-free ``Linear``, guided-diffusion's 1D
  attention convolutions (``[O, I, 1]``) given their 2D ``[O, I, 1, 1]`` shape and, for its
  legacy attention order, the ``qkv`` output channels permuted from ``(heads, 3, head_dim)`` to
  ``(3, heads, head_dim)``.
- NVlabs/edm ``SongUNet`` -> ``NCSNpp``: the ``ModuleDict`` names ``enc.32x32_block0`` become
  level/index paths ``enc.0.blocks.0``; FIR filters, derived from the config, are checked and
  dropped; the augmentation embedding (training-time only) is dropped.

Every source key must land on a target key of the same shape and every target key must be
covered, or a ``ValueError`` names the key and the config to check. The target network
may live on the ``meta`` device: only its keys and shapes are read.
"""

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal

from torch import Tensor, nn

from cm.errors import UserError
from cm.networks.adm import ADMUNet, AttentionBlock
from cm.networks.ncsnpp import FIRResample, NCSNpp

AttentionOrder = Literal["qkv_first", "heads_first"]
# Checkpoint layouts that cm.checkpoint.load_denoiser reads; auto: cm or diffusers for a
# folder (whichever it holds), cm for a .ckpt.
Format = Literal["auto", "cm", "openai", "openai_legacy", "edm", "diffusers"]

ADM_HINT = (
    "check the ADMUNet config against the checkpoint's flags (model_channels, channel_mult, "
    "num_res_blocks, attention_resolutions, num_head_channels/num_heads, resblock_updown, "
    "use_scale_shift_norm, label_dim = num_classes, out_channels = 6 when learn_sigma)"
)
NCSNPP_HINT = (
    "check the NCSNpp config against EDM's SongUNet kwargs (model_channels, channel_mult, "
    "num_blocks, attn_resolutions, label_dim, embedding_type, channel_mult_noise, encoder_type, "
    "decoder_type, resample_filter)"
)

# OpenAI module path fragment -> ADMUNet fragment; keys not matched keep their name (time_embed,
# the attention's norm/qkv/proj_out, Upsample.conv).
_OPENAI_RENAMES = (
    (r"^input_blocks\.", "encoder."),
    (r"^middle_block\.", "middle."),
    (r"^output_blocks\.", "decoder."),
    (r"^out\.0\.", "out_norm."),
    (r"^out\.2\.", "out_conv."),
    (r"^label_emb\.", "label_embed."),
    (r"\.in_layers\.0\.", ".norm0."),
    (r"\.in_layers\.2\.", ".conv0."),
    (r"\.emb_layers\.1\.", ".affine."),
    (r"\.out_layers\.0\.", ".norm1."),
    (r"\.out_layers\.3\.", ".conv1."),
    (r"\.skip_connection\.", ".skip."),
    (r"\.op\.", ".conv."),  # Downsample's strided conv
)

# Inside an EDM UNetBlock: its attention parameters sit in our ``attn`` submodule.
_EDM_BLOCK_RENAMES = {"norm2": "attn.norm", "qkv": "attn.qkv", "proj": "attn.proj"}


def openai_key(key: str) -> str:
    """The ``ADMUNet`` name of an OpenAI ``UNetModel`` state-dict key (Dhariwal & Nichol 2021)."""
    for pattern, new in _OPENAI_RENAMES:
        key = re.sub(pattern, new, key)
    return key


def heads_first_to_qkv_first(t: Tensor, num_heads: int) -> Tensor:
    """Reorder fused qkv output channels ``(heads, 3, d)`` -> ``(3, heads, d)`` (dim 0 of ``t``).

    guided-diffusion's ``QKVAttentionLegacy`` reshapes ``qkv`` to ``[N * heads, 3 * d, T]`` and
    splits q, k, v inside each head; ``ADMUNet`` splits q, k, v first, like ``QKVAttention``.
    """
    rest = t.shape[1:]
    return t.reshape(num_heads, 3, -1, *rest).transpose(0, 1).reshape(t.shape)


def convert_openai(
    state: Mapping[str, Tensor], net: ADMUNet, order: AttentionOrder = "qkv_first"
) -> dict[str, Tensor]:
    """An OpenAI ``UNetModel`` state dict as ``net``'s (Dhariwal & Nichol 2021; Song et al. 2023).

    Args:
        state: the checkpoint's tensors, keyed as OpenAI's ``UNetModel``.
        net: the target network; read for its keys, shapes and attention heads only.
        order: ``qkv_first`` for openai/consistency_models and guided-diffusion models trained
            with ``--use_new_attention_order True`` (the 64x64 ImageNet model), ``heads_first``
            for guided-diffusion's legacy attention (its 128x128 and 256x256 models).

    Returns:
        The tensors keyed and shaped as ``net.state_dict()``.
    """
    heads = {
        f"{name}.qkv.": m.num_heads
        for name, m in net.named_modules()
        if isinstance(m, AttentionBlock)
    }
    target = net.state_dict()

    def remap(key: str, t: Tensor) -> tuple[str, Tensor]:
        new = openai_key(key)
        if new == "label_embed.weight":
            t = t.t()  # nn.Embedding [classes, E] -> Linear weight [E, classes]
        if new in target and t.dim() == 3 and target[new].dim() == 4:
            t = t.unsqueeze(-1)  # guided-diffusion's conv_nd(1, ...) in attention blocks
        prefix = new.rpartition(".")[0] + "."
        fits = new in target and t.shape == target[new].shape  # else _remap reports it
        if order == "heads_first" and prefix in heads and fits:
            t = heads_first_to_qkv_first(t, heads[prefix])
        return new, t

    return _remap(state, target, remap, ADM_HINT)


def edm_key(key: str, img_resolution: int, num_levels: int) -> str | None:
    """The ``NCSNpp`` name of an EDM ``SongUNet`` key (Karras et al. 2022); None: drop it.

    Args:
        key: e.g. ``enc.32x32_block0.conv0.weight`` (a leading ``model.`` is removed).
        img_resolution: the network's resolution, to turn ``16x16`` into a level index.
        num_levels: ``len(channel_mult)``; the decoder is stored coarsest level first.
    """
    key = key.removeprefix("model.")
    if key.endswith(".resample_filter") or key.startswith("map_augment."):
        return None  # FIR taps are rebuilt from the config; augment labels are training-only
    match = re.fullmatch(r"(enc|dec)\.(\d+)x\d+_([a-z_]+?)(\d*)\.(.+)", key)
    if match is None:
        return key  # map_noise / map_label / map_layer0 / map_layer1 keep their names
    part, res, kind, idx, rest = match.groups()
    level = (img_resolution // int(res)).bit_length() - 1
    if part == "dec":
        level = num_levels - 1 - level
    head, _, leaf = rest.rpartition(".")
    if head in _EDM_BLOCK_RENAMES:
        rest = f"{_EDM_BLOCK_RENAMES[head]}.{leaf}"
    paths = {
        ("enc", "conv"): "enc_in",
        ("enc", "down"): f"enc.{level}.entry.0",
        ("enc", "aux_skip"): f"enc.{level}.aux.conv",
        ("enc", "aux_residual"): f"enc.{level}.aux.conv",
        ("enc", "block"): f"enc.{level}.blocks.{idx}",
        ("dec", "in"): f"dec.{level}.entry.{idx}",
        ("dec", "up"): f"dec.{level}.entry.0",
        ("dec", "block"): f"dec.{level}.blocks.{idx}",
        ("dec", "aux_norm"): f"dec.{level}.head.norm",
        ("dec", "aux_conv"): f"dec.{level}.head.conv",
    }
    path = paths.get((part, kind))
    return key if path is None else f"{path}.{rest}"


def convert_edm(state: Mapping[str, Tensor], net: NCSNpp) -> dict[str, Tensor]:
    """An EDM ``SongUNet`` state dict as ``net``'s (Karras et al. 2022, DDPM++/NCSN++).

    Args:
        state: the tensors of EDM's network (``EDMPrecond.state_dict()``: ``model.`` prefixed,
            or the bare ``SongUNet``'s).
        net: the target network; read for its keys, shapes and FIR filter only.

    Returns:
        The tensors keyed and shaped as ``net.state_dict()``.
    """
    filters = {m.filter.shape for m in net.modules() if isinstance(m, FIRResample)}
    num_levels = len(net.enc)

    def remap(key: str, t: Tensor) -> tuple[str, Tensor] | None:
        if key.endswith(".resample_filter") and t.shape not in filters:
            raise UserError(
                f"EDM key {key!r} has a {list(t.shape)} resampling filter that the NCSNpp "
                f"config does not build: {NCSNPP_HINT}."
            )
        new = edm_key(key, net.img_resolution, num_levels)
        return None if new is None else (new, t)

    return _remap(state, net.state_dict(), remap, NCSNPP_HINT)


def _remap(
    state: Mapping[str, Tensor],
    target: Mapping[str, Tensor],
    remap: Callable[[str, Tensor], tuple[str, Tensor] | None],
    hint: str,
) -> dict[str, Tensor]:
    """Apply ``remap`` (None: drop) to every item; raise on a leftover, missing or bad key."""
    out: dict[str, Tensor] = {}
    for key, t in state.items():
        mapped = remap(key, t)
        if mapped is None:
            continue
        new, t = mapped
        if new not in target:
            raise UserError(
                f"Checkpoint key {key!r} (as {new!r}) has no place in the network: {hint}."
            )
        if t.shape != target[new].shape:
            raise UserError(
                f"Checkpoint key {key!r} becomes {new!r} of shape {list(t.shape)}, but the "
                f"network's is {list(target[new].shape)}: {hint}."
            )
        out[new] = t
    missing = [k for k in target if k not in out]
    if missing:
        raise UserError(
            f"The checkpoint has no tensor for the network's {missing[0]!r} "
            f"({len(missing)} missing in all): {hint}."
        )
    return out


def network_of(denoiser: nn.Module) -> nn.Module:
    """The raw network inside a preconditioner (its ``net``), or ``denoiser`` itself."""
    net = getattr(denoiser, "net", denoiser)
    return net if isinstance(net, nn.Module) else denoiser


def convert_state(state: dict[str, Tensor], net: nn.Module, format: Format) -> dict[str, Tensor]:
    """Remap a foreign ``state`` onto ``net`` by the key map of ``format``."""
    match format:
        case "openai" | "openai_legacy" if isinstance(net, ADMUNet):
            order = "heads_first" if format == "openai_legacy" else "qkv_first"
            return convert_openai(state, net, order)
        case "edm" if isinstance(net, NCSNpp):
            return convert_edm(state, net)
        case _:
            wanted = "cm.networks.NCSNpp" if format == "edm" else "cm.networks.ADMUNet"
            raise UserError(
                f"Format {format!r} loads into {wanted}, but the denoiser's network is a "
                f"{type(net).__name__}: fix the denoiser config or the format."
            )


def published_url(path: Path, format: Format) -> str:
    """Where a published checkpoint named like ``path`` is downloaded from ('' if unknown)."""
    name = path.name
    if re.fullmatch(r"(edm|cd|ct)_(imagenet64|bedroom256|cat256)\w*\.pt", name):
        return f" (published at https://openaipublic.blob.core.windows.net/consistency/{name})"
    if re.fullmatch(r"\d+(x\d+_diffusion\w*|_\d+_upsampler)\.pt", name):
        return (
            f" (published at https://openaipublic.blob.core.windows.net/diffusion/jul-2021/{name})"
        )
    match format:
        case "openai" | "openai_legacy":
            return " (published by openai/consistency_models and openai/guided-diffusion)"
        case "edm":
            return " (extract it from NVlabs/edm's network-snapshot-*.pkl as cm.io describes)"
        case _:
            return ""
