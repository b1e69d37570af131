"""Shared pieces of `make bench`: interleaved timing (ratios measured in one process, A B A B …, medians), the
models every section runs on (the tiny world and random-weight SD 1.5- / SDXL-architecture UNets built from their
configs, no download), the stock diffusers pipeline over the very same modules, and the results-file header.

Why interleaved: on a shared machine the load changes from second to second; timing A for a minute and then B for
a minute measures the load, not A against B. Alternating the variants within each round (and rotating which one
goes first) exposes both to the same load, so their ratio stays meaningful even when the absolute times do not.
"""

from __future__ import annotations

import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PROMPTS = ["a red circle on a blue background", "a green square", "two yellow triangles", "a small blue circle"]


# ------------------------------------------------------------------------------------------------------ timing
def interleaved(variants: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                budget_s: float | None = None) -> dict[str, float]:
    """Median seconds of each variant, run in rounds A, B, C, … (the order rotated every round) after `warmup`
    untimed rounds. `budget_s`: stop after the round that passes it (at least 3 rounds when repeats ≥ 3)."""
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(warmup):
        for n in names:
            variants[n]()
    t_start = time.perf_counter()
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            variants[n]()
            times[n].append(time.perf_counter() - t0)
        if budget_s is not None and r >= min(2, repeats - 1) and time.perf_counter() - t_start > budget_s:
            break
    return {n: statistics.median(v) for n, v in times.items()}


def ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}×" if b > 0 else "—"


