"""Record the state-dict keys and shapes of the reference ImageReward model (THUDM's `image-reward` 1.5 wheel) at its
real size, without weights and without installing it: its modules are imported from an unpacked wheel with stubs
for the names transformers 5 / timm 1.x / fairscale no longer provide (none of them is used to build the module
tree), and built once with random bf16 weights. Output: tests/data/imagereward_keys.json, which
tests/test_real_rewards.py checks our key mapping against (every key mapped or deliberately dropped, none missing).

    pip download --no-deps image-reward==1.5 && unzip image_reward-1.5-py3-none-any.whl -d /tmp/ir
    python tests/scripts/imagereward_reference_keys.py /tmp/ir > tests/data/imagereward_keys.json
"""

import json
import sys
import types

import torch


def stub(name, **attrs):
    module = sys.modules.get(name) or types.ModuleType(name)
    for k, v in attrs.items():
        setattr(module, k, v)
    sys.modules[name] = module
    return module


def import_reference(wheel_dir: str):
    """The wheel's ImageReward package (ImageReward.ImageReward, ...models.BLIP.med, ...vit) importable on today's
    libraries; its modules stay unchanged."""
    import timm.layers
    import transformers.modeling_utils
    import transformers.pytorch_utils as pu
    from timm.models.vision_transformer import PatchEmbed

    for name in ("apply_chunking_to_forward", "prune_linear_layer"):
        setattr(transformers.modeling_utils, name, getattr(pu, name))
    transformers.modeling_utils.find_pruneable_heads_and_indices = lambda *a, **k: None

    class PreTrainedModel(torch.nn.Module):  # transformers 5's init_weights needs post_init's bookkeeping
        def __init__(self, config, *args, **kwargs):
            super().__init__()
            self.config = config

        def init_weights(self):
            pass

        # the two transformers 4 helpers med.py's forward calls (gone from transformers 5), as 4.x defined them
        @property
        def dtype(self):
            return next(p.dtype for p in self.parameters() if p.is_floating_point())

        def invert_attention_mask(self, mask):
            mask = mask[:, None, :, :] if mask.dim() == 3 else mask[:, None, None, :]
            return (1.0 - mask.to(self.dtype)) * torch.finfo(self.dtype).min

        def get_head_mask(self, head_mask, num_layers):
            return [None] * num_layers

    real_pretrained = transformers.modeling_utils.PreTrainedModel
    transformers.modeling_utils.PreTrainedModel = PreTrainedModel  # only while the wheel's med.py is imported
    saved = {name: sys.modules.get(name) for name in ("timm.models.vision_transformer", "timm.models.layers",
                                                      "timm.models.helpers", "timm.models.registry")}
    stub("fairscale"), stub("fairscale.nn"), stub("fairscale.nn.checkpoint")
    stub("fairscale.nn.checkpoint.checkpoint_activations", checkpoint_wrapper=lambda m, **k: m)
    stub("timm.models.hub", download_cached_file=None)
    stub("timm.models.registry", register_model=lambda f: f)
    stub("timm.models.layers", trunc_normal_=timm.layers.trunc_normal_, DropPath=timm.layers.DropPath)
    stub("timm.models.helpers", named_apply=lambda *a, **k: None, adapt_input_conv=None)
    stub("timm.models.vision_transformer", _cfg=lambda **k: k, PatchEmbed=PatchEmbed)

    class Tokenizer:  # init_tokenizer() fetches bert-base-uncased; only the module tree is needed here
        additional_special_tokens_ids = [30523]

        @classmethod
        def from_pretrained(cls, *a, **k):
            return cls()

        def add_special_tokens(self, *a, **k):
            return None

    import transformers

    real_tokenizer, transformers.BertTokenizer = transformers.BertTokenizer, Tokenizer
    import os

    # Package stubs with the wheel's paths: submodules import without running the packages' __init__ (which pull in
    # OpenAI's `clip` package for the CLIP/aesthetic baselines)
    for pkg in ("ImageReward", "ImageReward/models", "ImageReward/models/BLIP"):
        stub(pkg.replace("/", "."), __path__=[os.path.join(wheel_dir, pkg)])

    import ImageReward.ImageReward  # noqa: F401
    import ImageReward.models.BLIP.med  # noqa: F401
    import ImageReward.models.BLIP.vit  # noqa: F401

    # put today's modules back (the wheel's modules keep the names they imported)
    transformers.modeling_utils.PreTrainedModel = real_pretrained
    transformers.BertTokenizer = real_tokenizer
    for name, module in saved.items():
        if module is not None:
            sys.modules[name] = module
    return sys.modules["ImageReward.ImageReward"]


def main(wheel_dir: str) -> None:
    import_reference(wheel_dir)
    import tempfile

    # BLIP's med_config.json as THUDM/ImageReward ships it (BERT-base with cross-attention; vocab + [DEC], [ENC])
    med = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
           "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072,
           "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert", "num_attention_heads": 12,
           "num_hidden_layers": 12, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": 30524,
           "encoder_width": 768, "add_cross_attention": True}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(med, f)
    from ImageReward.ImageReward import ImageReward

    # ~0.9 GB of random weights (the meta device trips on the ViT's drop-path .item())
    torch.set_default_dtype(torch.bfloat16)
    model = ImageReward(f.name)
    keys = {k: list(v.shape) for k, v in model.state_dict().items()}
    source = "image-reward==1.5 ImageReward(med_config) state_dict (random init, shapes only)"
    json.dump({"source": source, "keys": keys}, sys.stdout, indent=0)


if __name__ == "__main__":
    main(sys.argv[1])
