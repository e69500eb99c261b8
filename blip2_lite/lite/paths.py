"""Where generated data, feature caches and training runs live.

One root for all of them, independent of the working directory (notebooks run from
``notebooks/``, the CLI from anywhere): ``$BLIP2_LITE_CACHE`` if set, else ``data/cache`` in the
repository (git-ignored), else ``~/.cache/blip2_lite`` for a non-editable install.
"""

import os
from pathlib import Path

_REPO = Path(__file__).resolve().parents[2]


def repo_root() -> Path | None:
    """The checkout this package lives in (where pyproject.toml is), or None for a non-editable install."""
    return _REPO if (_REPO / "pyproject.toml").is_file() else None


def cache_root() -> Path:
    if "BLIP2_LITE_CACHE" in os.environ:
        return Path(os.environ["BLIP2_LITE_CACHE"])
    if repo_root() is not None:
        return repo_root() / "data" / "cache"
    return Path.home() / ".cache" / "blip2_lite"
