"""Import every reward module so that its @register_reward runs. Add new modules here."""

from . import jpeg  # noqa: F401
from . import pixel  # noqa: F401

try:  # the tiny world's learned rewards (src/align_bench/tiny); absent until it is built
    from . import tiny  # noqa: F401
except ImportError:  # pragma: no cover
    pass
