"""ImageReward (Xu et al. 2023, arXiv 2304.05977; `THUDM/ImageReward`: `ImageReward.pt` + `med_config.json`),
re-implemented on transformers' BLIP classes. The `image-reward` package cannot be a dependency: it pins
timm==0.6.13 (which conflicts with open_clip) and its BLIP copy fails to import on transformers 5.

The model: BLIP's ViT-L/16 image encoder at 224² → a BERT-base text encoder that cross-attends to the image tokens
→ its [CLS] hidden state → a linear MLP (768 → 1024 → 128 → 64 → 16 → 1, the aesthetic head's shape) → the raw
reward r. `scale: official` is ImageReward's own normalisation (r − 0.16717) / 1.03334 (≈ −2…2, SD 1.4 ≈ 0.1);
`scale: raw` is r itself (SDPO's scorer). Preprocessing: shorter side → 224 bicubic, centre crop, OpenAI mean/std
(in torch). Text: bert-base-uncased with ImageReward's two added tokens ([DEC], [ENC]), padded to 35 tokens.

`IMAGEREWARD_KEY_MAP` maps every key of the released checkpoint onto this module (tests/test_real_rewards.py checks
it against the reference module's full key list: nothing missing, nothing unexpected). Differentiable.
"""

from __future__ import annotations

import json
import re

import torch

from ..models.hub import looks_like_hub_id
from .aesthetic import AestheticMLP
from .base import register_reward
from .preprocessing import clip_preprocess
from .pretrained import PretrainedReward

# ImageReward's own normalisation constants (mean and std of r over its training comparisons)
REWARD_MEAN, REWARD_STD = 0.16717362830052426, 1.0333394966054072
TEXT_LENGTH = 35

