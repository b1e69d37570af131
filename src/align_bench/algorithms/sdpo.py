"""SDPO — Stepwise Diffusion Policy Optimization: Zhang, Shen, Zhang, Ye, Luo, Shi, Shan, Du, Tao, "Aligning Few-Step
Diffusion Models with Dense Reward Difference Learning", IEEE TPAMI 2026 (arXiv:2411.11727); reference code
ZiyiZhang27/sdpo. Not the LLM method of the same name that trl ships (Self-Distilled Policy Optimization). What it
optimises, its equations and every difference from the reference: docs/algos/sdpo.md.

Each epoch: `sample.num_batches_per_epoch` sampling calls of `sample.batch_size` prompts, each sampled TWICE from
the same x_T with the stochastic sampler (η > 0), keeping x̂0 at every step (dual-state trajectories). Per
trajectory exactly three x̂0 are decoded and scored through `ctx.score`: the first step's (for a few-step model,
the 1-step sample), the anchor step's (the step least similar to both ends) and the last step's (the final image).
Every other step gets a dense reward interpolated by latent cosine similarity to those three (`dense_rewards`).
Then discounted returns (γ), per-(prompt, step) normalisation, and for every (trained time position j, pair
minibatch) — time outer, minibatch inner, each sample's steps shuffled independently — the pessimistic clipped
regression of the pair's λ^k-weighted log-ratio difference onto its advantage difference (`sdpo_loss`).

Accumulation (the reference's): one backward per (time position, pair-minibatch); one optimizer step every
`train.gradient_accumulation_steps` backward calls (NOT multiplied by the number of steps), so an epoch makes
⌊N·timestep_fraction⌋ · (pairs / train.batch_size) / accumulation optimizer steps per inner epoch.
Works on every family: DDIM steps (SD-Turbo, SD, tiny) and the stochastic LCM step (x̂0 = the denoised d).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..config import AlgoSchema, LogProbTrainSchema, SampleSchema, StatTrackingSchema
from ..core.rollout import step_log_prob
from ..core.stats import PromptStatTracker, whiten
from .common import (Groups, num_train_timesteps, process_slice, record_step, sample_groups, training_guidance,
                     validate_log_prob_policy, validate_minibatches)

# Which x̂0 of a trajectory are scored, in this order (the reference's [first, anchor, last]).
QUERIES = ("first", "anchor", "last")


@dataclass
class DenseSampleSchema(SampleSchema):
    gamma: float


@dataclass
class TrainSchema(LogProbTrainSchema):
    adv_clip_max: float
    clip_range: float
    timestep_fraction: float
    lam: float
    log_scale: float
    shuffle_batch: bool
    shuffle_timestep: bool


@dataclass
class Config(AlgoSchema):
    sample: DenseSampleSchema
    train: TrainSchema
    per_step_prompt_stat_tracking: StatTrackingSchema


# ------------------------------------------------------------------------------------------- dense rewards
def similarity_curves(x0_preds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cosine similarity of every step's x̂0 (flattened latent) to the first, anchor and last x̂0, and the anchor
    step a = argmin_k [cos(x̂0_k, x̂0_0) + cos(x̂0_k, x̂0_{N−1})]. x0_preds (B, N, C, h, w) →
    sim_first, sim_anchor, sim_last (B, N) float32, anchor (B,) long."""
    flat = x0_preds.flatten(2).float()
    sim_first = F.cosine_similarity(flat, flat[:, :1], dim=2)
    sim_last = F.cosine_similarity(flat, flat[:, -1:], dim=2)
    anchor = (sim_first + sim_last).argmin(dim=1)
    anchor_x0 = flat[torch.arange(len(flat), device=flat.device), anchor]
    sim_anchor = F.cosine_similarity(flat, anchor_x0[:, None], dim=2)
    return sim_first, sim_anchor, sim_last, anchor


