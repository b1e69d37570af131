"""Rewards. Importing this package registers every built-in reward."""

from .base import REWARDS, Reward, build_reward, differentiable_rewards, register_reward, reward_info

from . import _import_all  # noqa: E402,F401

__all__ = ["REWARDS", "Reward", "build_reward", "differentiable_rewards", "register_reward", "reward_info"]
