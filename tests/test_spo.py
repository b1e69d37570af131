"""SPO: the comparator's threshold, the branching sampler on hand-checked quantities (the stored timestep is the
parent's while the preference model sees the children's, children share μ and σ, k UNet calls per branching step,
the SDXL variant's segments carry one label, an empty round), the loss at initialisation, and end-to-end runs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import FAST_RUN, compose, tiny_world_missing

from align_bench.algorithms import spo
from align_bench.algorithms.common import clipped_dpo_loss
from align_bench.core.rollout import denoising_step, step_log_prob

LOG2 = math.log(2.0)
ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ comparator
def test_comparator_threshold_is_two_atanh():
    """Δs > 2·atanh(0.3) = 0.6190 keeps the pair; best/worst are the arg max/min over the k children."""
    assert spo.margin_threshold(0.3) == pytest.approx(0.61904, abs=1e-5)
    assert spo.margin_threshold(0.4) == pytest.approx(0.84730, abs=1e-5)
    d = spo.margin_threshold(0.3)
    # k = 3 children (rows) of 4 parents (columns)
    scores = torch.tensor([[0.0, 1.0, 5.0, 2.0],
                           [d - 1e-3, 0.0, 5.0, 0.0],
                           [0.3, 1.0 + d + 1e-3, 5.0, 1.0]])
    best, worst, valid = spo.compare(scores, 0.3)
    assert valid.tolist() == [False, True, False, True]  # just below / just above / all equal / margin 2
    assert best[1] == 2 and worst[1] == 1 and best[3] == 0 and worst[3] == 1
    # the softmax form of the reference gives the same decisions
    for b in range(4):
        p = torch.softmax(torch.stack([scores[:, b].max(), scores[:, b].min()]), 0)
        assert bool(p[0] - p[1] > 0.3) == bool(valid[b])
    assert spo.compare(scores, 0.0)[2].tolist() == [True, True, False, True]


# ------------------------------------------------------------------------------------------------ the sampler
class Recorder:
    """A hand-made preference model: records every query; scores = a fixed random draw (so every pair is kept at
    threshold 0) or a constant (no pair is kept)."""

    def __init__(self, constant: float | None = None, seed: int = 0):
        self.calls, self.constant = [], constant
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, images, prompts, timesteps):
        self.calls.append((images.shape[0], list(prompts), timesteps.tolist()))
        if self.constant is not None:
            return torch.full((images.shape[0],), self.constant)
        return 10 * torch.randn(images.shape[0], generator=self.gen)


def _branch(model, score_fn, *, steps=4, divert=1, k=2, inner=0, threshold=0.0, prompts=("a", "b", "c"), seed=0):
    return spo.branching_rollout(model, list(prompts), score_fn, num_steps=steps, eta=1.0, guidance_scale=5.0,
                                 num_children=k, divert_start_step=divert, num_inner_step=inner, threshold=threshold,
                                 generator=torch.Generator().manual_seed(seed))


def test_stored_timestep_is_the_parents_and_the_preference_model_sees_the_childrens(random_pipeline_dir, load_model):
    """N = 4 (τ = 999, 749, 499, 249), D = 1: children of the step at τ_i are scored at τ_{i+1} (0 after the last
    step) but stored with timestep τ_i (the parent's) and τ' = τ_{i+1} (−1: the final ᾱ)."""
    model = load_model(random_pipeline_dir)
    grid = model.timesteps(4).tolist()
    assert grid == [999, 749, 499, 249]
    rec = Recorder()
    pairs, info = _branch(model, rec)
    B, k = 3, 2
    assert [c[2] for c in rec.calls] == [[499] * (k * B), [249] * (k * B), [0] * (k * B)]
    assert rec.calls[0][1] == ["a", "b", "c"] * k  # child-major: child c of prompt b at c·B + b
    assert info["kept_frac"] == 1.0 and pairs.num_groups == 3 * B  # threshold 0: every evaluation kept
    for m in range(2):
        member = pairs.member(m)
        assert member.timesteps[:, 0].tolist() == [749] * B + [499] * B + [249] * B
        assert member.prev_timesteps[:, 0].tolist() == [499] * B + [249] * B + [-1] * B
    assert pairs.prompts == ["a", "b", "c"] * 3


def test_children_share_mean_and_std(random_pipeline_dir, load_model):
    """Winner and loser of a pair have the same parent; recomputed under one model, their log-probs equal the
    stored ones and differ only through ‖x − μ‖²: Δ log π = −(‖x_w − μ‖² − ‖x_l − μ‖²) / (2σ²·n)."""
    model = load_model(random_pipeline_dir)
    pairs, _ = _branch(model, Recorder())
    w, l_ = pairs.member(0), pairs.member(1)
    torch.testing.assert_close(w.latents, l_.latents, rtol=0, atol=0)
    assert not torch.allclose(w.next_latents, l_.next_latents)
    tr = denoising_step(model, w.latents[:, 0], w.timesteps[:, 0], w.prev_timesteps[:, 0], w.cond,
                        guidance_scale=5.0, eta=1.0, draw=False)
    lp_w = step_log_prob(model, w, 0, eta=1.0, guidance_scale=5.0).log_prob
    lp_l = step_log_prob(model, l_, 0, eta=1.0, guidance_scale=5.0).log_prob
    torch.testing.assert_close(lp_w, w.log_probs[:, 0], rtol=0, atol=1e-5)  # recomputed = stored
    torch.testing.assert_close(lp_l, l_.log_probs[:, 0], rtol=0, atol=1e-5)
    n = tr.mean[0].numel()
    sq = lambda x: ((x[:, 0].float() - tr.mean) ** 2).flatten(1).sum(1)  # noqa: E731
    expected = -(sq(w.next_latents) - sq(l_.next_latents)) / (2 * tr.std.flatten() ** 2 * n)
    torch.testing.assert_close(lp_w - lp_l, expected, rtol=1e-4, atol=1e-5)


def test_a_branching_step_costs_k_unet_calls_per_prompt(random_pipeline_dir, load_model):
    """UNet batch sizes, counted at the module (CFG doubles each): B before and at the branching step, then k·B
    per step — the continuing child's transition is reused, not recomputed (k, not k + 1)."""
    model = load_model(random_pipeline_dir)
    seen = []
    handle = model.unet.register_forward_hook(lambda mod, args, kwargs_out: seen.append(args[0].shape[0]))
    try:
        _, info = _branch(model, Recorder(), steps=5, divert=2, k=3)
    finally:
        handle.remove()
    B, k = 3, 3
    assert seen == [2 * B, 2 * B, 2 * B, 2 * k * B, 2 * k * B]
    assert info["unet_batches"] == [B, B, B, k * B, k * B]


def test_an_empty_round_gives_no_pairs_and_is_skipped(random_pipeline_dir, load_model):
    """Equal scores never pass the comparator: no pair, empty tensors of the right shapes; train_epoch skips the
    round without a UNet training call or an optimizer step."""
    model = load_model(random_pipeline_dir)
    pairs, info = _branch(model, Recorder(constant=1.0))
    assert pairs.num_groups == 0 and info["kept_frac"] == 0.0
    assert pairs.traj.latents.shape[1:] == (1, 4, 8, 8)

    cfg = compose(["algo=spo", "steps.train=3", "algo.sample.divert_start_step=0", "algo.sample.batch_size=2",
                   "algo.sample.num_batches_per_epoch=2"])
    backward_calls = []
    ctx = SimpleNamespace(
        cfg=cfg, accelerator=SimpleNamespace(num_processes=1), model=model, unet=model.unet,
        prompt_sampler=SimpleNamespace(sample=lambda n: ["x"] * n), score=Recorder(constant=0.0),
        guidance_scale=5.0, generator=torch.Generator().manual_seed(0), progress=False, counters={"images": 0},
        backward=backward_calls.append)
    summary = spo.train_epoch(ctx, {}, 0)
    assert summary["num_pairs"] == 0 and summary["skipped_rounds"] == 2 and "loss" not in summary
    assert backward_calls == []


def test_sdxl_variant_stores_every_transition_of_a_segment_with_its_label(random_pipeline_dir, load_model):
    """num_inner_step = 1, N = 6, D = 1: segments (τ_1, τ_2) scored at τ_3, then (τ_3, τ_4, τ_5) (the last step
    always continues) scored at 0. Within a segment each member's transitions chain (output of one = input of the
    next: the same child all along), winner and loser share only the segment's first parent."""
    model = load_model(random_pipeline_dir)
    grid = model.timesteps(6).tolist()
    rec = Recorder()
    pairs, _ = _branch(model, rec, steps=6, divert=1, inner=1)
    B = 3
    assert [c[2][0] for c in rec.calls] == [grid[3], 0]
    w, l_ = pairs.member(0), pairs.member(1)
    seg_t = [grid[1], grid[2], grid[3], grid[4], grid[5]]
    assert w.timesteps[:, 0].tolist() == [t for t in seg_t for _ in range(B)]
    assert w.timesteps[:, 0].tolist() == l_.timesteps[:, 0].tolist()
    rows = lambda j: slice(j * B, (j + 1) * B)  # noqa: E731  (transition j of the stored segments, B prompts)
    for member in (w, l_):
        for j in (0, 2, 3):  # (τ_1 → τ_2) and (τ_3 → τ_4 → τ_5) chain
            torch.testing.assert_close(member.next_latents[rows(j), 0], member.latents[rows(j + 1), 0], rtol=0,
                                       atol=0)
    for j in (0, 2):  # a segment's first transition branches from one parent
        torch.testing.assert_close(w.latents[rows(j)], l_.latents[rows(j)], rtol=0, atol=0)
    for j in (1, 3, 4):  # later transitions: each child's own parent
        assert not torch.allclose(w.latents[rows(j)], l_.latents[rows(j)])


def test_loss_is_log2_at_initialisation_on_the_model(random_pipeline_dir, load_model):
    """Fresh LoRA (up = 0): π_θ = π_ref on every stored transition, so the clipped DPO loss of SPO's pairs
    (β = 10, ε = 0.1) is log 2; a moved LoRA changes π_θ but not π_ref (LoRA disabled)."""
    model = load_model(random_pipeline_dir)
    pairs, _ = _branch(model, Recorder())
    model.add_lora(4, 4)
    signs = torch.tensor([[1.0, -1.0]]).expand(pairs.num_groups, 2)

    def log_probs():
        return pairs.by_group(step_log_prob(model, pairs.traj, 0, eta=1.0, guidance_scale=5.0).log_prob)

    with torch.no_grad(), model.lora_disabled():
        ref = log_probs()
    torch.testing.assert_close(ref, pairs.by_group(pairs.traj.log_probs[:, 0]), rtol=0, atol=1e-5)
    loss, _ = clipped_dpo_loss(log_probs(), ref, signs, 10.0, 0.1)
    assert loss.item() == pytest.approx(LOG2, abs=1e-6)
    with torch.no_grad():
        for p in model.lora_parameters():
            p.add_(0.05 * torch.randn_like(p))
        with model.lora_disabled():
            torch.testing.assert_close(log_probs(), ref, rtol=0, atol=1e-6)
        assert clipped_dpo_loss(log_probs(), ref, signs, 10.0, 0.1)[0].item() != pytest.approx(LOG2, abs=1e-6)


def test_pair_rows_round_trip():
    """Pairs → (P, 2, …) rows (what is gathered across processes) → pairs: the same winners and losers."""
    from align_bench.core.rollout import Trajectory
    from align_bench.models.conditioning import Conditioning

    P = 3
    traj = Trajectory(prompts=["a", "b", "c"] * 2, cond=Conditioning(torch.randn(2 * P, 5, 4)),
                      timesteps=torch.arange(2 * P)[:, None], prev_timesteps=torch.arange(2 * P)[:, None] - 1,
                      latents=torch.randn(2 * P, 1, 4, 2, 2), next_latents=torch.randn(2 * P, 1, 4, 2, 2),
                      log_probs=torch.randn(2 * P, 1), final_latents=torch.randn(2 * P, 4, 2, 2))
    pairs = spo.Groups(traj, 2)
    rows = spo._pair_rows(pairs)
    assert rows["latents"].shape == (P, 2, 1, 4, 2, 2) and rows["cond.prompt_embeds"].shape == (P, 2, 5, 4)
    back = spo._from_rows(rows, pairs.prompts)
    for name in ("timesteps", "latents", "next_latents", "log_probs", "final_latents"):
        torch.testing.assert_close(getattr(back.traj, name), getattr(traj, name), rtol=0, atol=0)
    torch.testing.assert_close(back.traj.cond.prompt_embeds, traj.cond.prompt_embeds, rtol=0, atol=0)
    assert back.traj.prompts == traj.prompts


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("override,message", [
    ("algo.sample.eta=0", "eta must be > 0"),
    ("algo.sample.num_children=1", "num_children"),
    ("algo.sample.divert_start_step=8", "divert_start_step"),
    ("algo.sample.threshold=1.0", "threshold"),
    ("algo.sample.num_inner_step=-1", "num_inner_step"),
    ("algo.train.beta=0", "algo.train.beta=0.0 must be > 0"),
    ("model=tiny_lcm", "lcm"),
])
def test_validate_rejects_bad_configs(override, message):
    from align_bench.runner import validate

    with pytest.raises(ValueError, match=message):
        validate(compose(["algo=spo", override]))


def test_defaults_are_the_reference_ones():
    a = compose(["algo=spo"]).algo
    assert (a.sample.num_children, a.sample.divert_start_step, a.sample.threshold, a.sample.eta,
            a.train.beta, a.train.eps, a.train.learning_rate, a.train.adam_weight_decay) == \
        (2, 4, 0.3, 1.0, 10.0, 0.1, 6e-5, 1e-4)


# ------------------------------------------------------------------------------------------------ processes
@pytest.mark.slow
def test_pairs_are_shared_over_two_processes(tmp_path):
    """Rank 0 holds 3 pairs, rank 1 none: each takes ⌊3/2⌋ = 1 distinct pair of the 3; 1 pair over 2 processes
    is an empty round everywhere."""
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29549",
            str(ROOT / "tests" / "scripts" / "spo_share_pairs.py")]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    (ids0, ids1) = out["ids"]
    assert len(ids0) == len(ids1) == 1 and ids0 != ids1 and set(ids0 + ids1) <= {0, 1, 2}
    assert out["losers_follow"] and out["few"] == [0, 0]


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_end_to_end_on_random_pipeline(random_pipeline_dir, tmp_path):
    from align_bench.runner import run

    cfg = compose([*FAST_RUN, f"model.path={random_pipeline_dir}", "algo=spo", "algo.num_epochs=1", "device=cpu",
                   "steps.train=4", "algo.sample.divert_start_step=1", "algo.sample.batch_size=3",
                   "algo.sample.num_batches_per_epoch=1", "algo.sample.threshold=0.0", "algo.train.batch_size=2",
                   "reward=brightness", "eval.base=false", "steps.eval=[1]"])
    metrics = run(cfg, tmp_path / "run")
    (ep,) = metrics["train"]
    assert ep["num_pairs"] == 9 and ep["optimizer_steps"] == 5  # ⌈9 / 2⌉ minibatches, accumulation 1
    assert ep["reward_queries"] == 3 * 2 * 3  # 3 evaluations × k = 2 children × 3 prompts
    assert abs(ep["loss"] - LOG2) < 1e-3


