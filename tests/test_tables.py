"""Aggregation of runs into tables (align_bench.tables) and the study driver (align_bench.study): synthetic
metrics.json trees with hand-computed means and intervals, partial sweeps, malformed files, the renderers, and
one real two-run multirun on the tiny world."""

import json
import math
import re

import pytest

from align_bench import study, tables
from align_bench.tables import Cell, load_runs, mean_ci, step_table, to_csv, to_latex, to_markdown


def write_run(root, preset, seed, algo, final, base=None, model="tiny", reward="r", train_steps=8, extra=None,
              complete=True, queries=64):
    """A metrics.json in the documented shape; `final`/`base`: {reward: {steps: mean}}."""
    d = root / preset / f"seed{seed}"
    d.mkdir(parents=True, exist_ok=True)
    block = lambda b: {rw: {s: {"mean": v, "std": 0.0, "n": 4} for s, v in by.items()} for rw, by in b.items()}  # noqa
    ev = {"base": block(base or {reward: {s: 0.0 for s in next(iter(final.values()))}})}
    if complete:
        ev["final"] = block(final)
    m = {"eval": ev, "eval_history": [],
         "train": [{"epoch": 0, "reward_mean": 1.0, "reward_queries": queries, "wall_time_s": 2.0}],
         "run": {"algo": algo, "model": model, "reward": reward, "seed": seed, "experiment": preset,
                 "train_steps": train_steps, "reward_queries": queries, "wall_time_s": 10.0 + seed}}
    (d / "metrics.json").write_text(json.dumps({**m, **(extra or {})}))
    return d


def test_mean_ci_by_hand():
    # [1, 2, 3]: mean 2, sample sd 1, standard error 1/sqrt(3), t_{0.975, 2} = 4.303.
    c = mean_ci([1.0, 2.0, 3.0])
    assert c.n == 3 and c.mean == pytest.approx(2.0) and c.ci == pytest.approx(4.303 / math.sqrt(3))
    one = mean_ci([5.0])
    assert one.n == 1 and one.mean == 5.0 and math.isnan(one.ci) and one.text() == "5.00"
    assert mean_ci([]).n == 0 and mean_ci([]).text() == "–"
    assert mean_ci([1.0, None, float("nan"), 3.0]).n == 2  # missing values are not zeros
    assert tables.t_quantile_975(1) == 12.706 and tables.t_quantile_975(22) == 2.086  # next smaller df: wider
    assert tables.t_quantile_975(500) == 1.960


def test_step_table_means_best_and_partial_runs(tmp_path):
    for seed, (a1, a8) in enumerate([(1.0, 2.0), (2.0, 4.0), (3.0, 6.0)]):
        write_run(tmp_path, "p_ddpo", seed, "ddpo", {"r": {"1": a1, "8": a8}}, base={"r": {"1": 1.5, "8": 1.0}})
    for seed, (b1, b8) in enumerate([(4.0, 1.0), (4.0, 1.0)]):
        write_run(tmp_path, "p_sdpo", seed, "sdpo", {"r": {"1": b1, "8": b8}}, base={"r": {"1": 1.5, "8": 1.0}})
    write_run(tmp_path, "p_sdpo", 2, "sdpo", {"r": {"1": 100.0, "8": 100.0}}, complete=False)  # killed mid-run
    runs, problems = load_runs(tmp_path)
    assert not problems and len(runs) == 6 and sum(not r.complete for r in runs) == 1
    t = step_table(runs, "tiny", "r")
    assert t.rows == ["base", "ddpo", "sdpo"] and t.columns == ["1 step", "8 steps"]
    ddpo, sdpo = t.cells[1], t.cells[2]
    assert ddpo[0].mean == pytest.approx(2.0) and ddpo[1].mean == pytest.approx(4.0) and ddpo[1].n == 3
    assert ddpo[1].ci == pytest.approx(4.303 * 2.0 / math.sqrt(3))
    assert sdpo[0] == Cell(4.0, 0.0, 2)  # the unfinished third seed is left out, not averaged in
    assert t.bold == [2, 1]  # best per column: sdpo at 1 step, ddpo at 8
    assert t.cells[0][0].mean == 1.5  # base row
    md = to_markdown(t)
    assert "| sdpo | **4.00 ± 0.00** | 1.00 ± 0.00 |" in md and "| ddpo | 2.00 ± 2.48 | **4.00 ± 4.97** |" in md
    assert "ddpo: 3 seed(s), 64 reward queries and 11 s per run" in md


