"""Architectures of the tiny world (configs only; weights come from ``build``) and artifact loaders.

Sizes: images 3×32×32 in [0, 1] (pipelines take/return [−1, 1] / PIL as usual); VAE downsampling factor 4 →
latents 4×8×8; text length 16 tokens, hidden 128; UNet ~1.6M parameters with cross-attention at every level.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import resolve_path
from .tokenizer import MAX_LENGTH

DEFAULT_ROOT = "assets/tiny-world"
LATENT_SIZE = 8
TEXT_DIM = 128


def clip_config(vocab_size: int):
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    text = CLIPTextConfig(vocab_size=vocab_size, hidden_size=TEXT_DIM, intermediate_size=256, num_hidden_layers=3,
                          num_attention_heads=4, max_position_embeddings=MAX_LENGTH, projection_dim=64,
                          pad_token_id=0, bos_token_id=2, eos_token_id=3, hidden_act="gelu")
    vision = CLIPVisionConfig(image_size=32, patch_size=4, num_channels=3, hidden_size=128, intermediate_size=256,
                              num_hidden_layers=3, num_attention_heads=4, projection_dim=64, hidden_act="gelu")
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=64,
                      logit_scale_init_value=2.6592)


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=32,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16, scaling_factor=1.0)


def build_unet(time_cond_proj_dim: int | None = None):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 64), norm_num_groups=16, cross_attention_dim=TEXT_DIM, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        time_cond_proj_dim=time_cond_proj_dim)


def noise_schedule_kwargs() -> dict:
    """SD's training noise schedule (shared by DDPM training, DDIM and LCM schedulers)."""
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                prediction_type="epsilon")


def ddim_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**noise_schedule_kwargs(), clip_sample=False, set_alpha_to_one=False, steps_offset=0,
                         timestep_spacing="trailing")


def lcm_scheduler():
    from diffusers import LCMScheduler

    return LCMScheduler(**noise_schedule_kwargs(), clip_sample=False, set_alpha_to_one=True, steps_offset=0,
                        original_inference_steps=50, timestep_spacing="leading", timestep_scaling=10.0)


def require_dir(path: str | Path, what: str = "tiny-world artifact") -> Path:
    """Resolve an artifact directory or raise a one-line error naming it and the build command."""
    p = resolve_path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{what} not found at {p}: run `make tiny-world` "
                                f"(python -m align_bench.tiny.build --out {DEFAULT_ROOT})")
    return p


def load_clip(path: str | Path = f"{DEFAULT_ROOT}/clip"):
    """(CLIPModel in eval mode, tokenizer) from a directory."""
    from transformers import AutoTokenizer, CLIPModel

    p = require_dir(path, "tiny CLIP")
    return CLIPModel.from_pretrained(str(p)).eval(), AutoTokenizer.from_pretrained(str(p))


def tokenize(tokenizer, prompts: list[str], device=None) -> torch.Tensor:
    """list of B prompts → (B, 16) long ids padded to max length."""
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return ids if device is None else ids.to(device)


# The tiny CLIP's feature functions: shared by the build (training) and the tiny-world rewards.
def clip_pixel_values(images: torch.Tensor) -> torch.Tensor:
    """(B,3,32,32) in [0,1] → CLIP input: (x − 0.5) / 0.5 (the tiny CLIP is trained with this normalisation)."""
    return images * 2 - 1


def image_features(model, images: torch.Tensor) -> torch.Tensor:
    """(B,3,32,32) in [0,1] → (B, 64) projected image embedding (differentiable; version-proof spelling of
    ``get_image_features``)."""
    return model.visual_projection(model.vision_model(pixel_values=clip_pixel_values(images)).pooler_output)


def text_features(model, ids: torch.Tensor) -> torch.Tensor:
    """(B, 16) ids → (B, 64) projected text embedding."""
    return model.text_projection(model.text_model(input_ids=ids).pooler_output)


class AestheticHead(torch.nn.Module):
    """LAION aesthetic-predictor architecture, scaled down: L2-normalised embedding (D) → MLP → score (B,).

    Linear(D,256) → Dropout(0.2) → Linear(256,64) → Dropout(0.2) → Linear(64,16) → Dropout(0.1) → Linear(16,1).
    """

    def __init__(self, dim: int = 64):
        super().__init__()
        self.dim = dim
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(dim, 256), torch.nn.Dropout(0.2), torch.nn.Linear(256, 64), torch.nn.Dropout(0.2),
            torch.nn.Linear(64, 16), torch.nn.Dropout(0.1), torch.nn.Linear(16, 1))

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        """emb (B, D) (normalised here) → (B,)."""
        return self.layers(torch.nn.functional.normalize(emb, dim=-1)).squeeze(-1)

    def save(self, path: str | Path, extra: dict | None = None) -> None:
        import json

        from safetensors.torch import save_file

        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(p / "model.safetensors"))
        (p / "config.json").write_text(json.dumps({"dim": self.dim, **(extra or {})}, indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "AestheticHead":
        import json

        from safetensors.torch import load_file

        p = require_dir(path, "tiny aesthetic head")
        cfg = json.loads((p / "config.json").read_text())
        head = cls(cfg["dim"])
        head.load_state_dict(load_file(str(p / "model.safetensors")))
        return head.eval()
