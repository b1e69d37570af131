"""Training loops of the tiny world: data pool, CLIP, VAE, aesthetic head, UNet (ε-prediction), LCM distillation.

Each function is deterministic given its seed and step budget (CPU, fixed thread count). Shapes: images
(N, 3, 32, 32) in [0, 1]; latents (N, 4, 8, 8) scaled by the VAE's ``scaling_factor``; ids (N, 16) long.
"""

from __future__ import annotations

import copy
import logging
import math

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import scenes
from .models import (AestheticHead, build_unet, build_vae, clip_config, clip_pixel_values, image_features,
                     noise_schedule_kwargs, tokenize)

log = logging.getLogger("align_bench.tiny")


def _bar(n: int, desc: str):
    return tqdm(range(n), desc=desc, mininterval=2.0, dynamic_ncols=True)


def _lr(step: int, total: int, base: float, warmup: int = 100) -> float:
    """Linear warm-up then cosine decay to 10 %."""
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def _set_lr(opt, lr_scale: float, bases: list[float]) -> None:
    for g, b in zip(opt.param_groups, bases):
        g["lr"] = b * lr_scale


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------

def make_pool(n: int, seed: int, pairs=scenes.SEEN_PAIRS) -> tuple[torch.Tensor, list[str], list[scenes.Scene]]:
    """Render n scenes → (images (n,3,32,32) uint8, captions, scenes). Only ``pairs`` colour pairs."""
    rng = np.random.default_rng(seed)
    sc = [scenes.sample_scene(rng, pairs=pairs) for _ in tqdm(range(n), desc="render", mininterval=2.0)]
    imgs = torch.from_numpy(np.stack([scenes.render(s) for s in sc])).permute(0, 3, 1, 2).contiguous()
    return imgs, [s.caption() for s in sc], sc


def _batch(gen: torch.Generator, n: int, bs: int) -> torch.Tensor:
    return torch.randint(0, n, (bs,), generator=gen)


