"""Quality measurement of the tiny world (the issue's bars) and model cards.

    python -m align_bench.tiny.evaluate --root assets/tiny-world [--n 4] [--cards]

Measures, with the stock diffusers pipelines loaded offline from ``--root``:
  * tiny-CLIP on rendered ground truth: zero-shot over all 168 ``a {c1} {shape} on a {c2} background`` captions
    (shape accuracy, colour accuracy = both colours right) and shape-only accuracy given the colours.
  * ``tiny`` (DDIM, trailing) at 20/8/4/2/1 steps, CFG ``TINY_GUIDANCE``, on ``tiny_eval_seen`` (seen colour
    pairs) and ``tiny_eval`` (held-out pairs), n samples per prompt: pixel colour accuracy and tiny-CLIP zero-shot
    shape accuracy (``tiny_colour_accuracy`` / ``tiny_shape_accuracy`` rewards).
  * ``tiny-lcm`` (LCMScheduler) at 1/2/4/8 steps, same prompts and metrics.
  * ``tiny-turbo`` (DDIM, trailing, no CFG) at 1/2/4/8 steps η = 0, and as SDPO samples (η = 1) at 8/20/50 steps.
  * headroom: mean ``tiny_aesthetic`` / analytic aesthetic of base samples vs rendered scenes (mean, top 5 %).
  * timings: ms per UNet forward on 64 latents, seconds to sample 64 images at 8 steps with CFG.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from . import scenes
from .models import tokenize

TINY_GUIDANCE = 7.5
LCM_GUIDANCE = 7.5  # the LCM pipeline embeds w = guidance_scale − 1 (trained on w ∈ [1, 8])
TINY_STEPS = (20, 8, 4, 2, 1)
LCM_STEPS = (1, 2, 4, 8)
TURBO_GUIDANCE = 1.0  # guidance is baked into tiny-turbo's UNet: no CFG at sampling (as SD-Turbo)
TURBO_STEPS = (1, 2, 4, 8)
TURBO_ETA1_STEPS = (8, 20, 50)  # SDPO's training sampler: stochastic DDIM, η = 1


@torch.no_grad()
def clip_ground_truth(root: Path, n_per_caption: int = 4, seed: int = 123) -> dict:
    """tiny-CLIP zero-shot accuracy on rendered ground truth of the single-shape family (all 56 pairs)."""
    from .models import image_features, load_clip, text_features

    clip, tok = load_clip(root / "clip")
    caps = scenes.all_single_captions()
    parsed = [scenes.parse_caption(c) for c in caps]
    txt = torch.nn.functional.normalize(text_features(clip, tokenize(tok, caps)), dim=-1)  # (168, D)
    truth = [i for i in range(len(caps)) for _ in range(n_per_caption)]
    imgs, _ = scenes.render_captions([caps[i] for i in truth], np.random.default_rng(seed))
    img = torch.nn.functional.normalize(image_features(clip, imgs), dim=-1)
    sim = img @ txt.T  # (N, 168)
    pick = sim.argmax(1).tolist()
    shape = np.mean([parsed[p]["shape"] == parsed[t]["shape"] for p, t in zip(pick, truth)])
    colour = np.mean([(parsed[p]["colour"], parsed[p]["background"]) == (parsed[t]["colour"], parsed[t]["background"])
                      for p, t in zip(pick, truth)])
    # shape given the colours (what tiny_shape_accuracy does on samples)
    same_col = torch.tensor([[(parsed[j]["colour"], parsed[j]["background"]) == (parsed[t]["colour"],
                              parsed[t]["background"]) for j in range(len(caps))] for t in truth])
    pick3 = sim.masked_fill(~same_col, -1e9).argmax(1).tolist()
    shape3 = np.mean([parsed[p]["shape"] == parsed[t]["shape"] for p, t in zip(pick3, truth)])
    return {"n": len(truth), "shape_acc_zero_shot_168": float(shape), "colour_acc_zero_shot_168": float(colour),
            "shape_acc_given_colours": float(shape3)}


def _rewards(root: Path) -> dict:
    from ..rewards.tiny import TinyAesthetic, TinyColourAccuracy, TinyShapeAccuracy, TinyTrueAesthetic

    return {"colour_acc": TinyColourAccuracy(), "shape_acc": TinyShapeAccuracy(clip_dir=str(root / "clip")),
            "tiny_aesthetic": TinyAesthetic(clip_dir=str(root / "clip"), head_dir=str(root / "aesthetic")),
            "true_aesthetic": TinyTrueAesthetic()}


@torch.no_grad()
def sample(pipe, prompts: list[str], steps: int, guidance: float, seed: int = 0, bs: int = 96,
           eta: float = 0.0) -> torch.Tensor:
    """Stock-pipeline samples → (N, 3, 32, 32) float in [0, 1]. ``eta``: DDIM's η (only passed when non-zero, so
    pipelines without the argument work)."""
    out = []
    extra = {"eta": eta} if eta else {}
    for i in range(0, len(prompts), bs):
        g = torch.Generator().manual_seed(seed + i)
        out.append(pipe(prompts[i:i + bs], num_inference_steps=steps, guidance_scale=guidance, generator=g,
                        output_type="pt", **extra).images)
    return torch.cat(out).float().clamp(0, 1)


def _score(rewards: dict, images: torch.Tensor, prompts: list[str]) -> dict:
    with torch.no_grad():
        return {k: float(r(images, prompts).mean()) for k, r in rewards.items()}


def evaluate_pipeline(root: Path, name: str, steps_list, guidance: float, n_per_prompt: int, rewards: dict,
                      keep: dict | None = None, max_prompts: int | None = None, eta1_steps=()) -> dict:
    from diffusers import DiffusionPipeline

    from ..prompts import load_prompts

    pipe = DiffusionPipeline.from_pretrained(str(root / name))
    pipe.set_progress_bar_config(disable=True)
    n_prompts = min(24, max_prompts or 24)
    res = {"guidance_scale": guidance, "n_per_split": n_prompts * n_per_prompt}
    for split, pset in (("seen", "tiny_eval_seen"), ("heldout", "tiny_eval")):
        prompts = [p for p in load_prompts(pset)[:n_prompts] for _ in range(n_per_prompt)]
        for s in steps_list:
            imgs = sample(pipe, prompts, s, guidance)
            res[f"{split}_{s}steps"] = _score(rewards, imgs, prompts)
            if keep is not None and split == "seen" and s == steps_list[0]:
                keep["images"], keep["prompts"] = imgs, prompts
        for s in eta1_steps:  # keys ``{split}_{s}steps_eta1``
            res[f"{split}_{s}steps_eta1"] = _score(rewards, sample(pipe, prompts, s, guidance, eta=1.0), prompts)
    return res


@torch.no_grad()
def headroom(rewards: dict, base_images: torch.Tensor, n: int = 2000, seed: int = 7) -> dict:
    """Mean learned/analytic aesthetic of base samples vs rendered scenes of the whole grammar."""
    imgs, _ = scenes.render_batch(np.random.default_rng(seed), n)
    learned = rewards["tiny_aesthetic"](imgs, [""] * n)
    true = rewards["true_aesthetic"](imgs, [""] * n)
    top = learned.topk(max(1, n // 20)).values
    base_l = rewards["tiny_aesthetic"](base_images, [""] * len(base_images))
    base_t = rewards["true_aesthetic"](base_images, [""] * len(base_images))
    return {"base_samples_tiny_aesthetic_mean": float(base_l.mean()),
            "base_samples_true_aesthetic_mean": float(base_t.mean()),
            "rendered_tiny_aesthetic_mean": float(learned.mean()),
            "rendered_tiny_aesthetic_top5pct_mean": float(top.mean()),
            "rendered_tiny_aesthetic_max": float(learned.max()),
            "rendered_true_aesthetic_mean": float(true.mean()),
            "rendered_true_aesthetic_max": float(true.max())}


@torch.no_grad()
def timings(root: Path, repeats: int = 5, n_images: int = 64) -> dict:
    """ms per UNet forward (batch 64 latents 4×8×8, 16 text tokens); s to sample 64 images at 8 steps with CFG."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(root / "tiny"))
    pipe.set_progress_bar_config(disable=True)
    unet = pipe.unet
    x = torch.randn(64, 4, 8, 8)
    c = torch.randn(64, 16, unet.config.cross_attention_dim)
    t = torch.full((64,), 500)
    for _ in range(2):
        unet(x, t, c)
    t0 = time.perf_counter()
    for _ in range(repeats):
        unet(x, t, c)
    fwd = (time.perf_counter() - t0) / repeats * 1000
    prompts = ["a red circle on a blue background"] * n_images
    pipe(prompts[:8], num_inference_steps=2, output_type="pt")
    t0 = time.perf_counter()
    pipe(prompts, num_inference_steps=8, guidance_scale=TINY_GUIDANCE, output_type="pt")
    samp = time.perf_counter() - t0
    return {"unet_forward_ms_batch64": round(fwd, 1), f"sample_{n_images}_images_8_steps_cfg_s": round(samp, 2),
            "threads": torch.get_num_threads(),
            "unet_params": sum(p.numel() for p in unet.parameters()),
            "vae_params": sum(p.numel() for p in pipe.vae.parameters()),
            "text_encoder_params": sum(p.numel() for p in pipe.text_encoder.parameters())}


