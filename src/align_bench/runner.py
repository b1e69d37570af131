"""One training run, top to bottom: validate → load → evaluate base → epochs of the chosen algorithm → evaluate
final → metrics.json. The algorithm module supplies `train_epoch`; everything else is shared here.

No trainer class: `RunContext` is a bag of the run's objects plus the helpers every algorithm uses: `rollout`
(sample with the current policy), `score` (the training reward; the only place that counts reward queries),
`backward` and `gather`."""

from __future__ import annotations

import json
import logging
import os
import platform
import random
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from . import REPO_ROOT, __version__
from .algorithms import get_algorithm
from .core import checkpoint as ckpt
from .core.evaluation import eval_items, evaluate, format_table, merge_scores, summarize
from .core.rollout import Trajectory, rollout
from .models.diffusion import FAMILIES, DiffusionModel, ModelSpec
from .loggers import build_logger, check_backends
from .prompts import PromptSampler, load_prompts
from .rewards import build_reward, differentiable_rewards, reward_info

log = logging.getLogger("align_bench")


@dataclass
class RunContext:
    cfg: DictConfig
    accelerator: object
    model: DiffusionModel
    unet: torch.nn.Module  # the accelerate-prepared UNet: forward through it in every differentiable call
    optimizer: torch.optim.Optimizer
    reward_fn: object
    prompt_sampler: PromptSampler
    generator: torch.Generator  # CPU generator for sampling noise (checkpointed)
    run_dir: Path
    counters: dict = field(default_factory=lambda: {"reward_queries": 0, "images": 0, "optimizer_steps": 0})

    @property
    def guidance_scale(self) -> float:
        g = self.cfg.algo.sample.get("guidance_scale")
        return float(self.cfg.model.guidance_scale if g is None else g)

    @property
    def progress(self) -> bool:
        return bool(self.cfg.logger.progress) and self.accelerator.is_main_process

    def rollout(self, prompts: list[str], **rollout_kwargs) -> Trajectory:
        """Sample `prompts` with the current policy through the prepared UNet: the training step count, η, guidance
        and noise stream unless `rollout_kwargs` (any of `core.rollout.rollout`'s) say otherwise. Counts the
        trajectories in `images`. Runs the UNet in train mode only when sampling with grad (AlignProp)."""
        kwargs = dict(num_steps=int(self.cfg.steps.train), eta=float(self.cfg.algo.sample.eta),
                      guidance_scale=self.guidance_scale, generator=self.generator, unet=self.unet)
        kwargs.update(rollout_kwargs)
        self.unet.train(kwargs.get("grad_from_step") is not None)
        traj = rollout(self.model, prompts, **kwargs)
        self.counters["images"] += len(prompts)
        return traj

    def score(self, images: torch.Tensor, prompts: list[str], timesteps: torch.Tensor | None = None) -> torch.Tensor:
        """The training reward of B images (B,) float32: final samples, or x̂0 predictions at `timesteps` (B,) for
        a step-aware reward (plain rewards ignore them). The only place that counts reward queries. Gradients
        reach `images` when the reward is differentiable and grad is on (AlignProp)."""
        rewards = self.reward_fn(images, prompts, timesteps)
        self.counters["reward_queries"] += len(images)
        return rewards

    def backward(self, loss: torch.Tensor) -> float | None:
        """Inside `accelerator.accumulate(unet)`: backward, and at sync steps clip, step, zero. Returns the grad
        norm at a sync step, else None."""
        acc = self.accelerator
        acc.backward(loss)
        grad_norm = None
        if acc.sync_gradients:
            grad_norm = float(acc.clip_grad_norm_(self.model.lora_parameters(), self.cfg.algo.train.max_grad_norm))
            self.counters["optimizer_steps"] += 1
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def gather(self, prompts: list[str], values: torch.Tensor) -> tuple[list[str], torch.Tensor]:
        """All processes' prompts and values, concatenated in process order (for advantages and logging)."""
        from accelerate.utils import gather_object

        if self.accelerator.num_processes == 1:
            return list(prompts), values
        return gather_object(list(prompts)), self.accelerator.gather(values.to(self.accelerator.device)).cpu()


