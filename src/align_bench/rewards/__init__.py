"""Rewards. Importing this package registers every built-in reward (each module's @register_reward)."""

from . import jpeg, pixel, spm, tiny  # noqa: E402,F401  (registration)
from . import aesthetic, combo, hpsv2, imagereward, pickscore  # noqa: E402,F401  (real rewards; weights load lazily)
from .base import REWARDS, Reward, build_reward, differentiable_rewards, register_reward, reward_info

__all__ = ["REWARDS", "Reward", "build_reward", "differentiable_rewards", "register_reward", "reward_info"]
