"""Writing directories so that a reader never sees a half-written one: build in a temp dir, then rename."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ckaqad.errors import ConfigError, DiskFullError

# Errno values that mean "out of space": a full disk, or a quota.
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}


def check_writable(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Fail early (before any work) if `path` cannot be created or written."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path} exists and is not a directory")
    parent = path if path.exists() else next((p for p in path.parents if p.exists()), Path("."))
    if not parent.is_dir():
        raise ConfigError(f"{flag} {path} cannot be created: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path} is not writable")
    return path


def ordinary_permissions(root: Path) -> None:
    """Give `root` and everything in it the modes a plain `open()` / `mkdir` would (0666 / 0777 less the
    umask). mkdtemp makes directories private and safetensors writes its files 0600; an export must stay
    readable by the serving engine's user."""
    umask = os.umask(0)
    os.umask(umask)
    root.chmod(0o777 & ~umask)
    for path in root.rglob("*"):
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """Yield a temp dir beside `target`; on success it replaces `target` (kept files of an existing
    `target` that the new one lacks are dropped). On error the temp dir is removed and `target` untouched."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        try:
            yield tmp
        except Exception as exc:
            if is_out_of_space(exc):
                raise DiskFullError(f"no space left on the device while writing {target}: free some space or "
                                    "choose another output directory") from exc
            raise
        ordinary_permissions(tmp)
        if target.exists():
            if not replace:
                raise ConfigError(f"{target} already exists")
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_out_of_space(exc: BaseException) -> bool:
    """True for an out-of-space error: an OSError with ENOSPC/EDQUOT, or a library error that wraps one
    (safetensors raises `SafetensorError("... No space left on device (os error 28)")`)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
            return True
        text = str(exc)
        if "No space left on device" in text or "Disk quota exceeded" in text or "StorageFull" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def write_json(path: Path, data, indent: int | None = 2, sort_keys: bool = False) -> None:
    """JSON to `path` through a temp file and a rename, so a reader never sees half a file."""
    write_text(path, json.dumps(data, indent=indent, sort_keys=sort_keys, default=str) + "\n")


def write_text(path: Path, text: str) -> None:
    """`text` to `path` through a temp file beside it and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if is_out_of_space(exc):
            raise DiskFullError(f"no space left on the device while writing {path}") from exc
        raise
