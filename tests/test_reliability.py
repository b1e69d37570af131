"""Crashes, preemption, resume and numerical faults: checkpoints are atomic, verified and weights_only; a run
killed with SIGKILL at random moments (several per run) and resumed ends bit-identical to the uninterrupted one;
SIGTERM checkpoints and exits; non-finite rewards / log-probs / losses skip their update and are counted."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import FAST_RUN, compose

from align_bench.core import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
TIMING_KEYS = {"epoch_time_s", "wall_time_s"}


def _cfg(pipe, *extra):
    return compose([*FAST_RUN, f"model.path={pipe}", "algo.sample.batch_size=2", "algo.sample.num_batches_per_epoch=1",
                    "algo.train.batch_size=1", "algo.train.learning_rate=3e-3", "checkpoint.every=1", *extra])


def _numbers(metrics: dict) -> dict:
    """metrics.json without what legitimately differs between an interrupted and an uninterrupted run."""
    out = {"eval": metrics["eval"], "eval_history": metrics["eval_history"],
           "train": [{k: v for k, v in t.items() if k not in TIMING_KEYS} for t in metrics["train"]]}
    out["run"] = {k: v for k, v in metrics["run"].items() if k not in TIMING_KEYS | {"resumes", "commit"}}
    return out


def _lora(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "lora" / "pytorch_lora_weights.safetensors"))


def _assert_bit_identical(a: Path, b: Path) -> None:
    la, lb = _lora(a), _lora(b)
    assert la.keys() == lb.keys()
    for k in la:
        assert torch.equal(la[k], lb[k]), k
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    assert _numbers(ma) == _numbers(mb)


# ------------------------------------------------------------------------------------------------ checkpoint files
@pytest.fixture(scope="module")
def three_epoch_run(random_pipeline_dir, tmp_path_factory):
    from align_bench.runner import run

    run_dir = tmp_path_factory.mktemp("run")
    metrics = run(_cfg(random_pipeline_dir, "algo.num_epochs=3", "checkpoint.keep=2"), run_dir)
    return run_dir, metrics


def test_checkpoints_are_complete_verified_and_pruned(three_epoch_run, random_pipeline_dir):
    run_dir, _ = three_epoch_run
    assert [d.name for d in ckpt._dirs(run_dir)] == ["epoch_2", "epoch_3"]  # keep=2, the last epoch included
    assert not list((run_dir / "checkpoints").glob(".*"))  # no partial or trash directories left
    meta = ckpt.verify(ckpt.latest(run_dir), _cfg(random_pipeline_dir, "algo.num_epochs=3", "checkpoint.keep=2"), 1)
    assert meta["epoch"] == 3
    # nothing in a checkpoint needs code to load: the state reads with weights_only=True, the LoRA is safetensors
    state = torch.load(ckpt.latest(run_dir) / ckpt.STATE_FILE, weights_only=True)
    assert set(state) >= {"optimizer", "ranks", "metrics", "algo_state"}
    assert set(state["ranks"][0]) >= {"generator", "prompt_sampler", "rng", "counters", "faults"}
    # the checkpoint's LoRA is the final LoRA (the run ended right after epoch 3)
    from safetensors.torch import load_file

    final = load_file(str(run_dir / "lora" / ckpt.LORA_FILE))
    saved = load_file(str(ckpt.latest(run_dir) / ckpt.LORA_FILE))
    assert final.keys() == saved.keys() and all(torch.equal(final[k], saved[k]) for k in final)


def test_a_partial_checkpoint_is_never_the_latest(three_epoch_run, tmp_path):
    import shutil

    run_dir, _ = three_epoch_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "checkpoints" / ".partial-epoch_4").mkdir()  # what a kill during a write leaves
    assert ckpt.latest(copy).name == "epoch_3"
    ckpt.clean_partial(copy)
    assert not (copy / "checkpoints" / ".partial-epoch_4").exists()


@pytest.mark.parametrize("damage, fragment", [
    ("truncate", "training_state.pt is truncated"),
    ("flip", "training_state.pt is corrupted (sha256"),
    ("lora", "pytorch_lora_weights.safetensors is missing"),
    ("meta", "meta.json is corrupted"),
])
def test_a_damaged_checkpoint_is_refused_naming_the_file(three_epoch_run, random_pipeline_dir, tmp_path, damage,
                                                         fragment):
    import shutil

    from align_bench.runner import validate

    run_dir, _ = three_epoch_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    newest = ckpt.latest(copy)
    state = newest / ckpt.STATE_FILE
    if damage == "truncate":
        state.write_bytes(state.read_bytes()[:100])
    elif damage == "flip":
        data = bytearray(state.read_bytes())
        data[len(data) // 2] ^= 0xFF
        state.write_bytes(bytes(data))
    elif damage == "lora":
        (newest / ckpt.LORA_FILE).unlink()
    else:
        (newest / ckpt.META_FILE).write_text('{"epoch": 3, "fil')
    with pytest.raises(ValueError) as e:
        validate(_cfg(random_pipeline_dir, "algo.num_epochs=3", "resume=true"), copy)
    assert fragment in str(e.value) and str(newest) in str(e.value) and "\n" not in str(e.value)


def test_a_checkpoint_of_another_config_is_refused_naming_the_keys(three_epoch_run, random_pipeline_dir):
    from align_bench.runner import validate

    run_dir, _ = three_epoch_run
    with pytest.raises(ValueError) as e:
        validate(_cfg(random_pipeline_dir, "algo.num_epochs=3", "seed=1", "model.lora.rank=2"), run_dir)
    assert "different config" in str(e.value) and "model.lora.rank (4 → 2)" in str(e.value)
    assert "seed (0 → 1)" in str(e.value)
    with pytest.raises(ValueError, match="algo.name"):
        validate(_cfg(random_pipeline_dir, "algo=rebel", "algo.num_epochs=3"), run_dir)
    # a longer run, other logging and another checkpoint cadence are fine
    validate(_cfg(random_pipeline_dir, "algo.num_epochs=5", "checkpoint.every=2", "logger.log_every=3"), run_dir)
    with pytest.raises(ValueError, match="resume=true but there is no checkpoint"):
        validate(_cfg(random_pipeline_dir, "resume=true"), run_dir / "elsewhere")


def test_resume_false_starts_over(three_epoch_run, random_pipeline_dir, tmp_path):
    import shutil

    from align_bench.runner import run

    run_dir, metrics = three_epoch_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    again = run(_cfg(random_pipeline_dir, "algo.num_epochs=1", "resume=false", "seed=1"), copy)
    assert [d.name for d in ckpt._dirs(copy)] == ["epoch_1"] and len(again["train"]) == 1


# ------------------------------------------------------------------------------------------------ numerical faults
class _Poisoned:
    """Test double around the training reward: NaN for the calls listed in `bad` (0-based call index)."""

    def __init__(self, reward, bad):
        self.reward, self.bad, self.calls = reward, set(bad), 0

    def __call__(self, images, prompts, timesteps=None):
        r = self.reward(images, prompts, timesteps)
        if self.calls in self.bad:
            r = r.clone()
            r[0] = float("nan")
        self.calls += 1
        return r

    def __getattr__(self, name):
        return getattr(self.reward, name)


def _poison_training_reward(monkeypatch, bad_calls):
    from align_bench import runner

    built = {}

    def build(name, device, **kw):
        r = runner.__dict__["_real_build_reward"](name, device, **kw)
        if "train" not in built:  # the first reward built is the training reward
            built["train"] = r = _Poisoned(r, bad_calls)
        return r

    monkeypatch.setitem(runner.__dict__, "_real_build_reward", runner.build_reward)
    monkeypatch.setattr(runner, "build_reward", build)


def test_a_nan_reward_skips_that_epoch_and_is_counted(random_pipeline_dir, tmp_path, monkeypatch):
    from align_bench.runner import run

    # no base eval: reward call e is epoch e's (one sampling call per epoch)
    clean = run(_cfg(random_pipeline_dir, "algo.num_epochs=3", "eval.base=false"), tmp_path / "clean")
    _poison_training_reward(monkeypatch, bad_calls=[1])
    faulty = run(_cfg(random_pipeline_dir, "algo.num_epochs=3", "eval.base=false"), tmp_path / "faulty")
    faults = faulty["run"]["faults"]
    assert faults["reward"] == 1 and faults["skipped_epochs"] == 1 and "epoch 1" in faults["last"]
    steps_per_epoch = clean["train"][0]["optimizer_steps"]
    assert faults["skipped_optimizer_steps"] == steps_per_epoch
    assert faulty["run"]["optimizer_steps"] == clean["run"]["optimizer_steps"] - steps_per_epoch
    assert faulty["train"][1]["faults"]["reward"] == 1
    assert faulty["train"][0] | {"epoch_time_s": 0, "wall_time_s": 0} == clean["train"][0] | {
        "epoch_time_s": 0, "wall_time_s": 0}  # identical until the fault
    lora = _lora(tmp_path / "faulty")
    assert all(bool(torch.isfinite(v).all()) for v in lora.values())
    assert json.loads((tmp_path / "faulty" / "metrics.json").read_text())["run"]["faults"]["reward"] == 1


def test_faults_in_a_row_stop_the_run_and_keep_the_last_good_checkpoint(random_pipeline_dir, tmp_path, monkeypatch):
    from align_bench.runner import NumericalFaultError, run

    _poison_training_reward(monkeypatch, bad_calls=range(1, 100))
    with pytest.raises(NumericalFaultError) as e:
        run(_cfg(random_pipeline_dir, "algo.num_epochs=6", "eval.base=false", "guards.max_consecutive_faulty_epochs=2"),
            tmp_path)
    assert "2 epochs in a row" in str(e.value) and "non-finite reward" in str(e.value)
    assert "epoch_1" in str(e.value)
    assert ckpt.latest(tmp_path).name == "epoch_1"
    metrics = json.loads((tmp_path / "metrics.json").read_text())  # strict JSON, NaN rewards as null
    assert metrics["run"]["faults"]["skipped_epochs"] == 2


def test_an_inf_log_prob_and_a_nan_loss_skip_their_updates(random_pipeline_dir, tmp_path, monkeypatch):
    from align_bench import runner
    from align_bench.algorithms import ddpo
    from align_bench.runner import run

    real_rollout, calls = runner.rollout, {"n": 0}

    def rollout_with_inf(*a, **k):
        traj = real_rollout(*a, **k)
        calls["n"] += 1
        if calls["n"] == 2:  # epoch 1's sampling call
            traj.log_probs[0, 1] = float("inf")
        return traj

    real_loss, losses = ddpo.ppo_loss, {"n": 0}

    def loss_with_nan(*a, **k):
        loss, info = real_loss(*a, **k)
        losses["n"] += 1
        return (loss * float("nan") if losses["n"] == 1 else loss), info  # epoch 0's first micro-step

    monkeypatch.setattr(runner, "rollout", rollout_with_inf)
    monkeypatch.setattr(ddpo, "ppo_loss", loss_with_nan)
    metrics = run(_cfg(random_pipeline_dir, "algo.num_epochs=3", "algo.train.gradient_accumulation_steps=2"), tmp_path)
    faults = metrics["run"]["faults"]
    assert faults["log_prob"] == 1 and faults["loss"] == 1 and faults["skipped_epochs"] == 2
    assert "sampled trajectories at step(s) [1]" in faults["last"]
    # epoch 0: 2 trajectories × 3 steps in windows of 2 minibatches × 3 steps = 1 optimizer step, skipped (NaN
    # loss); epoch 1: skipped (inf log-prob); epoch 2 steps normally
    assert faults["skipped_optimizer_steps"] == 2 and metrics["run"]["optimizer_steps"] == 1


# ------------------------------------------------------------------------------------------------ kill and resume
def _train_cmd(pipe, run_dir, *extra, processes=1, port=29541):
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", str(port)]
    return [*launcher, str(ROOT / "train.py"), *FAST_RUN, f"model.path={pipe}", "algo.sample.batch_size=2",
            "algo.sample.num_batches_per_epoch=1", "algo.train.batch_size=1", "algo.train.learning_rate=3e-3",
            "checkpoint.every=1", "logger.progress=false", f"run_dir={run_dir}", *extra]


def _run_to_end(cmd, cwd, timeout=600):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _kill_tree(pid: int, sig: int) -> None:
    """Signal a process and all its descendants (torchrun starts its workers in their own sessions, so a
    process-group kill would leave them running)."""
    import psutil

    parent = psutil.Process(pid)
    for p in [parent, *parent.children(recursive=True)]:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def _kill_and_resume(cmd, run_dir: Path, cwd, num_epochs: int, kills: int, rng: random.Random,
                     sigterm_first: bool = False) -> dict:
    """Start `cmd` and kill it (its whole process group) `kills` times at random moments — each time once a
    randomly chosen later checkpoint exists, plus a random delay, so kills land in sampling, training, checkpoint
    writes or evaluation — resuming each time; then let it finish. Returns what happened."""
    seen = {"kills": 0, "sigterm": 0, "epochs_at_kill": []}
    for i in range(kills + 1):
        done = ckpt.latest(run_dir)
        done = int(done.name[6:]) if done is not None else 0
        target = done + 1 + rng.randrange(2)
        last = i == kills or target >= num_epochs
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        if last:
            _, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, err[-3000:]
            break
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            newest = ckpt.latest(run_dir)
            if newest is not None and int(newest.name[6:]) >= target:
                break
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.2))
        if proc.poll() is not None:  # finished before we got to it
            assert proc.returncode == 0, proc.stderr.read()[-3000:]
            break
        sig = signal.SIGTERM if sigterm_first and i == 0 else signal.SIGKILL
        _kill_tree(proc.pid, sig)
        _, err = proc.communicate(timeout=600)
        if sig == signal.SIGTERM and proc.returncode == 0:  # it came during the final eval: the run finished
            break
        if sig == signal.SIGTERM:
            assert proc.returncode == 143, err[-3000:]
            assert "stopped by SIGTERM" in err, err[-3000:]
            seen["sigterm"] += 1
        else:
            seen["kills"] += 1
        newest = ckpt.latest(run_dir)
        seen["epochs_at_kill"].append(int(newest.name[6:]) if newest else 0)
    return seen


def _exactness(tmp_path, pipe, extra, *, num_epochs, processes=1, kills=3, seed=0, sigterm_first=False):
    extra = [*extra, f"algo.num_epochs={num_epochs}"]
    full, interrupted = tmp_path / "full", tmp_path / "interrupted"
    _run_to_end(_train_cmd(pipe, full, *extra, processes=processes), tmp_path)
    seen = _kill_and_resume(_train_cmd(pipe, interrupted, *extra, processes=processes), interrupted, tmp_path,
                            num_epochs, kills, random.Random(seed), sigterm_first=sigterm_first)
    assert seen["kills"] + seen["sigterm"] >= min(2, kills), seen  # it really was interrupted, several times
    _assert_bit_identical(full, interrupted)
    resumes = json.loads((interrupted / "metrics.json").read_text())["run"]["resumes"]
    assert resumes >= 1
    return seen


@pytest.mark.slow
def test_ddim_run_killed_at_random_moments_resumes_bit_identical(random_pipeline_dir, tmp_path):
    """DDPO on the DDIM pipeline: SIGTERM once (checkpoint + clean exit), then SIGKILLs, each resumed."""
    _exactness(tmp_path, random_pipeline_dir, [], num_epochs=7, kills=3, sigterm_first=True)


@pytest.mark.slow
def test_lcm_run_killed_at_random_moments_resumes_bit_identical(random_lcm_dir, tmp_path):
    """REBEL on the LCM pipeline (stat tracker, LR schedule from the epoch, pairs)."""
    _exactness(tmp_path, random_lcm_dir, ["model=tiny_lcm", "algo=rebel", "algo.train.lr_decay=1",
                                          "algo.train.gradient_accumulation_steps=1",
                                          "algo.per_prompt_stat_tracking.min_count=2"], num_epochs=5, kills=2, seed=1)


@pytest.mark.slow
def test_stepwise_run_killed_at_random_moments_resumes_bit_identical(random_pipeline_dir, tmp_path):
    """SPO, the step-wise algorithm with its own branching loop: random children, per-step preferences, the frozen
    reference policy (LoRA off) and the random child the trajectory continues from all come back the same."""
    _exactness(tmp_path, random_pipeline_dir, ["algo=spo", *TWO_PROCESS_OVERRIDES["spo"]], num_epochs=5, kills=2,
               seed=3)


@pytest.mark.slow
def test_two_process_run_killed_and_resumed_bit_identical(random_pipeline_dir, tmp_path):
    """Two gloo processes (every rank's own streams checkpointed by rank 0) killed with SIGKILL and resumed."""
    _exactness(tmp_path, random_pipeline_dir, [], num_epochs=9, processes=2, kills=2, seed=2)


@pytest.mark.slow
def test_a_stopped_process_does_not_leave_the_other_waiting_forever(random_pipeline_dir, tmp_path):
    """SIGSTOP one of two processes mid-run: the other's next collective gives up after dist_timeout_s with one
    clear line, and the launcher ends the job (a requeue then resumes from the newest checkpoint)."""
    import psutil

    cmd = _train_cmd(random_pipeline_dir, tmp_path / "run", "algo.num_epochs=50", "dist_timeout_s=15", processes=2,
                     port=29547)
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + 300
        while ckpt.latest(tmp_path / "run") is None and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        workers = [p for p in psutil.Process(proc.pid).children() if p.environ().get("RANK") == "1"]
        assert workers, "rank 1 not found"
        workers[0].suspend()
        t0 = time.time()
        _, err = proc.communicate(timeout=240)
        assert proc.returncode != 0 and time.time() - t0 < 200
        assert "lost contact with another process" in err, err[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


# ------------------------------------------------------------------------------------------------ processes
# Per-algorithm overrides that make a 2-process run take seconds on the random pipeline (an algorithm added later
# runs with none; give it its own here if it needs some).
TWO_PROCESS_OVERRIDES = {
    "alignprop": ["reward=tiny_aesthetic", "algo.backprop.strategy=fixed", "algo.backprop.k=1",
                  "algo.sample.num_batches_per_epoch=2", "algo.train.memory_check=false"],
    "ddpo": [],
    "d3po": [],
    "rebel": ["algo.per_prompt_stat_tracking.min_count=2", "algo.train.gradient_accumulation_steps=1"],
    "sdpo": ["algo.train.gradient_accumulation_steps=1"],
    "spo": ["algo.sample.divert_start_step=0", "algo.sample.threshold=0.0", "algo.train.gradient_accumulation_steps=1"],
}


def _algorithms():
    from align_bench.algorithms import ALGORITHMS

    return sorted(ALGORITHMS)


@pytest.mark.slow
@pytest.mark.parametrize("algo", [a for a in _algorithms() if a != "ddpo"])  # ddpo: the 2-process kill test
def test_two_processes_stay_in_sync_and_only_rank_0_writes(algo, random_pipeline_dir, tmp_path):
    run_dir = tmp_path / "run"
    cmd = _train_cmd(random_pipeline_dir, run_dir, f"algo={algo}", "algo.num_epochs=2",
                     *TWO_PROCESS_OVERRIDES.get(algo, []), processes=2, port=29551 + _algorithms().index(algo))
    if algo == "alignprop":  # no stored trajectories, so no training minibatch
        cmd.remove("algo.train.batch_size=1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["run"]["num_processes"] == 2 and metrics["run"]["lora_in_sync"] is True
    assert metrics["run"]["optimizer_steps"] >= 2
    state = torch.load(ckpt.latest(run_dir) / ckpt.STATE_FILE, weights_only=True)
    assert len(state["ranks"]) == 2  # both processes' streams, written by rank 0
    assert not torch.equal(state["ranks"][0]["generator"], state["ranks"][1]["generator"])
    assert not list(tmp_path.glob("runs")) and not list(run_dir.glob("*.tmp"))


@pytest.mark.slow
def test_two_processes_update_as_one_process_with_the_same_global_batch(random_pipeline_dir, tmp_path):
    """Two processes, each with half of one global batch, end with the LoRA weights of one process that takes the
    whole batch: DDP averages the gradients (a sum would double the SGD step, a dropped rank would halve what it
    sees). Single trajectories (PPO) and pairs kept on one process (REBEL)."""
    script = str(ROOT / "tests" / "scripts" / "global_batch.py")
    (tmp_path / "one").mkdir(), (tmp_path / "two").mkdir()
    _run_to_end([sys.executable, script, str(random_pipeline_dir), str(tmp_path / "one"), "ddpo", "rebel"], tmp_path)
    _run_to_end([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29571",
                 script, str(random_pipeline_dir), str(tmp_path / "two"), "ddpo", "rebel"], tmp_path)
    for algo in ("ddpo", "rebel"):
        a, b = (torch.load(tmp_path / d / f"{algo}.pt", weights_only=True) for d in ("one", "two"))
        assert (a["num_processes"], b["num_processes"]) == (1, 2)
        assert a["optimizer_steps"] == b["optimizer_steps"] == 2
        assert a["lora"].keys() == b["lora"].keys()
        step = {k: a["lora"][k] - a["initial"][k] for k in a["lora"]}
        assert max(float(d.abs().max()) for d in step.values()) > 1e-3, algo  # the updates really moved the weights
        for k in a["lora"]:
            torch.testing.assert_close(b["initial"][k], a["initial"][k], rtol=0, atol=0)
            torch.testing.assert_close(b["lora"][k] - b["initial"][k], step[k], rtol=1e-4, atol=1e-6,
                                       msg=f"{algo}: {k}")
