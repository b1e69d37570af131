"""D3PO — Direct Preference for Denoising Diffusion Policy Optimization (Yang et al., 2024; yk7333/d3po).

Spec: algorithms.md §3. Each epoch: sample `sample.batch_size × sample.num_batches_per_epoch` pairs; the two members
of a pair share the prompt AND the initial noise x_T and diverge only through the η-noise of the stochastic sampler.
The reward model ranks each pair (Pareto comparator: higher reward wins, ties → no preference). Then, for every
(pair-minibatch, trained timestep), the DPO loss on per-step log-prob ratios against the FROZEN INITIAL policy
(the same peft UNet with its LoRA disabled — no second UNet copy), with each ratio clipped to [1−ε, 1+ε]:

    L = −mean_pairs log σ( β·s_0·log clip(r_0) + β·s_1·log clip(r_1) ),   r_i = π_θ(x_{t'}^i | x_t^i) / π_ref(…)

At initialisation π_θ = π_ref, so L = log 2 and ∇L = −(β/2)·(∇log π_w − ∇log π_l): descent raises the winner.

Human-feedback mode (algorithms.md §3.8): with `algo.human.data_dir` set, the pairs come from trajectories saved by
`python -m align_bench.human_feedback sample` and the preference labels a person wrote (`algo.human.labels`);
nothing is sampled or scored during training (see align_bench/human_feedback.py).

Accumulation convention (the reference's): one backward per (pair-minibatch, trained timestep); one optimizer step
every `train.gradient_accumulation_steps` pair-minibatches × all their trained timesteps.

Differences from the reference, on purpose:
  * the loss forward runs through the accelerate-prepared UNet (the reference forwards through the unwrapped
    `pipeline.unet`, so under DDP its gradients are not all-reduced — algorithms.md §1.6), and backward/step run
    inside `accelerator.accumulate` (the reference calls them outside it);
  * the reference log-probs come from the LoRA-disabled UNet (identical numerics to the reference's deep copy of
    the base UNet while the base weights are frozen, half the memory);
  * π_ref is evaluated once per sampled step right after sampling (it never changes) rather than per minibatch;
  * the reference's `train.activation_checkpointing` / `activation_checkpoint` key mismatch does not exist here
    (gradient checkpointing is `model.gradient_checkpointing`), and training diagnostics are actually logged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..config import AlgoSchema, OptimSchema, SampleSchema
from ..core.rollout import Trajectory, step_log_prob
from .common import collect_pairs, num_train_timesteps, validate_log_prob_policy, validate_minibatches


@dataclass
class TrainSchema(OptimSchema):
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    num_inner_epochs: int = 1
    cfg: bool = True
    timestep_fraction: float = 1.0
    beta: float = 0.1
    eps: float = 0.1


@dataclass
class HumanSchema:
    data_dir: Optional[str] = None  # a `human_feedback sample` output directory; None = reward-model mode
    labels: list[str] = field(default_factory=list)  # label files (JSON/CSV) inside or outside data_dir


@dataclass
class Config(AlgoSchema):
    sample: SampleSchema = field(default_factory=SampleSchema)
    train: TrainSchema = field(default_factory=TrainSchema)
    human: HumanSchema = field(default_factory=HumanSchema)


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


def d3po_loss(log_prob: torch.Tensor, ref_log_prob: torch.Tensor, signs: torch.Tensor, beta: float,
              eps: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped-ratio DPO loss on one step of each pair. log_prob, ref_log_prob, signs: (B, 2) (member 0, member 1).

    L = −mean_b log σ( β Σ_i s_i·log clamp(exp(log π_θ,i − log π_ref,i), 1−ε, 1+ε) ). Once a member's ratio leaves
    [1−ε, 1+ε] its gradient is zero (the reference clamps the ratio, not the log-ratio difference)."""
    log_ratio = log_prob - ref_log_prob
    # log clamp(r, 1−ε, 1+ε) computed in log space: the same value and gradient, but exp(log_ratio) overflowing to
    # inf (|log_ratio| > 88 once the policy has moved far at a low-noise step) would give 0·inf = NaN gradients.
    log_clipped = log_ratio.clamp(math.log(1.0 - eps), math.log(1.0 + eps))
    logits = beta * (signs * log_clipped).sum(dim=1)
    loss = -F.logsigmoid(logits).mean()
    info = {
        "log_ratio_abs": log_ratio.detach().abs().mean(),
        "clipfrac": ((torch.exp(log_ratio.detach()) - 1.0).abs() > eps).float().mean(),
        # fraction of preference pairs whose winner currently has the larger ratio (ties excluded)
        "pref_acc": ((logits.detach() > 0).float()[signs[:, 0] != 0]).mean() if (signs[:, 0] != 0).any()
        else torch.tensor(float("nan")),
    }
    return loss, info


def shuffle_pairs(pairs: Trajectory, signs: torch.Tensor, ref_log_probs: torch.Tensor, generator: torch.Generator,
                  timestep_fraction: float) -> tuple[Trajectory, torch.Tensor, torch.Tensor]:
    """Permute pairs, then each pair's steps (the same permutation for both members); keep ⌊N·fraction⌋ steps.

    `pairs` stores member 0 of pair p at index p and member 1 at index P + p (P pairs); signs (P, 2);
    ref_log_probs (2P, N). Returns the same layout, permuted."""
    P, N = len(pairs) // 2, pairs.num_steps
    perm = torch.randperm(P, generator=generator)
    order = torch.stack([torch.randperm(N, generator=generator) for _ in range(P)])[:, :max(1, int(N * timestep_fraction))]
    both = torch.cat([perm, perm + P])
    order2 = torch.cat([order, order])
    ref = torch.gather(ref_log_probs[both], 1, order2.to(ref_log_probs.device))
    return pairs.select(both).with_steps(order2), signs[perm], ref


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
    from ..human_feedback import load_pairs

    pairs, signs = load_pairs(human.data_dir, list(human.labels), ctx.model, ctx.cfg)
    return {"human_pairs": pairs, "human_signs": signs}


