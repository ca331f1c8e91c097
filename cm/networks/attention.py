"""Cross-attention from image tokens to a text context (Rombach et al. 2022, Sec. 3.3, Eq. 3).

``Attention(Q, K, V) = softmax(Q K^T / sqrt(d)) V`` with ``Q = W_Q phi(z)`` from the spatial
features and ``K = W_K tau(y)``, ``V = W_V tau(y)`` from the context ``tau(y)`` (e.g. the token
embeddings of a frozen CLIP text encoder, ``cm.networks.text.TextEncoder``). The output
projection is zero-initialised, so adding the layer to a pretrained UNet leaves its function
unchanged at initialisation (as ADM's own zero-initialised ``proj_out``).
"""

import math

import torch.nn.functional as F
from torch import Tensor, nn

from cm.errors import UserError
from cm.networks.norms import GroupNorm


class CrossAttention(nn.Module):
    """Residual multi-head cross-attention ``x + proj_out(attn(q(norm(x)), k(c), v(c)))``.

    Rombach et al. 2022 (Latent Diffusion), Eq. 3, with ADM's GroupNorm on the image side and a
    LayerNorm on the context; heads split ``channels`` like the self-attention it accompanies.

    Args:
        channels: image feature channels (queries and output).
        context_dim: width ``D`` of the context tokens ``[N, L, D]``.
        num_heads: number of heads; ``channels`` must be divisible by it.
        num_groups: maximum number of GroupNorm groups on the image side.
    """

    def __init__(
        self, channels: int, context_dim: int, num_heads: int = 4, num_groups: int = 32
    ) -> None:
        super().__init__()
        if channels % num_heads:
            raise UserError(f"{channels} channels not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.norm = GroupNorm(math.gcd(num_groups, channels), channels, eps=1e-5)
        self.context_norm = nn.LayerNorm(context_dim)
        self.q = nn.Conv2d(channels, channels, 1)
        self.kv = nn.Linear(context_dim, 2 * channels)
        self.proj_out = nn.Conv2d(channels, channels, 1)
        # Zero output: a pretrained UNet with new cross-attention computes its old function.
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        """Attend from the positions of ``x`` ``[N, C, H, W]`` to ``context`` ``[N, L, D]``."""
        n, c, height, width = x.shape
        heads, d = self.num_heads, c // self.num_heads
        q = self.q(self.norm(x)).reshape(n, heads, d, -1).transpose(-1, -2)  # [N, h, HW, d]
        kv = self.kv(self.context_norm(context.to(x.dtype)))  # [N, L, 2C]
        k, v = kv.reshape(n, -1, 2, heads, d).permute(2, 0, 3, 1, 4).unbind(0)  # [N, h, L, d]
        h = F.scaled_dot_product_attention(q, k, v)
        h = h.transpose(-1, -2).reshape(n, c, height, width)
        return x + self.proj_out(h)
