"""Numerical check of rewards/hpsv2.py against the `hpsv2` package's own code (hpsv2 1.2.0's vendored open_clip:
`create_model_and_transforms(..., light_augmentation=True)` and its evaluation transform), imported from the
unpacked wheel without installing it. The same random checkpoint (rewards/testing.py's replica) goes into both;
compared: the model on identical pixels (exact), and the whole score with each side's own preprocessing (theirs:
PIL image → ToTensor → ResizeMaxSize → Normalize; ours: torch on the float image). Not a test (the wheel is not a
dependency); its output is quoted in docs/rewards.md.

    pip download --no-deps hpsv2==1.2.0 && unzip hpsv2-1.2.0-py3-none-any.whl -d /tmp/hps
    python tests/scripts/hpsv2_reference_check.py /tmp/hps
"""

import os
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch


def main(wheel_dir: str) -> None:
    from PIL import Image

    from align_bench.rewards import build_reward
    from align_bench.rewards.testing import build_hpsv2

    kwargs = build_hpsv2(Path(tempfile.mkdtemp()) / "hps")
    ours = build_reward("hpsv2", **kwargs)
    # package stubs: the vendored open_clip imports without hpsv2/__init__ (clint, hub downloads); its factory
    # imports `turtle` (tkinter) for nothing
    for pkg in ("hpsv2", "hpsv2/src"):
        module = types.ModuleType(pkg.replace("/", "."))
        module.__path__ = [os.path.join(wheel_dir, pkg)]
        sys.modules[module.__name__] = module
    sys.modules["turtle"] = types.SimpleNamespace(forward=None)
    vocab = Path(wheel_dir) / "hpsv2/src/open_clip/bpe_simple_vocab_16e6.txt.gz"
    if not vocab.exists():  # the wheel ships without it (one reason hpsv2 is not a dependency): open_clip_torch's
        import shutil

        import open_clip

        shutil.copy(Path(open_clip.__file__).parent / vocab.name, vocab)
    from hpsv2.src import open_clip as vendored

    vendored.add_model_config(Path(kwargs["arch"]))
    model, _, preprocess_val = vendored.create_model_and_transforms(
        Path(kwargs["arch"]).stem, None, precision="fp32", device="cpu", jit=False, force_quick_gelu=False,
        force_custom_text=False, force_patch_dropout=False, force_image_size=None, pretrained_image=False,
        image_mean=None, image_std=None, light_augmentation=True, aug_cfg={}, output_dict=True,
        with_score_predictor=False, with_region_predictor=False)
    state = torch.load(Path(kwargs["checkpoint"]) / "HPS_v2.1_compressed.pt", weights_only=True)["state_dict"]
    result = model.load_state_dict(state, strict=False)
    print("reference load: missing", result.missing_keys, "unexpected", result.unexpected_keys)
    model.eval()

    prompts = ["a red circle", "a cat on a mat", "x"]
    text = ours.tokenizer(prompts)  # open_clip's BPE tokenizer (the hpsv2 wheel lacks its vocabulary file)
    rng = np.random.default_rng(0)
    smooth = [np.clip(np.cumsum(rng.normal(0, 6, (64, 64, 3)), axis=1) + 128, 0, 255).astype("uint8"),
              rng.integers(0, 256, (64, 64, 3)).astype("uint8"),  # noise: bicubic overshoots [0, 1] here
              np.kron(rng.integers(0, 2, (8, 8, 3)), np.ones((8, 8, 1))).astype("uint8") * 255]  # hard edges
    images = torch.stack([torch.from_numpy(a).permute(2, 0, 1).float() / 255 for a in smooth])
    with torch.no_grad():
        pixels = ours.preprocess(images)
        out = model(pixels, text)
        same_pixels = (out["image_features"] @ out["text_features"].T).diagonal()
        mine = ours(images, prompts)
        theirs_pixels = torch.stack([preprocess_val(Image.fromarray(a)) for a in smooth])
        out = model(theirs_pixels, text)
        theirs = (out["image_features"] @ out["text_features"].T).diagonal()
    print("model on identical pixels, max |diff|:", float((same_pixels - mine).abs().max()))
    print("preprocessing (PIL vs torch), max |pixel diff| (normalised units):",
          float((theirs_pixels - pixels).abs().max()), "mean:", float((theirs_pixels - pixels).abs().mean()))
    print("reference scores:", [round(float(v), 6) for v in theirs])
    print("ours:            ", [round(float(v), 6) for v in mine])
    print("score max |diff| (each side's own preprocessing):", float((theirs - mine).abs().max()))
    assert torch.allclose(same_pixels, mine, atol=1e-5)


if __name__ == "__main__":
    main(sys.argv[1])
