"""Tiny random-weight replicas of the real model families, built and saved to a directory so tests load them
through the very `from_pretrained` path the real checkpoints use."""

from __future__ import annotations

from pathlib import Path

import torch


def char_clip_tokenizer(max_length: int = 16):
    """A CLIPTokenizer whose vocabulary is the 256 byte-level characters (no merges): tokenises any text offline."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


# The stock pipeline class of each replica kind (what a user's checkpoint of that kind is).
KINDS = ("sd", "sd_turbo", "lcm", "sdxl")


def _text_encoder(tokenizer, width: int, *, layers: int = 1, projection: bool = False, hidden_act: str = "quick_gelu"):
    """A random CLIP text encoder (SDXL's get 2 layers: it reads the penultimate hidden state)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
        num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length, hidden_act=hidden_act,
        projection_dim=width, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def build_random_pipeline(directory: str | Path, *, lcm: bool = False, kind: str | None = None, seed: int = 0,
                          latent_size: int = 8, block_out_channels=(32, 64), cross_attention_dim: int = 32) -> Path:
    """Save a randomly initialised pipeline of `kind` to `directory` with its stock diffusers pipeline class; returns
    the directory. The same classes and file layout as the real checkpoint of that kind:

      sd        SD 1.5-like: StableDiffusionPipeline, CLIP text encoder (quick_gelu), DDIM scheduler
      sd_turbo  SD-Turbo-like: SD 2.1's text encoder (gelu, "!" padding), EulerDiscrete scheduler, trailing spacing
      lcm       LCM-Dreamshaper-like: LatentConsistencyModelPipeline, UNet guidance embedding, LCMScheduler
      sdxl      SDXL-like: StableDiffusionXLPipeline, CLIPTextModel + CLIPTextModelWithProjection, text_time UNet

    `lcm=True` is `kind="lcm"`. UNet latents 4×latent_size², VAE factor 2, 16-token prompts."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        EulerDiscreteScheduler,
        LatentConsistencyModelPipeline,
        LCMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    kind = kind or ("lcm" if lcm else "sd")
    if kind not in KINDS:
        raise ValueError(f"unknown replica kind {kind!r}; expected one of {KINDS}")
    torch.manual_seed(seed)
    tokenizer = char_clip_tokenizer()
    if kind == "sd_turbo":
        tokenizer.pad_token = "!"  # SD 2.x's tokenizer pads with "!", not <|endoftext|>
    width = cross_attention_dim
    text_encoder = _text_encoder(tokenizer, width, layers=2 if kind == "sdxl" else 1,
                                 hidden_act="gelu" if kind == "sd_turbo" else "quick_gelu")
    unet_kwargs = dict(
        sample_size=latent_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=tuple(block_out_channels), norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=width, attention_head_dim=8, time_cond_proj_dim=256 if kind == "lcm" else None,
    )
    if kind == "sdxl":
        time_dim = 8
        # Cross-attention over both encoders' hidden states; pooled (width) + 6 time ids × time_dim in the added
        # embedding, as SDXL's UNet config spells it (use_linear_projection, text_time).
        unet_kwargs.update(cross_attention_dim=2 * width, use_linear_projection=True, addition_embed_type="text_time",
                           addition_time_embed_dim=time_dim, projection_class_embeddings_input_dim=width + 6 * time_dim)
    unet = UNet2DConditionModel(**unet_kwargs)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=latent_size * 2, scaling_factor=0.13025 if kind == "sdxl" else 1.0,
    )
    common = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                  prediction_type="epsilon")
    parts = dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet)
    if kind == "lcm":
        scheduler = LCMScheduler(**common, set_alpha_to_one=False, clip_sample=False, original_inference_steps=50,
                                 timestep_scaling=10.0)
        pipe = LatentConsistencyModelPipeline(**parts, scheduler=scheduler, safety_checker=None,
                                              feature_extractor=None, requires_safety_checker=False)
    elif kind == "sdxl":
        tokenizer_2 = char_clip_tokenizer()
        tokenizer_2.pad_token = "!"  # SDXL's second tokenizer pads with "!"
        text_encoder_2 = _text_encoder(tokenizer_2, width, layers=2, projection=True, hidden_act="gelu")
        scheduler = EulerDiscreteScheduler(**common, timestep_spacing="leading", steps_offset=1)
        pipe = StableDiffusionXLPipeline(**parts, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                                         scheduler=scheduler, force_zeros_for_empty_prompt=True)
    elif kind == "sd_turbo":
        scheduler = EulerDiscreteScheduler(**common, timestep_spacing="trailing", steps_offset=1)
        pipe = StableDiffusionPipeline(**parts, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    else:
        scheduler = DDIMScheduler(**common, set_alpha_to_one=False, clip_sample=False, timestep_spacing="trailing",
                                  steps_offset=0)
        pipe = StableDiffusionPipeline(**parts, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    directory = Path(directory)
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory
