"""Real rewards on tiny random replicas of their checkpoints (rewards/testing.py), loaded through the real loaders:
forward + gradients, the batched no-grad path, preprocessing against hand-computed references, the aesthetic and
PickScore formulas on fixed embeddings, scale conventions, ImageReward's key map against the reference module's
full key list, and the one-line errors for missing weights and missing extras."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import compose

from align_bench.rewards import build_reward
from align_bench.rewards.preprocessing import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    clip_preprocess,
    normalize,
    resize_center_crop,
    resize_longest_pad,
)

REAL = ("aesthetic", "pickscore", "hpsv2", "imagereward")
PROMPTS = ["a red circle", "a blue square", "green", "x", "a cat on a mat"]
DATA = Path(__file__).parent / "data"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    from align_bench.rewards.testing import BUILDERS

    root = tmp_path_factory.mktemp("reward_replicas")
    return {name: BUILDERS[name](root / name) for name in REAL}


@pytest.fixture(scope="module")
def rewards(replicas):
    return {name: build_reward(name, **replicas[name]) for name in REAL}


@pytest.mark.parametrize("name", REAL)
def test_replica_scores_with_finite_gradients_and_the_chunked_no_grad_path_agrees(name, replicas, rewards):
    reward = rewards[name]
    images = torch.rand(5, 3, 40, 48, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    scores = reward(images, PROMPTS)
    assert scores.shape == (5,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    assert reward.differentiable
    scores.sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    chunked = build_reward(name, **replicas[name], batch_size=2)  # 5 images: chunks of 2, 2, 1 under no_grad
    with torch.no_grad():
        torch.testing.assert_close(chunked(images.detach(), PROMPTS), scores.detach(), atol=1e-5, rtol=1e-5)
    assert len({round(float(s), 5) for s in scores.detach()}) > 1  # depends on its inputs


def test_clip_preprocessing_constants_crop_window_and_the_reference_processor(replicas):
    from PIL import Image
    from transformers import CLIPImageProcessor

    # normalisation constants: a constant image c maps to (c − mean)/std in every pixel
    flat = torch.full((1, 3, 32, 32), 0.25)
    expected = torch.tensor([(0.25 - m) / s for m, s in zip(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)])
    torch.testing.assert_close(clip_preprocess(flat, 32)[0, :, 5, 7], expected)
    assert OPENAI_CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)
    # crop window: shorter side already 32, so no resize; a 32×48 column ramp keeps columns 8..39
    ramp = torch.arange(48.0).expand(1, 3, 32, 48) / 47
    torch.testing.assert_close(resize_center_crop(ramp, 32), ramp[..., 8:40])
    # resize: a 64×96 image halves to 32×48 before the same crop (exact for a constant image)
    assert resize_center_crop(torch.rand(2, 3, 64, 96), 32).shape == (2, 3, 32, 32)
    # against transformers' CLIPImageProcessor (PIL, uint8) on a smooth image: equal up to PIL's resampling
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 80), indexing="ij")
    image = torch.stack([xx, yy, (xx + yy) / 2])[None]
    pil = Image.fromarray((image[0].permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
    reference = CLIPImageProcessor.from_pretrained(replicas["pickscore"]["processor"])(pil, return_tensors="pt")
    ours = clip_preprocess(image, 32)
    assert ours.shape == reference.pixel_values.shape == (1, 3, 32, 32)
    assert (ours - reference.pixel_values).abs().max() < 0.05  # 0.05 in normalised units ≈ 1/255 · 3.5


def test_hps_preprocessing_pads_the_shorter_side_with_zero_before_normalising():
    wide = torch.ones(1, 3, 8, 16)  # longer side 16 → 32: 16×32, padded 8 rows above and below
    out = resize_longest_pad(wide, 32)
    assert out.shape == (1, 3, 32, 32)
    torch.testing.assert_close(out[..., 8:24, :], torch.ones(1, 3, 16, 32))
    assert out[..., :8, :].abs().sum() == 0 and out[..., 24:, :].abs().sum() == 0
    odd = resize_longest_pad(torch.ones(1, 3, 7, 32), 32)  # 25 pad rows: 12 above, 13 below
    assert odd[0, 0, :, 0].tolist() == [0.0] * 12 + [1.0] * 7 + [0.0] * 13
    padded = normalize(out)
    torch.testing.assert_close(padded[0, :, 0, 0], -torch.tensor(OPENAI_CLIP_MEAN) / torch.tensor(OPENAI_CLIP_STD))


def test_aesthetic_formula_on_fixed_embeddings():
    from align_bench.rewards.aesthetic import AestheticMLP, aesthetic_score

    head = AestheticMLP(2).eval()
    with torch.no_grad():
        for p in head.parameters():
            p.zero_()
        head.layers[0].weight[0] = torch.tensor([1.0, 2.0])  # x → 1·x0 + 2·x1 in unit 0, carried through unit 0
        for i in (2, 4, 6, 7):
            head.layers[i].weight[0, 0] = 1.0
        head.layers[7].bias.fill_(5.0)
    embeds = torch.tensor([[3.0, 4.0], [0.0, -2.0]])  # unit vectors (0.6, 0.8) and (0, −1)
    torch.testing.assert_close(aesthetic_score(embeds, head), torch.tensor([0.6 + 1.6 + 5.0, -2.0 + 5.0]))


def test_pickscore_formula_and_its_two_scales(replicas, rewards):
    from align_bench.rewards.pickscore import pickscore

    img, txt = torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0, 2.0]])
    torch.testing.assert_close(pickscore(img, txt, torch.tensor(math.log(100.0))), torch.tensor([100 / math.sqrt(2)]))
    torch.testing.assert_close(pickscore(img, txt, None), torch.tensor([1 / math.sqrt(2)]))
    raw = build_reward("pickscore", **replicas["pickscore"], scale="raw")
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        official, cos = rewards["pickscore"](images, PROMPTS[:2]), raw(images, PROMPTS[:2])
    torch.testing.assert_close(official, rewards["pickscore"].model.logit_scale.exp() * cos)
    assert cos.abs().max() <= 1 and "logit_scale" in rewards["pickscore"].convention


def test_hpsv2_is_the_cosine_of_open_clip_features_and_x100_scales_it(replicas, rewards):
    hps = rewards["hpsv2"]
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        scores = hps(images, PROMPTS[:2])
        out = hps.model(hps.preprocess(images), hps.tokenizer(PROMPTS[:2]))  # open_clip's own forward, output_dict
        torch.testing.assert_close(scores, (out["image_features"] @ out["text_features"].T).diagonal())
        x100 = build_reward("hpsv2", **replicas["hpsv2"], scale="x100")(images, PROMPTS[:2])
    torch.testing.assert_close(x100, 100 * scores)


def test_hpsv2_loads_either_version_and_refuses_an_unknown_one(replicas, tmp_path):
    from align_bench.rewards.testing import build_hpsv2

    kwargs = build_hpsv2(tmp_path / "v20", version="v2.0")
    assert build_reward("hpsv2", **kwargs).version == "v2.0"
    with pytest.raises(ValueError, match="unknown version 'v3'"):
        build_reward("hpsv2", **{**kwargs, "version": "v3"})


def test_imagereward_key_map_covers_every_key_of_the_reference_checkpoint():
    """tests/data/imagereward_keys.json is the full state-dict key list (with shapes) of image-reward 1.5's
    ImageReward module at its real size (tests/scripts/imagereward_reference_keys.py): every key maps onto our
    module with the same shape, or is one of the deliberately dropped ones; no key of our module is left unfilled."""
    from align_bench.rewards.imagereward import ImageRewardModel, blip_configs, map_imagereward_key

    reference = json.loads((DATA / "imagereward_keys.json").read_text())["keys"]
    assert len(reference) == 625
    med = {"vocab_size": 30524, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
           "num_attention_heads": 12, "max_position_embeddings": 512, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
           "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "pad_token_id": 0}
    shapes = {k: torch.empty(v, device="meta") for k, v in reference.items()}
    vision, text = blip_configs(shapes, med)
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads, vision.image_size,
            vision.patch_size, vision.intermediate_size) == (1024, 24, 16, 224, 16, 4096)
    with torch.device("meta"):
        ours = {k: list(v.shape) for k, v in ImageRewardModel(vision, text).state_dict().items()}
    mapped = {k: map_imagereward_key(k) for k in reference}
    dropped = sorted(k for k, v in mapped.items() if v is None)
    assert dropped == ["blip.text_encoder.embeddings.position_ids", "blip.text_proj.bias", "blip.text_proj.weight",
                       "blip.vision_proj.bias", "blip.vision_proj.weight"]
    targets = {v: reference[k] for k, v in mapped.items() if v is not None}
    assert len(targets) == len(reference) - len(dropped)  # injective
    assert set(targets) == set(ours), (set(targets) ^ set(ours))
    assert all(targets[k] == ours[k] for k in ours), [k for k in ours if targets[k] != ours[k]][:5]
    with pytest.raises(KeyError, match="not covered"):
        map_imagereward_key("blip.text_decoder.cls.predictions.bias")


def test_imagereward_vision_encoder_equals_blips_timm_vit_and_the_normalisation(replicas, rewards):
    """BLIP's ViT is timm's VisionTransformer: loaded with the same checkpoint tensors it gives the hidden states
    that our BlipVisionModel gives after the key map; official = (raw − 0.16717)/1.03334."""
    from functools import partial

    import timm.models.vision_transformer as vit

    from align_bench.rewards.imagereward import REWARD_MEAN, REWARD_STD

    state = torch.load(Path(replicas["imagereward"]["checkpoint"]) / "ImageReward.pt", weights_only=True)
    reference = vit.VisionTransformer(img_size=32, patch_size=16, embed_dim=64, depth=1, num_heads=1, qkv_bias=True,
                                      num_classes=0, global_pool="token",
                                      norm_layer=partial(torch.nn.LayerNorm, eps=1e-6)).eval()
    reference.load_state_dict({k.removeprefix("blip.visual_encoder."): v for k, v in state.items()
                               if k.startswith("blip.visual_encoder.")})
    pixels = torch.randn(2, 3, 32, 32)
    model = rewards["imagereward"].model
    with torch.no_grad():
        torch.testing.assert_close(model.vision(pixel_values=pixels).last_hidden_state,
                                   reference.forward_features(pixels), atol=1e-5, rtol=1e-5)
        images = torch.rand(2, 3, 32, 32)
        raw = build_reward("imagereward", **replicas["imagereward"], scale="raw")(images, PROMPTS[:2])
        official = rewards["imagereward"](images, PROMPTS[:2])
    torch.testing.assert_close(official, (raw - REWARD_MEAN) / REWARD_STD)
    assert REWARD_MEAN == 0.16717362830052426 and REWARD_STD == 1.0333394966054072
    ids = rewards["imagereward"].tokenizer(["a cat"], padding="max_length", max_length=35).input_ids[0]
    tok = rewards["imagereward"].tokenizer
    assert len(ids) == 35 and tok.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [len(tok) - 2, len(tok) - 1]


@pytest.mark.parametrize("name, hub_id, tiny", [("aesthetic", "openai/clip-vit-large-patch14", "tiny_aesthetic"),
                                                ("pickscore", "yuvalkirstain/PickScore_v1", "tiny_pickscore"),
                                                ("hpsv2", "xswu/HPSv2", "tiny_pickscore"),
                                                ("imagereward", "THUDM/ImageReward", "tiny_pickscore")])
def test_missing_weights_are_one_line_naming_the_download_and_the_tiny_counterpart(name, hub_id, tiny, monkeypatch,
                                                                                  tmp_path):
    from align_bench.models.hub import MissingCheckpointError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    cfg = compose([f"reward={name}"])
    with pytest.raises(MissingCheckpointError) as e:
        build_reward(cfg.reward.name, **cfg.reward.kwargs)
    msg = str(e.value)
    assert "\n" not in msg and f"huggingface-cli download {hub_id}" in msg and f"reward={tiny}" in msg


def test_missing_extra_names_what_to_install(monkeypatch, replicas):
    import sys

    from align_bench.rewards.pretrained import MissingRewardDependency

    monkeypatch.setitem(sys.modules, "open_clip", None)  # `import open_clip` now raises ImportError
    with pytest.raises(MissingRewardDependency, match=r"needs open_clip_torch: pip install -e '\.\[rewards\]'.*"
                                                      r"reward=tiny_pickscore"):
        build_reward("hpsv2", **replicas["hpsv2"])


@pytest.mark.parametrize("name", REAL)
def test_yaml_kwargs_are_the_constructor_defaults(name):
    """`eval.rewards: [name]` builds a reward with no kwargs: it must be the reward the YAML describes."""
    import inspect

    from align_bench.rewards import REWARDS

    kwargs = dict(compose([f"reward={name}"]).reward.kwargs)
    params = inspect.signature(REWARDS[name].__init__).parameters
    assert kwargs == {k: p.default for k, p in params.items() if k != "self"}


def test_unknown_scale_is_refused(replicas):
    with pytest.raises(ValueError, match="unknown scale 'x100'.*official.*raw"):
        build_reward("pickscore", **replicas["pickscore"], scale="x100")


def test_combo_is_the_weighted_sum_of_its_components():
    combo = build_reward("combo", components={"brightness": {"weight": 2.0},
                                              "jpeg_compressibility": {"weight": -0.5, "kwargs": {"quality": 90}}})
    images = torch.rand(3, 3, 16, 16)
    expected = 2.0 * build_reward("brightness")(images, ["a"] * 3) \
        - 0.5 * build_reward("jpeg_compressibility", quality=90)(images, ["a"] * 3)
    torch.testing.assert_close(combo(images, ["a"] * 3), expected)
    assert not combo.differentiable and "2·[brightness] + -0.5·[jpeg_compressibility]" in combo.convention
    with pytest.raises(KeyError, match="unknown reward 'nope'"):
        build_reward("combo", components={"nope": {"weight": 1.0}})
    with pytest.raises(ValueError, match="needs `weight`"):
        build_reward("combo", components={"brightness": {"scale": 1.0}})
    assert compose(["reward=combo"]).reward.kwargs.components.tiny_pickscore.weight == 0.1


@pytest.mark.parametrize("name, algo", [("aesthetic", "alignprop"), ("pickscore", "alignprop"), ("hpsv2", "ddpo"),
                                        ("imagereward", "ddpo")])
def test_real_reward_trains_through_the_runner(name, algo, replicas, random_pipeline_dir, tmp_path):
    """`reward=<name>` with its YAML, the replica's paths as overrides: one short run (AlignProp: the gradient path;
    DDPO: the batched no-grad path); its scale convention lands in metrics.json."""
    from align_bench.runner import run

    sizes = {"alignprop": ["algo.sample.batch_size=2", "algo.backprop.strategy=uniform"],
             "ddpo": ["algo.sample.batch_size=2", "algo.train.batch_size=2"]}[algo]
    overrides = [f"algo={algo}", f"model.path={random_pipeline_dir}", f"reward={name}",
                 *(f"reward.kwargs.{k}={v}" for k, v in replicas[name].items()), "prompts=simple_animals",
                 "prompts.eval_max_prompts=1", "prompts.eval_seeds_per_prompt=1", "steps.train=2", "steps.eval=[1]",
                 "eval.base=false", "logger=quiet", "logger.save_images=false", "logger.plots=false",
                 "algo.num_epochs=1", "algo.sample.num_batches_per_epoch=1", *sizes, "device=cpu",
                 f"run_dir={tmp_path}"]
    metrics = run(compose(overrides), tmp_path)
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["run"]["optimizer_steps"] >= 1 and metrics["run"]["reward_queries"] >= 2
    assert written["run"]["reward_convention"].startswith(f"{name}: scale=official")
    assert math.isfinite(written["eval"]["final"][name]["1"]["mean"])


def test_clip_features_are_the_projected_embeddings_on_transformers_5(rewards):
    """transformers 5's get_image_features / get_text_features return an output object whose pooler_output is the
    projection of the pooled state (4.x returned that tensor); `features` takes it, whichever the version."""
    from align_bench.rewards.pretrained import features

    clip = rewards["pickscore"].model
    pixels = torch.randn(2, 3, 32, 32)
    ids = rewards["pickscore"].tokenizer(["a", "b c"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(features(clip.get_image_features(pixel_values=pixels)),
                                   clip.visual_projection(clip.vision_model(pixel_values=pixels).pooler_output))
        torch.testing.assert_close(features(clip.get_text_features(**ids)),
                                   clip.text_projection(clip.text_model(**ids).pooler_output))
    tensor = torch.ones(2, 3)
    assert features(tensor) is tensor


@pytest.mark.parametrize("preset", ["alignprop_sd15_hps", "alignprop_sd15_hps_k1"])
def test_alignprop_hps_presets_score_with_hps_v20_as_the_reference(preset):
    assert compose([f"experiment={preset}"]).reward.kwargs.version == "v2.0"
