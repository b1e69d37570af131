"""Smoke build of the whole tiny world (the code path of `make tiny-world`) at a tiny budget."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_smoke_build_writes_every_artifact(tmp_path):
    from diffusers import LatentConsistencyModelPipeline, StableDiffusionPipeline

    from align_bench.tiny.build import main

    out = tmp_path / "tw"
    main(["--smoke", "--out", str(out), "--threads", "1"])
    for name in ("tiny", "tiny-lcm", "clip", "aesthetic"):
        assert (out / name / "README.md").is_file(), name
    assert (out / "spm" / "README.md").is_file() and (out / "spm" / "model.safetensors").is_file()  # SPO's SPM
    assert (out / "build.log").read_text().count("stage") >= 6
    m = json.loads((out / "metrics.json").read_text())
    assert {"clip_ground_truth", "tiny", "tiny_lcm", "headroom", "timings"} <= set(m)
    StableDiffusionPipeline.from_pretrained(str(out / "tiny"))
    LatentConsistencyModelPipeline.from_pretrained(str(out / "tiny-lcm"))
