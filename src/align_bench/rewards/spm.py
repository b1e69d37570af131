"""Step-aware preference models (SPO: Liang et al., CVPR 2025, arXiv:2406.04314; docs/algos/spo.md): rewards
``(images, prompts, timesteps) → scores`` that judge an x̂0 predicted at noise level t.

The time-conditioned CLIP of the paper: a CLIP whose vision tower is modulated by the timestep —
  * a timestep embedder: sinusoidal features of t ([cos, sin], 256 dims, max period 10 000) → Linear → SiLU → Linear
    to the vision width H;
  * in every vision encoder layer, adaLN: SiLU → Linear(H, 6H) gives (shift, scale, gate) for the attention and the
    MLP sub-block, h ← h + gate ⊙ f(LN(h)·(1 + scale) + shift);
  * the pooled (post-layernorm CLS) output modulated by SiLU → Linear(H, 2H) (shift, scale), then the usual
    visual projection; the text tower is CLIP's.
  score(x, prompt, t) = logit_scale.exp() · cos(image_embed(x, t), text_embed(prompt)).
The modules are attached to a transformers ``CLIPModel`` under the names of the released checkpoints
(``t_embedder.mlp.{0,2}``, ``vision_model.encoder.layers.i.adaLN_modulation.1``, ``vision_model.adaLN_modulation.1``),
so their state dicts load as they are.

Registered rewards:
  ``spm``       the released SD 1.5 / SDXL preference models (local files: the PickScore_v1 init, the checkpoint,
                the CLIP-H processor), loaded with the reference's strictness rule (`load_released`).
  ``tiny_spm``  the tiny world's SPM, trained by ``make tiny-world`` (``align_bench.tiny.spm``) on the tiny CLIP.
Any other registered reward also works as SPO's preference model: it scores x̂0 and ignores t (SPO's ablation).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import resolve_path
from ..tiny.models import clip_pixel_values, load_clip, text_features, tokenize
from .base import Reward, register_reward

log = logging.getLogger("align_bench")

TINY_SPM_DIR = "assets/tiny-world/spm"
TINY_CLIP_DIR = "assets/tiny-world/clip"


# ------------------------------------------------------------------------------------------- the architecture
def timestep_features(t: torch.Tensor, dim: int = 256, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal features of timesteps t (B,) → (B, dim): [cos(t·f_j), sin(t·f_j)], f_j = max_period^(−j/half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class TimestepEmbedder(nn.Module):
    """t (B,) → (B, H): sinusoidal features → Linear(256, H) → SiLU → Linear(H, H)."""

    def __init__(self, hidden: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        nn.init.normal_(self.mlp[0].weight, std=0.02)
        nn.init.normal_(self.mlp[2].weight, std=0.02)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_features(t, self.frequency_dim).to(self.mlp[0].weight.dtype))


def add_time_conditioning(clip, init: str = "reference"):
    """Attach the time-conditioning modules to a transformers CLIPModel, in place; returns it.

    init "reference": the paper code's per-layer init (weight 0, bias 1 ⇒ shift = scale = gate = 1, NOT an
    identity; the released checkpoints overwrite it). "identity": bias (0, 0, 1, 0, 0, 1) ⇒ each layer starts as the
    plain CLIP layer (the tiny SPM trains from its CLIP this way; docs/algos/spo.md). The final (shift, scale) is
    zero-initialised in both."""
    if init not in ("reference", "identity"):
        raise ValueError(f"unknown adaLN init {init!r}; expected 'reference' or 'identity'")
    H = clip.vision_model.config.hidden_size
    clip.t_embedder = TimestepEmbedder(H)
    for layer in clip.vision_model.encoder.layers:
        layer.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(H, 6 * H))
        nn.init.zeros_(layer.adaLN_modulation[1].weight)
        with torch.no_grad():
            bias = layer.adaLN_modulation[1].bias
            bias.fill_(1.0)
            if init == "identity":
                bias[:2 * H].zero_()
                bias[3 * H:5 * H].zero_()
    clip.vision_model.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(H, 2 * H))
    nn.init.zeros_(clip.vision_model.adaLN_modulation[1].weight)
    nn.init.zeros_(clip.vision_model.adaLN_modulation[1].bias)
    return clip


def time_conditioned_image_features(clip, pixel_values: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Projected image embedding of the time-conditioned vision tower. pixel_values (B,3,S,S) normalised as the
    CLIP expects, timesteps (B,) → (B, projection_dim)."""
    vm = clip.vision_model
    cond = clip.t_embedder(timesteps.to(pixel_values.device))
    h = vm.pre_layrnorm(vm.embeddings(pixel_values))
    for layer in vm.encoder.layers:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = layer.adaLN_modulation(cond).chunk(6, dim=1)
        a = layer.self_attn(hidden_states=layer.layer_norm1(h) * (1 + scale_a[:, None]) + shift_a[:, None])[0]
        h = h + gate_a[:, None] * a
        h = h + gate_m[:, None] * layer.mlp(layer.layer_norm2(h) * (1 + scale_m[:, None]) + shift_m[:, None])
    pooled = vm.post_layernorm(h[:, 0])
    shift, scale = vm.adaLN_modulation(cond).chunk(2, dim=1)
    return clip.visual_projection(pooled * (1 + scale) + shift)


