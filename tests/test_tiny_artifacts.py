"""Committed tiny-world artifacts load offline through stock diffusers / transformers classes and sample."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
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


def test_tiny_turbo_is_a_stock_few_step_pipeline_sharing_tiny_components():
    """tiny-turbo: stock StableDiffusionPipeline, trailing DDIM, plain ε UNet (no guidance input), its vae /
    text_encoder / tokenizer relative symlinks to tiny's (the same weights), samples at 1/2/4/8 steps without CFG."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    turbo_dir = ROOT / "tiny-turbo"
    for name in ("vae", "text_encoder", "tokenizer"):
        link = turbo_dir / name
        assert link.is_symlink() and os.readlink(link) == os.path.join("..", "tiny", name), name
    pipe = StableDiffusionPipeline.from_pretrained(str(turbo_dir))
    pipe.set_progress_bar_config(disable=True)
    cfg = pipe.scheduler.config
    stored = json.loads((turbo_dir / "scheduler" / "scheduler_config.json").read_text())
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert (cfg.timestep_spacing, cfg.set_alpha_to_one, stored["steps_offset"], cfg.prediction_type) == (
        "trailing", False, 0, "epsilon")
    assert pipe.unet.config.time_cond_proj_dim is None
    tiny = StableDiffusionPipeline.from_pretrained(str(ROOT / "tiny"))
    same = ("_name_or_path",)
    assert {k: v for k, v in pipe.unet.config.items() if k not in same} == {
        k: v for k, v in tiny.unet.config.items() if k not in same}
    for a, b in zip(pipe.text_encoder.parameters(), tiny.text_encoder.parameters()):
        assert torch.equal(a, b)
    for steps in (1, 2, 4, 8):
        out = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=1.0,
                   generator=torch.Generator().manual_seed(0), output_type="pt").images
        assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()


def test_tiny_turbo_card_numbers_reproduce():
    """The card's 1-step seen-pair numbers (metrics.json) are re-measured exactly by the evaluation's own sampler
    (stock pipeline, same prompts and seeds), and they meet the issue's bars."""
    from diffusers import StableDiffusionPipeline

    from align_bench.prompts import load_prompts
    from align_bench.rewards.tiny import TinyColourAccuracy
    from align_bench.tiny.evaluate import TURBO_GUIDANCE, quality_bars, sample

    m = json.loads((ROOT / "metrics.json").read_text())
    res = m["tiny_turbo"]
    n_per_prompt = res["n_per_split"] // 24
    assert res["n_per_split"] >= 48 and res["guidance_scale"] == TURBO_GUIDANCE == 1.0
    pipe = StableDiffusionPipeline.from_pretrained(str(ROOT / "tiny-turbo"))
    pipe.set_progress_bar_config(disable=True)
    prompts = [p for p in load_prompts("tiny_eval_seen")[:24] for _ in range(n_per_prompt)]
    acc = TinyColourAccuracy()(sample(pipe, prompts, 1, TURBO_GUIDANCE), prompts).mean().item()
    assert acc == pytest.approx(res["seen_1steps"]["colour_acc"], abs=1e-6)
    bars = quality_bars(m, "tiny_turbo")
    assert len(bars) == 5 and all(ok for *_, ok in bars), bars
    card = (ROOT / "tiny-turbo" / "README.md").read_text()
    assert f"{res['seen_1steps']['colour_acc']:.1%}" in card and "η = 1" in card


def _stored_bytes(root) -> int:
    """Bytes of the files under root, symlinks not followed (what git stores)."""
    total = 0
    for dirpath, _, files in os.walk(root):  # os.walk does not descend into symlinked directories
        total += sum(os.lstat(os.path.join(dirpath, f)).st_size for f in files)
    return total


def test_model_cards_and_size_budget():
    total = _stored_bytes(ROOT)
    assert total <= 40 * 1024 * 1024, f"tiny world is {total / 2**20:.1f} MB > 40 MB"
    for name in ("tiny", "tiny-lcm", "tiny-turbo", "clip", "aesthetic"):
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


def test_tiny_turbo_through_align_bench_samples_few_step_without_cfg():
    """`model=tiny_turbo` (guidance 1, trailing) loads through align_bench's own path, and its 1-step and 2-step
    rollouts (η = 0, the core's DDIM kernel) get the colours of seen-pair prompts right, as on the card."""
    from align_bench.core.rollout import rollout
    from align_bench.main import compose
    from align_bench.models import DiffusionModel, ModelSpec
    from align_bench.prompts import load_prompts
    from align_bench.rewards.tiny import TinyColourAccuracy

    cfg = compose(["model=tiny_turbo"])
    assert cfg.model.guidance_scale == 1.0 and cfg.model.timestep_spacing == "trailing"
    model = DiffusionModel.from_pretrained(ModelSpec.from_config(cfg.model))
    assert not model.is_lcm
    prompts = load_prompts("tiny_eval_seen")[:24]
    for steps in (1, 2):
        traj = rollout(model, prompts, num_steps=steps, eta=0.0, guidance_scale=cfg.model.guidance_scale,
                       generator=torch.Generator().manual_seed(0))
        assert traj.timesteps[0].tolist() == [999, 499][:steps]
        assert TinyColourAccuracy()(traj.images, prompts).mean().item() >= 0.7
