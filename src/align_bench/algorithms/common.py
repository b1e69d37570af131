"""Checks, counts and the pair rollout shared by the log-probability algorithms (DDPO, D3PO, REBEL): one place,
one wording."""

from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

from ..core.rollout import Trajectory


def num_train_timesteps(cfg) -> int:
    """Steps trained per trajectory per inner epoch: ⌊N · timestep_fraction⌋, at least 1."""
    return max(1, int(int(cfg.steps.train) * float(cfg.algo.train.get("timestep_fraction", 1.0))))


def validate_log_prob_policy(cfg) -> None:
    """The sampler must define a stochastic policy whose log-probs training can recompute."""
    name, s, t = cfg.algo.name, cfg.algo.sample, cfg.algo.train
    if cfg.model.family != "lcm" and s.eta <= 0:
        raise ValueError(f"{name} needs a stochastic sampler for log-probabilities: algo.sample.eta must be > 0")
    if cfg.model.family == "lcm":
        if int(cfg.steps.train) < 2:
            raise ValueError(f"{name} on an LCM needs steps.train ≥ 2: a 1-step LCM sample is deterministic "
                             f"(no policy)")
        if not t.cfg:
            raise ValueError(f"{name} on an LCM needs algo.train.cfg=true: its guidance embedding is part of the "
                             f"sampled policy")
    if not 0 < float(t.get("timestep_fraction", 1.0)) <= 1:
        raise ValueError(f"algo.train.timestep_fraction must be in (0, 1], got {t.timestep_fraction}")


def validate_minibatches(cfg, unit: str = "trajectories") -> None:
    """sample.batch_size splits into train.batch_size minibatches, and those into whole optimizer steps."""
    s, t = cfg.algo.sample, cfg.algo.train
    if s.batch_size % t.batch_size:
        raise ValueError(f"algo.sample.batch_size ({s.batch_size}) must be a multiple of algo.train.batch_size "
                         f"({t.batch_size}) (both count {unit})")
    minibatches = int(s.batch_size) * int(s.num_batches_per_epoch) // int(t.batch_size)
    if minibatches % t.gradient_accumulation_steps:
        raise ValueError(f"{minibatches} minibatches of {unit} per epoch is not a multiple of "
                         f"algo.train.gradient_accumulation_steps ({t.gradient_accumulation_steps})")


def collect_pairs(ctx, sample_pairs: Callable, batch_size: int, num_batches: int
                  ) -> tuple[Trajectory, Trajectory, torch.Tensor, torch.Tensor]:
    """`num_batches` calls of ``sample_pairs(ctx, batch_size)`` (a trajectory of 2B samples, member 0 of pair p at
    p and member 1 at B + p, and their rewards (2B,)) → (members 0, members 1, rewards 0, rewards 1), pair p of the
    epoch at index p of each. Images are dropped: training needs latents only."""
    members0, members1, rewards0, rewards1 = [], [], [], []
    for _ in tqdm(range(num_batches), desc="sampling", leave=False, disable=not ctx.progress):
        traj, r = sample_pairs(ctx, batch_size)
        traj.images = None
        members0.append(traj.select(slice(0, batch_size)))
        members1.append(traj.select(slice(batch_size, 2 * batch_size)))
        rewards0.append(r[:batch_size])
        rewards1.append(r[batch_size:])
    return Trajectory.cat(members0), Trajectory.cat(members1), torch.cat(rewards0), torch.cat(rewards1)
