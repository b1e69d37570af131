"""Reward registry: name → scorer. Tensor-in API shared by every algorithm.

A reward is a callable ``reward(images, prompts) -> (rewards, info)``:
  images:  (B, 3, H, W) float in [0, 1] (decoded, post-processed samples)
  prompts: list of B strings
  rewards: (B,) float32 tensor on the images' device
  info:    dict of extra per-batch metadata (may be empty)

``differentiable`` says whether gradients flow from rewards to images (AlignProp needs it).
"""

from __future__ import annotations

from typing import Any, Callable

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
    """Base class. Subclasses implement ``score(images, prompts) -> (B,)``."""

    name: str = "?"
    differentiable: bool = False
    needs_prompt: bool = False

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, dict[str, Any]]:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.name}: expected images (B,3,H,W), got {tuple(images.shape)}")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{self.name}: {images.shape[0]} images but {len(prompts)} prompts")
        if self.differentiable and torch.is_grad_enabled():
            rewards = self.score(images, prompts)
        else:
            with torch.no_grad():
                rewards = self.score(images, prompts)
        return rewards.float(), {}


def reward_info(name: str) -> type:
    """The registered class for ``name``, or a one-line error listing what exists."""
    from . import _import_all  # noqa: F401  (fills the registry)

    if name not in REWARDS:
        raise KeyError(f"unknown reward {name!r}; registered rewards: {sorted(REWARDS)}")
    return REWARDS[name]


def differentiable_rewards() -> list[str]:
    from . import _import_all  # noqa: F401

    return sorted(n for n, c in REWARDS.items() if c.differentiable)


def build_reward(name: str, device: torch.device | str = "cpu", **kwargs) -> Reward:
    reward = reward_info(name)(**kwargs)
    return reward.to(device).eval().requires_grad_(False)
