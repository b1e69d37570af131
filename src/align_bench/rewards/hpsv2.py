"""HPSv2 / HPSv2.1 (Wu et al. 2023, arXiv 2306.09341): OpenCLIP ViT-H/14 fine-tuned on Human Preference Dataset v2
(`xswu/HPSv2`: `HPS_v2_compressed.pt`, `HPS_v2.1_compressed.pt`). Score = cos(image features, text features), the
diagonal of `image_features @ text_features.T` on normalised features, ≈ 0.24–0.30 (`scale: official`, the
`hpsv2.score` convention and SDPO's); the HPS benchmark tables print it × 100 (`scale: x100`).

Built on `open_clip_torch` directly (the `[rewards]` extra): the `hpsv2` package is not a dependency — it pins
pytest==7.2.0 and protobuf<4, vendors its own open_clip, and its wheel lacks the BPE vocabulary. Its evaluation
transform is reproduced in torch (preprocessing.resize_longest_pad: longer side → 224 bicubic, zero padding, OpenAI
mean/std), as read from hpsv2 1.2.0's `create_model_and_transforms(..., light_augmentation=True)` / `ResizeMaxSize`.
Differentiable.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..models.hub import looks_like_hub_id
from .base import register_reward
from .preprocessing import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, normalize, resize_longest_pad
from .pretrained import PretrainedReward

HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}


@register_reward("hpsv2")
class HPSv2(PretrainedReward):
    differentiable = True
    tiny_counterpart = "tiny_pickscore"
    scales = {"official": "cosine, ≈ 0.24–0.30 (hpsv2.score)", "x100": "cosine × 100, ≈ 24–30 (HPS benchmark tables)"}

    def __init__(self, version: str = "v2.1", checkpoint: str = "xswu/HPSv2", arch: str = "ViT-H-14",
                 scale: str = "official", batch_size: int = 32):
        """`checkpoint`: hub repo (the version's file is taken from it), a local directory holding that file, or the
        .pt file itself. `arch`: an open_clip model name, or a model-config .json (the tiny replicas' path)."""
        super().__init__(scale, batch_size)
        if version not in HPS_FILES:
            raise ValueError(f"reward=hpsv2: unknown version {version!r}; expected one of {sorted(HPS_FILES)}")
        open_clip = self.require("open_clip", "open_clip_torch")
        if arch.endswith(".json"):
            open_clip.add_model_config(Path(arch))
            arch = Path(arch).stem
        path = self.checkpoint_file(checkpoint, checkpoint if looks_like_hub_id(checkpoint) else None,
                                    HPS_FILES[version], f"HPS {version} checkpoint")
        self.model = open_clip.create_model(arch, pretrained=None, precision="fp32", device="cpu", output_dict=True)
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        self.model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.image_size = int(self.model.visual.image_size[0] if isinstance(self.model.visual.image_size, tuple)
                              else self.model.visual.image_size)
        self.version = version

    @property
    def convention(self) -> str:
        return f"{super().convention}, HPS {self.version}"

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """HPS's evaluation transform on (B,3,H,W) [0,1] images → (B,3,224,224)."""
        return normalize(resize_longest_pad(images.float(), self.image_size, fill=0.0), OPENAI_CLIP_MEAN,
                         OPENAI_CLIP_STD)

    def score_batch(self, images, prompts):
        image_features = self.model.encode_image(self.preprocess(images), normalize=True)
        text_features = self.model.encode_text(self.tokenizer(prompts).to(images.device), normalize=True)
        cos = (image_features * text_features).sum(-1)
        return cos * 100.0 if self.scale == "x100" else cos
