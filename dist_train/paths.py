"""Result files go where the user asked: missing parent folders are created, as for ``--output_dir``.

Without it ``dist-train inspect DIR --json runs/demo/inspect.json`` on a fresh clone failed after
all its work, because ``runs/`` did not exist yet.
"""

from __future__ import annotations

from pathlib import Path


def output_file(path: str | Path) -> Path:
    """``path`` with its parent folder created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
