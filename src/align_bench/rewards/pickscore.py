"""PickScore (Kirstain et al. 2023, arXiv 2305.01569): a CLIP ViT-H/14 fine-tuned on Pick-a-Pic preferences,
`yuvalkirstain/PickScore_v1`, with the `laion/CLIP-ViT-H-14-laion2B-s32B-b79K` processor (224², OpenAI mean/std,
77-token text). Score = logit_scale · cos(image embedding, text embedding), ≈ 18–23 for SD-class images (the
PickScore README's formula, `scale: official`). SDPO reports the cosine alone (`scale: raw`, ≈ 0.2;
docs/rewards.md). Differentiable.
"""

from __future__ import annotations

import torch

from .base import register_reward
from .preprocessing import clip_preprocess, processor_settings
from .pretrained import PretrainedReward, features


def pickscore(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor | None) -> torch.Tensor:
    """(B, D), (B, D) → (B,): cos(image, text), times exp(logit_scale) when given (logit_scale is CLIP's log-scale
    parameter)."""
    cos = torch.nn.functional.cosine_similarity(image_embeds, text_embeds, dim=-1)
    return cos if logit_scale is None else logit_scale.exp() * cos


@register_reward("pickscore")
class PickScore(PretrainedReward):
    differentiable = True
    tiny_counterpart = "tiny_pickscore"
    scales = {"official": "logit_scale · cosine, ≈ 18–23 (PickScore README)",
              "raw": "cosine alone, ≈ 0.2 (SDPO's scorer)"}

    def __init__(self, model: str = "yuvalkirstain/PickScore_v1",
                 processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", scale: str = "official",
                 batch_size: int = 32):
        super().__init__(scale, batch_size)
        from transformers import AutoTokenizer, CLIPModel

        self.model = CLIPModel.from_pretrained(self.checkpoint_dir(model, "PickScore model")).eval()
        processor_dir = self.checkpoint_dir(processor, "CLIP processor (tokenizer + image settings)")
        self.tokenizer = AutoTokenizer.from_pretrained(str(processor_dir))
        self.preprocess_settings = processor_settings(processor_dir)

    def score_batch(self, images, prompts):
        text = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.tokenizer.model_max_length,
                              return_tensors="pt").to(images.device)
        image_embeds = features(self.model.get_image_features(pixel_values=clip_preprocess(images,
                                                                                           **self.preprocess_settings)))
        text_embeds = features(self.model.get_text_features(**text))
        return pickscore(image_embeds, text_embeds, self.model.logit_scale if self.scale == "official" else None)
