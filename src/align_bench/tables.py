"""Aggregate runs into the comparison's tables: every `metrics.json` under a root → step-generalisation tables
(rows = algorithms plus base, columns = eval step counts, cells = mean ± 95 % CI over seeds), the cross-reward
matrix (trained on A, scored on B) and the trained-at-N × evaluated-at-M matrix; Markdown, LaTeX and CSV.

Pure functions over plain dicts so that a partial sweep, a synthetic tree in a test and a finished study go
through the same code. What a cell means is written in README "How runs are compared".
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

# Two-sided 95 % Student-t quantiles t_{0.975, df}; between tabulated df the next smaller df is used, which
# errs towards wider intervals. Beyond 120 the normal quantile.
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


def t_quantile_975(df: int) -> float:
    """t_{0.975} for `df` ≥ 1 degrees of freedom (table above; 1.96 beyond 120)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df > 120:
        return 1.960
    return _T975[max(k for k in _T975 if k <= df)]


@dataclass(frozen=True)
class Cell:
    """Mean over seeds with the half-width of its 95 % CI (nan for a single seed) and the seed count."""

    mean: float
    ci: float
    n: int

    def text(self, digits: int = 2) -> str:
        if self.n == 0:
            return "–"
        if self.n == 1 or math.isnan(self.ci):
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.ci:.{digits}f}"


def mean_ci(values: list[float]) -> Cell:
    """Mean and 95 % t-interval half-width of `values` (one value per seed)."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    n = len(vals)
    if n == 0:
        return Cell(float("nan"), float("nan"), 0)
    mean = sum(vals) / n
    if n == 1:
        return Cell(mean, float("nan"), 1)
    var = sum((v - mean) ** 2 for v in vals) / (n - 1)
    return Cell(mean, t_quantile_975(n - 1) * math.sqrt(var / n), n)


@dataclass
class Run:
    """What the tables need from one run's metrics.json."""

    path: Path
    algo: str
    model: str
    reward: str
    seed: int
    experiment: str | None
    train_steps: int | None
    complete: bool
    base: dict = field(default_factory=dict)   # reward -> steps(str) -> mean
    final: dict = field(default_factory=dict)
    reward_queries: int = 0
    wall_time_s: float = 0.0
    train: list = field(default_factory=list)

    @property
    def label(self) -> str:
        """Row label: the algorithm, with the preset when it is not the algorithm's tiny default."""
        return self.algo


def _means(block: dict) -> dict:
    return {rw: {str(s): float(v["mean"]) for s, v in by_steps.items()} for rw, by_steps in block.items()}


def parse_run(path: Path) -> Run:
    """One metrics.json → Run. Raises ValueError naming what is wrong (the caller reports and skips)."""
    try:
        m = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(m, dict) or "run" not in m or "eval" not in m:
        raise ValueError("no 'run' or 'eval' section")
    r, ev = m["run"], m["eval"]
    try:
        return Run(path=Path(path), algo=str(r["algo"]), model=str(r["model"]), reward=str(r["reward"]),
                   seed=int(r["seed"]), experiment=r.get("experiment"), train_steps=r.get("train_steps"),
                   complete="final" in ev, base=_means(ev.get("base", {})), final=_means(ev.get("final", {})),
                   reward_queries=int(r.get("reward_queries", 0)), wall_time_s=float(r.get("wall_time_s", 0.0)),
                   train=list(m.get("train", [])))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"malformed run section: {e!r}") from None


def load_runs(root: Path) -> tuple[list[Run], list[tuple[Path, str]]]:
    """Every metrics.json under `root`: (runs, problems), problems = (path, what is wrong) for files skipped."""
    runs, problems = [], []
    for path in sorted(Path(root).rglob("metrics.json")):
        try:
            runs.append(parse_run(path))
        except (OSError, ValueError) as e:
            problems.append((path, str(e)))
    return runs, problems


@dataclass
class Table:
    """A titled grid of cells; `bold[c]` is the row index of the best cell of column c (None: no comparison)."""

    title: str
    row_header: str
    columns: list[str]
    rows: list[str]
    cells: list[list[Cell]]
    notes: list[str] = field(default_factory=list)
    bold: list = field(default_factory=list)

    def mark_best(self, higher_is_better: bool = True) -> Table:
        self.bold = []
        for c in range(len(self.columns)):
            scored = [(cell.mean, r) for r, row in enumerate(self.cells) for cell in [row[c]] if cell.n > 0]
            if not scored:
                self.bold.append(None)
                continue
            best = max(scored) if higher_is_better else min(scored)
            self.bold.append(best[1])
        return self

    def _is_bold(self, r: int, c: int) -> bool:
        return bool(self.bold) and self.bold[c] == r


