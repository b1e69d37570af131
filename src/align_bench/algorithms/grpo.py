"""GRPO — group-relative policy optimization for diffusion: Xue et al., "DanceGRPO: Unleashing GRPO on Visual
Generation" (arXiv:2505.07818; reference code XueZeyue/DanceGRPO, its Stable Diffusion script) and Liu et al.,
"Flow-GRPO: Training Flow Matching Models via Online RL" (arXiv:2505.05470; reference code yifan123/flow_grpo, the
source of the KL term). What it optimises, its equations and every difference from both references:
docs/algos/grpo.md.

GRPO is DDPO (ddpo.py) with three changes, and this file holds only those:
  1. groups: each epoch samples `sample.batch_size × sample.num_batches_per_epoch` prompts, each G =
     `sample.group_size` times in one batched rollout (members share x_T with `sample.shared_x_T`);
  2. advantages relative to the group only: A = (r − mean_group) / (std_group + ε), with no buffer across epochs; a
     group whose rewards are all equal gets A = 0 exactly and is counted (`zero_spread_groups`);
  3. an optional KL penalty β·KL(π_θ ‖ π_ref) to the frozen initial policy (LoRA disabled), in closed form for the
     equal-variance Gaussian step, added to DDPO's clipped PPO surrogate (`ddpo.ppo_loss`);
and the option of never training the last transition (`train.exclude_last_step`, both references' behaviour).

Groups live on one process (each process samples whole groups), so advantages need no gather; rewards and counts
are gathered for the logs only. Accumulation is DDPO's: one backward per (minibatch, trained step), one optimizer
step every `train.gradient_accumulation_steps` minibatches × their trained steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import AlgoSchema, LogProbTrainSchema, SampleSchema
from ..core.rollout import Trajectory, step_log_prob
from .common import collect_groups, record_step, training_guidance, validate_log_prob_policy
from .ddpo import ppo_loss, shuffle_for_training


@dataclass
class GroupSampleSchema(SampleSchema):
    group_size: int
    shared_x_T: bool


@dataclass
class TrainSchema(LogProbTrainSchema):
    adv_clip_max: float
    clip_range: float
    timestep_fraction: float
    exclude_last_step: bool
    kl_beta: float


@dataclass
class AdvantageSchema:
    std_ddof: int
    eps: float


@dataclass
class Config(AlgoSchema):
    sample: GroupSampleSchema
    train: TrainSchema
    advantage: AdvantageSchema


# ------------------------------------------------------------------------------------------- pure functions
def group_advantages(rewards: torch.Tensor, std_ddof: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-relative advantages. rewards (P, G) → (advantages (P, G) float64, zero_spread (P,) bool).

    A_pg = (r_pg − mean_g r_p) / (std_g r_p + eps), std with `std_ddof` (1: DanceGRPO's torch default), in float64.
    A group whose G rewards are all equal (max = min, compared on the given values) gets A = 0 exactly: computed
    naively, float rounding in the mean leaves (r − mean) and std both ~1 ulp and a tiny eps turns their ratio into a
    spurious O(1) advantage of one sign for the whole group."""
    r = rewards.double()
    zero_spread = rewards.amax(dim=1) == rewards.amin(dim=1)
    centred = r - r.mean(dim=1, keepdim=True)
    adv = centred / (r.std(dim=1, correction=std_ddof, keepdim=True) + eps)
    return torch.where(zero_spread[:, None], torch.zeros_like(adv), adv), zero_spread


def gaussian_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, σ²I) ‖ N(ref_mean, σ²I)) per element, averaged over the non-batch dims (the log-prob convention).
    mean, ref_mean (B, C, h, w); std (B, 1, 1, 1) the transition std, shared by both → (B,).

    = mean((μ_θ − μ_ref)²) / (2σ²): the exact KL of one stochastic DDIM or LCM step, whose σ does not depend on θ.
    Gradient flows through `mean` only."""
    sq = (mean.float() - ref_mean.float().detach()) ** 2 / (2 * std.float() ** 2)
    return sq.mean(dim=tuple(range(1, sq.ndim)))


def grpo_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, kl: torch.Tensor | None,
              clip_range: float, adv_clip_max: float, kl_beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DDPO's clipped PPO surrogate on one step of each trajectory + β·mean_b KL_b. All inputs (B,); kl None when
    β = 0. Returns (scalar loss, diagnostics: DDPO's and `kl`)."""
    loss, info = ppo_loss(log_prob, old_log_prob, advantages, clip_range, adv_clip_max)
    if kl is not None:
        loss = loss + kl_beta * kl.mean()
        info["kl"] = kl.detach().mean()
    return loss, info


def trainable_steps(traj: Trajectory, exclude_last_step: bool) -> Trajectory:
    """The transitions training may pick from: all N, or the first N − 1 (the last, lowest-noise one dropped)."""
    if not exclude_last_step:
        return traj
    order = torch.arange(traj.num_steps - 1).expand(len(traj), -1)
    return traj.with_steps(order)


def num_trained_steps(cfg) -> int:
    """Steps trained per trajectory per inner epoch: ⌊N' · timestep_fraction⌋, at least 1, N' = N or N − 1."""
    trainable = int(cfg.steps.train) - int(bool(cfg.algo.train.exclude_last_step))
    return max(1, int(trainable * float(cfg.algo.train.timestep_fraction)))