# ------------------------------------------------------------------------------------------------ validation
def validate(cfg: DictConfig) -> None:
    """Fail fast, in one line, on settings that cannot work — before any weight is loaded."""
    algo = get_algorithm(cfg.algo.name)
    if cfg.model.family not in FAMILIES:
        raise ValueError(f"unknown model.family {cfg.model.family!r}; expected one of {list(FAMILIES)}")
    reward_cls = reward_info(cfg.reward.name)
    if getattr(algo, "REQUIRES_DIFFERENTIABLE_REWARD", False) and not reward_cls.differentiable:
        raise ValueError(f"algo={cfg.algo.name} backpropagates through the reward, but reward={cfg.reward.name} is "
                         f"not differentiable; differentiable rewards: {differentiable_rewards()}")
    for name in cfg.eval.rewards:
        reward_info(name)
    if any(int(n) < 1 for n in cfg.steps.eval) or int(cfg.steps.train) < 1:
        raise ValueError(f"step counts must be ≥ 1, got train={cfg.steps.train} eval={list(cfg.steps.eval)}")
    if cfg.mixed_precision not in ("no", "fp16", "bf16"):
        raise ValueError(f"mixed_precision must be no, fp16 or bf16, got {cfg.mixed_precision!r}")
    check_backends(cfg.logger.backends)
    algo.validate(cfg)