def step_table(runs: list[Run], model: str, reward: str, scored_by: str | None = None) -> Table:
    """Rows: base, then each algorithm; columns: eval step counts; cell: mean ± CI over seeds of the final eval
    of `scored_by` (default: the training reward). Only complete runs trained with `reward` on `model`."""
    scored_by = scored_by or reward
    sel = [r for r in runs if r.complete and r.model == model and r.reward == reward and scored_by in r.final]
    steps = sorted({s for r in sel for s in r.final[scored_by]}, key=int)
    by_algo: dict[str, list[Run]] = defaultdict(list)
    for r in sel:
        by_algo[r.label].append(r)
    # The base model's eval is the same for every run on (model, eval set): the row shows their mean, and a note
    # flags runs that disagree (different eval sets or commits mixed under one root).
    base_vals = {s: [r.base[scored_by][s] for r in sel if s in r.base.get(scored_by, {})] for s in steps}
    rows, cells = [], []
    if any(base_vals.values()):
        rows.append("base")
        cells.append([Cell(sum(v) / len(v), float("nan"), 1) if v else Cell(float("nan"), float("nan"), 0)
                      for v in (base_vals[s] for s in steps)])
    for algo in sorted(by_algo):
        rows.append(algo)
        cells.append([mean_ci([r.final[scored_by].get(s) for r in by_algo[algo]]) for s in steps])
    notes = []
    if any(max(v) - min(v) > 1e-9 for v in base_vals.values() if v):
        notes.append("base eval differs between runs (different eval sets or commits under one root?)")
    for algo in sorted(by_algo):
        rs = by_algo[algo]
        notes.append(f"{algo}: {len(rs)} seed(s), {sum(r.reward_queries for r in rs) / len(rs):.0f} reward queries "
                     f"and {sum(r.wall_time_s for r in rs) / len(rs):.0f} s per run")
    title = f"{model} · trained on {reward}" + (f" · scored by {scored_by}" if scored_by != reward else "")
    return Table(title, "algorithm", [f"{s} step{'s' if s != '1' else ''}" for s in steps], rows, cells,
                 notes).mark_best()


def cross_reward_table(runs: list[Run], model: str, steps: str | None = None) -> Table:
    """Rows: (algorithm, trained-on reward); columns: every reward scored at eval; cell: mean ± CI of the final
    eval at `steps` (default: the largest step count). Reward hacking shows as a gain on the trained column
    without one on the others (on the tiny world: the learned head against the analytic oracle)."""
    sel = [r for r in runs if r.complete and r.model == model]
    scored = sorted({rw for r in sel for rw in r.final})
    if steps is None:
        steps = str(max((int(s) for r in sel for by in r.final.values() for s in by), default=0))
    groups: dict[tuple[str, str], list[Run]] = defaultdict(list)
    for r in sel:
        groups[(r.label, r.reward)].append(r)
    rows, cells = [], []
    for (algo, trained) in sorted(groups):
        rows.append(f"{algo} ← {trained}")
        cells.append([mean_ci([r.final.get(rw, {}).get(steps) for r in groups[(algo, trained)]]) for rw in scored])
    base = [[r.base.get(rw, {}).get(steps) for r in sel] for rw in scored]
    if any(v is not None for col in base for v in col):
        rows.insert(0, "base")
        cells.insert(0, [Cell(*(lambda v: (sum(v) / len(v), float("nan"), 1) if v else (float("nan"), float("nan"), 0))(
            [x for x in col if x is not None])) for col in base])
    return Table(f"{model} · cross-reward matrix at {steps} steps (trained on ← , scored by ↓)", "trained",
                 scored, rows, cells).mark_best()


def train_eval_table(runs: list[Run], model: str, reward: str, algo: str) -> Table:
    """Rows: training step count N; columns: eval step count M; cell: final eval of `reward` (mean ± CI)."""
    sel = [r for r in runs if r.complete and r.model == model and r.reward == reward and r.algo == algo
           and r.train_steps is not None]
    steps = sorted({s for r in sel for s in r.final.get(reward, {})}, key=int)
    by_n: dict[int, list[Run]] = defaultdict(list)
    for r in sel:
        by_n[int(r.train_steps)].append(r)
    rows = [f"trained at {n}" for n in sorted(by_n)]
    cells = [[mean_ci([r.final[reward].get(s) for r in by_n[n]]) for s in steps] for n in sorted(by_n)]
    return Table(f"{algo} on {model} · {reward}: trained at N × evaluated at M steps", "train steps",
                 [f"eval {s}" for s in steps], rows, cells).mark_best()