def evaluate_turbo(root: Path, n_per_prompt: int, rewards: dict | None = None, quick: bool = False) -> dict:
    """``tiny-turbo``'s section of metrics.json: η = 0 at ``TURBO_STEPS``, η = 1 at ``TURBO_ETA1_STEPS``."""
    rewards = _rewards(root) if rewards is None else rewards
    if quick:
        return evaluate_pipeline(root, "tiny-turbo", (1,), TURBO_GUIDANCE, n_per_prompt, rewards, None, 4, (2,))
    return evaluate_pipeline(root, "tiny-turbo", TURBO_STEPS, TURBO_GUIDANCE, n_per_prompt, rewards,
                             eta1_steps=TURBO_ETA1_STEPS)


def evaluate_all(root: str | Path, n_per_prompt: int = 4, lcm: bool = True, quick: bool = False) -> dict:
    """Every measurement above → nested dict. ``quick``: one step count each, small samples (smoke builds)."""
    root = Path(root)
    rewards = _rewards(root)
    m: dict = {"clip_ground_truth": clip_ground_truth(root, n_per_caption=1 if quick else max(4, n_per_prompt))}
    keep: dict = {}
    tiny_steps, lcm_steps = ((2,), (1,)) if quick else (TINY_STEPS, LCM_STEPS)
    mp = 4 if quick else None
    m["tiny"] = evaluate_pipeline(root, "tiny", tiny_steps, TINY_GUIDANCE, n_per_prompt, rewards, keep, mp)
    m["headroom"] = headroom(rewards, keep["images"], n=64 if quick else 2000)
    if lcm and (root / "tiny-lcm").is_dir():
        m["tiny_lcm"] = evaluate_pipeline(root, "tiny-lcm", lcm_steps, LCM_GUIDANCE, n_per_prompt, rewards, None, mp)
    if (root / "tiny-turbo").is_dir():
        m["tiny_turbo"] = evaluate_turbo(root, n_per_prompt, rewards, quick)
    m["timings"] = timings(root, repeats=1, n_images=8) if quick else timings(root)
    head_cfg = root / "aesthetic" / "config.json"
    if head_cfg.is_file():
        m["aesthetic_head"] = json.loads(head_cfg.read_text()).get("metrics", {})
    return m


