"""Numerical check of rewards/imagereward.py against the reference ImageReward code (image-reward 1.5's own
`ImageReward.score_gard`, BLIP ViT and med.py BERT, imported from the unpacked wheel as in
imagereward_reference_keys.py): the same random checkpoint in the released layout (rewards/testing.py's replica)
is loaded into both, and the rewards of the same pixels and prompts are compared. Not a test (the wheel is not a
dependency); its output is quoted in docs/rewards.md.

    python tests/scripts/imagereward_reference_check.py /tmp/ir
"""

import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def main(wheel_dir: str) -> None:
    from align_bench.rewards import build_reward
    from align_bench.rewards.preprocessing import clip_preprocess
    from align_bench.rewards.testing import build_imagereward

    kwargs = build_imagereward(Path(tempfile.mkdtemp()) / "ir")  # before the wheel's stubs replace timm modules
    ours = build_reward("imagereward", **kwargs)
    state = torch.load(Path(kwargs["checkpoint"]) / "ImageReward.pt", weights_only=True)
    med = json.loads((Path(kwargs["checkpoint"]) / "med_config.json").read_text())

    from imagereward_reference_keys import import_reference

    ir = import_reference(wheel_dir)
    vit = sys.modules["ImageReward.models.BLIP.vit"]
    bert = sys.modules["ImageReward.models.BLIP.med"]
    config = bert.BertConfig(**{k: v for k, v in med.items() if k != "architectures"})
    config.encoder_width = 64
    reference = ir.ImageReward.__new__(ir.ImageReward)
    torch.nn.Module.__init__(reference)
    reference.device, reference.mean, reference.std = "cpu", 0.16717362830052426, 1.0333394966054072
    reference.blip = torch.nn.Module()
    reference.blip.visual_encoder = vit.VisionTransformer(img_size=32, patch_size=16, embed_dim=64, depth=1,
                                                          num_heads=1)
    reference.blip.text_encoder = bert.BertModel(config=config, add_pooling_layer=False)
    reference.blip.vision_proj = torch.nn.Linear(64, 8)
    reference.blip.text_proj = torch.nn.Linear(32, 8)
    reference.mlp = ir.MLP(32)
    missing, unexpected = reference.load_state_dict(state, strict=True)
    reference.eval()

    images = torch.rand(4, 3, 48, 40, generator=torch.Generator().manual_seed(0))
    prompts = ["a red circle", "a cat on a mat", "x", "blue square and a green triangle"]
    text = ours.tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    with torch.no_grad():
        theirs = reference.score_gard(text.input_ids, text.attention_mask, clip_preprocess(images, 32)).squeeze(-1)
        mine = ours(images, prompts)
    print("reference:", [round(float(v), 6) for v in theirs])
    print("ours:     ", [round(float(v), 6) for v in mine])
    print("max |diff|:", float((theirs - mine).abs().max()))
    assert torch.allclose(theirs, mine, atol=1e-5), "ImageReward re-implementation differs from the reference"


if __name__ == "__main__":
    main(sys.argv[1])
