"""Bad configs and inputs fail in one line, naming the key and the valid values, before any model loads
(`checks.check_config`, called by `runner.validate`; `checks.preflight` for what cannot compose)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import compose

from align_bench.algorithms import ALGORITHMS
from align_bench.checks import ConfigError, preflight
from align_bench.main import compose as main_compose

ROOT = Path(__file__).resolve().parents[1]


def _validate(overrides, run_dir=None):
    from align_bench.runner import validate

    validate(compose(overrides), run_dir)


# (overrides, a fragment the one-line message must contain)
BAD_SETTINGS = [
    (["algo.sample.batch_size=0"], "algo.sample.batch_size=0 must be ≥ 1"),
    (["algo.train.batch_size=0"], "algo.train.batch_size=0 must be ≥ 1"),
    (["algo.sample.num_batches_per_epoch=-1"], "algo.sample.num_batches_per_epoch=-1 must be ≥ 1"),
    (["algo.num_epochs=0"], "algo.num_epochs=0 must be ≥ 1"),
    (["algo.train.gradient_accumulation_steps=0"], "algo.train.gradient_accumulation_steps=0 must be ≥ 1"),
    (["algo.train.num_inner_epochs=0"], "algo.train.num_inner_epochs=0"),
    (["algo.train.learning_rate=-1e-4"], "algo.train.learning_rate=-0.0001 must be ≥ 0"),
    (["algo.train.clip_range=-1e-4"], "algo.train.clip_range=-0.0001 must be > 0"),
    (["algo.train.clip_range=0"], "algo.train.clip_range=0.0 must be > 0"),
    (["algo.train.adam_beta1=1.0"], "algo.train.adam_beta1=1.0 must be in [0, 1)"),
    (["algo.train.max_grad_norm=0"], "algo.train.max_grad_norm=0.0 must be > 0"),
    (["algo=rebel", "algo.train.rebel_lr=0"], "algo.train.rebel_lr=0.0 must be > 0"),
    (["algo=d3po", "algo.train.beta=-1"], "algo.train.beta=-1.0 must be > 0"),
    (["algo=alignprop", "algo.sample.batch_size=0"], "algo.sample.batch_size=0 must be ≥ 1"),
    (["model.lora.rank=0"], "model.lora.rank=0 must be ≥ 1"),
    (["model.lora.alpha=0"], "model.lora.alpha=0.0 must be > 0"),
    (["steps.train=0"], "steps.train=0 must be ≥ 1"),
    (["steps.eval=[1,0]"], "steps.eval=0 must be ≥ 1"),
    (["steps.eval=[]"], "steps.eval is empty"),
    (["steps.train=2000"], "at most 1000 steps"),
    (["model=tiny_lcm", "steps.eval=[60]"], "steps.eval=[60]: model 'tiny_lcm' can sample at most 50 steps"),
    (["model=tiny_lcm", "steps.train=51"], "steps.train=51: model 'tiny_lcm' can sample at most 50"),
    (["model.timestep_spacing=foo"], "model.timestep_spacing='foo' is not valid; expected one of ['leading'"),
    (["model.dtype=fp64"], "model.dtype='fp64' is not valid"),
    (["model.family=lcm"], "model.family=lcm but the UNet at"),
    (["model=tiny_lcm", "model.family=sd"], "model.family=sd but the UNet at"),
    (["model.family=sdxl"], "model.family=sdxl but the UNet at assets/tiny-world/tiny is a 'sd' UNet"),
    (["model.family=flux"], "model.family='flux' is not valid; expected one of ['sd', 'lcm', 'sdxl']"),
    (["model.resolution=12"], "model.resolution=12 must be a positive multiple of 8"),
    (["model.path=/nonexistent/pipeline"], "model.path='/nonexistent/pipeline': no such directory"),
    (["eval.batch_size=0"], "eval.batch_size=0 must be ≥ 1"),
    (["eval.rewards=[nope]"], "eval.rewards: unknown reward 'nope'; valid: ["),
    (["prompts.eval_seeds_per_prompt=0"], "prompts.eval_seeds_per_prompt=0 must be ≥ 1"),
    (["prompts.train=/nonexistent/prompts.txt"], "is neither a registered prompt set nor a file; registered: ["),
    (["prompts.train=tiny_trian"], "did you mean 'tiny_train'?"),
    (["+reward.kwargs.clip_dir=/nonexistent/clip"], "clip_dir='/nonexistent/clip' does not exist"),
    (["+reward.kwargs.temperature=2"], "reward.kwargs.temperature is not an argument of reward 'tiny_aesthetic'; "
                                       "valid: ['clip_dir', 'head_dir']"),
    (["resume=maybe"], "resume='maybe' is not valid; expected one of ['auto', 'true', 'false']"),
    (["device=tpu"], "device='tpu' is not valid; expected one of ['auto', 'cpu', 'cuda']"),
    (["mixed_precision=fp8"], "mixed_precision='fp8' is not valid"),
    (["seed=-1"], "seed=-1 must be in [0"),
    (["checkpoint.keep=0"], "checkpoint.keep=0 must be ≥ 1"),
    (["checkpoint.every=-1"], "checkpoint.every=-1 must be ≥ 0"),
    (["guards.max_consecutive_faulty_epochs=0"], "guards.max_consecutive_faulty_epochs=0 must be ≥ 1"),
    (["algo.sample.batch_size=3", "algo.train.batch_size=2"], "multiple of"),
    (["algo=alignprop", "reward=jpeg_compressibility"], "not differentiable"),
    (["algo.sample.eta=0"], "eta must be > 0"),
]
if not torch.cuda.is_available():
    BAD_SETTINGS += [(["mixed_precision=fp16"], "mixed_precision=fp16 needs a CUDA GPU"),
                     (["device=cuda"], "device=cuda but no CUDA device is visible"),
                     (["model.dtype=fp16"], "model.dtype=fp16 on the CPU")]


@pytest.mark.parametrize("overrides, fragment", BAD_SETTINGS, ids=[" ".join(o) for o, _ in BAD_SETTINGS])
def test_a_bad_setting_fails_in_one_line_before_any_model_loads(overrides, fragment, monkeypatch):
    from align_bench.models.diffusion import DiffusionModel

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the config was checked")

    monkeypatch.setattr(DiffusionModel, "from_pretrained", no_loading)
    with pytest.raises(ValueError) as e:
        _validate(overrides)
    message = str(e.value)
    assert fragment in message and "\n" not in message, message


def test_the_defaults_and_every_preset_pass_the_checks():
    from align_bench.checks import group_options

    _validate([])
    for preset in group_options("experiment"):
        if preset.startswith("tiny_"):  # the others need real models on disk
            _validate([f"experiment={preset}"])


def test_prompt_files_missing_empty_or_with_blank_lines(tmp_path, caplog):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ConfigError, match="has no prompts"):
        _validate([f"prompts.train={empty}"])
    blanks = tmp_path / "blanks.txt"
    blanks.write_text("a red circle\n\na blue square\n   \n")
    with caplog.at_level("WARNING", logger="align_bench"):
        _validate([f"prompts.train={blanks}"])
    assert "2 blank line(s); dropped" in caplog.text
    from align_bench.prompts import load_prompts

    assert load_prompts(str(blanks)) == ["a red circle", "a blue square"]


def test_a_model_directory_with_a_part_missing(random_pipeline_dir, tmp_path):
    import shutil

    broken = tmp_path / "pipe"
    shutil.copytree(random_pipeline_dir, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(ConfigError, match=r"is not a diffusers pipeline: missing \['vae/config.json'\]"):
        _validate([f"model.path={broken}", "reward=jpeg_compressibility", "prompts=simple_animals"])


# ------------------------------------------------------------------------------------------------ human feedback
@pytest.fixture(scope="module")
def hf_data(tmp_path_factory, random_pipeline_dir):
    """A sampled human-feedback directory (2 groups of 2) on the random pipeline."""
    from align_bench import human_feedback as hf
    from align_bench.models import DiffusionModel, ModelSpec

    cfg = compose(["algo=d3po", f"model.path={random_pipeline_dir}", "steps.train=2"])
    model = DiffusionModel.from_pretrained(ModelSpec.from_config(cfg.model))
    out = tmp_path_factory.mktemp("hf")
    hf.sample_groups(model, ["a", "b"], 2, hf.sampling_settings(cfg), out, torch.Generator().manual_seed(0))
    return out, random_pipeline_dir


@pytest.mark.parametrize("labels, fragment", [
    ("image,score\n000_0.png,1\n000_1.png,abc\n", "row 3: score 'abc' is not a number"),
    ("image,score\n000_0.png,1\n999_9.png,2\n", "labels name images that were not sampled here: ['999_9.png']"),
    ("winner,loser\n000_0.png,001_1.png\n", "the images must come from the same group"),
])
def test_human_feedback_labels_with_unknown_ids_or_malformed_rows(hf_data, tmp_path, labels, fragment):
    data, pipe = hf_data
    path = tmp_path / "labels.csv"
    path.write_text(labels)
    with pytest.raises(ValueError) as e:
        _validate(["algo=d3po", f"model.path={pipe}", "steps.train=2", "reward=jpeg_compressibility",
                   "prompts=simple_animals", f"algo.human.data_dir={data}", f"algo.human.labels=[{path}]"])
    assert fragment in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_human_feedback_label_file_or_data_missing(hf_data, tmp_path):
    data, pipe = hf_data
    common = ["algo=d3po", f"model.path={pipe}", "steps.train=2", "reward=jpeg_compressibility",
              "prompts=simple_animals"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _validate([*common, f"algo.human.data_dir={data}", f"algo.human.labels=[{tmp_path / 'none.csv'}]"])
    with pytest.raises(ConfigError, match="no trajectories.pt in"):
        _validate([*common, f"algo.human.data_dir={tmp_path}", "algo.human.labels=[x.csv]"])


# ------------------------------------------------------------------------------------------------ preflight
@pytest.mark.parametrize("argv, fragment", [
    (["algo=nope"], f"unknown algo 'nope'; valid: {sorted(ALGORITHMS)}"),
    (["model=tiny_lmc"], "unknown model 'tiny_lmc' (did you mean 'tiny_lcm'?); valid: ["),
    (["reward=nope"], "unknown reward 'nope'; valid: ["),
    (["prompts=nope"], "unknown prompts 'nope'; valid: ["),
    (["experiment=nope"], "unknown experiment 'nope'; valid: ["),
    (["algo.train.clip_rnge=0.1"], "unknown key algo.train.clip_rnge (did you mean algo.train.clip_range?)"),
    (["sed=1"], "unknown key sed (did you mean seed?); valid keys in the top level: ["),
    (["model.lora.rnk=3"], "unknown key model.lora.rnk (did you mean model.lora.rank?)"),
    (["algo.train.batch_size=four"], "algo.train.batch_size: Value 'four' of type 'str' could not be converted"),
    (["-m", "seed=0,1", "algo=ddpo,nope"], f"valid algo: {sorted(ALGORITHMS)}"),
])
def test_what_cannot_compose_is_one_line_naming_what_is_valid(argv, fragment):
    error = preflight(argv, main_compose)
    assert error is not None and fragment in error and "\n" not in error, error


def test_preflight_passes_good_command_lines_and_sweeps():
    assert preflight(["experiment=tiny_ddpo", "seed=3"], main_compose) is None
    assert preflight(["-m", "algo=ddpo,d3po", "seed=0,1"], main_compose) is None
    assert preflight(["--cfg", "job"], main_compose) is None


def test_train_py_prints_one_line_and_exits_2(tmp_path):
    for argv in (["algo=nope"], ["eval.batch_size=0"]):
        proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *argv, f"run_dir={tmp_path}"],
                              capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr[-2000:]
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert not (tmp_path / "metrics.json").exists()


def test_metrics_json_is_strict_json_even_with_nan(tmp_path):
    from align_bench.runner import _finite_or_null

    text = json.dumps(_finite_or_null({"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": 2}}), allow_nan=False)
    assert json.loads(text) == {"a": None, "b": [1.0, None], "c": {"d": 2}}