# ---------------------------------------------------------------------------------------------------------------
# Model cards
# ---------------------------------------------------------------------------------------------------------------

def _table(res: dict, steps_list, suffix: str = "") -> str:
    rows = ["| steps | seen colour acc | held-out colour acc | seen shape acc | held-out shape acc |",
            "|---|---|---|---|---|"]
    for s in steps_list:
        a, b = res.get(f"seen_{s}steps{suffix}"), res.get(f"heldout_{s}steps{suffix}")
        if a and b:
            rows.append(f"| {s} | {a['colour_acc']:.1%} | {b['colour_acc']:.1%} | {a['shape_acc']:.1%} | "
                        f"{b['shape_acc']:.1%} |")
    return "\n".join(rows)


# The quality bars: (label, metrics section, key, metric, threshold).
QUALITY_BARS = (
    ("tiny, 20 DDIM steps, colour accuracy, seen pairs", "tiny", "seen_20steps", "colour_acc", 0.90),
    ("tiny, 20 DDIM steps, colour accuracy, held-out pairs", "tiny", "heldout_20steps", "colour_acc", 0.85),
    ("tiny, 20 DDIM steps, shape accuracy, seen pairs", "tiny", "seen_20steps", "shape_acc", 0.80),
    ("tiny, 20 DDIM steps, shape accuracy, held-out pairs", "tiny", "heldout_20steps", "shape_acc", 0.80),
    ("tiny-lcm, 2 steps, colour accuracy, seen pairs", "tiny_lcm", "seen_2steps", "colour_acc", 0.75),
    ("tiny-lcm, 2 steps, colour accuracy, held-out pairs", "tiny_lcm", "heldout_2steps", "colour_acc", 0.75),
    ("tiny-lcm, 4 steps, colour accuracy, seen pairs", "tiny_lcm", "seen_4steps", "colour_acc", 0.75),
    ("tiny-lcm, 4 steps, colour accuracy, held-out pairs", "tiny_lcm", "heldout_4steps", "colour_acc", 0.75),
    ("tiny-turbo, 1 DDIM step, colour accuracy, seen pairs", "tiny_turbo", "seen_1steps", "colour_acc", 0.80),
    ("tiny-turbo, 2 DDIM steps, colour accuracy, seen pairs", "tiny_turbo", "seen_2steps", "colour_acc", 0.90),
    ("tiny-turbo, 4 DDIM steps, colour accuracy, seen pairs", "tiny_turbo", "seen_4steps", "colour_acc", 0.90),
    ("tiny-turbo, 8 DDIM steps, colour accuracy, seen pairs", "tiny_turbo", "seen_8steps", "colour_acc", 0.90),
    ("tiny-turbo, 1 DDIM step, colour accuracy, held-out pairs", "tiny_turbo", "heldout_1steps", "colour_acc", 0.70),
    ("tiny-CLIP on rendered ground truth, shape accuracy", "clip_ground_truth", None, "shape_acc_zero_shot_168", 0.90),
    ("tiny-CLIP on rendered ground truth, colour accuracy", "clip_ground_truth", None, "colour_acc_zero_shot_168",
     0.95),
)


