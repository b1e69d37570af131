"""DDPO: the loss against its formula, the advantage pipeline, ratio = 1 before the first update, and runs."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import FAST_RUN, compose

from align_bench.algorithms import ddpo
from align_bench.core.stats import PromptStatTracker


def test_ppo_loss_hand_computed():
    log_prob = torch.tensor([0.0, 2e-4, -3e-4, 0.0])
    old = torch.zeros(4)
    adv = torch.tensor([1.0, 2.0, -1.0, 9.0])  # 9 is clipped to 5
    loss, info = ddpo.ppo_loss(log_prob, old, adv, clip_range=1e-4, adv_clip_max=5.0)
    terms = []
    for lp, a in zip(log_prob.tolist(), [1.0, 2.0, -1.0, 5.0]):
        r = math.exp(lp)
        terms.append(max(-a * r, -a * min(max(r, 1 - 1e-4), 1 + 1e-4)))
    assert loss.item() == pytest.approx(sum(terms) / 4, abs=1e-7)
    assert info["clipfrac"].item() == pytest.approx(0.5)
    assert info["approx_kl"].item() == pytest.approx(0.5 * np.mean([0, 4e-8, 9e-8, 0]), rel=1e-3)


def test_ppo_loss_at_ratio_one():
    adv = torch.tensor([0.3, -1.2])
    lp = torch.tensor([-0.91, -0.95], requires_grad=True)
    loss, info = ddpo.ppo_loss(lp, lp.detach().clone(), adv, 1e-4, 5.0)
    assert loss.item() == pytest.approx(-adv.mean().item())
    assert info["clipfrac"] == 0 and info["approx_kl"] == 0 and info["ratio_mean"] == 1
    loss.backward()
    torch.testing.assert_close(lp.grad, -adv / 2)  # higher advantage ⇒ gradient descent raises log π


def test_advantages_per_prompt_and_whitened():
    r = np.array([1.0, 3.0, 10.0, 30.0])
    np.testing.assert_allclose(ddpo.compute_advantages(list("aabb"), r, None), (r - r.mean()) / (r.std() + 1e-8))
    tr = PromptStatTracker(buffer_size=16, min_count=2)
    adv = ddpo.compute_advantages(list("aabb"), r, tr)
    np.testing.assert_allclose(adv, [-1, 1, -1, 1], atol=1e-5)


def test_shuffle_keeps_samples_and_steps_aligned(random_pipeline_dir, load_model):
    from align_bench.core.rollout import rollout

    model = load_model(random_pipeline_dir)
    traj = rollout(model, ["a", "b", "c", "d"], num_steps=4, eta=1.0, guidance_scale=1.0,
                   generator=torch.Generator().manual_seed(0))
    adv = torch.arange(4.0)
    shuffled, sadv = ddpo.shuffle_for_training(traj, adv, torch.Generator().manual_seed(1), timestep_fraction=0.5)
    assert shuffled.timesteps.shape == (4, 2)
    for i in range(4):
        src = traj.prompts.index(shuffled.prompts[i])
        assert sadv[i] == adv[src]
        for j in range(2):
            k = traj.timesteps[src].tolist().index(shuffled.timesteps[i, j].item())
            assert torch.equal(shuffled.latents[i, j], traj.latents[src, k])
            assert shuffled.log_probs[i, j] == traj.log_probs[src, k]


def _fast_cfg(random_pipeline_dir, *extra):
    return compose([*FAST_RUN, f"model.path={random_pipeline_dir}", "algo=ddpo", "algo.num_epochs=1",
                    "algo.sample.batch_size=4", "algo.sample.num_batches_per_epoch=1", "algo.train.batch_size=2",
                    "algo.train.gradient_accumulation_steps=2", *extra])


def test_first_minibatch_has_ratio_one_and_no_clipping(random_pipeline_dir, tmp_path, monkeypatch):
    """Before the first optimizer step the recomputed log-probs equal the sampled ones: ρ = 1, clipfrac = 0."""
    seen = []
    real = ddpo.ppo_loss

    def spy(log_prob, old_log_prob, *a, **k):
        seen.append((log_prob - old_log_prob).detach().abs().max().item())
        return real(log_prob, old_log_prob, *a, **k)

    monkeypatch.setattr(ddpo, "ppo_loss", spy)
    from align_bench.runner import run

    metrics = run(_fast_cfg(random_pipeline_dir), tmp_path)
    # All 2 minibatches × 3 timesteps come before the single optimizer step. Batch composition differs from
    # sampling (2 of 4 samples, mixed timesteps), so equality holds to fp32 rounding, far inside clip_range 1e-4
    # (bit-exact equality with the sampling batch is tested in test_core_rollout).
    assert len(seen) == 2 * 3 and max(seen) < 1e-5
    assert metrics["train"][0]["optimizer_steps"] == 1


def test_run_writes_metrics_json_in_the_documented_shape(random_pipeline_dir, tmp_path):
    from align_bench.runner import run

    run(_fast_cfg(random_pipeline_dir, "algo.num_epochs=2", "checkpoint.every=1"), tmp_path)
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert set(m) >= {"eval", "train", "run"}
    for phase in ("base", "final"):
        for steps in ("1", "2"):
            cell = m["eval"][phase]["jpeg_compressibility"][steps]
            assert set(cell) == {"mean", "std", "n"} and cell["n"] == 2
    assert [t["epoch"] for t in m["train"]] == [0, 1]
    assert m["run"]["algo"] == "ddpo" and m["run"]["reward_queries"] == 8 and "versions" in m["run"]
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "checkpoints" / "epoch_2" / "training_state.pt").is_file()
    assert (tmp_path / "config.yaml").is_file()


@pytest.mark.slow
def test_tiny_ddpo_raises_the_training_reward_over_its_first_epochs(tmp_path):
    """The tiny_ddpo preset against the same run with learning rate 0: identical prompts and noise streams (the
    generator is consumed the same way), so the difference is what DDPO learned. Measured at seed 0 on the
    committed world: +0.21 mean training reward over epochs 1–7 (~1 min per run on 2 cores)."""
    from align_bench import REPO_ROOT
    from align_bench.runner import run

    if not (REPO_ROOT / "assets/tiny-world/tiny/model_index.json").is_file():
        pytest.fail("the tiny world is committed under assets/tiny-world (make tiny-world rebuilds it)")
    common = ["experiment=tiny_ddpo", "algo.num_epochs=8", "eval.base=false", "prompts.eval_max_prompts=1",
              "steps.eval=[1]", "logger=quiet", "logger.save_images=false", "logger.plots=false", "device=cpu"]
    trained = run(compose(common), tmp_path / "trained")["train"]
    control = run(compose([*common, "algo.train.learning_rate=0"]), tmp_path / "control")["train"]
    assert trained[0]["reward_mean"] == pytest.approx(control[0]["reward_mean"], abs=1e-4)  # same first samples
    gain = np.mean([t["reward_mean"] - c["reward_mean"] for t, c in zip(trained[1:], control[1:])])
    assert gain > 0.1, [(t["reward_mean"], c["reward_mean"]) for t, c in zip(trained, control)]


def test_resume_continues_from_the_checkpoint(random_pipeline_dir, tmp_path):
    from align_bench.runner import run

    full = run(_fast_cfg(random_pipeline_dir, "algo.num_epochs=2", "checkpoint.every=1", "checkpoint.keep=5"),
               tmp_path / "full")
    run(_fast_cfg(random_pipeline_dir, "algo.num_epochs=1", "checkpoint.every=1"), tmp_path / "resumed")
    resumed = run(_fast_cfg(random_pipeline_dir, "algo.num_epochs=2", "checkpoint.every=1", "resume=true"),
                  tmp_path / "resumed")
    assert [t["epoch"] for t in resumed["train"]] == [0, 1]
    # same seed, same stream of prompts/noise, same updates ⇒ the same second epoch
    assert resumed["train"][1]["reward_mean"] == pytest.approx(full["train"][1]["reward_mean"], rel=1e-5)
    for steps, cell in full["eval"]["final"]["jpeg_compressibility"].items():
        assert resumed["eval"]["final"]["jpeg_compressibility"][steps]["mean"] == pytest.approx(cell["mean"], rel=1e-5)

