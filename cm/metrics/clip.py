"""CLIP on open_clip: an image/text encoder and the CLIP score (Hessel et al. 2021, Eq. 1).

torchmetrics' ``CLIPScore`` loads CLIP through ``transformers``; this one loads any open_clip
checkpoint found offline by ``cm.weights`` (state dicts, or OpenAI's TorchScript archives) and
keeps torchmetrics' convention: the score is ``100 * max(cos(E_img, E_txt), 0)``, averaged.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric

from cm.errors import UserError
from cm.metrics.autocast import no_autocast
from cm.weights import load_open_clip

# open_clip's defaults when neither the pretrained tag nor the model config names a normalization
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipEncoder(nn.Module):
    """open_clip image and text towers, for CLIP features and the CLIP score (Radford et al. 2021).

    Images are resized (bicubic, antialiased; shorter side then center crop, or both sides for
    ``resize_mode="squash"`` tags) to the model's input size and normalized with the pretrained
    tag's mean/std, as open_clip's eval transform does.

    Args:
        model: open_clip architecture, e.g. ``ViT-L-14``.
        pretrained: open_clip pretrained tag, e.g. ``openai``; its file is found by
            ``cm.weights.find(cm.weights.clip_weights(model, pretrained))``.
    """

    channels = 3

    def __init__(self, model: str = "ViT-L-14", pretrained: str = "openai") -> None:
        super().__init__()
        import open_clip

        self.model, cfg = load_open_clip(model, pretrained)
        self.tokenizer = open_clip.get_tokenizer(model)
        size = self.model.visual.image_size
        self.image_size = (size, size) if isinstance(size, int) else tuple(size)
        mean, std = cfg.get("mean", OPENAI_MEAN), cfg.get("std", OPENAI_STD)
        self.squash = cfg.get("resize_mode") == "squash"
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        dim = getattr(self.model.visual, "output_dim", None)  # the embedding width
        if not isinstance(dim, int):
            dim = self.encode_images(torch.zeros(1, 3, *self.image_size, dtype=torch.uint8))
            dim = int(dim.shape[-1])
        self.num_features = dim
        self.name = f"clip:{model}:{pretrained}"

    def preprocess(self, images: Tensor) -> Tensor:
        """uint8 ``[N, 3, H, W]`` -> normalized float ``[N, 3, S, S]`` at the model's input size."""
        x = images.float() / 255
        h, w = x.shape[-2:]
        th, tw = self.image_size
        scale = max(th / h, tw / w)  # shorter side to the target, then center crop
        size = (max(th, round(h * scale)), max(tw, round(w * scale)))
        if self.squash:  # SigLIP's tags resize both sides, no crop
            size = (th, tw)
        if size != (h, w):
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
        top, left = (size[0] - th) // 2, (size[1] - tw) // 2
        x = x[..., top : top + th, left : left + tw].clamp(0, 1)
        return (x - self.mean) / self.std

    def encode_images(self, images: Tensor) -> Tensor:
        """Image embeddings ``[N, D]`` (not normalized) of uint8 ``[N, 3, H, W]`` images."""
        with no_autocast(images.device):
            return self.model.encode_image(self.preprocess(images)).float()

    def encode_text(self, captions: Sequence[str]) -> Tensor:
        """Text embeddings ``[N, D]`` (not normalized); captions are truncated to the context."""
        device = self.mean.device
        tokens = self.tokenizer(list(captions)).to(device)
        with no_autocast(device):
            return self.model.encode_text(tokens).float()

    def forward(self, images: Tensor) -> tuple[Tensor, None]:
        """CLIP image embeddings as features ``[N, D]``; no logits."""
        return self.encode_images(images), None


class CLIPScore(Metric):
    """CLIP score ``100 * mean(max(cos(E_img, E_txt), 0))`` (Hessel et al. 2021, Eq. 1, w = 100).

    Fed with embeddings (``update(image_emb, text_emb)``) so that one ``ClipEncoder`` can serve
    both the CLIP features and this score; the states are sums, so ``compute`` syncs over ranks.
    """

    higher_is_better = True
    is_differentiable = False
    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("score_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, image_emb: Tensor, text_emb: Tensor) -> None:
        """Add the scores of ``[N, D]`` image and text embeddings, pairwise."""
        if image_emb.shape != text_emb.shape:
            raise UserError(
                f"CLIP score needs one caption per image; got {image_emb.shape[0]} images and "
                f"{text_emb.shape[0]} captions."
            )
        cos = F.cosine_similarity(image_emb.double(), text_emb.double(), dim=-1)
        self.score_sum += (100 * cos.clamp_min(0)).sum()
        self.num += image_emb.shape[0]

    def compute(self) -> Tensor:
        """The mean score over all images seen (on all ranks)."""
        if self.num == 0:
            raise UserError("CLIP score needs at least one image with a caption: pass captions=.")
        return (self.score_sum / self.num).float()