# ------------------------------------------------------------------------------------------- algorithm API
def validate(cfg) -> None:
    validate_log_prob_policy(cfg)
    s, t, a = cfg.algo.sample, cfg.algo.train, cfg.algo.advantage
    if s.group_size < 2:
        raise ValueError(f"algo.sample.group_size must be ≥ 2 (a group of one has no relative advantage), got "
                         f"{s.group_size}")
    if a.std_ddof not in (0, 1) or a.std_ddof >= s.group_size:
        raise ValueError(f"algo.advantage.std_ddof must be 0 or 1 (and < group_size), got {a.std_ddof}")
    if a.eps < 0 or t.kl_beta < 0:
        raise ValueError(f"algo.advantage.eps and algo.train.kl_beta must be ≥ 0, got {a.eps} and {t.kl_beta}")
    if t.exclude_last_step and int(cfg.steps.train) < 2:
        raise ValueError(f"algo.train.exclude_last_step with steps.train={cfg.steps.train} leaves no transition to "
                         f"train: use steps.train ≥ 2 or exclude_last_step=false")
    trajectories = int(s.batch_size) * int(s.group_size) * int(s.num_batches_per_epoch)
    if trajectories % t.batch_size:
        raise ValueError(f"{trajectories} trajectories per epoch (batch_size × group_size × num_batches_per_epoch) "
                         f"are not a multiple of algo.train.batch_size ({t.batch_size})")
    if (trajectories // t.batch_size) % t.gradient_accumulation_steps:
        raise ValueError(f"{trajectories // t.batch_size} minibatches per epoch is not a multiple of "
                         f"algo.train.gradient_accumulation_steps ({t.gradient_accumulation_steps})")


def gradient_accumulation_steps(cfg) -> int:
    return int(cfg.algo.train.gradient_accumulation_steps) * num_trained_steps(cfg)


def init_state(ctx) -> dict:
    return {}  # no history: every epoch's advantages come from that epoch's groups alone


def train_epoch(ctx, state: dict, epoch: int) -> dict:
    cfg, acc = ctx.cfg.algo, ctx.accelerator
    s, t = cfg.sample, cfg.train
    # ---- sample groups; advantages from each group alone (a group lives on one process: no gather needed)
    groups, rewards = collect_groups(ctx, int(s.num_batches_per_epoch), int(s.batch_size), int(s.group_size),
                                     shared_x_T=bool(s.shared_x_T))
    adv, zero_spread = group_advantages(rewards, int(cfg.advantage.std_ddof), float(cfg.advantage.eps))
    # (P, G) → member-major (G·P,), the layout of groups.traj
    advantages = adv.T.reshape(-1).to(groups.traj.log_probs.device, torch.float32)
    traj = trainable_steps(groups.traj, bool(t.exclude_last_step))

    # ---- PPO (+ KL) updates
    guidance, eta, beta = training_guidance(ctx), float(s.eta), float(t.kl_beta)
    ctx.unet.train()
    logs: dict[str, list[float]] = {"loss": [], "approx_kl": [], "clipfrac": [], "ratio_mean": [], "kl": [],
                                    "grad_norm": []}
    bs = int(t.batch_size)
    for _ in range(int(t.num_inner_epochs)):
        shuffled, sh_adv = shuffle_for_training(traj, advantages, ctx.generator, float(t.timestep_fraction))
        n_steps = shuffled.num_steps
        bar = tqdm(total=len(shuffled) // bs * n_steps, desc="training", leave=False, disable=not ctx.progress)
        for start in range(0, len(shuffled), bs):
            mb, mb_adv = shuffled.select(slice(start, start + bs)), sh_adv[start:start + bs]
            for j in range(n_steps):
                with acc.accumulate(ctx.unet):
                    kl = None
                    if beta > 0:  # the frozen initial policy on the same inputs: the same UNet, LoRA off
                        with torch.no_grad(), ctx.model.lora_disabled(ctx.unet):
                            ref = step_log_prob(ctx.model, mb, j, eta=eta, guidance_scale=guidance, unet=ctx.unet)
                    out = step_log_prob(ctx.model, mb, j, eta=eta, guidance_scale=guidance, unet=ctx.unet)
                    if beta > 0:
                        kl = gaussian_kl(out.mean, ref.mean, out.std)
                    loss, info = grpo_loss(out.log_prob, mb.log_probs[:, j], mb_adv, kl, float(t.clip_range),
                                           float(t.adv_clip_max), beta)
                    grad_norm = ctx.backward(loss)
                record_step(logs, loss, info, grad_norm)
                bar.update(1)
        bar.close()

    # ---- logs: rewards and zero-spread counts over all processes
    _, all_rewards = ctx.gather(groups.prompts, rewards)
    _, all_zero = ctx.gather(groups.prompts, zero_spread.float())
    summary = {k: float(np.mean(v)) for k, v in logs.items() if v}
    summary.update(reward_mean=float(all_rewards.mean()), reward_std=float(all_rewards.std(unbiased=False)),
                   reward_group_std=float(all_rewards.double().std(dim=1, unbiased=False).mean()),
                   num_groups=len(all_zero), zero_spread_groups=int(all_zero.sum()))
    return summary
