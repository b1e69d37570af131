"""JPEG (in)compressibility, DDPO's rewards (Black et al., ICLR 2024): size in kB of the JPEG (quality 95)."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from .base import Reward, register_reward


def jpeg_size_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """(B,3,H,W) in [0,1] → (B,) JPEG size in kB (bytes / 1000), after uint8 quantisation as the reference does."""
    arr = (images.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    sizes = []
    for img in arr:
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(img)).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


class _JpegSize(Reward):
    """sign × (JPEG size in kB)."""

    sign = 1.0

    def __init__(self, quality: int = 95):
        super().__init__()
        self.quality = quality

    def score(self, images, prompts):
        return self.sign * jpeg_size_kb(images, self.quality)


@register_reward("jpeg_compressibility")
class JpegCompressibility(_JpegSize):
    """−(JPEG size in kB): higher is more compressible."""

    sign = -1.0


@register_reward("jpeg_incompressibility")
class JpegIncompressibility(_JpegSize):
    """JPEG size in kB: higher is less compressible."""

    sign = 1.0
