#!/usr/bin/env python
"""Train and evaluate one alignment run: `python train.py algo=ddpo reward=jpeg_compressibility`.

Thin wrapper around align_bench.main (Hydra). Multirun: `python train.py -m algo=ddpo,d3po seed=0,1,2`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))  # works from a clone without `pip install -e .`

from align_bench.main import cli  # noqa: E402

if __name__ == "__main__":
    cli()
