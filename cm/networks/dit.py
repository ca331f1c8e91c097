"""DiT and SiT: transformers on latent patches (Peebles & Xie 2023; Ma et al. 2024).

Peebles & Xie 2023 ("Scalable Diffusion Models with Transformers", Sec. 3.2): the input
``[N, C, H, W]`` (a Stable Diffusion VAE latent, 32x32x4 for ImageNet 256) is cut into
``p x p`` patches, linearly embedded to ``T = (H / p)^2`` tokens of width ``hidden_size`` plus a
fixed 2-D sin-cos positional embedding, processed by ``depth`` adaLN-Zero transformer blocks
conditioned on ``c = emb(c_noise) + emb(label)``, and mapped back to
``[N, out_channels, H, W]``. Ma et al. 2024 (SiT) train the same backbone as a flow/interpolant
model. Flow maps (MeanFlow, Geng et al. 2025) add a second time input ``c_noise_to`` with its
own embedder summed into ``c`` (``second_time``).

Architecture facts from facebookresearch/DiT ``models.py`` (CC-BY-NC 4.0) and willisma/SiT
``models.py`` (MIT); the code here is our own. Parameters carry the reference's names and shapes
(``x_embedder.proj``, ``t_embedder.mlp``, ``blocks.i.attn.qkv``, ``blocks.i.adaLN_modulation.1``,
``final_layer.linear``, ...) except the class embedding: the reference's ``(num_classes + 1)``-row
table is here ``y_embedder.proj.weight`` (its first ``num_classes`` rows, transposed, applied to
one-hot labels) and ``y_embedder.null`` (its last row, the classifier-free guidance null class).
"""

from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cm.errors import UserError
from cm.networks.checkpointing import checkpointed
from cm.networks.embeddings import second_time_embedding, timestep_embedding


def sincos_pos_embed_2d(dim: int, grid: int) -> Tensor:
    """Fixed 2-D sin-cos positional embedding ``[grid^2, dim]`` (Peebles & Xie 2023, Sec. 3.2).

    As MAE/DiT: the first ``dim / 2`` channels encode a token's column, the last ``dim / 2`` its
    row, each as ``[sin(p w_k), cos(p w_k)]`` with ``w_k = 10000^(-k / (dim / 4))``; tokens in
    row-major order (the order of the flattened patch convolution). Computed in float64.
    """
    quarter = dim // 4
    omega = 10000.0 ** (-torch.arange(quarter, dtype=torch.float64) / quarter)  # [dim / 4]
    pos = torch.arange(grid, dtype=torch.float64)
    row, col = torch.meshgrid(pos, pos, indexing="ij")  # each [grid, grid]

    def embed(p: Tensor) -> Tensor:
        angles = p.reshape(-1, 1) * omega  # [grid^2, dim / 4]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([embed(col), embed(row)], dim=1).float()


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """Adaptive layer norm's ``x * (1 + scale) + shift`` (Peebles & Xie 2023, Sec. 3.2).

    ``x`` ``[N, T, D]``; ``shift`` and ``scale`` ``[N, D]``, one per sample.
    """
    return x * (1 + scale[:, None]) + shift[:, None]


