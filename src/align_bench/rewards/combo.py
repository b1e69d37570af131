"""`combo`: a weighted sum of registered rewards, Σ_i w_i · r_i(images, prompts), with the components and weights in
the config (`reward.kwargs.components: {name: {weight: w, kwargs: {...}}}`). Differentiable iff every component
is; each component keeps its own scale convention (listed in `convention`)."""

from __future__ import annotations

import torch

from .base import Reward, build_reward, register_reward, reward_info


@register_reward("combo")
class Combo(Reward):
    def __init__(self, components: dict):
        super().__init__()
        if not components:
            raise ValueError("reward=combo: reward.kwargs.components is empty; give {name: {weight: w}} entries")
        self.weights: dict[str, float] = {}
        parts = {}
        for name, spec in dict(components).items():
            spec = dict(spec or {})
            unknown = set(spec) - {"weight", "kwargs"}
            if unknown or "weight" not in spec:
                raise ValueError(f"reward=combo: component {name!r} needs `weight` (and optional `kwargs`), got "
                                 f"{sorted(spec)}")
            if name == "combo":
                raise ValueError("reward=combo: a combo cannot contain itself")
            reward_info(name)  # one-line error for an unknown name, before any weights load
            self.weights[name] = float(spec["weight"])
            parts[name] = build_reward(name, **dict(spec.get("kwargs") or {}))
        self.parts = torch.nn.ModuleDict(parts)
        # an instance attribute shadows the class flag: the sum is differentiable only if every term is
        self.differentiable = all(p.differentiable for p in self.parts.values())

    @property
    def convention(self) -> str:
        terms = [f"{w:g}·[{getattr(self.parts[n], 'convention', n)}]" for n, w in self.weights.items()]
        return "combo: " + " + ".join(terms)

    def score(self, images, prompts):
        total = None
        for name, weight in self.weights.items():
            term = weight * self.parts[name](images, prompts).to(images.device)
            total = term if total is None else total + term
        return total
