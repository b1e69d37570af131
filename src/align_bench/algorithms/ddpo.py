"""DDPO — Denoising Diffusion Policy Optimization: Black, Janner, Du, Kostrikov, Levine, "Training Diffusion Models
with Reinforcement Learning", ICLR 2024 (arXiv:2305.13301); reference code kvablack/ddpo-pytorch. What it optimises,
its equations and every difference from the reference: docs/algos/ddpo.md.

Each epoch: sample `sample.batch_size × sample.num_batches_per_epoch` trajectories with
the stochastic DDIM sampler (η > 0) and record per-step log-probs; score them; per-prompt normalised advantages
(one scalar per trajectory, broadcast to all its steps); then `train.num_inner_epochs` passes of the clipped PPO
objective on per-step importance ratios, every (minibatch, trained timestep) one backward call.

Accumulation convention (the reference's): one optimizer step every `train.gradient_accumulation_steps`
minibatches × all their trained timesteps, so accelerate's count is their product.
Works unchanged on LCM models (RLCM's PPO): the adapter supplies the stochastic LCM step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import AlgoSchema, LogProbTrainSchema, SampleSchema, StatTrackingSchema
from ..core.rollout import Trajectory, step_log_prob
from ..core.stats import PromptStatTracker, whiten
from .common import (num_train_timesteps, process_slice, record_step, training_guidance, validate_log_prob_policy,
                     validate_minibatches)


@dataclass
class TrainSchema(LogProbTrainSchema):
    adv_clip_max: float
    clip_range: float
    timestep_fraction: float


@dataclass
class Config(AlgoSchema):
    sample: SampleSchema
    train: TrainSchema
    per_prompt_stat_tracking: StatTrackingSchema


# ------------------------------------------------------------------------------------------- pure functions
def ppo_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float,
             adv_clip_max: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped PPO surrogate on one step of each trajectory. All inputs (B,). Returns (scalar loss, diagnostics).

    L = mean_b max(−Â·ρ, −Â·clip(ρ, 1−ε, 1+ε)), ρ = exp(log π_θ − log π_old), Â = clip(A, ±adv_clip_max)."""
    adv = advantages.clamp(-adv_clip_max, adv_clip_max)
    log_ratio = log_prob - old_log_prob
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    info = {
        "approx_kl": 0.5 * (log_ratio.detach() ** 2).mean(),
        "clipfrac": ((ratio.detach() - 1.0).abs() > clip_range).float().mean(),
        "ratio_mean": ratio.detach().mean(),
    }
    return loss, info


def compute_advantages(prompts: list[str], rewards: np.ndarray, tracker: PromptStatTracker | None) -> np.ndarray:
    """Per-prompt normalised advantages (tracker) or global whitening. (B,) float64."""
    return tracker.update(prompts, rewards) if tracker is not None else whiten(rewards)


def shuffle_for_training(traj: Trajectory, advantages: torch.Tensor, generator: torch.Generator,
                         timestep_fraction: float) -> tuple[Trajectory, torch.Tensor]:
    """Permute samples, then each sample's steps independently; keep the first ⌊N·fraction⌋ steps per sample."""
    B, N = traj.timesteps.shape
    perm = torch.randperm(B, generator=generator)
    traj, advantages = traj.select(perm), advantages[perm]
    order = torch.stack([torch.randperm(N, generator=generator) for _ in range(B)])
    n_train = max(1, int(N * timestep_fraction))
    return traj.with_steps(order[:, :n_train]), advantages


# ------------------------------------------------------------------------------------------- algorithm API
def validate(cfg) -> None:
    validate_log_prob_policy(cfg)
    validate_minibatches(cfg)


def gradient_accumulation_steps(cfg) -> int:
    return int(cfg.algo.train.gradient_accumulation_steps) * num_train_timesteps(cfg)


def init_state(ctx) -> dict:
    st = ctx.cfg.algo.per_prompt_stat_tracking
    return {"tracker": PromptStatTracker(int(st.buffer_size), int(st.min_count)) if st.enabled else None}


def train_epoch(ctx, state: dict, epoch: int) -> dict:
    cfg, acc = ctx.cfg.algo, ctx.accelerator
    # ---- sample
    trajs, rewards = [], []
    for _ in tqdm(range(cfg.sample.num_batches_per_epoch), desc="sampling", leave=False, disable=not ctx.progress):
        traj = ctx.rollout(ctx.prompt_sampler.sample(int(cfg.sample.batch_size)))
        rewards.append(ctx.score(traj.images, traj.prompts))
        traj.images = None  # not needed for training; frees memory
        trajs.append(traj)
    traj, rewards = Trajectory.cat(trajs), torch.cat(rewards)

    # ---- advantages over all processes' samples; each process keeps its own slice
    all_prompts, all_rewards = ctx.gather(traj.prompts, rewards)
    advantages = process_slice(acc, compute_advantages(all_prompts, all_rewards.cpu().numpy(), state["tracker"]))

    # ---- PPO updates
    guidance = training_guidance(ctx)
    ctx.unet.train()
    logs: dict[str, list[float]] = {"loss": [], "approx_kl": [], "clipfrac": [], "ratio_mean": [], "grad_norm": []}
    for _ in range(int(cfg.train.num_inner_epochs)):
        shuffled, adv = shuffle_for_training(traj, advantages, ctx.generator, float(cfg.train.timestep_fraction))
        n_steps = shuffled.timesteps.shape[1]
        bs = int(cfg.train.batch_size)
        bar = tqdm(total=len(shuffled) // bs * n_steps, desc="training", leave=False, disable=not ctx.progress)
        for start in range(0, len(shuffled), bs):
            mb, mb_adv = shuffled.select(slice(start, start + bs)), adv[start:start + bs]
            for j in range(n_steps):
                with acc.accumulate(ctx.unet):
                    out = step_log_prob(ctx.model, mb, j, eta=float(cfg.sample.eta), guidance_scale=guidance,
                                        unet=ctx.unet)
                    loss, info = ppo_loss(out.log_prob, mb.log_probs[:, j], mb_adv, float(cfg.train.clip_range),
                                          float(cfg.train.adv_clip_max))
                    grad_norm = ctx.backward(loss)
                record_step(logs, loss, info, grad_norm)
                bar.update(1)
        bar.close()

    summary = {k: float(np.mean(v)) for k, v in logs.items() if v}
    summary.update(reward_mean=float(all_rewards.mean()), reward_std=float(all_rewards.std(unbiased=False)))
    return summary
