"""Step-aware preference models: the time-conditioned CLIP on a tiny random replica of the released classes (the
layer loop reproduces CLIP exactly at the identity init, the reference init's modulation by hand, time
dependence), the released-checkpoint loader's strictness rule, the preprocessing, and the tiny SPM."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_world_missing

from align_bench.rewards import build_reward
from align_bench.rewards.spm import (add_time_conditioning, load_released, time_conditioned_image_features,
                                     timestep_features)


def test_timestep_features_by_hand():
    f = timestep_features(torch.tensor([0, 1]), dim=4)
    # half = 2 frequencies: 1 and 10000^(−1/2) = 0.01; layout [cos, cos, sin, sin]
    expected = torch.tensor([[1.0, 1.0, 0.0, 0.0], [math.cos(1), math.cos(0.01), math.sin(1), math.sin(0.01)]])
    torch.testing.assert_close(f, expected)
    assert timestep_features(torch.tensor([3]), dim=5).shape == (1, 5)  # odd: zero-padded


def _clip(seed: int = 0, image_size: int = 224):
    """A tiny random CLIPModel of the released classes (the stand-in for PickScore_v1), with a char tokenizer."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    from align_bench.models.testing import char_clip_tokenizer

    torch.manual_seed(seed)
    tok = char_clip_tokenizer(max_length=16)
    text = CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, max_position_embeddings=16, projection_dim=16,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = CLIPVisionConfig(image_size=image_size, patch_size=32, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=2, projection_dim=16)
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)
    return CLIPModel(config).eval(), tok


def test_identity_init_reproduces_the_plain_clip():
    """Our layer loop with shift = scale = 0, gate = 1 and a zero final modulation is CLIP's vision tower: the
    features equal transformers' own, whatever t."""
    clip, _ = _clip()
    x = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        plain = clip.visual_projection(clip.vision_model(pixel_values=x).pooler_output)
        add_time_conditioning(clip, init="identity")
        for t in (0, 500, 999):
            ours = time_conditioned_image_features(clip, x, torch.full((3,), t))
            torch.testing.assert_close(ours, plain, rtol=1e-4, atol=1e-5)


def test_reference_init_modulates_by_one_and_time_changes_scores():
    """Reference init: shift = scale = gate = 1 in every layer (weight 0, bias 1), so one layer is
    h + (attn(2·LN1(h) + 1)) then + mlp(2·LN2(h) + 1) — checked by hand on a 1-layer tower. Once the modulation
    weights are non-zero the features depend on t."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    torch.manual_seed(0)
    vision = CLIPVisionConfig(image_size=64, patch_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2, projection_dim=16)
    text = CLIPTextConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, max_position_embeddings=16, projection_dim=16)
    clip = add_time_conditioning(CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                                      projection_dim=16)).eval(), init="reference")
    vm, layer = clip.vision_model, clip.vision_model.encoder.layers[0]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        h = vm.pre_layrnorm(vm.embeddings(x))
        h = h + layer.self_attn(hidden_states=2 * layer.layer_norm1(h) + 1)[0]
        h = h + layer.mlp(2 * layer.layer_norm2(h) + 1)
        by_hand = clip.visual_projection(vm.post_layernorm(h[:, 0]))
        torch.testing.assert_close(time_conditioned_image_features(clip, x, torch.tensor([0, 900])), by_hand,
                                   rtol=1e-4, atol=1e-5)
        torch.nn.init.normal_(layer.adaLN_modulation[1].weight, std=0.1)
        a = time_conditioned_image_features(clip, x, torch.tensor([0, 0]))
        b = time_conditioned_image_features(clip, x, torch.tensor([0, 900]))
    torch.testing.assert_close(a[0], b[0])
    assert not torch.allclose(a[1], b[1], atol=1e-4)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A replica of the released layout: the 'PickScore' init dir, a processor dir (CLIP-H's 224 / mean / std, a char
    tokenizer), and a checkpoint: the init + time modules, every weight perturbed, saved with the `model.` prefix."""
    from transformers import CLIPImageProcessor, CLIPProcessor

    root = tmp_path_factory.mktemp("spm")
    clip, tok = _clip()
    clip.save_pretrained(root / "pickscore")
    image_processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                                         image_mean=[0.48145466, 0.4578275, 0.40821073],
                                         image_std=[0.26862954, 0.26130258, 0.27577711])
    CLIPProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(root / "processor")
    trained = add_time_conditioning(_clip()[0], init="reference")
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.05 * torch.randn_like(p))
    state = {f"model.{k}": v.clone() for k, v in trained.state_dict().items()}
    torch.save(state, root / "spm.bin")
    return root, trained, state


def test_released_checkpoint_loads_and_scores(released):
    root, trained, _ = released
    spm = build_reward("spm", init_path=str(root / "pickscore"), checkpoint=str(root / "spm.bin"),
                       processor_path=str(root / "processor"))
    for k, v in trained.state_dict().items():
        torch.testing.assert_close(spm.clip.state_dict()[k], v, rtol=0, atol=0)
    images = torch.rand(4, 3, 48, 64)
    prompts = ["a red circle", "a blue square", "a red circle", "a blue square"]
    s0 = spm(images, prompts, torch.zeros(4, dtype=torch.long))
    s9 = spm(images, prompts, torch.full((4,), 900))
    assert s0.shape == (4,) and torch.isfinite(s0).all() and not torch.allclose(s0, s9)
    torch.testing.assert_close(spm(images, prompts), s0)  # final samples are judged at t = 0
    # the score is logit_scale.exp()·cos(image, text) of the loaded model, on the preprocessed pixels
    with torch.no_grad():
        img = time_conditioned_image_features(trained, spm.pixel_values(images), torch.zeros(4, dtype=torch.long))
        ids = spm.tokenizer(prompts, padding="max_length", max_length=16, truncation=True,
                            return_tensors="pt").input_ids
        txt = trained.text_projection(trained.text_model(input_ids=ids).pooler_output)
        cos = torch.nn.functional.cosine_similarity(img, txt)
    torch.testing.assert_close(s0, trained.logit_scale.exp() * cos, rtol=1e-5, atol=1e-5)


def test_preprocessing_resizes_the_short_side_and_centre_crops(released):
    root, _, _ = released
    spm = build_reward("spm", init_path=str(root / "pickscore"), checkpoint=str(root / "spm.bin"),
                       processor_path=str(root / "processor"))
    grey = torch.full((1, 3, 48, 64), 0.5)
    x = spm.pixel_values(grey)
    assert x.shape == (1, 3, 224, 224)  # 48×64 → 224×299 (rounded) → centre crop 224
    expected = (0.5 - spm.mean) / spm.std
    torch.testing.assert_close(x, expected.expand_as(x), rtol=1e-5, atol=1e-5)
    ramp = torch.linspace(0, 1, 64).view(1, 1, 1, 64).expand(1, 3, 48, 64)
    row = spm.pixel_values(ramp)[0, 0, 0] * spm.std[0, 0, 0] + spm.mean[0, 0, 0]
    assert row[0] > 0.05 and row[-1] < 0.95  # the crop cut both ends of the ramp off, symmetrically
    assert abs(float(row[0] + row[-1]) - 1.0) < 0.02


def test_loader_strictness_rule(released):
    """No missing key; a key the model does not hold must equal the attribute it names; the `model.` prefix is
    optional."""
    _, _, state = released

    def fresh():
        return add_time_conditioning(_clip()[0], init="reference")

    load_released(fresh(), {k[len("model."):]: v for k, v in state.items()})  # no prefix: fine
    incomplete = dict(state)
    incomplete.pop("model.vision_model.encoder.layers.0.adaLN_modulation.1.weight")
    with pytest.raises(ValueError, match="lacks 1 keys"):
        load_released(fresh(), incomplete)
    model = fresh()
    ids = model.text_model.embeddings.position_ids  # a non-persistent buffer: not in the state dict
    assert "text_model.embeddings.position_ids" not in model.state_dict()
    load_released(model, {**state, "model.text_model.embeddings.position_ids": ids.clone()})  # equal: fine
    with pytest.raises(ValueError, match="same value"):
        load_released(fresh(), {**state, "model.text_model.embeddings.position_ids": ids.clone() + 1})
    with pytest.raises(ValueError, match="same value"):
        load_released(fresh(), {**state, "model.vision_model.nonexistent.weight": torch.zeros(2)})


def test_missing_files_are_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="reward.kwargs.init_path"):
        build_reward("spm", init_path=str(tmp_path / "nope"), checkpoint="x", processor_path="y")


@pytest.mark.skipif(tiny_world_missing("clip", "spm"), reason="tiny SPM not built (make tiny-world)")
def test_tiny_spm_is_step_aware():
    spm = build_reward("tiny_spm")
    assert spm.step_aware
    images = torch.rand(2, 3, 32, 32)
    prompts = ["a red circle on a blue background"] * 2
    s0, s7 = spm(images, prompts, torch.zeros(2, dtype=torch.long)), spm(images, prompts, torch.full((2,), 751))
    assert torch.isfinite(s0).all() and not torch.allclose(s0, s7)
    torch.testing.assert_close(spm(images, prompts), s0)
