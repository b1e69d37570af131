"""Prompt registry: name → list of prompts. A path to a text file (one prompt per line) also works.

Training prompts are drawn per sample, uniformly with replacement, from a seeded generator (as every reference
does); evaluation prompts are the whole list, in order, with fixed seeds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from . import resolve_path
from .tiny.prompts import TINY_PROMPT_SETS

PROMPT_SETS: dict[str, Callable[[], list[str]]] = {}


def register_prompts(name: str):
    def deco(fn: Callable[[], list[str]]):
        if name in PROMPT_SETS:
            raise ValueError(f"prompt set {name!r} registered twice")
        PROMPT_SETS[name] = fn
        return fn

    return deco


# DDPO's `simple_animals` (ddpo_pytorch/assets/simple_animals.txt, 45 animals).
SIMPLE_ANIMALS = (
    "cat dog horse monkey rabbit zebra spider bird sheep deer cow goat lion tiger bear raccoon fox wolf lizard "
    "beetle ant butterfly fish shark whale dolphin squirrel mouse rat snake turtle frog chicken duck goose bee pig "
    "turkey fly llama camel bat gorilla hedgehog kangaroo"
).split()


@register_prompts("simple_animals")
def simple_animals() -> list[str]:
    return list(SIMPLE_ANIMALS)


@register_prompts("simple_animals_activities")
def simple_animals_activities() -> list[str]:
    """DDPO's prompt-alignment set: '<a/an> <animal> <activity>'."""
    activities = ["washing the dishes", "riding a bike", "playing chess"]
    article = lambda w: "an" if w[0] in "aeiou" else "a"  # noqa: E731
    return [f"{article(a)} {a} {act}" for a in SIMPLE_ANIMALS for act in activities]


for _name, _fn in TINY_PROMPT_SETS.items():
    register_prompts(_name)(_fn)


def load_prompts(name_or_path: str) -> list[str]:
    """Registered name, or a text file with one prompt per line (blank lines dropped, unlike AlignProp's loader)."""
    if name_or_path in PROMPT_SETS:
        prompts = PROMPT_SETS[name_or_path]()
    else:
        path = resolve_path(name_or_path)
        if not path.is_file():
            raise KeyError(f"unknown prompt set {name_or_path!r}: not a registered name {sorted(PROMPT_SETS)} "
                           f"and not a file")
        prompts = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompt set {name_or_path!r} is empty")
    return prompts


class PromptSampler:
    """Draws training prompts i.i.d. uniformly from a list with its own seeded RNG (checkpointable)."""

    def __init__(self, prompts: list[str], seed: int):
        self.prompts = list(prompts)
        self.rng = np.random.default_rng(seed)

    def sample(self, n: int) -> list[str]:
        idx = self.rng.integers(0, len(self.prompts), size=n)
        return [self.prompts[i] for i in idx]

    def state_dict(self) -> dict:
        return {"bit_generator": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["bit_generator"]
