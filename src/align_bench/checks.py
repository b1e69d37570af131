"""Configuration checks that run right after composing, before any weight loads: every setting that cannot work
fails here in one line that names the key and the valid values (`ConfigError`). What is checked:

* ranges: batch sizes, epochs, step counts, LoRA rank, clip ranges, … (generic rules on the leaf names of the
  `algo` block, so a new algorithm inherits them), learning rates ≥ 0 (0 is the project's control run);
* the model directory without loading it: its parts exist, its UNet config agrees with `model.family`, and its
  scheduler config bounds the step counts (DDIM: ≤ num_train_timesteps; LCM: ≤ its original_inference_steps);
* names: timestep spacing, dtype, mixed precision for the device, resume mode, rewards and their keyword
  arguments and asset directories, prompt sets / files (blank lines dropped with a warning);
* D3PO's human-feedback files (label rows parse and name sampled images);
* the checkpoint a resume would start from: complete, uncorrupted, made by the same config.

`preflight(argv)` turns Hydra's multi-line composition errors (an unknown group option, a typo in a key, a wrong
type) into the same one-line form before Hydra prints them.
"""

from __future__ import annotations

import difflib
import inspect
import json
import logging
import math
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from . import REPO_ROOT, resolve_path

log = logging.getLogger("align_bench")

CONF_DIR = REPO_ROOT / "conf"
GROUPS = ("algo", "model", "reward", "steps", "prompts", "logger", "experiment")
SPACINGS = ("leading", "trailing", "linspace")
RESUME_MODES = ("auto", "true", "false")
DEVICES = ("auto", "cpu", "cuda")
MIXED_PRECISION = ("no", "fp16", "bf16")

# Generic rules on leaf names anywhere under `algo` (so SPO/SDPO/GRPO inherit them): (test, wording).
_POSITIVE_INT = ("batch_size", "num_batches_per_epoch", "gradient_accumulation_steps", "num_inner_epochs",
                 "num_epochs", "buffer_size")
_POSITIVE = ("clip_range", "adv_clip_max", "max_grad_norm", "adam_epsilon", "beta", "rebel_lr")
_NON_NEGATIVE = ("learning_rate", "adam_weight_decay", "eta", "min_count", "lr_decay")
_UNIT_INTERVAL = ("adam_beta1", "adam_beta2")  # [0, 1)


class ConfigError(ValueError, KeyError):
    """A setting that cannot work; the message is one line naming the key and what is valid. (A KeyError too, as
    the registries' unknown-name errors are.)"""

    __str__ = BaseException.__str__  # KeyError's would quote the message


def _fail(message: str) -> None:
    raise ConfigError(message)


# ------------------------------------------------------------------------------------------------ entry points
def check_config(cfg: DictConfig, run_dir: str | Path | None = None) -> None:
    """Every check below, in order; raises ConfigError (one line) on the first setting that cannot work."""
    _check_top_level(cfg)
    _check_algo_ranges(cfg)
    _check_steps_and_model(cfg)
    _check_rewards(cfg)
    _check_prompts(cfg)
    _check_human_feedback(cfg)
    if run_dir is not None:
        _check_resume(cfg, Path(run_dir))


def resume_mode(cfg) -> str:
    """cfg.resume as one of RESUME_MODES (Hydra reads `resume=true` as a bool; the schema stores it as 'True')."""
    mode = str(cfg.resume).strip().lower()
    if mode not in RESUME_MODES:
        _fail(f"resume={cfg.resume!r} is not valid; expected one of {list(RESUME_MODES)} (auto: resume if a "
              f"checkpoint exists)")
    return mode


