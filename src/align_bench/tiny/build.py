"""Build the whole tiny world from scratch: ``python -m align_bench.tiny.build --out assets/tiny-world``.

Stages (fixed seeds, step budgets, 2 threads by default): render a data pool → tokenizer + tiny CLIP → VAE → UNet
with the CLIP's text tower fine-tuned jointly (``tiny``) → CLIP refinement (more contrastive steps; the shipped
CLIP) → aesthetic head → LCM distillation (``tiny-lcm``) → few-step ε-prediction distillation (``tiny-turbo``) →
quality evaluation → model cards. ``--stages turbo`` (re)builds only ``tiny-turbo`` on top of an existing world,
measures it and rewrites its card and its section of ``metrics.json``. ``--smoke`` runs every
stage at a tiny budget in seconds (into a temporary directory unless ``--out`` is given). Progress bars go to
stderr, a log to ``<out>/build.log``.

Layout written::

    <out>/clip/        CLIPModel (config.json, model.safetensors) + tokenizer (tokenizer.json, …), README.md
    <out>/aesthetic/   AestheticHead (config.json, model.safetensors), README.md
    <out>/tiny/        StableDiffusionPipeline (DDIMScheduler trailing), README.md
    <out>/tiny-lcm/    LatentConsistencyModelPipeline (LCMScheduler), README.md
    <out>/tiny-turbo/  StableDiffusionPipeline (DDIMScheduler trailing, no CFG): its UNet; vae, text_encoder and
                       tokenizer are relative symlinks to ../tiny's, README.md
    <out>/metrics.json quality numbers (from ``align_bench.tiny.evaluate``)
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import scenes, spm, train
from .models import ddim_scheduler, lcm_scheduler
from .tokenizer import build_tokenizer

log = logging.getLogger("align_bench.tiny")

# FULL is the committed world's budget (make tiny-world, 2 threads). The VAE bounds shape accuracy, since samples
# can be no sharper than the decoder: tiny-CLIP tells shapes apart on 97 % of seen-pair renders, on 74 % of their
# reconstructions after 1,500 VAE steps (small squares came back as discs) and on 90 % after 2,500. The UNet's
# 3,900 steps are the calibration point. tiny-turbo: turbo_couplings teacher ODE solves of turbo_teacher_grid
# DDIM steps (the teacher's colour accuracy is 100 % at 20 steps, 46 % at 8), then turbo_steps student steps. 600
# steps gave 77 % seen-pair colour accuracy at 1 step (n = 48), 1,200 give 81 % (85 % at n = 192); 2,048 couplings
# and 2,000 steps gave 79 / 98 / 100 / 100 % at 1 / 2 / 4 / 8 steps, no better at 1 step for 1.6× the time.
FULL = dict(pool=20000, clip_steps=400, clip_bs=96, clip_refine_steps=600, vae_steps=2500, vae_bs=32,
            head_pool=10000, head_steps=600, unet_steps=3900, unet_bs=64, lcm_steps=800, lcm_bs=32,
            turbo_couplings=1024, turbo_teacher_grid=20, turbo_steps=1200, turbo_bs=32, eval_n=2)
SMOKE = dict(pool=256, clip_steps=3, clip_bs=12, clip_refine_steps=2, vae_steps=3, vae_bs=16, head_pool=256,
             head_steps=3, unet_steps=3, unet_bs=16, lcm_steps=2, lcm_bs=8, turbo_couplings=16, turbo_teacher_grid=2,
             turbo_steps=2, turbo_bs=8, eval_n=1)


def save_tiny_pipeline(out: Path, vae, text_encoder, tokenizer, unet) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=ddim_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(out), safe_serialization=True)
    # StableDiffusionPipeline.__init__ rewrites steps_offset 0 → 1 (a deprecation shim); with trailing spacing the
    # offset is unused, but the stored config should say what we mean.
    cfg_path = out / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["steps_offset"] = 0
    cfg_path.write_text(json.dumps(cfg, indent=2))


def save_lcm_pipeline(out: Path, vae, text_encoder, tokenizer, unet) -> None:
    from diffusers import LatentConsistencyModelPipeline

    pipe = LatentConsistencyModelPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                          scheduler=lcm_scheduler(), safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
    pipe.save_pretrained(str(out), safe_serialization=True)


# tiny-turbo ships only its UNet and scheduler; these components are tiny's, reached by relative symlinks (git
# stores them as links, ``from_pretrained`` follows them), which keeps the committed world under its 40 MB budget.
TURBO_SHARED = ("vae", "text_encoder", "tokenizer")


def save_turbo_pipeline(out: Path, unet, teacher_dir: str = "tiny") -> None:
    """A stock StableDiffusionPipeline directory: the distilled UNet, a trailing DDIMScheduler, and
    ``../<teacher_dir>/{vae,text_encoder,tokenizer}`` as symlinks (teacher_dir is a sibling of ``out``)."""
    import os

    out.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(str(out / "unet"), safe_serialization=True)
    ddim_scheduler().save_pretrained(str(out / "scheduler"))
    index = json.loads((out.parent / teacher_dir / "model_index.json").read_text())
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    for name in TURBO_SHARED:
        link = out / name
        if link.is_symlink() or link.exists():
            if link.is_dir() and not link.is_symlink():
                shutil.rmtree(link)
            else:
                link.unlink()
        os.symlink(os.path.join("..", teacher_dir, name), link, target_is_directory=True)


def _setup_logging(out: Path, mode: str = "w") -> None:
    out.mkdir(parents=True, exist_ok=True)
    log.setLevel(logging.INFO)
    for h in list(log.handlers):
        log.removeHandler(h)
    fh = logging.FileHandler(out / "build.log", mode=mode)
    fh.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(fh)
    sh = logging.StreamHandler(sys.stderr)
    sh.setFormatter(logging.Formatter("[tiny-world] %(message)s"))
    log.addHandler(sh)


def build(out: Path, budget: dict, seed: int = 0, threads: int = 2, stages: str = "all", resume: bool = False,
          checkpoint_every: int = 0,
          command: str = "python -m align_bench.tiny.build --out assets/tiny-world") -> dict:
    """Run every stage; returns the timings (seconds) per stage. ``stages``: "all", "base" (no LCM, no turbo),
    "turbo" (only tiny-turbo, on the world already in ``out``) or "spm" (only SPO's preference model, on the world in
    ``out``). ``resume``: reuse the clip / VAE / aesthetic / tiny artifacts (and turbo's teacher couplings) already in
    ``out`` (same seeds ⇒ same result)."""
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)  # denormals make CPU convolutions crawl
    if stages == "turbo":
        return build_turbo_only(out, budget, seed, command)
    _setup_logging(out)
    log.info("build into %s with budget %s seed %d threads %d", out, budget, seed, threads)
    times: dict[str, float] = {}
    t0 = time.time()
    if stages == "spm":  # only SPO's step-aware preference model, on the world already in `out`
        return {"spm": spm.build_stage(out, budget, seed=seed, resume=resume)["seconds"]}

    def lap(name: str) -> None:
        nonlocal t0
        times[name] = round(time.time() - t0, 1)
        log.info("stage %s done in %.1f s", name, times[name])
        t0 = time.time()

    images, captions, _ = train.make_pool(budget["pool"], seed)
    lap("render")

    tokenizer = build_tokenizer()
    clip1_dir = out / "_stage_clip1"  # intermediate: the CLIP whose text tower initialises the UNet's encoder
    if resume and (clip1_dir / "model.safetensors").is_file():
        clip = _load_clip_stage(clip1_dir)
    else:
        clip = train.train_clip(tokenizer, budget["clip_steps"], budget["clip_bs"], seed=seed + 1)
        clip.save_pretrained(str(clip1_dir), safe_serialization=True)
    lap("clip")

    vae_dir = out / "_stage_vae"  # intermediate (removed at the end): lets --resume skip the VAE
    if resume and (vae_dir / "config.json").is_file():
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(str(vae_dir)).eval()
        log.info("resume: loaded %s", vae_dir)
    else:
        # The VAE is caption-free (SD's is trained on everything), so it sees every colour pair; only the
        # text-conditioned UNet holds pairs out. Trained on seen pairs only, it garbled held-out pairs' images.
        vae_images, _, _ = train.make_pool(budget["pool"] // 2, seed + 7, pairs=scenes.ALL_PAIRS)
        vae = train.train_vae(vae_images, budget["vae_steps"], budget["vae_bs"], seed=seed + 2)
        vae.save_pretrained(str(vae_dir), safe_serialization=True)
    lap("vae")

    mean, std = train.encode_latents(vae, images, return_std=True)
    if resume and (out / "tiny" / "model_index.json").is_file() and not (out / "tiny" / ".partial").exists():
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        unet = UNet2DConditionModel.from_pretrained(str(out / "tiny"), subfolder="unet").eval()
        text_encoder = CLIPTextModel.from_pretrained(str(out / "tiny"), subfolder="text_encoder").eval()
        log.info("resume: loaded %s", out / "tiny")
    else:
        unet, text_encoder = train.train_unet(mean, std, captions, tokenizer, _text_tower(clip),
                                              vae.config.scaling_factor, budget["unet_steps"], budget["unet_bs"],
                                              seed=seed + 4, checkpoint_every=checkpoint_every,
                                              on_checkpoint=lambda u, te, step: (
                                                  save_tiny_pipeline(out / "tiny", vae, te, tokenizer, u),
                                                  (out / "tiny" / ".partial").touch(),
                                                  log.info("checkpoint: %s at unet step %d", out / "tiny", step)))
        save_tiny_pipeline(out / "tiny", vae, text_encoder, tokenizer, unet)
        (out / "tiny" / ".partial").unlink(missing_ok=True)
    lap("unet")

    # The shipped CLIP (rewards, zero-shot metrics) continues training after the UNet took its text tower: shape
    # needs more contrastive steps than colour, and the UNet fine-tunes its encoder anyway.
    clip_dir = out / "clip"
    if resume and (clip_dir / "model.safetensors").is_file():
        clip = _load_clip_stage(clip_dir)
    else:
        clip = train.refine_clip(clip, tokenizer, budget["clip_refine_steps"], budget["clip_bs"], seed=seed + 6)
        clip.save_pretrained(str(clip_dir), safe_serialization=True)
        tokenizer.save_pretrained(str(clip_dir))
    lap("clip_refine")

    if not (resume and (out / "aesthetic" / "model.safetensors").is_file()):
        head_imgs, _, _ = train.make_pool(budget["head_pool"], seed + 3)
        head, head_metrics = train.train_aesthetic(clip, head_imgs, budget["head_steps"], seed=seed + 3)
        head.save(out / "aesthetic", extra={"clip": "../clip", "metrics": head_metrics})
    lap("aesthetic")

    if stages == "all":
        lcm = train.distill_lcm(unet, text_encoder, mean, std, captions, tokenizer, vae.config.scaling_factor,
                                budget["lcm_steps"], budget["lcm_bs"], seed=seed + 5)
        save_lcm_pipeline(out / "tiny-lcm", vae, text_encoder, tokenizer, lcm)
        lap("lcm")
        turbo_stage(out, unet, text_encoder, tokenizer, captions, budget, seed, resume)
        lap("turbo")
    spm.build_stage(out, budget, seed=seed, resume=resume)
    lap("spm")
    shutil.rmtree(vae_dir, ignore_errors=True)
    shutil.rmtree(clip1_dir, ignore_errors=True)

    (out / "build_times.json").write_text(json.dumps({"budget": budget, "seconds": times}, indent=2))
    from . import evaluate

    metrics = evaluate.evaluate_all(out, n_per_prompt=budget["eval_n"], lcm=(stages == "all"),
                                    quick=budget["eval_n"] <= 1)
    metrics["build_seconds"] = times
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    lap("evaluate")
    evaluate.write_model_cards(out, metrics, budget, command)
    log.info("build finished: %s", json.dumps(times))
    return times


def turbo_stage(out: Path, teacher, text_encoder, tokenizer, captions: list[str], budget: dict, seed: int,
                resume: bool) -> None:
    """Distil ``tiny`` (``teacher``) into ``<out>/tiny-turbo``. Resumable: the teacher couplings (the costly half)
    are cached in ``<out>/_stage_turbo_couplings.pt`` until the stage finishes."""
    cache = out / "_stage_turbo_couplings.pt"
    key = {k: budget[k] for k in ("turbo_couplings", "turbo_teacher_grid")} | {"seed": seed + 8}
    couplings = None
    if resume and cache.is_file():
        stored = torch.load(cache)
        if stored["key"] == key:
            couplings = stored["couplings"]
            log.info("resume: loaded %d teacher couplings from %s", len(couplings[0]), cache)
    if couplings is None:
        couplings = train.teacher_couplings(teacher, text_encoder, tokenizer, captions, budget["turbo_couplings"],
                                            guidance=TURBO_TEACHER_GUIDANCE, steps=budget["turbo_teacher_grid"],
                                            bs=64, seed=seed + 8)
        torch.save({"key": key, "couplings": couplings}, cache)
        log.info("turbo: %d teacher couplings (%d DDIM steps, CFG %.1f) cached in %s", len(couplings[0]),
                 budget["turbo_teacher_grid"], TURBO_TEACHER_GUIDANCE, cache)
    student = train.distill_turbo(teacher, text_encoder, tokenizer, captions, budget["turbo_steps"],
                                  bs=budget["turbo_bs"], seed=seed + 8, couplings=couplings)
    save_turbo_pipeline(out / "tiny-turbo", student)
    cache.unlink(missing_ok=True)


# The CFG scale baked into tiny-turbo: tiny's evaluation scale (where its card's 20-step numbers are measured).
TURBO_TEACHER_GUIDANCE = 7.5


def build_turbo_only(out: Path, budget: dict, seed: int, command: str) -> dict:
    """``--stages turbo``: distil tiny-turbo from the ``tiny`` already in ``out``, measure it, merge its numbers into
    ``metrics.json`` / ``build_times.json`` and write its card. The other artifacts are left untouched."""
    from diffusers import UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    from . import evaluate

    if not (out / "tiny" / "model_index.json").is_file():
        raise SystemExit(f"--stages turbo needs the tiny world in {out} (tiny/ missing): build it first")
    _setup_logging(out, mode="a")  # a turbo-only run keeps the full build's log
    log.info("turbo stage into %s with budget %s seed %d", out, budget, seed)
    t0 = time.time()
    _, captions, _ = train.make_pool(budget["pool"], seed)  # the same captions the teacher was trained on
    teacher = UNet2DConditionModel.from_pretrained(str(out / "tiny"), subfolder="unet").eval()
    text_encoder = CLIPTextModel.from_pretrained(str(out / "tiny"), subfolder="text_encoder").eval()
    tokenizer = AutoTokenizer.from_pretrained(str(out / "tiny"), subfolder="tokenizer")
    turbo_stage(out, teacher, text_encoder, tokenizer, captions, budget, seed, resume=True)
    times = {"turbo": round(time.time() - t0, 1)}
    log.info("stage turbo done in %.1f s", times["turbo"])
    t0 = time.time()
    metrics = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").is_file() else {}
    metrics["tiny_turbo"] = evaluate.evaluate_turbo(out, budget["eval_n"], quick=budget["eval_n"] <= 1)
    metrics.setdefault("build_seconds", {}).update(times)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    times["evaluate_turbo"] = round(time.time() - t0, 1)
    bt_path = out / "build_times.json"
    bt = json.loads(bt_path.read_text()) if bt_path.is_file() else {"budget": {}, "seconds": {}}
    bt["budget"].update({k: v for k, v in budget.items() if k.startswith("turbo_")})
    bt["seconds"].update(times)
    bt_path.write_text(json.dumps(bt, indent=2))
    evaluate.write_model_cards(out, metrics, bt["budget"] | {"eval_n": budget["eval_n"]}, command,
                               only=("tiny-turbo",))
    log.info("turbo stage finished: %s", json.dumps(times))
    return times


def _load_clip_stage(path: Path):
    """A CLIP stage finished by an earlier run (``--resume``)."""
    from transformers import CLIPModel

    clip = CLIPModel.from_pretrained(str(path)).eval()
    log.info("resume: loaded %s", path)
    return clip


def _text_tower(clip):
    """The CLIPModel's text tower as a standalone ``CLIPTextModel`` (same weights)."""
    from transformers import CLIPTextModel

    te = CLIPTextModel(clip.config.text_config)
    te.load_state_dict(clip.text_model.state_dict())
    return te.eval()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="output directory (default assets/tiny-world; a temp dir with "
                                                "--smoke)")
    ap.add_argument("--smoke", action="store_true", help="tiny budget, seconds: exercises every code path")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (use 1 when other jobs share the cores)")
    ap.add_argument("--stages", choices=["all", "base", "turbo", "spm"], default="all",
                    help="all; base (no LCM, no turbo); turbo (only tiny-turbo, on the world in --out); spm (only "
                         "SPO's step-aware preference model, on the world in --out)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every step budget (quick experiments)")
    ap.add_argument("--resume", action="store_true", help="reuse finished stages found in --out")
    ap.add_argument("--checkpoint-every", type=int, default=0, help="save the tiny pipeline every N UNet steps")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=INT", help="override budget entries")
    args = ap.parse_args(argv)
    budget = dict(SMOKE if args.smoke else FULL)
    budget.update(spm.SMOKE if args.smoke else spm.FULL)
    for kv in args.set:
        k, v = kv.split("=")
        if k not in budget:
            raise SystemExit(f"unknown budget key {k!r}; keys: {sorted(budget)}")
        budget[k] = int(v)
    if args.scale != 1.0:
        for k in budget:
            if k.endswith("_steps"):
                budget[k] = max(1, int(budget[k] * args.scale))
    tmp = None
    if args.out is None:
        out = Path(tempfile.mkdtemp(prefix="tiny-world-smoke-")) if args.smoke else Path("assets/tiny-world")
        tmp = out if args.smoke else None
    else:
        out = Path(args.out)
    cmd = "python -m align_bench.tiny.build " + " ".join(argv if argv is not None else sys.argv[1:])
    build(out, budget, seed=args.seed, threads=args.threads, stages=args.stages, resume=args.resume,
          checkpoint_every=args.checkpoint_every,
          command=cmd.strip())
    print(f"tiny world written to {out}")
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
