"""AlignProp — reward backpropagation through the sampler: Prabhudesai, Goyal, Pathak, Fragkiadaki, "Aligning
Text-to-Image Diffusion Models with Reward Backpropagation", arXiv:2310.03739 (2023); reference code
mihirp1998/AlignProp. What it optimises, its equations and every difference from the reference:
docs/algos/alignprop.md.

No log-probs, advantages or stored rollouts: each micro-batch is sampled *with gradients*
(stochastic DDIM, η = 1, CFG), decoded by the VAE with gradients, scored by a differentiable reward, and the
loss (e.g. |r − 10| for the aesthetic score, 1 − score for HPS, ×0.01) is backpropagated into the LoRA weights
through the decoder and the last K denoising steps only. Steps before the truncation point b = N − K run under
no_grad and their output is detached; every grad-enabled UNet call is gradient-checkpointed, so with K = 1 the
activation memory is one UNet call + the decoder + the reward model, whatever N.

Units: one AlignProp "epoch" is ONE optimizer step = `sample.num_batches_per_epoch` micro-batches of
`sample.batch_size` images, each its own backward call (accelerate accumulation = num_batches_per_epoch).
Reward queries per epoch = batch_size × num_batches_per_epoch × processes (counted in ctx.counters).

Truncation point (drawn once per micro-batch, from the run's checkpointed generator), written in K = N − b:
  gaussian  K = ⌈x⌉, x ~ N(k_mean, k_std), redrawn until 1 ≤ K ≤ N − 1. The reference draws b = int(N(42, 5))
            at N = 50 (redrawn until 1 ≤ b ≤ N − 1); since 50 − trunc(g) = ⌈50 − g⌉ for g > 0, that is exactly
            k_mean = 8, k_std = 5 here, and the K-form stays meaningful at other step counts.
  uniform   K uniform on {k_min … k_max} (k_max null: N − 1). Reference: b ~ randint[0, 50) ⇒ K on {1 … 49}.
  fixed     K = k (1 ≤ k ≤ N; k = N is full backprop). The reference's 'fixed' b = 49 at N = 50 is k = 1.

Reference fidelity switches: `reference_double_denormalize` reproduces the reference's second x/2 + 0.5 on images
already in [0, 1] (the reward then sees [0.5, 1]); off by default (the reward sees the image). The gradient-sync
bug of the reference (sampling through the unwrapped UNet) is not reproduced: the loss forward goes through the
accelerate-prepared UNet.

Memory guard: before training, the activation memory of one micro-batch is estimated from saved-tensor probes
at batch 1 (one UNet call with and without checkpointing, decode + reward) and compared with what is available
(CUDA free memory, or the CPU's available RAM / cgroup limit); a run that cannot fit is refused with one line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from ..config import AlgoSchema, OptimSchema, SampleSchema
from ..core.rollout import rollout

REQUIRES_DIFFERENTIABLE_REWARD = True  # runner.validate refuses a non-differentiable reward before loading


@dataclass
class TrainSchema(OptimSchema):
    gradient_checkpointing: bool
    checkpoint_decoder: bool
    memory_check: bool
    memory_limit_gb: Optional[float]


@dataclass
class BackpropSchema:
    strategy: str
    k_mean: float
    k_std: float
    k_min: int
    k_max: Optional[int]
    k: int


@dataclass
class LossSchema:
    form: str
    target: Optional[float]
    grad_scale: float
    coeff: float


@dataclass
class Config(AlgoSchema):
    sample: SampleSchema
    train: TrainSchema
    backprop: BackpropSchema
    loss: LossSchema
    reference_double_denormalize: bool


LOSS_FORMS = ("target_l1", "negative", "one_minus")
STRATEGIES = ("gaussian", "uniform", "fixed")


# ------------------------------------------------------------------------------------------- pure functions
def alignprop_loss(rewards: torch.Tensor, form: str, target: float | None = 10.0, grad_scale: float = 1.0,
                   coeff: float = 0.01) -> torch.Tensor:
    """Scalar loss from (B,) rewards: coeff · mean_b(grad_scale · ℓ(r_b)).

    ℓ: target_l1 |r − target| (reference aesthetic: L1 to 10, i.e. maximise while r < 10), negative −r (the
    reference's aesthetic with target None), one_minus 1 − r (reference HPS: 1 − cosine score).
    grad_scale is 1 in every reference script (the reference applies it to the aesthetic forms only)."""
    if form == "target_l1":
        if target is None:
            raise ValueError("loss.form=target_l1 needs loss.target (use form=negative to maximise r)")
        per_image = (rewards - target).abs()
    elif form == "negative":
        per_image = -rewards
    elif form == "one_minus":
        per_image = 1.0 - rewards
    else:
        raise ValueError(f"unknown loss form {form!r}; expected one of {LOSS_FORMS}")
    return coeff * (grad_scale * per_image).mean()


def reward_input(images: torch.Tensor, reference_double_denormalize: bool = False) -> torch.Tensor:
    """What the reward sees. images (B,3,H,W) in [0,1] (already de-normalised by the decode).

    reference_double_denormalize: apply x/2 + 0.5 once more, as the reference does (pixels end in [0.5, 1])."""
    if reference_double_denormalize:
        return (images / 2 + 0.5).clamp(0, 1)
    return images


def gaussian_acceptance(num_steps: int, k_mean: float, k_std: float) -> float:
    """P(1 ≤ ⌈x⌉ ≤ N − 1) for x ~ N(k_mean, k_std) = P(0 < x ≤ N − 1): the redraw loop's acceptance rate."""
    cdf = lambda v: 0.5 * (1 + math.erf((v - k_mean) / (k_std * math.sqrt(2))))  # noqa: E731
    return cdf(num_steps - 1) - cdf(0)


def draw_backprop_steps(num_steps: int, strategy: str, generator: torch.Generator, *, k_mean: float = 8.0,
                        k_std: float = 5.0, k_min: int = 1, k_max: int | None = None, k: int = 1,
                        max_tries: int = 100_000) -> int:
    """K, the number of final denoising steps that receive gradients (truncation point b = N − K)."""
    if strategy == "fixed":
        if not 1 <= k <= num_steps:
            raise ValueError(f"backprop.k must be in [1, {num_steps}], got {k}")
        return int(k)
    hi = num_steps - 1 if k_max is None else min(int(k_max), num_steps - 1)
    for _ in range(max_tries):
        if strategy == "gaussian":
            x = k_mean + k_std * float(torch.randn((), generator=generator))
            K = math.ceil(x)
            if 1 <= K <= num_steps - 1:
                return K
        elif strategy == "uniform":
            K = int(torch.randint(int(k_min), hi + 1, (), generator=generator))
            if 1 <= K <= num_steps - 1:
                return K
        else:
            raise ValueError(f"unknown backprop.strategy {strategy!r}; expected one of {STRATEGIES}")
    raise RuntimeError(f"could not draw a truncation point in [1, {num_steps - 1}] after {max_tries} tries")


def max_backprop_steps(num_steps: int, bp) -> int:
    """The largest K the strategy can draw (what the memory guard must plan for)."""
    if bp.strategy == "fixed":
        return int(bp.k)
    hi = num_steps - 1
    return hi if bp.strategy == "gaussian" or bp.k_max is None else min(int(bp.k_max), hi)


# ---- memory estimate
def saved_tensor_bytes(fn: Callable[[], object], exclude: set[int] = frozenset()) -> tuple[int, object]:
    """Run fn() and count the bytes autograd saves for backward (unique storages, excluding `exclude` data
    pointers: the weights, which are resident anyway). Returns (bytes, fn's result). Saves made inside a
    checkpointed region are not kept (the checkpoint's own hooks replace them), as in a real run."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        try:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in exclude:
                seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. some wrapper subclasses)
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def estimate_activation_bytes(batch: int, K: int, checkpointing: bool, per_sample: dict[str, int]) -> int:
    """Peak activation memory of one micro-batch of `batch` images backpropagated through K steps.

    per_sample: bytes saved per image by one UNet call + DDIM step without checkpointing ("unet"), with
    checkpointing ("unet_ckpt": the step's small tensors and the call's inputs), and by decode + reward ("tail").
    Without checkpointing all K calls keep their activations; with it only the inputs are kept, and backward
    recomputes one call at a time (one full call's activations on top). Independent of N either way."""
    per_step = per_sample["unet_ckpt"] if checkpointing else per_sample["unet"]
    recompute = per_sample["unet"] if checkpointing else 0
    return int(batch * (per_sample["tail"] + K * per_step + recompute))


def available_memory_bytes(device: torch.device) -> tuple[int, str]:
    """(bytes, where) that new activations can still use: CUDA free + cached-but-unused memory, or on CPU the
    kernel's MemAvailable, capped by the cgroup limit when one is set."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached), f"free CUDA memory on {device}"
    avail = None
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:
        import psutil  # not on Linux: fall back to psutil

        avail = int(psutil.virtual_memory().available)
    try:  # containers: the cgroup v2 limit may be far below the host's free RAM
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        if limit != "max":
            used = int(open("/sys/fs/cgroup/memory.current").read().strip())
            avail = min(avail, int(limit) - used)
    except (OSError, ValueError):
        pass
    return int(avail), "available CPU RAM"


def probe_per_sample_bytes(model, reward_fn, prompt: str, *, guidance_scale: float, eta: float,
                           unet=None, double_denormalize: bool = False, checkpoint_decoder: bool = False,
                           generator: torch.Generator | None = None) -> dict[str, int]:
    """Measure the per-image saved-activation bytes used by `estimate_activation_bytes`, at batch 1 on the
    real model (cheap: two UNet calls, one decode, one reward call; nothing is backpropagated)."""
    weights = {p.untyped_storage().data_ptr() for m in (model.unet, model.vae, reward_fn)
               for p in list(m.parameters()) + list(m.buffers())}
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    out = {}
    for name, ckpt in (("unet", False), ("unet_ckpt", True)):
        # One grad-enabled step (a 1-step rollout: activation sizes do not depend on t); no decode here.
        nbytes, traj = saved_tensor_bytes(lambda ckpt=ckpt: rollout(
            model, [prompt], num_steps=1, eta=eta, guidance_scale=guidance_scale, generator=gen, unet=unet,
            grad_from_step=0, gradient_checkpointing=ckpt, decode=False), weights)
        inputs = traj.final_latents.numel() * traj.final_latents.element_size() * 2  # x_t kept by the checkpoint
        out[name] = nbytes + (inputs if ckpt else 0)
        del traj
    latents = model.initial_noise(1, gen).requires_grad_(True)  # stands in for a grad-carrying final latent

    def tail():
        images = (checkpoint(model.decode, latents, use_reentrant=False)
                  if checkpoint_decoder else model.decode(latents))
        return reward_fn(reward_input(images, double_denormalize), [prompt])

    out["tail"], _ = saved_tensor_bytes(tail, weights)
    if checkpoint_decoder:  # recomputing the decode in backward needs its full activations once
        out["tail"] += saved_tensor_bytes(lambda: model.decode(latents), weights)[0]
    return out


def check_memory(ctx) -> dict:
    """Refuse, in one line, a configuration whose estimated activation memory exceeds what is available."""
    cfg, algo = ctx.cfg, ctx.cfg.algo
    N, B = int(cfg.steps.train), int(algo.sample.batch_size)
    K = max_backprop_steps(N, algo.backprop)
    ckpt = bool(algo.train.gradient_checkpointing)
    # Probe through the bare UNet (same weights): a forward through the DDP wrapper without a backward would
    # leave its reducer expecting one.
    per_sample = probe_per_sample_bytes(
        ctx.model, ctx.reward_fn, ctx.prompt_sampler.prompts[0], guidance_scale=ctx.guidance_scale,
        eta=float(algo.sample.eta),
        double_denormalize=bool(algo.reference_double_denormalize),
        checkpoint_decoder=bool(algo.train.checkpoint_decoder))
    need = estimate_activation_bytes(B, K, ckpt, per_sample)
    if algo.train.memory_limit_gb is not None:
        have, where = int(float(algo.train.memory_limit_gb) * 2**30), "algo.train.memory_limit_gb"
    else:
        have, where = available_memory_bytes(ctx.model.device)
    info = {"K_max": K, "estimated_gb": need / 2**30, "available_gb": have / 2**30, **{
        f"{k}_mb_per_image": v / 2**20 for k, v in per_sample.items()}}
    if algo.train.memory_check and need > 0.9 * have:
        one_k = estimate_activation_bytes(B, 1, True, per_sample)
        raise MemoryError(
            f"alignprop: backprop through up to K={K} of {N} steps at batch {B} "
            f"{'with' if ckpt else 'without'} gradient checkpointing needs ≈{need / 2**30:.2f} GiB of activations "
            f"(≈{per_sample['unet' if not ckpt else 'unet_ckpt'] / 2**20:.1f} MiB per image per step), but only "
            f"{have / 2**30:.2f} GiB is available ({where}); refusing instead of running out of memory — use "
            f"algo.train.gradient_checkpointing=true, fewer steps (algo.backprop.strategy=fixed algo.backprop.k=1: "
            f"≈{one_k / 2**30:.2f} GiB) or a smaller algo.sample.batch_size")
    return info


# ------------------------------------------------------------------------------------------- algorithm API
def validate(cfg) -> None:
    a, N = cfg.algo, int(cfg.steps.train)
    bp, loss = a.backprop, a.loss
    if a.sample.eta < 0:
        raise ValueError(f"algo.sample.eta must be ≥ 0, got {a.sample.eta}")
    if loss.form not in LOSS_FORMS:
        raise ValueError(f"algo.loss.form must be one of {LOSS_FORMS}, got {loss.form!r}")
    if loss.form == "target_l1" and loss.target is None:
        raise ValueError("algo.loss.form=target_l1 needs algo.loss.target (or use algo.loss.form=negative)")
    if bp.strategy not in STRATEGIES:
        raise ValueError(f"algo.backprop.strategy must be one of {STRATEGIES}, got {bp.strategy!r}")
    if bp.strategy == "fixed" and not 1 <= int(bp.k) <= N:
        raise ValueError(f"algo.backprop.k must be in [1, steps.train={N}], got {bp.k}")
    if bp.strategy in ("gaussian", "uniform") and N < 2:
        raise ValueError(f"algo.backprop.strategy={bp.strategy} draws K in [1, N−1]: needs steps.train ≥ 2 "
                         f"(use strategy=fixed k=1)")
    if bp.strategy == "gaussian" and (bp.k_std <= 0 or gaussian_acceptance(N, bp.k_mean, bp.k_std) < 1e-3):
        raise ValueError(f"algo.backprop: K ~ ⌈N({bp.k_mean}, {bp.k_std})⌉ almost never lands in [1, {N - 1}] "
                         f"(steps.train={N}); adjust k_mean/k_std")
    if bp.strategy == "uniform" and not 1 <= int(bp.k_min) <= (N - 1 if bp.k_max is None else min(bp.k_max, N - 1)):
        raise ValueError(f"algo.backprop: uniform K range [{bp.k_min}, {bp.k_max}] has no value in [1, {N - 1}]")
    if int(a.sample.batch_size) < 1 or int(a.sample.num_batches_per_epoch) < 1:
        raise ValueError("algo.sample.batch_size and algo.sample.num_batches_per_epoch must be ≥ 1")


def gradient_accumulation_steps(cfg) -> int:
    # One epoch = one optimizer step = num_batches_per_epoch backward calls (one per micro-batch).
    return int(cfg.algo.sample.num_batches_per_epoch)


def init_state(ctx) -> dict:
    info = check_memory(ctx)
    if ctx.accelerator.is_main_process:
        import logging

        logging.getLogger("align_bench").info(
            "alignprop memory plan: " + " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                                 for k, v in info.items()))
    return {}


def train_epoch(ctx, state: dict, epoch: int) -> dict:
    """One optimizer step: `num_batches_per_epoch` micro-batches, each sampled with grad and backpropagated."""
    cfg, acc = ctx.cfg.algo, ctx.accelerator
    N, B = int(ctx.cfg.steps.train), int(cfg.sample.batch_size)
    bp = cfg.backprop
    ctx.unet.train()
    logs: dict[str, list[float]] = {"loss": [], "backprop_steps": [], "grad_norm": []}
    all_rewards = []
    for _ in tqdm(range(int(cfg.sample.num_batches_per_epoch)), desc="micro-batches", leave=False,
                  disable=not ctx.progress):
        prompts = ctx.prompt_sampler.sample(B)
        K = draw_backprop_steps(N, bp.strategy, ctx.generator, k_mean=float(bp.k_mean), k_std=float(bp.k_std),
                                k_min=int(bp.k_min), k_max=bp.k_max, k=int(bp.k))
        with acc.accumulate(ctx.unet):
            traj = ctx.rollout(prompts, grad_from_step=N - K,
                               gradient_checkpointing=bool(cfg.train.gradient_checkpointing),
                               checkpoint_decode=bool(cfg.train.checkpoint_decoder))
            rewards = ctx.score(reward_input(traj.images, bool(cfg.reference_double_denormalize)), prompts)
            loss = alignprop_loss(rewards, cfg.loss.form, cfg.loss.target, float(cfg.loss.grad_scale),
                                  float(cfg.loss.coeff))
            grad_norm = ctx.backward(loss)
        logs["loss"].append(loss.item())
        logs["backprop_steps"].append(K)
        if grad_norm is not None:
            logs["grad_norm"].append(grad_norm)
        all_rewards.append(rewards.detach().float().cpu())
        del traj, rewards, loss
    _, gathered = ctx.gather([""] * (B * len(all_rewards)), torch.cat(all_rewards))
    summary = {k: float(np.mean(v)) for k, v in logs.items() if v}
    summary.update(reward_mean=float(gathered.mean()), reward_std=float(gathered.std(unbiased=False)))
    return summary
