"""`python -m align_bench.human_feedback sample|train`: the command line of D3PO's human-feedback mode (see the
package docstring for the workflow and the label formats)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from . import TEMPLATE_FILE, sample_groups, sampling_settings


# ------------------------------------------------------------------------------------------------ CLI
def _compose(overrides: list[str]):
    from ..main import compose

    return compose(["algo=d3po", *overrides])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m align_bench.human_feedback",
                                     description="D3PO's human-feedback mode: sample image groups that share prompt "
                                                 "and x_T for a person to label, then train D3PO on the labels.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sample", help="sample groups sharing x_T and write images + a label template")
    s.add_argument("--out", required=True)
    s.add_argument("--prompts", type=int, default=8, help="number of prompts drawn from prompts.train")
    s.add_argument("--prompt", action="append", default=[], help="explicit prompt (repeatable; overrides --prompts)")
    s.add_argument("--per-prompt", type=int, default=4, help="images per prompt (all share x_T); reference: 7")
    s.add_argument("--lora", default=None, help="sample from a trained LoRA directory (next labelling round)")
    s.add_argument("--seed", type=int, default=0)
    t = sub.add_parser("train", help="train D3PO on labelled pairs (a Hydra run with algo.human.*)")
    t.add_argument("--data", required=True)
    t.add_argument("--labels", action="append", required=True, help="label file (repeatable: annotators averaged)")
    t.add_argument("--run-dir", default=None)
    for p in (s, t):
        p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=tiny steps.train=8")
    args = parser.parse_args(argv)

    if args.cmd == "sample":
        from ..models.diffusion import DiffusionModel, ModelSpec
        from ..prompts import PromptSampler, load_prompts

        cfg = _compose(args.overrides)
        spec = ModelSpec.from_config(cfg.model)
        device = "cuda" if torch.cuda.is_available() and cfg.device != "cpu" else "cpu"
        model = DiffusionModel.from_pretrained(spec, device=device)
        if args.lora:
            model.add_lora(int(cfg.model.lora.rank), float(cfg.model.lora.alpha))
            model.load_lora(args.lora)
        prompts = args.prompt or PromptSampler(load_prompts(cfg.prompts.train), args.seed).sample(args.prompts)
        out = sample_groups(model, prompts, args.per_prompt, sampling_settings(cfg), args.out,
                            torch.Generator().manual_seed(args.seed))
        print(f"wrote {len(prompts) * args.per_prompt} images to {out}/images (view {out}/index.html); "
              f"fill the score column of {out / TEMPLATE_FILE}, then run:\n  python -m align_bench.human_feedback "
              f"train --data {out} --labels {out / TEMPLATE_FILE} {' '.join(args.overrides)}")
    else:
        from ..runner import run

        labels = "[" + ",".join(f"'{Path(p).resolve()}'" for p in args.labels) + "]"
        cfg = _compose([*args.overrides, f"algo.human.data_dir='{Path(args.data).resolve()}'",
                        f"algo.human.labels={labels}"])
        run_dir = args.run_dir or str(Path(args.data) / "run")
        run(cfg, run_dir)
        print(f"LoRA and metrics in {run_dir}")


if __name__ == "__main__":
    main(sys.argv[1:])
