"""Rewards of the tiny world (src/align_bench/tiny; artifacts under assets/tiny-world, ``make tiny-world``).

Learned, differentiable (gradients flow to the images; resizing and normalisation are done in torch):
  ``tiny_aesthetic``  tiny-CLIP image embedding → LAION-style MLP head, trained to predict the analytic
                      aesthetic score of ``align_bench.tiny.scenes`` (0–10; contrast, size, centring).
  ``tiny_pickscore``  logit_scale × cosine(tiny-CLIP image embedding, prompt text embedding) (PickScore's form).
Oracle metrics, pixel level / ground truth, not differentiable (for evaluation):
  ``tiny_colour_accuracy``  1 if the measured shape colour and background colour both match the prompt, else 0.
  ``tiny_shape_accuracy``   1 if tiny-CLIP zero-shot picks the prompt's shape among circle/square/triangle
                            (captions with the prompt's colours), else 0.
  ``tiny_true_aesthetic``   the analytic aesthetic score itself, measured on the pixels (what the head imitates).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..tiny import scenes
from ..tiny.models import AestheticHead, image_features, load_clip, text_features, tokenize
from .base import Reward, register_reward

CLIP_DIR = "assets/tiny-world/clip"
AESTHETIC_DIR = "assets/tiny-world/aesthetic"


def _to_clip_size(images: torch.Tensor, size: int = 32) -> torch.Tensor:
    """(B,3,H,W) in [0,1] → (B,3,32,32), differentiable (bilinear with antialias when shrinking)."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


class _TinyClipReward(Reward):
    """Shared loader: the tiny CLIP (frozen) and its tokenizer."""

    def __init__(self, clip_dir: str = CLIP_DIR):
        super().__init__()
        self.clip, self.tokenizer = load_clip(clip_dir)
        self.clip.requires_grad_(False)
        self.image_size = self.clip.config.vision_config.image_size

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) in [0,1] → (B, D) projected image embedding."""
        return image_features(self.clip, _to_clip_size(images.float(), self.image_size))

    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        """B prompts → (B, D) projected text embedding."""
        return text_features(self.clip, tokenize(self.tokenizer, prompts, self.clip.logit_scale.device))


@register_reward("tiny_aesthetic")
class TinyAesthetic(_TinyClipReward):
    """Learned aesthetic score (≈0–10) of the tiny world; prompt-free, differentiable, hackable."""

    differentiable = True

    def __init__(self, clip_dir: str = CLIP_DIR, head_dir: str = AESTHETIC_DIR):
        super().__init__(clip_dir)
        self.head = AestheticHead.load(head_dir).requires_grad_(False)

    def score(self, images, prompts):
        return self.head(self.image_embeds(images))


@register_reward("tiny_pickscore")
class TinyPickScore(_TinyClipReward):
    """logit_scale · cos(image, prompt) with the tiny CLIP; differentiable."""

    differentiable = True

    def score(self, images, prompts):
        img = F.normalize(self.image_embeds(images), dim=-1)
        txt = F.normalize(self.text_embeds(prompts), dim=-1)
        return self.clip.logit_scale.exp() * (img * txt).sum(-1)


@register_reward("tiny_colour_accuracy")
class TinyColourAccuracy(Reward):
    """Oracle: 1.0 when the pixels' shape colour and background colour both match the prompt (else 0.0)."""

    differentiable = False

    def score(self, images, prompts):
        return scenes.colour_correct(images.detach(), prompts)


@register_reward("tiny_shape_accuracy")
class TinyShapeAccuracy(_TinyClipReward):
    """tiny-CLIP zero-shot shape check: argmax over the prompt's caption with each shape substituted."""

    differentiable = False

    def score(self, images, prompts):
        parsed = [scenes.parse_caption(p) for p in prompts]
        cands = []
        for q in parsed:
            q = q or {"colour": "red", "background": "blue", "count": 1, "size": None}
            cands += [scenes.caption_of(s, q["colour"], q["background"], q["count"], q["size"]) for s in scenes.SHAPES]
        img = F.normalize(self.image_embeds(images.detach()), dim=-1)  # (B, D)
        txt = F.normalize(self.text_embeds(cands), dim=-1).view(len(prompts), len(scenes.SHAPES), -1)  # (B, 3, D)
        pick = torch.einsum("bd,bkd->bk", img, txt).argmax(1)
        truth = torch.tensor([scenes.SHAPES.index(q["shape"]) if q else -1 for q in parsed], device=pick.device)
        return (pick == truth).float()


@register_reward("tiny_true_aesthetic")
class TinyTrueAesthetic(Reward):
    """Oracle: the analytic aesthetic score (0–10) measured on the pixels (see align_bench.tiny.scenes)."""

    differentiable = False

    def score(self, images, prompts):
        return scenes.aesthetic_score(_to_clip_size(images.detach().float()))
