"""Where generated data, feature caches and training runs live.

One root for all of them, independent of the working directory (notebooks run from
``notebooks/``, the CLI from anywhere): ``$BLIP2_LITE_CACHE`` if set, else ``data/cache`` in the
repository (git-ignored), else ``~/.cache/blip2_lite`` for a non-editable install.
"""

import os
from pathlib import Path

_REPO = Path(__file__).resolve().parents[2]


def cache_root() -> Path:
    if "BLIP2_LITE_CACHE" in os.environ:
        return Path(os.environ["BLIP2_LITE_CACHE"])
    if (_REPO / "pyproject.toml").exists():
        return _REPO / "data" / "cache"
    return Path.home() / ".cache" / "blip2_lite"
