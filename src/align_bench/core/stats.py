"""Advantage statistics: per-prompt running buffers (DDPO, Black et al. 2024; REBEL as RLCM runs it; SDPO per
(prompt, step)), and global whitening."""

from __future__ import annotations

from collections import deque

import numpy as np


class PromptStatTracker:
    """Per-key FIFO buffers of past rewards (key = prompt, or (prompt, step) for SDPO), persisting across epochs.

    `update(keys, rewards)`: for each unique key, append its current rewards to its buffer FIRST; if the buffer
    then holds fewer than `min_count` rewards, normalise with the mean/std of the whole current batch (all keys),
    else with the buffer's (population std). advantage = (r − mean) / (std + 1e-6).
    """

    def __init__(self, buffer_size: int, min_count: int):
        if buffer_size < 1 or min_count < 0:
            raise ValueError(f"need buffer_size ≥ 1 and min_count ≥ 0, got {buffer_size}, {min_count}")
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.buffers: dict = {}

    def update(self, keys: list, rewards: np.ndarray) -> np.ndarray:
        """keys: B hashables; rewards: (B,) → advantages (B,) float64. O(B + unique keys · buffer_size)."""
        rewards = np.asarray(rewards, dtype=np.float64)
        if len(keys) != len(rewards):
            raise ValueError(f"{len(keys)} keys for {len(rewards)} rewards")
        advantages = np.empty_like(rewards)
        batch_mean, batch_std = rewards.mean(), rewards.std()
        positions: dict = {}  # key → its indices in the batch, keys in order of first appearance
        for i, key in enumerate(keys):
            positions.setdefault(key, []).append(i)
        for key, idx in positions.items():
            buf = self.buffers.setdefault(key, deque(maxlen=self.buffer_size))
            mine = rewards[idx]
            buf.extend(mine.tolist())
            if len(buf) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                mean, std = np.mean(buf), np.std(buf)
            advantages[idx] = (mine - mean) / (std + 1e-6)
        return advantages

    def state_dict(self) -> dict:
        return {"buffer_size": self.buffer_size, "min_count": self.min_count,
                "buffers": {k: list(v) for k, v in self.buffers.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.buffer_size, self.min_count = state["buffer_size"], state["min_count"]
        self.buffers = {k: deque(v, maxlen=self.buffer_size) for k, v in state["buffers"].items()}


def whiten(rewards: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """Global batch normalisation (r − mean)/(std + eps), the fallback without a tracker."""
    rewards = np.asarray(rewards, dtype=np.float64)
    return (rewards - rewards.mean()) / (rewards.std() + eps)
