"""align_bench: reward-alignment algorithms for text-to-image diffusion, side by side."""

from pathlib import Path

__version__ = "0.1.0"

# Repo root (…/src/align_bench/__init__.py → parents[2]); relative asset paths in conf/ resolve against it.
REPO_ROOT = Path(__file__).resolve().parents[2]


def resolve_path(path: str | Path) -> Path:
    """Resolve a config path: absolute as given, else relative to the cwd if it exists there, else to the repo root."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    return REPO_ROOT / p