def test_malformed_and_foreign_files_are_reported_and_skipped(tmp_path):
    write_run(tmp_path, "p", 0, "ddpo", {"r": {"1": 1.0}})
    bad = tmp_path / "p" / "seed1"
    bad.mkdir(parents=True)
    (bad / "metrics.json").write_text('{"eval": {"final": ')  # truncated mid-write
    other = tmp_path / "p" / "seed2"
    other.mkdir(parents=True)
    (other / "metrics.json").write_text(json.dumps({"eval": {}, "run": {"algo": "x"}}))  # no model/reward/seed
    runs, problems = load_runs(tmp_path)
    assert [r.seed for r in runs] == [0]
    why = {p.parent.name: w for p, w in problems}
    assert set(why) == {"seed1", "seed2"} and "not valid JSON" in why["seed1"] and "malformed" in why["seed2"]
    tables.write_tables(runs, problems, tmp_path / "out")
    md = (tmp_path / "out" / "tables.md").read_text()
    assert "Skipped files:" in md and "seed1/metrics.json" in md


def test_markdown_latex_csv_parse(tmp_path):
    for seed in range(2):
        write_run(tmp_path, "a", seed, "d3po", {"r": {"1": 1.0 + seed, "2": 2.0}, "oracle": {"1": 0.5, "2": 0.7}},
                  base={"r": {"1": 0.0, "2": 0.0}, "oracle": {"1": 0.1, "2": 0.2}})
        write_run(tmp_path, "b", seed, "ddpo", {"r": {"1": 3.0, "2": 1.0}, "oracle": {"1": 0.2, "2": 0.9}},
                  base={"r": {"1": 0.0, "2": 0.0}, "oracle": {"1": 0.1, "2": 0.2}})
    runs, problems = load_runs(tmp_path)
    ts = tables.write_tables(runs, problems, tmp_path / "out")
    assert [t.title for t in ts] == ["tiny · trained on r", "tiny · cross-reward matrix at 2 steps (trained on ← , "
                                     "scored by ↓)"]
    cross = ts[1]
    assert cross.columns == ["oracle", "r"] and cross.rows == ["base", "d3po ← r", "ddpo ← r"]
    assert cross.cells[2][0].mean == pytest.approx(0.9) and cross.bold[0] == 2
    for t in ts:  # Markdown: every row has the header's column count
        lines = [ln for ln in to_markdown(t).splitlines() if ln.startswith("|")]
        assert len({ln.count("|") for ln in lines}) == 1 and len(lines) == len(t.rows) + 2
        tex = to_latex(t)  # LaTeX: balanced environments and braces, one & per column per row
        assert tex.count(r"\begin{tabular}") == tex.count(r"\end{tabular}") == 1
        assert tex.count("{") == tex.count("}")
        body = tex.split(r"\midrule")[1].split(r"\bottomrule")[0].strip().splitlines()
        assert len(body) == len(t.rows) and all(ln.count("&") == len(t.columns) for ln in body)
        assert not re.search(r"(?<!\\)_", tex.replace("$", ""))  # underscores escaped
        rows = to_csv(t).strip().splitlines()
        assert len(rows) == 1 + len(t.rows) * len(t.columns)
    assert (tmp_path / "out" / "tables.csv").read_text().count("\n") == 1 + sum(len(t.rows) * len(t.columns)
                                                                             for t in ts)


