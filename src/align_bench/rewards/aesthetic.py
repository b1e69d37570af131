"""LAION aesthetic predictor (improved-aesthetic-predictor, `sac+logos+ava1-l14-linearMSE`): the L2-normalised CLIP
ViT-L/14 image embedding → a linear MLP (768 → 1024 → 128 → 64 → 16 → 1, dropout between, no activations), trained
to predict mean AVA-style ratings, ≈ 1–10 (SD 1.5 ≈ 5.4). The reward of DDPO, D3PO, AlignProp, SDPO's aesthetic
task. Prompt-free, differentiable. docs/rewards.md; no other scale exists.
"""

from __future__ import annotations

import torch

from ..models.hub import looks_like_hub_id
from .base import register_reward
from .preprocessing import clip_preprocess, processor_settings
from .pretrained import PretrainedReward, features


class AestheticMLP(torch.nn.Module):
    """The predictor head; its parameter names (layers.0, .2, .4, .6, .7) are the released .pth's keys."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(input_size, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128),
            torch.nn.Dropout(0.2), torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.layers(embeds)


def aesthetic_score(image_embeds: torch.Tensor, head: torch.nn.Module) -> torch.Tensor:
    """(B, D) CLIP image embeddings → (B,) scores: the head on the L2-normalised embedding."""
    return head(image_embeds / image_embeds.norm(dim=-1, keepdim=True)).squeeze(-1)


@register_reward("aesthetic")
class Aesthetic(PretrainedReward):
    differentiable = True
    tiny_counterpart = "tiny_aesthetic"
    scales = {"official": "the LAION predictor's output, ≈ 1–10"}

    def __init__(self, clip: str = "openai/clip-vit-large-patch14", head: str = "trl-lib/ddpo-aesthetic-predictor",
                 head_file: str = "aesthetic-model.pth", scale: str = "official", batch_size: int = 32):
        super().__init__(scale, batch_size)
        from transformers import CLIPModel

        clip_dir = self.checkpoint_dir(clip, "CLIP image encoder")
        # the whole CLIPModel (its text tower unused): a CLIPModel checkpoint's projection width is only reliable in
        # its top-level config, which the vision-only class does not read
        self.clip = CLIPModel.from_pretrained(clip_dir).eval()
        self.preprocess_settings = processor_settings(clip_dir)
        head_path = self.checkpoint_file(head, head if looks_like_hub_id(head) else None, head_file,
                                         "aesthetic MLP weights")
        state = torch.load(head_path, map_location="cpu", weights_only=True)
        self.head = AestheticMLP(int(self.clip.config.projection_dim))
        self.head.load_state_dict(state)
        self.head.eval()

    def score_batch(self, images, prompts):
        pixels = clip_preprocess(images, **self.preprocess_settings)
        return aesthetic_score(features(self.clip.get_image_features(pixel_values=pixels)), self.head)
