"""D3PO human-feedback mode: label parsing → pairs, sample → label → train round trip on the random pipeline."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from conftest import FAST_RUN, compose

from align_bench import human_feedback as hf


def test_labels_scores_and_choices_to_pairs(tmp_path):
    groups = [["000_0.png", "000_1.png", "000_2.png"], ["001_0.png", "001_1.png"]]
    (tmp_path / "a.csv").write_text("image,prompt,score\n000_0.png,p,1\n000_1.png,p,3\n000_2.png,p,\n"
                                    "001_0.png,q,2\nimages/001_1.png,q,2\n")
    (tmp_path / "b.json").write_text(json.dumps({"000_0.png": 5, "000_2.png": 0}))
    (tmp_path / "c.json").write_text(json.dumps([{"winner": "001_1.png", "loser": "001_0.png"}]))
    scores, choices = hf.read_labels([tmp_path / "a.csv", tmp_path / "b.json", tmp_path / "c.json"])
    assert scores == {"000_0.png": 3.0, "000_1.png": 3.0, "000_2.png": 0.0, "001_0.png": 2.0, "001_1.png": 2.0}
    # 000_0 vs 000_1 tie (averaged 3 vs 3) skipped; 001 tie skipped; the explicit choice kept
    assert hf.preference_pairs(groups, scores, choices) == [(0, 2), (1, 2), (4, 3)]


def test_labels_errors(tmp_path):
    groups = [["000_0.png", "000_1.png"], ["001_0.png", "001_1.png"]]
    with pytest.raises(ValueError, match="not sampled"):
        hf.preference_pairs(groups, {"zzz.png": 1.0}, [])
    with pytest.raises(ValueError, match="same group"):
        hf.preference_pairs(groups, {}, [("000_0.png", "001_0.png")])


@pytest.mark.slow
def test_sample_label_train_round_trip(random_pipeline_dir, load_model, tmp_path):
    from align_bench.runner import run

    overrides = [*FAST_RUN, f"model.path={random_pipeline_dir}", "device=cpu", "algo.train.learning_rate=1e-3",
                 "eval.base=false", "steps.eval=[1]"]
    cfg = compose(["algo=d3po", *overrides])
    model = load_model(random_pipeline_dir)
    data = hf.sample_groups(model, ["cat", "dog"], 3, hf.sampling_settings(cfg), tmp_path / "hf",
                            torch.Generator().manual_seed(0))
    stored = torch.load(data / hf.TRAJECTORY_FILE, weights_only=False)
    lat = stored["trajectory"]["latents"]
    assert lat.shape[:2] == (6, 3) and torch.equal(lat[0, 0], lat[2, 0]) and not torch.equal(lat[0, 0], lat[3, 0])
    assert len(list((data / "images").glob("*.png"))) == 6 and (data / "index.html").is_file()
    # a "person" fills the template: scores 0, 1, 2 within each group ⇒ 3 pairs per group
    rows = list(csv.DictReader((data / hf.TEMPLATE_FILE).open()))
    with (data / "filled.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "prompt", "score"])
        w.writeheader()
        for r in rows:
            w.writerow({**r, "score": r["image"][-5]})
    cfg = compose(["algo=d3po", *overrides, "algo.num_epochs=1", f"algo.human.data_dir={data}",
                   f"algo.human.labels=[{data / 'filled.csv'}]"])
    metrics = run(cfg, tmp_path / "run")
    (first,) = metrics["train"]
    assert first["num_pairs"] == 6 and first["reward_queries"] == 0  # nothing sampled or scored in training
    assert first["optimizer_steps"] == 6  # one step per pair
    assert abs(first["loss"] - 0.6931) < 1e-3

    bad = compose(["algo=d3po", *overrides, "steps.train=2"])
    with pytest.raises(ValueError, match="other settings"):
        hf.load_pairs(data, [str(data / "filled.csv")], model, bad)
