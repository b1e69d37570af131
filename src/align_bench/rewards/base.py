"""Reward registry: name → scorer. Tensor-in API shared by every algorithm.

A reward is a module ``reward(images, prompts, timesteps=None) -> rewards``:
  images:    (B, 3, H, W) float in [0, 1] (decoded, post-processed samples)
  prompts:   list of B strings
  timesteps: (B,) long noise level each image was predicted at, or None for final samples. Only a step-aware
             scorer (``step_aware = True``: SPO's preference model) reads it; every other reward ignores it.
  rewards:   (B,) float32 tensor on the images' device

``differentiable`` says whether gradients flow from rewards to images (AlignProp needs it).
"""

from __future__ import annotations

from typing import Callable

import torch

REWARDS: dict[str, Callable[..., "Reward"]] = {}


def register_reward(name: str):
    """Class decorator: make a reward constructible by ``build_reward(name, **kwargs)``."""

    def deco(cls):
        if name in REWARDS:
            raise ValueError(f"reward {name!r} registered twice")
        REWARDS[name] = cls
        cls.name = name
        return cls

    return deco


class Reward(torch.nn.Module):
    """Base class. Subclasses implement ``score(images, prompts) -> (B,)`` (step-aware ones
    ``score(images, prompts, timesteps)``)."""

    name: str = "?"
    differentiable: bool = False
    step_aware: bool = False

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, images: torch.Tensor, prompts: list[str],
                timesteps: torch.Tensor | None = None) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.name}: expected images (B,3,H,W), got {tuple(images.shape)}")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{self.name}: {images.shape[0]} images but {len(prompts)} prompts")
        args = (images, prompts, timesteps) if self.step_aware else (images, prompts)
        with torch.set_grad_enabled(self.differentiable and torch.is_grad_enabled()):
            rewards = self.score(*args)
        return rewards.float()


def reward_info(name: str) -> type:
    """The registered class for ``name``, or a one-line error listing what exists."""
    if name not in REWARDS:
        raise KeyError(f"unknown reward {name!r}; registered rewards: {sorted(REWARDS)}")
    return REWARDS[name]


def differentiable_rewards() -> list[str]:
    return sorted(n for n, c in REWARDS.items() if c.differentiable)


def build_reward(name: str, device: torch.device | str = "cpu", **kwargs) -> Reward:
    reward = reward_info(name)(**kwargs)
    return reward.to(device).eval().requires_grad_(False)
