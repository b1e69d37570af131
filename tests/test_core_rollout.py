"""Rollout, log-prob recomputation, LoRA and the model adapter on random-weight pipelines."""

import pytest
import torch

from align_bench.core.rollout import Trajectory, rollout, step_log_prob


def _perturb_lora(model, scale=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def test_rollout_shapes_and_recomputed_log_prob_is_exact(random_pipeline_dir, load_model):
    model = load_model(random_pipeline_dir)
    model.add_lora(4, 4)
    _perturb_lora(model)
    traj = rollout(model, ["a cat", "a dog", "a cow"], num_steps=4, eta=1.0, guidance_scale=5.0,
                   generator=torch.Generator().manual_seed(0), keep_x0_preds=True)
    B, N = 3, 4
    assert traj.latents.shape == (B, N, 4, 8, 8) and traj.next_latents.shape == (B, N, 4, 8, 8)
    assert traj.log_probs.shape == (B, N) and traj.timesteps.shape == (B, N)
    assert traj.images.shape == (B, 3, 16, 16) and 0 <= traj.images.min() and traj.images.max() <= 1
    assert traj.timesteps[0].tolist() == [999, 749, 499, 249]
    assert traj.prev_timesteps[0].tolist() == [749, 499, 249, -1]
    assert torch.equal(traj.latents[:, 1:], traj.next_latents[:, :-1])
    with torch.no_grad():
        for k in range(N):
            out = step_log_prob(model, traj, k, eta=1.0, guidance_scale=5.0)
            assert torch.equal(out.log_prob, traj.log_probs[:, k]), k  # ratio exactly 1 with unchanged weights


def test_eta_zero_rejected_for_log_probs(random_pipeline_dir, load_model):
    model = load_model(random_pipeline_dir)
    traj = rollout(model, ["a"], num_steps=1, eta=1.0, guidance_scale=1.0, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="eta must be > 0"):
        step_log_prob(model, traj, 0, eta=0.0, guidance_scale=1.0)


def test_shared_initial_noise_and_seeding(random_pipeline_dir, load_model):
    model = load_model(random_pipeline_dir)
    x_T = model.initial_noise(2, torch.Generator().manual_seed(3))
    a = rollout(model, ["a", "b"], num_steps=2, eta=1.0, guidance_scale=1.0, initial_noise=x_T,
                generator=torch.Generator().manual_seed(1))
    b = rollout(model, ["a", "b"], num_steps=2, eta=1.0, guidance_scale=1.0, initial_noise=x_T,
                generator=torch.Generator().manual_seed(2))
    assert torch.equal(a.latents[:, 0], b.latents[:, 0])  # the pair shares x_T ...
    assert not torch.equal(a.next_latents[:, 0], b.next_latents[:, 0])  # ... and diverges through the η-noise
    c = rollout(model, ["a", "b"], num_steps=2, eta=1.0, guidance_scale=1.0, initial_noise=x_T,
                generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.images, c.images)


def test_trajectory_select_cat_and_step_reorder(random_pipeline_dir, load_model):
    model = load_model(random_pipeline_dir)
    traj = rollout(model, ["a", "b", "c"], num_steps=3, eta=1.0, guidance_scale=1.0,
                   generator=torch.Generator().manual_seed(0))
    sub = traj.select([2, 0])
    assert sub.prompts == ["c", "a"] and torch.equal(sub.latents[0], traj.latents[2])
    both = Trajectory.cat([sub, traj.select(slice(1, 2))])
    assert both.prompts == ["c", "a", "b"]
    order = torch.tensor([[2, 0], [1, 2], [0, 1]])
    re = traj.with_steps(order)
    assert re.timesteps.shape == (3, 2)
    for i in range(3):
        for j in range(2):
            assert re.timesteps[i, j] == traj.timesteps[i, order[i, j]]
            assert torch.equal(re.latents[i, j], traj.latents[i, order[i, j]])
            assert re.log_probs[i, j] == traj.log_probs[i, order[i, j]]


def test_lcm_rollout_decodes_last_denoised(random_lcm_dir, load_model):
    model = load_model(random_lcm_dir, model="tiny_lcm")
    assert model.is_lcm
    traj = rollout(model, ["a", "b"], num_steps=4, eta=1.0, guidance_scale=5.0,
                   generator=torch.Generator().manual_seed(0), keep_x0_preds=True)
    assert traj.timesteps[0].tolist() == [999, 759, 519, 279]
    assert traj.prev_timesteps[0].tolist() == [759, 519, 279, 279]  # RLCM: re-noise to the last level
    torch.testing.assert_close(traj.final_latents, traj.x0_preds[:, -1])
    with torch.no_grad():
        out = step_log_prob(model, traj, 2, eta=1.0, guidance_scale=5.0)
    assert torch.equal(out.log_prob, traj.log_probs[:, 2])
    one = rollout(model, ["a"], num_steps=1, eta=1.0, guidance_scale=5.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(one.next_latents[:, 0], one.final_latents)  # 1 step: d itself, no noise


def test_lora_disabled_is_the_base_model(random_pipeline_dir, load_model):
    model = load_model(random_pipeline_dir)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([500, 500])
    emb = model.encode_prompts(["a", "b"])
    with torch.no_grad():
        base = model.predict(x, t, emb, 5.0)
        model.add_lora(4, 4)
        assert torch.equal(model.predict(x, t, emb, 5.0), base)  # LoRA up-projection starts at zero
        _perturb_lora(model)
        assert not torch.allclose(model.predict(x, t, emb, 5.0), base)
        with model.lora_disabled():
            assert torch.equal(model.predict(x, t, emb, 5.0), base)
    assert all(p.dtype == torch.float32 for p in model.lora_parameters()) and model.lora_parameters()


def test_lora_round_trip_into_stock_diffusers_pipeline(random_pipeline_dir, load_model, tmp_path):
    """Saved LoRA loads into a stock StableDiffusionPipeline with load_lora_weights and gives identical images."""
    from diffusers import StableDiffusionPipeline

    model = load_model(random_pipeline_dir)
    model.add_lora(4, 4)
    _perturb_lora(model, scale=1.0)
    model.save_lora(tmp_path / "lora")

    def images(pipe):
        return pipe(["a red circle"], num_inference_steps=3, height=16, width=16, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    ours = StableDiffusionPipeline.from_pretrained(random_pipeline_dir)
    ours.unet = model.unet
    stock = StableDiffusionPipeline.from_pretrained(random_pipeline_dir)
    base_images = images(stock)
    stock.load_lora_weights(tmp_path / "lora")
    torch.testing.assert_close(images(stock), images(ours), atol=1e-5, rtol=1e-5)
    assert (images(stock) - base_images).abs().max() > 1e-3  # the LoRA really changes the images

    fresh = load_model(random_pipeline_dir)  # resume path: load back into a new adapter
    fresh.add_lora(4, 4)
    fresh.load_lora(tmp_path / "lora")
    for (n1, p1), (_, p2) in zip(model.unet.named_parameters(), fresh.unet.named_parameters()):
        if "lora" in n1:
            assert torch.equal(p1, p2), n1


def test_missing_checkpoint_names_what_to_download(tmp_path, load_model):
    from align_bench.models import MissingCheckpointError

    with pytest.raises(MissingCheckpointError, match="download the diffusers pipeline foo"):
        load_model(tmp_path / "nope", download_hint="'download the diffusers pipeline foo'")


def test_missing_hub_model_offline_names_the_download(load_model):
    from align_bench.models import MissingCheckpointError

    with pytest.raises(MissingCheckpointError, match="nor in the Hugging Face cache.*huggingface-cli download"):
        load_model("nobody/not-a-model", model="sd15")


def test_rollout_steps_are_the_one_denoising_step(random_pipeline_dir, load_model):
    """Each recorded transition is `denoising_step` on the stored input with the noise of that step's draw."""
    from align_bench.core.rollout import denoising_step

    model = load_model(random_pipeline_dir)
    gen = torch.Generator().manual_seed(5)
    x_T = model.initial_noise(2, torch.Generator().manual_seed(6))
    traj = rollout(model, ["a", "b"], num_steps=3, eta=1.0, guidance_scale=5.0, generator=gen, initial_noise=x_T)
    replay = torch.Generator().manual_seed(5)
    for k in range(3):
        noise = torch.randn((2, 4, 8, 8), generator=replay)  # the rollout draws one (B,C,h,w) per step
        with torch.no_grad():
            out = denoising_step(model, traj.latents[:, k], traj.timesteps[:, k], traj.prev_timesteps[:, k], traj.cond,
                                 guidance_scale=5.0, eta=1.0, noise=noise)
        assert torch.equal(out.prev_sample, traj.next_latents[:, k]) and torch.equal(out.log_prob, traj.log_probs[:, k])


def test_conditioning_selects_and_concatenates_with_the_trajectory(random_pipeline_dir, load_model):
    from align_bench.models.conditioning import Conditioning

    model = load_model(random_pipeline_dir)
    cond = model.encode_prompts(["a", "b", "c"])
    assert isinstance(cond, Conditioning) and cond.prompt_embeds.shape[0] == 3 and cond.pooled_embeds is None
    traj = rollout(model, ["a", "b", "c"], num_steps=2, eta=1.0, guidance_scale=5.0,
                   generator=torch.Generator().manual_seed(0), cond=cond)
    sub = traj.select([2, 0])
    assert torch.equal(sub.cond.prompt_embeds, cond.prompt_embeds[[2, 0]])
    both = Trajectory.cat([sub, traj.select(slice(1, 2))])
    assert torch.equal(both.cond.prompt_embeds, cond.prompt_embeds[[2, 0, 1]])
    assert torch.equal(model.uncond(3).prompt_embeds[2], model.encode_prompts([""]).prompt_embeds[0])
    sdxl_like = Conditioning(torch.zeros(2, 3, 4), pooled_embeds=torch.arange(2.0)[:, None], time_ids=torch.ones(2, 6))
    picked = Conditioning.cat([sdxl_like, sdxl_like]).select(torch.tensor([3, 0]))
    assert picked.pooled_embeds.flatten().tolist() == [1.0, 0.0] and picked.time_ids.shape == (2, 6)
    with pytest.raises(ValueError, match="different fields"):
        Conditioning.cat([sdxl_like, Conditioning(torch.zeros(1, 3, 4))])


def test_trajectory_file_round_trip_loads_with_weights_only(random_pipeline_dir, load_model, tmp_path):
    model = load_model(random_pipeline_dir)
    traj = rollout(model, ["a", "b"], num_steps=2, eta=1.0, guidance_scale=5.0,
                   generator=torch.Generator().manual_seed(0), keep_x0_preds=True)
    torch.save({"trajectory": traj.state()}, tmp_path / "t.pt")
    back = Trajectory.from_state(torch.load(tmp_path / "t.pt", weights_only=True)["trajectory"])
    assert back.prompts == traj.prompts and back.images is None
    for name in ("latents", "next_latents", "log_probs", "timesteps", "x0_preds", "final_latents"):
        assert torch.equal(getattr(back, name), getattr(traj, name)), name
    assert torch.equal(back.cond.prompt_embeds, traj.cond.prompt_embeds)


@pytest.mark.parametrize("model_cfg, which", [("tiny", "lcm"), ("tiny_lcm", "sd")])
def test_family_that_contradicts_the_checkpoint_is_refused_at_load(random_pipeline_dir, random_lcm_dir, load_model,
                                                                  model_cfg, which):
    path = random_lcm_dir if which == "lcm" else random_pipeline_dir
    with pytest.raises(ValueError) as e:
        load_model(path, model=model_cfg)
    msg = str(e.value)
    assert "\n" not in msg and f"model.family={'sd' if which == 'lcm' else 'lcm'}" in msg
    assert f"set model.family={which}" in msg