def test_train_eval_matrix(tmp_path):
    for n, val in ((1, 5.0), (8, 6.0)):
        for seed in range(2):
            write_run(tmp_path, f"s{n}", seed, "sdpo", {"r": {"1": val, "8": val + seed}}, train_steps=n)
    runs, _ = load_runs(tmp_path)
    t = next(t for t in tables.all_tables(runs) if "trained at N" in t.title)
    assert t.rows == ["trained at 1", "trained at 8"] and t.columns == ["eval 1", "eval 8"]
    assert t.cells[1][1].mean == pytest.approx(6.5) and t.bold == [1, 1]


def spec_file(tmp_path, **over):
    spec = {"name": "t", "runs": str(tmp_path / "runs"), "presets": ["tiny_ddpo"], "seeds": [0, 1],
            "overrides": ["logger=quiet"], "launcher": {"kind": "joblib", "n_jobs": 2}, **over}
    path = tmp_path / "spec.yaml"
    path.write_text(json.dumps(spec))  # JSON is YAML
    return path


def test_spec_errors_are_one_line(tmp_path):
    with pytest.raises(ValueError, match="unknown key.*'preset'"):
        study.load_spec(spec_file(tmp_path, preset=["x"]))
    with pytest.raises(ValueError, match=r"unknown preset\(s\) \['tiny_nope'\]"):
        study.load_spec(spec_file(tmp_path, presets=["tiny_nope"]))
    with pytest.raises(FileNotFoundError, match="available"):
        study.load_spec(tmp_path / "missing.yaml")
    assert study.load_spec(spec_file(tmp_path, quick={"seeds": [0]}), quick=True).seeds == [0]


def test_finished_runs_are_skipped_partial_ones_relaunched(tmp_path):
    spec = study.load_spec(spec_file(tmp_path))
    write_run(spec.runs, "tiny_ddpo", 0, "ddpo", {"r": {"1": 1.0}})                    # finished
    write_run(spec.runs, "tiny_ddpo", 1, "ddpo", {"r": {"1": 1.0}}, complete=False)    # killed
    assert study.missing_runs(spec) == {"tiny_ddpo": [1]}
    cmd = study.multirun_command(spec, ["tiny_ddpo"], [1])
    assert cmd[2:5] == ["-m", "experiment=tiny_ddpo", "seed=1"] and "hydra/launcher=joblib" in cmd
    spec.presets = ["tiny_ddpo", "tiny_d3po", "tiny_rebel"]  # d3po and rebel miss both seeds: one sweep for the two
    cmds = study.launch(spec, dry_run=True)
    assert [c[3:5] for c in cmds] == [["experiment=tiny_ddpo", "seed=1"],
                                      ["experiment=tiny_d3po,tiny_rebel", "seed=0,1"]]
    spec.presets = ["tiny_ddpo"]
    write_run(spec.runs, "tiny_ddpo", 1, "ddpo", {"r": {"1": 1.0}})
    assert study.launch(spec) == []  # a finished study launches nothing


@pytest.mark.slow
def test_two_run_multirun_end_to_end(tmp_path):
    """Two real tiny-world runs through Hydra multirun (joblib launcher), then the tables and figures."""
    short = ["logger=quiet", "algo.num_epochs=1", "steps.eval=[1,2]", "algo.sample.batch_size=8",
             "algo.train.batch_size=4", "prompts.eval_max_prompts=2", "eval.rewards=[tiny_true_aesthetic]"]
    path = spec_file(tmp_path, overrides=short)
    assert study.main([str(path)]) == 0
    runs, problems = load_runs(tmp_path / "runs")
    assert not problems and sorted(r.seed for r in runs if r.complete) == [0, 1]
    page = (tmp_path / "README.md").read_text()
    assert (tmp_path / "runs" / "tiny_ddpo" / "seed0" / "train.csv").is_file()  # the csv logger is always on
    assert "| ddpo |" in page and "tiny_true_aesthetic" in page and "figures/steps_tiny_tiny_aesthetic.png" in page
    assert (tmp_path / "figures" / "steps_tiny_tiny_aesthetic.pdf").is_file()
    assert (tmp_path / "tables.tex").read_text().count(r"\begin{table}") == 2
    # Aggregation is deterministic: re-aggregating gives the same files.
    before = (tmp_path / "tables.csv").read_text()
    assert study.main([str(path), "--aggregate-only"]) == 0 and (tmp_path / "tables.csv").read_text() == before
    # Re-running the finished study launches nothing.
    assert study.launch(study.load_spec(path)) == []


