"""Tiny world data: renderer determinism, caption ↔ parameter agreement, pixel oracles, prompt sets."""

import numpy as np
import torch

from align_bench.tiny import scenes


def test_render_is_deterministic_from_seed():
    a, sa = scenes.render_seed(1234)
    b, sb = scenes.render_seed(1234)
    c, _ = scenes.render_seed(1235)
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and sa == sb
    assert not np.array_equal(a, c)


def test_caption_round_trips_through_parameters():
    rng = np.random.default_rng(0)
    for _ in range(200):
        s = scenes.sample_scene(rng)
        p = scenes.parse_caption(s.caption())
        assert p == {"shape": s.shape, "colour": s.colour, "background": s.background, "count": s.count,
                     "size": s.size}
        assert len(s.centres) == len(s.radii) == s.count
        assert s.colour != s.background and (s.colour, s.background) not in scenes.HELDOUT_PAIRS
        if s.size == "small":
            assert max(s.radii) <= scenes.RADIUS["small"][1]
        if s.size == "large":
            assert min(s.radii) >= scenes.RADIUS["large"][0]
    assert scenes.parse_caption("a red circle on a blue background")["shape"] == "circle"
    assert scenes.parse_caption("a dog on a sofa") is None


def test_verbatim_family_and_grammar_docstring():
    assert "a {colour} {shape} on a {colour} background" in scenes.__doc__
    assert scenes.caption_of("circle", "red", "blue") == "a red circle on a blue background"
    assert scenes.caption_of("square", "red", "blue", count=3) == "three red squares on a blue background"
    assert scenes.caption_of("triangle", "red", "blue", size="small") == "a small red triangle on a blue background"
    assert len(scenes.COLOURS) >= 6 and {"circle", "square", "triangle"} <= set(scenes.SHAPES)


def test_pixels_agree_with_parameters():
    rng = np.random.default_rng(1)
    imgs, sc = scenes.render_batch(rng, 64)
    assert imgs.shape == (64, 3, 32, 32) and 0 <= imgs.min() and imgs.max() <= 1
    prompts = [s.caption() for s in sc]
    assert scenes.colour_correct(imgs, prompts).mean() == 1.0
    # swap the colours in the prompt → the oracle says wrong
    swapped = [scenes.caption_of(s.shape, s.background, s.colour, s.count, s.size) for s in sc]
    assert scenes.colour_correct(imgs, swapped).sum() == 0
    # the rendered area grows with the radius
    cov = [scenes.coverage(s).sum() / s.count for s in sc]
    r = [np.mean(s.radii) for s in sc]
    assert np.corrcoef(cov, r)[0, 1] > 0.8


def test_aesthetic_score_prefers_large_centred_contrasty():
    good = scenes.Scene("circle", "white", "black", centres=[(16, 16)], radii=[9.5])
    bad = scenes.Scene("circle", "orange", "red", centres=[(4, 4)], radii=[3.0])
    imgs = torch.from_numpy(np.stack([scenes.render(good), scenes.render(bad)])).permute(0, 3, 1, 2) / 255
    a = scenes.aesthetic_score(imgs.float())
    assert 0 <= a.min() and a.max() <= 10 and a[0] > a[1] + 4


def test_prompt_sets_are_registered_and_disjoint():
    from align_bench.prompts import load_prompts

    train, ev = load_prompts("tiny_train"), load_prompts("tiny_eval")
    assert len(train) >= 100 and len(ev) >= 12
    assert not set(train) & set(ev)
    for p in ev:
        q = scenes.parse_caption(p)
        assert (q["colour"], q["background"]) in scenes.HELDOUT_PAIRS
    assert set(load_prompts("tiny_eval_seen")) <= set(train)
    assert {scenes.parse_caption(p)["shape"] for p in load_prompts("tiny_eval_seen")} == set(scenes.SHAPES)
