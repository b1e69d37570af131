"""Figures a person would rather look at than read: sample grids and training curves (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

import torch


def save_image_grid(images_by_steps: dict[int, torch.Tensor], path: Path, title: str = "") -> None:
    """One row per step count, one column per evaluation sample. images (K,3,H,W) in [0,1]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted(images_by_steps)
    cols = max(v.shape[0] for v in images_by_steps.values())
    fig, axes = plt.subplots(len(steps), cols, figsize=(cols * 0.9, len(steps) * 0.95 + 0.4), squeeze=False)
    for r, n in enumerate(steps):
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c < images_by_steps[n].shape[0]:
                ax.imshow(images_by_steps[n][c].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            if c == 0:
                ax.set_title(f"{n} step{'s' if n > 1 else ''}", fontsize=7, loc="left")
    fig.suptitle(title, fontsize=8)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def plot_run(metrics: dict, run_dir: Path) -> None:
    """reward_curve.png: training reward per epoch, with eval means (base, history, final) at the largest step count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = metrics.get("train", [])
    if not train:
        return
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    x = [t["reward_queries"] for t in train]
    y = [t.get("reward_mean", float("nan")) for t in train]
    axes[0].plot(x, y, marker="o", ms=3)
    axes[0].set_xlabel("reward queries")
    axes[0].set_ylabel("training reward (mean)")
    axes[0].set_title(metrics["run"].get("algo", ""))
    ev = metrics.get("eval", {})
    if "final" in ev:
        reward = metrics["run"]["reward"]
        steps = sorted(ev["final"][reward], key=int)
        for phase, style in (("base", "--"), ("final", "-")):
            if phase in ev:
                axes[1].plot([int(s) for s in steps], [ev[phase][reward][s]["mean"] for s in steps], style,
                             marker="o", label=phase)
        axes[1].set_xscale("log", base=2)
        axes[1].set_xlabel("sampling steps")
        axes[1].set_ylabel(f"eval {reward}")
        axes[1].legend()
    fig.tight_layout()
    fig.savefig(Path(run_dir) / "reward_curve.png", dpi=100)
    plt.close(fig)
