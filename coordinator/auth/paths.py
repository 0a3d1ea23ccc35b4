"""Server-side file paths named in requests are confined to one operator-chosen directory.

Without this, ``model.weights`` would let any API caller probe which files exist on the coordinator
(and load any readable tensor file). A path is resolved (symlinks included) before it is compared, and a
refusal never says whether the named file exists.
"""
from __future__ import annotations

from pathlib import Path


class PathRefused(ValueError):
    """The path is outside the allowed directory, or server paths are disabled."""


def confine(name: str, root: Path | None, what: str = "model.weights", flag: str = "--weights-dir") -> Path:
    """``name`` (relative to ``root``, or absolute inside it) as a resolved path inside ``root``."""
    if root is None:
        raise PathRefused(f"{what}: server-side files are disabled on this coordinator; start it with "
                          f"{flag} DIR and name a file inside DIR")
    root = root.resolve()
    path = (root / name).resolve()  # an absolute name replaces root; both are then checked the same way
    if path != root and root not in path.parents:
        raise PathRefused(f"{what} must name a file inside the coordinator's {flag} directory")
    if not path.is_file():
        raise PathRefused(f"{what}: no file {name!r} in the coordinator's {flag} directory")
    return path
