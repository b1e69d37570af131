"""Checkpoints: LoRA weights in diffusers' format (stock `pipe.load_lora_weights(dir)` reads them) plus what a
resume needs — optimizer, RNG streams, prompt sampler, algorithm state (stat trackers), counters, metrics so far.

Layout: <run_dir>/checkpoints/epoch_<E>/{pytorch_lora_weights.safetensors, training_state.pt}
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import torch


def _dirs(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((d for d in root.iterdir() if d.name.startswith("epoch_")), key=lambda d: int(d.name[6:]))


def latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint directory (one with its training state written), or None."""
    complete = [d for d in _dirs(run_dir) if (d / "training_state.pt").is_file()]
    return complete[-1] if complete else None


def save(run_dir: Path, epoch: int, ctx, state: dict, metrics: dict, keep: int = 2) -> Path:
    """Write checkpoint `epoch` (epochs completed) and prune to the newest `keep`."""
    out = Path(run_dir) / "checkpoints" / f"epoch_{epoch}"
    out.mkdir(parents=True, exist_ok=True)
    ctx.model.save_lora(out)
    payload = {
        "epoch": epoch,
        "optimizer": ctx.optimizer.state_dict(),
        "generator": ctx.generator.get_state(),
        "prompt_sampler": ctx.prompt_sampler.state_dict(),
        "algo_state": {k: v.state_dict() for k, v in state.items() if hasattr(v, "state_dict")},
        "counters": dict(ctx.counters),
        "metrics": metrics,
        "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
    }
    torch.save(payload, out / "training_state.pt.tmp")
    (out / "training_state.pt.tmp").rename(out / "training_state.pt")  # written last: marks the checkpoint complete
    for old in _dirs(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return out


def load(directory: Path, ctx, state: dict) -> tuple[int, dict]:
    """Restore everything `save` wrote into the live run; returns (epochs completed, metrics so far)."""
    payload = torch.load(Path(directory) / "training_state.pt", map_location="cpu", weights_only=False)
    ctx.model.load_lora(directory)
    ctx.optimizer.load_state_dict(payload["optimizer"])
    ctx.generator.set_state(payload["generator"])
    ctx.prompt_sampler.load_state_dict(payload["prompt_sampler"])
    for k, v in payload["algo_state"].items():
        state[k].load_state_dict(v)
    ctx.counters.update(payload["counters"])
    random.setstate(payload["rng"]["python"])
    np.random.set_state(payload["rng"]["numpy"])
    torch.set_rng_state(payload["rng"]["torch"])
    return int(payload["epoch"]), payload["metrics"]
