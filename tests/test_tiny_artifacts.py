"""Committed tiny-world artifacts load offline through stock diffusers / transformers classes and sample."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from align_bench import resolve_path  # noqa: E402

ROOT = resolve_path("assets/tiny-world")
PROMPTS = ["a red circle on a blue background", "two white squares on a green background"]


def test_tiny_stable_diffusion_pipeline_samples():
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(ROOT / "tiny"))
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    cfg = pipe.scheduler.config
    # The pipeline's deprecation shim lifts steps_offset to 1 in memory (unused by trailing spacing): check the file.
    stored = json.loads((ROOT / "tiny" / "scheduler" / "scheduler_config.json").read_text())
    assert (cfg.timestep_spacing, cfg.set_alpha_to_one, cfg.clip_sample, stored["steps_offset"]) == (
        "trailing", False, False, 0)
    assert (cfg.beta_schedule, cfg.beta_start, cfg.beta_end, cfg.num_train_timesteps) == ("scaled_linear", 0.00085,
                                                                                          0.012, 1000)
    assert pipe.unet.config.sample_size == 8 and pipe.vae.config.latent_channels == 4
    out = pipe(PROMPTS, num_inference_steps=2, guidance_scale=5.0, generator=torch.Generator().manual_seed(0),
               output_type="pt").images
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()
    pil = pipe(PROMPTS[:1], num_inference_steps=1).images[0]
    assert pil.size == (32, 32)


def test_tiny_lcm_pipeline_samples():
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler

    pipe = LatentConsistencyModelPipeline.from_pretrained(str(ROOT / "tiny-lcm"))
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, LCMScheduler)
    assert pipe.unet.config.time_cond_proj_dim == 256
    for steps in (1, 2, 4):
        out = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=7.5, generator=torch.Generator().manual_seed(0),
                   output_type="pt").images
        assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()


def test_guidance_embedding_matches_the_lcm_pipeline():
    from diffusers import LatentConsistencyModelPipeline

    from align_bench.tiny.train import guidance_embedding

    w = torch.tensor([0.0, 1.5, 6.5])
    ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=256)
    assert torch.allclose(guidance_embedding(w, 256), ref, atol=1e-5)


def test_clip_and_vae_load():
    from diffusers import AutoencoderKL
    from transformers import AutoTokenizer, CLIPModel

    clip = CLIPModel.from_pretrained(str(ROOT / "clip"))
    tok = AutoTokenizer.from_pretrained(str(ROOT / "clip"))
    ids = tok([""], padding="max_length", return_tensors="pt").input_ids
    assert ids.shape == (1, 16)
    assert clip.config.vision_config.image_size == 32
    vae = AutoencoderKL.from_pretrained(str(ROOT / "tiny"), subfolder="vae")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
    assert z.shape == (2, 4, 8, 8)
    assert 0.01 < vae.config.scaling_factor < 100


def test_model_cards_and_size_budget():
    total = sum(p.stat().st_size for p in ROOT.rglob("*") if p.is_file())
    assert total <= 30 * 1024 * 1024, f"tiny world is {total / 2**20:.1f} MB > 30 MB"
    for name in ("tiny", "tiny-lcm", "clip", "aesthetic"):
        card = (ROOT / name / "README.md").read_text()
        assert "python -m align_bench.tiny.build" in card and "align_bench.tiny.evaluate" in card


def test_quality_bar_check_reads_the_metrics_it_names():
    from align_bench.tiny.evaluate import quality_bars

    m = {"tiny": {"seen_20steps": {"colour_acc": 0.90, "shape_acc": 0.5}, "heldout_20steps": {"colour_acc": 0.84}},
         "tiny_lcm": {"seen_2steps": {"colour_acc": 0.75}}}
    got = {label: (v, ok) for label, v, _, ok in quality_bars(m)}
    assert got == {"tiny, 20 DDIM steps, colour accuracy, seen pairs": (0.90, True),
                   "tiny, 20 DDIM steps, colour accuracy, held-out pairs": (0.84, False),
                   "tiny, 20 DDIM steps, shape accuracy, seen pairs": (0.5, False),
                   "tiny-lcm, 2 steps, colour accuracy, seen pairs": (0.75, True)}
    assert [b[0] for b in quality_bars(m, "tiny_lcm")] == ["tiny-lcm, 2 steps, colour accuracy, seen pairs"]