def all_tables(runs: list[Run]) -> list[Table]:
    """One step table per (model, reward) trained on, a cross-reward matrix per model where more than one reward
    was scored, a train × eval matrix per (model, reward, algorithm) with more than one training step count."""
    tables = []
    for model, reward in sorted({(r.model, r.reward) for r in runs if r.complete}):
        tables.append(step_table(runs, model, reward))
    for model in sorted({r.model for r in runs if r.complete}):
        if len({rw for r in runs if r.complete and r.model == model for rw in r.final}) > 1:
            tables.append(cross_reward_table(runs, model))
    for key in sorted({(r.model, r.reward, r.algo) for r in runs if r.complete}):
        if len({r.train_steps for r in runs if r.complete and (r.model, r.reward, r.algo) == key}) > 1:
            tables.append(train_eval_table(runs, *key))
    return tables


# ---------------------------------------------------------------- renderers


def to_markdown(t: Table) -> str:
    out = [f"### {t.title}", "", "| " + " | ".join([t.row_header, *t.columns]) + " |",
           "|" + "---|" * (len(t.columns) + 1)]
    for r, (name, row) in enumerate(zip(t.rows, t.cells)):
        texts = [f"**{c.text()}**" if t._is_bold(r, i) else c.text() for i, c in enumerate(row)]
        out.append("| " + " | ".join([name, *texts]) + " |")
    out += [""] + [f"- {n}" for n in t.notes] + ([""] if t.notes else [])
    return "\n".join(out)


def _latex_escape(s: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&"), ("#", r"\#"),
                 ("←", r"$\leftarrow$"), ("×", r"$\times$"), ("·", r"$\cdot$"), ("↓", r"$\downarrow$")):
        s = s.replace(a, b)
    return s


def to_latex(t: Table) -> str:
    def cell(c: Cell, bold: bool) -> str:
        if c.n == 0:
            return "--"
        body = f"{c.mean:.2f}" if c.n == 1 or math.isnan(c.ci) else f"{c.mean:.2f} \\pm {c.ci:.2f}"
        return f"$\\mathbf{{{body}}}$" if bold else f"${body}$"

    lines = [r"\begin{table}[t]", r"\centering", f"\\caption{{{_latex_escape(t.title)}}}",
             r"\begin{tabular}{l" + "c" * len(t.columns) + "}", r"\toprule",
             " & ".join(_latex_escape(x) for x in [t.row_header, *t.columns]) + r" \\", r"\midrule"]
    for r, (name, row) in enumerate(zip(t.rows, t.cells)):
        lines.append(" & ".join([_latex_escape(name)] + [cell(c, t._is_bold(r, i)) for i, c in enumerate(row)])
                     + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines)


def to_csv(t: Table) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["table", "row", "column", "mean", "ci95", "n_seeds", "best"])
    for r, (name, row) in enumerate(zip(t.rows, t.cells)):
        for i, c in enumerate(row):
            w.writerow([t.title, name, t.columns[i], f"{c.mean:.6g}", "" if math.isnan(c.ci) else f"{c.ci:.6g}",
                        c.n, int(t._is_bold(r, i))])
    return buf.getvalue()


def write_tables(runs: list[Run], problems: list[tuple[Path, str]], out: Path) -> list[Table]:
    """tables.md, tables.tex, tables.csv under `out` (created); problems listed at the top of tables.md."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tables = all_tables(runs)
    md = ["# align_bench results", "",
          f"{sum(r.complete for r in runs)} complete run(s), {sum(not r.complete for r in runs)} unfinished "
          "(left out of the tables). Cells: mean ± 95 % CI (Student t) over seeds of the final eval; bold: best "
          "per column. Protocol: README, \"How runs are compared\".", ""]
    if problems:
        md += ["Skipped files:", ""] + [f"- `{p}`: {why}" for p, why in problems] + [""]
    md += [to_markdown(t) for t in tables]
    (out / "tables.md").write_text("\n".join(md) + "\n")
    (out / "tables.tex").write_text("\n\n".join(to_latex(t) for t in tables) + "\n")
    header = "table,row,column,mean,ci95,n_seeds,best\n"
    (out / "tables.csv").write_text(header + "".join(to_csv(t).split("\n", 1)[1] for t in tables))
    return tables