def test_base_eval_cache_hits_only_on_identical_settings(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from align_bench.core import eval_cache
    from align_bench.runner import _base_eval

    monkeypatch.setenv("ALIGN_BENCH_CACHE", str(tmp_path / "cache"))
    cfg = OmegaConf.create({"eval": {"cache_base": True, "rewards": ["b"], "eta": 0.0, "batch_size": 4},
                            "steps": {"eval": [1, 2]}, "reward": {"name": "a", "kwargs": {}}, "mixed_precision": "no",
                            "model": {"path": "assets/tiny-world/tiny", "guidance_scale": 7.5, "name": "tiny"},
                            "logger": {"save_images": False}})
    acc = SimpleNamespace(num_processes=1, is_main_process=True, device="cpu")
    calls = []
    table = {"a": {"1": {"mean": 0.1 + 0.2, "std": 1 / 3, "n": 4}}}

    def compute():
        calls.append(1)
        return table

    items = [("p", 1), ("q", 2)]
    assert _base_eval(cfg, items, acc, tmp_path, compute) == table and len(calls) == 1
    assert _base_eval(cfg, items, acc, tmp_path, compute) == table and len(calls) == 1  # served, floats exact
    assert _base_eval(cfg, [("p", 1), ("q", 3)], acc, tmp_path, compute) == table and len(calls) == 2  # other seeds
    cfg.eval.batch_size = 8  # batch composition changes CPU numerics: a different entry
    _base_eval(cfg, items, acc, tmp_path, compute)
    assert len(calls) == 3
    cfg.eval.cache_base = False
    _base_eval(cfg, items, acc, tmp_path, compute)
    assert len(calls) == 4 and len(list(eval_cache.cache_dir().iterdir())) == 3
    acc2 = SimpleNamespace(num_processes=2, is_main_process=True, device="cpu")
    cfg.eval.cache_base, cfg.eval.batch_size = True, 4
    _base_eval(cfg, items, acc2, tmp_path, compute)  # several processes: always computed (no rank may skip)
    assert len(calls) == 5


def test_eval_of_a_fixed_model_is_bit_identical_when_repeated():
    """The tables compare numbers across runs: the same checkpoint and eval set must give the same scores, to the
    bit, however often it is evaluated (own generators per (prompt, seed), no global RNG)."""
    from conftest import tiny_world_missing

    if tiny_world_missing("tiny", "clip", "aesthetic"):
        pytest.skip("tiny world not present")
    import torch

    from align_bench.core.evaluation import eval_items, evaluate
    from align_bench.models import DiffusionModel, ModelSpec
    from align_bench.prompts import load_prompts
    from align_bench.rewards import build_reward
    from conftest import compose

    model = DiffusionModel.from_pretrained(ModelSpec.from_config(compose(["model=tiny"]).model), device="cpu")
    rewards = {name: build_reward(name) for name in ("tiny_aesthetic", "tiny_true_aesthetic")}
    items = eval_items(load_prompts("tiny_eval")[:3], 2, 1234)
    runs = []
    for _ in range(2):
        torch.manual_seed(len(runs))  # a different global RNG state must not matter
        raw, _ = evaluate(model, rewards, items, [1, 4], guidance_scale=7.5, batch_size=4, progress=False)
        runs.append(raw)
    for name in rewards:
        for n in (1, 4):
            assert runs[0][name][n].tobytes() == runs[1][name][n].tobytes()


def test_an_interrupted_sweep_leaves_no_process_behind(tmp_path):
    """SIGTERM to the study while a sweep runs: the sweep's own children (joblib's workers, the runs) are stopped
    too, not left running on the cores; the study exits."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    pid_file = tmp_path / "grandchild.pid"
    worker = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
              f"time.sleep(300)']); open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(300)")
    driver = ("import sys; from align_bench.study import run_sweep\n"
              f"run_sweep([sys.executable, '-c', {worker!r}], dict(__import__('os').environ), grace_s=10)")
    proc = subprocess.Popen([sys.executable, "-c", driver], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not pid_file.is_file() or not pid_file.read_text():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    grandchild = psutil.Process(int(pid_file.read_text()))
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "stopping 2 process(es)" in err, err
    grandchild.wait(timeout=30)  # raises TimeoutExpired if the sweep's grandchild was left running


def test_tuning_tries_every_preset_at_each_value_and_selects_by_training_reward(tmp_path):
    """The equal tuning budget: the same trials for every preset, launched as sub-studies (one per value), scored
    by the training reward of the last epochs only (a run's held-out eval cannot pick its learning rate)."""
    tune = {"key": "algo.train.learning_rate", "values": [0.001, 0.003], "seeds": [0], "select_last_epochs": 2,
            "overrides": ["eval.base=false"]}
    spec = study.load_spec(spec_file(tmp_path, presets=["tiny_ddpo", "tiny_spo"], tune=tune))
    subs = study.tuning_specs(spec)
    assert list(subs) == ["0.001", "0.003"] and subs["0.003"].seeds == [0]
    assert subs["0.003"].overrides[-2:] == ["eval.base=false", "algo.train.learning_rate=0.003"]
    assert not str(subs["0.001"].runs).startswith(str(spec.runs))  # never aggregated into the tables
    assert "=" not in str(subs["0.001"].runs)  # it is passed as hydra.sweep.dir=<path>: an '=' breaks the override
    cmds = study.tune(spec, dry_run=True)
    assert cmds == {}
    curves = {("tiny_ddpo", "0.001"): [9.0, 1.0, 2.0], ("tiny_ddpo", "0.003"): [0.0, 3.0, 2.0],
              ("tiny_spo", "0.001"): [0.0, 5.0, 5.0], ("tiny_spo", "0.003"): [0.0, 4.0, 6.0]}
    for (preset, value), curve in curves.items():
        d = write_run(subs[value].runs, preset, 0, preset[5:], {"r": {"8": 100.0 if value == "0.001" else 0.0}})
        m = json.loads((d / "metrics.json").read_text())
        m["train"] = [{"epoch": i, "reward_mean": r} for i, r in enumerate(curve)]
        (d / "metrics.json").write_text(json.dumps(m))
    assert study.training_score(subs["0.001"].runs / "tiny_ddpo" / "seed0", 2) == 1.5
    chosen = study.tune(spec)  # everything finished: launches nothing
    assert chosen == {"tiny_ddpo": "0.003", "tiny_spo": "0.001"}  # 2.5 > 1.5; a tie (5.0 = 5.0) keeps the first
    page = (tmp_path / "runs").parent / "tuning.md"
    text = (spec.results / "tuning.md").read_text()
    assert page.is_file() and "| tiny_ddpo | 1.500 | **2.500** * | 0.003 |" in text  # tiny_ddpo's own lr is 3e-3
    assert "| tiny_spo | **5.000** * | 5.000 | 0.001 |" in text
    with pytest.raises(ValueError, match="at least two"):
        study.load_spec(spec_file(tmp_path, tune={"key": "seed", "values": [1]}))
