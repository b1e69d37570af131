"""Algorithm registry: Hydra's `algo=<name>` dispatches to the module of the same name.

Each module is one file that reads top to bottom and exposes:
  Config                              dataclass schema of conf/algo/<name>.yaml (subclass of AlgoSchema)
  validate(cfg) -> None               one-line errors for bad settings, before any model loads
  gradient_accumulation_steps(cfg)    backward calls per optimizer step (accelerate's unit)
  init_state(ctx) -> dict             algorithm state (stat trackers, ...); entries with state_dict() are checkpointed
  train_epoch(ctx, state, epoch) -> dict   one epoch (in the algorithm's own meaning) → summary scalars
"""

from importlib import import_module

_NAMES = ["ddpo"]
_OPTIONAL = ["d3po", "rebel", "alignprop", "spo", "sdpo"]

ALGORITHMS = {name: import_module(f".{name}", __name__) for name in _NAMES}
for _name in _OPTIONAL:
    try:
        ALGORITHMS[_name] = import_module(f".{_name}", __name__)
    except ModuleNotFoundError as e:  # not written yet
        if e.name != f"{__name__}.{_name}":
            raise


def get_algorithm(name: str):
    if name not in ALGORITHMS:
        raise KeyError(f"unknown algorithm {name!r}; available: {sorted(ALGORITHMS)}")
    return ALGORITHMS[name]
