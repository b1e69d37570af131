"""`make reproduce-tables`: a study spec (experiments/specs/<preset>.yaml) → the runs it needs, launched through
Hydra multirun only where missing, → tables (Markdown, LaTeX, CSV), plots and a results page.

    python -m align_bench.study experiments/specs/tiny.yaml            # run what is missing, then aggregate
    python -m align_bench.study experiments/specs/tiny.yaml --quick    # one seed, a smaller study
    python -m align_bench.study experiments/specs/tiny.yaml --aggregate-only
    python -m align_bench.study experiments/specs/tiny.yaml --dry-run  # print the multirun commands

A run is identified by its directory `<runs>/<preset>/seed<seed>` (Hydra's sweep subdir), so re-running the study
skips every run whose metrics.json has a final eval and relaunches the rest (with `resume` set as the spec says,
so a killed run continues from its checkpoint where the runner supports it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from . import REPO_ROOT
from .tables import load_runs, write_tables

log = logging.getLogger("align_bench.study")

_SPEC_KEYS = {"name", "runs", "results", "presets", "seeds", "overrides", "launcher", "quick", "tune"}
_TUNE_KEYS = {"key", "values", "seeds", "select_last_epochs", "overrides"}


@dataclass
class Spec:
    """A study: presets × seeds with common overrides, launched by `launcher` (a hydra/launcher choice plus its
    keys). `quick` holds the keys that `--quick` replaces (e.g. seeds: [0])."""

    name: str
    runs: Path
    results: Path
    presets: list[str]
    seeds: list[int]
    overrides: list[str] = field(default_factory=list)
    launcher: dict = field(default_factory=dict)
    quick: dict = field(default_factory=dict)
    # The equal tuning budget: every preset is tried at each of `values` of `key` (the same trials for every
    # algorithm), selected by the TRAINING reward (mean of the last `select_last_epochs` epochs, on the training
    # prompts; never the held-out eval). Empty: no tuning stage.
    tune: dict = field(default_factory=dict)


def load_spec(path: Path, quick: bool = False) -> Spec:
    """Read and check a spec; relative paths are relative to the repository root. One-line errors."""
    path = Path(path)
    if not path.is_file():
        specs = sorted(p.name for p in (REPO_ROOT / "experiments" / "specs").glob("*.yaml"))
        raise FileNotFoundError(f"study spec {path} not found; available: {specs}")
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    unknown = set(raw) - _SPEC_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {sorted(unknown)}; valid: {sorted(_SPEC_KEYS)}")
    if quick:
        raw = {**raw, **raw.get("quick", {})}
    for key in ("name", "runs", "presets", "seeds"):
        if not raw.get(key):
            raise ValueError(f"{path}: '{key}' is required and must not be empty")
    from .main import CONFIG_DIR

    missing = [p for p in raw["presets"] if not (Path(CONFIG_DIR) / "experiment" / f"{p}.yaml").is_file()]
    if missing:
        raise ValueError(f"{path}: unknown preset(s) {missing} (conf/experiment/<name>.yaml)")
    root = lambda p: Path(p) if Path(p).is_absolute() else REPO_ROOT / p  # noqa: E731
    return Spec(name=raw["name"], runs=root(raw["runs"]), results=root(raw.get("results") or Path(raw["runs"]).parent),
                presets=list(raw["presets"]), seeds=[int(s) for s in raw["seeds"]],
                overrides=list(raw.get("overrides", [])), launcher=dict(raw.get("launcher", {})),
                quick=dict(raw.get("quick", {})), tune=_check_tune(path, raw.get("tune") or {}))


def _check_tune(path: Path, tune: dict) -> dict:
    unknown = set(tune) - _TUNE_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown tune key(s) {sorted(unknown)}; valid: {sorted(_TUNE_KEYS)}")
    if tune and (not tune.get("key") or len(tune.get("values") or []) < 2):
        raise ValueError(f"{path}: tune needs a 'key' and at least two 'values'")
    return tune


def run_dir(spec: Spec, preset: str, seed: int) -> Path:
    return spec.runs / preset / f"seed{seed}"


def finished_metrics(path: Path) -> dict | None:
    """The run's metrics.json if it exists, parses and holds the final eval (the runner writes it last), else None."""
    try:
        metrics = json.loads((path / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    return metrics if "final" in metrics.get("eval", {}) else None


def is_finished(path: Path) -> bool:
    return finished_metrics(path) is not None


def missing_runs(spec: Spec) -> dict[str, list[int]]:
    """{preset: [seeds whose run is not finished]} (presets with nothing missing left out)."""
    out = {}
    for preset in spec.presets:
        seeds = [s for s in spec.seeds if not is_finished(run_dir(spec, preset, s))]
        if seeds:
            out[preset] = seeds
    return out


def multirun_command(spec: Spec, presets: list[str], seeds: list[int]) -> list[str]:
    """One Hydra multirun over presets × seeds (a sweep is a product, so the study groups presets that miss the
    same seeds); the sweep dir puts each job at run_dir(spec, preset, seed)."""
    launcher = dict(spec.launcher)
    kind = launcher.pop("kind", "basic")
    cmd = [sys.executable, str(REPO_ROOT / "train.py"), "-m", "experiment=" + ",".join(presets),
           "seed=" + ",".join(str(s) for s in seeds),
           f"hydra.sweep.dir={spec.runs}", "hydra.sweep.subdir=${experiment}/seed${seed}"]
    if kind != "basic":
        cmd.append(f"hydra/launcher={kind}")
        cmd += [f"hydra.launcher.{k}={v}" for k, v in launcher.items()]
    return cmd + list(spec.overrides)


def launch(spec: Spec, dry_run: bool = False) -> list[list[str]]:
    """Launch every missing run; returns the commands (none when the study is complete)."""
    todo = missing_runs(spec)
    by_seeds: dict[tuple[int, ...], list[str]] = {}
    for preset, seeds in todo.items():
        by_seeds.setdefault(tuple(seeds), []).append(preset)
    cmds = [multirun_command(spec, presets, list(seeds)) for seeds, presets in by_seeds.items()]
    total = sum(len(s) for s in todo.values())
    log.info("%s: %d of %d runs to do%s", spec.name, total, len(spec.presets) * len(spec.seeds),
             "" if total else " (all finished: nothing launched)")
    # One thread per job: the launcher runs several jobs side by side and oversubscription was seen to cost
    # up to 10x on CPU. A user's own OMP_NUM_THREADS wins.
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    for cmd in cmds:
        log.info("launch: %s", shlex.join(cmd))
        if not dry_run:
            run_sweep(cmd, env)
    return cmds


def run_sweep(cmd: list[str], env: dict, grace_s: float = 120.0) -> None:
    """Run one multirun in its own session and wait. Interrupted (Ctrl-C, SIGTERM), stop every process it started —
    the launcher's workers (joblib's loky processes outlive their parent otherwise) and each run, which checkpoints
    on SIGTERM — give them `grace_s` to finish, then kill what is left; the next `make reproduce-tables` resumes."""
    import signal

    import psutil

    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, start_new_session=True)

    def _terminate(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        if proc.wait() != 0:
            raise subprocess.CalledProcessError(proc.returncode, cmd)
    except KeyboardInterrupt:
        tree = [proc, *psutil.Process(proc.pid).children(recursive=True)] if proc.poll() is None else []
        log.warning("interrupted: stopping %d process(es) of the sweep (runs checkpoint; rerun to resume)", len(tree))
        for p in tree:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(tree, timeout=grace_s)
        for p in alive:
            p.kill()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


# ------------------------------------------------------------------------------------------------ tuning
def tuning_specs(spec: Spec) -> dict[str, Spec]:
    """{value: the sub-study that tries every preset at key=value} under <runs>/../tuning/<leaf key>_<value> (no '='
    in the name: it goes into a hydra.sweep.dir override)."""
    t = spec.tune
    out = {}
    for value in t["values"]:
        tag = f"{t['key'].rsplit('.', 1)[-1]}_{value}"
        out[str(value)] = Spec(name=f"{spec.name}-tune-{tag}", runs=spec.runs.parent / "tuning" / tag,
                               results=spec.results, presets=spec.presets,
                               seeds=[int(s) for s in t.get("seeds", [0])],
                               overrides=[*spec.overrides, *t.get("overrides", []), f"{t['key']}={value}"],
                               launcher=spec.launcher)
    return out


def training_score(path: Path, last: int) -> float | None:
    """Mean training reward (the training prompts' own) over the last `last` epochs of a finished run."""
    metrics = finished_metrics(path)
    if metrics is None:
        return None
    curve = [t["reward_mean"] for t in metrics["train"] if t.get("reward_mean") is not None]
    return sum(curve[-last:]) / len(curve[-last:]) if curve else None


def tune(spec: Spec, dry_run: bool = False) -> dict[str, str]:
    """Run the tuning trials that are missing, then choose per preset: {preset: chosen value}. Writes
    <results>/tuning.md (every trial's score, the choice in bold, the preset's own value marked)."""
    from .main import compose

    subs = tuning_specs(spec)
    for sub in subs.values():
        launch(sub, dry_run=dry_run)
    if dry_run:
        return {}
    last = int(spec.tune.get("select_last_epochs", 5))
    key = spec.tune["key"]
    lines = [f"# Tuning: {spec.name}", "",
             f"Every preset tried at `{key}` ∈ {{{', '.join(subs)}}} (the same trials for every algorithm), seeds "
             f"{subs[next(iter(subs))].seeds}; score = mean training reward of the last {last} epochs on the "
             "training prompts (the held-out eval set plays no part). Bold: the best trial; *: the preset's own "
             "value, which the tables use.", "", "| preset | " + " | ".join(subs) + " | chosen |",
             "|---|" + "---|" * (len(subs) + 1)]
    chosen = {}
    for preset in spec.presets:
        scores = {}
        for value, sub in subs.items():
            got = [training_score(run_dir(sub, preset, s), last) for s in sub.seeds]
            scores[value] = None if None in got else sum(got) / len(got)
        done = {v: x for v, x in scores.items() if x is not None}
        best = max(done, key=done.get) if done else None
        own = str(OmegaConf.select(compose([f"experiment={preset}"]), key))
        chosen[preset] = best
        cells = []
        for v, x in scores.items():
            cell = "—" if x is None else f"{x:.3f}"
            cell = f"**{cell}**" if v == best else cell
            cells.append(cell + (" *" if _same(v, own) else ""))
        lines.append(f"| {preset} | " + " | ".join(cells) + f" | {best} |")
        if best is not None and not _same(best, own):
            log.warning("tuning: %s scores best at %s=%s but the preset sets %s", preset, key, best, own)
    spec.results.mkdir(parents=True, exist_ok=True)
    (spec.results / "tuning.md").write_text("\n".join(lines) + "\n")
    return chosen


def _same(a, b) -> bool:
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return str(a) == str(b)


def aggregate(spec: Spec) -> Path:
    """Tables, plots and the results page from every metrics.json under spec.runs; returns the page's path."""
    from .plots import plot_study

    runs, problems = load_runs(spec.runs)
    for path, why in problems:
        log.warning("skipped %s: %s", path, why)
    tables = write_tables(runs, problems, spec.results)
    figures = plot_study(runs, spec.results)
    page = spec.results / "README.md"
    md = (spec.results / "tables.md").read_text().splitlines()
    md[0] = f"# Results: {spec.name}"
    md.insert(2, f"Regenerate: `make reproduce-tables PRESET={spec.name}` (launches only missing runs, then "
                 f"aggregates). Spec: `experiments/specs/{spec.name}.yaml`; runs under "
                 f"`{_rel(spec.runs)}`. Also as `tables.tex` and `tables.csv`.\n")
    if (spec.results / "tuning.md").is_file():
        md.insert(3, "How each preset's learning rate was chosen (the same trials for every algorithm): "
                     "[tuning.md](tuning.md).\n")
    if figures:
        md += ["", "## Figures", ""] + [f"![{p.stem}]({_rel(p, spec.results)})" for p in figures]
    page.write_text("\n".join(md) + "\n")
    log.info("%d tables, %d figures → %s", len(tables), len(figures), page)
    return page


def _rel(p: Path, base: Path = REPO_ROOT) -> str:
    try:
        return str(Path(p).resolve().relative_to(Path(base).resolve()))
    except ValueError:
        return str(p)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m align_bench.study", description=__doc__.split("\n\n")[0])
    ap.add_argument("spec", type=Path, help="experiments/specs/<name>.yaml")
    ap.add_argument("--quick", action="store_true", help="the spec's `quick` variant (e.g. one seed)")
    ap.add_argument("--aggregate-only", action="store_true", help="launch nothing; tables from what exists")
    ap.add_argument("--dry-run", action="store_true", help="print the multirun commands, launch nothing")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        spec = load_spec(args.spec, quick=args.quick)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.time()
    if not args.aggregate_only:
        try:
            if spec.tune and not args.quick:
                tune(spec, dry_run=args.dry_run)
            launch(spec, dry_run=args.dry_run)
        except subprocess.CalledProcessError as e:
            print(f"error: a sweep failed (exit {e.returncode}): {shlex.join(e.cmd)}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("align_bench.study: interrupted; finished runs are kept, the others checkpointed — run the same "
                  "command again to resume", file=sys.stderr)
            return 130
        if args.dry_run:
            return 0
    aggregate(spec)
    log.info("done in %.0f s", time.time() - t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
