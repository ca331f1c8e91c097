"""A frozen open_clip text encoder ``tau(y)`` for text-to-image models (Rombach et al. 2022, 3.3).

Text reaches a denoiser through the one interface ``D(x, sigma, labels)``: the captions are
encoded once, outside the network, into token embeddings ``[N, L, D]`` (the last hidden states
after the final LayerNorm, as Stable Diffusion uses CLIP ViT-L/14's), and those are the
``labels`` that ``ADMUNet(context_dim=D)`` cross-attends to. The pooled, projected embedding
``[N, D']`` (CLIP's text feature, Radford et al. 2021) comes along for scores and pooled
conditioning. The weights are found offline by ``cm.weights`` like the CLIP score's.
"""

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from cm.errors import UserError
from cm.weights import load_open_clip


class TextEncoder(nn.Module):
    """Frozen open_clip text tower (Radford et al. 2021): captions -> (tokens, pooled).

    Always in eval mode with ``requires_grad=False``; ``train()`` cannot switch it back, so a
    LightningModule holding it keeps it frozen. The image tower is dropped after loading.

    Args:
        model: open_clip architecture, e.g. ``ViT-L-14`` (Stable Diffusion 1.x's text encoder).
        pretrained: open_clip pretrained tag, e.g. ``openai``; its file is found by
            ``cm.weights.find(cm.weights.clip_weights(model, pretrained))``.
        max_length: token embeddings kept per caption (at most the model's context length, 77);
            with CLIP's causal mask the first ``max_length`` outputs do not depend on the rest.
        pad_with_eot: pad with ``<|endoftext|>`` instead of open_clip's 0, as the Hugging Face
            tokenizer of Stable Diffusion 1.x does (its UNet attends to the padding tokens too).
    """

    def __init__(
        self,
        model: str = "ViT-L-14",
        pretrained: str = "openai",
        max_length: int = 77,
        pad_with_eot: bool = False,
    ) -> None:
        super().__init__()
        import open_clip

        clip, _ = load_open_clip(model, pretrained)
        del clip.visual  # text only: the image tower is half of the memory
        self.model = clip.requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(model)
        context_length = int(getattr(self.tokenizer, "context_length", 77) or 77)
        if not 1 <= max_length <= context_length:
            raise UserError(f"max_length must be in 1..{context_length}, got {max_length}.")
        self.max_length, self.pad_with_eot = max_length, pad_with_eot
        tokens, pooled = self.encode([""])
        self.context_dim, self.pooled_dim = int(tokens.shape[-1]), int(pooled.shape[-1])
        self.name = f"clip:{model}:{pretrained}"
        super().train(False)

    def train(self, mode: bool = True) -> "TextEncoder":
        """Stay in eval mode: the encoder is frozen (dropout off) whatever its parent does."""
        return super().train(False)

    @torch.no_grad()
    def encode(self, captions: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Token embeddings ``[N, max_length, D]`` and pooled embeddings ``[N, D']`` (float32)."""
        m = self.model
        device = next(m.parameters()).device
        text = self.tokenizer(list(captions)).to(device)
        eot = getattr(self.tokenizer, "eot_token_id", None)
        if self.pad_with_eot and eot is not None:
            # Positions after the first <|endoftext|> are padding; argmax pooling still finds it.
            after = (text == eot).int().cumsum(1) > 0
            text = torch.where(after, torch.full_like(text, eot), text)
        with torch.autocast(device.type, enabled=False):
            if hasattr(m, "text"):  # CustomTextCLIP: a TextTransformer returns both when asked
                m.text.output_tokens = True
                pooled, tokens = m.text(text)
            else:  # CLIP: open_clip's encode_text, keeping the hidden states before pooling
                from open_clip.transformer import text_global_pool

                x = m.token_embedding(text) + m.positional_embedding
                tokens = m.ln_final(m.transformer(x, attn_mask=m.attn_mask))
                pooled = text_global_pool(tokens, text, m.text_pool_type, m.text_eos_id)
                proj = m.text_projection
                if proj is not None:
                    pooled = proj(pooled) if isinstance(proj, nn.Module) else pooled @ proj
        return tokens[:, : self.max_length].float(), pooled.float()

    def forward(self, captions: Sequence[str]) -> Tensor:
        """The cross-attention context ``[N, max_length, D]`` of ``captions``."""
        return self.encode(captions)[0]