@pytest.mark.slow
@pytest.mark.skipif(tiny_world_missing("tiny", "clip", "aesthetic"), reason="tiny world not built (make tiny-world)")
def test_tiny_spo_raises_the_eval_reward_against_an_lr0_control(tmp_path):
    """experiment=tiny_spo raises tiny_aesthetic at 8 steps on the held-out prompts. The lr = 0 control of the same
    sample stream is the base evaluation: a fresh LoRA's up-projections are 0 and lr = 0 keeps them there, so its
    final UNet is the base UNet and the evaluation (η = 0, fixed seeds) gives the base numbers exactly."""
    from align_bench.runner import run

    quick = ["steps.eval=[8]", "logger=quiet", "logger.save_images=false", "logger.plots=false", "device=cpu"]
    cfg = compose(["experiment=tiny_spo", *quick])
    if cfg.reward.name == "tiny_spm" and tiny_world_missing("spm"):
        pytest.skip("tiny SPM not built (make tiny-world)")
    metrics = run(cfg, tmp_path / "run")
    base, final = (metrics["eval"][k]["tiny_aesthetic"]["8"]["mean"] for k in ("base", "final"))
    assert final > base + 0.1, (base, final)


def test_reference_presets_carry_the_reference_settings():
    sd15 = compose(["experiment=spo_sd15"])
    a = sd15.algo
    assert (sd15.model.name, sd15.reward.name, sd15.steps.train, a.sample.num_children, a.sample.batch_size,
            a.sample.threshold, a.sample.num_inner_step, a.train.learning_rate, a.num_epochs) == \
        ("sd15", "spm", 20, 4, 10, 0.3, 0, 6e-5, 10)
    xl = compose(["experiment=spo_sdxl"]).algo
    assert (xl.sample.num_children, xl.sample.batch_size, xl.sample.num_inner_step, xl.sample.threshold,
            xl.train.batch_size, xl.train.gradient_accumulation_steps, xl.train.learning_rate) == \
        (2, 2, 3, 0.4, 2, 2, 1e-5)
    from align_bench.runner import validate

    assert compose(["experiment=spo_sdxl"]).model.name == "sdxl"
    with pytest.raises(ValueError, match="add model=sdxl"):  # its SDXL options on an SD model: one line
        validate(compose(["experiment=spo_sdxl", "model=sd15", "mixed_precision=no", "model.dtype=fp32"]))