def _flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip (captions are flip-invariant: triangles point up either way). x: (B, C, H, W)."""
    f = torch.rand(x.shape[0], generator=gen) < 0.5
    return torch.where(f[:, None, None, None], x.flip(-1), x)


# ---------------------------------------------------------------------------------------------------------------
# CLIP
# ---------------------------------------------------------------------------------------------------------------

def shape_group_batch(rng: np.random.Generator, n_groups: int, pairs=scenes.SEEN_PAIRS):
    """Hard-negative batch for CLIP: n_groups scenes, each rendered with all three shapes (same colours, size word
    and count, fresh geometry), so colour alone never separates a positive from its negatives.

    Returns (images (3·n_groups, 3, 32, 32) float in [0, 1], captions)."""
    caps = []
    for _ in range(n_groups):
        base = scenes.sample_scene(rng, pairs=pairs)
        caps += [scenes.caption_of(s, base.colour, base.background, base.count, base.size) for s in scenes.SHAPES]
    imgs, _ = scenes.render_captions(caps, rng)
    return imgs, caps


def train_clip(tokenizer, steps: int, bs: int = 192, lr: float = 1e-3, seed: int = 0, pairs=scenes.SEEN_PAIRS,
               init=None):
    """Contrastive CLIP training on freshly rendered shape-group batches (``shape_group_batch``). Equal captions
    within a batch are all positives (soft targets). ``init``: continue from this CLIPModel (a copy) instead of a
    fresh one (the build's refinement stage)."""
    from transformers import CLIPModel

    torch.manual_seed(seed)
    model = CLIPModel(clip_config(len(tokenizer))) if init is None else copy.deepcopy(init).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    rng = np.random.default_rng(seed)
    model.train()
    for step in (bar := _bar(steps, "clip")):
        _set_lr(opt, _lr(step, steps, 1.0), [lr])
        imgs, caps = shape_group_batch(rng, bs // 3, pairs)
        uniq = sorted(set(caps))
        cid = torch.tensor([uniq.index(c) for c in caps])
        out = model(input_ids=tokenize(tokenizer, uniq)[cid], pixel_values=clip_pixel_values(imgs))
        same = (cid[:, None] == cid[None, :]).float()
        tgt = same / same.sum(1, keepdim=True)
        loss = 0.5 * (-(tgt * out.logits_per_image.log_softmax(1)).sum(1).mean()
                      - (tgt * out.logits_per_text.log_softmax(1)).sum(1).mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % 200 == 0 or step == steps - 1:
            log.info("clip step %d loss %.4f logit_scale %.2f", step, loss.item(), model.logit_scale.exp().item())
    return model.eval()


def refine_clip(clip, tokenizer, steps: int, bs: int = 96, lr: float = 5e-4, seed: int = 6):
    """Continue contrastive training of ``clip`` (a copy) for ``steps`` more shape-group batches."""
    return train_clip(tokenizer, steps, bs, lr=lr, seed=seed, init=clip)


@torch.no_grad()
def clip_image_embeds(model, images: torch.Tensor, bs: int = 512) -> torch.Tensor:
    """(N,3,32,32) float in [0,1] → (N, 64) projected (unnormalised) image embeddings."""
    return torch.cat([image_features(model, images[i:i + bs]) for i in range(0, len(images), bs)])


# ---------------------------------------------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------------------------------------------

def train_vae(images: torch.Tensor, steps: int, bs: int = 64, lr: float = 1e-3, kl_weight: float = 1e-6,
              seed: int = 0):
    """AutoencoderKL on [−1,1] images: L1 + MSE reconstruction + tiny KL (as SD's VAE, minus the GAN/LPIPS)."""
    torch.manual_seed(seed)
    vae = build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    vae.train()
    for step in (bar := _bar(steps, "vae")):
        _set_lr(opt, _lr(step, steps, 1.0), [lr])
        x = _flip(images[_batch(gen, len(images), bs)].float() / 255, gen) * 2 - 1
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % 200 == 0 or step == steps - 1:
            log.info("vae step %d loss %.5f", step, loss.item())
    vae.eval()
    with torch.no_grad():
        x = images[-256:].float() / 255 * 2 - 1
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample
        log.info("vae reconstruction mse %.5f (images in [-1, 1], last 256 of the pool)", F.mse_loss(rec, x).item())
        # scaling factor: scaled latents of the data have unit std (SD's 0.18215 recipe)
        lat = encode_latents(vae, images[:2048], sample=True, gen=torch.Generator().manual_seed(seed + 1))
        scale = 1.0 / lat.std().item()
    vae.register_to_config(scaling_factor=scale)
    log.info("vae scaling_factor %.4f", scale)
    return vae


@torch.no_grad()
def encode_latents(vae, images_u8: torch.Tensor, sample: bool = False, gen=None, bs: int = 256,
                   return_std: bool = False):
    """uint8 (N,3,32,32) → unscaled latents (N,4,8,8): posterior mean (or a sample); optionally also the std."""
    means, stds = [], []
    for i in tqdm(range(0, len(images_u8), bs), desc="encode", mininterval=2.0, leave=False):
        post = vae.encode(images_u8[i:i + bs].float() / 255 * 2 - 1).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    m, s = torch.cat(means), torch.cat(stds)
    if sample:
        m = m + s * torch.randn(m.shape, generator=gen)
    return (m, s) if return_std else m


# ---------------------------------------------------------------------------------------------------------------
# Aesthetic head
# ---------------------------------------------------------------------------------------------------------------

def train_aesthetic(clip, images: torch.Tensor, steps: int, bs: int = 256, lr: float = 1e-3, seed: int = 0):
    """Fit the LAION-style MLP head on frozen tiny-CLIP image embeddings → analytic aesthetic score (MSE).

    Returns (head, metrics on a 10 % held-out split: mse, pearson r)."""
    torch.manual_seed(seed)
    x = images.float() / 255
    y = scenes.aesthetic_score(x)
    emb = clip_image_embeds(clip, x)
    n_val = max(1, len(x) // 10)
    head = AestheticHead(emb.shape[1])
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    head.train()
    for step in (bar := _bar(steps, "aesthetic")):
        _set_lr(opt, _lr(step, steps, 1.0, warmup=50), [lr])
        idx = n_val + _batch(gen, len(x) - n_val, bs)
        loss = F.mse_loss(head(emb[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    head.eval()
    with torch.no_grad():
        pred = head(emb[:n_val])
        mse = F.mse_loss(pred, y[:n_val]).item()
        r = torch.corrcoef(torch.stack([pred, y[:n_val]]))[0, 1].item()
    log.info("aesthetic head val mse %.4f pearson %.4f (target std %.3f)", mse, r, y.std().item())
    return head, {"val_mse": mse, "val_pearson": r, "target_mean": y.mean().item(), "target_std": y.std().item()}


# ---------------------------------------------------------------------------------------------------------------
# UNet (ε-prediction, SD noise schedule) with the text tower fine-tuned jointly
# ---------------------------------------------------------------------------------------------------------------

def _alphas_cumprod() -> torch.Tensor:
    from diffusers import DDPMScheduler

    return DDPMScheduler(**noise_schedule_kwargs()).alphas_cumprod.float()


class EMA:
    """Exponential moving average of a module's parameters (decay warms up as (1+n)/(10+n))."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay, self.n = decay, 0
        self.shadow = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        self.n += 1
        d = min(self.decay, (1 + self.n) / (10 + self.n))
        for s, p in zip(self.shadow.parameters(), module.parameters()):
            s.lerp_(p.detach(), 1 - d)


def train_unet(latent_mean: torch.Tensor, latent_std: torch.Tensor, captions: list[str], tokenizer, text_encoder,
               scaling_factor: float, steps: int, bs: int = 64, lr: float = 1e-3, text_lr: float = 2e-4,
               cfg_dropout: float = 0.1, ema_decay: float = 0.999, seed: int = 0, on_checkpoint=None,
               checkpoint_every: int = 0):
    """DDPM ε-objective on VAE latents (sampled from the posterior each step, times ``scaling_factor``).

    Captions are replaced by "" with probability ``cfg_dropout`` (classifier-free guidance). Returns the EMA
    (unet, text_encoder). ``on_checkpoint(unet, text_encoder, step)`` is called with the EMA weights every
    ``checkpoint_every`` steps (0: never)."""
    torch.manual_seed(seed)
    unet = build_unet()
    text_encoder = copy.deepcopy(text_encoder).train().requires_grad_(True)
    uniq = sorted(set(captions))
    cap_id = torch.tensor([uniq.index(c) for c in captions])
    ids_all = tokenize(tokenizer, uniq)
    ids_empty = tokenize(tokenizer, [""])
    acp = _alphas_cumprod()
    opt = torch.optim.AdamW([{"params": unet.parameters(), "lr": lr},
                             {"params": text_encoder.parameters(), "lr": text_lr}], weight_decay=1e-2)
    ema_u, ema_t = EMA(unet, ema_decay), EMA(text_encoder, ema_decay)
    gen = torch.Generator().manual_seed(seed)
    unet.train()
    for step in (bar := _bar(steps, "unet")):
        _set_lr(opt, _lr(step, steps, 1.0, warmup=200), [lr, text_lr])
        idx = _batch(gen, len(captions), bs)
        z = latent_mean[idx] + latent_std[idx] * torch.randn(latent_mean[idx].shape, generator=gen)
        z = z * scaling_factor  # (no flip here: the VAE is not flip-equivariant)
        ids = ids_all[cap_id[idx]]
        drop = torch.rand(bs, generator=gen) < cfg_dropout
        ids = torch.where(drop[:, None], ids_empty.expand(bs, -1), ids)
        t = torch.randint(0, 1000, (bs,), generator=gen)
        noise = torch.randn(z.shape, generator=gen)
        a = acp[t][:, None, None, None]
        x_t = a.sqrt() * z + (1 - a).sqrt() * noise
        emb = text_encoder(ids)[0]
        loss = F.mse_loss(unet(x_t, t, emb).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(unet.parameters()) + list(text_encoder.parameters()), 1.0)
        opt.step()
        ema_u.update(unet)
        ema_t.update(text_encoder)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % 200 == 0 or step == steps - 1:
            log.info("unet step %d loss %.5f", step, loss.item())
        if on_checkpoint is not None and checkpoint_every and (step + 1) % checkpoint_every == 0 \
                and step + 1 < steps:
            on_checkpoint(ema_u.shadow, ema_t.shadow, step + 1)
    return ema_u.shadow, ema_t.shadow


# ---------------------------------------------------------------------------------------------------------------
# LCM distillation
# ---------------------------------------------------------------------------------------------------------------

def guidance_embedding(w: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """(B,) guidance weights → (B, dim) sinusoidal embedding of 1000·w (identical to diffusers' LCM pipeline's
    ``get_guidance_scale_embedding``; the pipeline passes w = guidance_scale − 1)."""
    w = w.float() * 1000.0
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    e = w[:, None] * freq[None, :]
    return torch.cat([torch.sin(e), torch.cos(e)], dim=1)


def boundary_scalings(t: torch.Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
    """LCM's consistency parameterisation f(x,t) = c_skip·x + c_out·x̂0 (matches LCMScheduler). t: (B,)."""
    s = t.float() * timestep_scaling
    c_skip = sigma_data ** 2 / (s ** 2 + sigma_data ** 2)
    c_out = s / (s ** 2 + sigma_data ** 2).sqrt()
    return c_skip, c_out


def distill_lcm(teacher, text_encoder, latent_mean, latent_std, captions, tokenizer, scaling_factor: float,
                steps: int, bs: int = 64, lr: float = 2e-4, w_min: float = 1.0, w_max: float = 8.0,
                num_ddim_timesteps: int = 50, target_decay: float = 0.95, huber_c: float = 1e-3, seed: int = 0):
    """Latent consistency distillation (LCM recipe): w-conditioned student (time_cond_proj_dim=256) initialised
    from the teacher, one DDIM-solver step of the CFG teacher with skip k = 1000/num_ddim_timesteps, EMA target
    network, pseudo-Huber loss. Returns the target (EMA) UNet, which is what LCM ships."""
    torch.manual_seed(seed)
    student = build_unet(time_cond_proj_dim=256)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert not unexpected and all("cond_proj" in k for k in missing), (missing, unexpected)
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)  # starts as the teacher exactly
    target = copy.deepcopy(student).eval().requires_grad_(False)
    teacher = teacher.eval().requires_grad_(False)
    text_encoder = text_encoder.eval().requires_grad_(False)
    uniq = sorted(set(captions))
    cap_id = torch.tensor([uniq.index(c) for c in captions])
    with torch.no_grad():
        emb_all = text_encoder(tokenize(tokenizer, uniq))[0]
        emb_empty = text_encoder(tokenize(tokenizer, [""]))[0]
    acp = _alphas_cumprod()
    k = 1000 // num_ddim_timesteps
    solver_t = torch.arange(1, num_ddim_timesteps + 1) * k - 1  # 19, 39, …, 999 (LCMScheduler's origin steps)
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    student.train()

    def x0_from_eps(x, eps, t):
        a = acp[t][:, None, None, None]
        return (x - (1 - a).sqrt() * eps) / a.sqrt()

    for step in (bar := _bar(steps, "lcm")):
        _set_lr(opt, _lr(step, steps, 1.0, warmup=50), [lr])
        idx = _batch(gen, len(captions), bs)
        z = latent_mean[idx] + latent_std[idx] * torch.randn(latent_mean[idx].shape, generator=gen)
        z = z * scaling_factor  # (no flip here: the VAE is not flip-equivariant)
        emb = emb_all[cap_id[idx]]
        t_start = solver_t[torch.randint(0, num_ddim_timesteps, (bs,), generator=gen)]
        t_prev = (t_start - k).clamp_min(0)
        w = w_min + (w_max - w_min) * torch.rand(bs, generator=gen)
        w_emb = guidance_embedding(w)
        noise = torch.randn(z.shape, generator=gen)
        a = acp[t_start][:, None, None, None]
        x_t = a.sqrt() * z + (1 - a).sqrt() * noise
        cs0, co0 = (v[:, None, None, None] for v in boundary_scalings(t_start))
        cs1, co1 = (v[:, None, None, None] for v in boundary_scalings(t_prev))

        eps_s = student(x_t, t_start, emb, timestep_cond=w_emb).sample
        pred = cs0 * x_t + co0 * x0_from_eps(x_t, eps_s, t_start)
        with torch.no_grad():
            eps_pair = teacher(torch.cat([x_t, x_t]), torch.cat([t_start, t_start]),
                               torch.cat([emb, emb_empty.expand(bs, -1, -1)])).sample
            eps_c, eps_u = eps_pair.chunk(2)
            wb = w[:, None, None, None]
            eps_g = eps_c + wb * (eps_c - eps_u)
            x0_g = x0_from_eps(x_t, eps_c, t_start) + wb * (x0_from_eps(x_t, eps_c, t_start)
                                                             - x0_from_eps(x_t, eps_u, t_start))
            ap = acp[t_prev][:, None, None, None]
            x_prev = ap.sqrt() * x0_g + (1 - ap).sqrt() * eps_g  # deterministic DDIM step t_start → t_prev
            eps_tg = target(x_prev, t_prev, emb, timestep_cond=w_emb).sample
            tgt = cs1 * x_prev + co1 * x0_from_eps(x_prev, eps_tg, t_prev)
        loss = (((pred - tgt) ** 2 + huber_c ** 2).sqrt() - huber_c).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for pt, ps in zip(target.parameters(), student.parameters()):
                pt.lerp_(ps.detach(), 1 - target_decay)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % 100 == 0 or step == steps - 1:
            log.info("lcm step %d loss %.5f", step, loss.item())
    return target


# ---------------------------------------------------------------------------------------------------------------
# Few-step ε-prediction distillation (tiny-turbo): guided teacher couplings, then reflow in DDIM parameterisation
# ---------------------------------------------------------------------------------------------------------------

def trailing_timesteps(n: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """DDIMScheduler's trailing grid for n steps, e.g. n = 4 → [999, 749, 499, 249] (long, descending)."""
    return torch.from_numpy(np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / n)).astype(np.int64) - 1)


@torch.no_grad()
def teacher_couplings(teacher, text_encoder, tokenizer, captions: list[str], n: int, guidance: float = 7.5,
                      steps: int = 20, bs: int = 128, seed: int = 0, desc: str = "turbo teacher"):
    """Solve the CFG teacher's probability-flow ODE (DDIM η = 0, trailing, ``steps`` steps) from n noises.

    Captions are drawn uniformly from ``captions`` (with repetition). Returns (x_T (n,4,8,8), x0 (n,4,8,8) the last
    x̂0 of the solve, the drawn captions). x0 is in the UNet's scaled latent space."""
    teacher = teacher.eval()
    text_encoder = text_encoder.eval()
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, len(captions), (n,), generator=gen).tolist()
    drawn = [captions[i] for i in pick]
    uniq = sorted(set(drawn))
    emb_all = text_encoder(tokenize(tokenizer, uniq))[0]
    emb_empty = text_encoder(tokenize(tokenizer, [""]))[0]
    cap_id = torch.tensor([uniq.index(c) for c in drawn])
    acp = _alphas_cumprod()
    grid = trailing_timesteps(steps).tolist()
    x_T = torch.randn((n, 4, 8, 8), generator=gen)
    x0_all = torch.empty_like(x_T)
    for i in tqdm(range(0, n, bs), desc=desc, mininterval=2.0):
        x = x_T[i:i + bs].clone()
        b = len(x)
        emb = torch.cat([emb_all[cap_id[i:i + b]], emb_empty.expand(b, -1, -1)])
        for j, t in enumerate(grid):
            eps_c, eps_u = teacher(torch.cat([x, x]), torch.full((2 * b,), t), emb).sample.chunk(2)
            eps = eps_u + guidance * (eps_c - eps_u)
            a = acp[t]
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
            a_next = acp[grid[j + 1]] if j + 1 < len(grid) else acp[0]
            x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
        x0_all[i:i + b] = x0
    return x_T, x0_all, drawn


def reflow_eps_loss(eps_pred: torch.Tensor, x_T: torch.Tensor, x0: torch.Tensor, t: torch.Tensor,
                    alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Distillation loss of one batch. eps_pred, x_T, x0: (B,4,8,8); t: (B,) long → scalar.

    The coupled noise ε* = (x_T − √ᾱ_999·x0) / √(1 − ᾱ_999) puts x_T and x0 on one DDIM line x_t = √ᾱ_t·x0 +
    √(1 − ᾱ_t)·ε*: a student whose ε̂ is ε* on that line has x̂0 = x0 at every t, so DDIM (η = 0) from x_T returns
    x0 at any number of steps (each step lands on the same line). Weighting: truncated SNR (Salimans & Ho 2022),
    max(‖x̂0 − x0‖², ‖ε̂ − ε*‖²) = max(1, (1 − ᾱ_t)/ᾱ_t)·‖ε̂ − ε*‖², so high-noise steps are fit in image space."""
    a_T = alphas_cumprod[-1]
    eps_star = (x_T - a_T.sqrt() * x0) / (1 - a_T).sqrt()
    a = alphas_cumprod[t][:, None, None, None]
    weight = torch.clamp((1 - a) / a, min=1.0)
    return (weight * (eps_pred - eps_star) ** 2).mean()


def reflow_inputs(x_T: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The point of the coupling's DDIM line at t: (B,4,8,8), x_t = √ᾱ_t·x0 + √(1 − ᾱ_t)·ε* (x_T at t = 999)."""
    a_T = alphas_cumprod[-1]
    eps_star = (x_T - a_T.sqrt() * x0) / (1 - a_T).sqrt()
    a = alphas_cumprod[t][:, None, None, None]
    return a.sqrt() * x0 + (1 - a).sqrt() * eps_star


def sample_distill_timesteps(bs: int, gen: torch.Generator, p_first: float = 0.25, p_grid: float = 0.25):
    """(bs,) training timesteps: t = 999 (the 1-step case) with probability p_first, an entry of the 8-step
    trailing grid (which contains the 1/2/4-step grids) with p_grid, else uniform over [0, 999] (η = 1 samplers
    and other grids visit every t)."""
    u = torch.rand(bs, generator=gen)
    grid = trailing_timesteps(8)
    t = torch.randint(0, 1000, (bs,), generator=gen)
    t = torch.where(u < p_grid + p_first, grid[torch.randint(0, len(grid), (bs,), generator=gen)], t)
    return torch.where(u < p_first, torch.full_like(t, 999), t)


def distill_turbo(teacher, text_encoder, tokenizer, captions: list[str], steps: int, bs: int = 64,
                  n_couplings: int = 4096, teacher_steps: int = 20, guidance: float = 7.5, lr: float = 1e-4,
                  ema_decay: float = 0.99, seed: int = 0, couplings=None):
    """tiny-turbo: a plain ε-prediction UNet (no guidance input) for 1–8 DDIM steps without CFG.

    Guidance is baked in by distilling the CFG teacher (Meng et al. 2023, "On Distillation of Guided Diffusion
    Models", stage one), few steps come from reflow (Liu et al. 2023, "Flow Straight and Fast") in the DDIM (VP,
    ε) parameterisation: ``teacher_couplings`` pairs noises with the teacher's ODE solutions, and the student
    (initialised from the teacher) regresses the coupled noise on the straight DDIM line between them
    (``reflow_eps_loss``). The text encoder stays the teacher's (frozen). ``couplings``: a precomputed
    (x_T, x0, captions) triple (the build caches it). Returns the EMA student."""
    torch.manual_seed(seed)
    if couplings is None:
        couplings = teacher_couplings(teacher, text_encoder, tokenizer, captions, n_couplings, guidance,
                                      teacher_steps, seed=seed)
    x_T, x0, drawn = couplings
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    text_encoder = text_encoder.eval().requires_grad_(False)
    uniq = sorted(set(drawn))
    cap_id = torch.tensor([uniq.index(c) for c in drawn])
    with torch.no_grad():
        emb_all = text_encoder(tokenize(tokenizer, uniq))[0]
    acp = _alphas_cumprod()
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    ema = EMA(student, ema_decay)
    gen = torch.Generator().manual_seed(seed + 1)
    for step in (bar := _bar(steps, "turbo")):
        _set_lr(opt, _lr(step, steps, 1.0, warmup=50), [lr])
        idx = _batch(gen, len(x_T), bs)
        t = sample_distill_timesteps(bs, gen)
        x_t = reflow_inputs(x_T[idx], x0[idx], t, acp)
        loss = reflow_eps_loss(student(x_t, t, emb_all[cap_id[idx]]).sample, x_T[idx], x0[idx], t, acp)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        ema.update(student)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % 100 == 0 or step == steps - 1:
            log.info("turbo step %d loss %.5f", step, loss.item())
    return ema.shadow