def group_options(group: str) -> list[str]:
    """The options of a user-facing config group (conf/<group>/*.yaml; schemas live elsewhere)."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


# ------------------------------------------------------------------------------------------------ top level
def _check_top_level(cfg) -> None:
    from .algorithms import ALGORITHMS

    if cfg.algo.name not in ALGORITHMS:
        _fail(f"algo.name={cfg.algo.name!r} is not an algorithm; valid: {sorted(ALGORITHMS)}")
    resume_mode(cfg)
    if cfg.device not in DEVICES:
        _fail(f"device={cfg.device!r} is not valid; expected one of {list(DEVICES)}")
    if cfg.mixed_precision not in MIXED_PRECISION:
        _fail(f"mixed_precision={cfg.mixed_precision!r} is not valid; expected one of {list(MIXED_PRECISION)}")
    import torch

    on_cpu = cfg.device == "cpu" or not torch.cuda.is_available()
    if cfg.device == "cuda" and not torch.cuda.is_available():
        _fail("device=cuda but no CUDA device is visible; use device=auto or device=cpu")
    if cfg.mixed_precision == "fp16" and on_cpu:
        _fail("mixed_precision=fp16 needs a CUDA GPU, and this run is on the CPU; use mixed_precision=no (or bf16)")
    if cfg.mixed_precision == "bf16" and not on_cpu and not torch.cuda.is_bf16_supported():
        _fail(f"mixed_precision=bf16: {torch.cuda.get_device_name()} does not support bfloat16; use fp16 or no")
    if cfg.model.dtype == "fp16" and on_cpu:
        _fail("model.dtype=fp16 on the CPU: half-precision kernels are missing or very slow there; use "
              "model.dtype=fp32 (or bf16)")
    if not 0 <= int(cfg.seed) < 2**32 - 1000 * 64:
        _fail(f"seed={cfg.seed} must be in [0, 2^32 − 64000) (numpy seeds; each process adds 1000·rank)")
    _at_least("checkpoint.every", cfg.checkpoint.every, 0)
    _at_least("checkpoint.every_minutes", cfg.checkpoint.every_minutes, 0)
    _at_least("checkpoint.keep", cfg.checkpoint.keep, 1, integer=True)
    _at_least("guards.max_consecutive_faulty_epochs", cfg.guards.max_consecutive_faulty_epochs, 1, integer=True)
    _positive("dist_timeout_s", cfg.dist_timeout_s)
    _at_least("logger.log_every", cfg.logger.log_every, 1, integer=True)
    _at_least("eval.batch_size", cfg.eval.batch_size, 1, integer=True)
    _at_least("eval.every", cfg.eval.every, 0, integer=True)
    _at_least("eval.eta", cfg.eval.eta, 0)
    _at_least("prompts.eval_seeds_per_prompt", cfg.prompts.eval_seeds_per_prompt, 1, integer=True)
    if cfg.prompts.eval_max_prompts is not None:
        _at_least("prompts.eval_max_prompts", cfg.prompts.eval_max_prompts, 1, integer=True)
    _at_least("model.lora.rank", cfg.model.lora.rank, 1, integer=True)
    _positive("model.lora.alpha", cfg.model.lora.alpha)
    _at_least("model.guidance_scale", cfg.model.guidance_scale, 0)
    g = cfg.algo.get("sample", {}).get("guidance_scale") if "sample" in cfg.algo else None
    if g is not None:
        _at_least("algo.sample.guidance_scale", g, 0)


def _number(key: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(f"{key}={value!r} must be a number")
    if math.isnan(value):
        _fail(f"{key} is NaN")
    return float(value)


def _at_least(key: str, value, low: float, integer: bool = False) -> None:
    v = _number(key, value)
    if integer and v != int(v):
        _fail(f"{key}={value} must be an integer ≥ {low}")
    if v < low:
        _fail(f"{key}={value} must be ≥ {low:g}")


def _positive(key: str, value) -> None:
    if _number(key, value) <= 0:
        _fail(f"{key}={value} must be > 0")


def _check_algo_ranges(cfg) -> None:
    """Generic rules on the `algo` block's leaf names (see _POSITIVE_INT and friends)."""
    container = OmegaConf.to_container(cfg.algo, resolve=True)

    def walk(prefix: str, node) -> None:
        for k, v in node.items():
            key = f"{prefix}.{k}"
            if isinstance(v, dict):
                walk(key, v)
            elif v is None or isinstance(v, (bool, str, list)):
                continue
            elif k in _POSITIVE_INT:
                _at_least(key, v, 1, integer=True)
            elif k in _POSITIVE:
                _positive(key, v)
            elif k in _NON_NEGATIVE:
                _at_least(key, v, 0)
            elif k in _UNIT_INTERVAL and not 0 <= float(v) < 1:
                _fail(f"{key}={v} must be in [0, 1)")

    walk("algo", container)