def dense_rewards(measured: torch.Tensor, similarities: torch.Tensor, anchor: torch.Tensor,
                  eps: float = 1e-6) -> torch.Tensor:
    """SDPO's similarity-weighted dense rewards. measured (B, 3): rewards of the first, anchor and last x̂0;
    similarities (B, 3, N): each step's cosine similarity to those three x̂0; anchor (B,) long → (B, N).

        r_k = Σ_q R_q·s_q[k] / Σ_q s_q[k],   then r_0 = R_first, r_{N−1} = R_last, r_a = R_anchor exactly.

    Guard (the reference divides by the raw sum): similarities are clamped at 0, since a negative cosine would
    pull the estimate away from that reward and can make the denominator vanish or flip sign; where the clamped
    weights sum below `eps` the step gets the plain mean of the three rewards."""
    weights = similarities.float().clamp(min=0)
    total = weights.sum(dim=1)  # (B, N)
    safe = total >= eps
    weighted = (measured.float()[:, :, None] * weights).sum(dim=1) / torch.where(safe, total, torch.ones_like(total))
    rewards = torch.where(safe, weighted, measured.float().mean(dim=1, keepdim=True).expand_as(weighted))
    rows = torch.arange(len(rewards), device=rewards.device)
    rewards[:, 0], rewards[:, -1] = measured[:, 0], measured[:, 2]
    rewards[rows, anchor] = measured[:, 1].float()
    return rewards