def preference_scores(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """logit_scale.exp() · cos(image, text), row by row. (B, D), (B, D) → (B,)."""
    return logit_scale.exp() * (F.normalize(image_embeds, dim=-1) * F.normalize(text_embeds, dim=-1)).sum(-1)


def load_released(clip, state_dict: dict[str, torch.Tensor]) -> None:
    """Load a released SPM state dict onto a time-conditioned CLIP built on the PickScore_v1 init, with the
    reference's rule: non-strict, but no key of the model may be missing, and every key the model does not hold
    as a parameter or buffer (old persistent `position_ids`, …) must name an attribute whose value equals the
    checkpoint's. Keys may carry the checkpoint's `model.` prefix. Raises ValueError naming the offending keys."""
    state = {(k[len("model."):] if k.startswith("model.") else k): v for k, v in state_dict.items()}
    missing, unexpected = clip.load_state_dict(state, strict=False)
    if missing:
        raise ValueError(f"SPM checkpoint lacks {len(missing)} keys of the model, e.g. {missing[:3]}")
    differing = []
    for key in unexpected:
        value = clip
        for part in key.split("."):
            value = getattr(value, part, None)
            if value is None:
                break
        if not torch.is_tensor(value) or value.shape != state[key].shape or not torch.equal(
                value.to(state[key].dtype).cpu(), state[key].cpu()):
            differing.append(key)
    if differing:
        raise ValueError(f"SPM checkpoint has {len(differing)} keys the model does not hold with the same value, "
                         f"e.g. {differing[:3]}")


# ------------------------------------------------------------------------------------------- the released SPMs
@register_reward("spm")
class StepAwarePreferenceModel(Reward):
    """The released step-aware preference model (SD 1.5 or SDXL checkpoint) on its PickScore_v1 init.

    init_path: local dir of yuvalkirstain/PickScore_v1 (a CLIPModel); checkpoint: the released
    `*_step-aware_preference_model.bin`; processor_path: local dir of laion/CLIP-ViT-H-14-laion2B-s32B-b79K's
    processor (tokenizer, image size, mean, std). Images are resized bicubically so the shorter side is the
    processor's size, centre-cropped, clamped to [0, 1] and normalised (the reference's preprocessing, on [0, 1]
    input instead of [−1, 1]: the same pixels)."""

    step_aware = True

    def __init__(self, init_path: str, checkpoint: str, processor_path: str):
        super().__init__()
        from transformers import AutoProcessor, CLIPModel

        paths = {"init_path": init_path, "checkpoint": checkpoint, "processor_path": processor_path}
        for key, value in paths.items():
            if not resolve_path(value).exists():
                raise FileNotFoundError(f"spm: reward.kwargs.{key}={value} does not exist; docs/algos/spo.md "
                                        f"('The preference models') lists what to download")
        clip = add_time_conditioning(CLIPModel.from_pretrained(str(resolve_path(init_path))), init="reference")
        ckpt = str(resolve_path(checkpoint))
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        load_released(clip, state)
        log.info("loaded step-aware preference model %s", ckpt)
        self.clip = clip.eval()
        processor = AutoProcessor.from_pretrained(str(resolve_path(processor_path)))
        self.tokenizer = processor.tokenizer
        size = processor.image_processor.size
        self.image_size = int(size["shortest_edge"] if "shortest_edge" in size else min(size.values()))
        self.register_buffer("mean", torch.tensor(processor.image_processor.image_mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(processor.image_processor.image_std).view(1, 3, 1, 1))

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) in [0,1] → (B,3,S,S) normalised CLIP input (S = the processor's size)."""
        H, W = images.shape[-2:]
        scale = self.image_size / min(H, W)
        new = (int(H * scale + 0.5), int(W * scale + 0.5))
        x = F.interpolate(images.float(), size=new, mode="bicubic", align_corners=False)
        if new[0] != new[1]:
            top, left = (new[0] - self.image_size) // 2, (new[1] - self.image_size) // 2
            x = x[..., top:top + self.image_size, left:left + self.image_size]
        return (x.clamp(0, 1) - self.mean) / self.std

    def score(self, images, prompts, timesteps):
        t = _timesteps(timesteps, len(prompts), images.device)
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(images.device)
        img = time_conditioned_image_features(self.clip, self.pixel_values(images), t)
        txt = self.clip.text_projection(self.clip.text_model(input_ids=ids).pooler_output)
        return preference_scores(img, txt, self.clip.logit_scale)


def _timesteps(timesteps: torch.Tensor | None, batch: int, device) -> torch.Tensor:
    """The noise level of each image; final samples (None) are judged at t = 0."""
    if timesteps is None:
        return torch.zeros(batch, dtype=torch.long, device=device)
    return torch.as_tensor(timesteps, device=device).long().reshape(-1).expand(batch)


# ------------------------------------------------------------------------------------------- the tiny SPM
def tiny_spm_state(clip) -> dict[str, torch.Tensor]:
    """What the tiny SPM trains and ships: everything but the text tower (frozen: the tiny CLIP's)."""
    return {k: v for k, v in clip.state_dict().items() if not k.startswith(("text_model.", "text_projection."))}


def save_tiny_spm(clip, directory: str | Path, extra: dict) -> None:
    """Weights (fp16: the file stays small; scores move by < 1e-3) and a config naming the CLIP it was built on."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().half().contiguous() for k, v in tiny_spm_state(clip).items()},
              str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps({"clip": "../clip", "adaln_init": "identity", **extra},
                                                      indent=2))


def load_tiny_spm(spm_dir: str | Path = TINY_SPM_DIR, clip_dir: str | Path = TINY_CLIP_DIR):
    """(time-conditioned tiny CLIP in eval mode, tokenizer): the tiny CLIP's text tower + the SPM's weights."""
    from safetensors.torch import load_file

    path = resolve_path(spm_dir)
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"tiny step-aware preference model not found at {path}: build it with "
                                f"`python -m align_bench.tiny.build --stages spm --out assets/tiny-world`")
    clip, tokenizer = load_clip(clip_dir)
    add_time_conditioning(clip, init="identity")
    state = {k: v.float() for k, v in load_file(str(path / "model.safetensors")).items()}
    missing, unexpected = clip.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(("text_model.", "text_projection."))]
    if missing or unexpected:
        raise ValueError(f"tiny SPM at {path} does not match the tiny CLIP: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    return clip.eval(), tokenizer


def tiny_spm_scores(clip, tokenizer, images: torch.Tensor, prompts: list[str], timesteps: torch.Tensor):
    """(B,3,32,32) in [0,1], B prompts, (B,) timesteps → (B,) scores (differentiable in the SPM's weights)."""
    if images.shape[-2:] != (32, 32):
        images = F.interpolate(images.float(), size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
    img = time_conditioned_image_features(clip, clip_pixel_values(images.float()), timesteps)
    txt = text_features(clip, tokenize(tokenizer, prompts, images.device))
    return preference_scores(img, txt, clip.logit_scale)


@register_reward("tiny_spm")
class TinySPM(Reward):
    """The tiny world's step-aware preference model: trained like the paper's (noised pairs, x̂0 of the tiny UNet,
    PickScore's loss) with labels from the analytic aesthetic score (align_bench.tiny.spm)."""

    step_aware = True

    def __init__(self, spm_dir: str = TINY_SPM_DIR, clip_dir: str = TINY_CLIP_DIR):
        super().__init__()
        self.clip, self.tokenizer = load_tiny_spm(spm_dir, clip_dir)

    def score(self, images, prompts, timesteps):
        return tiny_spm_scores(self.clip, self.tokenizer, images, prompts,
                               _timesteps(timesteps, len(prompts), images.device))