# ------------------------------------------------------------------------------------------------ model and steps
def _model_dir(cfg) -> Path | None:
    """The local pipeline directory of cfg.model.path (a hub id found in the local cache included), or None for a
    hub id that only a download would bring (models.diffusion reports that at load, naming what to download)."""
    path = resolve_path(cfg.model.path)
    if path.is_dir():
        return path
    spec = str(cfg.model.path)
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and not Path(spec).parent.exists():
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(spec, local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached: the loader downloads it (or names it) later
            return None
    hint = cfg.model.download_hint or f"download the diffusers pipeline for model {cfg.model.name!r}"
    _fail(f"model.path={cfg.model.path!r}: no such directory ({path}) — {hint}")


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        _fail(f"{what} {path} does not parse ({type(e).__name__}: {e})")


def _check_steps_and_model(cfg) -> None:
    from types import SimpleNamespace

    from .models.diffusion import DTYPES, FAMILIES, unet_family

    m = cfg.model
    if m.family not in FAMILIES:
        _fail(f"model.family={m.family!r} is not valid; expected one of {list(FAMILIES)}")
    if m.timestep_spacing not in SPACINGS:
        _fail(f"model.timestep_spacing={m.timestep_spacing!r} is not valid; expected one of {list(SPACINGS)}")
    if m.dtype not in DTYPES:
        _fail(f"model.dtype={m.dtype!r} is not valid; expected one of {sorted(DTYPES)}")
    _at_least("model.steps_offset", m.steps_offset, 0, integer=True)
    if m.resolution is not None and (int(m.resolution) < 8 or int(m.resolution) % 8):
        _fail(f"model.resolution={m.resolution} must be a positive multiple of 8 (or null: the UNet's own size)")
    _at_least("steps.train", cfg.steps.train, 1, integer=True)
    if not list(cfg.steps.eval):
        _fail("steps.eval is empty; give at least one step count, e.g. steps.eval=[1,2,4,8]")
    for n in cfg.steps.eval:
        _at_least("steps.eval", n, 1, integer=True)

    path = _model_dir(cfg)
    if path is None:
        return
    missing = [p for p in ("unet/config.json", "vae/config.json", "text_encoder/config.json", "tokenizer",
                           "scheduler/scheduler_config.json") if not (path / p).exists()]
    if missing:
        _fail(f"model.path={cfg.model.path!r} ({path}) is not a diffusers pipeline: missing {missing} — "
              f"{m.download_hint}")
    unet_cfg = _read_json(path / "unet/config.json", "UNet config")
    found = unet_family(SimpleNamespace(**unet_cfg))
    if found != m.family:
        _fail(f"model.family={m.family} but the UNet at {path} is a {found!r} UNet; set model.family={found} or "
              f"point model.path at a {m.family} checkpoint ({'LCM' if found == 'lcm' else m.family.upper()} "
              f"options do not apply to this model)")
    sched = _read_json(path / "scheduler/scheduler_config.json", "scheduler config")
    if sched.get("beta_schedule", "scaled_linear") != "scaled_linear":
        _fail(f"model {m.name!r}: beta_schedule={sched.get('beta_schedule')!r} in {path}/scheduler; only "
              f"scaled_linear is supported")
    T = int(sched.get("num_train_timesteps", 1000))
    if m.family == "lcm":
        limit, why = int(sched.get("original_inference_steps", 50)), "its original_inference_steps (LCM grid)"
    else:
        limit, why = T, "its num_train_timesteps"
    for key, values in (("steps.train", [cfg.steps.train]), ("steps.eval", list(cfg.steps.eval))):
        bad = [int(n) for n in values if int(n) > limit]
        if bad:
            _fail(f"{key}={bad if key == 'steps.eval' else bad[0]}: model {m.name!r} can sample at most {limit} steps "
                  f"({why}); valid: 1 … {limit}")


# ------------------------------------------------------------------------------------------------ rewards
def _check_rewards(cfg) -> None:
    from .rewards import REWARDS

    names = [("reward.name", cfg.reward.name)] + [("eval.rewards", n) for n in cfg.eval.rewards]
    for key, name in names:
        if name not in REWARDS:
            _fail(f"{key}: unknown reward {name!r}; valid: {sorted(REWARDS)}")
    kwargs = OmegaConf.to_container(cfg.reward.kwargs, resolve=True) or {}
    _check_reward_args("reward", REWARDS[cfg.reward.name], kwargs)
    for name in cfg.eval.rewards:
        _check_reward_args(f"eval reward {name}", REWARDS[name], {})


def _check_reward_args(where: str, cls, kwargs: dict) -> None:
    """Keyword arguments the reward accepts, and the asset directories/files its arguments name exist."""
    params = {}
    for klass in cls.__mro__:  # a subclass's **kwargs-free __init__ is the signature that counts
        if "__init__" in vars(klass):
            params = dict(inspect.signature(klass.__init__).parameters)
            break
    params.pop("self", None)
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    named = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for k in kwargs:
        if k not in named and not takes_any:
            _fail(f"reward.kwargs.{k} is not an argument of reward {cls.name!r}; valid: {named or 'none'}")
    for n in named:
        value = kwargs.get(n, params[n].default)
        # Only the tiny world's rewards name files in the repo; a real reward's `*_file` is a file inside a hub repo
        # or directory, resolved (with its one-line error naming the download) by models/hub.py.
        if not cls.name.startswith("tiny_"):
            continue
        if isinstance(value, str) and (n.endswith(("_dir", "_path", "_file")) or n in ("path", "directory")):
            if not resolve_path(value).exists():
                _fail(f"{where} {cls.name!r}: {n}={value!r} does not exist ({resolve_path(value)}); rebuild the "
                      f"tiny world with `make tiny-world` or restore assets/ from git, or fix the path")


# ------------------------------------------------------------------------------------------------ prompts
def _check_prompts(cfg) -> None:
    from .prompts import PROMPT_SETS

    for key in ("prompts.train", "prompts.eval"):
        value = str(OmegaConf.select(cfg, key))
        if value in PROMPT_SETS:
            continue
        path = resolve_path(value)
        if not path.is_file():
            close = difflib.get_close_matches(value, list(PROMPT_SETS), n=1)
            suggestion = f" (did you mean {close[0]!r}?)" if close else ""
            _fail(f"{key}={value!r} is neither a registered prompt set nor a file{suggestion}; registered: "
                  f"{sorted(PROMPT_SETS)}")
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            _fail(f"{key}: prompt file {path} cannot be read ({type(e).__name__}: {e})")
        prompts = [line for line in lines if line.strip()]
        if not prompts:
            _fail(f"{key}: prompt file {path} has no prompts (one prompt per line)")
        blank = len(lines) - len(prompts)
        if blank:
            log.warning("%s: prompt file %s has %d blank line(s); dropped", key, path, blank)


# ------------------------------------------------------------------------------------------------ human feedback
def _check_human_feedback(cfg) -> None:
    human = cfg.algo.get("human")
    if human is None or human.get("data_dir") is None:
        return
    import torch

    from .human_feedback import TRAJECTORY_FILE, preference_pairs, read_labels

    data_dir = resolve_path(human.data_dir)
    if not (data_dir / TRAJECTORY_FILE).is_file():
        _fail(f"algo.human.data_dir={human.data_dir!r}: no {TRAJECTORY_FILE} in {data_dir} (sample it with "
              f"`python -m align_bench.human_feedback sample --out {human.data_dir}`)")
    if not list(human.labels):
        _fail("algo.human.data_dir is set but algo.human.labels is empty: give the label file(s)")
    try:
        groups = torch.load(data_dir / TRAJECTORY_FILE, map_location="cpu", weights_only=True)["groups"]
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing here
        _fail(f"algo.human.data_dir: {data_dir / TRAJECTORY_FILE} does not load ({type(e).__name__}); sample again")
    scores, choices = read_labels([resolve_path(p) for p in human.labels])
    preference_pairs(groups, scores, choices)


# ------------------------------------------------------------------------------------------------ resume
def _check_resume(cfg, run_dir: Path) -> None:
    from .core import checkpoint as ckpt

    mode = resume_mode(cfg)
    latest = ckpt.latest(run_dir)
    if mode == "true" and latest is None:
        _fail(f"resume=true but there is no checkpoint in {run_dir / 'checkpoints'}; use resume=auto to start when "
              f"there is none")
    if mode == "false" or latest is None:
        return
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    meta = ckpt.verify(latest, cfg, processes)
    if int(meta["epoch"]) > int(cfg.algo.num_epochs):
        _fail(f"checkpoint {latest} has {meta['epoch']} epochs done but algo.num_epochs={cfg.algo.num_epochs}; "
              f"set algo.num_epochs ≥ {meta['epoch']} or resume=false")


# ------------------------------------------------------------------------------------------------ CLI preflight
def preflight(argv: list[str], compose) -> str | None:
    """Compose the command line's config the way Hydra will (`compose`: main.compose) and return a one-line error
    if it cannot compose (unknown group option, unknown key, wrong type), else None. Sweeps (`-m a=1,2`) are
    checked value by value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if any(a in ("-h", "--help", "--hydra-help", "--info", "-i", "--cfg", "-c", "--shell-completion", "-sc")
           or a.startswith(("--cfg", "--info", "--config-path", "--config-name", "--config-dir", "-cp", "-cn", "-cd"))
           for a in argv):
        return None
    overrides = [a for a in argv if not a.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as e:  # noqa: BLE001 - Hydra's own parse error, shown in one line
        return _one_line(str(e))
    plain = [o for o in parsed if not o.get_key_element().startswith("hydra")]
    for o in plain:
        key = o.get_key_element().lstrip("+~")
        if key in GROUPS and not o.is_sweep_override() and o.value() is not None:
            value = str(o.value())
            if value != "null" and value not in group_options(key):
                close = difflib.get_close_matches(value, group_options(key), n=1)
                return (f"unknown {key} {value!r}{f' (did you mean {close[0]!r}?)' if close else ''}; valid: "
                        f"{group_options(key)}")
    variants = [[_first_value(o) for o in plain]]
    for i, o in enumerate(plain):
        if o.is_sweep_override():
            for v in list(o.sweep_string_iterator())[1:]:
                variant = list(variants[0])
                variant[i] = f"{o.get_key_element()}={v}"
                variants.append(variant)
    for variant in variants:
        error = _compose_error(variant, compose)
        if error:
            return error
    return None


def _first_value(o) -> str:
    if o.is_sweep_override():
        return f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}"
    return o.input_line


def _compose_error(overrides: list[str], compose) -> str | None:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        compose(overrides)
    except (HydraException, OmegaConfBaseException) as e:
        return _explain(e, overrides, compose)
    return None


def _explain(e: Exception, overrides: list[str], compose) -> str:
    """Hydra/OmegaConf composition error → one line: the key, what is wrong, what is valid."""
    cause = e
    while getattr(cause, "__cause__", None) is not None and not getattr(cause, "full_key", None):
        cause = cause.__cause__
    full_key = getattr(cause, "full_key", None)
    text = str(e)
    detail = _one_line(str(cause)) if cause is not e else ""
    if full_key and type(cause).__name__ == "ConfigAttributeError":  # a key the schema does not have
        parent, _, leaf = str(full_key).rpartition(".")
        others = [o for o in overrides if not o.split("=")[0].lstrip("+~").startswith(str(full_key))]
        valid = _keys_of(parent, others, compose)
        close = difflib.get_close_matches(leaf, valid, n=1)
        suggestion = f" (did you mean {parent + '.' if parent else ''}{close[0]}?)" if close else ""
        return f"unknown key {full_key}{suggestion}; valid keys in {parent or 'the top level'}: {valid}"
    if full_key:  # a value of the wrong type
        return f"{full_key}: {detail}"
    if "Could not find" in text and "Available options" in text:
        group = text.split("Could not find '")[1].split("/")[0] if "Could not find '" in text else "?"
        return f"{_one_line(text.split('Available options')[0])}; valid {group}: {group_options(group)}"
    return _one_line(text)


def _keys_of(parent: str, overrides: list[str], compose) -> list[str]:
    try:
        node = compose(overrides)
        node = OmegaConf.select(node, parent) if parent else node
        return sorted(node.keys()) if isinstance(node, DictConfig) else []
    except Exception:  # noqa: BLE001 - best effort: the error line stays useful without the list
        return []


def _one_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).splitlines()
             if ln.strip() and not ln.strip().startswith(("Set the environment variable", "full_key:",
                                                          "reference_type=", "object_type=", "provider=",
                                                          "Config search path"))]
    return "; ".join(lines)
