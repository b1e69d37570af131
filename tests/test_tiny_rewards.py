"""Tiny-world rewards: registry, differentiability, ranking on rendered ground truth, missing-artifact error."""

import numpy as np
import pytest
import torch

from align_bench.rewards import build_reward, differentiable_rewards
from align_bench.tiny import scenes

CAPS = ["a red circle on a blue background", "a white square on a black background",
        "a yellow triangle on a purple background", "a green circle on an orange background".replace("an ", "a "),
        "a large blue square on a white background", "two orange triangles on a green background"]
WRONG = ["a blue circle on a red background", "a black triangle on a white background",
         "a purple square on a yellow background", "a red triangle on a white background",
         "a large yellow circle on a black background", "two purple circles on a white background"]


@pytest.fixture(scope="module")
def gt():
    imgs, _ = scenes.render_captions(CAPS, np.random.default_rng(0))
    return imgs


def test_registry_names():
    assert {"tiny_aesthetic", "tiny_pickscore"} <= set(differentiable_rewards())
    for name in ("tiny_colour_accuracy", "tiny_shape_accuracy", "tiny_true_aesthetic"):
        assert not build_reward(name).differentiable


@pytest.mark.parametrize("name", ["tiny_aesthetic", "tiny_pickscore"])
def test_learned_rewards_are_differentiable(name, gt):
    r = build_reward(name)
    x = torch.nn.functional.interpolate(gt, size=64, mode="nearest").requires_grad_(True)  # also exercises resize
    out = r(x, CAPS)
    assert out.shape == (len(CAPS),) and torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_pickscore_ranks_matching_caption_higher(gt):
    r = build_reward("tiny_pickscore")
    right = r(gt, CAPS)
    wrong = r(gt, WRONG)
    assert (right > wrong).all(), (right, wrong)


def test_oracles_on_ground_truth(gt):
    col = build_reward("tiny_colour_accuracy")
    assert col(gt, CAPS).tolist() == [1.0] * len(CAPS)
    assert col(gt, WRONG).sum() == 0
    shape = build_reward("tiny_shape_accuracy")
    assert shape(gt, CAPS).mean() >= 0.8


def test_aesthetic_tracks_the_analytic_score():
    imgs, _ = scenes.render_batch(np.random.default_rng(3), 256)
    learned = build_reward("tiny_aesthetic")(imgs, [""] * 256)
    true = scenes.aesthetic_score(imgs)
    assert torch.corrcoef(torch.stack([learned, true]))[0, 1] > 0.6


def test_missing_artifact_names_path_and_make_target(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError) as e:
        build_reward("tiny_pickscore", clip_dir=str(missing))
    msg = str(e.value)
    assert str(missing) in msg and "make tiny-world" in msg and "\n" not in msg