# ------------------------------------------------------------------------------------------- advantages
def discounted_returns(rewards: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_k = r_k + γ·G_{k+1}, G_{N−1} = r_{N−1}, for every row. rewards (B, N) → (B, N) float64. γ = 0 leaves the
    rewards as they are (the reference skips the recursion unless γ > 0)."""
    returns = rewards.double().clone()
    if gamma > 0:
        for k in range(returns.shape[1] - 2, -1, -1):
            returns[:, k] += gamma * returns[:, k + 1]
    return returns


def stepwise_advantages(prompts: list[str], returns: np.ndarray, tracker: PromptStatTracker | None) -> np.ndarray:
    """Per-(prompt, step) normalised returns: one buffer per (prompt, step index); a key still short of min_count
    uses the statistics of its step's column of this batch. Without a tracker: whitening over every entry.
    returns (B, N) → advantages (B, N) float64."""
    returns = np.asarray(returns, dtype=np.float64)
    if tracker is None:
        return whiten(returns)
    out = np.empty_like(returns)
    for k in range(returns.shape[1]):
        out[:, k] = tracker.update([(p, k) for p in prompts], returns[:, k])
    return out


def temporal_weights(num_steps: int, lam: float) -> torch.Tensor:
    """λ^k for step index k = 0 … N−1 (the noisiest step weighs 1). (N,) float32."""
    return torch.tensor(float(lam)) ** torch.arange(num_steps, dtype=torch.float32)


# ------------------------------------------------------------------------------------------- loss
def sdpo_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, weights: torch.Tensor,
              clip_range: float, adv_clip_max: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Pessimistic clipped reward-difference regression on one step of each pair.
    log_prob, old_log_prob, advantages: (B, 2) (member 0, member 1) at that step; weights (B,): λ^k / log_scale.

        Δℓ = (ℓ_0 − ℓ_0,old) − (ℓ_1 − ℓ_1,old),  ΔA = clip(A_0, ±m) − clip(A_1, ±m)
        L  = mean_b max((w·Δℓ − ΔA)², (w·Δℓ_clip − ΔA)²),  Δℓ_clip from log-ratios clamped to ±clip_range
    (clip_range 0: the unclipped square only). Before the first update Δℓ = 0, so L = mean(ΔA²), clipfrac = 0."""
    adv = advantages.clamp(-adv_clip_max, adv_clip_max)
    delta_adv = adv[:, 0] - adv[:, 1]
    log_ratio = log_prob - old_log_prob
    delta = log_ratio[:, 0] - log_ratio[:, 1]
    unclipped = (weights * delta - delta_adv) ** 2
    if clip_range > 0:
        clipped_ratio = log_ratio.clamp(-clip_range, clip_range)
        clipped = (weights * (clipped_ratio[:, 0] - clipped_ratio[:, 1]) - delta_adv) ** 2
        loss = torch.maximum(unclipped, clipped).mean()
        clipfrac = (clipped.detach() > unclipped.detach()).float().mean()
    else:
        loss = unclipped.mean()
        clipfrac = torch.zeros(())
    info = {
        "clipfrac": clipfrac,
        "adv_clipfrac": (advantages.abs() > adv_clip_max).float().mean(),
        "log_diff_abs": delta.detach().abs().mean(),
    }
    return loss, info


def shuffle_for_training(pairs: Groups, advantages: torch.Tensor, weights: torch.Tensor, generator: torch.Generator,
                         *, shuffle_batch: bool, shuffle_timestep: bool,
                         num_train_steps: int) -> tuple[Groups, torch.Tensor, torch.Tensor]:
    """The reference's per-inner-epoch shuffle: permute the pairs, then each pair's time axis independently (both
    members alike), keeping the first `num_train_steps` positions. advantages (P, 2, N), weights (N,) →
    (pairs, advantages (P, 2, n), weights (P, n)), all aligned position by position."""
    P, N = pairs.num_groups, pairs.traj.num_steps
    if shuffle_batch:
        perm = torch.randperm(P, generator=generator)
        pairs, advantages = pairs.select(perm), advantages[perm.to(advantages.device)]
    if shuffle_timestep:
        order = torch.stack([torch.randperm(N, generator=generator) for _ in range(P)])
    else:
        order = torch.arange(N).expand(P, N)
    order = order[:, :num_train_steps]
    dev = order.to(advantages.device)
    advantages = torch.gather(advantages, 2, dev[:, None, :].expand(P, 2, num_train_steps))
    return pairs.with_steps(order), advantages, weights.to(advantages.device)[dev]


def optimizer_steps_per_epoch(cfg) -> int:
    """Optimizer steps of one epoch per process: ⌊N·fraction⌋ time positions × pair-minibatches per position
    / accumulation, times the inner epochs (validate guarantees whole steps)."""
    a = cfg.algo
    minibatches = int(a.sample.batch_size) * int(a.sample.num_batches_per_epoch) // int(a.train.batch_size)
    return (num_train_timesteps(cfg) * minibatches // int(a.train.gradient_accumulation_steps)
            * int(a.train.num_inner_epochs))


# ------------------------------------------------------------------------------------------- sampling
def collect_dense_pairs(ctx, num_batches: int, pairs_per_batch: int) -> tuple[Groups, dict[str, torch.Tensor]]:
    """An epoch of pairs sharing prompt and x_T, each trajectory scored exactly three times through `ctx.score`
    (its first, anchor and last x̂0; nothing else is decoded). Returns (pairs without images or x̂0, measured:
    {"rewards": (2P, 3) first/anchor/last, "dense": (2P, N), "anchor": (2P,) long}) in the pairs' member-major
    trajectory order."""
    batches, measured, dense, anchors = [], [], [], []
    for _ in tqdm(range(num_batches), desc="sampling", leave=False, disable=not ctx.progress):
        pairs = sample_groups(ctx, pairs_per_batch, 2, shared_x_T=True, keep_x0_preds=True, decode=False)
        traj = pairs.traj
        sim_first, sim_anchor, sim_last, anchor = similarity_curves(traj.x0_preds)
        rows = torch.arange(len(traj), device=traj.x0_preds.device)
        steps = {"first": torch.zeros_like(anchor), "anchor": anchor, "last": torch.full_like(anchor, -1)}
        scores = []
        for q in QUERIES:
            k = steps[q] % traj.num_steps
            with torch.no_grad():
                images = ctx.model.decode(traj.x0_preds[rows, k.to(rows.device)])
                scores.append(ctx.score(images, traj.prompts, traj.timesteps[rows, k.to(rows.device)]))
        rewards = torch.stack(scores, dim=1).float().cpu()
        sims = torch.stack([sim_first, sim_anchor, sim_last], dim=1).cpu()
        dense.append(dense_rewards(rewards, sims, anchor.cpu()))
        measured.append(rewards)
        anchors.append(anchor.cpu())
        traj.x0_preds = None  # training needs latents only; frees (2P, N, C, h, w)
        batches.append(pairs)
    # Groups.cat reorders member-major over all batches; the per-trajectory values follow the same order.
    order = lambda xs: torch.cat([x.reshape(2, -1, *x.shape[1:])[m] for m in range(2) for x in xs])  # noqa: E731
    return Groups.cat(batches), {"rewards": order(measured), "dense": order(dense), "anchor": order(anchors)}


# ------------------------------------------------------------------------------------------- algorithm API
def validate(cfg) -> None:
    a = cfg.algo
    validate_log_prob_policy(cfg)
    validate_minibatches(cfg, unit="pairs")
    if not 0 <= float(a.sample.gamma) <= 1:
        raise ValueError(f"algo.sample.gamma (discount) must be in [0, 1], got {a.sample.gamma}")
    if float(a.train.lam) <= 0 or float(a.train.log_scale) <= 0:
        raise ValueError(f"algo.train.lam and algo.train.log_scale must be > 0, got {a.train.lam}, "
                         f"{a.train.log_scale}")
    if float(a.train.clip_range) < 0 or float(a.train.adv_clip_max) <= 0:
        raise ValueError(f"need algo.train.clip_range ≥ 0 and adv_clip_max > 0, got {a.train.clip_range}, "
                         f"{a.train.adv_clip_max}")
    guidance = float(cfg.model.guidance_scale if a.sample.get("guidance_scale") is None else a.sample.guidance_scale)
    if cfg.model.family != "lcm" and guidance > 1 and not a.train.cfg:
        raise ValueError(f"sdpo samples with CFG {guidance} but algo.train.cfg=false: training log-probs would not "
                         f"be the sampling policy's (set algo.train.cfg=true, or guidance 1 as on SD-Turbo)")


def gradient_accumulation_steps(cfg) -> int:
    return int(cfg.algo.train.gradient_accumulation_steps)


def init_state(ctx) -> dict:
    st = ctx.cfg.algo.per_step_prompt_stat_tracking
    return {"tracker": PromptStatTracker(int(st.buffer_size), int(st.min_count)) if st.enabled else None}


def train_epoch(ctx, state: dict, epoch: int) -> dict:
    cfg, acc = ctx.cfg.algo, ctx.accelerator
    # ---- sample pairs, three reward queries per trajectory, dense rewards
    pairs, measured = collect_dense_pairs(ctx, int(cfg.sample.num_batches_per_epoch), int(cfg.sample.batch_size))
    P, N = pairs.num_groups, pairs.traj.num_steps

    # ---- returns → per-(prompt, step) normalisation over all processes; each process keeps its block
    all_prompts, all_dense = ctx.gather(pairs.traj.prompts, measured["dense"])
    _, all_anchor = ctx.gather(pairs.traj.prompts, measured["anchor"].float())
    returns = discounted_returns(all_dense.cpu(), float(cfg.sample.gamma))
    adv = stepwise_advantages(all_prompts, returns.numpy(), state["tracker"])
    adv = process_slice(acc, adv.reshape(-1)).reshape(2 * P, N)
    adv = pairs.by_group(adv)  # (P, 2, N)
    weights = temporal_weights(N, float(cfg.train.lam)) / float(cfg.train.log_scale)

    # ---- updates: time position outer, pair-minibatch inner
    guidance, eta = training_guidance(ctx), float(cfg.sample.eta)
    n_train, bs = num_train_timesteps(ctx.cfg), int(cfg.train.batch_size)
    ctx.unet.train()
    logs: dict[str, list[float]] = {"loss": [], "clipfrac": [], "adv_clipfrac": [], "log_diff_abs": [],
                                    "grad_norm": []}
    for _ in range(int(cfg.train.num_inner_epochs)):
        shuffled, sh_adv, sh_w = shuffle_for_training(
            pairs, adv, weights, ctx.generator, shuffle_batch=bool(cfg.train.shuffle_batch),
            shuffle_timestep=bool(cfg.train.shuffle_timestep), num_train_steps=n_train)
        minibatches = [(shuffled.select(torch.arange(s, s + bs)), slice(s, s + bs)) for s in range(0, P, bs)]
        bar = tqdm(total=n_train * len(minibatches), desc="training", leave=False, disable=not ctx.progress)
        for j in range(n_train):
            for mb, rows in minibatches:
                with acc.accumulate(ctx.unet):
                    out = step_log_prob(ctx.model, mb.traj, j, eta=eta, guidance_scale=guidance, unet=ctx.unet)
                    loss, info = sdpo_loss(mb.by_group(out.log_prob), mb.by_group(mb.traj.log_probs[:, j]),
                                           sh_adv[rows, :, j], sh_w[rows, j], float(cfg.train.clip_range),
                                           float(cfg.train.adv_clip_max))
                    grad_norm = ctx.backward(loss)
                record_step(logs, loss, info, grad_norm)
                bar.update(1)
        bar.close()

    # The reference's step-generalisation read-outs: reward of the 1-step x̂0 and of the final sample.
    first, last = all_dense[:, 0].float(), all_dense[:, -1].float()
    summary = {k: float(np.mean(v)) for k, v in logs.items() if v}
    summary.update(reward_mean=float(last.mean()), reward_std=float(last.std(unbiased=False)),
                   reward_1step_mean=float(first.mean()), reward_1step_std=float(first.std(unbiased=False)),
                   reward_final_mean=float(last.mean()), reward_final_std=float(last.std(unbiased=False)),
                   anchor_step_mean=float(all_anchor.mean()))
    return summary
