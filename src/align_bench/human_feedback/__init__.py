"""D3PO's human-feedback mode (Yang et al., CVPR 2024; docs/algos/d3po.md): sample groups of images that share
prompt and x_T, save them
with their trajectories, let a person label them, then train D3PO on the labelled pairs.

    # 1. sample: 8 prompts × 4 images each (every image of a group shares the prompt and x_T)
    python -m align_bench.human_feedback sample --out hf/round1 --prompts 8 --per-prompt 4 model=tiny
    # 2. a person fills the `score` column of hf/round1/labels.csv (higher = better; blank = skip), or writes
    #    winner/loser rows, or a JSON file (see `read_labels`); several annotators' files are averaged
    # 3. train (the same as `python train.py algo=d3po algo.human.data_dir=hf/round1 algo.human.labels=[...]`)
    python -m align_bench.human_feedback train --data hf/round1 --labels hf/round1/labels.csv model=tiny

Label files (CSV with a header, or JSON), any mix of:
  * per-image scores:  CSV columns `image,score` (others ignored) | JSON {"<image>": score} | JSON [{"image", "score"}]
  * pairwise choices:  CSV columns `winner,loser`                | JSON [{"winner", "loser"}]
Scores become every pair of the same group whose (annotator-averaged) scores differ — exact ties are skipped, as
the reference does; pairwise rows are used as given. Images are named `<group>_<member>.png` (file name or path).
Differences from the reference's loader: scores are averaged per image over the files that score it (the
reference truncates all files to the shortest), and unknown image names are an error, not silently misaligned.

Trajectories are stored on disk (`trajectories.pt`) with the settings they were sampled with; training refuses a
config whose model, step count, η or guidance differ (the stored transitions would not be the policy's).
"""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

import torch

from ..core.rollout import Trajectory, rollout

TRAJECTORY_FILE = "trajectories.pt"
TEMPLATE_FILE = "labels.csv"


# ------------------------------------------------------------------------------------------------ labels
def read_labels(paths: list[str | Path]) -> tuple[dict[str, float], list[tuple[str, str]]]:
    """Parse label files → (image → score averaged over the files that score it, [(winner, loser), ...]).
    Image names are reduced to their file name."""
    sums: dict[str, list[float]] = {}
    choices: list[tuple[str, str]] = []
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"label file {path} does not exist")
        if path.suffix.lower() == ".json":
            try:
                data = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"label file {path} is not valid JSON ({e})") from None
            rows = [{"image": k, "score": v} for k, v in data.items()] if isinstance(data, dict) else list(data)
            first = 1  # JSON: entries counted from 1
        elif path.suffix.lower() == ".csv":
            with path.open(newline="") as f:
                rows = list(csv.DictReader(f))
            first = 2  # CSV: the header is row 1
        else:
            raise ValueError(f"label file {path}: expected .csv or .json")
        for n, row in enumerate(rows, start=first):
            if not isinstance(row, dict):
                raise ValueError(f"label file {path}, entry {n}: expected an object with image/score or winner/loser, "
                                 f"got {row!r}")
            if row.get("winner") not in (None, "") and row.get("loser") not in (None, ""):
                choices.append((Path(str(row["winner"])).name, Path(str(row["loser"])).name))
            elif row.get("image") not in (None, "") and row.get("score") not in (None, ""):
                try:
                    score = float(row["score"])
                except (TypeError, ValueError):
                    raise ValueError(f"label file {path}, row {n}: score {row['score']!r} is not a number") from None
                if score != score or score in (float("inf"), float("-inf")):
                    raise ValueError(f"label file {path}, row {n}: score {row['score']!r} is not finite")
                sums.setdefault(Path(str(row["image"])).name, []).append(score)
            elif any(row.get(k) not in (None, "") for k in ("winner", "loser")) or (
                    row.get("score") not in (None, "") and row.get("image") in (None, "")):
                given = {k: v for k, v in row.items() if v not in (None, "")}
                raise ValueError(f"label file {path}, row {n}: a winner needs a loser and a score needs an image, got "
                                 f"{given}")
    return {k: sum(v) / len(v) for k, v in sums.items()}, choices