def sample_pairs(ctx, batch_size: int) -> tuple[Trajectory, torch.Tensor]:
    """Roll out `batch_size` pairs sharing prompt and x_T, in one batched call. Returns (trajectory of 2B samples:
    member 0 of pair p at p, member 1 at B + p; rewards (2B,))."""
    prompts = ctx.prompt_sampler.sample(batch_size)
    x_T = ctx.model.initial_noise(batch_size, ctx.generator)
    return ctx.sample(prompts + prompts, initial_noise=torch.cat([x_T, x_T]))


@torch.no_grad()
def reference_log_probs(ctx, traj: Trajectory, guidance: float, chunk: int) -> torch.Tensor:
    """log π_ref of every stored step under the frozen initial policy (LoRA disabled). (B, N) float32."""
    out = torch.empty_like(traj.log_probs)
    eta = float(ctx.cfg.algo.sample.eta)
    with ctx.model.lora_disabled(ctx.unet):
        for start in range(0, len(traj), chunk):
            mb = traj.select(slice(start, start + chunk))
            for j in range(traj.num_steps):
                out[start:start + len(mb), j] = step_log_prob(
                    ctx.model, mb.latents[:, j], mb.next_latents[:, j], mb.timesteps[:, j], mb.prev_timesteps[:, j],
                    mb.prompt_embeds, eta=eta, guidance_scale=guidance, unet=ctx.unet).log_prob
    return out


def _interleave(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.stack([a, b], dim=1)


def train_epoch(ctx, state: dict, epoch: int) -> dict:
    cfg, acc = ctx.cfg.algo, ctx.accelerator
    guidance = ctx.guidance_scale if cfg.train.cfg else 1.0
    summary: dict[str, float] = {}
    # ---- pairs: sampled and ranked by the reward model, or loaded with human labels
    if "human_pairs" in state:
        pairs, signs = state["human_pairs"], state["human_signs"]
    else:
        members0, members1, rewards0, rewards1 = collect_pairs(ctx, sample_pairs, int(cfg.sample.batch_size),
                                                               int(cfg.sample.num_batches_per_epoch))
        pairs = Trajectory.cat([members0, members1])
        signs = pareto_signs(rewards0, rewards1).to(pairs.latents.device)
        _, all_rewards = ctx.gather(pairs.prompts, torch.cat([rewards0, rewards1]))
        summary.update(reward_mean=float(all_rewards.mean()), reward_std=float(all_rewards.std(unbiased=False)),
                       tie_frac=float((signs[:, 0] == 0).float().mean()))
    P = len(pairs) // 2
    if "human_ref" in state:  # fixed data and a frozen reference: evaluate π_ref once per run
        ref = state["human_ref"]
    else:
        ref = reference_log_probs(ctx, pairs, guidance, chunk=max(2, 2 * int(cfg.sample.batch_size)))
        if "human_pairs" in state:
            state["human_ref"] = ref

    # ---- DPO updates
    ctx.unet.train()
    logs: dict[str, list[float]] = {"loss": [], "log_ratio_abs": [], "clipfrac": [], "pref_acc": [], "grad_norm": []}
    bs = int(cfg.train.batch_size)
    for _ in range(int(cfg.train.num_inner_epochs)):
        shuffled, sh_signs, sh_ref = shuffle_pairs(pairs, signs, ref, ctx.generator, float(cfg.train.timestep_fraction))
        n_steps = shuffled.num_steps
        bar = tqdm(total=(P // bs) * n_steps, desc="training", leave=False, disable=not ctx.progress)
        for start in range(0, P - P % bs, bs):  # a trailing partial minibatch (human mode) is dropped
            idx = torch.cat([torch.arange(start, start + bs), torch.arange(P + start, P + start + bs)])
            mb, mb_ref, mb_signs = shuffled.select(idx), sh_ref[idx], sh_signs[start:start + bs]
            for j in range(n_steps):
                with acc.accumulate(ctx.unet):
                    out = step_log_prob(ctx.model, mb.latents[:, j], mb.next_latents[:, j], mb.timesteps[:, j],
                                        mb.prev_timesteps[:, j], mb.prompt_embeds, eta=float(cfg.sample.eta),
                                        guidance_scale=guidance, unet=ctx.unet)
                    loss, info = d3po_loss(_interleave(out.log_prob[:bs], out.log_prob[bs:]),
                                           _interleave(mb_ref[:bs, j], mb_ref[bs:, j]), mb_signs,
                                           float(cfg.train.beta), float(cfg.train.eps))
                    grad_norm = ctx.backward(loss)
                logs["loss"].append(loss.item())
                for k, v in info.items():
                    logs[k].append(v.item())
                if grad_norm is not None:
                    logs["grad_norm"].append(grad_norm)
                bar.update(1)
        bar.close()

    summary.update({k: float(np.nanmean(v)) for k, v in logs.items() if v and not np.all(np.isnan(v))})
    summary["num_pairs"] = P
    return summary
