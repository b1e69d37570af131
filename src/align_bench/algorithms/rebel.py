"""REBEL — REgression to RElative REward Based RL: Gao, Chang, Zhan, Oertell, Swamy, Brantley, Joachims, Bagnell,
Lee, Sun, "REBEL: Reinforcement Learning via Regressing Relative Rewards", NeurIPS 2024 (arXiv:2404.16767), as
Oertell, Chang, Zhang, Brantley, Sun, "RL for Consistency Models: Faster Reward Guided Text-to-Image Generation",
RLC 2024 (arXiv:2404.03673) applies it to diffusion; reference code Owen-Oertell/rlcm (`training.algorithm=rebel`).
What it optimises, its equations and every difference from the reference: docs/algos/rebel.md.

Each epoch: for each of `sample.num_batches_per_epoch` rollout calls, draw
`sample.batch_size` prompts and sample each prompt TWICE with independent initial noise (y, y′; no shared x_T);
score both; per-prompt normalised advantages over the pooled rewards of both members (one stat tracker); then
regress the difference of trajectory log-ratios onto the difference of advantages:

    L = mean_pairs ( rebel_lr · [(log π_θ(y) − log π_old(y)) − (log π_θ(y′) − log π_old(y′))] − (A(y) − A(y′)) )²

with log π(y) = Σ_k log π(x_{k+1} | x_k) (sum over the N steps of the per-element-mean step log-probs) and
π_old the sampling policy. `rebel_lr` is 1/η of the REBEL paper. At initialisation the log-ratios vanish, so
L = mean(ΔA²) and ∇L = −2·rebel_lr·ΔA·∇Δlogπ: the higher-advantage member's log-prob rises.
Works with the stochastic DDIM step (SD, SD-Turbo, tiny) and with RLCM's stochastic LCM step (LCM, tiny-lcm).

Memory: the reference keeps the autograd graph of all 2N UNet calls of a pair-minibatch. Here the loss is a
square of a per-pair scalar, so its gradient is exactly Σ_k ∇[2·rebel_lr·stopgrad(residual)·(log π_θ(y)_k −
log π_θ(y′)_k)]: one no-grad pass computes the residual with the current weights, then one backward per step
(activations of one UNet call). Same gradient, same optimizer steps; accelerate counts N backward calls per
pair-minibatch, so each per-step term is scaled by N to undo accelerate's division (see `rebel_step_surrogate`).

Schedule (RLCM): one optimizer step every `train.gradient_accumulation_steps` pair-minibatches; Adam (weight
decay 0 in the presets); LinearLR from 1 to 0 over `train.lr_decay × num_epochs` epochs, stepped at the start of
each epoch (so it only decays to ≈ 1 − 1/lr_decay of the initial LR; 0 = constant). RLCM's REBEL loop does not
clip gradients; `max_grad_norm: .inf` reproduces that (set a number for a fair comparison with PPO's 5).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import AlgoSchema, LogProbTrainSchema, SampleSchema, StatTrackingSchema
from ..core.rollout import Trajectory, step_log_prob
from ..core.stats import PromptStatTracker, whiten
from .common import collect_groups, process_slice, training_guidance, validate_log_prob_policy, validate_minibatches


@dataclass
class TrainSchema(LogProbTrainSchema):
    rebel_lr: float
    lr_decay: float


@dataclass
class Config(AlgoSchema):
    sample: SampleSchema
    train: TrainSchema
    per_prompt_stat_tracking: StatTrackingSchema


# ------------------------------------------------------------------------------------------- pure functions
def rebel_residual(log_prob: torch.Tensor, old_log_prob: torch.Tensor, log_prob_2: torch.Tensor,
                   old_log_prob_2: torch.Tensor, adv: torch.Tensor, adv_2: torch.Tensor,
                   rebel_lr: float) -> torch.Tensor:
    """Per-pair regression residual rebel_lr·Δlogratio − ΔA. Trajectory log-probs (B,) (sums over steps),
    advantages (B,) → (B,)."""
    delta_logratio = (log_prob - old_log_prob) - (log_prob_2 - old_log_prob_2)
    return rebel_lr * delta_logratio - (adv - adv_2)


def rebel_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, log_prob_2: torch.Tensor,
               old_log_prob_2: torch.Tensor, adv: torch.Tensor, adv_2: torch.Tensor, rebel_lr: float) -> torch.Tensor:
    """L = mean_b (rebel_lr·[(log π_θ(y) − log π_old(y)) − (log π_θ(y′) − log π_old(y′))] − (A(y) − A(y′)))².
    All inputs (B,): trajectory log-probs (sums over steps) and advantages. Scalar."""
    return rebel_residual(log_prob, old_log_prob, log_prob_2, old_log_prob_2, adv, adv_2, rebel_lr).pow(2).mean()


def rebel_step_surrogate(step_log_prob: torch.Tensor, step_log_prob_2: torch.Tensor, residual: torch.Tensor,
                         rebel_lr: float, num_steps: int) -> torch.Tensor:
    """Per-step term whose gradients, summed over the N steps and divided by N (accelerate's averaging over the N
    backward calls), equal ∇rebel_loss: N · mean_b 2·rebel_lr·stopgrad(residual_b)·(log π_θ(y_b)_k − log π_θ(y′_b)_k).
    step_log_prob(_2): (B,) with grad; residual: (B,)."""
    return num_steps * (2.0 * rebel_lr * residual.detach() * (step_log_prob - step_log_prob_2)).mean()


def pair_advantages(prompts: list[str], rewards: np.ndarray, rewards_2: np.ndarray,
                    tracker: PromptStatTracker | None) -> tuple[np.ndarray, np.ndarray]:
    """Normalised advantages of both members: one tracker update over [rewards(y); rewards(y′)] (both members feed
    the same per-prompt buffer, as in RLCM), or global whitening over both. (B,), (B,) → (B,), (B,)."""
    pooled = np.concatenate([rewards, rewards_2])
    adv = tracker.update(list(prompts) * 2, pooled) if tracker is not None else whiten(pooled)
    return adv[:len(rewards)], adv[len(rewards):]


def linear_lr_factor(epoch: int, num_epochs: int, lr_decay: float) -> float:
    """RLCM's LinearLR(1 → 0 over lr_decay·num_epochs iterations), stepped at the START of each epoch: epoch e
    (0-based) trains with 1 − (e+1)/(lr_decay·num_epochs). lr_decay = 0: constant 1."""
    if lr_decay <= 0:
        return 1.0
    return max(0.0, 1.0 - (epoch + 1) / (lr_decay * num_epochs))


# ------------------------------------------------------------------------------------------- algorithm API
def validate(cfg) -> None:
    validate_log_prob_policy(cfg)
    if cfg.algo.train.rebel_lr <= 0:
        raise ValueError(f"algo.train.rebel_lr (1/η) must be > 0, got {cfg.algo.train.rebel_lr}")
    validate_minibatches(cfg, unit="pairs")


def gradient_accumulation_steps(cfg) -> int:
    # One backward per (pair-minibatch, step): see the module docstring.
    return int(cfg.algo.train.gradient_accumulation_steps) * int(cfg.steps.train)


def init_state(ctx) -> dict:
    st = ctx.cfg.algo.per_prompt_stat_tracking
    return {"tracker": PromptStatTracker(int(st.buffer_size), int(st.min_count)) if st.enabled else None}


def _trajectory_log_probs(ctx, mb: Trajectory, guidance: float) -> torch.Tensor:
    """Σ_k log π_θ(x_{k+1} | x_k) under the current weights, no grad. (B,)."""
    eta = float(ctx.cfg.algo.sample.eta)
    total = torch.zeros(len(mb), device=mb.log_probs.device)
    with torch.no_grad():
        for k in range(mb.num_steps):
            total += step_log_prob(ctx.model, mb, k, eta=eta, guidance_scale=guidance, unet=ctx.unet).log_prob
    return total


def train_epoch(ctx, state: dict, epoch: int) -> dict:
    cfg, acc = ctx.cfg.algo, ctx.accelerator
    factor = linear_lr_factor(epoch, int(cfg.num_epochs), float(cfg.train.lr_decay))
    for group in ctx.optimizer.param_groups:  # set from the epoch, so a resumed run gets the same LR
        group["lr"] = float(cfg.train.learning_rate) * factor

    # ---- sample pairs with independent x_T
    pairs, rewards = collect_groups(ctx, int(cfg.sample.num_batches_per_epoch), int(cfg.sample.batch_size), 2,
                                    shared_x_T=False)
    P = pairs.num_groups

    # ---- advantages over all processes' pairs; each process keeps its own slice
    all_prompts, all_r = ctx.gather(pairs.prompts, rewards[:, 0].contiguous())
    _, all_r2 = ctx.gather(pairs.prompts, rewards[:, 1].contiguous())
    adv, adv_2 = pair_advantages(all_prompts, all_r.cpu().numpy(), all_r2.cpu().numpy(), state["tracker"])
    adv, adv_2 = process_slice(acc, adv), process_slice(acc, adv_2)
    # trajectory log-probs under the sampling policy, (P,) per member
    old, old_2 = pairs.member(0).log_probs.sum(1), pairs.member(1).log_probs.sum(1)

    # ---- regression updates
    guidance = training_guidance(ctx)
    eta, c, bs, N = float(cfg.sample.eta), float(cfg.train.rebel_lr), int(cfg.train.batch_size), pairs.traj.num_steps
    ctx.unet.train()
    logs: dict[str, list[float]] = {"loss": [], "delta_logratio_abs": [], "delta_adv_abs": [], "grad_norm": []}
    for _ in range(int(cfg.train.num_inner_epochs)):
        perm = torch.randperm(P, generator=ctx.generator)  # the same permutation for both members
        bar = tqdm(total=P // bs, desc="training", leave=False, disable=not ctx.progress)
        for start in range(0, P, bs):
            idx = perm[start:start + bs]
            mb = pairs.select(idx)
            dev = idx.to(adv.device)
            # residual with the current weights (no grad), then one backward per step; both members in one UNet
            # call each time (member-major: y at [0, bs), y′ at [bs, 2bs))
            lp, lp2 = mb.by_group(_trajectory_log_probs(ctx, mb.traj, guidance)).unbind(1)
            residual = rebel_residual(lp, old[dev], lp2, old_2[dev], adv[dev], adv_2[dev], c)
            grad_norm = None
            for k in range(N):
                with acc.accumulate(ctx.unet):
                    out = step_log_prob(ctx.model, mb.traj, k, eta=eta, guidance_scale=guidance, unet=ctx.unet)
                    lp_k, lp2_k = mb.by_group(out.log_prob).unbind(1)
                    surrogate = rebel_step_surrogate(lp_k, lp2_k, residual, c, N)
                    grad_norm = ctx.backward(surrogate)
            logs["loss"].append(float(residual.pow(2).mean()))
            logs["delta_logratio_abs"].append(float(((lp - old[dev]) - (lp2 - old_2[dev])).abs().mean()))
            logs["delta_adv_abs"].append(float((adv[dev] - adv_2[dev]).abs().mean()))
            if grad_norm is not None:
                logs["grad_norm"].append(grad_norm)
            bar.update(1)
        bar.close()

    all_rewards = torch.cat([all_r, all_r2])
    summary = {k: float(np.mean(v)) for k, v in logs.items() if v}
    summary.update(reward_mean=float(all_rewards.mean()), reward_std=float(all_rewards.std(unbiased=False)),
                   lr=float(cfg.train.learning_rate) * factor)
    return summary
