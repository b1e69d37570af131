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


def build_random_pipeline(directory: str | Path, *, lcm: bool = False, seed: int = 0, latent_size: int = 8,
                          block_out_channels=(32, 64), cross_attention_dim: int = 32) -> Path:
    """Save a randomly initialised SD-style pipeline (LCM-style when `lcm`) to `directory`; returns it.

    UNet latents 4×latent_size², VAE factor 2, text width `cross_attention_dim`, 16-token prompts."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        LatentConsistencyModelPipeline,
        LCMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = char_clip_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cross_attention_dim, intermediate_size=2 * cross_attention_dim,
        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    unet = UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=tuple(block_out_channels), norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8,
        time_cond_proj_dim=256 if lcm else None,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=latent_size * 2, scaling_factor=1.0,
    )
    common = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                  set_alpha_to_one=False, clip_sample=False, prediction_type="epsilon")
    if lcm:
        scheduler = LCMScheduler(**common, original_inference_steps=50, timestep_scaling=10.0)
        pipe = LatentConsistencyModelPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                              scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                              requires_safety_checker=False)
    else:
        scheduler = DDIMScheduler(**common, timestep_spacing="trailing", steps_offset=0)
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    directory = Path(directory)
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory
