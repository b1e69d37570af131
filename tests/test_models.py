"""Real model families on tiny random replicas (models/testing.py) of the same diffusers/transformers classes, saved
to a temp dir and loaded through the very path a user's checkpoint takes, with the settings of conf/model/<name>.yaml.
Each family's saved LoRA loads into its stock diffusers pipeline and reproduces the project's eval images."""

from __future__ import annotations

import pytest
import torch
from conftest import compose

# conf/model/<name>.yaml → the replica kind that stands in for its checkpoint
REAL_MODELS = {"sd15": "sd", "sd_turbo": "sd_turbo", "lcm": "lcm", "sdxl": "sdxl", "sdxl_turbo": "sdxl"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    from align_bench.models.testing import KINDS, build_random_pipeline

    root = tmp_path_factory.mktemp("replicas")
    return {kind: build_random_pipeline(root / kind, kind=kind) for kind in KINDS}


def _load(name, path, **overrides):
    from align_bench.models import DiffusionModel, ModelSpec

    overrides = {"dtype": "fp32", "resolution": "null", "vae": "null", **overrides}
    cfg = compose([f"model={name}", f"model.path={path}", *(f"model.{k}={v}" for k, v in overrides.items())])
    return DiffusionModel.from_pretrained(ModelSpec.from_config(cfg.model))


def test_sdxl_conditioning_is_both_encoders_penultimate_states_pooled_and_time_ids(replicas):
    """Against a hand computation with the replica's own encoders, and against the stock pipeline's encode_prompt."""
    from diffusers import StableDiffusionXLPipeline

    model = _load("sdxl", replicas["sdxl"])
    cond = model.encode_prompts(["a red circle", "b"])
    ids = [tok(["a red circle", "b"], padding="max_length", max_length=16, truncation=True,
               return_tensors="pt").input_ids for tok in (model.tokenizer, model.tokenizer_2)]
    h1 = model.text_encoder(ids[0], output_hidden_states=True).hidden_states[-2]
    out2 = model.text_encoder_2(ids[1], output_hidden_states=True)
    torch.testing.assert_close(cond.prompt_embeds, torch.cat([h1, out2.hidden_states[-2]], -1))
    torch.testing.assert_close(cond.pooled_embeds, out2.text_embeds)
    assert cond.prompt_embeds.shape == (2, 16, 64) and cond.pooled_embeds.shape == (2, 32)
    assert cond.time_ids.tolist() == [[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]] * 2  # (H, W, top, left, H, W) at 16 px

    pipe = StableDiffusionXLPipeline.from_pretrained(replicas["sdxl"])
    pe, npe, pooled, npooled = pipe.encode_prompt(["a red circle", "b"], do_classifier_free_guidance=True)
    torch.testing.assert_close(cond.prompt_embeds, pe)
    torch.testing.assert_close(cond.pooled_embeds, pooled)
    uncond = model.uncond(2)  # force_zeros_for_empty_prompt: the stock pipeline's negative branch is all zeros
    torch.testing.assert_close(uncond.prompt_embeds, npe) and torch.testing.assert_close(uncond.pooled_embeds, npooled)
    assert uncond.prompt_embeds.abs().sum() == 0 and uncond.time_ids.shape == (2, 6)


def _stock_pipeline(kind, path, model):
    """The stock diffusers pipeline of `kind`, with the scheduler the project's eval sampler equals (DDIM η = 0 on the
    model's spacing with ᾱ_0 at the end; LCMScheduler for LCM)."""
    from diffusers import (
        DDIMScheduler,
        LatentConsistencyModelPipeline,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )

    cls = {"sd": StableDiffusionPipeline, "sd_turbo": StableDiffusionPipeline, "lcm": LatentConsistencyModelPipeline,
           "sdxl": StableDiffusionXLPipeline}[kind]
    extra = {"safety_checker": None, "requires_safety_checker": False} if kind != "sdxl" else {}
    pipe = cls.from_pretrained(path, **extra)
    if kind != "lcm":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing=model.spec.timestep_spacing,
                                                   steps_offset=model.spec.steps_offset, set_alpha_to_one=False,
                                                   clip_sample=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("name", list(REAL_MODELS))
def test_saved_lora_loads_into_the_stock_pipeline_and_reproduces_eval_images(name, replicas, tmp_path):
    from align_bench.core.evaluation import evaluate, initial_noise_for

    kind = REAL_MODELS[name]
    model = _load(name, replicas[kind])
    model.add_lora(4, 4)
    gen = torch.Generator().manual_seed(1)
    for p in model.lora_parameters():  # a LoRA that changes the images (peft initialises the up-projection to 0)
        p.data = 0.3 * torch.randn(p.shape, generator=gen)
    model.save_lora(tmp_path / "lora")
    # LCM's multi-step sampler re-noises between steps (a stream of its own), so it is compared at 1 step
    steps = 1 if kind == "lcm" else 2
    guidance = 5.0
    items = [("a red circle", 11), ("a blue square", 12)]
    _, kept = evaluate(model, {}, items, [steps], guidance_scale=guidance, eta=0.0, progress=False, keep_images=2)
    ours = kept[steps]

    pipe = _stock_pipeline(kind, replicas[kind], model)
    x_T = initial_noise_for(model, [s for _, s in items])

    def stock_images():
        return pipe([p for p, _ in items], num_inference_steps=steps, guidance_scale=guidance, height=16, width=16,
                    latents=x_T.clone(), output_type="pt").images

    base = stock_images()
    pipe.load_lora_weights(tmp_path / "lora")
    torch.testing.assert_close(stock_images(), ours, atol=1e-4, rtol=1e-4)
    assert (ours - base).abs().max() > 1e-2  # the LoRA really changes the images


def test_separate_vae_loads_from_model_vae(replicas):
    """model.vae (SDXL's fp16-fix VAE) replaces the pipeline's VAE: pointed at another VAE, decoding changes."""
    from diffusers import AutoencoderKL

    other = AutoencoderKL.from_pretrained(replicas["sdxl"], subfolder="vae")
    torch.manual_seed(3)
    for p in other.parameters():
        p.data += 0.1 * torch.randn_like(p)
    vae_dir = replicas["sdxl"].parent / "other_vae"
    other.save_pretrained(vae_dir)
    own, swapped = _load("sdxl", replicas["sdxl"]), _load("sdxl", replicas["sdxl"], vae=str(vae_dir))
    z = torch.randn(1, 4, 8, 8)
    assert not torch.allclose(own.decode(z), swapped.decode(z))
    torch.testing.assert_close(swapped.decode(z), (other.decode(z / other.config.scaling_factor).sample / 2 + 0.5)
                               .clamp(0, 1))


@pytest.mark.parametrize("name, hub_id", [("sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
                                          ("sd_turbo", "stabilityai/sd-turbo"), ("lcm", "SimianLuo/LCM_Dreamshaper_v7"),
                                          ("sdxl", "stabilityai/stable-diffusion-xl-base-1.0"),
                                          ("sdxl_turbo", "stabilityai/sdxl-turbo")])
def test_offline_without_a_local_copy_names_the_hub_id_and_the_download_command(name, hub_id, monkeypatch, tmp_path):
    from align_bench.models import DiffusionModel, MissingCheckpointError, ModelSpec

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache: no local copy
    cfg = compose([f"model={name}"])
    assert cfg.model.path == hub_id
    with pytest.raises(MissingCheckpointError) as e:
        DiffusionModel.from_pretrained(ModelSpec.from_config(cfg.model))
    msg = str(e.value)
    assert "\n" not in msg and hub_id in msg and f"`huggingface-cli download {hub_id}`" in msg


def test_missing_vae_names_its_hub_id(replicas, monkeypatch, tmp_path):
    from align_bench.models import MissingCheckpointError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(MissingCheckpointError, match="huggingface-cli download madebyollin/sdxl-vae-fp16-fix"):
        _load("sdxl", replicas["sdxl"], vae="madebyollin/sdxl-vae-fp16-fix")


@pytest.mark.parametrize("name, kind", [("sdxl", "sd"), ("sd15", "sdxl"), ("lcm", "sdxl")])
def test_family_that_contradicts_the_checkpoint_is_refused(name, kind, replicas):
    found = "sdxl" if kind == "sdxl" else "sd"
    with pytest.raises(ValueError, match=f"model.family=.* but the UNet .* is a '{found}'"):
        _load(name, replicas[kind])


def test_hub_id_in_the_local_cache_resolves_offline(replicas, monkeypatch, tmp_path):
    """A hub id whose snapshot is in the HF cache loads with HF_HUB_OFFLINE=1 (the cache layout huggingface_hub
    writes: models--owner--name/{refs/main, snapshots/<commit>/...}), for a pipeline and for a single file."""
    import shutil

    from align_bench.models.hub import resolve_file

    commit = "0" * 40
    repo = tmp_path / "models--someone--tiny-sdxl"
    shutil.copytree(replicas["sdxl"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    model = _load("sdxl", "someone/tiny-sdxl")
    assert model.family == "sdxl" and model.text_encoder_2 is not None
    found = resolve_file("someone/tiny-sdxl", "someone/tiny-sdxl", "model_index.json", what="test")
    assert found == repo / "snapshots" / commit / "model_index.json"