# ------------------------------------------------------------------------------------------------ the run
def run(cfg: DictConfig, run_dir: str | Path) -> dict:
    from accelerate import Accelerator

    t_start = time.time()
    validate(cfg)
    _quiet_libraries()
    algo = get_algorithm(cfg.algo.name)
    run_dir = Path(run_dir)
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=algo.gradient_accumulation_steps(cfg),
        # Without CUDA, cpu=True lets torchrun/accelerate-launched processes form a gloo (MULTI_CPU) group.
        cpu=cfg.device == "cpu" or not torch.cuda.is_available(),
    )
    main = accelerator.is_main_process
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    # Before seeding and loading: a backend's own randomness (wandb's run id) cannot shift the run's RNG streams,
    # and a missing logger package fails before the weights load.
    logger = build_logger(cfg.logger, run_dir, OmegaConf.to_container(cfg, resolve=True),
                          f"{cfg.algo.name}-{cfg.model.name}-{cfg.reward.name}-seed{cfg.seed}", main)
    # Device-specific seeds: each process draws different samples, all reproducible from cfg.seed.
    seed = int(cfg.seed) + 1000 * accelerator.process_index
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)

    model = DiffusionModel.from_pretrained(ModelSpec.from_config(cfg.model), device=accelerator.device)
    if cfg.model.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
    model.add_lora(int(cfg.model.lora.rank), float(cfg.model.lora.alpha))
    tc = cfg.algo.train
    optimizer = torch.optim.AdamW(model.lora_parameters(), lr=tc.learning_rate, betas=(tc.adam_beta1, tc.adam_beta2),
                                  weight_decay=tc.adam_weight_decay, eps=tc.adam_epsilon)
    unet, optimizer = accelerator.prepare(model.unet, optimizer)

    reward_fn = build_reward(cfg.reward.name, accelerator.device, **cfg.reward.kwargs)
    eval_rewards = {cfg.reward.name: reward_fn}
    for name in cfg.eval.rewards:
        if name not in eval_rewards:
            eval_rewards[name] = build_reward(name, accelerator.device)
    train_prompts = load_prompts(cfg.prompts.train)
    eval_prompts = load_prompts(cfg.prompts.eval)[: cfg.prompts.eval_max_prompts]
    eval_set = eval_items(eval_prompts, int(cfg.prompts.eval_seeds_per_prompt), int(cfg.eval.seed))
    ctx = RunContext(cfg, accelerator, model, unet, optimizer, reward_fn, PromptSampler(train_prompts, seed),
                     torch.Generator().manual_seed(seed), run_dir)
    state = algo.init_state(ctx)

    if main:
        _log_sizes(cfg, algo, accelerator, len(train_prompts), len(eval_prompts))
    metrics = {"eval": {}, "train": [], "eval_history": [], "run": {}}

    def run_eval(tag: str, step: int, lora: bool = True) -> dict:
        ctxm = model.lora_disabled(unet) if not lora else _null()
        with ctxm:
            shard = eval_set[accelerator.process_index::accelerator.num_processes]
            raw, images = evaluate(model, eval_rewards, shard, list(cfg.steps.eval),
                                   guidance_scale=float(cfg.model.guidance_scale),
                                   batch_size=int(cfg.eval.batch_size), eta=float(cfg.eval.eta), unet=unet,
                                   progress=ctx.progress, keep_images=16 if cfg.logger.save_images else 0)
        if accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            raw = merge_scores(gather_object([raw]))
        if main and images and cfg.logger.save_images:
            from .plots import save_image_grid

            save_image_grid(images, run_dir / f"samples_{tag}.png", title=f"{tag}: {cfg.algo.name} / {cfg.model.name}")
            logger.image(step, f"samples_{tag}", run_dir / f"samples_{tag}.png")
        table = summarize(raw)
        logger.eval(step, tag, table)
        return table

    start_epoch = 0
    if cfg.resume and ckpt.latest(run_dir) is not None:
        start_epoch, metrics = ckpt.load(ckpt.latest(run_dir), ctx, state)
        log.info("resumed from %s at epoch %d", ckpt.latest(run_dir), start_epoch)
    elif cfg.eval.base:
        metrics["eval"]["base"] = _base_eval(cfg, eval_set, accelerator, run_dir,
                                             lambda: run_eval("base", 0, lora=False))
        log.info("base eval (LoRA off):\n%s", format_table({"base": metrics["eval"]["base"]}))

    num_epochs = int(cfg.algo.num_epochs)
    bar = tqdm(range(start_epoch, num_epochs), desc=f"{cfg.algo.name} epochs", initial=start_epoch,
               total=num_epochs, disable=not ctx.progress)
    for epoch in bar:
        t0 = time.time()
        summary = algo.train_epoch(ctx, state, epoch)
        summary = {"epoch": epoch, **summary, **ctx.counters, "epoch_time_s": time.time() - t0,
                   "wall_time_s": time.time() - t_start}
        metrics["train"].append(summary)
        logger.train(epoch, summary)
        if main and (epoch % max(1, int(cfg.logger.log_every)) == 0 or epoch == num_epochs - 1):
            log.info("epoch %d | %s", epoch, _fmt(summary))
        bar.set_postfix(reward=f"{summary.get('reward_mean', float('nan')):.4f}")
        if cfg.eval.every and (epoch + 1) % int(cfg.eval.every) == 0 and epoch + 1 < num_epochs:
            metrics["eval_history"].append({"epoch": epoch + 1, **ctx.counters,
                                            "eval": run_eval(f"epoch{epoch + 1}", epoch + 1)})
        if cfg.checkpoint.every and (epoch + 1) % int(cfg.checkpoint.every) == 0 and main:
            ckpt.save(run_dir, epoch + 1, ctx, state, metrics, keep=int(cfg.checkpoint.keep))
        if main:
            _write_metrics(run_dir, metrics, cfg, t_start, ctx)

    metrics["eval"]["final"] = run_eval("final", num_epochs)
    ctx.counters["lora_in_sync"] = _lora_in_sync(ctx)
    if main:
        model.save_lora(run_dir / "lora")
        _write_metrics(run_dir, metrics, cfg, t_start, ctx)
        if cfg.logger.plots:
            from .plots import plot_run

            plot_run(metrics, run_dir)
        log.info("eval (%s, %s, %s):\n%s", cfg.algo.name, cfg.model.name, cfg.reward.name,
                 format_table({k: metrics["eval"][k] for k in ("base", "final") if k in metrics["eval"]}))
        log.info("run dir: %s (%.0f s)", run_dir, time.time() - t_start)
    logger.close()
    accelerator.end_training()
    return metrics


