"""What the real reward models share: checkpoints resolved through models/hub.py (a missing one is one line naming
the hub id, the download command and the tiny world's counterpart), optional packages named with the extra that
installs them, the `scale` convention, and scoring in batches.

Two paths, one code: with grad enabled and a differentiable reward (AlignProp) the whole batch goes through at once
and gradients reach the images; otherwise (every other algorithm, evaluation) the batch is scored in chunks of
`batch_size` under no_grad, so a 64-image evaluation batch of a ViT-H scorer fits in memory.
"""

from __future__ import annotations

import torch

from ..models.hub import MissingCheckpointError, resolve_dir, resolve_file
from .base import Reward


class MissingRewardDependency(ImportError):
    """An optional package of a reward is not installed: the message names the extra that installs it."""


class PretrainedReward(Reward):
    """Base of the rewards with real weights. Subclasses set `tiny_counterpart`, `scales` ({name: meaning}) and
    implement `score_batch(images, prompts)`."""

    tiny_counterpart: str = ""
    scales: dict[str, str] = {}

    def __init__(self, scale: str, batch_size: int):
        super().__init__()
        if scale not in self.scales:
            raise ValueError(f"reward={self.name}: unknown scale {scale!r}; expected one of {sorted(self.scales)}")
        if int(batch_size) < 1:
            raise ValueError(f"reward={self.name}: batch_size must be ≥ 1, got {batch_size}")
        self.scale = scale
        self.batch_size = int(batch_size)

    @property
    def convention(self) -> str:
        """The scale in words (written into metrics.json, so numbers are compared on one scale)."""
        return f"{self.name}: scale={self.scale} ({self.scales[self.scale]})"

    # ------------------------------------------------------------------------------------------- checkpoints
    def _hint(self) -> str:
        return f"on the tiny world use reward={self.tiny_counterpart}" if self.tiny_counterpart else ""

    def checkpoint_dir(self, path: str, what: str):
        return resolve_dir(path, what=f"reward={self.name}: {what}", hint=self._hint())

    def checkpoint_file(self, path: str, repo_id: str | None, filename: str | None, what: str):
        return resolve_file(path, repo_id, filename, what=f"reward={self.name}: {what}", hint=self._hint())

    def require(self, module: str, package: str):
        """Import an optional package, or fail in one line naming the extra that installs it."""
        import importlib

        try:
            return importlib.import_module(module)
        except ImportError:
            raise MissingRewardDependency(
                f"reward={self.name} needs {package}: pip install -e '.[rewards]' (or pip install {package})"
                + (f"; {self._hint()}" if self.tiny_counterpart else "")) from None

    # ----------------------------------------------------------------------------------------------- scoring
    @property
    def param_device(self) -> torch.device:
        return next(self.parameters()).device

    def score_batch(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        images = images.to(self.param_device, torch.float32)
        if torch.is_grad_enabled() or len(images) <= self.batch_size:
            return self.score_batch(images, list(prompts)).reshape(-1)
        with torch.no_grad():
            return torch.cat([self.score_batch(images[i:i + self.batch_size], list(prompts[i:i + self.batch_size]))
                              .reshape(-1) for i in range(0, len(images), self.batch_size)])


def features(out) -> torch.Tensor:
    """transformers 5's CLIP get_*_features return an output object (pooler_output: the projected features);
    4.x returned the tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


__all__ = ["MissingCheckpointError", "MissingRewardDependency", "PretrainedReward", "features"]