# checkpoint key (regex) → our key; None: deliberately dropped
IMAGEREWARD_KEY_MAP: list[tuple[str, str | None]] = [
    # BLIP ViT (timm layout) → transformers BlipVisionModel
    (r"blip\.visual_encoder\.cls_token", "vision.embeddings.class_embedding"),
    (r"blip\.visual_encoder\.pos_embed", "vision.embeddings.position_embedding"),
    (r"blip\.visual_encoder\.patch_embed\.proj\.(weight|bias)", r"vision.embeddings.patch_embedding.\1"),
    (r"blip\.visual_encoder\.blocks\.(\d+)\.norm1\.(weight|bias)", r"vision.encoder.layers.\1.layer_norm1.\2"),
    (r"blip\.visual_encoder\.blocks\.(\d+)\.norm2\.(weight|bias)", r"vision.encoder.layers.\1.layer_norm2.\2"),
    (r"blip\.visual_encoder\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)", r"vision.encoder.layers.\1.self_attn.qkv.\2"),
    (r"blip\.visual_encoder\.blocks\.(\d+)\.attn\.proj\.(weight|bias)",
     r"vision.encoder.layers.\1.self_attn.projection.\2"),
    (r"blip\.visual_encoder\.blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"vision.encoder.layers.\1.mlp.\2.\3"),
    (r"blip\.visual_encoder\.norm\.(weight|bias)", r"vision.post_layernorm.\1"),
    # BLIP's med.py BERT → transformers BlipTextModel (the same module names; position ids are a fixed arange)
    (r"blip\.text_encoder\.embeddings\.position_ids", None),
    (r"blip\.text_encoder\.(.+)", r"text.\1"),
    # BLIP's contrastive projections: not on ImageReward's scoring path
    (r"blip\.(vision_proj|text_proj)\.(weight|bias)", None),
    (r"mlp\.layers\.(\d+)\.(weight|bias)", r"mlp.layers.\1.\2"),
]


def map_imagereward_key(key: str) -> str | None:
    """Our parameter name for a checkpoint key (None: dropped on purpose); KeyError for a key no rule covers."""
    for pattern, target in IMAGEREWARD_KEY_MAP:
        if re.fullmatch(pattern, key):
            return None if target is None else re.sub(pattern, target, key)
    raise KeyError(f"ImageReward checkpoint key {key!r} is not covered by IMAGEREWARD_KEY_MAP")


def convert_imagereward_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {new: v for k, v in state.items() if (new := map_imagereward_key(k)) is not None}


def blip_configs(state: dict[str, torch.Tensor], med_config: dict):
    """transformers BLIP configs of the checkpoint: the ViT's size from its tensors (width from cls_token, depth from
    the blocks, patch and image size from patch/position embeddings, 64-wide heads as in BLIP's ViT-B and ViT-L), the
    text encoder from med_config.json (cross-attending to the ViT's width)."""
    from transformers import BlipTextConfig, BlipVisionConfig

    width = state["blip.visual_encoder.cls_token"].shape[-1]
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blip\.visual_encoder\.blocks\.(\d+)\.", k)))
    patch = state["blip.visual_encoder.patch_embed.proj.weight"].shape[-1]
    grid = int(round((state["blip.visual_encoder.pos_embed"].shape[1] - 1) ** 0.5))
    vision = BlipVisionConfig(
        hidden_size=width, intermediate_size=state["blip.visual_encoder.blocks.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=depth, num_attention_heads=max(1, width // 64), image_size=grid * patch, patch_size=patch,
        hidden_act="gelu", layer_norm_eps=1e-6,  # BLIP's ViT: exact GELU, LayerNorm eps 1e-6
    )
    text = BlipTextConfig(
        vocab_size=med_config["vocab_size"], hidden_size=med_config["hidden_size"],
        encoder_hidden_size=width, intermediate_size=med_config["intermediate_size"],
        num_hidden_layers=med_config["num_hidden_layers"], num_attention_heads=med_config["num_attention_heads"],
        max_position_embeddings=med_config["max_position_embeddings"], hidden_act=med_config["hidden_act"],
        layer_norm_eps=med_config["layer_norm_eps"], hidden_dropout_prob=med_config["hidden_dropout_prob"],
        attention_probs_dropout_prob=med_config["attention_probs_dropout_prob"],
        pad_token_id=med_config.get("pad_token_id", 0),
        # generation-only ids (BLIP's [DEC] and [SEP]); unset when a (test) vocabulary is smaller
        bos_token_id=30522 if med_config["vocab_size"] > 30522 else None,
        sep_token_id=102 if med_config["vocab_size"] > 102 else None,
        is_decoder=True,  # transformers builds the cross-attention layers only for is_decoder configs
    )
    return vision, text


class ImageRewardModel(torch.nn.Module):
    """BLIP image encoder + image-grounded text encoder + MLP head. (B,3,S,S) normalised pixels, (B, L) ids → (B,)
    raw rewards."""

    def __init__(self, vision_config, text_config):
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel

        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.mlp = AestheticMLP(text_config.hidden_size)

    def forward(self, pixel_values, input_ids, attention_mask) -> torch.Tensor:
        image_embeds = self.vision(pixel_values=pixel_values).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        hidden = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                           encoder_attention_mask=image_mask, is_decoder=False).last_hidden_state
        return self.mlp(hidden[:, 0].float()).squeeze(-1)


def imagereward_tokenizer(path):
    """bert-base-uncased (or a local BertTokenizer directory) with ImageReward's added [DEC] and [ENC] tokens."""
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(str(path))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


@register_reward("imagereward")
class ImageReward(PretrainedReward):
    differentiable = True
    tiny_counterpart = "tiny_pickscore"
    scales = {"official": "(r − 0.16717) / 1.03334, ImageReward's normalisation, ≈ −2…2",
              "raw": "the MLP output r, unnormalised (SDPO's scorer)"}

    def __init__(self, checkpoint: str = "THUDM/ImageReward", tokenizer: str = "google-bert/bert-base-uncased",
                 scale: str = "official", batch_size: int = 32):
        """`checkpoint`: hub repo or local directory with ImageReward.pt and med_config.json."""
        super().__init__(scale, batch_size)
        repo = checkpoint if looks_like_hub_id(checkpoint) else None
        weights = self.checkpoint_file(checkpoint, repo, "ImageReward.pt", "ImageReward weights")
        med = json.loads(self.checkpoint_file(checkpoint, repo, "med_config.json", "ImageReward BLIP config")
                         .read_text())
        self.tokenizer = imagereward_tokenizer(self.checkpoint_dir(tokenizer, "BERT tokenizer"))
        state = torch.load(weights, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        self.model = ImageRewardModel(*blip_configs(state, med))
        result = self.model.load_state_dict(convert_imagereward_state_dict(state), strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
        if missing or result.unexpected_keys:
            raise RuntimeError(f"reward=imagereward: {weights} does not match the BLIP model (missing {missing[:3]}, "
                               f"unexpected {result.unexpected_keys[:3]})")
        self.model.eval()
        self.image_size = self.model.vision.config.image_size

    def score_batch(self, images, prompts):
        text = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=TEXT_LENGTH,
                              return_tensors="pt").to(images.device)
        raw = self.model(clip_preprocess(images, self.image_size), text.input_ids, text.attention_mask)
        return (raw - REWARD_MEAN) / REWARD_STD if self.scale == "official" else raw
