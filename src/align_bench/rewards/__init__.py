"""Rewards. Importing this package registers every built-in reward (each module's @register_reward)."""

from . import jpeg, pixel, spm, tiny  # noqa: E402,F401  (registration)
from .base import REWARDS, Reward, build_reward, differentiable_rewards, register_reward, reward_info

__all__ = ["REWARDS", "Reward", "build_reward", "differentiable_rewards", "register_reward", "reward_info"]