# ------------------------------------------------------------------------------------------------ helpers
def _base_eval(cfg: DictConfig, eval_set: list, accelerator, run_dir: Path, compute) -> dict:
    """The base model's eval table: from the cache when `eval.cache_base` and an entry matches, else computed (and
    stored by the main process). Evaluation draws from its own generators only, so skipping it leaves every RNG
    stream of the run where it would have been."""
    from .core import eval_cache

    # Single process only: with several, one rank finding an entry another lacks would skip the eval's collective
    # gather and hang the others.
    if not cfg.eval.cache_base or accelerator.num_processes > 1:
        return compute()
    settings = {"steps": list(cfg.steps.eval), "rewards": [cfg.reward.name, *cfg.eval.rewards],
                "reward_kwargs": OmegaConf.to_container(cfg.reward.kwargs, resolve=True), "eta": float(cfg.eval.eta),
                "guidance": float(cfg.model.guidance_scale), "batch_size": int(cfg.eval.batch_size),
                "processes": accelerator.num_processes, "device": str(accelerator.device),
                "mixed_precision": cfg.mixed_precision}
    key = eval_cache.base_eval_key(OmegaConf.to_container(cfg.model, resolve=True), eval_set, settings)
    grid = run_dir / "samples_base.png"
    cached = eval_cache.load(key, grid if accelerator.is_main_process and cfg.logger.save_images else None)
    if cached is not None:
        log.info("base eval: cached (%s)", eval_cache.cache_dir() / key)
        return cached
    table = compute()
    if accelerator.is_main_process:
        eval_cache.store(key, table, grid if grid.is_file() else None)
    return table


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _lora_in_sync(ctx: RunContext) -> bool:
    """True iff every process ends with identical LoRA weights — i.e. gradients were all-reduced (the references'
    forward through the unwrapped UNet silently breaks this under DDP; docs/architecture.md)."""
    acc = ctx.accelerator
    if acc.num_processes == 1:
        return True
    flat = torch.cat([p.detach().float().flatten() for p in ctx.model.lora_parameters()])
    everyone = acc.gather(flat.unsqueeze(0).to(acc.device))  # (processes, P)
    in_sync = bool(torch.allclose(everyone, everyone[:1].expand_as(everyone), rtol=0, atol=1e-6))
    if not in_sync:
        log.error("LoRA weights differ between processes: gradients were not synchronised")
    return in_sync


def _quiet_libraries() -> None:
    """Library progress bars (weight loading) would drown ours; their warnings stay."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def _fmt(summary: dict) -> str:
    keys = ["reward_mean", "reward_std", "loss", "approx_kl", "clipfrac", "ratio_mean", "grad_norm",
            "reward_queries", "epoch_time_s", "kl", "zero_spread_groups"]
    return " ".join(f"{k}={summary[k]:.4g}" for k in keys if k in summary and summary[k] is not None)


def _log_sizes(cfg, algo, accelerator, n_train, n_eval) -> None:
    s = cfg.algo.sample
    per_epoch = int(s.batch_size) * int(s.num_batches_per_epoch) * accelerator.num_processes
    per_epoch *= int(s.get("group_size", 1))  # GRPO: batch_size counts groups of group_size samples
    log.info("algo=%s model=%s reward=%s | %d processes, device %s | samples/epoch %d, train steps %d, "
             "backward calls per optimizer step %d | %d train prompts, %d eval prompts × %d seeds at steps %s",
             cfg.algo.name, cfg.model.name, cfg.reward.name, accelerator.num_processes, accelerator.device, per_epoch,
             cfg.steps.train, algo.gradient_accumulation_steps(cfg), n_train, n_eval, cfg.prompts.eval_seeds_per_prompt,
             list(cfg.steps.eval))


def _write_metrics(run_dir: Path, metrics: dict, cfg, t_start: float, ctx: RunContext) -> None:
    metrics["run"] = {
        "algo": cfg.algo.name, "model": cfg.model.name, "reward": cfg.reward.name, "seed": int(cfg.seed),
        "experiment": cfg.get("experiment"), "name": cfg.name,
        "wall_time_s": time.time() - t_start, **ctx.counters,
        "train_steps": int(cfg.steps.train), "eval_steps": [int(n) for n in cfg.steps.eval],
        "num_processes": ctx.accelerator.num_processes, "device": str(ctx.accelerator.device),
        "commit": _git_commit(), "versions": _versions(),
        # the training reward's scale (PickScore with or without logit_scale, ImageReward normalised or raw, ...)
        "reward_convention": getattr(ctx.reward_fn, "convention", cfg.reward.name),
    }
    tmp = run_dir / "metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=2))
    os.replace(tmp, run_dir / "metrics.json")


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict:
    import accelerate
    import diffusers
    import peft
    import transformers

    return {"align_bench": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "accelerate": accelerate.__version__}
