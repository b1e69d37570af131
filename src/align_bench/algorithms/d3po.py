"""D3PO — Direct Preference for Denoising Diffusion Policy Optimization: Yang, Tao, Lyu, Ge, Chen, Shen, Li, Li,
"Using Human Feedback to Fine-tune Diffusion Models without Any Reward Model", CVPR 2024 (arXiv:2311.13231);
reference code yk7333/d3po. What it optimises, its equations and every difference from the reference:
docs/algos/d3po.md.

Each epoch: sample `sample.batch_size × sample.num_batches_per_epoch` pairs; the two members of a pair share the
prompt AND the initial noise x_T and diverge only through the η-noise of the stochastic sampler. The reward model
ranks each pair (Pareto comparator: higher reward wins, ties → no preference). Then, for every (pair-minibatch,
trained timestep), the clipped DPO loss (`common.clipped_dpo_loss`) on per-step log-prob ratios against the FROZEN
INITIAL policy (the same peft UNet with its LoRA disabled):

    L = −mean_pairs log σ( β·s_0·log clip(r_0) + β·s_1·log clip(r_1) ),   r_i = π_θ(x_{t'}^i | x_t^i) / π_ref(…)

At initialisation π_θ = π_ref, so L = log 2 and ∇L = −(β/2)·(∇log π_w − ∇log π_l): descent raises the winner.
Human-feedback mode: with `algo.human.data_dir` set, the pairs come from trajectories saved by
`python -m align_bench.human_feedback sample` and the labels a person wrote (`algo.human.labels`); nothing is
sampled or scored during training.

Accumulation (the reference's): one backward per (pair-minibatch, trained timestep); one optimizer step every
`train.gradient_accumulation_steps` pair-minibatches × all their trained timesteps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import AlgoSchema, LogProbTrainSchema, SampleSchema
from ..core.rollout import step_log_prob
from ..human_feedback import load_pairs
from .common import (Groups, clipped_dpo_loss, collect_groups, num_train_timesteps, record_step, reference_log_probs,
                     training_guidance, validate_log_prob_policy, validate_minibatches)


@dataclass
class TrainSchema(LogProbTrainSchema):
    timestep_fraction: float
    beta: float
    eps: float


@dataclass
class HumanSchema:
    data_dir: Optional[str]
    labels: list[str]


@dataclass
class Config(AlgoSchema):
    sample: SampleSchema
    train: TrainSchema
    human: HumanSchema


# ------------------------------------------------------------------------------------------- pure functions
def pareto_signs(rewards_0: torch.Tensor, rewards_1: torch.Tensor) -> torch.Tensor:
    """Preference signs of pairs from (possibly multi-dimensional) rewards. rewards_i: (B,) or (B, D) → (B, 2).

    (−1, +1) if member 0 is Pareto-dominated by member 1 (≤ in every dimension, < in one), (+1, −1) in the
    opposite case, (0, 0) on ties and incomparable vectors. The higher reward is the winner (+1)."""
    r0, r1 = rewards_0.reshape(len(rewards_0), -1), rewards_1.reshape(len(rewards_1), -1)
    zero_worse = (r0 <= r1).all(1) & (r0 < r1).any(1)
    one_worse = (r1 <= r0).all(1) & (r1 < r0).any(1)
    s0 = one_worse.float() - zero_worse.float()
    return torch.stack([s0, -s0], dim=1)


def shuffle_pairs(pairs: Groups, signs: torch.Tensor, generator: torch.Generator,
                  timestep_fraction: float) -> tuple[Groups, torch.Tensor]:
    """Permute the P pairs, then each pair's steps (the same permutation for both members); keep ⌊N·fraction⌋
    steps. signs (P, 2). Returns the permuted pairs (their reference log-probs move with them) and signs."""
    P, N = pairs.num_groups, pairs.traj.num_steps
    perm = torch.randperm(P, generator=generator)
    order = torch.stack([torch.randperm(N, generator=generator) for _ in range(P)])
    order = order[:, :max(1, int(N * timestep_fraction))]
    return pairs.select(perm).with_steps(order), signs[perm]


# ------------------------------------------------------------------------------------------- algorithm API
def validate(cfg) -> None:
    t = cfg.algo.train
    validate_log_prob_policy(cfg)
    if t.beta <= 0:
        raise ValueError(f"algo.train.beta must be > 0, got {t.beta}")
    if not 0 < t.eps < 1:
        raise ValueError(f"algo.train.eps (ratio clip) must be in (0, 1), got {t.eps}")
    if cfg.algo.human.data_dir is not None:
        if not cfg.algo.human.labels:
            raise ValueError("algo.human.data_dir is set but algo.human.labels is empty: give the label file(s)")
        return  # the number of pairs is only known once the labels are read
    validate_minibatches(cfg, unit="pairs")


def gradient_accumulation_steps(cfg) -> int:
    return int(cfg.algo.train.gradient_accumulation_steps) * num_train_timesteps(cfg)


def init_state(ctx) -> dict:
    human = ctx.cfg.algo.human
    if human.data_dir is None:
        return {}
    winners_then_losers, signs = load_pairs(human.data_dir, list(human.labels), ctx.model, ctx.cfg)
    return {"human_pairs": Groups(winners_then_losers, 2), "human_signs": signs}




def train_epoch(ctx, state: dict, epoch: int) -> dict:
    cfg, acc = ctx.cfg.algo, ctx.accelerator
    guidance = training_guidance(ctx)
    summary: dict[str, float] = {}
    # ---- pairs: sampled (sharing x_T) and ranked by the reward model, or loaded with human labels
    if "human_pairs" in state:
        pairs, signs = state["human_pairs"], state["human_signs"]
    else:
        pairs, rewards = collect_groups(ctx, int(cfg.sample.num_batches_per_epoch), int(cfg.sample.batch_size), 2,
                                        shared_x_T=True)
        signs = pareto_signs(rewards[:, 0], rewards[:, 1]).to(pairs.traj.latents.device)
        _, all_rewards = ctx.gather(pairs.traj.prompts, rewards.T.reshape(-1))
        summary.update(reward_mean=float(all_rewards.mean()), reward_std=float(all_rewards.std(unbiased=False)),
                       tie_frac=float((signs[:, 0] == 0).float().mean()))
    P = pairs.num_groups
    if pairs.traj.ref_log_probs is None:  # human mode: fixed pairs and a frozen reference, evaluated once per run
        pairs.traj.ref_log_probs = reference_log_probs(ctx, pairs.traj, guidance,
                                                       chunk=max(2, 2 * int(cfg.sample.batch_size)))

    # ---- DPO updates
    ctx.unet.train()
    logs: dict[str, list[float]] = {"loss": [], "log_ratio_abs": [], "clipfrac": [], "pref_acc": [], "grad_norm": []}
    bs = int(cfg.train.batch_size)
    for _ in range(int(cfg.train.num_inner_epochs)):
        shuffled, sh_signs = shuffle_pairs(pairs, signs, ctx.generator, float(cfg.train.timestep_fraction))
        n_steps = shuffled.traj.num_steps
        bar = tqdm(total=(P // bs) * n_steps, desc="training", leave=False, disable=not ctx.progress)
        for start in range(0, P - P % bs, bs):  # a trailing partial minibatch (human mode) is dropped
            mb, mb_signs = shuffled.select(torch.arange(start, start + bs)), sh_signs[start:start + bs]
            for j in range(n_steps):
                with acc.accumulate(ctx.unet):
                    out = step_log_prob(ctx.model, mb.traj, j, eta=float(cfg.sample.eta), guidance_scale=guidance,
                                        unet=ctx.unet)
                    loss, info = clipped_dpo_loss(mb.by_group(out.log_prob), mb.by_group(mb.traj.ref_log_probs[:, j]),
                                                  mb_signs, float(cfg.train.beta), float(cfg.train.eps))
                    grad_norm = ctx.backward(loss)
                record_step(logs, loss, info, grad_norm)
                bar.update(1)
        bar.close()

    summary.update({k: float(np.nanmean(v)) for k, v in logs.items() if v and not np.all(np.isnan(v))})
    summary["num_pairs"] = P
    return summary
