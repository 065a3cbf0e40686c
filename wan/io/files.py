"""Output files that appear whole or not at all, and the checks that refuse a bad path before any model loads."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path


def check_target(path: str | Path, suffix: str, what: str, overwrite: bool = False, also: Iterable[Path] = ()) -> Path:
    """One-line ValueError, prefixed `what:`, unless `path` (and the files `also` written beside it) can be written."""
    path = Path(path).expanduser()
    if path.suffix.lower() != suffix:
        raise ValueError(f"{what}: {path} must end in {suffix}")
    if path.is_dir():
        raise ValueError(f"{what}: {path} is a folder; give a file path ending in {suffix}")
    for target in (path, *also):
        if target.exists() and not overwrite:
            raise ValueError(f"{what}: {target} exists; pass --overwrite to replace it or choose another path")
    folder = path.parent
    if not folder.is_dir():
        raise ValueError(f"{what}: folder {folder} does not exist")
    reason = _unwritable(folder)
    if reason is not None:
        raise ValueError(f"{what}: folder {folder} is not writable ({reason})")
    return path


def _unwritable(folder: Path) -> str | None:
    """Why nothing can be written in `folder`, or None: a real write test, as permission bits say nothing for root or
    read-only mounts."""
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as err:
        return err.strerror
    return None


def check_folder(folder: str | Path, what: str, hint: str = "choose another folder") -> Path:
    """One-line ValueError, prefixed `what:`, unless `folder` is a folder that can be written, or can be made (its
    nearest existing parent can be written): a cache or run folder, checked before anything is computed for it."""
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{what}: {folder} is a file; give a folder")
    existing = next(p for p in (folder, *folder.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"{what}: {existing} is a file, so {folder} cannot be made")
    reason = _unwritable(existing)
    if reason is not None:
        made = "" if existing == folder else f" (to make {folder} in)"
        raise ValueError(f"{what}: folder {existing}{made} is not writable ({reason}); {hint}")
    return folder


def atomic_write(path: str | Path, write: Callable[[str], object]) -> Path:
    """`write(tmp)` to a hidden temporary file beside `path`, then rename it into place.

    The temporary name keeps `path`'s extension (writers such as imageio pick the format from it).
    Whatever stops `write` (an error, Ctrl-C) leaves neither a partial file nor the temporary one.
    """
    path = Path(path).expanduser()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".part{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions of a new file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