def quality_bars(m: dict, section: str | None = None) -> list[tuple[str, float, float, bool]]:
    """(label, measured, bar, met) for every bar measured in ``m`` (optionally only one metrics section)."""
    out = []
    for label, sec, key, metric, bar in QUALITY_BARS:
        res = m.get(sec, {})
        res = res.get(key, {}) if key else res
        if (section is None or sec == section) and metric in res:
            out.append((label, float(res[metric]), bar, float(res[metric]) >= bar))
    return out


def _bars_md(m: dict, section: str) -> str:
    rows = [f"- {'met' if ok else '**NOT met**'}: {label} {v:.1%} (bar {bar:.0%})"
            for label, v, bar, ok in quality_bars(m, section)]
    return "## Quality bars (align_bench issues 3 and 12)\n" + "\n".join(rows) if rows else ""


def write_model_cards(root: str | Path, m: dict, budget: dict, command: str, only=None) -> None:
    """README.md of every artifact directory in ``root`` (``only``: just these names)."""
    root = Path(root)
    eval_cmd = f"python -m align_bench.tiny.evaluate --root {root} --n {budget.get('eval_n', 4)}"
    t = m.get("timings", {})
    g = m.get("clip_ground_truth", {})
    h = m.get("headroom", {})
    secs = m.get("build_seconds", {})
    common = (f"Rebuilt by `{command}` (fixed seeds; stage seconds {json.dumps(secs)}; budget "
              f"{json.dumps(budget)}).\nMeasured by `{eval_cmd}` (numbers also in `../metrics.json`).\n"
              f"Part of align_bench's tiny world: see `src/align_bench/tiny/scenes.py` for the data, caption "
              f"grammar and analytic aesthetic score.\n")
    cards = {
        "clip": f"""# tiny CLIP (align_bench tiny world)

`transformers.CLIPModel` (text: 3 layers, width 128, 16 tokens; vision: ViT 32×32 px, patch 4, 3 layers,
width 128; projection 64) trained contrastively (soft targets: equal captions are all positives) on rendered
scenes of the 48 seen colour pairs. Tokenizer: word-level `PreTrainedTokenizerFast` over the grammar
(`model_max_length` 16, `""` → `<bos> <eos>`). Images in: [0,1] → `x*2−1`, 32×32 (no CLIP mean/std).

Its text tower is the initialisation of the `tiny` UNet's text encoder (fine-tuned jointly with the UNet there).

## Metrics (rendered ground truth, all 56 colour pairs, n = {g.get('n')})
- zero-shot over the 168 `a {{c1}} {{shape}} on a {{c2}} background` captions: shape accuracy
  {g.get('shape_acc_zero_shot_168', float('nan')):.1%}, colour accuracy (both colours) {g.get('colour_acc_zero_shot_168', float('nan')):.1%}
- shape accuracy given the colours (3-way, as `tiny_shape_accuracy`): {g.get('shape_acc_given_colours', float('nan')):.1%}

{_bars_md(m, 'clip_ground_truth')}

{common}""",
        "aesthetic": f"""# tiny aesthetic head (align_bench tiny world)

LAION aesthetic-predictor architecture on the tiny CLIP: L2-normalised 64-d image embedding → Linear(64,256) →
Dropout → Linear(256,64) → Dropout → Linear(64,16) → Dropout → Linear(16,1). Trained (MSE) to predict the analytic
aesthetic score of `align_bench.tiny.scenes.aesthetic_score` (0–10: 0.4·luma contrast + 0.3·size (peaks at 30 %
cover) + 0.3·centring) on rendered scenes. Registered as reward `tiny_aesthetic` (differentiable); the analytic
score itself is `tiny_true_aesthetic` (oracle), so reward hacking is measurable.

## Metrics
- held-out renders: {json.dumps(m.get('aesthetic_head', {}))}
- headroom: {json.dumps(h)}

{common}""",
        "tiny": f"""# tiny (align_bench tiny world)

Stock `diffusers.StableDiffusionPipeline` directory: `AutoencoderKL` (factor 4, 4 latent channels, scaling
factor in its config so scaled latents have unit std; caption-free, so trained on scenes of all 56 colour pairs), `CLIPTextModel` (the tiny CLIP's text tower, fine-tuned
jointly with the UNet), word-level tokenizer, `UNet2DConditionModel` (blocks 32/64/64, cross-attention at every
level, {t.get('unet_params', 0) / 1e6:.2f}M parameters) trained for ε-prediction on SD's schedule (scaled_linear
0.00085→0.012, 1000 steps) with 10 % caption dropout, EMA weights; `DDIMScheduler` (trailing, no offset,
set_alpha_to_one False). Images 3×32×32, latents 4×8×8, prompts ≤ 16 tokens.

Trade-off: 32×32 pixels keep shapes legible; the factor-4 VAE puts the UNet on 8×8 latents, which is what makes an
RL run of dozens of 64-image rollouts with CFG fit in minutes on 2 CPU cores.

## Metrics (DDIM, CFG {m.get('tiny', {}).get('guidance_scale')}, n = {m.get('tiny', {}).get('n_per_split')} per split)
Colour accuracy = pixel check (shape colour and background colour both right); shape accuracy = tiny-CLIP
zero-shot given the colours. tiny-CLIP's own accuracy on rendered ground truth: shape
{g.get('shape_acc_given_colours', float('nan')):.1%} (given colours) / {g.get('shape_acc_zero_shot_168', float('nan')):.1%} (168-way), colour {g.get('colour_acc_zero_shot_168', float('nan')):.1%}.

{_table(m.get('tiny', {}), TINY_STEPS)}

{_bars_md(m, 'tiny')}

Headroom: base samples (20 steps) mean `tiny_aesthetic` {h.get('base_samples_tiny_aesthetic_mean', float('nan')):.2f} vs rendered
scenes' top 5 % {h.get('rendered_tiny_aesthetic_top5pct_mean', float('nan')):.2f} (max {h.get('rendered_tiny_aesthetic_max', float('nan')):.2f}).

Timings ({t.get('threads')} threads): UNet forward on 64 latents {t.get('unet_forward_ms_batch64')} ms; 64 images at 8 steps
with CFG {t.get('sample_64_images_8_steps_cfg_s')} s.

{common}""",
        "tiny-lcm": f"""# tiny-lcm (align_bench tiny world)

Stock `diffusers.LatentConsistencyModelPipeline` directory with `LCMScheduler` (50 original steps). The UNet
(`time_cond_proj_dim=256`, w-conditioned; pipeline guidance g ↦ w = g − 1) is latent-consistency-distilled from
`tiny`: student initialised from the teacher (zero-initialised guidance projection), one DDIM-solver step of the
CFG teacher (w ∈ [1, 8]) with skip 20 timesteps, EMA target network (decay 0.95), pseudo-Huber loss; the EMA
target is what ships. Same VAE / text encoder / tokenizer as `tiny`.

## Metrics (LCM, guidance {m.get('tiny_lcm', {}).get('guidance_scale')}, n = {m.get('tiny_lcm', {}).get('n_per_split')} per split)

{_table(m.get('tiny_lcm', {}), LCM_STEPS)}

{_bars_md(m, 'tiny_lcm')}

{common}""",
    }
    cards["tiny-turbo"] = _turbo_card(m, common)
    for name, text in cards.items():
        if (root / name).is_dir() and (only is None or name in only):
            (root / name / "README.md").write_text(text)


