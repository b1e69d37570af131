"""Weight-free differentiable pixel rewards: sanity checks for reward-backprop algorithms (AlignProp) on any
model, including random-weight test pipelines, and in multi-process tests where no learned reward is at hand."""

from __future__ import annotations

from .base import Reward, register_reward


@register_reward("brightness")
class Brightness(Reward):
    """Mean pixel value of the image in [0, 1] (B,) — differentiable, prompt-free, trivially hackable."""

    differentiable = True

    def score(self, images, prompts):
        return images.float().mean(dim=(1, 2, 3))