class PatchEmbed(nn.Module):
    """Patchify (Peebles & Xie 2023, Sec. 3.2, Fig. 4): ``p x p`` patches -> linear tokens.

    Args:
        patch_size: side ``p`` of the square patches (kernel and stride of the convolution).
        in_channels: input channels ``C``.
        hidden_size: token width ``D``.
    """

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        """Embed ``x`` ``[N, C, H, W]`` as tokens ``[N, (H / p) (W / p), D]`` (row-major)."""
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """``c_noise`` -> ``[N, D]``: sinusoidal features, Linear, SiLU, Linear (Peebles & Xie 2023).

    Sec. 4 ("Diffusion"): a 256-wide frequency embedding (``max_period`` 10000, as ADM's:
    ``cm.networks.embeddings.timestep_embedding``), then a two-layer MLP of width ``D``.

    Args:
        hidden_size: output width ``D``.
        frequency_dim: width of the sinusoidal features.
    """

    def __init__(self, hidden_size: int, frequency_dim: int = 256) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(
            nn.Linear(frequency_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, c_noise: Tensor) -> Tensor:
        """Embed ``c_noise`` ``[N]`` as ``[N, D]``."""
        return self.mlp(timestep_embedding(c_noise, self.frequency_dim))


class LabelEmbedder(nn.Module):
    """Class embedding with a learned null class (Peebles & Xie 2023, Sec. 3.1-3.2, CFG).

    ``y = W labels + (1 - sum(labels)) null``: the reference's ``(label_dim + 1)``-row table
    applied to the distribution ``[labels, 1 - sum(labels)]``, so a one-hot row gives its class
    row, an all-zero row ("no class", classifier-free guidance's unconditional input) the null
    row, and soft labels the matching mixture. Linear in the labels: no data-dependent branch.

    Args:
        label_dim: number of classes.
        hidden_size: output width ``D``.
    """

    def __init__(self, label_dim: int, hidden_size: int) -> None:
        super().__init__()
        self.proj = nn.Linear(label_dim, hidden_size, bias=False)  # weight [D, L]: table^T
        self.null = nn.Parameter(torch.zeros(1, hidden_size))

    def forward(self, labels: Tensor) -> Tensor:
        """Embed labels ``[N, label_dim]`` as ``[N, D]``."""
        labels = labels.to(self.null.dtype)
        return self.proj(labels) + (1 - labels.sum(-1, keepdim=True)) * self.null


class Attention(nn.Module):
    """Multi-head self-attention over tokens (Vaswani et al. 2017, Sec. 3.2.2), with qkv bias.

    Goes through ``scaled_dot_product_attention`` (fused kernels in the normal pass, the math
    kernel in cm's JVP pass).

    Args:
        hidden_size: token width ``D``.
        num_heads: number of heads; ``D`` must be divisible by it.
    """

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        """Attend over the ``T`` tokens of ``x`` ``[N, T, D]``."""
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [N, heads, T, head_dim]
        h = F.scaled_dot_product_attention(q, k, v)
        return self.proj(h.transpose(1, 2).reshape(n, t, d))


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block (Peebles & Xie 2023, Sec. 3.2, Fig. 3).

    ``x += gate1 * attn(modulate(norm(x), shift1, scale1))``, then the same with the MLP; the
    six vectors come from ``SiLU -> Linear(c)``, zero-initialised so the block starts as the
    identity. LayerNorms carry no affine parameters (eps 1e-6); the MLP uses tanh-GELU.

    Args:
        hidden_size: token width ``D``.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width over ``D``.
        dropout: dropout probability after the MLP's activation.
    """

    def __init__(
        self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0
    ) -> None:
        super().__init__()
        mlp_width = int(hidden_size * mlp_ratio)
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(
            OrderedDict(
                fc1=nn.Linear(hidden_size, mlp_width),
                act=nn.GELU(approximate="tanh"),
                drop=nn.Dropout(dropout),
                fc2=nn.Linear(mlp_width, hidden_size),
            )
        )
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """Update tokens ``x`` ``[N, T, D]`` given the conditioning ``c`` ``[N, D]``."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """Output head (Peebles & Xie 2023, Sec. 3.2): adaLN (shift, scale), then a zero Linear.

    Args:
        hidden_size: token width ``D``.
        patch_size: patch side ``p``.
        out_channels: output channels; every token predicts ``p^2 * out_channels`` values.
    """

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """Map tokens ``[N, T, D]`` to patch values ``[N, T, p^2 * out_channels]``."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Diffusion Transformer of Peebles & Xie 2023 (Sec. 3.2, adaLN-Zero blocks), as ``F``.

    ``F(x, c_noise, labels, c_noise_to)`` on ``[N, in_channels, S, S]`` with
    ``S = img_resolution``; the output is exactly 0 at initialisation (adaLN-Zero). The network
    sees only ``c_noise`` (DiT's discrete ``t`` in ``[0, 1000)``, SiT's ``t`` in ``[0, 1]``; the
    preconditioner picks the scale), never ``sigma``. The defaults are DiT-XL/2 on
    ImageNet 256 (32x32x4 SD-VAE latents, learned sigma). Published sizes (Table 1), with patch
    size 2, 4 or 8 (``DiT-XL/2`` etc.), ``mlp_ratio`` 4:

    ==== ===== =========== =========
    size depth hidden_size num_heads
    ==== ===== =========== =========
    S    12    384         6
    B    12    768         12
    L    24    1024        16
    XL   28    1152        16
    ==== ===== =========== =========

    The positional embedding is a fixed buffer ``pos_embed`` ``[1, T, D]`` (the reference keeps
    it as a frozen parameter, so its printed count, 675,129,632 for DiT-XL/2, includes these
    ``T * D`` values: 674,834,720 trainable parameters + 294,912).

    Args:
        img_resolution: side ``S`` of the (latent) input, e.g. 32 for ImageNet 256 through the
            SD VAE; must be divisible by ``patch_size``. Inputs must have this size.
        in_channels: input channels (4 for SD-VAE latents).
        out_channels: output channels: ``2 * in_channels`` for DiT's learned sigma (the first
            ``in_channels`` are the prediction, the rest the variance), ``in_channels`` otherwise.
        label_dim: number of classes of one-hot labels ``[N, label_dim]``; 0 = unconditional.
            All-zero rows (or ``labels=None``) select the learned null class.
        patch_size: patch side ``p``: 2, 4 or 8 in the paper (``T = (S / p)^2`` tokens).
        hidden_size: token width ``D``; divisible by 4 (positional embedding) and ``num_heads``.
        depth: number of adaLN-Zero blocks.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width over ``D``.
        second_time: embed a second time input ``c_noise_to`` (a flow map's ``t - r``,
            ``cm.flowmap``; MeanFlow's ``c = emb(t) + emb(h) + emb(y)``) with its own timestep
            embedder, whose last Linear starts at zero: a diffusion/flow checkpoint loaded
            (non-strictly) into a flow map then computes its old function, and fine-tuning
            starts from the diffusion model.
        dropout: dropout probability inside the MLPs (0 in the paper).
        checkpointing: recompute every ``DiTBlock``'s activations in the backward pass while
            training (Chen et al. 2016; ``cm.networks.checkpointing``): trades about one extra
            forward pass per step for the blocks' activation memory (at DiT-XL/2 nearly all of
            it). Outputs, gradients and parameter names are unchanged.
    """

    def __init__(
        self,
        img_resolution: int = 32,
        in_channels: int = 4,
        out_channels: int = 8,
        label_dim: int = 1000,
        patch_size: int = 2,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        second_time: bool = False,
        dropout: float = 0.0,
        checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if img_resolution % patch_size:
            raise UserError(
                f"img_resolution {img_resolution} is not divisible by patch_size {patch_size}: "
                "change one of them."
            )
        if hidden_size % 4 or hidden_size % num_heads:
            raise UserError(
                f"hidden_size {hidden_size} must be divisible by 4 (2-D sin-cos positions) and "
                f"by num_heads {num_heads}: change one of them."
            )
        self.img_resolution = img_resolution
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.label_dim = label_dim
        self.patch_size = patch_size
        self.checkpointing = checkpointing
        grid = img_resolution // patch_size

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(label_dim, hidden_size) if label_dim else None
        self.t_embedder_to = TimestepEmbedder(hidden_size) if second_time else None
        # Persistent, under the reference's name, so its checkpoints carry it too.
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden_size, grid)[None])
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, mlp_ratio, dropout) for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, out_channels)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        # The reference's init: xavier-uniform Linears with zero bias; the patch conv as the
        # Linear [D, C p^2]; N(0, 0.02) label table and timestep MLP; adaLN-Zero modulations and
        # the output Linear zero (so F = 0 at init).
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        proj = self.x_embedder.proj
        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
        nn.init.zeros_(proj.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.proj.weight, std=0.02)
            nn.init.normal_(self.y_embedder.null, std=0.02)
        for embedder in (self.t_embedder, self.t_embedder_to):
            if embedder is not None:
                nn.init.normal_(embedder.mlp[0].weight, std=0.02)
                nn.init.normal_(embedder.mlp[2].weight, std=0.02)
        if self.t_embedder_to is not None:  # zero output: the second time starts switched off
            nn.init.zeros_(self.t_embedder_to.mlp[2].weight)
        zeros = [block.adaLN_modulation[1] for block in self.blocks]
        zeros += [self.final_layer.adaLN_modulation[1], self.final_layer.linear]
        for linear in zeros:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def unpatchify(self, x: Tensor) -> Tensor:
        """Tokens ``[N, T, p^2 C]`` (row-major, channel fastest) -> image ``[N, C, S, S]``."""
        n, c, p = x.shape[0], self.out_channels, self.patch_size
        g = self.img_resolution // p
        x = x.reshape(n, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)  # [N, C, g, p, g, p]
        return x.reshape(n, c, g * p, g * p)

    def forward(
        self,
        x: Tensor,
        c_noise: Tensor,
        labels: Tensor | None = None,
        c_noise_to: Tensor | None = None,
    ) -> Tensor:
        """Predict ``[N, out_channels, S, S]`` from ``x`` ``[N, C, S, S]`` and ``c_noise`` ``[N]``.

        Args:
            x: network input (already scaled by the preconditioner).
            c_noise: noise conditioning, one float per sample (a scalar broadcasts).
            labels: one-hot (or soft) class labels ``[N, label_dim]``; ``None`` or all-zero rows
                are the null class. Ignored when ``label_dim == 0``.
            c_noise_to: the second time input ``[N]`` of a flow map (``second_time``); None is 0.
        """
        n = x.shape[0]
        if tuple(x.shape[-2:]) != (self.img_resolution, self.img_resolution):
            raise UserError(
                f"DiT built for {self.img_resolution}x{self.img_resolution} inputs got "
                f"{tuple(x.shape[-2:])}: set img_resolution to the (latent) image size."
            )
        tokens = self.x_embedder(x) + self.pos_embed  # [N, T, D]
        c_noise = c_noise.reshape(-1).expand(n)
        c = self.t_embedder(c_noise)  # [N, D]
        c = c + second_time_embedding(self.t_embedder_to, lambda c: c, c_noise_to, c_noise)
        if self.y_embedder is not None:
            if labels is None:
                labels = c.new_zeros(n, self.label_dim)  # no class: the null embedding
            c = c + self.y_embedder(labels)
        for block in self.blocks:
            tokens = checkpointed(self.checkpointing, block, tokens, c)
        return self.unpatchify(self.final_layer(tokens, c))


class SiT(DiT):
    """Scalable Interpolant Transformer backbone (Ma et al. 2024, abstract): DiT's network.

    SiT trains DiT's unchanged backbone (same blocks, sizes, parameters and initialisation) on
    an interpolant/flow objective; its network predicts a velocity (or score/noise) with as many
    channels as the input, so ``out_channels`` defaults to ``in_channels``, the only difference
    from ``DiT``. The published SiT checkpoints keep DiT's learned-sigma head
    (``2 * in_channels`` outputs) and discard its second half in ``forward``; loading one here
    takes the first ``in_channels`` of every ``2 * in_channels`` rows of ``final_layer.linear``
    (channels are the fastest index of each token's ``p^2 * C`` outputs).

    Args:
        in_channels: input channels.
        out_channels: output channels; None = ``in_channels`` (no learned sigma).
        **kwargs: the other ``DiT`` arguments (``img_resolution``, ``label_dim``, ``patch_size``,
            ``hidden_size``, ``depth``, ``num_heads``, ``mlp_ratio``, ``second_time``,
            ``dropout``, ``checkpointing``), with DiT-XL/2's defaults.
    """

    def __init__(
        self, in_channels: int = 4, out_channels: int | None = None, **kwargs: Any
    ) -> None:
        out = in_channels if out_channels is None else out_channels
        super().__init__(in_channels=in_channels, out_channels=out, **kwargs)