def _turbo_card(m: dict, common: str) -> str:
    r = m.get("tiny_turbo", {})
    b = m.get("build_seconds", {})
    return f"""# tiny-turbo (align_bench tiny world)

The tiny world's SD-Turbo: a stock `diffusers.StableDiffusionPipeline` directory whose plain ε-prediction
`UNet2DConditionModel` (same architecture as `tiny`'s, no guidance input) samples in 1–8 DDIM steps without
classifier-free guidance (`guidance_scale` 1: the teacher's CFG is baked in). `DDIMScheduler` trailing
(999, 499, … for few steps), no offset, set_alpha_to_one False, as `tiny`. `vae/`, `text_encoder/` and
`tokenizer/` are relative symlinks to `../tiny/`'s (the text encoder is not trained here), so only the UNet
(fp32) is stored: the committed world stays within its 40 MB budget without rounding the weights.

## How it is made (`align_bench.tiny.train.distill_turbo`)
1. Teacher couplings: the CFG teacher (`tiny`, guidance 7.5) solves its probability-flow ODE with DDIM (η = 0,
   trailing) from seeded noises x_T for captions drawn from `tiny`'s own training captions (seen colour pairs
   only: held-out pairs are never shown) → pairs (x_T, x0).
2. Reflow in DDIM form (Liu et al. 2023, "Flow Straight and Fast"; guidance distilled into one model as in
   Meng et al. 2023, "On Distillation of Guided Diffusion Models"): with the coupled noise
   ε* = (x_T − √ᾱ₉₉₉·x0) / √(1 − ᾱ₉₉₉), the student (initialised from the teacher) regresses ε* at
   x_t = √ᾱ_t·x0 + √(1 − ᾱ_t)·ε*. A UNet that predicts ε* there has x̂0 = x0 at every t, and a DDIM step from
   any point of that line lands on the line: 1, 2, 4 and 8 steps return the same sample. Timesteps: t = 999 a
   quarter of the time, the 8-step trailing grid (which contains the 1/2/4-step grids) a quarter, uniform
   otherwise; truncated-SNR weighting max(‖x̂0 − x0‖², ‖ε̂ − ε*‖²) (Salimans & Ho 2022); AdamW, EMA weights.

## Metrics (DDIM η = 0 trailing, guidance {r.get('guidance_scale')}, n = {r.get('n_per_split')} per split)
Colour accuracy = pixel check (shape colour and background colour both right); shape accuracy = tiny-CLIP zero-shot
given the colours (as on `tiny`'s card, where the teacher at 20 steps with CFG 7.5 is the reference).

{_table(r, TURBO_STEPS)}

As SDPO samples during training (stochastic DDIM, η = 1, no CFG):

{_table(r, TURBO_ETA1_STEPS, "_eta1")}

{_bars_md(m, 'tiny_turbo')}

Stage seconds: {b.get('turbo')} (couplings + distillation).

{common}"""


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="assets/tiny-world")
    ap.add_argument("--n", type=int, default=4, help="samples per prompt (24 prompts per split)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cards", action="store_true", help="rewrite the model cards and metrics.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from .. import resolve_path

    root = resolve_path(args.root)
    m = evaluate_all(root, args.n)
    old = json.loads((root / "metrics.json").read_text()) if (root / "metrics.json").is_file() else {}
    m["build_seconds"] = old.get("build_seconds", {})
    print(json.dumps(m, indent=2))
    if args.cards:
        (root / "metrics.json").write_text(json.dumps(m, indent=2))
        bt = root / "build_times.json"
        budget = json.loads(bt.read_text())["budget"] if bt.is_file() else {"eval_n": args.n}
        budget["eval_n"] = args.n
        write_model_cards(root, m, budget, "python -m align_bench.tiny.build --out assets/tiny-world")


if __name__ == "__main__":
    main()
