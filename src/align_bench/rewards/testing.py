"""Tiny random-weight replicas of the real reward checkpoints, in their released layouts, saved to a directory so
tests load them through the same loader (and the same files) a user's download takes:

  aesthetic    a CLIPModel directory with its CLIPImageProcessor and tokenizer (what openai/clip-vit-large-patch14
               is) + `aesthetic-model.pth` (the LAION MLP's state dict)
  pickscore    the same CLIP directory layout (PickScore_v1 and its processor repo)
  hpsv2        an open_clip model-config .json + `HPS_v2.1_compressed.pt` / `HPS_v2_compressed.pt` ({"state_dict"})
  imagereward  `ImageReward.pt` in the BLIP layout (a timm ViT under blip.visual_encoder, BERT under blip.text_encoder,
               blip.vision_proj/text_proj, mlp.layers.*) + `med_config.json` + a BertTokenizer directory

Sizes are a few thousand parameters; images are 32² (ImageReward's ViT 32² with 16² patches)."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import torch

from ..models.testing import char_clip_tokenizer


def build_clip_dir(directory: str | Path, *, seed: int = 0, image_size: int = 32, width: int = 32) -> Path:
    """A random CLIPModel + CLIPImageProcessor (resize/crop `image_size`, OpenAI mean/std) + CLIP tokenizer."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(seed)
    tokenizer = char_clip_tokenizer(max_length=16)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1, num_attention_heads=2,
                           image_size=image_size, patch_size=8),
        projection_dim=width,
    )
    directory = Path(directory)
    CLIPModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
                       ).save_pretrained(directory)
    return directory


def build_aesthetic(directory: str | Path, *, seed: int = 0) -> dict:
    """CLIP directory + the MLP's .pth; returns the reward kwargs that load them."""
    from .aesthetic import AestheticMLP

    directory = Path(directory)
    clip = build_clip_dir(directory / "clip", seed=seed)
    torch.manual_seed(seed + 1)
    head = AestheticMLP(32)
    for p in head.parameters():  # the released init (std 1/(d+1)) would give near-constant scores
        torch.nn.init.normal_(p, std=0.3)
    torch.save(head.state_dict(), directory / "aesthetic-model.pth")
    return {"clip": str(clip), "head": str(directory / "aesthetic-model.pth")}


def build_pickscore(directory: str | Path, *, seed: int = 0) -> dict:
    clip = build_clip_dir(Path(directory) / "pickscore", seed=seed)
    return {"model": str(clip), "processor": str(clip)}


HPS_TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def build_hpsv2(directory: str | Path, *, seed: int = 0, version: str = "v2.1") -> dict:
    """An open_clip model-config .json (ViT-H-14's shape at toy size; open_clip's own BPE tokenizer) and a random
    checkpoint saved as HPS saves its: {"state_dict": ...}."""
    import open_clip

    from .hpsv2 import HPS_FILES

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arch = directory / "hps-tiny-replica.json"
    arch.write_text(json.dumps(HPS_TINY_CONFIG))
    open_clip.add_model_config(arch)
    torch.manual_seed(seed)
    model = open_clip.create_model(arch.stem, pretrained=None)
    torch.save({"state_dict": model.state_dict()}, directory / HPS_FILES[version])
    return {"checkpoint": str(directory), "arch": str(arch), "version": version}


def bert_tokenizer_dir(directory: str | Path) -> Path:
    """A BertTokenizer (lower case, WordPiece) whose vocabulary spells any lowercase word letter by letter."""
    from transformers import BertTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters, *("##" + c for c in letters), ".", ",", "-"]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(directory / "vocab.txt")).save_pretrained(directory)
    return directory


def imagereward_state_dict(*, vision_width: int, vision_depth: int, text_config, image_size: int = 32,
                           patch_size: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in the layout of the released ImageReward.pt: BLIP's ViT is timm's VisionTransformer (the
    module BLIP's vit.py derives from, same parameter names), its text encoder BERT with cross-attention."""
    import timm.models.vision_transformer as vit
    from transformers import BlipTextModel

    torch.manual_seed(seed)
    visual = vit.VisionTransformer(img_size=image_size, patch_size=patch_size, embed_dim=vision_width,
                                   depth=vision_depth, num_heads=max(1, vision_width // 64), qkv_bias=True,
                                   num_classes=0, global_pool="token", norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))
    for p in visual.parameters():
        p.data.normal_(0, 0.2)
    # BLIP's med.py names its BERT modules as transformers' BlipTextModel does; its position_ids buffer is saved
    text = BlipTextModel(text_config, add_pooling_layer=False)
    state = {f"blip.visual_encoder.{k}": v for k, v in visual.state_dict().items()}
    state.update({f"blip.text_encoder.{k}": v.normal_(0, 0.2) if v.is_floating_point() else v
                  for k, v in text.state_dict().items()})
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(text_config.max_position_embeddings)[None]
    for name, d_in in (("vision_proj", vision_width), ("text_proj", text_config.hidden_size)):
        state[f"blip.{name}.weight"], state[f"blip.{name}.bias"] = torch.randn(8, d_in), torch.randn(8)
    dims = [text_config.hidden_size, 1024, 128, 64, 16, 1]
    for i, layer in enumerate((0, 2, 4, 6, 7)):
        state[f"mlp.layers.{layer}.weight"] = torch.randn(dims[i + 1], dims[i]) / dims[i] ** 0.5
        state[f"mlp.layers.{layer}.bias"] = torch.zeros(dims[i + 1])
    return state


def build_imagereward(directory: str | Path, *, seed: int = 0) -> dict:
    """ImageReward.pt + med_config.json (a 1-layer BERT of width 32 cross-attending to a 1-block ViT of width 64)."""
    from transformers import BlipTextConfig

    from .imagereward import imagereward_tokenizer

    directory = Path(directory)
    tok_dir = bert_tokenizer_dir(directory / "bert")
    vocab = len(imagereward_tokenizer(tok_dir))
    med = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.0, "hidden_act": "gelu",
           "hidden_dropout_prob": 0.0, "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 64,
           "layer_norm_eps": 1e-12, "max_position_embeddings": 40, "model_type": "bert", "num_attention_heads": 2,
           "num_hidden_layers": 1, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": vocab,
           "encoder_width": 64, "add_cross_attention": True}
    text_config = BlipTextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=40, encoder_hidden_size=64,
                                 is_decoder=True)
    state = imagereward_state_dict(vision_width=64, vision_depth=1, text_config=text_config, seed=seed)
    ckpt = directory / "ckpt"
    ckpt.mkdir(parents=True, exist_ok=True)
    torch.save(state, ckpt / "ImageReward.pt")
    (ckpt / "med_config.json").write_text(json.dumps(med))
    return {"checkpoint": str(ckpt), "tokenizer": str(tok_dir)}


BUILDERS = {"aesthetic": build_aesthetic, "pickscore": build_pickscore, "hpsv2": build_hpsv2,
            "imagereward": build_imagereward}
