import numpy as np
import pytest

from align_bench.core.stats import PromptStatTracker, whiten


def test_below_min_count_uses_whole_batch_statistics():
    tr = PromptStatTracker(buffer_size=4, min_count=3)
    r = np.array([1.0, 2.0, 10.0, 20.0])
    adv = tr.update(["a", "a", "b", "b"], r)
    expected = (r - r.mean()) / (r.std() + 1e-6)  # both prompts have 2 < 3 entries: batch stats (other prompts too)
    np.testing.assert_allclose(adv, expected)


def test_above_min_count_uses_the_prompt_buffer_including_current():
    tr = PromptStatTracker(buffer_size=4, min_count=3)
    tr.update(["a", "a", "b", "b"], np.array([1.0, 2.0, 10.0, 20.0]))
    adv = tr.update(["a", "b"], np.array([3.0, 30.0]))
    buf_a, buf_b = np.array([1.0, 2.0, 3.0]), np.array([10.0, 20.0, 30.0])
    np.testing.assert_allclose(adv, [(3 - buf_a.mean()) / (buf_a.std() + 1e-6),
                                     (30 - buf_b.mean()) / (buf_b.std() + 1e-6)])


def test_buffer_is_fifo_and_state_round_trips():
    tr = PromptStatTracker(buffer_size=2, min_count=1)
    tr.update(["a"] * 3, np.array([1.0, 2.0, 3.0]))
    assert list(tr.buffers["a"]) == [2.0, 3.0]
    clone = PromptStatTracker(buffer_size=9, min_count=9)
    clone.load_state_dict(tr.state_dict())
    np.testing.assert_allclose(clone.update(["a"], np.array([5.0])), tr.update(["a"], np.array([5.0])))


def test_keys_may_be_prompt_step_tuples():
    tr = PromptStatTracker(buffer_size=8, min_count=1)
    adv = tr.update([("a", 0), ("a", 1), ("a", 0)], np.array([1.0, 5.0, 3.0]))
    assert adv[1] == pytest.approx(0.0)
    np.testing.assert_allclose(adv[[0, 2]], [-1 / (1 + 1e-6), 1 / (1 + 1e-6)])


def test_whiten():
    w = whiten(np.array([1.0, 3.0]))
    np.testing.assert_allclose(w, [-1.0, 1.0], atol=1e-7)


def _quadratic_reference(tracker_state: dict, keys: list, rewards: np.ndarray, buffer_size: int, min_count: int):
    """The tracker as first written (one mask over all keys per unique key): what the O(keys) update must equal."""
    from collections import deque

    buffers = {k: deque(v, maxlen=buffer_size) for k, v in tracker_state.items()}
    adv = np.empty_like(rewards)
    for key in dict.fromkeys(keys):
        mask = np.array([k == key for k in keys])
        buf = buffers.setdefault(key, deque(maxlen=buffer_size))
        buf.extend(rewards[mask].tolist())
        mean, std = (rewards.mean(), rewards.std()) if len(buf) < min_count else (np.mean(buf), np.std(buf))
        adv[mask] = (rewards[mask] - mean) / (std + 1e-6)
    return adv, {k: list(v) for k, v in buffers.items()}


def test_linear_update_gives_the_same_numbers_as_the_quadratic_one():
    """Per-(prompt, step) keys as SDPO uses them, over several epochs: bit-identical advantages and buffers."""
    rng = np.random.default_rng(0)
    tr = PromptStatTracker(buffer_size=8, min_count=4)
    for epoch in range(5):
        keys = [(f"p{rng.integers(12)}", int(s)) for s in rng.integers(0, 5, size=200)]
        rewards = rng.normal(size=200)
        expected, buffers = _quadratic_reference(tr.state_dict()["buffers"], keys, rewards, 8, 4)
        assert np.array_equal(tr.update(keys, rewards), expected), epoch
        assert tr.state_dict()["buffers"] == buffers