def preference_pairs(groups: list[list[str]], scores: dict[str, float],
                     choices: list[tuple[str, str]]) -> list[tuple[int, int]]:
    """(winner, loser) sample indices. groups: image names per group (sample index = position in the flattened
    list). Scored pairs: all pairs of a group with different scores; choices: as given (same group required)."""
    index = {name: i for i, name in enumerate(n for g in groups for n in g)}
    group_of = {name: gi for gi, g in enumerate(groups) for name in g}
    unknown = [n for n in list(scores) + [n for c in choices for n in c] if n not in index]
    if unknown:
        raise ValueError(f"labels name images that were not sampled here: {sorted(set(unknown))[:5]}")
    pairs = []
    for g in groups:
        for a, b in itertools.combinations([n for n in g if n in scores], 2):
            if scores[a] != scores[b]:
                pairs.append((index[a], index[b]) if scores[a] > scores[b] else (index[b], index[a]))
    for winner, loser in choices:
        if group_of[winner] != group_of[loser]:
            raise ValueError(f"pairwise label {winner} > {loser}: the images must come from the same group "
                             f"(same x_T)")
        pairs.append((index[winner], index[loser]))
    return pairs


# ------------------------------------------------------------------------------------------------ sample
def sampling_settings(cfg) -> dict:
    return {"model": str(cfg.model.name), "steps": int(cfg.steps.train), "eta": float(cfg.algo.sample.eta),
            "guidance_scale": float(cfg.model.guidance_scale if cfg.algo.sample.get("guidance_scale") is None
                                    else cfg.algo.sample.guidance_scale)}


def sample_groups(model, prompts: list[str], per_prompt: int, settings: dict, out_dir: str | Path,
                  generator: torch.Generator) -> Path:
    """Roll out `per_prompt` trajectories per prompt from one shared x_T; save images, trajectories and a label
    template to `out_dir`. Returns out_dir."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    trajs, groups = [], []
    for gi, prompt in enumerate(prompts):
        x_T = model.initial_noise(1, generator).repeat(per_prompt, 1, 1, 1)
        with torch.no_grad():
            traj = rollout(model, [prompt] * per_prompt, num_steps=settings["steps"], eta=settings["eta"],
                           guidance_scale=settings["guidance_scale"], generator=generator, initial_noise=x_T)
        names = [f"{gi:03d}_{j}.png" for j in range(per_prompt)]
        for name, img in zip(names, traj.images):
            _save_png(img, out / "images" / name)
        traj.images = None
        trajs.append(traj)
        groups.append(names)
    traj = Trajectory.cat(trajs)
    torch.save({"trajectory": traj.state(), "groups": groups, "settings": settings}, out / TRAJECTORY_FILE)
    with (out / TEMPLATE_FILE).open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "prompt", "score"])
        for prompt, names in zip(prompts, groups):
            for name in names:
                w.writerow([name, prompt, ""])
    _write_html(out, prompts, groups)
    return out


def _save_png(image: torch.Tensor, path: Path) -> None:
    from PIL import Image

    arr = (image.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    Image.fromarray(arr).save(path)


def _write_html(out: Path, prompts: list[str], groups: list[list[str]]) -> None:
    """index.html: one row per group, image names under each image, to label by eye."""
    rows = "".join(
        f"<h3>{p}</h3><div>" + "".join(
            f'<figure style="display:inline-block"><img src="images/{n}" width="160" style="image-rendering:pixelated">'
            f"<figcaption>{n}</figcaption></figure>" for n in names) + "</div>"
        for p, names in zip(prompts, groups))
    (out / "index.html").write_text(f"<html><body><p>Fill the score column of {TEMPLATE_FILE} "
                                    f"(higher = better).</p>{rows}</body></html>")


# ------------------------------------------------------------------------------------------------ load
def load_pairs(data_dir: str | Path, label_files: list[str], model, cfg) -> tuple[Trajectory, torch.Tensor]:
    """Labelled pairs for D3PO: (trajectory of 2P samples — winner of pair p at p, loser at P + p —, signs (P, 2)
    all (+1, −1)). Checks that `cfg` would reproduce the stored transitions."""
    from .. import resolve_path

    data = torch.load(resolve_path(data_dir) / TRAJECTORY_FILE, map_location="cpu", weights_only=True)
    saved, now = data["settings"], sampling_settings(cfg)
    diff = {k: (saved[k], now[k]) for k in saved if saved[k] != now[k]}
    if diff:
        raise ValueError(f"human-feedback data {data_dir} was sampled with other settings (saved, now): {diff}")
    scores, choices = read_labels([resolve_path(p) for p in label_files])
    pairs = preference_pairs(data["groups"], scores, choices)
    if not pairs:
        raise ValueError(f"no preference pairs in {label_files}: fill in scores that differ within a group")
    traj = Trajectory.from_state(data["trajectory"], model.device)
    winners, losers = zip(*pairs)
    both = traj.select(list(winners) + list(losers))
    signs = torch.tensor([[1.0, -1.0]], device=model.device).expand(len(pairs), 2).clone()
    return both, signs
