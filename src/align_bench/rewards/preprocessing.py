"""Image preprocessing of the real reward models, in torch: differentiable, batched, on the images' device, with no
PIL round trip (AlignProp backpropagates through it). Each function reproduces one reference transform on float
images in [0, 1]:

  resize_center_crop  CLIP / PickScore / aesthetic / ImageReward: shorter side → `size` (bicubic), centre crop
                      `size`² (transformers' CLIPImageProcessor; torchvision Resize + CenterCrop)
  resize_longest_pad  HPSv2's evaluation transform: longer side → `size` (bicubic), zero-pad the shorter one
                      centred (pad value 0 before normalisation, as HPS's ResizeMaxSize)
  normalize           (x − mean) / std per channel

The departure from the references: they quantise the images to uint8 first, and the CLIP processors resize with
PIL; here the decoded float images are resized directly (bicubic with antialias, torchvision's tensor path — the one
HPS's transform itself uses, so HPS's preprocessing is reproduced exactly on uint8-valued images), so CLIP-processor
scores can differ from a PIL pipeline in the third decimal. Shapes: images (B, 3, H, W) → (B, 3, size, size).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _resize(images: torch.Tensor, size: tuple[int, int], clamp: bool) -> torch.Tensor:
    """Bicubic with antialias (torchvision's tensor resize). `clamp`: cut bicubic's overshoot back to [0, 1], as
    PIL's uint8 resize does (the CLIP processors); HPS resizes the float tensor and keeps it."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    out = F.interpolate(images, size=size, mode="bicubic", antialias=True, align_corners=False)
    return out.clamp(0, 1) if clamp else out


def shorter_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(h, w) after resizing the shorter side to `size`, keeping the aspect ratio (torchvision's integer rule)."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def resize_center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """Shorter side → `size`, then the centred `size`×`size` crop (top/left offset round((H − size)/2))."""
    h, w = shorter_side_size(images.shape[-2], images.shape[-1], size)
    images = _resize(images, (h, w), clamp=True)
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return images[..., top:top + size, left:left + size]


def resize_longest_pad(images: torch.Tensor, size: int, fill: float = 0.0) -> torch.Tensor:
    """Longer side → `size` (each side round(side · size / longest)), then pad to `size`² with `fill`, the padding
    split floor/ceil with the smaller half on the top/left (HPSv2's ResizeMaxSize). One difference: ResizeMaxSize
    skips the padding too when the longer side is already `size` (a non-square output); here the output is always
    `size`² (identical for the square images diffusion models produce)."""
    height, width = images.shape[-2:]
    scale = size / float(max(height, width))
    h, w = round(height * scale), round(width * scale)
    images = _resize(images, (h, w), clamp=False)
    pad_h, pad_w = size - h, size - w
    return F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=fill)


def normalize(images: torch.Tensor, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> torch.Tensor:
    mean = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean) / std


def clip_preprocess(images: torch.Tensor, size: int = 224, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> torch.Tensor:
    """CLIPImageProcessor's resize → centre crop → normalise, on [0, 1] float images."""
    return normalize(resize_center_crop(images.float(), size), mean, std)


def processor_settings(processor_dir) -> dict:
    """size, mean and std of a saved CLIPImageProcessor (preprocessor_config.json): the processor a reward names is
    the one whose constants it applies."""
    import json
    from pathlib import Path

    cfg = json.loads((Path(processor_dir) / "preprocessor_config.json").read_text())
    crop = cfg.get("crop_size", cfg.get("size"))
    crop = crop.get("height", crop.get("shortest_edge")) if isinstance(crop, dict) else crop
    shortest = cfg.get("size")
    shortest = shortest.get("shortest_edge", shortest.get("height")) if isinstance(shortest, dict) else shortest
    if shortest != crop:
        raise ValueError(f"{processor_dir}: resize {shortest} ≠ crop {crop} is not supported (CLIP resizes and crops "
                         "to the same size)")
    return {"size": int(crop), "mean": tuple(cfg["image_mean"]), "std": tuple(cfg["image_std"])}
