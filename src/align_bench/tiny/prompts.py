"""Prompt sets of the tiny world, generated from the grammar of ``align_bench.tiny.scenes``.

  ``tiny_train``          every grammar caption (single, sized, counted) over the 48 seen colour pairs (720).
  ``tiny_eval``           ``a {colour} {shape} on a {colour} background`` over the 8 held-out colour pairs (24):
                          colour/shape combinations that no training list (nor any tiny-world model) has seen.
  ``tiny_train_simple``   ``a {colour} {shape} on a {colour} background`` over the seen pairs (144).
  ``tiny_eval_seen``      a fixed 24-prompt subset of ``tiny_train_simple`` (seen-pair counterpart of tiny_eval).
"""

from __future__ import annotations

from .scenes import HELDOUT_PAIRS, SEEN_PAIRS, all_captions, all_single_captions


def _heldout_pairs() -> list[tuple[str, str]]:
    from .scenes import COLOURS

    return [(a, b) for a in COLOURS for b in COLOURS if (a, b) in HELDOUT_PAIRS]


def _eval_seen() -> list[str]:
    simple = all_single_captions(list(SEEN_PAIRS))  # 48 pairs × 3 shapes; take one shape per other pair
    return [simple[6 * i + i % 3] for i in range(24)]


# name → prompt-list function; align_bench.prompts registers them (this module imports nothing of it).
TINY_PROMPT_SETS = {
    "tiny_train": lambda: all_captions(list(SEEN_PAIRS)),
    "tiny_eval": lambda: all_single_captions(_heldout_pairs()),
    "tiny_train_simple": lambda: all_single_captions(list(SEEN_PAIRS)),
    "tiny_eval_seen": _eval_seen,
}
