"""Atomic writes: a file or folder appears under its final name complete, or not at all.

Every cache and checkpoint of blip2_lite is written through ``atomic_path``: the content goes to a
temporary sibling, which is renamed over the target only when the write finished. A run killed
mid-write leaves the previous version (or nothing) behind, never a truncated file that a later
run would take for a valid cache.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike, directory: bool = False):
    """Yield a temporary path beside ``path``; when the block ends without error, rename it to ``path``.

    Files replace an existing ``path`` (``os.replace`` is atomic on POSIX: readers see the old file
    or the new one). A folder is renamed into place only if ``path`` does not exist yet; if another
    process finished the same folder first, that one is kept and ours discarded. On any error or
    interrupt the temporary path is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    else:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        if not directory:
            os.replace(tmp, path)
        else:
            try:
                os.rename(tmp, path)
            except OSError:
                if not path.is_dir():  # not a concurrent writer that finished first: a real error
                    raise
    finally:
        if directory:
            shutil.rmtree(tmp, ignore_errors=True)  # no-op after a successful rename
        else:
            tmp.unlink(missing_ok=True)


def write_json(path: str | os.PathLike, obj) -> None:
    """``obj`` as indented JSON, written atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1))