def fmt_s(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def markdown_table(headers: list[str], rows: list[list[object]]) -> list[str]:
    """The lines of a Markdown table: a header row, the rule, one line per row of cells."""
    line = lambda cells: "| " + " | ".join(str(c) for c in cells) + " |"  # noqa: E731
    return [line(headers), "|" + "---|" * len(headers), *map(line, rows)]


# ------------------------------------------------------------------------------------------------------ models
@dataclass
class Bench:
    """A model under test: the align_bench adapter (LoRA attached) and how to build the stock pipeline on it."""

    name: str
    model: object  # align_bench.models.DiffusionModel
    note: str

    def stock_pipeline(self):
        """The family's stock diffusers pipeline over the SAME modules (UNet with its LoRA, text encoders, VAE) and a
        DDIMScheduler with the adapter's spacing, so both sides sample the same grid."""
        from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

        m = self.model
        sched_cfg = {**m.scheduler_config, "timestep_spacing": m.spec.timestep_spacing,
                     "steps_offset": m.spec.steps_offset, "set_alpha_to_one": False, "clip_sample": False}
        sched_cfg.pop("_class_name", None)
        scheduler = DDIMScheduler.from_config(sched_cfg)
        if m.family == "sdxl":
            pipe = StableDiffusionXLPipeline(vae=m.vae, text_encoder=m.text_encoder, text_encoder_2=m.text_encoder_2,
                                             tokenizer=m.tokenizer, tokenizer_2=m.tokenizer_2, unet=m.unet,
                                             scheduler=scheduler, force_zeros_for_empty_prompt=m.zero_uncond)
        else:
            pipe = StableDiffusionPipeline(vae=m.vae, text_encoder=m.text_encoder, tokenizer=m.tokenizer, unet=m.unet,
                                           scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @property
    def image_size(self) -> int:
        return self.model.latent_size * self.model.vae_factor


def _spec(name: str, path: str, family: str = "sd", spacing: str = "trailing", offset: int = 0):
    from align_bench.models import ModelSpec

    return ModelSpec(name=name, path=path, family=family, timestep_spacing=spacing, steps_offset=offset,
                     resolution=None, dtype="fp32", download_hint="", vae=None)


def load_tiny(name: str = "tiny", lora_rank: int = 4) -> Bench:
    """A committed tiny-world model (conf/model/<name>.yaml's settings), LoRA attached."""
    from align_bench.main import compose
    from align_bench.models import DiffusionModel, ModelSpec

    cfg = compose([f"model={name.replace('-', '_')}"]).model
    model = DiffusionModel.from_pretrained(ModelSpec.from_config(cfg))
    model.add_lora(lora_rank, lora_rank)
    params = sum(p.numel() for p in model.unet.parameters()) / 1e6
    return Bench(name, model, f"tiny world `{cfg.path}`: UNet {params:.1f} M params, latents 4×{model.latent_size}²")


SD15_UNET = dict(  # runwayml/stable-diffusion-v1-5 unet/config.json (the architecture; weights random)
    in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)

SDXL_UNET = dict(  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json, widths scaled by `width`
    in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)


def _random_text_encoder(width: int, tokenizer, *, projection: bool = False, projection_dim: int | None = None):
    """One-layer random CLIP text encoder of the real width (the UNet's cross-attention sees the real shapes)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                         num_hidden_layers=2, num_attention_heads=8, max_position_embeddings=tokenizer.model_max_length,
                         projection_dim=projection_dim or width, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def _small_vae(factor_blocks: int = 2):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,) * factor_blocks,
                         norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * factor_blocks,
                         up_block_types=("UpDecoderBlock2D",) * factor_blocks, scaling_factor=0.18215)


def build_sd15_arch(latent_size: int = 16, lora_rank: int = 4, seed: int = 0) -> Bench:
    """SD 1.5's UNet architecture (860 M params, 128 LoRA'd attention projections) with random weights at
    `latent_size`² latents; 77-token prompts through a 2-layer random CLIP text encoder of width 768 (the real one
    has 12 layers: text encoding is a per-call cost outside the step loop); an 8-channel VAE (the decode is not
    part of the rollout comparison)."""
    from diffusers import UNet2DConditionModel

    from align_bench.models import DiffusionModel
    from align_bench.models.testing import char_clip_tokenizer

    torch.manual_seed(seed)
    tok = char_clip_tokenizer(max_length=77)
    unet = UNet2DConditionModel(sample_size=latent_size, **SD15_UNET)
    model = DiffusionModel(_spec("sd15-arch", "random", spacing="leading", offset=1), unet, _small_vae(),
                           _random_text_encoder(768, tok), tok, _scheduler_config())
    model.add_lora(lora_rank, lora_rank)
    return Bench("sd15-arch", model, f"SD 1.5 UNet architecture, random weights, latents 4×{latent_size}² "
                                     f"({sum(p.numel() for p in unet.parameters()) / 1e6:.0f} M params)")


def build_sdxl_arch(latent_size: int = 16, width: float = 0.5, lora_rank: int = 4, seed: int = 0) -> Bench:
    """SDXL base's UNet architecture (block types, 1/2/10 transformer layers, text_time added conditioning, two
    text encoders 768 + 1280 → 2048) with block widths × `width` (0.5: 650 M params instead of 2.6 G, to fit
    beside other work in RAM), random weights, `latent_size`² latents."""
    from diffusers import UNet2DConditionModel

    from align_bench.models import DiffusionModel
    from align_bench.models.testing import char_clip_tokenizer

    torch.manual_seed(seed)
    cfg = dict(SDXL_UNET)
    cfg["block_out_channels"] = tuple(int(c * width) for c in cfg["block_out_channels"])
    cfg["attention_head_dim"] = tuple(max(1, int(h * width)) for h in cfg["attention_head_dim"])
    unet = UNet2DConditionModel(sample_size=latent_size, **cfg)
    tok, tok2 = char_clip_tokenizer(max_length=77), char_clip_tokenizer(max_length=77)
    tok2.pad_token = "!"
    te1 = _random_text_encoder(768, tok)
    te2 = _random_text_encoder(1280, tok2, projection=True, projection_dim=1280)
    model = DiffusionModel(_spec("sdxl-arch", "random", family="sdxl", spacing="leading", offset=1), unet,
                           _small_vae(), te1, tok, _scheduler_config(), text_encoder_2=te2, tokenizer_2=tok2,
                           zero_uncond=True)
    model.add_lora(lora_rank, lora_rank)
    return Bench("sdxl-arch", model, f"SDXL UNet architecture at {width:g}× width, random weights, latents "
                                     f"4×{latent_size}² ({sum(p.numel() for p in unet.parameters()) / 1e6:.0f} M "
                                     f"params)")


def _scheduler_config() -> dict:
    return dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                prediction_type="epsilon")


# ------------------------------------------------------------------------------------------------------ header
def machine_slug() -> str:
    """A short name for this machine: CPU model (or GPU name) + core count, e.g. `amd-epyc-2c`."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
    else:
        name = platform.processor() or platform.machine()
        try:
            for line in open("/proc/cpuinfo"):
                if line.startswith("model name"):
                    name = line.split(":", 1)[1]
                    break
        except OSError:
            pass
        name = f"{name} {os.cpu_count()}c"
    name = re.sub(r"\((r|tm)\)|cpu|processor|@.*?ghz|\d+-core", " ", name.lower())
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")[:48] or "unknown"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> str:
    import accelerate
    import diffusers
    import peft
    import transformers

    return (f"python {platform.python_version()}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
            f"transformers {transformers.__version__}, peft {peft.__version__}, accelerate {accelerate.__version__}")


def load_average() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "?"
