"""Algorithm registry: Hydra's `algo=<name>` dispatches to the module of the same name (conf/algo/<name>.yaml).

Each module is one file that reads top to bottom and exposes:
  Config                              dataclass schema of conf/algo/<name>.yaml (subclass of config.AlgoSchema)
  validate(cfg) -> None               one-line errors for bad settings, before any model loads
  gradient_accumulation_steps(cfg)    backward calls per optimizer step (accelerate's unit)
  init_state(ctx) -> dict             algorithm state (stat trackers, ...); entries with state_dict() are checkpointed
  train_epoch(ctx, state, epoch) -> dict   one epoch (in the algorithm's own meaning) → summary scalars
and optionally REQUIRES_DIFFERENTIABLE_REWARD = True. docs/architecture.md shows where a new one plugs in.
"""

from . import alignprop, d3po, ddpo, grpo, rebel, sdpo, spo

ALGORITHMS = {module.__name__.rsplit(".", 1)[1]: module for module in (ddpo, d3po, rebel, alignprop, spo, sdpo, grpo)}


def get_algorithm(name: str):
    if name not in ALGORITHMS:
        raise KeyError(f"unknown algorithm {name!r}; available: {sorted(ALGORITHMS)}")
    return ALGORITHMS[name]
