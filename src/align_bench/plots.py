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


def plot_study(runs: list, out: Path) -> list[Path]:
    """Per (model, training reward): `steps_<model>_<reward>` (final eval against eval steps, one line per
    algorithm with its 95 % CI band over seeds, base dashed) and `training_<model>_<reward>` (training reward
    against reward queries and against wall time, mean over seeds); PNG and PDF. Each algorithm's sample grid
    (its lowest seed's samples_final.png: same eval prompts and seeds for every run) is copied beside them.
    Returns the PNG paths, for the results page."""
    import shutil

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .tables import mean_ci

    out = Path(out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    done = [r for r in runs if r.complete]
    figures: list[Path] = []
    for model, reward in sorted({(r.model, r.reward) for r in done}):
        sel = [r for r in done if r.model == model and r.reward == reward and reward in r.final]
        algos = sorted({r.algo for r in sel})
        steps = sorted({int(s) for r in sel for s in r.final[reward]})

        fig, ax = plt.subplots(figsize=(5, 3.4))
        base = [[r.base[reward][str(s)] for r in sel if str(s) in r.base.get(reward, {})] for s in steps]
        if all(base):
            ax.plot(steps, [sum(b) / len(b) for b in base], "k--", marker="o", ms=3, label="base")
        for algo in algos:
            cells = [mean_ci([r.final[reward].get(str(s)) for r in sel if r.algo == algo]) for s in steps]
            mean = [c.mean for c in cells]
            ci = [0.0 if c.n < 2 else c.ci for c in cells]
            line, = ax.plot(steps, mean, marker="o", ms=3, label=f"{algo} (n={max(c.n for c in cells)})")
            ax.fill_between(steps, [m - c for m, c in zip(mean, ci)], [m + c for m, c in zip(mean, ci)],
                            color=line.get_color(), alpha=0.2, lw=0)
        ax.set_xscale("log", base=2)
        ax.set_xticks(steps, [str(s) for s in steps])
        ax.set_xlabel("eval sampling steps")
        ax.set_ylabel(f"final eval {reward}")
        ax.set_title(f"{model} · {reward}", fontsize=9)
        ax.legend(fontsize=7)
        figures.append(_save(fig, out / "figures" / f"steps_{model}_{reward}"))

        fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), sharey=True)
        for algo in algos:
            curves = [r.train for r in sel if r.algo == algo and r.train]
            if not curves:
                continue
            n = min(len(c) for c in curves)
            y = [sum(c[i].get("reward_mean", float("nan")) for c in curves) / len(curves) for i in range(n)]
            q = [sum(c[i].get("reward_queries", 0) for c in curves) / len(curves) for i in range(n)]
            w = [sum(c[i].get("wall_time_s", 0.0) for c in curves) / len(curves) for i in range(n)]
            axes[0].plot(q, y, label=algo)
            axes[1].plot(w, y, label=algo)
        axes[0].set_xlabel("reward queries")
        axes[1].set_xlabel("wall time (s)")
        axes[0].set_ylabel(f"training {reward} (mean over seeds)")
        axes[0].legend(fontsize=7)
        fig.suptitle(f"{model} · {reward}", fontsize=9)
        figures.append(_save(fig, out / "figures" / f"training_{model}_{reward}"))

        for algo in algos:
            first = min((r for r in sel if r.algo == algo), key=lambda r: r.seed)
            grid = first.path.parent / "samples_final.png"
            if grid.is_file():
                dst = out / "figures" / f"samples_{model}_{reward}_{algo}.png"
                shutil.copyfile(grid, dst)
                figures.append(dst)
    return figures


def _save(fig, stem: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=110)
    fig.savefig(stem.with_suffix(".pdf"))
    plt.close(fig)
    return stem.with_suffix(".png")
